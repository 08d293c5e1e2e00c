//! What the API reads: one work order, a complaint's work order, a timeline, a page of a
//! listing; from the hot tables, falling back to the archive.

use chrono::{DateTime, Utc};
use closedloop_proto::v1::{HistoryEntry, Priority, SlaState, WorkOrderState};

use crate::work_order::WorkOrder;
use closedloop_runtime::bus::work_order_event_kind;
use closedloop_runtime::db;
use sqlx::{PgPool, Postgres, Row};
use uuid::Uuid;

use super::{COLUMNS, StoreError, from_row, parse_uuid, ts};

pub use closedloop_runtime::db::Tier;

/// Dispatch's tables in each [`Tier`].
trait Tables {
    fn work_orders(self) -> &'static str;
    fn history(self) -> &'static str;
    fn links(self) -> &'static str;
    /// The work order columns and whether the row is archived, as [`from_row`] reads them.
    fn select(self) -> String;
}

impl Tables for Tier {
    fn work_orders(self) -> &'static str {
        self.table("work_orders", "work_orders_archive")
    }

    fn history(self) -> &'static str {
        self.table("work_order_history", "work_order_history_archive")
    }

    fn links(self) -> &'static str {
        self.table("complaint_links", "complaint_links_archive")
    }

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

/// How a read finds one work order.
#[derive(Debug, Clone, Copy)]
pub enum Lookup {
    /// By its id.
    WorkOrder(Uuid),
    /// The work order handling a complaint: the one it opened, or the one it was attached to.
    Complaint(Uuid),
}

impl Lookup {
    /// A work order id as the API takes it; one that is not a UUID names no work order.
    pub fn work_order(id: &str) -> Result<Self, StoreError> {
        parse_uuid(id).map(Lookup::WorkOrder)
    }

    pub fn complaint(id: &str) -> Result<Self, StoreError> {
        parse_uuid(id).map(Lookup::Complaint)
    }
}

/// One of the tenant's work orders, found by `lookup` in `tier`.
pub fn push_get<'a>(
    query: &mut sqlx::QueryBuilder<'a, Postgres>,
    tier: Tier,
    tenant: &'a str,
    lookup: Lookup,
) {
    match lookup {
        Lookup::WorkOrder(id) => {
            query
                .push(format!("{} WHERE tenant = ", tier.select()))
                .push_bind(tenant)
                .push(" AND work_order_id = ")
                .push_bind(id);
        }
        // Two index lookups in one statement, rather than an OR the planner may not split.
        Lookup::Complaint(id) => {
            query
                .push(format!("({} WHERE tenant = ", tier.select()))
                .push_bind(tenant)
                .push(" AND complaint_id = ")
                .push_bind(id)
                .push(format!(
                    ") UNION ALL ({} WHERE work_order_id = (SELECT work_order_id FROM {} WHERE tenant = ",
                    tier.select(),
                    tier.links()
                ))
                .push_bind(tenant)
                .push(" AND complaint_id = ")
                .push_bind(id)
                .push(")) LIMIT 1");
        }
    }
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
    for tier in Tier::BOTH {
        let mut query = sqlx::QueryBuilder::<'a, Postgres>::new("");
        push(&mut query, tier);
        if let Some(row) = query.build().fetch_optional(pool).await? {
            return Ok(Some(row));
        }
    }
    Ok(None)
}

/// One of the tenant's work orders, hot or archived.
pub async fn get(pool: &PgPool, tenant: &str, lookup: Lookup) -> Result<WorkOrder, StoreError> {
    let row = hot_then_archive(pool, |query, tier| push_get(query, tier, tenant, lookup))
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

/// Keyset pagination on `(created_at, work_order_id)`, which every listing index ends with.
impl db::Listing for ListFilter {
    type Item = WorkOrder;
    type Position = (DateTime<Utc>, Uuid);
    type Error = StoreError;
    const KEY: &'static str = "(created_at, work_order_id)";
    const ORDER_BY: &'static str = "created_at DESC, work_order_id DESC";

    fn include_archived(&self) -> bool {
        self.include_archived
    }

    fn select(tier: Tier) -> String {
        tier.select()
    }

    fn push_filters<'a>(&'a self, query: &mut sqlx::QueryBuilder<'a, Postgres>) {
        db::and_eq(query, "state", self.state.map(|state| state as i16));
        db::and_eq(query, "team", self.team.as_ref());
        db::and_eq(query, "assignee", self.assignee.as_ref());
        db::and_eq(query, "priority", self.priority.map(|priority| priority as i16));
        db::and_eq(query, "category", self.category.as_ref());
        if let Some(after) = self.created_after {
            query.push(" AND created_at >= ").push_bind(after);
        }
        if let Some(before) = self.created_before {
            query.push(" AND created_at < ").push_bind(before);
        }
        db::and_eq(query, "sla_state", self.sla_state.map(|sla| sla as i16));
    }

    fn push_position(query: &mut sqlx::QueryBuilder<'_, Postgres>, (at, id): Self::Position) {
        query.push("(").push_bind(at).push(", ").push_bind(id).push(")");
    }

    fn item(row: &sqlx::postgres::PgRow) -> Result<WorkOrder, StoreError> {
        Ok(from_row(row)?)
    }

    fn position(row: &sqlx::postgres::PgRow) -> Result<Self::Position, sqlx::Error> {
        Ok((row.try_get("created_at")?, row.try_get("work_order_id")?))
    }

    fn encode((created_at, id): Self::Position) -> String {
        format!("{}:{}", created_at.timestamp_micros(), id)
    }

    fn decode(text: &str) -> Option<Self::Position> {
        let (micros, id) = text.split_once(':')?;
        let at = DateTime::from_timestamp_micros(micros.parse().ok()?)?;
        Some((at, Uuid::parse_str(id).ok()?))
    }
}

/// The audit timeline of one of the tenant's work orders, oldest first.
pub async fn history(
    pool: &PgPool,
    tenant: &str,
    work_order_id: &str,
) -> Result<Vec<HistoryEntry>, StoreError> {
    let id = parse_uuid(work_order_id)?;
    let mut rows = Vec::new();
    for tier in Tier::BOTH {
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

#[cfg(test)]
mod tests {
    use closedloop_runtime::db::Listing as _;

    use super::*;

    #[test]
    fn listing_positions_round_trip_and_reject_garbage() {
        let at = DateTime::from_timestamp_micros(1_700_000_000_123_456).expect("valid");
        let id = Uuid::from_u128(42);
        let position = ListFilter::encode((at, id));
        assert_eq!(ListFilter::decode(&position), Some((at, id)));
        for garbage in [
            "",
            "nope",
            "12:not-a-uuid",
            "x:00000000-0000-0000-0000-00000000002a",
        ] {
            assert_eq!(ListFilter::decode(garbage), None, "{garbage}");
        }
    }

    #[test]
    fn listing_conditions_are_only_the_filters_given() {
        let sql = |filter: &ListFilter| {
            let mut query = sqlx::QueryBuilder::new("");
            db::push_listing(&mut query, filter, Tier::Hot, "acme", None, 51);
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
        db::push_listing(&mut next_page, &unfiltered, Tier::Hot, "acme", after, 51);
        let next_page = next_page.into_sql();
        assert!(
            next_page.contains("AND (created_at, work_order_id) < ($2, $3)"),
            "{next_page}"
        );
    }
}
