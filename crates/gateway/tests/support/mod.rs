//! Shared by the integration tests: the real PostgreSQL they run against.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use secrecy::SecretString;
use sluice_gateway::store::StorageTarget;

/// `SLUICE_TEST_DATABASE_URL`, or the local server every dev and CI machine runs.
pub fn database_url() -> String {
    std::env::var("SLUICE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A PostgreSQL target in a fresh schema of its own, so tests never see each other's rows.
pub fn postgres_target() -> StorageTarget {
    let schema = format!("sluice_test_{}", uuid_like());
    StorageTarget::Postgres {
        url: SecretString::from(database_url()),
        schema: Some(schema),
    }
}

/// A name unique across tests and processes: time, process id and a counter.
pub fn uuid_like() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{:x}_{}_{}",
        t,
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// Both backends the request log supports, each fresh.
pub fn backends() -> Vec<(&'static str, StorageTarget)> {
    vec![
        ("sqlite", StorageTarget::Memory),
        ("postgres", postgres_target()),
    ]
}

/// Open a store, failing with a clear message when PostgreSQL is not running.
pub async fn open(
    name: &str,
    target: &StorageTarget,
) -> std::sync::Arc<sluice_gateway::store::Store> {
    match sluice_gateway::store::Store::open(target).await {
        Ok(s) => s,
        Err(e) => panic!(
            "cannot open the {name} store: {e:#}\n(PostgreSQL tests need a server at SLUICE_TEST_DATABASE_URL, default {}; start it with `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`)",
            database_url()
        ),
    }
}

/// A gateway on inline TOML, its request log in memory, its records also sent to a
/// channel so a test can read each one.
pub struct Harness {
    pub app: axum::Router,
    pub gateway: std::sync::Arc<sluice_gateway::pipeline::Gateway>,
    pub records: tokio::sync::mpsc::UnboundedReceiver<sluice_gateway::telemetry::RequestRecord>,
    pub tasks: tokio_util::task::TaskTracker,
}

pub async fn harness(toml: &str) -> Harness {
    use sluice_gateway::config::{Config, ConfigSource};
    let config = Config::from_toml(
        toml,
        &[("UNUSED", "")],
        ConfigSource::Embedded { simulated: false },
    )
    .unwrap_or_else(|e| panic!("test config invalid: {e}"));
    let store = open("sqlite", &StorageTarget::Memory).await;
    let tasks = tokio_util::task::TaskTracker::new();
    let (tx, records) = tokio::sync::mpsc::unbounded_channel();
    let gateway = sluice_gateway::pipeline::Gateway::start(
        std::sync::Arc::new(config),
        store,
        vec![Box::new(sluice_gateway::telemetry::ChannelSink(tx))],
        tasks.clone(),
    )
    .unwrap_or_else(|e| panic!("gateway did not start: {e:#}"));
    Harness {
        app: sluice_gateway::server::app(gateway.clone()),
        gateway,
        records,
        tasks,
    }
}

/// Serve `app` on a free local port for as long as the test runs; its address.
pub async fn serve(app: axum::Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("local_addr: {e}"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

/// `SLUICE_TEST_REDIS_URL`, or the local server every dev and CI machine runs.
pub fn redis_url() -> String {
    std::env::var("SLUICE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The test Redis's address, for a proxy in front of it.
pub fn redis_addr() -> std::net::SocketAddr {
    let hostport = redis_url()
        .trim_start_matches("redis://")
        .split(['/', '?'])
        .next()
        .map(|a| a.rsplit('@').next().unwrap_or(a).to_string())
        .unwrap_or_default();
    std::net::ToSocketAddrs::to_socket_addrs(&hostport)
        .ok()
        .and_then(|mut a| a.next())
        .unwrap_or_else(|| panic!("cannot resolve the test Redis at {hostport}"))
}

/// Every key starting with `prefix` in the test Redis (SCAN, the prefix taken
/// literally).
pub async fn keys_under(prefix: &str) -> Vec<String> {
    let mut con = redis_raw().await;
    let pattern = format!("{}*", sluice_gateway::redis_conn::glob_escape(prefix));
    let mut cursor = 0u64;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut con)
            .await
            .unwrap_or_else(|e| panic!("SCAN: {e}"));
        keys.extend(batch);
        if next == 0 {
            return keys;
        }
        cursor = next;
    }
}

/// `key`'s remaining TTL in the test Redis, in ms (-1: none, -2: no such key).
pub async fn pttl(con: &mut redis::aio::MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(key)
        .query_async(con)
        .await
        .unwrap_or_else(|e| panic!("PTTL {key}: {e}"))
}

/// Every one of `keys` has a TTL in the test Redis (it expires by itself).
pub async fn assert_every_key_expires(keys: &[String]) {
    let mut con = redis_raw().await;
    for key in keys {
        let pttl = pttl(&mut con, key).await;
        assert!(pttl > 0, "{key} has no TTL ({pttl})");
    }
}

/// One simulated provider serving `gpt-4o-mini`, as a config's tail.
pub const SIM_CHAT: &str = r#"
[[providers]]
name = "sim"
kind = "sim"
[[models]]
name = "gpt-4o-mini"
provider = "sim"
"#;

/// A key prefix no other test uses.
pub fn unique_redis_prefix() -> String {
    format!("sluice-test-{}:", uuid::Uuid::now_v7().simple())
}

/// `[redis]` for the test server under `prefix`.
pub fn redis_config(
    url: String,
    prefix: &str,
    on_failure: sluice_gateway::limits::config::FailMode,
    timeout: std::time::Duration,
) -> sluice_gateway::limits::config::RedisConfig {
    sluice_gateway::limits::config::RedisConfig {
        url: SecretString::from(url),
        prefix: prefix.into(),
        on_failure,
        timeout,
        sync: None,
    }
}

fn redis_unreachable(error: &str) -> String {
    format!(
        "cannot reach Redis: {error}\n(Redis tests need a server at SLUICE_TEST_REDIS_URL, default redis://127.0.0.1:6379; start one with `redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save \"\" --appendonly no`)"
    )
}

/// A plain connection for looking at what a test wrote; fails loudly without Redis.
pub async fn redis_raw() -> redis::aio::MultiplexedConnection {
    let connect = async {
        redis::Client::open(redis_url())?
            .get_multiplexed_async_connection()
            .await
    };
    match tokio::time::timeout(std::time::Duration::from_secs(5), connect).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => panic!("{}", redis_unreachable(&e.to_string())),
        Err(_) => panic!("{}", redis_unreachable("no answer within 5s")),
    }
}

/// One answer through [`Harness::send`]: status, headers, the body as text and as JSON
/// (`Null` when it is not JSON, e.g. SSE), and the request's record.
pub struct Reply {
    pub status: axum::http::StatusCode,
    pub headers: axum::http::HeaderMap,
    pub text: String,
    pub body: serde_json::Value,
    pub record: sluice_gateway::telemetry::RequestRecord,
}

impl Harness {
    /// POST `body` as JSON to `path` with extra `headers`, and read the answer and the
    /// record it left.
    pub async fn send(
        &mut self,
        path: &str,
        body: serde_json::Value,
        headers: &[(&str, &str)],
    ) -> Reply {
        use tower::ServiceExt;
        let mut req = axum::http::Request::post(path).header("content-type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let request = req
            .body(axum::body::Body::from(body.to_string()))
            .unwrap_or_else(|e| panic!("request: {e}"));
        let response = self
            .app
            .clone()
            .oneshot(request)
            .await
            .unwrap_or_else(|e| match e {});
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX)
            .await
            .unwrap_or_else(|e| panic!("body: {e}"));
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let record = self
            .records
            .recv()
            .await
            .unwrap_or_else(|| panic!("no record for {path}"));
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
            text,
            record,
        }
    }
}
