//! The FUSE file system through a real mount, without PostgreSQL: POSIX
//! behaviour, the format on disk, inode reuse, and a sidecar that goes away.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;

use common::Env;
use common::pg::*;
use tde_plugin::page;

fn libc_eperm() -> i32 {
    rustix::io::Errno::PERM.raw_os_error()
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn posix_semantics_through_the_mount() {
    if !can_run() {
        return;
    }
    let env = Env::new("");
    let _sidecar = env.sidecar_with_keys(&["pg-main"]);
    let (backing, mnt) = (env.pg_dir("backing"), env.pg_dir("mnt"));
    let _m = env.mount_init("pg-main", "fs", &backing, &mnt);

    // The key file is invisible and untouchable.
    assert_eq!(std::fs::read_dir(&mnt).expect("readdir").count(), 0);
    assert!(std::fs::metadata(mnt.join("tde.key")).is_err());
    assert!(std::fs::write(mnt.join("tde.key"), b"x").is_err());
    assert!(backing.join("tde.key").exists());

    // Sizes and partial blocks.
    let f = mnt.join("a");
    std::fs::write(&f, b"hello").expect("write");
    assert_eq!(read(&f), b"hello");
    assert_eq!(std::fs::metadata(&f).expect("meta").len(), 5);
    assert_eq!(
        std::fs::metadata(backing.join("a")).expect("meta").len(),
        page::stored_len(5)
    );

    // Writing far past the end: the gap reads as zeros and is stored
    // encrypted (no holes).
    let mut h = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&f)
        .expect("open");
    h.write_all_at(b"tail", 100_000).expect("write");
    let all = read(&f);
    assert_eq!(all.len(), 100_004);
    assert_eq!(&all[..5], b"hello");
    assert!(all[5..100_000].iter().all(|b| *b == 0));
    assert_eq!(&all[100_000..], b"tail");
    assert_eq!(
        std::fs::metadata(backing.join("a")).expect("meta").len(),
        page::stored_len(100_004)
    );

    // Overwrites that straddle blocks, then truncation inside a block.
    h.write_all_at(&[7u8; 10_000], 8_000).expect("write");
    h.set_len(12_345).expect("truncate");
    let all = read(&f);
    assert_eq!(all.len(), 12_345);
    assert_eq!(&all[..5], b"hello");
    assert!(all[8_000..12_345].iter().all(|b| *b == 7));
    h.set_len(20_000).expect("grow");
    let all = read(&f);
    assert!(
        all[12_345..].iter().all(|b| *b == 0),
        "growth reads as zeros"
    );
    h.seek(SeekFrom::End(0)).expect("seek");
    h.write_all(b"appended").expect("append");
    let tail = read(&f);
    assert_eq!(&tail[20_000..], b"appended");
    drop(h);

    // Whole blocks written out of order past the end (as the kernel's
    // writeback does): the gap is filled, then overwritten.
    let g = mnt.join("ooo");
    let o = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&g)
        .expect("open");
    o.write_all_at(&[5u8; 8192 * 2], 8192 * 10)
        .expect("write blocks 10-11");
    o.write_all_at(&[3u8; 8192], 8192 * 4)
        .expect("write block 4");
    o.write_all_at(&[9u8; 8192], 8192 * 12)
        .expect("write block 12 at the end");
    let all = read(&g);
    assert_eq!(all.len(), 8192 * 13);
    assert!(all[..8192 * 4].iter().all(|b| *b == 0));
    assert!(all[8192 * 4..8192 * 5].iter().all(|b| *b == 3));
    assert!(all[8192 * 5..8192 * 10].iter().all(|b| *b == 0));
    assert!(all[8192 * 10..8192 * 12].iter().all(|b| *b == 5));
    assert!(all[8192 * 12..].iter().all(|b| *b == 9));
    drop(o);
    std::fs::remove_file(&g).expect("unlink");

    // An open file truncated and then unlinked, as PostgreSQL does with an
    // old relation file after VACUUM FULL and a checkpoint: it stays usable
    // through its descriptor (fstat, write, fsync, chmod), and fsync, which
    // flushes the kernel's cached times with a setattr on the handle,
    // succeeds.
    let doomed = mnt.join("doomed");
    let d = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&doomed)
        .expect("open");
    d.write_all_at(&[1u8; 8192 * 4], 0).expect("write");
    d.set_len(0).expect("truncate");
    std::fs::remove_file(&doomed).expect("unlink");
    d.write_all_at(&[2u8; 8192], 0)
        .expect("write to the unlinked file");
    assert_eq!(d.metadata().expect("fstat").len(), 8192);
    d.set_permissions(std::fs::Permissions::from_mode(0o600))
        .expect("fchmod");
    d.sync_all().expect("fsync of the unlinked file");
    let mut back = vec![0u8; 8192];
    d.read_exact_at(&mut back, 0).expect("read");
    assert!(back.iter().all(|b| *b == 2));
    drop(d);

    // Directories, rename, links, permissions.
    std::fs::create_dir_all(mnt.join("d/e")).expect("mkdir");
    std::fs::rename(&f, mnt.join("d/e/b")).expect("rename");
    assert_eq!(&read(&mnt.join("d/e/b"))[..5], b"hello");
    std::fs::rename(mnt.join("d"), mnt.join("dd")).expect("rename dir");
    assert_eq!(
        &read(&mnt.join("dd/e/b"))[..5],
        b"hello",
        "paths under a renamed directory"
    );
    // Hard links are refused: each file is bound to its one name.
    let e = std::fs::hard_link(mnt.join("dd/e/b"), mnt.join("hard")).expect_err("link");
    assert_eq!(e.raw_os_error(), Some(libc_eperm()), "{e}");
    assert_eq!(
        std::fs::metadata(mnt.join("dd/e/b")).expect("meta").nlink(),
        1
    );
    std::os::unix::fs::symlink("dd/e/b", mnt.join("sym")).expect("symlink");
    assert_eq!(
        std::fs::read_link(mnt.join("sym")).expect("readlink"),
        Path::new("dd/e/b")
    );
    assert_eq!(&read(&mnt.join("sym"))[..5], b"hello");
    std::fs::set_permissions(mnt.join("sym"), std::fs::Permissions::from_mode(0o640))
        .expect("chmod through the symlink");
    assert_eq!(
        std::fs::metadata(mnt.join("dd/e/b")).expect("meta").mode() & 0o777,
        0o640
    );
    let names: Vec<String> = std::fs::read_dir(&mnt)
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    std::fs::remove_file(mnt.join("sym")).expect("unlink");
    std::fs::remove_file(mnt.join("dd/e/b")).expect("unlink");
    std::fs::remove_dir(mnt.join("dd/e")).expect("rmdir");
    std::fs::remove_dir(mnt.join("dd")).expect("rmdir");
    assert_eq!(std::fs::read_dir(&mnt).expect("readdir").count(), 0);
    let st = rustix::fs::statvfs(&mnt).expect("statfs");
    assert!(st.f_blocks > 0);

    // A file that is not in our format is refused, not passed through.
    std::fs::write(
        backing.join("foreign"),
        b"plain text that is not ours, long enough",
    )
    .expect("write");
    assert!(std::fs::read(mnt.join("foreign")).is_err());
}

/// Deleted files' inode numbers come back for new files (the mount names
/// files by backing inode number): every lookup, read and write must reach
/// the new file, never the old one's path or cached pages.
#[test]
fn reused_inode_numbers_never_show_old_contents() {
    if !can_run() {
        return;
    }
    let env = Env::new("");
    let _sidecar = env.sidecar_with_keys(&["pg-main"]);
    let (backing, mnt) = (env.pg_dir("backing"), env.pg_dir("mnt"));
    let _m = env.mount_init("pg-main", "fs", &backing, &mnt);
    let mut seen = std::collections::HashSet::new();
    let mut reused = 0;
    for i in 0..300u32 {
        let p = mnt.join(format!("f{}", i % 7));
        let content = vec![(i % 251) as u8; 8192 * 3];
        std::fs::write(&p, &content).expect("write");
        assert_eq!(read(&p), content, "round {i}");
        // Keep an extra reference so the kernel's inode outlives the unlink.
        let keep = std::fs::File::open(&p).ok();
        let ino = std::fs::metadata(&p).expect("meta").ino();
        if !seen.insert(ino) {
            reused += 1;
        }
        drop(keep);
        std::fs::remove_file(&p).expect("unlink");
    }
    eprintln!("inode numbers reused {reused} times");
    assert!(
        reused > 0,
        "the backing file system reused no inode numbers; the test proves nothing here"
    );
}

/// The sidecar stops after mounting: I/O continues with the key in memory;
/// the mount notices, and reconnects when the sidecar is back.
#[test]
fn io_continues_while_the_sidecar_is_away() {
    if !can_run() {
        return;
    }
    let env = Env::new("");
    let shares = env.init();
    let sidecar = env.serve();
    env.unseal(&shares[..3]);
    env.ok(&["key", "create", "pg-main"]);
    let (backing, mnt) = (env.pg_dir("backing"), env.pg_dir("mnt"));
    let m = env.mount_init("pg-main", "fs", &backing, &mnt);
    std::fs::write(mnt.join("x"), vec![1u8; 50_000]).expect("write");
    sidecar.stop();
    std::thread::sleep(std::time::Duration::from_secs(3));
    std::fs::write(mnt.join("y"), vec![2u8; 50_000]).expect("write while the sidecar is away");
    assert_eq!(read(&mnt.join("x")), vec![1u8; 50_000]);
    let _sidecar = env.serve();
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(read(&mnt.join("y")), vec![2u8; 50_000]);
    let log = std::fs::read_to_string(&m.log).expect("log");
    assert!(log.contains("lost the sidecar connection"), "{log}");
    assert!(log.contains("reconnected to the sidecar"), "{log}");
    m.stop();
    // A new mount while the sidecar is sealed waits, says why, and gives up
    // cleanly after --wait.
    let e = env.mount_refused(&["--tablespace", "fs", "--cluster", "c1"], &backing, &mnt);
    assert!(e.contains("sealed"), "{e}");
}
