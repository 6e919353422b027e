#![no_main]
//! Fuzzes `tde_protocol::fuzz::request_body`: `cargo +nightly fuzz run request_body fuzz/corpus/request_body`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tde_protocol::fuzz::request_body(data));
