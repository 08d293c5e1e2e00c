//! `compose-check`: drives a running `docker compose` deployment of Closedloop from outside,
//! through its published ports, as scripts/compose-test.sh runs it:
//!
//! 1. waits until every container with a healthcheck is healthy (with `--connectors`, the
//!    connectors profile's `connect` too);
//! 2. walks the closed loop once: a complaint submitted over gRPC, its acknowledgement at the
//!    demo gateway, its work order, resolved by an agent, and the closure message;
//! 3. submits a stream of complaints while each service container, then NATS, then
//!    PostgreSQL is killed with SIGKILL (its main process, as a crash would), leaving the
//!    restart policy to bring it back;
//! 4. counts as the fault tests do: every complaint accepted, one work order each, exactly
//!    one first reply each (one Idempotency-Key) within 20 s of its first submission, nothing
//!    dead-lettered, every container running;
//! 5. checks that the stack's NATS refuses a client without credentials;
//! 6. with `--prometheus` (the observability profile's Prometheus): every service's
//!    replicas (two each with `--cluster`) are scraped and up, the rules pass
//!    `promtool check rules`, every rule evaluates without error, and every recorded series
//!    and every dashboard query returns data after the load.
//!
//! With `--cluster` (docker-compose.cluster.yml: three NATS nodes, streams at R3, two
//! replicas of each service) the faults in step 3 are: the first replica of each service
//! killed, then one NATS node killed, then, once it has caught up and every complaint so far
//! is answered, another cut off from the network for 30 s; the counts of step 4 are the
//! same.
//!
//! With `--throughput N` it only measures: N complaints submitted as fast as ingest takes
//! them, and the time until every one has its first reply and its work order.

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use closedloop_e2e::gateway;
use closedloop_e2e::system::authed;
use closedloop_e2e::{wait_for, wait_until};
use closedloop_proto::v1::ingest_service_client::IngestServiceClient;
use closedloop_proto::v1::work_order_service_client::WorkOrderServiceClient;
use closedloop_proto::v1::{
    GetComplaintStatusRequest, ResolveWorkOrderRequest, SubmissionOutcome, SubmitComplaintsRequest,
};
use tonic::transport::Channel as GrpcChannel;

#[derive(Debug, Parser)]
struct Args {
    /// The compose command, e.g. `docker compose` or `docker-compose`.
    #[arg(long, default_value = "docker compose")]
    compose: String,
    #[arg(long, default_value = "127.0.0.1:50051")]
    ingest: std::net::SocketAddr,
    #[arg(long, default_value = "127.0.0.1:50053")]
    dispatch: std::net::SocketAddr,
    /// The demo gateway's HTTP address.
    #[arg(long, default_value = "127.0.0.1:8088")]
    gateway: std::net::SocketAddr,
    #[arg(long, default_value = "dev-gateway-token")]
    gateway_token: String,
    #[arg(long, default_value = "dev-agent-token")]
    agent_token: String,
    /// The NATS admin user's password, for closedloop-admin inside a container.
    #[arg(long, default_value = "dev-admin-nats-password")]
    nats_admin_password: String,
    /// Complaints in the stream.
    #[arg(long, default_value_t = 1_000)]
    complaints: usize,
    #[arg(long, default_value_t = 40.0)]
    per_second: f64,
    /// Seconds between faults.
    #[arg(long, default_value_t = 3)]
    kill_every: u64,
    /// The deployment is docker-compose.cluster.yml's: break it as a cluster.
    #[arg(long)]
    cluster: bool,
    /// The connectors profile's `connect` runs too: wait for it to be healthy as well.
    #[arg(long)]
    connectors: bool,
    /// Only measure throughput with this many complaints.
    #[arg(long)]
    throughput: Option<usize>,
    /// What the throughput line calls this deployment.
    #[arg(long, default_value = "")]
    label: String,
    /// The observability profile's Prometheus, to check after the load.
    #[arg(long)]
    prometheus: Option<std::net::SocketAddr>,
    /// Where the dashboard and rules are (`deploy/observability`).
    #[arg(long, default_value = "deploy/observability")]
    observability: std::path::PathBuf,
}

/// The services Prometheus must scrape.
const SCRAPED: [&str; 4] = ["ingest", "classify", "dispatch", "notify"];
/// How long Prometheus may take to see every target up and every query answered, after
/// the restarts of the load phase.
const PROMETHEUS_WAIT: Duration = Duration::from_secs(180);

/// A Prometheus HTTP API call's `data`.
async fn prometheus_api(
    http: &reqwest::Client,
    prometheus: std::net::SocketAddr,
    path: &str,
    query: &[(&str, &str)],
) -> anyhow::Result<serde_json::Value> {
    let mut body: serde_json::Value = http
        .get(format!("http://{prometheus}/api/v1/{path}"))
        .query(query)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    anyhow::ensure!(body["status"] == "success", "{path}: {body}");
    Ok(body["data"].take())
}

/// What is not yet as it should be in Prometheus; empty when every target is up and every
/// rule and query answers.
async fn prometheus_shortfalls(
    http: &reqwest::Client,
    prometheus: std::net::SocketAddr,
    dashboard_queries: &[String],
    replicas: usize,
) -> anyhow::Result<Vec<String>> {
    let mut shortfalls = Vec::new();
    let targets = prometheus_api(http, prometheus, "targets", &[("state", "active")]).await?;
    let targets = targets["activeTargets"].as_array().cloned().unwrap_or_default();
    for service in SCRAPED {
        let of_service: Vec<&serde_json::Value> = targets
            .iter()
            .filter(|target| target["labels"]["service"] == service)
            .collect();
        if of_service.len() < replicas {
            shortfalls.push(format!(
                "{} targets for {service}, not {replicas}",
                of_service.len()
            ));
        }
        for target in of_service.iter().filter(|target| target["health"] != "up") {
            shortfalls.push(format!(
                "{service} target {} is {}: {}",
                target["scrapeUrl"], target["health"], target["lastError"]
            ));
        }
    }
    let mut queries: Vec<String> = dashboard_queries.to_vec();
    let rules = prometheus_api(http, prometheus, "rules", &[]).await?;
    let rules: Vec<serde_json::Value> = rules["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|group| group["rules"].as_array().cloned().unwrap_or_default())
        .collect();
    if rules.is_empty() {
        shortfalls.push("Prometheus loaded no rules".to_owned());
    }
    for rule in &rules {
        if rule["health"] != "ok" {
            shortfalls.push(format!(
                "rule {} is {}: {}",
                rule["name"], rule["health"], rule["lastError"]
            ));
        }
        if rule["type"] == "recording" {
            queries.extend(rule["name"].as_str().map(str::to_owned));
        }
    }
    for query in &queries {
        let answer = prometheus_api(http, prometheus, "query", &[("query", query)]).await?;
        if answer["result"].as_array().is_none_or(|result| result.is_empty()) {
            shortfalls.push(format!("no data for {query}"));
        }
    }
    Ok(shortfalls)
}

/// Step 6: Prometheus scrapes every service and every query of the dashboard and the rules
/// returns data.
async fn check_prometheus(
    deployment: &Deployment,
    prometheus: std::net::SocketAddr,
    observability: &std::path::Path,
) -> anyhow::Result<()> {
    let checked = deployment.compose(&[
        "exec",
        "-T",
        "prometheus",
        "promtool",
        "check",
        "rules",
        "/etc/prometheus/rules.yml",
    ])?;
    eprintln!("compose-check: promtool: {}", checked.trim());
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        observability.join("grafana/dashboards/closedloop.json"),
    )?)?;
    let queries: Vec<String> = dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|panel| panel["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|target| target["expr"].as_str().map(str::to_owned))
        .collect();
    anyhow::ensure!(!queries.is_empty(), "the dashboard has no queries");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let started = Instant::now();
    let mut last = Vec::new();
    while started.elapsed() < PROMETHEUS_WAIT {
        let replicas = if deployment.cluster { 2 } else { 1 };
        last = match prometheus_shortfalls(&http, prometheus, &queries, replicas).await {
            Ok(shortfalls) if shortfalls.is_empty() => {
                println!(
                    "compose-check: Prometheus scrapes every replica of every service; {} dashboard queries and every rule answer",
                    queries.len()
                );
                return Ok(());
            }
            Ok(shortfalls) => shortfalls,
            Err(error) => vec![error.to_string()],
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    anyhow::bail!("Prometheus after {PROMETHEUS_WAIT:?}: {}", last.join("; "))
}

const PROMISE: Duration = Duration::from_secs(20);
/// How long a submission is retried before the check gives up on it.
const SUBMIT_FOR: Duration = Duration::from_secs(90);
/// A fault the stream runs through.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// The container's main process killed with SIGKILL; its restart policy brings it back.
    Crash(&'static str),
    /// The container disconnected from the stack's network for this long, then connected
    /// again.
    Cut(&'static str, Duration),
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Crash(service) => write!(f, "{service} killed"),
            Fault::Cut(service, how_long) => write!(f, "{service} cut off for {} s", how_long.as_secs()),
        }
    }
}

/// The single-node deployment's faults, in this order.
const FAULTS: [Fault; 6] = [
    Fault::Crash("ingest"),
    Fault::Crash("classify"),
    Fault::Crash("dispatch"),
    Fault::Crash("notify"),
    Fault::Crash("nats"),
    Fault::Crash("postgres"),
];
/// The cluster's faults: one replica of each service, one NATS node killed, another cut
/// off for 30 s.
const CLUSTER_FAULTS: [Fault; 6] = [
    Fault::Crash("ingest"),
    Fault::Crash("classify"),
    Fault::Crash("dispatch"),
    Fault::Crash("notify"),
    Fault::Crash("nats-2"),
    Fault::Cut("nats-3", Duration::from_secs(30)),
];
const WITH_HEALTHCHECK: [&str; 6] = ["nats", "postgres", "ingest", "classify", "dispatch", "notify"];
const CLUSTER_HEALTHCHECKS: [&str; 6] = [
    "nats-2",
    "nats-3",
    "ingest-2",
    "classify-2",
    "dispatch-2",
    "notify-2",
];

/// Runs `docker compose …` (or `docker …`) and returns its standard output.
fn run(program: &[&str], args: &[&str]) -> anyhow::Result<String> {
    let (first, rest) = program
        .split_first()
        .ok_or_else(|| anyhow::anyhow!("no command"))?;
    let output = Command::new(first)
        .args(rest)
        .args(args)
        .output()
        .with_context(|| format!("running {program:?} {args:?}"))?;
    anyhow::ensure!(
        output.status.success(),
        "{program:?} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

struct Deployment {
    compose: Vec<String>,
    cluster: bool,
    connectors: bool,
}

impl Deployment {
    fn compose(&self, args: &[&str]) -> anyhow::Result<String> {
        let program: Vec<&str> = self.compose.iter().map(String::as_str).collect();
        run(&program, args)
    }

    fn container(&self, service: &str) -> anyhow::Result<String> {
        let id = self.compose(&["ps", "-q", service])?.trim().to_owned();
        anyhow::ensure!(!id.is_empty(), "no container for {service}");
        Ok(id)
    }

    /// `docker inspect` field of a service's container.
    fn inspect(&self, service: &str, format: &str) -> anyhow::Result<String> {
        let id = self.container(service)?;
        Ok(run(&["docker"], &["inspect", "-f", format, &id])?
            .trim()
            .to_owned())
    }

    /// Kills the container's main process with SIGKILL: a crash, which the restart policy
    /// answers (a `docker kill` would count as stopped by hand).
    fn crash(&self, service: &str) -> anyhow::Result<()> {
        let pid = self.inspect(service, "{{.State.Pid}}")?;
        run(&["kill"], &["-9", &pid])?;
        Ok(())
    }

    /// Disconnects the container from the stack's network; returns the network's name.
    fn cut(&self, service: &str) -> anyhow::Result<String> {
        let id = self.container(service)?;
        let network = self.inspect(
            service,
            "{{range $name, $_ := .NetworkSettings.Networks}}{{$name}} {{end}}",
        )?;
        let network = network
            .split_whitespace()
            .next()
            .ok_or_else(|| anyhow::anyhow!("{service} is on no network"))?
            .to_owned();
        run(&["docker"], &["network", "disconnect", &network, &id])?;
        Ok(network)
    }

    /// Connects the container again, under its service name, as compose had it.
    fn reconnect(&self, service: &str, network: &str) -> anyhow::Result<()> {
        let id = self.container(service)?;
        run(
            &["docker"],
            &["network", "connect", "--alias", service, network, &id],
        )?;
        Ok(())
    }

    /// Whether a NATS node reports every JetStream asset current (its full `/healthz`),
    /// as a node that restarted does once it has caught up with the cluster.
    fn nats_current(&self, node: &str) -> bool {
        self.compose(&[
            "exec",
            "-T",
            node,
            "wget",
            "-q",
            "-O",
            "-",
            "http://127.0.0.1:8222/healthz",
        ])
        .is_ok()
    }

    fn healthchecked(&self) -> Vec<&'static str> {
        let mut services = WITH_HEALTHCHECK.to_vec();
        if self.cluster {
            services.extend(CLUSTER_HEALTHCHECKS);
        }
        if self.connectors {
            services.push("connect");
        }
        services
    }

    fn all_healthy(&self) -> bool {
        self.healthchecked().iter().all(|service| {
            self.inspect(service, "{{.State.Health.Status}}")
                .is_ok_and(|status| status == "healthy")
        })
    }

    fn faults(&self) -> &'static [Fault] {
        if self.cluster { &CLUSTER_FAULTS } else { &FAULTS }
    }
}

/// The work orders placed per complaint (a work order of its own, or joined to one), by
/// complaint id, as PostgreSQL holds them.
fn placed(deployment: &Deployment) -> Option<HashMap<String, usize>> {
    let placed_sql = "SELECT complaint_id::text || ' ' || count(*) FROM ( \
        SELECT complaint_id FROM dispatch.work_orders \
        UNION ALL SELECT complaint_id FROM dispatch.complaint_links) placed GROUP BY complaint_id";
    let rows = deployment
        .compose(&[
            "exec",
            "-T",
            "postgres",
            "psql",
            "-U",
            "closedloop",
            "-d",
            "closedloop",
            "-Atc",
            placed_sql,
        ])
        .ok()?;
    Some(
        rows.lines()
            .filter_map(|line| {
                let (id, count) = line.split_once(' ')?;
                Some((id.to_owned(), count.parse().ok()?))
            })
            .collect(),
    )
}

/// The complaints with a first reply at the demo gateway.
async fn first_replied(http: &reqwest::Client, gateway: std::net::SocketAddr) -> Option<HashSet<String>> {
    Some(
        received(http, gateway)
            .await
            .ok()?
            .into_iter()
            .filter(|m| {
                m.answered == 200
                    && matches!(m.kind.as_str(), "acknowledgement" | "private_channel_invitation")
            })
            .map(|m| m.complaint_id)
            .collect(),
    )
}

/// Submits `count` complaints in batches from a few callers as fast as ingest takes them,
/// then waits for every first reply and work order; prints the rates.
async fn measure_throughput(
    deployment: &Deployment,
    ingest: IngestServiceClient<GrpcChannel>,
    http: &reqwest::Client,
    args: &Args,
    count: usize,
) -> anyhow::Result<()> {
    const BATCH: usize = 100;
    const CALLERS: usize = 4;
    let run = format!("throughput-{}", chrono::Utc::now().timestamp_millis());
    let started = Instant::now();
    let batches: Vec<Vec<closedloop_proto::v1::ComplaintSubmission>> = (0..count)
        .map(|n| gateway::complaint(&run, n))
        .collect::<Vec<_>>()
        .chunks(BATCH)
        .map(<[_]>::to_vec)
        .collect();
    let queue = Arc::new(Mutex::new(batches));
    let ids: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..CALLERS {
        let (queue, ids, mut client, token) = (
            queue.clone(),
            ids.clone(),
            ingest.clone(),
            args.gateway_token.clone(),
        );
        callers.spawn(async move {
            loop {
                let Some(batch) = queue.lock().ok().and_then(|mut q| q.pop()) else {
                    return anyhow::Ok(());
                };
                let results = client
                    .submit_complaints(authed(&token, SubmitComplaintsRequest { complaints: batch }))
                    .await?
                    .into_inner()
                    .results;
                for result in results {
                    anyhow::ensure!(
                        result.outcome() == SubmissionOutcome::Accepted,
                        "a throughput submission was not accepted: {}",
                        result.reason
                    );
                    if let Ok(mut ids) = ids.lock() {
                        ids.insert(result.complaint_id);
                    }
                }
            }
        });
    }
    while let Some(done) = callers.join_next().await {
        done??;
    }
    let submitted = started.elapsed();
    let ids = ids.lock().map(|ids| ids.clone()).unwrap_or_default();
    anyhow::ensure!(ids.len() == count, "{} of {count} accepted", ids.len());
    let mut replied_after = None;
    let mut placed_after = None;
    let deadline = Duration::from_secs(600);
    while replied_after.is_none() || placed_after.is_none() {
        anyhow::ensure!(
            started.elapsed() < deadline,
            "not every complaint was answered and placed within {deadline:?}"
        );
        if replied_after.is_none()
            && first_replied(http, args.gateway)
                .await
                .is_some_and(|r| ids.iter().all(|id| r.contains(id)))
        {
            replied_after = Some(started.elapsed());
        }
        if placed_after.is_none()
            && placed(deployment).is_some_and(|p| ids.iter().all(|id| p.contains_key(id)))
        {
            placed_after = Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (replied_after, placed_after) = (
        replied_after.unwrap_or_default(),
        placed_after.unwrap_or_default(),
    );
    let rate = |elapsed: Duration| count as f64 / elapsed.as_secs_f64();
    println!(
        "compose-check: throughput {}: {count} complaints submitted in {:.1} s ({:.0}/s); every first reply after {:.1} s ({:.0}/s), every work order after {:.1} s ({:.0}/s)",
        args.label,
        submitted.as_secs_f64(),
        rate(submitted),
        replied_after.as_secs_f64(),
        rate(replied_after),
        placed_after.as_secs_f64(),
        rate(placed_after),
    );
    Ok(())
}

/// What the demo gateway received, as it lists it.
#[derive(Debug, Clone, serde::Deserialize)]
struct Received {
    at_unix_ms: i64,
    answered: u16,
    idempotency_key: String,
    kind: String,
    complaint_id: String,
    signature_valid: bool,
}

async fn received(http: &reqwest::Client, gateway: std::net::SocketAddr) -> anyhow::Result<Vec<Received>> {
    Ok(http
        .get(format!("http://{gateway}/messages"))
        .send()
        .await?
        .json()
        .await?)
}

fn lazy_channel(addr: std::net::SocketAddr) -> anyhow::Result<GrpcChannel> {
    Ok(GrpcChannel::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let deployment = Deployment {
        compose: args.compose.split_whitespace().map(str::to_owned).collect(),
        cluster: args.cluster,
        connectors: args.connectors,
    };
    let http = reqwest::Client::new();
    let ingest = IngestServiceClient::new(lazy_channel(args.ingest)?);
    let work_orders = WorkOrderServiceClient::new(lazy_channel(args.dispatch)?);

    eprintln!("compose-check: waiting for every healthcheck");
    wait_until("every container healthy", Duration::from_secs(240), || async {
        deployment.all_healthy()
    })
    .await?;
    if let Some(count) = args.throughput {
        return measure_throughput(&deployment, ingest, &http, &args, count).await;
    }

    // The closed loop, once.
    eprintln!("compose-check: one complaint around the loop");
    let (id, _) = gateway::submit_until_accepted(
        ingest.clone(),
        &args.gateway_token,
        gateway::complaint("smoke", 0),
        SUBMIT_FOR,
    )
    .await?;
    let seen = |kind: &'static str| {
        let http = http.clone();
        let id = id.clone();
        async move {
            received(&http, args.gateway)
                .await
                .ok()?
                .into_iter()
                .find(|m| m.complaint_id == id && m.kind == kind && m.answered == 200)
        }
    };
    let ack = wait_for(
        "the acknowledgement at the demo gateway",
        Duration::from_secs(60),
        || seen("acknowledgement"),
    )
    .await?;
    anyhow::ensure!(
        ack.signature_valid,
        "the gateway could not verify notify's signature"
    );
    let work_order = wait_for("the work order", Duration::from_secs(60), || {
        let mut client = work_orders.clone();
        let request = authed(
            &args.agent_token,
            GetComplaintStatusRequest {
                complaint_id: id.clone(),
            },
        );
        async move {
            client
                .get_complaint_status(request)
                .await
                .ok()?
                .into_inner()
                .work_order
        }
    })
    .await?;
    work_orders
        .clone()
        .resolve_work_order(authed(
            &args.agent_token,
            ResolveWorkOrderRequest {
                work_order_id: work_order.work_order_id.clone(),
                resolution_note: "线路已修复".into(),
                ..Default::default()
            },
        ))
        .await?;
    wait_for("the closure message", Duration::from_secs(60), || seen("closure")).await?;

    // A stream, while each component crashes in turn.
    let faults = deployment.faults();
    eprintln!(
        "compose-check: {} complaints at {}/s; every {} s: {}",
        args.complaints,
        args.per_second,
        args.kill_every,
        faults
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    // A cut-off container and when it is connected again.
    let mut cut: Option<(&'static str, String, Instant)> = None;
    // A NATS node that was killed: the next fault waits until it has caught up and every
    // complaint accepted so far has its first reply, so that the faults come in turn and no
    // two nodes are out at once (three nodes survive the loss of one).
    let mut recovering: Option<&'static str> = None;
    let mut last_recovery_check = Instant::now();
    let accepted: Arc<Mutex<HashMap<String, i64>>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    let started_unix_ms = chrono::Utc::now().timestamp_millis();
    let mut next_victim = 0;
    let mut ticker = tokio::time::interval(Duration::from_millis(5));
    let mut n = 0;
    while n < args.complaints {
        ticker.tick().await;
        let elapsed = started.elapsed();
        let due_kill = Duration::from_secs(args.kill_every * (next_victim as u64 + 1));
        if let Some(node) = recovering
            && last_recovery_check.elapsed() >= Duration::from_millis(500)
        {
            last_recovery_check = Instant::now();
            let accepted_so_far: Vec<String> = accepted
                .lock()
                .map(|a| a.keys().cloned().collect())
                .unwrap_or_default();
            if deployment.nats_current(node)
                && first_replied(&http, args.gateway)
                    .await
                    .is_some_and(|answered| accepted_so_far.iter().all(|id| answered.contains(id)))
            {
                eprintln!(
                    "compose-check: {node} current again and every complaint so far answered at {:.1} s",
                    elapsed.as_secs_f64()
                );
                recovering = None;
            }
        }
        if next_victim < faults.len() && elapsed >= due_kill && recovering.is_none() {
            match faults[next_victim] {
                Fault::Crash(service) => {
                    deployment.crash(service)?;
                    if service.starts_with("nats") {
                        recovering = Some(service);
                    }
                }
                Fault::Cut(service, how_long) => {
                    let network = deployment.cut(service)?;
                    cut = Some((service, network, Instant::now() + how_long));
                }
            }
            eprintln!(
                "compose-check: {} at {:.1} s",
                faults[next_victim],
                elapsed.as_secs_f64()
            );
            next_victim += 1;
        }
        if let Some((service, network, until)) = cut.take_if(|(_, _, until)| Instant::now() >= *until) {
            deployment.reconnect(service, &network)?;
            eprintln!(
                "compose-check: {service} connected again at {:.1} s ({:.1} s late)",
                elapsed.as_secs_f64(),
                until.elapsed().as_secs_f64()
            );
        }
        while n < args.complaints && (n as f64) < elapsed.as_secs_f64() * args.per_second {
            let (client, token, accepted) = (ingest.clone(), args.gateway_token.clone(), accepted.clone());
            let submission = gateway::complaint("stream", n);
            tasks.spawn(async move {
                let (id, first) =
                    gateway::submit_until_accepted(client, &token, submission, SUBMIT_FOR).await?;
                if let Ok(mut accepted) = accepted.lock() {
                    accepted.insert(id, first.unix_ms);
                }
                anyhow::Ok(())
            });
            n += 1;
        }
        while let Some(done) = tasks.try_join_next() {
            done??;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    anyhow::ensure!(
        next_victim == faults.len() && cut.is_none(),
        "the stream ended before every fault was over; send more complaints"
    );
    let accepted = accepted.lock().map(|a| a.clone()).unwrap_or_default();
    anyhow::ensure!(
        accepted.len() == args.complaints,
        "{} of {} accepted",
        accepted.len(),
        args.complaints
    );

    // Count.
    eprintln!("compose-check: waiting for every first reply and work order");
    wait_until(
        "a first reply to every complaint",
        Duration::from_secs(180),
        || async {
            first_replied(&http, args.gateway)
                .await
                .is_some_and(|answered| accepted.keys().all(|id| answered.contains(id)))
        },
    )
    .await?;
    let placed = wait_for(
        "a work order for every complaint",
        Duration::from_secs(180),
        || async { placed(&deployment).filter(|placed| accepted.keys().all(|id| placed.contains_key(id))) },
    )
    .await?;

    let messages = received(&http, args.gateway).await?;
    let mut keys: HashMap<&str, HashSet<&str>> = HashMap::new();
    let mut first_reply: HashMap<&str, i64> = HashMap::new();
    for m in messages.iter().filter(|m| {
        m.answered == 200 && matches!(m.kind.as_str(), "acknowledgement" | "private_channel_invitation")
    }) {
        keys.entry(&m.complaint_id)
            .or_default()
            .insert(&m.idempotency_key);
        let at = first_reply.entry(&m.complaint_id).or_insert(m.at_unix_ms);
        *at = (*at).min(m.at_unix_ms);
    }
    let latency = |id: &str, submitted: i64| first_reply.get(id).copied().unwrap_or(i64::MAX) - submitted;
    let mut latencies: Vec<i64> = accepted
        .iter()
        .map(|(id, submitted)| latency(id, *submitted))
        .collect();
    latencies.sort_unstable();
    // When the slowest ten were first submitted, to tell which fault they met.
    let mut slowest: Vec<(i64, i64)> = accepted
        .iter()
        .map(|(id, submitted)| (latency(id, *submitted), *submitted - started_unix_ms))
        .collect();
    slowest.sort_unstable_by(|a, b| b.cmp(a));
    let slowest_at: Vec<String> = slowest
        .iter()
        .take(10)
        .map(|(_, offset)| format!("{:.1}", *offset as f64 / 1000.0))
        .collect();
    let twice = accepted
        .keys()
        .filter(|id| keys.get(id.as_str()).is_none_or(|k| k.len() != 1))
        .count();
    let doubled = accepted
        .keys()
        .filter(|id| placed.get(id.as_str()) != Some(&1))
        .count();
    let admin_password = format!("--nats-password={}", args.nats_admin_password);
    let dead_letters = deployment.compose(&[
        "exec",
        "-T",
        "ingest",
        "closedloop-admin",
        "--nats-url=nats://nats:4222",
        "--nats-user=admin",
        &admin_password,
        "dead-letters",
        "list",
    ])?;
    let running: Vec<String> = deployment
        .healthchecked()
        .iter()
        .map(|service| {
            format!(
                "{service} {} (restarts {})",
                deployment
                    .inspect(service, "{{.State.Status}}")
                    .unwrap_or_default(),
                deployment
                    .inspect(service, "{{.RestartCount}}")
                    .unwrap_or_default()
            )
        })
        .collect();
    let percentile = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    println!(
        "compose-check: {} accepted; first reply p50 {} ms, p99 {} ms, max {} ms (the slowest ten submitted at {} s); {}; {}",
        accepted.len(),
        percentile(0.5),
        percentile(0.99),
        percentile(1.0),
        slowest_at.join(", "),
        dead_letters.trim(),
        running.join(", ")
    );
    anyhow::ensure!(
        twice == 0,
        "{twice} complaints got other than one first reply key"
    );
    anyhow::ensure!(
        percentile(1.0) <= PROMISE.as_millis() as i64,
        "the slowest first reply took {} ms",
        percentile(1.0)
    );
    anyhow::ensure!(
        doubled == 0,
        "{doubled} complaints have other than one work order"
    );
    anyhow::ensure!(
        dead_letters.contains("no dead letters"),
        "dead letters: {dead_letters}"
    );
    anyhow::ensure!(
        running.iter().all(|state| state.contains("running")),
        "not all running: {running:?}"
    );
    // The bus is locked: from inside the stack's network, no credentials, no entry.
    let anonymous = deployment.compose(&[
        "exec",
        "-T",
        "ingest",
        "closedloop-admin",
        "--nats-url=nats://nats:4222",
        "dead-letters",
        "list",
    ]);
    anyhow::ensure!(
        anonymous.is_err(),
        "a client without credentials used the stack's NATS: {anonymous:?}"
    );
    println!("compose-check: the promises held, and NATS refused a client without credentials");
    if let Some(prometheus) = args.prometheus {
        check_prometheus(&deployment, prometheus, &args.observability).await?;
    }
    Ok(())
}
