//! Issue 12, point 9: `tde status` exits as `vault status` does and shows
//! this store's mounts, not every `tde mount` on the host.

mod common;

use common::Env;
use common::pg::*;

fn mounted(env: &Env, key: &str) -> (Mount, std::path::PathBuf) {
    let backing = env.dir.path().join("backing");
    let mnt = env.dir.path().join("mnt");
    std::fs::create_dir_all(&backing).expect("mkdir");
    std::fs::create_dir_all(&mnt).expect("mkdir");
    (env.mount_init(key, "ts1", &backing, &mnt), mnt)
}

fn listed(v: &serde_json::Value) -> Vec<String> {
    v["mounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .map(|m| m["mountpoint"].as_str().expect("mountpoint").to_string())
        .collect()
}

#[test]
fn status_exits_like_vault_and_shows_this_stores_mounts() {
    // Exit codes, without mounts: sealed 2, unsealed 0, unreachable 1.
    let env = Env::new("");
    let shares = env.init();
    let daemon = env.serve();
    let (rc, v) = env.json(&["status"]);
    assert_eq!((rc, v["sealed"].as_bool()), (2, Some(true)), "{v}");
    let out = env.cmd(&["status"]).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).contains("sealed (unseal progress 0/3)"));
    env.unseal(&shares[..3]);
    let (rc, v) = env.json(&["status"]);
    assert_eq!((rc, v["sealed"].as_bool()), (0, Some(false)), "{v}");
    env.ok(&["key", "create", "pg-main"]);

    if !can_run() {
        daemon.stop();
        let (rc, v) = env.json(&["status"]);
        assert_eq!(rc, 1, "{v}");
        return;
    }
    let _serial = serial();
    // A second store with a mount of its own.
    let other = Env::new("");
    let _other_daemon = other.sidecar_with_keys(&["pg-main"]);
    let (m_other, mnt_other) = mounted(&other, "pg-main");
    let (m, mnt) = mounted(&env, "pg-main");
    let (mnt, mnt_other) = (mnt.display().to_string(), mnt_other.display().to_string());

    let v = env.status();
    assert_eq!(
        listed(&v),
        vec![mnt.clone()],
        "only this store's mount: {v}"
    );
    assert!(v["other_mounts"].as_u64() >= Some(1), "{v}");
    assert_eq!(
        v["mounts"][0]["sidecar"],
        env.data_socket().display().to_string()
    );
    let v = other.status();
    assert_eq!(listed(&v), vec![mnt_other.clone()], "{v}");
    let (rc, v) = env.json(&["status", "--all"]);
    assert_eq!(rc, 0);
    let all = listed(&v);
    assert!(all.contains(&mnt) && all.contains(&mnt_other), "{v}");
    let out = env.cmd(&["status"]).output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("mount:      {mnt}")), "{text}");
    assert!(!text.contains(&mnt_other), "{text}");
    assert!(text.contains("tde status --all"), "{text}");

    // Issue 12, point 11: inspect of a mountpoint points at its backing
    // directory; an idle re-key says so.
    let out = env.cmd(&["inspect", &mnt]).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is the mountpoint of a tde mount"), "{err}");
    assert!(
        err.contains(&format!(
            "tde inspect {}",
            env.dir.path().join("backing").display()
        )),
        "{err}"
    );
    let out = env.cmd(&["rekey", &mnt, "--status"]).output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.trim(), "no re-key running on this mount", "{out:?}");

    // The sidecar gone: exit 1, and the mount, still serving, is listed.
    daemon.stop();
    let (rc, v) = env.json(&["status"]);
    assert_eq!(rc, 1, "{v}");
    assert!(v["sidecar_error"].is_string(), "{v}");
    assert_eq!(listed(&v), vec![mnt], "{v}");
    m.stop();
    m_other.stop();
}
