//! Gathering queued work into batches: the request log's writer and the cache's Redis
//! writer both take what is queued, wait a little for more, and send it as one
//! ([`gather`]); the Redis limit store and budget counters send what arrives while their
//! previous call is on its way as one call ([`Combiner`]).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

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
    // `recv_many` took everything queued (up to `max`). Without a linger that is the
    // batch: a timer, even one already due, would cost each batch a wake-up of the
    // runtime's driver (a system call, and another turn of its loop) for nothing.
    if linger.is_zero() {
        return first;
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

/// Several jobs sent as one call, one reply per job, in order.
pub trait Batch: Send + Sync + 'static {
    type Job: Send + Sync + 'static;
    type Reply: Send + 'static;
    type Error: Clone + Send + 'static;

    /// Jobs in one call at most; more wait for the next.
    const MAX_JOBS: usize;

    /// Whether a queued job is still sent when its caller stopped waiting for it (gave
    /// up, or went away with its client): a settlement or a charge must land; a check
    /// or a read nobody waits for is better not made.
    const SEND_ABANDONED: bool;

    fn send(
        &self,
        jobs: &[&Self::Job],
    ) -> impl Future<Output = Result<Vec<Self::Reply>, Self::Error>> + Send;

    /// How long a queued job waits for its reply.
    fn patience(&self) -> Duration;

    /// The error for a job that got no reply: `why` says what happened.
    fn gave_up(&self, why: &str) -> Self::Error;
}

type Waiting<B> = (
    <B as Batch>::Job,
    oneshot::Sender<Result<<B as Batch>::Reply, <B as Batch>::Error>>,
);

struct Queue<B: Batch> {
    /// A call is on its way; new jobs wait in `waiting`.
    flying: bool,
    waiting: Vec<Waiting<B>>,
}

/// Combines calls: a job that finds nothing in flight goes at once, from its caller's
/// task, alone (at low load nothing waits); jobs that arrive while a call is on its way
/// wait for it and go together in the next, sent from a task of its own. Under load this
/// is one call per round trip whatever the number of callers.
///
/// Written here rather than taken from a crate: the batching crates looked at (`batched`,
/// `batchy`) gather for a fixed window after the first job, a wait every lone request
/// would pay; this batches only what queues behind a call in flight.
pub struct Combiner<B: Batch> {
    batch: B,
    queue: Mutex<Queue<B>>,
    counts: Arc<CallCounts>,
}

/// A combiner's calls made and the jobs they carried (jobs / calls is how well it
/// combines), shared with whoever reports them (`/metrics`).
#[derive(Debug, Default)]
pub struct CallCounts {
    calls: AtomicU64,
    jobs: AtomicU64,
}

impl CallCounts {
    /// Calls made so far and the jobs they carried.
    pub fn get(&self) -> (u64, u64) {
        (
            self.calls.load(Ordering::Relaxed),
            self.jobs.load(Ordering::Relaxed),
        )
    }
}

/// Ends an inline call's turn, also when its caller gives up on it: what queued
/// meanwhile goes next.
struct Turn<'a, B: Batch>(&'a Arc<Combiner<B>>);

impl<B: Batch> Drop for Turn<'_, B> {
    fn drop(&mut self) {
        self.0.next();
    }
}

impl<B: Batch> Combiner<B> {
    pub fn new(batch: B) -> Arc<Self> {
        Arc::new(Combiner {
            batch,
            queue: Mutex::new(Queue {
                flying: false,
                waiting: Vec::new(),
            }),
            counts: Arc::default(),
        })
    }

    /// What sends the calls.
    pub fn batch(&self) -> &B {
        &self.batch
    }

    /// Calls made so far and the jobs they carried.
    pub fn counts(&self) -> (u64, u64) {
        self.counts.get()
    }

    /// The live counts behind [`Combiner::counts`], to be reported elsewhere.
    pub fn call_counts(&self) -> Arc<CallCounts> {
        self.counts.clone()
    }

    fn queue(&self) -> MutexGuard<'_, Queue<B>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run `job`: alone when nothing is in flight, else with whatever queues behind the
    /// call in flight, waiting at most [`Batch::patience`] for it.
    pub async fn run(self: &Arc<Self>, job: B::Job) -> Result<B::Reply, B::Error> {
        let wait = {
            let mut queue = self.queue();
            if queue.flying {
                let (tx, rx) = oneshot::channel();
                queue.waiting.push((job, tx));
                Err(rx)
            } else {
                queue.flying = true;
                Ok(job)
            }
        };
        match wait {
            Ok(job) => {
                let _turn = Turn(self);
                let mut replies = self.together(&[&job]).await?;
                replies.pop().ok_or_else(|| self.batch.gave_up("no reply"))
            }
            Err(rx) => match tokio::time::timeout(self.batch.patience(), rx).await {
                Ok(Ok(reply)) => reply,
                Ok(Err(_)) => Err(self.batch.gave_up("the call was dropped (shutting down)")),
                Err(_) => Err(self
                    .batch
                    .gave_up(&format!("no answer within {:?}", self.batch.patience()))),
            },
        }
    }

    /// After a call: send what queued meanwhile from a task of its own, or mark the
    /// way clear.
    fn next(self: &Arc<Self>) {
        let mut queue = self.queue();
        if queue.waiting.is_empty() {
            queue.flying = false;
            return;
        }
        let batch = std::mem::take(&mut queue.waiting);
        drop(queue);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(self.clone().drain(batch));
            }
            // No runtime left (shutting down): the waiting calls fail as dropped.
            Err(_) => {
                self.queue().flying = false;
                drop(batch);
            }
        }
    }

    /// Send batches until nothing waits.
    async fn drain(self: Arc<Self>, mut batch: Vec<Waiting<B>>) {
        loop {
            if !B::SEND_ABANDONED {
                batch.retain(|(_, tx)| !tx.is_closed());
            }
            let rest = if batch.len() > B::MAX_JOBS {
                batch.split_off(B::MAX_JOBS.max(1))
            } else {
                Vec::new()
            };
            let jobs: Vec<&B::Job> = batch.iter().map(|(job, _)| job).collect();
            let replies = if jobs.is_empty() {
                Ok(Vec::new())
            } else {
                self.together(&jobs).await
            };
            match replies {
                Ok(replies) => {
                    for ((_, tx), reply) in batch.drain(..).zip(replies) {
                        let _ = tx.send(Ok(reply));
                    }
                }
                Err(e) => {
                    for (_, tx) in batch.drain(..) {
                        let _ = tx.send(Err(e.clone()));
                    }
                }
            }
            batch = rest;
            if batch.is_empty() {
                let mut queue = self.queue();
                if queue.waiting.is_empty() {
                    queue.flying = false;
                    return;
                }
                batch = std::mem::take(&mut queue.waiting);
            }
        }
    }

    /// `jobs` in one call, whatever else is in flight: one reply per job, in order.
    pub async fn together(&self, jobs: &[&B::Job]) -> Result<Vec<B::Reply>, B::Error> {
        self.counts.calls.fetch_add(1, Ordering::Relaxed);
        self.counts
            .jobs
            .fetch_add(jobs.len() as u64, Ordering::Relaxed);
        let replies = self.batch.send(jobs).await?;
        if replies.len() == jobs.len() {
            Ok(replies)
        } else {
            Err(self.batch.gave_up(&format!(
                "{} replies for {} jobs",
                replies.len(),
                jobs.len()
            )))
        }
    }
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
    async fn without_a_linger_it_takes_what_is_queued_and_sets_no_timer() {
        let (tx, mut rx) = mpsc::channel(16);
        for i in 0..3 {
            tx.send(i).await.unwrap();
        }
        // Between two of the timer's millisecond ticks, where a timer due now would
        // wait for the next one.
        tokio::time::advance(Duration::from_micros(1500)).await;
        let start = tokio::time::Instant::now();
        let mut batch = Vec::new();
        assert_eq!(
            gather(&mut rx, &mut batch, 8, Duration::ZERO, |_| false).await,
            3
        );
        assert_eq!(batch, [0, 1, 2]);
        // A paused clock jumps to the next timer whenever the runtime idles: a timer set
        // by the wait (the cache's Redis writer set one a batch) would have moved it.
        tokio::task::yield_now().await;
        assert_eq!(tokio::time::Instant::now(), start, "no timer was set");
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

    /// Answers each job with ten times itself after `delay`, noting the calls.
    struct Echo<const SEND: bool> {
        calls: Mutex<Vec<Vec<u32>>>,
        delay: Duration,
    }

    impl<const SEND: bool> Batch for Echo<SEND> {
        type Job = u32;
        type Reply = u32;
        type Error = String;

        const MAX_JOBS: usize = 3;
        const SEND_ABANDONED: bool = SEND;

        async fn send(&self, jobs: &[&u32]) -> Result<Vec<u32>, String> {
            self.calls
                .lock()
                .unwrap()
                .push(jobs.iter().map(|j| **j).collect());
            tokio::time::sleep(self.delay).await;
            Ok(jobs.iter().map(|j| **j * 10).collect())
        }

        fn patience(&self) -> Duration {
            Duration::from_secs(60)
        }

        fn gave_up(&self, why: &str) -> String {
            why.to_string()
        }
    }

    fn echo<const SEND: bool>() -> Arc<Combiner<Echo<SEND>>> {
        Combiner::new(Echo {
            calls: Mutex::new(Vec::new()),
            delay: Duration::from_millis(10),
        })
    }

    fn spawn_run<const SEND: bool>(
        c: &Arc<Combiner<Echo<SEND>>>,
        job: u32,
    ) -> tokio::task::JoinHandle<Result<u32, String>> {
        let c = c.clone();
        tokio::spawn(async move { c.run(job).await })
    }

    #[tokio::test(start_paused = true)]
    async fn alone_at_once_together_behind_a_call_in_flight() {
        let c = echo::<true>();
        let first = spawn_run(&c, 1);
        tokio::task::yield_now().await;
        // 1 is on its way: these wait, then go at most three a call.
        let rest: Vec<_> = (2..=6).map(|j| spawn_run(&c, j)).collect();
        assert_eq!(first.await.unwrap(), Ok(10));
        for (j, t) in (2..=6).zip(rest) {
            assert_eq!(t.await.unwrap(), Ok(j * 10));
        }
        // Nothing in flight: the next goes at once, alone.
        assert_eq!(c.run(7).await, Ok(70));
        let calls = c.batch().calls.lock().unwrap().clone();
        assert_eq!(calls, [vec![1], vec![2, 3, 4], vec![5, 6], vec![7]]);
        assert_eq!(c.counts(), (4, 7));
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_gives_up_mid_call_hands_the_queue_on() {
        let c = echo::<true>();
        let first = spawn_run(&c, 1);
        tokio::task::yield_now().await;
        let second = spawn_run(&c, 2);
        tokio::task::yield_now().await;
        // The caller whose call is in flight goes away (a client hung up).
        first.abort();
        assert!(first.await.unwrap_err().is_cancelled());
        assert_eq!(second.await.unwrap(), Ok(20), "2 still went");
        assert_eq!(c.run(3).await, Ok(30), "and the way is clear after it");
        let calls = c.batch().calls.lock().unwrap().clone();
        assert_eq!(calls, [vec![1], vec![2], vec![3]]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_job_nobody_waits_for_is_sent_only_when_it_must_land() {
        async fn calls<const SEND: bool>() -> Vec<Vec<u32>> {
            let c = echo::<SEND>();
            let first = spawn_run(&c, 1);
            tokio::task::yield_now().await;
            let gone = spawn_run(&c, 2);
            let third = spawn_run(&c, 3);
            tokio::task::yield_now().await;
            // 2 queued behind 1, then its caller went away.
            gone.abort();
            assert_eq!(first.await.unwrap(), Ok(10));
            assert_eq!(third.await.unwrap(), Ok(30));
            c.batch().calls.lock().unwrap().clone()
        }
        assert_eq!(calls::<true>().await, [vec![1], vec![2, 3]], "a settlement");
        assert_eq!(calls::<false>().await, [vec![1], vec![3]], "a check");
    }
}
