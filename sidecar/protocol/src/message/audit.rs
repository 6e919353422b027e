//! Bodies of the audit operations (`tde audit`): queries, pages of
//! records, an export's range and the audit signing keys.

use super::tag::*;
use super::{Context, capped, put_context, take_context, unexpected};
use crate::codec::{Reader, Writer, as_bool, as_str, as_u32, as_u64, once, required};
use crate::error::DecodeError;

/// Longest audit record or checkpoint line.
pub const MAX_RECORD: usize = 64 * 1024;
/// Most records or checkpoints in one response.
pub const MAX_RECORDS: usize = 16 * 1024;
/// Most audit signing key versions in one response.
pub const MAX_AUDIT_KEYS: usize = 4096;

/// Bounds and filters of an audit read. Each operation uses some fields
/// and refuses the others (see docs/PROTOCOL.md).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    /// Records at or after this time (Unix ms).
    pub since_ms: Option<u64>,
    /// Records before this time (Unix ms).
    pub until_ms: Option<u64>,
    /// First sequence number.
    pub first_seq: Option<u64>,
    /// Last sequence number.
    pub last_seq: Option<u64>,
    /// Most records to return.
    pub limit: Option<u32>,
    /// The newest matching records (instead of the oldest).
    pub newest: bool,
    /// Actor: operator name, client policy name, or `uid:N`.
    pub actor: Option<String>,
    /// Operation name.
    pub operation: Option<String>,
    /// Master key name.
    pub key: Option<String>,
    /// Encryption context pairs the record's context must contain.
    pub context: Context,
    /// `ok`, `error` or `pending`.
    pub result: Option<String>,
}

impl AuditQuery {
    pub(super) fn encode(&self, w: &mut Writer) {
        let opt_u64 = |w: &mut Writer, t: u8, v: Option<u64>| {
            if let Some(v) = v {
                w.u64(t, v);
            }
        };
        opt_u64(w, SINCE_MS, self.since_ms);
        opt_u64(w, UNTIL_MS, self.until_ms);
        opt_u64(w, FIRST_SEQ, self.first_seq);
        opt_u64(w, LAST_SEQ, self.last_seq);
        if let Some(l) = self.limit {
            w.u32(LIMIT, l);
        }
        if self.newest {
            w.bool(NEWEST, true);
        }
        for (t, v) in [
            (ACTOR, &self.actor),
            (OPERATION, &self.operation),
            (KEY_NAME, &self.key),
            (RESULT, &self.result),
        ] {
            if let Some(v) = v {
                w.str(t, v);
            }
        }
        put_context(w, &self.context);
    }

    /// Reads a query, refusing tags outside `allowed`.
    pub(super) fn decode(
        body: &[u8],
        what: &'static str,
        allowed: &[u8],
    ) -> Result<AuditQuery, DecodeError> {
        let mut q = AuditQuery::default();
        let mut newest = None;
        let mut rd = Reader::new(body);
        let name = |v: &[u8], f: &'static str| as_str(capped(v, f, super::MAX_NAME)?, f);
        while let Some((t, v)) = rd.next_field()? {
            if !allowed.contains(&t) {
                return Err(unexpected(what, t));
            }
            match t {
                SINCE_MS => once(&mut q.since_ms, as_u64(v, "since_ms")?, "since_ms")?,
                UNTIL_MS => once(&mut q.until_ms, as_u64(v, "until_ms")?, "until_ms")?,
                FIRST_SEQ => once(&mut q.first_seq, as_u64(v, "first_seq")?, "first_seq")?,
                LAST_SEQ => once(&mut q.last_seq, as_u64(v, "last_seq")?, "last_seq")?,
                LIMIT => once(&mut q.limit, as_u32(v, "limit")?, "limit")?,
                NEWEST => once(&mut newest, as_bool(v, "newest")?, "newest")?,
                ACTOR => once(&mut q.actor, name(v, "actor")?, "actor")?,
                OPERATION => once(&mut q.operation, name(v, "operation")?, "operation")?,
                KEY_NAME => once(&mut q.key, name(v, "key")?, "key")?,
                RESULT => once(&mut q.result, name(v, "result")?, "result")?,
                CONTEXT => take_context(&mut q.context, v)?,
                other => return Err(unexpected(what, other)),
            }
        }
        q.newest = newest.unwrap_or(false);
        Ok(q)
    }
}

/// The query tags each audit operation takes.
pub(super) const LIST_FIELDS: &[u8] = &[
    SINCE_MS, UNTIL_MS, FIRST_SEQ, LAST_SEQ, LIMIT, NEWEST, ACTOR, OPERATION, KEY_NAME, RESULT,
    CONTEXT,
];
pub(super) const READ_FIELDS: &[u8] = &[FIRST_SEQ, LAST_SEQ];
pub(super) const EXPORT_FIELDS: &[u8] = &[SINCE_MS, UNTIL_MS, FIRST_SEQ, LAST_SEQ];
pub(super) const PRUNE_FIELDS: &[u8] = &[UNTIL_MS];

/// A page of audit records (verbatim JSON, in sequence order) and the
/// checkpoints whose last record is in the page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditPage {
    /// The records.
    pub records: Vec<String>,
    /// Checkpoint lines.
    pub checkpoints: Vec<String>,
    /// The newest sequence number in the log when the page was read.
    pub head: u64,
}

/// An audit signing key version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditKeyInfo {
    /// Version.
    pub version: u32,
    /// Unix seconds.
    pub created: u64,
    /// The Ed25519 public key (32 bytes).
    pub public: Vec<u8>,
    /// It signs now.
    pub active: bool,
}

/// An export's range (the answer to audit-export, -export-done and
/// -prune): what to read and what vouches for it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditRange {
    /// The store id (hex).
    pub store: String,
    /// The node id.
    pub node: String,
    /// First record.
    pub first_seq: u64,
    /// Last record.
    pub last_seq: u64,
    /// Checkpoint lines: those ending just before the range (its anchor)
    /// and the one the export made over the range.
    pub checkpoints: Vec<String>,
    /// Every audit signing key version.
    pub keys: Vec<AuditKeyInfo>,
}

fn put_keys(w: &mut Writer, keys: &[AuditKeyInfo]) {
    for k in keys {
        let mut r = Writer::new();
        r.u32(KEY_VERSION, k.version)
            .u64(CREATED, k.created)
            .bytes(PUBLIC_KEY, &k.public)
            .str(STATE, if k.active { "active" } else { "retired" });
        w.record(AUDIT_KEY, &r);
    }
}

fn take_key(v: &[u8]) -> Result<AuditKeyInfo, DecodeError> {
    let (mut version, mut created, mut public, mut active) = (None, None, None, None);
    let mut r = Reader::new(v);
    while let Some((t, v)) = r.next_field()? {
        match t {
            KEY_VERSION => once(&mut version, as_u32(v, "key_version")?, "key_version")?,
            CREATED => once(&mut created, as_u64(v, "created")?, "created")?,
            PUBLIC_KEY => once(
                &mut public,
                capped(v, "public_key", 64)?.to_vec(),
                "public_key",
            )?,
            STATE => once(
                &mut active,
                as_str(capped(v, "state", 16)?, "state")? == "active",
                "state",
            )?,
            other => return Err(unexpected("audit_key", other)),
        }
    }
    Ok(AuditKeyInfo {
        version: required(version, "key_version")?,
        created: required(created, "created")?,
        public: required(public, "public_key")?,
        active: active.unwrap_or(false),
    })
}

fn push_line(out: &mut Vec<String>, v: &[u8], field: &'static str) -> Result<(), DecodeError> {
    if out.len() >= MAX_RECORDS {
        return Err(DecodeError::InvalidValue("too many audit records"));
    }
    out.push(as_str(capped(v, field, MAX_RECORD)?, field)?);
    Ok(())
}

pub(super) fn put_page(w: &mut Writer, p: &AuditPage) {
    for r in &p.records {
        w.str(RECORD, r);
    }
    for c in &p.checkpoints {
        w.str(CHECKPOINT, c);
    }
    w.u64(LAST_SEQ, p.head);
}

pub(super) fn take_page(body: &[u8], what: &'static str) -> Result<AuditPage, DecodeError> {
    let mut p = AuditPage::default();
    let mut head = None;
    let mut rd = Reader::new(body);
    while let Some((t, v)) = rd.next_field()? {
        match t {
            RECORD => push_line(&mut p.records, v, "record")?,
            CHECKPOINT => push_line(&mut p.checkpoints, v, "checkpoint")?,
            LAST_SEQ => once(&mut head, as_u64(v, "last_seq")?, "last_seq")?,
            other => return Err(unexpected(what, other)),
        }
    }
    p.head = required(head, "last_seq")?;
    Ok(p)
}

pub(super) fn put_range(w: &mut Writer, r: &AuditRange) {
    w.str(STORE_ID, &r.store)
        .str(NODE, &r.node)
        .u64(FIRST_SEQ, r.first_seq)
        .u64(LAST_SEQ, r.last_seq);
    for c in &r.checkpoints {
        w.str(CHECKPOINT, c);
    }
    put_keys(w, &r.keys);
}

pub(super) fn take_range(body: &[u8], what: &'static str) -> Result<AuditRange, DecodeError> {
    let (mut store, mut node, mut first, mut last) = (None, None, None, None);
    let mut r = AuditRange::default();
    let mut rd = Reader::new(body);
    let name = |v: &[u8], f: &'static str| as_str(capped(v, f, 256)?, f);
    while let Some((t, v)) = rd.next_field()? {
        match t {
            STORE_ID => once(&mut store, name(v, "store_id")?, "store_id")?,
            NODE => once(&mut node, name(v, "node")?, "node")?,
            FIRST_SEQ => once(&mut first, as_u64(v, "first_seq")?, "first_seq")?,
            LAST_SEQ => once(&mut last, as_u64(v, "last_seq")?, "last_seq")?,
            CHECKPOINT => push_line(&mut r.checkpoints, v, "checkpoint")?,
            AUDIT_KEY => {
                if r.keys.len() >= MAX_AUDIT_KEYS {
                    return Err(DecodeError::InvalidValue("too many audit keys"));
                }
                r.keys.push(take_key(v)?)
            }
            other => return Err(unexpected(what, other)),
        }
    }
    r.store = required(store, "store_id")?;
    r.node = required(node, "node")?;
    r.first_seq = required(first, "first_seq")?;
    r.last_seq = required(last, "last_seq")?;
    Ok(r)
}

pub(super) fn put_key_list(w: &mut Writer, keys: &[AuditKeyInfo]) {
    put_keys(w, keys);
}

pub(super) fn take_key_list(
    body: &[u8],
    what: &'static str,
) -> Result<Vec<AuditKeyInfo>, DecodeError> {
    let mut out = Vec::new();
    let mut rd = Reader::new(body);
    while let Some((t, v)) = rd.next_field()? {
        if t != AUDIT_KEY {
            return Err(unexpected(what, t));
        }
        if out.len() >= MAX_AUDIT_KEYS {
            return Err(DecodeError::InvalidValue("too many audit keys"));
        }
        out.push(take_key(v)?);
    }
    Ok(out)
}
