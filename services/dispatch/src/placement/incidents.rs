//! Incidents a placement batch meets: the open ones its complaints join, and the ones a
//! spike of one category in one region opens.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Duration, Utc};
use closedloop_proto::v1::{IncidentOpened, WorkOrder};
use closedloop_runtime::bus::{self, OutgoingEvent};
use closedloop_runtime::{ids, time};
use sqlx::{Postgres, Row, Transaction};
use uuid::Uuid;

use super::{Draft, region_key};
use crate::Policy;
use crate::assignment;
use crate::store::StoreError;

/// Incidents a batch meets.
pub(super) struct BatchIncidents {
    /// (tenant, category, region) → open incident id.
    pub(super) open: HashMap<(String, String, String), String>,
    /// Opened by this batch.
    pub(super) newly_opened: Vec<((String, String, String), String)>,
    /// `incident.opened` events of the new ones.
    pub(super) alerts: Vec<OutgoingEvent>,
    pub(super) pending_alerts: Vec<IncidentOpened>,
    pub(super) window: Duration,
}

impl BatchIncidents {
    /// Fills in how many work orders each new incident starts with, and builds its alert.
    pub(super) fn count_attached(&mut self, in_play: &[WorkOrder]) {
        for mut alert in self.pending_alerts.drain(..) {
            alert.complaint_count = in_play
                .iter()
                .filter(|w| w.incident_id == alert.incident_id)
                .count() as i64;
            self.alerts.push(OutgoingEvent::new(
                bus::INCIDENT_OPENED,
                &alert.tenant,
                format!("incident-opened-{}", alert.incident_id),
                &alert,
            ));
        }
    }
}

pub(super) async fn incidents_for(
    tx: &mut Transaction<'_, Postgres>,
    policy: &Policy,
    drafts: &[Draft],
    placed: &HashSet<Uuid>,
    now: DateTime<Utc>,
) -> Result<BatchIncidents, StoreError> {
    let window = policy.incident_window;
    let mut result = BatchIncidents {
        open: HashMap::new(),
        newly_opened: Vec::new(),
        alerts: Vec::new(),
        pending_alerts: Vec::new(),
        window,
    };
    let mut arrivals: Vec<(String, String, String)> = Vec::new();
    for draft in drafts {
        let wo = &draft.new.work_order;
        let region = region_key(&wo.province, &wo.city);
        let fresh = Uuid::parse_str(&wo.complaint_id).is_ok_and(|id| !placed.contains(&id));
        if !region.is_empty() && fresh {
            arrivals.push((wo.tenant.clone(), wo.category.clone(), region));
        }
    }
    if arrivals.is_empty() {
        return Ok(result);
    }
    let (tenants, categories, regions): (Vec<_>, Vec<_>, Vec<_>) = arrivals.iter().cloned().fold(
        (Vec::new(), Vec::new(), Vec::new()),
        |(mut t, mut c, mut r), (a, b, d)| {
            t.push(a);
            c.push(b);
            r.push(d);
            (t, c, r)
        },
    );
    // Region advisory locks keep other replicas off these rows until commit.
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
    .bind(now)
    .execute(&mut **tx)
    .await?;
    let open = sqlx::query(
        "SELECT i.incident_id, i.tenant, i.category, i.region FROM incidents i \
         WHERE i.resolved_at IS NULL AND (i.tenant, i.category, i.region) IN ( \
           SELECT * FROM unnest($1::text[], $2::text[], $3::text[]))",
    )
    .bind(&tenants)
    .bind(&categories)
    .bind(&regions)
    .fetch_all(&mut **tx)
    .await?;
    for row in open {
        let id: Uuid = row.try_get("incident_id")?;
        result.open.insert(
            (
                row.try_get("tenant")?,
                row.try_get("category")?,
                row.try_get("region")?,
            ),
            id.to_string(),
        );
    }
    let baseline_from = now - window * (policy.spikes.baseline_windows as i32 + 1);
    let counts = sqlx::query(
        // Per-minute counts: the minute the window starts in counts as recent.
        "SELECT k.t AS tenant, k.c AS category, k.r AS region, \
           coalesce(sum(a.arrivals) FILTER (WHERE a.minute >= date_trunc('minute', $4::timestamptz)), 0)::bigint AS recent, \
           coalesce(sum(a.arrivals) FILTER (WHERE a.minute < date_trunc('minute', $4::timestamptz)), 0)::bigint AS earlier \
         FROM (SELECT DISTINCT * FROM unnest($1::text[], $2::text[], $3::text[])) AS k(t, c, r) \
           JOIN arrival_counts a ON a.tenant = k.t AND a.category = k.c AND a.region = k.r AND a.minute >= $5 \
         GROUP BY 1, 2, 3",
    )
    .bind(&tenants)
    .bind(&categories)
    .bind(&regions)
    .bind(now - window)
    .bind(baseline_from)
    .fetch_all(&mut **tx)
    .await?;
    for row in counts {
        let key: (String, String, String) = (
            row.try_get("tenant")?,
            row.try_get("category")?,
            row.try_get("region")?,
        );
        if result.open.contains_key(&key) {
            continue;
        }
        let recent: i64 = row.try_get("recent")?;
        let earlier: i64 = row.try_get("earlier")?;
        let Some(summary) = assignment::spike(&policy.spikes, recent, earlier, window.num_minutes()) else {
            continue;
        };
        let incident_id = ids::derive(
            "incident",
            &[&key.0, &key.1, &key.2, &now.timestamp_micros().to_string()],
        );
        sqlx::query(
            "INSERT INTO incidents (incident_id, tenant, category, region, summary, opened_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(incident_id)
        .bind(&key.0)
        .bind(&key.1)
        .bind(&key.2)
        .bind(&summary)
        .bind(now)
        .execute(&mut **tx)
        .await?;
        tracing::warn!(%incident_id, tenant = %key.0, category = %key.1, region = %key.2, %summary, "incident opened");
        result.pending_alerts.push(IncidentOpened {
            incident_id: incident_id.to_string(),
            tenant: key.0.clone(),
            category: key.1.clone(),
            region: key.2.clone(),
            complaint_count: 0,
            summary,
            opened_at: Some(time::to_timestamp(now)),
        });
        result.open.insert(key.clone(), incident_id.to_string());
        result.newly_opened.push((key, incident_id.to_string()));
    }
    // Old arrivals are no longer part of any baseline.
    sqlx::query("DELETE FROM arrival_counts WHERE minute < $1")
        .bind(baseline_from - Duration::minutes(1))
        .execute(&mut **tx)
        .await?;
    Ok(result)
}
