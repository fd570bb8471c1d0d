//! The in-process simulator as a provider: the same replies, chunks and failures as
//! `sluice mock`, without a socket. It answers the embedded default when no provider key
//! is set, and lets tests script failures (with tokio's paused clock) through `chaos`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use sluice_sim::{Chaos, ChaosConfig, Decision};

use super::http::invalid_response;
use super::openai::parse_error;
use super::{
    ChatCall, ChunkStream, ErrorClass, Provider, Timeouts, UpstreamError, report,
    retry_after_from_headers,
};
use crate::limits::capacity::Capacity;
use crate::wire::{
    ChatResponse, EmbeddingsRequest, EmbeddingsResponse, PeekedChunk, StreamChunk, StreamOptions,
    UpstreamChat, UpstreamEmbeddings,
};

const KIND: &str = "sim";

pub struct SimProvider {
    chaos: Arc<Chaos>,
    ids: AtomicU64,
}

impl SimProvider {
    pub fn new(config: ChaosConfig) -> Self {
        Self {
            chaos: Arc::new(Chaos::new(config)),
            ids: AtomicU64::new(0),
        }
    }

    /// The failure engine, so tests can count calls.
    pub fn chaos(&self) -> &Arc<Chaos> {
        &self.chaos
    }

    /// Decide this call's fate and wait its latency (as a real upstream would make us
    /// wait for headers, under the first-byte timeout); `Ok` carries the stream settings.
    async fn admit(
        &self,
        timeouts: Timeouts,
        capacity: Option<&Capacity>,
    ) -> Result<(Duration, Option<usize>), UpstreamError> {
        match self.chaos.decide() {
            Decision::Fail {
                status,
                retry_after,
            } => Err(fail(
                capacity,
                sluice_sim::openai::error(status, retry_after),
            )),
            Decision::Ok {
                latency,
                ttft,
                cut_after,
            } => {
                if latency > timeouts.first_byte {
                    tokio::time::sleep(timeouts.first_byte).await;
                    return Err(UpstreamError::timeout(
                        KIND,
                        "response headers",
                        timeouts.first_byte,
                    ));
                }
                if !latency.is_zero() {
                    tokio::time::sleep(latency).await;
                }
                Ok((ttft, cut_after))
            }
        }
    }

    /// A simulated success, with the rate-limit headers the HTTP simulator would send.
    fn succeed(&self, capacity: Option<&Capacity>) {
        if capacity.is_none() {
            return;
        }
        let headers = self
            .chaos
            .window()
            .map(|w| header_map(&sluice_sim::openai::rate_limit_headers(w)))
            .unwrap_or_default();
        report(capacity, 200, &headers);
    }
}

fn header_map(pairs: &[(&'static str, String)]) -> ::http::HeaderMap {
    pairs
        .iter()
        .filter_map(|(k, v)| {
            Some((
                ::http::HeaderName::from_bytes(k.as_bytes()).ok()?,
                ::http::HeaderValue::from_str(v).ok()?,
            ))
        })
        .collect()
}

/// A simulated error answer, reported to the route's capacity as a real one would be.
fn fail(capacity: Option<&Capacity>, e: sluice_sim::openai::SimError) -> UpstreamError {
    let headers = header_map(&e.headers);
    report(capacity, e.status, &headers);
    let body = parse_error(&e.body);
    let mut error = UpstreamError::from_status(
        KIND,
        e.status,
        body.message,
        body.code,
        body.kind.as_deref(),
        retry_after_from_headers(&headers),
    );
    error.param = body.param;
    error
}

fn to_value<T: serde::Serialize>(v: &T) -> Result<serde_json::Value, UpstreamError> {
    serde_json::to_value(v)
        .map_err(|e| UpstreamError::new(ErrorClass::BadRequest, KIND, e.to_string()))
}

#[async_trait]
impl Provider for SimProvider {
    fn kind(&self) -> &'static str {
        KIND
    }

    async fn chat(&self, call: ChatCall<'_>) -> Result<ChatResponse, UpstreamError> {
        self.admit(call.timeouts, call.capacity).await?;
        let request = to_value(&UpstreamChat {
            model: call.upstream_model,
            stream: false,
            stream_options: None,
            request: call.request,
        })?;
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let body = sluice_sim::openai::chat_completion(&request, id)
            .map_err(|e| fail(call.capacity, e))?;
        self.succeed(call.capacity);
        serde_json::from_value(body).map_err(|e| invalid_response(KIND, "chat completion", e))
    }

    async fn chat_stream(&self, call: ChatCall<'_>) -> Result<ChunkStream, UpstreamError> {
        let (ttft, cut_after) = self.admit(call.timeouts, call.capacity).await?;
        let request = to_value(&UpstreamChat {
            model: call.upstream_model,
            stream: true,
            stream_options: Some(StreamOptions {
                include_usage: Some(true),
                ..Default::default()
            }),
            request: call.request,
        })?;
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let payloads =
            sluice_sim::openai::chat_chunks(&request, id).map_err(|e| fail(call.capacity, e))?;
        self.succeed(call.capacity);
        let pace = self
            .chaos
            .config()
            .tokens_per_sec
            .filter(|t| *t > 0.0)
            .map(|t| Duration::from_secs_f64(1.0 / t));
        let total = payloads.len();
        let stream = futures::stream::iter(payloads.into_iter().enumerate()).then(
            move |(i, data)| async move {
                let wait = if i == 0 { Some(ttft) } else { pace };
                if let Some(w) = wait.filter(|w| !w.is_zero()) {
                    tokio::time::sleep(w).await;
                }
                if cut_after.is_some_and(|n| i >= n) {
                    return Err(UpstreamError::new(
                        ErrorClass::Connection,
                        KIND,
                        format!("stream cut after {i} of {total} chunks"),
                    ));
                }
                match StreamChunk::peek(data) {
                    Ok(PeekedChunk::Chunk(c)) => Ok(c),
                    Ok(PeekedChunk::Error(raw)) => {
                        Err(UpstreamError::new(ErrorClass::Server, KIND, raw))
                    }
                    Err(e) => Err(invalid_response(KIND, "stream chunk", e)),
                }
            },
        );
        // A cut ends the stream at its first error, as a broken connection would.
        let stream = stream.scan(false, |failed, item| {
            let out = if *failed { None } else { Some(item) };
            if let Some(Err(_)) = &out {
                *failed = true;
            }
            futures::future::ready(out)
        });
        Ok(Box::pin(stream))
    }

    async fn embeddings(
        &self,
        request: &EmbeddingsRequest,
        upstream_model: &str,
        timeouts: Timeouts,
        capacity: Option<&Capacity>,
    ) -> Result<EmbeddingsResponse, UpstreamError> {
        self.admit(timeouts, capacity).await?;
        let request = to_value(&UpstreamEmbeddings {
            model: upstream_model,
            request,
        })?;
        let body = sluice_sim::openai::embeddings(&request).map_err(|e| fail(capacity, e))?;
        self.succeed(capacity);
        serde_json::from_value(body).map_err(|e| invalid_response(KIND, "embeddings response", e))
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;
    use sluice_sim::ChaosConfig;

    use super::*;
    use crate::limits::capacity::CapacityConfig;
    use crate::wire::ChatRequest;

    #[tokio::test]
    async fn answers_report_the_window_to_the_capacity() {
        let sim = SimProvider::new(ChaosConfig {
            rpm: Some(1),
            ..ChaosConfig::default()
        });
        let capacity = Capacity::new(CapacityConfig::default());
        let request: ChatRequest = serde_json::from_value(serde_json::json!({
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "hi"}],
        }))
        .unwrap();
        let timeouts = Timeouts {
            first_byte: Duration::from_secs(5),
            total: Duration::from_secs(10),
        };
        let call = || ChatCall {
            request: &request,
            upstream_model: "gpt-4o-mini",
            timeouts,
            capacity: Some(&capacity),
        };
        sim.chat(call()).await.unwrap();
        // "1 a minute, none left until the window resets" holds the next request back.
        let far = tokio::time::Instant::now() + Duration::from_secs(60);
        assert_eq!(capacity.admit(0, 1, far).now_or_never(), None);
        let e = sim.chat(call()).await.unwrap_err();
        assert_eq!(e.class, ErrorClass::RateLimited);
        assert_eq!(capacity.queued(), 0);
    }
}
