//! The delivery log's writer: a consumer of notify's own `notification.delivered` and
//! `notification.failed` events that writes each outcome into PostgreSQL, many in one
//! transaction. Sending never waits on it: while PostgreSQL is away the events wait in
//! their stream, and the log catches up when it is back.

use closedloop_proto::v1::{Delivery, NotificationDelivered, NotificationFailed};
use closedloop_runtime::batch::{BatchWrite, Batcher, WriteError};
use closedloop_runtime::bus;
use closedloop_runtime::consumer::{self, HandleError, MessageHandler};
use closedloop_runtime::{db, metrics};
use prometheus_client::metrics::histogram::Histogram;
use sqlx::PgPool;

use crate::store::{self, StoreError};

/// Durable consumer of notify's outcome events.
pub const LOG_CONSUMER: &str = "notify-log";
/// Most outcomes written in one transaction.
pub const MAX_BATCH: usize = 256;

/// How long each transaction of the log took, and how many outcomes it wrote.
struct LogMetrics {
    write_seconds: Histogram,
    batch_size: Histogram,
}

static METRICS: std::sync::LazyLock<LogMetrics> = std::sync::LazyLock::new(|| LogMetrics {
    write_seconds: metrics::register(
        "notify_log_write_seconds",
        "Time of one delivery-log transaction",
        metrics::seconds_histogram(),
    ),
    batch_size: metrics::register(
        "notify_log_batch_size",
        "Outcomes written by one delivery-log transaction",
        metrics::batch_size_histogram(),
    ),
});

/// Writes outcomes to the log.
pub struct LogWriter {
    pub pool: PgPool,
}

impl BatchWrite for LogWriter {
    type Item = Delivery;
    type Answer = ();

    async fn write(&mut self, outcomes: &[Delivery]) -> Result<Vec<()>, WriteError> {
        METRICS.batch_size.observe(outcomes.len() as f64);
        let started = std::time::Instant::now();
        let written = store::log_outcomes(&self.pool, outcomes).await;
        METRICS.write_seconds.observe(started.elapsed().as_secs_f64());
        match written {
            Ok(()) => Ok(vec![(); outcomes.len()]),
            Err(StoreError::Database(error)) if db::is_data_error(&error) => {
                Err(WriteError::Data(error.into()))
            }
            Err(StoreError::BadId(id)) => Err(WriteError::Data(anyhow::anyhow!("not a delivery id: {id}"))),
            Err(error) => Err(WriteError::Store(error.into())),
        }
    }
}

/// Logs each outcome event.
pub struct LogHandler {
    pub batcher: Batcher<LogWriter>,
    /// Asked whether PostgreSQL answers when a write fails.
    pub pool: PgPool,
}

/// The delivery an outcome event tells of.
fn told_delivery(message: &async_nats::jetstream::Message) -> Result<Delivery, HandleError> {
    let delivery = if message
        .subject
        .as_str()
        .starts_with(&bus::NOTIFICATION_FAILED.subject(""))
    {
        consumer::decode::<NotificationFailed>(message)?.delivery
    } else {
        consumer::decode::<NotificationDelivered>(message)?.delivery
    };
    delivery.ok_or_else(|| HandleError::reject("an outcome event without its delivery"))
}

impl MessageHandler for LogHandler {
    async fn handle(&self, message: &async_nats::jetstream::Message) -> Result<(), HandleError> {
        let delivery = told_delivery(message)?;
        consumer::check_tenant(message, &delivery.tenant)?;
        self.batcher.submit(delivery).await.map_err(|error| {
            if error.is_data() {
                HandleError::reject(format!("the delivery log refused it: {error}"))
            } else {
                HandleError::retry(error)
            }
        })
    }

    async fn dependencies_ready(&self) -> anyhow::Result<()> {
        Ok(db::ping(&self.pool).await?)
    }
}
