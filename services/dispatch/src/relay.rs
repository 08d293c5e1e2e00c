//! The relay: publishes committed events to JetStream, pipelining the acks of a batch. It
//! reads two sources:
//!
//! - work-order events, carried by the history rows written with their changes. The relay
//!   reads them past a cursor, in order of the writing transaction's id and then of
//!   insertion, and only rows written by transactions older than every one still running, so
//!   a transaction that commits late never lands behind the cursor (migration 0008 says more).
//!   Replicas take turns on the cursor.
//! - the outbox, for events with no history row (incident alerts): claimed with
//!   `FOR UPDATE SKIP LOCKED`, so replicas skip each other's rows, and deleted once published.
//!
//! A crash between publish and commit re-publishes with the same `Nats-Msg-Id`, which the
//! stream drops as a duplicate. Events of one work order normally go out in version order;
//! where two transactions' changes to it reach the relay out of order, consumers already
//! guard with the version, as they must for redeliveries.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use closedloop_runtime::bus::{
    Bus, BusError, OutgoingEvent, work_order_event_kind, work_order_event_name, work_order_topic,
};
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::store::work_order_event_id;

/// Rows per relay round, from each source.
const BATCH: i64 = 256;
/// Fallback poll interval, for events written by another replica.
const IDLE_POLL: Duration = Duration::from_millis(500);
/// First wait for history rows committed behind an older transaction still running; doubled
/// up to [`MAX_SETTLE_POLL`] while that transaction lasts.
const FIRST_SETTLE_POLL: Duration = Duration::from_millis(1);
const MAX_SETTLE_POLL: Duration = Duration::from_millis(200);
/// How long a stopping relay keeps trying to publish what is committed.
const FINAL_ROUNDS_FOR: Duration = Duration::from_secs(2);

/// What one round of the relay did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Events published.
    pub published: usize,
    /// A source filled its batch: there may be more right now.
    pub more: bool,
    /// History rows are committed but wait on an older transaction still running.
    pub unsettled: bool,
}

/// Publishes one batch from each source.
pub async fn relay_once(pool: &PgPool, bus: &Bus) -> Result<Round, RelayError> {
    let history = relay_history(pool, bus).await?;
    let outbox = relay_outbox(pool, bus).await?;
    Ok(Round {
        published: history.published + outbox.published,
        more: history.more || outbox.more,
        unsettled: history.unsettled,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("publishing: {0}")]
    Publish(#[from] BusError),
}

/// Commits a round without waiting for its WAL to reach disk. A round only records what was
/// published; if a crash loses that record, the next round publishes those events again
/// under the same `Nats-Msg-Id`, which the stream drops within its duplicate window (and
/// consumers are idempotent beyond it). Waiting on the disk made every round a second flush
/// beside each placement batch's own. Rounds with nothing to record roll back and skip this.
async fn commit_round(mut tx: sqlx::Transaction<'_, sqlx::Postgres>) -> Result<(), sqlx::Error> {
    sqlx::query("SET LOCAL synchronous_commit = off")
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// A history row's place in the relay's order: (writing transaction, sequence).
type Position = (i64, i64);

/// Publishes the next work-order events past the cursor and moves the cursor past every one
/// published, up to the first that failed.
async fn relay_history(pool: &PgPool, bus: &Bus) -> Result<Round, RelayError> {
    let mut tx = pool.begin().await?;
    // The cursor row is locked by whichever replica relays now; the others read nothing. (Read
    // apart from the rows: joined to them, the planner cannot scan the index from the cursor.)
    let cursor: Option<Position> =
        sqlx::query_as("SELECT written_by::text::int8, seq FROM history_relay_cursor FOR UPDATE SKIP LOCKED")
            .fetch_optional(&mut *tx)
            .await?;
    let Some((writer, seq)) = cursor else {
        return Ok(Round::default());
    };
    // `writer`, not `written_by`: an output column of that name is what ORDER BY would sort
    // by, a cast the index does not have, so every round sorted the whole table.
    let rows = sqlx::query(
        "SELECT work_order_id, version, kind, subject, payload, trace_headers, occurred_at, \
           written_by::text::int8 AS writer, seq, \
           written_by < pg_snapshot_xmin(pg_current_snapshot()) AS settled \
         FROM work_order_history WHERE (written_by, seq) > ($1::text::xid8, $2) \
         ORDER BY written_by, seq LIMIT $3",
    )
    .bind(writer.to_string())
    .bind(seq)
    .bind(BATCH)
    .fetch_all(&mut *tx)
    .await?;
    let mut round = Round::default();
    // Each settled row's position in order, and whether it has an event: rows an older
    // dispatch wrote before events moved here have none (theirs went through the outbox) and
    // are only stepped over.
    let mut positions: Vec<(Position, bool)> = Vec::with_capacity(rows.len());
    let mut events = Vec::with_capacity(rows.len());
    for row in &rows {
        if !row.try_get::<bool, _>("settled")? {
            round.unsettled = true;
            break;
        }
        let event = history_event(row)?;
        positions.push(((row.try_get("writer")?, row.try_get("seq")?), event.is_some()));
        events.extend(event);
    }
    if positions.is_empty() {
        return Ok(round);
    }
    round.more = !round.unsettled && positions.len() as i64 == BATCH;
    let mut results = bus.publish_all(events).await.into_iter();
    // The cursor moves past the longest run that went out; the rest go again next round.
    let mut through = None;
    let mut first_error = None;
    for (position, has_event) in positions {
        if has_event {
            if let Some(Err(error)) = results.next() {
                first_error = Some(error);
                break;
            }
            round.published += 1;
        }
        through = Some(position);
    }
    if let Some((writer, seq)) = through {
        sqlx::query("UPDATE history_relay_cursor SET written_by = $1::text::xid8, seq = $2")
            .bind(writer.to_string())
            .bind(seq)
            .execute(&mut *tx)
            .await?;
    }
    commit_round(tx).await?;
    match first_error {
        Some(error) => Err(error.into()),
        None => Ok(round),
    }
}

fn history_event(row: &PgRow) -> Result<Option<OutgoingEvent>, sqlx::Error> {
    let payload: Option<Vec<u8>> = row.try_get("payload")?;
    let subject: Option<String> = row.try_get("subject")?;
    let (Some(payload), Some(subject)) = (payload, subject) else {
        return Ok(None);
    };
    let work_order_id: Uuid = row.try_get("work_order_id")?;
    let version: i64 = row.try_get("version")?;
    let kind: String = row.try_get("kind")?;
    let occurred_at: DateTime<Utc> = row.try_get("occurred_at")?;
    let trace: Option<serde_json::Value> = row.try_get("trace_headers")?;
    Ok(Some(OutgoingEvent {
        subject,
        id: work_order_event_id(&work_order_id.to_string(), version).to_string(),
        event_type: work_order_topic(work_order_event_name(work_order_event_kind(&kind))).cloudevents_type(),
        payload: payload.into(),
        time: occurred_at,
        trace_headers: Some(trace_headers(trace)),
    }))
}

fn trace_headers(stored: Option<serde_json::Value>) -> HashMap<String, String> {
    stored
        .and_then(|value| serde_json::from_value(value).ok())
        .unwrap_or_default()
}

/// Publishes one batch of the outbox and deletes what went out.
async fn relay_outbox(pool: &PgPool, bus: &Bus) -> Result<Round, RelayError> {
    let mut tx = pool.begin().await?;
    let rows = sqlx::query(
        "SELECT event_id, subject, event_type, payload, trace_headers, created_at FROM outbox \
         ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(BATCH)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        return Ok(Round::default());
    }
    let mut events = Vec::with_capacity(rows.len());
    for row in &rows {
        let payload: Vec<u8> = row.try_get("payload")?;
        let created_at: DateTime<Utc> = row.try_get("created_at")?;
        events.push(OutgoingEvent {
            subject: row.try_get("subject")?,
            id: row.try_get("event_id")?,
            event_type: row.try_get("event_type")?,
            payload: payload.into(),
            time: created_at,
            trace_headers: Some(trace_headers(row.try_get("trace_headers")?)),
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
    commit_round(tx).await?;
    match first_error {
        Some(error) => Err(error.into()),
        None => Ok(Round {
            published: published.len(),
            more: rows.len() as i64 == BATCH,
            unsettled: false,
        }),
    }
}

/// Relays until `cancel` fires. `wake` is notified after each commit that wrote events.
pub async fn run(pool: PgPool, bus: Bus, wake: Arc<Notify>, cancel: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    let mut settle = FIRST_SETTLE_POLL;
    loop {
        let wait = match relay_once(&pool, &bus).await {
            Ok(round) if round.more => continue,
            Ok(round) => {
                backoff = Duration::from_millis(100);
                if !round.unsettled {
                    settle = FIRST_SETTLE_POLL;
                    IDLE_POLL
                } else if round.published > 0 {
                    settle = FIRST_SETTLE_POLL;
                    settle
                } else {
                    // Nothing moved: the older transaction is still running; poll less often.
                    let wait = settle;
                    settle = (settle * 2).min(MAX_SETTLE_POLL);
                    wait
                }
            }
            Err(error) => {
                tracing::warn!(error = format!("{error:#}"), "event relay failed; retrying");
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
    let deadline = tokio::time::Instant::now() + FINAL_ROUNDS_FOR;
    loop {
        match relay_once(&pool, &bus).await {
            Ok(round) if (round.more || round.unsettled) && tokio::time::Instant::now() < deadline => {
                if !round.more {
                    tokio::time::sleep(FIRST_SETTLE_POLL).await;
                }
            }
            Ok(_) => break,
            Err(error) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "final event relay failed; the next start publishes it"
                );
                break;
            }
        }
    }
}
