//! The event bus: JetStream streams, subjects and publishing.
//!
//! Subjects are `closedloop.<entity>.<event>.<tenant>`. Every event carries `Nats-Msg-Id`
//! (deterministic, so a re-publish after a crash is dropped by the stream), CloudEvents
//! binary-mode headers, `content-type: application/protobuf` and W3C `traceparent`.
//! A publish returns only after JetStream's PubAck; batches pipeline their acks.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderName;
use async_nats::jetstream::{self, message::PublishMessage, publish::PublishAck, stream};
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use closedloop_proto::v1::WorkOrderEventKind;
use tokio_util::sync::CancellationToken;

use crate::config::{NatsArgs, NatsConnectArgs, redact_urls, url_credentials};

/// One kind of event: where it is published and what CloudEvents type it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topic {
    pub entity: &'static str,
    pub event: &'static str,
}

impl Topic {
    pub const fn new(entity: &'static str, event: &'static str) -> Self {
        Self { entity, event }
    }
    /// The subject for one tenant.
    pub fn subject(&self, tenant: &str) -> String {
        format!("closedloop.{}.{}.{}", self.entity, self.event, tenant)
    }
    /// A filter matching this event for every tenant.
    pub fn all_tenants(&self) -> String {
        format!("closedloop.{}.{}.*", self.entity, self.event)
    }
    /// The CloudEvents `ce-type`.
    pub fn cloudevents_type(&self) -> String {
        format!("closedloop.{}.{}.v1", self.entity, self.event)
    }
}

pub const COMPLAINT_RECEIVED: Topic = Topic::new("complaint", "received");
pub const COMPLAINT_CLASSIFIED: Topic = Topic::new("complaint", "classified");
pub const NOTIFICATION_DELIVERED: Topic = Topic::new("notification", "delivered");
pub const NOTIFICATION_FAILED: Topic = Topic::new("notification", "failed");
pub const FEEDBACK_RECEIVED: Topic = Topic::new("feedback", "received");
pub const INCIDENT_OPENED: Topic = Topic::new("incident", "opened");

/// Work-order events: `event` is the lower-case kind (`created`, `resolved`, ...).
pub const fn work_order_topic(event: &'static str) -> Topic {
    Topic::new("workorder", event)
}

/// Where work-order events of `kind` are published.
pub fn work_order_event_topic(kind: WorkOrderEventKind) -> Topic {
    work_order_topic(work_order_event_name(kind))
}

/// The lower-case event name used in subjects (`closedloop.workorder.<name>.<tenant>`).
pub fn work_order_event_name(kind: WorkOrderEventKind) -> &'static str {
    match kind {
        WorkOrderEventKind::Unspecified => "unspecified",
        WorkOrderEventKind::Created => "created",
        WorkOrderEventKind::Assigned => "assigned",
        WorkOrderEventKind::Accepted => "accepted",
        WorkOrderEventKind::Replied => "replied",
        WorkOrderEventKind::Resolved => "resolved",
        WorkOrderEventKind::Closed => "closed",
        WorkOrderEventKind::Reopened => "reopened",
        WorkOrderEventKind::Escalated => "escalated",
        WorkOrderEventKind::Reassigned => "reassigned",
        WorkOrderEventKind::Merged => "merged",
        WorkOrderEventKind::SlaAtRisk => "sla_at_risk",
        WorkOrderEventKind::SlaBreached => "sla_breached",
        WorkOrderEventKind::Feedback => "feedback",
        WorkOrderEventKind::IncidentLinked => "incident_linked",
        WorkOrderEventKind::Reclassified => "reclassified",
    }
}

/// The event kind for a name written by [`work_order_event_name`] (dispatch's history
/// keeps names).
pub fn work_order_event_kind(name: &str) -> WorkOrderEventKind {
    (0..=20)
        .filter_map(|n| WorkOrderEventKind::try_from(n).ok())
        .find(|kind| work_order_event_name(*kind) == name)
        .unwrap_or(WorkOrderEventKind::Unspecified)
}

/// The streams Closedloop provisions, each owning one entity's subjects.
pub const STREAMS: [(&str, &str); 6] = [
    (COMPLAINTS_STREAM, "closedloop.complaint.>"),
    (WORK_ORDERS_STREAM, "closedloop.workorder.>"),
    (NOTIFICATIONS_STREAM, "closedloop.notification.>"),
    (FEEDBACK_STREAM, "closedloop.feedback.>"),
    (INCIDENTS_STREAM, "closedloop.incident.>"),
    (DEAD_LETTER_STREAM, "closedloop.deadletter.>"),
];
pub const COMPLAINTS_STREAM: &str = "CLOSEDLOOP_COMPLAINTS";
pub const WORK_ORDERS_STREAM: &str = "CLOSEDLOOP_WORKORDERS";
pub const NOTIFICATIONS_STREAM: &str = "CLOSEDLOOP_NOTIFICATIONS";
pub const FEEDBACK_STREAM: &str = "CLOSEDLOOP_FEEDBACK";
pub const INCIDENTS_STREAM: &str = "CLOSEDLOOP_INCIDENTS";
pub const DEAD_LETTER_STREAM: &str = "CLOSEDLOOP_DEADLETTER";

/// Headers of a dead-lettered event.
pub mod dead_letter_headers {
    pub const REASON: &str = "Closedloop-Dead-Letter-Reason";
    pub const SUBJECT: &str = "Closedloop-Original-Subject";
    pub const STREAM_SEQUENCE: &str = "Closedloop-Original-Sequence";
    pub const CONSUMER: &str = "Closedloop-Consumer";
    pub const DELIVERIES: &str = "Closedloop-Deliveries";
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("cannot read the NATS credentials file {path}: {source}")]
    Credentials {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot provision stream {stream}: {source}")]
    Provision {
        stream: String,
        #[source]
        source: jetstream::context::CreateStreamError,
    },
    #[error("publish to JetStream failed: {0}")]
    Publish(#[from] jetstream::context::PublishError),
}

impl BusError {
    /// True when JetStream answered but refused to store (a stream at its limits), as
    /// opposed to being unreachable or slow.
    pub fn is_refused(&self) -> bool {
        match self {
            BusError::Publish(error) => {
                error.kind() == jetstream::context::PublishErrorKind::Other
                    && std::error::Error::source(error)
                        .is_some_and(|source| source.downcast_ref::<jetstream::Error>().is_some())
            }
            _ => false,
        }
    }
}

/// Most characters of a reason kept in a header.
const MAX_REASON_CHARS: usize = 1_000;

/// `text` fit for a header value: control characters (CR and LF would break the header
/// block, and async-nats refuses them) become spaces, and it is cut to a sane length. A
/// reason may quote a gateway's answer, which anyone could have written.
pub fn header_safe(text: &str) -> String {
    text.chars()
        .take(MAX_REASON_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// An event ready to publish.
#[derive(Debug, Clone)]
pub struct OutgoingEvent {
    pub subject: String,
    /// `Nats-Msg-Id` and `ce-id`: deterministic per event.
    pub id: String,
    /// CloudEvents `ce-type`.
    pub event_type: String,
    /// Encoded protobuf message.
    pub payload: Bytes,
    /// When the event happened (`ce-time`).
    pub time: DateTime<Utc>,
    /// Trace context captured when the event was decided (e.g. stored with its history or
    /// outbox row); `None` takes the current span's.
    pub trace_headers: Option<HashMap<String, String>>,
}

impl OutgoingEvent {
    pub fn new(topic: Topic, tenant: &str, id: impl Into<String>, message: &impl prost::Message) -> Self {
        Self {
            subject: topic.subject(tenant),
            id: id.into(),
            event_type: topic.cloudevents_type(),
            payload: Bytes::from(message.encode_to_vec()),
            time: Utc::now(),
            trace_headers: None,
        }
    }
}

/// Stream settings from configuration.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    pub max_age: Duration,
    /// Bytes a stream may hold; -1 for no limit. A full stream refuses new events.
    pub max_bytes: i64,
    pub duplicate_window: Duration,
    pub replicas: usize,
}

impl From<&NatsArgs> for StreamSettings {
    fn from(args: &NatsArgs) -> Self {
        Self {
            max_age: Duration::from_secs(args.stream_max_age_hours * 3600),
            max_bytes: args.stream_max_bytes,
            duplicate_window: Duration::from_secs(args.duplicate_window_secs),
            replicas: args.stream_replicas,
        }
    }
}

/// A connection to NATS with its JetStream context. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Bus {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    /// CloudEvents `ce-source` of everything this service publishes.
    source: String,
    /// The streams (and key-value buckets' streams) this service writes to, which
    /// [`Bus::ready`] asks for: on a cluster, a stream may lose its leader while the account
    /// still answers, and writes to it fail until it has one again.
    written: Arc<std::sync::RwLock<Vec<String>>>,
}

/// How long a JetStream management request is retried at start: a cluster that is starting
/// answers "temporarily unavailable", or nothing, until it has elected its leaders (seconds).
pub const FORMING_FOR: Duration = Duration::from_secs(60);

/// Runs a JetStream management request (creating a stream or a bucket) until it succeeds,
/// retrying with backoff for up to [`FORMING_FOR`]; then returns the last error. A request
/// refused for good (bad settings, no permission) fails the same way after the wait, which
/// only happens at start.
pub async fn until_jetstream_forms<T, E, F, Fut>(what: &str, mut request: F) -> Result<T, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let started = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        match request().await {
            Ok(value) => return Ok(value),
            Err(error) if started.elapsed() + delay < FORMING_FOR => {
                tracing::warn!(%error, "{what} failed; retrying while JetStream forms");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(error) => return Err(error),
        }
    }
}

/// Creates a key-value bucket, or updates it to these settings: one value per key, on file,
/// with the streams' replicas; retried while JetStream forms ([`until_jetstream_forms`]).
pub async fn open_bucket(
    jetstream: &jetstream::Context,
    bucket: &str,
    description: &str,
    max_age: Duration,
    settings: &StreamSettings,
) -> Result<jetstream::kv::Store, jetstream::context::CreateKeyValueError> {
    let config = jetstream::kv::Config {
        bucket: bucket.to_owned(),
        description: description.to_owned(),
        history: 1,
        max_age,
        storage: stream::StorageType::File,
        num_replicas: settings.replicas,
        ..Default::default()
    };
    let what = format!("creating bucket {bucket}");
    until_jetstream_forms(&what, || jetstream.create_or_update_key_value(config.clone())).await
}

/// Whether a stream's info request failed because the stream cannot answer now (no reply,
/// or JetStream's 503 while its leader is elected), rather than because of the stream
/// itself: one that does not exist is not an outage that passes by itself, so the event's
/// own retry budget applies and the service goes on with other events.
fn stream_unavailable(kind: &jetstream::context::GetStreamErrorKind) -> bool {
    use jetstream::context::GetStreamErrorKind;
    match kind {
        GetStreamErrorKind::Request => true,
        GetStreamErrorKind::JetStream(error) => error.code() == 503,
        GetStreamErrorKind::EmptyName | GetStreamErrorKind::InvalidStreamName => false,
    }
}

/// The servers of a comma-separated `--nats-url` list (async-nats parses one URL per
/// entry, not a list in one string).
fn server_urls(urls: &str) -> Vec<&str> {
    urls.split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .collect()
}

impl Bus {
    /// The client options `args` ask for: credentials and TLS.
    async fn options(args: &NatsConnectArgs, source: &str) -> Result<async_nats::ConnectOptions, BusError> {
        let mut options = match &args.nats_creds {
            Some(path) => async_nats::ConnectOptions::with_credentials_file(path)
                .await
                .map_err(|source| BusError::Credentials {
                    path: path.display().to_string(),
                    source,
                })?,
            None => async_nats::ConnectOptions::new(),
        };
        if let (Some(user), Some(password)) = (&args.nats_user, &args.nats_password) {
            options = options.user_and_password(user.clone(), password.expose().clone());
        } else if let Some((user, password)) = url_credentials(&args.nats_url) {
            options = options.user_and_password(user, password);
        }
        if let Some(ca) = &args.nats_tls_ca {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&args.nats_tls_cert, &args.nats_tls_key) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        Ok(options
            .require_tls(args.nats_tls_required)
            // Replies come to an inbox of this service's own, which the bus's permissions
            // let no other service read (deploy/nats-auth.conf).
            .custom_inbox_prefix(format!("_INBOX_{source}"))
            .name(source)
            .ping_interval(Duration::from_secs(args.nats_ping_secs.max(1)))
            .connection_timeout(Duration::from_secs(5)))
    }

    /// Connects to any of the servers `--nats-url` lists (a cluster's nodes), retrying with
    /// backoff until one answers or `cancel` fires.
    pub async fn connect(
        args: &NatsConnectArgs,
        source: &str,
        cancel: &CancellationToken,
    ) -> Result<Self, BusError> {
        let url = args.nats_url.as_str();
        let shown = redact_urls(url);
        let servers = server_urls(url);
        let mut delay = Duration::from_millis(100);
        let client = loop {
            let error = match Self::options(args, source)
                .await?
                .connect(servers.as_slice())
                .await
            {
                Ok(client) => break client,
                Err(error) => error,
            };
            // Credentials the server refuses stay refused: waiting helps nobody.
            if matches!(
                error.kind(),
                async_nats::ConnectErrorKind::AuthorizationViolation
                    | async_nats::ConnectErrorKind::Authentication
                    | async_nats::ConnectErrorKind::ServerParse
            ) {
                return Err(BusError::Connect {
                    url: shown,
                    source: error,
                });
            }
            tracing::warn!(url = %shown, %error, "NATS not reachable yet; retrying");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = cancel.cancelled() => {
                    return Err(BusError::Connect { url: shown, source: error });
                }
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        };
        let jetstream = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(5))
            .build(client.clone());
        Ok(Self {
            client,
            jetstream,
            source: format!("closedloop/{source}"),
            written: Arc::default(),
        })
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// Whether the connection to NATS is up right now; callers that answer users fail
    /// fast instead of waiting for an ack timeout while it is down.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Whether NATS can take this service's writes now: the connection is up, JetStream
    /// answers for the account, and every stream the service writes to answers (has a
    /// leader). The consume loop asks this after a failure, to tell an outage from a bad
    /// event.
    pub async fn ready(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.is_connected(), "not connected to NATS");
        self.jetstream.query_account().await?;
        let written = self.written.read().map(|w| w.clone()).unwrap_or_default();
        for stream in written {
            if let Err(error) = self.jetstream.get_stream(&stream).await
                && stream_unavailable(&error.kind())
            {
                anyhow::bail!("stream {stream} does not answer: {error}");
            }
        }
        Ok(())
    }

    /// Adds a stream this service writes to (a key-value bucket's is `KV_<bucket>`) to those
    /// [`Bus::ready`] asks for.
    pub fn writes_to(&self, stream: &str) {
        if let Ok(mut written) = self.written.write()
            && !written.iter().any(|known| known == stream)
        {
            written.push(stream.to_owned());
        }
    }

    /// Creates every stream, or updates them to the configured settings: for tools and
    /// tests that run without the services (which each provision their own).
    pub async fn provision(&self, settings: &StreamSettings) -> Result<(), BusError> {
        self.provision_streams(settings, &STREAMS.map(|(name, _)| name))
            .await
    }

    /// Creates the streams named in `owned`, or updates them to the configured settings.
    /// Each service calls this at start for the streams it publishes to (the bus lets a
    /// service touch no other); it is idempotent, so replicas may race.
    pub async fn provision_streams(&self, settings: &StreamSettings, owned: &[&str]) -> Result<(), BusError> {
        for (name, subjects) in STREAMS.into_iter().filter(|(name, _)| owned.contains(name)) {
            self.writes_to(name);
            let config = stream::Config {
                name: name.to_owned(),
                subjects: vec![subjects.to_owned()],
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                max_age: settings.max_age,
                duplicate_window: settings.duplicate_window,
                num_replicas: settings.replicas,
                max_bytes: settings.max_bytes,
                // A full stream refuses new events (publishers see the refusal and back off)
                // rather than silently dropping old ones nobody has handled yet.
                discard: stream::DiscardPolicy::New,
                ..Default::default()
            };
            let what = format!("provisioning stream {name}");
            until_jetstream_forms(&what, || self.jetstream.create_or_update_stream(config.clone()))
                .await
                .map_err(|source| BusError::Provision {
                    stream: name.to_owned(),
                    source,
                })?;
        }
        Ok(())
    }

    fn headers(&self, event: &OutgoingEvent) -> async_nats::HeaderMap {
        // Every event is published with these, so their names are built once, not parsed
        // and copied per event (perf put header building at a tenth of ingest's CPU).
        const MSG_ID: HeaderName = HeaderName::from_static("Nats-Msg-Id");
        const CE_SPECVERSION: HeaderName = HeaderName::from_static("ce-specversion");
        const CE_ID: HeaderName = HeaderName::from_static("ce-id");
        const CE_TYPE: HeaderName = HeaderName::from_static("ce-type");
        const CE_SOURCE: HeaderName = HeaderName::from_static("ce-source");
        const CE_TIME: HeaderName = HeaderName::from_static("ce-time");
        const CONTENT_TYPE: HeaderName = HeaderName::from_static("content-type");
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(MSG_ID, event.id.as_str());
        headers.insert(CE_SPECVERSION, "1.0");
        headers.insert(CE_ID, event.id.as_str());
        headers.insert(CE_TYPE, event.event_type.as_str());
        headers.insert(CE_SOURCE, self.source.as_str());
        headers.insert(CE_TIME, event.time.to_rfc3339_opts(SecondsFormat::Millis, true));
        headers.insert(CONTENT_TYPE, "application/protobuf");
        match &event.trace_headers {
            Some(trace) => {
                for (key, value) in trace {
                    headers.insert(key.as_str(), value.as_str());
                }
            }
            None => crate::telemetry::inject_into_nats(&mut headers),
        }
        headers
    }

    /// Publishes one event and waits for JetStream to store it.
    pub async fn publish(&self, event: OutgoingEvent) -> Result<PublishAck, BusError> {
        let headers = self.headers(&event);
        let ack = self
            .jetstream
            .send_publish(
                event.subject,
                PublishMessage::build().payload(event.payload).headers(headers),
            )
            .await?;
        Ok(ack.await?)
    }

    /// Publishes many events with pipelined acks: all are sent, then all acks awaited.
    /// Results are in input order; one failure does not stop the others.
    pub async fn publish_all(&self, events: Vec<OutgoingEvent>) -> Vec<Result<PublishAck, BusError>> {
        let mut pending = Vec::with_capacity(events.len());
        for event in events {
            let headers = self.headers(&event);
            let sent = self
                .jetstream
                .send_publish(
                    event.subject,
                    PublishMessage::build().payload(event.payload).headers(headers),
                )
                .await;
            pending.push(sent);
        }
        let mut results = Vec::with_capacity(pending.len());
        for sent in pending {
            results.push(match sent {
                Ok(ack) => ack.await.map_err(BusError::from),
                Err(error) => Err(error.into()),
            });
        }
        results
    }

    /// Parks an event that cannot be handled in the dead-letter stream, with the reason.
    pub async fn dead_letter(
        &self,
        message: &jetstream::Message,
        consumer: &str,
        reason: &str,
    ) -> Result<PublishAck, BusError> {
        use dead_letter_headers as h;
        let (sequence, deliveries) = message
            .info()
            .map(|info| (info.stream_sequence, info.delivered))
            .unwrap_or_default();
        let mut headers = message.headers.clone().unwrap_or_default();
        headers.insert(
            "Nats-Msg-Id",
            format!("deadletter-{consumer}-{sequence}").as_str(),
        );
        headers.insert(h::REASON, header_safe(reason).as_str());
        headers.insert(h::SUBJECT, message.subject.as_str());
        headers.insert(h::STREAM_SEQUENCE, sequence.to_string().as_str());
        headers.insert(h::CONSUMER, consumer);
        headers.insert(h::DELIVERIES, deliveries.to_string().as_str());
        let ack = self
            .jetstream
            .send_publish(
                format!("closedloop.deadletter.{consumer}"),
                PublishMessage::build()
                    .payload(message.payload.clone())
                    .headers(headers),
            )
            .await?;
        Ok(ack.await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn jetstream_requests_are_retried_while_the_cluster_forms() {
        let attempts = std::sync::atomic::AtomicUsize::new(0);
        let started = tokio::time::Instant::now();
        let answer = until_jetstream_forms("test", || async {
            let attempt = attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if attempt < 3 {
                Err("temporarily unavailable")
            } else {
                Ok(attempt)
            }
        })
        .await;
        assert_eq!(answer, Ok(3), "the fourth attempt succeeds");
        assert!(started.elapsed() < Duration::from_secs(2));

        let started = tokio::time::Instant::now();
        let refused: Result<(), &str> = until_jetstream_forms("test", || async { Err("refused") }).await;
        assert_eq!(refused, Err("refused"));
        assert!(
            started.elapsed() <= FORMING_FOR,
            "gives up within {FORMING_FOR:?}"
        );
        assert!(started.elapsed() >= FORMING_FOR - Duration::from_secs(2));
    }

    #[test]
    fn a_url_list_names_each_server() {
        assert_eq!(
            server_urls("nats://nats:4222, nats://nats-2:4222,,nats://nats-3:4222"),
            ["nats://nats:4222", "nats://nats-2:4222", "nats://nats-3:4222"]
        );
        assert_eq!(server_urls("nats://127.0.0.1:4222"), ["nats://127.0.0.1:4222"]);
    }

    #[test]
    fn subjects_follow_the_naming_scheme() {
        assert_eq!(
            COMPLAINT_RECEIVED.subject("acme"),
            "closedloop.complaint.received.acme"
        );
        assert_eq!(
            COMPLAINT_RECEIVED.all_tenants(),
            "closedloop.complaint.received.*"
        );
        assert_eq!(
            work_order_topic("resolved").cloudevents_type(),
            "closedloop.workorder.resolved.v1"
        );
        assert_eq!(
            work_order_event_topic(WorkOrderEventKind::SlaAtRisk).all_tenants(),
            "closedloop.workorder.sla_at_risk.*"
        );
    }

    #[test]
    fn reasons_are_made_safe_for_a_header() {
        assert_eq!(
            header_safe("gateway answered HTTP 400: bad\r\nX-Injected: 1"),
            "gateway answered HTTP 400: bad  X-Injected: 1"
        );
        assert_eq!(header_safe(&"x".repeat(5_000)).len(), MAX_REASON_CHARS);
        assert_eq!(header_safe("过期 \u{0}"), "过期  ");
    }

    #[test]
    fn work_order_event_names_map_back_to_their_kinds() {
        let mut kinds = 0;
        for kind in (0..=20).filter_map(|n| WorkOrderEventKind::try_from(n).ok()) {
            assert_eq!(work_order_event_kind(work_order_event_name(kind)), kind);
            kinds += 1;
        }
        assert_eq!(kinds, 16, "every kind the proto defines has a name");
        assert_eq!(
            work_order_event_kind("no-such-event"),
            WorkOrderEventKind::Unspecified
        );
    }
}
