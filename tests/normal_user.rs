//! Issue 11: `tde mount` and `tde umount` as a normal user (`nobody`),
//! through the setuid `fusermount3` helper, as a user of sshfs or gocryptfs
//! would; every refusal says why. The test runner is root (it starts the
//! sidecar and switches to `nobody` for the mount's commands).

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::pg::*;
use common::{Env, signal, wait};

const NOBODY: u32 = 65534;

/// `tde ARGS` as `nobody`.
fn as_nobody(env: &Env, args: &[&str]) -> Command {
    as_user(env, (NOBODY, NOBODY), args)
}

/// `tde ARGS` as the user `(uid, gid)`.
fn as_user(env: &Env, (uid, gid): (u32, u32), args: &[&str]) -> Command {
    let mut c = env.cmd(args);
    c.uid(uid).gid(gid).env("HOME", "/tmp").current_dir("/");
    c
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn run(mut c: Command) -> (bool, String) {
    let out: Output = c.output().expect("run tde");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The options of the mount on `mnt` in /proc/mounts (root cannot stat a
/// mount made without allow_other).
fn mounted(mnt: &Path) -> Option<String> {
    let want = mnt.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/mounts")
        .ok()?
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 4 && f[1] == want).then(|| f[3].to_string())
        })
}

/// A `tde mount` child run as a normal user; killed and detached (root
/// may unmount anything) if the test fails.
struct UserMount {
    child: Option<Child>,
    mnt: PathBuf,
    log: PathBuf,
}

impl UserMount {
    fn start(env: &Env, args: &[&str], mnt: &Path) -> UserMount {
        UserMount::start_as(env, (NOBODY, NOBODY), args, mnt)
    }

    fn start_as(env: &Env, ids: (u32, u32), args: &[&str], mnt: &Path) -> UserMount {
        let log = env.dir.path().join(format!("mount-{}.log", ids.0));
        let child = as_user(env, ids, args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn tde mount");
        let mut m = UserMount {
            child: Some(child),
            mnt: mnt.to_path_buf(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while mounted(mnt).is_none() {
            if let Some(st) = m.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!(
                    "tde mount as uid {} exited ({st}): {}",
                    ids.0,
                    std::fs::read_to_string(&m.log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "tde mount did not mount");
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("child").id()
    }

    /// Waits for the process to end after an unmount; its exit status.
    fn wait_exit(mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("child");
        wait(&mut c, Duration::from_secs(30)).expect("tde mount did not exit after tde umount")
    }
}

impl Drop for UserMount {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- tde mount log ---\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for _ in 0..20 {
            if mounted(&self.mnt).is_none() {
                break;
            }
            let _ = rustix::mount::unmount(&self.mnt, rustix::mount::UnmountFlags::DETACH);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn a_normal_user_mounts_and_unmounts_through_fusermount3() {
    // Root switches to nobody (and makes a mountpoint nobody may not use);
    // a normal user's own mounts are what every other end-to-end test runs
    // when the suite runs without root.
    if !can_run_as_root() || !can_run_as_normal_user() {
        return;
    }
    let _serial = serial();
    let env = Env::new(
        r#"[[clients]]
name = "nobody"
users = ["nobody"]
keys = ["pg-*"]
operations = ["generate_data_key", "decrypt", "re_encrypt", "generate_random"]
"#,
    );
    let _sidecar = env.sidecar_with_keys(&["pg-main", "other"]);
    let owned = |name: &str| {
        let p = env.dir.path().join(name);
        std::fs::create_dir_all(&p).expect("mkdir");
        std::os::unix::fs::chown(&p, Some(NOBODY), Some(NOBODY)).expect("chown");
        p
    };
    let (backing, mnt) = (owned("nb-backing"), owned("nb-mnt"));
    let sock = env.data_socket();
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let mount_args = |init: &[&str], key: &str, b: &Path, m: &Path| -> Vec<String> {
        let mut v: Vec<String> = [
            "mount",
            "--tablespace",
            "nb",
            "--cluster",
            "c1",
            "--wait",
            "5",
        ]
        .map(String::from)
        .to_vec();
        v.extend(init.iter().map(|x| x.to_string()));
        v.extend(["--key".into(), key.into(), "--sidecar".into(), s(&sock)]);
        v.extend([s(b), s(m)]);
        v
    };

    // Without the helper on the PATH: says which package provides it.
    let args = mount_args(&["--init"], "pg-main", &owned("nb-b0"), &owned("nb-m0"));
    let mut c = as_nobody(&env, &refs(&args));
    c.env("PATH", "/nonexistent");
    let (ok, said) = run(c);
    assert!(
        !ok && said.contains("fusermount3") && said.contains("fuse3"),
        "{said}"
    );
    // The sidecar refuses a key outside the user's policy: its refusal.
    let args = mount_args(&["--init"], "other", &owned("nb-b1"), &owned("nb-m1"));
    let (ok, said) = run(as_nobody(&env, &refs(&args)));
    assert!(!ok && said.contains("may not use master key"), "{said}");

    // The mount itself: only its user may use it (no allow_other).
    let args = mount_args(&["--init"], "pg-main", &backing, &mnt);
    let m = UserMount::start(&env, &refs(&args), &mnt);
    let opts = mounted(&mnt).expect("mounted");
    assert!(
        opts.contains(&format!("user_id={NOBODY}")) && !opts.contains("allow_other"),
        "{opts}"
    );
    let mut sh = Command::new("sh");
    sh.args(["-c", "echo secret-row > \"$1/f\" && cat \"$1/f\"", "sh"])
        .arg(&mnt)
        .uid(NOBODY)
        .gid(NOBODY)
        .current_dir("/");
    let (ok, said) = run(sh);
    assert!(ok && said.trim() == "secret-row", "{said}");
    let root_read = std::fs::read(mnt.join("f")).expect_err("root is not the mount's user");
    assert_eq!(
        root_read.kind(),
        std::io::ErrorKind::PermissionDenied,
        "{root_read}"
    );
    let stored = std::fs::read(backing.join("f")).expect("backing file");
    assert!(
        !stored.windows(10).any(|w| w == b"secret-row"),
        "the backing file is ciphertext"
    );

    // A second mount on the busy mountpoint: refused, with the reason.
    let args = mount_args(&[], "pg-main", &backing, &mnt);
    let (ok, said) = run(as_nobody(&env, &refs(&args)));
    assert!(!ok && said.contains("busy"), "{said}");
    // allow_other is refused up front where /etc/fuse.conf does not permit
    // it (the message names the line to add).
    if !tde_plugin::fusermount::user_allow_other() {
        let mut args = mount_args(&[], "pg-main", &owned("nb-b1"), &owned("nb-m2"));
        args.insert(1, "--allow-other".into());
        let (ok, said) = run(as_nobody(&env, &refs(&args)));
        assert!(!ok && said.contains("user_allow_other"), "{said}");
    }

    // tde umount as the same user: returns once the mount process is gone.
    let (ok, said) = run(as_nobody(&env, &["umount", &s(&mnt)]));
    assert!(ok, "tde umount as nobody: {said}");
    assert!(mounted(&mnt).is_none(), "still mounted after tde umount");
    let st = m.wait_exit();
    assert!(st.success(), "tde mount exited with {st}");
    let (ok, said) = run(as_nobody(&env, &["umount", &s(&mnt)]));
    assert!(!ok && said.contains("not mounted"), "{said}");

    // A mountpoint the user may not write (root's): the helper's reason.
    let theirs = env.dir.path().join("root-owned");
    std::fs::create_dir_all(&theirs).expect("mkdir");
    let args = mount_args(&[], "pg-main", &backing, &theirs);
    let (ok, said) = run(as_nobody(&env, &refs(&args)));
    assert!(
        !ok && said.contains("fusermount3 could not mount"),
        "{said}"
    );

    // Mounted again, the data is there; stopped by SIGTERM as by a unit.
    let args = mount_args(&[], "pg-main", &backing, &mnt);
    let mut m = UserMount::start(&env, &refs(&args), &mnt);
    let mut cat = Command::new("cat");
    cat.arg(mnt.join("f"))
        .uid(NOBODY)
        .gid(NOBODY)
        .current_dir("/");
    let (ok, said) = run(cat);
    assert!(ok && said.trim() == "secret-row", "{said}");
    signal(
        m.child.as_ref().expect("child"),
        rustix::process::Signal::TERM,
    );
    let st = wait(m.child.as_mut().expect("child"), Duration::from_secs(30)).expect("exit");
    assert!(st.success(), "tde mount on SIGTERM: {st}");
    m.child = None;
    assert!(mounted(&mnt).is_none(), "unmounted on SIGTERM");
}

/// Issue 15, point 3: a tablespace mounted by the `postgres` user without
/// root (through fusermount3, as the tde-mount-user@ unit runs it) works
/// with PostgreSQL, and the same user unmounts it.
#[test]
fn postgres_mounts_its_own_tablespace_without_root() {
    if !can_run_as_root() || !can_run_as_normal_user() {
        return;
    }
    let _serial = serial();
    let env = Env::new(
        r#"[[clients]]
name = "postgres-mounts"
users = ["postgres"]
keys = ["pg-*"]
operations = ["generate_data_key", "decrypt", "re_encrypt"]
"#,
    );
    let _sidecar = env.sidecar_with_keys(&["pg-main"]);
    let pg_ids = postgres_ids();
    let (backing, mnt) = (env.pg_dir("pg-backing"), env.pg_dir("pg-mnt"));
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let args = [
        "mount",
        "--init",
        "--key",
        "pg-main",
        "--tablespace",
        "secure",
        "--cluster",
        "c1",
        "--wait",
        "5",
    ]
    .map(String::from)
    .into_iter()
    .chain([s(&backing), s(&mnt)])
    .collect::<Vec<_>>();
    let m = UserMount::start_as(&env, pg_ids, &refs(&args), &mnt);
    let opts = mounted(&mnt).expect("mounted");
    assert!(opts.contains(&format!("user_id={}", pg_ids.0)), "{opts}");
    // The mount process runs as postgres, not root.
    let status = std::fs::read_to_string(format!("/proc/{}/status", m.pid())).expect("status");
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).expect("Uid");
    assert!(
        uid_line
            .split_whitespace()
            .skip(1)
            .all(|u| u == pg_ids.0.to_string()),
        "{uid_line}"
    );
    // ...and is not dumpable: its /proc files are root's, so neither a core
    // dump nor another postgres process (ptrace, /proc/PID/mem) reads its
    // data keys.
    use std::os::unix::fs::MetadataExt as _;
    let mem = std::fs::metadata(format!("/proc/{}/mem", m.pid())).expect("mem");
    assert_eq!(mem.uid(), 0, "the mount process is dumpable");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", m.pid())).expect("limits");
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("core");
    assert!(core.split_whitespace().nth(4) == Some("0"), "{core}");

    let mut pg = Pg::initdb(&env.pg_dir("pg-cluster").join("data"), env.dir.path());
    pg.start();
    pg.sql(&[
        &format!("CREATE TABLESPACE secure LOCATION '{}'", mnt.display()),
        "CREATE TABLE card (id int PRIMARY KEY, pan text) TABLESPACE secure",
        "INSERT INTO card SELECT g, 'PG-USER-MARKER-' || g FROM generate_series(1, 2000) g",
        "CHECKPOINT",
    ]);
    assert_eq!(
        pg.sql(&["SELECT count(*) FROM card WHERE pan LIKE 'PG-USER-MARKER-%'"]),
        "2000"
    );
    assert!(
        files_containing(&backing, b"PG-USER-MARKER-").is_empty(),
        "plaintext in the backing directory"
    );
    // Restarted on the same mount, the rows are read back through it.
    pg.stop();
    pg.start();
    assert_eq!(pg.sql(&["SELECT count(*) FROM card"]), "2000");
    pg.stop();

    // Unmounted by the same user, without root.
    let (ok, said) = run(as_user(&env, pg_ids, &["umount", &s(&mnt)]));
    assert!(ok, "tde umount as postgres: {said}");
    assert!(mounted(&mnt).is_none(), "still mounted");
    let st = m.wait_exit();
    assert!(st.success(), "tde mount exited with {st}");
}
