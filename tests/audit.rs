//! Issue 13: compliance evidence. Records with every field an auditor
//! asks for, checkpoints signed by the HSM's audit key, `tde audit export`
//! in three formats, `tde audit verify` offline naming the first bad place
//! of every tampering, pruning after export, and who may read the log.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;
use tde_protocol::{AuditQuery, ErrorCode, Request, Response};
use tde_sidecar::audit::chain_hash;
use tde_sidecar::audit::export::{self, Manifest};

const AUDITOR_PW: &str = "auditor-password-1";
const USER_PW: &str = "user-password-1";

/// A store whose checkpoints come every 20 records, with an auditor
/// (carol), a crypto user (bob, sharing pg-main) and key traffic.
fn setup() -> (Env, Daemon, Vec<String>) {
    started(Env::new(
        "[audit]\ncheckpoint_records = 20\nnode = \"db-host-1\"\n",
    ))
}

/// `env` initialized, served, unsealed, with key pg-main, auditor carol and
/// crypto user bob (sharing pg-main).
fn started(env: Env) -> (Env, Daemon, Vec<String>) {
    let shares = env.init();
    let daemon = env.serve();
    env.unseal(&shares[..3]);
    env.ok(&["key", "create", "pg-main"]);
    env.ok_new_password(
        &["operator", "add", "carol", "--role", "auditor"],
        AUDITOR_PW,
    );
    env.ok_new_password(
        &["operator", "add", "bob", "--role", "crypto_user"],
        USER_PW,
    );
    env.ok(&["key", "share", "pg-main", "bob"]);
    (env, daemon, shares)
}

/// `tde ARGS --json` as operator `name`.
fn as_op(env: &Env, name: &str, pw: &str, args: &[&str]) -> (i32, Value) {
    let out = env
        .cmd(args)
        .arg("--json")
        .env("TDE_OPERATOR", name)
        .env("TDE_PASSWORD", pw)
        .output()
        .expect("run tde");
    parse(&out, args)
}

fn carol(env: &Env, args: &[&str]) -> Value {
    let (rc, v) = as_op(env, "carol", AUDITOR_PW, args);
    assert_eq!(rc, 0, "tde {args:?} as carol: {v}");
    v
}

/// Key traffic from a data-socket client, a crypto user and an officer,
/// one refusal among it.
fn traffic(env: &Env, rounds: usize) {
    for i in 0..rounds {
        let ts = format!("tablespace=ts{i}");
        let g = env.ok(&["datakey", "generate", "--key", "pg-main", "--context", &ts]);
        let ct = g["ciphertext"].as_str().expect("ct").to_string();
        env.ok(&["datakey", "decrypt", "--ciphertext", &ct, "--context", &ts]);
    }
    let (rc, _) = as_op(
        env,
        "bob",
        USER_PW,
        &[
            "datakey",
            "generate",
            "--key",
            "pg-main",
            "--context",
            "tablespace=b",
        ],
    );
    assert_eq!(rc, 0);
    env.refused(
        &["datakey", "generate", "--key", "not-allowed"],
        "PERMISSION_DENIED",
    );
    env.ok(&["key", "rotate", "pg-main"]);
}

fn export(env: &Env, out: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["audit", "export", "--out", out.to_str().expect("utf8")];
    args.extend_from_slice(extra);
    carol(env, &args)
}

fn verify(dir: &Path, extra: &[&str]) -> (i32, Value) {
    let mut args = vec!["audit", "verify", dir.to_str().expect("utf8")];
    args.extend_from_slice(extra);
    // Offline: no configuration, no sidecar, no password.
    let out = std::process::Command::new(BIN)
        .args(&args)
        .arg("--json")
        .env("TDE_DATA_DIR", "/nonexistent")
        .env_remove("TDE_CONFIG")
        .output()
        .expect("run tde");
    parse(&out, &args)
}

/// Verify fails, naming `kind` (and `seq` if given); returns the message.
fn fails(dir: &Path, extra: &[&str], kind: &str, seq: Option<u64>) -> String {
    let (rc, v) = verify(dir, extra);
    assert_eq!(rc, 1, "verify should fail ({kind}): {v}");
    assert_eq!(v["ok"], false);
    assert_eq!(v["problem"]["kind"], kind, "{v}");
    if let Some(s) = seq {
        assert_eq!(v["problem"]["seq"], s, "{v}");
    }
    let m = v["message"].as_str().expect("message").to_string();
    assert!(m.starts_with("FAILED: "), "{m}");
    m
}

fn passes(dir: &Path, extra: &[&str]) -> Value {
    let (rc, v) = verify(dir, extra);
    assert_eq!(rc, 0, "verify should pass: {v}");
    assert_eq!(v["ok"], true);
    v
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .expect("read")
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(path: &Path, l: &[String]) {
    std::fs::write(path, l.join("\n") + "\n").expect("write");
}

fn manifest(dir: &Path) -> Manifest {
    serde_json::from_str(&std::fs::read_to_string(dir.join(export::MANIFEST)).expect("read"))
        .expect("manifest")
}

fn save_manifest(dir: &Path, m: &Manifest) {
    std::fs::write(
        dir.join(export::MANIFEST),
        serde_json::to_string_pretty(m).expect("json"),
    )
    .expect("write");
}

/// What an attacker who rewrites files does last: digests that match.
fn fix_digests(dir: &Path) {
    let mut m = manifest(dir);
    for f in &mut m.files {
        let (sha, bytes) = export::file_digest(&dir.join(&f.name)).expect("digest");
        f.sha256 = sha;
        f.bytes = bytes;
    }
    save_manifest(dir, &m);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
}

#[test]
fn records_carry_who_what_when_and_exports_in_every_format_verify() {
    let (env, _daemon, _) = setup();
    traffic(&env, 12);
    let work = env.dir.path().join("exports");
    std::fs::create_dir(&work).expect("mkdir");
    let pem = work.join("audit.pem");
    let keys = carol(
        &env,
        &["audit", "pubkey", "--out", pem.to_str().expect("utf8")],
    );
    assert_eq!(keys[0]["version"], 1);
    let pin = ["--pubkey", pem.to_str().expect("utf8")];

    for format in ["jsonl", "csv", "ocsf"] {
        let dir = work.join(format);
        let e = export(&env, &dir, &["--format", format]);
        assert_eq!(e["format"], format);
        assert!(
            e["checkpoints"].as_u64().expect("n") >= 3,
            "every 20 records: {e}"
        );
        let v = passes(&dir, &pin);
        assert_eq!(v["keys_pinned"], true);
        assert_eq!(v["records"], e["records"]);
    }

    let records: Vec<Value> = lines(&work.join("jsonl").join(export::RECORDS))
        .iter()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    // A data-socket decrypt: the client, its process and executable, the
    // key and version, the context, the request id, node and time.
    let decrypt = records
        .iter()
        .find(|r| r["op"] == "decrypt" && r["result"] == "ok")
        .expect("a decrypt");
    let a = &decrypt["actor"];
    assert_eq!(a["client"], "app");
    assert_eq!(a["uid"], rustix::process::getuid().as_raw());
    assert!(a["gid"].is_number() && a["pid"].is_number());
    assert!(
        a["exe"].as_str().expect("exe").ends_with("/tde"),
        "{decrypt}"
    );
    assert_eq!(decrypt["key"], "pg-main");
    assert_eq!(decrypt["key_version"], 1);
    assert!(decrypt["context"]["tablespace"].is_string());
    assert!(decrypt["request_id"].is_number());
    assert_eq!(decrypt["node"], "db-host-1");
    let time = decrypt["time"].as_str().expect("time");
    assert!(
        time.ends_with('Z') && time.contains('.') && time.len() == 24,
        "{time}"
    );
    // An operator's request: name and role; a refusal: its code.
    let rotate = records
        .iter()
        .find(|r| r["op"] == "key_rotate" && r["result"] == "ok")
        .expect("a rotation");
    assert_eq!(rotate["actor"]["operator"], "admin");
    assert_eq!(rotate["actor"]["role"], "crypto_officer");
    assert_eq!(rotate["key_version"], 2);
    let refused = records
        .iter()
        .find(|r| r["op"] == "generate_data_key" && r["result"] == "error")
        .expect("a refusal");
    assert_eq!(refused["error_code"], "PERMISSION_DENIED");
    assert!(records.iter().any(|r| r["actor"]["operator"] == "bob"
        && r["op"] == "generate_data_key"
        && r["result"] == "ok"));
    assert!(records.iter().any(|r| r["op"] == "audit_key_created"));
    // Nothing secret: no password, no share, no key bytes field.
    let text = std::fs::read_to_string(work.join("jsonl").join(export::RECORDS)).expect("read");
    for secret in [PASSWORD, AUDITOR_PW, USER_PW, "plaintext"] {
        assert!(!text.contains(secret), "{secret} in the audit log");
    }

    // CSV: a header and one row per record.
    let csv = lines(&work.join("csv").join("records.csv"));
    assert!(csv[0].starts_with("seq,time,node,socket,op,result"));
    assert_eq!(
        csv.len(),
        lines(&work.join("csv").join(export::RECORDS)).len() + 1
    );

    // OCSF API Activity: the fields the class and its objects require.
    let ocsf = lines(&work.join("ocsf").join("records.ocsf.jsonl"));
    assert_eq!(
        ocsf.len(),
        lines(&work.join("ocsf").join(export::RECORDS)).len()
    );
    for l in &ocsf {
        let e: Value = serde_json::from_str(l).expect("json");
        for k in tde_sidecar::audit::render::OCSF_REQUIRED {
            assert!(!e[k].is_null(), "{k} missing: {l}");
        }
        assert_eq!(e["class_uid"], 6003);
        assert_eq!(e["category_uid"], 6);
        let activity = e["activity_id"].as_u64().expect("activity");
        assert!([1, 2, 3, 4, 99].contains(&activity));
        assert_eq!(e["type_uid"].as_u64(), Some(600300 + activity));
        assert!(e["time"].as_u64().is_some());
        assert!(e["metadata"]["product"]["name"].is_string());
        assert!(e["metadata"]["version"].is_string());
        assert!(e["api"]["operation"].is_string());
        assert!(e["src_endpoint"]["hostname"] == "db-host-1");
        let actor = e["actor"].as_object().expect("actor");
        assert!(
            ["process", "user", "app_name"]
                .iter()
                .any(|k| actor.contains_key(*k)),
            "{l}"
        );
        if let Some(p) = actor.get("process") {
            assert!(p["pid"].is_number() || p["uid"].is_string(), "{l}");
            if let Some(f) = p.get("file") {
                assert!(f["name"].is_string() && f["type_id"].is_number(), "{l}");
            }
        }
        assert!(e["api"]["request"]["uid"].is_string());
        assert!([1, 2].contains(&e["status_id"].as_u64().expect("status")));
    }

    // The verdict is one line, with the range.
    let out = std::process::Command::new(BIN)
        .args(["audit", "verify"])
        .arg(work.join("csv"))
        .args(pin)
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.starts_with("OK: records 1..="), "{text}");
}

#[test]
fn a_crypto_user_and_data_clients_cannot_read_the_log_and_are_recorded() {
    let (env, _daemon, _) = setup();
    traffic(&env, 2);
    let out = env.dir.path().join("by-bob");
    for args in [
        vec!["audit", "list"],
        vec!["audit", "export", "--out", out.to_str().expect("utf8")],
    ] {
        let (rc, v) = as_op(&env, "bob", USER_PW, &args);
        assert_eq!(rc, 1, "{v}");
        assert_eq!(v["error"]["code"], "PERMISSION_DENIED", "{v}");
    }
    let (rc, v) = as_op(
        &env,
        "carol",
        AUDITOR_PW,
        &["audit", "prune", "--before", "now", "--yes"],
    );
    assert_eq!(
        (rc, v["error"]["code"].as_str()),
        (1, Some("INVALID_ARGUMENT")),
        "{v}"
    );
    let (rc, v) = env.json(&["audit", "prune", "--before", "now", "--yes"]);
    assert_eq!(
        (rc, v["error"]["code"].as_str()),
        (1, Some("PERMISSION_DENIED")),
        "officers cannot prune: {v}"
    );
    // A data-socket client asking for the log.
    let mut raw = Raw::connect(&env.data_socket());
    match raw.call(&Request::AuditList(AuditQuery::default())) {
        Response::Error { code, .. } => assert_ne!(code, ErrorCode::AuditFailed),
        r => panic!("a data client read the audit log: {r:?}"),
    }

    // The auditor sees the refusals, the officer may read too.
    let listed = env
        .cmd(&["audit", "list", "--operation", "audit_list", "--json"])
        .output()
        .expect("run");
    assert!(listed.status.success());
    let got: Vec<Value> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert!(got.iter().any(|r| r["actor"]["operator"] == "bob"
        && r["result"] == "error"
        && r["error_code"] == "PERMISSION_DENIED"));
    assert!(
        got.iter()
            .any(|r| r["socket"] == "data" && r["result"] == "error")
    );
    assert!(got.iter().all(|r| r["op"] == "audit_list"));
    let all = audit(&env.db());
    assert_eq!(refusals(&all, "audit_export", "PERMISSION_DENIED"), 1);
    assert_eq!(refusals(&all, "audit_prune", "PERMISSION_DENIED"), 1);
    // And the auditor follows it.
    carol(&env, &["audit", "tail", "-n", "3"]);
}

/// Builds an export, then each tampering of a copy of it, and checks that
/// verify names the place.
#[test]
fn every_tampering_of_an_export_is_named() {
    let (env, _daemon, _) = setup();
    traffic(&env, 15);
    let work = env.dir.path().join("t");
    std::fs::create_dir(&work).expect("mkdir");
    let e1 = work.join("e1");
    export(&env, &e1, &[]);
    passes(&e1, &[]);
    let recs = e1.join(export::RECORDS);
    let orig = lines(&recs);
    let m = manifest(&e1);
    let k = 10usize; // the line of record m.first_seq + 10
    let seq_k = m.first_seq + k as u64;
    let case = |name: &str| -> PathBuf {
        let d = work.join(name);
        copy_dir(&e1, &d);
        d
    };

    // A field changed: the record is named.
    let d = case("field");
    let mut l = orig.clone();
    l[k] = l[k].replacen("\"result\":\"ok\"", "\"result\":\"error\"", 1);
    assert_ne!(l[k], orig[k], "record {seq_k} has a result");
    write_lines(&d.join(export::RECORDS), &l);
    fix_digests(&d);
    fails(&d, &[], "changed", Some(seq_k));

    // A line deleted.
    let d = case("deleted");
    let mut l = orig.clone();
    l.remove(k);
    write_lines(&d.join(export::RECORDS), &l);
    let msg = fails(&d, &[], "removed", Some(seq_k));
    assert!(
        msg.contains(&format!("record {seq_k} was removed")),
        "{msg}"
    );

    // A line inserted (a copy of another record).
    let d = case("inserted");
    let mut l = orig.clone();
    l.insert(k, orig[3].clone());
    write_lines(&d.join(export::RECORDS), &l);
    fails(&d, &[], "inserted", None);

    // Two lines swapped.
    let d = case("swapped");
    let mut l = orig.clone();
    l.swap(k, k + 1);
    write_lines(&d.join(export::RECORDS), &l);
    let msg = fails(&d, &[], "reordered", Some(seq_k));
    assert!(msg.contains("out of order"), "{msg}");

    // The file cut in the middle of a line.
    let d = case("truncated");
    let text = std::fs::read(&recs).expect("read");
    let cut: usize = orig[..k].iter().map(|x| x.len() + 1).sum::<usize>() + 40;
    std::fs::write(d.join(export::RECORDS), &text[..cut]).expect("write");
    fails(&d, &[], "truncated", Some(seq_k));

    // A record deleted and the rest re-chained, a forged record appended:
    // consistent as a keyless chain, refused by the signed checkpoints.
    let d = case("rechained");
    let mut l = orig.clone();
    l.remove(k);
    let mut forged: Value = serde_json::from_str(&orig[k]).expect("json");
    forged["detail"] = Value::String("nothing happened".into());
    l.push(serde_json::to_string(&forged).expect("json"));
    let mut prev: [u8; 32] = hex::decode(&m.anchor).expect("hex").try_into().expect("32");
    for (i, line) in l.iter_mut().enumerate() {
        let mut v: Value = serde_json::from_str(line).expect("json");
        v["seq"] = Value::from(m.first_seq + i as u64);
        v["prev"] = Value::String(hex::encode(prev));
        *line = serde_json::to_string(&v).expect("json");
        prev = chain_hash(&prev, line.as_bytes());
    }
    write_lines(&d.join(export::RECORDS), &l);
    let mut mm = manifest(&d);
    mm.head = hex::encode(prev);
    save_manifest(&d, &mm);
    fix_digests(&d);
    let msg = fails(&d, &[], "checkpoint", None);
    assert!(msg.contains("does not match the records"), "{msg}");

    // A checkpoint's signature replaced with another's.
    let d = case("signature");
    let mut mm = manifest(&d);
    assert!(mm.checkpoints.len() >= 2);
    mm.checkpoints[0].signature = mm.checkpoints[1].signature.clone();
    save_manifest(&d, &mm);
    let msg = fails(&d, &[], "checkpoint", Some(mm.checkpoints[0].last_seq));
    assert!(msg.contains("signature does not verify"), "{msg}");

    // The manifest edited: its range, then a digest.
    let d = case("manifest-range");
    let mut mm = manifest(&d);
    mm.last_seq -= 1;
    save_manifest(&d, &mm);
    fails(&d, &[], "manifest", None);
    let d = case("manifest-digest");
    let mut mm = manifest(&d);
    mm.files[0].sha256 = "00".repeat(32);
    save_manifest(&d, &mm);
    fails(&d, &[], "file", None);
    let d = case("extra-file");
    std::fs::write(d.join("notes.txt"), "x").expect("write");
    fails(&d, &[], "file", None);

    // A second export, continuing the first; then its records.jsonl put
    // in the first's place.
    traffic(&env, 3);
    let e2 = work.join("e2");
    export(&env, &e2, &["--after", e1.to_str().expect("utf8")]);
    passes(&e2, &["--previous", e1.to_str().expect("utf8")]);
    let d = case("substituted");
    std::fs::copy(e2.join(export::RECORDS), d.join(export::RECORDS)).expect("copy");
    let (rc, v) = verify(&d, &[]);
    assert_eq!(rc, 1, "{v}");

    // The newest records of the first export removed together with the
    // checkpoint that signed them (the manifest fixed to match): alone it
    // still verifies (nothing in it says more records were there), but
    // the next export no longer continues it.
    let d = case("tail");
    let mut mm = manifest(&d);
    let last_interval = mm
        .checkpoints
        .iter()
        .filter(|c| c.reason == "interval" && c.last_seq < mm.last_seq)
        .map(|c| c.last_seq)
        .max()
        .expect("an interval checkpoint");
    mm.checkpoints.retain(|c| c.last_seq <= last_interval);
    let keep = (last_interval - mm.first_seq + 1) as usize;
    let l = orig[..keep].to_vec();
    write_lines(&d.join(export::RECORDS), &l);
    mm.last_seq = last_interval;
    mm.count = keep as u64;
    mm.head = mm
        .checkpoints
        .iter()
        .find(|c| c.last_seq == last_interval)
        .expect("ck")
        .head
        .clone();
    save_manifest(&d, &mm);
    fix_digests(&d);
    passes(&d, &[]);
    let msg = fails(
        &e2,
        &["--previous", d.to_str().expect("utf8")],
        "gap",
        Some(last_interval + 1),
    );
    assert!(msg.contains("in neither export"), "{msg}");

    // Pinned keys that did not sign it.
    let other = Env::new("");
    let shares = other.init();
    let _other_daemon = other.serve();
    other.unseal(&shares[..3]);
    let other_pem = work.join("other.pem");
    other.ok(&[
        "audit",
        "pubkey",
        "--out",
        other_pem.to_str().expect("utf8"),
    ]);
    fails(
        &e1,
        &["--pubkey", other_pem.to_str().expect("utf8")],
        "key",
        None,
    );

    // An export of another store as --previous.
    let o1 = work.join("other-export");
    other.ok(&["audit", "export", "--out", o1.to_str().expect("utf8")]);
    passes(&o1, &[]);
    fails(
        &e2,
        &["--previous", o1.to_str().expect("utf8")],
        "store",
        None,
    );
    // And the untouched originals still verify.
    passes(&e1, &[]);
}

#[test]
fn prune_after_export_and_the_next_export_continues_the_first() {
    let (env, _daemon, _) = setup();
    traffic(&env, 5);
    let work = env.dir.path().join("p");
    std::fs::create_dir(&work).expect("mkdir");
    let e1 = work.join("e1");
    let x = export(&env, &e1, &["--format", "csv"]);
    let last1 = x["last_seq"].as_u64().expect("last");
    let before = audit(&env.db()).len();
    let p = carol(&env, &["audit", "prune", "--before", "now", "--yes"]);
    assert_eq!(p["first_seq"], 1);
    assert_eq!(p["last_seq"], last1, "exactly the exported range: {p}");
    let after = audit(&env.db());
    assert!(after.len() < before);
    assert_eq!(
        after.first().and_then(|r| r["seq"].as_u64()),
        Some(last1 + 1),
        "nothing exported is left, nothing unexported went"
    );
    // Nothing exported is left to prune.
    let (rc, v) = as_op(
        &env,
        "carol",
        AUDITOR_PW,
        &["audit", "prune", "--before", "now", "--yes"],
    );
    assert_eq!(rc, 1, "{v}");

    traffic(&env, 3);
    let e2 = work.join("e2");
    export(&env, &e2, &["--format", "ocsf"]);
    let m2 = manifest(&e2);
    assert_eq!(
        m2.first_seq,
        last1 + 1,
        "the export starts where the prune left off"
    );
    passes(&e1, &[]);
    passes(&e2, &[]);
    let v = passes(&e2, &["--previous", e1.to_str().expect("utf8")]);
    assert!(
        v["message"].as_str().expect("m").contains("continues"),
        "{v}"
    );
    // The prune itself is evidence.
    let recs = lines(&e2.join(export::RECORDS));
    assert!(recs.iter().any(|l| l.contains("\"op\":\"audit_prune\"")
        && l.contains("\"result\":\"ok\"")
        && l.contains("\"operator\":\"carol\"")));
}

/// What someone with the store does while the daemon is down: deletes the
/// records after `cut` and their checkpoints. Then the daemon starts and
/// is unsealed again.
fn cut_tail_and_restart(env: &Env, shares: &[String], cut: u64) -> Daemon {
    let conn = tde_sidecar::store::connect(&env.db()).expect("db");
    conn.execute("DELETE FROM audit WHERE seq > ?1", [cut as i64])
        .expect("delete");
    conn.execute(
        "DELETE FROM audit_checkpoint WHERE last_seq > ?1",
        [cut as i64],
    )
    .expect("delete");
    drop(conn);
    let daemon = env.serve();
    env.unseal(&shares[..3]);
    daemon
}

#[test]
fn a_store_tail_deleted_while_stopped_is_reported() {
    let (env, daemon, shares) = setup();
    traffic(&env, 5);
    let work = env.dir.path().join("s");
    std::fs::create_dir(&work).expect("mkdir");
    let e1 = work.join("e1");
    let x = export(&env, &e1, &[]);
    let last1 = x["last_seq"].as_u64().expect("last");
    daemon.stop();
    // Someone with the store deletes its newest records and checkpoints
    // while the daemon is down.
    let cut = last1 - 6;
    let _daemon = cut_tail_and_restart(&env, &shares, cut);
    traffic(&env, 2);
    // The store's chain is whole again (shorter, then new records): only
    // the earlier export shows what is missing.
    let e2 = work.join("e2");
    export(&env, &e2, &[]);
    passes(&e2, &[]);
    let msg = fails(
        &e2,
        &["--previous", e1.to_str().expect("utf8")],
        "fork",
        Some(cut + 1),
    );
    assert!(
        msg.contains(&format!(
            "record {} differs from the previous export",
            cut + 1
        )),
        "{msg}"
    );
    assert!(msg.contains(&format!("{}..={last1}", cut + 1)), "{msg}");
}

/// Every record and checkpoint in the store, as (seq or checkpoint id,
/// line), from the store itself.
fn store_lines(db: &Path) -> (Vec<String>, Vec<String>) {
    let conn = tde_sidecar::store::connect(db).expect("db");
    let read = |sql: &str| -> Vec<String> {
        let mut st = conn.prepare(sql).expect("prepare");
        st.query_map([], |r| r.get::<_, String>(0))
            .expect("query")
            .map(|r| r.expect("row"))
            .collect()
    };
    (
        read("SELECT record FROM audit ORDER BY seq"),
        read("SELECT body FROM audit_checkpoint ORDER BY id"),
    )
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !ok() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A syslog daemon's socket: every datagram, as text.
fn syslog_listener(path: &Path) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    let sock = std::os::unix::net::UnixDatagram::bind(path).expect("bind");
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .expect("chmod");
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let out = got.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        while let Ok(n) = sock.recv(&mut buf) {
            out.lock()
                .expect("lock")
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    });
    got
}

#[test]
fn file_and_syslog_sinks_get_every_record_and_checkpoint() {
    let sinks = tempfile::tempdir().expect("tmp");
    let file = sinks.path().join("audit.jsonl");
    let log_sock = sinks.path().join("log.sock");
    let env = Env::new(&format!(
        "[audit]\ncheckpoint_records = 20\n[audit.file]\npath = \"{}\"\n[audit.syslog]\nsocket = \"{}\"\nfacility = \"local3\"\n",
        file.display(),
        log_sock.display()
    ));
    let syslog = syslog_listener(&log_sock);
    let (env, daemon, shares) = started(env);
    traffic(&env, 10);

    // logrotate: the file is moved away, then SIGHUP; the sink writes a
    // new file from there.
    let rotated = sinks.path().join("audit.jsonl.1");
    wait_for("the file sink catches up", || {
        let (records, _) = store_lines(&env.db());
        std::fs::read_to_string(&file)
            .map(|t| {
                t.lines()
                    .filter(|l| !l.contains("\"type\":\"checkpoint\""))
                    .count()
            })
            .unwrap_or(0)
            == records.len()
    });
    std::fs::rename(&file, &rotated).expect("rotate");
    let pid = rustix::process::Pid::from_raw(daemon.pid() as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).expect("hup");
    wait_for("a new file after SIGHUP", || file.exists());
    traffic(&env, 3);

    // A syslog daemon that goes away: requests go on, the sink reports
    // it, and catches up when it is back.
    let (rc, st) = env.json(&["status"]);
    assert_eq!(rc, 0, "{st}");
    assert_eq!(st["audit_sinks"].as_array().map(Vec::len), Some(2), "{st}");
    std::fs::remove_file(&log_sock).expect("rm");
    traffic(&env, 2);
    wait_for("the syslog sink says it fails", || {
        let (_, st) = env.json(&["status"]);
        st["audit_sinks"].as_array().into_iter().flatten().any(|k| {
            k["name"].as_str().is_some_and(|n| n.starts_with("syslog:"))
                && k["error"].is_string()
                && k["lag"].as_u64() > Some(0)
        })
    });
    let syslog = {
        let before = syslog.lock().expect("lock").clone();
        let again = syslog_listener(&log_sock);
        again.lock().expect("lock").extend(before);
        again
    };
    wait_for("the syslog sink catches up", || {
        let (_, st) = env.json(&["status"]);
        st["audit_sinks"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|k| k["error"].is_null() && k["lag"] == 0)
    });
    // An export whose newest records were removed with their checkpoint:
    // the sink's copy of the export checkpoint says where it ended.
    let e0 = env.dir.path().join("before-cut");
    export(&env, &e0, &[]);
    let t = env.dir.path().join("cut-export");
    copy_dir(&e0, &t);
    let mut m = manifest(&t);
    let orig = lines(&t.join(export::RECORDS));
    let keep = orig.len() - 2;
    write_lines(&t.join(export::RECORDS), &orig[..keep]);
    m.last_seq -= 2;
    m.count -= 2;
    let mut prev: [u8; 32] = hex::decode(&m.anchor).expect("hex").try_into().expect("32");
    for l in &orig[..keep] {
        prev = chain_hash(&prev, l.as_bytes());
    }
    m.head = hex::encode(prev);
    m.checkpoints.retain(|c| c.last_seq <= m.last_seq);
    save_manifest(&t, &m);
    fix_digests(&t);
    let (_, alone) = verify(&t, &["--max-unsigned", "1000"]);
    assert_eq!(
        alone["ok"], true,
        "alone nothing says more records were there: {alone}"
    );
    wait_for("the live sink has the export checkpoint", || {
        std::fs::read_to_string(&file).is_ok_and(|s| s.contains("\"reason\":\"export\""))
    });
    let msg = fails(
        &t,
        &[
            "--max-unsigned",
            "1000",
            "--sink",
            file.to_str().expect("utf8"),
        ],
        "removed",
        Some(m.last_seq + 1),
    );
    assert!(msg.contains("the sink's export checkpoint"), "{msg}");
    daemon.stop();

    // The file sink: every record once, in order, and every checkpoint,
    // across the rotation.
    let (records, checkpoints) = store_lines(&env.db());
    let mut sink_lines = lines(&rotated);
    sink_lines.extend(lines(&file));
    let (sink_checkpoints, sink_records): (Vec<String>, Vec<String>) = sink_lines
        .into_iter()
        .partition(|l| l.contains("\"type\":\"checkpoint\""));
    assert_eq!(
        sink_records, records,
        "the file sink holds every record, in order"
    );
    assert_eq!(sink_checkpoints, checkpoints, "and every checkpoint");
    assert!(
        checkpoints
            .iter()
            .any(|c| c.contains("\"reason\":\"shutdown\""))
    );
    assert!(
        !lines(&file).is_empty(),
        "records after SIGHUP went to the new file"
    );

    // Syslog: RFC 5424 with the facility asked for, every record and
    // checkpoint (some twice after the outage: at least once).
    let got = syslog.lock().expect("lock").clone();
    let mut seqs = std::collections::BTreeSet::new();
    let mut cks = 0;
    for m in &got {
        let pri: u16 = m[1..m.find('>').expect(">")].parse().expect("pri");
        assert_eq!(pri / 8, 19, "local3: {m}");
        assert!(m[m.find('>').expect(">") + 1..].starts_with("1 "), "{m}");
        let json = &m[m.find(" - ").expect("msg") + 3..];
        let v: Value = serde_json::from_str(json).expect("json");
        if v["type"] == "checkpoint" {
            cks += 1;
        } else {
            seqs.insert(v["seq"].as_u64().expect("seq"));
        }
    }
    let all: std::collections::BTreeSet<u64> = records
        .iter()
        .map(|r| {
            serde_json::from_str::<Value>(r).expect("json")["seq"]
                .as_u64()
                .expect("seq")
        })
        .collect();
    assert_eq!(seqs, all, "syslog received every record");
    assert!(cks >= checkpoints.len(), "and every checkpoint");

    // The store's tail deleted while the daemon is down: the sink's copy
    // names what is missing.
    let sink_copy = sinks.path().join("sink-copy.jsonl");
    let mut all_lines = lines(&rotated);
    all_lines.extend(lines(&file));
    write_lines(&sink_copy, &all_lines);
    let last = all.iter().max().copied().expect("records");
    let cut = last - 5;
    let _daemon = cut_tail_and_restart(&env, &shares, cut);
    traffic(&env, 1);
    let e = env.dir.path().join("after-cut");
    export(&env, &e, &[]);
    passes(&e, &[]);
    let msg = fails(
        &e,
        &["--sink", sink_copy.to_str().expect("utf8")],
        "sink",
        Some(cut + 1),
    );
    assert!(
        msg.contains(&format!("record {} differs from the sink's copy", cut + 1)),
        "{msg}"
    );
    // The live file sink saw both versions of those records.
    let msg = fails(&e, &["--sink", file.to_str().expect("utf8")], "sink", None);
    assert!(
        msg.contains("two versions") || msg.contains("differs"),
        "{msg}"
    );
}

/// A tmpfs mounted for one test, unmounted however the test ends.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).expect("mkdir");
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_full_disk_fails_key_operations_closed_and_they_come_back_without_a_gap() {
    if !rustix::process::geteuid().is_root() {
        skip("needs root to mount a small tmpfs");
        return;
    }
    let env = Env::new("");
    let disk = env.dir.path().join("small-disk");
    let Some(_tmpfs) = Tmpfs::mount(&disk, "1536k") else {
        skip("cannot mount a tmpfs here");
        return;
    };
    let db = disk.join("tde.db");
    let mut text = std::fs::read_to_string(&env.config).expect("config");
    text = text.replacen(
        "[log]",
        &format!("[store]\npath = \"{}\"\n[log]", db.display()),
        1,
    );
    std::fs::write(&env.config, text).expect("config");
    let shares = env.init();
    let _daemon = env.serve();
    env.unseal(&shares[..3]);
    env.ok(&["key", "create", "pg-main"]);

    // Fill the disk to the last byte.
    let filler = disk.join("filler");
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&filler).expect("filler");
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
    // Key operations fail closed: no data key without its record. SQLite
    // reuses WAL space it already has, so a few may still fit.
    let mut raw = Raw::connect(&env.data_socket());
    let generate = Request::GenerateDataKey {
        key: "pg-main".into(),
        context: ctx(&[("tablespace", "full")]),
    };
    let mut refused = None;
    for _ in 0..20_000 {
        match raw.call(&generate) {
            Response::DataKey { .. } => continue,
            Response::Error { code, message } => {
                refused = Some((code, message));
                break;
            }
            r => panic!("unexpected {r:?}"),
        }
    }
    let (code, message) = refused.expect("a full disk refuses key operations");
    assert_eq!(code, ErrorCode::AuditFailed, "{message}");
    assert!(
        message.contains("audit record could not be written") && message.contains("full"),
        "a clear error: {message}"
    );
    // Still refused while the disk stays full.
    assert!(matches!(
        raw.call(&generate),
        Response::Error {
            code: ErrorCode::AuditFailed,
            ..
        }
    ));
    let (rc, v) = env.json(&["datakey", "generate", "--key", "pg-main"]);
    assert_eq!(
        (rc, v["error"]["code"].as_str()),
        (1, Some("AUDIT_FAILED")),
        "{v}"
    );

    // Space comes back: so does the service, by itself.
    std::fs::remove_file(&filler).expect("free");
    match raw.call(&generate) {
        Response::DataKey { .. } => {}
        r => panic!("not back after space returned: {r:?}"),
    }
    env.ok(&["datakey", "generate", "--key", "pg-main"]);
    // No gap: the chain verifies from the first record to the last, and
    // every record's number follows the one before.
    let records = audit(&db);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["seq"].as_u64(), Some(i as u64 + 1));
    }
    assert!(records.iter().all(|r| r["error_code"] != "AUDIT_FAILED"));
    let e = env.dir.path().join("after-full");
    env.ok(&["audit", "export", "--out", e.to_str().expect("utf8")]);
    passes(&e, &[]);
}

#[test]
fn retention_prunes_exported_records_and_routine_reads_are_summarized() {
    let (env, _daemon, _) = started(Env::new(
        "[audit]\nretention = \"1s\"\nroutine_reads = \"summarize\"\n",
    ));
    for _ in 0..5 {
        env.status();
    }
    traffic(&env, 3);
    // Nothing was exported: retention keeps everything.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert_eq!(audit(&env.db())[0]["seq"], 1);
    let e = env.dir.path().join("e");
    let x = export(&env, &e, &[]);
    let last = x["last_seq"].as_u64().expect("last");
    wait_for("retention prunes the exported records", || {
        audit(&env.db())[0]["seq"].as_u64() == Some(last + 1)
    });
    let records = audit(&env.db());
    // Pruned by the daemon, from the first record to the export's last
    // (in one go, or as they aged past the second).
    let prunes: Vec<&str> = records
        .iter()
        .filter(|r| r["op"] == "audit_prune" && r["socket"] == "internal")
        .filter_map(|r| r["detail"].as_str())
        .collect();
    assert!(prunes[0].contains("records 1..="), "{prunes:?}");
    assert!(
        prunes
            .last()
            .is_some_and(|p| p.contains(&format!("..={last} pruned"))),
        "{prunes:?}"
    );
    // The status reads: counted, not recorded one by one; key use still is.
    let exported = lines(&e.join(export::RECORDS));
    let all: Vec<Value> = exported
        .iter()
        .map(|l| serde_json::from_str(l).expect("json"))
        .chain(records.clone())
        .collect();
    assert_eq!(count(&all, "status", "ok"), 0);
    assert!(count(&all, "decrypt", "ok") >= 3);
    // ... in `routine_reads` records, one per peer per tick, that add up.
    let summarized: u64 = all
        .iter()
        .filter(|r| r["op"] == "routine_reads")
        .filter_map(|r| r["detail"].as_str())
        .filter(|d| d.contains(" successful status requests on the admin socket"))
        .filter_map(|d| d.split(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(summarized >= 5, "{summarized} status reads summarized");
    // The next export verifies from the prune's checkpoint.
    let e2 = env.dir.path().join("e2");
    export(&env, &e2, &[]);
    passes(&e2, &["--previous", e.to_str().expect("utf8")]);
}
