//! OpenAI-compatible upstreams (OpenAI, vLLM, Ollama, Groq, `sluice mock`): the request
//! goes out as the client sent it, with the upstream model name; answers and stream
//! chunks come back untouched.

use ::http::header::AUTHORIZATION;
use async_trait::async_trait;
use futures::StreamExt;

use super::http::{
    ErrorBody, Upstream, body_bytes, invalid_response, secret_header, send, sse_events,
    upstream_uri,
};
use super::{ChatCall, ChunkStream, ErrorClass, Provider, Timeouts, UpstreamError};
use crate::config::ProviderConfig;
use crate::limits::capacity::Capacity;
use crate::wire::{
    ChatResponse, EmbeddingsRequest, EmbeddingsResponse, PeekedChunk, StreamChunk, StreamOptions,
    UpstreamChat, UpstreamEmbeddings,
};

const KIND: &str = "openai";

pub struct OpenAiProvider {
    upstream: Upstream,
    chat_url: ::http::Uri,
    embeddings_url: ::http::Uri,
}

impl OpenAiProvider {
    pub fn new(config: &ProviderConfig) -> anyhow::Result<Self> {
        let mut headers = ::http::HeaderMap::new();
        if let Some(v) = secret_header(config, "Bearer ")? {
            headers.insert(AUTHORIZATION, v);
        }
        let chat_url = upstream_uri(&config.base_url, "/chat/completions")?;
        Ok(Self {
            upstream: Upstream::new(config, headers, &chat_url)?,
            embeddings_url: upstream_uri(&config.base_url, "/embeddings")?,
            chat_url,
        })
    }
}

/// OpenAI's `{"error": {...}}`, or the flat `{"message", "type", "code"}` some
/// compatible servers (vLLM) send.
pub(crate) fn parse_error(v: &serde_json::Value) -> ErrorBody {
    let e = v.get("error").filter(|e| e.is_object()).unwrap_or(v);
    let text = |k: &str| match e.get(k) {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    ErrorBody {
        message: text("message")
            .or_else(|| v.get("error").and_then(|x| x.as_str()).map(str::to_string))
            .unwrap_or_else(|| "upstream error".into()),
        code: text("code"),
        kind: text("type"),
        param: text("param"),
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, UpstreamError> {
    serde_json::to_vec(value).map_err(|e| {
        UpstreamError::new(
            ErrorClass::BadRequest,
            KIND,
            format!("cannot encode request: {e}"),
        )
    })
}

#[async_trait]
impl Provider for OpenAiProvider {
    fn kind(&self) -> &'static str {
        KIND
    }

    async fn chat(&self, call: ChatCall<'_>) -> Result<ChatResponse, UpstreamError> {
        let body = to_json(&UpstreamChat {
            model: call.upstream_model,
            stream: false,
            stream_options: None,
            request: call.request,
        })?;
        let response = send(
            KIND,
            &self.upstream,
            (&self.chat_url, body),
            call.timeouts.first_byte,
            parse_error,
            call.capacity,
        )
        .await?;
        let bytes = body_bytes(KIND, response, call.timeouts.total).await?;
        let mut answer: ChatResponse = serde_json::from_slice(&bytes)
            .map_err(|e| invalid_response(KIND, "chat completion", e))?;
        answer.raw = Some(bytes);
        Ok(answer)
    }

    async fn chat_stream(&self, call: ChatCall<'_>) -> Result<ChunkStream, UpstreamError> {
        // Always ask for usage so streamed requests are metered; the pipeline strips the
        // usage chunk again when the client did not ask for it.
        let mut options = call.request.stream_options.clone().unwrap_or_default();
        options.include_usage = Some(true);
        let body = to_json(&UpstreamChat {
            model: call.upstream_model,
            stream: true,
            stream_options: Some(StreamOptions { ..options }),
            request: call.request,
        })?;
        let response = send(
            KIND,
            &self.upstream,
            (&self.chat_url, body),
            call.timeouts.first_byte,
            parse_error,
            call.capacity,
        )
        .await?;
        Ok(openai_chunks(KIND, sse_events(KIND, response)))
    }

    async fn embeddings(
        &self,
        request: &EmbeddingsRequest,
        upstream_model: &str,
        timeouts: Timeouts,
        capacity: Option<&Capacity>,
    ) -> Result<EmbeddingsResponse, UpstreamError> {
        let body = to_json(&UpstreamEmbeddings {
            model: upstream_model,
            request,
        })?;
        let response = send(
            KIND,
            &self.upstream,
            (&self.embeddings_url, body),
            timeouts.first_byte,
            parse_error,
            capacity,
        )
        .await?;
        let bytes = body_bytes(KIND, response, timeouts.total).await?;
        serde_json::from_slice(&bytes).map_err(|e| invalid_response(KIND, "embeddings response", e))
    }
}

/// Turn OpenAI SSE events into chunks: `[DONE]` ends the stream cleanly; an in-band
/// `{"error": ...}` event or a body that ends without `[DONE]` ends it with an error.
pub(crate) fn openai_chunks<S>(provider: &'static str, events: S) -> ChunkStream
where
    S: futures::Stream<Item = Result<sse_stream::Sse, UpstreamError>> + Send + 'static,
{
    let stream = futures::stream::unfold(
        (Box::pin(events), false),
        move |(mut events, done)| async move {
            if done {
                return None;
            }
            loop {
                match events.next().await {
                    None => {
                        let e = UpstreamError::new(
                            ErrorClass::Connection,
                            provider,
                            "stream ended before [DONE]",
                        );
                        return Some((Err(e), (events, true)));
                    }
                    Some(Err(e)) => return Some((Err(e), (events, true))),
                    Some(Ok(sse)) => {
                        let Some(data) = sse.data else { continue };
                        if data.trim() == "[DONE]" {
                            return None;
                        }
                        return match StreamChunk::peek(data) {
                            Ok(PeekedChunk::Chunk(c)) => Some((Ok(c), (events, false))),
                            Ok(PeekedChunk::Error(raw)) => {
                                let body = serde_json::from_str::<serde_json::Value>(&raw)
                                    .map(|v| parse_error(&v))
                                    .unwrap_or_default();
                                let mut e =
                                    UpstreamError::new(ErrorClass::Server, provider, body.message);
                                e.code = body.code;
                                Some((Err(e), (events, true)))
                            }
                            Err(e) => Some((
                                Err(invalid_response(provider, "stream chunk", e)),
                                (events, true),
                            )),
                        };
                    }
                }
            }
        },
    );
    Box::pin(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sse(data: &str) -> Result<sse_stream::Sse, UpstreamError> {
        Ok(sse_stream::Sse::default().data(data))
    }

    #[tokio::test]
    async fn chunks_pass_through_and_done_ends_cleanly() {
        let events = futures::stream::iter(vec![
            sse(r#"{"choices":[{"delta":{"content":"a"}}]}"#),
            sse(
                r#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#,
            ),
            sse("[DONE]"),
            sse(r#"{"never":"read"}"#),
        ]);
        let out: Vec<_> = openai_chunks(KIND, events).collect().await;
        assert_eq!(out.len(), 2);
        let first = out[0].as_ref().unwrap();
        assert_eq!(first.data, r#"{"choices":[{"delta":{"content":"a"}}]}"#);
        assert!(out[1].as_ref().unwrap().usage_only);
    }

    #[tokio::test]
    async fn missing_done_and_error_events_are_failures() {
        let cut = futures::stream::iter(vec![sse(r#"{"choices":[{"delta":{}}]}"#)]);
        let out: Vec<_> = openai_chunks(KIND, cut).collect().await;
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].as_ref().unwrap_err().class, ErrorClass::Connection);

        let errored = futures::stream::iter(vec![sse(
            r#"{"error":{"message":"overloaded","code":"server_error"}}"#,
        )]);
        let out: Vec<_> = openai_chunks(KIND, errored).collect().await;
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].as_ref().unwrap_err().message, "overloaded");
    }

    #[test]
    fn error_bodies_of_both_shapes_are_read() {
        let b = parse_error(
            &json!({"error": {"message": "m", "type": "t", "code": "c", "param": "p"}}),
        );
        assert_eq!(
            (b.message.as_str(), b.code.as_deref(), b.param.as_deref()),
            ("m", Some("c"), Some("p"))
        );
        let flat = parse_error(
            &json!({"object": "error", "message": "too long", "type": "BadRequestError", "code": 400}),
        );
        assert_eq!(
            (flat.message.as_str(), flat.code.as_deref()),
            ("too long", Some("400"))
        );
    }
}
