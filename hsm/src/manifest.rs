//! The store manifest: one sealed object listing the current revision of
//! every other object.
//!
//! Each sealed object authenticates its own kind, id and revision, but not
//! that it is the newest one: a row put back to an older (revision, sealed)
//! pair, or deleted, would still open. The manifest closes that gap. It is
//! sealed like any object (kind [`crate::store::KIND_MANIFEST`], id
//! [`ID`], revision = its own revision) and written in the same store
//! transaction as every object change, so at unseal each object must be
//! the one the manifest names, and each name in the manifest must have its
//! object. Rolling back the manifest together with every row it names is a
//! whole-store rollback, which this does not detect (see THREAT-MODEL.md).
//!
//! ```text
//! u64 revision | u32 count | count x (u8 kind | u16 len | id | u64 revision)
//! ```

use std::collections::BTreeMap;

use crate::codec::{Dec, Enc};
use crate::error::HsmError;

/// The manifest's object id.
pub const ID: &str = "manifest";

/// Most entries a manifest may list (a cap for decoding).
const MAX_ENTRIES: u32 = 1 << 20;

/// Current revision of every object, by (kind, id).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    /// The manifest's own revision, bound into its seal.
    pub revision: u64,
    /// (kind, id) -> revision.
    pub entries: BTreeMap<(u8, String), u64>,
}

/// How an object disagrees with the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    /// The manifest names it, the store has no row.
    Missing {
        /// The revision the manifest names.
        expected: u64,
    },
    /// The row's revision is not the manifest's.
    Revision {
        /// In the manifest.
        expected: u64,
        /// In the store.
        found: u64,
    },
    /// A row the manifest does not name.
    Unlisted {
        /// In the store.
        found: u64,
    },
}

impl Mismatch {
    /// One line for the audit record (no secrets: kinds, ids, revisions).
    pub fn describe(&self) -> String {
        match self {
            Mismatch::Missing { expected } => {
                format!("deleted: the manifest names revision {expected}, the store has no row")
            }
            Mismatch::Revision { expected, found } => format!(
                "rolled back or replaced: revision {found} in the store, {expected} in the manifest"
            ),
            Mismatch::Unlisted { found } => {
                format!("not in the manifest: revision {found} (a deleted object put back?)")
            }
        }
    }
}

impl Manifest {
    /// The encoded record (sealed by the caller).
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.u64(self.revision)
            .u32(u32::try_from(self.entries.len()).unwrap_or(u32::MAX));
        for ((kind, id), rev) in &self.entries {
            e.u8(*kind).var(id.as_bytes()).u64(*rev);
        }
        e.0
    }

    /// Decodes an opened manifest record.
    pub fn decode(b: &[u8]) -> Result<Manifest, HsmError> {
        let mut d = Dec::new(b, "manifest");
        let revision = d.u64()?;
        let n = d.u32()?;
        if n > MAX_ENTRIES {
            return Err(HsmError::InvalidCiphertext("manifest"));
        }
        let mut entries = BTreeMap::new();
        for _ in 0..n {
            let kind = d.u8()?;
            let id = d.string()?;
            let rev = d.u64()?;
            if entries.insert((kind, id), rev).is_some() {
                return Err(HsmError::InvalidCiphertext("manifest"));
            }
        }
        d.finish()?;
        Ok(Manifest { revision, entries })
    }

    /// The manifest after `kind`/`id` is written at `revision`: the next
    /// manifest revision, the entry updated.
    pub fn with(&self, kind: u8, id: &str, revision: u64) -> Manifest {
        let mut next = self.clone();
        next.revision += 1;
        next.entries.insert((kind, id.to_string()), revision);
        next
    }

    /// The manifest after `kind`/`id` is deleted: the next manifest
    /// revision, without the entry (a copy of the object put back later
    /// is then an object the manifest does not name).
    pub fn without(&self, kind: u8, id: &str) -> Manifest {
        let mut next = self.clone();
        next.revision += 1;
        next.entries.remove(&(kind, id.to_string()));
        next
    }

    /// Compares the store's objects (kind, id, revision) with the
    /// manifest; returns every disagreement.
    pub fn check<'a>(
        &self,
        objects: impl IntoIterator<Item = (u8, &'a str, u64)>,
    ) -> Vec<((u8, String), Mismatch)> {
        let mut expected = self.entries.clone();
        let mut out = Vec::new();
        for (kind, id, found) in objects {
            match expected.remove(&(kind, id.to_string())) {
                Some(rev) if rev == found => {}
                Some(rev) => out.push((
                    (kind, id.to_string()),
                    Mismatch::Revision {
                        expected: rev,
                        found,
                    },
                )),
                None => out.push(((kind, id.to_string()), Mismatch::Unlisted { found })),
            }
        }
        out.extend(
            expected
                .into_iter()
                .map(|(k, rev)| (k, Mismatch::Missing { expected: rev })),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_finds_every_kind_of_mismatch() {
        let m = Manifest::default()
            .with(1, "a", 1)
            .with(1, "b", 3)
            .with(2, "admin", 7);
        assert_eq!(m.revision, 3);
        assert_eq!(Manifest::decode(&m.encode()).expect("decode"), m);
        assert!(
            m.check([(1, "a", 1), (1, "b", 3), (2, "admin", 7)])
                .is_empty()
        );
        let found = m.check([(1, "a", 1), (1, "b", 2), (1, "c", 1)]);
        assert_eq!(
            found,
            vec![
                (
                    (1, "b".into()),
                    Mismatch::Revision {
                        expected: 3,
                        found: 2
                    }
                ),
                ((1, "c".into()), Mismatch::Unlisted { found: 1 }),
                ((2, "admin".into()), Mismatch::Missing { expected: 7 }),
            ]
        );
        let mut bad = m.encode();
        bad.push(0);
        assert!(Manifest::decode(&bad).is_err());
        assert!(Manifest::decode(&bad[..bad.len() - 3]).is_err());
    }
}
