//! Which team a work order goes to, and when it is due: plain functions over config.

use std::collections::HashMap;
use std::str::FromStr;

use chrono::{DateTime, Duration, Utc};
use closedloop_proto::v1::Priority;

/// Category → team, with a default for everything else.
#[derive(Debug, Clone)]
pub struct RoutingTable {
    by_category: HashMap<String, String>,
    pub default_team: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("routing entry {0:?} is not `category=team`")]
pub struct RoutingTableError(String);

impl RoutingTable {
    /// Parses `category=team` entries separated by commas; `default_team` takes the rest.
    pub fn parse(entries: &str, default_team: &str) -> Result<Self, RoutingTableError> {
        let mut by_category = HashMap::new();
        for entry in entries.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (category, team) = entry
                .split_once('=')
                .filter(|(c, t)| !c.trim().is_empty() && !t.trim().is_empty())
                .ok_or_else(|| RoutingTableError(entry.to_owned()))?;
            by_category.insert(category.trim().to_owned(), team.trim().to_owned());
        }
        Ok(Self {
            by_category,
            default_team: default_team.to_owned(),
        })
    }

    pub fn team_for(&self, category: &str) -> &str {
        self.by_category
            .get(category)
            .map_or(&self.default_team, String::as_str)
    }
}

/// Response and resolution targets for one priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlaTarget {
    pub first_response: Duration,
    pub resolution: Duration,
}

/// Targets by priority.
#[derive(Debug, Clone)]
pub struct SlaPolicy {
    targets: [SlaTarget; 4],
}

impl Default for SlaPolicy {
    fn default() -> Self {
        let t = |response_minutes, resolution_hours| SlaTarget {
            first_response: Duration::minutes(response_minutes),
            resolution: Duration::hours(resolution_hours),
        };
        Self {
            targets: [t(15, 4), t(30, 24), t(120, 72), t(480, 168)],
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("SLA entry {0:?} is not `P<n>=<minutes>m/<hours>h`")]
pub struct SlaPolicyError(String);

impl FromStr for SlaPolicy {
    type Err = SlaPolicyError;
    /// `P1=15m/4h,P2=30m/24h,...`; priorities not named keep their defaults.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut policy = SlaPolicy::default();
        for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let bad = || SlaPolicyError(entry.to_owned());
            let (priority, targets) = entry.split_once('=').ok_or_else(bad)?;
            let index = match priority.trim() {
                "P1" => 0,
                "P2" => 1,
                "P3" => 2,
                "P4" => 3,
                _ => return Err(bad()),
            };
            let (response, resolution) = targets.split_once('/').ok_or_else(bad)?;
            let minutes: i64 = response
                .trim()
                .strip_suffix('m')
                .and_then(|m| m.parse().ok())
                .ok_or_else(bad)?;
            let hours: i64 = resolution
                .trim()
                .strip_suffix('h')
                .and_then(|h| h.parse().ok())
                .ok_or_else(bad)?;
            if minutes <= 0 || hours <= 0 {
                return Err(bad());
            }
            policy.targets[index] = SlaTarget {
                first_response: Duration::minutes(minutes),
                resolution: Duration::hours(hours),
            };
        }
        Ok(policy)
    }
}

impl SlaPolicy {
    pub fn target(&self, priority: Priority) -> SlaTarget {
        let index = match priority {
            Priority::P1 => 0,
            Priority::P2 => 1,
            Priority::P4 => 3,
            Priority::P3 | Priority::Unspecified => 2,
        };
        self.targets[index]
    }

    /// (first response due, resolution due) for a work order opened at `opened`.
    pub fn due_times(&self, priority: Priority, opened: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
        let target = self.target(priority);
        (opened + target.first_response, opened + target.resolution)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_category_with_a_default() {
        let table =
            RoutingTable::parse("billing=billing-desk, outage = network-ops", "front-desk").expect("valid");
        assert_eq!(table.team_for("billing"), "billing-desk");
        assert_eq!(table.team_for("outage"), "network-ops");
        assert_eq!(table.team_for("refund"), "front-desk");
        assert!(RoutingTable::parse("billing", "x").is_err());
        assert!(RoutingTable::parse("=team", "x").is_err());
    }

    #[test]
    fn due_times_follow_priority() {
        let policy = SlaPolicy::default();
        let opened = Utc::now();
        let (response, resolution) = policy.due_times(Priority::P1, opened);
        assert_eq!(response - opened, Duration::minutes(15));
        assert_eq!(resolution - opened, Duration::hours(4));
        assert_eq!(policy.target(Priority::Unspecified), policy.target(Priority::P3));
    }

    #[test]
    fn sla_policy_parses_overrides() {
        let policy: SlaPolicy = "P1=5m/2h".parse().expect("valid");
        assert_eq!(policy.target(Priority::P1).first_response, Duration::minutes(5));
        assert_eq!(
            policy.target(Priority::P2),
            SlaPolicy::default().target(Priority::P2)
        );
        assert!("P9=5m/2h".parse::<SlaPolicy>().is_err());
        assert!("P1=5/2h".parse::<SlaPolicy>().is_err());
    }
}
