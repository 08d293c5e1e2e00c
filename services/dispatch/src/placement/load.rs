//! Placement's reads: everything a batch's decisions need, read and locked in its
//! transaction before any of them is made.

use std::collections::{HashMap, HashSet};

use crate::work_order::WorkOrder;
use chrono::{DateTime, Utc};
use sqlx::{Postgres, Row, Transaction};
use uuid::Uuid;

use super::incidents::{self, ArrivalCounts};
use super::staffing::{Staff, TeamAgents};
use super::{Draft, IncidentKey, poster_id, region_key};
use crate::Policy;
use crate::assignment::Candidate;
use crate::store::{COLUMNS, OPEN_STATES_SQL, QUEUED_STATES_SQL, StoreError, from_row};

/// What a batch's decisions are made over.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Complaints placed before: redeliveries.
    pub placed: HashSet<Uuid>,
    /// Open work orders a draft may join (same thread, or same poster and category), locked.
    pub joinable: Vec<WorkOrder>,
    /// Open incidents of the keys the batch arrives in: key → incident id.
    pub open_incidents: HashMap<IncidentKey, String>,
    /// Arrivals recorded before this batch, for the keys it arrives in.
    pub arrival_counts: HashMap<IncidentKey, ArrivalCounts>,
    /// For each incident the batch opens: the open work orders from its window that are in
    /// no incident yet, locked.
    pub takeable: HashMap<IncidentKey, Vec<WorkOrder>>,
    /// The agents of the teams the batch may open work for, and the posters' managers.
    pub staff: Staff,
}

/// Reads and locks what `drafts` may touch. Replicas serialise on advisory locks for the keys
/// a batch touches (thread, poster + category, category + region) and for the teams it
/// assigns to, always in this order, so they never open two work orders for one poster's
/// problem, never assign past capacity and never open two incidents for one spike.
pub async fn load(
    tx: &mut Transaction<'_, Postgres>,
    policy: &Policy,
    drafts: &[Draft],
    now: DateTime<Utc>,
) -> Result<Snapshot, StoreError> {
    let mut keys: Vec<String> = drafts.iter().flat_map(|d| lock_keys(&d.new.work_order)).collect();
    keys.sort();
    keys.dedup();
    advisory_locks(tx, &keys).await?;

    let placed = placed(tx, drafts).await?;
    let joinable = joinable(tx, drafts).await?;

    let arrivals = incidents::arrivals(drafts, &placed);
    let (open_incidents, arrival_counts) = incident_state(tx, policy, &arrivals, now).await?;
    let mut takeable = HashMap::new();
    for incident in incidents::spikes(policy, &open_incidents, &arrival_counts, &arrivals, now) {
        let orders =
            open_outside_incidents(tx, &incident.key, incidents::takes_in_since(policy, now)).await?;
        takeable.insert(incident.key, orders);
    }

    // Teams and posters of every complaint placed for the first time: a superset of what
    // assignment will need (some join open work or an incident instead).
    let fresh: Vec<&WorkOrder> = drafts
        .iter()
        .filter(|d| !placed.contains(&d.complaint))
        .map(|d| &d.new.work_order)
        .collect();
    let mut teams: Vec<(String, String)> = fresh
        .iter()
        .map(|wo| (wo.tenant.clone(), wo.team.clone()))
        .collect();
    teams.sort();
    teams.dedup();
    let managed_posters: Vec<(String, String)> = drafts
        .iter()
        .filter(|d| d.account_managed && !placed.contains(&d.complaint))
        .map(|d| {
            (
                d.new.work_order.tenant.clone(),
                poster_id(&d.new.work_order).to_owned(),
            )
        })
        .filter(|(_, poster)| !poster.is_empty())
        .collect();
    let staff = Staff {
        teams: lock_agents(tx, &teams).await?,
        managers: managers(tx, &managed_posters).await?,
    };
    Ok(Snapshot {
        placed,
        joinable,
        open_incidents,
        arrival_counts,
        takeable,
        staff,
    })
}

/// Advisory-lock keys for what a draft may touch, as text (hashed by PostgreSQL).
fn lock_keys(wo: &WorkOrder) -> Vec<String> {
    let mut keys = Vec::with_capacity(3);
    if !wo.thread_id.is_empty() {
        keys.push(format!("thread\u{1f}{}\u{1f}{}", wo.tenant, wo.thread_id));
    }
    if !poster_id(wo).is_empty() {
        keys.push(format!(
            "poster\u{1f}{}\u{1f}{}\u{1f}{}",
            wo.tenant,
            poster_id(wo),
            wo.category
        ));
    }
    let region = region_key(&wo.province, &wo.city);
    if !region.is_empty() {
        keys.push(format!(
            "region\u{1f}{}\u{1f}{}\u{1f}{}",
            wo.tenant, wo.category, region
        ));
    }
    keys
}

/// Takes transaction-scoped advisory locks on `keys` (sorted and without repeats, so that
/// transactions taking several always take them in the same order).
async fn advisory_locks(tx: &mut Transaction<'_, Postgres>, keys: &[String]) -> Result<(), StoreError> {
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

/// The batch's complaints that were placed before.
async fn placed(tx: &mut Transaction<'_, Postgres>, drafts: &[Draft]) -> Result<HashSet<Uuid>, StoreError> {
    let complaints: Vec<Uuid> = drafts.iter().map(|d| d.complaint).collect();
    let tenants: Vec<&str> = drafts.iter().map(|d| d.new.work_order.tenant.as_str()).collect();
    // Keyed by (tenant, complaint) so both lookups are unique-index probes, one per key
    // (LATERAL ... OFFSET 0, see `joinable`).
    let placed = sqlx::query_scalar(
        "SELECT found.complaint_id FROM unnest($1::text[], $2::uuid[]) AS k(t, c), LATERAL ( \
           SELECT w.complaint_id FROM work_orders w WHERE w.tenant = k.t AND w.complaint_id = k.c \
           OFFSET 0) found \
         UNION SELECT found.complaint_id FROM unnest($1::text[], $2::uuid[]) AS k(t, c), LATERAL ( \
           SELECT l.complaint_id FROM complaint_links l WHERE l.tenant = k.t AND l.complaint_id = k.c \
           OFFSET 0) found",
    )
    .bind(&tenants)
    .bind(&complaints)
    .fetch_all(&mut **tx)
    .await?;
    Ok(placed.into_iter().collect())
}

/// Open work orders a draft may join: same thread, or same poster and category.
async fn joinable(
    tx: &mut Transaction<'_, Postgres>,
    drafts: &[Draft],
) -> Result<Vec<WorkOrder>, StoreError> {
    // Keys spelled as the expression indexes of migration 0005 are.
    let thread_keys: Vec<String> = drafts
        .iter()
        .map(|d| &d.new.work_order)
        .filter(|wo| !wo.thread_id.is_empty())
        .map(|wo| format!("{}\u{1f}{}", wo.tenant, wo.thread_id))
        .collect();
    let poster_keys: Vec<String> = drafts
        .iter()
        .map(|d| &d.new.work_order)
        .filter(|wo| !poster_id(wo).is_empty())
        .map(|wo| format!("{}\u{1f}{}\u{1f}{}", wo.tenant, poster_id(wo), wo.category))
        .collect();
    let rows = sqlx::query(&format!(
        // Two lookups rather than one OR, so each side probes its own index, once per key:
        // LATERAL with OFFSET 0 keeps the planner from turning the probes into a hash join.
        // It did that while its statistics lagged a young, fast-growing table (as in
        // bench-loop), reading every open work order twice and the table once: 40-75 ms a
        // batch. The outer lookup by id array is a primary-key probe for the same reason.
        "SELECT {COLUMNS} FROM work_orders WHERE work_order_id = ANY(ARRAY( \
           SELECT m.work_order_id FROM unnest($1::text[]) AS k(key), LATERAL ( \
             SELECT w.work_order_id FROM work_orders w \
             WHERE (w.tenant || E'\\x1f' || w.thread_id) = k.key \
               AND w.thread_id <> '' AND w.state IN {OPEN_STATES_SQL} OFFSET 0) m \
           UNION SELECT m.work_order_id FROM unnest($2::text[]) AS k(key), LATERAL ( \
             SELECT w.work_order_id FROM work_orders w \
             WHERE (w.tenant || E'\\x1f' || w.poster_id || E'\\x1f' || w.category) = k.key \
               AND w.poster_id <> '' AND w.state IN {OPEN_STATES_SQL} OFFSET 0) m)) \
         ORDER BY created_at FOR UPDATE"
    ))
    .bind(&thread_keys)
    .bind(&poster_keys)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows.iter().map(from_row).collect::<Result<_, _>>()?)
}

/// Open incidents and recorded arrivals for the keys the batch arrives in. The keys' region
/// advisory locks keep other replicas off these rows until commit.
async fn incident_state(
    tx: &mut Transaction<'_, Postgres>,
    policy: &Policy,
    arrivals: &[IncidentKey],
    now: DateTime<Utc>,
) -> Result<(HashMap<IncidentKey, String>, HashMap<IncidentKey, ArrivalCounts>), StoreError> {
    let mut open = HashMap::new();
    let mut counts = HashMap::new();
    if arrivals.is_empty() {
        return Ok((open, counts));
    }
    let (tenants, categories, regions) = columns(arrivals);
    let rows = sqlx::query(
        "SELECT i.incident_id, i.tenant, i.category, i.region FROM incidents i \
         WHERE i.resolved_at IS NULL AND (i.tenant, i.category, i.region) IN ( \
           SELECT * FROM unnest($1::text[], $2::text[], $3::text[]))",
    )
    .bind(&tenants)
    .bind(&categories)
    .bind(&regions)
    .fetch_all(&mut **tx)
    .await?;
    for row in rows {
        let id: Uuid = row.try_get("incident_id")?;
        open.insert(key_of(&row)?, id.to_string());
    }
    let rows = sqlx::query(
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
    .bind(incidents::takes_in_since(policy, now))
    .bind(incidents::baseline_from(policy, now))
    .fetch_all(&mut **tx)
    .await?;
    for row in rows {
        counts.insert(
            key_of(&row)?,
            ArrivalCounts {
                recent: row.try_get("recent")?,
                earlier: row.try_get("earlier")?,
            },
        );
    }
    Ok((open, counts))
}

/// Incident keys as three parallel arrays, for `unnest`.
pub(super) fn columns(keys: &[IncidentKey]) -> (Vec<&str>, Vec<&str>, Vec<&str>) {
    let mut columns = (Vec::new(), Vec::new(), Vec::new());
    for (tenant, category, region) in keys {
        columns.0.push(tenant.as_str());
        columns.1.push(category.as_str());
        columns.2.push(region.as_str());
    }
    columns
}

fn key_of(row: &sqlx::postgres::PgRow) -> Result<IncidentKey, sqlx::Error> {
    Ok((
        row.try_get("tenant")?,
        row.try_get("category")?,
        row.try_get("region")?,
    ))
}

/// Open work orders of one key created since `since` that are in no incident, locked.
async fn open_outside_incidents(
    tx: &mut Transaction<'_, Postgres>,
    key: &IncidentKey,
    since: DateTime<Utc>,
) -> Result<Vec<WorkOrder>, StoreError> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM work_orders WHERE tenant = $1 AND category = $2 AND state IN {OPEN_STATES_SQL} \
           AND incident_id IS NULL AND created_at >= $3 \
           AND (CASE WHEN city = '' THEN province ELSE province || '/' || city END) = $4 FOR UPDATE"
    ))
    .bind(&key.0)
    .bind(&key.1)
    .bind(since)
    .bind(&key.2)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows.iter().map(from_row).collect::<Result<_, _>>()?)
}

/// Takes these teams for assignment and reads their agents with their open work. One
/// advisory lock per team serialises assignment to it across replicas; the agents are read
/// after it, so their counts (`open_load`, kept by a trigger on `work_orders`) include what
/// any assignment that held the lock before committed. Locking every agent row instead
/// wrote a lock into each (a third of PostgreSQL's WAL records at 1,000/s, BENCHMARKS.md).
/// Other writers of an agent's row (going offline, a manual reassignment) do not take the
/// lock; as before, one that commits just after the read is seen by the next assignment.
pub(super) async fn lock_agents(
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
            entry
                .candidates
                .push(closedloop_runtime::from_columns![Candidate; &row;
                    agent_id, skills, capacity, online, last_assigned_at;
                    load: row.try_get("open_load")?,
                ]);
        }
    }
    Ok(result)
}

/// The account managers these (tenant, poster) pairs have.
pub(super) async fn managers(
    tx: &mut Transaction<'_, Postgres>,
    posters: &[(String, String)],
) -> Result<HashMap<(String, String), String>, StoreError> {
    let mut managers = HashMap::new();
    if posters.is_empty() {
        return Ok(managers);
    }
    let (tenants, posters): (Vec<&str>, Vec<&str>) =
        posters.iter().map(|(t, p)| (t.as_str(), p.as_str())).unzip();
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
    Ok(managers)
}

/// Up to `limit` queued work orders of one team that are in no incident, most urgent then
/// oldest, locked; rows another transaction holds are skipped.
pub(super) async fn queued(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &str,
    team: &str,
    limit: i64,
) -> Result<Vec<WorkOrder>, StoreError> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM work_orders WHERE tenant = $1 AND team = $2 AND assignee = '' \
           AND state IN {QUEUED_STATES_SQL} AND incident_id IS NULL \
         ORDER BY priority, created_at LIMIT $3 FOR UPDATE SKIP LOCKED"
    ))
    .bind(tenant)
    .bind(team)
    .bind(limit)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows.iter().map(from_row).collect::<Result<_, _>>()?)
}
