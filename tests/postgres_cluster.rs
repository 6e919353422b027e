//! Issue 3, must-show 2, 4 and 6: a whole cluster on the mount (WAL
//! included), crashes of PostgreSQL and of the mount under load, and a
//! minute of pgbench with 8 clients on a tablespace.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::Env;
use common::pg::*;

/// initdb into the mount: catalogs, WAL and temporary files are all
/// encrypted; pgbench initializes and runs.
#[test]
fn whole_cluster_on_the_mount() {
    if !can_run() {
        return;
    }
    let _serial = serial();
    let env = Env::new("");
    let _sidecar = env.sidecar_with_keys(&["pg-main"]);
    let backing = env.pg_dir("backing");
    let mnt = env.pg_dir("mnt");
    let _mount = env.mount_init("pg-main", "cluster", &backing, &mnt);
    let mut pg = Pg::initdb(&mnt.join("data"), env.dir.path());
    pg.start();
    let init = pg.pgbench(&["-i", "-s", "5", "-q"]);
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    pg.sql(&[
        "CREATE TABLE m (id int, v text)",
        "INSERT INTO m SELECT g, 'WALMARKER-91c2-' || g FROM generate_series(1, 5000) g",
        "SELECT pg_switch_wal()",
    ]);
    let run = pg.pgbench(&["-c", "4", "-j", "2", "-T", "10"]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(failed_transactions(&run), 0);
    assert!(processed(&run) > 0);
    pg.sql(&["CHECKPOINT"]);
    // The marker is in the plaintext WAL (seen through the mount), and in no
    // backing file at all: relations, WAL, catalogs.
    let wal_plain = files_containing(&mnt.join("data/pg_wal"), b"WALMARKER-91c2-");
    assert!(
        !wal_plain.is_empty(),
        "the WAL holds the marker in plaintext"
    );
    assert_eq!(
        files_containing(&backing, b"WALMARKER-91c2-"),
        Vec::<PathBuf>::new()
    );
    assert!(
        backing
            .join("data/pg_wal")
            .read_dir()
            .expect("wal dir")
            .count()
            > 1
    );
    pg.amcheck();
}

/// kill -9 of PostgreSQL during pgbench, then of the mount during pgbench:
/// each time PostgreSQL recovers and pg_amcheck is clean.
#[test]
fn crashes_under_load_recover() {
    if !can_run() {
        return;
    }
    let _serial = serial();
    let env = Env::new("");
    let _sidecar = env.sidecar_with_keys(&["pg-main"]);
    let args = ["--tablespace", "ts", "--cluster", "c1"];
    let (backing, mnt, mount, mut pg) = tablespace(&env, "pg-main", "ts");
    pg.pgbench_init(4, "ts");

    // `-n`: pgbench would otherwise truncate pgbench_history at the start of
    // each run; with it, history accumulates and sum(delta) = sum(abalance).
    // 1. PostgreSQL dies mid-load.
    let mut bench = pg.pgbench_spawn(&["-n", "-c", "4", "-j", "2", "-T", "30"]);
    std::thread::sleep(Duration::from_secs(4));
    pg.kill9();
    let _ = bench.kill();
    let _ = bench.wait();
    pg.start();
    pg.amcheck();
    let before: u64 = pg
        .sql(&["SELECT count(*) FROM pgbench_history"])
        .parse()
        .expect("count");
    assert!(before > 0, "transactions were committed before the crash");

    // 2. The mount dies mid-load. PostgreSQL then fails its I/O; it is
    // stopped, the dead mount detached, remounted, and PostgreSQL recovers.
    let mut bench = pg.pgbench_spawn(&["-n", "-c", "4", "-j", "2", "-T", "30"]);
    std::thread::sleep(Duration::from_secs(4));
    mount.kill9();
    let _ = bench.kill();
    let _ = bench.wait();
    pg.kill9();
    let _mount = env.mount(&args, &backing, &mnt);
    pg.start();
    pg.amcheck();
    let after: u64 = pg
        .sql(&["SELECT count(*) FROM pgbench_history"])
        .parse()
        .expect("count");
    assert!(
        after >= before,
        "committed transactions survive: {after} < {before}"
    );
    let sums = pg.sql(&["SELECT (SELECT sum(abalance) FROM pgbench_accounts) = (SELECT sum(delta) FROM pgbench_history)"]);
    assert_eq!(sums, "t", "pgbench's invariant holds after both crashes");
}

/// pgbench for 60 s with 8 clients on a tablespace mount: zero errors.
#[test]
fn pgbench_a_minute_eight_clients() {
    if !can_run() {
        return;
    }
    let _serial = serial();
    let env = Env::new("");
    let _sidecar = env.sidecar_with_keys(&["pg-main"]);
    let (_backing, _mnt, _mount, pg) = tablespace(&env, "pg-main", "ts");
    pg.pgbench_init(10, "ts");
    let run = pg.pgbench(&["-c", "8", "-j", "2", "-T", "60"]);
    assert!(
        run.status.success(),
        "pgbench failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(failed_transactions(&run), 0);
    let n = processed(&run);
    assert!(n > 1000, "only {n} transactions in 60 s");
    eprintln!("pgbench 60 s, 8 clients, tablespace on tde mount: {n} transactions");
    pg.amcheck();
}
