//! In-process HSM costs: `cargo bench -p tde-hsm`. Prints a table.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tde_hsm::store::{ObjectStore, StoreError, StoreMeta, StoreOp, StoredObject};
use tde_hsm::{Context, Hsm, TamperPolicy};

/// Meta, sealed root, objects.
type Contents = (Option<StoreMeta>, Option<Vec<u8>>, Vec<StoredObject>);

/// A store that keeps everything in memory, so the numbers are the HSM's own.
#[derive(Default)]
struct Mem(std::sync::Mutex<Contents>);

impl ObjectStore for Mem {
    fn meta(&self) -> Result<Option<StoreMeta>, StoreError> {
        Ok(self.0.lock().expect("lock").0.clone())
    }
    fn initialize(&self, m: &StoreMeta, r: &[u8], o: &[StoredObject]) -> Result<(), StoreError> {
        *self.0.lock().expect("lock") = (Some(m.clone()), Some(r.to_vec()), o.to_vec());
        Ok(())
    }
    fn sealed_root(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.0.lock().expect("lock").1.clone())
    }
    fn objects(&self) -> Result<Vec<StoredObject>, StoreError> {
        Ok(self.0.lock().expect("lock").2.clone())
    }
    fn apply(&self, ops: &[StoreOp]) -> Result<(), StoreError> {
        let mut g = self.0.lock().expect("lock");
        for op in ops {
            if let StoreOp::Put(o) = op {
                g.2.retain(|x| !(x.kind == o.kind && x.id == o.id));
                g.2.push(o.clone());
            }
        }
        Ok(())
    }
    fn zeroize(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

fn time<F: FnMut()>(name: &str, mut f: F) {
    for _ in 0..100 {
        f();
    }
    let mut n = 0u64;
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(700) {
        f();
        n += 1;
    }
    let per = start.elapsed().as_secs_f64() / n as f64;
    println!("| {name:<34} | {:>10.2} | {:>12.0} |", per * 1e6, 1.0 / per);
}

fn main() {
    let store = Arc::new(Mem::default());
    let out = Hsm::init(store.as_ref(), 1, 1, true, "admin", b"bench-password").expect("init");
    let hsm = Hsm::open(store, TamperPolicy::default()).expect("open");
    hsm.unseal(out.shares[0].expose()).expect("unseal");
    let admin = hsm.login("admin", b"bench-password").expect("login");
    hsm.key_create(&admin, "k", "", 0).expect("create");
    let ctx: Context = [
        ("tablespace".to_string(), "16384".to_string()),
        ("cluster".into(), "c1".into()),
    ]
    .into();
    let g = hsm
        .generate_data_key(tde_hsm::Caller::Client, "k", &ctx)
        .expect("gen");
    hsm.key_rotate(&admin, "k").expect("rotate");
    let blob = tde_hsm::WrappedKey::parse(&g.ciphertext).expect("parse");
    println!("| operation (one thread, in process)  | µs / op    | ops / s      |");
    println!("|------------------------------------|-----------:|-------------:|");
    time("generate_data_key", || {
        hsm.generate_data_key(tde_hsm::Caller::Client, "k", &ctx)
            .expect("gen");
    });
    time("decrypt (unwrap)", || {
        hsm.decrypt(tde_hsm::Caller::Client, &blob, &ctx)
            .expect("decrypt");
    });
    time("re_encrypt (v1 -> v2)", || {
        hsm.re_encrypt(tde_hsm::Caller::Client, &blob, &ctx)
            .expect("rewrap");
    });
    let mut i = 0u64;
    time("key_create + key_rotate (sealed)", || {
        i += 1;
        let name = format!("r{i}");
        hsm.key_create(&admin, &name, "", 0).expect("create");
        hsm.key_rotate(&admin, &name).expect("rotate");
    });
    let start = Instant::now();
    hsm.login("admin", b"bench-password").expect("login");
    println!(
        "| {:<34} | {:>10.0} | {:>12.1} |",
        "login (Argon2id 19 MiB, t=2)",
        start.elapsed().as_secs_f64() * 1e6,
        1.0 / start.elapsed().as_secs_f64()
    );
}
