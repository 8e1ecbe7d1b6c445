#![no_main]
//! Fuzz target `signaling_header`: see `vectors::harness::signaling_header`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| vectors::harness::signaling_header(data));
