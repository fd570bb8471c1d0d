//! A/B experiments: `[[experiments]]` config, sticky assignment (the pipeline's assign
//! stage calls [`assign`]), and per-variant reports over the request log for
//! `sluice experiments report`, `/admin/experiments` and the dashboard.

pub mod admin;
pub mod assign;
pub mod config;
pub mod report;
pub mod stats;

use std::time::Duration;

pub use assign::{Assignment, HOLDOUT, Subject, Treatment, assign};
pub use config::{Experiment, RawExperiment, Target, Unit, Variant};
pub use report::{Report, render_table};

use crate::store::Store;

pub use crate::usage::now_ms;

/// The report of `experiment` over the last `since` (default: since its start, or all
/// the log), read from `store`.
pub async fn report_from(
    store: &Store,
    experiment: &Experiment,
    since: Option<Duration>,
    now_ms: i64,
) -> Result<Report, sqlx::Error> {
    let since_ms = match since {
        Some(d) => now_ms.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        None => experiment.start_ms.unwrap_or(0),
    };
    // Inclusive of the current millisecond.
    let until_ms = now_ms.saturating_add(1);
    let rows = store
        .experiment_rows(&experiment.name, since_ms, until_ms)
        .await?;
    let feedback = store
        .experiment_feedback(&experiment.name, since_ms, until_ms)
        .await?;
    Ok(report::compute(
        experiment,
        &rows,
        &feedback,
        (since_ms, now_ms),
    ))
}

/// `sluice experiments ...`: the store is opened directly, as `sluice stats` does.
#[derive(Debug, clap::Args)]
pub struct ExperimentsArgs {
    #[command(subcommand)]
    pub command: ExperimentsCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum ExperimentsCommand {
    /// Per-variant results with 95 % intervals and p-values against the control.
    Report {
        /// The experiment's name, as in `[[experiments]]`.
        name: String,
        /// How far back to look, e.g. 24h, 7d; without it, since the experiment's start.
        #[arg(long, value_parser = humantime_serde::re::humantime::parse_duration)]
        since: Option<Duration>,
        /// Print the report as JSON (the `/admin/experiments/NAME` shape).
        #[arg(long)]
        json: bool,
    },
}

/// Run a `sluice experiments` command; returns what to print.
pub async fn experiments_command(
    config: &crate::Config,
    args: ExperimentsArgs,
) -> anyhow::Result<String> {
    match args.command {
        ExperimentsCommand::Report { name, since, json } => {
            let Some(experiment) = config.experiments.iter().find(|e| e.name == name) else {
                let known: Vec<&str> = config.experiments.iter().map(|e| e.name.as_str()).collect();
                anyhow::bail!(
                    "no experiment `{name}` is configured (known: {})",
                    if known.is_empty() {
                        "none; pass --config with [[experiments]]".to_string()
                    } else {
                        known.join(", ")
                    }
                );
            };
            let store = Store::open(&config.storage.target).await?;
            let report = report_from(&store, experiment, since, now_ms()).await;
            store.close().await;
            let report = report?;
            Ok(if json {
                serde_json::to_string_pretty(&report)?
            } else {
                render_table(&report)
            })
        }
    }
}
