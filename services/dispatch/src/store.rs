//! Work orders in PostgreSQL. Every change writes the work order, its history row and the
//! outbox event in one transaction, so an event exists exactly when its change does.

use chrono::{DateTime, Utc};
use closedloop_proto::v1::{
    Channel, Intent, Poster, Priority, WorkOrder, WorkOrderEvent, WorkOrderEventKind, WorkOrderState,
};
use closedloop_runtime::bus::{OutgoingEvent, work_order_topic};
use closedloop_runtime::{grpc, ids, telemetry, time};
use sqlx::{PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

use crate::lifecycle::{self, Action, InvalidTransition};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("work order not found")]
    NotFound,
    #[error("work order is at version {actual}, not {expected}")]
    VersionConflict { expected: i64, actual: i64 },
    #[error(transparent)]
    InvalidTransition(#[from] InvalidTransition),
    #[error("invalid page token")]
    BadPageToken,
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

const COLUMNS: &str = "work_order_id, tenant, complaint_id, state, version, team, assignee, category, priority, \
    intent, channel, channel_message_id, poster_id, poster_name, poster_followers, poster_verified, summary, \
    thread_id, locale, needs_private_channel, created_at, updated_at, first_response_due, resolution_due, \
    resolved_at, resolution_note";

fn ts(at: DateTime<Utc>) -> Option<prost_types::Timestamp> {
    Some(time::to_timestamp(at))
}

fn from_row(row: &sqlx::postgres::PgRow) -> Result<WorkOrder, sqlx::Error> {
    let state: i16 = row.try_get("state")?;
    let priority: i16 = row.try_get("priority")?;
    let intent: i16 = row.try_get("intent")?;
    let channel: i16 = row.try_get("channel")?;
    let resolved_at: Option<DateTime<Utc>> = row.try_get("resolved_at")?;
    Ok(WorkOrder {
        work_order_id: row.try_get::<Uuid, _>("work_order_id")?.to_string(),
        tenant: row.try_get("tenant")?,
        complaint_id: row.try_get::<Uuid, _>("complaint_id")?.to_string(),
        state: i32::from(state),
        version: row.try_get("version")?,
        team: row.try_get("team")?,
        assignee: row.try_get("assignee")?,
        category: row.try_get("category")?,
        priority: i32::from(priority),
        intent: i32::from(intent),
        channel: i32::from(channel),
        channel_message_id: row.try_get("channel_message_id")?,
        poster: Some(Poster {
            poster_id: row.try_get("poster_id")?,
            display_name: row.try_get("poster_name")?,
            followers: row.try_get("poster_followers")?,
            verified: row.try_get("poster_verified")?,
        }),
        summary: row.try_get("summary")?,
        created_at: ts(row.try_get("created_at")?),
        updated_at: ts(row.try_get("updated_at")?),
        first_response_due: ts(row.try_get("first_response_due")?),
        resolution_due: ts(row.try_get("resolution_due")?),
        resolved_at: resolved_at.and_then(ts),
        resolution_note: row.try_get("resolution_note")?,
        thread_id: row.try_get("thread_id")?,
        locale: row.try_get("locale")?,
        needs_private_channel: row.try_get("needs_private_channel")?,
    })
}

fn parse_uuid(id: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(id).map_err(|_| StoreError::NotFound)
}

fn to_time(ts: &Option<prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    ts.as_ref().and_then(time::from_timestamp)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct EventLabels {
    kind: &'static str,
}

static EVENTS: std::sync::LazyLock<
    prometheus_client::metrics::family::Family<EventLabels, prometheus_client::metrics::counter::Counter>,
> = std::sync::LazyLock::new(|| {
    let family = prometheus_client::metrics::family::Family::default();
    closedloop_runtime::metrics::register(
        "work_order_events",
        "Committed work-order changes, by event kind",
        family.clone(),
    );
    family
});

/// Counts a committed change.
fn count(kind: WorkOrderEventKind) {
    EVENTS
        .get_or_create(&EventLabels {
            kind: lifecycle::event_name(kind),
        })
        .inc();
}

/// The event for a work order at its current version, ready for the outbox.
pub fn work_order_event(
    work_order: &WorkOrder,
    kind: WorkOrderEventKind,
    actor: &str,
    note: &str,
) -> OutgoingEvent {
    let event_id = ids::derive(
        "workorder-event",
        &[&work_order.work_order_id, &work_order.version.to_string()],
    );
    let event = WorkOrderEvent {
        event_id: event_id.to_string(),
        kind: kind as i32,
        work_order: Some(work_order.clone()),
        actor: actor.to_owned(),
        note: note.to_owned(),
        occurred_at: work_order.updated_at,
    };
    OutgoingEvent::new(
        work_order_topic(lifecycle::event_name(kind)),
        &work_order.tenant,
        event_id.to_string(),
        &event,
    )
}

async fn append_history_and_outbox(
    tx: &mut Transaction<'_, Postgres>,
    work_order: &WorkOrder,
    kind: WorkOrderEventKind,
    actor: &str,
    note: &str,
) -> Result<(), StoreError> {
    let id = parse_uuid(&work_order.work_order_id)?;
    let at = to_time(&work_order.updated_at).unwrap_or_else(Utc::now);
    sqlx::query(
        "INSERT INTO work_order_history (work_order_id, version, kind, actor, note, occurred_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(id)
    .bind(work_order.version)
    .bind(lifecycle::event_name(kind))
    .bind(actor)
    .bind(note)
    .bind(at)
    .execute(&mut **tx)
    .await?;
    let event = work_order_event(work_order, kind, actor, note);
    let trace = serde_json::to_value(telemetry::current_trace_headers()).unwrap_or_default();
    sqlx::query(
        "INSERT INTO outbox (event_id, subject, event_type, payload, trace_headers) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(&event.id)
    .bind(&event.subject)
    .bind(&event.event_type)
    .bind(event.payload.as_ref())
    .bind(trace)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// What became of a classified complaint.
#[derive(Debug, Clone, PartialEq)]
pub enum Placement {
    /// A new work order was opened for it.
    Created(WorkOrder),
    /// A follow-up on a thread with an open work order: attached to that one.
    Attached(WorkOrder),
    /// Handled before (a redelivery): nothing changed.
    AlreadyHandled,
}

/// Opens a work order for a complaint, or attaches the complaint to the open work order of
/// its thread. Idempotent: a complaint already placed changes nothing. Complaints of one
/// thread are placed one at a time (an advisory lock on the thread), across replicas.
pub async fn place(pool: &PgPool, work_order: &WorkOrder) -> Result<Placement, StoreError> {
    let tenant = &work_order.tenant;
    let complaint_id = parse_uuid(&work_order.complaint_id)?;
    let mut tx = pool.begin().await?;
    if !work_order.thread_id.is_empty() {
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(format!("{tenant}\u{1f}{}", work_order.thread_id))
            .execute(&mut *tx)
            .await?;
    }
    let placed: Option<Uuid> = sqlx::query_scalar(
        "SELECT work_order_id FROM work_orders WHERE tenant = $1 AND complaint_id = $2 \
         UNION ALL SELECT work_order_id FROM complaint_links WHERE tenant = $1 AND complaint_id = $2 LIMIT 1",
    )
    .bind(tenant)
    .bind(complaint_id)
    .fetch_optional(&mut *tx)
    .await?;
    if placed.is_some() {
        return Ok(Placement::AlreadyHandled);
    }
    if !work_order.thread_id.is_empty() {
        let open = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM work_orders WHERE tenant = $1 AND thread_id = $2 AND state = ANY($3) \
             ORDER BY created_at DESC LIMIT 1 FOR UPDATE"
        ))
        .bind(tenant)
        .bind(&work_order.thread_id)
        .bind(OPEN_STATES.map(|s| s as i16).to_vec())
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = open {
            let mut open = from_row(&row)?;
            let open_id = parse_uuid(&open.work_order_id)?;
            sqlx::query(
                "INSERT INTO complaint_links (tenant, complaint_id, work_order_id) VALUES ($1, $2, $3)",
            )
            .bind(tenant)
            .bind(complaint_id)
            .bind(open_id)
            .execute(&mut *tx)
            .await?;
            let now = Utc::now();
            open.version += 1;
            open.updated_at = ts(now);
            sqlx::query("UPDATE work_orders SET version = $2, updated_at = $3 WHERE work_order_id = $1")
                .bind(open_id)
                .bind(open.version)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            let note = format!("follow-up {} attached", work_order.complaint_id);
            append_history_and_outbox(&mut tx, &open, WorkOrderEventKind::Merged, "system", &note).await?;
            tx.commit().await?;
            count(WorkOrderEventKind::Merged);
            return Ok(Placement::Attached(open));
        }
    }
    insert_new(&mut tx, work_order).await?;
    append_history_and_outbox(&mut tx, work_order, WorkOrderEventKind::Created, "system", "").await?;
    tx.commit().await?;
    count(WorkOrderEventKind::Created);
    Ok(Placement::Created(work_order.clone()))
}

/// States in which a work order is still being worked on.
const OPEN_STATES: [WorkOrderState; 5] = [
    WorkOrderState::New,
    WorkOrderState::Assigned,
    WorkOrderState::InProgress,
    WorkOrderState::PendingCustomer,
    WorkOrderState::Reopened,
];

async fn insert_new(tx: &mut Transaction<'_, Postgres>, work_order: &WorkOrder) -> Result<(), StoreError> {
    let poster = work_order.poster.clone().unwrap_or_default();
    let now = to_time(&work_order.created_at).unwrap_or_else(Utc::now);
    sqlx::query(&format!(
        "INSERT INTO work_orders ({COLUMNS}) VALUES \
         ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18,$19,$20,$21,$22,$23,$24,$25,$26)"
    ))
    .bind(parse_uuid(&work_order.work_order_id)?)
    .bind(&work_order.tenant)
    .bind(parse_uuid(&work_order.complaint_id)?)
    .bind(work_order.state as i16)
    .bind(work_order.version)
    .bind(&work_order.team)
    .bind(&work_order.assignee)
    .bind(&work_order.category)
    .bind(work_order.priority as i16)
    .bind(work_order.intent as i16)
    .bind(work_order.channel as i16)
    .bind(&work_order.channel_message_id)
    .bind(&poster.poster_id)
    .bind(&poster.display_name)
    .bind(poster.followers)
    .bind(poster.verified)
    .bind(&work_order.summary)
    .bind(&work_order.thread_id)
    .bind(&work_order.locale)
    .bind(work_order.needs_private_channel)
    .bind(now)
    .bind(to_time(&work_order.updated_at).unwrap_or(now))
    .bind(to_time(&work_order.first_response_due).unwrap_or(now))
    .bind(to_time(&work_order.resolution_due).unwrap_or(now))
    .bind(to_time(&work_order.resolved_at))
    .bind(&work_order.resolution_note)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub async fn get(pool: &PgPool, tenant: &str, work_order_id: &str) -> Result<WorkOrder, StoreError> {
    let row = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM work_orders WHERE tenant = $1 AND work_order_id = $2"
    ))
    .bind(tenant)
    .bind(parse_uuid(work_order_id)?)
    .fetch_optional(pool)
    .await?
    .ok_or(StoreError::NotFound)?;
    Ok(from_row(&row)?)
}

/// The work order handling a complaint: the one it opened, or the one it was attached to.
pub async fn get_by_complaint(
    pool: &PgPool,
    tenant: &str,
    complaint_id: &str,
) -> Result<WorkOrder, StoreError> {
    let row = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM work_orders WHERE tenant = $1 AND (complaint_id = $2 OR work_order_id = \
           (SELECT work_order_id FROM complaint_links WHERE tenant = $1 AND complaint_id = $2)) LIMIT 1"
    ))
    .bind(tenant)
    .bind(parse_uuid(complaint_id)?)
    .fetch_optional(pool)
    .await?
    .ok_or(StoreError::NotFound)?;
    Ok(from_row(&row)?)
}

/// Filters of a listing; `None` does not filter.
#[derive(Debug, Default, Clone)]
pub struct ListFilter {
    pub state: Option<WorkOrderState>,
    pub team: Option<String>,
    pub assignee: Option<String>,
    pub priority: Option<Priority>,
    pub category: Option<String>,
    pub created_after: Option<DateTime<Utc>>,
    pub created_before: Option<DateTime<Utc>>,
}

/// Where the previous page ended: newest first, so the next page starts below this key.
fn encode_page_token(created_at: DateTime<Utc>, id: Uuid) -> String {
    grpc::encode_page_token(&format!("{}:{}", created_at.timestamp_micros(), id))
}

fn decode_page_token(token: &str) -> Result<(DateTime<Utc>, Uuid), StoreError> {
    let position = grpc::decode_page_token(token).ok_or(StoreError::BadPageToken)?;
    let (micros, id) = position.split_once(':').ok_or(StoreError::BadPageToken)?;
    let micros: i64 = micros.parse().map_err(|_| StoreError::BadPageToken)?;
    let at = DateTime::from_timestamp_micros(micros).ok_or(StoreError::BadPageToken)?;
    Ok((at, Uuid::parse_str(id).map_err(|_| StoreError::BadPageToken)?))
}

/// One page of a tenant's work orders, newest first, and the token of the next page.
pub async fn list(
    pool: &PgPool,
    tenant: &str,
    filter: &ListFilter,
    page_size: u32,
    page_token: &str,
) -> Result<(Vec<WorkOrder>, String), StoreError> {
    let after = if page_token.is_empty() {
        None
    } else {
        Some(decode_page_token(page_token)?)
    };
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM work_orders WHERE tenant = $1 \
           AND ($2::smallint IS NULL OR state = $2) \
           AND ($3::text IS NULL OR team = $3) \
           AND ($4::text IS NULL OR assignee = $4) \
           AND ($5::smallint IS NULL OR priority = $5) \
           AND ($6::text IS NULL OR category = $6) \
           AND ($7::timestamptz IS NULL OR created_at >= $7) \
           AND ($8::timestamptz IS NULL OR created_at < $8) \
           AND ($9::timestamptz IS NULL OR (created_at, work_order_id) < ($9, $10)) \
         ORDER BY created_at DESC, work_order_id DESC LIMIT $11"
    ))
    .bind(tenant)
    .bind(filter.state.map(|s| s as i16))
    .bind(&filter.team)
    .bind(&filter.assignee)
    .bind(filter.priority.map(|p| p as i16))
    .bind(&filter.category)
    .bind(filter.created_after)
    .bind(filter.created_before)
    .bind(after.map(|(at, _)| at))
    .bind(after.map(|(_, id)| id))
    .bind(i64::from(page_size) + 1)
    .fetch_all(pool)
    .await?;
    let mut work_orders = rows.iter().map(from_row).collect::<Result<Vec<_>, _>>()?;
    let next = if work_orders.len() > page_size as usize {
        work_orders.truncate(page_size as usize);
        let last = &rows[page_size as usize - 1];
        encode_page_token(last.try_get("created_at")?, last.try_get("work_order_id")?)
    } else {
        String::new()
    };
    Ok((work_orders, next))
}

/// A change requested through the API.
pub struct Change<'a> {
    pub action: Action,
    /// 0: apply at whatever version; otherwise only at this version.
    pub expected_version: i64,
    pub actor: &'a str,
    pub note: &'a str,
}

/// Applies a lifecycle action under a row lock: checks version and transition, bumps the
/// version, lets `edit` adjust fields, and records history and the event.
pub async fn apply(
    pool: &PgPool,
    tenant: &str,
    work_order_id: &str,
    change: Change<'_>,
    edit: impl FnOnce(&mut WorkOrder),
) -> Result<WorkOrder, StoreError> {
    let id = parse_uuid(work_order_id)?;
    let mut tx = pool.begin().await?;
    let row = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM work_orders WHERE tenant = $1 AND work_order_id = $2 FOR UPDATE"
    ))
    .bind(tenant)
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(StoreError::NotFound)?;
    let mut work_order = from_row(&row)?;
    if change.expected_version != 0 && change.expected_version != work_order.version {
        return Err(StoreError::VersionConflict {
            expected: change.expected_version,
            actual: work_order.version,
        });
    }
    let next = lifecycle::next_state(work_order.state(), change.action)?;
    let now = Utc::now();
    work_order.set_state(next);
    work_order.version += 1;
    work_order.updated_at = ts(now);
    if change.action == Action::Resolve {
        work_order.resolved_at = ts(now);
        work_order.resolution_note = change.note.to_owned();
    }
    edit(&mut work_order);
    sqlx::query(
        "UPDATE work_orders SET state = $2, version = $3, updated_at = $4, resolved_at = $5, resolution_note = $6, \
         team = $7, assignee = $8, priority = $9 WHERE work_order_id = $1",
    )
    .bind(id)
    .bind(work_order.state as i16)
    .bind(work_order.version)
    .bind(now)
    .bind(to_time(&work_order.resolved_at))
    .bind(&work_order.resolution_note)
    .bind(&work_order.team)
    .bind(&work_order.assignee)
    .bind(work_order.priority as i16)
    .execute(&mut *tx)
    .await?;
    append_history_and_outbox(
        &mut tx,
        &work_order,
        change.action.event_kind(),
        change.actor,
        change.note,
    )
    .await?;
    tx.commit().await?;
    count(change.action.event_kind());
    Ok(work_order)
}

/// Builds a new work order for a classified complaint (pure; the caller stores it).
pub fn new_work_order(
    complaint: &closedloop_proto::v1::Complaint,
    classification: &closedloop_proto::v1::Classification,
    team: &str,
    due: (DateTime<Utc>, DateTime<Utc>),
    now: DateTime<Utc>,
) -> WorkOrder {
    WorkOrder {
        work_order_id: ids::derive("workorder", &[&complaint.tenant, &complaint.complaint_id]).to_string(),
        tenant: complaint.tenant.clone(),
        complaint_id: complaint.complaint_id.clone(),
        state: WorkOrderState::New as i32,
        version: 1,
        team: team.to_owned(),
        assignee: String::new(),
        category: classification.category.clone(),
        priority: classification.priority,
        intent: classification.intent,
        channel: Channel::try_from(complaint.channel).unwrap_or_default() as i32,
        channel_message_id: complaint.channel_message_id.clone(),
        poster: complaint.poster.clone(),
        summary: classification.masked_text.clone(),
        created_at: ts(now),
        updated_at: ts(now),
        first_response_due: ts(due.0),
        resolution_due: ts(due.1),
        resolved_at: None,
        resolution_note: String::new(),
        thread_id: complaint.thread_id.clone(),
        locale: complaint.locale.clone(),
        needs_private_channel: classification.needs_private_channel,
    }
}

/// Whether a classified contact needs a person at all.
pub fn needs_work_order(intent: Intent) -> bool {
    matches!(intent, Intent::Complaint | Intent::Inquiry | Intent::Unspecified)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        let at = DateTime::from_timestamp_micros(1_700_000_000_123_456).expect("valid");
        let id = Uuid::from_u128(42);
        let token = encode_page_token(at, id);
        let (back_at, back_id) = decode_page_token(&token).expect("round trip");
        assert_eq!((back_at, back_id), (at, id));
        assert!(matches!(
            decode_page_token("not base64!"),
            Err(StoreError::BadPageToken)
        ));
        assert!(matches!(
            decode_page_token("bm9wZQ"),
            Err(StoreError::BadPageToken)
        ));
    }
}
