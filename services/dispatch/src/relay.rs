//! The outbox relay: publishes committed events to JetStream in commit order, pipelining
//! the acks of a batch, and deletes them once published. Rows are claimed with
//! `FOR UPDATE SKIP LOCKED`, so several dispatch replicas relay without stepping on each
//! other. A crash between publish and mark re-publishes with the same `Nats-Msg-Id`, which
//! the stream drops as a duplicate.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use closedloop_runtime::bus::{Bus, OutgoingEvent};
use sqlx::{PgPool, Row};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Rows per relay round.
const BATCH: i64 = 256;
/// Fallback poll interval, for events written by another replica.
const IDLE_POLL: Duration = Duration::from_millis(500);

/// Publishes one batch; returns how many events were published.
pub async fn relay_once(pool: &PgPool, bus: &Bus) -> anyhow::Result<usize> {
    let mut tx = pool.begin().await?;
    let rows = sqlx::query(
        "SELECT event_id, subject, event_type, payload, trace_headers, created_at FROM outbox \
         ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(BATCH)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut events = Vec::with_capacity(rows.len());
    for row in &rows {
        let trace: serde_json::Value = row.try_get("trace_headers")?;
        let trace: HashMap<String, String> = serde_json::from_value(trace).unwrap_or_default();
        let payload: Vec<u8> = row.try_get("payload")?;
        let created_at: DateTime<Utc> = row.try_get("created_at")?;
        events.push(OutgoingEvent {
            subject: row.try_get("subject")?,
            id: row.try_get("event_id")?,
            event_type: row.try_get("event_type")?,
            payload: payload.into(),
            time: created_at,
            trace_headers: Some(trace),
        });
    }
    let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
    let results = bus.publish_all(events).await;
    let mut published = Vec::with_capacity(ids.len());
    let mut first_error = None;
    for (id, result) in ids.into_iter().zip(results) {
        match result {
            Ok(_) => published.push(id),
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
    }
    sqlx::query("DELETE FROM outbox WHERE event_id = ANY($1)")
        .bind(&published)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    match first_error {
        Some(error) => Err(error.into()),
        None => Ok(published.len()),
    }
}

/// Relays until `cancel` fires. `wake` is notified after each commit that wrote events.
pub async fn run(pool: PgPool, bus: Bus, wake: Arc<Notify>, cancel: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let wait = match relay_once(&pool, &bus).await {
            Ok(n) if n as i64 == BATCH => continue,
            Ok(_) => {
                backoff = Duration::from_millis(100);
                IDLE_POLL
            }
            Err(error) => {
                tracing::warn!(error = format!("{error:#}"), "outbox relay failed; retrying");
                backoff = (backoff * 2).min(Duration::from_secs(5));
                backoff
            }
        };
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = cancel.cancelled() => break,
        }
    }
    // Publish what was committed before stopping, so a clean shutdown leaves nothing behind.
    if let Err(error) = relay_once(&pool, &bus).await {
        tracing::warn!(
            error = format!("{error:#}"),
            "final outbox relay failed; the next start publishes it"
        );
    }
}
