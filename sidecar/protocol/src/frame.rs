//! Frames: a 4-byte length prefix, a 16-byte header, and a body.
//!
//! ```text
//! offset size field
//!  0     4    length      u32 BE, bytes after this field (16 + body length)
//!  4     1    version     PROTOCOL_VERSION
//!  5     1    kind        1 request, 2 response
//!  6     2    op          u16 BE operation code
//!  8     2    status      u16 BE, 0 in requests; 0 = OK or an ErrorCode
//! 10     2    flags       u16 BE, 0 (reserved)
//! 12     8    request_id  u64 BE, chosen by the client, echoed
//! 20     ..   body        fields, see `codec`
//! ```
//!
//! The length is checked against [`MAX_FRAME_LEN`] before anything is
//! allocated for the body.

use std::io::{self, Read, Write};

use subtle::ConstantTimeEq;
use zeroize::Zeroize;

use crate::error::DecodeError;

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u8 = 1;
/// Size of the header after the length prefix.
pub const HEADER_LEN: usize = 16;
/// Largest accepted value of the length prefix (1 MiB).
pub const MAX_FRAME_LEN: u32 = 1 << 20;
/// Size of the length prefix.
pub const PREFIX_LEN: usize = 4;

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// Client to server.
    Request = 1,
    /// Server to client.
    Response = 2,
}

/// The fixed header of a frame, as read from the wire (not yet validated
/// beyond its length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Protocol version byte.
    pub version: u8,
    /// Frame kind byte.
    pub kind: u8,
    /// Operation code.
    pub op: u16,
    /// Status: 0 or an error code.
    pub status: u16,
    /// Reserved, 0.
    pub flags: u16,
    /// Request id, echoed by the server.
    pub request_id: u64,
}

/// A frame's body (or a whole encoded frame): its bytes may be a data key,
/// a password or a share, so they are zeroized on drop, never printed by
/// `Debug`, not `Clone`, and compared in constant time. It grows by hand
/// ([`Body::extend`]): a `Vec` growing in place would free its old
/// allocation, with the bytes in it, unscrubbed.
pub struct Body(Vec<u8>);

impl Body {
    /// An empty body.
    pub fn empty() -> Self {
        Self(Vec::new())
    }

    /// `len` zero bytes, to read into.
    pub fn zeroed(len: usize) -> Self {
        Self(vec![0; len])
    }

    /// The bytes. Callers must not log, print or persist them.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The bytes, to read into.
    pub fn expose_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Appends `more`; a new allocation, if needed, takes the bytes and the
    /// old one is scrubbed before it is freed.
    pub fn extend(&mut self, more: &[u8]) {
        let need = self.0.len() + more.len();
        if need > self.0.capacity() {
            let mut bigger = Vec::with_capacity(need.max(2 * self.0.capacity()));
            bigger.extend_from_slice(&self.0);
            let mut old = std::mem::replace(&mut self.0, bigger);
            old.zeroize();
        }
        self.0.extend_from_slice(more);
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::ops::Deref for Body {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl From<Vec<u8>> for Body {
    fn from(v: Vec<u8>) -> Self {
        Self(v)
    }
}

impl PartialEq for Body {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for Body {}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Body([REDACTED; {}])", self.0.len())
    }
}

/// A whole frame: header and body bytes. Not `Clone`: a body may hold a
/// secret, and each copy would be one more to scrub.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame {
    /// The header.
    pub header: Header,
    /// The body (a field sequence).
    pub body: Body,
}

/// Checks a length prefix; returns the body length it implies.
pub fn check_length(len: u32) -> Result<usize, DecodeError> {
    if !(HEADER_LEN as u32..=MAX_FRAME_LEN).contains(&len) {
        return Err(DecodeError::BadLength(len));
    }
    Ok(len as usize - HEADER_LEN)
}

impl Header {
    /// Parses the 16 header bytes that follow the length prefix.
    pub fn parse(b: &[u8; HEADER_LEN]) -> Header {
        Header {
            version: b[0],
            kind: b[1],
            op: u16::from_be_bytes([b[2], b[3]]),
            status: u16::from_be_bytes([b[4], b[5]]),
            flags: u16::from_be_bytes([b[6], b[7]]),
            request_id: u64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
        }
    }

    fn write_to(&self, out: &mut Vec<u8>) {
        out.push(self.version);
        out.push(self.kind);
        out.extend_from_slice(&self.op.to_be_bytes());
        out.extend_from_slice(&self.status.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.request_id.to_be_bytes());
    }
}

impl Frame {
    /// Encodes the frame with its length prefix (zeroized on drop, like the
    /// body). Fails if the body is too large for one frame.
    pub fn encode(&self) -> Result<Body, DecodeError> {
        let len = HEADER_LEN
            .checked_add(self.body.len())
            .and_then(|l| u32::try_from(l).ok())
            .ok_or(DecodeError::BadLength(u32::MAX))?;
        check_length(len)?;
        // Sized exactly: it never grows, so nothing is left unscrubbed.
        let mut out = Vec::with_capacity(PREFIX_LEN + len as usize);
        out.extend_from_slice(&len.to_be_bytes());
        self.header.write_to(&mut out);
        out.extend_from_slice(self.body.expose());
        Ok(Body(out))
    }

    /// Parses one frame from the front of `buf`.
    ///
    /// `Ok(None)` means more bytes are needed (an incomplete frame is a
    /// normal state); `Ok(Some((frame, used)))` gives the frame and how many
    /// bytes of `buf` it took.
    pub fn parse(mut buf: &[u8]) -> Result<Option<(Frame, usize)>, DecodeError> {
        let mut reader = FrameReader::new();
        let mut used = 0;
        loop {
            let want = reader.buf();
            let n = want.len().min(buf.len());
            if n == 0 {
                return Ok(None);
            }
            want[..n].copy_from_slice(&buf[..n]);
            buf = &buf[n..];
            used += n;
            if let Some(frame) = reader.filled(n)? {
                return Ok(Some((frame, used)));
            }
        }
    }
}

/// Where a [`FrameReader`] is in its frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Prefix,
    Header,
    Body,
}

/// The one implementation of reading a frame, for blocking and async
/// sources alike: it names the bytes it needs next ([`FrameReader::buf`]),
/// is told how many arrived ([`FrameReader::filled`]), checks the length
/// prefix before the body is allocated, and gives the frame once complete.
/// The body is read in place into a [`Body`], so a secret in it is never
/// copied through a growing buffer.
#[derive(Debug)]
pub struct FrameReader {
    part: Part,
    got: usize,
    prefix: [u8; PREFIX_LEN],
    head: [u8; HEADER_LEN],
    body: Body,
}

impl Default for FrameReader {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameReader {
    /// A reader waiting for the first byte of a frame.
    pub fn new() -> Self {
        Self {
            part: Part::Prefix,
            got: 0,
            prefix: [0; PREFIX_LEN],
            head: [0; HEADER_LEN],
            body: Body::empty(),
        }
    }

    /// True once a byte of the next frame has arrived.
    pub fn started(&self) -> bool {
        self.part != Part::Prefix || self.got > 0
    }

    /// Where the next bytes go (never empty).
    pub fn buf(&mut self) -> &mut [u8] {
        let got = self.got;
        match self.part {
            Part::Prefix => &mut self.prefix[got..],
            Part::Header => &mut self.head[got..],
            Part::Body => &mut self.body.expose_mut()[got..],
        }
    }

    /// Records that `n` bytes were read into [`FrameReader::buf`]; gives the
    /// frame when it is complete, and an error for a length prefix out of
    /// bounds (the stream cannot be resynchronized after it).
    pub fn filled(&mut self, n: usize) -> Result<Option<Frame>, DecodeError> {
        self.got += n;
        loop {
            match self.part {
                Part::Prefix if self.got >= PREFIX_LEN => {
                    let body_len = check_length(u32::from_be_bytes(self.prefix))?;
                    self.body = Body::zeroed(body_len);
                    (self.part, self.got) = (Part::Header, 0);
                }
                Part::Header if self.got >= HEADER_LEN => {
                    (self.part, self.got) = (Part::Body, 0);
                }
                Part::Body if self.got >= self.body.len() => {
                    let body = std::mem::replace(&mut self.body, Body::empty());
                    (self.part, self.got) = (Part::Prefix, 0);
                    return Ok(Some(Frame {
                        header: Header::parse(&self.head),
                        body,
                    }));
                }
                _ => return Ok(None),
            }
        }
    }
}

/// Reads one frame from a blocking reader. `Ok(None)` on a clean end of
/// stream before the first byte of a frame.
pub fn read_frame<R: Read>(r: &mut R) -> io::Result<Option<Frame>> {
    let mut reader = FrameReader::new();
    loop {
        match r.read(reader.buf()) {
            Ok(0) if !reader.started() => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                let frame = reader
                    .filled(n)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                if frame.is_some() {
                    return Ok(frame);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Writes one frame to a blocking writer.
pub fn write_frame<W: Write>(w: &mut W, frame: &Frame) -> io::Result<()> {
    let bytes = frame
        .encode()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    w.write_all(&bytes)?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Frame {
        Frame {
            header: Header {
                version: 1,
                kind: 1,
                op: 0x0101,
                status: 0,
                flags: 0,
                request_id: 0x0102030405060708,
            },
            body: b"hello".to_vec().into(),
        }
    }

    #[test]
    fn a_body_is_redacted_and_compared_whole() {
        let f = Frame {
            body: vec![0xAB; 32].into(),
            ..sample()
        };
        let shown = format!("{f:?}");
        assert!(!shown.to_lowercase().contains("ab, "), "{shown}");
        assert!(!shown.contains("171"), "{shown}");
        assert!(shown.contains("REDACTED; 32"), "{shown}");
        assert_ne!(f.body, Body::from(vec![0xAB; 31]));
        assert_ne!(f.body, Body::from(vec![0xAA; 32]));
        assert_eq!(f.body, Body::from(vec![0xAB; 32]));
    }

    #[test]
    fn encodes_the_documented_layout() {
        let bytes = sample().encode().expect("encode");
        assert_eq!(
            bytes[..],
            [
                0, 0, 0, 21, 1, 1, 0x01, 0x01, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, b'h', b'e',
                b'l', b'l', b'o'
            ]
        );
    }

    #[test]
    fn incomplete_is_none_and_complete_parses() {
        let bytes = sample().encode().expect("encode");
        for cut in 0..bytes.len() {
            assert_eq!(Frame::parse(&bytes[..cut]), Ok(None), "cut at {cut}");
        }
        let (f, used) = Frame::parse(&bytes).expect("ok").expect("some");
        assert_eq!(used, bytes.len());
        assert_eq!(f, sample());
    }

    #[test]
    fn a_reader_fed_byte_by_byte_gives_each_frame_once() {
        let mut bytes = sample().encode().expect("encode").to_vec();
        let empty = Frame {
            body: Body::empty(),
            ..sample()
        };
        bytes.extend_from_slice(&empty.encode().expect("encode"));
        let mut r = FrameReader::new();
        assert!(!r.started());
        let mut frames = Vec::new();
        for b in bytes {
            r.buf()[0] = b;
            match r.filled(1).expect("valid") {
                Some(f) => frames.push(f),
                None => assert!(r.started()),
            }
        }
        assert_eq!(frames, vec![sample(), empty]);
        assert!(!r.started(), "ready for the next frame");
    }

    #[test]
    fn oversized_and_undersized_lengths_are_refused_before_allocating() {
        let huge = (MAX_FRAME_LEN + 1).to_be_bytes();
        assert_eq!(
            Frame::parse(&huge),
            Err(DecodeError::BadLength(MAX_FRAME_LEN + 1))
        );
        assert_eq!(Frame::parse(&[0, 0, 0, 3]), Err(DecodeError::BadLength(3)));
        let mut r: &[u8] = &[0xff, 0xff, 0xff, 0xff];
        let e = read_frame(&mut r).expect_err("must refuse");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
