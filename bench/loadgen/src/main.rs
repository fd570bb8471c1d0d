//! `loadgen`: drive an OpenAI-style `/v1/chat/completions` endpoint with closed-loop or
//! open-loop fixed-rate load and report latency percentiles. See `bench/README.md`.

mod client;
mod run;
mod stats;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use serde_json::json;

use crate::client::Target;
use crate::stats::{Meta, Stats};

#[derive(Parser, Debug)]
#[command(
    name = "loadgen",
    about = "Closed-loop or fixed-rate load against /v1/chat/completions"
)]
struct Cli {
    /// Full URL of the chat completions endpoint (plain http only).
    #[arg(long, default_value = "http://127.0.0.1:8484/v1/chat/completions")]
    url: String,
    /// Open loop: send this many requests per second on a fixed schedule, regardless
    /// of completions. Without it the run is closed-loop over --connections.
    #[arg(long)]
    rate: Option<f64>,
    /// Closed loop: number of keep-alive connections, each with one request in flight.
    #[arg(long, short = 'c', default_value_t = 1)]
    connections: usize,
    /// Open loop: most connections (and so requests in flight) at once.
    #[arg(long, default_value_t = 256)]
    max_connections: usize,
    /// Length of the recorded window.
    #[arg(long, short = 'd', value_parser = humantime::parse_duration, default_value = "10s")]
    duration: Duration,
    /// Unrecorded warm-up before the window.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    warmup: Duration,
    /// Ask for a streamed (SSE) answer; also reports time to first byte.
    #[arg(long)]
    stream: bool,
    /// Print one JSON line instead of the table.
    #[arg(long)]
    json: bool,
    /// A name for this run, echoed in the output.
    #[arg(long, default_value = "")]
    label: String,
    #[arg(long, default_value = "gpt-4o-mini")]
    model: String,
    /// The user message.
    #[arg(long, default_value = "Say hello in one short sentence.")]
    prompt: String,
    /// Sent as `Authorization: Bearer <key>` when set.
    #[arg(long, env = "LOADGEN_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Give up on a request (and count an error) after this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    timeout: Duration,
    /// Worker threads of the generator's runtime.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Exit non-zero above this fraction of errors (non-2xx or transport failures).
    #[arg(long, default_value_t = 0.01)]
    max_error_rate: f64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadgen: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(cli.connections > 0, "--connections must be at least 1");
    anyhow::ensure!(
        cli.max_connections > 0,
        "--max-connections must be at least 1"
    );
    anyhow::ensure!(!cli.duration.is_zero(), "--duration must be more than zero");
    let mut body = json!({
        "model": cli.model,
        "messages": [{"role": "user", "content": cli.prompt}],
    });
    if cli.stream {
        body["stream"] = json!(true);
    }
    let body = Bytes::from(serde_json::to_vec(&body)?);
    let target = Arc::new(Target::new(
        &cli.url,
        body,
        cli.api_key.as_deref(),
        cli.timeout,
    )?);
    let stats = Arc::new(Stats::new()?);

    let ran = match cli.rate {
        Some(rate) => {
            run::open_loop(
                target,
                rate,
                cli.max_connections,
                cli.warmup,
                cli.duration,
                stats.clone(),
            )
            .await?
        }
        None => {
            run::closed_loop(
                target,
                cli.connections,
                cli.warmup,
                cli.duration,
                stats.clone(),
            )
            .await?
        }
    };
    let meta = Meta {
        label: cli.label,
        url: cli.url,
        mode: if cli.rate.is_some() { "open" } else { "closed" },
        rate: cli.rate,
        connections: if cli.rate.is_some() {
            cli.max_connections
        } else {
            cli.connections
        },
        connections_opened: ran.connections_opened,
        stream: cli.stream,
    };
    let summary = stats.summary(meta, ran.window_start, ran.window);
    stats::emit(&summary, cli.json)?;
    if summary.error_rate > cli.max_error_rate {
        eprintln!(
            "loadgen: error rate {:.3}% is above the {:.3}% limit",
            summary.error_rate * 100.0,
            cli.max_error_rate * 100.0
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
