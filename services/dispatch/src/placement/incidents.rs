//! Incidents a placement batch meets: the arrivals it adds to the per-minute counts, and the
//! incidents a spike of one category in one region opens. Pure: `load` reads the counts and
//! open incidents, `write` stores what is decided here.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Duration, Utc};
use closedloop_proto::v1::IncidentOpened;

use crate::work_order::WorkOrder;
use closedloop_runtime::bus::{self, OutgoingEvent};
use closedloop_runtime::{ids, time};
use uuid::Uuid;

use super::{Draft, IncidentKey, region_key};
use crate::Policy;
use crate::assignment;

/// Arrivals recorded for one key before this batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ArrivalCounts {
    /// In the incident window (the minute it starts in included).
    pub recent: i64,
    /// In the baseline windows before it.
    pub earlier: i64,
}

/// An incident a batch opens.
#[derive(Debug, Clone, PartialEq)]
pub struct NewIncident {
    pub incident_id: Uuid,
    pub key: IncidentKey,
    pub summary: String,
    pub opened_at: DateTime<Utc>,
}

/// The key of each complaint in the batch that counts as an arrival: placed for the first
/// time (not a redelivery, not repeated in the batch) and located.
pub fn arrivals(drafts: &[Draft], placed: &HashSet<Uuid>) -> Vec<IncidentKey> {
    let mut seen = HashSet::new();
    drafts
        .iter()
        .filter(|d| !placed.contains(&d.complaint) && seen.insert(d.complaint))
        .map(|d| &d.new.work_order)
        .map(|wo| {
            (
                wo.tenant.clone(),
                wo.category.clone(),
                region_key(&wo.province, &wo.city),
            )
        })
        .filter(|key| !key.2.is_empty())
        .collect()
}

/// Where the baseline of a spike starts: arrivals before it are no longer needed.
pub fn baseline_from(policy: &Policy, now: DateTime<Utc>) -> DateTime<Utc> {
    now - policy.incident_window * (policy.spikes.baseline_windows as i32 + 1)
}

/// The incidents this batch's arrivals open: keys without an open incident whose recent
/// arrivals, this batch's included, are a spike over their baseline. Ordered by key.
pub fn spikes(
    policy: &Policy,
    open: &HashMap<IncidentKey, String>,
    counts: &HashMap<IncidentKey, ArrivalCounts>,
    arrivals: &[IncidentKey],
    now: DateTime<Utc>,
) -> Vec<NewIncident> {
    let mut in_batch: BTreeMap<&IncidentKey, i64> = BTreeMap::new();
    for key in arrivals {
        *in_batch.entry(key).or_default() += 1;
    }
    let window_minutes = policy.incident_window.num_minutes();
    in_batch
        .into_iter()
        .filter(|(key, _)| !open.contains_key(*key))
        .filter_map(|(key, arrived)| {
            let before = counts.get(key).copied().unwrap_or_default();
            let summary = assignment::spike(
                &policy.spikes,
                before.recent + arrived,
                before.earlier,
                window_minutes,
            )?;
            Some(NewIncident {
                incident_id: ids::derive(
                    "incident",
                    &[&key.0, &key.1, &key.2, &now.timestamp_micros().to_string()],
                ),
                key: key.clone(),
                summary,
                opened_at: now,
            })
        })
        .collect()
}

/// How far back the open work orders a new incident takes in were created.
pub fn takes_in_since(policy: &Policy, now: DateTime<Utc>) -> DateTime<Utc> {
    now - policy.incident_window
}

/// The `incident.opened` alerts of new incidents, each counting the work orders it starts with.
pub fn alerts(opened: &[NewIncident], in_play: &[WorkOrder]) -> Vec<OutgoingEvent> {
    opened
        .iter()
        .map(|incident| {
            let id = incident.incident_id.to_string();
            let alert = IncidentOpened {
                incident_id: id.clone(),
                tenant: incident.key.0.clone(),
                category: incident.key.1.clone(),
                region: incident.key.2.clone(),
                complaint_count: in_play
                    .iter()
                    .filter(|w| w.incident_id.as_ref() == Some(&id))
                    .count() as i64,
                summary: incident.summary.clone(),
                opened_at: Some(time::to_timestamp(incident.opened_at)),
            };
            OutgoingEvent::new(
                bus::INCIDENT_OPENED,
                &alert.tenant,
                format!("incident-opened-{id}"),
                &alert,
            )
        })
        .collect()
}

/// Arrivals older than this are in no baseline any more.
pub fn forget_before(policy: &Policy, now: DateTime<Utc>) -> DateTime<Utc> {
    baseline_from(policy, now) - Duration::minutes(1)
}
