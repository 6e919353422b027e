//! The body encoding: a sequence of fields, each `tag u8 | len u32 BE | value`.
//!
//! Values are UTF-8 strings, raw bytes, `u32`/`u64` big-endian integers,
//! booleans (one byte, 0 or 1), or nested records (a field sequence). Every
//! length is checked against the bytes that are actually there before it is
//! used; nothing is allocated from a length on the wire.

use crate::error::DecodeError;
use crate::frame::Body;

/// Size of a field header.
pub const FIELD_HEADER_LEN: usize = 5;

/// Builds a field sequence. Fields may be secrets: the buffer is a
/// [`Body`], scrubbed on drop and as it grows.
pub struct Writer {
    buf: Body,
}

impl Default for Writer {
    fn default() -> Self {
        Self { buf: Body::empty() }
    }
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Writer([REDACTED; {}])", self.buf.len())
    }
}

impl Writer {
    /// An empty sequence.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a raw field. Values over `u32::MAX` bytes cannot occur: a
    /// frame is capped far below that, and `Frame::encode` refuses it.
    pub fn bytes(&mut self, tag: u8, value: &[u8]) -> &mut Self {
        let len = u32::try_from(value.len()).unwrap_or(u32::MAX);
        let mut head = [0u8; FIELD_HEADER_LEN];
        head[0] = tag;
        head[1..].copy_from_slice(&len.to_be_bytes());
        self.buf.extend(&head);
        self.buf.extend(value);
        self
    }

    /// Appends a string field.
    pub fn str(&mut self, tag: u8, value: &str) -> &mut Self {
        self.bytes(tag, value.as_bytes())
    }

    /// Appends a `u32` field.
    pub fn u32(&mut self, tag: u8, value: u32) -> &mut Self {
        self.bytes(tag, &value.to_be_bytes())
    }

    /// Appends a `u64` field.
    pub fn u64(&mut self, tag: u8, value: u64) -> &mut Self {
        self.bytes(tag, &value.to_be_bytes())
    }

    /// Appends a boolean field.
    pub fn bool(&mut self, tag: u8, value: bool) -> &mut Self {
        self.bytes(tag, &[u8::from(value)])
    }

    /// Appends a nested record.
    pub fn record(&mut self, tag: u8, inner: &Writer) -> &mut Self {
        self.bytes(tag, &inner.buf)
    }

    /// The encoded bytes.
    pub fn finish(self) -> Body {
        self.buf
    }
}

/// Reads a field sequence with a checked cursor.
#[derive(Debug)]
pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `body`.
    pub fn new(body: &'a [u8]) -> Self {
        Self { rest: body }
    }

    /// The next `(tag, value)`, or `None` at the end.
    pub fn next_field(&mut self) -> Result<Option<(u8, &'a [u8])>, DecodeError> {
        if self.rest.is_empty() {
            return Ok(None);
        }
        let (head, rest) = self
            .rest
            .split_first_chunk::<FIELD_HEADER_LEN>()
            .ok_or(DecodeError::Truncated("field header"))?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if len > rest.len() {
            return Err(DecodeError::Truncated("field value"));
        }
        let (value, rest) = rest.split_at(len);
        self.rest = rest;
        Ok(Some((head[0], value)))
    }
}

/// Decodes a string value.
pub fn as_str(v: &[u8], field: &'static str) -> Result<String, DecodeError> {
    std::str::from_utf8(v)
        .map(str::to_owned)
        .map_err(|_| DecodeError::InvalidValue(field))
}

/// Decodes a `u32` value.
pub fn as_u32(v: &[u8], field: &'static str) -> Result<u32, DecodeError> {
    v.try_into()
        .map(u32::from_be_bytes)
        .map_err(|_| DecodeError::InvalidValue(field))
}

/// Decodes a `u64` value.
pub fn as_u64(v: &[u8], field: &'static str) -> Result<u64, DecodeError> {
    v.try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| DecodeError::InvalidValue(field))
}

/// Decodes a boolean value.
pub fn as_bool(v: &[u8], field: &'static str) -> Result<bool, DecodeError> {
    match v {
        [0] => Ok(false),
        [1] => Ok(true),
        _ => Err(DecodeError::InvalidValue(field)),
    }
}

/// Stores a field that may appear at most once.
pub fn once<T>(slot: &mut Option<T>, value: T, field: &'static str) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::DuplicateField(field));
    }
    *slot = Some(value);
    Ok(())
}

/// Unwraps a required field.
pub fn required<T>(slot: Option<T>, field: &'static str) -> Result<T, DecodeError> {
    slot.ok_or(DecodeError::MissingField(field))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_fields_are_errors_not_panics() {
        let mut w = Writer::new();
        w.str(1, "abc").u32(2, 7);
        let bytes = w.finish();
        for cut in 1..bytes.len() {
            let mut r = Reader::new(&bytes[..cut]);
            let mut result = Ok(Some((0, &[][..])));
            while let Ok(Some(_)) = result {
                result = r.next_field();
            }
            if cut != 8 {
                assert!(result.is_err(), "cut {cut} must be an error");
            }
        }
        let mut r = Reader::new(&bytes);
        assert_eq!(r.next_field(), Ok(Some((1, &b"abc"[..]))));
        assert_eq!(r.next_field(), Ok(Some((2, &[0, 0, 0, 7][..]))));
        assert_eq!(r.next_field(), Ok(None));
    }

    #[test]
    fn a_huge_field_length_is_refused() {
        let mut r = Reader::new(&[1, 0xff, 0xff, 0xff, 0xff, 0]);
        assert_eq!(r.next_field(), Err(DecodeError::Truncated("field value")));
    }
}
