//! In-process service tests: the whole pipeline through `oneshot`, no socket, against
//! the simulated provider with scripted failures. Time is paused where backoff matters.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers outside #[test] fns fail loudly by design"
)]

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use futures::StreamExt;
use serde_json::{Value, json};
use sluice_gateway::config::Config;
use sluice_gateway::pipeline::Gateway;
use sluice_gateway::server::app;
use sluice_gateway::store::{StorageTarget, Store};
use sluice_gateway::telemetry::{Outcome, RequestRecord};
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

mod support;

use support::{Harness, harness};

impl Harness {
    async fn post(&self, path: &str, body: Value) -> axum::response::Response {
        self.app
            .clone()
            .oneshot(
                Request::post(path)
                    .header("content-type", "application/json")
                    .body(Body::from(body.to_string()))
                    .unwrap(),
            )
            .await
            .unwrap()
    }

    async fn chat(&self, body: Value) -> (StatusCode, axum::http::HeaderMap, Value) {
        let r = self.post("/v1/chat/completions", body).await;
        let (parts, body) = r.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (parts.status, parts.headers, json)
    }

    async fn next_record(&mut self) -> RequestRecord {
        tokio::time::timeout(Duration::from_secs(30), self.records.recv())
            .await
            .expect("a record within 30 s")
            .expect("recorder open")
    }

    /// Close the gateway and assert no further record arrives: exactly one per request.
    async fn assert_no_more_records(mut self) {
        drop(self.app);
        drop(self.gateway);
        self.tasks.close();
        self.tasks.wait().await;
        assert!(
            self.records.recv().await.is_none(),
            "a request left more than one record"
        );
    }
}

fn chat_body(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "Tell me about sluices"}]})
}

const RETRY_FAST: &str = r#"
[retry]
base_delay = "1ms"
max_delay = "2ms"
"#;

#[tokio::test]
async fn retries_honour_retry_after_and_succeed() {
    let mut h = harness(
        r#"
        [retry]
        max_attempts = 3
        base_delay = "10ms"
        [[providers]]
        name = "flaky"
        kind = "sim"
        chaos = { fail_first = 2, fail_status = 429, retry_after = "7s" }
        [[models]]
        name = "m"
        provider = "flaky"
    "#,
    )
    .await;
    // Paused after the store is open: its pool must not see virtual time jump.
    tokio::time::pause();
    let start = tokio::time::Instant::now();
    let (status, headers, body) = h.chat(chat_body("m")).await;
    let waited = start.elapsed();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .starts_with("Simulated")
    );
    assert!(headers.get("x-sluice-fallback").is_none());
    // Two 429s, each asking for 7 s: the gateway waits exactly that, not its own 10 ms backoff.
    assert!(waited >= Duration::from_secs(14), "waited only {waited:?}");
    assert!(waited < Duration::from_secs(15), "waited {waited:?}");
    let r = h.next_record().await;
    assert_eq!(
        (r.retries, r.upstream_calls, r.outcome),
        (2, 3, Outcome::Ok)
    );
    h.assert_no_more_records().await;
}

#[tokio::test]
async fn exhausted_retries_return_429_with_retry_after() {
    let mut h = harness(
        r#"
        [retry]
        max_attempts = 2
        [[providers]]
        name = "limited"
        kind = "sim"
        chaos = { fail_first = 100, fail_status = 429, retry_after = "3s" }
        [[models]]
        name = "m"
        provider = "limited"
    "#,
    )
    .await;
    // Paused after the store is open: its pool must not see virtual time jump.
    tokio::time::pause();
    let (status, headers, body) = h.chat(chat_body("m")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["retry-after"], "3");
    assert_eq!(body["error"]["code"], "upstream_rate_limited");
    let r = h.next_record().await;
    assert_eq!(
        (r.upstream_calls, r.outcome, r.status),
        (2, Outcome::ApiError, 429)
    );
    h.assert_no_more_records().await;
}

#[tokio::test]
async fn backoff_grows_and_stays_within_the_ceiling() {
    // Without retry-after: full jitter draws each wait from [0, base * 2^n], so three
    // retries at base 1 s can wait at most 1 + 2 + 4 = 7 s in total.
    let mut h = harness(
        r#"
        [retry]
        max_attempts = 4
        base_delay = "1s"
        max_delay = "10s"
        [[providers]]
        name = "broken"
        kind = "sim"
        chaos = { fail_first = 3, fail_status = 500 }
        [[models]]
        name = "m"
        provider = "broken"
    "#,
    )
    .await;
    // Paused after the store is open: its pool must not see virtual time jump.
    tokio::time::pause();
    let start = tokio::time::Instant::now();
    let (status, _, _) = h.chat(chat_body("m")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        start.elapsed() <= Duration::from_secs(7),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(h.next_record().await.retries, 3);
    h.assert_no_more_records().await;
}

#[tokio::test]
async fn non_retryable_failures_are_not_retried() {
    for (status, code) in [
        (400, "invalid_request_error"),
        (401, "upstream_auth_failed"),
    ] {
        let mut h = harness(&format!(
            r#"{RETRY_FAST}
            [[providers]]
            name = "p"
            kind = "sim"
            chaos = {{ fail_first = 10, fail_status = {status} }}
            [[models]]
            name = "m"
            provider = "p"
        "#
        ))
        .await;
        let (got, _, body) = h.chat(chat_body("m")).await;
        let r = h.next_record().await;
        assert_eq!(r.upstream_calls, 1, "status {status} must not be retried");
        if status == 400 {
            assert_eq!(got, StatusCode::BAD_REQUEST);
            assert_eq!(body["error"]["type"], code);
        } else {
            assert_eq!(got, StatusCode::BAD_GATEWAY);
            assert_eq!(body["error"]["code"], code);
        }
    }
}

#[tokio::test]
async fn retry_budget_caps_extra_calls() {
    // Every call fails with a retryable 500. Without a budget, 100 requests x 3 attempts
    // would make 300 calls; a 10 % budget with no floor allows about 10 retries.
    let mut h = harness(&format!(
        r#"{RETRY_FAST}
        budget_ratio = 0.1
        budget_min_per_sec = 0
        max_attempts = 3
        [[providers]]
        name = "down"
        kind = "sim"
        chaos = {{ error_rate = 1.0, error_status = 500 }}
        [[models]]
        name = "m"
        provider = "down"
    "#
    ))
    .await;
    for _ in 0..100 {
        let (status, _, _) = h.chat(chat_body("m")).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
    }
    let mut calls = 0;
    for _ in 0..100 {
        calls += h.next_record().await.upstream_calls;
    }
    assert!(calls >= 100, "{calls}");
    assert!(
        calls <= 115,
        "retry budget exceeded: {calls} calls for 100 requests"
    );
}

#[tokio::test]
async fn fallbacks_are_tried_in_order() {
    let mut h = harness(&format!(
        r#"{RETRY_FAST}
        [[providers]]
        name = "down"
        kind = "sim"
        chaos = {{ error_rate = 1.0, error_status = 503 }}
        [[providers]]
        name = "also-down"
        kind = "sim"
        chaos = {{ error_rate = 1.0, error_status = 500 }}
        [[providers]]
        name = "up"
        kind = "sim"
        [[models]]
        name = "primary"
        provider = "down"
        fallbacks = ["second", "third"]
        [[models]]
        name = "second"
        provider = "also-down"
        [[models]]
        name = "third"
        provider = "up"
        upstream = "gpt-4o-mini"
    "#
    ))
    .await;
    let (status, headers, body) = h.chat(chat_body("primary")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(headers["x-sluice-model"], "third");
    assert_eq!(headers["x-sluice-fallback"], "model");
    assert_eq!(body["model"], "gpt-4o-mini");
    let r = h.next_record().await;
    // 3 attempts on each failing model, then one on the model that answered.
    assert_eq!(r.upstream_calls, 7);
    assert_eq!(r.model.as_deref(), Some("third"));
    assert_eq!(r.model_requested.as_deref(), Some("primary"));
    h.assert_no_more_records().await;
}

#[tokio::test]
async fn bad_requests_do_not_fall_back() {
    let mut h = harness(&format!(
        r#"{RETRY_FAST}
        [[providers]]
        name = "picky"
        kind = "sim"
        chaos = {{ fail_first = 10, fail_status = 400 }}
        [[providers]]
        name = "up"
        kind = "sim"
        [[models]]
        name = "primary"
        provider = "picky"
        fallbacks = ["backup"]
        template_fallback = "never used"
        [[models]]
        name = "backup"
        provider = "up"
    "#
    ))
    .await;
    let (status, _, _) = h.chat(chat_body("primary")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(h.next_record().await.upstream_calls, 1);
}

const TEMPLATE: &str = r#"
[retry]
base_delay = "1ms"
max_delay = "2ms"
max_attempts = 2
[[providers]]
name = "down"
kind = "sim"
chaos = { error_rate = 1.0, error_status = 502 }
[[models]]
name = "m"
provider = "down"
template_fallback = "Sorry {{ user or 'friend' }}, {{ variables.topic }} is unavailable right now."
"#;

#[tokio::test]
async fn template_fallback_answers_when_every_model_failed() {
    let mut h = harness(TEMPLATE).await;
    let mut body = chat_body("m");
    body["user"] = json!("ada");
    body["sluice"] = json!({"variables": {"topic": "search"}, "feature": "help"});
    let (status, headers, body) = h.chat(body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-sluice-fallback"], "template");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Sorry ada, search is unavailable right now."
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    let r = h.next_record().await;
    assert_eq!(r.outcome, Outcome::Ok);
    assert_eq!(r.upstream_calls, 2);
    assert_eq!(r.feature.as_deref(), Some("help"));
    assert_eq!(r.user.as_deref(), Some("ada"));
    h.assert_no_more_records().await;
}

#[tokio::test]
async fn template_fallback_streams_too() {
    let h = harness(TEMPLATE).await;
    let mut body = chat_body("m");
    body["stream"] = json!(true);
    body["sluice"] = json!({"variables": {"topic": "billing"}});
    let r = h.post("/v1/chat/completions", body).await;
    assert_eq!(r.headers()["x-sluice-fallback"], "template");
    let text = String::from_utf8(
        axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    let content: String = data_lines(&text)
        .iter()
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(content, "Sorry friend, billing is unavailable right now.");
    assert!(text.ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn first_byte_timeout_is_enforced_then_falls_back() {
    let mut h = harness(
        r#"
        [retry]
        max_attempts = 1
        [[providers]]
        name = "slow"
        kind = "sim"
        chaos = { latency = "30s" }
        [[providers]]
        name = "quick"
        kind = "sim"
        [[models]]
        name = "m"
        provider = "slow"
        first_byte_timeout = "2s"
        [[models]]
        name = "alone"
        provider = "slow"
        first_byte_timeout = "2s"
        [[models]]
        name = "with-backup"
        provider = "slow"
        first_byte_timeout = "2s"
        fallbacks = ["backup"]
        [[models]]
        name = "backup"
        provider = "quick"
    "#,
    )
    .await;
    // Paused after the store is open: its pool must not see virtual time jump.
    tokio::time::pause();
    let start = tokio::time::Instant::now();
    let (status, _, body) = h.chat(chat_body("alone")).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(body["error"]["code"], "upstream_timeout");
    assert!(start.elapsed() < Duration::from_secs(3));
    h.next_record().await;

    let (status, headers, _) = h.chat(chat_body("with-backup")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-sluice-model"], "backup");
}

#[tokio::test]
async fn total_timeout_cuts_a_slow_stream() {
    let mut h = harness(
        r#"
        [[providers]]
        name = "trickle"
        kind = "sim"
        chaos = { tokens_per_sec = 1.0 }
        [[models]]
        name = "m"
        provider = "trickle"
        total_timeout = "5s"
    "#,
    )
    .await;
    // Paused after the store is open: its pool must not see virtual time jump.
    tokio::time::pause();
    let mut body = chat_body("m");
    body["stream"] = json!(true);
    let r = h.post("/v1/chat/completions", body).await;
    assert_eq!(r.status(), StatusCode::OK);
    let text = String::from_utf8(
        axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    let data = data_lines(&text);
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "stream_interrupted");
    assert!(!text.contains("[DONE]"));
    let r = h.next_record().await;
    assert_eq!(r.outcome, Outcome::ApiError);
    assert_eq!(r.status, 504);
}

fn data_lines(sse: &str) -> Vec<String> {
    sse.split("\n\n")
        .filter_map(|block| block.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn stream_chunks_arrive_in_order_and_unchanged() {
    let mut h = harness(support::SIM_CHAT).await;
    let mut body = chat_body("gpt-4o-mini");
    body["stream"] = json!(true);
    let r = h.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let text = String::from_utf8(
        axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    let got = data_lines(&text);

    // What the upstream sent: the gateway always asks for usage, and strips the usage
    // chunk again because this client did not ask for it.
    let mut upstream = body.clone();
    upstream["stream_options"] = json!({"include_usage": true});
    let mut expected = sluice_sim::openai::chat_chunks(&upstream, 0).unwrap();
    let usage_chunk = expected.pop().unwrap();
    assert!(usage_chunk.contains("\"usage\":{"));
    expected.push("[DONE]".into());
    assert_eq!(got, expected);
    let r = h.next_record().await;
    assert_eq!(r.outcome, Outcome::Ok);
    assert!(r.stream);
    assert!(!r.tokens_estimated, "usage came from the upstream");
    assert!(r.completion_tokens > 0);
    assert!(r.ttft_ms.is_some());
}

#[tokio::test]
async fn include_usage_is_honoured() {
    let h = harness(support::SIM_CHAT).await;
    let mut body = chat_body("gpt-4o-mini");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = h.post("/v1/chat/completions", body).await;
    let text = String::from_utf8(
        axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    let data = data_lines(&text);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let usage: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert!(usage["usage"]["total_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn a_cut_stream_ends_with_an_error_event_not_done() {
    let mut h = harness(
        r#"
        [retry]
        max_attempts = 1
        [[providers]]
        name = "cutter"
        kind = "sim"
        chaos = { cut_after = 3 }
        [[models]]
        name = "m"
        provider = "cutter"
    "#,
    )
    .await;
    let mut body = chat_body("m");
    body["stream"] = json!(true);
    let r = h.post("/v1/chat/completions", body).await;
    assert_eq!(r.status(), StatusCode::OK);
    let text = String::from_utf8(
        axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    let data = data_lines(&text);
    assert_eq!(data.len(), 4, "three chunks then the error event: {data:?}");
    assert!(!text.contains("[DONE]"));
    let error: Value = serde_json::from_str(&data[3]).unwrap();
    assert_eq!(error["error"]["code"], "stream_interrupted");
    let r = h.next_record().await;
    assert_eq!(
        (r.outcome, r.error_code.as_deref()),
        (Outcome::ApiError, Some("stream_interrupted"))
    );
    h.assert_no_more_records().await;
}

#[tokio::test]
async fn failure_before_the_first_chunk_retries_the_stream() {
    let mut h = harness(&format!(
        r#"{RETRY_FAST}
        [[providers]]
        name = "flaky"
        kind = "sim"
        chaos = {{ fail_first = 1, fail_status = 503 }}
        [[models]]
        name = "m"
        provider = "flaky"
    "#
    ))
    .await;
    let mut body = chat_body("m");
    body["stream"] = json!(true);
    let r = h.post("/v1/chat/completions", body).await;
    assert_eq!(r.status(), StatusCode::OK);
    let text = String::from_utf8(
        axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"));
    let r = h.next_record().await;
    assert_eq!((r.retries, r.outcome), (1, Outcome::Ok));
}

#[tokio::test]
async fn client_disconnect_cancels_the_stream_and_records_once() {
    let mut h = harness(
        r#"
        [[providers]]
        name = "trickle"
        kind = "sim"
        chaos = { tokens_per_sec = 5.0 }
        [[models]]
        name = "m"
        provider = "trickle"
    "#,
    )
    .await;
    // The gateway's own tasks (recorder, key reloads, ...): the forwarder comes on top.
    let background = h.tasks.len();
    let mut body = chat_body("m");
    body["stream"] = json!(true);
    let r = h.post("/v1/chat/completions", body).await;
    let mut frames = r.into_body().into_data_stream();
    let first = frames.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    let hung_up = std::time::Instant::now();
    drop(frames);
    // The whole stream would take several seconds at 5 chunks/s; the record arrives
    // at once because the forwarder saw the client go and dropped the upstream stream.
    let r = h.next_record().await;
    assert!(
        hung_up.elapsed() < Duration::from_secs(2),
        "{:?}",
        hung_up.elapsed()
    );
    assert_eq!(r.outcome, Outcome::ClientCancelled);
    assert_eq!(r.status, 499);
    assert_eq!(r.model.as_deref(), Some("m"));
    tokio::time::timeout(Duration::from_secs(2), async {
        // The background tasks stay; the stream forwarder must be gone.
        while h.tasks.len() > background {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the forwarder task ended, dropping the upstream call");
    h.assert_no_more_records().await;
}

#[tokio::test]
async fn bad_input_gets_precise_4xx_and_a_record() {
    let mut h = harness(
        r#"
        max_body_bytes = 2048
        [[providers]]
        name = "sim"
        kind = "sim"
        [[models]]
        name = "gpt-4o-mini"
        provider = "sim"
        [[models]]
        name = "text-embedding-3-small"
        provider = "sim"
    "#
        .replacen(
            "max_body_bytes = 2048",
            "[server]\nmax_body_bytes = 2048",
            1,
        )
        .as_str(),
    )
    .await;
    let raw = |body: &str| {
        Request::post("/v1/chat/completions")
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let cases: Vec<(Request<Body>, StatusCode, &str, Option<&str>)> = vec![
        (
            raw("{\"model\": "),
            StatusCode::BAD_REQUEST,
            "invalid_json",
            None,
        ),
        (
            raw("[1,2]"),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            None,
        ),
        (
            raw(r#"{"model":"gpt-4o-mini","messages":"hi"}"#),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            Some("messages"),
        ),
        (
            raw(r#"{"model":"gpt-4o-mini","messages":[]}"#),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            Some("messages"),
        ),
        (
            raw(
                r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"x"}],"temperature":"hot"}"#,
            ),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            Some("temperature"),
        ),
        (
            raw(r#"{"model":"nope","messages":[{"role":"user","content":"x"}]}"#),
            StatusCode::NOT_FOUND,
            "model_not_found",
            Some("model"),
        ),
        (
            raw(r#"{"model":"text-embedding-3-small","messages":[{"role":"user","content":"x"}]}"#),
            StatusCode::BAD_REQUEST,
            "model_not_supported",
            Some("model"),
        ),
        (
            raw(&format!(
                r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{}"}}]}}"#,
                "x".repeat(4096)
            )),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            None,
        ),
        (
            raw(r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"x"}]} trailing"#),
            StatusCode::BAD_REQUEST,
            "invalid_json",
            None,
        ),
    ];
    let n = cases.len();
    for (request, status, code, param) in cases {
        let r = h.app.clone().oneshot(request).await.unwrap();
        assert_eq!(r.status(), status, "for code {code}");
        assert!(r.headers().contains_key("x-sluice-request-id"));
        let body: Value = serde_json::from_slice(
            &axum::body::to_bytes(r.into_body(), usize::MAX)
                .await
                .unwrap(),
        )
        .unwrap();
        assert_eq!(body["error"]["code"], code, "{body}");
        assert_eq!(body["error"]["param"].as_str(), param, "{body}");
        assert!(!body["error"]["message"].as_str().unwrap().is_empty());
    }
    for _ in 0..n {
        let r = h.next_record().await;
        assert_eq!(r.outcome, Outcome::RejectedInput);
        assert!(r.status >= 400 && r.status < 500);
    }
    // The gateway is still healthy afterwards.
    let (status, _, _) = h.chat(chat_body("gpt-4o-mini")).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn embeddings_accept_strings_and_arrays() {
    let mut h = harness(
        r#"
        [[providers]]
        name = "sim"
        kind = "sim"
        [[models]]
        name = "text-embedding-3-small"
        provider = "sim"
    "#,
    )
    .await;
    for (input, n) in [(json!("one"), 1), (json!(["a", "b", "c"]), 3)] {
        let r = h
            .post(
                "/v1/embeddings",
                json!({"model": "text-embedding-3-small", "input": input}),
            )
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        let body: Value = serde_json::from_slice(
            &axum::body::to_bytes(r.into_body(), usize::MAX)
                .await
                .unwrap(),
        )
        .unwrap();
        assert_eq!(body["data"].as_array().unwrap().len(), n);
        assert_eq!(body["data"][0]["embedding"].as_array().unwrap().len(), 1536);
        assert!(h.next_record().await.prompt_tokens > 0);
    }
    let r = h
        .post(
            "/v1/embeddings",
            json!({"model": "text-embedding-3-small", "input": []}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn master_key_guards_v1_but_not_health() {
    let config = Config::embedded_default(&[("SLUICE_MASTER_KEY", "k1")]).unwrap();
    let store = Store::open(&StorageTarget::Memory).await.unwrap();
    let app = app(Gateway::start(Arc::new(config), store, vec![], TaskTracker::new()).unwrap());
    let send = |path: &str, key: Option<&str>| {
        let mut b = Request::get(path);
        if let Some(k) = key {
            b = b.header("authorization", format!("Bearer {k}"));
        }
        app.clone().oneshot(b.body(Body::empty()).unwrap())
    };
    assert_eq!(
        send("/v1/models", None).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        send("/v1/models", Some("nope")).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        send("/v1/models", Some("k1")).await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(
        send("/healthz", None).await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(
        send("/readyz", None).await.unwrap().status(),
        StatusCode::OK
    );
    let missing = send("/v2/nothing", None).await.unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
}

async fn mock(chaos: sluice_sim::ChaosConfig) -> sluice_sim::MockServer {
    sluice_sim::MockServer::start("127.0.0.1:0".parse().unwrap(), chaos)
        .await
        .unwrap()
}

#[tokio::test]
async fn anthropic_models_are_served_through_the_openai_api() {
    let upstream = mock(Default::default()).await;
    let mut h = harness(&format!(
        r#"
        [[providers]]
        name = "anthropic"
        kind = "anthropic"
        base_url = "http://{}"
        api_key = "sk-ant-test"
        [[models]]
        name = "claude-*"
        provider = "anthropic"
    "#,
        upstream.addr
    ))
    .await;
    let mut body = chat_body("claude-3-5-haiku-latest");
    body["messages"] = json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tell me about sluices"}
    ]);
    let (status, headers, reply) = h.chat(body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(headers["x-sluice-model"], "claude-3-5-haiku-latest");
    assert_eq!(reply["object"], "chat.completion");
    let text = reply["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(text.starts_with("Simulated"), "{text}");
    assert_eq!(reply["choices"][0]["finish_reason"], "stop");
    assert!(reply["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    assert_eq!(h.next_record().await.provider.as_deref(), Some("anthropic"));

    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = h.post("/v1/chat/completions", body).await;
    let sse = String::from_utf8(
        axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    let data = data_lines(&sse);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, text, "the stream says what the completion said");
    assert!(
        chunks.last().unwrap()["usage"]["completion_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
    let r = h.next_record().await;
    assert_eq!((r.outcome, r.stream), (Outcome::Ok, true));
    assert!(!r.tokens_estimated);
}

#[tokio::test]
async fn a_connection_cut_mid_stream_over_http_surfaces_an_error_event() {
    let upstream = mock(sluice_sim::ChaosConfig {
        cut_after: Some(2),
        ..Default::default()
    })
    .await;
    let mut h = harness(&format!(
        r#"
        [[providers]]
        name = "mock"
        kind = "openai"
        base_url = "{}"
        [[models]]
        name = "gpt-4o-mini"
        provider = "mock"
    "#,
        upstream.url()
    ))
    .await;
    let mut body = chat_body("gpt-4o-mini");
    body["stream"] = json!(true);
    let r = h.post("/v1/chat/completions", body).await;
    assert_eq!(r.status(), StatusCode::OK);
    let sse = String::from_utf8(
        axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    let data = data_lines(&sse);
    assert_eq!(data.len(), 3, "{data:?}");
    let error: Value = serde_json::from_str(&data[2]).unwrap();
    assert_eq!(error["error"]["code"], "stream_interrupted");
    assert_eq!(
        upstream.calls(),
        1,
        "no retry after the first chunk went out"
    );
    let r = h.next_record().await;
    assert_eq!(r.outcome, Outcome::ApiError);
}

const SIM: &str = r#"
[[providers]]
name = "sim"
kind = "sim"
[[models]]
name = "gpt-4o-mini"
provider = "sim"
[[models]]
name = "text-embedding-3-small"
provider = "sim"
"#;

impl Harness {
    /// Wait until the request log holds `n` rows (records are written off the hot path).
    async fn wait_for_rows(&self, n: i64) {
        for _ in 0..500 {
            if self.gateway.store.count().await.unwrap() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the request log never reached {n} rows");
    }

    async fn get(&self, path: &str) -> (StatusCode, String) {
        let r = self
            .app
            .clone()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = r.status();
        let body = axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }
}

#[tokio::test]
async fn metrics_parse_as_prometheus_and_agree_with_the_request_log() {
    let h = harness(SIM).await;
    let mut stream = chat_body("gpt-4o-mini");
    stream["stream"] = json!(true);
    let sends = [
        ("/v1/chat/completions", chat_body("gpt-4o-mini")),
        ("/v1/chat/completions", chat_body("gpt-4o-mini")),
        ("/v1/chat/completions", stream),
        ("/v1/chat/completions", chat_body("no-such-model")),
        (
            "/v1/embeddings",
            json!({"model": "text-embedding-3-small", "input": "x"}),
        ),
    ];
    for (path, body) in sends {
        let r = h.post(path, body).await;
        let _ = axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap();
    }
    h.wait_for_rows(5).await;
    let (status, text) = h.get("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    let counter = |name: &str, filter: &dyn Fn(&prometheus_parse::Sample) -> bool| -> f64 {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name && filter(s))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    };
    let rows = h.gateway.store.stat_rows(0).await.unwrap();
    assert_eq!(
        counter("sluice_requests_total", &|_| true),
        rows.len() as f64
    );
    let ok_rows = rows.iter().filter(|r| r.outcome == "ok").count() as f64;
    assert_eq!(
        counter("sluice_requests_total", &|s| s.labels.get("outcome")
            == Some("ok")),
        ok_rows
    );
    assert_eq!(
        counter("sluice_requests_total", &|s| s.labels.get("outcome")
            == Some("rejected_input")),
        1.0
    );
    let prompt: i64 = rows.iter().map(|r| r.prompt_tokens).sum();
    let completion: i64 = rows.iter().map(|r| r.completion_tokens).sum();
    assert_eq!(
        counter("sluice_tokens_total", &|s| s.labels.get("kind")
            == Some("prompt")),
        prompt as f64
    );
    assert_eq!(
        counter("sluice_tokens_total", &|s| s.labels.get("kind")
            == Some("completion")),
        completion as f64
    );
    // Latency histograms are there, with the documented buckets.
    assert!(scrape.samples.iter().any(|s| s.metric == "sluice_request_duration_seconds"
        && matches!(&s.value, prometheus_parse::Value::Histogram(b) if b.iter().any(|b| b.less_than == 120.0) && b.iter().any(|b| b.less_than == 0.001))));
    assert!(
        scrape
            .samples
            .iter()
            .any(|s| s.metric == "sluice_time_to_first_token_seconds")
    );
    assert_eq!(counter("sluice_records_dropped_total", &|_| true), 0.0);
    assert!(!text.contains("user="), "no per-user labels");
}

#[tokio::test]
async fn feedback_needs_a_known_request_of_the_same_key() {
    let h = harness(SIM).await;
    let r = h
        .post("/v1/chat/completions", chat_body("gpt-4o-mini"))
        .await;
    let id = r.headers()["x-sluice-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let fb = |body: Value| async { h.post("/v1/feedback", body).await };

    // Right after the answer: known from memory even before the batch reached the store.
    let ok = fb(
        json!({"request_id": id, "score": 1, "comment": "great, key sk-abcdefghijklmnopqrstuv"}),
    )
    .await;
    assert_eq!(ok.status(), StatusCode::OK);

    let missing = fb(json!({"request_id": "req_nope", "score": 1})).await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let body: Value = serde_json::from_slice(
        &axum::body::to_bytes(missing.into_body(), usize::MAX)
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(body["error"]["code"], "request_not_found");
    assert_eq!(body["error"]["param"], "request_id");

    // A request made with another key, already in the store.
    let foreign = sluice_gateway::telemetry::RequestRecord {
        request_id: "req_foreign".into(),
        key_id: Some("someone-else".into()),
        ..Default::default()
    };
    h.gateway.store.insert(&[foreign]).await.unwrap();
    let forbidden = fb(json!({"request_id": "req_foreign", "score": -1})).await;
    assert_eq!(forbidden.status(), StatusCode::FORBIDDEN);
    let body: Value = serde_json::from_slice(
        &axum::body::to_bytes(forbidden.into_body(), usize::MAX)
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(body["error"]["code"], "request_not_owned");

    for bad in [
        json!({"request_id": id, "score": 2}),
        json!({"request_id": id}),
        json!({"request_id": id, "score": 1, "stars": 5}),
    ] {
        assert_eq!(fb(bad).await.status(), StatusCode::BAD_REQUEST);
    }

    h.wait_for_rows(2).await;
    let stored = h.gateway.store.feedback_since(0).await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].score, 1.0);
    assert!(
        !stored[0]
            .comment
            .as_deref()
            .unwrap()
            .contains("sk-abcdefghijklmnopqrstuv"),
        "comments are redacted"
    );
    let stats = sluice_gateway::stats::compute(
        &h.gateway.store.stat_rows(0).await.unwrap(),
        &stored,
        sluice_gateway::stats::GroupBy::None,
    );
    assert_eq!(stats[0].feedback_mean, Some(1.0));
}

#[tokio::test]
async fn asking_the_same_thing_again_is_a_regeneration() {
    let mut h = harness(SIM).await;
    let mut body = chat_body("gpt-4o-mini");
    body["user"] = json!("ada");
    let first = h.post("/v1/chat/completions", body.clone()).await;
    let first_id = first.headers()["x-sluice-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    h.post("/v1/chat/completions", body.clone()).await;
    body["user"] = json!("bob");
    h.post("/v1/chat/completions", body.clone()).await;
    let explicit = h
        .app
        .clone()
        .oneshot(
            Request::post("/v1/chat/completions")
                .header("x-sluice-regenerate-of", "req_earlier")
                .body(Body::from(json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "other"}]}).to_string()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(explicit.status(), StatusCode::OK);
    let records: Vec<_> = [
        h.next_record().await,
        h.next_record().await,
        h.next_record().await,
        h.next_record().await,
    ]
    .into();
    assert_eq!(records[0].regeneration_of, None);
    assert_eq!(
        records[1].regeneration_of.as_deref(),
        Some(first_id.as_str())
    );
    assert_eq!(records[2].regeneration_of, None, "another user");
    assert_eq!(records[3].regeneration_of.as_deref(), Some("req_earlier"));
    h.wait_for_rows(4).await;
    let stats = sluice_gateway::stats::compute(
        &h.gateway.store.stat_rows(0).await.unwrap(),
        &[],
        sluice_gateway::stats::GroupBy::None,
    );
    assert_eq!(stats[0].regeneration_rate, 0.5);
}

#[tokio::test]
async fn bodies_are_stored_only_when_asked_and_then_redacted() {
    let secret = "sk-proj-abcdefghijklmnopqrstuvwx";
    let mut body = chat_body("gpt-4o-mini");
    body["messages"][0]["content"] = json!(format!("my key is {secret}"));

    let plain = harness(SIM).await;
    plain.post("/v1/chat/completions", body.clone()).await;
    plain.wait_for_rows(1).await;

    let stored = harness(&format!("[storage]\nstore_bodies = true\n{SIM}")).await;
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    stored.post("/v1/chat/completions", body).await;
    let r = stored.post("/v1/chat/completions", streamed).await;
    let _ = axum::body::to_bytes(r.into_body(), usize::MAX)
        .await
        .unwrap();
    stored.wait_for_rows(2).await;

    let mut plain_rx = plain.records;
    let r = plain_rx.recv().await.unwrap();
    assert!(r.request_body.is_none() && r.response_body.is_none());
    let mut stored_rx = stored.records;
    for _ in 0..2 {
        let r = stored_rx.recv().await.unwrap();
        let req = r.request_body.unwrap();
        assert!(req.contains("my key is [REDACTED]"), "{req}");
        assert!(!req.contains(secret));
        assert!(r.response_body.unwrap().contains("Simulated"));
    }
}
