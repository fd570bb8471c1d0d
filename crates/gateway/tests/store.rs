//! The request log against both real backends: SQLite and the PostgreSQL server at
//! `SLUICE_TEST_DATABASE_URL`, each test in its own schema.

mod support;

use sluice_gateway::stats::{self, GroupBy, compute, percentile};
use sluice_gateway::store::{CellQuery, Feedback};
use sluice_gateway::telemetry::{Endpoint, FallbackKind, Outcome, RequestRecord};

fn record(i: u64) -> RequestRecord {
    RequestRecord {
        request_id: format!("req_{i:04}"),
        started_at_ms: 1_700_000_000_000 + i * 1000,
        endpoint: if i.is_multiple_of(5) {
            Endpoint::Embeddings
        } else {
            Endpoint::ChatCompletions
        },
        stream: i.is_multiple_of(2),
        key_id: Some(
            if i.is_multiple_of(7) {
                "other"
            } else {
                "master"
            }
            .into(),
        ),
        user: Some(format!("user-{}", i % 3)),
        feature: Some(
            if i.is_multiple_of(2) {
                "search"
            } else {
                "chat"
            }
            .into(),
        ),
        model_requested: Some("gpt-4o-mini".into()),
        model: Some(
            if i.is_multiple_of(4) {
                "gpt-4o"
            } else {
                "gpt-4o-mini"
            }
            .into(),
        ),
        provider: Some("sim".into()),
        outcome: match i % 10 {
            0 => Outcome::ApiError,
            1 => Outcome::ClientCancelled,
            2 => Outcome::BadOutput,
            _ => Outcome::Ok,
        },
        status: 200,
        retries: (i % 3) as u32,
        upstream_calls: 1 + (i % 3) as u32,
        fallback: i.is_multiple_of(9).then_some(FallbackKind::Model),
        cache_status: i.is_multiple_of(6).then(|| "hit".to_string()),
        prompt_tokens: 10 + i as u32,
        completion_tokens: 20,
        tokens_estimated: i.is_multiple_of(8),
        cost_micros: Some(125),
        // Spread, with ties and a long tail, so percentile choice matters.
        latency_ms: ((i * 37) % 101) as f64 + if i.is_multiple_of(50) { 5000.0 } else { 0.25 },
        ttft_ms: i.is_multiple_of(2).then_some((i % 13) as f64 + 0.5),
        upstream_ms: Some(3.0),
        overhead_ms: Some(0.2),
        input_hash: Some(format!("{:016x}", i % 11)),
        regeneration_of: i
            .is_multiple_of(12)
            .then(|| format!("req_{:04}", i.saturating_sub(1))),
        ..RequestRecord::default()
    }
}

#[tokio::test]
async fn records_round_trip_on_both_backends() {
    for (name, target) in support::backends() {
        let store = support::open(name, &target).await;
        let batch: Vec<RequestRecord> = (0..300).map(record).collect();
        store.insert(&batch[..150]).await.unwrap();
        store.insert(&batch[150..]).await.unwrap();
        // A batch written twice (a retried write) does not duplicate rows.
        store.insert(&batch[..10]).await.unwrap();
        assert_eq!(store.count().await.unwrap(), 300, "{name}");

        assert_eq!(
            store.record_owner("req_0007").await.unwrap(),
            Some(Some("other".into())),
            "{name}"
        );
        assert_eq!(
            store.record_owner("req_0008").await.unwrap(),
            Some(Some("master".into())),
            "{name}"
        );
        assert_eq!(
            store.record_owner("req_9999").await.unwrap(),
            None,
            "{name}"
        );

        let rows = store.stat_rows(0).await.unwrap();
        assert_eq!(rows.len(), 300);
        // Batches go in as multi-row statements (64, 16, 4, 1 rows): every row, whichever
        // statement and position wrote it, holds its own values.
        for r in &rows {
            let want = record(r.request_id[4..].parse().unwrap());
            assert_eq!(
                (
                    r.started_at_ms,
                    r.user.as_deref(),
                    r.key_id.as_deref(),
                    r.latency_ms,
                    r.ttft_ms,
                    r.prompt_tokens,
                    r.cache_status.as_deref(),
                    r.regeneration_of.as_deref(),
                ),
                (
                    want.started_at_ms as i64,
                    want.user.as_deref(),
                    want.key_id.as_deref(),
                    want.latency_ms,
                    want.ttft_ms,
                    i64::from(want.prompt_tokens),
                    want.cache_status.as_deref(),
                    want.regeneration_of.as_deref(),
                ),
                "{name}: {}",
                r.request_id
            );
        }
        let r = rows.iter().find(|r| r.request_id == "req_0012").unwrap();
        assert_eq!(r.regeneration_of.as_deref(), Some("req_0011"), "{name}");
        assert_eq!(r.ttft_ms, Some(12.5), "{name}");
        assert_eq!(r.cache_status.as_deref(), Some("hit"), "{name}");
        assert_eq!(r.model.as_deref(), Some("gpt-4o"), "{name}");
        let since = store.stat_rows(1_700_000_000_000 + 250_000).await.unwrap();
        assert_eq!(since.len(), 50, "{name}: --since filters by start time");

        store
            .insert_feedback(&Feedback {
                request_id: "req_0003".into(),
                key_id: Some("master".into()),
                score: -0.5,
                comment: Some("too long".into()),
                created_at_ms: 1,
            })
            .await
            .unwrap();
        let fb = store.feedback_since(0).await.unwrap();
        assert_eq!(fb.len(), 1, "{name}");
        assert_eq!(
            (fb[0].score, fb[0].comment.as_deref()),
            (-0.5, Some("too long")),
            "{name}"
        );
        assert!(store.ping().await);
        store.close().await;
    }
}

#[tokio::test]
async fn stats_percentiles_equal_the_stored_latencies_percentiles() {
    for (name, target) in support::backends() {
        let store = support::open(name, &target).await;
        let batch: Vec<RequestRecord> = (0..487).map(record).collect();
        store.insert(&batch).await.unwrap();
        // Independently: every stored latency for each model, sorted, nearest rank,
        // against what the store aggregates.
        for group in stats::read(&store, 0, GroupBy::Model).await.unwrap() {
            let mut latencies: Vec<f64> = batch
                .iter()
                .filter(|r| r.model.as_deref() == Some(group.group.as_str()))
                .map(|r| r.latency_ms)
                .collect();
            latencies.sort_by(f64::total_cmp);
            let nearest_rank = |p: f64| {
                latencies[((p / 100.0 * latencies.len() as f64).ceil() as usize).max(1) - 1]
            };
            let got = group.latency_ms.unwrap();
            assert_eq!(got.p50, nearest_rank(50.0), "{name} {}", group.group);
            assert_eq!(got.p95, nearest_rank(95.0), "{name} {}", group.group);
            assert_eq!(got.p99, nearest_rank(99.0), "{name} {}", group.group);
            assert_eq!(group.requests as usize, latencies.len());
        }
        let all = &stats::read(&store, 0, GroupBy::None).await.unwrap()[0];
        assert_eq!(all.requests, 487);
        let mut every: Vec<f64> = batch.iter().map(|r| r.latency_ms).collect();
        every.sort_by(f64::total_cmp);
        assert_eq!(Some(all.latency_ms.unwrap().p99), percentile(&every, 99.0));
        assert_eq!(
            all.outcomes["api_error"],
            batch
                .iter()
                .filter(|r| r.outcome == Outcome::ApiError)
                .count() as u64
        );
        store.close().await;
    }
}

/// Latencies no 15-digit decimal writes back exactly, spread over hours, with rows that
/// lack a model (only the requested one), a feature, a user or a first token. Row 0 has
/// no TTFT: a PostgreSQL connection once typed that column by its first row's null.
fn awkward(i: u64) -> RequestRecord {
    let mut r = record(i);
    r.started_at_ms = 1_700_000_000_000 + i * 97_000;
    r.latency_ms = (i % 89) as f64 / 3.0 + 0.1 + 0.2;
    r.ttft_ms = (!i.is_multiple_of(4)).then(|| (i % 31) as f64 / 7.0);
    if i.is_multiple_of(11) {
        r.model = None;
        r.model_requested = Some(format!("req-model-{}", i % 2));
    }
    if i.is_multiple_of(13) {
        r.feature = None;
    }
    if i.is_multiple_of(17) {
        r.user = None;
    } else {
        r.user = Some(format!("user-{}", i % 23));
    }
    r.cost_micros = Some(1);
    r.cost_nanos = (!i.is_multiple_of(19)).then_some(1_000 + (i as i64 % 7) * 333);
    r.cost_saved_nanos = (i.is_multiple_of(6)).then_some(2_500);
    r.cached_prompt_tokens = (i % 5) as u32;
    r.cache_status = match i % 3 {
        0 => Some("hit".into()),
        1 => Some("miss".into()),
        _ => None,
    };
    r
}

#[tokio::test]
async fn aggregates_in_sql_equal_the_row_by_row_figures_on_both_backends() {
    for (name, target) in support::backends() {
        let store = support::open(name, &target).await;
        let batch: Vec<RequestRecord> = (0..700).map(awkward).collect();
        store.insert(&batch).await.unwrap();
        for (i, score) in [(3, 1.0), (3, -0.5), (40, 0.25), (41, -1.0), (650, 1.0)] {
            store
                .insert_feedback(&Feedback {
                    request_id: format!("req_{i:04}"),
                    key_id: None,
                    score,
                    comment: None,
                    created_at_ms: 1,
                })
                .await
                .unwrap();
        }
        let since = 1_700_000_000_000 + 30 * 97_000;
        let rows = store.stat_rows(since).await.unwrap();
        let feedback = store.feedback_since(since).await.unwrap();
        assert_eq!(rows.len(), 670, "{name}");
        // Durations are stored to the microsecond (what lets SQLite's 15-digit text of a
        // double read back exactly).
        let stored = rows.iter().find(|r| r.request_id == "req_0031").unwrap();
        assert_eq!(
            stored.latency_ms, 10.633,
            "{name}: 31 % 89 / 3 + 0.3 to the µs"
        );
        assert_ne!(
            batch[31].latency_ms, 10.633,
            "{name}: the input had more digits"
        );
        for by in [
            GroupBy::None,
            GroupBy::Model,
            GroupBy::Feature,
            GroupBy::User,
            GroupBy::Hour,
        ] {
            let sql = stats::read(&store, since, by).await.unwrap();
            let reference = compute(&rows, &feedback, by);
            assert!(!sql.is_empty(), "{name} {by:?}");
            assert_eq!(sql, reference, "{name} {by:?}");
        }
        // The microsecond latencies came back exactly (SQLite writes 15 digits).
        let all = &stats::read(&store, since, GroupBy::None).await.unwrap()[0];
        let exact = |p: f64| {
            let mut v: Vec<f64> = rows.iter().map(|r| r.latency_ms).collect();
            v.sort_by(f64::total_cmp);
            percentile(&v, p).unwrap()
        };
        assert_eq!(all.latency_ms.unwrap().p95, exact(95.0), "{name}");
        assert_eq!(
            all.feedback_count, 3,
            "{name}: req_0003 is before the window"
        );
        assert!(
            sql_groups_have(
                &stats::read(&store, since, GroupBy::Model).await.unwrap(),
                "req-model-1"
            ),
            "{name}: a row without a model counts under the model it asked for"
        );

        // The overview: the same as from the rows, top users included.
        let until = 1_700_000_000_000 + 700 * 97_000;
        let from_sql = stats::read_overview(&store, since, until).await.unwrap();
        let user_cells = stats::cells_of(&rows, &feedback, &stats::query_for(GroupBy::User, since));
        let reference = stats::overview(
            &stats::cells_of(&rows, &feedback, &stats::overview_query(since, until)),
            &user_cells,
            since,
            until,
        );
        assert_eq!(from_sql, reference, "{name}");
        assert_eq!(from_sql.top_users.len(), stats::TOP_USERS, "{name}");
        assert_eq!(from_sql.total.requests, 670, "{name}");
        let in_series: u64 = from_sql.series.iter().map(|p| p.stats.requests).sum();
        assert_eq!(in_series, 670, "{name}");

        // Cells limited to some users.
        let two = store
            .stat_cells(&CellQuery {
                users: Some(vec!["user-1".into(), "user-2".into()]),
                ..stats::query_for(GroupBy::User, since)
            })
            .await
            .unwrap();
        let users: std::collections::BTreeSet<_> =
            two.iter().map(|c| c.user.clone().unwrap()).collect();
        assert_eq!(users.len(), 2, "{name}: {users:?}");
        store.close().await;
    }
}

fn sql_groups_have(groups: &[stats::GroupStats], name: &str) -> bool {
    groups.iter().any(|g| g.group == name)
}

#[tokio::test]
async fn a_batch_repeating_an_id_keeps_one_row_on_both_backends() {
    for (name, target) in support::backends() {
        let store = support::open(name, &target).await;
        // A retried write can carry a request id twice; the first row stays.
        let mut batch: Vec<RequestRecord> = (0..40).map(awkward).collect();
        batch[12].request_id = batch[3].request_id.clone();
        batch[35].request_id = batch[20].request_id.clone();
        store.insert(&batch).await.unwrap();
        assert_eq!(store.count().await.unwrap(), 38, "{name}");
        let rows = store.stat_rows(0).await.unwrap();
        let first = rows
            .iter()
            .find(|r| r.request_id == batch[3].request_id)
            .unwrap();
        assert_eq!(
            first.started_at_ms, batch[3].started_at_ms as i64,
            "{name}: the first one stays"
        );
        store.close().await;
    }
}

#[tokio::test]
async fn a_sqlite_file_holds_every_batch_once_closed_and_a_failed_batch_leaves_no_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.db");
    let target = sluice_gateway::store::StorageTarget::Sqlite(path.clone());
    let store = support::open("sqlite file", &target).await;
    let batch: Vec<RequestRecord> = (0..300).map(record).collect();
    // Two batches at once, as the recorder's and another writer's might be.
    let (a, b) = tokio::join!(store.insert(&batch[..150]), store.insert(&batch[150..]));
    a.unwrap();
    b.unwrap();

    // A batch that fails (its table gone) is refused with SQLite's reason, and the
    // writer's next batch is not caught in the failed one's transaction.
    let side = rusqlite::Connection::open(&path).unwrap();
    side.busy_timeout(std::time::Duration::from_secs(5))
        .unwrap();
    side.execute_batch("ALTER TABLE requests RENAME TO requests_away")
        .unwrap();
    let err = store.insert(&[record(300)]).await.unwrap_err().to_string();
    assert!(err.contains("no such table"), "{err}");
    side.execute_batch("ALTER TABLE requests_away RENAME TO requests")
        .unwrap();
    drop(side);
    store.insert(&[record(301)]).await.unwrap();
    store.close().await;
    // Every connection closed, the writer's too: SQLite removes the WAL with the last.
    assert!(
        !dir.path().join("log.db-wal").exists(),
        "a connection is still open after close"
    );

    let store = support::open("sqlite file", &target).await;
    let rows = store.stat_rows(0).await.unwrap();
    assert_eq!(rows.len(), 301);
    for r in &rows {
        let want = record(r.request_id[4..].parse().unwrap());
        assert_eq!(
            (r.started_at_ms, r.latency_ms, r.ttft_ms, r.user.as_deref()),
            (
                want.started_at_ms as i64,
                want.latency_ms,
                want.ttft_ms,
                want.user.as_deref()
            ),
            "{}",
            r.request_id
        );
    }
    assert!(!rows.iter().any(|r| r.request_id == "req_0300"));
    store.close().await;
}
