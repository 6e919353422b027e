//! Issue 15, point 4: `/metrics` parses with the Prometheus project's
//! OpenMetrics parser and its counters move with traffic; `/health` says
//! 503 while sealed and 200 once unsealed; over TLS when configured.

mod common;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::pg::*;
use common::{Env, skip};

/// The parser of the Prometheus project's Python client (Debian's
/// python3-prometheus-client), strict about the OpenMetrics text format.
const PARSE: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        out[f"{s.name}{{{labels}}}"] = s.value
print(json.dumps(out))
"#;

fn parser_present() -> bool {
    let ok = Command::new("/usr/bin/python3")
        .args(["-c", "import prometheus_client.openmetrics.parser"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        skip("no Prometheus text parser (package python3-prometheus-client)");
    }
    ok && which("curl")
}

fn which(cmd: &str) -> bool {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        skip(&format!("no {cmd} on the PATH"));
    }
    ok
}

/// The listener's base URL, from the daemon's log line.
fn base_url(env: &Env) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(env.log()).unwrap_or_default();
        if let Some(line) = log.lines().rev().find(|l| l.contains("metrics listening")) {
            let url = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("url="))
                .expect("url in the log line");
            return url.trim_end_matches("/metrics").to_string();
        }
        assert!(Instant::now() < deadline, "no metrics line in\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// GET `url` with curl: (status, body).
fn get(url: &str, extra: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(extra)
        .arg(url)
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf8");
    let (body, code) = text.rsplit_once('\n').expect("status line");
    (code.parse().expect("status"), body.to_string())
}

/// `/metrics`, parsed: sample name with sorted labels -> value.
fn scrape(base: &str, extra: &[&str]) -> BTreeMap<String, f64> {
    let (code, body) = get(&format!("{base}/metrics"), extra);
    assert_eq!(code, 200, "{body}");
    let mut py = Command::new("/usr/bin/python3")
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    py.stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("write");
    let out = py.wait_with_output().expect("parser");
    assert!(
        out.status.success(),
        "the Prometheus parser refused /metrics: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("parser output")
}

fn health(base: &str, query: &str) -> (u16, serde_json::Value) {
    let (code, body) = get(&format!("{base}/health{query}"), &[]);
    (code, serde_json::from_str(&body).expect("health JSON"))
}

fn value(m: &BTreeMap<String, f64>, sample: &str) -> f64 {
    m.get(sample).copied().unwrap_or(0.0)
}

#[test]
fn metrics_and_health_follow_the_daemon() {
    if !parser_present() {
        return;
    }
    let env = Env::new("[metrics]\nlisten = \"127.0.0.1:0\"");
    let shares = env.init();
    let d = env.serve();
    let base = base_url(&env);
    assert!(base.starts_with("http://127.0.0.1:"), "{base}");

    // Sealed: 503 with the reason, unless the probe asks otherwise.
    let (code, h) = health(&base, "");
    assert_eq!(code, 503, "{h}");
    assert_eq!(h["sealed"], true);
    assert_eq!(h["initialized"], true);
    assert_eq!(h["unseal_threshold"], 3);
    let (code, _) = health(&base, "?sealedcode=200");
    assert_eq!(code, 200, "sealedcode answers while sealed");
    let m = scrape(&base, &[]);
    assert_eq!(value(&m, "tde_sealed{}"), 1.0, "{m:?}");
    assert_eq!(value(&m, "tde_keys{}"), 0.0);
    assert_eq!(value(&m, r#"tde_build_info{version="0.1.0"}"#), 1.0);

    env.unseal(&shares[..3]);
    let (code, h) = health(&base, "");
    assert_eq!(code, 200, "{h}");
    assert_eq!(
        (h["sealed"].clone(), h["audit_ok"].clone()),
        (false.into(), true.into())
    );
    let (code, _) = health(&base, "?sealedcode=200");
    assert_eq!(code, 200);

    env.ok(&["key", "create", "pg-main"]);
    let before = scrape(&base, &[]);
    assert_eq!(value(&before, "tde_sealed{}"), 0.0);
    assert_eq!(value(&before, "tde_keys{}"), 1.0);
    assert_eq!(
        value(&before, r#"tde_key_primary_version{key="pg-main"}"#),
        1.0
    );
    let ok = r#"tde_requests_total{op="generate_data_key",result="ok",socket="data"}"#;
    let denied =
        r#"tde_requests_total{op="generate_data_key",result="PERMISSION_DENIED",socket="data"}"#;
    let timed = r#"tde_request_duration_seconds_count{op="generate_data_key",socket="data"}"#;
    for i in 0..7 {
        env.ok(&[
            "datakey",
            "generate",
            "--key",
            "pg-main",
            "--context",
            &format!("tablespace=t{i}"),
        ]);
    }
    env.refused(
        &["datakey", "generate", "--key", "not-allowed"],
        "PERMISSION_DENIED",
    );
    env.ok(&["key", "rotate", "pg-main"]);
    let after = scrape(&base, &[]);
    assert_eq!(value(&after, ok) - value(&before, ok), 7.0, "{after:?}");
    assert_eq!(value(&after, denied) - value(&before, denied), 1.0);
    assert_eq!(value(&after, timed) - value(&before, timed), 8.0);
    assert_eq!(
        value(&after, r#"tde_key_primary_version{key="pg-main"}"#),
        2.0
    );
    assert_eq!(
        value(&after, r#"tde_key_versions{key="pg-main",state="enabled"}"#),
        2.0
    );
    // Every answered request is behind at least one committed record.
    let committed = value(&after, "tde_audit_records_committed_total{}");
    assert!(committed >= 10.0, "{committed}");
    assert!(value(&after, "tde_audit_commit_duration_seconds_count{}") >= 1.0);
    assert_eq!(value(&after, "tde_audit_failing{}"), 0.0);
    // The admin socket's requests too.
    assert!(
        value(
            &after,
            r#"tde_requests_total{op="key_rotate",result="ok",socket="admin"}"#
        ) == 1.0
    );

    // Sealed again: 503, and the keys leave the metrics.
    env.ok(&["seal"]);
    let (code, h) = health(&base, "");
    assert_eq!(code, 503, "{h}");
    let m = scrape(&base, &[]);
    assert_eq!(value(&m, "tde_sealed{}"), 1.0);
    assert!(!m.keys().any(|k| k.contains("pg-main")), "{m:?}");
    d.stop();
}

#[test]
fn a_mounted_tablespace_shows_its_key_file_in_the_metrics() {
    if !parser_present() || !can_run() {
        return;
    }
    let env = Env::new("[metrics]\nlisten = \"127.0.0.1:0\"");
    let d = env.sidecar_with_keys(&["pg-main"]);
    let base = base_url(&env);
    let backing = env.dir.path().join("backing");
    let mnt = env.dir.path().join("mnt");
    std::fs::create_dir_all(&backing).expect("mkdir");
    std::fs::create_dir_all(&mnt).expect("mkdir");
    let mount = env.mount_init("pg-main", "ts1", &backing, &mnt);
    let place = |m: &BTreeMap<String, f64>, name: &str| -> Option<f64> {
        m.iter()
            .find(|(k, _)| k.starts_with(name) && k.contains(r#"key="pg-main""#))
            .map(|(_, v)| *v)
    };
    let m = scrape(&base, &[]);
    assert_eq!(place(&m, "tde_keyfile_versions_behind"), Some(0.0), "{m:?}");
    assert_eq!(place(&m, "tde_keyfile_rewrap_lag_seconds"), Some(0.0));

    // A rotation: the mount rewraps its key file and the lag goes back to 0.
    env.ok(&["key", "rotate", "pg-main"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = scrape(&base, &[]);
        if value(&m, r#"tde_key_primary_version{key="pg-main"}"#) == 2.0
            && place(&m, "tde_keyfile_versions_behind") == Some(0.0)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the key file stayed behind: {m:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // The mount's own counters, through its control socket and
    // `tde status`: bytes both ways, then a tampered block refused. (Reads
    // of what was just written come from the kernel's cache: the reads
    // counted are those after a new mount.)
    let data = vec![7u8; 3 * 8192];
    for f in ["t", "u"] {
        std::fs::write(mnt.join(f), &data).expect("write");
    }
    let io = |env: &Env| env.status()["mounts"][0]["io"].clone();
    let v = io(&env);
    assert_eq!(v["written_bytes"], 6 * 8192, "{v}");
    assert_eq!(v["auth_failures"], 0, "{v}");
    let text =
        String::from_utf8_lossy(&env.cmd(&["status"]).output().expect("status").stdout).to_string();
    assert!(text.contains("written 48.00 KiB"), "{text}");
    mount.stop();
    let mount = env.mount(&["--tablespace", "ts1", "--cluster", "c1"], &backing, &mnt);
    assert_eq!(std::fs::read(mnt.join("t")).expect("read"), data);
    let v = io(&env);
    assert_eq!(v["read_bytes"], 3 * 8192, "{v}");
    assert_eq!(v["written_bytes"], 0, "{v}");
    let stored = backing.join("u");
    let mut bytes = std::fs::read(&stored).expect("backing file");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&stored, bytes).expect("tamper");
    assert!(
        std::fs::read(mnt.join("u")).is_err(),
        "a tampered block was read"
    );
    let v = io(&env);
    assert!(v["auth_failures"].as_u64() >= Some(1), "{v}");
    assert!(v["read_errors"].as_u64() >= Some(1), "{v}");
    mount.stop();
    d.stop();
}

#[test]
fn metrics_over_tls_and_bad_settings() {
    if !parser_present() || !which("openssl") {
        return;
    }
    let env = Env::new("");
    let dir = env.dir.path();
    let (cert, key) = (dir.join("metrics.crt"), dir.join("metrics.key"));
    self_signed(&cert, &key);
    let extra = format!(
        "[metrics]\nlisten = \"127.0.0.1:0\"\ntls_cert = \"{}\"\ntls_key = \"{}\"",
        cert.display(),
        key.display()
    );
    let env = Env::new(&extra);
    env.init();
    let d = env.serve();
    let base = base_url(&env);
    assert!(base.starts_with("https://127.0.0.1:"), "{base}");
    let ca = cert.to_str().expect("utf8");
    let m = scrape(&base, &["--cacert", ca]);
    assert_eq!(value(&m, "tde_sealed{}"), 1.0);
    let (code, _) = get(&format!("{base}/health"), &["--cacert", ca]);
    assert_eq!(code, 503);
    // Plain HTTP to the TLS port gets no metrics.
    let plain = base.replacen("https", "http", 1);
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", &format!("{plain}/metrics")])
        .output()
        .expect("curl");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("tde_sealed"),
        "metrics over plain HTTP on the TLS port"
    );
    d.stop();

    // Bad settings: a clear error, and no daemon left.
    let plain = Env::new("");
    plain.init();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_addr = format!("127.0.0.1:{}", taken.local_addr().expect("addr").port());
    let (cert_s, key_s) = (cert.to_str().expect("utf8"), key.to_str().expect("utf8"));
    let missing = dir.join("missing.crt");
    for (vars, says) in [
        (
            vec![("TDE_METRICS__LISTEN", "localhost")],
            "is not an address and port",
        ),
        (
            vec![
                ("TDE_METRICS__LISTEN", "127.0.0.1:0"),
                ("TDE_METRICS__TLS_CERT", cert_s),
            ],
            "go together",
        ),
        (
            vec![
                ("TDE_METRICS__LISTEN", "127.0.0.1:0"),
                ("TDE_METRICS__TLS_CERT", missing.to_str().expect("utf8")),
                ("TDE_METRICS__TLS_KEY", key_s),
            ],
            "loading the metrics TLS certificate",
        ),
        (
            vec![("TDE_METRICS__LISTEN", taken_addr.as_str())],
            "binding the metrics listener",
        ),
    ] {
        let out = plain
            .cmd(&["serve"])
            .envs(vars.iter().copied())
            .output()
            .expect("tde serve");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "{vars:?}: {err}"
        );
        assert!(!plain.data_socket().exists(), "a socket was left behind");
    }
    drop(taken);
}

fn self_signed(cert: &Path, key: &Path) {
    let st = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
        ])
        .arg(key)
        .arg("-out")
        .arg(cert)
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(st.success());
}
