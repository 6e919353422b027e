//! The overwrite journal, `tde.journal` in the backing root.
//!
//! A block is rewritten in place whenever data inside the file changes (a
//! PostgreSQL page, the WAL page being filled, the partial last block of a
//! file that grows, a re-key). Its new ciphertext shares no byte with the old
//! one, and a `pwrite` stopped half-way (the mount killed: the kernel stops a
//! write between pages) leaves a block that is neither: it fails
//! authentication, and the fsynced data it held would be lost. So every
//! block that already held data is first written whole to a slot of this
//! journal, then in place, and the slot is cleared; a slot still marked
//! when the next mount starts belongs to a write that was in flight. Before
//! it serves, the mount puts each such block back where the one in place
//! does not authenticate and the journal's does (for that file and block
//! number: the AAD binds both), then empties the journal. Blocks written
//! past the old end of a file need no slot: a torn tail is cut back at load.
//!
//! Each slot is written with the file's ciphertext only (a header of
//! positions and lengths, then blocks): nothing in it is plaintext or key
//! material. A slot's header is not authenticated; a forged one can only
//! name blocks that must still authenticate at the place they name, which
//! someone able to write the backing directory could put there directly.
//!
//! This covers a crash of the mount process. The journal is not synced
//! before the overwrite, so a power loss in the middle of an overwrite can
//! still leave that block unreadable (docs/FORMAT.md says so).

use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

use crate::page::{self, BLOCK_STRIDE, FileHeader, FileId, HEADER_LEN, PAGE_SIZE, PageCipher};

/// The journal's name in the backing root (a reserved `tde.` name).
pub const JOURNAL: &str = "tde.journal";
/// Writes that can be journaled at once; more wait for a free slot.
const SLOTS: usize = 16;
/// Blocks per slot: a longer overwrite goes through its slot in pieces.
pub(crate) const SLOT_BLOCKS: u64 = 32;
const HEAD_LEN: usize = 64;
const SLOT_LEN: u64 = HEAD_LEN as u64 + SLOT_BLOCKS * BLOCK_STRIDE;
const MAGIC: &[u8; 8] = b"TDEJRNL1";

/// A slot's header: magic (8), sequence (8), backing inode (8), file id
/// (16), first block (8), stored bytes that follow (4), zeros.
struct Head {
    seq: u64,
    ino: u64,
    file_id: FileId,
    first: u64,
    bytes: u32,
}

impl Head {
    fn encode(&self) -> [u8; HEAD_LEN] {
        let mut b = [0u8; HEAD_LEN];
        b[..8].copy_from_slice(MAGIC);
        b[8..16].copy_from_slice(&self.seq.to_be_bytes());
        b[16..24].copy_from_slice(&self.ino.to_be_bytes());
        b[24..40].copy_from_slice(&self.file_id);
        b[40..48].copy_from_slice(&self.first.to_be_bytes());
        b[48..52].copy_from_slice(&self.bytes.to_be_bytes());
        b
    }

    /// A live slot's header, or `None` (cleared, never used, or not ours).
    fn decode(b: &[u8; HEAD_LEN]) -> Option<Head> {
        if &b[..8] != MAGIC {
            return None;
        }
        let u64_at = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().unwrap_or_default());
        let mut file_id = FileId::default();
        file_id.copy_from_slice(&b[24..40]);
        let bytes = u32::from_be_bytes(b[48..52].try_into().unwrap_or_default());
        (bytes > 0 && u64::from(bytes) <= SLOT_BLOCKS * BLOCK_STRIDE).then_some(Head {
            seq: u64_at(8),
            ino: u64_at(16),
            file_id,
            first: u64_at(40),
            bytes,
        })
    }
}

/// The open journal and its free slots.
pub struct Journal {
    file: File,
    free: Mutex<Vec<usize>>,
    freed: Condvar,
    seq: AtomicU64,
}

/// A slot taken for one write; free again on drop.
pub(crate) struct Slot<'a> {
    journal: &'a Journal,
    index: usize,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut free = self.journal.free.lock().unwrap_or_else(|p| p.into_inner());
        free.push(self.index);
        self.journal.freed.notify_one();
    }
}

impl Slot<'_> {
    fn offset(&self) -> u64 {
        self.index as u64 * SLOT_LEN
    }

    /// Writes `blocks` (stored blocks of the file with backing inode `ino`
    /// and id `file_id`, from block `first`) into the slot, marked live.
    pub(crate) fn record(
        &self,
        ino: u64,
        file_id: &FileId,
        first: u64,
        blocks: &[u8],
    ) -> io::Result<()> {
        let bytes = u32::try_from(blocks.len())
            .ok()
            .filter(|n| u64::from(*n) <= SLOT_BLOCKS * BLOCK_STRIDE)
            .ok_or_else(|| io::Error::other("a journal piece larger than its slot"))?;
        let head = Head {
            seq: self.journal.seq.fetch_add(1, Ordering::Relaxed) + 1,
            ino,
            file_id: *file_id,
            first,
            bytes,
        }
        .encode();
        let (mut at, end) = (
            self.offset(),
            self.offset() + (HEAD_LEN + blocks.len()) as u64,
        );
        let mut parts = [io::IoSlice::new(&head), io::IoSlice::new(blocks)];
        let mut parts = &mut parts[..];
        while at < end {
            let n = rustix::io::pwritev(&self.journal.file, parts, at)?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            at += n as u64;
            io::IoSlice::advance_slices(&mut parts, n);
        }
        Ok(())
    }

    /// Marks the slot free on disk: its write is done.
    pub(crate) fn clear(&self) -> io::Result<()> {
        self.journal.file.write_all_at(&[0u8; 8], self.offset())
    }
}

/// One live slot read back.
struct Entry {
    head: Head,
    blocks: Vec<u8>,
}

impl Journal {
    /// Opens (or creates) the journal of the backing directory `backing`.
    /// Refuses anything but a regular file at its name.
    pub fn open(backing: &Path) -> io::Result<Journal> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(
                (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32,
            )
            .open(backing.join(JOURNAL))
            .map_err(|e| io::Error::new(e.kind(), format!("opening {JOURNAL}: {e}")))?;
        if !file.metadata()?.is_file() {
            return Err(io::Error::other(format!(
                "{JOURNAL} in the backing directory is not a regular file"
            )));
        }
        Ok(Journal {
            file,
            free: Mutex::new((0..SLOTS).rev().collect()),
            freed: Condvar::new(),
            seq: AtomicU64::new(0),
        })
    }

    /// A free slot (the lowest, so the journal stays small), waiting for
    /// one if all are taken.
    pub(crate) fn slot(&self) -> Slot<'_> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(index) = free.pop() {
                return Slot {
                    journal: self,
                    index,
                };
            }
            free = self.freed.wait(free).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn live(&self) -> io::Result<Vec<Entry>> {
        let len = self.file.metadata()?.len();
        let mut out = Vec::new();
        for i in 0..SLOTS as u64 {
            let at = i * SLOT_LEN;
            let mut head = [0u8; HEAD_LEN];
            if at + HEAD_LEN as u64 > len || self.file.read_exact_at(&mut head, at).is_err() {
                continue;
            }
            let Some(head) = Head::decode(&head) else {
                continue;
            };
            let mut blocks = vec![0u8; head.bytes as usize];
            // A slot cut short (the kill came while it was written) names
            // a write that had not started: nothing to put back.
            if self
                .file
                .read_exact_at(&mut blocks, at + HEAD_LEN as u64)
                .is_ok()
            {
                out.push(Entry { head, blocks });
            }
        }
        Ok(out)
    }

    /// After a crash: puts back, in the files of `backing`, every block of
    /// a live slot whose copy in place does not authenticate and whose
    /// journaled copy does (the newest slot first); a journaled partial
    /// block is its file's last, so the file ends with it. Syncs what it
    /// changed, then empties the journal. Returns the blocks put back.
    pub fn replay(&self, backing: &Path, cipher: &PageCipher) -> io::Result<u64> {
        let mut entries = self.live()?;
        if entries.is_empty() {
            return Ok(0);
        }
        entries.sort_by_key(|e| Reverse(e.head.seq));
        let wanted: HashSet<u64> = entries.iter().map(|e| e.head.ino).collect();
        let paths: HashMap<u64, PathBuf> = super::regular_files(backing, true)?
            .into_iter()
            .filter_map(|rel| {
                let ino = std::fs::symlink_metadata(backing.join(&rel)).ok()?.ino();
                wanted.contains(&ino).then_some((ino, rel))
            })
            .collect();
        let mut restored = 0;
        for e in &entries {
            let Some(rel) = paths.get(&e.head.ino) else {
                continue;
            };
            let path = backing.join(rel);
            match put_back(&path, e, cipher) {
                Ok(0) => {}
                Ok(n) => {
                    tracing::warn!(
                        file = %path.display(),
                        first_block = e.head.first,
                        blocks = n,
                        "restored blocks torn by a crash in the middle of their overwrite, from the overwrite journal"
                    );
                    restored += n;
                }
                Err(err) => {
                    tracing::error!(file = %path.display(), error = %err, "could not restore from the overwrite journal");
                }
            }
        }
        self.file.set_len(0)?;
        self.file.sync_all()?;
        Ok(restored)
    }
}

/// [`Journal::replay`] for one entry and its file.
fn put_back(path: &Path, e: &Entry, cipher: &PageCipher) -> io::Result<u64> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)?;
    let mut head = [0u8; HEADER_LEN as usize];
    f.read_exact_at(&mut head, 0)?;
    if FileHeader::decode(&head).map(|h| h.file_id).ok() != Some(e.head.file_id) {
        // Another file behind the same inode number now.
        return Ok(0);
    }
    let mut plain = [0u8; PAGE_SIZE];
    let mut here = vec![0u8; BLOCK_STRIDE as usize];
    let (mut restored, mut changed) = (0, false);
    for (i, block) in e.blocks.chunks(BLOCK_STRIDE as usize).enumerate() {
        let b = e.head.first + i as u64;
        let at = page::block_offset(b);
        let here = &mut here[..block.len()];
        let intact = f.read_exact_at(here, at).is_ok()
            && cipher
                .decrypt_block(&e.head.file_id, b, here, &mut plain)
                .is_ok();
        if !intact {
            if cipher
                .decrypt_block(&e.head.file_id, b, block, &mut plain)
                .is_err()
            {
                continue;
            }
            f.write_all_at(block, at)?;
            (restored, changed) = (restored + 1, true);
        }
        let end = at + block.len() as u64;
        if block.len() < BLOCK_STRIDE as usize && f.metadata()?.len() > end {
            // A shortening truncation was cut short after its last block.
            f.set_len(end)?;
            changed = true;
        }
    }
    plain.fill(0);
    if changed {
        f.sync_data()?;
    }
    Ok(restored)
}
