//! Sidecar throughput over the real data socket: `cargo bench --bench sidecar`.
//!
//! Starts the real `tde serve` on a temporary dev store and drives it with N
//! concurrent clients, each doing generate + decrypt pairs for a fixed time.
//! Every request is audited (group commit, synchronous = FULL). Prints a
//! table of requests per second and latency percentiles.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tde_protocol::frame::{read_frame, write_frame};
use tde_protocol::{Request, Response};

fn call(s: &mut UnixStream, id: u64, req: &Request) -> Response {
    write_frame(s, &req.to_frame(id)).expect("send");
    Response::from_frame(&read_frame(s).expect("read").expect("frame")).expect("decode")
}

fn run(sock: &Path, clients: usize, secs: u64) -> (f64, Vec<Duration>) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let threads: Vec<_> = (0..clients)
        .map(|t| {
            let sock = sock.to_path_buf();
            std::thread::spawn(move || {
                let mut s = UnixStream::connect(&sock).expect("connect");
                let ctx = [("tablespace".to_string(), format!("{t}"))]
                    .into_iter()
                    .collect::<std::collections::BTreeMap<_, _>>();
                let mut lat = Vec::new();
                let mut id = 0;
                while Instant::now() < deadline {
                    id += 1;
                    let t0 = Instant::now();
                    let Response::DataKey { ciphertext, .. } = call(
                        &mut s,
                        id,
                        &Request::GenerateDataKey {
                            key: "bench".into(),
                            context: ctx.clone(),
                        },
                    ) else {
                        panic!("generate failed")
                    };
                    lat.push(t0.elapsed());
                    id += 1;
                    let t1 = Instant::now();
                    let Response::Decrypted { .. } = call(
                        &mut s,
                        id,
                        &Request::Decrypt {
                            ciphertext,
                            context: ctx.clone(),
                        },
                    ) else {
                        panic!("decrypt failed")
                    };
                    lat.push(t1.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut all: Vec<Duration> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("client"))
        .collect();
    all.sort();
    (all.len() as f64 / secs as f64, all)
}

fn main() {
    let dir = tempfile::tempdir().expect("tmp");
    let bin = env!("CARGO_BIN_EXE_tde");
    let mut child = Command::new(bin)
        .args(["serve", "--dev"])
        .env("TDE_DATA_DIR", dir.path())
        .env("TDE_LOG__LEVEL", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("serve");
    let sock = dir.path().join("data.sock");
    let admin = dir.path().join("admin.sock");
    while !(sock.exists() && admin.exists()) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut a = UnixStream::connect(&admin).expect("admin");
    let pw = std::fs::read(dir.path().join("dev-admin.password")).expect("pw");
    call(
        &mut a,
        1,
        &Request::Login {
            operator: "admin".into(),
            password: tde_protocol::SecretBytes::new(pw),
        },
    );
    call(
        &mut a,
        2,
        &Request::KeyCreate {
            key: "bench".into(),
            description: String::new(),
        },
    );
    let secs = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    println!("| clients | requests / s | p50 µs | p99 µs |");
    println!("|--------:|-------------:|-------:|-------:|");
    for clients in [1, 4, 16, 64] {
        let (rps, lat) = run(&sock, clients, secs);
        let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)].as_micros();
        println!(
            "| {clients:>7} | {rps:>12.0} | {:>6} | {:>6} |",
            p(0.50),
            p(0.99)
        );
    }
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
}
