//! The delivery log in PostgreSQL.

use chrono::{DateTime, Utc};
use closedloop_proto::v1::{Delivery, DeliveryState, NotificationKind};
use closedloop_runtime::{grpc, time};
use sqlx::{PgPool, Row};
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
    Ok(Delivery {
        delivery_id: row.try_get::<Uuid, _>("delivery_id")?.to_string(),
        tenant: row.try_get("tenant")?,
        kind: i32::from(kind),
        state: i32::from(state),
        channel: i32::from(channel),
        recipient: row.try_get("recipient")?,
        complaint_id: row.try_get("complaint_id")?,
        work_order_id: row.try_get("work_order_id")?,
        body: row.try_get("body")?,
        attempts: row.try_get("attempts")?,
        last_error: row.try_get("last_error")?,
        created_at: Some(time::to_timestamp(created_at)),
        delivered_at: delivered_at.map(time::to_timestamp),
    })
}

/// Filters of a listing; `None` does not filter.
#[derive(Debug, Default)]
pub struct ListFilter {
    pub complaint_id: Option<String>,
    pub work_order_id: Option<String>,
    pub recipient: Option<String>,
    pub kind: Option<NotificationKind>,
    pub state: Option<DeliveryState>,
}

fn encode_token(seq: i64) -> String {
    grpc::encode_page_token(&seq.to_string())
}

fn decode_token(token: &str) -> Result<i64, StoreError> {
    grpc::decode_page_token(token)
        .and_then(|position| position.parse().ok())
        .ok_or(StoreError::BadPageToken)
}

/// One page of a tenant's deliveries, newest first.
pub async fn list(
    pool: &PgPool,
    tenant: &str,
    filter: &ListFilter,
    page_size: u32,
    page_token: &str,
) -> Result<(Vec<Delivery>, String), StoreError> {
    let before = if page_token.is_empty() {
        None
    } else {
        Some(decode_token(page_token)?)
    };
    let rows = sqlx::query(
        "SELECT * FROM deliveries WHERE tenant = $1 \
           AND ($2::text IS NULL OR complaint_id = $2) \
           AND ($3::text IS NULL OR work_order_id = $3) \
           AND ($4::text IS NULL OR recipient = $4) \
           AND ($5::smallint IS NULL OR kind = $5) \
           AND ($6::smallint IS NULL OR state = $6) \
           AND ($7::bigint IS NULL OR seq < $7) \
         ORDER BY seq DESC LIMIT $8",
    )
    .bind(tenant)
    .bind(&filter.complaint_id)
    .bind(&filter.work_order_id)
    .bind(&filter.recipient)
    .bind(filter.kind.map(|k| k as i16))
    .bind(filter.state.map(|s| s as i16))
    .bind(before)
    .bind(i64::from(page_size) + 1)
    .fetch_all(pool)
    .await?;
    let mut deliveries = rows.iter().map(from_row).collect::<Result<Vec<_>, _>>()?;
    let next = if deliveries.len() > page_size as usize {
        deliveries.truncate(page_size as usize);
        encode_token(rows[page_size as usize - 1].try_get("seq")?)
    } else {
        String::new()
    };
    Ok((deliveries, next))
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
    fn page_tokens_round_trip() {
        assert_eq!(decode_token(&encode_token(1234)).expect("valid"), 1234);
        assert!(decode_token("!!").is_err());
    }
}
