//! The node's registration with its DC after login: spec/05-procedures.md §5.2 steps 7 and 10,
//! NAT detection (§5.3) and registration upkeep (§5.4), from the node's side. It will become
//! part of the node; alone, it turns a [`Session`] into a registration and keeps it alive.
//!
//! ```text
//! register() ─▶ REGISTRATION_REQUEST [K_nd] ──▶ DC #1 ──▶ REGISTRATION_RESPONSE ─▶ Registered
//!            ─▶ KEEPALIVE(reply_requested) ──▶ DC #1 ──▶ KEEPALIVE_REPLY(X1) ┐ same flight
//!            ─▶ KEEPALIVE(reply_requested) ──▶ DC #2 ──▶ KEEPALIVE_REPLY(X2) ┘
//!               X1 or X2 = own address: NoNat; X1 = X2: EndpointIndependent;
//!               X1 ≠ X2: AddressAndPortDependent ─▶ re-register at once if the DC has another
//! ```
//!
//! # Families
//!
//! A node uses one socket per address family (spec/01 §1.5). The registrar runs one *leg* per
//! family in which the node has an address and `dc_addrs` has one: the leg sends from the
//! family's first local address to the family's first DC address, and probes the first DC
//! address of the family with another IP address. Each leg registers on its own (the DC records
//! an observed address per family) and reports its own [`RegistrationEvent::Registered`]; both
//! carry the same virtual pair, which belongs to the FQDN.
//!
//! # NAT detection
//!
//! A REGISTRATION_REQUEST reports the mapping measured earlier on the same network (the same set
//! of local addresses) or Unknown. Its answer already tells NoNat when the observed address is
//! the node's own, which is what the DC concludes too (the `nat` of `Registered` is that
//! effective value). When the probes' measurement differs from it, the node registers again at
//! once; an Unknown measurement (a missing reply, a family with one DC address) changes nothing.
//!
//! # Upkeep
//!
//! A registration is refreshed at half its lifetime and at once after
//! [`Registrar::handle_address_change`] (with new probes). Behind a NAT (a non-zero
//! `keepalive_interval_s`) a leg sends KEEPALIVE(reply_requested = 0) to its DC address whenever
//! it has sent it nothing for that interval. Every request is retransmitted on the schedule of
//! spec/07 §7.1; when a REGISTRATION_REQUEST's budget is spent the registrar reports
//! [`RegistrationFailure::Timeout`] and waits: the node decides whether to call
//! [`Registrar::register`] again or to log in again.
//!
//! Drive it like every entity: after each input drain [`Registrar::poll_event`] and
//! [`Registrar::poll_transmit`], then wait for [`Registrar::poll_timeout`].

use core::fmt;
use core::time::Duration;
use std::collections::VecDeque;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use ntm_wire::{
    AddrList, ErrorCode, Extensions, Fqdn, Keepalive, Message, MessageType, NatBehaviour,
    PublicKeyBytes, RegistrationRequest, Role, SignalingPacket, TransportAddr,
};
use rand_core::{CryptoRng, RngCore};

use crate::login::Session;
use crate::signaling::{
    DropCounters, DropReason, Expiry, Outbox, RetransmitConfig, RttTable, SignalingKey,
    Transaction, Transmit,
};
use crate::time::Time;

/// Networks whose NAT measurement the registrar remembers.
const REMEMBERED_NETWORKS: usize = 8;

/// What the registrar needs besides the session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistrarConfig {
    /// The node's own addresses and ports, every family (at most 8; no loopback, no
    /// link-local). The first of each family is that family's socket.
    pub local_addrs: Vec<SocketAddr>,
    /// The node's static X25519 public key.
    pub public_key: PublicKeyBytes,
    /// Whether the node will keep a push channel to its NS.
    pub wants_notification: bool,
    pub retransmit: RetransmitConfig,
}

impl RegistrarConfig {
    /// The defaults for everything but the addresses and the key.
    pub fn new(local_addrs: Vec<SocketAddr>, public_key: PublicKeyBytes) -> Self {
        RegistrarConfig {
            local_addrs,
            public_key,
            wants_notification: false,
            retransmit: RetransmitConfig::default(),
        }
    }
}

/// A configuration the registrar refuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegistrarConfigError {
    /// More than 8 local addresses.
    TooManyAddresses,
}

impl fmt::Display for RegistrarConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegistrarConfigError::TooManyAddresses => f.write_str("more than 8 local addresses"),
        }
    }
}

impl std::error::Error for RegistrarConfigError {}

/// Why a registration failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegistrationFailure {
    /// No answer after the last transmission.
    Timeout,
    /// The session has expired: log in again.
    SessionExpired,
    /// The DC cannot register the node now (its pools or tables are full).
    Unavailable {
        retry_after: Duration,
    },
    RateLimited {
        retry_after: Duration,
    },
    /// Another ERROR (WrongState: the request named another FQDN than the session's).
    Refused(ErrorCode),
}

/// What the registrar reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistrationEvent {
    /// One family's registration succeeded (the first, a refresh, or a re-registration).
    Registered {
        vip4: Ipv4Addr,
        vip6: Ipv6Addr,
        /// This family's address as the DC saw it.
        observed: SocketAddr,
        /// NoNat when `observed` is the node's own address, else the mapping reported.
        nat: NatBehaviour,
    },
    /// One family's REGISTRATION_REQUEST failed; the registration, if any, lapses unless the
    /// node registers again.
    Failed(RegistrationFailure),
}

/// One family's registration as it stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LegStatus {
    /// The family's socket address.
    pub local: SocketAddr,
    /// The DC address it registers with.
    pub dc: SocketAddr,
    /// The DC address it probes besides `dc`, if the family has one.
    pub second: Option<SocketAddr>,
    /// The address the DC saw, once registered.
    pub observed: Option<SocketAddr>,
    /// The effective mapping of the registration (Unknown before it).
    pub nat: NatBehaviour,
    /// The probes' measurement on this network, once complete.
    pub measured: Option<NatBehaviour>,
    pub lifetime: Duration,
    /// Zero when no keep-alives are needed.
    pub keepalive_interval: Duration,
}

/// A probe's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Probe {
    Pending(u32),
    Observed(SocketAddr),
    Missing,
}

struct InFlight {
    tx: Transaction,
    msg: Message,
}

struct Registered {
    observed: SocketAddr,
    nat: NatBehaviour,
    lifetime: Duration,
    keepalive: Duration,
    refresh_at: Option<Time>,
}

struct Leg {
    local: SocketAddr,
    dc: SocketAddr,
    second: Option<SocketAddr>,
    request: Option<InFlight>,
    probe_tx: [Option<Transaction>; 2],
    probes: [Probe; 2],
    measured: Option<NatBehaviour>,
    /// Whether a re-registration for this measurement was already made.
    acted_on_measurement: bool,
    /// The mapping reported by the request in flight, or by the last one.
    reported: NatBehaviour,
    registered: Option<Registered>,
    /// The last time anything was sent to `dc`.
    last_sent: Time,
}

impl Leg {
    fn new(local: SocketAddr, dc_addrs: &[SocketAddr], reported: NatBehaviour) -> Option<Leg> {
        let v6 = local.is_ipv6();
        let mut same = dc_addrs.iter().filter(|a| a.is_ipv6() == v6);
        let dc = *same.next()?;
        let second = same.copied().find(|a| a.ip() != dc.ip());
        Some(Leg {
            local,
            dc,
            second,
            request: None,
            probe_tx: [None, None],
            probes: [Probe::Missing, Probe::Missing],
            measured: None,
            acted_on_measurement: false,
            reported,
            registered: None,
            last_sent: Time::ZERO,
        })
    }

    fn effective(&self, observed: SocketAddr, local_addrs: &[SocketAddr]) -> NatBehaviour {
        if observed == self.local || local_addrs.contains(&observed) {
            NatBehaviour::NoNat
        } else {
            self.reported
        }
    }

    fn measurement(&self) -> NatBehaviour {
        let own = |p: &Probe| matches!(p, Probe::Observed(a) if *a == self.local);
        match self.probes {
            [a, b] if own(&a) || own(&b) => NatBehaviour::NoNat,
            [Probe::Observed(x1), Probe::Observed(x2)] if x1 == x2 => {
                NatBehaviour::EndpointIndependent
            }
            [Probe::Observed(_), Probe::Observed(_)] => NatBehaviour::AddressAndPortDependent,
            _ => NatBehaviour::Unknown,
        }
    }

    fn keepalive_due(&self, push_channel_up: bool) -> Option<Time> {
        if push_channel_up {
            return None;
        }
        let r = self.registered.as_ref()?;
        (r.keepalive > Duration::ZERO).then(|| self.last_sent + r.keepalive)
    }
}

/// The node's registrar. See the [module documentation](self).
pub struct Registrar {
    config: RegistrarConfig,
    node_fqdn: Fqdn,
    session_key_id: u32,
    dc_addrs: Vec<SocketAddr>,
    key: SignalingKey,
    /// IPv4, IPv6.
    legs: [Option<Leg>; 2],
    vaddrs: Option<(Ipv4Addr, Ipv6Addr)>,
    /// (sorted local addresses, family, measurement), oldest first.
    remembered: VecDeque<(Vec<SocketAddr>, usize, NatBehaviour)>,
    rtt: RttTable,
    outbox: Outbox,
    events: VecDeque<RegistrationEvent>,
    events_lost: u64,
    seal_failures: u64,
    drops: DropCounters,
    /// The node's NS push channel is up: no UDP keep-alives (spec/05 §5.4).
    push_channel_up: bool,
}

impl fmt::Debug for Registrar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registrar")
            .field("node_fqdn", &self.node_fqdn)
            .field("session_key_id", &self.session_key_id)
            .field("vaddrs", &self.vaddrs)
            .field("drops", &self.drops)
            .finish_non_exhaustive()
    }
}

fn fam(a: SocketAddr) -> usize {
    usize::from(a.is_ipv6())
}

impl Registrar {
    /// A registrar for `session`; nothing is sent before [`Registrar::register`].
    pub fn new(config: RegistrarConfig, session: &Session) -> Result<Self, RegistrarConfigError> {
        if config.local_addrs.len() > AddrList::MAX {
            return Err(RegistrarConfigError::TooManyAddresses);
        }
        let mut r = Registrar {
            node_fqdn: session.node_fqdn.clone(),
            session_key_id: session.session_key_id,
            dc_addrs: session.dc_addrs.clone(),
            key: SignalingKey::new(&session.node_dc_key, session.session_key_id, Role::A),
            legs: [None, None],
            vaddrs: None,
            remembered: VecDeque::new(),
            rtt: RttTable::new(8),
            outbox: Outbox::new(32),
            events: VecDeque::new(),
            events_lost: 0,
            seal_failures: 0,
            drops: DropCounters::default(),
            push_channel_up: false,
            config,
        };
        r.rebuild_legs();
        Ok(r)
    }

    /// Whether the node's NS push channel is up. While it is, no leg sends UDP keep-alives (the
    /// DC reaches the node through the NS, spec/05 §5.4); when it goes down they resume at once
    /// on legs that have been silent for their interval.
    pub fn set_push_channel(&mut self, up: bool) {
        self.push_channel_up = up;
    }

    /// Whether [`Registrar::set_push_channel`] last said the channel is up.
    pub fn push_channel_up(&self) -> bool {
        self.push_channel_up
    }

    /// Registers every leg (again), with NAT probes. Abandons requests in flight.
    pub fn register<R: RngCore + CryptoRng>(&mut self, now: Time, rng: &mut R) {
        for f in 0..2 {
            self.start_leg(now, f, true, rng);
        }
    }

    /// The node's addresses changed: every leg registers again at once from its new socket,
    /// reporting what was measured on this network before (or Unknown), and probes again.
    /// Addresses beyond the eighth are ignored.
    pub fn handle_address_change<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        local_addrs: Vec<SocketAddr>,
        rng: &mut R,
    ) {
        let mut local_addrs = local_addrs;
        local_addrs.truncate(AddrList::MAX);
        self.config.local_addrs = local_addrs;
        self.rebuild_legs();
        self.register(now, rng);
    }

    fn rebuild_legs(&mut self) {
        for f in 0..2 {
            let local = self
                .config
                .local_addrs
                .iter()
                .copied()
                .find(|a| fam(*a) == f);
            let reported = self
                .remembered_measurement(f)
                .unwrap_or(NatBehaviour::Unknown);
            let leg = local.and_then(|l| Leg::new(l, &self.dc_addrs, reported));
            if let Some(slot) = self.legs.get_mut(f) {
                *slot = leg;
            }
        }
    }

    fn network(&self) -> Vec<SocketAddr> {
        let mut n = self.config.local_addrs.clone();
        n.sort();
        n
    }

    fn remembered_measurement(&self, f: usize) -> Option<NatBehaviour> {
        let net = self.network();
        self.remembered
            .iter()
            .rev()
            .find(|(n, family, _)| *n == net && *family == f)
            .map(|(_, _, m)| *m)
    }

    fn remember(&mut self, f: usize, m: NatBehaviour) {
        let net = self.network();
        self.remembered
            .retain(|(n, family, _)| !(*n == net && *family == f));
        if self.remembered.len() >= REMEMBERED_NETWORKS {
            self.remembered.pop_front();
        }
        self.remembered.push_back((net, f, m));
    }

    pub fn node_fqdn(&self) -> &Fqdn {
        &self.node_fqdn
    }

    pub fn session_key_id(&self) -> u32 {
        self.session_key_id
    }

    /// The virtual pair, once a registration succeeded.
    pub fn virtual_addrs(&self) -> Option<(Ipv4Addr, Ipv6Addr)> {
        self.vaddrs
    }

    /// Whether some family is registered.
    pub fn is_registered(&self) -> bool {
        self.legs.iter().flatten().any(|l| l.registered.is_some())
    }

    /// One family's leg (IPv4 when `v6` is false), if the node registers in that family.
    pub fn leg(&self, v6: bool) -> Option<LegStatus> {
        let leg = self.legs.get(usize::from(v6))?.as_ref()?;
        let r = leg.registered.as_ref();
        Some(LegStatus {
            local: leg.local,
            dc: leg.dc,
            second: leg.second,
            observed: r.map(|r| r.observed),
            nat: r.map_or(NatBehaviour::Unknown, |r| r.nat),
            measured: leg.measured,
            lifetime: r.map_or(Duration::ZERO, |r| r.lifetime),
            keepalive_interval: r.map_or(Duration::ZERO, |r| r.keepalive),
        })
    }

    /// Datagrams dropped, by reason.
    pub fn drops(&self) -> &DropCounters {
        &self.drops
    }

    /// Events lost because the queue was full.
    pub fn events_lost(&self) -> u64 {
        self.events_lost
    }

    /// Sends a leg's REGISTRATION_REQUEST (and, with `probe`, its two probes).
    fn start_leg<R: RngCore + CryptoRng>(&mut self, now: Time, f: usize, probe: bool, rng: &mut R) {
        let Some(leg) = self.legs.get_mut(f).and_then(Option::as_mut) else {
            return;
        };
        if probe {
            leg.probe_tx = [None, None];
            leg.probes = [Probe::Missing, Probe::Missing];
            leg.measured = None;
            leg.acted_on_measurement = false;
        }
        if let Some(m) = leg.measured {
            if m != NatBehaviour::Unknown {
                leg.reported = m;
            }
        }
        let msg: Message = RegistrationRequest {
            node_fqdn: self.node_fqdn.clone(),
            local_addrs: local_list(&self.config.local_addrs),
            nat_mapping: leg.reported,
            node_public_key: self.config.public_key,
            wants_notification: self.config.wants_notification,
            extensions: Extensions::none(),
        }
        .into();
        let dc = leg.dc;
        let second = leg.second;
        let txid = self.fresh_txid(rng);
        let tx = self.start_tx(now, txid, MessageType::RegistrationRequest, dc, rng);
        self.send(now, f, dc, &msg, txid);
        if let Some(leg) = self.legs.get_mut(f).and_then(Option::as_mut) {
            leg.request = Some(InFlight { tx, msg });
        }
        if !probe {
            return;
        }
        let Some(second) = second else {
            return;
        };
        let keepalive: Message = Keepalive {
            reply_requested: true,
            extensions: Extensions::none(),
        }
        .into();
        for (i, dst) in [dc, second].into_iter().enumerate() {
            let txid = self.fresh_txid(rng);
            let tx = self.start_tx(now, txid, MessageType::Keepalive, dst, rng);
            self.send(now, f, dst, &keepalive, txid);
            if let Some(leg) = self.legs.get_mut(f).and_then(Option::as_mut) {
                if let (Some(t), Some(p)) = (leg.probe_tx.get_mut(i), leg.probes.get_mut(i)) {
                    *t = Some(tx);
                    *p = Probe::Pending(txid);
                }
            }
        }
    }

    fn start_tx<R: RngCore + CryptoRng>(
        &self,
        now: Time,
        txid: u32,
        msg_type: MessageType,
        dst: SocketAddr,
        rng: &mut R,
    ) -> Transaction {
        let cfg = &self.config.retransmit;
        Transaction::start(now, txid, msg_type, dst, self.rtt.rto(dst, cfg), cfg, rng)
    }

    /// A transaction ID no request in flight uses; bounded work for a degenerate generator.
    fn fresh_txid<R: RngCore + ?Sized>(&self, rng: &mut R) -> u32 {
        let mut txid = rng.next_u32();
        for _ in 0..16 {
            if !self.txid_in_use(txid) {
                break;
            }
            txid = rng.next_u32();
        }
        txid
    }

    fn txid_in_use(&self, txid: u32) -> bool {
        self.legs.iter().flatten().any(|l| {
            l.request.as_ref().is_some_and(|r| r.tx.txid() == txid)
                || l.probe_tx.iter().flatten().any(|t| t.txid() == txid)
        })
    }

    fn send(&mut self, now: Time, f: usize, dst: SocketAddr, msg: &Message, txid: u32) {
        let Some(leg) = self.legs.get_mut(f).and_then(Option::as_mut) else {
            return;
        };
        if dst == leg.dc {
            leg.last_sent = now;
        }
        let src = leg.local;
        match self.key.seal_to_vec(msg, txid, None) {
            Ok(d) => {
                self.outbox.push(Some(src), dst, d);
            }
            Err(_) => self.seal_failures = self.seal_failures.saturating_add(1),
        }
    }

    /// A datagram arrived at `local` from `remote`. `buf` is opened in place.
    pub fn handle_datagram<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        _local: SocketAddr,
        _remote: SocketAddr,
        buf: &mut [u8],
        rng: &mut R,
    ) {
        if let Err(reason) = self.on_datagram(now, buf, rng) {
            self.drops.record(&reason);
        }
    }

    fn on_datagram<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        buf: &mut [u8],
        rng: &mut R,
    ) -> Result<(), DropReason> {
        let key_id = SignalingPacket::parse(buf)
            .map_err(DropReason::Header)?
            .header()
            .envelope
            .key_id;
        if key_id != self.session_key_id {
            return Err(DropReason::UnknownKey);
        }
        let (header, msg) = self.key.open(buf)?;
        if !header.sealed {
            // Unsealed ERROR (UnknownKey): a hint only; the retransmissions go on.
            return Err(DropReason::UnsealedHint);
        }
        match self.handle_opened(now, header.envelope.txid, msg, rng) {
            Ok(r) => r,
            Err(_) => Err(DropReason::Unexpected),
        }
    }

    /// The node↔DC key, which the node also uses for its directions (spec/05 §5.5).
    pub(crate) fn key_mut(&mut self) -> &mut SignalingKey {
        &mut self.key
    }

    /// An authenticated message under the node↔DC key: taken when it answers one of the
    /// registrar's requests, else handed back.
    pub(crate) fn handle_opened<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        txid: u32,
        msg: Message,
        rng: &mut R,
    ) -> Result<Result<(), DropReason>, Box<Message>> {
        for f in 0..2 {
            let Some(leg) = self.legs.get(f).and_then(Option::as_ref) else {
                continue;
            };
            if leg.request.as_ref().is_some_and(|r| r.tx.txid() == txid) {
                return Ok(self.on_registration_answer(now, f, msg, rng));
            }
            let probe = leg.probes.iter().position(|p| *p == Probe::Pending(txid));
            if let Some(i) = probe {
                return Ok(self.on_probe_answer(now, f, i, msg, rng));
            }
        }
        Err(Box::new(msg))
    }

    fn on_registration_answer<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        f: usize,
        msg: Message,
        rng: &mut R,
    ) -> Result<(), DropReason> {
        let local_addrs = self.config.local_addrs.clone();
        let Some(leg) = self.legs.get_mut(f).and_then(Option::as_mut) else {
            return Err(DropReason::Unexpected);
        };
        let Some(inflight) = leg.request.as_ref() else {
            return Err(DropReason::Unexpected);
        };
        let sample = inflight
            .tx
            .rtt_sample(now)
            .map(|s| (inflight.tx.remote(), s));
        let response = match msg {
            Message::RegistrationResponse(r) => r,
            Message::Error(e) => {
                leg.request = None;
                let retry_after = Duration::from_millis(u64::from(e.retry_after_ms));
                let failure = match e.code {
                    ErrorCode::Expired => RegistrationFailure::SessionExpired,
                    ErrorCode::Unavailable => RegistrationFailure::Unavailable { retry_after },
                    ErrorCode::RateLimited => RegistrationFailure::RateLimited { retry_after },
                    other => RegistrationFailure::Refused(other),
                };
                self.event(RegistrationEvent::Failed(failure));
                return Ok(());
            }
            _ => return Err(DropReason::Unexpected),
        };
        leg.request = None;
        let observed = response.observed_addr.socket_addr();
        let nat = leg.effective(observed, &local_addrs);
        let lifetime = Duration::from_secs(u64::from(response.lifetime_s));
        let keepalive = Duration::from_secs(u64::from(response.keepalive_interval_s));
        leg.registered = Some(Registered {
            observed,
            nat,
            lifetime,
            keepalive,
            refresh_at: (lifetime > Duration::ZERO).then(|| now + lifetime / 2),
        });
        let reregister = leg
            .measured
            .is_some_and(|m| m != NatBehaviour::Unknown && m != nat && !leg.acted_on_measurement);
        if let Some((peer, rtt)) = sample {
            self.rtt.on_sample(now, peer, rtt);
        }
        let (vip4, vip6) = (response.virtual_v4, response.virtual_v6);
        self.vaddrs = Some((vip4, vip6));
        self.event(RegistrationEvent::Registered {
            vip4,
            vip6,
            observed,
            nat,
        });
        if reregister {
            self.reregister(now, f, rng);
        }
        Ok(())
    }

    fn on_probe_answer<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        f: usize,
        i: usize,
        msg: Message,
        rng: &mut R,
    ) -> Result<(), DropReason> {
        let Some(leg) = self.legs.get_mut(f).and_then(Option::as_mut) else {
            return Err(DropReason::Unexpected);
        };
        let outcome = match msg {
            Message::KeepaliveReply(r) => Probe::Observed(r.observed_addr.socket_addr()),
            Message::Error(_) => Probe::Missing,
            _ => return Err(DropReason::Unexpected),
        };
        let tx = leg.probe_tx.get_mut(i).and_then(Option::take);
        if let Some(p) = leg.probes.get_mut(i) {
            *p = outcome;
        }
        if let Some(tx) = tx {
            if let Some(rtt) = tx.rtt_sample(now) {
                self.rtt.on_sample(now, tx.remote(), rtt);
            }
        }
        self.probe_settled(now, f, rng);
        Ok(())
    }

    /// After a probe got its answer or gave up: completes the measurement when both have.
    fn probe_settled<R: RngCore + CryptoRng>(&mut self, now: Time, f: usize, rng: &mut R) {
        let Some(leg) = self.legs.get_mut(f).and_then(Option::as_mut) else {
            return;
        };
        if leg.probes.iter().any(|p| matches!(p, Probe::Pending(_))) {
            return;
        }
        let m = leg.measurement();
        leg.measured = Some(m);
        let reregister = m != NatBehaviour::Unknown
            && leg.request.is_none()
            && leg.registered.as_ref().is_some_and(|r| r.nat != m);
        self.remember(f, m);
        if reregister {
            self.reregister(now, f, rng);
        }
    }

    /// Registers a leg again with its measurement, once per measurement.
    fn reregister<R: RngCore + CryptoRng>(&mut self, now: Time, f: usize, rng: &mut R) {
        if let Some(leg) = self.legs.get_mut(f).and_then(Option::as_mut) {
            leg.acted_on_measurement = true;
        }
        self.start_leg(now, f, false, rng);
    }

    /// Retransmits requests whose deadline passed or gives them up; refreshes registrations at
    /// half their lifetime; sends keep-alives.
    pub fn handle_timeout<R: RngCore + CryptoRng>(&mut self, now: Time, rng: &mut R) {
        for f in 0..2 {
            self.leg_timeout(now, f, rng);
        }
    }

    fn leg_timeout<R: RngCore + CryptoRng>(&mut self, now: Time, f: usize, rng: &mut R) {
        let cfg = self.config.retransmit;
        let Some(leg) = self.legs.get_mut(f).and_then(Option::as_mut) else {
            return;
        };
        // The registration request.
        let mut resend = None;
        let mut failed = false;
        if let Some(r) = leg.request.as_mut() {
            match r.tx.on_timeout(now, &cfg, rng) {
                Expiry::NotDue => {}
                Expiry::Retransmit => resend = Some((r.tx.remote(), r.msg.clone(), r.tx.txid())),
                Expiry::Failed => failed = true,
            }
        }
        if failed {
            leg.request = None;
        }
        // The probes.
        let mut probe_resend = Vec::new();
        let mut probe_gave_up = false;
        for (t, p) in leg.probe_tx.iter_mut().zip(leg.probes.iter_mut()) {
            let Some(tx) = t.as_mut() else {
                continue;
            };
            match tx.on_timeout(now, &cfg, rng) {
                Expiry::NotDue => {}
                Expiry::Retransmit => probe_resend.push((tx.remote(), tx.txid())),
                Expiry::Failed => {
                    *t = None;
                    *p = Probe::Missing;
                    probe_gave_up = true;
                }
            }
        }
        let refresh = leg.request.is_none()
            && leg
                .registered
                .as_ref()
                .and_then(|r| r.refresh_at)
                .is_some_and(|at| at <= now);
        let keepalive = leg
            .keepalive_due(self.push_channel_up)
            .is_some_and(|at| at <= now);
        if let Some((dst, msg, txid)) = resend {
            self.send(now, f, dst, &msg, txid);
        }
        if failed {
            self.event(RegistrationEvent::Failed(RegistrationFailure::Timeout));
        }
        for (dst, txid) in probe_resend {
            let keepalive: Message = Keepalive {
                reply_requested: true,
                extensions: Extensions::none(),
            }
            .into();
            self.send(now, f, dst, &keepalive, txid);
        }
        if probe_gave_up {
            self.probe_settled(now, f, rng);
        }
        if refresh {
            if let Some(r) = self
                .legs
                .get_mut(f)
                .and_then(Option::as_mut)
                .and_then(|l| l.registered.as_mut())
            {
                r.refresh_at = None;
            }
            self.start_leg(now, f, false, rng);
        }
        // Re-read: a refresh just sent counts as traffic to the DC.
        let keepalive = keepalive
            && self
                .legs
                .get(f)
                .and_then(Option::as_ref)
                .and_then(|l| l.keepalive_due(self.push_channel_up))
                .is_some_and(|at| at <= now);
        if keepalive {
            let dc = self.legs.get(f).and_then(Option::as_ref).map(|l| l.dc);
            if let Some(dc) = dc {
                let msg: Message = Keepalive {
                    reply_requested: false,
                    extensions: Extensions::none(),
                }
                .into();
                let txid = rng.next_u32();
                self.send(now, f, dc, &msg, txid);
            }
        }
    }

    /// The next datagram to send, written into `buf` (at least
    /// [`ntm_wire::MAX_SIGNALING_LEN`] bytes).
    pub fn poll_transmit(&mut self, _now: Time, buf: &mut [u8]) -> Option<Transmit> {
        self.outbox.poll_transmit(buf)
    }

    pub fn poll_event(&mut self) -> Option<RegistrationEvent> {
        self.events.pop_front()
    }

    /// The earliest deadline and what it is for.
    pub fn poll_timeout(&self) -> Option<(Time, &'static str)> {
        let mut best: Option<(Time, &'static str)> = None;
        let mut consider = |at: Option<Time>, label: &'static str| {
            if let Some(at) = at {
                let earlier = match best {
                    Some((b, _)) => at < b,
                    None => true,
                };
                if earlier {
                    best = Some((at, label));
                }
            }
        };
        for leg in self.legs.iter().flatten() {
            consider(
                leg.request.as_ref().map(|r| r.tx.deadline()),
                "REGISTRATION_REQUEST retransmission",
            );
            for t in leg.probe_tx.iter().flatten() {
                consider(Some(t.deadline()), "NAT probe retransmission");
            }
            if leg.request.is_none() {
                consider(
                    leg.registered.as_ref().and_then(|r| r.refresh_at),
                    "registration refresh",
                );
            }
            consider(leg.keepalive_due(self.push_channel_up), "keep-alive");
        }
        best
    }

    fn event(&mut self, e: RegistrationEvent) {
        if self.events.len() >= 16 {
            self.events_lost = self.events_lost.saturating_add(1);
        } else {
            self.events.push_back(e);
        }
    }
}

fn local_list(addrs: &[SocketAddr]) -> AddrList {
    let list: Vec<TransportAddr> = addrs
        .iter()
        .take(AddrList::MAX)
        .map(|a| TransportAddr::new(*a))
        .collect();
    AddrList::new(list).unwrap_or_else(|_| AddrList::empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dc::{DcConfig, DirectionCoordinator, VirtualPools};
    use ntm_wire::{KeyDistribution, KeyRole, SecretKey, MAX_SIGNALING_LEN};
    use rand_chacha::ChaCha8Rng;
    use rand_core::SeedableRng;
    use std::net::IpAddr;

    const KEY_ID: u32 = 0x1001;

    fn dc_addrs() -> Vec<SocketAddr> {
        [
            "203.0.113.10:4281",
            "203.0.113.11:4281",
            "[2001:db8::10]:4281",
            "[2001:db8::11]:4281",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect()
    }

    fn v4(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn session(dc_addrs: Vec<SocketAddr>) -> Session {
        Session {
            node_fqdn: Fqdn::new("alice.dc1.example").unwrap(),
            session_key_id: KEY_ID,
            node_dc_key: SecretKey::from_bytes([9; 32]),
            dc_fqdn: Fqdn::new("dc1.example").unwrap(),
            dc_addrs,
            ns_addrs: vec![],
            cs_addrs: vec![],
            keepalive_interval: Duration::from_secs(25),
            lifetime: Duration::from_secs(86_400),
            established_at: Time::ZERO,
        }
    }

    fn registrar(local: &[&str], dc_addrs: Vec<SocketAddr>) -> Registrar {
        let local = local.iter().map(|a| a.parse().unwrap()).collect();
        Registrar::new(RegistrarConfig::new(local, [5; 32]), &session(dc_addrs)).unwrap()
    }

    fn sent(r: &mut Registrar) -> Vec<(SocketAddr, SocketAddr, Vec<u8>)> {
        let mut buf = [0u8; MAX_SIGNALING_LEN];
        std::iter::from_fn(|| {
            r.poll_transmit(Time::ZERO, &mut buf)
                .map(|t| (t.src.unwrap(), t.dst, buf[..t.len].to_vec()))
        })
        .collect()
    }

    fn events(r: &mut Registrar) -> Vec<RegistrationEvent> {
        std::iter::from_fn(|| r.poll_event()).collect()
    }

    /// A DC holding the session's key, with a session lifetime of `lifetime_s`.
    fn dc(lifetime_s: u32) -> DirectionCoordinator {
        let mut dc = DirectionCoordinator::new(DcConfig::new(
            Fqdn::new("dc1.example").unwrap(),
            dc_addrs(),
            SecretKey::from_bytes([4; 32]),
            17,
            VirtualPools {
                v4: Ipv4Addr::new(100, 64, 1, 0),
                v4_prefix_len: 24,
                v6: "fd4e:544d:0:1::".parse().unwrap(),
            },
        ))
        .unwrap();
        let mut as_key = SignalingKey::new(&SecretKey::from_bytes([4; 32]), 17, Role::A);
        let kd: Message = KeyDistribution {
            key_role: KeyRole::NodeDc,
            new_key_id: KEY_ID,
            key: SecretKey::from_bytes([9; 32]),
            lifetime_s,
            subject: Fqdn::new("alice.dc1.example").unwrap(),
            extensions: Extensions::none(),
        }
        .into();
        let mut d = as_key.seal_to_vec(&kd, 1, None).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        dc.handle_datagram(
            Time::ZERO,
            dc_addrs()[0],
            v4("203.0.113.2:4280"),
            &mut d,
            &mut rng,
        );
        let mut buf = [0u8; MAX_SIGNALING_LEN];
        while dc.poll_transmit(Time::ZERO, &mut buf).is_some() {}
        dc
    }

    /// Everything the registrar sends reaches the DC at once, translated by `nat`, and every
    /// answer comes straight back, until both are quiet.
    fn exchange(
        r: &mut Registrar,
        dc: &mut DirectionCoordinator,
        now: Time,
        nat: &dyn Fn(SocketAddr, SocketAddr) -> SocketAddr,
        rng: &mut ChaCha8Rng,
    ) -> Vec<(SocketAddr, SocketAddr, Vec<u8>)> {
        let mut all = Vec::new();
        let mut buf = [0u8; MAX_SIGNALING_LEN];
        loop {
            let out = sent(r);
            if out.is_empty() {
                return all;
            }
            for (src, dst, d) in out {
                all.push((src, dst, d.clone()));
                let mut d = d;
                dc.handle_datagram(now, dst, nat(src, dst), &mut d, rng);
                while let Some(t) = dc.poll_transmit(now, &mut buf) {
                    let mut answer = buf[..t.len].to_vec();
                    r.handle_datagram(now, src, dst, &mut answer, rng);
                }
            }
        }
    }

    /// An endpoint-independent NAT: every private source maps to one public address and port.
    fn eim(src: SocketAddr, _dst: SocketAddr) -> SocketAddr {
        match src.ip() {
            IpAddr::V4(a) if a.is_private() => v4("198.51.100.7:5000"),
            _ => src,
        }
    }

    fn registered_nat(events: &[RegistrationEvent]) -> Vec<NatBehaviour> {
        events
            .iter()
            .filter_map(|e| match e {
                RegistrationEvent::Registered { nat, .. } => Some(*nat),
                RegistrationEvent::Failed(_) => None,
            })
            .collect()
    }

    #[test]
    fn registering_sends_one_request_per_family_with_two_probes_where_the_dc_has_two_addresses() {
        let mut r = registrar(&["198.51.100.2:5000", "[2001:db8:1::2]:5000"], dc_addrs());
        assert!(sent(&mut r).is_empty(), "nothing before register()");
        r.register(Time::ZERO, &mut ChaCha8Rng::seed_from_u64(1));
        let shape: Vec<(SocketAddr, SocketAddr, u8)> = sent(&mut r)
            .into_iter()
            .map(|(s, d, b)| (s, d, b[0]))
            .collect();
        let (l4, l6) = (
            v4("198.51.100.2:5000"),
            "[2001:db8:1::2]:5000".parse().unwrap(),
        );
        let dc = dc_addrs();
        assert_eq!(
            shape,
            vec![
                (l4, dc[0], 0x30),
                (l4, dc[0], 0x32),
                (l4, dc[1], 0x32),
                (l6, dc[2], 0x30),
                (l6, dc[2], 0x32),
                (l6, dc[3], 0x32),
            ]
        );
        let mut one = registrar(&["198.51.100.2:5000"], vec![dc[0], dc[2]]);
        one.register(Time::ZERO, &mut ChaCha8Rng::seed_from_u64(1));
        assert_eq!(
            sent(&mut one).len(),
            1,
            "one DC address: nothing to compare, no probes"
        );
        assert!(one.leg(true).is_none(), "no IPv6 address, no IPv6 leg");
    }

    #[test]
    fn the_measurement_reads_own_address_as_no_nat_equal_as_independent_unequal_as_dependent() {
        let local = v4("192.168.1.2:5000");
        let mut leg = Leg::new(local, &dc_addrs(), NatBehaviour::Unknown).unwrap();
        let x1 = v4("198.51.100.7:5000");
        let x2 = v4("198.51.100.7:40001");
        let cases = [
            (
                [Probe::Observed(local), Probe::Missing],
                NatBehaviour::NoNat,
            ),
            (
                [Probe::Observed(x1), Probe::Observed(x1)],
                NatBehaviour::EndpointIndependent,
            ),
            (
                [Probe::Observed(x1), Probe::Observed(x2)],
                NatBehaviour::AddressAndPortDependent,
            ),
            ([Probe::Observed(x1), Probe::Missing], NatBehaviour::Unknown),
            ([Probe::Missing, Probe::Missing], NatBehaviour::Unknown),
        ];
        for (probes, expected) in cases {
            leg.probes = probes;
            assert_eq!(leg.measurement(), expected, "{probes:?}");
        }
    }

    #[test]
    fn an_unanswered_registration_gives_up_after_six_transmissions_with_timeout() {
        let mut r = registrar(&["198.51.100.2:5000"], vec![dc_addrs()[0]]);
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        r.register(Time::ZERO, &mut rng);
        let mut requests = sent(&mut r).len();
        while let Some((due, label)) = r.poll_timeout() {
            assert_eq!(label, "REGISTRATION_REQUEST retransmission");
            r.handle_timeout(due, &mut rng);
            requests += sent(&mut r).len();
        }
        assert_eq!(requests, 6);
        assert_eq!(
            events(&mut r),
            vec![RegistrationEvent::Failed(RegistrationFailure::Timeout)]
        );
        assert!(!r.is_registered());
    }

    #[test]
    fn behind_a_nat_a_keep_alive_leaves_after_25_s_of_silence_and_the_refresh_at_300_s() {
        let mut dc = dc(86_400);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut r = registrar(&["192.168.1.2:5000"], dc_addrs());
        r.register(Time::ZERO, &mut rng);
        exchange(&mut r, &mut dc, Time::ZERO, &eim, &mut rng);
        assert_eq!(
            registered_nat(&events(&mut r)),
            vec![NatBehaviour::Unknown, NatBehaviour::EndpointIndependent]
        );
        assert_eq!(r.poll_timeout(), Some((Time::from_secs(25), "keep-alive")));
        r.handle_timeout(Time::from_secs(25), &mut rng);
        let out = sent(&mut r);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].1, out[0].2[0]), (dc_addrs()[0], 0x32));
        assert_eq!(r.poll_timeout(), Some((Time::from_secs(50), "keep-alive")));
        for k in 2..=11 {
            r.handle_timeout(Time::from_secs(25 * k), &mut rng);
            assert_eq!(sent(&mut r).len(), 1);
        }
        assert_eq!(
            r.poll_timeout(),
            Some((Time::from_secs(300), "registration refresh"))
        );
        r.handle_timeout(Time::from_secs(300), &mut rng);
        let out = exchange(&mut r, &mut dc, Time::from_secs(300), &eim, &mut rng);
        assert_eq!(
            out.len(),
            1,
            "the refresh is traffic: no keep-alive with it"
        );
        assert_eq!(out[0].2[0], 0x30, "the refresh, without probes");
        assert_eq!(r.poll_timeout(), Some((Time::from_secs(325), "keep-alive")));
        assert_eq!(
            registered_nat(&events(&mut r)),
            vec![NatBehaviour::EndpointIndependent]
        );

        // Another node, with the same session for simplicity: a DC of its own.
        let mut dc = self::dc(86_400);
        let mut open = registrar(&["198.51.100.2:5000"], dc_addrs());
        open.register(Time::ZERO, &mut rng);
        exchange(&mut open, &mut dc, Time::ZERO, &|s, _| s, &mut rng);
        assert_eq!(
            registered_nat(&events(&mut open)),
            vec![NatBehaviour::NoNat],
            "the answer already says NoNat and the probes agree: no second registration"
        );
        assert_eq!(
            open.poll_timeout(),
            Some((Time::from_secs(300), "registration refresh")),
            "no keep-alives without a NAT"
        );
    }

    #[test]
    fn a_network_measured_before_is_reported_at_once_when_the_node_comes_back_to_it() {
        let mut dc = dc(86_400);
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let home = vec![v4("192.168.1.2:5000")];
        let mut r = Registrar::new(
            RegistrarConfig::new(home.clone(), [5; 32]),
            &session(dc_addrs()),
        )
        .unwrap();
        r.register(Time::ZERO, &mut rng);
        exchange(&mut r, &mut dc, Time::ZERO, &eim, &mut rng);
        events(&mut r);
        let apdm = |src: SocketAddr, dst: SocketAddr| match dst.ip() {
            IpAddr::V4(a) => {
                SocketAddr::from(([198, 51, 100, 8], 40_000 + u16::from(a.octets()[3])))
            }
            IpAddr::V6(_) => src,
        };
        let t = Time::from_secs(10);
        r.handle_address_change(t, vec![v4("192.168.7.2:5000")], &mut rng);
        let out = exchange(&mut r, &mut dc, t, &apdm, &mut rng);
        let requests = out.iter().filter(|(_, _, d)| d[0] == 0x30).count();
        assert_eq!(requests, 2, "Unknown first, then the measurement");
        assert_eq!(
            registered_nat(&events(&mut r)),
            vec![NatBehaviour::Unknown, NatBehaviour::AddressAndPortDependent]
        );
        let t = Time::from_secs(20);
        r.handle_address_change(t, home, &mut rng);
        let out = exchange(&mut r, &mut dc, t, &eim, &mut rng);
        let requests = out.iter().filter(|(_, _, d)| d[0] == 0x30).count();
        assert_eq!(
            requests, 1,
            "the first request already carries what was measured here"
        );
        assert_eq!(
            registered_nat(&events(&mut r)),
            vec![NatBehaviour::EndpointIndependent]
        );
        let reg = dc
            .registration(&Fqdn::new("alice.dc1.example").unwrap())
            .unwrap();
        assert_eq!(reg.nat[0], NatBehaviour::EndpointIndependent);
        assert_eq!(reg.observed[0].map(|o| o.0), Some(v4("198.51.100.7:5000")));
    }

    #[test]
    fn an_expired_session_is_reported_so_that_the_node_logs_in_again() {
        let mut dc = dc(10);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        dc.handle_timeout(Time::from_secs(10), &mut rng);
        let mut r = registrar(&["198.51.100.2:5000"], vec![dc_addrs()[0]]);
        r.register(Time::from_secs(11), &mut rng);
        exchange(&mut r, &mut dc, Time::from_secs(11), &|s, _| s, &mut rng);
        assert_eq!(
            events(&mut r),
            vec![RegistrationEvent::Failed(
                RegistrationFailure::SessionExpired
            )]
        );
        assert_eq!(r.poll_timeout(), None);
    }

    #[test]
    fn more_than_eight_local_addresses_are_refused() {
        let many = (1..=9u8)
            .map(|n| SocketAddr::from(([198, 51, 100, n], 5000)))
            .collect();
        let err = Registrar::new(RegistrarConfig::new(many, [5; 32]), &session(dc_addrs())).err();
        assert_eq!(err, Some(RegistrarConfigError::TooManyAddresses));
    }

    #[test]
    fn a_datagram_under_another_key_or_for_no_request_changes_nothing() {
        let mut r = registrar(&["198.51.100.2:5000"], dc_addrs());
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        r.register(Time::ZERO, &mut rng);
        sent(&mut r);
        let mut dc_end = SignalingKey::new(&SecretKey::from_bytes([9; 32]), KEY_ID, Role::B);
        let reply: Message = ntm_wire::KeepaliveReply {
            observed_addr: TransportAddr::new(v4("198.51.100.2:5000")),
            extensions: Extensions::none(),
        }
        .into();
        let mut stray = dc_end.seal_to_vec(&reply, 12345, None).unwrap();
        r.handle_datagram(
            Time::ZERO,
            v4("198.51.100.2:5000"),
            dc_addrs()[0],
            &mut stray,
            &mut rng,
        );
        let mut other = SignalingKey::new(&SecretKey::from_bytes([9; 32]), KEY_ID + 1, Role::B);
        let mut foreign = other.seal_to_vec(&reply, 12345, None).unwrap();
        r.handle_datagram(
            Time::ZERO,
            v4("198.51.100.2:5000"),
            dc_addrs()[0],
            &mut foreign,
            &mut rng,
        );
        assert_eq!(r.drops().get("unexpected"), 1);
        assert_eq!(r.drops().get("unknown_key"), 1);
        assert!(events(&mut r).is_empty());
        assert_eq!(r.leg(false).and_then(|l| l.measured), None);
    }
}
