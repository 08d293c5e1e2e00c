//! `WatchWorkOrders` streams, bounded. A tenant's streams share one NATS subscription to
//! its work-order events ([`Feeds`]): each event is read and decoded once and handed to
//! every stream, which keeps those its desk asked for. Without limits one token could open
//! any number of streams, each buffering events a slow reader never takes. So a caller (a token's name) may hold
//! `per_caller` streams and a tenant `per_tenant`, and each stream holds at most `buffer`
//! events for its reader: a reader that falls further behind gets `RESOURCE_EXHAUSTED`,
//! and re-reads with `ListWorkOrders` before watching again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use closedloop_proto::v1::{WatchWorkOrdersResponse, WorkOrderEvent};
use futures::StreamExt;
use prost::Message;
use tokio::sync::{broadcast, mpsc};
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

/// Events handed from a tenant's subscription to its streams.
pub type Feed = broadcast::Receiver<Arc<WorkOrderEvent>>;

/// One NATS subscription per tenant with open streams, shared by them. With a subscription
/// per stream, every stream's desk cost a copy of the tenant's whole event flow read and
/// decoded, though a desk watching one team keeps a small part of it.
pub struct Feeds {
    nats: async_nats::Client,
    /// Events a feed holds for its slowest stream before that stream has fallen behind.
    capacity: usize,
    tenants: Arc<tokio::sync::Mutex<HashMap<String, broadcast::Sender<Arc<WorkOrderEvent>>>>>,
}

impl Feeds {
    pub fn new(nats: async_nats::Client, capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            nats,
            capacity: capacity.max(1),
            tenants: Arc::default(),
        })
    }

    /// The tenant's events from now on, subscribing for the tenant if no stream does yet.
    pub async fn subscribe(&self, tenant: &str) -> Result<Feed, async_nats::SubscribeError> {
        let mut tenants = self.tenants.lock().await;
        if let Some(sender) = tenants.get(tenant) {
            return Ok(sender.subscribe());
        }
        // Events are published by the relay; a core subscription sees them as they land in
        // the stream. A desk that reconnects re-reads with ListWorkOrders.
        let subscription = self
            .nats
            .subscribe(format!("closedloop.workorder.*.{tenant}"))
            .await?;
        let (sender, feed) = broadcast::channel(self.capacity);
        tenants.insert(tenant.to_owned(), sender.clone());
        tokio::spawn(pump(
            subscription,
            sender,
            tenant.to_owned(),
            self.tenants.clone(),
        ));
        Ok(feed)
    }
}

/// Decodes a tenant's events once and hands them to its streams; unsubscribes when the last
/// stream has closed (checked under the lock `subscribe` takes, so none joins meanwhile).
async fn pump(
    mut subscription: async_nats::Subscriber,
    sender: broadcast::Sender<Arc<WorkOrderEvent>>,
    tenant: String,
    tenants: Arc<tokio::sync::Mutex<HashMap<String, broadcast::Sender<Arc<WorkOrderEvent>>>>>,
) {
    while let Some(message) = subscription.next().await {
        if sender.receiver_count() == 0 {
            let mut tenants = tenants.lock().await;
            if sender.receiver_count() == 0 {
                tenants.remove(&tenant);
                return;
            }
        }
        match WorkOrderEvent::decode(message.payload.as_ref()) {
            Ok(event) => {
                let _ = sender.send(Arc::new(event));
            }
            Err(error) => {
                tracing::warn!(%error, subject = %message.subject, "an undecodable work-order event is not watched")
            }
        }
    }
    // The connection is gone for good (the service is stopping): streams end when they
    // see the feed close.
    tenants.lock().await.remove(&tenant);
}

/// What a reader gets when it fell `buffer` events behind.
fn fell_behind(buffer: usize) -> Status {
    Status::resource_exhausted(format!(
        "this watch fell {buffer} events behind and was closed; re-read with ListWorkOrders and watch again"
    ))
}

/// Forwards the events of `feed` that the reader `wants` into `out` until the reader goes
/// away, `stop` fires, or the reader falls behind (`out` is full, or the feed moved on past
/// it): then, with the one place `out` keeps for it, the reader is told so and the stream
/// ends. `out` must hold `buffer + 1`.
pub async fn forward(
    mut feed: Feed,
    wants: impl Fn(&WorkOrderEvent) -> bool,
    out: mpsc::Sender<Result<WatchWorkOrdersResponse, Status>>,
    buffer: usize,
    stop: CancellationToken,
    slot: Slot,
) {
    loop {
        let event = tokio::select! {
            event = feed.recv() => event,
            _ = out.closed() => break,
            _ = stop.cancelled() => break,
        };
        let event = match event {
            Ok(event) if wants(&event) => event,
            Ok(_) => continue,
            Err(broadcast::error::RecvError::Lagged(_)) => {
                let _ = out.try_send(Err(fell_behind(buffer)));
                break;
            }
            Err(broadcast::error::RecvError::Closed) => break,
        };
        if out.capacity() <= 1 {
            let _ = out.try_send(Err(fell_behind(buffer)));
            break;
        }
        if out
            .try_send(Ok(WatchWorkOrdersResponse {
                event: Some(WorkOrderEvent::clone(&event)),
            }))
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

    fn event(version: i64, team: &str) -> Arc<WorkOrderEvent> {
        Arc::new(WorkOrderEvent {
            work_order: Some(closedloop_proto::v1::WorkOrder {
                version,
                team: team.to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    /// A feed holding `events`, closed after them, as a tenant's subscription would be when
    /// the connection ends.
    fn feed_of(events: impl IntoIterator<Item = Arc<WorkOrderEvent>>, capacity: usize) -> Feed {
        let (sender, feed) = broadcast::channel(capacity);
        for event in events {
            sender.send(event).expect("a receiver");
        }
        feed
    }

    /// Runs one stream of `watchers` over `feed` to its end: everything its reader got, in
    /// order.
    async fn watch_all(
        watchers: &Arc<Watchers>,
        feed: Feed,
        wants: impl Fn(&WorkOrderEvent) -> bool,
    ) -> Vec<Result<WatchWorkOrdersResponse, Status>> {
        let slot = watchers.admit("acme", "desk-1").expect("admitted");
        let (out, mut reader) = mpsc::channel(limits().buffer + 1);
        forward(feed, wants, out, limits().buffer, CancellationToken::new(), slot).await;
        let mut received = Vec::new();
        while let Some(item) = reader.recv().await {
            received.push(item);
        }
        received
    }

    fn versions(received: &[Result<WatchWorkOrdersResponse, Status>]) -> Vec<i64> {
        received
            .iter()
            .filter_map(|item| item.as_ref().ok())
            .filter_map(|response| response.event.as_ref()?.work_order.as_ref())
            .map(|wo| wo.version)
            .collect()
    }

    fn last_code(received: &[Result<WatchWorkOrdersResponse, Status>]) -> Option<tonic::Code> {
        received
            .last()
            .and_then(|item| item.as_ref().err())
            .map(Status::code)
    }

    #[tokio::test]
    async fn a_reader_that_falls_behind_is_told_and_dropped() {
        let watchers = Watchers::new(limits());
        let feed = feed_of((1..=10).map(|version| event(version, "ops")), 16);
        let received = watch_all(&watchers, feed, |_| true).await;
        assert_eq!(received.len(), limits().buffer + 1, "the buffer, then the reason");
        assert_eq!(versions(&received), vec![1, 2, 3, 4]);
        assert_eq!(last_code(&received), Some(tonic::Code::ResourceExhausted));
        assert!(
            watchers.admit("acme", "desk-1").is_ok() && watchers.admit("acme", "desk-1").is_ok(),
            "its place was given back"
        );
    }

    #[tokio::test]
    async fn a_reader_the_shared_feed_moved_past_is_told_and_dropped() {
        // The feed keeps 2 events; 5 were handed on before this stream read any.
        let feed = feed_of((1..=5).map(|version| event(version, "ops")), 2);
        let received = watch_all(&Watchers::new(limits()), feed, |_| true).await;
        assert_eq!(versions(&received), Vec::<i64>::new(), "{received:?}");
        assert_eq!(last_code(&received), Some(tonic::Code::ResourceExhausted));
    }

    #[tokio::test]
    async fn a_reader_gets_only_what_it_watches_and_the_stream_ends_with_the_feed() {
        let teams = ["ops", "billing", "ops", "billing", "billing", "ops"];
        let feed = feed_of(
            teams.iter().zip(1..).map(|(team, version)| event(version, team)),
            16,
        );
        let wants = |event: &WorkOrderEvent| event.work_order.as_ref().is_some_and(|wo| wo.team == "ops");
        let received = watch_all(&Watchers::new(limits()), feed, wants).await;
        assert_eq!(versions(&received), vec![1, 3, 6]);
        assert!(
            received.iter().all(Result::is_ok),
            "a closed feed ends the stream quietly"
        );
    }
}
