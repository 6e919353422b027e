//! Typed requests and responses, and their body encodings.
//!
//! Each message is a set of fields (see [`crate::codec`]) named by the tags
//! in [`tag`]. A tag has one meaning everywhere. Decoders refuse unknown tags,
//! duplicates of single fields, and missing required fields.

use std::collections::BTreeMap;

use crate::codec::{Reader, Writer, as_bool, as_str, as_u32, as_u64, once, required};
use crate::error::{DecodeError, ErrorCode};
use crate::frame::{Body, Frame, FrameKind, Header, PROTOCOL_VERSION};
use crate::secret::SecretBytes;

/// Field tags. The numbers are part of the protocol.
pub mod tag {
    /// Master key name (string).
    pub const KEY_NAME: u8 = 1;
    /// Master key version (u32).
    pub const KEY_VERSION: u8 = 2;
    /// One encryption-context entry: `u16 BE key length | key | value`.
    pub const CONTEXT: u8 = 3;
    /// Plaintext key bytes (secret).
    pub const PLAINTEXT: u8 = 4;
    /// Wrapped key blob (bytes).
    pub const CIPHERTEXT: u8 = 5;
    /// A byte count (u32).
    pub const LENGTH: u8 = 6;
    /// Human-readable message: an error's, or a reload's summary (string).
    pub const MESSAGE: u8 = 7;
    /// Operator name (string).
    pub const OPERATOR: u8 = 8;
    /// Operator password (secret bytes).
    pub const PASSWORD: u8 = 9;
    /// Operator role (string).
    pub const ROLE: u8 = 10;
    /// Unseal share (secret bytes, the share's text form).
    pub const SHARE: u8 = 11;
    /// Key description (string).
    pub const DESCRIPTION: u8 = 12;
    /// A number of days (u32).
    pub const DAYS: u8 = 13;
    /// Source key version of a re-encrypt (u32).
    pub const SOURCE_VERSION: u8 = 14;
    /// A key description record.
    pub const KEY_INFO: u8 = 15;
    /// A key version record (inside `KEY_INFO`).
    pub const VERSION_INFO: u8 = 16;
    /// A state name (string).
    pub const STATE: u8 = 17;
    /// Creation time, Unix seconds (u64).
    pub const CREATED: u8 = 18;
    /// Scheduled destruction time, Unix seconds (u64).
    pub const DESTROY_AT: u8 = 19;
    /// Primary version (u32).
    pub const PRIMARY_VERSION: u8 = 20;
    /// Sealed flag (bool).
    pub const SEALED: u8 = 21;
    /// Initialized flag (bool).
    pub const INITIALIZED: u8 = 22;
    /// Unseal threshold (u32).
    pub const THRESHOLD: u8 = 23;
    /// Number of shares (u32).
    pub const SHARES: u8 = 24;
    /// Shares given so far (u32).
    pub const PROGRESS: u8 = 25;
    /// Dev mode flag (bool).
    pub const DEV_MODE: u8 = 26;
    /// Server version (string).
    pub const SERVER_VERSION: u8 = 27;
    /// An operator record.
    pub const OPERATOR_INFO: u8 = 28;
    /// Locked flag (bool).
    pub const LOCKED: u8 = 29;
    /// Consecutive failed logins (u32).
    pub const FAILED_LOGINS: u8 = 30;
    /// Zeroized flag (bool).
    pub const ZEROIZED: u8 = 31;
    /// Tampered flag (bool).
    pub const TAMPERED: u8 = 33;
    /// Number of keys (u32).
    pub const KEY_COUNT: u8 = 34;
    /// Random bytes (secret).
    pub const RANDOM: u8 = 35;
    /// A data key version, as recorded in each page (u32).
    pub const DEK_VERSION: u8 = 36;
    /// A registered wrapped data key (record: `CONTEXT`s, `DEK_VERSION`,
    /// `KEY_VERSION`, `LOCATION`, `LAST_SEEN`).
    pub const REFERENCE: u8 = 37;
    /// Where a registered data key lives, e.g. a backing directory (string).
    pub const LOCATION: u8 = 38;
    /// When a registration was last confirmed, Unix seconds (u64).
    pub const LAST_SEEN: u8 = 39;
    /// Automatic rotation period in seconds, 0 for off (u64).
    pub const ROTATE_AFTER: u8 = 40;
    /// Override a safety check (bool).
    pub const FORCE: u8 = 41;
    /// How long to wait, milliseconds (u32).
    pub const TIMEOUT_MS: u8 = 42;
    /// One data key of a registration (record: `DEK_VERSION`, `KEY_VERSION`).
    pub const DEK: u8 = 43;
    /// The operator that created a key (string).
    pub const OWNER: u8 = 44;
    /// A crypto user a key is shared with (string; repeated).
    pub const SHARED_WITH: u8 = 45;
    /// An operator session token (secret bytes).
    pub const TOKEN: u8 = 46;
    /// A token's lifetime in seconds (u64).
    pub const TOKEN_TTL: u8 = 47;
    /// Names a re-split attempt (string).
    pub const NONCE: u8 = 48;
    /// The threshold a re-split makes (u32).
    pub const NEW_THRESHOLD: u8 = 49;
    /// A request waiting for approvals (record: `APPROVAL_ID`,
    /// `DESCRIPTION`, `OPERATOR`, `APPROVED_BY`*, `THRESHOLD`, `STATE`,
    /// `EXPIRES`, `MESSAGE`?).
    pub const APPROVAL_INFO: u8 = 50;
    /// Number of a request waiting for approvals (u64).
    pub const APPROVAL_ID: u8 = 51;
    /// An officer who approved (string; repeated).
    pub const APPROVED_BY: u8 = 52;
    /// When a request stops waiting, Unix seconds (u64).
    pub const EXPIRES: u8 = 53;
    /// A custodian's OpenPGP public key, binary or armored (bytes;
    /// repeated, one per new share).
    pub const CUSTODIAN_KEY: u8 = 54;
    /// A custodian key's fingerprint, upper-case hex (string; repeated).
    pub const FINGERPRINT: u8 = 55;
    /// A new share encrypted to a custodian key: an ASCII-armored OpenPGP
    /// message (string; repeated).
    pub const ENCRYPTED_SHARE: u8 = 56;
    /// Audit records at or after this time, Unix milliseconds (u64).
    pub const SINCE_MS: u8 = 57;
    /// Audit records before this time, Unix milliseconds (u64).
    pub const UNTIL_MS: u8 = 58;
    /// First audit sequence number of a range (u64).
    pub const FIRST_SEQ: u8 = 59;
    /// Last audit sequence number of a range; in a page, the log's newest
    /// (u64).
    pub const LAST_SEQ: u8 = 60;
    /// Most audit records to return (u32).
    pub const LIMIT: u8 = 61;
    /// Return the newest matching audit records (bool).
    pub const NEWEST: u8 = 62;
    /// Audit filter: operator, client policy or `uid:N` (string).
    pub const ACTOR: u8 = 63;
    /// Audit filter: operation name (string).
    pub const OPERATION: u8 = 64;
    /// Audit filter: `ok`, `error` or `pending` (string).
    pub const RESULT: u8 = 65;
    /// One audit record, its stored JSON verbatim (string; repeated).
    pub const RECORD: u8 = 66;
    /// The store id, hex (string).
    pub const STORE_ID: u8 = 67;
    /// The node id (string).
    pub const NODE: u8 = 68;
    /// One signed audit checkpoint line (string; repeated).
    pub const CHECKPOINT: u8 = 69;
    /// An audit signing key version (record; repeated).
    pub const AUDIT_KEY: u8 = 70;
    /// An Ed25519 public key, 32 bytes (bytes).
    pub const PUBLIC_KEY: u8 = 71;
    /// An audit sink's state in a status (record; repeated).
    pub const AUDIT_SINK: u8 = 72;
    /// Records an audit sink has still to be given (u64).
    pub const LAG: u8 = 73;
    /// Blocks a re-key has re-encrypted (u64).
    pub const BLOCKS_DONE: u8 = 74;
    /// Blocks a re-key has to go through (u64).
    pub const BLOCKS_TOTAL: u8 = 75;
    /// A PKCS#11 initialization vector (bytes).
    pub const IV: u8 = 76;
    /// PKCS#11 additional authenticated data (bytes).
    pub const AAD: u8 = 77;
    /// PKCS#11 input or output data (bytes).
    pub const DATA: u8 = 78;
    /// A PKCS#11 mechanism type, `CKM_*` (u64).
    pub const MECHANISM: u8 = 79;
    /// A PKCS#11 token or session object's id (u64).
    pub const OBJECT: u8 = 80;
    /// The object a `p11_wrap` wraps (u64).
    pub const TARGET: u8 = 81;
    /// A signature to verify (bytes).
    pub const SIGNATURE: u8 = 82;
    /// One attribute of a template or object: `u64 BE type | value`
    /// (bytes; repeated).
    pub const ATTR: u8 = 83;
    /// One attribute of a key pair's public-key template (as `ATTR`).
    pub const PUBLIC_ATTR: u8 = 84;
    /// A PKCS#11 object: `OBJECT` and its `ATTR`s (record; repeated).
    pub const P11_OBJECT: u8 = 85;
    /// More objects follow: ask again after the last id (bool).
    pub const MORE: u8 = 86;
}

mod audit;
pub use audit::{AuditKeyInfo, AuditPage, AuditQuery, AuditRange, MAX_RECORD, MAX_RECORDS};

/// Operation codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Op {
    /// Seal state and version; both sockets, no authentication.
    Status = 0x0001,
    /// Generate a data key under a master key.
    GenerateDataKey = 0x0101,
    /// Unwrap a data key.
    Decrypt = 0x0102,
    /// Rewrap a data key under the primary version.
    ReEncrypt = 0x0103,
    /// Random bytes from the HSM's CSPRNG.
    GenerateRandom = 0x0104,
    /// Give one unseal share.
    Unseal = 0x0201,
    /// Seal: wipe keys from memory.
    Seal = 0x0202,
    /// Operator login for this connection.
    Login = 0x0203,
    /// Zeroize: wipe memory and destroy the sealed root.
    Zeroize = 0x0204,
    /// Re-read the daemon's configuration (as SIGHUP does).
    Reload = 0x0205,
    /// Make a session token for the operator logged in on this connection.
    TokenCreate = 0x0206,
    /// Log this connection in with a session token.
    TokenLogin = 0x0207,
    /// Revoke a session token.
    TokenRevoke = 0x0208,
    /// Start a re-split of the unseal shares.
    ResplitInit = 0x0209,
    /// Give one current share to the re-split.
    ResplitUpdate = 0x020A,
    /// Where the re-split stands.
    ResplitStatus = 0x020B,
    /// Cancel the re-split.
    ResplitCancel = 0x020C,
    /// List the requests waiting for approvals.
    ApprovalList = 0x0501,
    /// Approve a waiting request (another crypto officer).
    Approve = 0x0502,
    /// One request's approvals and outcome.
    ApprovalStatus = 0x0503,
    /// Add an operator.
    OperatorAdd = 0x0301,
    /// Change an operator's password.
    OperatorPasswd = 0x0302,
    /// Unlock a locked operator.
    OperatorUnlock = 0x0303,
    /// Remove an operator.
    OperatorRemove = 0x0305,
    /// List operators.
    OperatorList = 0x0304,
    /// Create a master key.
    KeyCreate = 0x0401,
    /// List master keys.
    KeyList = 0x0402,
    /// Describe a master key.
    KeyDescribe = 0x0403,
    /// Rotate: new primary version.
    KeyRotate = 0x0404,
    /// Disable a version or all versions.
    KeyDisable = 0x0405,
    /// Enable a version or all versions.
    KeyEnable = 0x0406,
    /// Schedule destruction after a waiting period.
    KeyScheduleDestroy = 0x0407,
    /// Cancel a scheduled destruction.
    KeyCancelDestroy = 0x0408,
    /// Destroy now.
    KeyDestroy = 0x0409,
    /// Set a key's automatic rotation period.
    KeySetRotation = 0x040A,
    /// Let a crypto user use a key over the admin socket.
    KeyShare = 0x040B,
    /// Take a crypto user's use of a key away.
    KeyUnshare = 0x040C,
    /// Register the wrapped data keys of one context (a tablespace) and
    /// learn the key's primary version.
    RegisterDeks = 0x0105,
    /// Wait until a key's primary version differs from a known one.
    WatchKey = 0x0106,
    /// A mount reports where its re-key stands (for the audit log).
    RekeyReport = 0x0107,
    /// List audit records with filters (auditors and officers).
    AuditList = 0x0601,
    /// Start an export: fix its range and sign a checkpoint over it.
    AuditExport = 0x0602,
    /// Read a page of an export's range, verbatim.
    AuditRead = 0x0603,
    /// Record that an export's range left the host (it may be pruned).
    AuditExportDone = 0x0604,
    /// Delete exported records before a time, leaving a checkpoint.
    AuditPrune = 0x0605,
    /// The audit signing key's public keys.
    AuditPubkey = 0x0606,
    /// Rotate the audit signing key (officers).
    AuditKeyRotate = 0x0607,
    /// PKCS#11 `C_Login` on the data socket: an operator's password for a
    /// session token the module's other connections use.
    P11Login = 0x0701,
    /// PKCS#11 `C_Logout`: the token ends.
    P11Logout = 0x0702,
    /// PKCS#11 objects: the master keys the token's login may use, and
    /// its token and session objects, a page at a time.
    P11Objects = 0x0703,
    /// PKCS#11 `C_Encrypt` under a master key or an object.
    P11Encrypt = 0x0704,
    /// PKCS#11 `C_Decrypt` under a master key or an object.
    P11Decrypt = 0x0705,
    /// PKCS#11 `C_Sign` with a private key.
    P11Sign = 0x0706,
    /// PKCS#11 `C_Verify` with a public key.
    P11Verify = 0x0707,
    /// PKCS#11 `C_GenerateKey` / `C_GenerateKeyPair`.
    P11Generate = 0x0708,
    /// PKCS#11 `C_CreateObject`: a certificate or a data object.
    P11Create = 0x0709,
    /// PKCS#11 `C_DestroyObject`.
    P11Destroy = 0x070a,
    /// PKCS#11 `C_SetAttributeValue` (`CKA_LABEL`, `CKA_ID`).
    P11SetAttributes = 0x070b,
    /// PKCS#11 `C_WrapKey`.
    P11Wrap = 0x070c,
    /// PKCS#11 `C_UnwrapKey`.
    P11Unwrap = 0x070d,
}

impl Op {
    /// Every operation.
    pub const ALL: &'static [Op] = &[
        Op::Status,
        Op::GenerateDataKey,
        Op::Decrypt,
        Op::ReEncrypt,
        Op::GenerateRandom,
        Op::Unseal,
        Op::Seal,
        Op::Login,
        Op::Zeroize,
        Op::Reload,
        Op::TokenCreate,
        Op::TokenLogin,
        Op::TokenRevoke,
        Op::ResplitInit,
        Op::ResplitUpdate,
        Op::ResplitStatus,
        Op::ResplitCancel,
        Op::ApprovalList,
        Op::Approve,
        Op::ApprovalStatus,
        Op::OperatorAdd,
        Op::OperatorPasswd,
        Op::OperatorUnlock,
        Op::OperatorRemove,
        Op::OperatorList,
        Op::KeyCreate,
        Op::KeyList,
        Op::KeyDescribe,
        Op::KeyRotate,
        Op::KeyDisable,
        Op::KeyEnable,
        Op::KeyScheduleDestroy,
        Op::KeyCancelDestroy,
        Op::KeyDestroy,
        Op::KeySetRotation,
        Op::KeyShare,
        Op::KeyUnshare,
        Op::RegisterDeks,
        Op::WatchKey,
        Op::RekeyReport,
        Op::AuditList,
        Op::AuditExport,
        Op::AuditRead,
        Op::AuditExportDone,
        Op::AuditPrune,
        Op::AuditPubkey,
        Op::AuditKeyRotate,
        Op::P11Login,
        Op::P11Logout,
        Op::P11Objects,
        Op::P11Encrypt,
        Op::P11Decrypt,
        Op::P11Sign,
        Op::P11Verify,
        Op::P11Generate,
        Op::P11Create,
        Op::P11Destroy,
        Op::P11SetAttributes,
        Op::P11Wrap,
        Op::P11Unwrap,
    ];

    /// The operation for a wire code.
    pub fn from_u16(v: u16) -> Option<Op> {
        Op::ALL.iter().copied().find(|op| *op as u16 == v)
    }

    /// The name used in audit records and policies, e.g. `generate_data_key`.
    pub fn name(self) -> &'static str {
        match self {
            Op::Status => "status",
            Op::GenerateDataKey => "generate_data_key",
            Op::Decrypt => "decrypt",
            Op::ReEncrypt => "re_encrypt",
            Op::GenerateRandom => "generate_random",
            Op::Unseal => "unseal",
            Op::Seal => "seal",
            Op::Login => "login",
            Op::Zeroize => "zeroize",
            Op::Reload => "reload",
            Op::TokenCreate => "token_create",
            Op::TokenLogin => "token_login",
            Op::TokenRevoke => "token_revoke",
            Op::ResplitInit => "resplit_init",
            Op::ResplitUpdate => "resplit_update",
            Op::ResplitStatus => "resplit_status",
            Op::ResplitCancel => "resplit_cancel",
            Op::ApprovalList => "approval_list",
            Op::Approve => "approve",
            Op::ApprovalStatus => "approval_status",
            Op::OperatorAdd => "operator_add",
            Op::OperatorPasswd => "operator_passwd",
            Op::OperatorUnlock => "operator_unlock",
            Op::OperatorRemove => "operator_remove",
            Op::OperatorList => "operator_list",
            Op::KeyCreate => "key_create",
            Op::KeyList => "key_list",
            Op::KeyDescribe => "key_describe",
            Op::KeyRotate => "key_rotate",
            Op::KeyDisable => "key_disable",
            Op::KeyEnable => "key_enable",
            Op::KeyScheduleDestroy => "key_schedule_destroy",
            Op::KeyCancelDestroy => "key_cancel_destroy",
            Op::KeyDestroy => "key_destroy",
            Op::KeySetRotation => "key_set_rotation",
            Op::KeyShare => "key_share",
            Op::KeyUnshare => "key_unshare",
            Op::RegisterDeks => "register_deks",
            Op::WatchKey => "watch_key",
            Op::RekeyReport => "rekey_report",
            Op::AuditList => "audit_list",
            Op::AuditExport => "audit_export",
            Op::AuditRead => "audit_read",
            Op::AuditExportDone => "audit_export_done",
            Op::AuditPrune => "audit_prune",
            Op::AuditPubkey => "audit_pubkey",
            Op::AuditKeyRotate => "audit_key_rotate",
            Op::P11Login => "p11_login",
            Op::P11Logout => "p11_logout",
            Op::P11Objects => "p11_objects",
            Op::P11Encrypt => "p11_encrypt",
            Op::P11Decrypt => "p11_decrypt",
            Op::P11Sign => "p11_sign",
            Op::P11Verify => "p11_verify",
            Op::P11Generate => "p11_generate",
            Op::P11Create => "p11_create",
            Op::P11Destroy => "p11_destroy",
            Op::P11SetAttributes => "p11_set_attributes",
            Op::P11Wrap => "p11_wrap",
            Op::P11Unwrap => "p11_unwrap",
        }
    }

    /// True for the data-key operations served on the data socket.
    pub fn is_data_op(self) -> bool {
        matches!(
            self,
            Op::GenerateDataKey
                | Op::Decrypt
                | Op::ReEncrypt
                | Op::GenerateRandom
                | Op::RegisterDeks
                | Op::WatchKey
                | Op::RekeyReport
                | Op::P11Login
                | Op::P11Logout
                | Op::P11Objects
                | Op::P11Encrypt
                | Op::P11Decrypt
                | Op::P11Sign
                | Op::P11Verify
                | Op::P11Generate
                | Op::P11Create
                | Op::P11Destroy
                | Op::P11SetAttributes
                | Op::P11Wrap
                | Op::P11Unwrap
        )
    }
}

/// An encryption context: string keys to string values, bound to a wrapped
/// key as additional authenticated data.
pub type Context = BTreeMap<String, String>;

/// `cluster=c1,tablespace=ts`: a context for people (logs, errors, CLI).
pub fn context_display(context: &Context) -> String {
    context
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A request.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// See [`Op::Status`].
    Status,
    /// See [`Op::GenerateDataKey`].
    GenerateDataKey {
        /// Master key name.
        key: String,
        /// Encryption context.
        context: Context,
    },
    /// See [`Op::Decrypt`].
    Decrypt {
        /// Wrapped key blob.
        ciphertext: Vec<u8>,
        /// Encryption context.
        context: Context,
    },
    /// See [`Op::ReEncrypt`].
    ReEncrypt {
        /// Wrapped key blob.
        ciphertext: Vec<u8>,
        /// Encryption context.
        context: Context,
    },
    /// See [`Op::GenerateRandom`].
    GenerateRandom {
        /// Number of bytes.
        length: u32,
    },
    /// See [`Op::Unseal`].
    Unseal {
        /// One share in its text form.
        share: SecretBytes,
    },
    /// See [`Op::Seal`].
    Seal,
    /// See [`Op::Login`].
    Login {
        /// Operator name.
        operator: String,
        /// Password.
        password: SecretBytes,
    },
    /// See [`Op::Zeroize`].
    Zeroize,
    /// See [`Op::Reload`].
    Reload,
    /// See [`Op::TokenCreate`].
    TokenCreate {
        /// Lifetime asked for, seconds (the daemon may shorten it).
        ttl: u64,
    },
    /// See [`Op::P11Login`].
    P11Login {
        /// The operator.
        operator: String,
        /// The password (the PIN after `name:`).
        password: SecretBytes,
        /// `user` (`CKU_USER`: a crypto user) or `so` (`CKU_SO`: a crypto
        /// officer).
        role: String,
    },
    /// See [`Op::P11Logout`].
    P11Logout {
        /// The token [`Request::P11Login`] gave.
        token: SecretBytes,
    },
    /// See [`Op::P11Objects`].
    P11Objects {
        /// The token [`Request::P11Login`] gave.
        token: SecretBytes,
        /// The last object id of the previous page (0: the first page,
        /// which also lists the master keys).
        after: u64,
    },
    /// Every other PKCS#11 operation (`op` is one of `p11_encrypt` to
    /// `p11_unwrap`): which fields it takes is in PROTOCOL.md.
    P11(Op, P11Call),
    /// See [`Op::TokenLogin`].
    TokenLogin {
        /// The token.
        token: SecretBytes,
    },
    /// See [`Op::TokenRevoke`].
    TokenRevoke {
        /// The token.
        token: SecretBytes,
    },
    /// See [`Op::ResplitInit`].
    ResplitInit {
        /// New threshold.
        threshold: u32,
        /// New number of shares.
        shares: u32,
        /// Custodians' OpenPGP public keys, one per new share (share N
        /// is encrypted to key N), or none: the shares come back in clear.
        custodian_keys: Vec<Vec<u8>>,
    },
    /// See [`Op::ResplitUpdate`].
    ResplitUpdate {
        /// The attempt.
        nonce: String,
        /// One current share.
        share: SecretBytes,
    },
    /// See [`Op::ResplitStatus`].
    ResplitStatus,
    /// See [`Op::ResplitCancel`].
    ResplitCancel,
    /// See [`Op::ApprovalList`].
    ApprovalList,
    /// See [`Op::Approve`].
    Approve {
        /// The request.
        id: u64,
    },
    /// See [`Op::ApprovalStatus`].
    ApprovalStatus {
        /// The request.
        id: u64,
    },
    /// See [`Op::OperatorAdd`].
    OperatorAdd {
        /// Operator name.
        operator: String,
        /// Role name.
        role: String,
        /// Initial password.
        password: SecretBytes,
    },
    /// See [`Op::OperatorPasswd`].
    OperatorPasswd {
        /// Operator name.
        operator: String,
        /// New password.
        password: SecretBytes,
    },
    /// See [`Op::OperatorUnlock`].
    OperatorUnlock {
        /// Operator name.
        operator: String,
    },
    /// See [`Op::OperatorRemove`].
    OperatorRemove {
        /// Operator name.
        operator: String,
    },
    /// See [`Op::OperatorList`].
    OperatorList,
    /// See [`Op::KeyCreate`].
    KeyCreate {
        /// Key name.
        key: String,
        /// Free text.
        description: String,
        /// Automatic rotation period, seconds; 0 for none (and then not
        /// sent).
        rotate_after: u64,
    },
    /// See [`Op::KeyList`].
    KeyList,
    /// See [`Op::KeyDescribe`].
    KeyDescribe {
        /// Key name.
        key: String,
    },
    /// See [`Op::KeyRotate`].
    KeyRotate {
        /// Key name.
        key: String,
    },
    /// See [`Op::KeyDisable`].
    KeyDisable {
        /// Key name.
        key: String,
        /// One version, or all when `None`.
        version: Option<u32>,
    },
    /// See [`Op::KeyEnable`].
    KeyEnable {
        /// Key name.
        key: String,
        /// One version, or all when `None`.
        version: Option<u32>,
    },
    /// See [`Op::KeyScheduleDestroy`].
    KeyScheduleDestroy {
        /// Key name.
        key: String,
        /// One version, or the whole key when `None`.
        version: Option<u32>,
        /// Waiting period in days.
        days: u32,
        /// Even if registered data keys still use it.
        force: bool,
    },
    /// See [`Op::KeyCancelDestroy`].
    KeyCancelDestroy {
        /// Key name.
        key: String,
        /// One version, or all when `None`.
        version: Option<u32>,
    },
    /// See [`Op::KeyDestroy`].
    KeyDestroy {
        /// Key name.
        key: String,
        /// One version, or the whole key when `None`.
        version: Option<u32>,
        /// Even if registered data keys still use it.
        force: bool,
    },
    /// See [`Op::KeySetRotation`].
    KeySetRotation {
        /// Key name.
        key: String,
        /// Seconds; 0 turns automatic rotation off.
        rotate_after: u64,
    },
    /// See [`Op::KeyShare`].
    KeyShare {
        /// Key name.
        key: String,
        /// The crypto user.
        operator: String,
    },
    /// See [`Op::KeyUnshare`].
    KeyUnshare {
        /// Key name.
        key: String,
        /// The crypto user.
        operator: String,
    },
    /// See [`Op::RegisterDeks`].
    RegisterDeks {
        /// Master key name.
        key: String,
        /// The encryption context the data keys are bound to.
        context: Context,
        /// Where they live (a backing directory), for people.
        location: String,
        /// Every data key version held, with the master key version that
        /// wraps it. Replaces the previous registration of this context.
        deks: Vec<DekRef>,
    },
    /// See [`Op::WatchKey`].
    WatchKey {
        /// Master key name.
        key: String,
        /// The primary version the caller knows.
        version: u32,
        /// How long to wait at most (capped by the server).
        timeout_ms: u32,
    },
    /// See [`Op::RekeyReport`].
    RekeyReport {
        /// Master key name.
        key: String,
        /// Encryption context of the tablespace.
        context: Context,
        /// The backing directory.
        location: String,
        /// `started`, `progress`, `finished` or `failed`.
        state: String,
        /// The data key version every block ends under.
        target: u32,
        /// Blocks re-encrypted so far.
        done: u64,
        /// Blocks to go through (0 if not known yet).
        total: u64,
    },
    /// See [`Op::AuditList`].
    AuditList(AuditQuery),
    /// See [`Op::AuditExport`]: since, until, first and last.
    AuditExport(AuditQuery),
    /// See [`Op::AuditRead`]: first and last.
    AuditRead(AuditQuery),
    /// See [`Op::AuditExportDone`]: first and last.
    AuditExportDone(AuditQuery),
    /// See [`Op::AuditPrune`]: until (the records before it).
    AuditPrune(AuditQuery),
    /// See [`Op::AuditPubkey`].
    AuditPubkey,
    /// See [`Op::AuditKeyRotate`].
    AuditKeyRotate,
}

/// One registered data key version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DekRef {
    /// Data key version.
    pub dek_version: u32,
    /// Master key version that wraps it.
    pub key_version: u32,
}

/// A registered data key as shown with its master key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyReference {
    /// The encryption context (for tde mounts: cluster and tablespace).
    pub context: Context,
    /// Data key version.
    pub dek_version: u32,
    /// Master key version that wraps it.
    pub key_version: u32,
    /// Where it lives.
    pub location: String,
    /// Last confirmed, Unix seconds.
    pub last_seen: u64,
}

/// A re-split of the unseal shares: where it stands, or (`new_shares`
/// not empty) its result, shown once. No attempt: `nonce` is empty.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ResplitInfo {
    /// Names the attempt.
    pub nonce: String,
    /// Current shares given.
    pub progress: u32,
    /// Current shares needed.
    pub needed: u32,
    /// New threshold.
    pub threshold: u32,
    /// New number of shares.
    pub shares: u32,
    /// The new shares, once done (in clear: no custodian keys given).
    pub new_shares: Vec<SecretBytes>,
    /// Fingerprints of the custodian keys the new shares are encrypted
    /// to, in share order (empty: none given).
    pub fingerprints: Vec<String>,
    /// The new shares, once done, each encrypted to its custodian key
    /// (ASCII-armored OpenPGP messages, in share order).
    pub encrypted_shares: Vec<String>,
}

/// A request waiting for other crypto officers' approvals (dual control).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApprovalInfo {
    /// Its number.
    pub id: u64,
    /// What it does, for people: `key_destroy pg-main v1`.
    pub what: String,
    /// The officer who asked.
    pub requester: String,
    /// The officers who approved.
    pub approved_by: Vec<String>,
    /// Approvals needed.
    pub needed: u32,
    /// `waiting`, `done`, `failed` or `expired`.
    pub state: String,
    /// When it stops waiting, Unix seconds.
    pub expires: u64,
    /// The outcome once it ran (the error, for `failed`).
    pub message: Option<String>,
}

/// Most requests, and approvers of one, an answer carries.
pub const MAX_APPROVALS: usize = 256;

/// Most shares a re-split answer carries.
pub const MAX_NEW_SHARES: usize = 32;

/// Largest custodian public key (`CUSTODIAN_KEY`), armored or binary. A key
/// exported with `gpg --export --export-options export-minimal` is a few
/// KiB; third-party signatures can make one far larger.
pub const MAX_CUSTODIAN_KEY: usize = 64 * 1024;

/// Largest encrypted share (`ENCRYPTED_SHARE`): a session key encrypted to
/// an RSA key of 16384 bits, armored, is under 4 KiB.
pub const MAX_ENCRYPTED_SHARE: usize = 16 * 1024;

/// Longest fingerprint (`FINGERPRINT`): 64 hex digits for a v6 key.
pub const MAX_FINGERPRINT: usize = 64;

/// Seal state and identity of the server.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StatusInfo {
    /// A store exists.
    pub initialized: bool,
    /// No keys in memory.
    pub sealed: bool,
    /// Root material destroyed.
    pub zeroized: bool,
    /// Shares needed.
    pub threshold: u32,
    /// Shares issued.
    pub shares: u32,
    /// Shares given so far toward the next unseal.
    pub progress: u32,
    /// Dev mode (single local share, auto-unseal).
    pub dev_mode: bool,
    /// Number of master keys (0 while sealed).
    pub key_count: u32,
    /// Server version string.
    pub server_version: String,
    /// The store's id, hex (empty before `tde init`): it names the store
    /// (a PKCS#11 token's serial number).
    pub store_id: String,
    /// The audit sinks (admin socket only).
    pub audit_sinks: Vec<AuditSinkInfo>,
}

/// An audit sink as `tde status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditSinkInfo {
    /// `file:PATH` or `syslog:SOCKET`.
    pub name: String,
    /// The last record it was given.
    pub delivered: u64,
    /// Records it has still to be given.
    pub lag: u64,
    /// Why its last attempt failed, while it fails.
    pub error: Option<String>,
}

/// One version of a master key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyVersionInfo {
    /// Version number, from 1.
    pub version: u32,
    /// `enabled`, `disabled`, `pending_destruction` or `destroyed`.
    pub state: String,
    /// Unix seconds.
    pub created: u64,
    /// When a pending destruction happens, Unix seconds.
    pub destroy_at: Option<u64>,
}

/// A master key's public description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// Name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// Unix seconds.
    pub created: u64,
    /// The version new data keys are wrapped under.
    pub primary_version: u32,
    /// The key's store object failed authentication.
    pub tampered: bool,
    /// Versions, oldest first.
    pub versions: Vec<KeyVersionInfo>,
    /// Automatic rotation period in seconds (0: off).
    pub rotate_after: u64,
    /// Registered data keys wrapped under this key.
    pub references: Vec<KeyReference>,
    /// The operator that created it (empty for keys made before owners).
    pub owner: String,
    /// Crypto users that may use it over the admin socket.
    pub shared_with: Vec<String>,
}

/// The key a PKCS#11 operation uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum P11Key {
    /// None (generate, create).
    None,
    /// A master key, by name (`KEY_NAME`).
    Master(String),
    /// A token or session object, by id (`OBJECT`).
    Object(u64),
}

/// PKCS#11 attributes: `(CKA_* type, value)`; `CK_ULONG` values are 8
/// bytes in the host's byte order, `CK_BBOOL` one byte.
pub type P11Attrs = Vec<(u64, Vec<u8>)>;

/// A PKCS#11 operation's fields; each operation uses some (PROTOCOL.md).
#[derive(Debug, PartialEq, Eq)]
pub struct P11Call {
    /// The token [`Request::P11Login`] gave.
    pub token: SecretBytes,
    /// The key or object operated on.
    pub key: P11Key,
    /// The object `p11_wrap` wraps (0: none).
    pub target: u64,
    /// The mechanism, `CKM_*`.
    pub mechanism: u64,
    /// The mechanism's parameter, flattened (`IV`): an AES IV, or
    /// big-endian u64 fields for PSS and OAEP.
    pub param: Vec<u8>,
    /// GCM additional authenticated data, or the OAEP label.
    pub aad: Vec<u8>,
    /// Input data: plaintext, ciphertext, data or hash to sign, a wrapped
    /// key.
    pub data: SecretBytes,
    /// A signature to verify.
    pub signature: Vec<u8>,
    /// The template (of a key pair: the private key's).
    pub template: P11Attrs,
    /// A key pair's public-key template.
    pub public_template: P11Attrs,
}

impl P11Call {
    /// A call with only the token set.
    pub fn new(token: SecretBytes) -> P11Call {
        P11Call {
            token,
            key: P11Key::None,
            target: 0,
            mechanism: 0,
            param: Vec::new(),
            aad: Vec::new(),
            data: SecretBytes::from_slice(&[]),
            signature: Vec::new(),
            template: Vec::new(),
            public_template: Vec::new(),
        }
    }
}

/// A PKCS#11 object as the token shows it: its id and public attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct P11ObjectInfo {
    /// Stable id.
    pub id: u64,
    /// Public attributes.
    pub attrs: P11Attrs,
}

/// An operator's public description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorInfo {
    /// Name.
    pub name: String,
    /// `crypto_officer`, `crypto_user` or `auditor`.
    pub role: String,
    /// Locked after failed logins.
    pub locked: bool,
    /// Consecutive failed logins.
    pub failed_logins: u32,
}

/// A response.
#[derive(Debug, PartialEq, Eq)]
pub enum Response {
    /// Answer to status, unseal and seal.
    Status(StatusInfo),
    /// Answer to generate-data-key.
    DataKey {
        /// Master key name.
        key: String,
        /// Master key version that wrapped it.
        version: u32,
        /// The data key.
        plaintext: SecretBytes,
        /// The wrapped data key.
        ciphertext: Vec<u8>,
    },
    /// Answer to decrypt.
    Decrypted {
        /// Master key name.
        key: String,
        /// Master key version that had wrapped it.
        version: u32,
        /// The data key.
        plaintext: SecretBytes,
    },
    /// Answer to re-encrypt.
    ReEncrypted {
        /// Master key name.
        key: String,
        /// The version it is wrapped under now.
        version: u32,
        /// The version it was wrapped under.
        source_version: u32,
        /// The new wrapped key.
        ciphertext: Vec<u8>,
    },
    /// Answer to a PKCS#11 encrypt, decrypt, sign or wrap: its output.
    P11Data {
        /// Ciphertext and tag, plaintext, signature or wrapped key.
        data: SecretBytes,
    },
    /// Answer to `p11_objects` (a page), `p11_generate`, `p11_create`,
    /// `p11_set_attributes` and `p11_unwrap` (the objects made or changed).
    P11Objects {
        /// Master keys (first page of `p11_objects` only).
        keys: Vec<KeyInfo>,
        /// Token and session objects, by id.
        objects: Vec<P11ObjectInfo>,
        /// More objects follow the last one.
        more: bool,
    },
    /// Answer to generate-random.
    Random {
        /// The bytes.
        bytes: SecretBytes,
    },
    /// Answer to login.
    LoggedIn {
        /// Operator.
        operator: String,
        /// Role.
        role: String,
    },
    /// Answer with no data (zeroize, operator add/passwd/unlock).
    Done,
    /// Requests waiting for approvals: the answer to the approval
    /// operations, and to KEY_DESTROY, ZEROIZE and OPERATOR_REMOVE when a
    /// quorum is configured (the request then waits instead of running).
    Approvals(Vec<ApprovalInfo>),
    /// Answer to the re-split operations (cancel answers `Done`).
    Resplit(ResplitInfo),
    /// Answer to token-create.
    Token {
        /// The token: whoever holds it acts as the operator until it ends.
        token: SecretBytes,
        /// Its lifetime, seconds.
        ttl: u64,
    },
    /// Answer to reload: what changed, and what waits for a restart.
    Reloaded {
        /// One line per change, for people.
        message: String,
    },
    /// Answer to operator-list.
    Operators(Vec<OperatorInfo>),
    /// Answer to key operations on one key.
    Key(KeyInfo),
    /// Answer to key-list.
    Keys(Vec<KeyInfo>),
    /// Answer to register-deks and watch-key: the key's primary version.
    KeyPrimary {
        /// Master key name.
        key: String,
        /// Its primary version.
        version: u32,
    },
    /// Answer to audit-list and audit-read.
    AuditPage(AuditPage),
    /// Answer to audit-export, audit-export-done and audit-prune.
    AuditRange(AuditRange),
    /// Answer to audit-pubkey and audit-key-rotate.
    AuditKeys(Vec<AuditKeyInfo>),
    /// Any failure.
    Error {
        /// What kind of failure.
        code: ErrorCode,
        /// Why, for a person. Never contains key bytes.
        message: String,
    },
}

impl Response {
    /// An error response; the message is cut to [`MAX_TEXT`] bytes.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Response {
        let mut message = message.into();
        message.truncate(truncate(&message, MAX_TEXT).len());
        Response::Error { code, message }
    }
}

fn put_context(w: &mut Writer, context: &Context) {
    for (k, v) in context {
        let klen = u16::try_from(k.len()).unwrap_or(u16::MAX);
        let mut entry = Vec::with_capacity(2 + k.len() + v.len());
        entry.extend_from_slice(&klen.to_be_bytes());
        entry.extend_from_slice(&k.as_bytes()[..usize::from(klen).min(k.len())]);
        entry.extend_from_slice(v.as_bytes());
        w.bytes(tag::CONTEXT, &entry);
    }
}

fn take_context(context: &mut Context, v: &[u8]) -> Result<(), DecodeError> {
    let (klen, rest) = v
        .split_first_chunk::<2>()
        .ok_or(DecodeError::InvalidValue("context"))?;
    let klen = usize::from(u16::from_be_bytes(*klen));
    if klen > rest.len() {
        return Err(DecodeError::InvalidValue("context"));
    }
    let (k, val) = rest.split_at(klen);
    let k = as_str(k, "context")?;
    let val = as_str(val, "context")?;
    if context.insert(k, val).is_some() {
        return Err(DecodeError::DuplicateField("context"));
    }
    Ok(())
}

fn unexpected(message: &'static str, tag: u8) -> DecodeError {
    DecodeError::UnexpectedField { message, tag }
}

/// The fields a request or simple response may carry, collected once.
#[derive(Default)]
struct Fields {
    key: Option<String>,
    version: Option<u32>,
    source_version: Option<u32>,
    context: Context,
    plaintext: Option<SecretBytes>,
    ciphertext: Option<Vec<u8>>,
    length: Option<u32>,
    operator: Option<String>,
    password: Option<SecretBytes>,
    role: Option<String>,
    share: Option<SecretBytes>,
    description: Option<String>,
    days: Option<u32>,
    random: Option<SecretBytes>,
    message: Option<String>,
    force: Option<bool>,
    rotate_after: Option<u64>,
    timeout_ms: Option<u32>,
    location: Option<String>,
    deks: Vec<DekRef>,
    approval_id: Option<u64>,
    nonce: Option<String>,
    threshold: Option<u32>,
    shares: Option<u32>,
    token: Option<SecretBytes>,
    token_ttl: Option<u64>,
    custodian_keys: Vec<Vec<u8>>,
    state: Option<String>,
    dek_version: Option<u32>,
    blocks_done: Option<u64>,
    blocks_total: Option<u64>,
    iv: Option<Vec<u8>>,
    aad: Option<Vec<u8>>,
    data: Option<SecretBytes>,
    mechanism: Option<u64>,
    object: Option<u64>,
    target: Option<u64>,
    signature: Option<Vec<u8>>,
    attrs: P11Attrs,
    public_attrs: P11Attrs,
}

impl Fields {
    /// Reads every field of `body`, refusing tags outside `allowed`.
    fn read(body: &[u8], what: &'static str, allowed: &[u8]) -> Result<Fields, DecodeError> {
        let mut f = Fields::default();
        let mut r = Reader::new(body);
        while let Some((t, v)) = r.next_field()? {
            if !allowed.contains(&t) {
                return Err(unexpected(what, t));
            }
            match t {
                tag::KEY_NAME => once(
                    &mut f.key,
                    as_str(capped(v, "key", MAX_NAME)?, "key")?,
                    "key",
                )?,
                tag::KEY_VERSION => once(&mut f.version, as_u32(v, "version")?, "version")?,
                tag::SOURCE_VERSION => once(
                    &mut f.source_version,
                    as_u32(v, "source_version")?,
                    "source_version",
                )?,
                tag::CONTEXT => take_context(&mut f.context, v)?,
                tag::PLAINTEXT => once(
                    &mut f.plaintext,
                    SecretBytes::from_slice(capped(v, "plaintext", MAX_BYTES)?),
                    "plaintext",
                )?,
                tag::CIPHERTEXT => once(
                    &mut f.ciphertext,
                    capped(v, "ciphertext", MAX_BYTES)?.to_vec(),
                    "ciphertext",
                )?,
                tag::LENGTH => once(&mut f.length, as_u32(v, "length")?, "length")?,
                tag::OPERATOR => once(
                    &mut f.operator,
                    as_str(capped(v, "operator", MAX_NAME)?, "operator")?,
                    "operator",
                )?,
                tag::PASSWORD => once(
                    &mut f.password,
                    SecretBytes::from_slice(capped(v, "password", MAX_SECRET)?),
                    "password",
                )?,
                tag::TOKEN => once(
                    &mut f.token,
                    SecretBytes::from_slice(capped(v, "token", MAX_SECRET)?),
                    "token",
                )?,
                tag::TOKEN_TTL => once(&mut f.token_ttl, as_u64(v, "token_ttl")?, "token_ttl")?,
                tag::APPROVAL_ID => {
                    once(&mut f.approval_id, as_u64(v, "approval_id")?, "approval_id")?
                }
                tag::NONCE => once(
                    &mut f.nonce,
                    as_str(capped(v, "nonce", MAX_NAME)?, "nonce")?,
                    "nonce",
                )?,
                tag::THRESHOLD => once(&mut f.threshold, as_u32(v, "threshold")?, "threshold")?,
                tag::SHARES => once(&mut f.shares, as_u32(v, "shares")?, "shares")?,
                tag::CUSTODIAN_KEY => {
                    if f.custodian_keys.len() >= MAX_NEW_SHARES {
                        return Err(DecodeError::InvalidValue("too many custodian keys"));
                    }
                    f.custodian_keys
                        .push(capped(v, "custodian_key", MAX_CUSTODIAN_KEY)?.to_vec());
                }
                tag::ROLE => once(
                    &mut f.role,
                    as_str(capped(v, "role", MAX_NAME)?, "role")?,
                    "role",
                )?,
                tag::SHARE => once(
                    &mut f.share,
                    SecretBytes::from_slice(capped(v, "share", MAX_SECRET)?),
                    "share",
                )?,
                tag::DESCRIPTION => once(
                    &mut f.description,
                    as_str(capped(v, "description", MAX_TEXT)?, "description")?,
                    "description",
                )?,
                tag::DAYS => once(&mut f.days, as_u32(v, "days")?, "days")?,
                tag::RANDOM => once(
                    &mut f.random,
                    SecretBytes::from_slice(capped(v, "random", MAX_BYTES)?),
                    "random",
                )?,
                tag::MESSAGE => once(
                    &mut f.message,
                    as_str(capped(v, "message", MAX_TEXT)?, "message")?,
                    "message",
                )?,
                tag::FORCE => once(&mut f.force, as_bool(v, "force")?, "force")?,
                tag::ROTATE_AFTER => once(
                    &mut f.rotate_after,
                    as_u64(v, "rotate_after")?,
                    "rotate_after",
                )?,
                tag::TIMEOUT_MS => once(&mut f.timeout_ms, as_u32(v, "timeout_ms")?, "timeout_ms")?,
                tag::LOCATION => once(
                    &mut f.location,
                    as_str(capped(v, "location", MAX_LOCATION)?, "location")?,
                    "location",
                )?,
                tag::STATE => once(
                    &mut f.state,
                    as_str(capped(v, "state", MAX_NAME)?, "state")?,
                    "state",
                )?,
                tag::DEK_VERSION => {
                    once(&mut f.dek_version, as_u32(v, "dek_version")?, "dek_version")?
                }
                tag::BLOCKS_DONE => {
                    once(&mut f.blocks_done, as_u64(v, "blocks_done")?, "blocks_done")?
                }
                tag::BLOCKS_TOTAL => once(
                    &mut f.blocks_total,
                    as_u64(v, "blocks_total")?,
                    "blocks_total",
                )?,
                tag::IV => once(&mut f.iv, capped(v, "iv", MAX_IV)?.to_vec(), "iv")?,
                tag::AAD => once(&mut f.aad, capped(v, "aad", MAX_AAD)?.to_vec(), "aad")?,
                tag::DATA => once(
                    &mut f.data,
                    SecretBytes::from_slice(capped(v, "data", MAX_P11_DATA)?),
                    "data",
                )?,
                tag::MECHANISM => once(&mut f.mechanism, as_u64(v, "mechanism")?, "mechanism")?,
                tag::OBJECT => once(&mut f.object, as_u64(v, "object")?, "object")?,
                tag::TARGET => once(&mut f.target, as_u64(v, "target")?, "target")?,
                tag::SIGNATURE => once(
                    &mut f.signature,
                    capped(v, "signature", MAX_SIGNATURE)?.to_vec(),
                    "signature",
                )?,
                tag::ATTR => take_attr(&mut f.attrs, v)?,
                tag::PUBLIC_ATTR => take_attr(&mut f.public_attrs, v)?,
                tag::DEK => {
                    if f.deks.len() >= MAX_DEKS {
                        return Err(DecodeError::InvalidValue("too many data keys"));
                    }
                    f.deks.push(take_dek(v)?)
                }
                other => return Err(unexpected(what, other)),
            }
        }
        Ok(f)
    }
}

/// Most data key versions one registration may carry.
pub const MAX_DEKS: usize = 1024;
/// Longest key, operator or role name (the HSM's own name rule).
pub const MAX_NAME: usize = 128;
/// Longest password or unseal share.
pub const MAX_SECRET: usize = 1024;
/// Longest description or error message.
pub const MAX_TEXT: usize = 1024;
/// Longest registration location (a path).
pub const MAX_LOCATION: usize = 4096;
/// Longest plaintext, ciphertext or random field (data keys and wrapped
/// data keys are far smaller; `generate_random` returns at most 4096).
pub const MAX_BYTES: usize = 4096;
/// A PKCS#11 operation's data at most (each way).
pub const MAX_P11_DATA: usize = 256 * 1024;
/// A PKCS#11 initialization vector at most.
pub const MAX_IV: usize = 256;
/// A signature at most (RSA-4096: 512 bytes).
pub const MAX_SIGNATURE: usize = 1024;
/// Most attributes in one template or object.
pub const MAX_P11_ATTRS: usize = 64;
/// Longest attribute value.
pub const MAX_P11_ATTR: usize = 16 * 1024;
/// Most objects in one `p11_objects` page.
pub const MAX_P11_PAGE: usize = 256;

/// Reads one `ATTR` into `attrs`, with the caps.
fn take_attr(attrs: &mut P11Attrs, v: &[u8]) -> Result<(), DecodeError> {
    if attrs.len() >= MAX_P11_ATTRS {
        return Err(DecodeError::InvalidValue("too many attributes"));
    }
    if v.len() < 8 {
        return Err(DecodeError::InvalidValue("an attribute without its type"));
    }
    let (t, value) = v.split_at(8);
    let value = capped(value, "attribute", MAX_P11_ATTR)?;
    attrs.push((as_u64(t, "attribute type")?, value.to_vec()));
    Ok(())
}

fn put_attrs(w: &mut Writer, tag: u8, attrs: &[(u64, Vec<u8>)]) {
    for (t, v) in attrs {
        let mut b = Vec::with_capacity(8 + v.len());
        b.extend_from_slice(&t.to_be_bytes());
        b.extend_from_slice(v);
        w.bytes(tag, &b);
    }
}

fn put_p11_call(w: &mut Writer, c: &P11Call) {
    w.bytes(TOKEN, c.token.expose());
    match &c.key {
        P11Key::None => {}
        P11Key::Master(k) => {
            w.str(KEY_NAME, k);
        }
        P11Key::Object(o) => {
            w.u64(OBJECT, *o);
        }
    }
    if c.target != 0 {
        w.u64(TARGET, c.target);
    }
    w.u64(MECHANISM, c.mechanism);
    if !c.param.is_empty() {
        w.bytes(IV, &c.param);
    }
    if !c.aad.is_empty() {
        w.bytes(AAD, &c.aad);
    }
    if !c.data.expose().is_empty() {
        w.bytes(DATA, c.data.expose());
    }
    if !c.signature.is_empty() {
        w.bytes(SIGNATURE, &c.signature);
    }
    put_attrs(w, ATTR, &c.template);
    put_attrs(w, PUBLIC_ATTR, &c.public_template);
}

fn take_p11_objects(body: &[u8], what: &'static str) -> Result<Response, DecodeError> {
    let mut keys = Vec::new();
    let mut objects = Vec::new();
    let mut more = None;
    let mut r = Reader::new(body);
    while let Some((t, v)) = r.next_field()? {
        match t {
            KEY_INFO => keys.push(take_key_info(v)?),
            P11_OBJECT => {
                if objects.len() >= MAX_P11_PAGE {
                    return Err(DecodeError::InvalidValue("too many objects"));
                }
                let f = Fields::read(v, "p11_object", &[OBJECT, ATTR])?;
                objects.push(P11ObjectInfo {
                    id: required(f.object, "object")?,
                    attrs: f.attrs,
                });
            }
            MORE => once(&mut more, as_bool(v, "more")?, "more")?,
            other => return Err(unexpected(what, other)),
        }
    }
    Ok(Response::P11Objects {
        keys,
        objects,
        more: more.unwrap_or(false),
    })
}
/// PKCS#11 additional authenticated data at most.
pub const MAX_AAD: usize = 64 * 1024;

/// `v`, if it is at most `max` bytes: a peer cannot make the daemon keep,
/// log or audit a megabyte of name.
fn capped<'a>(v: &'a [u8], field: &'static str, max: usize) -> Result<&'a [u8], DecodeError> {
    if v.len() > max {
        return Err(DecodeError::TooLong { field, max });
    }
    Ok(v)
}

/// `text` cut to at most `max` bytes, at a character boundary.
pub fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn take_dek(body: &[u8]) -> Result<DekRef, DecodeError> {
    let (mut dek, mut key) = (None, None);
    let mut r = Reader::new(body);
    while let Some((t, v)) = r.next_field()? {
        match t {
            tag::DEK_VERSION => once(&mut dek, as_u32(v, "dek_version")?, "dek_version")?,
            tag::KEY_VERSION => once(&mut key, as_u32(v, "version")?, "version")?,
            other => return Err(unexpected("dek", other)),
        }
    }
    Ok(DekRef {
        dek_version: required(dek, "dek_version")?,
        key_version: required(key, "version")?,
    })
}

use tag::*;

impl Request {
    /// The operation of this request.
    pub fn op(&self) -> Op {
        match self {
            Request::Status => Op::Status,
            Request::GenerateDataKey { .. } => Op::GenerateDataKey,
            Request::Decrypt { .. } => Op::Decrypt,
            Request::ReEncrypt { .. } => Op::ReEncrypt,
            Request::GenerateRandom { .. } => Op::GenerateRandom,
            Request::Unseal { .. } => Op::Unseal,
            Request::Seal => Op::Seal,
            Request::Login { .. } => Op::Login,
            Request::Zeroize => Op::Zeroize,
            Request::Reload => Op::Reload,
            Request::TokenCreate { .. } => Op::TokenCreate,
            Request::TokenLogin { .. } => Op::TokenLogin,
            Request::P11Login { .. } => Op::P11Login,
            Request::P11Logout { .. } => Op::P11Logout,
            Request::P11Objects { .. } => Op::P11Objects,
            Request::P11(op, _) => *op,
            Request::TokenRevoke { .. } => Op::TokenRevoke,
            Request::ResplitInit { .. } => Op::ResplitInit,
            Request::ResplitUpdate { .. } => Op::ResplitUpdate,
            Request::ResplitStatus => Op::ResplitStatus,
            Request::ResplitCancel => Op::ResplitCancel,
            Request::ApprovalList => Op::ApprovalList,
            Request::Approve { .. } => Op::Approve,
            Request::ApprovalStatus { .. } => Op::ApprovalStatus,
            Request::OperatorAdd { .. } => Op::OperatorAdd,
            Request::OperatorPasswd { .. } => Op::OperatorPasswd,
            Request::OperatorUnlock { .. } => Op::OperatorUnlock,
            Request::OperatorRemove { .. } => Op::OperatorRemove,
            Request::OperatorList => Op::OperatorList,
            Request::KeyCreate { .. } => Op::KeyCreate,
            Request::KeyList => Op::KeyList,
            Request::KeyDescribe { .. } => Op::KeyDescribe,
            Request::KeyRotate { .. } => Op::KeyRotate,
            Request::KeyDisable { .. } => Op::KeyDisable,
            Request::KeyEnable { .. } => Op::KeyEnable,
            Request::KeyScheduleDestroy { .. } => Op::KeyScheduleDestroy,
            Request::KeyCancelDestroy { .. } => Op::KeyCancelDestroy,
            Request::KeyDestroy { .. } => Op::KeyDestroy,
            Request::KeySetRotation { .. } => Op::KeySetRotation,
            Request::KeyShare { .. } => Op::KeyShare,
            Request::KeyUnshare { .. } => Op::KeyUnshare,
            Request::RegisterDeks { .. } => Op::RegisterDeks,
            Request::WatchKey { .. } => Op::WatchKey,
            Request::RekeyReport { .. } => Op::RekeyReport,
            Request::AuditList(_) => Op::AuditList,
            Request::AuditExport(_) => Op::AuditExport,
            Request::AuditRead(_) => Op::AuditRead,
            Request::AuditExportDone(_) => Op::AuditExportDone,
            Request::AuditPrune(_) => Op::AuditPrune,
            Request::AuditPubkey => Op::AuditPubkey,
            Request::AuditKeyRotate => Op::AuditKeyRotate,
        }
    }

    /// Encodes the body.
    pub fn encode_body(&self) -> Body {
        let mut w = Writer::new();
        match self {
            Request::Status
            | Request::Seal
            | Request::Zeroize
            | Request::Reload
            | Request::ResplitStatus
            | Request::ResplitCancel
            | Request::ApprovalList
            | Request::OperatorList
            | Request::AuditPubkey
            | Request::AuditKeyRotate
            | Request::KeyList => {}
            Request::AuditList(q)
            | Request::AuditExport(q)
            | Request::AuditRead(q)
            | Request::AuditExportDone(q)
            | Request::AuditPrune(q) => q.encode(&mut w),
            Request::GenerateDataKey { key, context } => {
                w.str(KEY_NAME, key);
                put_context(&mut w, context);
            }
            Request::Decrypt {
                ciphertext,
                context,
            }
            | Request::ReEncrypt {
                ciphertext,
                context,
            } => {
                w.bytes(CIPHERTEXT, ciphertext);
                put_context(&mut w, context);
            }
            Request::GenerateRandom { length } => {
                w.u32(LENGTH, *length);
            }
            Request::Unseal { share } => {
                w.bytes(SHARE, share.expose());
            }
            Request::Login { operator, password }
            | Request::OperatorPasswd { operator, password } => {
                w.str(OPERATOR, operator).bytes(PASSWORD, password.expose());
            }
            Request::OperatorAdd {
                operator,
                role,
                password,
            } => {
                w.str(OPERATOR, operator)
                    .str(ROLE, role)
                    .bytes(PASSWORD, password.expose());
            }
            Request::OperatorUnlock { operator } | Request::OperatorRemove { operator } => {
                w.str(OPERATOR, operator);
            }
            Request::TokenCreate { ttl } => {
                w.u64(TOKEN_TTL, *ttl);
            }
            Request::P11Login {
                operator,
                password,
                role,
            } => {
                w.str(OPERATOR, operator)
                    .bytes(PASSWORD, password.expose())
                    .str(ROLE, role);
            }
            Request::TokenLogin { token }
            | Request::TokenRevoke { token }
            | Request::P11Logout { token } => {
                w.bytes(TOKEN, token.expose());
            }
            Request::P11Objects { token, after } => {
                w.bytes(TOKEN, token.expose());
                if *after != 0 {
                    w.u64(OBJECT, *after);
                }
            }
            Request::P11(_, c) => put_p11_call(&mut w, c),
            Request::ResplitInit {
                threshold,
                shares,
                custodian_keys,
            } => {
                w.u32(THRESHOLD, *threshold).u32(SHARES, *shares);
                for k in custodian_keys {
                    w.bytes(CUSTODIAN_KEY, k);
                }
            }
            Request::Approve { id } | Request::ApprovalStatus { id } => {
                w.u64(APPROVAL_ID, *id);
            }
            Request::ResplitUpdate { nonce, share } => {
                w.str(NONCE, nonce).bytes(SHARE, share.expose());
            }
            Request::KeyCreate {
                key,
                description,
                rotate_after,
            } => {
                w.str(KEY_NAME, key).str(DESCRIPTION, description);
                if *rotate_after != 0 {
                    w.u64(ROTATE_AFTER, *rotate_after);
                }
            }
            Request::KeyDescribe { key } | Request::KeyRotate { key } => {
                w.str(KEY_NAME, key);
            }
            Request::KeyDisable { key, version }
            | Request::KeyEnable { key, version }
            | Request::KeyCancelDestroy { key, version } => put_key_version(&mut w, key, *version),
            Request::KeyDestroy {
                key,
                version,
                force,
            } => {
                put_key_version(&mut w, key, *version);
                put_force(&mut w, *force);
            }
            Request::KeyScheduleDestroy {
                key,
                version,
                days,
                force,
            } => {
                put_key_version(&mut w, key, *version);
                w.u32(DAYS, *days);
                put_force(&mut w, *force);
            }
            Request::KeySetRotation { key, rotate_after } => {
                w.str(KEY_NAME, key).u64(ROTATE_AFTER, *rotate_after);
            }
            Request::KeyShare { key, operator } | Request::KeyUnshare { key, operator } => {
                w.str(KEY_NAME, key).str(OPERATOR, operator);
            }
            Request::RekeyReport {
                key,
                context,
                location,
                state,
                target,
                done,
                total,
            } => {
                w.str(KEY_NAME, key);
                put_context(&mut w, context);
                w.str(LOCATION, location)
                    .str(STATE, state)
                    .u32(DEK_VERSION, *target)
                    .u64(BLOCKS_DONE, *done)
                    .u64(BLOCKS_TOTAL, *total);
            }
            Request::RegisterDeks {
                key,
                context,
                location,
                deks,
            } => {
                w.str(KEY_NAME, key);
                put_context(&mut w, context);
                w.str(LOCATION, location);
                for d in deks {
                    let mut r = Writer::new();
                    r.u32(DEK_VERSION, d.dek_version)
                        .u32(KEY_VERSION, d.key_version);
                    w.record(DEK, &r);
                }
            }
            Request::WatchKey {
                key,
                version,
                timeout_ms,
            } => {
                w.str(KEY_NAME, key)
                    .u32(KEY_VERSION, *version)
                    .u32(TIMEOUT_MS, *timeout_ms);
            }
        }
        w.finish()
    }

    /// Builds the request frame.
    pub fn to_frame(&self, request_id: u64) -> Frame {
        Frame {
            header: Header {
                version: PROTOCOL_VERSION,
                kind: FrameKind::Request as u8,
                op: self.op() as u16,
                status: 0,
                flags: 0,
                request_id,
            },
            body: self.encode_body(),
        }
    }

    /// Decodes a request frame: checks version, kind and operation, then
    /// the body.
    pub fn from_frame(frame: &Frame) -> Result<Request, DecodeError> {
        let h = &frame.header;
        if h.version != PROTOCOL_VERSION {
            return Err(DecodeError::UnsupportedVersion(h.version));
        }
        if h.kind != FrameKind::Request as u8 {
            return Err(DecodeError::UnknownKind(h.kind));
        }
        let op = Op::from_u16(h.op).ok_or(DecodeError::UnknownOperation(h.op))?;
        Request::decode_body(op, &frame.body)
    }

    /// Decodes the body of a request for `op`.
    pub fn decode_body(op: Op, body: &[u8]) -> Result<Request, DecodeError> {
        let what = op.name();
        let read = |allowed: &[u8]| Fields::read(body, what, allowed);
        Ok(match op {
            Op::Status => {
                read(&[])?;
                Request::Status
            }
            Op::Seal => {
                read(&[])?;
                Request::Seal
            }
            Op::Zeroize => {
                read(&[])?;
                Request::Zeroize
            }
            Op::Reload => {
                read(&[])?;
                Request::Reload
            }
            Op::TokenCreate => Request::TokenCreate {
                ttl: required(read(&[TOKEN_TTL])?.token_ttl, "token_ttl")?,
            },
            Op::TokenLogin => Request::TokenLogin {
                token: required(read(&[TOKEN])?.token, "token")?,
            },
            Op::TokenRevoke => Request::TokenRevoke {
                token: required(read(&[TOKEN])?.token, "token")?,
            },
            Op::P11Login => {
                let f = read(&[OPERATOR, PASSWORD, ROLE])?;
                Request::P11Login {
                    operator: required(f.operator, "operator")?,
                    password: required(f.password, "password")?,
                    role: required(f.role, "role")?,
                }
            }
            Op::P11Logout => Request::P11Logout {
                token: required(read(&[TOKEN])?.token, "token")?,
            },
            Op::P11Objects => {
                let f = read(&[TOKEN, OBJECT])?;
                Request::P11Objects {
                    token: required(f.token, "token")?,
                    after: f.object.unwrap_or(0),
                }
            }
            Op::P11Encrypt
            | Op::P11Decrypt
            | Op::P11Sign
            | Op::P11Verify
            | Op::P11Generate
            | Op::P11Create
            | Op::P11Destroy
            | Op::P11SetAttributes
            | Op::P11Wrap
            | Op::P11Unwrap => {
                let f = read(&[
                    TOKEN,
                    KEY_NAME,
                    OBJECT,
                    TARGET,
                    MECHANISM,
                    IV,
                    AAD,
                    DATA,
                    SIGNATURE,
                    ATTR,
                    PUBLIC_ATTR,
                ])?;
                let key = match (f.key, f.object) {
                    (Some(_), Some(_)) => {
                        return Err(DecodeError::InvalidValue("both a key name and an object"));
                    }
                    (Some(k), None) => P11Key::Master(k),
                    (None, Some(o)) => P11Key::Object(o),
                    (None, None) => P11Key::None,
                };
                Request::P11(
                    op,
                    P11Call {
                        token: required(f.token, "token")?,
                        key,
                        target: f.target.unwrap_or(0),
                        mechanism: f.mechanism.unwrap_or(0),
                        param: f.iv.unwrap_or_default(),
                        aad: f.aad.unwrap_or_default(),
                        data: f.data.unwrap_or_else(|| SecretBytes::from_slice(&[])),
                        signature: f.signature.unwrap_or_default(),
                        template: f.attrs,
                        public_template: f.public_attrs,
                    },
                )
            }
            Op::ResplitInit => {
                let f = read(&[THRESHOLD, SHARES, CUSTODIAN_KEY])?;
                Request::ResplitInit {
                    threshold: required(f.threshold, "threshold")?,
                    shares: required(f.shares, "shares")?,
                    custodian_keys: f.custodian_keys,
                }
            }
            Op::ResplitUpdate => {
                let f = read(&[NONCE, SHARE])?;
                Request::ResplitUpdate {
                    nonce: required(f.nonce, "nonce")?,
                    share: required(f.share, "share")?,
                }
            }
            Op::ResplitStatus => {
                read(&[])?;
                Request::ResplitStatus
            }
            Op::ResplitCancel => {
                read(&[])?;
                Request::ResplitCancel
            }
            Op::ApprovalList => {
                read(&[])?;
                Request::ApprovalList
            }
            Op::Approve => Request::Approve {
                id: required(read(&[APPROVAL_ID])?.approval_id, "approval_id")?,
            },
            Op::ApprovalStatus => Request::ApprovalStatus {
                id: required(read(&[APPROVAL_ID])?.approval_id, "approval_id")?,
            },
            Op::OperatorList => {
                read(&[])?;
                Request::OperatorList
            }
            Op::KeyList => {
                read(&[])?;
                Request::KeyList
            }
            Op::GenerateDataKey => {
                let f = read(&[KEY_NAME, CONTEXT])?;
                Request::GenerateDataKey {
                    key: required(f.key, "key")?,
                    context: f.context,
                }
            }
            Op::Decrypt | Op::ReEncrypt => {
                let f = read(&[CIPHERTEXT, CONTEXT])?;
                let ciphertext = required(f.ciphertext, "ciphertext")?;
                if op == Op::Decrypt {
                    Request::Decrypt {
                        ciphertext,
                        context: f.context,
                    }
                } else {
                    Request::ReEncrypt {
                        ciphertext,
                        context: f.context,
                    }
                }
            }
            Op::GenerateRandom => Request::GenerateRandom {
                length: required(read(&[LENGTH])?.length, "length")?,
            },
            Op::Unseal => Request::Unseal {
                share: required(read(&[SHARE])?.share, "share")?,
            },
            Op::Login | Op::OperatorPasswd => {
                let f = read(&[OPERATOR, PASSWORD])?;
                let operator = required(f.operator, "operator")?;
                let password = required(f.password, "password")?;
                if op == Op::Login {
                    Request::Login { operator, password }
                } else {
                    Request::OperatorPasswd { operator, password }
                }
            }
            Op::OperatorAdd => {
                let f = read(&[OPERATOR, ROLE, PASSWORD])?;
                Request::OperatorAdd {
                    operator: required(f.operator, "operator")?,
                    role: required(f.role, "role")?,
                    password: required(f.password, "password")?,
                }
            }
            Op::OperatorUnlock => Request::OperatorUnlock {
                operator: required(read(&[OPERATOR])?.operator, "operator")?,
            },
            Op::OperatorRemove => Request::OperatorRemove {
                operator: required(read(&[OPERATOR])?.operator, "operator")?,
            },
            Op::KeyCreate => {
                let f = read(&[KEY_NAME, DESCRIPTION, ROTATE_AFTER])?;
                Request::KeyCreate {
                    key: required(f.key, "key")?,
                    description: f.description.unwrap_or_default(),
                    rotate_after: f.rotate_after.unwrap_or(0),
                }
            }
            Op::KeyDescribe => Request::KeyDescribe {
                key: required(read(&[KEY_NAME])?.key, "key")?,
            },
            Op::KeyRotate => Request::KeyRotate {
                key: required(read(&[KEY_NAME])?.key, "key")?,
            },
            Op::KeyDisable | Op::KeyEnable | Op::KeyCancelDestroy => {
                let f = read(&[KEY_NAME, KEY_VERSION])?;
                let key = required(f.key, "key")?;
                let version = f.version;
                match op {
                    Op::KeyDisable => Request::KeyDisable { key, version },
                    Op::KeyEnable => Request::KeyEnable { key, version },
                    _ => Request::KeyCancelDestroy { key, version },
                }
            }
            Op::KeyDestroy => {
                let f = read(&[KEY_NAME, KEY_VERSION, FORCE])?;
                Request::KeyDestroy {
                    key: required(f.key, "key")?,
                    version: f.version,
                    force: f.force.unwrap_or(false),
                }
            }
            Op::KeyScheduleDestroy => {
                let f = read(&[KEY_NAME, KEY_VERSION, DAYS, FORCE])?;
                Request::KeyScheduleDestroy {
                    key: required(f.key, "key")?,
                    version: f.version,
                    days: required(f.days, "days")?,
                    force: f.force.unwrap_or(false),
                }
            }
            Op::KeySetRotation => {
                let f = read(&[KEY_NAME, ROTATE_AFTER])?;
                Request::KeySetRotation {
                    key: required(f.key, "key")?,
                    rotate_after: required(f.rotate_after, "rotate_after")?,
                }
            }
            Op::KeyShare | Op::KeyUnshare => {
                let f = read(&[KEY_NAME, OPERATOR])?;
                let key = required(f.key, "key")?;
                let operator = required(f.operator, "operator")?;
                match op {
                    Op::KeyShare => Request::KeyShare { key, operator },
                    _ => Request::KeyUnshare { key, operator },
                }
            }
            Op::RegisterDeks => {
                let f = read(&[KEY_NAME, CONTEXT, LOCATION, DEK])?;
                Request::RegisterDeks {
                    key: required(f.key, "key")?,
                    context: f.context,
                    location: f.location.unwrap_or_default(),
                    deks: f.deks,
                }
            }
            Op::RekeyReport => {
                let f = read(&[
                    KEY_NAME,
                    CONTEXT,
                    LOCATION,
                    STATE,
                    DEK_VERSION,
                    BLOCKS_DONE,
                    BLOCKS_TOTAL,
                ])?;
                Request::RekeyReport {
                    key: required(f.key, "key")?,
                    context: f.context,
                    location: required(f.location, "location")?,
                    state: required(f.state, "state")?,
                    target: required(f.dek_version, "dek_version")?,
                    done: f.blocks_done.unwrap_or(0),
                    total: f.blocks_total.unwrap_or(0),
                }
            }
            Op::WatchKey => {
                let f = read(&[KEY_NAME, KEY_VERSION, TIMEOUT_MS])?;
                Request::WatchKey {
                    key: required(f.key, "key")?,
                    version: required(f.version, "version")?,
                    timeout_ms: required(f.timeout_ms, "timeout_ms")?,
                }
            }
            Op::AuditList => {
                Request::AuditList(AuditQuery::decode(body, what, audit::LIST_FIELDS)?)
            }
            Op::AuditExport => {
                Request::AuditExport(AuditQuery::decode(body, what, audit::EXPORT_FIELDS)?)
            }
            Op::AuditRead => {
                Request::AuditRead(AuditQuery::decode(body, what, audit::READ_FIELDS)?)
            }
            Op::AuditExportDone => {
                Request::AuditExportDone(AuditQuery::decode(body, what, audit::READ_FIELDS)?)
            }
            Op::AuditPrune => {
                Request::AuditPrune(AuditQuery::decode(body, what, audit::PRUNE_FIELDS)?)
            }
            Op::AuditPubkey => {
                read(&[])?;
                Request::AuditPubkey
            }
            Op::AuditKeyRotate => {
                read(&[])?;
                Request::AuditKeyRotate
            }
        })
    }
}

/// A key name and, if given, one version of it.
fn put_key_version(w: &mut Writer, key: &str, version: Option<u32>) {
    w.str(KEY_NAME, key);
    if let Some(v) = version {
        w.u32(KEY_VERSION, v);
    }
}

/// The force flag, sent only when set.
fn put_force(w: &mut Writer, force: bool) {
    if force {
        w.bool(FORCE, true);
    }
}

fn put_key_info(w: &mut Writer, k: &KeyInfo) {
    let mut r = Writer::new();
    r.str(KEY_NAME, &k.name)
        .str(DESCRIPTION, &k.description)
        .u64(CREATED, k.created)
        .u32(PRIMARY_VERSION, k.primary_version)
        .bool(TAMPERED, k.tampered);
    for v in &k.versions {
        let mut vr = Writer::new();
        vr.u32(KEY_VERSION, v.version)
            .str(STATE, &v.state)
            .u64(CREATED, v.created);
        if let Some(at) = v.destroy_at {
            vr.u64(DESTROY_AT, at);
        }
        r.record(VERSION_INFO, &vr);
    }
    if k.rotate_after != 0 {
        r.u64(ROTATE_AFTER, k.rotate_after);
    }
    for x in &k.references {
        let mut rr = Writer::new();
        put_context(&mut rr, &x.context);
        rr.u32(DEK_VERSION, x.dek_version)
            .u32(KEY_VERSION, x.key_version)
            .str(LOCATION, &x.location)
            .u64(LAST_SEEN, x.last_seen);
        r.record(REFERENCE, &rr);
    }
    if !k.owner.is_empty() {
        r.str(OWNER, &k.owner);
    }
    for u in &k.shared_with {
        r.str(SHARED_WITH, u);
    }
    w.record(KEY_INFO, &r);
}

fn take_version_info(body: &[u8]) -> Result<KeyVersionInfo, DecodeError> {
    let (mut version, mut state, mut created, mut destroy_at) = (None, None, None, None);
    let mut r = Reader::new(body);
    while let Some((t, v)) = r.next_field()? {
        match t {
            KEY_VERSION => once(&mut version, as_u32(v, "version")?, "version")?,
            STATE => once(&mut state, as_str(v, "state")?, "state")?,
            CREATED => once(&mut created, as_u64(v, "created")?, "created")?,
            DESTROY_AT => once(&mut destroy_at, as_u64(v, "destroy_at")?, "destroy_at")?,
            other => return Err(unexpected("version_info", other)),
        }
    }
    Ok(KeyVersionInfo {
        version: required(version, "version")?,
        state: required(state, "state")?,
        created: required(created, "created")?,
        destroy_at,
    })
}

fn take_reference(body: &[u8]) -> Result<KeyReference, DecodeError> {
    let mut context = Context::new();
    let (mut dek, mut key, mut location, mut seen) = (None, None, None, None);
    let mut r = Reader::new(body);
    while let Some((t, v)) = r.next_field()? {
        match t {
            CONTEXT => take_context(&mut context, v)?,
            DEK_VERSION => once(&mut dek, as_u32(v, "dek_version")?, "dek_version")?,
            KEY_VERSION => once(&mut key, as_u32(v, "version")?, "version")?,
            LOCATION => once(&mut location, as_str(v, "location")?, "location")?,
            LAST_SEEN => once(&mut seen, as_u64(v, "last_seen")?, "last_seen")?,
            other => return Err(unexpected("reference", other)),
        }
    }
    Ok(KeyReference {
        context,
        dek_version: required(dek, "dek_version")?,
        key_version: required(key, "version")?,
        location: location.unwrap_or_default(),
        last_seen: required(seen, "last_seen")?,
    })
}

fn take_key_info(body: &[u8]) -> Result<KeyInfo, DecodeError> {
    let (mut name, mut description, mut created, mut primary, mut tampered) =
        (None, None, None, None, None);
    let mut rotate_after = None;
    let mut versions = Vec::new();
    let mut references = Vec::new();
    let (mut owner, mut shared_with) = (None, Vec::new());
    let mut r = Reader::new(body);
    while let Some((t, v)) = r.next_field()? {
        match t {
            KEY_NAME => once(&mut name, as_str(v, "key")?, "key")?,
            DESCRIPTION => once(&mut description, as_str(v, "description")?, "description")?,
            CREATED => once(&mut created, as_u64(v, "created")?, "created")?,
            PRIMARY_VERSION => once(&mut primary, as_u32(v, "primary")?, "primary")?,
            TAMPERED => once(&mut tampered, as_bool(v, "tampered")?, "tampered")?,
            VERSION_INFO => versions.push(take_version_info(v)?),
            ROTATE_AFTER => once(
                &mut rotate_after,
                as_u64(v, "rotate_after")?,
                "rotate_after",
            )?,
            REFERENCE => references.push(take_reference(v)?),
            OWNER => once(
                &mut owner,
                as_str(capped(v, "owner", MAX_NAME)?, "owner")?,
                "owner",
            )?,
            SHARED_WITH => {
                shared_with.push(as_str(capped(v, "shared_with", MAX_NAME)?, "shared_with")?)
            }
            other => return Err(unexpected("key_info", other)),
        }
    }
    Ok(KeyInfo {
        name: required(name, "key")?,
        description: description.unwrap_or_default(),
        created: required(created, "created")?,
        primary_version: required(primary, "primary")?,
        tampered: tampered.unwrap_or(false),
        versions,
        rotate_after: rotate_after.unwrap_or(0),
        references,
        owner: owner.unwrap_or_default(),
        shared_with,
    })
}

fn put_status(w: &mut Writer, s: &StatusInfo) {
    w.bool(INITIALIZED, s.initialized)
        .bool(SEALED, s.sealed)
        .bool(ZEROIZED, s.zeroized)
        .u32(THRESHOLD, s.threshold)
        .u32(SHARES, s.shares)
        .u32(PROGRESS, s.progress)
        .bool(DEV_MODE, s.dev_mode)
        .u32(KEY_COUNT, s.key_count)
        .str(SERVER_VERSION, &s.server_version)
        .str(STORE_ID, truncate(&s.store_id, MAX_TEXT));
    for k in &s.audit_sinks {
        let mut r = Writer::new();
        r.str(DESCRIPTION, truncate(&k.name, MAX_TEXT))
            .u64(LAST_SEQ, k.delivered)
            .u64(LAG, k.lag);
        if let Some(e) = &k.error {
            r.str(MESSAGE, truncate(e, MAX_TEXT));
        }
        w.record(AUDIT_SINK, &r);
    }
}

fn take_sink(v: &[u8]) -> Result<AuditSinkInfo, DecodeError> {
    let mut k = AuditSinkInfo::default();
    let mut seen = [false; 256];
    let mut r = Reader::new(v);
    while let Some((t, v)) = r.next_field()? {
        if std::mem::replace(&mut seen[usize::from(t)], true) {
            return Err(DecodeError::DuplicateField("audit_sink"));
        }
        match t {
            DESCRIPTION => k.name = as_str(capped(v, "name", MAX_TEXT)?, "name")?,
            LAST_SEQ => k.delivered = as_u64(v, "last_seq")?,
            LAG => k.lag = as_u64(v, "lag")?,
            MESSAGE => k.error = Some(as_str(capped(v, "message", MAX_TEXT)?, "message")?),
            other => return Err(unexpected("audit_sink", other)),
        }
    }
    Ok(k)
}

fn take_approvals(body: &[u8]) -> Result<Response, DecodeError> {
    let mut out = Vec::new();
    let mut rd = Reader::new(body);
    while let Some((t, v)) = rd.next_field()? {
        if t != APPROVAL_INFO {
            return Err(unexpected("approvals", t));
        }
        if out.len() >= MAX_APPROVALS {
            return Err(DecodeError::DuplicateField("approval_info"));
        }
        let mut a = ApprovalInfo::default();
        let mut seen = [false; 256];
        let mut r = Reader::new(v);
        while let Some((t, v)) = r.next_field()? {
            if t != APPROVED_BY && std::mem::replace(&mut seen[usize::from(t)], true) {
                return Err(DecodeError::DuplicateField("approval_info"));
            }
            match t {
                APPROVAL_ID => a.id = as_u64(v, "approval_id")?,
                DESCRIPTION => a.what = as_str(capped(v, "description", MAX_TEXT)?, "description")?,
                OPERATOR => a.requester = as_str(capped(v, "operator", MAX_NAME)?, "operator")?,
                APPROVED_BY => {
                    if a.approved_by.len() >= MAX_APPROVALS {
                        return Err(DecodeError::DuplicateField("approved_by"));
                    }
                    a.approved_by
                        .push(as_str(capped(v, "approved_by", MAX_NAME)?, "approved_by")?);
                }
                THRESHOLD => a.needed = as_u32(v, "threshold")?,
                STATE => a.state = as_str(capped(v, "state", MAX_NAME)?, "state")?,
                EXPIRES => a.expires = as_u64(v, "expires")?,
                MESSAGE => a.message = Some(as_str(capped(v, "message", MAX_TEXT)?, "message")?),
                other => return Err(unexpected("approval_info", other)),
            }
        }
        out.push(a);
    }
    Ok(Response::Approvals(out))
}

fn take_resplit(body: &[u8]) -> Result<ResplitInfo, DecodeError> {
    let mut r = ResplitInfo::default();
    let mut seen = [false; 256];
    let mut rd = Reader::new(body);
    while let Some((t, v)) = rd.next_field()? {
        let repeated = matches!(t, SHARE | FINGERPRINT | ENCRYPTED_SHARE);
        if !repeated && std::mem::replace(&mut seen[usize::from(t)], true) {
            return Err(DecodeError::DuplicateField("resplit"));
        }
        match t {
            NONCE => r.nonce = as_str(capped(v, "nonce", MAX_NAME)?, "nonce")?,
            PROGRESS => r.progress = as_u32(v, "progress")?,
            THRESHOLD => r.needed = as_u32(v, "threshold")?,
            SHARES => r.shares = as_u32(v, "shares")?,
            NEW_THRESHOLD => r.threshold = as_u32(v, "new_threshold")?,
            SHARE => {
                if r.new_shares.len() >= MAX_NEW_SHARES {
                    return Err(DecodeError::DuplicateField("share"));
                }
                r.new_shares
                    .push(SecretBytes::from_slice(capped(v, "share", MAX_SECRET)?));
            }
            FINGERPRINT => {
                if r.fingerprints.len() >= MAX_NEW_SHARES {
                    return Err(DecodeError::DuplicateField("fingerprint"));
                }
                let v = capped(v, "fingerprint", MAX_FINGERPRINT)?;
                r.fingerprints.push(as_str(v, "fingerprint")?);
            }
            ENCRYPTED_SHARE => {
                if r.encrypted_shares.len() >= MAX_NEW_SHARES {
                    return Err(DecodeError::DuplicateField("encrypted_share"));
                }
                let v = capped(v, "encrypted_share", MAX_ENCRYPTED_SHARE)?;
                r.encrypted_shares.push(as_str(v, "encrypted_share")?);
            }
            other => return Err(unexpected("resplit", other)),
        }
    }
    Ok(r)
}

fn take_status(body: &[u8]) -> Result<StatusInfo, DecodeError> {
    let mut s = StatusInfo::default();
    let mut seen = [false; 256];
    let mut r = Reader::new(body);
    while let Some((t, v)) = r.next_field()? {
        if t == AUDIT_SINK {
            if s.audit_sinks.len() >= 16 {
                return Err(DecodeError::InvalidValue("too many audit sinks"));
            }
            s.audit_sinks.push(take_sink(v)?);
            continue;
        }
        if std::mem::replace(&mut seen[usize::from(t)], true) {
            return Err(DecodeError::DuplicateField("status"));
        }
        match t {
            INITIALIZED => s.initialized = as_bool(v, "initialized")?,
            SEALED => s.sealed = as_bool(v, "sealed")?,
            ZEROIZED => s.zeroized = as_bool(v, "zeroized")?,
            THRESHOLD => s.threshold = as_u32(v, "threshold")?,
            SHARES => s.shares = as_u32(v, "shares")?,
            PROGRESS => s.progress = as_u32(v, "progress")?,
            DEV_MODE => s.dev_mode = as_bool(v, "dev_mode")?,
            KEY_COUNT => s.key_count = as_u32(v, "key_count")?,
            SERVER_VERSION => s.server_version = as_str(v, "server_version")?,
            STORE_ID => s.store_id = as_str(v, "store_id")?,
            other => return Err(unexpected("status", other)),
        }
    }
    Ok(s)
}

fn take_operator_info(body: &[u8]) -> Result<OperatorInfo, DecodeError> {
    let (mut name, mut role, mut locked, mut failed) = (None, None, None, None);
    let mut r = Reader::new(body);
    while let Some((t, v)) = r.next_field()? {
        match t {
            OPERATOR => once(&mut name, as_str(v, "operator")?, "operator")?,
            ROLE => once(&mut role, as_str(v, "role")?, "role")?,
            LOCKED => once(&mut locked, as_bool(v, "locked")?, "locked")?,
            FAILED_LOGINS => once(&mut failed, as_u32(v, "failed")?, "failed")?,
            other => return Err(unexpected("operator_info", other)),
        }
    }
    Ok(OperatorInfo {
        name: required(name, "operator")?,
        role: required(role, "role")?,
        locked: locked.unwrap_or(false),
        failed_logins: failed.unwrap_or(0),
    })
}

impl Response {
    /// Encodes the body.
    pub fn encode_body(&self) -> Body {
        let mut w = Writer::new();
        match self {
            Response::Status(s) => put_status(&mut w, s),
            Response::DataKey {
                key,
                version,
                plaintext,
                ciphertext,
            } => {
                w.str(KEY_NAME, key)
                    .u32(KEY_VERSION, *version)
                    .bytes(PLAINTEXT, plaintext.expose())
                    .bytes(CIPHERTEXT, ciphertext);
            }
            Response::Decrypted {
                key,
                version,
                plaintext,
            } => {
                w.str(KEY_NAME, key)
                    .u32(KEY_VERSION, *version)
                    .bytes(PLAINTEXT, plaintext.expose());
            }
            Response::ReEncrypted {
                key,
                version,
                source_version,
                ciphertext,
            } => {
                w.str(KEY_NAME, key)
                    .u32(KEY_VERSION, *version)
                    .u32(SOURCE_VERSION, *source_version)
                    .bytes(CIPHERTEXT, ciphertext);
            }
            Response::Random { bytes } => {
                w.bytes(RANDOM, bytes.expose());
            }
            Response::P11Data { data } => {
                w.bytes(DATA, data.expose());
            }
            Response::P11Objects {
                keys,
                objects,
                more,
            } => {
                for k in keys {
                    put_key_info(&mut w, k);
                }
                for o in objects {
                    let mut r = Writer::new();
                    r.u64(OBJECT, o.id);
                    put_attrs(&mut r, ATTR, &o.attrs);
                    w.record(P11_OBJECT, &r);
                }
                if *more {
                    w.bool(MORE, true);
                }
            }
            Response::LoggedIn { operator, role } => {
                w.str(OPERATOR, operator).str(ROLE, role);
            }
            Response::Done => {}
            Response::Approvals(list) => {
                for a in list {
                    let mut r = Writer::new();
                    r.u64(APPROVAL_ID, a.id)
                        .str(DESCRIPTION, truncate(&a.what, MAX_TEXT))
                        .str(OPERATOR, &a.requester)
                        .u32(THRESHOLD, a.needed)
                        .str(STATE, &a.state)
                        .u64(EXPIRES, a.expires);
                    for o in &a.approved_by {
                        r.str(APPROVED_BY, o);
                    }
                    if let Some(m) = &a.message {
                        r.str(MESSAGE, truncate(m, MAX_TEXT));
                    }
                    w.record(APPROVAL_INFO, &r);
                }
            }
            Response::Resplit(r) => {
                w.str(NONCE, &r.nonce)
                    .u32(PROGRESS, r.progress)
                    .u32(THRESHOLD, r.needed)
                    .u32(SHARES, r.shares)
                    .u32(NEW_THRESHOLD, r.threshold);
                for s in &r.new_shares {
                    w.bytes(SHARE, s.expose());
                }
                for f in &r.fingerprints {
                    w.str(FINGERPRINT, f);
                }
                for s in &r.encrypted_shares {
                    w.str(ENCRYPTED_SHARE, s);
                }
            }
            Response::Token { token, ttl } => {
                w.bytes(TOKEN, token.expose()).u64(TOKEN_TTL, *ttl);
            }
            Response::Reloaded { message } => {
                w.str(MESSAGE, truncate(message, MAX_TEXT));
            }
            Response::Operators(ops) => {
                for o in ops {
                    let mut r = Writer::new();
                    r.str(OPERATOR, &o.name)
                        .str(ROLE, &o.role)
                        .bool(LOCKED, o.locked)
                        .u32(FAILED_LOGINS, o.failed_logins);
                    w.record(OPERATOR_INFO, &r);
                }
            }
            Response::Key(k) => put_key_info(&mut w, k),
            Response::Keys(ks) => {
                for k in ks {
                    put_key_info(&mut w, k);
                }
            }
            Response::KeyPrimary { key, version } => {
                w.str(KEY_NAME, key).u32(KEY_VERSION, *version);
            }
            Response::AuditPage(p) => audit::put_page(&mut w, p),
            Response::AuditRange(r) => audit::put_range(&mut w, r),
            Response::AuditKeys(k) => audit::put_key_list(&mut w, k),
            Response::Error { message, .. } => {
                // Within what a decoder accepts, whatever built it.
                w.str(MESSAGE, truncate(message, MAX_TEXT));
            }
        }
        w.finish()
    }

    /// Builds the response frame to a request of `op` with `request_id`.
    pub fn to_frame(&self, op: u16, request_id: u64) -> Frame {
        let status = match self {
            Response::Error { code, .. } => *code as u16,
            _ => 0,
        };
        Frame {
            header: Header {
                version: PROTOCOL_VERSION,
                kind: FrameKind::Response as u8,
                op,
                status,
                flags: 0,
                request_id,
            },
            body: self.encode_body(),
        }
    }

    /// Decodes a response frame.
    pub fn from_frame(frame: &Frame) -> Result<Response, DecodeError> {
        let h = &frame.header;
        if h.version != PROTOCOL_VERSION {
            return Err(DecodeError::UnsupportedVersion(h.version));
        }
        if h.kind != FrameKind::Response as u8 {
            return Err(DecodeError::UnknownKind(h.kind));
        }
        if h.status != 0 {
            let code = ErrorCode::from_u16(h.status).ok_or(DecodeError::UnknownStatus(h.status))?;
            let f = Fields::read(&frame.body, "error", &[MESSAGE])?;
            return Ok(Response::Error {
                code,
                message: f.message.unwrap_or_default(),
            });
        }
        let op = Op::from_u16(h.op).ok_or(DecodeError::UnknownOperation(h.op))?;
        Response::decode_body(op, &frame.body)
    }

    /// Decodes the body of a successful response to `op`.
    pub fn decode_body(op: Op, body: &[u8]) -> Result<Response, DecodeError> {
        let what = op.name();
        // A guarded request that waits for approvals answers with them.
        let waits = matches!(op, Op::KeyDestroy | Op::Zeroize | Op::OperatorRemove)
            && matches!(Reader::new(body).next_field(), Ok(Some((APPROVAL_INFO, _))));
        if waits {
            return take_approvals(body);
        }
        Ok(match op {
            Op::ApprovalList | Op::Approve | Op::ApprovalStatus => take_approvals(body)?,
            Op::Status | Op::Unseal | Op::Seal => Response::Status(take_status(body)?),
            Op::GenerateDataKey => {
                let f = Fields::read(body, what, &[KEY_NAME, KEY_VERSION, PLAINTEXT, CIPHERTEXT])?;
                Response::DataKey {
                    key: required(f.key, "key")?,
                    version: required(f.version, "version")?,
                    plaintext: required(f.plaintext, "plaintext")?,
                    ciphertext: required(f.ciphertext, "ciphertext")?,
                }
            }
            Op::Decrypt => {
                let f = Fields::read(body, what, &[KEY_NAME, KEY_VERSION, PLAINTEXT])?;
                Response::Decrypted {
                    key: required(f.key, "key")?,
                    version: required(f.version, "version")?,
                    plaintext: required(f.plaintext, "plaintext")?,
                }
            }
            Op::ReEncrypt => {
                let f = Fields::read(
                    body,
                    what,
                    &[KEY_NAME, KEY_VERSION, SOURCE_VERSION, CIPHERTEXT],
                )?;
                Response::ReEncrypted {
                    key: required(f.key, "key")?,
                    version: required(f.version, "version")?,
                    source_version: required(f.source_version, "source_version")?,
                    ciphertext: required(f.ciphertext, "ciphertext")?,
                }
            }
            Op::GenerateRandom => Response::Random {
                bytes: required(Fields::read(body, what, &[RANDOM])?.random, "random")?,
            },
            Op::P11Encrypt | Op::P11Decrypt | Op::P11Sign | Op::P11Wrap => Response::P11Data {
                data: Fields::read(body, what, &[DATA])?
                    .data
                    .unwrap_or_else(|| SecretBytes::from_slice(&[])),
            },
            Op::P11Objects
            | Op::P11Generate
            | Op::P11Create
            | Op::P11SetAttributes
            | Op::P11Unwrap => take_p11_objects(body, what)?,
            Op::ResplitInit | Op::ResplitUpdate | Op::ResplitStatus => {
                Response::Resplit(take_resplit(body)?)
            }
            Op::ResplitCancel => {
                Fields::read(body, what, &[])?;
                Response::Done
            }
            Op::TokenCreate | Op::P11Login => {
                let f = Fields::read(body, what, &[TOKEN, TOKEN_TTL])?;
                Response::Token {
                    token: required(f.token, "token")?,
                    ttl: required(f.token_ttl, "token_ttl")?,
                }
            }
            Op::TokenRevoke | Op::P11Logout | Op::P11Verify | Op::P11Destroy => {
                Fields::read(body, what, &[])?;
                Response::Done
            }
            Op::Login | Op::TokenLogin => {
                let f = Fields::read(body, what, &[OPERATOR, ROLE])?;
                Response::LoggedIn {
                    operator: required(f.operator, "operator")?,
                    role: required(f.role, "role")?,
                }
            }
            Op::Reload => Response::Reloaded {
                message: required(Fields::read(body, what, &[MESSAGE])?.message, "message")?,
            },
            Op::Zeroize
            | Op::OperatorAdd
            | Op::OperatorPasswd
            | Op::OperatorUnlock
            | Op::OperatorRemove => {
                Fields::read(body, what, &[])?;
                Response::Done
            }
            Op::OperatorList => {
                let mut out = Vec::new();
                let mut r = Reader::new(body);
                while let Some((t, v)) = r.next_field()? {
                    if t != OPERATOR_INFO {
                        return Err(unexpected(what, t));
                    }
                    out.push(take_operator_info(v)?);
                }
                Response::Operators(out)
            }
            Op::KeyList => {
                let mut out = Vec::new();
                let mut r = Reader::new(body);
                while let Some((t, v)) = r.next_field()? {
                    if t != KEY_INFO {
                        return Err(unexpected(what, t));
                    }
                    out.push(take_key_info(v)?);
                }
                Response::Keys(out)
            }
            Op::KeyCreate
            | Op::KeyDescribe
            | Op::KeyRotate
            | Op::KeyDisable
            | Op::KeyEnable
            | Op::KeyScheduleDestroy
            | Op::KeyCancelDestroy
            | Op::KeyDestroy
            | Op::KeySetRotation
            | Op::KeyShare
            | Op::KeyUnshare => {
                let mut r = Reader::new(body);
                let mut info = None;
                while let Some((t, v)) = r.next_field()? {
                    if t != KEY_INFO {
                        return Err(unexpected(what, t));
                    }
                    once(&mut info, take_key_info(v)?, "key_info")?;
                }
                Response::Key(required(info, "key_info")?)
            }
            Op::RegisterDeks | Op::WatchKey => {
                let f = Fields::read(body, what, &[KEY_NAME, KEY_VERSION])?;
                Response::KeyPrimary {
                    key: required(f.key, "key")?,
                    version: required(f.version, "version")?,
                }
            }
            Op::RekeyReport => {
                Fields::read(body, what, &[])?;
                Response::Done
            }
            Op::AuditList | Op::AuditRead => Response::AuditPage(audit::take_page(body, what)?),
            Op::AuditExport | Op::AuditExportDone | Op::AuditPrune => {
                Response::AuditRange(audit::take_range(body, what)?)
            }
            Op::AuditPubkey | Op::AuditKeyRotate => {
                Response::AuditKeys(audit::take_key_list(body, what)?)
            }
        })
    }
}
