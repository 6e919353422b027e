//! Issue 4, DEK re-key: must-show 2 (pgbench during a full re-key of a
//! 1 GB tablespace; afterwards no block under the old version and the old
//! version gone from the key file) and 3 (kill -9 of the mount at five
//! random moments during a re-key; it resumes and finishes; same data;
//! amcheck clean).

mod common;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use common::pg::*;
use common::{Env, audit};

/// `tde inspect --json`: blocks per data key version.
fn versions(env: &Env, backing: &Path) -> serde_json::Map<String, serde_json::Value> {
    env.ok(&["inspect", &backing.to_string_lossy()])["versions"]
        .as_object()
        .expect("versions")
        .clone()
}

fn keyfile_dek_versions(backing: &Path) -> Vec<u64> {
    keyfile_deks(backing).into_iter().map(|(v, _)| v).collect()
}

fn rekey_status(env: &Env, mnt: &Path) -> serde_json::Value {
    env.ok(&["rekey", &mnt.to_string_lossy(), "--status"])
}

/// Must-show 2.
#[test]
fn full_rekey_of_a_gigabyte_under_pgbench() {
    if !can_run() {
        return;
    }
    let _serial = serial();
    let env = Env::new("");
    let _sidecar = env.sidecar_with_keys(&["pg-main"]);
    let (backing, mnt, _mount, pg) = tablespace(&env, "pg-main", "ts");
    // Scale 68: about 1 GB of tables and indexes in the tablespace.
    pg.pgbench_init(68, "ts");
    pg.sql(&["CHECKPOINT"]);
    let before = versions(&env, &backing);
    let blocks: u64 = before.values().map(|n| n.as_u64().expect("n")).sum();
    assert!(
        blocks * 8192 > 1_000_000_000,
        "the tablespace holds {blocks} blocks, short of 1 GB"
    );
    assert_eq!(before.keys().collect::<Vec<_>>(), ["1"]);

    let bench = pg.pgbench_spawn(&["-c", "8", "-j", "2", "-T", "45"]);
    std::thread::sleep(Duration::from_secs(3));
    let started = Instant::now();
    // Follows the progress to the end (log lines: not a terminal).
    let out = env
        .cmd(&["rekey", &mnt.to_string_lossy(), "--rate", "150MB/s"])
        .output()
        .expect("tde rekey");
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("every block is under data key v2"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let run = bench.wait_with_output().expect("pgbench");
    assert!(
        run.status.success(),
        "pgbench failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        took < Duration::from_secs(42),
        "the re-key ({took:?}) ran inside the pgbench run"
    );
    assert_eq!(failed_transactions(&run), 0);
    assert!(processed(&run) > 100);
    eprintln!(
        "re-key of {blocks} blocks ({} MB) under pgbench took {took:?}; pgbench: {} transactions, 0 failed",
        blocks * 8224 / 1_000_000,
        processed(&run)
    );

    // No block under version 1, read from the block trailers; the key file
    // holds version 2 only; the checkpoint is gone.
    let after = versions(&env, &backing);
    assert_eq!(after.keys().collect::<Vec<_>>(), ["2"], "{after:?}");
    // Every file header was re-sealed too (a header under v1 could not be
    // checked once v1 is gone).
    let headers = env.ok(&["inspect", &backing.to_string_lossy()])["headers"].clone();
    assert_eq!(
        headers
            .as_object()
            .map(|h| h.keys().cloned().collect::<Vec<_>>()),
        Some(vec!["2".to_string()]),
        "{headers}"
    );
    assert_eq!(keyfile_dek_versions(&backing), [2]);
    assert!(!backing.join("tde.rekey").exists());
    let st = rekey_status(&env, &mnt);
    assert_eq!(st["state"], "done");
    assert_eq!(st["old_versions"], serde_json::json!([1]));
    // The registry no longer lists data key v1.
    let show = env.ok(&["key", "show", "pg-main"]);
    let used = &show["versions"][0]["used_by"];
    assert_eq!(used.as_array().map(Vec::len), Some(1), "{show}");
    assert_eq!(used[0]["dek_version"], 2);
    pg.amcheck();
}

/// Must-show 3.
#[test]
fn rekey_survives_five_mount_kills() {
    if !can_run() {
        return;
    }
    let _serial = serial();
    let env = Env::new("");
    let _sidecar = env.sidecar_with_keys(&["pg-main"]);
    let args = ["--tablespace", "ts", "--cluster", "c1"];
    let (backing, mnt, mount, mut pg) = tablespace(&env, "pg-main", "ts");
    pg.pgbench_init(10, "ts");
    pg.sql(&[
        "CREATE TABLE t (id int primary key, v text) TABLESPACE ts",
        "INSERT INTO t SELECT g, 'row-' || g FROM generate_series(1, 100000) g",
        "CHECKPOINT",
    ]);
    let before = pg.sql(&[T_AND_ACCOUNTS_CHECKSUM]);
    let started = env.ok(&[
        "rekey",
        &mnt.to_string_lossy(),
        "--rate",
        "8MB/s",
        "--no-wait",
    ]);
    assert_eq!(started["state"], "running");
    assert_eq!(started["target_version"], 2);

    let mut mount = mount;
    let mut seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("time")
        .subsec_nanos() as u64;
    let mut kills = 0;
    let mut resumed_at = Vec::new();
    for _ in 0..5 {
        // A random moment 0.5-3.0 s into this stretch of the re-key.
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let wait = Duration::from_millis(500 + (seed >> 33) % 2500);
        std::thread::sleep(wait);
        assert!(
            backing.join("tde.rekey").exists(),
            "the re-key (8 MB/s) outlasts five kills"
        );
        mount.kill9();
        kills += 1;
        pg.kill9();
        let ck: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(backing.join("tde.rekey")).expect("checkpoint after a kill"),
        )
        .expect("checkpoint json");
        assert_eq!(ck["target"], 2);
        resumed_at.push((ck["pass"].clone(), ck["blocks_done"].clone()));
        // Both versions are still in the key file.
        assert_eq!(keyfile_dek_versions(&backing), [1, 2]);
        mount = env.mount(&args, &backing, &mnt);
        pg.start();
        let st = rekey_status(&env, &mnt);
        assert!(
            matches!(st["state"].as_str(), Some("running" | "done")),
            "resumed by itself: {st}"
        );
        assert_eq!(
            pg.sql(&[T_AND_ACCOUNTS_CHECKSUM]),
            before,
            "data intact after kill {kills}"
        );
    }
    eprintln!(
        "mount killed {kills} times during the re-key; checkpoints (pass, blocks done) at {resumed_at:?}"
    );
    assert_eq!(kills, 5, "the re-key was killed mid-way five times");
    // Progress was kept between kills, not restarted.
    assert!(
        resumed_at
            .windows(2)
            .all(|w| (w[1].0.as_u64(), w[1].1.as_u64()) >= (w[0].0.as_u64(), w[0].1.as_u64())),
        "{resumed_at:?}"
    );
    if backing.join("tde.rekey").exists() {
        // Lift the throttle and follow it to the end.
        let out = env
            .cmd(&["rekey", &mnt.to_string_lossy(), "--rate", "unlimited"])
            .output()
            .expect("tde rekey");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while backing.join("tde.rekey").exists() {
        assert!(Instant::now() < deadline, "re-key did not finish");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(versions(&env, &backing).keys().collect::<Vec<_>>(), ["2"]);
    assert_eq!(keyfile_dek_versions(&backing), [2]);
    assert_eq!(pg.sql(&[T_AND_ACCOUNTS_CHECKSUM]), before);
    pg.amcheck();
    // The mount told the sidecar's audit log when the re-key started and
    // when it finished.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reports: Vec<String> = audit(&env.db())
            .iter()
            .filter(|r| r["op"] == "rekey_report" && r["result"] == "ok" && r["key"] == "pg-main")
            .filter_map(|r| r["detail"].as_str().map(str::to_string))
            .collect();
        if ["started", "finished"].iter().all(|s| {
            reports
                .iter()
                .any(|d| d.contains(&format!("to data key v2: {s}")))
        }) {
            break;
        }
        assert!(Instant::now() < deadline, "re-key reports: {reports:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // And once more from cold: stop, unmount, mount, start.
    pg.stop();
    mount.stop();
    let _mount = env.mount(&args, &backing, &mnt);
    pg.start();
    assert_eq!(pg.sql(&[T_AND_ACCOUNTS_CHECKSUM]), before);
}
