//! The `WorkOrderService` gRPC API, tenant-scoped by the caller's token.

use std::sync::Arc;

use closedloop_proto::v1::work_order_service_server::WorkOrderService;
use closedloop_proto::v1::*;
use closedloop_runtime::auth::{Principal, Role, principal};
use closedloop_runtime::grpc::{Violation, invalid_argument, page_size};
use closedloop_runtime::{db, time};
use tonic::{Request, Response, Status};

use crate::lifecycle::Action;
use crate::store::{self, Change, Db, ListFilter, StoreError};
use crate::{Policy, directory, placement};

pub const SERVICE_NAME: &str = "closedloop.v1.WorkOrderService";
const MAX_NOTE_CHARS: usize = 4_000;

pub struct WorkOrderApi {
    pub db: Db,
    pub policy: Arc<Policy>,
    /// For WatchWorkOrders: each tenant's work-order events, read once for all its streams.
    pub feeds: Arc<crate::watch::Feeds>,
    /// Ends open watches when the service shuts down (graceful shutdown waits for streams).
    pub shutdown: tokio_util::sync::CancellationToken,
    /// The open watch streams, within their limits.
    pub watchers: Arc<crate::watch::Watchers>,
}

/// Most remedy value an API call may carry (minor units): a typo guard, not a policy.
const MAX_REMEDY_MINOR: i64 = 100_000_000;

/// The one place store errors become gRPC statuses.
fn status(error: StoreError) -> Status {
    match error {
        StoreError::NotFound => Status::not_found("no such work order for this tenant"),
        StoreError::Archived => Status::failed_precondition(
            "the work order is archived (closed before the retention age): it can be read, not changed",
        ),
        StoreError::VersionConflict { .. } => Status::aborted(error.to_string()),
        StoreError::InvalidTransition(e) => Status::failed_precondition(e.to_string()),
        StoreError::BadPageToken(_) => closedloop_runtime::grpc::foreign_page_token(),
        StoreError::Invalid(message) => Status::invalid_argument(message),
        StoreError::Database(e) => {
            tracing::error!(error = %e, "database error");
            Status::unavailable("work order store unavailable; retry")
        }
    }
}

fn reader(request: &Request<impl Sized>) -> Result<Principal, Status> {
    let caller = principal(request)?;
    caller.require_any(&[Role::Agent, Role::Supervisor, Role::Viewer])?;
    Ok(caller)
}

fn worker(request: &Request<impl Sized>) -> Result<Principal, Status> {
    let caller = principal(request)?;
    caller.require_any(&[Role::Agent, Role::Supervisor])?;
    Ok(caller)
}

fn require_id(field: &str, value: &str) -> Result<(), Status> {
    if value.trim().is_empty() {
        Err(invalid_argument(&[Violation::new(field, "must not be empty")]))
    } else {
        Ok(())
    }
}

/// The intent and category a correction asks for (`None`: keep it), or why it is invalid.
fn correction(intent: i32, category: &str) -> Result<(Option<Intent>, Option<String>), Status> {
    let intent = match Intent::try_from(intent) {
        Ok(Intent::Unspecified) => None,
        Ok(intent) => Some(intent),
        Err(_) => {
            return Err(invalid_argument(&[Violation::new(
                "intent",
                "is not a known intent",
            )]));
        }
    };
    let category = category.trim();
    let well_formed = category.len() <= 64
        && category
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !well_formed {
        return Err(invalid_argument(&[Violation::new(
            "category",
            "must be at most 64 lower-case letters, digits and underscores",
        )]));
    }
    let category = (!category.is_empty()).then(|| category.to_owned());
    if intent.is_none() && category.is_none() {
        return Err(invalid_argument(&[Violation::new(
            "intent",
            "intent or category must be set",
        )]));
    }
    Ok((intent, category))
}

#[cfg(test)]
#[test]
fn corrections_name_something_well_formed() {
    assert_eq!(
        correction(Intent::Inquiry as i32, " billing ").expect("valid"),
        (Some(Intent::Inquiry), Some("billing".to_owned()))
    );
    assert_eq!(
        correction(0, "refund").expect("valid"),
        (None, Some("refund".to_owned()))
    );
    for (intent, category) in [
        (0, ""),
        (99, "billing"),
        (1, "Billing"),
        (1, "a b"),
        (1, &"x".repeat(65)),
    ] {
        let refused = correction(intent, category).expect_err("invalid");
        assert_eq!(
            refused.code(),
            tonic::Code::InvalidArgument,
            "{intent} {category:?}"
        );
    }
}

fn check_note(field: &str, value: &str, required: bool) -> Result<(), Status> {
    if required && value.trim().is_empty() {
        return Err(invalid_argument(&[Violation::new(field, "must not be empty")]));
    }
    if value.chars().count() > MAX_NOTE_CHARS {
        return Err(invalid_argument(&[Violation::new(
            field,
            format!("at most {MAX_NOTE_CHARS} characters"),
        )]));
    }
    Ok(())
}

impl WorkOrderApi {
    /// Capacity freed in `team`: its queue goes to whoever has room now.
    async fn offer_queue(&self, tenant: &str, team: &str) {
        let managers = self.policy.router.account_manager_team();
        placement::offer_queue(&self.db, tenant, team, managers).await;
    }

    async fn change(
        &self,
        caller: &Principal,
        work_order_id: &str,
        change: Change<'_>,
        edit: impl FnOnce(&mut store::WorkOrder),
    ) -> Result<WorkOrder, Status> {
        require_id("work_order_id", work_order_id)?;
        let work_order = store::apply(&self.db, &caller.tenant, work_order_id, change, edit)
            .await
            .map_err(status)?;
        Ok(work_order.to_proto())
    }

    /// Checks a remedy against the caller's authority: supervisors approve their own; an
    /// agent's must be within their limit in the directory.
    async fn authorise_remedy(&self, caller: &Principal, remedy: &mut Remedy) -> Result<(), Status> {
        let mut violations = Vec::new();
        if remedy.kind.trim().is_empty() || remedy.kind.chars().count() > 64 {
            violations.push(Violation::new(
                "remedy.kind",
                "1 to 64 characters, e.g. fee_waiver",
            ));
        }
        if !(0..=MAX_REMEDY_MINOR).contains(&remedy.amount_minor) {
            violations.push(Violation::new(
                "remedy.amount_minor",
                format!("0 to {MAX_REMEDY_MINOR} (minor units)"),
            ));
        }
        let currency_ok =
            remedy.currency.len() == 3 && remedy.currency.chars().all(|c| c.is_ascii_uppercase());
        if remedy.amount_minor > 0 && !currency_ok {
            violations.push(Violation::new("remedy.currency", "an ISO 4217 code such as CNY"));
        }
        if !violations.is_empty() {
            return Err(invalid_argument(&violations));
        }
        remedy.approved_by.clear();
        if caller.require_any(&[Role::Supervisor]).is_ok() {
            remedy.approved_by = caller.name.clone();
            return Ok(());
        }
        let limit = directory::get_agent(&self.db.pool, &caller.tenant, &caller.name)
            .await
            .map_err(|e| status(StoreError::Database(e)))?
            .map_or(0, |agent| agent.authority_limit_minor);
        if remedy.amount_minor > limit {
            return Err(Status::permission_denied(format!(
                "a remedy of {} exceeds your authority limit of {limit}; a supervisor must approve it \
                 (resolve it as a supervisor)",
                remedy.amount_minor
            )));
        }
        Ok(())
    }
}

fn enum_filter<E: TryFrom<i32>>(value: i32) -> Option<E> {
    if value == 0 { None } else { E::try_from(value).ok() }
}

fn text_filter(value: String) -> Option<String> {
    if value.is_empty() { None } else { Some(value) }
}

#[tonic::async_trait]
impl WorkOrderService for WorkOrderApi {
    async fn get_work_order(
        &self,
        request: Request<GetWorkOrderRequest>,
    ) -> Result<Response<GetWorkOrderResponse>, Status> {
        let caller = reader(&request)?;
        let id = request.into_inner().work_order_id;
        require_id("work_order_id", &id)?;
        let lookup = store::Lookup::work_order(&id).map_err(status)?;
        let work_order = store::get(&self.db.pool, &caller.tenant, lookup)
            .await
            .map_err(status)?;
        Ok(Response::new(GetWorkOrderResponse {
            work_order: Some(work_order.to_proto()),
        }))
    }

    async fn list_work_orders(
        &self,
        request: Request<ListWorkOrdersRequest>,
    ) -> Result<Response<ListWorkOrdersResponse>, Status> {
        let caller = reader(&request)?;
        let r = request.into_inner();
        let filter = ListFilter {
            state: enum_filter(r.state),
            team: text_filter(r.team),
            assignee: text_filter(r.assignee),
            priority: enum_filter(r.priority),
            category: text_filter(r.category),
            created_after: r.created_after.as_ref().and_then(time::from_timestamp),
            created_before: r.created_before.as_ref().and_then(time::from_timestamp),
            sla_state: enum_filter(r.sla_state),
            include_archived: r.include_archived,
        };
        let size = page_size(r.page_size, 50, 500);
        let (work_orders, next_page_token) =
            db::list_page(&self.db.pool, &caller.tenant, &filter, size, &r.page_token)
                .await
                .map_err(status)?;
        Ok(Response::new(ListWorkOrdersResponse {
            work_orders: work_orders.iter().map(store::WorkOrder::to_proto).collect(),
            next_page_token,
        }))
    }

    async fn get_complaint_status(
        &self,
        request: Request<GetComplaintStatusRequest>,
    ) -> Result<Response<GetComplaintStatusResponse>, Status> {
        let caller = reader(&request)?;
        let complaint_id = request.into_inner().complaint_id;
        require_id("complaint_id", &complaint_id)?;
        let lookup = store::Lookup::complaint(&complaint_id).map_err(status)?;
        let work_order = store::get(&self.db.pool, &caller.tenant, lookup)
            .await
            .map_err(|e| match e {
                StoreError::NotFound => Status::not_found("no work order for this complaint (yet)"),
                other => status(other),
            })?;
        Ok(Response::new(GetComplaintStatusResponse {
            complaint_id,
            work_order: Some(work_order.to_proto()),
        }))
    }

    async fn accept_work_order(
        &self,
        request: Request<AcceptWorkOrderRequest>,
    ) -> Result<Response<AcceptWorkOrderResponse>, Status> {
        let caller = worker(&request)?;
        let r = request.into_inner();
        let change = Change {
            action: Action::Accept,
            expected_version: r.expected_version,
            actor: &caller.name,
            note: "",
        };
        let work_order = self
            .change(&caller, &r.work_order_id, change, |wo| {
                wo.assignee = caller.name.clone()
            })
            .await?;
        Ok(Response::new(AcceptWorkOrderResponse {
            work_order: Some(work_order),
        }))
    }

    async fn reply_to_customer(
        &self,
        request: Request<ReplyToCustomerRequest>,
    ) -> Result<Response<ReplyToCustomerResponse>, Status> {
        let caller = worker(&request)?;
        let r = request.into_inner();
        check_note("text", &r.text, true)?;
        let change = Change {
            action: Action::Reply,
            expected_version: r.expected_version,
            actor: &caller.name,
            note: &r.text,
        };
        let work_order = self.change(&caller, &r.work_order_id, change, |_| {}).await?;
        Ok(Response::new(ReplyToCustomerResponse {
            work_order: Some(work_order),
        }))
    }

    async fn resolve_work_order(
        &self,
        request: Request<ResolveWorkOrderRequest>,
    ) -> Result<Response<ResolveWorkOrderResponse>, Status> {
        let caller = worker(&request)?;
        let r = request.into_inner();
        check_note("resolution_note", &r.resolution_note, false)?;
        let mut remedy = r.remedy;
        if let Some(remedy) = remedy.as_mut() {
            self.authorise_remedy(&caller, remedy).await?;
        }
        let change = Change {
            action: Action::Resolve,
            expected_version: r.expected_version,
            actor: &caller.name,
            note: &r.resolution_note,
        };
        let work_order = self
            .change(&caller, &r.work_order_id, change, |wo| {
                if remedy.is_some() {
                    wo.remedy = remedy;
                }
            })
            .await?;
        tracing::info!(work_order_id = %work_order.work_order_id, "work order resolved");
        self.offer_queue(&caller.tenant, &work_order.team).await;
        Ok(Response::new(ResolveWorkOrderResponse {
            work_order: Some(work_order),
        }))
    }

    async fn escalate_work_order(
        &self,
        request: Request<EscalateWorkOrderRequest>,
    ) -> Result<Response<EscalateWorkOrderResponse>, Status> {
        let caller = worker(&request)?;
        let r = request.into_inner();
        check_note("reason", &r.reason, true)?;
        let change = Change {
            action: Action::Escalate,
            expected_version: r.expected_version,
            actor: &caller.name,
            note: &r.reason,
        };
        let work_order = self.change(&caller, &r.work_order_id, change, |_| {}).await?;
        Ok(Response::new(EscalateWorkOrderResponse {
            work_order: Some(work_order),
        }))
    }

    async fn reassign_work_order(
        &self,
        request: Request<ReassignWorkOrderRequest>,
    ) -> Result<Response<ReassignWorkOrderResponse>, Status> {
        let caller = worker(&request)?;
        let r = request.into_inner();
        if r.team.trim().is_empty() && r.assignee.trim().is_empty() {
            return Err(invalid_argument(&[Violation::new(
                "team",
                "team or assignee must be set",
            )]));
        }
        let assignee = r.assignee.trim();
        let change = Change {
            // Nobody named to hold it: it waits in the team's queue.
            action: if assignee.is_empty() {
                Action::Requeue
            } else {
                Action::Reassign
            },
            expected_version: r.expected_version,
            actor: &caller.name,
            note: "",
        };
        let work_order = self
            .change(&caller, &r.work_order_id, change, |wo| {
                if !r.team.trim().is_empty() {
                    wo.team = r.team.trim().to_owned();
                }
                wo.assignee = assignee.to_owned();
            })
            .await?;
        self.offer_queue(&caller.tenant, &work_order.team).await;
        Ok(Response::new(ReassignWorkOrderResponse {
            work_order: Some(work_order),
        }))
    }

    async fn reopen_work_order(
        &self,
        request: Request<ReopenWorkOrderRequest>,
    ) -> Result<Response<ReopenWorkOrderResponse>, Status> {
        let caller = worker(&request)?;
        let r = request.into_inner();
        check_note("reason", &r.reason, false)?;
        let change = Change {
            action: Action::Reopen,
            expected_version: r.expected_version,
            actor: &caller.name,
            note: &r.reason,
        };
        require_id("work_order_id", &r.work_order_id)?;
        let mut tx = self.db.begin().await.map_err(|e| status(e.into()))?;
        let mut work_order = store::lock(&mut tx, &caller.tenant, &r.work_order_id)
            .await
            .map_err(status)?;
        let deadlines =
            self.policy
                .sla
                .deadlines(&work_order.category, work_order.priority, chrono::Utc::now());
        store::restart_clock(&mut tx, &mut work_order, &deadlines)
            .await
            .map_err(status)?;
        store::apply_locked(&mut tx, &mut work_order, change, |_| {})
            .await
            .map_err(status)?;
        tx.commit().await.map_err(|e| status(e.into()))?;
        Ok(Response::new(ReopenWorkOrderResponse {
            work_order: Some(work_order.to_proto()),
        }))
    }

    async fn reclassify_work_order(
        &self,
        request: Request<ReclassifyWorkOrderRequest>,
    ) -> Result<Response<ReclassifyWorkOrderResponse>, Status> {
        let caller = worker(&request)?;
        let r = request.into_inner();
        require_id("work_order_id", &r.work_order_id)?;
        let (intent, category) = correction(r.intent, &r.category)?;
        let mut tx = self.db.begin().await.map_err(|e| status(e.into()))?;
        let mut work_order = store::lock(&mut tx, &caller.tenant, &r.work_order_id)
            .await
            .map_err(status)?;
        let (previous_intent, previous_category) = (work_order.intent, work_order.category.clone());
        let intent = intent.unwrap_or(previous_intent);
        let category = category.unwrap_or_else(|| previous_category.clone());
        let note = format!(
            "{} / {previous_category} -> {} / {category}",
            previous_intent.label(),
            intent.label()
        );
        let change = Change {
            action: Action::Reclassify,
            expected_version: r.expected_version,
            actor: &caller.name,
            note: &note,
        };
        store::apply_locked(&mut tx, &mut work_order, change, |wo| {
            wo.intent = intent;
            wo.category = category;
        })
        .await
        .map_err(status)?;
        store::record_correction(
            &mut tx,
            &work_order,
            previous_intent,
            &previous_category,
            &caller.name,
        )
        .await
        .map_err(status)?;
        tx.commit().await.map_err(|e| status(e.into()))?;
        Ok(Response::new(ReclassifyWorkOrderResponse {
            work_order: Some(work_order.to_proto()),
        }))
    }

    type WatchWorkOrdersStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<WatchWorkOrdersResponse, Status>> + Send>>;

    async fn watch_work_orders(
        &self,
        request: Request<WatchWorkOrdersRequest>,
    ) -> Result<Response<Self::WatchWorkOrdersStream>, Status> {
        let caller = reader(&request)?;
        let slot = self.watchers.admit(&caller.tenant, &caller.name)?;
        let r = request.into_inner();
        let feed = self
            .feeds
            .subscribe(&caller.tenant)
            .await
            .map_err(|e| Status::unavailable(format!("cannot watch work orders now: {e}")))?;
        let (team, assignee) = (r.team, r.assignee);
        let wants = move |event: &WorkOrderEvent| {
            event.work_order.as_ref().is_some_and(|wo| {
                (team.is_empty() || wo.team == team) && (assignee.is_empty() || wo.assignee == assignee)
            })
        };
        let buffer = self.watchers.limits().buffer;
        let (out, stream) = tokio::sync::mpsc::channel(buffer + 1);
        tokio::spawn(crate::watch::forward(
            feed,
            wants,
            out,
            buffer,
            self.shutdown.clone(),
            slot,
        ));
        let stream = futures::stream::unfold(stream, |mut stream| async move {
            stream.recv().await.map(|item| (item, stream))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_work_order_history(
        &self,
        request: Request<GetWorkOrderHistoryRequest>,
    ) -> Result<Response<GetWorkOrderHistoryResponse>, Status> {
        let caller = reader(&request)?;
        let id = request.into_inner().work_order_id;
        require_id("work_order_id", &id)?;
        let entries = store::history(&self.db.pool, &caller.tenant, &id)
            .await
            .map_err(status)?;
        Ok(Response::new(GetWorkOrderHistoryResponse { entries }))
    }

    async fn list_incidents(
        &self,
        request: Request<ListIncidentsRequest>,
    ) -> Result<Response<ListIncidentsResponse>, Status> {
        let caller = reader(&request)?;
        let open_only = request.into_inner().open_only;
        let incidents = store::list_incidents(&self.db.pool, &caller.tenant, open_only, None)
            .await
            .map_err(status)?;
        Ok(Response::new(ListIncidentsResponse { incidents }))
    }

    async fn resolve_incident(
        &self,
        request: Request<ResolveIncidentRequest>,
    ) -> Result<Response<ResolveIncidentResponse>, Status> {
        let caller = principal(&request)?;
        caller.require_any(&[Role::Supervisor])?;
        let r = request.into_inner();
        require_id("incident_id", &r.incident_id)?;
        check_note("resolution_note", &r.resolution_note, false)?;
        let (incident, resolved) = store::resolve_incident(
            &self.db,
            &caller.tenant,
            &r.incident_id,
            &caller.name,
            &r.resolution_note,
        )
        .await
        .map_err(|e| match e {
            StoreError::NotFound => Status::not_found("no open incident with this id for this tenant"),
            other => status(other),
        })?;
        Ok(Response::new(ResolveIncidentResponse {
            incident: Some(incident),
            resolved_work_orders: resolved,
        }))
    }
}
