//! The audit log: one record per request, allowed or refused, chained by
//! SHA-256 and written with group commit.
//!
//! Each record is a JSON document stored verbatim; its chain hash is
//! `SHA-256(prev_hash || record bytes)`, with 32 zero bytes before the
//! first record. The record carries its own sequence number, so removing,
//! inserting or reordering records breaks the chain at a named place.
//!
//! One writer thread owns a connection. Callers block until their record is
//! committed (fail closed: an operation whose record cannot be written is
//! refused). Records that arrive while a commit is in flight share the next
//! transaction, so many records cost one fsync.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::store;

/// Most records in one transaction.
const MAX_BATCH: usize = 1024;
/// Records queued before callers wait for room.
const QUEUE: usize = 8192;

/// Who made a request.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Actor {
    /// Matched client policy name (data socket).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// Peer uid from the kernel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Peer gid from the kernel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// Peer pid from the kernel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// Logged-in operator (admin socket).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
}

/// One audit record before it is sequenced. Never holds key bytes.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    /// Unix milliseconds.
    pub time_ms: u64,
    /// `data`, `admin` or `internal` (the daemon's own actions).
    pub socket: &'static str,
    /// Request id from the frame.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<u64>,
    /// Who.
    pub actor: Actor,
    /// Operation name (`decrypt`, `key_rotate`, `tamper_detected`, ...).
    pub op: String,
    /// Master key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Master key version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_version: Option<u32>,
    /// Encryption context.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<BTreeMap<String, String>>,
    /// `ok` or `error`.
    pub result: &'static str,
    /// Error code name when refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<&'static str>,
    /// Why (the error message), or other detail.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// A registry change committed in the same transaction as this record
    /// (only if the operation succeeded): the registration is durable
    /// exactly when its audit record is, with no write of its own.
    #[serde(skip)]
    pub registration: Option<store::RegistryWrite>,
}

impl AuditRecord {
    /// A record for `op` now, result `ok`, no actor.
    pub fn new(socket: &'static str, op: impl Into<String>) -> Self {
        Self {
            time_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            socket,
            request_id: None,
            actor: Actor::default(),
            op: op.into(),
            key: None,
            key_version: None,
            context: None,
            result: "ok",
            error_code: None,
            detail: None,
            registration: None,
        }
    }
}

#[derive(Serialize)]
struct Sequenced<'a> {
    seq: u64,
    time: String,
    #[serde(flatten)]
    record: &'a AuditRecord,
}

/// Audit failures.
#[derive(Debug, Error, Clone)]
pub enum AuditError {
    /// The record could not be committed.
    #[error("the audit record could not be written: {0}")]
    WriteFailed(String),
    /// The writer has stopped.
    #[error("the audit writer has stopped")]
    Stopped,
}

type Job = (AuditRecord, SyncSender<Result<u64, AuditError>>);

/// A handle to append records; cheap to clone.
#[derive(Clone, Debug)]
pub struct AuditLog {
    tx: SyncSender<Job>,
}

/// The writer thread; join it after every [`AuditLog`] is dropped to flush.
#[derive(Debug)]
pub struct AuditWriter(JoinHandle<()>);

impl AuditWriter {
    /// Waits for the writer to commit what is queued and stop.
    pub fn join(self) {
        let _ = self.0.join();
    }
}

impl AuditLog {
    /// Starts the writer on the store database at `path`.
    pub fn start(path: &Path) -> Result<(AuditLog, AuditWriter), AuditError> {
        let conn = store::connect(path).map_err(|e| AuditError::WriteFailed(e.to_string()))?;
        let (tx, rx) = mpsc::sync_channel::<Job>(QUEUE);
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let handle = std::thread::Builder::new()
            .name("tde-audit".into())
            .spawn(move || writer(conn, rx, ready_tx))
            .map_err(|e| AuditError::WriteFailed(e.to_string()))?;
        ready_rx.recv().map_err(|_| AuditError::Stopped)??;
        Ok((AuditLog { tx }, AuditWriter(handle)))
    }

    /// Appends a record and waits until it is durable. Returns its sequence
    /// number.
    pub fn append(&self, record: AuditRecord) -> Result<u64, AuditError> {
        log_line(&record);
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        self.tx
            .send((record, done_tx))
            .map_err(|_| AuditError::Stopped)?;
        done_rx.recv().map_err(|_| AuditError::Stopped)?
    }
}

/// Successful operations too frequent for info: data-key traffic and reads.
const ROUTINE: &[&str] = &[
    "generate_data_key",
    "decrypt",
    "re_encrypt",
    "generate_random",
    "register_deks",
    "watch_key",
    "status",
    "key_list",
    "key_describe",
    "operator_list",
];

/// The daemon's log line for an audit record, one per record: every state
/// change and every refusal at info, routine successes at debug, the
/// intent records of admin operations not at all (their outcome is). Audit
/// records hold no key bytes, so neither does the line. Refusals beyond
/// `limits.refused_records_per_second` get no record, and so no line.
fn log_line(r: &AuditRecord) {
    if r.result == "pending" {
        return;
    }
    let refused = r.result == "error";
    let what = match (refused, r.socket) {
        (true, "internal") => "failed",
        (true, _) => "refused",
        (false, "internal") => "done by the daemon",
        (false, _) => "done",
    };
    macro_rules! line {
        ($level:ident) => {
            tracing::$level!(
                target: "tde_sidecar::audit",
                socket = r.socket,
                uid = r.actor.uid,
                pid = r.actor.pid,
                client = r.actor.client.as_deref(),
                operator = r.actor.operator.as_deref(),
                key = r.key.as_deref(),
                version = r.key_version,
                code = r.error_code,
                detail = r.detail.as_deref(),
                "{} {what}",
                r.op
            )
        };
    }
    if refused || !ROUTINE.contains(&r.op.as_str()) {
        line!(info);
    } else {
        line!(debug);
    }
}

fn chain_head(conn: &Connection) -> rusqlite::Result<(u64, [u8; 32])> {
    let row: Option<(i64, Vec<u8>)> = conn
        .query_row(
            "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    Ok(match row {
        Some((seq, h)) => {
            let mut hash = [0u8; 32];
            if h.len() == 32 {
                hash.copy_from_slice(&h);
            }
            (u64::try_from(seq).unwrap_or(0), hash)
        }
        None => (0, [0u8; 32]),
    })
}

/// The chain hash of one record.
pub fn chain_hash(prev: &[u8; 32], record: &[u8]) -> [u8; 32] {
    Sha256::new()
        .chain_update(prev)
        .chain_update(record)
        .finalize()
        .into()
}

fn writer(mut conn: Connection, rx: Receiver<Job>, ready: SyncSender<Result<(), AuditError>>) {
    let (mut seq, mut prev) = match chain_head(&conn) {
        Ok(h) => {
            let _ = ready.send(Ok(()));
            h
        }
        Err(e) => {
            let _ = ready.send(Err(AuditError::WriteFailed(e.to_string())));
            return;
        }
    };
    loop {
        // Ends when every AuditLog handle is dropped and the queue is empty.
        let Ok(first) = rx.recv() else { return };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        match commit(&mut conn, &batch, seq, prev) {
            Ok((results, new_seq, new_prev)) => {
                for ((_, done), r) in batch.iter().zip(results) {
                    let _ = done.send(r);
                }
                seq = new_seq;
                prev = new_prev;
            }
            Err(e) => {
                tracing::error!(error = %e, records = batch.len(), "audit commit failed; refusing the operations");
                for (_, done) in &batch {
                    let _ = done.send(Err(AuditError::WriteFailed(e.to_string())));
                }
                if let Ok(h) = chain_head(&conn) {
                    (seq, prev) = h;
                }
            }
        }
    }
}

/// One record's outcome inside a batch.
type Written = Result<u64, AuditError>;

/// Commits `batch` in one transaction. Each record runs inside its own
/// savepoint: a record whose insert or registration fails is rolled back
/// alone and refused alone (its sequence number goes to the next record),
/// so one peer's bad request cannot fail the others' records. The
/// transaction as a whole failing (disk full, I/O error) fails them all.
fn commit(
    conn: &mut Connection,
    batch: &[Job],
    mut seq: u64,
    mut prev: [u8; 32],
) -> rusqlite::Result<(Vec<Written>, u64, [u8; 32])> {
    let tx = conn.transaction()?;
    let mut results = Vec::with_capacity(batch.len());
    for (record, _) in batch {
        tx.execute_batch("SAVEPOINT record")?;
        match insert(&tx, record, seq + 1, &prev) {
            Ok(hash) => {
                tx.execute_batch("RELEASE record")?;
                seq += 1;
                prev = hash;
                results.push(Ok(seq));
            }
            Err(e) => {
                tx.execute_batch("ROLLBACK TO record; RELEASE record")?;
                tracing::error!(error = %e, op = %record.op, "audit record refused");
                results.push(Err(AuditError::WriteFailed(e.to_string())));
            }
        }
    }
    tx.commit()?;
    Ok((results, seq, prev))
}

/// Inserts one record as number `seq` after `prev`, with its registration
/// if the operation succeeded; returns the record's chain hash.
fn insert(
    tx: &rusqlite::Transaction<'_>,
    record: &AuditRecord,
    seq: u64,
    prev: &[u8; 32],
) -> rusqlite::Result<[u8; 32]> {
    let time = humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(record.time_ms))
        .to_string();
    let json = serde_json::to_string(&Sequenced { seq, time, record })
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    let hash = chain_hash(prev, json.as_bytes());
    tx.prepare_cached("INSERT INTO audit (seq, record, prev_hash, hash) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![seq as i64, json, &prev[..], &hash[..]])?;
    if let Some(r) = record
        .registration
        .as_ref()
        .filter(|_| record.result == "ok")
    {
        store::write_registration(tx, r)?;
    }
    Ok(hash)
}

/// The result of walking the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainReport {
    /// Records checked.
    pub records: u64,
    /// Hash of the last record.
    pub head: [u8; 32],
}

/// Where the chain is broken.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ChainError {
    /// A record's content or hash does not match the chain.
    #[error("audit record {0} was changed")]
    Changed(u64),
    /// Sequence numbers skip: records were removed before this one.
    #[error("audit records before {0} were removed")]
    Removed(u64),
    /// The database could not be read.
    #[error("audit log could not be read: {0}")]
    Read(String),
}

/// Walks the whole chain in `conn`, recomputing every hash.
pub fn verify_chain(conn: &Connection) -> Result<ChainReport, ChainError> {
    let read = |e: rusqlite::Error| ChainError::Read(e.to_string());
    let mut stmt = conn
        .prepare("SELECT seq, record, prev_hash, hash FROM audit ORDER BY seq")
        .map_err(read)?;
    let mut rows = stmt.query([]).map_err(read)?;
    let mut prev = [0u8; 32];
    let mut expected = 1u64;
    while let Some(r) = rows.next().map_err(read)? {
        let seq = u64::try_from(r.get::<_, i64>(0).map_err(read)?).unwrap_or(0);
        let record: String = r.get(1).map_err(read)?;
        let prev_hash: Vec<u8> = r.get(2).map_err(read)?;
        let hash: Vec<u8> = r.get(3).map_err(read)?;
        if seq != expected {
            return Err(ChainError::Removed(seq));
        }
        let inner_seq = serde_json::from_str::<serde_json::Value>(&record)
            .ok()
            .and_then(|v| v.get("seq").and_then(serde_json::Value::as_u64));
        if inner_seq != Some(seq)
            || prev_hash != prev
            || hash != chain_hash(&prev, record.as_bytes())
        {
            return Err(ChainError::Changed(seq));
        }
        prev = chain_hash(&prev, record.as_bytes());
        expected += 1;
    }
    Ok(ChainReport {
        records: expected - 1,
        head: prev,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_detects_change_removal_and_insertion() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("tde.db");
        drop(crate::store::SqliteStore::open(&path).expect("open"));
        let (log, writer) = AuditLog::start(&path).expect("start");
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        let mut r = AuditRecord::new("data", "decrypt");
                        r.request_id = Some(t * 1000 + i);
                        log.append(r).expect("append");
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().expect("join"));
        drop(log);
        writer.join();
        let conn = crate::store::connect(&path).expect("conn");
        assert_eq!(verify_chain(&conn).expect("valid").records, 400);
        conn.execute(
            "UPDATE audit SET record = replace(record, 'decrypt', 'encrypt') WHERE seq = 17",
            [],
        )
        .expect("edit");
        assert_eq!(verify_chain(&conn), Err(ChainError::Changed(17)));
        conn.execute("DELETE FROM audit WHERE seq >= 17 AND seq <= 18", [])
            .expect("delete");
        assert_eq!(verify_chain(&conn), Err(ChainError::Removed(19)));
    }

    /// One record whose registration the store refuses (a data key listed
    /// twice) is refused alone; the records around it in the same
    /// transaction are committed, numbered without a gap.
    #[test]
    fn a_failing_record_fails_alone() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("tde.db");
        drop(crate::store::SqliteStore::open(&path).expect("open"));
        let mut conn = crate::store::connect(&path).expect("conn");
        let (tx, _rx) = mpsc::sync_channel(8);
        let mut bad = AuditRecord::new("data", "register_deks");
        let dek = tde_protocol::DekRef {
            dek_version: 1,
            key_version: 1,
        };
        bad.registration = Some(store::RegistryWrite {
            key: "k".into(),
            context: Default::default(),
            location: "/x".into(),
            last_seen: 0,
            deks: vec![dek, dek],
        });
        let batch: Vec<Job> = vec![
            (AuditRecord::new("data", "decrypt"), tx.clone()),
            (bad, tx.clone()),
            (AuditRecord::new("admin", "key_rotate"), tx),
        ];
        let (results, seq, _) = commit(&mut conn, &batch, 0, [0; 32]).expect("commit");
        assert_eq!(results[0].as_ref().ok(), Some(&1));
        assert!(matches!(results[1], Err(AuditError::WriteFailed(_))));
        assert_eq!(results[2].as_ref().ok(), Some(&2));
        assert_eq!(seq, 2);
        assert_eq!(verify_chain(&conn).expect("valid").records, 2);
        let rows: i64 = conn
            .query_row("SELECT count(*) FROM registry", [], |r| r.get(0))
            .expect("count");
        assert_eq!(rows, 0, "the refused registration left nothing");
    }
}
