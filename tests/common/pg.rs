//! A real PostgreSQL 15 cluster for the tests (run as the `postgres` user,
//! Unix socket only) and a real `tde mount` child. Both are stopped when
//! dropped, also when a test fails; a mount that does not go away is
//! detached.
#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use super::{BIN, Env, signal, wait};

pub const PGBIN: &str = "/usr/lib/postgresql/15/bin";

static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

fn root() -> bool {
    rustix::process::geteuid().is_root()
}

/// uid and gid PostgreSQL runs as: the `postgres` user's (through NSS) when
/// the tests run as root (PostgreSQL refuses root), else the test runner's.
pub fn postgres_ids() -> (u32, u32) {
    if !root() {
        return (
            rustix::process::getuid().as_raw(),
            rustix::process::getgid().as_raw(),
        );
    }
    let u = nix::unistd::User::from_name("postgres")
        .expect("looking up the postgres user")
        .expect("a postgres user (install postgresql-15)");
    (u.uid.as_raw(), u.gid.as_raw())
}

/// Whether the mount and PostgreSQL tests can run here: as root, with
/// /dev/fuse (as CI runs them); as a normal user, through fusermount3 with
/// /dev/fuse open to that user. Records the reason of a skip.
pub fn can_run() -> bool {
    let why = if !Path::new("/dev/fuse").exists() {
        Some("no /dev/fuse".to_string())
    } else if !Path::new(&format!("{PGBIN}/initdb")).exists() {
        Some("no PostgreSQL 15 (package postgresql-15)".to_string())
    } else if root() {
        None
    } else {
        tde_plugin::fusermount::check_user_mount(false)
            .err()
            .map(|e| format!("a normal user cannot mount here: {e}"))
    };
    match why {
        Some(why) => {
            super::skip(&why);
            false
        }
        None => true,
    }
}

/// As [`can_run`], and a normal user can mount here too (for the tests
/// that mount as `nobody` when root runs them: `fusermount3` on the PATH
/// and `/dev/fuse` open to others; a normal user running the tests was
/// checked by `can_run`).
pub fn can_run_as_normal_user() -> bool {
    use std::os::unix::fs::PermissionsExt;
    if !can_run() {
        return false;
    }
    if !root() {
        return true;
    }
    let mode = std::fs::metadata("/dev/fuse").map_or(0, |m| m.permissions().mode());
    let why = if tde_plugin::fusermount::helper().is_none() {
        Some("no fusermount3 on the PATH (package fuse3)".to_string())
    } else if mode & 0o006 != 0o006 {
        Some(format!(
            "/dev/fuse is mode {:o}, closed to normal users (udev makes it 0666 on a standard host; .ci/run does the same)",
            mode & 0o777
        ))
    } else {
        None
    };
    match why {
        Some(why) => {
            super::skip(&why);
            false
        }
        None => true,
    }
}

/// As [`can_run`], and root: for tests that act as other users (`nobody`).
pub fn can_run_as_root() -> bool {
    if !can_run() {
        return false;
    }
    if !root() {
        super::skip("acts as uid 65534, which needs root");
        return false;
    }
    true
}

/// Gives `p` to the user PostgreSQL runs as (nothing to do for a normal
/// user, who runs it).
pub fn chown_pg(p: &Path) {
    if root() {
        let (uid, gid) = postgres_ids();
        std::os::unix::fs::chown(p, Some(uid), Some(gid)).expect("chown");
    }
}

fn as_postgres(cmd: &mut Command) -> &mut Command {
    if root() {
        let (uid, gid) = postgres_ids();
        cmd.uid(uid).gid(gid);
    }
    cmd.env("HOME", "/tmp")
        .env_remove("PGDATA")
        .current_dir("/")
}

pub struct Pg {
    pub data: PathBuf,
    pub sock: PathBuf,
    pub port: u16,
    pub log: PathBuf,
    running: bool,
    /// The postmaster's pid when it last started.
    pid: Option<i32>,
}

impl Pg {
    /// initdb into `data` (created by initdb; its parent must exist and be
    /// writable by postgres). The socket and log live in `work`.
    pub fn initdb(data: &Path, work: &Path) -> Pg {
        let port = 20000
            + (std::process::id() as u16 % 2000) * 10
            + NEXT_PORT.fetch_add(1, Ordering::SeqCst);
        let sock = work.join(format!("sock{port}"));
        std::fs::create_dir_all(&sock).expect("sock dir");
        chown_pg(&sock);
        let out = as_postgres(&mut Command::new(format!("{PGBIN}/initdb")))
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(data)
            .output()
            .expect("initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Pg {
            data: data.to_path_buf(),
            log: sock.join("postgres.log"),
            sock,
            port,
            running: false,
            pid: None,
        }
    }

    pub fn start(&mut self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses='' -c shared_buffers=32MB -c max_connections=40 -c fsync=on -c full_page_writes=on",
            self.port,
            self.sock.display()
        );
        let out = as_postgres(&mut Command::new(format!("{PGBIN}/pg_ctl")))
            .args(["start", "-w", "-t", "120", "-D"])
            .arg(&self.data)
            .args(["-o", &opts, "-l"])
            .arg(&self.log)
            .output()
            .expect("pg_ctl start");
        assert!(
            out.status.success(),
            "pg_ctl start: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
        self.running = true;
        self.pid = None;
        self.pid = self.postmaster();
    }

    pub fn stop(&mut self) {
        let out = as_postgres(&mut Command::new(format!("{PGBIN}/pg_ctl")))
            .args(["stop", "-w", "-m", "fast", "-D"])
            .arg(&self.data)
            .output()
            .expect("pg_ctl stop");
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.running = false;
    }

    /// The postmaster's pid, from postmaster.pid (or as read at start, when
    /// the data directory is on a mount that died).
    fn postmaster(&self) -> Option<i32> {
        std::fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next()?.trim().parse().ok())
            .or(self
                .pid
                .filter(|p| Path::new(&format!("/proc/{p}")).exists()))
    }

    /// SIGKILL to the postmaster and all its children at once, as a crash.
    pub fn kill9(&mut self) {
        if let Some(pm) = self.postmaster() {
            let mut pids = children(pm);
            pids.push(pm);
            for p in &pids {
                if let Some(pid) = rustix::process::Pid::from_raw(*p) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            while pids
                .iter()
                .any(|p| Path::new(&format!("/proc/{p}")).exists())
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.running = false;
        self.pid = None;
    }

    fn psql_cmd(&self) -> Command {
        let mut c = Command::new(format!("{PGBIN}/psql"));
        as_postgres(&mut c)
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-h",
            ])
            .arg(&self.sock)
            .args(["-p", &self.port.to_string()]);
        c
    }

    /// Runs each statement with its own `-c`; returns stdout or the error.
    pub fn try_sql(&self, stmts: &[&str]) -> Result<String, String> {
        let mut c = self.psql_cmd();
        for s in stmts {
            c.args(["-c", s]);
        }
        let out = c.output().expect("psql");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    pub fn sql(&self, stmts: &[&str]) -> String {
        self.try_sql(stmts).unwrap_or_else(|e| {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!(
                "psql {stmts:?}: {e}\n--- postgres log (tail) ---\n{}",
                tail.join("\n")
            )
        })
    }

    fn pgbench_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(format!("{PGBIN}/pgbench"));
        as_postgres(&mut c)
            .arg("-h")
            .arg(&self.sock)
            .args(["-p", &self.port.to_string(), "-U", "postgres"])
            .args(args)
            .arg("postgres");
        c
    }

    pub fn pgbench(&self, args: &[&str]) -> Output {
        self.pgbench_cmd(args).output().expect("pgbench")
    }

    /// `pgbench -i -s SCALE` with its tables and indexes in tablespace `ts`;
    /// asserts it worked.
    pub fn pgbench_init(&self, scale: u32, ts: &str) {
        let out = self.pgbench(&[
            "-i",
            "-s",
            &scale.to_string(),
            "-q",
            &format!("--tablespace={ts}"),
            &format!("--index-tablespace={ts}"),
        ]);
        assert!(
            out.status.success(),
            "pgbench -i failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts pgbench in the background.
    pub fn pgbench_spawn(&self, args: &[&str]) -> Child {
        self.pgbench_cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("pgbench")
    }

    /// pg_amcheck over every database, heap and indexes; asserts it is clean.
    pub fn amcheck(&self) {
        let out = as_postgres(&mut Command::new(format!("{PGBIN}/pg_amcheck")))
            .args([
                "--install-missing",
                "--heapallindexed",
                "--all",
                "-U",
                "postgres",
                "-h",
            ])
            .arg(&self.sock)
            .args(["-p", &self.port.to_string()])
            .output()
            .expect("pg_amcheck");
        assert!(
            out.status.success(),
            "pg_amcheck found problems:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
        if after
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<i32>().ok())
            == Some(pid)
        {
            out.push(p);
        }
    }
    out
}

impl Drop for Pg {
    fn drop(&mut self) {
        if self.running || self.postmaster().is_some() {
            let _ = as_postgres(&mut Command::new(format!("{PGBIN}/pg_ctl")))
                .args(["stop", "-w", "-t", "20", "-m", "immediate", "-D"])
                .arg(&self.data)
                .output();
            self.kill9();
        }
    }
}

pub use tde_plugin::mount::is_mountpoint;

/// A checksum of table `t (id, v)`.
pub const T_CHECKSUM: &str =
    "SELECT count(*) || ':' || md5(string_agg(id || '=' || v, ',' ORDER BY id)) FROM t";

/// A checksum of table `t` and of pgbench's accounts.
pub const T_AND_ACCOUNTS_CHECKSUM: &str = "SELECT (SELECT count(*) || ':' || md5(string_agg(id || '=' || v, ',' ORDER BY id)) FROM t) || '/' || (SELECT md5(string_agg(aid || '=' || abalance, ',' ORDER BY aid)) FROM pgbench_accounts)";

/// The data key versions in `backing`'s key file: `(version, mek_version)`.
pub fn keyfile_deks(backing: &Path) -> Vec<(u64, u64)> {
    let text = std::fs::read_to_string(backing.join("tde.key")).expect("key file");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    v["deks"]
        .as_array()
        .expect("deks")
        .iter()
        .map(|d| {
            (
                d["version"].as_u64().expect("version"),
                d["mek_version"].as_u64().expect("mek_version"),
            )
        })
        .collect()
}

/// A `tde mount` child.
pub struct Mount {
    child: Option<Child>,
    pub mountpoint: PathBuf,
    pub log: PathBuf,
}

impl Mount {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("child").id()
    }

    /// Graceful unmount (SIGTERM to the mount process).
    pub fn stop(mut self) {
        let mut c = self.child.take().expect("child");
        signal(&c, rustix::process::Signal::TERM);
        let st = wait(&mut c, Duration::from_secs(30)).expect("tde mount did not stop");
        assert!(
            st.success(),
            "tde mount exited with {st}: {}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
        assert!(!is_mountpoint(&self.mountpoint), "still mounted");
    }

    /// SIGKILL to the mount process, then detach the dead mount.
    pub fn kill9(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        detach(&self.mountpoint);
    }
}

impl Mount {
    /// Waits for the mount process to end by itself (up to 30 s), detaches
    /// the dead mount, and returns how it ended.
    pub fn wait_exit(mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("child");
        let st = wait(&mut c, Duration::from_secs(30));
        if st.is_none() {
            let _ = c.kill();
            let _ = c.wait();
        }
        detach(&self.mountpoint);
        st.expect("tde mount did not exit")
    }
}

pub fn detach(mountpoint: &Path) {
    for _ in 0..50 {
        if !is_mountpoint(mountpoint) {
            return;
        }
        // Directly as root, else through fusermount3 -uz.
        let _ = tde_plugin::fusermount::unmount(mountpoint, true);
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!(
                "--- tde mount log ({}) ---\n{log}",
                self.mountpoint.display()
            );
        }
        if let Some(mut c) = self.child.take() {
            signal(&c, rustix::process::Signal::TERM);
            if wait(&mut c, Duration::from_secs(15)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        detach(&self.mountpoint);
    }
}

impl Env {
    /// `tde mount` in the foreground as a child; waits until mounted.
    pub fn mount(&self, extra: &[&str], backing: &Path, mountpoint: &Path) -> Mount {
        self.mount_env(&[], extra, backing, mountpoint)
    }

    /// [`Env::mount`] with extra environment variables for the child.
    pub fn mount_env(
        &self,
        vars: &[(&str, &str)],
        extra: &[&str],
        backing: &Path,
        mountpoint: &Path,
    ) -> Mount {
        let log = self.dir.path().join(format!(
            "mount-{}.log",
            mountpoint
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        // The log is appended to by each mount of this mountpoint.
        let from = std::fs::metadata(&log).map_or(0, |m| m.len() as usize);
        let child = self
            .cmd(&["mount", "--wait", "20"])
            .args(extra)
            .arg(backing)
            .arg(mountpoint)
            .envs(vars.iter().copied())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .expect("log"),
            )
            .spawn()
            .expect("spawn tde mount");
        let mut m = Mount {
            child: Some(child),
            mountpoint: mountpoint.to_path_buf(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        // Up: mounted, its control socket in place (started just after),
        // and its own word that it is (said once SIGTERM unmounts it: a
        // test that stops it at once must not kill it half-started).
        let control = backing.join(tde_plugin::control::CONTROL_SOCKET);
        let log_path = m.log.clone();
        let said = || {
            std::fs::read_to_string(&log_path)
                .ok()
                .and_then(|t| t.get(from..).map(|t| t.contains(" mounted on ")))
                .unwrap_or(false)
        };
        while !(is_mountpoint(mountpoint) && control.exists() && said()) {
            if let Some(st) = m.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                m.child = None;
                panic!(
                    "tde mount exited ({st}): {}",
                    std::fs::read_to_string(&m.log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "tde mount did not mount");
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }

    /// `tde mount --init` of `backing` under master key `key` as tablespace
    /// `name` of cluster `c1`.
    pub fn mount_init(&self, key: &str, name: &str, backing: &Path, mountpoint: &Path) -> Mount {
        self.mount_init_env(&[], key, name, backing, mountpoint)
    }

    /// [`Env::mount_init`] with extra environment variables for the child.
    pub fn mount_init_env(
        &self,
        vars: &[(&str, &str)],
        key: &str,
        name: &str,
        backing: &Path,
        mountpoint: &Path,
    ) -> Mount {
        self.mount_env(
            vars,
            &[
                "--init",
                "--key",
                key,
                "--tablespace",
                name,
                "--cluster",
                "c1",
            ],
            backing,
            mountpoint,
        )
    }

    /// `tde mount` expected to fail: returns its stderr.
    pub fn mount_refused(&self, extra: &[&str], backing: &Path, mountpoint: &Path) -> String {
        let out = self
            .cmd(&["mount", "--wait", "5"])
            .args(extra)
            .arg(backing)
            .arg(mountpoint)
            .output()
            .expect("run tde mount");
        assert!(!out.status.success(), "tde mount should have been refused");
        assert!(!is_mountpoint(mountpoint));
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// A sidecar with 5/3 shares, unsealed, and master keys created.
    pub fn sidecar_with_keys(&self, keys: &[&str]) -> super::Daemon {
        let shares = self.init();
        let d = self.serve();
        self.unseal(&shares[..3]);
        for k in keys {
            self.ok(&["key", "create", k]);
        }
        d
    }

    /// A new directory under the test directory, owned by postgres.
    pub fn pg_dir(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(&p).expect("mkdir");
        chown_pg(&p);
        p
    }
}

/// The usual set-up: a backing directory and mountpoint, `tde mount --init`
/// under `key` as tablespace `name` (cluster `c1`), a started cluster, and
/// `CREATE TABLESPACE name` on the mount. Bind the result in this order so
/// that PostgreSQL stops before the mount: `let (backing, mnt, mount, pg)`.
pub fn tablespace(env: &Env, key: &str, name: &str) -> (PathBuf, PathBuf, Mount, Pg) {
    let backing = env.pg_dir(&format!("backing-{name}"));
    let mnt = env.pg_dir(&format!("mnt-{name}"));
    let mount = env.mount_init(key, name, &backing, &mnt);
    let mut pg = Pg::initdb(
        &env.pg_dir(&format!("cluster-{name}")).join("data"),
        env.dir.path(),
    );
    pg.start();
    pg.sql(&[&format!(
        "CREATE TABLESPACE {name} LOCATION '{}'",
        mnt.display()
    )]);
    (backing, mnt, mount, pg)
}

/// Every file under `dir` (recursively) that contains `needle`.
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let ft = e.file_type().expect("type");
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                let bytes = std::fs::read(e.path()).expect("read");
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    hits.push(e.path());
                }
            }
        }
    }
    hits
}

pub fn tde_bin() -> &'static str {
    BIN
}

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// PostgreSQL tests run one at a time: two cores do not carry several
/// clusters under load at once.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// pgbench's count of failed transactions.
pub fn failed_transactions(out: &std::process::Output) -> u64 {
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("number of failed transactions: "))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no failed-transactions line in pgbench output:\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// pgbench's count of processed transactions.
pub fn processed(out: &std::process::Output) -> u64 {
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|r| r.split('/').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// pgbench's transactions per second.
pub fn tps(out: &std::process::Output) -> f64 {
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no tps line in pgbench output:\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}
