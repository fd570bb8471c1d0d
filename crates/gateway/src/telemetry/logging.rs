//! Structured logs: the subscriber set-up, and the `ai_request_complete` line every
//! request leaves. Secrets never reach a log: keys live in `secrecy` types and request
//! bodies are not logged.

use async_trait::async_trait;

use super::{RecordBatch, RecordSink, RequestRecord};
use crate::config::{LogFormat, TelemetryConfig};

/// Writes one `ai_request_complete` line per record.
pub struct LogSink;

#[async_trait]
impl RecordSink for LogSink {
    async fn write(&mut self, batch: &RecordBatch) {
        for r in batch.iter() {
            log_record(r);
        }
    }
}

fn log_record(r: &RequestRecord) {
    let s = |v: &Option<String>| v.as_deref().unwrap_or("").to_string();
    tracing::info!(
        target: "sluice::record",
        event = "ai_request_complete",
        request_id = %r.request_id,
        endpoint = r.endpoint.as_str(),
        model = r.model.as_deref().or(r.model_requested.as_deref()).unwrap_or(""),
        model_requested = s(&r.model_requested),
        provider = s(&r.provider),
        stream = r.stream,
        key_id = s(&r.key_id),
        user = s(&r.user),
        feature = s(&r.feature),
        success = r.success(),
        outcome = r.outcome().as_str(),
        status = r.status,
        error_code = s(&r.error_code),
        retries = r.retries,
        upstream_calls = r.upstream_calls,
        fallback = r.fallback.map(|f| f.as_str()).unwrap_or(""),
        cache = s(&r.cache_status),
        prompt_tokens = r.prompt_tokens,
        completion_tokens = r.completion_tokens,
        tokens = r.prompt_tokens + r.completion_tokens,
        tokens_estimated = r.tokens_estimated,
        latency_ms = r.latency_ms,
        ttft_ms = r.ttft_ms.unwrap_or(0.0),
        upstream_ms = r.upstream_ms.unwrap_or(0.0),
        overhead_ms = r.overhead_ms.unwrap_or(0.0),
        regeneration_of = s(&r.regeneration_of),
    );
}

/// Install the global tracing subscriber. Idempotent, for tests.
pub fn init_logging(config: &TelemetryConfig) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(&config.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match config.log_format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init()
    } else {
        builder.try_init()
    };
}
