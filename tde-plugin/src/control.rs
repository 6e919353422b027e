//! The mount's control socket: `tde rekey` and `tde status` talk to a
//! running mount through `BACKING_DIR/tde.ctl` (mode 0600, so only the
//! mount's owner, usually root, may connect).
//!
//! One JSON object per line each way. Requests: `{"op":"status"}`,
//! `{"op":"start","rate":N}` (bytes per second, 0 for none),
//! `{"op":"pause"}`, `{"op":"resume"}`, `{"op":"set_rate","rate":N}`.
//! Answers: `{"ok":true,"status":{...}}` or `{"ok":false,"error":"..."}`.
//! A request line is capped at [`MAX_LINE`] bytes.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::rekey::{Rekey, Status};

/// File name of the control socket in the backing root.
pub const CONTROL_SOCKET: &str = "tde.ctl";
/// Longest request line.
pub const MAX_LINE: u64 = 4096;

/// A control request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Control {
    /// The re-key status.
    Status,
    /// Start a re-key.
    Start {
        /// Bytes per second, 0 for no throttle.
        rate: u64,
    },
    /// Pause the running re-key.
    Pause,
    /// Resume it.
    Resume,
    /// Change the throttle.
    SetRate {
        /// Bytes per second, 0 for none.
        rate: u64,
    },
}

/// An answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Answer {
    /// Whether the request succeeded.
    pub ok: bool,
    /// The re-key status (on success).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// Why not (on failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The socket path of the mount of `backing`.
pub fn socket_path(backing: &Path) -> PathBuf {
    backing.join(CONTROL_SOCKET)
}

/// Sends `req` to the mount whose backing directory is `backing`.
pub fn call(backing: &Path, req: &Control) -> anyhow::Result<Status> {
    let path = socket_path(backing);
    let mut s = UnixStream::connect(&path).with_context(|| {
        format!(
            "cannot reach the mount's control socket {} (is the tablespace mounted, and are you its owner?)",
            path.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(s.take(1 << 20)).read_line(&mut answer)?;
    let a: Answer = serde_json::from_str(&answer).context("the mount's answer is not valid")?;
    match (a.ok, a.status, a.error) {
        (true, Some(st), _) => Ok(st),
        (_, _, Some(e)) => bail!("{e}"),
        _ => bail!("the mount's answer is not valid"),
    }
}

/// The control server of a mount.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    path: PathBuf,
}

impl Server {
    /// Listens on `backing/tde.ctl` for requests to `rekey`.
    pub fn start(backing: &Path, rekey: Arc<Rekey>) -> anyhow::Result<Server> {
        let path = socket_path(backing);
        // Bound under a temporary name (a hidden `tde.` name too) and
        // renamed into place once private: `tde.ctl` never exists with the
        // umask's wider mode, and once it exists it answers.
        let tmp = path.with_extension(format!("ctl.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let listener =
            UnixListener::bind(&tmp).with_context(|| format!("binding {}", tmp.display()))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&tmp, &path)
            .with_context(|| format!("putting the control socket at {}", path.display()))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("tde-control".into())
                .spawn(move || serve(&listener, &rekey, &stop))?
        };
        Ok(Server {
            stop,
            thread: Some(thread),
            path,
        })
    }

    /// Stops listening and removes the socket.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(listener: &UnixListener, rekey: &Rekey, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((s, _)) => {
                if let Err(e) = answer(s, rekey) {
                    tracing::debug!(error = %format!("{e:#}"), "control request failed");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}

/// Whether the peer may use the control socket: the mount's own user or
/// root (the socket is mode 0600 too; this holds even if its mode is
/// changed afterwards).
fn peer_allowed(s: &UnixStream) -> anyhow::Result<()> {
    let cred = rustix::net::sockopt::socket_peercred(s)?;
    let own = rustix::process::geteuid();
    if cred.uid != own && !cred.uid.is_root() {
        bail!(
            "permission denied: uid {} is not the mount's owner (uid {})",
            cred.uid.as_raw(),
            own.as_raw()
        );
    }
    Ok(())
}

fn answer(s: UnixStream, rekey: &Rekey) -> anyhow::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let allowed = peer_allowed(&s);
    let mut line = String::new();
    BufReader::new((&s).take(MAX_LINE)).read_line(&mut line)?;
    let result = match allowed.and_then(|()| parse_request(&line)) {
        Err(e) => Err(e),
        Ok(req) => {
            if req == Control::Status {
                tracing::debug!(request = ?req, "control request");
            } else {
                tracing::info!(request = ?req, "control request");
            }
            match req {
                Control::Status => Ok(rekey.status()),
                Control::Start { rate } => rekey.start(rate),
                Control::Pause => rekey.set_paused(true),
                Control::Resume => rekey.set_paused(false),
                Control::SetRate { rate } => rekey.set_rate(rate),
            }
        }
    };
    let a = match result {
        Ok(st) => Answer {
            ok: true,
            status: Some(st),
            error: None,
        },
        Err(e) => Answer {
            ok: false,
            status: None,
            error: Some(format!("{e:#}")),
        },
    };
    let mut out = serde_json::to_string(&a)?;
    out.push('\n');
    (&s).write_all(out.as_bytes())?;
    Ok(())
}

/// Parses one request line (JSON, at most [`MAX_LINE`] bytes).
pub fn parse_request(line: &str) -> anyhow::Result<Control> {
    if line.len() as u64 > MAX_LINE {
        bail!("malformed control request: longer than {MAX_LINE} bytes");
    }
    serde_json::from_str(line).map_err(|e| anyhow::anyhow!("malformed control request: {e}"))
}

/// The backing directory of the `tde mount` on `mountpoint`.
pub fn backing_of(mountpoint: &Path) -> anyhow::Result<PathBuf> {
    let want = mountpoint
        .canonicalize()
        .with_context(|| format!("{} does not exist", mountpoint.display()))?;
    mounts()
        .into_iter()
        .find_map(|(m, b)| (m == want).then_some(b))
        .with_context(|| format!("{} is not a tde mount", mountpoint.display()))
}

/// Every `tde mount` on this machine, (mountpoint, backing directory), from
/// `/proc/self/mounts`: FUSE mounts whose source is `tde:BACKING_DIR`.
pub fn mounts() -> Vec<(PathBuf, PathBuf)> {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            if f.len() < 3 || !is_fuse(f[2]) {
                return None;
            }
            let backing = unescape(f[0]).strip_prefix("tde:")?.to_owned();
            Some((PathBuf::from(unescape(f[1])), PathBuf::from(backing)))
        })
        .collect()
}

/// `fuse` (mounted directly, as root) or `fuse.tde` (through fusermount3).
fn is_fuse(fstype: &str) -> bool {
    fstype == "fuse" || fstype == "fuse.tde"
}

/// Undoes the octal escapes of /proc/self/mounts (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mount_fields() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape(r"/a\\b"), r"/a\\b");
        assert_eq!(unescape(r"tail\04"), r"tail\04");
    }

    #[test]
    fn requests_parse_strictly() {
        let r: Control = serde_json::from_str(r#"{"op":"start","rate":5}"#).expect("start");
        assert_eq!(r, Control::Start { rate: 5 });
        assert!(serde_json::from_str::<Control>(r#"{"op":"explode"}"#).is_err());
        assert!(serde_json::from_str::<Control>(r#"{"op":"start"}"#).is_err());
        assert!(serde_json::from_str::<Control>(r#"{"op":"set_rate","rate":-1}"#).is_err());
    }
}
