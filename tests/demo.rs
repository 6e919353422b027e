//! Issue 3, must-show 7: `tde demo` runs start to finish and leaves no
//! process, mount or temporary directory behind; issue 11: also as a
//! normal user, and when a part cannot run it says what it skipped.

mod common;

use common::pg::{can_run, can_run_as_normal_user, serial};

fn root() -> bool {
    rustix::process::geteuid().is_root()
}

fn leftovers(dir: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    found.extend(
        mounts
            .lines()
            .filter(|l| l.contains(dir))
            .map(|l| format!("mount: {l}")),
    );
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(dir) {
            found.push(format!("process: {cmd}"));
        }
    }
    if std::path::Path::new(dir).exists() {
        found.push(format!("directory: {dir}"));
    }
    found
}

/// Runs `cmd` (a `tde demo`), asserts it succeeded and left nothing
/// behind; returns its output.
fn run_demo(mut cmd: std::process::Command) -> String {
    let out = cmd
        .arg("demo")
        .env_remove("TDE_CONFIG")
        .env_remove("TDE_DATA_DIR")
        .output()
        .expect("run tde demo");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = text
        .split_whitespace()
        .find(|w| w.contains("/tde-demo-"))
        .map(|w| w.trim_end_matches(['.', ',']).to_string())
        .expect("the demo names its directory");
    let dir = dir
        .split("/tde-demo-")
        .next()
        .map(|p| format!("{p}/tde-demo-"))
        .unwrap_or_default()
        + dir
            .split("/tde-demo-")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .unwrap_or_default();
    assert_eq!(leftovers(&dir), Vec::<String>::new());
    text
}

const WHOLE_RUN: [&str; 11] = [
    "CONTEXT_MISMATCH",
    "INVALID_CIPHERTEXT",
    "KEY_DISABLED",
    "number of failed transactions: 0",
    "the marker appears 0 times",
    "the key file was rewrapped",
    "blocks re-encrypted; pgbench meanwhile: number of failed transactions: 0",
    "per data key version: {2: ",
    "SHA-256 chain intact",
    "ran: the encrypted tablespace with PostgreSQL 15",
    "Nothing is left running",
];

#[test]
fn demo_runs_and_leaves_nothing_behind() {
    if !can_run() {
        return;
    }
    let _serial = serial();
    let text = run_demo(std::process::Command::new(common::BIN));
    for expected in WHOLE_RUN {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    assert!(!text.contains("skipped"), "{text}");
}

/// `tde demo` as a normal user (`nobody` when the tests run as root, else
/// the test runner), from a directory it can write.
fn as_normal_user(tmp: &std::path::Path) -> std::process::Command {
    use std::os::unix::process::CommandExt;
    let mut c = std::process::Command::new(common::BIN);
    if root() {
        std::os::unix::fs::chown(tmp, Some(65534), Some(65534)).expect("chown");
        c.uid(65534).gid(65534);
    }
    c.current_dir(tmp).env("TMPDIR", tmp).env("HOME", tmp);
    c
}

/// Issue 11, must-show 1: as a normal user the demo runs every step
/// (initdb and PostgreSQL as that user, the mount through fusermount3).
#[test]
fn demo_as_a_normal_user_runs_every_step() {
    if !can_run_as_normal_user() {
        return;
    }
    let _serial = serial();
    let tmp = tempfile::tempdir().expect("tmp");
    let text = run_demo(as_normal_user(tmp.path()));
    for expected in WHOLE_RUN {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
}

/// Issue 11, must-show 2: without fusermount3 a normal user's demo runs the
/// custody part, says in one line what it skipped, why and how to get it,
/// and exits 0 with the summary.
#[test]
fn demo_without_fusermount3_says_what_it_skipped() {
    if !can_run() {
        return;
    }
    let _serial = serial();
    let tmp = tempfile::tempdir().expect("tmp");
    let mut c = as_normal_user(tmp.path());
    c.env("PATH", "/nonexistent");
    let text = run_demo(c);
    for expected in [
        "KEY_DISABLED",
        "SHA-256 chain intact",
        "skipped: the encrypted tablespace with PostgreSQL",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    let line = text
        .lines()
        .find(|l| l.starts_with("(skipped)"))
        .unwrap_or_else(|| panic!("no skip line in:\n{text}"));
    assert!(
        line.contains("fusermount3")
            && line.contains("install the fuse3 package")
            && line.contains("It would have mounted"),
        "{line}"
    );
    assert!(!text.contains("ran: the encrypted tablespace"), "{text}");
}
