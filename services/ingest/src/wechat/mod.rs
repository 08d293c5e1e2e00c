//! The WeChat official-account callback: the XML of a pushed message, and how a text
//! message becomes a submission; the signature on every push is in [`crate::signed`],
//! safe (encrypted) mode in [`safe_mode`]. Plain functions; the HTTP side is in `http.rs`.

use std::collections::HashMap;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use closedloop_proto::v1::{Channel, ComplaintSubmission, Poster};
use prost_types::Timestamp;
use serde::Deserialize;

use crate::signed;

pub mod safe_mode;

/// One tenant's official account as the callback sees it.
#[derive(Clone, Debug)]
pub struct WechatAccount {
    /// The callback token configured in the WeChat admin console.
    pub token: String,
    /// Safe mode: the account's AppID and EncodingAESKey. An account with them accepts
    /// encrypted pushes only.
    pub safe_mode: Option<(String, safe_mode::AesKey)>,
}

/// The official account of each tenant.
#[derive(Clone, Default)]
pub struct WechatAccounts {
    by_tenant: HashMap<String, WechatAccount>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WechatError {
    #[error("WeChat account entry {0:?} is not `tenant=token` or `tenant=token|appid|encoding-aes-key`")]
    Malformed(String),
    #[error("WeChat account {0:?}: {1}")]
    Key(String, safe_mode::SafeModeError),
    #[error("message XML is invalid: {0}")]
    Xml(String),
}

impl FromStr for WechatAccounts {
    type Err = WechatError;
    /// `acme=token1;beta=token2|wx0123456789abcdef|<43-character EncodingAESKey>`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        closedloop_runtime::auth::tenant_map(s, WechatError::Malformed, |tenant, value| {
            let fields: Vec<&str> = value.split('|').map(str::trim).collect();
            match fields[..] {
                [token] if !token.is_empty() => Ok(WechatAccount {
                    token: token.to_owned(),
                    safe_mode: None,
                }),
                [token, app_id, key] if !token.is_empty() && !app_id.is_empty() => {
                    let key = safe_mode::AesKey::from_encoding_aes_key(key)
                        .map_err(|e| WechatError::Key(tenant.to_owned(), e))?;
                    Ok(WechatAccount {
                        token: token.to_owned(),
                        safe_mode: Some((app_id.to_owned(), key)),
                    })
                }
                _ => Err(WechatError::Malformed(tenant.to_owned())),
            }
        })
        .map(|by_tenant| Self { by_tenant })
    }
}

impl WechatAccounts {
    pub fn account(&self, tenant: &str) -> Option<&WechatAccount> {
        self.by_tenant.get(tenant)
    }
    pub fn token(&self, tenant: &str) -> Option<&str> {
        self.account(tenant).map(|a| a.token.as_str())
    }
    pub fn is_empty(&self) -> bool {
        self.by_tenant.is_empty()
    }
}

/// As [`crate::signed::verify`], for a safe-mode push: `msg_signature` over the ciphertext too.
pub fn verify_encrypted(
    token: &str,
    timestamp: &str,
    nonce: &str,
    encrypted: &str,
    claimed: &str,
    now: DateTime<Utc>,
) -> bool {
    let expected = safe_mode::msg_signature(token, timestamp, nonce, encrypted);
    signed::same_signature(&expected, claimed) && signed::within_window(timestamp, now)
}

/// A pushed message, as far as Closedloop reads it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct WechatMessage {
    /// The official account's id.
    pub to_user_name: String,
    /// The customer's openid.
    pub from_user_name: String,
    /// Seconds since the epoch.
    pub create_time: i64,
    /// `text`, `image`, `voice`, `event`, ...
    pub msg_type: String,
    #[serde(default)]
    pub content: String,
    /// Absent on events; WeChat's retries of one message share it.
    #[serde(default)]
    pub msg_id: Option<String>,
}

pub fn parse_message(xml: &str) -> Result<WechatMessage, WechatError> {
    quick_xml::de::from_str(xml).map_err(|e| WechatError::Xml(e.to_string()))
}

/// The envelope of a safe-mode push: the message is in `Encrypt`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct EncryptedPush {
    pub encrypt: String,
}

pub fn parse_encrypted(xml: &str) -> Result<EncryptedPush, WechatError> {
    quick_xml::de::from_str(xml).map_err(|e| WechatError::Xml(e.to_string()))
}

/// A text message as a submission; `None` for other kinds (images, events), which are
/// acknowledged to WeChat and not ingested.
pub fn to_submission(message: &WechatMessage) -> Option<ComplaintSubmission> {
    if message.msg_type != "text" {
        return None;
    }
    Some(ComplaintSubmission {
        channel: Channel::Wechat as i32,
        channel_message_id: message.msg_id.clone().unwrap_or_default(),
        poster: Some(Poster {
            poster_id: message.from_user_name.clone(),
            ..Default::default()
        }),
        text: message.content.clone(),
        posted_at: Some(Timestamp {
            seconds: message.create_time,
            nanos: 0,
        }),
        // A customer's chat with one account is one conversation.
        thread_id: format!("wechat:{}:{}", message.to_user_name, message.from_user_name),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT_PUSH: &str = "<xml><ToUserName><![CDATA[gh_0123456789ab]]></ToUserName>\
        <FromUserName><![CDATA[oUser-openid]]></FromUserName><CreateTime>1700000000</CreateTime>\
        <MsgType><![CDATA[text]]></MsgType><Content><![CDATA[宽带断网了 <急>]]></Content>\
        <MsgId>23456789012345678</MsgId></xml>";

    #[test]
    fn parses_a_text_push_into_a_submission() {
        let message = parse_message(TEXT_PUSH).expect("valid XML");
        assert_eq!(message.msg_id.as_deref(), Some("23456789012345678"));
        let submission = to_submission(&message).expect("text message");
        assert_eq!(submission.text, "宽带断网了 <急>");
        assert_eq!(submission.channel(), Channel::Wechat);
        assert_eq!(submission.channel_message_id, "23456789012345678");
        assert_eq!(
            submission.poster.map(|p| p.poster_id).as_deref(),
            Some("oUser-openid")
        );
        assert_eq!(submission.thread_id, "wechat:gh_0123456789ab:oUser-openid");
    }

    #[test]
    fn events_are_not_submissions_and_garbage_is_an_error() {
        let event = "<xml><ToUserName>a</ToUserName><FromUserName>b</FromUserName>\
            <CreateTime>1</CreateTime><MsgType>event</MsgType><Event>subscribe</Event></xml>";
        let message = parse_message(event).expect("valid XML");
        assert!(to_submission(&message).is_none());
        assert!(parse_message("<xml><oops").is_err());
    }

    #[test]
    fn accounts_parse() {
        let accounts: WechatAccounts =
            "acme=tok1; beta=tok2|wxBeta|abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
                .parse()
                .expect("valid");
        assert_eq!(accounts.token("beta"), Some("tok2"));
        assert!(accounts.account("acme").is_some_and(|a| a.safe_mode.is_none()));
        assert_eq!(
            accounts
                .account("beta")
                .and_then(|a| a.safe_mode.as_ref())
                .map(|(app, _)| app.as_str()),
            Some("wxBeta")
        );
        assert!("acme".parse::<WechatAccounts>().is_err());
        assert!("ACME=x".parse::<WechatAccounts>().is_err());
        assert!("acme=tok|wxA".parse::<WechatAccounts>().is_err());
        assert!(matches!(
            "acme=tok|wxA|short".parse::<WechatAccounts>(),
            Err(WechatError::Key(..))
        ));
    }

    mod properties {
        use proptest::prelude::*;

        use super::super::*;

        proptest! {
            /// Anything may arrive as a push: parsing never panics, and a text message's
            /// submission carries its content and id as sent.
            #[test]
            fn any_body_parses_or_is_refused(body in ".{0,200}") {
                let _ = parse_message(&body);
            }

            #[test]
            fn pushes_with_any_content_parse(
                content in "[^<>&\\]\r]{0,80}",
                id in "[0-9]{1,20}",
                from in "[a-zA-Z0-9_-]{1,28}",
            ) {
                let xml = format!(
                    "<xml><ToUserName><![CDATA[gh_1]]></ToUserName><FromUserName><![CDATA[{from}]]></FromUserName>\
                     <CreateTime>1700000000</CreateTime><MsgType><![CDATA[text]]></MsgType>\
                     <Content><![CDATA[{content}]]></Content><MsgId>{id}</MsgId></xml>"
                );
                let message = parse_message(&xml);
                prop_assert!(message.is_ok(), "{xml}: {message:?}");
                let submission = message.ok().as_ref().and_then(to_submission);
                prop_assert_eq!(submission.as_ref().map(|s| s.text.as_str()), Some(content.as_str()));
                prop_assert_eq!(submission.map(|s| s.channel_message_id), Some(id));
            }
        }
    }
}
