//! Dispatch's policy file: routing rules, SLA targets and business hours, incident
//! detection, feedback and the directory seed. JSON, validated at start so a typo fails the
//! start with a message that names the entry, never a silent default. The built-in file
//! (`default_dispatch.json`) documents every field by example.

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{Duration, NaiveTime, Weekday};
use closedloop_proto::v1::{Channel, InfluenceTier, Intent, Priority};
use serde::Deserialize;

/// The built-in policy, used when no file is given.
pub const DEFAULT_SETTINGS: &str = include_str!("../default_dispatch.json");

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("invalid dispatch settings: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid dispatch settings: {0}")]
    Invalid(String),
}

fn invalid(message: impl Into<String>) -> SettingsError {
    SettingsError::Invalid(message.into())
}

/// The whole file, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsFile {
    pub routing: RoutingFile,
    pub sla: SlaFile,
    #[serde(default)]
    pub incidents: IncidentSettingsFile,
    #[serde(default)]
    pub feedback: FeedbackFile,
    /// Teams and agents per tenant, upserted at start (the API may change them later).
    #[serde(default)]
    pub directory: Vec<TenantDirectory>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingFile {
    /// First match wins.
    #[serde(default)]
    pub rules: Vec<RuleFile>,
    pub default_team: String,
    /// Posters at or above `min_tier` go to this team and keep their manager.
    pub account_managers: Option<AccountManagersFile>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountManagersFile {
    pub team: String,
    pub min_tier: String,
}

/// A routing rule: every non-empty list must contain the work order's value.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    #[serde(default)]
    pub intent: Vec<String>,
    #[serde(default)]
    pub category: Vec<String>,
    #[serde(default)]
    pub province: Vec<String>,
    #[serde(default)]
    pub channel: Vec<String>,
    #[serde(default)]
    pub priority: Vec<String>,
    /// At least this influence tier.
    pub min_tier: Option<String>,
    pub team: String,
    /// Skill an agent needs; "" for any agent of the team.
    #[serde(default)]
    pub skill: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlaFile {
    /// Targets by priority ("P1".."P4"); all four are required.
    pub targets: BTreeMap<String, TargetFile>,
    /// Overrides by category, then priority.
    #[serde(default)]
    pub by_category: BTreeMap<String, BTreeMap<String, TargetFile>>,
    /// Fraction of a target after which the work order is at risk (0 < f < 1).
    #[serde(default = "default_at_risk")]
    pub at_risk_fraction: f64,
    pub business_hours: Option<BusinessHoursFile>,
    /// Where breached work goes: the supervisors' queue.
    pub escalation_team: String,
    /// How often the watcher looks, e.g. "5s".
    #[serde(default = "default_watch_interval")]
    pub watch_interval: String,
}

fn default_at_risk() -> f64 {
    0.8
}

fn default_watch_interval() -> String {
    "5s".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetFile {
    /// e.g. "15m".
    pub first_response: String,
    /// e.g. "4h".
    pub resolution: String,
    /// Counts around the clock even when business hours are set.
    #[serde(default)]
    pub around_the_clock: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusinessHoursFile {
    /// IANA name, e.g. "Asia/Shanghai".
    pub time_zone: String,
    /// "09:00".
    pub opens: String,
    /// "18:00".
    pub closes: String,
    /// "mon".."sun".
    pub days: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncidentSettingsFile {
    /// Length of the window a spike is counted in, e.g. "10m".
    pub window: String,
    /// How many earlier windows make the baseline.
    pub baseline_windows: u32,
    /// A spike needs at least this many complaints in the window...
    pub min_count: i64,
    /// ...and this many times the baseline's mean per window.
    pub factor: f64,
}

impl Default for IncidentSettingsFile {
    fn default() -> Self {
        Self {
            window: "10m".into(),
            baseline_windows: 6,
            min_count: 20,
            factor: 5.0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedbackFile {
    /// A resolved work order with no answer closes after this, e.g. "72h".
    pub close_unanswered_after: String,
}

impl Default for FeedbackFile {
    fn default() -> Self {
        Self {
            close_unanswered_after: "72h".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantDirectory {
    pub tenant: String,
    #[serde(default)]
    pub teams: Vec<TeamFile>,
    #[serde(default)]
    pub agents: Vec<AgentFile>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeamFile {
    pub team_id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub skills: Vec<String>,
    #[serde(default)]
    pub supervisors: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    pub agent_id: String,
    pub team_id: String,
    #[serde(default)]
    pub display_name: String,
    #[serde(default)]
    pub skills: Vec<String>,
    #[serde(default = "default_capacity")]
    pub capacity: i32,
    #[serde(default)]
    pub online: bool,
    #[serde(default)]
    pub authority_limit_minor: i64,
    #[serde(default)]
    pub supervisor: bool,
}

fn default_capacity() -> i32 {
    10
}

/// Parses "90s", "15m", "4h", "3d" (see [`closedloop_runtime::time::parse_duration`]).
pub fn parse_duration(text: &str) -> Result<Duration, SettingsError> {
    closedloop_runtime::time::parse_duration(text).map_err(|e| invalid(e.to_string()))
}

/// `weibo_post` or `CHANNEL_WEIBO_POST` → the enum, via prost's generated names.
fn parse_enum<E>(prefix: &str, text: &str, from_name: fn(&str) -> Option<E>) -> Result<E, SettingsError> {
    let upper = text.trim().to_ascii_uppercase();
    let full = if upper.starts_with(prefix) {
        upper
    } else {
        format!("{prefix}{upper}")
    };
    from_name(&full).ok_or_else(|| {
        invalid(format!(
            "unknown {}: {text:?}",
            prefix.trim_end_matches('_').to_lowercase()
        ))
    })
}

pub fn parse_channel(text: &str) -> Result<Channel, SettingsError> {
    parse_enum("CHANNEL_", text, Channel::from_str_name)
}

pub fn parse_intent(text: &str) -> Result<Intent, SettingsError> {
    parse_enum("INTENT_", text, Intent::from_str_name)
}

pub fn parse_priority(text: &str) -> Result<Priority, SettingsError> {
    parse_enum("PRIORITY_", text, Priority::from_str_name)
}

pub fn parse_tier(text: &str) -> Result<InfluenceTier, SettingsError> {
    parse_enum("INFLUENCE_TIER_", text, InfluenceTier::from_str_name)
}

pub fn parse_weekday(text: &str) -> Result<Weekday, SettingsError> {
    text.trim()
        .parse::<Weekday>()
        .map_err(|_| invalid(format!("{text:?} is not a weekday (mon..sun)")))
}

pub fn parse_clock(text: &str) -> Result<NaiveTime, SettingsError> {
    NaiveTime::parse_from_str(text.trim(), "%H:%M")
        .map_err(|_| invalid(format!("{text:?} is not a time of day like 09:00")))
}

impl SettingsFile {
    /// The file at `path`, or the built-in policy.
    pub fn load(path: Option<&Path>) -> Result<Self, SettingsError> {
        let text = match path {
            Some(path) => std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
                path: path.display().to_string(),
                source,
            })?,
            None => DEFAULT_SETTINGS.to_owned(),
        };
        Ok(serde_json::from_str(&text)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_names_parse_or_say_why_not() {
        assert_eq!(parse_duration("90s").ok(), Some(Duration::seconds(90)));
        assert_eq!(parse_duration("4h").ok(), Some(Duration::hours(4)));
        assert!(parse_duration("4").is_err());
        assert!(parse_duration("-4h").is_err());
        assert!(parse_duration("").is_err());
        assert_eq!(parse_channel("weibo_post").ok(), Some(Channel::WeiboPost));
        assert_eq!(parse_priority("P1").ok(), Some(Priority::P1));
        assert_eq!(
            parse_tier("key_opinion_leader").ok(),
            Some(InfluenceTier::KeyOpinionLeader)
        );
        let error = parse_channel("myspace").expect_err("unknown");
        assert!(error.to_string().contains("myspace"), "{error}");
        assert_eq!(parse_weekday("sat").ok(), Some(Weekday::Sat));
        assert!(parse_clock("9am").is_err());
    }

    #[test]
    fn the_built_in_policy_loads() {
        let file = SettingsFile::load(None).expect("built-in settings parse");
        assert!(!file.routing.rules.is_empty());
        assert_eq!(file.sla.targets.len(), 4);
    }
}
