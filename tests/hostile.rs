//! The sidecar under hostile local clients (issue 10): each test performs
//! one attack through the real `tde serve` and asserts that other clients
//! are unaffected.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use tde_protocol::{DekRef, ErrorCode, Request, Response};

/// Runs `f` on `n` threads until `stop` is set; returns each thread's
/// (requests, failures).
fn load<F>(
    n: usize,
    stop: &Arc<AtomicBool>,
    f: F,
) -> Vec<std::thread::JoinHandle<(u64, Vec<String>)>>
where
    F: Fn(usize) -> Box<dyn FnMut() -> Result<(), String> + Send> + Send + Sync + 'static,
{
    let f = Arc::new(f);
    (0..n)
        .map(|t| {
            let stop = stop.clone();
            let f = f.clone();
            std::thread::spawn(move || {
                let mut step = f(t);
                let (mut done, mut failed) = (0, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    if let Err(e) = step() {
                        failed.push(e);
                    }
                    done += 1;
                }
                (done, failed)
            })
        })
        .collect()
}

/// Defect 1: a `REGISTER_DEKS` naming one data key twice is refused on its
/// own, and the other clients' records in the same group commits (data
/// keys, an officer's rotation, a valid registration) all land.
#[test]
fn one_bad_registration_does_not_fail_the_batch() {
    let env = Env::new("");
    let shares = env.init();
    let _daemon = env.serve();
    env.unseal(&shares[..3]);
    env.ok(&["key", "create", "app-batch"]);

    let stop = Arc::new(AtomicBool::new(false));
    let path = env.data_socket();
    let bad = load(2, &stop, move |_| {
        let mut c = Raw::connect(&path);
        Box::new(move || {
            match c.call(&Request::RegisterDeks {
                key: "app-batch".into(),
                context: ctx(&[("tablespace", "evil")]),
                location: "/evil".into(),
                deks: vec![
                    DekRef {
                        dek_version: 1,
                        key_version: 1,
                    },
                    DekRef {
                        dek_version: 1,
                        key_version: 1,
                    },
                ],
            }) {
                Response::Error {
                    code: ErrorCode::InvalidArgument,
                    ..
                } => Ok(()),
                r => Err(format!("duplicate registration: {r:?}")),
            }
        })
    });
    let path = env.data_socket();
    let good = load(6, &stop, move |t| {
        let mut c = Raw::connect(&path);
        let context = ctx(&[("tablespace", &format!("ts{t}"))]);
        Box::new(move || {
            match c.call(&Request::GenerateDataKey {
                key: "app-batch".into(),
                context: context.clone(),
            }) {
                Response::DataKey { .. } => Ok(()),
                r => Err(format!("{r:?}")),
            }
        })
    });
    let mut c = Raw::connect(&env.data_socket());
    let registered = c.call(&Request::RegisterDeks {
        key: "app-batch".into(),
        context: ctx(&[("tablespace", "good")]),
        location: "/good".into(),
        deks: vec![DekRef {
            dek_version: 1,
            key_version: 1,
        }],
    });
    assert!(
        matches!(registered, Response::KeyPrimary { .. }),
        "{registered:?}"
    );
    for _ in 0..3 {
        env.ok(&["key", "rotate", "app-batch"]);
    }
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let mut bad_done = 0;
    for h in bad {
        let (n, failed) = h.join().expect("bad client");
        assert!(failed.is_empty(), "{:?}", &failed[..failed.len().min(3)]);
        bad_done += n;
    }
    let mut good_done = 0;
    for h in good {
        let (n, failed) = h.join().expect("good client");
        assert!(
            failed.is_empty(),
            "{} failed, e.g. {:?}",
            failed.len(),
            failed.first()
        );
        good_done += n;
    }
    assert!(bad_done > 100 && good_done > 100, "{bad_done} {good_done}");
    let v = env.ok(&["key", "show", "app-batch"]);
    assert_eq!(v["primary_version"], 4, "{v}");
    let refs: Vec<&serde_json::Value> = v["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .flat_map(|v| v["used_by"].as_array().expect("used_by"))
        .collect();
    assert_eq!(refs.len(), 1, "only the valid registration: {v}");
    assert_eq!(refs[0]["location"], "/good");
    let recs = audit(&env.db());
    assert_eq!(refusals(&recs, "register_deks", "AUDIT_FAILED"), 0);
    assert_eq!(
        recs.iter()
            .filter(|r| r["error_code"] == "AUDIT_FAILED")
            .count(),
        0
    );
    assert!(refusals(&recs, "register_deks", "INVALID_ARGUMENT") as u64 >= bad_done);
}

/// Adds a trigger to the store that refuses audit records matching `like`
/// (standing in for a write that fails: disk full, I/O error).
fn refuse_records(env: &Env, like: &str) {
    let conn = tde_sidecar::store::connect(&env.db()).expect("open db");
    conn.execute_batch(&format!(
        "CREATE TRIGGER refuse BEFORE INSERT ON audit WHEN NEW.record LIKE '{like}'
         BEGIN SELECT RAISE(ABORT, 'simulated write failure'); END;"
    ))
    .expect("trigger");
}

/// Defect 6: a login whose audit record cannot be written is refused and
/// leaves the connection logged out.
#[test]
fn refused_login_leaves_the_session_logged_out() {
    let env = Env::new("");
    let shares = env.init();
    let _daemon = env.serve();
    env.unseal(&shares[..3]);
    refuse_records(&env, r#"%"op":"login"%"#);
    let mut c = Raw::connect(&env.admin_socket());
    let r = c.call(&Request::Login {
        operator: "admin".into(),
        password: tde_protocol::SecretBytes::from_slice(PASSWORD.as_bytes()),
    });
    assert!(
        matches!(
            r,
            Response::Error {
                code: ErrorCode::AuditFailed,
                ..
            }
        ),
        "{r:?}"
    );
    let r = c.call(&Request::KeyList);
    assert!(
        matches!(
            r,
            Response::Error {
                code: ErrorCode::NotAuthenticated,
                ..
            }
        ),
        "the refused login must not log the connection in: {r:?}"
    );
    // Other records still land while logins cannot.
    let r = c.call(&Request::Status);
    assert!(matches!(r, Response::Status(_)), "{r:?}");
}

/// Defect 5: forty parallel wrong guesses get at most five password
/// checks; the operator ends locked with five failures counted, and the
/// right password is refused afterwards.
#[test]
fn parallel_guesses_cannot_pass_the_lockout() {
    let env = Env::new("");
    let shares = env.init();
    let _daemon = env.serve();
    env.unseal(&shares[..3]);
    let out = env
        .cmd(&["operator", "add", "carol", "--role", "auditor", "--json"])
        .env("TDE_NEW_PASSWORD", "carol-password")
        .output()
        .expect("run");
    assert_eq!(parse(&out, &[]).0, 0);

    let barrier = Arc::new(std::sync::Barrier::new(40));
    let guesses: Vec<_> = (0..40)
        .map(|i| {
            let path = env.admin_socket();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut c = Raw::connect(&path);
                barrier.wait();
                match c.call(&Request::Login {
                    operator: "admin".into(),
                    password: tde_protocol::SecretBytes::from_slice(
                        format!("wrong-guess-{i}").as_bytes(),
                    ),
                }) {
                    Response::Error { code, .. } => code,
                    r => panic!("a wrong guess logged in: {r:?}"),
                }
            })
        })
        .collect();
    let codes: Vec<ErrorCode> = guesses
        .into_iter()
        .map(|g| g.join().expect("guess"))
        .collect();
    let failed = codes
        .iter()
        .filter(|c| **c == ErrorCode::LoginFailed)
        .count();
    assert!(
        failed <= 4,
        "{failed} guesses answered LOGIN_FAILED: {codes:?}"
    );
    assert!(
        codes
            .iter()
            .all(|c| matches!(c, ErrorCode::LoginFailed | ErrorCode::OperatorLocked)),
        "{codes:?}"
    );
    let mut c = Raw::connect(&env.admin_socket());
    let r = c.call(&Request::Login {
        operator: "admin".into(),
        password: tde_protocol::SecretBytes::from_slice(PASSWORD.as_bytes()),
    });
    assert!(
        matches!(
            r,
            Response::Error {
                code: ErrorCode::OperatorLocked,
                ..
            }
        ),
        "the right password after the lockout: {r:?}"
    );
    let out = env
        .cmd(&["operator", "list", "--json"])
        .env("TDE_OPERATOR", "carol")
        .env("TDE_PASSWORD", "carol-password")
        .output()
        .expect("run");
    let (rc, v) = parse(&out, &[]);
    assert_eq!(rc, 0, "{v}");
    let admin = v
        .as_array()
        .and_then(|a| a.iter().find(|o| o["name"] == "admin"))
        .unwrap_or_else(|| panic!("no admin in {v}"));
    assert_eq!(admin["locked"], true, "{admin}");
    assert_eq!(
        admin["failed_logins"], 5,
        "only five guesses were checked: {admin}"
    );
}
