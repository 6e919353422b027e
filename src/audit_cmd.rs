//! `tde audit`: list, follow, export, verify, prune, public keys.

use std::collections::BTreeSet;
use std::io::{IsTerminal, Write};

use crate::progress::Progress;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use tde_protocol::AuditQuery;
use tde_sidecar::Config;
use tde_sidecar::audit::checkpoint::{self, Checkpoint};
use tde_sidecar::audit::export::{
    self, FileDigest, Manifest, ManifestKey, RECORDS, Rendering, VerifyOptions,
};

use crate::cmd::{Answered, admin_login, emit, parse_context};
use crate::{AuditCmd, AuditExportArgs, AuditFilter, AuditVerifyArgs, Cli};

/// Runs `tde audit ...`.
pub fn run(cli: &Cli, cfg: &Config, cmd: &AuditCmd) -> anyhow::Result<()> {
    match cmd {
        AuditCmd::List {
            filter,
            limit,
            oldest,
        } => {
            let mut q = query(filter)?;
            q.limit = Some(*limit);
            q.newest = !oldest;
            let page = admin_login(cli, cfg)?.audit_list(q)?;
            for r in &page.records {
                print_record(cli, r);
            }
            if !cli.json && page.records.is_empty() {
                eprintln!("no matching records");
            }
            Ok(())
        }
        AuditCmd::Tail {
            filter,
            lines,
            follow,
        } => tail(cli, cfg, filter, *lines, *follow),
        AuditCmd::Export(a) => export(cli, cfg, a),
        AuditCmd::Verify(a) => verify(cli, a),
        AuditCmd::Prune { before, yes } => prune(cli, cfg, before, *yes),
        AuditCmd::Pubkey { out } => {
            let keys = admin_login(cli, cfg)?.audit_pubkey()?;
            let pems = pems(&keys)?;
            if let Some(path) = out {
                let text: String = pems.iter().map(|(_, _, p)| p.as_str()).collect();
                std::fs::write(path, text)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            emit(
                cli,
                json!(
                    pems.iter()
                        .map(|(k, v, p)| json!({"version": v, "active": k, "pem": p}))
                        .collect::<Vec<_>>()
                ),
                || {
                    pems.iter()
                        .map(|(active, v, p)| {
                            format!(
                                "# audit signing key version {v}{}\n{p}",
                                if *active { " (signs now)" } else { "" }
                            )
                        })
                        .collect::<String>()
                        .trim_end()
                        .to_string()
                },
            );
            Ok(())
        }
        AuditCmd::RotateKey => {
            let keys = admin_login(cli, cfg)?.audit_key_rotate()?;
            let v = keys.iter().find(|k| k.active).map_or(0, |k| k.version);
            emit(cli, json!({"rotated": true, "version": v}), || {
                format!(
                    "Audit signing key version {v} signs from now on; `tde audit pubkey` prints it for auditors to pin."
                )
            });
            Ok(())
        }
    }
}

/// (active, version, PEM) of each key.
fn pems(keys: &[tde_protocol::AuditKeyInfo]) -> anyhow::Result<Vec<(bool, u32, String)>> {
    keys.iter()
        .map(|k| {
            let pk: [u8; 32] = k.public.as_slice().try_into().map_err(|_| {
                anyhow::anyhow!("the sidecar sent a public key that is not Ed25519")
            })?;
            Ok((k.active, k.version, checkpoint::public_key_pem(&pk)))
        })
        .collect()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// RFC 3339 (`2026-12-07T10:00:00Z`), `now`, or an age (`90d`, `2h`).
fn parse_time(s: &str) -> anyhow::Result<u64> {
    if s == "now" {
        return Ok(now_ms());
    }
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0));
    }
    match humantime::parse_duration(s) {
        Ok(age) => Ok(now_ms().saturating_sub(age.as_millis() as u64)),
        Err(_) => {
            bail!("{s:?} is neither an RFC 3339 time (2026-12-07T10:00:00Z) nor an age (90d, 2h)")
        }
    }
}

fn query(f: &AuditFilter) -> anyhow::Result<AuditQuery> {
    Ok(AuditQuery {
        since_ms: f.since.as_deref().map(parse_time).transpose()?,
        until_ms: f.until.as_deref().map(parse_time).transpose()?,
        actor: f.actor.clone(),
        operation: f.operation.clone(),
        key: f.key.clone(),
        result: f.result.clone(),
        context: parse_context(&f.ctx.context)?,
        ..AuditQuery::default()
    })
}

/// One record: its JSON with --json, else one line for people.
fn print_record(cli: &Cli, text: &str) {
    if cli.json {
        println!("{text}");
        return;
    }
    let r: Value = serde_json::from_str(text).unwrap_or(Value::Null);
    let s = |v: &Value| v.as_str().map(str::to_string).unwrap_or_default();
    let a = &r["actor"];
    let who = match (
        a["operator"].as_str(),
        a["client"].as_str(),
        a["uid"].as_u64(),
    ) {
        (Some(o), _, _) => format!("operator {o}"),
        (None, Some(c), _) => format!("client {c}"),
        (None, None, Some(uid)) => format!("uid {uid}"),
        _ => "daemon".into(),
    };
    let mut line = format!(
        "{:>8} {} {:<20} {:<7} {who}",
        r["seq"].as_u64().unwrap_or(0),
        s(&r["time"]),
        s(&r["op"]),
        s(&r["result"])
    );
    if let Some(k) = r["key"].as_str() {
        line.push_str(&format!(" key {k}"));
        if let Some(v) = r["key_version"].as_u64() {
            line.push_str(&format!(" v{v}"));
        }
    }
    if let Some(c) = r["context"].as_object() {
        let pairs: Vec<String> = c.iter().map(|(k, v)| format!("{k}={}", s(v))).collect();
        line.push_str(&format!(" [{}]", pairs.join(",")));
    }
    if let Some(code) = r["error_code"].as_str() {
        line.push_str(&format!(" {code}"));
    }
    if let Some(d) = r["detail"].as_str() {
        line.push_str(&format!(": {d}"));
    }
    println!("{line}");
}

fn tail(cli: &Cli, cfg: &Config, f: &AuditFilter, lines: u32, follow: bool) -> anyhow::Result<()> {
    let mut c = admin_login(cli, cfg)?;
    let mut q = query(f)?;
    q.limit = Some(lines.max(1));
    q.newest = true;
    let page = c.audit_list(q.clone())?;
    for r in &page.records {
        print_record(cli, r);
    }
    if !follow {
        return Ok(());
    }
    // From the log's head at the first read: nothing in between is missed.
    let mut next = page.head + 1;
    q.newest = false;
    q.limit = Some(1000);
    loop {
        q.first_seq = Some(next);
        let page = c.audit_list(q.clone())?;
        for r in &page.records {
            print_record(cli, r);
        }
        if let Some(last) = page.records.last() {
            let seq = serde_json::from_str::<Value>(last)
                .ok()
                .and_then(|v| v["seq"].as_u64());
            next = seq.map_or(next, |s| s + 1);
        }
        if page.records.len() < 1000 {
            // Filtered-out records are passed over, not read again.
            next = next.max(page.head + 1);
            std::io::stdout().flush()?;
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

fn export(cli: &Cli, cfg: &Config, a: &AuditExportArgs) -> anyhow::Result<()> {
    let rendering = Rendering::parse(&a.format).map_err(anyhow::Error::msg)?;
    let mut q = AuditQuery {
        since_ms: a.since.as_deref().map(parse_time).transpose()?,
        until_ms: a.until.as_deref().map(parse_time).transpose()?,
        ..AuditQuery::default()
    };
    if let Some(prev) = &a.after {
        let m = read_manifest(prev)?;
        q.first_seq = Some(m.last_seq + 1);
    }
    // Made first and empty, so that an existing export is never mixed in.
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&a.out)
        .with_context(|| {
            format!(
                "creating {} (it must not exist: an export is never written over)",
                a.out.display()
            )
        })?;
    let mut c = admin_login(cli, cfg)?;
    let range = c.audit_export(q)?;
    let (first, last) = (range.first_seq, range.last_seq);
    let total = last - first + 1;
    let mut progress = Progress::new(
        cli,
        Some(total),
        "exporting [{bar:40}] {pos}/{len} records ({percent}%) ETA {eta}",
        |done, total| format!("exported {done}/{} records", total.unwrap_or(0)),
    );

    // One thread per file, rendering and hashing as it writes, while this
    // one reads the next page from the sidecar.
    let writers: Vec<(&str, FileWriter)> = [(RECORDS, Rendering::Jsonl)]
        .into_iter()
        .chain(rendering.file().map(|f| (f, rendering)))
        .map(|(name, r)| Ok((name, FileWriter::start(&a.out.join(name), r, &range.store)?)))
        .collect::<anyhow::Result<_>>()?;
    let mut lines: BTreeSet<String> = range.checkpoints.iter().cloned().collect();
    let mut next = first;
    let mut done = 0u64;
    while next <= last {
        let page = c.audit_read(next, last)?;
        if page.records.is_empty() {
            bail!("the sidecar returned no records from {next} (pruned during the export?)");
        }
        done += page.records.len() as u64;
        next = first + done;
        let records = Arc::new(page.records);
        if !writers.iter().all(|(_, w)| w.send(records.clone())) {
            break; // a file failed: its writer says why below
        }
        lines.extend(page.checkpoints);
        progress.at(done);
    }
    let mut files = Vec::new();
    for (name, w) in writers {
        let (sha256, bytes) = w.finish()?;
        files.push(FileDigest {
            name: name.into(),
            sha256,
            bytes,
        });
    }
    if next <= last {
        bail!("an export file stopped before record {next}");
    }
    progress.done();
    let mut checkpoints: Vec<Checkpoint> = lines
        .iter()
        .filter_map(|l| Checkpoint::parse(l).ok())
        .filter(|c| c.last_seq + 1 >= first && c.last_seq <= last)
        .collect();
    checkpoints.sort_by_key(|c| (c.last_seq, c.first_seq));
    let export_ck = checkpoints
        .iter()
        .find(|c| c.reason == "export" && c.first_seq == first && c.last_seq == last)
        .context("the sidecar did not sign the export's range")?
        .clone();
    let used: BTreeSet<u32> = checkpoints.iter().map(|c| c.key_version).collect();
    let public_keys = pems(&range.keys)?
        .into_iter()
        .filter(|(_, v, _)| used.contains(v))
        .map(|(_, version, pem)| ManifestKey { version, pem })
        .collect();
    let m = Manifest {
        format: export::FORMAT.into(),
        store: range.store.clone(),
        node: range.node.clone(),
        rendering: rendering.name().into(),
        first_seq: first,
        last_seq: last,
        count: total,
        anchor: export_ck.anchor.clone(),
        head: export_ck.head.clone(),
        files,
        checkpoints,
        public_keys,
    };
    let path = a.out.join(export::MANIFEST);
    let mut f = std::fs::File::create(&path)?;
    serde_json::to_writer_pretty(&mut f, &m)?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    c.audit_export_done(first, last)?;
    emit(
        cli,
        json!({"exported": true, "dir": a.out, "first_seq": first, "last_seq": last,
               "records": total, "checkpoints": m.checkpoints.len(), "format": rendering.name()}),
        || {
            format!(
                "Exported records {first}..={last} ({total}) of store {} to {} ({} checkpoints, format {}). \
                 Check it anywhere with `tde audit verify {}`.",
                m.store,
                a.out.display(),
                m.checkpoints.len(),
                rendering.name(),
                a.out.display()
            )
        },
    );
    Ok(())
}

/// A file of an export: pages of records in, each rendered as a line on
/// one thread, written and hashed on another (an OCSF line is rendered
/// from the record's JSON: the two halves cost about the same); its
/// SHA-256 and size out.
struct FileWriter {
    tx: std::sync::mpsc::SyncSender<Arc<Vec<String>>>,
    render: std::thread::JoinHandle<()>,
    write: std::thread::JoinHandle<anyhow::Result<(String, u64)>>,
}

impl FileWriter {
    fn start(path: &Path, rendering: Rendering, store: &str) -> anyhow::Result<FileWriter> {
        use sha2::Digest as _;
        let mut f =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let (tx, pages) = std::sync::mpsc::sync_channel::<Arc<Vec<String>>>(4);
        let (block_tx, blocks) = std::sync::mpsc::sync_channel::<String>(4);
        let store = store.to_string();
        let render = std::thread::spawn(move || {
            if let Some(header) = rendering.header()
                && block_tx.send(header + "\n").is_err()
            {
                return; // the writer failed: it says why
            }
            for page in pages {
                // A page's lines in one block (a page is capped in bytes).
                let mut block = String::new();
                for r in page.iter() {
                    match rendering {
                        Rendering::Jsonl => block.push_str(r),
                        other => block.push_str(&other.render(&store, r)),
                    }
                    block.push('\n');
                }
                if block_tx.send(block).is_err() {
                    return;
                }
            }
        });
        let path = path.to_path_buf();
        let write = std::thread::spawn(move || {
            let mut h = sha2::Sha256::new();
            let mut bytes = 0u64;
            let what = || format!("writing {}", path.display());
            for block in blocks {
                f.write_all(block.as_bytes()).with_context(what)?;
                h.update(block.as_bytes());
                bytes += block.len() as u64;
            }
            f.sync_all().with_context(what)?;
            Ok((hex::encode(h.finalize()), bytes))
        });
        Ok(FileWriter { tx, render, write })
    }

    /// Hands a page on; `false` if the file failed (`finish` says why).
    fn send(&self, page: Arc<Vec<String>>) -> bool {
        self.tx.send(page).is_ok()
    }

    fn finish(self) -> anyhow::Result<(String, u64)> {
        drop(self.tx);
        let rendered = self.render.join();
        let written = self
            .write
            .join()
            .map_err(|_| anyhow::anyhow!("an export file's writer failed"))??;
        rendered.map_err(|_| anyhow::anyhow!("an export file's rendering failed"))?;
        Ok(written)
    }
}

fn read_manifest(dir: &Path) -> anyhow::Result<Manifest> {
    let path = dir.join(export::MANIFEST);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not an export manifest", path.display()))
}

fn verify(cli: &Cli, a: &AuditVerifyArgs) -> anyhow::Result<()> {
    let pubkeys = match &a.pubkey {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            Some(checkpoint::parse_public_keys_pem(&text).map_err(anyhow::Error::msg)?)
        }
        None => None,
    };
    let opts = VerifyOptions {
        previous: a.previous.as_deref(),
        pubkeys,
        sink: a.sink.as_deref(),
        max_unsigned: a.max_unsigned,
    };
    let (v, _) = export::verify(&a.dir, &opts);
    emit(cli, json!(v), || v.message.clone());
    if v.ok {
        Ok(())
    } else {
        Err(Answered(1).into())
    }
}

fn prune(cli: &Cli, cfg: &Config, before: &str, yes: bool) -> anyhow::Result<()> {
    let before_ms = parse_time(before)?;
    if !yes {
        if !std::io::stdin().is_terminal() {
            bail!("prune deletes audit records from the store: pass --yes to confirm");
        }
        eprint!(
            "This deletes exported audit records before {before} from the store (the exports keep them).\nType PRUNE to continue: "
        );
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        if line.trim() != "PRUNE" {
            bail!("not confirmed; nothing changed");
        }
    }
    let r = admin_login(cli, cfg)?.audit_prune(before_ms)?;
    emit(
        cli,
        json!({"pruned": true, "first_seq": r.first_seq, "last_seq": r.last_seq}),
        || {
            format!(
                "Pruned records {}..={}; a signed checkpoint keeps their chain head, so later exports verify from there.",
                r.first_seq, r.last_seq
            )
        },
    );
    Ok(())
}
