//! The request pipeline: every `/v1` request walks the same checklist, in this order.
//!
//! 1. **authenticate** — key -> [`Principal`] (master or virtual key); 401 otherwise.
//! 2. **parse + check** — typed OpenAI request; malformed input gets a precise 4xx.
//!    `x-sluice-prompt` is copied into the request's `sluice.prompt` here (the body's
//!    wins).
//! 3. **identify** — end user, tier (asserted by the key, the key's, or the default),
//!    whether the key and tier may use a model the request names outright (403; the
//!    routing alias and prompt requests are checked after resolve).
//! 4. **assign** (chat) — the experiment variant (sticky per end user; a model, or a
//!    prompt version set on `sluice.prompt`), then, for the routing alias, the model the
//!    routing rules choose and where a failed output check escalates to.
//! 5. **resolve** (chat) — the prompt the request names (`id@version` or `id@label`,
//!    from the header, the body, or the variant) -> its version; variables checked (400
//!    naming the variable); messages rendered; the prompt's model and parameters filled
//!    in where the request left them open. Then whether the key and tier may use the
//!    model that will really be asked (403).
//! 6. **route** — the model's chain: the model, its fallbacks, its template (a prompt's
//!    own fallback template wins).
//! 7. **input guard** — validate, sanitize, cap (the tier's caps tighten the guard's).
//! 8. **limits** — requests, tokens (an estimate, reconciled later) and concurrency per
//!    key, end user and tier, in one call to the limit store (memory or Redis); 429.
//!    Parsing comes first because the end user and the token estimate live in the body.
//! 9. **budgets** — a spent budget blocks (429) or names a cheaper model to route to.
//! 10. **cache** — an identical earlier answer is replayed at no cost; identical misses
//!     in flight share one upstream call. A prompt's content hash is part of the key.
//! 11. **dispatch** — call the chain; each model's provider capacity admits by tier
//!     priority or sheds (429); retryable failures are retried with backoff and jitter
//!     within the retry budget, then the next model is tried ([`Retrier`]). Streams are
//!     committed only once their first chunk arrived, so a failure before it still
//!     retries and falls back.
//! 12. **output guard** — validators (a prompt's own, else the configured rule); on
//!     failure retry, escalate, fall back or flag.
//! 13. **fallback** — when every model failed, the requested model's template answers.
//! 14. **respond** — JSON, or SSE forwarded chunk by chunk as it arrives.
//! 15. **record** — one [`RequestRecord`](crate::telemetry::RequestRecord) per request,
//!     via [`RecordGuard`], also when a stream breaks or the client hangs up; its
//!     after-hook settles limits and charges the request's cost to its budgets.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use futures::future::OptionFuture;
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use crate::auth::{Auth, Principal};
use crate::cache::{
    CacheKey, CacheScope, CachedAnswer, CoalesceError, Coalescer, EmbeddingPlan, FlightError,
    ResponseCache, SingleFlight,
};
use crate::config::{Config, ModelKind};
use crate::error::ApiError;
use crate::guard::{self, OnFail, OutputRule, output};
use crate::limits::config::glob_match;
use crate::limits::limiter::MAX_USER_LEN;
use crate::limits::{Admission, Limiter, RateHeaders, Subject, Tier};
use crate::providers::{ChatCall, ChunkStream, ErrorClass, UpstreamError};
use crate::quality::{Regenerations, input_hash};
use crate::redis_conn::RedisPool;
use crate::retry::{Attempts, Retrier};
use crate::routing::{Chain, Route, Router, TemplateContext};
use crate::store::{Store, StoreSink, redact_secrets};
use crate::telemetry::{Endpoint, FallbackKind, Outcome, RecordGuard, Recorder, RequestRecord};
use crate::telemetry::{LogSink, Metrics, MetricsSink, RecordSink};
use crate::usage::{self, BudgetDecision, Budgets, Cost, PriceBook, TokenUsage};
use crate::wire::{
    ChatMessage, ChatRequest, ChatResponse, Choice, EmbeddingInput, EmbeddingsRequest,
    EmbeddingsResponse, StreamChunk, Usage,
};
use tokio_util::sync::CancellationToken;

pub const HEADER_REQUEST_ID: &str = "x-sluice-request-id";
pub const HEADER_MODEL: &str = "x-sluice-model";
pub const HEADER_FALLBACK: &str = "x-sluice-fallback";
pub const HEADER_FEATURE: &str = "x-sluice-feature";
pub const HEADER_USER: &str = "x-sluice-user";
pub const HEADER_REGENERATE_OF: &str = "x-sluice-regenerate-of";
pub const HEADER_GUARD: &str = "x-sluice-guard";
pub const HEADER_OUTPUT: &str = "x-sluice-output";
pub const HEADER_TIER: &str = "x-sluice-tier";
pub const HEADER_CACHE: &str = "x-sluice-cache";
pub const HEADER_EXPERIMENT: &str = "x-sluice-experiment";
pub const HEADER_PROMPT: &str = "x-sluice-prompt";

/// Everything a request needs, shared by all requests.
pub struct Gateway {
    pub config: Arc<Config>,
    pub auth: Auth,
    pub router: Router,
    pub retrier: Arc<Retrier>,
    pub recorder: Recorder,
    pub limiter: Arc<Limiter>,
    /// Prices per model, for each request's cost.
    pub prices: Arc<PriceBook>,
    /// Budget rules and their spend counters.
    pub budgets: Arc<Budgets>,
    /// Exact-match answers: in process, then Redis.
    pub cache: Arc<ResponseCache>,
    /// Identical cacheable misses in flight, sharing one upstream call.
    pub flight: SingleFlight<CacheKey, FlightAnswer>,
    /// Concurrent embeddings requests of one model, sent upstream as one call.
    pub coalescer: Coalescer<CacheKey, UpstreamError>,
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    pub regenerations: Regenerations,
    /// Prompt versions and labels, swapped whole on reload.
    pub prompts: Arc<crate::prompts::Prompts>,
    /// Stream forwarders run here, so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// Cancelled when shutdown's grace period is over: open streams end then.
    pub shutdown: CancellationToken,
    /// The stores' Redis connections (for what `/metrics` reports of their calls).
    pub redis: RedisPool,
}

impl Gateway {
    /// Build the gateway and start its recorder, whose sinks are the log line, the
    /// metrics, the request log, and any `extra_sinks` (tests).
    pub fn start(
        config: Arc<Config>,
        store: Arc<Store>,
        extra_sinks: Vec<Box<dyn RecordSink>>,
        tasks: TaskTracker,
    ) -> anyhow::Result<Arc<Self>> {
        Self::start_inner(config, store, extra_sinks, tasks, None)
    }

    /// Like [`Gateway::start`], with each model's provider replaced by what `wrap` makes
    /// of it (the prompt test runner: the whole pipeline runs, answered from a cassette,
    /// or with each model's own answer kept where a fallback hides it).
    pub fn start_wrapping_providers(
        config: Arc<Config>,
        store: Arc<Store>,
        extra_sinks: Vec<Box<dyn RecordSink>>,
        tasks: TaskTracker,
        wrap: &crate::routing::WrapProvider,
    ) -> anyhow::Result<Arc<Self>> {
        Self::start_inner(config, store, extra_sinks, tasks, Some(wrap))
    }

    fn start_inner(
        config: Arc<Config>,
        store: Arc<Store>,
        extra_sinks: Vec<Box<dyn RecordSink>>,
        tasks: TaskTracker,
        wrap: Option<&crate::routing::WrapProvider>,
    ) -> anyhow::Result<Arc<Self>> {
        let metrics = Metrics::new()?;
        // Extra sinks first: they are cheap, and a slow store must not delay them.
        let mut sinks = extra_sinks;
        sinks.push(Box::new(LogSink));
        sinks.push(Box::new(MetricsSink::new(metrics.clone())));
        sinks.push(Box::new(StoreSink(store.clone())));
        let shutdown = CancellationToken::new();
        // One connection per Redis server, shared by the stores on it.
        let mut redis = RedisPool::default();
        let limiter = Limiter::new(
            config.limits.clone(),
            crate::limits::shared_backend(&config.limits, &mut redis)?,
            shutdown.clone(),
        );
        if config.limits.abuse.is_some() {
            sinks.push(Box::new(crate::limits::AbuseSink(limiter.clone())));
        }
        let recorder = Recorder::start_with(sinks, &tasks, config.storage.recorder);
        let budgets = Budgets::new(
            config.budgets.clone(),
            config.limits.redis.as_ref(),
            &mut redis,
            store.clone(),
            Some(metrics.clone()),
            tasks.clone(),
        )?;
        Ok(Arc::new(Self {
            limiter,
            prices: Arc::new(PriceBook::new(&config.models)),
            budgets: Arc::new(budgets),
            cache: Arc::new(
                ResponseCache::new(&config.cache, &mut redis, Some(metrics.clone()))
                    .map_err(|e| anyhow::anyhow!("[cache]: {e}"))?,
            ),
            flight: SingleFlight::new(),
            coalescer: Coalescer::new(
                config.cache.coalesce_window,
                config.cache.coalesce_max_batch,
                Some(metrics.clone()),
            ),
            auth: Auth::start(&config, store.clone(), &tasks, &shutdown),
            router: Router::wrapping(config.clone(), wrap)?,
            prompts: crate::prompts::Prompts::load(config.prompts.clone()),
            retrier: Retrier::new(config.retry.clone()),
            regenerations: Regenerations::new(config.telemetry.regeneration_window),
            config,
            recorder,
            store,
            metrics,
            tasks,
            shutdown,
            redis,
        }))
    }

    fn record(&self, endpoint: Endpoint, started: Instant) -> RecordGuard {
        RecordGuard::new(self.recorder.clone(), new_request_id(), endpoint, started)
    }

    /// The opt-in stored body: redacted JSON, or nothing when bodies are not stored.
    fn body_for_log<T: serde::Serialize>(&self, value: &T) -> Option<String> {
        if !self.config.storage.store_bodies {
            return None;
        }
        serde_json::to_string(value)
            .ok()
            .map(|s| redact_secrets(&s))
    }
}

/// `req_` + a UUIDv7 (time-ordered, unique across instances). The random bits come
/// from the thread's seeded generator: `Uuid::now_v7` asks the OS for randomness on
/// every call, two syscalls per request on the hot path.
fn new_request_id() -> String {
    use rand::RngCore;
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut random = [0u8; 10];
    rand::rng().fill_bytes(&mut random);
    let id = uuid::Builder::from_unix_timestamp_millis(ms, &random).into_uuid();
    let mut out = String::with_capacity(36);
    out.push_str("req_");
    out.push_str(id.simple().encode_lower(&mut uuid::Uuid::encode_buffer()));
    out
}

/// A failed request: the error, plus what to record about it.
fn fail(mut record: RecordGuard, error: ApiError) -> Response {
    let outcome = match &error {
        ApiError::Upstream(e) if e.class == ErrorClass::CapacityExceeded => Outcome::RateLimited,
        ApiError::Upstream(_)
        | ApiError::Internal(_)
        | ApiError::StorageUnavailable(_)
        | ApiError::LimitsUnavailable
        | ApiError::BudgetsUnavailable => Outcome::ApiError,
        ApiError::BudgetExceeded { .. } => Outcome::BudgetExceeded,
        ApiError::RateLimited { .. } | ApiError::AbuseBlocked { .. } => Outcome::RateLimited,
        ApiError::InvalidJson { .. }
        | ApiError::InvalidRequest { .. }
        | ApiError::PayloadTooLarge { .. }
        | ApiError::UnsupportedMediaType { .. }
        | ApiError::Unauthorized { .. }
        | ApiError::ModelNotFound { .. }
        | ApiError::WrongModelKind { .. }
        | ApiError::UnknownExperiment { .. }
        | ApiError::RouteNotFound { .. }
        | ApiError::RequestNotFound { .. }
        | ApiError::RequestNotOwned { .. }
        | ApiError::EmptyInput { .. }
        | ApiError::InvalidEncoding { .. }
        | ApiError::InputTooLong { .. }
        | ApiError::TooManyMessages { .. }
        | ApiError::NestingTooDeep { .. }
        | ApiError::InputBlocked { .. }
        | ApiError::ModelNotAllowed { .. }
        | ApiError::Prompt(_)
        | ApiError::MethodNotAllowed { .. } => Outcome::RejectedInput,
        ApiError::OutputInvalid { .. } => Outcome::BadOutput,
    };
    if let ApiError::Upstream(e) = &error
        && e.class == ErrorClass::CapacityExceeded
    {
        record.update(|r| r.limited_by = Some("capacity".into()));
    }
    if let ApiError::Internal(message) = &error {
        tracing::error!(request_id = record.request_id(), %message, "internal error");
    }
    let code = error.code().to_string();
    let mut response = error.into_response();
    set_header(&mut response, HEADER_REQUEST_ID, record.request_id());
    let status = response.status().as_u16();
    record.finish(outcome, status, Some(code));
    response
}

fn set_header(response: &mut Response, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        response.headers_mut().insert(name, v);
    }
}

/// Parse a JSON body: syntax errors are `invalid_json` with the position, type errors
/// `invalid_request` with the offending field as `param`.
pub fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    // Tracking the path costs on every value (30 % of a chat body's parse), and only
    // an error needs it: a body that fails is parsed again, with the path, to say where.
    if let Ok(value) = serde_json::from_slice(body) {
        return Ok(value);
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize::<_, T>(&mut de);
    if value.is_ok() {
        de.end().map_err(|e| ApiError::InvalidJson {
            message: format!("request body is not valid JSON: {e}"),
        })?;
    }
    value.map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => ApiError::InvalidRequest {
                message: if path == "." {
                    format!("invalid request body: {inner}")
                } else {
                    format!("invalid value for `{path}`: {inner}")
                },
                param: (path != ".").then_some(path),
            },
            serde_json::error::Category::Syntax
            | serde_json::error::Category::Eof
            | serde_json::error::Category::Io => {
                let text = inner.to_string();
                if text.contains("surrogate") || text.contains("invalid unicode code point") {
                    ApiError::InvalidEncoding {
                        message: format!("request body has an invalid Unicode escape: {text}"),
                    }
                } else if text.contains("recursion limit exceeded") {
                    ApiError::NestingTooDeep { limit: 128 }
                } else {
                    ApiError::InvalidJson {
                        message: format!("request body is not valid JSON: {text}"),
                    }
                }
            }
        }
    })
}

/// Who and what the request is for, from the key, headers and the body's `sluice`
/// extras; and whether it regenerates an earlier request.
struct Tags<'a> {
    principal: &'a Principal,
    user: Option<&'a str>,
    feature: Option<&'a str>,
    model: &'a str,
    input_hash: u64,
    track_regenerations: bool,
}

/// Returns the end user, refusing ids too long to be anyone's.
fn tag_request(
    gw: &Gateway,
    record: &mut RecordGuard,
    headers: &HeaderMap,
    tags: Tags<'_>,
) -> Result<Tagged, ApiError> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    };
    let user = tags
        .user
        .map(str::to_string)
        .or_else(|| header(HEADER_USER));
    let feature = tags
        .feature
        .map(str::to_string)
        .or_else(|| header(HEADER_FEATURE));
    if let Some(u) = &user
        && u.chars().count() > MAX_USER_LEN
    {
        return Err(ApiError::invalid(
            format!("the end-user id is longer than {MAX_USER_LEN} characters"),
            Some("user".to_string()),
        ));
    }
    let key_id = tags.principal.key_id.clone();
    let owner = tags.principal.owner.clone();
    let regeneration_of = header(HEADER_REGENERATE_OF).or_else(|| {
        tags.track_regenerations
            .then(|| {
                gw.regenerations.observe(
                    key_id.as_deref(),
                    user.as_deref(),
                    tags.input_hash,
                    record.request_id(),
                )
            })
            .flatten()
    });
    let model = tags.model.to_string();
    let tagged = Tagged {
        user: user.clone(),
        feature: feature.clone(),
    };
    record.update(|r| {
        r.key_id = key_id;
        r.owner = owner;
        r.user = user;
        r.feature = feature;
        r.model_requested = Some(model);
        r.input_hash = Some(format!("{:016x}", tags.input_hash));
        r.regeneration_of = regeneration_of;
    });
    Ok(tagged)
}

/// Who and what a request is for, as tagged: the body's `user` and `sluice.feature`,
/// else the `x-sluice-user` and `x-sluice-feature` headers. Every later stage (guard
/// overrides, output rules, cache TTLs, routing, budgets) reads these, not the body.
struct Tagged {
    user: Option<String>,
    feature: Option<String>,
}

/// Identity: the tier the request runs under, and whether the key and its tier may use
/// the requested model.
fn identify(
    gw: &Gateway,
    record: &mut RecordGuard,
    principal: &Principal,
    headers: &HeaderMap,
    model: Option<&str>,
) -> Result<Option<Tier>, ApiError> {
    let tier = resolve_tier(gw, principal, headers)?.cloned();
    let name = tier.as_ref().map(|t| t.name.clone());
    record.update(|r| r.tier = name);
    if let Some(model) = model {
        allow_model(principal, tier.as_ref(), model)?;
    }
    Ok(tier)
}

/// 403 unless the key and its tier may use `model`.
fn allow_model(principal: &Principal, tier: Option<&Tier>, model: &str) -> Result<(), ApiError> {
    match refused_model(principal, tier, model) {
        Some(who) => Err(ApiError::ModelNotAllowed {
            model: model.to_string(),
            who,
        }),
        None => Ok(()),
    }
}

/// The tier named by `x-sluice-tier` when the key may assert it, else the key's, else
/// the default.
fn resolve_tier<'g>(
    gw: &'g Gateway,
    principal: &Principal,
    headers: &HeaderMap,
) -> Result<Option<&'g Tier>, ApiError> {
    let asserted = headers
        .get(HEADER_TIER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| principal.can_assert_tier && !v.is_empty());
    gw.limiter.tier(principal.tier.as_deref(), asserted)
}

/// Who refuses `model`: the key's own model list, or its tier's; `None` when allowed.
fn refused_model(principal: &Principal, tier: Option<&Tier>, model: &str) -> Option<String> {
    if !principal.models.is_empty() && !principal.models.iter().any(|m| glob_match(m, model)) {
        return Some("this API key".into());
    }
    tier.filter(|t| !t.allows_model(model))
        .map(|t| format!("tier `{}`", t.name))
}

/// Stages 8 to 10 sent together: the limit check, the budget read and `lookup` (the
/// cache) go to their stores at once, so on one Redis connection they cost one round
/// trip, not three. Their verdicts are then taken in the stages' order: a limit refusal,
/// then a spent budget; `lookup`'s result is the caller's to use only when both let the
/// request through (a lookup whose request was refused is dropped uncounted).
///
/// Limits charge the request (and its token estimate) to every bucket of its key, end
/// user and tier. What they hold is settled when the record is finished, where the
/// request's cost is also charged to its budgets: the one place every route (streams,
/// fallbacks, cancelled requests) is metered. A spent budget blocks (429
/// `budget_exceeded`) or names a cheaper model to answer instead, returned for the
/// caller to route to.
async fn admit<T>(
    gw: &Gateway,
    record: &mut RecordGuard,
    (principal, user, tier): (&Principal, Option<&str>, Option<&Tier>),
    tokens: u64,
    lookup: impl Future<Output = T>,
) -> Result<(RateHeaders, Option<String>, T), ApiError> {
    let budget_at = |r: &RequestRecord| i64::try_from(r.started_at_ms).unwrap_or(i64::MAX);
    // The request's budget counters, built once: checked here, charged by the record's
    // after-hook.
    let check_budget = |r: &RequestRecord| {
        let at = budget_at(r);
        let counted = gw.budgets.count(&usage::Subject::of(r), at);
        async move {
            let decision = gw.budgets.check_counted(&counted, at).await;
            (decision, counted)
        }
    };
    let (limits, budget, found) = {
        // The record's parts, not the guard (it is not `Sync`), go into the futures.
        let request_id = record.request_id();
        let tagged = record.peek();
        let limits = async {
            if !gw.limiter.config().any_limits() {
                return None;
            }
            let subject = Subject {
                key_id: principal.key_id.as_deref(),
                owner: principal.owner.as_deref(),
                user,
                tier,
                request_id,
                tokens,
            };
            Some(gw.limiter.admit(&subject).await)
        };
        let budget =
            OptionFuture::from(tagged.filter(|_| gw.budgets.is_enabled()).map(check_budget));
        tokio::join!(limits, budget, lookup)
    };
    let (headers, admission) = take_limits(record, limits)?;
    // A penalty may have moved the request to a stricter tier than `tier` (the record's
    // until now), and budgets match on the tier: then the budget read sent alongside was
    // for the wrong one. Read again.
    let budget = match record.peek() {
        Some(r) if budget.is_some() && r.tier.as_deref() != tier.map(|t| t.name.as_str()) => {
            Some(check_budget(r).await)
        }
        _ => budget,
    };
    let (decision, counted) = budget.unzip();
    settle_after(gw, record, admission, counted);
    let downgrade = take_budget(record, decision)?;
    Ok((headers, downgrade, found))
}

/// The limit check's verdict into the record: its rate headers, and the admission to
/// settle once the request is finished.
fn take_limits(
    record: &mut RecordGuard,
    verdict: Option<Result<Admission, ApiError>>,
) -> Result<(RateHeaders, Option<Admission>), ApiError> {
    let admission = match verdict {
        None => None,
        Some(Ok(admission)) => Some(admission),
        Some(Err(e)) => {
            let limited_by = match &e {
                ApiError::RateLimited { limit, .. } => Some(limit.clone()),
                ApiError::AbuseBlocked { .. } => Some("abuse:block".to_string()),
                _ => None,
            };
            record.update(|r| r.limited_by = limited_by);
            return Err(e);
        }
    };
    let headers = admission
        .as_ref()
        .map(|a| a.headers.clone())
        .unwrap_or_default();
    if let Some(a) = &admission {
        let (tier, limited_by) = (a.tier.clone(), a.limited_by.clone());
        record.update(|r| {
            r.tier = tier;
            r.limited_by = limited_by;
        });
    }
    Ok((headers, admission))
}

/// For when the record is finished: settle the admission (token estimates reconciled,
/// concurrency released) and charge the request's cost to the budget counters it was
/// checked against, in the background.
fn settle_after(
    gw: &Gateway,
    record: &mut RecordGuard,
    admission: Option<Admission>,
    counted: Option<usage::Counted>,
) {
    if admission.is_none() && counted.is_none() {
        return;
    }
    let (tasks, budgets) = (gw.tasks.clone(), gw.budgets.clone());
    record.after(Box::new(move |r| {
        let settle = admission.and_then(|a| a.settlement(r));
        let charge = counted.and_then(|c| budgets.charging(c, r));
        if settle.is_none() && charge.is_none() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        // In one task, sent together: on one Redis connection, one round trip.
        let (settle, charge) = (OptionFuture::from(settle), OptionFuture::from(charge));
        tasks.spawn_on(
            async move {
                tokio::join!(settle, charge);
            },
            &runtime,
        );
    }));
}

/// The budget check's verdict into the record: go ahead (`None`), answer with a cheaper
/// model (`Some(model)`), or refuse.
fn take_budget(
    record: &mut RecordGuard,
    decision: Option<BudgetDecision>,
) -> Result<Option<String>, ApiError> {
    match decision {
        None | Some(BudgetDecision::Allow) => Ok(None),
        Some(BudgetDecision::Block {
            budget,
            spent,
            limit,
            retry_after,
        }) => {
            let by = format!("budget:{budget}");
            record.update(|r| r.limited_by = Some(by));
            Err(ApiError::BudgetExceeded {
                budget,
                spent: format!("${:.2}", spent.usd()),
                limit: format!("${:.2}", limit.usd()),
                retry_after,
            })
        }
        Some(BudgetDecision::Downgrade { budget, to }) => {
            let by = format!("budget:{budget}");
            record.update(|r| r.limited_by = Some(by));
            Ok(Some(to))
        }
        Some(BudgetDecision::Unavailable) => Err(ApiError::BudgetsUnavailable),
    }
}

// ---------------------------------------------------------------- chat completions

pub async fn chat_completions(
    gw: Arc<Gateway>,
    headers: HeaderMap,
    body: Result<Bytes, ApiError>,
) -> Response {
    // Every answer after the assign stage, refusals included, names the variant the
    // request was in, as its record does.
    let mut experiment = None;
    let mut response = chat_pipeline(gw, headers, body, &mut experiment).await;
    if let Some(e) = &experiment {
        set_header(&mut response, HEADER_EXPERIMENT, e);
    }
    response
}

/// The chat stages; `experiment` gets the `NAME=VARIANT` the request was assigned.
async fn chat_pipeline(
    gw: Arc<Gateway>,
    headers: HeaderMap,
    body: Result<Bytes, ApiError>,
    experiment: &mut Option<String>,
) -> Response {
    let started = Instant::now();
    let mut record = gw.record(Endpoint::ChatCompletions, started);

    // 1. authenticate
    let principal: Principal = match gw.auth.authenticate(&headers) {
        Ok(p) => p,
        Err(e) => return fail(record, e),
    };
    // 2. parse (encoding and nesting are checked on the raw bytes first)
    let max_depth = gw.config.guard.input.max_depth;
    let mut request = match body.and_then(|b| {
        guard::input::precheck(&b, max_depth)?;
        parse_chat(&b, &headers)
    }) {
        Ok(r) => r,
        Err(e) => return fail(record, e),
    };
    let tags = Tags {
        principal: &principal,
        user: request.user.as_deref(),
        feature: request.sluice.as_ref().and_then(|s| s.feature.as_deref()),
        model: &request.model,
        input_hash: chat_input_hash(&request),
        track_regenerations: true,
    };
    let Tagged { user, feature } = match tag_request(&gw, &mut record, &headers, tags) {
        Ok(t) => t,
        Err(e) => return fail(record, e),
    };
    record.update(|r| r.stream = request.is_stream());
    // 3. identity: tier, and model access for a model named outright; for the routing
    //    alias or a prompt request the model is only final after resolve, checked there
    let open_model = gw.config.routing.handles(&request.model)
        || request.sluice.as_ref().is_some_and(|s| s.prompt.is_some());
    let named = (!open_model).then_some(request.model.as_str());
    let tier = match identify(&gw, &mut record, &principal, &headers, named) {
        Ok(t) => t,
        Err(e) => return fail(record, e),
    };
    // 4. assign: experiment variant
    *experiment = match assign(
        &gw,
        &mut record,
        (&principal, tier.as_ref(), user.as_deref()),
        &headers,
        &mut request,
    ) {
        Ok(a) => a,
        Err(e) => return fail(record, e),
    };
    // 5. resolve: prompt -> messages, model, parameters
    let prompt = match resolve_prompt(&gw, &mut record, &mut request) {
        Ok(p) => p,
        Err(e) => return fail(record, e),
    };
    // 5b. routing rules, for the alias (over the rendered messages); then model access
    let escalate_to = match route_alias(
        &gw,
        &mut record,
        (&principal, tier.as_ref()),
        &headers,
        &mut request,
    ) {
        Ok(to) => to,
        Err(e) => return fail(record, e),
    };
    if let Err(e) = allow_model(&principal, tier.as_ref(), &request.model) {
        return fail(record, e);
    }
    // 6. route (an escalation target goes right after the chosen model)
    let chain = match gw
        .router
        .chain(&request.model, ModelKind::Chat)
        .and_then(|c| match &escalate_to {
            Some(to) => crate::routing::rules::escalating(&gw.router, c, to),
            None => Ok(c),
        }) {
        Ok(c) => c,
        Err(e) => return fail(record, e),
    };
    // 7. input guard: validate, sanitize, cap, scan (in place)
    let model = request.model.clone();
    let detector = &gw.config.guard.detector;
    let guarded = guard_input(
        &gw,
        &mut record,
        &mut request,
        (&model, feature.as_deref(), tier.as_ref()),
        &chain,
        |r, p, m| guard::input::check_chat(r, p, detector, m),
    );
    let report = match guarded {
        Ok(r) => r,
        Err(e) => return fail(record, e),
    };
    // 8-10. limits: requests, tokens (input estimate + output allowance), concurrency;
    //    budgets: block, or answer with the cheaper model a spent budget names; cache: a
    //    stored answer to the same request (same scope, model, prompt version, messages
    //    and parameters) is replayed, as JSON or SSE, at no cost. Sent together (see
    //    `admit`); the lookup is made for the model as routed, and again should a budget
    //    name another.
    let input: u32 = request
        .messages
        .iter()
        .map(|m| estimate_tokens(&m.text()))
        .sum();
    let output = request.max_completion_tokens.or(request.max_tokens);
    let demand = Demand::new(tier.as_ref(), input, output.unwrap_or(0));
    let with_fallback = |mut chain: Chain| {
        if let Some(p) = &prompt {
            chain.prompt_fallback = p.fallback.clone();
        }
        chain
    };
    let mut chain = with_fallback(chain);
    let prompt_key = prompt.as_ref().map(|p| p.key.as_str());
    let plan = |request: &ChatRequest, chain: &Chain| {
        plan_cache(
            &gw,
            &headers,
            &principal,
            request,
            (chain, prompt_key),
            feature.as_deref(),
        )
    };
    let lookup = |cache: Option<&CachePlan>| {
        let gw = &gw;
        let key = cache.filter(|p| p.read).map(|p| p.key);
        async move {
            match key {
                Some(k) => Some(gw.cache.lookup(&k).await),
                None => None,
            }
        }
    };
    let mut cache = plan(&request, &chain);
    let admitted = Box::pin(admit(
        &gw,
        &mut record,
        (&principal, user.as_deref(), tier.as_ref()),
        demand.tokens,
        lookup(cache.as_ref()),
    ))
    .await;
    let (rate_headers, found) = match admitted {
        Ok((headers, Some(to), _)) if to != request.model => {
            match gw.router.chain(&to, ModelKind::Chat) {
                Ok(c) => {
                    request.model = to;
                    chain = with_fallback(c);
                    cache = plan(&request, &chain);
                    (headers, Box::pin(lookup(cache.as_ref())).await)
                }
                Err(e) => return fail(record, e),
            }
        }
        Ok((headers, _, found)) => (headers, found),
        Err(e) => return fail(record, e),
    };
    if let Some(hit) = found.and_then(|f| gw.cache.take(f)) {
        let first = chain.routes.first().map(|r| &**r);
        let mut response = respond_cached(&gw, record, &request, first, &hit, "hit");
        rate_headers.apply(response.headers_mut());
        return response;
    }
    if cache.is_some() {
        record.update(|r| r.cache_status = Some("miss".into()));
    }
    // 11-14. dispatch, output guard, fallback, respond (15. record happens inside, once)
    let rule = match prompt.and_then(|p| p.rule) {
        Some(r) => Some(r),
        None => gw
            .config
            .guard
            .output_for(&request.model, feature.as_deref(), None)
            .cloned(),
    };
    let cache_key = cache.filter(|p| p.write).map(|p| (p.key, p.ttl));
    let stored = cache_key.is_some();
    let plan = Dispatch {
        chain,
        rule: rule.clone(),
        demand,
        cache_key,
    };
    let mut response = match (request.is_stream(), &rule) {
        // Actions that must see the whole answer buffer the stream (see OnFail).
        (true, Some(r)) if r.on_fail.needs_whole_answer() => {
            Box::pin(complete_chat(gw, record, request, plan, true)).await
        }
        (true, _) => Box::pin(stream_chat(gw, record, request, plan)).await,
        (false, _) => Box::pin(complete_chat(gw, record, request, plan, false)).await,
    };
    if stored && !response.headers().contains_key(HEADER_CACHE) {
        set_header(&mut response, HEADER_CACHE, "miss");
    }
    if !report.is_empty() {
        set_header(&mut response, HEADER_GUARD, &report.header());
    }
    rate_headers.apply(response.headers_mut());
    response
}

/// Assign: the first experiment that applies puts the request in a variant (its model
/// replaces the requested one, or its prompt version is set on `sluice.prompt` for the
/// resolve stage to render), in the record; returns `NAME=VARIANT` for
/// `x-sluice-experiment`. Routing comes later ([`route_alias`]), over the messages as
/// rendered.
fn assign(
    gw: &Gateway,
    record: &mut RecordGuard,
    (principal, tier, user): (&Principal, Option<&Tier>, Option<&str>),
    headers: &HeaderMap,
    request: &mut ChatRequest,
) -> Result<Option<String>, ApiError> {
    use crate::experiments::{self, Treatment};
    if gw.config.experiments.is_empty() {
        return Ok(None);
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    // As tagged: from `sluice.feature` or the `x-sluice-feature` header.
    let feature = record.peek().and_then(|r| r.feature.clone());
    let feature = feature.as_deref();
    let (asked, named_prompt) = request
        .sluice
        .as_ref()
        .map(|s| (s.experiment.clone(), s.prompt.clone()))
        .unwrap_or_default();
    let allowed = |m: &str| refused_model(principal, tier, m).is_none();
    let tier_name = tier.map(|t| t.name.as_str());
    let request_id = record.request_id().to_string();
    let subject = experiments::Subject {
        asked: header(HEADER_EXPERIMENT).or(asked.as_deref()),
        owner: principal.owner.as_deref(),
        user,
        request_id: &request_id,
        model: &request.model,
        feature,
        tier: tier_name,
        prompt: named_prompt.as_deref().or(header(HEADER_PROMPT)),
    };
    let assignment = experiments::assign(
        &gw.config.experiments,
        &subject,
        experiments::now_ms(),
        &allowed,
    )?;
    match assignment.as_ref().map(|a| &a.treatment) {
        Some(Treatment::Model(m)) => request.model = m.clone(),
        Some(Treatment::Prompt(p)) => {
            request.sluice.get_or_insert_with(Default::default).prompt = Some(p.clone());
        }
        Some(Treatment::Unchanged) | None => {}
    }
    let (experiment, variant) = assignment
        .as_ref()
        .map(|a| (a.experiment.clone(), a.variant.clone()))
        .unzip();
    record.update(|r| {
        r.experiment = experiment;
        r.variant = variant;
    });
    Ok(assignment.map(|a| a.header()))
}

/// Route: a request for the routing alias (asked for, or a prompt's or a variant's
/// model) gets the model the routing rules choose, over its messages as rendered, in the
/// record as `routed_by`. Returns where a cheap answer that fails its output check goes.
fn route_alias(
    gw: &Gateway,
    record: &mut RecordGuard,
    (principal, tier): (&Principal, Option<&Tier>),
    headers: &HeaderMap,
    request: &mut ChatRequest,
) -> Result<Option<String>, ApiError> {
    use crate::routing::rules::{self, Facts};
    if !gw.config.routing.handles(&request.model) {
        return Ok(None);
    }
    let asked = request.sluice.as_ref().and_then(|s| s.quality.as_deref());
    let header = headers
        .get(rules::HEADER_QUALITY)
        .and_then(|v| v.to_str().ok());
    let quality = rules::parse_quality(header.or(asked))?;
    // As tagged: from `sluice.feature` or the `x-sluice-feature` header.
    let feature = record.peek().and_then(|r| r.feature.clone());
    let messages = &request.messages;
    let tokens = || {
        messages
            .iter()
            .map(|m| u64::from(estimate_tokens(&m.text())))
            .sum()
    };
    let facts = Facts {
        feature: feature.as_deref(),
        tier: tier.map(|t| t.name.as_str()),
        quality,
        input_tokens: &tokens,
    };
    let allowed = |m: &str| refused_model(principal, tier, m).is_none();
    let decision = gw.config.routing.decide(&facts, &allowed)?;
    request.model = decision.model.clone();
    record.update(|r| r.routed_by = Some(decision.by));
    Ok(decision.escalate_to)
}

fn parse_chat(body: &[u8], headers: &HeaderMap) -> Result<ChatRequest, ApiError> {
    let mut request: ChatRequest = parse_body(body)?;
    // The header names the prompt when the body does not (an experiment may set it later).
    if let Some(p) = headers
        .get(HEADER_PROMPT)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.trim().is_empty())
    {
        let extras = request.sluice.get_or_insert_with(Default::default);
        if extras.prompt.is_none() {
            extras.prompt = Some(p.trim().to_string());
        }
    }
    if request.sluice.as_ref().is_some_and(|s| s.prompt.is_some()) {
        // The prompt supplies messages and may supply the model.
        return Ok(request);
    }
    if request.model.trim().is_empty() {
        return Err(ApiError::invalid(
            "`model` is required: name a model, or a prompt (`x-sluice-prompt` or `sluice.prompt`) whose model answers",
            Some("model".to_string()),
        ));
    }
    if request.messages.is_empty() {
        return Err(ApiError::invalid(
            "`messages` must contain at least one message",
            Some("messages".to_string()),
        ));
    }
    Ok(request)
}

/// What a regeneration is judged by: the messages, plus the prompt and its variables
/// when the request names one (its messages alone may be empty).
fn chat_input_hash(request: &ChatRequest) -> u64 {
    match request.sluice.as_ref().filter(|s| s.prompt.is_some()) {
        None => input_hash(&request.messages),
        Some(s) => input_hash(&(&request.messages, &s.prompt, &s.variables)),
    }
}

/// A request's resolved prompt: the cache-key part, its fallback text, its output rule.
struct ResolvedPrompt {
    /// `id@version#hash`.
    key: String,
    fallback: Option<String>,
    rule: Option<OutputRule>,
}

/// Resolve: the prompt the request names (`sluice.prompt`: the body's, the header's,
/// or an experiment's) -> its version; the variables bound (400 naming the variable);
/// its messages rendered before the client's own; its parameters filling what the
/// request left open; its model used when the request's `model` is absent or empty,
/// the prompt's id or one of `[prompts] model_aliases`. The record names the version and its hash.
fn resolve_prompt(
    gw: &Gateway,
    record: &mut RecordGuard,
    request: &mut ChatRequest,
) -> Result<Option<ResolvedPrompt>, ApiError> {
    use crate::prompts::{PromptError, render};
    let Some(reference) = request.sluice.as_ref().and_then(|s| s.prompt.clone()) else {
        return Ok(None);
    };
    let version = gw.prompts.registry().resolve(&reference)?;
    record.update(|r| {
        r.prompt_id = Some(version.id.clone());
        r.prompt_version = Some(version.version.to_string());
        r.prompt_hash = Some(version.hash.clone());
    });
    let no_variables = serde_json::Map::new();
    let given = request
        .sluice
        .as_ref()
        .map(|s| &s.variables)
        .unwrap_or(&no_variables);
    let vars = render::bind(&version.variables, given)?;
    render::apply(&version, &vars, request)?;
    let asked = request.model.trim();
    if asked.is_empty()
        || asked == version.id
        || gw.prompts.config().model_aliases.iter().any(|a| a == asked)
    {
        request.model = version.model.clone().ok_or_else(|| PromptError::NoModel {
            reference: version.reference(),
        })?;
    }
    let model = request.model.clone();
    record.update(|r| r.model_requested = Some(model));
    let fallback =
        version
            .render("fallback", &vars)
            .map_err(|message| PromptError::RenderFailed {
                reference: version.reference(),
                message,
            })?;
    let rule = (!version.validators.is_empty()).then(|| OutputRule {
        when: Default::default(),
        validators: version.validators.clone(),
        on_fail: version.on_fail,
        retries: version.retries,
    });
    Ok(Some(ResolvedPrompt {
        key: format!("{}#{}", version.reference(), version.hash),
        fallback,
        rule,
    }))
}

/// Call the chain for a whole answer, then hold it to the output rule: on failure,
/// retry the same model, escalate to the next, fall back to the template, flag, or
/// reject, as the rule says. `as_sse` replays the answer as a stream (buffered mode).
async fn complete_chat(
    gw: Arc<Gateway>,
    mut record: RecordGuard,
    request: ChatRequest,
    plan: Dispatch,
    as_sse: bool,
) -> Response {
    let Dispatch {
        chain,
        rule,
        demand,
        cache_key,
    } = plan;
    let mut first = 0usize;
    let mut output_retries_left = rule.as_ref().map(|r| r.retries).unwrap_or(0);
    let mut calls_before = Attempts::default();
    // Identical cacheable misses in flight at once share one upstream call (not under
    // an output rule: a shared answer would skip this request's own checks).
    let mut flight = cache_key.filter(|_| rule.is_none()).map(|(key, _)| key);
    loop {
        let (result, mut attempts) = match flight.take() {
            Some(key) => match shared_chain_call(&gw, key, &request, &chain, demand).await {
                Shared::Led(result, attempts) => (result, attempts),
                Shared::Joined(route, response) => {
                    let shared = CachedAnswer {
                        response,
                        model: route.model.clone(),
                        stored_at: 0,
                    };
                    return respond_cached(
                        &gw,
                        record,
                        &request,
                        Some(&route),
                        &shared,
                        "coalesced",
                    );
                }
                Shared::Failed(error) => (Err(error), Attempts::default()),
            },
            None => call_chain(&gw, &request, &chain.routes[first..], demand).await,
        };
        attempts.calls += calls_before.calls;
        attempts.retries += calls_before.retries;
        attempts.answered_by += first;
        note_attempts(&mut record, &attempts);
        let (route, response) = match result {
            Ok(answer) => answer,
            Err(error) => {
                return match template_fallback(&gw, &chain, &request, &record, &error) {
                    Some(text) => respond_template(record, &request, &text, as_sse),
                    None => fail(record, ApiError::Upstream(error)),
                };
            }
        };
        record_usage(&mut record, (&gw.prices, &route), response.usage, || {
            estimate_chat(&request, &response)
        });
        let body_log = gw.body_for_log(&response);
        record.update(|r| r.response_body = body_log);
        let fallback = (attempts.answered_by > 0).then_some(FallbackKind::Model);

        let Some(rule) = rule.as_ref() else {
            let http =
                respond_completion(record, &route, fallback, &response, &request, as_sse, None);
            store_answer(&gw, cache_key, &route, response, &http);
            return http;
        };
        let failures = output::failures(&rule.validators, &answer_text(&response));
        let checked = format!(
            "{}:{}",
            route.model,
            if failures.is_empty() { "pass" } else { "fail" }
        );
        record.update(|r| {
            r.output_checks = Some(match r.output_checks.take() {
                Some(before) => format!("{before},{checked}"),
                None => checked,
            });
        });
        if failures.is_empty() {
            record.update(|r| r.output_check = Some("pass".into()));
            let http =
                respond_completion(record, &route, fallback, &response, &request, as_sse, None);
            store_answer(&gw, cache_key, &route, response, &http);
            return http;
        }
        let why = failures.join("; ");
        tracing::info!(request_id = record.request_id(), model = %route.model, action = rule.on_fail.as_str(), failures = %why, "answer failed its output checks");
        record.update(|r| r.output_check = Some(format!("fail:{}", rule.on_fail.as_str())));
        match rule.on_fail {
            OnFail::Flag => {
                return respond_completion(
                    record,
                    &route,
                    fallback,
                    &response,
                    &request,
                    as_sse,
                    Some(Outcome::BadOutput),
                );
            }
            OnFail::Retry if output_retries_left > 0 => {
                output_retries_left -= 1;
                first = attempts.answered_by;
            }
            OnFail::Escalate if attempts.answered_by + 1 < chain.routes.len() => {
                first = attempts.answered_by + 1;
            }
            OnFail::Fallback => {
                if let Some(text) = template_text(&gw, &chain, &request, &record) {
                    return respond_template(record, &request, &text, as_sse);
                }
                return fail(record, ApiError::OutputInvalid { message: why });
            }
            OnFail::Retry | OnFail::Escalate | OnFail::Reject => {
                return fail(record, ApiError::OutputInvalid { message: why });
            }
        }
        calls_before = attempts;
        calls_before.answered_by = 0;
    }
}

/// One walk of a chat chain: retries, fallbacks, capacity, timeouts. Owns nothing of
/// the caller's, so a single-flight leader can run it in a task of its own.
async fn call_chain(
    gw: &Gateway,
    request: &ChatRequest,
    routes: &[Arc<Route>],
    demand: Demand,
) -> (Result<(Arc<Route>, ChatResponse), UpstreamError>, Attempts) {
    let mut attempts = Attempts::default();
    let result = gw
        .retrier
        .run_chain(routes, &mut attempts, |route| async move {
            take_capacity(&route, demand).await?;
            let call = ChatCall {
                request,
                upstream_model: &route.upstream_model,
                timeouts: route.timeouts,
                capacity: route.capacity.as_deref(),
            };
            let response =
                within_total(&route, "complete answer", route.provider.chat(call)).await?;
            Ok((route, response))
        })
        .await;
    (result, attempts)
}

/// What a single-flight leader shares: the route that answered, the answer, and what
/// it took (the followers made no call of their own).
pub type FlightAnswer = (Arc<Route>, ChatResponse, Attempts);

enum Shared {
    /// This request made the call.
    Led(Result<(Arc<Route>, ChatResponse), UpstreamError>, Attempts),
    /// An identical request made it; this one gets its answer.
    Joined(Arc<Route>, ChatResponse),
    /// Waiting failed (deadline, or the identical requests failed twice).
    Failed(UpstreamError),
}

async fn shared_chain_call(
    gw: &Arc<Gateway>,
    key: CacheKey,
    request: &ChatRequest,
    chain: &Chain,
    demand: Demand,
) -> Shared {
    let deadline = tokio::time::Instant::now() + gw.config.retry.deadline;
    let (leader_gw, leader_request, routes) = (gw.clone(), request.clone(), chain.routes.clone());
    let run = gw.flight.run(key, deadline, move || async move {
        match call_chain(&leader_gw, &leader_request, &routes, demand).await {
            (Ok((route, response)), attempts) => Ok((route, response, attempts)),
            (Err(e), attempts) => Err((e, attempts)),
        }
    });
    match run.await {
        Ok(flight) if flight.shared => {
            gw.metrics.cache_flight_waiter("joined");
            let (route, response, _) = flight.value;
            Shared::Joined(route, response)
        }
        Ok(flight) => {
            let (route, response, attempts) = flight.value;
            Shared::Led(Ok((route, response)), attempts)
        }
        Err(FlightError::Failed((e, attempts))) => Shared::Led(Err(e), attempts),
        Err(FlightError::Timeout) => {
            gw.metrics.cache_flight_waiter("timeout");
            Shared::Failed(UpstreamError::new(
                ErrorClass::Timeout,
                "gateway",
                "no answer before the request deadline while waiting for an identical request",
            ))
        }
        Err(FlightError::LeaderFailed) => {
            gw.metrics.cache_flight_waiter("leader_failed");
            Shared::Failed(UpstreamError::new(
                ErrorClass::Server,
                "gateway",
                "identical requests in flight failed upstream",
            ))
        }
    }
}

/// The text an output check reads: the first choice's content.
fn answer_text(response: &ChatResponse) -> String {
    response
        .choices
        .first()
        .map(|c| c.message.text())
        .unwrap_or_default()
}

/// Answer with a whole completion, as JSON or (buffered mode) replayed as SSE.
fn respond_completion(
    mut record: RecordGuard,
    route: &Route,
    fallback: Option<FallbackKind>,
    response: &ChatResponse,
    request: &ChatRequest,
    as_sse: bool,
    flagged: Option<Outcome>,
) -> Response {
    let outcome = flagged.unwrap_or(Outcome::Ok);
    if !as_sse {
        // The upstream's own bytes when it sent JSON that needed no translation.
        let mut http = match &response.raw {
            Some(raw) => respond_body(record, route, fallback, raw.clone(), outcome),
            None => respond_json(record, route, fallback, response, outcome),
        };
        if flagged.is_some() {
            set_header(&mut http, HEADER_OUTPUT, "flagged");
        }
        return http;
    }
    record.update(|r| {
        r.model = Some(route.model.clone());
        r.provider = Some(route.provider_name.clone());
        r.fallback = fallback;
    });
    // Buffered: the first byte goes out with the whole answer.
    let elapsed = record.elapsed_ms();
    record.update(|r| r.ttft_ms = Some(elapsed));
    let request_id = record.request_id().to_string();
    let frames = completion_frames(response, request.wants_stream_usage());
    record.finish(outcome, 200, None);
    let mut http = sse_from_frames(frames, &request_id, &route.model, fallback);
    if flagged.is_some() {
        set_header(&mut http, HEADER_OUTPUT, "flagged");
    }
    http
}

fn respond_template(
    mut record: RecordGuard,
    request: &ChatRequest,
    text: &str,
    as_sse: bool,
) -> Response {
    record.update(|r| {
        r.model = Some(request.model.clone());
        r.fallback = Some(FallbackKind::Template);
    });
    let response = template_completion(&request.model, text, record.request_id());
    let request_id = record.request_id().to_string();
    if as_sse {
        record.finish(Outcome::Ok, 200, None);
        let frames = completion_frames(&response, request.wants_stream_usage());
        return sse_from_frames(
            frames,
            &request_id,
            &request.model,
            Some(FallbackKind::Template),
        );
    }
    let mut http = axum::Json(&response).into_response();
    finish_ok(
        record,
        &mut http,
        &request.model,
        Some(FallbackKind::Template),
        Outcome::Ok,
    );
    http
}

/// The input guard step both endpoints share: the policy for this model and feature,
/// `check` run against the chain's first upstream model (for exact token counts), and
/// on success what the guard did noted in the record, with the opt-in stored body being
/// what goes upstream (sanitized, capped, PII redacted).
fn guard_input<T: serde::Serialize>(
    gw: &Gateway,
    record: &mut RecordGuard,
    request: &mut T,
    (model, feature, tier): (&str, Option<&str>, Option<&Tier>),
    chain: &Chain,
    check: impl FnOnce(&mut T, &guard::config::InputPolicy, &str) -> Result<guard::Report, ApiError>,
) -> Result<guard::Report, ApiError> {
    let mut policy = gw
        .config
        .guard
        .input_for(model, feature, tier.map(|t| t.name.as_str()));
    // A tier's caps tighten the guard's, never loosen them.
    if let Some(t) = tier {
        if let Some(cap) = t.max_input_tokens.filter(|c| *c < policy.max_tokens) {
            policy.to_mut().max_tokens = cap;
        }
        if let Some(cap) = t
            .max_tokens
            .filter(|c| policy.max_output_tokens.is_none_or(|p| *c < p))
        {
            policy.to_mut().max_output_tokens = Some(cap);
        }
    }
    let upstream_model = chain
        .routes
        .first()
        .map(|r| r.upstream_model.as_str())
        .unwrap_or(model);
    let report = check(request, &policy, upstream_model)?;
    let body_log = gw.body_for_log(&*request);
    record.update(|r| {
        r.guard_changes = (!report.changes.is_empty()).then(|| report.changes.join(","));
        r.guard_flags = (!report.flags.is_empty()).then(|| report.flags.join(","));
        r.request_body = body_log;
    });
    Ok(report)
}

/// What dispatch works from: the chain, the output rule, what the request asks of
/// provider capacity, and where a good answer is cached (key, time to live).
struct Dispatch {
    chain: Chain,
    rule: Option<OutputRule>,
    demand: Demand,
    cache_key: Option<(CacheKey, std::time::Duration)>,
}

/// Whether and how this request uses the cache: `x-sluice-cache: no-store` skips it,
/// `refresh` skips the lookup but stores the new answer, `store` opts a
/// non-deterministic request in (the config may also cache those).
struct CachePlan {
    key: CacheKey,
    ttl: std::time::Duration,
    read: bool,
    write: bool,
}

fn plan_cache(
    gw: &Gateway,
    headers: &HeaderMap,
    principal: &Principal,
    request: &ChatRequest,
    (chain, prompt): (&Chain, Option<&str>),
    feature: Option<&str>,
) -> Option<CachePlan> {
    let config = &gw.config.cache;
    if !config.enabled {
        return None;
    }
    let asked = headers
        .get(HEADER_CACHE)
        .and_then(|v| v.to_str().ok())
        .or_else(|| request.sluice.as_ref().and_then(|s| s.cache.as_deref()))
        .map(str::trim);
    if asked == Some("no-store") {
        return None;
    }
    let opted_in = asked == Some("store") || !config.only_deterministic;
    if !(opted_in || crate::cache::is_deterministic(request)) {
        return None;
    }
    let route = chain.routes.first()?;
    let scope = match config.scope {
        CacheScope::Owner => crate::cache::Scope::Owner(principal.owner.as_deref()),
        CacheScope::Global => crate::cache::Scope::Global,
    };
    let key = crate::cache::chat_key(scope, &route.upstream_model, prompt, request)?;
    Some(CachePlan {
        key,
        ttl: config.ttl_for(&request.model, feature),
        read: asked != Some("refresh"),
        write: true,
    })
}

/// Keep a good answer for the next identical request (off the request path).
fn store_answer(
    gw: &Gateway,
    cache_key: Option<(CacheKey, std::time::Duration)>,
    route: &Route,
    response: ChatResponse,
    sent: &Response,
) {
    let Some((key, ttl)) = cache_key else {
        return;
    };
    // The cache keeps the parsed answer only (a hit is sent with a new id); the
    // upstream's bytes, when the answer has them, are what it sends Redis.
    let answer = CachedAnswer {
        response,
        model: route.model.clone(),
        stored_at: i64::try_from(unix_now()).unwrap_or(0) * 1000,
    };
    // The answer as the client got it weighs about what the cached one does (give or
    // take the wrapper, and the upstream's whitespace when its bytes were passed on):
    // known exactly for a JSON body, so it need not be serialized again.
    let json_len = axum::body::HttpBody::size_hint(sent.body())
        .exact()
        .and_then(|n| usize::try_from(n).ok())
        .map(|n| n + answer.model.len() + 40);
    gw.cache.store(key, answer, ttl, json_len);
}

/// Answer from the cache (`status` "hit") or with what an identical request in flight
/// got ("coalesced"): the answer under a new id, as JSON or replayed as SSE; the record
/// shows its tokens, cost 0 and what it saved.
fn respond_cached(
    gw: &Gateway,
    mut record: RecordGuard,
    request: &ChatRequest,
    priced_by: Option<&Route>,
    hit: &CachedAnswer,
    status: &'static str,
) -> Response {
    let mut response = hit.response.clone();
    response.raw = None;
    response.id = format!("chatcmpl-{}", record.request_id());
    response.created = unix_now();
    let usage = response.usage.unwrap_or_default();
    let saved = priced_by.and_then(|route| {
        gw.prices.cost(
            &route.model,
            &route.upstream_model,
            TokenUsage {
                prompt: u64::from(usage.prompt_tokens),
                completion: u64::from(usage.completion_tokens),
                cached_prompt: u64::from(usage.cached_tokens()),
            },
        )
    });
    let elapsed = record.elapsed_ms();
    record.update(|r| {
        r.cache_status = Some(status.into());
        r.model = Some(hit.model.clone());
        r.prompt_tokens = usage.prompt_tokens;
        r.completion_tokens = usage.completion_tokens;
        r.cached_prompt_tokens = usage.cached_tokens();
        r.ttft_ms = Some(elapsed);
        usage::record_cost(r, Some(Cost::ZERO), saved);
    });
    let mut http = if request.is_stream() {
        let request_id = record.request_id().to_string();
        record.finish(Outcome::Ok, 200, None);
        let frames = completion_frames(&response, request.wants_stream_usage());
        sse_from_frames(frames, &request_id, &hit.model, None)
    } else {
        let mut http = axum::Json(&response).into_response();
        finish_ok(record, &mut http, &hit.model, None, Outcome::Ok);
        http
    };
    set_header(&mut http, HEADER_CACHE, "hit");
    http
}

/// What a request asks of provider capacity: its tier's priority and its token estimate.
#[derive(Debug, Clone, Copy)]
struct Demand {
    priority: u32,
    /// The input estimate plus the output allowance.
    tokens: u64,
    /// The input estimate alone (a stream without upstream usage is recorded with it).
    input: u32,
}

impl Demand {
    fn new(tier: Option<&Tier>, input: u32, output: u32) -> Self {
        Demand {
            priority: tier.map(|t| t.priority).unwrap_or(0),
            tokens: u64::from(input) + u64::from(output),
            input,
        }
    }
}

/// Provider capacity: wait for room on this route's model, higher tiers first, or be
/// shed (429 with retry-after; the chain may still try the next model).
async fn take_capacity(route: &Route, demand: Demand) -> Result<(), UpstreamError> {
    let Some(capacity) = route.capacity.as_deref() else {
        return Ok(());
    };
    let tokens = u32::try_from(demand.tokens).unwrap_or(u32::MAX);
    let deadline = tokio::time::Instant::now() + route.timeouts.total;
    capacity
        .admit(demand.priority, tokens, deadline)
        .await
        .map_err(|shed| UpstreamError {
            retry_after: Some(shed.retry_after),
            ..UpstreamError::new(
                ErrorClass::CapacityExceeded,
                "gateway",
                format!(
                    "provider capacity for `{}` is exhausted ({}); lower tiers are shed first",
                    route.model,
                    shed.reason.as_str()
                ),
            )
        })
}

/// An upstream call bounded by the model's total timeout.
async fn within_total<T>(
    route: &Route,
    what: &str,
    call: impl std::future::Future<Output = Result<T, UpstreamError>>,
) -> Result<T, UpstreamError> {
    match tokio::time::timeout(route.timeouts.total, call).await {
        Err(_) => Err(UpstreamError::timeout(
            route.provider.kind(),
            what,
            route.timeouts.total,
        )),
        Ok(r) => r,
    }
}

fn note_attempts(record: &mut RecordGuard, attempts: &Attempts) {
    let a = attempts.clone();
    record.add_upstream_time(a.upstream_time, a.waited);
    record.update(|r| {
        r.retries = a.retries;
        r.upstream_calls = a.calls;
    });
}

/// Add an answered call's tokens and cost (at the price of the route that answered) to
/// the record. Added, not set: output-check retries and escalations each consumed
/// tokens, and the record must show all of them.
fn record_usage(
    record: &mut RecordGuard,
    (prices, route): (&PriceBook, &Route),
    usage: Option<Usage>,
    estimate: impl FnOnce() -> Usage,
) {
    let (usage, estimated) = match usage {
        Some(u) => (u, false),
        None => (estimate(), true),
    };
    let cost = prices.cost(
        &route.model,
        &route.upstream_model,
        TokenUsage {
            prompt: u64::from(usage.prompt_tokens),
            completion: u64::from(usage.completion_tokens),
            cached_prompt: u64::from(usage.cached_tokens()),
        },
    );
    record.update(|r| {
        r.prompt_tokens = r.prompt_tokens.saturating_add(usage.prompt_tokens);
        r.cached_prompt_tokens = r.cached_prompt_tokens.saturating_add(usage.cached_tokens());
        r.completion_tokens = r.completion_tokens.saturating_add(usage.completion_tokens);
        r.tokens_estimated |= estimated;
        let total = match (r.cost_nanos.map(Cost::from_nanos), cost) {
            (Some(a), Some(b)) => Some(Cost::from_nanos(a.nanos.saturating_add(b.nanos))),
            (a, b) => a.or(b),
        };
        usage::record_cost(r, total, None);
    });
}

/// A rough estimate for upstreams that report no usage: about four characters a token.
fn estimate_tokens(text: &str) -> u32 {
    u32::try_from(text.chars().count().div_ceil(4)).unwrap_or(u32::MAX)
}

fn estimate_chat(request: &ChatRequest, response: &ChatResponse) -> Usage {
    let prompt: u32 = request
        .messages
        .iter()
        .map(|m| estimate_tokens(&m.text()))
        .sum();
    let completion: u32 = response
        .choices
        .iter()
        .map(|c| estimate_tokens(&c.message.text()))
        .sum();
    Usage::new(prompt, completion)
}

fn respond_json<T: serde::Serialize>(
    record: RecordGuard,
    route: &Route,
    fallback: Option<FallbackKind>,
    body: &T,
    outcome: Outcome,
) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => respond_body(record, route, fallback, bytes.into(), outcome),
        Err(e) => fail(
            record,
            ApiError::Internal(format!("cannot encode response: {e}")),
        ),
    }
}

/// [`respond_json`] for a body already in JSON.
fn respond_body(
    mut record: RecordGuard,
    route: &Route,
    fallback: Option<FallbackKind>,
    json: Bytes,
    outcome: Outcome,
) -> Response {
    record.update(|r| {
        r.model = Some(route.model.clone());
        r.provider = Some(route.provider_name.clone());
        r.fallback = fallback;
    });
    let mut response = ([(header::CONTENT_TYPE, "application/json")], json).into_response();
    finish_ok(record, &mut response, &route.model, fallback, outcome);
    response
}

fn finish_ok(
    record: RecordGuard,
    response: &mut Response,
    model: &str,
    fallback: Option<FallbackKind>,
    outcome: Outcome,
) {
    set_header(response, HEADER_REQUEST_ID, record.request_id());
    set_header(response, HEADER_MODEL, model);
    if let Some(f) = fallback {
        set_header(response, HEADER_FALLBACK, f.as_str());
    }
    record.finish(outcome, response.status().as_u16(), None);
}

/// The template's text when the chain failed in a way a template should cover.
fn template_fallback(
    gw: &Gateway,
    chain: &Chain,
    request: &ChatRequest,
    record: &RecordGuard,
    error: &UpstreamError,
) -> Option<String> {
    if !error.class.may_fall_back() {
        return None;
    }
    let text = template_text(gw, chain, request, record)?;
    tracing::warn!(request_id = record.request_id(), model = %request.model, error = %error, "all models failed; answering from the template fallback");
    Some(text)
}

/// The requested model's template fallback, rendered for this request.
fn template_text(
    gw: &Gateway,
    chain: &Chain,
    request: &ChatRequest,
    record: &RecordGuard,
) -> Option<String> {
    if let Some(text) = &chain.prompt_fallback {
        return Some(text.clone());
    }
    let name = chain.template.as_deref()?;
    let sluice = request.sluice.clone().unwrap_or_default();
    let input = request.last_user_text();
    // As tagged: the body's, else the headers'.
    let tagged = record.peek();
    let ctx = TemplateContext {
        model: &request.model,
        user: tagged.and_then(|r| r.user.as_deref()),
        feature: tagged.and_then(|r| r.feature.as_deref()),
        input: &input,
        variables: &sluice.variables,
    };
    match gw.router.render_template(name, &ctx) {
        Ok(text) => Some(text),
        Err(e) => {
            tracing::error!(request_id = record.request_id(), error = %e, "template fallback failed");
            None
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn template_completion(model: &str, text: &str, request_id: &str) -> ChatResponse {
    ChatResponse {
        id: format!("chatcmpl-{request_id}"),
        object: "chat.completion".into(),
        created: unix_now(),
        model: model.to_string(),
        choices: vec![Choice {
            index: 0,
            message: ChatMessage::assistant(text),
            finish_reason: Some("stop".into()),
            extra: Default::default(),
        }],
        usage: Some(Usage::new(0, 0)),
        extra: Default::default(),
        raw: None,
    }
}

// ---------------------------------------------------------------- streaming

/// A stream whose first chunk has arrived: from here on it is the client's.
struct Opened {
    route: Arc<Route>,
    first: StreamChunk,
    rest: ChunkStream,
    deadline: tokio::time::Instant,
    ttft_ms: f64,
}

/// Stream the answer through as it arrives. An output rule here only flags (others
/// need the whole answer first and use buffered mode): it is checked when the stream
/// ends, and the record says `bad_output` if the answer failed.
async fn stream_chat(
    gw: Arc<Gateway>,
    mut record: RecordGuard,
    request: ChatRequest,
    plan: Dispatch,
) -> Response {
    let Dispatch {
        chain,
        rule,
        demand,
        cache_key,
    } = plan;
    let mut attempts = Attempts::default();
    let started = Instant::now();
    let result = gw
        .retrier
        .run_chain(&chain.routes, &mut attempts, |route| {
            let request = &request;
            async move {
                take_capacity(&route, demand).await?;
                let kind = route.provider.kind();
                let deadline = tokio::time::Instant::now() + route.timeouts.total;
                let first_byte = route.timeouts.first_byte;
                let open = async {
                    let call = ChatCall {
                        request,
                        upstream_model: &route.upstream_model,
                        timeouts: route.timeouts,
                        capacity: route.capacity.as_deref(),
                    };
                    let mut rest = route.provider.chat_stream(call).await?;
                    match rest.next().await {
                        Some(Ok(first)) => Ok((first, rest)),
                        Some(Err(e)) => Err(e),
                        None => Err(UpstreamError::new(
                            ErrorClass::Connection,
                            kind,
                            "stream ended before its first chunk",
                        )),
                    }
                };
                match tokio::time::timeout(first_byte, open).await {
                    Err(_) => Err(UpstreamError::timeout(
                        kind,
                        "first stream chunk",
                        first_byte,
                    )),
                    Ok(Err(e)) => Err(e),
                    Ok(Ok((first, rest))) => Ok(Opened {
                        route: route.clone(),
                        first,
                        rest,
                        deadline,
                        ttft_ms: started.elapsed().as_secs_f64() * 1000.0,
                    }),
                }
            }
        })
        .await;
    note_attempts(&mut record, &attempts);
    match result {
        Ok(opened) => {
            let fallback = (attempts.answered_by > 0).then_some(FallbackKind::Model);
            record.update(|r| {
                r.model = Some(opened.route.model.clone());
                r.provider = Some(opened.route.provider_name.clone());
                r.fallback = fallback;
                r.ttft_ms = Some(opened.ttft_ms);
            });
            let model = opened.route.model.clone();
            let request_id = record.request_id().to_string();
            let (tx, rx) = mpsc::channel::<Bytes>(32);
            let wants_usage = request.wants_stream_usage();
            // Counted once, for limits, before dispatch.
            let prompt_estimate = demand.input;
            let tally = StreamTally {
                record,
                route: opened.route.clone(),
                prices: gw.prices.clone(),
                usage: None,
                content_chunks: 0,
                prompt_estimate,
                started: tokio::time::Instant::now(),
                body: gw.config.storage.store_bodies.then(String::new),
                answer: (rule.is_some() || cache_key.is_some()).then(String::new),
                cache: cache_key.map(|(key, ttl)| StreamCache {
                    key,
                    ttl,
                    cache: gw.cache.clone(),
                    model: opened.route.model.clone(),
                    upstream_model: None,
                    finish_reason: None,
                    cacheable: true,
                }),
            };
            gw.tasks.spawn(forward_stream(
                opened,
                tx,
                tally,
                wants_usage,
                gw.shutdown.clone(),
                rule,
            ));
            sse_response(rx, &request_id, &model, fallback)
        }
        Err(error) => match template_fallback(&gw, &chain, &request, &record, &error) {
            Some(text) => respond_template(record, &request, &text, true),
            None => fail(record, ApiError::Upstream(error)),
        },
    }
}

/// Serve ready-made SSE frames (template answers, buffered mode).
fn sse_from_frames(
    frames: Vec<Bytes>,
    request_id: &str,
    model: &str,
    fallback: Option<FallbackKind>,
) -> Response {
    let (tx, rx) = mpsc::channel::<Bytes>(frames.len().max(1));
    for frame in frames {
        // The channel was sized to hold every frame, so this never waits or fails.
        let _ = tx.try_send(frame);
    }
    drop(tx);
    sse_response(rx, request_id, model, fallback)
}

fn sse_frame(data: &str) -> Bytes {
    let mut buf = Vec::with_capacity(data.len() + 8);
    buf.extend_from_slice(b"data: ");
    buf.extend_from_slice(data.as_bytes());
    buf.extend_from_slice(b"\n\n");
    Bytes::from(buf)
}

const DONE_FRAME: &[u8] = b"data: [DONE]\n\n";

fn sse_response(
    rx: mpsc::Receiver<Bytes>,
    request_id: &str,
    model: &str,
    fallback: Option<FallbackKind>,
) -> Response {
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<Bytes, Infallible>(b), rx))
    });
    let mut response = Response::new(Body::from_stream(body));
    *response.status_mut() = StatusCode::OK;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    set_header(&mut response, HEADER_REQUEST_ID, request_id);
    set_header(&mut response, HEADER_MODEL, model);
    if let Some(f) = fallback {
        set_header(&mut response, HEADER_FALLBACK, f.as_str());
    }
    response
}

/// What a stream forwarder accumulates for the record.
struct StreamTally {
    record: RecordGuard,
    /// The route that answered, and the prices its cost is figured at.
    route: Arc<Route>,
    prices: Arc<PriceBook>,
    usage: Option<Usage>,
    content_chunks: u32,
    prompt_estimate: u32,
    started: tokio::time::Instant,
    /// The chunks' payloads, only when bodies are stored.
    body: Option<String>,
    /// The answer's text, only when an output rule will check it or it will be cached.
    answer: Option<String>,
    /// Where a stream that ends cleanly is stored, reassembled into a whole answer.
    cache: Option<StreamCache>,
}

/// What a cacheable stream needs beyond its text to become a whole answer.
struct StreamCache {
    key: CacheKey,
    ttl: std::time::Duration,
    cache: Arc<ResponseCache>,
    /// The configured model that answered.
    model: String,
    /// The upstream's own model name, from the chunks.
    upstream_model: Option<String>,
    finish_reason: Option<String>,
    /// False once a chunk carries anything a text replay would lose (tool calls).
    cacheable: bool,
}

impl StreamCache {
    fn observe(&mut self, chunk: &serde_json::Value) {
        if self.upstream_model.is_none() {
            self.upstream_model = chunk["model"].as_str().map(str::to_string);
        }
        let choice = &chunk["choices"][0];
        if let Some(reason) = choice["finish_reason"].as_str() {
            self.finish_reason = Some(reason.to_string());
        }
        if !choice["delta"]["tool_calls"].is_null()
            || chunk["choices"].as_array().is_some_and(|c| c.len() > 1)
        {
            self.cacheable = false;
        }
    }

    /// Store the finished stream as a whole answer (never a cut one: only called on a
    /// clean end).
    fn store(self, text: String, usage: Option<Usage>) {
        if !self.cacheable {
            return;
        }
        let response = ChatResponse {
            id: String::new(),
            object: "chat.completion".into(),
            created: unix_now(),
            model: self.upstream_model.unwrap_or_else(|| self.model.clone()),
            choices: vec![Choice {
                index: 0,
                message: ChatMessage::assistant(&text),
                finish_reason: Some(self.finish_reason.unwrap_or_else(|| "stop".into())),
                extra: Default::default(),
            }],
            usage,
            extra: Default::default(),
            raw: None,
        };
        let answer = CachedAnswer {
            response,
            model: self.model,
            stored_at: i64::try_from(unix_now()).unwrap_or(0) * 1000,
        };
        self.cache.store(self.key, answer, self.ttl, None);
    }
}

impl StreamTally {
    /// Put what the stream carried into the record (before it is finished or dropped).
    fn settle(&mut self) {
        // Without an upstream count: OpenAI-style streams send about one token per chunk.
        // The record says it is an estimate.
        let (prompt, chunks) = (self.prompt_estimate, self.content_chunks);
        record_usage(
            &mut self.record,
            (&self.prices, &self.route),
            self.usage,
            || Usage::new(prompt, chunks),
        );
        self.record
            .add_upstream_time(self.started.elapsed(), std::time::Duration::ZERO);
        let body = self.body.take().map(|b| redact_secrets(&b));
        self.record.update(|r| r.response_body = body);
    }
}

/// Forward chunks as they arrive until the upstream ends, fails, runs out of time, the
/// gateway shuts down, or the client goes away (then the upstream stream is dropped,
/// which cancels the call, and the guard records `client_cancelled`).
async fn forward_stream(
    opened: Opened,
    tx: mpsc::Sender<Bytes>,
    mut tally: StreamTally,
    wants_usage: bool,
    shutdown: CancellationToken,
    rule: Option<OutputRule>,
) {
    let Opened {
        first,
        mut rest,
        deadline,
        ..
    } = opened;
    let mut next = Some(Ok(first));
    loop {
        let item = match next.take() {
            Some(item) => Some(item),
            None => {
                tokio::select! {
                    biased;
                    _ = tx.closed() => {
                        tally.settle();
                        return;
                    }
                    _ = shutdown.cancelled() => Some(Err(UpstreamError::new(
                        ErrorClass::Connection,
                        "gateway",
                        "the gateway is shutting down",
                    ))),
                    item = tokio::time::timeout_at(deadline, rest.next()) => match item {
                        Ok(item) => item,
                        Err(_) => Some(Err(UpstreamError::new(
                            ErrorClass::Timeout,
                            "gateway",
                            "stream exceeded the model's total timeout",
                        ))),
                    },
                }
            }
        };
        match item {
            None => {
                tally.settle();
                if tx.send(Bytes::from_static(DONE_FRAME)).await.is_err() {
                    return;
                }
                let outcome = match (&rule, &tally.answer) {
                    (Some(rule), Some(text)) => {
                        let failed = !output::failures(&rule.validators, text).is_empty();
                        let check = if failed { "fail:flag" } else { "pass" };
                        tally.record.update(|r| r.output_check = Some(check.into()));
                        if failed {
                            Outcome::BadOutput
                        } else {
                            Outcome::Ok
                        }
                    }
                    _ => Outcome::Ok,
                };
                if outcome == Outcome::Ok
                    && let (Some(c), Some(text)) = (tally.cache.take(), tally.answer.take())
                {
                    c.store(text, tally.usage);
                }
                tally.record.finish(outcome, 200, None);
                return;
            }
            Some(Ok(chunk)) => {
                if chunk.usage.is_some() {
                    tally.usage = chunk.usage;
                }
                if let Some(body) = tally.body.as_mut() {
                    body.push_str(&chunk.data);
                    body.push('\n');
                }
                if let Some(answer) = tally.answer.as_mut()
                    && let Ok(v) = serde_json::from_str::<serde_json::Value>(&chunk.data)
                {
                    if let Some(text) = v["choices"][0]["delta"]["content"].as_str() {
                        answer.push_str(text);
                    }
                    if let Some(c) = tally.cache.as_mut() {
                        c.observe(&v);
                    }
                }
                if chunk.usage_only && !wants_usage {
                    continue;
                }
                tally.content_chunks += u32::from(!chunk.usage_only);
                if tx.send(sse_frame(&chunk.data)).await.is_err() {
                    tally.settle();
                    return;
                }
            }
            Some(Err(error)) => {
                tally.settle();
                tracing::warn!(request_id = tally.record.request_id(), %error, "stream failed after its first chunk");
                let api = ApiError::Upstream(UpstreamError {
                    message: format!("stream interrupted: {}", error.message),
                    ..error
                });
                let mut body = api.body();
                body["error"]["code"] = json!("stream_interrupted");
                let _ = tx.send(sse_frame(&body.to_string())).await;
                tally.record.finish(
                    Outcome::ApiError,
                    api.status_code().as_u16(),
                    Some("stream_interrupted".into()),
                );
                return;
            }
        }
    }
}

/// A whole completion as stream frames: the role, the content, the finish reason, the
/// usage (when asked for), `[DONE]`.
fn completion_frames(response: &ChatResponse, wants_usage: bool) -> Vec<Bytes> {
    let chunk = |delta: serde_json::Value, finish: Option<&str>| {
        json!({"id": response.id, "object": "chat.completion.chunk", "created": response.created, "model": response.model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let choice = response.choices.first();
    let text = choice.map(|c| c.message.text()).unwrap_or_default();
    let finish = choice
        .and_then(|c| c.finish_reason.clone())
        .unwrap_or_else(|| "stop".into());
    let mut frames = vec![
        sse_frame(&chunk(json!({"role": "assistant", "content": ""}), None).to_string()),
        sse_frame(&chunk(json!({"content": text}), None).to_string()),
        sse_frame(&chunk(json!({}), Some(&finish)).to_string()),
    ];
    if wants_usage {
        let usage = json!({"id": response.id, "object": "chat.completion.chunk", "created": response.created,
                           "model": response.model, "choices": [], "usage": response.usage.unwrap_or_default()});
        frames.push(sse_frame(&usage.to_string()));
    }
    frames.push(Bytes::from_static(DONE_FRAME));
    frames
}

// ---------------------------------------------------------------- embeddings

pub async fn embeddings(
    gw: Arc<Gateway>,
    headers: HeaderMap,
    body: Result<Bytes, ApiError>,
) -> Response {
    let started = Instant::now();
    let mut record = gw.record(Endpoint::Embeddings, started);
    let principal = match gw.auth.authenticate(&headers) {
        Ok(p) => p,
        Err(e) => return fail(record, e),
    };
    let max_depth = gw.config.guard.input.max_depth;
    let mut request: EmbeddingsRequest = match body.and_then(|b| {
        guard::input::precheck(&b, max_depth)?;
        parse_body(&b)
    }) {
        Ok(r) => r,
        Err(e) => return fail(record, e),
    };
    let tags = Tags {
        principal: &principal,
        user: request.user.as_deref(),
        feature: request.sluice.as_ref().and_then(|s| s.feature.as_deref()),
        model: &request.model,
        input_hash: input_hash(&request.input),
        // Embeddings are deterministic: asking again is not a sign of a bad answer.
        track_regenerations: false,
    };
    let Tagged { user, feature } = match tag_request(&gw, &mut record, &headers, tags) {
        Ok(t) => t,
        Err(e) => return fail(record, e),
    };
    let tier = match identify(&gw, &mut record, &principal, &headers, Some(&request.model)) {
        Ok(t) => t,
        Err(e) => return fail(record, e),
    };
    let chain = match gw.router.chain(&request.model, ModelKind::Embeddings) {
        Ok(c) => c,
        Err(e) => return fail(record, e),
    };
    let model = request.model.clone();
    let guarded = guard_input(
        &gw,
        &mut record,
        &mut request,
        (&model, feature.as_deref(), tier.as_ref()),
        &chain,
        guard::input::check_embeddings,
    );
    let report = match guarded {
        Ok(r) => r,
        Err(e) => return fail(record, e),
    };
    let input = u32::try_from(request.input.estimated_tokens()).unwrap_or(u32::MAX);
    let demand = Demand::new(tier.as_ref(), input, 0);
    // Limits, budgets and the cache lookup, sent together (see `admit`). The cache is
    // per input item: only the items not cached go upstream, and the answer is merged
    // back in the client's order. Embeddings have no cheaper model to fall to: a
    // downgrade budget blocks them (the budget check says so), so only a refusal can
    // come back here.
    let scope = embedding_cache_scope(&gw, &headers, &principal);
    let fetch = async {
        match (scope, chain.routes.first()) {
            (Some(scope), Some(route)) => {
                Some(EmbeddingPlan::fetch(&gw.cache, scope, &route.upstream_model, &request).await)
            }
            _ => None,
        }
    };
    let admitted = admit(
        &gw,
        &mut record,
        (&principal, user.as_deref(), tier.as_ref()),
        demand.tokens,
        fetch,
    )
    .await;
    let (rate_headers, plan) = match admitted {
        Ok((headers, _, fetched)) => (headers, fetched.map(|f| EmbeddingPlan::take(&gw.cache, f))),
        Err(e) => return fail(record, e),
    };
    let upstream_request = match &plan {
        Some(p) => p.upstream_request(&request).map(std::borrow::Cow::Owned),
        None => Some(std::borrow::Cow::Borrowed(&request)),
    };
    let mut response = match upstream_request {
        None => respond_embeddings_from_cache(record, plan, &request.model),
        Some(sent) => {
            let (result, attempts) = match coalescing_key(&gw, &chain, &sent) {
                Some(key) => {
                    coalesced_embeddings(&gw, key, &chain, sent.into_owned(), demand).await
                }
                None => call_embeddings(&gw, &sent, &chain.routes, demand).await,
            };
            note_attempts(&mut record, &attempts);
            match result {
                Ok((route, response)) => {
                    let fallback = (attempts.answered_by > 0).then_some(FallbackKind::Model);
                    // Usage counts what went upstream, not what the cache answered.
                    let usage = response.usage.map(|u| Usage::new(u.prompt_tokens, 0));
                    record_usage(&mut record, (&gw.prices, &route), usage, || {
                        Usage::new(0, 0)
                    });
                    match plan {
                        None => respond_json(record, &route, fallback, &response, Outcome::Ok),
                        Some(plan) => {
                            let ttl = gw.config.cache.ttl_for(&request.model, feature.as_deref());
                            match plan.merge(Some(response), &route.model) {
                                Ok(merged) => {
                                    let status = if merged.cached_items > 0 {
                                        "partial"
                                    } else {
                                        "miss"
                                    };
                                    record.update(|r| r.cache_status = Some(status.into()));
                                    gw.cache.store_vectors(merged.to_store, ttl);
                                    let mut http = respond_json(
                                        record,
                                        &route,
                                        fallback,
                                        &merged.response,
                                        Outcome::Ok,
                                    );
                                    set_header(&mut http, HEADER_CACHE, status);
                                    http
                                }
                                Err(e) => fail(
                                    record,
                                    ApiError::Upstream(UpstreamError::new(
                                        ErrorClass::InvalidResponse,
                                        route.provider.kind(),
                                        e.to_string(),
                                    )),
                                ),
                            }
                        }
                    }
                }
                Err(error) => fail(record, ApiError::Upstream(error)),
            }
        }
    };
    if !report.is_empty() {
        set_header(&mut response, HEADER_GUARD, &report.header());
    }
    rate_headers.apply(response.headers_mut());
    response
}

/// One walk of an embeddings chain: retries, fallbacks, capacity, timeouts.
async fn call_embeddings(
    gw: &Gateway,
    request: &EmbeddingsRequest,
    routes: &[Arc<Route>],
    demand: Demand,
) -> (
    Result<(Arc<Route>, EmbeddingsResponse), UpstreamError>,
    Attempts,
) {
    let mut attempts = Attempts::default();
    let result = gw
        .retrier
        .run_chain(routes, &mut attempts, |route| async move {
            take_capacity(&route, demand).await?;
            let call = route.provider.embeddings(
                request,
                &route.upstream_model,
                route.timeouts,
                route.capacity.as_deref(),
            );
            let response = within_total(&route, "embeddings", call).await?;
            Ok((route, response))
        })
        .await;
    (result, attempts)
}

/// The batching key when this request may share its upstream call with concurrent
/// ones (`[cache] coalesce_window` above zero, and a chain of one model: a batch has one
/// answering model to bill and name).
fn coalescing_key(gw: &Gateway, chain: &Chain, sent: &EmbeddingsRequest) -> Option<CacheKey> {
    if gw.config.cache.coalesce_window.is_zero() || chain.routes.len() != 1 {
        return None;
    }
    let route = chain.routes.first()?;
    crate::cache::key::embedding_params_key(&route.upstream_model, sent)
}

/// Send the inputs in one upstream call with the concurrent requests of the same model
/// and parameters (within the window), and take this request's share of the answer.
async fn coalesced_embeddings(
    gw: &Arc<Gateway>,
    key: CacheKey,
    chain: &Chain,
    sent: EmbeddingsRequest,
    demand: Demand,
) -> (
    Result<(Arc<Route>, EmbeddingsResponse), UpstreamError>,
    Attempts,
) {
    let routes = chain.routes.clone();
    let Some(route) = routes.first().cloned() else {
        return (
            Err(UpstreamError::new(
                ErrorClass::Server,
                "gateway",
                "no route",
            )),
            Attempts::default(),
        );
    };
    let input = sent.input.clone();
    let leader = gw.clone();
    let send = move |batch: EmbeddingInput| async move {
        let request = EmbeddingsRequest {
            input: batch,
            ..sent
        };
        call_embeddings(&leader, &request, &routes, demand)
            .await
            .0
            .map(|(_, response)| response)
    };
    let attempts = Attempts {
        calls: 1,
        ..Attempts::default()
    };
    match gw.coalescer.submit(key, input, send).await {
        Ok(response) => (Ok((route, response)), attempts),
        Err(CoalesceError::Upstream(e)) => (Err(e), attempts),
        Err(e) => (
            Err(UpstreamError::new(
                ErrorClass::InvalidResponse,
                route.provider.kind(),
                e.to_string(),
            )),
            attempts,
        ),
    }
}

/// The scope embedding vectors are cached under, or `None` when the cache is off for
/// this request (`[cache] enabled`/`embeddings`, `x-sluice-cache: no-store`).
fn embedding_cache_scope<'a>(
    gw: &Gateway,
    headers: &HeaderMap,
    principal: &'a Principal,
) -> Option<crate::cache::Scope<'a>> {
    let config = &gw.config.cache;
    let asked = headers.get(HEADER_CACHE).and_then(|v| v.to_str().ok());
    if !config.enabled || !config.embeddings || asked.map(str::trim) == Some("no-store") {
        return None;
    }
    Some(match config.scope {
        CacheScope::Owner => crate::cache::Scope::Owner(principal.owner.as_deref()),
        CacheScope::Global => crate::cache::Scope::Global,
    })
}

/// Every item was cached: answer without an upstream call (no tokens used, cost 0).
fn respond_embeddings_from_cache(
    mut record: RecordGuard,
    plan: Option<EmbeddingPlan>,
    model: &str,
) -> Response {
    let merged = match plan.map(|p| p.merge(None, model)) {
        Some(Ok(m)) => m,
        _ => {
            return fail(
                record,
                ApiError::Internal("embedding cache answered without a plan".into()),
            );
        }
    };
    record.update(|r| {
        r.cache_status = Some("hit".into());
        r.model = Some(model.to_string());
        usage::record_cost(r, Some(Cost::ZERO), None);
    });
    let mut http = match serde_json::to_vec(&merged.response) {
        Ok(bytes) => ([(header::CONTENT_TYPE, "application/json")], bytes).into_response(),
        Err(e) => {
            return fail(
                record,
                ApiError::Internal(format!("cannot encode response: {e}")),
            );
        }
    };
    finish_ok(record, &mut http, model, None, Outcome::Ok);
    set_header(&mut http, HEADER_CACHE, "hit");
    http
}

// ---------------------------------------------------------------- models

/// The models this key may use: its own list, within its tier's.
pub async fn models(gw: Arc<Gateway>, headers: HeaderMap) -> Response {
    let principal = match gw.auth.authenticate(&headers) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let tier = match resolve_tier(&gw, &principal, &headers) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let data: Vec<_> = gw
        .router
        .model_names()
        .filter(|(name, _)| refused_model(&principal, tier, name).is_none())
        .map(|(name, provider)| json!({"id": name, "object": "model", "created": 0, "owned_by": provider}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}
