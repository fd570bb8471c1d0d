//! Quality signals beside the request log: regenerations (the same caller asking the
//! same thing again soon, a sign the first answer was not good enough) and the input
//! hash they are detected by. Feedback itself is stored by the `/v1/feedback` handler.

use std::hash::Hasher as _;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::pipeline::{Gateway, parse_body};
use crate::store::{Feedback, redact_secrets};

/// Recent inputs by caller, to spot regenerations. In process: with several instances
/// behind a load balancer, a regeneration is only seen by the instance that saw the
/// original (a shared store for this belongs with the Redis work).
///
/// Written by hand rather than on a general cache: an entry is a 64-bit hash of (key,
/// user, input), the request id as its 16 bytes and a time, 32 bytes in the table and
/// none beside it, about 45 with the table's spare room (a cache crate's per-entry
/// bookkeeping cost several times that, and its admission policy can refuse new keys
/// once full, which is every key here). Two generations of
/// one window each: a lookup sees both and checks the time, so the window is exact;
/// the older generation is dropped whole when the newer one is a window old, or holds
/// [`Regenerations::GENERATION_CAP`] inputs (above that rate the window shortens, and
/// memory stays bounded).
pub struct Regenerations {
    window: Duration,
    /// What `Seen::at_ms` counts from.
    origin: Instant,
    generations: Mutex<Generations>,
}

struct Generations {
    /// When `current` began.
    started: Instant,
    current: foldhash::HashMap<u64, Seen>,
    previous: foldhash::HashMap<u64, Seen>,
}

/// One input's last sighting: the request (its UUID's two halves, not one `u128`,
/// whose 16-byte alignment would pad every entry) and when, in milliseconds since
/// the tracker started.
#[derive(Clone, Copy)]
struct Seen {
    id: [u64; 2],
    at_ms: u64,
}

/// Request ids are `req_` and 32 hex digits (see `pipeline::new_request_id`).
fn pack_id(request_id: &str) -> Option<[u64; 2]> {
    let hex = request_id.strip_prefix("req_")?;
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let n = u128::from_str_radix(hex, 16).ok()?;
    Some([(n >> 64) as u64, n as u64])
}

fn unpack_id([hi, lo]: [u64; 2]) -> String {
    format!("req_{hi:016x}{lo:016x}")
}

impl Regenerations {
    /// The most inputs one generation holds.
    pub const GENERATION_CAP: usize = 100_000;

    pub fn new(window: Duration) -> Self {
        Self {
            window,
            origin: Instant::now(),
            generations: Mutex::new(Generations {
                started: Instant::now(),
                current: foldhash::HashMap::default(),
                previous: foldhash::HashMap::default(),
            }),
        }
    }

    /// Note this request; returns the earlier request it regenerates, if any. Each
    /// regeneration points at the one before it, so a chain of retries reads in order.
    /// An id not of the gateway's own form is neither noted nor found.
    pub fn observe(
        &self,
        key: Option<&str>,
        user: Option<&str>,
        input_hash: u64,
        request_id: &str,
    ) -> Option<String> {
        let id = pack_id(request_id)?;
        let mut h = Xxh3::new();
        for part in [key, user] {
            // A tag byte keeps `None` apart from `Some("")`, and the length each part
            // from the next.
            match part {
                None => h.write_u8(0),
                Some(p) => {
                    h.write_u8(1);
                    h.write_usize(p.len());
                    h.write(p.as_bytes());
                }
            }
        }
        h.write_u64(input_hash);
        let k = h.finish();
        let now = Instant::now();
        let at_ms = u64::try_from(now.duration_since(self.origin).as_millis()).unwrap_or(u64::MAX);
        let seen = Seen { id, at_ms };
        let window_ms = u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX);
        // A panic elsewhere while holding the lock leaves the maps whole: keep going.
        let mut g = self
            .generations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if now.duration_since(g.started) >= self.window || g.current.len() >= Self::GENERATION_CAP {
            g.previous = std::mem::take(&mut g.current);
            g.started = now;
        }
        let earlier = match g.current.insert(k, seen) {
            Some(e) => Some(e),
            None => g.previous.remove(&k),
        };
        drop(g);
        earlier
            .filter(|e| at_ms.saturating_sub(e.at_ms) <= window_ms)
            .map(|e| unpack_id(e.id))
    }

    /// Inputs held (both generations).
    #[cfg(test)]
    fn len(&self) -> usize {
        let g = self
            .generations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        g.current.len() + g.previous.len()
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

    /// A request id of the gateway's form, numbered.
    fn id(n: u64) -> String {
        format!("req_{:032x}", u128::from(n) << 64 | 0xabc)
    }

    #[test]
    fn same_caller_same_input_within_the_window_is_a_regeneration() {
        let r = Regenerations::new(Duration::from_secs(60));
        let h = input_hash(&["hello"]);
        assert_eq!(r.observe(Some("k"), Some("u"), h, &id(1)), None);
        assert_eq!(
            r.observe(Some("k"), Some("u"), h, &id(2)).as_deref(),
            Some(id(1).as_str())
        );
        assert_eq!(
            r.observe(Some("k"), Some("u"), h, &id(3)).as_deref(),
            Some(id(2).as_str())
        );
        assert_eq!(
            r.observe(Some("k"), Some("other"), h, &id(4)),
            None,
            "another user"
        );
        assert_eq!(
            r.observe(Some("k"), Some("u"), input_hash(&["bye"]), &id(5)),
            None,
            "another input"
        );
        assert_ne!(input_hash(&["a", "b"]), input_hash(&["ab"]));
        assert_eq!(input_hash(&["a"]), input_hash(&vec!["a".to_string()]));
    }

    #[test]
    fn memory_stays_bounded_and_recent_inputs_stay_seen() {
        let r = Regenerations::new(Duration::from_secs(600));
        let cap = Regenerations::GENERATION_CAP as u64;
        for i in 0..cap * 3 {
            r.observe(None, Some("u"), i, &id(i));
        }
        assert!(r.len() <= 2 * Regenerations::GENERATION_CAP, "{}", r.len());
        // The last generation's inputs are still known; the first ones were dropped.
        let last = cap * 3 - 1;
        assert_eq!(
            r.observe(None, Some("u"), last, &id(1_000_000_000))
                .as_deref(),
            Some(id(last).as_str())
        );
        assert_eq!(r.observe(None, Some("u"), 0, &id(1_000_000_000)), None);
        // Key and user are told apart from each other and from their absence.
        assert_eq!(r.observe(Some("x"), None, 7, &id(11)), None);
        assert_eq!(r.observe(None, Some("x"), 7, &id(12)), None);
        assert_eq!(r.observe(Some(""), None, 7, &id(13)), None);
        assert_eq!(
            r.observe(Some("x"), None, 7, &id(14)).as_deref(),
            Some(id(11).as_str())
        );
    }

    #[test]
    fn ids_pack_into_16_bytes_and_back() {
        let real = "req_019a2b3c4d5e7f60a1b2c3d4e5f60718";
        assert_eq!(pack_id(real).map(unpack_id).as_deref(), Some(real));
        for bad in [
            "r1",
            "req_",
            "req_019a2b3c4d5e7f60a1b2c3d4e5f6071",
            "req_019a2b3c4d5e7f60a1b2c3d4e5f6071g",
            "req_+19a2b3c4d5e7f60a1b2c3d4e5f6071",
        ] {
            assert_eq!(pack_id(bad), None, "{bad}");
        }
        // Such an id is not tracked, and does not disturb the ones that are.
        let r = Regenerations::new(Duration::from_secs(60));
        assert_eq!(r.observe(None, Some("u"), 5, &id(1)), None);
        assert_eq!(r.observe(None, Some("u"), 5, "r2"), None);
        assert_eq!(
            r.observe(None, Some("u"), 5, &id(3)).as_deref(),
            Some(id(1).as_str())
        );
    }

    #[tokio::test]
    async fn outside_the_window_is_not() {
        let r = Regenerations::new(Duration::from_millis(20));
        r.observe(None, None, 1, &id(1));
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(r.observe(None, None, 1, &id(2)), None);
    }
}
