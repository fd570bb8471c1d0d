//! Request coalescing for embeddings: concurrent requests for the same model and
//! parameters, arriving within `[cache] coalesce_window` of the first, go upstream as ONE
//! call of up to `coalesce_max_batch` inputs, and the answer is split back to each caller
//! in its own order.
//!
//! - The first request of a batch opens it and starts a task that sends it when the
//!   window closes, or at once when the batch is full; that task owns the call, so a
//!   caller that hangs up strands nobody. A request that would overflow the open batch
//!   sends that batch now and opens the next one; a request that alone fills a batch
//!   (or any request with coalescing off) goes upstream by itself.
//! - Usage: the upstream reports one `prompt_tokens` for the whole call. Each caller gets
//!   a share proportional to its inputs' estimated tokens
//!   ([`EmbeddingInput::estimated_tokens`]: exact for token arrays, four characters a
//!   token for text), rounded by largest remainder so the shares sum exactly to the
//!   upstream's figure ([`split_usage`]); `total_tokens` likewise. Nothing is billed twice
//!   and nothing is lost.
//! - A failed call fails every caller of the batch with the same error.

use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry as MapEntry;
use serde_json::Value;
use tokio::sync::{Notify, oneshot};

use super::embeddings::{input_of, items, ordered};
use super::key::EmbeddingItem;
use crate::telemetry::Metrics;
use crate::wire::{EmbeddingInput, EmbeddingsResponse, EmbeddingsUsage};

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CoalesceError<E> {
    /// The upstream call failed (every caller of the batch gets it).
    #[error(transparent)]
    Upstream(E),
    /// The upstream answered something that cannot be split back.
    #[error("the upstream answer to a batched embeddings call is unusable: {0}")]
    BadAnswer(String),
    /// The batch's task ended without an answer (it panicked).
    #[error("the batched embeddings call was lost")]
    Lost,
}

/// Open batches by key, and whether they hold token lists.
type OpenBatches<K, E> = DashMap<(K, bool), Arc<Pending<E>>>;

type Reply<E> = oneshot::Sender<Result<EmbeddingsResponse, CoalesceError<E>>>;

struct Part<E> {
    len: usize,
    weight: u64,
    reply: Reply<E>,
}

struct Batch<E> {
    items: Vec<EmbeddingItem>,
    parts: Vec<Part<E>>,
}

struct Pending<E> {
    /// `None` once the task took the batch to send it.
    batch: Mutex<Option<Batch<E>>>,
    full: Notify,
}

/// Batches concurrent embeddings requests by key `K` (the model and parameters that must
/// agree, e.g. [`embedding_params_key`](super::key::embedding_params_key)).
pub struct Coalescer<K, E> {
    window: Duration,
    max_batch: usize,
    /// Open batches by key, and whether they hold token lists (texts and token lists
    /// cannot share a request).
    open: Arc<OpenBatches<K, E>>,
    metrics: Option<Arc<Metrics>>,
}

impl<K, E> Coalescer<K, E>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    E: Clone + Send + 'static,
{
    /// `window` zero turns coalescing off; `max_batch` is at least 1.
    pub fn new(window: Duration, max_batch: usize, metrics: Option<Arc<Metrics>>) -> Self {
        Self {
            window,
            max_batch: max_batch.max(1),
            open: Arc::new(DashMap::new()),
            metrics,
        }
    }

    /// Embed `input` for a request with batching key `key`. `send` makes the upstream
    /// call for a whole batch; it is used only if this request opens the batch (it then
    /// runs in a spawned task, so it must own what it needs).
    pub async fn submit<F, Fut>(
        &self,
        key: K,
        input: EmbeddingInput,
        send: F,
    ) -> Result<EmbeddingsResponse, CoalesceError<E>>
    where
        F: FnOnce(EmbeddingInput) -> Fut + Send + 'static,
        Fut: Future<Output = Result<EmbeddingsResponse, E>> + Send + 'static,
    {
        let mine = items(&input);
        let n = mine.len();
        if self.window.is_zero() || n == 0 || n >= self.max_batch {
            return send(input).await.map_err(CoalesceError::Upstream);
        }
        let tokens = matches!(mine.first(), Some(EmbeddingItem::Tokens(_)));
        let weight = input.estimated_tokens().max(1);
        let (reply, rx) = oneshot::channel();
        let part = Part {
            len: n,
            weight,
            reply,
        };
        let map_key = (key, tokens);
        match self.open.entry(map_key.clone()) {
            MapEntry::Occupied(mut e) => {
                let pending = e.get().clone();
                let mut slot = pending.batch.lock().unwrap_or_else(PoisonError::into_inner);
                match slot.as_mut() {
                    Some(batch) if batch.items.len() + n <= self.max_batch => {
                        batch.items.extend(mine);
                        batch.parts.push(part);
                        if batch.items.len() == self.max_batch {
                            // Full: send now; later requests open a new batch.
                            drop(slot);
                            e.remove();
                            pending.full.notify_one();
                        }
                    }
                    _ => {
                        // No room (or already being sent): send that one now and open
                        // the next batch in its place.
                        drop(slot);
                        pending.full.notify_one();
                        e.insert(self.open_batch(map_key, mine, part, send));
                    }
                }
            }
            MapEntry::Vacant(v) => {
                v.insert(self.open_batch(map_key, mine, part, send));
            }
        }
        rx.await.unwrap_or(Err(CoalesceError::Lost))
    }

    fn open_batch<F, Fut>(
        &self,
        map_key: (K, bool),
        items: Vec<EmbeddingItem>,
        first: Part<E>,
        send: F,
    ) -> Arc<Pending<E>>
    where
        F: FnOnce(EmbeddingInput) -> Fut + Send + 'static,
        Fut: Future<Output = Result<EmbeddingsResponse, E>> + Send + 'static,
    {
        let pending = Arc::new(Pending {
            batch: Mutex::new(Some(Batch {
                items,
                parts: vec![first],
            })),
            full: Notify::new(),
        });
        let task_pending = pending.clone();
        let open = self.open.clone();
        let window = self.window;
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let pending = task_pending;
            tokio::select! {
                () = tokio::time::sleep(window) => {}
                () = pending.full.notified() => {}
            }
            open.remove_if(&map_key, |_, p| Arc::ptr_eq(p, &pending));
            let taken = pending
                .batch
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            let Some(batch) = taken else { return };
            if let Some(m) = &metrics {
                m.embedding_batch(batch.parts.len() as u64, batch.items.len() as u64);
            }
            let total = batch.items.len();
            let Some(input) = input_of(batch.items) else {
                return; // unreachable: batches are keyed by kind and never empty
            };
            let result = send(input).await;
            deliver(result, total, batch.parts);
        });
        pending
    }
}

/// Split one upstream answer back to the callers of a batch, in order.
fn deliver<E: Clone>(result: Result<EmbeddingsResponse, E>, total: usize, parts: Vec<Part<E>>) {
    let response = match result {
        Ok(r) => r,
        Err(e) => {
            for p in parts {
                let _ = p.reply.send(Err(CoalesceError::Upstream(e.clone())));
            }
            return;
        }
    };
    if response.data.len() != total {
        let message = format!("{} embeddings for {total} inputs", response.data.len());
        for p in parts {
            let _ = p.reply.send(Err(CoalesceError::BadAnswer(message.clone())));
        }
        return;
    }
    let usage = response.usage.unwrap_or_default();
    let weights: Vec<u64> = parts.iter().map(|p| p.weight).collect();
    let prompt = split_usage(usage.prompt_tokens, &weights);
    let totals = split_usage(usage.total_tokens, &weights);
    let mut data = ordered(response.data).into_iter();
    for (i, p) in parts.into_iter().enumerate() {
        let mine: Vec<Value> = data
            .by_ref()
            .take(p.len)
            .enumerate()
            .map(|(j, mut item)| {
                if let Some(o) = item.as_object_mut() {
                    o.insert("index".into(), Value::from(j));
                }
                item
            })
            .collect();
        let share = EmbeddingsUsage {
            prompt_tokens: prompt.get(i).copied().unwrap_or(0),
            total_tokens: totals.get(i).copied().unwrap_or(0),
        };
        // A caller that went away does not matter to the others.
        let _ = p.reply.send(Ok(EmbeddingsResponse {
            object: response.object.clone(),
            data: mine,
            model: response.model.clone(),
            usage: response.usage.map(|_| share),
            extra: response.extra.clone(),
        }));
    }
}

/// `total` split in proportion to `weights`, by largest remainder: the shares sum to
/// `total` exactly (all weights zero: equal shares).
pub fn split_usage(total: u32, weights: &[u64]) -> Vec<u32> {
    if weights.is_empty() {
        return Vec::new();
    }
    let sum: u128 = weights.iter().map(|&w| u128::from(w)).sum();
    let (weights, sum): (Vec<u128>, u128) = if sum == 0 {
        (vec![1; weights.len()], weights.len() as u128)
    } else {
        (weights.iter().map(|&w| u128::from(w)).collect(), sum)
    };
    let total = u128::from(total);
    let mut shares: Vec<u128> = weights.iter().map(|w| total * w / sum).collect();
    let mut by_remainder: Vec<usize> = (0..weights.len()).collect();
    by_remainder.sort_by_key(|&i| std::cmp::Reverse(total * weights[i] % sum));
    let given: u128 = shares.iter().sum();
    for &i in by_remainder.iter().take((total - given) as usize) {
        shares[i] += 1;
    }
    shares
        .into_iter()
        .map(|s| u32::try_from(s).unwrap_or(u32::MAX))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Map, json};
    use std::sync::atomic::{AtomicUsize, Ordering};

    type Calls = Arc<Mutex<Vec<usize>>>;

    /// A fake upstream that records each call's size; one token per input.
    fn upstream(
        calls: Calls,
    ) -> impl FnOnce(
        EmbeddingInput,
    ) -> std::pin::Pin<
        Box<dyn Future<Output = Result<EmbeddingsResponse, String>> + Send>,
    > + Send
    + 'static {
        move |input| {
            Box::pin(async move {
                let texts: Vec<String> = match input {
                    EmbeddingInput::Texts(t) => t,
                    other => panic!("{other:?}"),
                };
                calls.lock().unwrap().push(texts.len());
                Ok(EmbeddingsResponse {
                    object: "list".into(),
                    data: texts
                        .iter()
                        .enumerate()
                        .map(|(i, t)| json!({"object": "embedding", "index": i, "embedding": [t.len()]}))
                        .collect(),
                    model: "emb".into(),
                    usage: Some(EmbeddingsUsage {
                        prompt_tokens: 10 * texts.len() as u32,
                        total_tokens: 10 * texts.len() as u32,
                    }),
                    extra: Map::new(),
                })
            })
        }
    }

    fn one(text: &str) -> EmbeddingInput {
        EmbeddingInput::Texts(vec![text.to_string()])
    }

    #[tokio::test(start_paused = true)]
    async fn callers_within_the_window_share_one_call() {
        let c = Arc::new(Coalescer::<u8, String>::new(
            Duration::from_millis(2),
            256,
            None,
        ));
        let calls: Calls = Arc::default();
        let mut tasks = Vec::new();
        for i in 0..5 {
            let (c, calls) = (c.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                let text = "x".repeat(i + 1);
                c.submit(1, one(&text), upstream(calls)).await
            }));
        }
        let mut shares = Vec::new();
        for (i, t) in tasks.into_iter().enumerate() {
            let r = t.await.unwrap().unwrap();
            assert_eq!(
                r.data,
                [json!({"object": "embedding", "index": 0, "embedding": [i + 1]})]
            );
            shares.push(r.usage.unwrap().prompt_tokens);
        }
        // 50 tokens upstream, split by estimated tokens (1, 1, 1, 1, 2).
        assert_eq!(shares, [9, 8, 8, 8, 17]);
        assert_eq!(*calls.lock().unwrap(), [5]);

        // After the window: a call of its own.
        tokio::time::sleep(Duration::from_millis(10)).await;
        c.submit(1, one("late"), upstream(calls.clone()))
            .await
            .unwrap();
        assert_eq!(*calls.lock().unwrap(), [5, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn batches_respect_the_size_cap_and_keys() {
        let c = Arc::new(Coalescer::<u8, String>::new(
            Duration::from_millis(2),
            4,
            None,
        ));
        let calls: Calls = Arc::default();
        let mut tasks = Vec::new();
        for i in 0..10 {
            let (c, calls) = (c.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                let r = c
                    .submit(1, one(&"y".repeat(i + 1)), upstream(calls))
                    .await
                    .unwrap();
                assert_eq!(r.data[0]["embedding"], json!([i + 1]));
            }));
        }
        // Another key never joins these batches; a request as big as a batch goes alone.
        let other = c.submit(2, one("z"), upstream(calls.clone()));
        let big = c.submit(
            1,
            EmbeddingInput::Texts(vec!["a".into(), "b".into(), "c".into(), "d".into()]),
            upstream(calls.clone()),
        );
        let (other, big) = tokio::join!(other, big);
        assert_eq!(other.unwrap().data.len(), 1);
        let big = big.unwrap();
        assert_eq!(big.data.len(), 4);
        assert_eq!(big.data[3]["index"], 3);
        for t in tasks {
            t.await.unwrap();
        }
        let mut sizes = calls.lock().unwrap().clone();
        sizes.sort_unstable();
        assert_eq!(sizes, [1, 2, 4, 4, 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_batch_fails_every_caller() {
        let c = Arc::new(Coalescer::<u8, String>::new(
            Duration::from_millis(2),
            256,
            None,
        ));
        let attempts = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..3 {
            let (c, attempts) = (c.clone(), attempts.clone());
            tasks.push(tokio::spawn(async move {
                c.submit(1, one("a"), move |_| async move {
                    attempts.fetch_add(1, Ordering::SeqCst);
                    Err::<EmbeddingsResponse, _>("503".to_string())
                })
                .await
            }));
        }
        for t in tasks {
            assert_eq!(
                t.await.unwrap().unwrap_err(),
                CoalesceError::Upstream("503".into())
            );
        }
        assert_eq!(attempts.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_window_of_zero_sends_each_request_alone() {
        let c = Coalescer::<u8, String>::new(Duration::ZERO, 256, None);
        let calls: Calls = Arc::default();
        let (a, b) = tokio::join!(
            c.submit(1, one("a"), upstream(calls.clone())),
            c.submit(1, one("b"), upstream(calls.clone()))
        );
        assert!(a.is_ok() && b.is_ok());
        assert_eq!(*calls.lock().unwrap(), [1, 1]);
    }

    #[test]
    fn usage_splits_exactly_in_proportion() {
        assert_eq!(split_usage(10, &[1, 1, 1]), [4, 3, 3]);
        assert_eq!(split_usage(100, &[1, 3]), [25, 75]);
        assert_eq!(split_usage(7, &[0, 0]), [4, 3]);
        assert_eq!(split_usage(0, &[5, 5]), [0, 0]);
        let s = split_usage(1001, &[3, 7, 11, 13]);
        assert_eq!(s.iter().sum::<u32>(), 1001);
        assert!(split_usage(5, &[]).is_empty());
    }
}
