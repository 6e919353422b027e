//! Issue 15, point 2: a host restart with auto-unseal, for an external
//! PKCS#11 token (SoftHSMv2 standing in for an HSM) and a TPM 2.0 (swtpm,
//! through tpm2-tools): sidecar, mount and PostgreSQL come back with no
//! custodian; with the device unavailable the sidecar stays sealed and says
//! why, and the recovery shares still unseal it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Env;
use common::pg::*;

const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `tde status` exit code and JSON.
fn status(env: &Env) -> (i32, serde_json::Value) {
    env.json(&["status"])
}

/// Waits until the sidecar says it is unsealed (exit 0), or `secs` pass.
fn wait_unsealed(env: &Env, secs: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if status(env).0 == 0 {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// The daemon's log from byte `from` on (each start appends to it).
fn log_from(env: &Env, from: usize) -> String {
    let log = std::fs::read_to_string(env.log()).unwrap_or_default();
    log.get(from..).unwrap_or_default().to_string()
}

fn log_len(env: &Env) -> usize {
    std::fs::metadata(env.log()).map_or(0, |m| m.len() as usize)
}

/// Waits for `needle` in the daemon's log after byte `from`.
fn log_says(env: &Env, from: usize, needle: &str, secs: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let log = log_from(env, from);
        if log.contains(needle) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The scenario, the same for both devices: first start (sealed: nothing
/// wrapped yet), unseal with shares (which wraps the key), a tablespace
/// with rows; then a host restart (everything killed at once) and the
/// device's own start: all of it comes back with no share; then the
/// device unavailable: sealed, the reason in the log, and the recovery
/// shares unseal.
fn host_restart(env: &Env, vars: &[(&str, &str)], device: &mut dyn Device) {
    let shares = env.init();
    let d = env.serve_env(vars);
    // Nothing wrapped yet: sealed, and the log says what to do.
    log_says(env, 0, "unseal once with the shares", 10);
    assert_eq!(status(env).0, 2);
    env.unseal(&shares[..3]);
    let blob = env.data_dir().join("auto-unseal.json");
    let meta = std::fs::metadata(&blob).expect("the unseal key is wrapped");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let records = common::audit(&env.db());
    assert!(
        records.iter().any(|r| r["op"] == "unseal"
            && r["detail"]
                .as_str()
                .is_some_and(|d| d.contains("wrapped by the"))),
        "the unseal that wrapped the key is audited"
    );
    env.ok(&["key", "create", "pg-main"]);

    let pg_ok = can_run();
    let _serial = pg_ok.then(serial);
    let (backing, mnt) = (env.pg_dir("backing"), env.pg_dir("mnt"));
    let mut stack = None;
    if pg_ok {
        let mount = env.mount_init("pg-main", "secure", &backing, &mnt);
        let mut pg = Pg::initdb(&env.pg_dir("cluster").join("data"), env.dir.path());
        pg.start();
        pg.sql(&[
            &format!("CREATE TABLESPACE secure LOCATION '{}'", mnt.display()),
            "CREATE TABLE t (id int PRIMARY KEY, v text) TABLESPACE secure",
            "INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 1000) g",
        ]);
        stack = Some((mount, pg));
    }

    // The host goes down: PostgreSQL, the mount and the sidecar at once,
    // and the device with them.
    let mut pg = stack.take().map(|(mount, mut pg)| {
        pg.kill9();
        mount.kill9();
        pg
    });
    d.kill9();
    device.restart();

    // Boot: the sidecar unseals itself; the mount and PostgreSQL follow.
    let boot = log_len(env);
    let d = env.serve_env(vars);
    assert!(wait_unsealed(env, 15), "no auto-unseal after the restart");
    let log = log_from(env, boot);
    assert!(!log.contains("auto-unseal failed"), "{log}");
    assert!(log.contains("auto-unsealed"), "{log}");
    if let Some(pg) = pg.as_mut() {
        let mount = env.mount(
            &["--tablespace", "secure", "--cluster", "c1"],
            &backing,
            &mnt,
        );
        pg.start();
        assert_eq!(pg.sql(&["SELECT count(*) FROM t"]), "1000");
        pg.stop();
        mount.stop();
    }
    let records = common::audit(&env.db());
    assert!(
        records
            .iter()
            .any(|r| r["op"] == "auto_unseal" && r["result"] == "ok"),
        "the auto-unseal is audited"
    );

    // A re-split: the new unseal key is wrapped at once, and the next start
    // unseals with it; the new shares are the recovery shares from now on.
    let before = std::fs::read(&blob).expect("blob");
    let st = env.ok(&["resplit", "--init", "--shares", "3", "--threshold", "2"]);
    let nonce = st["nonce"].as_str().expect("nonce").to_string();
    let mut done = serde_json::Value::Null;
    for old in &shares[..3] {
        done = env.ok(&["resplit", "--nonce", &nonce, "--share", old]);
    }
    let shares: Vec<String> = done["shares"]
        .as_array()
        .expect("new shares")
        .iter()
        .map(|s| s.as_str().expect("share").to_string())
        .collect();
    assert_eq!(shares.len(), 3);
    assert_ne!(
        std::fs::read(&blob).expect("blob"),
        before,
        "not wrapped again"
    );
    d.stop();
    let d = env.serve_env(vars);
    assert!(wait_unsealed(env, 15), "no auto-unseal after the re-split");
    d.stop();

    // A hostile disk: the stored blob changed. Sealed, and says so.
    let good = std::fs::read_to_string(&blob).expect("blob");
    let mut v: serde_json::Value = serde_json::from_str(&good).expect("json");
    let w = v["wrapped"].as_str().expect("wrapped").to_string();
    let flipped = if w.starts_with('A') {
        w.replacen('A', "B", 1)
    } else {
        format!("A{}", &w[1..])
    };
    v["wrapped"] = flipped.into();
    std::fs::write(&blob, v.to_string()).expect("write");
    let from = log_len(env);
    let d = env.serve_env(vars);
    log_says(env, from, "auto-unseal failed", 15);
    assert_eq!(status(env).0, 2, "a changed blob unsealed");
    d.stop();
    std::fs::write(&blob, good).expect("restore");

    // The device unavailable: sealed, says why; the recovery shares unseal.
    device.stop();
    let down = log_len(env);
    let d = env.serve_env(vars);
    let log = log_says(env, down, "auto-unseal failed", 15);
    let said = log
        .lines()
        .find(|l| l.contains("auto-unseal failed"))
        .unwrap_or_default();
    eprintln!("with the device unavailable: {said}");
    assert_eq!(status(env).0, 2, "{log}");
    env.unseal(&shares[1..3]);
    assert_eq!(status(env).0, 0);
    assert_eq!(
        env.ok(&["key", "list"])[0]["name"],
        "pg-main",
        "the keys are back with the recovery shares"
    );
    d.stop();
}

/// What a test does to its device.
trait Device {
    /// Stop and start again (a host restart), keeping its state.
    fn restart(&mut self);
    /// Make it unavailable.
    fn stop(&mut self);
}

// ------------------------------------------------------------ PKCS#11

struct SoftHsm {
    conf: PathBuf,
    tokens: PathBuf,
}

impl Device for SoftHsm {
    fn restart(&mut self) {}

    fn stop(&mut self) {
        // The token's files gone, as a pulled or failed HSM.
        std::fs::rename(&self.tokens, self.tokens.with_extension("gone")).expect("rename");
        std::fs::create_dir(&self.tokens).expect("mkdir");
    }
}

fn softhsm(dir: &Path) -> SoftHsm {
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).expect("mkdir");
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\n",
            tokens.display()
        ),
    )
    .expect("conf");
    let out = Command::new("softhsm2-util")
        .args([
            "--init-token",
            "--free",
            "--label",
            "tde-unseal",
            "--pin",
            "4321",
            "--so-pin",
            "8765",
        ])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .expect("softhsm2-util");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(dir.join("hsm-pin"), "4321\n").expect("pin");
    SoftHsm { conf, tokens }
}

#[test]
fn pkcs11_auto_unseal_survives_a_host_restart() {
    if !Path::new(SOFTHSM).exists() || !have("softhsm2-util") {
        common::skip("no SoftHSMv2 (package softhsm2)");
        return;
    }
    let work = tempfile::tempdir().expect("tmp");
    let mut hsm = softhsm(work.path());
    let env = Env::new(&format!(
        "[seal]\ntype = \"pkcs11\"\nmodule = \"{SOFTHSM}\"\ntoken_label = \"tde-unseal\"\nkey_label = \"tde-unseal\"\npin_file = \"{}\"\n",
        work.path().join("hsm-pin").display()
    ));
    let conf = hsm.conf.to_string_lossy().into_owned();
    host_restart(&env, &[("SOFTHSM2_CONF", &conf)], &mut hsm);
}

// ------------------------------------------------------------ TPM 2.0

struct Swtpm {
    state: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Swtpm {
    fn start(state: &Path) -> Swtpm {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
            l.local_addr().expect("addr").port()
        };
        let mut t = Swtpm {
            state: state.to_path_buf(),
            port,
            child: None,
        };
        t.run();
        t
    }

    fn run(&mut self) {
        let child = Command::new("swtpm")
            .args(["socket", "--tpm2", "--flags", "not-need-init,startup-clear"])
            .arg("--tpmstate")
            .arg(format!("dir={}", self.state.display()))
            .arg("--server")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", self.port))
            .arg("--ctrl")
            .arg(format!(
                "type=tcp,port={},bindaddr=127.0.0.1",
                self.port + 1
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("swtpm");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "swtpm did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }
}

impl Device for Swtpm {
    fn restart(&mut self) {
        self.stop();
        self.run();
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn tpm2_auto_unseal_survives_a_host_restart() {
    if !have("swtpm") || !have("tpm2_createprimary") {
        common::skip(
            "no TPM simulator or tpm2-tools (packages swtpm, tpm2-tools, libtss2-tcti-swtpm0)",
        );
        return;
    }
    let work = tempfile::tempdir().expect("tmp");
    let state = work.path().join("tpm-state");
    std::fs::create_dir(&state).expect("mkdir");
    let mut tpm = Swtpm::start(&state);
    let env = Env::new(&format!(
        "[seal]\ntype = \"tpm2\"\ntcti = \"{}\"\n",
        tpm.tcti()
    ));
    host_restart(&env, &[], &mut tpm);
}
