//! The commands behind the CLI.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use tde_hsm::Hsm;
use tde_hsm::store::ObjectStore;
use tde_plugin::keys::SyncError;
use tde_protocol::client::{Client, ClientError};
use tde_protocol::{ErrorCode, KeyInfo, Request, Response, SecretBytes, StatusInfo};
use tde_sidecar::Config;
use tde_sidecar::custodian::CustodianKey;
use tde_sidecar::policy::{ClientPolicy, DATA_OPERATIONS};
use tde_sidecar::server;
use tde_sidecar::store::SqliteStore;
use zeroize::Zeroizing;

use crate::{Cli, Command, DatakeyCmd, InitArgs, KeyCmd, MountArgs, OperatorCmd, ServeArgs};

/// Runs a parsed command line. A refusal from the sidecar is printed and
/// exits 1; other failures exit 2.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let json = cli.json;
    // Data-socket commands are refused by client policies, the others by
    // the operator's role.
    let data_socket = matches!(cli.command, Command::Mount(_) | Command::Rewrap { .. })
        || matches!(
            cli.command,
            Command::Datakey(_) | Command::Encrypt(_) | Command::Decrypt(_)
                if cli.operator.is_none()
        );
    match dispatch(cli) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) if e.is::<Answered>() => Ok(ExitCode::from(
            e.downcast_ref::<Answered>().map_or(1, |a| a.0),
        )),
        // The one place a refusal is told from other failures: it exits 1.
        Err(e) => match e.downcast_ref::<ClientError>() {
            Some(ClientError::Refused { code, message }) => {
                if json {
                    println!(
                        "{}",
                        json!({"error": {"code": code.name(), "message": message}})
                    );
                } else {
                    eprintln!("error: {e:#}");
                    if let Some(hint) = hint(*code, data_socket) {
                        eprintln!("hint: {hint}");
                    }
                }
                Ok(ExitCode::from(1))
            }
            // Every command answers --json, failures too.
            _ if json => {
                println!(
                    "{}",
                    json!({"error": {"code": "ERROR", "message": format!("{e:#}")}})
                );
                eprintln!("error: {e:#}");
                Ok(ExitCode::from(2))
            }
            _ => Err(e),
        },
    }
}

/// An answer the command has printed itself that exits non-zero (`tde
/// policy check` refusing: 1; `tde status` sealed: 2), nothing more said.
#[derive(Debug)]
pub(crate) struct Answered(pub(crate) u8);

impl std::fmt::Display for Answered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}", self.0)
    }
}

impl std::error::Error for Answered {}

fn hint(code: ErrorCode, data_socket: bool) -> Option<&'static str> {
    use tde_protocol::ErrorCode::*;
    Some(match code {
        Sealed => "unseal with `tde unseal` (run it once per share)",
        NotAuthenticated | LoginFailed => {
            "set TDE_OPERATOR and TDE_PASSWORD, or pass --operator/--password-file"
        }
        OperatorLocked => "another crypto officer can run `tde operator unlock NAME`",
        PermissionDenied if data_socket => {
            "check the [[clients]] policies in the configuration: \
             `tde policy check --user USER --key KEY` says which applies and why"
        }
        PermissionDenied => {
            "the operator's role does not allow this: `tde operator list` shows the roles"
        }
        ContextMismatch => "pass the same --context entries the data key was generated with",
        KeyDisabled => "enable the version with `tde key enable NAME --version N`",
        KeyPendingDestruction => "cancel with `tde key cancel-destroy NAME --version N`",
        NotInitialized => "run `tde init` first",
        _ => return None,
    })
}

fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let mut cfg = Config::load(cli.config.as_deref()).map_err(anyhow::Error::msg)?;
    if let Some(d) = &cli.data_dir {
        cfg.data_dir = d.clone();
    }
    Ok(cfg)
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    for var in Config::unknown_env() {
        eprintln!("warning: ignoring {var}: not a tde configuration key or CLI variable");
    }
    // Neither needs a configuration (nor a valid one).
    match &cli.command {
        Command::Completions { shell } => {
            let mut cmd = crate::command();
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut cmd, "tde", &mut script);
            // A closed pipe (`| head`) ends it quietly.
            let _ = std::io::Write::write_all(&mut std::io::stdout(), &script);
            return Ok(());
        }
        Command::Man { out } => {
            std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
            clap_mangen::generate_to(crate::command(), out)
                .with_context(|| format!("writing the manual pages into {}", out.display()))?;
            let n = std::fs::read_dir(out)?
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".1"))
                .count();
            emit(&cli, json!({"directory": out, "pages": n}), || {
                format!(
                    "{n} manual pages in {} (man -l {}/tde.1)",
                    out.display(),
                    out.display()
                )
            });
            return Ok(());
        }
        _ => {}
    }
    let cfg = load_config(&cli)?;
    match &cli.command {
        Command::Completions { .. } | Command::Man { .. } => Ok(()),
        Command::Demo => crate::demo::run(),
        Command::Init(a) => init(&cli, &cfg, a),
        Command::Serve(a) => serve(&cli, cfg, a),
        Command::Status { all } => status(&cli, &cfg, *all),
        Command::Unseal { share, share_file } => {
            unseal(&cli, &cfg, share.as_deref(), share_file.as_deref())
        }
        Command::Login { ttl } => login(&cli, &cfg, ttl),
        Command::Resplit(a) => resplit(&cli, &cfg, a),
        Command::Approvals { id } => approvals(&cli, &cfg, *id, false),
        Command::Approve { id } => approvals(&cli, &cfg, Some(*id), true),
        Command::Logout => logout(&cli, &cfg),
        Command::Reload => {
            let summary = admin_login(&cli, &cfg)?.reload()?;
            emit(&cli, json!({"reloaded": true, "changes": summary}), || {
                format!("Configuration reloaded: {summary}.")
            });
            Ok(())
        }
        Command::Seal => {
            let s = admin_login(&cli, &cfg)?.seal()?;
            print_status(&cli, &s);
            Ok(())
        }
        Command::Zeroize { yes } => zeroize(&cli, &cfg, *yes),
        Command::Operator(o) => operator(&cli, &cfg, o),
        Command::Key(k) => key(&cli, &cfg, k),
        Command::Policy(crate::PolicyCmd::Check(a)) => policy_check(&cli, &cfg, a),
        Command::Audit(a) => crate::audit_cmd::run(&cli, &cfg, a),
        Command::Datakey(d) => datakey(&cli, &cfg, d),
        Command::Encrypt(a) => crate::envelope::encrypt(&cli, &cfg, a),
        Command::Decrypt(a) => crate::envelope::decrypt(&cli, &cfg, a),
        Command::Pkcs11(c) => crate::pkcs11_cmd::run(&cli, &cfg, c),
        Command::Mount(m) => mount(&cli, &cfg, m),
        Command::Rekey(r) => rekey(&cli, r),
        Command::Inspect { backing_dir } => {
            check_backing_dir(backing_dir)?;
            let i = tde_plugin::rekey::inspect(backing_dir)?;
            emit(&cli, json!(i), || {
                let mut out = format!(
                    "{} files in the page format ({} others skipped)",
                    i.files, i.foreign_files
                );
                for (v, n) in &i.versions {
                    out.push_str(&format!("\ndata key v{v}: {n} blocks"));
                }
                for (v, n) in &i.headers {
                    match v {
                        0 => out.push_str(&format!("\nformat-1 headers: {n} files")),
                        v => out.push_str(&format!("\nheaders under data key v{v}: {n} files")),
                    }
                }
                out
            });
            Ok(())
        }
        Command::Rewrap {
            backing_dir,
            sidecar,
        } => rewrap(&cli, &cfg, backing_dir, sidecar.as_deref()),
        Command::Umount { mountpoint } => {
            tde_plugin::mount::umount(mountpoint)?;
            emit(&cli, json!({"unmounted": mountpoint}), || {
                format!("Unmounted {}.", mountpoint.display())
            });
            Ok(())
        }
    }
}

// ---------------------------------------------------------------- mount

/// Refuses a directory that is not a backing directory, pointing at the
/// one meant: a mountpoint names its backing directory.
fn check_backing_dir(dir: &Path) -> anyhow::Result<()> {
    let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    if let Some((_, backing)) = tde_plugin::control::mounts()
        .into_iter()
        .find(|(m, _)| *m == canonical || m == dir)
    {
        bail!(
            "{} is the mountpoint of a tde mount (plaintext): inspect its backing directory, \
             `tde inspect {}`",
            dir.display(),
            backing.display()
        );
    }
    if !tde_plugin::keyfile::KeyFile::path(dir).exists() {
        bail!(
            "{} holds no {}: it is not a tde backing directory",
            dir.display(),
            tde_plugin::keyfile::KEY_FILE
        );
    }
    Ok(())
}

/// `50MB/s`, `200M`, `1GiB/s`, `0`, `unlimited` to bytes per second.
pub fn parse_rate(text: &str) -> anyhow::Result<u64> {
    let t = text.trim().trim_end_matches("/s");
    if t == "unlimited" || t == "0" {
        return Ok(0);
    }
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .with_context(|| format!("{text:?} is not a rate like 50MB/s"))?;
    let mult = match unit.trim_end_matches('B') {
        "" => 1.0,
        "K" | "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        _ => bail!("{text:?}: the unit must be K, M, G (or Ki, Mi, Gi), optionally with B and /s"),
    };
    let r = (n * mult) as u64;
    if r < 1_000_000 {
        bail!("{text:?}: a re-key rate below 1 MB/s would take forever; use at least 1MB/s");
    }
    Ok(r)
}

fn rekey_line(s: &tde_plugin::rekey::Status) -> String {
    if s.state == "idle" {
        return "no re-key running on this mount".into();
    }
    let pct = if s.blocks_total > 0 {
        s.blocks_done as f64 * 100.0 / s.blocks_total as f64
    } else {
        0.0
    };
    let mut out = format!(
        "re-key {} to data key v{}: pass {} {:.1}% ({}/{} blocks, {} re-encrypted), {:.0} MB/s",
        s.state,
        s.target_version.map_or("?".into(), |v| v.to_string()),
        s.pass,
        pct,
        s.blocks_done,
        s.blocks_total,
        s.blocks_rewritten,
        s.speed as f64 / 1e6
    );
    if s.rate_limit > 0 {
        out.push_str(&format!(" (limit {:.0} MB/s)", s.rate_limit as f64 / 1e6));
    }
    if let Some(eta) = s.eta_seconds.filter(|_| s.state == "running") {
        out.push_str(&format!(", ETA {eta} s"));
    }
    if let Some(e) = &s.error {
        out.push_str(&format!(": {e}"));
    }
    out
}

fn rekey(cli: &Cli, a: &crate::RekeyArgs) -> anyhow::Result<()> {
    use tde_plugin::control::{Control, call};
    let backing = tde_plugin::control::backing_of(&a.mountpoint)?;
    let rate = a.rate.as_deref().map(parse_rate).transpose()?;
    let current = call(&backing, &Control::Status)?;
    let active = matches!(current.state.as_str(), "running" | "paused" | "finishing");
    let st = if a.status {
        current
    } else if a.pause {
        call(&backing, &Control::Pause)?
    } else if a.resume {
        call(&backing, &Control::Resume)?
    } else if active {
        // Already running: change its throttle if asked, and follow it.
        match rate {
            Some(r) => call(&backing, &Control::SetRate { rate: r })?,
            None => current,
        }
    } else {
        call(
            &backing,
            &Control::Start {
                rate: rate.unwrap_or(0),
            },
        )?
    };
    let follow = !(a.status || a.pause || a.no_wait) && st.state == "running";
    if !follow {
        emit(cli, json!(st), || rekey_line(&st));
        return Ok(());
    }
    // Follow the progress: a bar on a terminal, a line every 10 s otherwise.
    // Ctrl-C only stops watching: the re-key runs in the mount.
    // With --json: one status object per line, every 10 s, then the last.
    let bar = if std::io::stderr().is_terminal() && !cli.json {
        let b = indicatif::ProgressBar::new(st.blocks_total.max(1));
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {pos}/{len} blocks ({percent}%) ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        Some(b)
    } else {
        None
    };
    let mut last_line = std::time::Instant::now();
    let last = loop {
        let s = call(&backing, &Control::Status)?;
        if let Some(b) = &bar {
            b.set_length(s.blocks_total.max(1));
            b.set_position(s.blocks_done);
            b.set_message(format!(
                "pass {} {} {:.0} MB/s",
                s.pass,
                s.state,
                s.speed as f64 / 1e6
            ));
        } else if last_line.elapsed() >= std::time::Duration::from_secs(10) {
            if cli.json {
                println!("{}", json!(s));
            } else {
                eprintln!("{}", rekey_line(&s));
            }
            last_line = std::time::Instant::now();
        }
        if matches!(s.state.as_str(), "done" | "failed" | "idle") {
            break s;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if last.state == "failed" {
        bail!("{}", rekey_line(&last));
    }
    if cli.json {
        println!("{}", json!(last));
        return Ok(());
    }
    println!(
        "Re-key done: every block is under data key v{}; retired v{:?}.",
        last.target_version.unwrap_or(0),
        last.old_versions
    );
    Ok(())
}

fn rewrap(cli: &Cli, cfg: &Config, backing: &Path, sidecar: Option<&Path>) -> anyhow::Result<()> {
    let socket = sidecar
        .map(Path::to_path_buf)
        .or_else(|| cli.data_socket.clone())
        .unwrap_or_else(|| cfg.data_socket_path());
    let _lock = tde_plugin::keyfile::BackingLock::acquire(backing).map_err(|e| {
        anyhow::anyhow!(
            "{e:#}: a mounted tablespace rewraps its key file by itself after a rotation (see `tde key show`)"
        )
    })?;
    let mut c = Client::connect(&socket)?;
    let o = match tde_plugin::keys::Keys::offline(backing, &socket)?.sync_master(&mut c) {
        Ok(o) => o,
        Err(SyncError::Sidecar { during, error }) => {
            return Err(anyhow::Error::new(error).context(during));
        }
        Err(SyncError::KeyFile(e)) => return Err(e),
    };
    emit(
        cli,
        json!({
            "backing_dir": backing,
            "primary_version": o.primary,
            "rewrapped": o.rewrapped.iter().map(|(d, f, t)| json!({"dek_version": d, "from": f, "to": t})).collect::<Vec<_>>(),
        }),
        || {
            if o.rewrapped.is_empty() {
                format!(
                    "{}: every data key is already under master key version {}.",
                    backing.display(),
                    o.primary
                )
            } else {
                o.rewrapped
                    .iter()
                    .map(|(d, f, t)| {
                        format!("data key v{d}: rewrapped from master key v{f} to v{t}")
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            }
        },
    );
    Ok(())
}

fn mount(cli: &Cli, cfg: &Config, a: &MountArgs) -> anyhow::Result<()> {
    if a.daemon {
        // Re-run in the foreground, detached, and wait until it is mounted.
        let args: Vec<std::ffi::OsString> = std::env::args_os()
            .skip(1)
            // The child logs for people; this process answers --json.
            .filter(|x| x != "--daemon" && x != "--json")
            .collect();
        let log_path = match &a.log_file {
            Some(p) => p.clone(),
            None => default_mount_log(&a.tablespace)?,
        };
        if let Some(dir) = log_path.parent().filter(|d| !d.as_os_str().is_empty()) {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(dir)
                .with_context(|| format!("creating the log directory {}", dir.display()))?;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(&log_path)
            .with_context(|| format!("opening the mount log {}", log_path.display()))?;
        // What this start writes, for the error if it fails.
        let start = log.metadata()?.len();
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()?;
        let deadline =
            std::time::Instant::now() + std::time::Duration::from_secs(mount_wait(a) + 30);
        // Until it is mounted, what the mount logs is shown here too (such
        // as waiting for an unseal), then only in the log.
        let mut shown = start as usize;
        let show = |shown: &mut usize| {
            if let Some(new) = std::fs::read(&log_path)
                .ok()
                .and_then(|b| b.get(*shown..).map(<[u8]>::to_vec))
            {
                *shown += new.len();
                if !new.is_empty() {
                    eprint!("{}", String::from_utf8_lossy(&new));
                }
            }
        };
        loop {
            show(&mut shown);
            if tde_plugin::mount::is_mountpoint(&a.mountpoint) {
                emit(
                    cli,
                    json!({"mounted": a.mountpoint, "pid": child.id(), "log": log_path}),
                    || {
                        format!(
                            "Mounted {} on {} (pid {}, log {}).",
                            a.backing_dir.display(),
                            a.mountpoint.display(),
                            child.id(),
                            log_path.display()
                        )
                    },
                );
                return Ok(());
            }
            if let Some(st) = child.try_wait()? {
                show(&mut shown);
                let why = std::fs::read(&log_path).unwrap_or_default();
                let why = String::from_utf8_lossy(why.get(start as usize..).unwrap_or_default());
                let lines = || why.lines().rev().map(str::trim).filter(|l| !l.is_empty());
                let last = lines()
                    .find_map(|l| l.strip_prefix("error: "))
                    .or_else(|| lines().next())
                    .unwrap_or("no message");
                let message = format!(
                    "tde mount failed ({st}; log {}): {last}",
                    log_path.display()
                );
                // The foreground mount's own exit code: 1 for a refusal.
                let code = st.code().and_then(|c| u8::try_from(c).ok()).unwrap_or(2);
                if cli.json {
                    let name = if code == 1 { "REFUSED" } else { "ERROR" };
                    println!("{}", json!({"error": {"code": name, "message": message}}));
                }
                eprintln!("error: {message}");
                return Err(Answered(code).into());
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                bail!("tde mount did not finish mounting in time");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    let _ = init_logging(cfg);
    // The mount holds the tablespace's data keys: no core dump, and no
    // ptrace or /proc/PID/mem by the other processes of its user (the
    // database's, when PostgreSQL's user mounts).
    match tde_sidecar::sys::harden("off") {
        Ok(h) if h.no_core_dumps => {}
        _ => tracing::warn!("core dumps could not be disabled for the mount process"),
    }
    let spec = tde_plugin::mount::MountSpec {
        sidecar: a
            .sidecar
            .clone()
            .or_else(|| cli.data_socket.clone())
            .unwrap_or_else(|| cfg.data_socket_path()),
        key: a.key.clone(),
        tablespace: a.tablespace.clone(),
        cluster: a.cluster.clone(),
        backing: a.backing_dir.clone(),
        mountpoint: a.mountpoint.clone(),
        init: a.init,
        wait: std::time::Duration::from_secs(mount_wait(a)),
        threads: a.threads,
        allow_other: a.allow_other,
        force: a.force,
    };
    let mounted = tde_plugin::mount::mount(&spec)?;
    // SIGTERM and SIGINT ask for an unmount from here on (a signal that
    // came before is acted on below, since the handlers are in place
    // before anything says the mount is up).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut term, mut int) = {
        let _in = rt.enter();
        (
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?,
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?,
        )
    };
    eprintln!(
        "tde mount: {} mounted on {}",
        spec.backing.display(),
        spec.mountpoint.display()
    );
    // A service manager starts what is ordered after this unit (PostgreSQL)
    // only now.
    tde_sidecar::notify::notify(&format!(
        "READY=1\nMAINPID={}\nSTATUS=mounted {} on {}",
        std::process::id(),
        spec.backing.display(),
        spec.mountpoint.display()
    ));
    let mut mounted = mounted;
    let why = rt.block_on(async {
        loop {
            let why = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {
                    if !mounted.finished() {
                        continue;
                    }
                    "unmounted"
                }
            };
            tracing::info!(reason = why, "unmounting");
            if mounted.try_unmount()? {
                tde_sidecar::notify::notify(&format!("STOPPING=1\nSTATUS=unmounted ({why})"));
                return anyhow::Ok(why);
            }
            tde_sidecar::notify::notify("STATUS=busy: still mounted and serving");
            // Leaving now would strand the processes using the mount with a
            // dead file system: keep serving until they are gone.
            tracing::warn!(
                "{} is busy: still mounted and serving; stop the processes using it (PostgreSQL) and signal again",
                spec.mountpoint.display()
            );
        }
    })?;
    eprintln!("tde mount: {} unmounted ({why})", spec.mountpoint.display());
    Ok(())
}

// ---------------------------------------------------------------- helpers

/// `tde mount --wait`: as given; else as long as it takes when a service
/// manager started the mount (systemd sets `INVOCATION_ID`), so that
/// PostgreSQL, ordered after it, waits for the unseal too; else 60 s.
fn mount_wait(a: &crate::MountArgs) -> u64 {
    const FOREVER: u64 = 100 * 365 * 24 * 3600;
    a.wait
        .unwrap_or(if std::env::var_os("INVOCATION_ID").is_some() {
            FOREVER
        } else {
            60
        })
}

/// Where `tde mount --daemon` logs without `--log-file`: beside other
/// daemons' logs as root, in the user's state directory otherwise.
fn default_mount_log(tablespace: &str) -> anyhow::Result<PathBuf> {
    let name: String = tablespace
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let file = format!("mount-{name}.log");
    if rustix::process::geteuid().is_root() {
        return Ok(PathBuf::from("/var/log/tde").join(file));
    }
    let state = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .context("no HOME for the mount log: pass --log-file")?;
    Ok(state.join("tde").join(file))
}

fn admin_path(cli: &Cli, cfg: &Config) -> PathBuf {
    cli.admin_socket
        .clone()
        .unwrap_or_else(|| cfg.admin_socket_path())
}

pub(crate) fn data_path(cli: &Cli, cfg: &Config) -> PathBuf {
    cli.data_socket
        .clone()
        .unwrap_or_else(|| cfg.data_socket_path())
}

fn read_secret_file(path: &Path) -> anyhow::Result<Zeroizing<String>> {
    let s = Zeroizing::new(
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
    );
    Ok(Zeroizing::new(s.trim_end_matches(['\n', '\r']).to_string()))
}

/// The operator password: --password-file, TDE_PASSWORD, the dev password
/// file, or a prompt.
pub(crate) fn password(cli: &Cli, cfg: &Config) -> anyhow::Result<Zeroizing<String>> {
    if let Some(f) = &cli.password_file {
        return read_secret_file(f);
    }
    if let Ok(p) = std::env::var("TDE_PASSWORD") {
        return Ok(Zeroizing::new(p));
    }
    let dev = cfg.dev_password_path();
    if cli.operator() == "admin" && dev.exists() {
        return read_secret_file(&dev);
    }
    if std::io::stdin().is_terminal() {
        return Ok(Zeroizing::new(rpassword::prompt_password(format!(
            "password of operator {:?} (--operator) to log in: ",
            cli.operator()
        ))?));
    }
    bail!("no operator password: set TDE_PASSWORD, pass --password-file, or run on a terminal")
}

/// A new password for `whom` (`operator "bob"`): the file, TDE_NEW_PASSWORD,
/// or a prompt that says whose it is.
fn new_password(file: Option<&Path>, whom: &str) -> anyhow::Result<Zeroizing<String>> {
    if let Some(f) = file {
        return read_secret_file(f);
    }
    if let Ok(p) = std::env::var("TDE_NEW_PASSWORD") {
        return Ok(Zeroizing::new(p));
    }
    if std::io::stdin().is_terminal() {
        let a = Zeroizing::new(rpassword::prompt_password(format!(
            "new password for {whom}: "
        ))?);
        let b = Zeroizing::new(rpassword::prompt_password(format!(
            "repeat the new password for {whom}: "
        ))?);
        if a != b {
            bail!("the passwords differ");
        }
        return Ok(a);
    }
    bail!("no new password: set TDE_NEW_PASSWORD, pass --new-password-file, or run on a terminal")
}

/// A connection logged in as the operator: with the saved session token
/// (`tde login`) when no password was given and the token is this
/// operator's for this socket, else with the password.
pub(crate) fn admin_login(cli: &Cli, cfg: &Config) -> anyhow::Result<Client> {
    let socket = admin_path(cli, cfg);
    let mut c = Client::connect(&socket)?;
    let password_given = cli.password_file.is_some() || std::env::var_os("TDE_PASSWORD").is_some();
    if !password_given
        && let Some(saved) = SavedToken::load()
        && saved.admin_socket == socket
        && cli.operator.as_deref().is_none_or(|o| o == saved.operator)
    {
        if saved.expires_at > now_secs() {
            match c.token_login(SecretBytes::from_slice(saved.token.as_bytes())) {
                Ok(_) => return Ok(c),
                Err(ClientError::Refused { message, .. }) => {
                    eprintln!(
                        "the saved login of {:?} has ended: {message}",
                        saved.operator
                    );
                }
                Err(e) => return Err(e.into()),
            }
        } else {
            eprintln!(
                "the saved login of {:?} has expired: `tde login` again",
                saved.operator
            );
        }
        SavedToken::delete();
        c = Client::connect(&socket)?;
    }
    let pw = password(cli, cfg)?;
    c.login(cli.operator(), SecretBytes::from_slice(pw.as_bytes()))?;
    Ok(c)
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The session token `tde login` saved.
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedToken {
    operator: String,
    admin_socket: PathBuf,
    token: String,
    expires_at: u64,
}

impl Drop for SavedToken {
    fn drop(&mut self) {
        use zeroize::Zeroize as _;
        self.token.zeroize();
    }
}

impl SavedToken {
    /// `$XDG_CONFIG_HOME/tde/token`, else `~/.config/tde/token`.
    fn path() -> Option<PathBuf> {
        std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
            .map(|d| d.join("tde").join("token"))
    }

    fn load() -> Option<SavedToken> {
        let text = Zeroizing::new(std::fs::read_to_string(Self::path()?).ok()?);
        serde_json::from_str(&text).ok()
    }

    fn save(&self) -> anyhow::Result<PathBuf> {
        use std::os::unix::fs::DirBuilderExt;
        let path = Self::path().context("no HOME to keep the session token in")?;
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
        }
        let _ = std::fs::remove_file(&path);
        let text = Zeroizing::new(serde_json::to_string(self)?);
        write_private(&path, text.as_bytes())?;
        Ok(path)
    }

    fn delete() {
        if let Some(p) = Self::path() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// `tde login`: the password once, then a token.
fn login(cli: &Cli, cfg: &Config, ttl: &str) -> anyhow::Result<()> {
    let ttl = parse_period(ttl)?;
    let socket = admin_path(cli, cfg);
    let mut c = Client::connect(&socket)?;
    let pw = password(cli, cfg)?;
    let role = c.login(cli.operator(), SecretBytes::from_slice(pw.as_bytes()))?;
    let (token, ttl) = c.token_create(ttl)?;
    let saved = SavedToken {
        operator: cli.operator().to_string(),
        admin_socket: socket,
        token: String::from_utf8_lossy(token.expose()).into_owned(),
        expires_at: now_secs() + ttl,
    };
    let path = saved.save()?;
    emit(
        cli,
        json!({"operator": saved.operator, "role": role, "ttl_seconds": ttl, "token_file": path}),
        || {
            format!(
                "Logged in as {} ({role}) for {}; the token is in {}. `tde logout` ends it.",
                saved.operator,
                tde_protocol::duration::duration_text(ttl),
                path.display()
            )
        },
    );
    Ok(())
}

/// `tde logout`: revokes and deletes the saved token.
fn logout(cli: &Cli, cfg: &Config) -> anyhow::Result<()> {
    let Some(saved) = SavedToken::load() else {
        emit(cli, json!({"logged_out": false}), || {
            "No saved login.".into()
        });
        return Ok(());
    };
    let revoked = Client::connect(&saved.admin_socket)
        .and_then(|mut c| c.token_revoke(SecretBytes::from_slice(saved.token.as_bytes())));
    SavedToken::delete();
    let _ = cfg;
    revoked?;
    emit(
        cli,
        json!({"logged_out": true, "operator": saved.operator}),
        || format!("Logged out {}: the token is revoked.", saved.operator),
    );
    Ok(())
}

/// Creates `path` with mode 0600 (refusing to overwrite) and writes `bytes`.
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

pub(crate) fn emit(cli: &Cli, value: Value, human: impl FnOnce() -> String) {
    if cli.json {
        println!("{value}");
    } else {
        println!("{}", human());
    }
}

fn fmt_time(secs: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        .to_string()
}

fn key_json(k: &KeyInfo) -> Value {
    json!({
        "name": k.name,
        "description": k.description,
        "created": fmt_time(k.created),
        "primary_version": k.primary_version,
        "tampered": k.tampered,
        "rotate_after_seconds": k.rotate_after,
        "owner": k.owner,
        "shared_with": k.shared_with,
        "versions": k.versions.iter().map(|v| json!({
            "version": v.version,
            "state": v.state,
            "created": fmt_time(v.created),
            "destroy_at": v.destroy_at.map(fmt_time),
            "used_by": k.references.iter().filter(|r| r.key_version == v.version).map(reference_json).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

fn reference_json(r: &tde_protocol::KeyReference) -> Value {
    json!({
        "context": r.context,
        "dek_version": r.dek_version,
        "location": r.location,
        "last_seen": fmt_time(r.last_seen),
    })
}

/// `90d`, `12h`, `30m`, `45s` or plain seconds, to seconds.
/// A rotation period with its unit (`90d`); see [`tde_protocol::parse_duration`].
pub fn parse_period(text: &str) -> anyhow::Result<u64> {
    tde_protocol::parse_duration(text).map_err(anyhow::Error::msg)
}

fn key_human(k: &KeyInfo) -> String {
    if k.tampered {
        return format!(
            "{}  TAMPERED: its store object failed authentication",
            k.name
        );
    }
    let mut s = format!(
        "{}  primary v{}  {}\n",
        k.name, k.primary_version, k.description
    );
    if !k.shared_with.is_empty() {
        s.push_str(&format!("  shared with {}\n", k.shared_with.join(", ")));
    }
    if k.rotate_after > 0 {
        s.push_str(&format!(
            "  rotates automatically every {}\n",
            tde_protocol::duration_text(k.rotate_after)
        ));
    }
    for v in &k.versions {
        let star = if v.version == k.primary_version {
            "*"
        } else {
            " "
        };
        s.push_str(&format!(
            "  {star} v{:<4} {:<20} created {}",
            v.version,
            v.state,
            fmt_time(v.created)
        ));
        if let Some(at) = v.destroy_at {
            s.push_str(&format!("  destroy at {}", fmt_time(at)));
        }
        s.push('\n');
        for r in k.references.iter().filter(|r| r.key_version == v.version) {
            s.push_str(&format!(
                "        used by {} data key v{} at {} (seen {})\n",
                tde_protocol::context_display(&r.context),
                r.dek_version,
                r.location,
                fmt_time(r.last_seen)
            ));
        }
    }
    s.trim_end().to_string()
}

fn status_json(s: &StatusInfo) -> Value {
    json!({
        "initialized": s.initialized,
        "sealed": s.sealed,
        "zeroized": s.zeroized,
        "threshold": s.threshold,
        "shares": s.shares,
        "progress": s.progress,
        "dev_mode": s.dev_mode,
        "key_count": s.key_count,
        "version": s.server_version,
        "store_id": s.store_id,
        "audit_sinks": s.audit_sinks.iter().map(|k| json!({
            "name": k.name,
            "delivered": k.delivered,
            "lag": k.lag,
            "error": k.error,
        })).collect::<Vec<_>>(),
    })
}

fn print_status(cli: &Cli, s: &StatusInfo) {
    emit(cli, status_json(s), || status_human(s));
}

fn status_human(s: &StatusInfo) -> String {
    let state = if s.zeroized {
        "ZEROIZED (root material destroyed)".to_string()
    } else if !s.initialized {
        "not initialized".to_string()
    } else if s.sealed {
        format!("sealed (unseal progress {}/{})", s.progress, s.threshold)
    } else {
        "unsealed".to_string()
    };
    let mut out = format!(
        "state:      {state}\nshares:     {} of {} needed\nkeys:       {}\nversion:    {}",
        s.threshold, s.shares, s.key_count, s.server_version
    );
    if !s.store_id.is_empty() {
        out.push_str(&format!("\nstore:      {}", s.store_id));
    }
    if s.dev_mode {
        out.push_str("\nmode:       DEV (single local share; not for production)");
    }
    for k in &s.audit_sinks {
        out.push_str(&format!(
            "\naudit sink: {} given up to record {}, {} behind{}",
            k.name,
            k.delivered,
            k.lag,
            k.error
                .as_ref()
                .map(|e| format!(", FAILING: {e}"))
                .unwrap_or_default()
        ));
    }
    out
}

// ---------------------------------------------------------------- init / serve

fn init_store(
    cfg: &Config,
    threshold: u8,
    shares: u8,
    dev: bool,
    officer: &str,
    pw: &str,
) -> anyhow::Result<tde_hsm::InitOutput> {
    server::create_private_dir(&cfg.data_dir, "data directory")?;
    let store = SqliteStore::open(&cfg.store_path())?;
    if store.meta()?.is_some() {
        bail!(
            "the key store {} is already initialized",
            cfg.store_path().display()
        );
    }
    Ok(Hsm::init(
        &store,
        threshold,
        shares,
        dev,
        officer,
        pw.as_bytes(),
    )?)
}

fn init_dev(cli: &Cli, cfg: &Config) -> anyhow::Result<()> {
    let mut raw = [0u8; 18];
    tde_hsm::random::fill(&mut raw)?;
    let pw = Zeroizing::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw));
    let out = init_store(cfg, 1, 1, true, cli.operator(), &pw)?;
    write_private(&cfg.dev_share_path(), out.shares[0].expose())?;
    write_private(&cfg.dev_password_path(), pw.as_bytes())?;
    eprintln!(
        "WARNING: DEV MODE. The single unseal share is in {} and the password of operator {:?} in {}.\n\
         Anyone who can read them holds every key. NOT FOR PRODUCTION.",
        cfg.dev_share_path().display(),
        cli.operator(),
        cfg.dev_password_path().display()
    );
    Ok(())
}

fn init(cli: &Cli, cfg: &Config, a: &InitArgs) -> anyhow::Result<()> {
    let path = cfg.store_path();
    if path.exists() && SqliteStore::open(&path)?.meta()?.is_some() {
        bail!(
            "the key store {} is already initialized",
            cfg.store_path().display()
        );
    }
    // Keys and share directory are checked before anything is asked or made.
    let custodians = read_custodian_keys(&a.pgp_keys, a.shares)?;
    if !a.dev {
        share_dir_ready(a.share_dir.as_deref())?;
    }
    confirm_init(cli, cfg, a)?;
    if a.dev {
        init_dev(cli, cfg)?;
        emit(cli, json!({"dev": true, "data_dir": cfg.data_dir}), || {
            format!("Initialized a DEV key store in {}.", cfg.data_dir.display())
        });
        return Ok(());
    }
    let pw = match (&cli.password_file, std::env::var("TDE_PASSWORD")) {
        (Some(f), _) => read_secret_file(f)?,
        (None, Ok(p)) => Zeroizing::new(p),
        (None, Err(_)) if std::io::stdin().is_terminal() => new_password(
            None,
            &format!("the first crypto officer {:?}", cli.operator()),
        )?,
        (None, Err(_)) => bail!(
            "no password for the first crypto officer {:?}: set TDE_PASSWORD, pass \
             --password-file, or run on a terminal",
            cli.operator()
        ),
    };
    let out = init_store(cfg, a.threshold, a.shares, false, cli.operator(), &pw)?;
    // Encrypted here, before anything is shown or written.
    let shares = if custodians.is_empty() {
        HandOut::clear(out.shares.iter().map(|s| s.expose()))
    } else {
        HandOut::encrypted(&custodians, &out.shares)?
    };
    shares.hand_out(
        cli,
        a.share_dir.as_deref(),
        json!({"threshold": out.threshold, "officer": cli.operator(), "store": cfg.store_path()}),
        &format!(
            "Initialized the key store {}.\n\nUnseal shares ({} of {} needed to unseal).",
            cfg.store_path().display(),
            out.threshold,
            out.shares.len()
        ),
        &format!(
            "Crypto officer {:?} created. Start the daemon with `tde serve`, then run `tde unseal` {} times.",
            cli.operator(),
            out.threshold
        ),
    )
}

/// The custodians' OpenPGP public keys from `files`: none, or one per share
/// (share N is encrypted to key N), each checked (`tde init`, `tde resplit`).
fn read_custodian_keys(files: &[PathBuf], shares: u8) -> anyhow::Result<Vec<CustodianKey>> {
    if !files.is_empty() && files.len() != usize::from(shares) {
        bail!(
            "{} --pgp-keys for {shares} shares: give one public key per share",
            files.len()
        );
    }
    files
        .iter()
        .map(|f| {
            let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
            CustodianKey::parse(&bytes)
                .with_context(|| format!("the custodian key {} cannot be used", f.display()))
        })
        .collect()
}

/// `--share-dir`: made (0700) and checked before any share exists, so that
/// a share is never lost to a directory that cannot take it.
fn share_dir_ready(dir: Option<&Path>) -> anyhow::Result<()> {
    let Some(dir) = dir else { return Ok(()) };
    server::create_private_dir(dir, "share directory")?;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let name = entry?.file_name();
        if name.to_string_lossy().starts_with("share-") {
            bail!(
                "{} already holds {}: give an empty directory, so no share is mixed with another set",
                dir.display(),
                name.to_string_lossy()
            );
        }
    }
    Ok(())
}

/// New unseal shares as they are handed out: in clear, or each an OpenPGP
/// message to its custodian's key (`fingerprints`, in share order).
struct HandOut {
    texts: Vec<Zeroizing<String>>,
    fingerprints: Vec<String>,
}

impl HandOut {
    fn clear<'a>(shares: impl Iterator<Item = &'a [u8]>) -> Self {
        HandOut {
            texts: shares
                .map(|s| Zeroizing::new(String::from_utf8_lossy(s).into_owned()))
                .collect(),
            fingerprints: Vec::new(),
        }
    }

    fn encrypted(
        keys: &[CustodianKey],
        shares: &[tde_hsm::secret::SecretBuf],
    ) -> anyhow::Result<Self> {
        let texts = keys
            .iter()
            .zip(shares)
            .map(|(k, s)| k.encrypt(s.expose()).map(Zeroizing::new))
            .collect::<Result<_, _>>()?;
        Ok(HandOut {
            texts,
            fingerprints: keys.iter().map(|k| k.fingerprint().to_string()).collect(),
        })
    }

    /// Shows the shares once (`intro` before them, `outro` after; with
    /// `--json`, `extra` and `shares`, plus `pgp_fingerprints` when
    /// encrypted), and writes each to `dir/share-N` (`share-N.asc` when
    /// encrypted; 0600). A share that cannot be written is still shown.
    fn hand_out(
        &self,
        cli: &Cli,
        dir: Option<&Path>,
        mut extra: Value,
        intro: &str,
        outro: &str,
    ) -> anyhow::Result<()> {
        let encrypted = !self.fingerprints.is_empty();
        let written = dir.map_or(Ok(()), |dir| {
            self.texts.iter().enumerate().try_for_each(|(i, t)| {
                let name = format!("share-{}{}", i + 1, if encrypted { ".asc" } else { "" });
                write_private(&dir.join(name), t.as_bytes())
            })
        });
        extra["shares"] = json!(self.texts.iter().map(|t| t.as_str()).collect::<Vec<_>>());
        if encrypted {
            extra["pgp_fingerprints"] = json!(self.fingerprints);
        }
        emit(cli, extra, || {
            let mut s = format!("{intro} ");
            if encrypted {
                s.push_str(
                    "Each is encrypted to one custodian's OpenPGP key and stored nowhere else:\n\
                     send each to the custodian named by its key, who unseals with\n\
                     `gpg --decrypt share-N.asc | tde unseal`.\n\n",
                );
                for (i, (t, f)) in self.texts.iter().zip(&self.fingerprints).enumerate() {
                    s.push_str(&format!("share {}, for key {f}:\n{}\n", i + 1, t.as_str()));
                }
            } else {
                s.push_str(
                    "They are shown once and stored nowhere:\ngive each to a different custodian.\n\n",
                );
                for (i, t) in self.texts.iter().enumerate() {
                    s.push_str(&format!("  share {}: {}\n", i + 1, t.as_str()));
                }
            }
            if let Some(dir) = dir {
                s.push_str(&format!(
                    "\nAlso written to {}/share-N{}.",
                    dir.display(),
                    if encrypted { ".asc" } else { "" }
                ));
            }
            format!("{s}\n{outro}")
        });
        written.context("the shares above could not all be written to --share-dir: copy them now")
    }
}

fn data_dir_configured(cli: &Cli) -> bool {
    cli.config.is_some() || cli.data_dir.is_some() || std::env::var_os("TDE_DATA_DIR").is_some()
}

/// Before `tde init` writes anything: says where the store goes and, on a
/// terminal, asks; off a terminal, the place must have been chosen (a
/// configuration, --data-dir or TDE_DATA_DIR), never the default alone.
fn confirm_init(cli: &Cli, cfg: &Config, a: &InitArgs) -> anyhow::Result<()> {
    let store = cfg.store_path();
    let configured = data_dir_configured(cli);
    let whence = if configured {
        ""
    } else {
        " (the default: no configuration, --data-dir or TDE_DATA_DIR names one)"
    };
    let terminal = std::io::stdin().is_terminal() && std::io::stderr().is_terminal();
    if !terminal && !configured {
        bail!(
            "tde init would create a key store in {}{whence}: say where with --data-dir DIR, \
             --config FILE or TDE_DATA_DIR",
            cfg.data_dir.display()
        );
    }
    eprintln!(
        "tde init creates a new {}key store {} in the data directory {}{whence}.",
        if a.dev { "DEV " } else { "" },
        store.display(),
        cfg.data_dir.display()
    );
    if terminal && !a.yes {
        eprint!("Continue? [y/N] ");
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            bail!("nothing was created");
        }
    }
    Ok(())
}

/// Sets up logging on stderr as configured; gives what changes the level
/// later (a reload). With `RUST_LOG` set, that wins and the level stays.
fn init_logging(cfg: &Config) -> tde_sidecar::reload::SetLogLevel {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    // fuser warns when it retries an unmount that `tde umount` already did.
    let configured = |level: &str| {
        tracing_subscriber::EnvFilter::try_new(format!("{level},fuser::mnt=error"))
            .map_err(|e| e.to_string())
    };
    let from_env = tracing_subscriber::EnvFilter::try_from_default_env().ok();
    let fixed = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| {
        configured(&cfg.log.level)
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,fuser::mnt=error"))
    });
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(IgnoredInterruptReplies);
    if cfg.log.format == "json" {
        registry.with(fmt.json()).init();
    } else {
        registry.with(fmt).init();
    }
    Box::new(move |level| {
        if fixed {
            return Err("RUST_LOG is set and decides the level".into());
        }
        let f = configured(level)?;
        handle.reload(f).map_err(|e| e.to_string())
    })
}

/// Drops one message of fuser's that is not an error. fuser answers every
/// `FUSE_INTERRUPT` with `ENOSYS` (which tells the kernel to stop sending
/// interrupts); when the interrupted request was already answered, the
/// kernel has no request to match that answer with and the write returns
/// `ENOENT`, which fuser logs as "Failed to send FUSE reply". The kernel's
/// protocol expects exactly this and ignores such a reply
/// (Documentation/filesystems/fuse.rst, "Interrupting filesystem
/// operations"), as libfuse does. Every other reply failure is still logged.
struct IgnoredInterruptReplies;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for IgnoredInterruptReplies {
    fn event_enabled(
        &self,
        event: &tracing::Event<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        #[derive(Default)]
        struct Seen {
            target: bool,
            message: bool,
        }
        impl tracing::field::Visit for Seen {
            fn record_str(&mut self, f: &tracing::field::Field, v: &str) {
                if f.name() == "log.target" {
                    self.target = v == "fuser::reply";
                }
            }
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                if f.name() == "message" {
                    let text = format!("{v:?}");
                    self.message = text.starts_with("Failed to send FUSE reply")
                        && text.ends_with("(os error 2)");
                }
            }
        }
        if *event.metadata().level() > tracing::Level::WARN {
            return true;
        }
        let mut seen = Seen::default();
        event.record(&mut seen);
        !(seen.target && seen.message)
    }
}

fn serve(cli: &Cli, mut cfg: Config, a: &ServeArgs) -> anyhow::Result<()> {
    // What `--dev` does to the configuration, at start and at every reload.
    let dev_dir = (a.dev && !data_dir_configured(cli))
        .then(|| std::env::current_dir().map(|d| d.join("tde-dev")))
        .transpose()?;
    let dev = a.dev;
    let adjust = move |cfg: &mut Config| {
        if let Some(d) = &dev_dir {
            cfg.data_dir = d.clone();
        }
        if dev && cfg.clients.is_empty() {
            cfg.clients.push(ClientPolicy {
                name: "dev".into(),
                uids: vec![rustix::process::getuid().as_raw()],
                gids: vec![],
                users: vec![],
                groups: vec![],
                keys: vec!["*".into()],
                operations: DATA_OPERATIONS.iter().map(|s| s.to_string()).collect(),
                context: BTreeMap::new(),
            });
        }
    };
    adjust(&mut cfg);
    if a.print_config {
        if cli.json {
            println!("{}", cfg.to_redacted_json());
        } else {
            print!("{}", cfg.to_redacted_toml());
        }
        return Ok(());
    }
    if a.dev {
        server::create_private_dir(&cfg.data_dir, "data directory")?;
        let fresh = SqliteStore::open(&cfg.store_path())?.meta()?.is_none();
        if fresh {
            init_dev(cli, &cfg)?;
        }
        eprintln!(
            "DEV MODE: data directory {}\n  export TDE_DATA_DIR={}\n  admin password file: {}",
            cfg.data_dir.display(),
            cfg.data_dir.display(),
            cfg.dev_password_path().display()
        );
    }
    let set_log_level = init_logging(&cfg);
    // Requests run on a bounded pool: a burst queues instead of growing the
    // daemon by a (locked) thread stack per request.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(cfg.limits.worker_threads.max(1))
        .enable_all()
        .build()?;
    let reload = tde_sidecar::reload::Reload {
        file: cli.config.clone(),
        adjust: Box::new(adjust),
        set_log_level,
    };
    rt.block_on(server::run(cfg, reload))
}

// ---------------------------------------------------------------- admin

/// `tde status`: the sidecar's state and this store's mounts (`--all`:
/// every `tde mount` on the host). Exits as `vault status` does: 0
/// unsealed, 2 sealed (or not initialized, or zeroized), 1 when the
/// sidecar cannot be reached.
fn status(cli: &Cli, cfg: &Config, all: bool) -> anyhow::Result<()> {
    // The sidecar's state, and the mounts' (listed even when the sidecar
    // is down: mounts keep serving then, and say so).
    let sidecar = Client::connect(&admin_path(cli, cfg))
        .or_else(|_| Client::connect(&data_path(cli, cfg)))
        .and_then(|mut c| c.status());
    let ours = data_path(cli, cfg);
    let same = |p: &Path| {
        p == ours
            || matches!(
                (std::fs::canonicalize(p), std::fs::canonicalize(&ours)),
                (Ok(a), Ok(b)) if a == b
            )
    };
    let (mounts, others): (Vec<_>, Vec<_>) = tde_plugin::control::mounts()
        .into_iter()
        .map(|(m, b)| {
            let r = tde_plugin::control::call(&b, &tde_plugin::control::Control::Status);
            (m, b, r)
        })
        .partition(|(_, _, r)| {
            all || r
                .as_ref()
                .ok()
                .and_then(|st| st.sidecar.as_deref())
                .is_some_and(same)
        });
    let mut v = match &sidecar {
        Ok(s) => status_json(s),
        Err(e) => json!({"sidecar_error": format!("{e:#}")}),
    };
    v["mounts"] = json!(
        mounts
            .iter()
            .map(|(m, b, r)| json!({
                "mountpoint": m,
                "backing_dir": b,
                "sidecar": r.as_ref().ok().and_then(|st| st.sidecar.as_ref()),
                "rekey": r.as_ref().ok(),
                "io": r.as_ref().ok().and_then(|st| st.io),
                "error": r.as_ref().err().map(|e| format!("{e:#}")),
            }))
            .collect::<Vec<_>>()
    );
    v["other_mounts"] = json!(others.len());
    emit(cli, v, || {
        let mut out = match &sidecar {
            Ok(s) => status_human(s),
            Err(e) => format!("sidecar:    unreachable: {e:#}"),
        };
        for (m, b, r) in &mounts {
            out.push_str(&format!(
                "\nmount:      {} (backing {}): {}",
                m.display(),
                b.display(),
                match r {
                    Ok(st) if st.state == "idle" => "no re-key running".to_string(),
                    Ok(st) => rekey_line(st),
                    Err(e) => format!("{e:#}"),
                }
            ));
            if let Some(io) = r.as_ref().ok().and_then(|st| st.io) {
                out.push_str(&format!(
                    "\n            read {}, written {}, {} read and {} write errors, {} blocks refused (authentication)",
                    indicatif::BinaryBytes(io.read_bytes),
                    indicatif::BinaryBytes(io.written_bytes),
                    io.read_errors,
                    io.write_errors,
                    io.auth_failures
                ));
            }
        }
        if !others.is_empty() {
            out.push_str(&format!(
                "\n({} other tde mounts on this host use another sidecar or cannot be asked: `tde status --all`)",
                others.len()
            ));
        }
        out
    });
    match &sidecar {
        Ok(s) if s.initialized && !s.sealed && !s.zeroized => Ok(()),
        Ok(_) => Err(Answered(2).into()),
        Err(_) => Err(Answered(1).into()),
    }
}

fn unseal(cli: &Cli, cfg: &Config, share: Option<&str>, file: Option<&Path>) -> anyhow::Result<()> {
    let text = read_share(share, file, "unseal share")?;
    let s = Client::connect(&admin_path(cli, cfg))?
        .unseal(SecretBytes::from_slice(text.trim().as_bytes()))?;
    print_status(cli, &s);
    Ok(())
}

/// A share from the argument (with a warning), a file (`-`: standard
/// input), a hidden prompt on a terminal, or piped standard input.
fn read_share(
    share: Option<&str>,
    file: Option<&Path>,
    what: &str,
) -> anyhow::Result<Zeroizing<String>> {
    let from_stdin = || -> anyhow::Result<Zeroizing<String>> {
        let mut line = Zeroizing::new(String::new());
        std::io::stdin()
            .read_line(&mut line)
            .context("reading the share from standard input")?;
        Ok(line)
    };
    let text = match (share, file) {
        (Some(s), _) => {
            eprintln!(
                "warning: a share given as an argument is visible to every local user (/proc/PID/cmdline) and stays in the shell's history; prefer the prompt, --share-file FILE or standard input"
            );
            Zeroizing::new(s.to_string())
        }
        (None, Some(f)) if f == Path::new("-") => from_stdin()?,
        (None, Some(f)) => read_secret_file(f)?,
        (None, None) if std::io::stdin().is_terminal() => {
            Zeroizing::new(rpassword::prompt_password(format!("{what} (not shown): "))?)
        }
        // Piped in, as `vault operator unseal -` reads it.
        (None, None) => from_stdin()?,
    };
    if text.trim().is_empty() {
        bail!("no share given: nothing was sent to the sidecar");
    }
    if text.trim_start().starts_with("-----BEGIN PGP MESSAGE-----") {
        bail!(
            "this share is encrypted to a custodian's OpenPGP key: decrypt it first, \
             `gpg --decrypt share-N.asc | tde unseal` (nothing was sent to the sidecar)"
        );
    }
    Ok(text)
}

/// `tde resplit`: Vault's `operator rekey` for the unseal shares.
fn resplit(cli: &Cli, cfg: &Config, a: &crate::ResplitArgs) -> anyhow::Result<()> {
    let show = |r: &tde_protocol::ResplitInfo| {
        emit(
            cli,
            json!({"nonce": r.nonce, "progress": r.progress, "needed": r.needed,
                   "new_threshold": r.threshold, "new_shares": r.shares,
                   "pgp_fingerprints": r.fingerprints}),
            || {
                if r.nonce.is_empty() {
                    return "No re-split in progress.".to_string();
                }
                let mut s = format!(
                    "Re-split {}: {} of {} current shares given; it makes {} new shares, {} to unseal.\n",
                    r.nonce, r.progress, r.needed, r.shares, r.threshold
                );
                if !r.fingerprints.is_empty() {
                    s.push_str(&format!(
                        "Each new share will be encrypted to one custodian key: {}.\n",
                        r.fingerprints.join(", ")
                    ));
                }
                s.push_str(&format!(
                    "Each custodian runs: tde resplit --nonce {} (the share is read from a prompt, --share-file or standard input)",
                    r.nonce
                ));
                s
            },
        )
    };
    if a.init {
        let (Some(n), Some(t)) = (a.shares, a.threshold) else {
            bail!("--init needs --shares N and --threshold T");
        };
        let keys = read_custodian_keys(&a.pgp_keys, n)?
            .iter()
            .map(CustodianKey::to_bytes)
            .collect::<Result<_, _>>()?;
        let r = admin_login(cli, cfg)?.resplit_init(t.into(), n.into(), keys)?;
        show(&r);
        return Ok(());
    }
    if a.cancel {
        admin_login(cli, cfg)?.resplit_cancel()?;
        emit(cli, json!({"cancelled": true}), || {
            "Re-split cancelled.".into()
        });
        return Ok(());
    }
    let Some(nonce) = &a.nonce else {
        let r = Client::connect(&admin_path(cli, cfg))?.resplit_status()?;
        show(&r);
        return Ok(());
    };
    // What the share approves, before it is asked for: the officer who
    // started the attempt chose where the new shares go.
    let st = Client::connect(&admin_path(cli, cfg))?.resplit_status()?;
    if st.nonce == *nonce {
        eprintln!(
            "Re-split {nonce} makes {} new shares, {} to unseal; {}.",
            st.shares,
            st.threshold,
            if st.fingerprints.is_empty() {
                "they are shown in clear to whoever gives the last current share".to_string()
            } else {
                format!(
                    "each is encrypted to one of these OpenPGP keys, check them: {}",
                    st.fingerprints.join(", ")
                )
            }
        );
    }
    let text = read_share(
        a.share.as_deref(),
        a.share_file.as_deref(),
        "current unseal share",
    )?;
    share_dir_ready(a.share_dir.as_deref())?;
    // A new connection: the prompt may outlast the daemon's idle timeout.
    let r = Client::connect(&admin_path(cli, cfg))?
        .resplit_update(nonce, SecretBytes::from_slice(text.trim().as_bytes()))?;
    let shares = if !r.encrypted_shares.is_empty() {
        HandOut {
            texts: r
                .encrypted_shares
                .iter()
                .map(|t| Zeroizing::new(t.clone()))
                .collect(),
            fingerprints: r.fingerprints.clone(),
        }
    } else if !r.new_shares.is_empty() {
        HandOut::clear(r.new_shares.iter().map(|s| s.expose()))
    } else {
        show(&r);
        return Ok(());
    };
    shares.hand_out(
        cli,
        a.share_dir.as_deref(),
        json!({"threshold": r.threshold}),
        &format!(
            "Re-split done: the root is sealed under {} new shares, {} of them unseal. The old shares no longer unseal.",
            shares.texts.len(),
            r.threshold
        ),
        "",
    )
}

fn zeroize(cli: &Cli, cfg: &Config, yes: bool) -> anyhow::Result<()> {
    if !yes {
        if !std::io::stdin().is_terminal() {
            bail!("zeroize destroys every key for ever: pass --yes to confirm");
        }
        eprint!(
            "This destroys the root material: no share will ever unseal this store again.\nType ZEROIZE to continue: "
        );
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        if line.trim() != "ZEROIZE" {
            bail!("not confirmed; nothing changed");
        }
    }
    let mut c = Client::connect(&admin_path(cli, cfg))?;
    if !c.status()?.sealed {
        c = admin_login(cli, cfg)?;
    }
    if send_guarded(cli, &mut c, &Request::Zeroize)?.is_none() {
        return Ok(());
    }
    emit(cli, json!({"zeroized": true}), || {
        "Zeroized: the root material is destroyed.".into()
    });
    Ok(())
}

/// Sends a request that dual control may hold back: its answer, or `None`
/// when it now waits for approvals (said, with what to run).
fn send_guarded(cli: &Cli, c: &mut Client, req: &Request) -> anyhow::Result<Option<Response>> {
    match c.call(req)? {
        Response::Approvals(a) if a.len() == 1 => {
            let a = &a[0];
            emit(cli, approval_json(a), || {
                format!(
                    "Request #{} ({}) waits for {} approvals by other crypto officers until {}: \
                     each runs `tde approve {}`; `tde approvals {}` shows it.",
                    a.id,
                    a.what,
                    a.needed,
                    fmt_time(a.expires),
                    a.id,
                    a.id
                )
            });
            Ok(None)
        }
        r => Ok(Some(r)),
    }
}

fn approval_json(a: &tde_protocol::ApprovalInfo) -> Value {
    json!({"id": a.id, "what": a.what, "requester": a.requester, "approved_by": a.approved_by,
           "needed": a.needed, "state": a.state, "expires": a.expires, "message": a.message})
}

fn approval_human(a: &tde_protocol::ApprovalInfo) -> String {
    let mut s = format!(
        "#{} {} by {}: {} ({} of {} approvals{}), until {}",
        a.id,
        a.what,
        a.requester,
        a.state,
        a.approved_by.len(),
        a.needed,
        if a.approved_by.is_empty() {
            String::new()
        } else {
            format!(": {}", a.approved_by.join(", "))
        },
        fmt_time(a.expires)
    );
    if let Some(m) = &a.message {
        s.push_str(&format!("; {m}"));
    }
    s
}

/// `tde approvals [ID]` and `tde approve ID`.
fn approvals(cli: &Cli, cfg: &Config, id: Option<u64>, approve: bool) -> anyhow::Result<()> {
    let mut c = admin_login(cli, cfg)?;
    match (id, approve) {
        (Some(id), true) => {
            let a = c.approve(id)?;
            emit(cli, approval_json(&a), || approval_human(&a));
            if a.state == "failed" {
                return Err(Answered(1).into());
            }
        }
        (Some(id), false) => {
            let a = c.approval(id)?;
            emit(cli, approval_json(&a), || approval_human(&a));
        }
        (None, _) => {
            let list = c.approvals()?;
            emit(
                cli,
                json!(list.iter().map(approval_json).collect::<Vec<_>>()),
                || {
                    if list.is_empty() {
                        "No requests wait for approvals.".into()
                    } else {
                        list.iter()
                            .map(approval_human)
                            .collect::<Vec<_>>()
                            .join("\n")
                    }
                },
            );
        }
    }
    Ok(())
}

fn operator(cli: &Cli, cfg: &Config, o: &OperatorCmd) -> anyhow::Result<()> {
    let done = match o {
        OperatorCmd::Add {
            name,
            role,
            new_password_file,
        } => {
            let pw = new_password(new_password_file.as_deref(), &format!("operator {name:?}"))?;
            admin_login(cli, cfg)?.operator_add(
                name,
                role,
                SecretBytes::from_slice(pw.as_bytes()),
            )?;
            format!("Operator {name} added.")
        }
        OperatorCmd::Passwd {
            name,
            new_password_file,
        } => {
            let pw = new_password(new_password_file.as_deref(), &format!("operator {name:?}"))?;
            admin_login(cli, cfg)?.operator_passwd(name, SecretBytes::from_slice(pw.as_bytes()))?;
            format!("Password of {name} changed.")
        }
        OperatorCmd::Unlock { name } => {
            admin_login(cli, cfg)?.operator_unlock(name)?;
            format!("Operator {name} unlocked.")
        }
        OperatorCmd::Remove { name } => {
            let req = Request::OperatorRemove {
                operator: name.clone(),
            };
            if send_guarded(cli, &mut admin_login(cli, cfg)?, &req)?.is_none() {
                return Ok(());
            }
            format!("Operator {name} removed; its logins have ended.")
        }
        OperatorCmd::List => {
            let ops = admin_login(cli, cfg)?.operator_list()?;
            emit(
                cli,
                json!(ops.iter().map(|o| json!({"name": o.name, "role": o.role, "locked": o.locked, "failed_logins": o.failed_logins})).collect::<Vec<_>>()),
                || {
                    ops.iter()
                        .map(|o| format!("{:<24} {:<16} {}", o.name, o.role, if o.locked { "LOCKED" } else { "" }))
                        .collect::<Vec<_>>()
                        .join("\n")
                },
            );
            return Ok(());
        }
    };
    emit(cli, json!({"ok": true}), || done);
    Ok(())
}

fn key(cli: &Cli, cfg: &Config, k: &KeyCmd) -> anyhow::Result<()> {
    let req = match k {
        KeyCmd::Create {
            name,
            description,
            rotate_after,
        } => {
            // One request: a period the sidecar refuses creates no key.
            let period = rotate_after.as_deref().map(parse_period).transpose()?;
            let info = admin_login(cli, cfg)?.key_create(name, description, period.unwrap_or(0))?;
            emit(cli, key_json(&info), || key_human(&info));
            return Ok(());
        }
        KeyCmd::SetRotation { name, period } => Request::KeySetRotation {
            key: name.clone(),
            rotate_after: if period == "off" {
                0
            } else {
                parse_period(period)?
            },
        },
        KeyCmd::Share { name, user } => Request::KeyShare {
            key: name.clone(),
            operator: user.clone(),
        },
        KeyCmd::Unshare { name, user } => Request::KeyUnshare {
            key: name.clone(),
            operator: user.clone(),
        },
        KeyCmd::List => {
            let keys = admin_login(cli, cfg)?.key_list()?;
            emit(
                cli,
                json!(keys.iter().map(key_json).collect::<Vec<_>>()),
                || {
                    if keys.is_empty() {
                        "no master keys".into()
                    } else {
                        keys.iter().map(key_human).collect::<Vec<_>>().join("\n")
                    }
                },
            );
            return Ok(());
        }
        KeyCmd::Show { name } => Request::KeyDescribe { key: name.clone() },
        KeyCmd::Rotate { name } => Request::KeyRotate { key: name.clone() },
        KeyCmd::Disable(v) => Request::KeyDisable {
            key: v.name.clone(),
            version: v.version,
        },
        KeyCmd::Enable(v) => Request::KeyEnable {
            key: v.name.clone(),
            version: v.version,
        },
        KeyCmd::ScheduleDestroy {
            target,
            days,
            force,
        } => Request::KeyScheduleDestroy {
            key: target.name.clone(),
            version: target.version,
            days: *days,
            force: *force,
        },
        KeyCmd::CancelDestroy(v) => Request::KeyCancelDestroy {
            key: v.name.clone(),
            version: v.version,
        },
        KeyCmd::Destroy { target, yes, force } => {
            if !yes {
                bail!(
                    "destroying {} {} is irreversible: data wrapped under it is lost. Pass --yes to confirm.",
                    target.name,
                    target
                        .version
                        .map_or("(every version)".to_string(), |v| format!("version {v}"))
                );
            }
            Request::KeyDestroy {
                key: target.name.clone(),
                version: target.version,
                force: *force,
            }
        }
    };
    let info = match send_guarded(cli, &mut admin_login(cli, cfg)?, &req)? {
        None => return Ok(()),
        Some(Response::Key(info)) => info,
        Some(_) => bail!(
            "the sidecar answered {} with something else",
            req.op().name()
        ),
    };
    emit(cli, key_json(&info), || key_human(&info));
    Ok(())
}

// ---------------------------------------------------------------- policies

/// `tde policy check`: the daemon's own decision, from the configuration.
fn policy_check(cli: &Cli, cfg: &Config, a: &crate::PolicyCheckArgs) -> anyhow::Result<()> {
    use tde_sidecar::policy::{self, Policies};
    let policies = Policies::resolve(&cfg.clients).map_err(anyhow::Error::msg)?;
    let uid = policy::user_id(&a.user).map_err(anyhow::Error::msg)?;
    let gid = match &a.group {
        Some(g) => policy::group(g).map_err(anyhow::Error::msg)?.0,
        None => nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .map(|u| u.gid.as_raw())
            .with_context(|| format!("uid {uid} has no user entry: give its --group"))?,
    };
    let context = parse_context(&a.ctx.context)?;
    let ops: Vec<&str> = match &a.operation {
        Some(op) => vec![op.as_str()],
        None => vec!["generate_data_key", "decrypt", "re_encrypt"],
    };
    if let Some(op) = ops.iter().find(|o| !DATA_OPERATIONS.contains(o)) {
        bail!(
            "unknown operation {op:?} (use {})",
            DATA_OPERATIONS.join(", ")
        );
    }
    let found = policies.find(uid, gid);
    let results: Vec<(&str, Result<(), String>)> = ops
        .iter()
        .map(|op| {
            let r = match &found {
                None => Err(format!("peer uid {uid} gid {gid} matches no client policy")),
                Some(m) => m.policy.allows(op, Some(&a.key), &context),
            };
            (*op, r)
        })
        .collect();
    let allowed = results.iter().all(|(_, r)| r.is_ok());
    let v = json!({
        "uid": uid,
        "gid": gid,
        "key": a.key,
        "context": context,
        "client": found.as_ref().map(|m| &m.policy.name),
        "because": found.as_ref().map(|m| &m.because),
        "allowed": allowed,
        "operations": results.iter().map(|(op, r)| json!({
            "operation": op,
            "allowed": r.is_ok(),
            "reason": r.as_ref().err(),
        })).collect::<Vec<_>>(),
    });
    emit(cli, v, || {
        let mut out = match &found {
            Some(m) => format!(
                "client policy {:?} covers uid {uid} gid {gid}: {}",
                m.policy.name, m.because
            ),
            None => format!(
                "no client policy covers uid {uid} gid {gid} ({} policies in the configuration)",
                cfg.clients.len()
            ),
        };
        for (op, r) in &results {
            match r {
                Ok(()) => out.push_str(&format!("\n  {op} on {:?}: allowed", a.key)),
                Err(why) => out.push_str(&format!("\n  {op} on {:?}: refused: {why}", a.key)),
            }
        }
        out
    });
    if allowed {
        Ok(())
    } else {
        Err(Answered(1).into())
    }
}

// ---------------------------------------------------------------- data keys

pub(crate) fn parse_context(entries: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut ctx = BTreeMap::new();
    for e in entries {
        let (k, v) = e
            .split_once('=')
            .with_context(|| format!("context entry {e:?} is not KEY=VALUE"))?;
        if ctx.insert(k.to_string(), v.to_string()).is_some() {
            bail!("context key {k:?} given twice");
        }
    }
    Ok(ctx)
}

fn read_ciphertext(a: &crate::CiphertextArgs) -> anyhow::Result<Vec<u8>> {
    match (&a.ciphertext, &a.ciphertext_file) {
        (Some(b), _) => B64
            .decode(b.trim())
            .context("--ciphertext is not valid base64"),
        (None, Some(f)) => std::fs::read(f).with_context(|| format!("reading {}", f.display())),
        (None, None) => bail!("give --ciphertext BASE64 or --ciphertext-file FILE"),
    }
}

/// Writes a plaintext data key to `file` (0600, raw) and returns `None`, or
/// returns it as base64 for printing.
/// An output file made (0600, new) before the request, so that a file in
/// the way fails the command before any key is made; removed again unless
/// written.
struct OutFile {
    path: PathBuf,
    file: Option<std::fs::File>,
}

impl OutFile {
    fn create(path: Option<&PathBuf>) -> anyhow::Result<Option<OutFile>> {
        path.map(|p| {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(p)
                .with_context(|| format!("creating {}", p.display()))?;
            Ok(OutFile {
                path: p.clone(),
                file: Some(file),
            })
        })
        .transpose()
    }

    fn write(mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let mut f = self.file.take().context("written twice")?;
        let done = f.write_all(bytes).and_then(|()| f.sync_all());
        if done.is_err() {
            let _ = std::fs::remove_file(&self.path);
        }
        done.with_context(|| format!("writing {}", self.path.display()))
    }
}

impl Drop for OutFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The plaintext into its file, or base64 for the output.
fn plaintext_out(
    file: Option<OutFile>,
    plaintext: &SecretBytes,
) -> anyhow::Result<Option<Zeroizing<String>>> {
    match file {
        Some(f) => {
            f.write(plaintext.expose())?;
            Ok(None)
        }
        None => Ok(Some(Zeroizing::new(B64.encode(plaintext.expose())))),
    }
}

/// A client for data-key requests: as a crypto user over the admin
/// socket (`--operator`), or as this process's uid under the data
/// socket's client policies.
pub(crate) fn key_client(cli: &Cli, cfg: &Config) -> anyhow::Result<Client> {
    Ok(match cli.operator {
        Some(_) => admin_login(cli, cfg)?,
        None => Client::connect(&data_path(cli, cfg))?,
    })
}

fn datakey(cli: &Cli, cfg: &Config, d: &DatakeyCmd) -> anyhow::Result<()> {
    let mut c = key_client(cli, cfg)?;
    match d {
        DatakeyCmd::Generate {
            key,
            ctx,
            plaintext_file,
            ciphertext_file,
        } => {
            let context = parse_context(&ctx.context)?;
            let (pt_file, ct_file) = (
                OutFile::create(plaintext_file.as_ref())?,
                OutFile::create(ciphertext_file.as_ref())?,
            );
            let tde_protocol::client::DataKey {
                key,
                version,
                plaintext,
                ciphertext,
            } = c.generate_data_key(key, &context)?;
            if let Some(f) = ct_file {
                f.write(&ciphertext)?;
            }
            let pt = plaintext_out(pt_file, &plaintext)?;
            let ct = B64.encode(&ciphertext);
            emit(
                cli,
                json!({"key": key, "key_version": version, "ciphertext": ct, "plaintext": pt.as_deref()}),
                || {
                    let mut s = format!("key: {key} version {version}\nciphertext: {ct}");
                    if let Some(p) = &pt {
                        s.push_str(&format!("\nplaintext: {}", p.as_str()));
                    }
                    s
                },
            );
        }
        DatakeyCmd::Decrypt {
            input,
            ctx,
            plaintext_file,
        } => {
            let (blob, context) = (read_ciphertext(input)?, parse_context(&ctx.context)?);
            let pt_file = OutFile::create(plaintext_file.as_ref())?;
            let tde_protocol::client::Decrypted {
                key,
                version,
                plaintext,
            } = c.decrypt(&blob, &context)?;
            let pt = plaintext_out(pt_file, &plaintext)?;
            emit(
                cli,
                json!({"key": key, "key_version": version, "plaintext": pt.as_deref()}),
                || {
                    let mut s = format!("key: {key} version {version}");
                    if let Some(p) = &pt {
                        s.push_str(&format!("\nplaintext: {}", p.as_str()));
                    }
                    s
                },
            );
        }
        DatakeyCmd::ReEncrypt {
            input,
            ctx,
            ciphertext_out,
        } => {
            let (blob, context) = (read_ciphertext(input)?, parse_context(&ctx.context)?);
            let ct_file = OutFile::create(ciphertext_out.as_ref())?;
            let tde_protocol::client::ReEncrypted {
                key,
                version,
                source_version,
                ciphertext,
            } = c.re_encrypt(&blob, &context)?;
            if let Some(f) = ct_file {
                f.write(&ciphertext)?;
            }
            let ct = B64.encode(&ciphertext);
            emit(
                cli,
                json!({"key": key, "key_version": version, "source_key_version": source_version, "ciphertext": ct}),
                || format!("key: {key} version {source_version} -> {version}\nciphertext: {ct}"),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{parse_period, parse_rate};

    #[test]
    fn rates() {
        assert_eq!(parse_rate("50MB/s").expect("r"), 50_000_000);
        assert_eq!(parse_rate("200M").expect("r"), 200_000_000);
        assert_eq!(parse_rate("1GiB/s").expect("r"), 1 << 30);
        assert_eq!(parse_rate("1.5G").expect("r"), 1_500_000_000);
        assert_eq!(parse_rate("unlimited").expect("r"), 0);
        assert_eq!(parse_rate("0").expect("r"), 0);
        for bad in ["fast", "50XB/s", "10K", "", "MB/s"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn periods() {
        assert_eq!(parse_period("90d").expect("p"), 90 * 86400);
        assert!(parse_period("90").is_err(), "a bare number is refused");
    }
}
