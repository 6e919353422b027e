//! Key types. Each holds 32 bytes of AES-256 key material on the heap,
//! zeroizes it on drop, has no `Clone`, and prints no bytes in `Debug`.
//! The bytes are reachable only through `expose()`.

use zeroize::Zeroize;

use crate::error::HsmError;
use crate::random;

/// Length of every symmetric key this HSM handles (AES-256).
pub const KEY_LEN: usize = 32;

macro_rules! secret_key {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        pub struct $name(Box<[u8; KEY_LEN]>);

        impl $name {
            /// A fresh key from the OS CSPRNG.
            pub fn generate() -> Result<Self, HsmError> {
                let mut k = Box::new([0u8; KEY_LEN]);
                random::fill(&mut k[..])?;
                Ok(Self(k))
            }

            /// Copies key bytes from a slice of exactly [`KEY_LEN`] bytes.
            pub fn from_slice(bytes: &[u8]) -> Result<Self, HsmError> {
                if bytes.len() != KEY_LEN {
                    return Err(HsmError::InvalidArgument("key length must be 32 bytes".into()));
                }
                let mut k = Box::new([0u8; KEY_LEN]);
                k.copy_from_slice(bytes);
                Ok(Self(k))
            }

            /// The key bytes. Never log, print or persist them unsealed.
            pub fn expose(&self) -> &[u8; KEY_LEN] {
                &self.0
            }
        }

        impl Drop for $name {
            fn drop(&mut self) {
                self.0.zeroize();
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($name)).finish_non_exhaustive()
            }
        }
    };
}

secret_key! {
    /// One version of a master encryption key (MEK). Never leaves the HSM.
    MasterKeyMaterial
}
secret_key! {
    /// A data-encryption key (DEK) in plaintext, handed to an authorized
    /// client and otherwise only held briefly inside the HSM.
    DataKey
}
secret_key! {
    /// The root key that seals every store object. In memory only while
    /// unsealed.
    RootKey
}
secret_key! {
    /// The key the unseal shares reconstruct; it decrypts the sealed root.
    UnsealKey
}
secret_key! {
    /// The 32-byte private seed of an Ed25519 audit signing key version
    /// (RFC 8032 section 5.1.5). Never leaves the HSM.
    AuditSigningSeed
}
secret_key! {
    /// A key derived with HKDF for one purpose (sealing, wrapping, context
    /// checks).
    DerivedKey
}

/// A variable-length secret (a password, a serialized record that holds key
/// material): zeroized on drop, redacted in `Debug`.
pub struct SecretBuf(Vec<u8>);

impl SecretBuf {
    /// Takes ownership of `bytes`.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// The bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for SecretBuf {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for SecretBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBuf([REDACTED; {}])", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_redacted(shown: &str, bytes: &[u8]) {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!shown.contains(&hex[..8]), "{shown}");
        let dec = format!("{}, {}, {}", bytes[0], bytes[1], bytes[2]);
        assert!(!shown.contains(&dec), "{shown}");
    }

    #[test]
    fn debug_of_every_key_type_shows_no_key_bytes() {
        let bytes = [0x5Au8, 0xC3, 0x7E, 0x11, 0x22, 0x33, 0x44, 0x55].repeat(4);
        let keys: Vec<String> = vec![
            format!("{:?}", MasterKeyMaterial::from_slice(&bytes).expect("key")),
            format!("{:?}", DataKey::from_slice(&bytes).expect("key")),
            format!("{:?}", RootKey::from_slice(&bytes).expect("key")),
            format!("{:?}", UnsealKey::from_slice(&bytes).expect("key")),
            format!("{:?}", DerivedKey::from_slice(&bytes).expect("key")),
            format!("{:?}", AuditSigningSeed::from_slice(&bytes).expect("key")),
            format!("{:#?}", DataKey::from_slice(&bytes).expect("key")),
            format!("{:?}", SecretBuf::new(bytes.clone())),
        ];
        for shown in keys {
            assert_redacted(&shown, &bytes);
        }
    }

    #[test]
    fn zeroize_clears_the_bytes() {
        // Drop runs `zeroize` on the boxed array; observe the same code path
        // on a value we can still read afterwards.
        let mut k = Box::new([0xAAu8; KEY_LEN]);
        k.zeroize();
        assert_eq!(*k, [0u8; KEY_LEN]);
        let mut buf = vec![0xAAu8; 40];
        buf.zeroize();
        assert!(buf.is_empty());
    }

    #[test]
    fn generated_keys_differ() {
        let a = DataKey::generate().expect("rng");
        let b = DataKey::generate().expect("rng");
        assert_ne!(a.expose(), b.expose());
        assert!(DataKey::from_slice(&[0u8; 31]).is_err());
    }
}
