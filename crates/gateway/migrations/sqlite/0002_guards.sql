-- What the input guard changed and flagged, and how the output checks went.
ALTER TABLE requests ADD COLUMN guard_changes TEXT;
ALTER TABLE requests ADD COLUMN guard_flags TEXT;
ALTER TABLE requests ADD COLUMN output_check TEXT;
