//! `[prompts]`: where the prompt files live, the lock file, which version each label
//! points at, and which request `model` values mean "the prompt's own model".

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// `[prompts]` as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawPrompts {
    dir: Option<PathBuf>,
    lock: Option<PathBuf>,
    /// `[prompts.labels.ID]` tables: label -> version.
    #[serde(default)]
    labels: BTreeMap<String, BTreeMap<String, u32>>,
    model_aliases: Option<Vec<String>>,
    watch: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    debounce: Option<Duration>,
}

/// The validated `[prompts]` section.
#[derive(Debug, Clone)]
pub struct PromptsConfig {
    /// The prompt directory (relative paths are taken from the config file's folder);
    /// `None`: prompts are off.
    pub dir: Option<PathBuf>,
    /// `prompts.lock`: content hashes of locked versions (default: inside `dir`).
    pub lock: Option<PathBuf>,
    /// Prompt id -> label -> version. Wins over the labels a prompt file claims.
    pub labels: BTreeMap<String, BTreeMap<String, u32>>,
    /// A request whose `model` is one of these (or empty, or the prompt's id) gets the
    /// prompt's model; any other model the request names wins.
    pub model_aliases: Vec<String>,
    /// Reload prompt files and labels when they change on disk (and on SIGHUP).
    pub watch: bool,
    /// How long file events settle before a reload.
    pub debounce: Duration,
    /// The config file the labels come from, re-read on reload.
    pub config_file: Option<PathBuf>,
}

impl Default for PromptsConfig {
    fn default() -> Self {
        Self {
            dir: None,
            lock: None,
            labels: BTreeMap::new(),
            model_aliases: vec![DEFAULT_MODEL_ALIAS.into()],
            watch: true,
            debounce: Duration::from_millis(200),
            config_file: None,
        }
    }
}

pub const DEFAULT_MODEL_ALIAS: &str = "prompt";

/// Built-in label: the highest version (also what a bare `id` means).
pub const LATEST: &str = "latest";

/// Validate the section; `config_file` is where it was read from (relative paths are
/// taken from its folder).
pub fn build(
    raw: RawPrompts,
    config_file: Option<&Path>,
    problems: &mut dyn FnMut(String, String),
) -> PromptsConfig {
    let base = config_file.and_then(Path::parent);
    let resolve = |p: PathBuf| match base {
        Some(b) if p.is_relative() => b.join(p),
        _ => p,
    };
    let dir = raw.dir.map(resolve);
    let lock = raw
        .lock
        .map(resolve)
        .or_else(|| dir.as_ref().map(|d| d.join("prompts.lock")));
    for (id, labels) in &raw.labels {
        if let Err(e) = super::file::check_id(id) {
            problems(format!("prompts.labels.{id}"), e);
        }
        for (label, version) in labels {
            if let Err(e) = check_label(label) {
                problems(format!("prompts.labels.{id}.{label}"), e);
            }
            if *version == 0 {
                problems(
                    format!("prompts.labels.{id}.{label}"),
                    "versions start at 1".into(),
                );
            }
        }
    }
    if !raw.labels.is_empty() && dir.is_none() {
        problems(
            "prompts.labels".into(),
            "labels need `prompts.dir` (where the prompt files are)".into(),
        );
    }
    if raw.debounce.is_some_and(|d| d < Duration::from_millis(10)) {
        problems(
            "prompts.debounce".into(),
            "must be at least 10ms (file events settle for this long before a reload)".into(),
        );
    }
    let d = PromptsConfig::default();
    PromptsConfig {
        dir,
        lock,
        labels: raw.labels,
        model_aliases: raw.model_aliases.unwrap_or(d.model_aliases),
        watch: raw.watch.unwrap_or(d.watch),
        debounce: raw.debounce.unwrap_or(d.debounce),
        config_file: config_file.map(Path::to_path_buf),
    }
}

/// A label is a name that cannot be read as a version: `production`, `canary-eu`.
pub fn check_label(label: &str) -> Result<(), String> {
    let ok = !label.is_empty()
        && label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && !super::file::is_version_text(label)
        && label != LATEST;
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{label}` is not a label: use letters, digits, `-` and `_`, not a version like `2` or `v2`, and not `{LATEST}` (built in)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build_from(text: &str, file: Option<&Path>) -> (PromptsConfig, Vec<(String, String)>) {
        let raw: RawPrompts = toml::from_str(text).unwrap();
        let mut problems = Vec::new();
        let c = build(raw, file, &mut |p, m| problems.push((p, m)));
        (c, problems)
    }

    #[test]
    fn paths_are_taken_from_the_config_files_folder() {
        let (c, problems) = build_from(
            "dir = \"prompts\"\n[labels.greet]\nproduction = 2\n",
            Some(Path::new("/etc/sluice/sluice.toml")),
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(c.dir.as_deref(), Some(Path::new("/etc/sluice/prompts")));
        assert_eq!(
            c.lock.as_deref(),
            Some(Path::new("/etc/sluice/prompts/prompts.lock"))
        );
        assert_eq!(c.labels["greet"]["production"], 2);
        assert_eq!(c.model_aliases, ["prompt"]);
    }

    #[test]
    fn bad_labels_and_settings_are_reported_with_their_path() {
        let (_, problems) = build_from(
            "dir = \"p\"\ndebounce = \"1ms\"\n[labels.greet]\nv2 = 1\nlatest = 1\nok = 0\n[labels.\"a/b\"]\nx = 1\n",
            None,
        );
        let paths: Vec<&str> = problems.iter().map(|(p, _)| p.as_str()).collect();
        for expected in [
            "prompts.debounce",
            "prompts.labels.greet.v2",
            "prompts.labels.greet.latest",
            "prompts.labels.greet.ok",
            "prompts.labels.a/b",
        ] {
            assert!(paths.contains(&expected), "{expected} not in {paths:?}");
        }
        let (_, problems) = build_from("[labels.greet]\nproduction = 1\n", None);
        assert_eq!(problems[0].0, "prompts.labels");
    }
}
