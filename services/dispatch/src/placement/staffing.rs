//! Staffing a team's work inside placement's transaction: taking a team's agents (one
//! advisory lock per team), giving queued work to whoever has room, and recording who took
//! work last for round-robin.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Duration, Utc};
use closedloop_proto::v1::{WorkOrder, WorkOrderEventKind, WorkOrderState};
use sqlx::{PgPool, Postgres, Row, Transaction};
use tokio::sync::Notify;

use super::{poster_id, record};
use crate::assignment::{self, Candidate};
use crate::store::{self, COLUMNS, Recorded, StoreError, from_row};

/// An agent row as assignment locks it.
pub(crate) struct TeamAgents {
    pub tenant: String,
    pub team: String,
    pub candidates: Vec<Candidate>,
}

/// Takes transaction-scoped advisory locks on `keys` (sorted and without repeats, so that
/// transactions taking several always take them in the same order).
pub(super) async fn advisory_locks(
    tx: &mut Transaction<'_, Postgres>,
    keys: &[String],
) -> Result<(), StoreError> {
    if !keys.is_empty() {
        sqlx::query(
            "SELECT count(pg_advisory_xact_lock(hashtextextended(k, 0))) FROM unnest($1::text[]) AS k",
        )
        .bind(keys)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Takes these teams for assignment and reads their agents with their open work. One
/// advisory lock per team serialises assignment to it across replicas; the agents are read
/// after it, so their counts (`open_load`, kept by a trigger on `work_orders`) include what
/// any assignment that held the lock before committed. Locking every agent row instead
/// wrote a lock into each (a third of PostgreSQL's WAL records at 1,000/s, BENCHMARKS.md).
/// Other writers of an agent's row (going offline, a manual reassignment) do not take the
/// lock; as before, one that commits just after the read is seen by the next assignment.
pub(crate) async fn lock_agents(
    tx: &mut Transaction<'_, Postgres>,
    teams: &[(String, String)],
) -> Result<Vec<TeamAgents>, StoreError> {
    if teams.is_empty() {
        return Ok(Vec::new());
    }
    let mut keys: Vec<String> = teams
        .iter()
        .map(|(tenant, team)| format!("team\u{1f}{tenant}\u{1f}{team}"))
        .collect();
    keys.sort();
    keys.dedup();
    advisory_locks(tx, &keys).await?;
    let (tenants, names): (Vec<&str>, Vec<&str>) =
        teams.iter().map(|(t, n)| (t.as_str(), n.as_str())).unzip();
    let rows = sqlx::query(
        "SELECT a.tenant, a.team_id, a.agent_id, a.skills, a.capacity, a.online, a.last_assigned_at, a.open_load \
         FROM agents a WHERE (a.tenant, a.team_id) IN (SELECT * FROM unnest($1::text[], $2::text[])) \
         ORDER BY a.tenant, a.agent_id",
    )
    .bind(&tenants)
    .bind(&names)
    .fetch_all(&mut **tx)
    .await?;
    let mut result: Vec<TeamAgents> = teams
        .iter()
        .map(|(tenant, team)| TeamAgents {
            tenant: tenant.clone(),
            team: team.clone(),
            candidates: Vec::new(),
        })
        .collect();
    for row in rows {
        let tenant: String = row.try_get("tenant")?;
        let team: String = row.try_get("team_id")?;
        if let Some(entry) = result.iter_mut().find(|t| t.tenant == tenant && t.team == team) {
            entry.candidates.push(Candidate {
                agent_id: row.try_get("agent_id")?,
                skills: row.try_get("skills")?,
                capacity: row.try_get("capacity")?,
                online: row.try_get("online")?,
                load: row.try_get("open_load")?,
                last_assigned_at: row.try_get("last_assigned_at")?,
            });
        }
    }
    Ok(result)
}

/// Records who took work last, for round-robin.
pub(crate) async fn save_round_robin(
    tx: &mut Transaction<'_, Postgres>,
    teams: &[TeamAgents],
    since: DateTime<Utc>,
) -> Result<(), StoreError> {
    let mut tenants = Vec::new();
    let mut agents = Vec::new();
    let mut times = Vec::new();
    for team in teams {
        for candidate in team.candidates.iter().filter(|c| c.last_assigned_at >= since) {
            tenants.push(team.tenant.clone());
            agents.push(candidate.agent_id.clone());
            times.push(candidate.last_assigned_at);
        }
    }
    if !agents.is_empty() {
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
    Ok(())
}

/// Gives each of `targets` (indexes into `in_play`, all queued) to an agent of its team if
/// one is free; account-managed posters go to the manager they had.
pub(crate) async fn assign(
    tx: &mut Transaction<'_, Postgres>,
    in_play: &mut [WorkOrder],
    targets: &[usize],
    managed: &HashSet<usize>,
    now: DateTime<Utc>,
    events: &mut Vec<Recorded>,
) -> Result<usize, StoreError> {
    if targets.is_empty() {
        return Ok(0);
    }
    let mut teams: Vec<(String, String)> = targets
        .iter()
        .map(|at| (in_play[*at].tenant.clone(), in_play[*at].team.clone()))
        .collect();
    teams.sort();
    teams.dedup();
    let mut agents = lock_agents(tx, &teams).await?;
    if agents.iter().all(|t| t.candidates.is_empty()) {
        return Ok(0);
    }
    // Managers posters already have.
    let managed_posters: Vec<(String, String)> = targets
        .iter()
        .filter(|at| managed.contains(at))
        .map(|at| (in_play[*at].tenant.clone(), poster_id(&in_play[*at]).to_owned()))
        .filter(|(_, p)| !p.is_empty())
        .collect();
    let mut managers: HashMap<(String, String), String> = HashMap::new();
    if !managed_posters.is_empty() {
        let (tenants, posters): (Vec<&str>, Vec<&str>) = managed_posters
            .iter()
            .map(|(t, p)| (t.as_str(), p.as_str()))
            .unzip();
        let rows = sqlx::query(
            "SELECT m.tenant, m.poster_id, m.agent_id FROM account_managers m WHERE EXISTS ( \
               SELECT 1 FROM unnest($1::text[], $2::text[]) AS k(t, p) WHERE m.tenant = k.t AND m.poster_id = k.p)",
        )
        .bind(&tenants)
        .bind(&posters)
        .fetch_all(&mut **tx)
        .await?;
        for row in rows {
            managers.insert(
                (row.try_get("tenant")?, row.try_get("poster_id")?),
                row.try_get("agent_id")?,
            );
        }
    }
    let mut new_managers: Vec<(String, String, String)> = Vec::new();
    let mut assigned = 0;
    // Most urgent first, then oldest.
    let mut order: Vec<usize> = targets.to_vec();
    order.sort_by_key(|at| {
        (
            in_play[*at].priority,
            in_play[*at].created_at.as_ref().map(|t| (t.seconds, t.nanos)),
        )
    });
    let mut tick = 0;
    for at in order {
        let wo = &in_play[at];
        let Some(team) = agents
            .iter_mut()
            .find(|t| t.tenant == wo.tenant && t.team == wo.team)
        else {
            continue;
        };
        let poster_key = (wo.tenant.clone(), poster_id(wo).to_owned());
        let is_managed = managed.contains(&at) && !poster_key.1.is_empty();
        let sticky = is_managed
            .then(|| managers.get(&poster_key))
            .flatten()
            .and_then(|agent| team.candidates.iter().position(|c| &c.agent_id == agent));
        let (choice, why) = match sticky {
            Some(index) => (Some(index), "their account manager"),
            None => (assignment::choose(&team.candidates, &wo.skill), "least loaded"),
        };
        let Some(index) = choice else {
            continue;
        };
        tick += 1;
        assignment::take(&mut team.candidates, index, now + Duration::microseconds(tick));
        let agent = team.candidates[index].agent_id.clone();
        if is_managed && sticky.is_none() {
            managers.insert(poster_key.clone(), agent.clone());
            new_managers.push((poster_key.0, poster_key.1, agent.clone()));
        }
        let wo = &mut in_play[at];
        wo.assignee = agent.clone();
        wo.set_state(WorkOrderState::Assigned);
        record(
            wo,
            WorkOrderEventKind::Assigned,
            format!("assigned to {agent} ({why})"),
            now,
            events,
        );
        assigned += 1;
    }
    save_round_robin(tx, &agents, now).await?;
    if !new_managers.is_empty() {
        let mut insert = sqlx::QueryBuilder::<Postgres>::new(
            "INSERT INTO account_managers (tenant, poster_id, agent_id) ",
        );
        insert.push_values(&new_managers, |mut row, (tenant, poster, agent)| {
            row.push_bind(tenant).push_bind(poster).push_bind(agent);
        });
        insert.push(" ON CONFLICT DO NOTHING");
        insert.build().execute(&mut **tx).await?;
    }
    Ok(assigned)
}

/// Offers a team's queue to whoever has room now (after a resolution or an agent coming
/// online) and wakes the relay for the assignments. Failures only delay the work: the
/// watcher's round tries again.
pub async fn offer_queue(
    pool: &PgPool,
    relay_wake: &Notify,
    tenant: &str,
    team: &str,
    account_manager_team: Option<&str>,
) {
    match assign_queued(pool, tenant, team, account_manager_team).await {
        Ok(0) => {}
        Ok(_) => relay_wake.notify_one(),
        Err(error) => tracing::warn!(%error, %team, "assigning queued work failed; the watcher retries"),
    }
}

/// Assigns queued work of one team while agents have room: after a resolution, an agent
/// coming online, or on the watcher's round. Queued work of the account-manager team goes to
/// the poster's manager, or makes whoever takes it their manager. Returns how many were assigned.
pub async fn assign_queued(
    pool: &PgPool,
    tenant: &str,
    team: &str,
    account_manager_team: Option<&str>,
) -> Result<usize, StoreError> {
    let now = Utc::now();
    let mut tx = pool.begin().await?;
    // Take the team first (as placement does), then the queue.
    let agents = lock_agents(&mut tx, &[(tenant.to_owned(), team.to_owned())]).await?;
    let free: i64 = agents
        .iter()
        .flat_map(|t| &t.candidates)
        .filter(|c| c.online)
        .map(|c| i64::from((c.capacity - c.load).max(0)))
        .sum();
    if free == 0 {
        return Ok(0);
    }
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM work_orders WHERE tenant = $1 AND team = $2 AND assignee = '' \
           AND state = ANY($3) AND incident_id IS NULL \
         ORDER BY priority, created_at LIMIT $4 FOR UPDATE SKIP LOCKED"
    ))
    .bind(tenant)
    .bind(team)
    .bind(vec![WorkOrderState::New as i16, WorkOrderState::Reopened as i16])
    .bind(free)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut queued: Vec<WorkOrder> = rows.iter().map(from_row).collect::<Result<_, _>>()?;
    let targets: Vec<usize> = (0..queued.len()).collect();
    let managed: HashSet<usize> = if account_manager_team == Some(team) {
        targets.iter().copied().collect()
    } else {
        HashSet::new()
    };
    let mut events = Vec::new();
    // lock_agents again inside assign takes a lock this transaction already holds.
    let assigned = assign(&mut tx, &mut queued, &targets, &managed, now, &mut events).await?;
    store::update_work_orders(&mut tx, queued.iter().filter(|w| !w.assignee.is_empty())).await?;
    store::write_events(&mut tx, &events).await?;
    tx.commit().await?;
    Ok(assigned)
}
