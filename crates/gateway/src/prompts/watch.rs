//! Reload without a restart: a file watcher (debounced) on the prompt directory and on
//! the config file (for `[prompts.labels]`), plus SIGHUP. A reload that finds a broken
//! file keeps that version's last good copy and logs the problem.
//!
//! inotify also reports opens and reads, and the mini debouncer does not say which
//! kind an event was; reloading reads every file, so a watcher event only reloads when
//! the files' sizes and modification times ([`fingerprint`]) changed since the last
//! load. Otherwise each reload would set off the next, for ever.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use notify_debouncer_mini::notify::RecursiveMode;
use notify_debouncer_mini::{DebounceEventResult, new_debouncer};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Prompts, PromptsConfig};
use crate::config::{Config, SystemEnv};

/// Reload on SIGHUP, and (with `[prompts] watch`) when the files change; until
/// `shutdown` is cancelled.
pub fn spawn(prompts: Arc<Prompts>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = prompts.config();
    let Some(dir) = config.dir.as_deref() else {
        return Ok(());
    };
    let config_file = config
        .config_file
        .as_deref()
        .map(Path::canonicalize)
        .transpose()?;
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let forced = Arc::new(AtomicBool::new(false));
    let mut watched = dir.canonicalize()?;
    let mut seen = fingerprint(&watched, config_file.as_deref());
    let mut debouncer = if config.watch {
        Some(watch_files(
            &watched,
            config_file.clone(),
            config.debounce,
            tx.clone(),
        )?)
    } else {
        None
    };
    spawn_sighup(tx.clone(), forced.clone(), shutdown.clone());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                got = rx.recv() => {
                    if got.is_none() {
                        break;
                    }
                    let now = fingerprint(&watched, config_file.as_deref());
                    // A signal always reloads; a file event only when a file changed.
                    if !forced.swap(false, Ordering::Relaxed) && now == seen {
                        continue;
                    }
                    // Taken before the reload reads the files: an edit made while it
                    // reads differs from it, and so reloads again.
                    seen = now;
                    let labels = config_file.as_deref().and_then(reread_config);
                    prompts.reload(labels);
                    if debouncer.is_some()
                        && rewatch(&prompts, &mut watched, &mut debouncer, config_file.clone(), &tx)
                    {
                        seen = fingerprint(&watched, config_file.as_deref());
                    }
                }
            }
        }
        // Dropping the debouncer (here, at the end of the task) stops its thread.
        drop(debouncer);
    });
    Ok(())
}

/// A reload that moved `[prompts] dir` moves the watcher with it (true when it did);
/// the old one stops when it is replaced. A folder that cannot be watched keeps the old
/// watch, logged.
fn rewatch(
    prompts: &Prompts,
    watched: &mut PathBuf,
    debouncer: &mut Option<Debouncer>,
    config_file: Option<PathBuf>,
    tx: &mpsc::Sender<()>,
) -> bool {
    let config = prompts.config();
    let Some(dir) = config.dir.as_deref() else {
        return false;
    };
    let moved = match dir.canonicalize() {
        Ok(d) if d != *watched => d,
        Ok(_) => return false,
        Err(e) => {
            tracing::error!(dir = %dir.display(), error = %e, "the new prompt folder cannot be watched; still watching the old one");
            return false;
        }
    };
    match watch_files(&moved, config_file, config.debounce, tx.clone()) {
        Ok(d) => {
            *debouncer = Some(d);
            *watched = moved;
            true
        }
        Err(e) => {
            tracing::error!(dir = %moved.display(), error = %e, "the new prompt folder cannot be watched; still watching the old one");
            false
        }
    }
}

type Debouncer =
    notify_debouncer_mini::Debouncer<notify_debouncer_mini::notify::RecommendedWatcher>;

/// A debounced watcher on the prompt folder and the config file's folder.
fn watch_files(
    dir: &Path,
    config_file: Option<std::path::PathBuf>,
    debounce: std::time::Duration,
    tx: mpsc::Sender<()>,
) -> anyhow::Result<Debouncer> {
    let (watched_dir, watched_file) = (dir.to_path_buf(), config_file.clone());
    let mut debouncer = new_debouncer(debounce, move |result: DebounceEventResult| {
        let relevant = match result {
            Ok(events) => events
                .iter()
                .any(|e| matters(&e.path, &watched_dir, watched_file.as_deref())),
            Err(e) => {
                tracing::warn!(error = %e, "prompt watcher error");
                false
            }
        };
        if relevant {
            // A reload is already queued when the channel is full: nothing is lost.
            let _ = tx.try_send(());
        }
    })?;
    debouncer.watcher().watch(dir, RecursiveMode::Recursive)?;
    // The folder, not the file: editors save by replacing the file, which ends a
    // watch on the file itself.
    if let Some(parent) = config_file.as_deref().and_then(Path::parent) {
        debouncer
            .watcher()
            .watch(parent, RecursiveMode::NonRecursive)?;
    }
    tracing::info!(dir = %dir.display(), "watching prompt files for changes");
    Ok(debouncer)
}

/// Size and modification time of every file that [`matters`] (the prompt files and the
/// lock under `dir`, and the config file), in path order: what a reload would read.
/// Only metadata is read, which the watcher does not report.
fn fingerprint(dir: &Path, config_file: Option<&Path>) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    fn walk(at: &Path, dir: &Path, out: &mut Vec<(PathBuf, u64, Option<SystemTime>)>) {
        let Ok(entries) = std::fs::read_dir(at) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.metadata() {
                Ok(m) if m.is_dir() => walk(&path, dir, out),
                Ok(m) if matters(&path, dir, None) => {
                    out.push((path, m.len(), m.modified().ok()));
                }
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    if let Some(file) = config_file
        && let Ok(m) = std::fs::metadata(file)
    {
        out.push((file.to_path_buf(), m.len(), m.modified().ok()));
    }
    out.sort();
    out
}

/// A prompt file, the lock, or the config file.
fn matters(path: &Path, dir: &Path, config_file: Option<&Path>) -> bool {
    if Some(path) == config_file {
        return true;
    }
    path.starts_with(dir) && path.extension().is_some_and(|e| e == "toml" || e == "lock")
}

/// The `[prompts]` section of the config file as it is now; `None` (keep the current
/// labels) when the file does not load, which is logged.
fn reread_config(path: &Path) -> Option<PromptsConfig> {
    match Config::load(path, &SystemEnv) {
        Ok(c) => Some(c.prompts),
        Err(e) => {
            tracing::error!(error = %e, "config file changed but does not load; keeping the current prompt labels");
            None
        }
    }
}

#[cfg(unix)]
fn spawn_sighup(tx: mpsc::Sender<()>, forced: Arc<AtomicBool>, shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; prompts reload on file changes only");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                got = hup.recv() => {
                    if got.is_none() {
                        break;
                    }
                    tracing::info!("SIGHUP: reloading prompts");
                    forced.store(true, Ordering::Relaxed);
                    let _ = tx.try_send(());
                }
            }
        }
    });
}

#[cfg(not(unix))]
fn spawn_sighup(_tx: mpsc::Sender<()>, _forced: Arc<AtomicBool>, _shutdown: CancellationToken) {}
