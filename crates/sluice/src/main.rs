//! The `sluice` command: parse the command line, boot, and hand off to the libraries.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

mod progress;
use sluice_gateway::admin::KeysArgs;
use sluice_gateway::config::{Config, SystemEnv};
use sluice_gateway::experiments::ExperimentsArgs;
use sluice_gateway::prompts::runner::{self, Mode, Options};
use sluice_gateway::stats::GroupBy;
use sluice_gateway::telemetry::init_logging;

// mimalloc over glibc malloc: the request path allocates many small, short-lived
// buffers (headers, JSON, records); glibc's malloc/free were ~7% of the gateway's CPU
// in a profile at one connection (bench/RESULTS.md, Run 6). Built with `no_thp`: with
// transparent huge pages mimalloc committed a 20 MiB huge-page arena at start, most of
// the idle RSS (38 MiB with, 21 MiB without; bench/RESULTS.md, Run 7).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "sluice", version, about = "A production gateway for LLM APIs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (zero-config defaults when no --config is given).
    Serve {
        /// A sluice.toml; without it the embedded default runs.
        #[arg(long, short, env = "SLUICE_CONFIG")]
        config: Option<PathBuf>,
        /// Address to listen on (overrides the config and SLUICE_LISTEN).
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Run the simulated OpenAI/Anthropic upstream.
    Mock(sluice_sim::MockArgs),
    /// Latency percentiles, tokens, cost and what cache hits saved, error rates, cache,
    /// feedback and regeneration rate, from the request log.
    Stats {
        /// The gateway's config (for `[storage]`); without it, ./sluice.db.
        #[arg(long, short, env = "SLUICE_CONFIG")]
        config: Option<PathBuf>,
        /// How far back to look, e.g. 30m, 24h, 7d.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        since: Duration,
        /// Group by model, feature, end user, or hour of day (UTC).
        #[arg(long, value_enum, default_value_t = GroupBy::None)]
        by: GroupBy,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Validate the config and prompt files (every problem, with file and line); keep
    /// prompts.lock. Exits non-zero on any error.
    Check {
        #[arg(long, short, env = "SLUICE_CONFIG", default_value = "sluice.toml")]
        config: PathBuf,
        /// Lock prompt versions that are not in prompts.lock yet.
        #[arg(long)]
        update_lock: bool,
    },
    /// Prompt files: run their test cases.
    Prompts {
        #[command(subcommand)]
        command: PromptsCommand,
    },
    /// Virtual keys: create (printed once, stored hashed), list, revoke.
    Keys {
        /// The gateway's config (for `[storage]` and `[[tiers]]`); without it, ./sluice.db.
        #[arg(long, short, global = true, env = "SLUICE_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        args: KeysArgs,
    },
    /// A/B experiments: `report NAME [--since 7d] [--json]`.
    Experiments {
        /// The gateway's config (for `[[experiments]]` and `[storage]`).
        #[arg(long, short, global = true, env = "SLUICE_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        args: ExperimentsArgs,
    },
}

#[derive(Subcommand)]
enum PromptsCommand {
    /// Run every test case through the gateway's pipeline; non-zero exit on a failure.
    Test {
        #[arg(long, short, env = "SLUICE_CONFIG", default_value = "sluice.toml")]
        config: PathBuf,
        /// One prompt (`ID`) or version (`ID@VERSION`, `ID@LABEL`).
        #[arg(long)]
        prompt: Option<String>,
        /// Run each case N times and report the pass rate.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
        repeat: u32,
        /// Save the answers to a cassette next to each prompt file.
        #[arg(long, conflicts_with = "replay")]
        record: bool,
        /// Answer from the cassettes: no upstream calls, deterministic.
        #[arg(long)]
        replay: bool,
        /// Also write a JUnit XML report here.
        #[arg(long)]
        junit: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sluice: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Check {
                config,
                update_lock,
            } => {
                let (report, _) = sluice_gateway::check::run(&config, &SystemEnv, update_lock);
                print(&report.to_string());
                if report.ok() {
                    Ok(())
                } else {
                    Err(anyhow::anyhow!("check failed"))
                }
            }
            Command::Prompts {
                command:
                    PromptsCommand::Test {
                        config,
                        prompt,
                        repeat,
                        record,
                        replay,
                        junit,
                    },
            } => {
                let mode = match (record, replay) {
                    (true, _) => Mode::Record,
                    (_, true) => Mode::Replay,
                    _ => Mode::Live,
                };
                let options = Options {
                    prompt,
                    repeat,
                    mode,
                };
                let started = async {
                    let config = Config::load(&config, &SystemEnv)?;
                    init_logging_quiet(&config);
                    let mut progress = progress::for_terminal();
                    runner::run(config, &options, progress.as_mut()).await
                };
                let report = match started.await {
                    Ok(r) => r,
                    Err(e) => {
                        // CI reads the JUnit file: a run that could not start (a bad
                        // config, an unknown --prompt) says why there too.
                        if let Some(path) = &junit {
                            let failed = runner::TestReport {
                                problems: vec![format!("{e:#}")],
                                ..runner::TestReport::default()
                            };
                            std::fs::write(path, failed.junit()?)?;
                        }
                        return Err(e);
                    }
                };
                print(report.text().trim_end());
                if let Some(path) = junit {
                    std::fs::write(&path, report.junit()?)?;
                }
                if report.passed() {
                    Ok(())
                } else {
                    Err(anyhow::anyhow!("prompt tests failed"))
                }
            }
            Command::Serve { config, listen } => serve(config, listen).await,
            Command::Mock(args) => {
                init_logging(&Default::default());
                sluice_sim::server::run(args).await
            }
            Command::Stats {
                config,
                since,
                by,
                json,
            } => {
                let config = load(config.as_deref())?;
                let out = sluice_gateway::stats::report(&config, since, by, json).await?;
                print(&out);
                Ok(())
            }
            Command::Keys { config, args } => {
                let config = load(config.as_deref())?;
                let out = sluice_gateway::admin::keys_command(&config, args).await?;
                print(&out);
                Ok(())
            }
            Command::Experiments { config, args } => {
                let config = load(config.as_deref())?;
                let out = sluice_gateway::experiments::experiments_command(&config, args).await?;
                print(&out);
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A command's output (a report, a new key) goes to stdout; logs and errors to stderr.
#[expect(clippy::print_stdout, reason = "this is the commands' output")]
fn print(out: &str) {
    println!("{out}");
}

fn load(path: Option<&Path>) -> anyhow::Result<Config> {
    Ok(match path {
        Some(p) => Config::load(p, &SystemEnv)?,
        None => Config::embedded_default(&SystemEnv)?,
    })
}

async fn serve(path: Option<PathBuf>, listen: Option<SocketAddr>) -> anyhow::Result<()> {
    let config = load(path.as_deref())?;
    init_logging(&config.telemetry);
    let listen = listen.unwrap_or(config.server.listen);
    sluice_gateway::server::serve(config, listen).await
}

/// Test runs log only warnings and errors: the report is the output.
fn init_logging_quiet(config: &Config) {
    let mut telemetry = config.telemetry.clone();
    if telemetry.log_level == "info" {
        telemetry.log_level = "warn".into();
    }
    init_logging(&telemetry);
}
