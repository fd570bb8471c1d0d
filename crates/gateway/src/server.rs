//! The HTTP surface: routes, generic HTTP plumbing (body limit), health, and `serve`
//! with graceful shutdown. LLM logic lives in [`crate::pipeline`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ConfigSource};
use crate::error::ApiError;
use crate::pipeline::{self, Gateway};
use crate::telemetry::{LogSink, RecordSink, Recorder};

/// The gateway's routes. `/healthz` and `/readyz` are open; every `/v1` handler
/// authenticates as the first pipeline stage.
pub fn app(gateway: Arc<Gateway>) -> Router {
    let limit = gateway.config.server.max_body_bytes;
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(gateway)
}

/// Read the body, turning axum's rejection into our error (413 with a JSON body).
fn body_or_error(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge { limit }
        } else {
            ApiError::invalid(
                format!("could not read the request body: {rejection}"),
                None,
            )
        }
    })
}

async fn chat_completions(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = body_or_error(body, gw.config.server.max_body_bytes);
    pipeline::chat_completions(gw, headers, body).await
}

async fn embeddings(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = body_or_error(body, gw.config.server.max_body_bytes);
    pipeline::embeddings(gw, headers, body).await
}

async fn models(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    pipeline::models(gw, headers).await
}

async fn healthz() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

async fn readyz() -> Response {
    // Nothing external to check yet: storage and Redis join here when they exist.
    axum::Json(json!({"status": "ready"})).into_response()
}

async fn not_found(uri: Uri) -> Response {
    ApiError::RouteNotFound {
        path: uri.path().to_string(),
    }
    .into_response()
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_string(),
    }
    .into_response()
}

/// Refuse to run keyless on anything but loopback: an open gateway spends your money.
pub fn check_exposure(config: &Config, listen: SocketAddr) -> anyhow::Result<()> {
    if config.server.master_key.is_none() && !listen.ip().is_loopback() {
        anyhow::bail!(
            "refusing to listen on {listen} without a key: set SLUICE_MASTER_KEY (or [server] master_key), or listen on 127.0.0.1"
        );
    }
    Ok(())
}

/// A running gateway, for tests and for `serve`.
pub struct Running {
    pub addr: SocketAddr,
    shutdown: tokio::sync::oneshot::Sender<()>,
    done: tokio::task::JoinHandle<()>,
}

impl Running {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stop accepting, let in-flight requests and streams finish, flush records.
    pub async fn stop(self) {
        let _ = self.shutdown.send(());
        let _ = self.done.await;
    }
}

/// Bind and serve in the background until [`Running::stop`].
pub async fn start(
    config: Config,
    listen: SocketAddr,
    sinks: Vec<Box<dyn RecordSink>>,
) -> anyhow::Result<Running> {
    check_exposure(&config, listen)?;
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let (shutdown, rx) = tokio::sync::oneshot::channel::<()>();
    let grace = config.server.shutdown_grace;
    let tasks = TaskTracker::new();
    let recorder = Recorder::start(sinks, &tasks);
    let gateway = Gateway::new(Arc::new(config), recorder, tasks.clone())?;
    let router = app(gateway);
    let done = tokio::spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = rx.await;
            })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "server stopped with an error");
        }
        drain(tasks, grace).await;
    });
    Ok(Running {
        addr,
        shutdown,
        done,
    })
}

async fn drain(tasks: TaskTracker, grace: Duration) {
    tasks.close();
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            "shutdown grace period over; abandoning in-flight streams"
        );
    }
}

/// `sluice serve`: run until SIGINT/SIGTERM, then shut down gracefully.
pub async fn serve(config: Config, listen: SocketAddr) -> anyhow::Result<()> {
    let source = match &config.source {
        ConfigSource::Embedded { simulated: true } => {
            "embedded default (simulated provider: no OPENAI_API_KEY or ANTHROPIC_API_KEY set)"
                .to_string()
        }
        ConfigSource::Embedded { simulated: false } => {
            "embedded default (providers from environment)".to_string()
        }
        ConfigSource::File(p) => p.display().to_string(),
    };
    let keyless = config.server.master_key.is_none();
    let running = start(config, listen, vec![Box::new(LogSink)]).await?;
    tracing::info!(addr = %running.addr, config = %source, keyless, "sluice listening on http://{}", running.addr);
    if keyless {
        tracing::warn!("no SLUICE_MASTER_KEY set: running keyless, loopback only");
    }
    shutdown_signal().await;
    tracing::info!("shutting down: draining in-flight requests");
    running.stop().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
