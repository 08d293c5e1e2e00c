//! The promises, kept while parts of the system crash. Each test runs the four services as
//! separate processes of their own binaries, with a real nats-server and PostgreSQL and a
//! webhook receiver as the gateway, submits 1,000 complaints at 100 a second, and meanwhile
//! kills one component with SIGKILL (PostgreSQL: an immediate shutdown, then crash recovery)
//! and starts it again; one run breaks every component in turn while it submits 3,000.
//! Then it counts:
//!
//! - every submission was accepted (a gateway retries what failed, as the README says);
//! - every complaint got exactly one first reply (one Idempotency-Key), at most 20 s after
//!   the gateway first tried to submit it;
//! - every complaint got exactly one work order;
//! - nothing was dead-lettered;
//! - no service exited, and each stops cleanly at the end.
//!
//! The service binaries must be built (`scripts/test.sh` builds them; or set
//! `CLOSEDLOOP_BIN_DIR`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use closedloop_e2e::gateway;
use closedloop_e2e::processes::{ServiceProcesses, bin_dir};
use closedloop_e2e::servers::{NatsServer, Postgres};
use closedloop_e2e::system::{CONSUMERS, Service, SystemOptions, wait_for_consumers};
use closedloop_e2e::webhook::WebhookReceiver;
use closedloop_e2e::{wait_for, wait_until};
use closedloop_proto::v1::ingest_service_client::IngestServiceClient;
use closedloop_runtime::auth::hash_token;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel as GrpcChannel;

const TENANT: &str = "acme";
const GATEWAY_TOKEN: &str = "fault-gateway-token";
const GATEWAY_SECRET: &str = "fault-gateway-secret";
const COMPLAINTS: usize = 1_000;
const PER_SECOND: f64 = 100.0;
/// When a single fault strikes, into the submissions.
const FAULT_AT: Duration = Duration::from_secs(3);
/// How long a crashed service or nats-server stays down before it is started again.
const RESTART_AFTER: Duration = Duration::from_secs(2);
/// How long PostgreSQL stays down.
const POSTGRES_DOWN_FOR: Duration = Duration::from_secs(120);
/// The promise: a first reply to every contact within this long of its submission.
const FIRST_REPLY_PROMISE: Duration = Duration::from_secs(20);
/// How long the gateway takes to answer each message.
const GATEWAY_LATENCY: Duration = Duration::from_millis(200);
/// How long a submission is retried before the test gives up on it.
const SUBMIT_FOR: Duration = Duration::from_secs(60);

/// What is broken during a run.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// A service killed with SIGKILL and started again.
    Service(Service),
    /// nats-server killed with SIGKILL and started again on its store.
    Nats,
    /// PostgreSQL stopped immediately, and started (with crash recovery) later.
    Postgres,
}

impl Fault {
    fn down_for(self) -> Duration {
        match self {
            Fault::Postgres => POSTGRES_DOWN_FOR,
            Fault::Service(_) | Fault::Nats => RESTART_AFTER,
        }
    }

    fn name(self) -> String {
        match self {
            Fault::Service(service) => service.name().to_owned(),
            Fault::Nats => "nats-server".to_owned(),
            Fault::Postgres => "postgres".to_owned(),
        }
    }
}

/// The servers, the gateway and the service processes of one run.
struct Deployment {
    nats: NatsServer,
    postgres: Postgres,
    database_url: String,
    webhook: WebhookReceiver,
    receiver_stop: CancellationToken,
    services: ServiceProcesses,
    ingest: std::net::SocketAddr,
    /// Logs of the services, kept for a failing run's report.
    logs: tempfile::TempDir,
}

impl Deployment {
    async fn start() -> anyhow::Result<Self> {
        let nats = NatsServer::start()?;
        let postgres = Postgres::start_restartable()?;
        let database_url = postgres.ensure_database("closedloop").await?;
        let receiver_stop = CancellationToken::new();
        let webhook = WebhookReceiver::start(
            "127.0.0.1:0".parse()?,
            GATEWAY_SECRET,
            false,
            receiver_stop.clone(),
        )
        .await?;
        // A gateway that answers in a fifth of a second, as a platform's API may: some twenty
        // deliveries are in flight whenever a component dies.
        webhook.slow_next(usize::MAX, GATEWAY_LATENCY);
        let options = SystemOptions::processes(
            nats.service_url(),
            database_url.clone(),
            format!("{TENANT}:gateway:{}:fault-gateway", hash_token(GATEWAY_TOKEN)),
            format!("default={}|{GATEWAY_SECRET}", webhook.url()),
        )?;
        let logs = tempfile::Builder::new().prefix("closedloop-faults-").tempdir()?;
        let mut services = ServiceProcesses::spawn(&bin_dir()?, &options, logs.path())?;
        if let Err(error) = wait_for_consumers(&nats.url(), &CONSUMERS).await {
            return Err(error.context(services.exited_report()));
        }
        let ingest = std::net::SocketAddr::new(options.host, options.ports[0]);
        wait_until(
            "ingest to accept connections",
            Duration::from_secs(30),
            || async { tokio::net::TcpStream::connect(ingest).await.is_ok() },
        )
        .await?;
        Ok(Self {
            ingest,
            nats,
            postgres,
            database_url,
            webhook,
            receiver_stop,
            services,
            logs,
        })
    }

    fn break_it(&mut self, fault: Fault) -> anyhow::Result<()> {
        match fault {
            Fault::Service(service) => self.services.kill(service),
            Fault::Nats => self.nats.kill(),
            Fault::Postgres => self.postgres.crash(),
        }
    }

    fn mend(&mut self, fault: Fault) -> anyhow::Result<()> {
        match fault {
            Fault::Service(service) => self.services.restart(service),
            Fault::Nats => self.nats.resume(),
            Fault::Postgres => self.postgres.resume(),
        }
    }

    /// The end of each service's log, for a failure's message.
    fn log_tails(&self) -> String {
        let tails = Service::ALL
            .iter()
            .map(|service| {
                let log = std::fs::read_to_string(self.logs.path().join(format!("{}.log", service.name())))
                    .unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                format!(
                    "--- {} ---\n{}",
                    service.name(),
                    lines[lines.len().saturating_sub(15)..].join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n");
        format!("{tails}\n(logs in {})", self.logs.path().display())
    }
}

/// What a run measured.
struct Outcome {
    /// Per accepted complaint: when its submission was first tried.
    submitted: HashMap<String, Instant>,
}

/// What breaks when, into a run's submissions.
type Schedule = Vec<(Duration, Fault)>;

/// Submits `count` complaints at [`PER_SECOND`], breaking each fault of `schedule` when due
/// and mending it `down_for()` later; returns once all are accepted and all mended.
async fn submit_through(
    deployment: &mut Deployment,
    run: &str,
    count: usize,
    schedule: &Schedule,
) -> anyhow::Result<Outcome> {
    let channel = GrpcChannel::from_shared(format!("http://{}", deployment.ingest))?
        .connect_timeout(Duration::from_secs(1))
        .connect_lazy();
    let client = IngestServiceClient::new(channel);
    let accepted: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    let mut pending = (0..count)
        .map(|n| gateway::complaint(run, n))
        .enumerate()
        .peekable();
    // Per fault: when it was broken, and whether it is mended.
    let mut states: Vec<(Option<Instant>, bool)> = vec![(None, false); schedule.len()];
    let mut ticker = tokio::time::interval(Duration::from_millis(5));
    while pending.peek().is_some() || states.iter().any(|(_, mended)| !mended) {
        ticker.tick().await;
        let elapsed = started.elapsed();
        for ((at, fault), (broken, mended)) in schedule.iter().zip(states.iter_mut()) {
            if broken.is_none() && elapsed >= *at {
                deployment.break_it(*fault)?;
                eprintln!("{run}: {} broken at {:.1} s", fault.name(), elapsed.as_secs_f64());
                *broken = Some(Instant::now());
            }
            if let Some(since) = broken
                && !*mended
                && since.elapsed() >= fault.down_for()
            {
                deployment.mend(*fault)?;
                eprintln!(
                    "{run}: {} started again at {:.1} s",
                    fault.name(),
                    started.elapsed().as_secs_f64()
                );
                *mended = true;
            }
        }
        let due = (elapsed.as_secs_f64() * PER_SECOND) as usize;
        while let Some((_, submission)) = pending.next_if(|(index, _)| *index < due) {
            let client = client.clone();
            let accepted = accepted.clone();
            tasks.spawn(async move {
                let (id, first_attempt) =
                    gateway::submit_until_accepted(client, GATEWAY_TOKEN, submission, SUBMIT_FOR).await?;
                if let Ok(mut accepted) = accepted.lock() {
                    accepted.insert(id, first_attempt.at);
                }
                anyhow::Ok(())
            });
        }
        while let Some(done) = tasks.try_join_next() {
            done??;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let submitted = accepted.lock().map(|a| a.clone()).unwrap_or_default();
    Ok(Outcome { submitted })
}

/// Each complaint's first replies at the gateway, as (Idempotency-Keys, earliest arrival).
fn first_replies(webhook: &WebhookReceiver) -> HashMap<String, (HashSet<String>, Instant)> {
    let mut replies: HashMap<String, (HashSet<String>, Instant)> = HashMap::new();
    for message in webhook.messages() {
        if !matches!(
            message.field("kind"),
            "acknowledgement" | "private_channel_invitation"
        ) {
            continue;
        }
        let entry = replies
            .entry(message.field("complaint_id").to_owned())
            .or_insert_with(|| (HashSet::new(), message.at));
        entry.0.insert(message.idempotency_key.clone());
        entry.1 = entry.1.min(message.at);
    }
    replies
}

/// Work orders per complaint (a complaint attached to another's work order counts once).
async fn work_orders_per_complaint(pool: &sqlx::PgPool) -> anyhow::Result<HashMap<String, i64>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT complaint_id::text, count(*) FROM ( \
           SELECT complaint_id FROM dispatch.work_orders \
           UNION ALL SELECT complaint_id FROM dispatch.complaint_links) placed \
         GROUP BY complaint_id",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Whether every consumer has handled everything in its stream.
async fn idle(js: &async_nats::jetstream::Context) -> bool {
    for (stream, durable) in CONSUMERS {
        let Ok(stream) = js.get_stream(stream).await else {
            return false;
        };
        match stream.consumer_info(durable).await {
            Ok(info) if info.num_pending == 0 && info.num_ack_pending == 0 => {}
            _ => return false,
        }
    }
    true
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted.get(index).copied().unwrap_or_default()
}

/// A run with one fault at [`FAULT_AT`].
async fn run(fault: Fault) -> anyhow::Result<()> {
    run_schedule(&fault.name(), COMPLAINTS, vec![(FAULT_AT, fault)]).await
}

async fn run_schedule(run: &str, count: usize, schedule: Schedule) -> anyhow::Result<()> {
    let mut deployment = Deployment::start().await?;
    let checked = check(&mut deployment, run, count, &schedule).await;
    let checked = checked.map_err(|error| error.context(deployment.log_tails()));
    let stopped = deployment.services.stop();
    deployment.receiver_stop.cancel();
    if checked.is_err() {
        // Kept for whoever reads the failure.
        let _ = deployment.logs.keep();
    }
    checked?;
    stopped
}

async fn check(
    deployment: &mut Deployment,
    run: &str,
    count: usize,
    schedule: &Schedule,
) -> anyhow::Result<()> {
    let outcome = submit_through(deployment, run, count, schedule).await?;
    anyhow::ensure!(
        outcome.submitted.len() == count,
        "{} of {count} complaints accepted",
        outcome.submitted.len()
    );

    // Every complaint's first reply, then every work order, then quiet.
    let webhook = deployment.webhook.clone();
    wait_until(
        "a first reply to every complaint",
        Duration::from_secs(60),
        || async {
            let replies = first_replies(&webhook);
            outcome.submitted.keys().all(|id| replies.contains_key(id))
        },
    )
    .await?;
    let pool = sqlx::PgPool::connect(&deployment.database_url).await?;
    wait_for(
        "a work order for every complaint",
        Duration::from_secs(120),
        || async {
            let placed = work_orders_per_complaint(&pool).await.ok()?;
            outcome
                .submitted
                .keys()
                .all(|id| placed.contains_key(id))
                .then_some(())
        },
    )
    .await?;
    let js = async_nats::jetstream::new(closedloop_e2e::nats(&deployment.nats.url()).await?);
    wait_until("every consumer to be idle", Duration::from_secs(60), || async {
        idle(&js).await && idle(&js).await
    })
    .await?;

    let replies = first_replies(&deployment.webhook);
    let mut latencies = Vec::with_capacity(count);
    let mut twice = Vec::new();
    for (id, first_attempt) in &outcome.submitted {
        let (keys, arrived) = &replies[id];
        if keys.len() != 1 {
            twice.push(id.clone());
        }
        latencies.push(arrived.saturating_duration_since(*first_attempt));
    }
    latencies.sort();
    let placed = work_orders_per_complaint(&pool).await?;
    let doubled: Vec<_> = placed.iter().filter(|(_, n)| **n != 1).collect();
    let dead_letters = closedloop_e2e::dead_letter_count(&deployment.nats.url()).await?;
    // Messages a crash made notify send again (the gateway drops them by their key).
    let attempts = deployment.webhook.attempts().len();
    let resent = attempts - deployment.webhook.unique_messages().len();
    let exited = deployment.services.exited();
    let max = latencies.last().copied().unwrap_or_default();
    eprintln!(
        "{}: {} accepted; first reply p50 {} ms, p99 {} ms, max {} ms; {} dead-lettered; \
         {resent} of {attempts} gateway calls repeated a key",
        run,
        outcome.submitted.len(),
        percentile(&latencies, 0.5).as_millis(),
        percentile(&latencies, 0.99).as_millis(),
        max.as_millis(),
        dead_letters
    );
    anyhow::ensure!(
        twice.is_empty(),
        "{} complaints got first replies under more than one key, e.g. {:?}",
        twice.len(),
        twice.first()
    );
    anyhow::ensure!(
        max <= FIRST_REPLY_PROMISE,
        "the slowest first reply took {max:?}; the promise is {FIRST_REPLY_PROMISE:?}"
    );
    anyhow::ensure!(
        doubled.is_empty(),
        "complaints with other than one work order: {doubled:?}"
    );
    anyhow::ensure!(dead_letters == 0, "{dead_letters} events dead-lettered");
    anyhow::ensure!(exited.is_empty(), "services exited: {exited:?}");
    pool.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classify_killed_mid_stream() -> anyhow::Result<()> {
    run(Fault::Service(Service::Classify)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_killed_mid_stream() -> anyhow::Result<()> {
    run(Fault::Service(Service::Notify)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_killed_mid_stream() -> anyhow::Result<()> {
    run(Fault::Service(Service::Dispatch)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_killed_mid_stream() -> anyhow::Result<()> {
    run(Fault::Service(Service::Ingest)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_killed_mid_stream() -> anyhow::Result<()> {
    run(Fault::Nats).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_for_two_minutes() -> anyhow::Result<()> {
    run(Fault::Postgres).await
}

/// Every component in turn, in one run of 3,000: each service and nats-server killed and
/// started again 2 s later, 4 s apart, then PostgreSQL down for two minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_component_in_turn() -> anyhow::Result<()> {
    let schedule: Schedule = [
        Fault::Service(Service::Classify),
        Fault::Service(Service::Dispatch),
        Fault::Service(Service::Notify),
        Fault::Service(Service::Ingest),
        Fault::Nats,
        Fault::Postgres,
    ]
    .into_iter()
    .enumerate()
    .map(|(turn, fault)| (FAULT_AT + Duration::from_secs(4) * turn as u32, fault))
    .collect();
    run_schedule("in-turn", 3 * COMPLAINTS, schedule).await
}
