//! `tde mount`: get the tablespace's data keys from the sidecar, mount the
//! FUSE file system, and keep watching the sidecar.
//!
//! The plaintext DEKs live only in this process (inside AWS-LC key contexts,
//! which cleanse their memory when freed at unmount). If the sidecar goes
//! away after mounting, I/O goes on with the keys in memory; the keeper thread
//! ([`crate::rotation`]) notices, reconnects when it is back, and rewraps the
//! key file when the master key rotates. If the sidecar says the keys are
//! gone (zeroized, or revoked by a seal), the mount wipes them, drops the
//! kernel's cached pages and fails every read and write. A tablespace with
//! format-1 file headers is upgraded before the mount serves it.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use fuser::{Config, INodeNo, MountOption, SessionACL};

use crate::fs::TdeFs;
use crate::fusermount::{self, Unmounted};
use crate::keys::Keys;
use crate::rekey::Rekey;
use crate::rotation::Keeper;

/// FUSE worker threads of a mount unless `--threads` says otherwise.
pub const DEFAULT_THREADS: usize = 4;

/// What `tde mount` was asked to do.
#[derive(Debug, Clone)]
pub struct MountSpec {
    /// The sidecar's data socket.
    pub sidecar: PathBuf,
    /// Master key (required with `init`; else taken from the key file).
    pub key: Option<String>,
    /// Tablespace name, bound into the encryption context and every block.
    pub tablespace: String,
    /// Cluster id, bound into the encryption context.
    pub cluster: String,
    /// Directory that holds the ciphertext.
    pub backing: PathBuf,
    /// Where the plaintext view appears.
    pub mountpoint: PathBuf,
    /// Create the key file (new, empty backing directory).
    pub init: bool,
    /// How long to wait for an unreachable or sealed sidecar.
    pub wait: Duration,
    /// FUSE worker threads (`DEFAULT_THREADS` unless told).
    pub threads: usize,
    /// Let other users than the one mounting use the mount. Always on for
    /// root (PostgreSQL runs as its own user); a normal user's mount allows
    /// only that user unless asked (and `/etc/fuse.conf` permits it).
    pub allow_other: bool,
    /// Mount even where a running PostgreSQL uses the mountpoint and the
    /// backing directory does not hold its files.
    pub force: bool,
}

fn check_dirs(spec: &MountSpec) -> anyhow::Result<()> {
    let b = std::fs::metadata(&spec.backing).with_context(|| {
        format!(
            "backing directory {} does not exist",
            spec.backing.display()
        )
    })?;
    if !b.is_dir() {
        bail!("{} is not a directory", spec.backing.display());
    }
    let m = std::fs::metadata(&spec.mountpoint)
        .with_context(|| format!("mountpoint {} does not exist", spec.mountpoint.display()))?;
    if !m.is_dir() {
        bail!(
            "mountpoint {} is not a directory",
            spec.mountpoint.display()
        );
    }
    if is_mountpoint(&spec.mountpoint) {
        bail!(
            "mountpoint {} is busy: something is already mounted there",
            spec.mountpoint.display()
        );
    }
    if std::fs::read_dir(&spec.mountpoint)?.next().is_some() {
        bail!("mountpoint {} is not empty", spec.mountpoint.display());
    }
    if spec.backing.canonicalize()? == spec.mountpoint.canonicalize()? {
        bail!("the backing directory and the mountpoint must differ");
    }
    // An empty directory that a running cluster uses (a mount there went
    // away): a mount of other files would hide the cluster's from it.
    for u in crate::pguse::uses(&spec.mountpoint) {
        if spec.force || (!spec.init && crate::pguse::backing_fits(&u, &spec.backing)) {
            tracing::info!(mountpoint = %spec.mountpoint.display(), "{u}");
            continue;
        }
        bail!(
            "mountpoint {}: {u}, and the backing directory {} does not hold {}: the mount would \
             hide the cluster's files from it. Mount the backing directory that holds them, \
             or pass --force if this is meant",
            spec.mountpoint.display(),
            spec.backing.display(),
            if u.tablespace_oid.is_some() {
                "that tablespace (no PG_<version>_<catalog> directory)"
            } else {
                "a data directory (no PG_VERSION)"
            }
        );
    }
    Ok(())
}

/// A mounted tablespace; unmounted when dropped.
pub struct Mounted {
    session: Option<fuser::BackgroundSession>,
    /// Mounted through `fusermount3` (a normal user): the session cannot
    /// unmount itself.
    by_helper: bool,
    /// Held until the process ends (the kernel releases it then).
    _backing_lock: crate::keyfile::BackingLock,
    keeper: Option<Keeper>,
    control: Option<crate::control::Server>,
    rekey: Option<Arc<Rekey>>,
    core: TdeFs,
    /// The mountpoint.
    pub mountpoint: PathBuf,
}

impl Mounted {
    /// True once the file system was unmounted from outside (`tde umount`).
    pub fn finished(&self) -> bool {
        self.session.as_ref().is_none_or(|s| s.guard.is_finished())
    }

    /// Unmounts and waits for the worker threads. `Ok(false)` when the file
    /// system is busy (files open on it): it stays mounted and serving, as
    /// `umount` would refuse.
    pub fn try_unmount(&mut self) -> anyhow::Result<bool> {
        if !self.finished() && fusermount::unmount(&self.mountpoint, false)? == Unmounted::Busy {
            return Ok(false);
        }
        // Unmounted (by us or from outside): the session thread ends on its
        // own; unmounting again would fail with EINVAL.
        self.shutdown(true)?;
        Ok(true)
    }

    /// Stops the helpers and the session; `unmounted` when the kernel
    /// mount is already gone.
    fn shutdown(&mut self, unmounted: bool) -> anyhow::Result<()> {
        if let Some(mut c) = self.control.take() {
            c.stop();
        }
        if let Some(r) = self.rekey.take() {
            r.stop();
        }
        if let Some(mut k) = self.keeper.take() {
            k.stop();
        }
        let r = match self.session.take() {
            Some(s) if !unmounted && !s.guard.is_finished() && self.by_helper => {
                // Detached now, gone when the last file on it closes.
                fusermount::unmount(&self.mountpoint, true)
                    .and_then(|_| s.join().context("the file system thread failed"))
            }
            Some(s) if !unmounted && !s.guard.is_finished() => {
                s.umount_and_join().context("unmounting")
            }
            Some(s) => s.join().context("the file system thread failed"),
            None => return Ok(()),
        };
        // Unmounted: no write can come any more.
        match self.core.record_durable_lengths() {
            Ok(n) => tracing::debug!(files = n, "recorded durable lengths at unmount"),
            Err(e) => {
                tracing::warn!(error = %e, "could not record durable lengths at unmount (the next mount checks the files' tails)")
            }
        }
        r
    }
}

impl Mounted {
    /// Unmounts if it can; see [`Mounted::try_unmount`].
    pub fn unmount(mut self) -> anyhow::Result<()> {
        match self.try_unmount()? {
            true => Ok(()),
            false => bail!(
                "{} is busy: stop the processes using it (PostgreSQL) first",
                self.mountpoint.display()
            ),
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = self.shutdown(false);
    }
}

/// Checks, locks the backing directory, loads keys, mounts, and starts the
/// keeper (sidecar connection, key file rewraps), the re-key engine
/// (resuming a checkpointed re-key) and the control socket.
pub fn mount(spec: &MountSpec) -> anyhow::Result<Mounted> {
    check_dirs(spec)?;
    let as_root = rustix::process::geteuid().is_root();
    if !as_root {
        // Before the key file or the sidecar is touched.
        fusermount::check_user_mount(spec.allow_other)?;
    }
    let backing_lock = crate::keyfile::BackingLock::acquire(&spec.backing)?;
    let keys = Arc::new(Keys::open(spec)?);
    let fs = TdeFs::new(&spec.backing, keys.clone()).context("opening the backing directory")?;
    if keys.page_format() == crate::page::FORMAT_V1 {
        tracing::info!(
            "upgrading the tablespace's file headers to format 2 (bound to their paths, with durable lengths)"
        );
        let n = fs
            .upgrade_headers()
            .context("upgrading the file headers to format 2")?;
        tracing::info!(files = n, "file headers upgraded");
    }
    let mut config = Config::default();
    config.mount_options = vec![
        // Absolute: `tde rekey` and `tde status` find the backing directory
        // (and its control socket) from /proc/self/mounts.
        MountOption::FSName(format!("tde:{}", fs.backing().display())),
        MountOption::Subtype("tde".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    config.acl = if as_root || spec.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(spec.threads.max(1));
    config.clone_fd = true;
    let core = fs.clone();
    let session = if as_root {
        fuser::spawn_mount(fs, &spec.mountpoint, &config)
            .with_context(|| format!("mounting on {}", spec.mountpoint.display()))?
    } else {
        // The helper mounts (it checks that this user may write the
        // mountpoint) and hands back /dev/fuse.
        let fd = fusermount::mount(
            &spec.mountpoint,
            &fusermount::options(core.backing(), spec.allow_other),
        )?;
        let acl = config.acl;
        let started = fuser::Session::from_fd(fs, fd, acl, config)
            .and_then(|s| s.spawn())
            .with_context(|| format!("serving the mount on {}", spec.mountpoint.display()));
        match started {
            Ok(s) => s,
            Err(e) => {
                let _ = fusermount::unmount(&spec.mountpoint, true);
                return Err(e);
            }
        }
    };
    // The kernel gives the root inode placeholder attributes (owner root)
    // until its first getattr, and chmod's ownership check does not refresh
    // them: PostgreSQL's chmod of a fresh tablespace location would fail
    // with EPERM. One stat loads the real ones.
    let root = std::fs::metadata(&spec.mountpoint)
        .with_context(|| format!("checking the new mount {}", spec.mountpoint.display()))?;
    raise_readahead(root.dev());
    let on_revoked = {
        let (core, notifier) = (core.clone(), session.notifier());
        Box::new(move || {
            core.wipe_keys();
            // Pages the kernel caches would still be served: drop them, so
            // every read comes to the mount and fails.
            for ino in core.known_inodes() {
                let _ = notifier.inval_inode(INodeNo(ino), 0, 0);
            }
        })
    };
    let keeper = Keeper::start(keys, on_revoked)?;
    let rekey = Arc::new(Rekey::new(core.clone())?);
    let control = crate::control::Server::start(&spec.backing, rekey.clone())?;
    tracing::info!(
        backing = %spec.backing.display(),
        mountpoint = %spec.mountpoint.display(),
        tablespace = %spec.tablespace,
        "mounted"
    );
    Ok(Mounted {
        session: Some(session),
        by_helper: !as_root,
        _backing_lock: backing_lock,
        keeper: Some(keeper),
        control: Some(control),
        rekey: Some(rekey),
        core,
        mountpoint: spec.mountpoint.clone(),
    })
}

/// FUSE mounts start with the kernel's default readahead (128 KiB): raise
/// it to the largest request we accept, for sequential scans. Best effort.
pub fn raise_readahead(dev: u64) {
    let path = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        rustix::fs::major(dev),
        rustix::fs::minor(dev)
    );
    if let Err(e) = std::fs::write(&path, (crate::fs::MAX_WRITE / 1024).to_string()) {
        tracing::debug!(path, error = %e, "could not raise readahead");
    }
}

/// True when something is mounted on `p`: its device differs from its
/// parent's, or it is a dead FUSE mount (ENOTCONN, its daemon gone).
pub fn is_mountpoint(p: &Path) -> bool {
    let Some(parent) = p
        .canonicalize()
        .ok()
        .and_then(|c| c.parent().map(Path::to_path_buf))
    else {
        return std::fs::metadata(p).err().and_then(|e| e.raw_os_error())
            == Some(rustix::io::Errno::NOTCONN.raw_os_error());
    };
    match (std::fs::metadata(p), std::fs::metadata(parent)) {
        (Ok(a), Ok(b)) => a.dev() != b.dev(),
        (Err(e), _) => e.raw_os_error() == Some(rustix::io::Errno::NOTCONN.raw_os_error()),
        _ => false,
    }
}

/// Unmounts `mountpoint` (as root, directly; else with `fusermount3 -u`)
/// and returns once the `tde mount` that served it has finished: its key
/// file written, its lock on the backing directory released, its process
/// gone. A `tde mount` of the same backing directory right after succeeds.
pub fn umount(mountpoint: &Path) -> anyhow::Result<()> {
    let backing = crate::control::backing_of(mountpoint).ok();
    let holder = backing.as_deref().and_then(lock_holder);
    match fusermount::unmount(mountpoint, false)? {
        Unmounted::Done => {}
        Unmounted::Busy => bail!(
            "{} is busy: stop the processes using it (PostgreSQL) first",
            mountpoint.display()
        ),
        Unmounted::NotMounted => bail!("{} is not mounted", mountpoint.display()),
    }
    let deadline = std::time::Instant::now() + UMOUNT_WAIT;
    if let Some(b) = &backing {
        // The lock goes when the mount has done its last write (it is held
        // until `Mounted` is dropped, after the keeper and re-key stop).
        while crate::keyfile::BackingLock::acquire(b).is_err() {
            if std::time::Instant::now() >= deadline {
                bail!(
                    "{} is unmounted, but its tde mount still holds {} after {} s",
                    mountpoint.display(),
                    b.display(),
                    UMOUNT_WAIT.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    if let Some(pid) = holder {
        while process_alive(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(())
}

/// How long `tde umount` waits for the mount process to finish.
const UMOUNT_WAIT: Duration = Duration::from_secs(60);

/// The pid holding the `flock` of directory `dir`, from /proc/locks
/// (`N: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE 0 EOF`, device in hex).
fn lock_holder(dir: &Path) -> Option<u32> {
    let m = std::fs::metadata(dir).ok()?;
    let want = format!(
        "{:02x}:{:02x}:{}",
        rustix::fs::major(m.dev()),
        rustix::fs::minor(m.dev()),
        m.ino()
    );
    std::fs::read_to_string("/proc/locks")
        .ok()?
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 6 && f[1] == "FLOCK" && f[5] == want).then(|| f[4].parse().ok())?
        })
}

/// Whether process `pid` exists and is not a zombie.
fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_holder_of_a_directory_lock() {
        let d = tempfile::tempdir().expect("tmp");
        assert_eq!(lock_holder(d.path()), None);
        let lock = crate::keyfile::BackingLock::acquire(d.path()).expect("lock");
        assert_eq!(lock_holder(d.path()), Some(std::process::id()));
        drop(lock);
        assert_eq!(lock_holder(d.path()), None);
        assert!(process_alive(std::process::id()));
        assert!(!process_alive(u32::MAX - 1));
    }
}
