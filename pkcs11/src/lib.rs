//! `libtde_pkcs11.so`: a PKCS#11 (Cryptoki v2.40 and v3.0) module whose
//! tokens are tde sidecars. Keys live in the sidecar's HSM and never leave
//! it; the module sends each operation over the sidecar's data socket,
//! where it is authorized (peer uid, client policy, token login) and
//! audited with the calling process's identity.
//!
//! Two layers: [`ffi`] is the only place with `unsafe` (raw C types,
//! pointer checks, the panic boundary); [`module`] is the safe core it
//! calls. See `docs/PKCS11.md`.

#![deny(unsafe_code)]

pub mod config;
pub mod ffi;
pub mod module;
