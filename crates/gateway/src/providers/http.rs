//! HTTP plumbing shared by the providers that talk to a real upstream: the client, the
//! first-byte timeout, failure classification, and SSE decoding.

use std::sync::Once;
use std::time::Duration;

use futures::{Stream, StreamExt};
use secrecy::ExposeSecret;
use sse_stream::{Sse, SseByteStream};

use super::{ErrorClass, UpstreamError, report, retry_after_from_headers};
use crate::config::ProviderConfig;
use crate::limits::capacity::Capacity;

/// A client per provider, so its connect timeout and pool are its own.
pub(crate) fn client(
    config: &ProviderConfig,
    default_headers: ::http::HeaderMap,
) -> anyhow::Result<reqwest::Client> {
    static CRYPTO: Once = Once::new();
    CRYPTO.call_once(|| {
        // Another part of the process may have installed one first; either is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    let mut headers = default_headers;
    for (name, value) in &config.headers {
        headers.insert(
            ::http::HeaderName::from_bytes(name.as_bytes())?,
            ::http::HeaderValue::from_str(value)?,
        );
    }
    Ok(reqwest::Client::builder()
        .connect_timeout(config.connect_timeout)
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        // LLM APIs do not redirect; reqwest's redirect layer cost ~2% of the gateway's
        // CPU per call for nothing (and following one would resend the API key).
        .redirect(reqwest::redirect::Policy::none())
        .default_headers(headers)
        .build()?)
}

/// The API key as a header value, marked sensitive so it never shows in debug output.
pub(crate) fn secret_header(
    config: &ProviderConfig,
    prefix: &str,
) -> anyhow::Result<Option<::http::HeaderValue>> {
    match &config.api_key {
        None => Ok(None),
        Some(key) => {
            let mut v = ::http::HeaderValue::from_str(&format!("{prefix}{}", key.expose_secret()))?;
            v.set_sensitive(true);
            Ok(Some(v))
        }
    }
}

/// Send and wait for the response headers within `first_byte`; a non-2xx answer becomes
/// a classified error, its body read by `parse_error`. Every answer's rate-limit
/// headers and status go to `capacity`.
pub(crate) async fn send(
    provider: &'static str,
    request: reqwest::RequestBuilder,
    first_byte: Duration,
    parse_error: fn(&serde_json::Value) -> ErrorBody,
    capacity: Option<&Capacity>,
) -> Result<reqwest::Response, UpstreamError> {
    let response = match tokio::time::timeout(first_byte, request.send()).await {
        Err(_) => {
            return Err(UpstreamError::timeout(
                provider,
                "response headers",
                first_byte,
            ));
        }
        Ok(Err(e)) => return Err(from_reqwest(provider, &e)),
        Ok(Ok(r)) => r,
    };
    let status = response.status();
    report(capacity, status.as_u16(), response.headers());
    if status.is_success() {
        return Ok(response);
    }
    let retry_after = retry_after_from_headers(response.headers());
    let text = match tokio::time::timeout(first_byte, response.text()).await {
        Ok(Ok(t)) => t,
        Ok(Err(_)) | Err(_) => String::new(),
    };
    let body = serde_json::from_str::<serde_json::Value>(&text)
        .map(|v| parse_error(&v))
        .unwrap_or_else(|_| ErrorBody {
            message: if text.is_empty() {
                status.canonical_reason().unwrap_or("error").to_string()
            } else {
                text.chars().take(500).collect()
            },
            ..ErrorBody::default()
        });
    let mut error = UpstreamError::from_status(
        provider,
        status.as_u16(),
        body.message,
        body.code,
        body.kind.as_deref(),
        retry_after,
    );
    error.param = body.param;
    Err(error)
}

/// What a provider's error body says.
#[derive(Debug, Default)]
pub(crate) struct ErrorBody {
    pub message: String,
    pub code: Option<String>,
    pub kind: Option<String>,
    pub param: Option<String>,
}

pub(crate) fn from_reqwest(provider: &'static str, e: &reqwest::Error) -> UpstreamError {
    let class = if e.is_timeout() {
        ErrorClass::Timeout
    } else if e.is_decode() {
        ErrorClass::InvalidResponse
    } else {
        ErrorClass::Connection
    };
    // reqwest's Display omits the cause ("error sending request"); the chain says why.
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    UpstreamError::new(class, provider, message)
}

/// Read the whole body within `total`.
pub(crate) async fn body_bytes(
    provider: &'static str,
    response: reqwest::Response,
    total: Duration,
) -> Result<bytes::Bytes, UpstreamError> {
    match tokio::time::timeout(total, response.bytes()).await {
        Err(_) => Err(UpstreamError::timeout(provider, "complete response", total)),
        Ok(Err(e)) => Err(from_reqwest(provider, &e)),
        Ok(Ok(b)) => Ok(b),
    }
}

/// The SSE events of a response body; a broken body ends with a `Connection` error.
pub(crate) fn sse_events(
    provider: &'static str,
    response: reqwest::Response,
) -> impl Stream<Item = Result<Sse, UpstreamError>> + Send {
    SseByteStream::new(response.bytes_stream()).map(move |item| {
        item.map_err(|e| {
            UpstreamError::new(
                ErrorClass::Connection,
                provider,
                format!("stream broken: {e}"),
            )
        })
    })
}

pub(crate) fn invalid_response(
    provider: &'static str,
    what: &str,
    e: impl std::fmt::Display,
) -> UpstreamError {
    UpstreamError::new(
        ErrorClass::InvalidResponse,
        provider,
        format!("unreadable {what}: {e}"),
    )
}
