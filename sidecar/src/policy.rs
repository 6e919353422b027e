//! Client policies for the data socket: which peers (by kernel uid/gid, or
//! by user and group names resolved through NSS) may use which master keys,
//! for which operations, with which encryption contexts.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Data-socket operations a policy can grant.
pub const DATA_OPERATIONS: &[&str] = &[
    "generate_data_key",
    "decrypt",
    "re_encrypt",
    "generate_random",
    "pkcs11",
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
    /// Users this policy applies to, by name (or number), resolved through
    /// NSS at start and at every reload.
    #[serde(default)]
    pub users: Vec<String>,
    /// Groups this policy applies to, by name (or number): a peer whose
    /// process runs with the group as its primary gid, or whose user is a
    /// listed member of it (NSS, read at start and at every reload).
    #[serde(default)]
    pub groups: Vec<String>,
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
        if self.uids.is_empty()
            && self.gids.is_empty()
            && self.users.is_empty()
            && self.groups.is_empty()
        {
            return Err(format!(
                "client {:?} names no users, groups, uids or gids",
                self.name
            ));
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

    /// Whether `op` on `key` is allowed, whatever the context (for requests
    /// that carry none); `Err` says why not.
    pub fn allows_key(&self, op: &str, key: &str) -> Result<(), String> {
        self.allows_op_key(op, Some(key))
    }

    /// The operation and key checks of [`ClientPolicy::allows`], without
    /// an encryption context (PKCS#11 operations have none).
    pub fn allows_op_key(&self, op: &str, key: Option<&str>) -> Result<(), String> {
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

/// A policy with its users and groups resolved to numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Resolved {
    policy: ClientPolicy,
    /// uid to the user name the policy gives it (`None`: a number).
    uids: BTreeMap<u32, Option<String>>,
    /// gid to the group name the policy gives it (`None`: a number).
    gids: BTreeMap<u32, Option<String>>,
    /// uid of a listed member of one of the groups, to the group's name.
    members: BTreeMap<u32, String>,
}

/// The data socket's policies, users and groups resolved: what the daemon
/// checks requests against. Built at start and at every reload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policies {
    list: Vec<Resolved>,
}

/// How a policy covers a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match<'a> {
    /// The policy.
    pub policy: &'a ClientPolicy,
    /// Why it covers the peer, for people: `uid 0 is user "root"`.
    pub because: String,
}

impl Policies {
    /// Resolves the users and groups of `policies` through NSS; an unknown
    /// name is an error (a typo must not silently allow nobody, or keep
    /// allowing someone after a reload).
    pub fn resolve(policies: &[ClientPolicy]) -> Result<Policies, String> {
        let mut list = Vec::with_capacity(policies.len());
        for p in policies {
            p.validate()?;
            let mut r = Resolved {
                policy: p.clone(),
                uids: p.uids.iter().map(|u| (*u, None)).collect(),
                gids: p.gids.iter().map(|g| (*g, None)).collect(),
                members: BTreeMap::new(),
            };
            for name in &p.users {
                let uid = user_id(name).map_err(|e| format!("client {:?}: {e}", p.name))?;
                r.uids.insert(uid, Some(name.clone()));
            }
            for name in &p.groups {
                let (gid, members) =
                    group(name).map_err(|e| format!("client {:?}: {e}", p.name))?;
                r.gids.insert(gid, Some(name.clone()));
                for m in members {
                    // A member that no longer exists is no one to allow.
                    if let Ok(uid) = user_id(&m) {
                        r.members.insert(uid, name.clone());
                    }
                }
            }
            list.push(r);
        }
        Ok(Policies { list })
    }

    /// The first policy covering a peer (its kernel uid and primary gid),
    /// and why.
    pub fn find(&self, uid: u32, gid: u32) -> Option<Match<'_>> {
        self.list.iter().find_map(|r| {
            let because = if let Some(name) = r.uids.get(&uid) {
                match name {
                    Some(n) => format!("uid {uid} is user {n:?}"),
                    None => format!("the policy lists uid {uid}"),
                }
            } else if let Some(name) = r.gids.get(&gid) {
                match name {
                    Some(n) => format!("gid {gid} is group {n:?}"),
                    None => format!("the policy lists gid {gid}"),
                }
            } else if let Some(group) = r.members.get(&uid) {
                format!("uid {uid} is a member of group {group:?}")
            } else {
                return None;
            };
            Some(Match {
                policy: &r.policy,
                because,
            })
        })
    }
}

/// A user name (or number) to its uid, through NSS (getpwnam_r).
pub fn user_id(name: &str) -> Result<u32, String> {
    if let Ok(n) = name.parse() {
        return Ok(n);
    }
    match nix::unistd::User::from_name(name) {
        Ok(Some(u)) => Ok(u.uid.as_raw()),
        Ok(None) => Err(format!("user {name:?} not found")),
        Err(e) => Err(format!("looking up user {name:?}: {e}")),
    }
}

/// A group name (or number) to its gid and listed members, through NSS
/// (getgrnam_r / getgrgid_r).
pub fn group(name: &str) -> Result<(u32, Vec<String>), String> {
    if let Ok(n) = name.parse::<u32>() {
        // A number is a gid even without a group entry.
        let members = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(n))
            .ok()
            .flatten()
            .map(|g| g.mem)
            .unwrap_or_default();
        return Ok((n, members));
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok((g.gid.as_raw(), g.mem)),
        Ok(None) => Err(format!("group {name:?} not found")),
        Err(e) => Err(format!("looking up group {name:?}: {e}")),
    }
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
            users: vec![],
            groups: vec![],
            keys: vec!["pg-*".into()],
            operations: vec!["decrypt".into()],
            context: [("cluster".to_string(), "c1".to_string())].into(),
        };
        let ctx: BTreeMap<String, String> = [("cluster".to_string(), "c1".to_string())].into();
        assert!(p.allows("decrypt", Some("pg-a"), &ctx).is_ok());
        assert!(p.allows("generate_data_key", Some("pg-a"), &ctx).is_err());
        assert!(p.allows("decrypt", Some("other"), &ctx).is_err());
        assert!(p.allows("decrypt", Some("pg-a"), &BTreeMap::new()).is_err());
        let ps = Policies::resolve(std::slice::from_ref(&p)).expect("resolve");
        assert!(ps.find(101, 0).is_some());
        assert!(ps.find(0, 0).is_none());
        let bad = ClientPolicy {
            operations: vec!["zap".into()],
            ..p
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn users_and_groups_resolve_through_nss() {
        let p = ClientPolicy {
            name: "by-name".into(),
            uids: vec![],
            gids: vec![],
            users: vec!["root".into()],
            groups: vec!["0".into(), "root".into()],
            keys: vec!["*".into()],
            operations: vec!["decrypt".into()],
            context: BTreeMap::new(),
        };
        let ps = Policies::resolve(std::slice::from_ref(&p)).expect("resolve");
        let m = ps.find(0, 5).expect("root by name");
        assert_eq!(m.because, "uid 0 is user \"root\"");
        let m = ps.find(4242, 0).expect("gid 0 by number");
        assert!(m.because.starts_with("gid 0 is group"), "{}", m.because);
        assert!(ps.find(4242, 4242).is_none());
        for bad in [
            ClientPolicy {
                users: vec!["no-such-user-tde".into()],
                ..p.clone()
            },
            ClientPolicy {
                groups: vec!["no-such-group-tde".into()],
                ..p.clone()
            },
            ClientPolicy {
                users: vec![],
                groups: vec![],
                ..p.clone()
            },
        ] {
            let e = Policies::resolve(&[bad]).expect_err("refused");
            assert!(e.contains("not found") || e.contains("names no"), "{e}");
        }
    }
}
