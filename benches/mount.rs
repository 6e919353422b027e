//! Mount throughput against the plain backing directory on the same disk:
//! `cargo bench --bench mount` (as root, with /dev/fuse). Sequential writes
//! of 8 KiB and 1 MiB (fsync included) and cold sequential reads (page cache
//! dropped). Prints a table with the ratio mount / plain.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SIZE: usize = 256 << 20;

fn drop_caches() {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn write_file(path: &Path, chunk: usize) -> f64 {
    let buf: Vec<u8> = (0..chunk).map(|i| (i * 31 % 251) as u8).collect();
    let _ = std::fs::remove_file(path);
    let start = Instant::now();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .expect("create");
    for _ in 0..SIZE / chunk {
        f.write_all(&buf).expect("write");
    }
    f.sync_all().expect("fsync");
    SIZE as f64 / start.elapsed().as_secs_f64() / 1e6
}

fn read_file(path: &Path, chunk: usize) -> f64 {
    drop_caches();
    let mut buf = vec![0u8; chunk];
    let start = Instant::now();
    let mut f = std::fs::File::open(path).expect("open");
    let mut total = 0;
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        total += n;
    }
    assert_eq!(total, SIZE);
    SIZE as f64 / start.elapsed().as_secs_f64() / 1e6
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let _ = self.0.wait();
    }
}

fn wait(p: impl Fn() -> bool) {
    let t = Instant::now();
    while !p() {
        assert!(t.elapsed() < Duration::from_secs(30), "timed out");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn main() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("run as root (mounting and dropping caches need it)");
        return;
    }
    let bin = env!("CARGO_BIN_EXE_tde");
    // On the disk of the project (not tmpfs), like a real tablespace.
    let dir = tempfile::Builder::new()
        .prefix("tde-bench-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("tmp");
    let (sc, backing, mnt, plain): (PathBuf, PathBuf, PathBuf, PathBuf) = (
        dir.path().join("sc"),
        dir.path().join("backing"),
        dir.path().join("mnt"),
        dir.path().join("plain"),
    );
    for d in [&backing, &mnt, &plain] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    let quiet = |c: &mut Command| {
        c.env_remove("TDE_CONFIG")
            .env("TDE_LOG__LEVEL", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
    };
    let mut c = Command::new(bin);
    c.args(["serve", "--dev"]).env("TDE_DATA_DIR", &sc);
    quiet(&mut c);
    let _sidecar = Kill(c.spawn().expect("serve"));
    wait(|| sc.join("data.sock").exists() && sc.join("admin.sock").exists());
    let mut c = Command::new(bin);
    c.args(["key", "create", "bench"]).env("TDE_DATA_DIR", &sc);
    quiet(&mut c);
    assert!(c.status().expect("key").success());
    let mut c = Command::new(bin);
    c.args([
        "mount",
        "--init",
        "--key",
        "bench",
        "--tablespace",
        "bench",
        "--sidecar",
    ])
    .arg(sc.join("data.sock"))
    .arg(&backing)
    .arg(&mnt);
    quiet(&mut c);
    let _mount = Kill(c.spawn().expect("mount"));
    wait(|| {
        std::fs::read_to_string("/proc/self/mounts")
            .is_ok_and(|m| m.contains(&*mnt.to_string_lossy()))
    });

    println!(
        "| {} MiB sequential               | plain MB/s | tde mount MB/s | mount / plain |",
        SIZE >> 20
    );
    println!("|-----------------------------------|-----------:|---------------:|--------------:|");
    for (name, chunk, write) in [
        ("write 8 KiB + fsync", 8 << 10, true),
        ("write 1 MiB + fsync", 1 << 20, true),
        ("cold read 8 KiB", 8 << 10, false),
        ("cold read 1 MiB", 1 << 20, false),
    ] {
        let run = |d: &Path| {
            let f = d.join("data");
            if write {
                write_file(&f, chunk)
            } else {
                read_file(&f, chunk)
            }
        };
        // Best of three, alternating, to damp disk noise.
        let (mut p, mut m) = (0f64, 0f64);
        for _ in 0..3 {
            p = p.max(run(&plain));
            m = m.max(run(&mnt));
        }
        println!("| {name:<33} | {p:>10.0} | {m:>14.0} | {:>12.2}x |", m / p);
    }
    let _ = std::fs::remove_file(mnt.join("data"));
}
