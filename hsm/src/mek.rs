//! Master encryption keys: named, versioned AES-256 keys and their states.

use crate::codec::{Dec, Enc};
use crate::error::HsmError;
use crate::secret::{KEY_LEN, MasterKeyMaterial, SecretBuf};

/// The state of one key version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionState {
    /// Usable: wraps (if primary) and unwraps.
    Enabled,
    /// Kept, but refuses every operation until enabled.
    Disabled,
    /// Refuses every operation; destroyed when `destroy_at` passes unless
    /// cancelled.
    PendingDestruction,
    /// Material zeroized and deleted. Terminal.
    Destroyed,
}

impl VersionState {
    /// The state's name on the wire and in output.
    pub fn name(self) -> &'static str {
        match self {
            VersionState::Enabled => "enabled",
            VersionState::Disabled => "disabled",
            VersionState::PendingDestruction => "pending_destruction",
            VersionState::Destroyed => "destroyed",
        }
    }
    fn code(self) -> u8 {
        match self {
            VersionState::Enabled => 1,
            VersionState::Disabled => 2,
            VersionState::PendingDestruction => 3,
            VersionState::Destroyed => 4,
        }
    }
    fn from_code(c: u8) -> Result<Self, HsmError> {
        Ok(match c {
            1 => VersionState::Enabled,
            2 => VersionState::Disabled,
            3 => VersionState::PendingDestruction,
            4 => VersionState::Destroyed,
            _ => return Err(HsmError::InvalidCiphertext("key record state")),
        })
    }
}

/// One version of a master key.
#[derive(Debug)]
pub struct MekVersion {
    /// Number, from 1.
    pub version: u32,
    /// State.
    pub state: VersionState,
    /// Unix seconds.
    pub created: u64,
    /// When a pending destruction takes effect.
    pub destroy_at: Option<u64>,
    /// Material; `None` once destroyed.
    pub(crate) material: Option<MasterKeyMaterial>,
}

impl MekVersion {
    /// The material, for the workspace's hostile-disk tests.
    #[cfg(feature = "internals")]
    pub fn material(&self) -> Option<&MasterKeyMaterial> {
        self.material.as_ref()
    }
}

/// A master key: its metadata and every version's material.
#[derive(Debug)]
pub struct MekRecord {
    /// Name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// Unix seconds.
    pub created: u64,
    /// Version new data keys are wrapped under.
    pub primary: u32,
    /// Versions, ascending.
    pub versions: Vec<MekVersion>,
    /// Automatic rotation period in seconds (0: off): a new primary version
    /// once the primary is this old.
    pub rotate_after: u64,
    /// The operator that created it (empty in records made before owners).
    pub owner: String,
    /// Crypto users it is shared with, sorted: they may use it over the
    /// admin socket.
    pub users: Vec<String>,
}

/// Format 2 adds `rotate_after`, format 3 `owner` and `users`; older
/// records (without them) still load.
const RECORD_FORMAT: u8 = 3;

impl MekRecord {
    /// The version `v`, if it exists.
    pub fn version(&self, v: u32) -> Option<&MekVersion> {
        self.versions.iter().find(|x| x.version == v)
    }

    pub(crate) fn version_mut(&mut self, v: u32) -> Option<&mut MekVersion> {
        self.versions.iter_mut().find(|x| x.version == v)
    }

    /// Serializes the record, material included, into a zeroizing buffer
    /// sized up front so it never reallocates.
    pub fn encode(&self) -> SecretBuf {
        let cap = 64
            + self.name.len()
            + self.description.len()
            + self.versions.len() * (64 + KEY_LEN)
            + self.owner.len()
            + self.users.iter().map(|u| 2 + u.len()).sum::<usize>();
        let mut e = Enc::with_capacity(cap);
        e.u8(RECORD_FORMAT)
            .var(self.name.as_bytes())
            .var(self.description.as_bytes())
            .u64(self.created)
            .u32(self.primary)
            .u32(u32::try_from(self.versions.len()).unwrap_or(u32::MAX));
        for v in &self.versions {
            e.u32(v.version)
                .u8(v.state.code())
                .u64(v.created)
                .u64(v.destroy_at.unwrap_or(0));
            match &v.material {
                Some(m) => e.u8(1).raw(m.expose()),
                None => e.u8(0),
            };
        }
        e.u64(self.rotate_after)
            .var(self.owner.as_bytes())
            .u32(u32::try_from(self.users.len()).unwrap_or(u32::MAX));
        for u in &self.users {
            e.var(u.as_bytes());
        }
        SecretBuf::new(e.0)
    }

    /// Parses a record produced by [`MekRecord::encode`].
    pub fn decode(b: &[u8]) -> Result<Self, HsmError> {
        let mut d = Dec::new(b, "key record");
        let format = d.u8()?;
        if !(1..=RECORD_FORMAT).contains(&format) {
            return Err(HsmError::InvalidCiphertext("key record format"));
        }
        let name = d.string()?;
        let description = d.string()?;
        let created = d.u64()?;
        let primary = d.u32()?;
        let n = d.u32()?;
        let mut versions = Vec::new();
        for _ in 0..n {
            let version = d.u32()?;
            let state = VersionState::from_code(d.u8()?)?;
            let created = d.u64()?;
            let destroy_at = Some(d.u64()?).filter(|t| *t != 0);
            let material = match d.u8()? {
                0 => None,
                _ => Some(MasterKeyMaterial::from_slice(d.raw(KEY_LEN)?)?),
            };
            versions.push(MekVersion {
                version,
                state,
                created,
                destroy_at,
                material,
            });
        }
        let rotate_after = if format >= 2 { d.u64()? } else { 0 };
        let (mut owner, mut users) = (String::new(), Vec::new());
        if format >= 3 {
            owner = d.string()?;
            for _ in 0..d.u32()? {
                users.push(d.string()?);
            }
        }
        d.finish()?;
        Ok(MekRecord {
            name,
            description,
            created,
            primary,
            versions,
            rotate_after,
            owner,
            users,
        })
    }

    /// A deep copy, material included (through the zeroizing encoding).
    pub(crate) fn duplicate(&self) -> Result<Self, HsmError> {
        Self::decode(self.encode().expose())
    }
}

/// Checks a key or operator name: 1 to 128 characters of `A-Z a-z 0-9 . _ -`,
/// starting with a letter or digit.
pub fn validate_name(what: &str, name: &str) -> Result<(), HsmError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(HsmError::InvalidArgument(format!(
            "{what} name must be 1-128 characters of A-Z a-z 0-9 . _ - starting with a letter or digit"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips() {
        let r = MekRecord {
            name: "pg".into(),
            description: "d".into(),
            created: 5,
            primary: 2,
            versions: vec![
                MekVersion {
                    version: 1,
                    state: VersionState::Destroyed,
                    created: 5,
                    destroy_at: None,
                    material: None,
                },
                MekVersion {
                    version: 2,
                    state: VersionState::Enabled,
                    created: 6,
                    destroy_at: Some(9),
                    material: Some(MasterKeyMaterial::from_slice(&[7u8; 32]).expect("key")),
                },
            ],
            rotate_after: 90 * 86400,
            owner: "admin".into(),
            users: vec!["app".into(), "bob".into()],
        };
        let d = r.duplicate().expect("dup");
        assert_eq!(d.owner, "admin");
        assert_eq!(d.users, ["app", "bob"]);
        assert_eq!(d.encode().expose(), r.encode().expose());
        assert_eq!(d.version(2).expect("v2").destroy_at, Some(9));
        assert_eq!(d.rotate_after, 90 * 86400);
        // Format 2 (before owners) and 1 (before rotate_after) still load.
        // var "admin" | u32 2 | var "app" | var "bob"
        let tail = (2 + 5) + 4 + (2 + 3) + (2 + 3);
        let mut v2 = r.encode().expose().to_vec();
        v2[0] = 2;
        v2.truncate(v2.len() - tail);
        let old = MekRecord::decode(&v2).expect("format 2");
        assert_eq!((old.owner.as_str(), old.users.len()), ("", 0));
        assert_eq!(old.rotate_after, 90 * 86400);
        let mut v1 = v2.clone();
        v1[0] = 1;
        v1.truncate(v1.len() - 8);
        assert_eq!(MekRecord::decode(&v1).expect("format 1").rotate_after, 0);
        assert!(MekRecord::decode(&r.encode().expose()[..20]).is_err());
        let shown = format!("{r:?}");
        assert!(!shown.contains("7, 7, 7"), "{shown}");
    }

    #[test]
    fn names() {
        assert!(validate_name("key", "pg-main_1.x").is_ok());
        for bad in ["", "-x", "a b", "ä", &"a".repeat(129)] {
            assert!(validate_name("key", bad).is_err(), "{bad}");
        }
    }
}
