-- tde key store, schema version 1.
-- Every key object is sealed (AES-256-GCM-SIV under the root key, AAD =
-- store id, kind, id, revision). Nothing in these tables is key material in
-- plaintext; reading them gives an attacker nothing, editing them is detected.

-- Public facts of the store: id, share set, dev flag, zeroized flag.
CREATE TABLE meta (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    store_id  BLOB    NOT NULL,
    threshold INTEGER NOT NULL,
    shares    INTEGER NOT NULL,
    dev       INTEGER NOT NULL,
    zeroized  INTEGER NOT NULL DEFAULT 0,
    created   INTEGER NOT NULL
);

-- The root key sealed under the unseal key. Deleted by zeroization.
CREATE TABLE root (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    sealed BLOB NOT NULL
);

-- Sealed objects: kind 1 = master key record, 2 = operator record.
CREATE TABLE objects (
    kind     INTEGER NOT NULL,
    id       TEXT    NOT NULL,
    revision INTEGER NOT NULL,
    sealed   BLOB    NOT NULL,
    PRIMARY KEY (kind, id)
);

-- Audit records: one JSON document each, chained by SHA-256:
-- hash = SHA-256(prev_hash || record), prev_hash of the first is 32 zero bytes.
CREATE TABLE audit (
    seq       INTEGER PRIMARY KEY,
    record    TEXT NOT NULL,
    prev_hash BLOB NOT NULL,
    hash      BLOB NOT NULL
);
