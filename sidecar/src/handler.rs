//! Request handling: authorization, the HSM call, the audit record, and the
//! mapping of HSM errors to wire codes (the one place it happens).
//!
//! Handling is synchronous; the server runs it on tokio's blocking pool.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tde_hsm::{
    Caller, Hsm, HsmError, HsmEvent, OperatorSession, Permission, Role, Versions, WrappedKey,
};
use tde_protocol::message::{MAX_TEXT, truncate};
use tde_protocol::{
    ErrorCode, KeyInfo, KeyReference, KeyVersionInfo, OperatorInfo, P11Key, Request, Response,
    SecretBytes, StatusInfo, context_display,
};

use crate::audit::{Actor, AuditLog, AuditRecord};

mod audit_ops;
mod key_use;
mod p11;
use crate::custodian::CustodianKey;
use crate::policy::Policies;
use crate::store::{Registration, RegistryWrite, SqliteStore};
pub use key_use::KeyUses;

/// Longest a `watch_key` request waits.
pub const MAX_WATCH: Duration = Duration::from_secs(60);

/// Largest `generate_random` request.
pub const MAX_RANDOM: u32 = 4096;

/// Most data a quick request (see [`Service::quick`]) carries: AES-GCM
/// over 64 KiB takes ~20 µs.
const QUICK_DATA: usize = 64 * 1024;

/// How [`Service::finish`] audits a request.
#[derive(Debug, Default, Clone, Copy)]
struct Finish {
    /// A PKCS#11 key use that is counted if it succeeds, and its
    /// mechanism.
    key_use: Option<u64>,
    /// Answered on the connection's task: nothing may wait for the disk.
    quick: bool,
}

/// Which socket a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketKind {
    /// Database clients, authorized by peer credentials and policy.
    Data,
    /// Operators, authorized by login and role.
    Admin,
}

impl SocketKind {
    /// `data` or `admin`, as in audit records and metrics.
    pub fn name(self) -> &'static str {
        match self {
            SocketKind::Data => "data",
            SocketKind::Admin => "admin",
        }
    }
}

/// The kernel's view of the peer (SO_PEERCRED), and its executable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// uid.
    pub uid: u32,
    /// gid.
    pub gid: u32,
    /// pid, when the kernel reports one.
    pub pid: Option<i32>,
    /// `/proc/PID/exe` when it connected, if readable.
    pub exe: Option<Arc<str>>,
}

/// Per-connection state of the admin socket.
#[derive(Debug, Default, Clone)]
pub struct Session {
    /// The operator logged in on this connection: the HSM's session, which
    /// every administrative operation hands back to the HSM.
    pub operator: Option<OperatorSession>,
    /// Running a request its approvals released (dual control applies no
    /// more).
    pub approved: bool,
}

/// The wrapped key of a `decrypt` or `re_encrypt`, parsed once for the
/// audit record, the policy check and the HSM.
type Blob<'a> = Option<Result<WrappedKey<'a>, HsmError>>;

/// The parsed blob, or why it is not one.
fn parsed<'a>(blob: &'a Blob<'_>) -> Result<&'a WrappedKey<'a>, (ErrorCode, String)> {
    match blob {
        Some(Ok(w)) => Ok(w),
        Some(Err(e)) => Err(map_error(e)),
        None => Err((ErrorCode::Internal, "no wrapped key in the request".into())),
    }
}

/// The service behind both sockets.
#[derive(Debug)]
pub struct Service {
    /// The HSM.
    pub hsm: Arc<Hsm>,
    /// The audit log.
    pub audit: AuditLog,
    /// Data-socket policies (replaced by a reload).
    pub clients: std::sync::RwLock<Arc<Policies>>,
    /// The registry of wrapped data keys.
    pub registry: Arc<SqliteStore>,
    /// Bumped whenever a key's primary version changes, and at seal and
    /// zeroization; `watch_key` waits on it.
    pub key_changes: KeyChanges,
    /// `mounts.on_seal = "wipe"`: after `tde seal`, the mounts' own
    /// requests (`watch_key`, `register_deks`) are answered `KEYS_REVOKED`
    /// until the next unseal, so they wipe their data keys.
    pub revoke_on_seal: AtomicBool,
    /// Sealed by an operator with `revoke_on_seal` (a daemon that merely
    /// restarted is sealed too, but revokes nothing).
    pub revoking: std::sync::atomic::AtomicBool,
    /// How many refused requests per uid get their own audit record.
    pub refusals: RefusalBudget,
    /// How many `watch_key`s one uid may have waiting.
    pub watches: WatchSlots,
    /// `limits.min_rotation_seconds`.
    pub min_rotation_seconds: AtomicU64,
    /// `limits.idle_timeout_seconds`, read by each connection before it
    /// waits for a request.
    pub idle_timeout_seconds: AtomicU64,
    /// What a `reload` request runs (set by the server once the service
    /// exists).
    pub reloader: OnceLock<Reloader>,
    /// Operator session tokens (`tde login`).
    pub tokens: Tokens,
    /// `quorum.approvals`: approvals a destructive request waits for.
    pub quorum_approvals: AtomicU32,
    /// `quorum.timeout_seconds`.
    pub quorum_timeout_seconds: AtomicU64,
    /// Requests waiting for approvals.
    pub approvals: Approvals,
    /// The custodian keys of the re-split in progress, by its nonce.
    pub resplit_custodians: Mutex<Option<(String, Vec<CustodianKey>)>>,
    /// The audit sinks (file, syslog).
    pub sinks: Arc<crate::audit::sink::Sinks>,
    /// `audit.retention`, milliseconds (0: none).
    pub audit_retention_ms: AtomicU64,
    /// `audit.routine_reads = "summarize"`.
    pub summarize_routine: AtomicBool,
    /// Successful routine reads not recorded one by one, by (operation,
    /// socket, uid), until the next summary.
    pub routine_reads: Mutex<std::collections::BTreeMap<(String, &'static str, u32), u64>>,
    /// `audit.pkcs11_key_use = "summarize"`: the counted key uses.
    pub key_uses: KeyUses,
    /// What `/metrics` and `/health` show.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// `[seal]`: the auto-unseal device, if any.
    pub auto_unseal: Option<crate::autounseal::AutoUnseal>,
    /// Why the last auto-unseal failed, while the daemon has not been
    /// unsealed since it started (it retries until then).
    pub auto_unseal_error: Mutex<Option<String>>,
}

/// A destructive request that dual control holds back.
#[derive(Debug, Clone)]
enum Guarded {
    KeyDestroy {
        key: String,
        version: Option<u32>,
        force: bool,
    },
    Zeroize,
    OperatorRemove {
        operator: String,
    },
}

impl Guarded {
    /// The request, if dual control applies to it (a zeroization needs a
    /// login to wait for approvals: a sealed HSM has no officers).
    fn of(req: &Request, logged_in: bool) -> Option<Guarded> {
        Some(match req {
            Request::KeyDestroy {
                key,
                version,
                force,
            } => Guarded::KeyDestroy {
                key: key.clone(),
                version: *version,
                force: *force,
            },
            Request::Zeroize if logged_in => Guarded::Zeroize,
            Request::OperatorRemove { operator } => Guarded::OperatorRemove {
                operator: operator.clone(),
            },
            _ => return None,
        })
    }

    fn what(&self) -> String {
        match self {
            Guarded::KeyDestroy {
                key,
                version,
                force,
            } => format!(
                "key_destroy {key} {}{}",
                version.map_or("(every version)".to_string(), |v| format!("v{v}")),
                if *force { " --force" } else { "" }
            ),
            Guarded::Zeroize => "zeroize".into(),
            Guarded::OperatorRemove { operator } => format!("operator_remove {operator}"),
        }
    }

    fn permission(&self) -> Permission {
        match self {
            Guarded::KeyDestroy { .. } => Permission::ManageKeys,
            Guarded::Zeroize => Permission::Seal,
            Guarded::OperatorRemove { .. } => Permission::ManageOperators,
        }
    }

    fn request(&self) -> Request {
        match self.clone() {
            Guarded::KeyDestroy {
                key,
                version,
                force,
            } => Request::KeyDestroy {
                key,
                version,
                force,
            },
            Guarded::Zeroize => Request::Zeroize,
            Guarded::OperatorRemove { operator } => Request::OperatorRemove { operator },
        }
    }
}

/// One request waiting for approvals.
#[derive(Debug)]
struct Pending {
    action: Guarded,
    requester: OperatorSession,
    approved_by: Vec<String>,
    needed: u32,
    expires: u64,
    state: &'static str,
    message: Option<String>,
}

/// Requests waiting for other officers' approvals (dual control, as
/// CloudHSM's quorum). In memory: a restart drops them, and the requester
/// asks again.
#[derive(Debug, Default)]
pub struct Approvals {
    inner: Mutex<(u64, std::collections::BTreeMap<u64, Pending>)>,
}

/// Requests kept, waiting or finished (the oldest finished go first).
const MAX_PENDING: usize = 256;

fn approval_info(id: u64, p: &Pending) -> tde_protocol::ApprovalInfo {
    tde_protocol::ApprovalInfo {
        id,
        what: p.action.what(),
        requester: p.requester.name().to_string(),
        approved_by: p.approved_by.clone(),
        needed: p.needed,
        state: p.state.to_string(),
        expires: p.expires,
        message: p.message.clone(),
    }
}

/// The longest a session token lives (Vault's default token TTL is longer;
/// an HSM's admin session should not be).
pub const MAX_TOKEN_TTL: u64 = 12 * 3600;

/// Tokens held at once; expired ones are dropped first.
pub const MAX_TOKENS: usize = 4096;

/// Operator session tokens, as Vault's: `tde login` trades a password for
/// a token that later connections log in with, until it expires or is
/// revoked. Each stands for an HSM session, which the HSM checks on every
/// use, so a seal, a lockout, a password change or a removal ends the
/// token too. Kept in memory only, by SHA-256 of the token (a token is 32
/// random bytes: a lookup by its hash reveals nothing usable), so a restart
/// ends them all.
#[derive(Debug, Default)]
pub struct Tokens {
    map: Mutex<std::collections::HashMap<[u8; 32], (OperatorSession, Instant)>>,
}

impl Tokens {
    fn digest(token: &[u8]) -> [u8; 32] {
        use sha2::Digest as _;
        sha2::Sha256::digest(token).into()
    }

    fn create(
        &self,
        session: OperatorSession,
        ttl: Duration,
    ) -> Result<SecretBytes, (ErrorCode, String)> {
        let mut raw = zeroize::Zeroizing::new([0u8; 32]);
        hsm(tde_hsm::random::fill(&mut raw[..]))?;
        let mut text = zeroize::Zeroizing::new(String::from("tdet."));
        for b in raw.iter() {
            text.push_str(&format!("{b:02x}"));
        }
        let now = Instant::now();
        let mut map = lock(&self.map);
        map.retain(|_, (_, until)| *until > now);
        if map.len() >= MAX_TOKENS {
            return Err((
                ErrorCode::LimitExceeded,
                format!("{MAX_TOKENS} session tokens are live already"),
            ));
        }
        map.insert(Self::digest(text.as_bytes()), (session, now + ttl));
        Ok(SecretBytes::from_slice(text.as_bytes()))
    }

    fn login(&self, token: &[u8]) -> Result<OperatorSession, (ErrorCode, String)> {
        let key = Self::digest(token);
        let mut map = lock(&self.map);
        match map.get(&key) {
            Some((s, until)) if *until > Instant::now() => Ok(s.clone()),
            Some(_) => {
                map.remove(&key);
                Err((
                    ErrorCode::NotAuthenticated,
                    "the session token has expired: `tde login` again".into(),
                ))
            }
            None => Err((
                ErrorCode::NotAuthenticated,
                "unknown or revoked session token (a restart of the daemon ends them all): \
                 `tde login` again"
                    .into(),
            )),
        }
    }

    fn revoke(&self, token: &[u8]) {
        let mut map = lock(&self.map);
        map.remove(&Self::digest(token));
    }
}

/// Re-reads the configuration and applies it to the service; gives the
/// summary of what changed, or why nothing did.
pub struct Reloader(pub ReloadFn);

/// See [`Reloader`].
pub type ReloadFn = Box<dyn Fn(&Service) -> Result<String, String> + Send + Sync>;

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reloader")
    }
}

/// The audit budget of refused requests: a token bucket per uid, so that a
/// peer whose requests are all refused cannot fill the disk with their
/// records (and so, through fail-closed audit, refuse everyone).
#[derive(Debug, Default)]
pub struct RefusalBudget {
    /// Records per second per uid; 0 means no limit.
    per_second: AtomicU32,
    peers: Mutex<std::collections::HashMap<u32, Bucket>>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
    not_recorded: u64,
}

impl RefusalBudget {
    /// A budget of `per_second` records per uid (0: unlimited).
    pub fn new(per_second: u32) -> Self {
        Self {
            per_second: AtomicU32::new(per_second),
            peers: Mutex::default(),
        }
    }

    /// Changes the budget (a reload).
    pub fn set_rate(&self, per_second: u32) {
        self.per_second.store(per_second, Ordering::Relaxed);
    }

    /// Whether a refusal of `uid` gets its own record now; if not, it is
    /// counted for the next [`RefusalBudget::take_not_recorded`].
    pub fn admit(&self, uid: u32) -> bool {
        let per_second = self.per_second.load(Ordering::Relaxed);
        if per_second == 0 {
            return true;
        }
        let rate = f64::from(per_second);
        let now = Instant::now();
        let mut peers = lock(&self.peers);
        let b = peers.entry(uid).or_insert(Bucket {
            tokens: rate,
            last: now,
            not_recorded: 0,
        });
        b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * rate).min(rate);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            b.not_recorded += 1;
            false
        }
    }

    /// Refusals not recorded since the last call, per uid; forgets peers
    /// whose bucket has refilled.
    pub fn take_not_recorded(&self) -> Vec<(u32, u64)> {
        let rate = f64::from(self.per_second.load(Ordering::Relaxed));
        let now = Instant::now();
        let mut peers = lock(&self.peers);
        let out = peers
            .iter_mut()
            .filter(|(_, b)| b.not_recorded > 0)
            .map(|(uid, b)| (*uid, std::mem::take(&mut b.not_recorded)))
            .collect();
        peers.retain(|_, b| b.tokens + now.duration_since(b.last).as_secs_f64() * rate < rate);
        out
    }
}

/// A counter of primary-version changes that waiting `watch_key`s await
/// on their connections' tasks (no thread is held while they wait).
#[derive(Debug)]
pub struct KeyChanges {
    count: tokio::sync::watch::Sender<u64>,
    stopping: std::sync::atomic::AtomicBool,
}

impl Default for KeyChanges {
    fn default() -> Self {
        Self {
            count: tokio::sync::watch::Sender::new(0),
            stopping: Default::default(),
        }
    }
}

impl KeyChanges {
    /// Ends every wait now and from now on (the daemon is stopping).
    pub fn stop(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.bump();
    }

    fn stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Wakes every waiter.
    pub fn bump(&self) {
        self.count.send_modify(|c| *c += 1);
    }

    /// A receiver that sees every change after this call.
    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.count.subscribe()
    }
}

/// Concurrent `watch_key`s per uid.
#[derive(Debug, Default)]
pub struct WatchSlots {
    max: AtomicUsize,
    taken: Arc<Mutex<std::collections::HashMap<u32, usize>>>,
}

/// One uid's place among the concurrent `watch_key`s; freed on drop.
#[derive(Debug)]
pub struct WatchSlot {
    uid: u32,
    taken: Arc<Mutex<std::collections::HashMap<u32, usize>>>,
}

impl WatchSlots {
    /// At most `max` concurrent watches per uid.
    pub fn new(max: usize) -> Self {
        Self {
            max: AtomicUsize::new(max),
            taken: Arc::default(),
        }
    }

    /// The limit now.
    pub fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }

    /// Changes the limit (a reload); watches beyond it go on.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    fn take(&self, uid: u32) -> Option<WatchSlot> {
        let mut taken = lock(&self.taken);
        let n = taken.entry(uid).or_default();
        if *n >= self.max() {
            return None;
        }
        *n += 1;
        Some(WatchSlot {
            uid,
            taken: self.taken.clone(),
        })
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut taken = lock(&self.taken);
        if let Some(n) = taken.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                taken.remove(&self.uid);
            }
        }
    }
}

/// A `watch_key` whose key has not changed yet: the connection awaits
/// [`Watch::changed`] or [`Watch::until`], then calls
/// [`Service::finish_watch`]. Its audit record is written once, when it
/// is answered.
#[derive(Debug)]
pub struct Watch {
    rec: AuditRecord,
    key: String,
    version: u32,
    /// When to answer with the unchanged version.
    pub until: Instant,
    changes: tokio::sync::watch::Receiver<u64>,
    _slot: WatchSlot,
}

impl Watch {
    /// Resolves at the next key change anywhere (or when the daemon stops).
    pub async fn changed(&mut self) {
        let _ = self.changes.changed().await;
    }
}

/// What handling a request produced.
#[derive(Debug)]
pub enum Handled {
    /// The response, audited.
    Done(Response),
    /// A `watch_key` to wait for.
    Wait(Box<Watch>),
}

type Outcome = Result<Response, (ErrorCode, String)>;

/// Maps an HSM error to its wire code and message.
pub fn map_error(e: &HsmError) -> (ErrorCode, String) {
    let code = match e {
        HsmError::NotInitialized => ErrorCode::NotInitialized,
        HsmError::AlreadyInitialized => ErrorCode::InvalidArgument,
        HsmError::Sealed => ErrorCode::Sealed,
        HsmError::Zeroized => ErrorCode::Zeroized,
        HsmError::InvalidShare(_) => ErrorCode::InvalidShare,
        HsmError::UnsealFailed => ErrorCode::UnsealFailed,
        HsmError::KeyNotFound(_) => ErrorCode::KeyNotFound,
        HsmError::KeyExists(_) => ErrorCode::KeyExists,
        HsmError::KeyDisabled { .. } => ErrorCode::KeyDisabled,
        HsmError::KeyDestroyed { .. } => ErrorCode::KeyDestroyed,
        HsmError::KeyPendingDestruction { .. } => ErrorCode::KeyPendingDestruction,
        HsmError::InvalidKeyState(_) => ErrorCode::InvalidKeyState,
        HsmError::InvalidCiphertext(_) => ErrorCode::InvalidCiphertext,
        HsmError::ContextMismatch => ErrorCode::ContextMismatch,
        HsmError::Tampered(_) => ErrorCode::Tampered,
        HsmError::OperatorNotFound(_) => ErrorCode::OperatorNotFound,
        HsmError::OperatorExists(_) => ErrorCode::OperatorExists,
        HsmError::LoginFailed => ErrorCode::LoginFailed,
        HsmError::OperatorLocked(_) => ErrorCode::OperatorLocked,
        HsmError::PermissionDenied(_) => ErrorCode::PermissionDenied,
        HsmError::NotAuthenticated(_) => ErrorCode::NotAuthenticated,
        HsmError::InvalidArgument(_) => ErrorCode::InvalidArgument,
        HsmError::Store(_) => ErrorCode::StoreFailed,
        HsmError::Internal(_) => ErrorCode::Internal,
        HsmError::Pkcs11(..) => ErrorCode::Pkcs11,
    };
    (code, e.to_string())
}

fn hsm<T>(r: Result<T, HsmError>) -> Result<T, (ErrorCode, String)> {
    r.map_err(|e| map_error(&e))
}

fn denied(msg: impl Into<String>) -> (ErrorCode, String) {
    (ErrorCode::PermissionDenied, msg.into())
}

/// Converts the HSM's key description to the wire's, with the registry's
/// references to it.
pub fn key_info(k: tde_hsm::KeyInfo, refs: Vec<Registration>) -> KeyInfo {
    KeyInfo {
        rotate_after: k.rotate_after,
        references: refs
            .into_iter()
            .map(|r| KeyReference {
                context: r.context,
                dek_version: r.dek_version,
                key_version: r.key_version,
                location: r.location,
                last_seen: r.last_seen,
            })
            .collect(),
        name: k.name,
        description: k.description,
        owner: k.owner,
        shared_with: k.shared_with,
        created: k.created,
        primary_version: k.primary,
        tampered: k.tampered,
        versions: k
            .versions
            .into_iter()
            .map(|v| KeyVersionInfo {
                version: v.version,
                state: v.state.name().to_string(),
                created: v.created,
                destroy_at: v.destroy_at,
            })
            .collect(),
    }
}

/// The wire status.
pub fn status_info(hsm: &Hsm) -> StatusInfo {
    let s = hsm.status();
    StatusInfo {
        initialized: s.initialized,
        sealed: s.sealed,
        zeroized: s.zeroized,
        threshold: u32::from(s.threshold),
        shares: u32::from(s.shares),
        progress: u32::from(s.progress),
        dev_mode: s.dev,
        key_count: u32::try_from(s.key_count).unwrap_or(u32::MAX),
        server_version: env!("CARGO_PKG_VERSION").to_string(),
        store_id: if s.initialized {
            hex::encode(s.store_id)
        } else {
            String::new()
        },
        audit_sinks: Vec::new(),
    }
}

/// Whether an admin operation changes state (and so gets an intent record
/// before it runs).
fn is_mutating(req: &Request) -> bool {
    matches!(
        req,
        Request::Seal
            | Request::Zeroize
            | Request::OperatorAdd { .. }
            | Request::OperatorPasswd { .. }
            | Request::OperatorUnlock { .. }
            | Request::OperatorRemove { .. }
            | Request::KeyCreate { .. }
            | Request::KeyRotate { .. }
            | Request::KeyDisable { .. }
            | Request::KeyEnable { .. }
            | Request::KeyScheduleDestroy { .. }
            | Request::KeyCancelDestroy { .. }
            | Request::KeyDestroy { .. }
            | Request::KeySetRotation { .. }
            | Request::Reload
            | Request::TokenCreate { .. }
            | Request::TokenRevoke { .. }
            | Request::ResplitInit { .. }
            | Request::ResplitUpdate { .. }
            | Request::ResplitCancel
            | Request::Approve { .. }
            | Request::AuditExport(_)
            | Request::AuditExportDone(_)
            | Request::AuditPrune(_)
            | Request::AuditKeyRotate
    )
}

/// Locks `m`, a poisoned lock included (its holder panicked; the state it
/// guards stays consistent between statements).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The custodian keys given to a re-split of `shares` new shares: none, or
/// one per share, each a usable OpenPGP key, checked before anything starts.
fn custodian_keys_for(
    keys: &[Vec<u8>],
    shares: u8,
) -> Result<Vec<CustodianKey>, (ErrorCode, String)> {
    if !keys.is_empty() && keys.len() != usize::from(shares) {
        return Err((
            ErrorCode::InvalidArgument,
            format!(
                "{} custodian keys for {shares} new shares: give one key per share",
                keys.len()
            ),
        ));
    }
    keys.iter()
        .enumerate()
        .map(|(i, k)| {
            CustodianKey::parse(k).map_err(|e| {
                (
                    ErrorCode::InvalidArgument,
                    format!("custodian key {}: {e}", i + 1),
                )
            })
        })
        .collect()
}

/// The wire form of a re-split's state, with its custodian keys.
fn resplit_info(
    s: &tde_hsm::ResplitStatus,
    fingerprints: Vec<String>,
) -> tde_protocol::ResplitInfo {
    tde_protocol::ResplitInfo {
        nonce: s.nonce.clone(),
        progress: s.progress.into(),
        needed: s.needed.into(),
        threshold: s.threshold.into(),
        shares: s.shares.into(),
        fingerprints,
        ..Default::default()
    }
}

/// The custodian keys of the re-split `nonce` (none: its shares go out in
/// clear).
fn custodians_of<'a>(
    slot: &'a Option<(String, Vec<CustodianKey>)>,
    nonce: &str,
) -> &'a [CustodianKey] {
    match slot {
        Some((n, keys)) if n == nonce => keys,
        _ => &[],
    }
}

/// The fingerprints of `keys`, in order.
fn fingerprints(keys: &[CustodianKey]) -> Vec<String> {
    keys.iter().map(|k| k.fingerprint().to_string()).collect()
}

/// The context for an audit record: only one within the limits, so a peer
/// cannot push a megabyte of context into the log.
fn audit_context(context: &tde_protocol::Context, rec: &mut AuditRecord) {
    if tde_hsm::validate_context(context).is_ok() {
        rec.context = Some(context.clone());
    }
}

/// A key name as recorded: at most 256 characters, whatever a peer sent.
fn audit_key(key: &str) -> Option<String> {
    Some(key.chars().take(256).collect())
}

/// Fills the audit fields a request names (never secrets).
fn describe(req: &Request, blob: &Blob<'_>, rec: &mut AuditRecord) {
    match req {
        Request::GenerateDataKey { key, context } => {
            rec.key = audit_key(key);
            audit_context(context, rec);
        }
        Request::Decrypt { context, .. } | Request::ReEncrypt { context, .. } => {
            if let Some(Ok(w)) = blob {
                rec.key = Some(w.key.to_string());
                rec.key_version = Some(w.version);
            }
            audit_context(context, rec);
        }
        Request::KeyCreate { key, .. }
        | Request::KeyDescribe { key }
        | Request::KeyRotate { key }
        | Request::WatchKey { key, .. } => rec.key = audit_key(key),
        Request::KeySetRotation { key, rotate_after } => {
            rec.key = audit_key(key);
            rec.detail = Some(format!("rotate_after {rotate_after} s"));
        }
        Request::RekeyReport { key, context, .. } => {
            rec.key = audit_key(key);
            audit_context(context, rec);
        }
        Request::RegisterDeks {
            key,
            context,
            location,
            deks,
        } => {
            rec.key = audit_key(key);
            audit_context(context, rec);
            rec.detail = Some(format!(
                "{} at {}",
                deks.iter()
                    .map(|d| format!("dek v{} under v{}", d.dek_version, d.key_version))
                    .collect::<Vec<_>>()
                    .join(", "),
                location.chars().take(512).collect::<String>()
            ));
        }
        Request::KeyDisable { key, version }
        | Request::KeyEnable { key, version }
        | Request::KeyScheduleDestroy { key, version, .. }
        | Request::KeyCancelDestroy { key, version }
        | Request::KeyDestroy { key, version, .. } => {
            rec.key = audit_key(key);
            rec.key_version = *version;
        }
        Request::OperatorAdd { operator, role, .. } => {
            rec.detail = Some(format!("operator {operator} role {role}"));
        }
        Request::OperatorPasswd { operator, .. }
        | Request::OperatorUnlock { operator }
        | Request::OperatorRemove { operator } => {
            rec.detail = Some(format!("operator {operator}"));
        }
        Request::Login { operator, .. } => rec.actor.operator = Some(operator.clone()),
        Request::P11(_, c) => p11::describe(c, rec),
        Request::P11Login { operator, role, .. } => {
            rec.actor.operator = Some(truncate(operator, MAX_TEXT).to_string());
            rec.detail = Some(format!("PKCS#11 login as {}", truncate(role, 16)));
        }
        Request::GenerateRandom { length } => rec.detail = Some(format!("{length} bytes")),
        _ => {}
    }
}

impl Service {
    /// Holds a destructive request until `needed` other officers approve.
    fn hold(
        &self,
        by: &OperatorSession,
        g: Guarded,
        needed: u32,
        rec: &mut AuditRecord,
    ) -> Outcome {
        hsm(self.hsm.authorize(by, g.permission()))?;
        let expires = tde_hsm::hsm::now() + self.quorum_timeout_seconds.load(Ordering::Relaxed);
        let mut guard = self.pending();
        let (next, map) = &mut *guard;
        if map.len() >= MAX_PENDING {
            let done: Vec<u64> = map
                .iter()
                .filter(|(_, p)| p.state != "waiting")
                .map(|(id, _)| *id)
                .collect();
            for id in done.into_iter().take(map.len() + 1 - MAX_PENDING) {
                map.remove(&id);
            }
            if map.len() >= MAX_PENDING {
                return Err((
                    ErrorCode::LimitExceeded,
                    format!("{MAX_PENDING} requests are waiting for approvals already"),
                ));
            }
        }
        *next += 1;
        let id = *next;
        let p = Pending {
            action: g,
            requester: by.clone(),
            approved_by: Vec::new(),
            needed,
            expires,
            state: "waiting",
            message: None,
        };
        rec.op = "approval_request".into();
        rec.detail = Some(format!(
            "request #{id} ({}) waits for {needed} approvals by other crypto officers",
            p.action.what()
        ));
        let info = approval_info(id, &p);
        map.insert(id, p);
        Ok(Response::Approvals(vec![info]))
    }

    /// The held requests, those whose time is up marked `expired`.
    fn pending(
        &self,
    ) -> std::sync::MutexGuard<'_, (u64, std::collections::BTreeMap<u64, Pending>)> {
        let mut g = lock(&self.approvals.inner);
        self.expire(&mut g.1);
        g
    }

    /// Marks requests whose time is up `expired` (once, audited).
    fn expire(&self, map: &mut std::collections::BTreeMap<u64, Pending>) {
        let now = tde_hsm::hsm::now();
        for (id, p) in map.iter_mut() {
            if p.state == "waiting" && now > p.expires {
                p.state = "expired";
                let mut rec = AuditRecord::new("internal", "approval_expired");
                rec.actor.operator = Some(p.requester.name().to_string());
                rec.result = "error";
                rec.detail = Some(format!(
                    "request #{id} ({}) expired with {} of {} approvals; it did not run",
                    p.action.what(),
                    p.approved_by.len(),
                    p.needed
                ));
                if let Err(e) = self.audit.append(rec) {
                    tracing::error!(error = %e, "an expiry could not be audited");
                }
            }
        }
    }

    /// One officer's approval; the last one runs the request, as its
    /// requester (whose login must still be live), and audits it.
    fn approve(&self, by: &OperatorSession, id: u64, rec: &mut AuditRecord) -> Outcome {
        hsm(self.hsm.authorize(by, Permission::Approve))?;
        let mut guard = self.pending();
        let p = guard.1.get_mut(&id).ok_or_else(|| {
            (
                ErrorCode::InvalidArgument,
                format!("no request #{id} (a restart forgets them)"),
            )
        })?;
        rec.detail = Some(format!("request #{id} ({})", p.action.what()));
        if p.state != "waiting" {
            return Err((
                ErrorCode::InvalidArgument,
                format!("request #{id} is {} and takes no more approvals", p.state),
            ));
        }
        if p.requester.name() == by.name() {
            return Err((
                ErrorCode::PermissionDenied,
                "a request cannot be approved by the officer who made it".into(),
            ));
        }
        if p.approved_by.iter().any(|o| o == by.name()) {
            return Err((
                ErrorCode::InvalidArgument,
                format!("{} approved request #{id} already", by.name()),
            ));
        }
        p.approved_by.push(by.name().to_string());
        if (p.approved_by.len() as u64) < u64::from(p.needed) {
            return Ok(Response::Approvals(vec![approval_info(id, p)]));
        }
        // Run it as its requester, and record it as the requester's
        // operation, approved.
        let req = p.action.request();
        let mut run = AuditRecord::new("admin", req.op().name());
        run.actor.operator = Some(p.requester.name().to_string());
        describe(&req, &None, &mut run);
        let mut session = Session {
            operator: Some(p.requester.clone()),
            approved: true,
        };
        let outcome = self.admin(&mut session, &req, &None, &mut run);
        match &outcome {
            Ok(_) => {
                p.state = "done";
                p.message = Some(format!("approved by {}", p.approved_by.join(", ")));
            }
            Err((code, why)) => {
                p.state = "failed";
                p.message = Some(format!("{why} ({})", code.name()));
                run.result = "error";
                run.error_code = Some(code.name());
            }
        }
        let extra = format!("approved by {} as request #{id}", p.approved_by.join(", "));
        run.detail = Some(match run.detail.take() {
            Some(d) => format!("{d}; {extra}"),
            None => extra,
        });
        let info = approval_info(id, p);
        drop(guard);
        self.audit
            .append(run)
            .map_err(|e| (ErrorCode::AuditFailed, e.to_string()))?;
        self.drain_events();
        Ok(Response::Approvals(vec![info]))
    }

    /// Refuses an automatic rotation period below
    /// `limits.min_rotation_seconds` (0, none, is always fine).
    fn check_rotation_period(&self, seconds: u64) -> Result<(), (ErrorCode, String)> {
        let min = self.min_rotation_seconds.load(Ordering::Relaxed);
        if seconds != 0 && seconds < min {
            return Err((
                ErrorCode::InvalidArgument,
                format!(
                    "a rotation period of {} is below the minimum of {} (limits.min_rotation_seconds)",
                    tde_protocol::duration_text(seconds),
                    tde_protocol::duration_text(min)
                ),
            ));
        }
        Ok(())
    }

    /// The data socket's policies now.
    pub fn policies(&self) -> Arc<Policies> {
        match self.clients.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Handles one request end to end and returns the response. Every
    /// request, allowed or refused, leaves one audit record (mutating admin
    /// operations two: intent, then outcome). If the record cannot be
    /// written the response is `AUDIT_FAILED` and nothing is released.
    /// `quick`: on the connection's own task (see [`Service::quick`]).
    pub fn handle(
        &self,
        socket: SocketKind,
        peer: Peer,
        session: &mut Session,
        request_id: u64,
        req: Request,
        quick: bool,
    ) -> Handled {
        let mut rec = AuditRecord::new(socket.name(), req.op().name());
        rec.request_id = Some(request_id);
        rec.actor = Actor {
            client: None,
            uid: Some(peer.uid),
            gid: Some(peer.gid),
            pid: peer.pid,
            exe: peer.exe.clone(),
            operator: session.operator.as_ref().map(|s| s.name().to_string()),
            role: session.operator.as_ref().map(|s| s.role().name()),
        };
        let blob: Blob<'_> = match &req {
            Request::Decrypt { ciphertext, .. } | Request::ReEncrypt { ciphertext, .. } => {
                Some(WrappedKey::parse(ciphertext))
            }
            _ => None,
        };
        describe(&req, &blob, &mut rec);
        // One set of policies for the whole request, whatever a reload does.
        let policies = self.policies();
        if socket == SocketKind::Data {
            rec.actor.client = policies
                .find(peer.uid, peer.gid)
                .map(|m| m.policy.name.clone());
        }
        if socket == SocketKind::Admin && is_mutating(&req) {
            let mut intent = rec.clone();
            intent.result = "pending";
            if let Err(e) = self.audit.append(intent) {
                self.drain_events();
                return Handled::Done(Response::error(ErrorCode::AuditFailed, e.to_string()));
            }
        }
        // Subscribed before the key is looked at: no change is missed.
        let changes = matches!(req, Request::WatchKey { .. }).then(|| self.key_changes.subscribe());
        // A login changes the session only once its record is durable.
        let mut next = session.clone();
        let mut outcome = match socket {
            SocketKind::Data => self.data(&policies, &peer, &req, &blob, &mut rec),
            SocketKind::Admin => self.admin(&mut next, &req, &blob, &mut rec),
        };
        if let (
            Request::WatchKey {
                key,
                version,
                timeout_ms,
            },
            Ok(Response::KeyPrimary { version: now, .. }),
            Some(changes),
        ) = (&req, &outcome, changes)
            && now == version
            && *timeout_ms > 0
            && !self.key_changes.stopping()
        {
            match self.watches.take(peer.uid) {
                Some(slot) => {
                    return Handled::Wait(Box::new(Watch {
                        rec,
                        key: key.clone(),
                        version: *version,
                        until: Instant::now()
                            + Duration::from_millis(u64::from(*timeout_ms)).min(MAX_WATCH),
                        changes,
                        _slot: slot,
                    }));
                }
                None => {
                    outcome = Err((
                        ErrorCode::LimitExceeded,
                        format!(
                            "uid {} already has {} watch_key requests waiting (limits.max_watches_per_uid)",
                            peer.uid,
                            self.watches.max()
                        ),
                    ))
                }
            }
        }
        let how = Finish {
            // A quick request was a candidate when it was let in (see
            // `quick`): counted even if the table filled since, so that it
            // never waits for the disk.
            key_use: match (&req, quick) {
                (Request::P11(_, c), true) => Some(c.mechanism),
                _ => self.key_uses.candidate(&req),
            },
            quick,
        };
        Handled::Done(self.finish(peer.uid, rec, outcome, session, next, how))
    }

    /// Whether `req` may run on its connection's task instead of a worker
    /// thread: a PKCS#11 key use that is counted, not waited for
    /// (`audit.pkcs11_key_use = "summarize"`), with a key whose use takes
    /// microseconds (see [`tde_hsm::Hsm::p11_quick`]) on at most
    /// [`QUICK_DATA`] bytes. Saves two thread hand-offs per call.
    pub fn quick(&self, req: &Request) -> bool {
        self.key_uses.candidate(req).is_some()
            && matches!(req, Request::P11(_, c)
                if c.data.expose().len() <= QUICK_DATA
                    && matches!(c.key, P11Key::Object(id) if self.hsm.p11_quick(id)))
    }

    /// Writes the counted PKCS#11 key uses (once a second, and at
    /// shutdown).
    pub fn record_key_uses(&self) {
        self.key_uses.flush(|r| self.audit.append(r).is_ok());
    }

    /// Answers a waiting `watch_key` whose key may have changed, whose time
    /// is up, or whose daemon is stopping (or at once, `now`: its peer
    /// left); or gives it back to wait on.
    pub fn finish_watch(&self, w: Box<Watch>, now: bool) -> Handled {
        let primary = self.mount_view(self.hsm.primary_version(Caller::Client, &w.key));
        if !now
            && matches!(primary, Ok(p) if p == w.version)
            && Instant::now() < w.until
            && !self.key_changes.stopping()
        {
            return Handled::Wait(w);
        }
        let outcome = primary.map(|version| Response::KeyPrimary {
            key: w.key.clone(),
            version,
        });
        let uid = w.rec.actor.uid.unwrap_or(0);
        let mut none = Session::default();
        let how = Finish::default();
        Handled::Done(self.finish(uid, w.rec, outcome, &mut none, Session::default(), how))
    }

    /// Audits `outcome` and returns the response; the session becomes
    /// `next` once the record is durable.
    fn finish(
        &self,
        uid: u32,
        mut rec: AuditRecord,
        outcome: Outcome,
        session: &mut Session,
        next: Session,
        how: Finish,
    ) -> Response {
        if let Response::Decrypted { version, .. }
        | Response::ReEncrypted { version, .. }
        | Response::DataKey { version, .. } = outcome.as_ref().unwrap_or(&Response::Done)
        {
            rec.key_version = Some(*version);
        }
        let response = match outcome {
            Ok(r) => r,
            Err((code, mut message)) => {
                message.truncate(truncate(&message, MAX_TEXT).len());
                rec.result = "error";
                rec.error_code = Some(code.name());
                rec.detail = Some(message.clone());
                if !self.refusals.admit(uid) {
                    // Counted, and recorded once a second per uid.
                    if !how.quick {
                        self.drain_events();
                    }
                    return Response::Error { code, message };
                }
                if how.quick {
                    // No key was used: the refusal's record is queued, not
                    // waited for (HSM events are drained by the next tick).
                    let _ = self.audit.submit(rec);
                    return Response::Error { code, message };
                }
                Response::Error { code, message }
            }
        };
        if rec.result == "ok"
            && let Some(mechanism) = how.key_use
        {
            self.key_uses.count(&rec, mechanism);
            *session = next;
            return response;
        }
        if rec.result == "ok"
            && matches!(rec.op.as_str(), "status" | "watch_key")
            && self.summarize_routine.load(Ordering::Relaxed)
        {
            *lock(&self.routine_reads)
                .entry((rec.op.clone(), rec.socket, uid))
                .or_default() += 1;
            *session = next;
            return response;
        }
        let logged = self.audit.append(rec);
        self.drain_events();
        match logged {
            Ok(_) => {
                *session = next;
                response
            }
            Err(e) => Response::error(ErrorCode::AuditFailed, e.to_string()),
        }
    }

    /// Audits a frame that could not be decoded.
    pub fn audit_malformed(
        &self,
        socket: SocketKind,
        peer: Peer,
        request_id: u64,
        code: ErrorCode,
        why: &str,
    ) -> Result<(), ErrorCode> {
        self.audit_refusal(
            socket,
            peer,
            Some(request_id),
            "malformed_request",
            code,
            why,
        )
    }

    /// Audits a connection refused before any request (over a cap).
    pub fn audit_refused(
        &self,
        socket: SocketKind,
        peer: Peer,
        op: &str,
        code: ErrorCode,
        why: &str,
    ) -> Result<(), ErrorCode> {
        self.audit_refusal(socket, peer, None, op, code, why)
    }

    fn audit_refusal(
        &self,
        socket: SocketKind,
        peer: Peer,
        request_id: Option<u64>,
        op: &str,
        code: ErrorCode,
        why: &str,
    ) -> Result<(), ErrorCode> {
        if !self.refusals.admit(peer.uid) {
            return Ok(());
        }
        let mut rec = AuditRecord::new(socket.name(), op);
        rec.request_id = request_id;
        rec.actor = Actor {
            uid: Some(peer.uid),
            gid: Some(peer.gid),
            pid: peer.pid,
            exe: peer.exe.clone(),
            ..Actor::default()
        };
        rec.result = "error";
        rec.error_code = Some(code.name());
        rec.detail = Some(truncate(why, MAX_TEXT).into());
        self.audit
            .append(rec)
            .map(|_| ())
            .map_err(|_| ErrorCode::AuditFailed)
    }

    /// Writes one `refusals_not_recorded` record per uid whose refused
    /// requests went over [`RefusalBudget`] since the last call.
    pub fn record_not_recorded(&self) {
        for (uid, n) in self.refusals.take_not_recorded() {
            let mut rec = AuditRecord::new("internal", "refusals_not_recorded");
            rec.actor.uid = Some(uid);
            rec.result = "error";
            rec.detail = Some(format!(
                "{n} refused requests of uid {uid} over limits.refused_records_per_second were refused without records of their own"
            ));
            if let Err(err) = self.audit.append(rec) {
                tracing::error!(error = %err, "could not audit unrecorded refusals");
            }
        }
    }

    /// Writes one `routine_reads` record per (operation, socket, uid) for
    /// the reads `audit.routine_reads = "summarize"` counted since the
    /// last call.
    pub fn record_routine_reads(&self) {
        let counts = std::mem::take(&mut *lock(&self.routine_reads));
        for ((op, socket, uid), n) in counts {
            let mut rec = AuditRecord::new("internal", "routine_reads");
            rec.actor.uid = Some(uid);
            rec.detail = Some(format!(
                "{n} successful {op} requests on the {socket} socket by uid {uid} (audit.routine_reads = summarize)"
            ));
            if let Err(err) = self.audit.append(rec) {
                tracing::error!(error = %err, "could not audit routine reads");
            }
        }
    }

    /// Writes audit records for what the HSM did on its own.
    pub fn drain_events(&self) {
        for e in self.hsm.take_events() {
            let mut rec = AuditRecord::new("internal", "");
            match e {
                HsmEvent::TamperDetected { kind, id, why } => {
                    rec.op = "tamper_detected".into();
                    rec.result = "error";
                    rec.error_code = Some(ErrorCode::Tampered.name());
                    rec.detail = Some(format!("{kind} {id} {why}"));
                    if kind == "master_key" {
                        rec.key = Some(id);
                    }
                }
                HsmEvent::OperatorLocked(name) => {
                    rec.op = "operator_locked".into();
                    rec.actor.operator = Some(name);
                }
                HsmEvent::TamperZeroized(why) => {
                    rec.op = "tamper_zeroize".into();
                    rec.detail = Some(why.to_string());
                    // Mounts waiting on a key hear it at once.
                    self.key_changes.bump();
                }
                HsmEvent::VersionDestroyed { key, version } => {
                    rec.op = "scheduled_destroy".into();
                    rec.key = Some(key);
                    rec.key_version = Some(version);
                }
                HsmEvent::StoreUpgraded(objects) => {
                    rec.op = "store_upgraded".into();
                    rec.detail = Some(format!(
                        "a manifest of {objects} objects created and the root resealed as v2 (expected once per store: a second one means an old root was put back)"
                    ));
                }
                HsmEvent::AuditKeyCreated(version) => {
                    rec.op = "audit_key_created".into();
                    rec.key_version = Some(version);
                    rec.detail = Some(format!(
                        "audit signing key version {version} created (Ed25519; `tde audit pubkey` prints it)"
                    ));
                }
                HsmEvent::AutoRotated { key, version } => {
                    rec.op = "auto_rotate".into();
                    rec.key = Some(key);
                    rec.key_version = Some(version);
                    self.key_changes.bump();
                }
            }
            if let Err(err) = self.audit.append(rec) {
                tracing::error!(error = %err, "could not audit an HSM event");
            }
        }
    }

    fn data(
        &self,
        policies: &Policies,
        peer: &Peer,
        req: &Request,
        blob: &Blob<'_>,
        rec: &mut AuditRecord,
    ) -> Outcome {
        match req {
            Request::Status => return Ok(Response::Status(status_info(&self.hsm))),
            r if r.op().is_data_op() => {}
            _ => {
                return Err((
                    ErrorCode::WrongSocket,
                    format!(
                        "{} is an admin operation: use the admin socket",
                        req.op().name()
                    ),
                ));
            }
        }
        let Some(p) = policies.find(peer.uid, peer.gid).map(|m| m.policy) else {
            return Err(denied(format!(
                "peer uid {} gid {} matches no client policy",
                peer.uid, peer.gid
            )));
        };
        let empty = Default::default();
        let context = match req {
            Request::GenerateDataKey { context, .. }
            | Request::Decrypt { context, .. }
            | Request::ReEncrypt { context, .. }
            | Request::RegisterDeks { context, .. }
            | Request::RekeyReport { context, .. } => context,
            _ => &empty,
        };
        // Registering and watching tell nothing secret: a client that may
        // decrypt under the key (in that context) may do them.
        match req {
            Request::RegisterDeks { key, .. } | Request::RekeyReport { key, .. } => {
                p.allows("decrypt", Some(key), context).map_err(denied)?;
                return self.data_op(req, blob, rec, Caller::Client);
            }
            Request::WatchKey { key, .. } => {
                p.allows_key("decrypt", key).map_err(denied)?;
                return self.data_op(req, blob, rec, Caller::Client);
            }
            Request::P11Login { .. }
            | Request::P11Logout { .. }
            | Request::P11Objects { .. }
            | Request::P11(..) => return self.p11(p, req, rec),
            _ => {}
        }
        if matches!(blob, Some(Err(_))) {
            // Malformed blob: no key to check policy against.
            p.allows(req.op().name(), None, context).map_err(denied)?;
            return Err((
                ErrorCode::InvalidCiphertext,
                "the ciphertext is not a tde wrapped data key".into(),
            ));
        }
        p.allows(req.op().name(), rec.key.as_deref(), context)
            .map_err(denied)?;
        self.data_op(req, blob, rec, Caller::Client)
    }

    /// A data-key operation for a client (authorized by policy) or a crypto
    /// user (the HSM checks that the key is shared with it).
    fn data_op(
        &self,
        req: &Request,
        blob: &Blob<'_>,
        rec: &mut AuditRecord,
        caller: Caller<'_>,
    ) -> Outcome {
        match req {
            Request::GenerateDataKey { key, context } => {
                let g = hsm(self.hsm.generate_data_key(caller, key, context))?;
                Ok(Response::DataKey {
                    key: key.clone(),
                    version: g.version,
                    plaintext: SecretBytes::from_slice(g.plaintext.expose()),
                    ciphertext: g.ciphertext,
                })
            }
            Request::Decrypt { context, .. } => {
                let w = parsed(blob)?;
                let dek = hsm(self.hsm.decrypt(caller, w, context))?;
                Ok(Response::Decrypted {
                    key: w.key.to_string(),
                    version: w.version,
                    plaintext: SecretBytes::from_slice(dek.expose()),
                })
            }
            Request::ReEncrypt { context, .. } => {
                let w = parsed(blob)?;
                let (version, ciphertext) = hsm(self.hsm.re_encrypt(caller, w, context))?;
                Ok(Response::ReEncrypted {
                    key: w.key.to_string(),
                    version,
                    source_version: w.version,
                    ciphertext,
                })
            }
            Request::GenerateRandom { length } => {
                if *length == 0 || *length > MAX_RANDOM {
                    return Err((
                        ErrorCode::InvalidArgument,
                        format!("length must be 1..={MAX_RANDOM}"),
                    ));
                }
                let b = hsm(self.hsm.random(caller, *length as usize))?;
                Ok(Response::Random {
                    bytes: SecretBytes::from_slice(b.expose()),
                })
            }
            Request::RegisterDeks {
                key,
                context,
                location,
                deks,
            } => {
                let primary = self.mount_view(self.hsm.primary_version(caller, key))?;
                // What the registry's primary key would refuse is refused
                // here, before the record joins a shared commit.
                let mut seen = std::collections::BTreeSet::new();
                if let Some(d) = deks.iter().find(|d| !seen.insert(d.dek_version)) {
                    return Err((
                        ErrorCode::InvalidArgument,
                        format!("data key v{} is listed twice", d.dek_version),
                    ));
                }
                // Written with the audit record, in its transaction.
                rec.registration = Some(RegistryWrite {
                    key: key.clone(),
                    context: context.clone(),
                    location: location.chars().take(4096).collect(),
                    last_seen: tde_hsm::hsm::now(),
                    deks: deks.clone(),
                });
                Ok(Response::KeyPrimary {
                    key: key.clone(),
                    version: primary,
                })
            }
            Request::RekeyReport {
                key,
                location,
                state,
                target,
                done,
                total,
                ..
            } => {
                if !matches!(
                    state.as_str(),
                    "started" | "progress" | "finished" | "failed"
                ) {
                    return Err((
                        ErrorCode::InvalidArgument,
                        "state must be started, progress, finished or failed".into(),
                    ));
                }
                // Known keys only: the record names a key the HSM has.
                self.mount_view(self.hsm.primary_version(caller, key))?;
                rec.detail = Some(format!(
                    "re-key of {} to data key v{target}: {state}, {done} of {total} blocks",
                    truncate(location, MAX_TEXT / 2)
                ));
                self.metrics.rekey_reported(
                    key,
                    truncate(location, MAX_TEXT / 2),
                    state,
                    *done,
                    *total,
                );
                Ok(Response::Done)
            }
            // The current primary; `handle` turns an unchanged one into a
            // wait on the connection's task.
            Request::WatchKey { key, .. } => Ok(Response::KeyPrimary {
                key: key.clone(),
                version: self.mount_view(self.hsm.primary_version(caller, key))?,
            }),
            _ => Err((ErrorCode::Internal, "not a data operation".into())),
        }
    }

    /// An HSM answer to a mount's own request: after `tde seal` with
    /// `mounts.on_seal = "wipe"`, `KEYS_REVOKED` instead of `SEALED`.
    fn mount_view<T>(&self, r: Result<T, HsmError>) -> Result<T, (ErrorCode, String)> {
        match r {
            Err(HsmError::Sealed) if self.revoking.load(std::sync::atomic::Ordering::SeqCst) => {
                Err((
                    ErrorCode::KeysRevoked,
                    "the sidecar is sealed and mounts.on_seal = \"wipe\": wipe the data keys"
                        .into(),
                ))
            }
            r => hsm(r),
        }
    }

    fn references(&self, key: &str) -> Result<Vec<Registration>, (ErrorCode, String)> {
        self.registry
            .registrations(key)
            .map_err(|e| (ErrorCode::StoreFailed, e.to_string()))
    }

    /// Refuses to destroy `version` of `key` (all versions when `None`)
    /// while registered data keys are wrapped under it, naming them, unless
    /// `force`.
    fn refuse_in_use(
        &self,
        key: &str,
        version: Option<u32>,
        force: bool,
        rec: &mut AuditRecord,
    ) -> Result<(), (ErrorCode, String)> {
        let users: Vec<Registration> = self
            .references(key)?
            .into_iter()
            .filter(|r| version.is_none_or(|v| r.key_version == v))
            .collect();
        if users.is_empty() {
            return Ok(());
        }
        let list = users
            .iter()
            .map(|r| {
                format!(
                    "{} (data key v{} under v{}, at {})",
                    context_display(&r.context),
                    r.dek_version,
                    r.key_version,
                    r.location
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        if force {
            rec.detail = Some(format!("forced while in use by: {list}"));
            return Ok(());
        }
        let which = version.map_or_else(|| "any version".to_string(), |v| format!("version {v}"));
        Err((
            ErrorCode::KeyInUse,
            format!(
                "{which} of {key} still wraps the data keys of {list}; rewrap them first (a mount does it by itself after a rotation; `tde rewrap BACKING_DIR` for an unmounted tablespace), or pass --force if those tablespaces are gone"
            ),
        ))
    }

    /// An admin-socket request. Roles are the HSM's to check: every
    /// operation but status, unseal and login hands it the session.
    fn admin(
        &self,
        session: &mut Session,
        req: &Request,
        blob: &Blob<'_>,
        rec: &mut AuditRecord,
    ) -> Outcome {
        let login = session.operator.clone();
        let by = || {
            login.as_ref().ok_or_else(|| {
                (
                    ErrorCode::NotAuthenticated,
                    format!("{} needs an operator login", req.op().name()),
                )
            })
        };
        let h = &self.hsm;
        // Dual control: a destructive request waits for approvals.
        let needed = self.quorum_approvals.load(Ordering::Relaxed);
        if needed > 0
            && !session.approved
            && let Some(g) = Guarded::of(req, login.is_some())
        {
            return self.hold(by()?, g, needed, rec);
        }
        let key = |k: Result<tde_hsm::KeyInfo, HsmError>| {
            hsm(k).and_then(|k| {
                let refs = self.references(&k.name)?;
                Ok(Response::Key(key_info(k, refs)))
            })
        };
        match req {
            Request::Status => {
                let mut s = status_info(h);
                let head = self.sinks.head();
                s.audit_sinks = self
                    .sinks
                    .states()
                    .iter()
                    .map(|k| tde_protocol::AuditSinkInfo {
                        name: k.name.clone(),
                        delivered: k.delivered(),
                        lag: head.saturating_sub(k.delivered()),
                        error: k.error(),
                    })
                    .collect();
                Ok(Response::Status(s))
            }
            Request::Unseal { share } => {
                let (s, key) = hsm(h.unseal_share(share.expose()))?;
                if !s.sealed {
                    self.revoking
                        .store(false, std::sync::atomic::Ordering::SeqCst);
                    self.auto_unseal_settled();
                }
                let mut detail = format!(
                    "progress {}/{}, sealed {}",
                    s.progress, s.threshold, s.sealed
                );
                if let Some(key) = key
                    && let Some(said) = self.auto_wrap(&key, &s.store_id, false)
                {
                    detail.push_str(&format!("; {said}"));
                }
                rec.detail = Some(detail);
                Ok(Response::Status(status_info(h)))
            }
            Request::Login { operator, password } => {
                let s = hsm(h.login(operator, password.expose()))?;
                let role = s.role().name().to_string();
                session.operator = Some(s);
                rec.actor.operator = Some(operator.clone());
                Ok(Response::LoggedIn {
                    operator: operator.clone(),
                    role,
                })
            }
            Request::Seal => {
                hsm(h.seal(by()?))?;
                // Mounts waiting on a key hear it at once (and wipe their
                // keys if `mounts.on_seal = "wipe"`).
                if self.revoke_on_seal.load(Ordering::SeqCst) {
                    self.revoking.store(true, Ordering::SeqCst);
                }
                self.key_changes.bump();
                Ok(Response::Status(status_info(h)))
            }
            Request::Zeroize => {
                // An unsealed HSM needs an officer (the HSM checks); a
                // sealed one cannot check logins, so access to the admin
                // socket (mode 0600) is the authority.
                hsm(h.zeroize(login.as_ref()))?;
                if let Some(a) = &self.auto_unseal {
                    a.forget();
                }
                // Every mount waiting on a key hears it at once and wipes
                // its data keys.
                self.key_changes.bump();
                Ok(Response::Done)
            }
            Request::ResplitInit {
                threshold,
                shares,
                custodian_keys,
            } => {
                let (t, n) = (
                    u8::try_from(*threshold).unwrap_or(u8::MAX),
                    u8::try_from(*shares).unwrap_or(u8::MAX),
                );
                // The role first: keys are parsed for an officer only.
                hsm(h.authorize(by()?, Permission::Custody))?;
                let keys = custodian_keys_for(custodian_keys, n)?;
                let fingerprints = fingerprints(&keys);
                // Held across the HSM call: the attempt and its keys change together.
                let mut slot = lock(&self.resplit_custodians);
                let s = hsm(h.resplit_init(by()?, t, n))?;
                *slot = Some((s.nonce.clone(), keys));
                let mut detail = format!("new shares {t} of {n}, attempt {}", s.nonce);
                if !fingerprints.is_empty() {
                    detail.push_str(&format!(
                        ", each encrypted to a custodian key: {}",
                        fingerprints.join(", ")
                    ));
                }
                rec.detail = Some(detail);
                Ok(Response::Resplit(resplit_info(&s, fingerprints)))
            }
            Request::ResplitUpdate { nonce, share } => {
                // Held across the HSM call, so the shares that complete an
                // attempt with custodian keys are always encrypted to them.
                let slot = lock(&self.resplit_custodians);
                let custodians = custodians_of(&slot, nonce);
                let fingerprints = fingerprints(custodians);
                let mut encrypted = Vec::new();
                let mut prepare = |new: &[tde_hsm::secret::SecretBuf]| {
                    if !custodians.is_empty() && custodians.len() != new.len() {
                        return Err(format!(
                            "{} custodian keys for {} new shares",
                            custodians.len(),
                            new.len()
                        ));
                    }
                    encrypted = custodians
                        .iter()
                        .zip(new)
                        .map(|(k, s)| k.encrypt(s.expose()).map_err(|e| e.to_string()))
                        .collect::<Result<_, _>>()?;
                    Ok(())
                };
                let progress = h.resplit_update(nonce, share.expose(), &mut prepare);
                drop(slot);
                match hsm(progress)? {
                    tde_hsm::ResplitProgress::Waiting(s) => {
                        rec.detail = Some(format!(
                            "attempt {}: {}/{} current shares",
                            s.nonce, s.progress, s.needed
                        ));
                        Ok(Response::Resplit(resplit_info(&s, fingerprints)))
                    }
                    tde_hsm::ResplitProgress::Done {
                        threshold,
                        shares,
                        unseal_key,
                    } => {
                        let wrapped = self
                            .auto_wrap(&unseal_key, &h.status().store_id, true)
                            .map(|said| format!("; {said}"))
                            .unwrap_or_default();
                        drop(unseal_key);
                        rec.detail = Some(format!(
                            "attempt {nonce} done: the root is sealed under new shares ({threshold} of {}){}; the old ones are void{wrapped}",
                            shares.len(),
                            if fingerprints.is_empty() {
                                String::new()
                            } else {
                                format!(
                                    ", each encrypted to its custodian key ({})",
                                    fingerprints.join(", ")
                                )
                            }
                        ));
                        Ok(Response::Resplit(tde_protocol::ResplitInfo {
                            nonce: nonce.clone(),
                            progress: 0,
                            needed: threshold.into(),
                            threshold: threshold.into(),
                            shares: u32::try_from(shares.len()).unwrap_or(u32::MAX),
                            // Encrypted, the clear shares never leave.
                            new_shares: if fingerprints.is_empty() {
                                shares
                                    .iter()
                                    .map(|s| SecretBytes::from_slice(s.expose()))
                                    .collect()
                            } else {
                                Vec::new()
                            },
                            fingerprints,
                            encrypted_shares: encrypted,
                        }))
                    }
                }
            }
            Request::ResplitStatus => Ok(Response::Resplit(
                h.resplit_status()
                    .map(|s| {
                        resplit_info(
                            &s,
                            fingerprints(custodians_of(&lock(&self.resplit_custodians), &s.nonce)),
                        )
                    })
                    .unwrap_or_default(),
            )),
            Request::ResplitCancel => {
                let was = hsm(h.resplit_cancel(by()?))?;
                rec.detail = Some(if was { "cancelled" } else { "none was running" }.into());
                Ok(Response::Done)
            }
            Request::TokenCreate { ttl } => {
                let s = by()?.clone();
                hsm(h.check_login(&s))?;
                if *ttl == 0 {
                    return Err((
                        ErrorCode::InvalidArgument,
                        "a token needs a lifetime".into(),
                    ));
                }
                let ttl = (*ttl).min(MAX_TOKEN_TTL);
                rec.detail = Some(format!("lifetime {ttl} s"));
                let token = self.tokens.create(s, Duration::from_secs(ttl))?;
                Ok(Response::Token { token, ttl })
            }
            Request::TokenLogin { token } => {
                let s = self.tokens.login(token.expose())?;
                rec.actor.operator = Some(s.name().to_string());
                hsm(h.check_login(&s))?;
                let (operator, role) = (s.name().to_string(), s.role().name().to_string());
                session.operator = Some(s);
                Ok(Response::LoggedIn { operator, role })
            }
            Request::TokenRevoke { token } => {
                // Holding it is the authority to end it.
                self.tokens.revoke(token.expose());
                Ok(Response::Done)
            }
            Request::Reload => {
                hsm(h.authorize(by()?, Permission::Configure))?;
                let reload = self.reloader.get().ok_or_else(|| {
                    (ErrorCode::Internal, "this daemon cannot reload".to_string())
                })?;
                match (reload.0)(self) {
                    Ok(summary) => {
                        rec.detail = Some(summary.clone());
                        Ok(Response::Reloaded { message: summary })
                    }
                    Err(why) => Err((
                        ErrorCode::InvalidArgument,
                        format!("the configuration was not reloaded: {why}"),
                    )),
                }
            }
            Request::AuditList(_)
            | Request::AuditExport(_)
            | Request::AuditRead(_)
            | Request::AuditExportDone(_)
            | Request::AuditPrune(_)
            | Request::AuditPubkey
            | Request::AuditKeyRotate => self.audit_op(by()?, req, rec),
            Request::OperatorAdd {
                operator,
                role: r,
                password,
            } => {
                let r = hsm(Role::parse(r))?;
                hsm(h.operator_add(by()?, operator, r, password.expose()))?;
                Ok(Response::Done)
            }
            Request::OperatorPasswd { operator, password } => {
                hsm(h.operator_passwd(by()?, operator, password.expose()))?;
                Ok(Response::Done)
            }
            Request::OperatorUnlock { operator } => {
                hsm(h.operator_unlock(by()?, operator))?;
                Ok(Response::Done)
            }
            Request::OperatorRemove { operator } => {
                hsm(h.operator_remove(by()?, operator))?;
                Ok(Response::Done)
            }
            Request::ApprovalList => {
                hsm(h.authorize(by()?, Permission::Read))?;
                let g = self.pending();
                Ok(Response::Approvals(
                    g.1.iter().map(|(id, p)| approval_info(*id, p)).collect(),
                ))
            }
            Request::ApprovalStatus { id } => {
                hsm(h.check_login(by()?))?;
                let g = self.pending();
                let p = g.1.get(id).ok_or_else(|| {
                    (
                        ErrorCode::InvalidArgument,
                        format!("no request #{id} (a restart forgets them)"),
                    )
                })?;
                Ok(Response::Approvals(vec![approval_info(*id, p)]))
            }
            Request::Approve { id } => self.approve(by()?, *id, rec),
            Request::OperatorList => Ok(Response::Operators(
                hsm(h.operator_list(by()?))?
                    .into_iter()
                    .map(|o| OperatorInfo {
                        name: o.name,
                        role: o.role.name().to_string(),
                        locked: o.locked,
                        failed_logins: o.failed_logins,
                    })
                    .collect(),
            )),
            Request::KeyCreate {
                key: k,
                description,
                rotate_after,
            } => {
                self.check_rotation_period(*rotate_after)?;
                key(h.key_create(by()?, k, description, *rotate_after))
            }
            Request::KeyList => {
                let mut out = Vec::new();
                for k in hsm(h.key_list(by()?))? {
                    let refs = self.references(&k.name)?;
                    out.push(key_info(k, refs));
                }
                Ok(Response::Keys(out))
            }
            Request::KeyDescribe { key: k } => key(h.key_describe(by()?, k)),
            Request::KeyRotate { key: k } => {
                let r = key(h.key_rotate(by()?, k));
                if let Ok(Response::Key(info)) = &r {
                    rec.key_version = Some(info.primary_version);
                    self.key_changes.bump();
                }
                r
            }
            Request::KeyDisable { key: k, version } => {
                key(h.key_disable(by()?, k, Versions::from(*version)))
            }
            Request::KeyEnable { key: k, version } => {
                key(h.key_enable(by()?, k, Versions::from(*version)))
            }
            Request::KeyScheduleDestroy {
                key: k,
                version,
                days,
                force,
            } => {
                // The role first: the registry is named only to officers.
                hsm(h.authorize(by()?, Permission::ManageKeys))?;
                self.refuse_in_use(k, *version, *force, rec)?;
                key(h.key_schedule_destroy(by()?, k, Versions::from(*version), *days))
            }
            Request::KeyCancelDestroy { key: k, version } => {
                key(h.key_cancel_destroy(by()?, k, Versions::from(*version)))
            }
            Request::KeyDestroy {
                key: k,
                version,
                force,
            } => {
                hsm(h.authorize(by()?, Permission::ManageKeys))?;
                self.refuse_in_use(k, *version, *force, rec)?;
                key(h.key_destroy(by()?, k, Versions::from(*version)))
            }
            Request::KeySetRotation {
                key: k,
                rotate_after,
            } => {
                self.check_rotation_period(*rotate_after)?;
                key(h.key_set_rotation(by()?, k, *rotate_after))
            }
            r if r.op().is_data_op() => self.data_op(r, blob, rec, Caller::User(by()?)),
            Request::KeyShare { key: k, operator } => {
                rec.detail = Some(format!("shared with {operator}"));
                key(h.key_share(by()?, k, operator))
            }
            Request::KeyUnshare { key: k, operator } => {
                rec.detail = Some(format!("no longer shared with {operator}"));
                key(h.key_unshare(by()?, k, operator))
            }
            _ => Err((ErrorCode::UnknownOperation, "unsupported operation".into())),
        }
    }
}
