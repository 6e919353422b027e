//! Fuzzing harnesses for everything the plugin parses from the backing
//! directory or its control socket (what someone who can write the backing
//! directory, or connect to the socket, controls). The `fuzz/` targets are
//! shims that call these; `tests/fuzz_corpus.rs` runs them over the
//! committed seed corpus and mutations of it in every `cargo test`.
//!
//! Each harness panics only when an invariant breaks: a parser must never
//! panic, and whatever parses must encode back to something that parses to
//! the same value.

use crate::control::parse_request;
use crate::keyfile::KeyFile;
use crate::page::{self, FileHeader, PAGE_SIZE, PageCipher, TRAILER_LEN};
use crate::rekey::Checkpoint;

/// A file's first bytes: the header decoder, the length rules, and the
/// header and block checks of a page cipher with a fixed key.
pub fn file_header(data: &[u8]) {
    if let Ok(h) = FileHeader::decode(data) {
        let again = FileHeader::decode(&h.encode());
        assert_eq!(again, Ok(h), "header round trip");
        assert_eq!(
            &h.encode()[..],
            &data[..64],
            "a header decodes from its own bytes only"
        );
        let mut c = PageCipher::new("fuzz").expect("cipher");
        c.add_key(1, &[9u8; 32]).expect("key");
        let path = data.get(64..).unwrap_or_default();
        let _ = c.verify_header(&h, path);
        // What follows the header, read as blocks: never a panic, never
        // accepted (the fuzzer does not have the key's tag).
        let body = data.get(64..).unwrap_or_default();
        for block in body.chunks(PAGE_SIZE + TRAILER_LEN).take(4) {
            let mut out = [0u8; PAGE_SIZE];
            let _ = c.decrypt_block(&h.file_id, 0, block, &mut out);
        }
    }
    if let Some(n) = data.get(..8).and_then(|b| b.try_into().ok()) {
        let stored = u64::from_be_bytes(n);
        if let Ok(l) = page::logical_len(stored) {
            assert_eq!(page::stored_len(l), stored, "length round trip");
        }
    }
}

/// A key file's text (and the same bytes as a re-key checkpoint, the other
/// JSON file of the backing directory).
pub fn key_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(kf) = KeyFile::parse(text) {
        let again = serde_json::to_string(&kf).expect("serialize");
        assert_eq!(KeyFile::parse(&again).ok(), Some(kf), "key file round trip");
    }
    if let Ok(ck) = Checkpoint::parse(text) {
        let again = serde_json::to_string(&ck).expect("serialize");
        assert_eq!(
            Checkpoint::parse(&again).ok(),
            Some(ck),
            "checkpoint round trip"
        );
    }
}

/// One line sent to a mount's control socket.
pub fn control_line(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(req) = parse_request(text) {
        let again = serde_json::to_string(&req).expect("serialize");
        assert_eq!(parse_request(&again).ok(), Some(req), "request round trip");
    }
}
