//! Work orders in PostgreSQL. Every change writes the work order and its history row, which
//! carries the change's event, in one transaction, so an event exists exactly when its change
//! does.

mod columns;
mod corrections;
mod incidents;
mod reads;
mod recording;

pub use columns::*;
pub use corrections::*;
pub use incidents::*;
pub use reads::*;
pub use recording::{Db, Recording};

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use closedloop_proto::v1::{
    Intent, Poster, Remedy, SlaState, WorkOrderEvent, WorkOrderEventKind, WorkOrderState,
};
use closedloop_runtime::bus::{OutgoingEvent, work_order_event_name, work_order_event_topic};
use closedloop_runtime::{ids, telemetry, time};
use sqlx::{Postgres, Row, Transaction};
use uuid::Uuid;

use crate::lifecycle::{Action, InvalidTransition};
pub use crate::work_order::WorkOrder;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("work order not found")]
    NotFound,
    #[error("work order is at version {actual}, not {expected}")]
    VersionConflict { expected: i64, actual: i64 },
    #[error(transparent)]
    InvalidTransition(#[from] InvalidTransition),
    #[error("invalid page token: {0}")]
    BadPageToken(#[from] closedloop_runtime::grpc::ForeignPageToken),
    #[error("work order is archived: it can be read, not changed")]
    Archived,
    #[error("{0}")]
    Invalid(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// Every column a [`WorkOrder`] is read from.
pub(crate) const COLUMNS: &str = "work_order_id, tenant, complaint_id, state, version, team, assignee, category, priority, \
    intent, channel, channel_message_id, poster_id, poster_name, poster_followers, poster_verified, summary, \
    thread_id, locale, needs_private_channel, created_at, updated_at, first_response_due, resolution_due, \
    resolved_at, resolution_note, province, city, influence_tier, skill, sla_state, first_responded_at, \
    incident_id, remedy_kind, remedy_amount_minor, remedy_currency, remedy_approved_by, satisfaction";

pub(crate) fn ts(at: DateTime<Utc>) -> Option<prost_types::Timestamp> {
    Some(time::to_timestamp(at))
}

/// A value of a `smallint` enum column; a number the enum does not know reads as its default.
fn enum_column<E: TryFrom<i32> + Default>(
    row: &sqlx::postgres::PgRow,
    column: &str,
) -> Result<E, sqlx::Error> {
    Ok(E::try_from(i32::from(row.try_get::<i16, _>(column)?)).unwrap_or_default())
}

pub(crate) fn from_row(row: &sqlx::postgres::PgRow) -> Result<WorkOrder, sqlx::Error> {
    Ok(closedloop_runtime::from_columns![WorkOrder; row;
        tenant, version, team, assignee, category, channel_message_id, summary, resolution_note,
        thread_id, locale, needs_private_channel, province, city, skill, created_at, updated_at,
        first_response_due, resolution_due, resolved_at, first_responded_at;
        work_order_id: row.try_get::<Uuid, _>("work_order_id")?.to_string(),
        complaint_id: row.try_get::<Uuid, _>("complaint_id")?.to_string(),
        state: enum_column(row, "state")?,
        priority: enum_column(row, "priority")?,
        intent: enum_column(row, "intent")?,
        channel: enum_column(row, "channel")?,
        poster: Poster {
            poster_id: row.try_get("poster_id")?,
            display_name: row.try_get("poster_name")?,
            followers: row.try_get("poster_followers")?,
            verified: row.try_get("poster_verified")?,
        },
        influence_tier: enum_column(row, "influence_tier")?,
        sla_state: enum_column(row, "sla_state")?,
        incident_id: row.try_get::<Option<Uuid>, _>("incident_id")?.map(|id| id.to_string()),
        remedy: {
            let kind: String = row.try_get("remedy_kind")?;
            if kind.is_empty() {
                None
            } else {
                Some(Remedy {
                    kind,
                    amount_minor: row.try_get("remedy_amount_minor")?,
                    currency: row.try_get("remedy_currency")?,
                    approved_by: row.try_get("remedy_approved_by")?,
                })
            }
        },
        satisfaction: i32::from(row.try_get::<i16, _>("satisfaction")?),
        // Only the API's reads select it (see [`Tier`]); every other row is hot.
        archived: row.try_get::<bool, _>("archived").unwrap_or(false),
    ])
}

pub(crate) fn parse_uuid(id: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(id).map_err(|_| StoreError::NotFound)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct EventLabels {
    kind: &'static str,
}

static EVENTS: std::sync::LazyLock<
    prometheus_client::metrics::family::Family<EventLabels, prometheus_client::metrics::counter::Counter>,
> = std::sync::LazyLock::new(|| {
    closedloop_runtime::metrics::register(
        "work_order_events",
        "Committed work-order changes, by event kind",
        prometheus_client::metrics::family::Family::default(),
    )
});

/// Counts a committed change.
fn count(kind: WorkOrderEventKind) {
    EVENTS
        .get_or_create(&EventLabels {
            kind: work_order_event_name(kind),
        })
        .inc();
}

/// The id of the event for `version` of a work order: the same on every write and relay of
/// it, so JetStream drops a re-publish as a duplicate.
pub fn work_order_event_id(work_order_id: &str, version: i64) -> Uuid {
    ids::derive("workorder-event", &[work_order_id, &version.to_string()])
}

/// The event for a work order at its current version, as its history row carries it.
pub fn work_order_event(
    work_order: &WorkOrder,
    kind: WorkOrderEventKind,
    actor: &str,
    note: &str,
) -> OutgoingEvent {
    let event_id = work_order_event_id(&work_order.work_order_id, work_order.version);
    let event = WorkOrderEvent {
        event_id: event_id.to_string(),
        kind: kind as i32,
        work_order: Some(work_order.to_proto()),
        actor: actor.to_owned(),
        note: note.to_owned(),
        occurred_at: Some(time::to_timestamp(work_order.updated_at)),
    };
    OutgoingEvent::new(
        work_order_event_topic(kind),
        &work_order.tenant,
        event_id.to_string(),
        &event,
    )
}

/// A committed change, as history row and event: the work order after it.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    pub work_order: WorkOrder,
    pub kind: WorkOrderEventKind,
    pub actor: String,
    pub note: String,
    /// Trace context of the request that caused it; the current span's when `None`.
    pub trace: Option<HashMap<String, String>>,
}

impl Recorded {
    /// Carries the trace of the complaint that caused it (placement runs outside its span).
    pub fn traced(mut self, trace: &HashMap<String, String>) -> Self {
        self.trace = Some(trace.clone());
        self
    }

    pub fn new(
        work_order: &WorkOrder,
        kind: WorkOrderEventKind,
        actor: &str,
        note: impl Into<String>,
    ) -> Self {
        Self {
            work_order: work_order.clone(),
            kind,
            actor: actor.to_owned(),
            note: note.into(),
            trace: None,
        }
    }
}

/// Writes history rows for `changes` in one statement. Each row carries its change's
/// `workorder.*` event, which the relay publishes from there (see `relay`).
pub async fn write_events(
    tx: &mut Transaction<'_, Postgres>,
    changes: &[Recorded],
) -> Result<(), StoreError> {
    if changes.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::with_capacity(changes.len());
    for change in changes {
        ids.push(parse_uuid(&change.work_order.work_order_id)?);
    }
    let events: Vec<OutgoingEvent> = changes
        .iter()
        .map(|c| work_order_event(&c.work_order, c.kind, &c.actor, &c.note))
        .collect();
    let traces = stored_traces(changes.iter().map(|c| c.trace.as_ref()));
    sqlx::query(
        "INSERT INTO work_order_history \
           (work_order_id, version, kind, actor, note, occurred_at, subject, payload, trace_headers) \
         SELECT * FROM unnest($1::uuid[], $2::int8[], $3::text[], $4::text[], $5::text[], \
           $6::timestamptz[], $7::text[], $8::bytea[], $9::jsonb[])",
    )
    .bind(ids)
    .bind(changes.iter().map(|c| c.work_order.version).collect::<Vec<_>>())
    .bind(
        changes
            .iter()
            .map(|c| work_order_event_name(c.kind))
            .collect::<Vec<_>>(),
    )
    .bind(changes.iter().map(|c| c.actor.as_str()).collect::<Vec<_>>())
    .bind(changes.iter().map(|c| c.note.as_str()).collect::<Vec<_>>())
    .bind(
        changes
            .iter()
            .map(|c| c.work_order.updated_at)
            .collect::<Vec<_>>(),
    )
    .bind(events.iter().map(|e| e.subject.as_str()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.payload.as_ref()).collect::<Vec<&[u8]>>())
    .bind(traces)
    .execute(&mut **tx)
    .await?;
    for change in changes {
        count(change.kind);
    }
    Ok(())
}

/// The trace context to store beside each event: its own where it has one, else the current
/// span's.
fn stored_traces<'a>(
    traces: impl Iterator<Item = Option<&'a HashMap<String, String>>>,
) -> Vec<serde_json::Value> {
    let current = telemetry::current_trace_headers();
    traces
        .map(|trace| serde_json::to_value(trace.unwrap_or(&current)).unwrap_or_default())
        .collect()
}

/// Queues events that have no history row (incident alerts) for the relay, with the current
/// trace context.
pub async fn write_outbox(
    tx: &mut Transaction<'_, Postgres>,
    events: &[OutgoingEvent],
) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    let traces = stored_traces(events.iter().map(|e| e.trace_headers.as_ref()));
    sqlx::query(
        "INSERT INTO outbox (event_id, subject, event_type, payload, trace_headers) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::jsonb[]) \
         ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(events.iter().map(|e| e.id.as_str()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.subject.as_str()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.event_type.as_str()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.payload.as_ref()).collect::<Vec<&[u8]>>())
    .bind(traces)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The states `lifecycle::is_open` accepts, as an SQL list, written into queries rather than bound: the planner only
/// uses the partial indexes (`WHERE state IN (1, 2, 3, 4, 7)`) when it can see the values.
pub(crate) const OPEN_STATES_SQL: &str = "(1, 2, 3, 4, 7)";

/// The states assignment takes work from (queued, nobody holding it), as [`OPEN_STATES_SQL`].
pub(crate) const QUEUED_STATES_SQL: &str = "(1, 7)";

/// Restarts the SLA clock of a work order (on reopen): new deadlines and risk points.
pub async fn restart_clock(
    tx: &mut Transaction<'_, Postgres>,
    wo: &mut WorkOrder,
    deadlines: &crate::routing::Deadlines,
) -> Result<(), StoreError> {
    wo.first_response_due = deadlines.first_response_due;
    wo.resolution_due = deadlines.resolution_due;
    wo.sla_state = SlaState::OnTrack;
    sqlx::query(
        "UPDATE work_orders SET first_response_due = $2, resolution_due = $3, first_response_risk_at = $4, \
         resolution_risk_at = $5, sla_state = $6 WHERE work_order_id = $1",
    )
    .bind(parse_uuid(&wo.work_order_id)?)
    .bind(deadlines.first_response_due)
    .bind(deadlines.resolution_due)
    .bind(deadlines.first_response_risk_at)
    .bind(deadlines.resolution_risk_at)
    .bind(SlaState::OnTrack as i16)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A lifecycle change.
pub struct Change<'a> {
    pub action: Action,
    /// 0: apply at whatever version; otherwise only at this version.
    pub expected_version: i64,
    pub actor: &'a str,
    pub note: &'a str,
}

/// Locks a work order for a change inside `tx`.
pub async fn lock(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &str,
    work_order_id: &str,
) -> Result<WorkOrder, StoreError> {
    let id = parse_uuid(work_order_id)?;
    let row = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM work_orders WHERE tenant = $1 AND work_order_id = $2 FOR UPDATE"
    ))
    .bind(tenant)
    .bind(id)
    .fetch_optional(&mut **tx)
    .await?;
    match row {
        Some(row) => Ok(from_row(&row)?),
        None => {
            let archived: Option<i32> = sqlx::query_scalar(
                "SELECT 1 FROM work_orders_archive WHERE tenant = $1 AND work_order_id = $2",
            )
            .bind(tenant)
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?;
            Err(if archived.is_some() {
                StoreError::Archived
            } else {
                StoreError::NotFound
            })
        }
    }
}

/// Applies a lifecycle action to a locked work order: checks version and transition, bumps
/// the version, lets `edit` adjust fields, and writes the row, its history and its event.
pub async fn apply_locked(
    tx: &mut Transaction<'_, Postgres>,
    work_order: &mut WorkOrder,
    change: Change<'_>,
    edit: impl FnOnce(&mut WorkOrder),
) -> Result<(), StoreError> {
    if change.expected_version != 0 && change.expected_version != work_order.version {
        return Err(StoreError::VersionConflict {
            expected: change.expected_version,
            actual: work_order.version,
        });
    }
    work_order.apply(change.action, change.note, Utc::now())?;
    edit(work_order);
    update_work_order(tx, work_order).await?;
    let recorded = Recorded::new(work_order, change.action.event_kind(), change.actor, change.note);
    write_events(tx, std::slice::from_ref(&recorded)).await
}

/// [`apply_locked`] in a transaction of its own.
pub async fn apply(
    db: &Db,
    tenant: &str,
    work_order_id: &str,
    change: Change<'_>,
    edit: impl FnOnce(&mut WorkOrder),
) -> Result<WorkOrder, StoreError> {
    let mut tx = db.begin().await?;
    let mut work_order = lock(&mut tx, tenant, work_order_id).await?;
    apply_locked(&mut tx, &mut work_order, change, edit).await?;
    tx.commit().await?;
    Ok(work_order)
}

/// Builds a new work order for a classified complaint (pure; the caller stores it).
pub fn new_work_order(
    complaint: &closedloop_proto::v1::Complaint,
    classification: &closedloop_proto::v1::Classification,
    route: &crate::routing::Route,
    deadlines: &crate::routing::Deadlines,
    now: DateTime<Utc>,
) -> NewWorkOrder {
    let work_order = WorkOrder {
        work_order_id: ids::derive("workorder", &[&complaint.tenant, &complaint.complaint_id]).to_string(),
        tenant: complaint.tenant.clone(),
        complaint_id: complaint.complaint_id.clone(),
        state: WorkOrderState::New,
        version: 1,
        team: route.team.clone(),
        assignee: String::new(),
        category: classification.category.clone(),
        priority: classification.priority(),
        intent: classification.intent(),
        channel: complaint.channel(),
        channel_message_id: complaint.channel_message_id.clone(),
        poster: complaint.poster.clone().unwrap_or_default(),
        summary: classification.masked_text.clone(),
        created_at: now,
        updated_at: now,
        first_response_due: deadlines.first_response_due,
        resolution_due: deadlines.resolution_due,
        resolved_at: None,
        resolution_note: String::new(),
        thread_id: complaint.thread_id.clone(),
        locale: complaint.locale.clone(),
        needs_private_channel: classification.needs_private_channel,
        province: classification.province.clone(),
        city: classification.city.clone(),
        influence_tier: classification.influence_tier(),
        sla_state: SlaState::OnTrack,
        incident_id: None,
        remedy: None,
        satisfaction: 0,
        first_responded_at: None,
        skill: route.skill.clone(),
        archived: false,
    };
    NewWorkOrder {
        work_order,
        first_response_risk_at: deadlines.first_response_risk_at,
        resolution_risk_at: deadlines.resolution_risk_at,
    }
}

/// Whether a classified contact needs a person at all.
pub fn needs_work_order(intent: Intent) -> bool {
    matches!(intent, Intent::Complaint | Intent::Inquiry | Intent::Unspecified)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn states_where(holds: impl Fn(WorkOrderState) -> bool) -> Vec<i32> {
        (0..16)
            .filter(|n| WorkOrderState::try_from(*n).is_ok_and(&holds))
            .collect()
    }

    fn numbers(list: &str) -> Vec<i32> {
        list.trim_matches(|c| c == '(' || c == ')')
            .split(", ")
            .map(|n| n.parse().expect("a number"))
            .collect()
    }

    #[test]
    fn state_lists_in_sql_match_the_state_machine() {
        use crate::lifecycle::{Action, is_open, next_state};
        assert_eq!(numbers(OPEN_STATES_SQL), states_where(is_open));
        assert_eq!(
            numbers(QUEUED_STATES_SQL),
            states_where(|s| next_state(s, Action::Assign).is_ok())
        );
    }
}
