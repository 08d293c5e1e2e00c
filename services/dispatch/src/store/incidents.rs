//! Incidents: a tenant's list, and resolving one with every open work order attached.

use chrono::{DateTime, Utc};
use closedloop_proto::v1::{Incident, WorkOrderEventKind};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::{
    COLUMNS, Db, OPEN_STATES_SQL, Recorded, StoreError, from_row, parse_uuid, ts, update_work_orders,
    write_events,
};
use crate::lifecycle::Action;

/// A tenant's incidents, newest first (or one of them).
pub async fn list_incidents(
    pool: &PgPool,
    tenant: &str,
    open_only: bool,
    incident_id: Option<Uuid>,
) -> Result<Vec<Incident>, StoreError> {
    let rows = sqlx::query(
        "SELECT i.incident_id, i.category, i.region, i.summary, i.opened_at, i.resolved_at, \
           (SELECT count(*) FROM work_orders w WHERE w.incident_id = i.incident_id) \
           + (SELECT count(*) FROM work_orders_archive w WHERE w.incident_id = i.incident_id) AS work_orders \
         FROM incidents i WHERE i.tenant = $1 AND (NOT $2 OR i.resolved_at IS NULL) \
           AND ($3::uuid IS NULL OR i.incident_id = $3) ORDER BY i.opened_at DESC LIMIT 500",
    )
    .bind(tenant)
    .bind(open_only)
    .bind(incident_id)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            let resolved_at: Option<DateTime<Utc>> = row.try_get("resolved_at")?;
            Ok(Incident {
                incident_id: row.try_get::<Uuid, _>("incident_id")?.to_string(),
                category: row.try_get("category")?,
                region: row.try_get("region")?,
                open: resolved_at.is_none(),
                work_order_count: row.try_get("work_orders")?,
                summary: row.try_get("summary")?,
                opened_at: ts(row.try_get("opened_at")?),
                resolved_at: resolved_at.and_then(ts),
            })
        })
        .collect()
}

/// Resolves an open incident and every open work order attached to it, in one transaction,
/// so every customer of the incident gets the closure message.
pub async fn resolve_incident(
    db: &Db,
    tenant: &str,
    incident_id: &str,
    actor: &str,
    note: &str,
) -> Result<(Incident, i64), StoreError> {
    let id = parse_uuid(incident_id)?;
    let mut tx = db.begin().await?;
    let locked = sqlx::query(
        "UPDATE incidents SET resolved_at = now() WHERE tenant = $1 AND incident_id = $2 AND resolved_at IS NULL \
         RETURNING incident_id",
    )
    .bind(tenant)
    .bind(id)
    .fetch_optional(&mut **tx)
    .await?;
    if locked.is_none() {
        return Err(StoreError::NotFound);
    }
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM work_orders WHERE incident_id = $1 AND state IN {OPEN_STATES_SQL} ORDER BY created_at FOR UPDATE"
    ))
    .bind(id)
    .fetch_all(&mut **tx)
    .await?;
    let now = Utc::now();
    let mut changes = Vec::with_capacity(rows.len());
    for row in &rows {
        let mut wo = from_row(row)?;
        wo.apply(Action::Resolve, note, now)?;
        changes.push(Recorded::new(&wo, WorkOrderEventKind::Resolved, actor, note));
    }
    update_work_orders(&mut tx, changes.iter().map(|c| &c.work_order)).await?;
    write_events(&mut tx, &changes).await?;
    tx.commit().await?;
    let incident = list_incidents(&db.pool, tenant, false, Some(id))
        .await?
        .into_iter()
        .next()
        .ok_or(StoreError::NotFound)?;
    Ok((incident, changes.len() as i64))
}
