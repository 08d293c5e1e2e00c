//! Logs and traces. JSON logs to stdout; spans carry W3C trace context, which travels in
//! NATS headers and gRPC metadata so one trace follows a complaint through all services;
//! spans are exported over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{FilterExt, LevelFilter, filter_fn};
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

/// Installs the global subscriber for a service binary. Without an OTLP endpoint, spans
/// still get trace ids so context keeps flowing to the next service.
pub fn init(service: &'static str, args: &TelemetryArgs) -> Result<TelemetryGuard, TelemetryError> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let provider = tracer_provider(service, args)?;
    let exporting = otlp_endpoint(args).is_some();
    // Spans at info and above feed trace context even when logs are filtered out, so
    // `traceparent` keeps flowing whatever the log level. With no exporter that context is
    // all they are for, so the attributes, timings, context activation and log events a
    // span would carry are left out: `perf` put this layer's own code at 2% of all CPU
    // samples in `bench-loop`, before the allocations it made.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(service))
        .with_location(exporting)
        .with_threads(exporting)
        .with_target(exporting)
        .with_tracked_inactivity(exporting)
        .with_context_activation(exporting)
        .with_filter(LevelFilter::INFO.and(filter_fn(move |meta| exporting || meta.is_span())));
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

/// Writes the current span's trace context (`traceparent`, `tracestate`) into NATS headers.
pub fn inject_into_nats(headers: &mut async_nats::HeaderMap) {
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&context, &mut NatsHeaders(headers)));
}

/// The current span's trace context as plain pairs, to store beside an outbox row.
pub fn current_trace_headers() -> HashMap<String, String> {
    let context = tracing::Span::current().context();
    let mut carrier = HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&context, &mut carrier));
    carrier
}

/// Makes `span` a child of the trace context found in NATS headers, if any.
pub fn follow_from_nats(span: &tracing::Span, headers: Option<&async_nats::HeaderMap>) {
    if let Some(headers) = headers {
        let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&NatsHeadersRef(headers)));
        let _ = span.set_parent(parent);
    }
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

/// A span for one incoming gRPC call, child of the caller's `traceparent` if sent.
pub fn grpc_request_span(request: &http::Request<()>) -> tracing::Span {
    let span = tracing::info_span!("grpc", path = %request.uri().path());
    let parent =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&HttpHeaders(request.headers())));
    let _ = span.set_parent(parent);
    span
}
