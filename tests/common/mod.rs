//! Harness for the end-to-end tests: a temporary data directory with a
//! config, the real `tde` binary, and a real `tde serve` child that is
//! stopped (SIGTERM, then SIGKILL) when dropped, also when a test fails.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tde_protocol::frame::{read_frame, write_frame};
use tde_protocol::{Request, Response};

pub mod pg;

/// Records that the running test is skipped and why: said on stderr (seen
/// with `--nocapture`) and appended to a list that the last test target,
/// `tests/zz_skipped.rs`, sums up in one line after the others ran.
pub fn skip(why: &str) {
    let test = std::thread::current()
        .name()
        .unwrap_or("?")
        .replace(['\t', '\n'], " ");
    let bin = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .map(|n| n.rsplit_once('-').map_or(n.clone(), |(b, _)| b.to_string()))
        .unwrap_or_default();
    eprintln!("SKIPPED {bin}::{test}: {why}");
    use std::io::Write as _;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(skip_list())
    {
        let _ = writeln!(f, "{bin}::{test}\t{why}");
    }
}

/// Where skipped tests are listed until `tests/zz_skipped.rs` reads them.
pub fn skip_list() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("skipped-tests")
}

pub const PASSWORD: &str = "officer-password-1";
pub const BIN: &str = env!("CARGO_BIN_EXE_tde");

pub struct Env {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

impl Env {
    /// A data directory and a config whose data socket is open to everyone
    /// (mode 0666) so a foreign uid can reach it and be refused by policy.
    /// Client `app` is the test runner's uid.
    pub fn new(extra: &str) -> Env {
        Env::with_operations(
            extra,
            r#""generate_data_key", "decrypt", "re_encrypt", "generate_random""#,
        )
    }

    /// [`Env::new`] with client `app` allowed these operations (a TOML
    /// list's items).
    pub fn with_operations(extra: &str, operations: &str) -> Env {
        let dir = tempfile::Builder::new()
            .prefix("tde-e2e-")
            .tempdir()
            .expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let config = dir.path().join("tde.toml");
        // The runner's own policy names it by user name (resolved through
        // NSS by the daemon), as the documented production policy does;
        // a uid without a user entry is named by number.
        let uid = rustix::process::getuid().as_raw();
        let me = match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
            Ok(Some(u)) => format!("users = [\"{}\"]", u.name),
            _ => format!("uids = [{uid}]"),
        };
        let text = format!(
            r#"data_dir = "{data}"
[data_socket]
path = "{sock}"
mode = "0666"
[log]
level = "info"
[limits]
destroy_check_seconds = 1
min_rotation_seconds = 1
[[clients]]
name = "app"
{me}
keys = ["app-*", "pg*"]
operations = [{operations}]
{extra}
"#,
            data = dir.path().join("data").display(),
            sock = dir.path().join("data.sock").display()
        );
        std::fs::write(&config, text).expect("config");
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        Env { dir, config }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn db(&self) -> PathBuf {
        self.data_dir().join("tde.db")
    }

    pub fn data_socket(&self) -> PathBuf {
        self.dir.path().join("data.sock")
    }

    pub fn admin_socket(&self) -> PathBuf {
        let shared = self.dir.path().join("run");
        if shared.is_dir() {
            shared.join("admin.sock")
        } else {
            self.data_dir().join("admin.sock")
        }
    }

    /// An [`Env`] whose admin socket is `run/admin.sock` outside the
    /// private data directory, mode 0660, owned by `group`: operators in
    /// that group reach it without root.
    pub fn with_admin_group(group: &str) -> Env {
        let env = Env::new("");
        let run = env.dir.path().join("run");
        std::fs::create_dir(&run).expect("mkdir");
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let mut text = std::fs::read_to_string(&env.config).expect("config");
        text = text.replacen(
            "[log]",
            &format!(
                "[admin_socket]\npath = \"{}\"\nmode = \"0660\"\ngroup = \"{group}\"\n[log]",
                run.join("admin.sock").display()
            ),
            1,
        );
        std::fs::write(&env.config, text).expect("config");
        env
    }

    pub fn log(&self) -> PathBuf {
        self.dir.path().join("serve.log")
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args);
        self.cmd_env(&mut c);
        c
    }

    /// Gives `c` the environment of this test's `tde` commands (its
    /// configuration, the operator's password, nothing inherited that
    /// would point elsewhere); for scripts that run `tde`.
    pub fn cmd_env<'c>(&self, c: &'c mut Command) -> &'c mut Command {
        c.env("TDE_CONFIG", &self.config)
            .env("TDE_PASSWORD", PASSWORD)
            .env_remove("TDE_DATA_DIR")
            .env_remove("TDE_OPERATOR")
            // The PKCS#11 tests point the module at their sidecars through
            // these (in this process); `tde pkcs11` must use its own.
            .env_remove("TDE_PKCS11_SOCKET")
            .env_remove("TDE_PKCS11_CONFIG")
            // Set under a service manager: `tde mount` would wait for ever.
            .env_remove("INVOCATION_ID")
            .stdin(Stdio::null())
    }

    /// Runs `tde ARGS --json`; returns the exit code and the parsed stdout.
    pub fn json(&self, args: &[&str]) -> (i32, Value) {
        let out = self.cmd(args).arg("--json").output().expect("run tde");
        parse(&out, args)
    }

    /// Runs `tde ARGS --json` with `input` on standard input (as a
    /// custodian pipes a share in).
    pub fn piped(&self, args: &[&str], input: &str) -> Output {
        use std::io::Write as _;
        let mut c = self
            .cmd(args)
            .arg("--json")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run tde");
        c.stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write");
        c.wait_with_output().expect("wait")
    }

    /// Like `json`, expecting success.
    pub fn ok(&self, args: &[&str]) -> Value {
        let (code, v) = self.json(args);
        assert_eq!(code, 0, "tde {args:?} failed: {v}");
        v
    }

    /// Like `ok`, with `password` as TDE_NEW_PASSWORD (operator add and
    /// passwd).
    pub fn ok_new_password(&self, args: &[&str], password: &str) -> Value {
        let out = self
            .cmd(args)
            .arg("--json")
            .env("TDE_NEW_PASSWORD", password)
            .output()
            .expect("run tde");
        let (code, v) = parse(&out, args);
        assert_eq!(code, 0, "tde {args:?} failed: {v}");
        v
    }

    /// `tde status --json`, asserting its exit code: 0 unsealed, 2 sealed,
    /// not initialized or zeroized (as `vault status`).
    pub fn status(&self) -> Value {
        let (code, v) = self.json(&["status"]);
        let sealed = v["sealed"] != false || v["zeroized"] == true || v["initialized"] != true;
        assert_eq!(code, if sealed { 2 } else { 0 }, "tde status: {v}");
        v
    }

    /// Like `json`, expecting a refusal with `code`; returns the message.
    pub fn refused(&self, args: &[&str], code: &str) -> String {
        let (rc, v) = self.json(args);
        assert_eq!(rc, 1, "tde {args:?} should be refused with {code}: {v}");
        assert_eq!(v["error"]["code"], code, "tde {args:?}: {v}");
        let msg = v["error"]["message"].as_str().expect("message").to_string();
        assert!(!msg.is_empty());
        msg
    }

    /// Starts `tde serve` and waits for both sockets.
    pub fn serve(&self) -> Daemon {
        self.serve_env(&[])
    }

    /// [`Env::serve`] with extra environment variables (`TDE_...`
    /// configuration overrides).
    pub fn serve_env(&self, vars: &[(&str, &str)]) -> Daemon {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .expect("log");
        let child = self
            .cmd(&["serve"])
            .envs(vars.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn tde serve");
        let mut d = Daemon { child: Some(child) };
        let deadline = Instant::now() + Duration::from_secs(30);
        // Connectable, not merely present: a killed daemon leaves its
        // socket files behind.
        let up = |p: PathBuf| std::os::unix::net::UnixStream::connect(p).is_ok();
        while !(up(self.data_socket()) && up(self.admin_socket())) {
            if let Some(st) = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!(
                    "tde serve exited: {st}\n{}",
                    std::fs::read_to_string(self.log()).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "tde serve did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    /// `tde init` with 5 shares, threshold 3; returns the shares.
    pub fn init(&self) -> Vec<String> {
        let v = self.ok(&["init", "--shares", "5", "--threshold", "3"]);
        assert_eq!(v["threshold"], 3);
        v["shares"]
            .as_array()
            .expect("shares")
            .iter()
            .map(|s| s.as_str().expect("share").to_string())
            .collect()
    }

    pub fn unseal(&self, shares: &[String]) -> Value {
        let mut last = Value::Null;
        for s in shares {
            last = self.ok(&["unseal", s]);
        }
        last
    }
}

pub fn parse(out: &Output, args: &[&str]) -> (i32, Value) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v = serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
        Value::String(format!(
            "stdout: {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    });
    let _ = args;
    (out.status.code().unwrap_or(-1), v)
}

pub struct Daemon {
    child: Option<Child>,
}

impl Daemon {
    /// Graceful stop (SIGTERM); asserts a clean exit.
    pub fn stop(mut self) {
        let mut c = self.child.take().expect("child");
        term(&c);
        let st = wait(&mut c, Duration::from_secs(30)).expect("tde serve did not stop on SIGTERM");
        assert!(st.success(), "tde serve exited with {st}");
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("child").id()
    }

    /// kill -9, and wait for the process to be gone.
    pub fn kill9(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sends signal `s` to the child.
pub fn signal(c: &Child, s: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
        let _ = rustix::process::kill_process(pid, s);
    }
}

fn term(c: &Child) {
    signal(c, rustix::process::Signal::TERM);
}

/// Waits up to `d` for the child to exit.
pub fn wait(c: &mut Child, d: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + d;
    while Instant::now() < deadline {
        if let Ok(Some(st)) = c.try_wait() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            term(&c);
            if wait(&mut c, Duration::from_secs(10)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// A raw protocol client for tests that speak frames directly.
pub struct Raw {
    pub stream: UnixStream,
    pub id: u64,
}

impl Raw {
    pub fn connect(path: &Path) -> Raw {
        let stream = UnixStream::connect(path).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        Raw { stream, id: 0 }
    }

    pub fn call(&mut self, req: &Request) -> Response {
        self.id += 1;
        write_frame(&mut self.stream, &req.to_frame(self.id)).expect("send");
        let f = read_frame(&mut self.stream)
            .expect("read")
            .expect("response");
        assert_eq!(f.header.request_id, self.id);
        Response::from_frame(&f).expect("decode")
    }
}

pub fn ctx(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Every audit record, after checking the whole chain.
pub fn audit(db: &Path) -> Vec<Value> {
    let conn = tde_sidecar::store::connect(db).expect("open db");
    // One snapshot for the walk and the rows (a prune may run meanwhile).
    conn.execute_batch("BEGIN").expect("begin");
    let report = tde_sidecar::audit::verify_chain(&conn).expect("audit chain is intact");
    let mut stmt = conn
        .prepare("SELECT record FROM audit ORDER BY seq")
        .expect("prepare");
    let rows: Vec<Value> = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .expect("query")
        .map(|r| serde_json::from_str(&r.expect("row")).expect("json"))
        .collect();
    assert_eq!(rows.len() as u64, report.records);
    rows
}

/// Number of audit records for `op` with `result`.
pub fn count(records: &[Value], op: &str, result: &str) -> usize {
    records
        .iter()
        .filter(|r| r["op"] == op && r["result"] == result)
        .count()
}

/// Records for `op` refused with `code`.
pub fn refusals(records: &[Value], op: &str, code: &str) -> usize {
    records
        .iter()
        .filter(|r| r["op"] == op && r["error_code"] == code)
        .count()
}

/// The PKCS#11 module cargo built beside this test (the root package has
/// it as a dev-dependency, so it is built first).
pub fn pkcs11_module() -> PathBuf {
    let exe = std::env::current_exe().expect("exe");
    let deps = exe.parent().expect("deps");
    [
        deps.join("libtde_pkcs11.so"),
        deps.join("../libtde_pkcs11.so"),
    ]
    .into_iter()
    .find(|p| p.exists())
    .expect("libtde_pkcs11.so is built with the tests")
}

/// `libtde_pkcs11.so` through the `cryptoki` crate, pointed at `env`'s
/// sidecar and initialized. The module reads its environment in this
/// process: only for a test binary with one test.
#[allow(unsafe_code)]
pub fn cryptoki_module(env: &Env) -> cryptoki::context::Pkcs11 {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    // SAFETY: set before the module is loaded and read by it only; the
    // calling test binary has no other test.
    unsafe { std::env::set_var("TDE_PKCS11_SOCKET", env.data_socket()) };
    unsafe { std::env::remove_var("TDE_PKCS11_CONFIG") };
    let p11 = Pkcs11::new(pkcs11_module()).expect("load the module");
    p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("C_Initialize");
    p11
}

/// A crypto user `alice` (password `alice-password-1`) with `shared`
/// master keys shared with it.
pub fn add_alice(env: &Env, shared: &[&str]) {
    env.ok_new_password(
        &["operator", "add", "alice", "--role", "crypto_user"],
        "alice-password-1",
    );
    for k in shared {
        env.ok(&["key", "share", k, "alice"]);
    }
}

/// A stopped sidecar's store opened as only the holder of `shares` could:
/// the unseal key, the root key, and a sealer that opens every object
/// (the key-material scans look for what it recovers).
pub struct OpenedStore {
    /// The store.
    pub store: tde_sidecar::store::SqliteStore,
    /// The unseal key the shares combine to.
    pub unseal: tde_hsm::secret::UnsealKey,
    /// The root key.
    pub root: tde_hsm::secret::RootKey,
    /// Opens sealed objects.
    pub sealer: tde_hsm::seal::Sealer,
}

/// Opens `env`'s store with the first three of `shares`.
pub fn open_store(env: &Env, shares: &[String]) -> OpenedStore {
    use tde_hsm::seal::{self, Sealer, Share};
    use tde_hsm::store::ObjectStore;
    let store = tde_sidecar::store::SqliteStore::open(&env.db()).expect("store");
    let meta = store.meta().expect("meta").expect("initialized");
    let parsed: Vec<Share> = shares[..3]
        .iter()
        .map(|s| Share::parse(s.as_bytes()).expect("share"))
        .collect();
    let unseal = seal::combine(&parsed).expect("combine");
    let (root, _) = seal::open_root(
        &unseal,
        &store.sealed_root().expect("root").expect("some"),
        &meta.store_id,
    )
    .expect("open root");
    let sealer = Sealer::new(&root, &meta.store_id).expect("sealer");
    OpenedStore {
        store,
        unseal,
        root,
        sealer,
    }
}
