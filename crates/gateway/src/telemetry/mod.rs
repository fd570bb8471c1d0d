//! Telemetry: the `RequestRecord` every request leaves exactly once, and the recorder
//! that takes records off the hot path, in batches, to their sinks (log line, metrics,
//! request log).

mod logging;
mod metrics;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

pub use logging::{LogSink, init_logging};
pub use metrics::{Metrics, MetricsSink};

/// How a request ended, at the granularity dashboards and alerts care about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    /// The upstream failed (after retries and fallbacks).
    ApiError,
    /// The upstream answered, but the answer failed an output check.
    BadOutput,
    /// The request was refused as malformed, unknown or unauthorised.
    RejectedInput,
    RateLimited,
    BudgetExceeded,
    /// The client went away before the answer was complete. The default: a record
    /// nobody finished was abandoned.
    #[default]
    ClientCancelled,
}

impl Outcome {
    pub const ALL: [Outcome; 7] = [
        Outcome::Ok,
        Outcome::ApiError,
        Outcome::BadOutput,
        Outcome::RejectedInput,
        Outcome::RateLimited,
        Outcome::BudgetExceeded,
        Outcome::ClientCancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::ApiError => "api_error",
            Outcome::BadOutput => "bad_output",
            Outcome::RejectedInput => "rejected_input",
            Outcome::RateLimited => "rate_limited",
            Outcome::BudgetExceeded => "budget_exceeded",
            Outcome::ClientCancelled => "client_cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    #[default]
    ChatCompletions,
    Embeddings,
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat_completions",
            Endpoint::Embeddings => "embeddings",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FallbackKind {
    Model,
    Template,
}

impl FallbackKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FallbackKind::Model => "model",
            FallbackKind::Template => "template",
        }
    }
}

/// One request, as everything after the response (logs, metrics, usage, budgets) sees it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RequestRecord {
    pub request_id: String,
    /// Milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    pub endpoint: Endpoint,
    pub stream: bool,
    pub key_id: Option<String>,
    /// The key's owner (end users are scoped by it).
    pub owner: Option<String>,
    pub user: Option<String>,
    pub tier: Option<String>,
    /// Which limit refused the request, or what limited it (`user:requests`,
    /// `key:tokens`, `abuse:block`, `abuse:throttle`, `capacity:gpt-4o`, ...).
    pub limited_by: Option<String>,
    pub feature: Option<String>,
    pub model_requested: Option<String>,
    /// The gateway model that answered.
    pub model: Option<String>,
    pub provider: Option<String>,
    pub prompt_id: Option<String>,
    pub prompt_version: Option<String>,
    pub prompt_hash: Option<String>,
    pub experiment: Option<String>,
    pub variant: Option<String>,
    pub outcome: Outcome,
    pub status: u16,
    pub error_code: Option<String>,
    pub retries: u32,
    pub upstream_calls: u32,
    pub fallback: Option<FallbackKind>,
    /// `hit`, `miss`, or absent when the cache was not consulted.
    pub cache_status: Option<String>,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub tokens_estimated: bool,
    /// Prompt tokens the upstream served from its prompt cache (part of `prompt_tokens`).
    pub cached_prompt_tokens: u32,
    /// Integer micro-dollars, rounded half up from `cost_nanos`; absent until the
    /// request is priced (and for models without a known price).
    pub cost_micros: Option<i64>,
    /// The exact cost in integer nano-dollars: what sums, stats and budgets use, since
    /// rounding each request to micro-dollars would lose up to half a micro-dollar a
    /// request (see `usage::prices`).
    pub cost_nanos: Option<i64>,
    /// What a cache hit saved: the cost the request would have had upstream, in
    /// nano-dollars.
    pub cost_saved_nanos: Option<i64>,
    pub latency_ms: f64,
    pub ttft_ms: Option<f64>,
    /// Time spent waiting on upstream calls (all attempts).
    pub upstream_ms: Option<f64>,
    /// What the gateway itself added: latency minus upstream time and retry waits.
    pub overhead_ms: Option<f64>,
    /// Hash of the request's input, for regeneration tracking.
    pub input_hash: Option<String>,
    /// The earlier request this one regenerates, when it does.
    pub regeneration_of: Option<String>,
    /// What the input guard changed (`input_truncated,max_tokens_clamped`, ...).
    pub guard_changes: Option<String>,
    /// What the input guard flagged (`prompt_injection,pii_email`, ...).
    pub guard_flags: Option<String>,
    /// The output checks: `pass`, or `fail:<action>` (`fail:retry`, `fail:flag`, ...).
    pub output_check: Option<String>,
    /// Every answer the output checks read, in order, `model:pass|fail` comma-separated:
    /// an escalation shows the cheap answer that failed and the strong one after it.
    pub output_checks: Option<String>,
    /// What chose the model of a routed request (`rule:NAME`, `default:feature=X`, ...).
    pub routed_by: Option<String>,
    /// Only with `[storage] store_bodies = true`, secrets redacted.
    pub request_body: Option<String>,
    pub response_body: Option<String>,
}

impl RequestRecord {
    pub fn outcome(&self) -> Outcome {
        self.outcome
    }

    pub fn success(&self) -> bool {
        self.outcome() == Outcome::Ok
    }
}

/// A batch of records as sinks get it: shared, so a sink can hand it to another thread
/// (SQLite's writer) without a copy.
pub type RecordBatch = Arc<Vec<RequestRecord>>;

/// Where records go. Sinks run on the recorder's task, never on a request's; a sink
/// gets every batch in order.
#[async_trait]
pub trait RecordSink: Send + 'static {
    async fn write(&mut self, batch: &RecordBatch);
}

/// Hands records to a channel; for tests and for sinks that live elsewhere.
pub struct ChannelSink(pub mpsc::UnboundedSender<RequestRecord>);

#[async_trait]
impl RecordSink for ChannelSink {
    async fn write(&mut self, batch: &RecordBatch) {
        for r in batch.iter() {
            let _ = self.0.send(r.clone());
        }
    }
}

/// Recorder sizing.
#[derive(Debug, Clone, Copy)]
pub struct RecorderConfig {
    /// Records waiting to be written; beyond this, records are dropped and counted.
    pub queue: usize,
    /// Most records handed to the sinks at once.
    pub batch: usize,
    /// How long a partial batch waits for more records before it is written: at
    /// moderate rates this turns a transaction per request into one per interval.
    pub flush_interval: Duration,
}

impl Default for RecorderConfig {
    fn default() -> Self {
        Self {
            queue: 8192,
            batch: 512,
            flush_interval: Duration::from_millis(100),
        }
    }
}

/// Takes records off the hot path: a bounded queue to one background task that hands
/// them, in batches, to every sink. A full queue drops the record and counts it; it
/// never blocks a request.
#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<RequestRecord>,
    inner: Arc<RecorderInner>,
}

struct RecorderInner {
    dropped: AtomicU64,
    /// Unix second of the last "dropped" log line.
    last_drop_log: AtomicU64,
    /// Request id -> key id of the records queued and not yet written, so feedback can
    /// check ownership before the batch reaches the store (it asks the store after).
    /// Removed once written (or dropped), so it holds at most the queue and a batch.
    unwritten: Mutex<foldhash::HashMap<String, Option<String>>>,
}

impl RecorderInner {
    fn unwritten(&self) -> std::sync::MutexGuard<'_, foldhash::HashMap<String, Option<String>>> {
        // A panic elsewhere while holding the lock leaves the map whole: keep going.
        self.unwritten
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Recorder {
    /// Start the writer task on `tasks`; it ends once every `Recorder` clone is dropped
    /// and the queue is drained.
    pub fn start(sinks: Vec<Box<dyn RecordSink>>, tasks: &TaskTracker) -> Recorder {
        Self::start_with(sinks, tasks, RecorderConfig::default())
    }

    pub fn start_with(
        mut sinks: Vec<Box<dyn RecordSink>>,
        tasks: &TaskTracker,
        config: RecorderConfig,
    ) -> Recorder {
        let (tx, mut rx) = mpsc::channel::<RequestRecord>(config.queue.max(1));
        let max_batch = config.batch.max(1);
        let interval = config.flush_interval;
        let inner = Arc::new(RecorderInner {
            dropped: AtomicU64::new(0),
            last_drop_log: AtomicU64::new(0),
            unwritten: Mutex::default(),
        });
        let writer = inner.clone();
        tasks.spawn(async move {
            let mut buffer = Vec::with_capacity(max_batch);
            // Up to one interval's records a batch (a closed channel ends the wait at
            // once, so shutdown never waits on it).
            while crate::batch::gather(&mut rx, &mut buffer, max_batch, interval, |_| false).await
                > 0
            {
                let batch = Arc::new(std::mem::take(&mut buffer));
                for sink in sinks.iter_mut() {
                    sink.write(&batch).await;
                }
                let mut unwritten = writer.unwritten();
                for r in batch.iter() {
                    unwritten.remove(&r.request_id);
                }
                drop(unwritten);
                // The buffer back for the next batch, unless a sink kept a reference.
                buffer = Arc::try_unwrap(batch).map_or_else(
                    |_| Vec::with_capacity(max_batch),
                    |mut records| {
                        records.clear();
                        records
                    },
                );
            }
        });
        Recorder { tx, inner }
    }

    pub fn emit(&self, record: RequestRecord) {
        // In the map before the queue: the writer removes it after writing.
        self.inner
            .unwritten()
            .insert(record.request_id.clone(), record.key_id.clone());
        if let Err(e) = self.tx.try_send(record) {
            let r = match &e {
                mpsc::error::TrySendError::Full(r) | mpsc::error::TrySendError::Closed(r) => r,
            };
            self.inner.unwritten().remove(&r.request_id);
            let n = self.inner.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            // Logged at most once a second: under overload a line per drop would add to
            // the load that caused it. The metric counts every one.
            let now = unix_secs();
            if self.inner.last_drop_log.swap(now, Ordering::Relaxed) != now {
                let (why, r) = match &e {
                    mpsc::error::TrySendError::Full(r) => ("queue full", r),
                    mpsc::error::TrySendError::Closed(r) => ("recorder stopped", r),
                };
                tracing::warn!(request_id = %r.request_id, dropped_total = n, reason = why, "request records dropped");
            }
        }
    }

    /// Records dropped because the queue was full or closed.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// Records waiting to be written.
    pub fn depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// The key that made a request whose record is not written yet: `None` if there is
    /// none such, `Some(None)` keyless.
    pub fn recent_owner(&self, request_id: &str) -> Option<Option<String>> {
        self.inner.unwritten().get(request_id).cloned()
    }
}

/// Owns a request's record until it is finished, and emits it exactly once: when
/// finished, or, if the request is abandoned (client gone, task dropped), on drop as
/// `client_cancelled`.
pub struct RecordGuard {
    record: Option<RequestRecord>,
    started: Instant,
    recorder: Recorder,
    /// Time spent in upstream calls and in retry waits, for the overhead figure.
    upstream: Duration,
    waited: Duration,
    /// Runs once, with the finished record, just before it is emitted: settles what
    /// the request held (token estimates reconciled, concurrency slots released).
    after: Option<AfterRecord>,
}

/// Work that needs the finished record (see [`RecordGuard::after`]).
pub type AfterRecord = Box<dyn FnOnce(&RequestRecord) + Send>;

impl RecordGuard {
    pub fn new(
        recorder: Recorder,
        request_id: String,
        endpoint: Endpoint,
        started: Instant,
    ) -> Self {
        let started_at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Self {
            record: Some(RequestRecord {
                request_id,
                started_at_ms,
                endpoint,
                ..RequestRecord::default()
            }),
            started,
            recorder,
            upstream: Duration::ZERO,
            waited: Duration::ZERO,
            after: None,
        }
    }

    /// Run `f` with the finished record, however the request ends (also on drop).
    pub fn after(&mut self, f: AfterRecord) {
        self.after = Some(f);
    }

    /// Fill in fields as the request moves through the pipeline.
    pub fn update(&mut self, f: impl FnOnce(&mut RequestRecord)) {
        if let Some(r) = self.record.as_mut() {
            f(r);
        }
    }

    /// Add time spent waiting on the upstream, and time spent sleeping between retries.
    pub fn add_upstream_time(&mut self, upstream: Duration, waited: Duration) {
        self.upstream += upstream;
        self.waited += waited;
    }

    /// The record as filled in so far (`None` once emitted).
    pub fn peek(&self) -> Option<&RequestRecord> {
        self.record.as_ref()
    }

    pub fn elapsed_ms(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * 1000.0
    }

    pub fn request_id(&self) -> &str {
        self.record
            .as_ref()
            .map(|r| r.request_id.as_str())
            .unwrap_or("")
    }

    /// Emit with the given outcome and status.
    pub fn finish(mut self, outcome: Outcome, status: u16, error_code: Option<String>) {
        self.emit(outcome, status, error_code);
    }

    fn emit(&mut self, outcome: Outcome, status: u16, error_code: Option<String>) {
        if let Some(mut r) = self.record.take() {
            let latency = self.started.elapsed();
            r.outcome = outcome;
            r.status = status;
            r.error_code = error_code;
            r.latency_ms = ms(latency);
            if r.upstream_calls > 0 {
                r.upstream_ms = Some(ms(self.upstream));
                r.overhead_ms = Some(ms(latency.saturating_sub(self.upstream + self.waited)));
            } else {
                r.overhead_ms = Some(r.latency_ms);
            }
            if let Some(after) = self.after.take() {
                after(&r);
            }
            self.recorder.emit(r);
        }
    }
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Drop for RecordGuard {
    fn drop(&mut self) {
        // 499: nginx's "client closed request", the usual name for this in access logs.
        self.emit(
            Outcome::ClientCancelled,
            499,
            Some("client_cancelled".into()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_dropped_guard_records_client_cancelled_once() {
        let tasks = TaskTracker::new();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let recorder = Recorder::start(vec![Box::new(ChannelSink(tx))], &tasks);
        let guard = RecordGuard::new(
            recorder.clone(),
            "r1".into(),
            Endpoint::ChatCompletions,
            Instant::now(),
        );
        drop(guard);
        let finished = RecordGuard::new(
            recorder.clone(),
            "r2".into(),
            Endpoint::Embeddings,
            Instant::now(),
        );
        finished.finish(Outcome::Ok, 200, None);
        assert_eq!(recorder.recent_owner("r3"), None);
        let inner = recorder.inner.clone();
        drop(recorder);
        let a = rx.recv().await.unwrap();
        assert_eq!(
            (a.request_id.as_str(), a.outcome(), a.status),
            ("r1", Outcome::ClientCancelled, 499)
        );
        let b = rx.recv().await.unwrap();
        assert_eq!(
            (b.request_id.as_str(), b.outcome(), b.success()),
            ("r2", Outcome::Ok, true)
        );
        tasks.close();
        tasks.wait().await;
        assert!(rx.recv().await.is_none(), "exactly one record per guard");
        assert!(
            inner.unwritten().is_empty(),
            "written records are forgotten"
        );
    }

    /// A sink that never finishes, so the queue fills.
    struct Stuck;

    #[async_trait]
    impl RecordSink for Stuck {
        async fn write(&mut self, _batch: &RecordBatch) {
            std::future::pending::<()>().await;
        }
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let tasks = TaskTracker::new();
        let recorder = Recorder::start_with(
            vec![Box::new(Stuck)],
            &tasks,
            RecorderConfig {
                queue: 4,
                batch: 1,
                flush_interval: Duration::ZERO,
            },
        );
        for i in 0..20 {
            RecordGuard::new(
                recorder.clone(),
                format!("r{i}"),
                Endpoint::Embeddings,
                Instant::now(),
            )
            .finish(Outcome::Ok, 200, None);
            if i == 0 {
                // Let the writer take the first record into the stuck sink.
                tokio::task::yield_now().await;
            }
        }
        // One record is held by the stuck sink, four wait in the queue; the rest dropped.
        assert_eq!(recorder.depth(), 4);
        assert_eq!(recorder.dropped(), 15);
        // Feedback can find the owner of every record not yet written, and of no
        // dropped one.
        for i in 0..5 {
            assert_eq!(recorder.recent_owner(&format!("r{i}")), Some(None), "r{i}");
        }
        assert_eq!(recorder.recent_owner("r5"), None, "dropped");
        assert_eq!(recorder.inner.unwritten().len(), 5);
    }
}
