//! Grouping what arrived together: tasks that write many requests in one transaction take
//! the first request to arrive and whatever else is already waiting, never waiting for more.

use tokio::sync::mpsc;

/// `first` and what is already queued behind it, up to `max` in all.
pub fn with_waiting<T>(first: T, queue: &mut mpsc::Receiver<T>, max: usize) -> Vec<T> {
    let mut batch = vec![first];
    while batch.len() < max {
        match queue.try_recv() {
            Ok(next) => batch.push(next),
            Err(_) => break,
        }
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

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
