//! The keys of one tablespace, with one owner: the key file in the backing
//! directory, the page cipher that holds its unwrapped data keys, the lock
//! that serialises changes to them, and the sidecar that wraps them. The
//! file system, the keeper (master-key rotation), the re-key engine and
//! `tde rewrap` all go through a [`Keys`].
//!
//! # Crash ordering of key-file changes
//! Every change is one read-modify-write under [`Keys`]'s lock, written
//! atomically ([`crate::keyfile::write_atomic`]: temporary file, fsync,
//! rename, fsync of the directory), so a crash leaves the old or the new key
//! file. What makes each change safe is the order around that write:
//!
//! - **A new data key version** ([`Keys::add_version`], re-key start): the
//!   key file with the new wrapped key is durable *before* the cipher can
//!   encrypt a block under it. A crash after the write leaves an unused
//!   version in the key file (the next `tde rekey` reuses it).
//! - **A rewrap** ([`Keys::sync_master`], master-key rotation): the new key
//!   file replaces the old one; the data key itself does not change, and the
//!   old master key version still unwraps the old file until it is
//!   destroyed, which the sidecar refuses while its registry lists it.
//! - **Retiring versions** ([`Keys::retire_all_but`], re-key finish): the
//!   caller has made every block and header under the target version
//!   durable (`syncfs`) first; the key file drops the old versions, and only
//!   then does the cipher forget them.
//! - **The header format** ([`Keys::set_page_format_2`]): the key file says
//!   format 2 only after every file's header was upgraded and synced.
//!
//! After each change the sidecar's registry is told (best effort: the
//! keeper registers again later).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use crate::keyfile::{FORMAT, KeyFile, WrappedDek};
use crate::mount::MountSpec;
use crate::page::PageCipher;
use anyhow::{Context as _, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use tde_protocol::client::{Client, ClientError};
use tde_protocol::{DekRef, ErrorCode};

/// What [`Keys::sync_master`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncOutcome {
    /// The master key's name.
    pub key: String,
    /// The master key's primary version.
    pub primary: u32,
    /// Data key versions rewrapped: `(dek_version, from, to)`.
    pub rewrapped: Vec<(u32, u32, u32)>,
}

/// Why [`Keys::sync_master`] failed: the sidecar (refused, or not
/// reached) or the key file.
#[derive(Debug)]
pub enum SyncError {
    /// A call to the sidecar failed.
    Sidecar {
        /// What the call was for.
        during: String,
        /// How it failed.
        error: ClientError,
    },
    /// The key file could not be read, changed or stored.
    KeyFile(anyhow::Error),
}

impl SyncError {
    fn sidecar(during: &'static str) -> impl FnOnce(ClientError) -> SyncError {
        move |error| SyncError::Sidecar {
            during: during.into(),
            error,
        }
    }

    /// The sidecar's refusal code, if it refused.
    pub fn refused(&self) -> Option<ErrorCode> {
        match self {
            SyncError::Sidecar { error, .. } => error.refused(),
            SyncError::KeyFile(_) => None,
        }
    }
}

impl From<anyhow::Error> for SyncError {
    fn from(e: anyhow::Error) -> Self {
        SyncError::KeyFile(e)
    }
}

impl std::fmt::Display for SyncError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SyncError::Sidecar { during, error } => write!(f, "{during}: {error}"),
            SyncError::KeyFile(e) => write!(f, "the key file: {e:#}"),
        }
    }
}

impl std::error::Error for SyncError {}

/// A tablespace's keys.
pub struct Keys {
    backing: PathBuf,
    sidecar: PathBuf,
    cipher: RwLock<PageCipher>,
    /// Serialises key-file changes.
    file: Mutex<()>,
    /// Zeroized: the keys are gone and every use fails.
    wiped: AtomicBool,
    /// Header format of the tablespace's files (1 until upgraded).
    page_format: AtomicU8,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("backing", &self.backing)
            .field("wiped", &self.wiped())
            .finish_non_exhaustive()
    }
}

impl Keys {
    /// The keys of a mount: creates the key file with a new data key
    /// (`spec.init`) or reads it, and unwraps every data key version through
    /// the sidecar (waiting for it as `spec.wait` says).
    pub fn open(spec: &MountSpec) -> anyhow::Result<Keys> {
        let context = KeyFile::context(&spec.tablespace, &spec.cluster);
        let mut cipher = PageCipher::new(&spec.tablespace).map_err(|e| anyhow::anyhow!("{e}"))?;
        if spec.init {
            if KeyFile::path(&spec.backing).exists() {
                bail!(
                    "{} is already a tde backing directory (it has a key file); mount it without --init",
                    spec.backing.display()
                );
            }
            if std::fs::read_dir(&spec.backing)?.next().is_some() {
                bail!(
                    "{} is not empty: --init needs an empty backing directory",
                    spec.backing.display()
                );
            }
            let key = spec.key.as_deref().context("--init needs --key MEK")?;
            let dk = call_waiting(&spec.sidecar, spec.wait, |c| {
                c.generate_data_key(key, &context)
            })
            .map_err(|e| explain(e, spec))?;
            cipher
                .add_key(1, dk.plaintext.expose())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            KeyFile::new(
                key,
                &spec.tablespace,
                &spec.cluster,
                dk.version,
                &dk.ciphertext,
            )
            .store(&spec.backing)?;
            return Ok(Keys::new(&spec.backing, &spec.sidecar, cipher, 2));
        }
        let kf = KeyFile::load(&spec.backing)?;
        if kf.tablespace != spec.tablespace || kf.cluster != spec.cluster {
            bail!(
                "mount refused: the key file in {} belongs to tablespace {:?} of cluster {:?}, not {:?} of {:?}",
                spec.backing.display(),
                kf.tablespace,
                kf.cluster,
                spec.tablespace,
                spec.cluster
            );
        }
        if let Some(k) = &spec.key
            && *k != kf.mek
        {
            bail!("the key file is under master key {:?}, not {k:?}", kf.mek);
        }
        for dek in &kf.deks {
            let blob = dek.blob()?;
            let d = call_waiting(&spec.sidecar, spec.wait, |c| c.decrypt(&blob, &context))
                .map_err(|e| explain(e, spec))?;
            cipher
                .add_key(dek.version, d.plaintext.expose())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        Ok(Keys::new(
            &spec.backing,
            &spec.sidecar,
            cipher,
            kf.page_format(),
        ))
    }

    fn new(backing: &Path, sidecar: &Path, cipher: PageCipher, page_format: u8) -> Keys {
        Keys {
            backing: backing.to_path_buf(),
            sidecar: sidecar.to_path_buf(),
            cipher: RwLock::new(cipher),
            file: Mutex::new(()),
            wiped: AtomicBool::new(false),
            page_format: AtomicU8::new(page_format),
        }
    }

    /// Keys with no data key in memory, for work on the key file alone
    /// (`tde rewrap`: the sidecar rewraps, no plaintext key is needed).
    pub fn offline(backing: &Path, sidecar: &Path) -> anyhow::Result<Keys> {
        let kf = KeyFile::load(backing)?;
        let cipher = PageCipher::new(&kf.tablespace).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Keys::new(backing, sidecar, cipher, kf.page_format()))
    }

    /// Keys around a cipher the caller made, for files of header format
    /// `page_format` (tests of the block engine; no sidecar, and a key file
    /// only if the test writes one).
    pub fn in_memory(backing: &Path, cipher: PageCipher, page_format: u8) -> Keys {
        Keys::new(backing, Path::new(""), cipher, page_format)
    }

    /// The sidecar's data socket.
    pub fn sidecar(&self) -> &Path {
        &self.sidecar
    }

    /// The page cipher (shared: blocks encrypt and decrypt in parallel).
    pub fn cipher(&self) -> RwLockReadGuard<'_, PageCipher> {
        self.cipher.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The header format of the tablespace's files.
    pub fn page_format(&self) -> u8 {
        self.page_format.load(Ordering::SeqCst)
    }

    /// Zeroization reached this mount: every data key is dropped from
    /// memory (AWS-LC cleanses the key schedules), and from now on every
    /// use fails.
    pub fn wipe(&self) {
        self.wiped.store(true, Ordering::SeqCst);
        self.cipher
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .wipe();
    }

    /// Whether [`Keys::wipe`] ran.
    pub fn wiped(&self) -> bool {
        self.wiped.load(Ordering::SeqCst)
    }

    /// The one read-modify-write of the key file: `f` changes it and says
    /// whether it did; a changed key file is stored atomically.
    fn update<R, E: From<anyhow::Error>>(
        &self,
        f: impl FnOnce(&mut KeyFile) -> Result<(bool, R), E>,
    ) -> Result<(KeyFile, R), E> {
        let _held = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if self.wiped() {
            return Err(anyhow::anyhow!("the keys of this mount were zeroized").into());
        }
        let mut kf = KeyFile::load(&self.backing)?;
        let (changed, r) = f(&mut kf)?;
        if changed {
            kf.store(&self.backing)?;
        }
        Ok((kf, r))
    }

    /// Tells the sidecar's registry which data keys (under which master key
    /// versions) this backing directory holds; returns the master key's
    /// primary version.
    pub fn register(&self, c: &mut Client, kf: &KeyFile) -> Result<u32, ClientError> {
        let location = self.location();
        let deks = kf
            .deks
            .iter()
            .map(|d| DekRef {
                dek_version: d.version,
                key_version: d.mek_version,
            })
            .collect();
        let context = KeyFile::context(&kf.tablespace, &kf.cluster);
        c.register_deks(&kf.mek, &context, &location, deks)
    }

    /// The backing directory as the sidecar's registry names it.
    fn location(&self) -> String {
        self.backing
            .canonicalize()
            .unwrap_or_else(|_| self.backing.clone())
            .display()
            .to_string()
    }

    /// Tells the sidecar, for its audit log, where a re-key stands
    /// (`started`, `progress`, `finished`, `failed`). Best effort: a
    /// sidecar that is away, or refuses (one from before re-key reports),
    /// costs a log line and the re-key goes on.
    pub fn report_rekey(&self, state: &str, target: u32, done: u64, total: u64) {
        let sent = KeyFile::load(&self.backing).and_then(|kf| {
            let context = KeyFile::context(&kf.tablespace, &kf.cluster);
            Client::connect(&self.sidecar)
                .and_then(|mut c| {
                    c.rekey_report(
                        &kf.mek,
                        &context,
                        &self.location(),
                        state,
                        target,
                        done,
                        total,
                    )
                })
                .map_err(anyhow::Error::from)
        });
        if let Err(e) = sent {
            tracing::warn!(error = %format!("{e:#}"), state, "could not report the re-key to the sidecar's audit log");
        }
    }

    /// Best-effort registration on a fresh connection (the keeper retries).
    fn register_now(&self, kf: &KeyFile) {
        if let Err(e) = Client::connect(&self.sidecar).and_then(|mut c| self.register(&mut c, kf)) {
            tracing::warn!(error = %format!("{e:#}"), "could not update the sidecar's registry (the keeper retries)");
        }
    }

    /// Brings the key file up to the master key's primary version: registers,
    /// rewraps every data key wrapped under an older version through the
    /// sidecar (`re_encrypt`: the plaintext key never leaves the HSM),
    /// replaces the key file atomically, and registers again. Callers
    /// outside a mount hold the [`crate::keyfile::BackingLock`].
    pub fn sync_master(&self, c: &mut Client) -> Result<SyncOutcome, SyncError> {
        let mut primary = 0;
        let (kf, rewrapped) = self.update::<_, SyncError>(|kf| {
            primary = self
                .register(c, kf)
                .map_err(SyncError::sidecar("registering the data keys"))?;
            let context = KeyFile::context(&kf.tablespace, &kf.cluster);
            let mut rewrapped = Vec::new();
            for dek in &mut kf.deks {
                if dek.mek_version >= primary {
                    continue;
                }
                let r =
                    c.re_encrypt(&dek.blob()?, &context)
                        .map_err(|error| SyncError::Sidecar {
                            during: format!(
                                "rewrapping data key v{} (under master key {} v{})",
                                dek.version, kf.mek, dek.mek_version
                            ),
                            error,
                        })?;
                rewrapped.push((dek.version, r.source_version, r.version));
                dek.mek_version = r.version;
                dek.wrapped = B64.encode(&r.ciphertext);
            }
            Ok((!rewrapped.is_empty(), rewrapped))
        })?;
        if !rewrapped.is_empty() {
            self.register(c, &kf)
                .map_err(SyncError::sidecar("registering the rewrapped data keys"))?;
        }
        Ok(SyncOutcome {
            key: kf.mek,
            primary,
            rewrapped,
        })
    }

    /// The target of a re-key: a new data key version from the sidecar,
    /// stored in the key file and then made the cipher's current version
    /// (new writes use it). When the key file already holds several versions
    /// (an earlier re-key stopped before its first checkpoint), the newest
    /// is the target and nothing changes.
    pub fn add_version(&self) -> anyhow::Result<u32> {
        let (kf, (target, new_key)) = self.update::<_, anyhow::Error>(|kf| {
            let newest = kf.deks.iter().map(|d| d.version).max().unwrap_or(0);
            if kf.deks.len() > 1 {
                return Ok((false, (newest, None)));
            }
            let next = newest + 1;
            let context = KeyFile::context(&kf.tablespace, &kf.cluster);
            let dk = Client::connect(&self.sidecar)
                .and_then(|mut c| c.generate_data_key(&kf.mek, &context))
                .context("asking the sidecar for a new data key")?;
            kf.deks.push(WrappedDek {
                version: next,
                mek_version: dk.version,
                wrapped: B64.encode(&dk.ciphertext),
            });
            Ok((true, (next, Some(dk.plaintext))))
        })?;
        // The key file is durable now (`update` stored it): only from here
        // on may a block be written under the new version.
        if let Some(plaintext) = new_key {
            self.cipher
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .add_key(target, plaintext.expose())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            self.register_now(&kf);
        }
        Ok(target)
    }

    /// Drops every data key version but `target` from the key file, then from
    /// memory; returns the dropped versions. Every block and header must be
    /// under `target` and durable before this is called.
    pub fn retire_all_but(&self, target: u32) -> anyhow::Result<Vec<u32>> {
        let (kf, old) = self.update::<_, anyhow::Error>(|kf| {
            if !kf.deks.iter().any(|d| d.version == target) {
                bail!("the key file lost data key v{target}: not retiring anything");
            }
            let old: Vec<u32> = kf
                .deks
                .iter()
                .map(|d| d.version)
                .filter(|v| *v != target)
                .collect();
            kf.deks.retain(|d| d.version == target);
            Ok((!old.is_empty(), old))
        })?;
        {
            let mut c = self.cipher.write().unwrap_or_else(|p| p.into_inner());
            for v in &old {
                c.remove_key(*v);
            }
        }
        self.register_now(&kf);
        Ok(old)
    }

    /// Records that every file of the tablespace has a format-2 header.
    pub fn set_page_format_2(&self) -> anyhow::Result<()> {
        self.update::<_, anyhow::Error>(|kf| {
            let changed = kf.format != FORMAT;
            kf.format = FORMAT.into();
            Ok((changed, ()))
        })?;
        self.page_format.store(2, Ordering::SeqCst);
        Ok(())
    }
}

/// Connects to the sidecar and makes the call `f`, waiting up to `wait`
/// while the sidecar is unreachable or sealed, with a message each time.
/// Other refusals end at once.
pub fn call_waiting<T>(
    sidecar: &Path,
    wait: Duration,
    mut f: impl FnMut(&mut Client) -> Result<T, ClientError>,
) -> Result<T, ClientError> {
    let deadline = Instant::now() + wait;
    let mut said = None::<(String, Instant)>;
    loop {
        let e = match Client::connect(sidecar).and_then(|mut c| f(&mut c)) {
            Ok(r) => return Ok(r),
            Err(e) => e,
        };
        let why = match e.refused() {
            Some(ErrorCode::Sealed) => {
                "the sidecar is sealed; waiting for it to be unsealed".to_string()
            }
            Some(_) => return Err(e),
            None => format!(
                "the sidecar at {} is unreachable ({e}); waiting",
                sidecar.display()
            ),
        };
        // Said when it changes and every 10 s while it lasts (the log is
        // on stderr, or the journal); the caller's error says that it gave
        // up.
        if Instant::now() >= deadline {
            return Err(e);
        }
        if said
            .as_ref()
            .is_none_or(|(w, at)| *w != why || at.elapsed() >= Duration::from_secs(10))
        {
            tracing::warn!("{why}");
            said = Some((why, Instant::now()));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn explain(e: ClientError, spec: &MountSpec) -> anyhow::Error {
    match e.refused() {
        Some(ErrorCode::ContextMismatch) => anyhow::anyhow!(
            "mount refused: the key file in {} was not made for tablespace {:?} of cluster {:?} (it was copied from another backing directory, or the names are wrong)",
            spec.backing.display(),
            spec.tablespace,
            spec.cluster
        ),
        Some(ErrorCode::PermissionDenied) => {
            anyhow::Error::new(e).context("mount refused by the sidecar's client policy")
        }
        Some(ErrorCode::Zeroized) => anyhow::Error::new(e).context(
            "mount refused: the sidecar was zeroized; its master keys, and so this tablespace's data keys, are gone for ever",
        ),
        Some(ErrorCode::Sealed) => anyhow::Error::new(e).context(format!(
            "the sidecar is still sealed: gave up after {} s (--wait)",
            spec.wait.as_secs()
        )),
        Some(_) => e.into(),
        None => anyhow::Error::new(e).context(format!(
            "the sidecar at {} is unreachable: gave up after {} s (--wait)",
            spec.sidecar.display(),
            spec.wait.as_secs()
        )),
    }
}
