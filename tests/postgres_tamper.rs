//! Issue 3, must-show 3: tampering with the backing directory is an I/O
//! error in PostgreSQL, never silent garbage, and a copied key file does not
//! mount.

mod common;

use std::path::{Path, PathBuf};

use common::Env;
use common::pg::*;
use tde_plugin::page::{BLOCK_STRIDE, HEADER_LEN};

fn block_at(file: &Path, block: u64) -> u64 {
    let _ = file;
    HEADER_LEN + block * BLOCK_STRIDE
}

fn flip(file: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .expect("open");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).expect("read");
    f.write_all_at(&[b[0] ^ 0x01], offset).expect("write");
    f.sync_all().expect("sync");
}

fn swap(file: &Path, a: u64, b: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .expect("open");
    let mut x = vec![0u8; BLOCK_STRIDE as usize];
    let mut y = vec![0u8; BLOCK_STRIDE as usize];
    f.read_exact_at(&mut x, block_at(file, a)).expect("read");
    f.read_exact_at(&mut y, block_at(file, b)).expect("read");
    f.write_all_at(&y, block_at(file, a)).expect("write");
    f.write_all_at(&x, block_at(file, b)).expect("write");
    f.sync_all().expect("sync");
}

#[test]
fn tampered_blocks_are_io_errors_and_copied_key_files_do_not_mount() {
    if !can_run() {
        return;
    }
    let _serial = serial();
    let env = Env::new("");
    let _sidecar = env.sidecar_with_keys(&["pg-main"]);
    let backing = env.pg_dir("backing");
    let mnt = env.pg_dir("mnt");
    let args = ["--tablespace", "secure", "--cluster", "c1"];
    let mount = env.mount_init("pg-main", "secure", &backing, &mnt);
    let mut pg = Pg::initdb(&env.pg_dir("cluster").join("data"), env.dir.path());
    pg.start();
    pg.sql(&[
        &format!("CREATE TABLESPACE secure LOCATION '{}'", mnt.display()),
        "CREATE TABLE t (id int, v text) TABLESPACE secure",
        "INSERT INTO t SELECT g, repeat('x', 100) || g FROM generate_series(1, 20000) g",
        "CHECKPOINT",
    ]);
    let rel = pg.sql(&["SELECT pg_relation_filepath('t')"]);
    let rel: PathBuf = rel.split('/').skip(2).collect();
    let file = backing.join(&rel);
    assert!(file.exists(), "{}", file.display());
    let pages: u64 = pg
        .sql(&["SELECT pg_relation_size('t') / 8192"])
        .parse()
        .expect("pages");
    assert!(pages > 20);

    // The tamperer works with PostgreSQL and the mount down, so no cache
    // (shared buffers, kernel page cache) hides the change.
    let restart = |pg: &mut Pg, mount: Mount| {
        pg.stop();
        mount.stop();
        env.mount(&args, &backing, &mnt)
    };
    pg.stop();
    mount.stop();
    flip(&file, block_at(&file, 5) + 100);
    let mount = env.mount(&args, &backing, &mnt);
    pg.start();
    let err = pg
        .try_sql(&["SELECT count(*) FROM t"])
        .expect_err("reading block 5 must fail");
    assert!(
        err.contains("could not read block 5") && err.contains("Input/output error"),
        "{err}"
    );
    // Other blocks still read.
    assert_eq!(
        pg.sql(&["SELECT count(*) FROM t WHERE ctid = '(0,1)'"]),
        "1"
    );
    assert_eq!(
        pg.sql(&["SELECT count(*) FROM t WHERE ctid = '(10,1)'"]),
        "1"
    );
    let log = std::fs::read_to_string(&mount.log).expect("mount log");
    assert!(
        log.contains("block=5") && log.contains("failed authentication"),
        "{log}"
    );

    // Undo the flip; swap two blocks instead: both are refused.
    let mount = restart(&mut pg, mount);
    drop(mount);
    flip(&file, block_at(&file, 5) + 100);
    swap(&file, 2, 3);
    let mount = env.mount(&args, &backing, &mnt);
    pg.start();
    assert_eq!(
        pg.sql(&["SELECT count(*) FROM t WHERE ctid = '(5,1)'"]),
        "1",
        "block 5 is whole again"
    );
    for b in [2, 3] {
        let err = pg
            .try_sql(&[&format!("SELECT count(*) FROM t WHERE ctid = '({b},1)'")])
            .expect_err("a swapped block must fail");
        assert!(err.contains(&format!("could not read block {b}")), "{err}");
    }
    pg.stop();
    drop(mount);

    // A key file copied into another backing directory does not mount, as
    // another tablespace, as another cluster, or edited to claim either.
    let other = env.pg_dir("other-backing");
    let other_mnt = env.pg_dir("other-mnt");
    std::fs::copy(backing.join("tde.key"), other.join("tde.key")).expect("copy");
    let e = env.mount_refused(
        &["--tablespace", "other", "--cluster", "c1"],
        &other,
        &other_mnt,
    );
    assert!(e.contains("mount refused"), "{e}");
    let e = env.mount_refused(
        &["--tablespace", "secure", "--cluster", "c2"],
        &other,
        &other_mnt,
    );
    assert!(e.contains("mount refused"), "{e}");
    let edited = std::fs::read_to_string(other.join("tde.key"))
        .expect("read")
        .replace("\"secure\"", "\"other\"");
    std::fs::write(other.join("tde.key"), edited).expect("write");
    let e = env.mount_refused(
        &["--tablespace", "other", "--cluster", "c1"],
        &other,
        &other_mnt,
    );
    assert!(
        e.contains("was not made for tablespace"),
        "the sidecar's context check: {e}"
    );
    drop(_sidecar);
    let recs = common::audit(&env.db());
    assert!(common::refusals(&recs, "decrypt", "CONTEXT_MISMATCH") >= 1);
}

/// Issue 9: whole backing files moved by someone who can write the backing
/// directory. Swapped by name, copied over another table's, or cut at a
/// block boundary below the length PostgreSQL last fsynced: each is an I/O
/// error in PostgreSQL, never fewer or other rows.
#[test]
fn files_swapped_copied_or_cut_are_io_errors() {
    if !can_run() {
        return;
    }
    let _serial = serial();
    let env = Env::new("");
    let _sidecar = env.sidecar_with_keys(&["pg-main"]);
    let args = ["--tablespace", "secure", "--cluster", "c1"];
    let (backing, mnt, mount, mut pg) = tablespace(&env, "pg-main", "secure");
    let mut stmts = Vec::new();
    for t in ["a", "b", "c"] {
        stmts.push(format!(
            "CREATE TABLE {t} (id int, v text) TABLESPACE secure"
        ));
        stmts.push(format!(
            "INSERT INTO {t} SELECT g, '{t}' || repeat('x', 200) FROM generate_series(1, 5000) g"
        ));
    }
    stmts.push("CHECKPOINT".into());
    pg.sql(&stmts.iter().map(String::as_str).collect::<Vec<_>>());
    let file = |t: &str| -> PathBuf {
        let rel = pg.sql(&[&format!("SELECT pg_relation_filepath('{t}')")]);
        backing.join(rel.split('/').skip(2).collect::<PathBuf>())
    };
    let (fa, fb, fc) = (file("a"), file("b"), file("c"));
    let count = "SELECT count(*), min(v) FROM ";
    for t in ["a", "b", "c"] {
        assert_eq!(
            pg.sql(&[&format!("{count}{t}")]).split('|').next(),
            Some("5000")
        );
    }
    let originals: Vec<Vec<u8>> = [&fa, &fb, &fc]
        .iter()
        .map(|p| std::fs::read(p).expect("read"))
        .collect();
    // The tamperer works with PostgreSQL and the mount down, so no cache
    // hides the change; each case is undone before the next.
    pg.stop();
    drop(mount);
    let io_error = |pg: &Pg, t: &str| {
        let e = pg
            .try_sql(&[&format!("{count}{t}")])
            .expect_err("a tampered table must not be read");
        assert!(e.contains("Input/output error"), "{t}: {e}");
    };
    let cases: [(&str, &dyn Fn()); 3] = [
        ("swap a and b by name", &|| {
            std::fs::write(&fa, &originals[1]).expect("write");
            std::fs::write(&fb, &originals[0]).expect("write");
        }),
        ("copy a over b", &|| {
            std::fs::write(&fb, &originals[0]).expect("write");
        }),
        ("cut c by 2 blocks below its fsynced length", &|| {
            let len = originals[2].len() as u64;
            std::fs::OpenOptions::new()
                .write(true)
                .open(&fc)
                .and_then(|f| f.set_len(len - 2 * BLOCK_STRIDE))
                .expect("cut");
        }),
    ];
    for (what, tamper) in cases {
        tamper();
        let m = env.mount(&args, &backing, &mnt);
        pg.start();
        match what {
            "swap a and b by name" => {
                io_error(&pg, "a");
                io_error(&pg, "b");
            }
            "copy a over b" => {
                io_error(&pg, "b");
                assert!(pg.sql(&[&format!("{count}a")]).starts_with("5000|a"));
            }
            _ => io_error(&pg, "c"),
        }
        // The untouched tables still read.
        let untouched = if what.starts_with("cut") { "a" } else { "c" };
        assert!(
            pg.sql(&[&format!("{count}{untouched}")])
                .starts_with(&format!("5000|{untouched}")),
            "{what}"
        );
        let log = std::fs::read_to_string(&m.log).expect("mount log");
        assert!(
            log.contains("does not authenticate for this path")
                || log.contains("less than its last durable length"),
            "{what}: {log}"
        );
        pg.stop();
        drop(m);
        for (p, o) in [&fa, &fb, &fc].iter().zip(&originals) {
            std::fs::write(p, o).expect("restore");
        }
    }
    // Restored, everything reads again.
    let _m = env.mount(&args, &backing, &mnt);
    pg.start();
    for t in ["a", "b", "c"] {
        assert!(
            pg.sql(&[&format!("{count}{t}")])
                .starts_with(&format!("5000|{t}"))
        );
    }
    pg.amcheck();
}
