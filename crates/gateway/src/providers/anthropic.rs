//! Anthropic Messages API, translated both ways for chat (streaming included): the client's
//! OpenAI request becomes a `POST /v1/messages` body, and the message or its event stream
//! comes back as an OpenAI completion or OpenAI chunks, so clients only ever see OpenAI.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::http::{
    ErrorBody, Upstream, UpstreamResponse, body_bytes, invalid_response, secret_header, send,
    sse_events, upstream_uri,
};
use super::{ChatCall, ChunkStream, ErrorClass, Provider, Timeouts, UpstreamError};
use crate::config::ProviderConfig;
use crate::limits::capacity::Capacity;
use crate::wire::{
    ChatMessage, ChatRequest, ChatResponse, Choice, Content, EmbeddingsRequest, EmbeddingsResponse,
    StreamChunk, Usage,
};

const KIND: &str = "anthropic";

/// The API version this translation is written against; Anthropic requires the header.
const API_VERSION: &str = "2023-06-01";

/// Anthropic requires `max_tokens` while OpenAI makes it optional, so a request without
/// either OpenAI spelling needs a cap; 4096 is within every current Claude model's limit.
const DEFAULT_MAX_TOKENS: u32 = 4096;

pub struct AnthropicProvider {
    upstream: Upstream,
    messages_url: ::http::Uri,
}

impl AnthropicProvider {
    pub fn new(config: &ProviderConfig) -> anyhow::Result<Self> {
        let mut headers = ::http::HeaderMap::new();
        if let Some(v) = secret_header(config, "")? {
            headers.insert("x-api-key", v);
        }
        headers.insert(
            "anthropic-version",
            ::http::HeaderValue::from_static(API_VERSION),
        );
        let messages_url = upstream_uri(&config.base_url, "/v1/messages")?;
        Ok(Self {
            upstream: Upstream::new(config, headers, &messages_url)?,
            messages_url,
        })
    }

    async fn send(
        &self,
        call: &ChatCall<'_>,
        stream: bool,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let body = messages_body(call.request, call.upstream_model, stream)?;
        let bytes = serde_json::to_vec(&body)
            .map_err(|e| bad_request(format!("cannot encode request: {e}")))?;
        send(
            KIND,
            &self.upstream,
            (&self.messages_url, bytes),
            call.timeouts.first_byte,
            parse_error,
            call.capacity,
        )
        .await
        .map_err(reclassify)
    }
}

#[async_trait]
impl Provider for AnthropicProvider {
    fn kind(&self) -> &'static str {
        KIND
    }

    async fn chat(&self, call: ChatCall<'_>) -> Result<ChatResponse, UpstreamError> {
        let response = self.send(&call, false).await?;
        let bytes = body_bytes(KIND, response, call.timeouts.total).await?;
        let message: Message =
            serde_json::from_slice(&bytes).map_err(|e| invalid_response(KIND, "message", e))?;
        Ok(chat_response(message, unix_now()))
    }

    async fn chat_stream(&self, call: ChatCall<'_>) -> Result<ChunkStream, UpstreamError> {
        let response = self.send(&call, true).await?;
        Ok(anthropic_chunks(sse_events(KIND, response)))
    }

    async fn embeddings(
        &self,
        _request: &EmbeddingsRequest,
        _upstream_model: &str,
        _timeouts: Timeouts,
        _capacity: Option<&Capacity>,
    ) -> Result<EmbeddingsResponse, UpstreamError> {
        Err(UpstreamError::new(
            ErrorClass::BadRequest,
            KIND,
            "Anthropic has no embeddings API; route embeddings to another provider",
        ))
    }
}

fn bad_request(message: impl Into<String>) -> UpstreamError {
    UpstreamError::new(ErrorClass::BadRequest, KIND, message)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---- errors ----------------------------------------------------------------------------

/// Anthropic's `{"type":"error","error":{"type","message"}}`. Its `type` is the only code
/// Anthropic gives, so it serves as both.
pub(crate) fn parse_error(v: &Value) -> ErrorBody {
    let error = v.get("error").filter(|e| e.is_object());
    let text = |k: &str| {
        error
            .and_then(|e| e.get(k))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let kind = text("type");
    ErrorBody {
        message: text("message")
            .or_else(|| v.get("message").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| "upstream error".into()),
        code: kind.clone(),
        kind,
        param: None,
    }
}

/// The class of a documented Anthropic error type; `None` for types we do not know.
fn class_of_error_type(kind: &str) -> Option<ErrorClass> {
    Some(match kind {
        "invalid_request_error" | "request_too_large" => ErrorClass::BadRequest,
        "authentication_error" | "permission_error" => ErrorClass::Auth,
        "not_found_error" => ErrorClass::NotFound,
        "rate_limit_error" => ErrorClass::RateLimited,
        "overloaded_error" => ErrorClass::Overloaded,
        "timeout_error" => ErrorClass::Timeout,
        "api_error" => ErrorClass::Server,
        _ => return None,
    })
}

/// The error type in the body is what Anthropic means; the status can be rewritten by a
/// proxy in between, so a known type wins over the status-based class.
fn reclassify(mut e: UpstreamError) -> UpstreamError {
    if let Some(class) = e.code.as_deref().and_then(class_of_error_type) {
        e.class = class;
    }
    e
}

// ---- request: OpenAI -> Anthropic --------------------------------------------------------

/// The Messages body for an OpenAI chat request. Only fields Anthropic knows are written:
/// it rejects unknown ones, so the client's extra fields are dropped, except `top_k` and
/// `metadata`, which are Anthropic's own and may be sent through `extra_body`.
pub(crate) fn messages_body(
    request: &ChatRequest,
    model: &str,
    stream: bool,
) -> Result<Value, UpstreamError> {
    if request.n.is_some_and(|n| n > 1) {
        return Err(bad_request(
            "n > 1 is not supported: Anthropic returns one choice",
        ));
    }
    let mut system: Vec<String> = Vec::new();
    let mut messages: Vec<(&'static str, Vec<Value>)> = Vec::new();
    for (i, m) in request.messages.iter().enumerate() {
        let (role, blocks) = match m.role.as_str() {
            "system" | "developer" => {
                let text = m.text();
                if !text.is_empty() {
                    system.push(text);
                }
                continue;
            }
            "user" => ("user", content_blocks(m.content.as_ref(), i)?),
            "assistant" => ("assistant", assistant_blocks(m, i)?),
            // Anthropic carries tool results inside a user turn.
            "tool" => ("user", vec![tool_result(m, i)?]),
            other => {
                return Err(bad_request(format!(
                    "messages[{i}]: role '{other}' is not supported by Anthropic"
                )));
            }
        };
        if blocks.is_empty() {
            continue;
        }
        // Anthropic wants user and assistant turns to alternate; OpenAI allows runs of one
        // role (several tool results in a row, most often), so a run becomes one turn.
        match messages.last_mut() {
            Some((last, content)) if *last == role => content.extend(blocks),
            _ => messages.push((role, blocks)),
        }
    }

    let mut body = Map::new();
    body.insert("model".into(), json!(model));
    body.insert(
        "max_tokens".into(),
        json!(request.max_output_tokens().unwrap_or(DEFAULT_MAX_TOKENS)),
    );
    body.insert(
        "messages".into(),
        Value::Array(
            messages
                .into_iter()
                .map(|(role, content)| json!({"role": role, "content": content}))
                .collect(),
        ),
    );
    if !system.is_empty() {
        body.insert("system".into(), json!(system.join("\n\n")));
    }
    if let Some(t) = request.temperature {
        // OpenAI accepts 0..2, Anthropic 0..1.
        body.insert("temperature".into(), json!(t.clamp(0.0, 1.0)));
    }
    if let Some(p) = request.top_p {
        body.insert("top_p".into(), json!(p));
    }
    if let Some(stop) = &request.stop {
        body.insert("stop_sequences".into(), json!(stop.to_vec()));
    }
    if let Some(k) = request.extra.get("top_k") {
        body.insert("top_k".into(), k.clone());
    }
    let mut metadata = match request.extra.get("metadata") {
        Some(Value::Object(m)) => m.clone(),
        _ => Map::new(),
    };
    if let Some(user) = &request.user {
        metadata.entry("user_id").or_insert_with(|| json!(user));
    }
    if !metadata.is_empty() {
        body.insert("metadata".into(), Value::Object(metadata));
    }
    let tools = request.tools.as_deref().unwrap_or_default();
    if !tools.is_empty() {
        let tools = tools
            .iter()
            .enumerate()
            .map(|(i, t)| tool(t, i))
            .collect::<Result<Vec<_>, _>>()?;
        body.insert("tools".into(), Value::Array(tools));
    }
    let mut choice = request.tool_choice.as_ref().map(tool_choice).transpose()?;
    if request.extra.get("parallel_tool_calls") == Some(&Value::Bool(false)) && !tools.is_empty() {
        let c = choice.get_or_insert_with(|| json!({"type": "auto"}));
        if c["type"] != "none" {
            c["disable_parallel_tool_use"] = json!(true);
        }
    }
    if let Some(c) = choice {
        body.insert("tool_choice".into(), c);
    }
    if stream {
        body.insert("stream".into(), json!(true));
    }
    Ok(Value::Object(body))
}

/// Content blocks of a message's content. Empty text is dropped: Anthropic rejects empty
/// text blocks, and OpenAI clients send `""` beside tool calls.
fn content_blocks(content: Option<&Content>, i: usize) -> Result<Vec<Value>, UpstreamError> {
    match content {
        None => Ok(Vec::new()),
        Some(Content::Text(s)) if s.is_empty() => Ok(Vec::new()),
        Some(Content::Text(s)) => Ok(vec![json!({"type": "text", "text": s})]),
        Some(Content::Parts(parts)) => {
            let mut out = Vec::with_capacity(parts.len());
            for part in parts {
                if let Some(block) =
                    part_block(part).map_err(|e| bad_request(format!("messages[{i}]: {e}")))?
                {
                    out.push(block);
                }
            }
            Ok(out)
        }
    }
}

fn part_block(part: &Value) -> Result<Option<Value>, String> {
    match part.get("type").and_then(Value::as_str) {
        Some("text") => {
            let text = part.get("text").and_then(Value::as_str).unwrap_or_default();
            Ok((!text.is_empty()).then(|| json!({"type": "text", "text": text})))
        }
        Some("image_url") => {
            let image = part.get("image_url");
            let url = image
                .and_then(|u| u.get("url"))
                .or(image)
                .and_then(Value::as_str)
                .ok_or("image_url part without a url")?;
            image_block(url).map(Some)
        }
        Some(other) => Err(format!(
            "content part type '{other}' is not supported by Anthropic"
        )),
        None => Err("content part without a type".into()),
    }
}

/// A data URL becomes an inline base64 image; an http(s) URL is fetched by Anthropic.
fn image_block(url: &str) -> Result<Value, String> {
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest.split_once(',').ok_or("malformed data URL")?;
        let meta = meta
            .strip_suffix(";base64")
            .ok_or("only base64 data URLs are supported for images")?;
        let media_type = meta.split(';').next().unwrap_or_default();
        if media_type.is_empty() {
            return Err("data URL without a media type".into());
        }
        Ok(
            json!({"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}),
        )
    } else if url.starts_with("https://") || url.starts_with("http://") {
        Ok(json!({"type": "image", "source": {"type": "url", "url": url}}))
    } else {
        Err("image URLs must be http(s) or base64 data URLs".into())
    }
}

fn assistant_blocks(m: &ChatMessage, i: usize) -> Result<Vec<Value>, UpstreamError> {
    let mut blocks = content_blocks(m.content.as_ref(), i)?;
    for call in m.tool_calls.iter().flatten() {
        let function = call.get("function");
        let field = |k: &str| function.and_then(|f| f.get(k)).and_then(Value::as_str);
        let id = call.get("id").and_then(Value::as_str);
        let (Some(id), Some(name)) = (id, field("name")) else {
            return Err(bad_request(format!(
                "messages[{i}]: tool call without id or function name"
            )));
        };
        // OpenAI carries arguments as a JSON string; Anthropic wants the object itself.
        let arguments = field("arguments").unwrap_or_default();
        let input = if arguments.trim().is_empty() {
            json!({})
        } else {
            serde_json::from_str::<Value>(arguments)
                .ok()
                .filter(Value::is_object)
                .ok_or_else(|| {
                    bad_request(format!(
                        "messages[{i}]: tool call arguments are not a JSON object"
                    ))
                })?
        };
        blocks.push(json!({"type": "tool_use", "id": id, "name": name, "input": input}));
    }
    Ok(blocks)
}

fn tool_result(m: &ChatMessage, i: usize) -> Result<Value, UpstreamError> {
    let id = m
        .tool_call_id
        .as_deref()
        .ok_or_else(|| bad_request(format!("messages[{i}]: tool message without tool_call_id")))?;
    let mut block = json!({"type": "tool_result", "tool_use_id": id});
    match &m.content {
        Some(Content::Text(s)) => block["content"] = json!(s),
        Some(parts @ Content::Parts(_)) => {
            block["content"] = Value::Array(content_blocks(Some(parts), i)?)
        }
        None => {}
    }
    Ok(block)
}

/// An OpenAI function tool as an Anthropic client tool.
fn tool(t: &Value, i: usize) -> Result<Value, UpstreamError> {
    if t.get("type").and_then(Value::as_str) != Some("function") {
        return Err(bad_request(format!(
            "tools[{i}]: only function tools are supported by Anthropic"
        )));
    }
    let function = t.get("function");
    let name = function
        .and_then(|f| f.get("name"))
        .and_then(Value::as_str)
        .ok_or_else(|| bad_request(format!("tools[{i}]: function without a name")))?;
    // Anthropic requires a schema; OpenAI lets a function take no parameters.
    let schema = function
        .and_then(|f| f.get("parameters"))
        .cloned()
        .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
    let mut out = json!({"name": name, "input_schema": schema});
    if let Some(description) = function.and_then(|f| f.get("description")) {
        out["description"] = description.clone();
    }
    Ok(out)
}

fn tool_choice(choice: &Value) -> Result<Value, UpstreamError> {
    match choice {
        Value::String(s) => match s.as_str() {
            "auto" => Ok(json!({"type": "auto"})),
            "required" => Ok(json!({"type": "any"})),
            "none" => Ok(json!({"type": "none"})),
            other => Err(bad_request(format!(
                "tool_choice '{other}' is not supported"
            ))),
        },
        _ => choice
            .get("function")
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .map(|name| json!({"type": "tool", "name": name}))
            .ok_or_else(|| bad_request("tool_choice must name a function")),
    }
}

// ---- response: Anthropic -> OpenAI --------------------------------------------------------

/// A non-streamed Messages response, read as far as the translation needs.
#[derive(Debug, Deserialize)]
pub(crate) struct Message {
    id: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    content: Vec<Block>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: AnthropicUsage,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block {
    Text {
        #[serde(default)]
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        #[serde(default)]
        input: Value,
    },
    /// Thinking, server tools and block types added later have no OpenAI counterpart.
    #[serde(other)]
    Other,
}

/// Anthropic usage; every field optional because `message_delta` sends only some.
#[derive(Debug, Default, Deserialize)]
struct AnthropicUsage {
    #[serde(default)]
    input_tokens: Option<u32>,
    #[serde(default)]
    output_tokens: Option<u32>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u32>,
    #[serde(default)]
    cache_read_input_tokens: Option<u32>,
}

impl AnthropicUsage {
    /// Anthropic counts cached prompt tokens apart from `input_tokens`; OpenAI's
    /// `prompt_tokens` is the whole prompt, so they are added back.
    fn prompt_tokens(&self) -> u32 {
        [
            self.input_tokens,
            self.cache_creation_input_tokens,
            self.cache_read_input_tokens,
        ]
        .into_iter()
        .flatten()
        .fold(0u32, u32::saturating_add)
    }
}

fn finish_reason(stop_reason: &str) -> &'static str {
    match stop_reason {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        // end_turn, stop_sequence, pause_turn and reasons added later.
        _ => "stop",
    }
}

/// The msg id stays visible in ours so a completion can be found in Anthropic's logs.
fn completion_id(message_id: &str) -> String {
    format!("chatcmpl-{message_id}")
}

pub(crate) fn chat_response(message: Message, created: u64) -> ChatResponse {
    let mut text: Option<String> = None;
    let mut tool_calls = Vec::new();
    for block in message.content {
        match block {
            Block::Text { text: t } => text.get_or_insert_with(String::new).push_str(&t),
            Block::ToolUse { id, name, input } => tool_calls.push(json!({
                "id": id,
                "type": "function",
                "function": {"name": name, "arguments": input.to_string()},
            })),
            Block::Other => {}
        }
    }
    // No text and no tool calls (e.g. max_tokens hit at once) is still an empty answer.
    if text.is_none() && tool_calls.is_empty() {
        text = Some(String::new());
    }
    let usage = Usage::new(
        message.usage.prompt_tokens(),
        message.usage.output_tokens.unwrap_or(0),
    )
    .with_cached(message.usage.cache_read_input_tokens.unwrap_or(0));
    ChatResponse {
        id: completion_id(&message.id),
        object: "chat.completion".into(),
        created,
        model: message.model,
        choices: vec![Choice {
            index: 0,
            message: ChatMessage {
                role: "assistant".into(),
                content: text.map(Content::Text),
                name: None,
                tool_calls: (!tool_calls.is_empty()).then_some(tool_calls),
                tool_call_id: None,
                extra: Map::new(),
            },
            finish_reason: message
                .stop_reason
                .as_deref()
                .map(finish_reason)
                .map(str::to_string),
            extra: Map::new(),
        }],
        usage: Some(usage),
        extra: Map::new(),
        raw: None,
    }
}

// ---- stream: Anthropic events -> OpenAI chunks ---------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event {
    MessageStart {
        message: StartMessage,
    },
    ContentBlockStart {
        index: u64,
        content_block: Block,
    },
    ContentBlockDelta {
        index: u64,
        delta: Delta,
    },
    MessageDelta {
        #[serde(default)]
        delta: MessageDeltaBody,
        #[serde(default)]
        usage: AnthropicUsage,
    },
    MessageStop,
    Error {
        error: ErrorDetail,
    },
    /// `ping`, `content_block_stop`, and event types Anthropic may add (it asks clients
    /// to ignore those).
    #[serde(other)]
    Other,
}

#[derive(Debug, Deserialize)]
struct StartMessage {
    id: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    usage: AnthropicUsage,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Delta {
    #[serde(rename = "text_delta")]
    Text { text: String },
    #[serde(rename = "input_json_delta")]
    InputJson { partial_json: String },
    /// Thinking and signature deltas have no OpenAI counterpart.
    #[serde(other)]
    Other,
}

#[derive(Debug, Default, Deserialize)]
struct MessageDeltaBody {
    #[serde(default)]
    stop_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ErrorDetail {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// What one event turns into.
enum Step {
    Skip,
    Chunk(Value),
    /// The last chunk; the stream ends cleanly after it.
    Last(Value),
    Fail(UpstreamError),
}

/// What the translation remembers across events: the ids every chunk repeats, the usage
/// so far, and which Anthropic content blocks are tool calls.
#[derive(Default)]
struct Translator {
    id: String,
    model: String,
    created: u64,
    prompt_tokens: u32,
    /// Of the prompt tokens, those read from Anthropic's prompt cache.
    cached_tokens: u32,
    completion_tokens: u32,
    /// Anthropic block index -> OpenAI tool call index (tool calls count from 0, blocks
    /// count text blocks too).
    tool_calls: HashMap<u64, u32>,
}

impl Translator {
    fn chunk(&self, delta: Value, finish_reason: Option<&str>) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        })
    }

    fn usage_chunk(&self) -> Value {
        let usage =
            Usage::new(self.prompt_tokens, self.completion_tokens).with_cached(self.cached_tokens);
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage,
        })
    }

    fn on_event(&mut self, sse: sse_stream::Sse) -> Step {
        let Some(data) = sse.data else {
            return Step::Skip;
        };
        let event = match serde_json::from_str::<Event>(&data) {
            Ok(event) => event,
            Err(_) if sse.event.as_deref() == Some("error") => {
                return Step::Fail(UpstreamError::new(ErrorClass::Server, KIND, data));
            }
            Err(e) => return Step::Fail(invalid_response(KIND, "stream event", e)),
        };
        match event {
            Event::MessageStart { message } => {
                self.id = completion_id(&message.id);
                self.model = message.model;
                self.created = unix_now();
                self.prompt_tokens = message.usage.prompt_tokens();
                self.cached_tokens = message.usage.cache_read_input_tokens.unwrap_or(0);
                self.completion_tokens = message.usage.output_tokens.unwrap_or(0);
                Step::Chunk(self.chunk(json!({"role": "assistant", "content": ""}), None))
            }
            Event::ContentBlockStart {
                index,
                content_block,
            } => match content_block {
                Block::Text { text } if !text.is_empty() => {
                    Step::Chunk(self.chunk(json!({"content": text}), None))
                }
                Block::ToolUse { id, name, .. } => {
                    let n = u32::try_from(self.tool_calls.len()).unwrap_or(u32::MAX);
                    self.tool_calls.insert(index, n);
                    Step::Chunk(self.chunk(
                        json!({"tool_calls": [{
                            "index": n,
                            "id": id,
                            "type": "function",
                            "function": {"name": name, "arguments": ""},
                        }]}),
                        None,
                    ))
                }
                Block::Text { .. } | Block::Other => Step::Skip,
            },
            Event::ContentBlockDelta { index, delta } => match delta {
                Delta::Text { text } => Step::Chunk(self.chunk(json!({"content": text}), None)),
                // Server tool blocks stream input too; only client tool calls are ours.
                Delta::InputJson { partial_json } if !partial_json.is_empty() => {
                    match self.tool_calls.get(&index) {
                        Some(&n) => Step::Chunk(self.chunk(
                            json!({"tool_calls": [{"index": n, "function": {"arguments": partial_json}}]}),
                            None,
                        )),
                        None => Step::Skip,
                    }
                }
                Delta::InputJson { .. } | Delta::Other => Step::Skip,
            },
            Event::MessageDelta { delta, usage } => {
                // message_delta usage is cumulative; newer API versions repeat the input
                // counts there too.
                if let Some(output) = usage.output_tokens {
                    self.completion_tokens = output;
                }
                if usage.input_tokens.is_some() {
                    self.prompt_tokens = usage.prompt_tokens();
                    self.cached_tokens = usage.cache_read_input_tokens.unwrap_or(0);
                }
                match delta.stop_reason {
                    Some(reason) => {
                        Step::Chunk(self.chunk(json!({}), Some(finish_reason(&reason))))
                    }
                    None => Step::Skip,
                }
            }
            Event::MessageStop => Step::Last(self.usage_chunk()),
            Event::Error { error } => {
                let class = error
                    .kind
                    .as_deref()
                    .and_then(class_of_error_type)
                    .unwrap_or(ErrorClass::Server);
                let mut e = UpstreamError::new(
                    class,
                    KIND,
                    error.message.unwrap_or_else(|| "stream error".into()),
                );
                e.code = error.kind;
                Step::Fail(e)
            }
            Event::Other => Step::Skip,
        }
    }
}

/// Turn Anthropic SSE events into OpenAI chunks. `message_stop` ends the stream cleanly
/// after a usage-only chunk (always sent; the pipeline strips it when the client did not
/// ask); an `error` event, an unreadable event or a body that ends before `message_stop`
/// ends it with an error.
pub(crate) fn anthropic_chunks<S>(events: S) -> ChunkStream
where
    S: futures::Stream<Item = Result<sse_stream::Sse, UpstreamError>> + Send + 'static,
{
    let state = (Box::pin(events), Translator::default(), false);
    let stream = futures::stream::unfold(state, |(mut events, mut translator, done)| async move {
        if done {
            return None;
        }
        loop {
            let step = match events.next().await {
                None => Step::Fail(UpstreamError::new(
                    ErrorClass::Connection,
                    KIND,
                    "stream ended before message_stop",
                )),
                Some(Err(e)) => Step::Fail(e),
                Some(Ok(sse)) => translator.on_event(sse),
            };
            return match step {
                Step::Skip => continue,
                Step::Chunk(v) => {
                    Some((Ok(StreamChunk::from_value(&v)), (events, translator, false)))
                }
                Step::Last(v) => {
                    Some((Ok(StreamChunk::from_value(&v)), (events, translator, true)))
                }
                Step::Fail(e) => Some((Err(e), (events, translator, true))),
            };
        }
    });
    Box::pin(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use sse_stream::SseByteStream;

    fn request(body: Value) -> ChatRequest {
        serde_json::from_value(body).unwrap()
    }

    fn body(req: Value) -> Value {
        messages_body(&request(req), "claude-sonnet-4-5", false).unwrap()
    }

    #[test]
    fn system_messages_are_lifted_and_runs_of_a_role_merge() {
        let out = body(json!({
            "model": "alias",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "developer", "content": [{"type": "text", "text": "Use French."}]},
                {"role": "user", "content": [{"type": "text", "text": "Again"}]},
                {"role": "assistant", "content": "Salut"},
                {"role": "assistant", "content": "!"},
            ],
        }));
        assert_eq!(out["system"], "Be brief.\n\nUse French.");
        assert_eq!(out["model"], "claude-sonnet-4-5");
        assert_eq!(
            out["messages"],
            json!([
                {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "Again"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Salut"}, {"type": "text", "text": "!"}]},
            ])
        );
        assert!(out.get("stream").is_none());
    }

    #[test]
    fn max_tokens_defaults_and_sampling_is_translated() {
        let out = body(json!({"model": "m", "messages": [{"role": "user", "content": "x"}]}));
        assert_eq!(out["max_tokens"], DEFAULT_MAX_TOKENS);
        assert!(out.get("temperature").is_none());
        assert!(out.get("system").is_none());

        let out = body(json!({
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 100,
            "max_completion_tokens": 50,
            "temperature": 1.7,
            "top_p": 0.9,
            "stop": "END",
            "user": "u-42",
            "seed": 7,
            "logit_bias": {"1": 2},
            "response_format": {"type": "json_object"},
            "top_k": 5,
        }));
        assert_eq!(out["max_tokens"], 50);
        assert_eq!(out["temperature"], 1.0);
        assert_eq!(out["top_p"], 0.9);
        assert_eq!(out["stop_sequences"], json!(["END"]));
        assert_eq!(out["metadata"], json!({"user_id": "u-42"}));
        assert_eq!(out["top_k"], 5);
        for dropped in [
            "seed",
            "logit_bias",
            "response_format",
            "user",
            "stop",
            "max_completion_tokens",
        ] {
            assert!(
                out.get(dropped).is_none(),
                "{dropped} must not be forwarded"
            );
        }

        let out = body(json!({
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "temperature": 0.3,
            "stop": ["a", "b"],
            "metadata": {"user_id": "from-metadata"},
            "user": "ignored-when-metadata-has-one",
        }));
        assert_eq!(out["temperature"], 0.3);
        assert_eq!(out["stop_sequences"], json!(["a", "b"]));
        assert_eq!(out["metadata"], json!({"user_id": "from-metadata"}));

        let streamed = messages_body(
            &request(json!({"model": "m", "messages": [{"role": "user", "content": "x"}]})),
            "m",
            true,
        )
        .unwrap();
        assert_eq!(streamed["stream"], true);
    }

    #[test]
    fn tools_tool_calls_and_tool_results_are_translated() {
        let out = body(json!({
            "model": "m",
            "messages": [
                {"role": "user", "content": "Weather in SF and NYC?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"SF\"}"}},
                    {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"NYC\"}"}},
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "15C"},
                {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "20C"}]},
                {"role": "user", "content": "Thanks"},
            ],
            "tools": [
                {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                  "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
                {"type": "function", "function": {"name": "now"}},
            ],
            "tool_choice": "required",
        }));
        assert_eq!(
            out["messages"][1],
            json!({"role": "assistant", "content": [
                {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "SF"}},
                {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"city": "NYC"}},
            ]})
        );
        assert_eq!(
            out["messages"][2],
            json!({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "15C"},
                {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "20C"}]},
                {"type": "text", "text": "Thanks"},
            ]})
        );
        assert_eq!(out["messages"].as_array().unwrap().len(), 3);
        assert_eq!(
            out["tools"],
            json!([
                {"name": "get_weather", "description": "Weather for a city",
                 "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
                {"name": "now", "input_schema": {"type": "object", "properties": {}}},
            ])
        );
        assert_eq!(out["tool_choice"], json!({"type": "any"}));
    }

    #[test]
    fn tool_choice_forms_are_translated() {
        let choice = |c: Value| tool_choice(&c).unwrap();
        assert_eq!(choice(json!("auto")), json!({"type": "auto"}));
        assert_eq!(choice(json!("none")), json!({"type": "none"}));
        assert_eq!(choice(json!("required")), json!({"type": "any"}));
        assert_eq!(
            choice(json!({"type": "function", "function": {"name": "get_weather"}})),
            json!({"type": "tool", "name": "get_weather"})
        );
        assert!(tool_choice(&json!("sometimes")).is_err());

        let out = body(json!({
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "parallel_tool_calls": false,
        }));
        assert_eq!(
            out["tool_choice"],
            json!({"type": "auto", "disable_parallel_tool_use": true})
        );
        assert!(out.get("parallel_tool_calls").is_none());
    }

    #[test]
    fn images_become_base64_or_url_sources() {
        let out = body(json!({
            "model": "m",
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "high"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
            ]}],
        }));
        assert_eq!(
            out["messages"][0]["content"],
            json!([
                {"type": "text", "text": "What is this?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
            ])
        );
    }

    #[test]
    fn untranslatable_requests_are_bad_requests() {
        let bad = |req: Value| messages_body(&request(req), "m", false).unwrap_err();
        let user = |content: Value| json!({"model": "m", "messages": [{"role": "user", "content": content}]});
        for e in [
            bad(user(
                json!([{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]),
            )),
            bad(user(
                json!([{"type": "image_url", "image_url": {"url": "data:image/png,raw"}}]),
            )),
            bad(user(
                json!([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]),
            )),
            bad(json!({"model": "m", "n": 2, "messages": [{"role": "user", "content": "x"}]})),
            bad(json!({"model": "m", "messages": [{"role": "tool", "content": "no id"}]})),
            bad(
                json!({"model": "m", "messages": [{"role": "assistant", "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": "not json"}}]}]}),
            ),
            bad(
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
                       "tools": [{"type": "code_interpreter"}]}),
            ),
        ] {
            assert_eq!(e.class, ErrorClass::BadRequest, "{e}");
            assert!(!e.is_retryable());
        }
    }

    fn fixture_message(json: &str) -> Message {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn text_message_becomes_a_completion() {
        let r = chat_response(
            fixture_message(include_str!("../../tests/fixtures/anthropic/message.json")),
            1_700_000_000,
        );
        assert_eq!(r.id, "chatcmpl-msg_01XFDUDYJgAACzvnptvVoYEL");
        assert_eq!(r.object, "chat.completion");
        assert_eq!(r.created, 1_700_000_000);
        assert_eq!(r.model, "claude-sonnet-4-5-20250929");
        assert_eq!(r.choices.len(), 1);
        let c = &r.choices[0];
        assert_eq!(c.message.role, "assistant");
        assert_eq!(
            c.message.content,
            Some(Content::Text("Hello! How can I help?".into()))
        );
        assert!(c.message.tool_calls.is_none());
        assert_eq!(c.finish_reason.as_deref(), Some("stop"));
        // 12 uncached + 100 written to the cache + 50 read from it (the cached part,
        // billed at the cached-input price).
        assert_eq!(r.usage, Some(Usage::new(162, 6).with_cached(50)));
    }

    #[test]
    fn tool_use_message_becomes_tool_calls() {
        let r = chat_response(
            fixture_message(include_str!(
                "../../tests/fixtures/anthropic/message_tool_use.json"
            )),
            1,
        );
        let c = &r.choices[0];
        assert_eq!(
            c.message.content,
            Some(Content::Text(
                "I'll check the current weather in San Francisco for you.".into()
            ))
        );
        let calls = c.message.tool_calls.as_ref().unwrap();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0]["id"], "toolu_01A09q90qw90lq917835lq9");
        assert_eq!(calls[0]["type"], "function");
        assert_eq!(calls[0]["function"]["name"], "get_weather");
        let args: Value =
            serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(
            args,
            json!({"location": "San Francisco, CA", "unit": "celsius"})
        );
        assert_eq!(c.finish_reason.as_deref(), Some("tool_calls"));
        assert_eq!(r.usage, Some(Usage::new(384, 92)));

        let mut only_tools: Value = serde_json::from_str(include_str!(
            "../../tests/fixtures/anthropic/message_tool_use.json"
        ))
        .unwrap();
        only_tools["content"].as_array_mut().unwrap().remove(0);
        let r = chat_response(serde_json::from_value(only_tools).unwrap(), 1);
        assert_eq!(r.choices[0].message.content, None);
        assert_eq!(r.choices[0].message.tool_calls.as_ref().unwrap().len(), 1);
    }

    #[test]
    fn stop_reasons_map_to_finish_reasons() {
        for (stop, finish) in [
            ("end_turn", "stop"),
            ("stop_sequence", "stop"),
            ("max_tokens", "length"),
            ("tool_use", "tool_calls"),
            ("refusal", "content_filter"),
        ] {
            let m = fixture_message(
                &json!({"id": "msg_1", "model": "c", "content": [], "stop_reason": stop,
                        "usage": {"input_tokens": 1, "output_tokens": 0}})
                .to_string(),
            );
            let r = chat_response(m, 0);
            assert_eq!(
                r.choices[0].finish_reason.as_deref(),
                Some(finish),
                "{stop}"
            );
            assert_eq!(
                r.choices[0].message.content,
                Some(Content::Text(String::new()))
            );
        }
    }

    /// Feed SSE text through the real SSE decoder, in uneven pieces as a socket would.
    async fn translate(sse: &str) -> Vec<Result<StreamChunk, UpstreamError>> {
        let pieces: Vec<Result<Bytes, std::io::Error>> = sse
            .as_bytes()
            .chunks(37)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let events = SseByteStream::new(futures::stream::iter(pieces)).map(|r| {
            r.map_err(|e| UpstreamError::new(ErrorClass::Connection, KIND, e.to_string()))
        });
        anthropic_chunks(events).collect().await
    }

    fn values(out: &[Result<StreamChunk, UpstreamError>]) -> Vec<Value> {
        out.iter()
            .filter_map(|c| c.as_ref().ok())
            .map(|c| serde_json::from_str(&c.data).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn text_stream_becomes_openai_chunks() {
        let out = translate(include_str!(
            "../../tests/fixtures/anthropic/stream_text.sse"
        ))
        .await;
        assert!(out.iter().all(Result::is_ok), "{out:?}");
        let chunks = values(&out);
        let deltas: Vec<&Value> = chunks
            .iter()
            .filter_map(|c| c["choices"].get(0))
            .map(|c| &c["delta"])
            .collect();
        assert_eq!(
            deltas,
            [
                &json!({"role": "assistant", "content": ""}),
                &json!({"content": "Hello"}),
                &json!({"content": "!"}),
                &json!({}),
            ]
        );
        let finish: Vec<&Value> = chunks
            .iter()
            .filter_map(|c| c["choices"].get(0))
            .map(|c| &c["finish_reason"])
            .collect();
        assert_eq!(
            finish,
            [&Value::Null, &Value::Null, &Value::Null, &json!("stop")]
        );
        for c in &chunks {
            assert_eq!(c["id"], "chatcmpl-msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY");
            assert_eq!(c["object"], "chat.completion.chunk");
            assert_eq!(c["model"], "claude-sonnet-4-5-20250929");
            assert_eq!(c["created"], chunks[0]["created"]);
        }
        assert_eq!(chunks.len(), 5);
        let last = out.last().unwrap().as_ref().unwrap();
        assert!(last.usage_only);
        // 25 uncached + 5 read from the cache; output from message_delta, not message_start.
        assert_eq!(last.usage, Some(Usage::new(30, 15).with_cached(5)));
        assert_eq!(chunks[4]["choices"], json!([]));
        assert_eq!(
            chunks[4]["usage"]["prompt_tokens_details"]["cached_tokens"],
            5
        );
    }

    #[tokio::test]
    async fn tool_use_stream_becomes_indexed_tool_call_deltas() {
        let out = translate(include_str!(
            "../../tests/fixtures/anthropic/stream_tool_use.sse"
        ))
        .await;
        assert!(out.iter().all(Result::is_ok), "{out:?}");
        let chunks = values(&out);
        let deltas: Vec<&Value> = chunks
            .iter()
            .filter_map(|c| c["choices"].get(0))
            .map(|c| &c["delta"])
            .collect();
        assert_eq!(
            deltas,
            [
                &json!({"role": "assistant", "content": ""}),
                &json!({"content": "Okay, let's check the weather."}),
                &json!({"tool_calls": [{"index": 0, "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "type": "function",
                                        "function": {"name": "get_weather", "arguments": ""}}]}),
                &json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"location\":"}}]}),
                &json!({"tool_calls": [{"index": 0, "function": {"arguments": " \"San Francisco, CA\"}"}}]}),
                &json!({"tool_calls": [{"index": 1, "id": "toolu_02Yq3mPg7vKcN8bWdXzL5Ua1", "type": "function",
                                        "function": {"name": "get_time", "arguments": ""}}]}),
                &json!({"tool_calls": [{"index": 1, "function": {"arguments": "{\"tz\": \"America/Los_Angeles\"}"}}]}),
                &json!({}),
            ]
        );
        assert_eq!(chunks[7]["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(
            out.last().unwrap().as_ref().unwrap().usage,
            Some(Usage::new(472, 89))
        );
    }

    #[tokio::test]
    async fn error_event_ends_the_stream_with_its_class() {
        let out = translate(include_str!(
            "../../tests/fixtures/anthropic/stream_error.sse"
        ))
        .await;
        assert_eq!(out.len(), 3, "{out:?}");
        assert!(out[0].is_ok() && out[1].is_ok());
        let e = out[2].as_ref().unwrap_err();
        assert_eq!(e.class, ErrorClass::Overloaded);
        assert_eq!(e.code.as_deref(), Some("overloaded_error"));
        assert_eq!(e.message, "Overloaded");

        for (kind, class) in [
            ("rate_limit_error", ErrorClass::RateLimited),
            ("api_error", ErrorClass::Server),
            ("invalid_request_error", ErrorClass::BadRequest),
            ("something_new", ErrorClass::Server),
        ] {
            let sse = format!(
                "event: error\ndata: {}\n\n",
                json!({"type": "error", "error": {"type": kind, "message": "m"}})
            );
            let out = translate(&sse).await;
            assert_eq!(out.len(), 1);
            assert_eq!(out[0].as_ref().unwrap_err().class, class, "{kind}");
        }
    }

    #[tokio::test]
    async fn stream_without_message_stop_is_a_connection_error() {
        let full = include_str!("../../tests/fixtures/anthropic/stream_text.sse");
        let cut = &full[..full.find("event: message_stop").unwrap()];
        let out = translate(cut).await;
        let (last, rest) = out.split_last().unwrap();
        assert_eq!(rest.len(), 4);
        assert!(rest.iter().all(Result::is_ok));
        assert!(rest.iter().all(|c| !c.as_ref().unwrap().usage_only));
        let e = last.as_ref().unwrap_err();
        assert_eq!(e.class, ErrorClass::Connection);
        assert_eq!(e.message, "stream ended before message_stop");

        let garbage = translate("event: content_block_delta\ndata: {not json\n\n").await;
        assert_eq!(garbage.len(), 1);
        assert_eq!(
            garbage[0].as_ref().unwrap_err().class,
            ErrorClass::InvalidResponse
        );
    }

    /// What `http::send` does with an error answer, minus the socket.
    fn classify(status: u16, body: &Value) -> UpstreamError {
        let b = parse_error(body);
        reclassify(UpstreamError::from_status(
            KIND,
            status,
            b.message,
            b.code,
            b.kind.as_deref(),
            None,
        ))
    }

    #[test]
    fn error_bodies_are_classified_by_type() {
        let overloaded: Value = serde_json::from_str(include_str!(
            "../../tests/fixtures/anthropic/error_overloaded.json"
        ))
        .unwrap();
        let e = classify(529, &overloaded);
        assert_eq!(e.class, ErrorClass::Overloaded);
        assert_eq!(e.message, "Overloaded");
        assert_eq!(e.code.as_deref(), Some("overloaded_error"));
        assert_eq!(e.status, Some(529));
        assert!(e.is_retryable());

        let err = |kind: &str| json!({"type": "error", "error": {"type": kind, "message": "m"}});
        for (status, kind, class) in [
            (400, "invalid_request_error", ErrorClass::BadRequest),
            (401, "authentication_error", ErrorClass::Auth),
            (403, "permission_error", ErrorClass::Auth),
            (404, "not_found_error", ErrorClass::NotFound),
            (413, "request_too_large", ErrorClass::BadRequest),
            (429, "rate_limit_error", ErrorClass::RateLimited),
            (500, "api_error", ErrorClass::Server),
            // A proxy that rewrote the status does not hide what Anthropic said.
            (500, "overloaded_error", ErrorClass::Overloaded),
            (502, "rate_limit_error", ErrorClass::RateLimited),
        ] {
            assert_eq!(classify(status, &err(kind)).class, class, "{status} {kind}");
        }
        let unknown = classify(503, &json!({"unexpected": true}));
        assert_eq!(unknown.class, ErrorClass::Overloaded);
        assert_eq!(unknown.message, "upstream error");
    }
}
