//! Logs and traces. JSON logs to stdout; W3C trace context travels in NATS headers and
//! gRPC metadata so one trace follows a complaint through all services. With
//! `OTEL_EXPORTER_OTLP_ENDPOINT` set, spans are recorded and exported over OTLP, and each
//! service's span is the parent of what it sends on. Without it nothing would read the
//! spans, so none are recorded: each gRPC call and consumed event runs with the context it
//! arrived with (a new trace if none) and passes it on unchanged, as W3C Trace Context
//! asks of a participant that records nothing. Recording spans only to pass their ids on
//! cost 5–8% of the services' CPU in bench-loop (BENCHMARKS.md, ninth session).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context as TaskContext, Poll};

use opentelemetry::Context;
use opentelemetry::context::{FutureExt as _, WithContext};
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{SpanContext, TraceContextExt as _, TraceFlags, TraceState, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{IdGenerator as _, RandomIdGenerator, SdkTracerProvider};
use tracing::Instrument as _;
use tracing::instrument::Instrumented;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, TelemetryArgs};

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log filter: {0}")]
    Filter(#[from] tracing_subscriber::filter::ParseError),
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("a global subscriber is already installed: {0}")]
    AlreadyInstalled(#[from] tracing_subscriber::util::TryInitError),
}

/// Flushes buffered spans when dropped at the end of `main`.
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Err(error) = self.provider.shutdown() {
            eprintln!("flushing traces failed: {error}");
        }
    }
}

/// The OTLP endpoint, if one is set; an empty value (as compose files often pass) means
/// "not set".
fn otlp_endpoint(args: &TelemetryArgs) -> Option<&str> {
    args.otlp_endpoint.as_deref().filter(|e| !e.trim().is_empty())
}

fn tracer_provider(service: &'static str, args: &TelemetryArgs) -> Result<SdkTracerProvider, TelemetryError> {
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service)
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    if let Some(endpoint) = otlp_endpoint(args) {
        use opentelemetry_otlp::WithExportConfig;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()?;
        builder = builder.with_batch_exporter(exporter);
    }
    Ok(builder.build())
}

/// Whether spans are recorded (an OTLP endpoint is set); see the module notes.
static RECORDING: AtomicBool = AtomicBool::new(false);

fn recording() -> bool {
    RECORDING.load(Ordering::Relaxed)
}

/// Installs the global subscriber for a service binary.
pub fn init(service: &'static str, args: &TelemetryArgs) -> Result<TelemetryGuard, TelemetryError> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let provider = tracer_provider(service, args)?;
    let exporting = otlp_endpoint(args).is_some();
    RECORDING.store(exporting, Ordering::Relaxed);
    // Spans at info and above are recorded whatever the log level, so that traces are whole.
    let otel = exporting.then(|| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(service))
            .with_filter(LevelFilter::INFO)
    });
    let filter = EnvFilter::try_new(&args.log_filter)?;
    let fmt = match args.log_format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer().compact().boxed(),
    };
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init()?;
    Ok(TelemetryGuard { provider })
}

struct NatsHeaders<'a>(&'a mut async_nats::HeaderMap);

impl Injector for NatsHeaders<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value);
    }
}

struct NatsHeadersRef<'a>(&'a async_nats::HeaderMap);

impl Extractor for NatsHeadersRef<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }
    fn keys(&self) -> Vec<&str> {
        // The trace-context propagator asks for known keys only.
        Vec::new()
    }
}

/// The trace context to send on: the current span's when spans are recorded, else the one
/// the current call or event runs in (empty outside them).
fn context_to_send(recording: bool) -> Context {
    if recording {
        tracing::Span::current().context()
    } else {
        Context::current()
    }
}

/// Writes the current trace context (`traceparent`, `tracestate`) into NATS headers.
pub fn inject_into_nats(headers: &mut async_nats::HeaderMap) {
    let context = context_to_send(recording());
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&context, &mut NatsHeaders(headers)));
}

/// The current trace context as plain pairs, to store beside an event kept for the relay.
pub fn current_trace_headers() -> HashMap<String, String> {
    let context = context_to_send(recording());
    let mut carrier = HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&context, &mut carrier));
    carrier
}

/// `parent` if it names a trace, else the start of a new one, as a recorded root span would
/// begin.
fn continued_or_new(parent: Context) -> Context {
    if parent.span().span_context().is_valid() {
        return parent;
    }
    let ids = RandomIdGenerator::default();
    parent.with_remote_span_context(SpanContext::new(
        ids.new_trace_id(),
        ids.new_span_id(),
        TraceFlags::SAMPLED,
        false,
        TraceState::default(),
    ))
}

/// `work` as part of the trace `parent` names (a new one if none): under `span`, made the
/// trace's child when spans are recorded; otherwise with the context attached as it came.
fn follow<F: Future>(
    recording: bool,
    span: tracing::Span,
    parent: Context,
    work: F,
) -> WithContext<Instrumented<F>> {
    let attached = if recording {
        let _ = span.set_parent(parent);
        Context::new()
    } else {
        continued_or_new(parent)
    };
    work.instrument(span).with_context(attached)
}

fn extract_from_nats(headers: Option<&async_nats::HeaderMap>) -> Context {
    headers
        .map(|headers| {
            opentelemetry::global::get_text_map_propagator(|p| p.extract(&NatsHeadersRef(headers)))
        })
        .unwrap_or_default()
}

/// Runs `work`, the handling of a consumed event, under `span` in the trace its NATS headers
/// carry.
pub fn follow_from_nats<F: Future>(
    span: tracing::Span,
    headers: Option<&async_nats::HeaderMap>,
    work: F,
) -> WithContext<Instrumented<F>> {
    follow(recording(), span, extract_from_nats(headers), work)
}

struct HttpHeaders<'a>(&'a http::HeaderMap);

impl Extractor for HttpHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

fn extract_from_http(headers: &http::HeaderMap) -> Context {
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&HttpHeaders(headers)))
}

/// Runs each incoming gRPC call in the trace of the caller's `traceparent` (a new trace if
/// none), under a `grpc` span: what the call publishes continues that trace.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcTraceLayer;

impl<S> tower::Layer<S> for GrpcTraceLayer {
    type Service = GrpcTrace<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcTrace(inner)
    }
}

/// The service [`GrpcTraceLayer`] makes.
#[derive(Debug, Clone)]
pub struct GrpcTrace<S>(S);

impl<S, B> tower::Service<http::Request<B>> for GrpcTrace<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = WithContext<Instrumented<S::Future>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let span = tracing::info_span!("grpc", path = %request.uri().path());
        let parent = extract_from_http(request.headers());
        follow(recording(), span, parent, self.0.call(request))
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::propagation::TextMapPropagator as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT: &str = "00f067aa0ba902b7";

    fn incoming() -> async_nats::HeaderMap {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("traceparent", format!("00-{TRACE}-{PARENT}-01").as_str());
        headers
    }

    /// The `traceparent` a service handling `headers` would send on, as `[trace, span]`.
    fn sent_while_handling(recording: bool, headers: Option<&async_nats::HeaderMap>) -> Vec<String> {
        let parent = headers
            .map(|h| TraceContextPropagator::new().extract(&NatsHeadersRef(h)))
            .unwrap_or_default();
        let work = async move {
            let mut carrier = HashMap::new();
            TraceContextPropagator::new().inject_context(&context_to_send(recording), &mut carrier);
            carrier.get("traceparent").cloned().unwrap_or_default()
        };
        let handled = follow(recording, tracing::info_span!("consume"), parent, work);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        let traceparent = runtime.block_on(handled);
        traceparent
            .split('-')
            .skip(1)
            .take(2)
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn without_recording_the_context_passes_on_unchanged() {
        assert_eq!(sent_while_handling(false, Some(&incoming())), [TRACE, PARENT]);
    }

    #[test]
    fn without_recording_an_event_without_context_starts_a_trace() {
        let first = sent_while_handling(false, None);
        let second = sent_while_handling(false, Some(&async_nats::HeaderMap::new()));
        assert_eq!(first[0].len(), 32, "{first:?}");
        assert_eq!(first[1].len(), 16, "{first:?}");
        assert_ne!(first[0], "0".repeat(32));
        assert_ne!(first[0], second[0], "each starts its own trace");
    }

    #[test]
    fn recorded_spans_are_children_in_the_same_trace() {
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let sent =
            tracing::subscriber::with_default(subscriber, || sent_while_handling(true, Some(&incoming())));
        assert_eq!(sent[0], TRACE);
        assert_eq!(sent[1].len(), 16, "{sent:?}");
        assert_ne!(sent[1], PARENT, "the span sent on is this service's own");
    }
}
