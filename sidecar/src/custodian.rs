//! Custodian keys: each unseal share encrypted to one custodian's OpenPGP
//! public key, as Vault's `-pgp-keys`, so that a new share is never shown in
//! clear to whoever runs the command.
//!
//! The message is a standard OpenPGP message (RFC 9580, section 10.3): a
//! public-key encrypted session key for the custodian's encryption subkey,
//! then a SEIPD v1 packet (AES-256 with the modification detection code,
//! RFC 9580 section 5.13.1), which GnuPG decrypts:
//! `gpg --decrypt share-1.asc | tde unseal`.
//!
//! A key is checked before it is used: exactly one certificate, self
//! signatures that verify, not revoked, not expired, and a subkey (or
//! primary key) whose newest binding allows encryption. The one chosen is
//! the newest such subkey, as GnuPG chooses.

use std::io::Cursor;

use pgp::composed::{
    ArmorOptions, Deserializable, MessageBuilder, SignedPublicKey, SignedPublicSubKey,
};
use pgp::crypto::sym::SymmetricKeyAlgorithm;
use pgp::packet::{Signature, SignatureType};
use pgp::ser::Serialize as _;
use pgp::types::{KeyDetails, Tag};

pub use tde_protocol::message::MAX_CUSTODIAN_KEY;

/// Why a custodian key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CustodianKeyError {
    /// Larger than [`MAX_CUSTODIAN_KEY`].
    #[error(
        "larger than {MAX_CUSTODIAN_KEY} bytes: export it with `gpg --export --export-options export-minimal`"
    )]
    TooLarge,
    /// Not one OpenPGP public key.
    #[error("not an OpenPGP public key ({0})")]
    Parse(String),
    /// No self-signature verifies.
    #[error("no self-signature of key {0} verifies")]
    BadSignature(String),
    /// Revoked by its owner.
    #[error("key {0} is revoked")]
    Revoked(String),
    /// Past its expiry date.
    #[error("key {0} has expired")]
    Expired(String),
    /// No valid key that may encrypt.
    #[error("key {0} has no valid encryption subkey")]
    NoEncryptionKey(String),
    /// Encrypting failed.
    #[error("encrypting to key {0} failed ({1})")]
    Encrypt(String, String),
}

/// A custodian's OpenPGP certificate, checked, with the key that encrypts.
pub struct CustodianKey {
    cert: SignedPublicKey,
    /// Index into `cert.public_subkeys`; `None`: the primary key encrypts.
    subkey: Option<usize>,
    fingerprint: String,
}

impl std::fmt::Debug for CustodianKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CustodianKey")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// The newest of `sigs` by creation time.
fn newest<'a>(sigs: impl Iterator<Item = &'a Signature>) -> Option<&'a Signature> {
    sigs.max_by_key(|s| s.created().map_or(0, |t| t.as_secs()))
}

/// True when the binding `sig` lets a key of `algorithm` encrypt.
fn encrypts(sig: &Signature, algorithm: pgp::crypto::public_key::PublicKeyAlgorithm) -> bool {
    let flags = sig.key_flags();
    (flags.encrypt_comms() || flags.encrypt_storage()) && algorithm.can_encrypt()
}

/// True when a key created at `created` with the binding `sig` has expired.
fn expired(created: u32, sig: &Signature) -> bool {
    sig.key_expiration_time()
        .map(std::time::Duration::from)
        .is_some_and(|d| d.as_secs() != 0 && u64::from(created) + d.as_secs() <= tde_hsm::now())
}

impl CustodianKey {
    /// Parses and checks one public key, ASCII-armored or binary.
    pub fn parse(bytes: &[u8]) -> Result<Self, CustodianKeyError> {
        if bytes.len() > MAX_CUSTODIAN_KEY {
            return Err(CustodianKeyError::TooLarge);
        }
        let (cert, _) = SignedPublicKey::from_reader_single(Cursor::new(bytes))
            .map_err(|e| CustodianKeyError::Parse(e.to_string()))?;
        let primary = &cert.primary_key;
        let fingerprint = format!("{:X}", primary.fingerprint());

        // Revocations by the key itself (a third party's are not checked here).
        if cert
            .details
            .revocation_signatures
            .iter()
            .any(|s| s.verify_key(primary).is_ok())
        {
            return Err(CustodianKeyError::Revoked(fingerprint));
        }
        // Self-signatures: direct-key and user-id certifications that verify.
        let direct = cert
            .details
            .direct_signatures
            .iter()
            .filter(|s| s.verify_key(primary).is_ok());
        let certs = cert.details.users.iter().flat_map(|u| {
            u.signatures
                .iter()
                .filter(move |s| s.verify_certification(primary, Tag::UserId, &u.id).is_ok())
        });
        let Some(own) = newest(direct.chain(certs)) else {
            return Err(CustodianKeyError::BadSignature(fingerprint));
        };
        if expired(primary.created_at().as_secs(), own) {
            return Err(CustodianKeyError::Expired(fingerprint));
        }

        // The newest subkey whose newest valid binding allows encryption.
        let usable = |(i, sk): (usize, &SignedPublicSubKey)| {
            let valid = || {
                sk.signatures
                    .iter()
                    .filter(|s| s.verify_subkey_binding(primary, &sk.key).is_ok())
            };
            if valid().any(|s| s.typ() == Some(SignatureType::SubkeyRevocation)) {
                return None;
            }
            let binding =
                newest(valid().filter(|s| s.typ() == Some(SignatureType::SubkeyBinding)))?;
            let ok = encrypts(binding, sk.key.algorithm())
                && !expired(sk.key.created_at().as_secs(), binding);
            ok.then_some((i, sk.key.created_at().as_secs()))
        };
        let subkey = cert
            .public_subkeys
            .iter()
            .enumerate()
            .filter_map(usable)
            .max_by_key(|&(_, created)| created)
            .map(|(i, _)| i);
        if subkey.is_none() && !encrypts(own, primary.algorithm()) {
            return Err(CustodianKeyError::NoEncryptionKey(fingerprint));
        }
        Ok(CustodianKey {
            cert,
            subkey,
            fingerprint,
        })
    }

    /// The certificate's fingerprint (upper-case hex, as `gpg
    /// --fingerprint` shows it without spaces).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The certificate in binary form (for the wire: smaller than armor).
    pub fn to_bytes(&self) -> Result<Vec<u8>, CustodianKeyError> {
        self.cert
            .to_bytes()
            .map_err(|e| CustodianKeyError::Parse(e.to_string()))
    }

    /// `secret` encrypted to this key: an ASCII-armored OpenPGP message.
    pub fn encrypt(&self, secret: &[u8]) -> Result<String, CustodianKeyError> {
        let fail = |e: pgp::errors::Error| {
            CustodianKeyError::Encrypt(self.fingerprint.clone(), e.to_string())
        };
        let mut rng = rand::rngs::OsRng;
        let mut b = MessageBuilder::from_bytes("", secret.to_vec())
            .seipd_v1(&mut rng, SymmetricKeyAlgorithm::AES256);
        match self.subkey.and_then(|i| self.cert.public_subkeys.get(i)) {
            Some(sk) => b.encrypt_to_key(&mut rng, sk).map_err(fail)?,
            None => b
                .encrypt_to_key(&mut rng, &self.cert.primary_key)
                .map_err(fail)?,
        };
        b.to_armored_string(rng, ArmorOptions::default())
            .map_err(fail)
    }
}

/// Fuzz harness: any bytes as a custodian key (an officer's RESPLIT_INIT);
/// a key that parses also encrypts. Never panics.
pub fn fuzz(data: &[u8]) {
    if let Ok(k) = CustodianKey::parse(data) {
        let _ = k.encrypt(b"tde-share-1-fuzz");
    }
}

#[cfg(test)]
mod tests {
    use pgp::composed::{
        EncryptionCaps, KeyType, Message, SecretKeyParamsBuilder, SignedSecretKey,
        SubkeyParamsBuilder,
    };
    use pgp::crypto::ecc_curve::ECCCurve;

    use super::*;

    /// An Ed25519 certifying key with, if `encrypts`, a Curve25519
    /// encryption subkey (made by rpgp; the end-to-end test uses GnuPG).
    fn secret_key(encrypts: bool) -> SignedSecretKey {
        let mut params = SecretKeyParamsBuilder::default();
        params
            .key_type(KeyType::Ed25519Legacy)
            .can_certify(true)
            .can_sign(true)
            .can_encrypt(EncryptionCaps::None)
            .primary_user_id("Custodian <c@example.org>".into());
        if encrypts {
            let mut sub = SubkeyParamsBuilder::default();
            sub.key_type(KeyType::ECDH(ECCCurve::Curve25519Legacy))
                .can_sign(false)
                .can_encrypt(EncryptionCaps::All)
                .can_authenticate(false);
            params.subkeys(vec![sub.build().expect("subkey")]);
        }
        params
            .build()
            .expect("params")
            .generate(rand::thread_rng())
            .expect("generate")
    }

    #[test]
    fn a_share_encrypted_to_a_key_decrypts_with_its_secret_key_only() {
        let sk = secret_key(true);
        let public = SignedPublicKey::from(sk.clone()).to_bytes().expect("bytes");
        let k = CustodianKey::parse(&public).expect("usable");
        assert_eq!(k.fingerprint(), format!("{:X}", sk.fingerprint()));
        let share = b"tde-share-1-AAAA";
        let msg = k.encrypt(share).expect("encrypt");
        assert!(msg.starts_with("-----BEGIN PGP MESSAGE-----"), "{msg}");
        assert!(!msg.contains("tde-share"), "the share in clear");
        let (m, _) = Message::from_string(&msg).expect("parse");
        let mut clear = m.decrypt(&"".into(), &sk).expect("decrypts");
        assert_eq!(clear.as_data_vec().expect("data"), share);
        let (m, _) = Message::from_string(&msg).expect("parse");
        assert!(
            m.decrypt(&"".into(), &secret_key(true)).is_err(),
            "another key decrypted it"
        );
        // Debug shows the fingerprint, nothing else of the key.
        assert_eq!(
            format!("{k:?}"),
            format!("CustodianKey {{ fingerprint: {:?}, .. }}", k.fingerprint())
        );
    }

    #[test]
    fn a_key_that_cannot_encrypt_is_refused() {
        let public = SignedPublicKey::from(secret_key(false))
            .to_bytes()
            .expect("bytes");
        assert!(matches!(
            CustodianKey::parse(&public),
            Err(CustodianKeyError::NoEncryptionKey(_))
        ));
        // A secret key is not a public key.
        let secret = secret_key(true).to_bytes().expect("bytes");
        assert!(matches!(
            CustodianKey::parse(&secret),
            Err(CustodianKeyError::Parse(_))
        ));
    }

    #[test]
    fn garbage_and_oversized_input_are_refused_with_a_reason() {
        for bad in [
            &b""[..],
            b"hello",
            b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nAAAA\n",
        ] {
            let e = CustodianKey::parse(bad).expect_err("not a key");
            assert!(matches!(e, CustodianKeyError::Parse(_)), "{e}");
        }
        let big = vec![b'a'; MAX_CUSTODIAN_KEY + 1];
        assert!(matches!(
            CustodianKey::parse(&big),
            Err(CustodianKeyError::TooLarge)
        ));
    }
}
