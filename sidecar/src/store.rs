//! The SQLite key store (rusqlite), the embedded default backend.
//!
//! One database file holds the store's meta, the sealed root, the sealed
//! objects and the audit chain. Migrations live in `sql/sqlite/` and are
//! applied in order; `schema_version` records the last one applied.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};
use tde_hsm::STORE_ID_LEN;
use tde_hsm::store::{ObjectStore, StoreError, StoreMeta, StoreOp, StoredObject};
use tde_protocol::Context;

/// Migrations, in order. Index + 1 is the schema version.
const MIGRATIONS: &[&str] = &[
    include_str!("../../sql/sqlite/001_init.sql"),
    include_str!("../../sql/sqlite/002_registry.sql"),
    include_str!("../../sql/sqlite/003_audit_evidence.sql"),
];

/// A registry change: the registration of `(key, context, location)`
/// becomes `deks`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryWrite {
    /// Master key name.
    pub key: String,
    /// Encryption context.
    pub context: Context,
    /// Where the data keys live.
    pub location: String,
    /// Unix seconds.
    pub last_seen: u64,
    /// Every data key version there, with the master key version wrapping
    /// it.
    pub deks: Vec<tde_protocol::DekRef>,
}

/// Applies `w` inside the transaction `tx` (the audit writer's: see
/// [`crate::audit::AuditRecord::registration`]).
pub fn write_registration(
    tx: &rusqlite::Transaction<'_>,
    w: &RegistryWrite,
) -> rusqlite::Result<()> {
    let context = context_text(&w.context);
    tx.execute(
        "DELETE FROM registry WHERE key = ?1 AND context = ?2 AND location = ?3",
        rusqlite::params![w.key, context, w.location],
    )?;
    let mut insert = tx.prepare_cached(
        "INSERT INTO registry (key, context, dek_version, key_version, location, last_seen)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for d in &w.deks {
        insert.execute(rusqlite::params![
            w.key,
            context,
            d.dek_version,
            d.key_version,
            w.location,
            w.last_seen as i64
        ])?;
    }
    Ok(())
}

/// The registry's text form of an encryption context: JSON, keys sorted
/// (a `BTreeMap`), so one context always has one text.
fn context_text(context: &Context) -> String {
    serde_json::to_string(context).unwrap_or_default()
}

/// One registered data key of a master key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// Encryption context.
    pub context: Context,
    /// Data key version.
    pub dek_version: u32,
    /// Master key version wrapping it.
    pub key_version: u32,
    /// Where it lives.
    pub location: String,
    /// Unix seconds.
    pub last_seen: u64,
}

fn io(e: rusqlite::Error) -> StoreError {
    StoreError::Io(e.to_string())
}

/// Opens a connection with the store's pragmas.
pub fn connect(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(io)?;
    // Wait up to 5 s for the other connection (audit writer or key writer)
    // instead of failing with SQLITE_BUSY.
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(io)?;
    conn.execute_batch(
        // WAL: readers never block the writer; one file set per store.
        "PRAGMA journal_mode = WAL;
         -- FULL: a commit is on disk before it returns (key material, audit).
         PRAGMA synchronous = FULL;
         -- Overwrite deleted content with zeros: destroyed key versions and a
         -- zeroized root leave no sealed bytes in free pages.
         PRAGMA secure_delete = ON;",
    )
    .map_err(io)?;
    Ok(conn)
}

/// Applies pending migrations.
pub fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    conn.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);")
        .map_err(io)?;
    let current: i64 = conn
        .query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_version",
            [],
            |r| r.get(0),
        )
        .map_err(io)?;
    if current > MIGRATIONS.len() as i64 {
        return Err(StoreError::Corrupt(format!(
            "schema version {current} is newer than this tde supports ({})",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let tx = conn.transaction().map_err(io)?;
        tx.execute_batch(sql).map_err(io)?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES (?1)",
            [i as i64 + 1],
        )
        .map_err(io)?;
        tx.commit().map_err(io)?;
    }
    Ok(())
}

/// The SQLite implementation of [`ObjectStore`].
pub struct SqliteStore {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) and migrates the store at `path`.
    ///
    /// A new store file is created with mode 0600 (SQLite gives its `-wal`
    /// and `-shm` files the same mode); an existing one, or its `-wal` or
    /// `-shm`, that group or others may read or write is refused.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| StoreError::Io(format!("{}: {e}", dir.display())))?;
        }
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(StoreError::Io(format!("{}: {e}", path.display())));
            }
            _ => {}
        }
        tde_protocol::private::check(path, "key store").map_err(StoreError::Io)?;
        for suffix in ["-wal", "-shm"] {
            let mut side = path.as_os_str().to_owned();
            side.push(suffix);
            let side = PathBuf::from(side);
            if side.exists() {
                tde_protocol::private::check(&side, "key store file").map_err(StoreError::Io)?;
            }
        }
        let mut conn = connect(path)?;
        migrate(&mut conn)?;
        Ok(Self {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The registrations under master key `key`.
    pub fn registrations(&self, key: &str) -> Result<Vec<Registration>, StoreError> {
        let conn = self.conn();
        let mut st = conn
            .prepare(
                "SELECT context, dek_version, key_version, location, last_seen
                 FROM registry WHERE key = ?1 ORDER BY context, dek_version",
            )
            .map_err(io)?;
        st.query_map([key], |r| {
            Ok(Registration {
                context: serde_json::from_str(&r.get::<_, String>(0)?).unwrap_or_default(),
                dek_version: r.get(1)?,
                key_version: r.get(2)?,
                location: r.get(3)?,
                last_seen: r.get::<_, i64>(4)?.max(0) as u64,
            })
        })
        .map_err(io)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(io)
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves WAL content into the database and truncates the WAL, so old
    /// sealed copies of changed rows do not linger in it. Best effort: a
    /// busy checkpoint is retried at the next change.
    fn checkpoint(conn: &Connection) {
        let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
    }
}

impl ObjectStore for SqliteStore {
    fn meta(&self) -> Result<Option<StoreMeta>, StoreError> {
        let conn = self.conn();
        conn.query_row(
            "SELECT store_id, threshold, shares, dev, zeroized, created FROM meta WHERE id = 1",
            [],
            |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, u8>(1)?,
                    r.get::<_, u8>(2)?,
                    r.get::<_, bool>(3)?,
                    r.get::<_, bool>(4)?,
                    r.get::<_, i64>(5)?,
                ))
            },
        )
        .optional()
        .map_err(io)?
        .map(|(id, threshold, shares, dev, zeroized, created)| {
            let store_id: [u8; STORE_ID_LEN] = id
                .try_into()
                .map_err(|_| StoreError::Corrupt("store id has the wrong length".into()))?;
            Ok(StoreMeta {
                store_id,
                threshold,
                shares,
                dev,
                zeroized,
                created: u64::try_from(created).unwrap_or(0),
            })
        })
        .transpose()
    }

    fn initialize(
        &self,
        meta: &StoreMeta,
        sealed_root: &[u8],
        objects: &[StoredObject],
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(io)?;
        let exists: bool = tx
            .query_row("SELECT EXISTS (SELECT 1 FROM meta)", [], |r| r.get(0))
            .map_err(io)?;
        if exists {
            return Err(StoreError::AlreadyInitialized);
        }
        tx.execute(
            "INSERT INTO meta (id, store_id, threshold, shares, dev, zeroized, created)
             VALUES (1, ?1, ?2, ?3, ?4, 0, ?5)",
            params![
                &meta.store_id[..],
                meta.threshold,
                meta.shares,
                meta.dev,
                i64::try_from(meta.created).unwrap_or(i64::MAX)
            ],
        )
        .map_err(io)?;
        tx.execute(
            "INSERT INTO root (id, sealed) VALUES (1, ?1)",
            [sealed_root],
        )
        .map_err(io)?;
        for o in objects {
            put(&tx, o)?;
        }
        tx.commit().map_err(io)
    }

    fn sealed_root(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.conn()
            .query_row("SELECT sealed FROM root WHERE id = 1", [], |r| r.get(0))
            .optional()
            .map_err(io)
    }

    fn objects(&self) -> Result<Vec<StoredObject>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT kind, id, revision, sealed FROM objects ORDER BY kind, id")
            .map_err(io)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(StoredObject {
                    kind: r.get(0)?,
                    id: r.get(1)?,
                    revision: u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
                    blob: r.get(3)?,
                })
            })
            .map_err(io)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(io)
    }

    fn apply(&self, ops: &[StoreOp]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(io)?;
        for op in ops {
            match op {
                StoreOp::Put(o) => put(&tx, o)?,
                StoreOp::Delete { kind, id } => {
                    tx.execute(
                        "DELETE FROM objects WHERE kind = ?1 AND id = ?2",
                        params![kind, id],
                    )
                    .map_err(io)?;
                }
                StoreOp::Root(sealed) => {
                    tx.execute("UPDATE root SET sealed = ?1 WHERE id = 1", params![sealed])
                        .map_err(io)?;
                }
                StoreOp::Custody { threshold, shares } => {
                    tx.execute(
                        "UPDATE meta SET threshold = ?1, shares = ?2 WHERE id = 1",
                        params![threshold, shares],
                    )
                    .map_err(io)?;
                }
            }
        }
        tx.commit().map_err(io)?;
        Self::checkpoint(&conn);
        Ok(())
    }

    fn zeroize(&self) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(io)?;
        tx.execute("DELETE FROM root", []).map_err(io)?;
        tx.execute("DELETE FROM objects", []).map_err(io)?;
        tx.execute("DELETE FROM registry", []).map_err(io)?;
        tx.execute("UPDATE meta SET zeroized = 1", []).map_err(io)?;
        tx.commit().map_err(io)?;
        Self::checkpoint(&conn);
        // Rebuild the file so no page, free or not, keeps the old bytes.
        conn.execute_batch("VACUUM").map_err(io)?;
        Self::checkpoint(&conn);
        Ok(())
    }
}

fn put(tx: &rusqlite::Transaction<'_>, o: &StoredObject) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO objects (kind, id, revision, sealed) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (kind, id) DO UPDATE SET revision = excluded.revision, sealed = excluded.sealed",
        params![o.kind, o.id, i64::try_from(o.revision).unwrap_or(i64::MAX), o.blob],
    )
    .map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_zeroize_scrubs_the_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("tde.db");
        let s = SqliteStore::open(&path).expect("open");
        assert!(s.meta().expect("meta").is_none());
        let meta = StoreMeta {
            store_id: [7; 16],
            threshold: 3,
            shares: 5,
            dev: false,
            zeroized: false,
            created: 1,
        };
        let root = vec![0xC7u8; 60];
        let obj = StoredObject {
            kind: 1,
            id: "pg".into(),
            revision: 1,
            blob: vec![0xD9; 80],
        };
        s.initialize(&meta, &root, std::slice::from_ref(&obj))
            .expect("init");
        assert!(matches!(
            s.initialize(&meta, &root, &[]),
            Err(StoreError::AlreadyInitialized)
        ));
        assert_eq!(s.meta().expect("meta"), Some(meta));
        assert_eq!(s.objects().expect("objects"), vec![obj.clone()]);
        let obj2 = StoredObject {
            revision: 2,
            blob: vec![0xE1; 80],
            ..obj
        };
        s.apply(&[StoreOp::Put(obj2.clone())]).expect("apply");
        assert_eq!(s.objects().expect("objects"), vec![obj2]);
        drop(s);
        let s = SqliteStore::open(&path).expect("reopen");
        assert_eq!(s.sealed_root().expect("root"), Some(root.clone()));
        s.zeroize().expect("zeroize");
        assert!(s.meta().expect("meta").expect("some").zeroized);
        assert_eq!(s.sealed_root().expect("root"), None);
        drop(s);
        for f in ["tde.db", "tde.db-wal"] {
            let Ok(bytes) = std::fs::read(dir.path().join(f)) else {
                continue;
            };
            assert!(
                !bytes.windows(60).any(|w| w == &root[..]),
                "root bytes left in {f}"
            );
            assert!(
                !bytes.windows(80).any(|w| w == &[0xE1; 80][..]),
                "object bytes left in {f}"
            );
        }
    }
}
