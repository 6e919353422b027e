//! PostgreSQL on a `tde mount` tablespace against a tablespace in a plain
//! directory on the same disk: `cargo bench --bench postgres` (root,
//! /dev/fuse, PostgreSQL 15; about 5 minutes). One cluster (WAL and
//! catalogs on the plain disk, as in tablespace mode), pgbench tables and
//! indexes in the tablespace under test, default settings
//! (`shared_buffers` 128 MB). Prints TPS for:
//!
//! 1. read-write (pgbench's TPC-B-like script), 8 clients;
//! 2. select-only, 8 clients, data in the kernel's page cache;
//! 3. select-only, 8 clients, right after restarting PostgreSQL and dropping
//!    the page cache (every first read of a page is decrypted).
//!
//! Uses the end-to-end test harness (real `tde serve`, real mount, real
//! PostgreSQL started as the postgres user).

#[path = "../tests/common/mod.rs"]
mod common;

use common::Env;
use common::pg::*;

/// pgbench scale: 30 is about 450 MB of tables and indexes, more than
/// shared_buffers, less than the page cache.
const SCALE: u32 = 30;
/// Seconds per measured run.
const SECS: &str = "20";

fn drop_caches() {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// TPS of (read-write, select-only warm, select-only cold) with pgbench's
/// tables in tablespace `ts`.
fn measure(pg: &mut Pg, ts: &str) -> [f64; 3] {
    pg.pgbench_init(SCALE, ts);
    pg.sql(&["VACUUM ANALYZE", "CHECKPOINT"]);
    let run = |pg: &Pg, extra: &[&str]| {
        let mut args = vec!["-c", "8", "-j", "2", "-T", SECS, "-n"];
        args.extend_from_slice(extra);
        let out = pg.pgbench(&args);
        assert!(
            out.status.success(),
            "pgbench: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(failed_transactions(&out), 0);
        tps(&out)
    };
    let rw = run(pg, &[]);
    // Warm: one pass first so the tables are in the page cache.
    run(pg, &["-S", "-T", "5"]);
    let warm = run(pg, &["-S"]);
    pg.sql(&["CHECKPOINT"]);
    pg.stop();
    drop_caches();
    pg.start();
    let cold = run(pg, &["-S"]);
    [rw, warm, cold]
}

fn main() {
    if !can_run() {
        eprintln!("run as root with /dev/fuse and PostgreSQL 15 installed");
        return;
    }
    let env = Env::new("");
    let _sidecar = env.sidecar_with_keys(&["pg-main"]);
    let (_backing, _mnt, _mount, mut pg) = tablespace(&env, "pg-main", "ts");
    let plain = env.pg_dir("plain");
    pg.sql(&[&format!(
        "CREATE TABLESPACE plain LOCATION '{}'",
        plain.display()
    )]);

    let p = measure(&mut pg, "plain");
    let m = measure(&mut pg, "ts");
    pg.stop();

    println!(
        "| pgbench scale {SCALE}, 8 clients, {SECS} s | plain TPS | tde mount TPS | mount / plain |"
    );
    println!("|---|---:|---:|---:|");
    for (i, name) in [
        "read-write (TPC-B-like)",
        "select-only, page cache warm",
        "select-only, after restart + drop_caches",
    ]
    .into_iter()
    .enumerate()
    {
        println!(
            "| {name} | {:.0} | {:.0} | {:.2}x |",
            p[i],
            m[i],
            m[i] / p[i]
        );
    }
}
