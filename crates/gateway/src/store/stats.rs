//! The request log aggregated in SQL, for `sluice stats`, `GET /admin/stats` and the
//! dashboard's overview. One query scans the window once and answers a few hundred
//! cells (one per combination of the asked dimensions and outcome) instead of every row:
//! moving 100k rows out of sqlx's `Any` driver costs seconds, a GROUP BY tens of
//! milliseconds. Sums are exact (integers); percentiles stay exact because every cell
//! carries its latencies as text (stored to the microsecond, they read back exactly from
//! SQLite's 15 digits and PostgreSQL's shortest exact form), and [`crate::stats`] merges
//! cells and ranks them.

use sqlx::Row;

use super::{Backend, Store};

/// What to group the requests started at or after `since_ms` by, besides their outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CellQuery {
    pub since_ms: i64,
    /// Time buckets this many milliseconds wide (whole minutes), counted from
    /// [`bucket_origin`]`(since_ms)`.
    pub bucket_ms: Option<i64>,
    /// Hour of day, UTC.
    pub hour: bool,
    pub model: bool,
    pub feature: bool,
    pub user: bool,
    /// Only the requests of these end users.
    pub users: Option<Vec<String>>,
}

/// The requests of one combination of grouped attributes and one outcome. An attribute
/// that was not grouped by is `None`, as is a missing one (a request without a user).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatCell {
    pub bucket: Option<i64>,
    pub hour: Option<i64>,
    pub model: Option<String>,
    pub feature: Option<String>,
    pub user: Option<String>,
    pub outcome: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cached_prompt_tokens: i64,
    pub cost_nanos: i64,
    pub cost_saved_nanos: i64,
    pub cache_hits: i64,
    /// Requests that consulted the cache (hit or miss).
    pub cache_lookups: i64,
    pub regenerations: i64,
    pub feedback_count: i64,
    pub feedback_sum: f64,
    pub latencies_ms: Vec<f64>,
    /// Of the requests that had a first token.
    pub ttfts_ms: Vec<f64>,
}

/// What tells cells apart: bucket, hour, model, feature, user, outcome.
pub type CellKey = (
    Option<i64>,
    Option<i64>,
    Option<String>,
    Option<String>,
    Option<String>,
    String,
);

impl StatCell {
    pub fn key(&self) -> CellKey {
        (
            self.bucket,
            self.hour,
            self.model.clone(),
            self.feature.clone(),
            self.user.clone(),
            self.outcome.clone(),
        )
    }

    /// A cell with this key and nothing in it yet.
    pub fn empty(key: CellKey) -> StatCell {
        let (bucket, hour, model, feature, user, outcome) = key;
        StatCell {
            bucket,
            hour,
            model,
            feature,
            user,
            outcome,
            ..StatCell::default()
        }
    }
}

/// The exact cost of a row, in nano-dollars (as in `spend.rs`).
const COST_NANOS: &str = "COALESCE(r.cost_nanos, r.cost_micros * 1000)";

/// The minute a request started in: the grain the cells are first aggregated at. On
/// SQLite an index on this expression and the dimensions after it
/// (`migrations/sqlite/0008_stats_minute.sql`) hands rows over already in group order,
/// so the first aggregation needs no sort: sorting every row of the window was most of
/// the query's time.
const MINUTE: &str = "r.started_at_ms / 60000";

/// Where time buckets are counted from for a window starting at `since_ms`: its minute,
/// so every bucket is whole minutes (bucket widths are) and minute cells fall in one.
pub fn bucket_origin(since_ms: i64) -> i64 {
    since_ms.div_euclid(60_000).saturating_mul(60_000)
}

impl Store {
    /// The cells of `q`, in no particular order.
    pub async fn stat_cells(&self, q: &CellQuery) -> Result<Vec<StatCell>, sqlx::Error> {
        // Texts comma-joined (nulls left out).
        let joined = |text: &str| match self.backend {
            Backend::Sqlite => format!("group_concat({text}, ',')"),
            Backend::Postgres => format!("string_agg({text}, ',')"),
        };
        let values = |column: &str| match self.backend {
            // SQLite writes a double with 15 significant digits: exact for latencies,
            // which are stored to the microsecond (see `Store::insert`).
            Backend::Sqlite => joined(column),
            // PostgreSQL 12+ prints a double in the shortest form that reads back exactly.
            Backend::Postgres => joined(&format!("CAST({column} AS TEXT)")),
        };
        let sum = |expr: &str| format!("CAST(COALESCE(SUM({expr}), 0) AS BIGINT)");
        let count = |expr: &str| format!("CAST(COUNT({expr}) AS BIGINT)");
        // Per minute, then summed into the cells: name and per-minute expression.
        let sums = [
            ("requests", count("*")),
            ("prompt_tokens", sum("r.prompt_tokens")),
            ("completion_tokens", sum("r.completion_tokens")),
            ("cached_prompt_tokens", sum("r.cached_prompt_tokens")),
            ("cost_nanos", sum(COST_NANOS)),
            ("cost_saved_nanos", sum("r.cost_saved_nanos")),
            (
                "cache_hits",
                sum("CASE WHEN r.cache_status = 'hit' THEN 1 ELSE 0 END"),
            ),
            ("cache_lookups", count("r.cache_status")),
            ("regenerations", count("r.regeneration_of")),
        ];
        // Per minute, then joined into the cells.
        let lists = [
            ("latencies", values("r.latency_ms")),
            ("ttfts", values("r.ttft_ms")),
        ];
        let cells = cell_sql(
            q,
            "FROM requests r",
            "",
            &sums
                .iter()
                .chain(&lists)
                .map(|(name, expr)| format!("{expr} AS {name}"))
                .collect::<Vec<_>>(),
            &sums
                .iter()
                .map(|(name, _)| format!("{} AS {name}", sum(&format!("c.{name}"))))
                .chain(
                    lists
                        .iter()
                        .map(|(name, _)| format!("{} AS {name}", joined(&format!("c.{name}")))),
                )
                .collect::<Vec<_>>(),
        );
        // Feedback is sparse: found from its own side (CROSS JOIN keeps SQLite's join
        // order: each feedback row looks up its request, not each request its
        // feedback), and added to the cells by key.
        let feedback = cell_sql(
            q,
            "FROM feedback f CROSS JOIN requests r",
            " AND r.request_id = f.request_id",
            &[
                format!("{} AS n", count("*")),
                "SUM(f.score) AS total".into(),
            ],
            &[
                format!("{} AS n", sum("c.n")),
                "CAST(COALESCE(SUM(c.total), 0) AS DOUBLE PRECISION) AS total".into(),
            ],
        );
        let bind = |sql| {
            let mut query = sqlx::query(sql).bind(q.since_ms);
            for u in q.users.iter().flatten() {
                query = query.bind(u.clone());
            }
            query
        };
        let (cells, feedback) = tokio::try_join!(
            bind(&cells).fetch_all(&self.pool),
            bind(&feedback).fetch_all(&self.pool)
        )?;
        let mut cells = cells
            .iter()
            .map(|r| {
                Ok(StatCell {
                    bucket: r.try_get("g_bucket")?,
                    hour: r.try_get("g_hour")?,
                    model: r.try_get("g_model")?,
                    feature: r.try_get("g_feature")?,
                    user: r.try_get("g_user")?,
                    outcome: r.try_get("g_outcome")?,
                    requests: r.try_get("requests")?,
                    prompt_tokens: r.try_get("prompt_tokens")?,
                    completion_tokens: r.try_get("completion_tokens")?,
                    cached_prompt_tokens: r.try_get("cached_prompt_tokens")?,
                    cost_nanos: r.try_get("cost_nanos")?,
                    cost_saved_nanos: r.try_get("cost_saved_nanos")?,
                    cache_hits: r.try_get("cache_hits")?,
                    cache_lookups: r.try_get("cache_lookups")?,
                    regenerations: r.try_get("regenerations")?,
                    feedback_count: 0,
                    feedback_sum: 0.0,
                    latencies_ms: floats(r.try_get("latencies")?, "latencies")?,
                    ttfts_ms: floats(r.try_get("ttfts")?, "ttfts")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        if !feedback.is_empty() {
            let mut index: std::collections::HashMap<CellKey, usize> = cells
                .iter()
                .enumerate()
                .map(|(i, c)| (c.key(), i))
                .collect();
            for r in &feedback {
                let k: CellKey = (
                    r.try_get("g_bucket")?,
                    r.try_get("g_hour")?,
                    r.try_get("g_model")?,
                    r.try_get("g_feature")?,
                    r.try_get("g_user")?,
                    r.try_get("g_outcome")?,
                );
                // A rated request's cell exists, unless the request was written between
                // the two queries.
                let i = *index.entry(k).or_insert_with_key(|k| {
                    cells.push(StatCell::empty(k.clone()));
                    cells.len() - 1
                });
                cells[i].feedback_count += r.try_get::<i64, _>("n")?;
                cells[i].feedback_sum += r.try_get::<f64, _>("total")?;
            }
        }
        Ok(cells)
    }

    /// The `limit` end users whose requests started at or after `since_ms` cost most,
    /// most first (then most requests, then by name).
    pub async fn top_users(&self, since_ms: i64, limit: usize) -> Result<Vec<String>, sqlx::Error> {
        let rows = sqlx::query(&format!(
            "SELECT r.user_id AS g_user FROM requests r \
             WHERE {MINUTE} >= {since_minute} AND r.started_at_ms >= $1 AND r.user_id IS NOT NULL \
             GROUP BY r.user_id \
             ORDER BY COALESCE(SUM({COST_NANOS}), 0) DESC, COUNT(*) DESC, r.user_id LIMIT $2",
            since_minute = since_ms.div_euclid(60_000),
        ))
        .bind(since_ms)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| r.try_get("g_user")).collect()
    }
}

/// The SQL of `q`'s cells over the rows of `from` (which names the requests `r`; `also`
/// adds to the WHERE clause): `inner` aggregates them per minute and combination of
/// dimensions, in the order of the minute index, and `outer` (over those, named `c`)
/// into `q`'s cells. Both get their key columns added; `$1` is `q.since_ms`, then come
/// the users of `q.users`.
fn cell_sql(q: &CellQuery, from: &str, also: &str, inner: &[String], outer: &[String]) -> String {
    let origin = bucket_origin(q.since_ms);
    // The outer key columns; each position is where it stands in the SELECT list.
    let mut keys = Vec::new();
    let mut key = |position: usize, on: bool, expr: String, null: &str| {
        if on {
            keys.push(position);
            expr
        } else {
            format!("CAST(NULL AS {null})")
        }
    };
    let bucket = key(
        1,
        q.bucket_ms.is_some(),
        format!(
            "(c.minute * 60000 - {origin}) / {}",
            q.bucket_ms.unwrap_or(60_000).max(1)
        ),
        "BIGINT",
    );
    let hour = key(2, q.hour, "(c.minute / 60) % 24".into(), "BIGINT");
    let model = key(3, q.model, "c.model".into(), "TEXT");
    let feature = key(4, q.feature, "c.feature".into(), "TEXT");
    let user = key(5, q.user, "c.user_id".into(), "TEXT");
    keys.push(6);
    let mut users_sql = String::new();
    if let Some(users) = &q.users {
        let list: Vec<String> = (0..users.len()).map(|i| format!("${}", i + 2)).collect();
        users_sql = if list.is_empty() {
            " AND 1 = 0".into()
        } else {
            format!(" AND r.user_id IN ({})", list.join(", "))
        };
    }
    // The inner grouping takes the minute index's columns, in its order, so SQLite
    // streams it. Grouping by user needs a sort anyway: then the minute is left out
    // unless asked for (a cell per user and minute would be nearly a cell per row).
    let by_minute = !q.user || q.bucket_ms.is_some() || q.hour;
    let minute = if by_minute {
        MINUTE
    } else {
        "CAST(NULL AS BIGINT)"
    };
    let inner_user = if q.user {
        "r.user_id"
    } else {
        "CAST(NULL AS TEXT)"
    };
    // Positions in the inner SELECT list: minute, model, feature, outcome, user.
    let inner_groups = [(by_minute, "1"), (true, "2, 3, 4"), (q.user, "5")]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, positions)| *positions)
        .collect::<Vec<_>>()
        .join(", ");
    // Positional GROUP BY: an alias named like a column would group by the column
    // on PostgreSQL.
    let group_by: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    format!(
        "SELECT {bucket} AS g_bucket, {hour} AS g_hour, {model} AS g_model, \
         {feature} AS g_feature, {user} AS g_user, c.outcome AS g_outcome, {outer} \
         FROM (SELECT {minute} AS minute, COALESCE(r.model, r.model_requested) AS model, \
         r.feature AS feature, r.outcome AS outcome, {inner_user} AS user_id, {inner} \
         {from} WHERE {MINUTE} >= {since_minute} AND r.started_at_ms >= $1{users_sql}{also} \
         GROUP BY {inner_groups}) c GROUP BY {group_by}",
        outer = outer.join(", "),
        inner = inner.join(", "),
        since_minute = q.since_ms.div_euclid(60_000),
        group_by = group_by.join(", "),
    )
}

/// The numbers of a comma-joined list (`None`: the cell had none).
fn floats(list: Option<String>, column: &str) -> Result<Vec<f64>, sqlx::Error> {
    let Some(list) = list else {
        return Ok(Vec::new());
    };
    list.split(',')
        .map(|v| {
            v.parse::<f64>().map_err(|e| sqlx::Error::ColumnDecode {
                index: column.into(),
                source: Box::new(e),
            })
        })
        .collect()
}
