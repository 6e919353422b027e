//! Issue 14, must-show 4: what an Oracle-like engine does with an HSM
//! wallet, as a Rust application of `libtde_pkcs11.so` through the
//! `cryptoki` crate. It makes a labelled AES-256 master key, finds it by
//! label after the sidecar restarts (without restarting itself),
//! encrypts and decrypts 64 table keys with `CKM_AES_CBC_PAD` and
//! `CKM_AES_GCM`, rotates to a new labelled key (re-encrypting every
//! table key, then destroying the old key), and the sidecar's audit log
//! names this process for every call. The table keys are on no file.

mod common;

use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;

use common::{Env, add_alice, audit, cryptoki_module};

const PIN: &str = "alice:alice-password-1";

/// Oracle's label for a TDE master key: `ORACLE.TDE.HSM.MK.` and the
/// key's id in hex.
fn label(n: u8) -> String {
    format!("ORACLE.TDE.HSM.MK.06{n:02X}A0B1C2D3E4F5060708090A0B0C0D0E")
}

fn new_master_key(session: &Session, n: u8) -> ObjectHandle {
    session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Token(true),
                Attribute::Label(label(n).into_bytes()),
                Attribute::Id(vec![0x06, n]),
                Attribute::ValueLen(32.into()),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
            ],
        )
        .expect("C_GenerateKey")
}

fn find(session: &Session, n: u8) -> Vec<ObjectHandle> {
    session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(label(n).into_bytes()),
        ])
        .expect("C_FindObjects")
}

/// A table key sealed twice: `(CBC IV | CBC ciphertext, GCM IV |
/// ciphertext and tag)`.
struct Sealed {
    cbc: ([u8; 16], Vec<u8>),
    gcm: ([u8; 12], Vec<u8>),
}

fn seal(session: &Session, key: ObjectHandle, i: usize, table_key: &[u8]) -> Sealed {
    let mut cbc_iv = [0u8; 16];
    let mut gcm_iv = [0u8; 12];
    session.generate_random_slice(&mut cbc_iv).expect("random");
    session.generate_random_slice(&mut gcm_iv).expect("random");
    let aad = format!("table {i}");
    let cbc = session
        .encrypt(&Mechanism::AesCbcPad(cbc_iv), key, table_key)
        .expect("CBC_PAD encrypt");
    let mut iv = gcm_iv;
    let gcm = session
        .encrypt(
            &Mechanism::AesGcm(GcmParams::new(&mut iv, aad.as_bytes(), 128.into()).expect("gcm")),
            key,
            table_key,
        )
        .expect("GCM encrypt");
    Sealed {
        cbc: (cbc_iv, cbc),
        gcm: (gcm_iv, gcm),
    }
}

fn open(session: &Session, key: ObjectHandle, i: usize, s: &Sealed) -> (Vec<u8>, Vec<u8>) {
    let aad = format!("table {i}");
    let cbc = session
        .decrypt(&Mechanism::AesCbcPad(s.cbc.0), key, &s.cbc.1)
        .expect("CBC_PAD decrypt");
    let mut iv = s.gcm.0;
    let gcm = session
        .decrypt(
            &Mechanism::AesGcm(GcmParams::new(&mut iv, aad.as_bytes(), 128.into()).expect("gcm")),
            key,
            &s.gcm.1,
        )
        .expect("GCM decrypt");
    (cbc, gcm)
}

fn login(session: &Session) {
    session
        .login(UserType::User, Some(&AuthPin::from(PIN)))
        .expect("C_Login");
}

#[test]
fn an_oracle_like_engine_keeps_its_master_key_in_the_token_and_rotates_it() {
    let env = Env::with_operations("", r#""generate_random", "pkcs11""#);
    let shares = env.init();
    let daemon = env.serve();
    env.unseal(&shares[..3]);
    add_alice(&env, &[]);
    let p11 = cryptoki_module(&env);
    let slot = p11.get_slots_with_token().expect("slots")[0];
    let session = p11.open_rw_session(slot).expect("C_OpenSession");
    login(&session);

    // ADMINISTER KEY MANAGEMENT SET KEY: the engine makes its master key.
    let mk1 = new_master_key(&session, 1);
    assert_eq!(find(&session, 1), vec![mk1]);

    // The sidecar restarts under the running engine: a call meanwhile is a
    // device error, then the same process logs in again and finds its
    // key by label.
    daemon.stop();
    let down = session.encrypt(&Mechanism::AesCbcPad([0; 16]), mk1, &[0u8; 32]);
    assert!(
        matches!(
            down,
            Err(Error::Pkcs11(
                RvError::DeviceError | RvError::UserNotLoggedIn,
                _
            ))
        ),
        "{down:?}"
    );
    let _daemon = env.serve();
    env.unseal(&shares[..3]);
    let lapsed = session.encrypt(&Mechanism::AesCbcPad([0; 16]), mk1, &[0u8; 32]);
    assert!(
        matches!(lapsed, Err(Error::Pkcs11(RvError::UserNotLoggedIn, _))),
        "the login ended with the sidecar: {lapsed:?}"
    );
    login(&session);
    let found = find(&session, 1);
    assert_eq!(found.len(), 1, "the master key survived the restart");
    let mk1 = found[0];
    let attrs = session
        .get_attributes(
            mk1,
            &[
                cryptoki::object::AttributeType::Sensitive,
                cryptoki::object::AttributeType::Extractable,
                cryptoki::object::AttributeType::Value,
            ],
        )
        .expect("C_GetAttributeValue");
    assert!(attrs.contains(&Attribute::Sensitive(true)), "{attrs:?}");
    assert!(attrs.contains(&Attribute::Extractable(false)), "{attrs:?}");
    assert!(
        !attrs.iter().any(|a| matches!(a, Attribute::Value(_))),
        "the key's value never leaves: {attrs:?}"
    );

    // 64 table keys, sealed both ways and opened again.
    let table_keys: Vec<Vec<u8>> = (0..64)
        .map(|_| {
            let mut k = vec![0u8; 32];
            session.generate_random_slice(&mut k).expect("random");
            k
        })
        .collect();
    let mut sealed: Vec<Sealed> = table_keys
        .iter()
        .enumerate()
        .map(|(i, k)| seal(&session, mk1, i, k))
        .collect();
    for (i, (k, s)) in table_keys.iter().zip(&sealed).enumerate() {
        assert_ne!(&s.cbc.1[..32], k.as_slice());
        let (cbc, gcm) = open(&session, mk1, i, s);
        assert_eq!(&cbc, k);
        assert_eq!(&gcm, k);
    }
    // A changed tag, or another table's AAD, opens nothing.
    let mut bad = sealed[0].gcm.clone();
    bad.1[40] ^= 1;
    let mut iv = bad.0;
    let r = session.decrypt(
        &Mechanism::AesGcm(GcmParams::new(&mut iv, b"table 0", 128.into()).expect("gcm")),
        mk1,
        &bad.1,
    );
    assert!(
        matches!(r, Err(Error::Pkcs11(RvError::EncryptedDataInvalid, _))),
        "{r:?}"
    );

    // Rotation: a new labelled key, every table key re-encrypted, the old
    // key destroyed.
    let mk2 = new_master_key(&session, 2);
    for (i, s) in sealed.iter_mut().enumerate() {
        let (k, _) = open(&session, mk1, i, s);
        *s = seal(&session, mk2, i, &k);
    }
    session.destroy_object(mk1).expect("C_DestroyObject");
    assert!(find(&session, 1).is_empty(), "the old key is gone");
    let r = session.encrypt(&Mechanism::AesCbcPad([0; 16]), mk1, &[0u8; 32]);
    assert!(r.is_err(), "a destroyed key's handle is dead: {r:?}");
    for (i, (k, s)) in table_keys.iter().zip(&sealed).enumerate() {
        let (cbc, gcm) = open(&session, mk2, i, s);
        assert_eq!(&cbc, k);
        assert_eq!(&gcm, k);
    }
    session.logout().expect("C_Logout");
    drop(session);
    p11.finalize().expect("C_Finalize");

    // The audit log has every call, each naming this process.
    let me = std::env::current_exe().expect("exe");
    let records = audit(&env.db());
    let mine = |op: &str| {
        records
            .iter()
            .filter(|r| {
                r["op"] == op
                    && r["result"] == "ok"
                    && r["actor"]["pid"].as_u64() == Some(u64::from(std::process::id()))
                    && r["actor"]["exe"].as_str() == me.to_str()
            })
            .count()
    };
    assert_eq!(mine("p11_generate"), 2);
    assert_eq!(mine("p11_destroy"), 1);
    // 64 x (2 seals + 2 opens) + the rotation's 64 x (2 opens + 2 seals)
    // + the last 64 x 2 opens.
    assert_eq!(mine("p11_encrypt"), 64 * 2 + 64 * 2);
    assert_eq!(mine("p11_decrypt"), 64 * 2 + 64 * 2 + 64 * 2);
    assert!(mine("p11_login") >= 2);
    let generated: Vec<_> = records
        .iter()
        .filter(|r| r["op"] == "p11_generate")
        .map(|r| r["detail"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        generated.iter().any(|d| d.contains(&label(1))),
        "the key's label is in the record: {generated:?}"
    );

    // No table key is on any file the sidecar wrote.
    for k in &table_keys {
        let found = common::pg::files_containing(env.dir.path(), k);
        assert!(found.is_empty(), "a table key in {found:?}");
    }
}
