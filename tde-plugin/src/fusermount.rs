//! Mounting as a normal user: the setuid `fusermount3` helper of the fuse3
//! package mounts for us (checking that we may write the mountpoint) and
//! hands back the open `/dev/fuse` over a socket, as libfuse-based file
//! systems (sshfs, gocryptfs) do; `fusermount3 -u` unmounts.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// The helper's name on the `PATH`.
pub const HELPER: &str = "fusermount3";

/// The helper, if it is on the `PATH`.
pub fn helper() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(HELPER))
        .find(|p| p.is_file())
}

const DEVICE_HINT: &str = "; a normal user needs /dev/fuse open to them (standard hosts make it mode 0666 through udev; as root: chmod 0666 /dev/fuse), or run as root";

/// Fails, saying why and what to do, when this user cannot open
/// `/dev/fuse` (the helper opens it as the user, not as root).
fn check_device() -> anyhow::Result<()> {
    let rw = rustix::fs::Access::READ_OK | rustix::fs::Access::WRITE_OK;
    match rustix::fs::access("/dev/fuse", rw) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::NOENT => bail!(
            "there is no /dev/fuse: load the fuse module (modprobe fuse), or in a container pass --device /dev/fuse"
        ),
        Err(e) => bail!("FUSE is not permitted for this user (/dev/fuse: {e}){DEVICE_HINT}"),
    }
}

fn need_helper() -> anyhow::Result<PathBuf> {
    helper().with_context(|| {
        format!(
            "a normal user mounts FUSE file systems through {HELPER} (setuid root), which is not on the PATH: install the fuse3 package, or run as root"
        )
    })
}

/// Whether a normal user can mount here (the helper, the device, and
/// `allow_other` if asked); the error says what is missing and how to get
/// it.
pub fn check_user_mount(allow_other: bool) -> anyhow::Result<()> {
    need_helper()?;
    check_device()?;
    if allow_other && !user_allow_other() {
        bail!(
            "--allow-other as a normal user needs the line user_allow_other in /etc/fuse.conf (root can add it), or mount as root"
        );
    }
    Ok(())
}

/// Whether `/etc/fuse.conf` lets normal users ask for `allow_other`.
pub fn user_allow_other() -> bool {
    std::fs::read_to_string("/etc/fuse.conf").is_ok_and(|s| {
        s.lines()
            .map(|l| l.split('#').next().unwrap_or("").trim())
            .any(|l| l == "user_allow_other")
    })
}

/// One mount option's value with `,` and `\` escaped, as the helper reads
/// them.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace(',', "\\,")
}

/// The helper's `-o` argument for a tde mount of `backing`.
pub fn options(backing: &Path, allow_other: bool) -> String {
    let mut o = format!(
        "fsname={},subtype=tde,default_permissions,nodev,nosuid",
        escape(&format!("tde:{}", backing.display()))
    );
    if allow_other {
        o.push_str(",allow_other");
    }
    o
}

/// Mounts a FUSE file system on `mountpoint` with `options` through the
/// helper; returns the `/dev/fuse` descriptor to serve it on. The helper's
/// own message is the error when it refuses.
pub fn mount(mountpoint: &Path, options: &str) -> anyhow::Result<OwnedFd> {
    let helper = need_helper()?;
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    // The helper's end is inherited (no CLOEXEC); ours is not.
    let (ours, theirs) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::empty(),
        None,
    )
    .context("creating the socket for fusermount3")?;
    rustix::io::fcntl_setfd(&ours, rustix::io::FdFlags::CLOEXEC)?;
    let child = Command::new(&helper)
        .arg("-o")
        .arg(options)
        .arg("--")
        .arg(mountpoint)
        .env("_FUSE_COMMFD", theirs.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", helper.display()))?;
    drop(theirs);
    let fd = receive_fd(&ours);
    drop(ours);
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for {}", helper.display()))?;
    let said = String::from_utf8_lossy(&out.stderr).trim().to_string();
    match fd {
        Some(fd) if out.status.success() => Ok(fd),
        _ => {
            let hint = if said.contains("/dev/fuse") {
                DEVICE_HINT
            } else if said.contains("allow_other") {
                " (add user_allow_other to /etc/fuse.conf, or mount without --allow-other)"
            } else if said.contains("Permission denied") || said.contains("write access") {
                " (the mountpoint must be a directory you own and may write)"
            } else {
                ""
            };
            bail!(
                "{HELPER} could not mount {} ({}): {}{hint}",
                mountpoint.display(),
                out.status,
                if said.is_empty() { "no message" } else { &said }
            )
        }
    }
}

/// The descriptor the helper sends (SCM_RIGHTS), or `None` if it sent none.
fn receive_fd(sock: &OwnedFd) -> Option<OwnedFd> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut cmsg = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    loop {
        match rustix::net::recvmsg(
            sock,
            &mut [std::io::IoSliceMut::new(&mut byte)],
            &mut cmsg,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(_) => break,
            Err(e) if e == rustix::io::Errno::INTR => continue,
            Err(_) => return None,
        }
    }
    cmsg.drain().find_map(|m| match m {
        RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
        _ => None,
    })
}

/// How an unmount went.
#[derive(Debug, PartialEq, Eq)]
pub enum Unmounted {
    /// Unmounted (or detached, when lazy).
    Done,
    /// Files are open on it: still mounted.
    Busy,
    /// Nothing was mounted there.
    NotMounted,
}

/// Unmounts `mountpoint`: directly as root, else through `fusermount3 -u`
/// (`lazy`: `-z`, detach now and finish when the last file closes).
pub fn unmount(mountpoint: &Path, lazy: bool) -> anyhow::Result<Unmounted> {
    let flags = if lazy {
        rustix::mount::UnmountFlags::DETACH
    } else {
        rustix::mount::UnmountFlags::empty()
    };
    match rustix::mount::unmount(mountpoint, flags) {
        Ok(()) => return Ok(Unmounted::Done),
        Err(e) if e == rustix::io::Errno::BUSY => return Ok(Unmounted::Busy),
        Err(e) if e == rustix::io::Errno::INVAL => return Ok(Unmounted::NotMounted),
        Err(e) if e == rustix::io::Errno::PERM => {}
        Err(e) => {
            return Err(e).with_context(|| format!("unmounting {}", mountpoint.display()));
        }
    }
    let Some(helper) = helper() else {
        bail!(
            "only root or {HELPER} can unmount {} (install the fuse3 package)",
            mountpoint.display()
        );
    };
    let mut c = Command::new(&helper);
    c.arg(if lazy { "-uz" } else { "-u" })
        .arg("--")
        .arg(mountpoint);
    let out = c
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {} -u", helper.display()))?;
    if out.status.success() {
        return Ok(Unmounted::Done);
    }
    let said = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if said.contains("busy") {
        Ok(Unmounted::Busy)
    } else if said.contains("not found in /etc/mtab") || said.contains("Invalid argument") {
        Ok(Unmounted::NotMounted)
    } else {
        bail!(
            "{HELPER} -u {} failed ({}): {said}",
            mountpoint.display(),
            out.status
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_escape_the_backing_path() {
        assert_eq!(
            options(Path::new("/srv/a,b\\c"), false),
            "fsname=tde:/srv/a\\,b\\\\c,subtype=tde,default_permissions,nodev,nosuid"
        );
        assert!(options(Path::new("/x"), true).ends_with(",allow_other"));
    }
}
