//! Prometheus metrics: one process-wide registry, the figures every consumer loop records
//! (outcomes, handling time, backlog), a way for services to add their own, and the
//! `/metrics` endpoint each service serves on `CLOSEDLOOP_METRICS_LISTEN`.

use std::net::SocketAddr;
use std::sync::{LazyLock, Mutex};

use axum::Router;
use axum::http::header;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

static REGISTRY: LazyLock<Mutex<Registry>> =
    LazyLock::new(|| Mutex::new(Registry::with_prefix("closedloop")));

/// Adds a metric to the registry (names get the `closedloop_` prefix).
pub fn register<M: Metric + Clone>(name: &str, help: &str, metric: M) -> M {
    REGISTRY
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .register(name, help, metric.clone());
    metric
}

/// The registry in Prometheus text format.
pub fn render() -> String {
    let mut text = String::new();
    let registry = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &registry) {
        tracing::warn!(%error, "metrics encoding failed");
    }
    text
}

/// Histogram buckets for seconds, from 5 ms to about 80 s.
pub fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

/// Histogram buckets for how many items a batch held, from 1 to 512.
pub fn batch_size_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 10))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerLabels {
    pub consumer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub consumer: String,
    /// `ack`, `retry` (handed back for redelivery), `later` (kept and run again after a
    /// wait), `held` (kept while a dependency was down) or `dead_letter`.
    pub outcome: &'static str,
}

/// What every consume loop records.
pub struct ConsumerMetrics {
    pub events: Family<OutcomeLabels, Counter>,
    pub handle_seconds: Family<ConsumerLabels, Histogram, fn() -> Histogram>,
    /// Messages in the stream not yet delivered to the consumer: its lag.
    pub pending: Family<ConsumerLabels, Gauge>,
}

pub static CONSUMERS: LazyLock<ConsumerMetrics> = LazyLock::new(|| {
    let metrics = ConsumerMetrics {
        events: Family::default(),
        handle_seconds: Family::new_with_constructor(seconds_histogram),
        pending: Family::default(),
    };
    register(
        "consumer_events",
        "Events handled, by consumer and outcome",
        metrics.events.clone(),
    );
    register(
        "consumer_handle_seconds",
        "Time to handle one event",
        metrics.handle_seconds.clone(),
    );
    register(
        "consumer_pending",
        "Events in the stream not yet delivered to the consumer",
        metrics.pending.clone(),
    );
    metrics
});

/// One consumer's series in [`CONSUMERS`], looked up once when its loop starts rather than
/// (with a label string built) for every event.
#[derive(Clone)]
pub struct ConsumerSeries {
    pub pending: Gauge,
    pub handle_seconds: Histogram,
    ack: Counter,
    retry: Counter,
    later: Counter,
    held: Counter,
    dead_letter: Counter,
}

impl ConsumerSeries {
    pub fn of(consumer: &str) -> Self {
        let metrics = &*CONSUMERS;
        let labels = ConsumerLabels {
            consumer: consumer.to_owned(),
        };
        let outcome = |outcome: &'static str| {
            metrics
                .events
                .get_or_create(&OutcomeLabels {
                    consumer: consumer.to_owned(),
                    outcome,
                })
                .clone()
        };
        Self {
            pending: metrics.pending.get_or_create(&labels).clone(),
            handle_seconds: metrics.handle_seconds.get_or_create(&labels).clone(),
            ack: outcome("ack"),
            retry: outcome("retry"),
            later: outcome("later"),
            held: outcome("held"),
            dead_letter: outcome("dead_letter"),
        }
    }

    /// The counter of `outcome`.
    pub fn outcome(&self, outcome: Outcome) -> &Counter {
        match outcome {
            Outcome::Ack => &self.ack,
            Outcome::Retry => &self.retry,
            Outcome::Later => &self.later,
            Outcome::Held => &self.held,
            Outcome::DeadLetter => &self.dead_letter,
        }
    }
}

/// How a consumer finished with an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ack,
    Retry,
    Later,
    Held,
    DeadLetter,
}

/// A bound `/metrics` listener, served once the service runs.
pub struct Exporter {
    listener: TcpListener,
}

impl Exporter {
    pub async fn bind(addr: SocketAddr) -> Result<Self, crate::grpc::GrpcError> {
        Ok(Self {
            listener: crate::grpc::bind(addr).await?,
        })
    }

    pub fn addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves `/metrics` until `cancel` fires.
    pub fn spawn(self, cancel: CancellationToken) -> JoinHandle<std::io::Result<()>> {
        let app = Router::new().route(
            "/metrics",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
                    render(),
                )
            }),
        );
        tokio::spawn(async move {
            axum::serve(crate::grpc::http_listener(self.listener), app)
                .with_graceful_shutdown(cancel.cancelled_owned())
                .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_metrics_render_with_the_prefix() {
        let labels = OutcomeLabels {
            consumer: "unit-test".into(),
            outcome: "ack",
        };
        CONSUMERS.events.get_or_create(&labels).inc();
        let text = render();
        assert!(
            text.contains(r#"closedloop_consumer_events_total{consumer="unit-test",outcome="ack"} 1"#),
            "{text}"
        );
    }
}
