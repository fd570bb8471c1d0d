//! Cache keys: a 128-bit xxh3 over everything that shapes an answer, and nothing that
//! does not. The hashed value is the JSON serialization of a struct built for the purpose
//! ([`ChatKeyParts`], [`EmbeddingKeyParts`]), written straight into the hasher (no buffer).
//!
//! In: the scope (the key's owner, or global), the resolved upstream model, the messages,
//! `tools`, `tool_choice`, every generation parameter (`temperature`, `top_p`,
//! `max_tokens`, `max_completion_tokens`, `n`, `stop`, and from the pass-through fields
//! `seed`, `response_format`, penalties, `logit_bias`, and any field the gateway does not
//! know), and the prompt id@version when the request used one.
//! Out: `user`, `stream`, `stream_options` and the `sluice` extras (a streamed and a
//! non-streamed request share a key: a hit can be served either way), and the
//! pass-through fields in [`IGNORED_EXTRA`], which OpenAI documents as not changing the
//! answer.
//!
//! Deterministic: serde_json's `Map` is a `BTreeMap` (its `preserve_order` feature is off
//! in this workspace; `key_order_does_not_matter` fails if a dependency ever turns it on),
//! so object keys are hashed sorted whatever order the client sent them in. Numbers are
//! hashed as written after parsing: `temperature` is typed (`0` and `0.0` are the same
//! key); in unknown fields `1` and `1.0` are two keys (a miss, never a wrong hit).

use std::io;

use serde::{Serialize, Serializer};
use serde_json::{Map, Value};
use xxhash_rust::xxh3::Xxh3;

use crate::wire::{ChatMessage, ChatRequest, EmbeddingsRequest, Stop};

/// Version of the key layout: bump it when what goes into a key changes, so old entries
/// in Redis are simply never read again.
const KEY_VERSION: u8 = 1;

/// Pass-through fields that do not shape the answer (OpenAI stored-completion tags).
pub const IGNORED_EXTRA: [&str; 2] = ["metadata", "store"];

/// A 128-bit cache key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey(pub u128);

impl CacheKey {
    /// 32 lowercase hex digits, as used in Redis keys.
    pub fn hex(&self) -> String {
        format!("{:032x}", self.0)
    }
}

impl std::fmt::Display for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// Whose requests share answers: one owner's keys (`[cache] scope = "owner"`) or all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Scope<'a> {
    /// The key's owner; `None` (keyless or master key) is one scope of its own.
    Owner(Option<&'a str>),
    Global,
}

#[derive(Serialize)]
struct ChatKeyParts<'a> {
    v: u8,
    kind: &'static str,
    scope: Scope<'a>,
    model: &'a str,
    prompt: Option<&'a str>,
    messages: &'a [ChatMessage],
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    n: Option<u32>,
    stop: Option<&'a Stop>,
    tools: Option<&'a [Value]>,
    tool_choice: Option<&'a Value>,
    #[serde(serialize_with = "shaping_extra")]
    extra: &'a Map<String, Value>,
}

/// The pass-through fields, less [`IGNORED_EXTRA`], in the map's (sorted) order.
fn shaping_extra<S: Serializer>(extra: &&Map<String, Value>, s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(
        extra
            .iter()
            .filter(|(k, _)| !IGNORED_EXTRA.contains(&k.as_str())),
    )
}

/// The key of a chat request, sent to `upstream_model`, under `scope`; `prompt` is the
/// prompt's `id@version` (with its content hash if the caller has it) when one was used.
/// `None` only if the request cannot be serialized (it always can: it was parsed from
/// JSON); the caller then skips the cache.
pub fn chat_key(
    scope: Scope<'_>,
    upstream_model: &str,
    prompt: Option<&str>,
    req: &ChatRequest,
) -> Option<CacheKey> {
    hash(&ChatKeyParts {
        v: KEY_VERSION,
        kind: "chat",
        scope,
        model: upstream_model,
        prompt,
        messages: &req.messages,
        max_tokens: req.max_tokens,
        max_completion_tokens: req.max_completion_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        n: req.n,
        stop: req.stop.as_ref(),
        tools: req.tools.as_deref(),
        tool_choice: req.tool_choice.as_ref(),
        extra: &req.extra,
    })
}

/// Whether the same request would get the same answer: temperature 0, or a seed.
pub fn is_deterministic(req: &ChatRequest) -> bool {
    req.temperature == Some(0.0) || req.extra.get("seed").is_some_and(|s| !s.is_null())
}

/// One embedding input, as cached and as sent upstream.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub enum EmbeddingItem {
    Text(String),
    Tokens(Vec<u32>),
}

#[derive(Serialize)]
struct EmbeddingKeyParts<'a> {
    v: u8,
    kind: &'static str,
    scope: Scope<'a>,
    model: &'a str,
    /// `dimensions`, `encoding_format` and any other pass-through field.
    #[serde(serialize_with = "shaping_extra")]
    params: &'a Map<String, Value>,
    item: &'a EmbeddingItem,
}

/// The key of one embedding input item of `req`, sent to `upstream_model`.
pub fn embedding_key(
    scope: Scope<'_>,
    upstream_model: &str,
    req: &EmbeddingsRequest,
    item: &EmbeddingItem,
) -> Option<CacheKey> {
    hash(&EmbeddingKeyParts {
        v: KEY_VERSION,
        kind: "embedding",
        scope,
        model: upstream_model,
        params: &req.extra,
        item,
    })
}

/// The parameters of an embeddings request that must agree for two requests to share
/// one upstream call (model, `dimensions`, `encoding_format`, ...): the coalescing key.
pub fn embedding_params_key(upstream_model: &str, req: &EmbeddingsRequest) -> Option<CacheKey> {
    #[derive(Serialize)]
    struct Params<'a> {
        v: u8,
        kind: &'static str,
        model: &'a str,
        #[serde(serialize_with = "shaping_extra")]
        params: &'a Map<String, Value>,
    }
    hash(&Params {
        v: KEY_VERSION,
        kind: "embedding-params",
        model: upstream_model,
        params: &req.extra,
    })
}

/// Feeds serde_json's output to the hasher as it is written.
struct HashWriter(Xxh3);

impl io::Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn hash(parts: &impl Serialize) -> Option<CacheKey> {
    // serde_json writes a token at a time (a quote, a key, a colon); buffered, the
    // hasher takes them in a few large updates. The bytes hashed, so the key, are the
    // same either way.
    let mut w = io::BufWriter::with_capacity(1024, HashWriter(Xxh3::new()));
    serde_json::to_writer(&mut w, parts).ok()?;
    let w = w.into_inner().ok()?;
    Some(CacheKey(w.0.digest128()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_key_is_the_hash_of_the_whole_json_however_it_is_written() {
        // Longer than the write buffer, so it reaches the hasher in several updates.
        let parts = json!({
            "messages": [{"role": "user", "content": "é🙂 ".repeat(700)}],
            "n": 1,
        });
        let whole = serde_json::to_vec(&parts).unwrap();
        assert!(whole.len() > 4096);
        assert_eq!(
            hash(&parts),
            Some(CacheKey(xxhash_rust::xxh3::xxh3_128(&whole)))
        );
    }

    fn req(body: Value) -> ChatRequest {
        serde_json::from_value(body).unwrap()
    }

    fn base() -> Value {
        json!({
            "model": "alias",
            "messages": [{"role": "user", "content": "hi"}],
            "temperature": 0,
            "response_format": {"type": "json_object", "strict": true},
        })
    }

    fn key_of(body: Value) -> CacheKey {
        chat_key(
            Scope::Owner(Some("team-a")),
            "gpt-4o-mini",
            None,
            &req(body),
        )
        .unwrap()
    }

    fn with(field: &str, value: Value) -> Value {
        let mut b = base();
        b[field] = value;
        b
    }

    #[test]
    fn stream_user_and_extras_do_not_change_the_key() {
        let k = key_of(base());
        assert_eq!(k, key_of(with("stream", json!(true))));
        assert_eq!(
            k,
            key_of(with("stream_options", json!({"include_usage": true})))
        );
        assert_eq!(k, key_of(with("user", json!("someone"))));
        assert_eq!(k, key_of(with("sluice", json!({"feature": "search"}))));
        assert_eq!(k, key_of(with("metadata", json!({"trace": "1"}))));
        assert_eq!(k, key_of(with("model", json!("another-alias"))));
        assert_eq!(k, key_of(with("temperature", json!(0.0))));
    }

    #[test]
    fn everything_that_shapes_the_answer_changes_the_key() {
        let k = key_of(base());
        for (field, value) in [
            ("messages", json!([{"role": "user", "content": "hi!"}])),
            ("temperature", json!(0.5)),
            ("top_p", json!(0.9)),
            ("max_tokens", json!(10)),
            ("max_completion_tokens", json!(10)),
            ("seed", json!(1)),
            ("stop", json!(["\n"])),
            ("n", json!(2)),
            ("presence_penalty", json!(0.1)),
            ("frequency_penalty", json!(0.1)),
            ("logit_bias", json!({"50256": -100})),
            (
                "tools",
                json!([{"type": "function", "function": {"name": "f"}}]),
            ),
            ("tool_choice", json!("auto")),
            ("response_format", json!({"type": "text"})),
            ("some_future_field", json!(true)),
        ] {
            assert_ne!(k, key_of(with(field, value.clone())), "{field} = {value}");
        }
        let r = req(base());
        let owner = |o| chat_key(Scope::Owner(o), "gpt-4o-mini", None, &r).unwrap();
        assert_ne!(owner(Some("team-a")), owner(Some("team-b")));
        assert_ne!(owner(Some("team-a")), owner(None));
        assert_ne!(
            owner(None),
            chat_key(Scope::Global, "gpt-4o-mini", None, &r).unwrap()
        );
        assert_ne!(
            owner(Some("team-a")),
            chat_key(Scope::Owner(Some("team-a")), "gpt-4o", None, &r).unwrap()
        );
        assert_ne!(
            owner(Some("team-a")),
            chat_key(Scope::Owner(Some("team-a")), "gpt-4o-mini", Some("p@2"), &r).unwrap()
        );
    }

    #[test]
    fn key_order_does_not_matter() {
        let a: ChatRequest = serde_json::from_str(
            r#"{"model":"m","messages":[{"role":"user","content":"x","b":1,"a":2}],"seed":1,"logit_bias":{"2":1,"1":1}}"#,
        )
        .unwrap();
        let b: ChatRequest = serde_json::from_str(
            r#"{"logit_bias":{"1":1,"2":1},"seed":1,"messages":[{"a":2,"content":"x","b":1,"role":"user"}],"model":"m"}"#,
        )
        .unwrap();
        let k = |r| chat_key(Scope::Global, "m", None, r).unwrap();
        assert_eq!(k(&a), k(&b));
    }

    #[test]
    fn determinism_needs_temperature_zero_or_a_seed() {
        assert!(is_deterministic(&req(base())));
        assert!(!is_deterministic(&req(with("temperature", json!(0.7)))));
        let mut b = base();
        b.as_object_mut().unwrap().remove("temperature");
        assert!(!is_deterministic(&req(b.clone())));
        b["seed"] = json!(42);
        assert!(is_deterministic(&req(b)));
    }

    #[test]
    fn embedding_keys_cover_model_params_and_item() {
        let r: EmbeddingsRequest =
            serde_json::from_value(json!({"model": "e", "input": ["a", "b"], "user": "u"}))
                .unwrap();
        let r2: EmbeddingsRequest = serde_json::from_value(
            json!({"model": "e", "input": ["a"], "dimensions": 256, "encoding_format": "float"}),
        )
        .unwrap();
        let a = EmbeddingItem::Text("a".into());
        fn k(s: Scope<'_>, m: &str, r: &EmbeddingsRequest, i: &EmbeddingItem) -> CacheKey {
            embedding_key(s, m, r, i).unwrap()
        }
        let base = k(Scope::Global, "m", &r, &a);
        assert_eq!(
            base,
            k(Scope::Global, "m", &r, &EmbeddingItem::Text("a".into()))
        );
        assert_ne!(
            base,
            k(Scope::Global, "m", &r, &EmbeddingItem::Text("b".into()))
        );
        assert_ne!(
            base,
            k(Scope::Global, "m", &r, &EmbeddingItem::Tokens(vec![64]))
        );
        assert_ne!(base, k(Scope::Global, "m2", &r, &a));
        assert_ne!(base, k(Scope::Global, "m", &r2, &a));
        assert_ne!(base, k(Scope::Owner(None), "m", &r, &a));
        assert_ne!(
            embedding_params_key("m", &r).unwrap(),
            embedding_params_key("m", &r2).unwrap()
        );
    }
}
