-- tde key store, schema version 3: audit evidence (see docs/FORMAT.md).

-- The record's time (Unix milliseconds, never decreasing along the chain),
-- so that a time maps to a sequence number by binary search on seq (no
-- index to keep up on every record).
ALTER TABLE audit ADD COLUMN time_ms INTEGER;
UPDATE audit SET time_ms = COALESCE(json_extract(record, '$.time_ms'), 0);

-- Signed checkpoints: the JSON line as written (signature included) and
-- the last sequence number it covers.
CREATE TABLE audit_checkpoint (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    last_seq INTEGER NOT NULL,
    body     TEXT    NOT NULL
);
CREATE INDEX audit_checkpoint_by_seq ON audit_checkpoint (last_seq);

-- Every export: the range that left the host, by whom. Pruning removes
-- only records some export covered.
CREATE TABLE audit_export (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    first_seq INTEGER NOT NULL,
    last_seq  INTEGER NOT NULL,
    time_ms   INTEGER NOT NULL,
    operator  TEXT    NOT NULL
);

-- How far each sink got: the last record and checkpoint it was given.
CREATE TABLE audit_sink (
    name       TEXT    PRIMARY KEY,
    seq        INTEGER NOT NULL,
    checkpoint INTEGER NOT NULL
);
