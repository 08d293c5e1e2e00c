//! `WatchWorkOrders` streams, bounded. Each stream is a NATS subscription to the tenant's
//! work-order events; without limits one token could open any number of them, each
//! buffering events a slow reader never takes. So a caller (a token's name) may hold
//! `per_caller` streams and a tenant `per_tenant`, and each stream holds at most `buffer`
//! events for its reader: a reader that falls further behind gets `RESOURCE_EXHAUSTED`,
//! and re-reads with `ListWorkOrders` before watching again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use closedloop_proto::v1::{WatchWorkOrdersResponse, WorkOrderEvent};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// How many streams may be open, and how far a reader may fall behind.
#[derive(Debug, Clone, Copy)]
pub struct WatchLimits {
    pub per_caller: usize,
    pub per_tenant: usize,
    /// Events a stream holds for its reader.
    pub buffer: usize,
}

/// Open streams of one tenant: in all, and by caller.
#[derive(Debug, Default)]
struct TenantWatches {
    open: usize,
    by_caller: HashMap<String, usize>,
}

/// Whether one more stream may open, given what is open (pure).
fn admit(open_for_tenant: usize, open_for_caller: usize, limits: &WatchLimits) -> Result<(), Status> {
    if open_for_caller >= limits.per_caller {
        return Err(Status::resource_exhausted(format!(
            "this caller already watches {open_for_caller} streams, the most allowed; close one first"
        )));
    }
    if open_for_tenant >= limits.per_tenant {
        return Err(Status::resource_exhausted(format!(
            "this tenant already has {open_for_tenant} watch streams open, the most allowed"
        )));
    }
    Ok(())
}

/// The streams open in this process.
#[derive(Debug)]
pub struct Watchers {
    limits: WatchLimits,
    open: Mutex<HashMap<String, TenantWatches>>,
}

/// One open stream's place, given back when dropped.
pub struct Slot {
    watchers: Arc<Watchers>,
    tenant: String,
    caller: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.watchers.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tenant) = open.get_mut(&self.tenant) {
            tenant.open = tenant.open.saturating_sub(1);
            if let Some(count) = tenant.by_caller.get_mut(&self.caller) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    tenant.by_caller.remove(&self.caller);
                }
            }
            if tenant.open == 0 {
                open.remove(&self.tenant);
            }
        }
    }
}

impl Watchers {
    pub fn new(limits: WatchLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            open: Mutex::new(HashMap::new()),
        })
    }

    pub fn limits(&self) -> WatchLimits {
        self.limits
    }

    /// A place for one more stream of `caller` in `tenant`, or `RESOURCE_EXHAUSTED`.
    pub fn admit(self: &Arc<Self>, tenant: &str, caller: &str) -> Result<Slot, Status> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let watches = open.entry(tenant.to_owned()).or_default();
        let for_caller = watches.by_caller.get(caller).copied().unwrap_or(0);
        admit(watches.open, for_caller, &self.limits)?;
        watches.open += 1;
        *watches.by_caller.entry(caller.to_owned()).or_default() += 1;
        Ok(Slot {
            watchers: self.clone(),
            tenant: tenant.to_owned(),
            caller: caller.to_owned(),
        })
    }
}

/// What a reader gets when it fell `buffer` events behind.
fn fell_behind(buffer: usize) -> Status {
    Status::resource_exhausted(format!(
        "this watch fell {buffer} events behind and was closed; re-read with ListWorkOrders and watch again"
    ))
}

/// Forwards `events` into `out` until the reader goes away, `stop` fires, or the reader
/// falls behind: then, with the one place `out` keeps for it, the reader is told so and the
/// stream ends. `out` must hold `buffer + 1`.
pub async fn forward(
    events: impl Stream<Item = WorkOrderEvent>,
    out: mpsc::Sender<Result<WatchWorkOrdersResponse, Status>>,
    buffer: usize,
    stop: CancellationToken,
    slot: Slot,
) {
    tokio::pin!(events);
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            _ = out.closed() => break,
            _ = stop.cancelled() => break,
        };
        let Some(event) = event else { break };
        if out.capacity() <= 1 {
            let _ = out.try_send(Err(fell_behind(buffer)));
            break;
        }
        if out
            .try_send(Ok(WatchWorkOrdersResponse { event: Some(event) }))
            .is_err()
        {
            break;
        }
    }
    drop(slot);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> WatchLimits {
        WatchLimits {
            per_caller: 2,
            per_tenant: 3,
            buffer: 4,
        }
    }

    #[test]
    fn streams_are_bounded_per_caller_and_per_tenant() {
        let watchers = Watchers::new(limits());
        let first = watchers.admit("acme", "desk-1").expect("first");
        let _second = watchers.admit("acme", "desk-1").expect("second");
        let refused = watchers.admit("acme", "desk-1").err().map(|s| s.code());
        assert_eq!(refused, Some(tonic::Code::ResourceExhausted), "two per caller");
        let _third = watchers.admit("acme", "desk-2").expect("another caller");
        let refused = watchers.admit("acme", "desk-3").err().map(|s| s.code());
        assert_eq!(refused, Some(tonic::Code::ResourceExhausted), "three per tenant");
        assert!(watchers.admit("beta", "desk-1").is_ok(), "tenants are apart");
        drop(first);
        assert!(
            watchers.admit("acme", "desk-1").is_ok(),
            "a closed stream frees its place"
        );
    }

    #[tokio::test]
    async fn a_reader_that_falls_behind_is_told_and_dropped() {
        let watchers = Watchers::new(limits());
        let slot = watchers.admit("acme", "desk-1").expect("admitted");
        let (out, mut reader) = mpsc::channel(limits().buffer + 1);
        let events = futures::stream::iter((1..=10).map(|version| WorkOrderEvent {
            work_order: Some(closedloop_proto::v1::WorkOrder {
                version,
                ..Default::default()
            }),
            ..Default::default()
        }));
        forward(events, out, limits().buffer, CancellationToken::new(), slot).await;
        let mut received = Vec::new();
        while let Some(item) = reader.recv().await {
            received.push(item);
        }
        assert_eq!(received.len(), limits().buffer + 1, "the buffer, then the reason");
        assert!(received[..limits().buffer].iter().all(Result::is_ok));
        let last = received
            .last()
            .and_then(|item| item.as_ref().err())
            .map(Status::code);
        assert_eq!(last, Some(tonic::Code::ResourceExhausted));
        assert!(
            watchers.admit("acme", "desk-1").is_ok() && watchers.admit("acme", "desk-1").is_ok(),
            "its place was given back"
        );
    }
}
