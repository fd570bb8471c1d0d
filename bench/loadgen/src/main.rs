//! `loadgen`: drive an OpenAI-style `/v1/chat/completions` endpoint with closed-loop or
//! open-loop fixed-rate load and report latency percentiles; hold many streams open at
//! once (`--hold`); time a server's start to ready (`loadgen ready`). See
//! `bench/README.md`.

mod client;
mod hold;
mod ready;
mod run;
mod stats;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use serde_json::json;

use crate::client::{Body, Target};
use crate::stats::{Meta, Stats};

#[derive(Parser, Debug)]
#[command(
    name = "loadgen",
    about = "Closed-loop or fixed-rate load against /v1/chat/completions",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
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
    /// Open this many streams at once (each on its own connection), hold them for
    /// --duration after the last one's first byte while reading them as they come, then
    /// close them. Implies --stream; --rate and --connections do not apply.
    #[arg(long, conflicts_with = "rate")]
    hold: Option<usize>,
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
    /// Append ` #RUN-N` (the run's start time and a counter) to the prompt so that no
    /// two requests are the same: every one misses a response cache.
    #[arg(long)]
    unique_prompt: bool,
    /// Sent as the body's `user` (the end user that per-user limits count).
    #[arg(long)]
    user: Option<String>,
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

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Start a server several times and time each start until a URL answers 200.
    Ready(ready::ReadyArgs),
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
    let outcome = match cli.command {
        Some(Command::Ready(args)) => runtime.block_on(ready::run(args)),
        None => runtime.block_on(run(cli)),
    };
    match outcome {
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
    let stream = cli.stream || cli.hold.is_some();
    let prompt = if cli.unique_prompt {
        // The run's start time in the number too, so that two runs against the same
        // gateway never send the same prompt (the second would hit the first's answers).
        let run = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!("{} #{run:x}-{}", cli.prompt, client::NUMBER_MARK)
    } else {
        cli.prompt.clone()
    };
    let mut body = json!({
        "model": cli.model,
        "messages": [{"role": "user", "content": prompt}],
    });
    if stream {
        body["stream"] = json!(true);
    }
    if let Some(user) = &cli.user {
        body["user"] = json!(user);
    }
    let body = Bytes::from(serde_json::to_vec(&body)?);
    let body = if cli.unique_prompt {
        Body::numbered(&body)?
    } else {
        Body::Fixed(body)
    };
    let target = Arc::new(Target::new(
        &cli.url,
        body,
        cli.api_key.as_deref(),
        cli.timeout,
    )?);
    if let Some(streams) = cli.hold {
        anyhow::ensure!(streams > 0, "--hold must be at least 1");
        let report = hold::hold(target, streams, cli.duration).await?;
        let json = report.to_json(&cli.label, &cli.url);
        stats::emit_line(&json, cli.json, &report.text(&cli.label, &cli.url))?;
        return Ok(if report.opened < streams as u64 {
            eprintln!(
                "loadgen: only {} of {streams} streams opened",
                report.opened
            );
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        });
    }
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
        stream,
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
