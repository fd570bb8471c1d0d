//! `[[tiers]]`, `[limits]` and `[redis]` configuration: raw TOML shapes and their
//! validated forms.

use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

/// Limits for one scope (each key, each end user, or a whole tier). `None` = unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rates {
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub tokens_per_day: Option<u64>,
    /// Requests in flight at once.
    pub concurrent: Option<u64>,
}

impl Rates {
    pub fn is_unlimited(&self) -> bool {
        *self == Rates::default()
    }
}

/// A tier: what its keys and end users may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tier {
    pub name: String,
    /// Higher goes first when provider capacity runs short.
    pub priority: u32,
    /// Model names or `prefix*` patterns this tier may use; empty = every model.
    pub models: Vec<String>,
    /// Caps the input guard's token limit for this tier.
    pub max_input_tokens: Option<usize>,
    /// Caps `max_tokens` (requests asking for more are clamped).
    pub max_tokens: Option<u32>,
    /// Each key of this tier.
    pub per_key: Rates,
    /// Each end user (scoped by the key's owner) of this tier.
    pub per_user: Rates,
    /// All traffic of this tier together.
    pub total: Rates,
}

impl Tier {
    /// Whether this tier may use `model` (the name the client asked for).
    pub fn allows_model(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| glob_match(m, model))
    }
}

/// `prefix*` or an exact name.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FailMode {
    /// Redis unreachable: keep serving on this instance's own limits.
    #[default]
    Open,
    /// Redis unreachable: refuse requests that need a limit check (503).
    Closed,
}

impl FailMode {
    pub fn as_str(self) -> &'static str {
        match self {
            FailMode::Open => "open",
            FailMode::Closed => "closed",
        }
    }
}

#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: SecretString,
    /// Every key Sluice writes starts with this (then `rl:` for limits).
    pub prefix: String,
    pub on_failure: FailMode,
    /// Per command; past it the check counts as a Redis failure.
    pub timeout: Duration,
    /// Count limits and budgets on each instance and reconcile with Redis this often
    /// ([`SyncedBackend`](super::synced::SyncedBackend),
    /// [`SyncedLedger`](crate::usage::ledger::SyncedLedger)); `None`: every check and
    /// charge on Redis, exact.
    pub sync: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AbuseAction {
    /// Refuse the end user's requests (429 `abuse_blocked`) for the period.
    Block,
    /// Move the end user to `throttle_tier` for the period.
    Throttle,
}

/// Per end user: signals counted over `window`; reaching a threshold starts a penalty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbuseConfig {
    pub window: Duration,
    pub period: Duration,
    pub action: AbuseAction,
    pub throttle_tier: Option<String>,
    /// Thresholds per signal; `None` = that signal is not counted.
    pub rejected_inputs: Option<u64>,
    pub injection_flags: Option<u64>,
    pub rate_limited: Option<u64>,
    pub budget_refused: Option<u64>,
}

/// The validated limits: tiers, the default tier, Redis, abuse handling.
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    pub tiers: Vec<Tier>,
    /// The tier of the master key, keyless mode, and keys whose tier is unknown.
    pub default_tier: Option<String>,
    pub redis: Option<RedisConfig>,
    pub abuse: Option<AbuseConfig>,
    /// How often each instance reloads virtual keys from the store.
    pub key_refresh: Duration,
    /// Provider capacity: how many requests may wait, and for how long at most.
    pub queue_max: usize,
    pub queue_max_wait: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            tiers: Vec::new(),
            default_tier: None,
            redis: None,
            abuse: None,
            key_refresh: DEFAULT_KEY_REFRESH,
            queue_max: DEFAULT_QUEUE_MAX,
            queue_max_wait: DEFAULT_QUEUE_MAX_WAIT,
        }
    }
}

impl LimitsConfig {
    pub fn tier(&self, name: &str) -> Option<&Tier> {
        self.tiers.iter().find(|t| t.name == name)
    }

    /// Any limit configured at all (otherwise the limiter is skipped entirely).
    pub fn any_limits(&self) -> bool {
        self.tiers.iter().any(|t| {
            !(t.per_key.is_unlimited() && t.per_user.is_unlimited() && t.total.is_unlimited())
        }) || self.abuse.is_some()
    }
}

pub const DEFAULT_KEY_REFRESH: Duration = Duration::from_secs(2);
pub const DEFAULT_QUEUE_MAX: usize = 256;
pub const DEFAULT_QUEUE_MAX_WAIT: Duration = Duration::from_secs(10);
/// `[redis]`'s defaults; also the cache's when `[cache] redis_url` stands alone.
pub(crate) const DEFAULT_REDIS_PREFIX: &str = "sluice:";
pub(crate) const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(250);
/// Past this, instances would see each other's charges too late to share a limit.
const MAX_REDIS_SYNC: Duration = Duration::from_secs(10);

// ---- raw, as written in TOML ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTier {
    name: String,
    #[serde(default)]
    priority: u32,
    #[serde(default)]
    models: Vec<String>,
    max_input_tokens: Option<usize>,
    max_tokens: Option<u32>,
    #[serde(default)]
    per_key: Rates,
    #[serde(default)]
    per_user: Rates,
    #[serde(default)]
    total: Rates,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawRedis {
    url: Option<String>,
    prefix: Option<String>,
    #[serde(default)]
    on_failure: FailMode,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    sync: Option<Duration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    default_tier: Option<String>,
    #[serde(default, with = "humantime_serde")]
    key_refresh: Option<Duration>,
    queue_max: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    queue_max_wait: Option<Duration>,
    abuse: Option<RawAbuse>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAbuse {
    #[serde(with = "humantime_serde")]
    window: Duration,
    #[serde(with = "humantime_serde")]
    period: Duration,
    action: AbuseAction,
    throttle_tier: Option<String>,
    rejected_inputs: Option<u64>,
    injection_flags: Option<u64>,
    rate_limited: Option<u64>,
    budget_refused: Option<u64>,
}

/// Validate `[[tiers]]` (each with its index), `[limits]` and `[redis]`.
pub fn build(
    tiers: Vec<(usize, RawTier)>,
    limits: RawLimits,
    redis: Option<RawRedis>,
    problems: &mut dyn FnMut(String, String),
) -> LimitsConfig {
    let mut out = LimitsConfig::default();
    for (i, raw) in tiers {
        let path = format!("tiers[{i}]");
        if raw.name.trim().is_empty() {
            problems(format!("{path}.name"), "must not be empty".into());
        }
        if out.tiers.iter().any(|t| t.name == raw.name) {
            problems(
                format!("{path}.name"),
                format!("tier `{}` is defined twice", raw.name),
            );
        }
        for (scope, rates) in [
            ("per_key", &raw.per_key),
            ("per_user", &raw.per_user),
            ("total", &raw.total),
        ] {
            for (field, value) in [
                ("requests_per_minute", rates.requests_per_minute),
                ("tokens_per_minute", rates.tokens_per_minute),
                ("tokens_per_day", rates.tokens_per_day),
                ("concurrent", rates.concurrent),
            ] {
                if value == Some(0) {
                    problems(
                        format!("{path}.{scope}.{field}"),
                        "must be at least 1 (leave it out for no limit)".into(),
                    );
                }
            }
        }
        if raw.max_tokens == Some(0) {
            problems(format!("{path}.max_tokens"), "must be at least 1".into());
        }
        if raw.max_input_tokens == Some(0) {
            problems(
                format!("{path}.max_input_tokens"),
                "must be at least 1".into(),
            );
        }
        out.tiers.push(Tier {
            name: raw.name,
            priority: raw.priority,
            models: raw.models,
            max_input_tokens: raw.max_input_tokens,
            max_tokens: raw.max_tokens,
            per_key: raw.per_key,
            per_user: raw.per_user,
            total: raw.total,
        });
    }
    let names = || {
        out.tiers
            .iter()
            .map(|t| format!("`{}`", t.name))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some(name) = &limits.default_tier
        && out.tier(name).is_none()
    {
        problems(
            "limits.default_tier".into(),
            format!("no tier `{name}` (tiers: {})", names()),
        );
    }
    if let Some(abuse) = limits.abuse {
        if abuse.window.is_zero() {
            problems(
                "limits.abuse.window".into(),
                "must be longer than 0s".into(),
            );
        }
        if abuse.period.is_zero() {
            problems(
                "limits.abuse.period".into(),
                "must be longer than 0s".into(),
            );
        }
        match (&abuse.action, &abuse.throttle_tier) {
            (AbuseAction::Throttle, None) => problems(
                "limits.abuse.throttle_tier".into(),
                "`action = \"throttle\"` needs the tier to throttle to".into(),
            ),
            (AbuseAction::Throttle, Some(t)) if out.tier(t).is_none() => problems(
                "limits.abuse.throttle_tier".into(),
                format!("no tier `{t}` (tiers: {})", names()),
            ),
            _ => {}
        }
        let thresholds = [
            abuse.rejected_inputs,
            abuse.injection_flags,
            abuse.rate_limited,
            abuse.budget_refused,
        ];
        if thresholds.iter().all(Option::is_none) {
            problems(
                "limits.abuse".into(),
                "set at least one threshold (rejected_inputs, injection_flags, rate_limited, budget_refused)".into(),
            );
        }
        if thresholds.contains(&Some(0)) {
            problems(
                "limits.abuse".into(),
                "thresholds must be at least 1".into(),
            );
        }
        out.abuse = Some(AbuseConfig {
            window: abuse.window,
            period: abuse.period,
            action: abuse.action,
            throttle_tier: abuse.throttle_tier,
            rejected_inputs: abuse.rejected_inputs,
            injection_flags: abuse.injection_flags,
            rate_limited: abuse.rate_limited,
            budget_refused: abuse.budget_refused,
        });
    }
    out.default_tier = limits.default_tier;
    out.key_refresh = limits.key_refresh.unwrap_or(DEFAULT_KEY_REFRESH);
    if out.key_refresh.is_zero() {
        problems("limits.key_refresh".into(), "must be longer than 0s".into());
    }
    out.queue_max = limits.queue_max.unwrap_or(DEFAULT_QUEUE_MAX);
    out.queue_max_wait = limits.queue_max_wait.unwrap_or(DEFAULT_QUEUE_MAX_WAIT);
    if let Some(redis) = redis {
        match redis.url.filter(|u| !u.trim().is_empty()) {
            None => problems(
                "redis.url".into(),
                "is required in a [redis] section".into(),
            ),
            Some(url) if !(url.starts_with("redis://") || url.starts_with("rediss://")) => {
                problems(
                    "redis.url".into(),
                    "must start with redis:// or rediss://".into(),
                )
            }
            Some(url) => {
                if redis
                    .sync
                    .is_some_and(|d| d.is_zero() || d > MAX_REDIS_SYNC)
                {
                    problems("redis.sync".into(), "must be between 1ms and 10s".into());
                }
                out.redis = Some(RedisConfig {
                    url: SecretString::from(url),
                    prefix: redis.prefix.unwrap_or_else(|| DEFAULT_REDIS_PREFIX.into()),
                    on_failure: redis.on_failure,
                    timeout: redis.timeout.unwrap_or(DEFAULT_REDIS_TIMEOUT),
                    sync: redis.sync,
                })
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_prefixes_and_exact_names() {
        assert!(glob_match("gpt-4o*", "gpt-4o-mini"));
        assert!(glob_match("gpt-4o", "gpt-4o"));
        assert!(!glob_match("gpt-4o", "gpt-4o-mini"));
        assert!(glob_match("*", "anything"));
        let tier = Tier {
            name: "free".into(),
            priority: 0,
            models: vec!["gpt-4o-mini".into()],
            max_input_tokens: None,
            max_tokens: None,
            per_key: Rates::default(),
            per_user: Rates::default(),
            total: Rates::default(),
        };
        assert!(tier.allows_model("gpt-4o-mini"));
        assert!(!tier.allows_model("gpt-4o"));
    }
}
