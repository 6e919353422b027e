//! `tde demo`: a self-contained tour on a temporary dev store.
//!
//! It starts a real `tde serve --dev` child on a temporary directory, walks
//! through the key lifecycle over the real sockets, verifies the audit
//! chain, and removes everything again, also on Ctrl-C.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tde_protocol::{ErrorCode, Request, Response, SecretBytes};

use tde_plugin::client::{Client, Refused};

/// The sidecar child; stopped (SIGTERM, then SIGKILL) when dropped.
struct Sidecar(Child);

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn step(n: &mut u32, what: &str) {
    *n += 1;
    println!("\n[{n}] {what}");
}

fn wait_for(path: &Path, child: &mut Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        if let Some(status) = child.try_wait()? {
            bail!("the sidecar exited during start-up ({status})");
        }
        if Instant::now() > deadline {
            bail!("the sidecar did not create {} within 20 s", path.display());
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
    let interrupted = Arc::new(AtomicBool::new(false));
    let dir = tempfile::Builder::new().prefix("tde-demo-").tempdir()?;
    let result = {
        let flag = interrupted.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let path = dir.path().to_path_buf();
        rt.block_on(async move {
            let work = tokio::task::spawn_blocking(move || tour(&path));
            tokio::select! {
                r = work => r.context("the demo failed")?,
                _ = tokio::signal::ctrl_c() => {
                    flag.store(true, Ordering::SeqCst);
                    bail!("interrupted")
                }
            }
        })
    };
    if interrupted.load(Ordering::SeqCst) {
        // The tour thread is still running; it owns the child, and the
        // child got the same SIGINT from the terminal. Give it a moment.
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(dir);
    println!("\nCleaned up the temporary data directory.");
    result
}

fn tour(dir: &Path) -> anyhow::Result<()> {
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
    let log = std::fs::File::create(dir.join("serve.log"))?;
    let child = Command::new(&exe)
        .args(["serve", "--dev"])
        .env("TDE_DATA_DIR", dir)
        .env("TDE_LOG__LEVEL", "warn")
        .env_remove("TDE_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting tde serve")?;
    let mut sidecar = Sidecar(child);
    let admin_sock = dir.join("admin.sock");
    let data_sock = dir.join("data.sock");
    wait_for(&data_sock, &mut sidecar.0)?;
    wait_for(&admin_sock, &mut sidecar.0)?;
    let mut admin = Client::connect(&admin_sock)?;
    if let Response::Status(s) = admin.call(&Request::Status)? {
        println!(
            "    status: sealed={} dev_mode={} version={}",
            s.sealed, s.dev_mode, s.server_version
        );
    }

    step(
        &mut n,
        "Log in as crypto officer `admin` and create master key `demo-mek` (it never leaves the HSM)",
    );
    let pw = std::fs::read(dir.join("dev-admin.password"))?;
    admin.call(&Request::Login {
        operator: "admin".into(),
        password: SecretBytes::new(pw),
    })?;
    admin.call(&Request::KeyCreate {
        key: "demo-mek".into(),
        description: "demo master key".into(),
    })?;
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
    let Response::DataKey {
        version,
        plaintext,
        ciphertext,
        ..
    } = data.call(&Request::GenerateDataKey {
        key: "demo-mek".into(),
        context: ctx.clone(),
    })?
    else {
        bail!("unexpected response")
    };
    println!(
        "    wrapped under demo-mek v{version}: {}",
        short(&ciphertext)
    );
    println!("    plaintext data key: 32 bytes, held only by the client");

    step(&mut n, "Unwrap it again, as the plugin does at mount time");
    let Response::Decrypted {
        plaintext: again, ..
    } = data.call(&Request::Decrypt {
        ciphertext: ciphertext.clone(),
        context: ctx.clone(),
    })?
    else {
        bail!("unexpected response")
    };
    println!("    same key: {}", again == plaintext);

    step(
        &mut n,
        "A wrapped key copied to another tablespace is refused (the context is bound)",
    );
    let mut other = ctx.clone();
    other.insert("tablespace".into(), "hr".into());
    expect_refusal(
        data.call(&Request::Decrypt {
            ciphertext: ciphertext.clone(),
            context: other,
        }),
        ErrorCode::ContextMismatch,
    )?;

    step(
        &mut n,
        "A flipped bit in the wrapped key is refused (authenticated encryption)",
    );
    let mut bad = ciphertext.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    expect_refusal(
        data.call(&Request::Decrypt {
            ciphertext: bad,
            context: ctx.clone(),
        }),
        ErrorCode::InvalidCiphertext,
    )?;

    step(
        &mut n,
        "Rotate the master key, then re-encrypt the data key to v2 without its plaintext leaving the HSM",
    );
    admin.call(&Request::KeyRotate {
        key: "demo-mek".into(),
    })?;
    let Response::ReEncrypted {
        source_version,
        version,
        ciphertext: v2,
        ..
    } = data.call(&Request::ReEncrypt {
        ciphertext: ciphertext.clone(),
        context: ctx.clone(),
    })?
    else {
        bail!("unexpected response")
    };
    println!("    v{source_version} -> v{version}: {}", short(&v2));
    let Response::Decrypted {
        plaintext: from_v2, ..
    } = data.call(&Request::Decrypt {
        ciphertext: v2,
        context: ctx.clone(),
    })?
    else {
        bail!("unexpected response")
    };
    println!(
        "    the v2 blob unwraps to the same data key: {}",
        from_v2 == plaintext
    );

    step(
        &mut n,
        "Disable v1: blobs still under v1 are refused until it is enabled again",
    );
    admin.call(&Request::KeyDisable {
        key: "demo-mek".into(),
        version: Some(1),
    })?;
    expect_refusal(
        data.call(&Request::Decrypt {
            ciphertext,
            context: ctx,
        }),
        ErrorCode::KeyDisabled,
    )?;

    step(
        &mut n,
        "Stop the daemon (SIGTERM: in-flight requests finish) and verify the audit chain offline",
    );
    drop(admin);
    drop(data);
    drop(sidecar);
    let conn = tde_sidecar::store::connect(&dir.join("tde.db"))?;
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
    let plain = count_plaintext(dir, plaintext.expose())?;
    println!(
        "    the data key's bytes appear in {plain} files under the data directory (expected 0)"
    );
    if plain != 0 {
        bail!("the plaintext data key was found on disk");
    }
    println!(
        "\nDone. Next: `tde serve --dev` to keep a dev sidecar running, or see README.md for production set-up."
    );
    Ok(())
}

fn expect_refusal(r: anyhow::Result<Response>, code: ErrorCode) -> anyhow::Result<()> {
    match r {
        Err(e) => match e.downcast_ref::<Refused>() {
            Some(r) if r.code == code => {
                println!("    refused: {} ({})", r.message, r.code);
                Ok(())
            }
            _ => Err(e),
        },
        Ok(_) => bail!("expected {code}, but the request succeeded"),
    }
}

fn count_plaintext(dir: &Path, needle: &[u8]) -> anyhow::Result<usize> {
    let mut hits = 0;
    let mut stack: Vec<PathBuf> = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let ft = e.file_type()?;
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file()
                && std::fs::read(e.path())?
                    .windows(needle.len())
                    .any(|w| w == needle)
            {
                hits += 1;
            }
        }
    }
    Ok(hits)
}
