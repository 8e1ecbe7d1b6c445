//! NTMobile entities (node, DC, RS, AS, NS, CS) as sans-IO state machines.
//!
//! This crate is where the protocol's behaviour lives: bytes and time in, transmits, events and
//! timeouts out. It depends on [`ntm_wire`] and a seeded RNG (`rand_core`, `rand_chacha`) only,
//! and never reads a clock, a socket or OS randomness; it sits second in the one-way chain
//! wire ← state ← runtime ← servers. The state machines arrive with the state-machine
//! milestone. What is here already:
//!
//! * [`time::Time`], the virtual time every machine is driven with;
//! * [`sim`], a deterministic whole-network simulator (hosts, links, RFC 4787 NATs, IPv4/IPv6,
//!   moving hosts) in virtual time, for tests that run the machines against each other.

pub mod sim;
pub mod time;

pub use ntm_wire as wire;
