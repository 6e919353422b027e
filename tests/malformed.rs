//! Must-show 3: malformed frames get an error reply or a clean close, and the
//! daemon keeps serving other clients throughout.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use tde_protocol::frame::{Header, read_frame};
use tde_protocol::{ErrorCode, Frame, MAX_FRAME_LEN, Request, Response};

fn raw_conn(env: &Env) -> UnixStream {
    let s = UnixStream::connect(env.data_socket()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s
}

/// Reads what the daemon answers: `Some(code)` for an error frame, `None`
/// for a clean close.
fn answer(s: &mut UnixStream) -> Option<ErrorCode> {
    match read_frame(s) {
        Ok(Some(f)) => match Response::from_frame(&f) {
            Ok(Response::Error { code, .. }) => Some(code),
            other => panic!("expected an error frame, got {other:?}"),
        },
        Ok(None) => None,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
        Err(e) => panic!("neither an error frame nor a clean close: {e}"),
    }
}

fn frame(version: u8, op: u16, body: Vec<u8>) -> Vec<u8> {
    Frame {
        header: Header {
            version,
            kind: 1,
            op,
            status: 0,
            flags: 0,
            request_id: 99,
        },
        body: body.into(),
    }
    .encode()
    .expect("encode")
    .to_vec()
}

#[test]
fn malformed_frames_are_answered_or_closed_and_others_keep_working() {
    let env = Env::new("");
    let shares = env.init();
    let _daemon = env.serve();
    env.unseal(&shares[..3]);
    env.ok(&["key", "create", "app-k"]);

    // A well-behaved client runs during the whole abuse.
    let stop = Arc::new(AtomicBool::new(false));
    let good = {
        let (stop, path) = (stop.clone(), env.data_socket());
        std::thread::spawn(move || {
            let mut c = Raw::connect(&path);
            let ctx = ctx(&[("t", "1")]);
            let mut n = 0u32;
            while !stop.load(Ordering::SeqCst) || n < 20 {
                let Response::DataKey {
                    plaintext,
                    ciphertext,
                    ..
                } = c.call(&Request::GenerateDataKey {
                    key: "app-k".into(),
                    context: ctx.clone(),
                })
                else {
                    panic!("generate failed during abuse")
                };
                let Response::Decrypted { plaintext: p2, .. } = c.call(&Request::Decrypt {
                    ciphertext,
                    context: ctx.clone(),
                }) else {
                    panic!("decrypt failed during abuse")
                };
                assert!(p2 == plaintext);
                n += 1;
            }
            n
        })
    };

    // Oversized length: refused before allocating, then closed.
    let mut s = raw_conn(&env);
    s.write_all(&(MAX_FRAME_LEN + 1).to_be_bytes())
        .expect("write");
    assert_eq!(answer(&mut s), Some(ErrorCode::FrameTooLarge));
    assert_eq!(answer(&mut s), None, "closed after a bad length");
    let mut s = raw_conn(&env);
    s.write_all(&u32::MAX.to_be_bytes()).expect("write");
    assert_eq!(answer(&mut s), Some(ErrorCode::FrameTooLarge));

    // Too short to hold a header.
    let mut s = raw_conn(&env);
    s.write_all(&[0, 0, 0, 3, 1, 1, 0]).expect("write");
    assert_eq!(answer(&mut s), Some(ErrorCode::FrameTooLarge));

    // Unknown version, unknown operation, garbage body: an error reply each,
    // and the same connection still works afterwards.
    let mut s = raw_conn(&env);
    s.write_all(&frame(9, 0x0001, vec![])).expect("write");
    assert_eq!(answer(&mut s), Some(ErrorCode::UnsupportedVersion));
    s.write_all(&frame(1, 0x7777, vec![])).expect("write");
    assert_eq!(answer(&mut s), Some(ErrorCode::UnknownOperation));
    s.write_all(&frame(1, 0x0101, vec![1, 0, 0, 0, 200, 1, 2]))
        .expect("write");
    assert_eq!(answer(&mut s), Some(ErrorCode::Malformed));
    s.write_all(&frame(1, 0x0101, vec![])).expect("write");
    assert_eq!(
        answer(&mut s),
        Some(ErrorCode::Malformed),
        "missing key field"
    );
    s.write_all(&Request::Status.to_frame(5).encode().expect("enc"))
        .expect("write");
    let f = read_frame(&mut s).expect("read").expect("frame");
    assert!(matches!(Response::from_frame(&f), Ok(Response::Status(_))));

    // An oversized context is refused and not copied into the audit log.
    let mut c = Raw::connect(&env.data_socket());
    let huge = ctx(&[("tablespace", &"x".repeat(200_000))]);
    match c.call(&Request::GenerateDataKey {
        key: "app-k".into(),
        context: huge,
    }) {
        Response::Error { code, .. } => assert_eq!(code, ErrorCode::InvalidArgument),
        r => panic!("{r:?}"),
    }

    // Truncated frame, then the client goes away.
    let mut s = raw_conn(&env);
    let full = Request::Status.to_frame(1).encode().expect("enc");
    s.write_all(&full[..full.len() - 3]).expect("write");
    drop(s);

    // Random bytes on many connections (fixed seed): each gets an error
    // frame or a clean close, never a hang or a crash.
    let mut seed = 0x9E3779B97F4A7C15u64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..200 {
        let mut s = raw_conn(&env);
        let len = (rand() % 64) as usize + 1;
        let mut bytes: Vec<u8> = (0..len).map(|_| rand() as u8).collect();
        if i % 2 == 0 {
            // A plausible length prefix followed by a random header/body.
            let body = (rand() % 40) as u32 + 16;
            bytes = [
                body.to_be_bytes().to_vec(),
                (0..body).map(|_| rand() as u8).collect(),
            ]
            .concat();
        }
        s.write_all(&bytes).expect("write");
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        let mut cur = &rest[..];
        while let Ok(Some((f, used))) = Frame::parse(cur) {
            assert_ne!(f.header.status, 0, "random bytes must not succeed");
            cur = &cur[used..];
        }
    }

    stop.store(true, Ordering::SeqCst);
    let rounds = good.join().expect("good client never failed");
    assert!(rounds >= 20);
    // Still serving: the CLI works and the daemon is alive.
    env.status();
    drop(_daemon);
    let recs = audit(&env.db());
    assert!(refusals(&recs, "malformed_request", "FRAME_TOO_LARGE") >= 3);
    assert!(refusals(&recs, "malformed_request", "UNSUPPORTED_VERSION") >= 1);
    assert!(refusals(&recs, "malformed_request", "UNKNOWN_OPERATION") >= 1);
    assert!(refusals(&recs, "malformed_request", "MALFORMED") >= 2);
    assert_eq!(count(&recs, "generate_data_key", "ok"), rounds as usize);
    let big = recs
        .iter()
        .find(|r| r["op"] == "generate_data_key" && r["error_code"] == "INVALID_ARGUMENT")
        .expect("oversized context audited");
    assert!(
        big["context"].is_null(),
        "the oversized context is not in the log"
    );
}
