//! The delivery log in PostgreSQL.

use chrono::{DateTime, Utc};
use closedloop_proto::v1::{Delivery, DeliveryState, NotificationKind};
use closedloop_runtime::db::{self, Tier};
use closedloop_runtime::{grpc, time};
use sqlx::{PgPool, Postgres, Row};
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid page token: {0}")]
    BadPageToken(#[from] grpc::ForeignPageToken),
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
           work_order_id, body, attempts, last_error, created_at, delivered_at, receipt) \
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::int2[], $4::int2[], $5::int2[], $6::text[], \
           $7::text[], $8::text[], $9::text[], $10::int4[], $11::text[], $12::timestamptz[], $13::timestamptz[], \
           $15::text[]) \
         ON CONFLICT (delivery_id) DO UPDATE SET state = EXCLUDED.state, attempts = EXCLUDED.attempts, \
           last_error = EXCLUDED.last_error, delivered_at = EXCLUDED.delivered_at, receipt = EXCLUDED.receipt \
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
    .bind(text(|d| &d.receipt))
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
        tenant, recipient, complaint_id, work_order_id, body, attempts, last_error, receipt;
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

/// Keyset pagination on `seq`.
impl db::Listing for ListFilter {
    type Item = Delivery;
    type Position = i64;
    type Error = StoreError;
    const KEY: &'static str = "seq";
    const ORDER_BY: &'static str = "seq DESC";

    fn include_archived(&self) -> bool {
        self.include_archived
    }

    fn select(tier: Tier) -> String {
        format!("SELECT * FROM {}", tier.table("deliveries", "deliveries_archive"))
    }

    fn push_filters<'a>(&'a self, query: &mut sqlx::QueryBuilder<'a, Postgres>) {
        db::and_eq(query, "complaint_id", self.complaint_id.as_ref());
        db::and_eq(query, "work_order_id", self.work_order_id.as_ref());
        db::and_eq(query, "recipient", self.recipient.as_ref());
        db::and_eq(query, "kind", self.kind.map(|kind| kind as i16));
        db::and_eq(query, "state", self.state.map(|state| state as i16));
    }

    fn push_position(query: &mut sqlx::QueryBuilder<'_, Postgres>, seq: i64) {
        query.push_bind(seq);
    }

    fn item(row: &sqlx::postgres::PgRow) -> Result<Delivery, StoreError> {
        Ok(from_row(row)?)
    }

    fn position(row: &sqlx::postgres::PgRow) -> Result<i64, sqlx::Error> {
        row.try_get("seq")
    }

    fn encode(seq: i64) -> String {
        seq.to_string()
    }

    fn decode(text: &str) -> Option<i64> {
        text.parse().ok()
    }
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
        db::push_listing(&mut query, &by_work_order, Tier::Hot, "acme", Some(99), 51);
        let sql = query.into_sql();
        assert!(
            sql.ends_with("WHERE tenant = $1 AND work_order_id = $2 AND seq < $3 ORDER BY seq DESC LIMIT $4"),
            "{sql}"
        );
    }
}
