//! The courier: renders a message, makes sure only one sender sends it (the claims in
//! JetStream), calls the gateway, records the outcome and publishes it as
//! `notification.delivered` or `notification.failed` (from which the delivery log is
//! written). Shared by every consumer of notify.

use std::time::Duration;

use chrono::Utc;
use closedloop_proto::v1::{
    Channel, Delivery, DeliveryState, NotificationDelivered, NotificationFailed, NotificationKind,
};
use closedloop_runtime::bus::{self, Bus, OutgoingEvent};
use closedloop_runtime::consumer::{HandleError, retry_delay, with_jitter};
use closedloop_runtime::{ids, metrics};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

use crate::claims::{Attempt, Claim, ClaimError, Claims};
use crate::gateway::{Destination, STAFF, WebhookClient, WebhookMessage};
use crate::recent::RecentIds;
use crate::templates::{TemplateKey, Templates, kind_key};

/// How long an event waits before asking again about a delivery another sender is on.
const BUSY_WAIT: Duration = Duration::from_secs(1);

/// One message to send.
pub(crate) struct Outgoing<'a> {
    pub delivery: Delivery,
    pub destination: Destination,
    pub reply_to_message_id: &'a str,
    pub thread_id: &'a str,
    /// For customer messages about a work order: the version they tell about.
    pub work_order_version: Option<i64>,
    /// For a first reply: when the complaint was received, to measure first-response time.
    pub received_at: Option<chrono::DateTime<Utc>>,
    /// When it may be sent.
    pub rule: Rule,
}

/// When a delivery may be sent, beyond "not sent yet and no one else on it".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rule {
    /// Whoever gets to it.
    Usual,
    /// Only if no one registered it before (the watchdog's rule: whoever started the first
    /// reply owns it).
    OnlyIfNew,
    /// Even if its gateway refused it for good before: an operator replayed the event.
    Again,
}

impl Rule {
    /// The rule for the deliveries of the event `message`.
    pub fn of(message: &async_nats::jetstream::Message) -> Self {
        if closedloop_runtime::dead_letters::is_replay(message.headers.as_ref()) {
            Rule::Again
        } else {
            Rule::Usual
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabels {
    kind: String,
    /// `delivered`, `retry` or `failed`.
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    /// `claim` (registering the delivery), `send` (the gateway call), `record` (keeping the
    /// outcome) or `publish` (the delivery event).
    step: &'static str,
}

struct NotifyMetrics {
    deliveries: Family<DeliveryLabels, Counter>,
    first_response_seconds: Histogram,
    step_seconds: Family<StepLabels, Histogram, fn() -> Histogram>,
}

static METRICS: std::sync::LazyLock<NotifyMetrics> = std::sync::LazyLock::new(|| NotifyMetrics {
    deliveries: metrics::register(
        "deliveries",
        "Gateway calls by message kind and outcome",
        Family::default(),
    ),
    first_response_seconds: metrics::register(
        "first_response_seconds",
        "From receipt of a complaint to its first reply delivered",
        metrics::response_seconds_histogram(),
    ),
    step_seconds: metrics::register(
        "delivery_step_seconds",
        "Time a delivery spends in each step: claim, send, record, publish",
        Family::new_with_constructor(metrics::seconds_histogram),
    ),
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

/// A failure of the claims bucket: its store is NATS, which the consume loop checks; a
/// record or id it cannot use is this event's fault.
pub(crate) fn claim_error(error: ClaimError) -> HandleError {
    match error {
        ClaimError::Store(_) => HandleError::retry(error),
        ClaimError::Corrupt { .. } | ClaimError::BadId(_) => HandleError::reject(error.to_string()),
    }
}

/// Renders, delivers and records messages.
pub(crate) struct Courier {
    pub claims: Claims,
    pub bus: Bus,
    pub webhooks: WebhookClient,
    pub templates: Templates,
    /// First redelivery delay of a failed gateway call; doubles with each attempt.
    pub retry_base: Duration,
    /// First replies known to be claimed, for the watchdog.
    pub first_replies: RecentIds,
}

/// The event that tells of a finished delivery: `notification.delivered` or
/// `notification.failed` (with the last error as the reason); none while it is pending. Its id
/// is fixed per delivery, so telling again is a duplicate the stream drops.
fn outcome_event(delivery: Delivery) -> Option<OutgoingEvent> {
    match delivery.state() {
        DeliveryState::Delivered => {
            let (tenant, id) = (
                delivery.tenant.clone(),
                format!("delivered:{}", delivery.delivery_id),
            );
            let message = NotificationDelivered {
                delivery: Some(delivery),
            };
            Some(OutgoingEvent::new(
                bus::NOTIFICATION_DELIVERED,
                &tenant,
                id,
                &message,
            ))
        }
        DeliveryState::Failed => {
            let (tenant, id) = (
                delivery.tenant.clone(),
                format!("failed:{}", delivery.delivery_id),
            );
            let message = NotificationFailed {
                reason: delivery.last_error.clone(),
                delivery: Some(delivery),
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

/// An alert for staff: what happened and about what.
pub(crate) struct StaffAlert<'a> {
    pub tenant: &'a str,
    /// `assigned`, `escalated`, `sla_at_risk`, `sla_breached`, `incident`.
    pub event: &'a str,
    /// The work order or incident it is about; with `version`, makes the delivery id.
    pub subject_id: &'a str,
    pub version: i64,
    /// Template variables besides `event`.
    pub values: [(&'a str, &'a str); 7],
    pub recipient: &'a str,
    pub complaint_id: &'a str,
    pub rule: Rule,
}

impl Courier {
    pub fn render(&self, key: &TemplateKey<'_>, values: &[(&str, &str)]) -> Result<String, HandleError> {
        // A broken template is a configuration fault, not something a retry fixes.
        self.templates
            .render(key, values)
            .map_err(|e| HandleError::reject(e.to_string()))
    }

    /// Publishes the outcome of a finished delivery, if it has one.
    async fn tell_outcome(&self, delivery: Delivery) -> Result<(), HandleError> {
        if let Some(event) = outcome_event(delivery) {
            timed("publish", self.bus.publish(event))
                .await
                .map_err(HandleError::retry)?;
        }
        Ok(())
    }

    /// Sends `out` unless it was sent or refused already, or another live sender is on it.
    pub async fn deliver(&self, out: Outgoing<'_>) -> Result<(), HandleError> {
        let delivery = out.delivery;
        let lease = match timed(
            "claim",
            self.claims.claim(
                &delivery.delivery_id,
                out.rule == Rule::OnlyIfNew,
                out.rule == Rule::Again,
            ),
        )
        .await
        .map_err(claim_error)?
        {
            Claim::NotOurs => {
                tracing::debug!(delivery_id = %delivery.delivery_id, "started elsewhere; not ours to send");
                return Ok(());
            }
            Claim::Done(record) => {
                tracing::info!(delivery_id = %delivery.delivery_id, "already handled; nothing sent");
                // Its outcome is recorded, but the event telling of it may not have gone out
                // (a crash or a failed publish in between). Publish it again: under the same
                // id, the stream drops it if it did.
                return self.tell_outcome(record.apply_to(delivery)).await;
            }
            Claim::Busy => {
                return Err(HandleError::Wait(
                    BUSY_WAIT,
                    anyhow::anyhow!(
                        "delivery {} is being sent by another sender",
                        delivery.delivery_id
                    ),
                ));
            }
            Claim::Mine(lease) => lease,
        };
        let kind = kind_key(delivery.kind());
        let channel = match out.destination {
            Destination::Customer(channel) => channel.key(),
            Destination::Staff => STAFF,
        };
        let webhook = WebhookMessage {
            delivery_id: delivery.delivery_id.as_str().into(),
            tenant: delivery.tenant.as_str().into(),
            kind: kind.into(),
            channel: channel.into(),
            recipient: delivery.recipient.as_str().into(),
            reply_to_message_id: out.reply_to_message_id.into(),
            thread_id: out.thread_id.into(),
            complaint_id: delivery.complaint_id.as_str().into(),
            work_order_id: delivery.work_order_id.as_str().into(),
            text: delivery.body.as_str().into(),
        };
        let sent = timed("send", self.webhooks.send(out.destination, &webhook)).await;
        let (attempt, word) = match &sent {
            Ok(receipt) => (Attempt::Delivered, receipt.clone()),
            Err(error) if error.is_permanent() => (Attempt::Refused, error.to_string()),
            Err(error) if !error.called_gateway() => (Attempt::NotMade, error.to_string()),
            Err(error) => (Attempt::Failed, error.to_string()),
        };
        if let (Ok(_), Some(version)) = (&sent, out.work_order_version) {
            // Before the record: once the gateway has it, the customer has been told.
            self.claims
                .advance_told(&delivery.work_order_id, version)
                .await
                .map_err(claim_error)?;
        }
        let record = timed("record", self.claims.record(lease, attempt, &word))
            .await
            .map_err(claim_error)?;
        let logged = record.apply_to(delivery);
        match sent {
            Ok(_) => {
                tracing::info!(delivery_id = %logged.delivery_id, %kind, %channel, "delivered");
                count_delivery(kind, "delivered");
                if let Some(received) = out.received_at {
                    let waited = (Utc::now() - received).to_std().unwrap_or_default();
                    METRICS.first_response_seconds.observe(waited.as_secs_f64());
                }
                self.tell_outcome(logged).await
            }
            Err(error) if attempt == Attempt::Refused => {
                tracing::warn!(delivery_id = %logged.delivery_id, %kind, %channel, %error, "refused by the gateway; not retried");
                count_delivery(kind, "failed");
                let id = logged.delivery_id.clone();
                self.tell_outcome(logged).await?;
                Err(HandleError::reject(format!("delivery {id} refused: {error}")))
            }
            Err(error) => {
                tracing::warn!(delivery_id = %logged.delivery_id, %kind, %channel, %error, attempts = logged.attempts, "delivery failed; will retry");
                count_delivery(kind, "retry");
                let wait = error
                    .retry_after()
                    .unwrap_or_else(|| with_jitter(retry_delay(self.retry_base, i64::from(logged.attempts))));
                Err(HandleError::Wait(wait, error.into()))
            }
        }
    }

    /// Sends an alert to the staff webhook, if one is configured.
    pub async fn alert_staff(&self, alert: StaffAlert<'_>) -> Result<(), HandleError> {
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
            rule: alert.rule,
        };
        self.deliver(out).await
    }
}
