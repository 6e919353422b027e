//! The FUSE glue: `fuser::Filesystem` for [`TdeFs`], translating requests
//! into the inode table and the block engine.
//!
//! Every handler runs inside a panic boundary (`guarded`): a panic is
//! logged, the request is answered with `EIO` (fuser's reply sends it when
//! dropped unanswered), and the mount keeps serving, instead of losing the
//! worker thread and, with it, the mount.

use std::ffi::OsStr;
use std::fs::{File, Metadata};
use std::io;
use std::os::unix::fs::{DirEntryExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, KernelConfig,
    LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};

use super::{Core, Handle, IoStats, MAX_WRITE, TdeFs, errno, is_reserved, sys_errno};
use crate::page::PAGE_SIZE;

/// How long the kernel may cache attributes and entries. Only this process
/// changes the backing directory, so caching is safe; it is short so that
/// out-of-band repairs are seen quickly.
const TTL: Duration = Duration::from_secs(1);

/// Runs one handler. A panic in it is caught and logged; the reply it
/// owned is dropped unanswered while unwinding, which makes fuser answer
/// `EIO`; the worker thread goes on serving.
fn guarded(op: &'static str, handler: impl FnOnce()) {
    if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(handler)) {
        let what = p
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        tracing::error!(op, panic = %what, "a FUSE handler panicked: answered EIO, the mount keeps serving");
    }
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

fn kind_of(ft: std::fs::FileType) -> FileType {
    if ft.is_dir() {
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
    }
}

impl Core {
    /// FUSE attributes of a backing entry; `size` is the plaintext size for
    /// regular files (the mount's), else the backing size.
    fn attr(&self, m: &Metadata, size: u64) -> FileAttr {
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
            kind: kind_of(m.file_type()),
            perm: (m.mode() & 0o7777) as u16,
            nlink: m.nlink() as u32,
            uid: m.uid(),
            gid: m.gid(),
            rdev: m.rdev() as u32,
            blksize: PAGE_SIZE as u32,
            flags: 0,
        }
    }

    /// Attributes of the entry at `rel`, remembering its inode's path. A
    /// regular file is loaded (checked) first: a damaged one is `EIO`.
    fn stat_rel(&self, rel: &Path) -> Result<FileAttr, Errno> {
        let m = std::fs::symlink_metadata(self.abs(rel)).map_err(|e| errno(&e))?;
        let ino = self.fuse_ino(m.ino());
        self.inodes.remember(ino, rel);
        let size = if m.is_file() {
            self.size_of(rel, ino)?
        } else {
            m.len()
        };
        Ok(self.attr(&m, size))
    }

    fn fstat(&self, h: &Handle) -> Result<FileAttr, Errno> {
        let m = h.file.metadata().map_err(|e| errno(&e))?;
        Ok(self.attr(&m, h.state.size()))
    }

    /// The open file a request on `ino` should go through: the handle the
    /// kernel named, or, when the inode's path is gone (unlinked while
    /// open), any open handle of it. `None`: use the path.
    fn open_file_of(&self, ino: u64, fh: Option<FileHandle>) -> Option<std::sync::Arc<Handle>> {
        if let Some(h) = fh.and_then(|f| self.inodes.handle(f.0).ok()) {
            return Some(h);
        }
        let gone = self.inodes.rel(ino).map_or(true, |rel| {
            std::fs::symlink_metadata(self.abs(&rel))
                .map_or(true, |m| self.fuse_ino(m.ino()) != ino)
        });
        if gone {
            self.inodes.open_handle_of(ino)
        } else {
            None
        }
    }

    /// Answers a lookup, create, mknod, mkdir, symlink or link.
    fn reply_entry(&self, reply: ReplyEntry, r: Result<FileAttr, Errno>) {
        match r {
            Ok(a) => reply.entry(&TTL, &a, self.inodes.generation(a.ino.0)),
            Err(e) => reply.error(e),
        }
    }

    /// Removes `name` from `parent` with `op` (unlink or rmdir), retiring
    /// the inode number if that was its last link.
    fn remove(
        &self,
        parent: INodeNo,
        name: &OsStr,
        op: fn(std::path::PathBuf) -> io::Result<()>,
    ) -> Result<(), Errno> {
        let rel = self.child(parent.0, name)?;
        let last = self.last_link(&rel);
        op(self.abs(&rel)).map_err(|e| errno(&e))?;
        if let Some((ino, _)) = last {
            self.inodes.retire(ino);
        }
        Ok(())
    }

    fn setattr_inner(
        &self,
        ino: INodeNo,
        mode: Option<u32>,
        owner: (Option<u32>, Option<u32>),
        size: Option<u64>,
        times: Option<rustix::fs::Timestamps>,
        fh: Option<FileHandle>,
    ) -> Result<FileAttr, Errno> {
        let (uid, gid) = owner;
        // An open file is changed through its descriptor: it may have been
        // unlinked (PostgreSQL truncates, then unlinks, relation files that
        // other processes still hold open), and the kernel sends the handle
        // exactly then. Otherwise by path.
        if let Some(h) = self.open_file_of(ino.0, fh) {
            if let Some(m) = mode {
                rustix::fs::fchmod(&h.file, rustix::fs::Mode::from_raw_mode(m & 0o7777))
                    .map_err(sys_errno)?;
            }
            if uid.is_some() || gid.is_some() {
                rustix::fs::fchown(
                    &h.file,
                    uid.map(rustix::fs::Uid::from_raw),
                    gid.map(rustix::fs::Gid::from_raw),
                )
                .map_err(sys_errno)?;
            }
            if let Some(len) = size {
                self.set_len(&h, len)?;
            }
            if let Some(ts) = times {
                rustix::fs::futimens(&h.file, &ts).map_err(sys_errno)?;
            }
            return self.fstat(&h);
        }
        let rel = self.inodes.rel(ino.0)?;
        let path = self.abs(&rel);
        if let Some(m) = mode {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(m & 0o7777))
                .map_err(|e| errno(&e))?;
        }
        if uid.is_some() || gid.is_some() {
            std::os::unix::fs::lchown(&path, uid, gid).map_err(|e| errno(&e))?;
        }
        if let Some(len) = size {
            let h = self.open_file(&rel, ino.0, true)?;
            self.set_len(&h, len)?;
        }
        if let Some(ts) = times {
            rustix::fs::utimensat(
                rustix::fs::CWD,
                &path,
                &ts,
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(sys_errno)?;
        }
        self.stat_rel(&rel)
    }

    fn create_inner(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        flags: i32,
    ) -> Result<(FileAttr, u64), Errno> {
        let rel = self.child(parent.0, name)?;
        let excl = flags & rustix::fs::OFlags::EXCL.bits() as i32 != 0;
        let exists = std::fs::symlink_metadata(self.abs(&rel)).is_ok();
        let created = if excl || !exists {
            match self.create_file(&rel, mode, (req.uid(), req.gid())) {
                Ok(f) => Some(f),
                Err(e) if e == Errno::EEXIST && !excl => None,
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        let h = match created {
            Some(f) => self.adopt_created(f, &rel)?,
            None => {
                let m = std::fs::symlink_metadata(self.abs(&rel)).map_err(|e| errno(&e))?;
                self.open_file(&rel, self.fuse_ino(m.ino()), true)?
            }
        };
        let attr = self.fstat(&h)?;
        Ok((attr, self.inodes.register(h)))
    }

    /// A handle on a file [`Core::create_file`] just made at `rel`, without
    /// opening it again.
    fn adopt_created(&self, f: File, rel: &Path) -> Result<Handle, Errno> {
        let ino = self.fuse_ino(f.metadata().map_err(|e| errno(&e))?.ino());
        self.adopt(f, rel, ino, true)
    }
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
        guarded("lookup", || {
            self.reply_entry(
                reply,
                self.child(parent.0, name)
                    .and_then(|rel| self.stat_rel(&rel)),
            )
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        guarded("getattr", || {
            // By path, as usual; through an open file when the kernel names
            // one or the path is gone (an unlinked file that is still open).
            let r = match fh.and_then(|f| self.inodes.handle(f.0).ok()) {
                Some(h) => self.fstat(&h),
                None => self
                    .inodes
                    .rel(ino.0)
                    .and_then(|rel| self.stat_rel(&rel))
                    .or_else(|e| {
                        self.inodes
                            .open_handle_of(ino.0)
                            .map_or(Err(e), |h| self.fstat(&h))
                    }),
            };
            match r {
                Ok(a) => reply.attr(&TTL, &a),
                Err(e) => reply.error(e),
            }
        });
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
        guarded("setattr", || {
            let r = self.setattr_inner(ino, mode, (uid, gid), size, timestamps(atime, mtime), fh);
            match r {
                Ok(a) => reply.attr(&TTL, &a),
                Err(e) => {
                    tracing::debug!(ino = ino.0, error = ?e, "setattr failed");
                    reply.error(e)
                }
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        guarded("readlink", || {
            match self
                .inodes
                .rel(ino.0)
                .and_then(|rel| std::fs::read_link(self.abs(&rel)).map_err(|e| errno(&e)))
            {
                Ok(t) => reply.data(t.as_os_str().as_encoded_bytes()),
                Err(e) => reply.error(e),
            }
        });
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
        guarded("mknod", || {
            if mode & 0o170000 != 0o100000 {
                // Only regular files: PostgreSQL needs nothing else.
                reply.error(Errno::EPERM);
                return;
            }
            let r = self.child(parent.0, name).and_then(|rel| {
                let f = self.create_file(&rel, mode & !umask, (req.uid(), req.gid()))?;
                self.fstat(&self.adopt_created(f, &rel)?)
            });
            self.reply_entry(reply, r);
        });
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
        guarded("mkdir", || {
            let r = self.child(parent.0, name).and_then(|rel| {
                let path = self.abs(&rel);
                std::fs::create_dir(&path).map_err(|e| errno(&e))?;
                std::fs::set_permissions(
                    &path,
                    std::fs::Permissions::from_mode(mode & !umask & 0o7777),
                )
                .map_err(|e| errno(&e))?;
                let _ = std::os::unix::fs::lchown(&path, Some(req.uid()), Some(req.gid()));
                self.stat_rel(&rel)
            });
            self.reply_entry(reply, r);
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guarded("unlink", || {
            match self.remove(parent, name, std::fs::remove_file) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guarded("rmdir", || {
            match self.remove(parent, name, std::fs::remove_dir) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        guarded("symlink", || {
            let r = self.child(parent.0, link_name).and_then(|rel| {
                let path = self.abs(&rel);
                std::os::unix::fs::symlink(target, &path).map_err(|e| errno(&e))?;
                let _ = std::os::unix::fs::lchown(&path, Some(req.uid()), Some(req.gid()));
                self.stat_rel(&rel)
            });
            self.reply_entry(reply, r);
        });
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
        guarded("rename", || {
            let r = (|| {
                let from = self.child(parent.0, name)?;
                let to = self.child(newparent.0, newname)?;
                let flags =
                    rustix::fs::RenameFlags::from_bits(flags.bits()).ok_or(Errno::EINVAL)?;
                Core::rename(self, &from, &to, flags)
            })();
            match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        guarded("link", || {
            // Each file's header binds it to one name (see FORMAT.md).
            tracing::debug!(name = ?newname, "refused a hard link");
            reply.error(Errno::EPERM);
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        guarded("open", || {
            let write = !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY);
            match self
                .inodes
                .rel(ino.0)
                .and_then(|rel| self.open_file(&rel, ino.0, write))
            {
                Ok(h) => reply.opened(
                    FileHandle(self.inodes.register(h)),
                    FopenFlags::FOPEN_KEEP_CACHE,
                ),
                Err(e) => reply.error(e),
            }
        });
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
        guarded("read", || {
            let mut reply = Some(reply);
            let r = self.inodes.handle(fh.0).and_then(|h| {
                crate::failpoint::panic_if("fuse-read", &h.path);
                self.read_range(&h, offset, size as usize, |data| {
                    IoStats::add(&self.io.read_bytes, data.len() as u64);
                    if let Some(r) = reply.take() {
                        r.data(data);
                    }
                })
            });
            if let (Err(e), Some(r)) = (r, reply.take()) {
                IoStats::add(&self.io.read_errors, 1);
                r.error(e);
            }
        });
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
        guarded("write", || {
            match self
                .inodes
                .handle(fh.0)
                .and_then(|h| self.write_range(&h, offset, data))
            {
                Ok(()) => {
                    IoStats::add(&self.io.written_bytes, data.len() as u64);
                    reply.written(data.len() as u32)
                }
                Err(e) => {
                    IoStats::add(&self.io.write_errors, 1);
                    tracing::warn!(ino = ino.0, fh = fh.0, offset, len = data.len(), error = ?e, "write failed");
                    reply.error(e)
                }
            }
        });
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
        guarded("release", || {
            self.inodes.release(fh.0);
            reply.ok();
        });
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        guarded("fsync", || {
            match self
                .inodes
                .handle(fh.0)
                .and_then(|h| self.sync(&h, datasync))
            {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        guarded("readdir", || {
            let result = (|| -> Result<(), Errno> {
                let rel = self.inodes.rel(ino.0)?;
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
                    entries.push((self.fuse_ino(e.ino()), kind_of(ft), name));
                }
                for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize)
                {
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
        });
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        guarded("fsyncdir", || {
            match self.inodes.rel(ino.0).and_then(|rel| {
                File::open(self.abs(&rel))
                    .and_then(|d| d.sync_all())
                    .map_err(|e| errno(&e))
            }) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        guarded("statfs", || match rustix::fs::statvfs(self.backing()) {
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
            Err(e) => reply.error(sys_errno(e)),
        });
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
        guarded("create", || {
            match self.create_inner(req, parent, name, mode & !umask, flags) {
                Ok((a, fh)) => reply.created(
                    &TTL,
                    &a,
                    self.inodes.generation(a.ino.0),
                    FileHandle(fh),
                    FopenFlags::FOPEN_KEEP_CACHE,
                ),
                Err(e) => reply.error(e),
            }
        });
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
        guarded("fallocate", || {
            if mode != 0 {
                reply.error(Errno::EOPNOTSUPP);
                return;
            }
            let r = self.inodes.handle(fh.0).and_then(|h| {
                let want = offset + length;
                if want > h.state.size() {
                    self.set_len(&h, want)
                } else {
                    Ok(())
                }
            });
            match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }
}
