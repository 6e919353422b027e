//! The key-store trait. The HSM persists only sealed objects through it and
//! knows nothing of SQL; backends (SQLite now, PostgreSQL later) implement
//! it. Every method is one whole operation, so a backend maps each call to
//! one transaction.

use thiserror::Error;

use crate::seal::StoreId;

/// Object kind: a master key record.
pub const KIND_MASTER_KEY: u8 = 1;
/// Object kind: an operator record.
pub const KIND_OPERATOR: u8 = 2;
/// Object kind: the store manifest (see [`crate::manifest`]).
pub const KIND_MANIFEST: u8 = 3;
/// Object kind: the audit signing key (see [`crate::audit_key`]).
pub const KIND_AUDIT_KEY: u8 = 4;

/// Public facts about a store (not secret, not sealed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreMeta {
    /// Random id bound into shares and sealed objects.
    pub store_id: StoreId,
    /// Shares needed to unseal.
    pub threshold: u8,
    /// Shares issued.
    pub shares: u8,
    /// Dev mode: a single share kept in a local file.
    pub dev: bool,
    /// Root material destroyed.
    pub zeroized: bool,
    /// Unix seconds.
    pub created: u64,
}

/// One sealed object as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    /// Kind.
    pub kind: u8,
    /// Id (key or operator name).
    pub id: String,
    /// Revision, incremented on every write, bound into the seal.
    pub revision: u64,
    /// The sealed record.
    pub blob: Vec<u8>,
}

/// A change to apply atomically.
#[derive(Debug, Clone)]
pub enum StoreOp {
    /// Insert or replace an object.
    Put(StoredObject),
    /// Delete an object.
    Delete {
        /// Kind.
        kind: u8,
        /// Id.
        id: String,
    },
    /// Replace the sealed root (a format upgrade, or a new unseal key
    /// after a re-split; same root key).
    Root(Vec<u8>),
    /// New share parameters in the store's metadata (a re-split).
    Custody {
        /// Shares needed to unseal.
        threshold: u8,
        /// Shares issued.
        shares: u8,
    },
}

/// Store failures. Messages carry no object contents.
#[derive(Debug, Error)]
pub enum StoreError {
    /// Reading or writing failed (disk full, permissions, locked).
    #[error("key store I/O failed: {0}")]
    Io(String),
    /// `initialize` on an initialized store.
    #[error("the key store is already initialized")]
    AlreadyInitialized,
    /// The store's structure is damaged.
    #[error("the key store is damaged: {0}")]
    Corrupt(String),
}

/// A key store backend.
pub trait ObjectStore: Send + Sync {
    /// The store's meta, or `None` before initialization.
    fn meta(&self) -> Result<Option<StoreMeta>, StoreError>;
    /// Creates the store: meta, sealed root and first objects, in one
    /// transaction. Fails if it exists.
    fn initialize(
        &self,
        meta: &StoreMeta,
        sealed_root: &[u8],
        objects: &[StoredObject],
    ) -> Result<(), StoreError>;
    /// The sealed root key, `None` once zeroized.
    fn sealed_root(&self) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every object.
    fn objects(&self) -> Result<Vec<StoredObject>, StoreError>;
    /// Applies changes in one transaction.
    fn apply(&self, ops: &[StoreOp]) -> Result<(), StoreError>;
    /// Destroys the sealed root and every object, marks the store zeroized,
    /// and scrubs freed pages so the bytes are not recoverable from the file.
    fn zeroize(&self) -> Result<(), StoreError>;
}
