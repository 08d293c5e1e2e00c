//! Who takes new or queued work, decided over the agents `load` read under their teams'
//! locks: the poster's account manager when they have one, otherwise the least-loaded agent
//! with the skill, round-robin among equals.

use std::collections::{HashMap, HashSet};

use crate::work_order::WorkOrder;
use chrono::{DateTime, Duration, Utc};

use super::{poster_id, record};
use crate::assignment::{self, Candidate};
use crate::lifecycle::{self, Action};
use crate::store::Recorded;

/// One team's agents, as assignment sees them.
#[derive(Debug, Clone, PartialEq)]
pub struct TeamAgents {
    pub tenant: String,
    pub team: String,
    pub candidates: Vec<Candidate>,
}

/// The agents of the teams in play and the account managers of the posters in play.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Staff {
    pub teams: Vec<TeamAgents>,
    /// (tenant, poster) → their account manager.
    pub managers: HashMap<(String, String), String>,
}

impl Staff {
    /// Free places among the online agents.
    pub fn room(&self) -> i64 {
        self.teams
            .iter()
            .flat_map(|t| &t.candidates)
            .filter(|c| c.online)
            .map(|c| i64::from((c.capacity - c.load).max(0)))
            .sum()
    }
}

/// What assignment changes besides the work orders.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StaffChanges {
    pub assigned: usize,
    /// (tenant, agent, when they last took work): for round-robin, one entry per agent.
    pub round_robin: Vec<(String, String, DateTime<Utc>)>,
    /// (tenant, poster, agent): managers made by this assignment.
    pub new_managers: Vec<(String, String, String)>,
}

/// Gives each of `targets` (indexes into `in_play`, all queued) to an agent of its team if
/// one is free, most urgent first, then oldest; `managed` ones go to the poster's manager, or
/// make whoever takes them their manager.
pub fn assign(
    staff: &mut Staff,
    in_play: &mut [WorkOrder],
    targets: &[usize],
    managed: &HashSet<usize>,
    now: DateTime<Utc>,
    events: &mut Vec<Recorded>,
) -> StaffChanges {
    let mut changes = StaffChanges::default();
    let mut order: Vec<usize> = targets.to_vec();
    order.sort_by_key(|at| (in_play[*at].priority, in_play[*at].created_at));
    // Each take a microsecond after the last, so round-robin keeps this batch's order.
    let mut tick = 0;
    for at in order {
        let wo = &in_play[at];
        if lifecycle::next_state(wo.state, Action::Assign).is_err() {
            continue;
        }
        let Some(team) = staff
            .teams
            .iter_mut()
            .find(|t| t.tenant == wo.tenant && t.team == wo.team)
        else {
            continue;
        };
        let poster_key = (wo.tenant.clone(), poster_id(wo).to_owned());
        let is_managed = managed.contains(&at) && !poster_key.1.is_empty();
        let sticky = is_managed
            .then(|| staff.managers.get(&poster_key))
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
        let taken_at = now + Duration::microseconds(tick);
        assignment::take(&mut team.candidates, index, taken_at);
        let agent = team.candidates[index].agent_id.clone();
        match changes
            .round_robin
            .iter_mut()
            .find(|(tenant, taken_by, _)| *tenant == team.tenant && *taken_by == agent)
        {
            Some(entry) => entry.2 = taken_at,
            None => changes
                .round_robin
                .push((team.tenant.clone(), agent.clone(), taken_at)),
        }
        if is_managed && sticky.is_none() {
            staff.managers.insert(poster_key.clone(), agent.clone());
            changes
                .new_managers
                .push((poster_key.0, poster_key.1, agent.clone()));
        }
        let wo = &mut in_play[at];
        wo.assignee = agent.clone();
        record(
            wo,
            Action::Assign,
            format!("assigned to {agent} ({why})"),
            now,
            events,
        );
        changes.assigned += 1;
    }
    changes
}
