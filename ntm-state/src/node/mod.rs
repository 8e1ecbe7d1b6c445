//! The NTMobile node as one sans-IO state machine: login (spec/05 §5.2), registration and its
//! upkeep (§5.3, §5.4), directions (§5.5, §5.6), tunnel establishment (§5.7), data (§5.8),
//! handover (§5.9), route optimization (§5.10), keep-alives and teardown (§5.16).
//!
//! ```text
//! application                         Node                               network
//!  resolve(fqdn) ─────────▶ DIRECTION_REQUEST ─────────────────────────▶ DC
//!                           ROUTE_DIRECTION ◀──────────────────────────── DC   (ACK back)
//!                           TUNNEL_REQUEST / RELAY_BIND ─────────────────▶ peer or RS
//!  NodeEvent::TunnelUp ◀─── TUNNEL_RESPONSE ◀─────────────────────────── peer or RS
//!  encapsulate(packet) ───▶ DATA (Path ID, counter, AES-GCM) ───────────▶ endpoint
//!  Received::Packet ◀────── handle_datagram(DATA) ◀───────────────────── endpoint
//!  handle_address_change ─▶ PATH_UPDATE, RELAY_BIND, REGISTRATION_REQUEST
//! ```
//!
//! # Driving it
//!
//! Call [`Node::start`] once; feed every datagram to [`Node::handle_datagram`] with the local
//! address it arrived on, and call [`Node::handle_timeout`] when the deadline of
//! [`Node::poll_timeout`] has passed. After each input drain [`Node::poll_event`] and then
//! [`Node::poll_transmit`]. Virtual IP packets from the application go through
//! [`Node::encapsulate`], which seals them into the caller's buffer and says where to send them
//! (no queue on the data path); a DATA datagram handed to [`Node::handle_datagram`] is opened in
//! place and returned as [`Received::Packet`], the range of the buffer holding the inner packet.
//!
//! # The tunnel table
//!
//! One tunnel per peer, found by the peer's virtual IPv4 and IPv6 addresses when sending and by
//! Path ID when receiving. A tunnel that replaces another for the same peer (a rebuild) takes
//! over its virtual addresses at once; the old one is kept 10 s for packets in flight. Directions
//! not yet turned into tunnels are *pending* (30 s), and a TUNNEL_REQUEST that outruns its
//! direction is held (at most 4, 2 s each).

use core::fmt;
use core::time::Duration;
use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ntm_wire::crypto::x25519_public;
use ntm_wire::{
    Ack, DirectionRequest, ErrorCode, Extensions, Fqdn, Header, Message, MessageType,
    RouteDirection, RouteKind, SecretKey, SignalingPacket,
};
use rand_core::{CryptoRng, RngCore};

use crate::login::{LoginClient, LoginConfig, LoginConfigError, LoginEvent, LoginFailure, Session};
use crate::registration::{Registrar, RegistrarConfig, RegistrationEvent, RegistrationFailure};
use crate::signaling::{
    DropCounters, DropReason, Expiry, Outbox, RetransmitConfig, RttTable, Transaction, Transmit,
};
use crate::time::Time;

mod tunnel;
use tunnel::{Pending, Tunnel};
mod servers;
pub use servers::{CacheStoreError, NsCommand, FETCH_BATCH};

/// The node's timers (spec/07 §7.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeTimers {
    /// How long a direction waits to become a tunnel: 30 s.
    pub pending_direction: Duration,
    /// How long a TUNNEL_REQUEST that outran its direction is held: 2 s.
    pub held_request: Duration,
    /// A direct attempt with reason SameNat gives up after: 1 s.
    pub same_nat_attempt: Duration,
    /// A tunnel with no DATA either way for this long is closed: 180 s.
    pub idle: Duration,
    /// A KEEPALIVE goes to the tunnel's endpoint after this much send silence: 25 s.
    pub keepalive: Duration,
    /// A keep-alive reply is missed after this (or 3 SRTT if larger): 1 s.
    pub reply_wait: Duration,
    /// Consecutive missed replies that declare a path failed: 3.
    pub missed_replies: u8,
    /// Probe spacing within a round: 1 s; a round lasts 10 s; rounds repeat every 5 min.
    pub probe_interval: Duration,
    pub probe_round: Duration,
    pub probe_repeat: Duration,
    /// A replaced tunnel is kept this long for packets in flight: 10 s.
    pub replaced_tunnel: Duration,
    /// A handover PATH_UPDATE the peer never acknowledged (and whose rebuild failed) is sent
    /// again this often while the tunnel stays: 5 s.
    pub move_retry: Duration,
    /// The first retry after a login or registration timed out: 1 s, doubling to 60 s.
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// Two rebuilt tunnels to one peer established within this of each other are duplicates
    /// (both ends rebuilt at once); the lower Path ID stays: 3 s.
    pub duplicate_tunnel: Duration,
    /// A KEEPALIVE goes on the NS push channel this often: 5 min.
    pub ns_keepalive: Duration,
    /// The NS's answer (to the connection, the subscription, a keep-alive) is missed after: 30 s.
    pub ns_reply_wait: Duration,
    /// The first reconnection to the NS waits 1 s, each next one twice as long, up to 60 s.
    pub ns_backoff_min: Duration,
    pub ns_backoff_max: Duration,
}

impl Default for NodeTimers {
    fn default() -> Self {
        NodeTimers {
            pending_direction: Duration::from_secs(30),
            held_request: Duration::from_secs(2),
            same_nat_attempt: Duration::from_secs(1),
            idle: Duration::from_secs(180),
            keepalive: Duration::from_secs(25),
            reply_wait: Duration::from_secs(1),
            missed_replies: 3,
            probe_interval: Duration::from_secs(1),
            probe_round: Duration::from_secs(10),
            probe_repeat: Duration::from_secs(300),
            replaced_tunnel: Duration::from_secs(10),
            duplicate_tunnel: Duration::from_secs(3),
            move_retry: Duration::from_secs(5),
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            ns_keepalive: Duration::from_secs(300),
            ns_reply_wait: Duration::from_secs(30),
            ns_backoff_min: Duration::from_secs(1),
            ns_backoff_max: Duration::from_secs(60),
        }
    }
}

/// Every bound on the node's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeLimits {
    /// Tunnels, replaced ones in their last seconds included.
    pub max_tunnels: usize,
    /// Directions waiting to become tunnels, and DIRECTION_REQUESTs in flight, each.
    pub max_pending: usize,
    /// TUNNEL_REQUESTs held for a direction that has not arrived: 4.
    pub max_held_requests: usize,
    /// Packets queued per peer while its tunnel is being built: 8.
    pub max_queued_packets: usize,
    /// Virtual address → FQDN pairs remembered for rebuilding a tunnel on the next packet.
    pub max_known_peers: usize,
    /// Static public keys of offline peers remembered for leaving them data.
    pub max_offline_peers: usize,
    /// CACHE_STOREs waiting for the CS's answer.
    pub max_cache_stores: usize,
    pub max_queued_transmits: usize,
    pub max_queued_events: usize,
    /// DATA packets sent under one key before the tunnel is closed and rebuilt with fresh keys:
    /// spec/07's hard stop, 2^23 + 2^20 (AES-GCM's confidentiality limit with a margin; an
    /// in-place rekey, spec/05 §5.15, is not implemented yet).
    pub key_packet_limit: u64,
}

impl Default for NodeLimits {
    fn default() -> Self {
        NodeLimits {
            max_tunnels: 1024,
            max_pending: 256,
            max_held_requests: 4,
            max_queued_packets: 8,
            max_known_peers: 4096,
            max_offline_peers: 64,
            max_cache_stores: 16,
            max_queued_transmits: 1024,
            max_queued_events: 1024,
            key_packet_limit: (1 << 23) + (1 << 20),
        }
    }
}

/// What the node needs.
#[derive(Clone)]
pub struct NodeConfig {
    pub login: LoginConfig,
    /// The node's own addresses, one socket per address (at most 8; no loopback, no
    /// link-local).
    pub local_addrs: Vec<SocketAddr>,
    /// The node's static X25519 secret (cache blobs are sealed to its public key).
    pub static_secret: SecretKey,
    pub wants_notification: bool,
    pub retransmit: RetransmitConfig,
    pub timers: NodeTimers,
    pub limits: NodeLimits,
}

impl fmt::Debug for NodeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeConfig")
            .field("login", &self.login)
            .field("local_addrs", &self.local_addrs)
            .finish_non_exhaustive()
    }
}

impl NodeConfig {
    /// The defaults of spec/07 for everything but the login, the addresses and the static key.
    pub fn new(login: LoginConfig, local_addrs: Vec<SocketAddr>, static_secret: SecretKey) -> Self {
        NodeConfig {
            login,
            local_addrs,
            static_secret,
            wants_notification: false,
            retransmit: RetransmitConfig::default(),
            timers: NodeTimers::default(),
            limits: NodeLimits::default(),
        }
    }
}

/// A configuration the node refuses.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum NodeConfigError {
    Login(LoginConfigError),
    /// No local address, or more than 8.
    Addresses,
}

impl fmt::Display for NodeConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeConfigError::Login(e) => write!(f, "login configuration: {e}"),
            NodeConfigError::Addresses => f.write_str("the node needs 1 to 8 local addresses"),
        }
    }
}

impl std::error::Error for NodeConfigError {}

/// How a tunnel's datagrams travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TunnelPath {
    /// Straight to the peer at this address.
    Direct(SocketAddr),
    /// Through the RS at this address.
    Relay(SocketAddr),
}

impl TunnelPath {
    /// Where the tunnel's datagrams go: the peer, or the RS.
    pub fn addr(self) -> SocketAddr {
        match self {
            TunnelPath::Direct(a) | TunnelPath::Relay(a) => a,
        }
    }
}

/// Why a tunnel went down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DownReason {
    /// The peer closed it (TUNNEL_CLOSE).
    ClosedByPeer,
    /// This node closed it.
    Closed,
    /// No DATA either way for the idle time.
    Idle,
    /// A newer tunnel to the same peer replaced it.
    Replaced,
    /// Its path failed and no rebuild succeeded.
    Failed,
}

/// Why an operation failed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum NodeError {
    Login(LoginFailure),
    Registration(RegistrationFailure),
    /// The DC refused a direction (NotFound, NoRoute, RelayUnavailable, ...).
    Direction {
        peer: Fqdn,
        code: ErrorCode,
    },
    /// No answer from the DC to a DIRECTION_REQUEST.
    DirectionTimeout {
        peer: Fqdn,
    },
    /// A tunnel could not be established on its direction, nor on a rebuilt one.
    Unreachable {
        peer: Fqdn,
    },
    /// The CS refused data left for `peer` (`code`), or never answered (`None`).
    CacheStore {
        peer: Fqdn,
        code: Option<ErrorCode>,
    },
    /// The CS refused a fetch (`code`), or never answered (`None`); the next announcement of
    /// cached data fetches again.
    CacheFetch {
        code: Option<ErrorCode>,
    },
    /// A cached blob from `from` did not open with the node's static secret.
    CachedDataUnreadable {
        from: Fqdn,
    },
}

/// What the node tells its application.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum NodeEvent {
    LoggedIn {
        fqdn: Fqdn,
    },
    /// A family registered (again); the virtual addresses never change.
    Registered {
        vip4: Ipv4Addr,
        vip6: Ipv6Addr,
        observed: SocketAddr,
    },
    /// A tunnel is up: the peer's virtual addresses are usable.
    TunnelUp {
        peer: Fqdn,
        path_id: u32,
        vip4: Ipv4Addr,
        vip6: Ipv6Addr,
        path: TunnelPath,
    },
    /// A tunnel's path changed (handover, route optimization, demotion).
    PathChanged {
        peer: Fqdn,
        path_id: u32,
        path: TunnelPath,
    },
    TunnelDown {
        peer: Fqdn,
        path_id: u32,
        reason: DownReason,
    },
    /// The peer exists but is offline; blobs sealed to `public_key` can be left at the CS.
    PeerOffline {
        peer: Fqdn,
        public_key: [u8; 32],
    },
    /// The CS took the data left for `peer` with [`Node::leave_for_offline_peer`].
    CacheStored {
        peer: Fqdn,
    },
    /// Data another node left at the CS while this one was offline. `from` is the sender as
    /// the CS asserts it; the sealed box itself does not authenticate its sender.
    CachedData {
        from: Fqdn,
        data: Vec<u8>,
    },
    /// The NS push channel came up (UDP keep-alives to the DC stop) or went down (they resume).
    PushChannel {
        up: bool,
    },
    Error(NodeError),
}

/// What [`Node::handle_datagram`] made of a datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Received {
    /// A DATA packet authenticated: the inner virtual IP packet is `buf[range]`.
    Packet(core::ops::Range<usize>),
    /// Signaling, taken (its effects are in the events and transmits).
    Consumed,
    /// Dropped without effect, for this reason (also counted in [`Node::drops`]).
    Dropped(DropReason),
}

/// Why [`Node::encapsulate`] did not produce a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendError {
    /// Not an IPv4 or IPv6 packet, or shorter than its header.
    NotIp,
    /// Larger than the virtual MTU.
    TooLarge,
    /// The source is not this node's virtual address.
    WrongSource,
    /// The destination is not a peer's virtual address this node knows.
    NoRoute,
    /// The tunnel is being built; the packet is queued (at most 8 per peer).
    Queued,
    /// The tunnel is being built and its queue is full: the packet is dropped.
    QueueFull,
    /// The output buffer is too small.
    BufferTooSmall,
    /// The tunnel's send key reached its packet limit; the tunnel is being closed and the next
    /// packet builds a new one.
    KeyExhausted,
}

/// Where the node stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Not started, or the login failed.
    Idle,
    LoggingIn,
    /// Logged in, no family registered yet.
    Registering,
    /// Registered in at least one family.
    Ready,
}

/// A DIRECTION_REQUEST in flight, by peer FQDN.
struct Lookup {
    tx: Transaction,
    rebuild_path_id: u32,
    local: SocketAddr,
}

/// The node. See the [module documentation](self).
pub struct Node {
    config: NodeConfig,
    static_public: [u8; 32],
    login: LoginClient,
    session: Option<Session>,
    registrar: Option<Registrar>,
    vaddrs: Option<(Ipv4Addr, Ipv6Addr)>,
    /// Peer virtual address → FQDN, for rebuilding on the next packet (spec/05 §5.8).
    known_peers: BTreeMap<IpAddr, Fqdn>,
    lookups: BTreeMap<Fqdn, Lookup>,
    /// When to log in or register again after a transient failure, and the current back-offs.
    retry_login_at: Option<Time>,
    retry_register_at: Option<Time>,
    login_backoff: Duration,
    register_backoff: Duration,
    /// Directions to ask for once the node is registered (a queued packet's peer, or a rebuild
    /// after a handover, which waits for the registration from the new address): the peer and
    /// the Path ID to rebuild (0 for none).
    wanted: Vec<(Fqdn, u32)>,
    /// Packets queued per peer FQDN while its tunnel is built.
    queued: BTreeMap<Fqdn, VecDeque<Vec<u8>>>,
    pending: BTreeMap<u32, Pending>,
    tunnels: BTreeMap<u32, Tunnel>,
    /// Peer virtual address → the Path ID of the peer's current tunnel.
    by_vaddr: BTreeMap<IpAddr, u32>,
    /// TUNNEL_REQUESTs that outran their direction: (held until, local, remote, datagram).
    held: VecDeque<(Time, SocketAddr, SocketAddr, Vec<u8>)>,
    rtt: RttTable,
    servers: servers::ServerState,
    outbox: Outbox,
    events: VecDeque<NodeEvent>,
    events_lost: u64,
    drops: DropCounters,
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("phase", &self.phase())
            .field("vaddrs", &self.vaddrs)
            .field("tunnels", &self.tunnels.len())
            .field("pending", &self.pending.len())
            .field("drops", &self.drops)
            .finish_non_exhaustive()
    }
}

/// The destination address of a virtual IP packet, if it is one.
pub(crate) fn inner_addrs(packet: &[u8]) -> Option<(IpAddr, IpAddr)> {
    match packet.first()? >> 4 {
        4 => {
            let s: [u8; 4] = packet.get(12..16)?.try_into().ok()?;
            let d: [u8; 4] = packet.get(16..20)?.try_into().ok()?;
            Some((IpAddr::from(s), IpAddr::from(d)))
        }
        6 => {
            let s: [u8; 16] = packet.get(8..24)?.try_into().ok()?;
            let d: [u8; 16] = packet.get(24..40)?.try_into().ok()?;
            Some((IpAddr::from(s), IpAddr::from(d)))
        }
        _ => None,
    }
}

impl Node {
    /// Checks the configuration; nothing is sent before [`Node::start`].
    pub fn new(config: NodeConfig, password: &[u8]) -> Result<Self, NodeConfigError> {
        if config.local_addrs.is_empty() || config.local_addrs.len() > ntm_wire::AddrList::MAX {
            return Err(NodeConfigError::Addresses);
        }
        let login =
            LoginClient::new(config.login.clone(), password).map_err(NodeConfigError::Login)?;
        let l = config.limits;
        Ok(Node {
            static_public: x25519_public(config.static_secret.expose()),
            login,
            session: None,
            registrar: None,
            vaddrs: None,
            known_peers: BTreeMap::new(),
            lookups: BTreeMap::new(),
            wanted: Vec::new(),
            retry_login_at: None,
            retry_register_at: None,
            login_backoff: Duration::ZERO,
            register_backoff: Duration::ZERO,
            queued: BTreeMap::new(),
            pending: BTreeMap::new(),
            tunnels: BTreeMap::new(),
            by_vaddr: BTreeMap::new(),
            held: VecDeque::new(),
            rtt: RttTable::new(64),
            servers: servers::ServerState::new(),
            outbox: Outbox::new(l.max_queued_transmits),
            events: VecDeque::new(),
            events_lost: 0,
            drops: DropCounters::default(),
            config,
        })
    }

    /// Logs in (and then registers).
    pub fn start<R: RngCore + CryptoRng>(&mut self, now: Time, rng: &mut R) {
        self.login.login(now, rng);
    }

    pub fn phase(&self) -> Phase {
        match (&self.registrar, self.login.is_logging_in()) {
            (Some(r), _) if r.is_registered() => Phase::Ready,
            (Some(_), _) => Phase::Registering,
            (None, true) => Phase::LoggingIn,
            (None, false) => Phase::Idle,
        }
    }

    /// The node's FQDN, once logged in.
    pub fn fqdn(&self) -> Option<&Fqdn> {
        self.session.as_ref().map(|s| &s.node_fqdn)
    }

    /// The node's virtual addresses, once registered.
    pub fn virtual_addrs(&self) -> Option<(Ipv4Addr, Ipv6Addr)> {
        self.vaddrs
    }

    /// The node's static X25519 public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.static_public
    }

    pub fn registrar(&self) -> Option<&Registrar> {
        self.registrar.as_ref()
    }

    /// Datagrams dropped, by reason.
    pub fn drops(&self) -> &DropCounters {
        &self.drops
    }

    pub fn events_lost(&self) -> u64 {
        self.events_lost
    }

    /// The next back-off of the login (or registration): the initial retry interval, doubling
    /// to the cap.
    fn backoff(&mut self, login: bool) -> Duration {
        let t = self.config.timers;
        let b = if login {
            &mut self.login_backoff
        } else {
            &mut self.register_backoff
        };
        *b = if b.is_zero() {
            t.retry_initial
        } else {
            b.saturating_mul(2).min(t.retry_max)
        };
        *b
    }

    fn event(&mut self, e: NodeEvent) {
        if self.events.len() >= self.config.limits.max_queued_events {
            self.events_lost += 1;
        } else {
            self.events.push_back(e);
        }
    }

    // -- Input ---------------------------------------------------------------------------------

    /// A datagram arrived at `local` from `remote`; `buf` is opened in place.
    pub fn handle_datagram<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        buf: &mut [u8],
        rng: &mut R,
    ) -> Received {
        let out = if buf.first() == Some(&ntm_wire::DATA_TYPE) {
            self.on_data(now, remote, buf)
        } else {
            let r = self
                .on_signaling(now, local, remote, buf, rng)
                .map(|()| Received::Consumed);
            self.servers_after_input(now, rng);
            r
        };
        match out {
            Ok(r) => r,
            Err(reason) => {
                self.drops.record(&reason);
                Received::Dropped(reason)
            }
        }
    }

    fn on_signaling<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        buf: &mut [u8],
        rng: &mut R,
    ) -> Result<(), DropReason> {
        let header = *SignalingPacket::parse(buf)
            .map_err(DropReason::Header)?
            .header();
        let key_id = header.envelope.key_id;
        if self.is_cs_datagram(&header) {
            return self.on_cs_datagram(now, buf, rng);
        }
        if let Some(r) = self.registrar.as_mut() {
            if key_id == r.session_key_id() {
                return self.on_dc_datagram(now, local, remote, buf, rng);
            }
        }
        if self.login.is_logging_in()
            && matches!(
                header.msg_type,
                MessageType::ConfigResponse | MessageType::LoginResponse | MessageType::Error
            )
            && !self.pending.contains_key(&key_id)
            && !self.tunnels.contains_key(&key_id)
        {
            self.login.handle_datagram(now, local, remote, buf, rng);
            self.after_login(now, rng);
            return Ok(());
        }
        self.on_tunnel_signaling(now, local, remote, buf, &header, rng)
    }

    /// Moves login and registrar events into the node's, and starts registration on login.
    fn after_login<R: RngCore + CryptoRng>(&mut self, now: Time, rng: &mut R) {
        while let Some(e) = self.login.poll_event() {
            match e {
                LoginEvent::LoggedIn(session) => {
                    self.login_backoff = Duration::ZERO;
                    self.retry_login_at = None;
                    let rc = RegistrarConfig {
                        local_addrs: self.config.local_addrs.clone(),
                        public_key: self.static_public,
                        wants_notification: self.config.wants_notification
                            && !session.ns_addrs.is_empty(),
                        retransmit: self.config.retransmit,
                    };
                    match Registrar::new(rc, &session) {
                        Ok(mut r) => {
                            r.register(now, rng);
                            self.registrar = Some(r);
                        }
                        Err(_) => {
                            self.event(NodeEvent::Error(NodeError::Registration(
                                RegistrationFailure::Refused(ErrorCode::Malformed),
                            )));
                        }
                    }
                    self.event(NodeEvent::LoggedIn {
                        fqdn: session.node_fqdn.clone(),
                    });
                    self.session = Some(session);
                    self.servers_logged_in(now);
                }
                LoginEvent::LoginFailed(f) => {
                    // Retried with back-off when the AS may answer later; never after
                    // AuthFailed (the password is wrong) or a refusal.
                    let wait = match f {
                        LoginFailure::Timeout => Some(self.backoff(true)),
                        LoginFailure::RateLimited { retry_after }
                        | LoginFailure::Unavailable { retry_after } => {
                            Some(self.backoff(true).max(retry_after))
                        }
                        _ => None,
                    };
                    self.retry_login_at = wait.map(|w| now + w);
                    self.event(NodeEvent::Error(NodeError::Login(f)))
                }
            }
        }
        self.after_registrar(now);
    }

    fn after_registrar(&mut self, now: Time) {
        let Some(r) = self.registrar.as_mut() else {
            return;
        };
        let mut events = Vec::new();
        while let Some(e) = r.poll_event() {
            events.push(e);
        }
        for e in events {
            match e {
                RegistrationEvent::Registered {
                    vip4,
                    vip6,
                    observed,
                    ..
                } => {
                    self.register_backoff = Duration::ZERO;
                    self.retry_register_at = None;
                    self.vaddrs = Some((vip4, vip6));
                    self.event(NodeEvent::Registered {
                        vip4,
                        vip6,
                        observed,
                    });
                }
                RegistrationEvent::Failed(f) => {
                    // Transient failures are retried with back-off; an expired session means
                    // logging in again.
                    match f {
                        RegistrationFailure::Timeout => {
                            self.retry_register_at = Some(now + self.backoff(false));
                        }
                        RegistrationFailure::Unavailable { retry_after }
                        | RegistrationFailure::RateLimited { retry_after } => {
                            let wait = self.backoff(false).max(retry_after);
                            self.retry_register_at = Some(now + wait);
                        }
                        RegistrationFailure::SessionExpired => {
                            self.retry_login_at = Some(now);
                        }
                        _ => {}
                    }
                    self.event(NodeEvent::Error(NodeError::Registration(f)))
                }
            }
        }
    }

    /// A datagram under the node↔DC key.
    fn on_dc_datagram<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        buf: &mut [u8],
        rng: &mut R,
    ) -> Result<(), DropReason> {
        let Some(r) = self.registrar.as_mut() else {
            return Err(DropReason::UnknownKey);
        };
        let (header, msg) = r.key_mut().open(buf)?;
        if !header.sealed {
            return Err(DropReason::UnsealedHint);
        }
        let txid = header.envelope.txid;
        let msg = match r.handle_opened(now, txid, msg, rng) {
            Ok(result) => {
                self.after_registrar(now);
                return result;
            }
            Err(msg) => *msg,
        };
        match msg {
            Message::RouteDirection(rd) => {
                self.on_route_direction(now, local, remote, &header, rd, rng);
                Ok(())
            }
            Message::Notification(n) => {
                self.on_dc_notification(now, local, remote, &header, n, rng);
                Ok(())
            }
            Message::Error(e) => self.on_direction_error(txid, e.code),
            _ => Err(DropReason::Unexpected),
        }
    }

    /// Sends `msg` to the DC under K_nd with `txid`, from the leg of `remote`'s family.
    fn send_to_dc(&mut self, local: SocketAddr, remote: SocketAddr, msg: &Message, txid: u32) {
        let Some(r) = self.registrar.as_mut() else {
            return;
        };
        if let Some(d) = crate::signaling::sealed(r.key_mut().seal_to_vec(msg, txid, None)) {
            self.outbox.push(Some(local), remote, d);
        }
    }

    /// The leg to talk to the DC on: IPv4 when registered there, else IPv6.
    fn dc_leg(&self) -> Option<(SocketAddr, SocketAddr)> {
        let r = self.registrar.as_ref()?;
        [false, true]
            .into_iter()
            .filter_map(|v6| r.leg(v6))
            .find(|l| l.observed.is_some())
            .map(|l| (l.local, l.dc))
    }

    // -- Directions ----------------------------------------------------------------------------

    /// Builds a tunnel to `peer` (or does nothing if one is up or being built). The answer comes
    /// as [`NodeEvent::TunnelUp`], [`NodeEvent::PeerOffline`] or [`NodeEvent::Error`].
    pub fn resolve<R: RngCore + CryptoRng>(&mut self, now: Time, peer: &Fqdn, rng: &mut R) {
        if self.tunnel_to(peer).is_some() || self.lookups.contains_key(peer) {
            return;
        }
        if self.pending.values().any(|p| &p.rd.peer_fqdn == peer) {
            return;
        }
        self.request_direction(now, peer.clone(), 0, rng);
    }

    pub(crate) fn request_direction<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        peer: Fqdn,
        rebuild_path_id: u32,
        rng: &mut R,
    ) {
        if self.lookups.contains_key(&peer) {
            return; // one DIRECTION_REQUEST per peer at a time; its answer serves this too
        }
        if self.lookups.len() >= self.config.limits.max_pending {
            self.event(NodeEvent::Error(NodeError::Direction {
                peer,
                code: ErrorCode::Unavailable,
            }));
            return;
        }
        let Some((local, dc)) = self.dc_leg() else {
            if self.registrar.is_some() {
                // Registering (again, after a move): ask once the DC knows where the node is.
                if !self.wanted.iter().any(|(p, _)| *p == peer) {
                    self.wanted.push((peer, rebuild_path_id));
                }
            } else {
                self.event(NodeEvent::Error(NodeError::Direction {
                    peer,
                    code: ErrorCode::WrongState,
                }));
            }
            return;
        };
        let txid = rng.next_u32();
        let rto = self.rtt.rto(dc, &self.config.retransmit);
        let tx = Transaction::start(
            now,
            txid,
            MessageType::DirectionRequest,
            dc,
            rto,
            &self.config.retransmit,
            rng,
        );
        let msg: Message = DirectionRequest {
            peer_fqdn: peer.clone(),
            rebuild_path_id,
            extensions: Extensions::none(),
        }
        .into();
        self.send_to_dc(local, dc, &msg, txid);
        self.lookups.insert(
            peer,
            Lookup {
                tx,
                rebuild_path_id,
                local,
            },
        );
    }

    fn on_direction_error(&mut self, txid: u32, code: ErrorCode) -> Result<(), DropReason> {
        let Some(peer) = self
            .lookups
            .iter()
            .find(|(_, l)| l.tx.txid() == txid)
            .map(|(p, _)| p.clone())
        else {
            return Err(DropReason::Unexpected);
        };
        let lookup = self.lookups.remove(&peer);
        self.queued.remove(&peer);
        if lookup.is_some_and(|l| l.rebuild_path_id != 0) {
            self.event(NodeEvent::Error(NodeError::Unreachable {
                peer: peer.clone(),
            }));
        }
        self.event(NodeEvent::Error(NodeError::Direction { peer, code }));
        Ok(())
    }

    /// ROUTE_DIRECTION from the DC: check it, ACK it, act on it (spec/05 §5.7).
    fn on_route_direction<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        header: &Header,
        rd: RouteDirection,
        rng: &mut R,
    ) {
        let txid = header.envelope.txid;
        let answer = |code: Option<ErrorCode>| -> Message {
            match code {
                None => Ack {
                    acked_type: MessageType::RouteDirection.to_u8(),
                    extensions: Extensions::none(),
                }
                .into(),
                Some(code) => ntm_wire::message::Error {
                    code,
                    failed_type: MessageType::RouteDirection.to_u8(),
                    retry_after_ms: 0,
                    extensions: Extensions::none(),
                }
                .into(),
            }
        };
        if !direction_well_formed(&rd) {
            self.send_to_dc(local, remote, &answer(Some(ErrorCode::Malformed)), txid);
            return;
        }
        // A retransmission of a direction already taken, or the same direction again (the DC
        // answering a rebuild it already decided), is ACKed and not acted on.
        let same = |t: u32, k: &ntm_wire::SecretKey| t == txid || *k == rd.tunnel_credential;
        let known = self
            .pending
            .get(&rd.path_id)
            .is_some_and(|p| same(p.dc_txid, &p.rd.tunnel_credential))
            || self
                .tunnels
                .get(&rd.path_id)
                .is_some_and(|t| same(t.dc_txid, &t.credential));
        // Only the answer to this node's own DIRECTION_REQUEST ends its lookup; a direction the
        // peer's request caused leaves it to its own answer.
        let answers_lookup = self
            .lookups
            .get(&rd.peer_fqdn)
            .is_some_and(|l| l.tx.txid() == txid);
        if known {
            if answers_lookup {
                self.lookups.remove(&rd.peer_fqdn);
            }
            self.send_to_dc(local, remote, &answer(None), txid);
            return;
        }
        if rd.route != RouteKind::Offline
            && (self.pending.contains_key(&rd.path_id) || self.tunnels.contains_key(&rd.path_id))
        {
            self.send_to_dc(local, remote, &answer(Some(ErrorCode::PathIdInUse)), txid);
            return;
        }
        // Room for it (a newer direction to the same peer replaces a pending one): else refuse
        // it rather than ACK and drop it, so the DC does not count on it.
        let replaces = self
            .pending
            .values()
            .any(|p| p.rd.peer_fqdn == rd.peer_fqdn);
        if rd.route != RouteKind::Offline
            && !replaces
            && self.pending.len() >= self.config.limits.max_pending
        {
            self.send_to_dc(local, remote, &answer(Some(ErrorCode::Unavailable)), txid);
            return;
        }
        self.send_to_dc(local, remote, &answer(None), txid);
        let peer = rd.peer_fqdn.clone();
        let lookup = if answers_lookup {
            self.lookups.remove(&peer)
        } else {
            None
        };
        if rd.route == RouteKind::Offline {
            self.queued.remove(&peer);
            self.remember_offline_key(&peer, rd.peer_public_key);
            self.event(NodeEvent::PeerOffline {
                peer,
                public_key: rd.peer_public_key,
            });
            return;
        }
        self.remember_peer(&rd);
        // A newer direction to the same peer replaces a pending one.
        let older: Vec<u32> = self
            .pending
            .iter()
            .filter(|(_, p)| p.rd.peer_fqdn == peer)
            .map(|(id, _)| *id)
            .collect();
        for id in older {
            self.pending.remove(&id);
        }
        let rebuild_of = lookup.map(|l| l.rebuild_path_id).filter(|p| *p != 0);
        self.start_pending(now, txid, rd, rebuild_of, rng);
        self.release_held(now, rng);
    }

    fn remember_peer(&mut self, rd: &RouteDirection) {
        for ip in [
            IpAddr::V4(rd.peer_virtual_v4),
            IpAddr::V6(rd.peer_virtual_v6),
        ] {
            if self.known_peers.len() < self.config.limits.max_known_peers
                || self.known_peers.contains_key(&ip)
            {
                self.known_peers.insert(ip, rd.peer_fqdn.clone());
            }
        }
    }

    // -- Time ----------------------------------------------------------------------------------

    /// Timers due at `now` fire.
    pub fn handle_timeout<R: RngCore + CryptoRng>(&mut self, now: Time, rng: &mut R) {
        if self.retry_login_at.is_some_and(|t| t <= now) {
            self.retry_login_at = None;
            self.registrar = None;
            self.login.login(now, rng);
        }
        if self.retry_register_at.is_some_and(|t| t <= now) {
            self.retry_register_at = None;
            if let Some(r) = self.registrar.as_mut() {
                r.register(now, rng);
            }
        }
        self.login.handle_timeout(now, rng);
        self.after_login(now, rng);
        if let Some(r) = self.registrar.as_mut() {
            r.handle_timeout(now, rng);
        }
        self.after_registrar(now);
        self.lookups_due(now, rng);
        self.tunnels_due(now, rng);
        self.servers_timeout(now, rng);
        self.held.retain(|(until, ..)| *until > now);
    }

    fn lookups_due<R: RngCore + CryptoRng>(&mut self, now: Time, rng: &mut R) {
        let cfg = self.config.retransmit;
        let due: Vec<Fqdn> = self
            .lookups
            .iter()
            .filter(|(_, l)| l.tx.deadline() <= now)
            .map(|(p, _)| p.clone())
            .collect();
        for peer in due {
            let Some(l) = self.lookups.get_mut(&peer) else {
                continue;
            };
            match l.tx.on_timeout(now, &cfg, rng) {
                Expiry::NotDue => {}
                Expiry::Retransmit => {
                    let (local, dc, txid) = (l.local, l.tx.remote(), l.tx.txid());
                    let msg: Message = DirectionRequest {
                        peer_fqdn: peer.clone(),
                        rebuild_path_id: l.rebuild_path_id,
                        extensions: Extensions::none(),
                    }
                    .into();
                    self.send_to_dc(local, dc, &msg, txid);
                }
                Expiry::Failed => {
                    self.lookups.remove(&peer);
                    self.queued.remove(&peer);
                    self.event(NodeEvent::Error(NodeError::DirectionTimeout { peer }));
                }
            }
        }
    }

    /// The address change of a handover (spec/05 §5.9): every tunnel moves, the registration
    /// is renewed from the new address; virtual addresses stay.
    pub fn handle_address_change<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        local_addrs: Vec<SocketAddr>,
        rng: &mut R,
    ) {
        let mut local_addrs = local_addrs;
        local_addrs.truncate(ntm_wire::AddrList::MAX);
        self.config.local_addrs = local_addrs.clone();
        if let Some(r) = self.registrar.as_mut() {
            r.handle_address_change(now, local_addrs, rng);
        }
        self.after_registrar(now);
        self.move_tunnels(now, rng);
    }

    /// The next datagram to send, written into `buf` (at least
    /// [`ntm_wire::MAX_SIGNALING_LEN`] bytes; DATA flushed from a queue may be up to the
    /// virtual MTU plus 32).
    pub fn poll_transmit(&mut self, now: Time, buf: &mut [u8]) -> Option<Transmit> {
        while let Some(t) = self.outbox.poll_transmit(buf) {
            // Queued before an address change: never send from an address the node lost (every
            // datagram the node queues names its socket).
            match t.src {
                Some(src) if self.config.local_addrs.contains(&src) => return Some(t),
                _ => self.drops.record(&DropReason::Unexpected),
            }
        }
        if let Some(t) = self.login.poll_transmit(now, buf) {
            return Some(t);
        }
        self.registrar.as_mut()?.poll_transmit(now, buf)
    }

    pub fn poll_event(&mut self) -> Option<NodeEvent> {
        self.events.pop_front()
    }

    /// The earliest deadline and what it is for.
    pub fn poll_timeout(&self) -> Option<(Time, &'static str)> {
        let mut best: Option<(Time, &'static str)> = None;
        let mut consider = |c: Option<(Time, &'static str)>| {
            if let Some(c) = c {
                if best.is_none_or_later(c.0) {
                    best = Some(c);
                }
            }
        };
        consider(self.login.poll_timeout());
        consider(self.retry_login_at.map(|t| (t, "login retry")));
        consider(self.retry_register_at.map(|t| (t, "registration retry")));
        consider(self.registrar.as_ref().and_then(Registrar::poll_timeout));
        consider(
            self.lookups
                .values()
                .map(|l| l.tx.deadline())
                .min()
                .map(|t| (t, "direction request retransmission")),
        );
        consider(
            self.held
                .front()
                .map(|(t, ..)| (*t, "held tunnel request expiry")),
        );
        if !self.wanted.is_empty() && self.dc_leg().is_some() {
            // Registered: the directions waiting for it go at once.
            consider(Some((Time::ZERO, "direction request after registration")));
        }
        consider(self.tunnel_deadline());
        consider(self.servers_deadline());
        best
    }
}

trait LaterThan {
    fn is_none_or_later(&self, t: Time) -> bool;
}

impl LaterThan for Option<(Time, &'static str)> {
    fn is_none_or_later(&self, t: Time) -> bool {
        self.is_none_or(|(b, _)| t < b)
    }
}

/// The combination rules of spec/03 (ROUTE_DIRECTION) a node checks before acting.
fn direction_well_formed(rd: &RouteDirection) -> bool {
    match rd.route {
        RouteKind::Direct => rd.path_id != 0 && rd.relay_key.is_none() && rd.relay_addrs.is_empty(),
        RouteKind::Relay => rd.path_id != 0 && rd.relay_key.is_some() && !rd.relay_addrs.is_empty(),
        RouteKind::Offline => {
            rd.path_id == 0
                && rd.peer_addrs.is_empty()
                && rd.relay_addrs.is_empty()
                && rd.relay_key.is_none()
                && !rd.probe_direct
        }
    }
}
