//! Audit export and offline verify at scale: `cargo bench --bench audit`.
//!
//! Makes a dev store, writes `BENCH_AUDIT_RECORDS` records (1,000,000) into
//! its audit log through the real writer (group commit, a checkpoint every
//! 10,000 records signed by the store's audit key), starts the real
//! `tde serve` on it, then times `tde audit export` (through the admin
//! socket, page by page) and `tde audit verify` (offline) for each format.
//! Prints a table.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tde_sidecar::audit::sink::Wake;
use tde_sidecar::audit::{Actor, AuditLog, AuditRecord, AuditSettings};

fn tde(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tde"));
    c.args(args)
        .env("TDE_DATA_DIR", dir)
        .env("TDE_LOG__LEVEL", "error")
        .env_remove("TDE_CONFIG");
    c
}

fn fill(dir: &Path, records: u64) -> Duration {
    let db = dir.join("tde.db");
    let store = Arc::new(tde_sidecar::store::SqliteStore::open(&db).expect("store"));
    let hsm = tde_hsm::Hsm::open(store, Default::default()).expect("hsm");
    let share = std::fs::read(dir.join("dev-unseal.share")).expect("share");
    hsm.unseal(&share).expect("unseal");
    let settings = AuditSettings {
        node: "bench".into(),
        checkpoint_records: 10_000,
        checkpoint_interval: Duration::from_secs(60),
        wake: Arc::new(Wake::default()),
        stats: Default::default(),
    };
    let (log, writer, _) = AuditLog::start(&db, settings, Arc::new(hsm)).expect("audit");
    let threads = 256u64;
    let t0 = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                for i in 0..records / threads + u64::from(t < records % threads) {
                    let mut r = AuditRecord::new(
                        "data",
                        if i % 2 == 0 {
                            "generate_data_key"
                        } else {
                            "decrypt"
                        },
                    );
                    r.request_id = Some(t << 32 | i);
                    r.actor = Actor {
                        client: Some("postgres".into()),
                        uid: Some(101),
                        gid: Some(104),
                        pid: Some(4000 + t as i32),
                        exe: Some(Arc::from("/usr/local/bin/tde")),
                        ..Actor::default()
                    };
                    r.key = Some("pg-main".into());
                    r.key_version = Some(1);
                    r.context = Some(
                        [
                            ("cluster".to_string(), "main".to_string()),
                            ("tablespace".to_string(), format!("ts{}", t % 8)),
                        ]
                        .into(),
                    );
                    log.append(r).expect("append");
                }
            })
        })
        .collect();
    handles.into_iter().for_each(|h| h.join().expect("writer"));
    drop(log);
    writer.join();
    t0.elapsed()
}

fn timed(c: &mut Command) -> Duration {
    let t0 = Instant::now();
    let out = c.stdout(Stdio::null()).output().expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    t0.elapsed()
}

fn main() {
    let records: u64 = std::env::var("BENCH_AUDIT_RECORDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let tmp = tempfile::tempdir().expect("tmp");
    // BENCH_AUDIT_KEEP=DIR: build the store there and leave it (profiling).
    let keep = std::env::var_os("BENCH_AUDIT_KEEP").map(std::path::PathBuf::from);
    let dir = keep.clone().unwrap_or_else(|| tmp.path().join("store"));
    let st = tde(&dir, &["init", "--dev"])
        .stdout(Stdio::null())
        .status()
        .expect("init");
    assert!(st.success());
    let filled = fill(&dir, records);
    if keep.is_some() {
        println!("store left in {}", dir.display());
        return;
    }
    println!(
        "{records} records written in {:.1} s ({:.0}/s, 256 writers, group commit)\n",
        filled.as_secs_f64(),
        records as f64 / filled.as_secs_f64()
    );
    let mut serve = tde(&dir, &["serve"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("serve");
    while !dir.join("admin.sock").exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let pw = std::fs::read_to_string(dir.join("dev-admin.password")).expect("pw");
    println!("| format | records | export s | verify s | records.jsonl MB | rendering MB |");
    println!("|--------|--------:|---------:|---------:|-----------------:|-------------:|");
    for format in ["jsonl", "csv", "ocsf"] {
        let out = tmp.path().join(format!("export-{format}"));
        let o = out.to_str().expect("utf8");
        let export = timed(
            tde(&dir, &["audit", "export", "--out", o, "--format", format])
                .env("TDE_PASSWORD", pw.trim()),
        );
        let verify = timed(&mut tde(&dir, &["audit", "verify", o]));
        let mb = |f: &str| std::fs::metadata(out.join(f)).map_or(0.0, |m| m.len() as f64 / 1e6);
        let rendering = match format {
            "csv" => mb("records.csv"),
            "ocsf" => mb("records.ocsf.jsonl"),
            _ => 0.0,
        };
        println!(
            "| {format:<6} | {records:>7} | {:>8.2} | {:>8.2} | {:>16.0} | {rendering:>12.0} |",
            export.as_secs_f64(),
            verify.as_secs_f64(),
            mb("records.jsonl"),
        );
    }
    let _ = Command::new("kill").arg(serve.id().to_string()).status();
    let _ = serve.wait();
}
