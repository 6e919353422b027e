//! `tde mount`: get the tablespace's data keys from the sidecar, mount the
//! FUSE file system, and keep watching the sidecar.
//!
//! The plaintext DEKs live only in this process (inside AWS-LC key contexts,
//! which cleanse their memory when freed at unmount). If the sidecar goes
//! away after mounting, I/O goes on with the keys in memory; the keeper thread
//! ([`crate::rotation`]) notices, reconnects when it is back, and rewraps the
//! key file when the master key rotates.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use fuser::{Config, MountOption, SessionACL};
use tde_protocol::{ErrorCode, Request, Response};

use crate::client::{Client, Refused};
use crate::fs::TdeFs;
use crate::keyfile::KeyFile;
use crate::page::PageCipher;
use crate::rekey::Rekey;
use crate::rotation::{Keeper, KeyFileLock};

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
}

/// Connects to the sidecar and sends `req`, waiting up to `wait` while it is
/// unreachable or sealed, with a message each time. Other refusals end at
/// once.
pub fn call_waiting(sidecar: &Path, req: &Request, wait: Duration) -> anyhow::Result<Response> {
    let deadline = Instant::now() + wait;
    let mut said = None::<String>;
    loop {
        let attempt = Client::connect(sidecar).and_then(|mut c| c.call(req));
        let why = match attempt {
            Ok(r) => return Ok(r),
            Err(e) => match e.downcast_ref::<Refused>() {
                Some(r) if r.code == ErrorCode::Sealed => {
                    "the sidecar is sealed; waiting for it to be unsealed".to_string()
                }
                Some(_) => return Err(e),
                None => format!(
                    "the sidecar at {} is unreachable ({e:#}); waiting",
                    sidecar.display()
                ),
            },
        };
        if Instant::now() >= deadline {
            bail!("{why}: gave up after {} s", wait.as_secs());
        }
        if said.as_deref() != Some(why.as_str()) {
            eprintln!("tde mount: {why}");
            tracing::warn!("{why}");
            said = Some(why);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn explain(e: anyhow::Error, spec: &MountSpec) -> anyhow::Error {
    match e.downcast_ref::<Refused>().map(|r| r.code) {
        Some(ErrorCode::ContextMismatch) => anyhow::anyhow!(
            "mount refused: the key file in {} was not made for tablespace {:?} of cluster {:?} (it was copied from another backing directory, or the names are wrong)",
            spec.backing.display(),
            spec.tablespace,
            spec.cluster
        ),
        Some(ErrorCode::PermissionDenied) => {
            e.context("mount refused by the sidecar's client policy")
        }
        _ => e,
    }
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
    Ok(())
}

/// Creates or reads the key file and builds the page cipher with every DEK
/// version it holds.
pub fn load_keys(spec: &MountSpec) -> anyhow::Result<PageCipher> {
    let context = KeyFile::context(&spec.tablespace, &spec.cluster);
    let mut cipher = PageCipher::new(&spec.tablespace).map_err(|e| anyhow::anyhow!("{e}"))?;
    if spec.init {
        if KeyFile::path(&spec.backing).exists() {
            bail!(
                "{} is already a tde backing directory (it has a key file); mount it without --init",
                spec.backing.display()
            );
        }
        if std::fs::read_dir(&spec.backing)?.next().is_some() {
            bail!(
                "{} is not empty: --init needs an empty backing directory",
                spec.backing.display()
            );
        }
        let key = spec.key.as_deref().context("--init needs --key MEK")?;
        let req = Request::GenerateDataKey {
            key: key.to_string(),
            context,
        };
        let Response::DataKey {
            version,
            plaintext,
            ciphertext,
            ..
        } = call_waiting(&spec.sidecar, &req, spec.wait).map_err(|e| explain(e, spec))?
        else {
            bail!("unexpected response from the sidecar")
        };
        cipher
            .add_key(1, plaintext.expose())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        KeyFile::new(key, &spec.tablespace, &spec.cluster, version, &ciphertext)
            .store(&spec.backing)?;
        return Ok(cipher);
    }
    let kf = KeyFile::load(&spec.backing)?;
    if kf.tablespace != spec.tablespace || kf.cluster != spec.cluster {
        bail!(
            "mount refused: the key file in {} belongs to tablespace {:?} of cluster {:?}, not {:?} of {:?}",
            spec.backing.display(),
            kf.tablespace,
            kf.cluster,
            spec.tablespace,
            spec.cluster
        );
    }
    if let Some(k) = &spec.key
        && *k != kf.mek
    {
        bail!("the key file is under master key {:?}, not {k:?}", kf.mek);
    }
    for dek in &kf.deks {
        let req = Request::Decrypt {
            ciphertext: dek.blob()?,
            context: context.clone(),
        };
        let Response::Decrypted { plaintext, .. } =
            call_waiting(&spec.sidecar, &req, spec.wait).map_err(|e| explain(e, spec))?
        else {
            bail!("unexpected response from the sidecar")
        };
        cipher
            .add_key(dek.version, plaintext.expose())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(cipher)
}

/// A mounted tablespace; unmounted when dropped.
pub struct Mounted {
    session: Option<fuser::BackgroundSession>,
    /// Held until the process ends (the kernel releases it then).
    _backing_lock: crate::keyfile::BackingLock,
    keeper: Option<Keeper>,
    control: Option<crate::control::Server>,
    rekey: Option<Arc<Rekey>>,
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
        if !self.finished() {
            match rustix::mount::unmount(&self.mountpoint, rustix::mount::UnmountFlags::empty()) {
                Ok(()) => {}
                Err(e) if e == rustix::io::Errno::BUSY => return Ok(false),
                Err(e) if e == rustix::io::Errno::INVAL => {} // already gone
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("unmounting {}", self.mountpoint.display()));
                }
            }
        }
        self.shutdown()?;
        Ok(true)
    }

    fn shutdown(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.control.take() {
            c.stop();
        }
        if let Some(r) = self.rekey.take() {
            r.stop();
        }
        if let Some(mut k) = self.keeper.take() {
            k.stop();
        }
        match self.session.take() {
            Some(s) if !s.guard.is_finished() => s.umount_and_join().context("unmounting"),
            Some(s) => s.join().context("the file system thread failed"),
            None => Ok(()),
        }
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
        let _ = self.shutdown();
    }
}

/// Checks, locks the backing directory, loads keys, mounts, and starts the
/// keeper (sidecar connection, key file rewraps), the re-key engine
/// (resuming a checkpointed re-key) and the control socket.
pub fn mount(spec: &MountSpec) -> anyhow::Result<Mounted> {
    check_dirs(spec)?;
    let backing_lock = crate::keyfile::BackingLock::acquire(&spec.backing)?;
    let cipher = Arc::new(RwLock::new(load_keys(spec)?));
    let fs = TdeFs::new(&spec.backing, cipher.clone()).context("opening the backing directory")?;
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
    config.acl = SessionACL::All;
    config.n_threads = Some(spec.threads.max(1));
    config.clone_fd = true;
    let core = fs.clone();
    let session = fuser::spawn_mount(fs, &spec.mountpoint, &config)
        .with_context(|| format!("mounting on {}", spec.mountpoint.display()))?;
    // The kernel gives the root inode placeholder attributes (owner root)
    // until its first getattr, and chmod's ownership check does not refresh
    // them: PostgreSQL's chmod of a fresh tablespace location would fail
    // with EPERM. One stat loads the real ones.
    let root = std::fs::metadata(&spec.mountpoint)
        .with_context(|| format!("checking the new mount {}", spec.mountpoint.display()))?;
    raise_readahead(root.dev());
    let keyfile_lock = KeyFileLock::default();
    let keeper = Keeper::start(
        spec.sidecar.clone(),
        spec.backing.clone(),
        keyfile_lock.clone(),
    )?;
    let rekey = Arc::new(Rekey::new(
        core,
        cipher,
        spec.sidecar.clone(),
        keyfile_lock,
    )?);
    let control = crate::control::Server::start(&spec.backing, rekey.clone())?;
    tracing::info!(
        backing = %spec.backing.display(),
        mountpoint = %spec.mountpoint.display(),
        tablespace = %spec.tablespace,
        "mounted"
    );
    Ok(Mounted {
        session: Some(session),
        _backing_lock: backing_lock,
        keeper: Some(keeper),
        control: Some(control),
        rekey: Some(rekey),
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

/// Unmounts `mountpoint` (as root, directly; else with `fusermount3 -u`).
pub fn umount(mountpoint: &Path) -> anyhow::Result<()> {
    match rustix::mount::unmount(mountpoint, rustix::mount::UnmountFlags::empty()) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::PERM => {
            let st = std::process::Command::new("fusermount3")
                .arg("-u")
                .arg(mountpoint)
                .status()?;
            if st.success() {
                Ok(())
            } else {
                bail!("fusermount3 -u {} failed", mountpoint.display())
            }
        }
        Err(e) if e == rustix::io::Errno::BUSY => {
            bail!(
                "{} is busy: stop the processes using it (PostgreSQL) first",
                mountpoint.display()
            )
        }
        Err(e) if e == rustix::io::Errno::INVAL => bail!("{} is not mounted", mountpoint.display()),
        Err(e) => Err(e).with_context(|| format!("unmounting {}", mountpoint.display())),
    }
}
