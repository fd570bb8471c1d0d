//! The Anthropic provider end to end against the simulator's `POST /v1/messages`: real
//! HTTP, real SSE, Anthropic-shaped errors.
#![expect(
    clippy::unwrap_used,
    reason = "setup helpers outside #[test] fns should panic like the tests that call them"
)]

use std::collections::BTreeMap;
use std::time::Duration;

use futures::FutureExt;
use futures::StreamExt;
use serde_json::{Value, json};
use sluice_gateway::config::{ProviderConfig, ProviderKind};
use sluice_gateway::limits::capacity::{Capacity, CapacityConfig, ShedReason};
use sluice_gateway::providers::anthropic::AnthropicProvider;
use sluice_gateway::providers::{ChatCall, ErrorClass, Provider, Timeouts};
use sluice_gateway::wire::{ChatRequest, Content};
use sluice_sim::{ChaosConfig, MockServer};

const MODEL: &str = "claude-sonnet-4-5";

async fn start(chaos: ChaosConfig) -> (MockServer, AnthropicProvider) {
    let server = MockServer::start("127.0.0.1:0".parse().unwrap(), chaos)
        .await
        .unwrap();
    // The simulator's url() is its OpenAI base (`.../v1`); Anthropic's base has no `/v1`.
    let base_url = server.url().trim_end_matches("/v1").to_string();
    let config = ProviderConfig {
        name: "claude".into(),
        kind: ProviderKind::Anthropic,
        base_url,
        api_key: Some("sk-ant-test".to_string().into()),
        connect_timeout: Duration::from_secs(2),
        headers: BTreeMap::new(),
        chaos: ChaosConfig::default(),
    };
    let provider = AnthropicProvider::new(&config).unwrap();
    (server, provider)
}

fn request(stream: bool) -> ChatRequest {
    serde_json::from_value(json!({
        "model": "alias",
        "stream": stream,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello"},
        ],
        "temperature": 1.5,
        "seed": 7,
    }))
    .unwrap()
}

fn call(request: &ChatRequest) -> ChatCall<'_> {
    ChatCall {
        request,
        upstream_model: MODEL,
        timeouts: Timeouts {
            first_byte: Duration::from_secs(5),
            total: Duration::from_secs(10),
        },
        capacity: None,
    }
}

/// The simulator's own reply for the prompt the translation must have produced.
fn expected_reply() -> Value {
    let body = json!({
        "model": MODEL,
        "max_tokens": 4096,
        "system": "be brief",
        "messages": [{"role": "user", "content": "hello"}],
    });
    sluice_sim::anthropic::message(&body, 0).unwrap()
}

#[tokio::test]
async fn anthropic_chat_round_trips_through_the_messages_api() {
    let (server, provider) = start(ChaosConfig::default()).await;
    assert_eq!(provider.kind(), "anthropic");
    let req = request(false);
    let r = provider.chat(call(&req)).await.unwrap();
    let expected = expected_reply();
    assert!(r.id.starts_with("chatcmpl-msg_sim_"), "{}", r.id);
    assert_eq!(r.object, "chat.completion");
    assert_eq!(r.model, MODEL);
    assert!(r.created > 1_600_000_000);
    let message = &r.choices[0].message;
    assert_eq!(message.role, "assistant");
    assert_eq!(
        message.content,
        Some(Content::Text(
            expected["content"][0]["text"].as_str().unwrap().to_string()
        ))
    );
    assert_eq!(r.choices[0].finish_reason.as_deref(), Some("stop"));
    let usage = r.usage.unwrap();
    assert_eq!(
        u64::from(usage.prompt_tokens),
        expected["usage"]["input_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        u64::from(usage.completion_tokens),
        expected["usage"]["output_tokens"].as_u64().unwrap()
    );
    assert_eq!(server.calls(), 1);
}

#[tokio::test]
async fn anthropic_chat_stream_round_trips_through_the_messages_api() {
    let (_server, provider) = start(ChaosConfig::default()).await;
    let req = request(true);
    let chunks: Vec<_> = provider
        .chat_stream(call(&req))
        .await
        .unwrap()
        .collect()
        .await;
    let chunks: Vec<_> = chunks.into_iter().map(Result::unwrap).collect();
    let values: Vec<Value> = chunks
        .iter()
        .map(|c| serde_json::from_str(&c.data).unwrap())
        .collect();
    assert_eq!(
        values[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let text: String = values
        .iter()
        .filter_map(|v| v["choices"][0]["delta"]["content"].as_str())
        .collect();
    let expected = expected_reply();
    assert_eq!(text, expected["content"][0]["text"].as_str().unwrap());
    let finish: Vec<&str> = values
        .iter()
        .filter_map(|v| v["choices"][0]["finish_reason"].as_str())
        .collect();
    assert_eq!(finish, ["stop"]);
    let last = chunks.last().unwrap();
    assert!(last.usage_only);
    let usage = last.usage.unwrap();
    assert_eq!(
        u64::from(usage.prompt_tokens),
        expected["usage"]["input_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        u64::from(usage.completion_tokens),
        expected["usage"]["output_tokens"].as_u64().unwrap()
    );
    assert!(
        values
            .iter()
            .all(|v| v["id"] == values[0]["id"] && v["object"] == "chat.completion.chunk")
    );
}

#[tokio::test]
async fn anthropic_overloaded_and_rate_limited_answers_are_classified() {
    let (_server, provider) = start(ChaosConfig {
        fail_first: 1,
        fail_status: 529,
        ..ChaosConfig::default()
    })
    .await;
    let req = request(false);
    let e = provider.chat(call(&req)).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Overloaded);
    assert_eq!(e.status, Some(529));
    assert_eq!(e.code.as_deref(), Some("overloaded_error"));
    assert!(
        provider.chat(call(&req)).await.is_ok(),
        "only the first call fails"
    );

    let (_server, provider) = start(ChaosConfig {
        fail_first: 1,
        fail_status: 429,
        retry_after: Some(Duration::from_secs(3)),
        ..ChaosConfig::default()
    })
    .await;
    let e = provider
        .chat_stream(call(&request(true)))
        .await
        .err()
        .unwrap();
    assert_eq!(e.class, ErrorClass::RateLimited);
    assert_eq!(e.code.as_deref(), Some("rate_limit_error"));
    assert_eq!(e.retry_after, Some(Duration::from_secs(3)));
}

#[tokio::test]
async fn anthropic_cut_stream_ends_with_a_connection_error() {
    let (_server, provider) = start(ChaosConfig {
        cut_after: Some(3),
        ..ChaosConfig::default()
    })
    .await;
    let req = request(true);
    let out: Vec<_> = provider
        .chat_stream(call(&req))
        .await
        .unwrap()
        .collect()
        .await;
    let (last, rest) = out.split_last().unwrap();
    assert!(rest.iter().all(Result::is_ok));
    assert_eq!(last.as_ref().unwrap_err().class, ErrorClass::Connection);
}

#[tokio::test]
async fn rate_limit_headers_and_429s_reach_the_routes_capacity() {
    let (_server, provider) = start(ChaosConfig {
        rpm: Some(2),
        retry_after: Some(Duration::from_secs(30)),
        ..ChaosConfig::default()
    })
    .await;
    let capacity = Capacity::new(CapacityConfig {
        max_queue: 0,
        ..CapacityConfig::default()
    });
    let far = tokio::time::Instant::now() + Duration::from_secs(60);
    let admit = || capacity.admit(0, 1, far).now_or_never();
    let req = request(false);
    let with_capacity = || ChatCall {
        capacity: Some(&capacity),
        ..call(&req)
    };

    // Nothing configured, nothing announced yet: no limit.
    for _ in 0..5 {
        assert_eq!(admit(), Some(Ok(())));
    }
    // The answer announces 2 a minute with 1 left before the window resets (RFC 3339):
    // one more may go at once, the next would need the window to reset.
    provider.chat(with_capacity()).await.unwrap();
    assert_eq!(admit(), Some(Ok(())));
    let shed = admit().unwrap().unwrap_err();
    assert_eq!(shed.reason, ShedReason::QueueFull);

    // The 429 pauses admission for its retry-after.
    provider.chat(with_capacity()).await.unwrap();
    let e = provider.chat(with_capacity()).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::RateLimited);
    let shed = admit().unwrap().unwrap_err();
    assert!(shed.retry_after >= Duration::from_secs(29), "{shed:?}");
}
