//! The delivery log in PostgreSQL.

use chrono::{DateTime, Utc};
use closedloop_proto::v1::{Delivery, DeliveryState, NotificationKind};
use closedloop_runtime::db::{self, Tier};
use closedloop_runtime::{grpc, time};
use sqlx::{PgPool, Postgres, Row};
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid page token")]
    BadPageToken,
    #[error("not a delivery id: {0}")]
    BadId(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// Each delivery once, as its latest word has it: of several outcomes of one delivery in a
/// batch, a delivery beats a failure and otherwise the later one wins (PostgreSQL cannot
/// change one row twice in a statement).
pub fn latest_per_delivery(outcomes: &[Delivery]) -> Vec<&Delivery> {
    let mut chosen: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (index, delivery) in outcomes.iter().enumerate() {
        chosen
            .entry(delivery.delivery_id.as_str())
            .and_modify(|kept| {
                if outcomes[*kept].state() != DeliveryState::Delivered {
                    *kept = index;
                }
            })
            .or_insert(index);
    }
    let mut indexes: Vec<usize> = chosen.into_values().collect();
    indexes.sort_unstable();
    indexes.into_iter().map(|i| &outcomes[i]).collect()
}

/// Logs finished deliveries (delivered or refused), one statement for the batch. A delivery
/// already logged as delivered stays so; anything else takes the newer word.
pub async fn log_outcomes(pool: &PgPool, outcomes: &[Delivery]) -> Result<(), StoreError> {
    let outcomes = latest_per_delivery(outcomes);
    let ids = outcomes
        .iter()
        .map(|d| Uuid::parse_str(&d.delivery_id).map_err(|_| StoreError::BadId(d.delivery_id.clone())))
        .collect::<Result<Vec<Uuid>, _>>()?;
    let text = |f: fn(&Delivery) -> &str| outcomes.iter().map(|d| f(d).to_owned()).collect::<Vec<String>>();
    let small = |f: fn(&Delivery) -> i32| outcomes.iter().map(|d| f(d) as i16).collect::<Vec<i16>>();
    let created: Vec<DateTime<Utc>> = outcomes
        .iter()
        .map(|d| {
            d.created_at
                .as_ref()
                .and_then(time::from_timestamp)
                .unwrap_or_else(Utc::now)
        })
        .collect();
    let delivered: Vec<Option<DateTime<Utc>>> = outcomes
        .iter()
        .map(|d| d.delivered_at.as_ref().and_then(time::from_timestamp))
        .collect();
    let attempts: Vec<i32> = outcomes.iter().map(|d| d.attempts).collect();
    sqlx::query(
        "INSERT INTO deliveries (delivery_id, tenant, kind, state, channel, recipient, complaint_id, \
           work_order_id, body, attempts, last_error, created_at, delivered_at) \
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::int2[], $4::int2[], $5::int2[], $6::text[], \
           $7::text[], $8::text[], $9::text[], $10::int4[], $11::text[], $12::timestamptz[], $13::timestamptz[]) \
         ON CONFLICT (delivery_id) DO UPDATE SET state = EXCLUDED.state, attempts = EXCLUDED.attempts, \
           last_error = EXCLUDED.last_error, delivered_at = EXCLUDED.delivered_at \
         WHERE deliveries.state <> $14",
    )
    .bind(&ids)
    .bind(text(|d| &d.tenant))
    .bind(small(|d| d.kind))
    .bind(small(|d| d.state))
    .bind(small(|d| d.channel))
    .bind(text(|d| &d.recipient))
    .bind(text(|d| &d.complaint_id))
    .bind(text(|d| &d.work_order_id))
    .bind(text(|d| &d.body))
    .bind(&attempts)
    .bind(text(|d| &d.last_error))
    .bind(&created)
    .bind(&delivered)
    .bind(DeliveryState::Delivered as i16)
    .execute(pool)
    .await?;
    Ok(())
}

fn from_row(row: &sqlx::postgres::PgRow) -> Result<Delivery, sqlx::Error> {
    let kind: i16 = row.try_get("kind")?;
    let state: i16 = row.try_get("state")?;
    let channel: i16 = row.try_get("channel")?;
    let created_at: DateTime<Utc> = row.try_get("created_at")?;
    let delivered_at: Option<DateTime<Utc>> = row.try_get("delivered_at")?;
    Ok(closedloop_runtime::from_columns![Delivery; row;
        tenant, recipient, complaint_id, work_order_id, body, attempts, last_error;
        delivery_id: row.try_get::<Uuid, _>("delivery_id")?.to_string(),
        kind: i32::from(kind),
        state: i32::from(state),
        channel: i32::from(channel),
        created_at: Some(time::to_timestamp(created_at)),
        delivered_at: delivered_at.map(time::to_timestamp),
    ])
}

/// Filters of a listing; `None` does not filter.
#[derive(Debug, Default)]
pub struct ListFilter {
    pub complaint_id: Option<String>,
    pub work_order_id: Option<String>,
    pub recipient: Option<String>,
    pub kind: Option<NotificationKind>,
    pub state: Option<DeliveryState>,
    /// Archived entries too.
    pub include_archived: bool,
}

/// The listing query, newest first: only the filters given become conditions, so each
/// combination gets a plan that uses the index fitting it. Keyset pagination on `seq`.
/// Pushed onto a builder the caller starts, so that it can also run under `EXPLAIN`.
/// `archive` reads the archive table instead of the hot one.
pub fn push_listing<'a>(
    query: &mut sqlx::QueryBuilder<'a, Postgres>,
    tier: Tier,
    tenant: &'a str,
    filter: &'a ListFilter,
    before: Option<i64>,
    limit: i64,
) {
    let table = tier.table("deliveries", "deliveries_archive");
    query
        .push(format!("SELECT * FROM {table} WHERE tenant = "))
        .push_bind(tenant);
    if let Some(complaint_id) = &filter.complaint_id {
        query.push(" AND complaint_id = ").push_bind(complaint_id);
    }
    if let Some(work_order_id) = &filter.work_order_id {
        query.push(" AND work_order_id = ").push_bind(work_order_id);
    }
    if let Some(recipient) = &filter.recipient {
        query.push(" AND recipient = ").push_bind(recipient);
    }
    if let Some(kind) = filter.kind {
        query.push(" AND kind = ").push_bind(kind as i16);
    }
    if let Some(state) = filter.state {
        query.push(" AND state = ").push_bind(state as i16);
    }
    if let Some(before) = before {
        query.push(" AND seq < ").push_bind(before);
    }
    query.push(" ORDER BY seq DESC LIMIT ").push_bind(limit);
}

/// One page of a tenant's deliveries, newest first, and the token of the next page (bound
/// to this tenant and these filters).
pub async fn list(
    pool: &PgPool,
    tenant: &str,
    filter: &ListFilter,
    page_size: u32,
    page_token: &str,
) -> Result<(Vec<Delivery>, String), StoreError> {
    let scope = grpc::PageScope::of(tenant, filter);
    let before = scope
        .open(page_token)
        .map_err(|_| StoreError::BadPageToken)?
        .map(|position| position.parse::<i64>().map_err(|_| StoreError::BadPageToken))
        .transpose()?;
    let limit = i64::from(page_size) + 1;
    let mut query = sqlx::QueryBuilder::new("");
    db::push_tiers(
        &mut query,
        filter.include_archived,
        "seq DESC",
        limit,
        |query, tier| push_listing(query, tier, tenant, filter, before, limit),
    );
    let rows = query.build().fetch_all(pool).await?;
    let mut deliveries = rows.iter().map(from_row).collect::<Result<Vec<_>, _>>()?;
    let next = db::next_page(&mut deliveries, &rows, page_size, &scope, |last| {
        Ok(last.try_get::<i64, _>("seq")?.to_string())
    })?;
    Ok((deliveries, next))
}

/// Moves up to `limit` delivery log entries written before `cutoff` to the archive, in one
/// transaction; returns how many moved.
pub async fn move_old(pool: PgPool, cutoff: DateTime<Utc>, limit: i64) -> Result<u64, sqlx::Error> {
    let moved: i64 = sqlx::query_scalar(
        "WITH picked AS (SELECT delivery_id FROM deliveries WHERE created_at < $1 ORDER BY created_at \
                         LIMIT $2 FOR UPDATE SKIP LOCKED), \
              moved AS (DELETE FROM deliveries d USING picked p WHERE d.delivery_id = p.delivery_id \
                        RETURNING d.*), \
              kept AS (INSERT INTO deliveries_archive SELECT * FROM moved RETURNING 1) \
         SELECT count(*) FROM kept",
    )
    .bind(cutoff)
    .bind(limit)
    .fetch_one(&pool)
    .await?;
    Ok(u64::try_from(moved).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_logs_each_delivery_once_preferring_delivered() {
        let outcome = |id: &str, state: DeliveryState, attempts: i32| Delivery {
            delivery_id: id.into(),
            state: state as i32,
            attempts,
            ..Default::default()
        };
        let outcomes = [
            outcome("a", DeliveryState::Delivered, 1),
            outcome("b", DeliveryState::Failed, 1),
            outcome("a", DeliveryState::Failed, 2),
            outcome("b", DeliveryState::Delivered, 2),
            outcome("c", DeliveryState::Failed, 1),
        ];
        let kept: Vec<(&str, i32)> = latest_per_delivery(&outcomes)
            .iter()
            .map(|d| (d.delivery_id.as_str(), d.attempts))
            .collect();
        assert_eq!(kept, [("a", 1), ("b", 2), ("c", 1)]);
    }

    #[test]
    fn listing_conditions_are_only_the_filters_given() {
        let by_work_order = ListFilter {
            work_order_id: Some("wo-1".into()),
            ..Default::default()
        };
        let mut query = sqlx::QueryBuilder::new("");
        push_listing(&mut query, Tier::Hot, "acme", &by_work_order, Some(99), 51);
        let sql = query.into_sql();
        assert!(
            sql.ends_with("WHERE tenant = $1 AND work_order_id = $2 AND seq < $3 ORDER BY seq DESC LIMIT $4"),
            "{sql}"
        );
    }
}
