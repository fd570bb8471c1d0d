-- Experiments and routing: every checked answer in order (`model:pass|fail`, so an
-- escalation shows the cheap answer that failed and the strong one after it), which
-- routing rule chose the model, and an index for per-experiment reports.
ALTER TABLE requests ADD COLUMN output_checks TEXT;
ALTER TABLE requests ADD COLUMN routed_by TEXT;
CREATE INDEX requests_experiment ON requests (experiment, started_at_ms);
