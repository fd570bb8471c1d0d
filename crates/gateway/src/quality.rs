//! Quality signals beside the request log: regenerations (the same caller asking the
//! same thing again soon, a sign the first answer was not good enough) and the input
//! hash they are detected by. Feedback itself is stored by the `/v1/feedback` handler.

use std::hash::Hasher as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::pipeline::{Gateway, parse_body};
use crate::store::{Feedback, redact_secrets};

/// Recent inputs by caller, to spot regenerations. In process: with several instances
/// behind a load balancer, a regeneration is only seen by the instance that saw the
/// original (a shared store for this belongs with the Redis work).
pub struct Regenerations {
    seen: moka::sync::Cache<(Option<String>, Option<String>, u64), String>,
}

impl Regenerations {
    pub fn new(window: Duration) -> Self {
        Self {
            seen: moka::sync::Cache::builder()
                .max_capacity(200_000)
                .time_to_live(window.max(Duration::from_millis(1)))
                .build(),
        }
    }

    /// Note this request; returns the earlier request it regenerates, if any. Each
    /// regeneration points at the one before it, so a chain of retries reads in order.
    pub fn observe(
        &self,
        key: Option<&str>,
        user: Option<&str>,
        input_hash: u64,
        request_id: &str,
    ) -> Option<String> {
        let k = (
            key.map(str::to_string),
            user.map(str::to_string),
            input_hash,
        );
        let earlier = self.seen.get(&k);
        self.seen.insert(k, request_id.to_string());
        earlier
    }
}

/// A stable 64-bit hash of a value's JSON form, computed without building the string.
pub fn input_hash<T: Serialize>(value: &T) -> u64 {
    struct HashWriter(Xxh3);
    impl std::io::Write for HashWriter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.write(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut w = HashWriter(Xxh3::new());
    // Serializing our own wire types cannot fail; a failure would only weaken the hash.
    let _ = serde_json::to_writer(&mut w, value);
    w.0.finish()
}

/// `POST /v1/feedback` body. The score is on a -1 (bad) to 1 (good) scale: thumbs map
/// to -1 and 1, star ratings to (stars - 3) / 2.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedbackRequest {
    pub request_id: String,
    pub score: f64,
    #[serde(default)]
    pub comment: Option<String>,
}

const MAX_COMMENT_CHARS: usize = 4000;

/// Validate and store feedback on a request the caller's key made.
pub async fn submit_feedback(
    gw: &Gateway,
    principal: &Principal,
    body: &[u8],
) -> Result<serde_json::Value, ApiError> {
    let f: FeedbackRequest = parse_body(body)?;
    if !(f.score.is_finite() && (-1.0..=1.0).contains(&f.score)) {
        return Err(ApiError::invalid(
            "`score` must be a number from -1 to 1",
            Some("score".to_string()),
        ));
    }
    if f.comment
        .as_ref()
        .is_some_and(|c| c.chars().count() > MAX_COMMENT_CHARS)
    {
        return Err(ApiError::invalid(
            format!("`comment` must be at most {MAX_COMMENT_CHARS} characters"),
            Some("comment".to_string()),
        ));
    }
    let owner = match gw.recorder.recent_owner(&f.request_id) {
        Some(owner) => Some(owner),
        None => gw
            .store
            .record_owner(&f.request_id)
            .await
            .map_err(|e| ApiError::StorageUnavailable(e.to_string()))?,
    };
    match owner {
        None => {
            return Err(ApiError::RequestNotFound {
                request_id: f.request_id,
            });
        }
        Some(owner) if owner != principal.key_id => {
            return Err(ApiError::RequestNotOwned {
                request_id: f.request_id,
            });
        }
        Some(_) => {}
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    gw.store
        .insert_feedback(&Feedback {
            request_id: f.request_id.clone(),
            key_id: principal.key_id.clone(),
            score: f.score,
            comment: f.comment.map(|c| redact_secrets(&c)),
            created_at_ms: now,
        })
        .await
        .map_err(|e| ApiError::StorageUnavailable(e.to_string()))?;
    gw.metrics.feedback(f.score);
    Ok(serde_json::json!({"object": "feedback", "request_id": f.request_id, "score": f.score}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_caller_same_input_within_the_window_is_a_regeneration() {
        let r = Regenerations::new(Duration::from_secs(60));
        let h = input_hash(&["hello"]);
        assert_eq!(r.observe(Some("k"), Some("u"), h, "r1"), None);
        assert_eq!(
            r.observe(Some("k"), Some("u"), h, "r2").as_deref(),
            Some("r1")
        );
        assert_eq!(
            r.observe(Some("k"), Some("u"), h, "r3").as_deref(),
            Some("r2")
        );
        assert_eq!(
            r.observe(Some("k"), Some("other"), h, "r4"),
            None,
            "another user"
        );
        assert_eq!(
            r.observe(Some("k"), Some("u"), input_hash(&["bye"]), "r5"),
            None,
            "another input"
        );
        assert_ne!(input_hash(&["a", "b"]), input_hash(&["ab"]));
        assert_eq!(input_hash(&["a"]), input_hash(&vec!["a".to_string()]));
    }

    #[tokio::test]
    async fn outside_the_window_is_not() {
        let r = Regenerations::new(Duration::from_millis(20));
        r.observe(None, None, 1, "r1");
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(r.observe(None, None, 1, "r2"), None);
    }
}
