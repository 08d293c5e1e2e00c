//! Driving the whole loop from a benchmark: the four services' options, submitters at a
//! rate or flat out, and the wait until every consumer has caught up. Shared by
//! `bench-loop` and `bench-api`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use closedloop_proto::v1::ingest_service_client::IngestServiceClient;
use closedloop_proto::v1::{ComplaintSubmission, SubmitComplaintRequest};
use tonic::transport::Channel as GrpcChannel;

use crate::free_port;
use crate::servers::NatsServer;
use crate::system::{CONSUMERS, SystemOptions, WECHAT_TOKEN, authed};
use crate::webhook::WebhookReceiver;

/// The token the benchmarks' gateway submits with.
pub const GATEWAY_TOKEN: &str = "bench-gateway-token";

/// The secret the stand-in gateway verifies notify's signatures with.
pub const GATEWAY_SECRET: &str = "bench-gateway-secret";

/// The four services as docker-compose.yml runs them, on free ports of this machine, with
/// `auth_tokens` (`CLOSEDLOOP_AUTH_TOKENS` syntax) and dispatch on `policy`.
pub fn loop_options(
    nats: &NatsServer,
    database_url: &str,
    webhook: &WebhookReceiver,
    policy: &Path,
    auth_tokens: String,
    notify_args: &[String],
    worker_threads: usize,
) -> anyhow::Result<SystemOptions> {
    let ports = [free_port()?, free_port()?, free_port()?, free_port()?];
    let metrics_ports = [free_port()?, free_port()?, free_port()?, free_port()?];
    Ok(SystemOptions {
        nats_url: nats.service_url(),
        nats_auth: true,
        database_url: database_url.to_owned(),
        auth_tokens,
        gateways: format!("default={url}|{GATEWAY_SECRET}", url = webhook.url()),
        host: "127.0.0.1".parse()?,
        ports,
        metrics_ports,
        retry_base_ms: 500,
        ingest_http_port: free_port()?,
        wechat_accounts: format!("acme={WECHAT_TOKEN}"),
        weibo_apps: String::new(),
        extra_args: vec![
            "--log-filter".into(),
            "warn".into(),
            "--worker-threads".into(),
            worker_threads.to_string(),
        ],
        // As docker-compose.yml runs it, unless `notify_args` say otherwise.
        notify_args: if notify_args
            .iter()
            .any(|a| a.starts_with("--consumer-concurrency"))
        {
            notify_args.to_vec()
        } else {
            ["--consumer-concurrency".to_owned(), "256".to_owned()]
                .into_iter()
                .chain(notify_args.iter().cloned())
                .collect()
        },
        classify_args: Vec::new(),
        without_classify: false,
        // As docker-compose.yml runs it: more in flight makes bigger batches.
        dispatch_args: vec![
            "--policy".into(),
            policy.display().to_string(),
            "--consumer-concurrency".into(),
            "256".into(),
        ],
        without_dispatch: false,
    })
}

/// A client of ingest at `addr`, once it accepts connections.
pub async fn ingest_client(addr: std::net::SocketAddr) -> anyhow::Result<IngestServiceClient<GrpcChannel>> {
    let channel = crate::wait_for(
        "ingest to accept connections",
        Duration::from_secs(30),
        || async move {
            GrpcChannel::from_shared(format!("http://{addr}"))
                .ok()?
                .connect()
                .await
                .ok()
        },
    )
    .await?;
    Ok(IngestServiceClient::new(channel))
}

/// One submission accepted, by complaint id.
pub struct Sent {
    pub phase: usize,
    pub at: Instant,
    pub wall: DateTime<Utc>,
}

/// What the submitters did.
#[derive(Default)]
pub struct Ledger {
    pub sent: Mutex<HashMap<String, Sent>>,
    pub accepted: AtomicUsize,
    pub duplicates: AtomicUsize,
    pub failed: AtomicUsize,
}

/// Submits complaints to ingest over a few connections as one gateway, into a [`Ledger`].
#[derive(Clone)]
pub struct Submitters {
    pub clients: Vec<IngestServiceClient<GrpcChannel>>,
    pub token: Arc<str>,
    pub ledger: Arc<Ledger>,
}

impl Submitters {
    /// `connections` clients of ingest at `addr`, submitting with `token`.
    pub async fn connect(
        addr: std::net::SocketAddr,
        connections: usize,
        token: &str,
    ) -> anyhow::Result<Self> {
        let mut clients = Vec::new();
        for _ in 0..connections.max(1) {
            clients.push(ingest_client(addr).await?);
        }
        Ok(Self {
            clients,
            token: token.into(),
            ledger: Arc::default(),
        })
    }

    async fn submit(&self, client: usize, phase: usize, submission: ComplaintSubmission) {
        let mut ingest = self.clients[client % self.clients.len()].clone();
        let ledger = &self.ledger;
        let at = Instant::now();
        let wall = Utc::now();
        let request = SubmitComplaintRequest {
            complaint: Some(submission),
        };
        match ingest.submit_complaint(authed(&self.token, request)).await {
            Ok(response) => {
                let response = response.into_inner();
                if response.duplicate {
                    ledger.duplicates.fetch_add(1, Ordering::Relaxed);
                } else {
                    ledger.accepted.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut sent) = ledger.sent.lock() {
                        sent.insert(response.complaint_id, Sent { phase, at, wall });
                    }
                }
            }
            Err(status) => {
                if ledger.failed.fetch_add(1, Ordering::Relaxed) < 5 {
                    eprintln!("submission failed: {status}");
                }
            }
        }
    }

    /// Submits `submissions` at `per_second`, each on its own task (at most 2,000 in flight).
    pub async fn at_rate(
        &self,
        phase: usize,
        submissions: impl IntoIterator<Item = ComplaintSubmission>,
        per_second: f64,
    ) -> anyhow::Result<()> {
        let limit = Arc::new(tokio::sync::Semaphore::new(2_000));
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        let mut pending = submissions.into_iter().enumerate().peekable();
        let mut ticker = tokio::time::interval(Duration::from_millis(2));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        while pending.peek().is_some() {
            ticker.tick().await;
            let due = (started.elapsed().as_secs_f64() * per_second) as usize;
            while let Some((index, submission)) = pending.next_if(|(index, _)| *index < due) {
                let permit = limit.clone().acquire_owned().await?;
                let submitters = self.clone();
                tasks.spawn(async move {
                    submitters.submit(index, phase, submission).await;
                    drop(permit);
                });
            }
            while tasks.try_join_next().is_some() {}
        }
        while tasks.join_next().await.is_some() {}
        Ok(())
    }

    /// Submits `submissions` from `callers` concurrent loops, as fast as they are answered.
    pub async fn flat_out(&self, phase: usize, submissions: Vec<ComplaintSubmission>, callers: usize) {
        let queue = Arc::new(Mutex::new(submissions.into_iter()));
        let mut tasks = tokio::task::JoinSet::new();
        for caller in 0..callers.max(1) {
            let submitters = self.clone();
            let queue = queue.clone();
            tasks.spawn(async move {
                loop {
                    let next = queue.lock().ok().and_then(|mut q| q.next());
                    let Some(submission) = next else { break };
                    submitters.submit(caller, phase, submission).await;
                }
            });
        }
        while tasks.join_next().await.is_some() {}
    }
}

/// Unfinished work of each of the pipeline's consumers, but the watchdog's, which reads a
/// first-response deadline behind by design.
pub async fn backlog(js: &async_nats::jetstream::Context) -> anyhow::Result<Vec<(&'static str, u64)>> {
    let mut lag = Vec::new();
    for (stream, durable) in CONSUMERS {
        if durable == closedloop_notify::WATCHDOG_CONSUMER {
            continue;
        }
        let info = js.get_stream(stream).await?.consumer_info(durable).await?;
        lag.push((durable, info.num_pending + info.num_ack_pending as u64));
    }
    Ok(lag)
}

/// Whether dispatch has published every event it committed (its outbox and the history rows
/// past the relay's cursor).
pub async fn events_published(pool: &sqlx::PgPool) -> anyhow::Result<bool> {
    let waiting: i64 = sqlx::query_scalar("SELECT events FROM dispatch.unpublished_events")
        .fetch_one(pool)
        .await?;
    Ok(waiting == 0)
}

/// Waits until the pipeline is idle twice in a row; returns when it first was, counted
/// from `started`.
pub async fn drained(
    js: &async_nats::jetstream::Context,
    pool: &sqlx::PgPool,
    started: Instant,
) -> anyhow::Result<Duration> {
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut idle_since = None;
    loop {
        let lag: u64 = backlog(js).await?.iter().map(|(_, n)| n).sum();
        if lag == 0 && events_published(pool).await? {
            if let Some(at) = idle_since {
                return Ok(at);
            }
            idle_since = Some(started.elapsed());
        } else {
            idle_since = None;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the pipeline did not drain in 10 minutes (lag {lag})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
