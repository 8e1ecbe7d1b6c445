//! The direction coordinator (DC) as a sans-IO state machine: its registry (this module) of the
//! node↔DC keys the AS hands it at login (spec/05-procedures.md §5.2 steps 4-5), registration
//! and its upkeep (§5.2 steps 7 and 10, §5.4) and the DC's side of NAT detection (§5.3); its
//! directions, routes and relays (`directions`, §5.5-5.6, §5.9.2, spec/06); other DCs, found by
//! DNS and keyed by bootstrap (`peers`, §5.5.1, §5.5.3, §5.12); the NS and CS hand-offs
//! (`servers`, §5.4, §5.5.4, §5.14); and DNS for its zone (§5.12).
//!
//! ```text
//! AS                        DC                               node
//!  | KEY_DISTRIBUTION(NodeDc) [K_as-dc]                        |
//!  |------------------------>| session key installed (lifetime_s)
//!  | ACK [K_as-dc]           |                                 |
//!  |<------------------------|                                 |
//!  |                         | REGISTRATION_REQUEST [K_nd]     |
//!  |                         |<--------------------------------|
//!  |                         | virtual pair (stable per FQDN), |
//!  |                         | observed address, expiry 600 s  |
//!  |                         | REGISTRATION_RESPONSE [K_nd]    |
//!  |                         |-------------------------------->|
//!  |                         | KEEPALIVE(reply_requested) [K_nd], to any DC address
//!  |                         |<--------------------------------|
//!  |                         | KEEPALIVE_REPLY(observed_addr)  |
//!  |                         |-------------------------------->|
//! ```
//!
//! # Driving it
//!
//! Feed every datagram to [`DirectionCoordinator::handle_datagram`] with the local address it
//! arrived on (the DC listens on every address of [`DcConfig::addrs`]; nodes send NAT-detection
//! probes to two of them) and call [`DirectionCoordinator::handle_timeout`] when the deadline of
//! [`DirectionCoordinator::poll_timeout`] has passed. After each input, drain
//! [`DirectionCoordinator::poll_event`] first, then [`DirectionCoordinator::poll_transmit`],
//! until only a timeout is left. Two events must be made durable before any datagram polled
//! after them is sent: [`DcEvent::SequenceReserved`] (spec/04 §4.7) and the first
//! [`DcEvent::NodeRegistered`] of an FQDN, whose virtual pair must survive a restart (spec/01
//! §1.3; a restarted DC gets the pairs back through [`DcConfig::assignments`]).
//!
//! # What it keeps
//!
//! * One **node** per FQDN it has been given a key for, at most [`DcLimits::max_nodes`], never
//!   forgotten: its virtual pair (assigned at the first registration, the same pair ever after,
//!   never shared) and its registration, if any: local addresses, observed address per family
//!   (with the DC address it arrived on), reported NAT mapping, static public key, notification
//!   wish, expiry. A registration ends when it is not refreshed within its lifetime, when the
//!   node deregisters (empty `local_addrs`), or when its session key expires.
//! * One **session** per node↔DC key: the key, the DC's sequence number under it, a replay
//!   window for the node's role, and the deadline of its lifetime (then 10 min of grace in which
//!   requests under it are answered ERROR Expired). A session no registration has used yet is
//!   *pending*, in a table bounded by [`DcLimits::max_pending_sessions`]; the first registration
//!   under it moves it into its node's record, where it replaces (and forgets) the session of
//!   the node's previous registration. Each node thus holds at most one session, and has one
//!   deadline in the index: its registration's expiry or its session's, whichever comes first.
//!
//! Sessions are not persisted: a restarted DC answers the node's next request with an unsealed
//! ERROR UnknownKey and the node logs in again, so the DC's sequence numbers under a K_nd start
//! at 0 without ever repeating a nonce.
//!
//! # Memory per node
//!
//! A session keeps the raw 32-byte key and expands it for each datagram (an expanded AES-256-GCM
//! key is about a kilobyte), and its replay window remembers the *gaps* below the highest
//! sequence number instead of a 8192-bit map: [`REPLAY_GAPS`] ranges of values not yet seen.
//! Within that many gaps it decides exactly as the window of spec/04 §4.6; beyond, it forgets
//! the oldest gap, refusing a straggler the full window would still take (never accepting one it
//! would refuse). A node's datagrams to its DC are few and numbered consecutively, so only loss
//! and reordering make gaps, and a refused straggler is retransmitted under a new number.
//! `tests/dc_memory.rs` measures the whole per-node footprint.
//!
//! # The observed address
//!
//! In each family the DC takes the source of every authenticated datagram from the node whose
//! sequence number is the highest yet (spec/05 §5.4), and remembers which of its own addresses
//! the datagram arrived on: behind an address-dependent NAT, only that DC address can reach the
//! node through that mapping. The node is behind no NAT in a family when its observed transport
//! address is one of its `local_addrs`; the DC never takes a node's word for that (§5.3).

use core::fmt;
use core::time::Duration;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ntm_wire::error::Replay;
use ntm_wire::message::Error as ErrorMsg;
use ntm_wire::replay::REJECT_AFTER_COUNTER;
use ntm_wire::{
    open_signaling, Ack, AeadKey, Envelope, ErrorCode, Extensions, Fqdn, Header, KeepaliveReply,
    KeyDistribution, KeyRole, Message, MessageType, NatBehaviour, PublicKeyBytes,
    RegistrationRequest, RegistrationResponse, ReplayWindow, Role, SecretKey, SignalingPacket,
    TransportAddr, WireError,
};
use rand_core::{CryptoRng, RngCore};

use crate::signaling::{
    DropCounters, DropReason, RetransmitConfig, SealError, ServerOutput, SignalingKey, Transmit,
};
use crate::time::Time;

mod directions;
mod peers;
pub use directions::{AccessPolicy, PathStatus, RelayLink};
pub use peers::DirectoryEntry;
mod servers;
pub use servers::{ServerLink, FRESH_PATH, NS_REGISTRATION_WAIT};

/// The gaps a session's replay window remembers (see the module documentation).
pub const REPLAY_GAPS: usize = 4;

/// A node's virtual addresses: one IPv4, one IPv6, stable per FQDN.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VirtualAddrs {
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

/// The DC's virtual address pools (spec/01 §1.3): an IPv4 network and an IPv6 /64. The pair
/// number `n` (from 1) is `v4 + n` and `v6 + n`; the IPv4 network and broadcast addresses are
/// never assigned, so the pools hold `2^(32 - v4_prefix_len) - 2` pairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtualPools {
    /// The IPv4 pool's network address, e.g. `100.64.1.0`.
    pub v4: Ipv4Addr,
    /// Its prefix length, 8 to 30.
    pub v4_prefix_len: u8,
    /// The IPv6 pool's /64 prefix (low 64 bits zero), e.g. `fd4e:544d:0:1::`.
    pub v6: Ipv6Addr,
}

impl VirtualPools {
    /// How many pairs the pools hold.
    pub fn capacity(&self) -> u32 {
        let bits = 32u32.saturating_sub(u32::from(self.v4_prefix_len)).min(31);
        (1u32 << bits).saturating_sub(2)
    }

    /// Pair number `n`, if the pools hold it.
    pub fn pair(&self, n: u32) -> Option<VirtualAddrs> {
        if n == 0 || n > self.capacity() {
            return None;
        }
        Some(VirtualAddrs {
            v4: Ipv4Addr::from(u32::from(self.v4).wrapping_add(n)),
            v6: Ipv6Addr::from(u128::from(self.v6) | u128::from(n)),
        })
    }

    /// The pair number of `v`, if `v` is a pair of the pools.
    pub fn number_of(&self, v: VirtualAddrs) -> Option<u32> {
        let n = u32::from(v.v4).wrapping_sub(u32::from(self.v4));
        (self.pair(n) == Some(v)).then_some(n)
    }

    fn valid(&self) -> bool {
        let bits = 32u32.saturating_sub(u32::from(self.v4_prefix_len));
        let mask = u32::MAX.checked_shl(bits).unwrap_or(0);
        (8..=30).contains(&self.v4_prefix_len)
            && u32::from(self.v4) & !mask == 0
            && u128::from(self.v6) as u64 == 0
    }
}

/// Every bound on the DC's memory and work, and its timers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DcLimits {
    /// Nodes (FQDNs with a virtual pair or a key), registered or not. Never forgotten.
    pub max_nodes: usize,
    /// Session keys no registration has used yet (those expired and in grace included). A
    /// KEY_DISTRIBUTION beyond it is refused (Unavailable), and the AS refuses the login.
    pub max_pending_sessions: usize,
    /// How long an expired session key is kept to answer ERROR Expired under it: 10 min.
    pub expired_key_grace: Duration,
    /// Unsealed ERRORs per source prefix (IPv4 /24, IPv6 /64) per second: 10.
    pub unsealed_errors_per_second: u32,
    pub max_tracked_prefixes: usize,
    pub max_queued_transmits: usize,
    pub max_queued_events: usize,
    /// Sequence numbers reserved at a time under the AS↔DC key (spec/04 §4.7).
    pub sequence_block: u64,
    /// Paths recorded at once (each holds its credentials until its lifetime ends).
    pub max_paths: usize,
    /// DC↔DC keys held at once.
    pub max_dc_keys: usize,
    /// DIRECTION_REQUESTs answered or being answered (kept 30 s for retransmissions), and
    /// those waiting for another DC's discovery: at most this many of each.
    pub max_pending_directions: usize,
    /// Requests outstanding to the NS and CS, NOTIFICATIONs to nodes, REGISTRATION_RESPONSEs
    /// held for the NS, and answers kept for the CS: at most this many of each.
    pub max_server_requests: usize,
}

impl Default for DcLimits {
    fn default() -> Self {
        DcLimits {
            max_nodes: 65_536,
            max_pending_sessions: 16_384,
            expired_key_grace: Duration::from_secs(600),
            unsealed_errors_per_second: 10,
            max_tracked_prefixes: 4096,
            max_queued_transmits: 1024,
            max_queued_events: 1024,
            sequence_block: 1 << 16,
            max_paths: 65_536,
            max_dc_keys: 1024,
            max_pending_directions: 65_536,
            max_server_requests: 4096,
        }
    }
}

/// The DC's configuration.
#[derive(Clone, Debug)]
pub struct DcConfig {
    /// The DC's zone; node names are one label below it.
    pub zone: Fqdn,
    /// The DC's signaling addresses (at least one; two of different IP addresses per family
    /// let nodes detect their NAT's mapping behaviour).
    pub addrs: Vec<SocketAddr>,
    /// The key shared with the AS.
    pub as_key: SecretKey,
    /// Its configured key ID: non-zero, top bit clear.
    pub as_key_id: u32,
    /// The persisted high-water mark of the DC's sequence numbers under the AS key (0 when new).
    pub as_high_water_mark: u64,
    pub pools: VirtualPools,
    /// Pairs assigned before a restart, as persisted from [`DcEvent::NodeRegistered`].
    pub assignments: BTreeMap<Fqdn, VirtualAddrs>,
    /// What REGISTRATION_RESPONSE grants: 600 s.
    pub registration_lifetime: Duration,
    /// Keep-alive interval for a node behind a NAT: 25 s.
    pub keepalive_interval: Duration,
    /// The RSs the DC directs relayed paths through, in order of preference on equal load.
    pub relays: Vec<RelayLink>,
    /// Who may reach whom; everyone by default.
    pub access: AccessPolicy,
    /// ROUTE_DIRECTION.lifetime_s and RELAY_REQUEST.lifetime_s: 24 h, cut to the sessions' life.
    pub direction_lifetime: Duration,
    /// RELAY_REQUEST.rate_limit_kbps: 0 leaves it to the RS.
    pub relay_rate_limit_kbps: u32,
    /// The retransmission schedule of the DC's own requests (ROUTE_DIRECTION, RELAY_REQUEST).
    pub retransmit: RetransmitConfig,
    /// This DC's ID in the directory (the key ID of its bootstrap KEY_DISTRIBUTIONs); 0 when it
    /// talks to no other DC.
    pub dc_id: u32,
    /// Its static X25519 secret (DC↔DC key bootstrap); the directory lists the public key.
    pub static_secret: Option<SecretKey>,
    /// The other DCs: who they are and where to find them when DNS fails.
    pub directory: Vec<DirectoryEntry>,
    /// DNS resolvers for finding other DCs (NS lookups); none: the directory only.
    pub resolvers: Vec<SocketAddr>,
    /// DC↔DC key lifetime: 24 h.
    pub dc_key_lifetime: Duration,
    /// The port the DC answers DNS queries for its zone on: 53.
    pub dns_port: u16,
    pub limits: DcLimits,
    /// The cache server: gets KEY_DISTRIBUTION(NodeCs) of each new session (spec/05 §5.2).
    pub cs: Option<ServerLink>,
    /// The notification server: gets NOTIFICATION_REGISTRATION of each new session that wants
    /// push, and carries datagrams to nodes whose UDP path is not fresh (spec/05 §5.4).
    pub ns: Option<ServerLink>,
}

impl DcConfig {
    /// The defaults of spec/07 for everything but the zone, addresses, AS key and pools.
    pub fn new(
        zone: Fqdn,
        addrs: Vec<SocketAddr>,
        as_key: SecretKey,
        as_key_id: u32,
        pools: VirtualPools,
    ) -> Self {
        DcConfig {
            zone,
            addrs,
            as_key,
            as_key_id,
            as_high_water_mark: 0,
            pools,
            assignments: BTreeMap::new(),
            registration_lifetime: Duration::from_secs(600),
            keepalive_interval: Duration::from_secs(25),
            relays: Vec::new(),
            access: AccessPolicy::open(),
            direction_lifetime: Duration::from_secs(24 * 3600),
            relay_rate_limit_kbps: 0,
            retransmit: RetransmitConfig::default(),
            dc_id: 0,
            static_secret: None,
            directory: Vec::new(),
            resolvers: Vec::new(),
            dc_key_lifetime: Duration::from_secs(24 * 3600),
            dns_port: crate::dns::DNS_PORT,
            limits: DcLimits::default(),
            cs: None,
            ns: None,
        }
    }
}

/// A configuration the DC refuses to run with.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DcConfigError {
    /// No signaling address, or more than 255.
    Addresses,
    /// The AS key ID is 0 or has the top bit set.
    InvalidAsKeyId(u32),
    /// The IPv4 prefix is not 8 to 30 bits with host bits zero, or the IPv6 prefix is not a /64.
    InvalidPools,
    /// A restored assignment lies outside the pools, shares an address, or names a node outside
    /// the zone.
    InvalidAssignment(Fqdn),
    /// More restored assignments than `max_nodes`.
    TooManyAssignments,
    /// The lifetime or keep-alive interval does not fit its field.
    InvalidTimer,
    /// An NS or CS key ID is 0, has the top bit set, or is another configured key's.
    InvalidServerKeyId(u32),
}

impl fmt::Display for DcConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DcConfigError::Addresses => f.write_str("the DC needs 1 to 255 signaling addresses"),
            DcConfigError::InvalidAsKeyId(id) => {
                write!(
                    f,
                    "AS key ID {id:#x}: must be non-zero with the top bit clear"
                )
            }
            DcConfigError::InvalidPools => {
                f.write_str("pools must be an IPv4 /8../30 network and an IPv6 /64")
            }
            DcConfigError::InvalidAssignment(n) => write!(f, "the assignment of {n} is invalid"),
            DcConfigError::TooManyAssignments => f.write_str("more assignments than max_nodes"),
            DcConfigError::InvalidTimer => f.write_str("a timer does not fit its field"),
            DcConfigError::InvalidServerKeyId(id) => write!(
                f,
                "server key ID {id:#x}: must be non-zero, top bit clear, and not another key's"
            ),
        }
    }
}

impl std::error::Error for DcConfigError {}

/// What the DC reports to its operator and its runtime.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DcEvent {
    /// A node registered or refreshed its registration. `observed` is the request's source.
    /// The first one of an FQDN carries a new assignment: persist it before sending the
    /// datagrams polled after it.
    NodeRegistered {
        fqdn: Fqdn,
        vip4: Ipv4Addr,
        vip6: Ipv6Addr,
        observed: SocketAddr,
    },
    /// A node deregistered (REGISTRATION_REQUEST with no address).
    NodeDeregistered { fqdn: Fqdn },
    /// A registration lapsed, or the session it was made under expired.
    NodeExpired { fqdn: Fqdn },
    /// Persist `through` as the high-water mark of the DC's sequence numbers under the AS key
    /// (or the NS's or CS's key, by `key_id`) before sending any datagram polled after this
    /// event.
    SequenceReserved { key_id: u32, through: u64 },
    /// The NS or CS at `server` refused a request (`refused`) or never answered it (`None`).
    ServerRequestFailed {
        server: SocketAddr,
        msg_type: MessageType,
        refused: Option<ErrorCode>,
    },
}

/// A registered node as the DC sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisteredNode {
    pub fqdn: Fqdn,
    pub vaddrs: VirtualAddrs,
    pub local_addrs: Vec<SocketAddr>,
    /// Per family (IPv4, IPv6): the node's observed address and the DC address it reached.
    pub observed: [Option<(SocketAddr, SocketAddr)>; 2],
    /// Per family (IPv4, IPv6): NoNat when the observed address is one of `local_addrs`, else
    /// the mapping the node reported (Unknown if it claimed NoNat).
    pub nat: [NatBehaviour; 2],
    pub public_key: PublicKeyBytes,
    pub wants_notification: bool,
    /// The session key ID the registration was made under.
    pub session_key_id: u32,
    pub expires: Time,
    /// When the DC last authenticated a datagram from the node under that session.
    pub last_heard: Time,
}

// ---------------------------------------------------------------------------------------------
// Compact per-session key state.

/// A replay window of spec/04 §4.6 kept as the values not yet seen: up to [`REPLAY_GAPS`]
/// ranges of distances below `next` (distance `d` is value `next - d`, 1 ≤ d ≤ 8192), newest
/// (smallest distances) first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct GapWindow {
    /// One more than the highest accepted value; 0 before any.
    next: u64,
    gaps: [(u16, u16); REPLAY_GAPS],
    len: u8,
}

const WINDOW: u64 = ReplayWindow::SIZE;

impl GapWindow {
    fn gaps(&self) -> &[(u16, u16)] {
        self.gaps.get(..usize::from(self.len)).unwrap_or(&[])
    }

    fn check(&self, v: u64) -> Result<(), Replay> {
        if v >= REJECT_AFTER_COUNTER {
            return Err(Replay::Exhausted);
        }
        if v >= self.next {
            return Ok(());
        }
        let d = self.next - v;
        if d > WINDOW {
            return Err(Replay::TooOld);
        }
        if self
            .gaps()
            .iter()
            .any(|&(lo, hi)| u64::from(lo) <= d && d <= u64::from(hi))
        {
            Ok(())
        } else {
            Err(Replay::Duplicate)
        }
    }

    /// Records `v` (call only after the datagram authenticated); true when `v` is the highest
    /// value accepted so far.
    fn accept(&mut self, v: u64) -> Result<bool, Replay> {
        self.check(v)?;
        let mut out = [(0u16, 0u16); REPLAY_GAPS + 1];
        let mut n = 0usize;
        let mut push = |g: (u16, u16)| {
            if let Some(slot) = out.get_mut(n) {
                *slot = g;
                n += 1;
            }
        };
        let newest = v >= self.next;
        if newest {
            // Everything slides by `shift`; the values skipped become the newest gap.
            let shift = v + 1 - self.next;
            if shift >= 2 {
                push((2, shift.min(WINDOW) as u16));
            }
            for &(lo, hi) in self.gaps() {
                let lo = u64::from(lo) + shift;
                let hi = (u64::from(hi) + shift).min(WINDOW);
                if lo <= hi {
                    push((lo as u16, hi as u16));
                }
            }
            self.next = v + 1;
        } else {
            let d = self.next - v;
            for &(lo, hi) in self.gaps() {
                let (l, h) = (u64::from(lo), u64::from(hi));
                if l <= d && d <= h {
                    if l < d {
                        push((lo, (d - 1) as u16));
                    }
                    if d < h {
                        push(((d + 1) as u16, hi));
                    }
                } else {
                    push((lo, hi));
                }
            }
        }
        // Over capacity: the oldest gap (largest distances, last) is forgotten.
        let kept = n.min(REPLAY_GAPS);
        self.gaps = [(0, 0); REPLAY_GAPS];
        for (slot, g) in self.gaps.iter_mut().zip(out.iter().take(kept)) {
            *slot = *g;
        }
        self.len = kept as u8;
        Ok(newest)
    }
}

/// K_nd as the DC holds it: the raw key (expanded per datagram), the DC's next sequence number
/// (role B), and the window for the node's role A.
struct NodeKey {
    key: SecretKey,
    next_seq: u64,
    window: GapWindow,
}

struct Opened {
    header: Header,
    msg: Message,
    /// The datagram's sequence number is the highest yet under this key.
    newest: bool,
}

impl NodeKey {
    fn new(key: SecretKey) -> Self {
        NodeKey {
            key,
            next_seq: 0,
            window: GapWindow::default(),
        }
    }

    fn seal(&mut self, key_id: u32, msg: &Message, txid: u32) -> Result<Vec<u8>, SealError> {
        let seq = self.next_seq;
        if seq >= REJECT_AFTER_COUNTER {
            return Err(SealError::Exhausted);
        }
        self.next_seq = seq + 1;
        let env = Envelope {
            role: Role::B,
            key_id,
            seq,
            txid,
            ephemeral: None,
        };
        let mut v = vec![0u8; msg.datagram_len(&env, true)];
        let n = msg.seal_into(&env, &AeadKey::new(&self.key), &mut v)?;
        v.truncate(n);
        Ok(v)
    }

    /// The receiver's rules of spec/02 §2.5 for the node's role, as `SignalingKey::open`.
    fn open(&mut self, key_id: u32, buf: &mut [u8]) -> Result<Opened, DropReason> {
        let header = {
            let packet = SignalingPacket::parse(buf).map_err(DropReason::Header)?;
            let header = *packet.header();
            if header.envelope.key_id != key_id {
                return Err(DropReason::UnknownKey);
            }
            if !header.sealed {
                let msg = packet.decode_plain().map_err(DropReason::Header)?;
                return Ok(Opened {
                    header,
                    msg,
                    newest: false,
                });
            }
            header
        };
        match header.envelope.role {
            Role::A => {}
            Role::B => return Err(DropReason::Reflected),
            Role::Relay => return Err(DropReason::Unexpected),
        }
        let seq = header.envelope.seq;
        self.window.check(seq).map_err(DropReason::Replayed)?;
        let result = open_signaling(buf, &AeadKey::new(&self.key));
        if matches!(result, Err(WireError::AuthenticationFailed)) {
            return Err(DropReason::AuthenticationFailed);
        }
        let newest = self.window.accept(seq).map_err(DropReason::Replayed)?;
        let (header, msg) = result.map_err(DropReason::UndecodableBody)?;
        Ok(Opened {
            header,
            msg,
            newest,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The registry.

/// Nodes are kept in chunks of this many, so that the table never holds more than one chunk of
/// unused room (a doubling vector would hold up to as many empty slots as nodes).
const NODE_CHUNK: usize = 256;

/// A transport address without IPv6 flow label and scope (20 bytes instead of 32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Endpoint {
    ip: IpAddr,
    port: u16,
}

impl Endpoint {
    fn of(a: SocketAddr) -> Self {
        Endpoint {
            ip: a.ip(),
            port: a.port(),
        }
    }

    fn socket_addr(self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }
}

/// An observed address and the index in [`DcConfig::addrs`] of the DC address it reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seen {
    at: Endpoint,
    via: u8,
}

fn family(ip: IpAddr) -> usize {
    usize::from(ip.is_ipv6())
}

struct Registration {
    /// The transaction ID of the REGISTRATION_REQUEST last acted on (a retransmission of it is
    /// answered again, not acted on again).
    last_txid: u32,
    expires: Time,
    last_heard: Time,
    local_addrs: Box<[Endpoint]>,
    /// Per family, IPv4 first.
    observed: [Option<Seen>; 2],
    nat: NatBehaviour,
    wants_notification: bool,
}

impl Registration {
    fn nat(&self, fam: usize) -> NatBehaviour {
        match self.observed.get(fam).copied().flatten() {
            Some(seen) if self.local_addrs.contains(&seen.at) => NatBehaviour::NoNat,
            Some(_) if self.nat == NatBehaviour::NoNat => NatBehaviour::Unknown,
            _ => self.nat,
        }
    }
}

/// A node↔DC key and what the DC keeps with it.
struct Session {
    /// The KEY_DISTRIBUTION that installed it (a retransmission is ACKed again).
    distribution_txid: u32,
    /// When the key expires, or, once `expired`, when it is forgotten.
    deadline: Time,
    expired: bool,
    key: NodeKey,
}

/// A session no registration has used yet.
struct PendingSession {
    /// Index of the subject's node.
    node: u32,
    session: Session,
}

struct Node {
    fqdn: Fqdn,
    /// The pair number of its virtual addresses; 0 before the first registration.
    pair: u32,
    /// The static public key of its latest registration (kept after it ends: an offline node's
    /// callers seal cache blobs to it); all zero before the first registration.
    public_key: PublicKeyBytes,
    /// The session of its latest registration, kept (after the registration ends too) until it
    /// expires or a registration under a newer one replaces it.
    session: Option<(u32, Session)>,
    reg: Option<Registration>,
}

impl Node {
    /// The node's one deadline: its registration's expiry or its session's, whichever is first.
    fn deadline(&self) -> Option<Time> {
        let s = self.session.as_ref().map(|(_, s)| s.deadline);
        let r = self.reg.as_ref().map(|r| r.expires);
        match (s, r) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// What a deadline in the index belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Due {
    /// A pending session (by key ID): its expiry, or the end of its grace.
    Pending(u32),
    /// A node (by index): its registration's or its session's deadline.
    Node(u32),
}

/// Where a session lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Holder {
    Pending,
    Node(u32),
}

/// The direction coordinator. See the [module documentation](self).
pub struct DirectionCoordinator {
    config: DcConfig,
    as_key: SignalingKey,
    /// Every node, by index, in chunks of [`NODE_CHUNK`]; never removed (their pairs are
    /// permanent).
    nodes: Vec<Vec<Node>>,
    node_count: usize,
    by_fqdn: BTreeMap<Fqdn, u32>,
    /// Sessions no registration has used, by key ID.
    pending: BTreeMap<u32, PendingSession>,
    /// Sessions held in a node's slot: key ID → node index.
    by_key: BTreeMap<u32, u32>,
    registered: usize,
    /// One bit per pair number (bit n of word n / 64), set when assigned.
    used_pairs: Vec<u64>,
    /// The lowest pair number that may be free.
    next_pair: u32,
    deadlines: BTreeSet<(Time, Due)>,
    directions: directions::Directions,
    peers: peers::Peers,
    /// The authoritative DNS service of the zone.
    dns: Option<crate::dns::ZoneAuthority>,
    servers: servers::Servers,
    output: ServerOutput<DcEvent>,
    drops: DropCounters,
}

impl fmt::Debug for DirectionCoordinator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectionCoordinator")
            .field("zone", &self.config.zone)
            .field("nodes", &self.node_count)
            .field("registered", &self.registered)
            .field("sessions", &self.sessions_held())
            .field("drops", &self.drops)
            .finish_non_exhaustive()
    }
}

/// Whether `name` is exactly one label below `zone`.
fn is_node_of(name: &Fqdn, zone: &Fqdn) -> bool {
    name.is_within(zone)
        && name.as_str().len() > zone.as_str().len()
        && name
            .as_str()
            .get(..name.as_str().len() - zone.as_str().len() - 1)
            .is_some_and(|label| !label.contains('.'))
}

fn secs_u32(d: Duration) -> Option<u32> {
    u32::try_from(d.as_secs()).ok()
}

impl DirectionCoordinator {
    /// Checks the configuration and starts with the restored assignments and no session.
    pub fn new(config: DcConfig) -> Result<Self, DcConfigError> {
        if config.addrs.is_empty() || config.addrs.len() > usize::from(u8::MAX) {
            return Err(DcConfigError::Addresses);
        }
        if config.as_key_id == 0 || config.as_key_id & 0x8000_0000 != 0 {
            return Err(DcConfigError::InvalidAsKeyId(config.as_key_id));
        }
        if !config.pools.valid() {
            return Err(DcConfigError::InvalidPools);
        }
        if secs_u32(config.registration_lifetime).is_none()
            || u16::try_from(config.keepalive_interval.as_secs()).is_err()
        {
            return Err(DcConfigError::InvalidTimer);
        }
        if config.assignments.len() > config.limits.max_nodes {
            return Err(DcConfigError::TooManyAssignments);
        }
        let l = config.limits;
        let servers = servers::Servers::new(&config)?;
        let mut dc = DirectionCoordinator {
            as_key: SignalingKey::resume(
                &config.as_key,
                config.as_key_id,
                Role::B,
                config.as_high_water_mark,
                l.sequence_block,
            ),
            nodes: Vec::new(),
            node_count: 0,
            by_fqdn: BTreeMap::new(),
            pending: BTreeMap::new(),
            by_key: BTreeMap::new(),
            registered: 0,
            used_pairs: Vec::new(),
            next_pair: 1,
            deadlines: BTreeSet::new(),
            directions: directions::Directions::new(&config.relays),
            peers: peers::Peers::new(&config.directory, &config.resolvers),
            dns: zone_authority(&config),
            servers,
            output: ServerOutput::new(
                l.max_queued_transmits,
                l.max_queued_events,
                l.unsealed_errors_per_second,
                l.max_tracked_prefixes,
            ),
            drops: DropCounters::default(),
            config,
        };
        let restored: Vec<(Fqdn, VirtualAddrs)> = dc
            .config
            .assignments
            .iter()
            .map(|(n, v)| (n.clone(), *v))
            .collect();
        for (name, v) in restored {
            let pair = dc.config.pools.number_of(v);
            let fresh = pair.filter(|n| !dc.pair_used(*n));
            let (Some(pair), true) = (fresh, is_node_of(&name, &dc.config.zone)) else {
                return Err(DcConfigError::InvalidAssignment(name));
            };
            let Some(idx) = dc.node_for(&name) else {
                return Err(DcConfigError::TooManyAssignments);
            };
            dc.mark_pair(pair);
            if let Some(node) = dc.node_mut(idx) {
                node.pair = pair;
            }
        }
        Ok(dc)
    }

    pub fn config(&self) -> &DcConfig {
        &self.config
    }

    /// Datagrams dropped, by reason.
    pub fn drops(&self) -> &DropCounters {
        &self.drops
    }

    /// Events lost because the queue was full.
    pub fn events_lost(&self) -> u64 {
        self.output.events_lost()
    }

    /// Nodes known (with a key or a virtual pair), registered or not.
    pub fn nodes_known(&self) -> usize {
        self.node_count
    }

    /// Nodes registered now.
    pub fn nodes_registered(&self) -> usize {
        self.registered
    }

    /// Session keys held, those in grace included.
    pub fn sessions_held(&self) -> usize {
        self.pending.len() + self.by_key.len()
    }

    /// The pair assigned to `fqdn`, registered or not.
    pub fn virtual_addrs(&self, fqdn: &Fqdn) -> Option<VirtualAddrs> {
        let node = self.node_named(fqdn)?;
        self.config.pools.pair(node.pair)
    }

    /// `fqdn`'s registration, if it is registered.
    pub fn registration(&self, fqdn: &Fqdn) -> Option<RegisteredNode> {
        let node = self.node_named(fqdn)?;
        let reg = node.reg.as_ref()?;
        let vaddrs = self.config.pools.pair(node.pair)?;
        let (session_key_id, _) = node.session.as_ref()?;
        let addrs = &self.config.addrs;
        let observed = reg.observed.map(|o| {
            o.and_then(|s| {
                let via = addrs.get(usize::from(s.via))?;
                Some((s.at.socket_addr(), *via))
            })
        });
        Some(RegisteredNode {
            fqdn: node.fqdn.clone(),
            vaddrs,
            local_addrs: reg.local_addrs.iter().map(|e| e.socket_addr()).collect(),
            observed,
            nat: [reg.nat(0), reg.nat(1)],
            public_key: node.public_key,
            wants_notification: reg.wants_notification,
            session_key_id: *session_key_id,
            expires: reg.expires,
            last_heard: reg.last_heard,
        })
    }

    fn node(&self, idx: u32) -> Option<&Node> {
        let i = idx as usize;
        self.nodes.get(i / NODE_CHUNK)?.get(i % NODE_CHUNK)
    }

    fn node_mut(&mut self, idx: u32) -> Option<&mut Node> {
        let i = idx as usize;
        self.nodes.get_mut(i / NODE_CHUNK)?.get_mut(i % NODE_CHUNK)
    }

    fn node_named(&self, fqdn: &Fqdn) -> Option<&Node> {
        self.node(*self.by_fqdn.get(fqdn)?)
    }

    /// The index of `fqdn`'s node, made if new and there is room.
    fn node_for(&mut self, fqdn: &Fqdn) -> Option<u32> {
        if let Some(&idx) = self.by_fqdn.get(fqdn) {
            return Some(idx);
        }
        if self.node_count >= self.config.limits.max_nodes {
            return None;
        }
        let idx = u32::try_from(self.node_count).ok()?;
        let node = Node {
            fqdn: fqdn.clone(),
            pair: 0,
            public_key: [0; 32],
            session: None,
            reg: None,
        };
        match self.nodes.last_mut() {
            Some(chunk) if chunk.len() < NODE_CHUNK => chunk.push(node),
            _ => {
                let mut chunk = Vec::with_capacity(NODE_CHUNK);
                chunk.push(node);
                self.nodes.push(chunk);
            }
        }
        self.node_count += 1;
        self.by_fqdn.insert(fqdn.clone(), idx);
        Some(idx)
    }

    fn pair_used(&self, n: u32) -> bool {
        let (word, bit) = ((n / 64) as usize, n % 64);
        self.used_pairs
            .get(word)
            .is_some_and(|w| w & (1u64 << bit) != 0)
    }

    fn mark_pair(&mut self, n: u32) {
        let (word, bit) = ((n / 64) as usize, n % 64);
        if self.used_pairs.len() <= word {
            self.used_pairs.resize(word + 1, 0);
        }
        if let Some(w) = self.used_pairs.get_mut(word) {
            *w |= 1u64 << bit;
        }
    }

    /// Which holder has the session `key_id`, if any.
    fn holder(&self, key_id: u32) -> Option<Holder> {
        if self.pending.contains_key(&key_id) {
            return Some(Holder::Pending);
        }
        self.by_key.get(&key_id).map(|idx| Holder::Node(*idx))
    }

    fn session_mut(&mut self, key_id: u32) -> Option<(u32, &mut Session)> {
        match self.holder(key_id)? {
            Holder::Pending => self
                .pending
                .get_mut(&key_id)
                .map(|p| (p.node, &mut p.session)),
            Holder::Node(idx) => match self.node_mut(idx)?.session.as_mut() {
                Some((id, s)) if *id == key_id => Some((idx, s)),
                _ => None,
            },
        }
    }

    /// Runs `f` on node `idx` and moves its entry in the deadline index if its deadline moved.
    fn with_node<T>(&mut self, idx: u32, f: impl FnOnce(&mut Node) -> T) -> Option<T> {
        let node = self.node_mut(idx)?;
        let old = node.deadline();
        let out = f(node);
        let new = node.deadline();
        if old != new {
            if let Some(t) = old {
                self.deadlines.remove(&(t, Due::Node(idx)));
            }
            if let Some(t) = new {
                self.deadlines.insert((t, Due::Node(idx)));
            }
        }
        Some(out)
    }

    /// A datagram arrived at `local` from `remote`. `buf` is opened in place.
    pub fn handle_datagram<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        buf: &mut [u8],
        rng: &mut R,
    ) {
        if let Err(reason) = self.dispatch(now, local, remote, buf, rng) {
            self.drops.record(&reason);
        }
    }

    fn dispatch<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        buf: &mut [u8],
        rng: &mut R,
    ) -> Result<(), DropReason> {
        if self.peers.is_resolver(remote) {
            self.on_resolver_datagram(now, local, remote, buf, rng);
            return Ok(());
        }
        if local.port() == self.config.dns_port {
            return self.on_dns_query(now, local, remote, buf);
        }
        let header = self.output.intake(now, local, remote, buf, Role::B)?;
        let key_id = header.envelope.key_id;
        match header.msg_type {
            MessageType::KeyDistribution if header.envelope.ephemeral.is_some() => {
                self.on_bootstrap(now, local, remote, buf, &header)
            }
            MessageType::KeyDistribution => {
                self.on_key_distribution(now, local, remote, buf, &header)
            }
            MessageType::NtmInfoRequest
            | MessageType::RouteDirection
            | MessageType::Ack
            | MessageType::Error
                if self.peers.holds_key(key_id) =>
            {
                self.on_peer_datagram(now, local, remote, buf, key_id, rng)
            }
            MessageType::RelayResponse | MessageType::Ack | MessageType::Error
                if self.directions.is_relay_key(key_id) =>
            {
                self.on_relay_datagram(now, buf, key_id, rng)
            }
            MessageType::Notification | MessageType::Ack | MessageType::Error
                if self.servers.is_server_key(key_id) =>
            {
                self.on_server_datagram(now, local, remote, buf, &header, rng)
            }
            MessageType::RegistrationRequest
            | MessageType::Keepalive
            | MessageType::DirectionRequest
            | MessageType::Ack
            | MessageType::Error => self.on_node_request(now, local, remote, buf, &header, rng),
            _ => Err(DropReason::Unexpected),
        }
    }

    // -- From the AS ---------------------------------------------------------------------------

    fn on_key_distribution(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        buf: &mut [u8],
        header: &Header,
    ) -> Result<(), DropReason> {
        if header.envelope.key_id != self.config.as_key_id {
            if header.sealed {
                self.output.unknown_key(now, local, remote, header, Role::B);
            }
            return Err(DropReason::UnknownKey);
        }
        let (h, msg) = self.as_key.open(buf)?;
        if !h.sealed {
            return Err(DropReason::UnsealedHint);
        }
        let Message::KeyDistribution(kd) = msg else {
            return Err(DropReason::Unexpected);
        };
        let txid = h.envelope.txid;
        match self.install(now, kd, txid) {
            Ok(()) => {
                let ack: Message = Ack {
                    acked_type: MessageType::KeyDistribution.to_u8(),
                    extensions: Extensions::none(),
                }
                .into();
                self.send_to_as(local, remote, &ack, txid);
            }
            Err(code) => {
                let error = error_msg(code, MessageType::KeyDistribution);
                self.send_to_as(local, remote, &error, txid);
            }
        }
        Ok(())
    }

    /// Installs a node↔DC key, or says why not. A retransmitted distribution is taken again.
    fn install(&mut self, now: Time, kd: KeyDistribution, txid: u32) -> Result<(), ErrorCode> {
        if kd.key_role != KeyRole::NodeDc
            || !is_node_of(&kd.subject, &self.config.zone)
            || kd.new_key_id == 0
        {
            return Err(ErrorCode::WrongState);
        }
        let subject = self.by_fqdn.get(&kd.subject).copied();
        if let Some((node, s)) = self.session_mut(kd.new_key_id) {
            return if s.distribution_txid == txid && subject == Some(node) {
                Ok(())
            } else {
                Err(ErrorCode::WrongState)
            };
        }
        if self.pending.len() >= self.config.limits.max_pending_sessions {
            return Err(ErrorCode::Unavailable);
        }
        let node = self.node_for(&kd.subject).ok_or(ErrorCode::Unavailable)?;
        let deadline = now + Duration::from_secs(u64::from(kd.lifetime_s));
        self.pending.insert(
            kd.new_key_id,
            PendingSession {
                node,
                session: Session {
                    distribution_txid: txid,
                    deadline,
                    expired: false,
                    key: NodeKey::new(kd.key.clone()),
                },
            },
        );
        self.deadlines
            .insert((deadline, Due::Pending(kd.new_key_id)));
        Ok(())
    }

    fn send_to_as(&mut self, local: SocketAddr, remote: SocketAddr, msg: &Message, txid: u32) {
        let datagram = self.as_key.seal_to_vec(msg, txid, None);
        if let Some(through) = self.as_key.take_reserved_through() {
            let key_id = self.as_key.key_id();
            self.output
                .event(DcEvent::SequenceReserved { key_id, through });
        }
        self.output.queue(Some(local), remote, datagram);
    }

    // -- From nodes ----------------------------------------------------------------------------

    fn on_node_request<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        buf: &mut [u8],
        header: &Header,
        rng: &mut R,
    ) -> Result<(), DropReason> {
        let key_id = header.envelope.key_id;
        let Some((node_idx, session)) = self.session_mut(key_id) else {
            // A KEEPALIVE may not ask for an answer, and without the key nobody can tell: only
            // REGISTRATION_REQUEST gets the hint.
            if header.sealed && header.msg_type == MessageType::RegistrationRequest {
                self.output.unknown_key(now, local, remote, header, Role::B);
            }
            return Err(DropReason::UnknownKey);
        };
        let opened = match session.key.open(key_id, buf) {
            Ok(o) => o,
            Err(DropReason::UndecodableBody(e))
                if matches!(
                    header.msg_type,
                    MessageType::RegistrationRequest | MessageType::DirectionRequest
                ) =>
            {
                let code = match e {
                    WireError::UnknownCriticalExtension(_) => ErrorCode::UnknownCriticalExtension,
                    _ => ErrorCode::Malformed,
                };
                let error = error_msg(code, header.msg_type);
                self.send_to_node(local, remote, key_id, &error, header.envelope.txid);
                return Err(DropReason::UndecodableBody(e));
            }
            Err(e) => return Err(e),
        };
        if !opened.header.sealed {
            return Err(DropReason::UnsealedHint);
        }
        let txid = opened.header.envelope.txid;
        if session.expired {
            let answer = match &opened.msg {
                Message::RegistrationRequest(_) | Message::DirectionRequest(_) => true,
                Message::Keepalive(k) => k.reply_requested,
                _ => false,
            };
            if answer {
                let error = error_msg(ErrorCode::Expired, opened.header.msg_type);
                self.send_to_node(local, remote, key_id, &error, txid);
            }
            return Ok(());
        }
        let via = self
            .config
            .addrs
            .iter()
            .position(|a| *a == local)
            .and_then(|i| u8::try_from(i).ok())
            .unwrap_or(0);
        let registered_under_it = self.by_key.contains_key(&key_id);
        if let Some(reg) = self
            .node_mut(node_idx)
            .filter(|_| registered_under_it)
            .and_then(|n| n.reg.as_mut())
        {
            reg.last_heard = now;
            if opened.newest {
                if let Some(slot) = reg.observed.get_mut(family(remote.ip())) {
                    *slot = Some(Seen {
                        at: Endpoint::of(remote),
                        via,
                    });
                }
            }
        }
        match opened.msg {
            Message::RegistrationRequest(r) => {
                let from = Sender {
                    local,
                    remote,
                    via,
                    key_id,
                    txid,
                    peer: None,
                };
                self.on_registration(now, from, node_idx, r, rng);
                Ok(())
            }
            Message::DirectionRequest(d) => {
                let from = Sender {
                    local,
                    remote,
                    via,
                    key_id,
                    txid,
                    peer: None,
                };
                self.on_direction_request(now, from, node_idx, d, rng);
                Ok(())
            }
            msg @ (Message::Ack(_) | Message::Error(_)) => {
                if self.servers.answers_notice(key_id, txid) {
                    self.on_notice_answer(key_id, txid, &msg);
                    return Ok(());
                }
                self.on_direction_answer(now, key_id, txid, msg, rng)
            }
            Message::Keepalive(k) => {
                if k.reply_requested {
                    let reply: Message = KeepaliveReply {
                        observed_addr: TransportAddr::new(remote),
                        extensions: Extensions::none(),
                    }
                    .into();
                    self.send_to_node(local, remote, key_id, &reply, txid);
                }
                Ok(())
            }
            _ => Err(DropReason::Unexpected),
        }
    }

    fn on_registration<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        from: Sender,
        node_idx: u32,
        r: RegistrationRequest,
        rng: &mut R,
    ) {
        let Sender {
            local,
            remote,
            via,
            key_id,
            txid,
            ..
        } = from;
        if self.by_fqdn.get(&r.node_fqdn) != Some(&node_idx) {
            let error = error_msg(ErrorCode::WrongState, MessageType::RegistrationRequest);
            self.send_to_node(local, remote, key_id, &error, txid);
            return;
        }
        let current = self.by_key.get(&key_id) == Some(&node_idx);
        let retransmission = current
            && self
                .node(node_idx)
                .and_then(|n| n.reg.as_ref())
                .is_some_and(|reg| reg.last_txid == txid);
        let Some(vaddrs) = self.assign(node_idx) else {
            let error = error_msg(ErrorCode::Unavailable, MessageType::RegistrationRequest);
            self.send_to_node(local, remote, key_id, &error, txid);
            return;
        };
        let lifetime = self.config.registration_lifetime;
        let keepalive = u16::try_from(self.config.keepalive_interval.as_secs()).unwrap_or(0);
        let lifetime_s = secs_u32(lifetime).unwrap_or(u32::MAX);
        let mut kind = servers::RegistrationKind::Other;
        let (lifetime_s, keepalive_interval_s) = if retransmission {
            let behind_nat = self
                .node(node_idx)
                .and_then(|n| n.reg.as_ref())
                .is_some_and(|reg| !reg.local_addrs.contains(&Endpoint::of(remote)));
            (lifetime_s, if behind_nat { keepalive } else { 0 })
        } else if r.local_addrs.is_empty() {
            self.adopt_session(node_idx, key_id);
            self.end_registration(node_idx, DcEvent::NodeDeregistered { fqdn: r.node_fqdn });
            (0, 0)
        } else {
            let local_addrs: Box<[Endpoint]> = r
                .local_addrs
                .as_slice()
                .iter()
                .map(|a| Endpoint::of(a.socket_addr()))
                .collect();
            let behind_nat = !local_addrs.contains(&Endpoint::of(remote));
            let mut observed = [None, None];
            if let Some(old) = self.node(node_idx).and_then(|n| n.reg.as_ref()) {
                // The other family's observed address stays while the node still has an
                // address of that family.
                for (fam, slot) in observed.iter_mut().enumerate() {
                    if local_addrs.iter().any(|e| family(e.ip) == fam) {
                        *slot = old.observed.get(fam).copied().flatten();
                    }
                }
            }
            if let Some(slot) = observed.get_mut(family(remote.ip())) {
                *slot = Some(Seen {
                    at: Endpoint::of(remote),
                    via,
                });
            }
            let reg = Registration {
                last_txid: txid,
                expires: now + lifetime,
                last_heard: now,
                local_addrs,
                observed,
                nat: r.nat_mapping,
                wants_notification: r.wants_notification,
            };
            self.adopt_session(node_idx, key_id);
            let newly = self
                .with_node(node_idx, |n| {
                    n.public_key = r.node_public_key;
                    n.reg.replace(reg).is_none()
                })
                .unwrap_or(false);
            if newly {
                self.registered += 1;
            }
            kind = servers::RegistrationKind::New {
                first_of_session: !current,
            };
            self.output.event(DcEvent::NodeRegistered {
                fqdn: r.node_fqdn,
                vip4: vaddrs.v4,
                vip6: vaddrs.v6,
                observed: remote,
            });
            (lifetime_s, if behind_nat { keepalive } else { 0 })
        };
        let response: Message = RegistrationResponse {
            virtual_v4: vaddrs.v4,
            virtual_v6: vaddrs.v6,
            observed_addr: TransportAddr::new(remote),
            lifetime_s,
            keepalive_interval_s,
            extensions: Extensions::none(),
        }
        .into();
        self.answer_registration(now, from, node_idx, kind, response, rng);
    }

    /// Makes `key_id` the node's session: a pending session moves into the node's slot, and the
    /// session it replaces is forgotten.
    fn adopt_session(&mut self, node_idx: u32, key_id: u32) {
        if self.by_key.get(&key_id) == Some(&node_idx) {
            return;
        }
        let Some(p) = self.pending.remove(&key_id) else {
            return;
        };
        self.deadlines
            .remove(&(p.session.deadline, Due::Pending(key_id)));
        let old = self.with_node(node_idx, |n| n.session.replace((key_id, p.session)));
        if let Some(Some((old_id, _))) = old {
            self.by_key.remove(&old_id);
        }
        self.by_key.insert(key_id, node_idx);
    }

    /// The node's pair, assigned now if it has none. None when the pools are used up.
    fn assign(&mut self, node_idx: u32) -> Option<VirtualAddrs> {
        let pools = self.config.pools;
        let pair = self.node(node_idx)?.pair;
        if pair != 0 {
            return pools.pair(pair);
        }
        // Restored assignments may sit anywhere; new ones take the lowest free pair number at or
        // above the cursor, which only moves forward.
        let capacity = pools.capacity();
        while self.next_pair <= capacity {
            let n = self.next_pair;
            self.next_pair += 1;
            if self.pair_used(n) {
                continue;
            }
            let v = pools.pair(n)?;
            self.mark_pair(n);
            if let Some(node) = self.node_mut(node_idx) {
                node.pair = n;
            }
            return Some(v);
        }
        None
    }

    /// Ends the node's registration, if any, with `event`.
    fn end_registration(&mut self, node_idx: u32, event: DcEvent) {
        let ended = self
            .with_node(node_idx, |n| n.reg.take().is_some())
            .unwrap_or(false);
        if ended {
            self.registered = self.registered.saturating_sub(1);
            self.output.event(event);
        }
    }

    fn send_to_node(
        &mut self,
        local: SocketAddr,
        remote: SocketAddr,
        key_id: u32,
        msg: &Message,
        txid: u32,
    ) {
        let datagram = match self.session_mut(key_id) {
            Some((_, s)) => s.key.seal(key_id, msg, txid),
            None => Err(SealError::NoKey),
        };
        self.output.queue(Some(local), remote, datagram);
    }

    // -- Time and output -----------------------------------------------------------------------

    /// Timers due at `now` fire: registrations lapse, session keys expire and are forgotten.
    pub fn handle_timeout<R: RngCore + CryptoRng>(&mut self, now: Time, rng: &mut R) {
        self.directions_timeout(now, rng);
        self.peers_timeout(now, rng);
        self.servers_timeout(now, rng);
        while let Some(&(at, due)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.deadlines.remove(&(at, due));
            match due {
                Due::Pending(key_id) => self.pending_due(at, key_id),
                Due::Node(idx) => self.node_due(at, idx),
            }
        }
    }

    fn pending_due(&mut self, at: Time, key_id: u32) {
        let grace = self.config.limits.expired_key_grace;
        let Some(p) = self.pending.get_mut(&key_id) else {
            return;
        };
        if p.session.expired {
            self.pending.remove(&key_id);
        } else {
            p.session.expired = true;
            p.session.deadline = at + grace;
            self.deadlines.insert((at + grace, Due::Pending(key_id)));
        }
    }

    fn node_due(&mut self, at: Time, idx: u32) {
        let grace = self.config.limits.expired_key_grace;
        let Some(node) = self.node(idx) else {
            return;
        };
        let fqdn = node.fqdn.clone();
        let lapsed = node.reg.as_ref().is_some_and(|r| r.expires <= at);
        let session = node
            .session
            .as_ref()
            .filter(|(_, s)| s.deadline <= at)
            .map(|(id, s)| (*id, s.expired));
        // The entry just taken from the index was the node's deadline: put the one it has after
        // this back (with_node compares against the deadline before the change).
        let forgotten = self.with_node(idx, |n| {
            let mut forgotten = None;
            match session {
                Some((id, true)) => {
                    n.session = None;
                    forgotten = Some(id);
                }
                Some((_, false)) => {
                    if let Some((_, s)) = n.session.as_mut() {
                        s.expired = true;
                        s.deadline = at + grace;
                    }
                }
                None => {}
            }
            forgotten
        });
        if let Some(Some(id)) = forgotten {
            self.by_key.remove(&id);
        }
        let session_expired = matches!(session, Some((_, false)));
        if lapsed || session_expired {
            self.end_registration(idx, DcEvent::NodeExpired { fqdn });
        }
        // with_node moved the index only if the deadline changed from `at`; the entry for `at`
        // is already gone, so make sure the node's current deadline is indexed.
        if let Some(t) = self.node(idx).and_then(Node::deadline) {
            self.deadlines.insert((t, Due::Node(idx)));
        }
    }

    /// The next datagram to send, written into `buf` (give it at least
    /// [`ntm_wire::MAX_SIGNALING_LEN`] bytes).
    pub fn poll_transmit(&mut self, _now: Time, buf: &mut [u8]) -> Option<Transmit> {
        self.output.poll_transmit(buf)
    }

    pub fn poll_event(&mut self) -> Option<DcEvent> {
        self.output.poll_event()
    }

    /// The earliest deadline and what it is for.
    pub fn poll_timeout(&self) -> Option<(Time, &'static str)> {
        [
            self.registry_deadline(),
            self.directions.next_deadline(),
            self.peers.next_deadline(),
            self.servers.next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min_by_key(|(t, _)| *t)
    }

    fn registry_deadline(&self) -> Option<(Time, &'static str)> {
        let &(at, due) = self.deadlines.first()?;
        let label = match due {
            Due::Pending(id) => match self.pending.get(&id) {
                Some(p) if p.session.expired => "expired session key removal",
                _ => "session key expiry",
            },
            Due::Node(idx) => {
                let node = self.node(idx);
                let reg = node.and_then(|n| n.reg.as_ref()).map(|r| r.expires);
                let session = node.and_then(|n| n.session.as_ref()).map(|(_, s)| s);
                match (reg, session) {
                    (Some(r), _) if r == at => "registration expiry",
                    (_, Some(s)) if s.expired => "expired session key removal",
                    _ => "session key expiry",
                }
            }
        };
        Some((at, label))
    }
}

/// The zone's DNS service: the apex answers with the DC's own addresses.
fn zone_authority(config: &DcConfig) -> Option<crate::dns::ZoneAuthority> {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for a in &config.addrs {
        match a.ip() {
            IpAddr::V4(x) if !v4.contains(&x) => v4.push(x),
            IpAddr::V6(x) if !v6.contains(&x) => v6.push(x),
            _ => {}
        }
    }
    v4.truncate(8);
    v6.truncate(8);
    crate::dns::ZoneAuthority::new(crate::dns::ZoneConfig::new(config.zone.clone(), v4, v6)).ok()
}

impl DirectionCoordinator {
    /// A DNS query on the DNS port: answered for the zone (spec/05 §5.12). A node's addresses
    /// are its virtual pair, and only when every caller may reach it (concealment).
    fn on_dns_query(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        buf: &[u8],
    ) -> Result<(), DropReason> {
        let Some(mut dns) = self.dns.take() else {
            return Err(DropReason::Unexpected);
        };
        let mut out = [0u8; crate::dns::DEFAULT_UDP_PAYLOAD as usize];
        let answer = dns.answer_from(
            now,
            remote.ip(),
            buf,
            |name| {
                let node = self.node_named(name)?;
                if !self.config.access.is_public(name) {
                    return None;
                }
                let v = self.config.pools.pair(node.pair)?;
                Some((v.v4, v.v6))
            },
            &mut out,
        );
        self.dns = Some(dns);
        match answer {
            Ok(n) => {
                let d = out.get(..n).map(<[u8]>::to_vec).unwrap_or_default();
                self.output.queue(Some(local), remote, Ok(d));
                Ok(())
            }
            Err(_) => Err(DropReason::Unexpected),
        }
    }
}

/// Who sent a request, and where it arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sender {
    local: SocketAddr,
    remote: SocketAddr,
    /// Index of `local` in the DC's addresses.
    via: u8,
    key_id: u32,
    txid: u32,
    /// For a request from another DC: its index in the directory.
    peer: Option<usize>,
}

fn error_msg(code: ErrorCode, failed: MessageType) -> Message {
    ErrorMsg {
        code,
        failed_type: failed.to_u8(),
        retry_after_ms: 0,
        extensions: Extensions::none(),
    }
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ntm_wire::{AddrList, Keepalive, MAX_SIGNALING_LEN};
    use rand_chacha::ChaCha8Rng;
    use rand_core::SeedableRng;

    const AS_KEY_ID: u32 = 17;

    fn fqdn(s: &str) -> Fqdn {
        Fqdn::new(s).unwrap()
    }

    fn dc_addr(n: u8) -> SocketAddr {
        SocketAddr::from(([203, 0, 113, 10 + n], 4281))
    }

    fn as_addr() -> SocketAddr {
        SocketAddr::from(([203, 0, 113, 2], 4280))
    }

    fn node_addr(n: u8) -> SocketAddr {
        SocketAddr::from(([198, 51, 100, n], 5000))
    }

    fn pools(prefix_len: u8) -> VirtualPools {
        VirtualPools {
            v4: Ipv4Addr::new(100, 64, 1, 0),
            v4_prefix_len: prefix_len,
            v6: "fd4e:544d:0:1::".parse().unwrap(),
        }
    }

    fn config() -> DcConfig {
        DcConfig::new(
            fqdn("dc1.example"),
            vec![dc_addr(0), dc_addr(1)],
            SecretKey::from_bytes([4; 32]),
            AS_KEY_ID,
            pools(24),
        )
    }

    /// A DC with the AS's and the nodes' ends of the keys, driven by hand.
    struct Bench {
        dc: DirectionCoordinator,
        rng: ChaCha8Rng,
        as_key: SignalingKey,
        now: Time,
    }

    /// One node's end of its session.
    struct NodeEnd {
        key: SignalingKey,
        fqdn: Fqdn,
    }

    impl Bench {
        fn new(config: DcConfig) -> Self {
            Bench {
                dc: DirectionCoordinator::new(config).unwrap(),
                rng: ChaCha8Rng::seed_from_u64(1),
                as_key: SignalingKey::new(&SecretKey::from_bytes([4; 32]), AS_KEY_ID, Role::A),
                now: Time::ZERO,
            }
        }

        fn deliver(
            &mut self,
            local: SocketAddr,
            remote: SocketAddr,
            mut d: Vec<u8>,
        ) -> Vec<(SocketAddr, SocketAddr, Vec<u8>)> {
            self.dc
                .handle_datagram(self.now, local, remote, &mut d, &mut self.rng);
            let mut buf = [0u8; MAX_SIGNALING_LEN];
            std::iter::from_fn(|| {
                self.dc
                    .poll_transmit(self.now, &mut buf)
                    .map(|t| (t.src.unwrap(), t.dst, buf[..t.len].to_vec()))
            })
            .collect()
        }

        fn distribute(
            &mut self,
            key_id: u32,
            subject: &str,
            lifetime_s: u32,
            txid: u32,
        ) -> Message {
            let kd: Message = KeyDistribution {
                key_role: KeyRole::NodeDc,
                new_key_id: key_id,
                key: SecretKey::from_bytes([key_id as u8; 32]),
                lifetime_s,
                subject: fqdn(subject),
                extensions: Extensions::none(),
            }
            .into();
            let d = self.as_key.seal_to_vec(&kd, txid, None).unwrap();
            let mut out = self.deliver(dc_addr(0), as_addr(), d);
            assert_eq!(out.len(), 1);
            let (src, dst, mut answer) = out.remove(0);
            assert_eq!((src, dst), (dc_addr(0), as_addr()));
            let (h, msg) = self.as_key.open(&mut answer).unwrap();
            assert_eq!(h.envelope.txid, txid);
            msg
        }

        fn login(&mut self, key_id: u32, name: &str) -> NodeEnd {
            let answer = self.distribute(key_id, name, 86_400, key_id);
            assert!(matches!(answer, Message::Ack(_)), "{answer:?}");
            NodeEnd {
                key: SignalingKey::new(&SecretKey::from_bytes([key_id as u8; 32]), key_id, Role::A),
                fqdn: fqdn(name),
            }
        }

        /// Sends `msg` from `from` to DC address `to`; returns the opened answers.
        fn ask(
            &mut self,
            node: &mut NodeEnd,
            from: SocketAddr,
            to: SocketAddr,
            msg: &Message,
            txid: u32,
        ) -> Vec<Message> {
            let d = node.key.seal_to_vec(msg, txid, None).unwrap();
            self.deliver(to, from, d)
                .into_iter()
                .map(|(src, dst, mut a)| {
                    assert_eq!((src, dst), (to, from), "answered from where it was asked");
                    let (h, m) = node.key.open(&mut a).unwrap();
                    assert_eq!(h.envelope.txid, txid);
                    m
                })
                .collect()
        }

        fn register_as(
            &mut self,
            node: &mut NodeEnd,
            name: &str,
            from: SocketAddr,
            local: &[SocketAddr],
            nat: NatBehaviour,
            txid: u32,
        ) -> Message {
            let req: Message = RegistrationRequest {
                node_fqdn: fqdn(name),
                local_addrs: AddrList::new(local.iter().map(|a| TransportAddr::new(*a)).collect())
                    .unwrap(),
                nat_mapping: nat,
                node_public_key: [7; 32],
                wants_notification: false,
                extensions: Extensions::none(),
            }
            .into();
            let mut answers = self.ask(node, from, dc_addr(0), &req, txid);
            assert_eq!(answers.len(), 1, "{answers:?}");
            answers.remove(0)
        }

        fn register(&mut self, node: &mut NodeEnd, from: SocketAddr, txid: u32) -> Message {
            let name = node.fqdn.as_str().to_owned();
            self.register_as(node, &name, from, &[from], NatBehaviour::Unknown, txid)
        }

        fn keepalive(
            &mut self,
            node: &mut NodeEnd,
            from: SocketAddr,
            to: SocketAddr,
        ) -> Vec<Message> {
            let k: Message = Keepalive {
                reply_requested: true,
                extensions: Extensions::none(),
            }
            .into();
            self.ask(node, from, to, &k, 0x4b)
        }

        fn events(&mut self) -> Vec<DcEvent> {
            std::iter::from_fn(|| self.dc.poll_event()).collect()
        }

        fn run_until(&mut self, t: Time) {
            while let Some((at, _)) = self.dc.poll_timeout() {
                if at > t {
                    break;
                }
                self.now = at;
                self.dc.handle_timeout(at, &mut self.rng);
            }
            self.now = t;
        }
    }

    fn response(m: &Message) -> &RegistrationResponse {
        match m {
            Message::RegistrationResponse(r) => r,
            other => panic!("not a REGISTRATION_RESPONSE: {other:?}"),
        }
    }

    fn error_code(m: &Message) -> ErrorCode {
        match m {
            Message::Error(e) => e.code,
            other => panic!("not an ERROR: {other:?}"),
        }
    }

    #[test]
    fn the_gap_window_decides_the_golden_replay_vector_like_the_full_window() {
        let text = include_str!("../../../vectors/crypto/replay_window.toml");
        let list = |key: &str| -> Vec<String> {
            let line = text.lines().find(|l| l.starts_with(key)).unwrap();
            let inner = line.split_once('[').unwrap().1.trim_end_matches(']');
            inner
                .split(',')
                .map(|s| s.trim().trim_matches('"').to_owned())
                .collect()
        };
        let counters = list("counters");
        let results = list("results");
        assert_eq!(counters.len(), results.len());
        let mut w = GapWindow::default();
        for (c, expected) in counters.iter().zip(&results) {
            let got = match w.accept(c.parse().unwrap()) {
                Ok(_) => "accept",
                Err(Replay::Duplicate) => "duplicate",
                Err(Replay::TooOld) => "too_old",
                Err(Replay::Exhausted) => "exhausted",
            };
            assert_eq!(got, expected, "counter {c}");
        }
    }

    #[test]
    fn the_gap_window_never_accepts_what_the_full_window_refuses_and_agrees_while_gaps_fit() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut disagreements = 0;
        for round in 0..200 {
            let mut gap = GapWindow::default();
            let mut full = ReplayWindow::new();
            let mut top = 0u64;
            // One operation adds at most one gap, so nothing was forgotten while the window
            // never held REPLAY_GAPS of them.
            let mut ever_full = false;
            for _ in 0..300 {
                // Mostly the next few values, sometimes a straggler or a jump.
                let r = rng.next_u32() % 100;
                let v = match r {
                    0..=69 => top + u64::from(rng.next_u32() % 3),
                    70..=89 => top.saturating_sub(u64::from(rng.next_u32() % 40)),
                    90..=97 => top.saturating_sub(u64::from(rng.next_u32() % 9000)),
                    _ => top + u64::from(rng.next_u32() % 10_000),
                };
                let (g, f) = (gap.accept(v), full.accept(v));
                if g.is_ok() {
                    assert!(f.is_ok(), "round {round}: {v} accepted twice");
                    top = top.max(v);
                } else if f.is_ok() {
                    assert!(
                        ever_full,
                        "round {round}: {v} refused, no gap ever forgotten"
                    );
                    disagreements += 1;
                }
                ever_full |= usize::from(gap.len) == REPLAY_GAPS;
            }
        }
        assert!(
            disagreements > 0,
            "the sequences must overflow the gaps sometimes"
        );
    }

    #[test]
    fn the_as_key_distribution_is_acked_and_its_retransmission_acked_again_without_a_second_key() {
        let mut b = Bench::new(config());
        let first = b.distribute(0x1001, "alice.dc1.example", 86_400, 5);
        assert!(matches!(
            first,
            Message::Ack(Ack {
                acked_type: 0x20,
                ..
            })
        ));
        assert_eq!(
            b.events(),
            vec![DcEvent::SequenceReserved {
                key_id: AS_KEY_ID,
                through: 1 << 16
            }]
        );
        let again = b.distribute(0x1001, "alice.dc1.example", 86_400, 5);
        assert!(matches!(again, Message::Ack(_)));
        assert_eq!(b.dc.sessions_held(), 1);
        let clash = b.distribute(0x1001, "alice.dc1.example", 86_400, 6);
        assert_eq!(
            error_code(&clash),
            ErrorCode::WrongState,
            "another distribution, same ID"
        );
        assert_eq!(
            b.dc.poll_timeout(),
            Some((Time::from_secs(86_400), "session key expiry"))
        );
    }

    #[test]
    fn a_key_for_a_name_outside_the_zone_or_of_another_role_is_refused_with_wrong_state() {
        let mut b = Bench::new(config());
        for name in ["alice.dc2.example", "a.b.dc1.example", "dc1.example"] {
            let answer = b.distribute(0x1001, name, 600, 1);
            assert_eq!(error_code(&answer), ErrorCode::WrongState, "{name}");
        }
        let kd: Message = KeyDistribution {
            key_role: KeyRole::DcRs,
            new_key_id: 0x1002,
            key: SecretKey::from_bytes([1; 32]),
            lifetime_s: 600,
            subject: fqdn("rs1.dc1.example"),
            extensions: Extensions::none(),
        }
        .into();
        let d = b.as_key.seal_to_vec(&kd, 2, None).unwrap();
        let mut out = b.deliver(dc_addr(0), as_addr(), d);
        let (_, msg) = b.as_key.open(&mut out[0].2).unwrap();
        assert_eq!(error_code(&msg), ErrorCode::WrongState);
        assert_eq!(b.dc.sessions_held(), 0);
    }

    #[test]
    fn a_registration_gets_a_pair_from_the_pools_and_a_new_session_of_the_same_name_the_same_pair()
    {
        let mut b = Bench::new(config());
        let mut alice = b.login(0x1001, "alice.dc1.example");
        let mut bob = b.login(0x2002, "bob.dc1.example");
        let a = b.register(&mut alice, node_addr(2), 1);
        let bb = b.register(&mut bob, node_addr(3), 1);
        let (a, bb) = (response(&a).clone(), response(&bb).clone());
        assert_eq!(a.virtual_v4, Ipv4Addr::new(100, 64, 1, 1));
        assert_eq!(
            a.virtual_v6,
            "fd4e:544d:0:1::1".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(bb.virtual_v4, Ipv4Addr::new(100, 64, 1, 2));
        assert_eq!((a.lifetime_s, a.keepalive_interval_s), (600, 0), "no NAT");
        assert_eq!(a.observed_addr.socket_addr(), node_addr(2));
        let mut alice_again = b.login(0x3003, "alice.dc1.example");
        let again = b.register(&mut alice_again, node_addr(9), 7);
        assert_eq!(
            (response(&again).virtual_v4, response(&again).virtual_v6),
            (a.virtual_v4, a.virtual_v6)
        );
        assert_eq!(
            b.dc.sessions_held(),
            2,
            "alice's first session is forgotten"
        );
        assert_eq!(b.dc.nodes_registered(), 2);
        let events = b.events();
        assert_eq!(
            events
                .iter()
                .filter(|e| matches!(e, DcEvent::NodeRegistered { .. }))
                .count(),
            3
        );
        let reg = b.dc.registration(&fqdn("alice.dc1.example")).unwrap();
        assert_eq!(reg.session_key_id, 0x3003);
        assert_eq!(reg.observed[0], Some((node_addr(9), dc_addr(0))));
        assert_eq!(reg.nat, [NatBehaviour::NoNat, NatBehaviour::Unknown]);
    }

    #[test]
    fn a_registration_for_another_nodes_name_is_refused_and_changes_nothing() {
        let mut b = Bench::new(config());
        let mut alice = b.login(0x1001, "alice.dc1.example");
        let mut bob = b.login(0x2002, "bob.dc1.example");
        b.register(&mut bob, node_addr(3), 1);
        let before = b.dc.registration(&fqdn("bob.dc1.example"));
        b.events();
        let answer = b.register_as(
            &mut alice,
            "bob.dc1.example",
            node_addr(66),
            &[node_addr(66)],
            NatBehaviour::NoNat,
            2,
        );
        assert_eq!(error_code(&answer), ErrorCode::WrongState);
        assert_eq!(b.dc.registration(&fqdn("bob.dc1.example")), before);
        assert_eq!(b.dc.registration(&fqdn("alice.dc1.example")), None);
        assert!(b.events().is_empty());
    }

    #[test]
    fn a_retransmitted_registration_is_answered_again_but_acted_on_once() {
        let mut b = Bench::new(config());
        let mut alice = b.login(0x1001, "alice.dc1.example");
        let first = b.register(&mut alice, node_addr(2), 77);
        b.now = Time::from_secs(1);
        let again = b.register(&mut alice, node_addr(2), 77);
        assert_eq!(first, again);
        let registered = b
            .events()
            .into_iter()
            .filter(|e| matches!(e, DcEvent::NodeRegistered { .. }))
            .count();
        assert_eq!(registered, 1);
        let reg = b.dc.registration(&fqdn("alice.dc1.example")).unwrap();
        assert_eq!(
            reg.expires,
            Time::from_secs(600),
            "not extended by the copy"
        );
        assert_eq!(reg.last_heard, Time::from_secs(1));
    }

    #[test]
    fn a_node_behind_a_nat_is_told_to_keep_alive_and_its_claim_of_no_nat_is_not_believed() {
        let mut b = Bench::new(config());
        let mut alice = b.login(0x1001, "alice.dc1.example");
        let private = SocketAddr::from(([192, 168, 1, 2], 5000));
        let answer = b.register_as(
            &mut alice,
            "alice.dc1.example",
            node_addr(40),
            &[private],
            NatBehaviour::NoNat,
            1,
        );
        assert_eq!(response(&answer).keepalive_interval_s, 25);
        assert_eq!(response(&answer).observed_addr.socket_addr(), node_addr(40));
        let reg = b.dc.registration(&fqdn("alice.dc1.example")).unwrap();
        assert_eq!(reg.nat[0], NatBehaviour::Unknown);
        b.register_as(
            &mut alice,
            "alice.dc1.example",
            node_addr(40),
            &[private],
            NatBehaviour::EndpointIndependent,
            2,
        );
        let reg = b.dc.registration(&fqdn("alice.dc1.example")).unwrap();
        assert_eq!(reg.nat[0], NatBehaviour::EndpointIndependent);
    }

    #[test]
    fn a_keepalive_is_answered_with_its_source_at_either_dc_address_and_a_newer_source_is_taken() {
        let mut b = Bench::new(config());
        let mut alice = b.login(0x1001, "alice.dc1.example");
        b.register(&mut alice, node_addr(2), 1);
        // An unregistered session's probes are answered too (they race the registration).
        for to in [dc_addr(0), dc_addr(1)] {
            let replies = b.keepalive(&mut alice, node_addr(50), to);
            assert_eq!(
                replies,
                vec![Message::KeepaliveReply(KeepaliveReply {
                    observed_addr: TransportAddr::new(node_addr(50)),
                    extensions: Extensions::none(),
                })]
            );
        }
        let reg = b.dc.registration(&fqdn("alice.dc1.example")).unwrap();
        assert_eq!(
            reg.observed[0],
            Some((node_addr(50), dc_addr(1))),
            "the NAT rebound; the latest datagram came in at the second address"
        );
        // A datagram sealed earlier but delivered late, from elsewhere, does not move it back.
        let quiet: Message = Keepalive {
            reply_requested: false,
            extensions: Extensions::none(),
        }
        .into();
        let late = alice.key.seal_to_vec(&quiet, 0, None).unwrap();
        let newer = alice.key.seal_to_vec(&quiet, 0, None).unwrap();
        assert!(b
            .deliver(dc_addr(0), node_addr(60), newer.clone())
            .is_empty());
        assert!(b.deliver(dc_addr(0), node_addr(61), late).is_empty());
        assert!(b.deliver(dc_addr(0), node_addr(62), newer).is_empty());
        let reg = b.dc.registration(&fqdn("alice.dc1.example")).unwrap();
        assert_eq!(reg.observed[0], Some((node_addr(60), dc_addr(0))));
        assert_eq!(b.dc.drops().get("replayed"), 1);
    }

    #[test]
    fn when_the_pools_run_out_a_new_name_is_refused_unavailable_and_old_names_keep_theirs() {
        let mut b = Bench::new(DcConfig {
            pools: pools(30),
            ..config()
        });
        assert_eq!(pools(30).capacity(), 2);
        let mut nodes: Vec<NodeEnd> = (1..=3u8)
            .map(|i| b.login(u32::from(i) << 8, &format!("n{i}.dc1.example")))
            .collect();
        let answers: Vec<Message> = nodes
            .iter_mut()
            .enumerate()
            .map(|(i, n)| b.register(n, node_addr(i as u8 + 2), 1))
            .collect();
        assert_eq!(
            response(&answers[0]).virtual_v4,
            Ipv4Addr::new(100, 64, 1, 1)
        );
        assert_eq!(
            response(&answers[1]).virtual_v4,
            Ipv4Addr::new(100, 64, 1, 2)
        );
        assert_eq!(error_code(&answers[2]), ErrorCode::Unavailable);
        let refresh = b.register(&mut nodes[0], node_addr(2), 2);
        assert_eq!(response(&refresh).virtual_v4, Ipv4Addr::new(100, 64, 1, 1));
    }

    #[test]
    fn a_registration_lapses_after_its_lifetime_unless_refreshed() {
        let mut b = Bench::new(config());
        let mut alice = b.login(0x1001, "alice.dc1.example");
        b.register(&mut alice, node_addr(2), 1);
        b.run_until(Time::from_secs(300));
        b.register(&mut alice, node_addr(2), 2);
        b.events();
        assert_eq!(
            b.dc.poll_timeout(),
            Some((Time::from_secs(900), "registration expiry"))
        );
        b.run_until(Time::from_secs(899));
        assert_eq!(b.dc.nodes_registered(), 1);
        b.run_until(Time::from_secs(900));
        assert_eq!(b.dc.nodes_registered(), 0);
        assert_eq!(
            b.events(),
            vec![DcEvent::NodeExpired {
                fqdn: fqdn("alice.dc1.example")
            }]
        );
        assert!(
            b.dc.virtual_addrs(&fqdn("alice.dc1.example")).is_some(),
            "the pair stays"
        );
    }

    #[test]
    fn an_expired_session_ends_its_registration_draws_expired_for_ten_minutes_then_unknown_key() {
        let mut b = Bench::new(config());
        let answer = b.distribute(0x1001, "alice.dc1.example", 100, 1);
        assert!(matches!(answer, Message::Ack(_)));
        let mut alice = NodeEnd {
            key: SignalingKey::new(&SecretKey::from_bytes([1; 32]), 0x1001, Role::A),
            fqdn: fqdn("alice.dc1.example"),
        };
        b.register(&mut alice, node_addr(2), 1);
        b.events();
        b.run_until(Time::from_secs(100));
        assert_eq!(
            b.events(),
            vec![DcEvent::NodeExpired {
                fqdn: fqdn("alice.dc1.example")
            }]
        );
        let answer = b.register(&mut alice, node_addr(2), 2);
        assert_eq!(error_code(&answer), ErrorCode::Expired);
        assert_eq!(
            b.dc.poll_timeout(),
            Some((Time::from_secs(700), "expired session key removal"))
        );
        b.run_until(Time::from_secs(700));
        assert_eq!(b.dc.sessions_held(), 0);
        let req: Message = RegistrationRequest {
            node_fqdn: fqdn("alice.dc1.example"),
            local_addrs: AddrList::new(vec![TransportAddr::new(node_addr(2))]).unwrap(),
            nat_mapping: NatBehaviour::Unknown,
            node_public_key: [7; 32],
            wants_notification: false,
            extensions: Extensions::none(),
        }
        .into();
        let d = alice.key.seal_to_vec(&req, 3, None).unwrap();
        let out = b.deliver(dc_addr(0), node_addr(2), d);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].2.len(), crate::signaling::UNSEALED_ERROR_LEN);
        assert_eq!(b.dc.drops().get("unknown_key"), 1);
    }

    #[test]
    fn a_node_that_deregisters_is_offline_and_keeps_its_pair() {
        let mut b = Bench::new(config());
        let mut alice = b.login(0x1001, "alice.dc1.example");
        let first = response(&b.register(&mut alice, node_addr(2), 1)).clone();
        let answer = b.register_as(
            &mut alice,
            "alice.dc1.example",
            node_addr(2),
            &[],
            NatBehaviour::Unknown,
            2,
        );
        assert_eq!(response(&answer).lifetime_s, 0);
        assert_eq!(response(&answer).virtual_v4, first.virtual_v4);
        assert_eq!(b.dc.nodes_registered(), 0);
        assert!(b.events().contains(&DcEvent::NodeDeregistered {
            fqdn: fqdn("alice.dc1.example")
        }));
        let back = b.register(&mut alice, node_addr(2), 3);
        assert_eq!(response(&back).virtual_v4, first.virtual_v4);
    }

    #[test]
    fn keys_nobody_registers_under_are_bounded_and_the_excess_is_refused_unavailable() {
        let mut b = Bench::new(DcConfig {
            limits: DcLimits {
                max_pending_sessions: 2,
                max_nodes: 3,
                ..DcLimits::default()
            },
            ..config()
        });
        let mut a = b.login(1, "a.dc1.example");
        b.login(2, "b.dc1.example");
        let refused = b.distribute(3, "c.dc1.example", 600, 3);
        assert_eq!(error_code(&refused), ErrorCode::Unavailable);
        b.register(&mut a, node_addr(2), 1);
        b.login(3, "c.dc1.example");
        let refused = b.distribute(4, "d.dc1.example", 600, 4);
        assert_eq!(error_code(&refused), ErrorCode::Unavailable, "max_nodes");
        assert_eq!(b.dc.nodes_known(), 3);
    }

    #[test]
    fn restored_assignments_are_kept_and_new_names_skip_them() {
        let mut assignments = BTreeMap::new();
        let p = pools(24);
        assignments.insert(fqdn("old.dc1.example"), p.pair(1).unwrap());
        let mut b = Bench::new(DcConfig {
            assignments: assignments.clone(),
            ..config()
        });
        assert_eq!(b.dc.virtual_addrs(&fqdn("old.dc1.example")), p.pair(1));
        let mut new = b.login(0x1001, "new.dc1.example");
        let answer = b.register(&mut new, node_addr(2), 1);
        assert_eq!(response(&answer).virtual_v4, p.pair(2).unwrap().v4);
        let mut old = b.login(0x2002, "old.dc1.example");
        let answer = b.register(&mut old, node_addr(3), 1);
        assert_eq!(response(&answer).virtual_v6, p.pair(1).unwrap().v6);

        let mut clash = assignments;
        clash.insert(fqdn("other.dc1.example"), p.pair(1).unwrap());
        let err = DirectionCoordinator::new(DcConfig {
            assignments: clash,
            ..config()
        })
        .err();
        assert!(matches!(err, Some(DcConfigError::InvalidAssignment(_))));
        let mut outside = BTreeMap::new();
        outside.insert(
            fqdn("x.dc1.example"),
            VirtualAddrs {
                v4: Ipv4Addr::new(10, 0, 0, 1),
                v6: p.pair(5).unwrap().v6,
            },
        );
        assert!(DirectionCoordinator::new(DcConfig {
            assignments: outside,
            ..config()
        })
        .is_err());
    }

    #[test]
    fn the_dc_refuses_bad_pools_addresses_and_key_ids() {
        let bad = |c: DcConfig| DirectionCoordinator::new(c).err();
        assert_eq!(
            bad(DcConfig {
                pools: pools(31),
                ..config()
            }),
            Some(DcConfigError::InvalidPools)
        );
        let mut p = pools(24);
        p.v6 = "fd00::1".parse().unwrap();
        assert_eq!(
            bad(DcConfig {
                pools: p,
                ..config()
            }),
            Some(DcConfigError::InvalidPools)
        );
        assert_eq!(
            bad(DcConfig {
                addrs: vec![],
                ..config()
            }),
            Some(DcConfigError::Addresses)
        );
        assert_eq!(
            bad(DcConfig {
                as_key_id: 0x8000_0001,
                ..config()
            }),
            Some(DcConfigError::InvalidAsKeyId(0x8000_0001))
        );
    }

    #[test]
    fn a_registered_node_record_with_its_session_fits_in_256_bytes() {
        // The record holds the node's session and registration inline; the heap it points to
        // (name, addresses) and the indexes' own overhead are measured together in
        // tests/dc_memory.rs.
        let node = core::mem::size_of::<Node>();
        let session = core::mem::size_of::<Session>();
        let registration = core::mem::size_of::<Registration>();
        let expanded = core::mem::size_of::<AeadKey>();
        eprintln!(
            "Node {node} B (Session {session} B, Registration {registration} B); \
             an expanded key would be {expanded} B"
        );
        assert!(node <= 256, "Node is {node} bytes");
        assert!(session <= 96, "Session is {session} bytes");
    }

    #[test]
    fn random_and_bit_flipped_datagrams_never_panic_and_never_register_anyone() {
        let mut b = Bench::new(config());
        let mut alice = b.login(0x1001, "alice.dc1.example");
        let mut noise = ChaCha8Rng::seed_from_u64(3);
        let req: Message = RegistrationRequest {
            node_fqdn: fqdn("alice.dc1.example"),
            local_addrs: AddrList::new(vec![TransportAddr::new(node_addr(2))]).unwrap(),
            nat_mapping: NatBehaviour::Unknown,
            node_public_key: [7; 32],
            wants_notification: false,
            extensions: Extensions::none(),
        }
        .into();
        let valid = [
            alice.key.seal_to_vec(&req, 1, None).unwrap(),
            b.as_key
                .seal_to_vec(
                    &KeyDistribution {
                        key_role: KeyRole::NodeDc,
                        new_key_id: 0x2002,
                        key: SecretKey::from_bytes([2; 32]),
                        lifetime_s: 600,
                        subject: fqdn("bob.dc1.example"),
                        extensions: Extensions::none(),
                    }
                    .into(),
                    9,
                    None,
                )
                .unwrap(),
        ];
        for i in 0..20_000u32 {
            let d = if i % 2 == 0 {
                let len = (noise.next_u32() % 200) as usize;
                let mut d = vec![0u8; len];
                noise.fill_bytes(&mut d);
                if let Some(h) = d.get_mut(..2) {
                    h.copy_from_slice(&[[0x20, 0x30, 0x32, 0x60][i as usize / 2 % 4], 1]);
                }
                d
            } else {
                let mut d = valid[(i as usize / 2) % valid.len()].clone();
                let bit = noise.next_u32() as usize % (d.len() * 8);
                d[bit / 8] ^= 1 << (bit % 8);
                d
            };
            b.now = Time::from_millis(u64::from(i));
            b.deliver(dc_addr(0), node_addr(2), d);
            b.dc.handle_timeout(b.now, &mut b.rng);
        }
        assert_eq!(b.dc.nodes_registered(), 0);
        assert_eq!(b.dc.sessions_held(), 1);
        assert!(b.dc.drops().total() >= 19_000, "{:?}", b.dc.drops());
        assert!(b
            .events()
            .iter()
            .all(|e| matches!(e, DcEvent::SequenceReserved { .. })));
    }
}
