//! The hot path: classified complaints become work orders in batches. Concurrent handlers
//! hand their complaint to one batcher task, which places whatever has queued up in a single
//! transaction (group commit): a few set-based reads, pure decisions (merge, incident,
//! assignment), then multi-row writes. A batch PostgreSQL refuses for a value one complaint
//! carries is placed complaint by complaint, so only that one fails. Replicas serialise on advisory locks for the keys a
//! batch touches (thread, poster + category, category + region) and on the row locks of the
//! agents they assign to, so two replicas never open two work orders for one poster's
//! problem, never assign past capacity and never open two incidents for one spike.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use closedloop_proto::v1::{IncidentOpened, WorkOrder, WorkOrderEventKind, WorkOrderState};
use closedloop_runtime::batch::{BatchWrite, WriteError};
use closedloop_runtime::bus::{self, OutgoingEvent};
use closedloop_runtime::{db, ids, time};
use sqlx::{PgPool, Postgres, Row, Transaction};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::Policy;
use crate::assignment::{self, Candidate};
use crate::store::{
    self, COLUMNS, NewWorkOrder, OPEN_STATES_SQL, Recorded, StoreError, from_row, parse_uuid, ts,
};

/// Most complaints placed in one transaction.
pub const MAX_BATCH: usize = 256;

/// A complaint ready to place: the work order it would open and how it was routed.
pub struct Draft {
    pub new: NewWorkOrder,
    pub account_managed: bool,
    pub route_reason: String,
    /// Trace context of the complaint's handler, for the events placement writes.
    pub trace: HashMap<String, String>,
}

/// What became of a classified complaint.
#[derive(Debug, Clone, PartialEq)]
pub enum Placement {
    /// A new work order was opened for it.
    Created(WorkOrder),
    /// Attached to an open work order: a thread follow-up or the same poster's same problem.
    Attached(WorkOrder),
    /// Handled before (a redelivery): nothing changed.
    AlreadyHandled,
}

/// Places what arrives together, for [`Batcher`].
pub struct Placer {
    pub pool: PgPool,
    pub policy: Arc<Policy>,
    /// Woken after each commit: its events wait in the history rows.
    pub relay_wake: Arc<Notify>,
}

impl BatchWrite for Placer {
    type Item = Draft;
    type Answer = Placement;

    async fn write(&mut self, drafts: &[Draft]) -> Result<Vec<Placement>, WriteError> {
        BATCH_SIZES.observe(drafts.len() as f64);
        match place_batch(&self.pool, &self.policy, drafts).await {
            Ok(placements) => {
                self.relay_wake.notify_one();
                Ok(placements)
            }
            Err(StoreError::Database(error)) if db::is_data_error(&error) => {
                Err(WriteError::Data(error.into()))
            }
            Err(error) => {
                tracing::warn!(%error, "placing a batch failed; its complaints will be tried again");
                Err(WriteError::Store(error.into()))
            }
        }
    }
}

/// Hands drafts to the placing task, which places whatever arrived within its linger in one
/// transaction.
pub type Batcher = closedloop_runtime::batch::Batcher<Placer>;

static BATCH_SIZES: std::sync::LazyLock<prometheus_client::metrics::histogram::Histogram> =
    std::sync::LazyLock::new(|| {
        let histogram = closedloop_runtime::metrics::batch_size_histogram();
        closedloop_runtime::metrics::register(
            "dispatch_placement_batch_size",
            "Complaints placed per transaction",
            histogram.clone(),
        );
        histogram
    });

/// Province, or province/city: the key incidents are counted by.
pub fn region_key(province: &str, city: &str) -> String {
    match (province.is_empty(), city.is_empty()) {
        (true, _) => String::new(),
        (false, true) => province.to_owned(),
        (false, false) => format!("{province}/{city}"),
    }
}

fn poster_id(wo: &WorkOrder) -> &str {
    wo.poster.as_ref().map_or("", |p| p.poster_id.as_str())
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

/// Gives the last recorded event the trace of the complaint that caused it.
fn trace_last(events: &mut [Recorded], trace: &HashMap<String, String>) {
    if let Some(last) = events.last_mut() {
        last.trace = Some(trace.clone());
    }
}

/// Bumps a work order's version for a system change and records it.
fn record(
    wo: &mut WorkOrder,
    kind: WorkOrderEventKind,
    note: String,
    now: DateTime<Utc>,
    events: &mut Vec<Recorded>,
) {
    wo.version += 1;
    wo.updated_at = ts(now);
    events.push(Recorded::new(wo, kind, "system", note));
}

/// Places a batch of drafts in one transaction; one result per draft, in order.
pub async fn place_batch(
    pool: &PgPool,
    policy: &Policy,
    drafts: &[Draft],
) -> Result<Vec<Placement>, StoreError> {
    let now = Utc::now();
    // The pool plans every statement for its arguments (see `closedloop_runtime::db`): a
    // cached generic plan made while the tables were nearly empty picked an index that matched
    // only the tenant, and a batch of 256 then took seconds.
    let mut tx = pool.begin().await?;

    // 1. Serialise with other replicas on everything this batch may touch.
    let mut keys: Vec<String> = drafts.iter().flat_map(|d| lock_keys(&d.new.work_order)).collect();
    keys.sort();
    keys.dedup();
    advisory_locks(&mut tx, &keys).await?;

    // 2. Complaints placed before (redeliveries).
    let complaint_ids: Vec<Uuid> = drafts
        .iter()
        .map(|d| parse_uuid(&d.new.work_order.complaint_id))
        .collect::<Result<_, _>>()?;
    let tenants: Vec<&str> = drafts.iter().map(|d| d.new.work_order.tenant.as_str()).collect();
    // Keyed by (tenant, complaint) so both lookups are unique-index probes, one per key
    // (LATERAL ... OFFSET 0, see below).
    let placed: HashSet<Uuid> = sqlx::query_scalar(
        "SELECT found.complaint_id FROM unnest($1::text[], $2::uuid[]) AS k(t, c), LATERAL ( \
           SELECT w.complaint_id FROM work_orders w WHERE w.tenant = k.t AND w.complaint_id = k.c \
           OFFSET 0) found \
         UNION SELECT found.complaint_id FROM unnest($1::text[], $2::uuid[]) AS k(t, c), LATERAL ( \
           SELECT l.complaint_id FROM complaint_links l WHERE l.tenant = k.t AND l.complaint_id = k.c \
           OFFSET 0) found",
    )
    .bind(&tenants)
    .bind(&complaint_ids)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();

    // 3. Open work orders a draft may join: same thread, or same poster and category.
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
    .fetch_all(&mut *tx)
    .await?;
    // Work orders in play, by id, with the indexes used to find them.
    let mut in_play: Vec<WorkOrder> = rows.iter().map(from_row).collect::<Result<_, _>>()?;
    let mut existing = vec![true; in_play.len()];
    let mut by_thread: HashMap<(String, String), usize> = HashMap::new();
    let mut by_poster: HashMap<(String, String, String), usize> = HashMap::new();
    let index = |wo: &WorkOrder, at: usize, by_thread: &mut HashMap<_, _>, by_poster: &mut HashMap<_, _>| {
        if !wo.thread_id.is_empty() {
            by_thread
                .entry((wo.tenant.clone(), wo.thread_id.clone()))
                .or_insert(at);
        }
        if !poster_id(wo).is_empty() {
            by_poster
                .entry((wo.tenant.clone(), poster_id(wo).to_owned(), wo.category.clone()))
                .or_insert(at);
        }
    };
    for (at, wo) in in_play.iter().enumerate() {
        index(wo, at, &mut by_thread, &mut by_poster);
    }

    // 4. Incidents: record arrivals, find open incidents, open new ones on a spike.
    let mut incidents = incidents_for(&mut tx, policy, drafts, &placed, now).await?;

    // 5. Decide, in order, so a later draft can join a work order an earlier one opened.
    let mut events: Vec<Recorded> = Vec::new();
    let mut links: Vec<(String, Uuid, Uuid)> = Vec::new();
    let mut outcomes: Vec<Result<usize, ()>> = Vec::with_capacity(drafts.len());
    let mut created: Vec<(usize, usize)> = Vec::new(); // (in_play index, draft index)
    let mut seen: HashSet<Uuid> = HashSet::new();
    for (draft_index, draft) in drafts.iter().enumerate() {
        let wo = &draft.new.work_order;
        let complaint = complaint_ids[draft_index];
        if placed.contains(&complaint) || !seen.insert(complaint) {
            outcomes.push(Err(()));
            continue;
        }
        let join = (!wo.thread_id.is_empty())
            .then(|| by_thread.get(&(wo.tenant.clone(), wo.thread_id.clone())))
            .flatten()
            .or_else(|| {
                (!poster_id(wo).is_empty())
                    .then(|| {
                        by_poster.get(&(wo.tenant.clone(), poster_id(wo).to_owned(), wo.category.clone()))
                    })
                    .flatten()
            })
            .copied();
        if let Some(target) = join {
            let open = &mut in_play[target];
            let how = if !wo.thread_id.is_empty() && open.thread_id == wo.thread_id {
                "thread follow-up"
            } else {
                "same poster and category"
            };
            links.push((wo.tenant.clone(), complaint, parse_uuid(&open.work_order_id)?));
            record(
                open,
                WorkOrderEventKind::Merged,
                format!("{how}: complaint {} attached", wo.complaint_id),
                now,
                &mut events,
            );
            trace_last(&mut events, &draft.trace);
            outcomes.push(Ok(target));
            continue;
        }
        let mut fresh = wo.clone();
        let key = (
            fresh.tenant.clone(),
            fresh.category.clone(),
            region_key(&fresh.province, &fresh.city),
        );
        if let Some(incident) = incidents.open.get(&key) {
            fresh.incident_id = incident.clone();
        }
        events.push(
            Recorded::new(
                &fresh,
                WorkOrderEventKind::Created,
                "system",
                draft.route_reason.clone(),
            )
            .traced(&draft.trace),
        );
        let at = in_play.len();
        index(&fresh, at, &mut by_thread, &mut by_poster);
        in_play.push(fresh);
        existing.push(false);
        created.push((at, draft_index));
        outcomes.push(Ok(at));
    }

    // Work orders opened before this batch that a new incident takes in.
    for (key, incident_id) in &incidents.newly_opened {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM work_orders WHERE tenant = $1 AND category = $2 AND state IN {OPEN_STATES_SQL} \
               AND incident_id IS NULL AND created_at >= $3 \
               AND (CASE WHEN city = '' THEN province ELSE province || '/' || city END) = $4 FOR UPDATE"
        ))
        .bind(&key.0)
        .bind(&key.1)
        .bind(now - incidents.window)
        .bind(&key.2)
        .fetch_all(&mut *tx)
        .await?;
        for row in rows {
            let wo = from_row(&row)?;
            let at = match in_play.iter().position(|w| w.work_order_id == wo.work_order_id) {
                Some(at) => at,
                None => {
                    in_play.push(wo);
                    existing.push(true);
                    in_play.len() - 1
                }
            };
            let target = &mut in_play[at];
            if target.incident_id.is_empty() {
                target.incident_id = incident_id.clone();
                record(
                    target,
                    WorkOrderEventKind::IncidentLinked,
                    format!("part of incident {incident_id}"),
                    now,
                    &mut events,
                );
            }
        }
    }
    incidents.count_attached(&in_play);

    // 6. Assignment of the new work orders that are not part of an incident.
    let to_assign: Vec<usize> = created
        .iter()
        .map(|(at, _)| *at)
        .filter(|at| in_play[*at].incident_id.is_empty())
        .collect();
    let managed: HashSet<usize> = created
        .iter()
        .filter(|(_, d)| drafts[*d].account_managed)
        .map(|(at, _)| *at)
        .collect();
    assign(&mut tx, &mut in_play, &to_assign, &managed, now, &mut events).await?;

    // 7. Write.
    let mut new_rows = Vec::with_capacity(created.len());
    for (at, draft_index) in &created {
        new_rows.push(NewWorkOrder {
            work_order: in_play[*at].clone(),
            first_response_risk_at: drafts[*draft_index].new.first_response_risk_at,
            resolution_risk_at: drafts[*draft_index].new.resolution_risk_at,
        });
    }
    store::insert_work_orders(&mut tx, &new_rows).await?;
    let touched: HashSet<&str> = events
        .iter()
        .map(|e| e.work_order.work_order_id.as_str())
        .collect();
    let changed = in_play
        .iter()
        .zip(&existing)
        .filter(|(wo, was_there)| **was_there && touched.contains(wo.work_order_id.as_str()))
        .map(|(wo, _)| wo);
    store::update_work_orders(&mut tx, changed).await?;
    if !links.is_empty() {
        sqlx::query(
            "INSERT INTO complaint_links (tenant, complaint_id, work_order_id) \
             SELECT * FROM unnest($1::text[], $2::uuid[], $3::uuid[])",
        )
        .bind(
            links
                .iter()
                .map(|(tenant, _, _)| tenant.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            links
                .iter()
                .map(|(_, complaint, _)| *complaint)
                .collect::<Vec<_>>(),
        )
        .bind(
            links
                .iter()
                .map(|(_, _, work_order)| *work_order)
                .collect::<Vec<_>>(),
        )
        .execute(&mut *tx)
        .await?;
    }
    store::write_events(&mut tx, &events).await?;
    store::write_outbox(&mut tx, &incidents.alerts).await?;
    tx.commit().await?;

    Ok(outcomes
        .into_iter()
        .enumerate()
        .map(|(draft_index, outcome)| match outcome {
            Err(()) => Placement::AlreadyHandled,
            Ok(at) if created.iter().any(|(c, d)| *c == at && *d == draft_index) => {
                Placement::Created(in_play[at].clone())
            }
            Ok(at) => Placement::Attached(in_play[at].clone()),
        })
        .collect())
}

/// Incidents a batch meets.
struct BatchIncidents {
    /// (tenant, category, region) → open incident id.
    open: HashMap<(String, String, String), String>,
    /// Opened by this batch.
    newly_opened: Vec<((String, String, String), String)>,
    /// `incident.opened` events of the new ones.
    alerts: Vec<OutgoingEvent>,
    pending_alerts: Vec<IncidentOpened>,
    window: Duration,
}

impl BatchIncidents {
    /// Fills in how many work orders each new incident starts with, and builds its alert.
    fn count_attached(&mut self, in_play: &[WorkOrder]) {
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

async fn incidents_for(
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

/// An agent row as assignment locks it.
pub(crate) struct TeamAgents {
    pub tenant: String,
    pub team: String,
    pub candidates: Vec<Candidate>,
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
