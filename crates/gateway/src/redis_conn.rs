//! The Redis connection every shared store uses (rate limits, budget counters, the
//! cache): a [`ConnectionManager`] made lazily, so a gateway starts whether or not Redis
//! is up, that reconnects by itself; every call bounded by the `[redis]` timeout; and the
//! URL's password never in a message, a log line or a `Debug`. One per server per
//! gateway ([`RedisPool`]).

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, RedisResult, Value};
use secrecy::{ExposeSecret, SecretString};

use crate::batch::{Batch, CallCounts, Combiner};
use crate::limits::config::RedisConfig;

/// Reconnection backoff: a quick first retry, and at most a second between attempts so
/// a store is back soon after Redis is.
const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(50);
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(1);

/// One lazily made, self-healing connection, cheap to clone.
#[derive(Clone)]
pub struct RedisConn {
    con: ConnectionManager,
    timeout: Duration,
    /// Scrubbed from every error message.
    password: Option<SecretString>,
    /// The combiners sending on this connection (`/metrics`).
    combiners: Arc<Mutex<Vec<Combined>>>,
}

/// A combiner's kind of call and its counts.
type Combined = (&'static str, Arc<CallCounts>);

impl fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The connection's own Debug would show the URL with its password.
        f.debug_struct("RedisConn")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl RedisConn {
    /// A connection for `config`, for the store named `what` (in log lines). Never
    /// waits for Redis: the connection is made in the background and remade whenever it
    /// drops. Fails only for a URL that does not parse, or outside a Tokio runtime; the
    /// message never shows the URL.
    pub fn connect(config: &RedisConfig, what: &'static str) -> Result<RedisConn, String> {
        let info = config
            .url
            .expose_secret()
            .into_connection_info()
            .map_err(|e| {
                // The URL is not shown: it may hold a password.
                let hint = if config.url.expose_secret().starts_with("rediss://") {
                    ": rediss:// needs TLS, which this build does not include"
                } else {
                    ""
                };
                format!("the [redis] url is not valid ({:?}){hint}", e.kind())
            })?;
        let password = info
            .redis_settings()
            .password()
            .filter(|p| !p.is_empty())
            .map(SecretString::from);
        let scrubbed = |e: redis::RedisError| scrub(e.to_string(), password.as_ref());
        let client =
            redis::Client::open(info).map_err(|e| format!("redis client: {}", scrubbed(e)))?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(format!(
                "the Redis {what} must be created inside a Tokio runtime"
            ));
        }
        let manager_config = ConnectionManagerConfig::new()
            .set_min_delay(RECONNECT_MIN_DELAY)
            .set_max_delay(RECONNECT_MAX_DELAY)
            // Every call goes through `within`, which bounds it by the `[redis]`
            // timeout; a second timer inside the client cost ~1.5k instructions a call.
            .set_response_timeout(None);
        let con = ConnectionManager::new_lazy_with_config(client, manager_config)
            .map_err(|e| format!("redis connection: {}", scrubbed(e)))?;
        let conn = RedisConn {
            con,
            timeout: config.timeout,
            password,
            combiners: Arc::default(),
        };
        // Connect now rather than on the first request; a failure here only means the
        // manager tries again when the next command needs it.
        let first = conn.clone();
        tokio::spawn(async move {
            let mut con = first.handle();
            let ping = redis::cmd("PING");
            match first.within("PING", ping.query_async::<()>(&mut con)).await {
                Ok(()) => tracing::debug!("connected to the Redis {what}"),
                Err(error) => tracing::warn!(
                    %error,
                    "the Redis {what} is not reachable yet; retrying in the background"
                ),
            }
        });
        Ok(conn)
    }

    /// A handle for one call (clones share the connection).
    pub fn handle(&self) -> ConnectionManager {
        self.con.clone()
    }

    /// A [`Combiner`] for `batch`'s calls on this connection, its calls and jobs
    /// counted on `/metrics` as the kind `call` ([`RedisPool::combined_calls`]).
    pub fn combiner<B: Batch>(&self, call: &'static str, batch: B) -> Arc<Combiner<B>> {
        let combiner = Combiner::new(batch);
        self.combiners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((call, combiner.call_counts()));
        combiner
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Run one round trip within the timeout; a failure is a message naming `what`,
    /// password scrubbed.
    pub async fn within<T>(
        &self,
        what: &str,
        call: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(format!(
                "redis {what}: {}",
                scrub(e.to_string(), self.password.as_ref())
            )),
            Err(_) => Err(format!("redis {what}: no answer within {:?}", self.timeout)),
        }
    }

    /// Every key starting with `prefix` (taken literally), each once: SCAN until the
    /// cursor comes back to 0. For admin listings, not the request path.
    pub async fn scan_prefix(&self, what: &str, prefix: &str) -> Result<Vec<String>, String> {
        let pattern = format!("{}*", glob_escape(prefix));
        let mut con = self.handle();
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        let mut cursor = 0u64;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT);
            let (next, keys): (u64, Vec<String>) =
                self.within(what, scan.query_async(&mut con)).await?;
            // SCAN may return a key twice.
            out.extend(
                keys.into_iter()
                    .filter(|k| k.starts_with(prefix) && seen.insert(k.clone())),
            );
            if next == 0 {
                return Ok(out);
            }
            cursor = next;
        }
    }
}

/// The Redis connections of one gateway: stores that name the same server (URL and
/// timeout) share one connection. Its commands are multiplexed: what the stores send at
/// the same moment (a request's limit check, budget read and cache lookup) leaves in one
/// write and comes back in one read, one round trip instead of one each.
#[derive(Default)]
pub struct RedisPool {
    conns: Vec<(SecretString, Duration, RedisConn)>,
}

impl fmt::Debug for RedisPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisPool")
            .field("connections", &self.conns.len())
            .finish()
    }
}

impl RedisPool {
    /// Per kind of combined call (`limit_check`, `cache_read`, ...): the calls made and
    /// the jobs (requests' checks, reads, charges) they carried, over every connection.
    pub fn combined_calls(&self) -> Vec<(&'static str, u64, u64)> {
        let mut out: Vec<(&'static str, u64, u64)> = Vec::new();
        for (_, _, conn) in &self.conns {
            let combiners = conn.combiners.lock().unwrap_or_else(|e| e.into_inner());
            for (call, counts) in combiners.iter() {
                let (calls, jobs) = counts.get();
                match out.iter_mut().find(|(c, _, _)| c == call) {
                    Some(row) => {
                        row.1 += calls;
                        row.2 += jobs;
                    }
                    None => out.push((call, calls, jobs)),
                }
            }
        }
        out
    }

    /// The connection for `config`'s server: the one already made for it, else a new
    /// one (see [`RedisConn::connect`]).
    pub fn conn(&mut self, config: &RedisConfig) -> Result<RedisConn, String> {
        let url = config.url.expose_secret();
        if let Some((_, _, conn)) = self
            .conns
            .iter()
            .find(|(u, t, _)| u.expose_secret() == url && *t == config.timeout)
        {
            return Ok(conn.clone());
        }
        let conn = RedisConn::connect(config, "store")?;
        self.conns
            .push((config.url.clone(), config.timeout, conn.clone()));
        Ok(conn)
    }
}

/// Reads of one kind (the cache's lookups, the budget counters' reads) through a
/// [`Combiner`](crate::batch::Combiner): the keys of the reads that queue behind one in
/// flight go as one `MGET`. Each kind has its own, so a request's reads of different
/// kinds still leave together, in one round trip.
pub struct Reads {
    conn: RedisConn,
    what: &'static str,
}

impl Reads {
    /// Reads named `what` in messages, counted as the kind `call` on `/metrics`.
    pub fn new(conn: RedisConn, what: &'static str, call: &'static str) -> Arc<Combiner<Reads>> {
        conn.clone().combiner(call, Reads { conn, what })
    }
}

impl Batch for Reads {
    /// The keys of one read.
    type Job = Vec<String>;
    /// Each key's value (`None`: missing), in the read's order.
    type Reply = Vec<Option<Vec<u8>>>;
    type Error = String;

    const MAX_JOBS: usize = 128;
    const SEND_ABANDONED: bool = false;

    async fn send(&self, reads: &[&Vec<String>]) -> Result<Vec<Self::Reply>, String> {
        let total: usize = reads.iter().map(|keys| keys.len()).sum();
        if total == 0 {
            // Redis refuses an MGET of nothing.
            return Ok(reads.iter().map(|_| Vec::new()).collect());
        }
        let mut mget = redis::cmd("MGET");
        for keys in reads {
            mget.arg(keys.as_slice());
        }
        let mut con = self.conn.handle();
        let values: Vec<Option<Vec<u8>>> = self
            .conn
            .within(self.what, mget.query_async(&mut con))
            .await?;
        if values.len() != total {
            return Err(format!(
                "redis {}: {} values for {total} keys",
                self.what,
                values.len()
            ));
        }
        let mut values = values.into_iter();
        Ok(reads
            .iter()
            .map(|keys| values.by_ref().take(keys.len()).collect())
            .collect())
    }

    fn patience(&self) -> Duration {
        self.conn.timeout()
    }

    fn gave_up(&self, why: &str) -> String {
        format!("redis {}: {why}", self.what)
    }
}

/// A script reply's integer (`None` for any other kind of value).
pub fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        _ => None,
    }
}

/// The whole numbers of a script's packed reply: decimal (`-` only as a sign; Lua's
/// `'%d'` never writes a `+`), one space apart (`""` holds none); `None` for anything
/// else. The scripts pack a request's numbers into one string because the `redis`
/// crate's parser costs more for a reply of many values: packing a check's and a
/// charge's saved ~4.5k of a lone full-redis request's ~333k gateway instructions, and
/// Redis spent about what it saved on the conversion
/// (bench/RESULTS.md, Run 32).
pub fn decimals(text: &[u8]) -> Option<Vec<i64>> {
    if text.is_empty() {
        return Some(Vec::new());
    }
    text.split(|b| *b == b' ')
        .map(|field| match field.first() {
            Some(b'+') => None,
            _ => std::str::from_utf8(field).ok()?.parse().ok(),
        })
        .collect()
}

/// Keys SCAN looks at per round trip.
const SCAN_COUNT: u64 = 500;

/// `message` with the password, when it shows up, replaced by `***`.
pub fn scrub(message: String, password: Option<&SecretString>) -> String {
    match password {
        Some(p) if message.contains(p.expose_secret()) => message.replace(p.expose_secret(), "***"),
        _ => message,
    }
}

/// `*`, `?`, `[`, `]` and `\` in the configured prefix taken literally by SCAN MATCH.
pub fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that takes connections and reads, but never answers: a stalled Redis.
    async fn stalled_server() -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_call_to_a_redis_that_never_answers_fails_within_the_timeout() {
        let addr = stalled_server().await;
        let config = RedisConfig {
            url: SecretString::from(format!("redis://:hunter2@{addr}")),
            prefix: "t:".into(),
            on_failure: crate::limits::config::FailMode::Closed,
            timeout: Duration::from_millis(200),
            sync: None,
        };
        let conn = RedisConn::connect(&config, "test").unwrap();
        let mut con = conn.handle();
        let started = std::time::Instant::now();
        let mut get = redis::cmd("GET");
        let answer: Result<Option<String>, String> =
            conn.within("get", get.arg("k").query_async(&mut con)).await;
        let message = answer.unwrap_err();
        let took = started.elapsed();
        // Bounded by the configured 200 ms, not by the client's own connect timeout.
        assert!(
            took < Duration::from_millis(900),
            "took {took:?}: {message}"
        );
        assert_eq!(message, "redis get: no answer within 200ms");
        assert!(!message.contains("hunter2"), "{message}");
    }

    #[test]
    fn packed_replies_read_as_whole_numbers() {
        assert_eq!(
            decimals(b"1 1800000000000000 -1 0"),
            Some(vec![1, 1_800_000_000_000_000, -1, 0])
        );
        assert_eq!(decimals(b""), Some(vec![]));
        for bad in [
            &b"1  2"[..],
            b" 1",
            b"1 ",
            b"1 x",
            b"1.5",
            b"+1",
            b"1 +2",
            b"-",
            b"99999999999999999999",
        ] {
            assert_eq!(decimals(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn passwords_never_reach_messages() {
        let pw = SecretString::from("hunter2");
        assert_eq!(
            scrub("auth hunter2 failed".into(), Some(&pw)),
            "auth *** failed"
        );
        assert_eq!(scrub("fine".into(), None), "fine");
    }
}
