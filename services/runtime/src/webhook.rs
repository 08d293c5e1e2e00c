//! The webhook notify sends to channel gateways (and the connect service receives): a POST
//! of JSON, signed with HMAC-SHA256 over the body (`X-Closedloop-Signature: sha256=<hex>`),
//! with `Idempotency-Key` set to the delivery id so a gateway can drop a message sent again
//! after a crash.

use std::borrow::Cow;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use subtle::ConstantTimeEq;

pub const SIGNATURE_HEADER: &str = "x-closedloop-signature";
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// Hex HMAC-SHA256 of `body` under `secret`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// Whether `header` (the value of [`SIGNATURE_HEADER`]) signs `body` under `secret`,
/// compared in constant time.
pub fn verify(secret: &[u8], body: &[u8], header: &str) -> bool {
    let expected = format!("sha256={}", sign(secret, body));
    expected.as_bytes().ct_eq(header.trim().as_bytes()).into()
}

/// What a gateway receives.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WebhookMessage<'a> {
    pub delivery_id: Cow<'a, str>,
    pub tenant: Cow<'a, str>,
    /// e.g. `acknowledgement`, `closure`.
    pub kind: Cow<'a, str>,
    /// e.g. `weibo_post`.
    pub channel: Cow<'a, str>,
    /// The poster id on the channel.
    pub recipient: Cow<'a, str>,
    /// The channel message this answers, so the gateway can reply in thread.
    #[serde(default)]
    pub reply_to_message_id: Cow<'a, str>,
    #[serde(default)]
    pub thread_id: Cow<'a, str>,
    #[serde(default)]
    pub complaint_id: Cow<'a, str>,
    #[serde(default)]
    pub work_order_id: Cow<'a, str>,
    pub text: Cow<'a, str>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_hex() {
        // RFC 4231 test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn verifies_only_the_body_it_signed() {
        let header = format!("sha256={}", sign(b"secret", b"{\"a\":1}"));
        assert!(verify(b"secret", b"{\"a\":1}", &header));
        assert!(!verify(b"secret", b"{\"a\":2}", &header));
        assert!(!verify(b"other", b"{\"a\":1}", &header));
        assert!(!verify(b"secret", b"{\"a\":1}", ""));
    }
}
