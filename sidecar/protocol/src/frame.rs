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

/// A whole frame: header and body bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The header.
    pub header: Header,
    /// The body (a field sequence).
    pub body: Vec<u8>,
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
    /// Encodes the frame with its length prefix. Fails if the body is too
    /// large for one frame.
    pub fn encode(&self) -> Result<Vec<u8>, DecodeError> {
        let len = HEADER_LEN
            .checked_add(self.body.len())
            .and_then(|l| u32::try_from(l).ok())
            .ok_or(DecodeError::BadLength(u32::MAX))?;
        check_length(len)?;
        let mut out = Vec::with_capacity(PREFIX_LEN + len as usize);
        out.extend_from_slice(&len.to_be_bytes());
        self.header.write_to(&mut out);
        out.extend_from_slice(&self.body);
        Ok(out)
    }

    /// Parses one frame from the front of `buf`.
    ///
    /// `Ok(None)` means more bytes are needed (an incomplete frame is a
    /// normal state); `Ok(Some((frame, used)))` gives the frame and how many
    /// bytes of `buf` it took.
    pub fn parse(buf: &[u8]) -> Result<Option<(Frame, usize)>, DecodeError> {
        let Some(prefix) = buf.first_chunk::<PREFIX_LEN>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*prefix);
        let body_len = check_length(len)?;
        let total = PREFIX_LEN + len as usize;
        let Some(frame) = buf.get(PREFIX_LEN..total) else {
            return Ok(None);
        };
        let (head, body) = frame.split_at(HEADER_LEN);
        let head: &[u8; HEADER_LEN] = head
            .try_into()
            .map_err(|_| DecodeError::Truncated("header"))?;
        debug_assert_eq!(body.len(), body_len);
        Ok(Some((
            Frame {
                header: Header::parse(head),
                body: body.to_vec(),
            },
            total,
        )))
    }
}

/// Reads one frame from a blocking reader. `Ok(None)` on a clean end of
/// stream before the first byte of a frame.
pub fn read_frame<R: Read>(r: &mut R) -> io::Result<Option<Frame>> {
    let mut prefix = [0u8; PREFIX_LEN];
    let mut got = 0;
    while got < PREFIX_LEN {
        match r.read(&mut prefix[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let body_len = check_length(u32::from_be_bytes(prefix))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut head = [0u8; HEADER_LEN];
    r.read_exact(&mut head)?;
    let mut body = vec![0u8; body_len];
    r.read_exact(&mut body)?;
    Ok(Some(Frame {
        header: Header::parse(&head),
        body,
    }))
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
            body: b"hello".to_vec(),
        }
    }

    #[test]
    fn encodes_the_documented_layout() {
        let bytes = sample().encode().expect("encode");
        assert_eq!(
            bytes,
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
