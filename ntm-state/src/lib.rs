//! NTMobile entities (node, DC, RS, AS, NS, CS) as sans-IO state machines.
//!
//! This crate is where the protocol's behaviour lives: bytes and time in, transmits, events and
//! timeouts out. It depends on [`ntm_wire`], a seeded RNG (`rand_core`, `rand_chacha`) and small
//! pure crates (`hmac`, `sha2`, `zeroize`) only, and never reads a clock, a socket or OS
//! randomness; it sits second in the one-way chain wire ← state ← runtime ← servers. What is
//! here so far:
//!
//! * [`signaling`], what every entity shares: transmits, keys as one holder sees them (sealing
//!   with fresh sequence numbers, opening behind a replay window), drop reasons and counters,
//!   transactions retransmitted on the schedule of spec/07;
//! * [`as_server::AccountServer`], the account server's side of the login;
//! * [`login::LoginClient`], the node's side of the login;
//! * [`dc::DirectionCoordinator`], the DC: node↔DC keys from the AS, virtual address pairs
//!   stable per FQDN, registrations with their observed addresses, keep-alives, directions and
//!   relay authorization;
//! * [`registration::Registrar`], the node's side of registration, NAT detection and upkeep;
//! * [`route`], route selection (spec/06): the pure decision a DC takes for each tunnel;
//! * [`rs::RelayServer`], the relay: forwards each path its DC authorized between the two
//!   bound sides without decrypting, across IPv4 and IPv6;
//! * [`node::Node`], the node: login, registration, directions, tunnels, data, handover, route
//!   optimization;
//! * [`cs::CacheServer`], the cache server: sealed blobs held for offline nodes of its zone;
//! * [`ns::NotificationServer`], the notification server: the TCP push channel to nodes, as
//!   bytes in and out per connection;
//! * [`time::Time`], the virtual time every machine is driven with;
//! * [`sim`], a deterministic whole-network simulator (hosts, links, RFC 4787 NATs, IPv4/IPv6,
//!   moving hosts) in virtual time, for tests that run the machines against each other.
//!
//! Every machine follows one contract: `handle_*(now, ..)` for input; `poll_event`,
//! `poll_transmit(now, buf)` and `poll_timeout()` for output, drained in that order after each
//! input until only a timeout is left. Randomness comes in as a `rand_core` generator argument.

pub mod as_server;
pub mod cs;
pub mod dc;
pub mod dns;
pub mod login;
pub mod node;
pub mod ns;
pub mod registration;
pub mod route;
pub mod rs;
pub mod signaling;
pub mod sim;
pub mod time;

pub use ntm_wire as wire;
