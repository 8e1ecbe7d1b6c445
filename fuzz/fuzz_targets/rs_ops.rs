#![no_main]
//! Fuzz target `rs_ops`: see `vectors::harness::rs_ops`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| vectors::harness::rs_ops(data));
