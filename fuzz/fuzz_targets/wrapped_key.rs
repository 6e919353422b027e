#![no_main]
//! Fuzzes `tde_hsm::fuzz::wrapped_key`: `cargo +nightly fuzz run wrapped_key fuzz/corpus/wrapped_key`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tde_hsm::fuzz::wrapped_key(data));
