//! The block engine on a plain directory (no FUSE): loading, the durable
//! length, torn tails, path binding, renames, the upgrade of old headers.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;

use fuser::Errno;

use super::Handle;
use crate::fs::TdeFs;
use crate::keys::Keys;
use crate::page::{self, BLOCK_STRIDE, FORMAT_V1, FileHeader, PAGE_SIZE, PageCipher};

const B: usize = PAGE_SIZE;

fn cipher() -> PageCipher {
    let mut c = PageCipher::new("ts").expect("cipher");
    c.add_key(1, &[1u8; 32]).expect("key");
    c
}

/// A fresh mount's view of `dir` (nothing loaded yet), as after a restart.
fn engine(dir: &Path) -> TdeFs {
    TdeFs::new(dir, Arc::new(Keys::in_memory(dir, cipher(), 2))).expect("fs")
}

fn ino(fs: &TdeFs, rel: &str) -> u64 {
    fs.inode_of(&std::fs::metadata(fs.backing().join(rel)).expect("meta"))
}

fn create(fs: &TdeFs, rel: &str) -> Handle {
    let me = (
        rustix::process::getuid().as_raw(),
        rustix::process::getgid().as_raw(),
    );
    let f = fs.create_file(Path::new(rel), 0o600, me).expect("create");
    let ino = fs.inode_of(&f.metadata().expect("meta"));
    fs.adopt(f, Path::new(rel), ino, true).expect("adopt")
}

fn open(fs: &TdeFs, rel: &str) -> Result<Handle, Errno> {
    fs.open_file(Path::new(rel), ino(fs, rel), true)
}

/// Block `i` of the test pattern.
fn block(i: u64) -> Vec<u8> {
    (0..B).map(|j| (i as usize * 31 + j / 512) as u8).collect()
}

fn append_blocks(fs: &TdeFs, h: &Handle, from: u64, n: u64) {
    let data: Vec<u8> = (from..from + n).flat_map(block).collect();
    fs.write_range(h, from * B as u64, &data).expect("write");
}

fn read_all(fs: &TdeFs, h: &Handle) -> Result<Vec<u8>, Errno> {
    fs.read_range(h, 0, h.state.size() as usize, <[u8]>::to_vec)
}

fn backing_len(fs: &TdeFs, rel: &str) -> u64 {
    std::fs::metadata(fs.backing().join(rel))
        .expect("meta")
        .len()
}

fn cut(fs: &TdeFs, rel: &str, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(fs.backing().join(rel))
        .expect("open")
        .set_len(len)
        .expect("cut");
}

#[test]
fn new_files_have_a_bound_header_and_never_exist_empty() {
    let d = tempfile::tempdir().expect("tmp");
    let fs = engine(d.path());
    let h = create(&fs, "a");
    assert_eq!(backing_len(&fs, "a"), page::HEADER_LEN);
    assert_eq!(h.state.size(), 0);
    assert_eq!(
        fs.create_file(Path::new("a"), 0o600, (0, 0)).err(),
        Some(Errno::EEXIST)
    );
    // An empty backing file is damage in a format-2 tablespace.
    std::fs::write(d.path().join("empty"), b"").expect("write");
    assert_eq!(open(&engine(d.path()), "empty").err(), Some(Errno::EIO));
    std::fs::write(d.path().join("short"), [0u8; 10]).expect("write");
    assert_eq!(open(&engine(d.path()), "short").err(), Some(Errno::EIO));
}

#[test]
fn fsync_records_the_durable_length_and_a_cut_below_it_is_refused() {
    let d = tempfile::tempdir().expect("tmp");
    let fs = engine(d.path());
    let h = create(&fs, "t");
    append_blocks(&fs, &h, 0, 5);
    assert_eq!(h.state.header().map(|x| x.durable_len), Some(0));
    fs.sync(&h, true).expect("fsync");
    assert_eq!(h.state.header().map(|x| x.durable_len), Some(5 * B as u64));
    // A read-only handle's fsync records it too.
    append_blocks(&fs, &h, 5, 1);
    let ro = fs
        .open_file(Path::new("t"), ino(&fs, "t"), false)
        .expect("ro");
    fs.sync(&ro, false).expect("fsync ro");
    assert_eq!(
        engine(d.path()).size_of(Path::new("t"), ino(&fs, "t")),
        Ok(6 * B as u64)
    );
    drop((h, ro));

    // Cut at a block boundary, one and two blocks below: refused.
    let full = backing_len(&fs, "t");
    for n in [1, 2, 6] {
        cut(&fs, "t", full - n * BLOCK_STRIDE);
        assert_eq!(
            open(&engine(d.path()), "t").err(),
            Some(Errno::EIO),
            "cut {n}"
        );
        assert_eq!(
            engine(d.path()).size_of(Path::new("t"), ino(&fs, "t")),
            Err(Errno::EIO),
            "getattr sees it too"
        );
    }
}

#[test]
fn a_torn_tail_beyond_the_durable_length_is_cut_back_and_appendable() {
    let d = tempfile::tempdir().expect("tmp");
    let fs = engine(d.path());
    let h = create(&fs, "wal");
    append_blocks(&fs, &h, 0, 4);
    fs.sync(&h, true).expect("fsync");
    append_blocks(&fs, &h, 4, 3);
    drop(h);
    let whole = backing_len(&fs, "wal");
    // Tails a crash mid-append leaves: a partial trailer (1..=32 bytes past
    // a block), part of a block, a block whose bytes are not all there.
    for (tail, want_blocks) in [
        (whole - BLOCK_STRIDE + 1, 6),
        (whole - BLOCK_STRIDE + 32, 6),
        (whole - BLOCK_STRIDE + 672, 6),
        (whole - 2 * BLOCK_STRIDE + 4864, 5),
        (whole - 3 * BLOCK_STRIDE + 100, 4),
    ] {
        cut(&fs, "wal", tail);
        let fresh = engine(d.path());
        let h = open(&fresh, "wal").expect("a torn tail is recovered");
        assert_eq!(h.state.size(), want_blocks * B as u64, "tail {tail}");
        assert_eq!(
            backing_len(&fresh, "wal"),
            page::stored_len(want_blocks * B as u64)
        );
        let all = read_all(&fresh, &h).expect("reads up to the last block");
        let want: Vec<u8> = (0..want_blocks).flat_map(block).collect();
        assert!(all == want, "content after recovery");
        // Appendable again.
        append_blocks(&fresh, &h, want_blocks, 7 - want_blocks);
        assert_eq!(read_all(&fresh, &h).map(|v| v.len()), Ok(7 * B));
        assert_eq!(
            h.state.header().map(|x| x.durable_len),
            Some(4 * B as u64),
            "the durable length is the fsynced one"
        );
    }
    // A block torn in the middle of the unsynced part (an overwrite cut
    // short): the file is cut there, not below the durable length.
    let flip = |at: u64| {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(d.path().join("wal"))
            .expect("open");
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).expect("read");
        f.write_all_at(&[b[0] ^ 0x40], at).expect("flip");
    };
    flip(page::block_offset(5) + 4000);
    let fresh = engine(d.path());
    let h = open(&fresh, "wal").expect("loads");
    assert_eq!(h.state.size(), 5 * B as u64, "cut at the torn block 5");
    append_blocks(&fresh, &h, 5, 2);
    drop(h);
    // A damaged last block beyond the durable length is a torn tail too; a
    // damaged block below it is not touched and reads as an error.
    let fresh = engine(d.path());
    let h = open(&fresh, "wal").expect("open");
    fresh.sync(&h, true).expect("fsync: all 7 durable");
    drop(h);
    flip(page::block_offset(6) + 10);
    let fresh = engine(d.path());
    let h = open(&fresh, "wal").expect("loads");
    assert_eq!(h.state.size(), 7 * B as u64, "durable: not cut");
    assert_eq!(
        fresh.read_range(&h, 6 * B as u64, B, |d| d.len()),
        Err(Errno::EIO)
    );
    assert_eq!(fresh.read_range(&h, 0, B, |d| d.len()), Ok(B));
}

#[test]
fn files_are_bound_to_their_paths() {
    let d = tempfile::tempdir().expect("tmp");
    let fs = engine(d.path());
    std::fs::create_dir_all(d.path().join("db")).expect("mkdir");
    for (name, first) in [("db/1", 0), ("db/2", 100)] {
        let h = create(&fs, name);
        append_blocks(&fs, &h, first, 2);
        fs.sync(&h, true).expect("fsync");
    }
    let (a, b) = (d.path().join("db/1"), d.path().join("db/2"));
    let original = std::fs::read(&a).expect("read");
    // Swapped by name: both refused.
    std::fs::rename(&a, d.path().join("x")).expect("mv");
    std::fs::rename(&b, &a).expect("mv");
    std::fs::rename(d.path().join("x"), &b).expect("mv");
    let fresh = engine(d.path());
    assert_eq!(open(&fresh, "db/1").err(), Some(Errno::EIO));
    assert_eq!(open(&fresh, "db/2").err(), Some(Errno::EIO));
    // One copied over the other: the copy is refused, the original loads.
    std::fs::write(&a, &original).expect("restore");
    std::fs::write(&b, &original).expect("copy over");
    let fresh = engine(d.path());
    assert!(open(&fresh, "db/1").is_ok());
    assert_eq!(open(&fresh, "db/2").err(), Some(Errno::EIO));
    // A format-1 header put in front of a format-2 file is refused.
    let h = FileHeader::decode(&original).expect("header");
    let v1 = FileHeader {
        version: FORMAT_V1,
        ..h
    };
    let mut downgraded = original.clone();
    downgraded[..64].copy_from_slice(&v1.encode());
    std::fs::write(&a, &downgraded).expect("downgrade");
    assert_eq!(open(&engine(d.path()), "db/1").err(), Some(Errno::EIO));
}

#[test]
fn renames_move_the_binding_and_survive_a_crash_at_any_step() {
    let d = tempfile::tempdir().expect("tmp");
    let fs = engine(d.path());
    std::fs::create_dir_all(d.path().join("dir/sub")).expect("mkdir");
    for name in ["tmp", "dir/x", "dir/sub/y"] {
        let h = create(&fs, name);
        append_blocks(&fs, &h, 0, 1);
        fs.sync(&h, true).expect("fsync");
    }
    let flags = rustix::fs::RenameFlags::empty();
    fs.rename(Path::new("tmp"), Path::new("seg"), flags)
        .expect("rename");
    fs.rename(Path::new("dir"), Path::new("moved"), flags)
        .expect("rename dir");
    let fresh = engine(d.path());
    for name in ["seg", "moved/x", "moved/sub/y"] {
        let h = open(&fresh, name).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_eq!(read_all(&fresh, &h).expect("read"), block(0), "{name}");
        assert!(!h.state.header().expect("header").renaming);
    }
    // Exchanges are not supported.
    assert_eq!(
        fs.rename(
            Path::new("seg"),
            Path::new("moved/x"),
            rustix::fs::RenameFlags::EXCHANGE
        ),
        Err(Errno::EINVAL)
    );

    // A crash after the two-name header, before the rename (file at its
    // old name), and after the rename, before the one-name header (file at
    // its new name): both load, and the header is bound to where it is.
    for renamed in [false, true] {
        let fs = engine(d.path());
        let h = open(&fs, "seg").expect("open");
        {
            let mut meta = h.state.meta();
            fs.bind(
                &h.file,
                Path::new("seg"),
                &mut meta,
                Some(Path::new("seg2")),
                |_| {},
            )
            .expect("two-name header");
        }
        drop(h);
        let at = if renamed {
            std::fs::rename(d.path().join("seg"), d.path().join("seg2")).expect("mv");
            "seg2"
        } else {
            "seg"
        };
        let fresh = engine(d.path());
        let h = open(&fresh, at).expect("loads where it is");
        assert_eq!(read_all(&fresh, &h).expect("read"), block(0));
        assert!(!h.state.header().expect("header").renaming, "finished");
        if renamed {
            std::fs::rename(d.path().join("seg2"), d.path().join("seg")).expect("mv back");
            assert_eq!(
                open(&engine(d.path()), "seg").err(),
                Some(Errno::EIO),
                "once finished, only the new name is valid"
            );
            std::fs::rename(d.path().join("seg"), d.path().join("seg2")).expect("mv");
            fs.rename(Path::new("seg2"), Path::new("seg"), flags)
                .expect("rename back through the engine");
        }
    }
}

#[test]
fn a_shrink_lowers_the_durable_length_first() {
    let d = tempfile::tempdir().expect("tmp");
    let fs = engine(d.path());
    let h = create(&fs, "rel");
    append_blocks(&fs, &h, 0, 4);
    fs.sync(&h, true).expect("fsync");
    fs.set_len(&h, B as u64 + 100).expect("truncate");
    assert_eq!(
        h.state.header().map(|x| x.durable_len),
        Some(B as u64 + 100)
    );
    let fresh = engine(d.path());
    let h = open(&fresh, "rel").expect("no false alarm after a truncation");
    assert_eq!(h.state.size(), B as u64 + 100);
    let all = read_all(&fresh, &h).expect("read");
    assert_eq!(&all[..B], &block(0)[..]);
    assert_eq!(&all[B..], &block(1)[..100]);
    fresh.set_len(&h, 0).expect("to zero");
    assert!(open(&engine(d.path()), "rel").is_ok());
}

#[test]
fn readers_never_see_a_half_appended_file() {
    let d = tempfile::tempdir().expect("tmp");
    let fs = engine(d.path());
    let h = Arc::new(create(&fs, "grow"));
    append_blocks(&fs, &h, 0, 1);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (fs, stop) = (fs.clone(), stop.clone());
        let r = open(&fs, "grow").expect("open");
        std::thread::spawn(move || {
            let (mut reads, mut errors) = (0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match fs.read_range(&r, 0, B, |d| d == block(0)) {
                    Ok(true) => {}
                    _ => errors += 1,
                }
                reads += 1;
            }
            (reads, errors)
        })
    };
    for i in 0..40 {
        append_blocks(&fs, &h, 1 + i * 128, 128);
        fs.sync(&h, true).expect("fsync");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (reads, errors) = reader.join().expect("reader");
    assert!(reads > 100, "{reads} reads");
    assert_eq!(errors, 0, "{errors} of {reads} reads failed");
}

#[test]
fn wiped_keys_fail_every_read_and_write() {
    let d = tempfile::tempdir().expect("tmp");
    let fs = engine(d.path());
    let h = create(&fs, "a");
    append_blocks(&fs, &h, 0, 2);
    fs.wipe_keys();
    assert_eq!(fs.read_range(&h, 0, B, |d| d.len()), Err(Errno::EIO));
    assert_eq!(fs.write_range(&h, 0, &block(3)), Err(Errno::EIO));
    assert_eq!(fs.sync(&h, true), Err(Errno::EIO));
    assert!(fs.keys().cipher().versions().is_empty());
}

#[test]
fn format_1_files_are_upgraded_once_and_then_refused() {
    let d = tempfile::tempdir().expect("tmp");
    crate::keyfile::KeyFile {
        format: crate::keyfile::FORMAT_1.into(),
        ..crate::keyfile::KeyFile::new("m", "ts", "c", 1, b"wrapped")
    }
    .store(d.path())
    .expect("key file");
    // Two format-1 files (one with a torn tail), and an empty one.
    std::fs::create_dir_all(d.path().join("PG_15")).expect("mkdir");
    let c = cipher();
    for (name, blocks, tail) in [("PG_15/a", 3u64, 0u64), ("PG_15/b", 2, 700)] {
        let h = FileHeader {
            version: FORMAT_V1,
            ..FileHeader::generate().expect("header")
        };
        let mut bytes = h.encode().to_vec();
        for b in 0..blocks {
            let mut stored = vec![0u8; B + page::TRAILER_LEN];
            c.encrypt_block(&h.file_id, b, &block(b), &mut stored)
                .expect("encrypt");
            bytes.extend_from_slice(&stored);
        }
        bytes.extend(std::iter::repeat_n(7u8, tail as usize));
        std::fs::write(d.path().join(name), bytes).expect("write");
    }
    std::fs::write(d.path().join("PG_15/empty"), b"").expect("write");
    let keys = Arc::new(Keys::in_memory(d.path(), cipher(), 1));
    let fs = TdeFs::new(d.path(), keys.clone()).expect("fs");
    assert_eq!(fs.upgrade_headers().expect("upgrade"), 3);
    assert_eq!(keys.page_format(), 2);
    assert_eq!(
        crate::keyfile::KeyFile::load(d.path())
            .expect("load")
            .page_format(),
        2
    );
    let fresh = engine(d.path());
    for (name, blocks) in [("PG_15/a", 3u64), ("PG_15/b", 2), ("PG_15/empty", 0)] {
        let h = open(&fresh, name).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        let header = h.state.header().expect("header");
        assert_eq!(header.version, 2);
        assert_eq!(header.durable_len, blocks * B as u64, "{name}");
        let want: Vec<u8> = (0..blocks).flat_map(block).collect();
        assert!(read_all(&fresh, &h).expect("read") == want, "{name}");
    }
    // Moved to another path after the upgrade: refused.
    std::fs::rename(d.path().join("PG_15/a"), d.path().join("PG_15/c")).expect("mv");
    assert_eq!(open(&engine(d.path()), "PG_15/c").err(), Some(Errno::EIO));
    let _ = std::fs::metadata(d.path()).map(|m| m.ino());
}

thread_local! {
    /// Set by a test: the next journaled overwrite on this thread stops
    /// half-way, as a kill of the mount in the middle of its `pwrite`.
    pub(super) static TEAR: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn journal_len(d: &Path) -> u64 {
    std::fs::metadata(d.join(super::super::journal::JOURNAL))
        .expect("journal")
        .len()
}

/// A file of `blocks` whole blocks and `extra` bytes, fsynced, and its
/// content.
fn durable_file(fs: &TdeFs, rel: &str, blocks: u64, extra: usize) -> (Handle, Vec<u8>) {
    let h = create(fs, rel);
    let mut want: Vec<u8> = (0..blocks).flat_map(block).collect();
    want.extend((0..extra).map(|i| (i % 251) as u8));
    fs.write_range(&h, 0, &want).expect("write");
    fs.sync(&h, true).expect("fsync");
    (h, want)
}

#[test]
fn an_overwrite_torn_by_a_crash_is_put_back_from_the_journal() {
    let d = tempfile::tempdir().expect("tmp");
    let fs = engine(d.path());
    let (h, mut want) = durable_file(&fs, "rel", 3, 0);
    let new = vec![0xA5u8; B];
    TEAR.with(|t| t.set(true));
    assert_eq!(fs.write_range(&h, B as u64, &new), Err(Errno::EIO));
    // Torn in place: the block no longer authenticates.
    assert_eq!(fs.read_range(&h, B as u64, B, |d| d.len()), Err(Errno::EIO));
    drop((h, fs));
    // Without the journal the fsynced block would be lost.
    let copy = tempfile::tempdir().expect("tmp");
    for f in ["rel", super::super::journal::JOURNAL] {
        std::fs::copy(d.path().join(f), copy.path().join(f)).expect("copy");
    }
    std::fs::remove_file(copy.path().join(super::super::journal::JOURNAL)).expect("rm");
    let bare = engine(copy.path());
    let hb = open(&bare, "rel").expect("open");
    assert_eq!(read_all(&bare, &hb), Err(Errno::EIO));
    // The next mount puts the block back (the write in flight: new data)
    // and empties the journal.
    assert!(journal_len(d.path()) > 0);
    let fs = engine(d.path());
    assert_eq!(journal_len(d.path()), 0);
    let h = open(&fs, "rel").expect("open");
    want[B..2 * B].copy_from_slice(&new);
    assert!(read_all(&fs, &h).expect("reads") == want);
    // A finished overwrite leaves no live slot behind.
    fs.write_range(&h, 0, &new).expect("overwrite");
    drop((h, fs));
    let fs = engine(d.path());
    want[..B].copy_from_slice(&new);
    let h = open(&fs, "rel").expect("open");
    assert!(read_all(&fs, &h).expect("reads") == want);
}

#[test]
fn an_append_torn_in_the_partial_last_block_keeps_the_fsynced_bytes() {
    // What CI hit: the fsynced length ends inside a block; the next append
    // rewrites that block, and the mount is killed during the rewrite.
    let d = tempfile::tempdir().expect("tmp");
    let fs = engine(d.path());
    let (h, want) = durable_file(&fs, "log", 2, 3000);
    let more = vec![7u8; 3 * B];
    TEAR.with(|t| t.set(true));
    assert_eq!(
        fs.write_range(&h, want.len() as u64, &more),
        Err(Errno::EIO)
    );
    drop((h, fs));
    let fs = engine(d.path());
    let h = open(&fs, "log").expect("loads");
    let all = read_all(&fs, &h).expect("reads whole");
    assert!(all.len() >= want.len(), "{} < {}", all.len(), want.len());
    assert!(all[..want.len()] == want[..], "fsynced bytes kept");
    assert!(all[want.len()..].iter().all(|b| *b == 7), "then the append");
    // And it takes appends again.
    fs.write_range(&h, all.len() as u64, b"tail")
        .expect("append");
    assert_eq!(read_all(&fs, &h).map(|v| v.len()), Ok(all.len() + 4));
}

#[test]
fn a_truncation_torn_in_its_last_block_ends_the_file_there() {
    let d = tempfile::tempdir().expect("tmp");
    let fs = engine(d.path());
    let (h, want) = durable_file(&fs, "t", 4, 0);
    let len = 2 * B as u64 + 500;
    TEAR.with(|t| t.set(true));
    assert_eq!(fs.set_len(&h, len), Err(Errno::EIO));
    drop((h, fs));
    let fs = engine(d.path());
    let h = open(&fs, "t").expect("loads");
    assert!(read_all(&fs, &h).expect("reads") == want[..len as usize]);
}

#[test]
fn the_journal_puts_back_nothing_that_is_not_torn_or_not_authentic() {
    let d = tempfile::tempdir().expect("tmp");
    let fs = engine(d.path());
    let (a, want_a) = durable_file(&fs, "a", 2, 0);
    let (b, want_b) = durable_file(&fs, "b", 2, 0);
    // A live slot for `a` (torn) ...
    TEAR.with(|t| t.set(true));
    assert_eq!(fs.write_range(&a, 0, &[1u8; B]), Err(Errno::EIO));
    drop((a, b, fs));
    let journal = d.path().join(super::super::journal::JOURNAL);
    let slot = std::fs::read(&journal).expect("journal");
    // ... copied as a slot naming `b` (another file id, and inode): its
    // blocks do not authenticate there, and `b` is not touched.
    let ino_b = std::fs::metadata(d.path().join("b")).expect("b").ino();
    let mut forged = slot.clone();
    forged[16..24].copy_from_slice(&ino_b.to_be_bytes());
    let b_before = std::fs::read(d.path().join("b")).expect("b");
    let stride = 64 + 32 * BLOCK_STRIDE as usize;
    let mut two = vec![0u8; stride];
    two[..slot.len()].copy_from_slice(&slot);
    two.extend_from_slice(&forged);
    std::fs::write(&journal, &two).expect("write journal");
    let fs = engine(d.path());
    assert_eq!(std::fs::read(d.path().join("b")).expect("b"), b_before);
    let a = open(&fs, "a").expect("a");
    let mut want = want_a.clone();
    want[..B].fill(1);
    assert!(read_all(&fs, &a).expect("a reads") == want);
    let b = open(&fs, "b").expect("b");
    assert!(read_all(&fs, &b).expect("b reads") == want_b);
    drop((a, b, fs));
    // A stale live slot whose block authenticates in place changes nothing;
    // a journal of garbage is ignored.
    std::fs::write(&journal, &slot).expect("stale slot");
    let a_before = std::fs::read(d.path().join("a")).expect("a");
    drop(engine(d.path()));
    assert_eq!(std::fs::read(d.path().join("a")).expect("a"), a_before);
    let junk: Vec<u8> = (0..3 * stride).map(|i| (i * 7 + 3) as u8).collect();
    std::fs::write(&journal, &junk).expect("junk");
    let fs = engine(d.path());
    let a = open(&fs, "a").expect("a");
    assert!(read_all(&fs, &a).expect("a reads") == want);
}

#[test]
fn a_journal_that_is_not_a_regular_file_is_refused() {
    let d = tempfile::tempdir().expect("tmp");
    let journal = d.path().join(super::super::journal::JOURNAL);
    std::os::unix::fs::symlink("/etc/passwd", &journal).expect("symlink");
    let keys = Arc::new(Keys::in_memory(d.path(), cipher(), 2));
    assert!(TdeFs::new(d.path(), keys.clone()).is_err());
    std::fs::remove_file(&journal).expect("rm");
    std::fs::create_dir(&journal).expect("dir");
    let e = TdeFs::new(d.path(), keys).err().expect("refused");
    assert!(e.to_string().contains("tde.journal"), "{e}");
}
