//! `[routing]`: cheap first, strong when needed. Requests that ask for the routing
//! alias (`model = "auto"` unless configured otherwise) get a model chosen here: the
//! first matching rule's, else the first matching per-feature/tier default, else
//! `default`. A rule with `output_check_failed = true` names the model an answer that
//! failed its output check (`on_fail = "escalate"`) is re-asked of: it goes right after
//! the chosen model in the chain.

use std::cell::OnceCell;
use std::fmt::Write as _;
use std::sync::Arc;

use serde::Deserialize;

use super::{Chain, Router};
use crate::config::{Config, ModelConfig, ModelKind};
use crate::error::ApiError;

pub const DEFAULT_ALIAS: &str = "auto";
/// The request header asking for the strong path.
pub const HEADER_QUALITY: &str = "x-sluice-quality";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quality {
    High,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDefault {
    pub feature: Option<String>,
    pub tier: Option<String>,
    pub model: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub name: Option<String>,
    /// The request's input (estimated tokens) is above this.
    pub input_tokens_over: Option<u64>,
    /// The request's feature is one of these.
    #[serde(default)]
    pub features: Vec<String>,
    /// The request's tier is one of these.
    #[serde(default)]
    pub tiers: Vec<String>,
    /// The request asks `x-sluice-quality: high`.
    pub quality: Option<Quality>,
    /// The chosen model's answer failed its output check (`on_fail = "escalate"`).
    #[serde(default)]
    pub output_check_failed: bool,
    pub model: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouting {
    pub alias: Option<String>,
    pub default: Option<String>,
    #[serde(default)]
    pub defaults: Vec<RawDefault>,
    #[serde(default)]
    pub rules: Vec<RawRule>,
}

/// A per-feature or per-tier default.
#[derive(Debug, Clone, PartialEq)]
pub struct DefaultModel {
    pub feature: Option<String>,
    pub tier: Option<String>,
    pub model: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub name: String,
    pub input_tokens_over: Option<u64>,
    pub features: Vec<String>,
    pub tiers: Vec<String>,
    pub quality: Option<Quality>,
    pub output_check_failed: bool,
    pub model: String,
}

/// The validated `[routing]` section; off (no alias is routed) without `default`.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingConfig {
    pub alias: String,
    pub default: Option<String>,
    pub defaults: Vec<DefaultModel>,
    pub rules: Vec<Rule>,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            alias: DEFAULT_ALIAS.into(),
            default: None,
            defaults: Vec::new(),
            rules: Vec::new(),
        }
    }
}

/// What a rule looks at.
pub struct Facts<'a> {
    pub feature: Option<&'a str>,
    pub tier: Option<&'a str>,
    pub quality: Option<Quality>,
    /// The input estimate, computed only when a rule asks.
    pub input_tokens: &'a dyn Fn() -> u64,
}

/// The routing decision for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub model: String,
    /// `rule:NAME`, `default:feature=X`, `default:tier=X` or `default`.
    pub by: String,
    /// Where a failed output check escalates to.
    pub escalate_to: Option<String>,
}

impl Rule {
    fn matches(&self, facts: &Facts<'_>, tokens: &OnceCell<u64>) -> bool {
        (self.features.is_empty()
            || facts
                .feature
                .is_some_and(|f| self.features.iter().any(|x| x == f)))
            && (self.tiers.is_empty()
                || facts
                    .tier
                    .is_some_and(|t| self.tiers.iter().any(|x| x == t)))
            && self.quality.is_none_or(|q| facts.quality == Some(q))
            && self
                .input_tokens_over
                .is_none_or(|n| *tokens.get_or_init(|| (facts.input_tokens)()) > n)
    }

    fn describe(&self) -> String {
        let mut when = Vec::new();
        if let Some(n) = self.input_tokens_over {
            when.push(format!("input tokens > {n}"));
        }
        if !self.features.is_empty() {
            when.push(format!("feature in [{}]", self.features.join(", ")));
        }
        if !self.tiers.is_empty() {
            when.push(format!("tier in [{}]", self.tiers.join(", ")));
        }
        if self.quality.is_some() {
            when.push(format!("{HEADER_QUALITY}: high"));
        }
        if self.output_check_failed {
            when.push("output check failed (on_fail = \"escalate\")".into());
        }
        when.join(" and ")
    }
}

/// Parse `x-sluice-quality` (or `sluice.quality`): `high`, or `standard` for none.
pub fn parse_quality(value: Option<&str>) -> Result<Option<Quality>, ApiError> {
    match value.map(str::trim) {
        None | Some("") | Some("standard") => Ok(None),
        Some("high") => Ok(Some(Quality::High)),
        Some(other) => Err(ApiError::invalid(
            format!("`{HEADER_QUALITY}` must be `high` or `standard`, not `{other}`"),
            Some(HEADER_QUALITY.to_string()),
        )),
    }
}

impl RoutingConfig {
    /// Whether requests for `model` are routed here.
    pub fn handles(&self, model: &str) -> bool {
        self.default.is_some() && model == self.alias
    }

    /// Choose the model: the first matching rule whose model the caller may use, else
    /// the first matching default, else `default`. 403 when the caller may use none.
    pub fn decide(
        &self,
        facts: &Facts<'_>,
        allowed: &dyn Fn(&str) -> bool,
    ) -> Result<Decision, ApiError> {
        let tokens = OnceCell::new();
        let chosen = self
            .rules
            .iter()
            .filter(|r| !r.output_check_failed && allowed(&r.model))
            .find(|r| r.matches(facts, &tokens))
            .map(|r| (r.model.clone(), format!("rule:{}", r.name)))
            .or_else(|| {
                self.defaults
                    .iter()
                    .filter(|d| allowed(&d.model))
                    .find(|d| {
                        d.feature
                            .as_deref()
                            .is_none_or(|f| facts.feature == Some(f))
                            && d.tier.as_deref().is_none_or(|t| facts.tier == Some(t))
                    })
                    .map(|d| {
                        let by = match (&d.feature, &d.tier) {
                            (Some(f), _) => format!("default:feature={f}"),
                            (None, Some(t)) => format!("default:tier={t}"),
                            (None, None) => "default".into(),
                        };
                        (d.model.clone(), by)
                    })
            });
        let (model, by) = match chosen {
            Some(c) => c,
            None => {
                let model = self.default.clone().unwrap_or_default();
                if !allowed(&model) {
                    return Err(ApiError::ModelNotAllowed {
                        model: self.alias.clone(),
                        who: "this API key or its tier (no routed model is allowed)".into(),
                    });
                }
                (model, "default".into())
            }
        };
        let escalate_to = self
            .rules
            .iter()
            .filter(|r| r.output_check_failed && r.model != model && allowed(&r.model))
            .find(|r| r.matches(facts, &tokens))
            .map(|r| r.model.clone());
        Ok(Decision {
            model,
            by,
            escalate_to,
        })
    }
}

/// The chain of a routed request with an escalation target: the chosen model, then
/// `to` and `to`'s own fallbacks (the chosen model's fallbacks give way to them), so a
/// failed output check (`on_fail = "escalate"`) or a failed call is re-asked of `to`
/// once, and after that as if the request had asked for `to`.
pub fn escalating(router: &Router, chain: Chain, to: &str) -> Result<Chain, ApiError> {
    let strong = router.chain(to, ModelKind::Chat)?;
    let Some(first) = chain.routes.into_iter().next() else {
        return Ok(strong);
    };
    let mut routes: Vec<Arc<super::Route>> = Vec::with_capacity(1 + strong.routes.len());
    routes.push(first.clone());
    routes.extend(strong.routes.into_iter().filter(|r| r.model != first.model));
    Ok(Chain {
        routes,
        template: chain.template,
        prompt_fallback: chain.prompt_fallback,
    })
}

/// Validate `[routing]` against the models and tiers; problems are pushed with their path.
pub fn build(
    raw: RawRouting,
    model: &dyn Fn(&str) -> Option<ModelConfig>,
    tiers: &[String],
    problems: &mut dyn FnMut(String, String),
) -> RoutingConfig {
    let mut check_model = |path: String, name: &str| match model(name) {
        None => problems(path, format!("no model named `{name}`")),
        Some(m) if m.kind != ModelKind::Chat => {
            problems(path, format!("`{name}` is not a chat model"))
        }
        Some(_) => {}
    };
    let alias = raw.alias.unwrap_or_else(|| DEFAULT_ALIAS.into());
    if let Some(d) = &raw.default {
        check_model("routing.default".into(), d);
    }
    for (i, d) in raw.defaults.iter().enumerate() {
        check_model(format!("routing.defaults[{i}].model"), &d.model);
    }
    for (i, r) in raw.rules.iter().enumerate() {
        check_model(format!("routing.rules[{i}].model"), &r.model);
    }
    if raw.default.is_none() && !(raw.defaults.is_empty() && raw.rules.is_empty()) {
        problems(
            "routing.default".into(),
            "required: the model routed requests get when no rule or default matches (cheap first)"
                .into(),
        );
    }
    if alias.trim().is_empty() {
        problems("routing.alias".into(), "must not be empty".into());
    } else if model(&alias).is_some_and(|m| m.name == alias) {
        problems(
            "routing.alias".into(),
            format!("`{alias}` is a configured model; the alias must be a name of its own"),
        );
    }
    let known_tier = |t: &str| tiers.is_empty() || tiers.iter().any(|x| x == t);
    for (i, d) in raw.defaults.iter().enumerate() {
        if d.feature.is_none() && d.tier.is_none() {
            problems(
                format!("routing.defaults[{i}]"),
                "needs a `feature` or a `tier` (use `routing.default` for everything else)".into(),
            );
        }
        if let Some(t) = d.tier.as_deref().filter(|t| !known_tier(t)) {
            problems(
                format!("routing.defaults[{i}].tier"),
                format!("no tier `{t}`"),
            );
        }
    }
    for (i, r) in raw.rules.iter().enumerate() {
        if r.input_tokens_over.is_none()
            && r.features.is_empty()
            && r.tiers.is_empty()
            && r.quality.is_none()
            && !r.output_check_failed
        {
            problems(
                format!("routing.rules[{i}]"),
                "needs a condition: input_tokens_over, features, tiers, quality or output_check_failed"
                    .into(),
            );
        }
        for t in r.tiers.iter().filter(|t| !known_tier(t)) {
            problems(
                format!("routing.rules[{i}].tiers"),
                format!("no tier `{t}`"),
            );
        }
    }
    RoutingConfig {
        alias,
        default: raw.default,
        defaults: raw
            .defaults
            .into_iter()
            .map(|d| DefaultModel {
                feature: d.feature,
                tier: d.tier,
                model: d.model,
            })
            .collect(),
        rules: raw
            .rules
            .into_iter()
            .enumerate()
            .map(|(i, r)| Rule {
                name: r.name.unwrap_or_else(|| format!("rules[{i}]")),
                input_tokens_over: r.input_tokens_over,
                features: r.features,
                tiers: r.tiers,
                quality: r.quality,
                output_check_failed: r.output_check_failed,
                model: r.model,
            })
            .collect(),
    }
}

/// The resolved routing table as text, for `sluice check`.
pub fn routing_table(config: &Config) -> String {
    let routing = &config.routing;
    let mut out = String::new();
    let Some(default) = &routing.default else {
        out.push_str(
            "routing: off (no [routing] default): every request uses the model it names\n",
        );
        return out;
    };
    let chain = |model: &str| {
        let fallbacks = config
            .model(model)
            .map(|m| m.fallbacks.clone())
            .unwrap_or_default();
        if fallbacks.is_empty() {
            model.to_string()
        } else {
            format!("{model} (fallbacks: {})", fallbacks.join(", "))
        }
    };
    let _ = writeln!(out, "routing: requests for model `{}`", routing.alias);
    let _ = writeln!(out, "rules, first match wins:");
    let mut n = 0;
    for r in routing.rules.iter().filter(|r| !r.output_check_failed) {
        n += 1;
        let _ = writeln!(
            out,
            "  {n}. {}: {} -> {}",
            r.name,
            r.describe(),
            chain(&r.model)
        );
    }
    if n == 0 {
        out.push_str("  (none)\n");
    }
    let _ = writeln!(out, "defaults, first match wins:");
    for d in &routing.defaults {
        let mut when = Vec::new();
        if let Some(f) = &d.feature {
            when.push(format!("feature = {f}"));
        }
        if let Some(t) = &d.tier {
            when.push(format!("tier = {t}"));
        }
        let _ = writeln!(out, "  {} -> {}", when.join(" and "), chain(&d.model));
    }
    let _ = writeln!(out, "  otherwise -> {}", chain(default));
    let escalations: Vec<&Rule> = routing
        .rules
        .iter()
        .filter(|r| r.output_check_failed)
        .collect();
    if !escalations.is_empty() {
        let _ = writeln!(
            out,
            "escalation on a failed output check, first match wins:"
        );
        for r in escalations {
            let _ = writeln!(out, "  {}: {} -> {}", r.name, r.describe(), r.model);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routing() -> RoutingConfig {
        let raw: RawRouting = toml::from_str(
            r#"
            default = "cheap"
            defaults = [{ feature = "search", model = "mid" }, { tier = "pro", model = "strong" }]
            [[rules]]
            name = "long"
            input_tokens_over = 100
            model = "strong"
            [[rules]]
            name = "legal"
            features = ["legal", "medical"]
            model = "strong"
            [[rules]]
            name = "asked"
            quality = "high"
            model = "strong"
            [[rules]]
            name = "escalate"
            output_check_failed = true
            model = "strong"
            "#,
        )
        .unwrap();
        let mut problems = Vec::new();
        let any = |name: &str| {
            Some(ModelConfig {
                name: name.into(),
                provider: "sim".into(),
                upstream: None,
                kind: ModelKind::Chat,
                fallbacks: vec![],
                timeouts: crate::providers::Timeouts {
                    first_byte: std::time::Duration::from_secs(1),
                    total: std::time::Duration::from_secs(1),
                },
                connect_timeout: None,
                template_fallback: None,
                requests_per_minute: None,
                tokens_per_minute: None,
                prices: None,
            })
        };
        let r = build(
            raw,
            &|n| (n != "auto").then(|| any(n)).flatten(),
            &[],
            &mut |p, m| problems.push(format!("{p}: {m}")),
        );
        assert!(problems.is_empty(), "{problems:?}");
        r
    }

    fn facts<'a>(
        feature: Option<&'a str>,
        tier: Option<&'a str>,
        quality: Option<Quality>,
        tokens: &'a dyn Fn() -> u64,
    ) -> Facts<'a> {
        Facts {
            feature,
            tier,
            quality,
            input_tokens: tokens,
        }
    }

    #[test]
    fn first_matching_rule_then_defaults_then_the_default() {
        let r = routing();
        let yes = |_: &str| true;
        let small = || 10;
        let big = || 101;
        let d = |f| r.decide(&f, &yes).unwrap();
        assert_eq!(d(facts(None, None, None, &small)).model, "cheap");
        assert_eq!(d(facts(None, None, None, &small)).by, "default");
        assert_eq!(
            d(facts(None, None, None, &small)).escalate_to.as_deref(),
            Some("strong")
        );
        let long = d(facts(None, None, None, &big));
        assert_eq!(
            (long.model.as_str(), long.by.as_str()),
            ("strong", "rule:long")
        );
        assert_eq!(long.escalate_to, None, "already on the strong model");
        assert_eq!(d(facts(Some("legal"), None, None, &small)).by, "rule:legal");
        assert_eq!(
            d(facts(None, None, Some(Quality::High), &small)).by,
            "rule:asked"
        );
        let search = d(facts(Some("search"), Some("pro"), None, &small));
        assert_eq!(
            (search.model.as_str(), search.by.as_str()),
            ("mid", "default:feature=search")
        );
        assert_eq!(
            d(facts(None, Some("pro"), None, &small)).by,
            "default:tier=pro"
        );
        // A rule whose model the caller may not use is skipped.
        let no_strong = |m: &str| m != "strong";
        let capped = r
            .decide(&facts(None, None, None, &big), &no_strong)
            .unwrap();
        assert_eq!((capped.model.as_str(), capped.escalate_to), ("cheap", None));
        assert!(matches!(
            r.decide(&facts(None, None, None, &small), &|_| false),
            Err(ApiError::ModelNotAllowed { .. })
        ));
    }

    #[test]
    fn the_token_estimate_is_only_computed_when_a_rule_needs_it() {
        let r = routing();
        let calls = std::cell::Cell::new(0);
        let count = || {
            calls.set(calls.get() + 1);
            5
        };
        // `long` is the first rule: asked once, then reused by the escalation rules.
        r.decide(&facts(None, None, None, &count), &|_| true)
            .unwrap();
        assert_eq!(calls.get(), 1);
    }

    #[test]
    fn quality_header_values() {
        assert_eq!(parse_quality(Some("high")).unwrap(), Some(Quality::High));
        assert_eq!(parse_quality(Some("standard")).unwrap(), None);
        assert_eq!(parse_quality(None).unwrap(), None);
        let e = parse_quality(Some("ultra")).unwrap_err();
        assert_eq!(e.status_code(), axum::http::StatusCode::BAD_REQUEST);
    }
}
