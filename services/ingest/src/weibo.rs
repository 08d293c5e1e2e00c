//! The Weibo fan-service callback: a customer's private message to the brand account,
//! pushed as JSON by Weibo's fan service (粉丝服务平台, development mode) and signed as
//! [`crate::signed`] describes, with the app secret of the app the account authorised. A
//! text message becomes a submission on `weibo_direct_message`; its reply goes back as a
//! private message (connect's `messages/reply`). Plain functions; the HTTP side is in
//! `http.rs`.

use std::collections::HashMap;
use std::str::FromStr;

use closedloop_proto::v1::{Channel, ComplaintSubmission, Poster};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The app secret each tenant's brand account signs its pushes with.
#[derive(Clone, Default)]
pub struct WeiboApps {
    secrets: HashMap<String, String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WeiboError {
    #[error("Weibo app entry {0:?} is not `tenant=app-secret`")]
    Malformed(String),
    #[error("push is not a Weibo message: {0}")]
    Json(String),
}

impl FromStr for WeiboApps {
    type Err = WeiboError;
    /// `acme=secret1;beta=secret2`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        closedloop_runtime::auth::tenant_map(s, WeiboError::Malformed, |tenant, secret| match secret {
            "" => Err(WeiboError::Malformed(tenant.to_owned())),
            secret => Ok(secret.to_owned()),
        })
        .map(|secrets| Self { secrets })
    }
}

impl WeiboApps {
    pub fn secret(&self, tenant: &str) -> Option<&str> {
        self.secrets.get(tenant).map(String::as_str)
    }
    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }
}

/// A pushed message, as far as Closedloop reads it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct WeiboPush {
    /// `text`, `position`, `voice`, `image`, `event`, `mention`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// The brand account.
    #[serde(deserialize_with = "uid")]
    pub receiver_id: String,
    /// The customer.
    #[serde(deserialize_with = "uid")]
    pub sender_id: String,
    /// As Weibo writes times: `Mon Jul 16 18:09:20 +0800 2012`.
    #[serde(default)]
    pub created_at: String,
    #[serde(default)]
    pub text: String,
}

/// A uid, which Weibo writes as a number (and some of its examples as a string).
fn uid<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    match serde_json::Value::deserialize(deserializer)? {
        serde_json::Value::Number(n) => Ok(n.to_string()),
        serde_json::Value::String(s) if !s.is_empty() => Ok(s),
        other => Err(serde::de::Error::custom(format!("{other} is not a uid"))),
    }
}

pub fn parse_push(body: &[u8]) -> Result<WeiboPush, WeiboError> {
    serde_json::from_slice(body).map_err(|e| WeiboError::Json(e.to_string()))
}

/// A text message as a submission; `None` for other kinds (images, events), which are
/// acknowledged to Weibo and not ingested.
///
/// A push carries no message id. The id given is the sender, the time and a digest of the
/// text, so that a push delivered twice is one complaint.
pub fn to_submission(push: &WeiboPush) -> Option<ComplaintSubmission> {
    if push.kind != "text" {
        return None;
    }
    let posted_at = closedloop_runtime::time::from_weibo(&push.created_at);
    let digest = Sha256::digest(push.text.as_bytes());
    let message_id = format!(
        "dm:{}:{}:{}",
        push.sender_id,
        posted_at.as_ref().map_or(0, |at| at.seconds),
        hex::encode(&digest[..8])
    );
    Some(ComplaintSubmission {
        channel: Channel::WeiboDirectMessage as i32,
        channel_message_id: message_id,
        poster: Some(Poster {
            poster_id: push.sender_id.clone(),
            ..Default::default()
        }),
        text: push.text.clone(),
        posted_at,
        // A customer's private chat with one brand account is one conversation.
        thread_id: format!("weibo-dm:{}:{}", push.receiver_id, push.sender_id),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT_PUSH: &str = r#"{"type": "text", "receiver_id": 1902538057, "sender_id": 2489518277,
        "created_at": "Mon Jul 16 18:09:20 +0800 2012", "text": "宽带断了三天了", "data": {}}"#;

    #[test]
    fn parses_a_text_push_into_a_submission() {
        let push = parse_push(TEXT_PUSH.as_bytes()).expect("valid JSON");
        let submission = to_submission(&push).expect("a text message");
        assert_eq!(submission.channel(), Channel::WeiboDirectMessage);
        assert_eq!(submission.text, "宽带断了三天了");
        assert_eq!(
            submission.poster.as_ref().map(|p| p.poster_id.as_str()),
            Some("2489518277")
        );
        assert_eq!(submission.thread_id, "weibo-dm:1902538057:2489518277");
        assert_eq!(submission.posted_at.map(|t| t.seconds), Some(1_342_433_360));
        assert!(
            submission
                .channel_message_id
                .starts_with("dm:2489518277:1342433360:"),
            "{}",
            submission.channel_message_id
        );
    }

    #[test]
    fn the_same_push_twice_is_one_message_and_another_text_is_another() {
        let push = parse_push(TEXT_PUSH.as_bytes()).expect("valid JSON");
        let again = to_submission(&push).map(|s| s.channel_message_id);
        assert_eq!(to_submission(&push).map(|s| s.channel_message_id), again);
        let other = WeiboPush {
            text: "还是没修好".into(),
            ..push
        };
        assert_ne!(to_submission(&other).map(|s| s.channel_message_id), again);
    }

    #[test]
    fn uids_as_strings_parse_and_other_kinds_are_not_submissions() {
        let event = r#"{"type": "event", "receiver_id": "1902538057", "sender_id": "2489518277",
            "created_at": "Mon Jul 16 18:09:20 +0800 2012", "text": "", "data": {"subtype": "follow"}}"#;
        let push = parse_push(event.as_bytes()).expect("valid JSON");
        assert_eq!(push.sender_id, "2489518277");
        assert!(to_submission(&push).is_none());
        assert!(parse_push(br#"{"type": "text", "receiver_id": null, "sender_id": 1}"#).is_err());
        assert!(parse_push(b"<xml/>").is_err());
    }

    #[test]
    fn apps_parse() {
        let apps: WeiboApps = "acme=s1; beta=s2".parse().expect("valid");
        assert_eq!(apps.secret("beta"), Some("s2"));
        assert_eq!(apps.secret("gamma"), None);
        assert!("acme".parse::<WeiboApps>().is_err());
        assert!("acme=".parse::<WeiboApps>().is_err());
    }

    mod properties {
        use proptest::prelude::*;

        use super::super::*;

        proptest! {
            /// Anything may arrive as a push: parsing never panics.
            #[test]
            fn any_body_parses_or_is_refused(body in proptest::collection::vec(any::<u8>(), 0..300)) {
                let _ = parse_push(&body);
            }

            /// A text message's submission carries its text as sent.
            #[test]
            fn pushes_with_any_text_parse(text in ".{0,80}", sender in 1u64..u64::MAX) {
                let body = serde_json::json!({
                    "type": "text", "receiver_id": 1, "sender_id": sender,
                    "created_at": "Mon Jul 16 18:09:20 +0800 2012", "text": text,
                });
                let push = parse_push(body.to_string().as_bytes());
                prop_assert!(push.is_ok(), "{body}: {push:?}");
                let submission = push.ok().as_ref().and_then(to_submission);
                prop_assert_eq!(submission.map(|s| s.text), Some(text));
            }
        }
    }
}
