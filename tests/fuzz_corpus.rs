//! A short fuzzing run in every `cargo test` (and so in CI): each harness of
//! `tde_plugin::fuzz`, `tde_hsm::fuzz`, `tde_protocol::fuzz` and
//! `tde_sidecar::custodian::fuzz` gets the
//! committed seed corpus (`fuzz/corpus/NAME/`),
//! then mutations of it (bit flips, byte changes, cuts, splices, repeats)
//! from a fixed-seed generator, for a bounded time. The same harnesses run
//! under libFuzzer with `cargo +nightly fuzz run NAME fuzz/corpus/NAME`.

use std::path::PathBuf;
use std::time::{Duration, Instant};
use tde_protocol::{Op, P11Call, P11Key, Request, SecretBytes};

/// Time per target.
const BUDGET: Duration = Duration::from_secs(3);

fn corpus(name: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(name);
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| std::fs::read(e.expect("entry").path()).expect("seed"))
        .collect();
    seeds.sort();
    assert!(
        seeds.len() >= 3,
        "{}: the seed corpus is missing",
        dir.display()
    );
    seeds
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One mutation of `seed` (with `other` for splices).
fn mutate(rng: &mut Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(7) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = [0, 0xff, b'"', b'{', b'1', b'\\', 0x80][rng.below(7)];
            }
            2 => v.truncate(rng.below(v.len() + 1)),
            3 => {
                let at = rng.below(v.len() + 1);
                let from = rng.below(other.len() + 1);
                let n = rng.below(other.len() - from + 1);
                v.splice(at..at, other[from..from + n].iter().copied());
            }
            4 if !v.is_empty() => {
                let from = rng.below(v.len());
                let n = rng.below((v.len() - from).min(64) + 1);
                let piece = v[from..from + n].to_vec();
                let at = rng.below(v.len() + 1);
                v.splice(at..at, piece);
            }
            5 if v.len() >= 8 => {
                let i = rng.below(v.len() - 7);
                let n = [0u64, 1, 63, 64, 8223, 8224, 8225, u64::MAX][rng.below(8)];
                v[i..i + 8].copy_from_slice(&n.to_be_bytes());
            }
            _ => {
                let at = rng.below(v.len() + 1);
                v.insert(at, rng.next() as u8);
            }
        }
    }
    v
}

fn run(name: &str, harness: fn(&[u8])) {
    let seeds = corpus(name);
    for s in &seeds {
        harness(s);
    }
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ name.len() as u64);
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < BUDGET {
        let a = &seeds[rng.below(seeds.len())];
        let b = &seeds[rng.below(seeds.len())];
        harness(&mutate(&mut rng, a, b));
        n += 1;
    }
    eprintln!("{name}: {} seeds, {n} mutations in {BUDGET:?}", seeds.len());
    assert!(n > 1000, "{name}: only {n} inputs");
}

#[test]
fn file_header_survives_the_corpus_and_mutations() {
    run("file_header", tde_plugin::fuzz::file_header);
}

#[test]
fn key_file_survives_the_corpus_and_mutations() {
    run("key_file", tde_plugin::fuzz::key_file);
}

#[test]
fn control_line_survives_the_corpus_and_mutations() {
    run("control_line", tde_plugin::fuzz::control_line);
}

#[test]
fn unseal_share_survives_the_corpus_and_mutations() {
    run("unseal_share", tde_hsm::fuzz::unseal_share);
}

#[test]
fn wrapped_key_survives_the_corpus_and_mutations() {
    run("wrapped_key", tde_hsm::fuzz::wrapped_key);
}

#[test]
fn store_record_survives_the_corpus_and_mutations() {
    run("store_record", tde_hsm::fuzz::store_record);
}

#[test]
fn request_body_survives_the_corpus_and_mutations() {
    run("request_body", tde_protocol::fuzz::request_body);
}

#[test]
fn custodian_key_survives_the_corpus_and_mutations() {
    run("custodian_key", tde_sidecar::custodian::fuzz);
}

/// Writes the seed corpora of the HSM and protocol harnesses from real
/// encodings: `cargo test --test fuzz_corpus -- --ignored write_seeds`.
#[test]
#[ignore = "regenerates fuzz/corpus; run by hand"]
fn write_seeds() {
    use tde_hsm::mek::MekRecord;
    use tde_hsm::seal;
    use tde_hsm::secret::{DataKey, MasterKeyMaterial, UnsealKey};
    use tde_hsm::wrap::{self, VersionKeys};
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let put = |dir: &str, name: &str, bytes: &[u8]| {
        let d = root.join(dir);
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(d.join(name), bytes).expect("write seed");
    };
    // Shares: a 3-of-5 set and a dev share.
    let key = UnsealKey::generate().expect("key");
    for (i, s) in seal::split(&key, &[5; 16], 3, 5)
        .expect("split")
        .iter()
        .enumerate()
    {
        put("unseal_share", &format!("share-{i}"), s.to_text().expose());
    }
    let dev = seal::split(&key, &[6; 16], 1, 1).expect("split");
    put("unseal_share", "dev", dev[0].to_text().expose());
    put("unseal_share", "not-a-share", b"tde-share-1-AAAA");
    // Wrapped keys under the seed key, in the seed context.
    let mek = MasterKeyMaterial::from_slice(&tde_hsm::fuzz::SEED_KEY).expect("mek");
    for (name, version) in [
        ("pg-main", 1u32),
        ("a", 7),
        (&"k".repeat(128)[..], u32::MAX),
    ] {
        let keys = VersionKeys::derive(&mek, name, version).expect("derive");
        let dek = DataKey::generate().expect("dek");
        let blob =
            wrap::wrap(&keys, name, version, &dek, &tde_hsm::fuzz::seed_context()).expect("wrap");
        put("wrapped_key", &format!("v{version}-{}", name.len()), &blob);
    }
    // Store records: 0 = key record, 1 = operator, 2 = manifest.
    let rec = MekRecord::decode(&{
        // A format 1 record: u8 1 | var name | var description | u64 | u32 | u32 0.
        let mut b = vec![1, 0, 2, b'p', b'g', 0, 0];
        b.extend_from_slice(&5u64.to_be_bytes());
        b.extend_from_slice(&1u32.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        b
    })
    .expect("format 1 record");
    let mut seed = vec![0];
    seed.extend_from_slice(rec.encode().expose());
    put("store_record", "key", &seed);
    // u8 format 1 | var name | u8 role | var PHC string | u32 failed | u8 locked.
    let phc = b"$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo";
    let mut raw = vec![1, 0, 5];
    raw.extend_from_slice(b"admin");
    raw.push(1);
    raw.extend_from_slice(&u16::try_from(phc.len()).expect("len").to_be_bytes());
    raw.extend_from_slice(phc);
    raw.extend_from_slice(&2u32.to_be_bytes());
    raw.push(0);
    let op = tde_hsm::operator::OperatorRecord::decode(&raw).expect("operator record");
    let mut seed = vec![1];
    seed.extend_from_slice(op.encode().expose());
    put("store_record", "operator", &seed);
    let list = tde_hsm::manifest::Manifest::default()
        .with(1, "pg-main", 3)
        .with(2, "admin", 9);
    let mut seed = vec![2];
    seed.extend_from_slice(&list.encode());
    put("store_record", "manifest", &seed);
    // One request body per operation.
    for (i, req) in sample_requests().iter().enumerate() {
        let op = req.op();
        let at = tde_protocol::Op::ALL
            .iter()
            .position(|o| *o == op)
            .expect("op");
        let mut seed = vec![u8::try_from(at).expect("fits")];
        seed.extend_from_slice(&req.encode_body());
        put("request_body", &format!("{i:02}-{}", op.name()), &seed);
    }
}

fn sample_requests() -> Vec<tde_protocol::Request> {
    use tde_protocol::DekRef;
    let ctx: tde_protocol::Context = [("tablespace".to_string(), "ts1".to_string())].into();
    let key = || "pg-main".to_string();
    vec![
        Request::Status,
        Request::GenerateDataKey {
            key: key(),
            context: ctx.clone(),
        },
        Request::Decrypt {
            ciphertext: b"TDEK\x01\x07pg-main".to_vec(),
            context: ctx.clone(),
        },
        Request::ReEncrypt {
            ciphertext: vec![1, 2, 3],
            context: ctx.clone(),
        },
        Request::GenerateRandom { length: 32 },
        Request::Unseal {
            share: SecretBytes::from_slice(b"tde-share-1-AAAA"),
        },
        Request::Seal,
        Request::Login {
            operator: "admin".into(),
            password: SecretBytes::from_slice(b"pw"),
        },
        Request::Zeroize,
        Request::OperatorAdd {
            operator: "bob".into(),
            role: "crypto_user".into(),
            password: SecretBytes::from_slice(b"pw"),
        },
        Request::OperatorPasswd {
            operator: "bob".into(),
            password: SecretBytes::from_slice(b"pw2"),
        },
        Request::OperatorUnlock {
            operator: "bob".into(),
        },
        Request::OperatorList,
        Request::KeyCreate {
            key: key(),
            description: "main".into(),
            rotate_after: 90 * 86400,
        },
        Request::KeyList,
        Request::KeyDescribe { key: key() },
        Request::KeyRotate { key: key() },
        Request::KeyDisable {
            key: key(),
            version: Some(1),
        },
        Request::KeyEnable {
            key: key(),
            version: None,
        },
        Request::KeyScheduleDestroy {
            key: key(),
            version: Some(1),
            days: 7,
            force: true,
        },
        Request::KeyCancelDestroy {
            key: key(),
            version: Some(1),
        },
        Request::KeyDestroy {
            key: key(),
            version: Some(1),
            force: false,
        },
        Request::KeySetRotation {
            key: key(),
            rotate_after: 86400,
        },
        Request::KeyShare {
            key: key(),
            operator: "bob".into(),
        },
        Request::KeyUnshare {
            key: key(),
            operator: "bob".into(),
        },
        Request::RegisterDeks {
            key: key(),
            context: ctx.clone(),
            location: "/srv/ts1".into(),
            deks: vec![DekRef {
                dek_version: 1,
                key_version: 1,
            }],
        },
        Request::WatchKey {
            key: key(),
            version: 1,
            timeout_ms: 1000,
        },
        Request::Reload,
        Request::OperatorRemove {
            operator: "bob".into(),
        },
        Request::TokenCreate { ttl: 3600 },
        Request::TokenLogin {
            token: SecretBytes::from_slice(b"tdet.00"),
        },
        Request::TokenRevoke {
            token: SecretBytes::from_slice(b"tdet.00"),
        },
        Request::ResplitInit {
            threshold: 2,
            shares: 3,
            custodian_keys: vec![b"not a key".to_vec(); 3],
        },
        Request::ResplitUpdate {
            nonce: "00112233".into(),
            share: SecretBytes::from_slice(b"tde-share-1-AAAA"),
        },
        Request::ResplitStatus,
        Request::ResplitCancel,
        Request::ApprovalList,
        Request::Approve { id: 1 },
        Request::ApprovalStatus { id: 1 },
        Request::RekeyReport {
            key: key(),
            context: ctx.clone(),
            location: "/srv/pg-enc".into(),
            state: "progress".into(),
            target: 2,
            done: 1000,
            total: 4096,
        },
        Request::AuditList(tde_protocol::AuditQuery {
            since_ms: Some(1_796_000_000_000),
            limit: Some(10),
            newest: true,
            actor: Some("uid:101".into()),
            operation: Some("decrypt".into()),
            context: ctx.clone(),
            ..Default::default()
        }),
        Request::AuditExport(tde_protocol::AuditQuery {
            until_ms: Some(1_796_000_000_000),
            ..Default::default()
        }),
        Request::AuditRead(tde_protocol::AuditQuery {
            first_seq: Some(1),
            last_seq: Some(1000),
            ..Default::default()
        }),
        Request::AuditExportDone(tde_protocol::AuditQuery {
            first_seq: Some(1),
            last_seq: Some(1000),
            ..Default::default()
        }),
        Request::AuditPrune(tde_protocol::AuditQuery {
            until_ms: Some(1_796_000_000_000),
            ..Default::default()
        }),
        Request::AuditPubkey,
        Request::AuditKeyRotate,
        Request::P11Login {
            operator: "alice".into(),
            password: SecretBytes::from_slice(b"alice-password-1"),
            role: "user".into(),
        },
        Request::P11Logout {
            token: SecretBytes::from_slice(b"tdet.0123456789abcdef"),
        },
        Request::P11Objects {
            token: SecretBytes::from_slice(b"tdet.0123456789abcdef"),
            after: 0,
        },
        p11(Op::P11Encrypt, |c| {
            c.key = P11Key::Master(key());
            c.mechanism = 0x1087;
            c.param = vec![7; 12];
            c.aad = b"table 42".to_vec();
            c.data = SecretBytes::from_slice(&[1; 64]);
        }),
        p11(Op::P11Decrypt, |c| {
            c.key = P11Key::Object(0x1234);
            c.mechanism = 0x1085;
            c.param = vec![7; 16];
            c.data = SecretBytes::from_slice(&[2; 80]);
        }),
        p11(Op::P11Sign, |c| {
            c.key = P11Key::Object(0x1234);
            c.mechanism = 0x43;
            c.param = [0x250u64, 2, 32]
                .iter()
                .flat_map(|x| x.to_be_bytes())
                .collect();
            c.data = SecretBytes::from_slice(&[3; 32]);
        }),
        p11(Op::P11Verify, |c| {
            c.key = P11Key::Object(0x1235);
            c.mechanism = 0x1041;
            c.data = SecretBytes::from_slice(&[3; 32]);
            c.signature = vec![4; 64];
        }),
        p11(Op::P11Generate, |c| {
            c.mechanism = 0x1040;
            c.template = vec![(0x1, vec![1]), (0x3, b"tls-ec".to_vec())];
            c.public_template = vec![(0x180, vec![6, 8, 42, 134, 72, 206, 61, 3, 1, 7])];
        }),
        p11(Op::P11Create, |c| {
            c.template = vec![(0x0, 1u64.to_ne_bytes().to_vec()), (0x11, vec![0x30; 40])];
        }),
        p11(Op::P11Destroy, |c| c.key = P11Key::Object(0x1234)),
        p11(Op::P11SetAttributes, |c| {
            c.key = P11Key::Object(0x1234);
            c.template = vec![(0x3, b"ORACLE.TDE.HSM.MK.02".to_vec())];
        }),
        p11(Op::P11Wrap, |c| {
            c.key = P11Key::Object(0x1234);
            c.target = 0x1236;
            c.mechanism = 0x2109;
        }),
        p11(Op::P11Unwrap, |c| {
            c.key = P11Key::Object(0x1234);
            c.mechanism = 0x210a;
            c.data = SecretBytes::from_slice(&[5; 40]);
            c.template = vec![(0x1, vec![0])];
        }),
    ]
}

/// A PKCS#11 call with a token, as `f` fills it in.
fn p11(op: Op, f: impl FnOnce(&mut P11Call)) -> Request {
    let mut c = P11Call::new(SecretBytes::from_slice(b"tdet.0123456789abcdef"));
    f(&mut c);
    Request::P11(op, c)
}

/// Every operation has a seed.
#[test]
fn every_operation_has_a_request_seed() {
    let ops: std::collections::BTreeSet<u16> =
        sample_requests().iter().map(|r| r.op() as u16).collect();
    assert_eq!(ops.len(), tde_protocol::Op::ALL.len());
    assert_eq!(
        std::fs::read_dir(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/request_body")
        )
        .expect("corpus")
        .count(),
        ops.len()
    );
}

/// The wrapped-key seeds are authentic under the seed key, so the harness
/// reaches the unwrap and rewrap paths, not only the header checks.
#[test]
fn wrapped_key_seeds_unwrap() {
    use tde_hsm::secret::MasterKeyMaterial;
    use tde_hsm::wrap::{self, VersionKeys};
    let mek = MasterKeyMaterial::from_slice(&tde_hsm::fuzz::SEED_KEY).expect("mek");
    for blob in corpus("wrapped_key") {
        let w = tde_hsm::WrappedKey::parse(&blob).expect("header");
        let keys = VersionKeys::derive(&mek, w.key, w.version).expect("derive");
        wrap::unwrap(&keys, &w, &tde_hsm::fuzz::seed_context()).expect("a seed unwraps");
    }
}
