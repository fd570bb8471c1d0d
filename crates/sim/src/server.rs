//! The HTTP face of the simulator: an axum router over the pure wire functions, with
//! every model call passed through [`Chaos`] first.
//!
//! Hot-path rules, because benchmarks measure the gateway through this server: no locks
//! (chaos is atomics, ids are an atomic counter), no timers unless a delay is configured,
//! and an unpaced stream is written as one buffer rather than a frame at a time.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::serve::ListenerExt as _;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::chaos::{Chaos, ChaosConfig, Decision};
use crate::openai::SimError;
use crate::{anthropic, openai};

/// Largest request body accepted; embeddings batches can be large.
const BODY_LIMIT: usize = 32 * 1024 * 1024;

/// Command-line knobs of `sluice mock`; the binary flattens this into its subcommand.
#[derive(clap::Args, Clone, Debug)]
pub struct MockArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8485")]
    pub listen: SocketAddr,
    /// Delay before the response headers of every model call.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    pub latency: Duration,
    /// Extra delay before the first chunk of a stream.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    pub ttft: Duration,
    /// Pace streams at this many chunks (about one token each) per second.
    #[arg(long)]
    pub tokens_per_sec: Option<f64>,
    /// Fraction (0..1) of calls that fail with --error-status.
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// Status of --error-rate failures.
    #[arg(long, default_value_t = 500)]
    pub error_status: u16,
    /// Answer 429 above this many requests per minute.
    #[arg(long)]
    pub rpm: Option<u32>,
    /// The first N calls fail with --fail-status.
    #[arg(long, default_value_t = 0)]
    pub fail_first: u32,
    /// Status of --fail-first failures (429 is sent with retry-after).
    #[arg(long, default_value_t = 503)]
    pub fail_status: u16,
    /// Retry-after sent with 429s (default: until the rpm window resets, else 1s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub retry_after: Option<Duration>,
    /// Drop the connection after N stream chunks, without the terminal event.
    #[arg(long)]
    pub cut_after: Option<usize>,
    /// Seed of --error-rate draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl MockArgs {
    pub fn chaos(&self) -> ChaosConfig {
        ChaosConfig {
            latency: self.latency,
            ttft: self.ttft,
            tokens_per_sec: self.tokens_per_sec,
            error_rate: self.error_rate,
            error_status: self.error_status,
            rpm: self.rpm,
            fail_first: self.fail_first,
            fail_status: self.fail_status,
            retry_after: self.retry_after,
            cut_after: self.cut_after,
            seed: self.seed,
        }
    }
}

/// A simulator serving on a spawned task; dropping it stops accepting connections.
#[derive(Debug)]
pub struct MockServer {
    pub addr: SocketAddr,
    pub chaos: Arc<Chaos>,
    task: JoinHandle<()>,
}

impl MockServer {
    /// Bind (port 0 allowed) and serve in a spawned tokio task; used by tests of both crates.
    pub async fn start(addr: SocketAddr, cfg: ChaosConfig) -> io::Result<MockServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let chaos = Arc::new(Chaos::new(cfg));
        let app = router(chaos.clone());
        let task = tokio::spawn(async move {
            if let Err(error) = axum::serve(nodelay(listener), app).await {
                tracing::warn!(%error, "mock server stopped");
            }
        });
        Ok(MockServer { addr, chaos, task })
    }

    /// Base URL of the OpenAI-compatible API, e.g. `http://127.0.0.1:PORT/v1`.
    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Model calls decided so far.
    pub fn calls(&self) -> u64 {
        self.chaos.calls()
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Streams send many small writes; without TCP_NODELAY, Nagle's algorithm and delayed
/// ACKs hold chunks back by tens of milliseconds and distort every latency measured.
/// The gateway's listeners use it too.
pub fn nodelay(listener: TcpListener) -> impl axum::serve::Listener<Addr = SocketAddr> {
    listener.tap_io(|tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::trace!(%error, "could not set TCP_NODELAY");
        }
    })
}

/// Run until ctrl-c (used by `sluice mock`).
pub async fn run(args: MockArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    let app = router(Arc::new(Chaos::new(args.chaos())));
    tracing::info!("mock listening on {addr}");
    axum::serve(nodelay(listener), app)
        .with_graceful_shutdown(async {
            if let Err(error) = tokio::signal::ctrl_c().await {
                tracing::warn!(%error, "cannot wait for ctrl-c; stopping");
            }
        })
        .await
        .context("serving mock")
}

struct AppState {
    chaos: Arc<Chaos>,
    /// Source of response ids, so each answer of a run has its own.
    seq: AtomicU64,
}

type Shared = State<Arc<AppState>>;

/// Which wire format errors are rendered in.
#[derive(Clone, Copy)]
enum Wire {
    OpenAi,
    Anthropic,
}

/// How a stream that chaos let through is delivered.
struct Plan {
    ttft: Duration,
    gap: Option<Duration>,
    cut_after: Option<usize>,
}

impl Plan {
    /// Unpaced and uncut streams go out as one buffer: same bytes, far less work.
    fn is_plain(&self) -> bool {
        self.ttft.is_zero() && self.gap.is_none() && self.cut_after.is_none()
    }
}

/// The simulator's routes: OpenAI chat, embeddings and models, Anthropic messages, health.
pub fn router(chaos: Arc<Chaos>) -> Router {
    let state = Arc::new(AppState {
        chaos,
        seq: AtomicU64::new(0),
    });
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/messages", post(messages))
        .route("/v1/models", get(models))
        .route("/healthz", get(|| async { "ok" }))
        .fallback(|| async { error_response(openai::error(404, None)) })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

impl AppState {
    /// Lets chaos decide the call: the failure to answer with, or the delivery plan once the
    /// configured latency has passed.
    async fn gate(&self, wire: Wire) -> Result<Plan, SimError> {
        match self.chaos.decide() {
            Decision::Fail {
                status,
                retry_after,
            } => Err(self.failure(wire, status, retry_after)),
            Decision::Ok {
                latency,
                ttft,
                cut_after,
            } => {
                if !latency.is_zero() {
                    tokio::time::sleep(latency).await;
                }
                let gap = self
                    .chaos
                    .config()
                    .tokens_per_sec
                    .filter(|tps| tps.is_finite() && *tps > 0.0)
                    .map(|tps| Duration::from_secs_f64(1.0 / tps));
                Ok(Plan {
                    ttft,
                    gap,
                    cut_after,
                })
            }
        }
    }

    fn failure(&self, wire: Wire, status: u16, retry_after: Option<Duration>) -> SimError {
        let (mut err, limit_header) = match wire {
            Wire::OpenAi => (
                openai::error(status, retry_after),
                "x-ratelimit-limit-requests",
            ),
            Wire::Anthropic => (
                anthropic::error(status, retry_after),
                "anthropic-ratelimit-requests-limit",
            ),
        };
        if status == 429
            && let Some(rpm) = self.chaos.config().rpm
        {
            err.headers.push((limit_header, rpm.to_string()));
        }
        err
    }

    fn next_id(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// With `rpm` set, every answer chaos let through says where the window stands, as
    /// real upstreams do (429s carry their own).
    fn announce(&self, wire: Wire, mut resp: Response) -> Response {
        if let Some(window) = self.chaos.window() {
            let pairs = match wire {
                Wire::OpenAi => openai::rate_limit_headers(window),
                Wire::Anthropic => anthropic::rate_limit_headers(window),
            };
            let headers = resp.headers_mut();
            for (name, value) in pairs {
                if let Ok(value) = HeaderValue::try_from(value) {
                    headers.insert(HeaderName::from_static(name), value);
                }
            }
        }
        resp
    }
}

fn parse_body(body: &[u8], wire: Wire) -> Result<Value, SimError> {
    serde_json::from_slice(body).map_err(|e| {
        let message = format!("We could not parse the JSON body of your request: {e}");
        match wire {
            Wire::OpenAi => openai::invalid_request(&message, None),
            Wire::Anthropic => anthropic::invalid_request(&message),
        }
    })
}

fn wants_stream(req: &Value) -> bool {
    req.get("stream").and_then(Value::as_bool).unwrap_or(false)
}

async fn chat_completions(State(st): Shared, body: Bytes) -> Response {
    let plan = match st.gate(Wire::OpenAi).await {
        Ok(plan) => plan,
        Err(err) => return error_response(err),
    };
    st.announce(Wire::OpenAi, chat_answer(&st, &plan, &body))
}

fn chat_answer(st: &AppState, plan: &Plan, body: &[u8]) -> Response {
    let req = match parse_body(body, Wire::OpenAi) {
        Ok(req) => req,
        Err(err) => return error_response(err),
    };
    if !wants_stream(&req) {
        return respond(openai::chat_completion(&req, st.next_id()));
    }
    match openai::chat_chunks(&req, st.next_id()) {
        Ok(chunks) => {
            let mut sse = Sse::with_capacity(&chunks, 16);
            for chunk in &chunks {
                sse.frame(None, chunk);
            }
            sse.into_response(plan, Some(b"data: [DONE]\n\n"))
        }
        Err(err) => error_response(err),
    }
}

async fn messages(State(st): Shared, body: Bytes) -> Response {
    let plan = match st.gate(Wire::Anthropic).await {
        Ok(plan) => plan,
        Err(err) => return error_response(err),
    };
    st.announce(Wire::Anthropic, message_answer(&st, &plan, &body))
}

fn message_answer(st: &AppState, plan: &Plan, body: &[u8]) -> Response {
    let req = match parse_body(body, Wire::Anthropic) {
        Ok(req) => req,
        Err(err) => return error_response(err),
    };
    if !wants_stream(&req) {
        return respond(anthropic::message(&req, st.next_id()));
    }
    match anthropic::message_events(&req, st.next_id()) {
        Ok(events) => {
            let data: Vec<&String> = events.iter().map(|(_, d)| d).collect();
            let mut sse = Sse::with_capacity(&data, 32);
            for (name, data) in &events {
                sse.frame(Some(name), data);
            }
            // message_stop is the end marker; there is no [DONE] in this format.
            sse.into_response(plan, None)
        }
        Err(err) => error_response(err),
    }
}

async fn embeddings(State(st): Shared, body: Bytes) -> Response {
    if let Err(err) = st.gate(Wire::OpenAi).await {
        return error_response(err);
    }
    let answer = respond(parse_body(&body, Wire::OpenAi).and_then(|req| openai::embeddings(&req)));
    st.announce(Wire::OpenAi, answer)
}

async fn models() -> Response {
    static BODY: LazyLock<Bytes> =
        LazyLock::new(|| Bytes::from(openai::models(openai::MODELS).to_string()));
    json_bytes(StatusCode::OK, BODY.clone())
}

fn respond(result: Result<Value, SimError>) -> Response {
    match result {
        Ok(value) => json_response(StatusCode::OK, &value),
        Err(err) => error_response(err),
    }
}

fn json_response(status: StatusCode, value: &Value) -> Response {
    match serde_json::to_vec(value) {
        Ok(bytes) => json_bytes(status, Bytes::from(bytes)),
        Err(error) => {
            tracing::error!(%error, "cannot serialise a simulated body");
            let mut resp = Response::new(Body::empty());
            *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            resp
        }
    }
}

fn json_bytes(status: StatusCode, bytes: Bytes) -> Response {
    let mut resp = Response::new(Body::from(bytes));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error_response(err: SimError) -> Response {
    // Chaos may be configured with any number; one that is not a status becomes 500.
    let status = StatusCode::from_u16(err.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = json_response(status, &err.body);
    let headers = resp.headers_mut();
    for (name, value) in err.headers {
        if let Ok(value) = HeaderValue::try_from(value) {
            headers.append(HeaderName::from_static(name), value);
        }
    }
    resp
}

/// Server-sent-event frames written into one buffer, with the end of each frame noted
/// so a paced stream can hand them out as zero-copy slices.
struct Sse {
    buf: Vec<u8>,
    ends: Vec<usize>,
}

impl Sse {
    fn with_capacity<S: AsRef<str>>(payloads: &[S], overhead: usize) -> Self {
        let bytes = payloads
            .iter()
            .map(|p| p.as_ref().len() + overhead)
            .sum::<usize>();
        Self {
            buf: Vec::with_capacity(bytes + 16),
            ends: Vec::with_capacity(payloads.len()),
        }
    }

    fn frame(&mut self, event: Option<&str>, data: &str) {
        if let Some(event) = event {
            self.buf.extend_from_slice(b"event: ");
            self.buf.extend_from_slice(event.as_bytes());
            self.buf.push(b'\n');
        }
        self.buf.extend_from_slice(b"data: ");
        self.buf.extend_from_slice(data.as_bytes());
        self.buf.extend_from_slice(b"\n\n");
        self.ends.push(self.buf.len());
    }

    /// `done` is the terminal frame, sent only when the stream is not cut.
    fn into_response(mut self, plan: &Plan, done: Option<&'static [u8]>) -> Response {
        let body = if plan.is_plain() {
            if let Some(done) = done {
                self.buf.extend_from_slice(done);
            }
            Body::from(self.buf)
        } else {
            let pacer = Pacer {
                bytes: Bytes::from(self.buf),
                ends: self.ends,
                next: 0,
                ttft: plan.ttft,
                gap: plan.gap,
                cut_after: plan.cut_after,
                done,
                over: false,
            };
            Body::from_stream(futures::stream::unfold(pacer, Pacer::step))
        };
        let mut resp = Response::new(body);
        let headers = resp.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        resp
    }
}

/// Hands out SSE frames with the configured delays, and cuts the stream when asked.
struct Pacer {
    bytes: Bytes,
    ends: Vec<usize>,
    next: usize,
    ttft: Duration,
    gap: Option<Duration>,
    cut_after: Option<usize>,
    done: Option<&'static [u8]>,
    over: bool,
}

impl Pacer {
    async fn step(mut self) -> Option<(io::Result<Bytes>, Pacer)> {
        if self.over {
            return None;
        }
        let total = self.ends.len();
        if let Some(cut) = self.cut_after
            && self.next >= cut.min(total)
        {
            self.over = true;
            // Yield once so the server flushes the frames already written; the error
            // that follows makes it abort the connection, which the client sees as a
            // truncated body rather than a clean end.
            tokio::task::yield_now().await;
            let error = io::Error::other("simulated upstream cut the stream");
            return Some((Err(error), self));
        }
        if self.next >= total {
            self.over = true;
            let done = self.done.take()?;
            return Some((Ok(Bytes::from_static(done)), self));
        }
        let delay = if self.next == 0 {
            self.ttft
        } else {
            self.gap.unwrap_or_default()
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let start = self.next.checked_sub(1).map_or(0, |prev| self.ends[prev]);
        let frame = self.bytes.slice(start..self.ends[self.next]);
        self.next += 1;
        Some((Ok(frame), self))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        mock: MockArgs,
    }

    #[test]
    fn args_defaults_and_durations() {
        let cli = Cli::parse_from(["mock"]);
        let cfg = cli.mock.chaos();
        assert_eq!(cli.mock.listen, SocketAddr::from(([127, 0, 0, 1], 8485)));
        assert_eq!(cfg.latency, Duration::ZERO);
        assert_eq!((cfg.error_status, cfg.fail_status), (500, 503));
        assert_eq!(cfg.rpm, None);

        let cli = Cli::parse_from([
            "mock",
            "--latency",
            "150ms",
            "--ttft",
            "1s",
            "--rpm",
            "60",
            "--retry-after",
            "2s",
            "--cut-after",
            "4",
            "--error-rate",
            "0.25",
        ]);
        let cfg = cli.mock.chaos();
        assert_eq!(cfg.latency, Duration::from_millis(150));
        assert_eq!(cfg.ttft, Duration::from_secs(1));
        assert_eq!(cfg.rpm, Some(60));
        assert_eq!(cfg.retry_after, Some(Duration::from_secs(2)));
        assert_eq!(cfg.cut_after, Some(4));
        assert!((cfg.error_rate - 0.25).abs() < f64::EPSILON);
    }
}
