//! OpenAI wire bodies (chat completions, stream chunks, embeddings, models, errors) built
//! from the deterministic content in [`crate::reply`].
//!
//! These are the only source of the simulator's OpenAI bytes: the HTTP server and the
//! gateway's in-process `sim` provider both call them, so the two can never drift apart.

use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Map, Value, json};

use crate::chaos::RateWindow;
use crate::reply::{self, Reply};

/// `created` timestamp of every body: fixed so that replies are byte-for-byte repeatable.
pub const CREATED: u64 = 1_700_000_000;

/// Models listed by `GET /v1/models`.
pub const MODELS: &[&str] = &[
    "gpt-4o-mini",
    "gpt-4o",
    "text-embedding-3-small",
    "claude-3-5-haiku-latest",
    "claude-sonnet-4-5",
];

/// Most choices a single request may ask for, as OpenAI limits `n`.
const MAX_N: u64 = 128;

/// A failure the simulator answers with: status, wire body and extra headers
/// (`retry-after`, `retry-after-ms`, rate-limit headers).
#[derive(Clone, Debug, PartialEq)]
pub struct SimError {
    pub status: u16,
    pub body: Value,
    pub headers: Vec<(&'static str, String)>,
}

impl fmt::Display for SimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "simulated upstream error {}: {}", self.status, self.body)
    }
}

impl std::error::Error for SimError {}

/// OpenAI-shaped error for `status`. A `retry_after` adds `retry-after` (whole seconds,
/// rounded up) and `retry-after-ms`; a 429 adds the `x-ratelimit-*-requests` headers
/// (the server adds `x-ratelimit-limit-requests`, which only it knows).
pub fn error(status: u16, retry_after: Option<Duration>) -> SimError {
    let (kind, code, message) = match status {
        400 => ("invalid_request_error", None, "Invalid request."),
        401 => (
            "invalid_request_error",
            Some("invalid_api_key"),
            "Incorrect API key provided.",
        ),
        403 => (
            "invalid_request_error",
            Some("unsupported_country_region_territory"),
            "Access denied.",
        ),
        404 => (
            "invalid_request_error",
            Some("not_found"),
            "The requested resource does not exist.",
        ),
        429 => (
            "requests",
            Some("rate_limit_exceeded"),
            "Rate limit reached for requests (simulated).",
        ),
        503 | 529 => (
            "overloaded",
            Some("service_unavailable"),
            "The server is overloaded or not ready yet (simulated).",
        ),
        500..=599 => (
            "server_error",
            None,
            "The server had an error while processing your request (simulated).",
        ),
        _ => ("invalid_request_error", None, "Request failed (simulated)."),
    };
    let mut headers = retry_headers(retry_after);
    if status == 429 {
        headers.push(("x-ratelimit-remaining-requests", "0".to_owned()));
        let reset = retry_after.unwrap_or(Duration::from_secs(1));
        headers.push(("x-ratelimit-reset-requests", reset_text(reset)));
    }
    SimError {
        status,
        body: json!({"error": {"message": message, "type": kind, "param": null, "code": code}}),
        headers,
    }
}

/// A 400 `invalid_request_error` naming what was wrong and, where known, the parameter.
pub fn invalid_request(message: &str, param: Option<&str>) -> SimError {
    SimError {
        status: 400,
        body: json!({"error": {
            "message": message, "type": "invalid_request_error", "param": param, "code": null
        }}),
        headers: Vec::new(),
    }
}

/// `retry-after` in whole seconds (rounded up, as clients sleep at least that long) and
/// the millisecond form OpenAI also sends.
pub(crate) fn retry_headers(retry_after: Option<Duration>) -> Vec<(&'static str, String)> {
    match retry_after {
        Some(after) => vec![
            ("retry-after", after.as_millis().div_ceil(1000).to_string()),
            ("retry-after-ms", after.as_millis().to_string()),
        ],
        None => Vec::new(),
    }
}

/// OpenAI's `x-ratelimit-*-requests` headers, sent with every answer when `rpm` is set.
pub fn rate_limit_headers(w: RateWindow) -> Vec<(&'static str, String)> {
    vec![
        ("x-ratelimit-limit-requests", w.limit.to_string()),
        ("x-ratelimit-remaining-requests", w.remaining.to_string()),
        ("x-ratelimit-reset-requests", reset_text(w.reset)),
    ]
}

/// The compact duration form of OpenAI's reset headers: "20ms", "1s", "6m0s".
fn reset_text(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = ms.div_ceil(1000);
    if secs < 60 {
        format!("{secs}s")
    } else {
        format!("{}m{}s", secs / 60, secs % 60)
    }
}

/// What a chat request asks for, once validated.
struct ChatRequest<'a> {
    model: &'a str,
    prompt: String,
    max_tokens: Option<u32>,
    n: u32,
    include_usage: bool,
}

fn parse_chat(req: &Value) -> Result<ChatRequest<'_>, SimError> {
    let obj = req
        .as_object()
        .ok_or_else(|| invalid_request("The request body must be a JSON object.", None))?;
    let model = match obj.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.as_str(),
        _ => {
            return Err(invalid_request(
                "you must provide a model parameter",
                Some("model"),
            ));
        }
    };
    let messages = match obj.get("messages") {
        Some(Value::Array(m)) if !m.is_empty() => m,
        Some(Value::Array(_)) => {
            return Err(invalid_request(
                "'messages' must contain at least one message.",
                Some("messages"),
            ));
        }
        _ => {
            return Err(invalid_request(
                "Missing required parameter: 'messages'.",
                Some("messages"),
            ));
        }
    };
    if let Some(i) = messages.iter().position(|m| !m.is_object()) {
        return Err(invalid_request(
            &format!("Invalid type for 'messages[{i}]': expected an object."),
            Some("messages"),
        ));
    }
    // `max_completion_tokens` superseded `max_tokens`; honour whichever is sent.
    let max_tokens = match obj
        .get("max_completion_tokens")
        .filter(|v| !v.is_null())
        .or_else(|| obj.get("max_tokens").filter(|v| !v.is_null()))
    {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| {
                    invalid_request(
                        "Invalid 'max_tokens': expected a non-negative integer.",
                        Some("max_tokens"),
                    )
                })?,
        ),
    };
    let n = match obj.get("n").filter(|v| !v.is_null()) {
        None => 1,
        Some(v) => match v.as_u64() {
            Some(n @ 1..=MAX_N) => n as u32,
            _ => {
                return Err(invalid_request(
                    "Invalid 'n': expected an integer between 1 and 128.",
                    Some("n"),
                ));
            }
        },
    };
    let include_usage = obj
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok(ChatRequest {
        model,
        prompt: prompt_text(messages),
        max_tokens,
        n,
        include_usage,
    })
}

/// The prompt text of OpenAI `messages`: every text content (plain string or `text`
/// parts), one message per line. Chat replies and prompt token counts derive from it.
pub fn prompt_text(messages: &[Value]) -> String {
    let mut out = String::new();
    for (i, message) in messages.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        push_content(&mut out, message.get("content"));
    }
    out
}

/// Appends a content value (string, or array of parts with `text`) to `out`.
pub(crate) fn push_content(out: &mut String, content: Option<&Value>) {
    match content {
        Some(Value::String(s)) => out.push_str(s),
        Some(Value::Array(parts)) => {
            for text in parts.iter().filter_map(|p| p.get("text")?.as_str()) {
                out.push_str(text);
            }
        }
        _ => {}
    }
}

fn replies(req: &ChatRequest<'_>) -> Vec<Reply> {
    (0..req.n)
        .map(|i| reply::chat_reply_variant(req.model, &req.prompt, req.max_tokens, i))
        .collect()
}

fn usage(replies: &[Reply]) -> Value {
    let prompt = replies.first().map_or(0, |r| r.prompt_tokens);
    let completion: u32 = replies.iter().map(|r| r.completion_tokens).sum();
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

fn chat_id(id_seq: u64) -> String {
    format!("chatcmpl-sim-{id_seq}")
}

/// A non-streamed chat completion, or a 400 with an OpenAI error body when the request
/// lacks `model` or a non-empty `messages` array.
pub fn chat_completion(req: &Value, id_seq: u64) -> Result<Value, SimError> {
    let chat = parse_chat(req)?;
    let replies = replies(&chat);
    let choices: Vec<Value> = replies
        .iter()
        .enumerate()
        .map(|(i, r)| {
            json!({
                "index": i,
                "message": {"role": "assistant", "content": r.text, "refusal": null},
                "logprobs": null,
                "finish_reason": r.finish_reason,
            })
        })
        .collect();
    Ok(json!({
        "id": chat_id(id_seq),
        "object": "chat.completion",
        "created": CREATED,
        "model": chat.model,
        "choices": choices,
        "usage": usage(&replies),
        "system_fingerprint": "fp_sim",
    }))
}

/// The delta of one stream chunk.
enum Delta<'a> {
    Role,
    Content(&'a str),
    Empty,
}

/// The `data:` payloads of a streamed chat completion, without the `data: ` prefix and
/// without the final `[DONE]`.
///
/// Per choice: a chunk with `{"role":"assistant","content":""}`, one chunk per piece,
/// then an empty delta with the finish reason. With `stream_options.include_usage`, every
/// chunk carries `"usage": null` and a last chunk has no choices and the usage.
pub fn chat_chunks(req: &Value, id_seq: u64) -> Result<Vec<String>, SimError> {
    let chat = parse_chat(req)?;
    let replies = replies(&chat);
    // Every chunk shares all fields but `choices`. They are serialised once, and each
    // chunk is the choice spliced in front: streaming is the hot path of benchmarks and
    // rebuilding a map per word cost five times more. Keys stay in the sorted order a
    // `Value` would write, so the output is the same JSON either way.
    let mut base = Map::new();
    base.insert("id".to_owned(), Value::String(chat_id(id_seq)));
    base.insert(
        "object".to_owned(),
        Value::String("chat.completion.chunk".to_owned()),
    );
    base.insert("created".to_owned(), Value::from(CREATED));
    base.insert("model".to_owned(), Value::String(chat.model.to_owned()));
    base.insert(
        "system_fingerprint".to_owned(),
        Value::String("fp_sim".to_owned()),
    );
    if chat.include_usage {
        base.insert("usage".to_owned(), Value::Null);
    }
    let tail = Value::Object(base.clone()).to_string();
    // `tail` is `{"created":…}`; dropping its brace leaves the fields after `choices`.
    let tail = tail.get(1..).unwrap_or_default();
    let chunk = |index: usize, delta: Delta<'_>, finish: Option<&str>| -> String {
        let mut out = String::with_capacity(128 + tail.len());
        out.push_str(r#"{"choices":[{"delta":"#);
        match delta {
            Delta::Role => out.push_str(r#"{"content":"","role":"assistant"}"#),
            Delta::Content(text) => {
                out.push_str(r#"{"content":"#);
                // Serialising a &str cannot fail; the fallback keeps the JSON valid.
                out.push_str(&serde_json::to_string(text).unwrap_or_else(|_| "\"\"".into()));
                out.push('}');
            }
            Delta::Empty => out.push_str("{}"),
        }
        out.push_str(r#","finish_reason":"#);
        match finish {
            Some(reason) => {
                out.push('"');
                out.push_str(reason);
                out.push('"');
            }
            None => out.push_str("null"),
        }
        out.push_str(r#","index":"#);
        out.push_str(&index.to_string());
        out.push_str(r#","logprobs":null}],"#);
        out.push_str(tail);
        out
    };

    let pieces: usize = replies.iter().map(|r| r.pieces.len() + 2).sum();
    let mut out = Vec::with_capacity(pieces + 1);
    for (i, r) in replies.iter().enumerate() {
        out.push(chunk(i, Delta::Role, None));
        for piece in &r.pieces {
            out.push(chunk(i, Delta::Content(piece), None));
        }
        out.push(chunk(i, Delta::Empty, Some(r.finish_reason)));
    }
    if chat.include_usage {
        let mut last = base;
        last.insert("choices".to_owned(), Value::Array(Vec::new()));
        last.insert("usage".to_owned(), usage(&replies));
        out.push(Value::Object(last).to_string());
    }
    Ok(out)
}

/// One embeddings input, as sent.
enum Input<'a> {
    Text(&'a str),
    Tokens(Vec<u32>),
}

fn token_array(v: &Value) -> Option<Vec<u32>> {
    let arr = v.as_array()?;
    if arr.is_empty() {
        return None;
    }
    arr.iter()
        .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
        .collect()
}

fn parse_inputs(input: Option<&Value>) -> Result<Vec<Input<'_>>, SimError> {
    let bad = || {
        invalid_request(
            "'input' must be a non-empty string, array of non-empty strings, array of \
             tokens, or array of token arrays.",
            Some("input"),
        )
    };
    match input {
        Some(Value::String(s)) if !s.is_empty() => Ok(vec![Input::Text(s)]),
        Some(Value::Array(items)) if !items.is_empty() => {
            if items.iter().all(Value::is_number) {
                return token_array(input.ok_or_else(bad)?)
                    .map(|t| vec![Input::Tokens(t)])
                    .ok_or_else(bad);
            }
            items
                .iter()
                .map(|item| match item {
                    Value::String(s) if !s.is_empty() => Ok(Input::Text(s)),
                    Value::Array(_) => token_array(item).map(Input::Tokens).ok_or_else(bad),
                    _ => Err(bad()),
                })
                .collect()
        }
        _ => Err(bad()),
    }
}

/// An embeddings response. Accepts a string, an array of strings, an array of tokens or
/// an array of token arrays; honours `dimensions` and `encoding_format: "base64"`
/// (little-endian f32 bytes, as OpenAI sends them).
pub fn embeddings(req: &Value) -> Result<Value, SimError> {
    let model = match req.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.as_str(),
        _ => {
            return Err(invalid_request(
                "you must provide a model parameter",
                Some("model"),
            ));
        }
    };
    let inputs = parse_inputs(req.get("input"))?;
    let max_dims = reply::default_dims(model);
    let dims = match req.get("dimensions").filter(|v| !v.is_null()) {
        None => max_dims,
        Some(v) => match v.as_u64() {
            Some(d) if d >= 1 && d as usize <= max_dims => d as usize,
            _ => {
                return Err(invalid_request(
                    &format!("Invalid 'dimensions': expected an integer from 1 to {max_dims}."),
                    Some("dimensions"),
                ));
            }
        },
    };
    let base64 = match req.get("encoding_format").and_then(Value::as_str) {
        None | Some("float") => false,
        Some("base64") => true,
        Some(_) => {
            return Err(invalid_request(
                "Invalid 'encoding_format': expected 'float' or 'base64'.",
                Some("encoding_format"),
            ));
        }
    };

    let mut tokens: u32 = 0;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            let vector = match input {
                Input::Text(s) => {
                    tokens = tokens.saturating_add(reply::count_tokens(s));
                    reply::embedding(s, dims)
                }
                Input::Tokens(t) => {
                    tokens = tokens.saturating_add(t.len() as u32);
                    reply::embedding_of_tokens(t, dims)
                }
            };
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                Value::Array(vector.into_iter().map(Value::from).collect())
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    Ok(json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
}

/// The `GET /v1/models` list.
pub fn models(names: &[&str]) -> Value {
    let data: Vec<Value> = names
        .iter()
        .map(
            |id| json!({"id": id, "object": "model", "created": CREATED, "owned_by": "sluice-sim"}),
        )
        .collect();
    json!({"object": "list", "data": data})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(extra: Value) -> Value {
        let mut req = json!({
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hello"}]},
            ],
        });
        if let (Some(obj), Value::Object(extra)) = (req.as_object_mut(), extra) {
            obj.extend(extra);
        }
        req
    }

    fn parse(chunks: &[String]) -> Vec<Value> {
        chunks
            .iter()
            .map(|c| serde_json::from_str(c).unwrap())
            .collect()
    }

    #[test]
    fn completion_matches_the_reply() {
        let body = chat_completion(&chat(json!({})), 3).unwrap();
        let expected = reply::chat_reply("gpt-4o-mini", "be brief\nhello", None);
        assert_eq!(body["id"], "chatcmpl-sim-3");
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["model"], "gpt-4o-mini");
        assert_eq!(body["choices"][0]["message"]["content"], expected.text);
        assert_eq!(body["choices"][0]["message"]["role"], "assistant");
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        assert_eq!(body["usage"]["prompt_tokens"], expected.prompt_tokens);
        assert_eq!(
            body["usage"]["completion_tokens"],
            expected.completion_tokens
        );
        assert_eq!(
            body["usage"]["total_tokens"],
            expected.prompt_tokens + expected.completion_tokens
        );
        assert_eq!(body, chat_completion(&chat(json!({})), 3).unwrap());
    }

    #[test]
    fn completion_n_and_length() {
        let body = chat_completion(&chat(json!({"n": 3, "max_tokens": 4})), 0).unwrap();
        let choices = body["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 3);
        assert!(choices.iter().all(|c| c["finish_reason"] == "length"));
        assert_eq!(choices[2]["index"], 2);
        let body = chat_completion(&chat(json!({"max_completion_tokens": 4})), 0).unwrap();
        assert_eq!(body["choices"][0]["finish_reason"], "length");
    }

    #[test]
    fn completion_validates() {
        let no_messages = json!({"model": "m"});
        let empty = json!({"model": "m", "messages": []});
        let no_model = json!({"messages": [{"role": "user", "content": "x"}]});
        let bad_n = chat(json!({"n": 0}));
        for req in [no_messages, empty, no_model, bad_n, json!([1])] {
            let err = chat_completion(&req, 0).unwrap_err();
            assert_eq!(err.status, 400, "{req}");
            assert_eq!(err.body["error"]["type"], "invalid_request_error");
            assert!(chat_chunks(&req, 0).is_err());
        }
    }

    #[test]
    fn chunks_in_documented_order() {
        let req = chat(json!({"stream": true}));
        let chunks = parse(&chat_chunks(&req, 9).unwrap());
        let full = chat_completion(&req, 9).unwrap();
        let r = reply::chat_reply("gpt-4o-mini", "be brief\nhello", None);
        assert_eq!(chunks.len(), r.pieces.len() + 2);
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(chunks[0]["choices"][0]["delta"]["content"], "");
        let text: String = chunks[1..chunks.len() - 1]
            .iter()
            .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
            .collect();
        assert_eq!(text, full["choices"][0]["message"]["content"]);
        let last = chunks.last().unwrap();
        assert_eq!(last["choices"][0]["finish_reason"], "stop");
        assert_eq!(last["choices"][0]["delta"], json!({}));
        for (c, raw) in chunks.iter().zip(chat_chunks(&req, 9).unwrap()) {
            assert_eq!(
                c.to_string(),
                raw,
                "spliced chunk differs from its Value form"
            );
            assert_eq!(c["object"], "chat.completion.chunk");
            assert_eq!(c["id"], "chatcmpl-sim-9");
            assert!(c.get("usage").is_none());
        }
    }

    #[test]
    fn usage_chunk_only_when_asked() {
        let req = chat(json!({"stream": true, "stream_options": {"include_usage": true}}));
        let chunks = parse(&chat_chunks(&req, 0).unwrap());
        let (last, rest) = chunks.split_last().unwrap();
        assert_eq!(last["choices"], json!([]));
        let full = chat_completion(&req, 0).unwrap();
        assert_eq!(last["usage"], full["usage"]);
        assert!(
            rest.iter()
                .all(|c| c["usage"].is_null() && c.get("usage").is_some())
        );
        let raw = chat_chunks(&req, 0).unwrap();
        assert!(
            chunks
                .iter()
                .zip(&raw)
                .all(|(c, r)| *c == serde_json::from_str::<Value>(r).unwrap())
        );
        assert_eq!(rest.last().unwrap()["choices"][0]["finish_reason"], "stop");
        let plain = chat(json!({"stream": true, "stream_options": {"include_usage": false}}));
        assert_eq!(chat_chunks(&plain, 0).unwrap().len(), chunks.len() - 1);
    }

    #[test]
    fn errors_are_openai_shaped() {
        let e = error(429, Some(Duration::from_millis(1500)));
        assert_eq!(e.body["error"]["type"], "requests");
        assert_eq!(e.body["error"]["code"], "rate_limit_exceeded");
        assert!(e.body["error"]["param"].is_null());
        assert!(e.headers.contains(&("retry-after", "2".to_owned())));
        assert!(e.headers.contains(&("retry-after-ms", "1500".to_owned())));
        assert!(
            e.headers
                .contains(&("x-ratelimit-reset-requests", "2s".to_owned()))
        );
        assert_eq!(error(500, None).body["error"]["type"], "server_error");
        assert!(error(500, None).headers.is_empty());
        assert_eq!(
            error(503, None).body["error"]["code"],
            "service_unavailable"
        );
        assert_eq!(error(401, None).body["error"]["code"], "invalid_api_key");
        assert_eq!(
            error(400, None).body["error"]["type"],
            "invalid_request_error"
        );
        assert_eq!(reset_text(Duration::from_millis(20)), "20ms");
        assert_eq!(reset_text(Duration::from_secs(360)), "6m0s");
    }

    #[test]
    fn embeddings_all_input_forms() {
        let one = embeddings(&json!({"model": "text-embedding-3-small", "input": "hi"})).unwrap();
        assert_eq!(one["object"], "list");
        assert_eq!(one["data"][0]["embedding"].as_array().unwrap().len(), 1536);
        assert_eq!(one["data"][0]["object"], "embedding");
        let many = embeddings(&json!({
            "model": "text-embedding-3-large", "input": ["hi", "there"], "dimensions": 64
        }))
        .unwrap();
        assert_eq!(many["data"].as_array().unwrap().len(), 2);
        assert_eq!(many["data"][1]["index"], 1);
        assert_eq!(many["data"][1]["embedding"].as_array().unwrap().len(), 64);
        let tokens =
            embeddings(&json!({"model": "text-embedding-3-small", "input": [1, 2, 3]})).unwrap();
        assert_eq!(tokens["data"].as_array().unwrap().len(), 1);
        assert_eq!(tokens["usage"]["prompt_tokens"], 3);
        let nested =
            embeddings(&json!({"model": "text-embedding-3-small", "input": [[1, 2], [3]]}))
                .unwrap();
        assert_eq!(nested["data"].as_array().unwrap().len(), 2);
        assert_eq!(nested["usage"]["total_tokens"], 3);
        for bad in [
            json!(""),
            json!([]),
            json!([[]]),
            json!([true]),
            json!(null),
        ] {
            let req = json!({"model": "text-embedding-3-small", "input": bad});
            assert_eq!(embeddings(&req).unwrap_err().status, 400, "{req}");
        }
        let too_wide = json!({"model": "text-embedding-3-small", "input": "x", "dimensions": 4000});
        assert_eq!(embeddings(&too_wide).unwrap_err().status, 400);
    }

    #[test]
    fn embeddings_base64_is_little_endian_f32() {
        let req = json!({
            "model": "text-embedding-3-small", "input": "hi", "dimensions": 8,
            "encoding_format": "base64",
        });
        let body = embeddings(&req).unwrap();
        let b64 = body["data"][0]["embedding"].as_str().unwrap();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        let floats: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(floats, reply::embedding("hi", 8));
    }

    #[test]
    fn models_lists_names() {
        let body = models(MODELS);
        assert_eq!(body["data"].as_array().unwrap().len(), MODELS.len());
        assert_eq!(body["data"][0]["id"], "gpt-4o-mini");
        assert_eq!(body["data"][0]["object"], "model");
    }
}
