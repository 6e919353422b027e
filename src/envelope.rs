//! `tde encrypt` and `tde decrypt`: the command line around
//! `tde-envelope` (which holds the format and the streaming): a data key
//! from the sidecar, the input, the output that appears only once whole,
//! the progress bar.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use rustix::fs::{AtFlags, CWD, Mode, OFlags, fsync, linkat, openat, renameat, unlinkat};
use rustix::io::Errno;
use tde_envelope::{CHUNK, Header, decrypt_stream, encrypt_stream, new_header};
use tde_sidecar::Config;

use crate::progress::{Line, Progress};
use crate::{Cli, DecryptArgs, EncryptArgs};

/// Where the output goes: standard output, or a file that appears only
/// once complete and flushed to disk. Until then it is an unnamed file
/// (`O_TMPFILE`) in the destination's directory: a failure, Ctrl-C or a
/// crash leaves no file behind, plaintext or partial.
enum Sink {
    Stdout(io::BufWriter<io::Stdout>),
    File {
        file: io::BufWriter<std::fs::File>,
        dir: std::fs::File,
        dest: PathBuf,
        force: bool,
    },
}

impl Sink {
    fn open(dest: &Path, force: bool) -> anyhow::Result<Sink> {
        if dest == Path::new("-") {
            return Ok(Sink::Stdout(io::BufWriter::with_capacity(
                CHUNK,
                io::stdout(),
            )));
        }
        if !force && dest.symlink_metadata().is_ok() {
            bail!("{} exists: --force replaces it", dest.display());
        }
        let dir_path = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let dir = std::fs::File::open(dir_path)
            .with_context(|| format!("opening the output directory {}", dir_path.display()))?;
        let fd = openat(
            &dir,
            ".",
            OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| match e {
            Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL => anyhow::anyhow!(
                "the file system of {} cannot make unnamed temporary files (O_TMPFILE), which keep a partial output from ever having a name: write to another directory, or to standard output with -o -",
                dir_path.display()
            ),
            e => anyhow::anyhow!("creating the output in {}: {e}", dir_path.display()),
        })?;
        Ok(Sink::File {
            file: io::BufWriter::with_capacity(CHUNK, std::fs::File::from(fd)),
            dir,
            dest: dest.to_path_buf(),
            force,
        })
    }

    fn writer(&mut self) -> &mut dyn Write {
        match self {
            Sink::Stdout(w) => w,
            Sink::File { file, .. } => file,
        }
    }

    /// Flushes it to disk and gives it its name.
    fn finish(self) -> anyhow::Result<()> {
        let Sink::File {
            file,
            dir,
            dest,
            force,
        } = self
        else {
            return Ok(());
        };
        let file = file.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()
            .with_context(|| format!("writing {}", dest.display()))?;
        let name = dest.file_name().context("the output has no file name")?;
        let proc = format!("/proc/self/fd/{}", file.as_raw_fd());
        let link = |to: &std::ffi::OsStr| {
            linkat(CWD, proc.as_str(), &dir, to, AtFlags::SYMLINK_FOLLOW)
                .with_context(|| format!("naming the output {}", dest.display()))
        };
        if force {
            // A complete file under a hidden name, then renamed over.
            let mut tmp = std::ffi::OsString::from(".");
            tmp.push(name);
            tmp.push(format!(".tde-{}", std::process::id()));
            let _ = unlinkat(&dir, tmp.as_os_str(), AtFlags::empty());
            link(&tmp)?;
            if let Err(e) = renameat(&dir, tmp.as_os_str(), &dir, name) {
                let _ = unlinkat(&dir, tmp.as_os_str(), AtFlags::empty());
                bail!("naming the output {}: {e}", dest.display());
            }
        } else {
            link(name).map_err(|e| match e.root_cause().downcast_ref::<Errno>() {
                Some(&Errno::EXIST) => {
                    anyhow::anyhow!("{} appeared meanwhile: --force replaces it", dest.display())
                }
                _ => e,
            })?;
        }
        fsync(&dir).with_context(|| format!("writing {}", dest.display()))?;
        Ok(())
    }
}

fn input(path: &Path) -> anyhow::Result<(Box<dyn Read>, Option<u64>)> {
    if path == Path::new("-") {
        return Ok((Box::new(io::stdin().lock()), None));
    }
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = f.metadata().ok().filter(|m| m.is_file()).map(|m| m.len());
    Ok((Box::new(f), len))
}

fn bytes_progress(cli: &Cli, total: Option<u64>, verb: &'static str) -> Progress {
    let template = match total {
        Some(_) => format!(
            "{verb} [{{bar:40}}] {{binary_bytes}}/{{binary_total_bytes}} {{binary_bytes_per_sec}} ETA {{eta}}"
        ),
        None => format!("{verb} {{binary_bytes}} {{binary_bytes_per_sec}}"),
    };
    let line: Line = match verb {
        "encrypting" => |done, _| format!("encrypted {}", indicatif::BinaryBytes(done)),
        _ => |done, _| format!("decrypted {}", indicatif::BinaryBytes(done)),
    };
    Progress::new(cli, total, &template, line)
}

/// `tde encrypt`.
pub fn encrypt(cli: &Cli, cfg: &Config, a: &EncryptArgs) -> anyhow::Result<()> {
    let context = crate::cmd::parse_context(&a.ctx.context)?;
    let dest = match (&a.output, a.input == Path::new("-")) {
        (Some(o), _) => o.clone(),
        (None, true) => PathBuf::from("-"),
        (None, false) => {
            let mut o = a.input.clone().into_os_string();
            o.push(".tde");
            PathBuf::from(o)
        }
    };
    let (mut src, total) = input(&a.input)?;
    let mut sink = Sink::open(&dest, a.force)?;
    let dk = crate::cmd::key_client(cli, cfg)?.generate_data_key(&a.key, &context)?;
    let header = new_header(&dk.key, dk.version, &context, &dk.ciphertext)?;
    let mut progress = bytes_progress(cli, total, "encrypting");
    let n = encrypt_stream(
        &header,
        dk.plaintext.expose(),
        &mut src,
        sink.writer(),
        &mut |d| progress.at(d),
    )?;
    drop(dk);
    progress.done();
    sink.finish()?;
    summary(cli, "encrypted", &a.input, &dest, &header, n);
    Ok(())
}

/// `tde decrypt`.
pub fn decrypt(cli: &Cli, cfg: &Config, a: &DecryptArgs) -> anyhow::Result<()> {
    use base64::Engine as _;
    let want = crate::cmd::parse_context(&a.ctx.context)?;
    let dest = match (&a.output, a.input == Path::new("-")) {
        (Some(o), _) => o.clone(),
        (None, true) => PathBuf::from("-"),
        (None, false) => match a.input.to_str().and_then(|s| s.strip_suffix(".tde")) {
            Some(stem) if !stem.is_empty() => PathBuf::from(stem),
            _ => bail!(
                "cannot tell the output's name from {} (no .tde suffix): give -o OUTPUT",
                a.input.display()
            ),
        },
    };
    let (mut src, total) = input(&a.input)?;
    let (header, aad) =
        Header::read(&mut src).with_context(|| format!("reading {}", a.input.display()))?;
    for (k, v) in &want {
        if header.context.get(k) != Some(v) {
            bail!(
                "{} was not encrypted with the context {k}={v} (its context: {})",
                a.input.display(),
                header
                    .context
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let wrapped = base64::engine::general_purpose::STANDARD
        .decode(&header.wrapped_key)
        .context("the encrypted file's header is damaged: the wrapped key is not base64")?;
    let mut sink = Sink::open(&dest, a.force)?;
    let dk = crate::cmd::key_client(cli, cfg)?.decrypt(&wrapped, &header.context)?;
    let mut progress = bytes_progress(cli, total, "decrypting");
    let n = decrypt_stream(
        &header,
        &aad,
        dk.plaintext.expose(),
        &mut src,
        sink.writer(),
        &mut |d| progress.at(d),
    );
    drop(dk);
    progress.done();
    let n = n.with_context(|| format!("decrypting {}", a.input.display()))?;
    sink.finish()?;
    summary(cli, "decrypted", &a.input, &dest, &header, n);
    Ok(())
}

fn summary(cli: &Cli, verb: &str, input: &Path, dest: &Path, h: &Header, n: u64) {
    // Standard output holds the data itself.
    if dest == Path::new("-") {
        return;
    }
    crate::cmd::emit(
        cli,
        serde_json::json!({
            "input": input, "output": dest, "bytes": n,
            "key": h.key, "key_version": h.key_version, "context": h.context,
        }),
        || {
            format!(
                "{verb} {} ({}) to {} (data key under {} version {})",
                input.display(),
                indicatif::BinaryBytes(n),
                dest.display(),
                h.key,
                h.key_version
            )
        },
    );
}
