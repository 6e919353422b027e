//! `tde-hsm`: an in-process software HSM for TDE master keys.
//!
//! It holds master encryption keys (MEKs) that never leave it in plaintext,
//! wraps and unwraps per-tablespace data keys (DEKs) with AES-256-GCM-SIV
//! bound to an encryption context, seals every stored object under a root
//! key that exists only in memory, reconstructs that root from Shamir shares,
//! authenticates operators, and zeroizes on command or on tamper. It knows
//! nothing of sockets or SQL: persistence goes through [`store::ObjectStore`].
//!
//! # Layout
//! - [`hsm`]: the [`Hsm`] state machine (seal state, keys, operators).
//! - [`mek`]: master key records and version states.
//! - [`wrap`]: the wrapped data-key format and the wrap/unwrap mechanism.
//! - [`seal`]: unseal shares, the sealed root, sealed objects.
//! - [`manifest`]: the sealed list of every object's current revision.
//! - [`operator`]: roles and Argon2id password hashing.
//! - [`crypto`]: AES-256-GCM-SIV and HKDF/HMAC-SHA256, nothing else.
//! - [`secret`]: key types (zeroizing, redacting, not `Clone`).
//! - [`store`]: the key-store trait the backends implement.
//! - [`fuzz`]: fuzzing harnesses for every parser of outside input.
//! - [`random`], [`codec`], [`error`]: helpers.
#![forbid(unsafe_code)]

pub mod codec;
pub mod crypto;
pub mod error;
pub mod fuzz;
pub mod hsm;
pub mod manifest;
pub mod mek;
pub mod operator;
pub mod random;
pub mod seal;
pub mod secret;
pub mod store;
pub mod wrap;

pub use error::HsmError;
pub use hsm::{
    Caller, GeneratedDataKey, Hsm, HsmEvent, InitOutput, KeyInfo, OperatorInfo, Status,
    TamperPolicy, VersionInfo, Versions,
};
pub use mek::VersionState;
pub use operator::Role;
pub use wrap::Context;
