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

static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(|| {
    let mut registry = Registry::with_prefix("closedloop");
    registry.register_collector(Box::new(ProcessCollector));
    Mutex::new(registry)
});

/// The process's CPU time and resident memory, read from `/proc` on each scrape, so each
/// service's cost shows beside its work (the dashboard's CPU and memory panels).
#[derive(Debug)]
struct ProcessCollector;

/// Linux reports CPU times in `/proc` in ticks of `USER_HZ`, which is 100 on every
/// architecture Linux runs on (it is part of the user-space ABI, unlike `HZ`).
const USER_HZ: f64 = 100.0;

/// User plus system CPU seconds, from the text of `/proc/self/stat`.
fn cpu_seconds(stat: &str) -> Option<f64> {
    // The command name (field 2) is in parentheses and may hold spaces: count from after it.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15; `after_name` starts at field 3.
    let user: f64 = fields.get(11)?.parse().ok()?;
    let system: f64 = fields.get(12)?.parse().ok()?;
    Some((user + system) / USER_HZ)
}

/// Resident memory in bytes, from the text of `/proc/self/status`.
fn resident_bytes(status: &str) -> Option<i64> {
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

impl prometheus_client::collector::Collector for ProcessCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric as _;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        if let Some(cpu) = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .as_deref()
            .and_then(cpu_seconds)
        {
            let counter = ConstCounter::new(cpu);
            let metric = encoder.encode_descriptor(
                "process_cpu_seconds",
                "CPU time the process used, user and system",
                None,
                counter.metric_type(),
            )?;
            counter.encode(metric)?;
        }
        if let Some(rss) = std::fs::read_to_string("/proc/self/status")
            .ok()
            .as_deref()
            .and_then(resident_bytes)
        {
            let gauge = ConstGauge::new(rss);
            let metric = encoder.encode_descriptor(
                "process_resident_memory_bytes",
                "Resident memory of the process",
                None,
                gauge.metric_type(),
            )?;
            gauge.encode(metric)?;
        }
        Ok(())
    }
}

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

/// Histogram buckets for a response time promised to customers, with a bound at the 20 s
/// promise so the share answered within it is exact.
pub fn response_seconds_histogram() -> Histogram {
    Histogram::new([
        0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0,
    ])
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
    fn process_figures_are_read_from_proc_text() {
        let stat = "4242 (closed loop) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 75 0 0 20 0 3 0 1 2 3";
        assert_eq!(cpu_seconds(stat), Some(3.25), "utime 250 + stime 75 ticks");
        assert_eq!(cpu_seconds("garbage"), None);
        let status = "Name:\tclosedloop\nVmPeak:\t  9000 kB\nVmRSS:\t   19040 kB\nThreads:\t3\n";
        assert_eq!(resident_bytes(status), Some(19040 * 1024));
        assert_eq!(resident_bytes("Name: x\n"), None);
    }

    #[test]
    fn this_process_reports_its_cpu_and_memory() {
        let text = render();
        for series in [
            "closedloop_process_cpu_seconds_total ",
            "closedloop_process_resident_memory_bytes ",
        ] {
            assert!(text.contains(series), "{series} in {text}");
        }
    }

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
