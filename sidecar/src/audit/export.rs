//! Audit exports: the files `tde audit export` writes, their renderings
//! (JSON lines, CSV, OCSF), and `tde audit verify`, which checks an export
//! offline with nothing but its files (and, pinned, the public keys).
//!
//! An export directory holds:
//! - `records.jsonl`: the records exactly as stored, one per line, in
//!   sequence order: the evidence, whatever the format asked for.
//! - `records.csv` or `records.ocsf.jsonl` for `--format csv|ocsf`: a
//!   rendering of the same records; verify renders them again and compares.
//! - `manifest.json`: the range, the chain hashes before the first record
//!   and of the last, every file's SHA-256, every checkpoint over the range
//!   (with its signature) and the public keys that signed them.
//!
//! Every field of the manifest is checked against the files or a signature,
//! so an edited manifest fails like an edited record.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::chain_hash;
use super::checkpoint::{self, Checkpoint};
use super::render;

/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";
/// The records as stored.
pub const RECORDS: &str = "records.jsonl";
/// Format name of this layout.
pub const FORMAT: &str = "tde-audit-export-1";

/// A rendering of the records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rendering {
    /// `records.jsonl` only.
    Jsonl,
    /// Also `records.csv` (RFC 4180).
    Csv,
    /// Also `records.ocsf.jsonl`: OCSF API Activity (class 6003).
    Ocsf,
}

impl Rendering {
    /// `jsonl`, `csv` or `ocsf`.
    pub fn parse(s: &str) -> Result<Rendering, String> {
        match s {
            "jsonl" => Ok(Rendering::Jsonl),
            "csv" => Ok(Rendering::Csv),
            "ocsf" => Ok(Rendering::Ocsf),
            other => Err(format!("unknown format {other:?}: jsonl, csv or ocsf")),
        }
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Rendering::Jsonl => "jsonl",
            Rendering::Csv => "csv",
            Rendering::Ocsf => "ocsf",
        }
    }

    /// The rendered file, if any.
    pub fn file(self) -> Option<&'static str> {
        match self {
            Rendering::Jsonl => None,
            Rendering::Csv => Some("records.csv"),
            Rendering::Ocsf => Some("records.ocsf.jsonl"),
        }
    }

    /// The file's first line (CSV's header), if any.
    pub fn header(self) -> Option<String> {
        (self == Rendering::Csv).then(|| render::CSV_COLUMNS.join(","))
    }

    /// One record's line (without newline); `store` is the store id.
    pub fn render(self, store: &str, record: &str) -> String {
        match self {
            Rendering::Jsonl => record.to_string(),
            Rendering::Csv => render::csv_row(record),
            Rendering::Ocsf => render::ocsf_line(store, record),
        }
    }
}

/// One file of an export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDigest {
    /// File name in the directory.
    pub name: String,
    /// SHA-256, hex.
    pub sha256: String,
    /// Size.
    pub bytes: u64,
}

/// An audit signing key version in a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestKey {
    /// Version.
    pub version: u32,
    /// PEM (SubjectPublicKeyInfo, Ed25519).
    pub pem: String,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// Store id (hex).
    pub store: String,
    /// Node id.
    pub node: String,
    /// `jsonl`, `csv` or `ocsf`.
    pub rendering: String,
    /// First record.
    pub first_seq: u64,
    /// Last record.
    pub last_seq: u64,
    /// Records.
    pub count: u64,
    /// Chain hash before the first record (hex).
    pub anchor: String,
    /// Chain hash of the last record (hex).
    pub head: String,
    /// Every file but this one.
    pub files: Vec<FileDigest>,
    /// Checkpoints ending in `first_seq - 1 ..= last_seq`, oldest first.
    pub checkpoints: Vec<Checkpoint>,
    /// The public keys of the versions that signed them.
    pub public_keys: Vec<ManifestKey>,
}

/// SHA-256 of a file, hex, and its size.
pub fn file_digest(path: &Path) -> std::io::Result<(String, u64)> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((hex::encode(h.finalize()), n))
}

/// What is wrong with an export: the first place found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// `changed`, `removed`, `inserted`, `reordered`, `truncated`,
    /// `checkpoint`, `unsigned`, `file`, `manifest`, `key`, `gap`, `fork`,
    /// `store`, `sink`.
    pub kind: &'static str,
    /// The record it concerns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// The file and line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// 1-based line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    /// For people.
    pub message: String,
}

fn problem(kind: &'static str, seq: Option<u64>, message: impl Into<String>) -> Problem {
    Problem {
        kind,
        seq,
        file: None,
        line: None,
        message: message.into(),
    }
}

fn at_line(kind: &'static str, seq: Option<u64>, line: u64, message: impl Into<String>) -> Problem {
    Problem {
        kind,
        seq,
        file: Some(RECORDS.into()),
        line: Some(line),
        message: message.into(),
    }
}

/// An export's records as verified: their chain hashes by sequence.
#[derive(Debug, Clone)]
pub struct Chain {
    /// Store id.
    pub store: String,
    /// First record.
    pub first: u64,
    /// Chain hash before it.
    pub anchor: [u8; 32],
    /// Chain hash of each record from `first` on.
    pub hashes: Vec<[u8; 32]>,
}

impl Chain {
    /// Last record.
    pub fn last(&self) -> u64 {
        self.first + self.hashes.len() as u64 - 1
    }

    /// The chain hash of `seq` (the anchor just before the first).
    pub fn hash(&self, seq: u64) -> Option<[u8; 32]> {
        if seq + 1 == self.first {
            return Some(self.anchor);
        }
        let i = seq.checked_sub(self.first)?;
        self.hashes.get(usize::try_from(i).ok()?).copied()
    }
}

/// The outcome of `tde audit verify`.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    /// Everything checked out.
    pub ok: bool,
    /// The one-line verdict.
    pub message: String,
    /// What failed first, if anything.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<Problem>,
    /// Store id.
    pub store: String,
    /// Range.
    pub first_seq: u64,
    /// Range.
    pub last_seq: u64,
    /// Records read.
    pub records: u64,
    /// Checkpoints whose signatures were checked.
    pub checkpoints: usize,
    /// The public keys came from `--pubkey`, not from the export itself.
    pub keys_pinned: bool,
    /// `--previous` was checked and this export continues it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub continues: Option<String>,
    /// Records compared with a sink's copy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sink_records: Option<u64>,
}

/// What `verify` checks beyond the export itself.
#[derive(Debug, Default)]
pub struct VerifyOptions<'a> {
    /// The previous export, which this one must continue.
    pub previous: Option<&'a Path>,
    /// Pinned public keys (PEM text).
    pub pubkeys: Option<Vec<[u8; 32]>>,
    /// A file sink's JSON lines (records and checkpoints).
    pub sink: Option<&'a Path>,
    /// Records allowed after the last checkpoint (0: the export's own
    /// checkpoint must sign its end).
    pub max_unsigned: u64,
}

fn hex32(s: &str) -> Option<[u8; 32]> {
    hex::decode(s).ok()?.try_into().ok()
}

/// The fields of a record the walk needs.
#[derive(Deserialize)]
struct Head {
    seq: u64,
    prev: Option<String>,
}

/// Checks the export in `dir` offline. Returns the verdict and, when it
/// holds, the verified chain (for a later `--previous`).
pub fn verify(dir: &Path, opts: &VerifyOptions<'_>) -> (Verdict, Option<Chain>) {
    let mut v = Verdict {
        ok: false,
        message: String::new(),
        problem: None,
        store: String::new(),
        first_seq: 0,
        last_seq: 0,
        records: 0,
        checkpoints: 0,
        keys_pinned: opts.pubkeys.is_some(),
        continues: None,
        sink_records: None,
    };
    let (p, chain) = match check(dir, opts, &mut v) {
        Ok(chain) => (None, Some(chain)),
        Err(p) => (Some(p), None),
    };
    v.ok = p.is_none();
    v.message = match &p {
        None => format!(
            "OK: records {}..={} ({}) of store {} verify: chain intact, {} checkpoint signatures valid ({}){}{}",
            v.first_seq,
            v.last_seq,
            v.records,
            v.store,
            v.checkpoints,
            if v.keys_pinned {
                "pinned keys"
            } else {
                "keys from the export itself: pin them with --pubkey"
            },
            v.continues
                .as_ref()
                .map(|c| format!(", continues {c}"))
                .unwrap_or_default(),
            v.sink_records
                .map(|n| format!(", {n} records match the sink"))
                .unwrap_or_default(),
        ),
        Some(p) => format!("FAILED: {}", p.message),
    };
    v.problem = p;
    (v, chain)
}

fn check(dir: &Path, opts: &VerifyOptions<'_>, v: &mut Verdict) -> Result<Chain, Problem> {
    let manifest_text = std::fs::read_to_string(dir.join(MANIFEST)).map_err(|e| {
        problem(
            "manifest",
            None,
            format!("{}: {e}", dir.join(MANIFEST).display()),
        )
    })?;
    let m: Manifest = serde_json::from_str(&manifest_text).map_err(|e| {
        problem(
            "manifest",
            None,
            format!("{MANIFEST} is not a tde export manifest: {e}"),
        )
    })?;
    if m.format != FORMAT {
        return Err(problem(
            "manifest",
            None,
            format!("{MANIFEST}: unknown format {:?}", m.format),
        ));
    }
    v.store = m.store.clone();
    v.first_seq = m.first_seq;
    v.last_seq = m.last_seq;
    let rendering = Rendering::parse(&m.rendering).map_err(|e| problem("manifest", None, e))?;
    let bad_manifest =
        |what: &str| problem("manifest", None, format!("{MANIFEST} was edited: {what}"));
    if m.first_seq == 0 || m.last_seq < m.first_seq || m.count != m.last_seq - m.first_seq + 1 {
        return Err(bad_manifest("its range and count disagree"));
    }
    let anchor = hex32(&m.anchor).ok_or_else(|| bad_manifest("anchor is not a hash"))?;
    hex32(&m.head).ok_or_else(|| bad_manifest("head is not a hash"))?;

    // Keys: the manifest's, each pinned if pins are given.
    let mut keys = Vec::new();
    for k in &m.public_keys {
        let pk = checkpoint::parse_public_keys_pem(&k.pem)
            .ok()
            .and_then(|ks| ks.first().copied())
            .ok_or_else(|| {
                bad_manifest(&format!(
                    "public key version {} is not an Ed25519 PEM",
                    k.version
                ))
            })?;
        keys.push((k.version, pk));
    }

    // Files: each listed one must match; nothing else may be there.
    let mut listed: BTreeMap<&str, &FileDigest> = BTreeMap::new();
    for f in &m.files {
        listed.insert(f.name.as_str(), f);
    }
    let expected_files: Vec<&str> = [Some(RECORDS), rendering.file()]
        .into_iter()
        .flatten()
        .collect();
    for name in &expected_files {
        if !listed.contains_key(name) {
            return Err(bad_manifest(&format!("{name} is not listed")));
        }
    }
    if listed.len() != expected_files.len() {
        return Err(bad_manifest(
            "it lists files that are not part of this format",
        ));
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name != MANIFEST && !listed.contains_key(name.as_str()) {
                return Err(problem(
                    "file",
                    None,
                    format!("{name} is not part of this export"),
                ));
            }
        }
    }

    // The digests on the other core while the walk reads every record in
    // order, chained; they are judged after it (a changed line is named
    // by the walk).
    let digests: Vec<_> = m
        .files
        .iter()
        .map(|f| {
            let path = dir.join(&f.name);
            std::thread::spawn(move || file_digest(&path))
        })
        .collect();
    let chain = walk(dir, &m, anchor, rendering, v)?;

    // Checkpoints: signatures, then what they sign against the chain.
    let mut signed_to = m.first_seq - 1;
    for c in &m.checkpoints {
        if c.store != m.store {
            return Err(problem(
                "checkpoint",
                Some(c.last_seq),
                format!(
                    "checkpoint at record {} is of store {}, not {}",
                    c.last_seq, c.store, m.store
                ),
            ));
        }
        if let Some(pins) = &opts.pubkeys {
            let key = keys
                .iter()
                .find(|(ver, _)| *ver == c.key_version)
                .map(|k| k.1);
            if !key.is_some_and(|k| pins.contains(&k)) {
                return Err(problem(
                    "key",
                    Some(c.last_seq),
                    format!(
                        "checkpoint at record {} is signed by audit key version {} whose public key is not pinned",
                        c.last_seq, c.key_version
                    ),
                ));
            }
        }
        c.verify(&keys).map_err(|e| {
            problem(
                "checkpoint",
                Some(c.last_seq),
                format!(
                    "checkpoint over records {}..={}: {e}",
                    c.first_seq, c.last_seq
                ),
            )
        })?;
        let mismatch = |what: &str| {
            problem(
                "checkpoint",
                Some(c.last_seq),
                format!(
                    "checkpoint over records {}..={} does not match the records: {what} (records were changed, removed or inserted after it was signed)",
                    c.first_seq, c.last_seq
                ),
            )
        };
        match chain.hash(c.last_seq) {
            Some(h) if hex::encode(h) == c.head => {}
            Some(_) => return Err(mismatch("the chain hash of its last record differs")),
            None => {
                return Err(bad_manifest(&format!(
                    "checkpoint at record {} is outside the range",
                    c.last_seq
                )));
            }
        }
        if let Some(h) = chain.hash(c.first_seq - 1)
            && hex::encode(h) != c.anchor
        {
            return Err(mismatch("the chain hash before its first record differs"));
        }
        // Its head covers every record up to it.
        signed_to = signed_to.max(c.last_seq);
        v.checkpoints += 1;
    }
    let unsigned = m.last_seq.saturating_sub(signed_to);
    if unsigned > opts.max_unsigned {
        return Err(problem(
            "unsigned",
            Some(signed_to + 1),
            format!(
                "records {}..={} are signed by no checkpoint ({unsigned} records; at most {} allowed)",
                signed_to + 1,
                m.last_seq,
                opts.max_unsigned
            ),
        ));
    }

    for (f, d) in m.files.iter().zip(digests) {
        let (sha, bytes) = d
            .join()
            .map_err(|_| problem("file", None, format!("{}: the digest failed", f.name)))?
            .map_err(|e| problem("file", None, format!("{}: {e}", f.name)))?;
        if sha != f.sha256 || bytes != f.bytes {
            return Err(problem(
                "file",
                None,
                format!(
                    "{} does not match its SHA-256 in the manifest (a file of another export, or changed)",
                    f.name
                ),
            ));
        }
    }

    if let Some(prev) = opts.previous {
        let (pv, pchain) = verify(
            prev,
            &VerifyOptions {
                pubkeys: opts.pubkeys.clone(),
                max_unsigned: opts.max_unsigned,
                ..Default::default()
            },
        );
        let pchain = pchain.ok_or_else(|| {
            problem(
                "gap",
                None,
                format!(
                    "the previous export {} does not verify: {}",
                    prev.display(),
                    pv.message
                ),
            )
        })?;
        continuation(&pchain, &chain)?;
        v.continues = Some(format!(
            "{} (records {}..={})",
            prev.display(),
            pchain.first,
            pchain.last()
        ));
    }
    if let Some(sink) = opts.sink {
        v.sink_records = Some(against_sink(sink, &chain, &m, &keys)?);
    }
    Ok(chain)
}

/// Reads `records.jsonl` (and the rendering beside it) line by line.
fn walk(
    dir: &Path,
    m: &Manifest,
    anchor: [u8; 32],
    rendering: Rendering,
    v: &mut Verdict,
) -> Result<Chain, Problem> {
    let open = |name: &str| {
        File::open(dir.join(name))
            .map(BufReader::new)
            .map_err(|e| problem("file", None, format!("{name}: {e}")))
    };
    let mut records = open(RECORDS)?;
    let mut rendered = match rendering.file() {
        Some(f) => Some((f, open(f)?, 0u64)),
        None => None,
    };
    if let (Some(h), Some((f, r, n))) = (rendering.header(), rendered.as_mut()) {
        let line = read_line(r).map_err(|e| problem("file", None, format!("{f}: {e}")))?;
        *n += 1;
        if line.as_deref().map(|l| l.strip_suffix(b"\n").unwrap_or(l)) != Some(h.as_bytes()) {
            return Err(problem(
                "file",
                None,
                format!("{f}: its header line was changed"),
            ));
        }
    }
    let mut chain = Chain {
        store: m.store.clone(),
        first: m.first_seq,
        anchor,
        hashes: Vec::with_capacity(usize::try_from(m.count.min(1 << 24)).unwrap_or(0)),
    };
    let mut prev = anchor;
    let mut expected = m.first_seq;
    let mut line_no = 0u64;
    let mut pending: Option<Vec<u8>> = None;
    // The rendering is checked on the other core as the chain is walked.
    let mut check = rendered.map(|(f, r, n)| RenderCheck::start(f, r, n, rendering, &m.store));
    loop {
        let line = match pending.take() {
            Some(l) => Some(l),
            None => read_line(&mut records)
                .map_err(|e| problem("file", None, format!("{RECORDS}: {e}")))?,
        };
        let Some(line) = line else { break };
        line_no += 1;
        let Some(body) = line.strip_suffix(b"\n") else {
            return Err(at_line(
                "truncated",
                Some(expected),
                line_no,
                format!(
                    "{RECORDS} is cut short at line {line_no}: record {expected} is incomplete"
                ),
            ));
        };
        let h: Head = serde_json::from_slice(body).map_err(|_| at_line("truncated", Some(expected), line_no, format!(
            "line {line_no} of {RECORDS} is not a whole audit record (record {expected} expected)"
        )))?;
        if h.seq != expected {
            if h.seq > m.last_seq || h.seq < m.first_seq || h.seq < expected {
                return Err(at_line(
                    "inserted",
                    Some(h.seq),
                    line_no,
                    format!(
                        "line {line_no} holds record {} where record {expected} belongs: a record was inserted",
                        h.seq
                    ),
                ));
            }
            // Ahead of where we are: swapped with the next, or removed.
            let next = read_line(&mut records)
                .map_err(|e| problem("file", None, format!("{RECORDS}: {e}")))?;
            let next_seq = next
                .as_deref()
                .and_then(|n| {
                    serde_json::from_slice::<Head>(n.strip_suffix(b"\n").unwrap_or(n)).ok()
                })
                .map(|h| h.seq);
            if next_seq == Some(expected) {
                return Err(at_line(
                    "reordered",
                    Some(expected),
                    line_no,
                    format!(
                        "records {expected} and {} are out of order (lines {line_no} and {})",
                        h.seq,
                        line_no + 1
                    ),
                ));
            }
            let last_gone = h.seq - 1;
            return Err(at_line(
                "removed",
                Some(expected),
                line_no,
                if last_gone == expected {
                    format!(
                        "record {expected} was removed (line {line_no} holds record {})",
                        h.seq
                    )
                } else {
                    format!(
                        "records {expected}..={last_gone} were removed (line {line_no} holds record {})",
                        h.seq
                    )
                },
            ));
        }
        if let Some(p) = &h.prev
            && hex32(p) != Some(prev)
        {
            return Err(if expected == m.first_seq {
                at_line(
                    "changed",
                    Some(expected),
                    line_no,
                    format!(
                        "record {expected} (the first) does not chain from the manifest's anchor: it or the anchor was changed"
                    ),
                )
            } else {
                at_line(
                    "changed",
                    Some(expected - 1),
                    line_no - 1,
                    format!(
                        "record {} was changed (record {expected} names another chain hash before it)",
                        expected - 1
                    ),
                )
            });
        }
        let hash = chain_hash(&prev, body);
        if let Some(c) = check.as_mut() {
            c.push(expected, body)?;
        }
        chain.hashes.push(hash);
        prev = hash;
        expected += 1;
        v.records += 1;
        if expected > m.last_seq {
            if let Some(extra) = read_line(&mut records)
                .map_err(|e| problem("file", None, format!("{RECORDS}: {e}")))?
            {
                let seq =
                    serde_json::from_slice::<Head>(extra.strip_suffix(b"\n").unwrap_or(&extra))
                        .ok()
                        .map(|h| h.seq);
                return Err(at_line(
                    "inserted",
                    seq,
                    line_no + 1,
                    format!(
                        "line {} is past the manifest's last record {}: a record was inserted",
                        line_no + 1,
                        m.last_seq
                    ),
                ));
            }
            break;
        }
    }
    if expected <= m.last_seq {
        return Err(at_line(
            "removed",
            Some(expected),
            line_no + 1,
            format!(
                "records {expected}..={} were removed from the end of {RECORDS}",
                m.last_seq
            ),
        ));
    }
    if chain.hashes.last().copied() != hex32(&m.head) {
        return Err(at_line(
            "changed",
            Some(m.last_seq),
            line_no,
            format!(
                "record {} (the last) was changed: its chain hash is not the manifest's head",
                m.last_seq
            ),
        ));
    }
    // Kept for the end: if records.jsonl itself was changed, the chain
    // names the record, which says more.
    if let Some(p) = check.map(RenderCheck::finish).transpose()?.flatten() {
        return Err(p);
    }
    Ok(chain)
}

/// Compares the rendering file with the records, line by line, on its
/// own thread; the first line that differs.
struct RenderCheck {
    tx: std::sync::mpsc::SyncSender<Vec<(u64, Vec<u8>)>>,
    batch: Vec<(u64, Vec<u8>)>,
    thread: std::thread::JoinHandle<Option<Problem>>,
}

impl RenderCheck {
    fn start(
        file: &'static str,
        mut r: BufReader<File>,
        mut n: u64,
        rendering: Rendering,
        store: &str,
    ) -> RenderCheck {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<(u64, Vec<u8>)>>(8);
        let store = store.to_string();
        let thread = std::thread::spawn(move || {
            let mut found = None;
            let mut last = 0;
            for batch in rx {
                if found.is_some() {
                    continue;
                }
                for (seq, body) in batch {
                    last = seq;
                    n += 1;
                    let got = match read_line(&mut r) {
                        Ok(g) => g,
                        Err(e) => {
                            found = Some(problem("file", None, format!("{file}: {e}")));
                            break;
                        }
                    };
                    let want = rendering.render(&store, std::str::from_utf8(&body).unwrap_or(""));
                    if got.as_deref().map(|g| g.strip_suffix(b"\n").unwrap_or(g))
                        != Some(want.as_bytes())
                    {
                        found = Some(Problem {
                            kind: "changed",
                            seq: Some(seq),
                            file: Some(file.into()),
                            line: Some(n),
                            message: format!("{file} line {n} does not render record {seq}"),
                        });
                        break;
                    }
                }
            }
            if found.is_none() && read_line(&mut r).ok().flatten().is_some() {
                found = Some(problem(
                    "file",
                    None,
                    format!("{file} has lines past record {last} (line {})", n + 1),
                ));
            }
            found
        });
        RenderCheck {
            tx,
            batch: Vec::with_capacity(1024),
            thread,
        }
    }

    fn push(&mut self, seq: u64, body: &[u8]) -> Result<(), Problem> {
        self.batch.push((seq, body.to_vec()));
        if self.batch.len() >= 1024 {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Problem> {
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(1024));
        // A checker that stopped has found its problem; finish() says it.
        let _ = self.tx.send(batch);
        Ok(())
    }

    fn finish(mut self) -> Result<Option<Problem>, Problem> {
        self.flush()?;
        drop(self.tx);
        self.thread
            .join()
            .map_err(|_| problem("file", None, "the rendering check failed"))
    }
}

/// One line with its `\n` (none at the end of a cut file); `None` at EOF.
/// A line is at most 1 MiB: a record is far shorter.
fn read_line(r: &mut impl BufRead) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::new();
    let n = r.by_ref().take(1 << 20).read_until(b'\n', &mut buf)?;
    Ok((n > 0).then_some(buf))
}

/// `next` continues `prev`: the same store, no gap, no fork, nothing of
/// `prev` missing from the part they share.
fn continuation(prev: &Chain, next: &Chain) -> Result<(), Problem> {
    if prev.store != next.store {
        return Err(problem(
            "store",
            None,
            format!(
                "the previous export is of store {}, this one of store {}",
                prev.store, next.store
            ),
        ));
    }
    let (pl, nf) = (prev.last(), next.first);
    if nf > pl + 1 {
        return Err(problem(
            "gap",
            Some(pl + 1),
            format!(
                "records {}..={} are in neither export: a gap after the previous one",
                pl + 1,
                nf - 1
            ),
        ));
    }
    // From the record before this export's first to the end of the
    // previous one, both must hold the same chain.
    for seq in (nf - 1)..=pl.min(next.last()) {
        if let (Some(a), Some(b)) = (prev.hash(seq), next.hash(seq))
            && a != b
        {
            return Err(problem(
                "fork",
                Some(seq),
                if seq + 1 == nf {
                    format!(
                        "this export does not continue the previous one: the chain before record {nf} differs (a fork, or records of the previous export were replaced)"
                    )
                } else {
                    format!(
                        "record {seq} differs from the previous export's: the chain forked there (records {seq}..={pl} of the previous export were replaced or removed)"
                    )
                },
            ));
        }
    }
    if next.last() < pl {
        return Err(problem(
            "removed",
            Some(next.last() + 1),
            format!(
                "records {}..={pl} of the previous export are missing from this one",
                next.last() + 1
            ),
        ));
    }
    Ok(())
}

/// Compares the export with a file sink's copy: every record both hold
/// must be the same, the sink must not hold two versions of one record,
/// and the sink's checkpoints must agree with the export's chain.
fn against_sink(
    path: &Path,
    chain: &Chain,
    m: &Manifest,
    keys: &[(u32, [u8; 32])],
) -> Result<u64, Problem> {
    let f =
        File::open(path).map_err(|e| problem("sink", None, format!("{}: {e}", path.display())))?;
    let mut r = BufReader::new(f);
    let mut seen: HashMap<u64, [u8; 32]> = HashMap::new();
    let mut checkpoints = Vec::new();
    let mut forked: Option<u64> = None;
    while let Some(line) = read_line(&mut r).map_err(|e| problem("sink", None, e.to_string()))? {
        let Some(body) = line.strip_suffix(b"\n") else {
            break;
        };
        let Ok(v) = serde_json::from_slice::<Value>(body) else {
            continue;
        };
        if v["type"] == "checkpoint" {
            if let Ok(c) = Checkpoint::parse(std::str::from_utf8(body).unwrap_or("")) {
                checkpoints.push(c);
            }
            continue;
        }
        let (Some(seq), Some(prev)) = (v["seq"].as_u64(), v["prev"].as_str().and_then(hex32))
        else {
            continue;
        };
        let h = chain_hash(&prev, body);
        match seen.get(&seq) {
            Some(old) if *old != h => forked = Some(forked.map_or(seq, |f| f.min(seq))),
            Some(_) => {}
            None => {
                seen.insert(seq, h);
            }
        }
    }
    let mut compared = 0;
    for seq in chain.first..=chain.last() {
        if let Some(h) = seen.get(&seq) {
            if chain.hash(seq) != Some(*h) {
                return Err(problem(
                    "sink",
                    Some(seq),
                    format!(
                        "record {seq} differs from the sink's copy: the store's records from {seq} on were replaced{}",
                        forked
                            .map(|f| format!(" (the sink received two versions of record {f})"))
                            .unwrap_or_default()
                    ),
                ));
            }
            compared += 1;
        }
    }
    for c in &checkpoints {
        if c.store != m.store || c.verify(keys).is_err() {
            continue;
        }
        if c.reason == "export" && c.first_seq == m.first_seq && c.last_seq > m.last_seq {
            return Err(problem(
                "removed",
                Some(m.last_seq + 1),
                format!(
                    "the sink's export checkpoint says this export ended at record {}: records {}..={} are missing",
                    c.last_seq,
                    m.last_seq + 1,
                    c.last_seq
                ),
            ));
        }
        if let Some(h) = chain.hash(c.last_seq)
            && hex::encode(h) != c.head
        {
            return Err(problem(
                "sink",
                Some(c.last_seq),
                format!(
                    "the sink's checkpoint over records {}..={} does not match this export: records were changed after it was signed",
                    c.first_seq, c.last_seq
                ),
            ));
        }
    }
    if let Some(f) = forked {
        return Err(problem(
            "sink",
            Some(f),
            format!(
                "the sink received two versions of record {f}: the store's records from {f} on were replaced"
            ),
        ));
    }
    Ok(compared)
}
