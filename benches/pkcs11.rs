//! PKCS#11 throughput, `libtde_pkcs11.so` beside SoftHSMv2, through the same
//! client (the `cryptoki` crate): `cargo bench --bench pkcs11`.
//!
//! Starts the real `tde serve` on a temporary dev store with a crypto user
//! whose client policy allows `pkcs11`, and a SoftHSMv2 token in a
//! temporary directory (Debian's `softhsm2`; skipped if absent). Each
//! module is measured in a child process of this bench (its own module
//! state and environment): RSA-2048 (`CKM_SHA256_RSA_PKCS`) and ECDSA P-256
//! (`CKM_ECDSA` over a 32-byte hash) signatures of 32 bytes, and AES-256-GCM encryption
//! of 64 bytes, with 1 and 8 threads, each thread its own session, for
//! `BENCH_SECS` (3) each. Prints operations per second and latency
//! percentiles side by side. Every tde signature is an audited request to
//! the sidecar. Any failed call fails the run. `BENCH_TESTS=p256` and
//! `BENCH_THREADS=8` run only those. The contenders take turns
//! `BENCH_ROUNDS` (3) times and each one's median round is printed. tde runs
//! twice: as configured by default (every call a durable audit record
//! before its answer) and with `audit.pkcs11_key_use = "summarize"`.
//! `BENCH_NICE=-10` starts the sidecars at that CPU priority (root).

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use tde_protocol::frame::{read_frame, write_frame};
use tde_protocol::{Request, Response, SecretBytes};

const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";
const TESTS: &[&str] = &["rsa2048", "p256", "aes-gcm-64"];
const THREADS: &[usize] = &[1, 8];

fn call(s: &mut UnixStream, id: u64, req: &Request) -> Response {
    write_frame(s, &req.to_frame(id)).expect("send");
    Response::from_frame(&read_frame(s).expect("read").expect("frame")).expect("decode")
}

/// The module the bench built (the root package has it as a
/// dev-dependency).
fn tde_module() -> PathBuf {
    let exe = std::env::current_exe().expect("exe");
    let deps = exe.parent().expect("deps");
    [
        deps.join("libtde_pkcs11.so"),
        deps.join("../libtde_pkcs11.so"),
    ]
    .into_iter()
    .find(|p| p.exists())
    .expect("libtde_pkcs11.so is built with the bench")
}

/// One measurement: operations per second and sorted latencies.
struct Run {
    ops: f64,
    lat: Vec<Duration>,
}

impl Run {
    fn p(&self, q: f64) -> u128 {
        if self.lat.is_empty() {
            return 0;
        }
        self.lat[((self.lat.len() as f64 * q) as usize).min(self.lat.len() - 1)].as_micros()
    }
}

/// In the child: measures `test` with `threads` threads against the module
/// at `module` (already set up by the parent's environment), prints
/// `ops p50 p99 failures`.
fn child(module: &str, pin: &str, test: &str, threads: usize, secs: u64) {
    let p11 = Arc::new(Pkcs11::new(module).expect("load module"));
    p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("C_Initialize");
    let slot = p11.get_slots_with_token().expect("slots")[0];
    let setup = p11.open_rw_session(slot).expect("session");
    setup
        .login(UserType::User, Some(&AuthPin::from(pin)))
        .expect("login");
    // Session objects: they end with the run.
    let key: ObjectHandle = match test {
        "rsa2048" => {
            setup
                .generate_key_pair(
                    &Mechanism::RsaPkcsKeyPairGen,
                    &[
                        Attribute::ModulusBits(2048.into()),
                        Attribute::PublicExponent(vec![1, 0, 1]),
                        Attribute::Verify(true),
                    ],
                    &[Attribute::Sign(true), Attribute::Sensitive(true)],
                )
                .expect("RSA key pair")
                .1
        }
        "p256" => {
            setup
                .generate_key_pair(
                    &Mechanism::EccKeyPairGen,
                    &[
                        Attribute::EcParams(vec![
                            0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
                        ]),
                        Attribute::Verify(true),
                    ],
                    &[Attribute::Sign(true), Attribute::Sensitive(true)],
                )
                .expect("EC key pair")
                .1
        }
        _ => setup
            .generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::ValueLen(32.into()),
                    Attribute::Encrypt(true),
                    Attribute::Sensitive(true),
                ],
            )
            .expect("AES key"),
    };
    let deadline = Instant::now() + Duration::from_secs(secs);
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let p11 = p11.clone();
            let test = test.to_string();
            std::thread::spawn(move || {
                let s = p11.open_rw_session(slot).expect("session");
                let data = [7u8; 32];
                let plain = [9u8; 64];
                let mut iv = [0u8; 12];
                let mut lat = Vec::new();
                let mut failed = 0usize;
                let mut n: u64 = 0;
                while Instant::now() < deadline {
                    n += 1;
                    iv[..8].copy_from_slice(&n.to_be_bytes());
                    let t0 = Instant::now();
                    let ok = match test.as_str() {
                        "rsa2048" => s.sign(&Mechanism::Sha256RsaPkcs, key, &data).is_ok(),
                        // A SHA-256 hash signed as it is (SoftHSMv2 2.6
                        // has no CKM_ECDSA_SHA256; both sides get the same
                        // 32 bytes).
                        "p256" => s.sign(&Mechanism::Ecdsa, key, &data).is_ok(),
                        _ => {
                            let mut iv = iv;
                            let gcm = GcmParams::new(&mut iv, b"", 128.into()).expect("gcm");
                            s.encrypt(&Mechanism::AesGcm(gcm), key, &plain).is_ok()
                        }
                    };
                    if ok {
                        lat.push(t0.elapsed());
                    } else {
                        failed += 1;
                    }
                }
                (lat, failed)
            })
        })
        .collect();
    let (mut lat, mut failed) = (Vec::new(), 0);
    for w in workers {
        let (l, f) = w.join().expect("worker");
        lat.extend(l);
        failed += f;
    }
    lat.sort();
    let run = Run {
        ops: lat.len() as f64 / secs as f64,
        lat,
    };
    println!("{:.0} {} {} {failed}", run.ops, run.p(0.50), run.p(0.99));
}

/// Runs one measurement in a child process with `env`.
fn measure(
    module: &Path,
    pin: &str,
    env: &[(&str, &Path)],
    test: &str,
    threads: usize,
    secs: u64,
) -> Option<Outcome> {
    let out = Command::new(std::env::current_exe().expect("exe"))
        .args(["--child", module.to_str().expect("utf8"), pin, test])
        .arg(threads.to_string())
        .arg(secs.to_string())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stderr(Stdio::inherit())
        .output()
        .expect("child");
    let text = String::from_utf8_lossy(&out.stdout);
    let f: Vec<&str> = text.split_whitespace().collect();
    if !out.status.success() || f.len() != 4 {
        eprintln!("{test} x{threads} failed: {text}");
        return None;
    }
    Some((
        f[0].parse().ok()?,
        f[1].parse().ok()?,
        f[2].parse().ok()?,
        f[3].parse().ok()?,
    ))
}

/// A SoftHSMv2 token in `dir`: its configuration file.
fn softhsm(dir: &Path) -> Option<PathBuf> {
    if !Path::new(SOFTHSM).exists() {
        eprintln!("SoftHSMv2 ({SOFTHSM}) is not installed: measuring tde alone");
        return None;
    }
    let tokens = dir.join("softhsm-tokens");
    std::fs::create_dir_all(&tokens).expect("mkdir");
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .expect("conf");
    let ok = Command::new("softhsm2-util")
        .args([
            "--init-token",
            "--free",
            "--label",
            "bench",
            "--pin",
            "1234",
            "--so-pin",
            "5678",
        ])
        .env("SOFTHSM2_CONF", &conf)
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(conf)
}

/// `tde serve --dev` with a crypto user `bench` and a policy allowing
/// `pkcs11` to this uid: the daemon and its data socket.
/// A sidecar in `dir/name`; `audit` is its `[audit]` table's body.
fn sidecar(dir: &Path, name: &str, audit: &str) -> (std::process::Child, PathBuf) {
    let dir = dir.join(name);
    std::fs::create_dir(&dir).expect("dir");
    let data = dir.join("sc");
    let sock = dir.join("data.sock");
    let config = dir.join("tde.toml");
    let uid = rustix::process::getuid().as_raw();
    std::fs::write(
        &config,
        format!(
            "[data_socket]\npath = \"{}\"\n[[clients]]\nname = \"bench\"\nuids = [{uid}]\n\
             keys = [\"*\"]\noperations = [\"pkcs11\", \"generate_random\"]\n[audit]\n{audit}\n",
            sock.display()
        ),
    )
    .expect("config");
    // BENCH_NICE=-10: the sidecar at a higher CPU priority than the
    // clients (`nice`; a negative value needs root).
    let nice = std::env::var("BENCH_NICE").unwrap_or_else(|_| "0".into());
    let mut child = Command::new("nice")
        .args(["-n", &nice, env!("CARGO_BIN_EXE_tde"), "serve", "--dev"])
        .env("TDE_CONFIG", &config)
        .env("TDE_DATA_DIR", &data)
        .env("TDE_LOG__LEVEL", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("serve");
    let admin = data.join("admin.sock");
    while !(sock.exists() && admin.exists()) {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("tde serve exited with {st}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut a = UnixStream::connect(&admin).expect("admin");
    let pw = std::fs::read(data.join("dev-admin.password")).expect("pw");
    let r = call(
        &mut a,
        1,
        &Request::Login {
            operator: "admin".into(),
            password: SecretBytes::new(pw),
        },
    );
    assert!(matches!(r, Response::LoggedIn { .. }), "{r:?}");
    let r = call(
        &mut a,
        2,
        &Request::OperatorAdd {
            operator: "bench".into(),
            role: "crypto_user".into(),
            password: SecretBytes::from_slice(b"bench-password-1"),
        },
    );
    assert!(matches!(r, Response::Done), "{r:?}");
    (child, sock)
}

/// Operations per second, p50 and p99 in µs, failed calls.
type Outcome = (f64, u128, u128, usize);

/// The run with the median operations per second.
fn median(mut runs: Vec<Outcome>) -> Option<Outcome> {
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    runs.get(runs.len() / 2).copied()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let a = &args[i + 1..];
        child(
            &a[0],
            &a[1],
            &a[2],
            a[3].parse().expect("threads"),
            a[4].parse().expect("secs"),
        );
        return;
    }
    let var = |name: &str, default: u64| -> u64 {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let (secs, rounds) = (var("BENCH_SECS", 3), var("BENCH_ROUNDS", 3));
    if let Ok(n) = std::env::var("BENCH_NICE") {
        println!("tde sidecars at nice {n}\n");
    }
    let tmp = tempfile::tempdir().expect("tmp");
    // The default (every call a durable record before its answer), and
    // successful key uses counted into a record a second.
    let (mut daemon, sock) = sidecar(tmp.path(), "record", "");
    let (mut daemon2, sock2) = sidecar(tmp.path(), "summarize", "pkcs11_key_use = \"summarize\"");
    let soft = softhsm(tmp.path());
    let tde = tde_module();
    println!(
        "| test | threads | SoftHSMv2 ops/s | p50 µs | p99 µs | tde ops/s | p50 µs | p99 µs | tde / SoftHSMv2 | tde, key uses summarized: ops/s | p50 µs | p99 µs | / SoftHSMv2 |"
    );
    println!("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    let mut failures = 0;
    // BENCH_TESTS=p256 and BENCH_THREADS=8: only these.
    let only = |var: &str| {
        std::env::var(var)
            .ok()
            .map(|v| v.split(',').map(str::to_string).collect::<Vec<_>>())
    };
    let (tests, threads_only) = (only("BENCH_TESTS"), only("BENCH_THREADS"));
    for test in TESTS
        .iter()
        .filter(|t| tests.as_ref().is_none_or(|l| l.iter().any(|x| x == *t)))
    {
        for &threads in THREADS.iter().filter(|n| {
            threads_only
                .as_ref()
                .is_none_or(|l| l.contains(&n.to_string()))
        }) {
            // The contenders take turns, `rounds` times; each one's median
            // round (by operations per second) is reported.
            let mut runs: [Vec<Outcome>; 3] = Default::default();
            for _ in 0..rounds {
                if let Some(conf) = &soft {
                    runs[0].extend(measure(
                        Path::new(SOFTHSM),
                        "1234",
                        &[("SOFTHSM2_CONF", conf.as_path())],
                        test,
                        threads,
                        secs,
                    ));
                }
                for (i, sock) in [(1, &sock), (2, &sock2)] {
                    let r = measure(
                        &tde,
                        "bench:bench-password-1",
                        &[("TDE_PKCS11_SOCKET", sock.as_path())],
                        test,
                        threads,
                        secs,
                    );
                    failures += usize::from(r.is_none());
                    runs[i].extend(r);
                }
            }
            failures += runs.iter().flatten().map(|r| r.3).sum::<usize>();
            let [s, t, t2] = runs.map(median);
            let cell = |r: &Option<Outcome>| match r {
                Some((ops, p50, p99, _)) => format!("{ops:.0} | {p50} | {p99}"),
                None => "- | - | -".to_string(),
            };
            let ratio = |t: &Option<Outcome>| match (&s, t) {
                (Some(s), Some(t)) if s.0 > 0.0 => format!("{:.2}x", t.0 / s.0),
                _ => "-".to_string(),
            };
            println!(
                "| {test} | {threads} | {} | {} | {} | {} | {} |",
                cell(&s),
                cell(&t),
                ratio(&t),
                cell(&t2),
                ratio(&t2)
            );
        }
    }
    for d in [&mut daemon, &mut daemon2] {
        let _ = Command::new("kill").arg(d.id().to_string()).status();
        let _ = d.wait();
    }
    assert_eq!(failures, 0, "{failures} calls failed");
}
