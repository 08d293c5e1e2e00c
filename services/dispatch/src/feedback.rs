//! Customer feedback on a work order: a rating of 1–2 reopens it and escalates, 3–5 closes a
//! resolved one, a follow-up without a rating goes on the timeline. Each feedback id is
//! applied once per resolution of its work order: a redelivered event changes nothing, and
//! the same answer after the next resolution (a customer still unhappy) counts again.

use chrono::Utc;
use closedloop_proto::v1::{FeedbackReceived, WorkOrderState};
use uuid::Uuid;

use crate::Policy;
use crate::lifecycle::Action;
use crate::store::{self, Change, Db, StoreError};

/// What a feedback event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedbackOutcome {
    Reopened,
    Closed,
    Recorded,
    AlreadyApplied,
    /// No work order for it (e.g. praise, which opens none).
    NoWorkOrder,
}

/// What a rating asks for (pure).
pub fn action_for(satisfaction: i32, state: WorkOrderState) -> Option<Action> {
    match satisfaction {
        1 | 2 if matches!(state, WorkOrderState::Resolved | WorkOrderState::Closed) => Some(Action::Reopen),
        1 | 2 => Some(Action::Escalate),
        3..=5 if state == WorkOrderState::Resolved => Some(Action::Close),
        _ => None,
    }
}

pub async fn apply(
    db: &Db,
    policy: &Policy,
    feedback: &FeedbackReceived,
) -> Result<FeedbackOutcome, StoreError> {
    let mut tx = db.begin().await?;
    let work_order_id = if !feedback.work_order_id.is_empty() {
        Some(feedback.work_order_id.clone())
    } else {
        let complaint = Uuid::parse_str(&feedback.complaint_id).map_err(|_| StoreError::NotFound)?;
        sqlx::query_scalar::<_, Uuid>(
            "SELECT work_order_id FROM work_orders WHERE tenant = $1 AND complaint_id = $2 \
             UNION ALL SELECT work_order_id FROM complaint_links WHERE tenant = $1 AND complaint_id = $2 LIMIT 1",
        )
        .bind(&feedback.tenant)
        .bind(complaint)
        .fetch_optional(&mut **tx)
        .await?
        .map(|id| id.to_string())
    };
    let Some(work_order_id) = work_order_id else {
        return Ok(FeedbackOutcome::NoWorkOrder);
    };
    let mut wo = match store::lock(&mut tx, &feedback.tenant, &work_order_id).await {
        Ok(wo) => wo,
        // An archived work order was closed long ago: a late answer changes nothing.
        Err(StoreError::NotFound | StoreError::Archived) => return Ok(FeedbackOutcome::NoWorkOrder),
        Err(other) => return Err(other),
    };
    let seen = seen_key(&feedback.feedback_id, wo.resolved_at.as_ref());
    let fresh = sqlx::query("INSERT INTO feedback_seen (feedback_id) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(&seen)
        .execute(&mut **tx)
        .await?
        .rows_affected();
    if fresh == 0 {
        return Ok(FeedbackOutcome::AlreadyApplied);
    }
    let rating = feedback.satisfaction;
    let note = match (rating, feedback.comment.trim()) {
        (0, comment) => format!("customer follow-up: {comment}"),
        (n, "") => format!("customer rated {n}/5"),
        (n, comment) => format!("customer rated {n}/5: {comment}"),
    };
    let record = |action| Change {
        action,
        expected_version: 0,
        actor: "customer",
        note: &note,
    };
    let outcome = match action_for(rating, wo.state) {
        Some(Action::Reopen) => {
            store::apply_locked(&mut tx, &mut wo, record(Action::Reopen), |wo| {
                wo.satisfaction = rating
            })
            .await?;
            escalate(&mut tx, &mut wo, policy).await?;
            FeedbackOutcome::Reopened
        }
        Some(Action::Escalate) if wo.is_open() => {
            store::apply_locked(&mut tx, &mut wo, record(Action::Feedback), |wo| {
                wo.satisfaction = rating
            })
            .await?;
            escalate(&mut tx, &mut wo, policy).await?;
            FeedbackOutcome::Recorded
        }
        Some(Action::Close) => {
            store::apply_locked(&mut tx, &mut wo, record(Action::Close), |wo| {
                wo.satisfaction = rating
            })
            .await?;
            FeedbackOutcome::Closed
        }
        _ => {
            store::apply_locked(&mut tx, &mut wo, record(Action::Feedback), |wo| {
                if rating > 0 {
                    wo.satisfaction = rating;
                }
            })
            .await?;
            FeedbackOutcome::Recorded
        }
    };
    tx.commit().await?;
    Ok(outcome)
}

/// What marks a feedback as applied: its id with the resolution it answers (the work
/// order's latest resolution time; none while it was never resolved).
pub fn seen_key(feedback_id: &str, resolved_at: Option<&chrono::DateTime<Utc>>) -> String {
    match resolved_at {
        Some(at) => format!(
            "{feedback_id}@{}.{:09}",
            at.timestamp(),
            at.timestamp_subsec_nanos()
        ),
        None => format!("{feedback_id}@open"),
    }
}

/// One priority step up with a fresh SLA clock at the new priority.
async fn escalate(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    wo: &mut crate::work_order::WorkOrder,
    policy: &Policy,
) -> Result<(), StoreError> {
    let change = Change {
        action: Action::Escalate,
        expected_version: 0,
        actor: "customer",
        note: "dissatisfied customer",
    };
    let priority = wo.priority.raised();
    let deadlines = policy.sla.deadlines(&wo.category, priority, Utc::now());
    // The clock first, so the event carries the new deadlines.
    store::restart_clock(tx, wo, &deadlines).await?;
    store::apply_locked(tx, wo, change, |_| {}).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use WorkOrderState::*;

    #[test]
    fn feedback_is_seen_once_per_resolution() {
        let first = chrono::DateTime::from_timestamp(100, 5).expect("valid");
        let second = chrono::DateTime::from_timestamp(200, 0).expect("valid");
        // The key's spelling is stored: a resolution keeps the key it had.
        assert_eq!(seen_key("f", Some(&first)), "f@100.000000005");
        assert_eq!(seen_key("f", Some(&first)), seen_key("f", Some(&first)));
        assert_ne!(seen_key("f", Some(&first)), seen_key("f", Some(&second)));
        assert_ne!(seen_key("f", None), seen_key("g", None));
    }

    #[test]
    fn ratings_map_to_actions() {
        assert_eq!(action_for(1, Resolved), Some(Action::Reopen));
        assert_eq!(action_for(2, Closed), Some(Action::Reopen));
        assert_eq!(action_for(2, InProgress), Some(Action::Escalate));
        assert_eq!(action_for(4, Resolved), Some(Action::Close));
        assert_eq!(action_for(5, Closed), None, "already closed");
        assert_eq!(action_for(3, Resolved), Some(Action::Close));
        assert_eq!(action_for(0, Resolved), None, "a follow-up is recorded only");
    }
}
