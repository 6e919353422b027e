//! Must-show 1, 2, 4 and 8 of the key custody service, through the real
//! `tde` binary and a real `tde serve`.

mod common;

use std::os::unix::process::CommandExt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use common::*;
use tde_hsm::mek::MekRecord;
use tde_hsm::store::{KIND_MASTER_KEY, ObjectStore};

fn b64(v: &serde_json::Value, field: &str) -> Vec<u8> {
    B64.decode(
        v[field]
            .as_str()
            .unwrap_or_else(|| panic!("{field} in {v}")),
    )
    .expect("base64")
}

/// init 5/3 -> serve sealed -> 2 shares stay sealed -> third unseals ->
/// create MEK -> generate, decrypt -> rotate -> re-encrypt to v2 -> both
/// decrypt -> restart and unseal -> both still decrypt. Then no key bytes in
/// the store files or the log, and the audit chain covers every request.
#[test]
fn init_unseal_generate_rotate_rewrap_restart() {
    let env = Env::new("");
    let shares = env.init();
    assert_eq!(shares.len(), 5);
    let daemon = env.serve();

    let st = env.status();
    assert_eq!(
        (st["sealed"].as_bool(), st["initialized"].as_bool()),
        (Some(true), Some(true))
    );
    env.refused(&["key", "list"], "SEALED");
    assert_eq!(env.ok(&["unseal", &shares[0]])["progress"], 1);
    let st = env.ok(&["unseal", &shares[3]]);
    assert_eq!(
        (st["sealed"].as_bool(), st["progress"].as_u64()),
        (Some(true), Some(2))
    );
    let st = env.ok(&["unseal", &shares[1]]);
    assert_eq!(st["sealed"], false);

    let k = env.ok(&["key", "create", "pg-main", "--description", "cluster 1"]);
    assert_eq!(k["primary_version"], 1);
    let ctx = ["--context", "tablespace=sales", "--context", "cluster=c1"];
    let mut gen_args = vec!["datakey", "generate", "--key", "pg-main"];
    gen_args.extend(ctx);
    let g = env.ok(&gen_args);
    assert_eq!(g["key_version"], 1);
    let dek = b64(&g, "plaintext");
    assert_eq!(dek.len(), 32);
    let v1 = g["ciphertext"].as_str().expect("ct").to_string();

    let decrypt = |ct: &str| {
        let mut a = vec!["datakey", "decrypt", "--ciphertext", ct];
        a.extend(ctx);
        env.ok(&a)
    };
    let d = decrypt(&v1);
    assert_eq!(
        (b64(&d, "plaintext"), d["key_version"].as_u64()),
        (dek.clone(), Some(1))
    );

    assert_eq!(env.ok(&["key", "rotate", "pg-main"])["primary_version"], 2);
    let mut re = vec!["datakey", "re-encrypt", "--ciphertext", &v1];
    re.extend(ctx);
    let r = env.ok(&re);
    assert_eq!(
        (r["source_key_version"].as_u64(), r["key_version"].as_u64()),
        (Some(1), Some(2))
    );
    let v2 = r["ciphertext"].as_str().expect("ct").to_string();
    assert_ne!(v1, v2);
    assert_eq!(b64(&decrypt(&v2), "plaintext"), dek);
    assert_eq!(b64(&decrypt(&v1), "plaintext"), dek);

    // Restart: sealed again, three other shares unseal, both blobs decrypt.
    daemon.stop();
    let daemon = env.serve();
    assert_eq!(env.status()["sealed"], true);
    let st = env.unseal(&shares[2..5]);
    assert_eq!(st["sealed"], false);
    let d1 = decrypt(&v1);
    let d2 = decrypt(&v2);
    assert_eq!(
        (b64(&d1, "plaintext"), d1["key_version"].as_u64()),
        (dek.clone(), Some(1))
    );
    assert_eq!(
        (b64(&d2, "plaintext"), d2["key_version"].as_u64()),
        (dek.clone(), Some(2))
    );
    let info = env.ok(&["key", "show", "pg-main"]);
    assert_eq!(info["versions"].as_array().map(Vec::len), Some(2));
    daemon.stop();

    no_key_material_on_disk(&env, &shares, &[dek]);

    // Must-show 8: the chain is intact and covers every request made above.
    let recs = audit(&env.db());
    assert_eq!(count(&recs, "unseal", "ok"), 6);
    assert_eq!(count(&recs, "generate_data_key", "ok"), 1);
    assert_eq!(count(&recs, "decrypt", "ok"), 5);
    assert_eq!(count(&recs, "re_encrypt", "ok"), 1);
    assert_eq!(count(&recs, "key_create", "ok"), 1);
    assert_eq!(count(&recs, "key_rotate", "ok"), 1);
    assert_eq!(
        count(&recs, "key_rotate", "pending"),
        1,
        "intent record before the change"
    );
    assert_eq!(
        refusals(&recs, "login", "SEALED"),
        1,
        "key list while sealed"
    );
    assert_eq!(count(&recs, "daemon_start", "ok"), 2);
    assert_eq!(count(&recs, "daemon_stop", "ok"), 2);
    let g_rec = recs
        .iter()
        .find(|r| r["op"] == "generate_data_key")
        .expect("gen record");
    assert_eq!(g_rec["key"], "pg-main");
    assert_eq!(g_rec["key_version"], 1);
    assert_eq!(g_rec["context"]["tablespace"], "sales");
    assert_eq!(g_rec["actor"]["client"], "app");
    assert!(g_rec["actor"]["pid"].as_u64().is_some());
}

/// Must-show 4: reconstruct every secret an attacker with the shares could
/// (unseal key, root key, each MEK version) plus the DEKs, and scan the
/// SQLite file, its WAL and shared memory, and the daemon log for them.
fn no_key_material_on_disk(env: &Env, shares: &[String], deks: &[Vec<u8>]) {
    let OpenedStore {
        store,
        unseal,
        root,
        sealer,
    } = open_store(env, shares);
    let mut secrets: Vec<Vec<u8>> = vec![unseal.expose().to_vec(), root.expose().to_vec()];
    secrets.extend(deks.iter().cloned());
    let mut meks = 0;
    for o in store
        .objects()
        .expect("objects")
        .into_iter()
        .filter(|o| o.kind == KIND_MASTER_KEY)
    {
        let pt = sealer
            .open(o.kind, &o.id, o.revision, &o.blob)
            .expect("opens");
        let rec = MekRecord::decode(pt.expose()).expect("record");
        for v in &rec.versions {
            if let Some(m) = v.material() {
                secrets.push(m.expose().to_vec());
                meks += 1;
            }
        }
    }
    assert_eq!(meks, 2, "both MEK versions recovered for the scan");
    drop(store);
    let mut scanned = 0;
    for name in ["tde.db", "tde.db-wal", "tde.db-shm"] {
        let path = env.data_dir().join(name);
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        scanned += 1;
        for s in &secrets {
            assert!(
                !bytes.windows(s.len()).any(|w| w == &s[..]),
                "key bytes found in {name}"
            );
            let hex: String = s.iter().map(|b| format!("{b:02x}")).collect();
            assert!(
                !String::from_utf8_lossy(&bytes).contains(&hex),
                "hex key in {name}"
            );
        }
    }
    assert!(scanned >= 1);
    let log = std::fs::read(env.log()).expect("log");
    assert!(!log.is_empty());
    for s in &secrets {
        assert!(
            !log.windows(s.len()).any(|w| w == &s[..]),
            "key bytes in the log"
        );
        let text = String::from_utf8_lossy(&log);
        assert!(!text.contains(&B64.encode(s)), "base64 key in the log");
    }
}

/// Must-show 2: each refusal has its own code and a message that says why.
#[test]
fn refusals_have_their_own_codes() {
    let env = Env::new("");
    let shares = env.init();
    let _daemon = env.serve();
    env.unseal(&shares[..3]);
    env.ok(&["key", "create", "pg-main"]);
    let g = env.ok(&[
        "datakey",
        "generate",
        "--key",
        "pg-main",
        "--context",
        "tablespace=t1",
    ]);
    let ct = g["ciphertext"].as_str().expect("ct").to_string();

    // A peer whose uid matches no policy (uid 65534) is refused. Running a
    // process as another uid needs root, as in CI.
    let root = rustix::process::geteuid().is_root();
    if root {
        let out = env
            .cmd(&[
                "datakey",
                "decrypt",
                "--json",
                "--ciphertext",
                &ct,
                "--context",
                "tablespace=t1",
            ])
            .uid(65534)
            .gid(65534)
            .output()
            .expect("run as nobody");
        let (rc, v) = parse(&out, &[]);
        assert_eq!(rc, 1, "{v}");
        assert_eq!(v["error"]["code"], "PERMISSION_DENIED", "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .expect("msg")
                .contains("uid 65534"),
            "{v}"
        );
    } else {
        common::skip("its foreign-uid part acts as uid 65534, which needs root");
    }

    let decrypt_refused = |code: &str| {
        env.refused(
            &[
                "datakey",
                "decrypt",
                "--ciphertext",
                &ct,
                "--context",
                "tablespace=t1",
            ],
            code,
        )
    };

    // A key outside the client's key patterns.
    env.ok(&["key", "create", "other"]);
    let m = env.refused(
        &["datakey", "generate", "--key", "other"],
        "PERMISSION_DENIED",
    );
    assert!(m.contains("master key"), "{m}");

    let m = env.refused(
        &[
            "datakey",
            "decrypt",
            "--ciphertext",
            &ct,
            "--context",
            "tablespace=t2",
        ],
        "CONTEXT_MISMATCH",
    );
    assert!(m.contains("context"), "{m}");

    let mut raw = B64.decode(&ct).expect("b64");
    let mid = raw.len() - 20;
    raw[mid] ^= 0x10;
    let flipped = B64.encode(&raw);
    let m = env.refused(
        &[
            "datakey",
            "decrypt",
            "--ciphertext",
            &flipped,
            "--context",
            "tablespace=t1",
        ],
        "INVALID_CIPHERTEXT",
    );
    assert!(m.contains("modified"), "{m}");
    env.refused(
        &[
            "datakey",
            "decrypt",
            "--ciphertext",
            "aGVsbG8=",
            "--context",
            "tablespace=t1",
        ],
        "INVALID_CIPHERTEXT",
    );

    env.ok(&["key", "rotate", "pg-main"]);
    env.ok(&["key", "disable", "pg-main", "--version", "1"]);
    let m = decrypt_refused("KEY_DISABLED");
    assert!(m.contains("version 1 is disabled"), "{m}");

    env.ok(&[
        "key",
        "schedule-destroy",
        "pg-main",
        "--version",
        "1",
        "--days",
        "7",
    ]);
    decrypt_refused("KEY_PENDING_DESTRUCTION");
    env.ok(&["key", "cancel-destroy", "pg-main", "--version", "1"]);
    env.refused(
        &["key", "destroy", "pg-main", "--version", "2", "--yes"],
        "INVALID_KEY_STATE",
    );
    let d = env.ok(&["key", "destroy", "pg-main", "--version", "1", "--yes"]);
    assert_eq!(d["versions"][0]["state"], "destroyed");
    let m = decrypt_refused("KEY_DESTROYED");
    assert!(m.contains("destroyed"), "{m}");
    env.refused(
        &["datakey", "generate", "--key", "pg-nope"],
        "KEY_NOT_FOUND",
    );

    // Admin refusals: no login, wrong role, wrong socket.
    let out = env
        .cmd(&["key", "list", "--json"])
        .env("TDE_PASSWORD", "wrong-password")
        .output()
        .expect("run");
    assert_eq!(parse(&out, &[]).1["error"]["code"], "LOGIN_FAILED");
    let mut c = Raw::connect(&env.admin_socket());
    match c.call(&tde_protocol::Request::KeyList) {
        tde_protocol::Response::Error { code, .. } => {
            assert_eq!(code, tde_protocol::ErrorCode::NotAuthenticated)
        }
        r => panic!("{r:?}"),
    }
    let mut d = Raw::connect(&env.data_socket());
    match d.call(&tde_protocol::Request::KeyList) {
        tde_protocol::Response::Error { code, .. } => {
            assert_eq!(code, tde_protocol::ErrorCode::WrongSocket)
        }
        r => panic!("{r:?}"),
    }
    env.ok_new_password(
        &["operator", "add", "carol", "--role", "auditor"],
        "carol-password",
    );
    let out = env
        .cmd(&["key", "rotate", "pg-main", "--json"])
        .env("TDE_OPERATOR", "carol")
        .env("TDE_PASSWORD", "carol-password")
        .output()
        .expect("run");
    assert_eq!(parse(&out, &[]).1["error"]["code"], "PERMISSION_DENIED");

    drop(_daemon);
    let recs = audit(&env.db());
    if root {
        // The foreign uid's refusal above.
        assert!(
            refusals(&recs, "decrypt", "PERMISSION_DENIED") >= 1,
            "no audit record of decrypt refused with PERMISSION_DENIED"
        );
    }
    for (op, code) in [
        ("generate_data_key", "PERMISSION_DENIED"),
        ("decrypt", "CONTEXT_MISMATCH"),
        ("decrypt", "INVALID_CIPHERTEXT"),
        ("decrypt", "KEY_DISABLED"),
        ("decrypt", "KEY_PENDING_DESTRUCTION"),
        ("decrypt", "KEY_DESTROYED"),
        ("login", "LOGIN_FAILED"),
        ("key_list", "NOT_AUTHENTICATED"),
        ("key_list", "WRONG_SOCKET"),
        ("key_rotate", "PERMISSION_DENIED"),
    ] {
        assert!(
            refusals(&recs, op, code) >= 1,
            "no audit record of {op} refused with {code}"
        );
    }
    if root {
        let nobody = recs
            .iter()
            .find(|r| r["error_code"] == "PERMISSION_DENIED" && r["actor"]["uid"] == 65534)
            .expect("the foreign peer is audited");
        assert!(nobody["actor"]["client"].is_null());
    }
}

/// Issue 12, point 7: `tde key list | head -1` ends quietly (exit 0, no
/// panic) when the reader of its output is gone.
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let env = Env::new("");
    let shares = env.init();
    let _daemon = env.serve();
    env.unseal(&shares[..3]);
    for i in 0..50 {
        env.ok(&["key", "create", &format!("app-{i}")]);
    }
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = env
        .cmd(&["key", "list"])
        .stdout(std::process::Stdio::from(writer))
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Issue 12, point 3: a rotation period needs its unit (a bare `90` is
/// refused before anything changes), the sidecar refuses periods below
/// `limits.min_rotation_seconds` (one hour by default), and periods are
/// shown as durations.
#[test]
fn rotation_periods_need_units_and_respect_the_minimum() {
    let env = Env::new("");
    let shares = env.init();
    // The default minimum (the test config lowers it to 1 s).
    let _daemon = env.serve_env(&[("TDE_LIMITS__MIN_ROTATION_SECONDS", "3600")]);
    env.unseal(&shares[..3]);
    env.ok(&["key", "create", "pg-r"]);
    let (rc, v) = env.json(&["key", "set-rotation", "pg-r", "90"]);
    assert_eq!(rc, 2, "{v}");
    assert!(v.to_string().contains("no unit"), "{v}");
    let msg = env.refused(&["key", "set-rotation", "pg-r", "90s"], "INVALID_ARGUMENT");
    assert!(msg.contains("below the minimum of 1h"), "{msg}");
    // Create checks the unit first, and the sidecar the minimum, in the
    // same request: a refused period creates no key.
    let (rc, v) = env.json(&["key", "create", "pg-s", "--rotate-after", "30"]);
    assert_eq!(rc, 2, "{v}");
    assert_eq!(
        env.json(&["key", "show", "pg-s"]).0,
        1,
        "nothing was created"
    );
    let out = env
        .cmd(&["key", "create", "pg-t", "--rotate-after", "30m"])
        .output()
        .expect("create");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("below the minimum of 1h"), "{err}");
    assert_eq!(env.json(&["key", "show", "pg-t"]).0, 1, "no key pg-t");
    let k = env.ok(&["key", "create", "pg-u", "--rotate-after", "2h"]);
    assert_eq!(k["rotate_after_seconds"], 7200, "{k}");
    let k = env.ok(&["key", "set-rotation", "pg-r", "90d"]);
    assert_eq!(k["rotate_after_seconds"], 90 * 86400);
    // Nothing rotated on the way: still version 1.
    assert_eq!(k["primary_version"], 1, "{k}");
    let shown = env.cmd(&["key", "show", "pg-r"]).output().expect("show");
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(text.contains("rotates automatically every 90d"), "{text}");
    env.ok(&["key", "set-rotation", "pg-r", "off"]);
}

/// Issue 12, point 10: a share is read from standard input (piped, or
/// `--share-file -`) so it never reaches the command line; the argument
/// form still works but warns; an empty input sends nothing.
#[test]
fn unseal_shares_come_from_stdin_and_arguments_warn() {
    let env = Env::new("");
    let shares = env.init();
    let _daemon = env.serve();
    let piped = |args: &[&str], input: &str| env.piped(args, input);
    let out = piped(&["unseal"], "\n");
    assert_eq!(out.status.code(), Some(2), "an empty share is not sent");
    let out = piped(&["unseal"], &format!("{}\n", shares[0]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).is_empty());
    let out = piped(
        &["unseal", "--share-file", "-"],
        &format!("{}\n", shares[1]),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = env
        .cmd(&["unseal", &shares[2], "--json"])
        .output()
        .expect("unseal");
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning") && err.contains("/proc/PID/cmdline"),
        "{err}"
    );
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(st["sealed"], false, "{st}");
}

/// Issue 12, point 6: every state change and every refusal is one log line
/// at info (text or JSON), routine data-key traffic is not, and no secret
/// reaches the log.
#[test]
fn the_daemon_logs_state_changes_and_refusals_without_secrets() {
    let env = Env::new("");
    let shares = env.init();
    let daemon = env.serve_env(&[("TDE_LOG__FORMAT", "json")]);
    env.unseal(&shares[..3]);
    env.ok(&["key", "create", "app-logged"]);
    let g = env.ok(&["datakey", "generate", "--key", "app-logged"]);
    env.refused(
        &["datakey", "generate", "--key", "not-allowed"],
        "PERMISSION_DENIED",
    );
    let out = env
        .cmd(&["key", "list", "--json"])
        .env("TDE_PASSWORD", "wrong-password-9")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    env.ok(&["seal"]);
    daemon.stop();

    let text = std::fs::read_to_string(env.log()).expect("log");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let said = |message: &str| {
        lines
            .iter()
            .filter(|l| l["fields"]["message"] == message && l["level"] == "INFO")
            .collect::<Vec<_>>()
    };
    assert_eq!(said("unseal done").len(), 3, "{text}");
    assert_eq!(said("key_create done")[0]["fields"]["key"], "app-logged");
    assert_eq!(said("key_create done")[0]["fields"]["operator"], "admin");
    let denied = said("generate_data_key refused");
    assert_eq!(denied.len(), 1, "{text}");
    assert_eq!(denied[0]["fields"]["code"], "PERMISSION_DENIED");
    assert_eq!(denied[0]["fields"]["key"], "not-allowed");
    let login = said("login refused");
    assert_eq!(login.len(), 1, "{text}");
    assert_eq!(login[0]["fields"]["code"], "LOGIN_FAILED");
    assert_eq!(said("seal done").len(), 1, "{text}");
    assert_eq!(said("daemon_start done by the daemon").len(), 1, "{text}");
    assert!(
        said("generate_data_key done").is_empty(),
        "routine data-key traffic stays at debug: {text}"
    );
    for secret in shares
        .iter()
        .map(String::as_str)
        .chain([PASSWORD, "wrong-password-9"])
        .chain([g["plaintext"].as_str().expect("plaintext")])
    {
        assert!(!text.contains(secret), "a secret in the log:\n{text}");
    }
}

/// Issue 12, point 4: `tde init` says where it writes and asks on a
/// terminal; off a terminal it needs to be told where; no other command
/// creates a store as a side effect.
#[test]
fn init_says_where_it_writes_and_nothing_else_creates_a_store() {
    let dir = tempfile::tempdir().expect("tmp");
    let tde = |args: &[&str]| {
        let mut c = std::process::Command::new(BIN);
        c.args(args)
            .current_dir(dir.path())
            .env_remove("TDE_CONFIG")
            .env_remove("TDE_DATA_DIR")
            .env("TDE_PASSWORD", PASSWORD)
            .stdin(std::process::Stdio::null());
        c
    };
    // No configuration, no terminal: refused before anything is written.
    let default_existed = std::path::Path::new("/var/lib/tde").exists();
    let out = tde(&["init"]).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/var/lib/tde") && err.contains("--data-dir"),
        "{err}"
    );
    if !default_existed {
        assert!(!std::path::Path::new("/var/lib/tde").exists());
    }
    // serve with no store refuses and creates nothing.
    let none = dir.path().join("none");
    let out = tde(&["serve", "--data-dir", none.to_str().expect("utf-8")])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("there is no key store"), "{err}");
    assert!(!none.exists(), "serve created {}", none.display());
    // --data-dir off a terminal: said on stderr, done.
    let a = dir.path().join("a");
    let out = tde(&["init", "--data-dir", a.to_str().expect("utf-8"), "--json"])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "creates a new key store {}",
            a.join("tde.db").display()
        )),
        "{err}"
    );
    // On a terminal (util-linux `script` gives one): asks; "n" creates
    // nothing, "y" goes on.
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        skip("no `script` to run tde init on a terminal");
        return;
    }
    let on_terminal = |sub: &str, answer: &str| {
        use std::io::Write as _;
        let target = dir.path().join(sub);
        let mut child = std::process::Command::new("script")
            .args(["-qec"])
            .arg(format!(
                "{BIN} init --shares 2 --threshold 2 --data-dir {}",
                target.display()
            ))
            .arg("/dev/null")
            .env_remove("TDE_CONFIG")
            .env_remove("TDE_DATA_DIR")
            .env("TDE_PASSWORD", PASSWORD)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("script");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(answer.as_bytes())
            .expect("answer");
        let out = child.wait_with_output().expect("wait");
        (target, String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (b, text) = on_terminal("b", "n\n");
    assert!(text.contains("Continue? [y/N]"), "{text}");
    assert!(text.contains("nothing was created"), "{text}");
    assert!(!b.join("tde.db").exists());
    let (c, text) = on_terminal("c", "y\n");
    assert!(text.contains("Initialized the key store"), "{text}");
    assert!(c.join("tde.db").exists());
}

/// Logs in on a raw admin connection and returns it.
fn logged_in(env: &Env, name: &str, password: &str) -> Raw {
    let mut raw = Raw::connect(&env.admin_socket());
    match raw.call(&tde_protocol::Request::Login {
        operator: name.into(),
        password: tde_protocol::SecretBytes::from_slice(password.as_bytes()),
    }) {
        tde_protocol::Response::LoggedIn { .. } => raw,
        r => panic!("login of {name}: {r:?}"),
    }
}

/// The error code of a `key_list` on a logged-in connection, or `None`.
fn key_list_refusal(raw: &mut Raw) -> Option<tde_protocol::ErrorCode> {
    match raw.call(&tde_protocol::Request::KeyList) {
        tde_protocol::Response::Keys(_) => None,
        tde_protocol::Response::Error { code, .. } => Some(code),
        r => panic!("key_list: {r:?}"),
    }
}

/// Issue 12, point 12 and the Vault expectations: `tde operator remove`,
/// and a login that ends when its operator is removed, gets a new password
/// or is locked out (and stays ended after an unlock).
#[test]
fn operator_removal_password_change_and_lockout_end_logins() {
    use tde_protocol::ErrorCode;
    let env = Env::new("");
    let shares = env.init();
    let _daemon = env.serve();
    env.unseal(&shares[..3]);
    for (name, role) in [
        ("bob", "crypto_officer"),
        ("carol", "auditor"),
        ("dave", "crypto_officer"),
        ("app", "crypto_user"),
    ] {
        env.ok_new_password(
            &["operator", "add", name, "--role", role],
            &format!("{name}-password-1"),
        );
    }

    // A password change ends the sessions of that operator only.
    let mut bob = logged_in(&env, "bob", "bob-password-1");
    let mut dave = logged_in(&env, "dave", "dave-password-1");
    assert_eq!(key_list_refusal(&mut bob), None);
    env.ok_new_password(&["operator", "passwd", "bob"], "bob-password-2");
    assert_eq!(
        key_list_refusal(&mut bob),
        Some(ErrorCode::NotAuthenticated)
    );
    assert_eq!(key_list_refusal(&mut dave), None);
    let mut bob = logged_in(&env, "bob", "bob-password-2");
    assert_eq!(key_list_refusal(&mut bob), None);

    // A lockout ends them, and an unlock does not bring them back.
    let mut carol = logged_in(&env, "carol", "carol-password-1");
    for _ in 0..5 {
        let mut raw = Raw::connect(&env.admin_socket());
        let r = raw.call(&tde_protocol::Request::Login {
            operator: "carol".into(),
            password: tde_protocol::SecretBytes::from_slice(b"wrong"),
        });
        assert!(matches!(r, tde_protocol::Response::Error { .. }), "{r:?}");
    }
    assert_eq!(
        key_list_refusal(&mut carol),
        Some(ErrorCode::OperatorLocked)
    );
    env.ok(&["operator", "unlock", "carol"]);
    assert_eq!(
        key_list_refusal(&mut carol),
        Some(ErrorCode::NotAuthenticated)
    );

    // Removal: not oneself; not a crypto user with keys still shared.
    let own = env.refused(&["operator", "remove", "admin"], "INVALID_ARGUMENT");
    assert!(own.contains("cannot remove itself"), "{own}");
    env.ok(&["key", "create", "app-shared"]);
    env.ok(&["key", "share", "app-shared", "app"]);
    let shared = env.refused(&["operator", "remove", "app"], "INVALID_ARGUMENT");
    assert!(shared.contains("app-shared"), "{shared}");
    env.ok(&["key", "unshare", "app-shared", "app"]);
    env.ok(&["operator", "remove", "app"]);
    // Bob's live session ends with his removal; he cannot log in again,
    // and an operator of the same name added later gets none of it.
    env.ok(&["operator", "remove", "bob"]);
    assert_eq!(
        key_list_refusal(&mut bob),
        Some(ErrorCode::NotAuthenticated)
    );
    let names: Vec<String> = env
        .ok(&["operator", "list"])
        .as_array()
        .expect("list")
        .iter()
        .map(|o| o["name"].as_str().expect("name").to_string())
        .collect();
    assert_eq!(names, ["admin", "carol", "dave"]);
    env.refused(&["operator", "remove", "bob"], "OPERATOR_NOT_FOUND");
    env.ok_new_password(
        &["operator", "add", "bob", "--role", "crypto_officer"],
        "bob-password-3",
    );
    assert_eq!(
        key_list_refusal(&mut bob),
        Some(ErrorCode::NotAuthenticated)
    );
    // The removal survives a restart, and the store is not tampered.
    drop(_daemon);
    let _daemon = env.serve();
    env.unseal(&shares[..3]);
    assert_eq!(
        env.ok(&["operator", "list"]).as_array().map(Vec::len),
        Some(4)
    );
    let recs = audit(&env.db());
    assert!(
        !recs.iter().any(|r| r["op"] == "tamper_detected"),
        "a removal leaves a consistent store"
    );
    assert_eq!(count(&recs, "operator_remove", "ok"), 2);
}

/// Issue 12, points 11 and 12: a repeated unseal share is named, an output
/// file in the way fails before a key is made, unknown `TDE_` variables
/// warn instead of failing, `tde inspect` of a non-backing directory says
/// so, and a connection failure is said once.
#[test]
fn small_gaps_say_what_happened() {
    let env = Env::new("");
    let shares = env.init();
    let _daemon = env.serve();
    env.ok(&["unseal", &shares[0]]);
    let again = env.refused(&["unseal", &shares[0]], "INVALID_SHARE");
    assert!(again.contains("already given"), "{again}");
    assert!(again.contains("1/3"), "{again}");
    assert_eq!(env.unseal(&shares[1..3])["sealed"], false);
    env.ok(&["key", "create", "app-out"]);

    // An existing --plaintext-file: refused before the request.
    let pt = env.dir.path().join("pt.bin");
    let ct = env.dir.path().join("ct.bin");
    std::fs::write(&pt, b"in the way").expect("write");
    let before = count(&audit(&env.db()), "generate_data_key", "ok");
    let (rc, v) = env.json(&[
        "datakey",
        "generate",
        "--key",
        "app-out",
        "--plaintext-file",
        pt.to_str().expect("utf-8"),
        "--ciphertext-file",
        ct.to_str().expect("utf-8"),
    ]);
    assert_eq!(rc, 2, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("pt.bin")),
        "{v}"
    );
    assert_eq!(std::fs::read(&pt).expect("read"), b"in the way");
    assert!(!ct.exists(), "no ciphertext file is left behind");
    assert_eq!(
        count(&audit(&env.db()), "generate_data_key", "ok"),
        before,
        "no data key was generated"
    );

    // An unknown TDE_ variable: a warning, the command works.
    let out = env
        .cmd(&["key", "list", "--json"])
        .env("TDE_LOG_FORMAT", "json")
        .output()
        .expect("run");
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning: ignoring TDE_LOG_FORMAT: not a tde configuration key"),
        "{err}"
    );

    // inspect of a directory without a key file.
    let out = env
        .cmd(&["inspect", env.dir.path().to_str().expect("utf-8")])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a tde backing directory"), "{err}");

    // No sidecar: the cause is said once.
    let out = env
        .cmd(&["key", "list"])
        .env("TDE_DATA_DIR", env.dir.path().join("nowhere"))
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    assert_eq!(err.matches("tde serve").count(), 1, "{err}");
}
