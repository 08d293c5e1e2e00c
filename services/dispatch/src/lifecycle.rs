//! The work-order state machine: which action may move a work order from which state, and
//! what every transition changes besides the state. Every change to a work order, by an
//! agent, the watcher, feedback, placement or an incident, goes through
//! [`crate::work_order::WorkOrder::apply`], which asks [`next_state`].

use closedloop_proto::v1::{WorkOrderEventKind, WorkOrderState};

/// Something done to a work order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Accept,
    Reply,
    Resolve,
    Close,
    Reopen,
    Escalate,
    /// Given to another agent (or team and agent) by a person.
    Reassign,
    /// Taken from whoever held it and put back in a (possibly other) team's queue.
    Requeue,
    /// Given to an agent by the assigner.
    Assign,
    /// Attached to an incident.
    LinkIncident,
    /// Took in another complaint about the same problem.
    Merge,
    /// The SLA clock: a target is close.
    SlaAtRisk,
    /// The SLA clock: a target was missed; the work goes back to a queue.
    SlaBreach,
    /// The customer answered the survey or followed up.
    Feedback,
    /// An agent corrected its intent or category.
    Reclassify,
}

impl Action {
    /// The event kind this action emits.
    pub fn event_kind(self) -> WorkOrderEventKind {
        match self {
            Action::Accept => WorkOrderEventKind::Accepted,
            Action::Reply => WorkOrderEventKind::Replied,
            Action::Resolve => WorkOrderEventKind::Resolved,
            Action::Close => WorkOrderEventKind::Closed,
            Action::Reopen => WorkOrderEventKind::Reopened,
            Action::Escalate => WorkOrderEventKind::Escalated,
            Action::Reassign | Action::Requeue => WorkOrderEventKind::Reassigned,
            Action::Assign => WorkOrderEventKind::Assigned,
            Action::LinkIncident => WorkOrderEventKind::IncidentLinked,
            Action::Merge => WorkOrderEventKind::Merged,
            Action::SlaAtRisk => WorkOrderEventKind::SlaAtRisk,
            Action::SlaBreach => WorkOrderEventKind::SlaBreached,
            Action::Feedback => WorkOrderEventKind::Feedback,
            Action::Reclassify => WorkOrderEventKind::Reclassified,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cannot {action:?} a work order that is {from:?}")]
pub struct InvalidTransition {
    pub from: WorkOrderState,
    pub action: Action,
}

/// Whether work on it is still going on.
pub fn is_open(state: WorkOrderState) -> bool {
    use WorkOrderState::*;
    matches!(state, New | Assigned | InProgress | PendingCustomer | Reopened)
}

/// The state after `action`, or why it is not allowed.
pub fn next_state(from: WorkOrderState, action: Action) -> Result<WorkOrderState, InvalidTransition> {
    use WorkOrderState::*;
    let to = match (action, from) {
        (Action::Accept, New | Assigned | Reopened) => InProgress,
        (Action::Reply, s) if is_open(s) => s,
        (Action::Escalate, s) if is_open(s) => s,
        (Action::Resolve, s) if is_open(s) => Resolved,
        (Action::Reassign, s) if is_open(s) => Assigned,
        (Action::Requeue, s) if is_open(s) => New,
        (Action::Assign, New | Reopened) => Assigned,
        (Action::LinkIncident | Action::Merge, s) if is_open(s) => s,
        (Action::SlaAtRisk, s) if is_open(s) => s,
        // Back to a queue: nobody holds it until the escalation team's assigner picks it.
        (Action::SlaBreach, s) if is_open(s) => New,
        // A label can be wrong whatever became of the work.
        (Action::Feedback | Action::Reclassify, s) => s,
        (Action::Close, Resolved) => Closed,
        (Action::Reopen, Resolved | Closed) => Reopened,
        _ => return Err(InvalidTransition { from, action }),
    };
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use WorkOrderState::*;

    #[test]
    fn the_happy_path() {
        let s = next_state(New, Action::Accept).expect("accept");
        assert_eq!(s, InProgress);
        let s = next_state(s, Action::Resolve).expect("resolve");
        assert_eq!(s, Resolved);
        assert_eq!(next_state(s, Action::Close), Ok(Closed));
        assert_eq!(next_state(Closed, Action::Reopen), Ok(Reopened));
        assert_eq!(next_state(Reopened, Action::Resolve), Ok(Resolved));
    }

    #[test]
    fn closed_work_cannot_be_worked_on() {
        for action in [
            Action::Accept,
            Action::Reply,
            Action::Resolve,
            Action::Escalate,
            Action::Reassign,
            Action::Requeue,
        ] {
            assert!(next_state(Closed, action).is_err(), "{action:?} on closed");
            assert!(next_state(Resolved, action).is_err(), "{action:?} on resolved");
        }
        assert_eq!(
            next_state(New, Action::Close),
            Err(InvalidTransition {
                from: New,
                action: Action::Close
            })
        );
        assert!(next_state(InProgress, Action::Reopen).is_err());
    }

    #[test]
    fn system_actions() {
        assert_eq!(next_state(New, Action::Assign), Ok(Assigned));
        assert_eq!(next_state(Reopened, Action::Assign), Ok(Assigned));
        assert!(
            next_state(InProgress, Action::Assign).is_err(),
            "assign only queued work"
        );
        assert_eq!(
            next_state(InProgress, Action::SlaBreach),
            Ok(New),
            "back to a queue"
        );
        assert!(next_state(Resolved, Action::SlaBreach).is_err());
        assert_eq!(next_state(Assigned, Action::SlaAtRisk), Ok(Assigned));
        assert_eq!(next_state(Closed, Action::Feedback), Ok(Closed));
        assert!(next_state(Closed, Action::LinkIncident).is_err());
        assert_eq!(next_state(PendingCustomer, Action::Merge), Ok(PendingCustomer));
        assert!(
            next_state(Resolved, Action::Merge).is_err(),
            "a new problem, not a merge"
        );
    }

    #[test]
    fn replies_keep_the_state() {
        assert_eq!(next_state(PendingCustomer, Action::Reply), Ok(PendingCustomer));
        assert_eq!(next_state(InProgress, Action::Reassign), Ok(Assigned));
    }
}
