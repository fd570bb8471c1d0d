//! `loadgen ready`: how long a server takes from spawn to answering 200 on a URL.
//!
//! Each run spawns the command in a fresh empty directory (so whatever it creates on
//! first start, such as a SQLite file, is created every time), polls the URL every
//! millisecond with a plain HTTP/1.1 GET on a new connection, and stops the process once
//! it answers 200. The clock starts just before the spawn.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::stats::emit_line;

#[derive(clap::Args, Debug)]
pub struct ReadyArgs {
    /// The URL that answers 200 once the server is ready (plain http).
    #[arg(long)]
    url: String,
    /// How many starts to time.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Give up on a start after this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    timeout: Duration,
    /// Print one JSON line instead of text.
    #[arg(long)]
    json: bool,
    /// A name for this measurement, echoed in the output.
    #[arg(long, default_value = "")]
    label: String,
    /// The command to start, after `--`.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// Between polls: well under the 100 ms the figure is compared with.
const POLL: Duration = Duration::from_millis(1);

pub async fn run(args: ReadyArgs) -> anyhow::Result<std::process::ExitCode> {
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    let uri: hyper::Uri = args
        .url
        .parse()
        .with_context(|| format!("`{}` is not a URL", args.url))?;
    let authority = uri
        .authority()
        .filter(|a| a.port().is_some())
        .with_context(|| format!("`{}` needs a host and a port", args.url))?
        .to_string();
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let probe = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");

    let mut times = Vec::with_capacity(args.runs);
    for i in 0..args.runs {
        let dir = std::env::temp_dir().join(format!("loadgen-ready-{}-{i}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        // Logs go to a file, not a pipe nobody drains (a full pipe would stall it).
        let log = dir.join("server.log");
        let log_file = std::fs::File::create(&log)?;
        let started = Instant::now();
        let child = Command::new(&args.command[0])
            .args(&args.command[1..])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("cannot start `{}`", args.command[0]))?;
        let mut guard = Running { child, dir };
        let took = wait_ready(&mut guard.child, &authority, &probe, started, args.timeout)
            .await
            .map_err(|e| {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                anyhow::anyhow!("start {}: {e:#}; its log:\n{log}", i + 1)
            });
        drop(guard);
        times.push(took?);
    }
    let mut sorted = times.clone();
    sorted.sort();
    let median = sorted[sorted.len() / 2];
    let ms = |d: &Duration| (d.as_secs_f64() * 10_000.0).round() / 10.0;
    let json = json!({
        "label": args.label,
        "url": args.url,
        "mode": "ready",
        "runs": args.runs,
        "ready_ms": times.iter().map(ms).collect::<Vec<_>>(),
        "median_ms": ms(&median),
        "min_ms": ms(&sorted[0]),
        "max_ms": ms(&sorted[sorted.len() - 1]),
    });
    let text = format!(
        "{} start to ready: median {} ms (min {}, max {}) over {} runs: {:?}\n",
        args.url,
        ms(&median),
        ms(&sorted[0]),
        ms(&sorted[sorted.len() - 1]),
        args.runs,
        times.iter().map(ms).collect::<Vec<_>>(),
    );
    emit_line(&json, args.json, &text)?;
    Ok(std::process::ExitCode::SUCCESS)
}

/// A started server and its directory: killed and removed however the run ends.
struct Running {
    child: Child,
    dir: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn wait_ready(
    child: &mut Child,
    authority: &str,
    probe: &str,
    started: Instant,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("the server exited ({status}) before it was ready");
        }
        if answers_200(authority, probe).await {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            bail!("not ready after {timeout:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn answers_200(authority: &str, probe: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect(authority).await else {
        return false;
    };
    if stream.write_all(probe.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    matches!(
        tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut head)).await,
        Ok(Ok(_))
    ) && head.starts_with(b"HTTP/1.1 200")
}
