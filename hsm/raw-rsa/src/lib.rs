//! PKCS#1 v1.5 signatures (RFC 8017 section 8.2, EMSA-PKCS1-v1_5 type 1
//! padding) over bytes the caller gives, as PKCS#11's `CKM_RSA_PKCS`
//! defines them: the input is normally a DER `DigestInfo`, but any value
//! up to the modulus length minus 11 bytes is signed as given.
//!
//! aws-lc-rs signs only messages it hashes itself; this is the FFI glue to
//! the same aws-lc for the one operation it lacks (`EVP_PKEY_sign` with
//! PKCS#1 padding and no digest, which is aws-lc's `RSA_sign_raw`). The
//! private key is parsed from PKCS#8 on each call and freed (aws-lc
//! clears a freed key's numbers) before returning. Verification is the
//! same the other way (`RSA_verify_raw`, then a constant-time compare).

#![allow(unsafe_code)]

use aws_lc_sys::{
    CBS, CBS_init, CBS_len, EVP_PKEY, EVP_PKEY_CTX, EVP_PKEY_CTX_free, EVP_PKEY_CTX_new,
    EVP_PKEY_CTX_set_rsa_padding, EVP_PKEY_RSA, EVP_PKEY_free, EVP_PKEY_id, EVP_PKEY_sign,
    EVP_PKEY_sign_init, EVP_PKEY_size, EVP_PKEY_verify, EVP_PKEY_verify_init,
    EVP_parse_private_key, EVP_parse_public_key, RSA_PKCS1_PADDING,
};

/// An `EVP_PKEY` owned here, freed on drop.
struct Key(*mut EVP_PKEY);

impl Drop for Key {
    fn drop(&mut self) {
        // SAFETY: the pointer came from a successful parse and is freed
        // once, here.
        unsafe { EVP_PKEY_free(self.0) }
    }
}

/// An `EVP_PKEY_CTX` owned here, freed on drop.
struct Ctx(*mut EVP_PKEY_CTX);

impl Drop for Ctx {
    fn drop(&mut self) {
        // SAFETY: created by EVP_PKEY_CTX_new (non-null), freed once.
        unsafe { EVP_PKEY_CTX_free(self.0) }
    }
}

/// Parses a whole DER structure with `parse`; an RSA key or nothing.
fn parse(der: &[u8], parse: unsafe extern "C" fn(*mut CBS) -> *mut EVP_PKEY) -> Option<Key> {
    let mut cbs = std::mem::MaybeUninit::<CBS>::uninit();
    // SAFETY: CBS_init fills the CBS to read `der`, which outlives it; the
    // parser reads within those bytes only and returns a new key or null.
    let (key, rest) = unsafe {
        CBS_init(cbs.as_mut_ptr(), der.as_ptr(), der.len());
        let key = parse(cbs.as_mut_ptr());
        (key, CBS_len(cbs.as_ptr()))
    };
    if key.is_null() {
        return None;
    }
    let key = Key(key);
    // SAFETY: a valid key from the parser.
    let rsa = unsafe { EVP_PKEY_id(key.0) } == EVP_PKEY_RSA;
    (rsa && rest == 0).then_some(key)
}

/// A context for `key` with PKCS#1 v1.5 padding, set up by `init`.
fn context(key: &Key, init: unsafe extern "C" fn(*mut EVP_PKEY_CTX) -> i32) -> Option<Ctx> {
    // SAFETY: a valid key; the context takes its own reference to it.
    let ctx = unsafe { EVP_PKEY_CTX_new(key.0, std::ptr::null_mut()) };
    if ctx.is_null() {
        return None;
    }
    let ctx = Ctx(ctx);
    // SAFETY: a valid context, set up for one operation on an RSA key.
    let ok =
        unsafe { init(ctx.0) == 1 && EVP_PKEY_CTX_set_rsa_padding(ctx.0, RSA_PKCS1_PADDING) == 1 };
    ok.then_some(ctx)
}

/// Signs `data` with the RSA private key in `pkcs8` (DER): the signature,
/// as long as the modulus, or `None` if the key does not parse or `data`
/// is longer than the modulus less 11 bytes.
pub fn sign(pkcs8: &[u8], data: &[u8]) -> Option<Vec<u8>> {
    let key = parse(pkcs8, EVP_parse_private_key)?;
    let ctx = context(&key, EVP_PKEY_sign_init)?;
    // SAFETY: a valid key.
    let size = usize::try_from(unsafe { EVP_PKEY_size(key.0) }).ok()?;
    if data.len() + 11 > size {
        return None;
    }
    let mut sig = vec![0u8; size];
    let mut len = sig.len();
    // SAFETY: `sig` has room for `len` bytes and `data` is read for its
    // length; with no digest set, aws-lc pads `data` (type 1) and applies
    // the private key (RSA_sign_raw, blinded).
    let ok = unsafe { EVP_PKEY_sign(ctx.0, sig.as_mut_ptr(), &mut len, data.as_ptr(), data.len()) };
    (ok == 1 && len == size).then_some(sig)
}

/// Whether `sig` is a PKCS#1 v1.5 signature of `data` by the RSA public
/// key in `spki` (a DER `SubjectPublicKeyInfo`).
pub fn verify(spki: &[u8], data: &[u8], sig: &[u8]) -> bool {
    let Some(key) = parse(spki, EVP_parse_public_key) else {
        return false;
    };
    let Some(ctx) = context(&key, EVP_PKEY_verify_init) else {
        return false;
    };
    // SAFETY: both buffers are read for their lengths; aws-lc recovers the
    // padded value and compares it with `data` in constant time.
    unsafe { EVP_PKEY_verify(ctx.0, sig.as_ptr(), sig.len(), data.as_ptr(), data.len()) == 1 }
}
