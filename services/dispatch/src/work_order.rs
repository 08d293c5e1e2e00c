//! The work order as dispatch decides about it: typed states, priorities and tiers, and
//! times as times. Its protobuf picture, which the API answers with and events carry, is made
//! in one place ([`WorkOrder::to_proto`]); its PostgreSQL picture is `store::from_row` and
//! `store::columns`. Every change of state goes through [`WorkOrder::apply`], which the state
//! machine in [`crate::lifecycle`] checks.

use chrono::{DateTime, Utc};
use closedloop_proto::v1::WorkOrderState;
use closedloop_proto::v1::{
    self as proto, Channel, InfluenceTier, Intent, Poster, Priority, Remedy, SlaState,
};
use closedloop_runtime::time;

use crate::lifecycle::{self, Action, InvalidTransition};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkOrder {
    pub work_order_id: String,
    pub tenant: String,
    /// The complaint that opened it.
    pub complaint_id: String,
    pub state: WorkOrderState,
    /// Increases by one on every change; events carry it so consumers can drop stale ones.
    pub version: i64,
    pub team: String,
    /// The agent working on it; empty while it waits in the team's queue.
    pub assignee: String,
    pub category: String,
    pub priority: Priority,
    pub intent: Intent,
    pub channel: Channel,
    pub channel_message_id: String,
    pub poster: Poster,
    /// Masked text of the opening complaint.
    pub summary: String,
    pub thread_id: String,
    pub locale: String,
    pub needs_private_channel: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub first_response_due: DateTime<Utc>,
    pub resolution_due: DateTime<Utc>,
    pub resolved_at: Option<DateTime<Utc>>,
    pub resolution_note: String,
    pub province: String,
    pub city: String,
    pub influence_tier: InfluenceTier,
    /// The skill an agent needs to take it, "" for any.
    pub skill: String,
    pub sla_state: SlaState,
    /// The incident it belongs to: resolving the incident resolves it.
    pub incident_id: Option<String>,
    pub remedy: Option<Remedy>,
    /// The customer's last satisfaction answer (1..5), 0 when none.
    pub satisfaction: i32,
    pub first_responded_at: Option<DateTime<Utc>>,
    /// Read from the archive tables.
    pub archived: bool,
}

impl WorkOrder {
    /// Applies `action` at `now`: the state the machine allows, a new version, and the
    /// action's own effects (resolution time and note, the first response, a reopened SLA
    /// clock, an emptied hand on requeue, a step up in priority on escalation and breach, the
    /// SLA verdict). Fields that depend on who asked (assignee, team, remedy) are the
    /// caller's.
    pub fn apply(&mut self, action: Action, note: &str, now: DateTime<Utc>) -> Result<(), InvalidTransition> {
        self.state = lifecycle::next_state(self.state, action)?;
        self.version += 1;
        self.updated_at = now;
        match action {
            Action::Resolve => {
                self.resolved_at = Some(now);
                self.resolution_note = note.to_owned();
            }
            Action::Reopen => {
                self.resolved_at = None;
                self.sla_state = SlaState::OnTrack;
            }
            Action::Accept | Action::Reply if self.first_responded_at.is_none() => {
                self.first_responded_at = Some(now);
            }
            Action::Requeue => self.assignee.clear(),
            Action::Escalate => self.priority = self.priority.raised(),
            Action::SlaAtRisk => self.sla_state = SlaState::AtRisk,
            Action::SlaBreach => {
                self.sla_state = SlaState::Breached;
                self.priority = self.priority.raised();
                self.assignee.clear();
            }
            _ => {}
        }
        Ok(())
    }

    /// Whether work on it is still going on.
    pub fn is_open(&self) -> bool {
        lifecycle::is_open(self.state)
    }

    /// The protobuf picture, as the API answers and events carry it.
    pub fn to_proto(&self) -> proto::WorkOrder {
        let at = |t: DateTime<Utc>| Some(time::to_timestamp(t));
        proto::WorkOrder {
            work_order_id: self.work_order_id.clone(),
            tenant: self.tenant.clone(),
            complaint_id: self.complaint_id.clone(),
            state: self.state as i32,
            version: self.version,
            team: self.team.clone(),
            assignee: self.assignee.clone(),
            category: self.category.clone(),
            priority: self.priority as i32,
            intent: self.intent as i32,
            channel: self.channel as i32,
            channel_message_id: self.channel_message_id.clone(),
            poster: Some(self.poster.clone()),
            summary: self.summary.clone(),
            created_at: at(self.created_at),
            updated_at: at(self.updated_at),
            first_response_due: at(self.first_response_due),
            resolution_due: at(self.resolution_due),
            resolved_at: self.resolved_at.and_then(at),
            resolution_note: self.resolution_note.clone(),
            thread_id: self.thread_id.clone(),
            locale: self.locale.clone(),
            needs_private_channel: self.needs_private_channel,
            province: self.province.clone(),
            city: self.city.clone(),
            influence_tier: self.influence_tier as i32,
            sla_state: self.sla_state as i32,
            incident_id: self.incident_id.clone().unwrap_or_default(),
            remedy: self.remedy.clone(),
            satisfaction: self.satisfaction,
            first_responded_at: self.first_responded_at.and_then(at),
            skill: self.skill.clone(),
            archived: self.archived,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use WorkOrderState::*;

    #[test]
    fn apply_records_each_actions_effects() {
        let now = Utc::now();
        let stamp = Some(now);
        let mut wo = WorkOrder {
            version: 3,
            assignee: "a".into(),
            state: Assigned,
            ..WorkOrder::default()
        };
        wo.apply(Action::Reply, "hello", now).expect("reply");
        assert_eq!((wo.state, wo.version), (Assigned, 4));
        assert_eq!(wo.first_responded_at, stamp);
        wo.apply(Action::Requeue, "", now).expect("requeue");
        assert_eq!((wo.state, wo.assignee.as_str()), (New, ""));
        wo.apply(Action::Resolve, "fixed", now).expect("resolve");
        assert_eq!((wo.resolved_at, wo.resolution_note.as_str()), (stamp, "fixed"));
        wo.sla_state = SlaState::Breached;
        wo.apply(Action::Reopen, "not fixed", now).expect("reopen");
        assert_eq!(
            (wo.state, wo.resolved_at, wo.sla_state),
            (Reopened, None, SlaState::OnTrack)
        );
        assert_eq!(wo.version, 7, "one version per action");
        wo.priority = Priority::P3;
        wo.apply(Action::Escalate, "angry", now).expect("escalate");
        assert_eq!(wo.priority, Priority::P2);
        wo.assignee = "b".into();
        wo.apply(Action::SlaAtRisk, "", now).expect("at risk");
        assert_eq!((wo.sla_state, wo.priority), (SlaState::AtRisk, Priority::P2));
        wo.apply(Action::SlaBreach, "", now).expect("breach");
        assert_eq!(
            (wo.state, wo.sla_state, wo.priority, wo.assignee.as_str()),
            (New, SlaState::Breached, Priority::P1, "")
        );
        assert_eq!(wo.version, 10);
        let before = wo.clone();
        assert!(wo.apply(Action::Close, "", now).is_err());
        assert_eq!(wo, before, "a refused action changes nothing");
    }

    #[test]
    fn the_proto_picture_carries_every_field() {
        let now = Utc::now();
        let wo = WorkOrder {
            work_order_id: "wo".into(),
            state: InProgress,
            priority: Priority::P2,
            created_at: now,
            resolved_at: Some(now),
            incident_id: Some("inc".into()),
            ..WorkOrder::default()
        };
        let proto = wo.to_proto();
        assert_eq!((proto.state(), proto.priority()), (InProgress, Priority::P2));
        assert_eq!(proto.created_at, Some(time::to_timestamp(now)));
        assert_eq!(proto.resolved_at, proto.created_at);
        assert_eq!(
            (proto.incident_id.as_str(), proto.first_responded_at),
            ("inc", None)
        );
    }
}
