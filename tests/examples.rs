//! Issue 15, point 6: every file in examples/ runs in a test: the production
//! configuration loads and names every option, the tablespace script moves
//! a real cluster's table onto a mount, and the KMS-style client round-trips
//! a file through the data socket.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::Env;
use common::pg::*;

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name)
}

/// Every leaf key of a JSON configuration, dotted (`audit.file.path`).
fn leaves(prefix: &str, v: &serde_json::Value, out: &mut BTreeSet<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                leaves(&key, v, out);
            }
        }
        _ => {
            out.insert(prefix.to_string());
        }
    }
}

#[test]
fn the_production_config_loads_and_shows_every_option() {
    let path = example("tde.toml");
    let env = Env::new("");
    let load = |file: Option<&Path>| -> serde_json::Value {
        let mut c = env.cmd(&["serve", "--print-config", "--json"]);
        c.env_remove("TDE_CONFIG");
        if let Some(f) = file {
            c.arg("--config").arg(f);
        }
        let out = c.output().expect("tde");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("json")
    };
    let v = load(Some(&path));
    assert_eq!(v["metrics"]["listen"], "127.0.0.1:9464");
    assert_eq!(v["data_socket"]["path"], "/run/tde/data.sock");
    assert_eq!(
        v["clients"][0]["operations"].as_array().map(Vec::len),
        Some(3)
    );
    // Every option the daemon knows appears in the file, set or commented
    // (`key =` or `#key =`) in its section; the section headers too.
    let text = std::fs::read_to_string(&path).expect("read");
    let mut known = BTreeSet::new();
    leaves("", &load(None), &mut known);
    leaves("", &v, &mut known);
    let mut section = String::new();
    let mut present = BTreeSet::new();
    for line in text.lines() {
        let l = line.trim_start_matches('#').trim();
        if let Some(s) = l.strip_prefix("[[").and_then(|s| s.strip_suffix("]]")) {
            section = s.to_string();
        } else if let Some(s) = l.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            section = s.to_string();
        } else if let Some((k, _)) = l.split_once(" = ") {
            present.insert(if section.is_empty() {
                k.to_string()
            } else {
                format!("{section}.{k}")
            });
        }
    }
    let missing: Vec<&String> = known
        .iter()
        .filter(|k| !k.starts_with("clients"))
        .filter(|k| !present.contains(*k))
        .collect();
    assert!(
        missing.is_empty(),
        "options not in examples/tde.toml: {missing:?}"
    );
    // A policy shows every field.
    for f in [
        "name",
        "users",
        "groups",
        "uids",
        "gids",
        "keys",
        "operations",
        "context",
    ] {
        assert!(present.contains(&format!("clients.{f}")), "clients.{f}");
    }
}

#[test]
fn the_kms_client_example_round_trips_a_file() {
    let example_bin = std::env::current_exe()
        .expect("exe")
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("examples/kms_envelope");
    assert!(
        example_bin.exists(),
        "cargo test builds {}",
        example_bin.display()
    );
    let env = Env::new("");
    let d = env.sidecar_with_keys(&["app-files"]);
    let work = env.dir.path().join("work");
    std::fs::create_dir(&work).expect("mkdir");
    let file = work.join("report.txt");
    let body = b"quarterly numbers: 42\n".repeat(1000);
    std::fs::write(&file, &body).expect("write");
    let run = |args: &[&str], f: &Path| {
        Command::new(&example_bin)
            .args(args)
            .arg("--socket")
            .arg(env.data_socket())
            .arg(f)
            .output()
            .expect("example")
    };
    let out = run(&["encrypt", "--key", "app-files"], &file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let enc = work.join("report.txt.enc");
    let key_file = work.join("report.txt.key");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&key_file).expect("key file")).expect("json");
    assert_eq!(meta["key"], "app-files");
    assert_eq!(meta["context"]["file"], "report.txt");
    assert!(
        !std::fs::read(&enc)
            .expect("enc")
            .windows(10)
            .any(|w| w == &body[..10])
    );
    std::fs::remove_file(&file).expect("rm");
    let out = run(&["decrypt"], &enc);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&file).expect("decrypted"), body);

    // The key file next to another file does not unwrap for it (the
    // context is the file's name), and a changed ciphertext is refused.
    std::fs::copy(&enc, work.join("other.txt.enc")).expect("copy");
    std::fs::copy(&key_file, work.join("other.txt.key")).expect("copy");
    let out = run(&["decrypt"], &work.join("other.txt.enc"));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("CONTEXT_MISMATCH"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(&file).expect("rm");
    let mut bad = std::fs::read(&enc).expect("read");
    bad[40] ^= 1;
    std::fs::write(&enc, bad).expect("write");
    let out = run(&["decrypt"], &enc);
    assert!(String::from_utf8_lossy(&out.stderr).contains("fails authentication"));
    assert!(!file.exists());
    // Each use is in the audit log, as the sidecar's own record.
    let records = common::audit(&env.db());
    assert!(common::count(&records, "generate_data_key", "ok") >= 1);
    assert!(common::count(&records, "decrypt", "ok") >= 1);
    d.stop();
}

/// Unmounts what the script mounted, even when the test fails.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        detach(&self.0);
    }
}

#[test]
fn the_tablespace_script_moves_a_table_onto_a_mount() {
    if !can_run_as_root() || Command::new("runuser").arg("--help").output().is_err() {
        return;
    }
    let _serial = serial();
    let env = Env::new("");
    let d = env.sidecar_with_keys(&["pg-main"]);
    let backing = env.dir.path().join("backing");
    let mnt = env.dir.path().join("mnt");
    let _unmount = Unmount(mnt.clone());
    let mut pg = Pg::initdb(&env.pg_dir("cluster").join("data"), env.dir.path());
    pg.start();
    pg.sql(&[
        "CREATE TABLE card (id int PRIMARY KEY, pan text)",
        "INSERT INTO card SELECT g, 'PAN-MARKER-' || g FROM generate_series(1, 5000) g",
        "CREATE INDEX card_pan ON card (pan)",
        "CREATE TABLE other (x int)",
    ]);
    let sum = "SELECT md5(string_agg(id || pan, ',' ORDER BY id)) FROM card";
    let before = pg.sql(&[sum]);
    let psql = format!(
        "runuser -u postgres -- {PGBIN}/psql -h {} -p {} -U postgres -d postgres",
        pg.sock.display(),
        pg.port
    );
    let script = |extra: &[&str]| {
        let out = env
            .cmd_env(Command::new("bash").arg(example("encrypt-tablespace.sh")))
            .env("TDE", tde_bin())
            .args([
                "--key",
                "pg-main",
                "--tablespace",
                "secure",
                "--cluster",
                "c1",
                "--psql",
                &psql,
            ])
            .arg("--backing")
            .arg(&backing)
            .arg("--mountpoint")
            .arg(&mnt)
            .args(extra)
            .output()
            .expect("bash");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{text}");
        text
    };
    let text = script(&["--table", "public.card"]);
    assert!(text.contains("mounting"), "{text}");
    let inside = "SELECT string_agg(c.relname, ',' ORDER BY c.relname) FROM pg_class c \
                  JOIN pg_tablespace t ON c.reltablespace = t.oid \
                  WHERE t.spcname = 'secure' AND c.relnamespace <> 'pg_toast'::regnamespace";
    assert_eq!(pg.sql(&[inside]), "card,card_pan,card_pkey");
    assert_eq!(pg.sql(&[sum]), before);
    pg.sql(&["CHECKPOINT"]);
    assert!(
        files_containing(&backing, b"PAN-MARKER-").is_empty(),
        "plaintext in the backing directory"
    );
    assert!(!files_containing(&mnt, b"PAN-MARKER-").is_empty());
    // Again, with the rest of pg_default: the mount and the tablespace are
    // kept, `other` moves too.
    let text = script(&["--all-from", "pg_default"]);
    assert!(text.contains("already mounted"), "{text}");
    assert_eq!(pg.sql(&[inside]), "card,card_pan,card_pkey,other");
    // A name that is not a table: refused by regclass, nothing moved.
    let out = env
        .cmd_env(Command::new("bash").arg(example("encrypt-tablespace.sh")))
        .env("TDE", tde_bin())
        .args([
            "--tablespace",
            "secure",
            "--psql",
            &psql,
            "--table",
            "public.nope",
        ])
        .arg("--backing")
        .arg(&backing)
        .arg("--mountpoint")
        .arg(&mnt)
        .output()
        .expect("bash");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
    pg.stop();
    let out = env.cmd(&["umount"]).arg(&mnt).output().expect("umount");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.stop();
}
