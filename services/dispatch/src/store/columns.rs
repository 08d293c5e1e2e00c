//! Work orders as one array per column: any number of them inserted or updated by one
//! statement.

use crate::work_order::WorkOrder;
use chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::{COLUMNS, StoreError, parse_uuid};

/// A new work order with the SLA risk points that are kept beside it.
#[derive(Debug, Clone, PartialEq)]
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
        let incident = wo.incident_id.as_deref().map(parse_uuid).transpose()?;
        let remedy = wo.remedy.clone().unwrap_or_default();
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
        self.poster_id.push(wo.poster.poster_id.clone());
        self.poster_name.push(wo.poster.display_name.clone());
        self.poster_followers.push(wo.poster.followers);
        self.poster_verified.push(wo.poster.verified);
        self.summary.push(wo.summary.clone());
        self.thread_id.push(wo.thread_id.clone());
        self.locale.push(wo.locale.clone());
        self.needs_private_channel.push(wo.needs_private_channel);
        self.created_at.push(wo.created_at);
        self.updated_at.push(wo.updated_at);
        self.first_response_due.push(wo.first_response_due);
        self.resolution_due.push(wo.resolution_due);
        self.resolved_at.push(wo.resolved_at);
        self.resolution_note.push(wo.resolution_note.clone());
        self.province.push(wo.province.clone());
        self.city.push(wo.city.clone());
        self.influence_tier.push(wo.influence_tier as i16);
        self.skill.push(wo.skill.clone());
        self.sla_state.push(wo.sla_state as i16);
        self.first_responded_at.push(wo.first_responded_at);
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
