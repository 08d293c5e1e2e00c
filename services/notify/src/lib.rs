//! Notify: speaks to people. To customers, on the channel they used: the first reply to every
//! complaint (an acknowledgement, or an invitation to a private channel when a public post
//! carried personal data), status updates, agents' replies, the closure message with a
//! satisfaction survey, and word of a reopening. To staff: assignment and escalation alerts.
//! Messages come from templates and go through signed channel-gateway webhooks, each
//! recorded in a delivery log so a redelivered event sends nothing twice.
//!
//! A first-response watchdog keeps the reply promise when classify lags: a complaint not
//! acknowledged within `CLOSEDLOOP_FIRST_RESPONSE_SECS` gets a generic acknowledgement, and
//! since both paths share one delivery id, never a second one.

pub mod api;
pub mod gateway;
pub mod guard;
pub mod ledger;
pub mod recent;
pub mod store;
pub mod templates;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use chrono::Utc;
use closedloop_proto::v1::notification_service_server::NotificationServiceServer;
use closedloop_proto::v1::{
    Channel, ComplaintClassified, ComplaintReceived, Delivery, IncidentOpened, NotificationDelivered,
    NotificationFailed, NotificationKind, WorkOrder, WorkOrderEvent, WorkOrderEventKind,
};
use closedloop_runtime::auth::Authenticator;
use closedloop_runtime::bus::{self, Bus, OutgoingEvent, StreamSettings};
use closedloop_runtime::config::{DatabaseArgs, ServiceArgs};
use closedloop_runtime::consumer::{self, ConsumerSpec, HandleError, MessageHandler};
use closedloop_runtime::{Secret, db, grpc, ids, metrics, time};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;

use crate::gateway::{
    Destination, GatewayTable, GuardSettings, STAFF, WebhookClient, WebhookMessage, channel_key,
    parse_rate_limits,
};
use crate::store::Claim;
use crate::templates::{TemplateKey, Templates, kind_key};

pub const CLASSIFIED_CONSUMER: &str = "notify-classified";
pub const WORK_ORDER_CONSUMER: &str = "notify-workorders";
pub const WATCHDOG_CONSUMER: &str = "notify-watchdog";
pub const INCIDENT_CONSUMER: &str = "notify-incidents";
pub const SCHEMA: &str = "notify";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "closedloop-notify",
    about = "Closedloop notify: replies to customers on their own channel"
)]
pub struct Config {
    /// gRPC listen address.
    #[arg(long, env = "CLOSEDLOOP_NOTIFY_LISTEN", default_value = "0.0.0.0:50054")]
    pub listen: SocketAddr,
    /// Channel-gateway webhooks: `channel=url|secret` entries separated by `;`, with
    /// `default` for channels not named and `staff` for alerts to staff.
    #[arg(long, env = "CLOSEDLOOP_GATEWAYS", default_value = "")]
    pub gateways: Secret<GatewayTable>,
    /// Seconds to wait for a gateway to answer.
    #[arg(long, env = "CLOSEDLOOP_GATEWAY_TIMEOUT_SECS", default_value_t = 5)]
    pub gateway_timeout_secs: u64,
    /// Consecutive failures after which calls to a gateway pause.
    #[arg(long, env = "CLOSEDLOOP_BREAKER_THRESHOLD", default_value_t = 5)]
    pub breaker_threshold: u32,
    /// Seconds a failing gateway is left alone before one trial call.
    #[arg(long, env = "CLOSEDLOOP_BREAKER_COOLDOWN_SECS", default_value_t = 30)]
    pub breaker_cooldown_secs: u64,
    /// Calls per second by channel, e.g. `wechat=50;weibo_post=10` (per replica).
    #[arg(long, env = "CLOSEDLOOP_CHANNEL_RATE_LIMITS", default_value = "")]
    pub channel_rate_limits: String,
    /// JSON file of templates overriding and extending the built-in ones.
    #[arg(long, env = "CLOSEDLOOP_TEMPLATES")]
    pub templates: Option<String>,
    /// Seconds after receipt when a complaint not yet acknowledged gets a generic
    /// acknowledgement (0 turns the watchdog off).
    #[arg(long, env = "CLOSEDLOOP_FIRST_RESPONSE_SECS", default_value_t = 10)]
    pub first_response_secs: u64,
    /// Milliseconds the delivery log waits after a request for others to share its
    /// transaction (0: take only what is already waiting). A few ms save CPU at moderate
    /// rates for as much latency per delivery; BENCHMARKS.md has the measured trade.
    #[arg(long, env = "CLOSEDLOOP_DELIVERY_LOG_LINGER_MS", default_value_t = 0)]
    pub delivery_log_linger_ms: u64,
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub service: ServiceArgs,
}

/// One message to send.
struct Outgoing<'a> {
    delivery: Delivery,
    destination: Destination,
    reply_to_message_id: &'a str,
    thread_id: &'a str,
    /// For customer messages about a work order: the version they tell about.
    work_order_version: Option<i64>,
    /// For a first reply: when the complaint was received, to measure first-response time.
    received_at: Option<chrono::DateTime<Utc>>,
    /// Send only if no one registered this delivery before (the watchdog's rule: whoever
    /// started the first reply owns it).
    only_if_new: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabels {
    kind: String,
    /// `delivered`, `retry` or `failed`.
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    /// `claim` (registering in the log), `send` (the gateway call), `record` (logging the
    /// outcome) or `publish` (the delivery event).
    step: &'static str,
}

struct NotifyMetrics {
    deliveries: Family<DeliveryLabels, Counter>,
    first_response_seconds: Histogram,
    step_seconds: Family<StepLabels, Histogram, fn() -> Histogram>,
}

static METRICS: std::sync::LazyLock<NotifyMetrics> = std::sync::LazyLock::new(|| {
    let found = NotifyMetrics {
        deliveries: Family::default(),
        first_response_seconds: metrics::seconds_histogram(),
        step_seconds: Family::new_with_constructor(metrics::seconds_histogram),
    };
    metrics::register(
        "deliveries",
        "Gateway calls by message kind and outcome",
        found.deliveries.clone(),
    );
    metrics::register(
        "first_response_seconds",
        "From receipt of a complaint to its first reply delivered",
        found.first_response_seconds.clone(),
    );
    metrics::register(
        "delivery_step_seconds",
        "Time a delivery spends in each step: claim, send, record, publish",
        found.step_seconds.clone(),
    );
    found
});

/// Runs `step` and records how long it took under `name`.
async fn timed<T>(name: &'static str, step: impl Future<Output = T>) -> T {
    let started = std::time::Instant::now();
    let result = step.await;
    METRICS
        .step_seconds
        .get_or_create(&StepLabels { step: name })
        .observe(started.elapsed().as_secs_f64());
    result
}

fn count_delivery(kind: &str, outcome: &'static str) {
    METRICS
        .deliveries
        .get_or_create(&DeliveryLabels {
            kind: kind.to_owned(),
            outcome,
        })
        .inc();
}

/// Renders, delivers and logs messages. Shared by every consumer.
struct Courier {
    /// The delivery log, written in batches.
    ledger: ledger::Ledger,
    bus: Bus,
    webhooks: WebhookClient,
    templates: Templates,
    max_deliver: i64,
    /// First replies known to be in the log, for the watchdog.
    first_replies: recent::RecentIds,
}

/// First replies [`recent::RecentIds`] holds per generation: more than a first-response
/// deadline's worth at thousands of complaints a second, for about 2 MiB.
const FIRST_REPLIES_REMEMBERED: usize = 65_536;

fn db_error(error: store::StoreError) -> HandleError {
    HandleError::retry(error)
}

impl Courier {
    fn render(&self, key: &TemplateKey<'_>, values: &[(&str, &str)]) -> Result<String, HandleError> {
        // A broken template is a configuration fault, not something a retry fixes.
        self.templates
            .render(key, values)
            .map_err(|e| HandleError::reject(e.to_string()))
    }

    /// Sends `out` unless the log says it was already sent, given up on, or is being sent.
    async fn deliver(&self, out: Outgoing<'_>, message: &jetstream::Message) -> Result<(), HandleError> {
        let delivery = out.delivery;
        match timed("claim", self.ledger.claim(delivery.clone(), out.only_if_new))
            .await
            .map_err(db_error)?
        {
            Claim::NotOurs => {
                tracing::debug!(delivery_id = %delivery.delivery_id, "already started elsewhere; not ours to send");
                return Ok(());
            }
            Claim::Done(logged) => {
                tracing::info!(delivery_id = %delivery.delivery_id, "already handled; nothing sent");
                // Its outcome was logged, but the event telling of it may not have gone out (a
                // crash or a failed publish in between). Publish it again: under the same id,
                // the stream drops it if it did.
                if let Some(event) = outcome_event(*logged) {
                    self.bus.publish(event).await.map_err(HandleError::retry)?;
                }
                return Ok(());
            }
            Claim::Busy => {
                return Err(HandleError::RetryAfter(
                    Duration::from_secs(1),
                    anyhow::anyhow!(
                        "delivery {} is being sent by another worker",
                        delivery.delivery_id
                    ),
                ));
            }
            Claim::Mine => {}
        }
        let kind = kind_key(delivery.kind());
        let channel = match out.destination {
            Destination::Customer(channel) => channel_key(channel),
            Destination::Staff => STAFF,
        };
        let webhook = WebhookMessage {
            delivery_id: &delivery.delivery_id,
            tenant: &delivery.tenant,
            kind,
            channel,
            recipient: &delivery.recipient,
            reply_to_message_id: out.reply_to_message_id,
            thread_id: out.thread_id,
            complaint_id: &delivery.complaint_id,
            work_order_id: &delivery.work_order_id,
            text: &delivery.body,
        };
        match timed("send", self.webhooks.send(out.destination, &webhook)).await {
            Ok(()) => {
                let progress = out
                    .work_order_version
                    .map(|version| (delivery.work_order_id.as_str(), version));
                let logged = timed(
                    "record",
                    self.ledger
                        .record(&delivery.delivery_id, DeliveryState::Delivered, "", progress),
                )
                .await
                .map_err(db_error)?;
                tracing::info!(delivery_id = %delivery.delivery_id, %kind, %channel, "delivered");
                count_delivery(kind, "delivered");
                if let Some(received) = out.received_at {
                    let waited = (Utc::now() - received).to_std().unwrap_or_default();
                    METRICS.first_response_seconds.observe(waited.as_secs_f64());
                }
                if let Some(event) = outcome_event(logged) {
                    timed("publish", self.bus.publish(event))
                        .await
                        .map_err(HandleError::retry)?;
                }
                Ok(())
            }
            Err(error) => {
                let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
                let last_try = delivered >= self.max_deliver;
                let state = if last_try {
                    DeliveryState::Failed
                } else {
                    DeliveryState::Pending
                };
                let reason = error.to_string();
                let logged = timed(
                    "record",
                    self.ledger.record(&delivery.delivery_id, state, &reason, None),
                )
                .await
                .map_err(db_error)?;
                count_delivery(kind, if last_try { "failed" } else { "retry" });
                if !last_try {
                    return Err(match error.retry_after() {
                        Some(wait) => HandleError::RetryAfter(wait, error.into()),
                        None => HandleError::retry(error),
                    });
                }
                if let Some(event) = outcome_event(logged) {
                    self.bus.publish(event).await.map_err(HandleError::retry)?;
                }
                Err(HandleError::reject(format!(
                    "delivery {} gave up: {reason}",
                    delivery.delivery_id
                )))
            }
        }
    }
}

use closedloop_proto::v1::DeliveryState;

/// The event that tells of a logged delivery's outcome: `notification.delivered` or
/// `notification.failed` (with the last error as the reason); none while it is pending. Its id
/// is fixed per delivery, so telling again is a duplicate the stream drops.
fn outcome_event(logged: Delivery) -> Option<OutgoingEvent> {
    match logged.state() {
        DeliveryState::Delivered => {
            let (tenant, id) = (logged.tenant.clone(), format!("delivered:{}", logged.delivery_id));
            let message = NotificationDelivered {
                delivery: Some(logged),
            };
            Some(OutgoingEvent::new(
                bus::NOTIFICATION_DELIVERED,
                &tenant,
                id,
                &message,
            ))
        }
        DeliveryState::Failed => {
            let (tenant, id) = (logged.tenant.clone(), format!("failed:{}", logged.delivery_id));
            let message = NotificationFailed {
                reason: logged.last_error.clone(),
                delivery: Some(logged),
            };
            Some(OutgoingEvent::new(
                bus::NOTIFICATION_FAILED,
                &tenant,
                id,
                &message,
            ))
        }
        DeliveryState::Pending | DeliveryState::Unspecified => None,
    }
}

/// Short reference the customer can quote: the first 8 characters of the complaint id.
fn reference(complaint_id: &str) -> &str {
    complaint_id.get(..8).unwrap_or(complaint_id)
}

/// The first reply to a complaint, whichever path sends it: one id per complaint.
fn first_reply_id(tenant: &str, complaint_id: &str) -> uuid::Uuid {
    ids::derive("delivery", &["first-reply", tenant, complaint_id])
}

fn poster_id(poster: Option<&closedloop_proto::v1::Poster>) -> String {
    poster.map(|p| p.poster_id.clone()).unwrap_or_default()
}

/// Acknowledges each classified complaint (or invites the customer to a private channel).
struct ClassifiedHandler(Arc<Courier>);

impl MessageHandler for ClassifiedHandler {
    async fn handle(&self, message: &jetstream::Message) -> Result<(), HandleError> {
        let event: ComplaintClassified = consumer::decode(message)?;
        let (Some(complaint), Some(classification)) = (event.complaint, event.classification) else {
            return Err(HandleError::reject(
                "complaint.classified without complaint or classification",
            ));
        };
        let kind = if classification.needs_private_channel {
            NotificationKind::PrivateChannelInvitation
        } else {
            NotificationKind::Acknowledgement
        };
        let key = TemplateKey {
            tenant: &complaint.tenant,
            kind,
            channel: complaint.channel(),
            category: &classification.category,
            locale: &complaint.locale,
        };
        let body = self
            .0
            .render(&key, &[("reference", reference(&complaint.complaint_id))])?;
        let first_reply = first_reply_id(&complaint.tenant, &complaint.complaint_id);
        let delivery = Delivery {
            delivery_id: first_reply.to_string(),
            tenant: complaint.tenant.clone(),
            kind: kind as i32,
            channel: complaint.channel,
            recipient: poster_id(complaint.poster.as_ref()),
            complaint_id: complaint.complaint_id.clone(),
            body,
            ..Default::default()
        };
        let out = Outgoing {
            delivery,
            destination: Destination::Customer(complaint.channel()),
            reply_to_message_id: &complaint.channel_message_id,
            thread_id: &complaint.thread_id,
            work_order_version: None,
            received_at: complaint.received_at.as_ref().and_then(time::from_timestamp),
            only_if_new: false,
        };
        self.0.deliver(out, message).await?;
        // Delivered now or handled before: either way the log holds it.
        self.0.first_replies.remember(first_reply);
        Ok(())
    }
}

/// The first-response watchdog: sees each received complaint at its deadline (its consumer
/// reads that far behind) and acknowledges it unless the classified path did. One seen
/// early, by a clock that disagrees, goes back to JetStream until due.
struct WatchdogHandler {
    courier: Arc<Courier>,
    deadline: Duration,
}

impl MessageHandler for WatchdogHandler {
    async fn handle(&self, message: &jetstream::Message) -> Result<(), HandleError> {
        let event: ComplaintReceived = consumer::decode(message)?;
        let complaint = event
            .complaint
            .ok_or_else(|| HandleError::reject("complaint.received without a complaint"))?;
        let first_reply = first_reply_id(&complaint.tenant, &complaint.complaint_id);
        if self.courier.first_replies.contains(&first_reply) {
            tracing::debug!(complaint_id = %complaint.complaint_id, "first reply already in the log");
            return Ok(());
        }
        let received = complaint
            .received_at
            .as_ref()
            .and_then(time::from_timestamp)
            .unwrap_or_else(Utc::now);
        let due = received + chrono::Duration::from_std(self.deadline).unwrap_or_default();
        if let Ok(wait) = (due - Utc::now()).to_std()
            && !wait.is_zero()
        {
            return Err(HandleError::RetryAfter(
                wait,
                anyhow::anyhow!("first-response deadline not reached"),
            ));
        }
        let key = TemplateKey {
            tenant: &complaint.tenant,
            kind: NotificationKind::Acknowledgement,
            channel: complaint.channel(),
            category: "*",
            locale: &complaint.locale,
        };
        let body = self
            .courier
            .render(&key, &[("reference", reference(&complaint.complaint_id))])?;
        let delivery = Delivery {
            delivery_id: first_reply.to_string(),
            tenant: complaint.tenant.clone(),
            kind: NotificationKind::Acknowledgement as i32,
            channel: complaint.channel,
            recipient: poster_id(complaint.poster.as_ref()),
            complaint_id: complaint.complaint_id.clone(),
            body,
            ..Default::default()
        };
        let out = Outgoing {
            delivery,
            destination: Destination::Customer(complaint.channel()),
            reply_to_message_id: &complaint.channel_message_id,
            thread_id: &complaint.thread_id,
            work_order_version: None,
            received_at: Some(received),
            only_if_new: true,
        };
        self.courier.deliver(out, message).await
    }
}

/// Customer messages and staff alerts for work-order changes.
struct WorkOrderHandler(Arc<Courier>);

/// The work-order events someone is told about; notify's consumer asks JetStream for these
/// alone. A kind [`WorkOrderHandler`] learns to act on must be added here: the others, such
/// as `created` (one per complaint, answered by the first reply instead), are not worth a
/// delivery each.
const TOLD_WORK_ORDER_EVENTS: [WorkOrderEventKind; 9] = [
    WorkOrderEventKind::Assigned,
    WorkOrderEventKind::Reassigned,
    WorkOrderEventKind::Accepted,
    WorkOrderEventKind::Replied,
    WorkOrderEventKind::Resolved,
    WorkOrderEventKind::Reopened,
    WorkOrderEventKind::Escalated,
    WorkOrderEventKind::SlaAtRisk,
    WorkOrderEventKind::SlaBreached,
];

/// Subject filters for [`TOLD_WORK_ORDER_EVENTS`], every tenant.
fn told_work_order_subjects() -> Vec<String> {
    TOLD_WORK_ORDER_EVENTS
        .iter()
        .map(|kind| bus::work_order_event_topic(*kind).all_tenants())
        .collect()
}

impl WorkOrderHandler {
    /// A message to the customer about `work_order` at its current version.
    async fn tell_customer(
        &self,
        message: &jetstream::Message,
        work_order: &WorkOrder,
        kind: NotificationKind,
        values: &[(&str, &str)],
    ) -> Result<(), HandleError> {
        let channel = work_order.channel();
        let key = TemplateKey {
            tenant: &work_order.tenant,
            kind,
            channel,
            category: &work_order.category,
            locale: &work_order.locale,
        };
        let mut values = values.to_vec();
        values.push(("reference", reference(&work_order.complaint_id)));
        let body = self.0.render(&key, &values)?;
        let version = work_order.version.to_string();
        let delivery = Delivery {
            delivery_id: ids::derive("delivery", &[kind_key(kind), &work_order.work_order_id, &version])
                .to_string(),
            tenant: work_order.tenant.clone(),
            kind: kind as i32,
            channel: work_order.channel,
            recipient: poster_id(work_order.poster.as_ref()),
            complaint_id: work_order.complaint_id.clone(),
            work_order_id: work_order.work_order_id.clone(),
            body,
            ..Default::default()
        };
        let out = Outgoing {
            delivery,
            destination: Destination::Customer(channel),
            reply_to_message_id: &work_order.channel_message_id,
            thread_id: &work_order.thread_id,
            work_order_version: Some(work_order.version),
            received_at: None,
            only_if_new: false,
        };
        self.0.deliver(out, message).await
    }

    /// A status update, unless the customer already heard of a newer version.
    async fn status_update(
        &self,
        message: &jetstream::Message,
        work_order: &WorkOrder,
        status: &str,
    ) -> Result<(), HandleError> {
        let told = self
            .0
            .ledger
            .customer_progress(&work_order.work_order_id)
            .await
            .map_err(db_error)?;
        if told >= work_order.version {
            tracing::info!(work_order_id = %work_order.work_order_id, version = work_order.version, told, "stale status update not sent");
            return Ok(());
        }
        self.tell_customer(
            message,
            work_order,
            NotificationKind::StatusUpdate,
            &[("status", status)],
        )
        .await
    }

    async fn alert_about(
        &self,
        message: &jetstream::Message,
        work_order: &WorkOrder,
        event: &str,
        detail: &str,
    ) -> Result<(), HandleError> {
        let alert = StaffAlert {
            tenant: &work_order.tenant,
            event,
            subject_id: &work_order.work_order_id,
            version: work_order.version,
            values: [
                ("work_order", work_order.work_order_id.as_str()),
                ("priority", work_order.priority().label()),
                ("category", work_order.category.as_str()),
                ("team", work_order.team.as_str()),
                ("assignee", work_order.assignee.as_str()),
                ("region", ""),
                ("detail", detail),
            ],
            recipient: if work_order.assignee.is_empty() {
                &work_order.team
            } else {
                &work_order.assignee
            },
            complaint_id: &work_order.complaint_id,
        };
        self.0.alert_staff(message, alert).await
    }
}

/// An alert for staff: what happened and about what.
struct StaffAlert<'a> {
    tenant: &'a str,
    /// `assigned`, `escalated`, `sla_at_risk`, `sla_breached`, `incident`.
    event: &'a str,
    /// The work order or incident it is about; with `version`, makes the delivery id.
    subject_id: &'a str,
    version: i64,
    /// Template variables besides `event`.
    values: [(&'a str, &'a str); 7],
    recipient: &'a str,
    complaint_id: &'a str,
}

impl Courier {
    /// Sends an alert to the staff webhook, if one is configured.
    async fn alert_staff(
        &self,
        message: &jetstream::Message,
        alert: StaffAlert<'_>,
    ) -> Result<(), HandleError> {
        if !self.webhooks.has_staff_gateway() {
            tracing::debug!(event = alert.event, "no staff gateway configured; alert not sent");
            return Ok(());
        }
        let key = TemplateKey {
            tenant: alert.tenant,
            kind: NotificationKind::StaffAlert,
            channel: Channel::Unspecified,
            category: "*",
            locale: "zh",
        };
        let mut values = alert.values.to_vec();
        values.push(("event", alert.event));
        let body = self.render(&key, &values)?;
        let version = alert.version.to_string();
        let delivery = Delivery {
            delivery_id: ids::derive("delivery", &["staff", alert.event, alert.subject_id, &version])
                .to_string(),
            tenant: alert.tenant.to_owned(),
            kind: NotificationKind::StaffAlert as i32,
            recipient: alert.recipient.to_owned(),
            complaint_id: alert.complaint_id.to_owned(),
            work_order_id: if alert.event == "incident" {
                String::new()
            } else {
                alert.subject_id.to_owned()
            },
            body,
            ..Default::default()
        };
        let out = Outgoing {
            delivery,
            destination: Destination::Staff,
            reply_to_message_id: "",
            thread_id: "",
            work_order_version: None,
            received_at: None,
            only_if_new: false,
        };
        self.deliver(out, message).await
    }
}

/// Alerts staff to an incident (a spike of one category in one region).
struct IncidentHandler(Arc<Courier>);

impl MessageHandler for IncidentHandler {
    async fn handle(&self, message: &jetstream::Message) -> Result<(), HandleError> {
        let incident: IncidentOpened = consumer::decode(message)?;
        let count = incident.complaint_count.to_string();
        let alert = StaffAlert {
            tenant: &incident.tenant,
            event: "incident",
            subject_id: &incident.incident_id,
            version: 1,
            values: [
                ("work_order", ""),
                ("priority", "P1"),
                ("category", incident.category.as_str()),
                ("team", ""),
                ("assignee", ""),
                ("region", incident.region.as_str()),
                ("detail", incident.summary.as_str()),
            ],
            recipient: "supervisors",
            complaint_id: "",
        };
        tracing::info!(incident_id = %incident.incident_id, %count, "incident alert");
        self.0.alert_staff(message, alert).await
    }
}

impl MessageHandler for WorkOrderHandler {
    async fn handle(&self, message: &jetstream::Message) -> Result<(), HandleError> {
        let event: WorkOrderEvent = consumer::decode(message)?;
        let work_order = event
            .work_order
            .as_ref()
            .ok_or_else(|| HandleError::reject("workorder event without a work order"))?;
        match event.kind() {
            WorkOrderEventKind::Assigned | WorkOrderEventKind::Reassigned => {
                self.alert_about(message, work_order, "assigned", &event.note)
                    .await?;
                self.status_update(message, work_order, "assigned").await
            }
            WorkOrderEventKind::Accepted => self.status_update(message, work_order, "in_progress").await,
            WorkOrderEventKind::Replied => {
                self.tell_customer(
                    message,
                    work_order,
                    NotificationKind::AgentReply,
                    &[("reply", &event.note)],
                )
                .await
            }
            WorkOrderEventKind::Resolved => {
                // The agent's note only on private channels: it may name the customer's case.
                let note = if closedloop_runtime::pii::is_public_channel(work_order.channel()) {
                    ""
                } else {
                    work_order.resolution_note.as_str()
                };
                self.tell_customer(message, work_order, NotificationKind::Closure, &[("note", note)])
                    .await?;
                self.tell_customer(message, work_order, NotificationKind::SatisfactionSurvey, &[])
                    .await
            }
            WorkOrderEventKind::Reopened => {
                self.tell_customer(message, work_order, NotificationKind::Reopened, &[])
                    .await
            }
            WorkOrderEventKind::Escalated => {
                self.alert_about(message, work_order, "escalated", &event.note)
                    .await
            }
            WorkOrderEventKind::SlaAtRisk => {
                self.alert_about(message, work_order, "sla_at_risk", &event.note)
                    .await
            }
            WorkOrderEventKind::SlaBreached => {
                self.alert_about(message, work_order, "sla_breached", &event.note)
                    .await
            }
            _ => Ok(()),
        }
    }
}

/// A built notify service: connected, migrated, listener bound.
pub struct Notify {
    listener: TcpListener,
    metrics: metrics::Exporter,
    bus: Bus,
    pool: PgPool,
    webhooks: WebhookClient,
    templates: Templates,
    config: Config,
}

impl Notify {
    pub async fn build(config: Config, cancel: &CancellationToken) -> anyhow::Result<Self> {
        if config.gateways.expose().is_empty() {
            tracing::warn!("no channel gateways configured (CLOSEDLOOP_GATEWAYS); every delivery will fail");
        }
        let templates = Templates::load(config.templates.as_deref())?;
        let settings = GuardSettings {
            timeout: Duration::from_secs(config.gateway_timeout_secs.max(1)),
            breaker_threshold: config.breaker_threshold,
            breaker_cooldown: Duration::from_secs(config.breaker_cooldown_secs),
            rate_limits: parse_rate_limits(&config.channel_rate_limits).map_err(anyhow::Error::msg)?,
        };
        let webhooks = WebhookClient::new(config.gateways.expose().clone(), &settings)?;
        let pool = db::connect(&config.database, SCHEMA, &MIGRATOR, cancel).await?;
        let bus = Bus::connect(&config.service.nats.nats_url, "notify", cancel).await?;
        bus.provision(&StreamSettings::from(&config.service.nats)).await?;
        let listener = grpc::bind(config.listen).await?;
        let metrics = metrics::Exporter::bind(config.service.metrics_listen).await?;
        Ok(Self {
            listener,
            metrics,
            bus,
            pool,
            webhooks,
            templates,
            config,
        })
    }

    pub fn grpc_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Where `/metrics` is served.
    pub fn metrics_addr(&self) -> std::io::Result<SocketAddr> {
        self.metrics.addr()
    }

    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let nats = &self.config.service.nats;
        // Longer than a gateway call can take.
        let lease = Duration::from_secs(self.config.gateway_timeout_secs.max(1) * 2 + 5);
        let linger = Duration::from_millis(self.config.delivery_log_linger_ms);
        let (ledger, ledger_task) = ledger::Ledger::spawn(self.pool.clone(), lease, linger);
        let courier = Arc::new(Courier {
            ledger,
            bus: self.bus.clone(),
            webhooks: self.webhooks,
            templates: self.templates,
            max_deliver: nats.max_deliver.max(1),
            first_replies: recent::RecentIds::new(FIRST_REPLIES_REMEMBERED),
        });
        let spec = |stream, durable, filter: String| ConsumerSpec::new(stream, durable, vec![filter], nats);
        let mut consumers = vec![
            consumer::spawn(
                &self.bus,
                spec(
                    bus::COMPLAINTS_STREAM,
                    CLASSIFIED_CONSUMER,
                    bus::COMPLAINT_CLASSIFIED.all_tenants(),
                ),
                ClassifiedHandler(courier.clone()),
                &cancel,
            ),
            consumer::spawn(
                &self.bus,
                ConsumerSpec::new(
                    bus::WORK_ORDERS_STREAM,
                    WORK_ORDER_CONSUMER,
                    told_work_order_subjects(),
                    nats,
                ),
                WorkOrderHandler(courier.clone()),
                &cancel,
            ),
            consumer::spawn(
                &self.bus,
                spec(
                    bus::INCIDENTS_STREAM,
                    INCIDENT_CONSUMER,
                    bus::INCIDENT_OPENED.all_tenants(),
                ),
                IncidentHandler(courier.clone()),
                &cancel,
            ),
        ];
        if self.config.first_response_secs > 0 {
            let mut watchdog = spec(
                bus::COMPLAINTS_STREAM,
                WATCHDOG_CONSUMER,
                bus::COMPLAINT_RECEIVED.all_tenants(),
            );
            let deadline = Duration::from_secs(self.config.first_response_secs);
            // The consumer reads complaints `deadline` behind, so each reaches the watchdog
            // once, when due, rather than at once and again after being put back. Held
            // messages are unacked, so ack_wait grows by the hold. The extra delivery is for
            // a clock behind ingest's, where the handler finds a complaint early and waits.
            watchdog.hold = deadline;
            watchdog.ack_wait += deadline;
            watchdog.max_deliver += 1;
            consumers.push(consumer::spawn(
                &self.bus,
                watchdog,
                WatchdogHandler {
                    courier: courier.clone(),
                    deadline,
                },
                &cancel,
            ));
        }
        let server = NotificationServiceServer::new(api::NotificationApi {
            pool: self.pool.clone(),
        })
        .max_decoding_message_size(self.config.service.grpc.max_request_bytes);
        let routes = Routes::new(InterceptedService::new(
            server,
            Authenticator::new(self.config.service.grpc.auth_tokens.clone()),
        ));
        let exporting = self.metrics.spawn(cancel.clone());
        let served = grpc::serve(self.listener, routes, &[api::SERVICE_NAME], cancel.clone()).await;
        cancel.cancel();
        for consuming in consumers {
            consuming.await?;
        }
        // The handlers are gone; with the last courier the delivery log's task finishes what
        // it holds and ends.
        drop(courier);
        ledger_task.await?;
        exporting.await??;
        self.pool.close().await;
        served?;
        Ok(())
    }
}
