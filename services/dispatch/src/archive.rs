//! Moving closed work orders, with their history and follow-up links, to the archive tables
//! at the retention age (`closedloop_runtime::archive` runs these on a schedule).

use chrono::{DateTime, Utc};
use closedloop_proto::v1::WorkOrderState;
use sqlx::PgPool;

/// Moves up to `limit` work orders closed (last changed) before `cutoff`, with their history
/// and links, in one transaction; returns how many moved. A work order whose history the
/// relay has not yet published stays until it has: its events must leave first.
pub async fn move_closed(pool: PgPool, cutoff: DateTime<Utc>, limit: i64) -> Result<u64, sqlx::Error> {
    let moved: i64 = sqlx::query_scalar(&format!(
        "WITH relayed AS (SELECT written_by, seq FROM history_relay_cursor), \
         picked AS ( \
           SELECT w.work_order_id FROM work_orders w \
           WHERE w.state = {closed} AND w.updated_at < $1 \
             AND NOT EXISTS (SELECT 1 FROM work_order_history h, relayed r \
                             WHERE h.work_order_id = w.work_order_id AND h.written_by IS NOT NULL \
                               AND (h.written_by, h.seq) > (r.written_by, r.seq)) \
           ORDER BY w.updated_at LIMIT $2 FOR UPDATE OF w SKIP LOCKED), \
         moved AS (DELETE FROM work_orders w USING picked p WHERE w.work_order_id = p.work_order_id \
                   RETURNING w.*), \
         kept AS (INSERT INTO work_orders_archive SELECT * FROM moved RETURNING work_order_id), \
         history AS (DELETE FROM work_order_history h USING picked p WHERE h.work_order_id = p.work_order_id \
                     RETURNING h.work_order_id, h.version, h.kind, h.actor, h.note, h.occurred_at), \
         history_kept AS (INSERT INTO work_order_history_archive SELECT * FROM history), \
         links AS (DELETE FROM complaint_links l USING picked p WHERE l.work_order_id = p.work_order_id \
                   RETURNING l.tenant, l.complaint_id, l.work_order_id, l.linked_at), \
         links_kept AS (INSERT INTO complaint_links_archive SELECT * FROM links) \
         SELECT count(*) FROM kept",
        closed = WorkOrderState::Closed as i32
    ))
    .bind(cutoff)
    .bind(limit)
    .fetch_one(&pool)
    .await?;
    Ok(u64::try_from(moved).unwrap_or(0))
}

/// Forgets up to `limit` applied-feedback marks older than `cutoff`: they guard against a
/// redelivered answer, which cannot arrive months later.
pub async fn forget_feedback(pool: PgPool, cutoff: DateTime<Utc>, limit: i64) -> Result<u64, sqlx::Error> {
    let forgotten = sqlx::query(
        "DELETE FROM feedback_seen WHERE feedback_id IN ( \
           SELECT feedback_id FROM feedback_seen WHERE seen_at < $1 ORDER BY seen_at LIMIT $2 \
           FOR UPDATE SKIP LOCKED)",
    )
    .bind(cutoff)
    .bind(limit)
    .execute(&pool)
    .await?
    .rows_affected();
    Ok(forgotten)
}
