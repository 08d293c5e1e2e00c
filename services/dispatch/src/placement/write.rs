//! Placement's writes: a [`Plan`] applied in the transaction it was loaded in, as multi-row
//! statements.

use sqlx::{Postgres, Transaction};

use super::decide::Plan;
use super::load::columns;
use super::staffing::StaffChanges;
use crate::store::{self, StoreError, parse_uuid};

pub async fn write(tx: &mut Transaction<'_, Postgres>, plan: &Plan) -> Result<(), StoreError> {
    record_arrivals(tx, plan).await?;
    // Before the work orders that name them.
    for incident in &plan.incidents {
        sqlx::query(
            "INSERT INTO incidents (incident_id, tenant, category, region, summary, opened_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(incident.incident_id)
        .bind(&incident.key.0)
        .bind(&incident.key.1)
        .bind(&incident.key.2)
        .bind(&incident.summary)
        .bind(incident.opened_at)
        .execute(&mut **tx)
        .await?;
        tracing::warn!(
            incident_id = %incident.incident_id, tenant = %incident.key.0, category = %incident.key.1,
            region = %incident.key.2, summary = %incident.summary, "incident opened"
        );
    }
    store::insert_work_orders(tx, &plan.inserts).await?;
    store::update_work_orders(tx, &plan.updates).await?;
    if !plan.links.is_empty() {
        let tenants: Vec<&str> = plan.links.iter().map(|l| l.tenant.as_str()).collect();
        let complaints: Vec<uuid::Uuid> = plan.links.iter().map(|l| l.complaint_id).collect();
        let work_orders = plan
            .links
            .iter()
            .map(|l| parse_uuid(&l.work_order_id))
            .collect::<Result<Vec<_>, _>>()?;
        sqlx::query(
            "INSERT INTO complaint_links (tenant, complaint_id, work_order_id) \
             SELECT * FROM unnest($1::text[], $2::uuid[], $3::uuid[])",
        )
        .bind(&tenants)
        .bind(&complaints)
        .bind(&work_orders)
        .execute(&mut **tx)
        .await?;
    }
    write_staffing(tx, &plan.staffing).await?;
    store::write_events(tx, &plan.events).await?;
    store::write_outbox(tx, &plan.alerts).await?;
    Ok(())
}

/// Adds the batch's arrivals to the per-minute counts and drops those no baseline needs.
async fn record_arrivals(tx: &mut Transaction<'_, Postgres>, plan: &Plan) -> Result<(), StoreError> {
    if plan.arrivals.is_empty() {
        return Ok(());
    }
    let (tenants, categories, regions) = columns(&plan.arrivals);
    sqlx::query(
        "INSERT INTO arrival_counts (tenant, category, region, minute, arrivals) \
         SELECT t, c, r, date_trunc('minute', $4::timestamptz), count(*) \
         FROM unnest($1::text[], $2::text[], $3::text[]) AS k(t, c, r) GROUP BY 1, 2, 3 \
         ON CONFLICT (tenant, category, region, minute) \
         DO UPDATE SET arrivals = arrival_counts.arrivals + EXCLUDED.arrivals",
    )
    .bind(&tenants)
    .bind(&categories)
    .bind(&regions)
    .bind(plan.decided_at)
    .execute(&mut **tx)
    .await?;
    if let Some(before) = plan.forget_arrivals_before {
        sqlx::query("DELETE FROM arrival_counts WHERE minute < $1")
            .bind(before)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Who took work last (for round-robin) and the account managers assignment made.
pub async fn write_staffing(
    tx: &mut Transaction<'_, Postgres>,
    changes: &StaffChanges,
) -> Result<(), StoreError> {
    if !changes.round_robin.is_empty() {
        let tenants: Vec<&str> = changes.round_robin.iter().map(|(t, _, _)| t.as_str()).collect();
        let agents: Vec<&str> = changes.round_robin.iter().map(|(_, a, _)| a.as_str()).collect();
        let times: Vec<_> = changes.round_robin.iter().map(|(_, _, at)| *at).collect();
        sqlx::query(
            "UPDATE agents a SET last_assigned_at = k.at FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS k(t, id, at) \
             WHERE a.tenant = k.t AND a.agent_id = k.id",
        )
        .bind(&tenants)
        .bind(&agents)
        .bind(&times)
        .execute(&mut **tx)
        .await?;
    }
    if !changes.new_managers.is_empty() {
        let mut insert = sqlx::QueryBuilder::<Postgres>::new(
            "INSERT INTO account_managers (tenant, poster_id, agent_id) ",
        );
        insert.push_values(&changes.new_managers, |mut row, (tenant, poster, agent)| {
            row.push_bind(tenant).push_bind(poster).push_bind(agent);
        });
        insert.push(" ON CONFLICT DO NOTHING");
        insert.build().execute(&mut **tx).await?;
    }
    Ok(())
}
