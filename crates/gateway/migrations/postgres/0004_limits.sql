-- Who owned the key, and which limit refused or shaped the request.
ALTER TABLE requests ADD COLUMN owner TEXT;
ALTER TABLE requests ADD COLUMN limited_by TEXT;
