//! The fuzzing harness. `fuzz/fuzz_targets/frame_decoder.rs` is a shim that
//! calls [`decode_frames`]; keeping the harness here means it is compiled and
//! unit-tested with the crate.

use crate::frame::Frame;
use crate::message::{Op, Request, Response};

/// Feeds arbitrary bytes through every decoder: frame parsing, then request
/// and response decoding. Whatever decodes must re-encode to something that
/// decodes to the same value. Panics only when that invariant breaks.
pub fn decode_frames(mut data: &[u8]) {
    while let Ok(Some((frame, used))) = Frame::parse(data) {
        data = &data[used..];
        if let Ok(req) = Request::from_frame(&frame) {
            let again = Request::from_frame(&req.to_frame(frame.header.request_id));
            assert_eq!(again.as_ref(), Ok(&req), "request round trip");
        }
        if let Ok(resp) = Response::from_frame(&frame) {
            let again = Response::from_frame(&resp.to_frame(frame.header.op, 1));
            assert_eq!(again.as_ref(), Ok(&resp), "response round trip");
        }
        for &op in Op::ALL {
            let _ = Request::decode_body(op, &frame.body);
            let _ = Response::decode_body(op, &frame.body);
        }
    }
}

/// One request body: the first byte picks the operation (an index into
/// [`Op::ALL`]), the rest is the body. Whatever decodes must re-encode to a
/// body that decodes to the same request.
pub fn request_body(data: &[u8]) {
    let Some((&i, body)) = data.split_first() else {
        return;
    };
    let op = Op::ALL[usize::from(i) % Op::ALL.len()];
    if let Ok(req) = Request::decode_body(op, body) {
        assert_eq!(req.op(), op, "decoded as another operation");
        let again = Request::decode_body(op, &req.encode_body());
        assert_eq!(again.as_ref(), Ok(&req), "request body round trip");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn survives_garbage() {
        let mut seed = 0x2545F4914F6CDD1Du64;
        for len in 0..2000usize {
            let mut buf = Vec::with_capacity(len + 4);
            buf.extend_from_slice(&(len as u32 % 300).to_be_bytes());
            for _ in 0..len {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                buf.push(seed as u8);
            }
            super::decode_frames(&buf);
        }
    }
}
