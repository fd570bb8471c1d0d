//! [`Budgets`]: what the pipeline asks before a request (may it spend?) and tells after
//! it (what it spent), and what `/admin/budgets` shows. Each rule that applies to a
//! request names one counter (its period, its scope value); the ledger holds them.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio_util::task::TaskTracker;

use super::alerts::{Alert, Alerter, RetryPolicy};
use super::budgets::{BudgetMatch, BudgetRule, BudgetsConfig, OnExceeded, Scope};
use super::calendar::{Span, rfc3339, span};
use super::forecast::{Forecast, forecast};
use super::ledger::{
    BudgetLedger, Counter, GRACE_MS, LedgerError, MemoryLedger, RedisLedger, SpendSource,
    SyncedLedger,
};
use super::prices::{Cost, NANOS_PER_MICRO};
use crate::limits::config::{FailMode, RedisConfig};
use crate::redis_conn::RedisPool;
use crate::store::{SpendFilter, SpendGroup};
use crate::telemetry::{Endpoint, Metrics, RequestRecord};

/// Who a request is, as budgets see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subject<'a> {
    pub key_id: Option<&'a str>,
    /// The key's owner; end users are counted within it.
    pub owner: Option<&'a str>,
    pub user: Option<&'a str>,
    pub tier: Option<&'a str>,
    pub feature: Option<&'a str>,
    pub endpoint: Endpoint,
}

impl<'a> Subject<'a> {
    pub fn of(record: &'a RequestRecord) -> Subject<'a> {
        Subject {
            key_id: record.key_id.as_deref(),
            owner: record.owner.as_deref(),
            user: record.user.as_deref(),
            tier: record.tier.as_deref(),
            feature: record.feature.as_deref(),
            endpoint: record.endpoint,
        }
    }
}

/// What budgets say about a request, before it is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BudgetDecision {
    Allow,
    /// Refuse: 429 `budget_exceeded`, `retry-after` until the period ends.
    Block {
        budget: String,
        spent: Cost,
        limit: Cost,
        retry_after: Duration,
    },
    /// Answer with model `to` instead (say so in `x-sluice-model`). When the request
    /// already asks for `to`, it simply proceeds.
    Downgrade {
        budget: String,
        to: String,
    },
    /// The counters could not be read and `[redis] on_failure = "closed"`: refuse (503).
    Unavailable,
}

/// The counters one request counts against ([`Budgets::count`]), each with its rule.
#[derive(Debug)]
pub struct Counted {
    endpoint: Endpoint,
    /// Indices into the config's rules, one for each counter of `list`.
    rules: Vec<usize>,
    list: Vec<Counter>,
}

impl Counted {
    /// The counters, in the config's rule order.
    pub fn counters(&self) -> &[Counter] {
        &self.list
    }

    /// The `i`-th counter with its rule (looked up by index, so a position always
    /// names the same counter as in `list` and in the ledger's answers).
    fn get<'a>(
        &'a self,
        config: &'a BudgetsConfig,
        i: usize,
    ) -> Option<(&'a BudgetRule, &'a Counter)> {
        Some((config.rules.get(*self.rules.get(i)?)?, self.list.get(i)?))
    }
}

/// Budget rules, their counters and their alerts.
pub struct Budgets {
    config: BudgetsConfig,
    ledger: Arc<dyn BudgetLedger>,
    source: Arc<dyn SpendSource>,
    alerter: Alerter,
    on_failure: FailMode,
    metrics: Option<Arc<Metrics>>,
    /// Unix second of the last "counters unavailable" line (one a second at most).
    last_error_log: AtomicI64,
}

impl Budgets {
    /// Budgets on Redis when `redis` is set (exact across instances, or synced every
    /// `redis.sync`; on `pool`'s connection to it), else in process;
    /// counters start from `source` (the request log); alerts are sent on `tasks`.
    /// Never waits for Redis. Fails for an unusable Redis URL or outside a runtime.
    pub fn new(
        config: BudgetsConfig,
        redis: Option<&RedisConfig>,
        pool: &mut RedisPool,
        source: Arc<dyn SpendSource>,
        metrics: Option<Arc<Metrics>>,
        tasks: TaskTracker,
    ) -> anyhow::Result<Budgets> {
        let ledger: Arc<dyn BudgetLedger> = match redis {
            Some(r) if config.is_enabled() => {
                let conn = pool.conn(r).map_err(LedgerError::Unavailable)?;
                let redis = RedisLedger::with_conn(conn, r, source.clone());
                match r.sync {
                    Some(interval) => SyncedLedger::start(redis, interval),
                    None => Arc::new(redis),
                }
            }
            _ => Arc::new(MemoryLedger::new(source.clone())),
        };
        let alerter = Alerter::new(
            config.webhook.clone(),
            RetryPolicy::default(),
            metrics.clone(),
            tasks,
        )?;
        let on_failure = redis.map(|r| r.on_failure).unwrap_or_default();
        Ok(Budgets::with_parts(
            config, ledger, source, alerter, on_failure, metrics,
        ))
    }

    /// From ready parts (tests: a chosen ledger, a local webhook, fast retries).
    pub fn with_parts(
        config: BudgetsConfig,
        ledger: Arc<dyn BudgetLedger>,
        source: Arc<dyn SpendSource>,
        alerter: Alerter,
        on_failure: FailMode,
        metrics: Option<Arc<Metrics>>,
    ) -> Budgets {
        Budgets {
            config,
            ledger,
            source,
            alerter,
            on_failure,
            metrics,
            last_error_log: AtomicI64::new(0),
        }
    }

    /// Any rule configured (otherwise check and charge return at once).
    pub fn is_enabled(&self) -> bool {
        self.config.is_enabled()
    }

    pub fn config(&self) -> &BudgetsConfig {
        &self.config
    }

    pub fn ledger_name(&self) -> &'static str {
        self.ledger.name()
    }

    /// The counters a request made at `at_ms` counts against: built once a request, at
    /// its check, and kept for its charge ([`Budgets::charging`]), since nothing a rule
    /// counts by (key, owner, end user, tier, feature, start time) changes after the
    /// check.
    pub fn count(&self, s: &Subject<'_>, at_ms: i64) -> Counted {
        let mut counted = Counted {
            endpoint: s.endpoint,
            rules: Vec::new(),
            list: Vec::new(),
        };
        for (i, rule) in self.config.rules.iter().enumerate() {
            if !rule.when.matches(s.tier, s.feature) {
                continue;
            }
            let Some(value) = scope_value(rule.scope, s) else {
                continue;
            };
            let period = span(rule.period, at_ms, self.config.utc_offset_s);
            counted.rules.push(i);
            counted.list.push(self.counter(rule, &period, value));
        }
        counted
    }

    /// The scope's value goes into the key as text and then into the filter itself, no
    /// copy.
    fn counter(&self, rule: &BudgetRule, period: &Span, value: ScopeValue) -> Counter {
        let mut filter = base_filter(&rule.when, period);
        let mut key = counter_prefix(rule, period);
        match value {
            ScopeValue::Global => {}
            ScopeValue::Key(k) => {
                key.push_str(&k);
                filter.key_id = Some(k);
            }
            ScopeValue::Owner(o) => {
                key.push_str(&o);
                filter.owner = Some(o);
            }
            ScopeValue::Feature(f) => {
                key.push_str(&f);
                filter.feature = Some(f);
            }
            ScopeValue::User { owner, user } => {
                push_user(&mut key, &owner, &user);
                filter.owner = Some(owner);
                filter.user = Some(user);
            }
        }
        Counter {
            key,
            limit: rule.limit.nanos,
            thresholds: rule.alert_at.iter().map(|t| t.of(rule.limit)).collect(),
            expires_at_ms: period.end_ms.saturating_add(GRACE_MS),
            filter,
        }
    }

    /// Before a request: may it spend? `at_ms` is the request's start
    /// (`RequestRecord::started_at_ms`), the moment its charge counts at too, so both
    /// count in the same period. See [`Budgets::check_counted`].
    pub async fn check(&self, s: &Subject<'_>, at_ms: i64) -> BudgetDecision {
        if !self.is_enabled() {
            return BudgetDecision::Allow;
        }
        self.check_counted(&self.count(s, at_ms), at_ms).await
    }

    /// [`Budgets::check`] on counters already built. The first exhausted `block` rule
    /// (in config order) refuses; else the first exhausted `downgrade` rule downgrades.
    pub async fn check_counted(&self, counted: &Counted, at_ms: i64) -> BudgetDecision {
        if counted.list.is_empty() {
            return BudgetDecision::Allow;
        }
        let spends = match self.ledger.check(&counted.list).await {
            Ok(s) => s,
            Err(e) => {
                self.counter_error("check", &e);
                return match self.on_failure {
                    FailMode::Open => BudgetDecision::Allow,
                    FailMode::Closed => BudgetDecision::Unavailable,
                };
            }
        };
        let mut downgrade = None;
        for (i, spend) in spends.iter().enumerate() {
            let Some((rule, counter)) = counted.get(&self.config, i) else {
                continue;
            };
            if !spend.exhausted() {
                continue;
            }
            match &rule.on_exceeded {
                OnExceeded::Downgrade { to } if counted.endpoint == Endpoint::ChatCompletions => {
                    downgrade.get_or_insert_with(|| BudgetDecision::Downgrade {
                        budget: rule.name.clone(),
                        to: to.clone(),
                    });
                }
                OnExceeded::Block | OnExceeded::Downgrade { .. } => {
                    let end = counter.filter.until_ms;
                    return BudgetDecision::Block {
                        budget: rule.name.clone(),
                        spent: Cost::from_nanos(spend.spent),
                        limit: rule.limit,
                        retry_after: Duration::from_millis(
                            u64::try_from(end.saturating_sub(at_ms)).unwrap_or(0),
                        ),
                    };
                }
            }
        }
        downgrade.unwrap_or(BudgetDecision::Allow)
    }

    /// After a request: add what it cost to every counter it counts against, and alert
    /// on the thresholds this crossed. A request that cost nothing charges nothing.
    pub async fn charge(&self, s: &Subject<'_>, at_ms: i64, cost: Cost) {
        if !self.is_enabled() || cost.nanos <= 0 {
            return;
        }
        self.charge_counted(&self.count(s, at_ms), cost).await;
    }

    /// [`Budgets::charge`] on counters already built.
    async fn charge_counted(&self, counted: &Counted, cost: Cost) {
        if counted.list.is_empty() || cost.nanos <= 0 {
            return;
        }
        let crossings = match self.ledger.charge(&counted.list, cost.nanos).await {
            Ok(c) => c,
            Err(e) => {
                self.counter_error("charge", &e);
                return;
            }
        };
        let now = super::now_ms();
        for x in crossings {
            let Some((rule, counter)) = counted.get(&self.config, x.counter) else {
                continue;
            };
            let Some(threshold) = rule.alert_at.get(x.threshold) else {
                continue;
            };
            // The counter's scope value, read back from its key as the report reads it.
            let period = span(
                rule.period,
                counter.filter.since_ms,
                self.config.utc_offset_s,
            );
            let (owner, value) = counter
                .key
                .strip_prefix(&counter_prefix(rule, &period))
                .and_then(|v| decode(rule.scope, v))
                .map_or((None, None), ScopeValue::parts);
            self.alerter.fire(Alert {
                id: format!("{}@{}", counter.key, threshold.label()),
                budget: rule.name.clone(),
                scope: rule.scope.as_str(),
                scope_value: value,
                owner,
                period: rule.period.as_str(),
                period_start: rfc3339(period.start_ms),
                period_end: rfc3339(period.end_ms),
                threshold: threshold.as_f64(),
                spent_usd: Cost::from_nanos(x.spent).usd(),
                limit_usd: rule.limit.usd(),
                at: rfc3339(now),
            });
        }
    }

    /// [`Budgets::charge`] from a finished record: its exact cost (`cost_nanos`, else
    /// `cost_micros`), at its start time.
    pub async fn charge_record(&self, record: &RequestRecord) {
        let Some(nanos) = record_cost_nanos(record) else {
            return;
        };
        let at = i64::try_from(record.started_at_ms).unwrap_or(i64::MAX);
        self.charge(&Subject::of(record), at, Cost::from_nanos(nanos))
            .await;
    }

    /// The charge for the record's `after` hook, which runs once per request (also for
    /// a cancelled stream) and must not wait: the caller runs it in the background.
    /// `counted` is what the request was checked against ([`Budgets::count`]); the
    /// record gives the cost. `None` when there is nothing to charge.
    pub fn charging(
        self: &Arc<Self>,
        counted: Counted,
        record: &RequestRecord,
    ) -> Option<impl Future<Output = ()> + use<>> {
        if !self.is_enabled() || counted.list.is_empty() {
            return None;
        }
        let cost = Cost::from_nanos(record_cost_nanos(record).filter(|n| *n > 0)?);
        let budgets = self.clone();
        Some(async move { budgets.charge_counted(&counted, cost).await })
    }

    fn counter_error(&self, op: &'static str, e: &LedgerError) {
        if let Some(m) = &self.metrics {
            m.budget_counter_error(op);
        }
        let now = super::now_ms() / 1000;
        if self.last_error_log.swap(now, Ordering::Relaxed) != now {
            let serving = match (op, self.on_failure) {
                ("check", FailMode::Open) => "requests pass unchecked",
                ("check", FailMode::Closed) => "requests are refused",
                _ => "this spend is not counted",
            };
            tracing::warn!(op, error = %e, "budget counters unavailable; {serving}");
        }
    }

    /// Every rule's counters in the period holding `now_ms`, biggest spenders first, at
    /// most `per_rule` per rule: for `/admin/budgets`.
    pub async fn report(
        &self,
        now_ms: i64,
        per_rule: usize,
    ) -> Result<Vec<BudgetReport>, LedgerError> {
        let mut out = Vec::with_capacity(self.config.rules.len());
        for rule in &self.config.rules {
            let period = span(rule.period, now_ms, self.config.utc_offset_s);
            let mut rows: Vec<(ScopeValue, i64)> = Vec::new();
            let mut truncated = false;
            if rule.scope == Scope::Global {
                let c = self.counter(rule, &period, ScopeValue::Global);
                let spent = self.ledger.check(&[c]).await?;
                rows.extend(spent.first().map(|s| (ScopeValue::Global, s.spent)));
            } else {
                let prefix = counter_prefix(rule, &period);
                for (key, spent) in self.ledger.list(&prefix).await? {
                    if let Some(v) = key
                        .strip_prefix(&prefix)
                        .and_then(|v| decode(rule.scope, v))
                    {
                        rows.push((v, spent));
                    }
                }
                // Counters no live store holds yet (after a restart, in another
                // instance without Redis) come from the request log.
                let group = match rule.scope {
                    Scope::Key => SpendGroup::Key,
                    Scope::Owner => SpendGroup::Owner,
                    Scope::User => SpendGroup::User,
                    Scope::Global | Scope::Feature => SpendGroup::Feature,
                };
                let filter = base_filter(&rule.when, &period);
                let stored = self
                    .source
                    .spend_by(&filter, group, per_rule.saturating_add(1))
                    .await
                    .map_err(LedgerError::Source)?;
                truncated = stored.len() > per_rule;
                let live: std::collections::HashSet<ScopeValue> =
                    rows.iter().map(|(v, _)| v.clone()).collect();
                for row in stored {
                    let v = match rule.scope {
                        Scope::User => ScopeValue::User {
                            owner: row.owner.unwrap_or_default(),
                            user: row.value,
                        },
                        Scope::Key => ScopeValue::Key(row.value),
                        Scope::Owner => ScopeValue::Owner(row.value),
                        Scope::Global | Scope::Feature => ScopeValue::Feature(row.value),
                    };
                    if !live.contains(&v) {
                        rows.push((v, row.nanos));
                    }
                }
                rows.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
                truncated |= rows.len() > per_rule;
                rows.truncate(per_rule);
            }
            let counters = rows
                .into_iter()
                .map(|(v, spent)| {
                    let f = forecast(
                        spent,
                        rule.limit.nanos,
                        period.start_ms,
                        period.end_ms,
                        now_ms,
                    );
                    let (owner, value) = v.parts();
                    CounterReport {
                        scope_value: value,
                        owner,
                        spent_usd: Cost::from_nanos(spent).usd(),
                        spent_nanos: spent,
                        limit_usd: rule.limit.usd(),
                        percent: percent(spent, rule.limit.nanos),
                        exhausted: f == Forecast::Exhausted,
                        forecast_exhaustion: match f {
                            Forecast::RunsOut { at_ms } => Some(rfc3339(at_ms)),
                            Forecast::Exhausted | Forecast::Holds => None,
                        },
                    }
                })
                .collect();
            out.push(BudgetReport {
                name: rule.name.clone(),
                scope: rule.scope,
                period: rule.period.as_str(),
                period_start: rfc3339(period.start_ms),
                period_end: rfc3339(period.end_ms),
                limit_usd: rule.limit.usd(),
                alert_at: rule.alert_at.iter().map(|t| t.as_f64()).collect(),
                on_exceeded: match rule.on_exceeded {
                    OnExceeded::Block => "block",
                    OnExceeded::Downgrade { .. } => "downgrade",
                },
                downgrade_to: match &rule.on_exceeded {
                    OnExceeded::Downgrade { to } => Some(to.clone()),
                    OnExceeded::Block => None,
                },
                tier: rule.when.tier.clone(),
                feature: rule.when.feature.clone(),
                counters,
                truncated,
            });
        }
        Ok(out)
    }
}

/// One rule's state in `/admin/budgets`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BudgetReport {
    pub name: String,
    pub scope: Scope,
    pub period: &'static str,
    pub period_start: String,
    pub period_end: String,
    pub limit_usd: f64,
    pub alert_at: Vec<f64>,
    pub on_exceeded: &'static str,
    pub downgrade_to: Option<String>,
    /// The rule's `match`.
    pub tier: Option<String>,
    pub feature: Option<String>,
    /// Biggest spenders first.
    pub counters: Vec<CounterReport>,
    /// More counters than shown.
    pub truncated: bool,
}

/// One counter in `/admin/budgets`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CounterReport {
    /// The key, owner, end user or feature; `None` for a global budget.
    pub scope_value: Option<String>,
    /// The end user's key owner, for a budget per end user.
    pub owner: Option<String>,
    pub spent_usd: f64,
    /// Exact.
    pub spent_nanos: i64,
    pub limit_usd: f64,
    pub percent: f64,
    pub exhausted: bool,
    /// When spend reaches the limit at the rate so far (RFC 3339); `None` when it lasts
    /// the period (or already ran out).
    pub forecast_exhaustion: Option<String>,
}

fn percent(spent: i64, limit: i64) -> f64 {
    if limit <= 0 {
        return 0.0;
    }
    // Basis points exactly, then a float for display.
    let bp = i128::from(spent) * 10_000 / i128::from(limit);
    bp as f64 / 100.0
}

/// The value a rule counts a request under; `None` when the request lacks it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum ScopeValue {
    Global,
    Key(String),
    Owner(String),
    Feature(String),
    User { owner: String, user: String },
}

impl ScopeValue {
    /// `(owner, value)` as alerts and the report show them: the owner only for an end
    /// user (counted within it), no value for a global budget.
    fn parts(self) -> (Option<String>, Option<String>) {
        match self {
            ScopeValue::Global => (None, None),
            ScopeValue::Key(v) | ScopeValue::Owner(v) | ScopeValue::Feature(v) => (None, Some(v)),
            ScopeValue::User { owner, user } => (Some(owner), Some(user)),
        }
    }
}

fn scope_value(scope: Scope, s: &Subject<'_>) -> Option<ScopeValue> {
    let some = |v: Option<&str>| v.filter(|v| !v.is_empty()).map(str::to_string);
    Some(match scope {
        Scope::Global => ScopeValue::Global,
        Scope::Key => ScopeValue::Key(some(s.key_id)?),
        Scope::Owner => ScopeValue::Owner(some(s.owner)?),
        Scope::Feature => ScopeValue::Feature(some(s.feature)?),
        // Keyless and master-key requests have no owner: their users are counted under "".
        Scope::User => ScopeValue::User {
            owner: s.owner.unwrap_or("").to_string(),
            user: some(s.user)?,
        },
    })
}

/// `{rule}:{period label}:{scope}:` — every counter of one rule and period.
fn counter_prefix(rule: &BudgetRule, period: &Span) -> String {
    // Joined, not formatted: built for every rule a request counts against, twice.
    [
        &rule.name,
        ":",
        &period.label,
        ":",
        rule.scope.as_str(),
        ":",
    ]
    .concat()
}

/// A record's exact cost in nano-dollars: `cost_nanos`, else `cost_micros`.
fn record_cost_nanos(record: &RequestRecord) -> Option<i64> {
    record.cost_nanos.or_else(|| {
        record
            .cost_micros
            .map(|m| m.saturating_mul(NANOS_PER_MICRO))
    })
}

/// `{owner length}:{owner}:{user}` onto `out`: unambiguous whatever the two hold.
fn push_user(out: &mut String, owner: &str, user: &str) {
    use std::fmt::Write as _;
    // Writing to a String cannot fail.
    let _ = write!(out, "{}:{owner}:{user}", owner.len());
}

fn decode(scope: Scope, v: &str) -> Option<ScopeValue> {
    Some(match scope {
        Scope::Global => ScopeValue::Global,
        Scope::Key => ScopeValue::Key(v.to_string()),
        Scope::Owner => ScopeValue::Owner(v.to_string()),
        Scope::Feature => ScopeValue::Feature(v.to_string()),
        Scope::User => {
            let (len, rest) = v.split_once(':')?;
            let len: usize = len.parse().ok()?;
            let owner = rest.get(..len)?;
            let user = rest.get(len..)?.strip_prefix(':')?;
            ScopeValue::User {
                owner: owner.to_string(),
                user: user.to_string(),
            }
        }
    })
}

fn base_filter(when: &BudgetMatch, period: &Span) -> SpendFilter {
    SpendFilter {
        since_ms: period.start_ms,
        until_ms: period.end_ms,
        tier: when.tier.clone(),
        feature: when.feature.clone(),
        ..SpendFilter::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_counters_round_trip_whatever_they_hold() {
        for (owner, user) in [("acme", "alice"), ("", "bob"), ("a:b", ":c:"), ("ü", "x")] {
            let mut v = String::new();
            push_user(&mut v, owner, user);
            assert_eq!(
                decode(Scope::User, &v),
                Some(ScopeValue::User {
                    owner: owner.into(),
                    user: user.into()
                })
            );
        }
        assert_eq!(decode(Scope::User, "9:short"), None);
        assert_eq!(decode(Scope::User, "x:y"), None);
    }

    #[test]
    fn percentages_are_exact_to_the_basis_point() {
        assert_eq!(percent(1, 3), 33.33);
        assert_eq!(percent(300, 300), 100.0);
        assert_eq!(percent(450, 300), 150.0);
        assert_eq!(percent(5, 0), 0.0);
    }
}
