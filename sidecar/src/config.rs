//! Configuration: defaults, then a TOML file, then `TDE_` environment
//! variables (`__` separates levels: `TDE_LOG__FORMAT=json`).

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::policy::ClientPolicy;

/// Environment variables read by the CLI, not configuration keys.
const CLI_ENV: &[&str] = &[
    "config",
    "password",
    "new_password",
    "operator",
    "failpoint",
];

/// The daemon's configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Directory for the store, sockets and dev files (created 0700).
    pub data_dir: PathBuf,
    /// Key store.
    pub store: StoreConfig,
    /// Socket for database clients.
    pub data_socket: SocketConfig,
    /// Socket for operators.
    pub admin_socket: SocketConfig,
    /// Logging.
    pub log: LogConfig,
    /// Tamper response.
    pub tamper: TamperConfig,
    /// Memory protection.
    pub memory: MemoryConfig,
    /// Connection limits.
    pub limits: LimitsConfig,
    /// What seal does to running mounts.
    pub mounts: MountsConfig,
    /// Dual control.
    pub quorum: QuorumConfig,
    /// Audit evidence: checkpoints, retention, sinks.
    pub audit: AuditConfig,
    /// Metrics and health over HTTP (off by default).
    pub metrics: MetricsConfig,
    /// Auto-unseal (off by default: the shares unseal).
    pub seal: SealConfig,
    /// Data-socket client policies.
    pub clients: Vec<ClientPolicy>,
}

/// `[quorum]`: dual control for destructive operations, as CloudHSM's
/// quorum authentication: key destruction, zeroization (of an unsealed
/// HSM) and operator removal wait for other crypto officers' approvals.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct QuorumConfig {
    /// Approvals by crypto officers other than the requester; 0 turns dual
    /// control off.
    pub approvals: u32,
    /// How long a request waits for them, seconds.
    pub timeout_seconds: u64,
}

/// `[audit]`: checkpoints signed by the HSM's audit key (see
/// `docs/COMPLIANCE.md`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// The node id in every record and checkpoint; empty: the host name.
    pub node: String,
    /// A signed checkpoint after this many records.
    pub checkpoint_records: u64,
    /// ... and at least this often (seconds) while records are written.
    pub checkpoint_seconds: u64,
    /// Prune exported records older than this (`365d`, `90d`, `12h`) by
    /// itself; empty: keep them until `tde audit prune`.
    pub retention: String,
    /// Successful `status` reads and `watch_key` long polls: `record` (one
    /// record each) or `summarize` (counted, one `routine_reads` record per
    /// peer per minute).
    pub routine_reads: String,
    /// Successful PKCS#11 signatures, verifications, encryptions and
    /// decryptions: `record` (one record each, durable before the answer)
    /// or `summarize` (counted per process, key, operation and mechanism,
    /// one record per second with the count). Every other key use, and
    /// every refusal, is recorded one by one.
    pub pkcs11_key_use: String,
    /// A JSON-lines file sink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileSinkConfig>,
    /// A syslog sink (RFC 5424 over a local datagram socket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syslog: Option<SyslogSinkConfig>,
}

/// `[audit.file]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    /// The file (created 0600; reopened on SIGHUP for logrotate).
    pub path: PathBuf,
}

/// `[audit.syslog]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SyslogSinkConfig {
    /// The local syslog socket.
    #[serde(default = "default_syslog_socket")]
    pub socket: PathBuf,
    /// `authpriv` (default), `auth`, `daemon`, `user`, `local0`..`local7`.
    #[serde(default = "default_syslog_facility")]
    pub facility: String,
}

fn default_syslog_socket() -> PathBuf {
    PathBuf::from("/dev/log")
}

fn default_syslog_facility() -> String {
    "authpriv".into()
}

impl AuditConfig {
    /// `retention` in milliseconds (0: none).
    pub fn retention_ms(&self) -> Result<u64, String> {
        if self.retention.is_empty() {
            return Ok(0);
        }
        humantime::parse_duration(&self.retention)
            .map(|d| d.as_millis() as u64)
            .map_err(|e| {
                format!(
                    "audit.retention {:?}: {e} (like 365d or 12h)",
                    self.retention
                )
            })
    }

    /// The node id: `node`, or the host name.
    pub fn node_id(&self) -> String {
        if !self.node.is_empty() {
            return self.node.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into())
    }
}

/// `[store]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// SQLite file; default `<data_dir>/tde.db`.
    pub path: Option<PathBuf>,
}

/// `[data_socket]` and `[admin_socket]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SocketConfig {
    /// Path; default in `data_dir`.
    pub path: Option<PathBuf>,
    /// File mode, octal string.
    pub mode: String,
    /// Group owning the socket (name or number).
    pub group: Option<String>,
}

/// `[log]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: String,
    /// A tracing filter, e.g. `info` or `tde_sidecar=debug`.
    pub level: String,
}

/// `[tamper]`: what triggers zeroization besides `tde zeroize`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct TamperConfig {
    /// Zeroize when an operator is locked by failed logins.
    pub zeroize_on_lockout: bool,
    /// Zeroize when a store object fails authentication at unseal.
    pub zeroize_on_store_tamper: bool,
}

/// `[memory]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// `auto` (lock if the memlock limit allows), `required` (refuse to
    /// start without), or `off`.
    pub lock: String,
}

/// `[limits]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Concurrent connections per socket, all peers together.
    pub max_connections: usize,
    /// Concurrent connections per socket from one uid.
    pub max_connections_per_uid: usize,
    /// Seconds a connection may stay open without sending a request before
    /// it is closed (a `watch_key` in progress is not idle).
    pub idle_timeout_seconds: u64,
    /// Concurrent `watch_key` requests from one uid.
    pub max_watches_per_uid: usize,
    /// Threads that run requests (each waits for its audit record to be
    /// durable); requests beyond them queue. Fixed at start.
    pub worker_threads: usize,
    /// Audit records per second, per uid, for refused requests; refusals
    /// beyond it are still refused, and counted in one
    /// `refusals_not_recorded` record per uid per second. 0: no limit.
    pub refused_records_per_second: u32,
    /// Seconds between checks for scheduled key destruction.
    pub destroy_check_seconds: u64,
    /// The shortest automatic rotation period a key may get, in seconds
    /// (default one hour, as Vault's transit engine; lower it only to try
    /// rotation out).
    pub min_rotation_seconds: u64,
}

/// `[metrics]`: `/metrics` and `/health` over HTTP.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address and port, like `127.0.0.1:9464`; empty: no listener.
    pub listen: String,
    /// A PEM certificate chain: served over TLS (with `tls_key`).
    pub tls_cert: Option<PathBuf>,
    /// The certificate's PEM private key.
    pub tls_key: Option<PathBuf>,
}

/// `[seal]`: auto-unseal with a key held by another device (see
/// `crate::autounseal`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct SealConfig {
    /// `""` (shares only), `pkcs11` or `tpm2`.
    pub r#type: String,
    /// pkcs11: the token's PKCS#11 module.
    pub module: PathBuf,
    /// pkcs11: the token's label.
    pub token_label: String,
    /// pkcs11: the label of the AES-256 key that wraps the unseal key.
    pub key_label: String,
    /// pkcs11: a file holding the token user's PIN.
    pub pin_file: PathBuf,
    /// pkcs11: make the key in the token (non-extractable) if it is not
    /// there yet.
    pub generate_key: bool,
    /// tpm2: the TPM's TCTI (`device:/dev/tpmrm0`, `swtpm:port=2321`).
    pub tcti: String,
    /// tpm2: PCRs the sealed key is bound to (`sha256:0,7`); empty: none.
    pub pcrs: String,
}

impl Default for SealConfig {
    fn default() -> Self {
        Self {
            r#type: String::new(),
            module: PathBuf::new(),
            token_label: String::new(),
            key_label: "tde-unseal".into(),
            pin_file: PathBuf::new(),
            generate_key: true,
            tcti: "device:/dev/tpmrm0".into(),
            pcrs: String::new(),
        }
    }
}

/// `[mounts]`: the sidecar's word to the `tde mount`s attached to it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MountsConfig {
    /// What `tde seal` does to running mounts: `keep` (availability: they
    /// go on with the data keys they hold, as when the sidecar is
    /// unreachable) or `wipe` (containment: they wipe their data keys and
    /// fail all I/O, as after zeroization). Zeroization always wipes.
    pub on_seal: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("/var/lib/tde"),
            store: StoreConfig::default(),
            data_socket: SocketConfig {
                path: None,
                mode: "0660".into(),
                group: None,
            },
            admin_socket: SocketConfig {
                path: None,
                mode: "0600".into(),
                group: None,
            },
            log: LogConfig {
                format: "text".into(),
                level: "info".into(),
            },
            tamper: TamperConfig::default(),
            memory: MemoryConfig {
                lock: "auto".into(),
            },
            limits: LimitsConfig {
                max_connections: 4096,
                max_connections_per_uid: 1024,
                idle_timeout_seconds: 120,
                max_watches_per_uid: 512,
                worker_threads: 64,
                refused_records_per_second: 100,
                destroy_check_seconds: 60,
                min_rotation_seconds: 3600,
            },
            mounts: MountsConfig {
                on_seal: "keep".into(),
            },
            quorum: QuorumConfig {
                approvals: 0,
                timeout_seconds: 900,
            },
            audit: AuditConfig {
                node: String::new(),
                checkpoint_records: 10_000,
                checkpoint_seconds: 60,
                retention: String::new(),
                routine_reads: "record".into(),
                pkcs11_key_use: "record".into(),
                file: None,
                syslog: None,
            },
            metrics: MetricsConfig::default(),
            seal: SealConfig::default(),
            clients: Vec::new(),
        }
    }
}

impl Config {
    /// Loads defaults, then `file` (if given), then `TDE_` variables.
    pub fn load(file: Option<&Path>) -> Result<Config, String> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(f) = file {
            if !f.exists() {
                return Err(format!("config file {} does not exist", f.display()));
            }
            fig = fig.merge(Toml::file(f));
        }
        let known = Config::known_keys();
        fig = fig.merge(
            Env::prefixed("TDE_")
                .split("__")
                .filter(move |k| is_known(&known, k.as_str())),
        );
        let cfg: Config = fig
            .extract()
            .map_err(|e| format!("configuration error: {e}"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// `TDE_` variables that are neither configuration keys nor read by the
    /// CLI: ignored (as Vault ignores unknown `VAULT_` variables), and
    /// named so that a typo is seen.
    pub fn unknown_env() -> Vec<String> {
        let known = Config::known_keys();
        let mut out: Vec<String> = std::env::vars_os()
            .filter_map(|(k, _)| k.into_string().ok())
            .filter_map(|k| {
                let key = k
                    .strip_prefix("TDE_")?
                    .to_ascii_lowercase()
                    .replace("__", ".");
                (!CLI_ENV.contains(&key.as_str()) && !is_known(&known, &key)).then_some(k)
            })
            .collect();
        out.sort();
        out
    }

    /// Every configuration key, dotted (`log.format`).
    fn known_keys() -> Vec<String> {
        fn walk(prefix: &str, v: &serde_json::Value, out: &mut Vec<String>) {
            if let serde_json::Value::Object(m) = v {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                    out.push(key);
                }
            }
        }
        let mut out = Vec::new();
        if let Ok(v) = serde_json::to_value(Config::default()) {
            walk("", &v, &mut out);
        }
        out
    }

    /// Checks values that types cannot.
    pub fn validate(&self) -> Result<(), String> {
        for s in [&self.data_socket, &self.admin_socket] {
            parse_mode(&s.mode)?;
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(format!(
                "log.format must be text or json, not {:?}",
                self.log.format
            ));
        }
        if !matches!(self.memory.lock.as_str(), "auto" | "required" | "off") {
            return Err(format!(
                "memory.lock must be auto, required or off, not {:?}",
                self.memory.lock
            ));
        }
        if self.quorum.approvals > 0 && self.quorum.timeout_seconds == 0 {
            return Err("quorum.timeout_seconds must be above 0".into());
        }
        if !matches!(self.mounts.on_seal.as_str(), "keep" | "wipe") {
            return Err(format!(
                "mounts.on_seal must be keep or wipe, not {:?}",
                self.mounts.on_seal
            ));
        }
        if self.audit.checkpoint_records == 0 || self.audit.checkpoint_seconds == 0 {
            return Err(
                "audit.checkpoint_records and audit.checkpoint_seconds must be above 0".into(),
            );
        }
        if let Some(s) = &self.audit.syslog
            && crate::audit::sink::facility(&s.facility).is_none()
        {
            return Err(format!(
                "audit.syslog.facility {:?} is not auth, authpriv, daemon, user or local0..local7",
                s.facility
            ));
        }
        self.audit.retention_ms()?;
        if !matches!(self.audit.routine_reads.as_str(), "record" | "summarize") {
            return Err(format!(
                "audit.routine_reads must be record or summarize, not {:?}",
                self.audit.routine_reads
            ));
        }
        if !matches!(self.audit.pkcs11_key_use.as_str(), "record" | "summarize") {
            return Err(format!(
                "audit.pkcs11_key_use must be record or summarize, not {:?}",
                self.audit.pkcs11_key_use
            ));
        }
        if self.audit.node.len() > 255 || self.audit.node.chars().any(char::is_control) {
            return Err(
                "audit.node must be at most 255 characters, none of them control characters".into(),
            );
        }
        if !self.metrics.listen.is_empty()
            && self.metrics.listen.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(format!(
                "metrics.listen {:?} is not an address and port like 127.0.0.1:9464",
                self.metrics.listen
            ));
        }
        match self.seal.r#type.as_str() {
            "" => {}
            "pkcs11" => {
                if self.seal.module.as_os_str().is_empty()
                    || self.seal.token_label.is_empty()
                    || self.seal.key_label.is_empty()
                    || self.seal.pin_file.as_os_str().is_empty()
                {
                    return Err(
                        "[seal] type = \"pkcs11\" needs module, token_label, key_label and pin_file"
                            .into(),
                    );
                }
            }
            "tpm2" => {
                if self.seal.tcti.is_empty() {
                    return Err("[seal] type = \"tpm2\" needs tcti".into());
                }
            }
            other => {
                return Err(format!(
                    "seal.type must be empty, pkcs11 or tpm2, not {other:?}"
                ));
            }
        }
        if self.metrics.tls_cert.is_some() != self.metrics.tls_key.is_some() {
            return Err("metrics.tls_cert and metrics.tls_key go together".into());
        }
        for c in &self.clients {
            c.validate()?;
        }
        Ok(())
    }

    /// The SQLite file.
    pub fn store_path(&self) -> PathBuf {
        self.store
            .path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("tde.db"))
    }

    /// The data socket path.
    pub fn data_socket_path(&self) -> PathBuf {
        self.data_socket
            .path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("data.sock"))
    }

    /// The configured audit sinks.
    pub fn audit_sinks(&self) -> Vec<crate::audit::sink::SinkKind> {
        use crate::audit::sink::{SinkKind, facility};
        let mut out = Vec::new();
        if let Some(f) = &self.audit.file {
            out.push(SinkKind::File(f.path.clone()));
        }
        if let Some(s) = &self.audit.syslog {
            out.push(SinkKind::Syslog {
                socket: s.socket.clone(),
                facility: facility(&s.facility).unwrap_or(10),
                app_name: "tde".into(),
                // RFC 5424 HOSTNAME: printable ASCII, no spaces.
                hostname: self
                    .audit
                    .node_id()
                    .chars()
                    .map(|c| if c.is_ascii_graphic() { c } else { '-' })
                    .collect(),
            });
        }
        out
    }

    /// The admin socket path.
    pub fn admin_socket_path(&self) -> PathBuf {
        self.admin_socket
            .path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("admin.sock"))
    }

    /// The dev-mode share file.
    pub fn dev_share_path(&self) -> PathBuf {
        self.data_dir.join("dev-unseal.share")
    }

    /// The dev-mode officer password file.
    pub fn dev_password_path(&self) -> PathBuf {
        self.data_dir.join("dev-admin.password")
    }

    /// The effective configuration as TOML, with credentials in URLs
    /// redacted.
    pub fn to_redacted_toml(&self) -> String {
        let text = toml_string(self);
        text.lines().map(redact_line).collect::<Vec<_>>().join("\n") + "\n"
    }

    /// [`Config::to_redacted_toml`] as JSON (`tde serve --print-config
    /// --json`): the same keys and values, the same redaction.
    pub fn to_redacted_json(&self) -> serde_json::Value {
        toml::from_str::<toml::Value>(&self.to_redacted_toml())
            .ok()
            .and_then(|v| serde_json::to_value(v).ok())
            .unwrap_or(serde_json::Value::Null)
    }
}

/// Whether an environment key (lower-case, `.`-separated) names a
/// configuration key (a leaf, or a table given whole).
fn is_known(known: &[String], key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    known.contains(&key)
}

fn toml_string(cfg: &Config) -> String {
    toml::to_string(cfg).unwrap_or_else(|e| format!("# the configuration cannot be shown: {e}\n"))
}

/// Replaces `user:password@` in URLs with `user:***@`.
pub fn redact_line(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c == '/' || c == '"' || c.is_whitespace())
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match (authority.rfind('@'), authority.find(':')) {
            (Some(at), Some(colon)) if colon < at => {
                out.push_str(&authority[..colon]);
                out.push_str(":***");
                out.push_str(&authority[at..]);
            }
            _ => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Parses an octal mode string like `0660`.
pub fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("socket mode {s:?} is not an octal file mode like \"0660\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_url_passwords() {
        assert_eq!(
            redact_line(r#"url = "postgres://tde:s3cret@db:5432/keys""#),
            r#"url = "postgres://tde:***@db:5432/keys""#
        );
        assert_eq!(
            redact_line("path = \"/var/lib/tde\""),
            "path = \"/var/lib/tde\""
        );
    }

    #[test]
    fn file_then_env() {
        let dir = tempfile::tempdir().expect("tmp");
        let f = dir.path().join("tde.toml");
        std::fs::write(
            &f,
            "data_dir = \"/tmp/x\"\n[log]\nformat = \"json\"\n[[clients]]\nname = \"pg\"\nuids = [101]\nkeys = [\"*\"]\noperations = [\"decrypt\"]\n",
        )
        .expect("write");
        let c = Config::load(Some(&f)).expect("load");
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.log.format, "json");
        assert_eq!(c.clients[0].uids, vec![101]);
        assert_eq!(c.store_path(), PathBuf::from("/tmp/x/tde.db"));
        let shown = c.to_redacted_toml();
        assert!(shown.contains("[[clients]]"), "{shown}");
        // What is shown loads back to the same configuration.
        let again = dir.path().join("shown.toml");
        std::fs::write(&again, &shown).expect("write");
        assert_eq!(Config::load(Some(&again)).expect("reload"), c, "{shown}");
        std::fs::write(&f, "data_dir = 5\n").expect("write");
        assert!(Config::load(Some(&f)).is_err());
        std::fs::write(&f, "[data_socket]\nmode = \"999\"\n").expect("write");
        assert!(Config::load(Some(&f)).is_err());
        std::fs::write(&f, "[audit]\npkcs11_key_use = \"summarize\"\n").expect("write");
        assert_eq!(
            Config::load(Some(&f))
                .expect("summarize")
                .audit
                .pkcs11_key_use,
            "summarize"
        );
        std::fs::write(&f, "[audit]\npkcs11_key_use = \"some\"\n").expect("write");
        let e = Config::load(Some(&f)).expect_err("not a choice");
        assert!(e.to_string().contains("audit.pkcs11_key_use"), "{e}");
        assert!(Config::load(Some(&dir.path().join("missing.toml"))).is_err());
    }
}
