//! `tde-plugin`: the database side of tde.
//!
//! PostgreSQL's community build has no storage hook, so the plugin attaches
//! beneath it: a FUSE file system whose backing directory holds only
//! ciphertext. This crate holds the parts that do not depend on the engine.
//!
//! # Layout
//! - [`page`]: the on-disk format of a backing file and the page cipher
//!   (AES-256-GCM-SIV per 8 KiB block). Pure: no I/O.
//! - [`keyfile`]: the wrapped data keys of a tablespace, in its backing
//!   directory.
//! - [`keys`]: the one owner of a tablespace's keys (key file, page cipher,
//!   the order in which key-file changes become durable).
//! - [`control`]: the mount's control socket (`tde rekey`, `tde status`).
//! - [`fs`]: the FUSE file system that encrypts a backing directory (inode
//!   table, block engine, FUSE glue).
//! - [`fusermount`]: mounting and unmounting as a normal user through the
//!   setuid `fusermount3` helper.
//! - [`failpoint`]: failure injection for tests (debug builds only).
//! - [`fuzz`]: fuzzing harnesses of the parsers of untrusted bytes.
//! - [`mount`]: `tde mount`: unwrap the DEK, mount, serve, unmount.
//! - [`rekey`]: online re-encryption of every block under a new data key
//!   version, throttled, checkpointed, resumable.
//! - [`rotation`]: master-key rotation: rewrap the key file, register with
//!   the sidecar's registry, follow new primary versions.
#![forbid(unsafe_code)]

pub mod control;
pub mod failpoint;
pub mod fs;
pub mod fusermount;
pub mod fuzz;
pub mod keyfile;
pub mod keys;
pub mod mount;
pub mod page;
pub mod pguse;
pub mod rekey;
pub mod rotation;
