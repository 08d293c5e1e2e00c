//! The consume loop every service runs on its durable pull consumers.
//!
//! All replicas of a service bind the same durable name, so JetStream shares the work
//! among them. A semaphore permit is taken *before* the next message is pulled: that is
//! the backpressure. Outcomes: success → ack; [`HandleError::Retry`] → nak with a delay
//! that doubles per delivery; [`HandleError::Reject`], or a retry on the last allowed
//! delivery → park in the dead-letter stream with the reason, then terminate. On
//! cancellation the loop stops pulling and waits for in-flight messages to finish.
//!
//! A consumer with a `hold` reads its stream that far behind: the loop hands on no message
//! before it has been in the stream that long. Messages arrive in order, so waiting for
//! the one in hand is waiting for the next, and the few held at a time (a batch) are
//! all that sit unacknowledged.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::pull};
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::config::NatsArgs;
use crate::metrics::Outcome;

/// How a handler failed.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// Might work later (database away, gateway down): redeliver with backoff.
    #[error("transient failure: {0:#}")]
    Retry(#[source] anyhow::Error),
    /// Cannot proceed yet, and the handler knows when it can (a cool-down, a timer).
    #[error("retry after {0:?}: {1:#}")]
    RetryAfter(Duration, #[source] anyhow::Error),
    /// Can never work (undecodable, invalid): dead-letter it now.
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

/// Handles one event. Must be idempotent: any event may arrive more than once.
pub trait MessageHandler: Send + Sync + 'static {
    fn handle(&self, message: &jetstream::Message) -> impl Future<Output = Result<(), HandleError>> + Send;
}

/// Which events a consumer reads and how it treats them.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    pub stream: &'static str,
    /// Durable name shared by all replicas of the service.
    pub durable: String,
    pub filter_subjects: Vec<String>,
    pub max_deliver: i64,
    pub ack_wait: Duration,
    /// Messages handled at once by this replica.
    pub concurrency: usize,
    pub retry_base: Duration,
    /// How long a message stays in the stream before this consumer handles it (zero: at
    /// once). `ack_wait` must cover it, as held messages are delivered but not yet acked.
    pub hold: Duration,
}

impl ConsumerSpec {
    pub fn new(stream: &'static str, durable: &str, filter_subjects: Vec<String>, args: &NatsArgs) -> Self {
        Self {
            stream,
            durable: durable.to_owned(),
            filter_subjects,
            max_deliver: args.max_deliver.max(1),
            ack_wait: args.ack_wait(),
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
            // One more than we use ourselves: the loop dead-letters on the last delivery, so
            // JetStream's own limit is only a backstop.
            max_deliver: self.max_deliver + 1,
            // Across all replicas; enough for each to keep its semaphore busy.
            max_ack_pending: (self.concurrency as i64 * 16).max(256),
            ..Default::default()
        }
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

/// Runs until `cancel` fires, then drains in-flight messages. Rebuilds the consumer with
/// backoff when NATS or the stream is unavailable.
pub async fn run<H: MessageHandler>(
    bus: Bus,
    spec: ConsumerSpec,
    handler: Arc<H>,
    cancel: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(spec.concurrency));
    let series = crate::metrics::ConsumerSeries::of(&spec.durable);
    // Shared with every in-flight event's task rather than copied into each.
    let spec = Arc::new(spec);
    let mut in_flight = JoinSet::new();
    let mut backoff = Duration::from_millis(100);
    'rebuild: while !cancel.is_cancelled() {
        let mut messages = match open(&bus, &spec).await {
            Ok(messages) => {
                backoff = Duration::from_millis(100);
                messages
            }
            Err(error) => {
                tracing::warn!(consumer = %spec.durable, %error, "cannot open consumer; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = cancel.cancelled() => break 'rebuild,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        loop {
            let permit = tokio::select! {
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break 'rebuild,
                },
                _ = cancel.cancelled() => break 'rebuild,
            };
            let next = tokio::select! {
                next = messages.next() => next,
                _ = cancel.cancelled() => break 'rebuild,
            };
            match next {
                Some(Ok(message)) => {
                    if !spec.hold.is_zero() {
                        let published = message
                            .info()
                            .map(|info| std::time::SystemTime::from(info.published));
                        if let Ok(published) = published {
                            let wait = hold_left(published, std::time::SystemTime::now(), spec.hold);
                            tokio::select! {
                                _ = tokio::time::sleep(wait) => {}
                                // Unacked, the message comes back after ack_wait.
                                _ = cancel.cancelled() => break 'rebuild,
                            }
                        }
                    }
                    let handler = handler.clone();
                    let bus = bus.clone();
                    let spec = spec.clone();
                    let series = series.clone();
                    in_flight.spawn(async move {
                        process(&bus, &spec, &series, handler.as_ref(), message).await;
                        drop(permit);
                    });
                }
                Some(Err(error)) => {
                    tracing::warn!(consumer = %spec.durable, %error, "pull failed; reopening");
                    continue 'rebuild;
                }
                None => continue 'rebuild,
            }
            while in_flight.try_join_next().is_some() {}
        }
    }
    while in_flight.join_next().await.is_some() {}
    tracing::info!(consumer = %spec.durable, "consumer stopped");
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

async fn open(bus: &Bus, spec: &ConsumerSpec) -> anyhow::Result<pull::Stream> {
    let consumer: jetstream::consumer::Consumer<pull::Config> = bus
        .jetstream()
        .create_consumer_on_stream(spec.pull_config(), spec.stream)
        .await?;
    // Pull no more than we can work on, so unstarted messages are not held from other replicas;
    // but at least two, as a pull stream of batches of one stalled until its request expired
    // (30 s) in bench-dispatch at concurrency 1.
    let messages = consumer
        .stream()
        .max_messages_per_batch(spec.concurrency.max(2))
        .messages()
        .await?;
    Ok(messages)
}

async fn process<H: MessageHandler>(
    bus: &Bus,
    spec: &ConsumerSpec,
    series: &crate::metrics::ConsumerSeries,
    handler: &H,
    message: jetstream::Message,
) {
    let span = tracing::info_span!("consume", consumer = %spec.durable, subject = %message.subject);
    crate::telemetry::follow_from_nats(span, message.headers.as_ref(), async {
        let (delivered, pending) = message
            .info()
            .map(|info| (info.delivered, info.pending))
            .unwrap_or((1, 0));
        series.pending.set(i64::try_from(pending).unwrap_or(i64::MAX));
        let started = std::time::Instant::now();
        let outcome = handler.handle(&message).await;
        let later = matches!(outcome, Err(HandleError::RetryAfter(..)));
        series.handle_seconds.observe(started.elapsed().as_secs_f64());
        let ack = match outcome {
            Ok(()) => AckKind::Ack,
            Err(HandleError::Retry(error)) if delivered < spec.max_deliver => {
                let delay = with_jitter(retry_delay(spec.retry_base, delivered));
                tracing::warn!(
                    error = format!("{error:#}"),
                    delivered,
                    ?delay,
                    "handler failed; will retry"
                );
                AckKind::Nak(Some(delay))
            }
            Err(HandleError::RetryAfter(delay, reason)) if delivered < spec.max_deliver => {
                tracing::debug!(
                    reason = format!("{reason:#}"),
                    delivered,
                    ?delay,
                    "not yet; redelivery scheduled"
                );
                AckKind::Nak(Some(delay))
            }
            Err(error) => {
                let reason = match &error {
                    HandleError::Retry(e) | HandleError::RetryAfter(_, e) => {
                        format!("gave up after {delivered} deliveries: {e:#}")
                    }
                    HandleError::Reject(reason) => reason.clone(),
                };
                tracing::error!(%reason, delivered, "parking event in the dead-letter stream");
                match bus.dead_letter(&message, &spec.durable, &reason).await {
                    Ok(_) => AckKind::Term,
                    Err(publish_error) => {
                        tracing::error!(%publish_error, "dead-letter publish failed; will redeliver");
                        AckKind::Nak(Some(spec.retry_base))
                    }
                }
            }
        };
        let counted = match ack {
            AckKind::Ack => Outcome::Ack,
            AckKind::Term => Outcome::DeadLetter,
            _ if later => Outcome::Later,
            _ => Outcome::Retry,
        };
        series.outcome(counted).inc();
        if let Err(error) = message.ack_with(ack).await {
            // The event will be redelivered after ack_wait; handlers are idempotent.
            tracing::warn!(%error, "acknowledgement failed");
        }
    })
    .await
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
}
