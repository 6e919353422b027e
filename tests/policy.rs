//! Issue 12, points 1 and 2: client policies by user and group name
//! (resolved through NSS), `tde policy check`, and reloading the
//! configuration (SIGHUP and `tde reload`) while a mount and a client keep
//! working, with a bad configuration kept out.

mod common;

use std::time::{Duration, Instant};

use common::pg::*;
use common::*;
use tde_protocol::{ErrorCode, Request, Response};

const NOBODY: u32 = 65534;

fn me() -> String {
    let uid = rustix::process::getuid().as_raw();
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map_or_else(|| uid.to_string(), |u| u.name)
}

/// The name of gid 65534 here (`nogroup` on Debian, `nobody` elsewhere).
fn nobody_group() -> String {
    nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(NOBODY))
        .ok()
        .flatten()
        .map_or_else(|| NOBODY.to_string(), |g| g.name)
}

/// Runs `tde policy check ARGS --json`: the exit code and the answer.
fn check(env: &Env, args: &[&str]) -> (i32, serde_json::Value) {
    let mut all = vec!["policy", "check"];
    all.extend_from_slice(args);
    env.json(&all)
}

#[test]
fn policy_check_says_which_policy_applies_and_why() {
    let group = nobody_group();
    let env = Env::new(&format!(
        r#"[[clients]]
name = "by-group"
groups = ["{group}"]
keys = ["pg-*"]
operations = ["decrypt"]
context = {{ cluster = "c1" }}
"#
    ));
    let me = me();

    // The runner's own policy names it by user name.
    let (rc, v) = check(&env, &["--user", &me, "--key", "pg-main"]);
    assert_eq!(rc, 0, "{v}");
    assert_eq!(v["client"], "app", "{v}");
    assert_eq!(v["allowed"], true, "{v}");
    let because = v["because"].as_str().expect("because");
    assert!(because.contains(&format!("user \"{me}\"")), "{v}");
    assert_eq!(v["operations"].as_array().map(Vec::len), Some(3), "{v}");

    if me != "nobody" {
        // A peer in the group, with the required context.
        let (rc, v) = check(
            &env,
            &[
                "--user",
                "nobody",
                "--group",
                &group,
                "--key",
                "pg-main",
                "--operation",
                "decrypt",
                "--context",
                "cluster=c1",
            ],
        );
        assert_eq!(rc, 0, "{v}");
        assert_eq!(v["client"], "by-group", "{v}");
        assert!(
            v["because"]
                .as_str()
                .is_some_and(|b| b.contains(&format!("group \"{group}\""))),
            "{v}"
        );
        // Without the context, with another key, another operation.
        for (args, why) in [
            (
                vec!["--operation", "decrypt"],
                "requires encryption context",
            ),
            (
                vec!["--operation", "decrypt", "--context", "cluster=c2"],
                "requires encryption context",
            ),
            (
                vec![
                    "--operation",
                    "generate_data_key",
                    "--context",
                    "cluster=c1",
                ],
                "may not call generate_data_key",
            ),
        ] {
            let mut a = vec!["--user", "nobody", "--group", group.as_str()];
            a.extend(["--key", "pg-main"]);
            a.extend(args.iter().copied());
            let (rc, v) = check(&env, &a);
            assert_eq!(rc, 1, "{a:?}: {v}");
            assert_eq!(v["allowed"], false, "{v}");
            let reason = v["operations"][0]["reason"].as_str().unwrap_or("");
            assert!(reason.contains(why), "{a:?}: {v}");
        }
        let (rc, v) = check(
            &env,
            &[
                "--user",
                "nobody",
                "--group",
                &group,
                "--key",
                "mysql-1",
                "--operation",
                "decrypt",
                "--context",
                "cluster=c1",
            ],
        );
        assert_eq!(rc, 1, "{v}");
        assert!(
            v["operations"][0]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("may not use master key")),
            "{v}"
        );
    }

    // A peer no policy covers; the human form says so too.
    let (rc, v) = check(
        &env,
        &["--user", "4242", "--group", "4242", "--key", "pg-main"],
    );
    assert_eq!(rc, 1, "{v}");
    assert!(v["client"].is_null(), "{v}");
    let out = env
        .cmd(&[
            "policy", "check", "--user", "4242", "--group", "4242", "--key", "pg-main",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("no client policy covers uid 4242 gid 4242"),
        "{text}"
    );
    assert!(text.contains("matches no client policy"), "{text}");

    // An unknown user, here or in the configuration, is an error (exit 2),
    // and a daemon with such a policy does not start.
    let (rc, _) = check(&env, &["--user", "no-such-user-tde", "--key", "pg-main"]);
    assert_eq!(rc, 2);
    let bad = Env::new(
        r#"[[clients]]
name = "typo"
users = ["postgress-typo"]
keys = ["*"]
operations = ["decrypt"]
"#,
    );
    let (rc, _) = check(&bad, &["--user", "root", "--key", "k"]);
    assert_eq!(rc, 2);
    bad.init();
    let out = bad.cmd(&["serve"]).output().expect("run tde serve");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("client \"typo\": user \"postgress-typo\" not found"),
        "{err}"
    );
}

/// Waits until `log` contains `needle` `n` times.
fn wait_log(log: &std::path::Path, needle: &str, n: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.matches(needle).count() >= n {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the log:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn random(raw: &mut Raw) -> Result<(), ErrorCode> {
    match raw.call(&Request::GenerateRandom { length: 16 }) {
        Response::Random { .. } => Ok(()),
        Response::Error { code, .. } => Err(code),
        other => panic!("unexpected {other:?}"),
    }
}

fn data_key(raw: &mut Raw) -> Result<(), ErrorCode> {
    match raw.call(&Request::GenerateDataKey {
        key: "app-1".into(),
        context: ctx(&[("app", "x")]),
    }) {
        Response::DataKey { .. } => Ok(()),
        Response::Error { code, .. } => Err(code),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn reload_changes_policies_live_and_keeps_a_bad_configuration_out() {
    let with_mount = can_run();
    let _serial = with_mount.then(serial);
    let env = Env::new("");
    let daemon = env.sidecar_with_keys(&["pg-main", "app-1"]);
    let mount = with_mount.then(|| {
        let backing = env.dir.path().join("backing");
        let mnt = env.dir.path().join("mnt");
        std::fs::create_dir_all(&backing).expect("mkdir");
        std::fs::create_dir_all(&mnt).expect("mkdir");
        let m = env.mount_init("pg-main", "ts1", &backing, &mnt);
        std::fs::write(mnt.join("before"), b"written before the reload").expect("write");
        (m, mnt)
    });
    // A client connected before the reload, kept open across it.
    let mut raw = Raw::connect(&env.data_socket());
    assert_eq!(random(&mut raw), Ok(()));
    assert_eq!(data_key(&mut raw), Ok(()));

    // 1. SIGHUP with a policy that no longer allows generate_random.
    let original = std::fs::read_to_string(&env.config).expect("config");
    let narrowed = original.replace(
        r#"operations = ["generate_data_key", "decrypt", "re_encrypt", "generate_random"]"#,
        r#"operations = ["generate_data_key", "decrypt", "re_encrypt"]"#,
    );
    assert_ne!(narrowed, original);
    std::fs::write(&env.config, &narrowed).expect("write config");
    let pid = rustix::process::Pid::from_raw(daemon.pid() as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).expect("SIGHUP");
    let log = wait_log(&env.log(), "SIGHUP: configuration reloaded", 1);
    assert!(log.contains("clients: 1 policies (app)"), "{log}");
    assert_eq!(random(&mut raw), Err(ErrorCode::PermissionDenied));
    assert_eq!(data_key(&mut raw), Ok(()), "the same connection goes on");
    if let Some((_, mnt)) = &mount {
        assert_eq!(
            std::fs::read(mnt.join("before")).expect("read"),
            b"written before the reload"
        );
        std::fs::write(mnt.join("after"), b"written after").expect("write");
        let f = std::fs::File::open(mnt.join("after")).expect("open");
        f.sync_all().expect("fsync");
    }

    // 2. A configuration that does not parse, then one naming an unknown
    // user: both kept out, the old policy stays in force, the daemon runs.
    std::fs::write(&env.config, format!("{narrowed}\n[[clients]\n")).expect("write");
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).expect("SIGHUP");
    let log = wait_log(&env.log(), "SIGHUP: configuration not reloaded", 1);
    assert!(log.contains("the old one stays in force"), "{log}");
    let unknown = format!(
        "{narrowed}\n[[clients]]\nname = \"x\"\nusers = [\"no-such-user-tde\"]\nkeys = [\"*\"]\noperations = [\"generate_random\"]\n"
    );
    std::fs::write(&env.config, &unknown).expect("write");
    let (rc, v) = env.json(&["reload"]);
    assert_eq!(rc, 1, "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or("");
    assert!(msg.contains("not reloaded"), "{v}");
    assert!(msg.contains("no-such-user-tde"), "{v}");
    assert_eq!(random(&mut raw), Err(ErrorCode::PermissionDenied));
    assert_eq!(data_key(&mut raw), Ok(()));

    // 3. `tde reload` puts generate_random back, and names what needs a
    // restart instead of pretending it changed.
    let restored = original.replace("mode = \"0666\"", "mode = \"0660\"");
    std::fs::write(&env.config, &restored).expect("write");
    let v = env.ok(&["reload"]);
    let changes = v["changes"].as_str().expect("changes");
    assert!(changes.contains("clients: 1 policies (app)"), "{v}");
    assert!(
        changes.contains("not applied until a restart: data_socket"),
        "{v}"
    );
    assert_eq!(random(&mut raw), Ok(()));
    // An auditor may not reload.
    env.ok_new_password(
        &["operator", "add", "audrey", "--role", "auditor"],
        "auditor-password-1",
    );
    let out = env
        .cmd(&["reload", "--operator", "audrey"])
        .env("TDE_PASSWORD", "auditor-password-1")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("may not reload the configuration"), "{err}");
    assert!(err.contains("role"), "{err}");
    assert!(
        !err.contains("[[clients]]"),
        "the hint points at roles: {err}"
    );

    if let Some((m, mnt)) = mount {
        assert_eq!(
            std::fs::read(mnt.join("after")).expect("read"),
            b"written after"
        );
        m.stop();
    }
    daemon.stop();
    let records = audit(&env.db());
    assert_eq!(count(&records, "reload", "ok"), 2, "SIGHUP and tde reload");
    assert_eq!(
        refusals(&records, "reload", "INVALID_ARGUMENT"),
        1,
        "bad tde reload"
    );
    assert_eq!(
        refusals(&records, "reload", "PERMISSION_DENIED"),
        1,
        "the auditor"
    );
    assert_eq!(
        records
            .iter()
            .filter(|r| r["op"] == "reload"
                && r["result"] == "error"
                && r["detail"]
                    .as_str()
                    .is_some_and(|d| d.starts_with("SIGHUP")))
            .count(),
        1,
        "the bad SIGHUP"
    );
    assert!(
        records
            .iter()
            .any(|r| r["op"] == "reload" && r["actor"]["operator"] == "admin"),
        "tde reload is recorded with its operator"
    );
}
