//! The service manager's readiness protocol (systemd's `sd_notify(3)`):
//! `READY=1` once both sockets listen, a `STATUS=` line whenever the seal
//! state changes (`systemctl status tde` shows it), `STOPPING=1` at
//! shutdown. One datagram to the Unix socket named by `$NOTIFY_SOCKET` (a
//! path, or `@name` in the abstract namespace); nothing without it.

use std::os::unix::net::{SocketAddr, UnixDatagram};

use tde_hsm::Status;

/// Sends `state` (newline-separated `KEY=value` assignments). A failure
/// is logged, never fatal: the daemon works without a service manager.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| {
        let addr = match path.as_encoded_bytes() {
            [b'@', name @ ..] => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name)?
            }
            _ => SocketAddr::from_pathname(&path)?,
        };
        UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr)
    })();
    if let Err(e) = sent {
        tracing::warn!(error = %e, socket = ?path, "could not notify the service manager");
    }
}

/// The `STATUS=` text for a seal state.
pub fn status_line(s: &Status) -> String {
    if s.zeroized {
        "zeroized: the root material is destroyed; nothing can be unsealed".into()
    } else if !s.initialized {
        "not initialized: run `tde init`".into()
    } else if s.sealed {
        format!(
            "sealed: waiting for unseal shares ({} of {} given; `tde unseal`)",
            s.progress, s.threshold
        )
    } else {
        "unsealed: serving".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_line_says_what_to_do() {
        let mut s = Status {
            initialized: true,
            sealed: true,
            threshold: 3,
            progress: 1,
            ..Status::default()
        };
        assert_eq!(
            status_line(&s),
            "sealed: waiting for unseal shares (1 of 3 given; `tde unseal`)"
        );
        s.sealed = false;
        assert_eq!(status_line(&s), "unsealed: serving");
        s.zeroized = true;
        assert!(status_line(&s).starts_with("zeroized"));
    }
}
