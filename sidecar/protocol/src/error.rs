//! Wire error codes and the error type of the decoders.

use thiserror::Error;

macro_rules! error_codes {
    ($($(#[$doc:meta])* $name:ident = $value:literal, $text:literal;)*) => {
        /// A typed error code carried in the `status` field of a response.
        ///
        /// The numbers are part of the protocol (`docs/PROTOCOL.md`) and
        /// never change meaning. `0` is success and is not an `ErrorCode`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u16)]
        pub enum ErrorCode {
            $($(#[$doc])* $name = $value,)*
        }

        impl ErrorCode {
            /// Every code, in numeric order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name,)*];

            /// The code for a wire value, or `None` for 0 and unknown values.
            pub fn from_u16(v: u16) -> Option<Self> {
                match v {
                    $($value => Some(ErrorCode::$name),)*
                    _ => None,
                }
            }

            /// The stable symbolic name, e.g. `CONTEXT_MISMATCH`.
            pub fn name(self) -> &'static str {
                match self {
                    $(ErrorCode::$name => $text,)*
                }
            }
        }
    };
}

error_codes! {
    /// The frame or its body could not be decoded.
    Malformed = 1, "MALFORMED";
    /// The frame's protocol version is not supported.
    UnsupportedVersion = 2, "UNSUPPORTED_VERSION";
    /// The operation code is unknown.
    UnknownOperation = 3, "UNKNOWN_OPERATION";
    /// The frame's length exceeds the cap.
    FrameTooLarge = 4, "FRAME_TOO_LARGE";
    /// The operation is not offered on this socket.
    WrongSocket = 5, "WRONG_SOCKET";
    /// A per-peer limit was reached (connections, concurrent watches):
    /// retry later, with fewer at once.
    LimitExceeded = 6, "LIMIT_EXCEEDED";
    /// The HSM is sealed: unseal it first.
    Sealed = 10, "SEALED";
    /// The admin operation needs a logged-in operator.
    NotAuthenticated = 11, "NOT_AUTHENTICATED";
    /// The caller's policy or role does not allow the operation.
    PermissionDenied = 12, "PERMISSION_DENIED";
    /// Operator name or password wrong.
    LoginFailed = 13, "LOGIN_FAILED";
    /// The operator is locked after repeated failed logins.
    OperatorLocked = 14, "OPERATOR_LOCKED";
    /// No such operator.
    OperatorNotFound = 15, "OPERATOR_NOT_FOUND";
    /// An operator of that name exists.
    OperatorExists = 16, "OPERATOR_EXISTS";
    /// The unseal share is malformed or belongs to another store.
    InvalidShare = 17, "INVALID_SHARE";
    /// The shares given combine to a wrong key.
    UnsealFailed = 18, "UNSEAL_FAILED";
    /// No such master key or version.
    KeyNotFound = 20, "KEY_NOT_FOUND";
    /// A master key of that name exists.
    KeyExists = 21, "KEY_EXISTS";
    /// The master key version is disabled.
    KeyDisabled = 22, "KEY_DISABLED";
    /// The master key version is destroyed; its material is gone.
    KeyDestroyed = 23, "KEY_DESTROYED";
    /// The master key version is scheduled for destruction.
    KeyPendingDestruction = 24, "KEY_PENDING_DESTRUCTION";
    /// The key state does not allow this transition.
    InvalidKeyState = 25, "INVALID_KEY_STATE";
    /// Registered data keys are still wrapped under the version (use force
    /// only when those tablespaces are gone).
    KeyInUse = 32, "KEY_IN_USE";
    /// The wrapped key is malformed or failed authentication.
    InvalidCiphertext = 26, "INVALID_CIPHERTEXT";
    /// The encryption context differs from the one the key was wrapped with.
    ContextMismatch = 27, "CONTEXT_MISMATCH";
    /// A key-store object failed authentication: possible tampering.
    Tampered = 28, "TAMPERED";
    /// The HSM has been zeroized; its root material is destroyed.
    Zeroized = 29, "ZEROIZED";
    /// The sidecar was sealed with `mounts.on_seal = "wipe"`: a mount that
    /// gets this answer wipes its data keys and fails all I/O.
    KeysRevoked = 33, "KEYS_REVOKED";
    /// An argument is out of range or malformed.
    InvalidArgument = 30, "INVALID_ARGUMENT";
    /// A PKCS#11 request the token refuses: the message begins with the
    /// PKCS#11 return value's name (`CKR_SIGNATURE_INVALID: ...`), which
    /// the module returns to the application.
    Pkcs11 = 34, "PKCS11";
    /// The key store is not initialized (`tde init`).
    NotInitialized = 31, "NOT_INITIALIZED";
    /// The audit record could not be written, so the operation was refused.
    AuditFailed = 40, "AUDIT_FAILED";
    /// The key store could not be read or written.
    StoreFailed = 41, "STORE_FAILED";
    /// The daemon is shutting down or overloaded; retry.
    Unavailable = 50, "UNAVAILABLE";
    /// An unexpected internal error.
    Internal = 51, "INTERNAL";
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why bytes from the wire could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// Fewer bytes than a field or header needs.
    #[error("truncated: {0}")]
    Truncated(&'static str),
    /// The length prefix exceeds [`crate::MAX_FRAME_LEN`] or is too small.
    #[error("frame length {0} outside 16..={max}", max = crate::MAX_FRAME_LEN)]
    BadLength(u32),
    /// Unsupported protocol version.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// Unknown frame kind.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// Unknown operation code.
    #[error("unknown operation 0x{0:04x}")]
    UnknownOperation(u16),
    /// Unknown status code in a response.
    #[error("unknown status code {0}")]
    UnknownStatus(u16),
    /// A field tag the message does not define.
    #[error("unexpected field tag {tag} in {message}")]
    UnexpectedField {
        /// Message being decoded.
        message: &'static str,
        /// The tag.
        tag: u8,
    },
    /// A field that may appear once appeared twice.
    #[error("duplicate field {0}")]
    DuplicateField(&'static str),
    /// A required field is missing.
    #[error("missing field {0}")]
    MissingField(&'static str),
    /// A field's value has the wrong size or is not valid UTF-8.
    #[error("invalid value for field {0}")]
    InvalidValue(&'static str),
    /// A field longer than its cap.
    #[error("field {field} is longer than {max} bytes")]
    TooLong {
        /// The field.
        field: &'static str,
        /// Its cap.
        max: usize,
    },
    /// Bytes left over after the last field.
    #[error("trailing bytes")]
    Trailing,
}

impl DecodeError {
    /// The wire code a server answers with for this decoding failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::BadLength(_) => ErrorCode::FrameTooLarge,
            DecodeError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            DecodeError::UnknownOperation(_) => ErrorCode::UnknownOperation,
            _ => ErrorCode::Malformed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for &c in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_u16(c as u16), Some(c));
            assert!(seen.insert(c as u16));
            assert!(seen.len() <= ErrorCode::ALL.len());
        }
        assert_eq!(ErrorCode::from_u16(0), None);
        assert_eq!(ErrorCode::from_u16(9999), None);
    }
}
