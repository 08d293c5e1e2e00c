//! A stand-in channel gateway: receives notify's webhook POSTs, checks their signature and
//! keeps them for tests to inspect (or prints them, for the local launcher), and lists them
//! at `GET /messages` for checks from outside its process.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use closedloop_runtime::webhook::{IDEMPOTENCY_HEADER, SIGNATURE_HEADER, sign};
use tokio_util::sync::CancellationToken;

/// One message a gateway received.
#[derive(Debug, Clone)]
pub struct ReceivedMessage {
    /// When it arrived.
    pub at: std::time::Instant,
    /// When it arrived, by the wall clock (Unix milliseconds).
    pub at_unix_ms: i64,
    /// The HTTP status the receiver answered.
    pub answered: u16,
    pub idempotency_key: String,
    /// Whether the signature header matched the body under the shared secret.
    pub signature_valid: bool,
    pub body: serde_json::Value,
}

impl ReceivedMessage {
    pub fn field(&self, name: &str) -> &str {
        self.body.get(name).and_then(|v| v.as_str()).unwrap_or_default()
    }
}

#[derive(Clone)]
struct ReceiverState {
    secret: String,
    received: Arc<Mutex<Vec<ReceivedMessage>>>,
    /// How many of the next requests to answer with `failure_status`.
    failures_left: Arc<AtomicUsize>,
    failure_status: Arc<AtomicU16>,
    /// A webhook `channel` (e.g. `staff`) whose every request is answered 503.
    down_channel: Arc<Mutex<Option<String>>>,
    /// How many of the next requests to answer only after `slow_delay`.
    slow_left: Arc<AtomicUsize>,
    slow_delay_ms: Arc<AtomicUsize>,
    print: bool,
}

/// The receiver's address, secret and what it got.
#[derive(Clone)]
pub struct WebhookReceiver {
    pub addr: SocketAddr,
    pub secret: String,
    /// Shared with the server's handlers.
    state: ReceiverState,
}

async fn receive(State(state): State<ReceiverState>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let expected = format!("sha256={}", sign(state.secret.as_bytes(), &body));
    let failing = state
        .failures_left
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let channel_down = state.down_channel.lock().is_ok_and(|down| {
        down.as_deref()
            .is_some_and(|channel| body.get("channel").and_then(|c| c.as_str()) == Some(channel))
    });
    let status = if channel_down {
        StatusCode::SERVICE_UNAVAILABLE
    } else if failing {
        StatusCode::from_u16(state.failure_status.load(Ordering::SeqCst))
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    } else {
        StatusCode::OK
    };
    let message = ReceivedMessage {
        at: std::time::Instant::now(),
        at_unix_ms: chrono::Utc::now().timestamp_millis(),
        answered: status.as_u16(),
        idempotency_key: header(IDEMPOTENCY_HEADER),
        signature_valid: header(SIGNATURE_HEADER) == expected,
        body,
    };
    if state.print {
        println!(
            "gateway <- {} to {} on {} (signature {}): {}",
            message.field("kind"),
            message.field("recipient"),
            message.field("channel"),
            if message.signature_valid {
                "valid"
            } else {
                "INVALID"
            },
            message.field("text")
        );
    }
    if let Ok(mut received) = state.received.lock() {
        received.push(message);
    }
    let slow = state
        .slow_left
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if slow {
        // The gateway has taken the message (recorded above) but answers late, as an
        // overloaded one does; the caller may give up waiting first.
        let delay = state.slow_delay_ms.load(Ordering::SeqCst) as u64;
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
    }
    status
}

/// Every request received so far, as JSON: what each was and how it was answered.
async fn list(State(state): State<ReceiverState>) -> axum::Json<serde_json::Value> {
    let received = state.received.lock().map(|r| r.clone()).unwrap_or_default();
    axum::Json(serde_json::Value::Array(
        received
            .iter()
            .map(|m| {
                serde_json::json!({
                    "at_unix_ms": m.at_unix_ms,
                    "answered": m.answered,
                    "idempotency_key": m.idempotency_key,
                    "signature_valid": m.signature_valid,
                    "kind": m.field("kind"),
                    "channel": m.field("channel"),
                    "complaint_id": m.field("complaint_id"),
                    "work_order_id": m.field("work_order_id"),
                })
            })
            .collect(),
    ))
}

impl WebhookReceiver {
    /// Listens on `addr` (port 0 for any) until `cancel` fires.
    pub async fn start(
        addr: SocketAddr,
        secret: &str,
        print: bool,
        cancel: CancellationToken,
    ) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = ReceiverState {
            secret: secret.to_owned(),
            received: Arc::new(Mutex::new(Vec::new())),
            failures_left: Arc::new(AtomicUsize::new(0)),
            failure_status: Arc::new(AtomicU16::new(500)),
            down_channel: Arc::new(Mutex::new(None)),
            slow_left: Arc::new(AtomicUsize::new(0)),
            slow_delay_ms: Arc::new(AtomicUsize::new(0)),
            print,
        };
        let app = Router::new()
            .route("/hook", post(receive))
            .route("/messages", axum::routing::get(list))
            .with_state(state.clone());
        crate::serve_in_background("webhook receiver", listener, app, cancel);
        Ok(Self {
            addr,
            secret: secret.to_owned(),
            state,
        })
    }

    /// Answers the next `n` requests (successfully) only after `delay`.
    pub fn slow_next(&self, n: usize, delay: std::time::Duration) {
        self.state
            .slow_delay_ms
            .store(delay.as_millis() as usize, Ordering::SeqCst);
        self.state.slow_left.store(n, Ordering::SeqCst);
    }

    /// Accepted messages counted once per Idempotency-Key, as a gateway that honours the key
    /// shows them to customers.
    pub fn unique_messages(&self) -> Vec<ReceivedMessage> {
        let mut seen = std::collections::HashSet::new();
        self.messages()
            .into_iter()
            .filter(|m| seen.insert(m.idempotency_key.clone()))
            .collect()
    }

    /// Answers the next `n` requests with HTTP 500 (`usize::MAX`: until told otherwise).
    pub fn fail_next(&self, n: usize) {
        self.fail_next_with(n, 500);
    }

    /// Answers every request for webhook `channel` (e.g. `staff`) with HTTP 503, as a
    /// gateway that is down; `None` brings it back.
    pub fn set_down_channel(&self, channel: Option<&str>) {
        if let Ok(mut down) = self.state.down_channel.lock() {
            *down = channel.map(str::to_owned);
        }
    }

    /// Answers the next `n` requests with HTTP `status`.
    pub fn fail_next_with(&self, n: usize, status: u16) {
        self.state.failure_status.store(status, Ordering::SeqCst);
        self.state.failures_left.store(n, Ordering::SeqCst);
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Every request received so far, accepted or failed on purpose.
    pub fn attempts(&self) -> Vec<ReceivedMessage> {
        self.state.received.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// How many requests arrived so far, without copying them.
    pub fn count(&self) -> usize {
        self.state.received.lock().map(|r| r.len()).unwrap_or_default()
    }

    /// The messages the gateway accepted (answered 200).
    pub fn messages(&self) -> Vec<ReceivedMessage> {
        self.attempts()
            .into_iter()
            .filter(|m| m.answered == 200)
            .collect()
    }

    /// Accepted messages of one kind (`acknowledgement`, `closure`, ...) about one complaint.
    pub fn about(&self, complaint_id: &str, kind: &str) -> Vec<ReceivedMessage> {
        self.messages()
            .into_iter()
            .filter(|m| m.field("complaint_id") == complaint_id && m.field("kind") == kind)
            .collect()
    }
}
