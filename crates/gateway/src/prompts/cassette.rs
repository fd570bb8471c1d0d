//! Cassettes: a prompt version's recorded answers (`vN.cassette.json` beside the prompt
//! file), keyed by test case and run, so `sluice prompts test --replay` answers with no
//! network and CI is deterministic. A cassette belongs to one content hash: a version
//! whose hash changed has no valid recording.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::file::PromptVersion;
use crate::limits::capacity::Capacity;
use crate::providers::{ChatCall, ChunkStream, ErrorClass, Provider, Timeouts, UpstreamError};
use crate::wire::{
    ChatMessage, ChatResponse, Choice, EmbeddingsRequest, EmbeddingsResponse, Usage,
};

/// One recorded answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recording {
    /// The gateway model that answered.
    pub model: String,
    pub text: String,
    #[serde(default)]
    pub prompt_tokens: u32,
    #[serde(default)]
    pub completion_tokens: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Cassette {
    /// `id@version` it was recorded for.
    pub prompt: String,
    /// The content hash it was recorded against.
    pub hash: String,
    /// `CASE#RUN` (run from 0) -> answer.
    #[serde(default)]
    pub answers: BTreeMap<String, Recording>,
}

/// `prompts/ID/vN.toml` -> `prompts/ID/vN.cassette.json`.
pub fn path_for(version: &PromptVersion) -> PathBuf {
    version
        .file
        .with_file_name(format!("v{}.cassette.json", version.version))
}

pub fn key(case: &str, run: u32) -> String {
    format!("{case}#{run}")
}

impl Cassette {
    pub fn new(version: &PromptVersion) -> Cassette {
        Cassette {
            prompt: version.reference(),
            hash: version.hash.clone(),
            answers: BTreeMap::new(),
        }
    }

    /// The cassette of `version`, or why it cannot be replayed.
    pub fn load(version: &PromptVersion) -> Result<Cassette, String> {
        let path = path_for(version);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            format!(
                "no cassette for {} ({}: {e}); record one with `sluice prompts test --record`",
                version.reference(),
                path.display()
            )
        })?;
        let c: Cassette = serde_json::from_str(&text)
            .map_err(|e| format!("{}: not a cassette: {e}", path.display()))?;
        if c.hash != version.hash {
            return Err(format!(
                "{} was recorded for content hash {}, but {} now hashes to {}; record it again with `sluice prompts test --record`",
                path.display(),
                c.hash,
                version.reference(),
                version.hash
            ));
        }
        Ok(c)
    }

    /// The recorded answer for a case and run, or a clear error naming what is missing.
    pub fn answer(&self, path: &Path, case: &str, run: u32) -> Result<&Recording, String> {
        self.answers.get(&key(case, run)).ok_or_else(|| {
            format!(
                "{} has no recorded answer for case `{case}` run {}; record it with `sluice prompts test --record{}`",
                path.display(),
                run + 1,
                if run > 0 { format!(" --repeat {}", run + 1) } else { String::new() }
            )
        })
    }

    pub fn save(&self, path: &Path) -> Result<(), String> {
        let text = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        std::fs::write(path, format!("{text}\n"))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    }
}

/// A provider that answers every chat call with the recording the runner put in its
/// slot: replays go through the same pipeline as live traffic (rendering, validators,
/// records), with no upstream.
#[derive(Clone, Default)]
pub struct ReplayProvider {
    slot: Arc<Mutex<Option<Recording>>>,
}

impl ReplayProvider {
    /// The answer the next calls get.
    pub fn set(&self, recording: Option<Recording>) {
        if let Ok(mut slot) = self.slot.lock() {
            *slot = recording;
        }
    }

    fn current(&self) -> Option<Recording> {
        self.slot.lock().ok().and_then(|s| s.clone())
    }
}

const KIND: &str = "cassette";

#[async_trait]
impl Provider for ReplayProvider {
    fn kind(&self) -> &'static str {
        KIND
    }

    async fn chat(&self, call: ChatCall<'_>) -> Result<ChatResponse, UpstreamError> {
        let r = self.current().ok_or_else(|| {
            UpstreamError::new(
                ErrorClass::NotFound,
                KIND,
                "no recorded answer for this call",
            )
        })?;
        Ok(ChatResponse {
            id: "chatcmpl-replay".into(),
            object: "chat.completion".into(),
            created: 0,
            model: call.upstream_model.to_string(),
            choices: vec![Choice {
                index: 0,
                message: ChatMessage::assistant(r.text),
                finish_reason: Some("stop".into()),
                extra: Default::default(),
            }],
            usage: Some(Usage::new(r.prompt_tokens, r.completion_tokens)),
            extra: Default::default(),
            raw: None,
        })
    }

    async fn chat_stream(&self, _call: ChatCall<'_>) -> Result<ChunkStream, UpstreamError> {
        Err(UpstreamError::new(
            ErrorClass::BadRequest,
            KIND,
            "replays answer whole completions only",
        ))
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
            "replays answer chat completions only",
        ))
    }
}
