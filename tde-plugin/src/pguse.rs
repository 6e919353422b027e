//! Whether a running PostgreSQL uses a directory: as its data directory or
//! as a tablespace's location (a `pg_tblspc` link points there). A mount
//! there that does not hold that cluster's files would hide them from it.
//!
//! Running clusters are found through `/proc`: every `postgres` process's
//! working directory is its data directory. Reading another user's
//! `/proc/PID/cwd` and `pg_tblspc` needs root (or that user); a cluster
//! that is not running, or cannot be read, is not seen.

use std::path::{Path, PathBuf};

/// A running cluster that uses a directory, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Use {
    /// A `postgres` process of the cluster.
    pub pid: u32,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// `None`: the directory is the data directory itself; else the OID of
    /// the tablespace whose location it is.
    pub tablespace_oid: Option<String>,
}

impl std::fmt::Display for Use {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.tablespace_oid {
            None => write!(
                f,
                "PostgreSQL (pid {}) runs with it as its data directory",
                self.pid
            ),
            Some(oid) => write!(
                f,
                "PostgreSQL (pid {}, data directory {}) uses it as the location of tablespace {oid} (pg_tblspc/{oid})",
                self.pid,
                self.data_dir.display()
            ),
        }
    }
}

/// The running clusters' data directories, with one pid each.
fn clusters() -> Vec<(u32, PathBuf)> {
    let mut out: Vec<(u32, PathBuf)> = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
        if !matches!(comm.trim_end(), "postgres" | "postmaster") {
            continue;
        }
        let Ok(cwd) = std::fs::read_link(p.path().join("cwd")) else {
            continue;
        };
        if !out.iter().any(|(_, d)| *d == cwd) {
            out.push((pid, cwd));
        }
    }
    out
}

/// How running PostgreSQL clusters use `dir`, if they do.
pub fn uses(dir: &Path) -> Vec<Use> {
    let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let same =
        |p: &Path| p == dir || p == canonical || p.canonicalize().is_ok_and(|c| c == canonical);
    let mut out = Vec::new();
    for (pid, data_dir) in clusters() {
        if same(&data_dir) {
            out.push(Use {
                pid,
                data_dir: data_dir.clone(),
                tablespace_oid: None,
            });
        }
        let Ok(links) = std::fs::read_dir(data_dir.join("pg_tblspc")) else {
            continue;
        };
        for l in links.flatten() {
            if let Ok(target) = std::fs::read_link(l.path())
                && same(&target)
            {
                out.push(Use {
                    pid,
                    data_dir: data_dir.clone(),
                    tablespace_oid: Some(l.file_name().to_string_lossy().into_owned()),
                });
            }
        }
    }
    out
}

/// Whether `backing` holds what the use needs, so that mounting it shows
/// the cluster its own files (a remount after a crash): `PG_VERSION` for a
/// data directory, a catalog version directory (`PG_15_202209061`) for a
/// tablespace. File names are kept in the clear in the backing directory.
pub fn backing_fits(u: &Use, backing: &Path) -> bool {
    match u.tablespace_oid {
        None => backing.join("PG_VERSION").is_file(),
        Some(_) => std::fs::read_dir(backing).is_ok_and(|d| {
            d.flatten().any(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n.strip_prefix("PG_").is_some_and(|rest| {
                    let mut parts = rest.split('_');
                    matches!((parts.next(), parts.next(), parts.next()),
                        (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty()
                            && a.bytes().all(|c| c.is_ascii_digit())
                            && b.bytes().all(|c| c.is_ascii_digit()))
                }) && e.path().is_dir()
            })
        }),
    }
}
