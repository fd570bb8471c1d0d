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

use crate::admin;
use crate::config::{Config, ConfigSource};
use crate::dashboard;
use crate::error::ApiError;
use crate::limits::config::FailMode;
use crate::pipeline::{self, Gateway};
use crate::quality::submit_feedback;
use crate::store::{StorageTarget, Store};
use crate::telemetry::RecordSink;

/// The gateway's routes. `/healthz`, `/readyz` and `/metrics` are open; every `/v1`
/// handler authenticates as the first pipeline stage; `/admin` needs the master key, one
/// check in front of all of it ([`admin::require_admin`]); `/dashboard` needs it too
/// (or its session cookie). With `[server] admin_listen`, `/admin` and `/dashboard` are
/// not here but on [`admin_app`], served on that address.
pub fn app(gateway: Arc<Gateway>) -> Router {
    let limit = gateway.config.server.max_body_bytes;
    let router = if gateway.config.server.admin_listen.is_none() {
        admin_routes(gateway.clone())
    } else {
        Router::new()
    };
    router
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/v1/feedback", post(feedback))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(gateway)
}

fn admin_routes(gateway: Arc<Gateway>) -> Router<Arc<Gateway>> {
    Router::new()
        .nest("/admin", admin::router(gateway.clone()))
        .merge(dashboard::router(gateway))
}

/// `/admin`, `/dashboard` and `/healthz` alone: what `[server] admin_listen` serves.
pub fn admin_app(gateway: Arc<Gateway>) -> Router {
    let limit = gateway.config.server.max_body_bytes;
    admin_routes(gateway.clone())
        .route("/healthz", get(healthz))
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

async fn feedback(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let principal = gw.auth.authenticate(&headers)?;
        let body = body_or_error(body, gw.config.server.max_body_bytes)?;
        submit_feedback(&gw, &principal, &body).await
    }
    .await;
    match result {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn healthz() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

/// Ready when the request log answers and, with `[redis]`, when limits can be checked:
/// Redis down with `on_failure = "open"` is `degraded` (still 200: this instance serves
/// on local limits), with `"closed"` it is not ready (503).
async fn readyz(State(gw): State<Arc<Gateway>>) -> Response {
    let storage = gw.store.ping().await;
    let limits = gw.limiter.status();
    let (limits_text, limits_ok) = match (gw.limiter.ping_shared().await, limits.on_failure) {
        (None, _) => ("ok", true),
        (Some(true), _) => ("ok", true),
        (Some(false), Some(FailMode::Closed)) => ("unreachable", false),
        (Some(false), _) => ("unreachable_serving_local_limits", true),
    };
    let degraded = limits_text != "ok";
    let ready = storage && limits_ok;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": match (ready, degraded) {
            (false, _) => "not_ready",
            (true, true) => "degraded",
            (true, false) => "ready",
        },
        "checks": {
            "storage": if storage { "ok" } else { "unreachable" },
            "limits": {"backend": limits.backend, "status": limits_text},
        },
    });
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(gw): State<Arc<Gateway>>) -> Response {
    let text = gw.metrics.render(
        &gw.recorder,
        gw.store.failed(),
        &gw.limiter.status(),
        &gw.redis.combined_calls(),
    );
    (
        [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        text,
    )
        .into_response()
}

/// 404 in the OpenAI error body (also `/admin`'s fallback).
pub(crate) async fn not_found(uri: Uri) -> Response {
    ApiError::RouteNotFound {
        path: uri.path().to_string(),
    }
    .into_response()
}

pub(crate) async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_string(),
    }
    .into_response()
}

/// Refuse to run without a master key on anything but loopback: an open gateway spends
/// your money. Virtual keys alone are not enough: this runs before the store is read, and
/// a gateway whose keys table is empty (a fresh or swapped database) would be keyless.
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
    /// Where `/admin` and `/dashboard` are served when `[server] admin_listen` is set.
    pub admin_addr: Option<SocketAddr>,
    pub gateway: Arc<Gateway>,
    shutdown: tokio::sync::oneshot::Sender<()>,
    done: tokio::task::JoinHandle<()>,
}

impl Running {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stop accepting, let in-flight requests and streams finish (up to the grace
    /// period, then end them), flush every record to the store, close the store.
    pub async fn stop(self) {
        let _ = self.shutdown.send(());
        drop(self.gateway);
        let _ = self.done.await;
    }
}

/// Open the store, bind, and serve in the background until [`Running::stop`].
pub async fn start(
    config: Config,
    listen: SocketAddr,
    extra_sinks: Vec<Box<dyn RecordSink>>,
) -> anyhow::Result<Running> {
    check_exposure(&config, listen)?;
    let store = Store::open(&config.storage.target).await?;
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let admin_listener = match config.server.admin_listen {
        Some(a) => Some(TcpListener::bind(a).await?),
        None => None,
    };
    let admin_addr = admin_listener
        .as_ref()
        .map(TcpListener::local_addr)
        .transpose()?;
    let (shutdown, rx) = tokio::sync::oneshot::channel::<()>();
    let grace = config.server.shutdown_grace;
    let tasks = TaskTracker::new();
    let gateway = Gateway::start(Arc::new(config), store.clone(), extra_sinks, tasks.clone())?;
    // Keys created before start work from the first request on.
    gateway.auth.ready().await?;
    let watching = tokio_util::sync::CancellationToken::new();
    if let Err(e) = crate::prompts::watch::spawn(gateway.prompts.clone(), watching.clone()) {
        tracing::warn!(error = %e, "cannot watch the prompt files: restart to pick up changes");
    }
    let cancel = gateway.shutdown.clone();
    let limiter = gateway.limiter.clone();
    let cache = gateway.cache.clone();
    let router = app(gateway.clone());
    let admin_stop = tokio_util::sync::CancellationToken::new();
    let admin_serving = admin_listener.map(|l| {
        let stop = admin_stop.clone();
        let admin = admin_app(gateway.clone());
        tokio::spawn(async move {
            let served = axum::serve(sluice_sim::server::nodelay(l), admin)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "admin server stopped with an error");
            }
        })
    });
    let done = tokio::spawn(async move {
        let (begin, begun) = tokio::sync::oneshot::channel::<()>();
        let mut serving = tokio::spawn(async move {
            // Without TCP_NODELAY a stream's first chunk, written after the response
            // head, waited for the client's delayed ACK: +40 ms to every first token.
            let served = axum::serve(sluice_sim::server::nodelay(listener), router)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                    admin_stop.cancel();
                    let _ = begin.send(());
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "server stopped with an error");
            }
        });
        // Once shutdown begins, in-flight requests and streams get the grace period;
        // then open streams are ended (and recorded) so the drain can finish.
        let serve_ended = tokio::select! {
            _ = begun => false,
            _ = &mut serving => true,
        };
        if !serve_ended && tokio::time::timeout(grace, &mut serving).await.is_err() {
            tracing::warn!(
                grace_ms = grace.as_millis() as u64,
                "grace period over; ending open streams"
            );
            cancel.cancel();
            let _ = tokio::time::timeout(STREAM_END_WAIT, &mut serving).await;
        }
        if let Some(admin) = admin_serving {
            let _ = tokio::time::timeout(STREAM_END_WAIT, admin).await;
        }
        tasks.close();
        if tokio::time::timeout(FLUSH_WAIT, tasks.wait())
            .await
            .is_err()
        {
            tracing::error!(
                "request records still queued after the flush deadline; some may be lost"
            );
        }
        // Every request has settled: a synced limit store sends its last counts, and the
        // cache its queued Redis writes.
        limiter.flush_shared().await;
        cache.flush().await;
        store.close().await;
        watching.cancel();
    });
    Ok(Running {
        addr,
        admin_addr,
        gateway,
        shutdown,
        done,
    })
}

/// How long ended streams get to send their last event.
const STREAM_END_WAIT: Duration = Duration::from_secs(5);
/// How long the recorder gets to write what is queued.
const FLUSH_WAIT: Duration = Duration::from_secs(30);

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
    let storage = match &config.storage.target {
        StorageTarget::Sqlite(p) => format!("sqlite {}", p.display()),
        StorageTarget::Memory => "sqlite in memory".to_string(),
        StorageTarget::Postgres { schema, .. } => format!(
            "postgres (schema {})",
            schema.as_deref().unwrap_or("public")
        ),
    };
    let running = start(config, listen, Vec::new()).await?;
    let auth = &running.gateway.auth;
    let keyless = auth.is_keyless();
    tracing::info!(storage = %storage, virtual_keys = auth.active_keys(), "request log ready");
    tracing::info!(addr = %running.addr, config = %source, keyless, "sluice listening on http://{}", running.addr);
    if let Some(admin) = running.admin_addr {
        tracing::info!(addr = %admin, "/admin and /dashboard listening on http://{admin} (not on the main address)");
    }
    if keyless {
        tracing::warn!("no SLUICE_MASTER_KEY set: running keyless, loopback only");
    } else if !auth.has_master_key() {
        tracing::warn!("no SLUICE_MASTER_KEY set: virtual keys only, /admin is off, loopback only");
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
