//! Mount throughput against the plain backing directory on the same disk:
//! `cargo bench --bench mount` (as root, with /dev/fuse). Sequential writes
//! of 8 KiB and 1 MiB (fsync included) and cold sequential reads (page cache
//! dropped). Prints a table with the ratio mount / plain.
//!
//! Beside them, the FUSE ceiling: a file system in this file that is mounted
//! like `tde mount` (same kernel options, threads and request sizes) but
//! does no work (writes are dropped, reads return zeros); and the same with
//! the mount's cryptography (AES-256-GCM-SIV per 8 KiB page, through
//! `PageCipher`) but no storage. They show how much of the gap is FUSE
//! itself, how much the cipher, and how much the rest of the mount.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tde_plugin::page::{PAGE_SIZE, PageCipher, TRAILER_LEN};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

const SIZE: usize = 256 << 20;

fn drop_caches() {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn write_file(path: &Path, chunk: usize) -> f64 {
    let buf: Vec<u8> = (0..chunk).map(|i| (i * 31 % 251) as u8).collect();
    let _ = std::fs::remove_file(path);
    let start = Instant::now();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .expect("create");
    for _ in 0..SIZE / chunk {
        f.write_all(&buf).expect("write");
    }
    f.sync_all().expect("fsync");
    SIZE as f64 / start.elapsed().as_secs_f64() / 1e6
}

fn read_file(path: &Path, chunk: usize) -> f64 {
    drop_caches();
    let mut buf = vec![0u8; chunk];
    let start = Instant::now();
    let mut f = std::fs::File::open(path).expect("open");
    let mut total = 0;
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        total += n;
    }
    assert_eq!(total, SIZE);
    SIZE as f64 / start.elapsed().as_secs_f64() / 1e6
}

/// The FUSE ceiling: one directory holding at most one file, `data`, whose
/// writes only move its size and whose reads return zeros. Negotiates what
/// `tde mount` negotiates (tde_plugin::fs::MAX_WRITE requests and
/// readahead, the writeback cache) and runs with the same thread count.
///
/// With a cipher it also does the mount's cryptography and nothing else:
/// each written page is encrypted (and dropped), each page read is
/// decrypted from a stored block made once.
#[derive(Default)]
struct NullFs {
    /// The size of `data`, `None` while it does not exist.
    size: Mutex<Option<u64>>,
    cipher: Option<(PageCipher, Vec<u8>)>,
}

/// Blocks are encrypted for this file id; any will do.
const FILE_ID: [u8; 16] = [7; 16];

const DATA: INodeNo = INodeNo(2);
const TTL: Duration = Duration::from_secs(1);

impl NullFs {
    /// A `NullFs` that encrypts and decrypts like the mount.
    fn with_cipher() -> Self {
        let mut cipher = PageCipher::new("bench").expect("cipher");
        cipher.add_key(1, &[9; 32]).expect("key");
        let mut stored = vec![0; PAGE_SIZE + TRAILER_LEN];
        cipher
            .encrypt_block(&FILE_ID, 0, &[0; PAGE_SIZE], &mut stored)
            .expect("encrypt");
        Self {
            cipher: Some((cipher, stored)),
            ..Self::default()
        }
    }

    fn size(&self) -> std::sync::MutexGuard<'_, Option<u64>> {
        self.size.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, perm, size) = if ino == INodeNo::ROOT {
            (FileType::Directory, 0o755, 0)
        } else {
            (FileType::RegularFile, 0o644, (*self.size())?)
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 8192,
            flags: 0,
        })
    }
}

impl Filesystem for NullFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(tde_plugin::fs::MAX_WRITE);
        let _ = config.set_max_readahead(tde_plugin::fs::MAX_WRITE);
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_WRITEBACK_CACHE);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &std::ffi::OsStr, reply: ReplyEntry) {
        match self.attr(DATA) {
            Some(a) if parent == INodeNo::ROOT && name == "data" => {
                reply.entry(&TTL, &a, Generation(0))
            }
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if let (Some(n), true) = (size, ino == DATA) {
            *self.size() = Some(n);
        }
        self.getattr(_req, ino, None, reply)
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &std::ffi::OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        *self.size() = Some(0);
        let a = self.attr(DATA).expect("just created");
        reply.created(
            &TTL,
            &a,
            Generation(0),
            FileHandle(0),
            FopenFlags::FOPEN_KEEP_CACHE,
        );
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        thread_local!(static ZEROS: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) });
        let len = self.size().unwrap_or(0);
        let n = len.saturating_sub(offset).min(size as u64) as usize;
        ZEROS.with_borrow_mut(|z| {
            if z.len() < n {
                z.resize(n, 0);
            }
            if let Some((cipher, stored)) = &self.cipher {
                for page in z[..n].chunks_mut(PAGE_SIZE) {
                    if page.len() == PAGE_SIZE {
                        cipher
                            .decrypt_block(&FILE_ID, 0, stored, page)
                            .expect("decrypt");
                    } else {
                        let mut plain = [0; PAGE_SIZE];
                        cipher
                            .decrypt_block(&FILE_ID, 0, stored, &mut plain)
                            .expect("decrypt");
                        page.copy_from_slice(&plain[..page.len()]);
                    }
                }
            }
            reply.data(&z[..n])
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if let Some((cipher, _)) = &self.cipher {
            thread_local!(static OUT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) });
            OUT.with_borrow_mut(|out| {
                out.resize(
                    data.len() / PAGE_SIZE * (PAGE_SIZE + TRAILER_LEN) + PAGE_SIZE + TRAILER_LEN,
                    0,
                );
                let first = offset / PAGE_SIZE as u64;
                for (i, (plain, stored)) in data
                    .chunks(PAGE_SIZE)
                    .zip(out.chunks_mut(PAGE_SIZE + TRAILER_LEN))
                    .enumerate()
                {
                    let stored = &mut stored[..plain.len() + TRAILER_LEN];
                    cipher
                        .encrypt_block(&FILE_ID, first + i as u64, plain, stored)
                        .expect("encrypt");
                }
            });
        }
        let mut size = self.size();
        *size = Some(size.unwrap_or(0).max(offset + data.len() as u64));
        reply.written(data.len() as u32);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _ds: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &std::ffi::OsStr, reply: ReplyEmpty) {
        *self.size() = None;
        reply.ok();
    }
}

/// Mounts `fs` on `at` like `tde mount` mounts (see `tde_plugin::mount`).
fn mount_null(fs: NullFs, at: &Path) -> fuser::BackgroundSession {
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName("null".into()),
        fuser::MountOption::DefaultPermissions,
    ];
    config.acl = fuser::SessionACL::All;
    config.n_threads = Some(tde_plugin::mount::DEFAULT_THREADS);
    config.clone_fd = true;
    let s = fuser::spawn_mount(fs, at, &config).expect("mount the null file system");
    let dev = std::os::unix::fs::MetadataExt::dev(&std::fs::metadata(at).expect("stat"));
    tde_plugin::mount::raise_readahead(dev);
    s
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let _ = self.0.wait();
    }
}

fn wait(p: impl Fn() -> bool) {
    let t = Instant::now();
    while !p() {
        assert!(t.elapsed() < Duration::from_secs(30), "timed out");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn main() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("run as root (mounting and dropping caches need it)");
        return;
    }
    let bin = env!("CARGO_BIN_EXE_tde");
    // On the disk of the project (not tmpfs), like a real tablespace.
    let dir = tempfile::Builder::new()
        .prefix("tde-bench-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("tmp");
    let [sc, backing, mnt, plain, null, aead]: [PathBuf; 6] =
        ["sc", "backing", "mnt", "plain", "null", "aead"].map(|d| dir.path().join(d));
    for d in [&backing, &mnt, &plain, &null, &aead] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    let quiet = |c: &mut Command| {
        c.env_remove("TDE_CONFIG")
            .env("TDE_LOG__LEVEL", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
    };
    let mut c = Command::new(bin);
    c.args(["serve", "--dev"]).env("TDE_DATA_DIR", &sc);
    quiet(&mut c);
    let _sidecar = Kill(c.spawn().expect("serve"));
    wait(|| sc.join("data.sock").exists() && sc.join("admin.sock").exists());
    let mut c = Command::new(bin);
    c.args(["key", "create", "bench"]).env("TDE_DATA_DIR", &sc);
    quiet(&mut c);
    assert!(c.status().expect("key").success());
    let mut c = Command::new(bin);
    c.args([
        "mount",
        "--init",
        "--key",
        "bench",
        "--tablespace",
        "bench",
        "--sidecar",
    ])
    .arg(sc.join("data.sock"))
    .arg(&backing)
    .arg(&mnt);
    quiet(&mut c);
    let _mount = Kill(c.spawn().expect("mount"));
    wait(|| {
        std::fs::read_to_string("/proc/self/mounts")
            .is_ok_and(|m| m.contains(&*mnt.to_string_lossy()))
    });

    let null_sessions = [
        mount_null(NullFs::default(), &null),
        mount_null(NullFs::with_cipher(), &aead),
    ];

    println!(
        "| {} MiB sequential  | plain MB/s | FUSE ceiling | + GCM-SIV, not stored | tde mount | ceiling / plain | + GCM-SIV / plain | mount / plain |",
        SIZE >> 20
    );
    println!(
        "|----------------------|-----------:|-------------:|----------------------:|----------:|----------------:|------------------:|--------------:|"
    );
    for (name, chunk, write) in [
        ("write 8 KiB + fsync", 8 << 10, true),
        ("write 1 MiB + fsync", 1 << 20, true),
        ("cold read 8 KiB", 8 << 10, false),
        ("cold read 1 MiB", 1 << 20, false),
    ] {
        let run = |d: &Path| {
            let f = d.join("data");
            if write {
                write_file(&f, chunk)
            } else {
                read_file(&f, chunk)
            }
        };
        // Best of three, alternating, to damp disk noise.
        let mut best = [0f64; 4];
        for _ in 0..3 {
            for (b, d) in best.iter_mut().zip([&plain, &null, &aead, &mnt]) {
                *b = b.max(run(d));
            }
        }
        let [p, c, a, m] = best;
        println!(
            "| {name:<20} | {p:>10.0} | {c:>12.0} | {a:>21.0} | {m:>9.0} | {:>14.2}x | {:>16.2}x | {:>12.2}x |",
            c / p,
            a / p,
            m / p
        );
    }
    let _ = std::fs::remove_file(mnt.join("data"));
    for s in null_sessions {
        let _ = s.umount_and_join();
    }
}
