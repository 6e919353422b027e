//! The audit log: one record per request, allowed or refused, chained by
//! SHA-256, written with group commit, and signed by checkpoints.
//!
//! Each record is a JSON document stored verbatim; its chain hash is
//! `SHA-256(prev_hash || record bytes)`, with 32 zero bytes before the
//! first record. The record carries its own sequence number and the chain
//! hash of the record before it (`prev`), so removing, inserting, reordering
//! or changing records breaks the chain at a named place.
//!
//! One writer thread owns a connection. Callers block until their record is
//! committed (fail closed: an operation whose record cannot be written is
//! refused). Records that arrive while a commit is in flight share the next
//! transaction, so many records cost one fsync. The same thread writes a
//! signed [`Checkpoint`] every `checkpoint_records` records or
//! `checkpoint_interval` (when there are new records), at shutdown, and on
//! request (unseal, export, prune).
//!
//! # Layout
//! - this module: records, the writer, checkpoints in the store, reads.
//! - [`checkpoint`]: the signed checkpoint statement and public key PEM.
//! - [`query`]: reading for `tde audit` (lists, export pages, pruning).
//! - [`export`]: the export's files and renderings, and offline verify.
//! - [`render`]: the CSV and OCSF renderings of records.
//! - [`sink`]: the file and syslog sinks that follow the store.

pub mod checkpoint;
pub mod export;
pub mod query;
pub mod render;
pub mod sink;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use checkpoint::Checkpoint;
use checkpoint::GENESIS;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
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
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq, Hash)]
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
    /// The peer's executable (`/proc/PID/exe` when it connected).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exe: Option<Arc<str>>,
    /// Logged-in operator (admin socket).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    /// The operator's role.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
}

/// One audit record before it is sequenced. Never holds key bytes.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
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
    /// `ok`, `error`, or `pending` (the intent record of an admin change).
    pub result: &'static str,
    /// Error code name when refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<&'static str>,
    /// Why (the error message), or other detail.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The calls a summary record stands for
    /// (`audit.pkcs11_key_use = "summarize"`); absent: one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// A registry change committed in the same transaction as this record
    /// (only if the operation succeeded): the registration is durable
    /// exactly when its audit record is, with no write of its own.
    #[serde(skip)]
    pub registration: Option<store::RegistryWrite>,
}

impl AuditRecord {
    /// A record for `op`, result `ok`, no actor. Its time is set when it is
    /// sequenced.
    pub fn new(socket: &'static str, op: impl Into<String>) -> Self {
        Self {
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
            count: None,
            registration: None,
        }
    }
}

/// The stored form: the record with its place in the chain.
#[derive(Serialize)]
struct Sequenced<'a> {
    seq: u64,
    /// RFC 3339 UTC with milliseconds.
    time: String,
    /// Unix milliseconds (the same instant).
    time_ms: u64,
    node: &'a str,
    /// Chain hash of the record before (hex).
    prev: String,
    #[serde(flatten)]
    record: &'a AuditRecord,
}

/// Audit failures.
#[derive(Debug, Error, Clone)]
pub enum AuditError {
    /// The record could not be committed.
    #[error("the audit record could not be written: {0}")]
    WriteFailed(String),
    /// A checkpoint could not be made.
    #[error("no audit checkpoint could be made: {0}")]
    Checkpoint(String),
    /// The writer has stopped.
    #[error("the audit writer has stopped")]
    Stopped,
}

/// Signs checkpoints: the HSM's audit signing key.
pub trait Signer: Send + Sync {
    /// Signs `message(version)` with the newest key version; that version
    /// and the Ed25519 signature.
    fn sign(&self, message: &dyn Fn(u32) -> Vec<u8>) -> Result<(u32, [u8; 64]), String>;
}

impl Signer for tde_hsm::Hsm {
    fn sign(&self, message: &dyn Fn(u32) -> Vec<u8>) -> Result<(u32, [u8; 64]), String> {
        self.audit_sign(message)
            .map(|s| (s.version, s.signature))
            .map_err(|e| e.to_string())
    }
}

/// `[audit]` settings the writer uses.
#[derive(Debug, Clone)]
pub struct AuditSettings {
    /// Node id in every record and checkpoint.
    pub node: String,
    /// A checkpoint after this many records.
    pub checkpoint_records: u64,
    /// A checkpoint at least this often while records are written.
    pub checkpoint_interval: Duration,
    /// Told of every commit (the sinks wait on it).
    pub wake: Arc<sink::Wake>,
    /// What the writer tells the metrics.
    pub stats: Arc<AuditStats>,
}

/// What the audit writer tells the metrics (`/metrics`, `/health`); the
/// metrics registry holds clones of the same counters.
#[derive(Debug)]
pub struct AuditStats {
    /// Records handed to the writer and not yet committed or refused.
    pub queued: Gauge,
    /// Records committed.
    pub committed: Counter,
    /// Commits that failed (each refused every record in it).
    pub failed_commits: Counter,
    /// The last commit failed; the next one that succeeds clears it.
    pub failing: AtomicBool,
    /// Seconds per commit (one transaction and fsync for a whole batch).
    pub commit_seconds: Histogram,
}

impl Default for AuditStats {
    fn default() -> Self {
        Self {
            queued: Gauge::default(),
            committed: Counter::default(),
            failed_commits: Counter::default(),
            failing: AtomicBool::new(false),
            // 100 µs .. ~3 s: an fsync on a fast disk to a stalled one.
            commit_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
        }
    }
}

/// Which records a requested checkpoint covers.
#[derive(Debug, Clone, Copy)]
enum Cover {
    /// From the last checkpoint to the head.
    Head,
    /// Exactly this range.
    Range(u64, u64),
}

// Records are the hot path and checkpoints rare: boxing every record to
// shrink the rare variant's padding would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Job {
    Record(AuditRecord, SyncSender<Written>),
    Checkpoint(
        &'static str,
        Cover,
        SyncSender<Result<Option<Checkpoint>, AuditError>>,
    ),
}

/// A handle to append records; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: SyncSender<Job>,
    stats: Arc<AuditStats>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").finish_non_exhaustive()
    }
}

/// The writer thread; join it after every [`AuditLog`] is dropped to flush.
#[derive(Debug)]
pub struct AuditWriter(JoinHandle<()>);

impl AuditWriter {
    /// Waits for the writer to commit what is queued, write the shutdown
    /// checkpoint and stop.
    pub fn join(self) {
        let _ = self.0.join();
    }
}

impl AuditLog {
    /// Starts the writer on the store database at `path`. Also returns what
    /// the start-up check of the chain's tail against the newest checkpoint
    /// found (records removed or changed while the daemon was down), for
    /// the caller to audit.
    pub fn start(
        path: &Path,
        settings: AuditSettings,
        signer: Arc<dyn Signer>,
    ) -> Result<(AuditLog, AuditWriter, Vec<String>), AuditError> {
        let conn = store::connect(path).map_err(|e| AuditError::WriteFailed(e.to_string()))?;
        let (tx, rx) = mpsc::sync_channel::<Job>(QUEUE);
        let stats = settings.stats.clone();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let handle = std::thread::Builder::new()
            .name("tde-audit".into())
            .spawn(move || {
                match Writer::open(conn, settings, signer) {
                    Ok((w, findings)) => {
                        let _ = ready_tx.send(Ok(findings));
                        w.run(rx);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(AuditError::WriteFailed(e.to_string())));
                    }
                };
            })
            .map_err(|e| AuditError::WriteFailed(e.to_string()))?;
        let findings = ready_rx.recv().map_err(|_| AuditError::Stopped)??;
        Ok((AuditLog { tx, stats }, AuditWriter(handle), findings))
    }

    /// Appends a record and waits until it is durable. Returns its sequence
    /// number.
    pub fn append(&self, record: AuditRecord) -> Result<u64, AuditError> {
        log_line(&record);
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        self.send_record(record, done_tx)?;
        done_rx.recv().map_err(|_| AuditError::Stopped)?
    }

    /// Queues a record without waiting for it: the refusal of a request
    /// answered on the connection's own task (no key was used, and the
    /// answer need not wait for the disk). A record the log cannot take
    /// is reported by the writer.
    pub fn submit(&self, record: AuditRecord) -> Result<(), AuditError> {
        log_line(&record);
        let (done_tx, _) = mpsc::sync_channel(1);
        self.send_record(record, done_tx)
    }

    fn send_record(
        &self,
        record: AuditRecord,
        done: SyncSender<Written>,
    ) -> Result<(), AuditError> {
        self.stats.queued.inc();
        self.tx.send(Job::Record(record, done)).map_err(|_| {
            self.stats.queued.dec();
            AuditError::Stopped
        })
    }

    /// Writes a checkpoint from the last one to the newest record now
    /// (`None` if no record is unsigned). Fails if it cannot be signed.
    pub fn checkpoint(&self, reason: &'static str) -> Result<Option<Checkpoint>, AuditError> {
        self.request(reason, Cover::Head)
    }

    /// Writes a checkpoint of exactly `first..=last` (an export's range, or
    /// a range about to be pruned).
    pub fn checkpoint_range(
        &self,
        reason: &'static str,
        first: u64,
        last: u64,
    ) -> Result<Checkpoint, AuditError> {
        self.request(reason, Cover::Range(first, last))?
            .ok_or_else(|| AuditError::Checkpoint("an empty range".into()))
    }

    fn request(
        &self,
        reason: &'static str,
        cover: Cover,
    ) -> Result<Option<Checkpoint>, AuditError> {
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        self.tx
            .send(Job::Checkpoint(reason, cover, done_tx))
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
    "audit_list",
    "audit_read",
    "p11_objects",
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

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// RFC 3339 UTC with milliseconds.
pub fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn to_hash(h: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    if h.len() == 32 {
        out.copy_from_slice(h);
    }
    out
}

/// The newest record: its number, chain hash and time.
fn chain_head(conn: &Connection) -> rusqlite::Result<(u64, [u8; 32], u64)> {
    let row: Option<(i64, Vec<u8>, Option<i64>)> = conn
        .query_row(
            "SELECT seq, hash, time_ms FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    Ok(match row {
        Some((seq, h, t)) => (
            u64::try_from(seq).unwrap_or(0),
            to_hash(&h),
            u64::try_from(t.unwrap_or(0)).unwrap_or(0),
        ),
        None => (0, GENESIS, 0),
    })
}

/// The chain hash of record `seq` (the genesis hash for 0): from its row,
/// from the next row's `prev_hash` if it was pruned, or from a checkpoint
/// whose head it is.
pub fn hash_at(conn: &Connection, seq: u64) -> rusqlite::Result<Option<[u8; 32]>> {
    if seq == 0 {
        return Ok(Some(GENESIS));
    }
    let s = i64::try_from(seq).unwrap_or(i64::MAX);
    let row: Option<Vec<u8>> = conn
        .query_row("SELECT hash FROM audit WHERE seq = ?1", [s], |r| r.get(0))
        .optional()?;
    if let Some(h) = row {
        return Ok(Some(to_hash(&h)));
    }
    let next: Option<Vec<u8>> = conn
        .query_row(
            "SELECT prev_hash FROM audit WHERE seq = ?1",
            [s.saturating_add(1)],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(h) = next {
        return Ok(Some(to_hash(&h)));
    }
    Ok(checkpoints_ending_at(conn, seq)?
        .into_iter()
        .find_map(|c| hex::decode(&c.head).ok().map(|h| to_hash(&h))))
}

fn checkpoints_ending_at(conn: &Connection, seq: u64) -> rusqlite::Result<Vec<Checkpoint>> {
    let mut st = conn.prepare_cached("SELECT body FROM audit_checkpoint WHERE last_seq = ?1")?;
    let rows = st.query_map([i64::try_from(seq).unwrap_or(i64::MAX)], |r| {
        r.get::<_, String>(0)
    })?;
    Ok(rows
        .filter_map(|b| b.ok().and_then(|b| Checkpoint::parse(&b).ok()))
        .collect())
}

/// The checkpoints whose last record is in `from..=to`, oldest first.
pub fn checkpoints_in(conn: &Connection, from: u64, to: u64) -> rusqlite::Result<Vec<String>> {
    let mut st = conn.prepare(
        "SELECT body FROM audit_checkpoint WHERE last_seq BETWEEN ?1 AND ?2 ORDER BY last_seq, id",
    )?;
    let rows = st.query_map(
        params![
            i64::try_from(from).unwrap_or(i64::MAX),
            i64::try_from(to).unwrap_or(i64::MAX)
        ],
        |r| r.get::<_, String>(0),
    )?;
    rows.collect()
}

/// The chain hash of one record.
pub fn chain_hash(prev: &[u8; 32], record: &[u8]) -> [u8; 32] {
    Sha256::new()
        .chain_update(prev)
        .chain_update(record)
        .finalize()
        .into()
}

/// One record's outcome inside a batch.
type Written = Result<u64, AuditError>;

struct Writer {
    conn: Connection,
    settings: AuditSettings,
    signer: Arc<dyn Signer>,
    seq: u64,
    prev: [u8; 32],
    last_ms: u64,
    /// The last record a checkpoint covers (through the head).
    signed_to: u64,
    last_checkpoint: Instant,
    store_id: Option<String>,
    /// The last signing failure was logged (one line per failure streak).
    sign_failing: bool,
}

impl Writer {
    fn open(
        conn: Connection,
        settings: AuditSettings,
        signer: Arc<dyn Signer>,
    ) -> rusqlite::Result<(Writer, Vec<String>)> {
        let (seq, prev, last_ms) = chain_head(&conn)?;
        let newest: Option<String> = conn
            .query_row(
                "SELECT body FROM audit_checkpoint ORDER BY id DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?;
        let newest = newest.and_then(|b| Checkpoint::parse(&b).ok());
        let mut findings = Vec::new();
        let mut signed_to = 0;
        if let Some(c) = &newest {
            signed_to = c.last_seq.min(seq);
            if c.last_seq > seq {
                findings.push(format!(
                    "audit records {}..={} were removed: checkpoint {} signed them, the chain now ends at {seq}",
                    seq + 1,
                    c.last_seq,
                    c.last_seq
                ));
            } else if hash_at(&conn, c.last_seq)?.map(hex::encode).as_deref() != Some(&c.head) {
                findings.push(format!(
                    "audit records up to {} were changed after checkpoint {} signed them",
                    c.last_seq, c.last_seq
                ));
            }
        }
        let w = Writer {
            conn,
            settings,
            signer,
            seq,
            prev,
            last_ms,
            signed_to,
            last_checkpoint: Instant::now(),
            store_id: None,
            sign_failing: false,
        };
        Ok((w, findings))
    }

    fn run(mut self, rx: Receiver<Job>) {
        loop {
            let wait = self
                .settings
                .checkpoint_interval
                .saturating_sub(self.last_checkpoint.elapsed())
                .max(Duration::from_millis(10));
            let first = match rx.recv_timeout(wait) {
                Ok(j) => j,
                Err(RecvTimeoutError::Timeout) => {
                    self.maybe_checkpoint();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    // Every handle dropped and the queue empty: the
                    // daemon is stopping.
                    if self.seq > self.signed_to {
                        let _ = self.checkpoint("shutdown", Cover::Head);
                    }
                    return;
                }
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(j) => batch.push(j),
                    Err(_) => break,
                }
            }
            // Records commit together; a checkpoint request runs after the
            // records queued before it.
            let mut records = Vec::new();
            for job in batch {
                match job {
                    Job::Record(r, done) => records.push((r, done)),
                    Job::Checkpoint(reason, cover, done) => {
                        self.commit_records(std::mem::take(&mut records));
                        let _ = done.send(self.checkpoint(reason, cover));
                    }
                }
            }
            self.commit_records(records);
            self.maybe_checkpoint();
        }
    }

    fn commit_records(&mut self, batch: Vec<(AuditRecord, SyncSender<Written>)>) {
        if batch.is_empty() {
            return;
        }
        let now = now_ms().max(self.last_ms);
        let started = Instant::now();
        let committed = commit(
            &mut self.conn,
            &self.settings.node,
            &batch,
            (self.seq, self.prev),
            now,
        );
        let stats = &self.settings.stats;
        stats
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        stats.queued.dec_by(batch.len() as i64);
        stats.failing.store(committed.is_err(), Ordering::Relaxed);
        match committed {
            Ok((results, new_seq, new_prev)) => {
                stats.committed.inc_by(batch.len() as u64);
                for ((_, done), r) in batch.iter().zip(results) {
                    let _ = done.send(r);
                }
                self.seq = new_seq;
                self.prev = new_prev;
                self.last_ms = now;
                self.settings.wake.committed(new_seq);
            }
            Err(e) => {
                stats.failed_commits.inc();
                tracing::error!(error = %e, records = batch.len(), "audit commit failed; refusing the operations");
                for (_, done) in &batch {
                    let _ = done.send(Err(AuditError::WriteFailed(e.to_string())));
                }
                if let Ok((seq, prev, _)) = chain_head(&self.conn) {
                    (self.seq, self.prev) = (seq, prev);
                }
            }
        }
    }

    fn maybe_checkpoint(&mut self) {
        let unsigned = self.seq.saturating_sub(self.signed_to);
        if unsigned > 0
            && (unsigned >= self.settings.checkpoint_records
                || self.last_checkpoint.elapsed() >= self.settings.checkpoint_interval)
        {
            let _ = self.checkpoint("interval", Cover::Head);
        }
    }

    fn store_id(&mut self) -> Result<String, AuditError> {
        if let Some(id) = &self.store_id {
            return Ok(id.clone());
        }
        let id: Vec<u8> = self
            .conn
            .query_row("SELECT store_id FROM meta WHERE id = 1", [], |r| r.get(0))
            .map_err(|e| AuditError::Checkpoint(format!("the store id: {e}")))?;
        let id = hex::encode(id);
        self.store_id = Some(id.clone());
        Ok(id)
    }

    /// Makes, signs and stores a checkpoint. A failure (sealed HSM, full
    /// disk) leaves the records unsigned until the next one.
    fn checkpoint(
        &mut self,
        reason: &'static str,
        cover: Cover,
    ) -> Result<Option<Checkpoint>, AuditError> {
        self.last_checkpoint = Instant::now();
        let r = self.make_checkpoint(reason, cover);
        match &r {
            Err(e) if !self.sign_failing => {
                tracing::warn!(error = %e, reason, "no audit checkpoint; the records stay unsigned until the next one")
            }
            Ok(Some(c)) if self.sign_failing => {
                tracing::info!(last_seq = c.last_seq, "audit checkpoints are signed again")
            }
            _ => {}
        }
        self.sign_failing = r.is_err();
        r
    }

    fn make_checkpoint(
        &mut self,
        reason: &'static str,
        cover: Cover,
    ) -> Result<Option<Checkpoint>, AuditError> {
        let (first, last) = match cover {
            Cover::Head => (self.signed_to + 1, self.seq),
            Cover::Range(first, last) => (first, last.min(self.seq)),
        };
        if first > last {
            return Ok(None);
        }
        let read = |e: rusqlite::Error| AuditError::Checkpoint(e.to_string());
        let missing = |s: u64| AuditError::Checkpoint(format!("no chain hash for record {s}"));
        let anchor = hash_at(&self.conn, first - 1)
            .map_err(read)?
            .ok_or_else(|| missing(first - 1))?;
        let head = hash_at(&self.conn, last)
            .map_err(read)?
            .ok_or_else(|| missing(last))?;
        let now = now_ms();
        let mut c = Checkpoint {
            kind: "checkpoint".into(),
            store: self.store_id()?,
            node: self.settings.node.clone(),
            first_seq: first,
            last_seq: last,
            count: last - first + 1,
            anchor: hex::encode(anchor),
            head: hex::encode(head),
            time: rfc3339_ms(now),
            reason: reason.into(),
            key_version: 0,
            signature: String::new(),
        };
        let (version, sig) = self
            .signer
            .sign(&|version| {
                let mut c = c.clone();
                c.key_version = version;
                c.signed_bytes()
            })
            .map_err(AuditError::Checkpoint)?;
        c.set_signature(version, &sig);
        self.conn
            .execute(
                "INSERT INTO audit_checkpoint (last_seq, body) VALUES (?1, ?2)",
                params![i64::try_from(last).unwrap_or(i64::MAX), c.to_line()],
            )
            .map_err(|e| AuditError::Checkpoint(e.to_string()))?;
        if matches!(cover, Cover::Head) {
            self.signed_to = last;
        }
        self.settings.wake.committed(self.seq);
        Ok(Some(c))
    }
}

/// Commits `batch` in one transaction. Each record runs inside its own
/// savepoint: a record whose insert or registration fails is rolled back
/// alone and refused alone (its sequence number goes to the next record),
/// so one peer's bad request cannot fail the others' records. The
/// transaction as a whole failing (disk full, I/O error) fails them all.
fn commit(
    conn: &mut Connection,
    node: &str,
    batch: &[(AuditRecord, SyncSender<Written>)],
    (mut seq, mut prev): (u64, [u8; 32]),
    time_ms: u64,
) -> rusqlite::Result<(Vec<Written>, u64, [u8; 32])> {
    let tx = conn.transaction()?;
    let mut results = Vec::with_capacity(batch.len());
    let time = rfc3339_ms(time_ms);
    for (record, _) in batch {
        tx.execute_batch("SAVEPOINT record")?;
        let at = Sequenced {
            seq: seq + 1,
            time: time.clone(),
            time_ms,
            node,
            prev: hex::encode(prev),
            record,
        };
        match insert(&tx, &at, &prev) {
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

/// Inserts one record after `prev`, with its registration if the operation
/// succeeded; returns the record's chain hash.
fn insert(
    tx: &rusqlite::Transaction<'_>,
    at: &Sequenced<'_>,
    prev: &[u8; 32],
) -> rusqlite::Result<[u8; 32]> {
    let json = serde_json::to_string(at)
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    let hash = chain_hash(prev, json.as_bytes());
    tx.prepare_cached(
        "INSERT INTO audit (seq, record, prev_hash, hash, time_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        at.seq as i64,
        json,
        &prev[..],
        &hash[..],
        at.time_ms as i64
    ])?;
    if let Some(r) = at
        .record
        .registration
        .as_ref()
        .filter(|_| at.record.result == "ok")
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

/// Walks the chain in `conn` from its oldest record (after a prune, the
/// first one left, chained from its stored `prev_hash`), recomputing every
/// hash.
pub fn verify_chain(conn: &Connection) -> Result<ChainReport, ChainError> {
    let read = |e: rusqlite::Error| ChainError::Read(e.to_string());
    let mut stmt = conn
        .prepare("SELECT seq, record, prev_hash, hash FROM audit ORDER BY seq")
        .map_err(read)?;
    let mut rows = stmt.query([]).map_err(read)?;
    let mut prev: Option<[u8; 32]> = None;
    let mut expected = 0u64;
    let mut records = 0u64;
    while let Some(r) = rows.next().map_err(read)? {
        let seq = u64::try_from(r.get::<_, i64>(0).map_err(read)?).unwrap_or(0);
        let record: String = r.get(1).map_err(read)?;
        let prev_hash = to_hash(&r.get::<_, Vec<u8>>(2).map_err(read)?);
        let hash: Vec<u8> = r.get(3).map_err(read)?;
        let prev = prev.get_or_insert_with(|| {
            expected = seq;
            if seq == 1 { GENESIS } else { prev_hash }
        });
        if seq != expected {
            return Err(ChainError::Removed(seq));
        }
        let inner = serde_json::from_str::<serde_json::Value>(&record).ok();
        let field = |k: &str| inner.as_ref().and_then(|v| v.get(k).cloned());
        let computed = chain_hash(prev, record.as_bytes());
        if field("seq").and_then(|v| v.as_u64()) != Some(seq)
            || prev_hash != *prev
            || hash != computed
            || field("prev").is_some_and(|p| p.as_str() != Some(hex::encode(*prev).as_str()))
        {
            return Err(ChainError::Changed(seq));
        }
        *prev = computed;
        expected += 1;
        records += 1;
    }
    Ok(ChainReport {
        records,
        head: prev.unwrap_or(GENESIS),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::tests_support::*;

    #[test]
    fn chain_detects_change_removal_and_insertion() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("tde.db");
        let hsm = unsealed(&path);
        let (log, writer, _) = AuditLog::start(&path, settings(100), hsm).expect("start");
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
        let batch = vec![
            (AuditRecord::new("data", "decrypt"), tx.clone()),
            (bad, tx.clone()),
            (AuditRecord::new("admin", "key_rotate"), tx),
        ];
        let (results, seq, _) = commit(&mut conn, "n", &batch, (0, GENESIS), 1).expect("commit");
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

#[cfg(test)]
mod checkpoint_tests {
    use super::tests_support::*;
    use super::*;

    fn public_keys(hsm: &tde_hsm::Hsm) -> Vec<(u32, [u8; 32])> {
        hsm.audit_public_keys()
            .expect("keys")
            .into_iter()
            .map(|k| (k.version, k.public))
            .collect()
    }

    fn stored(path: &Path) -> Vec<Checkpoint> {
        let conn = crate::store::connect(path).expect("conn");
        checkpoints_in(&conn, 0, u64::MAX >> 1)
            .expect("read")
            .iter()
            .map(|b| Checkpoint::parse(b).expect("parse"))
            .collect()
    }

    /// Every N records, on request and at shutdown, a signed checkpoint
    /// whose head is the chain hash of its last record; while the HSM is
    /// sealed none is made and the records wait for the next one.
    #[test]
    fn checkpoints_sign_the_chain_and_wait_out_a_seal() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("tde.db");
        let hsm = unsealed(&path);
        let (log, writer, findings) =
            AuditLog::start(&path, settings(10), hsm.clone()).expect("start");
        assert!(findings.is_empty());
        for _ in 0..25 {
            log.append(AuditRecord::new("data", "decrypt"))
                .expect("append");
        }
        let by_count = stored(&path);
        assert_eq!(
            by_count
                .iter()
                .map(|c| (c.first_seq, c.last_seq))
                .collect::<Vec<_>>(),
            [(1, 10), (11, 20)]
        );
        hsm.close().expect("seal");
        assert!(log.checkpoint("request").is_err(), "sealed: cannot sign");
        for _ in 0..10 {
            log.append(AuditRecord::new("data", "decrypt"))
                .expect("append");
        }
        assert_eq!(stored(&path).len(), 2);
        reunseal(&path, &hsm);
        // The writer may have signed them already (a retry after its last
        // commit); either way one checkpoint covers 21..=35 now.
        log.checkpoint("unseal").expect("signed");
        let c = stored(&path).pop().expect("one");
        assert_eq!((c.first_seq, c.last_seq), (21, 35));
        log.append(AuditRecord::new("admin", "seal"))
            .expect("append");
        drop(log);
        writer.join();
        let all = stored(&path);
        assert_eq!(
            all.last()
                .map(|c| (c.first_seq, c.last_seq, c.reason.as_str())),
            Some((36, 36, "shutdown"))
        );
        let keys = public_keys(&hsm);
        let conn = crate::store::connect(&path).expect("conn");
        for c in &all {
            c.verify(&keys).expect("signature");
            let head = hash_at(&conn, c.last_seq).expect("read").expect("hash");
            assert_eq!(c.head, hex::encode(head));
            let anchor = hash_at(&conn, c.first_seq - 1)
                .expect("read")
                .expect("hash");
            assert_eq!(c.anchor, hex::encode(anchor));
        }
        let mut forged = all[0].clone();
        forged.last_seq += 1;
        forged.count += 1;
        assert!(forged.verify(&keys).is_err());
    }

    /// Records removed from the tail while the daemon is down, or changed
    /// under a checkpoint, are reported when the writer starts.
    #[test]
    fn a_removed_or_changed_tail_is_found_at_start() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("tde.db");
        let hsm = unsealed(&path);
        let (log, writer, _) = AuditLog::start(&path, settings(1000), hsm.clone()).expect("start");
        for _ in 0..20 {
            log.append(AuditRecord::new("data", "decrypt"))
                .expect("append");
        }
        drop(log);
        writer.join();
        let conn = crate::store::connect(&path).expect("conn");
        conn.execute("DELETE FROM audit WHERE seq > 15", [])
            .expect("delete");
        let (log, writer, findings) =
            AuditLog::start(&path, settings(1000), hsm.clone()).expect("start");
        assert_eq!(findings.len(), 1, "{findings:?}");
        assert!(findings[0].contains("16..=20 were removed"), "{findings:?}");
        log.append(AuditRecord::new("internal", "daemon_start"))
            .expect("append");
        drop(log);
        writer.join();
        conn.execute(
            "UPDATE audit SET hash = zeroblob(32) WHERE seq = (SELECT max(seq) FROM audit)",
            [],
        )
        .expect("edit");
        let (_log, _writer, findings) = AuditLog::start(&path, settings(1000), hsm).expect("start");
        assert!(
            findings.iter().any(|f| f.contains("were changed")),
            "{findings:?}"
        );
    }
}

#[cfg(test)]
mod tests_support {
    use super::*;

    /// A store with an unsealed HSM (dev mode, one share) whose audit key
    /// signs the checkpoints; the share is kept beside the store.
    pub fn unsealed(path: &Path) -> Arc<tde_hsm::Hsm> {
        let store = Arc::new(crate::store::SqliteStore::open(path).expect("open"));
        let out =
            tde_hsm::Hsm::init(store.as_ref(), 1, 1, true, "admin", b"officer-pw-1").expect("init");
        std::fs::write(path.with_extension("share"), out.shares[0].expose()).expect("share");
        let hsm = tde_hsm::Hsm::open(store, Default::default()).expect("hsm");
        hsm.unseal(out.shares[0].expose()).expect("unseal");
        Arc::new(hsm)
    }

    /// Unseals again with the share kept beside the store.
    pub fn reunseal(path: &Path, hsm: &tde_hsm::Hsm) {
        let share = std::fs::read(path.with_extension("share")).expect("share");
        hsm.unseal(&share).expect("unseal");
    }

    pub fn settings(records: u64) -> AuditSettings {
        AuditSettings {
            node: "node-1".into(),
            checkpoint_records: records,
            checkpoint_interval: Duration::from_secs(3600),
            wake: Default::default(),
            stats: Default::default(),
        }
    }
}
