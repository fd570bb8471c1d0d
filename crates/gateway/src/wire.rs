//! OpenAI wire types the gateway owns: typed where the gateway reads a field, a flattened
//! map for everything else so fields we do not know pass through to upstreams untouched.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

/// `Deserialize` for a wire struct whose fields the gateway does not know go to its
/// `extra` map. serde's `#[serde(flatten)]` does the same by first buffering each
/// unknown field as serde's private `Content` tree and converting it again (and reads
/// the struct as a map either way): parsing a typical upstream answer took 13.0k
/// instructions with it and 9.1k without (bench/RESULTS.md, Run 36). Serialization
/// keeps `#[serde(flatten)]`, which costs nothing extra there.
///
/// `fields` default when absent (`= default`); `required` are an error when absent,
/// as serde's own "missing field"; `skipped` are never read (`= value`). A field named
/// twice is an error, as with serde's derive.
macro_rules! deserialize_with_extra {
    (
        $ty:ident,
        fields { $($key:literal => $field:ident = $default:expr),* $(,)? }
        required { $($rkey:literal => $rfield:ident),* $(,)? }
        skipped { $($sfield:ident = $svalue:expr),* $(,)? }
    ) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str(concat!("struct ", stringify!($ty)))
                    }
                    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<$ty, A::Error> {
                        $(let mut $field = None;)*
                        $(let mut $rfield = None;)*
                        let mut extra = Map::new();
                        while let Some(FieldName(key)) = map.next_key()? {
                            match key.as_ref() {
                                $($key => {
                                    if $field.is_some() {
                                        return Err(de::Error::duplicate_field($key));
                                    }
                                    $field = Some(map.next_value()?);
                                })*
                                $($rkey => {
                                    if $rfield.is_some() {
                                        return Err(de::Error::duplicate_field($rkey));
                                    }
                                    $rfield = Some(map.next_value()?);
                                })*
                                _ => {
                                    let value = map.next_value()?;
                                    extra.insert(key.into_owned(), value);
                                }
                            }
                        }
                        Ok($ty {
                            $($field: match $field { Some(v) => v, None => $default },)*
                            $($rfield: $rfield.ok_or_else(|| de::Error::missing_field($rkey))?,)*
                            $($sfield: $svalue,)*
                            extra,
                        })
                    }
                }
                deserializer.deserialize_map(V)
            }
        }
    };
}

/// An object key, borrowed from the input when it has no escapes (serde's own
/// `Cow<str>` always copies).
struct FieldName<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for FieldName<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FieldName<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(FieldName(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(FieldName(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(FieldName(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(V)
    }
}

/// `POST /v1/chat/completions` body.
///
/// `model`, `stream`, `stream_options` and `sluice` are never serialized from here: the
/// provider writes the upstream model and stream settings itself ([`UpstreamChat`]) and the
/// `sluice` extras are for the gateway only.
#[derive(Debug, Clone, Serialize)]
pub struct ChatRequest {
    /// May be absent when the request names a prompt (its model answers); without a
    /// prompt, `parse_chat` refuses it empty with a 400 naming `model`.
    #[serde(skip_serializing)]
    pub model: String,
    /// May be absent when the request names a prompt (the prompt renders the messages).
    pub messages: Vec<ChatMessage>,
    #[serde(skip_serializing)]
    pub stream: Option<bool>,
    #[serde(skip_serializing)]
    pub stream_options: Option<StreamOptions>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<Value>,
    #[serde(skip_serializing)]
    pub sluice: Option<SluiceExtras>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

deserialize_with_extra!(ChatRequest,
    fields {
        "model" => model = String::new(),
        "messages" => messages = Vec::new(),
        "stream" => stream = None,
        "stream_options" => stream_options = None,
        "max_tokens" => max_tokens = None,
        "max_completion_tokens" => max_completion_tokens = None,
        "temperature" => temperature = None,
        "top_p" => top_p = None,
        "n" => n = None,
        "stop" => stop = None,
        "user" => user = None,
        "tools" => tools = None,
        "tool_choice" => tool_choice = None,
        "sluice" => sluice = None,
    }
    required {}
    skipped {}
);

impl ChatRequest {
    pub fn is_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    /// Whether the client asked for the trailing usage chunk on a stream.
    pub fn wants_stream_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }

    /// The cap on generated tokens, whichever of the two OpenAI spellings was used.
    pub fn max_output_tokens(&self) -> Option<u32> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    /// Text of the last user message, for template fallbacks and logs.
    pub fn last_user_text(&self) -> String {
        self.messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(ChatMessage::text)
            .unwrap_or_default()
    }
}

/// What the gateway sends to an OpenAI-compatible upstream: the client's request with the
/// upstream model name and the stream settings the gateway chose.
#[derive(Serialize)]
pub struct UpstreamChat<'a> {
    pub model: &'a str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    #[serde(flatten)]
    pub request: &'a ChatRequest,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct StreamOptions {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub include_usage: Option<bool>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

deserialize_with_extra!(StreamOptions,
    fields { "include_usage" => include_usage = None }
    required {}
    skipped {}
);

#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl<'de> Deserialize<'de> for Stop {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        string_or_seq(
            deserializer,
            "a string or an array of strings",
            Stop::One,
            Stop::Many,
        )
    }
}

/// A value that is a string (`one`) or an array (`many`), read in one pass: serde's
/// `untagged` buffers the value (a copy of a message's whole text) and tries each
/// variant in turn.
fn string_or_seq<'de, D, T, E>(
    deserializer: D,
    expecting: &'static str,
    one: fn(String) -> T,
    many: fn(Vec<E>) -> T,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    E: Deserialize<'de>,
{
    struct V<T, E> {
        expecting: &'static str,
        one: fn(String) -> T,
        many: fn(Vec<E>) -> T,
    }
    impl<'de, T, E: Deserialize<'de>> Visitor<'de> for V<T, E> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(self.expecting)
        }
        fn visit_str<Er: de::Error>(self, v: &str) -> Result<T, Er> {
            Ok((self.one)(v.to_owned()))
        }
        fn visit_string<Er: de::Error>(self, v: String) -> Result<T, Er> {
            Ok((self.one)(v))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<T, A::Error> {
            Vec::deserialize(de::value::SeqAccessDeserializer::new(seq)).map(self.many)
        }
    }
    deserializer.deserialize_any(V {
        expecting,
        one,
        many,
    })
}

impl Stop {
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s.clone()],
            Stop::Many(v) => v.clone(),
        }
    }
}

/// Gateway-only request extras, sent by SDKs as `extra_body={"sluice": {...}}`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SluiceExtras {
    #[serde(default)]
    pub feature: Option<String>,
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub variables: Map<String, Value>,
    #[serde(default)]
    pub cache: Option<String>,
    #[serde(default)]
    pub experiment: Option<String>,
    /// `high` asks routing for its strong path, as `x-sluice-quality` does.
    #[serde(default)]
    pub quality: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<Content>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

deserialize_with_extra!(ChatMessage,
    fields {
        "content" => content = None,
        "name" => name = None,
        "tool_calls" => tool_calls = None,
        "tool_call_id" => tool_call_id = None,
    }
    required { "role" => role }
    skipped {}
);

impl ChatMessage {
    pub fn assistant(text: impl Into<String>) -> Self {
        Self {
            role: "assistant".into(),
            content: Some(Content::Text(text.into())),
            name: None,
            tool_calls: None,
            tool_call_id: None,
            extra: Map::new(),
        }
    }

    /// The message's text: the string content, or its text parts joined.
    pub fn text(&self) -> String {
        match &self.content {
            None => String::new(),
            Some(Content::Text(s)) => s.clone(),
            // Only `text` parts: the same parts the input guard sanitizes and scans.
            Some(Content::Parts(parts)) => parts
                .iter()
                .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Value>),
}

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        string_or_seq(
            deserializer,
            "a string or an array of content parts",
            Content::Text,
            Content::Parts,
        )
    }
}

/// Non-streamed chat completion.
#[derive(Debug, Clone, Serialize)]
pub struct ChatResponse {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<Choice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
    /// The upstream's JSON body this was parsed from, kept by providers whose answer
    /// needs no translation: a client is sent these bytes as they came, not the answer
    /// serialized again. Whatever changes a response it did not build clears this
    /// (the cache does: a hit carries a new id).
    #[serde(skip)]
    pub raw: Option<bytes::Bytes>,
}

deserialize_with_extra!(ChatResponse,
    fields {
        "object" => object = "chat.completion".into(),
        "created" => created = 0,
        "model" => model = String::new(),
        "usage" => usage = None,
    }
    required { "id" => id, "choices" => choices }
    skipped { raw = None }
);

#[derive(Debug, Clone, Serialize)]
pub struct Choice {
    pub index: u32,
    pub message: ChatMessage,
    pub finish_reason: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

deserialize_with_extra!(Choice,
    fields {
        "index" => index = 0,
        "finish_reason" => finish_reason = None,
    }
    required { "message" => message }
    skipped {}
);

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u32,
    #[serde(default)]
    pub completion_tokens: u32,
    #[serde(default)]
    pub total_tokens: u32,
    /// How much of the prompt was served from the provider's prompt cache (billed at
    /// the cached-input price).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

/// OpenAI's `usage.prompt_tokens_details`; only the cached count matters for cost.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct PromptTokensDetails {
    #[serde(default)]
    pub cached_tokens: u32,
}

impl Usage {
    pub fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: None,
        }
    }

    /// With `cached` of the prompt tokens read from the provider's cache.
    pub fn with_cached(mut self, cached: u32) -> Self {
        self.prompt_tokens_details = (cached > 0).then_some(PromptTokensDetails {
            cached_tokens: cached,
        });
        self
    }

    pub fn cached_tokens(&self) -> u32 {
        self.prompt_tokens_details
            .map(|d| d.cached_tokens)
            .unwrap_or(0)
    }
}

/// One streamed chunk: the `data:` payload exactly as it will be sent to the client, plus
/// what the gateway read from it for accounting.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamChunk {
    pub data: String,
    /// Present on the usage chunk (and on any chunk that carries usage).
    pub usage: Option<Usage>,
    /// A chunk with no choices that only carries usage (`stream_options.include_usage`).
    pub usage_only: bool,
}

/// The fields of a chunk the gateway looks at, read without touching the rest.
#[derive(Deserialize)]
struct ChunkPeek {
    #[serde(default)]
    choices: Vec<serde::de::IgnoredAny>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<serde::de::IgnoredAny>,
}

/// Reading a chunk's `data:` payload; `Err` carries an in-band error event.
pub enum PeekedChunk {
    Chunk(StreamChunk),
    Error(String),
}

impl StreamChunk {
    /// Read an upstream `data:` payload (not `[DONE]`) into a chunk.
    pub fn peek(data: String) -> Result<PeekedChunk, serde_json::Error> {
        let peek: ChunkPeek = serde_json::from_str(&data)?;
        if peek.error.is_some() {
            return Ok(PeekedChunk::Error(data));
        }
        Ok(PeekedChunk::Chunk(StreamChunk {
            usage_only: peek.choices.is_empty() && peek.usage.is_some(),
            usage: peek.usage,
            data,
        }))
    }

    /// Build a chunk from a typed value (translated and synthesized streams).
    pub fn from_value(value: &Value) -> Self {
        let usage = value
            .get("usage")
            .and_then(|u| serde_json::from_value::<Usage>(u.clone()).ok());
        let usage_only = value
            .get("choices")
            .and_then(Value::as_array)
            .is_some_and(Vec::is_empty)
            && usage.is_some();
        StreamChunk {
            data: value.to_string(),
            usage,
            usage_only,
        }
    }
}

/// `POST /v1/embeddings` body.
#[derive(Debug, Clone, Serialize)]
pub struct EmbeddingsRequest {
    #[serde(skip_serializing)]
    pub model: String,
    pub input: EmbeddingInput,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing)]
    pub sluice: Option<SluiceExtras>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

deserialize_with_extra!(EmbeddingsRequest,
    fields {
        "user" => user = None,
        "sluice" => sluice = None,
    }
    required { "model" => model, "input" => input }
    skipped {}
);

/// What the gateway sends upstream for embeddings.
#[derive(Serialize)]
pub struct UpstreamEmbeddings<'a> {
    pub model: &'a str,
    #[serde(flatten)]
    pub request: &'a EmbeddingsRequest,
}

/// Embedding input in every shape OpenAI accepts.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum EmbeddingInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

impl EmbeddingInput {
    pub fn len(&self) -> usize {
        match self {
            EmbeddingInput::Text(_) | EmbeddingInput::Tokens(_) => 1,
            EmbeddingInput::Texts(v) => v.len(),
            EmbeddingInput::TokenLists(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A cheap token estimate for limits: about four characters a token for text,
    /// the exact count for token arrays.
    pub fn estimated_tokens(&self) -> u64 {
        let chars = |t: &String| (t.len() as u64).div_ceil(4);
        match self {
            EmbeddingInput::Text(t) => chars(t),
            EmbeddingInput::Texts(v) => v.iter().map(chars).sum(),
            EmbeddingInput::Tokens(v) => v.len() as u64,
            EmbeddingInput::TokenLists(v) => v.iter().map(|l| l.len() as u64).sum(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct EmbeddingsResponse {
    pub object: String,
    pub data: Vec<Value>,
    pub model: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<EmbeddingsUsage>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

deserialize_with_extra!(EmbeddingsResponse,
    fields {
        "object" => object = "list".into(),
        "model" => model = String::new(),
        "usage" => usage = None,
    }
    required { "data" => data }
    skipped {}
);

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct EmbeddingsUsage {
    #[serde(default)]
    pub prompt_tokens: u32,
    #[serde(default)]
    pub total_tokens: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_fields_pass_through_and_gateway_fields_do_not() {
        let body = json!({
            "model": "alias",
            "messages": [{"role": "user", "content": "hi", "x_custom": 1}],
            "stream": true,
            "logit_bias": {"50256": -100},
            "seed": 7,
            "sluice": {"feature": "search"}
        });
        let req: ChatRequest = serde_json::from_value(body).unwrap();
        assert_eq!(
            req.sluice.as_ref().unwrap().feature.as_deref(),
            Some("search")
        );
        let out = serde_json::to_value(UpstreamChat {
            model: "upstream-model",
            stream: false,
            stream_options: None,
            request: &req,
        })
        .unwrap();
        assert_eq!(out["model"], "upstream-model");
        assert_eq!(out["logit_bias"], json!({"50256": -100}));
        assert_eq!(out["seed"], 7);
        assert_eq!(out["messages"][0]["x_custom"], 1);
        assert!(out.get("sluice").is_none());
        assert!(out.get("stream").is_none());
    }

    #[test]
    fn chunk_peek_reads_usage_and_errors() {
        let c = StreamChunk::peek(
            r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#
                .into(),
        )
        .unwrap();
        match c {
            PeekedChunk::Chunk(c) => {
                assert!(c.usage_only);
                assert_eq!(c.usage, Some(Usage::new(3, 4)));
            }
            PeekedChunk::Error(_) => panic!("not an error"),
        }
        let e = StreamChunk::peek(r#"{"error":{"message":"boom"}}"#.into()).unwrap();
        assert!(matches!(e, PeekedChunk::Error(_)));
    }

    #[test]
    fn wire_structs_keep_unknown_fields_and_refuse_bad_shapes() {
        // An escaped key is the same key; unknown ones land in `extra` as they came.
        let answer: ChatResponse = serde_json::from_str(
            r#"{"id":"c1","choices":[{"message":{"role":"assistant","content":"hi","refusal":null},"logprobs":{"x":1}}],"mod\u0065l":"m","system_fingerprint":"fp","usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#,
        )
        .unwrap();
        assert_eq!(
            (answer.model.as_str(), answer.object.as_str()),
            ("m", "chat.completion")
        );
        assert_eq!(
            answer.extra,
            json!({"system_fingerprint": "fp"})
                .as_object()
                .unwrap()
                .clone()
        );
        assert_eq!(answer.choices[0].extra["logprobs"], json!({"x": 1}));
        assert_eq!(answer.choices[0].message.extra["refusal"], Value::Null);
        assert_eq!(
            answer.choices[0].message.content,
            Some(Content::Text("hi".into()))
        );
        assert_eq!(answer.usage, Some(Usage::new(1, 2)));
        assert!(answer.raw.is_none());

        let error = |body: &str| {
            serde_json::from_str::<ChatRequest>(body)
                .unwrap_err()
                .to_string()
        };
        assert!(error(r#"{"messages":[{"content":"x"}]}"#).contains("missing field `role`"));
        assert!(error(r#"{"model":"a","model":"b"}"#).contains("duplicate field `model`"));
        assert!(
            error(r#"{"messages":[{"role":"user","content":7}]}"#)
                .contains("a string or an array of content parts")
        );
        assert!(error(r#"{"stop":{"a":1}}"#).contains("a string or an array of strings"));
        assert!(error(r#"[1]"#).contains("struct ChatRequest"));
        assert!(
            serde_json::from_str::<ChatResponse>(r#"{"id":"c"}"#)
                .unwrap_err()
                .to_string()
                .contains("missing field `choices`")
        );

        let req: ChatRequest = serde_json::from_str(
            r#"{"messages":[{"role":"user","content":[{"type":"text","text":"a"}]}],"stop":["x","y"],"stream_options":{"include_usage":true,"later":1}}"#,
        )
        .unwrap();
        assert_eq!(req.model, "");
        assert_eq!(
            req.stop.as_ref().map(Stop::to_vec),
            Some(vec!["x".into(), "y".into()])
        );
        assert!(req.wants_stream_usage());
        assert_eq!(req.stream_options.as_ref().unwrap().extra["later"], 1);
        assert_eq!(req.messages[0].text(), "a");
        let one: ChatRequest =
            serde_json::from_str(r#"{"stop":"z","messages":[{"role":"user","content":null}]}"#)
                .unwrap();
        assert_eq!(one.stop.map(|s| s.to_vec()), Some(vec!["z".to_string()]));
        assert_eq!(one.messages[0].content, None);
    }

    #[test]
    fn content_parts_text_is_joined() {
        let m: ChatMessage = serde_json::from_value(json!({
            "role": "user",
            "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": "b"}]
        }))
        .unwrap();
        assert_eq!(m.text(), "a\nb");
    }
}
