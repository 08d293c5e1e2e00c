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
    /// A batched write of the delivery log failed or stopped.
    #[error("delivery log: {0}")]
    Batch(String),
}

/// Whether this sender may call the gateway for a delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// Leased to us: send, then record the attempt.
    Mine,
    /// Already delivered or given up, as the log holds it: nothing to send.
    Done(Box<Delivery>),
    /// Another sender holds the lease right now.
    Busy,
    /// It existed already and the caller only sends what it starts itself.
    NotOurs,
}

/// A delivery to register and lease, as [`claim_batch`] takes it.
pub struct ClaimRequest {
    /// `delivery.delivery_id`, parsed by the caller so a batch holds only valid ids.
    pub id: Uuid,
    pub delivery: Delivery,
    /// Lease only a delivery this call creates (the watchdog's first replies).
    pub only_if_new: bool,
}

/// Records deliveries (once per id) and leases them for `lease` (longer than a gateway call
/// may take), in two statements for the whole batch. A delivery that exists is leased again
/// only while pending with its lease run out, and not at all for an `only_if_new` request.
/// A delivery asked for twice in one batch is leased by the first request only.
pub async fn claim_batch(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    requests: &[ClaimRequest],
    lease: std::time::Duration,
) -> Result<Vec<Claim>, StoreError> {
    let ids: Vec<Uuid> = requests.iter().map(|r| r.id).collect();
    let mut first_asked: std::collections::HashMap<Uuid, usize> = std::collections::HashMap::new();
    for (index, id) in ids.iter().enumerate() {
        first_asked.entry(*id).or_insert(index);
    }
    let firsts: Vec<usize> = {
        let mut firsts: Vec<usize> = first_asked.values().copied().collect();
        firsts.sort_unstable();
        firsts
    };
    let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
    let mut leased: std::collections::HashSet<Uuid> = std::collections::HashSet::new();
    for only_if_new in [false, true] {
        let chosen: Vec<&ClaimRequest> = firsts
            .iter()
            .map(|i| &requests[*i])
            .filter(|r| r.only_if_new == only_if_new)
            .collect();
        if chosen.is_empty() {
            continue;
        }
        let column =
            |f: fn(&Delivery) -> String| chosen.iter().map(|r| f(&r.delivery)).collect::<Vec<String>>();
        let chosen_ids: Vec<Uuid> = chosen.iter().map(|r| r.id).collect();
        let kinds: Vec<i16> = chosen.iter().map(|r| r.delivery.kind as i16).collect();
        let channels: Vec<i16> = chosen.iter().map(|r| r.delivery.channel as i16).collect();
        let on_conflict = if only_if_new {
            "DO NOTHING"
        } else {
            "DO UPDATE SET lease_until = EXCLUDED.lease_until WHERE deliveries.state = $9 \
             AND (deliveries.lease_until IS NULL OR deliveries.lease_until < now())"
        };
        let rows: Vec<Uuid> = sqlx::query_scalar(&format!(
            "INSERT INTO deliveries (delivery_id, tenant, kind, state, channel, recipient, complaint_id, work_order_id, body, lease_until) \
             SELECT k.id, k.tenant, k.kind, $9, k.channel, k.recipient, k.complaint, k.work_order, k.body, \
               now() + make_interval(secs => $10::double precision / 1000) \
             FROM unnest($1::uuid[], $2::text[], $3::int2[], $4::int2[], $5::text[], $6::text[], $7::text[], $8::text[]) \
               AS k(id, tenant, kind, channel, recipient, complaint, work_order, body) \
             ON CONFLICT (delivery_id) {on_conflict} RETURNING delivery_id"
        ))
        .bind(&chosen_ids)
        .bind(column(|d| d.tenant.clone()))
        .bind(&kinds)
        .bind(&channels)
        .bind(column(|d| d.recipient.clone()))
        .bind(column(|d| d.complaint_id.clone()))
        .bind(column(|d| d.work_order_id.clone()))
        .bind(column(|d| d.body.clone()))
        .bind(DeliveryState::Pending as i16)
        .bind(lease_ms)
        .fetch_all(&mut **tx)
        .await?;
        leased.extend(rows);
    }
    // Why the others were not leased: finished, or someone else's lease.
    let unleased: Vec<Uuid> = firsts
        .iter()
        .filter(|i| !requests[**i].only_if_new && !leased.contains(&ids[**i]))
        .map(|i| ids[*i])
        .collect();
    // Finished ones come back whole, so the caller can tell of the outcome again.
    let mut finished: std::collections::HashMap<Uuid, Delivery> = std::collections::HashMap::new();
    if !unleased.is_empty() {
        let rows = sqlx::query("SELECT * FROM deliveries WHERE delivery_id = ANY($1) AND state <> $2")
            .bind(&unleased)
            .bind(DeliveryState::Pending as i16)
            .fetch_all(&mut **tx)
            .await?;
        for row in &rows {
            finished.insert(row.try_get("delivery_id")?, from_row(row)?);
        }
    }
    Ok(requests
        .iter()
        .enumerate()
        .map(|(index, request)| {
            let id = ids[index];
            let first = first_asked.get(&id) == Some(&index);
            match (first && leased.contains(&id), request.only_if_new) {
                (true, _) => Claim::Mine,
                (false, true) => Claim::NotOurs,
                (false, false) => match finished.get(&id) {
                    Some(logged) if first => Claim::Done(Box::new(logged.clone())),
                    _ => Claim::Busy,
                },
            }
        })
        .collect())
}

/// The newest version of each work order the customer has been told about; work orders
/// never told of are left out.
pub async fn customer_progress(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    work_order_ids: &[String],
) -> Result<std::collections::HashMap<String, i64>, StoreError> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT work_order_id, last_version FROM customer_progress WHERE work_order_id = ANY($1)",
    )
    .bind(work_order_ids)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows.into_iter().collect())
}

/// The outcome of one attempt, as [`record_batch`] takes it.
pub struct RecordRequest {
    pub id: Uuid,
    pub state: DeliveryState,
    pub error: String,
    /// A work order and the version the customer was just told about.
    pub progress: Option<(String, i64)>,
}

/// Records attempts and releases their leases; where a request carries `progress`, also
/// advances what the customer knows of that work order, never backwards, locking those rows
/// in work-order order so replicas writing side by side cannot deadlock. One statement for
/// the batch. Returns each delivery as now logged, in request order; `None` where the log
/// holds no such delivery, so one bad request does not fail the others.
pub async fn record_batch(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    requests: &[RecordRequest],
) -> Result<Vec<Option<Delivery>>, StoreError> {
    let ids: Vec<Uuid> = requests.iter().map(|r| r.id).collect();
    let states: Vec<i16> = requests.iter().map(|r| r.state as i16).collect();
    let errors: Vec<&str> = requests.iter().map(|r| r.error.as_str()).collect();
    let work_orders: Vec<&str> = requests
        .iter()
        .map(|r| r.progress.as_ref().map_or("", |(w, _)| w.as_str()))
        .collect();
    let versions: Vec<i64> = requests
        .iter()
        .map(|r| r.progress.as_ref().map_or(0, |(_, v)| *v))
        .collect();
    // `delivery_id = ANY($1)` steers the planner to the primary key. Joined on `k` alone, the
    // prepared statement's plan hash-joined a scan of the whole log: 1,600 pages a batch.
    let rows = sqlx::query(
        "WITH k AS (SELECT * FROM unnest($1::uuid[], $2::int2[], $3::text[], $4::text[], $5::int8[]) \
             AS k(id, state, error, work_order, version)), \
           progress AS ( \
             INSERT INTO customer_progress (work_order_id, last_version) \
             SELECT work_order, max(version) FROM k WHERE version > 0 \
             GROUP BY work_order ORDER BY work_order \
             ON CONFLICT (work_order_id) DO UPDATE \
               SET last_version = GREATEST(customer_progress.last_version, EXCLUDED.last_version)) \
         UPDATE deliveries d SET attempts = d.attempts + 1, state = k.state, last_error = k.error, \
           lease_until = NULL, delivered_at = CASE WHEN k.state = $6 THEN now() ELSE d.delivered_at END \
         FROM k WHERE d.delivery_id = ANY($1) AND d.delivery_id = k.id RETURNING d.*",
    )
    .bind(&ids)
    .bind(&states)
    .bind(&errors)
    .bind(&work_orders)
    .bind(&versions)
    .bind(DeliveryState::Delivered as i16)
    .fetch_all(&mut **tx)
    .await?;
    let mut logged: std::collections::HashMap<Uuid, Delivery> = std::collections::HashMap::new();
    for row in &rows {
        logged.insert(row.try_get("delivery_id")?, from_row(row)?);
    }
    Ok(ids.iter().map(|id| logged.get(id).cloned()).collect())
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
