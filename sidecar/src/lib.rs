//! `tde-sidecar`: the daemon that serves the HSM to database clients and
//! operators over Unix sockets, with a SQLite key store and an audit chain.
//!
//! # Layout
//! - [`server`]: listeners, connections, graceful shutdown, scheduler.
//! - [`handler`]: authorization, HSM calls, audit records, error mapping.
//! - [`policy`]: data-socket client policies (peer uid/gid, keys, contexts).
//! - [`reload`]: SIGHUP and `tde reload`: what changes live.
//! - [`audit`]: the hash-chained audit log with group commit.
//! - [`store`]: the SQLite key store and its migrations.
//! - [`config`]: figment configuration (TOML + `TDE_` environment).
//! - [`custodian`]: unseal shares encrypted to custodians' OpenPGP keys.
//! - [`autounseal`]: the unseal key wrapped by a PKCS#11 token or a TPM.
//! - [`sys`]: process hardening (no core dumps, mlock).
//! - [`notify`]: readiness and status for the service manager (sd_notify).
//! - [`metrics`]: `/metrics` (OpenMetrics) and `/health` over HTTP.
#![forbid(unsafe_code)]

pub mod audit;
pub mod autounseal;
pub mod config;
pub mod custodian;
pub mod handler;
pub mod metrics;
pub mod notify;
pub mod policy;
pub mod reload;
pub mod server;
pub mod store;
pub mod sys;

pub use config::Config;
