//! The audit signing key: Ed25519 (RFC 8032) key versions that sign the
//! audit log's checkpoints, so that an export can be checked offline with
//! nothing but the public keys.
//!
//! It is one sealed object (kind [`KIND_AUDIT_KEY`](crate::store::KIND_AUDIT_KEY),
//! id [`ID`]) listed in the store manifest like every other. Only the newest
//! version keeps its private seed; a rotation makes a new version and
//! destroys the previous seed, keeping its public key so that checkpoints it
//! signed still verify.
//!
//! Every signature covers [`SIGNATURE_DOMAIN`] followed by the message, so
//! a signature made for the audit log can never be taken for one made for
//! anything else (the same separation Ed25519ctx gives, RFC 8032 section
//! 5.1, with pure Ed25519 so that stock tools verify it).

use aws_lc_rs::signature::{self, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

use crate::codec::{Dec, Enc};
use crate::error::HsmError;
use crate::secret::{AuditSigningSeed, KEY_LEN, SecretBuf};

/// The object id.
pub const ID: &str = "audit";
/// Bytes every audit signature covers before the message.
pub const SIGNATURE_DOMAIN: &[u8] = b"tde audit checkpoint v1\n";
/// Ed25519 public key length (RFC 8032 section 5.1.5).
pub const PUBLIC_KEY_LEN: usize = 32;
/// Ed25519 signature length (RFC 8032 section 5.1.6).
pub const SIGNATURE_LEN: usize = 64;

const RECORD_FORMAT: u8 = 1;

/// An audit signing key version as anyone may see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditPublicKey {
    /// Number, from 1.
    pub version: u32,
    /// Unix seconds.
    pub created: u64,
    /// The Ed25519 public key.
    pub public: [u8; PUBLIC_KEY_LEN],
    /// The version that signs now (the newest).
    pub active: bool,
}

/// A signature by the audit signing key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSignature {
    /// The key version that made it.
    pub version: u32,
    /// The Ed25519 signature of [`SIGNATURE_DOMAIN`] and the message.
    pub signature: [u8; SIGNATURE_LEN],
}

pub(crate) struct AuditKeyVersion {
    pub(crate) version: u32,
    pub(crate) created: u64,
    pub(crate) public: [u8; PUBLIC_KEY_LEN],
    /// `None` once a newer version replaced it.
    pub(crate) seed: Option<AuditSigningSeed>,
}

impl AuditKeyVersion {
    /// A fresh key pair.
    pub(crate) fn generate(version: u32, created: u64) -> Result<Self, HsmError> {
        let seed = AuditSigningSeed::generate()?;
        let public = public_of(&seed)?;
        Ok(Self {
            version,
            created,
            public,
            seed: Some(seed),
        })
    }
}

fn pair(seed: &AuditSigningSeed) -> Result<Ed25519KeyPair, HsmError> {
    Ed25519KeyPair::from_seed_unchecked(seed.expose())
        .map_err(|_| HsmError::Internal("the audit signing key was rejected"))
}

fn public_of(seed: &AuditSigningSeed) -> Result<[u8; PUBLIC_KEY_LEN], HsmError> {
    pair(seed)?
        .public_key()
        .as_ref()
        .try_into()
        .map_err(|_| HsmError::Internal("the audit public key has the wrong length"))
}

/// Every version of the audit signing key, ascending.
pub(crate) struct AuditKeyRecord {
    pub(crate) versions: Vec<AuditKeyVersion>,
}

impl AuditKeyRecord {
    /// The public side of every version.
    pub(crate) fn public_keys(&self) -> Vec<AuditPublicKey> {
        let newest = self.versions.last().map(|v| v.version);
        self.versions
            .iter()
            .map(|v| AuditPublicKey {
                version: v.version,
                created: v.created,
                public: v.public,
                active: Some(v.version) == newest,
            })
            .collect()
    }

    /// Signs the message `message(version)` makes for the newest version
    /// (after [`SIGNATURE_DOMAIN`]), so the message can name the version
    /// that signs it.
    pub(crate) fn sign(
        &self,
        message: &dyn Fn(u32) -> Vec<u8>,
    ) -> Result<AuditSignature, HsmError> {
        let v = self
            .versions
            .last()
            .ok_or(HsmError::Internal("the audit signing key has no version"))?;
        let seed = v.seed.as_ref().ok_or(HsmError::Internal(
            "the newest audit key version has no seed",
        ))?;
        let mut signed = SIGNATURE_DOMAIN.to_vec();
        signed.extend_from_slice(&message(v.version));
        let sig = pair(seed)?.sign(&signed);
        Ok(AuditSignature {
            version: v.version,
            signature: sig
                .as_ref()
                .try_into()
                .map_err(|_| HsmError::Internal("an Ed25519 signature of the wrong length"))?,
        })
    }

    /// A new newest version; the previous one's seed is dropped (zeroized).
    pub(crate) fn rotate(&mut self, created: u64) -> Result<AuditPublicKey, HsmError> {
        let next = self.versions.last().map_or(1, |v| v.version + 1);
        let fresh = AuditKeyVersion::generate(next, created)?;
        for v in &mut self.versions {
            v.seed = None;
        }
        self.versions.push(fresh);
        self.public_keys()
            .pop()
            .ok_or(HsmError::Internal("the audit signing key has no version"))
    }

    /// Serializes the record, seeds included, into a zeroizing buffer.
    pub(crate) fn encode(&self) -> SecretBuf {
        let mut e = Enc::with_capacity(8 + self.versions.len() * (16 + 2 * KEY_LEN));
        e.u8(RECORD_FORMAT)
            .u32(u32::try_from(self.versions.len()).unwrap_or(u32::MAX));
        for v in &self.versions {
            e.u32(v.version).u64(v.created).raw(&v.public);
            match &v.seed {
                Some(s) => e.u8(1).raw(s.expose()),
                None => e.u8(0),
            };
        }
        SecretBuf::new(e.0)
    }

    /// Parses a record made by [`AuditKeyRecord::encode`]. A seed that does
    /// not give its version's public key is refused.
    pub(crate) fn decode(b: &[u8]) -> Result<Self, HsmError> {
        let mut d = Dec::new(b, "audit key record");
        if d.u8()? != RECORD_FORMAT {
            return Err(HsmError::InvalidCiphertext("audit key record format"));
        }
        let n = d.u32()?;
        let mut versions = Vec::new();
        for _ in 0..n {
            let version = d.u32()?;
            let created = d.u64()?;
            let public: [u8; PUBLIC_KEY_LEN] = d
                .raw(PUBLIC_KEY_LEN)?
                .try_into()
                .map_err(|_| HsmError::InvalidCiphertext("audit key record"))?;
            let seed = match d.u8()? {
                0 => None,
                _ => {
                    let s = AuditSigningSeed::from_slice(d.raw(KEY_LEN)?)?;
                    if public_of(&s)? != public {
                        return Err(HsmError::InvalidCiphertext("audit key record"));
                    }
                    Some(s)
                }
            };
            versions.push(AuditKeyVersion {
                version,
                created,
                public,
                seed,
            });
        }
        d.finish()?;
        if versions.last().is_none_or(|v| v.seed.is_none()) {
            return Err(HsmError::InvalidCiphertext("audit key record"));
        }
        Ok(Self { versions })
    }
}

/// Checks an audit signature: `signature` by `public` over
/// [`SIGNATURE_DOMAIN`] followed by `message`. Needs no HSM: this is what
/// an offline verifier runs.
pub fn verify(public: &[u8], message: &[u8], signature: &[u8]) -> bool {
    let mut signed = Vec::with_capacity(SIGNATURE_DOMAIN.len() + message.len());
    signed.extend_from_slice(SIGNATURE_DOMAIN);
    signed.extend_from_slice(message);
    UnparsedPublicKey::new(&signature::ED25519, public)
        .verify(&signed, signature)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 8032 section 7.1, test 2: the seed gives the published public
    /// key, and our signature is plain Ed25519 over the domain and message.
    #[test]
    fn rfc8032_vector_and_domain_separation() {
        let hex = |s: &str| -> Vec<u8> {
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
                .collect()
        };
        let seed = hex("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb");
        let public = hex("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c");
        let seed = AuditSigningSeed::from_slice(&seed).expect("seed");
        assert_eq!(public_of(&seed).expect("public").to_vec(), public);
        let rec = AuditKeyRecord {
            versions: vec![AuditKeyVersion {
                version: 1,
                created: 7,
                public: public.clone().try_into().expect("32"),
                seed: Some(seed),
            }],
        };
        let sig = rec.sign(&|_| b"checkpoint".to_vec()).expect("sign");
        assert_eq!(sig.version, 1);
        assert!(verify(&public, b"checkpoint", &sig.signature));
        assert!(!verify(&public, b"checkpoinT", &sig.signature));
        // Not a signature of the bare message: the domain is always there.
        let bare = pair(rec.versions[0].seed.as_ref().expect("seed"))
            .expect("pair")
            .sign(b"checkpoint");
        assert!(!verify(&public, b"checkpoint", bare.as_ref()));
        let mut bad = sig.signature;
        bad[10] ^= 1;
        assert!(!verify(&public, b"checkpoint", &bad));
        assert!(!verify(&public[..31], b"checkpoint", &sig.signature));
    }

    #[test]
    fn rotation_keeps_public_keys_and_drops_old_seeds() {
        let mut rec = AuditKeyRecord {
            versions: vec![AuditKeyVersion::generate(1, 1).expect("gen")],
        };
        let first = rec.sign(&|_| b"m".to_vec()).expect("sign");
        let v2 = rec.rotate(2).expect("rotate");
        assert_eq!(v2.version, 2);
        assert!(rec.versions[0].seed.is_none());
        let second = rec.sign(&|_| b"m".to_vec()).expect("sign");
        assert_eq!(second.version, 2);
        let keys = rec.public_keys();
        assert!(verify(&keys[0].public, b"m", &first.signature));
        assert!(!verify(&keys[1].public, b"m", &first.signature));
        assert!(verify(&keys[1].public, b"m", &second.signature));
        assert_eq!(
            keys.iter().map(|k| k.active).collect::<Vec<_>>(),
            [false, true]
        );
        let back = AuditKeyRecord::decode(rec.encode().expose()).expect("decode");
        assert_eq!(back.public_keys(), keys);
        // A seed that does not match its public key is refused.
        let mut bytes = rec.encode().expose().to_vec();
        let at = bytes.len() - KEY_LEN;
        bytes[at] ^= 1;
        assert!(AuditKeyRecord::decode(&bytes).is_err());
        assert!(AuditKeyRecord::decode(&bytes[..bytes.len() - 1]).is_err());
    }
}
