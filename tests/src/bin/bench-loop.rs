//! `bench-loop`: the whole loop — ingest, classify, dispatch, notify as their own processes,
//! with nats-server and a durable PostgreSQL on this machine — under a realistic workload,
//! beside what the primitives underneath do in the same run.
//!
//! Phases, each drained before the next:
//! - steady: `--rate` complaints per second for `--steady-secs` (the mix of channels,
//!   Simplified, Traditional and English texts, heavy-tailed reach, duplicates, follow-ups);
//! - outage: `--burst-factor` times the rate of one category in one region for
//!   `--burst-secs`, as an outage brings;
//! - max: `--max-complaints` as fast as `--submitters` concurrent callers can submit.
//!
//! Measured: submissions accepted per second; completed per second (every consumer caught
//! up and dispatch's events published, so every acknowledgement is delivered and every work order
//! written); submit→acknowledgement (the first message the customer's gateway receives)
//! and submit→assigned percentiles; consumer lag over time; CPU and RSS of each process.
//! The raw bound: JetStream publish, and pull-consume with ack, for as many messages and
//! deliveries as a complaint made in this run, and 256-row PostgreSQL inserts for as many
//! row writes (the JSON lists them by table); the loop's best completed rate is printed as
//! a share of it.
//!
//! Prints a table; writes `bench-loop.json` and `bench-loop.svg` to `--out`. Build the
//! service binaries first: `scripts/bench.sh loop` does both.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use clap::Parser;
use closedloop_e2e::bench::{
    self, BenchServers, Kind, LoopUnderTest, Mix, Workload, millis, nats_version, procfs, quantile, rate,
    table,
};
use closedloop_e2e::drive;
use closedloop_e2e::system::{CONSUMERS, Service};
use closedloop_proto::v1::ComplaintSubmission;
use futures::StreamExt;
use serde_json::json;
use tokio_util::sync::CancellationToken;

const TENANT: &str = "acme";
const SAMPLE_EVERY: Duration = Duration::from_millis(500);

#[derive(Debug, Parser)]
struct Args {
    /// Complaints per second in the steady phase.
    #[arg(long, default_value_t = 1_000.0)]
    rate: f64,
    #[arg(long, default_value_t = 15.0)]
    steady_secs: f64,
    /// The outage phase's rate, as a multiple of `--rate`.
    #[arg(long, default_value_t = 3.0)]
    burst_factor: f64,
    #[arg(long, default_value_t = 3.0)]
    burst_secs: f64,
    /// Complaints in the maximum-rate phase.
    #[arg(long, default_value_t = 20_000)]
    max_complaints: usize,
    /// Concurrent callers in the maximum-rate phase.
    #[arg(long, default_value_t = 128)]
    submitters: usize,
    /// Online agents per team (each takes up to 1,000 open work orders).
    #[arg(long, default_value_t = 40)]
    agents_per_team: usize,
    /// Messages and rows for the raw bound.
    #[arg(long, default_value_t = 50_000)]
    raw_messages: usize,
    /// Where the JSON figures and the SVG plot go.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Extra arguments for notify (repeatable), e.g. `--notify-arg=--database-max-connections=32`.
    #[arg(long, allow_hyphen_values = true)]
    notify_arg: Vec<String>,
    /// Worker threads of each service (0: one per core). 1, as docker-compose.yml runs
    /// them, since all share this machine's cores.
    #[arg(long, default_value_t = 1)]
    service_worker_threads: usize,
    /// Where the service binaries are (default: beside this one).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

/// A service or server process and what it used.
struct Watched {
    name: String,
    pids: Box<dyn Fn() -> Vec<u32> + Send + Sync>,
}

impl Watched {
    fn cpu_ticks(&self) -> u64 {
        (self.pids)().into_iter().filter_map(procfs::cpu_ticks).sum()
    }
    fn rss_kib(&self, field: &str) -> u64 {
        (self.pids)()
            .into_iter()
            .filter_map(|pid| procfs::status_kib(pid, field))
            .sum()
    }
}

/// PostgreSQL's processes and which application each backend serves, as `/proc` and
/// pg_stat_activity said at the last refresh (one `/proc` scan per sample for all rows).
#[derive(Clone)]
struct PgSessions {
    cluster: PathBuf,
    seen: Arc<Mutex<PgProcesses>>,
}

/// The postmaster and its children, and the `application_name` of those that are sessions.
#[derive(Default)]
struct PgProcesses {
    pids: Vec<u32>,
    applications: HashMap<u32, String>,
}

impl PgSessions {
    fn new(cluster: PathBuf) -> Self {
        Self {
            cluster,
            seen: Arc::default(),
        }
    }

    async fn refresh(&self, pool: &sqlx::PgPool) {
        let rows: Result<Vec<(i32, String)>, _> = sqlx::query_as(
            "SELECT pid, application_name FROM pg_stat_activity WHERE application_name LIKE 'closedloop-%'",
        )
        .fetch_all(pool)
        .await;
        let pids = procfs::postmaster(&self.cluster)
            .map(|master| {
                let mut pids = procfs::children(master);
                pids.push(master);
                pids
            })
            .unwrap_or_default();
        if let Ok(mut seen) = self.seen.lock() {
            seen.pids = pids;
            // On a failed read the last mapping stands; sessions rarely come and go.
            if let Ok(rows) = rows {
                seen.applications = rows
                    .into_iter()
                    .filter_map(|(pid, application)| Some((u32::try_from(pid).ok()?, application)))
                    .collect();
            }
        }
    }

    /// The processes serving `application`, or with `None` those serving no named one.
    fn pids(&self, application: Option<&str>) -> Vec<u32> {
        self.seen
            .lock()
            .map(|seen| {
                seen.pids
                    .iter()
                    .copied()
                    .filter(|pid| seen.applications.get(pid).map(String::as_str) == application)
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[derive(Clone)]
struct Sample {
    secs: f64,
    phase: usize,
    accepted: usize,
    gateway_messages: usize,
    lag: u64,
    /// Cores used since the last sample, per watched process.
    cores: Vec<f64>,
}

struct PhaseResult {
    name: &'static str,
    submitted: usize,
    accepted: usize,
    submit_secs: f64,
    complete_secs: f64,
    cores: Vec<f64>,
}

impl PhaseResult {
    /// CPU time per accepted complaint for a process that used `cores` on average over
    /// the phase: what each complaint costs it, comparable across rates and runs.
    fn cpu_ms_per_complaint(&self, cores: f64) -> f64 {
        cores * self.complete_secs * 1e3 / (self.accepted.max(1) as f64)
    }
}

/// Publish rate and pull-consume-with-ack rate of a bare JetStream stream, with messages of
/// `size` bytes: the primitive every hop of the loop is made of.
async fn raw_jetstream(url: &str, messages: usize, size: usize) -> anyhow::Result<(f64, f64)> {
    let client = closedloop_e2e::nats(url).await?;
    let js = async_nats::jetstream::new(client);
    let stream = js
        .create_stream(async_nats::jetstream::stream::Config {
            name: "RAWBOUND".into(),
            subjects: vec!["rawbound.>".into()],
            ..Default::default()
        })
        .await?;
    let payload = bytes::Bytes::from(vec![b'x'; size]);
    let started = Instant::now();
    // Acks awaited in windows, as the services' batched publishing does.
    for window in (0..messages).collect::<Vec<_>>().chunks(256) {
        let mut acks = Vec::with_capacity(window.len());
        for n in window {
            acks.push(
                js.publish(format!("rawbound.{}", n % 16), payload.clone())
                    .await?,
            );
        }
        for ack in acks {
            ack.await?;
        }
    }
    let published = rate(messages, started.elapsed());
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("raw".into()),
            ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: 10_000,
            ..Default::default()
        })
        .await?;
    let started = Instant::now();
    let mut stream_of = consumer
        .stream()
        .max_messages_per_batch(256)
        .messages()
        .await?
        .take(messages);
    while let Some(message) = stream_of.next().await {
        message
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .ack()
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let consumed = rate(messages, started.elapsed());
    js.delete_stream("RAWBOUND").await?;
    Ok((published, consumed))
}

/// Messages published to the pipeline's streams and deliveries to its consumers so far.
async fn message_counts(js: &async_nats::jetstream::Context) -> anyhow::Result<(u64, u64)> {
    let mut published = 0;
    let mut streams: Vec<&str> = CONSUMERS.iter().map(|(s, _)| *s).collect();
    streams.extend([closedloop_runtime::bus::NOTIFICATIONS_STREAM]);
    streams.sort();
    streams.dedup();
    for name in streams {
        if let Ok(mut stream) = js.get_stream(name).await {
            published += stream.info().await?.state.messages;
        }
    }
    let mut delivered = 0;
    for (stream, durable) in CONSUMERS {
        let info = js.get_stream(stream).await?.consumer_info(durable).await?;
        delivered += info.delivered.consumer_sequence;
        // The watchdog reads the first-response deadline behind, so the last complaints have
        // not reached it yet when a run ends; each will, once.
        if durable == closedloop_notify::WATCHDOG_CONSUMER {
            delivered += info.num_pending;
        }
    }
    Ok((published, delivered))
}

/// Rows inserted, updated and deleted in the loop's database so far (the statistics are
/// flushed a little after each transaction, so this waits for two equal readings).
async fn row_writes(pool: &sqlx::PgPool) -> anyhow::Result<i64> {
    let read = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0)::bigint FROM pg_stat_user_tables",
        )
        .fetch_one(pool)
        .await
    };
    let mut last = read().await?;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        let now = read().await?;
        if now == last {
            break;
        }
        last = now;
    }
    Ok(last)
}

/// Each table's inserted, updated and deleted rows so far, most written first: where the
/// loop's row writes go (read after [`row_writes`] has seen the statistics settle).
async fn row_writes_by_table(pool: &sqlx::PgPool) -> anyhow::Result<Vec<(String, i64, i64, i64)>> {
    Ok(sqlx::query_as(
        "SELECT schemaname || '.' || relname, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_user_tables \
         WHERE n_tup_ins + n_tup_upd + n_tup_del > 0 ORDER BY n_tup_ins + n_tup_upd + n_tup_del DESC",
    )
    .fetch_all(pool)
    .await?)
}

fn percentiles(mut values: Vec<Duration>) -> [Option<Duration>; 4] {
    values.sort();
    [
        quantile(&values, 0.5),
        quantile(&values, 0.9),
        quantile(&values, 0.99),
        values.last().copied(),
    ]
}

fn polyline(
    points: &[(f64, f64)],
    x_max: f64,
    y_max: f64,
    (left, top, width, height): (f64, f64, f64, f64),
    colour: &str,
) -> String {
    let coordinates: Vec<String> = points
        .iter()
        .map(|(x, y)| {
            format!(
                "{:.1},{:.1}",
                left + width * x / x_max.max(f64::EPSILON),
                top + height - height * y / y_max.max(f64::EPSILON)
            )
        })
        .collect();
    format!(
        r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{}"/>"#,
        coordinates.join(" ")
    )
}

/// One line of a plot.
struct Series {
    name: &'static str,
    colour: &'static str,
    points: Vec<(f64, f64)>,
}

fn panel(
    title: &str,
    x_label: &str,
    y_label: &str,
    x_max: f64,
    y_max: f64,
    frame: (f64, f64, f64, f64),
    series: &[Series],
) -> String {
    let (left, top, width, height) = frame;
    let mut svg = format!(
        r##"<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="none" stroke="#999"/>
<text x="{left}" y="{}" font-size="13" font-weight="bold">{title}</text>
<text x="{}" y="{}" font-size="11" text-anchor="middle">{x_label} (0 – {x_max:.1})</text>
<text x="{}" y="{}" font-size="11" transform="rotate(-90 {} {})" text-anchor="middle">{y_label} (0 – {y_max:.0})</text>
"##,
        top - 8.0,
        left + width / 2.0,
        top + height + 16.0,
        left - 12.0,
        top + height / 2.0,
        left - 12.0,
        top + height / 2.0,
    );
    for (index, Series { name, colour, points }) in series.iter().enumerate() {
        svg.push_str(&polyline(points, x_max, y_max, frame, colour));
        svg.push_str(&format!(
            r#"<text x="{}" y="{}" font-size="11" fill="{colour}">{name}</text>"#,
            left + width - 190.0,
            top + 16.0 + 14.0 * index as f64
        ));
        svg.push('\n');
    }
    svg
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let servers = BenchServers::start("bench-loop", args.bin_dir.as_deref(), &args.out)?;
    let (pg, nats) = (&servers.pg, &servers.nats);
    let ticks = procfs::ticks_per_second();

    // The raw bound's primitives, measured first on the same servers.
    eprintln!(
        "raw: JetStream publish and pull-consume+ack of {} messages",
        args.raw_messages
    );
    let (raw_publish, raw_consume) = raw_jetstream(&nats.url(), args.raw_messages, 1_024).await?;
    eprintln!("raw: {} rows in 256-row inserts", args.raw_messages);
    let raw_rows = bench::batched_inserts(&pg.create_database().await?, args.raw_messages, 10).await?;

    let cancel = CancellationToken::new();
    // A fresh database has no baseline, so any category and region would look like a spike
    // at the minimum count; this one only the outage phase reaches.
    let mut policy: serde_json::Value =
        serde_json::from_str(&bench::staffed_policy(TENANT, args.agents_per_team, true)?)?;
    policy["incidents"]["min_count"] = json!(1_000);
    let LoopUnderTest {
        webhook,
        database_url,
        children,
        submitters,
        ..
    } = servers
        .start_loop(
            &policy,
            TENANT,
            &[],
            &args.notify_arg,
            args.service_worker_threads,
            &cancel,
        )
        .await?;

    let mut watched: Vec<Watched> = children
        .pids()
        .into_iter()
        .map(|(service, pid)| Watched {
            name: service.name().to_owned(),
            pids: Box::new(move || vec![pid]),
        })
        .collect();
    let nats_pid = nats.pid();
    watched.push(Watched {
        name: "nats-server".into(),
        pids: Box::new(move || nats_pid.into_iter().collect()),
    });
    // This process: the callers and the stand-in gateway share the machine too.
    let own_pid = std::process::id();
    watched.push(Watched {
        name: "bench-loop (callers, gateway)".into(),
        pids: Box::new(move || vec![own_pid]),
    });
    // PostgreSQL's CPU by whose sessions used it: backends map to services by the
    // `application_name` their pools set (refreshed from pg_stat_activity with each sample);
    // the rest is the server's own processes and bench-loop's sessions.
    let pg_sessions = PgSessions::new(servers.pg_dir.join("cluster"));
    for (service, schema) in [
        ("dispatch", closedloop_dispatch::SCHEMA),
        ("notify", closedloop_notify::SCHEMA),
    ] {
        let sessions = pg_sessions.clone();
        let application = closedloop_runtime::db::application_name(schema);
        watched.push(Watched {
            name: format!("postgres for {service}"),
            pids: Box::new(move || sessions.pids(Some(&application))),
        });
    }
    let sessions = pg_sessions.clone();
    watched.push(Watched {
        name: "postgres, other".into(),
        pids: Box::new(move || sessions.pids(None)),
    });
    let watched = Arc::new(watched);
    let services = Service::ALL.len();
    let idle_rss_start: Vec<u64> = watched[..services].iter().map(|w| w.rss_kib("VmRSS")).collect();

    let client = closedloop_e2e::nats(&nats.url()).await?;
    let js = async_nats::jetstream::new(client);
    let pool = bench::pool(&database_url, 2).await?;
    pg_sessions.refresh(&pool).await;
    let ledger = submitters.ledger.clone();

    // Samples every half second, with progress on stderr.
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let phase_now = Arc::new(AtomicUsize::new(0));
    let bench_started = Instant::now();
    let sampler = {
        let (samples, phase_now, ledger, webhook, js, watched, sessions, pool) = (
            samples.clone(),
            phase_now.clone(),
            ledger.clone(),
            webhook.clone(),
            js.clone(),
            watched.clone(),
            pg_sessions.clone(),
            pool.clone(),
        );
        let stop = cancel.clone();
        tokio::spawn(async move {
            let mut last_ticks: Vec<u64> = watched.iter().map(Watched::cpu_ticks).collect();
            let mut last_at = Instant::now();
            let mut printed = Instant::now();
            let mut interval = tokio::time::interval(SAMPLE_EVERY);
            loop {
                tokio::select! {
                    _ = interval.tick() => {}
                    _ = stop.cancelled() => break,
                }
                sessions.refresh(&pool).await;
                let now_ticks: Vec<u64> = watched.iter().map(Watched::cpu_ticks).collect();
                let elapsed = last_at.elapsed().as_secs_f64();
                let cores = now_ticks
                    .iter()
                    .zip(&last_ticks)
                    .map(|(now, before)| now.saturating_sub(*before) as f64 / ticks / elapsed)
                    .collect();
                last_ticks = now_ticks;
                last_at = Instant::now();
                let by_consumer = drive::backlog(&js).await.unwrap_or_default();
                let lag = by_consumer.iter().map(|(_, n)| n).sum();
                let sample = Sample {
                    secs: bench_started.elapsed().as_secs_f64(),
                    phase: phase_now.load(Ordering::Relaxed),
                    accepted: ledger.accepted.load(Ordering::Relaxed),
                    gateway_messages: webhook.count(),
                    lag,
                    cores,
                };
                if printed.elapsed() >= Duration::from_secs(1) {
                    let busy: Vec<String> = by_consumer
                        .iter()
                        .filter(|(_, n)| *n > 0)
                        .map(|(c, n)| format!("{c} {n}"))
                        .collect();
                    eprintln!(
                        "  {:>6.1}s  phase {}  accepted {}  gateway messages {}  consumer lag {} [{}]",
                        sample.secs,
                        sample.phase,
                        sample.accepted,
                        sample.gateway_messages,
                        sample.lag,
                        busy.join(", ")
                    );
                    printed = Instant::now();
                }
                if let Ok(mut all) = samples.lock() {
                    all.push(sample);
                }
            }
        })
    };

    let mut workload = Workload::new(
        &format!("loop-{}", uuid::Uuid::new_v4().simple()),
        TENANT,
        7,
        Mix::default(),
    );
    let mut kinds: HashMap<&'static str, usize> = HashMap::new();
    let mut generate = |n: usize, outage: bool| -> Vec<ComplaintSubmission> {
        (0..n)
            .map(|_| {
                let (kind, submission) = if outage {
                    workload.next_outage()
                } else {
                    workload.next_steady()
                };
                let name = match kind {
                    Kind::Fresh => "fresh",
                    Kind::Duplicate => "duplicate",
                    Kind::FollowUp => "follow-up",
                    Kind::Outage => "outage",
                };
                *kinds.entry(name).or_default() += 1;
                submission
            })
            .collect()
    };
    let steady = generate((args.rate * args.steady_secs) as usize, false);
    let burst_rate = args.rate * args.burst_factor;
    let burst = generate((burst_rate * args.burst_secs) as usize, true);
    let max = generate(args.max_complaints, false);

    let mut phases: Vec<PhaseResult> = Vec::new();
    let plan: Vec<(&'static str, Vec<ComplaintSubmission>, Option<f64>)> = vec![
        ("steady", steady, Some(args.rate)),
        ("outage burst", burst, Some(burst_rate)),
        ("max rate", max, None),
    ];
    for (index, (name, submissions, per_second)) in plan.into_iter().enumerate() {
        let phase = index + 1;
        phase_now.store(phase, Ordering::Relaxed);
        let submitted = submissions.len();
        match per_second {
            Some(r) => eprintln!("phase {phase}: {name}, {submitted} complaints at {r:.0}/s"),
            None => eprintln!(
                "phase {phase}: {name}, {submitted} complaints from {} callers",
                args.submitters
            ),
        }
        let accepted_before = ledger.accepted.load(Ordering::Relaxed);
        pg_sessions.refresh(&pool).await;
        let cpu_before: Vec<u64> = watched.iter().map(Watched::cpu_ticks).collect();
        let started = Instant::now();
        match per_second {
            Some(r) => submitters.at_rate(phase, submissions, r).await?,
            None => submitters.flat_out(phase, submissions, args.submitters).await,
        }
        let submit_secs = started.elapsed().as_secs_f64();
        let complete = drive::drained(&js, &pool, started).await?;
        pg_sessions.refresh(&pool).await;
        let cores = watched
            .iter()
            .zip(&cpu_before)
            .map(|(w, before)| w.cpu_ticks().saturating_sub(*before) as f64 / ticks / complete.as_secs_f64())
            .collect();
        phases.push(PhaseResult {
            name,
            submitted,
            accepted: ledger.accepted.load(Ordering::Relaxed) - accepted_before,
            submit_secs,
            complete_secs: complete.as_secs_f64(),
            cores,
        });
    }
    phase_now.store(0, Ordering::Relaxed);
    let peak_rss: Vec<u64> = watched.iter().map(|w| w.rss_kib("VmHWM")).collect();
    let idle_rss_after: Vec<u64> = watched[..services].iter().map(|w| w.rss_kib("VmRSS")).collect();

    // Latencies: the first gateway message about each complaint; the assignment's time.
    let mut first_message: HashMap<String, Instant> = HashMap::new();
    for message in webhook.messages() {
        let complaint = message.field("complaint_id").to_owned();
        first_message
            .entry(complaint)
            .and_modify(|at| *at = (*at).min(message.at))
            .or_insert(message.at);
    }
    let assigned: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT w.complaint_id::text, min(h.occurred_at) FROM dispatch.work_orders w \
         JOIN dispatch.work_order_history h ON h.work_order_id = w.work_order_id \
         WHERE h.kind = 'assigned' GROUP BY 1",
    )
    .fetch_all(&pool)
    .await?;
    let sent = std::mem::take(
        &mut *ledger
            .sent
            .lock()
            .map_err(|_| anyhow::anyhow!("ledger poisoned"))?,
    );
    let mut ack_latency: Vec<Vec<Duration>> = vec![Vec::new(); phases.len() + 1];
    let mut assign_latency: Vec<Vec<Duration>> = vec![Vec::new(); phases.len() + 1];
    for (complaint, s) in &sent {
        if let Some(at) = first_message.get(complaint) {
            ack_latency[s.phase].push(at.saturating_duration_since(s.at));
        }
    }
    for (complaint, at) in &assigned {
        if let Some(s) = sent.get(complaint) {
            assign_latency[s.phase].push((*at - s.wall).to_std().unwrap_or_default());
        }
    }
    let (published, delivered) = message_counts(&js).await?;
    let writes = row_writes(&pool).await?;
    let writes_by_table = row_writes_by_table(&pool).await?;
    let accepted_total = ledger.accepted.load(Ordering::Relaxed).max(1) as f64;
    let per_complaint = (
        published as f64 / accepted_total,
        delivered as f64 / accepted_total,
        writes as f64 / accepted_total,
    );
    let bound =
        1.0 / (per_complaint.0 / raw_publish + per_complaint.1 / raw_consume + per_complaint.2 / raw_rows);
    let best = phases
        .iter()
        .map(|p| p.accepted as f64 / p.complete_secs.max(f64::EPSILON))
        .fold(0.0, f64::max);

    cancel.cancel();
    let _ = sampler.await;
    if let Err(error) = children.stop() {
        eprintln!("{error}");
    }
    pool.close().await;

    // Figures.
    let mut phase_rows = Vec::new();
    let mut phase_json = Vec::new();
    for (index, p) in phases.iter().enumerate() {
        let ack = percentiles(ack_latency[index + 1].clone());
        let assign = percentiles(assign_latency[index + 1].clone());
        phase_rows.push(vec![
            p.name.to_owned(),
            p.submitted.to_string(),
            p.accepted.to_string(),
            format!("{:.0}", rate(p.accepted, Duration::from_secs_f64(p.submit_secs))),
            format!(
                "{:.0}",
                rate(p.accepted, Duration::from_secs_f64(p.complete_secs))
            ),
            ack.iter().map(|d| millis(*d)).collect::<Vec<_>>().join(" / "),
            assign.iter().map(|d| millis(*d)).collect::<Vec<_>>().join(" / "),
        ]);
        let ms = |values: &[Option<Duration>; 4]| {
            values
                .iter()
                .map(|d| d.map(|d| d.as_secs_f64() * 1e3))
                .collect::<Vec<_>>()
        };
        phase_json.push(json!({
            "phase": p.name, "submitted": p.submitted, "accepted": p.accepted,
            "submit_secs": p.submit_secs, "complete_secs": p.complete_secs,
            "accepted_per_sec": rate(p.accepted, Duration::from_secs_f64(p.submit_secs)),
            "completed_per_sec": rate(p.accepted, Duration::from_secs_f64(p.complete_secs)),
            "ack_ms_p50_p90_p99_max": ms(&ack), "ack_count": ack_latency[index + 1].len(),
            "assigned_ms_p50_p90_p99_max": ms(&assign), "assigned_count": assign_latency[index + 1].len(),
            "cores": watched.iter().zip(&p.cores).map(|(w, c)| json!({"process": w.name, "cores": c, "cpu_ms_per_complaint": p.cpu_ms_per_complaint(*c)})).collect::<Vec<_>>(),
            "cpu_ms_per_complaint": p.cpu_ms_per_complaint(p.cores.iter().sum()),
        }));
    }
    let mut process_rows = Vec::new();
    for (index, w) in watched.iter().enumerate() {
        let idle = |values: &[u64]| {
            values
                .get(index)
                .map_or("-".to_owned(), |kib| format!("{:.1}", *kib as f64 / 1024.0))
        };
        process_rows.push(vec![
            w.name.clone(),
            phases
                .iter()
                .map(|p| format!("{:.2}", p.cores[index]))
                .collect::<Vec<_>>()
                .join(" / "),
            phases
                .iter()
                .map(|p| format!("{:.3}", p.cpu_ms_per_complaint(p.cores[index])))
                .collect::<Vec<_>>()
                .join(" / "),
            if w.name.starts_with("postgres") {
                "-".to_owned()
            } else {
                format!("{:.1}", peak_rss[index] as f64 / 1024.0)
            },
            idle(&idle_rss_start),
            idle(&idle_rss_after),
        ]);
    }
    let all_processes =
        |each: &dyn Fn(&PhaseResult) -> String| phases.iter().map(each).collect::<Vec<_>>().join(" / ");
    process_rows.push(vec![
        "all of the above".to_owned(),
        all_processes(&|p| format!("{:.2}", p.cores.iter().sum::<f64>())),
        all_processes(&|p| format!("{:.3}", p.cpu_ms_per_complaint(p.cores.iter().sum()))),
        String::new(),
        String::new(),
        String::new(),
    ]);
    let bound_rows = vec![
        vec![
            "JetStream publish (1 KiB, acks awaited per 256)".to_owned(),
            format!("{raw_publish:.0} msg/s"),
            format!("{:.2} per complaint", per_complaint.0),
        ],
        vec![
            "JetStream pull-consume + ack".to_owned(),
            format!("{raw_consume:.0} msg/s"),
            format!("{:.2} per complaint", per_complaint.1),
        ],
        vec![
            "PostgreSQL 256-row inserts (durable)".to_owned(),
            format!("{raw_rows:.0} rows/s"),
            format!("{:.2} per complaint", per_complaint.2),
        ],
        vec![
            "raw bound for one complaint's work".to_owned(),
            format!("{bound:.0} complaints/s"),
            String::new(),
        ],
        vec![
            "loop, best completed rate".to_owned(),
            format!("{best:.0} complaints/s"),
            format!("{:.1}% of the bound", 100.0 * best / bound),
        ],
    ];
    println!(
        "\nthe whole loop on {} cores: four service processes, {}, PostgreSQL durable; {} duplicates answered, {} submissions failed",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        nats_version(),
        ledger.duplicates.load(Ordering::Relaxed),
        ledger.failed.load(Ordering::Relaxed)
    );
    println!(
        "{}",
        table(
            &[
                "phase",
                "submitted",
                "accepted",
                "accepted/s",
                "completed/s",
                "submit→ack ms p50/p90/p99/max",
                "submit→assigned ms p50/p90/p99/max"
            ],
            &phase_rows
        )
    );
    println!();
    println!(
        "{}",
        table(&["raw bound (same run)", "rate", "needed"], &bound_rows)
    );
    println!();
    println!(
        "{}",
        table(
            &[
                "process",
                "cores used (steady / outage / max)",
                "CPU ms per complaint",
                "peak RSS MiB",
                "idle RSS MiB (start)",
                "idle RSS MiB (after)"
            ],
            &process_rows
        )
    );

    let samples = samples.lock().map(|s| s.clone()).unwrap_or_default();
    let document = json!({
        "machine": {"cores": std::thread::available_parallelism().map_or(0, |n| n.get()), "nats_server": nats_version()},
        "args": {"rate": args.rate, "steady_secs": args.steady_secs, "burst_factor": args.burst_factor, "burst_secs": args.burst_secs, "max_complaints": args.max_complaints, "submitters": args.submitters},
        "workload": kinds,
        "phases": phase_json,
        "raw": {"publish_per_sec": raw_publish, "consume_ack_per_sec": raw_consume, "rows_per_sec": raw_rows,
                "published_per_complaint": per_complaint.0, "deliveries_per_complaint": per_complaint.1, "row_writes_per_complaint": per_complaint.2,
                "row_writes_by_table": writes_by_table.iter().map(|(table, inserted, updated, deleted)| json!({
                    "table": table, "inserted": inserted, "updated": updated, "deleted": deleted,
                    "per_complaint": (inserted + updated + deleted) as f64 / accepted_total,
                })).collect::<Vec<_>>(),
                "bound_complaints_per_sec": bound, "best_completed_per_sec": best, "share_of_bound": best / bound},
        "processes": watched.iter().enumerate().map(|(i, w)| json!({
            "process": w.name, "peak_rss_kib": peak_rss[i], "idle_rss_kib_start": idle_rss_start.get(i), "idle_rss_kib_after": idle_rss_after.get(i)
        })).collect::<Vec<_>>(),
        "samples": samples.iter().map(|s| json!({
            "secs": s.secs, "phase": s.phase, "accepted": s.accepted, "gateway_messages": s.gateway_messages,
            "lag": s.lag, "cores": s.cores,
        })).collect::<Vec<_>>(),
    });
    let json_path = args.out.join("bench-loop.json");
    std::fs::write(&json_path, serde_json::to_vec_pretty(&document)?)?;

    // Plot: throughput and lag over time; the latency distribution of the steady phase.
    let throughput: Vec<(f64, f64, f64)> = samples
        .windows(2)
        .map(|w| {
            let dt = (w[1].secs - w[0].secs).max(f64::EPSILON);
            (
                w[1].secs,
                (w[1].accepted - w[0].accepted) as f64 / dt,
                (w[1].gateway_messages.saturating_sub(w[0].gateway_messages)) as f64 / dt,
            )
        })
        .collect();
    let x_max = samples.last().map_or(1.0, |s| s.secs);
    let y_max = throughput.iter().map(|t| t.1.max(t.2)).fold(1.0, f64::max);
    let lag_max = samples.iter().map(|s| s.lag as f64).fold(1.0, f64::max);
    let mut svg = String::from(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="900" height="700" font-family="sans-serif">"#,
    );
    svg.push('\n');
    svg.push_str(&panel(
        "Throughput over time",
        "seconds",
        "per second",
        x_max,
        y_max,
        (70.0, 40.0, 800.0, 220.0),
        &[
            Series {
                name: "accepted/s",
                colour: "#1f77b4",
                points: throughput.iter().map(|t| (t.0, t.1)).collect(),
            },
            Series {
                name: "gateway messages/s",
                colour: "#2ca02c",
                points: throughput.iter().map(|t| (t.0, t.2)).collect(),
            },
        ],
    ));
    svg.push_str(&panel(
        "Consumer lag (pending + unacked)",
        "seconds",
        "messages",
        x_max,
        lag_max,
        (70.0, 320.0, 800.0, 120.0),
        &[Series {
            name: "lag",
            colour: "#d62728",
            points: samples.iter().map(|s| (s.secs, s.lag as f64)).collect(),
        }],
    ));
    let cdf = |values: &[Duration]| -> Vec<(f64, f64)> {
        let mut sorted = values.to_vec();
        sorted.sort();
        let n = sorted.len().max(1) as f64;
        sorted
            .iter()
            .enumerate()
            .map(|(i, d)| (d.as_secs_f64() * 1e3, 100.0 * (i + 1) as f64 / n))
            .collect()
    };
    let steady_ack = cdf(&ack_latency[1]);
    let steady_assign = cdf(&assign_latency[1]);
    // Cut at the 99.5th percentile so the tail does not flatten the picture.
    let cut = |points: &[(f64, f64)]| {
        points
            .iter()
            .filter(|p| p.1 <= 99.5)
            .map(|p| p.0)
            .fold(1.0, f64::max)
    };
    let latency_max = cut(&steady_ack).max(cut(&steady_assign));
    let clip = |points: Vec<(f64, f64)>| {
        points
            .into_iter()
            .filter(|p| p.0 <= latency_max)
            .collect::<Vec<_>>()
    };
    svg.push_str(&panel(
        "Steady phase latency distribution (cumulative %)",
        "milliseconds",
        "percent",
        latency_max,
        100.0,
        (70.0, 500.0, 800.0, 160.0),
        &[
            Series {
                name: "submit→acknowledgement",
                colour: "#9467bd",
                points: clip(steady_ack),
            },
            Series {
                name: "submit→assigned",
                colour: "#ff7f0e",
                points: clip(steady_assign),
            },
        ],
    ));
    svg.push_str("</svg>\n");
    let svg_path = args.out.join("bench-loop.svg");
    std::fs::write(&svg_path, svg)?;
    eprintln!("wrote {} and {}", json_path.display(), svg_path.display());
    Ok(())
}
