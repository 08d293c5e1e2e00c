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

use chrono::{DateTime, Utc};
use closedloop_proto::v1::{WorkOrder, WorkOrderEventKind};
use closedloop_runtime::batch::{BatchWrite, WriteError};
use closedloop_runtime::db;
use sqlx::PgPool;
use tokio::sync::Notify;
use uuid::Uuid;

mod incidents;
mod staffing;

use incidents::incidents_for;
use staffing::{advisory_locks, assign};
pub use staffing::{assign_queued, offer_queue};

use crate::Policy;
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

pub(super) fn poster_id(wo: &WorkOrder) -> &str {
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
pub(super) fn record(
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
