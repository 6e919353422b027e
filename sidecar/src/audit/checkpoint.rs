//! Signed checkpoints of the audit chain.
//!
//! A checkpoint states that records `first_seq..=last_seq` of one store
//! exist, chained from `anchor` (the chain hash before `first_seq`) to
//! `head` (the chain hash of `last_seq`), signed by a version of the HSM's
//! audit signing key (Ed25519, RFC 8032). Since every chain hash covers all
//! records before it, a checkpoint fixes the whole history up to its head:
//! changing, removing or inserting any earlier record, or re-chaining the
//! rest, changes the head and so breaks the signature.
//!
//! The signed bytes are the checkpoint's JSON without its `signature`
//! field, in the field order of [`Checkpoint`] (serde_json writes struct
//! fields in order and escapes strings one way), after the HSM's domain
//! prefix. A checkpoint line with any other field is refused.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

/// The chain hash before the first record.
pub const GENESIS: [u8; 32] = [0; 32];

/// One checkpoint, as stored, exported and given to sinks (one JSON line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// Always `checkpoint` (tells a sink's checkpoint lines from records).
    #[serde(rename = "type")]
    pub kind: String,
    /// The store id (hex): an export of another store never matches.
    pub store: String,
    /// The node that wrote it.
    pub node: String,
    /// First record covered.
    pub first_seq: u64,
    /// Last record covered.
    pub last_seq: u64,
    /// `last_seq - first_seq + 1`.
    pub count: u64,
    /// Chain hash before `first_seq` (hex).
    pub anchor: String,
    /// Chain hash of `last_seq` (hex).
    pub head: String,
    /// When it was made (RFC 3339 UTC, milliseconds).
    pub time: String,
    /// Why: `interval`, `shutdown`, `unseal`, `export`, `prune` or `request`.
    pub reason: String,
    /// Audit signing key version.
    pub key_version: u32,
    /// Ed25519 signature (base64) of the line without this field.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub signature: String,
}

/// Why a checkpoint is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    /// Not a checkpoint line.
    #[error("not a checkpoint: {0}")]
    Malformed(String),
    /// No public key for its version.
    #[error("no public key for audit signing key version {0}")]
    UnknownKey(u32),
    /// The signature does not verify.
    #[error("its signature does not verify")]
    BadSignature,
}

impl Checkpoint {
    /// The bytes the signature covers (after the HSM's domain prefix).
    pub fn signed_bytes(&self) -> Vec<u8> {
        let unsigned = Checkpoint {
            signature: String::new(),
            ..self.clone()
        };
        serde_json::to_vec(&unsigned).unwrap_or_default()
    }

    /// The JSON line (without newline), signature included.
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses one line.
    pub fn parse(line: &str) -> Result<Checkpoint, CheckpointError> {
        let c: Checkpoint =
            serde_json::from_str(line).map_err(|e| CheckpointError::Malformed(e.to_string()))?;
        if c.kind != "checkpoint" {
            return Err(CheckpointError::Malformed("type is not checkpoint".into()));
        }
        if c.last_seq < c.first_seq || c.count != c.last_seq - c.first_seq + 1 {
            return Err(CheckpointError::Malformed(
                "its count does not match its range".into(),
            ));
        }
        Ok(c)
    }

    /// Checks the signature against `keys` (version, Ed25519 public key).
    pub fn verify(&self, keys: &[(u32, [u8; 32])]) -> Result<(), CheckpointError> {
        let key = keys
            .iter()
            .find(|(v, _)| *v == self.key_version)
            .ok_or(CheckpointError::UnknownKey(self.key_version))?;
        let sig = B64
            .decode(&self.signature)
            .map_err(|_| CheckpointError::BadSignature)?;
        if tde_hsm::audit_key::verify(&key.1, &self.signed_bytes(), &sig) {
            Ok(())
        } else {
            Err(CheckpointError::BadSignature)
        }
    }

    /// Sets the signature.
    pub fn set_signature(&mut self, version: u32, signature: &[u8]) {
        self.key_version = version;
        self.signature = B64.encode(signature);
    }
}

/// PEM of an Ed25519 public key (SubjectPublicKeyInfo, RFC 8410 section 4).
pub fn public_key_pem(public: &[u8; 32]) -> String {
    let mut der = SPKI_PREFIX.to_vec();
    der.extend_from_slice(public);
    format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        B64.encode(der)
    )
}

/// The DER of an Ed25519 SubjectPublicKeyInfo before the key: SEQUENCE,
/// AlgorithmIdentifier id-Ed25519 (1.3.101.112), BIT STRING of 33 bytes
/// (RFC 8410 section 4 and its example in section 10.1).
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Every Ed25519 public key in a PEM text (`PUBLIC KEY` blocks).
pub fn parse_public_keys_pem(text: &str) -> Result<Vec<[u8; 32]>, String> {
    let mut keys = Vec::new();
    let mut body: Option<String> = None;
    for line in text.lines().map(str::trim) {
        match (line, &mut body) {
            ("-----BEGIN PUBLIC KEY-----", None) => body = Some(String::new()),
            ("-----END PUBLIC KEY-----", Some(b)) => {
                let der = B64
                    .decode(b.as_bytes())
                    .map_err(|e| format!("a PUBLIC KEY block is not base64: {e}"))?;
                let key = der
                    .strip_prefix(&SPKI_PREFIX[..])
                    .and_then(|k| <[u8; 32]>::try_from(k).ok())
                    .ok_or("a PUBLIC KEY block is not an Ed25519 key")?;
                keys.push(key);
                body = None;
            }
            (l, Some(b)) => b.push_str(l),
            _ => {}
        }
    }
    if keys.is_empty() {
        return Err("no Ed25519 PUBLIC KEY block found".into());
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trips_and_matches_rfc8410() {
        // RFC 8410 section 10.1: the example public key.
        let pem = "-----BEGIN PUBLIC KEY-----\n\
                   MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n\
                   -----END PUBLIC KEY-----\n";
        let keys = parse_public_keys_pem(pem).expect("parse");
        assert_eq!(keys.len(), 1);
        assert_eq!(public_key_pem(&keys[0]), pem);
        assert!(parse_public_keys_pem("nothing").is_err());
        let rsa =
            "-----BEGIN PUBLIC KEY-----\nMA0GCSqGSIb3DQEBAQUAAwIAAA==\n-----END PUBLIC KEY-----\n";
        assert!(parse_public_keys_pem(rsa).is_err());
    }

    #[test]
    fn a_line_with_an_extra_field_or_a_bad_count_is_refused() {
        let c = Checkpoint {
            kind: "checkpoint".into(),
            store: "ab".into(),
            node: "n".into(),
            first_seq: 1,
            last_seq: 3,
            count: 3,
            anchor: "00".into(),
            head: "11".into(),
            time: "t".into(),
            reason: "interval".into(),
            key_version: 1,
            signature: "c2ln".into(),
        };
        assert_eq!(Checkpoint::parse(&c.to_line()).expect("parse"), c);
        let extra = c.to_line().replace("\"node\"", "\"x\":1,\"node\"");
        assert!(Checkpoint::parse(&extra).is_err());
        let wrong = c.to_line().replace("\"count\":3", "\"count\":4");
        assert!(Checkpoint::parse(&wrong).is_err());
        assert!(!String::from_utf8_lossy(&c.signed_bytes()).contains("signature"));
    }
}
