//! A short fuzzing run in every `cargo test` (and so in CI): each harness of
//! `tde_plugin::fuzz` gets the committed seed corpus (`fuzz/corpus/NAME/`),
//! then mutations of it (bit flips, byte changes, cuts, splices, repeats)
//! from a fixed-seed generator, for a bounded time. The same harnesses run
//! under libFuzzer with `cargo +nightly fuzz run NAME fuzz/corpus/NAME`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Time per target.
const BUDGET: Duration = Duration::from_secs(3);

fn corpus(name: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(name);
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| std::fs::read(e.expect("entry").path()).expect("seed"))
        .collect();
    seeds.sort();
    assert!(
        seeds.len() >= 3,
        "{}: the seed corpus is missing",
        dir.display()
    );
    seeds
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One mutation of `seed` (with `other` for splices).
fn mutate(rng: &mut Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(7) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = [0, 0xff, b'"', b'{', b'1', b'\\', 0x80][rng.below(7)];
            }
            2 => v.truncate(rng.below(v.len() + 1)),
            3 => {
                let at = rng.below(v.len() + 1);
                let from = rng.below(other.len() + 1);
                let n = rng.below(other.len() - from + 1);
                v.splice(at..at, other[from..from + n].iter().copied());
            }
            4 if !v.is_empty() => {
                let from = rng.below(v.len());
                let n = rng.below((v.len() - from).min(64) + 1);
                let piece = v[from..from + n].to_vec();
                let at = rng.below(v.len() + 1);
                v.splice(at..at, piece);
            }
            5 if v.len() >= 8 => {
                let i = rng.below(v.len() - 7);
                let n = [0u64, 1, 63, 64, 8223, 8224, 8225, u64::MAX][rng.below(8)];
                v[i..i + 8].copy_from_slice(&n.to_be_bytes());
            }
            _ => {
                let at = rng.below(v.len() + 1);
                v.insert(at, rng.next() as u8);
            }
        }
    }
    v
}

fn run(name: &str, harness: fn(&[u8])) {
    let seeds = corpus(name);
    for s in &seeds {
        harness(s);
    }
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ name.len() as u64);
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < BUDGET {
        let a = &seeds[rng.below(seeds.len())];
        let b = &seeds[rng.below(seeds.len())];
        harness(&mutate(&mut rng, a, b));
        n += 1;
    }
    eprintln!("{name}: {} seeds, {n} mutations in {BUDGET:?}", seeds.len());
    assert!(n > 1000, "{name}: only {n} inputs");
}

#[test]
fn file_header_survives_the_corpus_and_mutations() {
    run("file_header", tde_plugin::fuzz::file_header);
}

#[test]
fn key_file_survives_the_corpus_and_mutations() {
    run("key_file", tde_plugin::fuzz::key_file);
}

#[test]
fn control_line_survives_the_corpus_and_mutations() {
    run("control_line", tde_plugin::fuzz::control_line);
}
