//! The request log aggregated in SQL, for `sluice stats`, `GET /admin/stats` and the
//! dashboard's overview. One query scans the window once and answers a few hundred
//! cells (one per combination of the asked dimensions and outcome) instead of every row:
//! moving 100k rows out of sqlx's `Any` driver costs seconds, a GROUP BY tens of
//! milliseconds. Sums are exact (integers); percentiles stay exact because every cell
//! carries its latencies as text (SQLite prints them with 17 significant digits,
//! PostgreSQL's shortest exact form), and [`crate::stats`] merges cells and ranks them.

use sqlx::Row;

use super::{Backend, Store};

/// What to group the requests started at or after `since_ms` by, besides their outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CellQuery {
    pub since_ms: i64,
    /// Time buckets this many milliseconds wide, counted from `since_ms`.
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

/// The exact cost of a row, in nano-dollars (as in `spend.rs`).
const COST_NANOS: &str = "COALESCE(r.cost_nanos, r.cost_micros * 1000)";

impl Store {
    /// The cells of `q`, in no particular order.
    pub async fn stat_cells(&self, q: &CellQuery) -> Result<Vec<StatCell>, sqlx::Error> {
        let values = |column: &str| match self.backend {
            // `%!.17g`: 17 significant digits read back as the same double; SQLite's
            // plain text conversion keeps 15.
            Backend::Sqlite => format!(
                "group_concat(CASE WHEN {column} IS NOT NULL THEN printf('%!.17g', {column}) END, ',')"
            ),
            // PostgreSQL 12+ prints a double in the shortest form that reads back exactly.
            Backend::Postgres => format!("string_agg(CAST({column} AS TEXT), ',')"),
        };
        let sum = |expr: &str| format!("CAST(COALESCE(SUM({expr}), 0) AS BIGINT)");
        let mut keys = Vec::new();
        // Each key's position in the SELECT list below.
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
                "(r.started_at_ms - $1) / {}",
                q.bucket_ms.unwrap_or(1).max(1)
            ),
            "BIGINT",
        );
        let hour = key(
            2,
            q.hour,
            "(r.started_at_ms / 3600000) % 24".into(),
            "BIGINT",
        );
        let model = key(
            3,
            q.model,
            "COALESCE(r.model, r.model_requested)".into(),
            "TEXT",
        );
        let feature = key(4, q.feature, "r.feature".into(), "TEXT");
        let user = key(5, q.user, "r.user_id".into(), "TEXT");
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
        // Positional GROUP BY: an alias named like a column would group by the column
        // on PostgreSQL.
        let group_by: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        let sql = format!(
            "SELECT {bucket} AS g_bucket, {hour} AS g_hour, {model} AS g_model, \
             {feature} AS g_feature, {user} AS g_user, r.outcome AS g_outcome, \
             COUNT(*) AS requests, {prompt} AS prompt_tokens, {completion} AS completion_tokens, \
             {cached} AS cached_prompt_tokens, {cost} AS cost_nanos, {saved} AS cost_saved_nanos, \
             {hits} AS cache_hits, COUNT(r.cache_status) AS cache_lookups, \
             COUNT(r.regeneration_of) AS regenerations, {fb_count} AS feedback_count, \
             CAST(COALESCE(SUM(f.total), 0) AS DOUBLE PRECISION) AS feedback_sum, \
             {latencies} AS latencies, {ttfts} AS ttfts \
             FROM requests r LEFT JOIN \
             (SELECT request_id, COUNT(*) AS n, SUM(score) AS total FROM feedback GROUP BY request_id) f \
             ON f.request_id = r.request_id \
             WHERE r.started_at_ms >= $1{users_sql} GROUP BY {group_by}",
            prompt = sum("r.prompt_tokens"),
            completion = sum("r.completion_tokens"),
            cached = sum("r.cached_prompt_tokens"),
            cost = sum(COST_NANOS),
            saved = sum("r.cost_saved_nanos"),
            hits = sum("CASE WHEN r.cache_status = 'hit' THEN 1 ELSE 0 END"),
            fb_count = sum("f.n"),
            latencies = values("r.latency_ms"),
            ttfts = values("r.ttft_ms"),
            group_by = group_by.join(", "),
        );
        let mut query = sqlx::query(&sql).bind(q.since_ms);
        for u in q.users.iter().flatten() {
            query = query.bind(u.clone());
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter()
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
                    feedback_count: r.try_get("feedback_count")?,
                    feedback_sum: r.try_get("feedback_sum")?,
                    latencies_ms: floats(r.try_get("latencies")?, "latencies")?,
                    ttfts_ms: floats(r.try_get("ttfts")?, "ttfts")?,
                })
            })
            .collect()
    }

    /// The `limit` end users whose requests started at or after `since_ms` cost most,
    /// most first (then most requests, then by name).
    pub async fn top_users(&self, since_ms: i64, limit: usize) -> Result<Vec<String>, sqlx::Error> {
        let rows = sqlx::query(&format!(
            "SELECT r.user_id AS g_user FROM requests r \
             WHERE r.started_at_ms >= $1 AND r.user_id IS NOT NULL GROUP BY r.user_id \
             ORDER BY COALESCE(SUM({COST_NANOS}), 0) DESC, COUNT(*) DESC, r.user_id LIMIT $2"
        ))
        .bind(since_ms)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| r.try_get("g_user")).collect()
    }
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
