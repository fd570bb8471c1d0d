//! `sluice stats`, `/admin/stats` and the dashboard's overview: latency percentiles,
//! tokens, cost and the cost cache hits saved, error rates by outcome class, cache hit
//! rate, feedback and regeneration rate, computed exactly from the request log
//! (nearest-rank percentiles over the stored latencies, not histogram buckets; costs
//! summed as integer nano-dollars, turned into dollars last). The store aggregates in
//! SQL into [`StatCell`]s; this module merges cells into groups ([`groups`]) and ranks.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use serde::Serialize;

use crate::store::{CellKey, CellQuery, Feedback, StatCell, StatRow, Store, bucket_origin};
use crate::telemetry::Outcome;

/// How to group requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum GroupBy {
    #[default]
    None,
    Model,
    Feature,
    User,
    /// Hour of day, UTC.
    Hour,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

/// The figures for one group.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupStats {
    pub group: String,
    pub requests: u64,
    /// Requests per outcome class (`ok`, `api_error`, `bad_output`, ...).
    pub outcomes: BTreeMap<&'static str, u64>,
    /// Share of requests that failed upstream (API errors), apart from bad outputs.
    pub api_error_rate: f64,
    pub bad_output_rate: f64,
    pub latency_ms: Option<Percentiles>,
    pub ttft_ms: Option<Percentiles>,
    pub prompt_tokens: u64,
    /// The part of `prompt_tokens` the upstream served from its prompt cache.
    pub cached_prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: f64,
    /// What cache hits saved: the cost they would have had upstream.
    pub cost_saved_usd: f64,
    /// Hits over lookups; `None` when the cache was never consulted.
    pub cache_hit_rate: Option<f64>,
    pub feedback_count: u64,
    pub feedback_mean: Option<f64>,
    pub regenerations: u64,
    pub regeneration_rate: f64,
}

/// Nearest-rank percentile of sorted values: the smallest value with at least `p`% of
/// the values at or below it.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    (!sorted.is_empty()).then(|| sorted[rank(sorted.len(), p)])
}

/// The index of the nearest-rank `p`th percentile among `len` sorted values (`len` > 0).
fn rank(len: usize, p: f64) -> usize {
    (((p / 100.0) * len as f64).ceil() as usize).clamp(1, len) - 1
}

/// p50, p95 and p99 by selection rather than a full sort: each pick leaves the smaller
/// values before it, so the next pick searches only those (the dashboard ranks the same
/// 100k latencies for five breakdowns).
fn percentiles(mut values: Vec<f64>) -> Option<Percentiles> {
    if values.is_empty() {
        return None;
    }
    let len = values.len();
    let mut pick = |end: usize, p: f64| select_nth(&mut values[..end], rank(len, p));
    let p99 = pick(len, 99.0);
    let p95 = pick(rank(len, 99.0) + 1, 95.0);
    let p50 = pick(rank(len, 95.0) + 1, 50.0);
    Some(Percentiles { p50, p95, p99 })
}

/// The `k`th smallest of `v` (0-based; `k < v.len()`), leaving the smaller values
/// before it: Hoare's quickselect, pivot the median of three. Written by hand although
/// std has `select_nth_unstable_by`: std's, instantiated in this crate, runs its
/// unchecked-pointer internals with their debug checks in unoptimized builds, where it
/// made the dashboard's overview (100k latencies ranked for five breakdowns; the
/// browser test measures a debug build) almost twice as costly. Optimized, the two are
/// alike. Latencies are never NaN.
fn select_nth(v: &mut [f64], k: usize) -> f64 {
    let (mut lo, mut hi) = (0, v.len() - 1);
    while lo < hi {
        // The median of v[lo], v[mid], v[hi] moved to v[lo], as the pivot: then the
        // partition below always splits [lo, hi] into two non-empty parts.
        let mid = lo + (hi - lo) / 2;
        if v[mid] < v[lo] {
            v.swap(mid, lo);
        }
        if v[hi] < v[lo] {
            v.swap(hi, lo);
        }
        if v[hi] < v[mid] {
            v.swap(hi, mid);
        }
        v.swap(lo, mid);
        let pivot = v[lo];
        // Hoare: afterwards v[lo..=j] <= pivot <= v[j + 1..=hi], lo <= j < hi.
        let (mut i, mut j) = (lo, hi);
        loop {
            while v[i] < pivot {
                i += 1;
            }
            while v[j] > pivot {
                j -= 1;
            }
            if i >= j {
                break;
            }
            v.swap(i, j);
            i += 1;
            j -= 1;
        }
        if k <= j {
            hi = j;
        } else {
            lo = j + 1;
        }
    }
    v[k]
}

/// The cell query behind a grouping: by `by` and outcome, since `since_ms`.
pub fn query_for(by: GroupBy, since_ms: i64) -> CellQuery {
    CellQuery {
        since_ms,
        hour: by == GroupBy::Hour,
        model: by == GroupBy::Model,
        feature: by == GroupBy::Feature,
        user: by == GroupBy::User,
        ..CellQuery::default()
    }
}

/// What [`Store::stat_cells`] answers for `q`, computed from rows instead (in no
/// particular order): what `compute` runs on, and the reference the SQL is tested
/// against.
pub fn cells_of(rows: &[StatRow], feedback: &[Feedback], q: &CellQuery) -> Vec<StatCell> {
    let mut scores: HashMap<&str, (i64, f64)> = HashMap::new();
    for f in feedback {
        let s = scores.entry(f.request_id.as_str()).or_default();
        s.0 += 1;
        s.1 += f.score;
    }
    let mut cells: HashMap<CellKey, StatCell> = HashMap::new();
    for r in rows.iter().filter(|r| r.started_at_ms >= q.since_ms) {
        if let Some(users) = &q.users
            && !r.user.as_ref().is_some_and(|u| users.contains(u))
        {
            continue;
        }
        let key: CellKey = (
            q.bucket_ms
                .map(|step| (r.started_at_ms - bucket_origin(q.since_ms)) / step.max(1)),
            q.hour.then_some((r.started_at_ms / 3_600_000) % 24),
            q.model.then(|| r.model.clone()).flatten(),
            q.feature.then(|| r.feature.clone()).flatten(),
            q.user.then(|| r.user.clone()).flatten(),
            r.outcome.clone(),
        );
        let c = cells
            .entry(key)
            .or_insert_with_key(|k| StatCell::empty(k.clone()));
        c.requests += 1;
        c.prompt_tokens += r.prompt_tokens;
        c.completion_tokens += r.completion_tokens;
        c.cached_prompt_tokens += r.cached_prompt_tokens;
        c.cost_nanos += r.cost_nanos.unwrap_or(0);
        c.cost_saved_nanos += r.cost_saved_nanos.unwrap_or(0);
        c.cache_hits += i64::from(r.cache_status.as_deref() == Some("hit"));
        c.cache_lookups += i64::from(r.cache_status.is_some());
        c.regenerations += i64::from(r.regeneration_of.is_some());
        if let Some((n, total)) = scores.get(r.request_id.as_str()) {
            c.feedback_count += n;
            c.feedback_sum += total;
        }
        c.latencies_ms.push(r.latency_ms);
        c.ttfts_ms.extend(r.ttft_ms);
    }
    cells.into_values().collect()
}

/// Aggregate rows (and the feedback on them) into one entry per group, sorted by group.
pub fn compute(rows: &[StatRow], feedback: &[Feedback], by: GroupBy) -> Vec<GroupStats> {
    groups(&cells_of(rows, feedback, &query_for(by, i64::MIN)), by)
}

/// The group a cell belongs to.
fn group_key(cell: &StatCell, by: GroupBy) -> String {
    let or_none = |v: &Option<String>| v.clone().unwrap_or_else(|| "(none)".into());
    match by {
        GroupBy::None => "all".into(),
        GroupBy::Model => or_none(&cell.model),
        GroupBy::Feature => or_none(&cell.feature),
        GroupBy::User => or_none(&cell.user),
        GroupBy::Hour => format!("{:02}:00", cell.hour.unwrap_or(0).rem_euclid(24)),
    }
}

/// Cells merged into one entry per group, sorted by group.
pub fn groups(cells: &[StatCell], by: GroupBy) -> Vec<GroupStats> {
    let mut groups: BTreeMap<String, Totals> = BTreeMap::new();
    for c in cells {
        groups.entry(group_key(c, by)).or_default().add(c);
    }
    groups
        .into_iter()
        .map(|(group, totals)| totals.finish(group))
        .collect()
}

/// Cells being merged into one group.
#[derive(Default)]
struct Totals {
    requests: u64,
    outcomes: BTreeMap<&'static str, u64>,
    prompt_tokens: i64,
    completion_tokens: i64,
    cached_prompt_tokens: i64,
    cost_nanos: i128,
    cost_saved_nanos: i128,
    cache_hits: u64,
    cache_lookups: u64,
    regenerations: u64,
    feedback_count: u64,
    feedback_sum: f64,
    latencies_ms: Vec<f64>,
    ttfts_ms: Vec<f64>,
}

impl Totals {
    fn add(&mut self, c: &StatCell) {
        let count = |v: i64| u64::try_from(v).unwrap_or(0);
        let o = Outcome::parse(&c.outcome).unwrap_or(Outcome::ApiError);
        *self.outcomes.entry(o.as_str()).or_default() += count(c.requests);
        self.requests += count(c.requests);
        self.prompt_tokens += c.prompt_tokens;
        self.completion_tokens += c.completion_tokens;
        self.cached_prompt_tokens += c.cached_prompt_tokens;
        self.cost_nanos += i128::from(c.cost_nanos);
        self.cost_saved_nanos += i128::from(c.cost_saved_nanos);
        self.cache_hits += count(c.cache_hits);
        self.cache_lookups += count(c.cache_lookups);
        self.regenerations += count(c.regenerations);
        self.feedback_count += count(c.feedback_count);
        self.feedback_sum += c.feedback_sum;
        self.latencies_ms.extend_from_slice(&c.latencies_ms);
        self.ttfts_ms.extend_from_slice(&c.ttfts_ms);
    }

    /// The figures (rates are 0 for an empty group).
    fn finish(self, group: String) -> GroupStats {
        let n = self.requests;
        let share = |count: u64| if n == 0 { 0.0 } else { count as f64 / n as f64 };
        let rate = |o: Outcome| share(self.outcomes.get(o.as_str()).copied().unwrap_or(0));
        let tokens = |v: i64| u64::try_from(v).unwrap_or(0);
        GroupStats {
            requests: n,
            api_error_rate: rate(Outcome::ApiError),
            bad_output_rate: rate(Outcome::BadOutput),
            latency_ms: percentiles(self.latencies_ms),
            ttft_ms: percentiles(self.ttfts_ms),
            prompt_tokens: tokens(self.prompt_tokens),
            completion_tokens: tokens(self.completion_tokens),
            cached_prompt_tokens: tokens(self.cached_prompt_tokens),
            cost_usd: usd(self.cost_nanos),
            cost_saved_usd: usd(self.cost_saved_nanos),
            cache_hit_rate: (self.cache_lookups > 0)
                .then(|| self.cache_hits as f64 / self.cache_lookups as f64),
            feedback_count: self.feedback_count,
            feedback_mean: (self.feedback_count > 0)
                .then(|| self.feedback_sum / self.feedback_count as f64),
            regenerations: self.regenerations,
            regeneration_rate: share(self.regenerations),
            outcomes: self.outcomes,
            group,
        }
    }
}

/// One time bucket of [`Overview::series`]: the same figures as a group, for the
/// requests started in `[start_ms, start_ms + step_ms)`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeriesPoint {
    pub start_ms: i64,
    #[serde(flatten)]
    pub stats: GroupStats,
}

/// Everything the dashboard draws from the request log: totals, a time series,
/// breakdowns by model, feature and hour of day, and the top users by cost.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Overview {
    pub since_ms: i64,
    pub until_ms: i64,
    pub step_ms: i64,
    pub total: GroupStats,
    pub series: Vec<SeriesPoint>,
    pub by_model: Vec<GroupStats>,
    pub by_feature: Vec<GroupStats>,
    pub by_hour: Vec<GroupStats>,
    /// The users who cost most, most first.
    pub top_users: Vec<GroupStats>,
}

/// How many buckets the time series aims at, and how many top users are shown.
pub const SERIES_BUCKETS: i64 = 60;
pub const TOP_USERS: usize = 10;

/// Bucket width for a window: about [`SERIES_BUCKETS`] buckets, whole minutes.
pub fn step_for(since_ms: i64, until_ms: i64) -> i64 {
    let span = (until_ms - since_ms).max(1);
    let step = (span + SERIES_BUCKETS - 1) / SERIES_BUCKETS;
    ((step + 59_999) / 60_000).max(1) * 60_000
}

/// The cell query the overview reads everything but the top users from.
pub fn overview_query(since_ms: i64, until_ms: i64) -> CellQuery {
    CellQuery {
        since_ms,
        bucket_ms: Some(step_for(since_ms, until_ms)),
        hour: true,
        model: true,
        feature: true,
        ..CellQuery::default()
    }
}

/// The dashboard's figures for `[since_ms, until_ms]` from the cells of
/// [`overview_query`] and the cells of the users to rank (grouped by user; the top
/// [`TOP_USERS`] of them are kept).
pub fn overview(
    cells: &[StatCell],
    user_cells: &[StatCell],
    since_ms: i64,
    until_ms: i64,
) -> Overview {
    let step_ms = step_for(since_ms, until_ms);
    // The breakdowns each rank the window's every latency again: half of them on a
    // second thread.
    let ((total, by_model), (series, by_feature, by_hour, top_users)) = std::thread::scope(|s| {
        let other = s.spawn(|| {
            let total = groups(cells, GroupBy::None)
                .pop()
                .unwrap_or_else(|| Totals::default().finish("all".into()));
            (total, groups(cells, GroupBy::Model))
        });
        let here = (
            series(cells, since_ms, until_ms, step_ms),
            groups(cells, GroupBy::Feature),
            groups(cells, GroupBy::Hour),
            top_users(user_cells),
        );
        let other = other
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (other, here)
    });
    Overview {
        since_ms,
        until_ms,
        step_ms,
        total,
        series,
        by_model,
        by_feature,
        by_hour,
        top_users,
    }
}

/// The time series: one point per `step_ms` bucket of the window, empty ones included.
fn series(cells: &[StatCell], since_ms: i64, until_ms: i64, step_ms: i64) -> Vec<SeriesPoint> {
    let origin = bucket_origin(since_ms);
    let buckets = usize::try_from((until_ms - origin).max(0) / step_ms + 1).unwrap_or(1);
    let mut by_bucket: Vec<Totals> = std::iter::repeat_with(Totals::default)
        .take(buckets)
        .collect();
    for c in cells {
        if let Some(bucket) = c
            .bucket
            .and_then(|b| usize::try_from(b).ok())
            .and_then(|i| by_bucket.get_mut(i))
        {
            bucket.add(c);
        }
    }
    by_bucket
        .into_iter()
        .enumerate()
        .map(|(i, totals)| {
            let start_ms = origin + i as i64 * step_ms;
            SeriesPoint {
                start_ms,
                stats: totals.finish(start_ms.to_string()),
            }
        })
        .collect()
}

/// The [`TOP_USERS`] users who cost most (then made most requests), most first.
fn top_users(user_cells: &[StatCell]) -> Vec<GroupStats> {
    let mut users: BTreeMap<&str, Totals> = BTreeMap::new();
    for c in user_cells {
        if let Some(user) = &c.user {
            users.entry(user).or_default().add(c);
        }
    }
    // Ranked before finishing: only the kept users' latencies are ranked. By name,
    // then stably by cost and requests.
    let mut ranked: Vec<(&str, Totals)> = users.into_iter().collect();
    ranked.sort_by(|(_, a), (_, b)| {
        b.cost_nanos
            .cmp(&a.cost_nanos)
            .then(b.requests.cmp(&a.requests))
    });
    ranked.truncate(TOP_USERS);
    ranked
        .into_iter()
        .map(|(user, totals)| totals.finish(user.to_string()))
        .collect()
}

/// Integer nano-dollars, summed exactly, in dollars.
fn usd(nanos: i128) -> f64 {
    nanos as f64 / 1e9
}

/// A plain table for a terminal.
pub fn render_table(stats: &[GroupStats], by: GroupBy) -> String {
    let mut out = String::new();
    let head = match by {
        GroupBy::None => "group",
        GroupBy::Model => "model",
        GroupBy::Feature => "feature",
        GroupBy::User => "user",
        GroupBy::Hour => "hour (UTC)",
    };
    let _ = writeln!(
        out,
        "{head:<24} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>10} {:>10} {:>7} {:>7} {:>8} {:>7}",
        "requests",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "ttft p50",
        "ttft p99",
        "tokens in",
        "tokens out",
        "cost $",
        "saved $",
        "api err",
        "bad out",
        "feedback",
        "regen"
    );
    let f = |v: Option<f64>| v.map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into());
    for s in stats {
        let _ = writeln!(
            out,
            "{:<24} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>10.4} {:>10.4} {:>6.1}% {:>6.1}% {:>8} {:>6.1}%",
            truncate(&s.group, 24),
            s.requests,
            f(s.latency_ms.map(|p| p.p50)),
            f(s.latency_ms.map(|p| p.p95)),
            f(s.latency_ms.map(|p| p.p99)),
            f(s.ttft_ms.map(|p| p.p50)),
            f(s.ttft_ms.map(|p| p.p99)),
            s.prompt_tokens,
            s.completion_tokens,
            s.cost_usd,
            s.cost_saved_usd,
            s.api_error_rate * 100.0,
            s.bad_output_rate * 100.0,
            s.feedback_mean
                .map(|m| format!("{m:+.2}"))
                .unwrap_or_else(|| "-".into()),
            s.regeneration_rate * 100.0,
        );
    }
    if stats.is_empty() {
        out.push_str("(no requests in this period)\n");
    } else {
        let mut outcomes: BTreeMap<&str, u64> = BTreeMap::new();
        for s in stats {
            for (k, v) in &s.outcomes {
                *outcomes.entry(k).or_default() += v;
            }
        }
        let parts: Vec<String> = outcomes.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let hits: Vec<String> = stats
            .iter()
            .filter_map(|s| {
                s.cache_hit_rate
                    .map(|r| format!("{}={:.1}%", s.group, r * 100.0))
            })
            .collect();
        let _ = writeln!(out, "\noutcomes: {}", parts.join(" "));
        if !hits.is_empty() {
            let _ = writeln!(out, "cache hit rate: {}", hits.join(" "));
        }
    }
    out
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}

/// `sluice stats`: read the request log named by `config` and render the figures.
pub async fn report(
    config: &crate::Config,
    since: std::time::Duration,
    by: GroupBy,
    json: bool,
) -> anyhow::Result<String> {
    let store = crate::store::Store::open(&config.storage.target).await?;
    let since_ms = since_ms(now_ms(), since);
    let read = read(&store, since_ms, by).await;
    store.close().await;
    let groups = read?;
    if json {
        Ok(serde_json::to_string_pretty(&stats_json(
            since_ms, by, groups,
        ))?)
    } else {
        Ok(render_table(&groups, by))
    }
}

/// The figures by `by` for the requests started at or after `since_ms`, aggregated by
/// the store.
pub async fn read(
    store: &Store,
    since_ms: i64,
    by: GroupBy,
) -> Result<Vec<GroupStats>, sqlx::Error> {
    Ok(groups(
        &store.stat_cells(&query_for(by, since_ms)).await?,
        by,
    ))
}

/// The dashboard's overview of `[since_ms, until_ms]`: the cells, and beside them (on
/// another connection) who the top users are and their cells.
pub async fn read_overview(
    store: &Store,
    since_ms: i64,
    until_ms: i64,
) -> Result<Overview, sqlx::Error> {
    let users = async {
        let top = store.top_users(since_ms, TOP_USERS).await?;
        store
            .stat_cells(&CellQuery {
                users: Some(top),
                ..query_for(GroupBy::User, since_ms)
            })
            .await
    };
    let query = overview_query(since_ms, until_ms);
    let (cells, user_cells) = tokio::try_join!(store.stat_cells(&query), users)?;
    // Ranking 100k latencies for every breakdown is CPU work: not on a request thread.
    let merged =
        tokio::task::spawn_blocking(move || overview(&cells, &user_cells, since_ms, until_ms))
            .await;
    match merged {
        Ok(overview) => Ok(overview),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // Cancelled: the runtime is shutting down.
        Err(_) => Err(sqlx::Error::WorkerCrashed),
    }
}

/// What `sluice stats --json` prints, and `GET /admin/stats` answers.
pub fn stats_json(since_ms: i64, by: GroupBy, groups: Vec<GroupStats>) -> serde_json::Value {
    serde_json::json!({
        "since_ms": since_ms,
        "by": format!("{by:?}").to_lowercase(),
        "groups": groups,
    })
}

pub use crate::usage::now_ms;

/// The start of a window `since` long that ends at `now_ms`.
pub fn since_ms(now_ms: i64, since: std::time::Duration) -> i64 {
    now_ms.saturating_sub(i64::try_from(since.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_finds_what_sorting_finds() {
        // Deterministic pseudo-random inputs: wide and narrow value ranges (many
        // duplicates), sorted, reversed and constant runs, lengths 1 to 300.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for case in 0..600 {
            let len = 1 + (next() % 300) as usize;
            let spread = [3, 50, 1_000_000][case % 3];
            let mut v: Vec<f64> = (0..len).map(|_| (next() % spread) as f64 / 8.0).collect();
            match case % 5 {
                0 => v.sort_by(f64::total_cmp),
                1 => v.sort_by(|a, b| b.total_cmp(a)),
                2 => v.iter_mut().for_each(|x| *x = 4.5),
                _ => {}
            }
            let mut sorted = v.clone();
            sorted.sort_by(f64::total_cmp);
            let k = (next() % len as u64) as usize;
            let mut w = v.clone();
            assert_eq!(select_nth(&mut w, k), sorted[k], "case {case}: {v:?} k={k}");
            assert!(
                w[..k].iter().all(|x| *x <= w[k]),
                "case {case}: smaller first"
            );
            assert!(
                w[k + 1..].iter().all(|x| *x >= w[k]),
                "case {case}: larger after"
            );
            let p = percentiles(v.clone()).unwrap();
            assert_eq!(p.p50, percentile(&sorted, 50.0).unwrap(), "case {case}");
            assert_eq!(p.p95, percentile(&sorted, 95.0).unwrap(), "case {case}");
            assert_eq!(p.p99, percentile(&sorted, 99.0).unwrap(), "case {case}");
        }
    }

    fn row(id: &str, model: &str, outcome: &str, latency: f64, hour: i64) -> StatRow {
        StatRow {
            request_id: id.into(),
            started_at_ms: hour * 3_600_000 + 5,
            key_id: None,
            user: Some("u".into()),
            feature: None,
            model: Some(model.into()),
            outcome: outcome.into(),
            latency_ms: latency,
            ttft_ms: None,
            prompt_tokens: 3,
            completion_tokens: 4,
            cost_micros: Some(1500),
            cost_nanos: Some(1_500_000),
            cost_saved_nanos: None,
            cached_prompt_tokens: 0,
            cache_status: None,
            regeneration_of: None,
        }
    }

    #[test]
    fn cost_and_savings_sum_exactly_by_model_feature_user_and_hour() {
        // 1.05 micro-dollars each: micro-dollar rounding per row would show $0.000004.
        let mut rows: Vec<StatRow> = (0..4)
            .map(|i| {
                let mut r = row(
                    &format!("r{i}"),
                    if i < 3 { "m1" } else { "m2" },
                    "ok",
                    1.0,
                    i,
                );
                r.cost_micros = Some(1);
                r.cost_nanos = Some(1_050);
                r.feature = Some(if i % 2 == 0 { "chat" } else { "search" }.into());
                r.user = Some(format!("u{}", i % 3));
                r.cached_prompt_tokens = 2;
                r
            })
            .collect();
        // A cache hit: cost 0, 0.000435 saved.
        rows[1].cost_nanos = Some(0);
        rows[1].cost_micros = Some(0);
        rows[1].cost_saved_nanos = Some(435_000);
        let all = &compute(&rows, &[], GroupBy::None)[0];
        assert_eq!(all.cost_usd, 3_150.0 / 1e9);
        assert_eq!(all.cost_saved_usd, 435_000.0 / 1e9);
        assert_eq!(all.cached_prompt_tokens, 8);
        let by = |g| {
            compute(&rows, &[], g)
                .into_iter()
                .map(|s| (s.group, s.cost_usd, s.cost_saved_usd))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            by(GroupBy::Model),
            [
                ("m1".to_string(), 2_100.0 / 1e9, 435_000.0 / 1e9),
                ("m2".to_string(), 1_050.0 / 1e9, 0.0)
            ]
        );
        assert_eq!(
            by(GroupBy::Feature),
            [
                ("chat".to_string(), 2_100.0 / 1e9, 0.0),
                ("search".to_string(), 1_050.0 / 1e9, 435_000.0 / 1e9)
            ]
        );
        assert_eq!(by(GroupBy::User)[0], ("u0".to_string(), 2_100.0 / 1e9, 0.0));
        assert_eq!(
            by(GroupBy::Hour)[1],
            ("01:00".to_string(), 0.0, 435_000.0 / 1e9)
        );
        let table = render_table(&compute(&rows, &[], GroupBy::Model), GroupBy::Model);
        assert!(table.contains("saved $"), "{table}");
    }

    #[test]
    fn selected_percentiles_equal_the_sorted_ones() {
        // A deterministic spread with ties and a tail, at sizes around the rank edges.
        for len in [1usize, 2, 3, 19, 20, 21, 99, 100, 101, 1000, 4567] {
            let values: Vec<f64> = (0..len)
                .map(|i| ((i * 7919) % 251) as f64 / 3.0 + if i % 97 == 0 { 1e4 } else { 0.0 })
                .collect();
            let mut sorted = values.clone();
            sorted.sort_by(f64::total_cmp);
            let got = percentiles(values).unwrap();
            assert_eq!(got.p50, percentile(&sorted, 50.0).unwrap(), "{len}");
            assert_eq!(got.p95, percentile(&sorted, 95.0).unwrap(), "{len}");
            assert_eq!(got.p99, percentile(&sorted, 99.0).unwrap(), "{len}");
        }
        assert_eq!(percentiles(Vec::new()), None);
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 95.0), Some(95.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 50.0), Some(2.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn groups_rates_feedback_and_regenerations() {
        let mut rows = vec![
            row("a", "m1", "ok", 10.0, 1),
            row("b", "m1", "api_error", 30.0, 1),
            row("c", "m2", "bad_output", 20.0, 2),
            row("d", "m2", "ok", 40.0, 25),
        ];
        rows[3].regeneration_of = Some("c".into());
        rows[0].cache_status = Some("hit".into());
        rows[1].cache_status = Some("miss".into());
        let feedback = vec![
            Feedback {
                request_id: "a".into(),
                key_id: None,
                score: 1.0,
                comment: None,
                created_at_ms: 0,
            },
            Feedback {
                request_id: "c".into(),
                key_id: None,
                score: -1.0,
                comment: None,
                created_at_ms: 0,
            },
            Feedback {
                request_id: "d".into(),
                key_id: None,
                score: 0.5,
                comment: None,
                created_at_ms: 0,
            },
        ];
        let by_model = compute(&rows, &feedback, GroupBy::Model);
        assert_eq!(by_model.len(), 2);
        let m1 = &by_model[0];
        assert_eq!((m1.group.as_str(), m1.requests), ("m1", 2));
        assert_eq!(m1.api_error_rate, 0.5);
        assert_eq!(m1.cache_hit_rate, Some(0.5));
        assert_eq!(m1.feedback_mean, Some(1.0));
        assert_eq!(m1.latency_ms.unwrap().p50, 10.0);
        let m2 = &by_model[1];
        assert_eq!(m2.bad_output_rate, 0.5);
        assert_eq!(m2.feedback_mean, Some(-0.25));
        assert_eq!(m2.regeneration_rate, 0.5);
        assert_eq!(m2.cache_hit_rate, None);
        assert!((m2.cost_usd - 0.003).abs() < 1e-12);

        let by_hour = compute(&rows, &feedback, GroupBy::Hour);
        let hours: Vec<_> = by_hour
            .iter()
            .map(|g| (g.group.as_str(), g.requests))
            .collect();
        assert_eq!(
            hours,
            [("01:00", 3), ("02:00", 1)],
            "hour 25 is 01:00 the next day"
        );
        let all = compute(&rows, &feedback, GroupBy::None);
        assert_eq!(all[0].outcomes["ok"], 2);
        assert!(
            render_table(&all, GroupBy::None).contains("outcomes: api_error=1 bad_output=1 ok=2")
        );
    }
}
