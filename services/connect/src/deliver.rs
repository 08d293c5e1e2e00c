//! The webhook notify posts to: `POST /deliveries`, signed. Each delivery is sent at most
//! once ([`Store::begin`]); the answer tells notify what to do next:
//!
//! | answer | meaning | notify |
//! | --- | --- | --- |
//! | 200, `{"method", "platform_message_id"}` | sent (now or before) | delivered |
//! | 422, the reason | refused for good, or outcome unknown | parks it with the reason |
//! | 429 with `Retry-After` | not sent now (rate limit, token, busy, in progress) | retries |
//! | 401 / 400 | not signed by notify / not a webhook | parks it |

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use closedloop_runtime::webhook::{self, SIGNATURE_HEADER, WebhookMessage};
use serde_json::json;

use crate::store::{Begin, DeliveryRecord, Stage, Store};
use crate::wechat::{self, SendError};

/// What serves the webhook.
pub struct Deliverer {
    /// The secret notify signs with.
    pub secret: Vec<u8>,
    pub store: Store,
    pub wechat: wechat::Client,
    pub weibo: crate::weibo::Client,
    /// How long one platform call may take.
    pub api_timeout: Duration,
}

impl Deliverer {
    /// Longest a delivery can legitimately stay `sending`: a token fetch and up to four
    /// calls (a refused token, then the template), each within the API timeout.
    fn call_timeout(&self) -> Duration {
        self.api_timeout * 6 + Duration::from_secs(5)
    }
}

pub fn router(deliverer: Arc<Deliverer>) -> Router {
    Router::new()
        .route("/deliveries", post(receive))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(deliverer)
}

async fn receive(State(deliverer): State<Arc<Deliverer>>, headers: HeaderMap, body: Bytes) -> Response {
    let signature = headers
        .get(SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !webhook::verify(&deliverer.secret, &body, signature) {
        tracing::warn!("a delivery webhook with a bad signature");
        return (StatusCode::UNAUTHORIZED, "bad signature").into_response();
    }
    let message: WebhookMessage<'static> = match serde_json::from_slice::<WebhookMessage<'_>>(&body) {
        Ok(message) => owned(message),
        Err(error) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("not a delivery webhook: {error}"),
            )
                .into_response();
        }
    };
    let platform = match message.channel.as_ref() {
        "wechat" => "wechat",
        "weibo_post" | "weibo_comment" | "weibo_direct_message" => "weibo",
        other => {
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("connect has no connector for channel {other}"),
            )
                .into_response();
        }
    };
    let now_ms = chrono::Utc::now().timestamp_millis();
    let lease = match deliverer
        .store
        .begin(&message.delivery_id, now_ms, deliverer.call_timeout())
        .await
    {
        Ok(Begin::Send(lease)) => lease,
        Ok(Begin::Done(record)) => {
            crate::metrics::delivery(platform, "", "repeated");
            return answer(&record);
        }
        Ok(Begin::InProgress) => return later(Duration::from_secs(1), "being sent now".into()),
        Err(crate::store::StoreError::BadId(id)) => {
            return (StatusCode::BAD_REQUEST, format!("not a delivery id: {id:?}")).into_response();
        }
        Err(error) => {
            tracing::warn!(%error, "cannot record the delivery");
            return later(Duration::from_secs(1), error.to_string());
        }
    };
    // The send runs on its own task: if notify stops waiting, it still finishes and is
    // recorded, so a retry gets its outcome rather than an unknown one.
    let sending = tokio::spawn(async move {
        let sent = if platform == "wechat" {
            deliverer
                .wechat
                .deliver(&message.tenant, &message.recipient, &message.text)
                .await
        } else {
            deliverer.weibo.deliver(&message).await
        };
        let record = record_of(&sent, now_ms);
        let (method, outcome) = match &sent {
            Ok(sent) => (sent.method, "sent"),
            Err(SendError::Later(..)) => ("", "later"),
            Err(SendError::Refused(_)) => ("", "refused"),
            Err(SendError::Unknown(_)) => ("", "unknown"),
        };
        crate::metrics::delivery(platform, method, outcome);
        if let Err(error) = &sent {
            tracing::warn!(delivery_id = %message.delivery_id, tenant = %message.tenant, %platform, %error, "delivery not sent");
        }
        if let Err(error) = deliverer.store.finish(lease, &record).await {
            tracing::error!(%error, delivery_id = %message.delivery_id, "cannot record a delivery's outcome");
        }
        match sent {
            Err(SendError::Later(wait, why)) => later(wait, why),
            _ => answer(&record),
        }
    });
    sending.await.unwrap_or_else(|error| {
        tracing::error!(%error, "a delivery task failed");
        (StatusCode::INTERNAL_SERVER_ERROR, "delivery task failed").into_response()
    })
}

fn owned(message: WebhookMessage<'_>) -> WebhookMessage<'static> {
    let own = |s: std::borrow::Cow<'_, str>| std::borrow::Cow::Owned(s.into_owned());
    WebhookMessage {
        delivery_id: own(message.delivery_id),
        tenant: own(message.tenant),
        kind: own(message.kind),
        channel: own(message.channel),
        recipient: own(message.recipient),
        reply_to_message_id: own(message.reply_to_message_id),
        thread_id: own(message.thread_id),
        complaint_id: own(message.complaint_id),
        work_order_id: own(message.work_order_id),
        text: own(message.text),
    }
}

/// The record a send's result leaves.
fn record_of(sent: &Result<crate::sent::Sent, SendError>, started_ms: i64) -> DeliveryRecord {
    let base = DeliveryRecord {
        stage: Stage::Sent,
        started_ms,
        method: String::new(),
        platform_message_id: String::new(),
        reason: String::new(),
    };
    match sent {
        Ok(sent) => DeliveryRecord {
            method: sent.method.to_owned(),
            platform_message_id: sent.platform_message_id.clone(),
            ..base
        },
        Err(SendError::Later(_, why)) => DeliveryRecord {
            stage: Stage::Pending,
            reason: why.clone(),
            ..base
        },
        Err(error) => DeliveryRecord {
            stage: Stage::Failed,
            reason: error.to_string(),
            ..base
        },
    }
}

/// The answer for a finished record.
fn answer(record: &DeliveryRecord) -> Response {
    match record.stage {
        Stage::Sent => axum::Json(json!({
            "method": record.method,
            "platform_message_id": record.platform_message_id,
        }))
        .into_response(),
        Stage::Failed => (StatusCode::UNPROCESSABLE_ENTITY, record.reason.clone()).into_response(),
        Stage::Pending | Stage::Sending => later(Duration::from_secs(1), record.reason.clone()),
    }
}

/// Not sent now: try again after `wait`.
fn later(wait: Duration, why: String) -> Response {
    let mut response = (StatusCode::TOO_MANY_REQUESTS, why).into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(wait.as_secs().max(1)));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_become_records() {
        let sent = record_of(
            &Ok(crate::sent::Sent {
                method: "template",
                platform_message_id: "42".into(),
            }),
            7,
        );
        assert_eq!(
            (sent.stage, sent.method.as_str(), sent.started_ms),
            (Stage::Sent, "template", 7)
        );
        let later = record_of(&Err(SendError::Later(Duration::from_secs(60), "quota".into())), 7);
        assert_eq!(later.stage, Stage::Pending, "sent by the next request");
        let refused = record_of(&Err(SendError::Refused("errcode 40003".into())), 7);
        assert_eq!(
            (refused.stage, refused.reason.as_str()),
            (Stage::Failed, "errcode 40003")
        );
        let unknown = record_of(&Err(SendError::Unknown("timed out".into())), 7);
        assert_eq!(unknown.stage, Stage::Failed, "never sent twice");
        assert!(unknown.reason.starts_with("outcome unknown"));
    }
}
