//! Issue 15, point 1: the images build on a Debian base made from the
//! distribution's packages (debootstrap, then `docker import`: no registry
//! is reached), `docker/compose.yaml` starts, PostgreSQL in it creates a
//! table in the encrypted tablespace, the backing volume holds no plaintext,
//! `down` + `up` keeps the data, and `/health` answers 200 in the sidecar's
//! container. Skipped, saying why, where there is no Docker daemon.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::pg::files_containing;

const BASE: &str = "tde-test/debian:bookworm-slim";

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("run")
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn docker(args: &[&str]) -> Command {
    let mut c = Command::new("docker");
    c.args(args).env("DOCKER_BUILDKIT", "0");
    c
}

/// Whether a Docker daemon answers, and the tools are there.
fn docker_ready() -> bool {
    let why = if !rustix::process::geteuid().is_root() {
        Some("needs root (the Docker daemon's socket, /dev/fuse for the container)")
    } else if Command::new("docker")
        .arg("info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_or(true, |s| !s.success())
    {
        Some(
            "no Docker daemon answers (.ci/run starts one: dockerd --bridge=none --iptables=false)",
        )
    } else if Command::new("docker-compose")
        .arg("version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        Some("no docker-compose (package docker-compose)")
    } else {
        None
    };
    if let Some(why) = why {
        common::skip(why);
        return false;
    }
    true
}

/// The base image, made from the distribution's packages once per machine.
fn base_image() {
    if run(&mut docker(&["image", "inspect", BASE]))
        .status
        .success()
    {
        return;
    }
    let mirror = std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("URIs:").map(|u| u.trim().to_string()))
        })
        .unwrap_or_else(|| "http://deb.debian.org/debian".into());
    let dir = tempfile::tempdir().expect("tmp");
    let root = dir.path().join("rootfs");
    ok(Command::new("debootstrap")
        .args(["--variant=minbase", "bookworm"])
        .arg(&root)
        .arg(&mirror));
    ok(Command::new("sh").arg("-c").arg(format!(
        "tar -C '{}' -c . | docker import - {BASE}",
        root.display()
    )));
}

/// The two images from docker/Dockerfile's prebuilt targets, with the
/// `tde` binary under test (stripped).
fn build_images(tag: &str) -> (String, String) {
    let ctx = tempfile::tempdir().expect("tmp");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    ok(Command::new("cp")
        .arg("-r")
        .arg(repo.join("docker"))
        .arg(ctx.path()));
    ok(Command::new("strip")
        .arg("-o")
        .arg(ctx.path().join("tde"))
        .arg(env!("CARGO_BIN_EXE_tde")));
    let (sidecar, postgres) = (format!("tde-e2e:{tag}"), format!("tde-e2e-postgres:{tag}"));
    for (target, name) in [
        ("runtime-prebuilt", &sidecar),
        ("postgres-prebuilt", &postgres),
    ] {
        ok(docker(&[
            "build",
            "-q",
            "--network",
            "host",
            "-f",
            "docker/Dockerfile",
        ])
        .args(["--target", target])
        .args(["--build-arg", &format!("BASE_IMAGE={BASE}")])
        .args(["--build-arg", "TDE_BINARY=tde", "-t", name, "."])
        .current_dir(ctx.path()));
    }
    (sidecar, postgres)
}

/// `docker-compose` on the shipped file, as project `project`.
struct Compose {
    project: String,
    images: (String, String),
}

impl Compose {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("docker-compose");
        c.arg("-f")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/compose.yaml"))
            .args(["-p", &self.project])
            .args(args)
            .env("TDE_IMAGE", &self.images.0)
            .env("TDE_POSTGRES_IMAGE", &self.images.1);
        c
    }

    fn container(&self, service: &str) -> String {
        ok(&mut self.cmd(&["ps", "-q", service]))
    }

    /// Up, and both services healthy (within 3 minutes).
    fn up(&self) {
        ok(&mut self.cmd(&["up", "-d"]));
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let id = self.container("postgres");
            let health = if id.is_empty() {
                String::new()
            } else {
                ok(&mut docker(&[
                    "inspect",
                    "-f",
                    "{{.State.Health.Status}}",
                    &id,
                ]))
            };
            if health == "healthy" {
                return;
            }
            if Instant::now() > deadline {
                let logs = run(&mut self.cmd(&["logs", "--no-color"]));
                panic!(
                    "the compose services did not become healthy ({health}):\n{}{}",
                    String::from_utf8_lossy(&logs.stdout),
                    String::from_utf8_lossy(&logs.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn psql(&self, sql: &str) -> String {
        ok(&mut docker(&[
            "exec",
            &self.container("postgres"),
            "runuser",
            "-u",
            "postgres",
            "--",
            "psql",
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ]))
    }

    fn volume(&self, name: &str) -> PathBuf {
        PathBuf::from(ok(&mut docker(&[
            "volume",
            "inspect",
            "-f",
            "{{.Mountpoint}}",
            &format!("{}_{name}", self.project),
        ])))
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = run(&mut self.cmd(&["logs", "--no-color"]));
            eprintln!(
                "--- compose logs ---\n{}",
                String::from_utf8_lossy(&logs.stdout)
            );
        }
        let _ = run(&mut self.cmd(&["down", "-v", "-t", "60"]));
        let _ = run(&mut docker(&["rmi", "-f", &self.images.0, &self.images.1]));
    }
}

#[test]
fn the_compose_file_runs_postgres_on_an_encrypted_tablespace() {
    if !docker_ready() || !Path::new("/dev/fuse").exists() {
        return;
    }
    base_image();
    let tag = std::process::id().to_string();
    let compose = Compose {
        project: format!("tdee2e{tag}"),
        images: build_images(&tag),
    };
    // The production variant is a valid overlay of the same file.
    let prod = Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/compose.prod.yaml");
    ok(compose.cmd(&[]).arg("-f").arg(&prod).args(["config", "-q"]));

    compose.up();
    compose.psql("CREATE TABLE t (v text) TABLESPACE secure");
    compose.psql("INSERT INTO t SELECT 'DOCKER-MARKER-' || g FROM generate_series(1, 500) g");
    compose.psql("CHECKPOINT");
    assert_eq!(compose.psql("SELECT count(*) FROM t"), "500");
    let backing = compose.volume("pg-backing");
    assert!(
        backing.join("secure/tde.key").exists(),
        "{}",
        backing.display()
    );
    assert!(
        files_containing(&backing, b"DOCKER-MARKER-").is_empty(),
        "plaintext in the backing volume"
    );
    // /health, from inside the sidecar's container (its own loopback).
    let health = ok(&mut docker(&[
        "exec",
        &compose.container("sidecar"),
        "bash",
        "-c",
        "exec 3<>/dev/tcp/127.0.0.1/9464; printf 'GET /health HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3",
    ]));
    assert!(health.starts_with("HTTP/1.0 200"), "{health}");
    assert!(health.contains("\"sealed\":false"), "{health}");

    // down + up: the volumes keep the store, the key file and the data.
    ok(&mut compose.cmd(&["down", "-t", "60"]));
    assert!(
        !std::fs::read_to_string("/proc/mounts")
            .unwrap_or_default()
            .contains("/var/lib/postgresql/tde/secure"),
        "a mount outlived its container"
    );
    compose.up();
    assert_eq!(
        compose.psql("SELECT count(*) FROM t WHERE v LIKE 'DOCKER-MARKER-%'"),
        "500"
    );
    // It had stopped cleanly (PostgreSQL first, then the mount): no crash
    // recovery at this start.
    let logs = run(&mut docker(&["logs", &compose.container("postgres")]));
    let logs = String::from_utf8_lossy(&logs.stderr);
    assert!(logs.contains("database system was shut down at"), "{logs}");
}
