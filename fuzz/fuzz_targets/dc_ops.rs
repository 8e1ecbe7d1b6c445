#![no_main]
//! Fuzz target `dc_ops`: see `vectors::harness::dc_ops`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| vectors::harness::dc_ops(data));
