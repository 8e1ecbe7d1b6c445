//! The relay server (RS) as a sans-IO state machine: spec/05-procedures.md §5.6 ("RS rules"),
//! the relayed handover of §5.9 (b) and the load report of §5.13.
//!
//! ```text
//! DC                        RS                               node A / node B
//!  | RELAY_REQUEST(P, K_rel) [K_ds]                            |
//!  |------------------------>| relay table: P authorized       |
//!  | RELAY_RESPONSE(relay_addrs, load_permille) [K_ds]         |
//!  |<------------------------|                                 |
//!  |                         | RELAY_BIND [K_rel, P], role B   |
//!  |                         |<------------------------------- B: side B bound
//!  |                         | ACK [K_rel, P], role Relay      |
//!  |                         |-------------------------------> B
//!  |                         | RELAY_BIND, role A; TUNNEL_REQUEST [K_tun, P]
//!  |                         |<------------------------------- A: side A bound
//!  |                         | TUNNEL_REQUEST, unchanged       |
//!  |                         |-------------------------------> B
//!  |                         | DATA(P) both ways, unchanged    |
//! ```
//!
//! # Driving it
//!
//! The data path is [`RelayServer::relay`]: it takes the received datagram by shared reference
//! and returns its decision at once. [`RelayDecision::Forward`] means "send these very bytes from
//! `src` to `dst`"; the runtime sends them without copying them anywhere. It never allocates
//! when it forwards, nor when it drops a datagram for a relay reason. Signaling addressed to the
//! RS itself (RELAY_REQUEST, RELAY_BIND) and the RS's own answers (ERROR PeerNotBound) come back
//! as [`RelayDecision::Consumed`], with their answers waiting in [`RelayServer::poll_transmit`].
//!
//! [`RelayServer::handle_datagram`] is the uniform contract of every entity: it calls `relay`
//! and queues a forwarded datagram in the outbox, so a driver that treats all entities alike
//! works too (at the price of one copy per forwarded datagram).
//!
//! After each input, drain [`RelayServer::poll_event`] first (a [`RsEvent::SequenceReserved`]
//! must be made durable before any datagram polled after it is sent, spec/04 §4.7), then
//! [`RelayServer::poll_transmit`], and call [`RelayServer::handle_timeout`] when the deadline of
//! [`RelayServer::poll_timeout`] has passed. Give `poll_transmit` a buffer as large as the
//! largest datagram the runtime receives: forwarded DATA packets may exceed the 1232 bytes of
//! signaling.
//!
//! # The relay table
//!
//! One entry per Path ID, made **only** by an authenticated RELAY_REQUEST under one of the
//! configured DC↔RS keys, at most [`RsLimits::max_paths`] live entries. Each holds K_rel (the RS
//! seals as role Relay and opens the nodes' RELAY_BINDs as roles A and B), the two sides'
//! bindings (source address, the RS address it arrived on, the sequence number of the bind that
//! made it), a token bucket per direction, and traffic counters. Sides are found by the
//! datagram's source address alone; the RS sends to a side from the local address that side
//! bound to, so one side may be bound over IPv4 and the other over IPv6 (a dual-stack RS relays
//! between the families).
//!
//! A path ends [`RsConfig::idle_expiry`] (120 s) after its last forwarded datagram or accepted
//! RELAY_BIND, or when its `lifetime_s` runs out. Its K_rel is then kept for
//! [`RsLimits::expired_path_grace`] (10 min, at most [`RsLimits::max_expired_paths`] entries,
//! the oldest forgotten first) only to answer a RELAY_BIND with ERROR Expired.
//!
//! # Load
//!
//! `load_permille` is the larger of two utilizations, in thousandths: live paths over
//! [`RsLimits::max_paths`], and the sum of the rate limits granted to live paths over
//! [`RsConfig::bandwidth_kbps`] (left out when that is 0). Rate limits may be over-committed, so
//! the figure may exceed 1000 (it saturates at 65535); only its order matters to the DC.
//!
//! # Sequence numbers under K_rel
//!
//! K_rel does not outlive the path, but a restarted RS may be handed the same K_rel again (a
//! RELAY_REQUEST retransmitted across the restart). So that its seals cannot repeat a nonce of
//! its previous life, the RS starts sealing under each K_rel at a random sequence number below
//! 2^62 instead of 0.

use core::fmt;
use core::time::Duration;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use ntm_wire::message::Error as ErrorMsg;
use ntm_wire::{
    Ack, AddrList, DataPacket, ErrorCode, Extensions, Header, Message, MessageType, RelayRequest,
    RelayResponse, Role, SecretKey, TransportAddr, WireError, DATA_TYPE, HEADER_LEN,
    MAX_SIGNALING_LEN,
};
use rand_core::{CryptoRng, RngCore};

use crate::signaling::{DropCounters, DropReason, ServerOutput, SignalingKey, Transmit};
use crate::time::Time;

/// The length of the RS's sealed ERROR PeerNotBound: header, 7-byte body, tag. A message shorter
/// than this is not answered (spec/07 §7.4: no unauthenticated datagram draws a larger answer).
pub const PEER_NOT_BOUND_LEN: usize = HEADER_LEN + 7 + 16;

/// The smallest burst a path's token bucket allows, in bytes, whatever its rate: room for two
/// full-size datagrams, so that a low rate slows a path down instead of blocking large packets.
pub const MIN_BURST_BYTES: u64 = 4096;

/// Sealing under a fresh K_rel starts below this (see the module documentation).
const KREL_SEQ_START_BOUND: u64 = 1 << 62;

/// One DC↔RS pre-shared key (spec/01 §1.4): the DC is role A, the RS role B.
#[derive(Clone, Debug)]
pub struct DcKey {
    pub key: SecretKey,
    /// Its configured key ID: non-zero, unique among the RS's DC keys.
    pub key_id: u32,
    /// The persisted high-water mark of the RS's sequence numbers under it (0 when new).
    pub high_water_mark: u64,
}

/// Every bound on the RS's memory and work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RsLimits {
    /// Capacity: live paths. A RELAY_REQUEST beyond it is refused with ERROR RelayUnavailable.
    pub max_paths: usize,
    /// Ended paths whose K_rel is kept to answer ERROR Expired; the oldest is forgotten first.
    pub max_expired_paths: usize,
    /// How long an ended path's K_rel is kept: 10 min (spec/07, expired-key grace).
    pub expired_path_grace: Duration,
    /// ERROR PeerNotBound answers per path per second.
    pub peer_not_bound_per_second: u32,
    /// Unsealed ERRORs per source prefix (IPv4 /24, IPv6 /64) per second: 10.
    pub unsealed_errors_per_second: u32,
    pub max_tracked_prefixes: usize,
    pub max_queued_transmits: usize,
    pub max_queued_events: usize,
    /// Sequence numbers reserved at a time under a DC↔RS key (spec/04 §4.7).
    pub sequence_block: u64,
}

impl Default for RsLimits {
    fn default() -> Self {
        RsLimits {
            max_paths: 10_000,
            max_expired_paths: 10_000,
            expired_path_grace: Duration::from_secs(600),
            peer_not_bound_per_second: 10,
            unsealed_errors_per_second: 10,
            max_tracked_prefixes: 4096,
            max_queued_transmits: 1024,
            max_queued_events: 1024,
            sequence_block: 1 << 16,
        }
    }
}

/// The RS's configuration.
#[derive(Clone, Debug)]
pub struct RsConfig {
    /// The addresses nodes send to, one or more per family the RS serves (both families make it
    /// dual-stack); sent as RELAY_RESPONSE.`relay_addrs`, so 1 to 8, all different.
    pub relay_addrs: Vec<SocketAddr>,
    /// The keys of the DCs that may authorize paths.
    pub dc_keys: Vec<DcKey>,
    /// The rate limit of a path whose RELAY_REQUEST asks for 0, in kbit/s: non-zero.
    pub default_rate_limit_kbps: u32,
    /// How much a path may send at once, as time at its rate (at least [`MIN_BURST_BYTES`]).
    pub rate_burst: Duration,
    /// The bandwidth the RS offers, in kbit/s, for `load_permille`; 0 leaves rates out of it.
    pub bandwidth_kbps: u64,
    /// A path ends this long after its last forwarded datagram or RELAY_BIND: 120 s (60-600 s).
    pub idle_expiry: Duration,
    pub limits: RsLimits,
}

impl RsConfig {
    /// The defaults of spec/07 for everything but the addresses and keys: 10 Mbit/s per path
    /// and direction with a 500 ms burst, bandwidth not counted in the load, 120 s idle expiry.
    pub fn new(relay_addrs: Vec<SocketAddr>, dc_keys: Vec<DcKey>) -> Self {
        RsConfig {
            relay_addrs,
            dc_keys,
            default_rate_limit_kbps: 10_000,
            rate_burst: Duration::from_millis(500),
            bandwidth_kbps: 0,
            idle_expiry: Duration::from_secs(120),
            limits: RsLimits::default(),
        }
    }
}

/// A configuration the RS refuses to run with.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RsConfigError {
    /// No relay address, more than 8, or one listed twice.
    RelayAddresses,
    /// No DC key.
    NoDcKey,
    /// A DC key ID is 0 or used twice.
    InvalidDcKeyId(u32),
    /// `max_paths` is 0.
    NoCapacity,
    /// `default_rate_limit_kbps` is 0.
    NoDefaultRate,
    /// `idle_expiry` is outside 60 to 600 s (spec/07).
    InvalidIdleExpiry,
}

impl fmt::Display for RsConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RsConfigError::RelayAddresses => {
                f.write_str("the RS needs 1 to 8 distinct relay addresses")
            }
            RsConfigError::NoDcKey => f.write_str("the RS needs at least one DC key"),
            RsConfigError::InvalidDcKeyId(id) => {
                write!(f, "DC key ID {id:#x}: must be non-zero and unique")
            }
            RsConfigError::NoCapacity => f.write_str("max_paths must be at least 1"),
            RsConfigError::NoDefaultRate => f.write_str("the default rate limit must be non-zero"),
            RsConfigError::InvalidIdleExpiry => f.write_str("idle expiry must be 60 to 600 s"),
        }
    }
}

impl std::error::Error for RsConfigError {}

/// One of the two sides of a relayed path: A the tunnel's initiator, B its responder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Side {
    A,
    B,
}

impl Side {
    fn of(role: Role) -> Option<Side> {
        match role {
            Role::A => Some(Side::A),
            Role::B => Some(Side::B),
            Role::Relay => None,
        }
    }

    pub fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }
}

/// Why a path left the relay table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathEnd {
    /// Nothing forwarded and no RELAY_BIND for the idle expiry.
    Idle,
    /// Its `lifetime_s` ran out.
    Lifetime,
}

/// Datagrams and bytes forwarded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub datagrams: u64,
    pub bytes: u64,
}

impl Traffic {
    fn add(&mut self, len: usize) {
        self.datagrams = self.datagrams.saturating_add(1);
        self.bytes = self
            .bytes
            .saturating_add(u64::try_from(len).unwrap_or(u64::MAX));
    }
}

/// What the RS reports to its operator and its runtime.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RsEvent {
    /// A DC authorized a path.
    PathAuthorized {
        path_id: u32,
        dc_key_id: u32,
        lifetime_s: u32,
        rate_limit_kbps: u32,
    },
    /// A side was bound for the first time (`rebound` false) or moved to a new address
    /// (handover, `rebound` true). A RELAY_BIND that only refreshes a binding reports nothing.
    SideBound {
        path_id: u32,
        side: Side,
        addr: SocketAddr,
        local: SocketAddr,
        rebound: bool,
    },
    /// A path left the relay table, with what it forwarded in each direction.
    PathEnded {
        path_id: u32,
        why: PathEnd,
        a_to_b: Traffic,
        b_to_a: Traffic,
    },
    /// Persist `through` as the high-water mark of the RS's sequence numbers under this DC key
    /// before sending any datagram polled after this event.
    SequenceReserved { key_id: u32, through: u64 },
}

/// Why the RS dropped a datagram without forwarding it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RelayDrop {
    /// A reason every entity shares: bad header, failed authentication, replay, ...
    Signaling(DropReason),
    /// No path with this Path ID is in the relay table.
    UnknownPath,
    /// The path has ended (its K_rel may still be kept to answer ERROR Expired).
    ExpiredPath,
    /// The source address is bound to neither side of the path.
    UnboundSource,
    /// A signaling header's role is not the side bound to the source address.
    RoleMismatch,
    /// The other side is not bound, and the datagram is not one the RS answers.
    PeerNotBound,
    /// Beyond the path's rate limit.
    RateLimited,
    /// A RELAY_BIND not newer than the last one accepted for its side.
    StaleBind,
    /// A RELAY_BIND from the address the other side is bound to.
    BindConflict,
}

/// The relay-specific reasons, in counter order.
const RELAY_REASONS: [RelayDrop; 8] = [
    RelayDrop::UnknownPath,
    RelayDrop::ExpiredPath,
    RelayDrop::UnboundSource,
    RelayDrop::RoleMismatch,
    RelayDrop::PeerNotBound,
    RelayDrop::RateLimited,
    RelayDrop::StaleBind,
    RelayDrop::BindConflict,
];

impl RelayDrop {
    /// A stable name for counters and logs.
    pub fn label(&self) -> &'static str {
        match self {
            RelayDrop::Signaling(r) => r.label(),
            RelayDrop::UnknownPath => "unknown_path",
            RelayDrop::ExpiredPath => "expired_path",
            RelayDrop::UnboundSource => "unbound_source",
            RelayDrop::RoleMismatch => "role_mismatch",
            RelayDrop::PeerNotBound => "peer_not_bound",
            RelayDrop::RateLimited => "rate_limited",
            RelayDrop::StaleBind => "stale_bind",
            RelayDrop::BindConflict => "bind_conflict",
        }
    }

    fn slot(&self) -> Option<usize> {
        RELAY_REASONS.iter().position(|r| r == self)
    }
}

impl fmt::Display for RelayDrop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RelayDrop::Signaling(r) => write!(f, "{r}"),
            other => f.write_str(other.label()),
        }
    }
}

/// Drops by [`RelayDrop::label`]: the relay reasons in a fixed array (counting them never
/// allocates, so the data path stays allocation-free), the shared ones in a [`DropCounters`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RelayDropCounters {
    relay: [u64; RELAY_REASONS.len()],
    signaling: DropCounters,
}

impl RelayDropCounters {
    pub fn record(&mut self, reason: &RelayDrop) {
        match (reason, reason.slot()) {
            (RelayDrop::Signaling(r), _) => self.signaling.record(r),
            (_, Some(i)) => {
                if let Some(n) = self.relay.get_mut(i) {
                    *n = n.saturating_add(1);
                }
            }
            (_, None) => {}
        }
    }

    /// Drops counted under `label`.
    pub fn get(&self, label: &str) -> u64 {
        RELAY_REASONS
            .iter()
            .zip(self.relay.iter())
            .find(|(r, _)| r.label() == label)
            .map_or_else(|| self.signaling.get(label), |(_, n)| *n)
    }

    /// Every drop counted.
    pub fn total(&self) -> u64 {
        self.relay
            .iter()
            .fold(self.signaling.total(), |a, b| a.saturating_add(*b))
    }

    /// `(label, count)` of every reason counted at least once.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        RELAY_REASONS
            .iter()
            .zip(self.relay.iter())
            .filter(|(_, n)| **n > 0)
            .map(|(r, n)| (r.label(), *n))
            .chain(self.signaling.iter())
    }
}

/// What [`RelayServer::relay`] decided for one datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayDecision {
    /// Send the datagram, byte for byte as received, from local address `src` to `dst`.
    Forward { src: SocketAddr, dst: SocketAddr },
    /// Signaling the RS handled itself; any answer waits in `poll_transmit`.
    Consumed,
    /// Dropped, and counted under the reason.
    Drop(RelayDrop),
}

/// Where a side is bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BoundSide {
    /// The side's address as the RS sees it (its NAT's outside address).
    pub addr: SocketAddr,
    /// The RS address the binding arrived on; the RS sends to this side from it.
    pub local: SocketAddr,
}

/// One path of the relay table, for tests and `ntm status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayPathStatus {
    pub path_id: u32,
    /// The key ID of the DC key that authorized it.
    pub dc_key_id: u32,
    pub side_a: Option<BoundSide>,
    pub side_b: Option<BoundSide>,
    /// The rate limit in force, per direction, in kbit/s.
    pub rate_limit_kbps: u32,
    pub a_to_b: Traffic,
    pub b_to_a: Traffic,
    /// Datagrams dropped beyond the rate limit.
    pub rate_limited: u64,
    pub last_activity: Time,
    /// When it ends: idle expiry or lifetime, whichever comes first.
    pub ends: Time,
}

// ---------------------------------------------------------------------------------------------
// The relay table.

/// A pair of values, one per side, read without indexing.
#[derive(Clone, Copy, Debug, Default)]
struct PerSide<T> {
    a: T,
    b: T,
}

impl<T> PerSide<T> {
    fn get(&self, side: Side) -> &T {
        match side {
            Side::A => &self.a,
            Side::B => &self.b,
        }
    }

    fn get_mut(&mut self, side: Side) -> &mut T {
        match side {
            Side::A => &mut self.a,
            Side::B => &mut self.b,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Binding {
    at: BoundSide,
    /// The sequence number of the RELAY_BIND that made or last refreshed the binding.
    seq: u64,
}

/// A token bucket in nanobytes (bytes × 10^9), so that refills need no division.
#[derive(Clone, Copy, Debug)]
struct TokenBucket {
    bytes_per_second: u128,
    burst: u128,
    tokens: u128,
    last: Time,
}

const NANOS_PER_SECOND: u128 = 1_000_000_000;

impl TokenBucket {
    fn new(now: Time, kbps: u32, burst_window: Duration) -> Self {
        let bytes_per_second = u128::from(kbps) * 125;
        let burst = bytes_per_second
            .saturating_mul(burst_window.as_nanos())
            .max(u128::from(MIN_BURST_BYTES) * NANOS_PER_SECOND);
        TokenBucket {
            bytes_per_second,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes `len` bytes if the bucket holds them.
    fn take(&mut self, now: Time, len: usize) -> bool {
        if let Some(elapsed) = now.checked_duration_since(self.last) {
            let refill = self.bytes_per_second.saturating_mul(elapsed.as_nanos());
            self.tokens = self.tokens.saturating_add(refill).min(self.burst);
            self.last = now;
        }
        let cost = (len as u128).saturating_mul(NANOS_PER_SECOND);
        match self.tokens.checked_sub(cost) {
            Some(left) => {
                self.tokens = left;
                true
            }
            None => false,
        }
    }
}

struct RelayPath {
    /// K_rel as the RS holds it (role Relay, key ID = Path ID).
    key: SignalingKey,
    /// Index of the DC key that authorized it, and the RELAY_REQUEST's transaction ID: a
    /// retransmission is answered again with `load_answered`.
    dc: usize,
    txid: u32,
    load_answered: u16,
    rate_limit_kbps: u32,
    lifetime_end: Time,
    last_activity: Time,
    sides: PerSide<Option<Binding>>,
    /// Per sending side.
    buckets: PerSide<TokenBucket>,
    /// Per sending side: A's is A → B.
    forwarded: PerSide<Traffic>,
    rate_limited: u64,
    /// The current one-second window of ERROR PeerNotBound answers and how many it has sent.
    answers: (Time, u32),
    /// The time of its entry in the deadline index: at or before it ends.
    indexed_at: Time,
}

impl RelayPath {
    fn ends(&self, idle: Duration) -> Time {
        (self.last_activity + idle).min(self.lifetime_end)
    }

    /// Why the path has ended by `now`, if it has.
    fn ended(&self, now: Time, idle: Duration) -> Option<PathEnd> {
        if self.lifetime_end <= now {
            Some(PathEnd::Lifetime)
        } else if self.ends(idle) <= now {
            Some(PathEnd::Idle)
        } else {
            None
        }
    }

    /// The side bound to `remote`, if any.
    fn side_of(&self, remote: SocketAddr) -> Option<Side> {
        [Side::A, Side::B]
            .into_iter()
            .find(|s| self.sides.get(*s).is_some_and(|b| b.at.addr == remote))
    }

    fn status(&self, path_id: u32, dc_key_id: u32, idle: Duration) -> RelayPathStatus {
        RelayPathStatus {
            path_id,
            dc_key_id,
            side_a: self.sides.a.map(|b| b.at),
            side_b: self.sides.b.map(|b| b.at),
            rate_limit_kbps: self.rate_limit_kbps,
            a_to_b: self.forwarded.a,
            b_to_a: self.forwarded.b,
            rate_limited: self.rate_limited,
            last_activity: self.last_activity,
            ends: self.ends(idle),
        }
    }
}

/// An ended path: its K_rel, kept to answer ERROR Expired.
struct ExpiredPath {
    key: SignalingKey,
    dc: usize,
    txid: u32,
    forget_at: Time,
}

/// The message types the RS forwards between the sides (spec/05 §5.6, "Forwarding").
fn forwarded(t: MessageType) -> bool {
    matches!(
        t,
        MessageType::TunnelRequest
            | MessageType::TunnelResponse
            | MessageType::PathUpdate
            | MessageType::TunnelClose
            | MessageType::Keepalive
            | MessageType::KeepaliveReply
            | MessageType::Ack
            | MessageType::Error
    )
}

/// The forwarded types the RS answers with ERROR PeerNotBound while the other side is unbound.
/// KEEPALIVE(`reply_requested = 1`) is also listed by the spec, but `reply_requested` is inside
/// the end-to-end sealed body: the RS cannot tell it from `reply_requested = 0`, which must never
/// be answered, so it drops every KEEPALIVE silently.
fn answered_when_unbound(t: MessageType) -> bool {
    matches!(
        t,
        MessageType::TunnelRequest
            | MessageType::TunnelResponse
            | MessageType::PathUpdate
            | MessageType::TunnelClose
    )
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

fn refusal_code(e: &WireError) -> ErrorCode {
    match e {
        WireError::UnknownCriticalExtension(_) => ErrorCode::UnknownCriticalExtension,
        _ => ErrorCode::Malformed,
    }
}

/// The relay server. See the [module documentation](self).
pub struct RelayServer {
    config: RsConfig,
    relay_addrs: AddrList,
    dc_keys: Vec<SignalingKey>,
    paths: BTreeMap<u32, RelayPath>,
    /// Every live path once, at or before the time it ends; moved later when it turns out to
    /// have been active (so forwarding never touches this index).
    path_deadlines: BTreeSet<(Time, u32)>,
    /// Sum of the live paths' rate limits, kbit/s.
    committed_kbps: u64,
    expired: BTreeMap<u32, ExpiredPath>,
    forget_deadlines: BTreeSet<(Time, u32)>,
    forwarded: Traffic,
    output: ServerOutput<RsEvent>,
    drops: RelayDropCounters,
}

impl fmt::Debug for RelayServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelayServer")
            .field("relay_addrs", &self.config.relay_addrs)
            .field("paths", &self.paths.len())
            .field("expired", &self.expired.len())
            .field("forwarded", &self.forwarded)
            .field("drops", &self.drops)
            .finish_non_exhaustive()
    }
}

impl RelayServer {
    /// Checks the configuration and starts with an empty relay table.
    pub fn new(config: RsConfig) -> Result<Self, RsConfigError> {
        let addrs = &config.relay_addrs;
        let distinct = addrs
            .iter()
            .enumerate()
            .all(|(i, a)| !addrs.iter().skip(i + 1).any(|b| b == a));
        if addrs.is_empty() || !distinct {
            return Err(RsConfigError::RelayAddresses);
        }
        let relay_addrs = AddrList::new(addrs.iter().map(|a| TransportAddr::new(*a)).collect())
            .map_err(|_| RsConfigError::RelayAddresses)?;
        if config.dc_keys.is_empty() {
            return Err(RsConfigError::NoDcKey);
        }
        for (i, k) in config.dc_keys.iter().enumerate() {
            let reused = config
                .dc_keys
                .iter()
                .skip(i + 1)
                .any(|o| o.key_id == k.key_id);
            if k.key_id == 0 || reused {
                return Err(RsConfigError::InvalidDcKeyId(k.key_id));
            }
        }
        if config.limits.max_paths == 0 {
            return Err(RsConfigError::NoCapacity);
        }
        if config.default_rate_limit_kbps == 0 {
            return Err(RsConfigError::NoDefaultRate);
        }
        if !(Duration::from_secs(60)..=Duration::from_secs(600)).contains(&config.idle_expiry) {
            return Err(RsConfigError::InvalidIdleExpiry);
        }
        let l = config.limits;
        let dc_keys = config
            .dc_keys
            .iter()
            .map(|k| {
                SignalingKey::resume(
                    &k.key,
                    k.key_id,
                    Role::B,
                    k.high_water_mark,
                    l.sequence_block,
                )
            })
            .collect();
        Ok(RelayServer {
            relay_addrs,
            dc_keys,
            paths: BTreeMap::new(),
            path_deadlines: BTreeSet::new(),
            committed_kbps: 0,
            expired: BTreeMap::new(),
            forget_deadlines: BTreeSet::new(),
            forwarded: Traffic::default(),
            output: ServerOutput::new(
                l.max_queued_transmits,
                l.max_queued_events,
                l.unsealed_errors_per_second,
                l.max_tracked_prefixes,
            ),
            drops: RelayDropCounters::default(),
            config,
        })
    }

    pub fn config(&self) -> &RsConfig {
        &self.config
    }

    /// Datagrams dropped, by reason.
    pub fn drops(&self) -> &RelayDropCounters {
        &self.drops
    }

    /// Everything forwarded since the start.
    pub fn forwarded(&self) -> Traffic {
        self.forwarded
    }

    /// Events lost because the queue was full.
    pub fn events_lost(&self) -> u64 {
        self.output.events_lost()
    }

    /// Live paths in the relay table.
    pub fn path_count(&self) -> usize {
        self.paths.len()
    }

    /// The load the next RELAY_RESPONSE reports (see the module documentation).
    pub fn load_permille(&self) -> u16 {
        let per = |used: u64, capacity: u64| used.saturating_mul(1000) / capacity.max(1);
        let paths = per(self.paths.len() as u64, self.config.limits.max_paths as u64);
        let rates = if self.config.bandwidth_kbps == 0 {
            0
        } else {
            per(self.committed_kbps, self.config.bandwidth_kbps)
        };
        u16::try_from(paths.max(rates)).unwrap_or(u16::MAX)
    }

    /// The live paths, in Path ID order.
    pub fn paths(&self) -> impl Iterator<Item = RelayPathStatus> + '_ {
        let idle = self.config.idle_expiry;
        self.paths.iter().map(move |(id, p)| {
            let dc_key_id = self.dc_keys.get(p.dc).map_or(0, SignalingKey::key_id);
            p.status(*id, dc_key_id, idle)
        })
    }

    /// One live path.
    pub fn path(&self, path_id: u32) -> Option<RelayPathStatus> {
        let p = self.paths.get(&path_id)?;
        let dc_key_id = self.dc_keys.get(p.dc).map_or(0, SignalingKey::key_id);
        Some(p.status(path_id, dc_key_id, self.config.idle_expiry))
    }

    /// A datagram arrived at `local` from `remote`: the uniform entry point. A forwarded
    /// datagram is copied into the outbox; a runtime that can send `buf` itself should call
    /// [`RelayServer::relay`] instead.
    pub fn handle_datagram<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        buf: &mut [u8],
        rng: &mut R,
    ) {
        if let RelayDecision::Forward { src, dst } = self.relay(now, local, remote, buf, rng) {
            self.output.queue(Some(src), dst, Ok(buf.to_vec()));
        }
    }

    /// The data path: decides what to do with a datagram that arrived at `local` from `remote`,
    /// and counts it. Never modifies `buf`; never allocates when it forwards.
    pub fn relay<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        buf: &[u8],
        rng: &mut R,
    ) -> RelayDecision {
        let decision = self.decide(now, local, remote, buf, rng);
        if let RelayDecision::Drop(reason) = &decision {
            self.drops.record(reason);
        }
        decision
    }

    fn decide<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        buf: &[u8],
        rng: &mut R,
    ) -> RelayDecision {
        if buf.first() == Some(&DATA_TYPE) {
            return match DataPacket::parse(buf) {
                Ok(p) => self.forward(now, local, remote, buf.len(), p.path_id(), None),
                Err(e) => RelayDecision::Drop(RelayDrop::Signaling(DropReason::Header(e))),
            };
        }
        let header = match self.output.intake(now, local, remote, buf, Role::B) {
            Ok(h) => h,
            Err(reason) => return RelayDecision::Drop(RelayDrop::Signaling(reason)),
        };
        let t = header.msg_type;
        if forwarded(t) {
            let path_id = header.envelope.key_id;
            return self.forward(now, local, remote, buf.len(), path_id, Some(&header));
        }
        if !matches!(t, MessageType::RelayRequest | MessageType::RelayBind) {
            return RelayDecision::Drop(RelayDrop::Signaling(DropReason::Unexpected));
        }
        // Opening works in place; the caller's bytes stay untouched. The header checks bounded
        // the length by MAX_SIGNALING_LEN.
        let mut scratch = [0u8; MAX_SIGNALING_LEN];
        let Some(datagram) = scratch.get_mut(..buf.len()) else {
            return RelayDecision::Drop(RelayDrop::Signaling(DropReason::Unexpected));
        };
        datagram.copy_from_slice(buf);
        let result = if t == MessageType::RelayRequest {
            self.on_relay_request(now, local, remote, datagram, &header, rng)
        } else {
            self.on_relay_bind(now, local, remote, datagram, &header)
        };
        match result {
            Ok(()) => RelayDecision::Consumed,
            Err(reason) => RelayDecision::Drop(reason),
        }
    }

    // -- Forwarding ----------------------------------------------------------------------------

    /// Forwards a DATA packet (`signaling` None) or a signaling message with its header role.
    fn forward(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        len: usize,
        path_id: u32,
        signaling: Option<&Header>,
    ) -> RelayDecision {
        let idle = self.config.idle_expiry;
        let Some(path) = self.paths.get_mut(&path_id) else {
            return RelayDecision::Drop(if self.expired.contains_key(&path_id) {
                RelayDrop::ExpiredPath
            } else {
                RelayDrop::UnknownPath
            });
        };
        if path.ended(now, idle).is_some() {
            // Ended, though handle_timeout has not run yet.
            return RelayDecision::Drop(RelayDrop::ExpiredPath);
        }
        let Some(from) = path.side_of(remote) else {
            return RelayDecision::Drop(RelayDrop::UnboundSource);
        };
        if let Some(header) = signaling {
            if Side::of(header.envelope.role) != Some(from) {
                return RelayDecision::Drop(RelayDrop::RoleMismatch);
            }
        }
        let Some(to) = *path.sides.get(from.other()) else {
            return match signaling {
                Some(header) => self.peer_not_bound(now, local, remote, len, path_id, header),
                None => RelayDecision::Drop(RelayDrop::PeerNotBound),
            };
        };
        if !path.buckets.get_mut(from).take(now, len) {
            path.rate_limited = path.rate_limited.saturating_add(1);
            return RelayDecision::Drop(RelayDrop::RateLimited);
        }
        path.forwarded.get_mut(from).add(len);
        path.last_activity = now;
        self.forwarded.add(len);
        RelayDecision::Forward {
            src: to.at.local,
            dst: to.at.addr,
        }
    }

    /// The sending side is bound, the other is not: ERROR PeerNotBound under K_rel for the
    /// messages §5.6 lists, as long as the answer is not larger than the message and the path has
    /// not used its share of answers this second; silence for the rest.
    fn peer_not_bound(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        len: usize,
        path_id: u32,
        header: &Header,
    ) -> RelayDecision {
        let per_second = self.config.limits.peer_not_bound_per_second;
        let Some(path) = self.paths.get_mut(&path_id) else {
            return RelayDecision::Drop(RelayDrop::UnknownPath);
        };
        let answerable =
            answered_when_unbound(header.msg_type) && header.sealed && len >= PEER_NOT_BOUND_LEN;
        if !answerable {
            return RelayDecision::Drop(RelayDrop::PeerNotBound);
        }
        let (start, count) = &mut path.answers;
        if now >= *start + Duration::from_secs(1) {
            *start = now;
            *count = 0;
        }
        if *count >= per_second {
            return RelayDecision::Drop(RelayDrop::PeerNotBound);
        }
        *count += 1;
        let error = error_msg(ErrorCode::PeerNotBound, header.msg_type);
        let datagram = path.key.seal_to_vec(&error, header.envelope.txid, None);
        self.output.queue(Some(local), remote, datagram);
        RelayDecision::Consumed
    }

    // -- From a DC -----------------------------------------------------------------------------

    fn on_relay_request<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        datagram: &mut [u8],
        header: &Header,
        rng: &mut R,
    ) -> Result<(), RelayDrop> {
        let key_id = header.envelope.key_id;
        let Some(dc) = self.dc_keys.iter().position(|k| k.key_id() == key_id) else {
            if header.sealed {
                self.output.unknown_key(now, local, remote, header, Role::B);
            }
            return Err(RelayDrop::Signaling(DropReason::UnknownKey));
        };
        let opened = match self.dc_keys.get_mut(dc).map(|k| k.open(datagram)) {
            Some(Ok(o)) => o,
            Some(Err(DropReason::UndecodableBody(e))) => {
                let error = error_msg(refusal_code(&e), MessageType::RelayRequest);
                self.send_to_dc(dc, local, remote, &error, header.envelope.txid);
                return Err(RelayDrop::Signaling(DropReason::UndecodableBody(e)));
            }
            Some(Err(e)) => return Err(RelayDrop::Signaling(e)),
            None => return Err(RelayDrop::Signaling(DropReason::UnknownKey)),
        };
        // The header checks let only ERROR through unsealed: this one was sealed.
        let (h, Message::RelayRequest(request)) = opened else {
            return Err(RelayDrop::Signaling(DropReason::Unexpected));
        };
        let txid = h.envelope.txid;
        let answer = match self.authorize(now, dc, txid, &request, rng) {
            Ok(load_permille) => RelayResponse {
                path_id: request.path_id,
                relay_addrs: self.relay_addrs.clone(),
                load_permille,
                extensions: Extensions::none(),
            }
            .into(),
            Err(code) => error_msg(code, MessageType::RelayRequest),
        };
        self.send_to_dc(dc, local, remote, &answer, txid);
        Ok(())
    }

    /// Puts the path in the relay table, or says why not; returns the load to report. A
    /// retransmission (same DC key, same transaction ID) gets the load first reported.
    fn authorize<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        dc: usize,
        txid: u32,
        r: &RelayRequest,
        rng: &mut R,
    ) -> Result<u16, ErrorCode> {
        if r.path_id == 0 || r.lifetime_s == 0 {
            return Err(ErrorCode::Malformed);
        }
        self.end_if_due(now, r.path_id);
        if let Some(p) = self.paths.get(&r.path_id) {
            return if p.dc == dc && p.txid == txid {
                Ok(p.load_answered)
            } else {
                // Another DC, or another request, for a Path ID in use here.
                Err(ErrorCode::RelayUnavailable)
            };
        }
        if let Some(e) = self.expired.get(&r.path_id) {
            if e.dc == dc && e.txid == txid {
                return Err(ErrorCode::Expired);
            }
            self.forget(r.path_id);
        }
        if self.paths.len() >= self.config.limits.max_paths {
            return Err(ErrorCode::RelayUnavailable);
        }
        let rate = match r.rate_limit_kbps {
            0 => self.config.default_rate_limit_kbps,
            n => n,
        };
        let burst = self.config.rate_burst;
        let start_seq = rng.next_u64() % KREL_SEQ_START_BOUND;
        let lifetime_end = now + Duration::from_secs(u64::from(r.lifetime_s));
        let ends = (now + self.config.idle_expiry).min(lifetime_end);
        let path = RelayPath {
            key: SignalingKey::resume(&r.relay_key, r.path_id, Role::Relay, start_seq, u64::MAX),
            dc,
            txid,
            load_answered: 0,
            rate_limit_kbps: rate,
            lifetime_end,
            last_activity: now,
            sides: PerSide::default(),
            buckets: PerSide {
                a: TokenBucket::new(now, rate, burst),
                b: TokenBucket::new(now, rate, burst),
            },
            forwarded: PerSide::default(),
            rate_limited: 0,
            answers: (now, 0),
            indexed_at: ends,
        };
        self.committed_kbps = self.committed_kbps.saturating_add(u64::from(rate));
        self.path_deadlines.insert((ends, r.path_id));
        self.paths.insert(r.path_id, path);
        let load = self.load_permille();
        if let Some(p) = self.paths.get_mut(&r.path_id) {
            p.load_answered = load;
        }
        let dc_key_id = self.dc_keys.get(dc).map_or(0, SignalingKey::key_id);
        self.output.event(RsEvent::PathAuthorized {
            path_id: r.path_id,
            dc_key_id,
            lifetime_s: r.lifetime_s,
            rate_limit_kbps: rate,
        });
        Ok(load)
    }

    fn send_to_dc(
        &mut self,
        dc: usize,
        local: SocketAddr,
        remote: SocketAddr,
        msg: &Message,
        txid: u32,
    ) {
        let Some(key) = self.dc_keys.get_mut(dc) else {
            self.output.seal_failed();
            return;
        };
        let datagram = key.seal_to_vec(msg, txid, None);
        if let Some(through) = key.take_reserved_through() {
            let key_id = key.key_id();
            self.output
                .event(RsEvent::SequenceReserved { key_id, through });
        }
        self.output.queue(Some(local), remote, datagram);
    }

    // -- From nodes ----------------------------------------------------------------------------

    fn on_relay_bind(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        datagram: &mut [u8],
        header: &Header,
    ) -> Result<(), RelayDrop> {
        let path_id = header.envelope.key_id;
        self.end_if_due(now, path_id);
        if let Some(e) = self.expired.get_mut(&path_id) {
            let (h, _) = e.key.open(datagram).map_err(RelayDrop::Signaling)?;
            let error = error_msg(ErrorCode::Expired, MessageType::RelayBind);
            let answer = e.key.seal_to_vec(&error, h.envelope.txid, None);
            self.output.queue(Some(local), remote, answer);
            return Ok(());
        }
        let Some(path) = self.paths.get_mut(&path_id) else {
            if header.sealed {
                self.output
                    .unknown_key(now, local, remote, header, Role::Relay);
            }
            return Err(RelayDrop::UnknownPath);
        };
        let h = match path.key.open(datagram) {
            Ok((h, _)) => h,
            Err(DropReason::UndecodableBody(e)) => {
                let error = error_msg(refusal_code(&e), MessageType::RelayBind);
                let answer = path.key.seal_to_vec(&error, header.envelope.txid, None);
                self.output.queue(Some(local), remote, answer);
                return Err(RelayDrop::Signaling(DropReason::UndecodableBody(e)));
            }
            Err(e) => return Err(RelayDrop::Signaling(e)),
        };
        // The own-role check refused role Relay; an unsealed RELAY_BIND fails the header checks.
        let Some(side) = Side::of(h.envelope.role) else {
            return Err(RelayDrop::Signaling(DropReason::Reflected));
        };
        let seq = h.envelope.seq;
        let current = *path.sides.get(side);
        if current.is_some_and(|b| seq <= b.seq) {
            return Err(RelayDrop::StaleBind);
        }
        if path
            .sides
            .get(side.other())
            .is_some_and(|b| b.at.addr == remote)
        {
            return Err(RelayDrop::BindConflict);
        }
        let at = BoundSide {
            addr: remote,
            local,
        };
        *path.sides.get_mut(side) = Some(Binding { at, seq });
        path.last_activity = now;
        let ack: Message = Ack {
            acked_type: MessageType::RelayBind.to_u8(),
            extensions: Extensions::none(),
        }
        .into();
        let answer = path.key.seal_to_vec(&ack, h.envelope.txid, None);
        self.output.queue(Some(local), remote, answer);
        if current.map(|b| b.at) != Some(at) {
            self.output.event(RsEvent::SideBound {
                path_id,
                side,
                addr: remote,
                local,
                rebound: current.is_some(),
            });
        }
        Ok(())
    }

    // -- Time and output -----------------------------------------------------------------------

    /// Ends `path_id` now if its time has come, so that signaling never acts on a path whose
    /// deadline passed before `handle_timeout` ran.
    fn end_if_due(&mut self, now: Time, path_id: u32) {
        let idle = self.config.idle_expiry;
        if let Some(why) = self.paths.get(&path_id).and_then(|p| p.ended(now, idle)) {
            self.end_path(now, path_id, why);
        }
    }

    /// Moves a live path to the expired table (K_rel kept for the grace period).
    fn end_path(&mut self, now: Time, path_id: u32, why: PathEnd) {
        let Some(p) = self.paths.remove(&path_id) else {
            return;
        };
        self.path_deadlines.remove(&(p.indexed_at, path_id));
        self.committed_kbps = self
            .committed_kbps
            .saturating_sub(u64::from(p.rate_limit_kbps));
        self.output.event(RsEvent::PathEnded {
            path_id,
            why,
            a_to_b: p.forwarded.a,
            b_to_a: p.forwarded.b,
        });
        let limits = self.config.limits;
        if limits.max_expired_paths == 0 {
            return;
        }
        while self.expired.len() >= limits.max_expired_paths {
            let Some((_, oldest)) = self.forget_deadlines.pop_first() else {
                break;
            };
            self.expired.remove(&oldest);
        }
        let forget_at = now + limits.expired_path_grace;
        self.forget_deadlines.insert((forget_at, path_id));
        self.expired.insert(
            path_id,
            ExpiredPath {
                key: p.key,
                dc: p.dc,
                txid: p.txid,
                forget_at,
            },
        );
    }

    fn forget(&mut self, path_id: u32) {
        if let Some(e) = self.expired.remove(&path_id) {
            self.forget_deadlines.remove(&(e.forget_at, path_id));
        }
    }

    /// Timers due at `now` fire: idle and lifetime expiry of paths, and the end of their grace.
    pub fn handle_timeout<R: RngCore + CryptoRng>(&mut self, now: Time, _rng: &mut R) {
        let idle = self.config.idle_expiry;
        while let Some(&(at, path_id)) = self.path_deadlines.first() {
            if at > now {
                break;
            }
            self.path_deadlines.remove(&(at, path_id));
            let Some(p) = self.paths.get_mut(&path_id) else {
                continue;
            };
            match p.ended(now, idle) {
                Some(why) => self.end_path(now, path_id, why),
                None => {
                    // Active since it was indexed: check again when it could end.
                    p.indexed_at = p.ends(idle);
                    self.path_deadlines.insert((p.indexed_at, path_id));
                }
            }
        }
        while let Some(&(at, path_id)) = self.forget_deadlines.first() {
            if at > now {
                break;
            }
            self.forget_deadlines.pop_first();
            self.expired.remove(&path_id);
        }
    }

    /// The next datagram to send, written into `buf` (as large as the largest datagram
    /// received: forwarded DATA may exceed [`MAX_SIGNALING_LEN`]).
    pub fn poll_transmit(&mut self, _now: Time, buf: &mut [u8]) -> Option<Transmit> {
        self.output.poll_transmit(buf)
    }

    pub fn poll_event(&mut self) -> Option<RsEvent> {
        self.output.poll_event()
    }

    /// The earliest deadline and what it is for. A path's deadline may come early (it was
    /// active since): `handle_timeout` then only moves it.
    pub fn poll_timeout(&self) -> Option<(Time, &'static str)> {
        let path = self.path_deadlines.first().map(|&(at, id)| {
            let lifetime = self.paths.get(&id).is_some_and(|p| p.lifetime_end <= at);
            let label = if lifetime {
                "relay path lifetime end"
            } else {
                "relay path idle expiry"
            };
            (at, label)
        });
        let forget = self
            .forget_deadlines
            .first()
            .map(|&(at, _)| (at, "expired relay path removal"));
        match (path, forget) {
            (Some(p), Some(f)) => Some(if f.0 < p.0 { f } else { p }),
            (p, f) => p.or(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ntm_wire::{
        seal_data, AeadKey, CloseReason, Fqdn, Keepalive, PublicKeyBytes, SignalingPacket,
        TunnelClose, TunnelRequest,
    };
    use rand_chacha::ChaCha8Rng;
    use rand_core::SeedableRng;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const DC_KEY_ID: u32 = 7;
    const P: u32 = 0x5a5a_0001;

    fn dc_secret(n: u8) -> SecretKey {
        SecretKey::from_bytes([n; 32])
    }

    fn k_rel(path_id: u32) -> SecretKey {
        SecretKey::from_bytes([path_id as u8 ^ 0x80; 32])
    }

    fn rs_v4() -> SocketAddr {
        SocketAddr::from(([203, 0, 113, 9], 4282))
    }

    fn rs_v6() -> SocketAddr {
        "[2001:db8:9::9]:4282".parse().unwrap()
    }

    fn dc_addr() -> SocketAddr {
        SocketAddr::from(([203, 0, 113, 2], 4281))
    }

    /// Node A's NAT mappings (IPv4).
    fn a_at(port: u16) -> SocketAddr {
        SocketAddr::from(([198, 51, 100, 1], port))
    }

    /// Node B's address (IPv6 or IPv4).
    fn b_v6() -> SocketAddr {
        "[2001:db8:b::2]:50002".parse().unwrap()
    }

    fn b_v4() -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], 50002))
    }

    fn config() -> RsConfig {
        RsConfig::new(
            vec![rs_v4(), rs_v6()],
            vec![DcKey {
                key: dc_secret(5),
                key_id: DC_KEY_ID,
                high_water_mark: 0,
            }],
        )
    }

    /// One node's end of a relayed path: K_rel as its side holds it.
    struct End {
        rel: SignalingKey,
        /// K_tun, to seal the end-to-end messages the RS forwards without opening.
        tun: SignalingKey,
        path_id: u32,
    }

    impl End {
        fn new(path_id: u32, side: Side) -> End {
            let role = match side {
                Side::A => Role::A,
                Side::B => Role::B,
            };
            End {
                rel: SignalingKey::new(&k_rel(path_id), path_id, role),
                tun: SignalingKey::new(&SecretKey::from_bytes([9; 32]), path_id, role),
                path_id,
            }
        }

        fn bind(&mut self, txid: u32) -> Vec<u8> {
            let bind: Message = ntm_wire::RelayBind {
                extensions: Extensions::none(),
            }
            .into();
            self.rel.seal_to_vec(&bind, txid, None).unwrap()
        }

        fn tunnel_request(&mut self, txid: u32) -> Vec<u8> {
            let m: Message = TunnelRequest {
                ephemeral: PublicKeyBytes::from([1; 32]),
                sender_fqdn: Fqdn::new("mn.dc1.example").unwrap(),
                sender_virtual_v4: Ipv4Addr::new(100, 64, 1, 1),
                sender_virtual_v6: Ipv6Addr::LOCALHOST,
                extensions: Extensions::none(),
            }
            .into();
            self.tun.seal_to_vec(&m, txid, None).unwrap()
        }

        fn sealed(&mut self, m: Message, txid: u32) -> Vec<u8> {
            self.tun.seal_to_vec(&m, txid, None).unwrap()
        }

        fn data(&self, counter: u64, inner_len: usize) -> Vec<u8> {
            let mut buf = vec![0u8; inner_len + ntm_wire::DATA_OVERHEAD];
            for (i, b) in buf.iter_mut().enumerate() {
                *b = i as u8;
            }
            let key = AeadKey::new(&SecretKey::from_bytes([11; 32]));
            let n = seal_data(&key, self.path_id, counter, false, &mut buf, inner_len).unwrap();
            buf.truncate(n);
            buf
        }
    }

    /// An RS with a DC's end of the DC↔RS key, driven by hand.
    struct Bench {
        rs: RelayServer,
        rng: ChaCha8Rng,
        dc: SignalingKey,
        now: Time,
    }

    impl Bench {
        fn new(config: RsConfig) -> Self {
            Bench {
                rs: RelayServer::new(config).unwrap(),
                rng: ChaCha8Rng::seed_from_u64(1),
                dc: SignalingKey::new(&dc_secret(5), DC_KEY_ID, Role::A),
                now: Time::ZERO,
            }
        }

        fn at(&mut self, secs: u64) {
            self.now = Time::from_secs(secs);
            self.rs.handle_timeout(self.now, &mut self.rng);
        }

        /// Feeds `d` to the data path; returns the decision and everything polled after it.
        fn deliver(
            &mut self,
            local: SocketAddr,
            remote: SocketAddr,
            d: &[u8],
        ) -> (RelayDecision, Vec<(SocketAddr, SocketAddr, Vec<u8>)>) {
            let decision = self.rs.relay(self.now, local, remote, d, &mut self.rng);
            (decision, self.drain())
        }

        fn drain(&mut self) -> Vec<(SocketAddr, SocketAddr, Vec<u8>)> {
            let mut buf = [0u8; 2048];
            std::iter::from_fn(|| {
                self.rs
                    .poll_transmit(self.now, &mut buf)
                    .map(|t| (t.src.unwrap(), t.dst, buf[..t.len].to_vec()))
            })
            .collect()
        }

        fn events(&mut self) -> Vec<RsEvent> {
            std::iter::from_fn(|| self.rs.poll_event()).collect()
        }

        fn relay_request(&mut self, path_id: u32, lifetime_s: u32, rate: u32) -> Message {
            RelayRequest {
                path_id,
                relay_key: k_rel(path_id),
                lifetime_s,
                rate_limit_kbps: rate,
                extensions: Extensions::none(),
            }
            .into()
        }

        /// Sends a RELAY_REQUEST as the DC; returns the RS's opened answer, if any.
        fn request(&mut self, path_id: u32, lifetime_s: u32, rate: u32, txid: u32) -> Message {
            let m = self.relay_request(path_id, lifetime_s, rate);
            let d = self.dc.seal_to_vec(&m, txid, None).unwrap();
            let (decision, mut out) = self.deliver(rs_v4(), dc_addr(), &d);
            assert_eq!(decision, RelayDecision::Consumed);
            assert_eq!(out.len(), 1, "one answer per RELAY_REQUEST");
            let (src, dst, mut answer) = out.remove(0);
            assert_eq!((src, dst), (rs_v4(), dc_addr()));
            let (h, msg) = self.dc.open(&mut answer).unwrap();
            assert_eq!((h.envelope.txid, h.envelope.role), (txid, Role::B));
            msg
        }

        fn authorize(&mut self, path_id: u32) {
            let answer = self.request(path_id, 86_400, 0, path_id);
            assert!(matches!(answer, Message::RelayResponse(_)), "{answer:?}");
        }

        /// `end` binds its side from `from` to RS address `to`; returns the opened answers.
        fn bind(&mut self, end: &mut End, from: SocketAddr, to: SocketAddr) -> Vec<Message> {
            let txid = self.rng.next_u32();
            let d = end.bind(txid);
            let (_, out) = self.deliver(to, from, &d);
            out.into_iter()
                .map(|(src, dst, mut a)| {
                    assert_eq!((src, dst), (to, from), "answered where the bind came from");
                    let (h, m) = end.rel.open(&mut a).unwrap();
                    assert!(h.sealed);
                    assert_eq!((h.envelope.txid, h.envelope.role), (txid, Role::Relay));
                    m
                })
                .collect()
        }

        /// Authorizes P and binds A over IPv4 from `a_at(40001)`, B over IPv6.
        fn relayed_path(&mut self) -> (End, End) {
            self.authorize(P);
            let (mut a, mut b) = (End::new(P, Side::A), End::new(P, Side::B));
            assert_eq!(self.bind(&mut b, b_v6(), rs_v6()).len(), 1);
            assert_eq!(self.bind(&mut a, a_at(40001), rs_v4()).len(), 1);
            (a, b)
        }
    }

    fn acked(m: &Message) -> bool {
        matches!(
            m,
            Message::Ack(Ack {
                acked_type: 0x44,
                ..
            })
        )
    }

    fn error_code(m: &Message) -> Option<ErrorCode> {
        match m {
            Message::Error(e) => Some(e.code),
            _ => None,
        }
    }

    #[test]
    fn a_relay_request_under_the_dc_key_authorizes_the_path_and_a_retransmission_gets_the_same_answer(
    ) {
        let mut cfg = config();
        cfg.limits.max_paths = 4;
        let mut bench = Bench::new(cfg);
        let first = bench.request(P, 3600, 0, 42);
        let Message::RelayResponse(r) = &first else {
            panic!("{first:?}")
        };
        assert_eq!(r.path_id, P);
        let addrs: Vec<SocketAddr> = r
            .relay_addrs
            .as_slice()
            .iter()
            .map(|a| a.socket_addr())
            .collect();
        assert_eq!(
            addrs,
            vec![rs_v4(), rs_v6()],
            "one address per family served"
        );
        assert_eq!(r.load_permille, 250, "one path of four");
        assert_eq!(
            bench.events(),
            vec![
                RsEvent::PathAuthorized {
                    path_id: P,
                    dc_key_id: DC_KEY_ID,
                    lifetime_s: 3600,
                    rate_limit_kbps: 10_000
                },
                // The first seal under the DC key reserves a block (spec/04 §4.7).
                RsEvent::SequenceReserved {
                    key_id: DC_KEY_ID,
                    through: 1 << 16
                }
            ]
        );

        bench.authorize(P + 1);
        assert_eq!(bench.rs.load_permille(), 500);
        let again = bench.request(P, 3600, 0, 42);
        assert_eq!(
            again, first,
            "a retransmission gets the load first reported"
        );
        assert_eq!(bench.rs.path_count(), 2);
        assert!(bench.events().len() == 1, "only P + 1 was new");

        let conflict = bench.request(P, 3600, 0, 43);
        assert_eq!(error_code(&conflict), Some(ErrorCode::RelayUnavailable));
    }

    #[test]
    fn only_a_configured_dc_key_authorizes_a_path() {
        let mut bench = Bench::new(config());
        // Right key ID, wrong secret: authentication fails, nothing is answered or recorded.
        let mut forger = SignalingKey::new(&dc_secret(6), DC_KEY_ID, Role::A);
        let m = bench.relay_request(P, 3600, 0);
        let d = forger.seal_to_vec(&m, 1, None).unwrap();
        let (decision, out) = bench.deliver(rs_v4(), dc_addr(), &d);
        assert_eq!(
            decision,
            RelayDecision::Drop(RelayDrop::Signaling(DropReason::AuthenticationFailed))
        );
        assert!(out.is_empty());
        // A key ID the RS does not hold: only the unsealed hint, nothing recorded.
        let mut stranger = SignalingKey::new(&dc_secret(5), DC_KEY_ID + 1, Role::A);
        let d = stranger.seal_to_vec(&m, 2, None).unwrap();
        let (_, out) = bench.deliver(rs_v4(), dc_addr(), &d);
        assert_eq!(out.len(), 1);
        let p = SignalingPacket::parse(&out[0].2).unwrap();
        assert!(!p.header().sealed);
        assert_eq!(
            error_code(&p.decode_plain().unwrap()),
            Some(ErrorCode::UnknownKey)
        );
        // A node holding K_rel cannot authorize either: RELAY_REQUEST is opened with DC keys only.
        let mut node = SignalingKey::new(&k_rel(P), P, Role::A);
        let d = node.seal_to_vec(&m, 3, None).unwrap();
        bench.deliver(rs_v4(), a_at(40001), &d);

        assert_eq!(bench.rs.path_count(), 0);
        assert!(bench.events().is_empty());
        let mut a = End::new(P, Side::A);
        let d = a.bind(4);
        let (decision, out) = bench.deliver(rs_v4(), a_at(40001), &d);
        assert_eq!(decision, RelayDecision::Drop(RelayDrop::UnknownPath));
        assert!(
            !SignalingPacket::parse(&out[0].2).unwrap().header().sealed,
            "the bind draws the unsealed hint, not an ACK"
        );
        assert_eq!(bench.rs.drops().get("authentication_failed"), 1);
    }

    #[test]
    fn data_and_signaling_are_forwarded_both_ways_byte_for_byte() {
        let mut bench = Bench::new(config());
        let (mut a, mut b) = bench.relayed_path();
        let request = a.tunnel_request(1);
        let (decision, out) = bench.deliver(rs_v4(), a_at(40001), &request);
        assert_eq!(
            decision,
            RelayDecision::Forward {
                src: rs_v6(),
                dst: b_v6()
            }
        );
        assert!(out.is_empty(), "the data path returns, it does not queue");
        // B opens what A sealed: the RS changed nothing.
        let mut got = request.clone();
        assert!(matches!(
            b.tun.open(&mut got).unwrap().1,
            Message::TunnelRequest(_)
        ));

        // Through the uniform contract, the outbox holds the very bytes.
        let data = b.data(0, 200);
        let mut copy = data.clone();
        bench
            .rs
            .handle_datagram(bench.now, rs_v6(), b_v6(), &mut copy, &mut bench.rng);
        assert_eq!(copy, data);
        let out = bench.drain();
        assert_eq!(out, vec![(rs_v4(), a_at(40001), data.clone())]);

        let status = bench.rs.path(P).unwrap();
        assert_eq!(
            status.a_to_b,
            Traffic {
                datagrams: 1,
                bytes: request.len() as u64
            }
        );
        assert_eq!(
            status.b_to_a,
            Traffic {
                datagrams: 1,
                bytes: data.len() as u64
            }
        );
        assert_eq!(
            bench.rs.forwarded(),
            Traffic {
                datagrams: 2,
                bytes: (request.len() + data.len()) as u64
            }
        );
        assert_eq!(bench.rs.drops().total(), 0);
    }

    #[test]
    fn a_side_bound_over_ipv4_is_relayed_to_a_side_bound_over_ipv6_and_back() {
        let mut bench = Bench::new(config());
        let (a, b) = bench.relayed_path();
        let status = bench.rs.path(P).unwrap();
        assert_eq!(
            status.side_a,
            Some(BoundSide {
                addr: a_at(40001),
                local: rs_v4()
            })
        );
        assert_eq!(
            status.side_b,
            Some(BoundSide {
                addr: b_v6(),
                local: rs_v6()
            })
        );
        let (to_b, _) = bench.deliver(rs_v4(), a_at(40001), &a.data(0, 100));
        assert_eq!(
            to_b,
            RelayDecision::Forward {
                src: rs_v6(),
                dst: b_v6()
            }
        );
        let (to_a, _) = bench.deliver(rs_v6(), b_v6(), &b.data(0, 100));
        assert_eq!(
            to_a,
            RelayDecision::Forward {
                src: rs_v4(),
                dst: a_at(40001)
            }
        );
    }

    #[test]
    fn with_the_peer_unbound_the_rs_answers_peer_not_bound_under_k_rel_and_drops_the_rest() {
        let mut bench = Bench::new(config());
        bench.authorize(P);
        let mut a = End::new(P, Side::A);
        let answers = bench.bind(&mut a, a_at(40001), rs_v4());
        assert!(
            acked(&answers[0]),
            "a bind is ACKed while the other side is unbound"
        );

        let request = a.tunnel_request(77);
        let (decision, mut out) = bench.deliver(rs_v4(), a_at(40001), &request);
        assert_eq!(decision, RelayDecision::Consumed);
        assert_eq!(out.len(), 1);
        let (src, dst, ref mut answer) = out[0];
        assert_eq!((src, dst), (rs_v4(), a_at(40001)));
        let (h, m) = a.rel.open(answer).unwrap();
        assert_eq!(
            (h.envelope.role, h.envelope.key_id, h.envelope.txid),
            (Role::Relay, P, 77)
        );
        assert!(matches!(
            m,
            Message::Error(ErrorMsg {
                code: ErrorCode::PeerNotBound,
                failed_type: 0x40,
                ..
            })
        ));

        // Never answered: DATA, KEEPALIVE (reply_requested is sealed end to end), ACK, and a
        // TUNNEL_CLOSE shorter than the answer would be.
        let keepalive = a.sealed(
            Keepalive {
                reply_requested: true,
                extensions: Extensions::none(),
            }
            .into(),
            78,
        );
        let ack = a.sealed(
            Ack {
                acked_type: 0x41,
                extensions: Extensions::none(),
            }
            .into(),
            79,
        );
        let close = a.sealed(
            TunnelClose {
                reason: CloseReason::Normal,
                extensions: Extensions::none(),
            }
            .into(),
            80,
        );
        assert!(close.len() < PEER_NOT_BOUND_LEN);
        for d in [a.data(0, 64), keepalive, ack, close] {
            let (decision, out) = bench.deliver(rs_v4(), a_at(40001), &d);
            assert_eq!(decision, RelayDecision::Drop(RelayDrop::PeerNotBound));
            assert!(out.is_empty());
        }
        assert_eq!(bench.rs.drops().get("peer_not_bound"), 4);
    }

    #[test]
    fn peer_not_bound_answers_are_limited_per_path_and_second() {
        let mut bench = Bench::new(config());
        bench.authorize(P);
        let mut a = End::new(P, Side::A);
        bench.bind(&mut a, a_at(40001), rs_v4());
        let mut answered = 0;
        for txid in 0..25 {
            let (_, out) = bench.deliver(rs_v4(), a_at(40001), &a.tunnel_request(txid));
            answered += out.len();
        }
        assert_eq!(answered, 10);
        bench.at(1);
        let (_, out) = bench.deliver(rs_v4(), a_at(40001), &a.tunnel_request(99));
        assert_eq!(out.len(), 1, "a new second, a new share");
    }

    #[test]
    fn a_path_id_the_dc_never_authorized_is_refused_with_rate_limited_unsealed_unknown_key() {
        let mut bench = Bench::new(config());
        let mut a = End::new(P, Side::A);
        let mut hints = Vec::new();
        for _ in 0..25 {
            let d = a.bind(1);
            let (decision, out) = bench.deliver(rs_v4(), a_at(40001), &d);
            assert_eq!(decision, RelayDecision::Drop(RelayDrop::UnknownPath));
            hints.extend(out);
        }
        assert_eq!(
            hints.len(),
            10,
            "at most 10 unsealed ERRORs per second per prefix"
        );
        let p = SignalingPacket::parse(&hints[0].2).unwrap();
        let h = p.header();
        assert!(!h.sealed);
        assert_eq!(
            (h.envelope.role, h.envelope.key_id, h.envelope.txid),
            (Role::Relay, P, 1)
        );
        assert_eq!(
            error_code(&p.decode_plain().unwrap()),
            Some(ErrorCode::UnknownKey)
        );
        assert!(
            hints[0].2.len() < a.bind(1).len(),
            "the hint is smaller than the bind"
        );

        let (decision, out) = bench.deliver(rs_v4(), a_at(40001), &a.data(0, 64));
        assert_eq!(decision, RelayDecision::Drop(RelayDrop::UnknownPath));
        assert!(out.is_empty());
        let (decision, _) = bench.deliver(rs_v4(), a_at(40001), &a.tunnel_request(5));
        assert_eq!(decision, RelayDecision::Drop(RelayDrop::UnknownPath));
        assert_eq!(bench.rs.forwarded(), Traffic::default());
    }

    #[test]
    fn a_replayed_or_older_relay_bind_cannot_move_a_side() {
        let mut bench = Bench::new(config());
        let (mut a, _b) = bench.relayed_path();
        let old = a.bind(500); // sealed now, delivered late (seq below the next one)
        let captured = a.bind(501);
        let (decision, out) = bench.deliver(rs_v4(), a_at(40002), &captured);
        assert_eq!(decision, RelayDecision::Consumed);
        assert_eq!(out.len(), 1);
        assert_eq!(bench.rs.path(P).unwrap().side_a.unwrap().addr, a_at(40002));

        // An attacker replays the captured bind from its own address.
        let attacker = SocketAddr::from(([198, 51, 100, 66], 666));
        let (decision, out) = bench.deliver(rs_v4(), attacker, &captured);
        assert_eq!(
            decision,
            RelayDecision::Drop(RelayDrop::Signaling(DropReason::Replayed(
                ntm_wire::Replay::Duplicate
            )))
        );
        assert!(out.is_empty());
        // The older bind authenticates (its number is new to the window) but is not newer than
        // the side's last accepted bind.
        let (decision, out) = bench.deliver(rs_v4(), a_at(40001), &old);
        assert_eq!(decision, RelayDecision::Drop(RelayDrop::StaleBind));
        assert!(out.is_empty());
        assert_eq!(bench.rs.path(P).unwrap().side_a.unwrap().addr, a_at(40002));
    }

    #[test]
    fn a_relay_bind_from_a_new_address_rebinds_the_side_and_data_follows_the_handover() {
        let mut bench = Bench::new(config());
        let (mut a, b) = bench.relayed_path();
        bench.events();
        // A moved from IPv4 to an IPv6 network: it binds again through the RS's IPv6 address.
        let a_new: SocketAddr = "[2001:db8:a::7]:41000".parse().unwrap();
        let answers = bench.bind(&mut a, a_new, rs_v6());
        assert!(acked(&answers[0]));
        assert_eq!(
            bench.events(),
            vec![RsEvent::SideBound {
                path_id: P,
                side: Side::A,
                addr: a_new,
                local: rs_v6(),
                rebound: true
            }]
        );
        let (decision, _) = bench.deliver(rs_v6(), b_v6(), &b.data(1, 100));
        assert_eq!(
            decision,
            RelayDecision::Forward {
                src: rs_v6(),
                dst: a_new
            }
        );
        let (decision, _) = bench.deliver(rs_v4(), a_at(40001), &a.data(1, 100));
        assert_eq!(decision, RelayDecision::Drop(RelayDrop::UnboundSource));
        let (decision, _) = bench.deliver(rs_v6(), a_new, &a.data(2, 100));
        assert_eq!(
            decision,
            RelayDecision::Forward {
                src: rs_v6(),
                dst: b_v6()
            }
        );
        // Refreshing the binding from the same address reports nothing new.
        bench.bind(&mut a, a_new, rs_v6());
        assert!(bench.events().is_empty());
    }

    #[test]
    fn a_header_role_that_is_not_the_sources_side_is_dropped_and_strangers_are_counted() {
        let mut bench = Bench::new(config());
        let (mut a, mut b) = bench.relayed_path();
        // B's role, sent from A's bound address.
        let from_b = b.tunnel_request(3);
        let (decision, out) = bench.deliver(rs_v4(), a_at(40001), &from_b);
        assert_eq!(decision, RelayDecision::Drop(RelayDrop::RoleMismatch));
        assert!(out.is_empty());
        let stranger = SocketAddr::from(([192, 0, 2, 200], 9999));
        let (decision, out) = bench.deliver(rs_v4(), stranger, &a.tunnel_request(4));
        assert_eq!(decision, RelayDecision::Drop(RelayDrop::UnboundSource));
        assert!(out.is_empty());
        bench.deliver(rs_v4(), stranger, &a.data(0, 10));
        assert_eq!(bench.rs.drops().get("role_mismatch"), 1);
        assert_eq!(bench.rs.drops().get("unbound_source"), 2);
        // A side cannot be bound to the other side's address.
        let answers = bench.bind(&mut b, a_at(40001), rs_v4());
        assert!(answers.is_empty());
        assert_eq!(bench.rs.drops().get("bind_conflict"), 1);
    }

    #[test]
    fn datagrams_beyond_the_paths_rate_are_dropped_and_counted() {
        let mut cfg = config();
        cfg.rate_burst = Duration::from_millis(100);
        let mut bench = Bench::new(cfg);
        // 80 kbit/s = 10 000 B/s; the burst is the 4096-byte minimum (100 ms would be 1000).
        let answer = bench.request(P, 3600, 80, 1);
        assert!(matches!(answer, Message::RelayResponse(_)));
        let (mut a, mut b) = (End::new(P, Side::A), End::new(P, Side::B));
        bench.bind(&mut a, a_at(40001), rs_v4());
        bench.bind(&mut b, b_v4(), rs_v4());
        let packet = a.data(0, 1000 - ntm_wire::DATA_OVERHEAD);
        let send = |bench: &mut Bench, from: SocketAddr| bench.deliver(rs_v4(), from, &packet).0;
        let forwarded: Vec<bool> = (0..5)
            .map(|_| matches!(send(&mut bench, a_at(40001)), RelayDecision::Forward { .. }))
            .collect();
        assert_eq!(forwarded, vec![true, true, true, true, false]);
        // The other direction has its own budget.
        assert!(matches!(
            send(&mut bench, b_v4()),
            RelayDecision::Forward { .. }
        ));
        // 100 ms later, 1000 bytes more.
        bench.now = Time::from_millis(100);
        assert!(matches!(
            send(&mut bench, a_at(40001)),
            RelayDecision::Forward { .. }
        ));
        assert_eq!(
            send(&mut bench, a_at(40001)),
            RelayDecision::Drop(RelayDrop::RateLimited)
        );
        let status = bench.rs.path(P).unwrap();
        assert_eq!((status.rate_limit_kbps, status.rate_limited), (80, 2));
        assert_eq!(status.a_to_b.datagrams, 5);
        assert_eq!(bench.rs.drops().get("rate_limited"), 2);
    }

    #[test]
    fn a_path_ends_120_s_after_its_last_forwarded_datagram_and_then_answers_expired() {
        let mut bench = Bench::new(config());
        let (mut a, _b) = bench.relayed_path();
        assert_eq!(
            bench.rs.poll_timeout(),
            Some((Time::from_secs(120), "relay path idle expiry"))
        );
        bench.at(100);
        assert!(matches!(
            bench.deliver(rs_v4(), a_at(40001), &a.data(0, 10)).0,
            RelayDecision::Forward { .. }
        ));
        bench.at(120);
        assert_eq!(
            bench.rs.path_count(),
            1,
            "the datagram at 100 s kept it alive"
        );
        assert_eq!(
            bench.rs.poll_timeout(),
            Some((Time::from_secs(220), "relay path idle expiry"))
        );
        bench.events();
        bench.at(219);
        assert_eq!(bench.rs.path_count(), 1);
        bench.at(220);
        assert_eq!(bench.rs.path_count(), 0);
        assert!(matches!(
            bench.events().as_slice(),
            [RsEvent::PathEnded {
                path_id: P,
                why: PathEnd::Idle,
                a_to_b: Traffic { datagrams: 1, .. },
                ..
            }]
        ));
        let (decision, _) = bench.deliver(rs_v4(), a_at(40001), &a.data(1, 10));
        assert_eq!(decision, RelayDecision::Drop(RelayDrop::ExpiredPath));
        let answers = bench.bind(&mut a, a_at(40001), rs_v4());
        assert_eq!(
            answers.iter().map(error_code).collect::<Vec<_>>(),
            vec![Some(ErrorCode::Expired)]
        );
        assert_eq!(
            bench.rs.poll_timeout(),
            Some((Time::from_secs(220 + 600), "expired relay path removal"))
        );
        bench.at(820);
        assert_eq!(bench.rs.poll_timeout(), None);
        let d = a.bind(9);
        let (decision, out) = bench.deliver(rs_v4(), a_at(40001), &d);
        assert_eq!(decision, RelayDecision::Drop(RelayDrop::UnknownPath));
        assert!(!SignalingPacket::parse(&out[0].2).unwrap().header().sealed);
    }

    #[test]
    fn the_expired_table_is_bounded_and_forgets_the_oldest_ended_path_first() {
        let mut cfg = config();
        cfg.limits.max_expired_paths = 1;
        let mut bench = Bench::new(cfg);
        bench.authorize(1);
        bench.at(60);
        bench.authorize(2);
        bench.at(120); // path 1 ends
        bench.at(180); // path 2 ends and pushes path 1 out
        let mut one = End::new(1, Side::A);
        let d = one.bind(1);
        let (decision, _) = bench.deliver(rs_v4(), a_at(40001), &d);
        assert_eq!(decision, RelayDecision::Drop(RelayDrop::UnknownPath));
        let mut two = End::new(2, Side::A);
        let answers = bench.bind(&mut two, a_at(40001), rs_v4());
        assert_eq!(
            answers.iter().map(error_code).collect::<Vec<_>>(),
            vec![Some(ErrorCode::Expired)]
        );
    }

    #[test]
    fn a_path_ends_at_its_lifetime_however_busy() {
        let mut bench = Bench::new(config());
        let answer = bench.request(P, 200, 0, 1);
        assert!(matches!(answer, Message::RelayResponse(_)));
        let (mut a, mut b) = (End::new(P, Side::A), End::new(P, Side::B));
        bench.bind(&mut a, a_at(40001), rs_v4());
        bench.bind(&mut b, b_v6(), rs_v6());
        for t in [60, 120, 180] {
            bench.at(t);
            assert!(matches!(
                bench.deliver(rs_v4(), a_at(40001), &a.data(t, 10)).0,
                RelayDecision::Forward { .. }
            ));
        }
        assert_eq!(
            bench.rs.poll_timeout(),
            Some((Time::from_secs(200), "relay path lifetime end"))
        );
        bench.events();
        bench.at(200);
        assert!(matches!(
            bench.events().as_slice(),
            [RsEvent::PathEnded {
                why: PathEnd::Lifetime,
                ..
            }]
        ));
        assert_eq!(bench.rs.path_count(), 0);
    }

    #[test]
    fn a_path_past_its_end_forwards_nothing_even_before_the_timer_runs() {
        let mut bench = Bench::new(config());
        let (a, _b) = bench.relayed_path();
        bench.now = Time::from_secs(500); // handle_timeout not called
        let (decision, _) = bench.deliver(rs_v4(), a_at(40001), &a.data(0, 10));
        assert_eq!(decision, RelayDecision::Drop(RelayDrop::ExpiredPath));
    }

    #[test]
    fn at_capacity_a_relay_request_is_refused_with_relay_unavailable() {
        let mut cfg = config();
        cfg.limits.max_paths = 2;
        let mut bench = Bench::new(cfg);
        bench.authorize(1);
        bench.authorize(2);
        assert_eq!(bench.rs.load_permille(), 1000);
        let refused = bench.request(3, 3600, 0, 3);
        assert_eq!(error_code(&refused), Some(ErrorCode::RelayUnavailable));
        assert_eq!(bench.rs.path_count(), 2);
        bench.at(120); // both idle out
        bench.authorize(3);
        assert_eq!(
            bench.rs.paths().map(|p| p.path_id).collect::<Vec<_>>(),
            vec![3]
        );
    }

    #[test]
    fn the_load_counts_granted_rates_against_the_bandwidth_when_configured() {
        let mut cfg = config();
        cfg.limits.max_paths = 100;
        cfg.bandwidth_kbps = 20_000;
        let mut bench = Bench::new(cfg);
        bench.authorize(1); // default 10 Mbit/s: half the bandwidth
        assert_eq!(bench.rs.load_permille(), 500);
        bench.request(2, 3600, 30_000, 2); // over-committed
        assert_eq!(bench.rs.load_permille(), 2000);
    }

    #[test]
    fn bad_configurations_are_refused() {
        let with = |f: &dyn Fn(&mut RsConfig)| {
            let mut c = config();
            f(&mut c);
            RelayServer::new(c).err()
        };
        assert_eq!(
            with(&|c| c.relay_addrs.clear()),
            Some(RsConfigError::RelayAddresses)
        );
        assert_eq!(
            with(&|c| c.relay_addrs.push(rs_v4())),
            Some(RsConfigError::RelayAddresses)
        );
        assert_eq!(with(&|c| c.dc_keys.clear()), Some(RsConfigError::NoDcKey));
        assert_eq!(
            with(&|c| c.dc_keys[0].key_id = 0),
            Some(RsConfigError::InvalidDcKeyId(0))
        );
        assert_eq!(
            with(&|c| c.limits.max_paths = 0),
            Some(RsConfigError::NoCapacity)
        );
        assert_eq!(
            with(&|c| c.default_rate_limit_kbps = 0),
            Some(RsConfigError::NoDefaultRate)
        );
        assert_eq!(
            with(&|c| c.idle_expiry = Duration::from_secs(30)),
            Some(RsConfigError::InvalidIdleExpiry)
        );
        assert_eq!(with(&|_| ()), None);
    }

    #[test]
    fn mutated_and_random_datagrams_never_panic_and_never_reach_an_unbound_address() {
        let mut bench = Bench::new(config());
        let (mut a, mut b) = bench.relayed_path();
        let m = bench.relay_request(P + 1, 3600, 0);
        let seeds = [
            a.bind(1),
            b.bind(2),
            a.tunnel_request(3),
            a.data(0, 64),
            b.data(0, 1400),
            bench.dc.seal_to_vec(&m, 4, None).unwrap(),
        ];
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let sources = [a_at(40001), b_v6(), a_at(40002), b_v4()];
        let locals = [rs_v4(), rs_v6()];
        for i in 0..20_000u32 {
            let mut d = seeds[i as usize % seeds.len()].clone();
            match rng.next_u32() % 4 {
                0 => {
                    let n = 1 + rng.next_u32() as usize % 4;
                    for _ in 0..n {
                        let at = rng.next_u32() as usize % d.len();
                        d[at] ^= 1 << (rng.next_u32() % 8);
                    }
                }
                1 => d.truncate(rng.next_u32() as usize % (d.len() + 1)),
                2 => {
                    d = vec![0u8; rng.next_u32() as usize % 1500];
                    rng.fill_bytes(&mut d);
                    if let Some(first) = d.first_mut() {
                        *first = [0x01, 0x38, 0x40, 0x44, 0x61][rng.next_u32() as usize % 5];
                    }
                    if let Some(v) = d.get_mut(1) {
                        *v = 1;
                    }
                }
                _ => {}
            }
            let local = locals[rng.next_u32() as usize % 2];
            let remote = sources[rng.next_u32() as usize % sources.len()];
            bench.now += Duration::from_millis(u64::from(rng.next_u32() % 50));
            if let RelayDecision::Forward { dst, src } =
                bench.rs.relay(bench.now, local, remote, &d, &mut bench.rng)
            {
                let bound: Vec<BoundSide> = bench
                    .rs
                    .paths()
                    .flat_map(|p| [p.side_a, p.side_b])
                    .flatten()
                    .collect();
                assert!(
                    bound.contains(&BoundSide {
                        addr: dst,
                        local: src
                    }),
                    "{dst} is not bound"
                );
                assert_ne!(dst, remote);
            }
            bench.rs.handle_timeout(bench.now, &mut bench.rng);
            bench.drain();
            bench.events();
        }
        assert!(bench.rs.drops().total() > 0);
    }

    mod allocations {
        use std::alloc::{GlobalAlloc, Layout, System};
        use std::cell::Cell;

        /// Counts allocations per thread, so the test below sees only its own.
        pub struct Counting;

        thread_local! {
            pub static COUNT: Cell<u64> = const { Cell::new(0) };
        }

        unsafe impl GlobalAlloc for Counting {
            unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
                let _ = COUNT.try_with(|c| c.set(c.get() + 1));
                // SAFETY: forwarded unchanged to the system allocator.
                unsafe { System.alloc(layout) }
            }
            unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
                // SAFETY: forwarded unchanged to the system allocator.
                unsafe { System.dealloc(ptr, layout) }
            }
        }

        #[global_allocator]
        static GLOBAL: Counting = Counting;

        pub fn count() -> u64 {
            COUNT.with(Cell::get)
        }
    }

    #[test]
    fn forwarding_and_relay_drops_do_not_allocate() {
        let mut bench = Bench::new(config());
        let (mut a, b) = bench.relayed_path();
        let data = a.data(0, 1200);
        let request = a.tunnel_request(1);
        let back = b.data(0, 100);
        let stranger = SocketAddr::from(([192, 0, 2, 200], 9999));
        let (now, rs, rng) = (bench.now, &mut bench.rs, &mut bench.rng);
        let before = allocations::count();
        for _ in 0..100 {
            assert!(matches!(
                rs.relay(now, rs_v4(), a_at(40001), &data, rng),
                RelayDecision::Forward { .. }
            ));
            assert!(matches!(
                rs.relay(now, rs_v4(), a_at(40001), &request, rng),
                RelayDecision::Forward { .. }
            ));
            assert!(matches!(
                rs.relay(now, rs_v6(), b_v6(), &back, rng),
                RelayDecision::Forward { .. }
            ));
            assert!(matches!(
                rs.relay(now, rs_v4(), stranger, &data, rng),
                RelayDecision::Drop(_)
            ));
        }
        assert_eq!(allocations::count() - before, 0);
    }
}
