//! Upstream providers behind one trait: OpenAI-compatible, Anthropic and the in-process
//! simulator. Each turns the gateway's request into its wire format and back, and sorts
//! every failure into an [`ErrorClass`] that says whether retrying can help.

pub mod anthropic;
mod http;
pub mod openai;
pub mod sim;

use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use futures::Stream;

use crate::limits::capacity::{Capacity, UpstreamLimits};
use crate::wire::{ChatRequest, ChatResponse, EmbeddingsRequest, EmbeddingsResponse, StreamChunk};

/// A stream of chunks; it ends with `Ok` items only when the upstream finished cleanly
/// (`[DONE]` or `message_stop`), and with an `Err` when it was cut.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<StreamChunk, UpstreamError>> + Send>>;

/// Per-call limits, from the model's config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Time until the response headers (and, for streams, the first chunk) arrive.
    pub first_byte: Duration,
    /// Time for the whole call, streams included.
    pub total: Duration,
}

/// One chat call to one upstream model.
pub struct ChatCall<'a> {
    pub request: &'a ChatRequest,
    pub upstream_model: &'a str,
    pub timeouts: Timeouts,
    /// The route's capacity, told what every upstream answer says about its limits.
    pub capacity: Option<&'a Capacity>,
}

#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// Short provider kind for records and metrics (`openai`, `anthropic`, `sim`).
    fn kind(&self) -> &'static str;

    async fn chat(&self, call: ChatCall<'_>) -> Result<ChatResponse, UpstreamError>;

    /// Start a stream. Returns once the upstream accepted the request; the first chunk
    /// may still fail and is awaited by the caller under the first-byte timeout.
    /// The stream always carries usage when the upstream can report it; the caller strips
    /// the usage chunk if the client did not ask for it.
    async fn chat_stream(&self, call: ChatCall<'_>) -> Result<ChunkStream, UpstreamError>;

    /// `capacity` as in [`ChatCall::capacity`].
    async fn embeddings(
        &self,
        request: &EmbeddingsRequest,
        upstream_model: &str,
        timeouts: Timeouts,
        capacity: Option<&Capacity>,
    ) -> Result<EmbeddingsResponse, UpstreamError>;
}

/// Why an upstream call failed; decides retry and fallback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// 429 from the provider: its limits, not ours.
    RateLimited,
    /// The provider is overloaded (503, Anthropic 529).
    Overloaded,
    /// No answer within the configured time.
    Timeout,
    /// Any other 5xx.
    Server,
    /// Could not connect, or the connection broke.
    Connection,
    /// The provider refused the request as malformed: retrying cannot help.
    BadRequest,
    /// The provider refused our credentials: a gateway misconfiguration.
    Auth,
    /// The provider does not know the model: a gateway misconfiguration.
    NotFound,
    /// The provider's safety system refused the content.
    ContentFilter,
    /// The upstream answered something the gateway could not read.
    InvalidResponse,
    /// The gateway's own provider capacity for this model ran short and the request was
    /// shed from the queue (another model in the chain may still take it).
    CapacityExceeded,
}

impl ErrorClass {
    /// Whether the same call may succeed when tried again.
    pub fn is_retryable(self) -> bool {
        match self {
            ErrorClass::RateLimited
            | ErrorClass::Overloaded
            | ErrorClass::Timeout
            | ErrorClass::Server
            | ErrorClass::Connection => true,
            ErrorClass::BadRequest
            | ErrorClass::Auth
            | ErrorClass::NotFound
            | ErrorClass::ContentFilter
            | ErrorClass::InvalidResponse
            | ErrorClass::CapacityExceeded => false,
        }
    }

    /// Whether another model may succeed where this one failed. Bad requests and content
    /// refusals are about the request, so they go straight back to the client.
    pub fn may_fall_back(self) -> bool {
        match self {
            ErrorClass::BadRequest | ErrorClass::ContentFilter => false,
            ErrorClass::RateLimited
            | ErrorClass::Overloaded
            | ErrorClass::Timeout
            | ErrorClass::Server
            | ErrorClass::Connection
            | ErrorClass::Auth
            | ErrorClass::NotFound
            | ErrorClass::InvalidResponse
            | ErrorClass::CapacityExceeded => true,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::RateLimited => "rate_limited",
            ErrorClass::Overloaded => "overloaded",
            ErrorClass::Timeout => "timeout",
            ErrorClass::Server => "server_error",
            ErrorClass::Connection => "connection",
            ErrorClass::BadRequest => "bad_request",
            ErrorClass::Auth => "auth",
            ErrorClass::NotFound => "not_found",
            ErrorClass::ContentFilter => "content_filter",
            ErrorClass::InvalidResponse => "invalid_response",
            ErrorClass::CapacityExceeded => "capacity_exceeded",
        }
    }
}

/// A failed upstream call.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{provider} upstream {}: {message}", class.as_str())]
pub struct UpstreamError {
    pub class: ErrorClass,
    pub provider: &'static str,
    pub status: Option<u16>,
    pub message: String,
    /// The provider's own code (`context_length_exceeded`, `overloaded_error`, ...).
    pub code: Option<String>,
    pub param: Option<String>,
    /// From `retry-after-ms` / `retry-after`, when the provider sent one.
    pub retry_after: Option<Duration>,
}

impl UpstreamError {
    pub fn new(class: ErrorClass, provider: &'static str, message: impl Into<String>) -> Self {
        Self {
            class,
            provider,
            status: None,
            message: message.into(),
            code: None,
            param: None,
            retry_after: None,
        }
    }

    pub fn is_retryable(&self) -> bool {
        self.class.is_retryable()
    }

    pub fn timeout(provider: &'static str, what: &str, after: Duration) -> Self {
        Self::new(
            ErrorClass::Timeout,
            provider,
            format!("no {what} within {}", humantime_ms(after)),
        )
    }

    /// Classify an HTTP error answer. `body_code`/`body_type` are read from the error
    /// body, since providers say "content filter" or "overloaded" there, not in the status.
    pub fn from_status(
        provider: &'static str,
        status: u16,
        message: String,
        body_code: Option<String>,
        body_type: Option<&str>,
        retry_after: Option<Duration>,
    ) -> Self {
        let hint = body_code.as_deref().or(body_type).unwrap_or("");
        let class = if hint.contains("content_filter") || hint.contains("content_policy") {
            ErrorClass::ContentFilter
        } else if hint.contains("overloaded") {
            ErrorClass::Overloaded
        } else {
            match status {
                429 => ErrorClass::RateLimited,
                408 => ErrorClass::Timeout,
                401 | 403 => ErrorClass::Auth,
                404 => ErrorClass::NotFound,
                503 | 529 => ErrorClass::Overloaded,
                504 => ErrorClass::Timeout,
                500..=599 => ErrorClass::Server,
                _ => ErrorClass::BadRequest,
            }
        };
        Self {
            class,
            provider,
            status: Some(status),
            message,
            code: body_code,
            param: None,
            retry_after,
        }
    }
}

fn humantime_ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

/// Read `retry-after-ms` (OpenAI) or `retry-after` (seconds, or an HTTP date we treat as
/// absent since a clock-skewed date is worse than our own backoff).
pub fn retry_after_from_headers(headers: &::http::HeaderMap) -> Option<Duration> {
    let read = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(ms) = read("retry-after-ms").and_then(|v| v.trim().parse::<f64>().ok())
        && ms.is_finite()
        && ms >= 0.0
    {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    read("retry-after")
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
}

/// Tell a route's capacity what an upstream answer (success or error) said: its
/// rate-limit headers, then AIMD (a 429 shrinks the allowed rate, a success grows it).
pub(crate) fn report(capacity: Option<&Capacity>, status: u16, headers: &::http::HeaderMap) {
    let Some(capacity) = capacity else { return };
    if let Some(limits) = UpstreamLimits::from_headers(headers) {
        capacity.observe(&limits);
    }
    match status {
        429 => capacity.on_rate_limited(retry_after_from_headers(headers)),
        200..=299 => capacity.on_success(),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_classify_and_only_transient_ones_retry() {
        let c = |status, code: Option<&str>| {
            UpstreamError::from_status(
                "openai",
                status,
                String::new(),
                code.map(Into::into),
                None,
                None,
            )
            .class
        };
        assert_eq!(c(429, None), ErrorClass::RateLimited);
        assert_eq!(c(529, None), ErrorClass::Overloaded);
        assert_eq!(c(503, None), ErrorClass::Overloaded);
        assert_eq!(c(500, None), ErrorClass::Server);
        assert_eq!(c(504, None), ErrorClass::Timeout);
        assert_eq!(c(401, None), ErrorClass::Auth);
        assert_eq!(c(404, None), ErrorClass::NotFound);
        assert_eq!(c(400, None), ErrorClass::BadRequest);
        assert_eq!(c(400, Some("content_filter")), ErrorClass::ContentFilter);
        assert!(c(429, None).is_retryable());
        assert!(!c(400, None).is_retryable());
        assert!(!c(401, None).is_retryable());
        assert!(c(401, None).may_fall_back());
        assert!(!c(400, Some("content_filter")).may_fall_back());
    }

    #[test]
    fn retry_after_prefers_milliseconds() {
        let mut h = ::http::HeaderMap::new();
        h.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after_from_headers(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", "1500".parse().unwrap());
        assert_eq!(
            retry_after_from_headers(&h),
            Some(Duration::from_millis(1500))
        );
        let mut bad = ::http::HeaderMap::new();
        bad.insert(
            "retry-after",
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after_from_headers(&bad), None);
    }
}
