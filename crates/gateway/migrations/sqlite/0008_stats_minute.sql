-- Stats and the dashboard aggregate the request log per minute first (store/stats.rs).
-- SQLite groups by sorting; this index yields a window's rows already in that order, so
-- the first aggregation streams instead of sorting every row, and it holds every
-- column the stats read, so they never look up a row (rows can carry large bodies).
-- PostgreSQL hashes its groups and needs no such index.
CREATE INDEX requests_minute ON requests (
    started_at_ms / 60000, COALESCE(model, model_requested), feature, outcome,
    started_at_ms, user_id, model, model_requested, prompt_tokens, completion_tokens,
    cached_prompt_tokens, cost_nanos, cost_micros, cost_saved_nanos, cache_status,
    regeneration_of, latency_ms, ttft_ms
);
