//! Known-answer vectors for the page format (docs/FORMAT.md), checked two
//! ways: against an independent AES-256-GCM-SIV implementation (RustCrypto)
//! fed with the AAD exactly as the document specifies, and against frozen
//! SHA-256 digests of the stored blocks, so the format cannot drift.
//! Plus: every byte of a stored block is authenticated, and blocks moved,
//! swapped or copied between files and tablespaces fail.

use aes_gcm_siv::aead::{Aead, KeyInit, Payload};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use proptest::prelude::*;
use sha2::{Digest, Sha256};
use tde_plugin::page::*;

struct Vector {
    dek: [u8; 32],
    version: u32,
    file_id: [u8; 16],
    block: u64,
    tablespace: &'static str,
    nonce: [u8; 12],
    len: usize,
    /// SHA-256 of the stored block (ciphertext | nonce | tag | version).
    stored_sha256: &'static str,
}

/// Plaintext of a vector: byte i is (i * 7 + block) mod 251.
fn plaintext(v: &Vector) -> Vec<u8> {
    (0..v.len)
        .map(|i| ((i * 7 + v.block as usize) % 251) as u8)
        .collect()
}

const VECTORS: &[Vector] = &[
    Vector {
        dek: [0x11; 32],
        version: 1,
        file_id: [0xA0; 16],
        block: 0,
        tablespace: "16384",
        nonce: [0x01; 12],
        len: 8192,
        stored_sha256: "5ad87c8a7bd39565c6f4c81ccd702ddab0ec15deb13d64a799a8158d08d4e98e",
    },
    Vector {
        dek: [0x22; 32],
        version: 7,
        file_id: [0x5C; 16],
        block: 131071,
        tablespace: "secure",
        nonce: [0xF0; 12],
        len: 8192,
        stored_sha256: "d7fbc4bebdb26043319955beda9900f6c659d21bed5f17e0fe8cf933fe41304e",
    },
    Vector {
        dek: [0x33; 32],
        version: 2,
        file_id: [0x00; 16],
        block: 3,
        tablespace: "pg_global",
        nonce: [0x0A; 12],
        len: 512,
        stored_sha256: "900cf032c3a6cd0d68c1b2ed01a5f7c0479cdc6224abd592edc6addb9faa3c75",
    },
];

fn spec_aad(v: &Vector) -> Vec<u8> {
    let mut aad = b"tde page v1".to_vec();
    aad.extend_from_slice(&v.file_id);
    aad.extend_from_slice(&v.block.to_be_bytes());
    aad.extend_from_slice(&v.version.to_be_bytes());
    aad.extend_from_slice(&(v.len as u32).to_be_bytes());
    aad.push(v.tablespace.len() as u8);
    aad.extend_from_slice(v.tablespace.as_bytes());
    aad
}

fn cipher(v: &Vector) -> PageCipher {
    let mut c = PageCipher::new(v.tablespace).expect("cipher");
    c.add_key(v.version, &v.dek).expect("key");
    c
}

fn stored(v: &Vector) -> Vec<u8> {
    let mut out = vec![0u8; v.len + TRAILER_LEN];
    cipher(v)
        .encrypt_block_with_nonce(&v.file_id, v.block, &plaintext(v), v.nonce, &mut out)
        .expect("encrypt");
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn known_answers() {
    for (i, v) in VECTORS.iter().enumerate() {
        let ours = stored(v);
        // Independent implementation, from the document.
        let ct = Aes256GcmSiv::new((&v.dek).into())
            .encrypt(
                &Nonce::from(v.nonce),
                Payload {
                    msg: &plaintext(v),
                    aad: &spec_aad(v),
                },
            )
            .expect("encrypt");
        let mut expected = ct[..v.len].to_vec();
        expected.extend_from_slice(&v.nonce);
        expected.extend_from_slice(&ct[v.len..]);
        expected.extend_from_slice(&v.version.to_be_bytes());
        assert_eq!(ours, expected, "vector {i} differs from the specification");
        assert_eq!(
            hex(&Sha256::digest(&ours)),
            v.stored_sha256,
            "vector {i} digest"
        );
        let mut back = vec![0u8; PAGE_SIZE];
        let n = cipher(v)
            .decrypt_block(&v.file_id, v.block, &ours, &mut back)
            .expect("decrypt");
        assert_eq!(&back[..n], &plaintext(v)[..]);
    }
}

#[test]
fn every_byte_of_a_block_is_authenticated() {
    let v = &VECTORS[0];
    let good = stored(v);
    let c = cipher(v);
    let mut out = vec![0u8; PAGE_SIZE];
    for i in 0..good.len() {
        let mut bad = good.clone();
        bad[i] ^= 0x01;
        let r = c.decrypt_block(&v.file_id, v.block, &bad, &mut out);
        assert!(
            matches!(
                r,
                Err(PageError::Auth { .. }) | Err(PageError::UnknownVersion { .. })
            ),
            "byte {i}: {r:?}"
        );
        assert!(
            out.iter().all(|b| *b == 0),
            "byte {i}: no plaintext left behind"
        );
    }
}

#[test]
fn moved_swapped_copied_and_cut_blocks_fail() {
    let v = &VECTORS[0];
    let c = cipher(v);
    let mut a = vec![0u8; PAGE_SIZE + TRAILER_LEN];
    let mut b = vec![0u8; PAGE_SIZE + TRAILER_LEN];
    c.encrypt_block(&v.file_id, 5, &[1u8; PAGE_SIZE], &mut a)
        .expect("a");
    c.encrypt_block(&v.file_id, 6, &[2u8; PAGE_SIZE], &mut b)
        .expect("b");
    let mut out = vec![0u8; PAGE_SIZE];
    assert!(c.decrypt_block(&v.file_id, 5, &a, &mut out).is_ok());
    assert_eq!(
        c.decrypt_block(&v.file_id, 6, &a, &mut out),
        Err(PageError::Auth { block: 6 }),
        "swapped"
    );
    assert_eq!(
        c.decrypt_block(&v.file_id, 5, &b, &mut out),
        Err(PageError::Auth { block: 5 }),
        "swapped"
    );
    assert!(
        c.decrypt_block(&[9u8; 16], 5, &a, &mut out).is_err(),
        "copied to another file"
    );
    let mut other_ts = PageCipher::new("other").expect("cipher");
    other_ts.add_key(v.version, &v.dek).expect("key");
    assert!(
        other_ts.decrypt_block(&v.file_id, 5, &a, &mut out).is_err(),
        "another tablespace"
    );
    let mut cut = a[..4096].to_vec();
    cut.extend_from_slice(&a[PAGE_SIZE..]);
    assert!(
        c.decrypt_block(&v.file_id, 5, &cut, &mut out).is_err(),
        "cut short"
    );
    assert!(
        c.decrypt_block(&v.file_id, 5, &vec![0u8; PAGE_SIZE + TRAILER_LEN], &mut out)
            .is_err(),
        "zeroed"
    );
    let mut newer = PageCipher::new(v.tablespace).expect("cipher");
    newer.add_key(9, &[0x44; 32]).expect("key");
    assert_eq!(
        newer.decrypt_block(&v.file_id, 5, &a, &mut out),
        Err(PageError::UnknownVersion {
            block: 5,
            version: 1
        })
    );
}

#[test]
fn two_versions_read_and_new_writes_use_the_newest() {
    let mut c = PageCipher::new("ts").expect("cipher");
    c.add_key(1, &[1u8; 32]).expect("k1");
    let fid = [3u8; 16];
    let mut old = vec![0u8; 100 + TRAILER_LEN];
    c.encrypt_block(&fid, 0, &[7u8; 100], &mut old)
        .expect("old");
    c.add_key(2, &[2u8; 32]).expect("k2");
    assert_eq!(c.current_version(), 2);
    let mut new = vec![0u8; 100 + TRAILER_LEN];
    c.encrypt_block(&fid, 0, &[8u8; 100], &mut new)
        .expect("new");
    assert_eq!(PageCipher::block_version(&old), Some(1));
    assert_eq!(PageCipher::block_version(&new), Some(2));
    let mut out = [0u8; PAGE_SIZE];
    assert_eq!(c.decrypt_block(&fid, 0, &old, &mut out), Ok(100));
    assert_eq!(out[..100], [7u8; 100]);
    c.decrypt_block(&fid, 0, &new, &mut out).expect("new reads");
    assert_eq!(out[..100], [8u8; 100]);
}

proptest! {
    #[test]
    fn any_block_round_trips(len in 1usize..=PAGE_SIZE, block in any::<u64>(), seed in any::<u8>()) {
        let mut c = PageCipher::new("ts").expect("cipher");
        c.add_key(1, &[seed; 32]).expect("key");
        let plain: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(seed)).collect();
        let mut stored = vec![0u8; len + TRAILER_LEN];
        c.encrypt_block(&[seed; 16], block, &plain, &mut stored).expect("enc");
        let mut out = vec![0u8; PAGE_SIZE];
        prop_assert_eq!(c.decrypt_block(&[seed; 16], block, &stored, &mut out), Ok(len));
        prop_assert_eq!(&out[..len], &plain[..]);
    }
}

/// The format-2 header's tag, computed from FORMAT.md alone with RustCrypto's
/// HKDF and HMAC, must be what the page cipher seals (and its bytes are
/// frozen).
#[test]
fn header_tag_follows_the_document() {
    use hmac::{KeyInit as _, Mac as _};
    let dek = [0x5Au8; 32];
    let mut c = PageCipher::new("16384").expect("cipher");
    c.add_key(3, &dek).expect("key");
    let mut h = FileHeader {
        version: FORMAT_VERSION,
        file_id: [0xC3; 16],
        durable_len: 1_234_567,
        key_version: 0,
        renaming: false,
        tags: [[0; HEADER_TAG_LEN]; 2],
    };
    let path = b"PG_15_202209061/5/16397";
    c.seal_header(&mut h, path, None).expect("seal");
    let bytes = h.encode();

    // K_hdr = HKDF-SHA256(IKM = DEK, salt "tde/v2/file-header", info "header mac").
    let mut k_hdr = [0u8; 32];
    hkdf::Hkdf::<Sha256>::new(Some(b"tde/v2/file-header"), &dek)
        .expand(b"header mac", &mut k_hdr)
        .expect("hkdf");
    let mut mac = <hmac::Hmac<Sha256>>::new_from_slice(&k_hdr).expect("hmac");
    mac.update(b"tde header v2");
    mac.update(&bytes[..36]);
    mac.update(&[5]);
    mac.update(b"16384");
    mac.update(&(path.len() as u32).to_be_bytes());
    mac.update(path);
    let tag = mac.finalize().into_bytes();
    assert_eq!(&bytes[36..50], &tag[..14], "tag 1 as documented");
    assert_eq!(&bytes[50..64], &[0u8; 14], "tag 2 zero outside a rename");
    assert_eq!(&bytes[0..8], b"TDEF\x02\x00\x00\x00");
    assert_eq!(&bytes[24..32], &1_234_567u64.to_be_bytes());
    assert_eq!(&bytes[32..36], &3u32.to_be_bytes());
    assert_eq!(
        hex(&Sha256::digest(bytes)),
        "86798461d5a4b1095edb9537a55318de9e3380925c668e67b463586b580986ca",
        "the header's bytes are frozen"
    );
}
