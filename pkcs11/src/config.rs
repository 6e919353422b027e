//! Which sidecars the module offers as tokens: `$TDE_PKCS11_CONFIG`, else
//! `/etc/tde/pkcs11.toml`, else one slot on `$TDE_PKCS11_SOCKET` or the
//! sidecar's default data socket.

use std::path::PathBuf;

use serde::Deserialize;

/// The default config file.
pub const DEFAULT_PATH: &str = "/etc/tde/pkcs11.toml";
/// The sidecar's default data socket.
pub const DEFAULT_SOCKET: &str = "/var/lib/tde/data.sock";
/// Slots at most.
pub const MAX_SLOTS: usize = 16;

/// One slot: a sidecar's data socket.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotConfig {
    /// The sidecar's data socket.
    pub socket: PathBuf,
    /// The token label (at most 32 bytes; `tde` if unset).
    #[serde(default)]
    pub label: Option<String>,
}

/// The module's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The slots, in slot id order from 0.
    #[serde(rename = "slot")]
    pub slots: Vec<SlotConfig>,
}

impl Config {
    /// Reads the configuration (see the module docs).
    pub fn load() -> Result<Config, String> {
        let file = std::env::var_os("TDE_PKCS11_CONFIG").map(PathBuf::from);
        let path = file.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_PATH));
        match std::fs::read_to_string(&path) {
            Ok(text) => Config::parse(&text).map_err(|e| format!("{}: {e}", path.display())),
            // A named file must exist; the default one may not.
            Err(e) if file.is_some() => Err(format!("{}: {e}", path.display())),
            Err(_) => Ok(Config {
                slots: vec![SlotConfig {
                    socket: std::env::var_os("TDE_PKCS11_SOCKET")
                        .map_or_else(|| PathBuf::from(DEFAULT_SOCKET), PathBuf::from),
                    label: None,
                }],
            }),
        }
    }

    /// Parses a configuration file's text.
    pub fn parse(text: &str) -> Result<Config, String> {
        let c: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        if c.slots.is_empty() || c.slots.len() > MAX_SLOTS {
            return Err(format!("between 1 and {MAX_SLOTS} [[slot]] tables"));
        }
        for s in &c.slots {
            if s.label.as_ref().is_some_and(|l| l.len() > 32) {
                return Err("a token label is at most 32 bytes".into());
            }
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_parse_and_bad_files_are_refused() {
        let c = Config::parse(
            "[[slot]]\nsocket = \"/a.sock\"\nlabel = \"oracle\"\n[[slot]]\nsocket = \"/b.sock\"\n",
        )
        .expect("parse");
        assert_eq!(c.slots.len(), 2);
        assert_eq!(c.slots[0].label.as_deref(), Some("oracle"));
        assert_eq!(c.slots[1].socket, PathBuf::from("/b.sock"));
        assert!(Config::parse("").is_err());
        assert!(
            Config::parse(
                "[[slot]]\nsocket = \"/a\"\nlabel = \"0123456789012345678901234567890123\"\n"
            )
            .is_err()
        );
        assert!(Config::parse("[[slot]]\nsocket = \"/a\"\nfoo = 1\n").is_err());
    }
}
