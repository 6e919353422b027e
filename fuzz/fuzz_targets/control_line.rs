#![no_main]
//! `cargo +nightly fuzz run control_line -- fuzz/corpus/control_line` (see tde_plugin::fuzz).
libfuzzer_sys::fuzz_target!(|data: &[u8]| tde_plugin::fuzz::control_line(data));
