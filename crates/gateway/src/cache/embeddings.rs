//! The per-item embedding cache: an array request where some items are cached sends only
//! the misses upstream, and the answer is merged back in the client's order.
//!
//! Use: [`EmbeddingPlan::lookup`] (or [`EmbeddingPlan::new`] with vectors found
//! elsewhere), then, unless [`EmbeddingPlan::upstream_request`] is `None` (everything was
//! cached), send that request upstream and hand its answer to [`EmbeddingPlan::merge`],
//! then store [`Merged::to_store`] with [`ResponseCache::put_vectors`]. The merged answer's
//! `usage` is the upstream call's alone (zero when every item was cached): usage counts
//! only what went upstream.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::key::{CacheKey, EmbeddingItem, Scope, embedding_key};
use super::store::{ResponseCache, VectorLookup};
use crate::wire::{EmbeddingInput, EmbeddingsRequest, EmbeddingsResponse, EmbeddingsUsage};

/// The items of an input, in order.
pub fn items(input: &EmbeddingInput) -> Vec<EmbeddingItem> {
    match input {
        EmbeddingInput::Text(t) => vec![EmbeddingItem::Text(t.clone())],
        EmbeddingInput::Texts(v) => v.iter().cloned().map(EmbeddingItem::Text).collect(),
        EmbeddingInput::Tokens(t) => vec![EmbeddingItem::Tokens(t.clone())],
        EmbeddingInput::TokenLists(v) => v.iter().cloned().map(EmbeddingItem::Tokens).collect(),
    }
}

/// Items as one input list: `None` when empty or when texts and token lists are mixed
/// (they cannot share a request).
pub fn input_of(items: Vec<EmbeddingItem>) -> Option<EmbeddingInput> {
    match items.first()? {
        EmbeddingItem::Text(_) => items
            .into_iter()
            .map(|i| match i {
                EmbeddingItem::Text(t) => Some(t),
                EmbeddingItem::Tokens(_) => None,
            })
            .collect::<Option<Vec<_>>>()
            .map(EmbeddingInput::Texts),
        EmbeddingItem::Tokens(_) => items
            .into_iter()
            .map(|i| match i {
                EmbeddingItem::Tokens(t) => Some(t),
                EmbeddingItem::Text(_) => None,
            })
            .collect::<Option<Vec<_>>>()
            .map(EmbeddingInput::TokenLists),
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MergeError {
    #[error("the upstream returned {got} embeddings for {sent} inputs")]
    CountMismatch { sent: usize, got: usize },
    #[error("the upstream answer has no `embedding` for input {0}")]
    MissingEmbedding(usize),
    #[error("items were not cached but no upstream answer was given")]
    NoUpstreamAnswer,
}

/// Which items of one request are cached, and which must go upstream.
#[derive(Debug, Clone)]
pub struct EmbeddingPlan {
    items: Vec<EmbeddingItem>,
    /// `None` when an item could not be keyed (it is then never cached).
    keys: Vec<Option<CacheKey>>,
    cached: Vec<Option<Arc<Value>>>,
}

/// A request's items, their keys and the vectors fetched for them, not yet counted.
#[derive(Debug)]
pub struct FetchedItems {
    items: Vec<EmbeddingItem>,
    keys: Vec<Option<CacheKey>>,
    found: VectorLookup,
}

/// A merged answer, and the new vectors to store.
#[derive(Debug, Clone)]
pub struct Merged {
    pub response: EmbeddingsResponse,
    pub to_store: Vec<(CacheKey, Value)>,
    /// Items served from the cache.
    pub cached_items: usize,
}

impl EmbeddingPlan {
    /// Look every item of `req` up in `cache` (one Redis round trip at most).
    pub async fn lookup(
        cache: &ResponseCache,
        scope: Scope<'_>,
        upstream_model: &str,
        req: &EmbeddingsRequest,
    ) -> EmbeddingPlan {
        let fetched = Self::fetch(cache, scope, upstream_model, req).await;
        Self::take(cache, fetched)
    }

    /// [`lookup`](Self::lookup) in two halves, for a lookup sent with the request's
    /// limit and budget checks: `fetch` counts nothing ([`ResponseCache::lookup_vectors`]),
    /// [`take`](Self::take) counts the hits and misses and makes the plan.
    pub async fn fetch(
        cache: &ResponseCache,
        scope: Scope<'_>,
        upstream_model: &str,
        req: &EmbeddingsRequest,
    ) -> FetchedItems {
        let items = items(&req.input);
        let keys: Vec<Option<CacheKey>> = items
            .iter()
            .map(|i| embedding_key(scope, upstream_model, req, i))
            .collect();
        let keyed: Vec<CacheKey> = keys.iter().flatten().copied().collect();
        let found = cache.lookup_vectors(&keyed).await;
        FetchedItems { items, keys, found }
    }

    /// The plan from a [`fetch`](Self::fetch) the request goes ahead with.
    pub fn take(cache: &ResponseCache, fetched: FetchedItems) -> EmbeddingPlan {
        let FetchedItems { items, keys, found } = fetched;
        let mut found = cache.take_vectors(found).into_iter();
        let cached = keys
            .iter()
            .map(|k| k.and_then(|_| found.next().flatten()))
            .collect();
        EmbeddingPlan {
            items,
            keys,
            cached,
        }
    }

    /// A plan from vectors found elsewhere (`cached[i]` for item `i`).
    pub fn new(
        items: Vec<EmbeddingItem>,
        keys: Vec<Option<CacheKey>>,
        cached: Vec<Option<Arc<Value>>>,
    ) -> EmbeddingPlan {
        EmbeddingPlan {
            items,
            keys,
            cached,
        }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Indexes of the items that must go upstream, in order.
    pub fn misses(&self) -> Vec<usize> {
        (0..self.items.len())
            .filter(|&i| self.cached[i].is_none())
            .collect()
    }

    pub fn all_cached(&self) -> bool {
        self.cached.iter().all(Option::is_some)
    }

    /// The request for the misses only; `None` when every item was cached. With no hit
    /// at all it is the client's request unchanged.
    pub fn upstream_request(&self, req: &EmbeddingsRequest) -> Option<EmbeddingsRequest> {
        let misses = self.misses();
        if misses.is_empty() {
            return None;
        }
        if misses.len() == self.items.len() {
            return Some(req.clone());
        }
        let input = input_of(misses.iter().map(|&i| self.items[i].clone()).collect())?;
        Some(EmbeddingsRequest {
            input,
            ..req.clone()
        })
    }

    /// The answer in the client's order: cached vectors and the upstream's (which
    /// answered [`Self::misses`], in that order), indexes renumbered from 0. `model` names
    /// the model when nothing went upstream.
    pub fn merge(
        self,
        upstream: Option<EmbeddingsResponse>,
        model: &str,
    ) -> Result<Merged, MergeError> {
        let misses = self.misses();
        let cached_items = self.items.len() - misses.len();
        let (mut fresh, model, usage, extra) = match upstream {
            None if misses.is_empty() => (
                Vec::new(),
                model.to_string(),
                EmbeddingsUsage::default(),
                Map::new(),
            ),
            None => return Err(MergeError::NoUpstreamAnswer),
            Some(r) => (
                ordered(r.data),
                r.model,
                r.usage.unwrap_or_default(),
                r.extra,
            ),
        };
        if fresh.len() != misses.len() {
            return Err(MergeError::CountMismatch {
                sent: misses.len(),
                got: fresh.len(),
            });
        }
        let mut to_store = Vec::with_capacity(misses.len());
        let mut fresh_iter = fresh.drain(..);
        let mut data = Vec::with_capacity(self.items.len());
        for (i, cached) in self.cached.into_iter().enumerate() {
            let item = match cached {
                Some(vector) => {
                    let mut o = Map::new();
                    o.insert("object".into(), Value::from("embedding"));
                    o.insert("index".into(), Value::from(i));
                    o.insert("embedding".into(), Value::clone(&vector));
                    Value::Object(o)
                }
                None => {
                    let mut item = fresh_iter.next().ok_or(MergeError::CountMismatch {
                        sent: misses.len(),
                        got: i,
                    })?;
                    let vector = item
                        .get("embedding")
                        .cloned()
                        .ok_or(MergeError::MissingEmbedding(i))?;
                    if let Some(k) = self.keys[i] {
                        to_store.push((k, vector));
                    }
                    if let Some(o) = item.as_object_mut() {
                        o.insert("index".into(), Value::from(i));
                    }
                    item
                }
            };
            data.push(item);
        }
        Ok(Merged {
            response: EmbeddingsResponse {
                object: "list".into(),
                data,
                model,
                usage: Some(usage),
                extra,
            },
            to_store,
            cached_items,
        })
    }
}

/// Upstream items sorted by their `index` (position when absent; stable).
pub(crate) fn ordered(mut data: Vec<Value>) -> Vec<Value> {
    let index = |v: &Value| v.get("index").and_then(Value::as_u64);
    if data.iter().all(|v| index(v).is_some()) {
        data.sort_by_key(|v| index(v).unwrap_or(u64::MAX));
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    /// A deterministic fake upstream: each text's vector depends only on the text.
    fn upstream(req: &EmbeddingsRequest) -> EmbeddingsResponse {
        let texts: Vec<String> = items(&req.input)
            .into_iter()
            .map(|i| match i {
                EmbeddingItem::Text(t) => t,
                EmbeddingItem::Tokens(t) => format!("{t:?}"),
            })
            .collect();
        EmbeddingsResponse {
            object: "list".into(),
            // Out of order on purpose: merge must sort by `index`.
            data: texts
                .iter()
                .enumerate()
                .rev()
                .map(|(i, t)| json!({"object": "embedding", "index": i, "embedding": [t.len() as f64, t.as_bytes()[0] as f64]}))
                .collect(),
            model: "text-embedding-3-small".into(),
            usage: Some(EmbeddingsUsage {
                prompt_tokens: texts.len() as u32,
                total_tokens: texts.len() as u32,
            }),
            extra: Map::new(),
        }
    }

    fn request(n: usize) -> EmbeddingsRequest {
        let input: Vec<String> = (0..n)
            .map(|i| format!("item number {i}{}", "!".repeat(i)))
            .collect();
        serde_json::from_value(json!({"model": "emb", "input": input, "dimensions": 2})).unwrap()
    }

    #[tokio::test]
    async fn ten_items_seven_cached_send_three_and_merge_in_order() {
        let cache = ResponseCache::memory_only(1 << 20);
        let req = request(10);
        let scope = Scope::Owner(Some("team"));
        let uncached = upstream(&req);
        let mut expected = ordered(uncached.data.clone());
        for (i, v) in expected.iter_mut().enumerate() {
            v["index"] = json!(i);
        }
        // Cache 7 of the 10 items (all but 1, 4, 8) from the uncached answer.
        let all = items(&req.input);
        let seed: Vec<(CacheKey, Value)> = (0..10)
            .filter(|i| ![1, 4, 8].contains(i))
            .map(|i| {
                let k = embedding_key(scope, "up", &req, &all[i]).unwrap();
                (k, expected[i]["embedding"].clone())
            })
            .collect();
        cache.put_vectors(seed, Duration::from_secs(60)).await;

        let plan = EmbeddingPlan::lookup(&cache, scope, "up", &req).await;
        assert_eq!(plan.misses(), [1, 4, 8]);
        let sent = plan.upstream_request(&req).unwrap();
        assert_eq!(sent.input.len(), 3);
        assert_eq!(
            sent.input,
            EmbeddingInput::Texts(vec![
                "item number 1!".into(),
                "item number 4!!!!".into(),
                "item number 8!!!!!!!!".into()
            ])
        );
        assert_eq!(sent.extra["dimensions"], 2);
        let merged = plan.merge(Some(upstream(&sent)), "emb").unwrap();
        assert_eq!(merged.response.data, expected);
        assert_eq!(merged.cached_items, 7);
        assert_eq!(merged.response.usage.unwrap().prompt_tokens, 3);
        assert_eq!(merged.to_store.len(), 3);
        cache
            .put_vectors(merged.to_store, Duration::from_secs(60))
            .await;

        // Now everything is cached: nothing goes upstream, usage is zero.
        let plan = EmbeddingPlan::lookup(&cache, scope, "up", &req).await;
        assert!(plan.all_cached() && plan.upstream_request(&req).is_none());
        let merged = plan.merge(None, "emb").unwrap();
        assert_eq!(merged.response.data, expected);
        assert_eq!(merged.response.usage, Some(EmbeddingsUsage::default()));
        assert_eq!(merged.response.model, "emb");
    }

    #[tokio::test]
    async fn nothing_cached_sends_the_request_unchanged() {
        let cache = ResponseCache::memory_only(1 << 20);
        let req: EmbeddingsRequest =
            serde_json::from_value(json!({"model": "emb", "input": "one text"})).unwrap();
        let plan = EmbeddingPlan::lookup(&cache, Scope::Global, "up", &req).await;
        let sent = plan.upstream_request(&req).unwrap();
        assert_eq!(sent.input, EmbeddingInput::Text("one text".into()));
        let merged = plan.merge(Some(upstream(&sent)), "emb").unwrap();
        assert_eq!(merged.response.data.len(), 1);
        assert_eq!(merged.response.data[0]["index"], 0);
    }

    #[test]
    fn a_short_upstream_answer_is_an_error() {
        let plan = EmbeddingPlan::new(
            vec![
                EmbeddingItem::Text("a".into()),
                EmbeddingItem::Text("b".into()),
            ],
            vec![None, None],
            vec![None, None],
        );
        let mut short =
            upstream(&serde_json::from_value(json!({"model": "m", "input": ["a"]})).unwrap());
        assert_eq!(
            plan.clone().merge(Some(short.clone()), "m").unwrap_err(),
            MergeError::CountMismatch { sent: 2, got: 1 }
        );
        assert_eq!(
            plan.clone().merge(None, "m").unwrap_err(),
            MergeError::NoUpstreamAnswer
        );
        short.data.push(json!({"index": 1}));
        assert_eq!(
            plan.merge(Some(short), "m").unwrap_err(),
            MergeError::MissingEmbedding(1)
        );
    }

    #[test]
    fn inputs_split_and_join() {
        let tokens = EmbeddingInput::TokenLists(vec![vec![1, 2], vec![3]]);
        assert_eq!(input_of(items(&tokens)), Some(tokens));
        assert_eq!(input_of(Vec::new()), None);
        assert_eq!(
            input_of(vec![
                EmbeddingItem::Text("a".into()),
                EmbeddingItem::Tokens(vec![1])
            ]),
            None
        );
    }
}
