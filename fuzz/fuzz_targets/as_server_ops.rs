#![no_main]
//! Fuzz target `as_server_ops`: see `vectors::harness::as_server_ops`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| vectors::harness::as_server_ops(data));
