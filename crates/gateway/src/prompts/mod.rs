//! Prompts as code: a directory of versioned prompt files (`ID/vN.toml`), the registry
//! that resolves `id@version` and `id@label` references, variable binding and rendering,
//! the content-hash lock, reloading on change, and the prompt test runner.
//!
//! The registry is immutable; [`Prompts`] holds the current one in an `ArcSwap`, so a
//! reload swaps it whole while requests in flight keep the one they started with.

pub mod assert;
pub mod cassette;
pub mod config;
pub mod file;
pub mod lock;
pub mod render;
pub mod runner;
pub mod watch;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;

pub use config::PromptsConfig;
pub use file::{FileProblem, PromptVersion, Version};

/// What can go wrong resolving a prompt for a request; each a 4xx naming what to fix.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PromptError {
    /// 400 `invalid_prompt_reference`.
    #[error("`{reference}` is not a prompt reference: {message}")]
    BadReference { reference: String, message: String },
    /// 404 `prompt_not_found`.
    #[error("{message}")]
    NotFound { message: String },
    /// 400 `missing_variable`, param `sluice.variables.NAME`.
    #[error(
        "variable `{name}` ({kind}) is required by the prompt but was not sent in sluice.variables"
    )]
    MissingVariable { name: String, kind: &'static str },
    /// 400 `invalid_variable`, param `sluice.variables.NAME`.
    #[error("{message}")]
    InvalidVariable { name: String, message: String },
    /// 400 `prompt_render_failed`: the variables given made the template fail.
    #[error("prompt `{reference}` could not be rendered with these variables: {message}")]
    RenderFailed { reference: String, message: String },
    /// 400 `model_required`: neither the request nor the prompt names a model.
    #[error("prompt `{reference}` names no model; send `model` with the request")]
    NoModel { reference: String },
}

impl PromptError {
    pub fn code(&self) -> &'static str {
        match self {
            PromptError::BadReference { .. } => "invalid_prompt_reference",
            PromptError::NotFound { .. } => "prompt_not_found",
            PromptError::MissingVariable { .. } => "missing_variable",
            PromptError::InvalidVariable { .. } => "invalid_variable",
            PromptError::RenderFailed { .. } => "prompt_render_failed",
            PromptError::NoModel { .. } => "model_required",
        }
    }

    pub fn param(&self) -> String {
        match self {
            PromptError::MissingVariable { name, .. }
            | PromptError::InvalidVariable { name, .. } => {
                format!("sluice.variables.{name}")
            }
            PromptError::RenderFailed { .. } => "sluice.variables".into(),
            PromptError::BadReference { .. } | PromptError::NotFound { .. } => {
                "sluice.prompt".into()
            }
            PromptError::NoModel { .. } => "model".into(),
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, PromptError::NotFound { .. })
    }
}

/// `id`, `id@3`, `id@v3` or `id@label`, split.
pub fn parse_reference(reference: &str) -> Result<(&str, Option<&str>), PromptError> {
    let bad = |message: &str| PromptError::BadReference {
        reference: reference.to_string(),
        message: message.to_string(),
    };
    let (id, selector) = match reference.trim().split_once('@') {
        Some((id, sel)) => (id, Some(sel)),
        None => (reference.trim(), None),
    };
    file::check_id(id).map_err(|e| bad(&e))?;
    if let Some(s) = selector
        && (s.is_empty() || s.contains('@'))
    {
        return Err(bad(
            "expected ID@VERSION or ID@LABEL, e.g. message-generator@2",
        ));
    }
    Ok((id, selector))
}

/// Every prompt version that loaded, and the labels pointing at them.
#[derive(Default)]
pub struct PromptRegistry {
    prompts: BTreeMap<String, BTreeMap<u32, Version>>,
    /// Effective labels: the files' own, overlaid by `[prompts.labels]`.
    labels: BTreeMap<String, BTreeMap<String, u32>>,
    /// What did not load (and, on reload, what kept its last good version).
    pub problems: Vec<FileProblem>,
}

impl PromptRegistry {
    /// Read every `ID/vN.toml` under the configured directory. A file that does not
    /// load is a problem; when `previous` had that version, it is kept (last good).
    pub fn load(config: &PromptsConfig, previous: Option<&PromptRegistry>) -> PromptRegistry {
        let mut registry = PromptRegistry::default();
        let Some(dir) = &config.dir else {
            return registry;
        };
        let locked = config
            .lock
            .as_deref()
            .map(lock::Lock::read)
            .transpose()
            .unwrap_or_else(|e| {
                registry.problems.push(e);
                None
            });
        for (id, version, path) in scan(dir, &mut registry.problems) {
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    registry.problems.push(FileProblem {
                        file: path.clone(),
                        line: None,
                        path: String::new(),
                        message: format!("cannot read: {e}"),
                    });
                    continue;
                }
            };
            let parsed =
                PromptVersion::parse(&id, version, &path, &text).and_then(|v| {
                    match locked.as_ref().and_then(|l| l.hash_of(&id, version)) {
                        Some(hash) if hash != v.hash => Err(vec![lock::changed_problem(&v, hash)]),
                        _ => Ok(v),
                    }
                });
            match parsed {
                Ok(v) => {
                    registry
                        .prompts
                        .entry(id)
                        .or_default()
                        .insert(version, Arc::new(v));
                }
                Err(mut problems) => {
                    if let Some(old) = previous.and_then(|p| p.version(&id, version)) {
                        problems.push(FileProblem {
                            file: path.clone(),
                            line: None,
                            path: String::new(),
                            message: format!(
                                "keeping the last good {} (hash {})",
                                old.reference(),
                                old.hash
                            ),
                        });
                        registry.prompts.entry(id).or_default().insert(version, old);
                    }
                    registry.problems.extend(problems);
                }
            }
        }
        registry.labels = registry.effective_labels(config);
        registry
    }

    /// File labels first (the highest version claiming a label wins), then config.
    fn effective_labels(
        &mut self,
        config: &PromptsConfig,
    ) -> BTreeMap<String, BTreeMap<String, u32>> {
        let mut labels: BTreeMap<String, BTreeMap<String, u32>> = BTreeMap::new();
        for (id, versions) in &self.prompts {
            for (v, p) in versions {
                for label in &p.labels {
                    labels
                        .entry(id.clone())
                        .or_default()
                        .insert(label.clone(), *v);
                }
            }
        }
        for (id, map) in &config.labels {
            for (label, v) in map {
                if self.version(id, *v).is_none() {
                    self.problems.push(FileProblem {
                        file: config
                            .config_file
                            .clone()
                            .unwrap_or_else(|| "[prompts]".into()),
                        line: None,
                        path: format!("prompts.labels.{id}.{label}"),
                        message: format!(
                            "points at {id}@{v}, which did not load or does not exist"
                        ),
                    });
                }
                labels
                    .entry(id.clone())
                    .or_default()
                    .insert(label.clone(), *v);
            }
        }
        labels
    }

    /// The version a reference names: `id@3`, `id@v3`, `id@label`, `id` (= `id@latest`).
    pub fn resolve(&self, reference: &str) -> Result<Version, PromptError> {
        let (id, selector) = parse_reference(reference)?;
        let Some(versions) = self.prompts.get(id) else {
            return Err(PromptError::NotFound {
                message: format!("no prompt `{id}`{}", self.known_ids()),
            });
        };
        let selector = selector.unwrap_or(config::LATEST);
        let number = match file::parse_version(selector) {
            Some(n) => n,
            None if selector == config::LATEST => match versions.keys().next_back() {
                Some(n) => *n,
                None => 0,
            },
            None => match self.labels.get(id).and_then(|l| l.get(selector)) {
                Some(n) => *n,
                None => {
                    let known: Vec<String> = self
                        .labels
                        .get(id)
                        .map(|l| l.keys().cloned().collect())
                        .unwrap_or_default();
                    return Err(PromptError::NotFound {
                        message: format!(
                            "prompt `{id}` has no label `{selector}` (labels: {})",
                            if known.is_empty() {
                                "none".into()
                            } else {
                                known.join(", ")
                            }
                        ),
                    });
                }
            },
        };
        versions
            .get(&number)
            .cloned()
            .ok_or_else(|| PromptError::NotFound {
                message: format!(
                    "prompt `{id}` has no version {number} (versions: {})",
                    versions
                        .keys()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
    }

    fn known_ids(&self) -> String {
        if self.prompts.is_empty() {
            " (no prompts are loaded)".into()
        } else {
            format!(
                " (prompts: {})",
                self.prompts.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        }
    }

    /// One exact version.
    pub fn version(&self, id: &str, version: u32) -> Option<Version> {
        self.prompts.get(id)?.get(&version).cloned()
    }

    /// The versions of `id` that loaded, lowest first (empty when none).
    pub fn versions(&self, id: &str) -> Vec<u32> {
        self.prompts
            .get(id)
            .map(|v| v.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Every prompt id.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.prompts.keys().map(String::as_str)
    }

    /// Every loaded version, by id then version.
    pub fn all(&self) -> impl Iterator<Item = &Version> {
        self.prompts.values().flat_map(|v| v.values())
    }

    /// The labels of `id` and the version each points at.
    pub fn labels(&self, id: &str) -> BTreeMap<String, u32> {
        self.labels.get(id).cloned().unwrap_or_default()
    }
}

/// `dir/ID/vN.toml` files, sorted. Other `.toml` files in a prompt folder are problems
/// (a misnamed version would silently never load).
fn scan(dir: &Path, problems: &mut Vec<FileProblem>) -> Vec<(String, u32, std::path::PathBuf)> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            problems.push(FileProblem {
                file: dir.to_path_buf(),
                line: None,
                path: String::new(),
                message: format!("cannot read the prompt directory: {e}"),
            });
            return out;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        let Some(id) = path
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
        else {
            continue;
        };
        if id.starts_with('.') {
            continue;
        }
        if let Err(e) = file::check_id(&id) {
            problems.push(FileProblem {
                file: path.clone(),
                line: None,
                path: String::new(),
                message: e,
            });
            continue;
        }
        let Ok(files) = std::fs::read_dir(&path) else {
            continue;
        };
        for f in files.flatten() {
            let fpath = f.path();
            let Some(name) = fpath.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if !name.ends_with(".toml") {
                continue;
            }
            match file::version_of_file(name) {
                Some(v) => out.push((id.clone(), v, fpath)),
                None => problems.push(FileProblem {
                    file: fpath.clone(),
                    line: None,
                    path: String::new(),
                    message: "not a prompt version file: name versions v1.toml, v2.toml, ..."
                        .into(),
                }),
            }
        }
    }
    out.sort();
    out
}

/// The live registry, swapped whole on reload.
pub struct Prompts {
    config: ArcSwap<PromptsConfig>,
    current: ArcSwap<PromptRegistry>,
    /// Reloads so far (what a test reads to see that reloads do not feed themselves).
    reloads: std::sync::atomic::AtomicU64,
}

impl Prompts {
    /// Load the registry; problems are logged (the versions that loaded serve).
    pub fn load(config: PromptsConfig) -> Arc<Prompts> {
        let registry = PromptRegistry::load(&config, None);
        log_problems(&registry.problems);
        Arc::new(Prompts {
            config: ArcSwap::from_pointee(config),
            current: ArcSwap::from_pointee(registry),
            reloads: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The registry requests resolve against right now.
    pub fn registry(&self) -> Arc<PromptRegistry> {
        self.current.load_full()
    }

    pub fn config(&self) -> Arc<PromptsConfig> {
        self.config.load_full()
    }

    /// How many times the registry was reloaded since start.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Re-read the files (and the labels, when `config` is given); a broken file keeps
    /// its last good version. Returns the new registry.
    pub fn reload(&self, config: Option<PromptsConfig>) -> Arc<PromptRegistry> {
        if let Some(c) = config {
            self.config.store(Arc::new(c));
        }
        let config = self.config.load_full();
        let previous = self.current.load_full();
        let next = PromptRegistry::load(&config, Some(&previous));
        log_problems(&next.problems);
        let count = next.all().count();
        let next = Arc::new(next);
        self.current.store(next.clone());
        self.reloads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(versions = count, "prompts reloaded");
        next
    }
}

fn log_problems(problems: &[FileProblem]) {
    for p in problems {
        tracing::error!(problem = %p, "prompt file problem");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse() {
        assert_eq!(parse_reference("a@2").unwrap(), ("a", Some("2")));
        assert_eq!(parse_reference("a").unwrap(), ("a", None));
        assert_eq!(
            parse_reference("a@production").unwrap(),
            ("a", Some("production"))
        );
        for bad in ["", "@2", "a@", "a@b@c", "a/b@1"] {
            assert!(parse_reference(bad).is_err(), "{bad}");
        }
    }
}
