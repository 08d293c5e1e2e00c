//! Grouping what arrived together: tasks that write many requests in one transaction take
//! the first request to arrive and whatever else is already waiting ([`gather`]). With a
//! linger they also wait a little for more, trading latency for fewer, larger transactions
//! (each execution is planned, so at moderate rates that saves CPU).

use std::time::Duration;

use tokio::sync::mpsc;

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
