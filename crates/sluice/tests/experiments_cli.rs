//! Black-box: two `sluice serve` processes on one config put every end user in the same
//! variant, and so does a restarted one; `sluice experiments report` reads the request
//! log they wrote, as a table and as the JSON the dashboard reads.

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly by design")]

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use common::{Proc, spawn, write_temp};
use serde_json::{Value, json};

fn config() -> std::path::PathBuf {
    let db = common::fresh_dir().join("log.db");
    write_temp(
        &format!("experiments-{}.toml", std::process::id()),
        &format!(
            r#"
[storage]
path = "{}"
flush_interval = "10ms"

[[providers]]
name = "sim"
kind = "sim"
[[models]]
name = "gpt-4o-mini"
provider = "sim"
[[models]]
name = "gpt-4o"
provider = "sim"

[[experiments]]
name = "model-ab"
target = "model"
match = {{ model = "gpt-4o-mini" }}
variants = [
  {{ name = "a", weight = 50, model = "gpt-4o-mini" }},
  {{ name = "b", weight = 50, model = "gpt-4o" }},
]
"#,
            db.display()
        ),
    )
}

fn serve(config: &std::path::Path) -> Proc {
    spawn(
        &[
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    )
}

/// The variant each user gets from `gateway`, by `x-sluice-experiment`.
async fn variants(gateway: &Proc, users: &[String]) -> BTreeMap<String, String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::new();
    let mut out = BTreeMap::new();
    for user in users {
        let r = client
            .post(format!("http://{}/v1/chat/completions", gateway.addr))
            .json(&json!({"model": "gpt-4o-mini", "user": user,
                          "messages": [{"role": "user", "content": "hello"}]}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        let header = r.headers()["x-sluice-experiment"].to_str().unwrap();
        out.insert(user.clone(), header.to_string());
    }
    out
}

async fn stop(mut p: Proc) {
    let pid = p.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    for _ in 0..300 {
        if p.child.try_wait().unwrap().is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("sluice serve did not stop within 30 s of SIGTERM");
}

fn report(config: &std::path::Path, json: bool) -> String {
    let mut args = vec![
        "experiments",
        "report",
        "model-ab",
        "--config",
        config.to_str().unwrap(),
    ];
    if json {
        args.push("--json");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(&args)
        .current_dir(common::fresh_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn instances_and_restarts_agree_and_the_report_reads_their_log() {
    let config = config();
    let users: Vec<String> = (0..20).map(|i| format!("user-{i}")).collect();
    let one = serve(&config);
    let two = serve(&config);
    let first = variants(&one, &users).await;
    assert_eq!(
        first,
        variants(&two, &users).await,
        "two instances disagree"
    );
    assert!(first.values().any(|v| v == "model-ab=a"));
    assert!(first.values().any(|v| v == "model-ab=b"));
    stop(one).await;
    let restarted = serve(&config);
    assert_eq!(
        first,
        variants(&restarted, &users).await,
        "a restart moved users"
    );
    stop(two).await;
    stop(restarted).await;

    let parsed: Value = serde_json::from_str(&report(&config, true)).unwrap();
    assert_eq!(parsed["name"], "model-ab");
    let total: u64 = parsed["variants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 60, "three rounds of 20 users: {parsed}");
    let a_users = first.values().filter(|v| *v == "model-ab=a").count() as u64;
    assert_eq!(parsed["variants"][0]["users"].as_u64().unwrap(), a_users);
    assert_eq!(parsed["srm"]["observed"]["a"].as_u64().unwrap(), a_users);

    let table = report(&config, false);
    assert!(table.starts_with("experiment model-ab (active"), "{table}");
    assert!(table.contains("verdict: "), "{table}");
    assert!(table.contains("latency_mean_ms"), "{table}");

    let unknown = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "experiments",
            "report",
            "nope",
            "--config",
            config.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr)
            .contains("no experiment `nope` is configured (known: model-ab)")
    );
}
