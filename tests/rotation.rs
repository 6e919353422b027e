//! Issue 4, master-key rotation: must-show 1 (three rotations under
//! pgbench, old versions destroyed, restart, same data), 4 (the sidecar
//! killed during rotations), 5 (destroying a version in use is refused and
//! names the tablespaces) and 6 (an automatic rotation policy of seconds,
//! followed by every mount).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::pg::*;
use common::{Env, audit, count};

/// The master key versions wrapping each data key in `backing`'s key file.
fn keyfile_mek_versions(backing: &Path) -> Vec<u64> {
    keyfile_deks(backing)
        .into_iter()
        .map(|(_, mek)| mek)
        .collect()
}

fn primary(env: &Env, key: &str) -> u64 {
    env.ok(&["key", "show", key])["primary_version"]
        .as_u64()
        .expect("primary")
}

/// Waits until every data key in `backing` is wrapped under `version`.
fn wait_rewrapped(backing: &Path, version: u64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let v = keyfile_mek_versions(backing);
        if v.iter().all(|x| *x == version) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} still under {v:?}, not {version}",
            backing.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Must-show 1: pgbench with 8 clients while the master key rotates three
/// times; every mount rewraps; zero failed transactions; every old version
/// destroyed; PostgreSQL and the mount restarted; the data is the same.
#[test]
fn three_rotations_under_pgbench() {
    if !can_run() {
        return;
    }
    let _serial = serial();
    let env = Env::new("");
    let _sidecar = env.sidecar_with_keys(&["pg-main"]);
    let (backing, mnt, mount, mut pg) = tablespace(&env, "pg-main", "ts");
    pg.pgbench_init(5, "ts");
    pg.sql(&[
        "CREATE TABLE t (id int primary key, v text) TABLESPACE ts",
        "INSERT INTO t SELECT g, 'row-' || g FROM generate_series(1, 50000) g",
    ]);
    // Table t does not change: its checksum from before the rotations must
    // come back at the end. pgbench's tables change under load: theirs is
    // taken when the load ends.
    let t_before = pg.sql(&[T_CHECKSUM]);
    let bench = pg.pgbench_spawn(&["-c", "8", "-j", "2", "-T", "24"]);
    for n in 2..=4u64 {
        std::thread::sleep(Duration::from_secs(5));
        let v = env.ok(&["key", "rotate", "pg-main"]);
        assert_eq!(v["primary_version"], n);
        wait_rewrapped(&backing, n, Duration::from_secs(10));
    }
    let out = bench.wait_with_output().expect("pgbench");
    assert!(
        out.status.success(),
        "pgbench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(failed_transactions(&out), 0);
    assert!(processed(&out) > 100, "pgbench made progress");
    let before = pg.sql(&[T_AND_ACCOUNTS_CHECKSUM]);

    // The registry shows only v4 in use: v1-v3 can be destroyed.
    let show = env.ok(&["key", "show", "pg-main"]);
    for v in show["versions"].as_array().expect("versions") {
        let used = v["used_by"].as_array().expect("used_by").len();
        assert_eq!(used, usize::from(v["version"] == 4), "{v}");
    }
    for n in 1..=3 {
        env.ok(&[
            "key",
            "destroy",
            "pg-main",
            "--version",
            &n.to_string(),
            "--yes",
        ]);
    }
    let show = env.ok(&["key", "show", "pg-main"]);
    let states: Vec<_> = show["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .map(|v| v["state"].as_str().expect("state").to_string())
        .collect();
    assert_eq!(states, ["destroyed", "destroyed", "destroyed", "enabled"]);

    pg.stop();
    mount.stop();
    let _mount = env.mount(&["--tablespace", "ts", "--cluster", "c1"], &backing, &mnt);
    pg.start();
    assert_eq!(pg.sql(&[T_AND_ACCOUNTS_CHECKSUM]), before);
    assert_eq!(pg.sql(&[T_CHECKSUM]), t_before);
    pg.amcheck();
    let records = audit(&env.db());
    assert_eq!(count(&records, "key_rotate", "ok"), 3);
    assert!(count(&records, "re_encrypt", "ok") >= 3);
}

/// Must-show 4: the sidecar is killed (-9) right after each of three
/// rotations, at a different moment of the mounts' rewrap each time. After
/// a restart and unseal every key file reaches the new version, and every
/// tablespace mounts again (its key file unwraps) with its data intact.
#[test]
fn sidecar_killed_during_rotation() {
    if !can_run() {
        return;
    }
    let env = Env::new("");
    let shares = env.init();
    let mut sidecar = env.serve();
    env.unseal(&shares[..3]);
    env.ok(&["key", "create", "pg-main"]);
    let names = ["ts1", "ts2"];
    let mut mounts = Vec::new();
    for n in names {
        let (b, m) = (env.pg_dir(&format!("b-{n}")), env.pg_dir(&format!("m-{n}")));
        let mount = env.mount_init("pg-main", n, &b, &m);
        std::fs::write(m.join("data"), format!("contents of {n}").repeat(5000)).expect("write");
        mounts.push((b, m, mount));
    }
    for (round, delay_ms) in [0u64, 2, 15].into_iter().enumerate() {
        let next = round as u64 + 2;
        env.ok(&["key", "rotate", "pg-main"]);
        std::thread::sleep(Duration::from_millis(delay_ms));
        sidecar.kill9();
        // Whatever the mounts managed, each key file is either all old or
        // all new: never a mix, never unreadable.
        for (b, _, _) in &mounts {
            let v = keyfile_mek_versions(b);
            assert!(v == [next - 1] || v == [next], "{v:?}");
        }
        sidecar = env.serve();
        env.unseal(&shares[..3]);
        assert_eq!(primary(&env, "pg-main"), next);
        for (b, _, _) in &mounts {
            wait_rewrapped(b, next, Duration::from_secs(20));
        }
    }
    let mut remounted = Vec::new();
    for ((b, m, mount), n) in mounts.into_iter().zip(names) {
        mount.stop();
        let again = env.mount(&["--tablespace", n, "--cluster", "c1"], &b, &m);
        assert_eq!(
            std::fs::read_to_string(m.join("data")).expect("read"),
            format!("contents of {n}").repeat(5000)
        );
        remounted.push(again);
    }
    // Versions 1-3 are no longer referenced.
    for v in 1..=3 {
        env.ok(&[
            "key",
            "destroy",
            "pg-main",
            "--version",
            &v.to_string(),
            "--yes",
        ]);
    }
    drop(remounted);
    sidecar.stop();
}

/// Must-show 5: destroying a version that registered data keys still use
/// is refused with KEY_IN_USE naming the tablespaces; `tde rewrap` of the
/// cold (unmounted) one frees it; `--force` overrides.
#[test]
fn destroy_in_use_is_refused() {
    if !can_run() {
        return;
    }
    let env = Env::new("");
    let _sidecar = env.sidecar_with_keys(&["pg-main", "pg-other"]);
    let cold_b = env.pg_dir("b-cold");
    let cold_m = env.pg_dir("m-cold");
    env.mount_init("pg-main", "cold", &cold_b, &cold_m).stop();
    let (hot_b, hot_m) = (env.pg_dir("b-hot"), env.pg_dir("m-hot"));
    let _hot = env.mount_init("pg-main", "hot", &hot_b, &hot_m);
    let (o_b, o_m) = (env.pg_dir("b-o"), env.pg_dir("m-o"));
    let _other = env.mount_init("pg-other", "other", &o_b, &o_m);
    assert_eq!(keyfile_mek_versions(&o_b), [1]);

    env.ok(&["key", "rotate", "pg-main"]);
    wait_rewrapped(&hot_b, 2, Duration::from_secs(10));
    assert_eq!(
        keyfile_mek_versions(&cold_b),
        [1],
        "not mounted: not rewrapped"
    );
    let msg = env.refused(
        &["key", "destroy", "pg-main", "--version", "1", "--yes"],
        "KEY_IN_USE",
    );
    assert!(msg.contains("tablespace=cold"), "{msg}");
    assert!(msg.contains(&*cold_b.to_string_lossy()), "{msg}");
    assert!(!msg.contains("tablespace=hot"), "{msg}");
    let msg = env.refused(
        &[
            "key",
            "schedule-destroy",
            "pg-main",
            "--version",
            "1",
            "--days",
            "1",
        ],
        "KEY_IN_USE",
    );
    assert!(msg.contains("tablespace=cold"), "{msg}");
    // The whole key: both tablespaces.
    let msg = env.refused(&["key", "destroy", "pg-main", "--yes"], "KEY_IN_USE");
    assert!(
        msg.contains("tablespace=cold") && msg.contains("tablespace=hot"),
        "{msg}"
    );
    // `key show` tells which versions are referenced and by whom.
    let show = env.ok(&["key", "show", "pg-main"]);
    let used = |v: usize| {
        show["versions"][v]["used_by"]
            .as_array()
            .expect("used_by")
            .clone()
    };
    assert_eq!(used(0).len(), 1);
    assert_eq!(used(0)[0]["context"]["tablespace"], "cold");
    assert_eq!(used(1)[0]["context"]["tablespace"], "hot");

    // A mounted one is not rewrapped from outside (the mount does it), and
    // is not mounted twice.
    let out = env
        .cmd(&["rewrap", &hot_b.to_string_lossy()])
        .output()
        .expect("tde rewrap");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by a running `tde mount`"), "{err}");
    let elsewhere = env.pg_dir("m-hot-2");
    let err = env.mount_refused(
        &["--tablespace", "hot", "--cluster", "c1"],
        &hot_b,
        &elsewhere,
    );
    assert!(err.contains("in use by a running `tde mount`"), "{err}");

    // Rewrap the cold one offline: now version 1 can go.
    let out = env.ok(&["rewrap", &cold_b.to_string_lossy()]);
    assert_eq!(out["rewrapped"][0]["to"], 2, "{out}");
    assert_eq!(keyfile_mek_versions(&cold_b), [2]);
    let again = env.ok(&["rewrap", &cold_b.to_string_lossy()]);
    assert_eq!(again["rewrapped"].as_array().map(Vec::len), Some(0));
    env.ok(&["key", "destroy", "pg-main", "--version", "1", "--yes"]);
    // The cold tablespace still mounts under version 2.
    env.mount(
        &["--tablespace", "cold", "--cluster", "c1"],
        &cold_b,
        &cold_m,
    )
    .stop();

    // A file-level backup of it, rewrapped, is registered under its own
    // location: the next rotation's old version is then protected for the
    // backup as well as for the original.
    let backup = env.pg_dir("b-cold-backup");
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", cold_b.display()))
        .arg(&backup)
        .status()
        .expect("cp");
    assert!(st.success());
    env.ok(&["rewrap", &backup.to_string_lossy()]);
    env.ok(&["key", "rotate", "pg-main"]);
    wait_rewrapped(&hot_b, 3, Duration::from_secs(10));
    let msg = env.refused(
        &["key", "destroy", "pg-main", "--version", "2", "--yes"],
        "KEY_IN_USE",
    );
    assert!(
        msg.contains(&format!("at {})", cold_b.display()))
            && msg.contains(&format!("at {})", backup.display())),
        "{msg}"
    );

    // --force overrides (the tablespace is gone), and the audit says so.
    _other.stop();
    env.ok(&["key", "rotate", "pg-other"]);
    env.refused(
        &["key", "destroy", "pg-other", "--version", "1", "--yes"],
        "KEY_IN_USE",
    );
    env.ok(&[
        "key",
        "destroy",
        "pg-other",
        "--version",
        "1",
        "--yes",
        "--force",
    ]);
    let records = audit(&env.db());
    assert!(count(&records, "register_deks", "ok") >= 4);
    assert!(records.iter().any(|r| r["op"] == "key_destroy"
        && r["result"] == "ok"
        && r["detail"].as_str().is_some_and(
            |d| d.starts_with("forced while in use by: ") && d.contains("tablespace=other")
        )));
}

/// Must-show 6: a rotation policy of 3 s rotates on schedule, and every
/// mount follows.
#[test]
fn automatic_rotation_every_mount_follows() {
    if !can_run() {
        return;
    }
    let env = Env::new("");
    let _sidecar = env.sidecar_with_keys(&[]);
    let k = env.ok(&["key", "create", "pg-auto", "--rotate-after", "3s"]);
    assert_eq!(k["rotate_after_seconds"], 3);
    let mut mounts = Vec::new();
    let mut backings = Vec::new();
    for n in ["a1", "a2"] {
        let (b, m) = (env.pg_dir(&format!("b-{n}")), env.pg_dir(&format!("m-{n}")));
        mounts.push(env.mount_init("pg-auto", n, &b, &m));
        backings.push(b);
    }
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(10));
    let p = primary(&env, "pg-auto");
    assert!(
        (3..=5).contains(&p),
        "about one rotation per 3 s in {:?}: primary v{p}",
        start.elapsed()
    );
    for b in &backings {
        wait_rewrapped(b, primary(&env, "pg-auto"), Duration::from_secs(5));
    }
    let records = audit(&env.db());
    assert!(count(&records, "auto_rotate", "ok") >= 2);
    // Turned off, it stays put.
    env.ok(&["key", "set-rotation", "pg-auto", "off"]);
    let p = primary(&env, "pg-auto");
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(primary(&env, "pg-auto"), p);
    drop(mounts);
}
