//! `tde-envelope`: the file format of `tde encrypt` and `tde decrypt`,
//! envelope encryption of files as a KMS client does it (`aws kms
//! generate-data-key`, then encrypt locally).
//!
//! A fresh data key per file comes from the sidecar (`generate_data_key`
//! under a master key and an encryption context); the file is encrypted
//! here with it, and only the wrapped data key is stored, in the file's
//! header. Decryption asks the sidecar to unwrap it (`decrypt`, under the
//! same context: the policy decides), then streams.
//!
//! The stream is the STREAM construction (Hoang, Reyhanitabar, Rogaway,
//! Vizár, "Online Authenticated-Encryption and its Nonce-Reuse
//! Misuse-Resistance", CRYPTO 2015, the "BE32" instance of the
//! `aead-stream` crate) over AES-256-GCM-SIV (RFC 8452): the plaintext in
//! 64 KiB chunks, each sealed with the nonce `prefix (7 bytes) || chunk
//! counter (u32, big-endian) || last-chunk flag (1 byte)` and, as
//! associated data, the SHA-256 of the file's header. A changed, removed,
//! reordered or appended chunk, a truncation (the last chunk carries the
//! flag) or a changed header fails authentication. Memory stays at two
//! chunk buffers whatever the file's size. The format is in
//! docs/FORMAT.md, "Encrypted files".
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};

use aead_stream::{DecryptorBE32, EncryptorBE32};
use aes_gcm_siv::Aes256GcmSiv;
use aes_gcm_siv::aead::KeyInit;
use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// The first bytes of every encrypted file.
pub const MAGIC: &[u8; 8] = b"TDEFILE\x01";
/// The algorithm name in the header.
pub const ALG: &str = "AES-256-GCM-SIV/STREAM-BE32";
/// Plaintext bytes per chunk.
pub const CHUNK: usize = 64 * 1024;
/// AES-GCM-SIV tag length (RFC 8452 section 4).
pub const TAG: usize = 16;
/// The longest header read back (checked before allocating).
pub const MAX_HEADER: usize = 64 * 1024;
/// STREAM's nonce prefix: the 12-byte nonce less 5 bytes of counter and flag.
pub const PREFIX: usize = 7;

/// The header: what decryption needs besides the sidecar.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// Always [`ALG`].
    pub alg: String,
    /// Plaintext bytes per chunk.
    pub chunk: usize,
    /// The master key that wrapped the data key (informational: the
    /// wrapped key names it itself).
    pub key: String,
    /// Its version at encryption.
    pub key_version: u32,
    /// The encryption context the data key is bound to.
    pub context: BTreeMap<String, String>,
    /// The wrapped data key, base64.
    pub wrapped_key: String,
    /// STREAM's nonce prefix, hex.
    pub nonce_prefix: String,
}

impl Header {
    /// `MAGIC || u32 length || JSON`: the bytes written, and their
    /// SHA-256 (every chunk's associated data).
    pub fn encode(&self) -> anyhow::Result<(Vec<u8>, [u8; 32])> {
        let json = serde_json::to_vec(self)?;
        if json.len() > MAX_HEADER {
            bail!("the header would be over {MAX_HEADER} bytes (a very large encryption context?)");
        }
        let mut out = Vec::with_capacity(12 + json.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(json.len() as u32).to_be_bytes());
        out.extend_from_slice(&json);
        let aad = Sha256::digest(&out).into();
        Ok((out, aad))
    }

    /// Reads and checks the header; gives it and its SHA-256.
    pub fn read(r: &mut impl Read) -> anyhow::Result<(Header, [u8; 32])> {
        let mut start = [0u8; 12];
        r.read_exact(&mut start)
            .context("not a tde encrypted file: too short")?;
        if &start[..8] != MAGIC {
            bail!("not a tde encrypted file (no TDEFILE header)");
        }
        let len = u32::from_be_bytes([start[8], start[9], start[10], start[11]]) as usize;
        if len > MAX_HEADER {
            bail!("not a tde encrypted file: a header of {len} bytes (at most {MAX_HEADER})");
        }
        let mut json = vec![0u8; len];
        r.read_exact(&mut json)
            .context("the encrypted file is cut short in its header")?;
        let h: Header = serde_json::from_slice(&json)
            .map_err(|e| anyhow::anyhow!("the encrypted file's header is damaged: {e}"))?;
        if h.alg != ALG {
            bail!("unknown algorithm {:?} (this tde reads {ALG})", h.alg);
        }
        if h.chunk != CHUNK {
            bail!(
                "unsupported chunk size {} (this tde reads {CHUNK})",
                h.chunk
            );
        }
        if hex::decode(&h.nonce_prefix).map_or(true, |p| p.len() != PREFIX) {
            bail!("the encrypted file's header is damaged: bad nonce prefix");
        }
        let mut hasher = Sha256::new();
        hasher.update(start);
        hasher.update(&json);
        Ok((h, hasher.finalize().into()))
    }

    fn prefix(&self) -> anyhow::Result<[u8; PREFIX]> {
        hex::decode(&self.nonce_prefix)
            .ok()
            .and_then(|p| <[u8; PREFIX]>::try_from(p).ok())
            .context("bad nonce prefix")
    }
}

/// A new header for a data key from the sidecar (random nonce prefix).
pub fn new_header(
    key: &str,
    key_version: u32,
    context: &BTreeMap<String, String>,
    wrapped: &[u8],
) -> anyhow::Result<Header> {
    use base64::Engine as _;
    let mut prefix = [0u8; PREFIX];
    getrandom::fill(&mut prefix).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(Header {
        alg: ALG.into(),
        chunk: CHUNK,
        key: key.into(),
        key_version,
        context: context.clone(),
        wrapped_key: base64::engine::general_purpose::STANDARD.encode(wrapped),
        nonce_prefix: hex::encode(prefix),
    })
}

fn cipher(data_key: &[u8]) -> anyhow::Result<Aes256GcmSiv> {
    Aes256GcmSiv::new_from_slice(data_key)
        .map_err(|_| anyhow::anyhow!("the data key is not 32 bytes"))
}

/// Reads until `buf` is full or the input ends; gives how many bytes.
fn fill(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Encrypts `input` to `out` under `data_key`: the header, then the
/// chunks. `progress` is told the plaintext bytes done.
pub fn encrypt_stream(
    header: &Header,
    data_key: &[u8],
    input: &mut dyn Read,
    out: &mut dyn Write,
    progress: &mut dyn FnMut(u64),
) -> anyhow::Result<u64> {
    let (head, aad) = header.encode()?;
    out.write_all(&head).context("writing the output")?;
    let mut enc = EncryptorBE32::from_aead(cipher(data_key)?, &header.prefix()?.into());
    // The plaintext is scrubbed from the buffers when they drop; each chunk
    // is encrypted in place.
    let mut buf = Zeroizing::new(Vec::with_capacity(CHUNK + TAG));
    let mut next = Zeroizing::new(vec![0u8; CHUNK]);
    let mut n = fill(input, &mut next).context("reading the input")?;
    let mut done = 0u64;
    // One chunk of look-ahead: the last chunk (possibly empty) is the one
    // the input ends after.
    loop {
        buf.clear();
        buf.extend_from_slice(&next[..n]);
        if n < CHUNK {
            break;
        }
        let more = fill(input, &mut next).context("reading the input")?;
        if more == 0 {
            break;
        }
        enc.encrypt_next_in_place(&aad, &mut *buf)
            .map_err(|_| anyhow::anyhow!("encryption failed (over 2^32 chunks)"))?;
        out.write_all(&buf).context("writing the output")?;
        done += n as u64;
        progress(done);
        n = more;
    }
    enc.encrypt_last_in_place(&aad, &mut *buf)
        .map_err(|_| anyhow::anyhow!("encryption failed"))?;
    out.write_all(&buf).context("writing the output")?;
    done += n as u64;
    progress(done);
    out.flush().context("writing the output")?;
    Ok(done)
}

/// Decrypts the chunks after the header (already read) from `input` to
/// `out`. Every chunk written is authentic; an input that ends early, has
/// a chunk changed or reordered, or carries bytes after its last chunk
/// fails with an error saying so.
pub fn decrypt_stream(
    header: &Header,
    aad: &[u8; 32],
    data_key: &[u8],
    input: &mut dyn Read,
    out: &mut dyn Write,
    progress: &mut dyn FnMut(u64),
) -> anyhow::Result<u64> {
    let mut input = BufReader::with_capacity(CHUNK + TAG + 1, input);
    let mut dec = DecryptorBE32::from_aead(cipher(data_key)?, &header.prefix()?.into());
    let mut chunk = Zeroizing::new(Vec::with_capacity(CHUNK + TAG));
    let mut done = 0u64;
    let tampered = |at: u64| {
        anyhow::anyhow!(
            "the encrypted file fails authentication at plaintext offset {at}: it was changed, cut short or reordered (nothing from there on was written)"
        )
    };
    // The chunk the input ends after is the last: read one byte ahead.
    let mut read = |chunk: &mut Vec<u8>| -> anyhow::Result<bool> {
        chunk.resize(CHUNK + TAG, 0);
        let n = fill(&mut input, chunk).context("reading the input")?;
        chunk.truncate(n);
        let at_end = n < CHUNK + TAG || input.fill_buf().context("reading the input")?.is_empty();
        Ok(at_end)
    };
    loop {
        if read(&mut chunk)? {
            break;
        }
        dec.decrypt_next_in_place(aad, &mut *chunk)
            .map_err(|_| tampered(done))?;
        out.write_all(&chunk).context("writing the output")?;
        done += chunk.len() as u64;
        progress(done);
    }
    if chunk.len() < TAG {
        return Err(tampered(done));
    }
    dec.decrypt_last_in_place(aad, &mut *chunk)
        .map_err(|_| tampered(done))?;
    out.write_all(&chunk).context("writing the output")?;
    done += chunk.len() as u64;
    progress(done);
    out.flush().context("writing the output")?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        let ctx = BTreeMap::from([("file".to_string(), "a".to_string())]);
        new_header("app-files", 1, &ctx, b"wrapped").expect("header")
    }

    fn enc(h: &Header, key: &[u8; 32], plain: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encrypt_stream(h, key, &mut &plain[..], &mut out, &mut |_| {}).expect("encrypt");
        out
    }

    fn dec(key: &[u8; 32], file: &[u8]) -> anyhow::Result<Vec<u8>> {
        let mut r = file;
        let (h, aad) = Header::read(&mut r)?;
        let mut out = Vec::new();
        decrypt_stream(&h, &aad, key, &mut r, &mut out, &mut |_| {})?;
        Ok(out)
    }

    #[test]
    fn round_trips_at_every_chunk_boundary() {
        let key = [7u8; 32];
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 5] {
            let plain: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let h = header();
            let file = enc(&h, &key, &plain);
            let chunks = len.div_ceil(CHUNK).max(1);
            let head = h.encode().expect("encode").0.len();
            assert_eq!(file.len(), head + len + chunks * TAG, "len {len}");
            assert_eq!(dec(&key, &file).expect("decrypt"), plain, "len {len}");
        }
    }

    #[test]
    fn refuses_every_change() {
        let key = [7u8; 32];
        let plain = vec![1u8; 3 * CHUNK];
        let h = header();
        let file = enc(&h, &key, &plain);
        let head = h.encode().expect("encode").0.len();
        let says = |r: anyhow::Result<Vec<u8>>, what: &str| {
            let e = format!("{:#}", r.expect_err(what));
            assert!(
                e.contains("fails authentication") || e.contains("damaged"),
                "{what}: {e}"
            );
        };
        // A flipped bit in each chunk.
        for at in [head + 5, head + CHUNK + TAG + 5, file.len() - 1] {
            let mut f = file.clone();
            f[at] ^= 1;
            says(dec(&key, &f), "a flipped bit");
        }
        // Cut at a chunk boundary, cut inside a chunk, bytes appended.
        says(
            dec(&key, &file[..head + 2 * (CHUNK + TAG)]),
            "cut at a chunk",
        );
        says(dec(&key, &file[..file.len() - 3]), "cut inside");
        let mut longer = file.clone();
        longer.extend_from_slice(&[0u8; 20]);
        says(dec(&key, &longer), "appended");
        // Two chunks swapped.
        let mut swapped = file.clone();
        let (a, b) = (head, head + CHUNK + TAG);
        let first = file[a..b].to_vec();
        swapped[a..b].copy_from_slice(&file[b..b + CHUNK + TAG]);
        swapped[b..b + CHUNK + TAG].copy_from_slice(&first);
        says(dec(&key, &swapped), "swapped");
        // The header's context changed (the chunks are bound to it).
        let mut h2 = h.clone();
        h2.context.insert("file".into(), "b".into());
        let mut other = h2.encode().expect("encode").0;
        other.extend_from_slice(&file[head..]);
        says(dec(&key, &other), "another header");
        // Another data key.
        says(dec(&[8u8; 32], &file), "another key");
        // Not ours, and a header claiming 4 GiB.
        assert!(dec(&key, b"hello world, not encrypted").is_err());
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        let e = format!("{:#}", dec(&key, &huge).expect_err("huge"));
        assert!(e.contains("at most"), "{e}");
    }
}
