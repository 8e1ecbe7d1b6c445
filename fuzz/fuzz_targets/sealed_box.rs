#![no_main]
//! Fuzz target `sealed_box`: see `vectors::harness::sealed_box`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| vectors::harness::sealed_box(data));
