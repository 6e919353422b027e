//! Master-key rotation on the database side: rewrapping a tablespace's data
//! keys under the master key's newest version, and keeping the sidecar's
//! registry of them current.
//!
//! Rewrapping never touches data and never sees a plaintext key: the sidecar's
//! `re_encrypt` unwraps and wraps again inside the HSM. The key file is then
//! replaced atomically (see [`crate::keyfile::KeyFile::store`]), so a crash at any moment
//! leaves either the old key file (still valid: the old master key version
//! exists until it is destroyed, and destruction is refused while the
//! registry says it is in use) or the new one.
//!
//! A mounted tablespace does this by itself ([`Keeper`]): it registers, then
//! waits on the sidecar for a new primary version (`watch_key`, a long poll
//! that returns at once on rotation and otherwise every
//! [`WATCH_TIMEOUT`] as a periodic check), and rewraps when the key file is
//! behind. `tde rewrap BACKING_DIR` runs the same
//! [`Keys::sync_master`] once for a tablespace that is not mounted.
//!
//! When the sidecar answers `ZEROIZED` or `KEYS_REVOKED` (zeroization, or a
//! seal with `mounts.on_seal = "wipe"`), the keeper hands it to the mount's
//! [`OnRevoked`], which wipes the data keys, and stops.

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tde_protocol::ErrorCode;
use tde_protocol::client::Client;

use crate::keys::{Keys, SyncError};

/// How long one `watch_key` waits before the keeper checks anyway.
pub const WATCH_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a mount confirms its registration when nothing changes.
pub const REGISTER_EVERY: Duration = Duration::from_secs(600);

/// What the keeper does when the sidecar says this mount's keys are gone
/// (zeroized, or revoked by a seal): wipe them and stop serving data.
pub type OnRevoked = Box<dyn Fn() + Send>;

/// The thread that keeps a mounted tablespace's key file on the newest
/// master key version and tells when the sidecar is lost and back.
pub struct Keeper {
    stop: Arc<AtomicBool>,
    stream: Arc<Mutex<Option<UnixStream>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Keeper {
    /// Starts the keeper of `keys`.
    pub fn start(keys: Arc<Keys>, on_revoked: OnRevoked) -> anyhow::Result<Keeper> {
        let stop = Arc::new(AtomicBool::new(false));
        let stream = Arc::new(Mutex::new(None));
        let thread = {
            let (stop, stream) = (stop.clone(), stream.clone());
            std::thread::Builder::new()
                .name("tde-keeper".into())
                .spawn(move || keep(&keys, &on_revoked, &stop, &stream))?
        };
        Ok(Keeper {
            stop,
            stream,
            thread: Some(thread),
        })
    }

    /// Stops the thread, cutting a pending long poll short.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(s) = self
            .stream
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sleeps up to `d` in slices of at most 50 ms, returning early once `stop`
/// is set.
pub(crate) fn sleep_unless_stopped(stop: &AtomicBool, d: Duration) {
    let until = Instant::now() + d;
    while !stop.load(Ordering::SeqCst) && Instant::now() < until {
        std::thread::sleep(
            until
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(50)),
        );
    }
}

/// Whether a refusal means this mount's keys must go.
pub fn revokes(code: ErrorCode) -> bool {
    matches!(code, ErrorCode::Zeroized | ErrorCode::KeysRevoked)
}

fn keep(
    keys: &Keys,
    on_revoked: &OnRevoked,
    stop: &AtomicBool,
    stream: &Mutex<Option<UnixStream>>,
) {
    let sidecar = keys.sidecar();
    let mut lost = false;
    let mut conn: Option<Client> = None;
    let mut registered_at: Option<Instant> = None;
    // The master key and its primary version, as of the last sync.
    let mut key = String::new();
    let mut primary = 0u32;
    let mut refusal: Option<String> = None;
    // Says once that the sidecar is gone (I/O goes on regardless).
    let note_lost = |lost: &mut bool, error: Option<String>| {
        if !std::mem::replace(lost, true) {
            tracing::warn!(
                error = error.as_deref().unwrap_or("cannot connect"),
                "lost the sidecar connection; I/O continues with the data keys in memory"
            );
        }
    };
    while !stop.load(Ordering::SeqCst) {
        if conn.is_none() {
            match Client::connect(sidecar) {
                Ok(c) => {
                    *stream.lock().unwrap_or_else(|p| p.into_inner()) = c.stream_clone().ok();
                    // `stop` sets its flag before it shuts the stored stream
                    // down: either it sees this stream or we see the flag.
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    conn = Some(c);
                    registered_at = None;
                    if lost {
                        tracing::info!("reconnected to the sidecar");
                        lost = false;
                    }
                }
                Err(e) => {
                    note_lost(&mut lost, Some(e.to_string()));
                    sleep_unless_stopped(stop, Duration::from_secs(2));
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let due = registered_at.is_none_or(|t| t.elapsed() >= REGISTER_EVERY);
        let step = if due {
            keys.sync_master(c).map(|o| {
                for (dek, from, to) in &o.rewrapped {
                    tracing::info!(
                        dek_version = dek,
                        from_mek_version = from,
                        to_mek_version = to,
                        "rewrapped the data key under the new master key version"
                    );
                }
                registered_at = Some(Instant::now());
                primary = o.primary;
                key = o.key;
            })
        } else {
            match c.watch_key(&key, primary, WATCH_TIMEOUT) {
                Ok(version) => {
                    if version != primary {
                        tracing::info!(
                            from = primary,
                            to = version,
                            "the master key has a new primary version"
                        );
                        registered_at = None;
                    }
                    Ok(())
                }
                Err(error) => Err(SyncError::Sidecar {
                    during: "watching the master key".into(),
                    error,
                }),
            }
        };
        match step {
            Ok(()) => refusal = None,
            Err(_) if stop.load(Ordering::SeqCst) => {}
            Err(e) => {
                let refused = e.refused();
                if refused.is_some_and(revokes) {
                    tracing::error!(error = %e, "the sidecar revoked this mount's keys");
                    on_revoked();
                    return;
                }
                if refused.is_some() || matches!(e, SyncError::KeyFile(_)) {
                    // Sealed, a refusal, or a key file that could not be
                    // changed: keep the connection, retry later, and say
                    // so once.
                    let why = e.to_string();
                    if refusal.as_deref() != Some(why.as_str()) {
                        tracing::warn!(error = %why, "the key file sync failed; retrying every 2 s");
                        refusal = Some(why);
                    }
                    registered_at = None;
                    sleep_unless_stopped(stop, Duration::from_secs(2));
                } else {
                    note_lost(&mut lost, Some(e.to_string()));
                    conn = None;
                    *stream.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    sleep_unless_stopped(stop, Duration::from_secs(1));
                }
            }
        }
    }
}
