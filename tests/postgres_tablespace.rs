//! Issue 3, must-show 1 and 5: PostgreSQL 15 tablespaces on `tde mount`.

mod common;

use common::Env;
use common::pg::*;

const MARKER: &str = "MARKER-7f3a-secret-";

/// 200,000 rows with a marker in a tablespace on the mount, updated,
/// deleted, VACUUM FULL, CHECKPOINT: the marker is nowhere in the backing
/// directory; after stopping, unmounting and remounting, the rows are
/// identical and pg_amcheck is clean.
#[test]
fn tablespace_on_the_mount_round_trips() {
    if !can_run() {
        return;
    }
    let _serial = serial();
    let env = Env::new("");
    let _sidecar = env.sidecar_with_keys(&["pg-main"]);
    let (backing, mnt, mount, mut pg) = tablespace(&env, "pg-main", "secure");
    pg.sql(&[
        "CREATE TABLE t (id int PRIMARY KEY USING INDEX TABLESPACE secure, v text) TABLESPACE secure",
        &format!("INSERT INTO t SELECT g, '{MARKER}' || g FROM generate_series(1, 200000) g"),
        "CREATE INDEX t_v ON t (v) TABLESPACE secure",
        "UPDATE t SET v = v || '-updated' WHERE id % 3 = 0",
        "DELETE FROM t WHERE id % 7 = 0",
        "VACUUM FULL t",
        "CHECKPOINT",
    ]);
    let before = pg.sql(&[T_CHECKSUM]);
    assert!(before.starts_with("171429:"), "{before}");
    assert_eq!(pg.sql(&["SELECT spcname FROM pg_class c JOIN pg_tablespace s ON s.oid = c.reltablespace WHERE relname = 't'"]), "secure");

    // The marker is really stored (readable through the mount) but only as
    // ciphertext in the backing directory.
    assert!(
        !files_containing(&mnt, MARKER.as_bytes()).is_empty(),
        "the marker reaches the mount"
    );
    assert_eq!(
        files_containing(&backing, MARKER.as_bytes()),
        Vec::<std::path::PathBuf>::new()
    );
    assert_eq!(
        files_containing(&backing, b"-updated"),
        Vec::<std::path::PathBuf>::new()
    );

    pg.stop();
    mount.stop();
    let _mount = env.mount(
        &["--tablespace", "secure", "--cluster", "c1"],
        &backing,
        &mnt,
    );
    pg.start();
    assert_eq!(
        pg.sql(&[T_CHECKSUM]),
        before,
        "identical after unmount and remount"
    );
    assert_eq!(
        pg.sql(&["SELECT count(*) FROM t WHERE v = 'MARKER-7f3a-secret-5'"]),
        "1"
    );
    pg.amcheck();
}

/// Two tablespaces with different DEKs under different MEKs in one cluster.
#[test]
fn two_tablespaces_two_master_keys() {
    if !can_run() {
        return;
    }
    let _serial = serial();
    let env = Env::new("");
    let _sidecar = env.sidecar_with_keys(&["pg-sales", "pg-hr"]);
    let (b1, m1, b2, m2) = (
        env.pg_dir("b-sales"),
        env.pg_dir("m-sales"),
        env.pg_dir("b-hr"),
        env.pg_dir("m-hr"),
    );
    let _a = env.mount_init("pg-sales", "sales", &b1, &m1);
    let _b = env.mount_init("pg-hr", "hr", &b2, &m2);
    let k1 = std::fs::read_to_string(b1.join("tde.key")).expect("key file");
    let k2 = std::fs::read_to_string(b2.join("tde.key")).expect("key file");
    assert!(k1.contains("\"pg-sales\"") && k2.contains("\"pg-hr\""));
    assert_ne!(k1, k2);
    let mut pg = Pg::initdb(&env.pg_dir("cluster").join("data"), env.dir.path());
    pg.start();
    pg.sql(&[
        &format!("CREATE TABLESPACE sales LOCATION '{}'", m1.display()),
        &format!("CREATE TABLESPACE hr LOCATION '{}'", m2.display()),
    ]);
    pg.sql(&[
        "CREATE TABLE s (id int, v text) TABLESPACE sales",
        "CREATE TABLE h (id int, v text) TABLESPACE hr",
        "INSERT INTO s SELECT g, 'SALES-SECRET-' || g FROM generate_series(1, 20000) g",
        "INSERT INTO h SELECT g, 'HR-SECRET-' || g FROM generate_series(1, 20000) g",
        "CHECKPOINT",
    ]);
    assert!(files_containing(&b1, b"SALES-SECRET").is_empty());
    assert!(files_containing(&b2, b"HR-SECRET").is_empty());
    // The sidecar audited one data key per tablespace, each under its MEK.
    pg.stop();
    drop(_a);
    drop(_b);
    let _a = env.mount(&["--tablespace", "sales", "--cluster", "c1"], &b1, &m1);
    let _b = env.mount(&["--tablespace", "hr", "--cluster", "c1"], &b2, &m2);
    pg.start();
    assert_eq!(
        pg.sql(&["SELECT count(*) FROM s JOIN h USING (id)"]),
        "20000"
    );
    pg.amcheck();
    drop(_sidecar);
    let recs = common::audit(&env.db());
    let gens: Vec<_> = recs
        .iter()
        .filter(|r| r["op"] == "generate_data_key" && r["result"] == "ok")
        .collect();
    assert_eq!(gens.len(), 2);
    assert!(
        gens.iter()
            .any(|r| r["key"] == "pg-sales" && r["context"]["tablespace"] == "sales")
    );
    assert!(
        gens.iter()
            .any(|r| r["key"] == "pg-hr" && r["context"]["tablespace"] == "hr")
    );
}

/// Issue 12, point 8: a mount that vanished leaves an empty directory that
/// PostgreSQL still uses as a tablespace location. Mounting a backing
/// directory without that tablespace's files there is refused (it would
/// hide them), `--force` overrides, and remounting the right backing
/// directory is accepted and shows the data again. With `--daemon`, the
/// mount logs to the file named by `--log-file`.
#[test]
fn a_mount_over_a_tablespace_location_in_use_needs_the_right_backing() {
    if !can_run() {
        return;
    }
    let _serial = serial();
    let env = Env::new("");
    let _sidecar = env.sidecar_with_keys(&["pg-main"]);
    let (backing, mnt, mount, mut pg) = tablespace(&env, "pg-main", "secure");
    pg.sql(&[
        "CREATE TABLE kept (v text) TABLESPACE secure",
        "INSERT INTO kept VALUES ('still here')",
        "CHECKPOINT",
    ]);
    mount.kill9();
    assert!(std::fs::read_dir(&mnt).expect("ls").next().is_none());

    let fresh = env.pg_dir("fresh-backing");
    let init = [
        "--init",
        "--key",
        "pg-main",
        "--tablespace",
        "other",
        "--cluster",
        "c1",
    ];
    let err = env.mount_refused(&init, &fresh, &mnt);
    assert!(
        err.contains("uses it as the location of tablespace") && err.contains("--force"),
        "{err}"
    );
    assert!(
        !fresh.join("tde.key").exists(),
        "refused before the key file is made"
    );

    // --force, daemonized, logging where it is told to.
    let log = env.dir.path().join("logs").join("forced.log");
    let mut args = vec!["--json", "mount", "--daemon", "--force", "--wait", "10"];
    args.extend(init);
    let log_arg = log.display().to_string();
    args.extend(["--log-file", &log_arg]);
    let out = env
        .cmd(&args)
        .arg(&fresh)
        .arg(&mnt)
        .output()
        .expect("run tde mount --daemon");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["log"], log_arg, "{v}");
    assert!(is_mountpoint(&mnt));
    let text = std::fs::read_to_string(&log).expect("the mount's log");
    assert!(text.contains("mounted on"), "{text}");
    assert!(
        text.contains("uses it as the location of tablespace"),
        "{text}"
    );
    env.ok(&["umount", mnt.to_str().expect("utf-8")]);
    assert!(!is_mountpoint(&mnt));

    // The right backing directory: accepted, and the rows are back.
    let again = env.mount(
        &["--tablespace", "secure", "--cluster", "c1"],
        &backing,
        &mnt,
    );
    assert_eq!(pg.sql(&["SELECT v FROM kept"]).trim(), "still here");
    pg.stop();
    again.stop();
}
