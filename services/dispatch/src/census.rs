//! The open work orders counted by tenant, team, state and SLA state, for the dashboard
//! (work orders by state and team; SLA at risk and breached). Counted in PostgreSQL every
//! [`CENSUS_INTERVAL`], so the figures are the system of record's, whichever replica
//! changed them; every replica reports the same counts, so dashboards take the `max` over
//! replicas.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;
use std::time::Duration;

use closedloop_proto::v1::{SlaState, WorkOrderState};
use closedloop_runtime::metrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use sqlx::Row;
use tokio_util::sync::CancellationToken;

use crate::store::{Db, OPEN_STATES_SQL, StoreError};

/// How often the open work orders are counted.
pub const CENSUS_INTERVAL: Duration = Duration::from_secs(15);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CensusLabels {
    pub tenant: String,
    pub team: String,
    /// `new`, `assigned`, … (the state's name without its prefix, lower case).
    pub state: String,
    /// `on_track`, `at_risk` or `breached`.
    pub sla: String,
}

static OPEN: LazyLock<Family<CensusLabels, Gauge>> = LazyLock::new(|| {
    metrics::register(
        "work_orders_open",
        "Open work orders by tenant, team, state and SLA state",
        Family::default(),
    )
});

/// An enum value's name as a label: `WORK_ORDER_STATE_IN_PROGRESS` → `in_progress`.
fn label(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix).unwrap_or(name).to_ascii_lowercase()
}

/// One census row's labels (pure).
pub fn labels(tenant: String, team: String, state: i32, sla: i32) -> CensusLabels {
    let state = WorkOrderState::try_from(state).unwrap_or(WorkOrderState::Unspecified);
    let sla = SlaState::try_from(sla).unwrap_or(SlaState::Unspecified);
    CensusLabels {
        tenant,
        team,
        state: label(state.as_str_name(), "WORK_ORDER_STATE_"),
        sla: label(sla.as_str_name(), "SLA_STATE_"),
    }
}

/// Counts the open work orders.
pub async fn count_open(db: &Db) -> Result<HashMap<CensusLabels, i64>, StoreError> {
    let rows = sqlx::query(&format!(
        "SELECT tenant, team, state, sla_state, count(*) AS open FROM work_orders \
         WHERE state IN {OPEN_STATES_SQL} GROUP BY tenant, team, state, sla_state"
    ))
    .fetch_all(&db.pool)
    .await?;
    let mut counts = HashMap::with_capacity(rows.len());
    for row in rows {
        let state: i16 = row.try_get("state")?;
        let sla: i16 = row.try_get("sla_state")?;
        let key = labels(
            row.try_get("tenant")?,
            row.try_get("team")?,
            state.into(),
            sla.into(),
        );
        counts.insert(key, row.try_get::<i64, _>("open")?);
    }
    Ok(counts)
}

/// Counts every [`CENSUS_INTERVAL`] until `cancel` fires. A group that empties is set to
/// zero rather than dropped, so its series ends at zero on the dashboard.
pub async fn run(db: Db, cancel: CancellationToken) {
    let mut shown: HashSet<CensusLabels> = HashSet::new();
    loop {
        match count_open(&db).await {
            Ok(counts) => {
                for gone in shown.iter().filter(|key| !counts.contains_key(*key)) {
                    OPEN.get_or_create(gone).set(0);
                }
                for (key, open) in &counts {
                    OPEN.get_or_create(key).set(*open);
                }
                shown.extend(counts.into_keys());
            }
            Err(error) => tracing::warn!(%error, "counting open work orders failed; the next round retries"),
        }
        tokio::select! {
            _ = tokio::time::sleep(CENSUS_INTERVAL) => {}
            _ = cancel.cancelled() => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_name_states_without_their_prefix() {
        let key = labels(
            "demo".into(),
            "network".into(),
            WorkOrderState::InProgress as i32,
            SlaState::AtRisk as i32,
        );
        assert_eq!((key.state.as_str(), key.sla.as_str()), ("in_progress", "at_risk"));
        let unknown = labels("demo".into(), "network".into(), 99, 99);
        assert_eq!(
            (unknown.state.as_str(), unknown.sla.as_str()),
            ("unspecified", "unspecified")
        );
    }
}
