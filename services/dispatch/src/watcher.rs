//! The SLA watcher: on each round it marks open work orders at risk or breached, escalates
//! breached ones (one priority step up, into the escalation team's queue), closes resolved
//! work orders the customer never answered, and offers queued work to agents with room.
//! Rows are claimed with `FOR UPDATE SKIP LOCKED` and the new SLA state is written in the
//! same transaction as the event, so several replicas never escalate one work order twice.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use closedloop_proto::v1::{SlaState, WorkOrderState};

use crate::work_order::WorkOrder;
use sqlx::Row;
use tokio_util::sync::CancellationToken;

use crate::Policy;
use crate::lifecycle::Action;
use crate::placement;
use crate::store::{self, COLUMNS, Change, Db, OPEN_STATES_SQL, QUEUED_STATES_SQL, StoreError, from_row};

/// Work orders handled per transaction.
const CHUNK: i64 = 200;

/// Where a work order stands at `now` (pure).
pub fn sla_verdict(wo: &WorkOrder, risk: (DateTime<Utc>, DateTime<Utc>), now: DateTime<Utc>) -> SlaState {
    let responded = wo.first_responded_at.is_some();
    if (!responded && wo.first_response_due <= now) || wo.resolution_due <= now {
        SlaState::Breached
    } else if (!responded && risk.0 <= now) || risk.1 <= now {
        SlaState::AtRisk
    } else {
        SlaState::OnTrack
    }
}

/// One round of SLA checks; returns how many work orders changed.
pub async fn check_sla(db: &Db, policy: &Policy) -> Result<usize, StoreError> {
    let now = Utc::now();
    let mut tx = db.begin().await?;
    // Values inlined, so the planner can match them against partial indexes.
    let (at_risk, breached) = (SlaState::AtRisk as i32, SlaState::Breached as i32);
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS}, first_response_risk_at, resolution_risk_at FROM work_orders \
         WHERE state IN {OPEN_STATES_SQL} AND ( \
           (sla_state < {at_risk} AND ((first_responded_at IS NULL AND first_response_risk_at <= $1) OR resolution_risk_at <= $1)) \
           OR (sla_state < {breached} AND ((first_responded_at IS NULL AND first_response_due <= $1) OR resolution_due <= $1))) \
         ORDER BY resolution_due LIMIT $2 FOR UPDATE SKIP LOCKED"
    ))
    .bind(now)
    .bind(CHUNK)
    .fetch_all(&mut **tx)
    .await?;
    let mut changed = 0;
    let mut queues = Vec::new();
    for row in &rows {
        let mut wo = from_row(row)?;
        let risk: (Option<DateTime<Utc>>, Option<DateTime<Utc>>) = (
            row.try_get("first_response_risk_at")?,
            row.try_get("resolution_risk_at")?,
        );
        let risk = (risk.0.unwrap_or(now), risk.1.unwrap_or(now));
        let verdict = sla_verdict(&wo, risk, now);
        if verdict <= wo.sla_state {
            continue;
        }
        let missed = if wo.first_responded_at.is_none() && wo.first_response_due <= now {
            "first response"
        } else {
            "resolution"
        };
        match verdict {
            SlaState::Breached => {
                let note = format!(
                    "{missed} target missed; escalated to {}",
                    policy.sla.escalation_team
                );
                let change = Change {
                    action: Action::SlaBreach,
                    expected_version: 0,
                    actor: "sla-watcher",
                    note: &note,
                };
                let team = policy.sla.escalation_team.clone();
                store::apply_locked(&mut tx, &mut wo, change, |wo| wo.team = team).await?;
                queues.push((wo.tenant.clone(), wo.team.clone()));
            }
            SlaState::AtRisk => {
                let note = format!("{missed} target at risk");
                let change = Change {
                    action: Action::SlaAtRisk,
                    expected_version: 0,
                    actor: "sla-watcher",
                    note: &note,
                };
                store::apply_locked(&mut tx, &mut wo, change, |_| {}).await?;
            }
            _ => continue,
        }
        changed += 1;
    }
    tx.commit().await?;
    queues.sort();
    queues.dedup();
    for (tenant, team) in queues {
        placement::assign_queued(db, &tenant, &team, policy.router.account_manager_team()).await?;
    }
    Ok(changed)
}

/// Closes resolved work orders nobody answered in time; returns how many.
pub async fn close_unanswered(db: &Db, policy: &Policy) -> Result<usize, StoreError> {
    let cutoff = Utc::now() - policy.close_unanswered_after;
    let mut tx = db.begin().await?;
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM work_orders WHERE state = $1 AND resolved_at <= $2 \
         ORDER BY resolved_at LIMIT $3 FOR UPDATE SKIP LOCKED"
    ))
    .bind(WorkOrderState::Resolved as i16)
    .bind(cutoff)
    .bind(CHUNK)
    .fetch_all(&mut **tx)
    .await?;
    for row in &rows {
        let mut wo = from_row(row)?;
        let change = Change {
            action: Action::Close,
            expected_version: 0,
            actor: "sla-watcher",
            note: "no answer to the survey",
        };
        store::apply_locked(&mut tx, &mut wo, change, |_| {}).await?;
    }
    tx.commit().await?;
    Ok(rows.len())
}

/// Offers every team's queue to its agents (covers capacity freed on another replica).
pub async fn offer_queues(db: &Db, policy: &Policy) -> Result<usize, StoreError> {
    let teams = sqlx::query(&format!(
        "SELECT DISTINCT w.tenant, w.team FROM work_orders w WHERE w.assignee = '' AND w.state IN {QUEUED_STATES_SQL} \
           AND w.incident_id IS NULL AND EXISTS (SELECT 1 FROM agents a WHERE a.tenant = w.tenant \
           AND a.team_id = w.team AND a.online)"
    ))
    .fetch_all(&db.pool)
    .await?;
    let mut assigned = 0;
    for row in teams {
        let tenant: String = row.try_get("tenant")?;
        let team: String = row.try_get("team")?;
        assigned +=
            placement::assign_queued(db, &tenant, &team, policy.router.account_manager_team()).await?;
    }
    Ok(assigned)
}

/// Runs rounds until `cancel` fires.
pub async fn run(db: Db, policy: Arc<Policy>, cancel: CancellationToken) {
    loop {
        let round = async {
            let mut changed = 0;
            // Drain: a backlog larger than one chunk is worked off in one round.
            loop {
                let n = check_sla(&db, &policy).await?;
                changed += n;
                if n < CHUNK as usize {
                    break;
                }
            }
            changed += close_unanswered(&db, &policy).await?;
            changed += offer_queues(&db, &policy).await?;
            Ok::<usize, StoreError>(changed)
        };
        match round.await {
            Ok(0) => {}
            Ok(changed) => tracing::info!(changed, "SLA watcher round"),
            Err(error) => tracing::warn!(%error, "SLA watcher round failed; next round retries"),
        }
        tokio::select! {
            _ = tokio::time::sleep(policy.sla.watch_interval) => {}
            _ = cancel.cancelled() => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    fn work_order(opened: DateTime<Utc>) -> WorkOrder {
        WorkOrder {
            first_response_due: opened + Duration::minutes(10),
            resolution_due: opened + Duration::minutes(100),
            ..Default::default()
        }
    }

    #[test]
    fn verdicts_follow_the_clock_and_the_first_response() {
        use SlaState::*;
        let opened = Utc::now();
        let risk = (opened + Duration::minutes(8), opened + Duration::minutes(80));
        let mut wo = work_order(opened);
        let at = |minutes| opened + Duration::minutes(minutes);
        // Not yet answered: the first-response targets count.
        for (minutes, expected) in [(0, OnTrack), (9, AtRisk), (10, Breached)] {
            assert_eq!(sla_verdict(&wo, risk, at(minutes)), expected, "minute {minutes}");
        }
        // Answered at minute 5: only the resolution targets count.
        wo.first_responded_at = Some(at(5));
        for (minutes, expected) in [(30, OnTrack), (85, AtRisk), (100, Breached)] {
            assert_eq!(sla_verdict(&wo, risk, at(minutes)), expected, "minute {minutes}");
        }
    }
}
