//! Issue 9: what reaches a running mount from outside. Zeroization (and a
//! seal, as configured) wipes its keys at once; `tde umount` returns only
//! when the mount is gone; a panic in a handler is contained.

mod common;

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use common::Env;
use common::pg::*;

/// Reads 8 KiB at offset 0 of `p`, bypassing the page cache.
fn direct_read(p: &Path) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(p)?;
    let mut store = vec![0u8; 8192 + 4096];
    let off = store.as_ptr().align_offset(4096);
    f.read_exact_at(&mut store[off..off + 8192], 0)
}

/// How long until reading `p` (through the page cache, and around it)
/// fails with EIO; panics after `limit`.
fn time_to_eio(p: &Path, start: Instant, limit: Duration) -> Duration {
    loop {
        let cached = std::fs::read(p);
        let eio = |e: Option<&std::io::Error>| {
            e.is_some_and(|e| e.raw_os_error() == Some(rustix::io::Errno::IO.raw_os_error()))
        };
        if eio(cached.as_ref().err()) && eio(direct_read(p).as_ref().err()) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{} still reads {:?} after {limit:?}",
            p.display(),
            cached.map(|d| d.len())
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Zeroization under pgbench: both mounts attached to the sidecar turn
/// every read into EIO within a second (also of data in the page cache),
/// pgbench fails, and neither can be mounted again.
#[test]
fn zeroize_turns_every_mount_into_eio_within_a_second() {
    if !can_run() {
        return;
    }
    let _serial = serial();
    let env = Env::new("");
    let _sidecar = env.sidecar_with_keys(&["pg-main"]);
    let (hot_backing, hot, hot_mount, mut pg) = tablespace(&env, "pg-main", "hot");
    let cold_backing = env.pg_dir("backing-cold");
    let cold = env.pg_dir("mnt-cold");
    let cold_mount = env.mount_init("pg-main", "cold", &cold_backing, &cold);
    pg.pgbench_init(3, "hot");
    // A file on each mount, read once so its pages are cached.
    for m in [&hot, &cold] {
        std::fs::write(m.join("probe"), vec![7u8; 64 << 10]).expect("probe");
        assert_eq!(
            std::fs::read(m.join("probe")).expect("read").len(),
            64 << 10
        );
    }
    let bench = pg.pgbench_spawn(&["-n", "-c", "4", "-j", "2", "-T", "20"]);
    std::thread::sleep(Duration::from_secs(3));
    env.ok(&["zeroize", "--yes"]);
    let start = Instant::now();
    for m in [&hot, &cold] {
        let t = time_to_eio(&m.join("probe"), start, Duration::from_secs(1));
        eprintln!("{}: EIO {t:?} after zeroize returned", m.display());
    }
    let out = bench.wait_with_output().expect("pgbench");
    assert!(
        !out.status.success() || failed_transactions(&out) > 0,
        "pgbench went on after zeroization"
    );
    for m in [&hot_mount, &cold_mount] {
        let log = std::fs::read_to_string(&m.log).expect("log");
        assert!(log.contains("data keys are wiped"), "{log}");
    }
    pg.kill9();
    drop((hot_mount, cold_mount));
    let e = env.mount_refused(
        &["--tablespace", "hot", "--cluster", "c1"],
        &hot_backing,
        &hot,
    );
    assert!(e.contains("zeroized"), "{e}");
}

/// `tde seal` keeps mounts serving by default (availability) and wipes
/// them with `mounts.on_seal = "wipe"` (containment).
#[test]
fn seal_keeps_or_wipes_mounts_as_configured() {
    if !can_run() {
        return;
    }
    let _serial = serial();
    for (extra, wipes) in [("", false), ("[mounts]\non_seal = \"wipe\"\n", true)] {
        let env = Env::new(extra);
        let shares = env.init();
        let sidecar = env.serve();
        env.unseal(&shares[..3]);
        env.ok(&["key", "create", "pg-main"]);
        let (backing, mnt) = (env.pg_dir("backing"), env.pg_dir("mnt"));
        let m = env.mount_init("pg-main", "ts", &backing, &mnt);
        std::fs::write(mnt.join("f"), vec![1u8; 100_000]).expect("write");
        // A restart is not a seal: the restarted sidecar is sealed, and the
        // mount keeps its keys whatever on_seal says.
        sidecar.stop();
        let _sidecar = env.serve();
        std::thread::sleep(Duration::from_secs(3));
        direct_read(&mnt.join("f")).expect("a restart revokes nothing");
        env.unseal(&shares[..3]);
        // The mount retries every 2 s while the sidecar is sealed: let it
        // reconnect and wait on its key again.
        std::thread::sleep(Duration::from_secs(3));
        env.ok(&["seal"]);
        let start = Instant::now();
        if wipes {
            time_to_eio(&mnt.join("f"), start, Duration::from_secs(1));
            let log = std::fs::read_to_string(&m.log).expect("log");
            assert!(log.contains("KEYS_REVOKED"), "{log}");
        } else {
            std::thread::sleep(Duration::from_secs(1));
            direct_read(&mnt.join("f")).expect("a sealed sidecar's mounts keep serving");
            std::fs::write(mnt.join("g"), b"still writable").expect("write while sealed");
        }
        env.unseal(&shares[..3]);
        m.stop();
        // Either way the tablespace mounts again once unsealed.
        let _m = env.mount(&["--tablespace", "ts", "--cluster", "c1"], &backing, &mnt);
        assert_eq!(
            std::fs::read(mnt.join("f")).expect("read"),
            vec![1u8; 100_000]
        );
    }
}

/// `tde umount` returns when the mount process is done: mounting the same
/// backing directory right after succeeds, 100 times.
#[test]
fn umount_then_mount_a_hundred_times() {
    if !can_run() {
        return;
    }
    let _serial = serial();
    let env = Env::new("");
    let _sidecar = env.sidecar_with_keys(&["pg-main"]);
    let (backing, mnt) = (env.pg_dir("backing"), env.pg_dir("mnt"));
    drop(env.mount_init("pg-main", "ts", &backing, &mnt));
    let started = Instant::now();
    for i in 0..100 {
        let out = env
            .cmd(&["mount", "--daemon", "--tablespace", "ts", "--cluster", "c1"])
            .arg(&backing)
            .arg(&mnt)
            .output()
            .expect("tde mount");
        assert!(
            out.status.success(),
            "round {i}: tde mount refused right after tde umount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(mnt.join(format!("f{i}")), format!("round {i}")).expect("write");
        if i > 0 {
            assert_eq!(
                std::fs::read_to_string(mnt.join(format!("f{}", i - 1))).expect("read"),
                format!("round {}", i - 1)
            );
        }
        let out = env.cmd(&["umount"]).arg(&mnt).output().expect("tde umount");
        assert!(
            out.status.success(),
            "round {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!is_mountpoint(&mnt));
        // The lock is free: the mount process is done.
        tde_plugin::keyfile::BackingLock::acquire(&backing)
            .unwrap_or_else(|e| panic!("round {i}: {e:#}"));
    }
    eprintln!("100 mount/umount cycles in {:?}", started.elapsed());
}

/// A panic inside a FUSE handler (injected with a debug-build failpoint) is
/// an I/O error for that request; the mount keeps serving.
#[test]
fn a_panic_in_a_handler_is_an_io_error_and_the_mount_keeps_serving() {
    if !can_run() {
        return;
    }
    let _serial = serial();
    let env = Env::new("");
    let _sidecar = env.sidecar_with_keys(&["pg-main"]);
    let (backing, mnt) = (env.pg_dir("backing"), env.pg_dir("mnt"));
    let m = env.mount_init_env(
        &[("TDE_FAILPOINT", "fuse-read:poison")],
        "pg-main",
        "ts",
        &backing,
        &mnt,
    );
    std::fs::write(mnt.join("poison"), vec![3u8; 20_000]).expect("write");
    std::fs::write(mnt.join("fine"), vec![4u8; 20_000]).expect("write");
    for _ in 0..3 {
        let e = direct_read(&mnt.join("poison")).expect_err("the handler panics");
        assert_eq!(
            e.raw_os_error(),
            Some(rustix::io::Errno::IO.raw_os_error()),
            "{e}"
        );
        direct_read(&mnt.join("fine")).expect("other files still read");
    }
    std::fs::write(mnt.join("after"), b"still writable").expect("write after the panics");
    let log = std::fs::read_to_string(&m.log).expect("log");
    assert!(log.contains("a FUSE handler panicked"), "{log}");
    assert!(is_mountpoint(&mnt));
    m.stop();
}

/// Issue 9 D: a reader hammered with signals makes the kernel send
/// FUSE_INTERRUPTs for its reads; fuser's answers to those whose read was
/// already answered fail with ENOENT, which the kernel expects. The reads
/// all succeed, and the mount's log holds no "Failed to send FUSE reply"
/// (with the log filter of `tde`'s logging removed, this test fails).
#[test]
fn interrupted_reads_succeed_and_leave_no_reply_errors() {
    if !can_run() {
        return;
    }
    let _serial = serial();
    let env = Env::new("");
    let _sidecar = env.sidecar_with_keys(&["pg-main"]);
    let (backing, mnt) = (env.pg_dir("backing"), env.pg_dir("mnt"));
    let m = env.mount_init("pg-main", "ts", &backing, &mnt);
    let data: Vec<u8> = (0..64u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(mnt.join("big"), &data).expect("write");
    let mut signals = 0u64;
    for _ in 0..5 {
        // GNU dd prints its statistics on SIGUSR1 and goes on.
        let mut dd = std::process::Command::new("dd")
            .arg(format!("if={}", mnt.join("big").display()))
            .args(["of=/dev/null", "bs=64K", "iflag=direct"])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("dd");
        // dd installs its handler first thing; do not signal before.
        std::thread::sleep(Duration::from_millis(20));
        let pid = rustix::process::Pid::from_raw(dd.id() as i32).expect("pid");
        while dd.try_wait().expect("wait").is_none() {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::USR1);
            signals += 1;
            std::thread::sleep(Duration::from_micros(200));
        }
        let out = dd.wait_with_output().expect("dd");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "dd: {err}");
        assert!(err.contains("67108864 bytes"), "dd read everything: {err}");
    }
    assert!(signals > 100, "only {signals} signals");
    let log = std::fs::read_to_string(&m.log).expect("log");
    assert!(!log.contains("Failed to send FUSE reply"), "{log}");
    m.stop();
}

/// Issue 12, point 5: `tde mount --daemon` logs to a file (here named by
/// `--log-file`), and a refusal by the sidecar exits 1 as other refusals
/// do, saying why, with `--json` too.
#[test]
fn a_daemonized_mount_logs_to_its_file_and_exits_1_when_refused() {
    if !can_run() {
        return;
    }
    let _serial = serial();
    let env = Env::new("");
    let _sidecar = env.sidecar_with_keys(&["mysql-x"]);
    let backing = env.dir.path().join("backing");
    let mnt = env.dir.path().join("mnt");
    std::fs::create_dir_all(&backing).expect("mkdir");
    std::fs::create_dir_all(&mnt).expect("mkdir");
    let log = env.dir.path().join("mount.log");
    let out = env
        .cmd(&[
            "--json",
            "mount",
            "--daemon",
            "--wait",
            "5",
            "--init",
            "--key",
            "mysql-x",
            "--tablespace",
            "t",
            "--log-file",
        ])
        .arg(&log)
        .arg(&backing)
        .arg(&mnt)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["error"]["code"], "REFUSED", "{v}");
    let message = v["error"]["message"].as_str().expect("message");
    assert!(message.contains("may not use master key"), "{message}");
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(text.contains("may not use master key"), "{text}");
    assert!(!is_mountpoint(&mnt));
}
