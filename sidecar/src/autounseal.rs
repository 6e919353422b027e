//! Auto-unseal, like Vault's seal stanzas: the unseal key (what the
//! shares combine to) is wrapped by a key that never leaves another
//! device, and the daemon unwraps it at start, with no custodian.
//!
//! - `pkcs11`: an AES-256 key in an external PKCS#11 token (an HSM),
//!   non-extractable; wrapping is CKM_AES_GCM (NIST SP 800-38D) done by the
//!   token, with a random 96-bit IV and, as AAD, the store id.
//! - `tpm2`: a TPM 2.0 sealed data object (TPM 2.0 Library spec, part 1,
//!   "Sealed Data Objects") under the owner hierarchy's primary key,
//!   through tpm2-tools; optionally bound to PCR values (boot state).
//!
//! The wrapped unseal key lives in `DATA_DIR/auto-unseal.json` (0600). The
//! shares still combine to the same unseal key: they become recovery
//! shares, needed when the device is lost, and to wrap the key again after
//! a re-split or a change of device (the first unseal with shares after
//! either wraps it). Zeroization deletes the file; the root it would open
//! is gone anyway. What is wrapped is the unseal key, not the root: a
//! zeroized store stays unrecoverable even from a kept copy of the file.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use tde_hsm::secret::{KEY_LEN, UnsealKey};

use crate::config::SealConfig;

/// File name of the wrapped unseal key in the data directory.
pub const BLOB_FILE: &str = "auto-unseal.json";
/// Associated data of the PKCS#11 wrapping, followed by the store id.
const AAD: &[u8] = b"tde/v1/auto-unseal";
/// Longest blob file read back.
const MAX_BLOB: u64 = 64 * 1024;

/// The wrapped unseal key and what wrapped it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Blob {
    /// `pkcs11` or `tpm2`.
    pub device: String,
    /// The device's settings when it was wrapped (module, token and key
    /// labels; or TCTI and PCRs): a configuration that differs is wrapped
    /// again at the next unseal with shares.
    pub settings: String,
    /// The store it unseals, hex.
    pub store_id: String,
    /// PKCS#11: IV, hex.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub iv: String,
    /// PKCS#11: AES-GCM ciphertext and tag; TPM: the sealed object's
    /// private part (encrypted by the TPM's primary key). Base64.
    pub wrapped: String,
    /// TPM: the sealed object's public part, base64.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub public: String,
}

/// A configured auto-unseal device.
#[derive(Debug, Clone)]
pub struct AutoUnseal {
    cfg: SealConfig,
    blob_path: PathBuf,
}

type Res<T> = Result<T, String>;

impl AutoUnseal {
    /// The device of `[seal]`, or `None` for shares only.
    pub fn new(cfg: &SealConfig, data_dir: &Path) -> Option<AutoUnseal> {
        (!cfg.r#type.is_empty()).then(|| AutoUnseal {
            cfg: cfg.clone(),
            blob_path: data_dir.join(BLOB_FILE),
        })
    }

    /// `pkcs11` or `tpm2`.
    pub fn device(&self) -> &str {
        &self.cfg.r#type
    }

    /// What identifies the device's settings, for [`Blob::settings`].
    fn settings(&self) -> String {
        match self.device() {
            "pkcs11" => format!(
                "module={} token={} key={}",
                self.cfg.module.display(),
                self.cfg.token_label,
                self.cfg.key_label
            ),
            _ => format!("tcti={} pcrs={}", self.cfg.tcti, self.cfg.pcrs),
        }
    }

    /// The stored blob, if any.
    pub fn load(&self) -> Res<Option<Blob>> {
        let f = match std::fs::File::open(&self.blob_path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("reading {}: {e}", self.blob_path.display())),
        };
        let mut text = String::new();
        f.take(MAX_BLOB)
            .read_to_string(&mut text)
            .map_err(|e| format!("reading {}: {e}", self.blob_path.display()))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| format!("{} is damaged: {e}", self.blob_path.display()))
    }

    /// Whether the stored blob was made by this device with these
    /// settings for this store (else the next unseal with shares wraps
    /// the key again).
    pub fn current(&self, store_id: &str) -> bool {
        matches!(self.load(), Ok(Some(b)) if b.device == self.device()
            && b.settings == self.settings()
            && b.store_id == store_id)
    }

    /// Unwraps the stored unseal key with the device.
    pub fn unwrap(&self, store_id: &str) -> Res<UnsealKey> {
        let blob = self.load()?.ok_or_else(|| {
            format!(
                "no wrapped unseal key yet ({}): unseal once with the shares to wrap it",
                self.blob_path.display()
            )
        })?;
        if blob.store_id != store_id {
            return Err(format!(
                "{} belongs to another store ({}), not this one ({store_id})",
                self.blob_path.display(),
                blob.store_id
            ));
        }
        if blob.device != self.device() {
            return Err(format!(
                "the unseal key was wrapped by a {} device, and [seal] type is {}: unseal with the shares to wrap it again",
                blob.device,
                self.device()
            ));
        }
        let key = match self.device() {
            "pkcs11" => self.pkcs11_unwrap(&blob, store_id)?,
            _ => self.tpm2_unwrap(&blob)?,
        };
        UnsealKey::from_slice(&key)
            .map_err(|_| "the device gave back a key of the wrong length".into())
    }

    /// Wraps `key` with the device and stores the blob (0600, replaced
    /// atomically).
    pub fn wrap(&self, key: &UnsealKey, store_id: &str) -> Res<()> {
        let mut blob = Blob {
            device: self.device().into(),
            settings: self.settings(),
            store_id: store_id.into(),
            iv: String::new(),
            wrapped: String::new(),
            public: String::new(),
        };
        match self.device() {
            "pkcs11" => self.pkcs11_wrap(key, store_id, &mut blob)?,
            _ => self.tpm2_wrap(key, &mut blob)?,
        }
        let text = serde_json::to_string_pretty(&blob).map_err(|e| e.to_string())?;
        let tmp = self.blob_path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.blob_path)
        };
        write().map_err(|e| format!("writing {}: {e}", self.blob_path.display()))
    }

    /// Deletes the stored blob (zeroization).
    pub fn forget(&self) {
        let _ = std::fs::remove_file(&self.blob_path);
    }

    // ------------------------------------------------------------ PKCS#11

    fn pkcs11_session(
        &self,
        generate: bool,
    ) -> Res<(
        cryptoki::context::Pkcs11,
        cryptoki::session::Session,
        cryptoki::object::ObjectHandle,
    )> {
        use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
        use cryptoki::object::{Attribute, KeyType, ObjectClass};
        use cryptoki::session::UserType;
        use cryptoki::types::AuthPin;
        let c = &self.cfg;
        let p11 = Pkcs11::new(&c.module)
            .map_err(|e| format!("loading the PKCS#11 module {}: {e}", c.module.display()))?;
        p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .map_err(|e| format!("C_Initialize of {}: {e}", c.module.display()))?;
        let slot = p11
            .get_slots_with_token()
            .map_err(|e| format!("listing the module's slots: {e}"))?
            .into_iter()
            .find(|s| {
                p11.get_token_info(*s)
                    .is_ok_and(|t| t.label().trim_end() == c.token_label)
            })
            .ok_or_else(|| {
                format!(
                    "no token labelled {:?} in {}",
                    c.token_label,
                    c.module.display()
                )
            })?;
        let pin = std::fs::read_to_string(&c.pin_file)
            .map(zeroize::Zeroizing::new)
            .map_err(|e| format!("reading the token PIN from {}: {e}", c.pin_file.display()))?;
        let session = p11
            .open_rw_session(slot)
            .map_err(|e| format!("opening a session on token {:?}: {e}", c.token_label))?;
        session
            .login(
                UserType::User,
                Some(&AuthPin::from(pin.trim_end_matches('\n'))),
            )
            .map_err(|e| format!("logging in to token {:?}: {e}", c.token_label))?;
        let label = Attribute::Label(c.key_label.as_bytes().to_vec());
        let found = session
            .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY), label.clone()])
            .map_err(|e| format!("finding key {:?}: {e}", c.key_label))?;
        let key = match (found.first(), generate) {
            (Some(k), _) => *k,
            (None, true) => session
                .generate_key(
                    &cryptoki::mechanism::Mechanism::AesKeyGen,
                    &[
                        Attribute::Class(ObjectClass::SECRET_KEY),
                        Attribute::KeyType(KeyType::AES),
                        Attribute::ValueLen(32.into()),
                        Attribute::Token(true),
                        Attribute::Private(true),
                        Attribute::Sensitive(true),
                        Attribute::Extractable(false),
                        Attribute::Encrypt(true),
                        Attribute::Decrypt(true),
                        label,
                    ],
                )
                .map_err(|e| format!("generating key {:?} in the token: {e}", c.key_label))?,
            (None, false) => {
                return Err(format!(
                    "no key labelled {:?} in token {:?}",
                    c.key_label, c.token_label
                ));
            }
        };
        Ok((p11, session, key))
    }

    fn pkcs11_wrap(&self, key: &UnsealKey, store_id: &str, blob: &mut Blob) -> Res<()> {
        let (_p11, session, handle) = self.pkcs11_session(self.cfg.generate_key)?;
        let mut iv = [0u8; 12];
        getrandom::fill(&mut iv).map_err(|e| format!("no randomness: {e}"))?;
        let aad = [AAD, store_id.as_bytes()].concat();
        let params = cryptoki::mechanism::aead::GcmParams::new(&mut iv, &aad, 128.into())
            .map_err(|e| e.to_string())?;
        let ct = session
            .encrypt(
                &cryptoki::mechanism::Mechanism::AesGcm(params),
                handle,
                key.expose(),
            )
            .map_err(|e| format!("wrapping with key {:?}: {e}", self.cfg.key_label))?;
        blob.iv = hex::encode(iv);
        blob.wrapped = B64.encode(ct);
        Ok(())
    }

    fn pkcs11_unwrap(&self, blob: &Blob, store_id: &str) -> Res<zeroize::Zeroizing<Vec<u8>>> {
        let mut iv = hex::decode(&blob.iv).map_err(|_| "the blob's IV is damaged".to_string())?;
        let ct = B64
            .decode(&blob.wrapped)
            .map_err(|_| "the blob's ciphertext is damaged".to_string())?;
        let (_p11, session, handle) = self.pkcs11_session(false)?;
        let aad = [AAD, store_id.as_bytes()].concat();
        let params = cryptoki::mechanism::aead::GcmParams::new(&mut iv, &aad, 128.into())
            .map_err(|e| e.to_string())?;
        session
            .decrypt(&cryptoki::mechanism::Mechanism::AesGcm(params), handle, &ct)
            .map(zeroize::Zeroizing::new)
            .map_err(|e| format!("unwrapping with key {:?}: {e}", self.cfg.key_label))
    }

    // ------------------------------------------------------------ TPM 2.0

    /// Runs a tpm2-tools command against the configured TPM; `input` goes
    /// to its standard input, its standard output comes back.
    fn tpm2(&self, args: &[&str], input: Option<&[u8]>) -> Res<zeroize::Zeroizing<Vec<u8>>> {
        let mut cmd = Command::new(args[0]);
        cmd.args(&args[1..])
            .env("TPM2TOOLS_TCTI", &self.cfg.tcti)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("running {} (package tpm2-tools): {e}", args[0]))?;
        if let (Some(mut stdin), Some(data)) = (child.stdin.take(), input) {
            stdin
                .write_all(data)
                .map_err(|e| format!("{}: {e}", args[0]))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| format!("{}: {e}", args[0]))?;
        let stdout = zeroize::Zeroizing::new(out.stdout);
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let last = err
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("no message");
            return Err(format!(
                "{} failed on TPM {}: {last}",
                args[0], self.cfg.tcti
            ));
        }
        // Transient objects stay loaded on a TPM without a resource
        // manager (a simulator, /dev/tpm0): flush them after each step.
        // Behind one (/dev/tpmrm0, tabrmd) they go with the connection,
        // and other users' objects must not be touched.
        if self.cfg.tcti.contains("tpmrm") || self.cfg.tcti.starts_with("tabrmd") {
            return Ok(stdout);
        }
        let _ = Command::new("tpm2_flushcontext")
            .arg("-t")
            .env("TPM2TOOLS_TCTI", &self.cfg.tcti)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        Ok(stdout)
    }

    /// A private working directory for the TPM's context files (none holds
    /// a secret in clear: the sealed object's private part is encrypted by
    /// the primary key, which never leaves the TPM).
    fn tpm2_dir() -> Res<tempfile::TempDir> {
        tempfile::Builder::new()
            .prefix("tde-tpm2-")
            .tempdir()
            .map_err(|e| format!("a temporary directory for the TPM's files: {e}"))
    }

    fn tpm2_primary(&self, dir: &Path) -> Res<String> {
        let ctx = dir.join("primary.ctx").to_string_lossy().into_owned();
        // The same template every time: the same key, from the owner
        // hierarchy's seed, which never leaves the TPM.
        self.tpm2(
            &[
                "tpm2_createprimary",
                "-Q",
                "-C",
                "o",
                "-g",
                "sha256",
                "-G",
                "ecc",
                "-c",
                &ctx,
            ],
            None,
        )?;
        Ok(ctx)
    }

    fn tpm2_wrap(&self, key: &UnsealKey, blob: &mut Blob) -> Res<()> {
        let dir = Self::tpm2_dir()?;
        let primary = self.tpm2_primary(dir.path())?;
        let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
        let (public, private, policy) = (p("seal.pub"), p("seal.priv"), p("policy.dat"));
        let mut args = vec![
            "tpm2_create",
            "-Q",
            "-C",
            &primary,
            "-g",
            "sha256",
            "-u",
            &public,
            "-r",
            &private,
            "-i",
            "-",
        ];
        if !self.cfg.pcrs.is_empty() {
            self.tpm2(
                &[
                    "tpm2_createpolicy",
                    "-Q",
                    "--policy-pcr",
                    "-l",
                    &self.cfg.pcrs,
                    "-L",
                    &policy,
                ],
                None,
            )?;
            args.extend(["-L", &policy, "-a", "fixedtpm|fixedparent|noda"]);
        }
        self.tpm2(&args, Some(key.expose()))?;
        let read = |f: &str| std::fs::read(f).map_err(|e| format!("reading {f}: {e}"));
        blob.public = B64.encode(read(&public)?);
        blob.wrapped = B64.encode(read(&private)?);
        Ok(())
    }

    fn tpm2_unwrap(&self, blob: &Blob) -> Res<zeroize::Zeroizing<Vec<u8>>> {
        let dir = Self::tpm2_dir()?;
        let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
        let (public, private, object) = (p("seal.pub"), p("seal.priv"), p("seal.ctx"));
        let decode = |s: &str| B64.decode(s).map_err(|_| "the blob is damaged".to_string());
        std::fs::write(&public, decode(&blob.public)?).map_err(|e| e.to_string())?;
        std::fs::write(&private, decode(&blob.wrapped)?).map_err(|e| e.to_string())?;
        let primary = self.tpm2_primary(dir.path())?;
        self.tpm2(
            &[
                "tpm2_load",
                "-Q",
                "-C",
                &primary,
                "-u",
                &public,
                "-r",
                &private,
                "-c",
                &object,
            ],
            None,
        )?;
        let auth = format!("pcr:{}", self.cfg.pcrs);
        let mut args = vec!["tpm2_unseal", "-c", &object];
        if !self.cfg.pcrs.is_empty() {
            args.extend(["-p", &auth]);
        }
        let key = self.tpm2(&args, None)?;
        if key.len() != KEY_LEN {
            return Err("the TPM gave back a key of the wrong length".into());
        }
        Ok(key)
    }
}

// ---------------------------------------------------------------- daemon

use std::sync::atomic::Ordering;

use crate::audit::AuditRecord;
use crate::handler::Service;

impl Service {
    /// Unseals with the auto-unseal device, when one is configured and the
    /// HSM is sealed; audits the outcome (a failure once per reason: the
    /// daemon retries until it is unsealed). True if it unsealed.
    pub fn auto_unseal_now(&self) -> bool {
        let Some(a) = &self.auto_unseal else {
            return false;
        };
        let st = self.hsm.status();
        if !st.initialized || !st.sealed || st.zeroized {
            *lock(&self.auto_unseal_error) = None;
            return false;
        }
        let store = hex::encode(st.store_id);
        let r = a.unwrap(&store).and_then(|key| {
            self.hsm.unseal_with_key(&key).map_err(|e| {
                format!(
                    "the {} device's key does not open this store: {e}",
                    a.device()
                )
            })
        });
        let mut rec = AuditRecord::new("internal", "auto_unseal");
        let mut last = lock(&self.auto_unseal_error);
        match r {
            Ok(_) => {
                tracing::info!(device = a.device(), "auto-unsealed");
                rec.detail = Some(format!("unsealed by the {} device", a.device()));
                *last = None;
                self.revoking.store(false, Ordering::SeqCst);
            }
            Err(why) => {
                tracing::error!(
                    device = a.device(),
                    %why,
                    "auto-unseal failed: the sidecar stays sealed (retrying every 10 s); the recovery shares unseal it (`tde unseal`)"
                );
                if last.as_deref() == Some(why.as_str()) {
                    return false;
                }
                rec.result = "error";
                rec.detail = Some(why.clone());
                *last = Some(why);
            }
        }
        drop(last);
        if let Err(e) = self.audit.append(rec) {
            tracing::error!(error = %e, "the auto-unseal could not be audited");
        }
        self.drain_events();
        !self.hsm.status().sealed
    }

    /// After an unseal with shares (or a re-split, `always`): wraps the
    /// unseal key with the device unless the stored one is current. Gives
    /// the audit record's words for it.
    pub fn auto_wrap(&self, key: &UnsealKey, store_id: &[u8], always: bool) -> Option<String> {
        let a = self.auto_unseal.as_ref()?;
        let store = hex::encode(store_id);
        if !always && a.current(&store) {
            return None;
        }
        Some(match a.wrap(key, &store) {
            Ok(()) => {
                tracing::info!(
                    device = a.device(),
                    "the unseal key is wrapped for auto-unseal; the shares are now recovery shares"
                );
                format!(
                    "auto-unseal: the unseal key is wrapped by the {} device",
                    a.device()
                )
            }
            Err(why) => {
                tracing::error!(device = a.device(), %why, "the unseal key could not be wrapped for auto-unseal");
                if always {
                    // The old blob names a key that no longer opens the
                    // store: gone, so that the next start says so plainly.
                    a.forget();
                }
                format!("auto-unseal: the unseal key could not be wrapped: {why}")
            }
        })
    }

    /// Unsealed by shares: no auto-unseal failure to report or retry.
    pub fn auto_unseal_settled(&self) {
        *lock(&self.auto_unseal_error) = None;
    }

    /// The service manager's and `/health`'s words while auto-unseal fails.
    pub fn auto_unseal_failure(&self) -> Option<String> {
        lock(&self.auto_unseal_error).clone()
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
