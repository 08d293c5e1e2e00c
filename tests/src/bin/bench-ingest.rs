//! `bench-ingest`: how fast ingest accepts complaints, beside what JetStream itself takes
//! on this machine in the same run. Starts its own nats-server; prints a table.
//!
//! - raw: JetStream publishes of the same encoded events (same headers, same size) from
//!   `--batch-callers` publishers, each with acks pipelined `--window` deep — the bound the
//!   batched scenario cannot beat;
//! - single: `SubmitComplaint` from `--concurrency` concurrent callers;
//! - batched: `SubmitComplaints` of `--batch` complaints from `--batch-callers` callers.
//!
//! Run with `cargo run --release -p closedloop-e2e --bin bench-ingest`. Client and server
//! share this machine's cores, so every figure includes the caller's own cost.

use closedloop_runtime::config::NatsConnectArgs;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use closedloop_e2e::bench::{nats_version, rate};
use closedloop_e2e::servers::NatsServer;
use closedloop_e2e::system::authed;
use closedloop_proto::v1::ingest_service_client::IngestServiceClient;
use closedloop_proto::v1::{
    Channel, ComplaintSubmission, Poster, SubmissionOutcome, SubmitComplaintRequest, SubmitComplaintsRequest,
};
use closedloop_runtime::auth::hash_token;
use closedloop_runtime::bus::{self, Bus, OutgoingEvent};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
struct Args {
    /// Complaints per scenario.
    #[arg(long, default_value_t = 20_000)]
    complaints: usize,
    /// Concurrent callers of SubmitComplaint.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Complaints per SubmitComplaints call.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Concurrent callers of SubmitComplaints.
    #[arg(long, default_value_t = 4)]
    batch_callers: usize,
    /// Publishes in flight for the raw baseline.
    #[arg(long, default_value_t = 500)]
    window: usize,
}

const TEXTS: [&str; 4] = [
    "家里宽带又断网了，已经三天了还没解决，客服电话一直打不通！",
    "请问这个月的话费账单怎么查？感觉比上个月多扣了二十块。",
    "寬頻斷網了，請盡快處理，謝謝",
    "My fibre connection drops every evening around 8pm, please fix it.",
];

fn submission(run: &str, i: usize) -> ComplaintSubmission {
    ComplaintSubmission {
        channel: Channel::WeiboPost as i32,
        channel_message_id: format!("{run}-{i}"),
        poster: Some(Poster {
            poster_id: format!("uid-{}", i % 5000),
            followers: (i % 997) as i64,
            ..Default::default()
        }),
        text: TEXTS[i % TEXTS.len()].to_owned(),
        locale: "zh-CN".into(),
        ..Default::default()
    }
}

/// `publishers` concurrent publishers, each sending windows of `window` events and awaiting
/// their acks: the same concurrency and batch size as the batched scenario.
async fn raw_baseline(bus: &Bus, n: usize, window: usize, publishers: usize) -> anyhow::Result<f64> {
    let now = chrono::Utc::now();
    let events: Vec<OutgoingEvent> = (0..n)
        .map(|i| {
            let complaint = closedloop_ingest::validate::validate_submission(
                &submission("raw", i),
                "bench",
                &Default::default(),
                now,
                "c",
            )
            .map_err(|v| anyhow::anyhow!("{v:?}"))?;
            Ok(OutgoingEvent::new(
                bus::COMPLAINT_RECEIVED,
                "bench",
                format!("received:{}", complaint.complaint_id),
                &closedloop_proto::v1::ComplaintReceived {
                    complaint: Some(complaint),
                },
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    let windows: Vec<Vec<OutgoingEvent>> = events.chunks(window).map(<[OutgoingEvent]>::to_vec).collect();
    let queue = Arc::new(std::sync::Mutex::new(windows));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..publishers.max(1) {
        let queue = queue.clone();
        let bus = bus.clone();
        tasks.spawn(async move {
            loop {
                let next = queue.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.pop();
                let Some(window) = next else { return anyhow::Ok(()) };
                for result in bus.publish_all(window).await {
                    result?;
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(rate(n, started.elapsed()))
}

async fn single(
    client: IngestServiceClient<tonic::transport::Channel>,
    token: &str,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<f64> {
    let permits = Arc::new(Semaphore::new(concurrency));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let permit = permits.clone().acquire_owned().await?;
        let mut client = client.clone();
        let request = authed(
            token,
            SubmitComplaintRequest {
                complaint: Some(submission("single", i)),
            },
        );
        tasks.spawn(async move {
            let response = client.submit_complaint(request).await;
            drop(permit);
            response.map(|_| ())
        });
        while let Some(done) = tasks.try_join_next() {
            done??;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(rate(n, started.elapsed()))
}

async fn batched(
    client: IngestServiceClient<tonic::transport::Channel>,
    token: &str,
    n: usize,
    batch: usize,
    callers: usize,
) -> anyhow::Result<f64> {
    let permits = Arc::new(Semaphore::new(callers));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for first in (0..n).step_by(batch) {
        let permit = permits.clone().acquire_owned().await?;
        let mut client = client.clone();
        let complaints = (first..(first + batch).min(n))
            .map(|i| submission("batch", i))
            .collect();
        let request = authed(token, SubmitComplaintsRequest { complaints });
        tasks.spawn(async move {
            let response = client.submit_complaints(request).await;
            drop(permit);
            let results = response?.into_inner().results;
            let accepted = results
                .iter()
                .filter(|r| r.outcome() == SubmissionOutcome::Accepted)
                .count();
            anyhow::ensure!(
                accepted == results.len(),
                "{} of {} accepted",
                accepted,
                results.len()
            );
            Ok(())
        });
        while let Some(done) = tasks.try_join_next() {
            done??;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(rate(n, started.elapsed()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let nats = NatsServer::start()?;
    let cancel = CancellationToken::new();
    let bus = Bus::connect(&NatsConnectArgs::url(nats.url()), "bench", &cancel).await?;
    let settings = closedloop_e2e::servers::harness_streams();
    bus.provision(&settings).await?;

    eprintln!(
        "raw JetStream publishes: {} events, windows of {}, {} publishers",
        args.complaints, args.window, args.batch_callers
    );
    let raw = raw_baseline(&bus, args.complaints, args.window, args.batch_callers).await?;

    let token = "bench-token";
    let config = closedloop_ingest::Config::try_parse_from([
        "bench",
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--nats-url",
        &nats.url(),
        "--auth-tokens",
        &format!("bench:gateway:{}", hash_token(token)),
        "--max-batch",
        &args.batch.to_string(),
        "--max-request-bytes",
        &(64 * 1024 * 1024).to_string(),
    ])?;
    let ingest = closedloop_ingest::Ingest::build(config, &cancel).await?;
    let addr = ingest.grpc_addr()?;
    let serving = tokio::spawn(ingest.run(cancel.clone()));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await
        .context("connecting to ingest")?;
    let client = IngestServiceClient::new(channel).max_encoding_message_size(64 * 1024 * 1024);

    eprintln!(
        "SubmitComplaint: {} complaints, {} callers",
        args.complaints, args.concurrency
    );
    let single_rate = single(client.clone(), token, args.complaints, args.concurrency).await?;
    eprintln!(
        "SubmitComplaints: {} complaints, batches of {}, {} callers",
        args.complaints, args.batch, args.batch_callers
    );
    let batched_rate = batched(client, token, args.complaints, args.batch, args.batch_callers).await?;
    cancel.cancel();
    serving.await??;

    println!();
    println!(
        "ingest on {} cores, nats-server {}",
        std::thread::available_parallelism()?,
        nats_version()
    );
    println!("{:<44} {:>12} {:>10}", "scenario", "complaints/s", "vs raw");
    println!(
        "{:<44} {:>12.0} {:>10}",
        format!(
            "raw JetStream publish ({} x window {})",
            args.batch_callers, args.window
        ),
        raw,
        "1.00"
    );
    println!(
        "{:<44} {:>12.0} {:>10.2}",
        format!("SubmitComplaint ({} callers)", args.concurrency),
        single_rate,
        single_rate / raw
    );
    println!(
        "{:<44} {:>12.0} {:>10.2}",
        format!(
            "SubmitComplaints (batch {}, {} callers)",
            args.batch, args.batch_callers
        ),
        batched_rate,
        batched_rate / raw
    );
    Ok(())
}
