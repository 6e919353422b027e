#![no_main]
//! `cargo +nightly fuzz run file_header -- fuzz/corpus/file_header` (see tde_plugin::fuzz).
libfuzzer_sys::fuzz_target!(|data: &[u8]| tde_plugin::fuzz::file_header(data));
