//! Issue 3, must-show 7: `tde demo` runs start to finish and leaves no
//! process, mount or temporary directory behind.

mod common;

use common::pg::{can_run, serial};

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

#[test]
fn demo_runs_and_leaves_nothing_behind() {
    if !can_run() {
        return;
    }
    let _serial = serial();
    let out = std::process::Command::new(common::BIN)
        .arg("demo")
        .env_remove("TDE_CONFIG")
        .env_remove("TDE_DATA_DIR")
        .output()
        .expect("run tde demo");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "CONTEXT_MISMATCH",
        "INVALID_CIPHERTEXT",
        "KEY_DISABLED",
        "number of failed transactions: 0",
        "the marker appears 0 times",
        "the key file was rewrapped",
        "blocks re-encrypted; pgbench meanwhile: number of failed transactions: 0",
        "per data key version: {2: ",
        "SHA-256 chain intact",
        "Nothing is left running",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
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
}
