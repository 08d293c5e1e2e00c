//! A team's queue offered to whoever has room: after a resolution, an agent coming online, or
//! on the watcher's round. Load, decide (the same assignment as placement's), write.

use std::collections::HashSet;

use chrono::Utc;

use super::staffing::{self, Staff};
use super::{load, poster_id, write};
use crate::store::{self, Db, StoreError};

/// Offers a team's queue. Failures only delay the work: the watcher's round tries again.
pub async fn offer_queue(db: &Db, tenant: &str, team: &str, account_manager_team: Option<&str>) {
    if let Err(error) = assign_queued(db, tenant, team, account_manager_team).await {
        tracing::warn!(%error, %team, "assigning queued work failed; the watcher retries");
    }
}

/// Assigns queued work of one team while agents have room. Queued work of the
/// account-manager team goes to the poster's manager, or makes whoever takes it their
/// manager. Returns how many were assigned.
pub async fn assign_queued(
    db: &Db,
    tenant: &str,
    team: &str,
    account_manager_team: Option<&str>,
) -> Result<usize, StoreError> {
    let now = Utc::now();
    let mut tx = db.begin().await?;
    // Take the team first (as placement does), then the queue.
    let mut staff = Staff {
        teams: load::lock_agents(&mut tx, &[(tenant.to_owned(), team.to_owned())]).await?,
        ..Staff::default()
    };
    let room = staff.room();
    if room == 0 {
        return Ok(0);
    }
    let mut queued = load::queued(&mut tx, tenant, team, room).await?;
    if queued.is_empty() {
        return Ok(0);
    }
    let targets: Vec<usize> = (0..queued.len()).collect();
    let managed: HashSet<usize> = if account_manager_team == Some(team) {
        let posters: Vec<(String, String)> = queued
            .iter()
            .map(|wo| (wo.tenant.clone(), poster_id(wo).to_owned()))
            .filter(|(_, poster)| !poster.is_empty())
            .collect();
        staff.managers = load::managers(&mut tx, &posters).await?;
        targets.iter().copied().collect()
    } else {
        HashSet::new()
    };
    let mut events = Vec::new();
    let changes = staffing::assign(&mut staff, &mut queued, &targets, &managed, now, &mut events);
    store::update_work_orders(&mut tx, queued.iter().filter(|w| !w.assignee.is_empty())).await?;
    write::write_staffing(&mut tx, &changes).await?;
    store::write_events(&mut tx, &events).await?;
    tx.commit().await?;
    Ok(changes.assigned)
}
