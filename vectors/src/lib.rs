//! Golden test vectors for the NTMobile wire format and the code that makes and checks them.
//!
//! * `messages/*.toml`: at least one sealed datagram per signaling message type, with its key,
//!   envelope, nonce, plaintext body and decoded fields; plus the data packet.
//! * `crypto/*.toml`: every key derivation and envelope construction with fixed inputs.
//!
//! The vectors are written once by `cargo run -p vectors --bin gen-vectors` and then frozen:
//! `tests/golden.rs` decodes each, compares the fields, re-encodes byte-exactly and re-derives
//! every crypto output, so a change to the wire format fails the tests. See `README.md`.

pub mod form;
pub mod harness;
pub mod samples;

use std::path::PathBuf;

/// The directory holding the vector files.
pub fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}
