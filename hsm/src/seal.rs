//! Sealing: unseal shares, the sealed root key, and sealed store objects.
//!
//! ```text
//! shares --Shamir over GF(2^8) (vsss-rs)--> unseal key
//! unseal key --HKDF--> K_root;  sealed root = AES-256-GCM-SIV(K_root, root key)
//! root key   --HKDF--> K_obj;   each object  = AES-256-GCM-SIV(K_obj, record,
//!                                  AAD = "tde object v1" | store id | kind | id | revision)
//! ```
//!
//! A wrong set of shares combines to a wrong unseal key, which fails to
//! authenticate the sealed root. Destroying the sealed root (zeroization)
//! makes every share useless for ever.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};
use vsss_rs::Gf256;
use zeroize::Zeroize;

use crate::codec::{Dec, Enc};
use crate::crypto::{self, Aead};
use crate::error::HsmError;
use crate::secret::{KEY_LEN, RootKey, SecretBuf, UnsealKey};

/// Length of the random store id.
pub const STORE_ID_LEN: usize = 16;
/// Prefix of a share's text form.
pub const SHARE_PREFIX: &str = "tde-share-1-";
/// Most shares an init may issue.
pub const MAX_SHARES: u8 = 32;

/// A store's random identity, bound into every share and sealed object.
pub type StoreId = [u8; STORE_ID_LEN];

/// One parsed unseal share.
pub struct Share {
    /// Store the share belongs to.
    pub store_id: StoreId,
    /// Threshold of its set.
    pub threshold: u8,
    /// Size of its set.
    pub count: u8,
    /// x coordinate (participant id); 0 for the single dev share.
    pub x: u8,
    y: Box<[u8; KEY_LEN]>,
}

impl Drop for Share {
    fn drop(&mut self) {
        self.y.zeroize();
    }
}

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Share")
            .field("threshold", &self.threshold)
            .field("count", &self.count)
            .field("x", &self.x)
            .finish_non_exhaustive()
    }
}

fn checksum(bytes: &[u8]) -> [u8; 4] {
    let d = Sha256::new_with_prefix(b"tde-share")
        .chain_update(bytes)
        .finalize();
    [d[0], d[1], d[2], d[3]]
}

impl Share {
    /// The share's text form: `tde-share-1-` and base64url of
    /// `store id (16) | threshold | count | x | y (32) | checksum (4)`.
    /// The checksum (SHA-256 prefix) catches typos; it is not a MAC.
    pub fn to_text(&self) -> SecretBuf {
        let mut e = Enc::with_capacity(STORE_ID_LEN + 3 + KEY_LEN + 4);
        e.raw(&self.store_id)
            .u8(self.threshold)
            .u8(self.count)
            .u8(self.x)
            .raw(&self.y[..]);
        let sum = checksum(&e.0);
        e.raw(&sum);
        let mut text = String::with_capacity(SHARE_PREFIX.len() + 80);
        text.push_str(SHARE_PREFIX);
        URL_SAFE_NO_PAD.encode_string(&e.0, &mut text);
        e.0.zeroize();
        SecretBuf::new(text.into_bytes())
    }

    /// Parses a share's text form (surrounding whitespace ignored).
    pub fn parse(text: &[u8]) -> Result<Share, HsmError> {
        let bad = |why: &str| HsmError::InvalidShare(why.to_string());
        let text = std::str::from_utf8(text)
            .map_err(|_| bad("not text"))?
            .trim();
        let b64 = text
            .strip_prefix(SHARE_PREFIX)
            .ok_or_else(|| bad("a share starts with tde-share-1-"))?;
        if b64.len() > 128 {
            return Err(bad("too long"));
        }
        let raw = SecretBuf::new(
            URL_SAFE_NO_PAD
                .decode(b64)
                .map_err(|_| bad("not valid base64url"))?,
        );
        let raw = raw.expose();
        if raw.len() != STORE_ID_LEN + 3 + KEY_LEN + 4 {
            return Err(bad("wrong length"));
        }
        let (body, sum) = raw.split_at(raw.len() - 4);
        if checksum(body) != sum {
            return Err(bad("checksum mismatch (mistyped or truncated)"));
        }
        let mut d = Dec::new(body, "share");
        let mut store_id = [0u8; STORE_ID_LEN];
        store_id.copy_from_slice(d.raw(STORE_ID_LEN)?);
        let (threshold, count, x) = (d.u8()?, d.u8()?, d.u8()?);
        let mut y = Box::new([0u8; KEY_LEN]);
        y.copy_from_slice(d.raw(KEY_LEN)?);
        Ok(Share {
            store_id,
            threshold,
            count,
            x,
            y,
        })
    }
}

/// Splits `key` into `count` shares of which `threshold` reconstruct it.
/// `threshold == 1` is the dev mode: one share that is the key itself.
pub fn split(
    key: &UnsealKey,
    store_id: &StoreId,
    threshold: u8,
    count: u8,
) -> Result<Vec<Share>, HsmError> {
    if threshold == 0 || threshold > count || count > MAX_SHARES {
        return Err(HsmError::InvalidArgument(format!(
            "shares must satisfy 1 <= threshold <= shares <= {MAX_SHARES}"
        )));
    }
    let make = |x: u8, y: &[u8]| -> Result<Share, HsmError> {
        let mut b = Box::new([0u8; KEY_LEN]);
        b.copy_from_slice(y.get(..KEY_LEN).ok_or(HsmError::Internal("share size"))?);
        Ok(Share {
            store_id: *store_id,
            threshold,
            count,
            x,
            y: b,
        })
    };
    if threshold == 1 {
        if count != 1 {
            return Err(HsmError::InvalidArgument(
                "a threshold of 1 allows exactly one share (dev mode)".into(),
            ));
        }
        return vec![make(0, key.expose())].into_iter().collect();
    }
    let rng = rand_core::UnwrapErr(getrandom::SysRng);
    let mut raw = Gf256::split_bytes(
        usize::from(threshold),
        usize::from(count),
        key.expose(),
        rng,
    )
    .map_err(|_| HsmError::Internal("secret sharing failed"))?;
    let out = raw
        .iter()
        .map(|s| make(s[0], &s[1..]))
        .collect::<Result<Vec<_>, _>>();
    raw.iter_mut().for_each(|s| s.zeroize());
    out
}

/// Combines shares (all of one set, distinct x) into the unseal key.
pub fn combine(shares: &[Share]) -> Result<UnsealKey, HsmError> {
    let first = shares
        .first()
        .ok_or_else(|| HsmError::InvalidShare("no shares".into()))?;
    if shares.len() < usize::from(first.threshold) {
        return Err(HsmError::InvalidShare("not enough shares".into()));
    }
    if first.threshold == 1 {
        return UnsealKey::from_slice(&first.y[..]);
    }
    let mut raw: Vec<Vec<u8>> = shares
        .iter()
        .take(usize::from(first.threshold))
        .map(|s| {
            let mut v = Vec::with_capacity(1 + KEY_LEN);
            v.push(s.x);
            v.extend_from_slice(&s.y[..]);
            v
        })
        .collect();
    let key = Gf256::combine_bytes(&raw).map_err(|_| HsmError::UnsealFailed);
    raw.iter_mut().for_each(|s| s.zeroize());
    let mut key = key?;
    let out = UnsealKey::from_slice(&key);
    key.zeroize();
    out
}

/// The sealed root's format, told apart by its AAD (which only the holder
/// of the unseal key can change).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootFormat {
    /// Before store manifests: the store may have none.
    V1,
    /// The store has a manifest (see [`crate::manifest`]); without one,
    /// its objects cannot be trusted.
    V2,
}

impl RootFormat {
    fn aad(self, store_id: &StoreId) -> Vec<u8> {
        let mut aad = match self {
            RootFormat::V1 => b"tde root v1".to_vec(),
            RootFormat::V2 => b"tde root v2 manifest".to_vec(),
        };
        aad.extend_from_slice(store_id);
        aad
    }
}

/// Seals the root key under the unseal key, in the current format (V2).
pub fn seal_root(
    unseal: &UnsealKey,
    root: &RootKey,
    store_id: &StoreId,
) -> Result<Vec<u8>, HsmError> {
    seal_root_as(RootFormat::V2, unseal, root, store_id)
}

fn seal_root_as(
    format: RootFormat,
    unseal: &UnsealKey,
    root: &RootKey,
    store_id: &StoreId,
) -> Result<Vec<u8>, HsmError> {
    let k = crypto::derive(unseal.expose(), b"tde/v1/root", &[store_id])?;
    Aead::new(&k).seal(&format.aad(store_id), root.expose())
}

/// A V1 sealed root, as stores made before manifests have (for tests of
/// the upgrade).
#[cfg(test)]
pub fn seal_root_v1(
    unseal: &UnsealKey,
    root: &RootKey,
    store_id: &StoreId,
) -> Result<Vec<u8>, HsmError> {
    seal_root_as(RootFormat::V1, unseal, root, store_id)
}

/// Opens the sealed root; `UnsealFailed` when the unseal key is wrong.
pub fn open_root(
    unseal: &UnsealKey,
    sealed: &[u8],
    store_id: &StoreId,
) -> Result<(RootKey, RootFormat), HsmError> {
    let k = crypto::derive(unseal.expose(), b"tde/v1/root", &[store_id])?;
    let aead = Aead::new(&k);
    for format in [RootFormat::V2, RootFormat::V1] {
        if let Some(pt) = aead.open(&format.aad(store_id), sealed) {
            return Ok((RootKey::from_slice(pt.expose())?, format));
        }
    }
    Err(HsmError::UnsealFailed)
}

/// Seals and opens store objects under the root key.
pub struct Sealer {
    aead: Aead,
    store_id: StoreId,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").finish_non_exhaustive()
    }
}

impl Sealer {
    /// `K_obj = HKDF(salt = "tde/v1/objects", IKM = root key, info = store id)`.
    pub fn new(root: &RootKey, store_id: &StoreId) -> Result<Self, HsmError> {
        let k = crypto::derive(root.expose(), b"tde/v1/objects", &[store_id])?;
        Ok(Self {
            aead: Aead::new(&k),
            store_id: *store_id,
        })
    }

    fn aad(&self, kind: u8, id: &str, revision: u64) -> Vec<u8> {
        let mut e = Enc::default();
        e.raw(b"tde object v1")
            .raw(&self.store_id)
            .u8(kind)
            .var(id.as_bytes())
            .u64(revision);
        e.0
    }

    /// Seals one object's record.
    pub fn seal(
        &self,
        kind: u8,
        id: &str,
        revision: u64,
        record: &[u8],
    ) -> Result<Vec<u8>, HsmError> {
        self.aead.seal(&self.aad(kind, id, revision), record)
    }

    /// Opens one object's record; `None` when it fails authentication.
    pub fn open(&self, kind: u8, id: &str, revision: u64, blob: &[u8]) -> Option<SecretBuf> {
        self.aead.open(&self.aad(kind, id, revision), blob)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_three_of_five_reconstruct_and_two_do_not() {
        let key = UnsealKey::generate().expect("rng");
        let id = [4u8; STORE_ID_LEN];
        let shares = split(&key, &id, 3, 5).expect("split");
        let texts: Vec<SecretBuf> = shares.iter().map(Share::to_text).collect();
        let parse = |i: usize| Share::parse(texts[i].expose()).expect("parse");
        for (a, b, c) in [(0, 1, 2), (0, 2, 4), (1, 3, 4), (2, 3, 4)] {
            let k = combine(&[parse(a), parse(b), parse(c)]).expect("combine");
            assert_eq!(k.expose(), key.expose());
        }
        assert!(combine(&[parse(0), parse(1)]).is_err());
        let root = RootKey::generate().expect("rng");
        let sealed = seal_root(&key, &root, &id).expect("seal");
        let (opened, format) = open_root(&key, &sealed, &id).expect("open");
        assert_eq!(opened.expose(), root.expose());
        assert_eq!(format, RootFormat::V2);
        let old = seal_root_v1(&key, &root, &id).expect("seal v1");
        assert_eq!(open_root(&key, &old, &id).expect("open").1, RootFormat::V1);
        let wrong = UnsealKey::generate().expect("rng");
        assert!(matches!(
            open_root(&wrong, &sealed, &id),
            Err(HsmError::UnsealFailed)
        ));
    }

    #[test]
    fn mistyped_shares_are_refused() {
        let key = UnsealKey::generate().expect("rng");
        let shares = split(&key, &[1u8; 16], 2, 3).expect("split");
        let text = shares[0].to_text();
        let mut t = text.expose().to_vec();
        let last = t.len() - 3;
        t[last] = if t[last] == b'A' { b'B' } else { b'A' };
        assert!(Share::parse(&t).is_err());
        assert!(Share::parse(b"hello").is_err());
        assert!(Share::parse(&text.expose()[..40]).is_err());
        assert!(format!("{:?}", shares[0]).contains("threshold"));
    }

    #[test]
    fn dev_share_is_single() {
        let key = UnsealKey::generate().expect("rng");
        let shares = split(&key, &[1u8; 16], 1, 1).expect("split");
        assert_eq!(combine(&shares).expect("combine").expose(), key.expose());
        assert!(split(&key, &[1u8; 16], 1, 3).is_err());
        assert!(split(&key, &[1u8; 16], 4, 3).is_err());
    }

    #[test]
    fn sealed_objects_bind_kind_id_and_revision() {
        let root = RootKey::generate().expect("rng");
        let s = Sealer::new(&root, &[2u8; 16]).expect("sealer");
        let blob = s.seal(1, "pg", 3, b"record").expect("seal");
        assert_eq!(s.open(1, "pg", 3, &blob).expect("open").expose(), b"record");
        assert!(s.open(2, "pg", 3, &blob).is_none());
        assert!(s.open(1, "pg2", 3, &blob).is_none());
        assert!(s.open(1, "pg", 2, &blob).is_none());
        let other = Sealer::new(&root, &[3u8; 16]).expect("sealer");
        assert!(other.open(1, "pg", 3, &blob).is_none());
    }
}
