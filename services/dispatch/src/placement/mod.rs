//! The hot path: classified complaints become work orders in batches. Concurrent handlers
//! hand their complaint to one batcher task, which places whatever has queued up in a single
//! transaction (group commit) in three steps:
//!
//! - [`load`] takes the batch's locks and reads everything its decisions need into a
//!   [`Snapshot`](load::Snapshot), with a few set-based statements;
//! - [`decide`] makes every decision (redelivery, merge, incident, assignment) as a pure
//!   function, unit-tested without a database;
//! - [`write`] applies the resulting plan with multi-row statements.
//!
//! A batch PostgreSQL refuses for a value one complaint carries is placed complaint by
//! complaint, so only that one fails.

use std::collections::HashMap;
use std::sync::Arc;

use crate::work_order::WorkOrder;
use chrono::{DateTime, Utc};
use closedloop_runtime::batch::{BatchWrite, WriteError};
use closedloop_runtime::db;
use uuid::Uuid;

mod decide;
mod incidents;
mod load;
mod queue;
mod staffing;
mod write;

pub use queue::{assign_queued, offer_queue};

use crate::Policy;
use crate::lifecycle::Action;
use crate::store::{Db, NewWorkOrder, Recorded, StoreError};

/// Most complaints placed in one transaction.
pub const MAX_BATCH: usize = 256;

/// A complaint ready to place: the work order it would open and how it was routed.
pub struct Draft {
    pub complaint: Uuid,
    pub new: NewWorkOrder,
    pub account_managed: bool,
    pub route_reason: String,
    /// Trace context of the complaint's handler, for the events placement writes.
    pub trace: HashMap<String, String>,
}

/// What became of a classified complaint.
#[derive(Debug, Clone, PartialEq)]
pub enum Placement {
    /// A new work order was opened for it.
    Created(WorkOrder),
    /// Attached to an open work order: a thread follow-up or the same poster's same problem.
    Attached(WorkOrder),
    /// Handled before (a redelivery): nothing changed.
    AlreadyHandled,
}

/// Places what arrives together, for [`Batcher`].
pub struct Placer {
    pub db: Db,
    pub policy: Arc<Policy>,
}

impl BatchWrite for Placer {
    type Item = Draft;
    type Answer = Placement;

    async fn write(&mut self, drafts: &[Draft]) -> Result<Vec<Placement>, WriteError> {
        BATCH_SIZES.observe(drafts.len() as f64);
        match place_batch(&self.db, &self.policy, drafts).await {
            Ok(placements) => Ok(placements),
            Err(StoreError::Database(error)) if db::is_data_error(&error) => {
                Err(WriteError::Data(error.into()))
            }
            Err(error) => {
                tracing::warn!(%error, "placing a batch failed; its complaints will be tried again");
                Err(WriteError::Store(error.into()))
            }
        }
    }
}

/// Hands drafts to the placing task, which places whatever arrived within its linger in one
/// transaction.
pub type Batcher = closedloop_runtime::batch::Batcher<Placer>;

static BATCH_SIZES: std::sync::LazyLock<prometheus_client::metrics::histogram::Histogram> =
    std::sync::LazyLock::new(|| {
        closedloop_runtime::metrics::register(
            "dispatch_placement_batch_size",
            "Complaints placed per transaction",
            closedloop_runtime::metrics::batch_size_histogram(),
        )
    });

/// (tenant, category, region): what incidents are counted and opened by.
pub(crate) type IncidentKey = (String, String, String);

/// Province, or province/city: the key incidents are counted by.
pub fn region_key(province: &str, city: &str) -> String {
    match (province.is_empty(), city.is_empty()) {
        (true, _) => String::new(),
        (false, true) => province.to_owned(),
        (false, false) => format!("{province}/{city}"),
    }
}

pub(super) fn poster_id(wo: &WorkOrder) -> &str {
    &wo.poster.poster_id
}

/// Applies a system action (see [`WorkOrder::apply`]) and records it; an action the work
/// order's state refuses changes and records nothing. Returns whether it was applied.
pub(super) fn record(
    wo: &mut WorkOrder,
    action: Action,
    note: String,
    now: DateTime<Utc>,
    events: &mut Vec<Recorded>,
) -> bool {
    if wo.apply(action, &note, now).is_err() {
        return false;
    }
    events.push(Recorded::new(wo, action.event_kind(), "system", note));
    true
}

/// Places a batch of drafts in one transaction: load, decide, write. One result per
/// draft, in order.
pub async fn place_batch(db: &Db, policy: &Policy, drafts: &[Draft]) -> Result<Vec<Placement>, StoreError> {
    let now = Utc::now();
    // The pool plans every statement for its arguments (see `closedloop_runtime::db`): a
    // cached generic plan made while the tables were nearly empty picked an index that matched
    // only the tenant, and a batch of 256 then took seconds.
    let mut tx = db.begin().await?;
    let snapshot = load::load(&mut tx, policy, drafts, now).await?;
    let plan = decide::decide(&snapshot, drafts, policy, now);
    write::write(&mut tx, &plan).await?;
    tx.commit().await?;
    Ok(plan.placements)
}
