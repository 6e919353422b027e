//! `tde-plugin`: the database side of tde.
//!
//! PostgreSQL's community build has no storage hook, so the plugin attaches
//! beneath it: a FUSE file system whose backing directory holds only
//! ciphertext. This crate holds the parts that do not depend on the engine.
//!
//! # Layout
//! - [`page`]: the on-disk format of a backing file and the page cipher
//!   (AES-256-GCM-SIV per 8 KiB block). Pure: no I/O.
#![forbid(unsafe_code)]

pub mod page;
