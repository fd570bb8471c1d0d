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
use super::{ChatCall, ChunkStream, ErrorClass, Provider, Timeouts, UpstreamError};
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
    async fn admit(&self, timeouts: Timeouts) -> Result<(Duration, Option<usize>), UpstreamError> {
        match self.chaos.decide() {
            Decision::Fail {
                status,
                retry_after,
            } => Err(to_error(sluice_sim::openai::error(status, retry_after))),
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
}

fn to_error(e: sluice_sim::openai::SimError) -> UpstreamError {
    let body = parse_error(&e.body);
    let retry_after = e
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("retry-after-ms"))
        .and_then(|(_, v)| v.parse::<f64>().ok())
        .map(|ms| Duration::from_secs_f64(ms / 1000.0))
        .or_else(|| {
            e.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("retry-after"))
                .and_then(|(_, v)| v.parse::<f64>().ok())
                .map(Duration::from_secs_f64)
        });
    let mut error = UpstreamError::from_status(
        KIND,
        e.status,
        body.message,
        body.code,
        body.kind.as_deref(),
        retry_after,
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
        self.admit(call.timeouts).await?;
        let request = to_value(&UpstreamChat {
            model: call.upstream_model,
            stream: false,
            stream_options: None,
            request: call.request,
        })?;
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let body = sluice_sim::openai::chat_completion(&request, id).map_err(to_error)?;
        serde_json::from_value(body).map_err(|e| invalid_response(KIND, "chat completion", e))
    }

    async fn chat_stream(&self, call: ChatCall<'_>) -> Result<ChunkStream, UpstreamError> {
        let (ttft, cut_after) = self.admit(call.timeouts).await?;
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
        let payloads = sluice_sim::openai::chat_chunks(&request, id).map_err(to_error)?;
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
    ) -> Result<EmbeddingsResponse, UpstreamError> {
        self.admit(timeouts).await?;
        let request = to_value(&UpstreamEmbeddings {
            model: upstream_model,
            request,
        })?;
        let body = sluice_sim::openai::embeddings(&request).map_err(to_error)?;
        serde_json::from_value(body).map_err(|e| invalid_response(KIND, "embeddings response", e))
    }
}
