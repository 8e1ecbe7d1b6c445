#![no_main]
//! Fuzz target `node_ops`: see `vectors::harness::node_ops`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| vectors::harness::node_ops(data));
