//! Must-show 7: 64 concurrent clients, each doing 1,000 generate + decrypt
//! pairs over the real data socket: zero errors, every data key round-trips,
//! and every request has its audit record in an intact chain.

mod common;

use std::collections::HashSet;

use common::*;
use tde_protocol::{Request, Response};

const CLIENTS: usize = 64;
const ROUNDS: usize = 1000;

#[test]
fn sixty_four_clients_a_thousand_pairs_each() {
    let env = Env::new("");
    let shares = env.init();
    let daemon = env.serve();
    env.unseal(&shares[..3]);
    env.ok(&["key", "create", "app-load"]);

    let threads: Vec<_> = (0..CLIENTS)
        .map(|t| {
            let path = env.data_socket();
            std::thread::spawn(move || {
                let mut c = Raw::connect(&path);
                c.id = (t as u64) << 32;
                let ctx = ctx(&[("tablespace", &format!("ts{t}"))]);
                let mut ids = Vec::with_capacity(ROUNDS * 2);
                for _ in 0..ROUNDS {
                    let r = c.call(&Request::GenerateDataKey {
                        key: "app-load".into(),
                        context: ctx.clone(),
                    });
                    ids.push(c.id);
                    let Response::DataKey {
                        plaintext,
                        ciphertext,
                        ..
                    } = r
                    else {
                        panic!("client {t}: generate failed: {r:?}")
                    };
                    let r = c.call(&Request::Decrypt {
                        ciphertext,
                        context: ctx.clone(),
                    });
                    ids.push(c.id);
                    let Response::Decrypted {
                        plaintext: back, ..
                    } = r
                    else {
                        panic!("client {t}: decrypt failed: {r:?}")
                    };
                    assert!(back == plaintext, "client {t}: data key changed");
                }
                ids
            })
        })
        .collect();
    let mut expected = HashSet::new();
    for t in threads {
        expected.extend(t.join().expect("a client failed"));
    }
    assert_eq!(expected.len(), CLIENTS * ROUNDS * 2);
    daemon.stop();

    let recs = audit(&env.db());
    assert_eq!(count(&recs, "generate_data_key", "ok"), CLIENTS * ROUNDS);
    assert_eq!(count(&recs, "decrypt", "ok"), CLIENTS * ROUNDS);
    assert_eq!(
        recs.iter().filter(|r| r["result"] == "error").count(),
        0,
        "no refusals at all"
    );
    let audited: HashSet<u64> = recs
        .iter()
        .filter(|r| r["socket"] == "data")
        .filter_map(|r| r["request_id"].as_u64())
        .collect();
    assert!(
        expected.is_subset(&audited),
        "every request id has its audit record"
    );
}
