//! The wrapped data-key blob, the data-key mechanisms' ciphertext format.
//!
//! ```text
//! offset   size  field
//! 0        4     magic "TDEW"
//! 4        1     format version (1)
//! 5        1     n = length of the master key name (1..=128)
//! 6        n     master key name, UTF-8
//! 6+n      4     master key version, u32 BE
//! 10+n     16    context check: HMAC-SHA256(K_ctx, canonical context)[..16]
//! 26+n     12    nonce
//! 38+n     48    AES-256-GCM-SIV(K_wrap, nonce, DEK (32 bytes), AAD) with tag
//! total    86+n
//! ```
//!
//! AAD = bytes `0 .. 26+n` of the blob followed by the canonical encoding
//! of the encryption context, so the header and the context are both bound.
//! `K_wrap` and `K_ctx` are HKDF-SHA256 (RFC 5869) outputs of the master key
//! version with distinct `info` strings (see [`VersionKeys`]). The context
//! check lets a wrong context be told apart from a damaged blob; it reveals
//! nothing about the context without the key.
//!
//! Canonical context: `u16 BE count`, then per entry in byte order of the
//! keys: `u16 BE key length | key | u16 BE value length | value`.

use std::collections::BTreeMap;

use subtle::ConstantTimeEq;

use crate::codec::{Dec, Enc};
use crate::crypto::{self, Aead, NONCE_LEN, TAG_LEN};
use crate::error::HsmError;
use crate::secret::{DataKey, DerivedKey, KEY_LEN, MasterKeyMaterial, SecretBuf};

/// Magic bytes of a wrapped data key.
pub const MAGIC: &[u8; 4] = b"TDEW";
/// Current format version.
pub const FORMAT_VERSION: u8 = 1;
/// Length of the context check value.
pub const CONTEXT_CHECK_LEN: usize = 16;
/// Largest master key name.
pub const MAX_NAME_LEN: usize = 128;
/// Most context entries.
pub const MAX_CONTEXT_ENTRIES: usize = 32;
/// Longest context key or value.
pub const MAX_CONTEXT_FIELD: usize = 256;

/// An encryption context.
pub type Context = BTreeMap<String, String>;

/// A wrapped blob parsed once into its parts, not yet authenticated: the
/// master key name and version it names (to find the key and check policy
/// before any key is touched), and the bytes [`unwrap`] authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WrappedKey<'a> {
    /// Master key name.
    pub key: &'a str,
    /// Master key version.
    pub version: u32,
    /// Bytes `0 .. 26+n`: the header, bound as AAD.
    header: &'a [u8],
    /// The context check value.
    check: &'a [u8],
    /// Nonce, sealed data key and tag.
    sealed: &'a [u8],
}

/// Checks the context limits.
pub fn validate_context(context: &Context) -> Result<(), HsmError> {
    if context.len() > MAX_CONTEXT_ENTRIES {
        return Err(HsmError::InvalidArgument(format!(
            "encryption context has more than {MAX_CONTEXT_ENTRIES} entries"
        )));
    }
    if context
        .iter()
        .any(|(k, v)| k.is_empty() || k.len() > MAX_CONTEXT_FIELD || v.len() > MAX_CONTEXT_FIELD)
    {
        return Err(HsmError::InvalidArgument(format!(
            "encryption context keys must be 1..={MAX_CONTEXT_FIELD} bytes and values at most {MAX_CONTEXT_FIELD}"
        )));
    }
    Ok(())
}

/// The canonical byte encoding of a context.
pub fn canonical_context(context: &Context) -> Vec<u8> {
    let mut e = Enc::default();
    e.u16(u16::try_from(context.len()).unwrap_or(u16::MAX));
    for (k, v) in context {
        e.var(k.as_bytes()).var(v.as_bytes());
    }
    e.0
}

/// The keys derived from one master key version.
pub struct VersionKeys {
    wrap: Aead,
    ctx: DerivedKey,
    /// For the PKCS#11 module's AES mechanisms: never the master key
    /// itself, so no PKCS#11 output is ever under the key that wraps data
    /// keys.
    p11: aws_lc_rs::aead::LessSafeKey,
}

impl std::fmt::Debug for VersionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VersionKeys").finish_non_exhaustive()
    }
}

impl VersionKeys {
    /// `K_wrap = HKDF(salt = "tde/v1/mek", IKM = MEK, info = "wrap" | name | version)`,
    /// `K_ctx` the same with `info = "context" | name | version`, and
    /// `K_p11` with `info = "pkcs11-aes" | name | version` (HKDF: RFC 5869).
    pub fn derive(mek: &MasterKeyMaterial, key: &str, version: u32) -> Result<Self, HsmError> {
        let v = version.to_be_bytes();
        let wrap = crypto::derive(mek.expose(), b"tde/v1/mek", &[b"wrap", key.as_bytes(), &v])?;
        let ctx = crypto::derive(
            mek.expose(),
            b"tde/v1/mek",
            &[b"context", key.as_bytes(), &v],
        )?;
        let p11 = crypto::derive(
            mek.expose(),
            b"tde/v1/mek",
            &[b"pkcs11-aes", key.as_bytes(), &v],
        )?;
        let p11 = aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, p11.expose())
            .map_err(|_| HsmError::Internal("AES-256-GCM refused a 32-byte key"))?;
        Ok(Self {
            wrap: Aead::new(&wrap),
            ctx,
            p11: aws_lc_rs::aead::LessSafeKey::new(p11),
        })
    }

    /// AES-256-GCM (NIST SP 800-38D) encryption under `K_p11`: the
    /// ciphertext and the 16-byte tag.
    pub fn gcm_seal(&self, iv: &[u8; 12], aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, HsmError> {
        use aws_lc_rs::aead::{Aad, Nonce};
        let mut out = plaintext.to_vec();
        self.p11
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(*iv), Aad::from(aad), &mut out)
            .map_err(|_| HsmError::Internal("AES-GCM encryption failed"))?;
        Ok(out)
    }

    /// AES-256-GCM decryption under `K_p11`; `None` if the tag does not
    /// verify.
    pub fn gcm_open(&self, iv: &[u8; 12], aad: &[u8], sealed: &[u8]) -> Option<SecretBuf> {
        use aws_lc_rs::aead::{Aad, Nonce};
        let mut buf = zeroize::Zeroizing::new(sealed.to_vec());
        let n = self
            .p11
            .open_in_place(Nonce::assume_unique_for_key(*iv), Aad::from(aad), &mut buf)
            .ok()?
            .len();
        Some(SecretBuf::new(buf[..n].to_vec()))
    }
}

fn header_bytes(key: &str, version: u32, check: &[u8; CONTEXT_CHECK_LEN]) -> Vec<u8> {
    let mut e = Enc::with_capacity(6 + key.len() + 4 + CONTEXT_CHECK_LEN);
    e.raw(MAGIC)
        .u8(FORMAT_VERSION)
        .u8(u8::try_from(key.len()).unwrap_or(u8::MAX))
        .raw(key.as_bytes())
        .u32(version)
        .raw(check);
    e.0
}

/// Wraps `dek` under one master key version, bound to `context`.
pub fn wrap(
    keys: &VersionKeys,
    key: &str,
    version: u32,
    dek: &DataKey,
    context: &Context,
) -> Result<Vec<u8>, HsmError> {
    if key.is_empty() || key.len() > MAX_NAME_LEN {
        return Err(HsmError::InvalidArgument("master key name length".into()));
    }
    let canon = canonical_context(context);
    let check = crypto::mac16(&keys.ctx, &canon);
    let mut blob = header_bytes(key, version, &check);
    let mut aad = blob.clone();
    aad.extend_from_slice(&canon);
    let sealed = keys.wrap.seal(&aad, dek.expose())?;
    blob.extend_from_slice(&sealed);
    Ok(blob)
}

impl<'a> WrappedKey<'a> {
    /// Parses a blob without authenticating it. Every length is checked:
    /// anything but a well-formed blob of the one format is an error.
    pub fn parse(blob: &'a [u8]) -> Result<Self, HsmError> {
        let mut d = Dec::new(blob, "wrapped data key is malformed");
        if d.raw(4)? != MAGIC {
            return Err(HsmError::InvalidCiphertext(
                "not a tde wrapped data key (bad magic)",
            ));
        }
        if d.u8()? != FORMAT_VERSION {
            return Err(HsmError::InvalidCiphertext(
                "unsupported wrapped data key format version",
            ));
        }
        let n = usize::from(d.u8()?);
        if n == 0 || n > MAX_NAME_LEN {
            return Err(HsmError::InvalidCiphertext("wrapped data key is malformed"));
        }
        let key = std::str::from_utf8(d.raw(n)?)
            .map_err(|_| HsmError::InvalidCiphertext("wrapped data key is malformed"))?;
        let version = d.u32()?;
        let check = d.raw(CONTEXT_CHECK_LEN)?;
        let sealed = d.rest();
        if sealed.len() != NONCE_LEN + KEY_LEN + TAG_LEN {
            return Err(HsmError::InvalidCiphertext(
                "wrapped data key has the wrong length",
            ));
        }
        Ok(WrappedKey {
            key,
            version,
            header: &blob[..blob.len() - sealed.len()],
            check,
            sealed,
        })
    }
}

/// Unwraps a parsed blob with the keys of the version its header names.
pub fn unwrap(
    keys: &VersionKeys,
    blob: &WrappedKey<'_>,
    context: &Context,
) -> Result<DataKey, HsmError> {
    let canon = canonical_context(context);
    let expected = crypto::mac16(&keys.ctx, &canon);
    if !bool::from(expected.ct_eq(blob.check)) {
        return Err(HsmError::ContextMismatch);
    }
    let mut aad = blob.header.to_vec();
    aad.extend_from_slice(&canon);
    let pt = keys
        .wrap
        .open(&aad, blob.sealed)
        .ok_or(HsmError::InvalidCiphertext(
            "authentication failed: the wrapped data key was modified",
        ))?;
    DataKey::from_slice(pt.expose())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(t: &str) -> Context {
        [
            ("tablespace".to_string(), t.to_string()),
            ("cluster".into(), "c1".into()),
        ]
        .into()
    }

    #[test]
    fn wrap_unwrap_and_refusals() {
        let mek = MasterKeyMaterial::from_slice(&[3u8; 32]).expect("key");
        let keys = VersionKeys::derive(&mek, "pg", 2).expect("derive");
        let dek = DataKey::from_slice(&[8u8; 32]).expect("key");
        let blob = wrap(&keys, "pg", 2, &dek, &ctx("ts1")).expect("wrap");
        assert_eq!(blob.len(), 86 + 2);
        let parsed = WrappedKey::parse(&blob).expect("header");
        assert_eq!((parsed.key, parsed.version), ("pg", 2));
        assert_eq!(
            unwrap(&keys, &parsed, &ctx("ts1")).expect("unwrap").expose(),
            dek.expose()
        );
        assert!(matches!(
            unwrap(&keys, &parsed, &ctx("ts2")),
            Err(HsmError::ContextMismatch)
        ));
        let open = |b: &[u8], keys: &VersionKeys| {
            WrappedKey::parse(b).and_then(|w| unwrap(keys, &w, &ctx("ts1")))
        };
        // Every bit of the nonce and ciphertext is authenticated.
        let body = 6 + 2 + 4 + CONTEXT_CHECK_LEN;
        for i in body * 8..blob.len() * 8 {
            let mut b = blob.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(
                matches!(open(&b, &keys), Err(HsmError::InvalidCiphertext(_))),
                "bit {i}"
            );
        }
        // Header bits either change the key looked up, the context check or
        // the AAD: never a successful unwrap.
        for i in 0..body * 8 {
            let mut b = blob.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(open(&b, &keys).is_err(), "bit {i}");
        }
        let other = VersionKeys::derive(&mek, "pg", 3).expect("derive");
        assert!(open(&blob, &other).is_err());
        assert!(WrappedKey::parse(&blob[..blob.len() - 1]).is_err());
        assert!(WrappedKey::parse(b"").is_err());
    }

    #[test]
    fn context_limits() {
        let mut c = Context::new();
        c.insert(String::new(), "x".into());
        assert!(validate_context(&c).is_err());
        let big: Context = (0..40)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect();
        assert!(validate_context(&big).is_err());
        assert!(validate_context(&ctx("a")).is_ok());
    }
}
