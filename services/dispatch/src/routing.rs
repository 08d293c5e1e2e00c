//! Which team a work order goes to, and when it is due: plain functions over the validated
//! policy file, so routing and SLA arithmetic are unit-tested without any I/O.

use std::collections::HashMap;

use chrono::{DateTime, Datelike, Duration, NaiveDateTime, NaiveTime, TimeZone, Utc, Weekday};
use chrono_tz::Tz;
use closedloop_proto::v1::{Channel, InfluenceTier, Intent, Priority};

use crate::settings::{
    self, BusinessHoursFile, RoutingFile, SettingsError, SlaFile, TargetFile, parse_duration,
};

/// What routing looks at.
#[derive(Debug, Clone, Copy)]
pub struct RouteFacts<'a> {
    pub intent: Intent,
    pub category: &'a str,
    pub province: &'a str,
    pub channel: Channel,
    pub priority: Priority,
    pub tier: InfluenceTier,
}

/// Where a work order goes and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub team: String,
    pub skill: String,
    /// The poster keeps one account manager: assignment prefers the one they had.
    pub account_managed: bool,
    pub reason: String,
}

#[derive(Debug, Clone)]
struct Rule {
    intents: Vec<Intent>,
    categories: Vec<String>,
    provinces: Vec<String>,
    channels: Vec<Channel>,
    priorities: Vec<Priority>,
    min_tier: Option<InfluenceTier>,
    team: String,
    skill: String,
}

fn any_or<T: PartialEq>(list: &[T], value: &T) -> bool {
    list.is_empty() || list.contains(value)
}

fn any_text(list: &[String], value: &str) -> bool {
    list.is_empty() || list.iter().any(|item| item == value)
}

impl Rule {
    fn matches(&self, facts: &RouteFacts<'_>) -> bool {
        any_or(&self.intents, &facts.intent)
            && any_text(&self.categories, facts.category)
            && any_text(&self.provinces, facts.province)
            && any_or(&self.channels, &facts.channel)
            && any_or(&self.priorities, &facts.priority)
            && self.min_tier.is_none_or(|min| facts.tier >= min)
    }
}

/// Routing rules in order, a default team and the account-manager rule.
#[derive(Debug, Clone)]
pub struct Router {
    rules: Vec<Rule>,
    default_team: String,
    account_managers: Option<(String, InfluenceTier)>,
}

fn team_name(name: &str, context: &str) -> Result<String, SettingsError> {
    let name = name.trim();
    if name.is_empty() {
        return Err(SettingsError::Invalid(format!(
            "{context}: team must not be empty"
        )));
    }
    Ok(name.to_owned())
}

fn parse_all<T>(
    values: &[String],
    parse: fn(&str) -> Result<T, SettingsError>,
) -> Result<Vec<T>, SettingsError> {
    values.iter().map(|v| parse(v)).collect()
}

impl Router {
    pub fn from_file(file: &RoutingFile) -> Result<Self, SettingsError> {
        let mut rules = Vec::with_capacity(file.rules.len());
        for (index, rule) in file.rules.iter().enumerate() {
            let context = format!("routing rule {}", index + 1);
            rules.push(Rule {
                intents: parse_all(&rule.intent, settings::parse_intent)?,
                categories: rule.category.iter().map(|c| c.trim().to_owned()).collect(),
                provinces: rule.province.iter().map(|p| p.trim().to_owned()).collect(),
                channels: parse_all(&rule.channel, settings::parse_channel)?,
                priorities: parse_all(&rule.priority, settings::parse_priority)?,
                min_tier: rule.min_tier.as_deref().map(settings::parse_tier).transpose()?,
                team: team_name(&rule.team, &context)?,
                skill: rule.skill.trim().to_owned(),
            });
        }
        let account_managers = match &file.account_managers {
            Some(am) => Some((
                team_name(&am.team, "account_managers")?,
                settings::parse_tier(&am.min_tier)?,
            )),
            None => None,
        };
        Ok(Self {
            rules,
            default_team: team_name(&file.default_team, "default_team")?,
            account_managers,
        })
    }

    /// The team whose members are posters' account managers, if the policy names one.
    pub fn account_manager_team(&self) -> Option<&str> {
        self.account_managers.as_ref().map(|(team, _)| team.as_str())
    }

    pub fn route(&self, facts: &RouteFacts<'_>) -> Route {
        if let Some((team, min_tier)) = &self.account_managers
            && facts.tier >= *min_tier
        {
            return Route {
                team: team.clone(),
                skill: String::new(),
                account_managed: true,
                reason: format!("poster's reach {:?} has an account manager", facts.tier),
            };
        }
        for (index, rule) in self.rules.iter().enumerate() {
            if rule.matches(facts) {
                return Route {
                    team: rule.team.clone(),
                    skill: rule.skill.clone(),
                    account_managed: false,
                    reason: format!("routing rule {}", index + 1),
                };
            }
        }
        Route {
            team: self.default_team.clone(),
            skill: String::new(),
            account_managed: false,
            reason: "default team".into(),
        }
    }
}

/// Opening hours in a time zone; time outside them does not count toward a target.
#[derive(Debug, Clone)]
pub struct BusinessHours {
    zone: Tz,
    opens: NaiveTime,
    closes: NaiveTime,
    days: Vec<Weekday>,
}

impl BusinessHours {
    pub fn from_file(file: &BusinessHoursFile) -> Result<Self, SettingsError> {
        let zone: Tz = file
            .time_zone
            .parse()
            .map_err(|_| SettingsError::Invalid(format!("unknown time zone {:?}", file.time_zone)))?;
        let opens = settings::parse_clock(&file.opens)?;
        let closes = settings::parse_clock(&file.closes)?;
        if closes <= opens {
            return Err(SettingsError::Invalid(
                "business hours must close after they open".into(),
            ));
        }
        let days = file
            .days
            .iter()
            .map(|d| settings::parse_weekday(d))
            .collect::<Result<Vec<_>, _>>()?;
        if days.is_empty() {
            return Err(SettingsError::Invalid(
                "business hours need at least one day".into(),
            ));
        }
        Ok(Self {
            zone,
            opens,
            closes,
            days,
        })
    }

    fn to_utc(&self, local: NaiveDateTime) -> DateTime<Utc> {
        // In a DST gap the earliest valid instant after it; at a fold, the first.
        match self.zone.from_local_datetime(&local).earliest() {
            Some(at) => at.with_timezone(&Utc),
            None => self.to_utc(local + Duration::hours(1)),
        }
    }

    /// `start` plus `work` of open time.
    pub fn add(&self, start: DateTime<Utc>, work: Duration) -> DateTime<Utc> {
        let mut remaining = work;
        let mut now = start.with_timezone(&self.zone).naive_local();
        // Bounded: a year of days always covers any sane target.
        for _ in 0..400 {
            let day = now.date();
            let open_at = day.and_time(self.opens);
            let close_at = day.and_time(self.closes);
            if self.days.contains(&day.weekday()) && now < close_at {
                let from = now.max(open_at);
                let available = close_at - from;
                if remaining <= available {
                    return self.to_utc(from + remaining);
                }
                remaining -= available;
            }
            now = (day + Duration::days(1)).and_time(NaiveTime::MIN);
        }
        start + work
    }
}

/// Response and resolution targets, and whether they count only in business hours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlaTarget {
    pub first_response: Duration,
    pub resolution: Duration,
    pub around_the_clock: bool,
}

/// When a work order is due and when it becomes at risk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    pub first_response_due: DateTime<Utc>,
    pub resolution_due: DateTime<Utc>,
    pub first_response_risk_at: DateTime<Utc>,
    pub resolution_risk_at: DateTime<Utc>,
}

/// Targets by priority, optionally by category, with business hours.
#[derive(Debug, Clone)]
pub struct SlaPolicy {
    by_priority: HashMap<Priority, SlaTarget>,
    by_category: HashMap<(String, Priority), SlaTarget>,
    at_risk_fraction: f64,
    business_hours: Option<BusinessHours>,
    pub escalation_team: String,
    pub watch_interval: std::time::Duration,
}

fn target(file: &TargetFile) -> Result<SlaTarget, SettingsError> {
    let target = SlaTarget {
        first_response: parse_duration(&file.first_response)?,
        resolution: parse_duration(&file.resolution)?,
        around_the_clock: file.around_the_clock,
    };
    if target.first_response > target.resolution {
        return Err(SettingsError::Invalid(
            "a first-response target cannot be longer than its resolution target".into(),
        ));
    }
    Ok(target)
}

impl SlaPolicy {
    pub fn from_file(file: &SlaFile) -> Result<Self, SettingsError> {
        let mut by_priority = HashMap::new();
        for (name, t) in &file.targets {
            by_priority.insert(settings::parse_priority(name)?, target(t)?);
        }
        for priority in [Priority::P1, Priority::P2, Priority::P3, Priority::P4] {
            if !by_priority.contains_key(&priority) {
                return Err(SettingsError::Invalid(format!(
                    "sla.targets lacks {}",
                    priority.as_str_name()
                )));
            }
        }
        let mut by_category = HashMap::new();
        for (category, targets) in &file.by_category {
            for (name, t) in targets {
                by_category.insert((category.clone(), settings::parse_priority(name)?), target(t)?);
            }
        }
        if !(file.at_risk_fraction > 0.0 && file.at_risk_fraction < 1.0) {
            return Err(SettingsError::Invalid(
                "sla.at_risk_fraction must be between 0 and 1".into(),
            ));
        }
        let watch_interval = parse_duration(&file.watch_interval)?
            .to_std()
            .map_err(|_| SettingsError::Invalid("sla.watch_interval out of range".into()))?;
        Ok(Self {
            by_priority,
            by_category,
            at_risk_fraction: file.at_risk_fraction,
            business_hours: file
                .business_hours
                .as_ref()
                .map(BusinessHours::from_file)
                .transpose()?,
            escalation_team: team_name(&file.escalation_team, "sla.escalation_team")?,
            watch_interval,
        })
    }

    pub fn target(&self, category: &str, priority: Priority) -> SlaTarget {
        let priority = if priority == Priority::Unspecified {
            Priority::P3
        } else {
            priority
        };
        self.by_category
            .get(&(category.to_owned(), priority))
            .or_else(|| self.by_priority.get(&priority))
            .copied()
            // from_file guarantees all four priorities.
            .unwrap_or(SlaTarget {
                first_response: Duration::hours(2),
                resolution: Duration::hours(72),
                around_the_clock: true,
            })
    }

    fn add(&self, target: &SlaTarget, start: DateTime<Utc>, work: Duration) -> DateTime<Utc> {
        match (&self.business_hours, target.around_the_clock) {
            (Some(hours), false) => hours.add(start, work),
            _ => start + work,
        }
    }

    fn fraction(&self, work: Duration) -> Duration {
        Duration::milliseconds((work.num_milliseconds() as f64 * self.at_risk_fraction) as i64)
    }

    /// Deadlines for a work order of this category and priority opened at `opened`.
    pub fn deadlines(&self, category: &str, priority: Priority, opened: DateTime<Utc>) -> Deadlines {
        let t = self.target(category, priority);
        Deadlines {
            first_response_due: self.add(&t, opened, t.first_response),
            resolution_due: self.add(&t, opened, t.resolution),
            first_response_risk_at: self.add(&t, opened, self.fraction(t.first_response)),
            resolution_risk_at: self.add(&t, opened, self.fraction(t.resolution)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::{RuleFile, SettingsFile};

    fn facts(category: &str) -> RouteFacts<'_> {
        RouteFacts {
            intent: Intent::Complaint,
            category,
            province: "",
            channel: Channel::WeiboPost,
            priority: Priority::P3,
            tier: InfluenceTier::Regular,
        }
    }

    fn rule(team: &str) -> RuleFile {
        RuleFile {
            intent: vec![],
            category: vec![],
            province: vec![],
            channel: vec![],
            priority: vec![],
            min_tier: None,
            team: team.into(),
            skill: String::new(),
        }
    }

    #[test]
    fn first_matching_rule_wins_and_every_field_counts() {
        let mut regional = rule("gd-network");
        regional.category = vec!["outage".into()];
        regional.province = vec!["广东".into()];
        let mut urgent_public = rule("social-desk");
        urgent_public.priority = vec!["P1".into()];
        urgent_public.channel = vec!["weibo_post".into()];
        let mut outage = rule("network-ops");
        outage.category = vec!["outage".into()];
        outage.skill = "network".into();
        let mut influencers = rule("vip");
        influencers.min_tier = Some("influencer".into());
        let file = RoutingFile {
            rules: vec![regional, urgent_public, outage, influencers],
            default_team: "front-desk".into(),
            account_managers: Some(crate::settings::AccountManagersFile {
                team: "account-managers".into(),
                min_tier: "key_opinion_leader".into(),
            }),
        };
        let router = Router::from_file(&file).expect("valid");
        let guangdong = RouteFacts {
            province: "广东",
            ..facts("outage")
        };
        assert_eq!(router.route(&guangdong).team, "gd-network");
        let outage = router.route(&facts("outage"));
        assert_eq!(
            (outage.team.as_str(), outage.skill.as_str()),
            ("network-ops", "network")
        );
        assert_eq!(outage.reason, "routing rule 3");
        let p1 = RouteFacts {
            priority: Priority::P1,
            ..facts("billing")
        };
        assert_eq!(router.route(&p1).team, "social-desk");
        let p1_hotline = RouteFacts {
            channel: Channel::Hotline,
            ..p1
        };
        assert_eq!(router.route(&p1_hotline).team, "front-desk");
        let influencer = RouteFacts {
            tier: InfluenceTier::Influencer,
            ..facts("billing")
        };
        assert_eq!(router.route(&influencer).team, "vip");
        let kol = RouteFacts {
            tier: InfluenceTier::KeyOpinionLeader,
            ..facts("outage")
        };
        let route = router.route(&kol);
        assert_eq!(route.team, "account-managers");
        assert!(route.account_managed);
        assert_eq!(router.route(&facts("refund")).reason, "default team");
    }

    #[test]
    fn bad_rules_are_refused_with_a_reason() {
        let mut bad = rule("x");
        bad.channel = vec!["fax".into()];
        let file = RoutingFile {
            rules: vec![bad],
            default_team: "front-desk".into(),
            account_managers: None,
        };
        let error = Router::from_file(&file).expect_err("unknown channel");
        assert!(error.to_string().contains("fax"), "{error}");
        let file = RoutingFile {
            rules: vec![rule(" ")],
            default_team: "front-desk".into(),
            account_managers: None,
        };
        assert!(Router::from_file(&file).is_err());
    }

    fn shanghai_hours(days: &[&str]) -> BusinessHours {
        BusinessHours::from_file(&BusinessHoursFile {
            time_zone: "Asia/Shanghai".into(),
            opens: "09:00".into(),
            closes: "18:00".into(),
            days: days.iter().map(|d| (*d).to_owned()).collect(),
        })
        .expect("valid")
    }

    fn utc(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .expect("rfc3339")
            .with_timezone(&Utc)
    }

    #[test]
    fn business_hours_skip_nights_and_weekends_in_their_time_zone() {
        let hours = shanghai_hours(&["mon", "tue", "wed", "thu", "fri"]);
        // Friday 2026-11-20 17:00 in Shanghai is 09:00 UTC; 2h of work: 1h on Friday, 1h on Monday.
        let due = hours.add(utc("2026-11-20T09:00:00Z"), Duration::hours(2));
        assert_eq!(due, utc("2026-11-23T02:00:00Z"), "Monday 10:00 in Shanghai");
        // Saturday night: starts Monday at opening.
        let due = hours.add(utc("2026-11-21T14:00:00Z"), Duration::minutes(30));
        assert_eq!(due, utc("2026-11-23T01:30:00Z"));
        // Inside hours: plain addition.
        let due = hours.add(utc("2026-11-23T02:00:00Z"), Duration::minutes(45));
        assert_eq!(due, utc("2026-11-23T02:45:00Z"));
        // Before opening on a working day: counts from opening.
        let due = hours.add(utc("2026-11-23T22:30:00Z"), Duration::hours(1));
        assert_eq!(due, utc("2026-11-24T02:00:00Z"), "Tuesday 10:00 in Shanghai");
    }

    #[test]
    fn business_hours_follow_daylight_saving_time() {
        let hours = BusinessHours::from_file(&BusinessHoursFile {
            time_zone: "Europe/Berlin".into(),
            opens: "09:00".into(),
            closes: "17:00".into(),
            days: vec![
                "mon".into(),
                "tue".into(),
                "wed".into(),
                "thu".into(),
                "fri".into(),
            ],
        })
        .expect("valid");
        // Friday 2026-10-23 16:00 CEST (UTC+2) + 2h: 1h Friday, 1h Monday 10:00 CET (UTC+1).
        let due = hours.add(utc("2026-10-23T14:00:00Z"), Duration::hours(2));
        assert_eq!(due, utc("2026-10-26T09:00:00Z"));
        assert!(
            BusinessHours::from_file(&BusinessHoursFile {
                time_zone: "Mars/Olympus".into(),
                opens: "09:00".into(),
                closes: "17:00".into(),
                days: vec!["mon".into()],
            })
            .is_err()
        );
    }

    #[test]
    fn deadlines_by_priority_category_and_calendar() {
        let file = SettingsFile::load(None).expect("built-in");
        let policy = SlaPolicy::from_file(&file.sla).expect("valid");
        // Sunday 2026-11-22 23:00 in Shanghai (15:00 UTC): after closing at 22:00.
        let opened = utc("2026-11-22T15:00:00Z");
        let p1 = policy.deadlines("billing", Priority::P1, opened);
        assert_eq!(
            p1.first_response_due,
            opened + Duration::minutes(15),
            "P1 runs around the clock"
        );
        assert_eq!(p1.first_response_risk_at, opened + Duration::minutes(12));
        let p2 = policy.deadlines("billing", Priority::P2, opened);
        assert_eq!(
            p2.first_response_due,
            utc("2026-11-23T00:30:00Z"),
            "30 min after Monday 08:00 in Shanghai"
        );
        let outage = policy.deadlines("outage", Priority::P2, opened);
        assert_eq!(
            outage.resolution_due,
            opened + Duration::hours(8),
            "category override"
        );
        assert_eq!(
            policy.target("x", Priority::Unspecified),
            policy.target("x", Priority::P3)
        );
    }
}
