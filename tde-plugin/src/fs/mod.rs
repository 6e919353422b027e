//! The FUSE file system: a passthrough onto a backing directory in which every
//! regular file is stored in the page format of [`crate::page`].
//!
//! - Directories, symlinks, renames, permissions and times pass through to
//!   the backing directory. Hard links are refused (`EPERM`): each file is
//!   bound to its one name.
//! - Regular files are encrypted per 8 KiB block. A read decrypts the blocks
//!   it covers (one `pread` for the whole range); a write encrypts whole
//!   blocks directly and read-modify-writes only partial ones (one `pwrite`
//!   for the whole range).
//! - The mount owns each file's state: its size, its header (durable length,
//!   path binding) and a read-write lock. A file is checked the first time
//!   it is touched ([`Core`]'s `load`: header authenticated for its path,
//!   length possible and not below the durable length, a torn tail left by
//!   a crash cut back to the last authentic block); from then on sizes come
//!   from that state, never from a backing length in flux.
//! - No global lock on the data path: reads and whole-block overwrites inside
//!   the file take the inode's lock shared (PostgreSQL backends working on
//!   different pages of one relation run in parallel); anything that changes
//!   the size or rebuilds a partial block takes it exclusive.
//! - Inode numbers are the backing files' (the backing root is inode 1).
//! - tde's own files in the backing root (`tde.*`) are invisible and
//!   untouchable through the mount.
//! - A block that fails authentication is an I/O error (`EIO`), logged with
//!   its file and block number; it is never returned as data.
//!
//! # Layout
//! - [`inodes`]: the inode table (paths, per-inode state, handles,
//!   generations).
//! - [`blocks`]: the block engine: loading and checking a file, reads,
//!   writes, truncation, fsync and the durable length, renames that move a
//!   file's binding, re-key steps. No FUSE types: unit-tested on a plain
//!   directory.
//! - [`journal`]: the overwrite journal, which makes an in-place overwrite
//!   of blocks that hold data safe against a crash of the mount.
//! - [`fuse`]: the FUSE glue (`fuser::Filesystem`), each handler inside a
//!   panic boundary.

pub mod blocks;
pub mod fuse;
pub mod inodes;
pub mod journal;

use std::ffi::OsStr;
use std::fs::Metadata;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

pub use blocks::{Handle, InodeState, RekeyStep};

use crate::keys::Keys;
use crate::page::PAGE_SIZE;

/// Largest write the kernel sends at once.
pub const MAX_WRITE: u32 = 1 << 20;

/// The file system: a shared [`Core`], so the re-key engine can work on the
/// same inodes, locks and cipher while FUSE owns the `TdeFs`.
#[derive(Clone)]
pub struct TdeFs(Arc<Core>);

impl std::ops::Deref for TdeFs {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.0
    }
}

impl TdeFs {
    /// A file system over `backing` with the tablespace's `keys`.
    pub fn new(backing: &Path, keys: Arc<Keys>) -> io::Result<Self> {
        Core::new(backing, keys).map(|c| TdeFs(Arc::new(c)))
    }
}

/// The file system's state and data path.
pub struct Core {
    backing: PathBuf,
    root_ino: u64,
    keys: Arc<Keys>,
    inodes: inodes::Inodes,
    /// Serialises renames (each may hold several files' header locks).
    renames: std::sync::Mutex<()>,
    /// The "keys were zeroized" error is logged once.
    said_wiped: AtomicBool,
    /// Overwrites of blocks that hold data go through it first.
    journal: journal::Journal,
    /// What the mount has served, for `tde status` and the metrics.
    pub io: IoStats,
}

/// A mount's I/O counters since it started (plaintext bytes, as the
/// database sees them).
#[derive(Debug, Default)]
pub struct IoStats {
    /// Bytes returned to readers.
    pub read_bytes: AtomicU64,
    /// Bytes written by writers.
    pub written_bytes: AtomicU64,
    /// Reads answered with an error.
    pub read_errors: AtomicU64,
    /// Writes answered with an error.
    pub write_errors: AtomicU64,
    /// Blocks that failed authentication on their last try (tampered,
    /// damaged, or under a key the mount does not have): each refused.
    pub auth_failures: AtomicU64,
}

impl IoStats {
    /// The counters now.
    pub fn snapshot(&self) -> IoCounters {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        IoCounters {
            read_bytes: get(&self.read_bytes),
            written_bytes: get(&self.written_bytes),
            read_errors: get(&self.read_errors),
            write_errors: get(&self.write_errors),
            auth_failures: get(&self.auth_failures),
        }
    }

    pub(crate) fn add(a: &AtomicU64, n: u64) {
        a.fetch_add(n, Ordering::Relaxed);
    }
}

/// [`IoStats`] at one moment, as the control socket answers them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IoCounters {
    /// Bytes returned to readers.
    pub read_bytes: u64,
    /// Bytes written by writers.
    pub written_bytes: u64,
    /// Reads answered with an error.
    pub read_errors: u64,
    /// Writes answered with an error.
    pub write_errors: u64,
    /// Blocks refused because they failed authentication.
    pub auth_failures: u64,
}

impl Core {
    fn new(backing: &Path, keys: Arc<Keys>) -> io::Result<Self> {
        let backing = backing.canonicalize()?;
        let root_ino = std::fs::metadata(&backing)?.ino();
        let journal = journal::Journal::open(&backing)?;
        // Before anything is loaded: blocks torn by a crash in the middle
        // of their overwrite are put back first.
        journal.replay(&backing, &keys.cipher())?;
        Ok(Self {
            backing,
            root_ino,
            keys,
            inodes: inodes::Inodes::new(),
            renames: std::sync::Mutex::new(()),
            said_wiped: AtomicBool::new(false),
            journal,
            io: IoStats::default(),
        })
    }

    /// The backing directory.
    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// The tablespace's keys.
    pub fn keys(&self) -> &Arc<Keys> {
        &self.keys
    }

    /// Backing inode number to FUSE inode number (the root is 1).
    fn fuse_ino(&self, backing_ino: u64) -> u64 {
        if backing_ino == self.root_ino {
            1
        } else if backing_ino == 1 {
            self.root_ino
        } else {
            backing_ino
        }
    }

    /// The FUSE inode number of a backing file.
    pub fn inode_of(&self, m: &Metadata) -> u64 {
        self.fuse_ino(m.ino())
    }

    fn abs(&self, rel: &Path) -> PathBuf {
        self.backing.join(rel)
    }

    /// The path of `name` in directory `parent` (relative to the backing
    /// root); tde's own names in the root do not exist.
    fn child(&self, parent: u64, name: &OsStr) -> Result<PathBuf, fuser::Errno> {
        let p = self.inodes.rel(parent)?;
        if p.as_os_str().is_empty() && is_reserved(name) {
            return Err(fuser::Errno::ENOENT);
        }
        Ok(p.join(name))
    }

    /// The FUSE inode of the entry at `rel` (and its metadata) if removing
    /// that name removes its last link: its number is then retired.
    fn last_link(&self, rel: &Path) -> Option<(u64, Metadata)> {
        let m = std::fs::symlink_metadata(self.abs(rel)).ok()?;
        (m.nlink() <= 1 || m.is_dir()).then(|| (self.fuse_ino(m.ino()), m))
    }

    /// Every inode number the mount has handed out (for cache invalidation).
    pub fn known_inodes(&self) -> Vec<u64> {
        self.inodes.known()
    }

    /// Zeroization reached the mount: drops the data keys; from now on every
    /// read and write is an I/O error.
    pub fn wipe_keys(&self) {
        self.keys.wipe();
        tracing::error!(
            "the sidecar was zeroized (or revoked this mount's keys): the data keys are wiped from memory; every read and write of the mount now fails with EIO"
        );
    }

    fn check_wiped(&self) -> Result<(), fuser::Errno> {
        if self.keys.wiped() {
            if !self.said_wiped.swap(true, Ordering::Relaxed) {
                tracing::error!("refusing I/O: this mount's data keys were zeroized");
            }
            return Err(fuser::Errno::EIO);
        }
        Ok(())
    }
}

/// Names in the backing root that belong to tde (the key file, its
/// temporary copy, the control socket, the re-key checkpoint): hidden from
/// and untouchable through the mount.
pub fn is_reserved(name: &OsStr) -> bool {
    name.as_encoded_bytes().starts_with(b"tde.")
}

/// Plaintext length of block `b` in a file of `len` bytes.
pub(crate) fn block_len(len: u64, b: u64) -> usize {
    (len - b * PAGE_SIZE as u64).min(PAGE_SIZE as u64) as usize
}

fn errno(e: &io::Error) -> fuser::Errno {
    e.raw_os_error()
        .map_or(fuser::Errno::EIO, fuser::Errno::from_i32)
}

fn sys_errno(e: rustix::io::Errno) -> fuser::Errno {
    fuser::Errno::from_i32(e.raw_os_error())
}

/// Every regular file under `dir` (paths relative to it, sorted). With
/// `skip_reserved`, tde's own names directly in `dir` are left out (for the
/// backing root).
pub fn regular_files(dir: &Path, skip_reserved: bool) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let entries = match std::fs::read_dir(dir.join(&rel)) {
            Ok(e) => e,
            // A directory removed meanwhile.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for e in entries {
            let e = e?;
            if skip_reserved && rel.as_os_str().is_empty() && is_reserved(&e.file_name()) {
                continue;
            }
            let ft = e.file_type()?;
            let r = rel.join(e.file_name());
            if ft.is_dir() {
                stack.push(r);
            } else if ft.is_file() {
                out.push(r);
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_lengths() {
        assert_eq!(block_len(8192 * 2 + 5, 2), 5);
        assert_eq!(block_len(8192 * 2, 1), 8192);
    }

    #[test]
    fn regular_files_skip_tde_files_only_in_the_root() {
        let d = tempfile::tempdir().expect("tmp");
        std::fs::create_dir_all(d.path().join("b/c")).expect("mkdir");
        for f in ["tde.key", "tde.rekey", "z", "b/c/x", "b/a", "b/tde.key"] {
            std::fs::write(d.path().join(f), b"x").expect("write");
        }
        let names = |v: Vec<PathBuf>| -> Vec<String> {
            v.iter().map(|p| p.to_string_lossy().into_owned()).collect()
        };
        assert_eq!(
            names(regular_files(d.path(), true).expect("walk")),
            ["b/a", "b/c/x", "b/tde.key", "z"]
        );
        assert_eq!(
            names(regular_files(&d.path().join("b"), false).expect("walk")),
            ["a", "c/x", "tde.key"]
        );
    }
}
