//! `[[experiments]]`: raw TOML shapes and their validated form.

use std::time::UNIX_EPOCH;

use serde::Deserialize;

use crate::config::{ModelConfig, ModelKind};
use crate::guard::config::Match;

/// What the variants change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// A prompt's versions: each variant names `prompt = "id@version"`.
    Prompt,
    /// Models: each variant names `model = "..."`.
    Model,
}

impl Target {
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Prompt => "prompt",
            Target::Model => "model",
        }
    }
}

/// What a variant is sticky to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    /// The end user (hash of experiment + owner + user); requests without an end user
    /// are assigned per request.
    #[default]
    User,
    /// Each request on its own.
    Request,
}

impl Unit {
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::User => "user",
            Unit::Request => "request",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVariant {
    pub name: String,
    pub weight: u32,
    pub prompt: Option<String>,
    pub model: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExperiment {
    pub name: String,
    pub target: Target,
    /// Prompt target: the prompt id whose requests take part.
    pub prompt: Option<String>,
    /// Which requests take part (model, feature, tier); absent fields match anything.
    #[serde(rename = "match", default)]
    pub when: Match,
    #[serde(default)]
    pub assignment: Unit,
    /// The variant the others are compared with; the first when absent.
    pub control: Option<String>,
    /// Share of units (0 to <1) kept out: served as they asked, recorded as `holdout`.
    pub holdout: Option<f64>,
    /// RFC 3339 times; outside `[start, stop)` nobody is assigned.
    pub start: Option<toml::Value>,
    pub stop: Option<toml::Value>,
    pub enabled: Option<bool>,
    pub variants: Vec<RawVariant>,
}

/// One variant, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    pub name: String,
    pub weight: u32,
    /// `id@version` for prompt experiments.
    pub prompt: Option<String>,
    /// The model for model experiments.
    pub model: Option<String>,
}

/// One experiment, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Experiment {
    pub name: String,
    pub target: Target,
    pub prompt: Option<String>,
    pub when: Match,
    pub assignment: Unit,
    pub control: String,
    pub holdout: f64,
    pub start_ms: Option<i64>,
    pub stop_ms: Option<i64>,
    pub enabled: bool,
    pub variants: Vec<Variant>,
}

impl Experiment {
    /// Enabled and within its start/stop window at `now_ms`.
    pub fn active_at(&self, now_ms: i64) -> bool {
        self.enabled
            && self.start_ms.is_none_or(|s| now_ms >= s)
            && self.stop_ms.is_none_or(|s| now_ms < s)
    }

    pub fn total_weight(&self) -> u64 {
        self.variants.iter().map(|v| u64::from(v.weight)).sum()
    }

    pub fn variant(&self, name: &str) -> Option<&Variant> {
        self.variants.iter().find(|v| v.name == name)
    }
}

/// Characters that would break `x-sluice-experiment: NAME=VARIANT`.
fn bad_name(s: &str) -> bool {
    s.trim().is_empty()
        || s.len() > 100
        || s.chars()
            .any(|c| c == '=' || c == ',' || c.is_whitespace() || c.is_control())
}

fn time_ms(value: &toml::Value) -> Result<i64, String> {
    let text = match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Datetime(d) => d.to_string(),
        _ => return Err("must be an RFC 3339 time like \"2026-12-01T00:00:00Z\"".into()),
    };
    let at = humantime_serde::re::humantime::parse_rfc3339_weak(&text)
        .map_err(|e| format!("`{text}` is not an RFC 3339 time: {e}"))?;
    let ms = at.duration_since(UNIX_EPOCH).map_err(|e| e.to_string())?;
    Ok(i64::try_from(ms.as_millis()).unwrap_or(i64::MAX))
}

/// Validate `[[experiments]]` against the models; problems are pushed with their path.
pub fn build(
    raw: Vec<(usize, RawExperiment)>,
    model: &dyn Fn(&str) -> Option<ModelConfig>,
    problems: &mut dyn FnMut(String, String),
) -> Vec<Experiment> {
    let mut names = std::collections::HashSet::new();
    raw.into_iter()
        .map(|(i, e)| {
            let path = format!("experiments[{i}]");
            if bad_name(&e.name) {
                problems(
                    format!("{path}.name"),
                    "must be 1-100 characters without spaces, `=` or `,`".into(),
                );
            }
            if !names.insert(e.name.clone()) {
                problems(
                    format!("{path}.name"),
                    format!("duplicate experiment `{}`", e.name),
                );
            }
            if e.name == "none" {
                problems(
                    format!("{path}.name"),
                    "`none` is reserved (`x-sluice-experiment: none` opts a request out)".into(),
                );
            }
            if e.variants.len() < 2 {
                problems(
                    format!("{path}.variants"),
                    "an experiment needs at least two variants".into(),
                );
            }
            let mut variant_names = std::collections::HashSet::new();
            for (j, v) in e.variants.iter().enumerate() {
                let vpath = format!("{path}.variants[{j}]");
                if bad_name(&v.name) || v.name == "holdout" {
                    problems(
                        format!("{vpath}.name"),
                        "must be 1-100 characters without spaces, `=` or `,`, and not `holdout`"
                            .into(),
                    );
                }
                if !variant_names.insert(v.name.clone()) {
                    problems(
                        format!("{vpath}.name"),
                        format!("duplicate variant `{}`", v.name),
                    );
                }
                if v.weight == 0 {
                    problems(format!("{vpath}.weight"), "must be at least 1".into());
                }
                match e.target {
                    Target::Model => {
                        if v.prompt.is_some() {
                            problems(
                                format!("{vpath}.prompt"),
                                "a model experiment's variants name a `model`".into(),
                            );
                        }
                        match v.model.as_deref() {
                            None => problems(
                                format!("{vpath}.model"),
                                "required for target = \"model\"".into(),
                            ),
                            Some(m) => match model(m) {
                                None => problems(
                                    format!("{vpath}.model"),
                                    format!("no model named `{m}`"),
                                ),
                                Some(c) if c.kind != ModelKind::Chat => problems(
                                    format!("{vpath}.model"),
                                    format!("`{m}` is not a chat model"),
                                ),
                                Some(_) => {}
                            },
                        }
                    }
                    Target::Prompt => {
                        if v.model.is_some() {
                            problems(
                                format!("{vpath}.model"),
                                "a prompt experiment's variants name a `prompt`".into(),
                            );
                        }
                        match (v.prompt.as_deref(), e.prompt.as_deref()) {
                            (None, _) => problems(
                                format!("{vpath}.prompt"),
                                "required for target = \"prompt\" (`id@version`)".into(),
                            ),
                            (Some(p), Some(id)) => match p.split_once('@') {
                                Some((pid, version)) if pid == id && !version.is_empty() => {}
                                _ => problems(
                                    format!("{vpath}.prompt"),
                                    format!("must be `{id}@VERSION`"),
                                ),
                            },
                            (Some(_), None) => {}
                        }
                    }
                }
            }
            if e.target == Target::Prompt && e.prompt.as_deref().is_none_or(str::is_empty) {
                problems(
                    format!("{path}.prompt"),
                    "required for target = \"prompt\": the prompt id whose requests take part"
                        .into(),
                );
            }
            if e.target == Target::Model && e.prompt.is_some() {
                problems(
                    format!("{path}.prompt"),
                    "only applies to target = \"prompt\"".into(),
                );
            }
            let control = e
                .control
                .clone()
                .or_else(|| e.variants.first().map(|v| v.name.clone()))
                .unwrap_or_default();
            if e.control.is_some() && !e.variants.iter().any(|v| v.name == control) {
                problems(
                    format!("{path}.control"),
                    format!("no variant named `{control}`"),
                );
            }
            let holdout = e.holdout.unwrap_or(0.0);
            if !(0.0..1.0).contains(&holdout) {
                problems(
                    format!("{path}.holdout"),
                    "must be at least 0 and below 1".into(),
                );
            }
            let mut time = |field: &str, v: &Option<toml::Value>| {
                v.as_ref().and_then(|v| match time_ms(v) {
                    Ok(ms) => Some(ms),
                    Err(m) => {
                        problems(format!("{path}.{field}"), m);
                        None
                    }
                })
            };
            let start_ms = time("start", &e.start);
            let stop_ms = time("stop", &e.stop);
            if let (Some(a), Some(b)) = (start_ms, stop_ms)
                && a >= b
            {
                problems(format!("{path}.stop"), "must be after `start`".into());
            }
            Experiment {
                name: e.name,
                target: e.target,
                prompt: e.prompt,
                when: e.when,
                assignment: e.assignment,
                control,
                holdout,
                start_ms,
                stop_ms,
                enabled: e.enabled.unwrap_or(true),
                variants: e
                    .variants
                    .into_iter()
                    .map(|v| Variant {
                        name: v.name,
                        weight: v.weight,
                        prompt: v.prompt,
                        model: v.model,
                    })
                    .collect(),
            }
        })
        .collect()
}
