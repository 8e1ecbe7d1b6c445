//! NTMobile entities (node, DC, RS, AS, NS, CS) as sans-IO state machines.
//!
//! This crate is where the protocol's behaviour lives: bytes and time in, transmits, events and
//! timeouts out. It depends on [`ntm_wire`] only and never reads a clock, a socket or OS
//! randomness. The state machines arrive with the state-machine milestone; until then the crate
//! only fixes its place in the one-way dependency chain `wire ← state ← mio ← servers`.

pub use ntm_wire as wire;
