//! The delivery log, written in batches. Every delivery in flight registers and leases
//! itself before calling a gateway and records the outcome after; one task takes whatever
//! requests are waiting and writes them in one transaction, so many deliveries share a
//! commit where each used to wait on its own two. Status updates ask it what the customer
//! was last told, answered for the whole batch by one query.

use std::time::Duration;

use closedloop_proto::v1::{Delivery, DeliveryState};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::store::{self, Claim, ClaimRequest, RecordRequest, StoreError};

/// Most requests written in one transaction.
const MAX_BATCH: usize = 256;

/// How long each transaction of the log took, and how many requests it served: with the
/// delivery steps' timings, whether deliveries wait on the log or on the database.
struct LedgerMetrics {
    write_seconds: prometheus_client::metrics::histogram::Histogram,
    batch_size: prometheus_client::metrics::histogram::Histogram,
}

static METRICS: std::sync::LazyLock<LedgerMetrics> = std::sync::LazyLock::new(|| {
    let found = LedgerMetrics {
        write_seconds: closedloop_runtime::metrics::seconds_histogram(),
        batch_size: closedloop_runtime::metrics::batch_size_histogram(),
    };
    closedloop_runtime::metrics::register(
        "notify_ledger_write_seconds",
        "Time of one delivery-log transaction",
        found.write_seconds.clone(),
    );
    closedloop_runtime::metrics::register(
        "notify_ledger_batch_size",
        "Requests served by one delivery-log transaction",
        found.batch_size.clone(),
    );
    found
});

enum Job {
    Claim(ClaimRequest, oneshot::Sender<Result<Claim, String>>),
    Record(RecordRequest, oneshot::Sender<Result<Delivery, String>>),
    Progress(String, oneshot::Sender<Result<i64, String>>),
}

/// Hands requests to the writing task; cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    queue: mpsc::Sender<Job>,
}

impl Ledger {
    /// Starts the writing task; it ends when every `Ledger` clone is dropped. Each
    /// transaction serves the requests that arrive within `linger` of its first.
    pub fn spawn(pool: PgPool, lease: Duration, linger: Duration) -> (Self, tokio::task::JoinHandle<()>) {
        let (queue, mut jobs) = mpsc::channel::<Job>(MAX_BATCH * 4);
        let task = tokio::spawn(async move {
            while let Some(first) = jobs.recv().await {
                let batch = closedloop_runtime::batch::gather(first, &mut jobs, MAX_BATCH, linger).await;
                METRICS.batch_size.observe(batch.len() as f64);
                let started = std::time::Instant::now();
                write(&pool, lease, batch).await;
                METRICS.write_seconds.observe(started.elapsed().as_secs_f64());
            }
        });
        (Self { queue }, task)
    }

    /// Registers `delivery` (once per id) and leases it to the caller if it may send.
    pub async fn claim(&self, delivery: Delivery, only_if_new: bool) -> Result<Claim, StoreError> {
        let id = parse_id(&delivery.delivery_id)?;
        let (reply, answer) = oneshot::channel();
        self.send(Job::Claim(
            ClaimRequest {
                id,
                delivery,
                only_if_new,
            },
            reply,
        ))
        .await?;
        answer
            .await
            .map_err(|_| StoreError::Batch("the delivery log dropped the request".into()))?
            .map_err(StoreError::Batch)
    }

    /// Records an attempt's outcome, releases the lease and, with `progress`, advances what
    /// the customer knows of the work order. Returns the delivery as logged.
    pub async fn record(
        &self,
        delivery_id: &str,
        state: DeliveryState,
        error: &str,
        progress: Option<(&str, i64)>,
    ) -> Result<Delivery, StoreError> {
        let request = RecordRequest {
            id: parse_id(delivery_id)?,
            state,
            error: error.to_owned(),
            progress: progress.map(|(w, v)| (w.to_owned(), v)),
        };
        let (reply, answer) = oneshot::channel();
        self.send(Job::Record(request, reply)).await?;
        answer
            .await
            .map_err(|_| StoreError::Batch("the delivery log dropped the request".into()))?
            .map_err(StoreError::Batch)
    }

    /// The newest version of `work_order_id` the customer has been told about (0 if none).
    pub async fn customer_progress(&self, work_order_id: &str) -> Result<i64, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Job::Progress(work_order_id.to_owned(), reply)).await?;
        answer
            .await
            .map_err(|_| StoreError::Batch("the delivery log dropped the request".into()))?
            .map_err(StoreError::Batch)
    }

    async fn send(&self, job: Job) -> Result<(), StoreError> {
        self.queue
            .send(job)
            .await
            .map_err(|_| StoreError::Batch("the delivery log has stopped".into()))
    }
}

fn parse_id(delivery_id: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(delivery_id).map_err(|_| StoreError::BadId(delivery_id.to_owned()))
}

/// Writes one batch in one transaction and answers every request; on failure every request
/// gets the error (its delivery is retried by redelivery, as any database failure is).
async fn write(pool: &PgPool, lease: Duration, batch: Vec<Job>) {
    let mut claims = Vec::new();
    let mut claim_replies = Vec::new();
    let mut records = Vec::new();
    let mut record_replies = Vec::new();
    let mut progress_asked = Vec::new();
    let mut progress_replies = Vec::new();
    for job in batch {
        match job {
            Job::Claim(request, reply) => {
                claims.push(request);
                claim_replies.push(reply);
            }
            Job::Record(request, reply) => {
                records.push(request);
                record_replies.push(reply);
            }
            Job::Progress(work_order_id, reply) => {
                progress_asked.push(work_order_id);
                progress_replies.push(reply);
            }
        }
    }
    let written = async {
        let mut tx = pool.begin().await?;
        let progress = if progress_asked.is_empty() {
            Default::default()
        } else {
            store::customer_progress(&mut tx, &progress_asked).await?
        };
        let claimed = if claims.is_empty() {
            Vec::new()
        } else {
            store::claim_batch(&mut tx, &claims, lease).await?
        };
        let recorded = if records.is_empty() {
            Vec::new()
        } else {
            store::record_batch(&mut tx, &records).await?
        };
        tx.commit().await?;
        Ok::<_, StoreError>((progress, claimed, recorded))
    }
    .await;
    match written {
        Ok((progress, claimed, recorded)) => {
            for (reply, work_order_id) in progress_replies.into_iter().zip(&progress_asked) {
                let _ = reply.send(Ok(progress.get(work_order_id).copied().unwrap_or(0)));
            }
            // A caller that has gone away (shutdown) loses nothing: the commit stands.
            for (reply, claim) in claim_replies.into_iter().zip(claimed) {
                let _ = reply.send(Ok(claim));
            }
            for ((reply, request), delivery) in record_replies.into_iter().zip(&records).zip(recorded) {
                let _ =
                    reply.send(delivery.ok_or_else(|| format!("delivery {} is not in the log", request.id)));
            }
        }
        Err(error) => {
            let message = error.to_string();
            tracing::warn!(error = %message, "writing to the delivery log failed; the deliveries will be retried");
            for reply in claim_replies {
                let _ = reply.send(Err(message.clone()));
            }
            for reply in record_replies {
                let _ = reply.send(Err(message.clone()));
            }
            for reply in progress_replies {
                let _ = reply.send(Err(message.clone()));
            }
        }
    }
}
