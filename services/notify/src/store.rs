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

/// Whether this sender may call the gateway for a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Leased to us: send, then record the attempt.
    Mine,
    /// Already delivered or given up: nothing to do.
    Done,
    /// Another sender holds the lease right now.
    Busy,
    /// It existed already and the caller only sends what it starts itself.
    NotOurs,
}

/// Records a delivery (once per id) and leases it for `lease` (longer than a gateway call
/// may take), in one statement: one commit where there were two. A delivery that exists is
/// leased again only while pending with its lease run out, and not at all with `only_if_new`.
pub async fn register_and_claim(
    pool: &PgPool,
    delivery: &Delivery,
    lease: std::time::Duration,
    only_if_new: bool,
) -> Result<Claim, StoreError> {
    let id = Uuid::parse_str(&delivery.delivery_id)
        .map_err(|_| StoreError::BadId(delivery.delivery_id.clone()))?;
    let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
    let leased = sqlx::query(
        "INSERT INTO deliveries (delivery_id, tenant, kind, state, channel, recipient, complaint_id, work_order_id, body, lease_until) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, now() + make_interval(secs => $10::double precision / 1000)) \
         ON CONFLICT (delivery_id) DO UPDATE SET lease_until = EXCLUDED.lease_until \
         WHERE NOT $11 AND deliveries.state = $4 \
           AND (deliveries.lease_until IS NULL OR deliveries.lease_until < now()) \
         RETURNING 1",
    )
    .bind(id)
    .bind(&delivery.tenant)
    .bind(delivery.kind as i16)
    .bind(DeliveryState::Pending as i16)
    .bind(delivery.channel as i16)
    .bind(&delivery.recipient)
    .bind(&delivery.complaint_id)
    .bind(&delivery.work_order_id)
    .bind(&delivery.body)
    .bind(lease_ms)
    .bind(only_if_new)
    .fetch_optional(pool)
    .await?;
    if leased.is_some() {
        return Ok(Claim::Mine);
    }
    if only_if_new {
        return Ok(Claim::NotOurs);
    }
    let state: i16 = sqlx::query_scalar("SELECT state FROM deliveries WHERE delivery_id = $1")
        .bind(id)
        .fetch_one(pool)
        .await?;
    Ok(if state == DeliveryState::Pending as i16 {
        Claim::Busy
    } else {
        Claim::Done
    })
}

/// The newest work-order version the customer has been told about (0 if none).
pub async fn customer_progress(pool: &PgPool, work_order_id: &str) -> Result<i64, StoreError> {
    let version: Option<i64> =
        sqlx::query_scalar("SELECT last_version FROM customer_progress WHERE work_order_id = $1")
            .bind(work_order_id)
            .fetch_optional(pool)
            .await?;
    Ok(version.unwrap_or(0))
}

/// Records the outcome of one attempt and releases the lease; with `progress` (a work
/// order and the version the customer was just told about), also advances what the
/// customer knows, never backwards. One statement, so one commit. Returns the delivery.
pub async fn record_attempt(
    pool: &PgPool,
    delivery_id: &str,
    state: DeliveryState,
    error: &str,
    progress: Option<(&str, i64)>,
) -> Result<Delivery, StoreError> {
    let id = Uuid::parse_str(delivery_id).map_err(|_| StoreError::BadId(delivery_id.to_owned()))?;
    let (work_order_id, version) = progress.unwrap_or(("", 0));
    let row = sqlx::query(
        "WITH progress AS ( \
           INSERT INTO customer_progress (work_order_id, last_version) SELECT $5, $6 WHERE $6 > 0 \
           ON CONFLICT (work_order_id) DO UPDATE \
             SET last_version = GREATEST(customer_progress.last_version, EXCLUDED.last_version)) \
         UPDATE deliveries SET attempts = attempts + 1, state = $2, last_error = $3, lease_until = NULL, \
           delivered_at = CASE WHEN $2 = $4 THEN now() ELSE delivered_at END \
         WHERE delivery_id = $1 RETURNING *",
    )
    .bind(id)
    .bind(state as i16)
    .bind(error)
    .bind(DeliveryState::Delivered as i16)
    .bind(work_order_id)
    .bind(version)
    .fetch_one(pool)
    .await?;
    Ok(from_row(&row)?)
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
    fn page_tokens_round_trip() {
        assert_eq!(decode_token(&encode_token(1234)).expect("valid"), 1234);
        assert!(decode_token("!!").is_err());
    }
}
