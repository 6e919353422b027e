#![no_main]
//! Fuzzes `tde_hsm::fuzz::unseal_share`: `cargo +nightly fuzz run unseal_share fuzz/corpus/unseal_share`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tde_hsm::fuzz::unseal_share(data));
