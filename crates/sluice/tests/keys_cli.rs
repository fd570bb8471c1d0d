//! Black-box: `sluice keys create|list|revoke` against the store of running `sluice serve`
//! processes. A created key works at once, `list` never shows it, a revoked key is
//! refused by two gateways sharing one PostgreSQL schema within 5 s, and the key string
//! appears in neither gateway's output.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns fail loudly by design"
)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn database_url() -> String {
    std::env::var("SLUICE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A config on `storage`, with two tiers and the simulated provider.
fn config(name: &str, storage: &str) -> PathBuf {
    common::write_temp(
        &format!("keys-{name}-{}.toml", common::unique()),
        &format!(
            r#"
{storage}
[telemetry]
log_format = "json"
log_level = "info"
[[tiers]]
name = "free"
[[tiers]]
name = "pro"
[[providers]]
name = "sim"
kind = "sim"
[[models]]
name = "gpt-4o-mini"
provider = "sim"
"#
        ),
    )
}

/// `sluice ARGS --config CONFIG`, with no `SLUICE_*` from the test's environment.
fn sluice(args: &[&str], config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("SLUICE_MASTER_KEY")
        .env_remove("SLUICE_CONFIG")
        .current_dir(common::fresh_dir())
        .output()
        .unwrap()
}

fn ok_stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "sluice failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// `sluice keys create ... --json`: (id, key).
fn create_json(config: &Path, owner: &str) -> (String, String) {
    let out = ok_stdout(&sluice(
        &[
            "keys", "create", "--owner", owner, "--tier", "pro", "--json",
        ],
        config,
    ));
    let v: Value = serde_json::from_str(&out).unwrap();
    (
        v["id"].as_str().unwrap().to_string(),
        v["key"].as_str().unwrap().to_string(),
    )
}

/// A `sluice serve` whose stdout and stderr go to files, read after it is stopped.
struct Gateway {
    child: Child,
    addr: String,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Gateway {
    fn start(config: &Path) -> Gateway {
        let dir = common::fresh_dir();
        let (stdout, stderr) = (dir.join("stdout"), dir.join("stderr"));
        let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(config)
            .env_remove("SLUICE_MASTER_KEY")
            .env_remove("SLUICE_CONFIG")
            .env_remove("SLUICE_LISTEN")
            .current_dir(&dir)
            .stdout(Stdio::from(std::fs::File::create(&stdout).unwrap()))
            .stderr(Stdio::from(std::fs::File::create(&stderr).unwrap()))
            .spawn()
            .unwrap();
        let mut gw = Gateway {
            child,
            addr: String::new(),
            stdout,
            stderr,
        };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            let log = std::fs::read_to_string(&gw.stderr).unwrap_or_default();
            if let Some(addr) = log.lines().find_map(listening_addr) {
                gw.addr = addr;
                return gw;
            }
            if let Some(status) = gw.child.try_wait().unwrap() {
                panic!("sluice serve exited with {status}:\n{log}");
            }
            nap();
        }
        panic!("sluice serve did not report its address");
    }

    fn models(&self, key: Option<&str>) -> (u16, String) {
        http(&self.addr, "GET", "/v1/models", key, "")
    }

    /// Stop it; everything it wrote to stdout and stderr.
    fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::read_to_string(&self.stdout).unwrap()
            + &std::fs::read_to_string(&self.stderr).unwrap()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Between polls. These tests are synchronous: no runtime worker is blocked.
#[expect(
    clippy::disallowed_methods,
    reason = "a plain thread, outside any runtime"
)]
fn nap() {
    std::thread::sleep(Duration::from_millis(50));
}

/// The address from a "... listening on http://ADDR" log line.
fn listening_addr(line: &str) -> Option<String> {
    let rest = &line[line.find("listening on http://")? + "listening on http://".len()..];
    let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == ':'))?;
    Some(rest[..end].to_string())
}

/// One HTTP/1.1 request over a fresh connection: (status, body).
fn http(addr: &str, method: &str, path: &str, key: Option<&str>, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// No piece of the key (8 characters or more) in `text`.
fn assert_no_key(key: &str, text: &str, what: &str) {
    let random = key.strip_prefix("sk-sluice-").unwrap();
    for start in 0..=random.len() - 8 {
        let piece = &random[start..start + 8];
        assert!(
            !text.contains(piece),
            "{what} holds `{piece}` of the key:\n{text}"
        );
    }
}

/// Poll until every gateway refuses `key`; how long that took.
fn refused_by_all(gateways: &[&Gateway], key: &str) -> Duration {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if gateways.iter().all(|g| g.models(Some(key)).0 == 401) {
            return start.elapsed();
        }
        nap();
    }
    panic!("the revoked key was still accepted after 10 s");
}

#[test]
fn a_created_key_works_at_once_and_list_never_shows_it() {
    let db = common::fresh_dir().join("keys.db");
    let config = config(
        "sqlite",
        &format!("[storage]\npath = \"{}\"\n", db.display()),
    );

    // Created before the gateway starts: accepted from its first request.
    let out = ok_stdout(&sluice(
        &[
            "keys",
            "create",
            "--owner",
            "search-team",
            "--tier",
            "pro",
            "--models",
            "gpt-4o-mini,gpt-4o*",
        ],
        &config,
    ));
    let key = out
        .split_whitespace()
        .find(|w| w.starts_with("sk-sluice-"))
        .unwrap_or_else(|| panic!("no key in:\n{out}"))
        .to_string();
    let id = out
        .split_whitespace()
        .find(|w| w.starts_with("key_"))
        .unwrap_or_else(|| panic!("no id in:\n{out}"))
        .to_string();
    assert_eq!(key.len(), "sk-sluice-".len() + 40, "{out}");
    assert!(out.contains("search-team") && out.contains("pro"), "{out}");
    let gw = Gateway::start(&config);
    assert_eq!(gw.models(Some(&key)).0, 200);
    // Keys exist, so auth is on even without a master key.
    let (status, body) = gw.models(None);
    assert_eq!(status, 401, "{body}");
    let (status, body) = http(
        &gw.addr,
        "POST",
        "/v1/chat/completions",
        Some(&key),
        r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#,
    );
    assert_eq!(status, 200, "{body}");
    // A wrong key's refusal does not echo it.
    let wrong = format!("{}{}", &key[..key.len() - 1], "!");
    let (status, body) = gw.models(Some(&wrong));
    assert_eq!(status, 401);
    assert_no_key(&wrong, &body, "the 401 body");

    let list = ok_stdout(&sluice(&["keys", "list"], &config));
    assert!(list.contains(&id), "{list}");
    assert!(
        list.contains(&format!("...{}", &key[key.len() - 4..])),
        "{list}"
    );
    assert!(list.contains("search-team"), "{list}");
    assert_no_key(&key, &list, "`keys list`");
    let json: Value =
        serde_json::from_str(&ok_stdout(&sluice(&["keys", "list", "--json"], &config))).unwrap();
    let entry = &json["data"][0];
    assert_eq!(entry["id"], id.as_str());
    assert_eq!(entry["status"], "active");
    assert!(entry.get("key").is_none(), "{entry}");
    assert_no_key(&key, &json.to_string(), "`keys list --json`");

    // An unknown tier is refused, naming the configured ones.
    let bad = sluice(
        &["keys", "create", "--owner", "x", "--tier", "gold"],
        &config,
    );
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("No tier `gold`") && stderr.contains("`pro`"),
        "{stderr}"
    );

    let out = ok_stdout(&sluice(&["keys", "revoke", &id], &config));
    assert!(out.contains("Revoked"), "{out}");
    let took = refused_by_all(&[&gw], &key);
    assert!(took < Duration::from_secs(5), "refused only after {took:?}");
    let again = ok_stdout(&sluice(&["keys", "revoke", &id], &config));
    assert!(again.contains("already revoked"), "{again}");
    let unknown = sluice(&["keys", "revoke", "key_0000000000000000"], &config);
    assert!(!unknown.status.success());

    let output = gw.stop();
    assert!(
        output.contains("ai_request_complete"),
        "no request lines:\n{output}"
    );
    assert_no_key(&key, &output, "the gateway's output");
    assert_no_key(&wrong, &output, "the gateway's output");
}

#[test]
fn a_revoked_key_is_refused_by_two_gateways_within_5s() {
    let storage = format!(
        "[storage]\nurl = \"{}\"\nschema = \"sluice_keys_{}\"\n",
        database_url(),
        common::unique()
    );
    // The default key_refresh (2 s): what a user gets.
    let config = config("postgres", &storage);
    let (id, key) = create_json(&config, "billing");
    let (other_id, other) = create_json(&config, "search");
    assert_ne!(id, other_id);
    let a = Gateway::start(&config);
    let b = Gateway::start(&config);
    for gw in [&a, &b] {
        assert_eq!(gw.models(Some(&key)).0, 200);
        assert_eq!(gw.models(Some(&other)).0, 200);
        let (status, body) = http(
            &gw.addr,
            "POST",
            "/v1/chat/completions",
            Some(&key),
            r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"stream":true}"#,
        );
        assert_eq!(status, 200, "{body}");
    }

    let out = ok_stdout(&sluice(&["keys", "revoke", &id], &config));
    assert!(out.contains("Revoked"), "{out}");
    let took = refused_by_all(&[&a, &b], &key);
    assert!(
        took < Duration::from_secs(5),
        "refused by both only after {took:?}"
    );
    for gw in [&a, &b] {
        assert_eq!(gw.models(Some(&other)).0, 200, "the other key still works");
    }

    for (name, gw) in [("first", a), ("second", b)] {
        let output = gw.stop();
        assert!(
            output.contains("ai_request_complete"),
            "no request lines:\n{output}"
        );
        assert_no_key(&key, &output, &format!("the {name} gateway's output"));
        assert_no_key(&other, &output, &format!("the {name} gateway's output"));
    }
}
