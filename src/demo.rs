//! `tde demo`: a self-contained tour on a temporary dev store.
//!
//! It starts a real `tde serve --dev` on a temporary directory, walks the key
//! lifecycle over the real sockets, then (where PostgreSQL 15 and FUSE are
//! available) mounts an encrypted tablespace with `tde mount`, initdb's a
//! throwaway PostgreSQL, loads it with pgbench, and shows that SQL sees
//! plaintext while the backing files hold ciphertext. Everything is torn down
//! at the end, also on Ctrl-C: PostgreSQL first, then the mount, then the
//! sidecar. The children run in their own process groups so that a Ctrl-C
//! reaches only the demo, which stops them in that order.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tde_plugin::mount::is_mountpoint;
use tde_protocol::client::{Client, ClientError};
use tde_protocol::{ErrorCode, SecretBytes};

const PGBIN: &str = "/usr/lib/postgresql/15/bin";
const MARKER: &str = "TOP-SECRET-demo-row-";

/// What the demo started, so that it can be stopped from any point.
#[derive(Default)]
struct Stack {
    sidecar: Option<Child>,
    mount: Option<(Child, PathBuf)>,
    pg: Option<(PathBuf, Option<(u32, u32)>)>,
}

impl Stack {
    fn teardown(&mut self) {
        if let Some((data, ids)) = self.pg.take() {
            let mut c = Command::new(format!("{PGBIN}/pg_ctl"));
            if let Some((u, g)) = ids {
                c.uid(u).gid(g);
            }
            let _ = c
                .args(["stop", "-w", "-m", "fast", "-D"])
                .arg(&data)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if let Some((child, mnt)) = self.mount.take() {
            stop_child(child);
            if is_mountpoint(&mnt) {
                let _ = tde_plugin::fusermount::unmount(&mnt, true);
            }
        }
        if let Some(child) = self.sidecar.take() {
            stop_child(child);
        }
    }
}

fn stop_child(mut c: Child) {
    if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = c.kill();
    let _ = c.wait();
}

fn step(n: &mut u32, what: &str) {
    *n += 1;
    println!("\n[{n}] {what}");
}

/// Waits until `what` holds; if the child `name` exits first, the error
/// holds what it wrote to `log` (its cause), not only its exit status.
fn wait_for(
    what: impl Fn() -> bool,
    child: &mut Child,
    name: &str,
    log: &Path,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !what() {
        if let Some(status) = child.try_wait()? {
            let said = std::fs::read_to_string(log).unwrap_or_default();
            let said = said.trim();
            bail!(
                "{name} exited during start-up ({status}){}{said}",
                if said.is_empty() { "" } else { ":\n" }
            );
        }
        if Instant::now() > deadline {
            bail!("{name} did not start within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn short(b: &[u8]) -> String {
    use base64::Engine as _;
    let s = base64::engine::general_purpose::STANDARD.encode(b);
    format!("{}... ({} bytes)", &s[..s.len().min(24)], b.len())
}

/// Runs the demo.
pub fn run() -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("tde-demo-").tempdir()?;
    let stack = Arc::new(Mutex::new(Stack::default()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = {
        let (path, st) = (dir.path().to_path_buf(), stack.clone());
        rt.block_on(async move {
            let work = tokio::task::spawn_blocking(move || tour(&path, &st));
            tokio::select! {
                r = work => r.context("the demo failed")?,
                _ = tokio::signal::ctrl_c() => bail!("interrupted"),
            }
        })
    };
    println!("\nCleaning up: stopping PostgreSQL, unmounting, stopping the sidecar.");
    stack.lock().unwrap_or_else(|p| p.into_inner()).teardown();
    drop(dir);
    println!("Removed the temporary directory. Nothing is left running.");
    if let Err(e) = &result {
        // The tour thread may still be inside a step: end it with us.
        eprintln!("error: {e:#}");
        std::process::exit(if e.to_string() == "interrupted" {
            130
        } else {
            1
        });
    }
    Ok(())
}

fn tour(dir: &Path, stack: &Mutex<Stack>) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let mut n = 0;
    println!(
        "tde demo: a software HSM in a sidecar daemon, on a throwaway dev store in {}",
        dir.display()
    );

    step(
        &mut n,
        "Start `tde serve --dev` (initializes a dev store with one local unseal share, auto-unseals)",
    );
    let sc_dir = dir.join("sidecar");
    let mut child = Command::new(&exe)
        .args(["serve", "--dev"])
        .env("TDE_DATA_DIR", &sc_dir)
        .env("TDE_LOG__LEVEL", "warn")
        .env_remove("TDE_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("serve.log"))?)
        .process_group(0)
        .spawn()
        .context("starting tde serve")?;
    let admin_sock = sc_dir.join("admin.sock");
    let data_sock = sc_dir.join("data.sock");
    let up = wait_for(
        || data_sock.exists() && admin_sock.exists(),
        &mut child,
        "tde serve",
        &dir.join("serve.log"),
    );
    stack.lock().unwrap_or_else(|p| p.into_inner()).sidecar = Some(child);
    up?;
    let mut admin = Client::connect(&admin_sock)?;
    let s = admin.status()?;
    println!(
        "    status: sealed={} dev_mode={} version={}",
        s.sealed, s.dev_mode, s.server_version
    );

    step(
        &mut n,
        "Log in as crypto officer `admin` and create master key `demo-mek` (it never leaves the HSM)",
    );
    let pw = std::fs::read(sc_dir.join("dev-admin.password"))?;
    admin.login("admin", SecretBytes::new(pw))?;
    admin.key_create("demo-mek", "demo master key", 0)?;
    println!("    created demo-mek v1");

    step(
        &mut n,
        "As a database client (authorized by its uid), generate a data key for tablespace `sales`",
    );
    let ctx: BTreeMap<String, String> = [
        ("tablespace".to_string(), "sales".to_string()),
        ("cluster".into(), "demo".into()),
    ]
    .into();
    let mut data = Client::connect(&data_sock)?;
    let tde_protocol::client::DataKey {
        version,
        plaintext,
        ciphertext,
        ..
    } = data.generate_data_key("demo-mek", &ctx)?;
    println!(
        "    wrapped under demo-mek v{version}: {}",
        short(&ciphertext)
    );

    step(&mut n, "Unwrap it again, as the mount does at start-up");
    let again = data.decrypt(&ciphertext, &ctx)?.plaintext;
    println!("    same key: {}", again == plaintext);

    step(
        &mut n,
        "A wrapped key copied to another tablespace is refused (the context is bound)",
    );
    let mut other = ctx.clone();
    other.insert("tablespace".into(), "hr".into());
    expect_refusal(
        data.decrypt(&ciphertext, &other),
        ErrorCode::ContextMismatch,
    )?;

    step(
        &mut n,
        "A flipped bit in the wrapped key is refused (authenticated encryption)",
    );
    let mut bad = ciphertext.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    expect_refusal(data.decrypt(&bad, &ctx), ErrorCode::InvalidCiphertext)?;

    step(
        &mut n,
        "Rotate the master key, then re-encrypt the data key to v2 without its plaintext leaving the HSM",
    );
    admin.key_rotate("demo-mek")?;
    let r = data.re_encrypt(&ciphertext, &ctx)?;
    println!(
        "    v{} -> v{}: {}",
        r.source_version,
        r.version,
        short(&r.ciphertext)
    );

    step(
        &mut n,
        "Disable v1: blobs still under v1 are refused until it is enabled again",
    );
    admin.key_disable("demo-mek", Some(1))?;
    expect_refusal(data.decrypt(&ciphertext, &ctx), ErrorCode::KeyDisabled)?;
    drop(data);

    step(
        &mut n,
        "An engine that keeps its own master key in an HSM (as Oracle does) uses the PKCS#11 module: \
         a crypto user makes AES-256 key ORACLE.TDE.HSM.MK.DEMO in the token and seals a table key with it",
    );
    pkcs11_part(&mut admin, &data_sock)?;

    let first_pg_step = n + 1;
    let skipped = match missing_for_postgres() {
        Some(why) => {
            println!(
                "\n(skipped) The encrypted tablespace: {why}. It would have mounted a tablespace with `tde mount`, run PostgreSQL 15 and pgbench on it, shown plaintext in SQL and ciphertext on disk, and rotated and re-keyed it online."
            );
            Some(why)
        }
        None => {
            postgres_part(dir, &exe, &data_sock, &mut admin, stack, &mut n)?;
            None
        }
    };
    let last_pg_step = n;
    drop(admin);

    step(
        &mut n,
        "Stop everything in order and verify the audit chain offline",
    );
    stack.lock().unwrap_or_else(|p| p.into_inner()).teardown();
    let conn = tde_sidecar::store::connect(&sc_dir.join("tde.db"))?;
    let report = tde_sidecar::audit::verify_chain(&conn).map_err(|e| anyhow::anyhow!("{e}"))?;
    println!(
        "    {} audit records, every request allowed or refused, SHA-256 chain intact (head {})",
        report.records,
        report
            .head
            .iter()
            .take(6)
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    println!("\nSummary:");
    println!(
        "    ran: the sidecar, the key lifecycle and the PKCS#11 module (steps 1-{}), the audit chain check (step {n})",
        first_pg_step - 1
    );
    match skipped {
        Some(why) => println!("    skipped: the encrypted tablespace with PostgreSQL ({why})"),
        None => println!(
            "    ran: the encrypted tablespace with PostgreSQL 15, rotation and online re-key (steps {first_pg_step}-{last_pg_step})"
        ),
    }
    println!("\nDone. See README.md for running the sidecar and `tde mount` for real.");
    Ok(())
}

/// What keeps the PostgreSQL part from running here, in one line that
/// says how to get it; `None` when it can run.
fn missing_for_postgres() -> Option<String> {
    if !Path::new(&format!("{PGBIN}/initdb")).exists() {
        return Some(format!(
            "PostgreSQL 15 is not installed (no {PGBIN}/initdb; install the postgresql-15 package)"
        ));
    }
    if !Path::new("/dev/fuse").exists() {
        return Some(
            "there is no /dev/fuse (load the fuse module with `modprobe fuse`; in a container, pass --device /dev/fuse)".into(),
        );
    }
    if rustix::process::geteuid().is_root() {
        if postgres_ids().is_err() {
            return Some(
                "PostgreSQL refuses to run as root and there is no `postgres` user to run it as (install the postgresql-15 package, which creates it)".into(),
            );
        }
        return None;
    }
    tde_plugin::fusermount::check_user_mount(false)
        .err()
        .map(|e| e.to_string())
}

fn postgres_part(
    dir: &Path,
    exe: &Path,
    data_sock: &Path,
    admin: &mut Client,
    stack: &Mutex<Stack>,
    n: &mut u32,
) -> anyhow::Result<()> {
    let root = rustix::process::geteuid().is_root();
    // PostgreSQL refuses to run as root: as root, run it as `postgres`; a
    // normal user runs it as themselves.
    let ids = if root { Some(postgres_ids()?) } else { None };
    let as_pg = |c: &mut Command| {
        if let Some((u, g)) = ids {
            c.uid(u).gid(g);
        }
        c.current_dir("/").env("HOME", "/tmp").env_remove("PGDATA");
    };
    let chown = |p: &Path| -> anyhow::Result<()> {
        if let Some((u, g)) = ids {
            std::os::unix::fs::chown(p, Some(u), Some(g))?;
        }
        Ok(())
    };
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    let (backing, mnt, pgroot) = (dir.join("backing"), dir.join("mnt"), dir.join("pg"));
    for d in [&backing, &mnt, &pgroot] {
        std::fs::create_dir_all(d)?;
        chown(d)?;
    }

    step(
        n,
        "Mount an encrypted tablespace: `tde mount --init` asks the sidecar for a data key under demo-mek",
    );
    let mut child = Command::new(exe)
        .args([
            "mount",
            "--init",
            "--key",
            "demo-mek",
            "--tablespace",
            "secure",
            "--cluster",
            "demo",
            "--sidecar",
        ])
        .arg(data_sock)
        .arg(&backing)
        .arg(&mnt)
        .env("TDE_LOG__LEVEL", "warn")
        .env_remove("TDE_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("mount.log"))?)
        .process_group(0)
        .spawn()
        .context("starting tde mount")?;
    let up = wait_for(
        || is_mountpoint(&mnt),
        &mut child,
        "tde mount",
        &dir.join("mount.log"),
    );
    stack.lock().unwrap_or_else(|p| p.into_inner()).mount = Some((child, mnt.clone()));
    up?;
    println!(
        "    {} (ciphertext) is mounted on {} (plaintext)",
        backing.display(),
        mnt.display()
    );

    step(
        n,
        "initdb a throwaway PostgreSQL 15 and start it on a Unix socket",
    );
    let data = pgroot.join("data");
    let mut c = Command::new(format!("{PGBIN}/initdb"));
    as_pg(&mut c);
    let out = c
        .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
        .arg(&data)
        .output()?;
    if !out.status.success() {
        bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let port = 15000 + (std::process::id() % 10000) as u16;
    let opts = format!(
        "-p {port} -k {} -c listen_addresses='' -c shared_buffers=32MB",
        pgroot.display()
    );
    let mut c = Command::new(format!("{PGBIN}/pg_ctl"));
    as_pg(&mut c);
    let out = c
        .args(["start", "-w", "-D"])
        .arg(&data)
        .args(["-o", &opts, "-l"])
        .arg(pgroot.join("postgres.log"))
        .process_group(0)
        .output()?;
    stack.lock().unwrap_or_else(|p| p.into_inner()).pg = Some((data.clone(), ids));
    if !out.status.success() {
        // The cause is in the server's log, which goes with the directory.
        let log = std::fs::read_to_string(pgroot.join("postgres.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(10).collect();
        bail!(
            "PostgreSQL did not start: {}\n{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let psql = |sql: &str| -> anyhow::Result<String> {
        let mut c = Command::new(format!("{PGBIN}/psql"));
        as_pg(&mut c);
        let out = c
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-U",
                "postgres",
                "-h",
            ])
            .arg(&pgroot)
            .args(["-p", &port.to_string(), "-c", sql])
            .output()?;
        if !out.status.success() {
            bail!("{sql}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let pgbench = |args: &[&str]| -> anyhow::Result<String> {
        let mut c = Command::new(format!("{PGBIN}/pgbench"));
        as_pg(&mut c);
        let out = c
            .args(["-U", "postgres", "-h"])
            .arg(&pgroot)
            .args(["-p", &port.to_string()])
            .args(args)
            .arg("postgres")
            .output()?;
        if !out.status.success() {
            bail!("pgbench failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    println!("    PostgreSQL 15 on port {port}");

    step(
        n,
        "CREATE TABLESPACE on the mount; load it with pgbench and a table of marked rows",
    );
    psql(&format!(
        "CREATE TABLESPACE secure LOCATION '{}'",
        mnt.display()
    ))?;
    pgbench(&[
        "-i",
        "-s",
        "2",
        "-q",
        "--tablespace=secure",
        "--index-tablespace=secure",
    ])?;
    psql(&format!(
        "CREATE TABLE secrets TABLESPACE secure AS SELECT g AS id, '{MARKER}' || g AS v FROM generate_series(1, 10000) g"
    ))?;
    let run = pgbench(&["-n", "-c", "4", "-j", "2", "-T", "5"])?;
    let tps = run
        .lines()
        .find(|l| l.starts_with("tps"))
        .unwrap_or("tps: n/a");
    let failed = run
        .lines()
        .find(|l| l.starts_with("number of failed"))
        .unwrap_or("");
    println!("    pgbench 5 s, 4 clients: {tps}; {failed}");
    psql("CHECKPOINT")?;

    step(
        n,
        "SQL sees plaintext; the backing directory holds only ciphertext",
    );
    println!(
        "    SELECT v FROM secrets LIMIT 2  ->  {}",
        psql("SELECT string_agg(v, ', ') FROM (SELECT v FROM secrets ORDER BY id LIMIT 2) s")?
    );
    let rel = psql("SELECT pg_relation_filepath('secrets')")?;
    let rel: PathBuf = rel.split('/').skip(2).collect();
    let plain = std::fs::read(mnt.join(&rel))?;
    let cipher = std::fs::read(backing.join(&rel))?;
    let found = |b: &[u8]| {
        b.windows(MARKER.len())
            .filter(|w| *w == MARKER.as_bytes())
            .count()
    };
    println!(
        "    {} through the mount: {} bytes, the marker appears {} times",
        rel.display(),
        plain.len(),
        found(&plain)
    );
    println!(
        "    the same file in the backing directory: {} bytes, the marker appears {} times",
        cipher.len(),
        found(&cipher)
    );
    println!(
        "    through the mount, the last row of the last page: {}",
        hex(&plain[plain.len().saturating_sub(48)..][..24])
    );
    println!(
        "    in the backing file, the start of block 0:        {}",
        hex(&cipher[64..88])
    );
    if found(&cipher) != 0 || found(&plain) == 0 {
        bail!("the backing file is not ciphertext");
    }

    step(
        n,
        "Rotate demo-mek while PostgreSQL runs: the mount hears of it and rewraps its key file (no data touched)",
    );
    let t0 = Instant::now();
    let k = admin.key_rotate("demo-mek")?;
    let mek_version = || {
        tde_plugin::keyfile::KeyFile::load(&backing)
            .map(|kf| kf.deks.iter().map(|d| d.mek_version).min().unwrap_or(0))
            .unwrap_or(0)
    };
    while mek_version() != k.primary_version {
        if t0.elapsed() > Duration::from_secs(40) {
            bail!("the mount did not rewrap its key file");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "    demo-mek v{}: the key file was rewrapped {} ms after the rotation",
        k.primary_version,
        t0.elapsed().as_millis()
    );
    for r in &admin.key_describe("demo-mek")?.references {
        println!(
            "    registry: tablespace {} data key v{} is wrapped under demo-mek v{}",
            r.context.get("tablespace").map_or("?", String::as_str),
            r.dek_version,
            r.key_version
        );
    }

    step(
        n,
        "Re-key the tablespace online: every block moves to a new data key while pgbench runs",
    );
    use tde_plugin::control::{Control, call};
    let t0 = Instant::now();
    call(&backing, &Control::Start { rate: 0 })?;
    let run = pgbench(&["-n", "-c", "4", "-j", "2", "-T", "3"])?;
    let st = loop {
        let st = call(&backing, &Control::Status)?;
        match st.state.as_str() {
            "done" => break st,
            "failed" => bail!("the re-key failed: {:?}", st.error),
            _ if t0.elapsed() > Duration::from_secs(120) => bail!("the re-key did not finish"),
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let failed = run
        .lines()
        .find(|l| l.starts_with("number of failed"))
        .unwrap_or("");
    println!(
        "    data key v{} replaced v{:?}: {} blocks re-encrypted; pgbench meanwhile: {failed}",
        st.target_version.unwrap_or(0),
        st.old_versions,
        st.blocks_rewritten
    );
    let i = tde_plugin::rekey::inspect(&backing)?;
    println!(
        "    block trailers in the backing directory, per data key version: {:?}",
        i.versions
    );
    if i.versions.len() != 1 {
        bail!("blocks are left under an old data key version");
    }
    println!(
        "    SELECT count(*) FROM secrets  ->  {}",
        psql("SELECT count(*) FROM secrets")?
    );
    Ok(())
}

/// The PKCS#11 step: `libtde_pkcs11.so`'s own code, in this process, as
/// an application loading it would run it.
fn pkcs11_part(admin: &mut Client, data_sock: &Path) -> anyhow::Result<()> {
    use cryptoki_sys::*;
    use tde_pkcs11::config::{Config, SlotConfig};
    use tde_pkcs11::module::{self, Mechanism, Out};
    admin.operator_add(
        "demo-app",
        "crypto_user",
        SecretBytes::from_slice(b"demo-app-password"),
    )?;
    let rv = |r: CK_RV| {
        anyhow::anyhow!(
            "the PKCS#11 module answered {}",
            tde_pkcs11::module::rv_name(r)
        )
    };
    module::initialize_with(Config {
        slots: vec![SlotConfig {
            socket: data_sock.to_path_buf(),
            label: None,
        }],
    })
    .map_err(rv)?;
    let r = (|| {
        let h = module::open_session(0, CKF_SERIAL_SESSION | CKF_RW_SESSION).map_err(rv)?;
        module::login(h, CKU_USER, b"demo-app:demo-app-password").map_err(rv)?;
        let label = b"ORACLE.TDE.HSM.MK.DEMO".to_vec();
        let key = module::generate_key(
            h,
            CKM_AES_KEY_GEN,
            &[
                (CKA_TOKEN, vec![1]),
                (CKA_LABEL, label),
                (CKA_VALUE_LEN, 32u64.to_ne_bytes().to_vec()),
                (CKA_SENSITIVE, vec![1]),
            ],
        )
        .map_err(rv)?;
        let table_key = [0x42u8; 32];
        let gcm = Mechanism::AesGcm {
            iv: [7; 12],
            aad: b"table 16384".to_vec(),
        };
        module::crypt_init(h, true, gcm.clone(), key).map_err(rv)?;
        let sealed = module::crypt_final(h, true, &table_key, Out::Buffer(64))
            .map_err(rv)?
            .map_err(|n| anyhow::anyhow!("{n} bytes needed"))?;
        module::crypt_init(h, false, gcm, key).map_err(rv)?;
        let opened = module::crypt_final(h, false, &sealed, Out::Buffer(64))
            .map_err(rv)?
            .map_err(|n| anyhow::anyhow!("{n} bytes needed"))?;
        let sensitive = module::object(h, key).map_err(rv)?.attribute(CKA_VALUE) == Ok(None);
        println!(
            "    sealed a 32-byte table key into {} bytes (CKM_AES_GCM); opened: same = {}; the key's value: {}",
            sealed.len(),
            opened.as_slice() == table_key,
            if sensitive {
                "CKR_ATTRIBUTE_SENSITIVE (it never leaves the HSM)"
            } else {
                "readable?!"
            }
        );
        module::logout(h).map_err(rv)?;
        module::close_session(h).map_err(rv)
    })();
    let _ = module::finalize();
    r
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The `postgres` user's uid and gid (through NSS).
fn postgres_ids() -> anyhow::Result<(u32, u32)> {
    let u = nix::unistd::User::from_name("postgres")
        .context("looking up the postgres user")?
        .context("no `postgres` user: install postgresql-15")?;
    Ok((u.uid.as_raw(), u.gid.as_raw()))
}

fn expect_refusal<T>(r: Result<T, ClientError>, code: ErrorCode) -> anyhow::Result<()> {
    match r {
        Err(e) if e.refused() == Some(code) => {
            println!("    refused: {e}");
            Ok(())
        }
        Err(e) => Err(e.into()),
        Ok(_) => bail!("expected {code}, but the request succeeded"),
    }
}
