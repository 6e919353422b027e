//! The safe core of the module: its state (slots, sessions, operations in
//! progress) and every PKCS#11 function in Rust types. [`crate::ffi`]
//! checks the C pointers and calls these; an error is the `CK_RV` to
//! return.
//!
//! The state is one mutex: PKCS#11 lets an application call from many
//! threads at once (`CKF_OS_LOCKING_OK`), and the module never holds the
//! lock across a call to the sidecar, so one thread's request does not
//! wait for another's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use cryptoki_sys::*;
use sha2::Digest as _;
use tde_protocol::client::{Client, ClientError};
use tde_protocol::{ErrorCode, KeyInfo, SecretBytes, StatusInfo};

use crate::config::{Config, SlotConfig};

/// A PKCS#11 return value other than `CKR_OK`.
pub type Rv = CK_RV;

/// Idle connections kept per slot.
const POOL: usize = 16;

/// The mechanisms, with what they do: `(mechanism, min key, max key,
/// flags)`. Only what works is listed.
pub const MECHANISMS: &[(CK_MECHANISM_TYPE, CK_ULONG, CK_ULONG, CK_FLAGS)] = &[
    (CKM_SHA256, 0, 0, CKF_DIGEST),
    (CKM_SHA384, 0, 0, CKF_DIGEST),
    (CKM_SHA512, 0, 0, CKF_DIGEST),
    (CKM_AES_GCM, 32, 32, CKF_ENCRYPT | CKF_DECRYPT),
];

/// The 16-byte GCM tag (`ulTagBits` 128, the only length offered).
pub const GCM_TAG_LEN: usize = 16;

/// One slot: a sidecar, and a pool of connections to it.
struct Slot {
    config: SlotConfig,
    pool: Mutex<Vec<Client>>,
    /// Who is logged in (PKCS#11: per application and token, so for every
    /// session of this slot).
    login: Mutex<Option<Login>>,
}

/// A login: the user type and the sidecar's session token for it.
struct Login {
    user_type: CK_USER_TYPE,
    token: SecretBytes,
}

impl Slot {
    /// Runs `f` on a pooled connection (a new one if none is idle). A
    /// connection that failed in transport is dropped, not pooled; if the
    /// request was not even sent (the sidecar restarted since the
    /// connection was pooled), every idle connection is as stale: the pool
    /// is emptied and the request sent once more on a new connection. So a
    /// restarted sidecar is found again without the application doing
    /// anything, and no request is ever done twice.
    fn with<T>(&self, f: impl Fn(&mut Client) -> Result<T, ClientError>) -> Result<T, Rv> {
        let pooled = lock(&self.pool).pop();
        if let Some(mut client) = pooled {
            match f(&mut client) {
                Err(e) if e.unsent() => lock(&self.pool).clear(),
                r => return self.done(client, r),
            }
        }
        let mut client = Client::connect(&self.config.socket).map_err(|e| rv(&e))?;
        let r = f(&mut client);
        self.done(client, r)
    }

    /// Pools the connection unless it failed in transport.
    fn done<T>(&self, client: Client, r: Result<T, ClientError>) -> Result<T, Rv> {
        if !matches!(
            r,
            Err(ClientError::Connect { .. } | ClientError::Transport { .. })
        ) {
            let mut pool = lock(&self.pool);
            if pool.len() < POOL {
                pool.push(client);
            }
        }
        r.map_err(|e| rv(&e))
    }

    fn status(&self) -> Result<StatusInfo, Rv> {
        self.with(|c| c.status())
    }

    /// After `CKR_USER_NOT_LOGGED_IN` for `token` (the sidecar ended it: a
    /// seal, a lockout, its restart), the module's login is over too, so
    /// that the application can log in again.
    fn lapsed(&self, rv: Rv, token: &SecretBytes) {
        if rv != CKR_USER_NOT_LOGGED_IN {
            return;
        }
        let mut l = lock(&self.login);
        if l.as_ref()
            .is_some_and(|l| l.token.expose() == token.expose())
        {
            *l = None;
        }
    }

    fn user_type(&self) -> Option<CK_USER_TYPE> {
        lock(&self.login).as_ref().map(|l| l.user_type)
    }

    /// Ends the login, at the sidecar too if it can be reached (its token
    /// would otherwise end at its expiry or the sidecar's restart).
    fn logout(&self) -> bool {
        let Some(l) = lock(&self.login).take() else {
            return false;
        };
        let _ = self.with(|c| c.p11_logout(copy(&l.token)));
        true
    }
}

/// A sidecar's answer as a return value.
fn rv(e: &ClientError) -> Rv {
    match e {
        ClientError::Connect { .. } | ClientError::Transport { .. } => CKR_DEVICE_ERROR,
        ClientError::BadResponse(_) => CKR_DEVICE_ERROR,
        ClientError::Refused { code, .. } => match code {
            ErrorCode::Sealed | ErrorCode::Zeroized | ErrorCode::Tampered => CKR_DEVICE_ERROR,
            ErrorCode::LimitExceeded => CKR_DEVICE_MEMORY,
            ErrorCode::PermissionDenied => CKR_FUNCTION_REJECTED,
            // The login's token ended (a seal, a lockout, a restart of the
            // sidecar): the application must log in again.
            ErrorCode::NotAuthenticated => CKR_USER_NOT_LOGGED_IN,
            ErrorCode::InvalidArgument => CKR_ARGUMENTS_BAD,
            ErrorCode::LoginFailed | ErrorCode::OperatorNotFound => CKR_PIN_INCORRECT,
            ErrorCode::OperatorLocked => CKR_PIN_LOCKED,
            // A GCM tag that does not verify (Java: AEADBadTagException).
            ErrorCode::InvalidCiphertext => CKR_ENCRYPTED_DATA_INVALID,
            ErrorCode::KeyNotFound => CKR_KEY_HANDLE_INVALID,
            ErrorCode::KeyDisabled
            | ErrorCode::KeyDestroyed
            | ErrorCode::KeyPendingDestruction
            | ErrorCode::InvalidKeyState => CKR_KEY_FUNCTION_NOT_PERMITTED,
            _ => CKR_FUNCTION_FAILED,
        },
    }
}

/// A copy of a secret for one more request (the type has no `Clone`, so
/// that copies are made only on purpose; each is zeroized when dropped).
fn copy(s: &SecretBytes) -> SecretBytes {
    SecretBytes::from_slice(s.expose())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A digest in progress.
#[derive(Clone)]
enum Hasher {
    Sha256(sha2::Sha256),
    Sha384(sha2::Sha384),
    Sha512(sha2::Sha512),
}

impl Hasher {
    fn new(mechanism: CK_MECHANISM_TYPE) -> Result<Hasher, Rv> {
        Ok(match mechanism {
            CKM_SHA256 => Hasher::Sha256(sha2::Sha256::new()),
            CKM_SHA384 => Hasher::Sha384(sha2::Sha384::new()),
            CKM_SHA512 => Hasher::Sha512(sha2::Sha512::new()),
            _ => return Err(CKR_MECHANISM_INVALID),
        })
    }

    fn len(&self) -> usize {
        match self {
            Hasher::Sha256(_) => 32,
            Hasher::Sha384(_) => 48,
            Hasher::Sha512(_) => 64,
        }
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha384(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    fn finish(self) -> Vec<u8> {
        match self {
            Hasher::Sha256(h) => h.finalize().to_vec(),
            Hasher::Sha384(h) => h.finalize().to_vec(),
            Hasher::Sha512(h) => h.finalize().to_vec(),
        }
    }
}

/// A session.
struct Session {
    slot: usize,
    flags: CK_FLAGS,
    digest: Option<Hasher>,
    /// The objects a search found, not yet returned.
    found: Option<std::collections::VecDeque<CK_OBJECT_HANDLE>>,
    /// An encryption or decryption in progress.
    crypt: Option<Crypt>,
}

/// A mechanism as the module takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mechanism {
    /// `CKM_AES_GCM` with its IV and AAD (`ulTagBits` checked: 128).
    AesGcm {
        /// The IV: 12 bytes.
        iv: [u8; 12],
        /// Additional authenticated data.
        aad: Vec<u8>,
    },
}

/// An encryption or decryption: its key, mechanism and the data the
/// multi-part calls gave so far (GCM answers at the end: a decryption
/// releases nothing before the tag verifies).
struct Crypt {
    encrypt: bool,
    key: String,
    mechanism: Mechanism,
    data: zeroize::Zeroizing<Vec<u8>>,
}

/// An object's attributes; `None` is a sensitive one, whose value never
/// leaves the HSM (`CKR_ATTRIBUTE_SENSITIVE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    slot: usize,
    attrs: Vec<(CK_ATTRIBUTE_TYPE, Option<Vec<u8>>)>,
}

impl Object {
    /// A master key as a PKCS#11 AES secret key: private (seen only after
    /// a login), sensitive, never extractable; it encrypts and decrypts
    /// (`CKM_AES_GCM`), nothing else yet.
    fn master_key(slot: usize, k: &KeyInfo) -> Object {
        let yes = |b: bool| Some(vec![u8::from(b)]);
        let ulong = |v: CK_ULONG| Some(v.to_ne_bytes().to_vec());
        let attrs = vec![
            (CKA_CLASS, ulong(CKO_SECRET_KEY)),
            (CKA_KEY_TYPE, ulong(CKK_AES)),
            (CKA_LABEL, Some(k.name.as_bytes().to_vec())),
            (CKA_ID, Some(key_id(&k.name))),
            (CKA_VALUE_LEN, ulong(32)),
            (CKA_VALUE, None),
            (CKA_TOKEN, yes(true)),
            (CKA_PRIVATE, yes(true)),
            (CKA_MODIFIABLE, yes(false)),
            (CKA_COPYABLE, yes(false)),
            (CKA_DESTROYABLE, yes(false)),
            (CKA_SENSITIVE, yes(true)),
            (CKA_ALWAYS_SENSITIVE, yes(true)),
            (CKA_EXTRACTABLE, yes(false)),
            (CKA_NEVER_EXTRACTABLE, yes(true)),
            (CKA_LOCAL, yes(true)),
            (CKA_KEY_GEN_MECHANISM, ulong(CKM_AES_KEY_GEN)),
            (CKA_ENCRYPT, yes(true)),
            (CKA_DECRYPT, yes(true)),
            (CKA_WRAP, yes(false)),
            (CKA_UNWRAP, yes(false)),
            (CKA_SIGN, yes(false)),
            (CKA_VERIFY, yes(false)),
            (CKA_DERIVE, yes(false)),
            (CKA_START_DATE, Some(Vec::new())),
            (CKA_END_DATE, Some(Vec::new())),
        ];
        Object { slot, attrs }
    }

    /// Whether every attribute of a search template matches exactly.
    fn matches(&self, template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)]) -> bool {
        template.iter().all(|(t, want)| {
            self.attrs
                .iter()
                .any(|(a, v)| a == t && v.as_deref() == Some(want.as_slice()))
        })
    }

    /// One attribute's value: `Ok(None)` for a sensitive one,
    /// `Err(CKR_ATTRIBUTE_TYPE_INVALID)` for one the object lacks.
    pub fn attribute(&self, t: CK_ATTRIBUTE_TYPE) -> Result<Option<&[u8]>, Rv> {
        self.attrs
            .iter()
            .find(|(a, _)| *a == t)
            .map(|(_, v)| v.as_deref())
            .ok_or(CKR_ATTRIBUTE_TYPE_INVALID)
    }
}

/// A master key's `CKA_ID`: the first 16 bytes of SHA-256 over a fixed
/// prefix and its name, so the same key has the same id in every process
/// and after every restart.
pub fn key_id(name: &str) -> Vec<u8> {
    let mut h = sha2::Sha256::new();
    h.update(b"tde master key\0");
    h.update(name.as_bytes());
    h.finalize()[..16].to_vec()
}

/// The module after `C_Initialize`.
struct State {
    /// The process that initialized it: a forked child must initialize
    /// again (its copy of the parent's connections is not its own).
    pid: u32,
    slots: Vec<Arc<Slot>>,
    sessions: HashMap<CK_SESSION_HANDLE, Session>,
    next_session: CK_SESSION_HANDLE,
    /// Objects found so far, by handle; a handle stays the same object's
    /// (by slot and name) for the life of the module.
    objects: HashMap<CK_OBJECT_HANDLE, Object>,
    handles: HashMap<(usize, String), CK_OBJECT_HANDLE>,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

/// The state, if this process initialized the module.
fn state() -> Result<MutexGuard<'static, Option<State>>, Rv> {
    let g = lock(&STATE);
    match &*g {
        Some(s) if s.pid == std::process::id() => Ok(g),
        _ => Err(CKR_CRYPTOKI_NOT_INITIALIZED),
    }
}

fn with_state<T>(f: impl FnOnce(&mut State) -> Result<T, Rv>) -> Result<T, Rv> {
    let mut g = state()?;
    match g.as_mut() {
        Some(s) => f(s),
        None => Err(CKR_CRYPTOKI_NOT_INITIALIZED),
    }
}

/// `C_Initialize`: reads the configuration. In a forked child whose
/// parent had initialized, this starts afresh.
pub fn initialize() -> Result<(), Rv> {
    let mut g = lock(&STATE);
    if let Some(s) = &*g
        && s.pid == std::process::id()
    {
        return Err(CKR_CRYPTOKI_ALREADY_INITIALIZED);
    }
    let config = Config::load().map_err(|_| CKR_GENERAL_ERROR)?;
    // A child's copy of the parent's state is forgotten without closing
    // anything the parent still uses: dropping a connection closes only
    // the child's descriptor.
    *g = Some(State {
        pid: std::process::id(),
        slots: config
            .slots
            .into_iter()
            .map(|config| {
                Arc::new(Slot {
                    config,
                    pool: Mutex::new(Vec::new()),
                    login: Mutex::new(None),
                })
            })
            .collect(),
        sessions: HashMap::new(),
        next_session: 1,
        objects: HashMap::new(),
        handles: HashMap::new(),
    });
    Ok(())
}

/// `C_Finalize`: logs out of every token.
pub fn finalize() -> Result<(), Rv> {
    let slots = with_state(|s| Ok(s.slots.clone()))?;
    for slot in &slots {
        slot.logout();
    }
    *state()? = None;
    Ok(())
}

/// Slot ids (`present_only`: those whose sidecar answers).
pub fn slot_list(present_only: bool) -> Result<Vec<CK_SLOT_ID>, Rv> {
    let slots = with_state(|s| Ok(s.slots.clone()))?;
    Ok(slots
        .iter()
        .enumerate()
        .filter(|(_, slot)| !present_only || slot.status().is_ok())
        .map(|(i, _)| i as CK_SLOT_ID)
        .collect())
}

fn slot(id: CK_SLOT_ID) -> Result<Arc<Slot>, Rv> {
    with_state(|s| {
        usize::try_from(id)
            .ok()
            .and_then(|i| s.slots.get(i).cloned())
            .ok_or(CKR_SLOT_ID_INVALID)
    })
}

/// What `C_GetSlotInfo` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    /// The sidecar's socket.
    pub description: String,
    /// `CKF_TOKEN_PRESENT` when the sidecar answers.
    pub flags: CK_FLAGS,
}

/// `C_GetSlotInfo`.
pub fn slot_info(id: CK_SLOT_ID) -> Result<SlotInfo, Rv> {
    let slot = slot(id)?;
    let present = slot.status().is_ok();
    Ok(SlotInfo {
        description: format!("tde sidecar at {}", slot.config.socket.display()),
        flags: if present { CKF_TOKEN_PRESENT } else { 0 },
    })
}

/// What `C_GetTokenInfo` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    /// The configured label, or `tde`.
    pub label: String,
    /// The first 16 hex digits of the store id.
    pub serial: String,
    /// Flags, set truthfully.
    pub flags: CK_FLAGS,
    /// Sessions open on this slot.
    pub sessions: CK_ULONG,
    /// Read-write ones among them.
    pub rw_sessions: CK_ULONG,
    /// The sidecar's version.
    pub server_version: String,
}

/// `C_GetTokenInfo`: asks the sidecar. A stopped sidecar is an absent
/// token; a sealed one is present but can do nothing yet.
pub fn token_info(id: CK_SLOT_ID) -> Result<TokenInfo, Rv> {
    let slot = slot(id)?;
    let s = slot.status().map_err(|_| CKR_TOKEN_NOT_PRESENT)?;
    let (sessions, rw_sessions) = with_state(|st| {
        let on = st.sessions.values().filter(|x| x.slot as CK_SLOT_ID == id);
        let all = on.clone().count();
        let rw = on.filter(|x| x.flags & CKF_RW_SESSION != 0).count();
        Ok((all as CK_ULONG, rw as CK_ULONG))
    })?;
    let mut flags = CKF_RNG;
    if s.initialized {
        // PINs are operators' passwords (`tde operator add`): they exist
        // with the store.
        // Keys are private objects: a login shows them.
        flags |= CKF_TOKEN_INITIALIZED | CKF_USER_PIN_INITIALIZED | CKF_LOGIN_REQUIRED;
    }
    Ok(TokenInfo {
        label: slot.config.label.clone().unwrap_or_else(|| "tde".into()),
        serial: s.store_id.chars().take(16).collect(),
        flags,
        sessions,
        rw_sessions,
        server_version: s.server_version,
    })
}

/// `C_GetMechanismList`.
pub fn mechanism_list(id: CK_SLOT_ID) -> Result<Vec<CK_MECHANISM_TYPE>, Rv> {
    slot(id)?;
    Ok(MECHANISMS.iter().map(|m| m.0).collect())
}

/// `C_GetMechanismInfo`: `(min key size, max key size, flags)`.
pub fn mechanism_info(
    id: CK_SLOT_ID,
    mechanism: CK_MECHANISM_TYPE,
) -> Result<(CK_ULONG, CK_ULONG, CK_FLAGS), Rv> {
    slot(id)?;
    MECHANISMS
        .iter()
        .find(|m| m.0 == mechanism)
        .map(|m| (m.1, m.2, m.3))
        .ok_or(CKR_MECHANISM_INVALID)
}

/// `C_OpenSession`.
pub fn open_session(id: CK_SLOT_ID, flags: CK_FLAGS) -> Result<CK_SESSION_HANDLE, Rv> {
    if flags & CKF_SERIAL_SESSION == 0 {
        return Err(CKR_SESSION_PARALLEL_NOT_SUPPORTED);
    }
    let slot = slot(id)?;
    slot.status().map_err(|_| CKR_TOKEN_NOT_PRESENT)?;
    with_state(|s| {
        let h = s.next_session;
        s.next_session = s.next_session.wrapping_add(1).max(1);
        s.sessions.insert(
            h,
            Session {
                slot: id as usize,
                flags: flags & (CKF_SERIAL_SESSION | CKF_RW_SESSION),
                digest: None,
                found: None,
                crypt: None,
            },
        );
        Ok(h)
    })
}

/// `C_CloseSession`. The last session of a slot logs out (PKCS#11 v3.0
/// section 5.6).
pub fn close_session(h: CK_SESSION_HANDLE) -> Result<(), Rv> {
    let (slot, last) = with_state(|s| {
        let x = s.sessions.remove(&h).ok_or(CKR_SESSION_HANDLE_INVALID)?;
        let last = !s.sessions.values().any(|o| o.slot == x.slot);
        Ok((s.slots[x.slot].clone(), last))
    })?;
    if last {
        slot.logout();
    }
    Ok(())
}

/// `C_CloseAllSessions`, which logs out too.
pub fn close_all_sessions(id: CK_SLOT_ID) -> Result<(), Rv> {
    let slot = slot(id)?;
    with_state(|s| {
        s.sessions.retain(|_, x| x.slot as CK_SLOT_ID != id);
        Ok(())
    })?;
    slot.logout();
    Ok(())
}

/// `C_GetSessionInfo`: `(slot, state, flags)`.
pub fn session_info(h: CK_SESSION_HANDLE) -> Result<(CK_SLOT_ID, CK_STATE, CK_FLAGS), Rv> {
    with_state(|s| {
        let x = s.sessions.get(&h).ok_or(CKR_SESSION_HANDLE_INVALID)?;
        let rw = x.flags & CKF_RW_SESSION != 0;
        let state = match (s.slots[x.slot].user_type(), rw) {
            (Some(CKU_SO), _) => CKS_RW_SO_FUNCTIONS,
            (Some(_), true) => CKS_RW_USER_FUNCTIONS,
            (Some(_), false) => CKS_RO_USER_FUNCTIONS,
            (None, true) => CKS_RW_PUBLIC_SESSION,
            (None, false) => CKS_RO_PUBLIC_SESSION,
        };
        Ok((x.slot as CK_SLOT_ID, state, x.flags))
    })
}

fn session_slot(h: CK_SESSION_HANDLE) -> Result<Arc<Slot>, Rv> {
    with_state(|s| {
        let x = s.sessions.get(&h).ok_or(CKR_SESSION_HANDLE_INVALID)?;
        Ok(s.slots[x.slot].clone())
    })
}

/// `C_Login`: the PIN is `operator:password`; `CKU_USER` needs a crypto
/// user, `CKU_SO` a crypto officer. A wrong password counts toward the
/// operator's lockout at the sidecar.
pub fn login(h: CK_SESSION_HANDLE, user_type: CK_USER_TYPE, pin: &[u8]) -> Result<(), Rv> {
    let role = match user_type {
        CKU_USER => "user",
        CKU_SO => "so",
        // No operation here needs a context-specific login.
        CKU_CONTEXT_SPECIFIC => return Err(CKR_OPERATION_NOT_INITIALIZED),
        _ => return Err(CKR_USER_TYPE_INVALID),
    };
    let (slot, read_only) = with_state(|s| {
        let x = s.sessions.get(&h).ok_or(CKR_SESSION_HANDLE_INVALID)?;
        let ro = s
            .sessions
            .values()
            .any(|o| o.slot == x.slot && o.flags & CKF_RW_SESSION == 0);
        Ok((s.slots[x.slot].clone(), ro))
    })?;
    match slot.user_type() {
        Some(t) if t == user_type => return Err(CKR_USER_ALREADY_LOGGED_IN),
        Some(_) => return Err(CKR_USER_ANOTHER_ALREADY_LOGGED_IN),
        None => {}
    }
    if user_type == CKU_SO && read_only {
        return Err(CKR_SESSION_READ_ONLY_EXISTS);
    }
    let pin = std::str::from_utf8(pin).map_err(|_| CKR_PIN_INCORRECT)?;
    let (operator, password) = pin.split_once(':').ok_or(CKR_PIN_INCORRECT)?;
    let password = SecretBytes::from_slice(password.as_bytes());
    let (token, _ttl) = slot.with(|c| c.p11_login(operator, copy(&password), role))?;
    let mut l = lock(&slot.login);
    if l.is_some() {
        // Another thread logged in meanwhile: keep its login.
        drop(l);
        let _ = slot.with(|c| c.p11_logout(copy(&token)));
        return Err(CKR_USER_ALREADY_LOGGED_IN);
    }
    *l = Some(Login { user_type, token });
    Ok(())
}

/// `C_Logout`.
pub fn logout(h: CK_SESSION_HANDLE) -> Result<(), Rv> {
    let slot = session_slot(h)?;
    if slot.logout() {
        Ok(())
    } else {
        Err(CKR_USER_NOT_LOGGED_IN)
    }
}

/// `C_FindObjectsInit`: the objects matching `template`. Master keys are
/// private: without a login there are none.
pub fn find_objects_init(
    h: CK_SESSION_HANDLE,
    template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
) -> Result<(), Rv> {
    let (slot_index, slot) = with_state(|s| {
        let x = s.sessions.get(&h).ok_or(CKR_SESSION_HANDLE_INVALID)?;
        if x.found.is_some() {
            return Err(CKR_OPERATION_ACTIVE);
        }
        Ok((x.slot, s.slots[x.slot].clone()))
    })?;
    let token = lock(&slot.login).as_ref().map(|l| copy(&l.token));
    let keys = match token {
        Some(t) => slot
            .with(|c| c.p11_objects(copy(&t)))
            .inspect_err(|rv| slot.lapsed(*rv, &t))?,
        None => Vec::new(),
    };
    with_state(|s| {
        let mut found = std::collections::VecDeque::new();
        for k in &keys {
            let object = Object::master_key(slot_index, k);
            let next = s.handles.len() as CK_OBJECT_HANDLE + 1;
            let handle = *s
                .handles
                .entry((slot_index, k.name.clone()))
                .or_insert(next);
            if object.matches(template) {
                found.push_back(handle);
            }
            s.objects.insert(handle, object);
        }
        let x = s.sessions.get_mut(&h).ok_or(CKR_SESSION_HANDLE_INVALID)?;
        x.found = Some(found);
        Ok(())
    })
}

/// `C_FindObjects`: up to `max` more handles.
pub fn find_objects(h: CK_SESSION_HANDLE, max: usize) -> Result<Vec<CK_OBJECT_HANDLE>, Rv> {
    with_session(h, |x| {
        let found = x.found.as_mut().ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
        let n = max.min(found.len());
        Ok(found.drain(..n).collect())
    })
}

/// `C_FindObjectsFinal`.
pub fn find_objects_final(h: CK_SESSION_HANDLE) -> Result<(), Rv> {
    with_session(h, |x| {
        x.found.take().ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
        Ok(())
    })
}

/// The object behind a handle, as the session may see it: private objects
/// only while the session's token is logged in.
pub fn object(h: CK_SESSION_HANDLE, handle: CK_OBJECT_HANDLE) -> Result<Object, Rv> {
    let (object, slot) = with_state(|s| {
        let x = s.sessions.get(&h).ok_or(CKR_SESSION_HANDLE_INVALID)?;
        let o = s
            .objects
            .get(&handle)
            .filter(|o| o.slot == x.slot)
            .ok_or(CKR_OBJECT_HANDLE_INVALID)?;
        Ok((o.clone(), s.slots[x.slot].clone()))
    })?;
    if slot.user_type().is_none() {
        return Err(CKR_OBJECT_HANDLE_INVALID);
    }
    Ok(object)
}

/// `C_EncryptInit` / `C_DecryptInit`: `key` must be a master key the
/// logged-in crypto user may see.
pub fn crypt_init(
    h: CK_SESSION_HANDLE,
    encrypt: bool,
    mechanism: Mechanism,
    key: CK_OBJECT_HANDLE,
) -> Result<(), Rv> {
    let object = object(h, key).map_err(|rv| {
        if rv == CKR_OBJECT_HANDLE_INVALID {
            CKR_KEY_HANDLE_INVALID
        } else {
            rv
        }
    })?;
    let allowed = if encrypt { CKA_ENCRYPT } else { CKA_DECRYPT };
    if object.attribute(allowed) != Ok(Some(&[1u8][..])) {
        return Err(CKR_KEY_FUNCTION_NOT_PERMITTED);
    }
    let name = object
        .attribute(CKA_LABEL)
        .ok()
        .flatten()
        .and_then(|l| std::str::from_utf8(l).ok())
        .ok_or(CKR_KEY_HANDLE_INVALID)?
        .to_string();
    let slot = session_slot(h)?;
    if slot.user_type() != Some(CKU_USER) {
        return Err(CKR_USER_NOT_LOGGED_IN);
    }
    with_session(h, |x| {
        if x.crypt.is_some() {
            return Err(CKR_OPERATION_ACTIVE);
        }
        x.crypt = Some(Crypt {
            encrypt,
            key: name,
            mechanism,
            data: zeroize::Zeroizing::new(Vec::new()),
        });
        Ok(())
    })
}

/// `C_EncryptUpdate` / `C_DecryptUpdate`: keeps the part (GCM gives its
/// output at the end), so nothing is output now.
pub fn crypt_update(h: CK_SESSION_HANDLE, encrypt: bool, part: &[u8]) -> Result<(), Rv> {
    with_session(h, |x| {
        let c = x
            .crypt
            .as_mut()
            .filter(|c| c.encrypt == encrypt)
            .ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
        if c.data.len() + part.len() > tde_protocol::message::MAX_P11_DATA {
            return Err(if encrypt {
                CKR_DATA_LEN_RANGE
            } else {
                CKR_ENCRYPTED_DATA_LEN_RANGE
            });
        }
        c.data.extend_from_slice(part);
        Ok(())
    })
}

/// Ends an encryption or decryption after an error other than a length
/// query (PKCS#11 section 5.2).
pub fn crypt_abort(h: CK_SESSION_HANDLE) {
    let _ = with_session(h, |x| {
        x.crypt = None;
        Ok(())
    });
}

/// `C_Encrypt` / `C_Decrypt` (`last`: the single part) and
/// `C_EncryptFinal` / `C_DecryptFinal` (`last` empty): the output, or the
/// length the caller must make room for.
pub fn crypt_final(
    h: CK_SESSION_HANDLE,
    encrypt: bool,
    last: &[u8],
    out: Out,
) -> Result<Result<zeroize::Zeroizing<Vec<u8>>, usize>, Rv> {
    let (key, mechanism, data, slot) = with_state(|s| {
        let x = s.sessions.get(&h).ok_or(CKR_SESSION_HANDLE_INVALID)?;
        let c = x
            .crypt
            .as_ref()
            .filter(|c| c.encrypt == encrypt)
            .ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
        let mut data = zeroize::Zeroizing::new(Vec::with_capacity(c.data.len() + last.len()));
        data.extend_from_slice(&c.data);
        data.extend_from_slice(last);
        Ok((
            c.key.clone(),
            c.mechanism.clone(),
            data,
            s.slots[x.slot].clone(),
        ))
    })?;
    let need = if encrypt {
        data.len() + GCM_TAG_LEN
    } else {
        data.len()
            .checked_sub(GCM_TAG_LEN)
            .ok_or(CKR_ENCRYPTED_DATA_LEN_RANGE)?
    };
    if data.len() > tde_protocol::message::MAX_P11_DATA {
        return Err(if encrypt {
            CKR_DATA_LEN_RANGE
        } else {
            CKR_ENCRYPTED_DATA_LEN_RANGE
        });
    }
    match out {
        Out::Length => return Ok(Err(need)),
        Out::Buffer(n) if n < need => return Ok(Err(need)),
        Out::Buffer(_) => {}
    }
    let token = lock(&slot.login)
        .as_ref()
        .map(|l| copy(&l.token))
        .ok_or(CKR_USER_NOT_LOGGED_IN)?;
    let Mechanism::AesGcm { iv, aad } = mechanism;
    let r = slot
        .with(|c| {
            c.p11_crypt(
                encrypt,
                tde_protocol::P11Crypt {
                    token: copy(&token),
                    key: key.clone(),
                    mechanism: CKM_AES_GCM,
                    iv: iv.to_vec(),
                    aad: aad.clone(),
                    data: SecretBytes::from_slice(&data),
                },
            )
        })
        .inspect_err(|rv| slot.lapsed(*rv, &token));
    // Done, whatever the answer.
    crypt_abort(h);
    let out = r?;
    if out.expose().len() != need {
        return Err(CKR_DEVICE_ERROR);
    }
    Ok(Ok(zeroize::Zeroizing::new(out.expose().to_vec())))
}

/// `C_GenerateRandom`: from the HSM's generator, in requests of at most
/// 4096 bytes (the sidecar's cap).
pub fn generate_random(h: CK_SESSION_HANDLE, out: &mut [u8]) -> Result<(), Rv> {
    let slot = session_slot(h)?;
    for chunk in out.chunks_mut(4096) {
        let n = u32::try_from(chunk.len()).map_err(|_| CKR_ARGUMENTS_BAD)?;
        let bytes = slot.with(|c| c.generate_random(n))?;
        if bytes.expose().len() != chunk.len() {
            return Err(CKR_DEVICE_ERROR);
        }
        chunk.copy_from_slice(bytes.expose());
    }
    Ok(())
}

fn with_session<T>(
    h: CK_SESSION_HANDLE,
    f: impl FnOnce(&mut Session) -> Result<T, Rv>,
) -> Result<T, Rv> {
    with_state(|s| f(s.sessions.get_mut(&h).ok_or(CKR_SESSION_HANDLE_INVALID)?))
}

/// `C_DigestInit`.
pub fn digest_init(h: CK_SESSION_HANDLE, mechanism: CK_MECHANISM_TYPE) -> Result<(), Rv> {
    with_session(h, |x| {
        if x.digest.is_some() {
            return Err(CKR_OPERATION_ACTIVE);
        }
        x.digest = Some(Hasher::new(mechanism)?);
        Ok(())
    })
}

/// `C_DigestUpdate`.
pub fn digest_update(h: CK_SESSION_HANDLE, data: &[u8]) -> Result<(), Rv> {
    with_session(h, |x| {
        x.digest
            .as_mut()
            .ok_or(CKR_OPERATION_NOT_INITIALIZED)?
            .update(data);
        Ok(())
    })
}

/// How a call that returns bytes ends: PKCS#11 section 5.2. With no buffer
/// the caller learns the length and the operation goes on; with one too
/// small it gets `CKR_BUFFER_TOO_SMALL` and the length, and the operation
/// goes on; otherwise it gets the bytes and the operation ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Out {
    /// Only the length is wanted.
    Length,
    /// A buffer of this many bytes.
    Buffer(usize),
}

/// `C_DigestFinal` (`data`: `C_Digest`'s single part, hashed first). The
/// digest, or the length the caller must make room for.
pub fn digest_final(
    h: CK_SESSION_HANDLE,
    data: Option<&[u8]>,
    out: Out,
) -> Result<Result<Vec<u8>, usize>, Rv> {
    with_session(h, |x| {
        let d = x.digest.as_ref().ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
        let need = d.len();
        match out {
            Out::Length => return Ok(Err(need)),
            Out::Buffer(n) if n < need => return Ok(Err(need)),
            Out::Buffer(_) => {}
        }
        let mut d = x.digest.take().ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
        if let Some(data) = data {
            d.update(data);
        }
        Ok(Ok(d.finish()))
    })
}

/// Ends a session's digest after an error (PKCS#11: a failed call other
/// than a length query ends the operation).
pub fn digest_abort(h: CK_SESSION_HANDLE) {
    let _ = with_session(h, |x| {
        x.digest = None;
        Ok(())
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_match_the_standard_values() {
        // FIPS 180-4 example "abc".
        let mut h = Hasher::new(CKM_SHA256).expect("sha256");
        h.update(b"abc");
        assert_eq!(
            h.finish()[..4],
            [0xba, 0x78, 0x16, 0xbf],
            "SHA-256(abc) starts ba7816bf"
        );
        assert_eq!(Hasher::new(CKM_SHA384).expect("384").len(), 48);
        assert!(Hasher::new(CKM_AES_GCM).is_err());
    }

    #[test]
    fn refusals_map_to_return_values() {
        let refused = |code| ClientError::Refused {
            code,
            message: String::new(),
        };
        assert_eq!(rv(&refused(ErrorCode::Sealed)), CKR_DEVICE_ERROR);
        assert_eq!(
            rv(&refused(ErrorCode::PermissionDenied)),
            CKR_FUNCTION_REJECTED
        );
        assert_eq!(rv(&ClientError::BadResponse("x".into())), CKR_DEVICE_ERROR);
    }
}
