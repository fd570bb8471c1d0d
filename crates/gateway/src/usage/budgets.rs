//! `[budgets]` configuration: raw TOML shapes and their validated forms.
//!
//! ```toml
//! [budgets]
//! webhook = "https://hooks.example.com/sluice"  # optional: each alert is POSTed here
//! timezone = "UTC"                              # or a fixed offset, "+02:00"
//!
//! [[budgets.rules]]
//! name = "monthly-total"          # letters, digits, `-`, `_`, `.`
//! scope = "global"                # global | key | owner | user | feature
//! period = "month"                # day | month
//! limit_usd = 500.0
//! alert_at = [0.8]                # shares of the limit; default [0.8]
//! on_exceeded = "block"           # block (429 budget_exceeded) | downgrade
//! downgrade_to = "gpt-4o-mini"    # the model downgraded requests get
//! match = { tier = "free", feature = "chat" }  # optional: which requests count
//! ```
//!
//! A rule with a scope other than `global` keeps one counter per key, owner, end user
//! (end users are scoped by their key's owner, as rate limits are) or feature; a request
//! without that attribute (no end user, say) is not counted by that rule. `match` narrows
//! a rule to one tier and/or feature, for counting and for enforcing alike. Rules are
//! independent: each has its own counters, also where two rules count the same requests.
//!
//! `downgrade` applies to chat completions; an embeddings request over such a budget is
//! refused as `block` would, since the budget has no cheaper embeddings model to offer.

use secrecy::SecretString;
use serde::Deserialize;

use super::calendar::{Period, parse_offset};
use super::prices::{Cost, NANOS_PER_MICRO, UsdAmount};
use crate::config::{ModelConfig, ModelKind};

/// What a rule counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    Global,
    Key,
    Owner,
    User,
    Feature,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Global => "global",
            Scope::Key => "key",
            Scope::Owner => "owner",
            Scope::User => "user",
            Scope::Feature => "feature",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawOnExceeded {
    Block,
    Downgrade,
}

/// What happens to requests once a counter reached its limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnExceeded {
    /// 429 `budget_exceeded` until the period ends.
    Block,
    /// Chat completions are answered by this (configured, cheaper) model instead.
    Downgrade { to: String },
}

/// Which requests a rule counts; absent fields match anything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetMatch {
    pub tier: Option<String>,
    pub feature: Option<String>,
}

impl BudgetMatch {
    pub fn matches(&self, tier: Option<&str>, feature: Option<&str>) -> bool {
        self.tier.as_deref().is_none_or(|t| Some(t) == tier)
            && self.feature.as_deref().is_none_or(|f| Some(f) == feature)
    }
}

/// A share of the limit, in basis points (8000 = 80 %).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Threshold(pub u32);

impl Threshold {
    /// The spend at which it is reached: the least `s` with `s / limit >= share`,
    /// exactly (`ceil(limit * bp / 10000)`).
    pub fn of(self, limit: Cost) -> i64 {
        let limit = u128::try_from(limit.nanos).unwrap_or(0);
        let t = (limit * u128::from(self.0)).div_ceil(10_000);
        i64::try_from(t).unwrap_or(i64::MAX)
    }

    pub fn as_f64(self) -> f64 {
        f64::from(self.0) / 10_000.0
    }

    /// `0.8`, `1`, `0.95`: the share as written, for labels and alerts.
    pub fn label(self) -> String {
        let whole = self.0 / 10_000;
        let frac = self.0 % 10_000;
        if frac == 0 {
            whole.to_string()
        } else {
            let digits = format!("{frac:04}");
            format!("{whole}.{}", digits.trim_end_matches('0'))
        }
    }
}

/// One validated rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetRule {
    pub name: String,
    pub scope: Scope,
    pub period: Period,
    pub limit: Cost,
    /// Ascending, distinct.
    pub alert_at: Vec<Threshold>,
    pub on_exceeded: OnExceeded,
    pub when: BudgetMatch,
}

/// The validated `[budgets]` section; no rules means budgets are off.
#[derive(Debug, Clone, Default)]
pub struct BudgetsConfig {
    /// Where alerts are POSTed, and what signs them.
    pub webhook: Option<super::alerts::Webhook>,
    /// Seconds east of UTC where days and months start (0 = UTC).
    pub utc_offset_s: i32,
    pub rules: Vec<BudgetRule>,
}

impl BudgetsConfig {
    pub fn is_enabled(&self) -> bool {
        !self.rules.is_empty()
    }
}

/// Thresholds kept per rule, at most; the Redis script returns them as a bit mask.
pub const MAX_THRESHOLDS: usize = 16;
const DEFAULT_ALERT_AT: Threshold = Threshold(8000);

// ---- raw, as written in TOML ----

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawBudgets {
    webhook: Option<String>,
    webhook_secret: Option<String>,
    timezone: Option<String>,
    #[serde(default)]
    rules: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    scope: Scope,
    period: Period,
    limit_usd: UsdAmount,
    alert_at: Option<Vec<RawShare>>,
    on_exceeded: Option<RawOnExceeded>,
    downgrade_to: Option<String>,
    #[serde(rename = "match", default)]
    when: BudgetMatch,
}

/// A share such as `0.8`, read from its decimal form like a USD amount: at most four
/// decimals (basis points).
#[derive(Debug, Clone, Copy)]
struct RawShare(Result<u32, ()>);

impl<'de> Deserialize<'de> for RawShare {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        if !v.is_finite() {
            return Ok(RawShare(Err(())));
        }
        // Micro-units from the shortest decimal form, then basis points if exact.
        let micros = super::prices::usd_to_micros(&v.to_string());
        Ok(RawShare(match micros {
            Ok(m) if m % 100 == 0 => u32::try_from(m / 100).map_err(|_| ()),
            _ => Err(()),
        }))
    }
}

/// Validate `[budgets]`. `tiers` are the configured tier names (to check `match.tier`);
/// the `downgrade_to` models are checked by [`check_models`] once models are built.
pub fn build(
    raw: RawBudgets,
    tiers: &[String],
    problems: &mut dyn FnMut(String, String),
) -> BudgetsConfig {
    let mut out = BudgetsConfig::default();
    let secret = match raw.webhook_secret {
        Some(s) if s.trim().is_empty() => {
            problems(
                "budgets.webhook_secret".into(),
                "must not be empty (leave it out to send unsigned alerts)".into(),
            );
            None
        }
        Some(_) if raw.webhook.is_none() => {
            problems(
                "budgets.webhook_secret".into(),
                "signs webhook alerts: set `webhook` too".into(),
            );
            None
        }
        other => other.map(SecretString::from),
    };
    if let Some(url) = raw.webhook {
        match url::Url::parse(&url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {
                out.webhook = Some(super::alerts::Webhook {
                    url: SecretString::from(url),
                    secret,
                });
            }
            // The URL is not echoed: it may carry a token.
            Ok(_) => problems(
                "budgets.webhook".into(),
                "must be an http:// or https:// URL".into(),
            ),
            Err(e) => problems("budgets.webhook".into(), format!("is not a URL: {e}")),
        }
    }
    if let Some(tz) = raw.timezone {
        match parse_offset(&tz) {
            Ok(offset) => out.utc_offset_s = offset,
            Err(e) => problems("budgets.timezone".into(), e),
        }
    }
    for (i, r) in raw.rules.into_iter().enumerate() {
        let path = format!("budgets.rules[{i}]");
        if r.name.is_empty()
            || !r
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            problems(
                format!("{path}.name"),
                "must be letters, digits, `-`, `_` or `.` (it names counters and metrics)".into(),
            );
        } else if out.rules.iter().any(|x| x.name == r.name) {
            problems(
                format!("{path}.name"),
                format!("budget `{}` is defined twice", r.name),
            );
        }
        if r.limit_usd.0 == 0 {
            problems(format!("{path}.limit_usd"), "must be more than 0".into());
        }
        let mut alert_at = Vec::new();
        match r.alert_at {
            None => alert_at.push(DEFAULT_ALERT_AT),
            Some(shares) => {
                for (j, s) in shares.into_iter().enumerate() {
                    match s.0 {
                        Ok(bp) if (1..=10_000).contains(&bp) => alert_at.push(Threshold(bp)),
                        _ => problems(
                            format!("{path}.alert_at[{j}]"),
                            "must be a share of the limit above 0 and at most 1, with at most four decimals (0.8 = 80 %)".into(),
                        ),
                    }
                }
                if alert_at.len() > MAX_THRESHOLDS {
                    problems(
                        format!("{path}.alert_at"),
                        format!("at most {MAX_THRESHOLDS} thresholds"),
                    );
                    alert_at.truncate(MAX_THRESHOLDS);
                }
            }
        }
        alert_at.sort_unstable();
        alert_at.dedup();
        let on_exceeded = match (
            r.on_exceeded.unwrap_or(RawOnExceeded::Block),
            r.downgrade_to,
        ) {
            (RawOnExceeded::Block, None) => OnExceeded::Block,
            (RawOnExceeded::Block, Some(_)) => {
                problems(
                    format!("{path}.downgrade_to"),
                    "only applies with `on_exceeded = \"downgrade\"`".into(),
                );
                OnExceeded::Block
            }
            (RawOnExceeded::Downgrade, None) => {
                problems(
                    format!("{path}.downgrade_to"),
                    "`on_exceeded = \"downgrade\"` needs the model to downgrade to".into(),
                );
                OnExceeded::Block
            }
            (RawOnExceeded::Downgrade, Some(to)) => OnExceeded::Downgrade { to },
        };
        if let Some(t) = &r.when.tier
            && !tiers.is_empty()
            && !tiers.contains(t)
        {
            let known: Vec<String> = tiers.iter().map(|t| format!("`{t}`")).collect();
            problems(
                format!("{path}.match.tier"),
                format!("no tier `{t}` (tiers: {})", known.join(", ")),
            );
        }
        let micros = i64::try_from(r.limit_usd.0).unwrap_or(i64::MAX);
        if micros > i64::MAX / NANOS_PER_MICRO {
            problems(format!("{path}.limit_usd"), "is too large".into());
        }
        out.rules.push(BudgetRule {
            name: r.name,
            scope: r.scope,
            period: r.period,
            limit: Cost::from_micros(micros),
            alert_at,
            on_exceeded,
            when: r.when,
        });
    }
    out
}

/// Each `downgrade_to` must name a configured chat model (not a pattern).
pub fn check_models(
    budgets: &BudgetsConfig,
    models: &[ModelConfig],
    problems: &mut dyn FnMut(String, String),
) {
    for (i, rule) in budgets.rules.iter().enumerate() {
        let OnExceeded::Downgrade { to } = &rule.on_exceeded else {
            continue;
        };
        let path = format!("budgets.rules[{i}].downgrade_to");
        match models.iter().find(|m| !m.is_pattern() && &m.name == to) {
            None => problems(path, format!("no model named `{to}`")),
            Some(m) if m.kind != ModelKind::Chat => {
                problems(path, format!("`{to}` is not a chat model"))
            }
            Some(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RawBudgets, String> {
        let value: toml::Value = toml::from_str(text).map_err(|e| e.to_string())?;
        serde_path_to_error::deserialize(value).map_err(|e| format!("{}: {}", e.path(), e.inner()))
    }

    fn built(text: &str, tiers: &[&str]) -> (BudgetsConfig, Vec<(String, String)>) {
        let raw = parse(text).unwrap_or_else(|e| panic!("{e}"));
        let tiers: Vec<String> = tiers.iter().map(|t| t.to_string()).collect();
        let mut problems = Vec::new();
        let c = build(raw, &tiers, &mut |p, m| problems.push((p, m)));
        (c, problems)
    }

    #[test]
    fn a_full_section_is_read_exactly() {
        let (c, problems) = built(
            r#"
            webhook = "https://hooks.example.com/sluice?token=abc"
            timezone = "+01:00"
            [[rules]]
            name = "monthly-total"
            scope = "global"
            period = "month"
            limit_usd = 500.0
            [[rules]]
            name = "free.daily_user"
            scope = "user"
            period = "day"
            limit_usd = 0.3
            alert_at = [1.0, 0.5, 0.95, 0.5]
            on_exceeded = "downgrade"
            downgrade_to = "gpt-4o-mini"
            match = { tier = "free", feature = "chat" }
            "#,
            &["free", "pro"],
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert!(c.webhook.is_some());
        assert_eq!(c.utc_offset_s, 3600);
        let total = &c.rules[0];
        assert_eq!(total.limit, Cost::from_nanos(500_000_000_000));
        assert_eq!(total.alert_at, [Threshold(8000)]);
        assert_eq!(total.on_exceeded, OnExceeded::Block);
        let daily = &c.rules[1];
        assert_eq!(daily.scope, Scope::User);
        assert_eq!(daily.limit, Cost::from_nanos(300_000_000));
        assert_eq!(
            daily.alert_at,
            [Threshold(5000), Threshold(9500), Threshold(10_000)]
        );
        assert_eq!(
            daily.on_exceeded,
            OnExceeded::Downgrade {
                to: "gpt-4o-mini".into()
            }
        );
        assert!(daily.when.matches(Some("free"), Some("chat")));
        assert!(!daily.when.matches(Some("pro"), Some("chat")));
        assert!(!daily.when.matches(Some("free"), None));
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let (_, problems) = built(
            r#"
            webhook = "ftp://example.com"
            timezone = "Europe/Paris"
            [[rules]]
            name = "has space"
            scope = "key"
            period = "day"
            limit_usd = 0
            alert_at = [0.0, 1.5, 0.12345]
            on_exceeded = "downgrade"
            match = { tier = "gold" }
            [[rules]]
            name = "has space"
            scope = "global"
            period = "month"
            limit_usd = 1
            downgrade_to = "gpt-4o-mini"
            "#,
            &["free"],
        );
        let paths: Vec<&str> = problems.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "budgets.webhook",
                "budgets.timezone",
                "budgets.rules[0].name",
                "budgets.rules[0].limit_usd",
                "budgets.rules[0].alert_at[0]",
                "budgets.rules[0].alert_at[1]",
                "budgets.rules[0].alert_at[2]",
                "budgets.rules[0].downgrade_to",
                "budgets.rules[0].match.tier",
                "budgets.rules[1].name",
                "budgets.rules[1].downgrade_to",
            ]
        );
    }

    #[test]
    fn a_webhook_secret_signs_and_needs_a_webhook_and_a_value() {
        let (c, problems) = built(
            "webhook = \"https://hooks.example.com/sluice\"\nwebhook_secret = \"whsec\"",
            &[],
        );
        assert!(problems.is_empty(), "{problems:?}");
        let secret = c.webhook.and_then(|w| w.secret).expect("a secret");
        assert_eq!(secrecy::ExposeSecret::expose_secret(&secret), "whsec");
        for (text, says) in [
            ("webhook_secret = \"whsec\"", "set `webhook` too"),
            (
                "webhook = \"https://hooks.example.com/sluice\"\nwebhook_secret = \" \"",
                "must not be empty",
            ),
        ] {
            let (_, problems) = built(text, &[]);
            assert_eq!(problems.len(), 1, "{text}: {problems:?}");
            assert_eq!(problems[0].0, "budgets.webhook_secret");
            assert!(problems[0].1.contains(says), "{problems:?}");
        }
    }

    #[test]
    fn shape_errors_carry_their_path() {
        let e = parse(
            r#"
            [[rules]]
            name = "a"
            scope = "planet"
            period = "day"
            limit_usd = 1
            "#,
        )
        .err()
        .unwrap();
        assert!(e.starts_with("rules[0].scope"), "{e}");
        let e =
            parse("[[rules]]\nname = \"a\"\nscope = \"global\"\nperiod = \"week\"\nlimit_usd = 1")
                .err()
                .unwrap();
        assert!(e.starts_with("rules[0].period"), "{e}");
        let e = parse(
            "[[rules]]\nname = \"a\"\nscope = \"global\"\nperiod = \"day\"\nlimit_usd = 0.0000001",
        )
        .err()
        .unwrap();
        assert!(
            e.starts_with("rules[0].limit_usd") && e.contains("six decimals"),
            "{e}"
        );
        let e = parse("colour = 1").err().unwrap();
        assert!(e.contains("colour"), "{e}");
    }

    #[test]
    fn thresholds_are_exact_shares_of_the_limit() {
        let limit = Cost::from_nanos(300_000_000);
        assert_eq!(Threshold(8000).of(limit), 240_000_000);
        assert_eq!(Threshold(10_000).of(limit), 300_000_000);
        // Rounded up: 1/3 of 10 nano-dollars is reached at 4, not 3.
        assert_eq!(Threshold(3334).of(Cost::from_nanos(10)), 4);
        assert_eq!(Threshold(8000).label(), "0.8");
        assert_eq!(Threshold(10_000).label(), "1");
        assert_eq!(Threshold(9550).label(), "0.955");
        assert_eq!(Threshold(5).label(), "0.0005");
    }
}
