//! The request log against both real backends: SQLite and the PostgreSQL server at
//! `SLUICE_TEST_DATABASE_URL`, each test in its own schema.

mod support;

use sluice_gateway::stats::{GroupBy, compute, percentile};
use sluice_gateway::store::Feedback;
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
        let rows = store.stat_rows(0).await.unwrap();
        let feedback = store.feedback_since(0).await.unwrap();

        // Independently: every stored latency for each model, sorted, nearest rank.
        for group in compute(&rows, &feedback, GroupBy::Model) {
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
        let all = &compute(&rows, &feedback, GroupBy::None)[0];
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
