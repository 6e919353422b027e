-- tde key store, schema version 2: the registry of wrapped data keys.
-- One row per data key version of one encryption context (a tablespace) at
-- one location (its backing directory; a backup rewrapped with `tde rewrap`
-- is another location): which master key version wraps it, when it was
-- last confirmed. No key material; it lets the sidecar tell which master key
-- versions are still in use (`tde key show`) and refuse to destroy them.
CREATE TABLE registry (
    key         TEXT    NOT NULL,
    context     TEXT    NOT NULL,
    dek_version INTEGER NOT NULL,
    key_version INTEGER NOT NULL,
    location    TEXT    NOT NULL,
    last_seen   INTEGER NOT NULL,
    PRIMARY KEY (key, context, location, dek_version)
);
CREATE INDEX registry_by_key_version ON registry (key, key_version);
