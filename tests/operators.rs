//! Issue 12, Vault expectations: operators without a root shell. The admin
//! socket can be given to an operators group (mode 0660); an operator in
//! that group uses it as a normal user (still logging in), one outside it
//! cannot connect.

mod common;

use std::os::unix::process::CommandExt;

use common::*;

const NOBODY: u32 = 65534;

#[test]
fn an_auditor_in_the_operators_group_uses_the_admin_socket_without_root() {
    if !rustix::process::geteuid().is_root() {
        skip("needs root to run the CLI as nobody in another group");
        return;
    }
    // A group every Debian-like system has, that nobody is not in.
    let Ok(Some(group)) = nix::unistd::Group::from_name("daemon") else {
        skip("no group `daemon` here");
        return;
    };
    let env = Env::with_admin_group("daemon");
    let shares = env.init();
    let _daemon = env.serve();
    env.unseal(&shares[..3]);
    env.ok(&["key", "create", "pg-main"]);
    env.ok_new_password(
        &["operator", "add", "audrey", "--role", "auditor"],
        "auditor-password-1",
    );
    let meta = std::fs::metadata(env.admin_socket()).expect("admin socket");
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), group.gid.as_raw());

    let as_nobody = |gid: u32, args: &[&str]| {
        let mut c = env.cmd(args);
        c.uid(NOBODY)
            .gid(gid)
            .env("HOME", "/tmp")
            .env("TDE_PASSWORD", "auditor-password-1")
            .current_dir("/");
        c.output().expect("run tde as nobody")
    };
    // In the group: the auditor lists keys, and may not rotate them.
    let out = as_nobody(
        group.gid.as_raw(),
        &["key", "list", "--operator", "audrey", "--json"],
    );
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v[0]["name"], "pg-main", "{v}");
    let out = as_nobody(
        group.gid.as_raw(),
        &["key", "rotate", "pg-main", "--operator", "audrey"],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("role auditor may not"), "{err}");
    assert!(
        err.contains("operator's role"),
        "the hint is about roles: {err}"
    );
    // Still a login: a wrong password is refused.
    let mut c = env.cmd(&["key", "list", "--operator", "audrey"]);
    c.uid(NOBODY)
        .gid(group.gid.as_raw())
        .env("TDE_PASSWORD", "wrong")
        .current_dir("/");
    let out = c.output().expect("run");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    // Outside the group: no connection at all.
    let out = as_nobody(NOBODY, &["key", "list", "--operator", "audrey"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Permission denied"), "{err}");
}
