//! Agents' corrections of classify's verdicts, kept as labelled examples for
//! `classify-train` (`dispatch-corrections` exports them).

use closedloop_proto::v1::Intent;
use sqlx::{PgPool, Postgres, Transaction};

use super::{StoreError, WorkOrder, parse_uuid};

/// Records that `actor` changed `work_order` (as it is now) from `previous_intent` and
/// `previous_category`; the text is its masked summary, which carries no personal data.
pub async fn record_correction(
    tx: &mut Transaction<'_, Postgres>,
    work_order: &WorkOrder,
    previous_intent: Intent,
    previous_category: &str,
    actor: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO classification_corrections (tenant, work_order_id, version, text, intent, category, \
           previous_intent, previous_category, actor, corrected_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(&work_order.tenant)
    .bind(parse_uuid(&work_order.work_order_id)?)
    .bind(work_order.version)
    .bind(&work_order.summary)
    .bind(work_order.intent as i16)
    .bind(&work_order.category)
    .bind(previous_intent as i16)
    .bind(previous_category)
    .bind(actor)
    .bind(work_order.updated_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A tenant's corrections, oldest first, as (intent, category, text). A text corrected more
/// than once appears once per correction; the last one is the agents' latest word.
pub async fn corrections(pool: &PgPool, tenant: &str) -> Result<Vec<(Intent, String, String)>, StoreError> {
    let rows: Vec<(i16, String, String)> = sqlx::query_as(
        "SELECT intent, category, text FROM classification_corrections WHERE tenant = $1 \
         ORDER BY corrected_at, work_order_id, version",
    )
    .bind(tenant)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(intent, category, text)| {
            (
                Intent::try_from(i32::from(intent)).unwrap_or_default(),
                category,
                text,
            )
        })
        .collect())
}
