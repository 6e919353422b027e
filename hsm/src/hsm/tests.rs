//! State-machine tests over an in-memory store. The SQLite backend has its
//! own tests in `tde-sidecar`, and the end-to-end tests use it for real.

use std::sync::Mutex;

use super::*;
use crate::store::StoreError;

#[derive(Default)]
struct MemStore {
    meta: Mutex<Option<StoreMeta>>,
    root: Mutex<Option<Vec<u8>>>,
    objects: Mutex<BTreeMap<(u8, String), StoredObject>>,
    fail_writes: Mutex<bool>,
}

impl ObjectStore for MemStore {
    fn meta(&self) -> Result<Option<StoreMeta>, StoreError> {
        Ok(self.meta.lock().expect("lock").clone())
    }
    fn initialize(
        &self,
        meta: &StoreMeta,
        root: &[u8],
        objects: &[StoredObject],
    ) -> Result<(), StoreError> {
        *self.meta.lock().expect("lock") = Some(meta.clone());
        *self.root.lock().expect("lock") = Some(root.to_vec());
        for o in objects {
            self.objects
                .lock()
                .expect("lock")
                .insert((o.kind, o.id.clone()), o.clone());
        }
        Ok(())
    }
    fn sealed_root(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.root.lock().expect("lock").clone())
    }
    fn objects(&self) -> Result<Vec<StoredObject>, StoreError> {
        Ok(self
            .objects
            .lock()
            .expect("lock")
            .values()
            .cloned()
            .collect())
    }
    fn apply(&self, ops: &[StoreOp]) -> Result<(), StoreError> {
        if *self.fail_writes.lock().expect("lock") {
            return Err(StoreError::Io("disk full".into()));
        }
        let mut objs = self.objects.lock().expect("lock");
        for op in ops {
            match op {
                StoreOp::Put(o) => {
                    objs.insert((o.kind, o.id.clone()), o.clone());
                }
                StoreOp::Delete { kind, id } => {
                    objs.remove(&(*kind, id.clone()));
                }
                StoreOp::Root(sealed) => {
                    *self.root.lock().expect("lock") = Some(sealed.clone());
                }
            }
        }
        Ok(())
    }
    fn zeroize(&self) -> Result<(), StoreError> {
        *self.root.lock().expect("lock") = None;
        self.objects.lock().expect("lock").clear();
        if let Some(m) = self.meta.lock().expect("lock").as_mut() {
            m.zeroized = true;
        }
        Ok(())
    }
}

const PW: &[u8] = b"officer-password";

fn setup(t: u8, n: u8) -> (Arc<MemStore>, Hsm, Vec<SecretBuf>) {
    let store = Arc::new(MemStore::default());
    let out = Hsm::init(store.as_ref(), t, n, false, "admin", PW).expect("init");
    let hsm = Hsm::open(store.clone(), TamperPolicy::default()).expect("open");
    (store, hsm, out.shares)
}

fn unsealed() -> (Arc<MemStore>, Hsm, Vec<SecretBuf>) {
    let (s, h, shares) = setup(3, 5);
    reunseal(&h, &shares);
    (s, h, shares)
}

fn ctx(t: &str) -> Context {
    [("tablespace".to_string(), t.to_string())].into()
}

#[test]
fn unseal_needs_threshold_distinct_shares() {
    let (_s, h, shares) = setup(3, 5);
    assert!(h.status().sealed);
    assert!(matches!(h.key_list(), Err(HsmError::Sealed)));
    assert_eq!(h.unseal(shares[0].expose()).expect("1").progress, 1);
    assert_eq!(h.unseal(shares[0].expose()).expect("dup").progress, 1);
    let st = h.unseal(shares[4].expose()).expect("2");
    assert!(st.sealed);
    assert_eq!(st.progress, 2);
    let st = h.unseal(shares[2].expose()).expect("3");
    assert!(!st.sealed);
    h.seal().expect("seal");
    assert!(h.status().sealed);
}

#[test]
fn shares_of_another_store_are_refused() {
    let (_s, h, _) = setup(2, 3);
    let (_s2, _h2, other) = setup(2, 3);
    assert!(matches!(
        h.unseal(other[0].expose()),
        Err(HsmError::InvalidShare(_))
    ));
}

#[test]
fn data_keys_rotate_rewrap_and_states() {
    let (_s, h, _) = unsealed();
    h.key_create("pg", "test", "admin").expect("create");
    let g = h
        .generate_data_key(Caller::Client, "pg", &ctx("a"))
        .expect("gen");
    assert_eq!(g.version, 1);
    let (_, v, dek) = h
        .decrypt(Caller::Client, &g.ciphertext, &ctx("a"))
        .expect("decrypt");
    assert_eq!((v, dek.expose()), (1, g.plaintext.expose()));
    assert!(matches!(
        h.decrypt(Caller::Client, &g.ciphertext, &ctx("b")),
        Err(HsmError::ContextMismatch)
    ));
    let info = h.key_rotate("pg").expect("rotate");
    assert_eq!(info.primary, 2);
    let (_, from, to, blob2) = h
        .re_encrypt(Caller::Client, &g.ciphertext, &ctx("a"))
        .expect("rewrap");
    assert_eq!((from, to), (1, 2));
    assert_eq!(
        h.decrypt(Caller::Client, &blob2, &ctx("a"))
            .expect("d2")
            .2
            .expose(),
        g.plaintext.expose()
    );
    h.key_disable("pg", Versions::One(1)).expect("disable");
    assert!(matches!(
        h.decrypt(Caller::Client, &g.ciphertext, &ctx("a")),
        Err(HsmError::KeyDisabled { .. })
    ));
    h.key_enable("pg", Versions::One(1)).expect("enable");
    h.key_schedule_destroy("pg", Versions::One(1), 7)
        .expect("schedule");
    assert!(matches!(
        h.decrypt(Caller::Client, &g.ciphertext, &ctx("a")),
        Err(HsmError::KeyPendingDestruction { .. })
    ));
    assert!(
        h.key_schedule_destroy("pg", Versions::One(2), 7).is_err(),
        "primary alone"
    );
    h.key_cancel_destroy("pg", Versions::One(1))
        .expect("cancel");
    assert_eq!(
        h.key_describe("pg").expect("d").versions[0].state,
        VersionState::Disabled
    );
    h.key_schedule_destroy("pg", Versions::One(1), 1)
        .expect("schedule");
    assert_eq!(h.destroy_due(now()).expect("not yet"), 0);
    assert_eq!(h.destroy_due(now() + 2 * 86_400).expect("due"), 1);
    assert!(matches!(
        h.decrypt(Caller::Client, &g.ciphertext, &ctx("a")),
        Err(HsmError::KeyDestroyed { .. })
    ));
    assert!(h.take_events().contains(&HsmEvent::VersionDestroyed {
        key: "pg".into(),
        version: 1
    }));
    assert!(matches!(
        h.key_create("pg", "", "admin"),
        Err(HsmError::KeyExists(_))
    ));
    assert!(matches!(
        h.generate_data_key(Caller::Client, "nope", &ctx("a")),
        Err(HsmError::KeyNotFound(_))
    ));
}

#[test]
fn keys_survive_seal_and_unseal() {
    let (_s, h, shares) = unsealed();
    h.key_create("pg", "", "admin").expect("create");
    let g = h
        .generate_data_key(Caller::Client, "pg", &ctx("a"))
        .expect("gen");
    h.seal().expect("seal");
    assert!(matches!(
        h.decrypt(Caller::Client, &g.ciphertext, &ctx("a")),
        Err(HsmError::Sealed)
    ));
    for sh in &shares[2..5] {
        h.unseal(sh.expose()).expect("unseal");
    }
    assert_eq!(
        h.decrypt(Caller::Client, &g.ciphertext, &ctx("a"))
            .expect("d")
            .2
            .expose(),
        g.plaintext.expose()
    );
}

#[test]
fn failed_store_write_changes_nothing() {
    let (s, h, _) = unsealed();
    h.key_create("pg", "", "admin").expect("create");
    *s.fail_writes.lock().expect("lock") = true;
    assert!(matches!(h.key_rotate("pg"), Err(HsmError::Store(_))));
    assert_eq!(h.key_describe("pg").expect("d").primary, 1);
}

#[test]
fn five_bad_logins_lock_and_an_officer_unlocks() {
    let (_s, h, _) = unsealed();
    assert_eq!(h.login("admin", PW).expect("login"), Role::CryptoOfficer);
    h.operator_add("bob", Role::CryptoOfficer, b"bob-password")
        .expect("add");
    for i in 1..5 {
        assert!(
            matches!(
                h.login("bob", b"wrong-password"),
                Err(HsmError::LoginFailed)
            ),
            "{i}"
        );
    }
    assert!(matches!(
        h.login("bob", b"wrong-password"),
        Err(HsmError::OperatorLocked(_))
    ));
    assert!(matches!(
        h.login("bob", b"bob-password"),
        Err(HsmError::OperatorLocked(_))
    ));
    assert!(
        h.take_events()
            .contains(&HsmEvent::OperatorLocked("bob".into()))
    );
    h.operator_unlock("bob").expect("unlock");
    assert_eq!(
        h.login("bob", b"bob-password").expect("login"),
        Role::CryptoOfficer
    );
    assert!(matches!(h.login("nobody", PW), Err(HsmError::LoginFailed)));
}

#[test]
fn tampered_object_is_flagged_and_zeroize_is_final() {
    let (s, h, shares) = unsealed();
    h.key_create("pg", "", "admin").expect("create");
    h.key_create("other", "", "admin").expect("create");
    h.seal().expect("seal");
    {
        let mut objs = s.objects.lock().expect("lock");
        let o = objs
            .get_mut(&(KIND_MASTER_KEY, "pg".to_string()))
            .expect("row");
        let last = o.blob.len() - 1;
        o.blob[last] ^= 1;
    }
    for sh in &shares[..3] {
        h.unseal(sh.expose()).expect("unseal");
    }
    assert!(matches!(
        h.generate_data_key(Caller::Client, "pg", &ctx("a")),
        Err(HsmError::Tampered(_))
    ));
    assert!(
        h.generate_data_key(Caller::Client, "other", &ctx("a"))
            .is_ok()
    );
    assert!(
        h.take_events()
            .iter()
            .any(|e| matches!(e, HsmEvent::TamperDetected { id, .. } if id == "pg"))
    );
    h.zeroize().expect("zeroize");
    assert!(matches!(
        h.unseal(shares[0].expose()),
        Err(HsmError::Zeroized)
    ));
    let reopened = Hsm::open(s.clone(), TamperPolicy::default()).expect("open");
    assert!(reopened.status().zeroized);
    assert!(matches!(
        reopened.unseal(shares[0].expose()),
        Err(HsmError::Zeroized)
    ));
}

#[test]
fn tamper_policy_zeroizes_on_lockout() {
    let store = Arc::new(MemStore::default());
    let out = Hsm::init(store.as_ref(), 1, 1, true, "admin", PW).expect("init");
    let policy = TamperPolicy {
        zeroize_on_lockout: true,
        zeroize_on_store_tamper: false,
    };
    let h = Hsm::open(store.clone(), policy).expect("open");
    h.unseal(out.shares[0].expose()).expect("unseal");
    for _ in 0..5 {
        let _ = h.login("admin", b"wrong-password");
    }
    assert!(h.status().zeroized);
    assert!(store.root.lock().expect("lock").is_none());
}

#[test]
fn rotation_policy_rotates_when_due_and_survives_unseal() {
    let (_s, h, shares) = unsealed();
    h.key_create("pg", "", "admin").expect("create");
    h.key_create("manual", "", "admin").expect("create");
    let info = h.key_set_rotation("pg", 3600).expect("policy");
    assert_eq!(info.rotate_after, 3600);
    let created = info.versions[0].created;
    // Not yet due.
    assert!(h.rotate_due(created + 3599).expect("check").is_empty());
    // Due: only the key with a policy rotates, once per period.
    let done = h.rotate_due(created + 3600).expect("check");
    assert_eq!(done, vec![("pg".to_string(), 2)]);
    assert!(
        h.take_events()
            .iter()
            .any(|e| matches!(e, HsmEvent::AutoRotated { key, version: 2 } if key == "pg"))
    );
    assert_eq!(h.key_describe("manual").expect("d").primary, 1);
    // The policy is sealed with the key and survives seal and unseal.
    h.seal().expect("seal");
    for sh in &shares[..3] {
        h.unseal(sh.expose()).expect("unseal");
    }
    assert_eq!(h.key_describe("pg").expect("d").rotate_after, 3600);
    h.key_set_rotation("pg", 0).expect("off");
    assert!(h.rotate_due(u64::MAX).expect("check").is_empty());
}

fn reunseal(h: &Hsm, shares: &[SecretBuf]) {
    for sh in &shares[..3] {
        h.unseal(sh.expose()).expect("unseal");
    }
    assert!(!h.status().sealed);
}

/// Deletes the store's manifest row, as someone who can write the store
/// would; returns it.
fn take_manifest(s: &MemStore) -> Option<StoredObject> {
    s.objects
        .lock()
        .expect("lock")
        .remove(&(KIND_MANIFEST, manifest::ID.to_string()))
}

fn row(s: &MemStore, kind: u8, id: &str) -> Option<StoredObject> {
    s.objects
        .lock()
        .expect("lock")
        .get(&(kind, id.to_string()))
        .cloned()
}

fn tamper_whys(h: &Hsm) -> Vec<String> {
    h.take_events()
        .into_iter()
        .filter_map(|e| match e {
            HsmEvent::TamperDetected { kind, id, why } => Some(format!("{kind} {id} {why}")),
            _ => None,
        })
        .collect()
}

#[test]
fn row_rollback_and_deletion_are_tampering() {
    let (s, h, shares) = unsealed();
    h.key_create("pg", "", "admin").expect("create");
    let old_pg = row(&s, KIND_MASTER_KEY, "pg").expect("row");
    let wrapped = h
        .generate_data_key(Caller::Client, "pg", &ctx("a"))
        .expect("dek")
        .ciphertext;
    h.key_rotate("pg").expect("rotate");
    h.key_destroy("pg", Versions::One(1)).expect("destroy v1");
    h.key_create("gone", "", "admin").expect("create");
    h.key_create("fine", "", "admin").expect("create");
    h.operator_add("bob", Role::CryptoUser, b"old-password-1")
        .expect("add");
    let old_bob = row(&s, KIND_OPERATOR, "bob").expect("row");
    h.operator_passwd("bob", b"new-password-2").expect("passwd");
    h.seal().expect("seal");
    {
        let mut objs = s.objects.lock().expect("lock");
        // Version 1 of pg back from before its destruction, gone deleted,
        // bob's old password back: each row alone authenticates.
        objs.insert((KIND_MASTER_KEY, "pg".into()), old_pg);
        objs.remove(&(KIND_MASTER_KEY, "gone".into()));
        objs.insert((KIND_OPERATOR, "bob".into()), old_bob);
    }
    reunseal(&h, &shares);
    assert!(matches!(
        h.decrypt(Caller::Client, &wrapped, &ctx("a")),
        Err(HsmError::Tampered(_))
    ));
    assert!(matches!(
        h.generate_data_key(Caller::Client, "gone", &ctx("a")),
        Err(HsmError::Tampered(_))
    ));
    assert!(matches!(
        h.login("bob", b"old-password-1"),
        Err(HsmError::Tampered(_))
    ));
    assert!(
        h.generate_data_key(Caller::Client, "fine", &ctx("a"))
            .is_ok()
    );
    assert!(h.login("admin", PW).is_ok());
    let whys = tamper_whys(&h);
    assert!(
        whys.iter()
            .any(|w| w.starts_with("master_key pg rolled back")),
        "{whys:?}"
    );
    assert!(
        whys.iter()
            .any(|w| w.starts_with("master_key gone deleted")),
        "{whys:?}"
    );
    assert!(
        whys.iter()
            .any(|w| w.starts_with("operator bob rolled back")),
        "{whys:?}"
    );
    assert_eq!(whys.len(), 3, "{whys:?}");
    // Another write keeps the manifest's word: the next unseal finds the
    // same three.
    h.key_rotate("fine").expect("rotate");
    h.seal().expect("seal");
    reunseal(&h, &shares);
    assert_eq!(tamper_whys(&h).len(), 3);
}

#[test]
fn a_missing_manifest_makes_every_object_tampered() {
    let (s, h, shares) = unsealed();
    h.key_create("pg", "", "admin").expect("create");
    h.seal().expect("seal");
    let list = take_manifest(&s).expect("a manifest row");
    reunseal(&h, &shares);
    assert!(matches!(
        h.generate_data_key(Caller::Client, "pg", &ctx("a")),
        Err(HsmError::Tampered(_))
    ));
    assert!(matches!(h.login("admin", PW), Err(HsmError::Tampered(_))));
    let whys = tamper_whys(&h);
    assert!(
        whys.iter()
            .any(|w| w == "manifest manifest the store manifest is missing"),
        "{whys:?}"
    );
    // A forged one (an older manifest under a newer revision) is no better.
    h.seal().expect("seal");
    let mut forged = list;
    forged.revision += 1;
    s.objects
        .lock()
        .expect("lock")
        .insert((KIND_MANIFEST, manifest::ID.to_string()), forged);
    reunseal(&h, &shares);
    assert!(matches!(
        h.generate_data_key(Caller::Client, "pg", &ctx("a")),
        Err(HsmError::Tampered(_))
    ));
}

#[test]
fn a_store_without_manifest_gets_one_at_unseal() {
    let (s, h, shares) = unsealed();
    h.key_create("pg", "", "admin").expect("create");
    let wrapped = h
        .generate_data_key(Caller::Client, "pg", &ctx("a"))
        .expect("dek")
        .ciphertext;
    h.seal().expect("seal");
    // Make it a store from before manifests: no manifest, a V1 root.
    let meta = s.meta().expect("meta").expect("some");
    let parsed: Vec<Share> = shares[..3]
        .iter()
        .map(|t| Share::parse(t.expose()).expect("share"))
        .collect();
    let unseal = seal::combine(&parsed).expect("combine");
    let sealed = s.sealed_root().expect("root").expect("some");
    let (root, format) = seal::open_root(&unseal, &sealed, &meta.store_id).expect("open");
    assert_eq!(format, RootFormat::V2);
    *s.root.lock().expect("lock") =
        Some(seal::seal_root_v1(&unseal, &root, &meta.store_id).expect("v1"));
    take_manifest(&s);

    reunseal(&h, &shares);
    let events = h.take_events();
    assert_eq!(events, [HsmEvent::StoreUpgraded(2)], "an admin and a key");
    assert!(h.decrypt(Caller::Client, &wrapped, &ctx("a")).is_ok());
    assert!(row(&s, KIND_MANIFEST, manifest::ID).is_some());
    let sealed = s.sealed_root().expect("root").expect("some");
    let (_, format) = seal::open_root(&unseal, &sealed, &meta.store_id).expect("open");
    assert_eq!(format, RootFormat::V2, "the root is resealed as V2");
    // From now on, a deleted manifest is tampering.
    h.seal().expect("seal");
    take_manifest(&s);
    reunseal(&h, &shares);
    assert!(matches!(
        h.decrypt(Caller::Client, &wrapped, &ctx("a")),
        Err(HsmError::Tampered(_))
    ));
}

#[test]
fn a_crypto_user_uses_only_keys_shared_with_it() {
    let (_s, h, shares) = unsealed();
    h.key_create("pg", "", "admin").expect("create");
    h.key_create("other", "", "admin").expect("create");
    h.operator_add("bob", Role::CryptoUser, b"bob-password-1")
        .expect("add");
    h.operator_add("carol", Role::Auditor, b"carol-password-1")
        .expect("add");
    let denied = |r: Result<GeneratedDataKey, HsmError>| {
        assert!(matches!(r, Err(HsmError::PermissionDenied(_))), "{r:?}");
    };
    denied(h.generate_data_key(Caller::User("bob"), "pg", &ctx("a")));
    let info = h.key_share("pg", "bob").expect("share");
    assert_eq!(info.shared_with, ["bob"]);
    assert_eq!(info.owner, "admin");
    assert_eq!(
        h.key_share("pg", "bob").expect("again").shared_with,
        ["bob"]
    );
    assert!(matches!(
        h.key_share("pg", "carol"),
        Err(HsmError::InvalidArgument(_))
    ));
    assert!(matches!(
        h.key_share("pg", "nobody"),
        Err(HsmError::OperatorNotFound(_))
    ));
    let g = h
        .generate_data_key(Caller::User("bob"), "pg", &ctx("a"))
        .expect("shared");
    assert!(
        h.decrypt(Caller::User("bob"), &g.ciphertext, &ctx("a"))
            .is_ok()
    );
    denied(h.generate_data_key(Caller::User("bob"), "other", &ctx("a")));
    denied(h.generate_data_key(Caller::User("admin"), "pg", &ctx("a")));
    denied(h.generate_data_key(Caller::User("carol"), "pg", &ctx("a")));
    // It is stored: it holds after a seal and unseal.
    h.seal().expect("seal");
    reunseal(&h, &shares);
    assert!(
        h.re_encrypt(Caller::User("bob"), &g.ciphertext, &ctx("a"))
            .is_ok()
    );
    assert!(
        h.key_unshare("pg", "bob")
            .expect("unshare")
            .shared_with
            .is_empty()
    );
    assert!(matches!(
        h.decrypt(Caller::User("bob"), &g.ciphertext, &ctx("a")),
        Err(HsmError::PermissionDenied(_))
    ));
    // A locked crypto user uses nothing.
    h.key_share("pg", "bob").expect("share");
    for _ in 0..MAX_FAILED_LOGINS {
        let _ = h.login("bob", b"wrong");
    }
    denied(h.generate_data_key(Caller::User("bob"), "pg", &ctx("a")));
}
