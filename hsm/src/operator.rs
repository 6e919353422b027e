//! Operators (people who administer the HSM), their roles and passwords.
//!
//! Roles follow CloudHSM's: a crypto officer manages keys and operators; a
//! crypto user performs data-key operations; an auditor reads key metadata
//! and the audit log. Passwords are hashed with Argon2id (RFC 9106) with the
//! argon2 crate's defaults (19 MiB, 2 passes, 1 lane: the OWASP baseline).

use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};

use crate::codec::{Dec, Enc};
use crate::error::HsmError;
use crate::secret::SecretBuf;

/// Consecutive failed logins that lock an operator.
pub const MAX_FAILED_LOGINS: u32 = 5;
/// Shortest accepted password.
pub const MIN_PASSWORD_LEN: usize = 8;
/// Longest accepted password.
pub const MAX_PASSWORD_LEN: usize = 1024;

/// An operator role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Manages keys, operators, seal state.
    CryptoOfficer,
    /// Data-key operations.
    CryptoUser,
    /// Reads metadata and audit records.
    Auditor,
}

impl Role {
    /// Wire and config name.
    pub fn name(self) -> &'static str {
        match self {
            Role::CryptoOfficer => "crypto_officer",
            Role::CryptoUser => "crypto_user",
            Role::Auditor => "auditor",
        }
    }

    /// Parses a role name (`crypto_officer`, `crypto_user`, `auditor`; `co`,
    /// `cu` accepted).
    pub fn parse(s: &str) -> Result<Role, HsmError> {
        match s {
            "crypto_officer" | "co" => Ok(Role::CryptoOfficer),
            "crypto_user" | "cu" => Ok(Role::CryptoUser),
            "auditor" => Ok(Role::Auditor),
            _ => Err(HsmError::InvalidArgument(format!(
                "unknown role {s:?}: use crypto_officer, crypto_user or auditor"
            ))),
        }
    }

    fn code(self) -> u8 {
        match self {
            Role::CryptoOfficer => 1,
            Role::CryptoUser => 2,
            Role::Auditor => 3,
        }
    }
}

/// A stored operator. `Debug` leaves out the password hash.
#[derive(Clone)]
pub struct OperatorRecord {
    /// Name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Argon2id PHC string.
    pub(crate) password_hash: String,
    /// Consecutive failed logins.
    pub failed_logins: u32,
    /// Locked until another officer unlocks.
    pub locked: bool,
}

impl std::fmt::Debug for OperatorRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorRecord")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("failed_logins", &self.failed_logins)
            .field("locked", &self.locked)
            .finish_non_exhaustive()
    }
}

impl OperatorRecord {
    /// Serializes the record.
    pub fn encode(&self) -> SecretBuf {
        let mut e = Enc::with_capacity(32 + self.name.len() + self.password_hash.len());
        e.u8(1)
            .var(self.name.as_bytes())
            .u8(self.role.code())
            .var(self.password_hash.as_bytes())
            .u32(self.failed_logins)
            .u8(u8::from(self.locked));
        SecretBuf::new(e.0)
    }

    /// Parses a record.
    pub fn decode(b: &[u8]) -> Result<Self, HsmError> {
        let mut d = Dec::new(b, "operator record");
        if d.u8()? != 1 {
            return Err(HsmError::InvalidCiphertext("operator record format"));
        }
        let name = d.string()?;
        let role = match d.u8()? {
            1 => Role::CryptoOfficer,
            2 => Role::CryptoUser,
            3 => Role::Auditor,
            _ => return Err(HsmError::InvalidCiphertext("operator role")),
        };
        let password_hash = d.string()?;
        let failed_logins = d.u32()?;
        let locked = d.u8()? != 0;
        d.finish()?;
        Ok(Self {
            name,
            role,
            password_hash,
            failed_logins,
            locked,
        })
    }
}

/// Checks password length limits.
pub fn validate_password(pw: &[u8]) -> Result<(), HsmError> {
    if pw.len() < MIN_PASSWORD_LEN || pw.len() > MAX_PASSWORD_LEN {
        return Err(HsmError::InvalidArgument(format!(
            "passwords must be {MIN_PASSWORD_LEN} to {MAX_PASSWORD_LEN} bytes"
        )));
    }
    Ok(())
}

/// Hashes a password with Argon2id and a random salt.
pub fn hash_password(pw: &[u8]) -> Result<String, HsmError> {
    validate_password(pw)?;
    Argon2::default()
        .hash_password(pw)
        .map(|h| h.to_string())
        .map_err(|_| HsmError::Internal("password hashing failed"))
}

/// Verifies a password against a PHC string (constant time in the crate).
pub fn verify_password(pw: &[u8], hash: &str) -> bool {
    pw.len() <= MAX_PASSWORD_LEN && Argon2::default().verify_password(pw, hash).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_and_verify() {
        let h = hash_password(b"correct horse").expect("hash");
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password(b"correct horse", &h));
        assert!(!verify_password(b"correct horsf", &h));
        assert!(hash_password(b"short").is_err());
        let r = OperatorRecord {
            name: "admin".into(),
            role: Role::CryptoOfficer,
            password_hash: h,
            failed_logins: 2,
            locked: false,
        };
        assert!(
            !format!("{r:?}").contains("argon2"),
            "Debug leaves out the hash"
        );
        let d = OperatorRecord::decode(r.encode().expose()).expect("decode");
        assert_eq!(d.failed_logins, 2);
        assert_eq!(d.role, Role::CryptoOfficer);
    }
}
