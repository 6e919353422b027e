//! The HSM's error type. Messages name keys, versions and operators, never
//! key bytes, passwords or shares.

use thiserror::Error;

use crate::store::StoreError;

/// Everything an HSM operation can fail with.
#[derive(Debug, Error)]
pub enum HsmError {
    /// No store has been initialized.
    #[error("the key store is not initialized: run `tde init`")]
    NotInitialized,
    /// `init` on a store that exists.
    #[error("the key store is already initialized")]
    AlreadyInitialized,
    /// The HSM is sealed.
    #[error("the HSM is sealed: give unseal shares with `tde unseal`")]
    Sealed,
    /// The root material was destroyed by zeroization.
    #[error("the HSM was zeroized: its root material is destroyed and it can never be unsealed")]
    Zeroized,
    /// A share that cannot be used.
    #[error("invalid unseal share: {0}")]
    InvalidShare(String),
    /// Enough shares were given but they do not open the sealed root.
    #[error(
        "unseal failed: the shares do not reconstruct this store's unseal key; progress was reset"
    )]
    UnsealFailed,
    /// No such key or version.
    #[error("master key {0} not found")]
    KeyNotFound(String),
    /// Name already taken.
    #[error("master key {0} already exists")]
    KeyExists(String),
    /// Version disabled.
    #[error("master key {key} version {version} is disabled")]
    KeyDisabled {
        /// Key name.
        key: String,
        /// Version.
        version: u32,
    },
    /// Version destroyed.
    #[error(
        "master key {key} version {version} is destroyed; data wrapped under it cannot be recovered"
    )]
    KeyDestroyed {
        /// Key name.
        key: String,
        /// Version.
        version: u32,
    },
    /// Version pending destruction.
    #[error(
        "master key {key} version {version} is scheduled for destruction; cancel it to use the key"
    )]
    KeyPendingDestruction {
        /// Key name.
        key: String,
        /// Version.
        version: u32,
    },
    /// A state transition that is not allowed.
    #[error("{0}")]
    InvalidKeyState(String),
    /// The wrapped blob is malformed or fails authentication.
    #[error("invalid ciphertext: {0}")]
    InvalidCiphertext(&'static str),
    /// The encryption context does not match the one used to wrap.
    #[error("encryption context does not match the one the data key was wrapped with")]
    ContextMismatch,
    /// A sealed store object failed authentication.
    #[error("key store object {0} failed authentication: it was modified outside the HSM (tamper)")]
    Tampered(String),
    /// No such operator.
    #[error("operator {0} not found")]
    OperatorNotFound(String),
    /// Name already taken.
    #[error("operator {0} already exists")]
    OperatorExists(String),
    /// Wrong name or password.
    #[error("login failed: wrong operator name or password")]
    LoginFailed,
    /// Locked after failed logins.
    #[error(
        "operator {0} is locked after repeated failed logins; another crypto officer must unlock it"
    )]
    OperatorLocked(String),
    /// Role does not allow the operation.
    #[error("permission denied: {0}")]
    PermissionDenied(String),

    /// The request needs a live operator session.
    #[error("not logged in: {0}")]
    NotAuthenticated(&'static str),
    /// A bad argument.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A PKCS#11 request the HSM refuses, with the return value the
    /// application gets.
    #[error("{rv}: {1}", rv = .0.name())]
    Pkcs11(crate::pkcs11::Ckr, String),
    /// An internal failure.
    #[error("internal error: {0}")]
    Internal(&'static str),
}
