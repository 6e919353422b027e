//! The C client in docs/PROTOCOL.md compiles and talks to a real daemon, so
//! the document stays sufficient to write a client from.

mod common;

use common::*;

#[test]
fn the_documented_c_client_works() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/PROTOCOL.md"))
        .expect("doc");
    let start = doc.find("```c\n").expect("C block") + 5;
    let len = doc[start..].find("```").expect("end of C block");
    let env = Env::new("");
    let src = env.dir.path().join("client.c");
    let bin = env.dir.path().join("client");
    std::fs::write(&src, &doc[start..start + len]).expect("write");
    let cc = std::process::Command::new("cc")
        .args(["-Wall", "-Werror", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .expect("run cc");
    assert!(
        cc.status.success(),
        "{}",
        String::from_utf8_lossy(&cc.stderr)
    );

    let shares = env.init();
    let _daemon = env.serve();
    let run = || {
        let out = std::process::Command::new(&bin)
            .arg(env.admin_socket())
            .output()
            .expect("run client");
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(run(), "sealed: yes\n");
    env.unseal(&shares[..3]);
    assert_eq!(run(), "sealed: no\n");
}
