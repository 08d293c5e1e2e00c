//! Placement's decisions, made over a [`Snapshot`] without touching the database: which
//! complaints are redeliveries, which join an open work order, which open one, which
//! incidents open and what they take in, and who is assigned.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use closedloop_proto::v1::WorkOrderEventKind;

use crate::work_order::WorkOrder;
use closedloop_runtime::bus::OutgoingEvent;
use uuid::Uuid;

use super::incidents::{self, NewIncident};
use super::load::Snapshot;
use super::staffing::{self, StaffChanges};
use super::{Draft, IncidentKey, Placement, poster_id, record, region_key};
use crate::Policy;
use crate::lifecycle::{self, Action};
use crate::store::{NewWorkOrder, Recorded};

/// A complaint attached to an open work order.
#[derive(Debug, Clone, PartialEq)]
pub struct ComplaintLink {
    pub tenant: String,
    pub complaint_id: Uuid,
    pub work_order_id: String,
}

/// Everything a batch writes, and what became of each complaint.
#[derive(Debug, Default)]
pub struct Plan {
    /// The time every decision was made at.
    pub decided_at: DateTime<Utc>,
    /// One per draft, in order.
    pub placements: Vec<Placement>,
    /// One key per arrival to count.
    pub arrivals: Vec<IncidentKey>,
    /// Arrivals older than this are dropped.
    pub forget_arrivals_before: Option<DateTime<Utc>>,
    pub incidents: Vec<NewIncident>,
    /// `incident.opened` events for the outbox.
    pub alerts: Vec<OutgoingEvent>,
    pub inserts: Vec<NewWorkOrder>,
    /// Work orders that existed before the batch and changed.
    pub updates: Vec<WorkOrder>,
    pub links: Vec<ComplaintLink>,
    /// History rows, each carrying its event for the relay.
    pub events: Vec<Recorded>,
    pub staffing: StaffChanges,
}

/// What became of one draft, by index into [`InPlay`].
enum Slot {
    AlreadyHandled,
    Created(usize),
    Attached(usize),
}

/// The work orders a batch works on: those it read and those it opens, with the keys a
/// later draft joins them by.
#[derive(Default)]
struct InPlay {
    orders: Vec<WorkOrder>,
    /// Whether each was read (to update) rather than opened (to insert).
    existing: Vec<bool>,
    by_thread: HashMap<(String, String), usize>,
    by_poster: HashMap<(String, String, String), usize>,
}

impl InPlay {
    fn add(&mut self, wo: WorkOrder, existing: bool) -> usize {
        let at = self.orders.len();
        if !wo.thread_id.is_empty() {
            self.by_thread
                .entry((wo.tenant.clone(), wo.thread_id.clone()))
                .or_insert(at);
        }
        if !poster_id(&wo).is_empty() {
            self.by_poster
                .entry((wo.tenant.clone(), poster_id(&wo).to_owned(), wo.category.clone()))
                .or_insert(at);
        }
        self.orders.push(wo);
        self.existing.push(existing);
        at
    }

    /// The open work order a new complaint joins: its thread's, else its poster's for the
    /// same category.
    fn join_target(&self, wo: &WorkOrder) -> Option<usize> {
        let takes_merges = |at: &usize| lifecycle::next_state(self.orders[*at].state, Action::Merge).is_ok();
        let by_thread = (!wo.thread_id.is_empty())
            .then(|| self.by_thread.get(&(wo.tenant.clone(), wo.thread_id.clone())))
            .flatten();
        let by_poster = || {
            (!poster_id(wo).is_empty())
                .then(|| {
                    self.by_poster
                        .get(&(wo.tenant.clone(), poster_id(wo).to_owned(), wo.category.clone()))
                })
                .flatten()
        };
        by_thread
            .filter(|at| takes_merges(at))
            .or_else(|| by_poster().filter(|at| takes_merges(at)))
            .copied()
    }

    fn position(&self, work_order_id: &str) -> Option<usize> {
        self.orders.iter().position(|w| w.work_order_id == work_order_id)
    }
}

/// Decides a batch, in order, so a later draft can join a work order an earlier one opened.
pub fn decide(snapshot: &Snapshot, drafts: &[Draft], policy: &Policy, now: DateTime<Utc>) -> Plan {
    let mut plan = Plan {
        decided_at: now,
        ..Plan::default()
    };
    let mut in_play = InPlay::default();
    for wo in &snapshot.joinable {
        in_play.add(wo.clone(), true);
    }

    plan.arrivals = incidents::arrivals(drafts, &snapshot.placed);
    plan.forget_arrivals_before = (!plan.arrivals.is_empty()).then(|| incidents::forget_before(policy, now));
    plan.incidents = incidents::spikes(
        policy,
        &snapshot.open_incidents,
        &snapshot.arrival_counts,
        &plan.arrivals,
        now,
    );
    let mut open_incidents = snapshot.open_incidents.clone();
    for incident in &plan.incidents {
        open_incidents.insert(incident.key.clone(), incident.incident_id.to_string());
    }

    let mut slots = Vec::with_capacity(drafts.len());
    let mut created: Vec<(usize, usize)> = Vec::new(); // (in-play index, draft index)
    let mut seen: HashSet<Uuid> = HashSet::new();
    for (draft_index, draft) in drafts.iter().enumerate() {
        let wo = &draft.new.work_order;
        if snapshot.placed.contains(&draft.complaint) || !seen.insert(draft.complaint) {
            slots.push(Slot::AlreadyHandled);
            continue;
        }
        if let Some(target) = in_play.join_target(wo) {
            let open = &mut in_play.orders[target];
            let how = if !wo.thread_id.is_empty() && open.thread_id == wo.thread_id {
                "thread follow-up"
            } else {
                "same poster and category"
            };
            plan.links.push(ComplaintLink {
                tenant: wo.tenant.clone(),
                complaint_id: draft.complaint,
                work_order_id: open.work_order_id.clone(),
            });
            record(
                open,
                Action::Merge,
                format!("{how}: complaint {} attached", wo.complaint_id),
                now,
                &mut plan.events,
            );
            if let Some(last) = plan.events.last_mut() {
                last.trace = Some(draft.trace.clone());
            }
            slots.push(Slot::Attached(target));
            continue;
        }
        let mut fresh = wo.clone();
        let key = (
            fresh.tenant.clone(),
            fresh.category.clone(),
            region_key(&fresh.province, &fresh.city),
        );
        if let Some(incident) = open_incidents.get(&key) {
            fresh.incident_id = Some(incident.clone());
        }
        plan.events.push(
            Recorded::new(
                &fresh,
                WorkOrderEventKind::Created,
                "system",
                draft.route_reason.clone(),
            )
            .traced(&draft.trace),
        );
        let at = in_play.add(fresh, false);
        created.push((at, draft_index));
        slots.push(Slot::Created(at));
    }

    // Work orders opened before this batch that a new incident takes in.
    for incident in &plan.incidents {
        let incident_id = incident.incident_id.to_string();
        for wo in snapshot.takeable.get(&incident.key).into_iter().flatten() {
            let at = match in_play.position(&wo.work_order_id) {
                Some(at) => at,
                None => in_play.add(wo.clone(), true),
            };
            let target = &mut in_play.orders[at];
            if target.incident_id.is_none()
                && lifecycle::next_state(target.state, Action::LinkIncident).is_ok()
            {
                target.incident_id = Some(incident_id.clone());
                record(
                    target,
                    Action::LinkIncident,
                    format!("part of incident {incident_id}"),
                    now,
                    &mut plan.events,
                );
            }
        }
    }
    plan.alerts = incidents::alerts(&plan.incidents, &in_play.orders);

    // New work orders outside incidents go to an agent if one has room.
    let to_assign: Vec<usize> = created
        .iter()
        .map(|(at, _)| *at)
        .filter(|at| in_play.orders[*at].incident_id.is_none())
        .collect();
    let managed: HashSet<usize> = created
        .iter()
        .filter(|(_, d)| drafts[*d].account_managed)
        .map(|(at, _)| *at)
        .collect();
    let mut staff = snapshot.staff.clone();
    plan.staffing = staffing::assign(
        &mut staff,
        &mut in_play.orders,
        &to_assign,
        &managed,
        now,
        &mut plan.events,
    );

    plan.inserts = created
        .iter()
        .map(|(at, draft_index)| NewWorkOrder {
            work_order: in_play.orders[*at].clone(),
            first_response_risk_at: drafts[*draft_index].new.first_response_risk_at,
            resolution_risk_at: drafts[*draft_index].new.resolution_risk_at,
        })
        .collect();
    let touched: HashSet<&str> = plan
        .events
        .iter()
        .map(|e| e.work_order.work_order_id.as_str())
        .collect();
    plan.updates = in_play
        .orders
        .iter()
        .zip(&in_play.existing)
        .filter(|(wo, existed)| **existed && touched.contains(wo.work_order_id.as_str()))
        .map(|(wo, _)| wo.clone())
        .collect();
    plan.placements = slots
        .into_iter()
        .map(|slot| match slot {
            Slot::AlreadyHandled => Placement::AlreadyHandled,
            Slot::Created(at) => Placement::Created(in_play.orders[at].clone()),
            Slot::Attached(at) => Placement::Attached(in_play.orders[at].clone()),
        })
        .collect();
    plan
}

#[cfg(test)]
mod tests;
