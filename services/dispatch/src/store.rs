//! Work orders in PostgreSQL. Every change writes the work order and its history row, which
//! carries the change's event, in one transaction, so an event exists exactly when its change
//! does.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use closedloop_proto::v1::{
    Channel, HistoryEntry, Incident, Intent, Poster, Priority, Remedy, SlaState, WorkOrder, WorkOrderEvent,
    WorkOrderEventKind, WorkOrderState,
};
use closedloop_runtime::bus::{
    OutgoingEvent, work_order_event_kind, work_order_event_name, work_order_event_topic,
};
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

pub(crate) fn from_row(row: &sqlx::postgres::PgRow) -> Result<WorkOrder, sqlx::Error> {
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
        province: row.try_get("province")?,
        city: row.try_get("city")?,
        influence_tier: i32::from(row.try_get::<i16, _>("influence_tier")?),
        sla_state: i32::from(row.try_get::<i16, _>("sla_state")?),
        incident_id: row
            .try_get::<Option<Uuid>, _>("incident_id")?
            .map(|id| id.to_string())
            .unwrap_or_default(),
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
        first_responded_at: row
            .try_get::<Option<DateTime<Utc>>, _>("first_responded_at")?
            .and_then(ts),
        skill: row.try_get("skill")?,
        // Only the API's reads select it (see [`Tier`]); every other row is hot.
        archived: row.try_get::<bool, _>("archived").unwrap_or(false),
    })
}

pub(crate) fn parse_uuid(id: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(id).map_err(|_| StoreError::NotFound)
}

pub(crate) fn to_time(ts: &Option<prost_types::Timestamp>) -> Option<DateTime<Utc>> {
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
        work_order: Some(work_order.clone()),
        actor: actor.to_owned(),
        note: note.to_owned(),
        occurred_at: work_order.updated_at,
    };
    OutgoingEvent::new(
        work_order_event_topic(kind),
        &work_order.tenant,
        event_id.to_string(),
        &event,
    )
}

/// A committed change, as history row and event: the work order after it.
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
            .map(|c| to_time(&c.work_order.updated_at).unwrap_or_else(Utc::now))
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

/// A new work order with the SLA risk points that are kept beside it.
pub struct NewWorkOrder {
    pub work_order: WorkOrder,
    pub first_response_risk_at: DateTime<Utc>,
    pub resolution_risk_at: DateTime<Utc>,
}

/// Work orders laid out as one array per column, so any number of them is written by one
/// statement whose text never changes: it is parsed once per connection, and planning it
/// does not grow with the batch as a `VALUES` list with a placeholder per field did.
#[derive(Default)]
struct WorkOrderColumns {
    work_order_id: Vec<Uuid>,
    tenant: Vec<String>,
    complaint_id: Vec<Uuid>,
    state: Vec<i16>,
    version: Vec<i64>,
    team: Vec<String>,
    assignee: Vec<String>,
    category: Vec<String>,
    priority: Vec<i16>,
    intent: Vec<i16>,
    channel: Vec<i16>,
    channel_message_id: Vec<String>,
    poster_id: Vec<String>,
    poster_name: Vec<String>,
    poster_followers: Vec<i64>,
    poster_verified: Vec<bool>,
    summary: Vec<String>,
    thread_id: Vec<String>,
    locale: Vec<String>,
    needs_private_channel: Vec<bool>,
    created_at: Vec<DateTime<Utc>>,
    updated_at: Vec<DateTime<Utc>>,
    first_response_due: Vec<DateTime<Utc>>,
    resolution_due: Vec<DateTime<Utc>>,
    resolved_at: Vec<Option<DateTime<Utc>>>,
    resolution_note: Vec<String>,
    province: Vec<String>,
    city: Vec<String>,
    influence_tier: Vec<i16>,
    skill: Vec<String>,
    sla_state: Vec<i16>,
    first_responded_at: Vec<Option<DateTime<Utc>>>,
    incident_id: Vec<Option<Uuid>>,
    remedy_kind: Vec<String>,
    remedy_amount_minor: Vec<i64>,
    remedy_currency: Vec<String>,
    remedy_approved_by: Vec<String>,
    satisfaction: Vec<i16>,
}

/// `unnest` over the binds of [`WorkOrderColumns::bind`], typed, in [`COLUMNS`] order. Its
/// parenthesis is left open for a statement to add arrays of its own.
const COLUMNS_UNNEST: &str = "unnest($1::uuid[], $2::text[], $3::uuid[], $4::int2[], $5::int8[], $6::text[], \
    $7::text[], $8::text[], $9::int2[], $10::int2[], $11::int2[], $12::text[], $13::text[], $14::text[], \
    $15::int8[], $16::bool[], $17::text[], $18::text[], $19::text[], $20::bool[], $21::timestamptz[], \
    $22::timestamptz[], $23::timestamptz[], $24::timestamptz[], $25::timestamptz[], $26::text[], $27::text[], \
    $28::text[], $29::int2[], $30::text[], $31::int2[], $32::timestamptz[], $33::uuid[], $34::text[], \
    $35::int8[], $36::text[], $37::text[], $38::int2[]";

impl WorkOrderColumns {
    fn push(&mut self, wo: &WorkOrder) -> Result<(), StoreError> {
        let incident = if wo.incident_id.is_empty() {
            None
        } else {
            Some(parse_uuid(&wo.incident_id)?)
        };
        let poster = wo.poster.clone().unwrap_or_default();
        let remedy = wo.remedy.clone().unwrap_or_default();
        let created = to_time(&wo.created_at).unwrap_or_else(Utc::now);
        self.work_order_id.push(parse_uuid(&wo.work_order_id)?);
        self.tenant.push(wo.tenant.clone());
        self.complaint_id.push(parse_uuid(&wo.complaint_id)?);
        self.state.push(wo.state as i16);
        self.version.push(wo.version);
        self.team.push(wo.team.clone());
        self.assignee.push(wo.assignee.clone());
        self.category.push(wo.category.clone());
        self.priority.push(wo.priority as i16);
        self.intent.push(wo.intent as i16);
        self.channel.push(wo.channel as i16);
        self.channel_message_id.push(wo.channel_message_id.clone());
        self.poster_id.push(poster.poster_id);
        self.poster_name.push(poster.display_name);
        self.poster_followers.push(poster.followers);
        self.poster_verified.push(poster.verified);
        self.summary.push(wo.summary.clone());
        self.thread_id.push(wo.thread_id.clone());
        self.locale.push(wo.locale.clone());
        self.needs_private_channel.push(wo.needs_private_channel);
        self.created_at.push(created);
        self.updated_at.push(to_time(&wo.updated_at).unwrap_or(created));
        self.first_response_due
            .push(to_time(&wo.first_response_due).unwrap_or(created));
        self.resolution_due
            .push(to_time(&wo.resolution_due).unwrap_or(created));
        self.resolved_at.push(to_time(&wo.resolved_at));
        self.resolution_note.push(wo.resolution_note.clone());
        self.province.push(wo.province.clone());
        self.city.push(wo.city.clone());
        self.influence_tier.push(wo.influence_tier as i16);
        self.skill.push(wo.skill.clone());
        self.sla_state.push(wo.sla_state as i16);
        self.first_responded_at.push(to_time(&wo.first_responded_at));
        self.incident_id.push(incident);
        self.remedy_kind.push(remedy.kind);
        self.remedy_amount_minor.push(remedy.amount_minor);
        self.remedy_currency.push(remedy.currency);
        self.remedy_approved_by.push(remedy.approved_by);
        self.satisfaction.push(wo.satisfaction as i16);
        Ok(())
    }

    /// Binds the columns as `$1..=$38`, as [`COLUMNS_UNNEST`] reads them.
    fn bind(
        self,
        query: sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(self.work_order_id)
            .bind(self.tenant)
            .bind(self.complaint_id)
            .bind(self.state)
            .bind(self.version)
            .bind(self.team)
            .bind(self.assignee)
            .bind(self.category)
            .bind(self.priority)
            .bind(self.intent)
            .bind(self.channel)
            .bind(self.channel_message_id)
            .bind(self.poster_id)
            .bind(self.poster_name)
            .bind(self.poster_followers)
            .bind(self.poster_verified)
            .bind(self.summary)
            .bind(self.thread_id)
            .bind(self.locale)
            .bind(self.needs_private_channel)
            .bind(self.created_at)
            .bind(self.updated_at)
            .bind(self.first_response_due)
            .bind(self.resolution_due)
            .bind(self.resolved_at)
            .bind(self.resolution_note)
            .bind(self.province)
            .bind(self.city)
            .bind(self.influence_tier)
            .bind(self.skill)
            .bind(self.sla_state)
            .bind(self.first_responded_at)
            .bind(self.incident_id)
            .bind(self.remedy_kind)
            .bind(self.remedy_amount_minor)
            .bind(self.remedy_currency)
            .bind(self.remedy_approved_by)
            .bind(self.satisfaction)
    }
}

/// Inserts new work orders in one statement.
pub async fn insert_work_orders(
    tx: &mut Transaction<'_, Postgres>,
    rows: &[NewWorkOrder],
) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut columns = WorkOrderColumns::default();
    let mut first_response_risk_at = Vec::with_capacity(rows.len());
    let mut resolution_risk_at = Vec::with_capacity(rows.len());
    for row in rows {
        columns.push(&row.work_order)?;
        first_response_risk_at.push(row.first_response_risk_at);
        resolution_risk_at.push(row.resolution_risk_at);
    }
    let sql = format!(
        "INSERT INTO work_orders ({COLUMNS}, first_response_risk_at, resolution_risk_at) \
         SELECT * FROM {COLUMNS_UNNEST}, $39::timestamptz[], $40::timestamptz[])"
    );
    columns
        .bind(sqlx::query(&sql))
        .bind(first_response_risk_at)
        .bind(resolution_risk_at)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Writes every mutable field of existing work orders, in one statement.
pub async fn update_work_orders<'a>(
    tx: &mut Transaction<'_, Postgres>,
    work_orders: impl IntoIterator<Item = &'a WorkOrder>,
) -> Result<(), StoreError> {
    let mut columns = WorkOrderColumns::default();
    for wo in work_orders {
        columns.push(wo)?;
    }
    if columns.work_order_id.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "UPDATE work_orders w SET state = k.state, version = k.version, updated_at = k.updated_at, \
           resolved_at = k.resolved_at, resolution_note = k.resolution_note, team = k.team, \
           assignee = k.assignee, priority = k.priority, sla_state = k.sla_state, \
           first_responded_at = k.first_responded_at, incident_id = k.incident_id, \
           remedy_kind = k.remedy_kind, remedy_amount_minor = k.remedy_amount_minor, \
           remedy_currency = k.remedy_currency, remedy_approved_by = k.remedy_approved_by, \
           satisfaction = k.satisfaction, skill = k.skill, first_response_due = k.first_response_due, \
           resolution_due = k.resolution_due \
         FROM {COLUMNS_UNNEST}) AS k({COLUMNS}) WHERE w.work_order_id = k.work_order_id"
    );
    columns.bind(sqlx::query(&sql)).execute(&mut **tx).await?;
    Ok(())
}

/// Writes every mutable field of an existing work order.
pub async fn update_work_order(tx: &mut Transaction<'_, Postgres>, wo: &WorkOrder) -> Result<(), StoreError> {
    update_work_orders(tx, [wo]).await
}

/// Where a work order lives: the hot tables the loop writes, or the archive that closed
/// work orders move to at the retention age (`crate::archive`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Hot,
    Archive,
}

impl Tier {
    fn work_orders(self) -> &'static str {
        match self {
            Tier::Hot => "work_orders",
            Tier::Archive => "work_orders_archive",
        }
    }

    fn history(self) -> &'static str {
        match self {
            Tier::Hot => "work_order_history",
            Tier::Archive => "work_order_history_archive",
        }
    }

    fn links(self) -> &'static str {
        match self {
            Tier::Hot => "complaint_links",
            Tier::Archive => "complaint_links_archive",
        }
    }

    /// The work order columns and whether the row is archived, as [`from_row`] reads them.
    fn select(self) -> String {
        let archived = self == Tier::Archive;
        format!(
            "SELECT {COLUMNS}, {archived} AS archived FROM {}",
            self.work_orders()
        )
    }
}

// The API's reads are pushed onto a query builder the caller starts, so that the same
// statement can run as it is or under `EXPLAIN` (bench-api prints their plans).

/// One of the tenant's work orders by id.
pub fn push_get<'a>(
    query: &mut sqlx::QueryBuilder<'a, Postgres>,
    tier: Tier,
    tenant: &'a str,
    work_order_id: Uuid,
) {
    query
        .push(format!("{} WHERE tenant = ", tier.select()))
        .push_bind(tenant)
        .push(" AND work_order_id = ")
        .push_bind(work_order_id);
}

/// The work order handling a complaint: the one it opened, or the one it was attached to.
pub fn push_get_by_complaint<'a>(
    query: &mut sqlx::QueryBuilder<'a, Postgres>,
    tier: Tier,
    tenant: &'a str,
    complaint_id: Uuid,
) {
    // Two index lookups in one statement, rather than an OR the planner may not split.
    query
        .push(format!("({} WHERE tenant = ", tier.select()))
        .push_bind(tenant)
        .push(" AND complaint_id = ")
        .push_bind(complaint_id)
        .push(format!(
            ") UNION ALL ({} WHERE work_order_id = (SELECT work_order_id FROM {} WHERE tenant = ",
            tier.select(),
            tier.links()
        ))
        .push_bind(tenant)
        .push(" AND complaint_id = ")
        .push_bind(complaint_id)
        .push(")) LIMIT 1");
}

/// The audit timeline of one of the tenant's work orders, oldest first.
pub fn push_history<'a>(
    query: &mut sqlx::QueryBuilder<'a, Postgres>,
    tier: Tier,
    tenant: &'a str,
    work_order_id: Uuid,
) {
    query
        .push(format!(
            "SELECT h.version, h.kind, h.actor, h.note, h.occurred_at FROM {} h \
             JOIN {} w USING (work_order_id) WHERE w.tenant = ",
            tier.history(),
            tier.work_orders()
        ))
        .push_bind(tenant)
        .push(" AND h.work_order_id = ")
        .push_bind(work_order_id)
        .push(" ORDER BY h.version");
}

/// The first row `push` finds in the hot tables, else in the archive.
async fn hot_then_archive<'a>(
    pool: &PgPool,
    push: impl Fn(&mut sqlx::QueryBuilder<'a, Postgres>, Tier),
) -> Result<Option<sqlx::postgres::PgRow>, StoreError> {
    for tier in [Tier::Hot, Tier::Archive] {
        let mut query = sqlx::QueryBuilder::<'a, Postgres>::new("");
        push(&mut query, tier);
        if let Some(row) = query.build().fetch_optional(pool).await? {
            return Ok(Some(row));
        }
    }
    Ok(None)
}

/// One of the tenant's work orders, hot or archived.
pub async fn get(pool: &PgPool, tenant: &str, work_order_id: &str) -> Result<WorkOrder, StoreError> {
    let id = parse_uuid(work_order_id)?;
    let row = hot_then_archive(pool, |query, tier| push_get(query, tier, tenant, id))
        .await?
        .ok_or(StoreError::NotFound)?;
    Ok(from_row(&row)?)
}

/// The work order handling a complaint (hot or archived): the one it opened, or the one it
/// was attached to.
pub async fn get_by_complaint(
    pool: &PgPool,
    tenant: &str,
    complaint_id: &str,
) -> Result<WorkOrder, StoreError> {
    let id = parse_uuid(complaint_id)?;
    let row = hot_then_archive(pool, |query, tier| push_get_by_complaint(query, tier, tenant, id))
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
    pub sla_state: Option<SlaState>,
    /// Archived work orders too.
    pub include_archived: bool,
}

impl ListFilter {
    /// What a page token of this listing is bound to, with the caller's tenant.
    fn page_scope(&self, tenant: &str) -> grpc::PageScope {
        grpc::PageScope::new(tenant, &format!("{self:?}"))
    }
}

/// A listing position: newest first, so the next page starts below this key.
fn listing_position(created_at: DateTime<Utc>, id: Uuid) -> String {
    format!("{}:{}", created_at.timestamp_micros(), id)
}

fn parse_listing_position(position: &str) -> Result<(DateTime<Utc>, Uuid), StoreError> {
    let (micros, id) = position.split_once(':').ok_or(StoreError::BadPageToken)?;
    let micros: i64 = micros.parse().map_err(|_| StoreError::BadPageToken)?;
    let at = DateTime::from_timestamp_micros(micros).ok_or(StoreError::BadPageToken)?;
    Ok((at, Uuid::parse_str(id).map_err(|_| StoreError::BadPageToken)?))
}

/// The listing query: only the filters given become conditions, so each combination is its
/// own prepared statement with its own plan (a generic plan over `$n IS NULL OR …` could
/// not pick the index that fits). Keyset pagination on `(created_at, work_order_id)`, which
/// every listing index ends with.
pub fn push_listing<'a>(
    query: &mut sqlx::QueryBuilder<'a, Postgres>,
    tier: Tier,
    tenant: &'a str,
    filter: &'a ListFilter,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) {
    query
        .push(format!("{} WHERE tenant = ", tier.select()))
        .push_bind(tenant);
    if let Some(state) = filter.state {
        query.push(" AND state = ").push_bind(state as i16);
    }
    if let Some(team) = &filter.team {
        query.push(" AND team = ").push_bind(team);
    }
    if let Some(assignee) = &filter.assignee {
        query.push(" AND assignee = ").push_bind(assignee);
    }
    if let Some(priority) = filter.priority {
        query.push(" AND priority = ").push_bind(priority as i16);
    }
    if let Some(category) = &filter.category {
        query.push(" AND category = ").push_bind(category);
    }
    if let Some(after) = filter.created_after {
        query.push(" AND created_at >= ").push_bind(after);
    }
    if let Some(before) = filter.created_before {
        query.push(" AND created_at < ").push_bind(before);
    }
    if let Some(sla_state) = filter.sla_state {
        query.push(" AND sla_state = ").push_bind(sla_state as i16);
    }
    if let Some((at, id)) = after {
        query
            .push(" AND (created_at, work_order_id) < (")
            .push_bind(at)
            .push(", ")
            .push_bind(id)
            .push(")");
    }
    query
        .push(" ORDER BY created_at DESC, work_order_id DESC LIMIT ")
        .push_bind(limit);
}

/// One page of a tenant's work orders, newest first, and the token of the next page (bound
/// to this tenant and these filters).
pub async fn list(
    pool: &PgPool,
    tenant: &str,
    filter: &ListFilter,
    page_size: u32,
    page_token: &str,
) -> Result<(Vec<WorkOrder>, String), StoreError> {
    let scope = filter.page_scope(tenant);
    let after = scope
        .open(page_token)
        .map_err(|_| StoreError::BadPageToken)?
        .map(|position| parse_listing_position(&position))
        .transpose()?;
    let limit = i64::from(page_size) + 1;
    let mut query = sqlx::QueryBuilder::new("");
    if filter.include_archived {
        // Each part walks its own index in listing order; the merge takes the first pages.
        query.push("(");
        push_listing(&mut query, Tier::Hot, tenant, filter, after, limit);
        query.push(") UNION ALL (");
        push_listing(&mut query, Tier::Archive, tenant, filter, after, limit);
        query
            .push(") ORDER BY created_at DESC, work_order_id DESC LIMIT ")
            .push_bind(limit);
    } else {
        push_listing(&mut query, Tier::Hot, tenant, filter, after, limit);
    }
    let rows = query.build().fetch_all(pool).await?;
    let mut work_orders = rows.iter().map(from_row).collect::<Result<Vec<_>, _>>()?;
    let next = if work_orders.len() > page_size as usize {
        work_orders.truncate(page_size as usize);
        let last = &rows[page_size as usize - 1];
        scope.seal(&listing_position(
            last.try_get("created_at")?,
            last.try_get("work_order_id")?,
        ))
    } else {
        String::new()
    };
    Ok((work_orders, next))
}

/// Restarts the SLA clock of a work order (on reopen): new deadlines and risk points.
pub async fn restart_clock(
    tx: &mut Transaction<'_, Postgres>,
    wo: &mut WorkOrder,
    deadlines: &crate::routing::Deadlines,
) -> Result<(), StoreError> {
    wo.first_response_due = ts(deadlines.first_response_due);
    wo.resolution_due = ts(deadlines.resolution_due);
    wo.sla_state = SlaState::OnTrack as i32;
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
    let next = lifecycle::next_state(work_order.state(), change.action)?;
    let now = Utc::now();
    work_order.set_state(next);
    work_order.version += 1;
    work_order.updated_at = ts(now);
    match change.action {
        Action::Resolve => {
            work_order.resolved_at = ts(now);
            work_order.resolution_note = change.note.to_owned();
        }
        Action::Reopen => {
            work_order.resolved_at = None;
            work_order.sla_state = SlaState::OnTrack as i32;
        }
        Action::Accept | Action::Reply if work_order.first_responded_at.is_none() => {
            work_order.first_responded_at = ts(now);
        }
        _ => {}
    }
    edit(work_order);
    update_work_order(tx, work_order).await?;
    let recorded = Recorded::new(work_order, change.action.event_kind(), change.actor, change.note);
    write_events(tx, std::slice::from_ref(&recorded)).await
}

/// [`apply_locked`] in a transaction of its own.
pub async fn apply(
    pool: &PgPool,
    tenant: &str,
    work_order_id: &str,
    change: Change<'_>,
    edit: impl FnOnce(&mut WorkOrder),
) -> Result<WorkOrder, StoreError> {
    let mut tx = pool.begin().await?;
    let mut work_order = lock(&mut tx, tenant, work_order_id).await?;
    apply_locked(&mut tx, &mut work_order, change, edit).await?;
    tx.commit().await?;
    Ok(work_order)
}

/// The audit timeline of one of the tenant's work orders, oldest first.
pub async fn history(
    pool: &PgPool,
    tenant: &str,
    work_order_id: &str,
) -> Result<Vec<HistoryEntry>, StoreError> {
    let id = parse_uuid(work_order_id)?;
    let mut rows = Vec::new();
    for tier in [Tier::Hot, Tier::Archive] {
        let mut query = sqlx::QueryBuilder::new("");
        push_history(&mut query, tier, tenant, id);
        rows = query.build().fetch_all(pool).await?;
        if !rows.is_empty() {
            break;
        }
    }
    if rows.is_empty() {
        return Err(StoreError::NotFound);
    }
    rows.iter()
        .map(|row| {
            let kind: String = row.try_get("kind")?;
            Ok(HistoryEntry {
                version: row.try_get("version")?,
                kind: work_order_event_kind(&kind) as i32,
                actor: row.try_get("actor")?,
                note: row.try_get("note")?,
                occurred_at: ts(row.try_get("occurred_at")?),
            })
        })
        .collect()
}

/// A tenant's incidents, newest first (or one of them).
pub async fn list_incidents(
    pool: &PgPool,
    tenant: &str,
    open_only: bool,
    incident_id: Option<Uuid>,
) -> Result<Vec<Incident>, StoreError> {
    let rows = sqlx::query(
        "SELECT i.incident_id, i.category, i.region, i.summary, i.opened_at, i.resolved_at, \
           (SELECT count(*) FROM work_orders w WHERE w.incident_id = i.incident_id) \
           + (SELECT count(*) FROM work_orders_archive w WHERE w.incident_id = i.incident_id) AS work_orders \
         FROM incidents i WHERE i.tenant = $1 AND (NOT $2 OR i.resolved_at IS NULL) \
           AND ($3::uuid IS NULL OR i.incident_id = $3) ORDER BY i.opened_at DESC LIMIT 500",
    )
    .bind(tenant)
    .bind(open_only)
    .bind(incident_id)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            let resolved_at: Option<DateTime<Utc>> = row.try_get("resolved_at")?;
            Ok(Incident {
                incident_id: row.try_get::<Uuid, _>("incident_id")?.to_string(),
                category: row.try_get("category")?,
                region: row.try_get("region")?,
                open: resolved_at.is_none(),
                work_order_count: row.try_get("work_orders")?,
                summary: row.try_get("summary")?,
                opened_at: ts(row.try_get("opened_at")?),
                resolved_at: resolved_at.and_then(ts),
            })
        })
        .collect()
}

/// Resolves an open incident and every open work order attached to it, in one transaction,
/// so every customer of the incident gets the closure message.
pub async fn resolve_incident(
    pool: &PgPool,
    tenant: &str,
    incident_id: &str,
    actor: &str,
    note: &str,
) -> Result<(Incident, i64), StoreError> {
    let id = parse_uuid(incident_id)?;
    let mut tx = pool.begin().await?;
    let locked = sqlx::query(
        "UPDATE incidents SET resolved_at = now() WHERE tenant = $1 AND incident_id = $2 AND resolved_at IS NULL \
         RETURNING incident_id",
    )
    .bind(tenant)
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    if locked.is_none() {
        return Err(StoreError::NotFound);
    }
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM work_orders WHERE incident_id = $1 AND state IN {OPEN_STATES_SQL} ORDER BY created_at FOR UPDATE"
    ))
    .bind(id)
    .fetch_all(&mut *tx)
    .await?;
    let now = Utc::now();
    let mut changes = Vec::with_capacity(rows.len());
    for row in &rows {
        let mut wo = from_row(row)?;
        wo.set_state(lifecycle::next_state(wo.state(), Action::Resolve)?);
        wo.version += 1;
        wo.updated_at = ts(now);
        wo.resolved_at = ts(now);
        wo.resolution_note = note.to_owned();
        changes.push(Recorded::new(&wo, WorkOrderEventKind::Resolved, actor, note));
    }
    update_work_orders(&mut tx, changes.iter().map(|c| &c.work_order)).await?;
    write_events(&mut tx, &changes).await?;
    tx.commit().await?;
    let incident = list_incidents(pool, tenant, false, Some(id))
        .await?
        .into_iter()
        .next()
        .ok_or(StoreError::NotFound)?;
    Ok((incident, changes.len() as i64))
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
        state: WorkOrderState::New as i32,
        version: 1,
        team: route.team.clone(),
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
        first_response_due: ts(deadlines.first_response_due),
        resolution_due: ts(deadlines.resolution_due),
        resolved_at: None,
        resolution_note: String::new(),
        thread_id: complaint.thread_id.clone(),
        locale: complaint.locale.clone(),
        needs_private_channel: classification.needs_private_channel,
        province: classification.province.clone(),
        city: classification.city.clone(),
        influence_tier: classification.influence_tier,
        sla_state: SlaState::OnTrack as i32,
        incident_id: String::new(),
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

    #[test]
    fn open_states_sql_lists_exactly_the_open_states() {
        let listed: Vec<i32> = (0..16)
            .filter(|n| WorkOrderState::try_from(*n).is_ok_and(crate::lifecycle::is_open))
            .collect();
        let written: Vec<i32> = OPEN_STATES_SQL
            .trim_matches(|c| c == '(' || c == ')')
            .split(", ")
            .map(|n| n.parse().expect("a number"))
            .collect();
        assert_eq!(written, listed);
    }

    #[test]
    fn listing_positions_round_trip_and_reject_garbage() {
        let at = DateTime::from_timestamp_micros(1_700_000_000_123_456).expect("valid");
        let id = Uuid::from_u128(42);
        let position = listing_position(at, id);
        let (back_at, back_id) = parse_listing_position(&position).expect("round trip");
        assert_eq!((back_at, back_id), (at, id));
        for garbage in [
            "",
            "nope",
            "12:not-a-uuid",
            "x:00000000-0000-0000-0000-00000000002a",
        ] {
            assert!(matches!(
                parse_listing_position(garbage),
                Err(StoreError::BadPageToken)
            ));
        }
    }

    #[test]
    fn listing_conditions_are_only_the_filters_given() {
        let sql = |filter: &ListFilter| {
            let mut query = sqlx::QueryBuilder::new("");
            push_listing(&mut query, Tier::Hot, "acme", filter, None, 51);
            query.into_sql()
        };
        let unfiltered = sql(&ListFilter::default());
        assert!(
            unfiltered.ends_with("WHERE tenant = $1 ORDER BY created_at DESC, work_order_id DESC LIMIT $2")
        );
        let by_team_and_state = sql(&ListFilter {
            state: Some(WorkOrderState::Assigned),
            team: Some("network-ops".into()),
            ..Default::default()
        });
        assert!(
            by_team_and_state.contains("WHERE tenant = $1 AND state = $2 AND team = $3 ORDER BY"),
            "{by_team_and_state}"
        );
        let after = Some((Utc::now(), Uuid::from_u128(1)));
        let unfiltered = ListFilter::default();
        let mut next_page = sqlx::QueryBuilder::new("");
        push_listing(&mut next_page, Tier::Hot, "acme", &unfiltered, after, 51);
        let next_page = next_page.into_sql();
        assert!(
            next_page.contains("AND (created_at, work_order_id) < ($2, $3)"),
            "{next_page}"
        );
    }

    #[test]
    fn page_tokens_are_bound_to_tenant_and_filters() {
        let by_team = ListFilter {
            team: Some("network-ops".into()),
            ..Default::default()
        };
        let token = by_team.page_scope("acme").seal("position");
        assert!(by_team.page_scope("acme").open(&token).is_ok());
        assert!(by_team.page_scope("globex").open(&token).is_err());
        assert!(ListFilter::default().page_scope("acme").open(&token).is_err());
    }
}
