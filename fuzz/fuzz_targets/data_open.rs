#![no_main]
//! Fuzz target `data_open`: see `vectors::harness::data_open`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| vectors::harness::data_open(data));
