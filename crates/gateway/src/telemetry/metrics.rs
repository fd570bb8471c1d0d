//! Prometheus metrics, fed from request records by the recorder task (so `/metrics`
//! and the request log always count the same requests). Labels are a small fixed set:
//! endpoint, model, provider, feature, outcome. Never end users (cardinality): per-user
//! figures come from the store.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use metrics::{
    Counter, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge,
    histogram,
};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use tokio::time::Instant;

use super::{Outcome, RecordBatch, RecordSink, Recorder, RequestRecord};

/// Latency buckets, 1 ms to 120 s.
const BUCKETS: [f64; 17] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
    120.0,
];

/// Longest label value kept; longer ones (client-chosen features) are cut.
const MAX_LABEL: usize = 64;

/// This gateway's metrics registry. Each gateway has its own (not the process-global
/// one), so several gateways in one test process never mix their figures.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// Upkeeps run (see [`Metrics::upkeep`]).
    upkeeps: AtomicU64,
    series: Mutex<SeriesCache>,
    /// Handles of the cache tiers' counters, whose labels are all fixed strings, by name
    /// and labels: a `counter!` call costs ~2k instructions, a lookup here a tenth.
    fixed: Mutex<foldhash::HashMap<FixedKey, Counter>>,
    cache_memory: OnceLock<metrics::Gauge>,
}

/// A counter's name and up to three `&'static str` label values.
type FixedKey = (&'static str, [&'static str; 3]);

/// Handles of the metrics every finished request updates, by the kind of request. A
/// `counter!` or `histogram!` call builds a labelled key and looks it up in the registry
/// each time: at a dozen a request that was about 6% of the gateway's instructions
/// (callgrind, full-feature bench config). A handle is the registry's own atomic.
#[derive(Default)]
struct Series {
    requests: OnceLock<Counter>,
    duration: OnceLock<Histogram>,
    ttft: OnceLock<Histogram>,
    overhead: OnceLock<Histogram>,
    upstream: OnceLock<Histogram>,
    prompt_tokens: OnceLock<Counter>,
    completion_tokens: OnceLock<Counter>,
    cost: OnceLock<Counter>,
    /// By status: hit, partial, miss.
    cache: [OnceLock<Counter>; 3],
    /// The common output checks: pass, fail:flag.
    output_checks: [OnceLock<Counter>; 2],
}

#[derive(Default)]
struct SeriesCache {
    /// Scratch for the lookup key, kept to save an allocation per request.
    key: Vec<u8>,
    map: foldhash::HashMap<Vec<u8>, Arc<Series>>,
}

/// Kinds of request whose handles are kept (see [`Series`]).
const MAX_CACHED_SERIES: usize = 4096;

impl Metrics {
    pub fn new() -> anyhow::Result<Arc<Self>> {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &BUCKETS)?
            .build_recorder();
        let handle = recorder.handle();
        let metrics = Self {
            recorder,
            handle,
            upkeeps: AtomicU64::new(0),
            series: Mutex::default(),
            fixed: Mutex::default(),
            cache_memory: OnceLock::new(),
        };
        metrics.with(describe);
        Ok(Arc::new(metrics))
    }

    /// Drain histogram samples into their buckets (see [`UPKEEP_EVERY`]).
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
        self.upkeeps.fetch_add(1, Ordering::Relaxed);
    }

    fn with<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(&self.recorder, f)
    }

    /// Count one finished request.
    pub fn observe(&self, r: &RequestRecord) {
        let endpoint = r.endpoint.as_str();
        let outcome = r.outcome().as_str();
        // The model that answered, or the configured one; never a client's unknown name.
        let (model, feature) = (r.model.as_deref(), r.feature.as_deref());
        // Labels the upstream time, which every request with one records.
        let provider = r.upstream_ms.map(|_| r.provider.as_deref().unwrap_or(""));
        let series = self.series(endpoint, model, feature, outcome, provider);
        self.with(|| {
            let model = || label(model.unwrap_or(""));
            let feature = || label(feature.unwrap_or(""));
            series.requests.get_or_init(|| counter!("sluice_requests_total", "endpoint" => endpoint, "model" => model(), "feature" => feature(), "outcome" => outcome)).increment(1);
            series.duration.get_or_init(|| histogram!("sluice_request_duration_seconds", "endpoint" => endpoint, "model" => model(), "outcome" => outcome))
                .record(r.latency_ms / 1000.0);
            if let Some(ttft) = r.ttft_ms {
                series.ttft.get_or_init(|| histogram!("sluice_time_to_first_token_seconds", "model" => model())).record(ttft / 1000.0);
            }
            if let Some(overhead) = r.overhead_ms {
                series.overhead.get_or_init(|| histogram!("sluice_gateway_overhead_seconds", "endpoint" => endpoint)).record(overhead / 1000.0);
            }
            if let (Some(upstream), Some(provider)) = (r.upstream_ms, provider) {
                series.upstream.get_or_init(|| histogram!("sluice_upstream_duration_seconds", "provider" => label(provider), "model" => model())).record(upstream / 1000.0);
            }
            if r.prompt_tokens > 0 {
                series.prompt_tokens.get_or_init(|| counter!("sluice_tokens_total", "model" => model(), "feature" => feature(), "kind" => "prompt"))
                    .increment(u64::from(r.prompt_tokens));
            }
            if r.completion_tokens > 0 {
                series.completion_tokens.get_or_init(|| counter!("sluice_tokens_total", "model" => model(), "feature" => feature(), "kind" => "completion"))
                    .increment(u64::from(r.completion_tokens));
            }
            if let Some(cost) = r.cost_micros.filter(|c| *c > 0) {
                series.cost.get_or_init(|| counter!("sluice_cost_usd_micros_total", "model" => model(), "feature" => feature()))
                    .increment(cost.unsigned_abs());
            }
            if r.retries > 0 {
                counter!("sluice_retries_total", "model" => model()).increment(u64::from(r.retries));
            }
            if let Some(f) = r.fallback {
                counter!("sluice_fallbacks_total", "model" => model(), "kind" => f.as_str()).increment(1);
            }
            if let Some(saved) = r.cost_saved_nanos.filter(|c| *c > 0) {
                counter!("sluice_cost_saved_usd_micros_total", "model" => model(), "feature" => feature())
                    .increment(saved.unsigned_abs() / 1000);
            }
            if let Some(status) = r.cache_status.as_deref() {
                // A request answered by an identical one in flight was saved like a hit.
                let (i, status) = match status {
                    "hit" | "coalesced" => (0, "hit"),
                    "partial" => (1, "partial"),
                    _ => (2, "miss"),
                };
                series.cache[i].get_or_init(|| counter!("sluice_cache_requests_total", "model" => model(), "status" => status)).increment(1);
            }
            if r.outcome() == Outcome::RateLimited {
                counter!("sluice_rate_limited_total", "endpoint" => endpoint).increment(1);
            }
            for flag in r.guard_flags.iter().flat_map(|f| f.split(',')) {
                counter!("sluice_guard_flags_total", "flag" => flag.to_string()).increment(1);
            }
            for change in r.guard_changes.iter().flat_map(|c| c.split(',')) {
                counter!("sluice_guard_changes_total", "change" => change.to_string()).increment(1);
            }
            if let Some(check) = r.output_check.as_deref() {
                let (result, action) = check.split_once(':').unwrap_or((check, ""));
                let checks = |i: usize| {
                    series.output_checks[i].get_or_init(|| counter!("sluice_output_checks_total", "model" => model(), "result" => result.to_string(), "action" => action.to_string()))
                };
                match check {
                    "pass" => checks(0).increment(1),
                    "fail:flag" => checks(1).increment(1),
                    _ => counter!("sluice_output_checks_total", "model" => model(), "result" => result.to_string(), "action" => action.to_string()).increment(1),
                }
            }
            if r.regeneration_of.is_some() {
                counter!("sluice_regenerations_total", "model" => model(), "feature" => feature()).increment(1);
            }
        });
    }

    /// The handles of one kind of request (its endpoint, model, feature, outcome and
    /// provider), made on first use.
    fn series(
        &self,
        endpoint: &str,
        model: Option<&str>,
        feature: Option<&str>,
        outcome: &str,
        provider: Option<&str>,
    ) -> Arc<Series> {
        let mut cache = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let SeriesCache { key, map } = &mut *cache;
        key.clear();
        // Each part after its length, so no two kinds of request share a key whatever
        // their values hold; `None` and `Some("")` label alike and may share one.
        for part in [Some(endpoint), model, feature, Some(outcome), provider] {
            let part = part.unwrap_or("");
            key.extend_from_slice(&part.len().to_le_bytes());
            key.extend_from_slice(part.as_bytes());
        }
        if let Some(s) = map.get(key.as_slice()) {
            return s.clone();
        }
        // A bound on the handles kept: past it they start afresh (the registry keeps
        // every series; only its handles are looked up again).
        if map.len() >= MAX_CACHED_SERIES {
            map.clear();
        }
        let s = Arc::new(Series::default());
        map.insert(key.clone(), s.clone());
        s
    }

    pub fn feedback(&self, score: f64) {
        self.with(|| {
            counter!("sluice_feedback_total").increment(1);
            histogram!("sluice_feedback_score").record(score);
        });
    }

    /// A budget threshold crossed (once per counter and period, across instances).
    pub fn budget_alert(&self, budget: &str, threshold: &str) {
        self.with(|| {
            counter!("sluice_budget_alerts_total", "budget" => label(budget), "threshold" => label(threshold)).increment(1);
        });
    }

    /// A budget alert's webhook POST that failed after its retries.
    pub fn budget_webhook_failed(&self, budget: &str) {
        self.with(|| {
            counter!("sluice_budget_webhook_failures_total", "budget" => label(budget))
                .increment(1);
        });
    }

    /// A budget check or charge the counter store could not serve (`op`: check, charge).
    pub fn budget_counter_error(&self, op: &'static str) {
        self.with(|| {
            counter!("sluice_budget_counter_errors_total", "op" => op).increment(1);
        });
    }

    /// One cache tier consulted (`kind`: chat, embedding; `tier`: memory, redis;
    /// `result`: hit, miss, error).
    pub fn cache_lookup(&self, kind: &'static str, tier: &'static str, result: &'static str) {
        self.fixed_counter(("sluice_cache_lookups_total", [kind, tier, result]), 1, || {
            counter!("sluice_cache_lookups_total", "kind" => kind, "tier" => tier, "result" => result)
        });
    }

    /// Entries written to the cache, and the in-process tier's size after the write.
    pub fn cache_stored(&self, kind: &'static str, entries: u64, memory_bytes: u64) {
        self.fixed_counter(
            ("sluice_cache_stores_total", [kind, "", ""]),
            entries,
            || counter!("sluice_cache_stores_total", "kind" => kind),
        );
        self.cache_memory
            .get_or_init(|| self.with(|| gauge!("sluice_cache_memory_bytes")))
            .set(memory_bytes as f64);
    }

    /// Add `by` to the counter `key` names, its handle made by `make` on first use.
    fn fixed_counter(&self, key: FixedKey, by: u64, make: impl FnOnce() -> Counter) {
        let mut fixed = self.fixed.lock().unwrap_or_else(|e| e.into_inner());
        fixed
            .entry(key)
            .or_insert_with(|| self.with(make))
            .increment(by);
    }

    /// A Redis cache call that failed (served as a miss / not shared; `op`: get, put).
    pub fn cache_redis_error(&self, op: &'static str, n: u64) {
        self.with(|| {
            counter!("sluice_cache_redis_errors_total", "op" => op).increment(n);
        });
    }

    /// A request that waited for an identical request's upstream call instead of making
    /// its own (`result`: shared, timeout, leader_failed).
    pub fn cache_flight_waiter(&self, result: &'static str) {
        self.with(|| {
            counter!("sluice_cache_flight_waiters_total", "result" => result).increment(1);
        });
    }

    /// One coalesced embeddings call upstream carrying `requests` client requests.
    pub fn embedding_batch(&self, requests: u64, items: u64) {
        self.with(|| {
            counter!("sluice_embedding_batches_total").increment(1);
            counter!("sluice_embedding_batched_requests_total").increment(requests);
            counter!("sluice_embedding_batched_items_total").increment(items);
        });
    }

    /// The Prometheus text exposition, with the recorder's live gauges.
    pub fn render(
        &self,
        recorder: &Recorder,
        store_failed: u64,
        limits: &crate::limits::LimiterStatus,
        redis_calls: &[(&'static str, u64, u64)],
    ) -> String {
        self.with(|| {
            for &(call, calls, jobs) in redis_calls {
                counter!("sluice_redis_calls_total", "call" => call).absolute(calls);
                counter!("sluice_redis_call_jobs_total", "call" => call).absolute(jobs);
            }
            if let Some(up) = limits.shared_up {
                gauge!("sluice_limits_store_up", "backend" => limits.backend)
                    .set(f64::from(u8::from(up)));
                counter!("sluice_limits_local_fallbacks_total").absolute(limits.fallbacks);
            }
            for (i, signal) in crate::limits::limiter::SIGNALS.iter().enumerate() {
                counter!("sluice_abuse_signals_total", "signal" => *signal)
                    .absolute(limits.signals[i]);
                counter!("sluice_abuse_penalties_total", "signal" => *signal)
                    .absolute(limits.penalties[i]);
            }
            gauge!("sluice_record_queue_depth").set(recorder.depth() as f64);
            counter!("sluice_records_dropped_total", "reason" => "queue_full")
                .absolute(recorder.dropped());
            counter!("sluice_records_dropped_total", "reason" => "store_error")
                .absolute(store_failed);
        });
        self.handle.render()
    }
}

fn label(value: &str) -> String {
    match value.char_indices().nth(MAX_LABEL) {
        Some((cut, _)) => value[..cut].to_string(),
        None => value.to_string(),
    }
}

fn describe() {
    describe_counter!(
        "sluice_requests_total",
        "Requests finished, by endpoint, model, feature and outcome."
    );
    describe_histogram!(
        "sluice_request_duration_seconds",
        Unit::Seconds,
        "Total request latency."
    );
    describe_histogram!(
        "sluice_time_to_first_token_seconds",
        Unit::Seconds,
        "Time to the first streamed chunk."
    );
    describe_histogram!(
        "sluice_gateway_overhead_seconds",
        Unit::Seconds,
        "Latency the gateway added: total minus upstream time and retry waits."
    );
    describe_histogram!(
        "sluice_upstream_duration_seconds",
        Unit::Seconds,
        "Time spent in upstream calls, all attempts."
    );
    describe_counter!(
        "sluice_tokens_total",
        "Tokens, by model, feature and kind (prompt, completion)."
    );
    describe_counter!(
        "sluice_cost_usd_micros_total",
        "Cost in micro-dollars, by model and feature."
    );
    describe_counter!(
        "sluice_retries_total",
        "Upstream calls repeated after a retryable failure."
    );
    describe_counter!(
        "sluice_fallbacks_total",
        "Requests answered by a fallback model or template."
    );
    describe_counter!(
        "sluice_cache_requests_total",
        "Cache lookups, by status (hit, miss)."
    );
    describe_counter!(
        "sluice_rate_limited_total",
        "Requests refused by the gateway's rate limits."
    );
    describe_counter!(
        "sluice_regenerations_total",
        "Requests that regenerate an earlier answer."
    );
    describe_counter!("sluice_feedback_total", "Feedback received.");
    describe_histogram!("sluice_feedback_score", "Feedback scores, -1 to 1.");
    describe_counter!(
        "sluice_budget_alerts_total",
        "Budget alert thresholds crossed, by budget and threshold (a share of the limit)."
    );
    describe_counter!(
        "sluice_budget_webhook_failures_total",
        "Budget alerts whose webhook POST failed after its retries."
    );
    describe_counter!(
        "sluice_budget_counter_errors_total",
        "Budget checks and charges the counter store (Redis, or the request log it starts from) could not serve."
    );
    describe_gauge!(
        "sluice_record_queue_depth",
        "Request records waiting to be written."
    );
    describe_counter!(
        "sluice_records_dropped_total",
        "Request records lost: the writer queue was full, or the store refused them after retries."
    );
    describe_counter!(
        "sluice_cost_saved_usd_micros_total",
        "What cache hits and coalesced requests would have cost upstream, in micro-dollars."
    );
    describe_gauge!(
        "sluice_limits_store_up",
        "1 when the shared limit store (Redis) answers; 0 while limits are local or refused."
    );
    describe_counter!(
        "sluice_limits_local_fallbacks_total",
        "Limit checks served by this instance's own limits because Redis was unreachable."
    );
    describe_counter!(
        "sluice_abuse_penalties_total",
        "End users penalized (blocked or throttled) after repeated abuse signals, by signal."
    );
    describe_counter!(
        "sluice_cache_lookups_total",
        "Cache tier lookups, by kind (chat, embedding), tier (memory, redis) and result (hit, miss, error)."
    );
    describe_counter!(
        "sluice_cache_stores_total",
        "Answers and embedding vectors written to the cache, by kind."
    );
    describe_gauge!(
        "sluice_cache_memory_bytes",
        "Approximate size of the in-process cache tier."
    );
    describe_counter!(
        "sluice_cache_redis_errors_total",
        "Redis cache calls that failed or timed out (served as misses), by op."
    );
    describe_counter!(
        "sluice_cache_flight_waiters_total",
        "Requests that waited for an identical in-flight request, by result (shared, timeout, leader_failed)."
    );
    describe_counter!(
        "sluice_redis_calls_total",
        "Redis calls of each combined kind (limit_check, limit_settle, budget_read, budget_charge, cache_read): what arrives while one is on its way goes in the next."
    );
    describe_counter!(
        "sluice_redis_call_jobs_total",
        "Requests' checks, settlements, reads and charges those calls carried: jobs / calls is how many went in one call."
    );
    describe_counter!(
        "sluice_embedding_batches_total",
        "Coalesced embeddings calls sent upstream."
    );
    describe_counter!(
        "sluice_embedding_batched_requests_total",
        "Client embeddings requests carried by coalesced calls."
    );
    describe_counter!(
        "sluice_embedding_batched_items_total",
        "Embedding input items carried by coalesced calls."
    );
    describe_counter!(
        "sluice_abuse_signals_total",
        "Abuse signals counted per end user: rejected inputs, injection flags, refusals."
    );
}

/// Feeds records to [`Metrics`].
/// How often the recorder drains histogram samples into their buckets. The exporter
/// keeps each sample (8 bytes) until drained, and drains on its own only when it also
/// serves HTTP itself (`build`/`install`, not our `build_recorder`): without this, the
/// samples of every request piled up until the next scrape of `/metrics`, and with no
/// scraper for ever (the 10-minute soak's unexplained growth, bench/RESULTS.md Run 10).
const UPKEEP_EVERY: Duration = Duration::from_secs(1);

/// Feeds finished records into the metrics, and keeps the histograms drained.
pub struct MetricsSink {
    metrics: Arc<Metrics>,
    last_upkeep: Instant,
}

impl MetricsSink {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            last_upkeep: Instant::now(),
        }
    }
}

#[async_trait]
impl RecordSink for MetricsSink {
    async fn write(&mut self, batch: &RecordBatch) {
        for r in batch.iter() {
            self.metrics.observe(r);
        }
        if self.last_upkeep.elapsed() >= UPKEEP_EVERY {
            self.last_upkeep = Instant::now();
            self.metrics.upkeep();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> RequestRecord {
        RequestRecord {
            request_id: "req_1".into(),
            model: Some("m".into()),
            latency_ms: 12.0,
            upstream_ms: Some(10.0),
            overhead_ms: Some(2.0),
            ..RequestRecord::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_sink_drains_histograms_every_second_and_keeps_their_counts() {
        let metrics = Metrics::new().unwrap();
        let mut sink = MetricsSink::new(metrics.clone());
        sink.write(&Arc::new(vec![record(), record()])).await;
        assert_eq!(metrics.upkeeps.load(Ordering::Relaxed), 0, "not due yet");
        tokio::time::advance(UPKEEP_EVERY).await;
        sink.write(&Arc::new(vec![record()])).await;
        assert_eq!(metrics.upkeeps.load(Ordering::Relaxed), 1);
        sink.write(&Arc::new(vec![record()])).await;
        assert_eq!(metrics.upkeeps.load(Ordering::Relaxed), 1, "once a second");
        // Drained samples still count: four requests, in the buckets and the count.
        let text = metrics.handle.render();
        let count = text
            .lines()
            .find(|l| l.starts_with("sluice_request_duration_seconds_count"))
            .unwrap();
        assert!(count.ends_with(" 4"), "{count}");
    }

    #[test]
    fn cache_metrics_kept_as_handles_count_each_series_on_its_own() {
        let metrics = Metrics::new().unwrap();
        metrics.cache_lookup("chat", "memory", "miss");
        metrics.cache_lookup("chat", "memory", "miss");
        metrics.cache_lookup("chat", "redis", "miss");
        metrics.cache_lookup("embedding", "memory", "hit");
        metrics.cache_stored("chat", 1, 500);
        metrics.cache_stored("chat", 2, 700);
        metrics.cache_stored("embedding", 4, 900);
        let text = metrics.handle.render();
        let value = |series: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
                .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
                .to_string()
        };
        let lookups = |kind: &str, tier: &str, result: &str| {
            value(&format!(
                "sluice_cache_lookups_total{{kind=\"{kind}\",tier=\"{tier}\",result=\"{result}\"}}"
            ))
        };
        assert_eq!(lookups("chat", "memory", "miss"), "2");
        assert_eq!(lookups("chat", "redis", "miss"), "1");
        assert_eq!(lookups("embedding", "memory", "hit"), "1");
        assert_eq!(value("sluice_cache_stores_total{kind=\"chat\"}"), "3");
        assert_eq!(value("sluice_cache_stores_total{kind=\"embedding\"}"), "4");
        assert_eq!(value("sluice_cache_memory_bytes"), "900");
    }

    #[test]
    fn requests_whose_labels_join_alike_count_in_their_own_series() {
        let metrics = Metrics::new().unwrap();
        let labelled = |model: &str, feature: &str| RequestRecord {
            model: Some(model.into()),
            feature: Some(feature.into()),
            ..record()
        };
        metrics.observe(&labelled("a\0", "b"));
        metrics.observe(&labelled("a", "\0b"));
        metrics.observe(&labelled("a", "\0b"));
        let text = metrics.handle.render();
        let total = |model: &str, feature: &str| {
            let series = format!("model=\"{model}\",feature=\"{feature}\"");
            text.lines()
                .find(|l| l.starts_with("sluice_requests_total") && l.contains(&series))
                .unwrap_or_else(|| panic!("no {series} in\n{text}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .to_string()
        };
        assert_eq!(total("a\0", "b"), "1");
        assert_eq!(total("a", "\0b"), "2");
    }
}
