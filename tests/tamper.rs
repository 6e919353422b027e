//! Must-show 6: an edited sealed row fails with a tamper error and a tamper
//! audit record; five bad logins lock an operator; after `tde zeroize` the
//! original shares can never unseal the store again.

mod common;

use common::*;

#[test]
fn edited_row_is_tampered_and_audited() {
    let env = Env::new("");
    let shares = env.init();
    let daemon = env.serve();
    env.unseal(&shares[..3]);
    env.ok(&["key", "create", "pg-a"]);
    env.ok(&["key", "create", "pg-b"]);
    let g = env.ok(&["datakey", "generate", "--key", "pg-a"]);
    let ct = g["ciphertext"].as_str().expect("ct").to_string();
    daemon.stop();

    // Flip one bit of pg-a's sealed blob directly in the SQLite file.
    let conn = rusqlite::Connection::open(env.db()).expect("open");
    let mut blob: Vec<u8> = conn
        .query_row(
            "SELECT sealed FROM objects WHERE kind = 1 AND id = 'pg-a'",
            [],
            |r| r.get(0),
        )
        .expect("row");
    blob[20] ^= 0x04;
    conn.execute(
        "UPDATE objects SET sealed = ?1 WHERE kind = 1 AND id = 'pg-a'",
        [&blob],
    )
    .expect("edit");
    drop(conn);

    let daemon = env.serve();
    assert_eq!(env.unseal(&shares[1..4])["sealed"], false);
    let m = env.refused(&["datakey", "decrypt", "--ciphertext", &ct], "TAMPERED");
    assert!(m.contains("pg-a") && m.contains("tamper"), "{m}");
    env.refused(&["datakey", "generate", "--key", "pg-a"], "TAMPERED");
    env.refused(&["key", "rotate", "pg-a"], "TAMPERED");
    let list = env.ok(&["key", "list"]);
    let a = list
        .as_array()
        .expect("list")
        .iter()
        .find(|k| k["name"] == "pg-a")
        .expect("pg-a listed");
    assert_eq!(a["tampered"], true);
    env.ok(&["datakey", "generate", "--key", "pg-b"]);

    // Renaming a row (moving a sealed blob to another id) is caught as well.
    daemon.stop();
    let conn = rusqlite::Connection::open(env.db()).expect("open");
    conn.execute(
        "UPDATE objects SET id = 'pg-c' WHERE kind = 1 AND id = 'pg-b'",
        [],
    )
    .expect("rename");
    drop(conn);
    let _daemon = env.serve();
    env.unseal(&shares[..3]);
    env.refused(&["key", "show", "pg-c"], "TAMPERED");
    drop(_daemon);

    let recs = audit(&env.db());
    let tampered: Vec<_> = recs
        .iter()
        .filter(|r| r["op"] == "tamper_detected")
        .collect();
    assert!(
        tampered.iter().any(|r| r["key"] == "pg-a"),
        "tamper record for pg-a"
    );
    assert!(
        tampered.iter().any(|r| r["key"] == "pg-c"),
        "tamper record for pg-c"
    );
    assert!(tampered.iter().all(|r| r["error_code"] == "TAMPERED"));
    assert!(refusals(&recs, "decrypt", "TAMPERED") >= 1);
}

#[test]
fn five_bad_logins_lock_and_zeroize_is_final() {
    let env = Env::new("");
    let shares = env.init();
    let daemon = env.serve();
    env.unseal(&shares[..3]);
    let add = env
        .cmd(&[
            "operator",
            "add",
            "bob",
            "--role",
            "crypto_officer",
            "--json",
        ])
        .env("TDE_NEW_PASSWORD", "bob-password-1")
        .output()
        .expect("run");
    assert!(add.status.success());
    let as_bob = |pw: &str, args: &[&str]| {
        let out = env
            .cmd(args)
            .arg("--json")
            .env("TDE_OPERATOR", "bob")
            .env("TDE_PASSWORD", pw)
            .output()
            .expect("run");
        parse(&out, args)
    };
    for i in 1..=4 {
        let (rc, v) = as_bob("not-bobs-password", &["key", "list"]);
        assert_eq!(
            (rc, v["error"]["code"].as_str()),
            (1, Some("LOGIN_FAILED")),
            "attempt {i}"
        );
    }
    let (_, v) = as_bob("not-bobs-password", &["key", "list"]);
    assert_eq!(v["error"]["code"], "OPERATOR_LOCKED");
    let (_, v) = as_bob("bob-password-1", &["key", "list"]);
    assert_eq!(
        v["error"]["code"], "OPERATOR_LOCKED",
        "locked even with the right password"
    );
    let ops = env.ok(&["operator", "list"]);
    let bob = ops
        .as_array()
        .expect("ops")
        .iter()
        .find(|o| o["name"] == "bob")
        .expect("bob");
    assert_eq!(bob["locked"], true);
    env.ok(&["operator", "unlock", "bob"]);
    let (rc, _) = as_bob("bob-password-1", &["key", "list"]);
    assert_eq!(rc, 0, "unlocked by another officer");

    // Zeroize without --yes changes nothing.
    let out = env.cmd(&["zeroize"]).output().expect("run");
    assert!(!out.status.success());
    assert_eq!(env.status()["zeroized"], false);

    let sealed_root: Vec<u8> = rusqlite::Connection::open(env.db())
        .expect("open")
        .query_row("SELECT sealed FROM root", [], |r| r.get(0))
        .expect("root");
    env.ok(&["key", "create", "pg-z"]);
    env.ok(&["zeroize", "--yes"]);
    let st = env.status();
    assert_eq!(
        (st["zeroized"].as_bool(), st["sealed"].as_bool()),
        (Some(true), Some(true))
    );
    env.refused(&["datakey", "generate", "--key", "pg-z"], "ZEROIZED");
    daemon.stop();

    let _daemon = env.serve();
    assert_eq!(env.status()["zeroized"], true);
    for s in &shares {
        env.refused(&["unseal", s], "ZEROIZED");
    }
    drop(_daemon);
    for f in ["tde.db", "tde.db-wal"] {
        if let Ok(bytes) = std::fs::read(env.data_dir().join(f)) {
            assert!(
                !bytes
                    .windows(sealed_root.len())
                    .any(|w| w == &sealed_root[..]),
                "sealed root left in {f}"
            );
        }
    }
    let recs = audit(&env.db());
    assert_eq!(refusals(&recs, "login", "LOGIN_FAILED"), 4);
    assert_eq!(refusals(&recs, "login", "OPERATOR_LOCKED"), 2);
    assert_eq!(count(&recs, "operator_locked", "ok"), 1);
    assert_eq!(count(&recs, "zeroize", "ok"), 1);
    assert_eq!(refusals(&recs, "unseal", "ZEROIZED"), 5);
}

#[test]
fn tamper_policy_zeroizes_on_lockout() {
    let env = Env::new("[tamper]\nzeroize_on_lockout = true\n");
    let shares = env.init();
    let _daemon = env.serve();
    env.unseal(&shares[..3]);
    for _ in 0..5 {
        let out = env
            .cmd(&["key", "list", "--json"])
            .env("TDE_PASSWORD", "wrong-password")
            .output()
            .expect("run");
        assert!(!out.status.success());
    }
    assert_eq!(env.status()["zeroized"], true);
    drop(_daemon);
    let recs = audit(&env.db());
    assert_eq!(count(&recs, "tamper_zeroize", "ok"), 1);
}
