//! `audit.pkcs11_key_use = "summarize"`: successful PKCS#11 signatures,
//! verifications, encryptions and decryptions are counted per process,
//! key, operation and mechanism into one record a second; a refused call
//! and every other operation keep a record of their own. Through
//! `libtde_pkcs11.so` loaded by the `cryptoki` crate, against a real
//! sidecar.

mod common;

use std::time::{Duration, Instant};

use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::Attribute;
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use serde_json::Value;

use common::{Env, add_alice, audit, cryptoki_module};
use tde_protocol::client::{Client, ClientError};
use tde_protocol::{Op, P11Call, P11Key, SecretBytes};

const P256: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// The calls `records` of `op` stand for, and how many records that took.
fn calls(records: &[Value], op: &str, result: &str) -> (u64, usize) {
    let me = std::env::current_exe().expect("exe");
    let mine: Vec<_> = records
        .iter()
        .filter(|r| {
            r["op"] == op
                && r["result"] == result
                && r["actor"]["pid"].as_u64() == Some(u64::from(std::process::id()))
                && r["actor"]["exe"].as_str() == me.to_str()
                && r["actor"]["operator"] == "alice"
        })
        .collect();
    let n = mine.iter().map(|r| r["count"].as_u64().unwrap_or(1)).sum();
    (n, mine.len())
}

#[test]
fn successful_key_uses_are_counted_into_summaries_and_refusals_recorded_one_by_one() {
    let env = Env::with_operations(
        "[audit]\npkcs11_key_use = \"summarize\"",
        r#""generate_random", "pkcs11""#,
    );
    let shares = env.init();
    let daemon = env.serve();
    env.unseal(&shares[..3]);
    add_alice(&env, &[]);
    env.ok_new_password(
        &["operator", "add", "bob", "--role", "crypto_user"],
        "bob-password-1",
    );
    let p11 = cryptoki_module(&env);
    let slot = p11.get_slots_with_token().expect("slots")[0];
    let s = p11.open_rw_session(slot).expect("C_OpenSession");
    s.login(
        UserType::User,
        Some(&AuthPin::from("alice:alice-password-1")),
    )
    .expect("C_Login");
    let (ec_pub, ec) = s
        .generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[Attribute::EcParams(P256.to_vec()), Attribute::Verify(true)],
            &[Attribute::Sign(true), Attribute::Sensitive(true)],
        )
        .expect("EC key pair");
    let (_, rsa) = s
        .generate_key_pair(
            &Mechanism::RsaPkcsKeyPairGen,
            &[
                Attribute::ModulusBits(2048.into()),
                Attribute::PublicExponent(vec![1, 0, 1]),
            ],
            &[Attribute::Sign(true), Attribute::Sensitive(true)],
        )
        .expect("RSA key pair");
    let aes = s
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::ValueLen(32.into()),
                Attribute::Encrypt(true),
                Attribute::Sensitive(true),
            ],
        )
        .expect("AES key");

    // EC signatures and AES encryptions answer on the connection's task,
    // RSA signatures on a worker thread: all are counted.
    let hash = [7u8; 32];
    let mut sig = Vec::new();
    for _ in 0..200 {
        sig = s.sign(&Mechanism::Ecdsa, ec, &hash).expect("C_Sign");
    }
    for _ in 0..10 {
        s.verify(&Mechanism::Ecdsa, ec_pub, &hash, &sig)
            .expect("C_Verify");
    }
    for _ in 0..5 {
        s.sign(&Mechanism::Sha256RsaPkcs, rsa, b"data")
            .expect("RSA C_Sign");
    }
    for _ in 0..50 {
        let mut iv = [1u8; 12];
        let gcm = GcmParams::new(&mut iv, b"aad", 128.into()).expect("gcm");
        s.encrypt(&Mechanism::AesGcm(gcm), aes, &[9u8; 64])
            .expect("C_Encrypt");
    }
    // A signature that does not verify: refused, and recorded alone.
    sig[10] ^= 1;
    let r = s.verify(&Mechanism::Ecdsa, ec_pub, &hash, &sig);
    assert!(
        matches!(r, Err(Error::Pkcs11(RvError::SignatureInvalid, _))),
        "{r:?}"
    );

    // The summaries are written within a second or two, while the
    // sidecar runs.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let records = audit(&env.db());
        if calls(&records, "p11_sign", "ok").0 == 205
            && calls(&records, "p11_encrypt", "ok").0 == 50
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no summary of the key uses after 10 s: {:?}",
            records
                .iter()
                .filter(|r| r["op"].as_str().is_some_and(|o| o.starts_with("p11_")))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Another crypto user naming alice's EC key (its id from the
    // summary) on the same quick path: refused, recorded alone, not
    // counted.
    let ec_id = audit(&env.db())
        .iter()
        .find(|r| {
            r["op"] == "p11_sign"
                && r["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("mechanism 0x1041"))
        })
        .and_then(|r| {
            r["key"]
                .as_str()?
                .strip_prefix("pkcs11:")
                .map(str::to_string)
        })
        .expect("the EC key's summary");
    let mut bob = Client::connect(&env.data_socket()).expect("connect");
    let (token, _) = bob
        .p11_login("bob", SecretBytes::from_slice(b"bob-password-1"), "user")
        .expect("bob logs in");
    let mut call = P11Call::new(token);
    call.key = P11Key::Object(u64::from_str_radix(&ec_id, 16).expect("hex id"));
    call.mechanism = 0x1041;
    call.data = SecretBytes::from_slice(&hash);
    let r = bob.p11_data(Op::P11Sign, call);
    assert!(
        matches!(&r, Err(ClientError::Refused { message, .. }) if message.starts_with("CKR_")),
        "{r:?}"
    );
    drop(bob);

    s.logout().expect("C_Logout");
    drop(s);
    p11.finalize().expect("C_Finalize");
    daemon.stop();

    let records = audit(&env.db());
    let (signed, sign_records) = calls(&records, "p11_sign", "ok");
    assert_eq!(signed, 205, "alice's signatures, not bob's attempt");
    let refused: Vec<&Value> = records
        .iter()
        .filter(|r| r["op"] == "p11_sign" && r["actor"]["operator"] == "bob")
        .collect();
    assert_eq!(refused.len(), 1, "bob's attempt has its own record");
    assert_eq!(refused[0]["result"], "error");
    assert!(refused[0]["count"].is_null());
    assert!(
        (2..=10).contains(&sign_records),
        "two keys' signatures in a few one-second summaries, not one record each: {sign_records}"
    );
    assert_eq!(calls(&records, "p11_verify", "ok").0, 10);
    assert_eq!(calls(&records, "p11_encrypt", "ok").0, 50);
    assert_eq!(
        calls(&records, "p11_verify", "error"),
        (1, 1),
        "the refusal has a record of its own"
    );
    assert_eq!(
        calls(&records, "p11_generate", "ok"),
        (3, 3),
        "key generation is recorded one by one"
    );
    let ecdsa: Vec<&Value> = records
        .iter()
        .filter(|r| r["op"] == "p11_sign" && r["count"].is_u64())
        .filter(|r| {
            r["detail"]
                .as_str()
                .unwrap_or("")
                .contains("mechanism 0x1041")
        })
        .collect();
    assert!(
        !ecdsa.is_empty(),
        "a summary names the mechanism (CKM_ECDSA)"
    );
    for r in ecdsa {
        assert!(
            r["key"].as_str().unwrap_or("").starts_with("pkcs11:"),
            "{r}"
        );
        let d = r["detail"].as_str().unwrap_or("");
        assert!(
            d.contains("successful p11_sign calls") && d.contains(" to "),
            "{d}"
        );
    }
}
