//! Black-box: the real binary writes exactly one request-log row per response, on both
//! backends, including streams cut mid-way and clients that hang up; `sluice stats`
//! reads it back exactly; SIGTERM during load loses nothing that was accepted.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers fail loudly by design"
)]

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Proc, spawn, write_temp};
use serde_json::{Value, json};
use sqlx::Row;

fn database_url() -> String {
    std::env::var("SLUICE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// `[storage]` for a fresh SQLite file or a fresh PostgreSQL schema, and a URL to read it.
fn storage(backend: &str) -> (String, String) {
    let unique = common::unique();
    match backend {
        "sqlite" => {
            let path = common::fresh_dir().join("log.db");
            (
                format!("[storage]\npath = \"{}\"\n", path.display()),
                format!("sqlite://{}", path.display()),
            )
        }
        _ => {
            let schema = format!("sluice_bb_{unique}");
            let url = database_url();
            (
                format!("[storage]\nurl = \"{url}\"\nschema = \"{schema}\"\n"),
                format!("{url}?options=-csearch_path%3D{schema}"),
            )
        }
    }
}

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

struct Setup {
    gateway: Proc,
    config: std::path::PathBuf,
    db_url: String,
    _mocks: Vec<Proc>,
}

fn setup(backend: &str, grace: &str) -> Setup {
    let ok = spawn(&["mock", "--listen", "127.0.0.1:0"], &[]);
    let cutter = spawn(
        &["mock", "--listen", "127.0.0.1:0", "--cut-after", "3"],
        &[],
    );
    let slow = spawn(
        &["mock", "--listen", "127.0.0.1:0", "--tokens-per-sec", "40"],
        &[],
    );
    let (storage, db_url) = storage(backend);
    let config = write_temp(
        &format!(
            "log-{backend}-{}.toml",
            common::fresh_dir().display().to_string().replace('/', "_")
        ),
        &format!(
            r#"
[server]
shutdown_grace = "{grace}"
[retry]
base_delay = "1ms"
{storage}
[telemetry]
# The start-up line stays (the test reads the address from it); record lines go.
log_level = "info,sluice::record=warn"
[[providers]]
name = "ok"
kind = "openai"
base_url = "http://{}/v1"
[[providers]]
name = "cutter"
kind = "openai"
base_url = "http://{}/v1"
[[providers]]
name = "slow"
kind = "openai"
base_url = "http://{}/v1"
[[models]]
name = "gpt-4o-mini"
provider = "ok"
[[models]]
name = "text-embedding-3-small"
provider = "ok"
[[models]]
name = "cutter"
provider = "cutter"
[[models]]
name = "slow"
provider = "slow"
"#,
            ok.addr, cutter.addr, slow.addr
        ),
    );
    let gateway = spawn(
        &[
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    Setup {
        gateway,
        config,
        db_url,
        _mocks: vec![ok, cutter, slow],
    }
}

fn sigterm(p: &Proc) {
    let pid = p.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
}

/// Wait for the gateway to exit cleanly after SIGTERM.
async fn wait_exit(p: &mut Proc) {
    for _ in 0..600 {
        if let Some(status) = p.child.try_wait().unwrap() {
            assert!(status.success(), "gateway exited with {status}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("gateway did not exit within 60 s of SIGTERM");
}

fn stats(config: &std::path::Path) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "stats",
            "--config",
            config.to_str().unwrap(),
            "--since",
            "1h",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn stored_latencies(db_url: &str) -> Vec<f64> {
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(db_url).await.unwrap();
    let rows = sqlx::query("SELECT latency_ms FROM requests")
        .fetch_all(&pool)
        .await
        .unwrap();
    pool.close().await;
    rows.iter().map(|r| r.get::<f64, _>("latency_ms")).collect()
}

fn nearest_rank(sorted: &[f64], p: f64) -> f64 {
    sorted[((p / 100.0 * sorted.len() as f64).ceil() as usize).max(1) - 1]
}

async fn workload(base: &str) -> (usize, usize, usize) {
    let http = client();
    let chat = |model: &str, stream: bool| json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hello log"}]});
    let mut responses = 0;
    for i in 0..12 {
        let r = http
            .post(format!("{base}/v1/chat/completions"))
            .json(&chat("gpt-4o-mini", i % 3 == 0))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap();
        assert!(text.contains("Simulated"));
        responses += 1;
    }
    for _ in 0..3 {
        let r = http
            .post(format!("{base}/v1/embeddings"))
            .json(&json!({"model": "text-embedding-3-small", "input": ["a", "b"]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        responses += 1;
    }
    for body in [
        json!({"model": "gpt-4o-mini", "messages": []}),
        json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
    ] {
        let r = http
            .post(format!("{base}/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_client_error());
        responses += 1;
    }
    let cut = 4;
    for _ in 0..cut {
        let r = http
            .post(format!("{base}/v1/chat/completions"))
            .json(&chat("cutter", true))
            .send()
            .await
            .unwrap();
        let text = r.text().await.unwrap();
        assert!(
            text.contains("stream_interrupted") && !text.contains("[DONE]"),
            "{text}"
        );
        responses += 1;
    }
    let hangups = 3;
    for _ in 0..hangups {
        let mut r = http
            .post(format!("{base}/v1/chat/completions"))
            .json(&chat("slow", true))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.chunk().await.unwrap().expect("a first chunk");
        drop(r); // hang up mid-stream
        responses += 1;
    }
    (responses, cut, hangups)
}

#[tokio::test]
async fn one_row_per_response_on_both_backends_and_stats_read_it_exactly() {
    for backend in ["sqlite", "postgres"] {
        let mut s = setup(backend, "30s");
        let base = format!("http://{}", s.gateway.addr);
        let (responses, cut, hangups) = workload(&base).await;
        // Give the hang-ups a moment to be noticed, then stop: the drain flushes the log.
        tokio::time::sleep(Duration::from_millis(300)).await;
        sigterm(&s.gateway);
        wait_exit(&mut s.gateway).await;

        let report = stats(&s.config);
        let all = &report["groups"][0];
        assert_eq!(
            all["requests"].as_u64().unwrap() as usize,
            responses,
            "{backend}: {report}"
        );
        assert_eq!(
            all["outcomes"]["client_cancelled"], hangups,
            "{backend}: {report}"
        );
        assert_eq!(all["outcomes"]["api_error"], cut, "{backend}: {report}");
        assert_eq!(all["outcomes"]["rejected_input"], 2, "{backend}: {report}");

        let mut latencies = stored_latencies(&s.db_url).await;
        assert_eq!(latencies.len(), responses, "{backend}");
        latencies.sort_by(f64::total_cmp);
        for (key, p) in [("p50", 50.0), ("p95", 95.0), ("p99", 99.0)] {
            assert_eq!(
                all["latency_ms"][key].as_f64().unwrap(),
                nearest_rank(&latencies, p),
                "{backend} {key}"
            );
        }
        let by_model = stats_by(&s.config, "model");
        let groups: Vec<&str> = by_model["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["group"].as_str().unwrap())
            .collect();
        assert!(
            groups.contains(&"cutter") && groups.contains(&"gpt-4o-mini"),
            "{groups:?}"
        );
    }
}

fn stats_by(config: &std::path::Path, by: &str) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "stats",
            "--config",
            config.to_str().unwrap(),
            "--by",
            by,
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn sigterm_during_load_loses_nothing_accepted() {
    let mut s = setup("sqlite", "20s");
    let base = Arc::new(format!("http://{}", s.gateway.addr));
    let answered = Arc::new(AtomicUsize::new(0));
    // Streams that were running when SIGTERM came and still ran to [DONE].
    let drained_streams = Arc::new(AtomicUsize::new(0));
    let terminated = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..16 {
        let (base, answered, drained, terminated) = (
            base.clone(),
            answered.clone(),
            drained_streams.clone(),
            terminated.clone(),
        );
        workers.push(tokio::spawn(async move {
            let http = client();
            // Keep sending until the gateway stops accepting (bounded, in case it never does).
            let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
            for i in 0.. {
                if tokio::time::Instant::now() > give_up {
                    break;
                }
                let stream = (w + i) % 4 == 0;
                let model = if stream { "slow" } else { "gpt-4o-mini" };
                let body = json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": format!("w{w} i{i}")}]});
                let started_before_sigterm = !terminated.load(Ordering::SeqCst);
                let r = match http.post(format!("{base}/v1/chat/completions")).json(&body).send().await {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("worker {w} stops after {i} requests: {e:?}");
                        break;
                    }
                };
                // A status line means the gateway accepted the request: it must be logged.
                answered.fetch_add(1, Ordering::SeqCst);
                let text = r.text().await.unwrap_or_default();
                if stream
                    && started_before_sigterm
                    && terminated.load(Ordering::SeqCst)
                    && text.ends_with("data: [DONE]\n\n")
                {
                    drained.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    // SIGTERM once the load is well under way.
    for _ in 0..200 {
        if answered.load(Ordering::SeqCst) >= 48 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "{} requests answered before SIGTERM",
        answered.load(Ordering::SeqCst)
    );
    terminated.store(true, Ordering::SeqCst);
    sigterm(&s.gateway);
    for w in workers {
        w.await.unwrap();
    }
    wait_exit(&mut s.gateway).await;
    let total = answered.load(Ordering::SeqCst);
    let log: Vec<String> = s
        .gateway
        .log
        .try_iter()
        .filter(|l| !l.contains("ai_request_complete"))
        .collect();
    eprintln!("gateway said:\n{}", log.join("\n"));
    assert!(
        drained_streams.load(Ordering::SeqCst) > 0,
        "streams in flight at SIGTERM ran to [DONE]"
    );
    let report = stats(&s.config);
    assert_eq!(
        report["groups"][0]["requests"].as_u64().unwrap() as usize,
        total,
        "{report}"
    );
}
