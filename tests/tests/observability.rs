//! What an operator watches, checked against the services as they run: one complaint's trace
//! reaches an OTLP receiver from all four services, and every series the dashboard and the
//! alert rules (`deploy/observability/`) read is exported by some service. The services run
//! as processes of their own binaries (each with its own `service.name`), against a real
//! nats-server and PostgreSQL. The compose test runs the same dashboard and rules on
//! Prometheus itself (scripts/compose-test.sh).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use closedloop_e2e::processes::{ServiceProcesses, bin_dir};
use closedloop_e2e::servers::{NatsServer, Postgres};
use closedloop_e2e::system::{CONSUMERS, Service, SystemOptions, authed, wait_for_consumers};
use closedloop_e2e::webhook::WebhookReceiver;
use closedloop_e2e::{gateway, wait_for, wait_until};
use closedloop_proto::v1::SubmitComplaintRequest;
use closedloop_proto::v1::ingest_service_client::IngestServiceClient;
use closedloop_runtime::auth::hash_token;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use tokio_util::sync::CancellationToken;

const TENANT: &str = "acme";
const GATEWAY_TOKEN: &str = "observed-gateway-token";
const GATEWAY_SECRET: &str = "observed-gateway-secret";
const WAIT: Duration = Duration::from_secs(60);

/// Spans received: (trace id in hex, the exporting service's `service.name`, span name).
#[derive(Clone, Default)]
struct Spans(Arc<Mutex<Vec<(String, String, String)>>>);

impl Spans {
    fn of_trace(&self, trace: &str) -> Vec<(String, String)> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(id, _, _)| id == trace)
            .map(|(_, service, name)| (service.clone(), name.clone()))
            .collect()
    }
}

#[tonic::async_trait]
impl TraceService for Spans {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|resource| &resource.attributes)
                .find(|attribute| attribute.key == "service.name")
                .and_then(|attribute| match attribute.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(name) => Some(name.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for span in resource_spans
                .scope_spans
                .into_iter()
                .flat_map(|scope| scope.spans)
            {
                received.push((hex::encode(&span.trace_id), service.clone(), span.name));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// The metric names (`closedloop_…`) an expression text reads.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("closedloop_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

fn observability_file(path: &str) -> anyhow::Result<String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/observability");
    Ok(std::fs::read_to_string(root.join(path))?)
}

/// Every PromQL expression of the dashboard's panels.
fn dashboard_expressions() -> anyhow::Result<Vec<String>> {
    let dashboard: serde_json::Value =
        serde_json::from_str(&observability_file("grafana/dashboards/closedloop.json")?)?;
    let panels = dashboard["panels"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("the dashboard has no panels"))?;
    Ok(panels
        .iter()
        .flat_map(|panel| panel["targets"].as_array().into_iter().flatten())
        .filter_map(|target| target["expr"].as_str().map(str::to_owned))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_spans_all_four_services_and_the_dashboard_reads_exported_series() -> anyhow::Result<()> {
    let spans = Spans::default();
    let otlp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let otlp_addr = otlp.local_addr()?;
    let stop = CancellationToken::new();
    let receiver = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(spans.clone()))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(otlp),
                stop.clone().cancelled_owned(),
            ),
    );

    let nats = NatsServer::start()?;
    let postgres = Postgres::shared()?;
    let database_url = postgres.create_database().await?;
    let webhook = WebhookReceiver::start("127.0.0.1:0".parse()?, GATEWAY_SECRET, false, stop.clone()).await?;
    let mut options = SystemOptions::processes(
        nats.service_url(),
        database_url,
        format!("{TENANT}:gateway:{}:observed-gateway", hash_token(GATEWAY_TOKEN)),
        format!(
            "default={}|{GATEWAY_SECRET};staff={}|{GATEWAY_SECRET}",
            webhook.url(),
            webhook.url()
        ),
    )?;
    options
        .extra_args
        .extend(["--otlp-endpoint".into(), format!("http://{otlp_addr}")]);
    let logs = tempfile::Builder::new()
        .prefix("closedloop-observed-")
        .tempdir()?;
    let mut services = ServiceProcesses::spawn(&bin_dir()?, &options, logs.path())?;
    if let Err(error) = wait_for_consumers(&nats.url(), &CONSUMERS).await {
        return Err(error.context(services.exited_report()));
    }
    let ingest = std::net::SocketAddr::new(options.host, options.ports[0]);
    let client = wait_for("ingest to accept connections", WAIT, || async move {
        IngestServiceClient::connect(format!("http://{ingest}"))
            .await
            .ok()
    })
    .await?;

    // A gateway's trace, so the test knows which trace to look for.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut request = authed(
        GATEWAY_TOKEN,
        SubmitComplaintRequest {
            complaint: Some(gateway::complaint("observed", 0)),
        },
    );
    request
        .metadata_mut()
        .insert("traceparent", format!("00-{trace}-00f067aa0ba902b7-01").parse()?);
    let complaint_id = client
        .clone()
        .submit_complaint(request)
        .await?
        .into_inner()
        .complaint_id;
    wait_until("the first reply", WAIT, || {
        let webhook = &webhook;
        let complaint_id = &complaint_id;
        async move { !webhook.about(complaint_id, "acknowledgement").is_empty() }
    })
    .await?;

    // Each service exports its spans in batches (every 5 s by default).
    let wanted: HashSet<&str> = Service::ALL.iter().map(|service| service.name()).collect();
    let exporting = |spans: &[(String, String)]| -> HashSet<String> {
        spans.iter().map(|(service, _)| service.clone()).collect()
    };
    let seen = wait_until("spans of the trace from all four services", WAIT, || {
        let spans = spans.clone();
        let wanted = wanted.clone();
        async move {
            let services = exporting(&spans.of_trace(trace));
            wanted.iter().all(|service| services.contains(*service))
        }
    })
    .await;
    let trace_spans = spans.of_trace(trace);
    seen.map_err(|error| error.context(format!("spans of the trace: {trace_spans:?}")))?;

    // Every series the dashboard and the rules read is exported by some service once a
    // complaint went round (dispatch counts open work orders every 15 s).
    let expressions = dashboard_expressions()?;
    anyhow::ensure!(
        expressions.len() >= 15,
        "the dashboard's queries: {expressions:?}"
    );
    let mut wanted_series = metric_names(&expressions.join("\n"));
    wanted_series.extend(metric_names(&observability_file("rules.yml")?));
    let scraped = wait_for("every series the dashboard reads", WAIT, || {
        let wanted_series = wanted_series.clone();
        let metrics_ports = options.metrics_ports;
        async move {
            let mut text = String::new();
            for port in metrics_ports {
                text.push_str(
                    &reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
                        .await
                        .ok()?
                        .text()
                        .await
                        .ok()?,
                );
            }
            let exported: HashMap<String, ()> = text
                .lines()
                .filter(|line| !line.starts_with('#'))
                .filter_map(|line| line.split(['{', ' ']).next())
                .map(|name| (name.to_owned(), ()))
                .collect();
            wanted_series
                .iter()
                .all(|name| exported.contains_key(name))
                .then_some(text)
        }
    })
    .await;
    if let Err(error) = scraped {
        return Err(error.context(format!("the dashboard and rules read {wanted_series:?}")));
    }

    services.stop()?;
    stop.cancel();
    receiver.await??;
    Ok(())
}

#[test]
fn metric_names_are_found_in_expressions() {
    let names = metric_names(
        r#"sum by (le) (rate(closedloop_first_response_seconds_bucket[5m])) / closedloop:ratio + closedloop_x_total{a="b"}"#,
    );
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    assert_eq!(
        names,
        ["closedloop_first_response_seconds_bucket", "closedloop_x_total"]
    );
}

#[test]
fn the_dashboard_is_well_formed_and_reads_the_provisioned_data_source() -> anyhow::Result<()> {
    let dashboard: serde_json::Value =
        serde_json::from_str(&observability_file("grafana/dashboards/closedloop.json")?)?;
    let provisioned = observability_file("grafana/provisioning/datasources/prometheus.yml")?;
    let source_uid = provisioned
        .lines()
        .find_map(|line| line.trim().strip_prefix("uid:"))
        .map(str::trim)
        .ok_or_else(|| anyhow::anyhow!("the provisioned data source has no uid"))?;
    assert_eq!(dashboard["uid"], "closedloop");
    assert!(dashboard["title"].as_str().is_some_and(|t| !t.is_empty()));
    let panels = dashboard["panels"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("no panels"))?;
    let mut ids = HashSet::new();
    let mut cells = HashSet::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or_default();
        assert!(!title.is_empty(), "a panel without a title: {panel}");
        assert!(ids.insert(panel["id"].as_u64()), "panel ids are unique: {title}");
        assert_eq!(panel["datasource"]["uid"], source_uid, "{title}");
        let grid = &panel["gridPos"];
        let (x, y, w, h) = (
            grid["x"].as_u64(),
            grid["y"].as_u64(),
            grid["w"].as_u64(),
            grid["h"].as_u64(),
        );
        let (Some(x), Some(y), Some(w), Some(h)) = (x, y, w, h) else {
            anyhow::bail!("{title}: gridPos needs x, y, w and h");
        };
        assert!(x + w <= 24 && w > 0 && h > 0, "{title} fits Grafana's 24 columns");
        for column in x..x + w {
            for row in y..y + h {
                assert!(cells.insert((column, row)), "{title} overlaps another panel");
            }
        }
        let targets = panel["targets"]
            .as_array()
            .ok_or_else(|| anyhow::anyhow!("{title}: no targets"))?;
        assert!(!targets.is_empty(), "{title} queries something");
        let mut refs = HashSet::new();
        for target in targets {
            assert!(
                target["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
                "{title}: {target}"
            );
            assert!(
                refs.insert(target["refId"].as_str()),
                "{title}: refIds are unique"
            );
            assert_eq!(target["datasource"]["uid"], source_uid, "{title}");
        }
    }
    Ok(())
}
