//! Black-box: the `sluice` binary on a random port with an inline config, `sluice mock`
//! as its upstream, driven by the official OpenAI Python SDK in a virtualenv this test
//! makes (pip needs the PyPI registry the first time; later runs reuse the venv).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{spawn, write_temp};

const OPENAI_SDK: &str = "openai>=1.40,<3";

fn python() -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("openai-sdk-venv");
    let py = venv.join("bin/python");
    let ready = py.exists()
        && Command::new(&py)
            .args(["-c", "import openai"])
            .status()
            .is_ok_and(|s| s.success());
    if !ready {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status();
        assert!(
            made.is_ok_and(|s| s.success()),
            "cannot create a virtualenv: python3 with the venv module is required for this test"
        );
        let pip = Command::new(&py)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                OPENAI_SDK,
            ])
            .status();
        assert!(
            pip.is_ok_and(|s| s.success()),
            "pip could not install the OpenAI SDK ({OPENAI_SDK}); PyPI must be reachable"
        );
    }
    py
}

#[test]
fn official_openai_python_sdk_works_against_sluice() {
    let py = python();
    let mock = spawn(&["mock", "--listen", "127.0.0.1:0"], &[]);
    let limited = spawn(
        &[
            "mock",
            "--listen",
            "127.0.0.1:0",
            "--fail-first",
            "1000000",
            "--fail-status",
            "429",
            "--retry-after",
            "90s",
        ],
        &[],
    );
    let config = write_temp(
        "sdk.toml",
        &format!(
            r#"
[server]
master_key = "${{TEST_MASTER_KEY}}"

[retry]
base_delay = "5ms"
# The limited upstream asks for 90 s: longer than this, so the gateway answers 429 at once.
max_retry_after = "10s"

[[providers]]
name = "mock"
kind = "openai"
base_url = "http://{}/v1"
api_key = "sk-mock"

[[providers]]
name = "limited"
kind = "openai"
base_url = "http://{}/v1"

[[models]]
name = "gpt-4o-mini"
provider = "mock"

[[models]]
name = "text-embedding-3-small"
provider = "mock"

[[models]]
name = "limited"
provider = "limited"
upstream = "gpt-4o-mini"
"#,
            mock.addr, limited.addr
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
        &[("TEST_MASTER_KEY", "sk-sluice-test")],
    );
    let out = Command::new(&py)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/openai_sdk_check.py"))
        .env("SLUICE_URL", format!("http://{}/v1", gateway.addr))
        .env("SLUICE_KEY", "sk-sluice-test")
        .output()
        .expect("run the SDK script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "SDK checks failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("10 passed, 0 failed"), "{stdout}");

    // Every LLM request the script made left exactly one structured record line.
    let (records, lines) = collect_records(&gateway, 11);
    for secret in ["sk-sluice-test", "sk-mock"] {
        for line in gateway.startup.iter().chain(&lines) {
            assert!(!line.contains(secret), "a secret reached the log: {line}");
        }
    }
    assert_eq!(records.len(), 11, "{records:#?}");
    let tagged = records
        .iter()
        .find(|r| r["user"] == "sdk-user")
        .expect("the record of the tagged request");
    assert_eq!(tagged["feature"], "sdk-test");
    assert_eq!(tagged["outcome"], "ok");
    let outcomes: Vec<&str> = records
        .iter()
        .filter_map(|r| r["outcome"].as_str())
        .collect();
    assert_eq!(
        outcomes.iter().filter(|o| **o == "rejected_input").count(),
        2,
        "{outcomes:?}"
    );
    assert_eq!(
        outcomes.iter().filter(|o| **o == "api_error").count(),
        1,
        "{outcomes:?}"
    );
}

/// Read log lines until `want` `ai_request_complete` records arrived, then briefly
/// check for extras. Returns the records and every line read.
fn collect_records(p: &common::Proc, want: usize) -> (Vec<serde_json::Value>, Vec<String>) {
    let mut records = Vec::new();
    let mut lines = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        let wait = if records.len() >= want {
            std::time::Duration::from_millis(300)
        } else {
            deadline.saturating_duration_since(std::time::Instant::now())
        };
        match p.log.recv_timeout(wait) {
            Ok(line) => {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && v["event"] == "ai_request_complete"
                {
                    records.push(v);
                }
                lines.push(line);
            }
            Err(_) => break,
        }
    }
    (records, lines)
}
