//! Sidecar throughput over the real data socket: `cargo bench --bench sidecar`.
//!
//! Starts the real `tde serve` on a temporary dev store and drives it with N
//! concurrent clients, each doing generate + decrypt pairs for a fixed time.
//! Every request is audited (group commit, synchronous = FULL). Prints a
//! table of requests per second and latency percentiles, then a soak: 64
//! clients for `BENCH_SOAK_SECS` (60; 0 skips it) with the daemon's RSS and
//! thread count sampled every 5 s. Any failed request is counted and fails
//! the run. `BENCH_SINK=1` adds an audit file sink; `BENCH_CLIENTS=1,16`
//! runs only those client counts.

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

/// Requests per second, sorted latencies, failed requests.
fn run(sock: &Path, clients: usize, secs: u64) -> (f64, Vec<Duration>, usize) {
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
                let mut failed = 0;
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
                        failed += 1;
                        continue;
                    };
                    lat.push(t0.elapsed());
                    id += 1;
                    let t1 = Instant::now();
                    if !matches!(
                        call(
                            &mut s,
                            id,
                            &Request::Decrypt {
                                ciphertext,
                                context: ctx.clone(),
                            },
                        ),
                        Response::Decrypted { .. }
                    ) {
                        failed += 1;
                        continue;
                    }
                    lat.push(t1.elapsed());
                }
                (lat, failed)
            })
        })
        .collect();
    let (mut all, mut failed) = (Vec::new(), 0);
    for t in threads {
        let (lat, f) = t.join().expect("client");
        all.extend(lat);
        failed += f;
    }
    all.sort();
    (all.len() as f64 / secs as f64, all, failed)
}

/// The daemon's resident memory (KiB) and thread count, from /proc.
fn rss_and_threads(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("Threads:"))
}

fn main() {
    let tmp = tempfile::tempdir().expect("tmp");
    // The daemon creates its data directory (0700); it refuses an open one.
    let dir = tmp.path().join("sc");
    let bin = env!("CARGO_BIN_EXE_tde");
    // BENCH_SINK=1: a file sink too (checkpoints are always on).
    let config = tmp.path().join("tde.toml");
    let sink = std::env::var_os("BENCH_SINK").is_some();
    std::fs::write(
        &config,
        if sink {
            format!(
                "[audit.file]\npath = \"{}\"\n",
                tmp.path().join("audit.jsonl").display()
            )
        } else {
            String::new()
        },
    )
    .expect("config");
    let mut child = Command::new(bin)
        .args(["serve", "--dev"])
        .env("TDE_CONFIG", &config)
        .env("TDE_DATA_DIR", &dir)
        .env("TDE_LOG__LEVEL", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("serve");
    let sock = dir.join("data.sock");
    let admin = dir.join("admin.sock");
    while !(sock.exists() && admin.exists()) {
        if let Ok(Some(st)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("tde serve exited with {st}: {err}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut a = UnixStream::connect(&admin).expect("admin");
    let pw = std::fs::read(dir.join("dev-admin.password")).expect("pw");
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
            rotate_after: 0,
        },
    );
    let secs = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    println!("| clients | requests / s | p50 µs | p99 µs |");
    println!("|--------:|-------------:|-------:|-------:|");
    let mut failures = 0;
    // BENCH_CLIENTS=1,16: only these client counts.
    let counts: Vec<usize> = std::env::var("BENCH_CLIENTS")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 4, 16, 64]);
    for clients in counts {
        let (rps, lat, failed) = run(&sock, clients, secs);
        failures += failed;
        let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)].as_micros();
        println!(
            "| {clients:>7} | {rps:>12.0} | {:>6} | {:>6} |",
            p(0.50),
            p(0.99)
        );
    }
    let soak: u64 = std::env::var("BENCH_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    if soak > 0 {
        let pid = child.id();
        let sock2 = sock.clone();
        let load = std::thread::spawn(move || run(&sock2, 64, soak));
        println!("\n64 clients for {soak} s:\n");
        println!("| second | daemon RSS MiB | daemon threads |");
        println!("|-------:|---------------:|---------------:|");
        let start = Instant::now();
        while !load.is_finished() {
            let (rss, threads) = rss_and_threads(pid);
            println!(
                "| {:>6} | {:>14.1} | {threads:>14} |",
                start.elapsed().as_secs(),
                rss as f64 / 1024.0
            );
            let next = Duration::from_secs(5 * (start.elapsed().as_secs() / 5 + 1));
            while start.elapsed() < next && !load.is_finished() {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let (rps, lat, failed) = load.join().expect("load");
        failures += failed;
        let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)].as_micros();
        println!(
            "\n{} requests ({rps:.0}/s), p50 {} µs, p99 {} µs, {failed} failed",
            lat.len(),
            p(0.50),
            p(0.99)
        );
    }
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
    assert_eq!(failures, 0, "{failures} requests failed");
}
