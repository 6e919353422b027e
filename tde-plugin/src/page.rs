//! The backing-file format and the page cipher. Pure computation, no I/O.
//!
//! A backing file is a 64-byte header followed by blocks. Block `n` holds
//! plaintext bytes `n * 8192 .. (n + 1) * 8192` of the file that PostgreSQL
//! sees, stored as
//!
//! ```text
//! ciphertext (len bytes, len = 8192 except in the last block) | nonce (12) | tag (16) | DEK version (u32 BE)
//! ```
//!
//! at offset `64 + n * 8224`. The ciphertext is AES-256-GCM-SIV (RFC 8452)
//! under the DEK of that version, with a fresh random nonce at every write and
//!
//! ```text
//! AAD = "tde page v1" | file id (16) | block number (u64) | DEK version (u32) | len (u32) | u8 n | tablespace id (n bytes)
//! ```
//!
//! so a block that is modified, moved to another offset, copied into another
//! file or tablespace, or cut short fails to decrypt. The plaintext length of
//! the file follows from the backing length (see [`logical_len`]); sparse
//! regions are never stored as holes: gaps are written as encrypted zero
//! blocks, so an all-zero stored block is always tampering, never data.

use aws_lc_rs::aead::{AES_256_GCM_SIV, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::{constant_time, hkdf, hmac};
use thiserror::Error;
use zeroize::Zeroize;

/// Plaintext bytes per block (PostgreSQL's page size).
pub const PAGE_SIZE: usize = 8192;
/// Nonce length (RFC 8452 section 4).
pub const NONCE_LEN: usize = 12;
/// Tag length (RFC 8452 section 4).
pub const TAG_LEN: usize = 16;
/// Bytes after each block's ciphertext: nonce, tag, DEK version.
pub const TRAILER_LEN: usize = NONCE_LEN + TAG_LEN + 4;
/// Distance between blocks in the backing file.
pub const BLOCK_STRIDE: u64 = (PAGE_SIZE + TRAILER_LEN) as u64;
/// Size of the file header.
pub const HEADER_LEN: u64 = 64;
/// Magic bytes of a backing file.
pub const MAGIC: &[u8; 4] = b"TDEF";
/// Format version of new files' headers.
pub const FORMAT_VERSION: u8 = 2;
/// Length of a file id.
pub const FILE_ID_LEN: usize = 16;
/// Longest tablespace id bound into the AAD.
pub const MAX_TABLESPACE_ID: usize = 128;

/// A backing file's random identity.
pub type FileId = [u8; FILE_ID_LEN];

/// Why a block or header could not be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PageError {
    /// The block failed authentication: modified, moved, swapped or from
    /// another file or tablespace.
    #[error("block {block} failed authentication (modified, moved or copied)")]
    Auth {
        /// Block number.
        block: u64,
    },
    /// The block names a DEK version this mount does not have.
    #[error(
        "block {block} is encrypted under DEK version {version}, which this mount does not hold"
    )]
    UnknownVersion {
        /// Block number.
        block: u64,
        /// Version.
        version: u32,
    },
    /// The file header is not ours or is damaged.
    #[error("not a tde backing file: {0}")]
    BadHeader(&'static str),
    /// The header's tags do not bind it to this path (the file was swapped,
    /// copied or renamed outside the mount) or the header was changed.
    #[error(
        "the file header does not authenticate for this path (swapped, copied or renamed outside the mount, or modified)"
    )]
    HeaderAuth,
    /// The backing length is impossible for this format.
    #[error("backing file length {0} is not a valid tde length (truncated or damaged)")]
    BadLength(u64),
    /// An argument outside the format's limits.
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
}

/// The 64-byte file header.
///
/// Format 1 (older tablespaces, upgraded at mount):
///
/// ```text
/// "TDEF" | 1 | 3 zero | u32 page size | u32 trailer size | file id (16) | 32 zero
/// ```
///
/// Format 2 binds the file to its path and records its durable length:
///
/// ```text
/// 0   4   "TDEF"
/// 4   1   2
/// 5   1   flags: bit 0 = a rename is in progress (tag 2 is valid too)
/// 6   2   zero
/// 8   16  file id
/// 24  8   durable length: plaintext bytes known to be on disk (u64)
/// 32  4   DEK version whose header key made the tags (u32)
/// 36  14  tag 1: binds the file to its path
/// 50  14  tag 2: binds it to the path it is being renamed to (else zero)
/// ```
///
/// `tag = HMAC-SHA256(K_hdr, "tde header v2" | bytes 0..36 | u8 n | tablespace
/// id (n) | u32 m | path (m))[0..14]`, where `K_hdr` is derived from the DEK
/// of the header's version with HKDF-SHA256 (RFC 5869) and `path` is the
/// file's path relative to the backing directory. See [`PageCipher::seal_header`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileHeader {
    /// [`FORMAT_V1`] or [`FORMAT_VERSION`].
    pub version: u8,
    /// Random id bound into every block's AAD.
    pub file_id: FileId,
    /// Plaintext length known to be on disk (format 2; 0 in format 1).
    pub durable_len: u64,
    /// DEK version of the header key (format 2).
    pub key_version: u32,
    /// A rename is in progress: the file is valid at the path of tag 1 and
    /// at that of tag 2.
    pub renaming: bool,
    /// Tag 1 and tag 2 (format 2).
    pub tags: [[u8; HEADER_TAG_LEN]; 2],
}

/// Length of a header tag (HMAC-SHA256 truncated to 112 bits, NIST SP
/// 800-107 section 5.3.3).
pub const HEADER_TAG_LEN: usize = 14;
/// The older header format, still read (and upgraded) in tablespaces whose
/// key file says so.
pub const FORMAT_V1: u8 = 1;
/// Bytes of a format-2 header covered by its tags.
const HEADER_SIGNED: usize = 36;
const FLAG_RENAMING: u8 = 1;

impl FileHeader {
    /// A format-2 header with a fresh random file id, durable length 0 and
    /// no tags yet (see [`PageCipher::seal_header`]).
    pub fn generate() -> Result<Self, PageError> {
        let mut file_id = [0u8; FILE_ID_LEN];
        aws_lc_rs::rand::fill(&mut file_id)
            .map_err(|_| PageError::Invalid("random source failed"))?;
        Ok(Self {
            version: FORMAT_VERSION,
            file_id,
            durable_len: 0,
            key_version: 0,
            renaming: false,
            tags: [[0; HEADER_TAG_LEN]; 2],
        })
    }

    /// The header bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut h = [0u8; HEADER_LEN as usize];
        h[0..4].copy_from_slice(MAGIC);
        h[4] = self.version;
        if self.version == FORMAT_V1 {
            h[8..12].copy_from_slice(&(PAGE_SIZE as u32).to_be_bytes());
            h[12..16].copy_from_slice(&(TRAILER_LEN as u32).to_be_bytes());
            h[16..32].copy_from_slice(&self.file_id);
            return h;
        }
        h[5] = if self.renaming { FLAG_RENAMING } else { 0 };
        h[8..24].copy_from_slice(&self.file_id);
        h[24..32].copy_from_slice(&self.durable_len.to_be_bytes());
        h[32..36].copy_from_slice(&self.key_version.to_be_bytes());
        h[36..50].copy_from_slice(&self.tags[0]);
        h[50..64].copy_from_slice(&self.tags[1]);
        h
    }

    /// Parses and checks a header of either format (the tags are checked by
    /// [`PageCipher::verify_header`]).
    pub fn decode(b: &[u8]) -> Result<Self, PageError> {
        let b: &[u8; HEADER_LEN as usize] = b
            .get(..HEADER_LEN as usize)
            .and_then(|s| s.try_into().ok())
            .ok_or(PageError::BadHeader("shorter than the header"))?;
        if &b[0..4] != MAGIC {
            return Err(PageError::BadHeader("bad magic"));
        }
        let mut file_id = [0u8; FILE_ID_LEN];
        match b[4] {
            FORMAT_V1 => {
                if b[8..12] != (PAGE_SIZE as u32).to_be_bytes()
                    || b[12..16] != (TRAILER_LEN as u32).to_be_bytes()
                {
                    return Err(PageError::BadHeader("unsupported page or trailer size"));
                }
                if b[5..8] != [0; 3] || b[32..] != [0; 32] {
                    return Err(PageError::BadHeader("reserved bytes are not zero"));
                }
                file_id.copy_from_slice(&b[16..32]);
                Ok(Self {
                    version: FORMAT_V1,
                    file_id,
                    durable_len: 0,
                    key_version: 0,
                    renaming: false,
                    tags: [[0; HEADER_TAG_LEN]; 2],
                })
            }
            FORMAT_VERSION => {
                if b[5] & !FLAG_RENAMING != 0 || b[6..8] != [0; 2] {
                    return Err(PageError::BadHeader("reserved bytes are not zero"));
                }
                file_id.copy_from_slice(&b[8..24]);
                let mut tags = [[0u8; HEADER_TAG_LEN]; 2];
                tags[0].copy_from_slice(&b[36..50]);
                tags[1].copy_from_slice(&b[50..64]);
                let renaming = b[5] & FLAG_RENAMING != 0;
                if !renaming && tags[1] != [0; HEADER_TAG_LEN] {
                    return Err(PageError::BadHeader("tag 2 is set outside a rename"));
                }
                Ok(Self {
                    version: FORMAT_VERSION,
                    file_id,
                    durable_len: u64::from_be_bytes(b[24..32].try_into().unwrap_or_default()),
                    key_version: u32::from_be_bytes(b[32..36].try_into().unwrap_or_default()),
                    renaming,
                    tags,
                })
            }
            _ => Err(PageError::BadHeader("unsupported format version")),
        }
    }
}

/// Offset of block `n` in the backing file.
pub fn block_offset(n: u64) -> u64 {
    HEADER_LEN + n * BLOCK_STRIDE
}

/// Backing length for a plaintext length.
pub fn stored_len(logical: u64) -> u64 {
    let full = logical / PAGE_SIZE as u64;
    let rem = logical % PAGE_SIZE as u64;
    HEADER_LEN + full * BLOCK_STRIDE + if rem > 0 { rem + TRAILER_LEN as u64 } else { 0 }
}

/// Plaintext length for a backing length. A partial last block must hold
/// at least one byte besides its trailer.
pub fn logical_len(stored: u64) -> Result<u64, PageError> {
    let body = stored
        .checked_sub(HEADER_LEN)
        .ok_or(PageError::BadLength(stored))?;
    let full = body / BLOCK_STRIDE;
    let rem = body % BLOCK_STRIDE;
    match rem {
        0 => Ok(full * PAGE_SIZE as u64),
        r if r > TRAILER_LEN as u64 => Ok(full * PAGE_SIZE as u64 + r - TRAILER_LEN as u64),
        _ => Err(PageError::BadLength(stored)),
    }
}

/// Nonces drawn per refill of the per-thread pool.
const NONCE_POOL: usize = 256;

thread_local! {
    static NONCES: std::cell::RefCell<(usize, Box<[u8; NONCE_LEN * NONCE_POOL]>)> =
        std::cell::RefCell::new((NONCE_POOL, Box::new([0u8; NONCE_LEN * NONCE_POOL])));
}

/// A fresh random nonce from AWS-LC's CSPRNG (a per-thread CTR-DRBG seeded
/// from the OS), drawn 256 at a time: one DRBG call per 256 pages instead
/// of one per page. Each nonce is handed out once and wiped from the pool.
/// (The mount never forks after start-up; even a repeated nonce under
/// AES-GCM-SIV reveals only that two identical blocks were written,
/// RFC 8452 section 9.)
fn fresh_nonce() -> Result<[u8; NONCE_LEN], PageError> {
    NONCES.with(|cell| {
        let mut pool = cell.borrow_mut();
        let (used, bytes) = &mut *pool;
        if *used == NONCE_POOL {
            aws_lc_rs::rand::fill(&mut bytes[..])
                .map_err(|_| PageError::Invalid("random source failed"))?;
            *used = 0;
        }
        let range = *used * NONCE_LEN..(*used + 1) * NONCE_LEN;
        let mut n = [0u8; NONCE_LEN];
        n.copy_from_slice(&bytes[range.clone()]);
        bytes[range].fill(0);
        *used += 1;
        Ok(n)
    })
}

/// One DEK version's keys: the page AEAD key and the header MAC key
/// derived from it. Both live inside AWS-LC (cleansed when freed).
struct VersionKey {
    version: u32,
    key: LessSafeKey,
    header: hmac::Key,
}

/// HKDF-SHA256 (RFC 5869) salt and info of the header MAC key
/// `K_hdr = HKDF(IKM = DEK, salt, info)`: one derived key per purpose, so
/// the DEK itself is used only by AES-GCM-SIV.
const HEADER_KEY_SALT: &[u8] = b"tde/v2/file-header";
const HEADER_KEY_INFO: &[u8] = b"header mac";

fn header_key(dek: &[u8]) -> Result<hmac::Key, PageError> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, HEADER_KEY_SALT).extract(dek);
    let okm = prk
        .expand(&[HEADER_KEY_INFO], hmac::HMAC_SHA256)
        .map_err(|_| PageError::Invalid("HKDF expand failed"))?;
    Ok(hmac::Key::from(okm))
}

/// The page cipher of one mount: the DEK versions it holds, the version new
/// writes use, and the tablespace id bound into every block.
pub struct PageCipher {
    keys: Vec<VersionKey>,
    current: u32,
    tablespace: Vec<u8>,
}

impl std::fmt::Debug for PageCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageCipher")
            .field(
                "versions",
                &self.keys.iter().map(|k| k.version).collect::<Vec<_>>(),
            )
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

/// The AAD of one block, built on the stack.
struct BlockAad {
    buf: [u8; 11 + FILE_ID_LEN + 8 + 4 + 4 + 1 + MAX_TABLESPACE_ID],
    len: usize,
}

impl BlockAad {
    fn new(file_id: &FileId, block: u64, version: u32, len: usize, tablespace: &[u8]) -> Self {
        let mut buf = [0u8; 11 + FILE_ID_LEN + 8 + 4 + 4 + 1 + MAX_TABLESPACE_ID];
        let mut at = 0;
        for part in [
            &b"tde page v1"[..],
            file_id,
            &block.to_be_bytes(),
            &version.to_be_bytes(),
            &(len as u32).to_be_bytes(),
            &[tablespace.len() as u8],
            tablespace,
        ] {
            buf[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        Self { buf, len: at }
    }
}

impl AsRef<[u8]> for BlockAad {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl PageCipher {
    /// A cipher for `tablespace` (its id as bound into the AAD; at most
    /// [`MAX_TABLESPACE_ID`] bytes) with no keys yet.
    pub fn new(tablespace: &str) -> Result<Self, PageError> {
        if tablespace.is_empty() || tablespace.len() > MAX_TABLESPACE_ID {
            return Err(PageError::Invalid("tablespace id must be 1..=128 bytes"));
        }
        Ok(Self {
            keys: Vec::new(),
            current: 0,
            tablespace: tablespace.as_bytes().to_vec(),
        })
    }

    /// Adds DEK `version` (32 bytes) and makes it the one new writes use if
    /// it is the newest.
    pub fn add_key(&mut self, version: u32, dek: &[u8]) -> Result<(), PageError> {
        if version == 0 {
            return Err(PageError::Invalid("DEK versions start at 1"));
        }
        let unbound = UnboundKey::new(&AES_256_GCM_SIV, dek)
            .map_err(|_| PageError::Invalid("a DEK is 32 bytes"))?;
        let header = header_key(dek)?;
        self.keys.retain(|k| k.version != version);
        self.keys.push(VersionKey {
            version,
            key: LessSafeKey::new(unbound),
            header,
        });
        self.current = self.current.max(version);
        Ok(())
    }

    /// Drops a DEK version.
    pub fn remove_key(&mut self, version: u32) {
        self.keys.retain(|k| k.version != version);
        if self.current == version {
            self.current = self.keys.iter().map(|k| k.version).max().unwrap_or(0);
        }
    }

    /// Drops every key (zeroization): nothing encrypts or decrypts any more.
    pub fn wipe(&mut self) {
        self.keys.clear();
        self.current = 0;
    }

    /// The versions it holds.
    pub fn versions(&self) -> Vec<u32> {
        self.keys.iter().map(|k| k.version).collect()
    }

    /// The version new blocks are encrypted under.
    pub fn current_version(&self) -> u32 {
        self.current
    }

    fn key(&self, version: u32) -> Option<&LessSafeKey> {
        self.keys
            .iter()
            .find(|k| k.version == version)
            .map(|k| &k.key)
    }

    /// Encrypts one block's plaintext (`1..=8192` bytes) into `out`, which
    /// must be `plain.len() + TRAILER_LEN` bytes.
    pub fn encrypt_block(
        &self,
        file_id: &FileId,
        block: u64,
        plain: &[u8],
        out: &mut [u8],
    ) -> Result<(), PageError> {
        self.encrypt_block_with_nonce(file_id, block, plain, fresh_nonce()?, out)
    }

    /// [`PageCipher::encrypt_block`] with a caller-chosen nonce. Only for
    /// known-answer tests: a nonce must never be chosen by hand otherwise.
    #[doc(hidden)]
    pub fn encrypt_block_with_nonce(
        &self,
        file_id: &FileId,
        block: u64,
        plain: &[u8],
        nonce: [u8; NONCE_LEN],
        out: &mut [u8],
    ) -> Result<(), PageError> {
        let n = plain.len();
        if n == 0 || n > PAGE_SIZE || out.len() != n + TRAILER_LEN {
            return Err(PageError::Invalid("block length"));
        }
        let version = self.current;
        let key = self
            .key(version)
            .ok_or(PageError::Invalid("no DEK loaded"))?;
        let aad = BlockAad::new(file_id, block, version, n, &self.tablespace);
        let (body, trailer) = out.split_at_mut(n);
        let mut tag = [0u8; TAG_LEN];
        // Out of place: the ciphertext goes straight into the stored block.
        key.seal_out_of_place_scatter(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            plain,
            body,
            &[],
            &mut tag,
        )
        .map_err(|_| PageError::Invalid("encryption failed"))?;
        trailer[..NONCE_LEN].copy_from_slice(&nonce);
        trailer[NONCE_LEN..NONCE_LEN + TAG_LEN].copy_from_slice(&tag);
        trailer[NONCE_LEN + TAG_LEN..].copy_from_slice(&version.to_be_bytes());
        Ok(())
    }

    /// Makes `h` a format-2 header under the current DEK version, bound to
    /// `path` (relative to the backing directory) and, while a rename is in
    /// progress, also to `renaming_to`.
    pub fn seal_header(
        &self,
        h: &mut FileHeader,
        path: &[u8],
        renaming_to: Option<&[u8]>,
    ) -> Result<(), PageError> {
        h.version = FORMAT_VERSION;
        h.key_version = self.current;
        h.renaming = renaming_to.is_some();
        h.tags = [[0; HEADER_TAG_LEN]; 2];
        h.tags[0] = self.header_tag(h, path)?;
        if let Some(to) = renaming_to {
            h.tags[1] = self.header_tag(h, to)?;
        }
        Ok(())
    }

    /// Checks that format-2 header `h` is authentic and bound to `path`
    /// (by tag 1, or by tag 2 while a rename is in progress). Constant time
    /// in the tags.
    pub fn verify_header(&self, h: &FileHeader, path: &[u8]) -> Result<(), PageError> {
        if h.version != FORMAT_VERSION {
            return Err(PageError::BadHeader("not a format-2 header"));
        }
        let want = self.header_tag(h, path)?;
        let one = constant_time::verify_slices_are_equal(&want, &h.tags[0]).is_ok();
        let two = h.renaming && constant_time::verify_slices_are_equal(&want, &h.tags[1]).is_ok();
        if one | two {
            Ok(())
        } else {
            Err(PageError::HeaderAuth)
        }
    }

    /// `HMAC-SHA256(K_hdr, "tde header v2" | header bytes 0..36 | u8 n |
    /// tablespace id | u32 m | path)[0..14]` under the header's DEK version.
    fn header_tag(&self, h: &FileHeader, path: &[u8]) -> Result<[u8; HEADER_TAG_LEN], PageError> {
        let v = self
            .keys
            .iter()
            .find(|k| k.version == h.key_version)
            .ok_or(PageError::UnknownVersion {
                block: 0,
                version: h.key_version,
            })?;
        let path_len =
            u32::try_from(path.len()).map_err(|_| PageError::Invalid("path too long"))?;
        let bytes = h.encode();
        let mut ctx = hmac::Context::with_key(&v.header);
        ctx.update(b"tde header v2");
        ctx.update(&bytes[..HEADER_SIGNED]);
        ctx.update(&[self.tablespace.len() as u8]);
        ctx.update(&self.tablespace);
        ctx.update(&path_len.to_be_bytes());
        ctx.update(path);
        let mut out = [0u8; HEADER_TAG_LEN];
        out.copy_from_slice(&ctx.sign().as_ref()[..HEADER_TAG_LEN]);
        Ok(out)
    }

    /// The DEK version a stored block is under (from its trailer).
    pub fn block_version(stored: &[u8]) -> Option<u32> {
        let t = stored.len().checked_sub(4)?;
        Some(u32::from_be_bytes(stored[t..].try_into().ok()?))
    }

    /// Decrypts one stored block (`len + TRAILER_LEN` bytes) into `out`
    /// (at least `len` bytes); returns `len`. On failure `out` is zeroed.
    pub fn decrypt_block(
        &self,
        file_id: &FileId,
        block: u64,
        stored: &[u8],
        out: &mut [u8],
    ) -> Result<usize, PageError> {
        let n = stored
            .len()
            .checked_sub(TRAILER_LEN)
            .filter(|n| (1..=PAGE_SIZE).contains(n))
            .ok_or(PageError::Auth { block })?;
        if out.len() < n {
            return Err(PageError::Invalid("output buffer too small"));
        }
        let (body, trailer) = stored.split_at(n);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&trailer[..NONCE_LEN]);
        let tag = &trailer[NONCE_LEN..NONCE_LEN + TAG_LEN];
        let version = u32::from_be_bytes([trailer[28], trailer[29], trailer[30], trailer[31]]);
        let key = self
            .key(version)
            .ok_or(PageError::UnknownVersion { block, version })?;
        let aad = BlockAad::new(file_id, block, version, n, &self.tablespace);
        let dst = &mut out[..n];
        if key
            .open_separate_gather(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                body,
                tag,
                dst,
            )
            .is_err()
        {
            dst.zeroize();
            return Err(PageError::Auth { block });
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_round_trip() {
        for l in [0u64, 1, 8191, 8192, 8193, 16384, 16385, 1 << 30] {
            assert_eq!(logical_len(stored_len(l)), Ok(l), "{l}");
        }
        assert!(logical_len(10).is_err());
        assert!(logical_len(HEADER_LEN + 5).is_err(), "a partial trailer");
        assert!(
            logical_len(HEADER_LEN + BLOCK_STRIDE + TRAILER_LEN as u64).is_err(),
            "empty block"
        );
    }

    #[test]
    fn header_round_trips_and_refuses_damage() {
        let h = FileHeader::generate().expect("rng");
        let b = h.encode();
        assert_eq!(FileHeader::decode(&b), Ok(h));
        for i in [0usize, 4, 5, 6, 7] {
            let mut x = b;
            x[i] ^= 2;
            assert!(FileHeader::decode(&x).is_err(), "byte {i}");
        }
        assert!(FileHeader::decode(&b[..63]).is_err());
        let v1 = FileHeader {
            version: FORMAT_V1,
            ..h
        };
        let b1 = v1.encode();
        assert_eq!(&b1[8..12], &8192u32.to_be_bytes());
        assert_eq!(FileHeader::decode(&b1), Ok(v1));
        for i in [0usize, 4, 6, 9, 13, 40] {
            let mut x = b1;
            x[i] ^= 1;
            assert!(FileHeader::decode(&x).is_err(), "format 1, byte {i}");
        }
    }

    #[test]
    fn sealed_headers_bind_path_length_and_key() {
        let mut c = PageCipher::new("ts").expect("cipher");
        c.add_key(1, &[7u8; 32]).expect("key");
        let mut h = FileHeader::generate().expect("rng");
        h.durable_len = 123_456;
        c.seal_header(&mut h, b"base/5/1259", None).expect("seal");
        let h = FileHeader::decode(&h.encode()).expect("decode");
        assert_eq!(c.verify_header(&h, b"base/5/1259"), Ok(()));
        assert_eq!(
            c.verify_header(&h, b"base/5/1260"),
            Err(PageError::HeaderAuth),
            "another path"
        );
        // Every byte from the file id on is covered by the tag.
        for i in 8..HEADER_LEN as usize {
            let mut b = h.encode();
            b[i] ^= 0x10;
            if let Ok(x) = FileHeader::decode(&b) {
                assert!(c.verify_header(&x, b"base/5/1259").is_err(), "byte {i}");
            }
        }
        // The same header under another tablespace's key does not verify.
        let mut other = PageCipher::new("ts2").expect("cipher");
        other.add_key(1, &[7u8; 32]).expect("key");
        assert!(other.verify_header(&h, b"base/5/1259").is_err());
        // While renaming, both names are valid; afterwards only the new.
        let mut r = h;
        c.seal_header(&mut r, b"a/tmp", Some(b"a/final"))
            .expect("seal");
        assert!(r.renaming);
        assert_eq!(c.verify_header(&r, b"a/tmp"), Ok(()));
        assert_eq!(c.verify_header(&r, b"a/final"), Ok(()));
        assert!(c.verify_header(&r, b"a/other").is_err());
        let mut clear = r;
        clear.renaming = false;
        assert!(
            c.verify_header(&clear, b"a/final").is_err(),
            "the flag is covered"
        );
        // A header under a retired version cannot be checked.
        c.add_key(2, &[8u8; 32]).expect("key");
        c.remove_key(1);
        assert_eq!(
            c.verify_header(&h, b"base/5/1259"),
            Err(PageError::UnknownVersion {
                block: 0,
                version: 1
            })
        );
        let mut again = h;
        c.seal_header(&mut again, b"base/5/1259", None)
            .expect("seal");
        assert_eq!(again.key_version, 2);
        assert_eq!(c.verify_header(&again, b"base/5/1259"), Ok(()));
        c.wipe();
        assert!(c.verify_header(&again, b"base/5/1259").is_err());
        assert!(c.versions().is_empty());
    }

    #[test]
    fn nonces_do_not_repeat() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..(NONCE_POOL * 4 + 3) {
            assert!(seen.insert(fresh_nonce().expect("nonce")));
        }
    }

    #[test]
    fn debug_shows_no_key() {
        let mut c = PageCipher::new("ts").expect("cipher");
        c.add_key(1, &[0xABu8; 32]).expect("key");
        let s = format!("{c:?}");
        assert!(
            !s.contains("171") && !s.to_lowercase().contains("abab"),
            "{s}"
        );
    }
}
