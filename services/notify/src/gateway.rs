//! Channel-gateway webhooks: an HTTP POST of JSON, signed with HMAC-SHA256 over the body
//! (`X-Closedloop-Signature: sha256=<hex>`), with `Idempotency-Key` set to the delivery id
//! so a gateway can drop a message notify sends again after a crash.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use closedloop_proto::v1::Channel;
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;

pub const SIGNATURE_HEADER: &str = "x-closedloop-signature";
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// One gateway: where to POST and the secret to sign with.
#[derive(Clone)]
pub struct Gateway {
    pub url: String,
    secret: Vec<u8>,
}

/// Gateways by channel name (`wechat`, `weibo_post`, ...) with a `default` for the rest.
#[derive(Clone, Default)]
pub struct GatewayTable {
    by_channel: HashMap<String, Gateway>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GatewayTableError {
    #[error("gateway entry for {0:?} is not `channel=url|secret`")]
    Malformed(String),
    #[error("gateway URL for {0:?} must start with http:// or https://")]
    Url(String),
}

impl FromStr for GatewayTable {
    type Err = GatewayTableError;
    /// `default=https://gw/hook|secret;wechat=https://wx-gw/hook|other-secret`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut by_channel = HashMap::new();
        for entry in s.split([';', '\n']).map(str::trim).filter(|e| !e.is_empty()) {
            let (channel, rest) = entry
                .split_once('=')
                .ok_or_else(|| GatewayTableError::Malformed(entry.into()))?;
            let channel = channel.trim().to_ascii_lowercase();
            let (url, secret) = rest
                .split_once('|')
                .filter(|(_, secret)| !secret.is_empty())
                .ok_or_else(|| GatewayTableError::Malformed(channel.clone()))?;
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(GatewayTableError::Url(channel));
            }
            by_channel.insert(
                channel,
                Gateway {
                    url: url.trim().to_owned(),
                    secret: secret.as_bytes().to_vec(),
                },
            );
        }
        Ok(Self { by_channel })
    }
}

/// The configuration name of a channel: `CHANNEL_WEIBO_POST` → `weibo_post`.
pub fn channel_key(channel: Channel) -> String {
    channel
        .as_str_name()
        .trim_start_matches("CHANNEL_")
        .to_ascii_lowercase()
}

impl GatewayTable {
    pub fn for_channel(&self, channel: Channel) -> Option<&Gateway> {
        self.by_channel
            .get(&channel_key(channel))
            .or_else(|| self.by_channel.get("default"))
    }
    pub fn len(&self) -> usize {
        self.by_channel.len()
    }
    pub fn is_empty(&self) -> bool {
        self.by_channel.is_empty()
    }
}

/// Hex HMAC-SHA256 of `body` under `secret`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// What a gateway receives.
#[derive(Debug, Serialize)]
pub struct WebhookMessage<'a> {
    pub delivery_id: &'a str,
    pub tenant: &'a str,
    /// e.g. `acknowledgement`, `closure`.
    pub kind: &'a str,
    /// e.g. `weibo_post`.
    pub channel: &'a str,
    /// The poster id on the channel.
    pub recipient: &'a str,
    /// The channel message this answers, so the gateway can reply in thread.
    pub reply_to_message_id: &'a str,
    pub thread_id: &'a str,
    pub complaint_id: &'a str,
    pub work_order_id: &'a str,
    pub text: &'a str,
}

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("no gateway configured for channel {0}")]
    NoGateway(String),
    #[error("gateway unreachable: {0}")]
    Transport(#[from] reqwest::Error),
    #[error("gateway answered HTTP {status}: {body}")]
    Rejected { status: u16, body: String },
    #[error("cannot encode the message: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Posts signed messages to gateways.
#[derive(Clone)]
pub struct WebhookClient {
    http: reqwest::Client,
    gateways: GatewayTable,
}

impl WebhookClient {
    pub fn new(gateways: GatewayTable, timeout: Duration) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent("closedloop-notify")
            .build()?;
        Ok(Self { http, gateways })
    }

    /// Sends one message; success means the gateway answered 2xx.
    pub async fn send(&self, channel: Channel, message: &WebhookMessage<'_>) -> Result<(), DeliveryError> {
        let gateway = self
            .gateways
            .for_channel(channel)
            .ok_or_else(|| DeliveryError::NoGateway(channel_key(channel)))?;
        let body = serde_json::to_vec(message)?;
        let signature = sign(&gateway.secret, &body);
        let response = self
            .http
            .post(&gateway.url)
            .header("content-type", "application/json")
            .header(IDEMPOTENCY_HEADER, message.delivery_id)
            .header(SIGNATURE_HEADER, format!("sha256={signature}"))
            .body(body)
            .send()
            .await?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let body: String = response
            .text()
            .await
            .unwrap_or_default()
            .chars()
            .take(200)
            .collect();
        Err(DeliveryError::Rejected {
            status: status.as_u16(),
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_table_picks_channel_then_default() {
        let table: GatewayTable = "default=http://gw/hook|s1; wechat=https://wx/hook|s2"
            .parse()
            .expect("valid");
        assert_eq!(
            table.for_channel(Channel::Wechat).map(|g| g.url.as_str()),
            Some("https://wx/hook")
        );
        assert_eq!(
            table.for_channel(Channel::WeiboPost).map(|g| g.url.as_str()),
            Some("http://gw/hook")
        );
        assert!(GatewayTable::default().for_channel(Channel::Wechat).is_none());
        assert!(matches!(
            "wechat=ftp://x|s".parse::<GatewayTable>(),
            Err(GatewayTableError::Url(_))
        ));
        assert!(matches!(
            "wechat=http://x".parse::<GatewayTable>(),
            Err(GatewayTableError::Malformed(_))
        ));
    }

    #[test]
    fn signature_is_hmac_sha256_hex() {
        // RFC 4231 test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
