//! The last of the root package's test targets (cargo runs them in name
//! order): one line that sums up the end-to-end tests the targets before it
//! skipped, and why (each skip is listed by `common::skip`). Not a libtest
//! harness, so the line is not captured.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

fn main() {
    let list = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("skipped-tests");
    let text = std::fs::read_to_string(&list).unwrap_or_default();
    let _ = std::fs::remove_file(&list);
    // A target run twice (by hand) lists its skips twice: once each.
    let lines: BTreeSet<&str> = text.lines().collect();
    let mut by_reason: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for line in lines {
        if let Some((test, why)) = line.split_once('\t') {
            by_reason.entry(why).or_default().push(test);
        }
    }
    let n: usize = by_reason.values().map(Vec::len).sum();
    if n == 0 {
        println!("\nend-to-end tests: none skipped");
        return;
    }
    let reasons: Vec<String> = by_reason
        .iter()
        .map(|(why, tests)| format!("{} because {why}", tests.len()))
        .collect();
    println!(
        "\nend-to-end tests: {n} skipped ({}); `cargo test -- --nocapture` names each (SKIPPED lines); as root with /dev/fuse, fuse3 and PostgreSQL 15 every one runs",
        reasons.join("; ")
    );
}
