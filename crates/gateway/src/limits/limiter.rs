//! The limiter the pipeline calls: turns a request's identity and tier into bucket
//! charges, checks them in one call to the limit store (Redis when configured, else in
//! process), and settles afterwards (token estimates reconciled with real usage,
//! concurrency slots released). When Redis fails it serves on local limits or refuses,
//! as `[redis] on_failure` says, and probes until Redis is back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use tokio_util::sync::CancellationToken;

use super::backend::{
    Backend, BackendError, Bucket, BucketState, Charge, Check, Lease, Signal, Unit, Verdict,
};
use super::config::{AbuseAction, FailMode, LimitsConfig, Rates, Tier};
use super::memory::MemoryBackend;
use crate::error::ApiError;
use crate::telemetry::{Outcome, RequestRecord};

const MINUTE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(86_400);
/// A concurrency slot nobody released (an instance died mid-request) frees itself.
const LEASE_TTL: Duration = Duration::from_secs(600);
/// Failed Redis calls in a row before the instance switches to its failure mode.
const FAILURES_BEFORE_DOWN: u64 = 3;
/// Longest end-user id accepted; longer ones are refused (400), not truncated.
pub const MAX_USER_LEN: usize = 256;

/// The `x-ratelimit-*` figures: the tightest request and token buckets of a check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateHeaders {
    pub requests: Option<BucketState>,
    pub tokens: Option<BucketState>,
}

impl RateHeaders {
    fn from_states(charges: &[Charge], states: &[BucketState]) -> Self {
        let mut out = RateHeaders::default();
        for (c, s) in charges.iter().zip(states) {
            let slot = match c.unit {
                Unit::Requests => &mut out.requests,
                Unit::Tokens => &mut out.tokens,
            };
            // The bucket closest to running out is the one a client must respect.
            let tighter = slot.is_none_or(|cur| {
                (s.remaining as u128) * (cur.limit as u128)
                    < (cur.remaining as u128) * (s.limit as u128)
            });
            if tighter {
                *slot = Some(*s);
            }
        }
        out
    }

    /// Set the headers OpenAI sends (`x-ratelimit-limit-requests`, ...). The names are
    /// static and the numbers go through `HeaderValue::from(u64)`: this runs on every
    /// limited request.
    pub fn apply(&self, headers: &mut HeaderMap) {
        headers.reserve(6);
        for ([limit, remaining, reset], state) in OPENAI_RATE_HEADERS
            .into_iter()
            .zip([self.requests, self.tokens])
        {
            let Some(s) = state else { continue };
            headers.insert(limit, HeaderValue::from(s.limit));
            headers.insert(remaining, HeaderValue::from(s.remaining));
            if let Ok(v) = HeaderValue::from_str(&format_reset(s.reset)) {
                headers.insert(reset, v);
            }
        }
    }
}

/// OpenAI's rate-limit headers, `[limit, remaining, reset]` for requests, then tokens:
/// what the gateway sends its clients, and what it reads from an OpenAI-style upstream
/// (`capacity`). Consts, so the names are checked at compile time, not parsed per
/// request.
pub const OPENAI_RATE_HEADERS: [[HeaderName; 3]; 2] = [
    [
        HeaderName::from_static("x-ratelimit-limit-requests"),
        HeaderName::from_static("x-ratelimit-remaining-requests"),
        HeaderName::from_static("x-ratelimit-reset-requests"),
    ],
    [
        HeaderName::from_static("x-ratelimit-limit-tokens"),
        HeaderName::from_static("x-ratelimit-remaining-tokens"),
        HeaderName::from_static("x-ratelimit-reset-tokens"),
    ],
];

/// A duration the way OpenAI's reset headers write it: `20ms`, `1.5s`, `6m0s`, `1h2m3s`.
/// Whole numbers only, written into one string: two run on every limited request.
pub fn format_reset(d: Duration) -> String {
    use std::fmt::Write as _;
    let ms = d.as_millis();
    let mut out = String::with_capacity(16);
    // Writing to a String cannot fail.
    if ms < 1000 {
        let _ = write!(out, "{ms}ms");
        return out;
    }
    let total = d.as_secs();
    let (h, m) = (total / 3600, (total % 3600) / 60);
    if h > 0 {
        let _ = write!(out, "{h}h");
    }
    if h > 0 || m > 0 {
        let _ = write!(out, "{m}m");
    }
    let in_minute = ms % 60_000;
    let _ = write!(out, "{}", in_minute / 1000);
    // The milliseconds as a decimal fraction without trailing zeros: .5, .25, .125.
    match in_minute % 1000 {
        0 => {}
        f if f % 100 == 0 => _ = write!(out, ".{}", f / 100),
        f if f % 10 == 0 => _ = write!(out, ".{:02}", f / 10),
        f => _ = write!(out, ".{f:03}"),
    }
    out.push('s');
    out
}

/// Who a request is for, as far as limits go.
pub struct Subject<'a> {
    /// `master`, a key id, or `None` keyless.
    pub key_id: Option<&'a str>,
    pub owner: Option<&'a str>,
    pub user: Option<&'a str>,
    pub tier: Option<&'a Tier>,
    /// Request id: names the concurrency lease.
    pub request_id: &'a str,
    /// Tokens charged up front: the input estimate plus the output allowance.
    pub tokens: u64,
}

/// What an admitted request holds until it ends.
pub struct Admission {
    /// The tier the request ran under (a throttled user's is the throttle tier).
    pub tier: Option<String>,
    pub headers: RateHeaders,
    /// Set when a penalty moved the user to a stricter tier.
    pub limited_by: Option<String>,
    token_buckets: Vec<Bucket>,
    charged_tokens: u64,
    leases: Vec<Lease>,
    /// The store that charged it (`None`: nothing was charged).
    backend: Option<Arc<dyn Backend>>,
}

impl Admission {
    /// Nothing to settle: no limits apply.
    fn free(tier: Option<&Tier>) -> Self {
        Admission {
            tier: tier.map(|t| t.name.clone()),
            headers: RateHeaders::default(),
            limited_by: None,
            token_buckets: Vec::new(),
            charged_tokens: 0,
            leases: Vec::new(),
            backend: None,
        }
    }

    /// The settlement after the request, for the caller to run off the request path:
    /// reconcile the token estimate with what the record says was used, release the
    /// concurrency slots. `None` when there is nothing to settle.
    pub fn settlement(self, record: &RequestRecord) -> Option<impl Future<Output = ()> + use<>> {
        let backend = self.backend.clone()?;
        if self.token_buckets.is_empty() && self.leases.is_empty() {
            return None;
        }
        // A cache hit (or an answer shared by an identical request) used no upstream
        // tokens, though its record shows the tokens it saved.
        let used = match record.cache_status.as_deref() {
            Some("hit" | "coalesced") => 0,
            _ => u64::from(record.prompt_tokens) + u64::from(record.completion_tokens),
        };
        let delta = i64::try_from(used).unwrap_or(i64::MAX)
            - i64::try_from(self.charged_tokens).unwrap_or(i64::MAX);
        Some(async move {
            if let Err(e) = backend
                .settle(&self.token_buckets, delta, &self.leases)
                .await
            {
                tracing::warn!(error = %e, "could not reconcile a token estimate or release a concurrency slot");
            }
        })
    }
}

/// The shared store (Redis) and whether it currently answers.
struct Shared {
    backend: Arc<dyn Backend>,
    up: AtomicBool,
    /// A probe task is running.
    probing: AtomicBool,
    /// Failures in a row; one slow reply under load must not flip the instance.
    failures: AtomicU64,
    on_failure: FailMode,
}

pub struct Limiter {
    config: LimitsConfig,
    local: Arc<dyn Backend>,
    shared: Option<Arc<Shared>>,
    /// Checks served by local limits because Redis was unreachable.
    fallbacks: AtomicU64,
    /// Abuse signals counted and penalties started, per signal (see [`SIGNALS`]).
    signals: [AtomicU64; 4],
    penalties_started: [AtomicU64; 4],
    shutdown: CancellationToken,
}

impl Limiter {
    pub fn new(
        config: LimitsConfig,
        shared: Option<Arc<dyn Backend>>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let on_failure = config
            .redis
            .as_ref()
            .map(|r| r.on_failure)
            .unwrap_or_default();
        let local = Arc::new(MemoryBackend::new());
        let sweeper = Arc::downgrade(&local);
        let stop = shutdown.clone();
        // Not on the tracker: shutdown must not wait for a sweep, and the task ends on
        // its own once the limiter is gone.
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(MINUTE);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => match sweeper.upgrade() {
                        Some(m) => m.sweep(),
                        None => return,
                    },
                }
            }
        });
        Arc::new(Self {
            config,
            local,
            shared: shared.map(|backend| {
                Arc::new(Shared {
                    backend,
                    up: AtomicBool::new(true),
                    probing: AtomicBool::new(false),
                    failures: AtomicU64::new(0),
                    on_failure,
                })
            }),
            fallbacks: AtomicU64::new(0),
            signals: Default::default(),
            penalties_started: Default::default(),
            shutdown,
        })
    }

    pub fn config(&self) -> &LimitsConfig {
        &self.config
    }

    /// `memory`, or `redis` (up or down), for `/readyz` and metrics.
    pub fn status(&self) -> LimiterStatus {
        match &self.shared {
            None => LimiterStatus {
                backend: "memory",
                shared_up: None,
                on_failure: None,
                fallbacks: 0,
                signals: load(&self.signals),
                penalties: load(&self.penalties_started),
            },
            Some(s) => LimiterStatus {
                backend: s.backend.name(),
                shared_up: Some(s.up.load(Ordering::Relaxed)),
                on_failure: Some(s.on_failure),
                fallbacks: self.fallbacks.load(Ordering::Relaxed),
                signals: load(&self.signals),
                penalties: load(&self.penalties_started),
            },
        }
    }

    /// Ask the shared store now (for `/readyz`): `None` without one. A failed ping
    /// counts like a failed check.
    pub async fn ping_shared(&self) -> Option<bool> {
        let shared = self.shared.as_ref()?;
        match shared.backend.ping().await {
            Ok(()) => {
                shared.failures.store(0, Ordering::Relaxed);
                shared.up.store(true, Ordering::Relaxed);
                Some(true)
            }
            Err(e) => {
                self.shared_failed(shared, &e);
                Some(false)
            }
        }
    }

    /// At shutdown, after every request has settled: whatever the shared store still
    /// holds back goes to Redis (a synced store's last sync). A failure is logged.
    pub async fn flush_shared(&self) {
        let Some(shared) = &self.shared else {
            return;
        };
        if let Err(error) = shared.backend.flush().await {
            tracing::warn!(%error, "the last limit sync before shutdown failed; this instance's last counts stay local");
        }
    }

    /// The tier a request runs under: the asserted one when the key may assert it,
    /// else the key's, else the default. Unknown names are a client error.
    pub fn tier(
        &self,
        key_tier: Option<&str>,
        asserted: Option<&str>,
    ) -> Result<Option<&Tier>, ApiError> {
        let name = asserted
            .or(key_tier)
            .or(self.config.default_tier.as_deref());
        match name {
            None => Ok(None),
            Some(n) => self.config.tier(n).map(Some).ok_or_else(|| {
                ApiError::invalid(
                    format!("unknown tier `{n}`"),
                    Some(if asserted.is_some() {
                        "x-sluice-tier".to_string()
                    } else {
                        "tier".to_string()
                    }),
                )
            }),
        }
    }

    /// Check and charge every limit that applies, in one call to the store.
    pub async fn admit(&self, subject: &Subject<'_>) -> Result<Admission, ApiError> {
        if !self.config.any_limits() {
            return Ok(Admission::free(subject.tier));
        }
        let penalty_key = match (&self.config.abuse, subject.user) {
            (Some(_), Some(user)) => Some(penalty_key(subject.owner, user)),
            _ => None,
        };
        let check = plan(subject, subject.tier, penalty_key);
        if check.penalty_key.is_none() && check.charges.is_empty() && check.leases.is_empty() {
            return Ok(Admission::free(subject.tier));
        }
        let (backend, verdict) = self.run(&check).await?;
        match verdict {
            Verdict::Allowed { states } => Ok(admitted(subject.tier, check, &states, backend)),
            Verdict::Refused {
                index,
                retry_after,
                states,
            } => Err(refusal(&check, index, retry_after, &states, subject.tier)),
            Verdict::Penalized { penalty, remaining } => {
                let throttle = penalty.strip_prefix("throttle:");
                match throttle.and_then(|t| self.config.tier(t)) {
                    None => Err(ApiError::AbuseBlocked {
                        retry_after: remaining,
                    }),
                    Some(stricter) => {
                        let check = plan(subject, Some(stricter), None);
                        let (backend, verdict) = self.run(&check).await?;
                        match verdict {
                            Verdict::Allowed { states } => {
                                let mut a = admitted(Some(stricter), check, &states, backend);
                                a.limited_by = Some("abuse:throttle".into());
                                Ok(a)
                            }
                            Verdict::Refused {
                                index,
                                retry_after,
                                states,
                            } => Err(refusal(&check, index, retry_after, &states, Some(stricter))),
                            Verdict::Penalized { .. } => Err(ApiError::AbuseBlocked {
                                retry_after: remaining,
                            }),
                        }
                    }
                }
            }
        }
    }

    /// Run a check on the shared store, or locally when it is down and failing open.
    async fn run(&self, check: &Check) -> Result<(Arc<dyn Backend>, Verdict), ApiError> {
        if let Some(shared) = &self.shared {
            if shared.up.load(Ordering::Relaxed) {
                match shared.backend.check(check).await {
                    Ok(v) => {
                        shared.failures.store(0, Ordering::Relaxed);
                        return Ok((shared.backend.clone(), v));
                    }
                    Err(e) => self.shared_failed(shared, &e),
                }
            }
            if shared.on_failure == FailMode::Closed {
                return Err(ApiError::LimitsUnavailable);
            }
            self.fallbacks.fetch_add(1, Ordering::Relaxed);
        }
        let verdict = self
            .local
            .check(check)
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok((self.local.clone(), verdict))
    }

    /// After a few failures in a row, mark the shared store down (checks go local or
    /// are refused without waiting on it) and probe it until it answers again. A single
    /// failure only affects the request that saw it.
    fn shared_failed(&self, shared: &Arc<Shared>, error: &BackendError) {
        let failures = shared.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < FAILURES_BEFORE_DOWN {
            tracing::warn!(%error, failures, "a limit check on Redis failed");
            return;
        }
        if shared.up.swap(false, Ordering::Relaxed) {
            tracing::error!(%error, on_failure = shared.on_failure.as_str(), "the limit store (Redis) is unreachable; serving on local limits until it is back (on_failure = open) or refusing (closed)");
        }
        if shared.probing.swap(true, Ordering::Relaxed) {
            return;
        }
        tokio::spawn(probe(shared.clone(), self.shutdown.clone()));
    }

    /// Count one abuse signal for an end user (from a finished record).
    pub async fn observe(&self, record: &RequestRecord) {
        let Some(abuse) = &self.config.abuse else {
            return;
        };
        let Some(user) = record.user.as_deref() else {
            return;
        };
        let flagged_injection = record
            .guard_flags
            .as_deref()
            .is_some_and(|f| f.split(',').any(|x| x == "prompt_injection"));
        let signals = [
            (
                abuse.rejected_inputs,
                record.outcome == Outcome::RejectedInput,
            ),
            (abuse.injection_flags, flagged_injection),
            (
                abuse.rate_limited,
                // Refusals of a blocked user are the penalty itself, not new abuse.
                record.outcome == Outcome::RateLimited
                    && record.limited_by.as_deref() != Some("abuse:block"),
            ),
            (
                abuse.budget_refused,
                record.outcome == Outcome::BudgetExceeded,
            ),
        ];
        let penalty = match abuse.action {
            AbuseAction::Block => "block".to_string(),
            AbuseAction::Throttle => {
                format!("throttle:{}", abuse.throttle_tier.as_deref().unwrap_or(""))
            }
        };
        let owner = record.owner.as_deref();
        for (i, (threshold, happened)) in signals.into_iter().enumerate() {
            let (Some(threshold), true) = (threshold, happened) else {
                continue;
            };
            let name = SIGNALS[i];
            self.signals[i].fetch_add(1, Ordering::Relaxed);
            let signal = Signal {
                counter_key: format!("{}:{name}", scope("a:", owner, user)),
                window: abuse.window,
                threshold,
                penalty_key: penalty_key(owner, user),
                penalty: penalty.clone(),
                period: abuse.period,
            };
            let backend = self.current_backend();
            match backend.signal(&signal).await {
                Ok(true) => {
                    self.penalties_started[i].fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(owner = owner.unwrap_or("-"), signal = name, penalty = %penalty, period = ?abuse.period, "end user penalized after repeated abuse signals");
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "could not count an abuse signal"),
            }
        }
    }

    fn current_backend(&self) -> Arc<dyn Backend> {
        match &self.shared {
            Some(s) if s.up.load(Ordering::Relaxed) => s.backend.clone(),
            _ => self.local.clone(),
        }
    }

    /// Lift a penalty early (admin); `false` when none was in force.
    pub async fn lift_penalty(&self, key: &str) -> Result<bool, ApiError> {
        self.current_backend()
            .clear_penalty(key)
            .await
            .map_err(|_| ApiError::LimitsUnavailable)
    }

    /// Penalties in force (admin).
    pub async fn penalties(&self) -> Result<Vec<super::backend::ActivePenalty>, ApiError> {
        self.current_backend()
            .penalties()
            .await
            .map_err(|_| ApiError::LimitsUnavailable)
    }
}

/// Ping the shared store every second until it answers, then mark it up.
async fn probe(shared: Arc<Shared>, stop: CancellationToken) {
    probe_until_up(&shared, &stop).await;
    shared.probing.store(false, Ordering::Relaxed);
}

async fn probe_until_up(shared: &Shared, stop: &CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if shared.up.load(Ordering::Relaxed) {
            return;
        }
        if shared.backend.ping().await.is_ok() {
            shared.failures.store(0, Ordering::Relaxed);
            shared.up.store(true, Ordering::Relaxed);
            tracing::info!("the limit store (Redis) is reachable again; limits are shared again");
            return;
        }
    }
}

/// The abuse signals, in the order of [`LimiterStatus::signals`].
pub const SIGNALS: [&str; 4] = [
    "rejected_input",
    "injection",
    "rate_limited",
    "budget_refused",
];

fn load(counters: &[AtomicU64; 4]) -> [u64; 4] {
    counters.each_ref().map(|c| c.load(Ordering::Relaxed))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimiterStatus {
    pub backend: &'static str,
    /// `None` without a shared store.
    pub shared_up: Option<bool>,
    pub on_failure: Option<FailMode>,
    pub fallbacks: u64,
    /// Abuse signals counted on this instance, per [`SIGNALS`].
    pub signals: [u64; 4],
    /// Penalties this instance started, per [`SIGNALS`].
    pub penalties: [u64; 4],
}

/// Escape `%` and `:` so user-chosen ids cannot collide with the key structure.
fn escape(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains([':', '%']) {
        s.replace('%', "%25").replace(':', "%3A").into()
    } else {
        s.into()
    }
}

/// `{prefix}{owner}:{user}`, both escaped; joined without the formatting machinery, as
/// every request with a user builds one.
fn scope(prefix: &str, owner: Option<&str>, user: &str) -> String {
    [prefix, &escape(owner.unwrap_or("-")), ":", &escape(user)].concat()
}

fn penalty_key(owner: Option<&str>, user: &str) -> String {
    scope("p:", owner, user)
}

/// The charges and leases for one request under `tier`.
fn plan(subject: &Subject<'_>, tier: Option<&Tier>, penalty_key: Option<String>) -> Check {
    let mut check = Check {
        penalty_key,
        ..Check::default()
    };
    let Some(tier) = tier else {
        return check;
    };
    let key = ["k:", &escape(subject.key_id.unwrap_or("-"))].concat();
    add_scope(&mut check, &key, &tier.per_key, subject);
    if let Some(user) = subject.user {
        let scope = scope("u:", subject.owner, user);
        add_scope(&mut check, &scope, &tier.per_user, subject);
    }
    let total = ["t:", &escape(&tier.name)].concat();
    add_scope(&mut check, &total, &tier.total, subject);
    check
}

fn add_scope(check: &mut Check, prefix: &str, rates: &Rates, subject: &Subject<'_>) {
    // `{prefix}:{suffix}`, without the formatting machinery: several per request.
    let key = |suffix: &str| [prefix, ":", suffix].concat();
    let mut rate = |suffix: &str, limit: Option<u64>, period, cost, unit| {
        if let Some(limit) = limit {
            check.charges.push(Charge {
                bucket: Bucket {
                    key: key(suffix),
                    limit,
                    period,
                },
                cost,
                unit,
            });
        }
    };
    rate("rpm", rates.requests_per_minute, MINUTE, 1, Unit::Requests);
    rate(
        "tpm",
        rates.tokens_per_minute,
        MINUTE,
        subject.tokens,
        Unit::Tokens,
    );
    rate(
        "tpd",
        rates.tokens_per_day,
        DAY,
        subject.tokens,
        Unit::Tokens,
    );
    if let Some(max) = rates.concurrent {
        check.leases.push(Lease {
            key: key("conc"),
            max,
            id: subject.request_id.to_string(),
            ttl: LEASE_TTL,
        });
    }
}

fn admitted(
    tier: Option<&Tier>,
    check: Check,
    states: &[BucketState],
    backend: Arc<dyn Backend>,
) -> Admission {
    let headers = RateHeaders::from_states(&check.charges, states);
    let charged_tokens = check
        .charges
        .iter()
        .find(|c| c.unit == Unit::Tokens)
        .map(|c| c.cost)
        .unwrap_or(0);
    Admission {
        tier: tier.map(|t| t.name.clone()),
        headers,
        limited_by: None,
        token_buckets: check
            .charges
            .into_iter()
            .filter(|c| c.unit == Unit::Tokens)
            .map(|c| c.bucket)
            .collect(),
        charged_tokens,
        leases: check.leases,
        backend: Some(backend),
    }
}

/// The 429 for a refused check, naming the limit like OpenAI's message does.
fn refusal(
    check: &Check,
    index: usize,
    retry_after: Duration,
    states: &[BucketState],
    tier: Option<&Tier>,
) -> ApiError {
    let headers = Box::new(RateHeaders::from_states(&check.charges, states));
    let tier_name = tier.map(|t| t.name.as_str()).unwrap_or("default");
    if let Some(charge) = check.charges.get(index) {
        let (scope, what) = describe(&charge.bucket.key);
        let retry = retry_after.max(Duration::from_millis(1));
        let message = if charge.cost > charge.bucket.limit {
            format!(
                "Request too large for the {scope} {what} limit of tier `{tier_name}`: it needs {} {} and the limit is {}.",
                charge.cost,
                charge.unit.as_str(),
                charge.bucket.limit
            )
        } else {
            format!(
                "Rate limit reached on the {scope} {what} limit of tier `{tier_name}` (limit {}). Please try again in {}.",
                charge.bucket.limit,
                format_reset(retry)
            )
        };
        return ApiError::RateLimited {
            message,
            limit: limit_name(&charge.bucket.key),
            unit: charge.unit.as_str(),
            retry_after: retry,
            headers,
        };
    }
    let lease = check.leases.get(index - check.charges.len());
    let max = lease.map(|l| l.max).unwrap_or(0);
    let (scope, _) = describe(lease.map(|l| l.key.as_str()).unwrap_or(""));
    ApiError::RateLimited {
        limit: limit_name(lease.map(|l| l.key.as_str()).unwrap_or("")),
        message: format!(
            "Too many concurrent requests for this {scope} (tier `{tier_name}` allows {max} at once). Please try again when one finishes."
        ),
        unit: "requests",
        retry_after: retry_after.max(Duration::from_secs(1)),
        headers,
    }
}

/// `user:rpm`, `key:tpm`, `tier:conc`: which limit, for records and logs.
fn limit_name(key: &str) -> String {
    let (scope, _) = describe(key);
    format!("{scope}:{}", key.rsplit(':').next().unwrap_or(""))
}

/// `(scope, limit name)` from a logical bucket key, for messages and records.
pub fn describe(key: &str) -> (&'static str, &'static str) {
    let scope = match key.split(':').next() {
        Some("k") => "key",
        Some("u") => "user",
        Some("t") => "tier",
        _ => "request",
    };
    let what = match key.rsplit(':').next() {
        Some("rpm") => "requests per minute",
        Some("tpm") => "tokens per minute",
        Some("tpd") => "tokens per day",
        Some("conc") => "concurrent requests",
        _ => "rate",
    };
    (scope, what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resets_read_like_openai() {
        assert_eq!(format_reset(Duration::from_millis(20)), "20ms");
        assert_eq!(format_reset(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_reset(Duration::from_secs(1)), "1s");
        assert_eq!(format_reset(Duration::from_secs(360)), "6m0s");
        assert_eq!(format_reset(Duration::from_secs(3723)), "1h2m3s");
        assert_eq!(format_reset(Duration::from_millis(2250)), "2.25s");
        assert_eq!(format_reset(Duration::from_millis(1050)), "1.05s");
        assert_eq!(format_reset(Duration::from_millis(60_001)), "1m0.001s");
        assert_eq!(format_reset(Duration::from_millis(3_600_120)), "1h0m0.12s");
        assert_eq!(format_reset(Duration::from_micros(999_999)), "999ms");
    }

    #[test]
    fn user_ids_cannot_forge_scopes() {
        assert_ne!(scope("", Some("a:b"), "c"), scope("", Some("a"), "b:c"));
        assert_eq!(escape("50%:x"), "50%25%3Ax");
    }
}
