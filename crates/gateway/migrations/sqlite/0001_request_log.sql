-- The request log: one row per request, and the quality signals tied to it.
-- Integer flags (0/1) and integer micro-dollars keep one set of queries for both backends.
CREATE TABLE requests (
    request_id        TEXT PRIMARY KEY,
    started_at_ms     BIGINT NOT NULL,
    endpoint          TEXT NOT NULL,
    stream            BIGINT NOT NULL,
    key_id            TEXT,
    user_id           TEXT,
    tier              TEXT,
    feature           TEXT,
    model_requested   TEXT,
    model             TEXT,
    provider          TEXT,
    prompt_id         TEXT,
    prompt_version    TEXT,
    prompt_hash       TEXT,
    experiment        TEXT,
    variant           TEXT,
    outcome           TEXT NOT NULL,
    status            BIGINT NOT NULL,
    error_code        TEXT,
    retries           BIGINT NOT NULL,
    upstream_calls    BIGINT NOT NULL,
    fallback          TEXT,
    cache_status      TEXT,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    tokens_estimated  BIGINT NOT NULL,
    cost_micros       BIGINT,
    latency_ms        REAL NOT NULL,
    ttft_ms           REAL,
    upstream_ms       REAL,
    overhead_ms       REAL,
    input_hash        TEXT,
    regeneration_of   TEXT,
    request_body      TEXT,
    response_body     TEXT
);
CREATE INDEX requests_started_at ON requests (started_at_ms);
CREATE INDEX requests_key_user ON requests (key_id, user_id);

CREATE TABLE feedback (
    request_id    TEXT NOT NULL,
    key_id        TEXT,
    score         REAL NOT NULL,
    comment       TEXT,
    created_at_ms BIGINT NOT NULL
);
CREATE INDEX feedback_request ON feedback (request_id);
