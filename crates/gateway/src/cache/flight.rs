//! Single-flight: concurrent identical cache misses make one upstream call; the others
//! wait for its answer, each until its own deadline.
//!
//! Choices, and why:
//! - **The call runs in a spawned task.** The first caller (the leader) starts the work in
//!   a task of its own and waits for it like everyone else. A leader whose client hangs up
//!   (its future dropped) does not cancel the call, so the waiters still get the answer
//!   (and it still gets cached); the cost, an upstream call finished for nobody when every
//!   caller left, is bounded by the provider timeouts. Handing leadership over instead
//!   would restart the call and double the upstream latency for the waiters.
//! - **A failure is not shared as an answer.** When the leader's call fails (or panics),
//!   the waiters of that round start a second round: one of them leads a fresh call, the
//!   rest wait for it. A caller takes part in at most two rounds; if the second fails too
//!   it gets [`FlightError::LeaderFailed`]. So a transient or leader-specific failure costs
//!   nobody their answer, and a failing upstream sees two calls for a crowd of identical
//!   requests, not one per request (each leader's own call already retried and fell back).
//! - **Each caller has its own deadline.** A waiter whose deadline passes gets
//!   [`FlightError::Timeout`] for itself only; the call goes on for the others.

use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry as MapEntry;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

/// How many rounds (calls) one caller may take part in.
const MAX_ROUNDS: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum FlightError<E> {
    /// This caller led the call and it failed: its own error.
    #[error(transparent)]
    Failed(E),
    /// This caller's deadline passed while waiting.
    #[error("no answer before the request's deadline")]
    Timeout,
    /// The identical requests this caller waited for failed (twice).
    #[error("an identical request in flight failed")]
    LeaderFailed,
}

/// What a caller got: the answer, and whether it came from another caller's call.
#[derive(Debug, Clone)]
pub struct Flight<V> {
    pub value: V,
    /// `true` when this caller waited for another's call (a "coalesced" miss).
    pub shared: bool,
}

/// The outcome broadcast to waiters: the value, or that the call failed.
type Shared<V> = Option<Result<V, ()>>;

struct InFlight<V> {
    id: u64,
    rx: watch::Receiver<Shared<V>>,
}

/// Deduplicates concurrent calls by key. Cheap to share in an `Arc`; no global lock (a
/// sharded map, touched once when a call starts and once when it ends).
pub struct SingleFlight<K, V> {
    calls: Arc<DashMap<K, InFlight<V>>>,
    next_id: AtomicU64,
}

impl<K, V> Default for SingleFlight<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn default() -> Self {
        Self::new()
    }
}

impl<K, V> SingleFlight<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    pub fn new() -> Self {
        Self {
            calls: Arc::new(DashMap::new()),
            next_id: AtomicU64::new(0),
        }
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> usize {
        self.calls.len()
    }

    /// Run `make()` for `key` unless an identical call is already running, in which case
    /// wait for its answer until `deadline`. `make` is called at most once, only when
    /// this caller leads a call; the future it returns runs in a spawned task (see the
    /// module comment), so it must own what it needs.
    pub async fn run<F, Fut, E>(
        &self,
        key: K,
        deadline: Instant,
        make: F,
    ) -> Result<Flight<V>, FlightError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
        E: Send + 'static,
    {
        let mut make = Some(make);
        for _round in 0..MAX_ROUNDS {
            let joined = match self.calls.entry(key.clone()) {
                MapEntry::Occupied(e) => Err(e.get().rx.clone()),
                MapEntry::Vacant(v) => {
                    let Some(make) = make.take() else {
                        // Unreachable: a caller that led once returns from that round.
                        return Err(FlightError::LeaderFailed);
                    };
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    let (tx, rx) = watch::channel(None);
                    v.insert(InFlight { id, rx });
                    Ok(self.lead(key.clone(), id, tx, make()))
                }
            };
            match joined {
                Ok(mine) => {
                    return match tokio::time::timeout_at(deadline, mine).await {
                        Err(_) => Err(FlightError::Timeout),
                        Ok(Ok(Ok(value))) => Ok(Flight {
                            value,
                            shared: false,
                        }),
                        Ok(Ok(Err(e))) => Err(FlightError::Failed(e)),
                        // The task panicked.
                        Ok(Err(_)) => Err(FlightError::LeaderFailed),
                    };
                }
                Err(mut rx) => {
                    let waited = tokio::time::timeout_at(deadline, rx.wait_for(Option::is_some));
                    match waited.await {
                        Err(_) => return Err(FlightError::Timeout),
                        Ok(Ok(outcome)) => {
                            if let Some(Ok(value)) = outcome.as_ref() {
                                return Ok(Flight {
                                    value: value.clone(),
                                    shared: true,
                                });
                            }
                        }
                        // The leader's task ended without an outcome (it panicked).
                        Ok(Err(_)) => {}
                    }
                    // The call failed: next round.
                }
            }
        }
        Err(FlightError::LeaderFailed)
    }

    /// Start the call in a task; the returned receiver gets the leader's own result.
    fn lead<Fut, E>(
        &self,
        key: K,
        id: u64,
        tx: watch::Sender<Shared<V>>,
        call: Fut,
    ) -> oneshot::Receiver<Result<V, E>>
    where
        Fut: Future<Output = Result<V, E>> + Send + 'static,
        E: Send + 'static,
    {
        let (mine_tx, mine_rx) = oneshot::channel();
        let done = Done {
            calls: self.calls.clone(),
            key,
            id,
        };
        tokio::spawn(async move {
            // Removes the entry however the task ends (a panic included): a later caller
            // starts a fresh call rather than waiting on a finished one.
            let done = done;
            let result = call.await;
            let shared = match &result {
                Ok(v) => Ok(v.clone()),
                Err(_) => Err(()),
            };
            // Out of the map first, so a caller arriving now starts a fresh call instead
            // of reading this outcome (a failure must not be served later).
            drop(done);
            tx.send_replace(Some(shared));
            // The leader may have gone (client hung up, deadline): nobody to tell.
            let _ = mine_tx.send(result);
        });
        mine_rx
    }
}

struct Done<K: Hash + Eq, V> {
    calls: Arc<DashMap<K, InFlight<V>>>,
    key: K,
    id: u64,
}

impl<K: Hash + Eq, V> Drop for Done<K, V> {
    fn drop(&mut self) {
        self.calls.remove_if(&self.key, |_, f| f.id == self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_identical_calls_make_one_call() {
        let flight = Arc::new(SingleFlight::<u32, String>::new());
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let (flight, calls) = (flight.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                flight
                    .run(1, far(), || async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok::<_, String>("answer".to_string())
                    })
                    .await
            }));
        }
        let mut shared = 0;
        for t in tasks {
            let f = t.await.unwrap().unwrap();
            assert_eq!(f.value, "answer");
            shared += usize::from(f.shared);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(shared, 99);
        assert_eq!(flight.in_flight(), 0);
        // Over: the next caller makes a call of its own.
        flight
            .run(1, far(), || {
                let calls = calls.clone();
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, String>("again".to_string())
                }
            })
            .await
            .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_times_out_alone() {
        let flight = Arc::new(SingleFlight::<u32, u32>::new());
        let slow = || async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok::<_, ()>(7)
        };
        let leader = tokio::spawn({
            let f = flight.clone();
            async move { f.run(1, far(), slow).await }
        });
        tokio::task::yield_now().await;
        let impatient = flight
            .run(1, Instant::now() + Duration::from_secs(1), slow)
            .await;
        assert!(matches!(impatient, Err(FlightError::Timeout)));
        let patient = flight.run(1, far(), slow).await.unwrap();
        assert_eq!((patient.value, patient.shared), (7, true));
        assert_eq!(leader.await.unwrap().unwrap().value, 7);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_leader_does_not_strand_waiters() {
        let flight = Arc::new(SingleFlight::<u32, u32>::new());
        let calls = Arc::new(AtomicUsize::new(0));
        let make = |calls: Arc<AtomicUsize>| {
            move || async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok::<_, ()>(9)
            }
        };
        let leader = tokio::spawn({
            let (f, c) = (flight.clone(), calls.clone());
            async move { f.run(1, far(), make(c)).await }
        });
        tokio::task::yield_now().await;
        let waiter = tokio::spawn({
            let (f, c) = (flight.clone(), calls.clone());
            async move { f.run(1, far(), make(c)).await }
        });
        tokio::task::yield_now().await;
        leader.abort(); // the leader's client hung up
        let got = waiter.await.unwrap().unwrap();
        assert_eq!((got.value, got.shared), (9, true));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_is_retried_once_by_a_waiter_then_reported() {
        let flight = Arc::new(SingleFlight::<u32, u32>::new());
        let calls = Arc::new(AtomicUsize::new(0));
        let failing = |calls: Arc<AtomicUsize>| {
            move || async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                Err::<u32, _>("upstream down".to_string())
            }
        };
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let (f, c) = (flight.clone(), calls.clone());
            tasks.push(tokio::spawn(
                async move { f.run(1, far(), failing(c)).await },
            ));
        }
        let mut own = 0;
        let mut leader_failed = 0;
        for t in tasks {
            match t.await.unwrap() {
                Err(FlightError::Failed(e)) => {
                    assert_eq!(e, "upstream down");
                    own += 1;
                }
                Err(FlightError::LeaderFailed) => leader_failed += 1,
                other => panic!("{other:?}"),
            }
        }
        // Round one's leader and round two's leader saw their own errors.
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!((own, leader_failed), (2, 8));
        // A failure is not remembered: the next call runs and succeeds.
        let ok = flight.run(1, far(), || async { Ok::<_, String>(1) }).await;
        assert_eq!(ok.unwrap().value, 1);
    }
}
