//! The two ways to apply load.
//!
//! - **Closed loop**: C connections, each sending its next request as soon as the last
//!   answer is read. Measures capacity; latency is from the actual send.
//! - **Open loop**: requests scheduled every 1/rate seconds whether or not earlier ones
//!   finished, each on an idle connection (or a new one). Latency is from the
//!   *scheduled* send time, so a stalled server is charged for the requests it delayed
//!   rather than the generator quietly sending fewer (no coordinated omission).
//!
//! Both run a warm-up (connections opened, caches and allocators warm) that is not
//! recorded, then a recording window.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::client::{Conn, Outcome, Target, call};
use crate::stats::Stats;

/// When the recording window starts and ends, and how many connections were opened.
pub struct Ran {
    pub window_start: Instant,
    pub window: Duration,
    pub connections_opened: u64,
}

/// Pause after a failed connect, so a dead server does not turn into a busy loop.
const RECONNECT_PAUSE: Duration = Duration::from_millis(10);

pub async fn closed_loop(
    target: Arc<Target>,
    connections: usize,
    warmup: Duration,
    duration: Duration,
    stats: Arc<Stats>,
) -> anyhow::Result<Ran> {
    let opened = Arc::new(AtomicU64::new(0));
    let mut conns = Vec::with_capacity(connections);
    for _ in 0..connections {
        conns.push(Conn::open(&target).await?);
        opened.fetch_add(1, Ordering::Relaxed);
    }
    let window_start = Instant::now() + warmup;
    let stop = window_start + duration;
    let tasks = TaskTracker::new();
    for mut conn in conns {
        let (target, stats, opened) = (target.clone(), stats.clone(), opened.clone());
        tasks.spawn(async move {
            loop {
                let sent = Instant::now();
                if sent >= stop {
                    break;
                }
                if !conn.is_usable() {
                    match Conn::open(&target).await {
                        Ok(fresh) => {
                            conn = fresh;
                            opened.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            if sent >= window_start {
                                stats.record(Outcome::Failed(format!("{e:#}")));
                            }
                            tokio::time::sleep(RECONNECT_PAUSE).await;
                            continue;
                        }
                    }
                }
                let outcome = call(&mut conn, &target, sent).await;
                stats.count_call();
                if sent >= window_start {
                    stats.record(outcome);
                }
            }
        });
    }
    tasks.close();
    tasks.wait().await;
    Ok(Ran {
        window_start,
        window: duration,
        connections_opened: opened.load(Ordering::Relaxed),
    })
}

/// Connections shared by open-loop requests: at most `max` in use at once.
struct Pool {
    idle: Mutex<Vec<Conn>>,
    permits: Semaphore,
    opened: AtomicU64,
}

impl Pool {
    fn take(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(conn) = idle.pop() {
            if conn.is_usable() {
                return Some(conn);
            }
        }
        None
    }

    fn put(&self, conn: Conn) {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(conn);
    }
}

pub async fn open_loop(
    target: Arc<Target>,
    rate: f64,
    max_connections: usize,
    warmup: Duration,
    duration: Duration,
    stats: Arc<Stats>,
) -> anyhow::Result<Ran> {
    anyhow::ensure!(
        rate.is_finite() && rate > 0.0,
        "--rate must be a positive number"
    );
    let pool = Arc::new(Pool {
        idle: Mutex::new(Vec::new()),
        permits: Semaphore::new(max_connections),
        opened: AtomicU64::new(0),
    });
    // Open one connection up front so a wrong address fails fast and clearly.
    pool.put(Conn::open(&target).await?);
    pool.opened.fetch_add(1, Ordering::Relaxed);

    let interval = 1.0 / rate;
    let warm_n = (warmup.as_secs_f64() * rate).ceil() as u64;
    let total = warm_n + (duration.as_secs_f64() * rate).round() as u64;
    let start = Instant::now() + Duration::from_millis(5);
    let window_start = start + Duration::from_secs_f64(warm_n as f64 * interval);
    let tasks = TaskTracker::new();
    let runtime = tokio::runtime::Handle::current();
    let pacer = {
        let (tasks, pool, target, stats) =
            (tasks.clone(), pool.clone(), target.clone(), stats.clone());
        // A dedicated thread paces the sends: tokio's timer has 1 ms granularity, which
        // at 500 req/s would bunch sends and add up to a millisecond to every latency.
        tokio::task::spawn_blocking(move || {
            for i in 0..total {
                let at = start + Duration::from_secs_f64(i as f64 * interval);
                pace(at);
                let request = one(pool.clone(), target.clone(), stats.clone(), at, i >= warm_n);
                tasks.spawn_on(request, &runtime);
            }
        })
    };
    pacer.await?;
    tasks.close();
    tasks.wait().await;
    Ok(Ran {
        window_start,
        window: duration,
        connections_opened: pool.opened.load(Ordering::Relaxed),
    })
}

/// Linux wakes a sleeping thread up to its timer slack (50 µs by default) late, so the
/// pacer sleeps that much short and spins the rest: about 3% of a core at 500 req/s.
const SPIN: Duration = Duration::from_micros(60);

#[expect(
    clippy::disallowed_methods,
    reason = "runs on a dedicated blocking-pool thread, never a runtime worker; nanosleep is far finer than tokio's 1 ms timer"
)]
fn pace(until: Instant) {
    let now = Instant::now();
    if until > now + SPIN {
        std::thread::sleep(until - now - SPIN);
    }
    while Instant::now() < until {
        std::hint::spin_loop();
    }
}

/// One open-loop request scheduled for `at`: wait for a connection slot, send, record.
async fn one(pool: Arc<Pool>, target: Arc<Target>, stats: Arc<Stats>, at: Instant, record: bool) {
    let deadline = tokio::time::Instant::from_std(at + target.timeout);
    let permit = match tokio::time::timeout_at(deadline, pool.permits.acquire()).await {
        Ok(Ok(permit)) => permit,
        Ok(Err(_)) | Err(_) => {
            if record {
                stats.record(Outcome::Failed(
                    "no free connection before the timeout".into(),
                ));
            }
            return;
        }
    };
    let mut conn = match pool.take() {
        Some(conn) => conn,
        None => match Conn::open(&target).await {
            Ok(conn) => {
                pool.opened.fetch_add(1, Ordering::Relaxed);
                conn
            }
            Err(e) => {
                if record {
                    stats.record(Outcome::Failed(format!("{e:#}")));
                }
                return;
            }
        },
    };
    if record {
        stats.record_lag(at.elapsed());
    }
    let outcome = call(&mut conn, &target, at).await;
    stats.count_call();
    if !matches!(outcome, Outcome::Failed(_)) && conn.is_usable() {
        pool.put(conn);
    }
    drop(permit);
    if record {
        stats.record(outcome);
    }
}
