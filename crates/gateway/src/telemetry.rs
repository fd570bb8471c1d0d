//! Telemetry: the `RequestRecord` every request leaves exactly once, the recorder that
//! takes records off the hot path to their sinks, and structured logging set-up.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use crate::config::{LogFormat, TelemetryConfig};

/// How a request ended, at the granularity dashboards and alerts care about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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
    /// The client went away before the answer was complete.
    ClientCancelled,
}

impl Outcome {
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
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

/// One request, as everything after the response (logs, metrics, usage, budgets) sees it.
#[derive(Debug, Clone, Serialize)]
pub struct RequestRecord {
    pub request_id: String,
    /// Milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    pub endpoint: Endpoint,
    pub stream: bool,
    pub user: Option<String>,
    pub feature: Option<String>,
    pub model_requested: Option<String>,
    /// The gateway model that answered.
    pub model: Option<String>,
    pub provider: Option<String>,
    pub outcome: Outcome,
    pub success: bool,
    pub status: u16,
    pub error_code: Option<String>,
    pub retries: u32,
    pub upstream_calls: u32,
    pub fallback: Option<FallbackKind>,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub tokens_estimated: bool,
    pub latency_ms: f64,
    pub ttft_ms: Option<f64>,
}

/// Takes records off the hot path: a bounded queue to a background task that hands them
/// to every sink. A full queue drops the record and counts it; it never blocks a request.
#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<RequestRecord>,
    dropped: Arc<AtomicU64>,
}

/// Where records go. Sinks run on the recorder's task, never on a request's.
pub trait RecordSink: Send + 'static {
    fn write(&mut self, record: &RequestRecord);
}

/// The `ai_request_complete` log line.
pub struct LogSink;

impl RecordSink for LogSink {
    fn write(&mut self, r: &RequestRecord) {
        tracing::info!(
            target: "sluice::record",
            event = "ai_request_complete",
            request_id = %r.request_id,
            endpoint = r.endpoint.as_str(),
            model = r.model.as_deref().or(r.model_requested.as_deref()).unwrap_or(""),
            model_requested = r.model_requested.as_deref().unwrap_or(""),
            provider = r.provider.as_deref().unwrap_or(""),
            stream = r.stream,
            user = r.user.as_deref().unwrap_or(""),
            feature = r.feature.as_deref().unwrap_or(""),
            success = r.success,
            outcome = r.outcome.as_str(),
            status = r.status,
            error_code = r.error_code.as_deref().unwrap_or(""),
            retries = r.retries,
            upstream_calls = r.upstream_calls,
            fallback = r.fallback.map(|f| match f { FallbackKind::Model => "model", FallbackKind::Template => "template" }).unwrap_or(""),
            prompt_tokens = r.prompt_tokens,
            completion_tokens = r.completion_tokens,
            tokens = r.prompt_tokens + r.completion_tokens,
            tokens_estimated = r.tokens_estimated,
            latency_ms = r.latency_ms,
            ttft_ms = r.ttft_ms.unwrap_or(0.0),
        );
    }
}

/// Hands records to a channel; for tests and for sinks that live elsewhere.
pub struct ChannelSink(pub mpsc::UnboundedSender<RequestRecord>);

impl RecordSink for ChannelSink {
    fn write(&mut self, record: &RequestRecord) {
        let _ = self.0.send(record.clone());
    }
}

const QUEUE: usize = 8192;

impl Recorder {
    /// Start the recorder task on `tasks`; it ends once every `Recorder` clone is dropped
    /// and the queue is drained.
    pub fn start(mut sinks: Vec<Box<dyn RecordSink>>, tasks: &TaskTracker) -> Recorder {
        let (tx, mut rx) = mpsc::channel::<RequestRecord>(QUEUE);
        tasks.spawn(async move {
            while let Some(record) = rx.recv().await {
                for sink in sinks.iter_mut() {
                    sink.write(&record);
                }
            }
        });
        Recorder {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn emit(&self, record: RequestRecord) {
        if let Err(e) = self.tx.try_send(record) {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            let id = match &e {
                mpsc::error::TrySendError::Full(r) | mpsc::error::TrySendError::Closed(r) => {
                    r.request_id.as_str()
                }
            };
            tracing::warn!(
                request_id = id,
                dropped_total = n,
                "request record dropped: recorder queue full or closed"
            );
        }
    }

    /// Records dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Owns a request's record until it is finished, and emits it exactly once: when
/// finished, or, if the request is abandoned (client gone, task dropped), on drop as
/// `client_cancelled`.
pub struct RecordGuard {
    record: Option<RequestRecord>,
    started: Instant,
    recorder: Recorder,
}

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
                stream: false,
                user: None,
                feature: None,
                model_requested: None,
                model: None,
                provider: None,
                outcome: Outcome::ClientCancelled,
                success: false,
                status: 499,
                error_code: None,
                retries: 0,
                upstream_calls: 0,
                fallback: None,
                prompt_tokens: 0,
                completion_tokens: 0,
                tokens_estimated: false,
                latency_ms: 0.0,
                ttft_ms: None,
            }),
            started,
            recorder,
        }
    }

    /// Fill in fields as the request moves through the pipeline.
    pub fn update(&mut self, f: impl FnOnce(&mut RequestRecord)) {
        if let Some(r) = self.record.as_mut() {
            f(r);
        }
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
            r.outcome = outcome;
            r.success = outcome == Outcome::Ok;
            r.status = status;
            r.error_code = error_code;
            r.latency_ms = self.started.elapsed().as_secs_f64() * 1000.0;
            self.recorder.emit(r);
        }
    }
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

/// Install the global tracing subscriber. Idempotent for tests.
pub fn init_logging(config: &TelemetryConfig) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(&config.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match config.log_format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init()
    } else {
        builder.try_init()
    };
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
        drop(recorder);
        let a = rx.recv().await.unwrap();
        assert_eq!(
            (a.request_id.as_str(), a.outcome, a.status),
            ("r1", Outcome::ClientCancelled, 499)
        );
        let b = rx.recv().await.unwrap();
        assert_eq!(
            (b.request_id.as_str(), b.outcome, b.success),
            ("r2", Outcome::Ok, true)
        );
        tasks.close();
        tasks.wait().await;
        assert!(rx.recv().await.is_none(), "exactly one record per guard");
    }
}
