//! The dashboard in a real browser: the `sluice` binary on a SQLite log seeded with
//! 100,000 records plus a scripted workload (chats, streams, upstream errors, a bad
//! input, a budget that blocks, cache hits, feedback), then headless Chromium (Debian's
//! `chromium`, driven by playwright-core from npm) logs in, checks every panel, filters
//! the requests table, opens a record, and saves a screenshot to
//! `target/test-artifacts/dashboard.png`. The page's load time with 100k records is
//! printed, not asserted. Also: `/admin/stats` equals `sluice stats --json`.

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly by design")]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{spawn, write_temp};
use serde_json::{Value, json};
use sluice_gateway::store::{StorageTarget, Store};
use sluice_gateway::telemetry::{Endpoint, Outcome, RequestRecord};

const ADMIN: &str = "sk-dashboard-admin-0123456789";
const CHROMIUM: &str = "/usr/bin/chromium";
const SEEDED: usize = 100_000;

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// 100k records between 23 and 2 hours ago (so the last hour holds only the scripted
/// workload, and the default 24 h view all of them), in batches through the store's own
/// insert.
async fn seed(path: &Path) -> Duration {
    let started = Instant::now();
    let store = Store::open(&StorageTarget::Sqlite(path.to_path_buf()))
        .await
        .unwrap();
    let now = now_ms();
    let models = ["gpt-4o-mini", "gpt-4o"];
    let features = ["bulk-a", "bulk-b", "bulk-c"];
    let mut batch = Vec::with_capacity(1000);
    for i in 0..SEEDED {
        let n = i as u64;
        let outcome = match i % 50 {
            0 => Outcome::ApiError,
            1 => Outcome::RateLimited,
            _ => Outcome::Ok,
        };
        batch.push(RequestRecord {
            request_id: format!("seed_{i:06}"),
            started_at_ms: now - 7_200_000 - (n * 75_600_000 / SEEDED as u64),
            endpoint: Endpoint::ChatCompletions,
            stream: i % 3 == 0,
            key_id: Some("master".into()),
            owner: Some("master".into()),
            user: Some(format!("seed-user-{:03}", i % 500)),
            feature: Some(features[i % 3].into()),
            model_requested: Some(models[i % 2].into()),
            model: Some(models[i % 2].into()),
            provider: Some("sim".into()),
            outcome,
            status: if outcome == Outcome::Ok { 200 } else { 502 },
            cache_status: Some(if i % 10 == 0 { "hit" } else { "miss" }.into()),
            prompt_tokens: 20 + (i % 40) as u32,
            completion_tokens: 30 + (i % 70) as u32,
            cost_nanos: Some(10_000 + (i % 997) as i64 * 13),
            cost_micros: Some(10),
            latency_ms: 20.0 + (i % 300) as f64,
            ttft_ms: (i % 3 == 0).then_some(8.0 + (i % 50) as f64),
            ..RequestRecord::default()
        });
        if batch.len() == 1000 {
            store.insert(&batch).await.unwrap();
            batch.clear();
        }
    }
    store.insert(&batch).await.unwrap();
    assert_eq!(store.count().await.unwrap(), SEEDED as i64);
    store.close().await;
    started.elapsed()
}

struct Workload {
    /// Requests sent, each leaving one record.
    sent: usize,
    errors: usize,
    checkout: usize,
}

/// Chats, streams, upstream errors, a bad input, a budget that blocks, cache hits and
/// feedback, as an app and its users would send them.
async fn workload(url: &str) -> Workload {
    let c = client();
    let chat = |model: &str, feature: &str, user: &str, text: &str, stream: bool| {
        c.post(format!("{url}/v1/chat/completions"))
            .bearer_auth(ADMIN)
            .header("x-sluice-feature", feature)
            .json(&json!({
                "model": model,
                "user": user,
                "temperature": 0,
                "stream": stream,
                "messages": [{"role": "user", "content": text}],
            }))
            .send()
    };
    let mut ids = Vec::new();
    let mut checkout = 0;
    for i in 0..6 {
        let user = ["alice", "bob", "carol"][i % 3];
        let r = chat(
            "gpt-4o-mini",
            "checkout",
            user,
            &format!("order {i}"),
            false,
        )
        .await
        .unwrap();
        assert_eq!(r.status(), 200);
        ids.push(
            r.headers()["x-sluice-request-id"]
                .to_str()
                .unwrap()
                .to_string(),
        );
        checkout += 1;
    }
    for i in 0..3 {
        let r = chat("gpt-4o", "search", "dave", &format!("find {i}"), true)
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let _ = r.text().await.unwrap();
    }
    // Cache hits: the same deterministic request again.
    for _ in 0..3 {
        let r = chat("gpt-4o-mini", "checkout", "alice", "order 0", false)
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-sluice-cache"], "hit");
        checkout += 1;
    }
    // Upstream errors.
    let mut errors = 0;
    for i in 0..2 {
        let r = chat("broken", "search", "erin", &format!("x {i}"), false)
            .await
            .unwrap();
        assert!(r.status().is_server_error(), "{}", r.status());
        errors += 1;
    }
    // A bad input.
    let r = c
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(ADMIN)
        .json(&json!({"model": "gpt-4o-mini", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // A trial user runs into the budget.
    let mut blocked = false;
    let mut trial = 0;
    for i in 0..10 {
        trial += 1;
        let r = chat(
            "gpt-4o-mini",
            "trial",
            "trial-user",
            &format!("try {i} {}", "x ".repeat(200)),
            false,
        )
        .await
        .unwrap();
        if r.status() == 402 || r.status() == 429 {
            blocked = true;
            break;
        }
    }
    assert!(blocked, "the trial budget blocks");
    // Feedback.
    for (id, score) in ids.iter().take(3).zip([1.0, -1.0, 0.5]) {
        let r = c
            .post(format!("{url}/v1/feedback"))
            .bearer_auth(ADMIN)
            .json(&json!({"request_id": id, "score": score}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    Workload {
        sent: checkout + 3 + errors + 1 + trial,
        errors,
        checkout,
    }
}

async fn admin_json(url: &str) -> Value {
    let r = client().get(url).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(r.status(), 200, "{url}");
    r.json().await.unwrap()
}

/// Where `npm ci` installs playwright-core: kept between runs under the target dir, and
/// redone when the committed lock file changes.
fn browser_dir() -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-browser");
    std::fs::create_dir_all(&dir).unwrap();
    let lock = std::fs::read(src.join("package-lock.json")).unwrap();
    let installed = std::fs::read(dir.join("package-lock.json")).ok();
    for f in ["package.json", "package-lock.json", "dashboard.mjs"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    if installed.as_deref() != Some(&lock[..]) || !dir.join("node_modules/playwright-core").exists()
    {
        let out = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run npm ({e}): install Node.js and npm (`apt-get install -y nodejs npm`)")
            });
        assert!(
            out.status.success(),
            "npm ci failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_renders_every_panel_in_chromium() {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: this test drives Debian's Chromium. Install it with `apt-get install -y chromium`."
    );
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.is_ok_and(|o| o.status.success()),
        "node is missing: install Node.js and npm (`apt-get install -y nodejs npm`)"
    );
    let browser = browser_dir();

    let db = common::fresh_dir().join("log.db");
    let took = seed(&db).await;
    eprintln!("seeded {SEEDED} records into SQLite in {took:.2?}");

    let config = write_temp(
        "dashboard.toml",
        &format!(
            r#"
[server]
master_key = "{ADMIN}"
[storage]
path = "{}"
[telemetry]
log_level = "info,sluice::record=warn"
[retry]
max_attempts = 1
[[providers]]
name = "sim"
kind = "sim"
[[providers]]
name = "broken"
kind = "sim"
chaos = {{ fail_first = 1000, fail_status = 500 }}
[[models]]
name = "gpt-4o-mini"
provider = "sim"
[[models]]
name = "gpt-4o"
provider = "sim"
[[models]]
name = "broken"
provider = "broken"
[cache]
enabled = true
[[experiments]]
name = "search-model"
target = "model"
match = {{ model = "gpt-4o", feature = "search" }}
variants = [
  {{ name = "big", weight = 50, model = "gpt-4o" }},
  {{ name = "mini", weight = 50, model = "gpt-4o-mini" }},
]
[budgets]
[[budgets.rules]]
name = "daily-total"
scope = "global"
period = "day"
limit_usd = 50.0
alert_at = [0.5, 0.8]
on_exceeded = "block"
[[budgets.rules]]
name = "trial-users"
scope = "user"
period = "day"
limit_usd = 0.00002
on_exceeded = "block"
match = {{ feature = "trial" }}
"#,
            db.display()
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
    let url = format!("http://{}", gateway.addr);
    let work = workload(&url).await;

    // Every workload record written before the browser looks (read beside the gateway:
    // SQLite in WAL mode).
    let reader = Store::open(&StorageTarget::Sqlite(db.clone()))
        .await
        .unwrap();
    let mut total = 0;
    for _ in 0..600 {
        total = reader.count().await.unwrap();
        if total >= (SEEDED + work.sent) as i64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    reader.close().await;
    assert_eq!(total, (SEEDED + work.sent) as i64, "one record per request");

    // /admin/stats is `sluice stats --json` (the last hour: the workload alone).
    let cli = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "stats",
            "--config",
            config.to_str().unwrap(),
            "--since",
            "1h",
            "--by",
            "feature",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    let cli: Value = serde_json::from_slice(&cli.stdout).unwrap();
    let api = admin_json(&format!("{url}/admin/stats?since=1h&by=feature")).await;
    assert_eq!(api["by"], cli["by"]);
    assert_eq!(api["groups"], cli["groups"]);
    let features: Vec<&str> = api["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["group"].as_str().unwrap())
        .collect();
    assert_eq!(features, ["(none)", "checkout", "search", "trial"]);

    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let screenshot = artifacts.join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    let expect = json!({
        "feature": "checkout",
        "feature_rows": work.checkout,
        "error_rows": work.errors,
        "budget": "trial-users",
        "budget_user": "trial-user",
        "user": "alice",
        "model": "gpt-4o",
        "experiment": "search-model",
    });
    let out = Command::new("node")
        .arg("dashboard.mjs")
        .current_dir(&browser)
        .env("SLUICE_URL", &url)
        .env("SLUICE_ADMIN_KEY", ADMIN)
        .env("SCREENSHOT", &screenshot)
        .env("CHROMIUM", CHROMIUM)
        .env("EXPECT", expect.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result: Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "the browser script printed no result:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(
        out.status.success(),
        "the browser run failed: {}\nchecks passed: {}\nconsole errors: {}\n{}",
        result["error"],
        result["checks"],
        result["console_errors"],
        String::from_utf8_lossy(&out.stderr)
    );
    let mut timing = format!(
        "dashboard page load with {SEEDED} records in SQLite: {} ms (navigation start to every panel drawn, the page's own mark; Playwright noticed at {} ms; {} build)\n",
        result["load_ms"],
        result["noticed_ms"],
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    for r in result["load_requests"].as_array().into_iter().flatten() {
        timing += &format!(
            "  {:<28} started at {:>5} ms, took {:>5} ms\n",
            r["path"].as_str().unwrap_or("?"),
            r["start"],
            r["ms"]
        );
    }
    eprint!("{timing}");
    // Kept beside the screenshot: cargo hides a passing test's output.
    std::fs::write(artifacts.join("dashboard-load.txt"), &timing).unwrap();
    assert!(
        result["experiments_shown"].as_u64().unwrap_or(0) >= 1,
        "experiments panel: {}",
        result["experiments_shown"]
    );
    assert_eq!(result["console_errors"], json!([]));
    assert!(
        result["checks"].as_array().unwrap().len() >= 20,
        "{}",
        result["checks"]
    );
    let png = std::fs::read(&screenshot).expect("the screenshot was saved");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real screenshot"
    );
    eprintln!("screenshot: {}", screenshot.display());
}
