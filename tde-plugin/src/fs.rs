//! The FUSE file system: a passthrough onto a backing directory in which every
//! regular file is stored in the page format of [`crate::page`].
//!
//! - Directories, symlinks, hard links, renames, permissions and times pass
//!   through to the backing directory unchanged.
//! - Regular files are encrypted per 8 KiB block. A read decrypts the blocks
//!   it covers (one `pread` for the whole range); a write encrypts whole
//!   blocks directly and read-modify-writes only partial ones (one `pwrite`
//!   for the whole range).
//! - No global lock on the data path: each inode has a read-write lock;
//!   overwriting whole blocks inside the file takes it shared, so PostgreSQL
//!   backends writing different pages of one relation run in parallel;
//!   partial, extending and truncating writes take it exclusive.
//! - Inode numbers are the backing files' (the backing root is inode 1).
//! - The key file in the backing root is invisible and untouchable through
//!   the mount.
//! - A block that fails authentication is an I/O error (`EIO`), logged with
//!   its file and block number; it is never returned as data.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{
    DirEntryExt, FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    TimeOrNow, WriteFlags,
};

use crate::page::{self, FileHeader, FileId, HEADER_LEN, PAGE_SIZE, PageCipher, TRAILER_LEN};

/// How long the kernel may cache attributes and entries. Only this process
/// changes the backing directory, so caching is safe; it is short so that
/// out-of-band repairs are seen quickly.
const TTL: Duration = Duration::from_secs(1);
/// Largest write the kernel sends at once.
pub const MAX_WRITE: u32 = 1 << 20;

/// An open regular file.
struct Handle {
    file: File,
    file_id: FileId,
    ino: u64,
    path: PathBuf,
}

/// Per-inode synchronisation of the data path.
#[derive(Default)]
struct InodeState {
    /// Shared for whole-block overwrites inside the file, exclusive for
    /// anything that changes the size or rebuilds a partial block.
    lock: RwLock<()>,
    /// Writes being handled right now, and a count of finished ones.
    in_flight: Mutex<InFlight>,
    finished: std::sync::Condvar,
}

#[derive(Default)]
struct InFlight {
    ranges: Vec<(u64, u64)>,
    done: u64,
}

/// How long an extending write waits for the writes in flight that cover
/// the gap before it, before it fills the gap with zeros itself.
const GAP_WAIT: Duration = Duration::from_millis(50);

impl InodeState {
    /// Registers the write `[offset, end)` until the guard drops.
    fn begin(&self, offset: u64, end: u64) -> WriteGuard<'_> {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ranges
            .push((offset, end));
        WriteGuard(self, offset, end)
    }

    /// The exclusive lock, once the file reaches `offset` or nothing in
    /// flight will fill the gap `[size, offset)`.
    ///
    /// The kernel's writeback sends the pages of a growing file as several
    /// writes at once, and a later one may get here first. Filling its gap
    /// with encrypted zeros would be wasted work (the earlier writes are
    /// about to overwrite it), so it waits for them while they are being
    /// handled by other threads. Waits only go to writes at lower offsets
    /// that are already running, so they cannot form a cycle; the timeout
    /// is a safety net.
    fn exclusive_at(
        &self,
        h: &Handle,
        offset: u64,
    ) -> Result<std::sync::RwLockWriteGuard<'_, ()>, Errno> {
        let deadline = std::time::Instant::now() + GAP_WAIT;
        loop {
            let excl = self.lock.write().unwrap_or_else(|p| p.into_inner());
            let size = Core::logical_size(h)?;
            if offset <= size || std::time::Instant::now() >= deadline {
                return Ok(excl);
            }
            let seen = {
                let f = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
                if !covers(&f.ranges, size, offset) {
                    return Ok(excl);
                }
                f.done
            };
            drop(excl);
            let mut f = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            while f.done == seen {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                f = self
                    .finished
                    .wait_timeout(f, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
    }
}

/// Whether the union of `ranges` covers `[from, to)`.
fn covers(ranges: &[(u64, u64)], from: u64, to: u64) -> bool {
    let mut sorted: Vec<_> = ranges.iter().filter(|r| r.1 > from && r.0 < to).collect();
    sorted.sort_unstable();
    let mut pos = from;
    for &(s, e) in sorted {
        if s > pos {
            break;
        }
        pos = pos.max(e);
    }
    pos >= to
}

/// A registered write; unregisters and wakes waiters on drop.
struct WriteGuard<'a>(&'a InodeState, u64, u64);

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        let mut f = self.0.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = f.ranges.iter().position(|r| *r == (self.1, self.2)) {
            f.ranges.swap_remove(i);
        }
        f.done += 1;
        self.0.finished.notify_all();
    }
}

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

/// The file system's state and data path.
pub struct Core {
    backing: PathBuf,
    root_ino: u64,
    cipher: Arc<RwLock<PageCipher>>,
    paths: RwLock<HashMap<u64, PathBuf>>,
    locks: Mutex<HashMap<u64, Arc<InodeState>>>,
    handles: RwLock<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    /// Generation of each inode number whose file was deleted through this
    /// mount (absent = 0). See [`Core::retire`].
    generations: Mutex<HashMap<u64, u64>>,
    next_generation: AtomicU64,
}

fn errno(e: &io::Error) -> Errno {
    e.raw_os_error().map_or(Errno::EIO, Errno::from_i32)
}

/// Growth is written in pieces of this size, so growing a file by a lot
/// never buffers it whole.
const GROW_CHUNK: u64 = 8 << 20;

/// The timestamps a setattr asks for, `None` if neither.
fn timestamps(
    atime: Option<TimeOrNow>,
    mtime: Option<TimeOrNow>,
) -> Option<rustix::fs::Timestamps> {
    if atime.is_none() && mtime.is_none() {
        return None;
    }
    let omit = rustix::fs::Timespec {
        tv_sec: 0,
        tv_nsec: rustix::fs::UTIME_OMIT,
    };
    Some(rustix::fs::Timestamps {
        last_access: atime.map(time_or_now).unwrap_or(omit),
        last_modification: mtime.map(time_or_now).unwrap_or(omit),
    })
}

fn time_or_now(t: TimeOrNow) -> rustix::fs::Timespec {
    let st = match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    };
    let d = st.duration_since(UNIX_EPOCH).unwrap_or_default();
    rustix::fs::Timespec {
        tv_sec: d.as_secs() as i64,
        tv_nsec: i64::from(d.subsec_nanos()),
    }
}

impl TdeFs {
    /// A file system over `backing` using `cipher`.
    pub fn new(backing: &Path, cipher: Arc<RwLock<PageCipher>>) -> io::Result<Self> {
        Core::new(backing, cipher).map(|c| TdeFs(Arc::new(c)))
    }
}

impl Core {
    fn new(backing: &Path, cipher: Arc<RwLock<PageCipher>>) -> io::Result<Self> {
        let backing = backing.canonicalize()?;
        let root_ino = std::fs::metadata(&backing)?.ino();
        let mut paths = HashMap::new();
        paths.insert(1, PathBuf::new());
        Ok(Self {
            backing,
            root_ino,
            cipher,
            paths: RwLock::new(paths),
            locks: Mutex::new(HashMap::new()),
            handles: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            generations: Mutex::new(HashMap::new()),
            next_generation: AtomicU64::new(1),
        })
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

    fn rel(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        self.paths
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ino.0)
            .cloned()
            .ok_or(Errno::ENOENT)
    }

    fn abs(&self, rel: &Path) -> PathBuf {
        self.backing.join(rel)
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<PathBuf, Errno> {
        let p = self.rel(parent)?;
        if p.as_os_str().is_empty() && is_reserved(name) {
            return Err(Errno::ENOENT);
        }
        Ok(p.join(name))
    }

    fn remember(&self, ino: u64, rel: PathBuf) {
        // Most calls confirm what is known: take the write lock only to change it.
        if self
            .paths
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ino)
            == Some(&rel)
        {
            return;
        }
        self.paths
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ino, rel);
    }

    fn inode(&self, ino: u64) -> Arc<InodeState> {
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(ino)
            .or_default()
            .clone()
    }

    /// The generation to report with inode `ino`.
    fn generation(&self, ino: u64) -> Generation {
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
    /// does not.
    fn retire(&self, ino: u64) {
        let g = self.next_generation.fetch_add(1, Ordering::Relaxed);
        self.generations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ino, g);
        self.paths
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&ino);
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&ino);
    }

    /// The FUSE inode of `rel` if removing it now removes its last link.
    fn last_link(&self, rel: &Path) -> Option<u64> {
        let m = std::fs::symlink_metadata(self.abs(rel)).ok()?;
        (m.nlink() <= 1 || m.is_dir()).then(|| self.fuse_ino(m.ino()))
    }

    /// Removes `name` from `parent` with `op` (unlink or rmdir), retiring
    /// the inode number if that was its last link.
    fn remove(
        &self,
        parent: INodeNo,
        name: &OsStr,
        op: fn(PathBuf) -> io::Result<()>,
    ) -> Result<(), Errno> {
        let rel = self.child(parent, name)?;
        let last = self.last_link(&rel);
        op(self.abs(&rel)).map_err(|e| errno(&e))?;
        if let Some(ino) = last {
            self.retire(ino);
        }
        Ok(())
    }

    fn attr(&self, m: &Metadata) -> FileAttr {
        let ft = m.file_type();
        let kind = if ft.is_dir() {
            FileType::Directory
        } else if ft.is_symlink() {
            FileType::Symlink
        } else if ft.is_fifo() {
            FileType::NamedPipe
        } else if ft.is_socket() {
            FileType::Socket
        } else if ft.is_char_device() {
            FileType::CharDevice
        } else if ft.is_block_device() {
            FileType::BlockDevice
        } else {
            FileType::RegularFile
        };
        let size = if kind == FileType::RegularFile {
            match m.len() {
                0 => 0,
                n => page::logical_len(n).unwrap_or(0),
            }
        } else {
            m.len()
        };
        let t = |s: i64, ns: i64| {
            UNIX_EPOCH + Duration::new(s.max(0) as u64, ns.clamp(0, 999_999_999) as u32)
        };
        FileAttr {
            ino: INodeNo(self.fuse_ino(m.ino())),
            size,
            blocks: m.blocks(),
            atime: t(m.atime(), m.atime_nsec()),
            mtime: t(m.mtime(), m.mtime_nsec()),
            ctime: t(m.ctime(), m.ctime_nsec()),
            crtime: UNIX_EPOCH,
            kind,
            perm: (m.mode() & 0o7777) as u16,
            nlink: m.nlink() as u32,
            uid: m.uid(),
            gid: m.gid(),
            rdev: m.rdev() as u32,
            blksize: PAGE_SIZE as u32,
            flags: 0,
        }
    }

    fn stat_rel(&self, rel: &Path) -> Result<FileAttr, Errno> {
        let m = std::fs::symlink_metadata(self.abs(rel)).map_err(|e| errno(&e))?;
        let a = self.attr(&m);
        self.remember(a.ino.0, rel.to_path_buf());
        Ok(a)
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<Handle>, Errno> {
        self.handles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fh.0)
            .cloned()
            .ok_or(Errno::EBADF)
    }

    /// The open file a request on `ino` should go through: the handle the
    /// kernel named, or, when the inode's path is gone (unlinked while
    /// open), any open handle of it. `None`: use the path.
    fn open_file(&self, ino: u64, fh: Option<FileHandle>) -> Option<Arc<Handle>> {
        if let Some(h) = fh.and_then(|f| self.handle(f).ok()) {
            return Some(h);
        }
        let gone = self.rel(INodeNo(ino)).map_or(true, |rel| {
            std::fs::symlink_metadata(self.abs(&rel))
                .map_or(true, |m| self.fuse_ino(m.ino()) != ino)
        });
        if gone { self.open_handle_of(ino) } else { None }
    }

    fn fstat(&self, h: &Handle) -> Result<FileAttr, Errno> {
        h.file
            .metadata()
            .map(|m| self.attr(&m))
            .map_err(|e| errno(&e))
    }

    /// Any open handle of inode `ino` (a scan: only for files whose path is
    /// gone; the kernel does not send a handle with every request on an
    /// open file, e.g. fchmod).
    fn open_handle_of(&self, ino: u64) -> Option<Arc<Handle>> {
        self.handles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .find(|h| h.ino == ino)
            .cloned()
    }

    fn chown_to(path: &Path, req: &Request) {
        let _ = std::os::unix::fs::lchown(path, Some(req.uid()), Some(req.gid()));
    }

    /// Opens a backing regular file and reads (or, for an empty writable
    /// file, writes) its header.
    fn open_backing(&self, rel: &Path, ino: u64, write: bool) -> Result<Handle, Errno> {
        let path = self.abs(rel);
        let file = OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&path)
            .map_err(|e| errno(&e))?;
        let mut head = [0u8; HEADER_LEN as usize];
        let len = file.metadata().map_err(|e| errno(&e))?.len();
        let header = if len == 0 && write {
            let h = FileHeader::generate().map_err(|_| Errno::EIO)?;
            file.write_all_at(&h.encode(), 0).map_err(|e| errno(&e))?;
            h
        } else {
            file.read_exact_at(&mut head, 0).map_err(|e| errno(&e))?;
            FileHeader::decode(&head).map_err(|e| {
                tracing::error!(file = %path.display(), error = %e, "refusing a backing file that is not ours");
                Errno::EIO
            })?
        };
        Ok(Handle {
            file,
            file_id: header.file_id,
            ino,
            path,
        })
    }

    fn register(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(fh, Arc::new(h));
        fh
    }

    fn logical_size(h: &Handle) -> Result<u64, Errno> {
        Self::logical_size_of(&h.file, &h.path)
    }

    fn logical_size_of(file: &File, path: &Path) -> Result<u64, Errno> {
        let stored = file.metadata().map_err(|e| errno(&e))?.len();
        page::logical_len(stored).map_err(|e| {
            tracing::error!(file = %path.display(), error = %e, "backing file has an impossible length");
            Errno::EIO
        })
    }

    /// Answers a lookup, create, mknod, mkdir, symlink or link.
    fn reply_entry(&self, reply: ReplyEntry, r: Result<FileAttr, Errno>) {
        match r {
            Ok(a) => reply.entry(&TTL, &a, self.generation(a.ino.0)),
            Err(e) => reply.error(e),
        }
    }

    /// The backing directory.
    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// The FUSE inode number of a backing file.
    pub fn inode_of(&self, m: &Metadata) -> u64 {
        self.fuse_ino(m.ino())
    }

    /// Open files whose last name is gone (unlinked while open): no walk of
    /// the backing directory finds them, but they are still read.
    pub fn unlinked_open_files(&self) -> Vec<(u64, FileId, File, PathBuf)> {
        self.handles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|h| h.file.metadata().is_ok_and(|m| m.nlink() == 0))
            .filter_map(|h| Some((h.ino, h.file_id, h.file.try_clone().ok()?, h.path.clone())))
            .collect()
    }

    /// Re-encrypts under the cipher's current version every block in
    /// `[first, first + max)` of `file` that is under another version, with
    /// the inode's exclusive lock held for the step (so no write of the
    /// kernel's can land between the read and the write back: no lost
    /// update). `buf` is scratch space.
    #[allow(clippy::too_many_arguments)]
    pub fn rekey_step(
        &self,
        file: &File,
        path: &Path,
        ino: u64,
        file_id: &FileId,
        first: u64,
        max: u64,
        buf: &mut Vec<u8>,
    ) -> Result<RekeyStep, Errno> {
        let inode = self.inode(ino);
        let _excl = inode.lock.write().unwrap_or_else(|p| p.into_inner());
        let len = Self::logical_size_of(file, path)?;
        let nblocks = len.div_ceil(PAGE_SIZE as u64);
        if first >= nblocks {
            return Ok(RekeyStep::default());
        }
        let last = (first + max.max(1)).min(nblocks) - 1;
        let start = page::block_offset(first);
        let end = page::block_offset(last) + (block_len(len, last) + TRAILER_LEN) as u64;
        let stored = scratch(buf, (end - start) as usize);
        file.read_exact_at(stored, start).map_err(|e| errno(&e))?;
        let cipher = self.cipher.read().unwrap_or_else(|p| p.into_inner());
        let target = cipher.current_version();
        let mut plain = [0u8; PAGE_SIZE];
        let (mut at, mut rewritten) = (0usize, 0u64);
        for b in first..=last {
            let n = block_len(len, b) + TRAILER_LEN;
            let block = &mut stored[at..at + n];
            if PageCipher::block_version(block) != Some(target) {
                cipher
                    .decrypt_block(file_id, b, block, &mut plain)
                    .map_err(|e| {
                        tracing::error!(file = %path.display(), block = b, error = %e, "re-key stops at a damaged block (restore the file, then run tde rekey again)");
                        Errno::EIO
                    })?;
                // The old ciphertext is read: the new one takes its place.
                cipher
                    .encrypt_block(file_id, b, &plain[..n - TRAILER_LEN], block)
                    .map_err(|_| Errno::EIO)?;
                rewritten += 1;
            }
            at += n;
        }
        plain.fill(0);
        drop(cipher);
        if rewritten > 0 {
            file.write_all_at(stored, start).map_err(|e| errno(&e))?;
        }
        Ok(RekeyStep {
            blocks: last - first + 1,
            rewritten,
            stored_bytes: end - start,
        })
    }

    /// Reads and decrypts plaintext `[offset, offset + size)`, clamped to the
    /// file size, and hands it to `f`. One `pread` for the whole range; the
    /// buffers are per thread and reused, so a read allocates nothing.
    fn read_range<R>(
        &self,
        h: &Handle,
        offset: u64,
        size: usize,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, Errno> {
        let file_len = Self::logical_size(h)?;
        if offset >= file_len || size == 0 {
            return Ok(f(&[]));
        }
        let end = (offset + size as u64).min(file_len);
        let first = offset / PAGE_SIZE as u64;
        let last = (end - 1) / PAGE_SIZE as u64;
        let stored_end =
            page::block_offset(last) + block_len(file_len, last) as u64 + TRAILER_LEN as u64;
        READ_BUFS.with(|cell| {
            let (stored, plain) = &mut *cell.borrow_mut();
            let stored = scratch(stored, (stored_end - page::block_offset(first)) as usize);
            h.file
                .read_exact_at(stored, page::block_offset(first))
                .map_err(|e| errno(&e))?;
            let plain = scratch(plain, ((last - first + 1) as usize) * PAGE_SIZE);
            let cipher = self.cipher.read().unwrap_or_else(|p| p.into_inner());
            let mut at = 0usize;
            for b in first..=last {
                let n = block_len(file_len, b);
                let src = &stored[at..at + n + TRAILER_LEN];
                let dst = &mut plain[((b - first) as usize) * PAGE_SIZE..];
                cipher.decrypt_block(&h.file_id, b, src, dst).map_err(|e| {
                    tracing::error!(file = %h.path.display(), block = b, error = %e, "refusing to return a block");
                    Errno::EIO
                })?;
                at += n + TRAILER_LEN;
            }
            let skip = (offset - first * PAGE_SIZE as u64) as usize;
            Ok(f(&plain[skip..skip + (end - offset) as usize]))
        })
    }

    /// Writes plaintext `data` at `offset` (zero-filling any gap after the
    /// current end), re-encrypting every block it touches.
    fn write_range(&self, h: &Handle, offset: u64, data: &[u8]) -> Result<(), Errno> {
        if data.is_empty() {
            return Ok(());
        }
        let inode = self.inode(h.ino);
        let end = offset + data.len() as u64;
        let _registered = inode.begin(offset, end);
        if offset.is_multiple_of(PAGE_SIZE as u64) && data.len().is_multiple_of(PAGE_SIZE) {
            // Whole blocks: their ciphertext depends on nothing in the file,
            // so encrypt before taking any lock (writes run in parallel).
            // Its own buffer: `grow` below uses WRITE_BUF.
            return WHOLE_BUF.with(|cell| {
                let out = &mut *cell.borrow_mut();
                let out = scratch(out, data.len() / PAGE_SIZE * (PAGE_SIZE + TRAILER_LEN));
                let at = page::block_offset(offset / PAGE_SIZE as u64);
                let version = self.encrypt_whole(h, offset, data, out)?;
                // Inside the current size: no size change, so shared.
                {
                    let _shared = inode.lock.read().unwrap_or_else(|p| p.into_inner());
                    self.still_current(h, version, offset, data, out)?;
                    if end <= Self::logical_size(h)? {
                        h.file.write_all_at(out, at).map_err(|e| errno(&e))?;
                        drop(_shared);
                        start_writeback(h, offset, out.len());
                        return Ok(());
                    }
                }
                {
                    let _excl = inode.exclusive_at(h, offset)?;
                    self.still_current(h, version, offset, data, out)?;
                    let old_len = Self::logical_size(h)?;
                    // A partial old last block inside this write is covered
                    // whole by `data`, so the new blocks simply replace it.
                    if offset > old_len {
                        self.grow(h, old_len, offset)?;
                    }
                    h.file.write_all_at(out, at).map_err(|e| errno(&e))?;
                }
                start_writeback(h, offset, out.len());
                Ok(())
            });
        }
        let _excl = inode.exclusive_at(h, offset)?;
        let mut old_len = Self::logical_size(h)?;
        if offset > old_len {
            self.grow(h, old_len, offset)?;
            old_len = offset;
        }
        self.rewrite_with_old(h, offset, data, old_len, old_len.max(end))
    }

    /// Encrypts whole blocks of `data` (at the block-aligned `offset`) into
    /// `out`; returns the data key version used.
    fn encrypt_whole(
        &self,
        h: &Handle,
        offset: u64,
        data: &[u8],
        out: &mut [u8],
    ) -> Result<u32, Errno> {
        let first = offset / PAGE_SIZE as u64;
        let cipher = self.cipher.read().unwrap_or_else(|p| p.into_inner());
        for (i, (plain, stored)) in data
            .chunks(PAGE_SIZE)
            .zip(out.chunks_mut(PAGE_SIZE + TRAILER_LEN))
            .enumerate()
        {
            cipher
                .encrypt_block(&h.file_id, first + i as u64, plain, stored)
                .map_err(|_| Errno::EIO)?;
        }
        Ok(cipher.current_version())
    }

    /// Called with the inode lock held, before writing blocks encrypted
    /// without it: if a re-key changed the current data key version
    /// meanwhile, encrypts them again, so that no block is written under a
    /// version that a re-key has already moved past (and may retire).
    fn still_current(
        &self,
        h: &Handle,
        version: u32,
        offset: u64,
        data: &[u8],
        out: &mut [u8],
    ) -> Result<(), Errno> {
        let now = self
            .cipher
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .current_version();
        if now != version {
            self.encrypt_whole(h, offset, data, out)?;
        }
        Ok(())
    }

    /// Grows the file from `from` to `to` bytes with zeros, in pieces.
    /// Called with the inode's exclusive lock held.
    fn grow(&self, h: &Handle, mut from: u64, to: u64) -> Result<(), Errno> {
        while from < to {
            let n = (to - from).min(GROW_CHUNK);
            self.rewrite_with_old(h, from, &vec![0u8; n as usize], from, from + n)?;
            from += n;
        }
        Ok(())
    }

    /// The general write of `data` at `offset <= old_len`: every block it
    /// touches is rebuilt from the old plaintext and `data`, and written
    /// with one `pwrite`. Blocks that `data` covers whole are encrypted
    /// straight from it. Called with the inode's exclusive lock held.
    fn rewrite_with_old(
        &self,
        h: &Handle,
        offset: u64,
        data: &[u8],
        old_len: u64,
        new_len: u64,
    ) -> Result<(), Errno> {
        let end = offset + data.len() as u64;
        let first = offset / PAGE_SIZE as u64;
        let last = (end - 1) / PAGE_SIZE as u64;
        WRITE_BUF.with(|cell| {
            let out = &mut *cell.borrow_mut();
            let total: usize = (first..=last).map(|b| block_len(new_len, b) + TRAILER_LEN).sum();
            let out = scratch(out, total);
            let cipher = self.cipher.read().unwrap_or_else(|p| p.into_inner());
            let mut merged = [0u8; PAGE_SIZE];
            let mut at = 0usize;
            for b in first..=last {
                let bs = b * PAGE_SIZE as u64;
                let n = block_len(new_len, b);
                let dst = &mut out[at..at + n + TRAILER_LEN];
                at += n + TRAILER_LEN;
                if offset <= bs && end >= bs + n as u64 {
                    let from = (bs - offset) as usize;
                    cipher.encrypt_block(&h.file_id, b, &data[from..from + n], dst).map_err(|_| Errno::EIO)?;
                    continue;
                }
                // A partial block: old plaintext (if any), zeros, new bytes.
                merged[..n].fill(0);
                if bs < old_len {
                    let on = block_len(old_len, b);
                    let mut stored = [0u8; PAGE_SIZE + TRAILER_LEN];
                    h.file
                        .read_exact_at(&mut stored[..on + TRAILER_LEN], page::block_offset(b))
                        .map_err(|e| errno(&e))?;
                    let mut old = [0u8; PAGE_SIZE];
                    cipher.decrypt_block(&h.file_id, b, &stored[..on + TRAILER_LEN], &mut old).map_err(|e| {
                        tracing::error!(file = %h.path.display(), block = b, error = %e, "cannot update a damaged block");
                        Errno::EIO
                    })?;
                    merged[..on.min(n)].copy_from_slice(&old[..on.min(n)]);
                    old.fill(0);
                }
                let ws = offset.max(bs);
                let we = end.min(bs + n as u64);
                if ws < we {
                    merged[(ws - bs) as usize..(we - bs) as usize]
                        .copy_from_slice(&data[(ws - offset) as usize..(we - offset) as usize]);
                }
                cipher.encrypt_block(&h.file_id, b, &merged[..n], dst).map_err(|_| Errno::EIO)?;
            }
            merged.fill(0);
            drop(cipher);
            // The stored length is now `stored_len(new_len)`: a grown last
            // block was rewritten at its new length, other blocks kept theirs.
            h.file
                .write_all_at(out, page::block_offset(first))
                .map_err(|e| errno(&e))
        })
    }

    /// Sets the plaintext length: shrinks (re-encrypting a cut block) or
    /// grows with zeros.
    fn set_len(&self, h: &Handle, len: u64) -> Result<(), Errno> {
        let inode = self.inode(h.ino);
        let _excl = inode.lock.write().unwrap_or_else(|p| p.into_inner());
        let old_len = Self::logical_size(h)?;
        if len > old_len {
            return self.grow(h, old_len, len);
        }
        if len < old_len && !len.is_multiple_of(PAGE_SIZE as u64) {
            // Re-encrypt the new last block at its new length.
            let b = len / PAGE_SIZE as u64;
            let keep = self.read_range(
                h,
                b * PAGE_SIZE as u64,
                (len - b * PAGE_SIZE as u64) as usize,
                <[u8]>::to_vec,
            )?;
            let mut stored = vec![0u8; keep.len() + TRAILER_LEN];
            self.cipher
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .encrypt_block(&h.file_id, b, &keep, &mut stored)
                .map_err(|_| Errno::EIO)?;
            h.file
                .write_all_at(&stored, page::block_offset(b))
                .map_err(|e| errno(&e))?;
        }
        h.file.set_len(page::stored_len(len)).map_err(|e| errno(&e))
    }

    fn truncate_path(&self, rel: &Path, ino: u64, len: u64) -> Result<(), Errno> {
        let h = self.open_backing(rel, ino, true)?;
        self.set_len(&h, len)
    }
}

thread_local! {
    /// Per worker thread: stored and plaintext buffers of reads.
    static READ_BUFS: std::cell::RefCell<(Vec<u8>, Vec<u8>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    /// Per worker thread: the encrypted output of writes.
    static WRITE_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Per worker thread: the encrypted output of whole-block writes.
    static WHOLE_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// What one [`Core::rekey_step`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RekeyStep {
    /// Blocks looked at (0: the file ends before `first`).
    pub blocks: u64,
    /// Blocks re-encrypted.
    pub rewritten: u64,
    /// Stored bytes read.
    pub stored_bytes: u64,
}

/// Names in the backing root that belong to tde (the key file, its
/// temporary copy, the control socket, the re-key checkpoint): hidden from
/// and untouchable through the mount.
pub fn is_reserved(name: &OsStr) -> bool {
    name.as_encoded_bytes().starts_with(b"tde.")
}

/// Large writes (the kernel's writeback of a file written sequentially)
/// start the backing file's writeback right away, so the disk works while
/// the next writes are encrypted and the final fsync has little left to do.
/// `POSIX_FADV_DONTNEED` starts writeback of the dirty range without waiting
/// (and drops clean ciphertext pages: the plaintext stays cached above).
/// Small writes (PostgreSQL's 8 KiB pages) are left to the kernel to merge.
fn start_writeback(h: &Handle, offset: u64, stored_len: usize) {
    if stored_len >= STREAM_WRITE {
        let at = page::block_offset(offset / PAGE_SIZE as u64);
        let _ = rustix::fs::fadvise(
            &h.file,
            at,
            std::num::NonZeroU64::new(stored_len as u64),
            rustix::fs::Advice::DontNeed,
        );
    }
}

/// Writes at least this large start their writeback at once.
const STREAM_WRITE: usize = 256 << 10;

/// `buf` resized to at least `len` bytes, reusing its allocation; returns
/// the first `len` (the caller overwrites them).
fn scratch(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buf.len() < len {
        buf.resize(len, 0);
    }
    &mut buf[..len]
}

/// The path `p` after `from` was renamed to `to`. (`Path::join("")` would
/// add a trailing slash, which turns a file's path into ENOTDIR.)
fn repoint(p: &Path, from: &Path, to: &Path) -> PathBuf {
    match p.strip_prefix(from) {
        Ok(rest) if rest.as_os_str().is_empty() => to.to_path_buf(),
        Ok(rest) => to.join(rest),
        Err(_) => p.to_path_buf(),
    }
}

/// Plaintext length of block `b` in a file of `len` bytes.
pub(crate) fn block_len(len: u64, b: u64) -> usize {
    (len - b * PAGE_SIZE as u64).min(PAGE_SIZE as u64) as usize
}

impl Filesystem for TdeFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_readahead(MAX_WRITE);
        // Let the kernel cache writes and send them in large batches; fsync
        // still flushes them all to us (and us to disk) before it returns.
        // The kernel then keeps file times itself and flushes them at close
        // with a setattr on the file handle, which must work for files
        // already unlinked: see `setattr`.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_WRITEBACK_CACHE);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.reply_entry(
            reply,
            self.child(parent, name).and_then(|rel| self.stat_rel(&rel)),
        );
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        // By path, as usual; through an open file when the kernel names one
        // or the path is gone (an unlinked file that is still open).
        let r = match fh.and_then(|f| self.handle(f).ok()) {
            Some(h) => self.fstat(&h),
            None => self
                .rel(ino)
                .and_then(|rel| self.stat_rel(&rel))
                .or_else(|e| {
                    self.open_handle_of(ino.0)
                        .map_or(Err(e), |h| self.fstat(&h))
                }),
        };
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let result = (|| -> Result<FileAttr, Errno> {
            let sys = |e: rustix::io::Errno| Errno::from_i32(e.raw_os_error());
            // An open file is changed through its descriptor: it may have
            // been unlinked (PostgreSQL truncates, then unlinks, relation
            // files that other processes still hold open), and the kernel
            // sends the handle exactly then. Otherwise by path.
            if let Some(h) = self.open_file(ino.0, fh) {
                if let Some(m) = mode {
                    rustix::fs::fchmod(&h.file, rustix::fs::Mode::from_raw_mode(m & 0o7777))
                        .map_err(sys)?;
                }
                if uid.is_some() || gid.is_some() {
                    rustix::fs::fchown(
                        &h.file,
                        uid.map(rustix::fs::Uid::from_raw),
                        gid.map(rustix::fs::Gid::from_raw),
                    )
                    .map_err(sys)?;
                }
                if let Some(len) = size {
                    self.set_len(&h, len)?;
                }
                if let Some(ts) = timestamps(atime, mtime) {
                    rustix::fs::futimens(&h.file, &ts).map_err(sys)?;
                }
                return self.fstat(&h);
            }
            let rel = self.rel(ino)?;
            let path = self.abs(&rel);
            if let Some(m) = mode {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(m & 0o7777))
                    .map_err(|e| errno(&e))?;
            }
            if uid.is_some() || gid.is_some() {
                std::os::unix::fs::lchown(&path, uid, gid).map_err(|e| errno(&e))?;
            }
            if let Some(len) = size {
                self.truncate_path(&rel, ino.0, len)?;
            }
            if let Some(ts) = timestamps(atime, mtime) {
                rustix::fs::utimensat(
                    rustix::fs::CWD,
                    &path,
                    &ts,
                    rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(sys)?;
            }
            self.stat_rel(&rel)
        })();
        if let Err(e) = &result {
            tracing::debug!(ino = ino.0, error = ?e, "setattr failed");
        }
        match result {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self
            .rel(ino)
            .and_then(|rel| std::fs::read_link(self.abs(&rel)).map_err(|e| errno(&e)))
        {
            Ok(t) => reply.data(t.as_os_str().as_encoded_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & 0o170000 != 0o100000 {
            // Only regular files: PostgreSQL needs nothing else.
            reply.error(Errno::EPERM);
            return;
        }
        let result = (|| -> Result<FileAttr, Errno> {
            let rel = self.child(parent, name)?;
            let path = self.abs(&rel);
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode & !umask & 0o7777)
                .open(&path)
                .map_err(|e| errno(&e))?;
            f.write_all_at(&FileHeader::generate().map_err(|_| Errno::EIO)?.encode(), 0)
                .map_err(|e| errno(&e))?;
            Core::chown_to(&path, req);
            self.stat_rel(&rel)
        })();
        self.reply_entry(reply, result);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let result = (|| -> Result<FileAttr, Errno> {
            let rel = self.child(parent, name)?;
            let path = self.abs(&rel);
            std::fs::create_dir(&path).map_err(|e| errno(&e))?;
            std::fs::set_permissions(
                &path,
                std::fs::Permissions::from_mode(mode & !umask & 0o7777),
            )
            .map_err(|e| errno(&e))?;
            Core::chown_to(&path, req);
            self.stat_rel(&rel)
        })();
        self.reply_entry(reply, result);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.remove(parent, name, std::fs::remove_file) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.remove(parent, name, std::fs::remove_dir) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let result = (|| -> Result<FileAttr, Errno> {
            let rel = self.child(parent, link_name)?;
            let path = self.abs(&rel);
            std::os::unix::fs::symlink(target, &path).map_err(|e| errno(&e))?;
            Core::chown_to(&path, req);
            self.stat_rel(&rel)
        })();
        self.reply_entry(reply, result);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let result = (|| -> Result<(), Errno> {
            let from = self.child(parent, name)?;
            let to = self.child(newparent, newname)?;
            let rflags = rustix::fs::RenameFlags::from_bits(flags.bits()).ok_or(Errno::EINVAL)?;
            // A target that is replaced (and not exchanged) loses a link.
            let replaced = if rflags.contains(rustix::fs::RenameFlags::EXCHANGE) {
                None
            } else {
                let same = std::fs::symlink_metadata(self.abs(&from))
                    .ok()
                    .zip(std::fs::symlink_metadata(self.abs(&to)).ok())
                    .is_some_and(|(a, b)| a.ino() == b.ino());
                if same { None } else { self.last_link(&to) }
            };
            rustix::fs::renameat_with(
                rustix::fs::CWD,
                self.abs(&from),
                rustix::fs::CWD,
                self.abs(&to),
                rflags,
            )
            .map_err(|e| Errno::from_i32(e.raw_os_error()))?;
            // Re-point remembered paths under the old name.
            if let Some(ino) = replaced {
                self.retire(ino);
            }
            let mut paths = self.paths.write().unwrap_or_else(|p| p.into_inner());
            for p in paths.values_mut() {
                *p = repoint(p, &from, &to);
            }
            Ok(())
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let result = (|| -> Result<FileAttr, Errno> {
            let from = self.rel(ino)?;
            let to = self.child(newparent, newname)?;
            std::fs::hard_link(self.abs(&from), self.abs(&to)).map_err(|e| errno(&e))?;
            self.stat_rel(&to)
        })();
        self.reply_entry(reply, result);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY);
        match self
            .rel(ino)
            .and_then(|rel| self.open_backing(&rel, ino.0, write))
        {
            Ok(h) => reply.opened(FileHandle(self.register(h)), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut reply = Some(reply);
        let r = self.handle(fh).and_then(|h| {
            self.read_range(&h, offset, size as usize, |data| {
                if let Some(r) = reply.take() {
                    r.data(data);
                }
            })
        });
        if let (Err(e), Some(r)) = (r, reply.take()) {
            r.error(e);
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self
            .handle(fh)
            .and_then(|h| self.write_range(&h, offset, data))
        {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => {
                tracing::warn!(ino = ino.0, fh = fh.0, offset, len = data.len(), error = ?e, "write failed");
                reply.error(e)
            }
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.handles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = self.handle(fh).and_then(|h| {
            if datasync {
                h.file.sync_data()
            } else {
                h.file.sync_all()
            }
            .map_err(|e| errno(&e))
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let result = (|| -> Result<(), Errno> {
            let rel = self.rel(ino)?;
            let at_root = rel.as_os_str().is_empty();
            let mut entries: Vec<(u64, FileType, std::ffi::OsString)> = vec![
                (ino.0, FileType::Directory, ".".into()),
                (ino.0, FileType::Directory, "..".into()),
            ];
            for e in std::fs::read_dir(self.abs(&rel)).map_err(|e| errno(&e))? {
                let e = e.map_err(|e| errno(&e))?;
                let name = e.file_name();
                if at_root && is_reserved(&name) {
                    continue;
                }
                let ft = e.file_type().map_err(|e| errno(&e))?;
                let kind = if ft.is_dir() {
                    FileType::Directory
                } else if ft.is_symlink() {
                    FileType::Symlink
                } else {
                    FileType::RegularFile
                };
                entries.push((self.fuse_ino(e.ino()), kind, name));
            }
            for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
                if reply.add(INodeNo(ino), (i + 1) as u64, kind, &name) {
                    break;
                }
            }
            Ok(())
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.rel(ino).and_then(|rel| {
            File::open(self.abs(&rel))
                .and_then(|d| d.sync_all())
                .map_err(|e| errno(&e))
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match rustix::fs::statvfs(&self.backing) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(Errno::from_i32(e.raw_os_error())),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let result = (|| -> Result<(FileAttr, u64), Errno> {
            let rel = self.child(parent, name)?;
            let path = self.abs(&rel);
            let excl = flags & rustix::fs::OFlags::EXCL.bits() as i32 != 0;
            let f = OpenOptions::new()
                .write(true)
                .create(!excl)
                .create_new(excl)
                .mode(mode & !umask & 0o7777)
                .open(&path)
                .map_err(|e| errno(&e))?;
            if f.metadata().map_err(|e| errno(&e))?.len() == 0 {
                f.write_all_at(&FileHeader::generate().map_err(|_| Errno::EIO)?.encode(), 0)
                    .map_err(|e| errno(&e))?;
                Core::chown_to(&path, req);
            }
            drop(f);
            let attr = self.stat_rel(&rel)?;
            let h = self.open_backing(&rel, attr.ino.0, true)?;
            Ok((attr, self.register(h)))
        })();
        match result {
            Ok((a, fh)) => reply.created(
                &TTL,
                &a,
                self.generation(a.ino.0),
                FileHandle(fh),
                FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Err(e) => reply.error(e),
        }
    }

    // Extended attributes are not supported. ENOSYS makes the kernel stop
    // asking (and answer EOPNOTSUPP itself) without fuser's warning per call.
    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: fuser::ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if mode != 0 {
            reply.error(Errno::EOPNOTSUPP);
            return;
        }
        let r = self.handle(fh).and_then(|h| {
            let want = offset + length;
            if want > Core::logical_size(&h)? {
                self.set_len(&h, want)
            } else {
                Ok(())
            }
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
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
    fn gap_coverage() {
        assert!(covers(&[(0, 10), (10, 20)], 5, 20));
        assert!(covers(&[(10, 20), (0, 12)], 0, 20), "order does not matter");
        assert!(!covers(&[(0, 10), (11, 20)], 0, 20), "a hole at 10");
        assert!(!covers(&[(0, 10)], 0, 11), "short of the end");
        assert!(!covers(&[], 0, 1));
        assert!(
            !covers(&[(20, 30)], 0, 10),
            "ranges after the gap do not count"
        );
    }

    #[test]
    fn block_lengths() {
        assert_eq!(block_len(8192 * 2 + 5, 2), 5);
        assert_eq!(block_len(8192 * 2, 1), 8192);
    }
}
