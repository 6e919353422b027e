//! The block engine: everything the mount does to a backing file, with no
//! FUSE types, so it is tested on a plain directory.
//!
//! # A file's state belongs to the mount
//! The first time a file is touched (lookup, getattr, open, re-key), it is
//! *loaded* under its inode's exclusive lock (`Core::load`):
//!
//! 1. its header must be ours and, in format 2, authenticate for the path
//!    the file is at (a file swapped with another, or copied over another,
//!    is refused);
//! 2. its length must be possible; a tail beyond the header's durable length
//!    that is not a whole authentic block (an append cut short by a crash of
//!    the mount or the host) is cut back to the last authentic block, as a
//!    journaling file system replays its log at mount;
//! 3. its length must not be below the durable length (a file cut by
//!    someone who can write the backing directory is refused).
//!
//! From then on the size is the mount's own ([`InodeState`]): readers take
//! it under the inode's shared lock, and only writers holding the exclusive
//! lock change it, so a reader never sees a half-appended file.
//!
//! # The durable length
//! `fsync` of a file whose size grew since the last one writes the new size
//! into its header after the data is on disk, and syncs again; a shrinking
//! truncation lowers it first. A file shorter than its durable length was cut
//! outside the mount.
//!
//! # Renames
//! A file's header is bound to its path. A rename first writes a header
//! valid at both names and syncs it, then renames, then rewrites the header
//! for the new name only; a crash anywhere leaves a file valid where it is.
//! Renaming a directory does this for every file below it.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockWriteGuard};
use std::time::{Duration, Instant};

use fuser::Errno;

use super::{Core, block_len, errno, regular_files, sys_errno};
use crate::page::{
    self, BLOCK_STRIDE, FORMAT_V1, FORMAT_VERSION, FileHeader, FileId, HEADER_LEN, PAGE_SIZE,
    PageCipher, TRAILER_LEN,
};

/// Per-inode state of the data path.
#[derive(Default)]
pub struct InodeState {
    /// Shared for reads and whole-block overwrites inside the file,
    /// exclusive for loading and for anything that changes the size or
    /// rebuilds a partial block.
    pub(crate) lock: RwLock<()>,
    /// The plaintext size, valid once loaded.
    size: AtomicU64,
    loaded: AtomicBool,
    /// The header as last written or read. Lock order: `lock`, then `meta`.
    meta: Mutex<Meta>,
    /// Writes being handled right now, and a count of finished ones.
    in_flight: Mutex<InFlight>,
    finished: Condvar,
}

#[derive(Default)]
struct Meta {
    /// `None` only for an empty file of a format-1 tablespace being upgraded.
    header: Option<FileHeader>,
    /// Shrinking truncations so far: a durable length computed before one
    /// is stale.
    shrinks: u64,
}

#[derive(Default)]
struct InFlight {
    ranges: Vec<(u64, u64)>,
    done: u64,
}

impl InodeState {
    /// The plaintext size (valid once loaded).
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn set_size(&self, n: u64) {
        self.size.store(n, Ordering::Release);
    }

    fn loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    fn meta(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The file's header as the mount knows it.
    pub fn header(&self) -> Option<FileHeader> {
        self.meta().header
    }

    /// Registers the write `[offset, end)` until the guard drops.
    fn begin(&self, offset: u64, end: u64) -> WriteGuard<'_> {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ranges
            .push((offset, end));
        WriteGuard(self, offset, end)
    }

    fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.lock.write().unwrap_or_else(|p| p.into_inner())
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
    fn exclusive_at(&self, offset: u64) -> RwLockWriteGuard<'_, ()> {
        let deadline = Instant::now() + GAP_WAIT;
        loop {
            let excl = self.exclusive();
            let size = self.size();
            if offset <= size || Instant::now() >= deadline {
                return excl;
            }
            let seen = {
                let f = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
                if !covers(&f.ranges, size, offset) {
                    return excl;
                }
                f.done
            };
            drop(excl);
            let mut f = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            while f.done == seen {
                let left = deadline.saturating_duration_since(Instant::now());
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

/// How long an extending write waits for the writes in flight that cover
/// the gap before it, before it fills the gap with zeros itself.
const GAP_WAIT: Duration = Duration::from_millis(50);

/// Blocks from block `first` on that hold data in a file of `len` bytes.
fn held(len: u64, first: u64) -> u64 {
    len.div_ceil(PAGE_SIZE as u64).saturating_sub(first)
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

/// An open regular file.
pub struct Handle {
    pub(crate) file: File,
    pub(crate) ino: u64,
    pub(crate) file_id: FileId,
    /// The backing path when opened (for logs).
    pub(crate) path: PathBuf,
    writable: bool,
    pub(crate) state: Arc<InodeState>,
}

impl Handle {
    /// The backing file.
    pub fn file(&self) -> &File {
        &self.file
    }
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

/// Growth is written in pieces of this size, so growing a file by a lot
/// never buffers it whole.
const GROW_CHUNK: u64 = 8 << 20;
/// Blocks read at once when checking a file's unsynced tail.
const TAIL_CHUNK: u64 = 128;
/// Writes at least this large start their writeback at once.
const STREAM_WRITE: usize = 256 << 10;

thread_local! {
    /// Per worker thread: stored and plaintext buffers of reads.
    static READ_BUFS: std::cell::RefCell<(Vec<u8>, Vec<u8>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    /// Per worker thread: the encrypted output of writes.
    static WRITE_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Per worker thread: the encrypted output of whole-block writes.
    static WHOLE_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `buf` resized to at least `len` bytes, reusing its allocation; returns
/// the first `len` (the caller overwrites them).
fn scratch(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buf.len() < len {
        buf.resize(len, 0);
    }
    &mut buf[..len]
}

fn open_nofollow(path: &Path, write: bool) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
}

/// A file to write through: the handle's own, or the same file opened again
/// for writing.
enum Writable<'a> {
    Handle(&'a File),
    Reopened(File),
}

impl std::ops::Deref for Writable<'_> {
    type Target = File;
    fn deref(&self) -> &File {
        match self {
            Writable::Handle(f) => f,
            Writable::Reopened(f) => f,
        }
    }
}

fn put_header(file: &File, h: &FileHeader) -> Result<(), Errno> {
    file.write_all_at(&h.encode(), 0).map_err(|e| errno(&e))
}

fn path_bytes(rel: &Path) -> &[u8] {
    rel.as_os_str().as_bytes()
}

/// Large writes (the kernel's writeback of a file written sequentially)
/// start the backing file's writeback right away, so the disk works while
/// the next writes are encrypted and the final fsync has little left to do.
/// `POSIX_FADV_DONTNEED` starts writeback of the dirty range without waiting
/// (and drops clean ciphertext pages: the plaintext stays cached above).
/// Small writes (PostgreSQL's 8 KiB pages) are left to the kernel to merge.
fn start_writeback(file: &File, offset: u64, stored_len: usize) {
    if stored_len >= STREAM_WRITE {
        let at = page::block_offset(offset / PAGE_SIZE as u64);
        let _ = rustix::fs::fadvise(
            file,
            at,
            std::num::NonZeroU64::new(stored_len as u64),
            rustix::fs::Advice::DontNeed,
        );
    }
}

impl Core {
    /// The page cipher, or `EIO` once the keys were zeroized.
    fn cipher(&self) -> Result<std::sync::RwLockReadGuard<'_, PageCipher>, Errno> {
        self.check_wiped()?;
        Ok(self.keys.cipher())
    }

    /// `file` (the handle's) if it was opened for writing, else the same
    /// file opened again for writing by its path `rel`.
    fn writable<'a>(&self, h: &'a Handle, rel: &Path) -> Result<Writable<'a>, Errno> {
        if h.writable {
            return Ok(Writable::Handle(&h.file));
        }
        let f = open_nofollow(&self.abs(rel), true).map_err(|e| errno(&e))?;
        let (a, b) = (
            f.metadata().map_err(|e| errno(&e))?,
            h.file.metadata().map_err(|e| errno(&e))?,
        );
        if (a.dev(), a.ino()) != (b.dev(), b.ino()) {
            return Err(Errno::ESTALE);
        }
        Ok(Writable::Reopened(f))
    }

    /// Opens the backing file `rel` (inode `ino`) and loads its state.
    pub(crate) fn open_file(&self, rel: &Path, ino: u64, write: bool) -> Result<Handle, Errno> {
        let file = open_nofollow(&self.abs(rel), write).map_err(|e| errno(&e))?;
        self.adopt(file, rel, ino, write)
    }

    /// A handle on `file`, the backing file at `rel` (inode `ino`, opened
    /// for writing if `write`), its state loaded.
    pub(crate) fn adopt(
        &self,
        file: File,
        rel: &Path,
        ino: u64,
        write: bool,
    ) -> Result<Handle, Errno> {
        let path = self.abs(rel);
        self.inodes.remember(ino, rel);
        let mut st = self.inodes.state(ino);
        if st.loaded() {
            // Another file behind the same number (replaced outside the
            // mount): check it from scratch.
            let mut head = [0u8; HEADER_LEN as usize];
            let same = file.read_exact_at(&mut head, 0).is_ok()
                && FileHeader::decode(&head).ok().map(|h| h.file_id)
                    == st.header().map(|h| h.file_id);
            if !same {
                st = self.inodes.reset_state(ino);
            }
        }
        self.load(&st, rel, &file)?;
        if write && st.header().is_none() {
            // An empty file of an older tablespace gets its header now.
            let mut meta = st.meta();
            meta.header = Some(FileHeader::generate().map_err(|_| Errno::EIO)?);
            self.bind(&file, rel, &mut meta, None, |_| {})?;
        }
        let file_id = st.header().map(|h| h.file_id).ok_or(Errno::EIO)?;
        Ok(Handle {
            file,
            ino,
            file_id,
            path,
            writable: write,
            state: st,
        })
    }

    /// The plaintext size of the regular file `rel` (inode `ino`), loading
    /// it first if needed.
    pub(crate) fn size_of(&self, rel: &Path, ino: u64) -> Result<u64, Errno> {
        let st = self.inodes.state(ino);
        if !st.loaded() {
            let file = open_nofollow(&self.abs(rel), false).map_err(|e| errno(&e))?;
            self.load(&st, rel, &file)?;
        }
        Ok(st.size())
    }

    /// Loads `st` from the file `file` at `rel`: checks the header and the
    /// length, and recovers a torn tail (see the module doc). Every refusal
    /// is logged with the file name and is `EIO`.
    pub(crate) fn load(&self, st: &InodeState, rel: &Path, file: &File) -> Result<(), Errno> {
        if st.loaded() {
            return Ok(());
        }
        let _excl = st.exclusive();
        if st.loaded() {
            return Ok(());
        }
        let path = self.abs(rel);
        let refuse = |why: String| {
            tracing::error!(file = %path.display(), "{why}");
            Errno::EIO
        };
        let len = file.metadata().map_err(|e| errno(&e))?.len();
        let format = self.keys.page_format();
        if len == 0 && format == FORMAT_V1 {
            // An empty file of an older tablespace: no header yet (the
            // upgrade writes one).
            *st.meta() = Meta::default();
            st.set_size(0);
            st.loaded.store(true, Ordering::Release);
            return Ok(());
        }
        if len < HEADER_LEN {
            return Err(refuse(format!(
                "backing file has an impossible length {len} (shorter than its header): cut or damaged"
            )));
        }
        let mut head = [0u8; HEADER_LEN as usize];
        file.read_exact_at(&mut head, 0).map_err(|e| errno(&e))?;
        let header = FileHeader::decode(&head)
            .map_err(|e| refuse(format!("refusing a backing file that is not ours: {e}")))?;
        let cipher = self.cipher()?;
        match header.version {
            FORMAT_V1 if format >= FORMAT_VERSION => {
                return Err(refuse(
                    "refusing a format-1 header in a tablespace whose files all have format 2 (restored from an old copy, or forged)".into(),
                ));
            }
            FORMAT_V1 => {}
            _ => cipher
                .verify_header(&header, path_bytes(rel))
                .map_err(|e| refuse(format!("refusing the file: {e}")))?,
        }
        let logical = self.recover_tail(file, rel, &header, len, &cipher)?;
        drop(cipher);
        if logical < header.durable_len {
            return Err(refuse(format!(
                "the file holds {logical} bytes, less than its last durable length {}: it was cut outside the mount",
                header.durable_len
            )));
        }
        *st.meta() = Meta {
            header: Some(header),
            shrinks: 0,
        };
        st.set_size(logical);
        st.loaded.store(true, Ordering::Release);
        if header.renaming {
            // A rename was cut short by a crash: bind the file to the name
            // it has now.
            let mut meta = st.meta();
            let finished = open_nofollow(&path, true)
                .map_err(|e| errno(&e))
                .and_then(|w| self.bind(&w, rel, &mut meta, None, |_| {}));
            if let Err(e) = finished {
                tracing::warn!(file = %path.display(), error = ?e, "could not finish an interrupted rename's header");
            }
        }
        Ok(())
    }

    /// The plaintext length of `file` (`len` stored bytes) once its part
    /// beyond the durable length is checked: every block there is
    /// decrypted, and the file is cut at the first one that is not whole
    /// and authentic (an append or overwrite cut short when the mount or the
    /// host stopped; nothing there was fsynced). Blocks below the durable
    /// length are never cut: their damage is reported when they are read.
    fn recover_tail(
        &self,
        file: &File,
        rel: &Path,
        header: &FileHeader,
        len: u64,
        cipher: &PageCipher,
    ) -> Result<u64, Errno> {
        let path = self.abs(rel);
        let durable_end = page::stored_len(header.durable_len);
        let mut end = len;
        if len > durable_end {
            let body = len - HEADER_LEN;
            let (full, rem) = (body / BLOCK_STRIDE, body % BLOCK_STRIDE);
            // The last piece: a partial block, or a torn trailer (not a block).
            let last_len = (rem > TRAILER_LEN as u64).then_some(rem as usize);
            if last_len.is_none() && rem > 0 {
                end = page::block_offset(full);
            }
            let blocks = full + u64::from(last_len.is_some());
            let mut b = header.durable_len / PAGE_SIZE as u64;
            let chunk = blocks.saturating_sub(b).min(TAIL_CHUNK);
            let mut stored = vec![0u8; chunk as usize * BLOCK_STRIDE as usize];
            let mut plain = [0u8; PAGE_SIZE];
            'scan: while b < blocks {
                let n = (blocks - b).min(TAIL_CHUNK);
                let last = b + n - 1;
                let piece = |x: u64| {
                    if x == full {
                        last_len.unwrap_or(0)
                    } else {
                        BLOCK_STRIDE as usize
                    }
                };
                let span =
                    (page::block_offset(last) - page::block_offset(b)) as usize + piece(last);
                file.read_exact_at(&mut stored[..span], page::block_offset(b))
                    .map_err(|e| errno(&e))?;
                let mut at = 0;
                for x in b..=last {
                    let block = &stored[at..at + piece(x)];
                    if cipher
                        .decrypt_block(&header.file_id, x, block, &mut plain)
                        .is_err()
                    {
                        end = page::block_offset(x);
                        break 'scan;
                    }
                    at += piece(x);
                }
                b = last + 1;
            }
            plain.fill(0);
            end = end.max(durable_end);
        }
        if end != len {
            let w = open_nofollow(&path, true).map_err(|e| errno(&e))?;
            w.set_len(end).map_err(|e| errno(&e))?;
            tracing::warn!(
                file = %path.display(),
                from_bytes = len,
                to_bytes = end,
                "recovered a torn tail: a write beyond the last fsync was cut short (the mount or the host stopped in the middle of it); the file is cut back to its last whole authentic block"
            );
        }
        page::logical_len(end).map_err(|e| {
            tracing::error!(file = %path.display(), error = %e, "backing file has an impossible length");
            Errno::EIO
        })
    }

    /// After a clean unmount, no write can come: makes the data of every
    /// file the mount loaded durable (`syncfs`), then records each one's
    /// length as durable in its header (and syncs again). The next mount
    /// then has no unsynced tail to check.
    pub fn record_durable_lengths(&self) -> std::io::Result<u64> {
        let dir = File::open(&self.backing)?;
        rustix::fs::syncfs(&dir)?;
        let mut n = 0;
        for (ino, st) in self.inodes.states() {
            if !st.loaded() {
                continue;
            }
            let mut meta = st.meta();
            let size = st.size();
            let Some(h) = meta
                .header
                .filter(|h| h.version == FORMAT_VERSION && size > h.durable_len)
            else {
                continue;
            };
            let Ok(rel) = self.inodes.rel(ino) else {
                continue;
            };
            let Ok(f) = open_nofollow(&self.abs(&rel), true) else {
                continue;
            };
            // The file at that name must be the one the state describes.
            let mut head = [0u8; HEADER_LEN as usize];
            let same = f.read_exact_at(&mut head, 0).is_ok()
                && FileHeader::decode(&head).is_ok_and(|x| x.file_id == h.file_id)
                && f.metadata()
                    .is_ok_and(|m| page::logical_len(m.len()) == Ok(size));
            if same
                && self
                    .bind(&f, &rel, &mut meta, None, |x| x.durable_len = size)
                    .is_ok()
            {
                n += 1;
            }
        }
        rustix::fs::syncfs(&dir)?;
        Ok(n)
    }

    /// Seals `meta`'s header for `rel` (and, while renaming, `renaming_to`)
    /// after `change`, and writes it to `file`. The header lock is held by
    /// the caller (`meta`).
    fn bind(
        &self,
        file: &File,
        rel: &Path,
        meta: &mut Meta,
        renaming_to: Option<&Path>,
        change: impl FnOnce(&mut FileHeader),
    ) -> Result<(), Errno> {
        let Some(mut h) = meta.header else {
            return Ok(());
        };
        change(&mut h);
        self.cipher()?
            .seal_header(&mut h, path_bytes(rel), renaming_to.map(path_bytes))
            .map_err(|_| Errno::EIO)?;
        put_header(file, &h)?;
        meta.header = Some(h);
        Ok(())
    }

    /// Creates the backing file `rel` with a header bound to it, owned by
    /// `uid:gid`. The file appears with its header or not at all (an
    /// `O_TMPFILE` linked into place), so an empty backing file is never
    /// ours. `EEXIST` if the name is taken. Returns the new file, open for
    /// reading and writing.
    pub(crate) fn create_file(
        &self,
        rel: &Path,
        mode: u32,
        owner: (u32, u32),
    ) -> Result<File, Errno> {
        let path = self.abs(rel);
        let mut h = FileHeader::generate().map_err(|_| Errno::EIO)?;
        self.cipher()?
            .seal_header(&mut h, path_bytes(rel), None)
            .map_err(|_| Errno::EIO)?;
        let dir = path.parent().ok_or(Errno::EINVAL)?;
        let mode = rustix::fs::Mode::from_raw_mode(mode & 0o7777);
        let (uid, gid) = (
            Some(rustix::fs::Uid::from_raw(owner.0)),
            Some(rustix::fs::Gid::from_raw(owner.1)),
        );
        match rustix::fs::open(
            dir,
            rustix::fs::OFlags::TMPFILE | rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
            mode,
        ) {
            Ok(fd) => {
                let f = File::from(fd);
                put_header(&f, &h)?;
                let _ = rustix::fs::fchown(&f, uid, gid);
                rustix::fs::linkat(
                    rustix::fs::CWD,
                    format!("/proc/self/fd/{}", f.as_raw_fd()),
                    rustix::fs::CWD,
                    &path,
                    rustix::fs::AtFlags::SYMLINK_FOLLOW,
                )
                .map_err(sys_errno)?;
                Ok(f)
            }
            // A backing file system without O_TMPFILE: created, then written.
            Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::ISDIR => {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(mode.bits())
                    .open(&path)
                    .map_err(|e| errno(&e))?;
                put_header(&f, &h)?;
                let _ = rustix::fs::fchown(&f, uid, gid);
                Ok(f)
            }
            Err(e) => Err(sys_errno(e)),
        }
    }

    /// Reads and decrypts plaintext `[offset, offset + size)`, clamped to the
    /// file size, and hands it to `f`. One `pread` for the whole range; the
    /// buffers are per thread and reused, so a read allocates nothing.
    ///
    /// Under the shared lock: the size cannot change meanwhile. A block that
    /// fails authentication is read once more under the exclusive lock (a
    /// whole-block overwrite may have been half copied when it was read, as
    /// buffered I/O allows) before it is an error.
    pub(crate) fn read_range<R>(
        &self,
        h: &Handle,
        offset: u64,
        size: usize,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, Errno> {
        let mut f = Some(f);
        {
            let _shared = h.state.lock.read().unwrap_or_else(|p| p.into_inner());
            if let Some(r) = self.read_locked(h, offset, size, false, &mut f)? {
                return Ok(r);
            }
        }
        let _excl = h.state.exclusive();
        self.read_locked(h, offset, size, true, &mut f)?
            .ok_or(Errno::EIO)
    }

    /// [`Core::read_range`] with the inode's lock held. `Ok(None)`: a block
    /// failed authentication and this was not the `last_try`.
    fn read_locked<R, F: FnOnce(&[u8]) -> R>(
        &self,
        h: &Handle,
        offset: u64,
        size: usize,
        last_try: bool,
        f: &mut Option<F>,
    ) -> Result<Option<R>, Errno> {
        let file_len = h.state.size();
        if offset >= file_len || size == 0 {
            return Ok(f.take().map(|f| f(&[])));
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
                .map_err(|e| {
                    tracing::error!(file = %h.path.display(), error = %e, "cannot read the backing file (cut outside the mount?)");
                    errno(&e)
                })?;
            let plain = scratch(plain, ((last - first + 1) as usize) * PAGE_SIZE);
            let cipher = self.cipher()?;
            let mut at = 0usize;
            for b in first..=last {
                let n = block_len(file_len, b);
                let src = &stored[at..at + n + TRAILER_LEN];
                let dst = &mut plain[((b - first) as usize) * PAGE_SIZE..];
                if let Err(e) = cipher.decrypt_block(&h.file_id, b, src, dst) {
                    if !last_try {
                        return Ok(None);
                    }
                    super::IoStats::add(&self.io.auth_failures, 1);
                    tracing::error!(file = %h.path.display(), block = b, error = %e, "refusing to return a block");
                    return Err(Errno::EIO);
                }
                at += n + TRAILER_LEN;
            }
            let skip = (offset - first * PAGE_SIZE as u64) as usize;
            Ok(f.take().map(|f| f(&plain[skip..skip + (end - offset) as usize])))
        })
    }

    /// Writes plaintext `data` at `offset` (zero-filling any gap after the
    /// current end), re-encrypting every block it touches.
    pub(crate) fn write_range(&self, h: &Handle, offset: u64, data: &[u8]) -> Result<(), Errno> {
        if data.is_empty() {
            return Ok(());
        }
        self.check_wiped()?;
        let st = &*h.state;
        let end = offset + data.len() as u64;
        let _registered = st.begin(offset, end);
        if offset.is_multiple_of(PAGE_SIZE as u64) && data.len().is_multiple_of(PAGE_SIZE) {
            // Whole blocks: their ciphertext depends on nothing in the file,
            // so encrypt before taking any lock (writes run in parallel).
            // Its own buffer: `grow` below uses WRITE_BUF.
            return WHOLE_BUF.with(|cell| {
                let out = &mut *cell.borrow_mut();
                let out = scratch(out, data.len() / PAGE_SIZE * (PAGE_SIZE + TRAILER_LEN));
                let first = offset / PAGE_SIZE as u64;
                let version = self.encrypt_whole(h, offset, data, out)?;
                // Inside the current size: no size change, so shared.
                {
                    let _shared = st.lock.read().unwrap_or_else(|p| p.into_inner());
                    if end <= st.size() {
                        self.still_current(h, version, offset, data, out)?;
                        self.put_blocks(h, &h.file, first, out, u64::MAX)?;
                        drop(_shared);
                        start_writeback(&h.file, offset, out.len());
                        return Ok(());
                    }
                }
                {
                    let _excl = st.exclusive_at(offset);
                    self.still_current(h, version, offset, data, out)?;
                    let old_len = st.size();
                    // A partial old last block inside this write is covered
                    // whole by `data`, so the new blocks simply replace it.
                    if offset > old_len {
                        self.grow(h, old_len, offset)?;
                    }
                    self.put_blocks(h, &h.file, first, out, held(old_len, first))?;
                    st.set_size(old_len.max(end));
                }
                start_writeback(&h.file, offset, out.len());
                Ok(())
            });
        }
        let _excl = st.exclusive_at(offset);
        let mut old_len = st.size();
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
        let cipher = self.cipher()?;
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
        if self.cipher()?.current_version() != version {
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

    /// Decrypts block `b` of a file of `len` bytes into `out`; a failure is
    /// logged as `what` and is `EIO`.
    fn read_block(
        h: &Handle,
        cipher: &PageCipher,
        b: u64,
        len: u64,
        out: &mut [u8; PAGE_SIZE],
        what: &str,
    ) -> Result<usize, Errno> {
        let n = block_len(len, b);
        let mut stored = [0u8; PAGE_SIZE + TRAILER_LEN];
        h.file
            .read_exact_at(&mut stored[..n + TRAILER_LEN], page::block_offset(b))
            .map_err(|e| errno(&e))?;
        cipher
            .decrypt_block(&h.file_id, b, &stored[..n + TRAILER_LEN], out)
            .map_err(|e| {
                tracing::error!(file = %h.path.display(), block = b, error = %e, "{what}");
                Errno::EIO
            })
    }

    /// The general write of `data` at `offset <= old_len`: every block it
    /// touches is rebuilt from the old plaintext and `data`, and written
    /// with one `pwrite`; the size becomes `new_len`. Blocks that `data`
    /// covers whole are encrypted straight from it. Called with the inode's
    /// exclusive lock held.
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
            let total: usize = (first..=last)
                .map(|b| block_len(new_len, b) + TRAILER_LEN)
                .sum();
            let out = scratch(out, total);
            let cipher = self.cipher()?;
            let mut merged = [0u8; PAGE_SIZE];
            let mut at = 0usize;
            for b in first..=last {
                let bs = b * PAGE_SIZE as u64;
                let n = block_len(new_len, b);
                let dst = &mut out[at..at + n + TRAILER_LEN];
                at += n + TRAILER_LEN;
                if offset <= bs && end >= bs + n as u64 {
                    let from = (bs - offset) as usize;
                    cipher
                        .encrypt_block(&h.file_id, b, &data[from..from + n], dst)
                        .map_err(|_| Errno::EIO)?;
                    continue;
                }
                // A partial block: old plaintext (if any), zeros, new bytes.
                merged[..n].fill(0);
                if bs < old_len {
                    let mut old = [0u8; PAGE_SIZE];
                    let on = Self::read_block(
                        h,
                        &cipher,
                        b,
                        old_len,
                        &mut old,
                        "cannot update a damaged block",
                    )?;
                    merged[..on.min(n)].copy_from_slice(&old[..on.min(n)]);
                    old.fill(0);
                }
                let ws = offset.max(bs);
                let we = end.min(bs + n as u64);
                if ws < we {
                    merged[(ws - bs) as usize..(we - bs) as usize]
                        .copy_from_slice(&data[(ws - offset) as usize..(we - offset) as usize]);
                }
                cipher
                    .encrypt_block(&h.file_id, b, &merged[..n], dst)
                    .map_err(|_| Errno::EIO)?;
            }
            merged.fill(0);
            drop(cipher);
            // The stored length is now `stored_len(new_len)`: a grown last
            // block was rewritten at its new length, other blocks kept theirs.
            self.put_blocks(h, &h.file, first, out, held(old_len, first))?;
            h.state.set_size(new_len);
            Ok(())
        })
    }

    /// Writes the stored blocks `out` of `h`'s file (through `file`) from
    /// block `first`. The first `held` of them held data before (their
    /// overwrite must not be torn): they go through a journal slot first,
    /// in pieces of at most a slot, so a crash in the middle of the
    /// overwrite leaves a whole copy for the next mount (see
    /// [`super::journal`]). A journal that cannot be written (a full disk)
    /// fails the write before anything in place changed.
    fn put_blocks(
        &self,
        h: &Handle,
        file: &File,
        first: u64,
        out: &[u8],
        held: u64,
    ) -> Result<(), Errno> {
        let at = page::block_offset(first);
        let journaled = held.saturating_mul(BLOCK_STRIDE).min(out.len() as u64) as usize;
        if journaled > 0 {
            let slot = self.journal.slot();
            // The backing inode (the mapping swaps two numbers: its own
            // inverse).
            let ino = self.fuse_ino(h.ino);
            let piece = (super::journal::SLOT_BLOCKS * BLOCK_STRIDE) as usize;
            for from in (0..journaled).step_by(piece) {
                let p = &out[from..journaled.min(from + piece)];
                let b = first + from as u64 / BLOCK_STRIDE;
                slot.record(ino, &h.file_id, b, p).map_err(|e| {
                    tracing::error!(file = %h.path.display(), error = %e, "cannot write the overwrite journal; the write is refused");
                    errno(&e)
                })?;
                if crate::failpoint::hit("torn-overwrite", &h.path) {
                    // What a kill in the middle of the pwrite leaves.
                    let _ = file.write_all_at(&p[..p.len() / 2], at + from as u64);
                    crate::failpoint::die();
                }
                #[cfg(test)]
                if tests::TEAR.with(|t| t.replace(false)) {
                    // The unit tests' crash: half the piece, the slot left
                    // live.
                    let _ = file.write_all_at(&p[..p.len() / 2], at + from as u64);
                    return Err(Errno::EIO);
                }
                file.write_all_at(p, at + from as u64)
                    .map_err(|e| errno(&e))?;
            }
            // A slot left live would let the next mount put back this
            // version (and end the file at a partial block) after later
            // writes: a disk that cannot overwrite 8 bytes fails the write.
            slot.clear().map_err(|e| {
                tracing::error!(file = %h.path.display(), error = %e, "cannot clear an overwrite journal slot");
                errno(&e)
            })?;
        }
        file.write_all_at(&out[journaled..], at + journaled as u64)
            .map_err(|e| errno(&e))
    }

    /// Sets the plaintext length: shrinks (re-encrypting a cut block, and
    /// lowering the durable length first) or grows with zeros.
    pub(crate) fn set_len(&self, h: &Handle, len: u64) -> Result<(), Errno> {
        self.check_wiped()?;
        let st = &*h.state;
        let _excl = st.exclusive();
        let old_len = st.size();
        if len > old_len {
            return self.grow(h, old_len, len);
        }
        if len == old_len {
            return Ok(());
        }
        let rel = self.inodes.rel(h.ino).ok();
        let w = match &rel {
            Some(rel) => self.writable(h, rel)?,
            None => Writable::Handle(&h.file),
        };
        {
            let mut meta = st.meta();
            meta.shrinks += 1;
            // The header first: a crash after it leaves a longer file than
            // its durable length says, which is no damage. (A file whose name
            // is gone is never opened again: nothing to bind.)
            let durable = meta.header.map_or(0, |h| h.durable_len);
            if let Some(rel) = &rel
                && len < durable
            {
                self.bind(&w, rel, &mut meta, None, |x| x.durable_len = len)?;
                w.sync_data().map_err(|e| errno(&e))?;
            }
        }
        if !len.is_multiple_of(PAGE_SIZE as u64) {
            // Re-encrypt the new last block at its new length.
            let b = len / PAGE_SIZE as u64;
            let mut keep = [0u8; PAGE_SIZE];
            let cipher = self.cipher()?;
            Self::read_block(
                h,
                &cipher,
                b,
                old_len,
                &mut keep,
                "cannot truncate inside a damaged block",
            )?;
            let n = (len - b * PAGE_SIZE as u64) as usize;
            let mut stored = vec![0u8; n + TRAILER_LEN];
            cipher
                .encrypt_block(&h.file_id, b, &keep[..n], &mut stored)
                .map_err(|_| Errno::EIO)?;
            keep.fill(0);
            self.put_blocks(h, &w, b, &stored, 1)?;
        }
        w.set_len(page::stored_len(len)).map_err(|e| errno(&e))?;
        st.set_size(len);
        Ok(())
    }

    /// `fsync` (`datasync`: `fdatasync`) of an open file. When the file grew
    /// since its durable length was last recorded, the new length goes into
    /// its header once the data is on disk, and is synced too.
    pub(crate) fn sync(&self, h: &Handle, datasync: bool) -> Result<(), Errno> {
        self.check_wiped()?;
        let st = &*h.state;
        let (size, shrinks) = {
            let _shared = st.lock.read().unwrap_or_else(|p| p.into_inner());
            (st.size(), st.meta().shrinks)
        };
        if datasync {
            h.file.sync_data()
        } else {
            h.file.sync_all()
        }
        .map_err(|e| errno(&e))?;
        let mut meta = st.meta();
        let Some(header) = meta.header else {
            return Ok(());
        };
        if header.version != FORMAT_VERSION || size <= header.durable_len || meta.shrinks != shrinks
        {
            return Ok(());
        }
        // A file whose name is gone is never opened again: nothing to record.
        let Ok(rel) = self.inodes.rel(h.ino) else {
            return Ok(());
        };
        let w = self.writable(h, &rel)?;
        self.bind(&w, &rel, &mut meta, None, |x| x.durable_len = size)?;
        w.sync_data().map_err(|e| errno(&e))
    }

    /// Renames `from` to `to` (paths relative to the backing root) and moves
    /// the header binding of every regular file it covers (itself, or all
    /// files below a directory): a header valid at both names is written and
    /// synced, the rename is done, and the header is then bound to the new
    /// name only. Inodes the rename replaced are retired. Exchanges and
    /// whiteouts are not supported (`EINVAL`).
    pub(crate) fn rename(
        &self,
        from: &Path,
        to: &Path,
        flags: rustix::fs::RenameFlags,
    ) -> Result<(), Errno> {
        if flags.intersects(rustix::fs::RenameFlags::EXCHANGE | rustix::fs::RenameFlags::WHITEOUT) {
            return Err(Errno::EINVAL);
        }
        self.check_wiped()?;
        let _one_at_a_time = self.renames.lock().unwrap_or_else(|p| p.into_inner());
        let (afrom, ato) = (self.abs(from), self.abs(to));
        let m = std::fs::symlink_metadata(&afrom).map_err(|e| errno(&e))?;
        let subs: Vec<PathBuf> = if m.is_dir() {
            regular_files(&afrom, false).map_err(|e| errno(&e))?
        } else if m.is_file() {
            vec![PathBuf::new()]
        } else {
            Vec::new()
        };
        let join = |base: &Path, sub: &Path| {
            if sub.as_os_str().is_empty() {
                base.to_path_buf()
            } else {
                base.join(sub)
            }
        };
        // The files to rebind, loaded (checked at their old names).
        let mut files = Vec::new();
        for sub in subs {
            let rel = join(from, &sub);
            let Ok(f) = open_nofollow(&self.abs(&rel), true) else {
                continue;
            };
            let Ok(meta) = f.metadata() else { continue };
            let st = self.inodes.state(self.fuse_ino(meta.ino()));
            if let Err(e) = self.load(&st, &rel, &f) {
                // Damaged at its old name: it stays damaged at the new one.
                tracing::warn!(file = %rel.display(), error = ?e, "renaming a file that does not load");
                continue;
            }
            files.push((sub, f, st));
        }
        let mut guards: Vec<MutexGuard<'_, Meta>> =
            files.iter().map(|(_, _, st)| st.meta()).collect();
        for ((sub, f, _), meta) in files.iter().zip(guards.iter_mut()) {
            self.bind(f, &join(from, sub), meta, Some(&join(to, sub)), |_| {})?;
        }
        for (_, f, _) in &files {
            f.sync_data().map_err(|e| errno(&e))?;
        }
        // A target that is replaced loses a link (unless it is the same file).
        let replaced = self
            .last_link(to)
            .filter(|(_, t)| (t.dev(), t.ino()) != (m.dev(), m.ino()))
            .map(|(ino, _)| ino);
        let renamed =
            rustix::fs::renameat_with(rustix::fs::CWD, &afrom, rustix::fs::CWD, &ato, flags)
                .map_err(sys_errno);
        // Bound to the name the file has now (the old one if the rename
        // failed).
        let bound = if renamed.is_ok() { to } else { from };
        for ((sub, f, _), meta) in files.iter().zip(guards.iter_mut()) {
            if let Err(e) = self.bind(f, &join(bound, sub), meta, None, |_| {}) {
                // The two-name header stays: valid at either name.
                tracing::warn!(file = %join(bound, sub).display(), error = ?e, "could not finish a renamed file's header");
            }
        }
        renamed?;
        if let Some(ino) = replaced {
            self.inodes.retire(ino);
        }
        // Paths are re-pointed before the header locks go: an fsync that
        // binds a header reads the path under its lock.
        self.inodes.repoint(from, to);
        drop(guards);
        Ok(())
    }

    /// Opens the backing file `rel` for the re-key engine and loads it.
    pub fn open_for_rekey(&self, rel: &Path) -> Result<Handle, Errno> {
        let m = std::fs::symlink_metadata(self.abs(rel)).map_err(|e| errno(&e))?;
        self.open_file(rel, self.fuse_ino(m.ino()), true)
    }

    /// Open files whose last name is gone (unlinked while open): no walk of
    /// the backing directory finds them, but they are still read.
    pub fn unlinked_open_files(&self) -> Vec<Arc<Handle>> {
        self.inodes
            .open_handles()
            .into_iter()
            .filter(|h| h.file.metadata().is_ok_and(|m| m.nlink() == 0))
            .collect()
    }

    /// Re-encrypts under the cipher's current version every block in
    /// `[first, first + max)` of `h`'s file that is under another version,
    /// with the inode's exclusive lock held for the step (so no write of the
    /// kernel's can land between the read and the write back: no lost
    /// update). `buf` is scratch space.
    pub fn rekey_step(
        &self,
        h: &Handle,
        first: u64,
        max: u64,
        buf: &mut Vec<u8>,
    ) -> Result<RekeyStep, Errno> {
        let _excl = h.state.exclusive();
        let len = h.state.size();
        let nblocks = len.div_ceil(PAGE_SIZE as u64);
        if first >= nblocks {
            return Ok(RekeyStep::default());
        }
        let last = (first + max.max(1)).min(nblocks) - 1;
        let start = page::block_offset(first);
        let end = page::block_offset(last) + (block_len(len, last) + TRAILER_LEN) as u64;
        let stored = scratch(buf, (end - start) as usize);
        h.file.read_exact_at(stored, start).map_err(|e| errno(&e))?;
        let cipher = self.cipher()?;
        let target = cipher.current_version();
        let mut plain = [0u8; PAGE_SIZE];
        let (mut at, mut rewritten) = (0usize, 0u64);
        for b in first..=last {
            let n = block_len(len, b) + TRAILER_LEN;
            let block = &mut stored[at..at + n];
            if PageCipher::block_version(block) != Some(target) {
                cipher
                    .decrypt_block(&h.file_id, b, block, &mut plain)
                    .map_err(|e| {
                        tracing::error!(file = %h.path.display(), block = b, error = %e, "re-key stops at a damaged block (restore the file, then run tde rekey again)");
                        Errno::EIO
                    })?;
                // The old ciphertext is read: the new one takes its place.
                cipher
                    .encrypt_block(&h.file_id, b, &plain[..n - TRAILER_LEN], block)
                    .map_err(|_| Errno::EIO)?;
                rewritten += 1;
            }
            at += n;
        }
        plain.fill(0);
        drop(cipher);
        if rewritten > 0 {
            self.put_blocks(h, &h.file, first, stored, u64::MAX)?;
        }
        Ok(RekeyStep {
            blocks: last - first + 1,
            rewritten,
            stored_bytes: end - start,
        })
    }

    /// Seals the header of `h`'s file (at `rel`) under the current data key
    /// version if it is under another; true if it was rewritten.
    pub fn rekey_header(&self, h: &Handle, rel: &Path) -> Result<bool, Errno> {
        let current = self.cipher()?.current_version();
        let mut meta = h.state.meta();
        match meta.header {
            Some(x) if x.version == FORMAT_VERSION && x.key_version == current => Ok(false),
            Some(_) => {
                self.bind(&h.file, rel, &mut meta, None, |_| {})?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Upgrades every file of a format-1 tablespace to format-2 headers
    /// (bound to its path, durable length = its length once a torn tail is
    /// recovered), syncs them, and records format 2 in the key file. Run by
    /// the mount before it serves; an interrupted upgrade runs again.
    pub fn upgrade_headers(&self) -> anyhow::Result<u64> {
        use anyhow::Context as _;
        let mut upgraded = 0;
        for rel in regular_files(&self.backing, true).context("listing the backing directory")? {
            let mut head = [0u8; HEADER_LEN as usize];
            let format_2 = File::open(self.abs(&rel))
                .and_then(|f| f.read_exact_at(&mut head, 0))
                .is_ok_and(|()| {
                    FileHeader::decode(&head).is_ok_and(|h| h.version == FORMAT_VERSION)
                });
            if format_2 {
                continue;
            }
            let h = self
                .open_for_rekey(&rel)
                .map_err(|e| anyhow::anyhow!("{}: {e:?} (see the log)", rel.display()))?;
            let mut meta = h.state.meta();
            let size = h.state.size();
            self.bind(&h.file, &rel, &mut meta, None, |x| x.durable_len = size)
                .map_err(|e| anyhow::anyhow!("{}: {e:?}", rel.display()))?;
            upgraded += 1;
        }
        let dir = File::open(&self.backing)?;
        rustix::fs::syncfs(&dir).context("syncing the backing file system")?;
        self.keys.set_page_format_2()?;
        Ok(upgraded)
    }
}

#[cfg(test)]
mod tests;
