//! Who gets a work order within its team, and when complaints make an incident: pure
//! decisions over rows the caller has locked, so they are unit-tested apart from SQL.

use chrono::{DateTime, Utc};

/// An agent as assignment sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub agent_id: String,
    pub skills: Vec<String>,
    pub capacity: i32,
    pub online: bool,
    /// Open work orders they hold now.
    pub load: i32,
    /// Round-robin among equals: whoever waited longest goes first.
    pub last_assigned_at: DateTime<Utc>,
}

impl Candidate {
    fn can_take(&self, skill: &str) -> bool {
        self.online
            && self.load < self.capacity
            && (skill.is_empty() || self.skills.iter().any(|s| s == skill))
    }
}

/// The least-loaded online agent with the skill and free capacity; on a tie the one who
/// waited longest, then the smaller id (so replicas agree). `None`: the work waits.
pub fn choose(candidates: &[Candidate], skill: &str) -> Option<usize> {
    candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.can_take(skill))
        .min_by(|(_, a), (_, b)| {
            a.load
                .cmp(&b.load)
                .then(a.last_assigned_at.cmp(&b.last_assigned_at))
                .then(a.agent_id.cmp(&b.agent_id))
        })
        .map(|(index, _)| index)
}

/// Records a choice so the next one in the same batch sees it.
pub fn take(candidates: &mut [Candidate], index: usize, at: DateTime<Utc>) {
    if let Some(candidate) = candidates.get_mut(index) {
        candidate.load += 1;
        candidate.last_assigned_at = at;
    }
}

/// Spike detection parameters.
#[derive(Debug, Clone, Copy)]
pub struct SpikeRule {
    pub min_count: i64,
    pub factor: f64,
    pub baseline_windows: u32,
}

/// Whether `in_window` complaints against `in_baseline` over the earlier windows is a spike,
/// and the summary an alert carries.
pub fn spike(rule: &SpikeRule, in_window: i64, in_baseline: i64, window_minutes: i64) -> Option<String> {
    let windows = f64::from(rule.baseline_windows.max(1));
    let usual = in_baseline as f64 / windows;
    // A quiet baseline counts as one per window, so a handful is never "infinitely" many.
    let threshold = (usual.max(1.0) * rule.factor).max(rule.min_count as f64);
    (in_window as f64 >= threshold)
        .then(|| format!("{in_window} in {window_minutes} min vs {usual:.1} usual"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    fn agent(id: &str, load: i32, capacity: i32, minutes_ago: i64) -> Candidate {
        Candidate {
            agent_id: id.into(),
            skills: vec!["network".into()],
            capacity,
            online: true,
            load,
            last_assigned_at: Utc::now() - Duration::minutes(minutes_ago),
        }
    }

    #[test]
    fn least_loaded_wins() {
        let agents = [agent("a", 3, 10, 1), agent("b", 1, 10, 1), agent("c", 2, 10, 1)];
        assert_eq!(choose(&agents, "network"), Some(1));
    }

    #[test]
    fn ties_go_round_robin() {
        let mut agents = vec![agent("a", 0, 10, 5), agent("b", 0, 10, 9), agent("c", 0, 10, 7)];
        let mut order = Vec::new();
        let start = Utc::now();
        for n in 0..6 {
            let index = choose(&agents, "").expect("capacity");
            order.push(agents[index].agent_id.clone());
            take(&mut agents, index, start + Duration::milliseconds(n));
        }
        assert_eq!(order, ["b", "c", "a", "b", "c", "a"]);
    }

    #[test]
    fn offline_full_or_unskilled_agents_are_skipped() {
        let mut offline = agent("offline", 0, 10, 9);
        offline.online = false;
        let full = agent("full", 2, 2, 9);
        let mut unskilled = agent("unskilled", 0, 10, 9);
        unskilled.skills = vec!["billing".into()];
        let able = agent("able", 5, 10, 1);
        let agents = [offline, full, unskilled, able];
        assert_eq!(choose(&agents, "network"), Some(3));
        assert_eq!(
            choose(&agents[..3], "network"),
            None,
            "nobody free: the work waits"
        );
        assert_eq!(choose(&agents[..3], ""), Some(2), "no skill needed");
    }

    #[test]
    fn spikes_are_far_above_baseline_and_above_a_floor() {
        let rule = SpikeRule {
            min_count: 20,
            factor: 5.0,
            baseline_windows: 6,
        };
        assert!(spike(&rule, 19, 0, 10).is_none(), "under the floor");
        let summary = spike(&rule, 20, 0, 10).expect("quiet baseline, floor reached");
        assert_eq!(summary, "20 in 10 min vs 0.0 usual");
        // 8 per window usually: a spike needs 40.
        assert!(spike(&rule, 39, 48, 10).is_none());
        assert!(spike(&rule, 40, 48, 10).is_some());
    }
}
