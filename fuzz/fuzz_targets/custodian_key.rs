#![no_main]
//! Fuzzes `tde_sidecar::custodian::fuzz` (custodian OpenPGP keys): `cargo +nightly fuzz run custodian_key fuzz/corpus/custodian_key`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tde_sidecar::custodian::fuzz(data));
