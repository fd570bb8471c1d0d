//! Gathering queued work into batches: the request log's writer and the cache's Redis
//! writer both take what is queued, wait a little for more, and send it as one.

use std::time::Duration;

use tokio::sync::mpsc;

/// Wait for at least one item, then take more into `batch` until it holds `max`, the
/// channel is empty once `linger` has passed since the first arrived, or `enough` says
/// the batch must go now. Returns how many items were taken: 0 only when the channel is
/// closed and empty. A closed channel ends the wait at once, so a shutdown never waits
/// on it; with `linger` zero it takes only what is already queued.
pub async fn gather<T>(
    rx: &mut mpsc::Receiver<T>,
    batch: &mut Vec<T>,
    max: usize,
    linger: Duration,
    enough: impl Fn(&[T]) -> bool,
) -> usize {
    let max = max.max(1);
    let first = rx.recv_many(batch, max).await;
    if first == 0 {
        return 0;
    }
    let mut taken = first;
    let deadline = tokio::time::Instant::now() + linger;
    while batch.len() < max && !enough(batch) {
        let room = max - batch.len();
        match tokio::time::timeout_at(deadline, rx.recv_many(batch, room)).await {
            Ok(n) if n > 0 => taken += n,
            Ok(_) | Err(_) => break,
        }
    }
    taken
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn lingers_for_more_then_sends_what_it_has() {
        let (tx, mut rx) = mpsc::channel(16);
        tx.send(1).await.unwrap();
        let later = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            later.send(2).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            later.send(3).await.unwrap();
        });
        let mut batch = Vec::new();
        let n = gather(&mut rx, &mut batch, 8, Duration::from_millis(50), |_| false).await;
        assert_eq!(
            (n, batch.as_slice()),
            (2, &[1, 2][..]),
            "3 came after the linger"
        );
        batch.clear();
        assert_eq!(
            gather(&mut rx, &mut batch, 8, Duration::ZERO, |_| false).await,
            1
        );
        assert_eq!(batch, [3]);
    }

    #[tokio::test(start_paused = true)]
    async fn stops_at_max_or_when_told_and_ends_on_close() {
        let (tx, mut rx) = mpsc::channel(16);
        for i in 0..5 {
            tx.send(i).await.unwrap();
        }
        let mut batch = Vec::new();
        let linger = Duration::from_secs(3600);
        let start = tokio::time::Instant::now();
        assert_eq!(gather(&mut rx, &mut batch, 3, linger, |_| false).await, 3);
        assert_eq!(start.elapsed(), Duration::ZERO, "full: no wait");
        batch.clear();
        // 3 and 4 are queued; a batch holding a 4 goes without lingering.
        let n = gather(&mut rx, &mut batch, 8, linger, |b| b.contains(&4)).await;
        assert_eq!((n, batch.as_slice()), (2, &[3, 4][..]));
        assert_eq!(start.elapsed(), Duration::ZERO, "told: no wait");
        batch.clear();
        tx.send(5).await.unwrap();
        drop(tx);
        // Closed: what is left comes without waiting out the linger, then 0.
        assert_eq!(gather(&mut rx, &mut batch, 8, linger, |_| false).await, 1);
        assert_eq!(start.elapsed(), Duration::ZERO, "closed: no wait");
        assert_eq!(gather(&mut rx, &mut batch, 8, linger, |_| false).await, 0);
    }
}
