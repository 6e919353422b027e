//! Fuzzing harnesses for what the HSM parses from outside: unseal shares
//! (reachable before any login), wrapped data keys (from any client with a
//! policy), and store records (from whoever can write the store; they are
//! authenticated before they are parsed, but the decoders must hold anyway).
//! The `fuzz/` targets are shims that call these; the root crate's
//! `tests/fuzz_corpus.rs` runs them over the committed seed corpus and
//! mutations of it in every `cargo test`.
//!
//! Each harness panics only when an invariant breaks: a parser must never
//! panic, and whatever parses must encode back to something that parses to
//! the same value.

use crate::manifest::Manifest;
use crate::mek::MekRecord;
use crate::operator::OperatorRecord;
use crate::seal::Share;
use crate::secret::MasterKeyMaterial;
use crate::wrap::{self, Context, VersionKeys, WrappedKey};

/// The fixed master key the wrapped-key seeds were made with, so seeds
/// unwrap and mutations exercise the authentication failure paths.
pub const SEED_KEY: [u8; 32] = [7; 32];

/// The context the wrapped-key seeds were made with.
pub fn seed_context() -> Context {
    [("tablespace".to_string(), "fuzz".to_string())].into()
}

/// An unseal share's text form.
pub fn unseal_share(data: &[u8]) {
    let Ok(s) = Share::parse(data) else {
        return;
    };
    let text = s.to_text();
    let again = Share::parse(text.expose()).expect("a share's own text parses");
    assert_eq!(
        (again.store_id, again.threshold, again.count, again.x),
        (s.store_id, s.threshold, s.count, s.x),
        "share round trip"
    );
    assert_eq!(
        again.to_text().expose(),
        text.expose(),
        "share text is canonical"
    );
}

/// A wrapped data key: the header parser, then the unwrap under the seed
/// key (authentic only for unmutated seeds).
pub fn wrapped_key(data: &[u8]) {
    let Ok(w) = WrappedKey::parse(data) else {
        return;
    };
    assert!(!w.key.is_empty() && w.key.len() <= wrap::MAX_NAME_LEN);
    let mek = MasterKeyMaterial::from_slice(&SEED_KEY).expect("key");
    let keys = VersionKeys::derive(&mek, w.key, w.version).expect("derive");
    if let Ok(dek) = wrap::unwrap(&keys, &w, &seed_context()) {
        // Authentic: rewrapping gives a blob with the same header that
        // unwraps to the same key.
        let again = wrap::wrap(&keys, w.key, w.version, &dek, &seed_context()).expect("wrap");
        let w2 = WrappedKey::parse(&again).expect("header");
        assert_eq!((w2.key, w2.version), (w.key, w.version));
        let dek2 = wrap::unwrap(&keys, &w2, &seed_context()).expect("unwrap");
        assert_eq!(dek2.expose(), dek.expose(), "wrap round trip");
    }
}

/// The records inside sealed store objects: a master key, an operator, the
/// manifest. The first byte picks the decoder.
pub fn store_record(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            if let Ok(r) = MekRecord::decode(body) {
                let bytes = r.encode();
                let again = MekRecord::decode(bytes.expose()).expect("re-decode");
                assert_eq!(again.encode().expose(), bytes.expose(), "key record");
            }
        }
        1 => {
            if let Ok(r) = OperatorRecord::decode(body) {
                let bytes = r.encode();
                let again = OperatorRecord::decode(bytes.expose()).expect("re-decode");
                assert_eq!(again.encode().expose(), bytes.expose(), "operator record");
            }
        }
        _ => {
            if let Ok(m) = Manifest::decode(body) {
                assert_eq!(Manifest::decode(&m.encode()).ok(), Some(m), "manifest");
            }
        }
    }
}
