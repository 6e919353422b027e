//! The daemon: listeners, connections, shutdown, background tasks.
//!
//! Each connection reads frames in order (the length is checked against the
//! cap before anything is allocated; a frame that started must finish within
//! [`FRAME_TIMEOUT`]), handles each request on the blocking pool, and writes
//! the response. A semaphore caps connections per socket. On SIGTERM or
//! SIGINT the listeners close, connections finish the request in hand, the
//! audit writer commits what is queued, and the sockets are removed.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tde_hsm::store::ObjectStore;
use tde_hsm::{Hsm, TamperPolicy};
use tde_protocol::frame::{Body, FrameReader};
use tde_protocol::{DecodeError, ErrorCode, Frame, Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc, watch};

use crate::audit::sink::{Sinks, Wake};
use crate::audit::{AuditLog, AuditRecord, AuditSettings, AuditStats};
use crate::config::{Config, parse_mode};
use crate::handler::{
    Handled, KeyUses, Peer, RefusalBudget, Reloader, Service, Session, SocketKind, WatchSlots,
};
use crate::metrics::{self, Metrics};
use crate::policy::Policies;
use crate::reload::{Live, Reload};
use crate::store::SqliteStore;
use crate::sys;

/// Time allowed for the rest of a frame once its first byte arrived.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for connections to finish at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

async fn write_response(
    wr: &mut (impl AsyncWriteExt + Unpin),
    resp: &Response,
    op: u16,
    request_id: u64,
) -> std::io::Result<()> {
    // The frame may hold a data key: `encode` gives bytes that are
    // scrubbed as they drop.
    let bytes = match resp.to_frame(op, request_id).encode() {
        Ok(b) => b,
        Err(_) => Response::error(ErrorCode::Internal, "response too large for one frame")
            .to_frame(op, request_id)
            .encode()
            .unwrap_or_else(|_| Body::empty()),
    };
    wr.write_all(&bytes).await
}

/// Why a connection stops reading.
enum Stop {
    /// The peer left, went idle, was too slow, or the daemon is stopping.
    Closed,
    /// A length prefix out of bounds: answered, then closed.
    Bad(DecodeError),
}

/// One client connection: its socket halves, the frame being read, the
/// admin session, and who the kernel says the peer is. Requests are read
/// in order and answered in order.
struct Connection {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    frames: FrameReader,
    kind: SocketKind,
    peer: Peer,
    svc: Arc<Service>,
    session: Session,
}

impl Connection {
    /// Reads at most `limit` bytes of the next frame (cancel-safe: the only
    /// wait is the read itself).
    async fn read_some(&mut self, limit: usize) -> Result<Option<Frame>, Stop> {
        let buf = self.frames.buf();
        let limit = limit.min(buf.len());
        match self.rd.read(&mut buf[..limit]).await {
            Ok(0) | Err(_) => Err(Stop::Closed),
            Ok(n) => self.frames.filled(n).map_err(Stop::Bad),
        }
    }

    /// The next request frame: waits up to the idle timeout for its first
    /// byte, then [`FRAME_TIMEOUT`] for the rest.
    async fn next_frame(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<Frame, Stop> {
        if !self.frames.started() {
            let idle = Duration::from_secs(
                self.svc
                    .idle_timeout_seconds
                    .load(std::sync::atomic::Ordering::Relaxed)
                    .max(1),
            );
            let uid = self.peer.uid;
            tokio::select! {
                _ = shutdown.changed() => return Err(Stop::Closed),
                _ = tokio::time::sleep(idle) => {
                    tracing::debug!(uid, "closing an idle connection");
                    return Err(Stop::Closed);
                }
                r = self.read_some(usize::MAX) => {
                    if let Some(f) = r? {
                        return Ok(f);
                    }
                }
            }
        }
        let rest = async {
            loop {
                if let Some(f) = self.read_some(usize::MAX).await? {
                    return Ok(f);
                }
            }
        };
        tokio::time::timeout(FRAME_TIMEOUT, rest)
            .await
            .unwrap_or(Err(Stop::Closed))
    }

    /// Runs a blocking step of the service on the worker pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Service) -> T + Send + 'static,
    ) -> Option<T> {
        let svc = self.svc.clone();
        tokio::task::spawn_blocking(move || f(&svc)).await.ok()
    }

    /// Handles one request; `None` when the peer left during a watch (its
    /// request is audited, not answered).
    async fn handle(&mut self, frame: Frame) -> Option<Response> {
        let (kind, peer, id) = (self.kind, self.peer.clone(), frame.header.request_id);
        let mut sess = std::mem::take(&mut self.session);
        let req = match Request::from_frame(&frame) {
            // Microseconds of work that waits for no disk: here, without
            // two thread hand-offs.
            Ok(req) if self.svc.quick(&req) => {
                let handled = self.svc.handle(kind, peer, &mut sess, id, req, true);
                self.session = sess;
                return match handled {
                    Handled::Done(r) => Some(r),
                    Handled::Wait(_) => Some(Response::error(
                        ErrorCode::Internal,
                        "a quick request cannot wait",
                    )),
                };
            }
            req => req,
        };
        let joined = self
            .blocking(move |svc| {
                let handled = match req {
                    Ok(req) => svc.handle(kind, peer, &mut sess, id, req, false),
                    Err(e) => Handled::Done(
                        match svc.audit_malformed(kind, peer, id, e.code(), &e.to_string()) {
                            Ok(()) => Response::error(e.code(), e.to_string()),
                            Err(code) => {
                                Response::error(code, "the audit record could not be written")
                            }
                        },
                    ),
                };
                (sess, handled)
            })
            .await;
        let failed = || {
            Handled::Done(Response::error(
                ErrorCode::Internal,
                "request handler failed",
            ))
        };
        let mut handled = match joined {
            Some((s, h)) => {
                self.session = s;
                h
            }
            None => failed(),
        };
        // A watch waits here, on this task: no thread is held.
        loop {
            let mut w = match handled {
                Handled::Done(r) => return Some(r),
                Handled::Wait(w) => w,
            };
            let until = tokio::time::Instant::from_std(w.until);
            let mut gone = false;
            loop {
                tokio::select! {
                    _ = w.changed() => break,
                    _ = tokio::time::sleep_until(until) => break,
                    // One byte at most: enough to see the peer leave or
                    // begin its next request, which is read after the
                    // answer.
                    r = self.read_some(1), if !self.frames.started() => {
                        gone = r.is_err();
                        if gone {
                            break;
                        }
                    }
                }
            }
            handled = self
                .blocking(move |svc| svc.finish_watch(w, gone))
                .await
                .unwrap_or_else(failed);
            if gone {
                return None;
            }
        }
    }

    /// Audits and answers a frame whose length prefix is out of bounds.
    async fn refuse_malformed(&mut self, e: DecodeError) {
        let (kind, peer) = (self.kind, self.peer.clone());
        let (code, why) = (e.code(), e.to_string());
        let why2 = why.clone();
        self.blocking(move |svc| svc.audit_malformed(kind, peer, 0, code, &why2))
            .await;
        let _ = write_response(&mut self.wr, &Response::error(code, why), 0, 0).await;
    }

    async fn serve(mut self, mut shutdown: watch::Receiver<bool>) {
        loop {
            let frame = match self.next_frame(&mut shutdown).await {
                Ok(f) => f,
                Err(Stop::Closed) => return,
                // The stream cannot be resynchronized after a bad length.
                Err(Stop::Bad(e)) => return self.refuse_malformed(e).await,
            };
            let (op, id) = (frame.header.op, frame.header.request_id);
            let started = std::time::Instant::now();
            let Some(resp) = self.handle(frame).await else {
                return;
            };
            self.svc
                .metrics
                .answered(self.kind, op, &resp, started.elapsed());
            if write_response(&mut self.wr, &resp, op, id).await.is_err() {
                return;
            }
        }
    }
}

async fn bind(path: &Path, mode: &str, group: Option<&str>) -> anyhow::Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            bail!("another tde serve is listening on {}", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    let mode = parse_mode(mode).map_err(anyhow::Error::msg)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    if let Some(g) = group {
        let (gid, _) = crate::policy::group(g).map_err(anyhow::Error::msg)?;
        rustix::fs::chown(path, None, Some(rustix::fs::Gid::from_raw(gid)))
            .with_context(|| format!("setting group of {}", path.display()))?;
    }
    Ok(l)
}

/// Connections open per uid on one socket; a slot frees itself on drop.
#[derive(Debug, Default, Clone)]
struct PerUid(Arc<std::sync::Mutex<std::collections::HashMap<u32, usize>>>);

struct UidSlot(PerUid, u32);

impl PerUid {
    fn take(&self, uid: u32, max: usize) -> Option<UidSlot> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(uid).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(UidSlot(self.clone(), uid))
    }
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut m = (self.0).0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// The connection caps of one socket.
#[derive(Debug, Clone, Copy)]
struct Caps {
    total: usize,
    per_uid: usize,
}

async fn accept_loop(
    listener: UnixListener,
    kind: SocketKind,
    svc: Arc<Service>,
    caps: Caps,
    shutdown: watch::Receiver<bool>,
    done: mpsc::Sender<()>,
) {
    let total = Arc::new(Semaphore::new(caps.total));
    let per_uid = PerUid::default();
    let mut stop = shutdown.clone();
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => return,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let peer = match stream.peer_cred() {
            Ok(c) => Peer {
                uid: c.uid(),
                gid: c.gid(),
                pid: c.pid(),
                exe: c
                    .pid()
                    .and_then(|p| std::fs::read_link(format!("/proc/{p}/exe")).ok())
                    .map(|p| Arc::from(p.to_string_lossy().as_ref())),
            },
            Err(e) => {
                tracing::warn!(error = %e, "no peer credentials; closing");
                continue;
            }
        };
        // Over a cap, the peer is told why (and audited within the
        // refusal budget), not left waiting in the backlog.
        let admitted = match (
            per_uid.take(peer.uid, caps.per_uid),
            total.clone().try_acquire_owned(),
        ) {
            (Some(slot), Ok(permit)) => Ok((slot, permit)),
            (None, _) => Err(format!(
                "uid {} already has {} connections to this socket (limits.max_connections_per_uid)",
                peer.uid, caps.per_uid
            )),
            (_, Err(_)) => Err(format!(
                "the socket already has {} connections (limits.max_connections)",
                caps.total
            )),
        };
        let (svc, sd, dn) = (svc.clone(), shutdown.clone(), done.clone());
        tokio::spawn(async move {
            let _done = dn;
            match admitted {
                Ok((_slot, _permit)) => {
                    let (rd, wr) = stream.into_split();
                    let c = Connection {
                        rd,
                        wr,
                        frames: FrameReader::new(),
                        kind,
                        peer,
                        svc,
                        session: Session::default(),
                    };
                    c.serve(sd).await;
                }
                Err(why) => refuse(stream, kind, peer, svc, why).await,
            }
        });
    }
}

/// Answers a connection over a cap with `LIMIT_EXCEEDED` and closes it.
async fn refuse(
    mut stream: UnixStream,
    kind: SocketKind,
    peer: Peer,
    svc: Arc<Service>,
    why: String,
) {
    let code = ErrorCode::LimitExceeded;
    let why2 = why.clone();
    let _ = tokio::task::spawn_blocking(move || {
        svc.audit_refused(kind, peer, "connection", code, &why2)
    })
    .await;
    let _ = write_response(&mut stream, &Response::error(code, why), 0, 0).await;
}

/// Reads the dev share and unseals; warns loudly.
fn dev_unseal(cfg: &Config, hsm: &Hsm) -> anyhow::Result<()> {
    let path = cfg.dev_share_path();
    let warning = format!(
        "DEV MODE: the single unseal share is stored in {} next to the key store; \
         anyone who can read that file can unseal every key. NOT FOR PRODUCTION.",
        path.display()
    );
    eprintln!("WARNING: {warning}");
    tracing::warn!("{warning}");
    let share = zeroize::Zeroizing::new(
        std::fs::read(&path)
            .with_context(|| format!("reading the dev share {}", path.display()))?,
    );
    hsm.unseal(&share)
        .map_err(|e| anyhow::anyhow!("dev auto-unseal failed: {e}"))?;
    Ok(())
}

/// Runs the daemon until SIGTERM or SIGINT; SIGHUP reloads the
/// configuration as `reload` says.
pub async fn run(cfg: Config, reload: Reload) -> anyhow::Result<()> {
    let hardening = sys::harden(&cfg.memory.lock).map_err(anyhow::Error::msg)?;
    tracing::info!(
        no_core_dumps = hardening.no_core_dumps,
        memory_locked = hardening.memory_locked,
        note = hardening.lock_note.as_deref().unwrap_or(""),
        "process hardening"
    );
    let store_path = cfg.store_path();
    // No store is created as a side effect: only `tde init` makes one.
    if !store_path.exists() {
        bail!(
            "there is no key store at {}: run `tde init` (or `tde init --dev` to try it out), \
             or point --config, --data-dir or TDE_DATA_DIR at the store",
            store_path.display()
        );
    }
    create_private_dir(&cfg.data_dir, "data directory")?;
    let store = Arc::new(
        SqliteStore::open(&store_path)
            .with_context(|| format!("opening key store {}", store_path.display()))?,
    );
    if store.meta()?.is_none() {
        bail!(
            "the key store {} is not initialized: run `tde init` (or `tde init --dev` to try it out)",
            store_path.display()
        );
    }
    let policy = TamperPolicy {
        zeroize_on_lockout: cfg.tamper.zeroize_on_lockout,
        zeroize_on_store_tamper: cfg.tamper.zeroize_on_store_tamper,
    };
    let hsm = Arc::new(Hsm::open(store.clone(), policy)?);
    let wake = Arc::new(Wake::default());
    let audit_stats = Arc::new(AuditStats::default());
    let (audit, writer, findings) = AuditLog::start(
        &store_path,
        AuditSettings {
            node: cfg.audit.node_id(),
            checkpoint_records: cfg.audit.checkpoint_records,
            checkpoint_interval: Duration::from_secs(cfg.audit.checkpoint_seconds),
            wake: wake.clone(),
            stats: audit_stats.clone(),
        },
        hsm.clone(),
    )?;
    // Started before the first record, so a new sink gets everything from
    // this start on.
    let sinks =
        Arc::new(Sinks::start(&store_path, cfg.audit_sinks(), wake).map_err(anyhow::Error::msg)?);
    let svc = Arc::new(Service {
        hsm: hsm.clone(),
        audit: audit.clone(),
        clients: std::sync::RwLock::new(Arc::new(
            Policies::resolve(&cfg.clients).map_err(anyhow::Error::msg)?,
        )),
        registry: store.clone(),
        key_changes: Default::default(),
        revoke_on_seal: (cfg.mounts.on_seal == "wipe").into(),
        revoking: Default::default(),
        refusals: RefusalBudget::new(cfg.limits.refused_records_per_second),
        watches: WatchSlots::new(cfg.limits.max_watches_per_uid),
        min_rotation_seconds: cfg.limits.min_rotation_seconds.into(),
        idle_timeout_seconds: cfg.limits.idle_timeout_seconds.into(),
        reloader: Default::default(),
        tokens: Default::default(),
        quorum_approvals: cfg.quorum.approvals.into(),
        quorum_timeout_seconds: cfg.quorum.timeout_seconds.into(),
        approvals: Default::default(),
        resplit_custodians: Default::default(),
        sinks: sinks.clone(),
        audit_retention_ms: cfg.audit.retention_ms().unwrap_or(0).into(),
        summarize_routine: (cfg.audit.routine_reads == "summarize").into(),
        routine_reads: Default::default(),
        key_uses: KeyUses::new(cfg.audit.pkcs11_key_use == "summarize"),
        metrics: Arc::new(Metrics::new(audit_stats)),
        auto_unseal: crate::autounseal::AutoUnseal::new(&cfg.seal, &cfg.data_dir),
        auto_unseal_error: Default::default(),
    });
    let live = Arc::new(Live::new(reload, cfg.clone()));
    {
        let live = live.clone();
        let _ = svc
            .reloader
            .set(Reloader(Box::new(move |svc| live.reload(svc))));
    }
    let mut start = AuditRecord::new("internal", "daemon_start");
    start.detail = Some(format!(
        "tde {} pid {}",
        env!("CARGO_PKG_VERSION"),
        std::process::id()
    ));
    audit.append(start)?;
    for why in findings {
        tracing::error!(%why, "audit log tampering found at start");
        let mut rec = AuditRecord::new("internal", "tamper_detected");
        rec.result = "error";
        rec.error_code = Some(tde_protocol::ErrorCode::Tampered.name());
        rec.detail = Some(why);
        audit.append(rec)?;
    }
    if hsm.status().dev && !hsm.status().zeroized {
        let r = dev_unseal(&cfg, &hsm);
        let mut rec = AuditRecord::new("internal", "dev_auto_unseal");
        if let Err(e) = &r {
            rec.result = "error";
            rec.detail = Some(e.to_string());
        }
        audit.append(rec)?;
        r?;
    }
    svc.drain_events();

    // Before the sockets: a listener that cannot start leaves nothing.
    let metrics = if cfg.metrics.listen.is_empty() {
        None
    } else {
        Some(metrics::Listener::start(&cfg.metrics, svc.clone()).await?)
    };
    let data_path = cfg.data_socket_path();
    let admin_path = cfg.admin_socket_path();
    let data = bind(
        &data_path,
        &cfg.data_socket.mode,
        cfg.data_socket.group.as_deref(),
    )
    .await?;
    let admin = bind(
        &admin_path,
        &cfg.admin_socket.mode,
        cfg.admin_socket.group.as_deref(),
    )
    .await?;
    let status = hsm.status();
    tracing::info!(
        data_socket = %data_path.display(),
        admin_socket = %admin_path.display(),
        sealed = status.sealed,
        zeroized = status.zeroized,
        "tde serve listening"
    );
    if status.sealed && !status.zeroized {
        tracing::info!(
            "sealed: give {} unseal shares with `tde unseal`",
            status.threshold
        );
    }
    // Ready once both sockets listen, sealed or not: clients may connect
    // (and wait for an unseal) from now on.
    crate::notify::notify(&format!(
        "READY=1\nMAINPID={}\nSTATUS={}",
        std::process::id(),
        crate::notify::status_line(&status)
    ));

    // Auto-unseal once listening: a device that is slow to answer (an
    // HSM across the network) does not hold readiness back, and clients
    // wait for the unseal as they would for custodians.
    if let Some(a) = &svc.auto_unseal {
        if status.dev {
            tracing::warn!(device = a.device(), "[seal] is ignored in dev mode");
        } else {
            let s = svc.clone();
            tokio::task::spawn_blocking(move || s.auto_unseal_now());
        }
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let caps = Caps {
        total: cfg.limits.max_connections,
        per_uid: cfg.limits.max_connections_per_uid,
    };
    let tasks = [
        tokio::spawn(accept_loop(
            data,
            SocketKind::Data,
            svc.clone(),
            caps,
            stop_rx.clone(),
            done_tx.clone(),
        )),
        tokio::spawn(accept_loop(
            admin,
            SocketKind::Admin,
            svc.clone(),
            caps,
            stop_rx.clone(),
            done_tx.clone(),
        )),
        tokio::spawn(key_scheduler(
            svc.clone(),
            cfg.limits.destroy_check_seconds,
            stop_rx.clone(),
        )),
    ];
    drop(done_tx);

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let signal = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = hup.recv() => {
                let (svc, live) = (svc.clone(), live.clone());
                let _ = tokio::task::spawn_blocking(move || reload_on_signal(&svc, &live)).await;
            }
        }
    };
    tracing::info!(signal, "shutting down: finishing in-flight requests");
    crate::notify::notify(&format!("STOPPING=1\nSTATUS=stopping ({signal})"));
    let _ = stop_tx.send(true);
    svc.key_changes.stop();
    for t in tasks {
        let _ = t.await;
    }
    if let Some(m) = metrics {
        m.stop().await;
    }
    if tokio::time::timeout(SHUTDOWN_GRACE, done_rx.recv())
        .await
        .is_err()
    {
        tracing::warn!("connections did not finish within the grace period");
    }
    svc.record_not_recorded();
    svc.record_routine_reads();
    svc.record_key_uses();
    let mut stop = AuditRecord::new("internal", "daemon_stop");
    stop.detail = Some(signal.to_string());
    let _ = audit.append(stop);
    drop(svc);
    drop(audit);
    tokio::task::spawn_blocking(move || writer.join()).await?;
    // The shutdown checkpoint is in the store: the sinks get it too.
    tokio::task::spawn_blocking(move || sinks.stop()).await?;
    for p in [&data_path, &admin_path] {
        let _ = std::fs::remove_file(p);
    }
    hsm.close().ok();
    tracing::info!("stopped");
    Ok(())
}

/// SIGHUP: reloads and audits it (which logs it).
fn reload_on_signal(svc: &Service, live: &Live) {
    // logrotate moved the file sink's file: write to a new one.
    svc.sinks.reopen();
    let mut rec = AuditRecord::new("internal", "reload");
    match live.reload(svc) {
        Ok(summary) => rec.detail = Some(format!("SIGHUP: configuration reloaded: {summary}")),
        Err(why) => {
            rec.result = "error";
            rec.detail = Some(format!(
                "SIGHUP: configuration not reloaded, the old one stays in force: {why}"
            ));
        }
    }
    if let Err(e) = svc.audit.append(rec) {
        tracing::error!(error = %e, "the reload could not be audited");
    }
}

/// Every second: rotates keys whose rotation policy is due; every
/// `destroy_every` seconds: destroys versions whose waiting period is over.
async fn key_scheduler(svc: Arc<Service>, destroy_every: u64, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_destroy = 0u64;
    let mut said = crate::notify::status_line(&svc.hsm.status());
    let mut last_auto = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        // The service manager's status line follows the seal state.
        let status = svc.hsm.status();
        let failing = svc.auto_unseal_failure().filter(|_| status.sealed);
        let now_said = match &failing {
            Some(why) => format!(
                "sealed: auto-unseal failed ({why}); retrying; the recovery shares unseal it (`tde unseal`)"
            ),
            None => crate::notify::status_line(&status),
        };
        if now_said != said {
            crate::notify::notify(&format!("STATUS={now_said}"));
            said = now_said;
        }
        // A device not reachable at boot (an HSM on the network, a TPM
        // resource manager starting): tried again every 10 s until the
        // first unseal.
        if failing.is_some() && last_auto.elapsed() >= Duration::from_secs(10) {
            last_auto = std::time::Instant::now();
            let s = svc.clone();
            let _ = tokio::task::spawn_blocking(move || s.auto_unseal_now()).await;
        }
        let s = svc.clone();
        let now = tde_hsm::hsm::now();
        let destroy = now >= last_destroy + destroy_every.max(1);
        if destroy {
            last_destroy = now;
        }
        let _ = tokio::task::spawn_blocking(move || {
            match s.hsm.rotate_due(now) {
                Ok(done) => {
                    for (key, version) in done {
                        tracing::info!(key, version, "rotated by policy");
                    }
                }
                Err(e) => tracing::error!(error = %e, "automatic rotation failed"),
            }
            if destroy && let Err(e) = s.hsm.destroy_due(now) {
                tracing::error!(error = %e, "scheduled key destruction failed");
            }
            s.drain_events();
            s.record_not_recorded();
            s.record_key_uses();
            if destroy {
                s.record_routine_reads();
                s.audit_retention();
            }
        })
        .await;
    }
}

/// Creates `dir` (a `what`, for messages) and missing parents with mode
/// 0700, or checks that an existing one grants nothing to group or others (refusing it if so).
pub fn create_private_dir(dir: &Path, what: &str) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    tde_protocol::private::check(dir, what).map_err(anyhow::Error::msg)?;
    Ok(dir.to_path_buf())
}
