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
//! - `mek`: master key records and version states.
//! - `wrap`: the wrapped data-key format and the wrap/unwrap mechanism.
//! - `seal`: unseal shares, the sealed root, sealed objects.
//! - `manifest`: the sealed list of every object's current revision.
//! - [`audit_key`]: the Ed25519 key that signs audit checkpoints, and the
//!   offline check of its signatures.
//! - `operator`: roles and Argon2id password hashing.
//! - `crypto`: AES-256-GCM-SIV and HKDF/HMAC-SHA256, nothing else.
//! - [`secret`]: key types (zeroizing, redacting, not `Clone`).
//! - [`store`]: the key-store trait the backends implement.
//! - [`fuzz`]: fuzzing harnesses for every parser of outside input.
//! - [`random`], `codec`, [`error`]: helpers.
//!
//! # Public API
//! The [`Hsm`] and the types its methods take and give, the key types in
//! [`secret`], the [`store`] trait a backend implements, and the [`fuzz`]
//! harnesses. Everything else (record encodings, sealing, the wrap format's
//! internals, password hashing) is private to the crate, so only the HSM's
//! own methods, which check sessions and roles, reach keys and records.
//! The `internals` feature opens those modules for the workspace's own
//! tests that play a hostile disk and for writing fuzz seeds; nothing that
//! ships enables it.
#![forbid(unsafe_code)]

/// Declares modules private to the crate, or public with `internals`.
macro_rules! internal_modules {
    ($($m:ident),* $(,)?) => {
        $(
            #[cfg(feature = "internals")]
            #[doc(hidden)]
            pub mod $m;
            #[cfg(not(feature = "internals"))]
            mod $m;
        )*
    };
}

internal_modules!(codec, crypto, manifest, mek, operator, seal, wrap);

pub mod audit_key;
pub mod error;
pub mod fuzz;
pub mod hsm;
pub mod pkcs11;
pub mod random;
pub mod secret;
pub mod store;

pub use audit_key::{AuditPublicKey, AuditSignature};
pub use error::HsmError;
pub use hsm::{
    Caller, GeneratedDataKey, Hsm, HsmEvent, InitOutput, KeyInfo, OperatorInfo, OperatorSession,
    Permission, ResplitProgress, ResplitStatus, Status, TamperPolicy, VersionInfo, Versions, now,
};
pub use mek::VersionState;
pub use operator::Role;
pub use seal::STORE_ID_LEN;
pub use wrap::{Context, WrappedKey, validate_context};
