//! Grouping what arrived together: tasks that write many requests in one transaction take
//! the first request to arrive and whatever else is already waiting ([`gather`]). With a
//! linger they also wait a little for more, trading latency for fewer, larger transactions
//! (each execution is planned, so at moderate rates that saves CPU).
//!
//! [`Batcher`] is that task: callers submit one item each and await their own answer, the
//! task writes what arrived together with a [`BatchWrite`], and when a write fails because
//! of what an item holds, it writes the items one by one so that only the bad item fails.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

/// `first` and what is already queued behind it, up to `max` in all.
fn with_waiting<T>(first: T, queue: &mut mpsc::Receiver<T>, max: usize) -> Vec<T> {
    let mut batch = vec![first];
    take_waiting(&mut batch, queue, max);
    batch
}

/// `first` and what is already queued behind it, up to `max` in all, after waiting up to
/// `linger` after `first` for the batch to fill; it returns as soon as the batch holds
/// `max` or the queue closes. A zero linger waits not at all.
pub async fn gather<T>(first: T, queue: &mut mpsc::Receiver<T>, max: usize, linger: Duration) -> Vec<T> {
    let mut batch = with_waiting(first, queue, max);
    if linger.is_zero() {
        return batch;
    }
    let deadline = tokio::time::Instant::now() + linger;
    while batch.len() < max {
        match tokio::time::timeout_at(deadline, queue.recv()).await {
            Ok(Some(next)) => {
                batch.push(next);
                // What else is queued comes without a timer per request.
                take_waiting(&mut batch, queue, max);
            }
            Ok(None) | Err(_) => break,
        }
    }
    batch
}

/// Why a batched write failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Something an item holds was refused (a value the store will never take): written
    /// alone, the other items may succeed.
    #[error("{0:#}")]
    Data(anyhow::Error),
    /// The store failed (unreachable, restarting): every item fails alike.
    #[error("{0:#}")]
    Store(anyhow::Error),
}

/// Writes items together: one answer per item, in order.
pub trait BatchWrite: Send + 'static {
    type Item: Send + Sync + 'static;
    type Answer: Send + 'static;
    fn write(
        &mut self,
        items: &[Self::Item],
    ) -> impl Future<Output = Result<Vec<Self::Answer>, WriteError>> + Send;
}

/// Why a submitted item has no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BatchError {
    /// Its write failed; for [`WriteError::Data`], written alone.
    #[error("{0:#}")]
    Failed(Arc<WriteError>),
    #[error("the batching task has stopped")]
    Stopped,
}

impl BatchError {
    /// Whether the item itself was refused, rather than the store failing.
    pub fn is_data(&self) -> bool {
        matches!(self, BatchError::Failed(error) if matches!(**error, WriteError::Data(_)))
    }
}

type Submission<W> = (
    <W as BatchWrite>::Item,
    oneshot::Sender<Result<<W as BatchWrite>::Answer, BatchError>>,
);

/// Hands items to the writing task; cheap to clone.
pub struct Batcher<W: BatchWrite> {
    queue: mpsc::Sender<Submission<W>>,
}

impl<W: BatchWrite> Clone for Batcher<W> {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
        }
    }
}

impl<W: BatchWrite> Batcher<W> {
    /// Starts the writing task; it ends when every `Batcher` clone is dropped, after
    /// writing what it holds. Each write takes up to `max` items: the first and what
    /// arrives within `linger` of it.
    pub fn spawn(mut writer: W, max: usize, linger: Duration) -> (Self, tokio::task::JoinHandle<()>) {
        let max = max.max(1);
        let (queue, mut submissions) = mpsc::channel::<Submission<W>>(max * 4);
        let task = tokio::spawn(async move {
            while let Some(first) = submissions.recv().await {
                let batch = gather(first, &mut submissions, max, linger).await;
                let (items, replies): (Vec<W::Item>, Vec<_>) = batch.into_iter().unzip();
                match write_all(&mut writer, &items).await {
                    Ok(answers) => {
                        // A caller that has gone away (shutdown) loses nothing: the write stands.
                        for (reply, answer) in replies.into_iter().zip(answers) {
                            let _ = reply.send(Ok(answer));
                        }
                    }
                    Err(WriteError::Data(error)) if items.len() > 1 => {
                        tracing::warn!(
                            error = format!("{error:#}"),
                            size = items.len(),
                            "a batch was refused; writing its items one by one"
                        );
                        for (item, reply) in items.iter().zip(replies) {
                            let alone = write_all(&mut writer, std::slice::from_ref(item))
                                .await
                                .map(|mut answers| answers.remove(0))
                                .map_err(|error| BatchError::Failed(Arc::new(error)));
                            let _ = reply.send(alone);
                        }
                    }
                    Err(error) => {
                        let error = BatchError::Failed(Arc::new(error));
                        for reply in replies {
                            let _ = reply.send(Err(error.clone()));
                        }
                    }
                }
            }
        });
        (Self { queue }, task)
    }

    /// Writes `item` with whatever else is waiting, and returns its answer.
    pub async fn submit(&self, item: W::Item) -> Result<W::Answer, BatchError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send((item, reply))
            .await
            .map_err(|_| BatchError::Stopped)?;
        answer.await.map_err(|_| BatchError::Stopped)?
    }
}

/// One write, checked to answer every item.
async fn write_all<W: BatchWrite>(writer: &mut W, items: &[W::Item]) -> Result<Vec<W::Answer>, WriteError> {
    let answers = writer.write(items).await?;
    if answers.len() != items.len() {
        return Err(WriteError::Store(anyhow::anyhow!(
            "a batch of {} got {} answers",
            items.len(),
            answers.len()
        )));
    }
    Ok(answers)
}

/// Moves what is already queued into `batch` until it holds `max`.
fn take_waiting<T>(batch: &mut Vec<T>, queue: &mut mpsc::Receiver<T>, max: usize) {
    while batch.len() < max {
        match queue.try_recv() {
            Ok(next) => batch.push(next),
            Err(_) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn gather_waits_the_linger_for_late_requests() {
        let (sender, mut queue) = mpsc::channel(10);
        let late = tokio::spawn({
            let sender = sender.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                sender.send(2).await.expect("open");
                tokio::time::sleep(Duration::from_millis(10)).await;
                sender.send(3).await.expect("open");
            }
        });
        sender.send(1).await.expect("open");
        let first = queue.recv().await.expect("one");
        let started = tokio::time::Instant::now();
        let batch = gather(first, &mut queue, 10, Duration::from_millis(3)).await;
        assert_eq!(batch, [1, 2], "2 came within the linger, 3 after it");
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(3),
            "waited the whole linger"
        );
        late.await.expect("sender");
        assert_eq!(queue.recv().await, Some(3), "left for the next batch");
    }

    #[tokio::test(start_paused = true)]
    async fn gather_returns_when_full_or_without_a_linger() {
        let (sender, mut queue) = mpsc::channel(10);
        for n in 1..=4 {
            sender.send(n).await.expect("open");
        }
        let first = queue.recv().await.expect("one");
        let started = tokio::time::Instant::now();
        let full = gather(first, &mut queue, 3, Duration::from_secs(1)).await;
        assert_eq!(full, [1, 2, 3]);
        assert_eq!(started.elapsed(), Duration::ZERO, "a full batch does not wait");
        let first = queue.recv().await.expect("one");
        assert_eq!(gather(first, &mut queue, 3, Duration::ZERO).await, [4]);
        assert_eq!(started.elapsed(), Duration::ZERO, "no linger, no wait");
    }

    /// Doubles numbers; refuses a batch holding a negative one as a data error, and
    /// everything while `down`.
    struct Doubler {
        down: bool,
        seen: std::sync::Arc<std::sync::Mutex<Vec<Vec<i64>>>>,
    }

    impl BatchWrite for Doubler {
        type Item = i64;
        type Answer = i64;
        async fn write(&mut self, items: &[i64]) -> Result<Vec<i64>, WriteError> {
            if let Ok(mut seen) = self.seen.lock() {
                seen.push(items.to_vec());
            }
            if self.down {
                return Err(WriteError::Store(anyhow::anyhow!("store away")));
            }
            if items.iter().any(|n| *n < 0) {
                return Err(WriteError::Data(anyhow::anyhow!("negative")));
            }
            Ok(items.iter().map(|n| n * 2).collect())
        }
    }

    async fn submit_together(batcher: &Batcher<Doubler>, items: &[i64]) -> Vec<Result<i64, BatchError>> {
        futures::future::join_all(items.iter().map(|n| batcher.submit(*n))).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_batch_is_written_item_by_item_and_only_the_bad_item_fails() {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let writer = Doubler {
            down: false,
            seen: seen.clone(),
        };
        let (batcher, task) = Batcher::spawn(writer, 10, Duration::from_millis(5));
        let answers = submit_together(&batcher, &[1, -2, 3]).await;
        assert_eq!(answers[0].as_ref().ok(), Some(&2));
        assert!(answers[1].as_ref().is_err_and(BatchError::is_data));
        assert_eq!(answers[2].as_ref().ok(), Some(&6));
        drop(batcher);
        task.await.expect("the task ends with its last handle");
        let seen = seen.lock().expect("not poisoned").clone();
        assert_eq!(seen, [vec![1, -2, 3], vec![1], vec![-2], vec![3]]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_failure_fails_the_batch_without_splitting_it() {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let writer = Doubler {
            down: true,
            seen: seen.clone(),
        };
        let (batcher, _task) = Batcher::spawn(writer, 10, Duration::from_millis(5));
        let answers = submit_together(&batcher, &[1, 2]).await;
        assert!(answers.iter().all(|a| a.as_ref().is_err_and(|e| !e.is_data())));
        assert_eq!(
            seen.lock().expect("not poisoned").len(),
            1,
            "one write, not split"
        );
    }

    #[tokio::test]
    async fn takes_what_waits_up_to_the_limit_and_leaves_the_rest() {
        let (sender, mut queue) = mpsc::channel(10);
        for n in 1..=5 {
            sender.send(n).await.expect("open");
        }
        let first = queue.recv().await.expect("one");
        assert_eq!(with_waiting(first, &mut queue, 3), [1, 2, 3]);
        let first = queue.recv().await.expect("one");
        assert_eq!(
            with_waiting(first, &mut queue, 3),
            [4, 5],
            "nothing more was waiting"
        );
    }
}
