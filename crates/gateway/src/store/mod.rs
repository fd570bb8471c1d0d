//! Storage: the request log, feedback and virtual keys, in SQLite (default, one file,
//! WAL) or PostgreSQL. One set of queries serves both through sqlx's `Any` driver;
//! placeholders are written `$N`, which both backends read. The hot insert alone is
//! written per backend (see [`insert_sql`]), and SQLite's goes through a writer of its
//! own (log_writer.rs). Migrations are versioned per backend.

mod experiments;
mod keys;
mod log_writer;
mod records;
mod redact;
mod spend;
mod stats;

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor, Row};

pub use experiments::ExperimentRow;
pub use keys::{KEY_PREFIX, KeyRow, NewKey, generate_key, hash_key, key_digest, key_hint};
pub use records::{Cursor, RecordFilter};
pub use redact::redact_secrets;
pub use spend::{SpendFilter, SpendGroup, SpendRow};
pub use stats::{CellKey, CellQuery, StatCell, bucket_origin};

use crate::telemetry::{RecordBatch, RecordSink, RequestRecord};
use log_writer::LogWriter;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// Where the request log lives.
#[derive(Debug, Clone)]
pub enum StorageTarget {
    /// A SQLite file, created on first start.
    Sqlite(PathBuf),
    /// SQLite in memory: for tests; gone with the process.
    Memory,
    /// PostgreSQL; `schema` is created when missing and used for every connection.
    Postgres {
        url: SecretString,
        schema: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The request log.
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// SQLite's request log writes (see log_writer.rs); PostgreSQL's go through `pool`.
    writer: Option<LogWriter>,
    /// Records that could not be written after retries.
    failed: AtomicU64,
}

/// What `sluice stats` reads of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct StatRow {
    pub request_id: String,
    pub started_at_ms: i64,
    pub key_id: Option<String>,
    pub user: Option<String>,
    pub feature: Option<String>,
    pub model: Option<String>,
    pub outcome: String,
    pub latency_ms: f64,
    pub ttft_ms: Option<f64>,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_micros: Option<i64>,
    /// The exact cost; from `cost_micros` for rows written before it was recorded.
    pub cost_nanos: Option<i64>,
    pub cost_saved_nanos: Option<i64>,
    pub cached_prompt_tokens: i64,
    pub cache_status: Option<String>,
    pub regeneration_of: Option<String>,
}

/// One piece of feedback.
#[derive(Debug, Clone, PartialEq)]
pub struct Feedback {
    pub request_id: String,
    pub key_id: Option<String>,
    pub score: f64,
    pub comment: Option<String>,
    pub created_at_ms: i64,
}

/// Milliseconds kept to the microsecond, as durations are stored: finer digits are
/// noise, and a value of at most 15 significant digits reads back exactly from the text
/// SQLite writes a double as (the stats aggregate latencies as text).
fn to_micros(ms: f64) -> f64 {
    (ms * 1000.0).round() / 1000.0
}

/// An optional double to bind. sqlx 0.8.6's `Any` driver sends a `None::<f64>` to
/// PostgreSQL typed as `real` (float4; its table maps `Double` nulls to `f32` and back),
/// and PostgreSQL then keeps that type for the prepared statement: a connection whose
/// first row had no TTFT refused every later row that had one ("incorrect binary data
/// format in bind parameter"). `None::<f32>` is the null that arrives as float8.
struct NullableF64(Option<f64>);

impl sqlx::Type<sqlx::Any> for NullableF64 {
    fn type_info() -> sqlx::any::AnyTypeInfo {
        <f64 as sqlx::Type<sqlx::Any>>::type_info()
    }
}

impl<'q> sqlx::Encode<'q, sqlx::Any> for NullableF64 {
    fn encode_by_ref(
        &self,
        buf: &mut <sqlx::Any as sqlx::Database>::ArgumentBuffer<'q>,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        match self.0 {
            Some(v) => <f64 as sqlx::Encode<sqlx::Any>>::encode_by_ref(&v, buf),
            None => <Option<f32> as sqlx::Encode<sqlx::Any>>::encode_by_ref(&None, buf),
        }
    }
}

const COLUMNS: [&str; 45] = [
    "request_id",
    "started_at_ms",
    "endpoint",
    "stream",
    "key_id",
    "user_id",
    "tier",
    "feature",
    "model_requested",
    "model",
    "provider",
    "prompt_id",
    "prompt_version",
    "prompt_hash",
    "experiment",
    "variant",
    "outcome",
    "status",
    "error_code",
    "retries",
    "upstream_calls",
    "fallback",
    "cache_status",
    "prompt_tokens",
    "completion_tokens",
    "tokens_estimated",
    "cost_micros",
    "latency_ms",
    "ttft_ms",
    "upstream_ms",
    "overhead_ms",
    "input_hash",
    "regeneration_of",
    "request_body",
    "response_body",
    "guard_changes",
    "guard_flags",
    "output_check",
    "owner",
    "limited_by",
    "cost_nanos",
    "cost_saved_nanos",
    "cached_prompt_tokens",
    "output_checks",
    "routed_by",
];

impl Store {
    /// Connect (creating the SQLite file or the PostgreSQL schema when missing) and run
    /// the migrations.
    pub async fn open(target: &StorageTarget) -> anyhow::Result<Arc<Store>> {
        sqlx::any::install_default_drivers();
        // An in-memory database is named, with a shared cache, so the log's writer
        // opens the same one; unique per store, as each `Memory` store is its own.
        static MEMORY_SEQ: AtomicU64 = AtomicU64::new(0);
        let memory_name = format!(
            "file:sluice-memory-{}-{}",
            std::process::id(),
            MEMORY_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let (pool, backend) = match target {
            StorageTarget::Sqlite(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)?;
                }
                let url = format!("sqlite://{}?mode=rwc", path.display());
                (sqlite_pool(&url, 4).await?, Backend::Sqlite)
            }
            // One connection: the writer's is the other.
            StorageTarget::Memory => (
                sqlite_pool(&format!("sqlite:{memory_name}?mode=memory"), 1).await?,
                Backend::Sqlite,
            ),
            StorageTarget::Postgres { url, schema } => (
                postgres_pool(url, schema.as_deref()).await?,
                Backend::Postgres,
            ),
        };
        match backend {
            Backend::Sqlite => SQLITE_MIGRATIONS.run(&pool).await?,
            Backend::Postgres => POSTGRES_MIGRATIONS.run(&pool).await?,
        }
        let writer = match target {
            StorageTarget::Sqlite(path) => Some(LogWriter::open(log_writer::Target::File(path))?),
            StorageTarget::Memory => {
                Some(LogWriter::open(log_writer::Target::Memory(&memory_name))?)
            }
            StorageTarget::Postgres { .. } => None,
        };
        Ok(Arc::new(Store {
            pool,
            backend,
            writer,
            failed: AtomicU64::new(0),
        }))
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Records lost because the store refused them after retries.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Whether the store answers and its request log can be written, for `/readyz`.
    pub async fn ping(&self) -> bool {
        self.writer.as_ref().is_none_or(LogWriter::running)
            && sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    /// Insert a batch in one transaction (see [`Store::insert_batch`]); copies the
    /// records for SQLite's writer thread.
    pub async fn insert(&self, batch: &[RequestRecord]) -> anyhow::Result<()> {
        match self.writer {
            Some(_) => self.insert_batch(&Arc::new(batch.to_vec())).await,
            None => self.insert_sqlx(batch).await,
        }
    }

    /// Insert a batch in one transaction, as a few multi-row statements of the sizes in
    /// [`INSERT_ROWS`], so each is prepared once and reused. Re-inserting a request id is
    /// ignored, so a retried batch never duplicates. SQLite's rows go to the log's
    /// writer thread (log_writer.rs), which shares the batch rather than copying it.
    pub async fn insert_batch(&self, batch: &RecordBatch) -> anyhow::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        match &self.writer {
            Some(writer) => writer.insert(batch.clone()).await,
            None => self.insert_sqlx(batch).await,
        }
    }

    async fn insert_sqlx(&self, batch: &[RequestRecord]) -> anyhow::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        // A few multi-row statements instead of one per row: each statement is a round
        // trip to the database, which cost more than the rows themselves.
        let mut tx = self.pool.begin().await?;
        let mut rest = batch;
        while !rest.is_empty() {
            let (sql, rows, _) = insert_sql(self.backend, rest.len());
            let (chunk, tail) = rest.split_at(rows);
            let mut query = sqlx::query(sql);
            for r in chunk {
                query = bind_record(query, r);
            }
            query.execute(&mut *tx).await?;
            rest = tail;
        }
        Ok(tx.commit().await?)
    }

    /// The key that made a request: `None` when there is no such request.
    pub async fn record_owner(
        &self,
        request_id: &str,
    ) -> Result<Option<Option<String>>, sqlx::Error> {
        let row = sqlx::query("SELECT key_id FROM requests WHERE request_id = $1")
            .bind(request_id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| r.try_get::<Option<String>, _>("key_id"))
            .transpose()
    }

    pub async fn insert_feedback(&self, f: &Feedback) -> Result<(), sqlx::Error> {
        sqlx::query("INSERT INTO feedback (request_id, key_id, score, comment, created_at_ms) VALUES ($1, $2, $3, $4, $5)")
            .bind(f.request_id.clone())
            .bind(f.key_id.clone())
            .bind(f.score)
            .bind(f.comment.clone())
            .bind(f.created_at_ms)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Requests started at or after `since_ms`.
    pub async fn stat_rows(&self, since_ms: i64) -> Result<Vec<StatRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT request_id, started_at_ms, key_id, user_id, feature, COALESCE(model, model_requested) AS model, \
             outcome, latency_ms, ttft_ms, prompt_tokens, completion_tokens, cost_micros, \
             COALESCE(cost_nanos, cost_micros * 1000) AS cost_nanos, cost_saved_nanos, cached_prompt_tokens, \
             cache_status, regeneration_of \
             FROM requests WHERE started_at_ms >= $1 ORDER BY started_at_ms",
        )
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(StatRow {
                    request_id: r.try_get("request_id")?,
                    started_at_ms: r.try_get("started_at_ms")?,
                    key_id: r.try_get("key_id")?,
                    user: r.try_get("user_id")?,
                    feature: r.try_get("feature")?,
                    model: r.try_get("model")?,
                    outcome: r.try_get("outcome")?,
                    latency_ms: r.try_get("latency_ms")?,
                    ttft_ms: r.try_get("ttft_ms")?,
                    prompt_tokens: r.try_get("prompt_tokens")?,
                    completion_tokens: r.try_get("completion_tokens")?,
                    cost_micros: r.try_get("cost_micros")?,
                    cost_nanos: r.try_get("cost_nanos")?,
                    cost_saved_nanos: r.try_get("cost_saved_nanos")?,
                    cached_prompt_tokens: r.try_get("cached_prompt_tokens")?,
                    cache_status: r.try_get("cache_status")?,
                    regeneration_of: r.try_get("regeneration_of")?,
                })
            })
            .collect()
    }

    /// Feedback on requests started at or after `since_ms`.
    pub async fn feedback_since(&self, since_ms: i64) -> Result<Vec<Feedback>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT f.request_id, f.key_id, f.score, f.comment, f.created_at_ms FROM feedback f \
             JOIN requests r ON r.request_id = f.request_id WHERE r.started_at_ms >= $1",
        )
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Feedback {
                    request_id: r.try_get("request_id")?,
                    key_id: r.try_get("key_id")?,
                    score: r.try_get("score")?,
                    comment: r.try_get("comment")?,
                    created_at_ms: r.try_get("created_at_ms")?,
                })
            })
            .collect()
    }

    /// Rows in the request log.
    pub async fn count(&self) -> Result<i64, sqlx::Error> {
        sqlx::query("SELECT COUNT(*) AS n FROM requests")
            .fetch_one(&self.pool)
            .await?
            .try_get("n")
    }

    pub async fn close(&self) {
        // The writer first: the last connection to close checkpoints the WAL.
        if let Some(writer) = &self.writer {
            writer.close().await;
        }
        self.pool.close().await;
    }
}

/// Rows per INSERT statement, largest first. A batch is written as statements of these
/// sizes (at most 9 for any batch below 64 rows), so only these few are ever prepared.
const INSERT_ROWS: [usize; 4] = [64, 16, 4, 1];

/// The largest `INSERT INTO requests (...) VALUES (...), ...` (a request id already
/// there is skipped) that fits in `rows` remaining rows, how many rows it takes, and its index in
/// [`INSERT_ROWS`]. Built once per backend and size. SQLite gets anonymous `?`
/// placeholders, bound by position.
fn insert_sql(backend: Backend, rows: usize) -> (&'static str, usize, usize) {
    static SQL: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
        let mut all = Vec::new();
        for backend in [Backend::Sqlite, Backend::Postgres] {
            for rows in INSERT_ROWS {
                let tuples: Vec<String> = (0..rows)
                    .map(|row| {
                        let params: Vec<String> = (1..=COLUMNS.len())
                            .map(|i| match backend {
                                Backend::Sqlite => "?".to_string(),
                                Backend::Postgres => format!("${}", row * COLUMNS.len() + i),
                            })
                            .collect();
                        format!("({})", params.join(", "))
                    })
                    .collect();
                let (insert, conflict) = match backend {
                    // OR IGNORE, not `ON CONFLICT DO NOTHING`: no constraint can then
                    // abort a statement halfway, so SQLite keeps no statement journal
                    // for it. With one, every multi-row statement after a batch's
                    // first copied the pages it touched into the journal, which spilled
                    // to a temporary file (an open, a write per page, an unlink): 44 %
                    // of the writer's page writes (bench/RESULTS.md, Run 35).
                    Backend::Sqlite => ("INSERT OR IGNORE INTO", ""),
                    Backend::Postgres => ("INSERT INTO", " ON CONFLICT (request_id) DO NOTHING"),
                };
                all.push(format!(
                    "{insert} requests ({}) VALUES {}{conflict}",
                    COLUMNS.join(", "),
                    tuples.join(", ")
                ));
            }
        }
        all
    });
    let i = INSERT_ROWS
        .iter()
        .position(|&n| n <= rows)
        .unwrap_or(INSERT_ROWS.len() - 1);
    let offset = match backend {
        Backend::Sqlite => 0,
        Backend::Postgres => INSERT_ROWS.len(),
    };
    (&SQL[offset + i], INSERT_ROWS[i], i)
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

/// One column's value of a record, borrowed from it, as both writers bind it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Value<'a> {
    Text(Option<&'a str>),
    Int(Option<i64>),
    Real(Option<f64>),
}

/// A record's values in `COLUMNS` order: the one mapping of record fields to columns,
/// for the SQLite writer and for sqlx.
fn values(r: &RequestRecord) -> [Value<'_>; COLUMNS.len()] {
    use Value::{Int, Real, Text};
    fn text(v: &Option<String>) -> Value<'_> {
        Value::Text(v.as_deref())
    }
    let int = |v: u64| Int(Some(to_i64(v)));
    [
        Text(Some(&r.request_id)),
        int(r.started_at_ms),
        Text(Some(r.endpoint.as_str())),
        Int(Some(i64::from(r.stream))),
        text(&r.key_id),
        text(&r.user),
        text(&r.tier),
        text(&r.feature),
        text(&r.model_requested),
        text(&r.model),
        text(&r.provider),
        text(&r.prompt_id),
        text(&r.prompt_version),
        text(&r.prompt_hash),
        text(&r.experiment),
        text(&r.variant),
        Text(Some(r.outcome().as_str())),
        Int(Some(i64::from(r.status))),
        text(&r.error_code),
        Int(Some(i64::from(r.retries))),
        Int(Some(i64::from(r.upstream_calls))),
        Text(r.fallback.map(|f| f.as_str())),
        text(&r.cache_status),
        Int(Some(i64::from(r.prompt_tokens))),
        Int(Some(i64::from(r.completion_tokens))),
        Int(Some(i64::from(r.tokens_estimated))),
        Int(r.cost_micros),
        Real(Some(to_micros(r.latency_ms))),
        Real(r.ttft_ms.map(to_micros)),
        Real(r.upstream_ms.map(to_micros)),
        Real(r.overhead_ms.map(to_micros)),
        text(&r.input_hash),
        text(&r.regeneration_of),
        text(&r.request_body),
        text(&r.response_body),
        text(&r.guard_changes),
        text(&r.guard_flags),
        text(&r.output_check),
        text(&r.owner),
        text(&r.limited_by),
        Int(r.cost_nanos),
        Int(r.cost_saved_nanos),
        Int(Some(i64::from(r.cached_prompt_tokens))),
        text(&r.output_checks),
        text(&r.routed_by),
    ]
}

/// Bind one record's values, in `COLUMNS` order.
fn bind_record<'q>(mut query: AnyQuery<'q>, r: &RequestRecord) -> AnyQuery<'q> {
    for value in values(r) {
        query = match value {
            Value::Text(v) => query.bind(v.map(str::to_string)),
            Value::Int(v) => query.bind(v),
            Value::Real(v) => query.bind(NullableF64(v)),
        };
    }
    query
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

async fn sqlite_pool(url: &str, max: u32) -> anyhow::Result<AnyPool> {
    let options = AnyConnectOptions::from_str(url)?;
    Ok(AnyPoolOptions::new()
        .max_connections(max)
        // A writer waits its turn rather than failing: the recorder retries anyway, and
        // tests with tokio's paused clock would see a short timeout fire at once.
        .acquire_timeout(Duration::from_secs(3600))
        .after_connect(|conn, _| {
            Box::pin(async move {
                // WAL lets `sluice stats` read while the gateway writes; NORMAL sync is
                // durable across process crashes, which is what a request log needs.
                conn.execute("PRAGMA journal_mode = WAL").await?;
                conn.execute("PRAGMA synchronous = NORMAL").await?;
                conn.execute("PRAGMA busy_timeout = 5000").await?;
                Ok(())
            })
        })
        .connect_with(options)
        .await?)
}

async fn postgres_pool(url: &SecretString, schema: Option<&str>) -> anyhow::Result<AnyPool> {
    let options = AnyConnectOptions::from_str(url.expose_secret())
        .map_err(|e| anyhow::anyhow!("invalid PostgreSQL URL: {e}"))?;
    if let Some(schema) = schema {
        anyhow::ensure!(
            !schema.is_empty()
                && schema
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "schema `{schema}` must be letters, digits and underscores"
        );
        let setup = AnyPoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        setup
            .execute(format!("CREATE SCHEMA IF NOT EXISTS {schema}").as_str())
            .await?;
        setup.close().await;
    }
    let search_path = schema.map(|s| format!("SET search_path TO {s}"));
    Ok(AnyPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(10))
        .after_connect(move |conn, _| {
            let search_path = search_path.clone();
            Box::pin(async move {
                if let Some(sql) = search_path {
                    conn.execute(sql.as_str()).await?;
                }
                Ok(())
            })
        })
        .connect_with(options)
        .await?)
}

/// Writes record batches to the store, retrying briefly; a batch that still fails is
/// counted and logged, never retried forever (the queue behind it must keep moving).
pub struct StoreSink(pub Arc<Store>);

#[async_trait]
impl RecordSink for StoreSink {
    async fn write(&mut self, batch: &RecordBatch) {
        let mut delay = Duration::from_millis(50);
        for attempt in 1..=3 {
            match self.0.insert_batch(batch).await {
                Ok(()) => return,
                Err(e) if attempt < 3 => {
                    tracing::warn!(error = %e, attempt, rows = batch.len(), "request log write failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 4;
                }
                Err(e) => {
                    self.0
                        .failed
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    tracing::error!(error = %e, rows = batch.len(), "request log write failed; records lost");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No SQLite insert can stop halfway with a constraint error (no `HaltIfNull`, no
    /// `Halt` with an error code in its program), so SQLite keeps no statement journal
    /// for the batch's statements: see `insert_sql`.
    #[tokio::test]
    async fn no_sqlite_insert_can_abort_halfway() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.db");
        let store = Store::open(&StorageTarget::Sqlite(path.clone()))
            .await
            .unwrap();
        let conn = rusqlite::Connection::open(&path).unwrap();
        for rows in INSERT_ROWS {
            let (sql, taken, _) = insert_sql(Backend::Sqlite, rows);
            assert_eq!(taken, rows);
            let mut explain = conn.prepare(&format!("EXPLAIN {sql}")).unwrap();
            // Unbound placeholders are fine for EXPLAIN; `raw_query` does not count them.
            let mut listing = explain.raw_query();
            let mut program: Vec<(String, i64)> = Vec::new();
            while let Some(r) = listing.next().unwrap() {
                program.push((r.get(1).unwrap(), r.get(2).unwrap()));
            }
            assert!(
                program.iter().any(|(op, _)| op == "Insert"),
                "an insert's program: {program:?}"
            );
            let aborts: Vec<_> = program
                .iter()
                .filter(|(op, p1)| op == "HaltIfNull" || (op == "Halt" && *p1 != 0))
                .collect();
            assert!(aborts.is_empty(), "{rows} rows: {aborts:?}");
        }
        drop(conn);
        store.close().await;
    }
}
