//! What the WeChat and Weibo callbacks share. Both platforms sign a push with the hex SHA-1
//! of a secret (WeChat's callback token, Weibo's app secret), the timestamp and the nonce,
//! sorted and joined. The signature does not cover the body, so a signed URL that leaks
//! would let anyone post any message as any customer: a push is accepted only within
//! [`REPLAY_WINDOW`] of its timestamp, and each signed (timestamp, nonce) carries one
//! message (the HTTP side remembers which, under [`nonce_key`]), so a platform's own
//! retries of that message pass and anything else under the same signature is refused.

use chrono::{DateTime, Utc};
use sha1::{Digest, Sha1};
use subtle::ConstantTimeEq;

/// How far a push's timestamp may be from now, either way.
pub const REPLAY_WINDOW: chrono::Duration = chrono::Duration::minutes(5);

/// Hex SHA-1 of the secret, timestamp and nonce, sorted and joined.
pub fn signature(secret: &str, timestamp: &str, nonce: &str) -> String {
    let mut parts = [secret, timestamp, nonce];
    parts.sort_unstable();
    hex::encode(Sha1::digest(parts.concat().as_bytes()))
}

/// Whether a push really comes from the platform that shares `secret`: the signature
/// matches (compared in constant time) and the timestamp is within [`REPLAY_WINDOW`] of
/// `now`.
pub fn verify(secret: &str, timestamp: &str, nonce: &str, claimed: &str, now: DateTime<Utc>) -> bool {
    same_signature(&signature(secret, timestamp, nonce), claimed) && within_window(timestamp, now)
}

/// Hex signatures compared in constant time, in either case.
pub fn same_signature(expected: &str, claimed: &str) -> bool {
    let claimed = claimed.to_ascii_lowercase();
    expected.as_bytes().ct_eq(claimed.as_bytes()).into()
}

/// Whether `timestamp` is within [`REPLAY_WINDOW`] of `now`: seconds since the epoch as
/// WeChat sends it, or milliseconds as Weibo does (13 digits and more; no time in seconds
/// has that many before the year 5000).
pub fn within_window(timestamp: &str, now: DateTime<Utc>) -> bool {
    timestamp
        .parse::<i64>()
        .ok()
        .and_then(|t| {
            if t >= 1_000_000_000_000 {
                DateTime::from_timestamp_millis(t)
            } else {
                DateTime::from_timestamp(t, 0)
            }
        })
        .is_some_and(|at| (now - at).abs() <= REPLAY_WINDOW)
}

/// The key under which a signed push's (timestamp, nonce) is remembered: hashed, since both
/// are the caller's words and keys allow few characters.
pub fn nonce_key(platform: &str, tenant: &str, timestamp: &str, nonce: &str) -> String {
    let digest = sha2::Sha256::digest(format!("{tenant}\u{1f}{timestamp}\u{1f}{nonce}").as_bytes());
    format!("{platform}-nonce.{}", hex::encode(digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_sorts_then_hashes() {
        // sha1("1700000000" + "nonce" + "token"), the parts in byte order.
        let expected = hex::encode(Sha1::digest(b"1700000000noncetoken"));
        assert_eq!(signature("token", "1700000000", "nonce"), expected);
        let signed_at = DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default();
        assert!(verify(
            "token",
            "1700000000",
            "nonce",
            &expected.to_uppercase(),
            signed_at
        ));
        assert!(!verify("other", "1700000000", "nonce", &expected, signed_at));
    }

    #[test]
    fn the_example_weibo_documents_checks_out() {
        // The fan service's documented example: app secret xyz123xyz, a timestamp in
        // milliseconds, nonce 57155157.
        assert_eq!(
            signature("xyz123xyz", "1397022061823", "57155157"),
            "90e4c22c90a58f26526c2dd5b6c56c8822edeaa1"
        );
    }

    #[test]
    fn a_push_is_accepted_only_near_its_timestamp_in_seconds_or_milliseconds() {
        let signed_at = DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default();
        let later = |minutes| signed_at + chrono::Duration::minutes(minutes);
        for timestamp in ["1700000000", "1700000000123"] {
            let expected = signature("token", timestamp, "nonce");
            assert!(verify("token", timestamp, "nonce", &expected, later(4)));
            assert!(
                verify("token", timestamp, "nonce", &expected, later(-4)),
                "clocks differ"
            );
            assert!(
                !verify("token", timestamp, "nonce", &expected, later(10)),
                "replayed later"
            );
        }
        assert!(!within_window("not a time", signed_at));
        assert!(!within_window("99999999999999999999", signed_at));
    }

    #[test]
    fn nonce_keys_are_safe_and_scoped_by_platform_and_tenant() {
        let key = nonce_key("wechat", "acme", "1700000000", "a b.>*");
        assert!(
            key.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.')),
            "{key}"
        );
        assert_ne!(key, nonce_key("wechat", "beta", "1700000000", "a b.>*"));
        assert_ne!(key, nonce_key("weibo", "acme", "1700000000", "a b.>*"));
    }
}
