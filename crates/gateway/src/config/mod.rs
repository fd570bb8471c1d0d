//! Configuration: raw serde structs (`deny_unknown_fields`) read from TOML with `${ENV}`
//! interpolation, turned into validated runtime types. Every problem is collected with its
//! path and reported at once. With no file, [`Config::embedded_default`] builds the
//! zero-config gateway from the environment.

mod env;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;
use serde::de::DeserializeOwned;

pub use env::{Env, SystemEnv, interpolate};

use crate::guard::GuardConfig;
use crate::guard::config::RawGuard;
pub use crate::limits::config::{LimitsConfig, Tier};
use crate::limits::config::{RawLimits, RawRedis, RawTier};
use crate::providers::Timeouts;
pub use crate::store::StorageTarget;
use crate::telemetry::RecorderConfig;
pub use crate::usage::BudgetsConfig;
use crate::usage::RawBudgets;
use crate::usage::prices::{Prices, RawPrices};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8484";
const DEFAULT_OPENAI_BASE_URL: &str = "https://api.openai.com/v1";
const DEFAULT_ANTHROPIC_BASE_URL: &str = "https://api.anthropic.com";

/// The validated configuration the gateway runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub retry: RetryConfig,
    pub providers: Vec<ProviderConfig>,
    pub models: Vec<ModelConfig>,
    pub telemetry: TelemetryConfig,
    pub storage: StorageConfig,
    pub guard: GuardConfig,
    /// Tiers, rate limits, Redis, abuse handling.
    pub limits: LimitsConfig,
    /// Spend limits and their alerts; no rules = off.
    pub budgets: BudgetsConfig,
    /// Response and embedding cache, coalescing.
    pub cache: crate::cache::CacheConfig,
    /// Model choice for requests naming the routing alias (`[routing]`).
    pub routing: crate::routing::rules::RoutingConfig,
    /// A/B experiments (`[[experiments]]`).
    pub experiments: Vec<crate::experiments::Experiment>,
    /// Prompt files, lock, labels.
    pub prompts: crate::prompts::PromptsConfig,
    /// Where this config came from, for the start-up log line.
    pub source: ConfigSource,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// No file: providers from the environment, or the simulator.
    Embedded {
        simulated: bool,
    },
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// When set, every `/v1` request must present it as a bearer key.
    pub master_key: Option<SecretString>,
    pub max_body_bytes: usize,
    /// How long shutdown waits for in-flight requests and streams.
    pub shutdown_grace: Duration,
    /// When set, `/admin` and `/dashboard` are served only on this address (404 on
    /// `listen`), so `/v1` can be exposed without them.
    pub admin_listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    /// Attempts per model, the first included.
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// A `retry-after` longer than this is not waited for: the next model is tried.
    pub max_retry_after: Duration,
    /// Total time for all attempts on all models of one request.
    pub deadline: Duration,
    /// Retries may add at most this share of traffic (0.2 = 20 %), beyond the floor below.
    pub budget_ratio: f32,
    /// Retries per second always allowed, so a quiet gateway can still retry.
    pub budget_min_per_sec: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            max_retry_after: Duration::from_secs(30),
            deadline: Duration::from_secs(120),
            budget_ratio: 0.2,
            budget_min_per_sec: 10,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// OpenAI and every server that speaks its API (vLLM, Ollama, Groq, `sluice mock`).
    Openai,
    Anthropic,
    /// The in-process simulator.
    Sim,
}

#[derive(Debug, Clone)]
pub struct ProviderConfig {
    pub name: String,
    pub kind: ProviderKind,
    pub base_url: String,
    pub api_key: Option<SecretString>,
    pub connect_timeout: Duration,
    pub headers: BTreeMap<String, String>,
    /// Failure injection for `kind = "sim"`.
    pub chaos: sluice_sim::ChaosConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Chat,
    Embeddings,
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// What clients send as `model`; a trailing `*` matches any suffix (`claude-*`, `*`).
    pub name: String,
    pub provider: String,
    /// The provider's model name; `None` forwards the client's model name.
    pub upstream: Option<String>,
    pub kind: ModelKind,
    pub fallbacks: Vec<String>,
    pub timeouts: Timeouts,
    /// Overrides the provider's connect timeout for this model.
    pub connect_timeout: Option<Duration>,
    /// Answer with this text (a minijinja template) when the whole chain failed.
    pub template_fallback: Option<String>,
    /// Provider capacity of this model entry (per gateway instance); `None`: only what
    /// the upstream announces or its 429s teach.
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    /// Overrides the shipped price table (see [`crate::usage::prices`]).
    pub prices: Option<Prices>,
}

impl ModelConfig {
    pub fn is_pattern(&self) -> bool {
        self.name.ends_with('*')
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON lines when stderr is not a terminal, text when it is.
    #[default]
    Auto,
    Json,
    Text,
}

#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    pub log_format: LogFormat,
    pub log_level: String,
    /// The same key + end user sending the same input within this window is a
    /// regeneration.
    pub regeneration_window: Duration,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Auto,
            log_level: "info".into(),
            regeneration_window: DEFAULT_REGENERATION_WINDOW,
        }
    }
}

/// The request log's home and the writer's sizing.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    pub target: StorageTarget,
    /// Store request and response bodies (secrets redacted). Off by default.
    pub store_bodies: bool,
    pub recorder: RecorderConfig,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            target: StorageTarget::Sqlite(PathBuf::from(DEFAULT_SQLITE_PATH)),
            store_bodies: false,
            recorder: RecorderConfig::default(),
        }
    }
}

/// One problem found while loading: where, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

/// Every problem found in a config, reported together.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub file: Option<PathBuf>,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self
            .file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "configuration".into());
        writeln!(f, "{file}: {} problem(s)", self.problems.len())?;
        for p in &self.problems {
            if p.path.is_empty() {
                writeln!(f, "  - {}", p.message)?;
            } else {
                writeln!(f, "  - {}: {}", p.path, p.message)?;
            }
        }
        Ok(())
    }
}

// ---- raw, as written in TOML ----

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    master_key: Option<String>,
    max_body_bytes: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    shutdown_grace: Option<Duration>,
    admin_listen: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    max_attempts: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    base_delay: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    max_delay: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    max_retry_after: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    deadline: Option<Duration>,
    budget_ratio: Option<f32>,
    budget_min_per_sec: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    name: String,
    kind: ProviderKind,
    base_url: Option<String>,
    api_key: Option<String>,
    #[serde(default, with = "humantime_serde")]
    connect_timeout: Option<Duration>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    chaos: Option<RawChaos>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawChaos {
    #[serde(default, with = "humantime_serde")]
    latency: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    ttft: Option<Duration>,
    tokens_per_sec: Option<f64>,
    error_rate: Option<f64>,
    error_status: Option<u16>,
    rpm: Option<u32>,
    fail_first: Option<u32>,
    fail_status: Option<u16>,
    #[serde(default, with = "humantime_serde")]
    retry_after: Option<Duration>,
    cut_after: Option<usize>,
    seed: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: String,
    provider: String,
    upstream: Option<String>,
    kind: Option<ModelKind>,
    #[serde(default)]
    fallbacks: Vec<String>,
    #[serde(default, with = "humantime_serde")]
    first_byte_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    total_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    connect_timeout: Option<Duration>,
    template_fallback: Option<String>,
    requests_per_minute: Option<u32>,
    tokens_per_minute: Option<u32>,
    prices: Option<RawPrices>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTelemetry {
    log_format: Option<LogFormat>,
    log_level: Option<String>,
    #[serde(default, with = "humantime_serde")]
    regeneration_window: Option<Duration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    path: Option<PathBuf>,
    url: Option<String>,
    schema: Option<String>,
    store_bodies: Option<bool>,
    queue: Option<usize>,
    batch: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    flush_interval: Option<Duration>,
}

const DEFAULT_FIRST_BYTE: Duration = Duration::from_secs(60);
const DEFAULT_TOTAL: Duration = Duration::from_secs(600);
const DEFAULT_CONNECT: Duration = Duration::from_secs(5);
const DEFAULT_MAX_BODY: usize = 4 * 1024 * 1024;
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
const DEFAULT_REGENERATION_WINDOW: Duration = Duration::from_secs(600);
pub const DEFAULT_SQLITE_PATH: &str = "sluice.db";

/// Collects problems while building a config.
#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    /// Deserialize one value, recording the first error with its full path.
    fn take<T: DeserializeOwned>(&mut self, path: &str, value: toml::Value) -> Option<T> {
        match serde_path_to_error::deserialize::<_, T>(value) {
            Ok(v) => Some(v),
            Err(e) => {
                let inner = e.path().to_string();
                let full = if inner == "." || inner.is_empty() {
                    path.to_string()
                } else {
                    format!("{path}.{inner}")
                };
                self.push(full, e.into_inner().to_string());
                None
            }
        }
    }
}

impl Config {
    /// Load and validate a TOML file.
    pub fn load(path: &Path, env: &dyn Env) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: Some(path.to_path_buf()),
            problems: vec![Problem {
                path: String::new(),
                message: format!("cannot read: {e}"),
            }],
        })?;
        Self::from_toml(&text, env, ConfigSource::File(path.to_path_buf())).map_err(|mut e| {
            e.file = Some(path.to_path_buf());
            e
        })
    }

    /// Parse and validate TOML text.
    pub fn from_toml(
        text: &str,
        env: &dyn Env,
        source: ConfigSource,
    ) -> Result<Config, ConfigError> {
        let mut problems = Problems::default();
        let mut table: toml::Table = toml::from_str(text).map_err(|e| ConfigError {
            file: None,
            problems: vec![Problem {
                path: String::new(),
                message: format!("invalid TOML: {}", e.to_string().trim_end()),
            }],
        })?;
        interpolate_table(&mut table, "", env, &mut problems);

        let mut section = |name: &str| table.remove(name);
        let server: RawServer = section("server")
            .and_then(|v| problems.take("server", v))
            .unwrap_or_default();
        let retry: RawRetry = section("retry")
            .and_then(|v| problems.take("retry", v))
            .unwrap_or_default();
        let telemetry: RawTelemetry = section("telemetry")
            .and_then(|v| problems.take("telemetry", v))
            .unwrap_or_default();
        let storage: RawStorage = section("storage")
            .and_then(|v| problems.take("storage", v))
            .unwrap_or_default();
        let guard: RawGuard = section("guard")
            .and_then(|v| problems.take("guard", v))
            .unwrap_or_default();
        let providers: Vec<(usize, RawProvider)> =
            take_array(section("providers"), "providers", &mut problems);
        let models: Vec<(usize, RawModel)> = take_array(section("models"), "models", &mut problems);
        let tiers: Vec<(usize, RawTier)> = take_array(section("tiers"), "tiers", &mut problems);
        let limits: RawLimits = section("limits")
            .and_then(|v| problems.take("limits", v))
            .unwrap_or_default();
        let redis: Option<RawRedis> = section("redis").and_then(|v| problems.take("redis", v));
        let budgets: RawBudgets = section("budgets")
            .and_then(|v| problems.take("budgets", v))
            .unwrap_or_default();
        let cache: crate::cache::config::RawCache = section("cache")
            .and_then(|v| problems.take("cache", v))
            .unwrap_or_default();
        let routing: crate::routing::rules::RawRouting = section("routing")
            .and_then(|v| problems.take("routing", v))
            .unwrap_or_default();
        let experiments: Vec<(usize, crate::experiments::RawExperiment)> =
            take_array(section("experiments"), "experiments", &mut problems);
        let prompts: crate::prompts::config::RawPrompts = section("prompts")
            .and_then(|v| problems.take("prompts", v))
            .unwrap_or_default();
        for key in table.keys() {
            problems.push(
                key.clone(),
                "unknown section (expected server, retry, providers, models, storage, guard, telemetry, tiers, limits, redis, budgets, cache, routing, experiments, prompts)",
            );
        }
        let limits = crate::limits::config::build(tiers, limits, redis, &mut |path, message| {
            problems.push(path, message)
        });
        let tier_names: Vec<String> = limits.tiers.iter().map(|t| t.name.clone()).collect();
        let budgets = crate::usage::budgets::build(budgets, &tier_names, &mut |path, message| {
            problems.push(path, message)
        });

        let cache =
            crate::cache::config::build(cache, limits.redis.as_ref(), &mut |path, message| {
                problems.push(path, message)
            });

        let mut config = build(
            server,
            retry,
            providers,
            models,
            telemetry,
            storage,
            guard,
            limits,
            budgets,
            env,
            source,
            &mut problems,
        );
        config.cache = cache;
        let model = |name: &str| config.model(name).cloned();
        let mut push = |path, message| problems.push(path, message);
        let routing = crate::routing::rules::build(routing, &model, &tier_names, &mut push);
        let experiments = crate::experiments::config::build(experiments, &model, &mut push);
        (config.routing, config.experiments) = (routing, experiments);
        let file = match &config.source {
            ConfigSource::File(p) => Some(p.as_path()),
            ConfigSource::Embedded { .. } => None,
        };
        config.prompts = crate::prompts::config::build(prompts, file, &mut |path, message| {
            problems.push(path, message)
        });
        if problems.0.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError {
                file: None,
                problems: problems.0,
            })
        }
    }

    /// The zero-config gateway: providers from `OPENAI_*` / `ANTHROPIC_*` when set,
    /// otherwise the in-process simulator answering the common OpenAI model names.
    pub fn embedded_default(env: &dyn Env) -> Result<Config, ConfigError> {
        let mut providers: Vec<RawProvider> = Vec::new();
        let mut models: Vec<RawModel> = Vec::new();
        let chat = |name: &str, provider: &str| RawModel {
            name: name.into(),
            provider: provider.into(),
            upstream: None,
            kind: None,
            fallbacks: Vec::new(),
            first_byte_timeout: None,
            total_timeout: None,
            connect_timeout: None,
            template_fallback: None,
            requests_per_minute: None,
            tokens_per_minute: None,
            prices: None,
        };
        let openai = env.var("OPENAI_API_KEY").is_some() || env.var("OPENAI_BASE_URL").is_some();
        let anthropic =
            env.var("ANTHROPIC_API_KEY").is_some() || env.var("ANTHROPIC_BASE_URL").is_some();
        if anthropic {
            providers.push(RawProvider {
                name: "anthropic".into(),
                kind: ProviderKind::Anthropic,
                base_url: env.var("ANTHROPIC_BASE_URL"),
                api_key: env.var("ANTHROPIC_API_KEY"),
                connect_timeout: None,
                headers: BTreeMap::new(),
                chaos: None,
            });
            models.push(chat("claude-*", "anthropic"));
        }
        if openai {
            providers.push(RawProvider {
                name: "openai".into(),
                kind: ProviderKind::Openai,
                base_url: env.var("OPENAI_BASE_URL"),
                api_key: env.var("OPENAI_API_KEY"),
                connect_timeout: None,
                headers: BTreeMap::new(),
                chaos: None,
            });
            for name in ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"] {
                models.push(chat(name, "openai"));
            }
            // Any other model name goes to the OpenAI-compatible upstream as it is.
            models.push(chat("*", "openai"));
        }
        let simulated = !openai && !anthropic;
        if simulated {
            providers.push(RawProvider {
                name: "sim".into(),
                kind: ProviderKind::Sim,
                base_url: None,
                api_key: None,
                connect_timeout: None,
                headers: BTreeMap::new(),
                chaos: None,
            });
            for name in ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"] {
                models.push(chat(name, "sim"));
            }
        }
        let mut problems = Problems::default();
        let config = build(
            RawServer::default(),
            RawRetry::default(),
            providers.into_iter().enumerate().collect(),
            models.into_iter().enumerate().collect(),
            RawTelemetry::default(),
            RawStorage::default(),
            RawGuard::default(),
            LimitsConfig::default(),
            BudgetsConfig::default(),
            env,
            ConfigSource::Embedded { simulated },
            &mut problems,
        );
        if problems.0.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError {
                file: None,
                problems: problems.0,
            })
        }
    }

    /// The model entry serving `name`: an exact name first, then the longest pattern.
    pub fn model(&self, name: &str) -> Option<&ModelConfig> {
        self.models
            .iter()
            .find(|m| !m.is_pattern() && m.name == name)
            .or_else(|| {
                self.models
                    .iter()
                    .filter(|m| m.is_pattern() && name.starts_with(m.name.trim_end_matches('*')))
                    .max_by_key(|m| m.name.len())
            })
    }
}

/// The readable items of an array of tables, each with its index in the file.
fn take_array<T: DeserializeOwned>(
    value: Option<toml::Value>,
    name: &str,
    problems: &mut Problems,
) -> Vec<(usize, T)> {
    match value {
        None => Vec::new(),
        Some(toml::Value::Array(items)) => items
            .into_iter()
            .enumerate()
            .filter_map(|(i, v)| problems.take(&format!("{name}[{i}]"), v).map(|t| (i, t)))
            .collect(),
        Some(_) => {
            problems.push(name, format!("expected an array of tables ([[{name}]])"));
            Vec::new()
        }
    }
}

fn interpolate_table(
    table: &mut toml::Table,
    prefix: &str,
    env: &dyn Env,
    problems: &mut Problems,
) {
    for (key, value) in table.iter_mut() {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        interpolate_value(value, &path, env, problems);
    }
}

fn interpolate_value(value: &mut toml::Value, path: &str, env: &dyn Env, problems: &mut Problems) {
    match value {
        toml::Value::String(s) => match interpolate(s, env) {
            Ok(v) => *s = v,
            Err(missing) => {
                for name in missing {
                    problems.push(
                        path,
                        format!("environment variable {name} is not set (use ${{{name}:-default}} for a default)"),
                    );
                }
            }
        },
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                interpolate_value(item, &format!("{path}[{i}]"), env, problems);
            }
        }
        toml::Value::Table(t) => interpolate_table(t, path, env, problems),
        toml::Value::Integer(_)
        | toml::Value::Float(_)
        | toml::Value::Boolean(_)
        | toml::Value::Datetime(_) => {}
    }
}

#[expect(
    clippy::too_many_arguments,
    reason = "one call per section, read in one place"
)]
fn build(
    server: RawServer,
    retry: RawRetry,
    providers: Vec<(usize, RawProvider)>,
    models: Vec<(usize, RawModel)>,
    telemetry: RawTelemetry,
    storage: RawStorage,
    guard: RawGuard,
    limits: LimitsConfig,
    budgets: BudgetsConfig,
    env: &dyn Env,
    source: ConfigSource,
    problems: &mut Problems,
) -> Config {
    let listen_text = server
        .listen
        .or_else(|| env.var("SLUICE_LISTEN"))
        .unwrap_or_else(|| DEFAULT_LISTEN.into());
    let listen = match listen_text.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(e) => {
            problems.push(
                "server.listen",
                format!("`{listen_text}` is not an address like 127.0.0.1:8484: {e}"),
            );
            SocketAddr::from(([127, 0, 0, 1], 8484))
        }
    };
    let master_key = server
        .master_key
        .filter(|k| !k.is_empty())
        .or_else(|| env.var("SLUICE_MASTER_KEY"))
        .map(SecretString::from);
    let admin_listen = server
        .admin_listen
        .filter(|a| !a.is_empty())
        .and_then(|a| match a.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(e) => {
                problems.push(
                    "server.admin_listen",
                    format!("`{a}` is not an address like 127.0.0.1:8485: {e}"),
                );
                None
            }
        });
    let max_body_bytes = server.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY);
    if max_body_bytes < 1024 {
        problems.push("server.max_body_bytes", "must be at least 1024");
    }

    let d = RetryConfig::default();
    let retry = RetryConfig {
        max_attempts: retry.max_attempts.unwrap_or(d.max_attempts),
        base_delay: retry.base_delay.unwrap_or(d.base_delay),
        max_delay: retry.max_delay.unwrap_or(d.max_delay),
        max_retry_after: retry.max_retry_after.unwrap_or(d.max_retry_after),
        deadline: retry.deadline.unwrap_or(d.deadline),
        budget_ratio: retry.budget_ratio.unwrap_or(d.budget_ratio),
        budget_min_per_sec: retry.budget_min_per_sec.unwrap_or(d.budget_min_per_sec),
    };
    if retry.max_attempts == 0 {
        problems.push("retry.max_attempts", "must be at least 1 (1 = no retries)");
    }
    if !(0.0..=1000.0).contains(&retry.budget_ratio) {
        problems.push("retry.budget_ratio", "must be between 0 and 1000");
    }
    if retry.base_delay > retry.max_delay {
        problems.push("retry.base_delay", "must not exceed retry.max_delay");
    }

    let mut names = HashSet::new();
    let providers: Vec<ProviderConfig> = providers
        .into_iter()
        .map(|(i, p)| {
            let path = format!("providers[{i}]");
            if !names.insert(p.name.clone()) {
                problems.push(
                    format!("{path}.name"),
                    format!("duplicate provider name `{}`", p.name),
                );
            }
            let base_url = p.base_url.unwrap_or_else(|| match p.kind {
                ProviderKind::Openai => DEFAULT_OPENAI_BASE_URL.into(),
                ProviderKind::Anthropic => DEFAULT_ANTHROPIC_BASE_URL.into(),
                ProviderKind::Sim => String::new(),
            });
            if p.kind != ProviderKind::Sim {
                match url::Url::parse(&base_url) {
                    // The URL's user and password would be dropped, not sent: say so.
                    Ok(u) if !u.username().is_empty() || u.password().is_some() => problems.push(
                        format!("{path}.base_url"),
                        "holds a user or password, which Sluice does not send: put the \
                             credentials in `api_key` or in `headers` (`Authorization`)",
                    ),
                    Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
                    Ok(u) => problems.push(
                        format!("{path}.base_url"),
                        format!("scheme `{}` is not http or https", u.scheme()),
                    ),
                    Err(e) => problems.push(
                        format!("{path}.base_url"),
                        format!("`{base_url}` is not a URL: {e}"),
                    ),
                }
            }
            if p.chaos.is_some() && p.kind != ProviderKind::Sim {
                problems.push(
                    format!("{path}.chaos"),
                    "only a provider of kind \"sim\" takes chaos settings",
                );
            }
            let chaos = chaos_config(p.chaos.unwrap_or_default());
            if !(0.0..=1.0).contains(&chaos.error_rate) {
                problems.push(
                    format!("{path}.chaos.error_rate"),
                    "must be between 0 and 1",
                );
            }
            ProviderConfig {
                name: p.name,
                kind: p.kind,
                base_url: base_url.trim_end_matches('/').to_string(),
                api_key: p.api_key.filter(|k| !k.is_empty()).map(SecretString::from),
                connect_timeout: p.connect_timeout.unwrap_or(DEFAULT_CONNECT),
                headers: p.headers,
                chaos,
            }
        })
        .collect();

    let mut model_names = HashSet::new();
    let model_index: Vec<usize> = models.iter().map(|(i, _)| *i).collect();
    let models: Vec<ModelConfig> = models
        .into_iter()
        .map(|(i, m)| {
            let path = format!("models[{i}]");
            if !model_names.insert(m.name.clone()) {
                problems.push(
                    format!("{path}.name"),
                    format!("duplicate model name `{}`", m.name),
                );
            }
            if m.name.is_empty() {
                problems.push(format!("{path}.name"), "must not be empty");
            }
            if m.name.trim_end_matches('*').contains('*') {
                problems.push(
                    format!("{path}.name"),
                    "`*` is only allowed at the end of a name",
                );
            }
            if !providers.iter().any(|p| p.name == m.provider) {
                problems.push(
                    format!("{path}.provider"),
                    format!(
                        "no provider named `{}` (known: {})",
                        m.provider,
                        provider_list(&providers)
                    ),
                );
            }
            if let Some(t) = &m.template_fallback
                && let Err(e) = minijinja::Environment::new().template_from_str(t)
            {
                problems.push(
                    format!("{path}.template_fallback"),
                    format!("invalid template: {e}"),
                );
            }
            for (field, rate) in [
                ("requests_per_minute", m.requests_per_minute),
                ("tokens_per_minute", m.tokens_per_minute),
            ] {
                if rate == Some(0) {
                    problems.push(format!("{path}.{field}"), "must be greater than 0");
                }
            }
            let kind = m.kind.unwrap_or_else(|| {
                if m.name.contains("embedding") {
                    ModelKind::Embeddings
                } else {
                    ModelKind::Chat
                }
            });
            let prices = m.prices.as_ref().map(|p| {
                p.build(
                    kind == ModelKind::Embeddings,
                    &format!("{path}.prices"),
                    &mut |path, message| problems.push(path, message),
                )
            });
            ModelConfig {
                timeouts: Timeouts {
                    first_byte: m.first_byte_timeout.unwrap_or(DEFAULT_FIRST_BYTE),
                    total: m.total_timeout.unwrap_or(DEFAULT_TOTAL),
                },
                connect_timeout: m.connect_timeout,
                name: m.name,
                provider: m.provider,
                upstream: m.upstream,
                kind,
                fallbacks: m.fallbacks,
                template_fallback: m.template_fallback,
                requests_per_minute: m.requests_per_minute,
                tokens_per_minute: m.tokens_per_minute,
                prices,
            }
        })
        .collect();
    for (m, i) in models.iter().zip(&model_index) {
        for (j, f) in m.fallbacks.iter().enumerate() {
            let path = format!("models[{i}].fallbacks[{j}]");
            match models.iter().find(|x| &x.name == f) {
                None => problems.push(path, format!("no model named `{f}`")),
                Some(x) if x.is_pattern() => problems.push(
                    path,
                    format!("`{f}` is a pattern; a fallback must be one model"),
                ),
                Some(x) if x.name == m.name => {
                    problems.push(path, "a model cannot be its own fallback")
                }
                Some(x) if x.kind != m.kind => {
                    problems.push(path, format!("`{f}` is not the same kind of model"))
                }
                Some(_) => {}
            }
        }
    }

    crate::usage::budgets::check_models(&budgets, &models, &mut |path, message| {
        problems.push(path, message)
    });

    let storage = build_storage(storage, problems);
    let guard =
        crate::guard::config::build(guard, &mut |path, message| problems.push(path, message));

    Config {
        storage,
        guard,
        limits,
        budgets,
        cache: crate::cache::CacheConfig::default(),
        routing: Default::default(),
        experiments: Vec::new(),
        prompts: crate::prompts::PromptsConfig::default(),
        server: ServerConfig {
            listen,
            master_key,
            max_body_bytes,
            shutdown_grace: server.shutdown_grace.unwrap_or(DEFAULT_SHUTDOWN_GRACE),
            admin_listen,
        },
        retry,
        providers,
        models,
        telemetry: TelemetryConfig {
            log_format: telemetry.log_format.unwrap_or_default(),
            log_level: telemetry
                .log_level
                .or_else(|| env.var("SLUICE_LOG"))
                .unwrap_or_else(|| "info".into()),
            regeneration_window: telemetry
                .regeneration_window
                .unwrap_or(DEFAULT_REGENERATION_WINDOW),
        },
        source,
    }
}

fn build_storage(raw: RawStorage, problems: &mut Problems) -> StorageConfig {
    let d = RecorderConfig::default();
    let recorder = RecorderConfig {
        queue: raw.queue.unwrap_or(d.queue),
        batch: raw.batch.unwrap_or(d.batch),
        flush_interval: raw.flush_interval.unwrap_or(d.flush_interval),
    };
    if recorder.queue == 0 {
        problems.push("storage.queue", "must be at least 1");
    }
    if recorder.batch == 0 || recorder.batch > 800 {
        // 800 rows x 38 columns stays under SQLite's 32766 bound parameters.
        problems.push("storage.batch", "must be between 1 and 800");
    }
    let target = match (raw.path, raw.url) {
        (Some(_), Some(_)) => {
            problems.push(
                "storage",
                "set either `path` (SQLite) or `url` (PostgreSQL), not both",
            );
            StorageTarget::Memory
        }
        (None, Some(url)) => {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                problems.push(
                    "storage.url",
                    "must be a postgres:// URL (use `path` for SQLite)",
                );
            }
            if let Some(s) = &raw.schema
                && (s.is_empty() || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
            {
                problems.push("storage.schema", "must be letters, digits and underscores");
            }
            StorageTarget::Postgres {
                url: SecretString::from(url),
                schema: raw.schema,
            }
        }
        (path, None) => {
            if raw.schema.is_some() {
                problems.push("storage.schema", "only applies to PostgreSQL (`url`)");
            }
            StorageTarget::Sqlite(path.unwrap_or_else(|| PathBuf::from(DEFAULT_SQLITE_PATH)))
        }
    };
    StorageConfig {
        target,
        store_bodies: raw.store_bodies.unwrap_or(false),
        recorder,
    }
}

fn provider_list(providers: &[ProviderConfig]) -> String {
    let names: Vec<&str> = providers.iter().map(|p| p.name.as_str()).collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

fn chaos_config(raw: RawChaos) -> sluice_sim::ChaosConfig {
    let d = sluice_sim::ChaosConfig::default();
    sluice_sim::ChaosConfig {
        latency: raw.latency.unwrap_or(d.latency),
        ttft: raw.ttft.unwrap_or(d.ttft),
        tokens_per_sec: raw.tokens_per_sec.or(d.tokens_per_sec),
        error_rate: raw.error_rate.unwrap_or(d.error_rate),
        error_status: raw.error_status.unwrap_or(500),
        rpm: raw.rpm.or(d.rpm),
        fail_first: raw.fail_first.unwrap_or(d.fail_first),
        fail_status: raw.fail_status.unwrap_or(503),
        retry_after: raw.retry_after.or(d.retry_after),
        cut_after: raw.cut_after.or(d.cut_after),
        seed: raw.seed.unwrap_or(d.seed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    const NO_ENV: [(&str, &str); 0] = [];

    #[test]
    fn embedded_default_is_simulated_without_provider_keys() {
        let c = Config::embedded_default(&NO_ENV).unwrap();
        assert_eq!(c.source, ConfigSource::Embedded { simulated: true });
        assert_eq!(c.server.listen.to_string(), DEFAULT_LISTEN);
        assert!(c.server.master_key.is_none());
        let names: Vec<_> = c.models.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"]);
        assert_eq!(
            c.model("text-embedding-3-small").unwrap().kind,
            ModelKind::Embeddings
        );
        assert!(c.model("gpt-5").is_none());
    }

    #[test]
    fn embedded_default_uses_provider_env() {
        let env = [
            ("OPENAI_BASE_URL", "http://127.0.0.1:9/v1/"),
            ("ANTHROPIC_API_KEY", "sk-ant"),
            ("SLUICE_MASTER_KEY", "master"),
            ("SLUICE_LISTEN", "0.0.0.0:9000"),
        ];
        let c = Config::embedded_default(&env).unwrap();
        assert_eq!(c.source, ConfigSource::Embedded { simulated: false });
        assert_eq!(
            c.server.master_key.as_ref().unwrap().expose_secret(),
            "master"
        );
        assert_eq!(c.server.listen.port(), 9000);
        let openai = c.providers.iter().find(|p| p.name == "openai").unwrap();
        assert_eq!(openai.base_url, "http://127.0.0.1:9/v1");
        assert!(openai.api_key.is_none());
        assert_eq!(c.model("claude-sonnet-4-5").unwrap().provider, "anthropic");
        assert_eq!(c.model("some-local-llama").unwrap().provider, "openai");
        assert_eq!(c.model("gpt-4o").unwrap().name, "gpt-4o");
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let text = r#"
            [server]
            listen = "nowhere"
            colour = "blue"

            [retry]
            max_attempts = 0

            [[providers]]
            name = "up"
            kind = "openai"
            api_key = "${MISSING_KEY}"

            [[providers]]
            name = "bad"
            kind = "carrier-pigeon"

            [[models]]
            name = "a"
            provider = "nope"
            fallbacks = ["b", "a"]
            first_byte_timeout = "soon"

            [[models]]
            name = "c"
            provider = "up"
            template_fallback = "{{ unclosed"

            [extra]
        "#;
        let err = Config::from_toml(text, &NO_ENV, ConfigSource::Embedded { simulated: false })
            .unwrap_err();
        let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
        for expected in [
            "providers[0].api_key",
            "server.colour",
            "providers[1].kind",
            "models[0].first_byte_timeout",
            "extra",
            "retry.max_attempts",
            "models[1].template_fallback",
        ] {
            assert!(
                paths.contains(&expected),
                "{expected} missing from {paths:?}"
            );
        }
        let rendered = err.to_string();
        assert!(rendered.contains("MISSING_KEY"), "{rendered}");
    }

    #[test]
    fn semantic_problems_are_all_reported() {
        let text = r#"
            [server]
            listen = "nowhere"
            [retry]
            max_attempts = 0
            [[providers]]
            name = "up"
            kind = "openai"
            [[models]]
            name = "a"
            provider = "nope"
            fallbacks = ["b", "a"]
        "#;
        let err = Config::from_toml(text, &NO_ENV, ConfigSource::Embedded { simulated: false })
            .unwrap_err();
        let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "server.listen",
                "retry.max_attempts",
                "models[0].provider",
                "models[0].fallbacks[0]",
                "models[0].fallbacks[1]"
            ]
        );
    }

    #[test]
    fn a_base_url_with_credentials_is_refused_with_its_path() {
        for url in [
            "https://user:secret@api.example.com/v1",
            "http://user@127.0.0.1:9/v1",
        ] {
            let text = format!(
                r#"
                [[providers]]
                name = "up"
                kind = "openai"
                base_url = "{url}"
                [[models]]
                name = "a"
                provider = "up"
            "#
            );
            let err =
                Config::from_toml(&text, &NO_ENV, ConfigSource::Embedded { simulated: false })
                    .unwrap_err();
            let problem = err
                .problems
                .iter()
                .find(|p| p.path == "providers[0].base_url")
                .unwrap_or_else(|| panic!("no base_url problem for {url}: {err}"));
            assert!(problem.message.contains("`api_key`"), "{}", problem.message);
            assert!(!problem.message.contains("secret"), "{}", problem.message);
        }
    }

    #[test]
    fn full_example_loads_with_env() {
        let text = r#"
            [server]
            listen = "127.0.0.1:0"
            master_key = "${KEY}"
            [retry]
            max_attempts = 4
            base_delay = "50ms"
            [[providers]]
            name = "mock"
            kind = "openai"
            base_url = "${BASE:-http://127.0.0.1:8485/v1}"
            [[providers]]
            name = "sim"
            kind = "sim"
            chaos = { fail_first = 2, fail_status = 429 }
            [[models]]
            name = "fast"
            provider = "mock"
            upstream = "gpt-4o-mini"
            fallbacks = ["backup"]
            first_byte_timeout = "2s"
            template_fallback = "Sorry {{ user }}, try later."
            [[models]]
            name = "backup"
            provider = "sim"
        "#;
        let c = Config::from_toml(
            text,
            &[("KEY", "k")],
            ConfigSource::Embedded { simulated: false },
        )
        .unwrap();
        assert_eq!(c.retry.max_attempts, 4);
        assert_eq!(c.retry.base_delay, Duration::from_millis(50));
        assert_eq!(c.providers[0].base_url, "http://127.0.0.1:8485/v1");
        assert_eq!(c.providers[1].chaos.fail_first, 2);
        let fast = c.model("fast").unwrap();
        assert_eq!(fast.upstream.as_deref(), Some("gpt-4o-mini"));
        assert_eq!(fast.timeouts.first_byte, Duration::from_secs(2));
        assert_eq!(fast.fallbacks, ["backup"]);
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    /// The shipped example must stay loadable: it documents every section.
    #[test]
    fn shipped_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/sluice.toml");
        let c =
            Config::load(&path, &[("OPENAI_API_KEY", "sk-test")]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            c.model("gpt-4o-mini").unwrap().fallbacks,
            ["claude-haiku", "sim-chat"]
        );
        assert_eq!(c.model("claude-3-opus").unwrap().provider, "anthropic");
        assert!(c.server.master_key.is_none());
    }
}
