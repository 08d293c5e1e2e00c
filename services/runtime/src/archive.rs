//! Keeping the hot tables small: finished records older than the retention age move, a
//! batch per transaction, to archive tables the API still reads on request. Each service
//! says how to move one batch of its tables; this runs it every interval.
//!
//! Several replicas may run it at once: each batch claims its rows with
//! `FOR UPDATE SKIP LOCKED`, so a row moves once.

use std::future::Future;
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio_util::sync::CancellationToken;

use crate::config::{ArchiveArgs, Retention};

/// Records moved per transaction: small enough to hold few locks briefly, large enough that
/// a year's backlog after turning archiving on drains in minutes.
pub const BATCH: i64 = 1_000;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ArchiveLabels {
    records: &'static str,
}

static ARCHIVED: LazyLock<Family<ArchiveLabels, Counter>> = LazyLock::new(|| {
    crate::metrics::register(
        "archived_records",
        "Records moved from the hot tables to the archive tables",
        Family::default(),
    )
});

/// Every `args.archive_interval` until `cancel`, moves what finished before the retention
/// age: `move_batch(cutoff, BATCH)` moves up to `BATCH` of `records` finished before
/// `cutoff` and says how many it moved. A failed round is logged and retried next interval.
pub async fn run<F, Fut>(
    records: &'static str,
    args: ArchiveArgs,
    mut move_batch: F,
    cancel: CancellationToken,
) where
    F: FnMut(DateTime<Utc>, i64) -> Fut,
    Fut: Future<Output = Result<u64, sqlx::Error>>,
{
    let Retention::After(age) = args.archive_after else {
        return;
    };
    let archived = ARCHIVED.get_or_create(&ArchiveLabels { records }).clone();
    loop {
        let cutoff = Utc::now() - age;
        let mut moved = 0;
        let round = loop {
            if cancel.is_cancelled() {
                break Ok(());
            }
            match move_batch(cutoff, BATCH).await {
                Ok(n) => {
                    moved += n;
                    archived.inc_by(n);
                    if n < BATCH as u64 {
                        break Ok(());
                    }
                }
                Err(error) => break Err(error),
            }
        };
        match round {
            Ok(()) if moved > 0 => tracing::info!(records, moved, %cutoff, "archived"),
            Ok(()) => {}
            Err(error) => tracing::warn!(records, moved, %error, "archiving failed; the next round retries"),
        }
        tokio::select! {
            _ = tokio::time::sleep(args.archive_interval) => {}
            _ = cancel.cancelled() => return,
        }
    }
}
