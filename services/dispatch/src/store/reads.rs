//! What the API reads: one work order, a complaint's work order, a timeline, a page of a
//! listing; from the hot tables, falling back to the archive.

use chrono::{DateTime, Utc};
use closedloop_proto::v1::{HistoryEntry, Priority, SlaState, WorkOrder, WorkOrderState};
use closedloop_runtime::bus::work_order_event_kind;
use closedloop_runtime::{db, grpc};
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
    let scope = grpc::PageScope::of(tenant, filter);
    let after = scope
        .open(page_token)
        .map_err(|_| StoreError::BadPageToken)?
        .map(|position| parse_listing_position(&position))
        .transpose()?;
    let limit = i64::from(page_size) + 1;
    let mut query = sqlx::QueryBuilder::new("");
    db::push_tiers(
        &mut query,
        filter.include_archived,
        "created_at DESC, work_order_id DESC",
        limit,
        |query, tier| push_listing(query, tier, tenant, filter, after, limit),
    );
    let rows = query.build().fetch_all(pool).await?;
    let mut work_orders = rows.iter().map(from_row).collect::<Result<Vec<_>, _>>()?;
    let next = db::next_page(&mut work_orders, &rows, page_size, &scope, |last| {
        Ok(listing_position(
            last.try_get("created_at")?,
            last.try_get("work_order_id")?,
        ))
    })?;
    Ok((work_orders, next))
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
    use super::*;

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
}
