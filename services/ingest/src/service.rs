//! The `IngestService` gRPC API: a thin adapter over [`Intake`].

use closedloop_proto::v1::ingest_service_server::IngestService;
use closedloop_proto::v1::{
    SubmitComplaintRequest, SubmitComplaintResponse, SubmitComplaintsRequest, SubmitComplaintsResponse,
    SubmitFeedbackRequest, SubmitFeedbackResponse,
};
use closedloop_runtime::auth::principal;
use closedloop_runtime::grpc::{Violation, invalid_argument};
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::intake::{IngestError, Intake, RETRY_AFTER};

pub const SERVICE_NAME: &str = "closedloop.v1.IngestService";

/// The one place intake errors become gRPC statuses. Storage failures carry
/// `google.rpc.RetryInfo` so clients know to back off and retry.
pub fn status(error: IngestError) -> Status {
    let retry = |code, message: String| {
        Status::with_error_details(code, message, ErrorDetails::with_retry_info(Some(RETRY_AFTER)))
    };
    match error {
        IngestError::Invalid(violations) => invalid_argument(&violations),
        IngestError::PermissionDenied => Status::permission_denied(error.to_string()),
        IngestError::Unavailable => retry(Code::Unavailable, error.to_string()),
        IngestError::StoreFull => retry(Code::ResourceExhausted, error.to_string()),
    }
}

pub struct IngestApi {
    pub intake: Intake,
}

#[tonic::async_trait]
impl IngestService for IngestApi {
    async fn submit_complaint(
        &self,
        request: Request<SubmitComplaintRequest>,
    ) -> Result<Response<SubmitComplaintResponse>, Status> {
        let caller = principal(&request)?;
        let submission = request
            .into_inner()
            .complaint
            .ok_or_else(|| invalid_argument(&[Violation::new("complaint", "must be set")]))?;
        let accepted = self
            .intake
            .submit_one(&caller, &submission, "complaint")
            .await
            .map_err(status)?;
        Ok(Response::new(SubmitComplaintResponse {
            complaint_id: accepted.complaint_id,
            duplicate: accepted.duplicate,
        }))
    }

    async fn submit_complaints(
        &self,
        request: Request<SubmitComplaintsRequest>,
    ) -> Result<Response<SubmitComplaintsResponse>, Status> {
        let caller = principal(&request)?;
        let submissions = request.into_inner().complaints;
        let results = self
            .intake
            .submit_many(&caller, &submissions)
            .await
            .map_err(status)?;
        Ok(Response::new(SubmitComplaintsResponse { results }))
    }

    async fn submit_feedback(
        &self,
        request: Request<SubmitFeedbackRequest>,
    ) -> Result<Response<SubmitFeedbackResponse>, Status> {
        let caller = principal(&request)?;
        let feedback_id = self
            .intake
            .submit_feedback(&caller, request.into_inner())
            .await
            .map_err(status)?;
        Ok(Response::new(SubmitFeedbackResponse { feedback_id }))
    }
}
