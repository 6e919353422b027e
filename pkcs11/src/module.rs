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
use tde_protocol::{
    ErrorCode, KeyInfo, Op, P11Call, P11Key, P11ObjectInfo, SecretBytes, StatusInfo,
};

mod keys;
pub use keys::*;

use crate::config::{Config, SlotConfig};

/// A PKCS#11 return value other than `CKR_OK`.
pub type Rv = CK_RV;

/// Idle connections kept per slot.
const POOL: usize = 16;

/// ECDSA's flags: prime-field named curves, uncompressed points.
const EC: CK_FLAGS = CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS;
const SIGN: CK_FLAGS = CKF_SIGN | CKF_VERIFY;
const CRYPT: CK_FLAGS = CKF_ENCRYPT | CKF_DECRYPT;
const WRAP: CK_FLAGS = CKF_WRAP | CKF_UNWRAP;

/// The mechanisms, with what they do: `(mechanism, min key, max key,
/// flags)`; AES sizes in bytes, RSA and EC in bits. Only what works is
/// listed.
pub const MECHANISMS: &[(CK_MECHANISM_TYPE, CK_ULONG, CK_ULONG, CK_FLAGS)] = &[
    (CKM_SHA256, 0, 0, CKF_DIGEST),
    (CKM_SHA384, 0, 0, CKF_DIGEST),
    (CKM_SHA512, 0, 0, CKF_DIGEST),
    (CKM_AES_KEY_GEN, 16, 32, CKF_GENERATE),
    (CKM_AES_GCM, 16, 32, CRYPT),
    (CKM_AES_CBC_PAD, 16, 32, CRYPT),
    (CKM_AES_KEY_WRAP, 16, 32, WRAP),
    (CKM_AES_KEY_WRAP_PAD, 16, 32, WRAP),
    (CKM_AES_KEY_WRAP_KWP, 16, 32, WRAP),
    (CKM_RSA_PKCS_KEY_PAIR_GEN, 2048, 4096, CKF_GENERATE_KEY_PAIR),
    (CKM_RSA_PKCS, 2048, 4096, SIGN),
    (CKM_SHA256_RSA_PKCS, 2048, 4096, SIGN),
    (CKM_SHA384_RSA_PKCS, 2048, 4096, SIGN),
    (CKM_SHA512_RSA_PKCS, 2048, 4096, SIGN),
    (CKM_RSA_PKCS_PSS, 2048, 4096, SIGN),
    (CKM_SHA256_RSA_PKCS_PSS, 2048, 4096, SIGN),
    (CKM_SHA384_RSA_PKCS_PSS, 2048, 4096, SIGN),
    (CKM_SHA512_RSA_PKCS_PSS, 2048, 4096, SIGN),
    (CKM_RSA_PKCS_OAEP, 2048, 4096, CRYPT),
    (CKM_EC_KEY_PAIR_GEN, 256, 384, CKF_GENERATE_KEY_PAIR | EC),
    (CKM_ECDSA, 256, 384, SIGN | EC),
    (CKM_ECDSA_SHA256, 256, 384, SIGN | EC),
    (CKM_ECDSA_SHA384, 256, 384, SIGN | EC),
    (CKM_ECDSA_SHA512, 256, 384, SIGN | EC),
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

    /// The login's token, or `CKR_USER_NOT_LOGGED_IN`.
    fn token(&self) -> Result<SecretBytes, Rv> {
        lock(&self.login)
            .as_ref()
            .map(|l| copy(&l.token))
            .ok_or(CKR_USER_NOT_LOGGED_IN)
    }

    /// A PKCS#11 call under the login: `f` gets the call with the token
    /// set, and a login the sidecar ended is over here too.
    fn call<T>(
        &self,
        f: impl Fn(&mut Client, P11Call) -> Result<T, ClientError>,
        build: impl Fn(&mut P11Call),
    ) -> Result<T, Rv> {
        let token = self.token()?;
        self.with(|c| {
            let mut call = P11Call::new(copy(&token));
            build(&mut call);
            f(c, call)
        })
        .inspect_err(|rv| self.lapsed(*rv, &token))
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
            ErrorCode::Pkcs11 => keys::rv_named(e),
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
    /// A signature or verification in progress.
    sign: Option<keys::SignOp>,
}

/// A mechanism as the module takes it, its parameters read from the
/// caller's structures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mechanism {
    /// `CKM_AES_GCM` with its IV and AAD (`ulTagBits` checked: 128).
    AesGcm {
        /// The IV: 12 bytes.
        iv: [u8; 12],
        /// Additional authenticated data.
        aad: Vec<u8>,
    },
    /// `CKM_AES_CBC_PAD` with its IV.
    AesCbcPad {
        /// The IV.
        iv: [u8; 16],
    },
    /// `CKM_RSA_PKCS_OAEP` (`CK_RSA_PKCS_OAEP_PARAMS`).
    Oaep {
        /// `hashAlg`.
        hash: CK_MECHANISM_TYPE,
        /// `mgf`.
        mgf: CK_ULONG,
        /// The label (`CKZ_DATA_SPECIFIED` source), empty if none.
        label: Vec<u8>,
    },
    /// `CKM_RSA_PKCS_PSS` or a `CKM_SHAn_RSA_PKCS_PSS`
    /// (`CK_RSA_PKCS_PSS_PARAMS`).
    Pss {
        /// The mechanism.
        mechanism: CK_MECHANISM_TYPE,
        /// `hashAlg`.
        hash: CK_MECHANISM_TYPE,
        /// `mgf`.
        mgf: CK_ULONG,
        /// `sLen`.
        salt: CK_ULONG,
    },
    /// A mechanism without parameters.
    Plain(CK_MECHANISM_TYPE),
}

impl Mechanism {
    /// The mechanism type.
    pub fn kind(&self) -> CK_MECHANISM_TYPE {
        match self {
            Mechanism::AesGcm { .. } => CKM_AES_GCM,
            Mechanism::AesCbcPad { .. } => CKM_AES_CBC_PAD,
            Mechanism::Oaep { .. } => CKM_RSA_PKCS_OAEP,
            Mechanism::Pss { mechanism, .. } => *mechanism,
            Mechanism::Plain(m) => *m,
        }
    }

    /// The parameter as the sidecar takes it (PROTOCOL.md): an IV, or
    /// big-endian u64 fields.
    fn param(&self) -> Vec<u8> {
        // CK_ULONG is 64 bits on every platform the module builds for.
        let be = |v: &[CK_ULONG]| v.iter().flat_map(|x| x.to_be_bytes()).collect();
        match self {
            Mechanism::AesGcm { iv, .. } => iv.to_vec(),
            Mechanism::AesCbcPad { iv } => iv.to_vec(),
            Mechanism::Oaep { hash, mgf, .. } => be(&[*hash, *mgf]),
            Mechanism::Pss {
                hash, mgf, salt, ..
            } => be(&[*hash, *mgf, *salt]),
            Mechanism::Plain(_) => Vec::new(),
        }
    }

    /// GCM's AAD or OAEP's label.
    fn aad(&self) -> Vec<u8> {
        match self {
            Mechanism::AesGcm { aad, .. } => aad.clone(),
            Mechanism::Oaep { label, .. } => label.clone(),
            _ => Vec::new(),
        }
    }
}

/// An encryption or decryption: its key, mechanism and the data the
/// multi-part calls gave so far (the sidecar answers at the end: a GCM
/// decryption releases nothing before the tag verifies). A result too
/// long for the caller's buffer is kept for the call that brings room.
struct Crypt {
    encrypt: bool,
    key: Source,
    /// The key's size in bytes (RSA: the modulus's), for output lengths.
    key_len: usize,
    mechanism: Mechanism,
    data: zeroize::Zeroizing<Vec<u8>>,
    result: Option<zeroize::Zeroizing<Vec<u8>>>,
}

impl Crypt {
    /// The most the output can be for `n` bytes in.
    fn bound(&self, n: usize) -> Result<usize, Rv> {
        let short = if self.encrypt {
            CKR_DATA_LEN_RANGE
        } else {
            CKR_ENCRYPTED_DATA_LEN_RANGE
        };
        match (&self.mechanism, self.encrypt) {
            (Mechanism::AesGcm { .. }, true) => Ok(n + GCM_TAG_LEN),
            (Mechanism::AesGcm { .. }, false) => n.checked_sub(GCM_TAG_LEN).ok_or(short),
            (Mechanism::AesCbcPad { .. }, true) => Ok((n / 16 + 1) * 16),
            (Mechanism::AesCbcPad { .. }, false) if n > 0 && n.is_multiple_of(16) => Ok(n),
            (Mechanism::Oaep { .. }, _) => Ok(self.key_len),
            _ => Err(short),
        }
    }
}

/// Where an object lives in the sidecar.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    /// A master key, by name.
    Master(String),
    /// A token or session object, by id.
    Token(u64),
}

impl Source {
    fn key(&self) -> P11Key {
        match self {
            Source::Master(n) => P11Key::Master(n.clone()),
            Source::Token(id) => P11Key::Object(*id),
        }
    }
}

/// An object's attributes; `None` is a sensitive one, whose value never
/// leaves the HSM (`CKR_ATTRIBUTE_SENSITIVE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    slot: usize,
    source: Source,
    /// The session that made it, for a session object this module made.
    session: Option<CK_SESSION_HANDLE>,
    attrs: Vec<(CK_ATTRIBUTE_TYPE, Option<Vec<u8>>)>,
}

fn ulong_bytes(v: CK_ULONG) -> Vec<u8> {
    v.to_ne_bytes().to_vec()
}

impl Object {
    /// A master key as a PKCS#11 AES secret key: private (seen only after
    /// a login), sensitive, never extractable; it encrypts and decrypts
    /// with `CKM_AES_GCM` only, and cannot be changed or destroyed here
    /// (`tde key` manages it).
    fn master_key(slot: usize, k: &KeyInfo) -> Object {
        let yes = |b: bool| Some(vec![u8::from(b)]);
        let ulong = |v: CK_ULONG| Some(ulong_bytes(v));
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
            (CKA_ALLOWED_MECHANISMS, ulong(CKM_AES_GCM)),
        ];
        Object {
            slot,
            source: Source::Master(k.name.clone()),
            session: None,
            attrs,
        }
    }

    /// A token or session object as the sidecar shows it, with the
    /// attributes it keeps secret marked sensitive.
    fn token(slot: usize, o: &P11ObjectInfo, session: Option<CK_SESSION_HANDLE>) -> Object {
        let mut object = Object {
            slot,
            source: Source::Token(o.id),
            session,
            attrs: o.attrs.iter().map(|(t, v)| (*t, Some(v.clone()))).collect(),
        };
        let secret: &[CK_ATTRIBUTE_TYPE] =
            match (object.ulong(CKA_CLASS), object.ulong(CKA_KEY_TYPE)) {
                (Some(CKO_SECRET_KEY), _) | (Some(CKO_PRIVATE_KEY), Some(CKK_EC)) => &[CKA_VALUE],
                (Some(CKO_PRIVATE_KEY), Some(CKK_RSA)) => &[
                    CKA_PRIVATE_EXPONENT,
                    CKA_PRIME_1,
                    CKA_PRIME_2,
                    CKA_EXPONENT_1,
                    CKA_EXPONENT_2,
                    CKA_COEFFICIENT,
                ],
                _ => &[],
            };
        object.attrs.extend(secret.iter().map(|t| (*t, None)));
        object
    }

    /// A `CK_ULONG` attribute.
    fn ulong(&self, t: CK_ATTRIBUTE_TYPE) -> Option<CK_ULONG> {
        let v = self.attribute(t).ok().flatten()?;
        Some(CK_ULONG::from_ne_bytes(v.try_into().ok()?))
    }

    /// A `CK_BBOOL` attribute, false if absent.
    fn flag(&self, t: CK_ATTRIBUTE_TYPE) -> bool {
        self.attribute(t) == Ok(Some(&[1u8][..]))
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
    handles: HashMap<(usize, Source), CK_OBJECT_HANDLE>,
    next_object: CK_OBJECT_HANDLE,
}

impl State {
    /// The handle of an object (the same one each time it is seen), its
    /// attributes as now known.
    fn install(&mut self, object: Object) -> CK_OBJECT_HANDLE {
        let next = self.next_object;
        let h = *self
            .handles
            .entry((object.slot, object.source.clone()))
            .or_insert(next);
        if h == next {
            self.next_object += 1;
        }
        match self.objects.get_mut(&h) {
            // A session object keeps the session that made it.
            Some(o) => {
                o.attrs = object.attrs;
            }
            None => {
                self.objects.insert(h, object);
            }
        }
        h
    }

    /// Forgets an object.
    fn forget(&mut self, h: CK_OBJECT_HANDLE) {
        if let Some(o) = self.objects.remove(&h) {
            self.handles.remove(&(o.slot, o.source));
        }
    }
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

thread_local! {
    /// The state's lock, held by a thread that forks from just before the
    /// fork until just after it (the handlers [`crate::ffi`] registers with
    /// `pthread_atfork`): another thread cannot hold it at the fork, so a
    /// child never finds it locked by a thread it does not have.
    static HELD: std::cell::RefCell<Option<MutexGuard<'static, Option<State>>>> =
        const { std::cell::RefCell::new(None) };
}

/// Before `fork()`: takes the state's lock in the forking thread.
pub fn before_fork() {
    let g = lock(&STATE);
    HELD.with(|h| *h.borrow_mut() = Some(g));
}

/// After `fork()`, in the parent and in the child: lets the lock go.
pub fn after_fork() {
    HELD.with(|h| drop(h.borrow_mut().take()));
}

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
    initialize_with(Config::load().map_err(|_| CKR_GENERAL_ERROR)?)
}

/// [`initialize`] with a configuration the caller made (`tde pkcs11`).
pub fn initialize_with(config: Config) -> Result<(), Rv> {
    let mut g = lock(&STATE);
    if let Some(s) = &*g
        && s.pid == std::process::id()
    {
        return Err(CKR_CRYPTOKI_ALREADY_INITIALIZED);
    }
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
        next_object: 1,
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
                sign: None,
            },
        );
        Ok(h)
    })
}

/// `C_CloseSession`. The last session of a slot logs out (PKCS#11 v3.0
/// section 5.6).
pub fn close_session(h: CK_SESSION_HANDLE) -> Result<(), Rv> {
    let (slot, last, mine) = with_state(|s| {
        let x = s.sessions.remove(&h).ok_or(CKR_SESSION_HANDLE_INVALID)?;
        let last = !s.sessions.values().any(|o| o.slot == x.slot);
        // The session objects it made end with it.
        let mine: Vec<(CK_OBJECT_HANDLE, Source)> = s
            .objects
            .iter()
            .filter(|(_, o)| o.session == Some(h))
            .map(|(k, o)| (*k, o.source.clone()))
            .collect();
        for (k, _) in &mine {
            s.forget(*k);
        }
        Ok((s.slots[x.slot].clone(), last, mine))
    })?;
    if last {
        slot.logout();
    } else {
        for (_, source) in mine {
            let _ = slot.call(
                |c, call| c.p11_done(Op::P11Destroy, call),
                |call| call.key = source.key(),
            );
        }
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
    forget_session_objects(id as usize);
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

/// `C_Logout`. The sidecar ends the login's session objects.
pub fn logout(h: CK_SESSION_HANDLE) -> Result<(), Rv> {
    let slot = session_slot(h)?;
    if slot.logout() {
        let index = with_state(|s| Ok(s.sessions.get(&h).map_or(0, |x| x.slot)))?;
        forget_session_objects(index);
        Ok(())
    } else {
        Err(CKR_USER_NOT_LOGGED_IN)
    }
}

/// Forgets a slot's session objects (its login ended, and they with it).
fn forget_session_objects(slot: usize) {
    let _ = with_state(|s| {
        let gone: Vec<CK_OBJECT_HANDLE> = s
            .objects
            .iter()
            .filter(|(_, o)| o.slot == slot && o.session.is_some())
            .map(|(k, _)| *k)
            .collect();
        for k in gone {
            s.forget(k);
        }
        Ok(())
    });
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
    let (keys, objects) = match slot.token() {
        Ok(t) => slot
            .with(|c| c.p11_objects(&t))
            .inspect_err(|rv| slot.lapsed(*rv, &t))?,
        Err(_) => (Vec::new(), Vec::new()),
    };
    with_state(|s| {
        let mut found = std::collections::VecDeque::new();
        // What the sidecar no longer has (destroyed by another process,
        // ended with a login) is gone here too.
        let live: std::collections::HashSet<u64> = objects.iter().map(|o| o.id).collect();
        let stale: Vec<CK_OBJECT_HANDLE> = s
            .objects
            .iter()
            .filter(|(_, o)| {
                o.slot == slot_index && matches!(o.source, Source::Token(id) if !live.contains(&id))
            })
            .map(|(k, _)| *k)
            .collect();
        for k in stale {
            s.forget(k);
        }
        let all = keys
            .iter()
            .map(|k| Object::master_key(slot_index, k))
            .chain(objects.iter().map(|o| Object::token(slot_index, o, None)));
        for object in all {
            let matches = object.matches(template);
            let handle = s.install(object);
            if matches {
                found.push_back(handle);
            }
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

/// The object behind a key handle, as the session may see it.
fn key_object(h: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE) -> Result<Object, Rv> {
    object(h, key).map_err(|rv| {
        if rv == CKR_OBJECT_HANDLE_INVALID {
            CKR_KEY_HANDLE_INVALID
        } else {
            rv
        }
    })
}

/// `C_EncryptInit` / `C_DecryptInit`: a master key (`CKM_AES_GCM`), an
/// AES token key (`CKM_AES_GCM`, `CKM_AES_CBC_PAD`) or an RSA key
/// (`CKM_RSA_PKCS_OAEP`: public to encrypt, private to decrypt), whose
/// attributes allow it, under a crypto user's login.
pub fn crypt_init(
    h: CK_SESSION_HANDLE,
    encrypt: bool,
    mechanism: Mechanism,
    key: CK_OBJECT_HANDLE,
) -> Result<(), Rv> {
    let object = key_object(h, key)?;
    let allowed = if encrypt { CKA_ENCRYPT } else { CKA_DECRYPT };
    if !object.flag(allowed) {
        return Err(CKR_KEY_FUNCTION_NOT_PERMITTED);
    }
    let key_type = object.ulong(CKA_KEY_TYPE);
    // A master key takes CKM_AES_GCM only (its CKA_ALLOWED_MECHANISMS).
    if matches!(object.source, Source::Master(_)) && mechanism.kind() != CKM_AES_GCM {
        return Err(CKR_MECHANISM_INVALID);
    }
    let key_len = match (&mechanism, key_type) {
        (Mechanism::AesGcm { .. }, Some(CKK_AES)) => 0,
        (Mechanism::AesCbcPad { .. }, Some(CKK_AES)) => 0,
        (Mechanism::Oaep { .. }, Some(CKK_RSA)) => object
            .attribute(CKA_MODULUS)
            .ok()
            .flatten()
            .map_or(0, <[u8]>::len),
        (Mechanism::AesGcm { .. } | Mechanism::AesCbcPad { .. } | Mechanism::Oaep { .. }, _) => {
            return Err(CKR_KEY_TYPE_INCONSISTENT);
        }
        _ => return Err(CKR_MECHANISM_INVALID),
    };
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
            key: object.source.clone(),
            key_len,
            mechanism,
            data: zeroize::Zeroizing::new(Vec::new()),
            result: None,
        });
        Ok(())
    })
}

/// `C_EncryptUpdate` / `C_DecryptUpdate`: keeps the part (the sidecar
/// answers at the end), so nothing is output now.
pub fn crypt_update(h: CK_SESSION_HANDLE, encrypt: bool, part: &[u8]) -> Result<(), Rv> {
    with_session(h, |x| {
        let c = x
            .crypt
            .as_mut()
            .filter(|c| c.encrypt == encrypt && c.result.is_none())
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
/// length the caller must make room for (PKCS#11 section 5.2: a length
/// query answers the most it can be; a buffer too small gets the exact
/// length, and the result waits for the next call).
pub fn crypt_final(
    h: CK_SESSION_HANDLE,
    encrypt: bool,
    last: &[u8],
    out: Out,
) -> Result<Result<zeroize::Zeroizing<Vec<u8>>, usize>, Rv> {
    enum Next {
        Done(zeroize::Zeroizing<Vec<u8>>),
        Ask(Source, Mechanism, zeroize::Zeroizing<Vec<u8>>, Arc<Slot>),
    }
    let next = with_state(|s| {
        let x = s.sessions.get(&h).ok_or(CKR_SESSION_HANDLE_INVALID)?;
        let c = x
            .crypt
            .as_ref()
            .filter(|c| c.encrypt == encrypt)
            .ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
        if let Some(r) = &c.result {
            return Ok(Ok(Next::Done(r.clone())));
        }
        let mut data = zeroize::Zeroizing::new(Vec::with_capacity(c.data.len() + last.len()));
        data.extend_from_slice(&c.data);
        data.extend_from_slice(last);
        if data.len() > tde_protocol::message::MAX_P11_DATA {
            return Err(if encrypt {
                CKR_DATA_LEN_RANGE
            } else {
                CKR_ENCRYPTED_DATA_LEN_RANGE
            });
        }
        let bound = c.bound(data.len())?;
        if out == Out::Length {
            return Ok(Err(bound));
        }
        Ok(Ok(Next::Ask(
            c.key.clone(),
            c.mechanism.clone(),
            data,
            s.slots[x.slot].clone(),
        )))
    })?;
    let result = match next {
        Err(bound) => return Ok(Err(bound)),
        Ok(Next::Done(r)) => r,
        Ok(Next::Ask(key, mechanism, data, slot)) => {
            let op = if encrypt {
                Op::P11Encrypt
            } else {
                Op::P11Decrypt
            };
            let r = slot.call(
                |c, call| c.p11_data(op, call),
                |call| {
                    call.key = key.key();
                    call.mechanism = mechanism.kind();
                    call.param = mechanism.param();
                    call.aad = mechanism.aad();
                    call.data = SecretBytes::from_slice(&data);
                },
            );
            let r = zeroize::Zeroizing::new(r?.expose().to_vec());
            // Kept until the caller has room for it.
            with_session(h, |x| {
                if let Some(c) = x.crypt.as_mut() {
                    c.result = Some(r.clone());
                }
                Ok(())
            })?;
            r
        }
    };
    match out {
        Out::Buffer(n) if n >= result.len() => {
            crypt_abort(h);
            Ok(Ok(result))
        }
        _ => Ok(Err(result.len())),
    }
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
