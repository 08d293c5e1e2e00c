//! The consume loop every service runs on its durable pull consumers.
//!
//! All replicas of a service bind the same durable name, so JetStream shares the work
//! among them. The loop asks JetStream for no more events than it has free permits: an
//! event it holds is one it works on, so nothing sits unacknowledged in a client buffer
//! while its ack wait runs out. While an event is in hand the loop sends progress
//! acknowledgements, so the ack wait can be short: a crashed replica's events come back
//! within seconds.
//!
//! Outcomes ([`HandleError`]):
//! - success → ack;
//! - [`HandleError::Reject`] → park in the dead-letter stream with the reason, terminate;
//! - [`HandleError::Wait`] → keep the event and run it again after the wait; this never
//!   dead-letters (a gateway down, another sender's lease, a deadline not reached);
//! - [`HandleError::Retry`] → ask whether the consumer's dependencies answer (NATS, and the
//!   handler's own, e.g. PostgreSQL). If they do not, the failure is theirs: the loop keeps
//!   the event, stops pulling, and runs it again once they answer, spending nothing of the
//!   event's budget. If they do, the event itself may be at fault: it is handed back with
//!   a doubling delay and dead-lettered on its `max_deliver`-th delivery.
//!
//! A handler that panics rejects its event. An event delivered
//! [`WITHOUT_OUTCOME_FACTOR`] times its budget has come back without any outcome each time
//! (the process died or hung on it), and is dead-lettered unhandled. On cancellation the
//! loop stops pulling, hands back what it keeps waiting, and lets running handlers finish.
//!
//! A consumer with a `hold` reads its stream that far behind: an event is handled no
//! earlier than `hold` after it entered the stream.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer::pull};
use futures::{FutureExt, StreamExt};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::config::NatsArgs;
use crate::metrics::{ConsumerSeries, Outcome};

/// How a handler failed.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// Failed in a way that may pass: a dependency failed, or the event is at fault. The
    /// loop tells which by asking the dependencies (see the module documentation).
    #[error("transient failure: {0:#}")]
    Retry(#[source] anyhow::Error),
    /// Not now, for a reason outside the event that passes by itself (a gateway down or its
    /// circuit open, a lease another live sender holds, a deadline not yet reached): run it
    /// again after this long. Never dead-letters.
    #[error("waiting {0:?}: {1:#}")]
    Wait(Duration, #[source] anyhow::Error),
    /// Can never work (undecodable, invalid, refused for good): dead-letter it now.
    #[error("rejected: {0}")]
    Reject(String),
}

impl HandleError {
    pub fn retry(error: impl Into<anyhow::Error>) -> Self {
        Self::Retry(error.into())
    }
    pub fn reject(reason: impl Into<String>) -> Self {
        Self::Reject(reason.into())
    }
}

/// Decodes a protobuf payload, rejecting (dead-lettering) what does not decode.
pub fn decode<M: prost::Message + Default>(message: &jetstream::Message) -> Result<M, HandleError> {
    M::decode(message.payload.as_ref())
        .map_err(|error| HandleError::reject(format!("undecodable payload on {}: {error}", message.subject)))
}

/// The tenant a subject `closedloop.<entity>.<event>.<tenant>` names.
pub fn subject_tenant(subject: &str) -> &str {
    subject.rsplit('.').next().unwrap_or_default()
}

/// Rejects (dead-letters) an event whose payload names another tenant than its subject. A
/// publisher's permissions are granted by subject, so a payload naming another tenant is
/// forged or broken, never to be acted on.
pub fn check_tenant(message: &jetstream::Message, tenant: &str) -> Result<(), HandleError> {
    let named = subject_tenant(&message.subject);
    if named == tenant {
        Ok(())
    } else {
        Err(HandleError::reject(format!(
            "the subject names tenant {named:?} but the event tenant {tenant:?}"
        )))
    }
}

/// Handles one event. Must be idempotent: any event may arrive more than once, and a kept
/// event is handled again from the start.
pub trait MessageHandler: Send + Sync + 'static {
    fn handle(&self, message: &jetstream::Message) -> impl Future<Output = Result<(), HandleError>> + Send;

    /// Whether what this handler depends on besides NATS answers now (a `SELECT 1`, say).
    /// Asked after a [`HandleError::Retry`], to tell a dependency's failure from the event's.
    fn dependencies_ready(&self) -> impl Future<Output = anyhow::Result<()>> + Send {
        async { Ok(()) }
    }
}

/// Which events a consumer reads and how it treats them.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    pub stream: &'static str,
    /// Durable name shared by all replicas of the service.
    pub durable: String,
    pub filter_subjects: Vec<String>,
    /// Deliveries an event may fail on while its dependencies answer before it is
    /// dead-lettered.
    pub max_deliver: i64,
    /// How long JetStream waits for an acknowledgement (or a progress acknowledgement)
    /// before it redelivers: how soon a crashed replica's events come back.
    pub ack_wait: Duration,
    /// Messages handled at once by this replica.
    pub concurrency: usize,
    /// First redelivery delay after a failure the event may be at fault for.
    pub retry_base: Duration,
    /// How long a message stays in the stream before this consumer handles it (zero: at
    /// once).
    pub hold: Duration,
}

/// An event delivered this many times its `max_deliver` has come back without an outcome
/// every time: whatever handled it died or hung on it.
pub const WITHOUT_OUTCOME_FACTOR: i64 = 4;

/// How long one pull request waits for events; the loop asks again after it.
const PULL_EXPIRES: Duration = Duration::from_secs(2);
/// How long past its expiry a pull request may go unanswered before the loop asks again: a
/// restarted server forgets open requests without answering them.
const PULL_GRACE: Duration = Duration::from_millis(500);
/// How often a dependency is asked, at most, however many events wait on it.
const PROBE_EVERY: Duration = Duration::from_millis(250);
/// Longest wait between two checks of a dependency that is down.
const MAX_HOLD_BACKOFF: Duration = Duration::from_secs(2);
/// Longest a probe may take before the dependency counts as down.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

impl ConsumerSpec {
    pub fn new(stream: &'static str, durable: &str, filter_subjects: Vec<String>, args: &NatsArgs) -> Self {
        Self {
            stream,
            durable: durable.to_owned(),
            filter_subjects,
            max_deliver: args.max_deliver.max(1),
            ack_wait: args.ack_wait().max(Duration::from_secs(1)),
            concurrency: args.consumer_concurrency.max(1),
            retry_base: args.retry_base(),
            hold: Duration::ZERO,
        }
    }

    fn pull_config(&self) -> pull::Config {
        pull::Config {
            durable_name: Some(self.durable.clone()),
            filter_subjects: self.filter_subjects.clone(),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            // Unlimited: the loop decides when an event is dead-lettered. A limit here would
            // let JetStream stop delivering an event that waited out a long outage, silently.
            max_deliver: -1,
            // Across all replicas; enough for each to keep its semaphore busy.
            max_ack_pending: (self.concurrency as i64 * 16).max(256),
            ..Default::default()
        }
    }

    /// How often an event in hand is reported in progress: well inside the ack wait.
    fn progress_every(&self) -> Duration {
        (self.ack_wait / 3).max(Duration::from_millis(100))
    }
}

/// What is left of `hold` for a message published at `published`; a clock behind the
/// server's waits at most the whole hold.
fn hold_left(published: std::time::SystemTime, now: std::time::SystemTime, hold: Duration) -> Duration {
    match now.duration_since(published) {
        Ok(age) => hold.saturating_sub(age),
        Err(_) => hold,
    }
}

/// Delay before redelivery after the `delivered`-th failed attempt: doubling from `base`,
/// capped at a minute, before jitter.
pub fn retry_delay(base: Duration, delivered: i64) -> Duration {
    let exponent = u32::try_from(delivered.saturating_sub(1)).unwrap_or(0).min(16);
    base.saturating_mul(1 << exponent).min(Duration::from_secs(60))
}

/// `delay` spread by up to ±20%, so replicas and messages that failed together do not
/// retry in lockstep.
pub fn with_jitter(delay: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    // A fresh randomly keyed hasher per call is random enough for spreading retries.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    let unit = (hasher.finish() % 10_001) as f64 / 10_000.0; // 0.0 ..= 1.0
    delay.mul_f64(0.8 + 0.4 * unit)
}

/// What the loop does with an event it is done with.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Disposal {
    Ack,
    /// Park it in the dead-letter stream with this reason, then terminate it.
    DeadLetter(String),
    /// Hand it back for redelivery after this long (a delivery of its budget).
    Redeliver(Duration),
    /// Hand it back at once, unhandled: the loop is stopping.
    GiveBack,
}

/// The decision after a [`HandleError::Retry`] on the `delivered`-th delivery, when the
/// consumer's dependencies answer (so the event may be at fault): redeliver with backoff,
/// or dead-letter once its budget is spent.
fn after_failure(delivered: i64, max_deliver: i64, retry_base: Duration, error: &anyhow::Error) -> Disposal {
    if delivered >= max_deliver {
        Disposal::DeadLetter(format!("gave up after {delivered} deliveries: {error:#}"))
    } else {
        Disposal::Redeliver(with_jitter(retry_delay(retry_base, delivered)))
    }
}

/// Whether an event arriving on its `delivered`-th delivery has come back too often without
/// an outcome to be handled again.
fn delivered_without_outcome(delivered: i64, max_deliver: i64) -> bool {
    delivered > max_deliver.saturating_mul(WITHOUT_OUTCOME_FACTOR)
}

/// Whether the consumer's dependencies answer, asked at most once per [`PROBE_EVERY`]
/// however many events wait on them.
struct Readiness {
    /// When they were last asked, and whether they answered.
    last: Mutex<Option<(Instant, bool)>>,
}

impl Readiness {
    async fn check<H: MessageHandler>(&self, bus: &Bus, handler: &H, consumer: &str) -> bool {
        let mut last = self.last.lock().await;
        if let Some((at, ready)) = *last
            && at.elapsed() < PROBE_EVERY
        {
            return ready;
        }
        let probe = async {
            bus.ready().await?;
            handler.dependencies_ready().await
        };
        let ready = match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
            Ok(Ok(())) => true,
            Ok(Err(error)) => {
                tracing::warn!(consumer, error = format!("{error:#}"), "a dependency is down");
                false
            }
            Err(_) => {
                tracing::warn!(consumer, "a dependency did not answer within {PROBE_TIMEOUT:?}");
                false
            }
        };
        *last = Some((Instant::now(), ready));
        ready
    }
}

/// What every event task of one consume loop shares.
struct Shared<H> {
    bus: Bus,
    spec: ConsumerSpec,
    handler: Arc<H>,
    series: ConsumerSeries,
    readiness: Readiness,
    /// Events kept because a dependency is down; the loop pulls nothing while any are.
    held: watch::Sender<usize>,
    cancel: CancellationToken,
}

/// Runs until `cancel` fires, then drains in-flight messages. Rebuilds the consumer with
/// backoff when NATS or the stream is unavailable.
pub async fn run<H: MessageHandler>(
    bus: Bus,
    spec: ConsumerSpec,
    handler: Arc<H>,
    cancel: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(spec.concurrency));
    let shared = Arc::new(Shared {
        series: ConsumerSeries::of(&spec.durable),
        bus,
        spec,
        handler,
        readiness: Readiness {
            last: Mutex::new(None),
        },
        held: watch::Sender::new(0),
        cancel,
    });
    let cancel = &shared.cancel;
    let mut in_flight = JoinSet::new();
    let mut backoff = Duration::from_millis(100);
    let mut held = shared.held.subscribe();
    'rebuild: while !cancel.is_cancelled() {
        let consumer = match open(&shared.bus, &shared.spec).await {
            Ok(consumer) => {
                backoff = Duration::from_millis(100);
                consumer
            }
            Err(error) => {
                tracing::warn!(consumer = %shared.spec.durable, %error, "cannot open consumer; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = cancel.cancelled() => break 'rebuild,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        loop {
            // Nothing new while a dependency is down: the events kept are enough to find out
            // when it is back.
            tokio::select! {
                _ = held.wait_for(|kept| *kept == 0) => {}
                _ = cancel.cancelled() => break 'rebuild,
            }
            let mut round = tokio::select! {
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(permit) => vec![permit],
                    Err(_) => break 'rebuild,
                },
                _ = cancel.cancelled() => break 'rebuild,
            };
            while let Ok(permit) = permits.clone().try_acquire_owned() {
                round.push(permit);
            }
            match pull_round(&consumer, &shared, round, &mut in_flight).await {
                Ok(true) => {}
                Ok(false) => break 'rebuild,
                Err(error) => {
                    tracing::warn!(consumer = %shared.spec.durable, %error, "pull failed; reopening");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = cancel.cancelled() => break 'rebuild,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue 'rebuild;
                }
            }
            while in_flight.try_join_next().is_some() {}
        }
    }
    while in_flight.join_next().await.is_some() {}
    tracing::info!(consumer = %shared.spec.durable, "consumer stopped");
}

/// Asks for as many events as `permits` and hands each to a task with its permit. Returns
/// `Ok(false)` when cancelled.
async fn pull_round<H: MessageHandler>(
    consumer: &jetstream::consumer::Consumer<pull::Config>,
    shared: &Arc<Shared<H>>,
    mut permits: Vec<OwnedSemaphorePermit>,
    in_flight: &mut JoinSet<()>,
) -> anyhow::Result<bool> {
    let mut batch = consumer
        .batch()
        .max_messages(permits.len())
        .expires(PULL_EXPIRES)
        .messages()
        .await?;
    let deadline = tokio::time::sleep(PULL_EXPIRES + PULL_GRACE);
    tokio::pin!(deadline);
    while let Some(permit) = permits.pop() {
        let next = tokio::select! {
            next = batch.next() => next,
            _ = &mut deadline => return Ok(true),
            _ = shared.cancel.cancelled() => return Ok(false),
        };
        match next {
            Some(Ok(message)) => {
                let shared = shared.clone();
                in_flight.spawn(async move {
                    process(&shared, message).await;
                    drop(permit);
                });
            }
            Some(Err(error)) => anyhow::bail!(error),
            None => return Ok(true),
        }
    }
    Ok(true)
}

/// Runs `handler` on the consumer `spec` as a task; see [`run`].
pub fn spawn<H: MessageHandler>(
    bus: &Bus,
    spec: ConsumerSpec,
    handler: H,
    cancel: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(bus.clone(), spec, Arc::new(handler), cancel.clone()))
}

async fn open(bus: &Bus, spec: &ConsumerSpec) -> anyhow::Result<jetstream::consumer::Consumer<pull::Config>> {
    Ok(bus
        .jetstream()
        .create_consumer_on_stream(spec.pull_config(), spec.stream)
        .await?)
}

/// Runs `work` while telling JetStream every `every` that `message` is in progress.
async fn in_progress<T>(message: &jetstream::Message, every: Duration, work: impl Future<Output = T>) -> T {
    tokio::pin!(work);
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            done = &mut work => return done,
            _ = ticks.tick() => {
                if let Err(error) = message.ack_with(AckKind::Progress).await {
                    tracing::debug!(%error, "progress acknowledgement failed");
                }
            }
        }
    }
}

async fn process<H: MessageHandler>(shared: &Shared<H>, message: jetstream::Message) {
    let span = tracing::info_span!("consume", consumer = %shared.spec.durable, subject = %message.subject);
    crate::telemetry::follow_from_nats(span, message.headers.as_ref(), async {
        let (delivered, pending) = message
            .info()
            .map(|info| (info.delivered, info.pending))
            .unwrap_or((1, 0));
        shared
            .series
            .pending
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
        let disposal = in_progress(
            &message,
            shared.spec.progress_every(),
            dispose(shared, &message, delivered),
        )
        .await;
        let ack = match disposal {
            Disposal::Ack => {
                shared.series.outcome(Outcome::Ack).inc();
                AckKind::Ack
            }
            Disposal::Redeliver(delay) => {
                shared.series.outcome(Outcome::Retry).inc();
                AckKind::Nak(Some(delay))
            }
            Disposal::GiveBack => AckKind::Nak(None),
            Disposal::DeadLetter(reason) => {
                tracing::error!(%reason, delivered, "parking event in the dead-letter stream");
                match shared
                    .bus
                    .dead_letter(&message, &shared.spec.durable, &reason)
                    .await
                {
                    Ok(_) => {
                        shared.series.outcome(Outcome::DeadLetter).inc();
                        AckKind::Term
                    }
                    Err(publish_error) => {
                        tracing::error!(%publish_error, "dead-letter publish failed; will redeliver");
                        AckKind::Nak(Some(shared.spec.retry_base))
                    }
                }
            }
        };
        if let Err(error) = message.ack_with(ack).await {
            // The event will be redelivered after ack_wait; handlers are idempotent.
            tracing::warn!(%error, "acknowledgement failed");
        }
    })
    .await
}

/// Sleeps `wait`; false if the loop was cancelled first.
async fn sleep_unless_cancelled(cancel: &CancellationToken, wait: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(wait) => true,
        _ = cancel.cancelled() => false,
    }
}

/// Handles `message` until there is something to tell JetStream: keeps it through waits and
/// dependency outages, running the handler again after each.
async fn dispose<H: MessageHandler>(
    shared: &Shared<H>,
    message: &jetstream::Message,
    delivered: i64,
) -> Disposal {
    let spec = &shared.spec;
    if delivered_without_outcome(delivered, spec.max_deliver) {
        return Disposal::DeadLetter(format!(
            "delivered {delivered} times without an outcome: whatever handled it stopped each time"
        ));
    }
    if !spec.hold.is_zero()
        && let Ok(info) = message.info()
    {
        let wait = hold_left(
            std::time::SystemTime::from(info.published),
            std::time::SystemTime::now(),
            spec.hold,
        );
        if !sleep_unless_cancelled(&shared.cancel, wait).await {
            return Disposal::GiveBack;
        }
    }
    loop {
        let started = Instant::now();
        let outcome = AssertUnwindSafe(shared.handler.handle(message))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(HandleError::reject(format!("the handler panicked: {what}")))
            });
        shared
            .series
            .handle_seconds
            .observe(started.elapsed().as_secs_f64());
        let error = match outcome {
            Ok(()) => return Disposal::Ack,
            Err(HandleError::Reject(reason)) => return Disposal::DeadLetter(reason),
            Err(HandleError::Wait(wait, reason)) => {
                tracing::debug!(reason = format!("{reason:#}"), ?wait, "not yet; kept");
                shared.series.outcome(Outcome::Later).inc();
                if !sleep_unless_cancelled(&shared.cancel, wait).await {
                    return Disposal::GiveBack;
                }
                continue;
            }
            Err(HandleError::Retry(error)) => error,
        };
        if shared
            .readiness
            .check(&shared.bus, shared.handler.as_ref(), &spec.durable)
            .await
        {
            tracing::warn!(error = format!("{error:#}"), delivered, "handler failed");
            return after_failure(delivered, spec.max_deliver, spec.retry_base, &error);
        }
        tracing::warn!(
            error = format!("{error:#}"),
            "a dependency is down; event kept until it answers"
        );
        shared.series.outcome(Outcome::Held).inc();
        if !hold_until_ready(shared).await {
            return Disposal::GiveBack;
        }
    }
}

/// Keeps one event while the consumer's dependencies are down, counted in `held` so the
/// loop pulls nothing new. True once they answer; false if the loop was cancelled first.
async fn hold_until_ready<H: MessageHandler>(shared: &Shared<H>) -> bool {
    shared.held.send_modify(|kept| *kept += 1);
    let mut backoff = Duration::from_millis(100);
    let ready = loop {
        if !sleep_unless_cancelled(&shared.cancel, with_jitter(backoff)).await {
            break false;
        }
        if shared
            .readiness
            .check(&shared.bus, shared.handler.as_ref(), &shared.spec.durable)
            .await
        {
            break true;
        }
        backoff = (backoff * 2).min(MAX_HOLD_BACKOFF);
    };
    shared.held.send_modify(|kept| *kept -= 1);
    ready
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_doubles_and_is_capped() {
        let base = Duration::from_millis(500);
        assert_eq!(retry_delay(base, 1), Duration::from_millis(500));
        assert_eq!(retry_delay(base, 2), Duration::from_secs(1));
        assert_eq!(retry_delay(base, 4), Duration::from_secs(4));
        assert_eq!(retry_delay(base, 40), Duration::from_secs(60));
        assert_eq!(retry_delay(base, 0), Duration::from_millis(500));
    }

    #[test]
    fn a_held_message_waits_out_the_rest_of_its_hold() {
        let published = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let hold = Duration::from_secs(10);
        let after_ms = |ms: u64| published + Duration::from_millis(ms);
        assert_eq!(hold_left(published, after_ms(0), hold), hold, "just published");
        assert_eq!(
            hold_left(published, after_ms(2_500), hold),
            Duration::from_millis(7_500)
        );
        assert_eq!(
            hold_left(published, after_ms(10_000), hold),
            Duration::ZERO,
            "due"
        );
        assert_eq!(
            hold_left(published, after_ms(60_000), hold),
            Duration::ZERO,
            "long due"
        );
        let before = published - Duration::from_secs(3);
        assert_eq!(
            hold_left(published, before, hold),
            hold,
            "our clock behind the server's"
        );
    }

    #[test]
    fn jitter_stays_within_a_fifth() {
        let delay = Duration::from_secs(10);
        for _ in 0..100 {
            let jittered = with_jitter(delay);
            assert!(
                jittered >= Duration::from_secs(8) && jittered <= Duration::from_secs(12),
                "{jittered:?}"
            );
        }
    }

    #[test]
    fn a_failure_with_dependencies_up_spends_the_budget_then_dead_letters() {
        let error = anyhow::anyhow!("value too long");
        let base = Duration::from_secs(1);
        match after_failure(1, 5, base, &error) {
            Disposal::Redeliver(delay) => {
                assert!(delay >= Duration::from_millis(800) && delay <= Duration::from_millis(1200))
            }
            other => panic!("expected a redelivery, got {other:?}"),
        }
        assert!(matches!(
            after_failure(4, 5, base, &error),
            Disposal::Redeliver(_)
        ));
        assert_eq!(
            after_failure(5, 5, base, &error),
            Disposal::DeadLetter("gave up after 5 deliveries: value too long".into())
        );
    }

    #[test]
    fn the_tenant_is_the_subject_s_last_token() {
        assert_eq!(subject_tenant("closedloop.complaint.received.acme"), "acme");
        assert_eq!(subject_tenant("acme"), "acme");
        assert_eq!(subject_tenant(""), "");
    }

    #[test]
    fn only_an_event_back_far_more_often_than_its_budget_counts_as_stuck() {
        assert!(!delivered_without_outcome(1, 5));
        assert!(!delivered_without_outcome(20, 5));
        assert!(delivered_without_outcome(21, 5));
    }

    #[test]
    fn the_pull_config_leaves_dead_lettering_to_the_loop() {
        let spec = ConsumerSpec {
            stream: "S",
            durable: "d".into(),
            filter_subjects: vec!["a.>".into()],
            max_deliver: 5,
            ack_wait: Duration::from_secs(6),
            concurrency: 4,
            retry_base: Duration::from_millis(500),
            hold: Duration::ZERO,
        };
        let config = spec.pull_config();
        assert_eq!(config.max_deliver, -1);
        assert_eq!(config.ack_wait, Duration::from_secs(6));
        assert_eq!(spec.progress_every(), Duration::from_secs(2));
    }
}
