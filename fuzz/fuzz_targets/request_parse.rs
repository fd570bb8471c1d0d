//! Arbitrary bytes through the gateway's request front door, exactly as the handlers run
//! it: raw-body precheck (UTF-8, nesting), typed JSON parse, then the input guard with
//! the default policy, for both chat completions and embeddings.
//!
//! Fails on a panic, on an error that is not a 4xx (bad input must never look like the
//! gateway's fault), and when a request the guard accepted still holds what the default
//! policy promises to remove (control characters, bidi controls) or a blank last user
//! message.

#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use sluice_gateway::error::ApiError;
use sluice_gateway::guard::config::InputPolicy;
use sluice_gateway::guard::detect::Detector;
use sluice_gateway::guard::input::{check_chat, check_embeddings, precheck};
use sluice_gateway::guard::text::{is_bidi_control, is_blank};
use sluice_gateway::pipeline::parse_body;
use sluice_gateway::wire::{ChatRequest, Content, EmbeddingInput, EmbeddingsRequest};

static POLICY: LazyLock<InputPolicy> = LazyLock::new(InputPolicy::default);
static DETECTOR: LazyLock<Detector> =
    LazyLock::new(|| Detector::new(&[], &[]).unwrap_or_else(|e| panic!("built-in detector: {e}")));

fn client_error(e: &ApiError) {
    assert!(
        e.status_code().is_client_error(),
        "{} ({}) is not a client error",
        e.code(),
        e.status_code()
    );
}

/// What the default policy leaves in a text it accepted.
fn clean(s: &str) {
    assert!(
        !s.chars().any(|c| c.is_control() && c != '\n' && c != '\t'),
        "control character left in {s:?}"
    );
    assert!(
        !s.chars().any(is_bidi_control),
        "bidi control left in {s:?}"
    );
}

fn texts(content: &Option<Content>) -> Vec<&str> {
    match content {
        None => Vec::new(),
        Some(Content::Text(s)) => vec![s.as_str()],
        Some(Content::Parts(parts)) => parts
            .iter()
            .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect(),
    }
}

fn chat(data: &[u8]) {
    let mut req: ChatRequest = match parse_body(data) {
        Ok(r) => r,
        Err(e) => return client_error(&e),
    };
    match check_chat(&mut req, &POLICY, &DETECTOR, "gpt-4o-mini") {
        Err(e) => client_error(&e),
        Ok(_report) => {
            for m in &req.messages {
                texts(&m.content).into_iter().for_each(clean);
            }
            if let Some(last_user) = req.messages.iter().rev().find(|m| m.role == "user") {
                let parts = texts(&last_user.content);
                let has_non_text = matches!(&last_user.content, Some(Content::Parts(p))
                    if p.iter().any(|x| x.get("type").and_then(Value::as_str) != Some("text")));
                assert!(
                    has_non_text
                        || last_user.tool_calls.is_some()
                        || !parts.iter().all(|s| is_blank(s)),
                    "blank last user message accepted: {:?}",
                    last_user.content
                );
            }
        }
    }
}

fn embeddings(data: &[u8]) {
    let mut req: EmbeddingsRequest = match parse_body(data) {
        Ok(r) => r,
        Err(e) => return client_error(&e),
    };
    match check_embeddings(&mut req, &POLICY, "text-embedding-3-small") {
        Err(e) => client_error(&e),
        Ok(_report) => match &req.input {
            EmbeddingInput::Text(s) => {
                clean(s);
                assert!(!is_blank(s), "blank input accepted");
            }
            EmbeddingInput::Texts(v) => {
                for s in v {
                    clean(s);
                    assert!(!is_blank(s), "blank input item accepted");
                }
            }
            EmbeddingInput::Tokens(_) | EmbeddingInput::TokenLists(_) => {}
        },
    }
}

fuzz_target!(|data: &[u8]| {
    if let Err(e) = precheck(data, POLICY.max_depth) {
        return client_error(&e);
    }
    chat(data);
    embeddings(data);
});
