#![no_main]
//! Fuzzes the frame and message decoders: `cargo +nightly fuzz run frame_decoder`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tde_protocol::fuzz::decode_frames(data));
