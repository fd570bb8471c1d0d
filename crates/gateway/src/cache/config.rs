//! The `[cache]` section: its raw TOML shape and the validated [`CacheConfig`].

use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

use crate::limits::config::{
    DEFAULT_REDIS_PREFIX, DEFAULT_REDIS_TIMEOUT, FailMode, RedisConfig, glob_match,
};

pub const DEFAULT_MEMORY_BYTES: u64 = 64 * 1024 * 1024;
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
pub const DEFAULT_COALESCE_WINDOW: Duration = Duration::from_millis(2);
pub const DEFAULT_COALESCE_MAX_BATCH: usize = 256;

/// Whose requests may share an answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheScope {
    /// Only requests of keys with the same owner (a cached answer never crosses apps).
    #[default]
    Owner,
    /// Every caller of the gateway.
    Global,
}

/// A TTL for the requests that match; the first matching override wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TtlOverride {
    /// A model name (the name the client asked for) or `prefix*`; `None` = any.
    pub model: Option<String>,
    /// A feature (`x-sluice-feature`); `None` = any.
    pub feature: Option<String>,
    pub ttl: Duration,
}

/// The validated `[cache]` section.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub enabled: bool,
    pub scope: CacheScope,
    /// Bound of the in-process tier (responses and embedding vectors together).
    pub memory_bytes: u64,
    pub ttl: Duration,
    pub overrides: Vec<TtlOverride>,
    /// Cache only deterministic requests (temperature 0 or a seed) unless the request
    /// opts in with `x-sluice-cache: store`.
    pub only_deterministic: bool,
    /// Cache embedding vectors per input item.
    pub embeddings: bool,
    /// How long an embedding request waits for others to share its upstream call;
    /// zero = no coalescing.
    pub coalesce_window: Duration,
    pub coalesce_max_batch: usize,
    /// The shared tier: `[cache] redis_url`, else the `[redis]` section; `None` = memory
    /// only.
    pub redis: Option<RedisConfig>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            scope: CacheScope::Owner,
            memory_bytes: DEFAULT_MEMORY_BYTES,
            ttl: DEFAULT_TTL,
            overrides: Vec::new(),
            only_deterministic: true,
            embeddings: true,
            coalesce_window: DEFAULT_COALESCE_WINDOW,
            coalesce_max_batch: DEFAULT_COALESCE_MAX_BATCH,
            redis: None,
        }
    }
}

impl CacheConfig {
    /// The TTL for a request to `model` (the client's name) tagged with `feature`.
    pub fn ttl_for(&self, model: &str, feature: Option<&str>) -> Duration {
        self.overrides
            .iter()
            .find(|o| {
                o.model.as_deref().is_none_or(|m| glob_match(m, model))
                    && o.feature.as_deref().is_none_or(|f| Some(f) == feature)
            })
            .map_or(self.ttl, |o| o.ttl)
    }
}

// ---- raw, as written in TOML ----

/// `memory_bytes = 67108864` or `memory_bytes = "64MiB"`.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawBytes {
    Number(u64),
    Text(String),
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    enabled: Option<bool>,
    #[serde(default)]
    scope: CacheScope,
    memory_bytes: Option<RawBytes>,
    #[serde(default, with = "humantime_serde")]
    ttl: Option<Duration>,
    #[serde(default)]
    overrides: Vec<RawOverride>,
    only_deterministic: Option<bool>,
    embeddings: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    coalesce_window: Option<Duration>,
    coalesce_max_batch: Option<usize>,
    redis_url: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOverride {
    #[serde(rename = "match", default)]
    matches: RawMatch,
    #[serde(with = "humantime_serde")]
    ttl: Duration,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    model: Option<String>,
    feature: Option<String>,
}

/// `64MiB`, `512 KB`, `1GiB`, `1000`: binary and decimal units.
fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a size (like 64MiB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "kib" => 1 << 10,
        "mb" => 1_000_000,
        "mib" => 1 << 20,
        "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit `{other}` (use B, KiB, MiB, GiB)"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{text}` is too large"))
}

/// Validate `[cache]`; `redis` is the `[redis]` section, which the cache shares unless
/// `redis_url` names its own server.
pub fn build(
    raw: RawCache,
    redis: Option<&RedisConfig>,
    problems: &mut dyn FnMut(String, String),
) -> CacheConfig {
    let d = CacheConfig::default();
    let memory_bytes = match raw.memory_bytes {
        None => d.memory_bytes,
        Some(RawBytes::Number(n)) => n,
        Some(RawBytes::Text(t)) => parse_bytes(&t).unwrap_or_else(|e| {
            problems("cache.memory_bytes".into(), e);
            d.memory_bytes
        }),
    };
    let ttl = raw.ttl.unwrap_or(d.ttl);
    if ttl.is_zero() {
        problems("cache.ttl".into(), "must be longer than 0s".into());
    }
    let mut overrides = Vec::with_capacity(raw.overrides.len());
    for (i, o) in raw.overrides.into_iter().enumerate() {
        if o.matches.model.is_none() && o.matches.feature.is_none() {
            problems(
                format!("cache.overrides[{i}].match"),
                "name a `model`, a `feature`, or both (use `ttl` for everything)".into(),
            );
        }
        if let Some(m) = &o.matches.model
            && m.trim_end_matches('*').contains('*')
        {
            problems(
                format!("cache.overrides[{i}].match.model"),
                "`*` is only allowed at the end of a name".into(),
            );
        }
        overrides.push(TtlOverride {
            model: o.matches.model,
            feature: o.matches.feature,
            // A zero TTL is allowed here: it turns caching off for what matches.
            ttl: o.ttl,
        });
    }
    let coalesce_max_batch = raw.coalesce_max_batch.unwrap_or(d.coalesce_max_batch);
    if coalesce_max_batch == 0 {
        problems(
            "cache.coalesce_max_batch".into(),
            "must be at least 1".into(),
        );
    }
    let coalesce_window = raw.coalesce_window.unwrap_or(d.coalesce_window);
    if coalesce_window > Duration::from_secs(1) {
        problems(
            "cache.coalesce_window".into(),
            "must be at most 1s (every coalesced request waits this long)".into(),
        );
    }
    let redis = match raw.redis_url.filter(|u| !u.trim().is_empty()) {
        None => redis.cloned(),
        Some(url) if !(url.starts_with("redis://") || url.starts_with("rediss://")) => {
            problems(
                "cache.redis_url".into(),
                "must start with redis:// or rediss://".into(),
            );
            None
        }
        Some(url) => Some(match redis {
            Some(r) => RedisConfig {
                url: SecretString::from(url),
                ..r.clone()
            },
            None => RedisConfig {
                url: SecretString::from(url),
                prefix: DEFAULT_REDIS_PREFIX.into(),
                on_failure: FailMode::Open,
                timeout: DEFAULT_REDIS_TIMEOUT,
                sync: None,
            },
        }),
    };
    CacheConfig {
        enabled: raw.enabled.unwrap_or(d.enabled),
        scope: raw.scope,
        memory_bytes,
        ttl,
        overrides,
        only_deterministic: raw.only_deterministic.unwrap_or(d.only_deterministic),
        embeddings: raw.embeddings.unwrap_or(d.embeddings),
        coalesce_window,
        coalesce_max_batch,
        redis,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn parse(text: &str, redis: Option<&RedisConfig>) -> (CacheConfig, Vec<(String, String)>) {
        let raw: RawCache = toml::from_str(text).unwrap();
        let mut problems = Vec::new();
        let c = build(raw, redis, &mut |p, m| problems.push((p, m)));
        (c, problems)
    }

    #[test]
    fn defaults_when_the_section_is_empty() {
        let (c, problems) = parse("", None);
        assert!(problems.is_empty());
        assert!(c.enabled && c.only_deterministic && c.embeddings);
        assert_eq!(c.scope, CacheScope::Owner);
        assert_eq!(c.memory_bytes, 64 << 20);
        assert_eq!(c.ttl, Duration::from_secs(3600));
        assert_eq!(c.coalesce_window, Duration::from_millis(2));
        assert_eq!(c.coalesce_max_batch, 256);
        assert!(c.redis.is_none());
    }

    #[test]
    fn overrides_first_match_wins() {
        let (c, problems) = parse(
            r#"
            scope = "global"
            memory_bytes = "16MiB"
            ttl = "1h"
            [[overrides]]
            match = { model = "gpt-4o*", feature = "search" }
            ttl = "10m"
            [[overrides]]
            match = { model = "gpt-4o*" }
            ttl = "30m"
            "#,
            None,
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(c.scope, CacheScope::Global);
        assert_eq!(c.memory_bytes, 16 << 20);
        let m = Duration::from_secs(60);
        assert_eq!(c.ttl_for("gpt-4o-mini", Some("search")), 10 * m);
        assert_eq!(c.ttl_for("gpt-4o", None), 30 * m);
        assert_eq!(c.ttl_for("claude", Some("search")), 60 * m);
    }

    #[test]
    fn problems_are_reported_with_their_path() {
        let (_, problems) = parse(
            r#"
            memory_bytes = "12 parsecs"
            ttl = "0s"
            coalesce_max_batch = 0
            redis_url = "http://x"
            [[overrides]]
            match = {}
            ttl = "1m"
            "#,
            None,
        );
        let paths: Vec<&str> = problems.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "cache.memory_bytes",
                "cache.ttl",
                "cache.overrides[0].match",
                "cache.coalesce_max_batch",
                "cache.redis_url"
            ]
        );
        assert!(toml::from_str::<RawCache>("colour = 1").is_err());
    }

    #[test]
    fn redis_defaults_to_the_redis_section_and_can_be_its_own() {
        let shared = RedisConfig {
            url: SecretString::from("redis://a:6379/0"),
            prefix: "p:".into(),
            on_failure: FailMode::Closed,
            timeout: Duration::from_millis(100),
            sync: None,
        };
        let (c, _) = parse("", Some(&shared));
        assert_eq!(c.redis.unwrap().url.expose_secret(), "redis://a:6379/0");
        let (c, _) = parse(r#"redis_url = "redis://a:6379/3""#, Some(&shared));
        let r = c.redis.unwrap();
        assert_eq!(r.url.expose_secret(), "redis://a:6379/3");
        assert_eq!(r.prefix, "p:");
    }
}
