//! The `IngestService` gRPC API.

use chrono::Utc;
use closedloop_proto::v1::ingest_service_server::IngestService;
use closedloop_proto::v1::{
    ComplaintReceived, FeedbackReceived, SubmissionOutcome, SubmissionResult, SubmitComplaintRequest,
    SubmitComplaintResponse, SubmitComplaintsRequest, SubmitComplaintsResponse, SubmitFeedbackRequest,
    SubmitFeedbackResponse,
};
use closedloop_runtime::auth::{Principal, Role, principal};
use closedloop_runtime::bus::{self, Bus, BusError, OutgoingEvent};
use closedloop_runtime::grpc::{Violation, invalid_argument};
use closedloop_runtime::{ids, time};
use tonic::{Request, Response, Status};

use crate::validate::{Limits, validate_submission};

pub const SERVICE_NAME: &str = "closedloop.v1.IngestService";

#[derive(Clone)]
pub struct IngestApi {
    bus: Bus,
    limits: Limits,
}

impl IngestApi {
    pub fn new(bus: Bus, limits: Limits) -> Self {
        Self { bus, limits }
    }
}

fn received_event(complaint: &closedloop_proto::v1::Complaint) -> OutgoingEvent {
    let id = format!("received:{}", complaint.complaint_id);
    OutgoingEvent::new(
        bus::COMPLAINT_RECEIVED,
        &complaint.tenant,
        id,
        &ComplaintReceived {
            complaint: Some(complaint.clone()),
        },
    )
}

/// A publish failure as the gateway should see it: retry later, nothing was stored.
fn unavailable(error: &BusError) -> Status {
    tracing::warn!(%error, "JetStream did not store the event");
    if error.is_storage_full() {
        Status::resource_exhausted("event store is full; retry with backoff")
    } else {
        Status::unavailable("event store unavailable; nothing was stored, retry with backoff")
    }
}

fn caller(request: &Request<impl Sized>) -> Result<Principal, Status> {
    let caller = principal(request)?;
    caller.require_any(&[Role::Gateway])?;
    Ok(caller)
}

#[tonic::async_trait]
impl IngestService for IngestApi {
    async fn submit_complaint(
        &self,
        request: Request<SubmitComplaintRequest>,
    ) -> Result<Response<SubmitComplaintResponse>, Status> {
        let caller = caller(&request)?;
        let submission = request
            .into_inner()
            .complaint
            .ok_or_else(|| invalid_argument(&[Violation::new("complaint", "must be set")]))?;
        let complaint =
            validate_submission(&submission, &caller.tenant, &self.limits, Utc::now(), "complaint")
                .map_err(|violations| invalid_argument(&violations))?;
        let ack = self
            .bus
            .publish(received_event(&complaint))
            .await
            .map_err(|e| unavailable(&e))?;
        tracing::info!(complaint_id = %complaint.complaint_id, duplicate = ack.duplicate, "complaint accepted");
        Ok(Response::new(SubmitComplaintResponse {
            complaint_id: complaint.complaint_id,
            duplicate: ack.duplicate,
        }))
    }

    async fn submit_complaints(
        &self,
        request: Request<SubmitComplaintsRequest>,
    ) -> Result<Response<SubmitComplaintsResponse>, Status> {
        let caller = caller(&request)?;
        let submissions = request.into_inner().complaints;
        if submissions.is_empty() || submissions.len() > self.limits.max_batch {
            return Err(invalid_argument(&[Violation::new(
                "complaints",
                format!("must hold 1 to {} complaints", self.limits.max_batch),
            )]));
        }
        let now = Utc::now();
        let mut results = vec![SubmissionResult::default(); submissions.len()];
        let mut to_publish = Vec::new();
        for (i, submission) in submissions.iter().enumerate() {
            let prefix = format!("complaints[{i}]");
            match validate_submission(submission, &caller.tenant, &self.limits, now, &prefix) {
                Ok(complaint) => {
                    results[i].complaint_id = complaint.complaint_id.clone();
                    to_publish.push((i, received_event(&complaint)));
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
        let (positions, events): (Vec<usize>, Vec<OutgoingEvent>) = to_publish.into_iter().unzip();
        let mut failures = 0usize;
        for (i, outcome) in positions.into_iter().zip(self.bus.publish_all(events).await) {
            match outcome {
                Ok(ack) if ack.duplicate => results[i].outcome = SubmissionOutcome::Duplicate as i32,
                Ok(_) => results[i].outcome = SubmissionOutcome::Accepted as i32,
                Err(error) => {
                    failures += 1;
                    tracing::warn!(%error, "batch item not stored");
                    results[i].outcome = SubmissionOutcome::Rejected as i32;
                    results[i].reason = "event store unavailable; not stored, retry this item".into();
                }
            }
        }
        tracing::info!(items = results.len(), failures, "batch handled");
        Ok(Response::new(SubmitComplaintsResponse { results }))
    }

    async fn submit_feedback(
        &self,
        request: Request<SubmitFeedbackRequest>,
    ) -> Result<Response<SubmitFeedbackResponse>, Status> {
        let caller = caller(&request)?;
        let feedback = request.into_inner();
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
            violations.push(Violation::new("comment", "is too long"));
        }
        if !violations.is_empty() {
            return Err(invalid_argument(&violations));
        }
        let satisfaction = feedback.satisfaction.to_string();
        let feedback_id = ids::derive(
            "feedback",
            &[
                &caller.tenant,
                &feedback.complaint_id,
                &feedback.work_order_id,
                &satisfaction,
                &feedback.comment,
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
            .map_err(|e| unavailable(&e))?;
        Ok(Response::new(SubmitFeedbackResponse { feedback_id }))
    }
}
