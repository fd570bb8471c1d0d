//! The `sluice` command: parse the command line, boot, and hand off to the libraries.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sluice_gateway::config::{Config, SystemEnv};
use sluice_gateway::telemetry::init_logging;

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
            Command::Serve { config, listen } => serve(config, listen).await,
            Command::Mock(args) => {
                init_logging(&Default::default());
                sluice_sim::server::run(args).await
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

async fn serve(path: Option<PathBuf>, listen: Option<SocketAddr>) -> anyhow::Result<()> {
    let config = match &path {
        Some(p) => Config::load(p, &SystemEnv)?,
        None => Config::embedded_default(&SystemEnv)?,
    };
    init_logging(&config.telemetry);
    let listen = listen.unwrap_or(config.server.listen);
    sluice_gateway::server::serve(config, listen).await
}
