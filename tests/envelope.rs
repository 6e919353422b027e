//! Issue 15, point 6: `tde encrypt` / `tde decrypt` round-trip a 1 GiB file
//! in constant memory, refuse a tampered file with a clear error, and leave
//! no plaintext (or partial) file behind, even when killed.

mod common;

use std::io::{Read as _, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::Env;

const GIB: u64 = 1 << 30;

/// Bytes that compress badly and cost little to make (xorshift64), the
/// same every time.
struct Stream(u64);

impl Stream {
    fn new() -> Stream {
        Stream(0x9E37_79B9_7F4A_7C15)
    }

    /// The next `buf.len()` bytes (a multiple of 8).
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            c.copy_from_slice(&self.0.to_le_bytes()[..c.len()]);
        }
    }

    /// Writes `len` bytes of it to `w`.
    fn write(mut self, w: &mut impl Write, len: u64) {
        let mut block = vec![0u8; 1 << 16];
        let mut written = 0;
        while written < len {
            self.fill(&mut block);
            let n = (len - written).min(block.len() as u64) as usize;
            w.write_all(&block[..n]).expect("write");
            written += n as u64;
        }
        w.flush().expect("flush");
    }

    /// Whether `path` holds exactly `len` bytes of it.
    fn matches(mut self, path: &Path, len: u64) -> bool {
        let mut f = std::io::BufReader::new(std::fs::File::open(path).expect("open"));
        let (mut want, mut got) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
        let mut left = len;
        while left > 0 {
            self.fill(&mut want);
            let n = left.min(want.len() as u64) as usize;
            if f.read_exact(&mut got[..n]).is_err() || got[..n] != want[..n] {
                return false;
            }
            left -= n as u64;
        }
        f.read(&mut got).expect("read") == 0
    }
}

fn make_file(path: &Path, len: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    Stream::new().write(&mut f, len);
}

/// Runs `child` to its end, sampling its peak resident memory (VmHWM);
/// gives (exit code, stderr, peak bytes).
fn run_measured(mut child: Child) -> (Option<i32>, String, u64) {
    let status = format!("/proc/{}/status", child.id());
    let mut peak = 0u64;
    loop {
        if let Some(kb) = std::fs::read_to_string(&status).ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        }) {
            peak = peak.max(kb * 1024);
        }
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).to_string(),
        peak,
    )
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

fn setup() -> (Env, common::Daemon, PathBuf) {
    let env = Env::new("");
    let d = env.sidecar_with_keys(&["app-files"]);
    let work = env.dir.path().join("work");
    std::fs::create_dir(&work).expect("mkdir");
    (env, d, work)
}

#[test]
fn a_gibibyte_round_trips_in_constant_memory() {
    let (env, d, work) = setup();
    // The plaintext comes through a pipe and is checked against the same
    // stream: the test needs 2 GiB of disk, not 3.
    let (enc, back) = (work.join("big.tde"), work.join("big.out"));
    let mut child = env
        .cmd(&[
            "encrypt",
            "--key",
            "app-files",
            "--context",
            "purpose=backup",
            "-o",
        ])
        .arg(&enc)
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tde encrypt");
    let mut stdin = child.stdin.take().expect("stdin");
    let feeder = std::thread::spawn(move || Stream::new().write(&mut stdin, GIB));
    let t = Instant::now();
    let (code, err, peak_enc) = run_measured(child);
    let enc_secs = t.elapsed().as_secs_f64();
    assert_eq!(code, Some(0), "{err}");
    feeder.join().expect("feeder");
    // Header, then 16 KiB chunks' worth of tags: nothing else grows.
    let len = std::fs::metadata(&enc).expect("encrypted").len();
    assert!(len > GIB && len < GIB + GIB / 4096 + 4096, "{len}");

    let child = env
        .cmd(&["decrypt", "--context", "purpose=backup", "-o"])
        .arg(&back)
        .arg(&enc)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tde decrypt");
    let t = Instant::now();
    let (code, err, peak_dec) = run_measured(child);
    let dec_secs = t.elapsed().as_secs_f64();
    assert_eq!(code, Some(0), "{err}");
    assert!(
        Stream::new().matches(&back, GIB),
        "the round trip changed the file"
    );
    eprintln!(
        "1 GiB: encrypt {enc_secs:.1} s, peak {} MiB; decrypt {dec_secs:.1} s, peak {} MiB",
        peak_enc >> 20,
        peak_dec >> 20
    );
    // Constant memory: a few chunk buffers, not the file (the binary
    // itself, unoptimized, is most of it).
    for peak in [peak_enc, peak_dec] {
        assert!(
            peak > 0 && peak < 64 << 20,
            "peak resident memory {peak} bytes"
        );
    }
    assert_eq!(names(&work), vec!["big.out", "big.tde"]);
    d.stop();
}

#[test]
fn tampered_cut_or_foreign_files_are_refused_and_leave_nothing() {
    let (env, d, work) = setup();
    let plain = work.join("doc");
    make_file(&plain, 5 * 65536 + 100);
    let enc = work.join("doc.tde");
    let v = env.ok(&[
        "encrypt",
        "--key",
        "app-files",
        "--context",
        "doc=1",
        plain.to_str().expect("utf8"),
    ]);
    assert_eq!(v["key"], "app-files");
    assert_eq!(v["bytes"], 5 * 65536 + 100);
    let good = std::fs::read(&enc).expect("read");
    let out = work.join("doc.out");
    let decrypt = |file: &Path| {
        env.cmd(&["decrypt", "-o"])
            .arg(&out)
            .arg(file)
            .output()
            .expect("tde decrypt")
    };
    let before = names(&work);

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "a flipped bit in the fourth chunk",
            {
                let mut b = good.clone();
                let at = b.len() - 2 * 65536;
                b[at] ^= 0x10;
                b
            },
            "fails authentication at plaintext offset 196608",
        ),
        (
            "cut at a chunk boundary",
            good[..good.len() - (100 + 16)].to_vec(),
            "fails authentication",
        ),
        (
            "bytes appended",
            [&good[..], b"more"].concat(),
            "fails authentication",
        ),
        (
            "not an encrypted file",
            b"just some text".to_vec(),
            "not a tde encrypted file",
        ),
        (
            "a damaged header",
            {
                let mut b = good.clone();
                b[12] = b'!';
                b
            },
            "header is damaged",
        ),
    ];
    for (what, bytes, says) in cases {
        let bad = work.join("bad.tde");
        std::fs::write(&bad, &bytes).expect("write");
        let o = decrypt(&bad);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{what}: {err}");
        assert!(err.contains(says), "{what}: {err}");
        std::fs::remove_file(&bad).expect("rm");
        // No output, no temporary file: the directory is as it was.
        assert_eq!(names(&work), before, "{what}");
    }
    // A context the file does not carry: refused before the sidecar.
    let o = env
        .cmd(&["decrypt", "--context", "doc=2", "-o"])
        .arg(&out)
        .arg(&enc)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("was not encrypted with the context doc=2"),
        "{err}"
    );
    assert_eq!(names(&work), before);

    // Refused by policy: a key this client may not use.
    let o = env
        .cmd(&["encrypt", "--key", "not-allowed", "-o"])
        .arg(work.join("x.tde"))
        .arg(&plain)
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("PERMISSION_DENIED"));
    assert_eq!(names(&work), before, "a refused encryption left a file");

    // An existing output is kept unless --force.
    std::fs::write(&out, b"keep me").expect("write");
    let o = decrypt(&enc);
    assert!(String::from_utf8_lossy(&o.stderr).contains("exists: --force"));
    assert_eq!(std::fs::read(&out).expect("read"), b"keep me");
    let o = env
        .cmd(&["decrypt", "--force", "-o"])
        .arg(&out)
        .arg(&enc)
        .output()
        .expect("run");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(&out).expect("read"),
        std::fs::read(&plain).expect("read")
    );

    // Pipes: standard input to standard output both ways.
    let mut enc_pipe = env
        .cmd(&["encrypt", "--key", "app-files", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let body = std::fs::read(&plain).expect("read");
    {
        let mut stdin = enc_pipe.stdin.take().expect("stdin");
        let body = body.clone();
        std::thread::spawn(move || stdin.write_all(&body).expect("feed"));
    }
    let sealed = enc_pipe.wait_with_output().expect("encrypt");
    assert!(sealed.status.success());
    let mut dec_pipe = env
        .cmd(&["decrypt", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    {
        let mut stdin = dec_pipe.stdin.take().expect("stdin");
        let s = sealed.stdout.clone();
        std::thread::spawn(move || stdin.write_all(&s).expect("feed"));
    }
    let opened = dec_pipe.wait_with_output().expect("decrypt");
    assert!(opened.status.success());
    assert_eq!(opened.stdout, body);
    d.stop();
}

#[test]
fn a_decryption_killed_midway_leaves_no_file() {
    let (env, d, work) = setup();
    let plain = work.join("big");
    make_file(&plain, GIB / 4);
    env.ok(&[
        "encrypt",
        "--key",
        "app-files",
        plain.to_str().expect("utf8"),
    ]);
    std::fs::remove_file(&plain).expect("rm");
    let before = names(&work);
    let mut child = env
        .cmd(&["decrypt", "-o"])
        .arg(work.join("big.out"))
        .arg(work.join("big.tde"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    // Midway: some plaintext is written to the unnamed file by now.
    let fd_dir = format!("/proc/{}/fd", child.id());
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut writing = false;
    while Instant::now() < deadline && !writing {
        writing = std::fs::read_dir(&fd_dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                std::fs::read_link(e.path())
                    .map(|l| {
                        l.to_string_lossy().contains("(deleted)")
                            || l.to_string_lossy().contains("#")
                    })
                    .unwrap_or(false)
            })
            && std::fs::read_to_string(format!("/proc/{}/io", child.id()))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("wchar: "))
                        .and_then(|v| v.parse::<u64>().ok())
                })
                .is_some_and(|w| w > 1 << 20);
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(writing, "the decryption never got under way");
    child.kill().expect("kill");
    child.wait().expect("wait");
    assert_eq!(names(&work), before, "a killed decryption left a file");
    d.stop();
}
