//! Graceful shutdown: SIGTERM while requests are in flight. Each request the
//! daemon has read is finished and answered, the daemon exits cleanly,
//! removes its sockets, and the audit chain ends with `daemon_stop`.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use tde_protocol::frame::read_frame;
use tde_protocol::{Request, Response, SecretBytes};

#[test]
fn sigterm_finishes_in_flight_requests() {
    let env = Env::new("");
    let shares = env.init();
    let daemon = env.serve();
    env.unseal(&shares[..3]);

    // Logins cost ~25 ms of Argon2 each; 16 of them keep both cores busy for
    // a while, so they are still being handled when SIGTERM arrives.
    let mut conns: Vec<UnixStream> = (0..16)
        .map(|_| {
            let s = UnixStream::connect(env.admin_socket()).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(30)))
                .expect("timeout");
            s
        })
        .collect();
    for (i, s) in conns.iter_mut().enumerate() {
        let req = Request::Login {
            operator: "admin".into(),
            password: SecretBytes::from_slice(PASSWORD.as_bytes()),
        };
        s.write_all(&req.to_frame(i as u64).encode().expect("encode"))
            .expect("send");
    }
    std::thread::sleep(Duration::from_millis(30));
    daemon.stop();

    for (i, s) in conns.iter_mut().enumerate() {
        let f = read_frame(s)
            .expect("read")
            .expect("an answer, not a close");
        assert_eq!(f.header.request_id, i as u64);
        assert!(
            matches!(Response::from_frame(&f), Ok(Response::LoggedIn { .. })),
            "login {i} was answered"
        );
        assert!(read_frame(s).expect("read").is_none(), "then a clean close");
    }
    assert!(
        !env.admin_socket().exists() && !env.data_socket().exists(),
        "sockets removed"
    );
    let recs = audit(&env.db());
    assert_eq!(count(&recs, "login", "ok"), 16);
    assert_eq!(recs.last().expect("records")["op"], "daemon_stop");
}
