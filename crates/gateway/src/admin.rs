//! The admin API under `/admin` (keys, tiers), and the library side of `sluice keys`.
//!
//! Every `/admin` request passes one check first, [`require_admin`], layered on the whole
//! router (its fallbacks included): only the master key gets through; with no master key
//! configured, `/admin` answers 401 saying how to set one. A new admin route goes into
//! [`ROUTES`] (which [`router`] is built from, and the OpenAPI document and the 401 test
//! read) and [`handler`], and is covered by that check without further code.
//!
//! | route | does |
//! | --- | --- |
//! | `GET /admin/keys` | every key, revoked ones included; never a key or its hash |
//! | `POST /admin/keys` | `{owner, tier?, models?, can_assert_tier?}` -> 201, the key shown once |
//! | `DELETE /admin/keys/{id}`, `POST /admin/keys/{id}/revoke` | revoke (repeating is harmless) |
//! | `GET /admin/tiers` | the configured tiers and the default tier |
//! | `GET /admin/experiments[?since=24h]`, `GET /admin/experiments/{name}` | experiment reports (see [`crate::experiments::report`]) |
//! | `GET /admin/stats`, `/admin/overview`, `/admin/records[/{id}]`, `/admin/openapi.json` | see [`crate::dashboard::api`] |
//! | `GET /admin/budgets[?limit=N]` | each budget rule's counters this period: spend, limit, percent, forecast exhaustion; biggest spenders first, `N` (default 100, at most 1000) per rule |

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, post};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::config::Config;
use crate::dashboard;
use crate::dashboard::openapi::ROUTES;
use crate::error::ApiError;
use crate::limits::config::{LimitsConfig, Rates};
use crate::pipeline::{Gateway, parse_body};
use crate::store::{KeyRow, NewKey, Store};
use crate::usage::Budgets;

/// The `/admin` routes, each behind the master key. Mount with `nest("/admin", ...)`.
///
/// Built from [`ROUTES`], the list the OpenAPI document and the 401 test read, so a
/// route cannot be served without being listed: [`handler`] only says what answers each.
pub fn router(gateway: Arc<Gateway>) -> Router<Arc<Gateway>> {
    let mut router = Router::new();
    for route in ROUTES {
        let path = route.path.strip_prefix("/admin").unwrap_or(route.path);
        match handler(route.method, route.path) {
            // The same path twice (GET and POST /admin/keys) merges the two methods.
            Some(h) => router = router.route(path, h),
            // Caught by `every_listed_route_has_a_handler`; never at run time.
            None => tracing::error!(
                method = route.method,
                path = route.path,
                "admin route without a handler"
            ),
        }
    }
    router
        .fallback(crate::server::not_found)
        .method_not_allowed_fallback(crate::server::method_not_allowed)
        // Last, so it wraps every route and both fallbacks.
        .layer(middleware::from_fn_with_state(gateway, require_admin))
}

/// What answers one route of [`ROUTES`]; `None` for a route it does not know. A handler
/// here with no entry in `ROUTES` is never mounted.
fn handler(method: &str, path: &str) -> Option<MethodRouter<Arc<Gateway>>> {
    Some(match (method, path) {
        ("get", "/admin/keys") => get(list_keys),
        ("post", "/admin/keys") => post(create_key),
        ("delete", "/admin/keys/{id}") => delete(revoke_key),
        ("post", "/admin/keys/{id}/revoke") => post(revoke_key),
        ("get", "/admin/tiers") => get(tiers),
        ("get", "/admin/budgets") => get(budgets),
        ("get", "/admin/penalties") => get(penalties),
        ("delete", "/admin/penalties/{key}") => delete(lift_penalty),
        ("get", "/admin/experiments") => get(crate::experiments::admin::list),
        ("get", "/admin/experiments/{name}") => get(crate::experiments::admin::get),
        // What the dashboard draws from (crate::dashboard::api), and this API's document.
        ("get", "/admin/stats") => get(dashboard::api::stats),
        ("get", "/admin/overview") => get(dashboard::api::overview),
        ("get", "/admin/records") => get(dashboard::api::records),
        ("get", "/admin/records/{request_id}") => get(dashboard::api::record),
        ("get", "/admin/openapi.json") => get(dashboard::openapi::openapi_json),
        _ => return None,
    })
}

/// The one check in front of `/admin`: the master key, or a dashboard session for reads
/// ([`dashboard::has_session`]), or 401 with the OpenAI error body.
pub async fn require_admin(
    State(gw): State<Arc<Gateway>>,
    request: Request,
    next: Next,
) -> Response {
    if dashboard::has_session(&gw, request.method(), request.headers()) {
        return next.run(request).await;
    }
    match gw.auth.authenticate_admin(request.headers()) {
        Ok(_) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

/// What was wrong with a key to create: each with its own `code` and `param`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyInputError {
    #[error("`owner` is required: who the key belongs to (an app or a team).")]
    MissingOwner,
    #[error("`owner` {0}.")]
    InvalidOwner(&'static str),
    #[error("No tier `{tier}` is configured; the tiers are: {known}.")]
    UnknownTier { tier: String, known: String },
    #[error("`models` {0}.")]
    InvalidModels(&'static str),
}

impl KeyInputError {
    pub fn code(&self) -> &'static str {
        match self {
            KeyInputError::MissingOwner => "missing_owner",
            KeyInputError::InvalidOwner(_) => "invalid_owner",
            KeyInputError::UnknownTier { .. } => "unknown_tier",
            KeyInputError::InvalidModels(_) => "invalid_models",
        }
    }

    pub fn param(&self) -> &'static str {
        match self {
            KeyInputError::MissingOwner | KeyInputError::InvalidOwner(_) => "owner",
            KeyInputError::UnknownTier { .. } => "tier",
            KeyInputError::InvalidModels(_) => "models",
        }
    }
}

/// An `/admin` failure, rendered as the OpenAI error body.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Input(#[from] KeyInputError),
    #[error("No key `{0}` exists.")]
    KeyNotFound(String),
    #[error("No penalty `{0}` is in force.")]
    PenaltyNotFound(String),
}

impl From<sqlx::Error> for AdminError {
    fn from(e: sqlx::Error) -> Self {
        tracing::error!(error = %e, "admin: storage failed");
        AdminError::Api(ApiError::StorageUnavailable(e.to_string()))
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        match self {
            AdminError::Api(e) => e.into_response(),
            AdminError::Input(e) => error_response(
                StatusCode::BAD_REQUEST,
                &e.to_string(),
                e.code(),
                Some(e.param()),
            ),
            AdminError::PenaltyNotFound(_) => error_response(
                StatusCode::NOT_FOUND,
                &self.to_string(),
                "penalty_not_found",
                Some("key"),
            ),
            AdminError::KeyNotFound(_) => error_response(
                StatusCode::NOT_FOUND,
                &self.to_string(),
                "key_not_found",
                Some("id"),
            ),
        }
    }
}

pub(crate) fn error_response(
    status: StatusCode,
    message: &str,
    code: &str,
    param: Option<&str>,
) -> Response {
    let body = json!({
        "error": {"message": message, "type": "invalid_request_error", "code": code, "param": param}
    });
    (status, axum::Json(body)).into_response()
}

/// The body of `POST /admin/keys`. `owner` is optional here so that leaving it out gets
/// its own precise error rather than a generic one.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRequest {
    pub owner: Option<String>,
    pub tier: Option<String>,
    pub models: Option<Vec<String>>,
    #[serde(default)]
    pub can_assert_tier: bool,
}

const MAX_OWNER_CHARS: usize = 200;

/// Check a key request against the config: an owner, a configured tier (when tiers are
/// configured at all: `sluice keys` may run without the gateway's config), model names.
pub fn validate(config: &Config, request: KeyRequest) -> Result<NewKey, KeyInputError> {
    let owner = request.owner.as_deref().map(str::trim).unwrap_or_default();
    if owner.is_empty() {
        return Err(KeyInputError::MissingOwner);
    }
    if owner.chars().count() > MAX_OWNER_CHARS {
        return Err(KeyInputError::InvalidOwner("is longer than 200 characters"));
    }
    if owner.chars().any(char::is_control) {
        return Err(KeyInputError::InvalidOwner("contains control characters"));
    }
    let tier = request
        .tier
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty());
    if let Some(tier) = &tier
        && !config.limits.tiers.is_empty()
        && config.limits.tier(tier).is_none()
    {
        let known: Vec<String> = config
            .limits
            .tiers
            .iter()
            .map(|t| format!("`{}`", t.name))
            .collect();
        return Err(KeyInputError::UnknownTier {
            tier: tier.clone(),
            known: known.join(", "),
        });
    }
    let models = match request.models {
        None => None,
        Some(models) => {
            let models: Vec<String> = models.iter().map(|m| m.trim().to_string()).collect();
            if models.is_empty() {
                return Err(KeyInputError::InvalidModels(
                    "is empty; leave it out to allow what the tier allows",
                ));
            }
            if models.iter().any(String::is_empty) {
                return Err(KeyInputError::InvalidModels("contains an empty name"));
            }
            Some(models)
        }
    };
    Ok(NewKey {
        owner: owner.to_string(),
        tier,
        models,
        can_assert_tier: request.can_assert_tier,
    })
}

/// A key as clients see it: everything but the key and its hash.
pub fn key_view(row: &KeyRow) -> Value {
    json!({
        "object": "api_key",
        "id": row.id,
        "hint": row.hint,
        "owner": row.owner,
        "tier": row.tier,
        "models": row.models,
        "can_assert_tier": row.can_assert_tier,
        "status": if row.is_revoked() { "revoked" } else { "active" },
        "created_at_ms": row.created_at_ms,
        "updated_at_ms": row.updated_at_ms,
        "revoked_at_ms": row.revoked_at_ms,
    })
}

/// A key just created: its view plus the key itself, the one time it is shown.
pub fn created_view(row: &KeyRow, key: &SecretString) -> Value {
    let mut view = key_view(row);
    view["key"] = Value::String(key.expose_secret().to_string());
    view
}

async fn list_keys(State(gw): State<Arc<Gateway>>) -> Result<Response, AdminError> {
    let rows = gw.store.list_keys().await?;
    let data: Vec<Value> = rows.iter().map(key_view).collect();
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

async fn create_key(
    State(gw): State<Arc<Gateway>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, AdminError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge {
                limit: gw.config.server.max_body_bytes,
            }
        } else {
            ApiError::invalid(
                format!("could not read the request body: {rejection}"),
                None,
            )
        }
    })?;
    let request: KeyRequest = parse_body(&body)?;
    let new = validate(&gw.config, request)?;
    let (row, key) = gw.store.create_key(new).await?;
    gw.auth.note_change(&row);
    tracing::info!(key_id = %row.id, owner = %row.owner, "virtual key created");
    Ok((StatusCode::CREATED, axum::Json(created_view(&row, &key))).into_response())
}

async fn revoke_key(
    State(gw): State<Arc<Gateway>>,
    Path(id): Path<String>,
) -> Result<Response, AdminError> {
    let revoked_now = gw.store.revoke_key(&id).await?;
    let row = gw
        .store
        .get_key(&id)
        .await?
        .ok_or(AdminError::KeyNotFound(id))?;
    gw.auth.note_change(&row);
    if revoked_now {
        tracing::info!(key_id = %row.id, owner = %row.owner, "virtual key revoked");
    }
    Ok(axum::Json(key_view(&row)).into_response())
}

async fn budgets(State(gw): State<Arc<Gateway>>, uri: Uri) -> Response {
    budgets_response(&gw.budgets, uri.query()).await
}

/// End users under an abuse penalty, with what it does and how long it still holds.
async fn penalties(State(gw): State<Arc<Gateway>>) -> Result<Response, AdminError> {
    let data: Vec<Value> = gw
        .limiter
        .penalties()
        .await?
        .into_iter()
        .map(|p| {
            json!({
                "object": "penalty",
                "key": p.key,
                "penalty": p.penalty,
                "remaining_ms": p.remaining.as_millis() as u64,
            })
        })
        .collect();
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

/// Lift a penalty early (`key` as `GET /admin/penalties` lists it).
async fn lift_penalty(
    State(gw): State<Arc<Gateway>>,
    Path(key): Path<String>,
) -> Result<Response, AdminError> {
    if gw.limiter.lift_penalty(&key).await? {
        tracing::info!(penalty = %key, "abuse penalty lifted by an admin");
        Ok(axum::Json(json!({"key": key, "lifted": true})).into_response())
    } else {
        Err(AdminError::PenaltyNotFound(key))
    }
}

/// Counters shown per budget rule unless `?limit=` says otherwise, and at most.
const BUDGET_COUNTERS_DEFAULT: usize = 100;
const BUDGET_COUNTERS_MAX: usize = 1000;

/// `GET /admin/budgets`: every rule with its counters in the current period. `query` is
/// the request's query string (`limit=N`).
pub async fn budgets_response(budgets: &Budgets, query: Option<&str>) -> Response {
    let mut limit = BUDGET_COUNTERS_DEFAULT;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("limit", v)) => match v.parse::<usize>() {
                Ok(n) if (1..=BUDGET_COUNTERS_MAX).contains(&n) => limit = n,
                _ => {
                    return error_response(
                        StatusCode::BAD_REQUEST,
                        &format!("`limit` must be a number from 1 to {BUDGET_COUNTERS_MAX}."),
                        "invalid_limit",
                        Some("limit"),
                    );
                }
            },
            _ => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    &format!(
                        "Unknown query parameter `{}`; only `limit` is read.",
                        pair.split('=').next().unwrap_or(pair)
                    ),
                    "invalid_request",
                    None,
                );
            }
        }
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    match budgets.report(now_ms, limit).await {
        Ok(data) => axum::Json(json!({
            "object": "list",
            "counters": budgets.ledger_name(),
            "data": data,
        }))
        .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "admin: budgets could not be read");
            error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("{e}"),
                "budgets_unavailable",
                None,
            )
        }
    }
}

async fn tiers(State(gw): State<Arc<Gateway>>) -> Response {
    axum::Json(tiers_view(&gw.config.limits)).into_response()
}

/// The configured tiers as JSON.
pub fn tiers_view(limits: &LimitsConfig) -> Value {
    let rates = |r: &Rates| {
        json!({
            "requests_per_minute": r.requests_per_minute,
            "tokens_per_minute": r.tokens_per_minute,
            "tokens_per_day": r.tokens_per_day,
            "concurrent": r.concurrent,
        })
    };
    let data: Vec<Value> = limits
        .tiers
        .iter()
        .map(|t| {
            json!({
                "object": "tier",
                "name": t.name,
                "priority": t.priority,
                "models": t.models,
                "max_input_tokens": t.max_input_tokens,
                "max_tokens": t.max_tokens,
                "per_key": rates(&t.per_key),
                "per_user": rates(&t.per_user),
                "total": rates(&t.total),
            })
        })
        .collect();
    json!({"object": "list", "default_tier": limits.default_tier, "data": data})
}

// ---- `sluice keys` ----

/// `sluice keys ...`: the store is opened directly, as `sluice stats` does.
#[derive(Debug, clap::Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    pub command: KeysCommand,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Create a key. It is printed once; only its hash is stored.
    Create {
        /// Who the key belongs to (an app or a team).
        #[arg(long)]
        owner: String,
        /// Its tier (one of `[[tiers]]`); without it, the default tier.
        #[arg(long)]
        tier: Option<String>,
        /// Models it may use, comma-separated (names or `prefix*`); without it, the tier's.
        #[arg(long, value_delimiter = ',')]
        models: Option<Vec<String>>,
        /// Let the key set its end user's tier with the `x-sluice-tier` header.
        #[arg(long)]
        allow_tier_header: bool,
    },
    /// List keys (never the key itself, nor its hash).
    List,
    /// Revoke a key by id; every gateway refuses it within `[limits] key_refresh`.
    Revoke {
        /// The key's id (`key_...`), as `list` shows it.
        id: String,
    },
}

/// Run a `sluice keys` command against the configured store; returns what to print.
pub async fn keys_command(config: &Config, args: KeysArgs) -> anyhow::Result<String> {
    let store = Store::open(&config.storage.target).await?;
    let out = run_keys(config, &store, args).await;
    store.close().await;
    out
}

async fn run_keys(config: &Config, store: &Store, args: KeysArgs) -> anyhow::Result<String> {
    match args.command {
        KeysCommand::Create {
            owner,
            tier,
            models,
            allow_tier_header,
        } => {
            let request = KeyRequest {
                owner: Some(owner),
                tier,
                models,
                can_assert_tier: allow_tier_header,
            };
            let new = validate(config, request).map_err(|e| anyhow::anyhow!("{e}"))?;
            let (row, key) = store.create_key(new).await?;
            if args.json {
                return Ok(serde_json::to_string_pretty(&created_view(&row, &key))?);
            }
            Ok(format!(
                "Created {} for owner `{}` (tier: {}; models: {}; x-sluice-tier: {}).\n\n    {}\n\n\
                 Store it now: Sluice keeps only its hash and cannot show it again.",
                row.id,
                row.owner,
                row.tier.as_deref().unwrap_or("default"),
                row.models
                    .as_ref()
                    .map_or("the tier's".to_string(), |m| m.join(",")),
                if row.can_assert_tier {
                    "allowed"
                } else {
                    "not allowed"
                },
                key.expose_secret(),
            ))
        }
        KeysCommand::List => {
            let rows = store.list_keys().await?;
            if args.json {
                let data: Vec<Value> = rows.iter().map(key_view).collect();
                return Ok(serde_json::to_string_pretty(
                    &json!({"object": "list", "data": data}),
                )?);
            }
            Ok(keys_table(&rows))
        }
        KeysCommand::Revoke { id } => {
            let revoked_now = store.revoke_key(&id).await?;
            let Some(row) = store.get_key(&id).await? else {
                anyhow::bail!("no key `{id}` exists (`sluice keys list` shows the ids)");
            };
            if args.json {
                return Ok(serde_json::to_string_pretty(&key_view(&row))?);
            }
            let refresh =
                humantime_serde::re::humantime::format_duration(config.limits.key_refresh);
            Ok(if revoked_now {
                format!(
                    "Revoked {} (owner `{}`). Every gateway on this store refuses it within {refresh}.",
                    row.id, row.owner
                )
            } else {
                format!(
                    "{} was already revoked, at {}.",
                    row.id,
                    format_ms(row.revoked_at_ms.unwrap_or(row.updated_at_ms))
                )
            })
        }
    }
}

/// `list` as a table, one key per line.
fn keys_table(rows: &[KeyRow]) -> String {
    if rows.is_empty() {
        return "No keys yet. Create one with `sluice keys create --owner NAME`.".into();
    }
    let header = ["ID", "KEY", "OWNER", "TIER", "MODELS", "CREATED", "REVOKED"].map(String::from);
    let lines: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.id.clone(),
                format!("sk-...{}", r.hint),
                r.owner.clone(),
                r.tier.clone().unwrap_or_else(|| "default".into()),
                r.models
                    .as_ref()
                    .map_or("(tier's)".to_string(), |m| m.join(",")),
                format_ms(r.created_at_ms),
                r.revoked_at_ms.map_or("-".to_string(), format_ms),
            ]
        })
        .collect();
    let mut widths = header.clone().map(|h| h.chars().count());
    for line in &lines {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for line in std::iter::once(&header).chain(&lines) {
        let mut text = String::new();
        for (cell, w) in line.iter().zip(widths) {
            let _ = write!(text, "{cell:<w$}  ");
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out.trim_end().to_string()
}

/// Unix milliseconds as RFC 3339 (UTC, seconds).
fn format_ms(ms: i64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime_serde::re::humantime::format_rfc3339_seconds(at).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigSource;

    fn config(toml: &str) -> Config {
        Config::from_toml(
            toml,
            &[("X", "y")],
            ConfigSource::Embedded { simulated: true },
        )
        .unwrap()
    }

    fn request(owner: &str, tier: Option<&str>) -> KeyRequest {
        KeyRequest {
            owner: Some(owner.into()),
            tier: tier.map(String::from),
            ..KeyRequest::default()
        }
    }

    #[test]
    fn requests_are_checked_with_precise_codes() {
        let tiers = config("[[tiers]]\nname = \"free\"\n[[tiers]]\nname = \"pro\"\n");
        let e = |r| validate(&tiers, r).unwrap_err();
        assert_eq!(e(KeyRequest::default()).code(), "missing_owner");
        assert_eq!(e(request("  ", None)).code(), "missing_owner");
        assert_eq!(e(request("a\u{7}b", None)).code(), "invalid_owner");
        assert_eq!(e(request(&"x".repeat(201), None)).code(), "invalid_owner");
        let unknown = e(request("team", Some("gold")));
        assert_eq!((unknown.code(), unknown.param()), ("unknown_tier", "tier"));
        assert!(unknown.to_string().contains("`free`, `pro`"), "{unknown}");
        let mut r = request("team", None);
        r.models = Some(vec![]);
        assert_eq!(e(r).code(), "invalid_models");
        let ok = validate(&tiers, request(" team ", Some("pro"))).unwrap();
        assert_eq!(
            (ok.owner.as_str(), ok.tier.as_deref()),
            ("team", Some("pro"))
        );
        // Without tiers configured, any tier name is kept (the CLI may run without the
        // gateway's config).
        let none = config("");
        assert!(validate(&none, request("team", Some("gold"))).is_ok());
    }

    #[test]
    fn every_listed_route_has_a_handler() {
        for r in ROUTES {
            assert!(
                handler(r.method, r.path).is_some(),
                "{} {} is listed but nothing answers it",
                r.method,
                r.path
            );
        }
    }

    #[test]
    fn views_never_show_the_hash() {
        let key = crate::store::generate_key();
        let row = KeyRow {
            id: "key_0123456789abcdef".into(),
            key_hash: crate::store::hash_key(key.expose_secret()),
            hint: crate::store::key_hint(key.expose_secret()),
            owner: "team".into(),
            tier: None,
            models: None,
            can_assert_tier: false,
            created_at_ms: 1_700_000_000_000,
            updated_at_ms: 1_700_000_000_000,
            revoked_at_ms: None,
        };
        let view = key_view(&row).to_string();
        assert!(!view.contains(&row.key_hash), "{view}");
        assert!(!view.contains(key.expose_secret()), "{view}");
        let created = created_view(&row, &key);
        assert_eq!(created["key"], key.expose_secret());
        assert!(!created.to_string().contains(&row.key_hash));
        let table = keys_table(std::slice::from_ref(&row));
        assert!(table.contains("key_0123456789abcdef"), "{table}");
        assert!(table.contains("2023-11-14T22:13:20Z"), "{table}");
        assert!(!table.contains(key.expose_secret()), "{table}");
        assert!(!table.contains(&row.key_hash), "{table}");
    }
}
