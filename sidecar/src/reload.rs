//! Reloading the configuration (SIGHUP or `tde reload`), as nginx and Vault
//! do: the file and the `TDE_` variables are read again; what can change
//! live changes, what cannot is named; a configuration that does not load
//! (a parse error, an unknown user or group) changes nothing.

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use crate::config::Config;
use crate::handler::Service;
use crate::policy::Policies;

/// Sets the log filter; `Err` says why it cannot.
pub type SetLogLevel = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// How the daemon re-reads its configuration.
pub struct Reload {
    /// The configuration file it started with.
    pub file: Option<PathBuf>,
    /// What the command line did to the loaded configuration at start
    /// (`tde serve --dev`), done again to every reloaded one.
    pub adjust: Box<dyn Fn(&mut Config) + Send + Sync>,
    /// Sets the log filter (`log.level`); `Err` says why it cannot.
    pub set_log_level: SetLogLevel,
}

impl std::fmt::Debug for Reload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reload").field("file", &self.file).finish()
    }
}

/// The configuration in force, and how to read the next one.
#[derive(Debug)]
pub struct Live {
    how: Reload,
    current: Mutex<Config>,
}

impl Live {
    /// `current` is the configuration the daemon started with.
    pub fn new(how: Reload, current: Config) -> Live {
        Live {
            how,
            current: Mutex::new(current),
        }
    }

    /// Reads the configuration again and applies what can change live to
    /// `svc`. Gives one line per change (`; `-separated), or why nothing
    /// changed.
    pub fn reload(&self, svc: &Service) -> Result<String, String> {
        let mut new = Config::load(self.how.file.as_deref())?;
        (self.how.adjust)(&mut new);
        new.validate()?;
        // Users and groups are looked up again even when the text is the
        // same: a group's members may have changed.
        let policies = Policies::resolve(&new.clients)?;
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if new.log.level != cur.log.level {
            (self.how.set_log_level)(&new.log.level)
                .map_err(|e| format!("log.level {:?}: {e}", new.log.level))?;
        }
        // Nothing fails from here on.
        let mut changes = Vec::new();
        if new.log.level != cur.log.level {
            changes.push(format!(
                "log.level {:?} -> {:?}",
                cur.log.level, new.log.level
            ));
        }
        if new.clients != cur.clients {
            changes.push(format!(
                "clients: {} policies ({})",
                new.clients.len(),
                new.clients
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        *svc.clients.write().unwrap_or_else(|p| p.into_inner()) = std::sync::Arc::new(policies);
        let (o, n) = (&cur.limits, &new.limits);
        let mut limit = |name: &str, old: u64, new: u64| {
            if old != new {
                changes.push(format!("limits.{name} {old} -> {new}"));
            }
        };
        limit(
            "refused_records_per_second",
            o.refused_records_per_second.into(),
            n.refused_records_per_second.into(),
        );
        limit(
            "max_watches_per_uid",
            o.max_watches_per_uid as u64,
            n.max_watches_per_uid as u64,
        );
        limit(
            "min_rotation_seconds",
            o.min_rotation_seconds,
            n.min_rotation_seconds,
        );
        limit(
            "idle_timeout_seconds",
            o.idle_timeout_seconds,
            n.idle_timeout_seconds,
        );
        svc.refusals.set_rate(n.refused_records_per_second);
        svc.watches.set_max(n.max_watches_per_uid);
        svc.min_rotation_seconds
            .store(n.min_rotation_seconds, Ordering::Relaxed);
        svc.idle_timeout_seconds
            .store(n.idle_timeout_seconds, Ordering::Relaxed);
        if new.mounts.on_seal != cur.mounts.on_seal {
            changes.push(format!(
                "mounts.on_seal {:?} -> {:?}",
                cur.mounts.on_seal, new.mounts.on_seal
            ));
        }
        svc.revoke_on_seal
            .store(new.mounts.on_seal == "wipe", Ordering::SeqCst);
        if new.quorum != cur.quorum {
            changes.push(format!(
                "quorum: {} approvals within {} s (was {} within {} s)",
                new.quorum.approvals,
                new.quorum.timeout_seconds,
                cur.quorum.approvals,
                cur.quorum.timeout_seconds
            ));
        }
        svc.quorum_approvals
            .store(new.quorum.approvals, Ordering::SeqCst);
        svc.quorum_timeout_seconds
            .store(new.quorum.timeout_seconds, Ordering::SeqCst);
        let (o, n) = (&cur.audit, &new.audit);
        if o.retention != n.retention {
            changes.push(format!(
                "audit.retention {:?} -> {:?}",
                o.retention, n.retention
            ));
        }
        if o.routine_reads != n.routine_reads {
            changes.push(format!(
                "audit.routine_reads {:?} -> {:?}",
                o.routine_reads, n.routine_reads
            ));
        }
        if o.pkcs11_key_use != n.pkcs11_key_use {
            changes.push(format!(
                "audit.pkcs11_key_use {:?} -> {:?}",
                o.pkcs11_key_use, n.pkcs11_key_use
            ));
        }
        svc.audit_retention_ms
            .store(n.retention_ms().unwrap_or(0), Ordering::SeqCst);
        svc.summarize_routine
            .store(n.routine_reads == "summarize", Ordering::SeqCst);
        svc.key_uses.set(n.pkcs11_key_use == "summarize");

        // The rest is fixed at start: keep it as it runs, and say so.
        let mut fixed = Vec::new();
        let mut kept = new.clone();
        macro_rules! fixed {
            ($($field:ident).+) => {
                if kept.$($field).+ != cur.$($field).+ {
                    fixed.push(stringify!($($field).+).replace(' ', ""));
                    kept.$($field).+ = cur.$($field).+.clone();
                }
            };
        }
        fixed!(data_dir);
        fixed!(store);
        fixed!(data_socket);
        fixed!(admin_socket);
        fixed!(log.format);
        fixed!(tamper);
        fixed!(memory);
        fixed!(limits.max_connections);
        fixed!(limits.max_connections_per_uid);
        fixed!(limits.worker_threads);
        fixed!(limits.destroy_check_seconds);
        fixed!(audit.node);
        fixed!(audit.checkpoint_records);
        fixed!(audit.checkpoint_seconds);
        fixed!(audit.file);
        fixed!(audit.syslog);
        fixed!(metrics);
        fixed!(seal);
        // The same certificate files, read again (a renewed certificate).
        match svc.metrics.reload_tls() {
            Some(Ok(())) => changes.push("metrics TLS certificate read again".into()),
            Some(Err(e)) => changes.push(format!(
                "metrics TLS certificate not read again, the old one stays: {e}"
            )),
            None => {}
        }
        if !fixed.is_empty() {
            changes.push(format!("not applied until a restart: {}", fixed.join(", ")));
        }
        *cur = kept;
        Ok(if changes.is_empty() {
            "no changes".to_string()
        } else {
            changes.join("; ")
        })
    }
}
