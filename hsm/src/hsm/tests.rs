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
                StoreOp::Custody { threshold, shares } => {
                    if let Some(m) = self.meta.lock().expect("lock").as_mut() {
                        m.threshold = *threshold;
                        m.shares = *shares;
                    }
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

/// The first officer's session.
fn admin(h: &Hsm) -> OperatorSession {
    h.login("admin", PW).expect("officer login")
}

/// Decrypts a wrapped blob as the sidecar does: parsed once, then unwrapped.
fn dec(h: &Hsm, caller: Caller<'_>, blob: &[u8], c: &Context) -> Result<DataKey, HsmError> {
    h.decrypt(caller, &WrappedKey::parse(blob)?, c)
}

/// Rewraps a blob: its new version and bytes.
fn rewrap(
    h: &Hsm,
    caller: Caller<'_>,
    blob: &[u8],
    c: &Context,
) -> Result<(u32, Vec<u8>), HsmError> {
    h.re_encrypt(caller, &WrappedKey::parse(blob)?, c)
}

fn ctx(t: &str) -> Context {
    [("tablespace".to_string(), t.to_string())].into()
}

#[test]
fn unseal_needs_threshold_distinct_shares() {
    let (_s, h, shares) = setup(3, 5);
    assert!(h.status().sealed);
    assert!(matches!(h.login("admin", PW), Err(HsmError::Sealed)));
    assert_eq!(h.unseal(shares[0].expose()).expect("1").progress, 1);
    match h.unseal(shares[0].expose()) {
        Err(HsmError::InvalidShare(why)) => assert!(why.contains("already given"), "{why}"),
        r => panic!("a repeated share: {r:?}"),
    }
    assert_eq!(h.status().progress, 1);
    let st = h.unseal(shares[4].expose()).expect("2");
    assert!(st.sealed);
    assert_eq!(st.progress, 2);
    let st = h.unseal(shares[2].expose()).expect("3");
    assert!(!st.sealed);
    h.seal(&admin(&h)).expect("seal");
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
    let a = admin(&h);
    h.key_create(&a, "pg", "test", 0).expect("create");
    let g = h
        .generate_data_key(Caller::Client, "pg", &ctx("a"))
        .expect("gen");
    assert_eq!(g.version, 1);
    let dek = dec(&h, Caller::Client, &g.ciphertext, &ctx("a")).expect("decrypt");
    assert_eq!(dek.expose(), g.plaintext.expose());
    assert!(matches!(
        dec(&h, Caller::Client, &g.ciphertext, &ctx("b")),
        Err(HsmError::ContextMismatch)
    ));
    let info = h.key_rotate(&a, "pg").expect("rotate");
    assert_eq!(info.primary, 2);
    let (to, blob2) = rewrap(&h, Caller::Client, &g.ciphertext, &ctx("a")).expect("rewrap");
    assert_eq!(to, 2);
    assert_eq!(WrappedKey::parse(&blob2).expect("parse").version, 2);
    assert_eq!(
        dec(&h, Caller::Client, &blob2, &ctx("a"))
            .expect("d2")
            .expose(),
        g.plaintext.expose()
    );
    h.key_disable(&a, "pg", Versions::One(1)).expect("disable");
    assert!(matches!(
        dec(&h, Caller::Client, &g.ciphertext, &ctx("a")),
        Err(HsmError::KeyDisabled { .. })
    ));
    h.key_enable(&a, "pg", Versions::One(1)).expect("enable");
    h.key_schedule_destroy(&a, "pg", Versions::One(1), 7)
        .expect("schedule");
    assert!(matches!(
        dec(&h, Caller::Client, &g.ciphertext, &ctx("a")),
        Err(HsmError::KeyPendingDestruction { .. })
    ));
    assert!(
        h.key_schedule_destroy(&a, "pg", Versions::One(2), 7)
            .is_err(),
        "primary alone"
    );
    h.key_cancel_destroy(&a, "pg", Versions::One(1))
        .expect("cancel");
    assert_eq!(
        h.key_describe(&a, "pg").expect("d").versions[0].state,
        VersionState::Disabled
    );
    h.key_schedule_destroy(&a, "pg", Versions::One(1), 1)
        .expect("schedule");
    assert_eq!(h.destroy_due(now()).expect("not yet"), 0);
    assert_eq!(h.destroy_due(now() + 2 * 86_400).expect("due"), 1);
    assert!(matches!(
        dec(&h, Caller::Client, &g.ciphertext, &ctx("a")),
        Err(HsmError::KeyDestroyed { .. })
    ));
    assert!(h.take_events().contains(&HsmEvent::VersionDestroyed {
        key: "pg".into(),
        version: 1
    }));
    assert!(matches!(
        h.key_create(&a, "pg", "", 0),
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
    let a = admin(&h);
    h.key_create(&a, "pg", "", 0).expect("create");
    let g = h
        .generate_data_key(Caller::Client, "pg", &ctx("a"))
        .expect("gen");
    h.seal(&a).expect("seal");
    assert!(matches!(
        dec(&h, Caller::Client, &g.ciphertext, &ctx("a")),
        Err(HsmError::Sealed)
    ));
    for sh in &shares[2..5] {
        h.unseal(sh.expose()).expect("unseal");
    }
    assert!(
        matches!(h.key_list(&a), Err(HsmError::NotAuthenticated(_))),
        "a seal ends every login"
    );
    assert_eq!(
        dec(&h, Caller::Client, &g.ciphertext, &ctx("a"))
            .expect("d")
            .expose(),
        g.plaintext.expose()
    );
}

#[test]
fn failed_store_write_changes_nothing() {
    let (s, h, _) = unsealed();
    let a = admin(&h);
    h.key_create(&a, "pg", "", 0).expect("create");
    *s.fail_writes.lock().expect("lock") = true;
    assert!(matches!(h.key_rotate(&a, "pg"), Err(HsmError::Store(_))));
    assert_eq!(h.key_describe(&a, "pg").expect("d").primary, 1);
}

#[test]
fn five_bad_logins_lock_and_an_officer_unlocks() {
    let (_s, h, _) = unsealed();
    let a = admin(&h);
    assert_eq!(
        h.login("admin", PW).expect("login").role(),
        Role::CryptoOfficer
    );
    h.operator_add(&a, "bob", Role::CryptoOfficer, b"bob-password")
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
    h.operator_unlock(&a, "bob").expect("unlock");
    assert_eq!(
        h.login("bob", b"bob-password").expect("login").role(),
        Role::CryptoOfficer
    );
    assert!(matches!(h.login("nobody", PW), Err(HsmError::LoginFailed)));
}

#[test]
fn tampered_object_is_flagged_and_zeroize_is_final() {
    let (s, h, shares) = unsealed();
    let a = admin(&h);
    h.key_create(&a, "pg", "", 0).expect("create");
    h.key_create(&a, "other", "", 0).expect("create");
    h.seal(&a).expect("seal");
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
    let a = admin(&h);
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
    h.zeroize(Some(&a)).expect("zeroize");
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
    let a = admin(&h);
    h.key_create(&a, "pg", "", 0).expect("create");
    h.key_create(&a, "manual", "", 0).expect("create");
    let info = h.key_set_rotation(&a, "pg", 3600).expect("policy");
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
    assert_eq!(h.key_describe(&a, "manual").expect("d").primary, 1);
    // The policy is sealed with the key and survives seal and unseal.
    h.seal(&a).expect("seal");
    for sh in &shares[..3] {
        h.unseal(sh.expose()).expect("unseal");
    }
    let a = admin(&h);
    assert_eq!(h.key_describe(&a, "pg").expect("d").rotate_after, 3600);
    h.key_set_rotation(&a, "pg", 0).expect("off");
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
    let a = admin(&h);
    h.key_create(&a, "pg", "", 0).expect("create");
    let old_pg = row(&s, KIND_MASTER_KEY, "pg").expect("row");
    let wrapped = h
        .generate_data_key(Caller::Client, "pg", &ctx("a"))
        .expect("dek")
        .ciphertext;
    h.key_rotate(&a, "pg").expect("rotate");
    h.key_destroy(&a, "pg", Versions::One(1))
        .expect("destroy v1");
    h.key_create(&a, "gone", "", 0).expect("create");
    h.key_create(&a, "fine", "", 0).expect("create");
    h.operator_add(&a, "bob", Role::CryptoUser, b"old-password-1")
        .expect("add");
    let old_bob = row(&s, KIND_OPERATOR, "bob").expect("row");
    h.operator_passwd(&a, "bob", b"new-password-2")
        .expect("passwd");
    h.seal(&a).expect("seal");
    {
        let mut objs = s.objects.lock().expect("lock");
        // Version 1 of pg back from before its destruction, gone deleted,
        // bob's old password back: each row alone authenticates.
        objs.insert((KIND_MASTER_KEY, "pg".into()), old_pg);
        objs.remove(&(KIND_MASTER_KEY, "gone".into()));
        objs.insert((KIND_OPERATOR, "bob".into()), old_bob);
    }
    reunseal(&h, &shares);
    let a = admin(&h);
    assert!(matches!(
        dec(&h, Caller::Client, &wrapped, &ctx("a")),
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
    h.key_rotate(&a, "fine").expect("rotate");
    h.seal(&a).expect("seal");
    reunseal(&h, &shares);
    assert_eq!(tamper_whys(&h).len(), 3);
}

#[test]
fn a_missing_manifest_makes_every_object_tampered() {
    let (s, h, shares) = unsealed();
    let a = admin(&h);
    h.key_create(&a, "pg", "", 0).expect("create");
    h.seal(&a).expect("seal");
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
    // No officer can log in now, and the session from before is void: the
    // store can still be sealed by the daemon's stop, or zeroized.
    assert!(matches!(h.seal(&a), Err(HsmError::NotAuthenticated(_))));
    // A forged one (an older manifest under a newer revision) is no better.
    h.close().expect("seal");
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
    let a = admin(&h);
    h.key_create(&a, "pg", "", 0).expect("create");
    let wrapped = h
        .generate_data_key(Caller::Client, "pg", &ctx("a"))
        .expect("dek")
        .ciphertext;
    h.seal(&a).expect("seal");
    h.take_events();
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
    let a = admin(&h);
    let events = h.take_events();
    assert_eq!(
        events,
        [HsmEvent::StoreUpgraded(3)],
        "an admin, a key and the audit key"
    );
    assert!(dec(&h, Caller::Client, &wrapped, &ctx("a")).is_ok());
    assert!(row(&s, KIND_MANIFEST, manifest::ID).is_some());
    let sealed = s.sealed_root().expect("root").expect("some");
    let (_, format) = seal::open_root(&unseal, &sealed, &meta.store_id).expect("open");
    assert_eq!(format, RootFormat::V2, "the root is resealed as V2");
    // From now on, a deleted manifest is tampering.
    h.seal(&a).expect("seal");
    take_manifest(&s);
    reunseal(&h, &shares);
    assert!(matches!(
        dec(&h, Caller::Client, &wrapped, &ctx("a")),
        Err(HsmError::Tampered(_))
    ));
}

/// Adds crypto user bob and auditor carol; their sessions.
fn user_and_auditor(h: &Hsm, a: &OperatorSession) -> (OperatorSession, OperatorSession) {
    h.operator_add(a, "bob", Role::CryptoUser, b"bob-password-1")
        .expect("add");
    h.operator_add(a, "carol", Role::Auditor, b"carol-password-1")
        .expect("add");
    let bob = h.login("bob", b"bob-password-1").expect("bob");
    let carol = h.login("carol", b"carol-password-1").expect("carol");
    (bob, carol)
}

#[test]
fn a_crypto_user_uses_only_keys_shared_with_it() {
    let (_s, h, shares) = unsealed();
    let a = admin(&h);
    h.key_create(&a, "pg", "", 0).expect("create");
    h.key_create(&a, "other", "", 0).expect("create");
    let (bob, carol) = user_and_auditor(&h, &a);
    let denied = |r: Result<GeneratedDataKey, HsmError>| {
        assert!(matches!(r, Err(HsmError::PermissionDenied(_))), "{r:?}");
    };
    denied(h.generate_data_key(Caller::User(&bob), "pg", &ctx("a")));
    let info = h.key_share(&a, "pg", "bob").expect("share");
    assert_eq!(info.shared_with, ["bob"]);
    assert_eq!(info.owner, "admin");
    assert_eq!(
        h.key_share(&a, "pg", "bob").expect("again").shared_with,
        ["bob"]
    );
    assert!(matches!(
        h.key_share(&a, "pg", "carol"),
        Err(HsmError::InvalidArgument(_))
    ));
    assert!(matches!(
        h.key_share(&a, "pg", "nobody"),
        Err(HsmError::OperatorNotFound(_))
    ));
    let g = h
        .generate_data_key(Caller::User(&bob), "pg", &ctx("a"))
        .expect("shared");
    assert!(dec(&h, Caller::User(&bob), &g.ciphertext, &ctx("a")).is_ok());
    denied(h.generate_data_key(Caller::User(&bob), "other", &ctx("a")));
    denied(h.generate_data_key(Caller::User(&a), "pg", &ctx("a")));
    denied(h.generate_data_key(Caller::User(&carol), "pg", &ctx("a")));
    // It is stored: it holds after a seal and unseal (and new logins).
    h.seal(&a).expect("seal");
    reunseal(&h, &shares);
    assert!(matches!(
        dec(&h, Caller::User(&bob), &g.ciphertext, &ctx("a")),
        Err(HsmError::NotAuthenticated(_))
    ));
    let a = admin(&h);
    let bob = h.login("bob", b"bob-password-1").expect("bob");
    assert!(rewrap(&h, Caller::User(&bob), &g.ciphertext, &ctx("a")).is_ok());
    assert!(
        h.key_unshare(&a, "pg", "bob")
            .expect("unshare")
            .shared_with
            .is_empty()
    );
    assert!(matches!(
        dec(&h, Caller::User(&bob), &g.ciphertext, &ctx("a")),
        Err(HsmError::PermissionDenied(_))
    ));
    // A locked crypto user uses nothing.
    h.key_share(&a, "pg", "bob").expect("share");
    for _ in 0..MAX_FAILED_LOGINS {
        let _ = h.login("bob", b"wrong");
    }
    assert!(matches!(
        h.generate_data_key(Caller::User(&bob), "pg", &ctx("a")),
        Err(HsmError::OperatorLocked(_))
    ));
}

/// The HSM checks roles itself, whoever calls it: a crypto user and an
/// auditor manage nothing, an auditor reads, only an officer changes keys
/// and operators, and a session is only what `login` made.
#[test]
fn roles_are_checked_by_the_hsm() {
    let (_s, h, _) = unsealed();
    let a = admin(&h);
    h.key_create(&a, "pg", "", 0).expect("create");
    let (bob, carol) = user_and_auditor(&h, &a);
    let denied = |r: Result<KeyInfo, HsmError>| {
        assert!(matches!(r, Err(HsmError::PermissionDenied(_))), "{r:?}");
    };
    for s in [&bob, &carol] {
        denied(h.key_rotate(s, "pg"));
        denied(h.key_create(s, "mine", "", 0));
        denied(h.key_share(s, "pg", "bob"));
        denied(h.key_destroy(s, "pg", Versions::All));
        assert!(matches!(
            h.operator_add(s, "eve", Role::CryptoOfficer, b"eve-password-1"),
            Err(HsmError::PermissionDenied(_))
        ));
        assert!(matches!(h.seal(s), Err(HsmError::PermissionDenied(_))));
        assert!(matches!(
            h.zeroize(Some(s)),
            Err(HsmError::PermissionDenied(_))
        ));
    }
    assert!(matches!(
        h.zeroize(None),
        Err(HsmError::NotAuthenticated(_))
    ));
    denied(h.key_describe(&bob, "pg"));
    assert!(h.key_describe(&carol, "pg").is_ok());
    assert!(h.operator_list(&carol).is_ok());
    assert!(matches!(
        h.random(Caller::User(&carol), 16),
        Err(HsmError::PermissionDenied(_))
    ));
    // One's own password, not another's.
    h.operator_passwd(&bob, "bob", b"bob-password-2")
        .expect("own password");
    // The change ended bob's session; the new password logs in.
    assert!(matches!(
        h.key_list(&bob),
        Err(HsmError::NotAuthenticated(_))
    ));
    let bob = h.login("bob", b"bob-password-2").expect("new password");
    assert!(matches!(
        h.operator_passwd(&bob, "carol", b"carol-password-2"),
        Err(HsmError::PermissionDenied(_))
    ));
    assert_eq!(h.key_describe(&a, "pg").expect("d").primary, 1);
    assert!(!h.status().sealed && !h.status().zeroized);
}

/// A re-split's `prepare` that takes the new shares as they are.
fn accept(_: &[SecretBuf]) -> Result<(), String> {
    Ok(())
}

/// Issue 12: a re-split of the unseal shares (Vault's `operator rekey`):
/// approved by a threshold of the current shares, no key touched, the old
/// shares void afterwards, the new ones unseal.
#[test]
fn resplit_makes_new_shares_and_voids_the_old() {
    let (_s, h, shares) = unsealed();
    let a = admin(&h);
    h.key_create(&a, "pg", "test", 0).expect("create");
    let g = h
        .generate_data_key(Caller::Client, "pg", &ctx("a"))
        .expect("gen");
    assert!(matches!(
        h.resplit_update("none", shares[0].expose(), &mut accept),
        Err(HsmError::InvalidArgument(_))
    ));
    for (t, n) in [(1, 3), (4, 3), (2, 40)] {
        assert!(matches!(
            h.resplit_init(&a, t, n),
            Err(HsmError::InvalidArgument(_))
        ));
    }
    let st = h.resplit_init(&a, 2, 3).expect("init");
    assert_eq!(
        (st.progress, st.needed, st.threshold, st.shares),
        (0, 3, 2, 3)
    );
    assert!(matches!(
        h.resplit_update("0000", shares[0].expose(), &mut accept),
        Err(HsmError::InvalidArgument(_))
    ));
    let nonce = st.nonce.clone();
    match h
        .resplit_update(&nonce, shares[0].expose(), &mut accept)
        .expect("1")
    {
        ResplitProgress::Waiting(s) => assert_eq!(s.progress, 1),
        ResplitProgress::Done { .. } => panic!("done after one share"),
    }
    assert!(matches!(
        h.resplit_update(&nonce, shares[0].expose(), &mut accept),
        Err(HsmError::InvalidShare(_))
    ));
    assert!(matches!(
        h.resplit_update(&nonce, shares[3].expose(), &mut accept)
            .expect("2"),
        ResplitProgress::Waiting(_)
    ));
    let new = match h
        .resplit_update(&nonce, shares[4].expose(), &mut accept)
        .expect("3")
    {
        ResplitProgress::Done {
            threshold, shares, ..
        } => {
            assert_eq!(threshold, 2);
            shares
        }
        ResplitProgress::Waiting(s) => panic!("still waiting: {s:?}"),
    };
    assert_eq!(new.len(), 3);
    assert!(h.resplit_status().is_none());
    assert_eq!((h.status().threshold, h.status().shares), (2, 3));
    // Unsealed still, keys untouched.
    assert!(dec(&h, Caller::Client, &g.ciphertext, &ctx("a")).is_ok());
    h.seal(&admin(&h)).expect("seal");
    for old in &shares {
        assert!(matches!(
            h.unseal(old.expose()),
            Err(HsmError::InvalidShare(_))
        ));
    }
    h.unseal(new[2].expose()).expect("new 1");
    assert!(!h.unseal(new[0].expose()).expect("new 2").sealed);
    assert!(dec(&h, Caller::Client, &g.ciphertext, &ctx("a")).is_ok());
}

/// Issue 12: when the new shares cannot be prepared (a custodian key that
/// cannot take one), nothing is written: the attempt ends, the current
/// shares still unseal and the recorded threshold stays.
#[test]
fn a_resplit_whose_shares_cannot_be_prepared_changes_nothing() {
    let (_s, h, shares) = unsealed();
    let a = admin(&h);
    let nonce = h.resplit_init(&a, 2, 2).expect("init").nonce;
    for s in &shares[..2] {
        assert!(matches!(
            h.resplit_update(&nonce, s.expose(), &mut accept)
                .expect("give"),
            ResplitProgress::Waiting(_)
        ));
    }
    let mut seen = Vec::new();
    let mut refuse = |new: &[SecretBuf]| {
        seen = new.iter().map(|s| s.expose().to_vec()).collect();
        Err("custodian key 2 refused".to_string())
    };
    let e = h
        .resplit_update(&nonce, shares[2].expose(), &mut refuse)
        .expect_err("prepare failed");
    assert!(
        matches!(&e, HsmError::InvalidArgument(m) if m.contains("custodian key 2 refused") && m.contains("still unseal")),
        "{e}"
    );
    assert_eq!(seen.len(), 2, "prepare saw the two new shares");
    assert!(h.resplit_status().is_none(), "the attempt ended");
    assert_eq!((h.status().threshold, h.status().shares), (3, 5));
    h.seal(&admin(&h)).expect("seal");
    for new in &seen {
        assert!(matches!(h.unseal(new), Err(HsmError::InvalidShare(_))));
    }
    for s in &shares[2..5] {
        h.unseal(s.expose()).expect("a current share");
    }
    assert!(!h.status().sealed);
}

#[test]
fn the_audit_key_signs_rotates_and_is_sealed_like_the_rest() {
    let (s, h, shares) = setup(3, 5);
    assert!(matches!(
        h.audit_sign(&|_| b"x".to_vec()),
        Err(HsmError::Sealed)
    ));
    reunseal(&h, &shares);
    assert_eq!(h.take_events(), [HsmEvent::AuditKeyCreated(1)]);
    let sig = h.audit_sign(&|_| b"checkpoint 1".to_vec()).expect("sign");
    let keys = h.audit_public_keys().expect("keys");
    assert_eq!((sig.version, keys.len()), (1, 1));
    assert!(audit_key::verify(
        &keys[0].public,
        b"checkpoint 1",
        &sig.signature
    ));

    let a = admin(&h);
    let (bob, carol) = user_and_auditor(&h, &a);
    for who in [&bob, &carol] {
        assert!(matches!(
            h.audit_key_rotate(who),
            Err(HsmError::PermissionDenied(_))
        ));
    }
    let v2 = h.audit_key_rotate(&a).expect("rotate");
    assert!(v2.active && v2.version == 2);
    let sig2 = h.audit_sign(&|_| b"checkpoint 2".to_vec()).expect("sign");
    assert_eq!(sig2.version, 2);

    // Across a seal the same keys come back, and no new one is made.
    h.seal(&a).expect("seal");
    reunseal(&h, &shares);
    assert!(h.take_events().is_empty());
    let after = h.audit_public_keys().expect("keys");
    assert_eq!(after.len(), 2);
    assert_eq!(after[0].public, keys[0].public);
    assert!(audit_key::verify(
        &after[1].public,
        b"checkpoint 2",
        &sig2.signature
    ));

    // A rolled-back audit key row (version 1 only, seed and all) is
    // tampering: it cannot come back to sign.
    let a = admin(&h);
    let old = row(&s, KIND_AUDIT_KEY, audit_key::ID).expect("row");
    h.audit_key_rotate(&a).expect("rotate");
    h.seal(&a).expect("seal");
    s.objects
        .lock()
        .expect("lock")
        .insert((KIND_AUDIT_KEY, audit_key::ID.to_string()), old);
    reunseal(&h, &shares);
    assert!(
        tamper_whys(&h)
            .iter()
            .any(|w| w.starts_with("audit_key audit"))
    );
    assert!(matches!(
        h.audit_sign(&|_| b"x".to_vec()),
        Err(HsmError::Tampered(_))
    ));
}

#[test]
fn pkcs11_objects_persist_sealed_and_belong_to_their_maker() {
    use crate::pkcs11::{Ckr, ck::*};
    let (s, h, shares) = unsealed();
    let a = admin(&h);
    let (bob, _) = user_and_auditor(&h, &a);
    h.operator_add(&a, "dave", Role::CryptoUser, b"dave-password-1")
        .expect("add");
    let dave = h.login("dave", b"dave-password-1").expect("dave");
    let yes = vec![1u8];
    let label = b"ORACLE.TDE.HSM.MK.06".to_vec();
    let token = vec![
        (CKA_TOKEN, yes.clone()),
        (CKA_LABEL, label.clone()),
        (CKA_VALUE_LEN, 32u64.to_ne_bytes().to_vec()),
    ];
    let made = h
        .p11_generate(&bob, 7, CKM_AES_KEY_GEN, &token, &Vec::new())
        .expect("generate");
    let id = made[0].id;
    let session_key = h
        .p11_generate(&bob, 7, CKM_AES_KEY_GEN, &Vec::new(), &Vec::new())
        .expect("session key")[0]
        .id;
    let iv = [3u8; 12];
    let ct = h
        .p11_object_crypt(&bob, 7, id, true, CKM_AES_GCM, &iv, b"", b"table key")
        .expect("encrypt");
    // The store holds the object sealed: no label, no key in the clear.
    let stored = row(&s, p11::KIND_P11_OBJECT, &format!("{id:016x}")).expect("row");
    assert!(
        !stored
            .blob
            .windows(label.len())
            .any(|w| w == label.as_slice())
    );
    assert!(row(&s, p11::KIND_P11_OBJECT, &format!("{session_key:016x}")).is_none());
    // Another user, another login of the same user, and an officer's use.
    let no = |e: HsmError| matches!(e, HsmError::Pkcs11(Ckr::CKR_OBJECT_HANDLE_INVALID, _));
    assert!(no(h
        .p11_object_crypt(&dave, 7, id, true, CKM_AES_GCM, &iv, b"", b"x")
        .expect_err("dave")));
    assert!(no(h
        .p11_object_crypt(&bob, 8, session_key, true, CKM_AES_GCM, &iv, b"", b"x")
        .expect_err("other login")));
    assert!(matches!(
        h.p11_object_crypt(&a, 7, id, true, CKM_AES_GCM, &iv, b"", b"x"),
        Err(HsmError::PermissionDenied(_))
    ));
    assert!(h.p11_list(&dave, 9).expect("list").is_empty());
    assert_eq!(h.p11_list(&a, 1).expect("officer list").len(), 1);
    assert_eq!(h.p11_list(&bob, 7).expect("list").len(), 2);
    assert_eq!(h.p11_list(&bob, 8).expect("list").len(), 1);
    // Relabel; seal and unseal: the token object and its new label stay,
    // the session object is gone.
    h.p11_set(&bob, 7, id, &vec![(CKA_LABEL, b"renamed".to_vec())])
        .expect("set");
    assert!(
        h.p11_set(&bob, 7, id, &vec![(CKA_SENSITIVE, vec![0])])
            .is_err()
    );
    h.seal(&a).expect("seal");
    reunseal(&h, &shares);
    let bob = h.login("bob", b"bob-password-1").expect("bob");
    let list = h.p11_list(&bob, 7).expect("list");
    assert_eq!(list.len(), 1);
    assert!(list[0].attrs.contains(&(CKA_LABEL, b"renamed".to_vec())));
    let pt = h
        .p11_object_crypt(&bob, 1, id, false, CKM_AES_GCM, &iv, b"", ct.expose())
        .expect("decrypt after unseal");
    assert_eq!(pt.expose(), b"table key");
    // A row changed on disk is tampering.
    let mut bad = row(&s, p11::KIND_P11_OBJECT, &format!("{id:016x}")).expect("row");
    let n = bad.blob.len();
    bad.blob[n - 1] ^= 1;
    s.objects
        .lock()
        .expect("lock")
        .insert((p11::KIND_P11_OBJECT, bad.id.clone()), bad);
    h.seal(&h.login("admin", PW).expect("admin")).expect("seal");
    reunseal(&h, &shares);
    assert!(
        tamper_whys(&h)
            .iter()
            .any(|w| w.starts_with("pkcs11_object"))
    );
    // Destroy removes it for good (and from the manifest).
    h.operator_add(
        &h.login("admin", PW).expect("admin"),
        "erin",
        Role::CryptoUser,
        b"erin-password-1",
    )
    .expect("add");
    let erin = h.login("erin", b"erin-password-1").expect("erin");
    let k = h
        .p11_generate(&erin, 1, CKM_AES_KEY_GEN, &token, &Vec::new())
        .expect("generate")[0]
        .id;
    h.p11_destroy(&erin, 1, k).expect("destroy");
    assert!(row(&s, p11::KIND_P11_OBJECT, &format!("{k:016x}")).is_none());
    assert!(h.p11_destroy(&erin, 1, k).is_err());
    // An officer relabels and destroys a user's token object (it uses
    // none: above); another crypto user can do neither.
    let k = h
        .p11_generate(&erin, 1, CKM_AES_KEY_GEN, &token, &Vec::new())
        .expect("generate")[0]
        .id;
    let officer = h.login("admin", PW).expect("admin");
    let dave = h.login("dave", b"dave-password-1").expect("dave");
    let relabel = vec![(CKA_LABEL, b"by-the-officer".to_vec())];
    assert!(h.p11_set(&dave, 2, k, &relabel).is_err());
    assert!(h.p11_destroy(&dave, 2, k).is_err());
    h.p11_set(&officer, 3, k, &relabel)
        .expect("officer relabels");
    h.p11_destroy(&officer, 3, k).expect("officer destroys");
    assert!(row(&s, p11::KIND_P11_OBJECT, &format!("{k:016x}")).is_none());
}
