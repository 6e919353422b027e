//! The key file: the wrapped DEK versions of one tablespace, kept in the
//! backing directory as `tde.key` (JSON, mode 0600), like the key that Oracle
//! and MySQL keep in a tablespace's header.
//!
//! ```json
//! {"format":"tde-keyfile-2","mek":"pg-main","tablespace":"secure","cluster":"prod-1",
//!  "deks":[{"version":1,"mek_version":1,"wrapped":"VERFVwEH..."}]}
//! ```
//!
//! Only wrapped keys are stored. Each unwraps only with the encryption
//! context `{cluster, tablespace}` given at mount time, so a key file copied
//! into another tablespace's backing directory is refused by the sidecar
//! (`CONTEXT_MISMATCH`). Writes are atomic: a temporary file is written and
//! fsynced, renamed over the old one, and the directory is fsynced.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

/// File name of the key file in the backing directory's root.
pub const KEY_FILE: &str = "tde.key";
/// Format tag of new key files: the tablespace's files have format-2
/// headers (bound to their paths, with a durable length).
pub const FORMAT: &str = "tde-keyfile-2";
/// Format tag of older key files, whose tablespace's files may still have
/// format-1 headers; a mount upgrades them and then the key file.
pub const FORMAT_1: &str = "tde-keyfile-1";

/// Largest key file read (a key file with every version it could hold is a
/// few KiB).
pub const MAX_KEY_FILE: u64 = 1 << 20;

/// Reads the text file `path`, refusing one longer than `max` bytes (tde's
/// own small files in a backing directory, which whoever can write the
/// directory can also make huge).
pub fn read_capped(path: &Path, max: u64) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(max + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("longer than {max} bytes"),
        ));
    }
    Ok(text)
}

/// One wrapped DEK version.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WrappedDek {
    /// DEK version (the one recorded in each block's trailer).
    pub version: u32,
    /// Master key version that wrapped it (informational; the blob says).
    pub mek_version: u32,
    /// The wrapped key, base64.
    pub wrapped: String,
}

impl WrappedDek {
    /// The wrapped bytes.
    pub fn blob(&self) -> anyhow::Result<Vec<u8>> {
        B64.decode(&self.wrapped)
            .context("the key file holds a wrapped key that is not base64")
    }
}

/// The key file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    /// [`FORMAT`] (or [`FORMAT_1`] before the upgrade).
    pub format: String,
    /// Master key name in the sidecar.
    pub mek: String,
    /// Tablespace name (part of the encryption context).
    pub tablespace: String,
    /// Cluster id (part of the encryption context).
    pub cluster: String,
    /// DEK versions, oldest first. The newest encrypts new writes.
    pub deks: Vec<WrappedDek>,
}

impl KeyFile {
    /// A key file with one DEK (version 1).
    pub fn new(
        mek: &str,
        tablespace: &str,
        cluster: &str,
        mek_version: u32,
        wrapped: &[u8],
    ) -> Self {
        Self {
            format: FORMAT.into(),
            mek: mek.into(),
            tablespace: tablespace.into(),
            cluster: cluster.into(),
            deks: vec![WrappedDek {
                version: 1,
                mek_version,
                wrapped: B64.encode(wrapped),
            }],
        }
    }

    /// The header format of the tablespace's files: 1 until the upgrade of
    /// an older tablespace is done, else 2.
    pub fn page_format(&self) -> u8 {
        if self.format == FORMAT_1 { 1 } else { 2 }
    }

    /// The encryption context its DEKs are bound to.
    pub fn context(tablespace: &str, cluster: &str) -> BTreeMap<String, String> {
        [
            ("cluster".to_string(), cluster.to_string()),
            ("tablespace".to_string(), tablespace.to_string()),
        ]
        .into()
    }

    /// Path of the key file in `backing`.
    pub fn path(backing: &Path) -> PathBuf {
        backing.join(KEY_FILE)
    }

    /// Reads the key file of `backing`.
    pub fn load(backing: &Path) -> anyhow::Result<KeyFile> {
        let path = Self::path(backing);
        let missing = || {
            format!(
                "{} has no key file ({}): it is not a tde backing directory; use --init to create one",
                backing.display(),
                path.display()
            )
        };
        let text = match read_capped(&path, MAX_KEY_FILE) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(e).with_context(missing);
            }
            r => r.with_context(|| format!("reading {}", path.display()))?,
        };
        // Whoever may read it may take the wrapped keys elsewhere; whoever
        // may write it may swap them.
        tde_protocol::private::check(&path, "key file").map_err(anyhow::Error::msg)?;
        Self::parse(&text).with_context(|| format!("{} is damaged", path.display()))
    }

    /// Parses and checks a key file's text.
    pub fn parse(text: &str) -> anyhow::Result<KeyFile> {
        let kf: KeyFile = serde_json::from_str(text)?;
        if kf.format != FORMAT && kf.format != FORMAT_1 {
            bail!("unsupported format {:?}", kf.format);
        }
        if kf.deks.is_empty() {
            bail!("it holds no data key");
        }
        let mut versions: Vec<u32> = kf.deks.iter().map(|d| d.version).collect();
        versions.sort_unstable();
        versions.dedup();
        if versions.len() != kf.deks.len() || versions[0] == 0 {
            bail!("its data key versions are not distinct versions from 1");
        }
        for d in &kf.deks {
            d.blob()?;
        }
        Ok(kf)
    }

    /// Writes the key file atomically (temp file, fsync, rename, fsync dir).
    pub fn store(&self, backing: &Path) -> anyhow::Result<()> {
        let mut text = serde_json::to_string_pretty(self)?;
        text.push('\n');
        write_atomic(&Self::path(backing), text.as_bytes())
    }
}

/// An exclusive lock on a backing directory (`flock` on the directory),
/// held by a mount for as long as it runs and by `tde rewrap` while it
/// works: a backing directory is served by one mount at a time, and its
/// key file has one writer. The kernel drops it when the process ends,
/// even by kill -9.
#[derive(Debug)]
pub struct BackingLock {
    _dir: std::fs::File,
}

impl BackingLock {
    /// Takes the lock, or says who holds it.
    pub fn acquire(backing: &Path) -> anyhow::Result<BackingLock> {
        let dir = std::fs::File::open(backing)
            .with_context(|| format!("opening {}", backing.display()))?;
        match rustix::fs::flock(&dir, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(BackingLock { _dir: dir }),
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => bail!(
                "{} is in use by a running `tde mount` (or `tde rewrap`)",
                backing.display()
            ),
            Err(e) => Err(e).with_context(|| format!("locking {}", backing.display())),
        }
    }
}

/// Replaces `path` with `bytes` atomically and durably: a temporary file
/// (mode 0600) in the same directory is written and fsynced, renamed over
/// `path`, and the directory is fsynced. A crash leaves the old or the new
/// file, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().context("a file path has a directory")?;
    let mut tmp_name = path
        .file_name()
        .context("a file path has a name")?
        .to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_and_load() {
        let dir = tempfile::tempdir().expect("tmp");
        assert!(KeyFile::load(dir.path()).is_err());
        let k = KeyFile::new("pg", "ts", "c1", 1, b"blob");
        k.store(dir.path()).expect("store");
        assert_eq!(KeyFile::load(dir.path()).expect("load"), k);
        assert_eq!(k.deks[0].blob().expect("b64"), b"blob");
        std::fs::write(KeyFile::path(dir.path()), "{}").expect("write");
        assert!(KeyFile::load(dir.path()).is_err());
    }
}
