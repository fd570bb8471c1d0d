//! Black-box tests of the `sluice` command line: the embedded default, refusing to run
//! keyless on a public address, and config errors reported all at once.

mod common;

use std::process::Command;

use common::{http, spawn, write_temp};

#[test]
fn embedded_default_answers_without_any_api_key() {
    let gw = spawn(&["serve", "--listen", "127.0.0.1:0"], &[]);
    let (status, body) = http(
        &gw.addr,
        "POST",
        "/v1/chat/completions",
        r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#,
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Simulated reply"), "{body}");
    let (status, body) = http(&gw.addr, "GET", "/v1/models", "");
    assert_eq!(status, 200);
    for m in ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"] {
        assert!(body.contains(m), "{m} missing from {body}");
    }
    let (status, _) = http(&gw.addr, "GET", "/healthz", "");
    assert_eq!(status, 200);
}

#[test]
fn master_key_from_the_environment_turns_auth_on() {
    let gw = spawn(
        &["serve", "--listen", "127.0.0.1:0"],
        &[("SLUICE_MASTER_KEY", "mk")],
    );
    let (status, body) = http(&gw.addr, "GET", "/v1/models", "");
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("invalid_api_key"));
}

#[test]
fn keyless_refuses_a_public_address() {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--listen", "0.0.0.0:0"])
        .env_remove("SLUICE_MASTER_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refusing to listen on 0.0.0.0:0 without a key"),
        "{stderr}"
    );
}

#[test]
fn config_problems_are_reported_together() {
    let path = write_temp(
        "broken.toml",
        r#"
[server]
listen = "not-an-address"

[[providers]]
name = "x"
kind = "openai"
api_key = "${SLUICE_TEST_SURELY_UNSET}"

[[models]]
name = "m"
provider = "missing"
fallbacks = ["ghost"]
"#,
    );
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "providers[0].api_key: environment variable SLUICE_TEST_SURELY_UNSET is not set",
        "server.listen",
        "models[0].provider: no provider named `missing`",
        "models[0].fallbacks[0]: no model named `ghost`",
        "4 problem(s)",
    ] {
        assert!(
            stderr.contains(needle),
            "`{needle}` missing from:\n{stderr}"
        );
    }
}

#[test]
fn check_prints_the_resolved_routing_table() {
    let path = write_temp(
        &format!("routing-{}.toml", common::unique()),
        r#"
[[providers]]
name = "sim"
kind = "sim"
[[models]]
name = "cheap"
provider = "sim"
upstream = "gpt-4o-mini"
[[models]]
name = "strong"
provider = "sim"
upstream = "gpt-4o"

[routing]
default = "cheap"
defaults = [{ feature = "research", model = "strong" }]
[[routing.rules]]
name = "long-input"
input_tokens_over = 200
model = "strong"
[[routing.rules]]
name = "asked"
quality = "high"
model = "strong"
"#,
    );
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rules = [
        "routing: requests for model `auto`",
        "1. long-input: input tokens > 200 -> strong",
        "2. asked: x-sluice-quality: high -> strong",
        "feature = research -> strong",
        "otherwise -> cheap",
    ];
    let mut from = 0;
    for line in rules {
        let at = stdout[from..]
            .find(line)
            .unwrap_or_else(|| panic!("`{line}` missing (or out of order) in:\n{stdout}"));
        from += at + line.len();
    }
}
