//! `tde serve` under a service manager: the `sd_notify` readiness protocol
//! (READY once both sockets listen, a STATUS line that follows the seal
//! state, STOPPING at shutdown), received on a real datagram socket as
//! systemd would; and the shipped unit files pass `systemd-analyze verify`.

mod common;

use std::os::unix::net::{UnixDatagram, UnixStream};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::Env;

/// Kills the daemon if the test fails before it stops it.
struct Guard(Option<Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The next datagram, within `secs`.
fn next(sock: &UnixDatagram, secs: u64) -> String {
    sock.set_read_timeout(Some(Duration::from_secs(secs)))
        .expect("timeout");
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("a notification in time");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Datagrams until one contains `want`, within 15 s.
fn until(sock: &UnixDatagram, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        let m = next(sock, 15);
        if m.contains(want) {
            return m;
        }
        seen.push(m);
    }
    panic!("no {want:?} in {seen:?}");
}

fn serve(env: &Env, notify_socket: &str) -> Guard {
    let log = std::fs::File::create(env.log()).expect("log");
    Guard(Some(
        env.cmd(&["serve"])
            .env("NOTIFY_SOCKET", notify_socket)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("tde serve"),
    ))
}

#[test]
fn serve_notifies_ready_its_seal_state_and_stopping() {
    let env = Env::new("");
    let shares = env.init();
    let path = env.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).expect("bind");
    let mut daemon = serve(&env, path.to_str().expect("utf8"));
    let pid = daemon.0.as_ref().expect("child").id();

    let ready = next(&sock, 30);
    // Ready means listening: both sockets take a connection at once.
    assert!(
        UnixStream::connect(env.data_socket()).is_ok(),
        "data socket"
    );
    assert!(
        UnixStream::connect(env.admin_socket()).is_ok(),
        "admin socket"
    );
    let lines: Vec<&str> = ready.lines().collect();
    assert!(lines.contains(&"READY=1"), "{ready}");
    assert!(
        lines.contains(&format!("MAINPID={pid}").as_str()),
        "{ready}"
    );
    assert!(
        lines.contains(&"STATUS=sealed: waiting for unseal shares (0 of 3 given; `tde unseal`)"),
        "{ready}"
    );

    env.unseal(&shares[..3]);
    until(&sock, "STATUS=unsealed: serving");
    env.ok(&["seal"]);
    until(
        &sock,
        "STATUS=sealed: waiting for unseal shares (0 of 3 given",
    );

    let child = daemon.0.take().expect("child");
    let _ = std::process::Command::new("kill")
        .arg(child.id().to_string())
        .status();
    let stopping = until(&sock, "STOPPING=1");
    assert!(stopping.contains("STATUS=stopping (SIGTERM)"), "{stopping}");
    let mut child = child;
    let st = common::wait(&mut child, Duration::from_secs(30)).expect("stopped");
    assert!(st.success(), "{st}");
}

#[test]
fn serve_notifies_an_abstract_socket_and_runs_without_one() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::SocketAddr;
    let env = Env::new("");
    env.init();
    let name = format!("tde-test-notify-{}", std::process::id());
    let sock =
        UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).expect("addr"))
            .expect("bind");
    let daemon = serve(&env, &format!("@{name}"));
    assert!(next(&sock, 30).contains("READY=1"));
    drop(daemon);
    // A NOTIFY_SOCKET nobody listens on costs a warning, not the daemon.
    let gone = env.dir.path().join("nobody.sock");
    let _daemon = serve(&env, gone.to_str().expect("utf8"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = std::fs::read_to_string(env.log()).unwrap_or_default();
        if log.contains("could not notify the service manager") {
            break;
        }
        assert!(Instant::now() < deadline, "{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        UnixStream::connect(env.admin_socket()).is_ok(),
        "still serving"
    );
}

#[test]
fn a_mount_notifies_ready_with_its_pid_and_stopping_once_unmounted() {
    if !common::pg::can_run() {
        return;
    }
    let env = Env::new("");
    let _sidecar = env.sidecar_with_keys(&["pg-main"]);
    let path = env.dir.path().join("mount-notify.sock");
    let sock = UnixDatagram::bind(&path).expect("bind");
    let backing = env.pg_dir("backing");
    let mountpoint = env.pg_dir("mnt");
    let m = env.mount_init_env(
        &[("NOTIFY_SOCKET", path.to_str().expect("utf8"))],
        "pg-main",
        "ts",
        &backing,
        &mountpoint,
    );
    let ready = next(&sock, 30);
    let lines: Vec<&str> = ready.lines().collect();
    assert!(lines.contains(&"READY=1"), "{ready}");
    assert!(
        lines.contains(&format!("MAINPID={}", m.pid()).as_str()),
        "{ready}"
    );
    assert!(
        ready.contains(&format!("STATUS=mounted {}", backing.display())),
        "{ready}"
    );
    m.stop();
    let stopping = next(&sock, 30);
    assert!(
        stopping.contains("STOPPING=1") && stopping.contains("STATUS=unmounted (SIGTERM)"),
        "{stopping}"
    );
}

/// The shipped units, with `tde` at the built binary and the manual pages
/// they name generated: `systemd-analyze verify` finds nothing to say.
#[test]
fn the_unit_files_pass_systemd_analyze_verify() {
    let Ok(analyze) = which("systemd-analyze") else {
        common::skip("no systemd-analyze (package systemd)");
        return;
    };
    let dir = tempfile::tempdir().expect("tmp");
    let man1 = dir.path().join("man").join("man1");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tde"))
        .args(["man", "--out"])
        .arg(&man1)
        .output()
        .expect("tde man");
    assert!(out.status.success());
    let units = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/systemd");
    let mut copies = Vec::new();
    let mut names: Vec<String> = std::fs::read_dir(&units)
        .expect("packaging/systemd")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".service"))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "tde-mount-user@.service",
            "tde-mount@.service",
            "tde.service"
        ]
    );
    for name in &names {
        let text = std::fs::read_to_string(units.join(name)).expect("unit");
        assert!(text.contains("ExecStart=/usr/bin/tde "), "{name}");
        let copy = dir.path().join(name);
        std::fs::write(
            &copy,
            text.replace("/usr/bin/tde ", &format!("{} ", env!("CARGO_BIN_EXE_tde"))),
        )
        .expect("write");
        copies.push(copy);
    }
    let out = std::process::Command::new(analyze)
        .arg("verify")
        .args(&copies)
        .env("MANPATH", dir.path().join("man"))
        .output()
        .expect("systemd-analyze");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
    // The readiness the units rely on.
    let tde = std::fs::read_to_string(units.join("tde.service")).expect("unit");
    assert!(tde.contains("Type=notify"));
    let mount = std::fs::read_to_string(units.join("tde-mount@.service")).expect("unit");
    assert!(mount.contains("Type=notify") && mount.contains("Before=postgresql"));
    assert!(mount.contains("After=tde.service") && mount.contains("Requires=tde.service"));
    let user = std::fs::read_to_string(units.join("tde-mount-user@.service")).expect("unit");
    assert!(user.contains("User=postgres") && !user.contains("NoNewPrivileges=yes"));
}

fn which(name: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(())
}

/// A unit's `KEY=` lines (the last wins, as for ExecStart=).
fn unit_value(unit: &str, key: &str) -> String {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("packaging/systemd")
            .join(unit),
    )
    .expect("unit");
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {unit}"))
        .to_string()
}

/// A unit's ExecStart= as argv, with the instance, the environment file's
/// values and the binary substituted as systemd would.
fn exec_start(unit: &str, vars: &[(&str, &str)]) -> Vec<String> {
    let mut line = unit_value(unit, "ExecStart");
    for (k, v) in vars {
        line = line.replace(&format!("${{{k}}}"), v).replace(k, v);
    }
    line.split_whitespace()
        .map(|w| w.replace("/usr/bin/tde", env!("CARGO_BIN_EXE_tde")))
        .collect()
}

/// Issue 15, point 2: the units' commands, run by hand in the documented
/// order (sidecar, unseal, mount, PostgreSQL), bring up a working host; the
/// stop order (PostgreSQL, mount, sidecar) takes it down cleanly.
#[test]
fn the_units_commands_by_hand_bring_up_a_working_host() {
    use common::pg::*;
    if !can_run() {
        return;
    }
    let _serial = serial();
    let env = Env::new("");
    let shares = env.init();
    // tde.service: ExecStart with its Environment=.
    let serve = exec_start("tde.service", &[]);
    assert_eq!(serve[1..], ["serve"]);
    assert!(unit_value("tde.service", "Environment").starts_with("TDE_CONFIG="));
    let daemon = env.serve();
    env.unseal(&shares[..3]);
    env.ok(&["key", "create", "pg-main"]);
    // ExecReload=: SIGHUP to the main pid reloads.
    assert_eq!(
        unit_value("tde.service", "ExecReload"),
        "/bin/kill -HUP $MAINPID"
    );
    let pid = daemon.pid().to_string();
    let st = std::process::Command::new("/bin/kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill");
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(env.log())
        .unwrap_or_default()
        .contains("configuration reloaded")
    {
        assert!(Instant::now() < deadline, "no reload after SIGHUP");
        std::thread::sleep(Duration::from_millis(50));
    }

    // tde-mount@secure.service with its /etc/tde/mount-secure.env values;
    // the first mount of a new tablespace adds --init and --key.
    let (backing, mnt) = (env.pg_dir("backing"), env.pg_dir("mnt"));
    let (b, m) = (backing.display().to_string(), mnt.display().to_string());
    let argv = exec_start(
        "tde-mount@.service",
        &[
            ("%i", "secure"),
            ("CLUSTER", "prod-1"),
            ("BACKING_DIR", &b),
            ("MOUNTPOINT", &m),
        ],
    );
    assert_eq!(argv[1], "mount");
    assert_eq!(argv[argv.len() - 2..], [b.clone(), m.clone()]);
    let mut first: Vec<&str> = argv[2..argv.len() - 2].iter().map(String::as_str).collect();
    first.extend(["--init", "--key", "pg-main"]);
    let init = env.mount(&first, &backing, &mnt);
    init.stop();
    let extra: Vec<&str> = argv[2..argv.len() - 2].iter().map(String::as_str).collect();
    let mount = env.mount(&extra, &backing, &mnt);

    // PostgreSQL last.
    let mut pg = Pg::initdb(&env.pg_dir("cluster").join("data"), env.dir.path());
    pg.start();
    pg.sql(&[
        &format!("CREATE TABLESPACE secure LOCATION '{m}'"),
        "CREATE TABLE t (v text) TABLESPACE secure",
        "INSERT INTO t VALUES ('UNIT-ORDER-MARKER')",
        "CHECKPOINT",
    ]);
    assert!(files_containing(&backing, b"UNIT-ORDER-MARKER").is_empty());
    // Stop in the reverse order.
    pg.stop();
    mount.stop();
    daemon.stop();
}
