//! The one code path every way in shares (gRPC, HTTP+JSON, WeChat): validate, publish with
//! an awaited PubAck, report per item. Errors are [`IngestError`], which each adapter maps
//! to its protocol in one place.

use std::time::Duration;

use chrono::Utc;
use closedloop_proto::v1::{
    Complaint, ComplaintReceived, ComplaintSubmission, FeedbackReceived, SubmissionOutcome, SubmissionResult,
    SubmitFeedbackRequest,
};
use closedloop_runtime::auth::{Principal, Role};
use closedloop_runtime::bus::{self, Bus, BusError, OutgoingEvent};
use closedloop_runtime::grpc::Violation;
use closedloop_runtime::{ids, metrics, time};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use std::sync::LazyLock;

use crate::validate::{Limits, validate_submission};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    /// `accepted`, `duplicate`, `rejected`, `unavailable` or `full`.
    outcome: &'static str,
}

static RECEIVED: LazyLock<Family<OutcomeLabel, Counter>> = LazyLock::new(|| {
    metrics::register(
        "complaints_received",
        "Complaints submitted to ingest, by outcome",
        Family::default(),
    )
});

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ContactLabels {
    tenant: String,
    channel: &'static str,
}

/// New contacts stored (retries not counted), by tenant and channel: what the dashboard's
/// "contacts in" shows.
static CONTACTS: LazyLock<Family<ContactLabels, Counter>> = LazyLock::new(|| {
    metrics::register(
        "contacts_received",
        "New contacts stored, by tenant and channel",
        Family::default(),
    )
});

fn count_contact(complaint: &Complaint) {
    CONTACTS
        .get_or_create(&ContactLabels {
            tenant: complaint.tenant.clone(),
            channel: complaint.channel().key(),
        })
        .inc();
}

/// Every outcome [`RECEIVED`] counts, so each series is scraped from the start (at zero).
const OUTCOMES: [&str; 5] = ["accepted", "duplicate", "rejected", "unavailable", "full"];

fn count(outcome: &'static str) {
    RECEIVED.get_or_create(&OutcomeLabel { outcome }).inc();
}

fn count_error(error: &IngestError) {
    count(match error {
        IngestError::Invalid(_) | IngestError::PermissionDenied => "rejected",
        IngestError::Unavailable => "unavailable",
        IngestError::StoreFull => "full",
    });
}

/// How long a caller should wait before retrying after a storage failure.
pub const RETRY_AFTER: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("invalid request")]
    Invalid(Vec<Violation>),
    #[error("this call needs the gateway role")]
    PermissionDenied,
    /// JetStream is unreachable or did not answer in time; nothing was accepted.
    #[error("event store unavailable; nothing was stored, retry with backoff")]
    Unavailable,
    /// JetStream refused to store (stream at its limits); nothing was accepted.
    #[error("event store is full; nothing was stored, retry with backoff")]
    StoreFull,
}

impl IngestError {
    fn from_bus(error: &BusError) -> Self {
        tracing::warn!(%error, "JetStream did not store the event");
        if error.is_refused() {
            IngestError::StoreFull
        } else {
            IngestError::Unavailable
        }
    }
}

/// A submission JetStream stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub complaint_id: String,
    /// Stored before: a retry; nothing new was created.
    pub duplicate: bool,
}

#[derive(Clone)]
pub struct Intake {
    bus: Bus,
    limits: Limits,
}

fn received_event(complaint: &Complaint) -> OutgoingEvent {
    OutgoingEvent::new(
        bus::COMPLAINT_RECEIVED,
        &complaint.tenant,
        format!("received:{}", complaint.complaint_id),
        &ComplaintReceived {
            complaint: Some(complaint.clone()),
        },
    )
}

fn require_gateway(caller: &Principal) -> Result<(), IngestError> {
    caller
        .require_any(&[Role::Gateway])
        .map_err(|_| IngestError::PermissionDenied)
}

impl Intake {
    pub fn new(bus: Bus, limits: Limits) -> Self {
        for outcome in OUTCOMES {
            drop(RECEIVED.get_or_create(&OutcomeLabel { outcome }));
        }
        Self { bus, limits }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn is_connected(&self) -> bool {
        self.bus.is_connected()
    }

    /// Fails at once while NATS is down, rather than after an ack timeout.
    fn require_connection(&self) -> Result<(), IngestError> {
        if self.bus.is_connected() {
            Ok(())
        } else {
            Err(IngestError::Unavailable)
        }
    }

    /// Accepts one contact; `prefix` names it in violations (e.g. `complaint`).
    pub async fn submit_one(
        &self,
        caller: &Principal,
        submission: &ComplaintSubmission,
        prefix: &str,
    ) -> Result<Accepted, IngestError> {
        let result = self.accept_one(caller, submission, prefix).await;
        match &result {
            Ok(accepted) => count(if accepted.duplicate {
                "duplicate"
            } else {
                "accepted"
            }),
            Err(error) => count_error(error),
        }
        result
    }

    async fn accept_one(
        &self,
        caller: &Principal,
        submission: &ComplaintSubmission,
        prefix: &str,
    ) -> Result<Accepted, IngestError> {
        require_gateway(caller)?;
        let complaint = validate_submission(submission, &caller.tenant, &self.limits, Utc::now(), prefix)
            .map_err(IngestError::Invalid)?;
        self.require_connection()?;
        let ack = self
            .bus
            .publish(received_event(&complaint))
            .await
            .map_err(|e| IngestError::from_bus(&e))?;
        tracing::info!(complaint_id = %complaint.complaint_id, duplicate = ack.duplicate, "complaint accepted");
        if !ack.duplicate {
            count_contact(&complaint);
        }
        Ok(Accepted {
            complaint_id: complaint.complaint_id,
            duplicate: ack.duplicate,
        })
    }

    /// Accepts many contacts with pipelined acks; one outcome per item, in order. One bad
    /// item does not fail the others.
    pub async fn submit_many(
        &self,
        caller: &Principal,
        submissions: &[ComplaintSubmission],
    ) -> Result<Vec<SubmissionResult>, IngestError> {
        require_gateway(caller)?;
        if submissions.is_empty() || submissions.len() > self.limits.max_batch {
            return Err(IngestError::Invalid(vec![Violation::new(
                "complaints",
                format!("must hold 1 to {} complaints", self.limits.max_batch),
            )]));
        }
        self.require_connection()?;
        let now = Utc::now();
        let mut results = vec![SubmissionResult::default(); submissions.len()];
        let mut positions = Vec::with_capacity(submissions.len());
        let mut events = Vec::with_capacity(submissions.len());
        let mut complaints = Vec::with_capacity(submissions.len());
        for (i, submission) in submissions.iter().enumerate() {
            match validate_submission(
                submission,
                &caller.tenant,
                &self.limits,
                now,
                &format!("complaints[{i}]"),
            ) {
                Ok(complaint) => {
                    results[i].complaint_id = complaint.complaint_id.clone();
                    positions.push(i);
                    events.push(received_event(&complaint));
                    complaints.push(complaint);
                }
                Err(violations) => {
                    results[i].outcome = SubmissionOutcome::Rejected as i32;
                    results[i].reason = violations
                        .iter()
                        .map(|v| format!("{}: {}", v.field, v.description))
                        .collect::<Vec<_>>()
                        .join("; ");
                }
            }
        }
        let mut failures = 0usize;
        let published = self.bus.publish_all(events).await;
        for ((i, complaint), outcome) in positions.into_iter().zip(&complaints).zip(published) {
            results[i].outcome = match outcome {
                Ok(ack) if ack.duplicate => SubmissionOutcome::Duplicate as i32,
                Ok(_) => {
                    count_contact(complaint);
                    SubmissionOutcome::Accepted as i32
                }
                Err(error) => {
                    failures += 1;
                    results[i].reason = IngestError::from_bus(&error).to_string();
                    SubmissionOutcome::Rejected as i32
                }
            };
        }
        tracing::info!(items = results.len(), failures, "batch handled");
        for result in &results {
            count(match result.outcome() {
                SubmissionOutcome::Accepted => "accepted",
                SubmissionOutcome::Duplicate => "duplicate",
                _ => "rejected",
            });
        }
        Ok(results)
    }

    /// Records a satisfaction answer or a follow-up and publishes `feedback.received`.
    pub async fn submit_feedback(
        &self,
        caller: &Principal,
        feedback: SubmitFeedbackRequest,
    ) -> Result<String, IngestError> {
        require_gateway(caller)?;
        let mut violations = Vec::new();
        if !feedback.tenant.is_empty() && feedback.tenant != caller.tenant {
            violations.push(Violation::new("tenant", "does not match the caller's tenant"));
        }
        if feedback.complaint_id.is_empty() && feedback.work_order_id.is_empty() {
            violations.push(Violation::new(
                "complaint_id",
                "complaint_id or work_order_id must be set",
            ));
        }
        for (field, value) in [
            ("complaint_id", &feedback.complaint_id),
            ("work_order_id", &feedback.work_order_id),
        ] {
            if !value.is_empty() && uuid::Uuid::parse_str(value).is_err() {
                violations.push(Violation::new(field, "must be an id Closedloop issued"));
            }
        }
        if !(0..=5).contains(&feedback.satisfaction) {
            violations.push(Violation::new(
                "satisfaction",
                "must be 1 to 5, or 0 for a follow-up",
            ));
        }
        if feedback.satisfaction == 0 && feedback.comment.trim().is_empty() {
            violations.push(Violation::new(
                "comment",
                "a follow-up without a rating needs a comment",
            ));
        }
        if feedback.comment.chars().count() > self.limits.max_text_chars {
            violations.push(Violation::new(
                "comment",
                format!("must be at most {} characters", self.limits.max_text_chars),
            ));
        }
        if feedback.request_id.chars().count() > self.limits.max_id_chars
            || feedback.request_id.chars().any(char::is_control)
        {
            violations.push(Violation::new(
                "request_id",
                format!(
                    "must be at most {} characters, without control characters",
                    self.limits.max_id_chars
                ),
            ));
        }
        if !violations.is_empty() {
            return Err(IngestError::Invalid(violations));
        }
        self.require_connection()?;
        let satisfaction = feedback.satisfaction.to_string();
        // The caller's id of the answer when it gives one, else the answer itself.
        let answer: [&str; 2] = if feedback.request_id.is_empty() {
            [&satisfaction, &feedback.comment]
        } else {
            ["request", &feedback.request_id]
        };
        let feedback_id = ids::derive(
            "feedback",
            &[
                &caller.tenant,
                &feedback.complaint_id,
                &feedback.work_order_id,
                answer[0],
                answer[1],
            ],
        )
        .to_string();
        let event = FeedbackReceived {
            feedback_id: feedback_id.clone(),
            tenant: caller.tenant.clone(),
            complaint_id: feedback.complaint_id,
            work_order_id: feedback.work_order_id,
            satisfaction: feedback.satisfaction,
            comment: feedback.comment,
            received_at: Some(time::to_timestamp(Utc::now())),
        };
        self.bus
            .publish(OutgoingEvent::new(
                bus::FEEDBACK_RECEIVED,
                &caller.tenant,
                format!("feedback:{feedback_id}"),
                &event,
            ))
            .await
            .map_err(|e| IngestError::from_bus(&e))?;
        Ok(feedback_id)
    }
}
