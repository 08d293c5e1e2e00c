//! `bench-dispatch`: how many work orders one dispatch replica creates and assigns per
//! second, beside what PostgreSQL itself commits on this machine in the same run.
//!
//! Starts a durable PostgreSQL (fsync and synchronous commit on, as in production) and a
//! fresh nats-server per scenario. Each scenario fills the stream with classified complaints
//! first (realistic texts through the real classifier, every poster distinct so each opens
//! its own work order), then starts dispatch in this process and times it from its first
//! fetch until every work order exists and has an assignee.
//!
//! - single-row commits: one INSERT per transaction from `--concurrency` tasks over
//!   `--connections` connections — the bound for any design that commits per work order;
//! - batched inserts: 256 rows per multi-row INSERT — near what the disk allows;
//! - dispatch with consumer concurrency 1 (so each transaction places one complaint), and
//!   with `--concurrency` (the batcher groups what arrives together).
//!
//! Run with `cargo run --release -p closedloop-e2e --bin bench-dispatch`.

use closedloop_runtime::config::NatsConnectArgs;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Parser;
use closedloop_classify::engine::{self, Contact};
use closedloop_classify::model::TextModels;
use closedloop_classify::rules::Rules;
use closedloop_e2e::bench::{self, Mix, Workload, metric_sum, nats_version, rate, scrape, table};
use closedloop_e2e::free_port;
use closedloop_e2e::servers::{NatsServer, Postgres};
use closedloop_proto::v1::ComplaintClassified;
use closedloop_runtime::bus::{self, Bus, OutgoingEvent};
use sqlx::{PgPool, Row};
use tokio_util::sync::CancellationToken;

const TENANT: &str = "bench";

#[derive(Debug, Parser)]
struct Args {
    /// Complaints for the batched scenarios and rows for the raw baselines.
    #[arg(long, default_value_t = 20_000)]
    complaints: usize,
    /// Complaints for the one-per-transaction scenario (it is slow).
    #[arg(long, default_value_t = 2_000)]
    unbatched_complaints: usize,
    /// Events dispatch handles at once (its `--consumer-concurrency`), and concurrent
    /// writers in the single-row baseline.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Database connections, for dispatch and the baselines alike.
    #[arg(long, default_value_t = 10)]
    connections: u32,
    /// Online agents per team (each takes up to 1,000 open work orders).
    #[arg(long, default_value_t = 40)]
    agents_per_team: usize,
}

/// Classified-complaint events as classify would publish them.
fn classified_events(n: usize) -> anyhow::Result<Vec<OutgoingEvent>> {
    let rules = Rules::builtin()?;
    let models = TextModels::builtin()?;
    let mix = Mix {
        duplicates: 0.0,
        follow_ups: 0.0,
        distinct_posters: true,
    };
    let mut workload = Workload::new("bench", TENANT, 42, mix);
    let now = chrono::Utc::now();
    let mut events = Vec::with_capacity(n);
    while events.len() < n {
        let (_, submission) = workload.next_steady();
        let complaint = closedloop_ingest::validate::validate_submission(
            &submission,
            TENANT,
            &Default::default(),
            now,
            "complaint",
        )
        .map_err(|violations| anyhow::anyhow!("generated an invalid complaint: {violations:?}"))?;
        let classification = engine::classify(
            &rules,
            Some(&models),
            &Contact {
                text: &complaint.text,
                channel: complaint.channel(),
                poster: complaint.poster.as_ref(),
                region_hint: &complaint.region_hint,
            },
        );
        // Praise and noise open no work order; leave them out so every event counts.
        if !closedloop_dispatch::store::needs_work_order(classification.intent()) {
            continue;
        }
        events.push(OutgoingEvent::new(
            bus::COMPLAINT_CLASSIFIED,
            TENANT,
            format!("classified:{}", complaint.complaint_id),
            &ComplaintClassified {
                complaint: Some(complaint),
                classification: Some(classification),
            },
        ));
    }
    Ok(events)
}

/// What one dispatch run measured.
struct DispatchRun {
    complaints: usize,
    assigned_per_sec: f64,
    published_per_sec: f64,
    mean_batch: f64,
}

async fn counts(pool: &PgPool) -> anyhow::Result<(i64, i64, i64)> {
    let row = sqlx::query(
        "SELECT (SELECT count(*) FROM dispatch.work_orders),
                (SELECT count(*) FROM dispatch.work_orders WHERE assignee <> ''),
                (SELECT events FROM dispatch.unpublished_events)",
    )
    .fetch_one(pool)
    .await?;
    Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?))
}

async fn batch_figures(metrics: SocketAddr) -> anyhow::Result<(f64, f64)> {
    let text = scrape(metrics).await?;
    Ok((
        metric_sum(&text, "closedloop_dispatch_placement_batch_size_sum"),
        metric_sum(&text, "closedloop_dispatch_placement_batch_size_count"),
    ))
}

async fn run_dispatch(
    pg: &Postgres,
    events: &[OutgoingEvent],
    concurrency: usize,
    args: &Args,
    policy: &std::path::Path,
    batches_so_far: &mut (f64, f64),
) -> anyhow::Result<DispatchRun> {
    let nats = NatsServer::start()?;
    let database = pg.create_database().await?;
    let cancel = CancellationToken::new();
    let bus = Bus::connect(&NatsConnectArgs::url(nats.url()), "bench", &cancel).await?;
    bus.provision(&closedloop_e2e::servers::harness_streams()).await?;
    for window in events.chunks(500) {
        for published in bus.publish_all(window.to_vec()).await {
            published?;
        }
    }

    let config = <closedloop_dispatch::Config as clap::Parser>::try_parse_from([
        "bench",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--nats-url",
        &nats.url(),
        "--database-url",
        &database,
        "--database-max-connections",
        &args.connections.to_string(),
        "--consumer-concurrency",
        &concurrency.to_string(),
        "--policy",
        &policy.display().to_string(),
    ])?;
    let dispatch = closedloop_dispatch::Dispatch::build(config, &cancel).await?;
    let metrics = dispatch.metrics_addr()?;
    let observer = bench::pool(&database, 1).await?;
    let expected = events.len() as i64;

    let started = Instant::now();
    let running = tokio::spawn(dispatch.run(cancel.clone()));
    let mut assigned_at = None;
    let mut last_report = Instant::now();
    loop {
        let (created, assigned, unpublished) = counts(&observer).await?;
        if assigned_at.is_none() && assigned >= expected {
            assigned_at = Some(started.elapsed());
        }
        if assigned_at.is_some() && created >= expected && unpublished == 0 {
            break;
        }
        if running.is_finished() {
            anyhow::bail!("dispatch stopped before placing every complaint");
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            eprintln!(
                "  {:>6.1}s  created {created}/{expected}  assigned {assigned}  unpublished events {unpublished}",
                started.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
        if started.elapsed() > Duration::from_secs(600) {
            anyhow::bail!("dispatch placed {assigned} of {expected} in 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let published_after = started.elapsed();
    // The histogram lives in this process's registry, so it holds earlier scenarios too.
    let (batch_sum, batches) = batch_figures(metrics).await?;
    let (batch_sum_before, batches_before) = std::mem::replace(batches_so_far, (batch_sum, batches));
    cancel.cancel();
    running.await??;
    observer.close().await;
    let assigned_after = assigned_at.unwrap_or(published_after);
    Ok(DispatchRun {
        complaints: events.len(),
        assigned_per_sec: rate(events.len(), assigned_after),
        published_per_sec: rate(events.len(), published_after),
        mean_batch: (batch_sum - batch_sum_before) / (batches - batches_before).max(1.0),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Warnings only, so a failing batch shows without drowning the figures.
    let _telemetry = closedloop_runtime::telemetry::init(
        "bench-dispatch",
        &closedloop_runtime::config::TelemetryArgs {
            log_format: closedloop_runtime::config::LogFormat::Pretty,
            log_filter: std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            otlp_endpoint: None,
        },
    )?;
    let scratch = tempfile::Builder::new().prefix("bench-dispatch-").tempdir()?;
    // PostgreSQL's directory is handed to its own user, who removes it when done.
    let pg_dir = tempfile::Builder::new()
        .prefix("bench-dispatch-pg-")
        .tempdir()?
        .keep();
    let pg = Postgres::start_durable_in(&pg_dir, free_port()?)?;
    let policy = scratch.path().join("policy.json");
    std::fs::write(
        &policy,
        bench::staffed_policy(TENANT, args.agents_per_team, false)?,
    )?;

    eprintln!("classifying {} generated complaints", args.complaints);
    let events = classified_events(args.complaints)?;

    eprintln!(
        "raw: {} single-row commits ({} writers, {} connections)",
        args.complaints, args.concurrency, args.connections
    );
    let single = bench::single_row_commits(
        &pg.create_database().await?,
        args.complaints,
        args.concurrency,
        args.connections,
    )
    .await?;
    eprintln!("raw: {} rows in multi-row inserts of 256", args.complaints);
    let batched =
        bench::batched_inserts(&pg.create_database().await?, args.complaints, args.connections).await?;

    let unbatched_events = &events[..args.unbatched_complaints.min(events.len())];
    eprintln!(
        "dispatch, consumer concurrency 1: {} complaints",
        unbatched_events.len()
    );
    let mut batches_so_far = (0.0, 0.0);
    let one_by_one = run_dispatch(&pg, unbatched_events, 1, &args, &policy, &mut batches_so_far).await?;
    eprintln!(
        "dispatch, consumer concurrency {}: {} complaints",
        args.concurrency,
        events.len()
    );
    let grouped = run_dispatch(
        &pg,
        &events,
        args.concurrency,
        &args,
        &policy,
        &mut batches_so_far,
    )
    .await?;

    println!();
    println!(
        "one dispatch replica on {} cores; PostgreSQL durable (fsync, synchronous commit); {}",
        std::thread::available_parallelism()?,
        nats_version()
    );
    let mut rows = vec![
        vec![
            format!("raw: single-row commits ({} writers)", args.concurrency),
            args.complaints.to_string(),
            format!("{single:.0}"),
            "-".into(),
            "-".into(),
            "1.00".into(),
        ],
        vec![
            "raw: multi-row inserts of 256".into(),
            args.complaints.to_string(),
            format!("{batched:.0}"),
            "-".into(),
            "256".into(),
            format!("{:.2}", batched / single),
        ],
    ];
    for (name, run) in [
        ("dispatch, consumer concurrency 1".to_owned(), &one_by_one),
        (
            format!("dispatch, consumer concurrency {}", args.concurrency),
            &grouped,
        ),
    ] {
        rows.push(vec![
            name,
            run.complaints.to_string(),
            format!("{:.0}", run.assigned_per_sec),
            format!("{:.0}", run.published_per_sec),
            format!("{:.1}", run.mean_batch),
            format!("{:.2}", run.assigned_per_sec / single),
        ]);
    }
    println!(
        "{}",
        table(
            &[
                "scenario",
                "count",
                "created+assigned/s",
                "events published/s",
                "per commit",
                "vs single-row",
            ],
            &rows
        )
    );
    println!(
        "(raw rows: rows/s. Dispatch writes per work order a work order, two history rows \
         carrying its events, and an arrival count, and reads the directory and open work.)"
    );
    Ok(())
}
