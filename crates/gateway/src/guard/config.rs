//! `[guard]` configuration: raw TOML shapes and their validated forms, with overrides
//! per model, feature and tier (first matching override wins, field by field).

use serde::Deserialize;

use super::detect::Detector;
use super::output::Validator;

/// What to do with a detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DetectMode {
    Off,
    /// Note it in the record, the metrics and the response header; let the request pass.
    #[default]
    Flag,
    /// Refuse the request (400 `input_blocked`).
    Block,
    /// PII only: replace it with placeholders before the upstream sees it.
    Redact,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BidiMode {
    Allow,
    Flag,
    #[default]
    Strip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TooLong {
    /// 400 `input_too_long`.
    #[default]
    Reject,
    /// Shorten the longest user message until the request fits.
    Truncate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KeepPart {
    #[default]
    Head,
    HeadAndTail,
}

/// The input guard's settings for one request, after overrides.
#[derive(Debug, Clone, PartialEq)]
pub struct InputPolicy {
    pub max_messages: usize,
    pub max_depth: usize,
    pub max_chars: usize,
    pub max_tokens: usize,
    pub on_too_long: TooLong,
    pub keep: KeepPart,
    pub truncation_marker: String,
    /// Requests asking for more output tokens are clamped to this.
    pub max_output_tokens: Option<u32>,
    /// Requests not saying are given this.
    pub default_max_tokens: Option<u32>,
    pub strip_control: bool,
    pub nfc: bool,
    pub bidi: BidiMode,
    pub collapse_whitespace: bool,
    pub injection: DetectMode,
    pub sql: DetectMode,
    pub code: DetectMode,
    pub pii: DetectMode,
}

impl Default for InputPolicy {
    fn default() -> Self {
        Self {
            max_messages: 1000,
            max_depth: 64,
            max_chars: 400_000,
            max_tokens: 128_000,
            on_too_long: TooLong::Reject,
            keep: KeepPart::Head,
            truncation_marker: "\n[... truncated ...]\n".into(),
            max_output_tokens: None,
            default_max_tokens: None,
            strip_control: true,
            nfc: true,
            bidi: BidiMode::Strip,
            collapse_whitespace: false,
            injection: DetectMode::Flag,
            sql: DetectMode::Flag,
            code: DetectMode::Off,
            pii: DetectMode::Flag,
        }
    }
}

/// Every input setting, all optional: the base section and each override use this.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInputPolicy {
    pub max_messages: Option<usize>,
    pub max_depth: Option<usize>,
    pub max_chars: Option<usize>,
    pub max_tokens: Option<usize>,
    pub on_too_long: Option<TooLong>,
    pub keep: Option<KeepPart>,
    pub truncation_marker: Option<String>,
    pub max_output_tokens: Option<u32>,
    pub default_max_tokens: Option<u32>,
    pub strip_control: Option<bool>,
    pub nfc: Option<bool>,
    pub bidi: Option<BidiMode>,
    pub collapse_whitespace: Option<bool>,
    pub injection: Option<DetectMode>,
    pub sql: Option<DetectMode>,
    pub code: Option<DetectMode>,
    pub pii: Option<DetectMode>,
}

impl RawInputPolicy {
    fn apply(&self, p: &mut InputPolicy) {
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { p.$f = v.clone(); } )* };
        }
        set!(
            max_messages,
            max_depth,
            max_chars,
            max_tokens,
            on_too_long,
            keep,
            truncation_marker,
            strip_control,
            nfc,
            bidi,
            collapse_whitespace,
            injection,
            sql,
            code,
            pii
        );
        if self.max_output_tokens.is_some() {
            p.max_output_tokens = self.max_output_tokens;
        }
        if self.default_max_tokens.is_some() {
            p.default_max_tokens = self.default_max_tokens;
        }
    }
}

/// Which requests an override or output rule applies to; absent fields match anything.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Match {
    pub model: Option<String>,
    pub feature: Option<String>,
    pub tier: Option<String>,
}

impl Match {
    pub fn matches(&self, model: &str, feature: Option<&str>, tier: Option<&str>) -> bool {
        self.model.as_deref().is_none_or(|m| m == model)
            && self.feature.as_deref().is_none_or(|f| Some(f) == feature)
            && self.tier.as_deref().is_none_or(|t| Some(t) == tier)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInputOverride {
    #[serde(rename = "match", default)]
    pub when: Match,
    #[serde(flatten)]
    pub policy: RawInputPolicy,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInput {
    #[serde(flatten)]
    pub policy: RawInputPolicy,
    #[serde(default)]
    pub injection_phrases: Vec<String>,
    #[serde(default)]
    pub injection_patterns: Vec<String>,
    #[serde(default)]
    pub overrides: Vec<RawInputOverride>,
}

/// What to do when an answer fails its checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnFail {
    /// Ask the same model again, up to `retries` times.
    Retry,
    /// Ask the next model in the chain.
    Escalate,
    /// Answer with the model's template fallback.
    Fallback,
    /// Return the answer, marked (`x-sluice-output: flagged`, outcome `bad_output`).
    #[default]
    Flag,
    /// 502 `output_invalid`.
    Reject,
}

impl OnFail {
    pub fn as_str(self) -> &'static str {
        match self {
            OnFail::Retry => "retry",
            OnFail::Escalate => "escalate",
            OnFail::Fallback => "fallback",
            OnFail::Flag => "flag",
            OnFail::Reject => "reject",
        }
    }

    /// Actions that need the whole answer before anything is sent: a stream with such
    /// a rule is fetched whole from the upstream and replayed as SSE (buffered mode).
    pub fn needs_whole_answer(self) -> bool {
        !matches!(self, OnFail::Flag)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutputRule {
    #[serde(rename = "match", default)]
    pub when: Match,
    pub validators: Vec<toml::Value>,
    #[serde(default)]
    pub on_fail: OnFail,
    /// For `retry`: extra attempts after the first answer.
    pub retries: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutput {
    #[serde(default)]
    pub rules: Vec<RawOutputRule>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGuard {
    #[serde(default)]
    pub input: RawInput,
    #[serde(default)]
    pub output: RawOutput,
}

/// One output rule, validated.
#[derive(Debug, Clone)]
pub struct OutputRule {
    pub when: Match,
    pub validators: Vec<Validator>,
    pub on_fail: OnFail,
    pub retries: u32,
}

/// The validated `[guard]` section.
#[derive(Debug, Clone)]
pub struct GuardConfig {
    pub input: InputPolicy,
    pub overrides: Vec<(Match, RawInputPolicy)>,
    pub detector: std::sync::Arc<Detector>,
    pub output: Vec<OutputRule>,
}

impl GuardConfig {
    /// The input policy for one request: the base, then the first override that matches.
    pub fn input_for(
        &self,
        model: &str,
        feature: Option<&str>,
        tier: Option<&str>,
    ) -> std::borrow::Cow<'_, InputPolicy> {
        match self
            .overrides
            .iter()
            .find(|(m, _)| m.matches(model, feature, tier))
        {
            None => std::borrow::Cow::Borrowed(&self.input),
            Some((_, raw)) => {
                let mut p = self.input.clone();
                raw.apply(&mut p);
                std::borrow::Cow::Owned(p)
            }
        }
    }

    /// The output rule for one request: the first that matches.
    pub fn output_for(
        &self,
        model: &str,
        feature: Option<&str>,
        tier: Option<&str>,
    ) -> Option<&OutputRule> {
        self.output
            .iter()
            .find(|r| r.when.matches(model, feature, tier))
    }
}

/// Validate the raw section; problems are pushed with their path.
pub fn build(raw: RawGuard, problems: &mut dyn FnMut(String, String)) -> GuardConfig {
    let mut input = InputPolicy::default();
    raw.input.policy.apply(&mut input);
    check_policy(&input, "guard.input", problems);
    for (i, o) in raw.input.overrides.iter().enumerate() {
        let mut p = input.clone();
        o.policy.apply(&mut p);
        check_policy(&p, &format!("guard.input.overrides[{i}]"), problems);
    }
    let detector = match Detector::new(&raw.input.injection_phrases, &raw.input.injection_patterns)
    {
        Ok(d) => d,
        Err(e) => {
            problems("guard.input.injection_patterns".into(), e);
            // The config is refused anyway; the built-ins stand in so building can go on
            // and report every other problem too. They always compile (a unit test runs them).
            Detector::new(&[], &[])
                .unwrap_or_else(|e| panic!("built-in detector patterns must compile: {e}"))
        }
    };
    let output = raw
        .output
        .rules
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let validators = r
                .validators
                .into_iter()
                .enumerate()
                .filter_map(|(j, v)| match Validator::from_toml(v) {
                    Ok(v) => Some(v),
                    Err(e) => {
                        problems(format!("guard.output.rules[{i}].validators[{j}]"), e);
                        None
                    }
                })
                .collect::<Vec<_>>();
            if r.retries.is_some() && r.on_fail != OnFail::Retry {
                problems(
                    format!("guard.output.rules[{i}].retries"),
                    "only applies to on_fail = \"retry\"".into(),
                );
            }
            OutputRule {
                when: r.when,
                validators,
                on_fail: r.on_fail,
                retries: r.retries.unwrap_or(1),
            }
        })
        .collect();
    GuardConfig {
        input,
        overrides: raw
            .input
            .overrides
            .into_iter()
            .map(|o| (o.when, o.policy))
            .collect(),
        detector: std::sync::Arc::new(detector),
        output,
    }
}

fn check_policy(p: &InputPolicy, path: &str, problems: &mut dyn FnMut(String, String)) {
    if p.max_messages == 0 {
        problems(format!("{path}.max_messages"), "must be at least 1".into());
    }
    if !(2..=1024).contains(&p.max_depth) {
        problems(
            format!("{path}.max_depth"),
            "must be between 2 and 1024".into(),
        );
    }
    if p.max_chars == 0 || p.max_tokens == 0 {
        problems(
            format!("{path}.max_chars"),
            "caps must be at least 1".into(),
        );
    }
    if p.on_too_long == TooLong::Truncate && p.truncation_marker.chars().count() * 2 >= p.max_chars
    {
        problems(
            format!("{path}.truncation_marker"),
            "must be much shorter than max_chars".into(),
        );
    }
    if let (Some(d), Some(m)) = (p.default_max_tokens, p.max_output_tokens)
        && d > m
    {
        problems(
            format!("{path}.default_max_tokens"),
            "must not exceed max_output_tokens".into(),
        );
    }
    if p.max_output_tokens == Some(0) {
        problems(
            format!("{path}.max_output_tokens"),
            "must be at least 1".into(),
        );
    }
    for (name, mode) in [("injection", p.injection), ("sql", p.sql), ("code", p.code)] {
        if mode == DetectMode::Redact {
            problems(
                format!("{path}.{name}"),
                "`redact` only applies to pii".into(),
            );
        }
    }
}
