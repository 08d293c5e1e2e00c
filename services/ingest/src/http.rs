//! HTTP for callers that cannot speak gRPC: JSON forms of `SubmitComplaint(s)`, the WeChat
//! official-account callback and the Weibo fan-service callback. All go through
//! [`Intake`], like gRPC does.
//!
//! - `POST /v1/complaints` with `{"complaint": {...}}` → `{"complaint_id", "duplicate"}`
//! - `POST /v1/complaints:batch` with `{"complaints": [...]}` → `{"results": [...]}`
//! - `GET|POST /wechat/{tenant}`: WeChat's verification handshake and message pushes
//! - `GET|POST /weibo/{tenant}`: Weibo's verification handshake and private-message pushes
//! - `GET /healthz`: 200 while JetStream is reachable

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Extension, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use closedloop_proto::v1::{Channel, ComplaintSubmission, Poster, SubmissionOutcome};
use closedloop_runtime::auth::{Authenticator, Principal, Role};
use closedloop_runtime::grpc::Violation;
use closedloop_runtime::time;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::intake::{IngestError, Intake, RETRY_AFTER};
use crate::nonces::Nonces;
use crate::signed;
use crate::wechat::{self, WechatAccounts};
use crate::weibo::{self, WeiboApps};

/// WeChat gives up on a push after 5 s; answer well before (Weibo is given the same).
const PUSH_DEADLINE: Duration = Duration::from_millis(4_000);
/// Pushes are small; refuse anything larger before reading it.
const PUSH_MAX_BODY: usize = 64 * 1024;

/// The platform callbacks' configuration and memory.
pub struct Callbacks {
    pub wechat: WechatAccounts,
    pub weibo: WeiboApps,
    /// Signed pushes seen, so a signature carries one message.
    pub nonces: Nonces,
}

struct HttpState {
    intake: Intake,
    auth: Authenticator,
    callbacks: Callbacks,
}

pub fn router(intake: Intake, auth: Authenticator, callbacks: Callbacks, max_body: usize) -> Router {
    let state = Arc::new(HttpState {
        intake,
        auth,
        callbacks,
    });
    // The token is checked before the body is read: an unauthenticated caller cannot make
    // ingest read megabytes.
    let json_api = Router::new()
        .route("/v1/complaints", post(submit_one))
        .route("/v1/complaints:batch", post(submit_many))
        .layer(DefaultBodyLimit::max(max_body))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    let callbacks = Router::new()
        .route("/wechat/{tenant}", get(wechat_handshake).post(wechat_push))
        .route("/weibo/{tenant}", get(weibo_handshake).post(weibo_push))
        .layer(DefaultBodyLimit::max(PUSH_MAX_BODY));
    json_api
        .merge(callbacks)
        .route("/healthz", get(healthz))
        .with_state(state)
}

/// A complaint in JSON, the same fields as the protobuf `ComplaintSubmission`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JsonComplaint {
    pub tenant: String,
    /// `weibo_post` or `CHANNEL_WEIBO_POST`.
    pub channel: String,
    pub channel_message_id: String,
    pub poster: Option<JsonPoster>,
    pub text: String,
    /// RFC 3339, e.g. `2026-11-23T08:00:00+08:00`.
    pub posted_at: Option<String>,
    pub thread_id: String,
    pub in_reply_to: String,
    pub attachment_urls: Vec<String>,
    pub locale: String,
    pub region_hint: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JsonPoster {
    pub poster_id: String,
    pub display_name: String,
    pub followers: i64,
    pub verified: bool,
}

fn channel_from_name(name: &str) -> Channel {
    let upper = name.trim().to_ascii_uppercase();
    Channel::from_str_name(&upper)
        .or_else(|| Channel::from_str_name(&format!("CHANNEL_{upper}")))
        .unwrap_or(Channel::Unspecified)
}

impl From<JsonComplaint> for ComplaintSubmission {
    fn from(json: JsonComplaint) -> Self {
        let posted_at = json
            .posted_at
            .map(|text| match chrono::DateTime::parse_from_rfc3339(&text) {
                Ok(at) => time::to_timestamp(at.to_utc()),
                // Negative nanos are invalid, so validation reports the field like any bad time.
                Err(_) => prost_types::Timestamp {
                    seconds: 0,
                    nanos: -1,
                },
            });
        ComplaintSubmission {
            tenant: json.tenant,
            channel: channel_from_name(&json.channel) as i32,
            channel_message_id: json.channel_message_id,
            poster: json.poster.map(|p| Poster {
                poster_id: p.poster_id,
                display_name: p.display_name,
                followers: p.followers,
                verified: p.verified,
            }),
            text: json.text,
            posted_at,
            thread_id: json.thread_id,
            in_reply_to: json.in_reply_to,
            attachment_urls: json.attachment_urls,
            locale: json.locale,
            region_hint: json.region_hint,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitOneBody {
    complaint: Option<JsonComplaint>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitManyBody {
    #[serde(default)]
    complaints: Vec<JsonComplaint>,
}

#[derive(Serialize)]
struct ItemResult {
    outcome: &'static str,
    complaint_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    reason: String,
}

/// Everything an HTTP caller can get wrong or run into; mapped to a response in one place.
#[derive(Debug, thiserror::Error)]
enum HttpError {
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("no {0} account configured for this tenant")]
    UnknownAccount(&'static str),
    #[error("bad signature")]
    BadSignature,
    #[error("this account accepts encrypted (safe-mode) pushes only")]
    NotEncrypted,
    #[error("this signature was used for another message")]
    Replayed,
    #[error("{0}")]
    BadMessage(String),
    #[error("not stored in time; retry")]
    NotInTime,
}

impl IntoResponse for HttpError {
    /// JSON API errors are `{"code", "message", "field_violations"}` with the matching HTTP
    /// status and, for storage failures, `Retry-After`; callback errors are plain text.
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            HttpError::Ingest(IngestError::Invalid(_)) => (StatusCode::BAD_REQUEST, "INVALID_ARGUMENT"),
            HttpError::Ingest(IngestError::PermissionDenied) => (StatusCode::FORBIDDEN, "PERMISSION_DENIED"),
            HttpError::Ingest(IngestError::Unavailable) => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
            HttpError::Ingest(IngestError::StoreFull) => {
                (StatusCode::TOO_MANY_REQUESTS, "RESOURCE_EXHAUSTED")
            }
            HttpError::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "UNAUTHENTICATED"),
            HttpError::UnknownAccount(_) => {
                return (StatusCode::NOT_FOUND, self.to_string()).into_response();
            }
            HttpError::BadSignature | HttpError::NotEncrypted | HttpError::Replayed => {
                return (StatusCode::FORBIDDEN, self.to_string()).into_response();
            }
            HttpError::BadMessage(_) => return (StatusCode::BAD_REQUEST, self.to_string()).into_response(),
            HttpError::NotInTime => {
                return (StatusCode::SERVICE_UNAVAILABLE, self.to_string()).into_response();
            }
        };
        let violations: Vec<_> = match &self {
            HttpError::Ingest(IngestError::Invalid(v)) => v
                .iter()
                .map(|v| json!({"field": v.field, "description": v.description}))
                .collect(),
            _ => Vec::new(),
        };
        let retry = matches!(
            self,
            HttpError::Ingest(IngestError::Unavailable | IngestError::StoreFull)
        );
        let body = json!({"code": code, "message": self.to_string(), "field_violations": violations});
        let mut response = (status, axum::Json(body)).into_response();
        if retry {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER.as_secs()));
        }
        response
    }
}

/// Authenticates the bearer token and hands the caller to the handler, before anything
/// reads the body.
async fn require_token(
    State(state): State<Arc<HttpState>>,
    mut request: Request,
    next: Next,
) -> Result<Response, HttpError> {
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let caller = state
        .auth
        .authenticate(header)
        .map_err(|status| HttpError::Unauthenticated(status.message().to_owned()))?;
    request.extensions_mut().insert(caller);
    Ok(next.run(request).await)
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, HttpError> {
    serde_json::from_slice(body).map_err(|e| {
        IngestError::Invalid(vec![Violation::new("body", format!("is not valid JSON: {e}"))]).into()
    })
}

async fn submit_one(
    State(state): State<Arc<HttpState>>,
    Extension(caller): Extension<Principal>,
    body: Bytes,
) -> Result<Response, HttpError> {
    let request: SubmitOneBody = parse_json(&body)?;
    let complaint = request
        .complaint
        .ok_or_else(|| IngestError::Invalid(vec![Violation::new("complaint", "must be set")]))?;
    let accepted = state
        .intake
        .submit_one(&caller, &complaint.into(), "complaint")
        .await?;
    Ok(
        axum::Json(json!({"complaint_id": accepted.complaint_id, "duplicate": accepted.duplicate}))
            .into_response(),
    )
}

async fn submit_many(
    State(state): State<Arc<HttpState>>,
    Extension(caller): Extension<Principal>,
    body: Bytes,
) -> Result<Response, HttpError> {
    let request: SubmitManyBody = parse_json(&body)?;
    let submissions: Vec<ComplaintSubmission> = request.complaints.into_iter().map(Into::into).collect();
    let results: Vec<ItemResult> = state
        .intake
        .submit_many(&caller, &submissions)
        .await?
        .into_iter()
        .map(|r| ItemResult {
            outcome: match r.outcome() {
                SubmissionOutcome::Accepted => "accepted",
                SubmissionOutcome::Duplicate => "duplicate",
                _ => "rejected",
            },
            complaint_id: r.complaint_id,
            reason: r.reason,
        })
        .collect();
    Ok(axum::Json(json!({ "results": results })).into_response())
}

/// The query a platform signs its callback with: `echostr` on the handshake only, and
/// `encrypt_type` and `msg_signature` on WeChat's safe mode only.
#[derive(Deserialize)]
struct PushQuery {
    #[serde(default)]
    signature: String,
    #[serde(default)]
    timestamp: String,
    #[serde(default)]
    nonce: String,
    #[serde(default)]
    echostr: String,
    /// Safe mode: `aes`, with `msg_signature` over the ciphertext.
    #[serde(default)]
    encrypt_type: String,
    #[serde(default)]
    msg_signature: String,
}

/// A platform whose pushes ingest takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Platform {
    Wechat,
    Weibo,
}

impl Platform {
    fn name(self) -> &'static str {
        match self {
            Platform::Wechat => "WeChat",
            Platform::Weibo => "Weibo",
        }
    }

    /// In keys and caller names.
    fn key(self) -> &'static str {
        match self {
            Platform::Wechat => "wechat",
            Platform::Weibo => "weibo",
        }
    }

    /// The secret `tenant`'s pushes are signed with: WeChat's callback token, Weibo's app
    /// secret.
    fn secret(self, state: &HttpState, tenant: &str) -> Result<String, HttpError> {
        let secret = match self {
            Platform::Wechat => state.callbacks.wechat.token(tenant),
            Platform::Weibo => state.callbacks.weibo.secret(tenant),
        };
        secret
            .map(str::to_owned)
            .ok_or(HttpError::UnknownAccount(self.name()))
    }
}

/// Checks that the query carries a valid, recent signature by `tenant`'s account on
/// `platform`.
fn verify_push(
    state: &HttpState,
    platform: Platform,
    tenant: &str,
    query: &PushQuery,
) -> Result<(), HttpError> {
    let secret = platform.secret(state, tenant)?;
    if signed::verify(
        &secret,
        &query.timestamp,
        &query.nonce,
        &query.signature,
        chrono::Utc::now(),
    ) {
        Ok(())
    } else {
        tracing::warn!(%tenant, platform = platform.name(), "callback with a bad or stale signature");
        Err(HttpError::BadSignature)
    }
}

/// The message XML of a push whose signature checks out: the body itself in plain mode,
/// decrypted from `Encrypt` for an account in safe mode (which refuses plain pushes).
fn open_push<'b>(
    state: &HttpState,
    tenant: &str,
    query: &PushQuery,
    body: &'b str,
) -> Result<std::borrow::Cow<'b, str>, HttpError> {
    let account = state
        .callbacks
        .wechat
        .account(tenant)
        .ok_or(HttpError::UnknownAccount("WeChat"))?;
    let Some((app_id, key)) = &account.safe_mode else {
        verify_push(state, Platform::Wechat, tenant, query)?;
        return Ok(body.into());
    };
    if query.encrypt_type != "aes" {
        tracing::warn!(%tenant, "a plain WeChat push to an account in safe mode");
        return Err(HttpError::NotEncrypted);
    }
    let envelope = wechat::parse_encrypted(body).map_err(|e| HttpError::BadMessage(e.to_string()))?;
    if !wechat::verify_encrypted(
        &account.token,
        &query.timestamp,
        &query.nonce,
        &envelope.encrypt,
        &query.msg_signature,
        chrono::Utc::now(),
    ) {
        tracing::warn!(%tenant, "WeChat push with a bad or stale msg_signature");
        return Err(HttpError::BadSignature);
    }
    let xml = wechat::safe_mode::decrypt(key, app_id, &envelope.encrypt).map_err(|e| {
        tracing::warn!(%tenant, error = %e, "a signed WeChat push that does not decrypt");
        HttpError::BadMessage(e.to_string())
    })?;
    Ok(xml.into())
}

/// WeChat's server verification: echo `echostr` when the signature checks out.
async fn wechat_handshake(
    State(state): State<Arc<HttpState>>,
    Path(tenant): Path<String>,
    Query(query): Query<PushQuery>,
) -> Result<String, HttpError> {
    verify_push(&state, Platform::Wechat, &tenant, &query)?;
    Ok(query.echostr)
}

/// Weibo's server verification, the same as WeChat's.
async fn weibo_handshake(
    State(state): State<Arc<HttpState>>,
    Path(tenant): Path<String>,
    Query(query): Query<PushQuery>,
) -> Result<String, HttpError> {
    verify_push(&state, Platform::Weibo, &tenant, &query)?;
    Ok(query.echostr)
}

/// A pushed message. Answers `success` (WeChat's "received, no reply") once the complaint
/// is stored; a 503 makes WeChat retry, and the message id makes its retries harmless.
async fn wechat_push(
    State(state): State<Arc<HttpState>>,
    Path(tenant): Path<String>,
    Query(query): Query<PushQuery>,
    body: Bytes,
) -> Result<&'static str, HttpError> {
    let xml = std::str::from_utf8(&body).map_err(|e| HttpError::BadMessage(e.to_string()))?;
    let xml = open_push(&state, &tenant, &query, xml)?;
    let message = wechat::parse_message(&xml).map_err(|e| HttpError::BadMessage(e.to_string()))?;
    let Some(submission) = wechat::to_submission(&message) else {
        return Ok("success");
    };
    admit_and_submit(
        &state,
        Platform::Wechat,
        &tenant,
        &query.timestamp,
        &query.nonce,
        &submission,
    )
    .await?;
    Ok("success")
}

/// Stores a signed push's message, once per signature: the platform's retries of it pass,
/// another message under the same signature is refused. A message ingest refuses is
/// acknowledged (retrying cannot fix it) and logged.
async fn admit_and_submit(
    state: &HttpState,
    platform: Platform,
    tenant: &str,
    timestamp: &str,
    nonce: &str,
    submission: &ComplaintSubmission,
) -> Result<(), HttpError> {
    let seen = signed::nonce_key(platform.key(), tenant, timestamp, nonce);
    let admitted = state
        .callbacks
        .nonces
        .admit(&seen, &submission.channel_message_id)
        .await
        .map_err(|error| {
            tracing::warn!(%error, "cannot check the push's signature against those seen");
            HttpError::Ingest(IngestError::Unavailable)
        })?;
    if !admitted {
        tracing::warn!(%tenant, platform = platform.name(), "a signature replayed with another message");
        return Err(HttpError::Replayed);
    }
    let caller = Principal {
        tenant: tenant.to_owned(),
        roles: vec![Role::Gateway],
        name: platform.key().into(),
    };
    let stored = tokio::time::timeout(
        PUSH_DEADLINE,
        state.intake.submit_one(&caller, submission, "message"),
    )
    .await
    .map_err(|_| HttpError::NotInTime)?;
    match stored {
        Ok(_) => Ok(()),
        Err(IngestError::Invalid(violations)) => {
            tracing::warn!(%tenant, platform = platform.name(), ?violations, "pushed message rejected");
            Ok(())
        }
        Err(error) => Err(error.into()),
    }
}

/// A pushed private message. Answers 200 with an empty body (no passive reply: the reply
/// comes from an agent or the first-reply promise, through notify) once the complaint is
/// stored; a 503 asks Weibo to push it again.
async fn weibo_push(
    State(state): State<Arc<HttpState>>,
    Path(tenant): Path<String>,
    Query(query): Query<PushQuery>,
    body: Bytes,
) -> Result<&'static str, HttpError> {
    verify_push(&state, Platform::Weibo, &tenant, &query)?;
    let push = weibo::parse_push(&body).map_err(|e| HttpError::BadMessage(e.to_string()))?;
    let Some(submission) = weibo::to_submission(&push) else {
        return Ok("");
    };
    admit_and_submit(
        &state,
        Platform::Weibo,
        &tenant,
        &query.timestamp,
        &query.nonce,
        &submission,
    )
    .await?;
    Ok("")
}

async fn healthz(State(state): State<Arc<HttpState>>) -> StatusCode {
    if state.intake.is_connected() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}
