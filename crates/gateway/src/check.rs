//! `sluice check`: validate the config and every prompt file, and keep `prompts.lock`.
//! The report is a value ([`CheckReport`]) so other checks (a routing table printout,
//! ...) can add their sections to the same output.

use std::fmt;
use std::path::Path;

use crate::config::{Config, Env};
use crate::prompts::{PromptRegistry, lock};

/// What `sluice check` found: sections of lines, and whether anything is an error.
#[derive(Debug, Default)]
pub struct CheckReport {
    pub sections: Vec<(String, Vec<String>)>,
    pub errors: usize,
    pub warnings: usize,
}

impl CheckReport {
    pub fn ok(&self) -> bool {
        self.errors == 0
    }

    fn section(&mut self, title: impl Into<String>) -> &mut Vec<String> {
        self.sections.push((title.into(), Vec::new()));
        let last = self.sections.len() - 1;
        &mut self.sections[last].1
    }

    fn error(&mut self, line: String) {
        self.errors += 1;
        self.current().push(format!("error: {line}"));
    }

    fn warning(&mut self, line: String) {
        self.warnings += 1;
        self.current().push(format!("warning: {line}"));
    }

    fn note(&mut self, line: String) {
        self.current().push(line);
    }

    fn current(&mut self) -> &mut Vec<String> {
        if self.sections.is_empty() {
            self.section("");
        }
        let last = self.sections.len() - 1;
        &mut self.sections[last].1
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (title, lines) in &self.sections {
            if !title.is_empty() {
                writeln!(f, "{title}")?;
            }
            for l in lines {
                writeln!(f, "  {l}")?;
            }
        }
        write!(
            f,
            "{}: {} error(s), {} warning(s)",
            if self.ok() { "ok" } else { "FAILED" },
            self.errors,
            self.warnings
        )
    }
}

/// Check the config at `path` and its prompt files; with `update_lock`, lock the
/// versions not locked yet. Also returns the config when it loaded, for more checks.
pub fn run(path: &Path, env: &dyn Env, update_lock: bool) -> (CheckReport, Option<Config>) {
    let mut report = CheckReport::default();
    report.section(format!("config {}", path.display()));
    let config = match Config::load(path, env) {
        Ok(c) => {
            report.note("loads".into());
            c
        }
        Err(e) => {
            for p in &e.problems {
                if p.path.is_empty() {
                    report.error(format!("{}: {}", path.display(), p.message));
                } else {
                    report.error(format!("{}: {}: {}", path.display(), p.path, p.message));
                }
            }
            return (report, None);
        }
    };
    check_prompts(&config, update_lock, &mut report);
    check_experiments(&config, &mut report);
    report.section("routing");
    for line in crate::routing::rules::routing_table(&config).lines() {
        report.note(line.to_string());
    }
    (report, Some(config))
}

/// Every prompt version an experiment's variants name must exist in the prompt files.
pub fn check_experiments(config: &Config, report: &mut CheckReport) {
    let references: Vec<(&str, &str, &str)> = config
        .experiments
        .iter()
        .flat_map(|e| {
            e.variants.iter().filter_map(move |v| {
                v.prompt
                    .as_deref()
                    .map(|p| (e.name.as_str(), v.name.as_str(), p))
            })
        })
        .collect();
    if references.is_empty() {
        return;
    }
    report.section("experiments");
    let registry = PromptRegistry::load(&config.prompts, None);
    for (experiment, variant, reference) in references {
        match registry.resolve(reference) {
            Ok(v) => report.note(format!(
                "{experiment}: variant {variant} -> {} (hash {})",
                v.reference(),
                v.hash
            )),
            Err(e) => report.error(format!(
                "experiments.{experiment}: variant {variant}: {reference}: {e}"
            )),
        }
    }
}

/// The prompt section of the report: every file problem, the lock, the labels.
pub fn check_prompts(config: &Config, update_lock: bool, report: &mut CheckReport) {
    let Some(dir) = &config.prompts.dir else {
        return;
    };
    report.section(format!("prompts {}", dir.display()));
    let registry = PromptRegistry::load(&config.prompts, None);
    for p in &registry.problems {
        report.error(p.to_string());
    }
    for v in registry.all() {
        report.note(format!(
            "{} hash {} ({} test case(s))",
            v.reference(),
            v.hash,
            v.tests.len()
        ));
    }
    for id in registry.ids() {
        for (label, version) in registry.labels(id) {
            report.note(format!("{id}@{label} -> {id}@{version}"));
        }
    }
    let Some(lock_path) = &config.prompts.lock else {
        return;
    };
    match lock::check(lock_path, registry.all().map(|v| &**v), update_lock) {
        Err(p) => report.error(p.to_string()),
        Ok(found) => {
            for p in found.changed {
                report.error(p.to_string());
            }
            match found.written {
                Some(path) => {
                    for (r, h) in &found.unlocked {
                        report.note(format!("locked {r} ({h}) in {}", path.display()));
                    }
                }
                None => {
                    for (r, _) in &found.unlocked {
                        report.warning(format!(
                            "{r} is not in {} yet; run `sluice check --update-lock` to lock it",
                            lock_path.display()
                        ));
                    }
                }
            }
        }
    }
}
