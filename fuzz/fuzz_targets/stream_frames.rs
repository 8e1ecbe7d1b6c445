#![no_main]
//! Fuzz target `stream_frames`: see `vectors::harness::stream_frames`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| vectors::harness::stream_frames(data));
