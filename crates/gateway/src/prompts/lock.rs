//! `prompts.lock`: the content hash of every locked prompt version. A locked version
//! whose file now hashes differently was edited in place: an error that says to make a
//! new version instead.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::file::{FileProblem, PromptVersion};

const HEADER: &str = "# prompts.lock: content hashes of prompt versions, kept by `sluice check --update-lock`.\n# A locked version must never change: to change a prompt, add a new version file.\n\n";

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lock {
    /// `id@version` -> hash.
    #[serde(default)]
    pub versions: BTreeMap<String, String>,
}

impl Lock {
    /// Read a lock file; a missing file is an empty lock.
    pub fn read(path: &Path) -> Result<Lock, FileProblem> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Lock::default()),
            Err(e) => return Err(problem(path, format!("cannot read: {e}"))),
        };
        toml::from_str(&text)
            .map_err(|e| problem(path, format!("invalid lock file: {}", e.message())))
    }

    pub fn write(&self, path: &Path) -> Result<(), FileProblem> {
        let body = toml::to_string(self).map_err(|e| problem(path, e.to_string()))?;
        std::fs::write(path, format!("{HEADER}{body}"))
            .map_err(|e| problem(path, format!("cannot write: {e}")))
    }

    pub fn hash_of(&self, id: &str, version: u32) -> Option<&str> {
        self.versions
            .get(&format!("{id}@{version}"))
            .map(String::as_str)
    }
}

fn problem(path: &Path, message: String) -> FileProblem {
    FileProblem {
        file: path.to_path_buf(),
        line: None,
        path: String::new(),
        message,
    }
}

/// The error for a locked version edited in place.
pub fn changed_problem(v: &PromptVersion, locked: &str) -> FileProblem {
    // The next free version number in the prompt's folder.
    let highest = v
        .file
        .parent()
        .and_then(|d| std::fs::read_dir(d).ok())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| super::file::version_of_file(e.file_name().to_str()?))
        .max()
        .unwrap_or(v.version);
    let next = v.file.with_file_name(format!("v{}.toml", highest + 1));
    FileProblem {
        file: v.file.clone(),
        line: None,
        path: String::new(),
        message: format!(
            "{} changed after it was locked (locked hash {locked}, now {}): versions are immutable; restore this file and make a new version instead (e.g. copy it to {} and edit that)",
            v.reference(),
            v.hash,
            next.display()
        ),
    }
}

/// What `sluice check` found comparing the loaded versions with the lock.
#[derive(Debug, Default)]
pub struct LockCheck {
    /// Locked versions whose file changed: errors.
    pub changed: Vec<FileProblem>,
    /// Versions not in the lock yet (`id@version`, hash).
    pub unlocked: Vec<(String, String)>,
    /// Whether the lock file was written (with `update`).
    pub written: Option<PathBuf>,
}

/// Compare every version that parsed with the lock; with `update`, add the unlocked
/// ones and write the file (changed versions are never re-locked).
pub fn check<'a>(
    lock_path: &Path,
    versions: impl Iterator<Item = &'a PromptVersion>,
    update: bool,
) -> Result<LockCheck, FileProblem> {
    let mut lock = Lock::read(lock_path)?;
    let mut out = LockCheck::default();
    for v in versions {
        match lock.hash_of(&v.id, v.version) {
            Some(h) if h != v.hash => out.changed.push(changed_problem(v, h)),
            Some(_) => {}
            None => out.unlocked.push((v.reference(), v.hash.clone())),
        }
    }
    if update && !out.unlocked.is_empty() {
        for (r, h) in &out.unlocked {
            lock.versions.insert(r.clone(), h.clone());
        }
        lock.write(lock_path)?;
        out.written = Some(lock_path.to_path_buf());
    }
    Ok(out)
}
