//! Wire protocol of the `tde` sidecar.
//!
//! Length-prefixed, versioned binary frames on a Unix socket. Every request
//! carries a request id that the response echoes, and every failure is a
//! typed [`ErrorCode`]. The byte-level specification is `docs/PROTOCOL.md`;
//! this crate is its reference implementation, shared by the daemon and the
//! CLI. Its only socket I/O is blocking: the helpers in [`frame`] and the
//! [`client`]. It never panics on input.
//!
//! # Layout
//! - [`client`]: the typed blocking client the CLI, the mount and the
//!   re-key use.
//! - [`frame`]: the 20-byte frame header, the size cap, frame parsing and
//!   blocking read/write helpers.
//! - [`codec`]: the body encoding (tag, length, value fields) with a checked
//!   cursor.
//! - [`message`]: typed requests and responses and their body encodings.
//! - [`error`]: wire error codes and the decoding error type.
//! - [`fuzz`]: the harness the cargo-fuzz target calls.
//! - [`private`]: the mode rule for tde's private files.
//! - [`secret`]: [`SecretBytes`], a zeroizing, redacting byte buffer for keys,
//!   passwords and shares in transit.
#![forbid(unsafe_code)]

pub mod client;
pub mod codec;
pub mod duration;
pub mod error;
pub mod frame;
pub mod fuzz;
pub mod message;
pub mod private;
pub mod secret;

pub use duration::{duration_text, parse_duration};
pub use error::{DecodeError, ErrorCode};
pub use frame::{Frame, FrameKind, Header, MAX_FRAME_LEN, PROTOCOL_VERSION};
pub use message::{
    ApprovalInfo, AuditKeyInfo, AuditPage, AuditQuery, AuditRange, AuditSinkInfo, Context, DekRef,
    KeyInfo, KeyReference, KeyVersionInfo, Op, OperatorInfo, P11Attrs, P11Call, P11Key,
    P11ObjectInfo, Request, ResplitInfo, Response, StatusInfo, context_display,
};
pub use secret::SecretBytes;
