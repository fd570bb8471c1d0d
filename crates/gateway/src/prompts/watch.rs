//! Reload without a restart: a file watcher (debounced) on the prompt directory and on
//! the config file (for `[prompts.labels]`), plus SIGHUP. A reload that finds a broken
//! file keeps that version's last good copy and logs the problem.

use std::path::Path;
use std::sync::Arc;

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
    let debouncer = if config.watch {
        Some(watch_files(
            &dir.canonicalize()?,
            config_file.clone(),
            config.debounce,
            tx.clone(),
        )?)
    } else {
        None
    };
    spawn_sighup(tx, shutdown.clone());
    tokio::spawn(async move {
        // Dropping the debouncer stops its thread.
        let _debouncer = debouncer;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                got = rx.recv() => {
                    if got.is_none() {
                        break;
                    }
                    let labels = config_file.as_deref().and_then(reread_config);
                    prompts.reload(labels);
                }
            }
        }
    });
    Ok(())
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
fn spawn_sighup(tx: mpsc::Sender<()>, shutdown: CancellationToken) {
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
                    let _ = tx.try_send(());
                }
            }
        }
    });
}

#[cfg(not(unix))]
fn spawn_sighup(_tx: mpsc::Sender<()>, _shutdown: CancellationToken) {}
