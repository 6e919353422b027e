//! Client policies for the data socket: which peers (by kernel uid/gid) may
//! use which master keys, for which operations, with which encryption
//! contexts.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Data-socket operations a policy can grant.
pub const DATA_OPERATIONS: &[&str] = &[
    "generate_data_key",
    "decrypt",
    "re_encrypt",
    "generate_random",
];

/// One client policy (`[[clients]]` in the config).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClientPolicy {
    /// Name shown in audit records.
    pub name: String,
    /// Peer uids this policy applies to.
    #[serde(default)]
    pub uids: Vec<u32>,
    /// Peer gids this policy applies to.
    #[serde(default)]
    pub gids: Vec<u32>,
    /// Master key name patterns (`*` and `?` wildcards).
    #[serde(default)]
    pub keys: Vec<String>,
    /// Operations allowed (see [`DATA_OPERATIONS`]).
    #[serde(default)]
    pub operations: Vec<String>,
    /// Required context entries: key to value pattern. Every entry must be
    /// present in the request's context and match; other entries are free.
    #[serde(default)]
    pub context: BTreeMap<String, String>,
}

impl ClientPolicy {
    /// Checks the policy itself.
    pub fn validate(&self) -> Result<(), String> {
        if self.uids.is_empty() && self.gids.is_empty() {
            return Err(format!("client {:?} names no uids or gids", self.name));
        }
        if let Some(op) = self
            .operations
            .iter()
            .find(|o| !DATA_OPERATIONS.contains(&o.as_str()))
        {
            return Err(format!(
                "client {:?}: unknown operation {op:?} (use {})",
                self.name,
                DATA_OPERATIONS.join(", ")
            ));
        }
        Ok(())
    }

    /// Whether the policy covers a peer.
    pub fn matches_peer(&self, uid: u32, gid: u32) -> bool {
        self.uids.contains(&uid) || self.gids.contains(&gid)
    }

    /// Whether `op` on `key` is allowed, whatever the context (for requests
    /// that carry none); `Err` says why not.
    pub fn allows_key(&self, op: &str, key: &str) -> Result<(), String> {
        self.allows_op_key(op, Some(key))
    }

    /// The operation and key checks of [`ClientPolicy::allows`].
    fn allows_op_key(&self, op: &str, key: Option<&str>) -> Result<(), String> {
        if !self.operations.iter().any(|o| o == op) {
            return Err(format!("client {:?} may not call {op}", self.name));
        }
        if let Some(key) = key
            && !self.keys.iter().any(|p| glob(p, key))
        {
            return Err(format!(
                "client {:?} may not use master key {key:?}",
                self.name
            ));
        }
        Ok(())
    }

    /// Whether `op` on `key` with `context` is allowed; `Err` says why not.
    pub fn allows(
        &self,
        op: &str,
        key: Option<&str>,
        context: &BTreeMap<String, String>,
    ) -> Result<(), String> {
        self.allows_op_key(op, key)?;
        for (k, pattern) in &self.context {
            match context.get(k) {
                Some(v) if glob(pattern, v) => {}
                _ => {
                    return Err(format!(
                        "client {:?} requires encryption context {k:?} matching {pattern:?}",
                        self.name
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The first policy covering a peer.
pub fn find(policies: &[ClientPolicy], uid: u32, gid: u32) -> Option<&ClientPolicy> {
    policies.iter().find(|p| p.matches_peer(uid, gid))
}

/// Glob match with `*` (any run) and `?` (one character), no escapes
/// (the `wildmatch` crate).
pub fn glob(pattern: &str, text: &str) -> bool {
    wildmatch::WildMatch::new(pattern).matches(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        for (p, t, want) in [
            ("*", "", true),
            ("pg-*", "pg-main", true),
            ("pg-*", "mysql", false),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("*b*", "abc", true),
            ("ts-*-x", "ts-1-2-x", true),
            ("exact", "exact", true),
            ("exact", "exactly", false),
        ] {
            assert_eq!(glob(p, t), want, "{p} {t}");
        }
    }

    #[test]
    fn allows() {
        let p = ClientPolicy {
            name: "pg".into(),
            uids: vec![101],
            gids: vec![],
            keys: vec!["pg-*".into()],
            operations: vec!["decrypt".into()],
            context: [("cluster".to_string(), "c1".to_string())].into(),
        };
        let ctx: BTreeMap<String, String> = [("cluster".to_string(), "c1".to_string())].into();
        assert!(p.allows("decrypt", Some("pg-a"), &ctx).is_ok());
        assert!(p.allows("generate_data_key", Some("pg-a"), &ctx).is_err());
        assert!(p.allows("decrypt", Some("other"), &ctx).is_err());
        assert!(p.allows("decrypt", Some("pg-a"), &BTreeMap::new()).is_err());
        assert!(find(std::slice::from_ref(&p), 101, 0).is_some());
        assert!(find(std::slice::from_ref(&p), 0, 0).is_none());
        let bad = ClientPolicy {
            operations: vec!["zap".into()],
            ..p
        };
        assert!(bad.validate().is_err());
    }
}
