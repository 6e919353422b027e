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

/// `tde ARGS --json` with `HOME` at `home` and no password in the
/// environment: what an operator who ran `tde login` types.
fn with_token(env: &Env, home: &std::path::Path, args: &[&str]) -> (i32, serde_json::Value) {
    let out = env
        .cmd(args)
        .arg("--json")
        .env_remove("TDE_PASSWORD")
        .env_remove("XDG_CONFIG_HOME")
        .env("HOME", home)
        .output()
        .expect("run tde");
    parse(&out, args)
}

/// Vault's `vault login`: a session token used, expired, revoked by a
/// password change, and ended by `tde logout`.
#[test]
fn a_login_token_is_used_expires_and_is_revoked() {
    let env = Env::new("");
    let shares = env.init();
    let _daemon = env.serve();
    env.unseal(&shares[..3]);
    env.ok(&["key", "create", "pg-main"]);
    env.ok_new_password(
        &["operator", "add", "bob", "--role", "crypto_officer"],
        "bob-password-1",
    );
    let home = tempfile::tempdir().expect("home");
    let token_file = home.path().join(".config/tde/token");
    let login = |ttl: &str, password: &str| {
        let out = env
            .cmd(&["login", "--operator", "bob", "--ttl", ttl, "--json"])
            .env("TDE_PASSWORD", password)
            .env_remove("XDG_CONFIG_HOME")
            .env("HOME", home.path())
            .output()
            .expect("run tde login");
        parse(&out, &["login"])
    };

    // Without a login there is no password: refused before any request.
    let (rc, v) = with_token(&env, home.path(), &["key", "list"]);
    assert_eq!(rc, 2, "{v}");
    // Log in: the token file is private and holds no password.
    let (rc, v) = login("1h", "bob-password-1");
    assert_eq!(rc, 0, "{v}");
    assert_eq!(
        (v["role"].as_str(), v["ttl_seconds"].as_u64()),
        (Some("crypto_officer"), Some(3600))
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&token_file)
        .expect("token file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let saved = std::fs::read_to_string(&token_file).expect("read");
    assert!(!saved.contains("bob-password-1"));
    // Used: admin commands need no password now, and act as bob.
    let (rc, v) = with_token(&env, home.path(), &["key", "rotate", "pg-main"]);
    assert_eq!((rc, v["primary_version"].as_u64()), (0, Some(2)), "{v}");
    let recs = audit(&env.db());
    let rotated = recs
        .iter()
        .rev()
        .find(|r| r["op"] == "key_rotate")
        .expect("record");
    assert_eq!(rotated["actor"]["operator"], "bob");
    assert!(count(&recs, "token_login", "ok") >= 1);
    // A login may not ask for more than 12 hours.
    let (rc, v) = login("30d", "bob-password-1");
    assert_eq!((rc, v["ttl_seconds"].as_u64()), (0, Some(12 * 3600)), "{v}");

    // Revoked by a password change (by an officer, here admin).
    env.ok_new_password(&["operator", "passwd", "bob"], "bob-password-2");
    let out = env
        .cmd(&["key", "list"])
        .env_remove("TDE_PASSWORD")
        .env("HOME", home.path())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the saved login of \"bob\" has ended"),
        "{err}"
    );
    assert!(err.contains("password changed"), "{err}");
    assert!(!token_file.exists(), "an ended token is forgotten");

    // Expired.
    let (rc, v) = login("1s", "bob-password-2");
    assert_eq!(rc, 0, "{v}");
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let out = env
        .cmd(&["key", "list"])
        .env_remove("TDE_PASSWORD")
        .env("HOME", home.path())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("expired"),
        "{out:?}"
    );

    // Logout revokes it in the daemon, not only on disk.
    let (rc, v) = login("1h", "bob-password-2");
    assert_eq!(rc, 0, "{v}");
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&token_file).expect("read")).expect("json");
    let token = saved["token"].as_str().expect("token").to_string();
    let (rc, v) = with_token(&env, home.path(), &["logout"]);
    assert_eq!((rc, v["logged_out"].as_bool()), (0, Some(true)), "{v}");
    assert!(!token_file.exists());
    let mut raw = Raw::connect(&env.admin_socket());
    match raw.call(&tde_protocol::Request::TokenLogin {
        token: tde_protocol::SecretBytes::from_slice(token.as_bytes()),
    }) {
        tde_protocol::Response::Error { code, .. } => {
            assert_eq!(code, tde_protocol::ErrorCode::NotAuthenticated)
        }
        r => panic!("a revoked token logged in: {r:?}"),
    }
    // No token in the daemon's log or the audit log.
    let log = std::fs::read_to_string(env.log()).expect("log");
    assert!(!log.contains(&token));
    let recs = audit(&env.db());
    assert!(!recs.iter().any(|r| r.to_string().contains(&token)));
}

/// Vault's `operator rekey`: custodian turnover. An officer starts a
/// re-split, three current shares approve it, the new shares (2 of 3)
/// unseal after a restart while the old ones fail; keys are untouched.
#[test]
fn a_resplit_makes_new_shares_that_unseal_while_the_old_fail() {
    let env = Env::new("");
    let shares = env.init();
    let daemon = env.serve();
    env.unseal(&shares[..3]);
    env.ok(&["key", "create", "app-kept"]);
    let g = env.ok(&["datakey", "generate", "--key", "app-kept"]);
    let blob = g["ciphertext"].as_str().expect("ct").to_string();

    let st = env.ok(&["resplit", "--init", "--shares", "3", "--threshold", "2"]);
    let nonce = st["nonce"].as_str().expect("nonce").to_string();
    assert_eq!(
        (st["needed"].as_u64(), st["progress"].as_u64()),
        (Some(3), Some(0))
    );
    assert_eq!(
        env.ok(&["resplit"])["nonce"],
        nonce.as_str(),
        "status shows it"
    );
    // A share from standard input, as custodians give them.
    let give = |share: &str| {
        let args = ["resplit", "--nonce", &nonce];
        parse(&env.piped(&args, &format!("{share}\n")), &args)
    };
    let (rc, v) = give(&shares[4]);
    assert_eq!((rc, v["progress"].as_u64()), (0, Some(1)), "{v}");
    let (rc, v) = give(&shares[4]);
    assert_eq!(
        (rc, v["error"]["code"].as_str()),
        (1, Some("INVALID_SHARE")),
        "{v}"
    );
    assert_eq!(give(&shares[1]).1["progress"], 2);
    // Not a custodian's job to guess: a wrong nonce is refused.
    let wrong = env.refused(
        &[
            "resplit",
            "--nonce",
            "0000000000000000",
            "--share",
            &shares[0],
        ],
        "INVALID_ARGUMENT",
    );
    assert!(wrong.contains(&nonce), "{wrong}");
    let dir = env.dir.path().join("new-shares");
    let (rc, v) = {
        let mut args = vec!["resplit", "--nonce", &nonce, "--share-file"];
        let f = env.dir.path().join("share-0");
        std::fs::write(&f, &shares[0]).expect("write");
        let f = f.display().to_string();
        let d = dir.display().to_string();
        args.extend([f.as_str(), "--share-dir", d.as_str()]);
        env.json(&args)
    };
    assert_eq!(rc, 0, "{v}");
    let new: Vec<String> = v["shares"]
        .as_array()
        .expect("new shares")
        .iter()
        .map(|s| s.as_str().expect("share").to_string())
        .collect();
    assert_eq!((new.len(), v["threshold"].as_u64()), (3, Some(2)));
    assert_eq!(
        std::fs::read_to_string(dir.join("share-2")).expect("file"),
        new[1]
    );
    assert!(new.iter().all(|n| !shares.contains(n)));
    let st = env.status();
    assert_eq!(
        (st["threshold"].as_u64(), st["shares"].as_u64()),
        (Some(2), Some(3))
    );

    // After a restart: every old share fails, two new ones unseal.
    daemon.stop();
    let _daemon = env.serve();
    for old in &shares {
        env.refused(&["unseal", old], "INVALID_SHARE");
    }
    env.ok(&["unseal", &new[2]]);
    assert_eq!(env.ok(&["unseal", &new[0]])["sealed"], false);
    let d = env.ok(&["datakey", "decrypt", "--ciphertext", &blob]);
    assert_eq!(d["plaintext"], g["plaintext"], "the keys are untouched");
    let recs = audit(&env.db());
    assert_eq!(count(&recs, "resplit_init", "ok"), 1);
    assert_eq!(count(&recs, "resplit_update", "ok"), 3);
    for s in shares.iter().chain(&new) {
        assert!(
            !recs.iter().any(|r| r.to_string().contains(s.as_str())),
            "a share in the audit log"
        );
    }
}

/// CloudHSM's quorum: with `[quorum] approvals = 1`, a key destruction
/// waits for a second officer; approved, it runs as its requester; without
/// an approval it expires and nothing is destroyed.
#[test]
fn a_destroy_waits_for_a_second_officer_and_expires_without_one() {
    let env = Env::new("[quorum]\napprovals = 1\ntimeout_seconds = 3\n");
    let shares = env.init();
    let _daemon = env.serve();
    env.unseal(&shares[..3]);
    env.ok_new_password(
        &["operator", "add", "bob", "--role", "crypto_officer"],
        "bob-password-1",
    );
    env.ok(&["key", "create", "app-q1"]);
    env.ok(&["key", "create", "app-q2"]);
    let as_bob = |args: &[&str]| {
        let out = env
            .cmd(args)
            .args(["--operator", "bob", "--json"])
            .env("TDE_PASSWORD", "bob-password-1")
            .output()
            .expect("run");
        parse(&out, args)
    };
    let state = |key: &str| {
        env.ok(&["key", "show", key])["versions"][0]["state"]
            .as_str()
            .expect("state")
            .to_string()
    };

    // Held: the key is untouched, the requester cannot approve it.
    let w = env.ok(&["key", "destroy", "app-q1", "--yes"]);
    assert_eq!(
        (w["state"].as_str(), w["needed"].as_u64()),
        (Some("waiting"), Some(1)),
        "{w}"
    );
    let id = w["id"].as_u64().expect("id").to_string();
    assert_eq!(state("app-q1"), "enabled");
    let own = env.refused(&["approve", &id], "PERMISSION_DENIED");
    assert!(own.contains("officer who made it"), "{own}");
    // A second officer approves: it runs, as admin's request.
    let (rc, v) = as_bob(&["approve", &id]);
    assert_eq!((rc, v["state"].as_str()), (0, Some("done")), "{v}");
    assert_eq!(v["approved_by"][0], "bob");
    assert_eq!(state("app-q1"), "destroyed");
    let (rc, v) = as_bob(&["approve", &id]);
    assert_eq!(rc, 1, "a finished request takes no approvals: {v}");

    // Not approved in time: expired, nothing destroyed.
    let w = env.ok(&["key", "destroy", "app-q2", "--yes"]);
    let id2 = w["id"].as_u64().expect("id").to_string();
    std::thread::sleep(std::time::Duration::from_millis(4200));
    let s = env.ok(&["approvals", &id2]);
    assert_eq!(s["state"], "expired", "{s}");
    assert_eq!(state("app-q2"), "enabled");
    let (rc, v) = as_bob(&["approve", &id2]);
    assert_eq!(rc, 1, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("expired")),
        "{v}"
    );
    let list = env.ok(&["approvals"]);
    assert_eq!(list.as_array().map(Vec::len), Some(2), "{list}");

    // An auditor may list, not approve; an operator removal is held too.
    env.ok_new_password(
        &["operator", "add", "carol", "--role", "auditor"],
        "carol-password-1",
    );
    let w = env.ok(&["operator", "remove", "carol"]);
    assert_eq!(w["state"], "waiting", "{w}");
    let out = env
        .cmd(&[
            "approve",
            &w["id"].as_u64().expect("id").to_string(),
            "--operator",
            "carol",
        ])
        .env("TDE_PASSWORD", "carol-password-1")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1), "{out:?}");

    let recs = audit(&env.db());
    assert_eq!(count(&recs, "approval_request", "ok"), 3);
    assert_eq!(count(&recs, "approval_expired", "error"), 1);
    let ran: Vec<_> = recs
        .iter()
        .filter(|r| r["op"] == "key_destroy" && r["result"] == "ok")
        .collect();
    assert_eq!(ran.len(), 1, "only the approved one ran");
    assert_eq!(ran[0]["actor"]["operator"], "admin");
    assert!(
        ran[0]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("approved by bob")),
        "{}",
        ran[0]
    );
}

/// A throwaway GnuPG home whose agent is stopped when dropped: the
/// custodians' side of encrypted shares, with the real `gpg`.
struct Gpg {
    home: tempfile::TempDir,
}

impl Gpg {
    fn new() -> Option<Gpg> {
        let found = std::process::Command::new("gpg")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        // Short and under /tmp: the agent's socket path has a length limit.
        let home = tempfile::Builder::new()
            .prefix("tde-gpg-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        found.then_some(Gpg { home })
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        let out = std::process::Command::new("gpg")
            .args(["--batch", "--quiet", "--no-tty", "--passphrase", ""])
            .args(args)
            .env("GNUPGHOME", self.home.path())
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run gpg");
        assert!(out.status.success(), "gpg {args:?}: {out:?}");
        out
    }

    /// Makes a key (`gpg --quick-gen-key`, at `faked_time` if given) and
    /// exports its public key to a file, armored or binary; returns the
    /// file and the fingerprint.
    fn key(
        &self,
        uid: &str,
        algo: &str,
        usage: &str,
        faked_time: Option<&str>,
        armor: bool,
    ) -> (String, String) {
        let mut args = vec![];
        if let Some(t) = faked_time {
            args.extend(["--faked-system-time", t]);
        }
        let expire = if faked_time.is_some() { "1y" } else { "never" };
        args.extend(["--quick-gen-key", uid, algo, usage, expire]);
        self.run(&args);
        let colons = String::from_utf8(self.run(&["--with-colons", "--fingerprint", uid]).stdout)
            .expect("utf-8");
        let fpr = colons
            .lines()
            .find_map(|l| l.strip_prefix("fpr:::::::::"))
            .and_then(|l| l.split(':').next())
            .expect("fingerprint")
            .to_string();
        let file = self
            .home
            .path()
            .join(format!("{fpr}.{}", if armor { "asc" } else { "gpg" }));
        let file = file.display().to_string();
        self.export(&fpr, &file, armor);
        (file, fpr)
    }

    /// Writes the public key `fpr` to `file` (`gpg --export`).
    fn export(&self, fpr: &str, file: &str, armor: bool) {
        let args: &[&str] = if armor {
            &["--export", "--armor", fpr]
        } else {
            &["--export", fpr]
        };
        std::fs::write(file, self.run(args).stdout).expect("write key");
    }

    /// Revokes a key with the certificate GnuPG made with it, and exports
    /// it again to `file`.
    fn revoke(&self, fpr: &str, file: &str) {
        let rev = self
            .home
            .path()
            .join("openpgp-revocs.d")
            .join(format!("{fpr}.rev"));
        let text = std::fs::read_to_string(&rev).expect("revocation certificate");
        // GnuPG guards the certificate against an import by mistake.
        std::fs::write(&rev, text.replace(":-----BEGIN", "-----BEGIN")).expect("write");
        self.run(&["--import", &rev.display().to_string()]);
        self.export(fpr, file, true);
    }

    /// `gpg --decrypt FILE`, as a custodian does.
    fn decrypt(&self, file: &std::path::Path) -> String {
        let f = file.display().to_string();
        String::from_utf8(self.run(&["--decrypt", &f]).stdout).expect("utf-8")
    }
}

impl Drop for Gpg {
    fn drop(&mut self) {
        let _ = std::process::Command::new("gpgconf")
            .args(["--kill", "all"])
            .env("GNUPGHOME", self.home.path())
            .output();
    }
}

/// Runs `tde ARGS --json` with `input` on standard input.
fn json_with_stdin(env: &Env, args: &[&str], input: &str) -> (i32, serde_json::Value) {
    parse(&env.piped(args, input), args)
}

/// Vault's `-pgp-keys`: at `tde init` and at a re-split, each share is
/// encrypted to one custodian's OpenPGP key (made by GnuPG, RSA and
/// Curve25519, armored and binary), so no share is ever shown or logged in
/// clear; custodians decrypt with `gpg` and unseal. Keys that cannot take
/// a share (sign-only, expired, not a key, too few) are refused before
/// anything is created, by the CLI and by the daemon itself.
#[test]
fn shares_encrypted_to_custodian_keys_unseal_once_gpg_decrypts_them() {
    let Some(gpg) = Gpg::new() else {
        return skip("no gpg (Debian: gnupg)");
    };
    let (alice, alice_fpr) = gpg.key(
        "Alice <alice@example.org>",
        "rsa3072",
        "default",
        None,
        true,
    );
    // An RSA encryption subkey, and the key exported again with it.
    gpg.run(&["--quick-add-key", &alice_fpr, "rsa3072", "encr", "never"]);
    gpg.export(&alice_fpr, &alice, true);
    let (bob, bob_fpr) = gpg.key(
        "Bob <bob@example.org>",
        "futuredefault",
        "default",
        None,
        false,
    );
    let (carol, _) = gpg.key("Carol <carol@example.org>", "ed25519", "sign", None, true);
    let (old, _) = gpg.key(
        "Old <old@example.org>",
        "futuredefault",
        "default",
        Some("20200101T000000!"),
        true,
    );
    let (revoked, revoked_fpr) = gpg.key(
        "Gone <gone@example.org>",
        "futuredefault",
        "default",
        None,
        true,
    );
    gpg.revoke(&revoked_fpr, &revoked);
    let env = Env::new("");
    let junk = env.dir.path().join("junk.asc");
    std::fs::write(&junk, "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nAAAA\n").expect("write");
    let junk = junk.display().to_string();

    let init = |keys: &str, dir: &str| {
        env.json(&[
            "init",
            "--shares",
            "3",
            "--threshold",
            "2",
            "--pgp-keys",
            keys,
            "--share-dir",
            dir,
        ])
    };
    let dir = env.dir.path().join("shares");
    let d = dir.display().to_string();
    for (keys, why) in [
        (
            format!("{alice},{carol},{bob}"),
            "has no valid encryption subkey",
        ),
        (format!("{alice},{bob},{old}"), "has expired"),
        (format!("{revoked},{bob},{alice}"), "is revoked"),
        (format!("{junk},{bob},{alice}"), "not an OpenPGP public key"),
        (format!("{alice},{bob}"), "give one public key per share"),
    ] {
        let (rc, v) = init(&keys, &d);
        assert_eq!(rc, 2, "{keys}: {v}");
        let msg = v["error"]["message"].as_str().expect("message");
        assert!(msg.contains(why), "{keys}: {msg}");
        assert!(!env.db().exists(), "a refused init created a store");
    }

    // Shares 1 and 3 to Alice (RSA), 2 to Bob (Curve25519).
    let (rc, v) = init(&format!("{alice},{bob},{alice}"), &d);
    assert_eq!(rc, 0, "{v}");
    assert_eq!(
        v["pgp_fingerprints"],
        serde_json::json!([alice_fpr, bob_fpr, alice_fpr])
    );
    let sealed: Vec<&str> = v["shares"]
        .as_array()
        .expect("shares")
        .iter()
        .map(|s| s.as_str().expect("share"))
        .collect();
    assert_eq!(sealed.len(), 3);
    let clear: Vec<String> = (1..=3)
        .map(|i| {
            let f = dir.join(format!("share-{i}.asc"));
            assert_eq!(std::fs::read_to_string(&f).expect("file"), sealed[i - 1]);
            gpg.decrypt(&f)
        })
        .collect();
    for (c, s) in clear.iter().zip(&sealed) {
        assert!(s.starts_with("-----BEGIN PGP MESSAGE-----"), "{s}");
        assert!(c.starts_with("tde-share-1-"), "gpg gave back a share");
        assert!(
            !v.to_string().contains(c.trim()),
            "a clear share in the output"
        );
    }

    let daemon = env.serve();
    // An encrypted share given as it is: told to decrypt it, nothing sent.
    let (rc, v) = json_with_stdin(&env, &["unseal"], sealed[0]);
    assert_eq!(rc, 2, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .expect("msg")
            .contains("gpg --decrypt"),
        "{v}"
    );
    assert_eq!(env.status()["progress"], 0);
    // `gpg --decrypt share-N.asc | tde unseal`.
    json_with_stdin(&env, &["unseal"], &clear[1]);
    let (rc, v) = json_with_stdin(&env, &["unseal"], &clear[2]);
    assert_eq!((rc, v["sealed"].as_bool()), (0, Some(false)), "{v}");

    // The daemon checks the keys itself: an officer's raw request with a
    // sign-only key is refused before a re-split starts.
    let mut raw = Raw::connect(&env.admin_socket());
    assert!(matches!(
        raw.call(&tde_protocol::Request::Login {
            operator: "admin".into(),
            password: tde_protocol::SecretBytes::from_slice(PASSWORD.as_bytes()),
        }),
        tde_protocol::Response::LoggedIn { .. }
    ));
    let sign_only = std::fs::read(&carol).expect("read");
    match raw.call(&tde_protocol::Request::ResplitInit {
        threshold: 2,
        shares: 2,
        custodian_keys: vec![std::fs::read(&bob).expect("read"), sign_only],
    }) {
        tde_protocol::Response::Error { code, message } => {
            assert_eq!(code, tde_protocol::ErrorCode::InvalidArgument);
            assert!(
                message.contains("custodian key 2") && message.contains("encryption"),
                "{message}"
            );
        }
        r => panic!("a sign-only custodian key was taken: {r:?}"),
    }
    assert_eq!(env.ok(&["resplit"])["nonce"], "", "no re-split started");

    // A re-split to Bob and Alice: the daemon encrypts, the custodian who
    // gives the last share sees only messages.
    let st = env.ok(&[
        "resplit",
        "--init",
        "--shares",
        "2",
        "--threshold",
        "2",
        "--pgp-keys",
        &format!("{bob},{alice}"),
    ]);
    let nonce = st["nonce"].as_str().expect("nonce").to_string();
    assert_eq!(
        st["pgp_fingerprints"],
        serde_json::json!([bob_fpr, alice_fpr])
    );
    assert_eq!(
        env.ok(&["resplit"])["pgp_fingerprints"],
        st["pgp_fingerprints"]
    );
    // The custodian sees where the new shares go before giving a share.
    let args = ["resplit", "--nonce", &nonce];
    let out = env.piped(&args, &clear[0]);
    let said = String::from_utf8_lossy(&out.stderr);
    let (rc, v) = parse(&out, &args);
    assert_eq!((rc, v["progress"].as_u64()), (0, Some(1)), "{v}");
    assert!(
        said.contains(&format!("check them: {bob_fpr}, {alice_fpr}")),
        "{said}"
    );
    let new_dir = env.dir.path().join("new-shares");
    let nd = new_dir.display().to_string();
    let (rc, v) = json_with_stdin(
        &env,
        &["resplit", "--nonce", &nonce, "--share-dir", &nd],
        &clear[2],
    );
    assert_eq!(rc, 0, "{v}");
    assert_eq!(
        v["pgp_fingerprints"],
        serde_json::json!([bob_fpr, alice_fpr])
    );
    let new: Vec<String> = (1..=2)
        .map(|i| gpg.decrypt(&new_dir.join(format!("share-{i}.asc"))))
        .collect();
    for n in &new {
        assert!(n.starts_with("tde-share-1-") && !clear.contains(n));
        assert!(
            !v.to_string().contains(n.trim()),
            "a clear new share in the output"
        );
    }

    // No share in clear in the daemon's log or the audit log; the audit
    // names the custodian keys.
    let log = std::fs::read_to_string(env.log()).expect("log");
    let recs = audit(&env.db());
    for s in clear.iter().chain(&new) {
        assert!(!log.contains(s.trim()), "a share in the daemon's log");
        assert!(
            !recs.iter().any(|r| r.to_string().contains(s.trim())),
            "a share in the audit log"
        );
    }
    assert!(
        recs.iter().any(|r| r["op"] == "resplit_init"
            && r["detail"].as_str().is_some_and(|d| d.contains(&bob_fpr)))
    );

    // Over the wire too, a completed re-split with custodian keys carries
    // no clear share: only the messages (here, the next custodian set,
    // two each for Bob and Alice, approved by the shares just made).
    let st = env.ok(&[
        "resplit",
        "--init",
        "--shares",
        "4",
        "--threshold",
        "2",
        "--pgp-keys",
        &format!("{bob},{alice},{bob},{alice}"),
    ]);
    let nonce = st["nonce"].as_str().expect("nonce").to_string();
    let mut give = |share: &str| {
        raw.call(&tde_protocol::Request::ResplitUpdate {
            nonce: nonce.clone(),
            share: tde_protocol::SecretBytes::from_slice(share.trim().as_bytes()),
        })
    };
    give(&new[0]);
    let last = match give(&new[1]) {
        tde_protocol::Response::Resplit(r) => r,
        r => panic!("{r:?}"),
    };
    assert!(last.new_shares.is_empty(), "clear shares on the wire");
    assert_eq!(
        last.fingerprints,
        [&bob_fpr, &alice_fpr, &bob_fpr, &alice_fpr].map(String::as_str)
    );
    let newest: Vec<String> = last
        .encrypted_shares
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let f = env.dir.path().join(format!("wire-share-{i}.asc"));
            std::fs::write(&f, m).expect("write");
            gpg.decrypt(&f)
        })
        .collect();
    assert_eq!(newest.len(), 4);

    // After a restart: the earlier shares fail, the decrypted newest unseal.
    daemon.stop();
    let _daemon = env.serve();
    for old in [&clear[0], &new[0]] {
        env.refused(&["unseal", old.trim()], "INVALID_SHARE");
    }
    json_with_stdin(&env, &["unseal"], &newest[0]);
    let (rc, v) = json_with_stdin(&env, &["unseal"], &newest[1]);
    assert_eq!((rc, v["sealed"].as_bool()), (0, Some(false)), "{v}");
}
