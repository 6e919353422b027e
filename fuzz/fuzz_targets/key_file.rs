#![no_main]
//! `cargo +nightly fuzz run key_file -- fuzz/corpus/key_file` (see tde_plugin::fuzz).
libfuzzer_sys::fuzz_target!(|data: &[u8]| tde_plugin::fuzz::key_file(data));
