//! The HSM: seal state, master keys and operators in memory, persisted as
//! sealed objects through an [`ObjectStore`].
//!
//! Locking: one `RwLock` over the state. Data-key operations take it shared
//! and touch no storage; administrative operations take it exclusively, seal
//! the changed record, write it through the store, and only then change
//! memory, so a failed write leaves both unchanged.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::audit_key::{self, AuditKeyRecord, AuditKeyVersion, AuditPublicKey, AuditSignature};
use crate::error::HsmError;
use crate::manifest::{self, Manifest};
use crate::mek::{MekRecord, MekVersion, VersionState, validate_name};
use crate::operator::{self, MAX_FAILED_LOGINS, OperatorRecord, Role};
use crate::random;
use crate::seal::{self, RootFormat, STORE_ID_LEN, Sealer, Share, StoreId};
use crate::secret::{DataKey, MasterKeyMaterial, RootKey, SecretBuf, UnsealKey};
use crate::store::{
    KIND_AUDIT_KEY, KIND_MANIFEST, KIND_MASTER_KEY, KIND_OPERATOR, ObjectStore, StoreMeta, StoreOp,
    StoredObject,
};
use crate::wrap::{self, Context, VersionKeys, WrappedKey};

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What the tamper response does (see `docs/THREAT-MODEL.md`).
#[derive(Debug, Clone, Copy, Default)]
pub struct TamperPolicy {
    /// Zeroize when an operator is locked out by failed logins.
    pub zeroize_on_lockout: bool,
    /// Zeroize when a store object fails authentication at unseal.
    pub zeroize_on_store_tamper: bool,
}

/// Something the HSM did on its own that must be audited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HsmEvent {
    /// A store object failed authentication.
    TamperDetected {
        /// `master_key`, `operator`, `manifest` or `unknown`.
        kind: &'static str,
        /// Object id.
        id: String,
        /// What is wrong with it (no contents).
        why: String,
    },
    /// An operator was locked by failed logins.
    OperatorLocked(String),
    /// The tamper response zeroized the HSM.
    TamperZeroized(&'static str),
    /// A scheduled destruction took effect.
    VersionDestroyed {
        /// Key.
        key: String,
        /// Version.
        version: u32,
    },
    /// A store from before manifests got one (and a v2 root), with this
    /// many objects. Expected once per store; another one means someone
    /// put back an old root (see THREAT-MODEL.md).
    StoreUpgraded(usize),
    /// The audit signing key got a version: its first at the first unseal
    /// of a store that had none.
    AuditKeyCreated(u32),
    /// The rotation policy made a new primary version.
    AutoRotated {
        /// Key.
        key: String,
        /// The new primary version.
        version: u32,
    },
}

/// Public seal status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// A store exists.
    pub initialized: bool,
    /// Keys not in memory.
    pub sealed: bool,
    /// Root material destroyed.
    pub zeroized: bool,
    /// Shares needed.
    pub threshold: u8,
    /// Shares issued.
    pub shares: u8,
    /// Shares given toward the next unseal.
    pub progress: u8,
    /// Dev mode.
    pub dev: bool,
    /// Master keys (0 while sealed).
    pub key_count: usize,
    /// The store's random id (zero before `init`): not secret, it names
    /// the store (a PKCS#11 token's serial number).
    pub store_id: StoreId,
}

/// A master key version as shown to operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    /// Number.
    pub version: u32,
    /// State.
    pub state: VersionState,
    /// Unix seconds.
    pub created: u64,
    /// Pending destruction time.
    pub destroy_at: Option<u64>,
}

/// A master key as shown to operators: metadata, never material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// Name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// Unix seconds.
    pub created: u64,
    /// Primary version.
    pub primary: u32,
    /// The stored object failed authentication; no operation works on it.
    pub tampered: bool,
    /// Versions.
    pub versions: Vec<VersionInfo>,
    /// Automatic rotation period in seconds (0: off).
    pub rotate_after: u64,
    /// The operator that created it (empty for keys made before owners).
    pub owner: String,
    /// Crypto users that may use it (see [`Caller::User`]).
    pub shared_with: Vec<String>,
}

/// Who asks for a data-key operation.
#[derive(Debug, Clone, Copy)]
pub enum Caller<'a> {
    /// A data-socket client, already authorized by the sidecar's client
    /// policy (peer uid and gid, key patterns, context).
    Client,
    /// A logged-in crypto user: the key must be shared with it (as keys are
    /// with CloudHSM crypto users), and it must be an unlocked crypto user.
    User(&'a OperatorSession),
}

/// A logged-in operator: what [`Hsm::login`] gives and what every
/// administrative operation takes. Only the HSM makes one (its fields are
/// private). It is good while the HSM stays unsealed since the login and
/// the operator stays unlocked: a seal, a zeroization or a lockout ends it.
/// Every use checks the role against [`Permission::roles`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorSession {
    name: String,
    role: Role,
    /// The unseal it was made under.
    epoch: u64,
    /// The operator's login generation at login: a password change, a
    /// lockout or a removal moves it on, and so ends the session.
    generation: u64,
}

impl OperatorSession {
    /// The operator's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The operator's role.
    pub fn role(&self) -> Role {
        self.role
    }
}

/// What an administrative operation needs; the HSM's one table of which
/// role may do what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// Seal, or zeroize an unsealed HSM.
    Seal,
    /// Add and unlock operators, set others' passwords.
    ManageOperators,
    /// List operators, list and describe master keys.
    Read,
    /// Create, rotate, disable, enable, destroy, share master keys.
    ManageKeys,
    /// Use master keys shared with the operator (data-key operations).
    UseKeys,
    /// Reload the daemon's configuration (client policies, limits, logs).
    Configure,
    /// Start or cancel a re-split of the unseal shares.
    Custody,
    /// Approve another officer's destructive request (dual control).
    Approve,
    /// List and export the audit log, read its public keys.
    ReadAudit,
    /// Delete exported audit records (the auditor's alone: whoever manages
    /// keys cannot remove the evidence of it).
    PruneAudit,
}

impl Permission {
    /// The roles that have it.
    pub fn roles(self) -> &'static [Role] {
        match self {
            Permission::Seal
            | Permission::ManageOperators
            | Permission::ManageKeys
            | Permission::Configure
            | Permission::Custody
            | Permission::Approve => &[Role::CryptoOfficer],
            Permission::Read | Permission::ReadAudit => &[Role::CryptoOfficer, Role::Auditor],
            Permission::UseKeys => &[Role::CryptoUser],
            Permission::PruneAudit => &[Role::Auditor],
        }
    }

    fn what(self) -> &'static str {
        match self {
            Permission::Seal => "seal or zeroize the HSM",
            Permission::ManageOperators => "manage operators",
            Permission::Read => "read operators and master keys",
            Permission::ManageKeys => "manage master keys",
            Permission::UseKeys => "use master keys",
            Permission::Configure => "reload the configuration",
            Permission::Custody => "re-split the unseal shares",
            Permission::Approve => "approve requests",
            Permission::ReadAudit => "read the audit log",
            Permission::PruneAudit => "prune the audit log",
        }
    }
}

/// An operator as shown to officers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorInfo {
    /// Name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Locked.
    pub locked: bool,
    /// Consecutive failed logins.
    pub failed_logins: u32,
}

/// A freshly generated data key.
#[derive(Debug)]
pub struct GeneratedDataKey {
    /// Master key version that wrapped it.
    pub version: u32,
    /// The plaintext data key.
    pub plaintext: DataKey,
    /// The wrapped blob.
    pub ciphertext: Vec<u8>,
}

/// Which versions an operation applies to.
#[derive(Debug, Clone, Copy)]
pub enum Versions {
    /// One version.
    One(u32),
    /// Every version (the whole key).
    All,
}

impl From<Option<u32>> for Versions {
    fn from(v: Option<u32>) -> Self {
        v.map_or(Versions::All, Versions::One)
    }
}

struct KeyEntry {
    record: MekRecord,
    revision: u64,
    derived: HashMap<u32, VersionKeys>,
}

impl KeyEntry {
    /// Builds the entry, deriving the keys of each version with material;
    /// keys already derived in `reuse` (from the previous revision) are moved
    /// over instead of derived again.
    fn new(
        record: MekRecord,
        revision: u64,
        mut reuse: HashMap<u32, VersionKeys>,
    ) -> Result<Self, HsmError> {
        let mut derived = HashMap::new();
        for v in &record.versions {
            if let Some(m) = &v.material {
                let keys = match reuse.remove(&v.version) {
                    Some(k) => k,
                    None => VersionKeys::derive(m, &record.name, v.version)?,
                };
                derived.insert(v.version, keys);
            }
        }
        Ok(Self {
            record,
            revision,
            derived,
        })
    }

    fn info(&self) -> KeyInfo {
        let r = &self.record;
        KeyInfo {
            name: r.name.clone(),
            description: r.description.clone(),
            created: r.created,
            primary: r.primary,
            tampered: false,
            rotate_after: r.rotate_after,
            owner: r.owner.clone(),
            shared_with: r.users.clone(),
            versions: r
                .versions
                .iter()
                .map(|v| VersionInfo {
                    version: v.version,
                    state: v.state,
                    created: v.created,
                    destroy_at: v.destroy_at,
                })
                .collect(),
        }
    }

    /// The derived keys of a usable version, or why it is not usable.
    fn usable(&self, version: u32) -> Result<&VersionKeys, HsmError> {
        let key = &self.record.name;
        let v = self
            .record
            .version(version)
            .ok_or_else(|| HsmError::KeyNotFound(format!("{key} version {version}")))?;
        let err = |k: fn(String, u32) -> HsmError| Err(k(key.clone(), version));
        match v.state {
            VersionState::Enabled => {}
            VersionState::Disabled => {
                return err(|key, version| HsmError::KeyDisabled { key, version });
            }
            VersionState::PendingDestruction => {
                return err(|key, version| HsmError::KeyPendingDestruction { key, version });
            }
            VersionState::Destroyed => {
                return err(|key, version| HsmError::KeyDestroyed { key, version });
            }
        }
        self.derived
            .get(&version)
            .ok_or(HsmError::Internal("enabled version without material"))
    }
}

struct Unsealed {
    /// Sessions made under another unseal are void.
    epoch: u64,
    sealer: Sealer,
    /// The current revision of every object, as last written.
    manifest: Manifest,
    keys: BTreeMap<String, KeyEntry>,
    operators: BTreeMap<String, (OperatorRecord, u64)>,
    tampered_keys: BTreeSet<String>,
    tampered_operators: BTreeSet<String>,
    /// The audit signing key and its revision (`None` if it is missing or
    /// failed authentication).
    audit_key: Option<(AuditKeyRecord, u64)>,
    tampered_audit_key: bool,
    /// Login generations (0 when never moved on); see
    /// [`OperatorSession`]. In memory: a seal ends every session anyway.
    generations: BTreeMap<String, u64>,
    /// PKCS#11 objects by id; see [`p11`].
    p11: BTreeMap<u64, p11::Slot>,
    tampered_p11: BTreeSet<String>,
}

enum State {
    Uninitialized,
    Sealed(StoreMeta),
    Unsealed(StoreMeta, Box<Unsealed>),
    Zeroized(StoreMeta),
}

/// Output of [`Hsm::init`].
#[derive(Debug)]
pub struct InitOutput {
    /// The shares in text form; shown once, never stored.
    pub shares: Vec<SecretBuf>,
    /// Threshold.
    pub threshold: u8,
}

/// The software HSM.
pub struct Hsm {
    store: Arc<dyn ObjectStore>,
    policy: TamperPolicy,
    state: RwLock<State>,
    pending: Mutex<Vec<Share>>,
    /// A re-split of the unseal shares in progress.
    resplit: Mutex<Option<Resplit>>,
    events: Mutex<Vec<HsmEvent>>,
    /// One lock per operator name, held across a login's password check,
    /// so an operator's attempts are checked and counted one at a time.
    logins: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Numbers the unseals; see [`OperatorSession`].
    epochs: AtomicU64,
}

impl std::fmt::Debug for Hsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hsm").finish_non_exhaustive()
    }
}

/// A re-split of the unseal shares (Vault's `operator rekey`): started by
/// an officer with the new parameters, approved by a threshold of the
/// current shares, then the root is sealed under a new unseal key split
/// anew. No master key is touched.
struct Resplit {
    nonce: String,
    threshold: u8,
    shares: u8,
    given: Vec<Share>,
    started: u64,
}

/// How long a re-split waits for its shares.
pub const RESPLIT_TIMEOUT_SECS: u64 = 3600;

/// Where a re-split stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResplitStatus {
    /// Names the attempt: every share given must name it.
    pub nonce: String,
    /// Current shares given so far.
    pub progress: u8,
    /// Current shares needed.
    pub needed: u8,
    /// The new threshold.
    pub threshold: u8,
    /// The new number of shares.
    pub shares: u8,
    /// Unix seconds when it started.
    pub started: u64,
}

/// What a share given to a re-split gives back.
#[derive(Debug)]
pub enum ResplitProgress {
    /// More shares are needed.
    Waiting(ResplitStatus),
    /// Done: the new shares (text form), shown once. The old ones are void.
    Done {
        /// The new threshold.
        threshold: u8,
        /// The new shares.
        shares: Vec<SecretBuf>,
        /// The new unseal key (for the daemon to wrap it with an
        /// auto-unseal device); dropped, and zeroized, right after.
        unseal_key: UnsealKey,
    },
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Hsm {
    /// Initializes a new store: a random unseal key split into `count`
    /// shares (threshold `threshold`), a random root key sealed under it, and
    /// a first crypto officer. `dev` marks the single-share dev mode.
    pub fn init(
        store: &dyn ObjectStore,
        threshold: u8,
        count: u8,
        dev: bool,
        officer: &str,
        password: &[u8],
    ) -> Result<InitOutput, HsmError> {
        if store.meta()?.is_some() {
            return Err(HsmError::AlreadyInitialized);
        }
        validate_name("operator", officer)?;
        let mut store_id = [0u8; STORE_ID_LEN];
        random::fill(&mut store_id)?;
        let unseal = UnsealKey::generate()?;
        let shares = seal::split(&unseal, &store_id, threshold, count)?;
        let root = RootKey::generate()?;
        let sealed_root = seal::seal_root(&unseal, &root, &store_id)?;
        let sealer = Sealer::new(&root, &store_id)?;
        let op = OperatorRecord {
            name: officer.to_string(),
            role: Role::CryptoOfficer,
            password_hash: operator::hash_password(password)?,
            failed_logins: 0,
            locked: false,
        };
        let blob = sealer.seal(KIND_OPERATOR, officer, 1, op.encode().expose())?;
        let list = Manifest::default().with(KIND_OPERATOR, officer, 1);
        let list_blob = sealer.seal(KIND_MANIFEST, manifest::ID, list.revision, &list.encode())?;
        let meta = StoreMeta {
            store_id,
            threshold,
            shares: count,
            dev,
            zeroized: false,
            created: now(),
        };
        store.initialize(
            &meta,
            &sealed_root,
            &[
                StoredObject {
                    kind: KIND_OPERATOR,
                    id: officer.to_string(),
                    revision: 1,
                    blob,
                },
                StoredObject {
                    kind: KIND_MANIFEST,
                    id: manifest::ID.to_string(),
                    revision: list.revision,
                    blob: list_blob,
                },
            ],
        )?;
        Ok(InitOutput {
            shares: shares.iter().map(Share::to_text).collect(),
            threshold,
        })
    }

    /// Opens the HSM over a store; it starts sealed.
    pub fn open(store: Arc<dyn ObjectStore>, policy: TamperPolicy) -> Result<Hsm, HsmError> {
        let state = match store.meta()? {
            None => State::Uninitialized,
            Some(m) if m.zeroized => State::Zeroized(m),
            Some(m) => State::Sealed(m),
        };
        Ok(Hsm {
            store,
            policy,
            state: RwLock::new(state),
            pending: Mutex::new(Vec::new()),
            resplit: Mutex::new(None),
            events: Mutex::new(Vec::new()),
            logins: Mutex::default(),
            epochs: AtomicU64::new(1),
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    fn event(&self, e: HsmEvent) {
        lock(&self.events).push(e);
    }

    /// Takes the events recorded since the last call.
    pub fn take_events(&self) -> Vec<HsmEvent> {
        std::mem::take(&mut *lock(&self.events))
    }

    /// The seal status.
    pub fn status(&self) -> Status {
        let progress = u8::try_from(lock(&self.pending).len()).unwrap_or(u8::MAX);
        match &*self.read() {
            State::Uninitialized => Status {
                sealed: true,
                ..Status::default()
            },
            State::Sealed(m) | State::Zeroized(m) => Status {
                initialized: true,
                sealed: true,
                zeroized: m.zeroized,
                threshold: m.threshold,
                shares: m.shares,
                progress,
                dev: m.dev,
                key_count: 0,
                store_id: m.store_id,
            },
            State::Unsealed(m, u) => Status {
                initialized: true,
                sealed: false,
                zeroized: false,
                threshold: m.threshold,
                shares: m.shares,
                progress: 0,
                dev: m.dev,
                key_count: u.keys.len() + u.tampered_keys.len(),
                store_id: m.store_id,
            },
        }
    }

    fn unsealed(state: &State) -> Result<&Unsealed, HsmError> {
        match state {
            State::Unsealed(_, u) => Ok(u),
            State::Uninitialized => Err(HsmError::NotInitialized),
            State::Sealed(_) => Err(HsmError::Sealed),
            State::Zeroized(_) => Err(HsmError::Zeroized),
        }
    }

    fn unsealed_mut(state: &mut State) -> Result<&mut Unsealed, HsmError> {
        match state {
            State::Unsealed(_, u) => Ok(u),
            State::Uninitialized => Err(HsmError::NotInitialized),
            State::Sealed(_) => Err(HsmError::Sealed),
            State::Zeroized(_) => Err(HsmError::Zeroized),
        }
    }

    /// Gives one unseal share. Unseals once `threshold` distinct shares are
    /// in. A share already given is ignored. When the shares combine to a
    /// wrong key, progress resets and `UnsealFailed` is returned.
    pub fn unseal(&self, share_text: &[u8]) -> Result<Status, HsmError> {
        self.unseal_share(share_text).map(|(status, _)| status)
    }

    /// [`Hsm::unseal`], also giving the unseal key when this share
    /// completed a successful unseal (for the daemon to wrap it with an
    /// auto-unseal device). The caller drops it as soon as it is wrapped.
    pub fn unseal_share(&self, share_text: &[u8]) -> Result<(Status, Option<UnsealKey>), HsmError> {
        let share = Share::parse(share_text)?;
        let st = self.write();
        let meta = match &*st {
            State::Unsealed(..) => {
                drop(st);
                return Ok((self.status(), None));
            }
            State::Uninitialized => return Err(HsmError::NotInitialized),
            State::Zeroized(_) => return Err(HsmError::Zeroized),
            State::Sealed(m) => m.clone(),
        };
        Self::check_share_set(&share, &meta)?;
        {
            let mut pending = lock(&self.pending);
            if pending.iter().any(|s| s.x == share.x) {
                return Err(HsmError::InvalidShare(format!(
                    "share {} was already given in this unseal (progress stays {}/{}): \
                     another custodian's share is needed",
                    share.x,
                    pending.len(),
                    meta.threshold
                )));
            }
            pending.push(share);
            if pending.len() < usize::from(meta.threshold) {
                drop(pending);
                drop(st);
                return Ok((self.status(), None));
            }
        }
        let shares = std::mem::take(&mut *lock(&self.pending));
        let unseal = seal::combine(&shares)?;
        let status = self.open_with(st, meta, &unseal)?;
        Ok((status, Some(unseal)))
    }

    /// Unseals with the unseal key itself, as an auto-unseal device gives
    /// it back. A wrong key fails (`UnsealFailed`) and changes nothing.
    pub fn unseal_with_key(&self, unseal: &UnsealKey) -> Result<Status, HsmError> {
        let st = self.write();
        let meta = match &*st {
            State::Unsealed(..) => {
                drop(st);
                return Ok(self.status());
            }
            State::Uninitialized => return Err(HsmError::NotInitialized),
            State::Zeroized(_) => return Err(HsmError::Zeroized),
            State::Sealed(m) => m.clone(),
        };
        self.open_with(st, meta, unseal)
    }

    /// Opens the sealed root with `unseal` and loads every object.
    fn open_with(
        &self,
        mut st: RwLockWriteGuard<'_, State>,
        meta: StoreMeta,
        unseal: &UnsealKey,
    ) -> Result<Status, HsmError> {
        let sealed_root = self.store.sealed_root()?.ok_or(HsmError::Zeroized)?;
        let (root, format) = seal::open_root(unseal, &sealed_root, &meta.store_id)?;
        let sealer = Sealer::new(&root, &meta.store_id)?;
        let (lists, objects): (Vec<_>, Vec<_>) = self
            .store
            .objects()?
            .into_iter()
            .partition(|o| o.kind == KIND_MANIFEST && o.id == manifest::ID);
        let list = lists.first().and_then(|o| {
            let pt = sealer.open(o.kind, &o.id, o.revision, &o.blob)?;
            Manifest::decode(pt.expose())
                .ok()
                .filter(|m| m.revision == o.revision)
        });
        let mut u = Unsealed {
            epoch: self.epochs.fetch_add(1, Ordering::SeqCst),
            sealer,
            manifest: list.clone().unwrap_or_default(),
            keys: BTreeMap::new(),
            operators: BTreeMap::new(),
            tampered_keys: BTreeSet::new(),
            tampered_operators: BTreeSet::new(),
            audit_key: None,
            tampered_audit_key: false,
            generations: BTreeMap::new(),
            p11: BTreeMap::new(),
            tampered_p11: BTreeSet::new(),
        };
        match (list, format) {
            (Some(list), _) => {
                // Each object must be the revision the manifest names, and
                // each name in it must have its object.
                let mut bad = BTreeSet::new();
                for (at, why) in
                    list.check(objects.iter().map(|o| (o.kind, o.id.as_str(), o.revision)))
                {
                    self.mark_tampered(&mut u, at.0, &at.1, why.describe());
                    bad.insert(at);
                }
                for obj in objects {
                    if !bad.contains(&(obj.kind, obj.id.clone())) {
                        self.load_object(&mut u, obj);
                    }
                }
            }
            (None, RootFormat::V2) => {
                // The root says this store has a manifest: without it (or
                // with a forged one) no object's revision can be trusted.
                let why = if lists.is_empty() {
                    "the store manifest is missing"
                } else {
                    "the store manifest failed authentication"
                };
                self.mark_tampered(&mut u, KIND_MANIFEST, manifest::ID, why.into());
                for obj in objects {
                    self.mark_tampered(&mut u, obj.kind, &obj.id, why.into());
                }
            }
            (None, RootFormat::V1) => {
                // A store made before manifests: its objects as they are
                // now become the first manifest, and the root is resealed
                // as V2 in the same transaction, so from now on a missing
                // manifest is tampering.
                for obj in objects {
                    self.load_object(&mut u, obj);
                }
                let mut list = Manifest::default();
                for (name, e) in &u.keys {
                    list.entries
                        .insert((KIND_MASTER_KEY, name.clone()), e.revision);
                }
                for (name, (_, rev)) in &u.operators {
                    list.entries.insert((KIND_OPERATOR, name.clone()), *rev);
                }
                if let Some((_, rev)) = &u.audit_key {
                    list.entries
                        .insert((KIND_AUDIT_KEY, audit_key::ID.to_string()), *rev);
                }
                list.revision = 1;
                let blob =
                    u.sealer
                        .seal(KIND_MANIFEST, manifest::ID, list.revision, &list.encode())?;
                let root_v2 = seal::seal_root(unseal, &root, &meta.store_id)?;
                self.store.apply(&[
                    Self::put_op(KIND_MANIFEST, manifest::ID, list.revision, blob),
                    StoreOp::Root(root_v2),
                ])?;
                self.event(HsmEvent::StoreUpgraded(list.entries.len()));
                u.manifest = list;
            }
        }
        if u.audit_key.is_none() && !u.tampered_audit_key {
            // A store made before audit signing: its first version now. If
            // the write fails, the next unseal tries again; until then
            // checkpoints cannot be signed (and say so).
            match self.create_audit_key(&mut u) {
                Ok(v) => self.event(HsmEvent::AuditKeyCreated(v)),
                Err(e) => self.event(HsmEvent::TamperDetected {
                    kind: "audit_key",
                    id: audit_key::ID.into(),
                    why: format!("could not be created: {e}"),
                }),
            }
        }
        let tampered = !u.tampered_keys.is_empty()
            || !u.tampered_operators.is_empty()
            || !u.tampered_p11.is_empty()
            || u.tampered_audit_key;
        *st = State::Unsealed(meta, Box::new(u));
        drop(st);
        if tampered && self.policy.zeroize_on_store_tamper {
            self.zeroize_for("a key store object failed authentication")?;
        }
        Ok(self.status())
    }

    fn load_object(&self, u: &mut Unsealed, obj: StoredObject) {
        let opened = u.sealer.open(obj.kind, &obj.id, obj.revision, &obj.blob);
        match obj.kind {
            KIND_MASTER_KEY => {
                let entry = opened
                    .and_then(|pt| MekRecord::decode(pt.expose()).ok())
                    .filter(|r| r.name == obj.id)
                    .and_then(|r| KeyEntry::new(r, obj.revision, HashMap::new()).ok());
                match entry {
                    Some(e) => {
                        u.keys.insert(obj.id, e);
                    }
                    None => {
                        self.mark_tampered(u, obj.kind, &obj.id, "failed authentication".into())
                    }
                }
            }
            p11::KIND_P11_OBJECT => {
                drop(opened);
                self.load_p11(u, &obj);
            }
            KIND_AUDIT_KEY => {
                let rec = opened
                    .and_then(|pt| AuditKeyRecord::decode(pt.expose()).ok())
                    .filter(|_| obj.id == audit_key::ID);
                match rec {
                    Some(r) => u.audit_key = Some((r, obj.revision)),
                    None => {
                        self.mark_tampered(u, obj.kind, &obj.id, "failed authentication".into())
                    }
                }
            }
            _ => {
                let rec = opened
                    .and_then(|pt| OperatorRecord::decode(pt.expose()).ok())
                    .filter(|r| r.name == obj.id && obj.kind == KIND_OPERATOR);
                match rec {
                    Some(r) => {
                        u.operators.insert(obj.id, (r, obj.revision));
                    }
                    None => {
                        self.mark_tampered(u, obj.kind, &obj.id, "failed authentication".into())
                    }
                }
            }
        }
    }

    /// Marks one object tampered (once) and records the event. A key or
    /// operator marked so answers `TAMPERED` until the store is repaired.
    fn mark_tampered(&self, u: &mut Unsealed, kind: u8, id: &str, why: String) {
        let (name, fresh) = match kind {
            KIND_MASTER_KEY => ("master_key", u.tampered_keys.insert(id.to_string())),
            KIND_OPERATOR => ("operator", u.tampered_operators.insert(id.to_string())),
            KIND_MANIFEST => ("manifest", true),
            KIND_AUDIT_KEY => (
                "audit_key",
                !std::mem::replace(&mut u.tampered_audit_key, true),
            ),
            p11::KIND_P11_OBJECT => ("pkcs11_object", u.tampered_p11.insert(id.to_string())),
            _ => ("unknown", true),
        };
        if fresh {
            self.event(HsmEvent::TamperDetected {
                kind: name,
                id: id.to_string(),
                why,
            });
        }
    }

    /// Seals for an officer: drops every key from memory (zeroized on
    /// drop), forgets partial unseal progress, and ends every session.
    pub fn seal(&self, by: &OperatorSession) -> Result<(), HsmError> {
        self.authorize(by, Permission::Seal)?;
        self.close()
    }

    /// Seals because the process is stopping (the daemon's own shutdown,
    /// not an operator's request).
    pub fn close(&self) -> Result<(), HsmError> {
        let mut st = self.write();
        lock(&self.pending).clear();
        let next = match &*st {
            State::Unsealed(m, _) | State::Sealed(m) => State::Sealed(m.clone()),
            State::Uninitialized => return Err(HsmError::NotInitialized),
            State::Zeroized(_) => return Err(HsmError::Zeroized),
        };
        *st = next;
        Ok(())
    }

    /// Zeroizes: wipes memory and destroys the sealed root and every object
    /// in the store. Irreversible. An unsealed HSM needs an officer's
    /// session; a sealed one cannot check logins, so whoever reaches the
    /// HSM (the sidecar's admin socket, mode 0600) is the authority, as
    /// physical access is for a hardware HSM.
    pub fn zeroize(&self, by: Option<&OperatorSession>) -> Result<(), HsmError> {
        if matches!(&*self.read(), State::Unsealed(..)) {
            let by = by.ok_or(HsmError::NotAuthenticated(
                "zeroizing an unsealed HSM needs an officer's login",
            ))?;
            self.authorize(by, Permission::Seal)?;
        }
        self.wipe()
    }

    fn wipe(&self) -> Result<(), HsmError> {
        let mut st = self.write();
        lock(&self.pending).clear();
        let meta = match &*st {
            State::Uninitialized => return Err(HsmError::NotInitialized),
            State::Unsealed(m, _) | State::Sealed(m) | State::Zeroized(m) => m.clone(),
        };
        // Memory first: even if the store write fails, no key stays usable.
        *st = State::Zeroized(StoreMeta {
            zeroized: true,
            ..meta
        });
        self.store.zeroize()?;
        Ok(())
    }

    fn zeroize_for(&self, why: &'static str) -> Result<(), HsmError> {
        self.wipe()?;
        self.event(HsmEvent::TamperZeroized(why));
        Ok(())
    }

    /// Refuses unless `by` is a live session (this unseal, an unlocked
    /// operator of the same role) whose role has `need`.
    pub fn authorize(&self, by: &OperatorSession, need: Permission) -> Result<(), HsmError> {
        let st = self.read();
        Self::check_session(Self::unsealed(&st)?, by, need)
    }

    /// Refuses unless `by` is a live session, whatever its role (a token
    /// login checks that what it stands for has not ended).
    pub fn check_login(&self, by: &OperatorSession) -> Result<(), HsmError> {
        let st = self.read();
        Self::check_live(Self::unsealed(&st)?, by)
    }

    fn check_session(u: &Unsealed, by: &OperatorSession, need: Permission) -> Result<(), HsmError> {
        Self::check_live(u, by)?;
        if need.roles().contains(&by.role) {
            Ok(())
        } else {
            Err(HsmError::PermissionDenied(format!(
                "role {} may not {}",
                by.role.name(),
                need.what()
            )))
        }
    }

    /// A session of this unseal, of an operator that still exists with the
    /// same role and is not locked.
    fn check_live(u: &Unsealed, by: &OperatorSession) -> Result<(), HsmError> {
        if by.epoch != u.epoch {
            return Err(HsmError::NotAuthenticated(
                "the login ended when the HSM was sealed; log in again",
            ));
        }
        if u.tampered_operators.contains(&by.name) {
            return Err(HsmError::Tampered(format!("operator {}", by.name)));
        }
        match u.operators.get(&by.name) {
            Some((r, _)) if r.locked => Err(HsmError::OperatorLocked(by.name.clone())),
            Some((r, _))
                if r.role == by.role
                    && u.generations.get(&by.name).copied().unwrap_or(0) == by.generation =>
            {
                Ok(())
            }
            Some((r, _)) if r.role == by.role => Err(HsmError::NotAuthenticated(
                "the login ended when the operator's password changed or it was locked; log in again",
            )),
            _ => Err(HsmError::NotAuthenticated(
                "the operator of this login no longer exists; log in again",
            )),
        }
    }

    /// Ends every session of operator `name` (a new login generation,
    /// never used before).
    fn end_sessions(&self, u: &mut Unsealed, name: &str) {
        let next = self.epochs.fetch_add(1, Ordering::SeqCst);
        u.generations.insert(name.to_string(), next);
    }

    /// Makes and writes version 1 of the audit signing key.
    fn create_audit_key(&self, u: &mut Unsealed) -> Result<u32, HsmError> {
        let record = AuditKeyRecord {
            versions: vec![AuditKeyVersion::generate(1, now())?],
        };
        self.write_object(
            u,
            KIND_AUDIT_KEY,
            audit_key::ID,
            1,
            record.encode().expose(),
        )?;
        u.audit_key = Some((record, 1));
        Ok(1)
    }

    fn audit_key(u: &Unsealed) -> Result<&(AuditKeyRecord, u64), HsmError> {
        if u.tampered_audit_key {
            return Err(HsmError::Tampered("the audit signing key".into()));
        }
        u.audit_key
            .as_ref()
            .ok_or(HsmError::Internal("the audit signing key is missing"))
    }

    /// Signs an audit checkpoint with the newest audit signing key version
    /// (see [`audit_key`]): `message(version)` makes the statement naming
    /// the version that signs it. The daemon alone calls it, with
    /// statements it builds itself; no request reaches it with bytes of its
    /// own.
    pub fn audit_sign(&self, message: &dyn Fn(u32) -> Vec<u8>) -> Result<AuditSignature, HsmError> {
        let st = self.read();
        Self::audit_key(Self::unsealed(&st)?)?.0.sign(message)
    }

    /// The public keys of every audit signing key version (public, so no
    /// session is needed; the HSM must be unsealed to read them).
    pub fn audit_public_keys(&self) -> Result<Vec<AuditPublicKey>, HsmError> {
        let st = self.read();
        Ok(Self::audit_key(Self::unsealed(&st)?)?.0.public_keys())
    }

    /// Rotates the audit signing key: a new version signs from now on and
    /// the previous seed is destroyed (its public key stays).
    pub fn audit_key_rotate(&self, by: &OperatorSession) -> Result<AuditPublicKey, HsmError> {
        self.authorize(by, Permission::ManageKeys)?;
        let mut st = self.write();
        let u = Self::unsealed_mut(&mut st)?;
        let (current, revision) = Self::audit_key(u)?;
        let mut next = AuditKeyRecord::decode(current.encode().expose())?;
        let revision = revision + 1;
        let public = next.rotate(now())?;
        self.write_object(
            u,
            KIND_AUDIT_KEY,
            audit_key::ID,
            revision,
            next.encode().expose(),
        )?;
        u.audit_key = Some((next, revision));
        Ok(public)
    }

    fn put_op(kind: u8, id: &str, revision: u64, blob: Vec<u8>) -> StoreOp {
        StoreOp::Put(StoredObject {
            kind,
            id: id.to_string(),
            revision,
            blob,
        })
    }

    /// Seals and writes one object and the manifest that names its new
    /// revision, in one store transaction.
    fn write_object(
        &self,
        u: &mut Unsealed,
        kind: u8,
        id: &str,
        revision: u64,
        record: &[u8],
    ) -> Result<(), HsmError> {
        let blob = u.sealer.seal(kind, id, revision, record)?;
        let list = u.manifest.with(kind, id, revision);
        let list_blob =
            u.sealer
                .seal(KIND_MANIFEST, manifest::ID, list.revision, &list.encode())?;
        self.store.apply(&[
            Self::put_op(kind, id, revision, blob),
            Self::put_op(KIND_MANIFEST, manifest::ID, list.revision, list_blob),
        ])?;
        u.manifest = list;
        Ok(())
    }

    fn persist_operator(
        &self,
        u: &mut Unsealed,
        rec: OperatorRecord,
        revision: u64,
    ) -> Result<(), HsmError> {
        self.write_object(u, KIND_OPERATOR, &rec.name, revision, rec.encode().expose())?;
        u.operators.insert(rec.name.clone(), (rec, revision));
        Ok(())
    }

    /// Verifies an operator's password. Five consecutive failures lock the
    /// operator. The Argon2 work runs outside the state lock but under the
    /// operator's own login lock: attempts for one operator are checked one
    /// after another, each sees the failures before it, so parallel guesses
    /// get five checks, not one each, and a locked operator cannot log in.
    pub fn login(&self, name: &str, password: &[u8]) -> Result<OperatorSession, HsmError> {
        let known = {
            let st = self.read();
            let u = Self::unsealed(&st)?;
            if u.tampered_operators.contains(name) {
                return Err(HsmError::Tampered(format!("operator {name}")));
            }
            u.operators.contains_key(name)
        };
        if !known {
            // Spend the same work for unknown names as for known ones.
            let _ = operator::verify_password(password, DUMMY_HASH);
            return Err(HsmError::LoginFailed);
        }
        let one = lock(&self.logins)
            .entry(name.to_string())
            .or_default()
            .clone();
        let _turn = lock(&one);
        let hash = {
            let st = self.read();
            let u = Self::unsealed(&st)?;
            match u.operators.get(name) {
                None => return Err(HsmError::LoginFailed),
                Some((r, _)) if r.locked => {
                    return Err(HsmError::OperatorLocked(name.to_string()));
                }
                Some((r, _)) => r.password_hash.clone(),
            }
        };
        let ok = operator::verify_password(password, &hash);
        let mut st = self.write();
        let u = Self::unsealed_mut(&mut st)?;
        let (mut rec, rev) = u
            .operators
            .get(name)
            .cloned()
            .ok_or(HsmError::LoginFailed)?;
        if rec.locked {
            // Unlocking and locking do not take the login lock.
            return Err(HsmError::OperatorLocked(name.to_string()));
        }
        if ok && rec.password_hash == hash {
            let session = OperatorSession {
                name: rec.name.clone(),
                role: rec.role,
                epoch: u.epoch,
                generation: u.generations.get(name).copied().unwrap_or(0),
            };
            if rec.failed_logins != 0 {
                rec.failed_logins = 0;
                self.persist_operator(u, rec, rev + 1)?;
            }
            return Ok(session);
        }
        rec.failed_logins += 1;
        let now_locked = rec.failed_logins >= MAX_FAILED_LOGINS;
        rec.locked = now_locked;
        self.persist_operator(u, rec, rev + 1)?;
        if now_locked {
            self.end_sessions(u, name);
        }
        drop(st);
        if now_locked {
            self.event(HsmEvent::OperatorLocked(name.to_string()));
            if self.policy.zeroize_on_lockout {
                self.zeroize_for("an operator was locked out by failed logins")?;
            }
            return Err(HsmError::OperatorLocked(name.to_string()));
        }
        Err(HsmError::LoginFailed)
    }

    /// Starts a re-split of the unseal shares into `shares` new ones of
    /// which `threshold` unseal (a crypto officer); replaces one that was
    /// running. The HSM must be unsealed.
    pub fn resplit_init(
        &self,
        by: &OperatorSession,
        threshold: u8,
        shares: u8,
    ) -> Result<ResplitStatus, HsmError> {
        self.authorize(by, Permission::Custody)?;
        let meta = self.unsealed_meta()?;
        if meta.dev {
            return Err(HsmError::InvalidArgument(
                "a dev store has a single share in a file: make a production store instead".into(),
            ));
        }
        if threshold < 2 || threshold > shares || shares > seal::MAX_SHARES {
            return Err(HsmError::InvalidArgument(format!(
                "{threshold} of {shares} shares: the threshold must be at least 2 and at most the \
                 number of shares (at most {})",
                seal::MAX_SHARES
            )));
        }
        let mut raw = [0u8; 8];
        random::fill(&mut raw)?;
        let nonce: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let r = Resplit {
            nonce,
            threshold,
            shares,
            given: Vec::new(),
            started: now(),
        };
        let status = Self::resplit_status_of(&r, meta.threshold);
        *lock(&self.resplit) = Some(r);
        Ok(status)
    }

    /// The re-split in progress, if any (expired ones are dropped).
    pub fn resplit_status(&self) -> Option<ResplitStatus> {
        let needed = self.unsealed_meta().ok()?.threshold;
        let mut g = lock(&self.resplit);
        if g.as_ref()
            .is_some_and(|r| now() > r.started + RESPLIT_TIMEOUT_SECS)
        {
            *g = None;
        }
        g.as_ref().map(|r| Self::resplit_status_of(r, needed))
    }

    /// Cancels the re-split in progress (a crypto officer).
    pub fn resplit_cancel(&self, by: &OperatorSession) -> Result<bool, HsmError> {
        self.authorize(by, Permission::Custody)?;
        Ok(lock(&self.resplit).take().is_some())
    }

    fn resplit_status_of(r: &Resplit, needed: u8) -> ResplitStatus {
        ResplitStatus {
            nonce: r.nonce.clone(),
            progress: u8::try_from(r.given.len()).unwrap_or(u8::MAX),
            needed,
            threshold: r.threshold,
            shares: r.shares,
            started: r.started,
        }
    }

    /// Refuses a share of another store or another share set.
    fn check_share_set(share: &Share, meta: &StoreMeta) -> Result<(), HsmError> {
        if share.store_id != meta.store_id {
            return Err(HsmError::InvalidShare(
                "it belongs to another key store".into(),
            ));
        }
        if share.threshold != meta.threshold || share.count != meta.shares {
            return Err(HsmError::InvalidShare(
                "it belongs to another share set".into(),
            ));
        }
        Ok(())
    }

    fn unsealed_meta(&self) -> Result<StoreMeta, HsmError> {
        match &*self.read() {
            State::Unsealed(m, _) => Ok(m.clone()),
            State::Uninitialized => Err(HsmError::NotInitialized),
            State::Zeroized(_) => Err(HsmError::Zeroized),
            State::Sealed(_) => Err(HsmError::Sealed),
        }
    }

    /// One current share for the re-split `nonce` (a custodian; as for
    /// unseal, holding a share is the authority). At the threshold the
    /// shares are checked against the sealed root, a new unseal key seals
    /// it, and the new shares are returned; shares that do not open the
    /// root end the attempt.
    ///
    /// `prepare` sees the new shares (text form) before anything is
    /// written, for the caller to make what it hands out (each encrypted
    /// to a custodian's key): if it fails, the attempt ends, the root
    /// stays sealed under the current shares and they still unseal.
    pub fn resplit_update(
        &self,
        nonce: &str,
        share_text: &[u8],
        prepare: &mut dyn FnMut(&[SecretBuf]) -> Result<(), String>,
    ) -> Result<ResplitProgress, HsmError> {
        let share = Share::parse(share_text)?;
        let meta = self.unsealed_meta()?;
        let mut g = lock(&self.resplit);
        let Some(r) = g
            .as_mut()
            .filter(|r| now() <= r.started + RESPLIT_TIMEOUT_SECS)
        else {
            *g = None;
            return Err(HsmError::InvalidArgument(
                "no re-split is in progress (or it timed out): an officer starts one".into(),
            ));
        };
        if r.nonce != nonce {
            return Err(HsmError::InvalidArgument(format!(
                "the re-split in progress is {}, not {nonce}",
                r.nonce
            )));
        }
        Self::check_share_set(&share, &meta)?;
        if r.given.iter().any(|s| s.x == share.x) {
            return Err(HsmError::InvalidShare(format!(
                "share {} was already given to this re-split (progress stays {}/{})",
                share.x,
                r.given.len(),
                meta.threshold
            )));
        }
        r.given.push(share);
        if r.given.len() < usize::from(meta.threshold) {
            return Ok(ResplitProgress::Waiting(Self::resplit_status_of(
                r,
                meta.threshold,
            )));
        }
        let Some(r) = g.take() else {
            return Err(HsmError::Internal("the re-split vanished"));
        };
        drop(g);
        let old = seal::combine(&r.given)?;
        let sealed_root = self.store.sealed_root()?.ok_or(HsmError::Zeroized)?;
        let (root, _) = seal::open_root(&old, &sealed_root, &meta.store_id).map_err(|_| {
            HsmError::InvalidShare(
                "the shares given do not open this store's root: the re-split is cancelled".into(),
            )
        })?;
        let new = UnsealKey::generate()?;
        let shares: Vec<SecretBuf> = seal::split(&new, &meta.store_id, r.threshold, r.shares)?
            .iter()
            .map(Share::to_text)
            .collect();
        prepare(&shares).map_err(|e| {
            HsmError::InvalidArgument(format!(
                "the new shares could not be prepared ({e}): the re-split is cancelled, \
                 nothing changed and the current shares still unseal"
            ))
        })?;
        let resealed = seal::seal_root(&new, &root, &meta.store_id)?;
        let mut st = self.write();
        let State::Unsealed(m, _) = &mut *st else {
            return Err(HsmError::Sealed);
        };
        self.store.apply(&[
            StoreOp::Root(resealed),
            StoreOp::Custody {
                threshold: r.threshold,
                shares: r.shares,
            },
        ])?;
        m.threshold = r.threshold;
        m.shares = r.shares;
        Ok(ResplitProgress::Done {
            threshold: r.threshold,
            shares,
            unseal_key: new,
        })
    }

    /// Adds an operator.
    pub fn operator_add(
        &self,
        by: &OperatorSession,
        name: &str,
        role: Role,
        password: &[u8],
    ) -> Result<(), HsmError> {
        self.authorize(by, Permission::ManageOperators)?;
        validate_name("operator", name)?;
        let hash = operator::hash_password(password)?;
        let mut st = self.write();
        let u = Self::unsealed_mut(&mut st)?;
        if u.operators.contains_key(name) || u.tampered_operators.contains(name) {
            return Err(HsmError::OperatorExists(name.to_string()));
        }
        let rec = OperatorRecord {
            name: name.to_string(),
            role,
            password_hash: hash,
            failed_logins: 0,
            locked: false,
        };
        self.persist_operator(u, rec, 1)
    }

    /// Sets an operator's password (and clears its failure count): its
    /// own, or anyone's for an officer.
    pub fn operator_passwd(
        &self,
        by: &OperatorSession,
        name: &str,
        password: &[u8],
    ) -> Result<(), HsmError> {
        if by.name == name {
            Self::check_live(Self::unsealed(&self.read())?, by)?;
        } else {
            self.authorize(by, Permission::ManageOperators)?;
        }
        let hash = operator::hash_password(password)?;
        self.update_operator(name, |r| {
            r.password_hash = hash;
            r.failed_logins = 0;
        })?;
        let mut st = self.write();
        let u = Self::unsealed_mut(&mut st)?;
        self.end_sessions(u, name);
        Ok(())
    }

    /// Removes an operator; its sessions end at once. An officer cannot
    /// remove itself (so an officer always remains), and a crypto user
    /// with keys still shared with it must have them unshared first (so
    /// that a later operator of the same name gets none).
    pub fn operator_remove(&self, by: &OperatorSession, name: &str) -> Result<(), HsmError> {
        self.authorize(by, Permission::ManageOperators)?;
        if by.name == name {
            return Err(HsmError::InvalidArgument(
                "an operator cannot remove itself: another crypto officer must".into(),
            ));
        }
        let mut st = self.write();
        let u = Self::unsealed_mut(&mut st)?;
        if !u.operators.contains_key(name) && !u.tampered_operators.contains(name) {
            return Err(HsmError::OperatorNotFound(name.to_string()));
        }
        let shared: Vec<&str> = u
            .keys
            .values()
            .filter(|e| e.record.users.iter().any(|x| x == name))
            .map(|e| e.record.name.as_str())
            .collect();
        if !shared.is_empty() {
            return Err(HsmError::InvalidArgument(format!(
                "master keys are still shared with {name}: {} (`tde key unshare KEY {name}` first)",
                shared.join(", ")
            )));
        }
        let list = u.manifest.without(KIND_OPERATOR, name);
        let list_blob =
            u.sealer
                .seal(KIND_MANIFEST, manifest::ID, list.revision, &list.encode())?;
        self.store.apply(&[
            StoreOp::Delete {
                kind: KIND_OPERATOR,
                id: name.to_string(),
            },
            Self::put_op(KIND_MANIFEST, manifest::ID, list.revision, list_blob),
        ])?;
        u.manifest = list;
        u.operators.remove(name);
        u.tampered_operators.remove(name);
        self.end_sessions(u, name);
        Ok(())
    }

    /// Unlocks an operator.
    pub fn operator_unlock(&self, by: &OperatorSession, name: &str) -> Result<(), HsmError> {
        self.authorize(by, Permission::ManageOperators)?;
        self.update_operator(name, |r| {
            r.locked = false;
            r.failed_logins = 0;
        })
    }

    fn update_operator(
        &self,
        name: &str,
        f: impl FnOnce(&mut OperatorRecord),
    ) -> Result<(), HsmError> {
        let mut st = self.write();
        let u = Self::unsealed_mut(&mut st)?;
        if u.tampered_operators.contains(name) {
            return Err(HsmError::Tampered(format!("operator {name}")));
        }
        let (mut rec, rev) = u
            .operators
            .get(name)
            .cloned()
            .ok_or_else(|| HsmError::OperatorNotFound(name.to_string()))?;
        f(&mut rec);
        self.persist_operator(u, rec, rev + 1)
    }

    /// Lists operators.
    pub fn operator_list(&self, by: &OperatorSession) -> Result<Vec<OperatorInfo>, HsmError> {
        let st = self.read();
        let u = Self::unsealed(&st)?;
        Self::check_session(u, by, Permission::Read)?;
        Ok(u.operators
            .values()
            .map(|(r, _)| OperatorInfo {
                name: r.name.clone(),
                role: r.role,
                locked: r.locked,
                failed_logins: r.failed_logins,
            })
            .collect())
    }

    fn check_key<'a>(u: &'a Unsealed, key: &str) -> Result<&'a KeyEntry, HsmError> {
        if u.tampered_keys.contains(key) {
            return Err(HsmError::Tampered(format!("master key {key}")));
        }
        u.keys
            .get(key)
            .ok_or_else(|| HsmError::KeyNotFound(key.to_string()))
    }

    /// Writes a changed key record, then installs it in memory.
    fn commit_key(
        &self,
        u: &mut Unsealed,
        record: MekRecord,
        revision: u64,
    ) -> Result<KeyInfo, HsmError> {
        let name = record.name.clone();
        self.write_object(
            u,
            KIND_MASTER_KEY,
            &name,
            revision,
            record.encode().expose(),
        )?;
        // Persisted: now install it, reusing the derived keys of versions
        // whose material did not change (a version's material never does).
        let reuse = u.keys.remove(&name).map(|e| e.derived).unwrap_or_default();
        let entry = KeyEntry::new(record, revision, reuse)?;
        let info = entry.info();
        u.keys.insert(name, entry);
        Ok(info)
    }

    /// Creates a master key with version 1, owned by the officer who asks
    /// and shared with nobody.
    pub fn key_create(
        &self,
        by: &OperatorSession,
        name: &str,
        description: &str,
        rotate_after: u64,
    ) -> Result<KeyInfo, HsmError> {
        self.authorize(by, Permission::ManageKeys)?;
        validate_name("key", name)?;
        if description.len() > 1024 {
            return Err(HsmError::InvalidArgument(
                "description over 1024 bytes".into(),
            ));
        }
        let mut st = self.write();
        let u = Self::unsealed_mut(&mut st)?;
        if u.keys.contains_key(name) || u.tampered_keys.contains(name) {
            return Err(HsmError::KeyExists(name.to_string()));
        }
        let t = now();
        let record = MekRecord {
            name: name.to_string(),
            description: description.to_string(),
            created: t,
            primary: 1,
            versions: vec![MekVersion {
                version: 1,
                state: VersionState::Enabled,
                created: t,
                destroy_at: None,
                material: Some(MasterKeyMaterial::generate()?),
            }],
            rotate_after,
            owner: by.name.clone(),
            users: Vec::new(),
        };
        self.commit_key(u, record, 1)
    }

    /// Lists master keys (tampered ones flagged).
    pub fn key_list(&self, by: &OperatorSession) -> Result<Vec<KeyInfo>, HsmError> {
        let st = self.read();
        let u = Self::unsealed(&st)?;
        Self::check_session(u, by, Permission::Read)?;
        Ok(Self::all_keys(u))
    }

    /// Every master key's metadata (never material) for the daemon's own
    /// metrics; empty unless unsealed.
    pub fn key_overview(&self) -> Vec<KeyInfo> {
        match &*self.read() {
            State::Unsealed(_, u) => Self::all_keys(u),
            _ => Vec::new(),
        }
    }

    fn all_keys(u: &Unsealed) -> Vec<KeyInfo> {
        let mut out: Vec<KeyInfo> = u.keys.values().map(KeyEntry::info).collect();
        out.extend(u.tampered_keys.iter().map(|name| KeyInfo {
            name: name.clone(),
            description: String::new(),
            created: 0,
            primary: 0,
            tampered: true,
            versions: Vec::new(),
            rotate_after: 0,
            owner: String::new(),
            shared_with: Vec::new(),
        }));
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// The master keys a crypto user may use: those shared with it.
    pub fn keys_shared_with(&self, user: &OperatorSession) -> Result<Vec<KeyInfo>, HsmError> {
        let st = self.read();
        let u = Self::unsealed(&st)?;
        Self::check_session(u, user, Permission::UseKeys)?;
        let mut out: Vec<KeyInfo> = u
            .keys
            .values()
            .filter(|e| e.record.users.contains(&user.name))
            .map(KeyEntry::info)
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Describes one master key.
    pub fn key_describe(&self, by: &OperatorSession, name: &str) -> Result<KeyInfo, HsmError> {
        let st = self.read();
        let u = Self::unsealed(&st)?;
        Self::check_session(u, by, Permission::Read)?;
        Ok(Self::check_key(u, name)?.info())
    }

    /// The primary version of a key `caller` may use (for requests that
    /// name a key but use no material: registering data keys, waiting for
    /// rotations).
    pub fn primary_version(&self, caller: Caller<'_>, key: &str) -> Result<u32, HsmError> {
        let st = self.read();
        let u = Self::unsealed(&st)?;
        let e = Self::check_key(u, key)?;
        Self::check_caller(u, e, caller)?;
        Ok(e.record.primary)
    }

    /// Changes one key under the write lock: `f` edits a copy of the record,
    /// which is sealed, persisted and installed.
    fn modify_key(
        &self,
        name: &str,
        f: impl FnOnce(&mut MekRecord) -> Result<(), HsmError>,
    ) -> Result<KeyInfo, HsmError> {
        let mut st = self.write();
        let u = Self::unsealed_mut(&mut st)?;
        let entry = Self::check_key(u, name)?;
        let mut record = entry.record.duplicate()?;
        let revision = entry.revision + 1;
        f(&mut record)?;
        self.commit_key(u, record, revision)
    }

    /// [`Hsm::modify_key`] for an officer's session.
    fn manage_key(
        &self,
        by: &OperatorSession,
        name: &str,
        f: impl FnOnce(&mut MekRecord) -> Result<(), HsmError>,
    ) -> Result<KeyInfo, HsmError> {
        self.authorize(by, Permission::ManageKeys)?;
        self.modify_key(name, f)
    }

    /// Lets crypto user `user` use the key (idempotent).
    pub fn key_share(
        &self,
        by: &OperatorSession,
        name: &str,
        user: &str,
    ) -> Result<KeyInfo, HsmError> {
        self.authorize(by, Permission::ManageKeys)?;
        {
            let st = self.read();
            let u = Self::unsealed(&st)?;
            match u.operators.get(user) {
                Some((r, _)) if r.role == Role::CryptoUser => {}
                Some(_) => {
                    return Err(HsmError::InvalidArgument(format!(
                        "{user} is not a crypto user: only crypto users use keys"
                    )));
                }
                None if u.tampered_operators.contains(user) => {
                    return Err(HsmError::Tampered(format!("operator {user}")));
                }
                None => return Err(HsmError::OperatorNotFound(user.to_string())),
            }
        }
        self.modify_key(name, |r| {
            if let Err(at) = r.users.binary_search_by(|x| x.as_str().cmp(user)) {
                r.users.insert(at, user.to_string());
            }
            Ok(())
        })
    }

    /// Takes crypto user `user`'s use of the key away (idempotent).
    pub fn key_unshare(
        &self,
        by: &OperatorSession,
        name: &str,
        user: &str,
    ) -> Result<KeyInfo, HsmError> {
        self.manage_key(by, name, |r| {
            r.users.retain(|x| x != user);
            Ok(())
        })
    }

    /// May `caller` use `e`? Clients were authorized by the sidecar; a
    /// crypto user needs a live session and the key shared with it.
    fn check_caller(u: &Unsealed, e: &KeyEntry, caller: Caller<'_>) -> Result<(), HsmError> {
        let Caller::User(by) = caller else {
            return Ok(());
        };
        Self::check_session(u, by, Permission::UseKeys)?;
        if e.record.users.contains(&by.name) {
            Ok(())
        } else {
            Err(HsmError::PermissionDenied(format!(
                "master key {} is not shared with {}",
                e.record.name, by.name
            )))
        }
    }

    /// Rotates: a new version becomes primary; old versions keep decrypting.
    pub fn key_rotate(&self, by: &OperatorSession, name: &str) -> Result<KeyInfo, HsmError> {
        self.authorize(by, Permission::ManageKeys)?;
        self.rotate(name)
    }

    fn rotate(&self, name: &str) -> Result<KeyInfo, HsmError> {
        self.modify_key(name, |r| {
            if r.versions
                .iter()
                .all(|v| v.state == VersionState::Destroyed)
            {
                return Err(HsmError::KeyDestroyed {
                    key: r.name.clone(),
                    version: r.primary,
                });
            }
            let next = r.versions.iter().map(|v| v.version).max().unwrap_or(0) + 1;
            r.versions.push(MekVersion {
                version: next,
                state: VersionState::Enabled,
                created: now(),
                destroy_at: None,
                material: Some(MasterKeyMaterial::generate()?),
            });
            r.primary = next;
            Ok(())
        })
    }

    /// Sets the automatic rotation period (seconds; 0 turns it off), like
    /// Vault transit's `auto_rotate_period` or KMS's rotation period.
    pub fn key_set_rotation(
        &self,
        by: &OperatorSession,
        name: &str,
        seconds: u64,
    ) -> Result<KeyInfo, HsmError> {
        self.manage_key(by, name, |r| {
            r.rotate_after = seconds;
            Ok(())
        })
    }

    /// Rotates every key whose rotation policy is due at `at` (its primary
    /// version is at least `rotate_after` seconds old). Returns the keys
    /// rotated and their new primary versions.
    pub fn rotate_due(&self, at: u64) -> Result<Vec<(String, u32)>, HsmError> {
        let due: Vec<String> = {
            let st = self.read();
            let Ok(u) = Self::unsealed(&st) else {
                return Ok(Vec::new());
            };
            u.keys
                .values()
                .filter(|e| {
                    let r = &e.record;
                    r.rotate_after > 0
                        && r.version(r.primary).is_some_and(|v| {
                            v.state == VersionState::Enabled
                                && at >= v.created.saturating_add(r.rotate_after)
                        })
                })
                .map(|e| e.record.name.clone())
                .collect()
        };
        let mut out = Vec::new();
        for key in due {
            let info = self.rotate(&key)?;
            self.event(HsmEvent::AutoRotated {
                key: key.clone(),
                version: info.primary,
            });
            out.push((key, info.primary));
        }
        Ok(out)
    }

    /// Applies `f` to the selected versions, skipping destroyed ones when all
    /// are selected.
    fn each_version(
        r: &mut MekRecord,
        which: Versions,
        mut f: impl FnMut(&str, &mut MekVersion) -> Result<(), HsmError>,
    ) -> Result<(), HsmError> {
        let name = r.name.clone();
        match which {
            Versions::One(n) => {
                let v = r
                    .version_mut(n)
                    .ok_or_else(|| HsmError::KeyNotFound(format!("{name} version {n}")))?;
                f(&name, v)
            }
            Versions::All => {
                for v in r
                    .versions
                    .iter_mut()
                    .filter(|v| v.state != VersionState::Destroyed)
                {
                    f(&name, v)?;
                }
                Ok(())
            }
        }
    }

    fn state_err(key: &str, v: &MekVersion, what: &str) -> HsmError {
        HsmError::InvalidKeyState(format!(
            "cannot {what} {key} version {}: it is {}",
            v.version,
            v.state.name()
        ))
    }

    /// Disables a version (or all).
    pub fn key_disable(
        &self,
        by: &OperatorSession,
        name: &str,
        which: Versions,
    ) -> Result<KeyInfo, HsmError> {
        self.manage_key(by, name, |r| {
            Self::each_version(r, which, |key, v| match v.state {
                VersionState::Enabled | VersionState::Disabled => {
                    v.state = VersionState::Disabled;
                    Ok(())
                }
                _ => Err(Self::state_err(key, v, "disable")),
            })
        })
    }

    /// Enables a disabled version (or all disabled ones).
    pub fn key_enable(
        &self,
        by: &OperatorSession,
        name: &str,
        which: Versions,
    ) -> Result<KeyInfo, HsmError> {
        self.manage_key(by, name, |r| {
            Self::each_version(r, which, |key, v| match v.state {
                VersionState::Enabled | VersionState::Disabled => {
                    v.state = VersionState::Enabled;
                    Ok(())
                }
                _ => Err(Self::state_err(key, v, "enable")),
            })
        })
    }

    fn refuse_primary_alone(r: &MekRecord, which: Versions, what: &str) -> Result<(), HsmError> {
        match which {
            Versions::One(n) if n == r.primary && r.versions.len() > 1 => {
                Err(HsmError::InvalidKeyState(format!(
                    "cannot {what} {} version {n} alone: it is the primary version; rotate first, or {what} the whole key",
                    r.name
                )))
            }
            _ => Ok(()),
        }
    }

    /// Schedules destruction of a version (or the whole key) after `days`.
    pub fn key_schedule_destroy(
        &self,
        by: &OperatorSession,
        name: &str,
        which: Versions,
        days: u32,
    ) -> Result<KeyInfo, HsmError> {
        self.authorize(by, Permission::ManageKeys)?;
        if !(1..=365).contains(&days) {
            return Err(HsmError::InvalidArgument(
                "the waiting period must be 1 to 365 days".into(),
            ));
        }
        let at = now() + u64::from(days) * 86_400;
        self.modify_key(name, |r| {
            Self::refuse_primary_alone(r, which, "schedule destruction of")?;
            Self::each_version(r, which, |key, v| match v.state {
                VersionState::Enabled | VersionState::Disabled => {
                    v.state = VersionState::PendingDestruction;
                    v.destroy_at = Some(at);
                    Ok(())
                }
                _ => Err(Self::state_err(key, v, "schedule destruction of")),
            })
        })
    }

    /// Cancels a scheduled destruction; the version becomes disabled.
    pub fn key_cancel_destroy(
        &self,
        by: &OperatorSession,
        name: &str,
        which: Versions,
    ) -> Result<KeyInfo, HsmError> {
        self.manage_key(by, name, |r| {
            let only_pending = matches!(which, Versions::All);
            Self::each_version(r, which, |key, v| match v.state {
                VersionState::PendingDestruction => {
                    v.state = VersionState::Disabled;
                    v.destroy_at = None;
                    Ok(())
                }
                _ if only_pending => Ok(()),
                _ => Err(Self::state_err(key, v, "cancel destruction of")),
            })
        })
    }

    /// Destroys a version (or the whole key) now: the material is zeroized
    /// and removed from the store.
    pub fn key_destroy(
        &self,
        by: &OperatorSession,
        name: &str,
        which: Versions,
    ) -> Result<KeyInfo, HsmError> {
        self.manage_key(by, name, |r| {
            Self::refuse_primary_alone(r, which, "destroy")?;
            Self::each_version(r, which, |key, v| {
                if v.state == VersionState::Destroyed {
                    return Err(Self::state_err(key, v, "destroy"));
                }
                v.state = VersionState::Destroyed;
                v.destroy_at = None;
                v.material = None;
                Ok(())
            })
        })
    }

    /// Destroys every pending version whose time has come. Returns how many.
    pub fn destroy_due(&self, at: u64) -> Result<usize, HsmError> {
        let due: Vec<(String, u32)> = {
            let st = self.read();
            let Ok(u) = Self::unsealed(&st) else {
                return Ok(0);
            };
            u.keys
                .values()
                .flat_map(|e| {
                    e.record
                        .versions
                        .iter()
                        .filter(|v| {
                            v.state == VersionState::PendingDestruction
                                && v.destroy_at.is_some_and(|t| t <= at)
                        })
                        .map(|v| (e.record.name.clone(), v.version))
                })
                .collect()
        };
        for (key, version) in &due {
            self.modify_key(key, |r| {
                if let Some(v) = r.version_mut(*version) {
                    v.state = VersionState::Destroyed;
                    v.destroy_at = None;
                    v.material = None;
                }
                Ok(())
            })?;
            self.event(HsmEvent::VersionDestroyed {
                key: key.clone(),
                version: *version,
            });
        }
        Ok(due.len())
    }

    /// Generates a 256-bit data key and wraps it under the key's primary
    /// version, bound to `context` (like AWS KMS GenerateDataKey).
    pub fn generate_data_key(
        &self,
        caller: Caller<'_>,
        key: &str,
        context: &Context,
    ) -> Result<GeneratedDataKey, HsmError> {
        wrap::validate_context(context)?;
        let st = self.read();
        let u = Self::unsealed(&st)?;
        let e = Self::check_key(u, key)?;
        Self::check_caller(u, e, caller)?;
        let version = e.record.primary;
        let keys = e.usable(version)?;
        let plaintext = DataKey::generate()?;
        let ciphertext = wrap::wrap(keys, key, version, &plaintext, context)?;
        Ok(GeneratedDataKey {
            version,
            plaintext,
            ciphertext,
        })
    }

    /// Unwraps a data key (like AWS KMS Decrypt). Returns the master key
    /// version that had wrapped it (the one its header names), and the key.
    pub fn decrypt(
        &self,
        caller: Caller<'_>,
        blob: &WrappedKey<'_>,
        context: &Context,
    ) -> Result<DataKey, HsmError> {
        wrap::validate_context(context)?;
        let st = self.read();
        let u = Self::unsealed(&st)?;
        let e = Self::check_key(u, blob.key)?;
        Self::check_caller(u, e, caller)?;
        wrap::unwrap(e.usable(blob.version)?, blob, context)
    }

    /// PKCS#11 `CKM_AES_GCM` encryption under a master key's primary
    /// version (with its PKCS#11 key, see [`wrap::VersionKeys::derive`]):
    /// the ciphertext and 16-byte tag.
    pub fn p11_gcm_encrypt(
        &self,
        caller: Caller<'_>,
        key: &str,
        iv: &[u8; 12],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, HsmError> {
        let st = self.read();
        let u = Self::unsealed(&st)?;
        let e = Self::check_key(u, key)?;
        Self::check_caller(u, e, caller)?;
        e.usable(e.record.primary)?.gcm_seal(iv, aad, plaintext)
    }

    /// PKCS#11 `CKM_AES_GCM` decryption under a master key: the enabled
    /// versions are tried newest first (the tag tells which one sealed
    /// it; a PKCS#11 ciphertext names no version). `InvalidCiphertext` if
    /// none verifies.
    pub fn p11_gcm_decrypt(
        &self,
        caller: Caller<'_>,
        key: &str,
        iv: &[u8; 12],
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<SecretBuf, HsmError> {
        let st = self.read();
        let u = Self::unsealed(&st)?;
        let e = Self::check_key(u, key)?;
        Self::check_caller(u, e, caller)?;
        e.record
            .versions
            .iter()
            .rev()
            .filter_map(|v| e.usable(v.version).ok())
            .find_map(|k| k.gcm_open(iv, aad, sealed))
            .ok_or(HsmError::InvalidCiphertext(
                "the tag does not verify under any enabled version of the key",
            ))
    }

    /// Rewraps a data key under the primary version without the plaintext
    /// leaving the HSM (like AWS KMS ReEncrypt). Returns the new version and
    /// the new blob.
    pub fn re_encrypt(
        &self,
        caller: Caller<'_>,
        blob: &WrappedKey<'_>,
        context: &Context,
    ) -> Result<(u32, Vec<u8>), HsmError> {
        wrap::validate_context(context)?;
        let st = self.read();
        let u = Self::unsealed(&st)?;
        let e = Self::check_key(u, blob.key)?;
        Self::check_caller(u, e, caller)?;
        let dek = wrap::unwrap(e.usable(blob.version)?, blob, context)?;
        let primary = e.record.primary;
        let out = wrap::wrap(e.usable(primary)?, blob.key, primary, &dek, context)?;
        Ok((primary, out))
    }

    /// Random bytes from the OS CSPRNG; needs an unsealed HSM like every
    /// other cryptographic service (and a crypto user's live session when a
    /// user asks).
    pub fn random(&self, caller: Caller<'_>, n: usize) -> Result<SecretBuf, HsmError> {
        let st = self.read();
        let u = Self::unsealed(&st)?;
        if let Caller::User(by) = caller {
            Self::check_session(u, by, Permission::UseKeys)?;
        }
        Ok(SecretBuf::new(random::bytes(n)?))
    }
}

/// A valid Argon2id hash of a random password, verified against when the
/// operator name is unknown so that timing does not reveal which names exist.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$Gk2Cr1wQ1Y6oPOeJ2bTL0JYQ5K1JvQ3zqCw3Wc6yW2A";

mod p11;
pub use p11::KIND_P11_OBJECT;
#[cfg(test)]
mod tests;
