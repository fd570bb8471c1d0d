//! Anthropic Messages API, translated both ways for chat (streaming included).

use async_trait::async_trait;

use super::{ChatCall, ChunkStream, ErrorClass, Provider, Timeouts, UpstreamError};
use crate::config::ProviderConfig;
use crate::wire::{ChatResponse, EmbeddingsRequest, EmbeddingsResponse};

const KIND: &str = "anthropic";

pub struct AnthropicProvider {}

impl AnthropicProvider {
    pub fn new(_config: &ProviderConfig) -> anyhow::Result<Self> {
        Ok(Self {})
    }
}

#[async_trait]
impl Provider for AnthropicProvider {
    fn kind(&self) -> &'static str {
        KIND
    }

    async fn chat(&self, _call: ChatCall<'_>) -> Result<ChatResponse, UpstreamError> {
        Err(UpstreamError::new(ErrorClass::BadRequest, KIND, "not yet"))
    }

    async fn chat_stream(&self, _call: ChatCall<'_>) -> Result<ChunkStream, UpstreamError> {
        Err(UpstreamError::new(ErrorClass::BadRequest, KIND, "not yet"))
    }

    async fn embeddings(
        &self,
        _request: &EmbeddingsRequest,
        _upstream_model: &str,
        _timeouts: Timeouts,
    ) -> Result<EmbeddingsResponse, UpstreamError> {
        Err(UpstreamError::new(
            ErrorClass::BadRequest,
            KIND,
            "Anthropic has no embeddings API; route embeddings to another provider",
        ))
    }
}
