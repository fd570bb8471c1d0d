//! Many streams open at once: what a server holds per open stream (memory, tasks,
//! connections), rather than how fast it answers.
//!
//! Each stream has its own connection. They are opened with a bounded number of connects
//! in flight (a burst of a thousand SYNs overflows a listen backlog and turns into 1 s
//! retransmits); each counts as open at its first body byte. Once every stream is open
//! (or has failed), `loadgen: holding N streams` goes to stderr, so a script can sample
//! the server while they are open; they are held for `hold_for`, read as their chunks
//! arrive, then closed. A stream that ends by itself during the hold counts as completed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http_body_util::BodyExt as _;
use serde_json::json;
use tokio::sync::{Mutex, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::client::{Conn, Target};
use crate::stats::{Percentiles, histogram, micros};

/// Connects (and requests waiting for their first byte) in flight at once.
const OPENING_AT_ONCE: usize = 64;
/// Error messages kept to show the reader what went wrong.
const KEEP_ERRORS: usize = 5;

pub struct HoldReport {
    pub streams: usize,
    /// Streams that got their first body byte.
    pub opened: u64,
    /// Open at the start of the hold (all first bytes in, none closed by us yet).
    pub open_at_start: u64,
    /// Still open when the hold ended and we closed them.
    pub open_at_end: u64,
    /// Ended by themselves (the whole answer read) before the hold ended.
    pub completed: u64,
    pub errors: u64,
    pub sample_errors: Vec<String>,
    /// From the first connect to the last first byte.
    pub ramp: Duration,
    pub held: Duration,
    pub first_byte: Percentiles,
}

struct Shared {
    opened: AtomicU64,
    open: AtomicU64,
    completed: AtomicU64,
    settled: AtomicU64,
    errors: Mutex<(u64, Vec<String>)>,
    first_byte: Mutex<hdrhistogram::Histogram<u64>>,
    progress: Notify,
}

impl Shared {
    async fn fail(&self, message: String) {
        let mut errors = self.errors.lock().await;
        errors.0 += 1;
        if errors.1.len() < KEEP_ERRORS {
            errors.1.push(message);
        }
    }

    /// A stream got its first byte or failed before it: one fewer to wait for.
    fn settle(&self) {
        self.settled.fetch_add(1, Ordering::Relaxed);
        self.progress.notify_one();
    }
}

pub async fn hold(
    target: Arc<Target>,
    streams: usize,
    hold_for: Duration,
) -> anyhow::Result<HoldReport> {
    let shared = Arc::new(Shared {
        opened: AtomicU64::new(0),
        open: AtomicU64::new(0),
        completed: AtomicU64::new(0),
        settled: AtomicU64::new(0),
        errors: Mutex::new((0, Vec::new())),
        first_byte: Mutex::new(histogram()?),
        progress: Notify::new(),
    });
    let opening = Arc::new(Semaphore::new(OPENING_AT_ONCE));
    let close = CancellationToken::new();
    let tasks = TaskTracker::new();
    let started = Instant::now();
    for _ in 0..streams {
        let (target, shared, opening, close) = (
            target.clone(),
            shared.clone(),
            opening.clone(),
            close.clone(),
        );
        tasks.spawn(async move {
            tokio::select! {
                () = one(&target, &shared, &opening) => {}
                () = close.cancelled() => {}
            }
        });
    }
    tasks.close();
    let total = streams as u64;
    // Every stream settles (first byte or failure) within the request timeout.
    let deadline = tokio::time::Instant::now() + target.timeout + Duration::from_secs(1);
    while shared.settled.load(Ordering::Relaxed) < total {
        if tokio::time::timeout_at(deadline, shared.progress.notified())
            .await
            .is_err()
        {
            break;
        }
    }
    let ramp = started.elapsed();
    let open_at_start = shared.open.load(Ordering::Relaxed);
    eprintln!("loadgen: holding {open_at_start} streams");
    let held_from = Instant::now();
    tokio::time::sleep(hold_for).await;
    let held = held_from.elapsed();
    let open_at_end = shared.open.load(Ordering::Relaxed);
    close.cancel();
    tasks.wait().await;

    let (errors, sample_errors) = {
        let e = shared.errors.lock().await;
        (e.0, e.1.clone())
    };
    let first_byte = Percentiles::of(&*shared.first_byte.lock().await);
    Ok(HoldReport {
        streams,
        opened: shared.opened.load(Ordering::Relaxed),
        open_at_start,
        open_at_end,
        completed: shared.completed.load(Ordering::Relaxed),
        errors,
        sample_errors,
        ramp,
        held,
        first_byte,
    })
}

/// Open one stream, wait for its first byte, then read it to the end.
async fn one(target: &Target, shared: &Shared, opening: &Semaphore) {
    let permit = opening.acquire().await;
    let sent = Instant::now();
    let first = async {
        let mut conn = Conn::open(target).await?;
        let response = conn.send(target).await?;
        let status = response.status();
        let mut body = response.into_body();
        if !status.is_success() {
            let text = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            anyhow::bail!("status {status}: {}", String::from_utf8_lossy(&text));
        }
        while let Some(frame) = body.frame().await {
            if frame?.data_ref().is_some_and(|d| !d.is_empty()) {
                return Ok((conn, body));
            }
        }
        anyhow::bail!("the stream ended before its first byte")
    };
    let (conn, mut body) = match tokio::time::timeout(target.timeout, first).await {
        Ok(Ok(open)) => open,
        Ok(Err(e)) => {
            shared.fail(format!("{e:#}")).await;
            shared.settle();
            return;
        }
        Err(_) => {
            shared
                .fail(format!("no first byte within {:?}", target.timeout))
                .await;
            shared.settle();
            return;
        }
    };
    shared
        .first_byte
        .lock()
        .await
        .saturating_record(micros(sent.elapsed()));
    shared.opened.fetch_add(1, Ordering::Relaxed);
    shared.open.fetch_add(1, Ordering::Relaxed);
    shared.settle();
    drop(permit);
    let mut ended_well = true;
    while let Some(frame) = body.frame().await {
        if let Err(e) = frame {
            shared.fail(format!("stream broke: {e}")).await;
            ended_well = false;
            break;
        }
    }
    shared.open.fetch_sub(1, Ordering::Relaxed);
    if ended_well {
        shared.completed.fetch_add(1, Ordering::Relaxed);
    }
    drop(conn);
}

impl HoldReport {
    pub fn to_json(&self, label: &str, url: &str) -> serde_json::Value {
        json!({
            "label": label,
            "url": url,
            "mode": "hold",
            "stream": true,
            "streams": self.streams,
            "opened": self.opened,
            "open_at_start": self.open_at_start,
            "open_at_end": self.open_at_end,
            "completed": self.completed,
            "errors": self.errors,
            "sample_errors": self.sample_errors,
            "ramp_ms": self.ramp.as_millis() as u64,
            "held_s": self.held.as_secs_f64(),
            "first_byte": self.first_byte.json(),
        })
    }

    pub fn text(&self, label: &str, url: &str) -> String {
        let label = if label.is_empty() {
            String::new()
        } else {
            format!("[{label}] ")
        };
        let mut out = format!(
            "{label}{url} — hold {} streams\n  opened {} in {} ms; open at the start of the hold {}, \
             at its end {} (held {:.1} s); completed {}; errors {}\n",
            self.streams,
            self.opened,
            self.ramp.as_millis(),
            self.open_at_start,
            self.open_at_end,
            self.held.as_secs_f64(),
            self.completed,
            self.errors,
        );
        for e in &self.sample_errors {
            out.push_str(&format!("    e.g. {e}\n"));
        }
        let p = &self.first_byte;
        out.push_str(&format!(
            "  first byte µs  p50 {}  p90 {}  p99 {}  max {}\n",
            p.p50, p.p90, p.p99, p.max
        ));
        out
    }
}
