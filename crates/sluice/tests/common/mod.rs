//! Black-box helpers: start the `sluice` binary as a child process on a random port.

#![allow(dead_code, reason = "each test binary uses a different subset")]
#![expect(clippy::expect_used, reason = "test helpers fail loudly by design")]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A child process, killed when dropped.
pub struct Proc {
    pub child: Child,
    pub addr: String,
    /// Lines logged before the address line.
    pub startup: Vec<String>,
    pub log: mpsc::Receiver<String>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run `sluice ARGS` and wait until it logs the address it listens on.
pub fn spawn(args: &[&str], envs: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.args(args)
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .env_remove("ANTHROPIC_API_KEY")
        .env_remove("ANTHROPIC_BASE_URL")
        .env_remove("SLUICE_MASTER_KEY")
        .env_remove("SLUICE_LISTEN")
        .env_remove("SLUICE_CONFIG")
        // The embedded default writes ./sluice.db: keep it out of the source tree.
        .current_dir(fresh_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start sluice");
    let stderr = child.stderr.take().expect("stderr piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Owned by `Proc` from here on, so a failed start still kills and reaps the child.
    let mut proc = Proc {
        child,
        addr: String::new(),
        startup: Vec::new(),
        log: rx,
    };
    loop {
        match proc.log.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => {
                let addr = listening_addr(&line);
                proc.startup.push(line);
                if let Some(addr) = addr {
                    proc.addr = addr;
                    return proc;
                }
            }
            Err(_) => panic!(
                "sluice {args:?} did not report its address; it said:\n{}",
                proc.startup.join("\n")
            ),
        }
    }
}

/// The address from a "... listening on ADDR" log line (JSON or text).
fn listening_addr(line: &str) -> Option<String> {
    let rest = &line[line.find("listening on ")? + "listening on ".len()..];
    let rest = rest.trim_start_matches("http://");
    let end = rest.find(|c: char| {
        !(c.is_ascii_alphanumeric() || c == '.' || c == ':' || c == '[' || c == ']')
    })?;
    Some(rest[..end].to_string())
}

/// This test process's own temporary directory.
pub fn temp_dir() -> std::path::PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("sluice-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A name no other test in any process shares: the process id, the time, and a
/// counter (two tests starting in the same nanosecond once shared a config file).
pub fn unique() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}_{nanos}_{n}", std::process::id())
}

/// A new empty directory for one child process.
pub fn fresh_dir() -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = temp_dir().join(format!("run-{n}"));
    std::fs::create_dir_all(&dir).expect("run dir");
    dir
}

/// A file under the test's temporary directory.
pub fn write_temp(name: &str, contents: &str) -> std::path::PathBuf {
    let path = temp_dir().join(name);
    std::fs::write(&path, contents).expect("write temp file");
    path
}

/// One HTTP/1.1 request over a fresh connection; returns (status, body).
pub fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read response");
    let status = out[9..12].parse().expect("status code");
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
