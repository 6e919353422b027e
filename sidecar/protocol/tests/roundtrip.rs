//! Property tests: every request and response encodes and decodes to itself,
//! and no byte string makes a decoder panic.

use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;
use tde_protocol::{
    AuditKeyInfo, AuditPage, AuditQuery, AuditRange, DekRef, ErrorCode, Frame, KeyInfo,
    KeyReference, KeyVersionInfo, OperatorInfo, Request, ResplitInfo, Response, SecretBytes,
    StatusInfo,
};

fn p11_key() -> impl Strategy<Value = tde_protocol::P11Key> {
    prop_oneof![
        Just(tde_protocol::P11Key::None),
        name().prop_map(tde_protocol::P11Key::Master),
        any::<u64>().prop_map(tde_protocol::P11Key::Object),
    ]
}

fn attrs() -> impl Strategy<Value = tde_protocol::P11Attrs> {
    vec((any::<u64>(), vec(any::<u8>(), 0..40)), 0..5)
}

fn secret() -> impl Strategy<Value = SecretBytes> {
    vec(any::<u8>(), 0..64).prop_map(SecretBytes::new)
}

fn context() -> impl Strategy<Value = tde_protocol::Context> {
    btree_map(".{0,12}", ".{0,12}", 0..5)
}

fn name() -> impl Strategy<Value = String> {
    ".{0,24}"
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        Just(()).prop_map(|_| Request::Status),
        (name(), context()).prop_map(|(key, context)| Request::GenerateDataKey { key, context }),
        (vec(any::<u8>(), 0..200), context()).prop_map(|(ciphertext, context)| Request::Decrypt {
            ciphertext,
            context
        }),
        (vec(any::<u8>(), 0..200), context()).prop_map(|(ciphertext, context)| {
            Request::ReEncrypt {
                ciphertext,
                context,
            }
        }),
        any::<u32>().prop_map(|length| Request::GenerateRandom { length }),
        secret().prop_map(|share| Request::Unseal { share }),
        Just(()).prop_map(|_| Request::Seal),
        (name(), secret()).prop_map(|(operator, password)| Request::Login { operator, password }),
        (name(), secret(), name()).prop_map(|(operator, password, role)| Request::P11Login {
            operator,
            password,
            role
        }),
        secret().prop_map(|token| Request::P11Logout { token }),
        (secret(), any::<u64>()).prop_map(|(token, after)| Request::P11Objects { token, after }),
        (
            (secret(), p11_key(), any::<u64>(), any::<u64>()),
            (vec(any::<u8>(), 0..20), vec(any::<u8>(), 0..50), secret()),
            (vec(any::<u8>(), 0..64), attrs(), attrs()),
            0usize..10,
        )
            .prop_map(
                |(
                    (token, key, target, mechanism),
                    (param, aad, data),
                    (signature, template, public_template),
                    op,
                )| {
                    let op = [
                        tde_protocol::Op::P11Encrypt,
                        tde_protocol::Op::P11Decrypt,
                        tde_protocol::Op::P11Sign,
                        tde_protocol::Op::P11Verify,
                        tde_protocol::Op::P11Generate,
                        tde_protocol::Op::P11Create,
                        tde_protocol::Op::P11Destroy,
                        tde_protocol::Op::P11SetAttributes,
                        tde_protocol::Op::P11Wrap,
                        tde_protocol::Op::P11Unwrap,
                    ][op];
                    Request::P11(
                        op,
                        tde_protocol::P11Call {
                            token,
                            key,
                            target,
                            mechanism,
                            param,
                            aad,
                            data,
                            signature,
                            template,
                            public_template,
                        },
                    )
                }
            ),
        Just(()).prop_map(|_| Request::Zeroize),
        (name(), name(), secret()).prop_map(|(operator, role, password)| Request::OperatorAdd {
            operator,
            role,
            password
        }),
        (name(), secret())
            .prop_map(|(operator, password)| Request::OperatorPasswd { operator, password }),
        name().prop_map(|operator| Request::OperatorUnlock { operator }),
        Just(()).prop_map(|_| Request::OperatorList),
        (name(), name(), any::<u64>()).prop_map(|(key, description, rotate_after)| {
            Request::KeyCreate {
                key,
                description,
                rotate_after,
            }
        }),
        Just(()).prop_map(|_| Request::KeyList),
        name().prop_map(|key| Request::KeyDescribe { key }),
        (
            any::<u32>(),
            any::<u32>(),
            vec(vec(any::<u8>(), 0..300), 0..4)
        )
            .prop_map(|(threshold, shares, custodian_keys)| Request::ResplitInit {
                threshold,
                shares,
                custodian_keys
            }),
        name().prop_map(|key| Request::KeyRotate { key }),
        (name(), name()).prop_map(|(key, operator)| Request::KeyShare { key, operator }),
        (name(), name()).prop_map(|(key, operator)| Request::KeyUnshare { key, operator }),
        (name(), option::of(any::<u32>()))
            .prop_map(|(key, version)| Request::KeyDisable { key, version }),
        (name(), option::of(any::<u32>()))
            .prop_map(|(key, version)| Request::KeyEnable { key, version }),
        (
            name(),
            option::of(any::<u32>()),
            any::<u32>(),
            any::<bool>()
        )
            .prop_map(|(key, version, days, force)| Request::KeyScheduleDestroy {
                key,
                version,
                days,
                force
            }),
        (name(), option::of(any::<u32>()))
            .prop_map(|(key, version)| Request::KeyCancelDestroy { key, version }),
        (name(), option::of(any::<u32>()), any::<bool>()).prop_map(|(key, version, force)| {
            Request::KeyDestroy {
                key,
                version,
                force,
            }
        }),
        (name(), any::<u64>())
            .prop_map(|(key, rotate_after)| Request::KeySetRotation { key, rotate_after }),
        (
            name(),
            context(),
            name(),
            vec(
                (any::<u32>(), any::<u32>()).prop_map(|(dek_version, key_version)| DekRef {
                    dek_version,
                    key_version
                }),
                0..5
            )
        )
            .prop_map(|(key, context, location, deks)| Request::RegisterDeks {
                key,
                context,
                location,
                deks
            }),
        (name(), any::<u32>(), any::<u32>()).prop_map(|(key, version, timeout_ms)| {
            Request::WatchKey {
                key,
                version,
                timeout_ms,
            }
        }),
        (
            name(),
            context(),
            name(),
            name(),
            any::<u32>(),
            any::<[u64; 2]>()
        )
            .prop_map(
                |(key, context, location, state, target, n)| Request::RekeyReport {
                    key,
                    context,
                    location,
                    state,
                    target,
                    done: n[0],
                    total: n[1],
                }
            ),
        audit_query().prop_map(Request::AuditList),
        audit_query().prop_map(|q| Request::AuditExport(AuditQuery {
            since_ms: q.since_ms,
            until_ms: q.until_ms,
            first_seq: q.first_seq,
            last_seq: q.last_seq,
            ..AuditQuery::default()
        })),
        (option::of(any::<u64>()), option::of(any::<u64>())).prop_map(|(first_seq, last_seq)| {
            Request::AuditRead(AuditQuery {
                first_seq,
                last_seq,
                ..AuditQuery::default()
            })
        }),
        option::of(any::<u64>()).prop_map(|until_ms| Request::AuditPrune(AuditQuery {
            until_ms,
            ..AuditQuery::default()
        })),
        Just(()).prop_map(|_| Request::AuditPubkey),
        Just(()).prop_map(|_| Request::AuditKeyRotate),
    ]
}

fn audit_query() -> impl Strategy<Value = AuditQuery> {
    (
        vec(option::of(any::<u64>()), 4),
        option::of(any::<u32>()),
        any::<bool>(),
        vec(option::of(name()), 4),
        context(),
    )
        .prop_map(|(n, limit, newest, s, context)| AuditQuery {
            since_ms: n[0],
            until_ms: n[1],
            first_seq: n[2],
            last_seq: n[3],
            limit,
            newest,
            actor: s[0].clone(),
            operation: s[1].clone(),
            key: s[2].clone(),
            context,
            result: s[3].clone(),
        })
}

fn audit_keys() -> impl Strategy<Value = Vec<AuditKeyInfo>> {
    vec(
        (
            any::<u32>(),
            any::<u64>(),
            vec(any::<u8>(), 32),
            any::<bool>(),
        )
            .prop_map(|(version, created, public, active)| AuditKeyInfo {
                version,
                created,
                public,
                active,
            }),
        0..3,
    )
}

fn key_info() -> impl Strategy<Value = KeyInfo> {
    (
        name(),
        name(),
        any::<u64>(),
        any::<u32>(),
        any::<bool>(),
        vec(
            (any::<u32>(), name(), any::<u64>(), option::of(any::<u64>())).prop_map(
                |(version, state, created, destroy_at)| KeyVersionInfo {
                    version,
                    state,
                    created,
                    destroy_at,
                },
            ),
            0..4,
        ),
        any::<u64>(),
        vec(
            (context(), any::<u32>(), any::<u32>(), name(), any::<u64>()).prop_map(
                |(context, dek_version, key_version, location, last_seen)| KeyReference {
                    context,
                    dek_version,
                    key_version,
                    location,
                    last_seen,
                },
            ),
            0..3,
        ),
        name(),
        vec(name(), 0..3),
    )
        .prop_map(
            |(
                name,
                description,
                created,
                primary_version,
                tampered,
                versions,
                rotate_after,
                references,
                owner,
                shared_with,
            )| KeyInfo {
                name,
                description,
                created,
                primary_version,
                tampered,
                versions,
                rotate_after,
                references,
                owner,
                shared_with,
            },
        )
}

fn response() -> impl Strategy<Value = (u16, Response)> {
    use tde_protocol::Op;
    let sinks = vec(
        (name(), any::<[u64; 2]>(), option::of(name())).prop_map(|(name, n, error)| {
            tde_protocol::AuditSinkInfo {
                name,
                delivered: n[0],
                lag: n[1],
                error,
            }
        }),
        0..3,
    );
    let status = (any::<[bool; 4]>(), any::<[u32; 4]>(), name(), name(), sinks).prop_map(
        |(b, n, server_version, store_id, audit_sinks)| {
            Response::Status(StatusInfo {
                initialized: b[0],
                sealed: b[1],
                zeroized: b[2],
                dev_mode: b[3],
                threshold: n[0],
                shares: n[1],
                progress: n[2],
                key_count: n[3],
                server_version,
                store_id,
                audit_sinks,
            })
        },
    );
    prop_oneof![
        status.prop_map(|r| (Op::Status as u16, r)),
        (name(), any::<u32>(), secret(), vec(any::<u8>(), 0..100)).prop_map(
            |(key, version, plaintext, ciphertext)| (
                Op::GenerateDataKey as u16,
                Response::DataKey {
                    key,
                    version,
                    plaintext,
                    ciphertext
                }
            )
        ),
        (name(), any::<u32>(), secret()).prop_map(|(key, version, plaintext)| (
            Op::Decrypt as u16,
            Response::Decrypted {
                key,
                version,
                plaintext
            }
        )),
        (name(), any::<u32>(), any::<u32>(), vec(any::<u8>(), 0..100)).prop_map(
            |(key, version, source_version, ciphertext)| (
                Op::ReEncrypt as u16,
                Response::ReEncrypted {
                    key,
                    version,
                    source_version,
                    ciphertext
                }
            )
        ),
        secret().prop_map(|bytes| (Op::GenerateRandom as u16, Response::Random { bytes })),
        (name(), name())
            .prop_map(|(operator, role)| (Op::Login as u16, Response::LoggedIn { operator, role })),
        Just(()).prop_map(|_| (Op::OperatorAdd as u16, Response::Done)),
        (secret(), any::<u64>())
            .prop_map(|(token, ttl)| (Op::P11Login as u16, Response::Token { token, ttl })),
        secret().prop_map(|data| (Op::P11Decrypt as u16, Response::P11Data { data })),
        (
            vec(key_info(), 0..3),
            vec(
                (any::<u64>(), attrs())
                    .prop_map(|(id, attrs)| tde_protocol::P11ObjectInfo { id, attrs }),
                0..4
            ),
            any::<bool>()
        )
            .prop_map(|(keys, objects, more)| (
                Op::P11Objects as u16,
                Response::P11Objects {
                    keys,
                    objects,
                    more
                }
            )),
        vec(
            (name(), name(), any::<bool>(), any::<u32>()).prop_map(
                |(name, role, locked, failed_logins)| OperatorInfo {
                    name,
                    role,
                    locked,
                    failed_logins
                }
            ),
            0..4
        )
        .prop_map(|o| (Op::OperatorList as u16, Response::Operators(o))),
        key_info().prop_map(|k| (Op::KeyRotate as u16, Response::Key(k))),
        vec(key_info(), 0..4).prop_map(|k| (Op::KeyList as u16, Response::Keys(k))),
        (name(), any::<u32>()).prop_map(|(key, version)| (
            Op::WatchKey as u16,
            Response::KeyPrimary { key, version }
        )),
        (
            name(),
            any::<[u32; 4]>(),
            vec(secret(), 0..3),
            vec("[0-9A-F]{40}", 0..3),
            vec(".{0,200}", 0..3)
        )
            .prop_map(|(nonce, n, new_shares, fingerprints, encrypted_shares)| (
                Op::ResplitUpdate as u16,
                Response::Resplit(ResplitInfo {
                    nonce,
                    progress: n[0],
                    needed: n[1],
                    threshold: n[2],
                    shares: n[3],
                    new_shares,
                    fingerprints,
                    encrypted_shares,
                })
            )),
        (prop::sample::select(ErrorCode::ALL), name())
            .prop_map(|(code, message)| (Op::Decrypt as u16, Response::Error { code, message })),
        (vec(".{0,300}", 0..4), vec(".{0,300}", 0..2), any::<u64>()).prop_map(
            |(records, checkpoints, head)| (
                Op::AuditRead as u16,
                Response::AuditPage(AuditPage {
                    records,
                    checkpoints,
                    head
                })
            )
        ),
        (
            name(),
            name(),
            any::<[u64; 2]>(),
            vec(".{0,300}", 0..3),
            audit_keys()
        )
            .prop_map(|(store, node, seqs, checkpoints, keys)| (
                Op::AuditExport as u16,
                Response::AuditRange(AuditRange {
                    store,
                    node,
                    first_seq: seqs[0],
                    last_seq: seqs[1],
                    checkpoints,
                    keys
                })
            )),
        audit_keys().prop_map(|k| (Op::AuditPubkey as u16, Response::AuditKeys(k))),
    ]
}

proptest! {
    #[test]
    fn every_request_round_trips(req in request(), id in any::<u64>()) {
        let bytes = req.to_frame(id).encode().expect("encodes");
        let (frame, used) = Frame::parse(&bytes).expect("parses").expect("complete");
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(frame.header.request_id, id);
        prop_assert_eq!(Request::from_frame(&frame).expect("decodes"), req);
    }

    #[test]
    fn every_response_round_trips((op, resp) in response(), id in any::<u64>()) {
        let bytes = resp.to_frame(op, id).encode().expect("encodes");
        let (frame, _) = Frame::parse(&bytes).expect("parses").expect("complete");
        prop_assert_eq!(frame.header.request_id, id);
        prop_assert_eq!(Response::from_frame(&frame).expect("decodes"), resp);
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in vec(any::<u8>(), 0..512)) {
        tde_protocol::fuzz::decode_frames(&data);
    }

    #[test]
    fn mutated_valid_frames_never_panic(req in request(), pos in any::<usize>(), byte in any::<u8>()) {
        let mut bytes = req.to_frame(7).encode().expect("encodes");
        let i = pos % bytes.len();
        bytes.expose_mut()[i] = byte;
        tde_protocol::fuzz::decode_frames(&bytes);
    }
}
