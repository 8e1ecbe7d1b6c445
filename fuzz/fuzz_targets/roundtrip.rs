#![no_main]
//! Fuzz target `roundtrip`: see `vectors::harness::roundtrip`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| vectors::harness::roundtrip(data));
