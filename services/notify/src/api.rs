//! The `NotificationService` gRPC API: the delivery log, tenant-scoped.

use closedloop_proto::v1::notification_service_server::NotificationService;
use closedloop_proto::v1::{ListDeliveriesRequest, ListDeliveriesResponse};
use closedloop_runtime::auth::{Role, principal};
use closedloop_runtime::db;
use closedloop_runtime::grpc::{foreign_page_token, page_size};
use sqlx::PgPool;
use tonic::{Request, Response, Status};

use crate::store::{ListFilter, StoreError};

pub const SERVICE_NAME: &str = "closedloop.v1.NotificationService";

pub struct NotificationApi {
    pub pool: PgPool,
}

fn some(value: String) -> Option<String> {
    if value.is_empty() { None } else { Some(value) }
}

#[tonic::async_trait]
impl NotificationService for NotificationApi {
    async fn list_deliveries(
        &self,
        request: Request<ListDeliveriesRequest>,
    ) -> Result<Response<ListDeliveriesResponse>, Status> {
        let caller = principal(&request)?;
        caller.require_any(&[Role::Agent, Role::Supervisor, Role::Viewer])?;
        let r = request.into_inner();
        let filter = ListFilter {
            complaint_id: some(r.complaint_id),
            work_order_id: some(r.work_order_id),
            recipient: some(r.recipient),
            kind: if r.kind == 0 { None } else { r.kind.try_into().ok() },
            state: if r.state == 0 {
                None
            } else {
                r.state.try_into().ok()
            },
            include_archived: r.include_archived,
        };
        let (deliveries, next_page_token) = db::list_page(
            &self.pool,
            &caller.tenant,
            &filter,
            page_size(r.page_size, 50, 500),
            &r.page_token,
        )
        .await
        .map_err(|e| match e {
            StoreError::BadPageToken(_) => foreign_page_token(),
            StoreError::Database(e) => {
                tracing::error!(error = %e, "database error");
                Status::unavailable("delivery log unavailable; retry")
            }
            StoreError::BadId(id) => Status::internal(format!("stored delivery id {id} is invalid")),
        })?;
        Ok(Response::new(ListDeliveriesResponse {
            deliveries,
            next_page_token,
        }))
    }
}
