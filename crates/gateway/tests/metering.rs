//! Cost and budgets through the whole pipeline: every route metered at one choke point
//! (the finished record), streams and whole answers alike, fallbacks at the price of
//! the model that answered; budgets that alert once, block, or downgrade.

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly by design")]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};
use sluice_gateway::telemetry::{Outcome, RequestRecord};
use sluice_gateway::usage::TokenUsage;
use sluice_gateway::usage::prices::{cost, shipped};

mod support;

use support::{Harness, harness};

const SIM: &str = r#"
[[providers]]
name = "sim"
kind = "sim"
[[providers]]
name = "down"
kind = "sim"
chaos = { error_rate = 1.0, error_status = 500 }
[[models]]
name = "gpt-4o-mini"
provider = "sim"
[[models]]
name = "gpt-4o"
provider = "sim"
[[models]]
name = "flaky-mini"
provider = "down"
upstream = "gpt-4o-mini"
fallbacks = ["gpt-4o"]
[[models]]
name = "text-embedding-3-small"
provider = "sim"
kind = "embeddings"
"#;

async fn post(
    h: &mut Harness,
    path: &str,
    body: Value,
) -> (StatusCode, HeaderMap, String, RequestRecord) {
    let r = h.send(path, body, &[]).await;
    (r.status, r.headers, r.text, r.record)
}

fn price_of(model: &str, r: &RequestRecord) -> i64 {
    let prices = shipped(model).unwrap_or_else(|| panic!("no shipped price for {model}"));
    cost(
        &prices,
        TokenUsage {
            prompt: u64::from(r.prompt_tokens),
            completion: u64::from(r.completion_tokens),
            cached_prompt: 0,
        },
    )
    .nanos
}

#[tokio::test]
async fn streamed_and_whole_answers_record_the_same_tokens_and_cost() {
    let mut h = harness(SIM).await;
    let messages =
        json!([{"role": "user", "content": "Tell me about canals in northern England."}]);
    let (status, _, _, whole) = post(
        &mut h,
        "/v1/chat/completions",
        json!({"model": "gpt-4o-mini", "messages": messages}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // The client does not ask for usage; the gateway asks the upstream anyway.
    let (status, _, sse, streamed) = post(
        &mut h,
        "/v1/chat/completions",
        json!({"model": "gpt-4o-mini", "messages": messages, "stream": true}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(sse.ends_with("data: [DONE]\n\n"));
    assert!(
        !sse.contains("\"usage\":{"),
        "usage chunk stripped: the client did not ask"
    );
    assert!(whole.prompt_tokens > 0 && whole.completion_tokens > 0);
    assert_eq!(
        (
            streamed.prompt_tokens,
            streamed.completion_tokens,
            streamed.tokens_estimated
        ),
        (whole.prompt_tokens, whole.completion_tokens, false)
    );
    assert_eq!(whole.cost_nanos, Some(price_of("gpt-4o-mini", &whole)));
    assert_eq!(streamed.cost_nanos, whole.cost_nanos);
    assert!(whole.cost_micros.is_some());
    // Embeddings are metered too.
    let (status, _, _, embed) = post(
        &mut h,
        "/v1/embeddings",
        json!({"model": "text-embedding-3-small", "input": ["a", "b c"]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(embed.prompt_tokens > 0);
    assert_eq!(
        embed.cost_nanos,
        Some(price_of("text-embedding-3-small", &embed))
    );
}

#[tokio::test]
async fn a_fallback_is_billed_at_the_answering_models_price() {
    let mut h = harness(SIM).await;
    let (status, headers, _, r) = post(
        &mut h,
        "/v1/chat/completions",
        json!({"model": "flaky-mini", "messages": [{"role": "user", "content": "hello"}]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-sluice-model"], "gpt-4o");
    assert_eq!(r.model.as_deref(), Some("gpt-4o"));
    assert!(r.upstream_calls >= 2);
    assert_eq!(r.cost_nanos, Some(price_of("gpt-4o", &r)));
    assert_ne!(r.cost_nanos, Some(price_of("gpt-4o-mini", &r)));
}

/// A webhook receiver that counts deliveries.
async fn receiver() -> (String, Arc<Mutex<Vec<Value>>>) {
    let got: Arc<Mutex<Vec<Value>>> = Arc::default();
    let sink = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::Json<Value>| {
            let sink = sink.clone();
            async move {
                sink.lock().unwrap().push(body.0);
                StatusCode::OK
            }
        }),
    );
    (format!("http://{}/hook", support::serve(app).await), got)
}

#[tokio::test]
async fn a_budget_alerts_once_at_80_percent_then_blocks() {
    let (url, alerts) = receiver().await;
    let mut h = harness(&format!(
        r#"
        [budgets]
        webhook = "{url}"
        [[budgets.rules]]
        name = "tiny"
        scope = "global"
        period = "day"
        limit_usd = 0.0002
        on_exceeded = "block"
        {SIM}"#
    ))
    .await;
    let ask =
        json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]});
    let mut spent: i64 = 0;
    let blocked = loop {
        let (status, headers, body, r) = post(&mut h, "/v1/chat/completions", ask.clone()).await;
        if status != StatusCode::OK {
            break (status, headers, body, r);
        }
        spent += r.cost_nanos.unwrap();
        assert!(
            spent < 1_000_000,
            "never blocked after spending {spent} nano-dollars"
        );
        // Charges land when each record is finished, off the request path.
        tokio::time::sleep(Duration::from_millis(30)).await;
    };
    let (status, headers, body, r) = blocked;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "budget_exceeded", "{body}");
    assert!(headers.contains_key("retry-after"));
    assert_eq!(r.outcome, Outcome::BudgetExceeded);
    assert_eq!(r.limited_by.as_deref(), Some("budget:tiny"));
    assert_eq!(r.upstream_calls, 0);
    assert!(
        spent >= 200_000,
        "blocked at {spent} of 200000 nano-dollars"
    );
    // Blocked within one request's cost of the limit.
    assert!(spent < 200_000 + 100_000, "{spent}");
    // More requests in the same period: still exactly one alert at 80%.
    for _ in 0..3 {
        post(&mut h, "/v1/chat/completions", ask.clone()).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = alerts.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "one threshold, one alert: {got:?}");
    assert_eq!(got[0]["threshold"], 0.8, "{got:?}");
    assert_eq!(got[0]["budget"], "tiny", "{got:?}");
}

#[tokio::test]
async fn a_spent_downgrade_budget_answers_with_the_cheaper_model() {
    let mut h = harness(&format!(
        r#"
        [[budgets.rules]]
        name = "strong-model"
        scope = "feature"
        period = "month"
        limit_usd = 0.000001
        on_exceeded = "downgrade"
        downgrade_to = "gpt-4o-mini"
        {SIM}"#
    ))
    .await;
    let ask = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],
                     "sluice": {"feature": "summaries"}});
    let (status, headers, _, first) = post(&mut h, "/v1/chat/completions", ask.clone()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-sluice-model"], "gpt-4o");
    assert!(
        first.cost_nanos.unwrap() > 1_000,
        "one answer spends the whole budget"
    );
    let downgraded = loop {
        let (status, headers, _, r) = post(&mut h, "/v1/chat/completions", ask.clone()).await;
        assert_eq!(status, StatusCode::OK);
        if headers["x-sluice-model"] == "gpt-4o-mini" {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(downgraded.model_requested.as_deref(), Some("gpt-4o"));
    assert_eq!(downgraded.model.as_deref(), Some("gpt-4o-mini"));
    assert_eq!(
        downgraded.limited_by.as_deref(),
        Some("budget:strong-model")
    );
    assert_eq!(
        downgraded.cost_nanos,
        Some(price_of("gpt-4o-mini", &downgraded))
    );
    // Another feature has a counter of its own.
    let (_, headers, _, _) = post(
        &mut h,
        "/v1/chat/completions",
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],
               "sluice": {"feature": "other"}}),
    )
    .await;
    assert_eq!(headers["x-sluice-model"], "gpt-4o");
}
