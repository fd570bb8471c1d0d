-- Usage: the exact cost in nano-dollars (cost_micros keeps the rounded figure people
-- read; sums use this one), what a cache hit saved, and the prompt tokens the upstream
-- served from its prompt cache.
ALTER TABLE requests ADD COLUMN cost_nanos BIGINT;
ALTER TABLE requests ADD COLUMN cost_saved_nanos BIGINT;
ALTER TABLE requests ADD COLUMN cached_prompt_tokens BIGINT NOT NULL DEFAULT 0;
