//! Audit sinks, like Vault's audit devices: a JSON-lines file and syslog
//! (RFC 5424 over the local socket). The store's record stays the source
//! of truth and is written first; each sink follows the store from its own
//! cursor (kept in the store), so a sink that was down or fell behind
//! catches up from where it stopped, records and checkpoints alike, and a
//! request never waits for a sink.
//!
//! A file sink is reopened on SIGHUP (after logrotate moved it). Records a
//! sink has not been given are never pruned.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

use crate::store;

/// Records given to a sink per step.
const BATCH: i64 = 1000;
/// Wait between attempts while a sink fails.
const RETRY: Duration = Duration::from_secs(1);
/// At most one read of the store per this while a sink keeps up: on a busy
/// host a step gives it many records at once rather than one per commit,
/// which would cost a read transaction (and CPU the requests need) per
/// record. A record reaches a sink this much later at most.
const PACE: Duration = Duration::from_millis(100);

/// Where a sink writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkKind {
    /// A JSON-lines file: each record and checkpoint line as stored.
    File(PathBuf),
    /// RFC 5424 messages to a local datagram socket (`/dev/log`).
    Syslog {
        /// The socket.
        socket: PathBuf,
        /// Facility number (RFC 5424 section 6.2.1).
        facility: u8,
        /// APP-NAME.
        app_name: String,
        /// HOSTNAME.
        hostname: String,
    },
}

impl SinkKind {
    /// Its name in status and in the cursor table.
    pub fn name(&self) -> String {
        match self {
            SinkKind::File(p) => format!("file:{}", p.display()),
            SinkKind::Syslog { socket, .. } => format!("syslog:{}", socket.display()),
        }
    }
}

/// A facility name (`auth`, `authpriv`, `daemon`, `local0`..`local7`) as
/// its RFC 5424 number.
pub fn facility(name: &str) -> Option<u8> {
    Some(match name {
        "auth" => 4,
        "daemon" => 3,
        "authpriv" => 10,
        "user" => 1,
        l => l
            .strip_prefix("local")
            .and_then(|n| n.parse::<u8>().ok())
            .filter(|n| *n <= 7)
            .map(|n| 16 + n)?,
    })
}

/// What `tde status` says of a sink.
#[derive(Debug)]
pub struct SinkState {
    /// [`SinkKind::name`].
    pub name: String,
    delivered: AtomicU64,
    error: Mutex<Option<String>>,
}

impl SinkState {
    /// The last record it was given.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::SeqCst)
    }

    /// Why its last attempt failed (`None` while it works).
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Wakes the sinks when records are committed.
#[derive(Debug, Default)]
pub struct Wake {
    head: Mutex<u64>,
    cv: Condvar,
}

impl Wake {
    /// The writer committed up to `head`.
    pub fn committed(&self, head: u64) {
        *self.head.lock().unwrap_or_else(|p| p.into_inner()) = head;
        self.cv.notify_all();
    }

    /// The newest committed record the writer told of.
    pub fn head(&self) -> u64 {
        *self.head.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait(&self, beyond: u64, at_most: Duration) {
        let g = self.head.lock().unwrap_or_else(|p| p.into_inner());
        if *g <= beyond {
            let _ = self.cv.wait_timeout(g, at_most);
        }
    }
}

/// The running sinks.
#[derive(Debug, Default)]
pub struct Sinks {
    states: Vec<Arc<SinkState>>,
    stop: Arc<AtomicBool>,
    reopen: Arc<AtomicU64>,
    wake: Arc<Wake>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Sinks {
    /// Starts one thread per sink over the store at `path`. A sink new to
    /// the store starts at the newest record.
    pub fn start(path: &Path, kinds: Vec<SinkKind>, wake: Arc<Wake>) -> Result<Sinks, String> {
        let mut s = Sinks {
            wake,
            ..Sinks::default()
        };
        for kind in kinds {
            let conn = store::connect(path).map_err(|e| e.to_string())?;
            // A sink's place is not evidence: its commits need no fsync of
            // their own (WAL, NORMAL: durable at the next checkpoint). After
            // a crash a sink may be given again what it got last: at least
            // once, never a gap.
            conn.execute_batch("PRAGMA synchronous = NORMAL;")
                .map_err(|e| e.to_string())?;
            let cursor = Cursor::load(&conn, &kind.name()).map_err(|e| e.to_string())?;
            let state = Arc::new(SinkState {
                name: kind.name(),
                delivered: AtomicU64::new(cursor.seq),
                error: Mutex::new(None),
            });
            let mut worker = Worker {
                conn,
                kind,
                out: None,
                cursor,
                state: state.clone(),
                stop: s.stop.clone(),
                reopen: s.reopen.clone(),
                opened_at: 0,
                wake: s.wake.clone(),
                synced: std::time::Instant::now(),
                saved: std::time::Instant::now(),
            };
            let t = std::thread::Builder::new()
                .name("tde-audit-sink".into())
                .spawn(move || worker.run())
                .map_err(|e| e.to_string())?;
            s.states.push(state);
            s.threads.lock().unwrap_or_else(|p| p.into_inner()).push(t);
        }
        Ok(s)
    }

    /// The sinks' states.
    pub fn states(&self) -> &[Arc<SinkState>] {
        &self.states
    }

    /// The writer's latest committed record.
    pub fn head(&self) -> u64 {
        self.wake.head()
    }

    /// Reopens file sinks (SIGHUP, after logrotate).
    pub fn reopen(&self) {
        self.reopen.fetch_add(1, Ordering::SeqCst);
        self.wake.cv.notify_all();
    }

    /// Gives each sink what the store has, then stops them (a sink that
    /// keeps failing is left behind after a few seconds; it catches up at
    /// the next start).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake.cv.notify_all();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

/// How far a sink got.
#[derive(Debug, Clone, Copy)]
struct Cursor {
    seq: u64,
    checkpoint: i64,
}

impl Cursor {
    fn load(conn: &Connection, name: &str) -> rusqlite::Result<Cursor> {
        let row: Option<(i64, i64)> = conn
            .query_row(
                "SELECT seq, checkpoint FROM audit_sink WHERE name = ?1",
                [name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        if let Some((seq, checkpoint)) = row {
            return Ok(Cursor {
                seq: u64::try_from(seq).unwrap_or(0),
                checkpoint,
            });
        }
        let (seq, checkpoint): (i64, i64) = conn.query_row(
            "SELECT (SELECT COALESCE(max(seq), 0) FROM audit),
                    (SELECT COALESCE(max(id), 0) FROM audit_checkpoint)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        conn.execute(
            "INSERT INTO audit_sink (name, seq, checkpoint) VALUES (?1, ?2, ?3)",
            params![name, seq, checkpoint],
        )?;
        Ok(Cursor {
            seq: u64::try_from(seq).unwrap_or(0),
            checkpoint,
        })
    }
}

enum Out {
    File(std::fs::File),
    Syslog(UnixDatagram),
}

struct Worker {
    conn: Connection,
    kind: SinkKind,
    out: Option<Out>,
    cursor: Cursor,
    state: Arc<SinkState>,
    stop: Arc<AtomicBool>,
    reopen: Arc<AtomicU64>,
    opened_at: u64,
    wake: Arc<Wake>,
    /// The file sink's last fsync (at most one a second).
    synced: std::time::Instant,
    /// When the cursor was last saved in the store.
    saved: std::time::Instant,
}

/// One line for a sink: a record (with its severity) or a checkpoint.
struct Line {
    text: String,
    severity: u8,
    msgid: &'static str,
}

impl Worker {
    fn run(&mut self) {
        let mut failures_since_stop = 0;
        loop {
            let stopping = self.stop.load(Ordering::SeqCst);
            match self.step() {
                Ok(0) if stopping => {
                    if let Some(Out::File(f)) = &self.out {
                        let _ = f.sync_data();
                    }
                    let _ = self.save();
                    return;
                }
                Ok(0) => {
                    if self.saved.elapsed() >= Duration::from_secs(1) {
                        let _ = self.save();
                    }
                    self.wake.wait(self.cursor.seq, Duration::from_secs(1))
                }
                // A partial batch: it has what there was; let more come.
                // (A plain sleep: the writer's wake-up on every commit
                // would cut a wait on it short.)
                Ok(n) if !stopping && n < BATCH as usize => std::thread::sleep(PACE),
                Ok(_) => {}
                Err(e) => {
                    let first = self.state.error().is_none();
                    if first {
                        tracing::warn!(sink = %self.state.name, error = %e, "audit sink failing; it catches up from the store when it works again");
                    }
                    *self.state.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    self.out = None;
                    if stopping {
                        failures_since_stop += 1;
                        if failures_since_stop >= 3 {
                            return;
                        }
                    }
                    std::thread::sleep(RETRY);
                }
            }
        }
    }

    /// Gives the sink the next batch; how many lines.
    fn step(&mut self) -> Result<usize, String> {
        let lines = self
            .next_lines()
            .map_err(|e| format!("reading the store: {e}"))?;
        let Some((lines, cursor)) = lines else {
            return Ok(0);
        };
        self.write(&lines)?;
        self.cursor = cursor;
        // Saved at most once a second (and when stopping): a write of its
        // own per batch would hold the store's write lock between the
        // audit writer's commits.
        if self.saved.elapsed() >= Duration::from_secs(1) || self.stop.load(Ordering::SeqCst) {
            self.save()?;
        }
        self.state.delivered.store(cursor.seq, Ordering::SeqCst);
        if self.state.error().is_some() {
            tracing::info!(sink = %self.state.name, delivered = cursor.seq, "audit sink works again");
            *self.state.error.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        Ok(lines.len())
    }

    fn save(&mut self) -> Result<(), String> {
        self.conn
            .execute(
                "UPDATE audit_sink SET seq = ?2, checkpoint = ?3 WHERE name = ?1",
                params![
                    self.state.name,
                    i64::try_from(self.cursor.seq).unwrap_or(i64::MAX),
                    self.cursor.checkpoint
                ],
            )
            .map_err(|e| format!("saving the sink's place: {e}"))?;
        self.saved = std::time::Instant::now();
        Ok(())
    }

    /// Records after the cursor, then the checkpoints over them.
    fn next_lines(&mut self) -> rusqlite::Result<Option<(Vec<Line>, Cursor)>> {
        let mut lines = Vec::new();
        let mut cursor = self.cursor;
        {
            let mut st = self.conn.prepare_cached(
                "SELECT seq, record FROM audit WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )?;
            let rows = st.query_map(
                params![i64::try_from(cursor.seq).unwrap_or(i64::MAX), BATCH],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
            )?;
            for row in rows {
                let (seq, text) = row?;
                let severity = if text.contains("\"op\":\"tamper") {
                    2
                } else if text.contains("\"result\":\"error\"") {
                    4
                } else {
                    6
                };
                lines.push(Line {
                    text,
                    severity,
                    msgid: "audit",
                });
                cursor.seq = u64::try_from(seq).unwrap_or(0);
            }
        }
        let mut st = self.conn.prepare_cached(
            "SELECT id, body FROM audit_checkpoint WHERE id > ?1 AND last_seq <= ?2 ORDER BY id",
        )?;
        let rows = st.query_map(
            params![
                cursor.checkpoint,
                i64::try_from(cursor.seq).unwrap_or(i64::MAX)
            ],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
        )?;
        for row in rows {
            let (id, text) = row?;
            lines.push(Line {
                text,
                severity: 5,
                msgid: "checkpoint",
            });
            cursor.checkpoint = id;
        }
        Ok((!lines.is_empty()).then_some((lines, cursor)))
    }

    fn open(&mut self) -> Result<&mut Out, String> {
        let generation = self.reopen.load(Ordering::SeqCst);
        if generation != self.opened_at {
            self.out = None;
        }
        if self.out.is_none() {
            self.out = Some(match &self.kind {
                SinkKind::File(p) => Out::File(
                    std::fs::OpenOptions::new()
                        .append(true)
                        .create(true)
                        .mode(0o600)
                        .open(p)
                        .map_err(|e| format!("{}: {e}", p.display()))?,
                ),
                SinkKind::Syslog { .. } => {
                    Out::Syslog(UnixDatagram::unbound().map_err(|e| e.to_string())?)
                }
            });
            self.opened_at = generation;
        }
        self.out.as_mut().ok_or_else(|| "no sink".to_string())
    }

    fn write(&mut self, lines: &[Line]) -> Result<(), String> {
        let kind = self.kind.clone();
        let sync =
            self.synced.elapsed() >= Duration::from_secs(1) || self.stop.load(Ordering::SeqCst);
        match (self.open()?, &kind) {
            (Out::File(f), SinkKind::File(p)) => {
                let mut buf = Vec::with_capacity(lines.iter().map(|l| l.text.len() + 1).sum());
                for l in lines {
                    buf.extend_from_slice(l.text.as_bytes());
                    buf.push(b'\n');
                }
                // Written at once; on disk within a second (the store holds
                // the records durably already).
                f.write_all(&buf)
                    .and_then(|()| if sync { f.sync_data() } else { Ok(()) })
                    .map_err(|e| format!("{}: {e}", p.display()))?;
                if sync {
                    self.synced = std::time::Instant::now();
                }
                Ok(())
            }
            (
                Out::Syslog(sock),
                SinkKind::Syslog {
                    socket,
                    facility,
                    app_name,
                    hostname,
                },
            ) => {
                for l in lines {
                    // RFC 5424 section 6: <PRI>VERSION TIMESTAMP HOSTNAME
                    // APP-NAME PROCID MSGID STRUCTURED-DATA MSG.
                    let msg = format!(
                        "<{}>1 {} {hostname} {app_name} {} {} - {}",
                        u16::from(*facility) * 8 + u16::from(l.severity),
                        super::rfc3339_ms(super::now_ms()),
                        std::process::id(),
                        l.msgid,
                        l.text
                    );
                    sock.send_to(msg.as_bytes(), socket)
                        .map_err(|e| format!("{}: {e}", socket.display()))?;
                }
                Ok(())
            }
            _ => Err("sink kind changed".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facilities() {
        assert_eq!(facility("authpriv"), Some(10));
        assert_eq!(facility("local7"), Some(23));
        assert_eq!(facility("local8"), None);
        assert_eq!(facility("kern"), None);
    }
}
