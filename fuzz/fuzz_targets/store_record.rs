#![no_main]
//! Fuzzes `tde_hsm::fuzz::store_record`: `cargo +nightly fuzz run store_record fuzz/corpus/store_record`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tde_hsm::fuzz::store_record(data));
