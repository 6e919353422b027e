//! Rotation costs: `cargo bench --bench rotation` (root, /dev/fuse,
//! PostgreSQL 15). Prints a table:
//!
//! 1. Rewrapping 10,000 registered data keys after a master-key rotation
//!    (re_encrypt over the data socket, 16 clients, every request audited
//!    with fsync'd group commit), and the same followed by each
//!    tablespace's new registration.
//! 2. Re-key throughput, unthrottled, of a 512 MiB tablespace with a cold
//!    page cache, start to finish (the verify pass included).
//! 3. pgbench TPS (4 clients, select + update mix) during a re-key
//!    throttled at 50 MB/s, relative to the TPS just before.
//!
//! Uses the end-to-end test harness (real `tde serve`, real mount, real
//! PostgreSQL started as the postgres user).

#[path = "../tests/common/mod.rs"]
mod common;

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::Env;
use common::pg::*;
use tde_protocol::frame::{read_frame, write_frame};
use tde_protocol::{DekRef, Request, Response};

fn call(s: &mut UnixStream, id: u64, req: &Request) -> Response {
    write_frame(s, &req.to_frame(id)).expect("send");
    Response::from_frame(&read_frame(s).expect("read").expect("frame")).expect("decode")
}

fn ctx(i: usize) -> tde_protocol::Context {
    [
        ("cluster".to_string(), "bench".to_string()),
        ("tablespace".to_string(), format!("ts{i}")),
    ]
    .into()
}

/// Seconds to rewrap `n` registered data keys with `clients` connections:
/// (re_encrypt alone, re_encrypt + the new registration).
fn rewrap_registered(env: &Env, n: usize, clients: usize) -> (f64, f64) {
    env.ok(&["key", "create", "pg-rewrap"]);
    // n tablespaces, each with one data key, registered under version 1.
    let blobs: Vec<Vec<u8>> = {
        let mut s = UnixStream::connect(env.data_socket()).expect("connect");
        (0..n)
            .map(|i| {
                let Response::DataKey { ciphertext, .. } = call(
                    &mut s,
                    2 * i as u64 + 1,
                    &Request::GenerateDataKey {
                        key: "pg-rewrap".into(),
                        context: ctx(i),
                    },
                ) else {
                    panic!("generate")
                };
                register(&mut s, 2 * i as u64 + 2, i, 1);
                ciphertext
            })
            .collect()
    };
    let blobs = std::sync::Arc::new(blobs);
    let mut out = [0f64; 2];
    for (round, also_register) in [false, true].into_iter().enumerate() {
        env.ok(&["key", "rotate", "pg-rewrap"]);
        let start = Instant::now();
        let threads: Vec<_> = (0..clients)
            .map(|t| {
                let (blobs, sock) = (blobs.clone(), env.data_socket());
                std::thread::spawn(move || {
                    let mut s = UnixStream::connect(sock).expect("connect");
                    let mut id = 0;
                    for i in (t..blobs.len()).step_by(clients) {
                        id += 1;
                        let Response::ReEncrypted { version, .. } = call(
                            &mut s,
                            id,
                            &Request::ReEncrypt {
                                ciphertext: blobs[i].clone(),
                                context: ctx(i),
                            },
                        ) else {
                            panic!("re_encrypt")
                        };
                        if also_register {
                            id += 1;
                            register(&mut s, id, i, version);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("client");
        }
        out[round] = start.elapsed().as_secs_f64();
    }
    (out[0], out[1])
}

fn register(s: &mut UnixStream, id: u64, i: usize, version: u32) {
    let r = call(
        s,
        id,
        &Request::RegisterDeks {
            key: "pg-rewrap".into(),
            context: ctx(i),
            location: format!("/bench/ts{i}"),
            deks: vec![DekRef {
                dek_version: 1,
                key_version: version,
            }],
        },
    );
    assert!(matches!(r, Response::KeyPrimary { .. }), "{r:?}");
}

fn wait_done(env: &Env, mnt: &std::path::Path) {
    loop {
        let st = env.ok(&["rekey", &mnt.to_string_lossy(), "--status"]);
        if st["state"] != "running" && st["state"] != "finishing" {
            assert_eq!(st["state"], "done", "{st}");
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn main() {
    if !can_run() {
        eprintln!("run as root with /dev/fuse and PostgreSQL 15 installed");
        return;
    }
    let env = Env::new("");
    let _sidecar = env.sidecar_with_keys(&["pg-main"]);

    // 1. Rewrap 10,000 registered data keys.
    let (rewrap, rewrap_register) = rewrap_registered(&env, 10_000, 16);

    // 3 first (a fresh tablespace): pgbench before and during a throttled
    // re-key.
    let (backing, mnt, _mount, pg) = tablespace(&env, "pg-main", "ts");
    pg.pgbench_init(34, "ts");
    pg.sql(&["CHECKPOINT"]);
    let bench = ["-c", "4", "-j", "2", "-T", "20", "-n"];
    let before = tps(&pg.pgbench(&bench));
    env.ok(&[
        "rekey",
        &mnt.to_string_lossy(),
        "--rate",
        "50MB/s",
        "--no-wait",
    ]);
    let during = tps(&pg.pgbench(&bench));
    let st = env.ok(&["rekey", &mnt.to_string_lossy(), "--status"]);
    assert_eq!(st["state"], "running", "the re-key outlasted pgbench: {st}");
    env.ok(&["rekey", &mnt.to_string_lossy(), "--rate", "0", "--no-wait"]);
    wait_done(&env, &mnt);

    // 2. Unthrottled re-key, cold cache.
    let blocks: u64 = env.ok(&["inspect", &backing.to_string_lossy()])["versions"]
        .as_object()
        .expect("versions")
        .values()
        .map(|v| v.as_u64().expect("n"))
        .sum();
    let bytes = blocks as f64 * 8224.0;
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    let start = Instant::now();
    env.ok(&["rekey", &mnt.to_string_lossy(), "--no-wait"]);
    wait_done(&env, &mnt);
    let whole = start.elapsed().as_secs_f64();

    println!("| measurement | result | target |");
    println!("|---|---:|---:|");
    println!(
        "| rewrap (re_encrypt) 10,000 registered data keys, 16 clients | {rewrap:.2} s | <= 2 s |"
    );
    println!(
        "| the same plus each tablespace's new registration (2 audited requests each) | {rewrap_register:.2} s | |"
    );
    println!(
        "| re-key, unthrottled, cold cache, verify pass included ({:.0} MB) | {:.0} MB/s | >= 300 MB/s |",
        bytes / 1e6,
        bytes / whole / 1e6
    );
    println!(
        "| pgbench TPS during a 50 MB/s re-key / before | {during:.0} / {before:.0} = {:.2}x | >= 0.8x |",
        during / before
    );
}
