//! The inode table: the backing path each FUSE inode number names, the
//! per-inode state of the data path, open handles, and the generations of
//! inode numbers the backing file system gave to new files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use fuser::{Errno, Generation};

use super::blocks::{Handle, InodeState};

/// The inode table of one mount.
pub(crate) struct Inodes {
    paths: RwLock<HashMap<u64, PathBuf>>,
    states: Mutex<HashMap<u64, Arc<InodeState>>>,
    handles: RwLock<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    /// Generation of each inode number whose file was deleted through this
    /// mount (absent = 0). See [`Inodes::retire`].
    generations: Mutex<HashMap<u64, u64>>,
    next_generation: AtomicU64,
}

impl Inodes {
    pub(crate) fn new() -> Inodes {
        let mut paths = HashMap::new();
        paths.insert(1, PathBuf::new());
        Inodes {
            paths: RwLock::new(paths),
            states: Mutex::new(HashMap::new()),
            handles: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            generations: Mutex::new(HashMap::new()),
            next_generation: AtomicU64::new(1),
        }
    }

    /// The path of inode `ino`, relative to the backing root.
    pub(crate) fn rel(&self, ino: u64) -> Result<PathBuf, Errno> {
        self.paths
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ino)
            .cloned()
            .ok_or(Errno::ENOENT)
    }

    /// Records that inode `ino` is at `rel`.
    pub(crate) fn remember(&self, ino: u64, rel: &Path) {
        // Most calls confirm what is known: take the write lock only to change it.
        if self
            .paths
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ino)
            .is_some_and(|p| p == rel)
        {
            return;
        }
        self.paths
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ino, rel.to_path_buf());
    }

    /// Every path under `from` now lives under `to` (after a rename).
    pub(crate) fn repoint(&self, from: &Path, to: &Path) {
        let mut paths = self.paths.write().unwrap_or_else(|p| p.into_inner());
        for p in paths.values_mut() {
            *p = repoint(p, from, to);
        }
    }

    /// The data-path state of inode `ino` (created on first use).
    pub(crate) fn state(&self, ino: u64) -> Arc<InodeState> {
        self.states
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(ino)
            .or_default()
            .clone()
    }

    /// Every inode's state.
    pub(crate) fn states(&self) -> Vec<(u64, Arc<InodeState>)> {
        self.states
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(i, s)| (*i, s.clone()))
            .collect()
    }

    /// A fresh state for inode `ino`: the backing file behind the number is
    /// not the one the old state described.
    pub(crate) fn reset_state(&self, ino: u64) -> Arc<InodeState> {
        let st = Arc::new(InodeState::default());
        self.states
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ino, st.clone());
        st
    }

    /// The generation to report with inode `ino`.
    pub(crate) fn generation(&self, ino: u64) -> Generation {
        Generation(
            self.generations
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&ino)
                .copied()
                .unwrap_or(0),
        )
    }

    /// Records that the file behind inode `ino` is gone. The backing file
    /// system may give the number to a new file; the FUSE protocol then wants
    /// a new generation, so that a kernel inode that outlived the old file
    /// is marked stale instead of being reused with its page cache (the
    /// plaintext of another file). The kernel usually evicts such inodes
    /// itself when their link count drops; this covers the cases where it
    /// does not. Open handles keep their own state.
    pub(crate) fn retire(&self, ino: u64) {
        let g = self.next_generation.fetch_add(1, Ordering::Relaxed);
        self.generations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ino, g);
        self.paths
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&ino);
        self.states
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&ino);
    }

    /// The open handle `fh`.
    pub(crate) fn handle(&self, fh: u64) -> Result<Arc<Handle>, Errno> {
        self.handles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fh)
            .cloned()
            .ok_or(Errno::EBADF)
    }

    /// Registers an open file; returns its handle number.
    pub(crate) fn register(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(fh, Arc::new(h));
        fh
    }

    /// Forgets handle `fh` (release).
    pub(crate) fn release(&self, fh: u64) {
        self.handles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh);
    }

    /// Any open handle of inode `ino` (a scan: only for files whose path is
    /// gone; the kernel does not send a handle with every request on an
    /// open file, e.g. fchmod).
    pub(crate) fn open_handle_of(&self, ino: u64) -> Option<Arc<Handle>> {
        self.handles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .find(|h| h.ino == ino)
            .cloned()
    }

    /// Every open handle.
    pub(crate) fn open_handles(&self) -> Vec<Arc<Handle>> {
        self.handles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Every inode number with a known path.
    pub(crate) fn known(&self) -> Vec<u64> {
        self.paths
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect()
    }
}

/// The path `p` after `from` was renamed to `to`. (`Path::join("")` would
/// add a trailing slash, which turns a file's path into ENOTDIR.)
pub(crate) fn repoint(p: &Path, from: &Path, to: &Path) -> PathBuf {
    match p.strip_prefix(from) {
        Ok(rest) if rest.as_os_str().is_empty() => to.to_path_buf(),
        Ok(rest) => to.join(rest),
        Err(_) => p.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repoint_after_rename() {
        let r = |p: &str, f: &str, t: &str| repoint(Path::new(p), Path::new(f), Path::new(t));
        assert_eq!(r("a/tmp.1", "a/tmp.1", "a/seg"), PathBuf::from("a/seg"));
        assert_eq!(
            r("a/tmp.1", "a/tmp.1", "a/seg").as_os_str().len(),
            5,
            "no trailing slash"
        );
        assert_eq!(r("d/x/y", "d", "e"), PathBuf::from("e/x/y"));
        assert_eq!(
            r("dd/x", "d", "e"),
            PathBuf::from("dd/x"),
            "components, not string prefixes"
        );
        assert_eq!(r("b/c", "a", "z"), PathBuf::from("b/c"));
    }

    #[test]
    fn retired_numbers_get_a_new_generation_and_state() {
        let t = Inodes::new();
        t.remember(7, Path::new("a"));
        let s = t.state(7);
        assert!(Arc::ptr_eq(&s, &t.state(7)));
        assert_eq!(t.generation(7), Generation(0));
        t.retire(7);
        assert!(t.rel(7).is_err());
        assert_ne!(t.generation(7), Generation(0));
        assert!(!Arc::ptr_eq(&s, &t.state(7)), "a new file, a new state");
    }
}
