//! Experiments through the whole pipeline: sticky assignment by end user (the same
//! variant on two gateway instances and after a restart, 10,000 users within two points
//! of the weights), per-request assignment, holdout, opting out, the echo header and
//! the record; then the report over the request log on SQLite and PostgreSQL, and the
//! admin API the dashboard reads.

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly by design")]

use axum::http::StatusCode;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use sluice_gateway::config::{Config, ConfigSource};
use sluice_gateway::experiments::{self, Experiment, Subject};
use sluice_gateway::telemetry::{Outcome, RequestRecord};

mod support;

use support::harness;

const MODELS: &str = r#"
[[providers]]
name = "sim"
kind = "sim"
[[models]]
name = "cheap"
provider = "sim"
upstream = "gpt-4o-mini"
[[models]]
name = "strong"
provider = "sim"
upstream = "gpt-4o"
"#;

fn with_experiment(experiment: &str) -> String {
    format!("{MODELS}\n{experiment}")
}

const MODEL_AB: &str = r#"
[[experiments]]
name = "model-ab"
target = "model"
match = { model = "cheap" }
variants = [
  { name = "a", weight = 50, model = "cheap" },
  { name = "b", weight = 50, model = "strong" },
]
"#;

fn config(text: &str) -> Config {
    Config::from_toml(
        text,
        &[("X", "")],
        ConfigSource::Embedded { simulated: false },
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn ask(user: Option<&str>) -> Value {
    let mut body = json!({"model": "cheap", "messages": [{"role": "user", "content": "hello"}]});
    if let Some(u) = user {
        body["user"] = json!(u);
    }
    body
}

#[tokio::test]
async fn a_user_gets_the_same_variant_on_two_instances_and_after_a_restart() {
    let text = with_experiment(MODEL_AB);
    let mut one = harness(&text).await;
    let mut two = harness(&text).await;
    let mut seen = std::collections::BTreeMap::new();
    for u in 0..30 {
        let user = format!("user-{u}");
        let a = one
            .send("/v1/chat/completions", ask(Some(&user)), &[])
            .await;
        let b = two
            .send("/v1/chat/completions", ask(Some(&user)), &[])
            .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
        let header = a.headers["x-sluice-experiment"]
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(header, b.headers["x-sluice-experiment"].to_str().unwrap());
        let variant = header.strip_prefix("model-ab=").unwrap().to_string();
        // The variant's model answered, and the record says who was where.
        let model = if variant == "a" { "cheap" } else { "strong" };
        assert_eq!(a.headers["x-sluice-model"], model);
        assert_eq!(a.record.experiment.as_deref(), Some("model-ab"));
        assert_eq!(a.record.variant.as_deref(), Some(variant.as_str()));
        assert_eq!(a.record.model_requested.as_deref(), Some("cheap"));
        seen.insert(user, variant);
    }
    assert!(seen.values().any(|v| v == "a") && seen.values().any(|v| v == "b"));
    // A restart: a new gateway built from the same config.
    one.gateway.shutdown.cancel();
    drop(one);
    let mut again = harness(&text).await;
    for (user, variant) in &seen {
        let r = again
            .send("/v1/chat/completions", ask(Some(user)), &[])
            .await;
        assert_eq!(
            r.headers["x-sluice-experiment"].to_str().unwrap(),
            format!("model-ab={variant}")
        );
    }
}

/// A request refused after assignment (here the input guard's 400 for an empty message)
/// still tells the client its variant, as its record does.
#[tokio::test]
async fn a_refused_request_still_echoes_its_variant() {
    let mut h = harness(&with_experiment(MODEL_AB)).await;
    let mut body = ask(Some("user-7"));
    body["messages"][0]["content"] = json!("   ");
    let r = h.send("/v1/chat/completions", body, &[]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    let variant = r.record.variant.clone().unwrap();
    assert_eq!(
        r.headers["x-sluice-experiment"].to_str().unwrap(),
        format!("model-ab={variant}")
    );
}

/// Outside its `[start, stop)` window an experiment assigns nobody: requests are served
/// as asked, with no header and nothing in the record.
#[tokio::test]
async fn an_experiment_outside_its_window_assigns_nobody() {
    let windows = [
        (
            "ended",
            "start = 2020-01-01T00:00:00Z\nstop = 2020-02-01T00:00:00Z",
        ),
        ("not started", "start = 2999-01-01T00:00:00Z"),
        (
            "running",
            "start = 2020-01-01T00:00:00Z\nstop = 2999-01-01T00:00:00Z",
        ),
    ];
    for (what, window) in windows {
        let experiment = MODEL_AB.replace(
            "target = \"model\"",
            &format!("target = \"model\"\n{window}"),
        );
        let mut h = harness(&with_experiment(&experiment)).await;
        for u in 0..8 {
            let r = h
                .send("/v1/chat/completions", ask(Some(&format!("user-{u}"))), &[])
                .await;
            assert_eq!(r.status, StatusCode::OK, "{what}: {}", r.text);
            let header = r.headers.get("x-sluice-experiment");
            if what == "running" {
                assert!(header.is_some(), "{what}");
                assert!(r.record.variant.is_some(), "{what}");
            } else {
                assert!(header.is_none(), "{what}: {header:?}");
                assert_eq!(r.record.variant, None, "{what}");
                assert_eq!(r.headers["x-sluice-model"], "cheap", "{what}");
            }
        }
    }
}

#[test]
fn ten_thousand_users_split_within_two_points_of_the_weights() {
    let c = config(&with_experiment(
        r#"
        [[experiments]]
        name = "split"
        target = "model"
        variants = [
          { name = "a", weight = 70, model = "cheap" },
          { name = "b", weight = 20, model = "strong" },
          { name = "c", weight = 10, model = "strong" },
        ]
        "#,
    ));
    let mut counts = std::collections::HashMap::new();
    for u in 0..10_000 {
        let user = format!("u{u}");
        let subject = Subject {
            user: Some(&user),
            request_id: "r",
            model: "cheap",
            ..Subject::default()
        };
        let got = experiments::assign(&c.experiments, &subject, 0, &|_| true)
            .unwrap()
            .unwrap();
        *counts.entry(got.variant).or_insert(0u32) += 1;
    }
    for (name, weight) in [("a", 0.7), ("b", 0.2), ("c", 0.1)] {
        let share = f64::from(counts[name]) / 10_000.0;
        assert!(
            (share - weight).abs() <= 0.02,
            "{name}: {share} ({counts:?})"
        );
    }
}

#[tokio::test]
async fn per_request_assignment_holdout_opt_out_and_unknown_names() {
    let text = with_experiment(
        r#"
        [[experiments]]
        name = "per-request"
        target = "model"
        assignment = "request"
        holdout = 0.2
        match = { feature = "chat" }
        variants = [
          { name = "a", weight = 1, model = "cheap" },
          { name = "b", weight = 1, model = "strong" },
        ]
        "#,
    );
    let mut h = harness(&text).await;
    let feature = [("x-sluice-feature", "chat")];
    let mut variants = std::collections::HashMap::new();
    for _ in 0..60 {
        // The same user every time: per-request assignment still spreads them.
        let r = h
            .send("/v1/chat/completions", ask(Some("same")), &feature)
            .await;
        let v = r.record.variant.clone().unwrap();
        if v == "holdout" {
            // Held out: served as asked, recorded, not echoed as a variant change.
            assert_eq!(r.headers["x-sluice-model"], "cheap");
        }
        *variants.entry(v).or_insert(0) += 1;
    }
    assert_eq!(variants.len(), 3, "{variants:?}");

    let out = h
        .send(
            "/v1/chat/completions",
            ask(Some("u")),
            &[
                ("x-sluice-feature", "chat"),
                ("x-sluice-experiment", "none"),
            ],
        )
        .await;
    assert!(out.headers.get("x-sluice-experiment").is_none());
    assert_eq!(out.record.experiment, None);

    let elsewhere = h.send("/v1/chat/completions", ask(Some("u")), &[]).await;
    assert_eq!(
        elsewhere.record.experiment, None,
        "the match is feature = chat"
    );

    let unknown = h
        .send(
            "/v1/chat/completions",
            ask(Some("u")),
            &[("x-sluice-experiment", "nope")],
        )
        .await;
    assert_eq!(unknown.status, StatusCode::BAD_REQUEST);
    assert_eq!(unknown.body["error"]["code"], "unknown_experiment");
    assert_eq!(unknown.body["error"]["param"], "x-sluice-experiment");
    assert_eq!(unknown.record.outcome, Outcome::RejectedInput);
}

#[test]
fn experiment_problems_are_reported_with_their_paths() {
    let text = with_experiment(
        r#"
        [[experiments]]
        name = "bad name"
        target = "model"
        holdout = 1.5
        control = "z"
        start = "2026-12-01T00:00:00Z"
        stop = "2026-11-01T00:00:00Z"
        variants = [{ name = "a", weight = 0, model = "nope" }]
        [[experiments]]
        name = "p"
        target = "prompt"
        variants = [{ name = "a", weight = 1, prompt = "x@v1" }, { name = "b", weight = 1, model = "cheap" }]
        "#,
    );
    let err = Config::from_toml(
        &text,
        &[("X", "")],
        ConfigSource::Embedded { simulated: false },
    )
    .unwrap_err();
    let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
    for p in [
        "experiments[0].name",
        "experiments[0].variants",
        "experiments[0].variants[0].weight",
        "experiments[0].variants[0].model",
        "experiments[0].control",
        "experiments[0].holdout",
        "experiments[0].stop",
        "experiments[1].prompt",
        "experiments[1].variants[1].prompt",
        "experiments[1].variants[1].model",
    ] {
        assert!(paths.contains(&p), "{p} missing from {paths:?}");
    }
}

// ---------------------------------------------------------------- reports

const REPORTED: &str = r#"
[[experiments]]
name = "checkout-copy"
target = "prompt"
prompt = "checkout"
variants = [
  { name = "a", weight = 50, prompt = "checkout@v1" },
  { name = "b", weight = 50, prompt = "checkout@v2" },
]
"#;

fn experiment() -> Experiment {
    config(&with_experiment(REPORTED)).experiments.remove(0)
}

/// `n` users per variant, one request each, passing their output check with the
/// variant's rate; latency, cost, errors, regenerations and feedback (on a fifth of the
/// requests) drawn the same way for every variant.
fn simulate(
    seed: u64,
    per_variant: &[(&str, usize, f64)],
) -> (Vec<RequestRecord>, Vec<sluice_gateway::store::Feedback>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let now = experiments::now_ms() - 60_000;
    let (mut records, mut feedback) = (Vec::new(), Vec::new());
    for (variant, n, pass) in per_variant {
        for i in 0..*n {
            let passed = rng.random_bool(*pass);
            let request_id = format!("req_{seed}_{variant}_{i}");
            if rng.random_bool(0.2) {
                feedback.push(sluice_gateway::store::Feedback {
                    request_id: request_id.clone(),
                    key_id: None,
                    score: if rng.random_bool(0.7) { 1.0 } else { -1.0 },
                    comment: None,
                    created_at_ms: now,
                });
            }
            records.push(RequestRecord {
                request_id,
                started_at_ms: (now + i as i64) as u64,
                user: Some(format!("user-{variant}-{i}")),
                experiment: Some("checkout-copy".into()),
                variant: Some((*variant).into()),
                outcome: if rng.random_bool(0.02) {
                    Outcome::ApiError
                } else {
                    Outcome::Ok
                },
                status: 200,
                latency_ms: 100.0 + rng.random_range(0.0..50.0),
                cost_nanos: Some(400_000 + rng.random_range(0..100_000)),
                output_check: Some(if passed { "pass" } else { "fail:flag" }.into()),
                regeneration_of: rng.random_bool(0.05).then(|| "req_x".to_string()),
                ..RequestRecord::default()
            });
        }
    }
    (records, feedback)
}

async fn report_over(
    name: &str,
    target: &sluice_gateway::store::StorageTarget,
    (records, feedback): &(Vec<RequestRecord>, Vec<sluice_gateway::store::Feedback>),
) -> experiments::Report {
    let store = support::open(name, target).await;
    for chunk in records.chunks(500) {
        store.insert(chunk).await.unwrap();
    }
    for f in feedback {
        store.insert_feedback(f).await.unwrap();
    }
    let report = experiments::report_from(&store, &experiment(), None, experiments::now_ms())
        .await
        .unwrap();
    store.close().await;
    report
}

/// Every per-variant figure equals the one computed here, by hand, from the records and
/// feedback the report read (nearest-rank percentiles over answered requests; cost over
/// answered requests; rates over every request, pass rate over checked ones).
#[tokio::test]
async fn per_variant_figures_equal_those_computed_from_the_records() {
    let data = simulate(5, &[("a", 400, 0.9), ("b", 300, 0.7)]);
    let (records, feedback) = &data;
    for (name, target) in support::backends() {
        let report = report_over(name, &target, &data).await;
        for v in &report.variants {
            let mine: Vec<&RequestRecord> = records
                .iter()
                .filter(|r| r.variant.as_deref() == Some(v.name.as_str()))
                .collect();
            let n = mine.len() as f64;
            let answered: Vec<&&RequestRecord> =
                mine.iter().filter(|r| r.outcome == Outcome::Ok).collect();
            // The log keeps latencies to the microsecond.
            let mut latencies: Vec<f64> = answered
                .iter()
                .map(|r| (r.latency_ms * 1000.0).round() / 1000.0)
                .collect();
            latencies.sort_by(f64::total_cmp);
            let nearest =
                |p: f64| latencies[((p / 100.0 * latencies.len() as f64).ceil() as usize) - 1];
            let cost = answered
                .iter()
                .map(|r| r.cost_nanos.unwrap() as f64 / 1e9)
                .sum::<f64>()
                / answered.len() as f64;
            let passed = mine
                .iter()
                .filter(|r| r.output_check.as_deref() == Some("pass"))
                .count() as f64;
            let errors = mine
                .iter()
                .filter(|r| r.outcome == Outcome::ApiError)
                .count() as f64;
            let regenerated = mine.iter().filter(|r| r.regeneration_of.is_some()).count() as f64;
            let ids: std::collections::HashSet<&str> =
                mine.iter().map(|r| r.request_id.as_str()).collect();
            let scores: Vec<f64> = feedback
                .iter()
                .filter(|f| ids.contains(f.request_id.as_str()))
                .map(|f| f.score)
                .collect();
            let close = |a: Option<f64>, b: f64, what: &str| {
                let a = a.unwrap_or_else(|| panic!("{name} {}: no {what}", v.name));
                assert!((a - b).abs() < 1e-9, "{name} {}: {what} {a} != {b}", v.name);
            };
            assert_eq!(v.requests, mine.len() as u64, "{name}");
            assert_eq!(v.users, mine.len() as u64, "{name}: one request per user");
            close(v.latency_p50_ms, nearest(50.0), "p50");
            close(v.latency_p95_ms, nearest(95.0), "p95");
            close(v.cost_per_request_usd, cost, "cost per request");
            close(v.pass_rate, passed / n, "pass rate");
            close(v.error_rate, errors / n, "error rate");
            close(v.regeneration_rate, regenerated / n, "regeneration rate");
            close(
                v.feedback_mean,
                scores.iter().sum::<f64>() / scores.len() as f64,
                "feedback mean",
            );
        }
        assert_eq!(
            report
                .variants
                .iter()
                .map(|v| v.name.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
    }
}

#[tokio::test]
async fn ten_points_lower_pass_rate_is_significant_on_both_backends() {
    let records = simulate(11, &[("a", 1500, 0.9), ("b", 1500, 0.8)]);
    for (name, target) in support::backends() {
        let report = report_over(name, &target, &records).await;
        let b = &report.variants[1];
        assert_eq!(
            (b.name.as_str(), b.requests, b.users),
            ("b", 1500, 1500),
            "{name}"
        );
        let pass = report
            .comparisons
            .iter()
            .find(|c| c.metric == "pass_rate")
            .unwrap();
        assert!(pass.significant, "{name}: {pass:?}");
        assert!(pass.p_value.unwrap() < 1e-6, "{name}: {pass:?}");
        assert!(
            (pass.difference.unwrap() + 0.1).abs() < 0.04,
            "{name}: {pass:?}"
        );
        assert!(pass.ci_low.unwrap() < pass.difference.unwrap());
        assert!(
            pass.ci_high.unwrap() < 0.0,
            "the whole interval is below zero"
        );
        assert_eq!(pass.test, "two_proportion");
        assert!(
            report.verdict.contains("b is worse than a on pass_rate"),
            "{name}: {}",
            report.verdict
        );
        assert!(!report.srm.warning);
        // Feedback is read per variant, from the feedback table.
        assert!(
            report.variants.iter().all(|v| v.feedback_mean.is_some()),
            "{name}"
        );
    }
}

#[tokio::test]
async fn a_a_experiments_are_not_significant() {
    for seed in [1, 2, 3, 4, 5] {
        let records = simulate(seed, &[("a", 1000, 0.9), ("b", 1000, 0.9)]);
        let report = report_over(
            "sqlite",
            &sluice_gateway::store::StorageTarget::Memory,
            &records,
        )
        .await;
        let significant: Vec<_> = report
            .comparisons
            .iter()
            .filter(|c| c.significant)
            .collect();
        assert!(significant.is_empty(), "seed {seed}: {significant:?}");
        assert_eq!(
            report.verdict, "no significant difference yet",
            "seed {seed}"
        );
        assert_eq!(report.comparisons.len(), 6);
        assert!(report.comparisons.iter().all(|c| c.p_value.is_some()));
    }
}

#[tokio::test]
async fn a_sixty_forty_split_of_fifty_fifty_weights_warns() {
    let records = simulate(3, &[("a", 600, 0.9), ("b", 400, 0.9)]);
    let report = report_over(
        "sqlite",
        &sluice_gateway::store::StorageTarget::Memory,
        &records,
    )
    .await;
    assert!(report.srm.warning, "{:?}", report.srm);
    assert_eq!(report.srm.observed["a"], 600);
    assert!((report.srm.chi_square.unwrap() - 40.0).abs() < 1e-9);
    assert!(
        report.verdict.starts_with("sample ratio mismatch"),
        "{}",
        report.verdict
    );
}

#[tokio::test]
async fn no_data_is_null_never_invented() {
    let report = report_over(
        "sqlite",
        &sluice_gateway::store::StorageTarget::Memory,
        &(vec![], vec![]),
    )
    .await;
    let v = serde_json::to_value(&report).unwrap();
    assert_eq!(v["verdict"], "no data yet");
    assert_eq!(v["variants"][0]["requests"], 0);
    assert!(v["variants"][0]["latency_p50_ms"].is_null());
    assert!(v["variants"][0]["pass_rate"].is_null());
    assert!(v["variants"][0]["error_rate"].is_null());
    assert!(v["srm"]["p_value"].is_null());
    assert!(v["comparisons"][0]["p_value"].is_null());
    assert_eq!(v["comparisons"][0]["significant"], false);
}

// ---------------------------------------------------------------- admin API

const ADMIN: &str = "[server]\nmaster_key = \"admin-key\"\n";

async fn get(h: &support::Harness, path: &str, key: Option<&str>) -> (StatusCode, Value) {
    use tower::ServiceExt;
    let mut req = axum::http::Request::get(path);
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let response = h
        .app
        .clone()
        .oneshot(req.body(axum::body::Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn the_admin_api_serves_the_report_contract() {
    let text = format!("{ADMIN}{}", with_experiment(MODEL_AB));
    let mut h = harness(&text).await;
    let auth = [("authorization", "Bearer admin-key")];
    let mut sent = std::collections::HashMap::new();
    for u in 0..20 {
        let r = h
            .send("/v1/chat/completions", ask(Some(&format!("u{u}"))), &auth)
            .await;
        *sent.entry(r.record.variant.unwrap()).or_insert(0u64) += 1;
    }
    // The request log is written off the hot path: wait for all 20 rows.
    let mut report = Value::Null;
    for _ in 0..100 {
        let (status, body) = get(
            &h,
            "/admin/experiments/model-ab?since=1h",
            Some("admin-key"),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let total: u64 = body["variants"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["requests"].as_u64().unwrap())
            .sum();
        report = body;
        if total == 20 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    for key in [
        "name",
        "active",
        "target",
        "assignment",
        "control",
        "since_ms",
        "until_ms",
        "verdict",
        "srm",
        "variants",
        "comparisons",
    ] {
        assert!(report.get(key).is_some(), "{key} missing from {report}");
    }
    assert_eq!(report["name"], "model-ab");
    assert_eq!(report["target"], "model");
    assert_eq!(report["assignment"], "user");
    assert_eq!(report["active"], true);
    assert_eq!(report["control"], "a");
    assert_eq!(report["srm"]["expected"]["a"], 0.5);
    for v in report["variants"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap();
        assert_eq!(
            v["requests"].as_u64().unwrap(),
            sent.get(name).copied().unwrap_or(0)
        );
        assert_eq!(v["weight"], 50);
        for key in [
            "users",
            "latency_p50_ms",
            "latency_p95_ms",
            "cost_per_request_usd",
            "pass_rate",
            "error_rate",
            "feedback_mean",
            "regeneration_rate",
        ] {
            assert!(v.get(key).is_some(), "{key} missing from {v}");
        }
        // No output rule: nothing was checked, so there is no pass rate to show.
        assert!(v["pass_rate"].is_null());
    }
    let c = &report["comparisons"][0];
    for key in [
        "variant",
        "metric",
        "test",
        "control",
        "value",
        "difference",
        "ci_low",
        "ci_high",
        "p_value",
        "significant",
    ] {
        assert!(c.get(key).is_some(), "{key} missing from {c}");
    }

    let (status, list) = get(&h, "/admin/experiments", Some("admin-key")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["experiments"][0]["name"], "model-ab");

    let (status, body) = get(&h, "/admin/experiments/nope", Some("admin-key")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "experiment_not_found");
    let (status, body) = get(
        &h,
        "/admin/experiments/model-ab?since=soon",
        Some("admin-key"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["param"], "since");
    let (status, _) = get(&h, "/admin/experiments", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

/// A model the tier may not use is refused before any experiment runs: a variant that
/// swaps it for an allowed one does not turn a 403 into a 200 for some users.
#[tokio::test]
async fn a_refused_model_is_refused_whatever_the_variant() {
    let text = format!(
        "{MODELS}\n{}",
        r#"
[limits]
default_tier = "free"
[[tiers]]
name = "free"
models = ["cheap"]
[[experiments]]
name = "strong-or-cheap"
target = "model"
match = { model = "strong" }
variants = [
  { name = "a", weight = 50, model = "strong" },
  { name = "b", weight = 50, model = "cheap" },
]
"#
    );
    let mut h = harness(&text).await;
    for i in 0..20 {
        let mut body = ask(Some(&format!("user-{i}")));
        body["model"] = json!("strong");
        let r = h.send("/v1/chat/completions", body, &[]).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN.as_u16(), "{}", r.text);
        assert_eq!(r.record.variant, None);
    }
}
