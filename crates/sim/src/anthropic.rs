//! Anthropic Messages API wire bodies (message, stream events, errors) built from the
//! deterministic content in [`crate::reply`].

use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use crate::chaos::RateWindow;
use crate::openai::{SimError, push_content, retry_headers};
use crate::reply::{self, Reply};

/// Anthropic-shaped error for `status`: `{"type":"error","error":{"type","message"}}`.
/// A `retry_after` adds `retry-after`; a 429 adds the `anthropic-ratelimit-requests-*`
/// headers (the server adds `-limit`, which only it knows).
pub fn error(status: u16, retry_after: Option<Duration>) -> SimError {
    let (kind, message) = match status {
        400 => ("invalid_request_error", "Invalid request."),
        401 => ("authentication_error", "invalid x-api-key"),
        403 => ("permission_error", "Your API key does not have permission."),
        404 => ("not_found_error", "Not found."),
        413 => (
            "request_too_large",
            "Request exceeds the maximum allowed size.",
        ),
        429 => (
            "rate_limit_error",
            "Number of requests has exceeded your rate limit (simulated).",
        ),
        503 | 529 => ("overloaded_error", "Overloaded (simulated)."),
        500..=599 => ("api_error", "Internal server error (simulated)."),
        _ => ("invalid_request_error", "Request failed (simulated)."),
    };
    let mut headers = retry_headers(retry_after);
    if status == 429 {
        headers.push(("anthropic-ratelimit-requests-remaining", "0".to_owned()));
        let reset = SystemTime::now() + retry_after.unwrap_or(Duration::from_secs(1));
        headers.push((
            "anthropic-ratelimit-requests-reset",
            humantime::format_rfc3339_seconds(reset).to_string(),
        ));
    }
    SimError {
        status,
        body: error_body(kind, message),
        headers,
    }
}

/// Anthropic's `anthropic-ratelimit-requests-*` headers, sent with every answer when
/// `rpm` is set; the reset is a point in time.
pub fn rate_limit_headers(w: RateWindow) -> Vec<(&'static str, String)> {
    vec![
        ("anthropic-ratelimit-requests-limit", w.limit.to_string()),
        (
            "anthropic-ratelimit-requests-remaining",
            w.remaining.to_string(),
        ),
        (
            "anthropic-ratelimit-requests-reset",
            humantime::format_rfc3339_millis(SystemTime::now() + w.reset).to_string(),
        ),
    ]
}

fn error_body(kind: &str, message: &str) -> Value {
    json!({"type": "error", "error": {"type": kind, "message": message}})
}

/// A 400 `invalid_request_error` with a specific message.
pub fn invalid_request(message: &str) -> SimError {
    SimError {
        status: 400,
        body: error_body("invalid_request_error", message),
        headers: Vec::new(),
    }
}

/// What a Messages request asks for, once validated.
struct MessagesRequest<'a> {
    model: &'a str,
    prompt: String,
    max_tokens: u32,
}

fn parse(req: &Value) -> Result<MessagesRequest<'_>, SimError> {
    let model = match req.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.as_str(),
        _ => return Err(invalid_request("model: Field required")),
    };
    let max_tokens = match req.get("max_tokens") {
        None | Some(Value::Null) => return Err(invalid_request("max_tokens: Field required")),
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .filter(|&n| n >= 1)
            .ok_or_else(|| invalid_request("max_tokens: Input should be a positive integer"))?,
    };
    let messages = match req.get("messages") {
        Some(Value::Array(m)) if !m.is_empty() => m,
        Some(Value::Array(_)) => {
            return Err(invalid_request(
                "messages: at least one message is required",
            ));
        }
        _ => return Err(invalid_request("messages: Field required")),
    };
    Ok(MessagesRequest {
        model,
        prompt: prompt_text(req.get("system"), messages),
        max_tokens,
    })
}

/// The prompt text of a Messages request: the top-level `system` (string or text blocks)
/// then every message's text, one per line.
pub fn prompt_text(system: Option<&Value>, messages: &[Value]) -> String {
    let mut out = String::new();
    if system.is_some_and(|s| !s.is_null()) {
        push_content(&mut out, system);
        out.push('\n');
    }
    for (i, message) in messages.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        push_content(&mut out, message.get("content"));
    }
    out
}

fn stop_reason(r: &Reply) -> &'static str {
    if r.finish_reason == "length" {
        "max_tokens"
    } else {
        "end_turn"
    }
}

fn message_id(id_seq: u64) -> String {
    format!("msg_sim_{id_seq:016x}")
}

/// A non-streamed Messages response, or a 400 when `model`, `max_tokens` or a non-empty
/// `messages` array is missing.
pub fn message(req: &Value, id_seq: u64) -> Result<Value, SimError> {
    let m = parse(req)?;
    let r = reply::chat_reply(m.model, &m.prompt, Some(m.max_tokens));
    Ok(json!({
        "id": message_id(id_seq),
        "type": "message",
        "role": "assistant",
        "model": m.model,
        "content": [{"type": "text", "text": r.text}],
        "stop_reason": stop_reason(&r),
        "stop_sequence": null,
        "usage": {"input_tokens": r.prompt_tokens, "output_tokens": r.completion_tokens},
    }))
}

/// The events of a streamed Messages response as (event name, data JSON), in the
/// documented order: `message_start`, `content_block_start`, `ping`, one
/// `content_block_delta` (`text_delta`) per piece, `content_block_stop`,
/// `message_delta` (stop reason and output tokens), `message_stop`.
pub fn message_events(req: &Value, id_seq: u64) -> Result<Vec<(String, String)>, SimError> {
    let m = parse(req)?;
    let r = reply::chat_reply(m.model, &m.prompt, Some(m.max_tokens));
    let mut out: Vec<(String, String)> = Vec::with_capacity(r.pieces.len() + 6);
    let mut push = |name: &str, data: Value| out.push((name.to_owned(), data.to_string()));
    push(
        "message_start",
        json!({"type": "message_start", "message": {
            "id": message_id(id_seq),
            "type": "message",
            "role": "assistant",
            "model": m.model,
            "content": [],
            "stop_reason": null,
            "stop_sequence": null,
            // Anthropic reports one output token at the start and the total at the end.
            "usage": {"input_tokens": r.prompt_tokens, "output_tokens": 1},
        }}),
    );
    push(
        "content_block_start",
        json!({"type": "content_block_start", "index": 0,
               "content_block": {"type": "text", "text": ""}}),
    );
    push("ping", json!({"type": "ping"}));
    for piece in &r.pieces {
        push(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0,
                   "delta": {"type": "text_delta", "text": piece}}),
        );
    }
    push(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    );
    push(
        "message_delta",
        json!({"type": "message_delta",
               "delta": {"stop_reason": stop_reason(&r), "stop_sequence": null},
               "usage": {"output_tokens": r.completion_tokens}}),
    );
    push("message_stop", json!({"type": "message_stop"}));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(max_tokens: u32) -> Value {
        json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": max_tokens,
            "system": [{"type": "text", "text": "be brief"}],
            "messages": [{"role": "user", "content": "hello"}],
        })
    }

    #[test]
    fn message_matches_the_reply() {
        let body = message(&req(1024), 1).unwrap();
        let r = reply::chat_reply("claude-sonnet-4-5", "be brief\nhello", Some(1024));
        assert_eq!(body["type"], "message");
        assert_eq!(body["role"], "assistant");
        assert_eq!(body["content"][0]["text"], r.text);
        assert_eq!(body["stop_reason"], "end_turn");
        assert_eq!(body["usage"]["input_tokens"], r.prompt_tokens);
        assert_eq!(body["usage"]["output_tokens"], r.completion_tokens);
        assert!(body["stop_sequence"].is_null());
        assert_eq!(message(&req(3), 1).unwrap()["stop_reason"], "max_tokens");
        let plain_system = json!({
            "model": "claude-sonnet-4-5", "max_tokens": 1024, "system": "be brief",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}],
        });
        assert_eq!(message(&plain_system, 1).unwrap(), body);
    }

    #[test]
    fn message_validates() {
        let cases = [
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}]}),
            json!({"model": "m", "max_tokens": 5}),
            json!({"model": "m", "max_tokens": 5, "messages": []}),
            json!({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}),
        ];
        for case in cases {
            let err = message(&case, 0).unwrap_err();
            assert_eq!(err.status, 400);
            assert_eq!(err.body["type"], "error");
            assert_eq!(err.body["error"]["type"], "invalid_request_error");
            assert!(message_events(&case, 0).is_err());
        }
    }

    #[test]
    fn events_in_documented_order() {
        let events = message_events(&req(1024), 2).unwrap();
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        let r = reply::chat_reply("claude-sonnet-4-5", "be brief\nhello", Some(1024));
        let mut expected = vec!["message_start", "content_block_start", "ping"];
        expected.extend(std::iter::repeat_n("content_block_delta", r.pieces.len()));
        expected.extend(["content_block_stop", "message_delta", "message_stop"]);
        assert_eq!(names, expected);
        let data: Vec<Value> = events
            .iter()
            .map(|(_, d)| serde_json::from_str(d).unwrap())
            .collect();
        for ((name, _), d) in events.iter().zip(&data) {
            assert_eq!(&d["type"], name);
        }
        let text: String = data
            .iter()
            .filter(|d| d["type"] == "content_block_delta")
            .map(|d| d["delta"]["text"].as_str().unwrap())
            .collect();
        assert_eq!(text, r.text);
        assert_eq!(
            data[0]["message"]["id"],
            message(&req(1024), 2).unwrap()["id"]
        );
        let delta = &data[data.len() - 2];
        assert_eq!(delta["delta"]["stop_reason"], "end_turn");
        assert_eq!(delta["usage"]["output_tokens"], r.completion_tokens);
    }

    #[test]
    fn errors_are_anthropic_shaped() {
        let e = error(529, None);
        assert_eq!(e.status, 529);
        assert_eq!(e.body["type"], "error");
        assert_eq!(e.body["error"]["type"], "overloaded_error");
        let e = error(429, Some(Duration::from_secs(3)));
        assert_eq!(e.body["error"]["type"], "rate_limit_error");
        assert!(e.headers.contains(&("retry-after", "3".to_owned())));
        assert!(
            e.headers
                .iter()
                .any(|(k, _)| *k == "anthropic-ratelimit-requests-reset")
        );
        assert_eq!(error(500, None).body["error"]["type"], "api_error");
        assert_eq!(
            error(401, None).body["error"]["type"],
            "authentication_error"
        );
    }
}
