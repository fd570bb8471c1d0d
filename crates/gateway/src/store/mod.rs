//! Storage: the request log, feedback and virtual keys, in SQLite (default, one file,
//! WAL) or PostgreSQL. One set of queries serves both through sqlx's `Any` driver;
//! placeholders are written `$N`, which both backends read. Migrations are versioned per
//! backend.

mod experiments;
mod keys;
mod records;
mod redact;
mod spend;

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

use crate::telemetry::{RecordSink, RequestRecord};

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
        let (pool, backend) = match target {
            StorageTarget::Sqlite(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)?;
                }
                let url = format!("sqlite://{}?mode=rwc", path.display());
                (sqlite_pool(&url, 4).await?, Backend::Sqlite)
            }
            // One connection: every in-memory connection would be its own database.
            StorageTarget::Memory => (sqlite_pool("sqlite::memory:", 1).await?, Backend::Sqlite),
            StorageTarget::Postgres { url, schema } => (
                postgres_pool(url, schema.as_deref()).await?,
                Backend::Postgres,
            ),
        };
        match backend {
            Backend::Sqlite => SQLITE_MIGRATIONS.run(&pool).await?,
            Backend::Postgres => POSTGRES_MIGRATIONS.run(&pool).await?,
        }
        Ok(Arc::new(Store {
            pool,
            backend,
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

    /// Whether the store answers, for `/readyz`.
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    /// Insert a batch in one transaction. SQLite rows go in multi-row statements of fixed sizes
    /// (32, then the binary digits of the rest: 50 rows = 32 + 16 + 2), so there are at
    /// most six distinct statements, each prepared once and reused, and a batch costs a
    /// few round trips to the database thread instead of one per row (with SQLite, every
    /// statement is a hand-off to sqlx's worker thread and back: two context switches
    /// per request on the gateway's cores). Re-inserting a request id is ignored, so a
    /// retried batch never duplicates.
    pub async fn insert(&self, batch: &[RequestRecord]) -> Result<(), sqlx::Error> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        let mut rest = batch;
        while !rest.is_empty() {
            let n = match self.backend {
                Backend::Sqlite => insert_chunk(rest.len()),
                // PostgreSQL types a multi-row VALUES list column by column across the
                // rows, and sqlx declares a NULL's type from its Rust type, so rows
                // with NULLs in different columns fail to unify; row by row, each value
                // is only cast to its column.
                Backend::Postgres => 1,
            };
            let (chunk, tail) = rest.split_at(n);
            let mut query = sqlx::query(insert_sql(n));
            for r in chunk {
                query = bind_record(query, r);
            }
            query.execute(&mut *tx).await?;
            rest = tail;
        }
        tx.commit().await
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
        self.pool.close().await;
    }
}

/// `INSERT INTO requests (...) VALUES ($1, ..., $N) ON CONFLICT DO NOTHING`, built once.
/// Rows per statement for the next chunk of a batch of `left` rows.
fn insert_chunk(left: usize) -> usize {
    if left >= INSERT_CHUNKS[0] {
        INSERT_CHUNKS[0]
    } else {
        // The largest power of two not above `left`.
        1 << (usize::BITS - 1 - left.leading_zeros())
    }
}

/// The multi-row statement sizes (45 columns x 32 rows stays far below both backends'
/// bind-parameter limits).
const INSERT_CHUNKS: [usize; 6] = [32, 16, 8, 4, 2, 1];

fn insert_sql(rows: usize) -> &'static str {
    static SQL: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
        INSERT_CHUNKS
            .iter()
            .map(|&rows| {
                let values: Vec<String> = (0..rows)
                    .map(|row| {
                        let params: Vec<String> = (1..=COLUMNS.len())
                            .map(|i| format!("${}", row * COLUMNS.len() + i))
                            .collect();
                        format!("({})", params.join(", "))
                    })
                    .collect();
                format!(
                    "INSERT INTO requests ({}) VALUES {} ON CONFLICT (request_id) DO NOTHING",
                    COLUMNS.join(", "),
                    values.join(", ")
                )
            })
            .collect()
    });
    let i = INSERT_CHUNKS
        .iter()
        .position(|&n| n == rows)
        .unwrap_or(INSERT_CHUNKS.len() - 1);
    &SQL[i]
}

/// One record's values, in [`COLUMNS`] order.
fn bind_record<'q>(
    query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    r: &RequestRecord,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    query
        .bind(r.request_id.clone())
        .bind(to_i64(r.started_at_ms))
        .bind(r.endpoint.as_str().to_string())
        .bind(i64::from(r.stream))
        .bind(r.key_id.clone())
        .bind(r.user.clone())
        .bind(r.tier.clone())
        .bind(r.feature.clone())
        .bind(r.model_requested.clone())
        .bind(r.model.clone())
        .bind(r.provider.clone())
        .bind(r.prompt_id.clone())
        .bind(r.prompt_version.clone())
        .bind(r.prompt_hash.clone())
        .bind(r.experiment.clone())
        .bind(r.variant.clone())
        .bind(r.outcome().as_str().to_string())
        .bind(i64::from(r.status))
        .bind(r.error_code.clone())
        .bind(i64::from(r.retries))
        .bind(i64::from(r.upstream_calls))
        .bind(r.fallback.map(|f| f.as_str().to_string()))
        .bind(r.cache_status.clone())
        .bind(i64::from(r.prompt_tokens))
        .bind(i64::from(r.completion_tokens))
        .bind(i64::from(r.tokens_estimated))
        .bind(r.cost_micros)
        .bind(r.latency_ms)
        .bind(r.ttft_ms)
        .bind(r.upstream_ms)
        .bind(r.overhead_ms)
        .bind(r.input_hash.clone())
        .bind(r.regeneration_of.clone())
        .bind(r.request_body.clone())
        .bind(r.response_body.clone())
        .bind(r.guard_changes.clone())
        .bind(r.guard_flags.clone())
        .bind(r.output_check.clone())
        .bind(r.owner.clone())
        .bind(r.limited_by.clone())
        .bind(r.cost_nanos)
        .bind(r.cost_saved_nanos)
        .bind(i64::from(r.cached_prompt_tokens))
        .bind(r.output_checks.clone())
        .bind(r.routed_by.clone())
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
    async fn write(&mut self, batch: &[RequestRecord]) {
        let mut delay = Duration::from_millis(50);
        for attempt in 1..=3 {
            match self.0.insert(batch).await {
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

    #[test]
    fn batches_split_into_the_fixed_statement_sizes() {
        for len in 1..200 {
            let (mut left, mut statements) = (len, 0);
            while left > 0 {
                let n = insert_chunk(left);
                assert!(INSERT_CHUNKS.contains(&n) && n <= left, "{len}: chunk {n}");
                assert!(insert_sql(n).matches("), (").count() == n - 1);
                left -= n;
                statements += 1;
            }
            assert!(statements <= len / 32 + 5, "{len} rows took {statements}");
        }
        assert_eq!(insert_chunk(50), 32);
        assert_eq!(insert_chunk(18), 16);
        assert_eq!(insert_chunk(2), 2);
    }
}
