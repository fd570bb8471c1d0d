-- Virtual keys. Only the SHA-256 of a key is stored, never the key: `hint` keeps its last
-- four characters so people can tell keys apart. Times are Unix milliseconds from the
-- database's clock; `updated_at_ms` moves on every change (revocation included), so each
-- gateway instance reloads only what changed since its last look.
CREATE TABLE api_keys (
    id              TEXT PRIMARY KEY,
    key_hash        TEXT NOT NULL UNIQUE,
    hint            TEXT NOT NULL,
    owner           TEXT NOT NULL,
    tier            TEXT,
    models          TEXT,
    can_assert_tier BIGINT NOT NULL DEFAULT 0,
    created_at_ms   BIGINT NOT NULL,
    updated_at_ms   BIGINT NOT NULL,
    revoked_at_ms   BIGINT
);
CREATE INDEX api_keys_updated_at ON api_keys (updated_at_ms);
