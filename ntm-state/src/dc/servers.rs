//! The DC's hand-offs to its notification server (NS) and cache server (CS): spec/05 §5.2 steps
//! 8-9 (the node↔NS and node↔CS keys of a new session), §5.4 "Reaching a node", §5.5.4 (a target
//! reachable only through its NS) and §5.14 "Notify" (cached data waiting at the CS).
//!
//! ```text
//! node                      DC                               NS                 CS
//!  | REGISTRATION_REQUEST    |                                |                  |
//!  | (first of its session)  | NOTIFICATION_REGISTRATION [K_ds] (wants_notification)
//!  |------------------------>|------------------------------->|                  |
//!  |                         | KEY_DISTRIBUTION(NodeCs) [K_ds]                   |
//!  |                         |-------------------------------------------------->|
//!  |                         | ACK (the response waits for it, at most 1 s)      |
//!  | REGISTRATION_RESPONSE   |<-------------------------------|                  |
//!  |<------------------------|                         NOTIFICATION(CachedData)  |
//!  |                         |<--------------------------------------------------|
//!  | NOTIFICATION(CachedData) [K_nd], until ACK; ACK to the CS                   |
//!  |<------------------------|-------------------------------------------------->|
//!  |                         |                                |                  |
//!  |   a DC → node datagram to a node whose UDP path is not fresh:               |
//!  |   sent directly, and as the payload of NOTIFICATION [K_ds] to the NS        |
//!  |<- - - - - - - - - - - - |------------------------------->| pushed on the    |
//!  |<=========================================================| node's channel   |
//! ```
//!
//! # Configuration
//!
//! [`DcConfig::ns`](super::DcConfig::ns) and [`DcConfig::cs`](super::DcConfig::cs) name each
//! server with a [`ServerLink`]: its signaling address and the pre-shared DC↔server key (the DC
//! seals as role A). Without an NS the DC registers nobody for push and always sends directly;
//! without a CS it distributes no node↔CS key and never hears of cached data.
//!
//! # What the DC keeps for its servers
//!
//! * Its own requests to them (KEY_DISTRIBUTION(NodeCs), NOTIFICATION_REGISTRATION,
//!   NOTIFICATION), retransmitted on the schedule of spec/07 until the server's ACK or ERROR,
//!   and its NOTIFICATION(CachedData) to nodes, retransmitted until the node's ACK. Together with
//!   the held REGISTRATION_RESPONSEs and the answers kept for the CS's retransmissions, at most
//!   [`DcLimits::max_server_requests`](super::DcLimits::max_server_requests) of each kind.
//! * Per node, the session whose K_ns the NS acknowledged: only such a node is reached through
//!   the NS. Whether the node actually subscribed is the NS's to know: it answers ERROR NotFound
//!   when no channel is open, and since the DC sends every such datagram directly as well,
//!   nothing more has to happen then.
//! * The nodes the CS announced cached data for while they had no registration (or did not
//!   acknowledge the announcement): the DC tells them at their next registration. A node that
//!   registers under a new session is not told from this record: the KEY_DISTRIBUTION(NodeCs) of
//!   that session makes the CS announce again.
//!
//! # The NS wait
//!
//! At the first registration of a session with `wants_notification`, the DC holds the
//! REGISTRATION_RESPONSE until the NS acknowledges the NOTIFICATION_REGISTRATION (the node
//! subscribes right after the response, and the NS must hold K_ns by then), but at most
//! [`NS_REGISTRATION_WAIT`]: a silent NS must not make the node's registration time out.
//! Retransmissions of the REGISTRATION_REQUEST meanwhile are absorbed (spec/05 §5.1).

use core::time::Duration;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use ntm_wire::crypto::{node_cs_key, node_ns_key};
use ntm_wire::{
    Ack, Blob, ErrorCode, Extensions, Header, KeyDistribution, KeyRole, Message, MessageType,
    NatBehaviour, Notification, NotificationRegistration, NotifyReason, Role, SecretKey,
};
use rand_core::{CryptoRng, RngCore};

use super::{error_msg, family, DcConfig, DcConfigError, DcEvent, DirectionCoordinator, Sender};
use crate::signaling::{DropReason, Expiry, RttEstimator, SealError, SignalingKey, Transaction};
use crate::time::Time;

/// The longest the DC holds a REGISTRATION_RESPONSE for the NS's ACK of the session's
/// NOTIFICATION_REGISTRATION (spec/05 §5.2 step 9). Long enough for three transmissions to an
/// NS that answers within the initial RTO, far below the node's own retransmission budget.
pub const NS_REGISTRATION_WAIT: Duration = Duration::from_secs(1);

/// A node's UDP path is *fresh* while the DC heard from it within this (spec/05 §5.4).
pub const FRESH_PATH: Duration = Duration::from_secs(25);

/// How long an answer to the CS's NOTIFICATION is kept for its retransmissions (spec/05 §5.1).
const ANSWER_KEPT: Duration = Duration::from_secs(30);

/// An NS or CS the DC works with.
#[derive(Clone, Debug)]
pub struct ServerLink {
    /// The server's signaling address.
    pub addr: SocketAddr,
    /// The pre-shared DC↔server key.
    pub key: SecretKey,
    /// Its configured key ID: non-zero, top bit clear, distinct from every other key ID the DC
    /// is configured with.
    pub key_id: u32,
    /// The persisted high-water mark of the DC's sequence numbers under that key (0 when new).
    pub high_water_mark: u64,
}

impl ServerLink {
    /// A link with a new key (high-water mark 0).
    pub fn new(addr: SocketAddr, key: SecretKey, key_id: u32) -> Self {
        ServerLink {
            addr,
            key,
            key_id,
            high_water_mark: 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Which {
    Cs,
    Ns,
}

struct Link {
    addr: SocketAddr,
    key: SignalingKey,
    rtt: RttEstimator,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Purpose {
    /// KEY_DISTRIBUTION(NodeCs) of a node's session.
    NodeCsKey,
    /// NOTIFICATION_REGISTRATION of a node's session; a REGISTRATION_RESPONSE may wait for it.
    NsRegistration { node: u32, session: u32 },
    /// NOTIFICATION carrying a sealed datagram for a node.
    NsPush,
}

struct Request {
    tx: Transaction,
    msg: Message,
    purpose: Purpose,
}

/// NOTIFICATION(CachedData) to a node, retransmitted until the node's ACK.
struct NodeNotice {
    node: u32,
    tx: Transaction,
    local: SocketAddr,
}

/// A REGISTRATION_RESPONSE waiting for the NS.
struct Held {
    until: Time,
    from: Sender,
    response: Message,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Due {
    /// A request to a server, by (server, transaction ID).
    Request(Which, u32),
    /// A NOTIFICATION to a node, by (session key ID, transaction ID).
    Notice(u32, u32),
    /// A held REGISTRATION_RESPONSE, by the NOTIFICATION_REGISTRATION's transaction ID.
    Held(u32),
    /// An answer kept for the CS's retransmissions, by (key ID, transaction ID).
    Answer(u32, u32),
}

/// The DC's table for its NS and CS.
pub(super) struct Servers {
    cs: Option<Link>,
    ns: Option<Link>,
    limit: usize,
    requests: BTreeMap<(Which, u32), Request>,
    notices: BTreeMap<(u32, u32), NodeNotice>,
    held: BTreeMap<u32, Held>,
    /// Node index → the session whose K_ns the NS acknowledged.
    ns_sessions: BTreeMap<u32, u32>,
    /// Nodes to tell about cached data at their next registration.
    cached_waiting: BTreeSet<u32>,
    answers: BTreeMap<(u32, u32), (Time, Message)>,
    deadlines: BTreeSet<(Time, Due)>,
}

impl Servers {
    /// Checks the server links of `config` (key IDs non-zero, top bit clear, distinct from the
    /// AS's, the RSs' and each other's).
    pub(super) fn new(config: &DcConfig) -> Result<Self, DcConfigError> {
        let mut ids: Vec<u32> = vec![config.as_key_id];
        ids.extend(config.relays.iter().map(|r| r.key_id));
        let block = config.limits.sequence_block;
        let mut make = |l: &Option<ServerLink>| -> Result<Option<Link>, DcConfigError> {
            let Some(l) = l else {
                return Ok(None);
            };
            if l.key_id == 0 || l.key_id & 0x8000_0000 != 0 || ids.contains(&l.key_id) {
                return Err(DcConfigError::InvalidServerKeyId(l.key_id));
            }
            ids.push(l.key_id);
            Ok(Some(Link {
                addr: l.addr,
                key: SignalingKey::resume(&l.key, l.key_id, Role::A, l.high_water_mark, block),
                rtt: RttEstimator::default(),
            }))
        };
        let cs = make(&config.cs)?;
        let ns = make(&config.ns)?;
        Ok(Servers {
            cs,
            ns,
            limit: config.limits.max_server_requests,
            requests: BTreeMap::new(),
            notices: BTreeMap::new(),
            held: BTreeMap::new(),
            ns_sessions: BTreeMap::new(),
            cached_waiting: BTreeSet::new(),
            answers: BTreeMap::new(),
            deadlines: BTreeSet::new(),
        })
    }

    /// Whether `key_id` is the DC↔NS or DC↔CS key.
    pub(super) fn is_server_key(&self, key_id: u32) -> bool {
        self.which(key_id).is_some()
    }

    fn which(&self, key_id: u32) -> Option<Which> {
        if self.cs.as_ref().is_some_and(|l| l.key.key_id() == key_id) {
            Some(Which::Cs)
        } else if self.ns.as_ref().is_some_and(|l| l.key.key_id() == key_id) {
            Some(Which::Ns)
        } else {
            None
        }
    }

    fn link_mut(&mut self, which: Which) -> Option<&mut Link> {
        match which {
            Which::Cs => self.cs.as_mut(),
            Which::Ns => self.ns.as_mut(),
        }
    }

    /// Whether a node's answer (key ID = its session, transaction ID) is for a NOTIFICATION the
    /// DC sent it.
    pub(super) fn answers_notice(&self, key_id: u32, txid: u32) -> bool {
        self.notices.contains_key(&(key_id, txid))
    }

    /// Whether the REGISTRATION_RESPONSE for this request is held for the NS.
    fn holds_response(&self, key_id: u32, txid: u32) -> bool {
        self.held
            .values()
            .any(|h| h.from.key_id == key_id && h.from.txid == txid)
    }

    pub(super) fn next_deadline(&self) -> Option<(Time, &'static str)> {
        let &(at, due) = self.deadlines.first()?;
        let label = match due {
            Due::Request(..) => "NS/CS request retransmission",
            Due::Notice(..) => "cached-data notification retransmission",
            Due::Held(_) => "registration response held for the NS",
            Due::Answer(..) => "CS notification answer expiry",
        };
        Some((at, label))
    }

    fn fresh_txid<R: RngCore>(&self, which: Which, rng: &mut R) -> u32 {
        loop {
            let t = rng.next_u32();
            if t != 0 && !self.requests.contains_key(&(which, t)) && !self.held.contains_key(&t) {
                return t;
            }
        }
    }
}

/// What the node's registration was, for [`DirectionCoordinator::answer_registration`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RegistrationKind {
    /// A new registration; `first_of_session` when its session was used for the first time.
    New { first_of_session: bool },
    /// A retransmission answered again, or a deregistration.
    Other,
}

impl DirectionCoordinator {
    // -- Registration (spec/05 §5.2 steps 8-10) -------------------------------------------------

    /// Sends the REGISTRATION_RESPONSE, after handing the NS and CS the keys of a new session;
    /// holds it for the NS's ACK when the node wants push (see the module documentation).
    pub(super) fn answer_registration<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        from: Sender,
        node: u32,
        kind: RegistrationKind,
        response: Message,
        rng: &mut R,
    ) {
        match kind {
            RegistrationKind::Other => {
                if self.servers.holds_response(from.key_id, from.txid) {
                    return; // still waiting for the NS: absorbed (spec/05 §5.1)
                }
            }
            RegistrationKind::New { first_of_session } => {
                if first_of_session {
                    if self.servers.cs.is_some() {
                        // The CS announces what it holds once it has the session's key.
                        self.servers.cached_waiting.remove(&node);
                        self.distribute_node_cs_key(now, node, from.key_id, rng);
                    }
                    if let Some(ns_txid) = self.register_for_push(now, node, from.key_id, rng) {
                        self.hold_response(now, ns_txid, from, response);
                        return;
                    }
                } else if self.servers.cached_waiting.remove(&node) {
                    self.send_to_node(from.local, from.remote, from.key_id, &response, from.txid);
                    self.notify_cached_data(now, node, rng);
                    return;
                }
            }
        }
        self.send_to_node(from.local, from.remote, from.key_id, &response, from.txid);
    }

    /// The session's remaining life in whole seconds, and K_nd.
    fn session_secret(&self, now: Time, node: u32, key_id: u32) -> Option<(u32, SecretKey)> {
        let (id, s) = self.node(node)?.session.as_ref()?;
        if *id != key_id || s.expired {
            return None;
        }
        let left = s.deadline.checked_duration_since(now)?;
        let secs = u32::try_from(left.as_secs()).unwrap_or(u32::MAX);
        (secs > 0).then(|| (secs, s.key.key.clone()))
    }

    fn distribute_node_cs_key<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        node: u32,
        key_id: u32,
        rng: &mut R,
    ) {
        let Some((lifetime_s, k_nd)) = self.session_secret(now, node, key_id) else {
            return;
        };
        let Some(subject) = self.node(node).map(|n| n.fqdn.clone()) else {
            return;
        };
        let msg: Message = KeyDistribution {
            key_role: KeyRole::NodeCs,
            new_key_id: key_id,
            key: node_cs_key(&k_nd),
            lifetime_s,
            subject,
            extensions: Extensions::none(),
        }
        .into();
        self.start_request(now, Which::Cs, msg, Purpose::NodeCsKey, rng);
    }

    /// NOTIFICATION_REGISTRATION for a node that wants push; its transaction ID if sent.
    fn register_for_push<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        node: u32,
        key_id: u32,
        rng: &mut R,
    ) -> Option<u32> {
        self.servers.ns.as_ref()?;
        let n = self.node(node)?;
        if !n.reg.as_ref().is_some_and(|r| r.wants_notification) {
            return None;
        }
        let node_fqdn = n.fqdn.clone();
        let (lifetime_s, k_nd) = self.session_secret(now, node, key_id)?;
        let msg: Message = NotificationRegistration {
            node_fqdn,
            node_key_id: key_id,
            node_ns_key: node_ns_key(&k_nd),
            lifetime_s,
            extensions: Extensions::none(),
        }
        .into();
        let purpose = Purpose::NsRegistration {
            node,
            session: key_id,
        };
        self.start_request(now, Which::Ns, msg, purpose, rng)
    }

    fn hold_response(&mut self, now: Time, ns_txid: u32, from: Sender, response: Message) {
        if self.servers.held.len() >= self.servers.limit {
            self.send_to_node(from.local, from.remote, from.key_id, &response, from.txid);
            return;
        }
        let until = now + NS_REGISTRATION_WAIT;
        self.servers.held.insert(
            ns_txid,
            Held {
                until,
                from,
                response,
            },
        );
        self.servers.deadlines.insert((until, Due::Held(ns_txid)));
    }

    fn release_response(&mut self, ns_txid: u32) {
        let Some(h) = self.servers.held.remove(&ns_txid) else {
            return;
        };
        self.servers
            .deadlines
            .remove(&(h.until, Due::Held(ns_txid)));
        let f = h.from;
        self.send_to_node(f.local, f.remote, f.key_id, &h.response, f.txid);
    }

    // -- Requests to the servers ---------------------------------------------------------------

    /// Sends `msg` to a server and tracks it until its answer; its transaction ID if sent.
    fn start_request<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        which: Which,
        msg: Message,
        purpose: Purpose,
        rng: &mut R,
    ) -> Option<u32> {
        if self.servers.requests.len() >= self.servers.limit {
            return None;
        }
        let cfg = self.config.retransmit;
        let txid = self.servers.fresh_txid(which, rng);
        let link = self.servers.link_mut(which)?;
        let (addr, rto) = (link.addr, link.rtt.rto(&cfg));
        let tx = Transaction::start(now, txid, msg.msg_type(), addr, rto, &cfg, rng);
        self.servers
            .deadlines
            .insert((tx.deadline(), Due::Request(which, txid)));
        self.transmit_to_server(which, &msg, txid);
        self.servers
            .requests
            .insert((which, txid), Request { tx, msg, purpose });
        Some(txid)
    }

    fn transmit_to_server(&mut self, which: Which, msg: &Message, txid: u32) {
        let Some(link) = self.servers.link_mut(which) else {
            return;
        };
        let addr = link.addr;
        let key_id = link.key.key_id();
        let datagram = link.key.seal_to_vec(msg, txid, None);
        if let Some(through) = link.key.take_reserved_through() {
            self.output
                .event(DcEvent::SequenceReserved { key_id, through });
        }
        let local = self.server_local(addr);
        self.output.queue(Some(local), addr, datagram);
    }

    /// Answers the server at `remote` (arrived at `local`) under its key.
    fn answer_server(
        &mut self,
        which: Which,
        local: SocketAddr,
        remote: SocketAddr,
        msg: &Message,
        txid: u32,
    ) {
        let Some(link) = self.servers.link_mut(which) else {
            return;
        };
        let key_id = link.key.key_id();
        let datagram = link.key.seal_to_vec(msg, txid, None);
        if let Some(through) = link.key.take_reserved_through() {
            self.output
                .event(DcEvent::SequenceReserved { key_id, through });
        }
        self.output.queue(Some(local), remote, datagram);
    }

    /// One of the DC's addresses in `dst`'s family, or its first.
    fn server_local(&self, dst: SocketAddr) -> SocketAddr {
        let addrs = &self.config.addrs;
        addrs
            .iter()
            .find(|a| a.is_ipv6() == dst.is_ipv6())
            .or(addrs.first())
            .copied()
            .unwrap_or(dst)
    }

    // -- From the servers ----------------------------------------------------------------------

    /// A datagram under the DC↔NS or DC↔CS key: the CS's NOTIFICATION, or an answer.
    pub(super) fn on_server_datagram<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        buf: &mut [u8],
        header: &Header,
        rng: &mut R,
    ) -> Result<(), DropReason> {
        let which = self
            .servers
            .which(header.envelope.key_id)
            .ok_or(DropReason::UnknownKey)?;
        let link = self.servers.link_mut(which).ok_or(DropReason::UnknownKey)?;
        let (h, msg) = match link.key.open(buf) {
            Ok(opened) => opened,
            Err(DropReason::UndecodableBody(e)) if header.msg_type == MessageType::Notification => {
                let code = crate::cs::undecodable_code(&e);
                let error = error_msg(code, MessageType::Notification);
                self.answer_server(which, local, remote, &error, header.envelope.txid);
                return Err(DropReason::UndecodableBody(e));
            }
            Err(e) => return Err(e),
        };
        if !h.sealed {
            return Err(DropReason::UnsealedHint);
        }
        if h.envelope.role != Role::B {
            return Err(DropReason::Unexpected);
        }
        let txid = h.envelope.txid;
        match msg {
            Message::Notification(n) if which == Which::Cs => {
                self.on_cs_notification(now, local, remote, txid, n, rng);
                Ok(())
            }
            msg @ (Message::Ack(_) | Message::Error(_)) => {
                self.on_server_answer(now, which, txid, msg)
            }
            _ => Err(DropReason::Unexpected),
        }
    }

    /// NOTIFICATION(CachedData) from the CS: ACK it (once per transaction), tell the node.
    fn on_cs_notification<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        txid: u32,
        n: Notification,
        rng: &mut R,
    ) {
        let Some(cs_key) = self.servers.cs.as_ref().map(|l| l.key.key_id()) else {
            return;
        };
        if let Some((_, answer)) = self.servers.answers.get(&(cs_key, txid)) {
            let answer = answer.clone();
            self.answer_server(Which::Cs, local, remote, &answer, txid);
            return;
        }
        // The CS names the node by a session it received KEY_DISTRIBUTION(NodeCs) for, which
        // the DC keeps in the node's record until a newer session replaces it.
        let node = self.by_key.get(&n.node_key_id).copied();
        let answer = match (n.reason, node) {
            (NotifyReason::CachedData, Some(_)) => Ack {
                acked_type: MessageType::Notification.to_u8(),
                extensions: Extensions::none(),
            }
            .into(),
            (NotifyReason::CachedData, None) => {
                error_msg(ErrorCode::NotFound, MessageType::Notification)
            }
            _ => error_msg(ErrorCode::WrongState, MessageType::Notification),
        };
        self.answer_server(Which::Cs, local, remote, &answer, txid);
        if self.servers.answers.len() < self.servers.limit {
            let until = now + ANSWER_KEPT;
            self.servers.answers.insert((cs_key, txid), (until, answer));
            self.servers
                .deadlines
                .insert((until, Due::Answer(cs_key, txid)));
        }
        if let (NotifyReason::CachedData, Some(node)) = (n.reason, node) {
            self.notify_cached_data(now, node, rng);
        }
    }

    /// ACK or ERROR from a server for one of the DC's requests.
    fn on_server_answer(
        &mut self,
        now: Time,
        which: Which,
        txid: u32,
        msg: Message,
    ) -> Result<(), DropReason> {
        let Some(req) = self.servers.requests.get(&(which, txid)) else {
            return Err(DropReason::Unexpected);
        };
        let expected = req.tx.msg_type().to_u8();
        let refused = match &msg {
            Message::Ack(a) if a.acked_type == expected => None,
            Message::Error(e) if e.failed_type == expected => Some(e.code),
            _ => return Err(DropReason::Unexpected),
        };
        let Some(req) = self.servers.requests.remove(&(which, txid)) else {
            return Err(DropReason::Unexpected);
        };
        self.servers
            .deadlines
            .remove(&(req.tx.deadline(), Due::Request(which, txid)));
        if let Some(sample) = req.tx.rtt_sample(now) {
            if let Some(link) = self.servers.link_mut(which) {
                link.rtt.on_sample(sample);
            }
        }
        match (req.purpose, refused) {
            (Purpose::NsRegistration { node, session }, None) => {
                self.servers.ns_sessions.insert(node, session);
                self.release_response(txid);
            }
            (Purpose::NsRegistration { .. }, Some(code)) => {
                self.server_failed(&req, Some(code));
                self.release_response(txid);
            }
            // ERROR NotFound: the node has no channel open; the datagram went directly too.
            (Purpose::NsPush, Some(ErrorCode::NotFound)) => {}
            (_, Some(code)) => self.server_failed(&req, Some(code)),
            (_, None) => {}
        }
        Ok(())
    }

    fn server_failed(&mut self, req: &Request, refused: Option<ErrorCode>) {
        self.output.event(DcEvent::ServerRequestFailed {
            server: req.tx.remote(),
            msg_type: req.tx.msg_type(),
            refused,
        });
    }

    // -- To nodes ------------------------------------------------------------------------------

    /// Where to reach node `idx` over UDP: the DC address its mapping admits, its observed
    /// address (IPv4 first) and its session key ID.
    fn reach(&self, idx: u32) -> Option<(SocketAddr, SocketAddr, u32)> {
        let node = self.node(idx)?;
        let reg = node.reg.as_ref()?;
        let (key_id, _) = node.session.as_ref()?;
        let seen = reg.observed.iter().flatten().next()?;
        let local = *self.config.addrs.get(usize::from(seen.via))?;
        Some((local, seen.at.socket_addr(), *key_id))
    }

    /// Whether the DC may count on `remote` reaching the node: it heard from it within
    /// [`FRESH_PATH`], or the node is behind no NAT in that family (spec/05 §5.4).
    fn udp_path_fresh(&self, now: Time, node: u32, remote: SocketAddr) -> bool {
        let Some(reg) = self.node(node).and_then(|n| n.reg.as_ref()) else {
            return false;
        };
        reg.last_heard + FRESH_PATH > now || reg.nat(family(remote.ip())) == NatBehaviour::NoNat
    }

    /// Sends a DC → node datagram under K_nd: directly, and also through the NS when the node's
    /// UDP path is not fresh and the NS acknowledged its session (spec/05 §5.4, §5.5.4). Both
    /// copies are the same sealed datagram, so the node acts on whichever arrives first and its
    /// replay window drops the other.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn send_to_node_or_ns<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        key_id: u32,
        msg: &Message,
        txid: u32,
        rng: &mut R,
    ) {
        let datagram = match self.session_mut(key_id) {
            Some((_, s)) => s.key.seal(key_id, msg, txid),
            None => Err(SealError::NoKey),
        };
        let Ok(datagram) = datagram else {
            self.output.seal_failed();
            return;
        };
        let node = self.by_key.get(&key_id).copied();
        let through_ns = node.is_some_and(|n| {
            self.servers.ns_sessions.get(&n) == Some(&key_id)
                && !self.udp_path_fresh(now, n, remote)
        });
        if through_ns {
            let reason = match msg {
                Message::RouteDirection(_) => NotifyReason::IncomingTunnel,
                _ => NotifyReason::Signaling,
            };
            // A datagram too large for the payload goes directly only.
            if let Ok(payload) = Blob::new(datagram.clone()) {
                let push: Message = Notification {
                    node_key_id: key_id,
                    reason,
                    payload,
                    extensions: Extensions::none(),
                }
                .into();
                self.start_request(now, Which::Ns, push, Purpose::NsPush, rng);
            }
        }
        self.output.queue(Some(local), remote, Ok(datagram));
    }

    /// Tells node `node` that its CS holds data (spec/05 §5.14 "Notify"), retransmitted until
    /// its ACK; remembered for its next registration when it cannot be reached now.
    fn notify_cached_data<R: RngCore + CryptoRng>(&mut self, now: Time, node: u32, rng: &mut R) {
        let Some((local, remote, key_id)) = self.reach(node) else {
            self.servers.cached_waiting.insert(node);
            return;
        };
        if self.servers.notices.keys().any(|(k, _)| *k == key_id) {
            return; // one announcement at a time is enough
        }
        if self.servers.notices.len() >= self.servers.limit {
            self.servers.cached_waiting.insert(node);
            return;
        }
        let txid = loop {
            let t = rng.next_u32();
            if t != 0 && !self.servers.notices.contains_key(&(key_id, t)) {
                break t;
            }
        };
        let cfg = self.config.retransmit;
        let tx = Transaction::start(
            now,
            txid,
            MessageType::Notification,
            remote,
            cfg.initial_rto,
            &cfg,
            rng,
        );
        self.servers
            .deadlines
            .insert((tx.deadline(), Due::Notice(key_id, txid)));
        self.servers
            .notices
            .insert((key_id, txid), NodeNotice { node, tx, local });
        let msg = cached_data_notice(key_id);
        self.send_to_node_or_ns(now, local, remote, key_id, &msg, txid, rng);
    }

    /// The node's ACK (or ERROR) of a NOTIFICATION(CachedData).
    pub(super) fn on_notice_answer(&mut self, key_id: u32, txid: u32, msg: &Message) {
        let acked = match msg {
            Message::Ack(a) => a.acked_type == MessageType::Notification.to_u8(),
            Message::Error(e) => e.failed_type == MessageType::Notification.to_u8(),
            _ => false,
        };
        if !acked {
            return;
        }
        if let Some(n) = self.servers.notices.remove(&(key_id, txid)) {
            self.servers
                .deadlines
                .remove(&(n.tx.deadline(), Due::Notice(key_id, txid)));
        }
    }

    // -- Time ----------------------------------------------------------------------------------

    pub(super) fn servers_timeout<R: RngCore + CryptoRng>(&mut self, now: Time, rng: &mut R) {
        while let Some(&(at, due)) = self.servers.deadlines.first() {
            if at > now {
                break;
            }
            self.servers.deadlines.remove(&(at, due));
            match due {
                Due::Request(which, txid) => self.request_due(now, which, txid, rng),
                Due::Notice(key_id, txid) => self.notice_due(now, key_id, txid, rng),
                Due::Held(txid) => self.release_response(txid),
                Due::Answer(k, t) => {
                    if self.servers.answers.get(&(k, t)).is_some_and(|a| a.0 == at) {
                        self.servers.answers.remove(&(k, t));
                    }
                }
            }
        }
    }

    fn request_due<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        which: Which,
        txid: u32,
        rng: &mut R,
    ) {
        let cfg = self.config.retransmit;
        let Some(req) = self.servers.requests.get_mut(&(which, txid)) else {
            return;
        };
        match req.tx.on_timeout(now, &cfg, rng) {
            Expiry::NotDue => {
                let at = req.tx.deadline();
                self.servers
                    .deadlines
                    .insert((at, Due::Request(which, txid)));
            }
            Expiry::Retransmit => {
                let at = req.tx.deadline();
                let msg = req.msg.clone();
                self.servers
                    .deadlines
                    .insert((at, Due::Request(which, txid)));
                self.transmit_to_server(which, &msg, txid);
            }
            Expiry::Failed => {
                if let Some(req) = self.servers.requests.remove(&(which, txid)) {
                    self.server_failed(&req, None);
                    if matches!(req.purpose, Purpose::NsRegistration { .. }) {
                        self.release_response(txid);
                    }
                }
            }
        }
    }

    fn notice_due<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        key_id: u32,
        txid: u32,
        rng: &mut R,
    ) {
        let cfg = self.config.retransmit;
        let Some(n) = self.servers.notices.get_mut(&(key_id, txid)) else {
            return;
        };
        match n.tx.on_timeout(now, &cfg, rng) {
            Expiry::NotDue => {
                let at = n.tx.deadline();
                self.servers
                    .deadlines
                    .insert((at, Due::Notice(key_id, txid)));
            }
            Expiry::Retransmit => {
                let (at, node, local, remote) = (n.tx.deadline(), n.node, n.local, n.tx.remote());
                self.servers
                    .deadlines
                    .insert((at, Due::Notice(key_id, txid)));
                // The node may have moved since: send where the DC now sees it.
                let (local, remote) = match self.reach(node) {
                    Some((l, r, k)) if k == key_id => (l, r),
                    _ => (local, remote),
                };
                let msg = cached_data_notice(key_id);
                self.send_to_node_or_ns(now, local, remote, key_id, &msg, txid, rng);
            }
            Expiry::Failed => {
                let node = n.node;
                self.servers.notices.remove(&(key_id, txid));
                self.servers.cached_waiting.insert(node);
            }
        }
    }
}

fn cached_data_notice(key_id: u32) -> Message {
    Notification {
        node_key_id: key_id,
        reason: NotifyReason::CachedData,
        payload: Blob::default(),
        extensions: Extensions::none(),
    }
    .into()
}

#[cfg(test)]
mod tests {
    use super::super::VirtualPools;
    use super::*;
    use ntm_wire::{
        AddrList, DirectionRequest, RegistrationRequest, RouteKind, TransportAddr,
        MAX_SIGNALING_LEN,
    };
    use rand_chacha::ChaCha8Rng;
    use rand_core::SeedableRng;
    use std::net::Ipv4Addr;

    const AS_KEY_ID: u32 = 17;
    const CS_KEY_ID: u32 = 30;
    const NS_KEY_ID: u32 = 31;

    fn fqdn(s: &str) -> ntm_wire::Fqdn {
        ntm_wire::Fqdn::new(s).unwrap()
    }

    fn dc_addr() -> SocketAddr {
        SocketAddr::from(([203, 0, 113, 10], 4281))
    }

    fn as_addr() -> SocketAddr {
        SocketAddr::from(([203, 0, 113, 2], 4280))
    }

    fn cs_addr() -> SocketAddr {
        SocketAddr::from(([203, 0, 113, 30], 4283))
    }

    fn ns_addr() -> SocketAddr {
        SocketAddr::from(([203, 0, 113, 31], 4284))
    }

    /// A node's real (private) address and the address its NAT shows.
    fn private(n: u8) -> SocketAddr {
        SocketAddr::from(([192, 168, 0, n], 5000))
    }

    fn public(n: u8) -> SocketAddr {
        SocketAddr::from(([198, 51, 100, n], 40_000))
    }

    fn k_nd(key_id: u32) -> SecretKey {
        SecretKey::from_bytes([key_id as u8; 32])
    }

    fn config() -> DcConfig {
        let mut c = DcConfig::new(
            fqdn("dc1.example"),
            vec![dc_addr()],
            SecretKey::from_bytes([4; 32]),
            AS_KEY_ID,
            VirtualPools {
                v4: Ipv4Addr::new(100, 64, 1, 0),
                v4_prefix_len: 24,
                v6: "fd4e:544d:0:1::".parse().unwrap(),
            },
        );
        c.cs = Some(ServerLink::new(
            cs_addr(),
            SecretKey::from_bytes([0x0c; 32]),
            CS_KEY_ID,
        ));
        c.ns = Some(ServerLink::new(
            ns_addr(),
            SecretKey::from_bytes([0x0e; 32]),
            NS_KEY_ID,
        ));
        c
    }

    /// What left the DC: (to, datagram).
    type Out = Vec<(SocketAddr, Vec<u8>)>;

    /// The DC with the AS's, the servers' and the nodes' ends of the keys, driven by hand.
    struct Bench {
        dc: DirectionCoordinator,
        rng: ChaCha8Rng,
        now: Time,
        as_key: SignalingKey,
        cs: SignalingKey,
        ns: SignalingKey,
    }

    struct NodeEnd {
        key: SignalingKey,
        name: String,
    }

    impl Bench {
        fn new() -> Bench {
            Bench {
                dc: DirectionCoordinator::new(config()).unwrap(),
                rng: ChaCha8Rng::seed_from_u64(5),
                now: Time::ZERO,
                as_key: SignalingKey::new(&SecretKey::from_bytes([4; 32]), AS_KEY_ID, Role::A),
                cs: SignalingKey::new(&SecretKey::from_bytes([0x0c; 32]), CS_KEY_ID, Role::B),
                ns: SignalingKey::new(&SecretKey::from_bytes([0x0e; 32]), NS_KEY_ID, Role::B),
            }
        }

        fn out(&mut self) -> Out {
            let mut buf = [0u8; MAX_SIGNALING_LEN];
            std::iter::from_fn(|| {
                self.dc
                    .poll_transmit(self.now, &mut buf)
                    .map(|t| (t.dst, buf[..t.len].to_vec()))
            })
            .collect()
        }

        fn deliver(&mut self, from: SocketAddr, mut d: Vec<u8>) -> Out {
            self.dc
                .handle_datagram(self.now, dc_addr(), from, &mut d, &mut self.rng);
            self.out()
        }

        /// Runs the DC's timers up to `t`; returns what they sent.
        fn run_until(&mut self, t: Time) -> Out {
            let mut out = Vec::new();
            while let Some((at, _)) = self.dc.poll_timeout() {
                if at > t {
                    break;
                }
                self.now = at;
                self.dc.handle_timeout(at, &mut self.rng);
                out.extend(self.out());
            }
            self.now = t;
            out
        }

        fn login(&mut self, key_id: u32, name: &str) -> NodeEnd {
            let kd: Message = KeyDistribution {
                key_role: KeyRole::NodeDc,
                new_key_id: key_id,
                key: k_nd(key_id),
                lifetime_s: 86_400,
                subject: fqdn(name),
                extensions: Extensions::none(),
            }
            .into();
            let d = self.as_key.seal_to_vec(&kd, key_id, None).unwrap();
            assert_eq!(self.deliver(as_addr(), d).len(), 1);
            NodeEnd {
                key: SignalingKey::new(&k_nd(key_id), key_id, Role::A),
                name: name.to_owned(),
            }
        }

        /// REGISTRATION_REQUEST from `from` with `local` as the node's only address.
        fn register(
            &mut self,
            node: &mut NodeEnd,
            from: SocketAddr,
            local: SocketAddr,
            push: bool,
            txid: u32,
        ) -> Out {
            let req: Message = RegistrationRequest {
                node_fqdn: fqdn(&node.name),
                local_addrs: AddrList::new(vec![TransportAddr::new(local)]).unwrap(),
                nat_mapping: NatBehaviour::EndpointIndependent,
                node_public_key: [7; 32],
                wants_notification: push,
                extensions: Extensions::none(),
            }
            .into();
            let d = node.key.seal_to_vec(&req, txid, None).unwrap();
            self.deliver(from, d)
        }

        fn send_from_node(
            &mut self,
            node: &mut NodeEnd,
            from: SocketAddr,
            msg: &Message,
            txid: u32,
        ) -> Out {
            let d = node.key.seal_to_vec(msg, txid, None).unwrap();
            self.deliver(from, d)
        }

        /// The CS (or NS) answers ACK to one of the DC's requests.
        fn server_ack(&mut self, which: Which, mut request: Vec<u8>) -> Out {
            let key = match which {
                Which::Cs => &mut self.cs,
                Which::Ns => &mut self.ns,
            };
            let (h, msg) = key.open(&mut request).unwrap();
            let ack: Message = Ack {
                acked_type: msg.msg_type().to_u8(),
                extensions: Extensions::none(),
            }
            .into();
            let d = key.seal_to_vec(&ack, h.envelope.txid, None).unwrap();
            let from = match which {
                Which::Cs => cs_addr(),
                Which::Ns => ns_addr(),
            };
            self.deliver(from, d)
        }

        fn cs_notification(&mut self, node_key_id: u32, txid: u32) -> Out {
            let n: Message = cached_data_notice(node_key_id);
            let d = self.cs.seal_to_vec(&n, txid, None).unwrap();
            self.deliver(cs_addr(), d)
        }

        fn advance(&mut self, d: Duration) -> Out {
            let t = self.now + d;
            self.run_until(t)
        }
    }

    /// The datagrams to `to`, opened under a fresh copy of `key` (the receiver's own end stays
    /// untouched, so that it can still take them).
    fn opened(out: &Out, to: SocketAddr, key: &SignalingKey) -> Vec<(u32, Message)> {
        let secret = match key.key_id() {
            CS_KEY_ID => SecretKey::from_bytes([0x0c; 32]),
            NS_KEY_ID => SecretKey::from_bytes([0x0e; 32]),
            id => k_nd(id),
        };
        out.iter()
            .filter(|(dst, _)| *dst == to)
            .map(|(_, d)| {
                let mut d = d.clone();
                let mut k = SignalingKey::new(&secret, key.key_id(), key.role());
                let (h, m) = k.open(&mut d).unwrap();
                (h.envelope.txid, m)
            })
            .collect()
    }

    fn raw_to(out: &Out, to: SocketAddr) -> Vec<Vec<u8>> {
        out.iter()
            .filter(|(dst, _)| *dst == to)
            .map(|(_, d)| d.clone())
            .collect()
    }

    #[test]
    fn a_new_session_hands_the_cs_and_ns_their_keys_and_the_response_waits_for_the_ns() {
        let mut b = Bench::new();
        let mut node = b.login(0x21, "n1.dc1.example");
        let out = b.register(&mut node, public(1), private(1), true, 7);
        // No REGISTRATION_RESPONSE yet: it waits for the NS.
        assert!(raw_to(&out, public(1)).is_empty(), "{out:?}");
        let kd = opened(&out, cs_addr(), &b.cs);
        let [(_, Message::KeyDistribution(kd))] = kd.as_slice() else {
            panic!("{kd:?}");
        };
        assert_eq!(kd.key_role, KeyRole::NodeCs);
        assert_eq!(kd.new_key_id, 0x21);
        assert_eq!(kd.key, node_cs_key(&k_nd(0x21)));
        assert_eq!(kd.subject, fqdn("n1.dc1.example"));
        assert!(kd.lifetime_s > 86_000 && kd.lifetime_s <= 86_400);
        let reg = opened(&out, ns_addr(), &b.ns);
        let [(_, Message::NotificationRegistration(r))] = reg.as_slice() else {
            panic!("{reg:?}");
        };
        assert_eq!(r.node_key_id, 0x21);
        assert_eq!(r.node_ns_key, node_ns_key(&k_nd(0x21)));
        assert_eq!(r.node_fqdn, fqdn("n1.dc1.example"));
        // The node's retransmission is absorbed while the NS has not answered.
        let again = b.register(&mut node, public(1), private(1), true, 7);
        assert!(raw_to(&again, public(1)).is_empty(), "{again:?}");
        // The NS's ACK releases the response.
        let ns_req = raw_to(&out, ns_addr()).remove(0);
        let released = b.server_ack(Which::Ns, ns_req);
        let answers = opened(&released, public(1), &node.key);
        assert!(
            matches!(answers.as_slice(), [(7, Message::RegistrationResponse(_))]),
            "{answers:?}"
        );
        // A refresh under the same session hands out no key again, and is answered at once.
        let cs_req = raw_to(&out, cs_addr()).remove(0);
        b.server_ack(Which::Cs, cs_req);
        let refresh = b.register(&mut node, public(1), private(1), true, 8);
        assert_eq!(refresh.len(), 1, "{refresh:?}");
        assert_eq!(refresh[0].0, public(1));
        // Nothing is outstanding: no retransmission follows.
        assert!(b.advance(Duration::from_secs(20)).is_empty());
    }

    #[test]
    fn a_silent_ns_delays_the_response_by_at_most_the_wait_and_the_cs_key_is_retransmitted() {
        let mut b = Bench::new();
        let mut node = b.login(0x22, "n2.dc1.example");
        let out = b.register(&mut node, public(2), private(2), true, 9);
        assert!(raw_to(&out, public(2)).is_empty());
        let later = b.advance(NS_REGISTRATION_WAIT);
        let answers = opened(&later, public(2), &node.key);
        assert!(
            matches!(answers.as_slice(), [(9, Message::RegistrationResponse(_))]),
            "{answers:?}"
        );
        // Both requests went out again in that second (initial RTO 250 ms, then 500 ms).
        assert!(raw_to(&later, ns_addr()).len() >= 2, "{later:?}");
        let kds = raw_to(&later, cs_addr());
        assert!(kds.len() >= 2, "{later:?}");
        // The CS answers a retransmission: no more copies, and no failure.
        b.server_ack(Which::Cs, kds.last().unwrap().clone());
        let rest = b.advance(Duration::from_secs(30));
        assert!(raw_to(&rest, cs_addr()).is_empty(), "{rest:?}");
        let failed: Vec<DcEvent> = std::iter::from_fn(|| b.dc.poll_event())
            .filter(|e| matches!(e, DcEvent::ServerRequestFailed { .. }))
            .collect();
        // Only the NS, which never answered, failed.
        assert_eq!(
            failed,
            [DcEvent::ServerRequestFailed {
                server: ns_addr(),
                msg_type: MessageType::NotificationRegistration,
                refused: None,
            }]
        );
    }

    #[test]
    fn cached_data_is_acked_to_the_cs_once_and_announced_to_the_node_until_it_acks() {
        let mut b = Bench::new();
        let mut node = b.login(0x23, "n3.dc1.example");
        b.register(&mut node, public(3), public(3), false, 1);
        let out = b.cs_notification(0x23, 0x500);
        let acks = opened(&out, cs_addr(), &b.cs);
        assert!(
            matches!(acks.as_slice(), [(0x500, Message::Ack(a))] if a.acked_type == 0x3c),
            "{acks:?}"
        );
        let notices = opened(&out, public(3), &node.key);
        let [(txid, Message::Notification(n))] = notices.as_slice() else {
            panic!("{notices:?}");
        };
        assert_eq!((n.node_key_id, n.reason), (0x23, NotifyReason::CachedData));
        let txid = *txid;
        // The CS's retransmission is ACKed again and announces nothing more.
        let again = b.cs_notification(0x23, 0x500);
        assert_eq!(opened(&again, cs_addr(), &b.cs).len(), 1);
        assert!(raw_to(&again, public(3)).is_empty());
        // Unacknowledged, the announcement is retransmitted with the same transaction ID.
        let retx = b.advance(Duration::from_millis(400));
        let resent = opened(&retx, public(3), &node.key);
        assert!(
            matches!(resent.as_slice(), [(t, Message::Notification(_))] if *t == txid),
            "{resent:?}"
        );
        let ack: Message = Ack {
            acked_type: 0x3c,
            extensions: Extensions::none(),
        }
        .into();
        assert!(b
            .send_from_node(&mut node, public(3), &ack, txid)
            .is_empty());
        let later = b.advance(Duration::from_secs(30));
        assert!(raw_to(&later, public(3)).is_empty(), "{later:?}");
    }

    #[test]
    fn cached_data_for_a_node_without_registration_is_announced_at_its_next_registration() {
        let mut b = Bench::new();
        let mut node = b.login(0x24, "n4.dc1.example");
        b.register(&mut node, public(4), public(4), false, 1);
        // Deregistration: empty local_addrs.
        let bye: Message = RegistrationRequest {
            node_fqdn: fqdn("n4.dc1.example"),
            local_addrs: AddrList::empty(),
            nat_mapping: NatBehaviour::Unknown,
            node_public_key: [7; 32],
            wants_notification: false,
            extensions: Extensions::none(),
        }
        .into();
        b.send_from_node(&mut node, public(4), &bye, 2);
        let out = b.cs_notification(0x24, 0x501);
        assert!(matches!(
            opened(&out, cs_addr(), &b.cs).as_slice(),
            [(_, Message::Ack(_))]
        ));
        assert!(raw_to(&out, public(4)).is_empty(), "{out:?}");
        // Back under the same session: the response, then the announcement.
        let back = b.register(&mut node, public(5), public(5), false, 3);
        let got = opened(&back, public(5), &node.key);
        assert!(
            matches!(
                got.as_slice(),
                [(3, Message::RegistrationResponse(_)), (_, Message::Notification(n))]
                    if n.reason == NotifyReason::CachedData
            ),
            "{got:?}"
        );
        // A session the DC does not know is refused.
        let unknown = b.cs_notification(0x99, 0x502);
        assert!(matches!(
            opened(&unknown, cs_addr(), &b.cs).as_slice(),
            [(_, Message::Error(e))] if e.code == ErrorCode::NotFound
        ));
    }

    /// A node behind a NAT whose channel the NS acknowledged; registered at `public(n)`.
    fn pushed_node(b: &mut Bench, key_id: u32, n: u8) -> NodeEnd {
        let mut node = b.login(key_id, &format!("p{n}.dc1.example"));
        let out = b.register(&mut node, public(n), private(n), true, 1);
        let ns_req = raw_to(&out, ns_addr()).remove(0);
        let cs_req = raw_to(&out, cs_addr()).remove(0);
        assert_eq!(b.server_ack(Which::Ns, ns_req).len(), 1);
        b.server_ack(Which::Cs, cs_req);
        node
    }

    #[test]
    fn a_node_heard_from_within_25_s_is_reached_directly_and_a_stale_one_through_the_ns_too() {
        let mut b = Bench::new();
        let mut node = pushed_node(&mut b, 0x25, 6);
        // Fresh: directly only.
        let out = b.cs_notification(0x25, 0x600);
        assert!(raw_to(&out, ns_addr()).is_empty(), "{out:?}");
        assert_eq!(raw_to(&out, public(6)).len(), 1);
        let txid = opened(&out, public(6), &node.key)[0].0;
        let ack: Message = Ack {
            acked_type: 0x3c,
            extensions: Extensions::none(),
        }
        .into();
        b.send_from_node(&mut node, public(6), &ack, txid);
        // 26 s of silence: the same sealed datagram goes directly and inside a NOTIFICATION.
        b.advance(Duration::from_secs(26));
        let out = b.cs_notification(0x25, 0x601);
        let direct = raw_to(&out, public(6));
        assert_eq!(direct.len(), 1, "{out:?}");
        let pushed = opened(&out, ns_addr(), &b.ns);
        let [(_, Message::Notification(n))] = pushed.as_slice() else {
            panic!("{pushed:?}");
        };
        assert_eq!((n.node_key_id, n.reason), (0x25, NotifyReason::Signaling));
        assert_eq!(n.payload.as_bytes(), direct[0].as_slice());
        let mut inner = n.payload.as_bytes().to_vec();
        let (_, m) = node.key.open(&mut inner).unwrap();
        assert!(matches!(m, Message::Notification(ref i) if i.reason == NotifyReason::CachedData));
        // ERROR NotFound from the NS (no channel open) ends its request quietly.
        let req = raw_to(&out, ns_addr()).remove(0);
        let mut req2 = req.clone();
        let (h, _) = b.ns.open(&mut req2).unwrap();
        let nf = error_msg(ErrorCode::NotFound, MessageType::Notification);
        let d = b.ns.seal_to_vec(&nf, h.envelope.txid, None).unwrap();
        assert!(b.deliver(ns_addr(), d).is_empty());
        let later = b.advance(Duration::from_secs(10));
        assert!(raw_to(&later, ns_addr()).iter().all(|d| {
            let mut d = d.clone();
            b.ns.open(&mut d).unwrap().0.envelope.txid != h.envelope.txid
        }));
        assert!(!std::iter::from_fn(|| b.dc.poll_event()).any(|e| matches!(
            e,
            DcEvent::ServerRequestFailed {
                refused: Some(_),
                ..
            }
        )));
    }

    #[test]
    fn a_stale_target_gets_its_route_direction_through_the_ns_as_incoming_tunnel() {
        let mut b = Bench::new();
        let mut target = pushed_node(&mut b, 0x26, 7);
        let mut caller = b.login(0x27, "c.dc1.example");
        b.register(&mut caller, public(8), public(8), false, 1);
        b.advance(Duration::from_secs(30));
        // The caller stays fresh; the target has been silent for 30 s.
        b.register(&mut caller, public(8), public(8), false, 2);
        let ask: Message = DirectionRequest {
            peer_fqdn: fqdn("p7.dc1.example"),
            rebuild_path_id: 0,
            extensions: Extensions::none(),
        }
        .into();
        let out = b.send_from_node(&mut caller, public(8), &ask, 3);
        let pushed = opened(&out, ns_addr(), &b.ns);
        let [(_, Message::Notification(n))] = pushed.as_slice() else {
            panic!("{pushed:?}");
        };
        assert_eq!(
            (n.node_key_id, n.reason),
            (0x26, NotifyReason::IncomingTunnel)
        );
        let mut inner = n.payload.as_bytes().to_vec();
        let (_, m) = target.key.open(&mut inner).unwrap();
        let Message::RouteDirection(rd) = m else {
            panic!("{m:?}");
        };
        assert_eq!(rd.route, RouteKind::Direct);
        assert_eq!(rd.peer_fqdn, fqdn("c.dc1.example"));
        // The caller's own direction is not pushed: it is fresh.
        assert_eq!(pushed.len(), 1);
        assert_eq!(raw_to(&out, public(8)).len(), 1);
    }

    #[test]
    fn server_key_ids_must_be_distinct_non_zero_and_top_bit_clear() {
        for bad in [0, 0x8000_0001, AS_KEY_ID, NS_KEY_ID] {
            let mut c = config();
            if let Some(cs) = c.cs.as_mut() {
                cs.key_id = bad;
            }
            assert!(
                matches!(
                    DirectionCoordinator::new(c),
                    Err(DcConfigError::InvalidServerKeyId(id)) if id == bad || id == NS_KEY_ID
                ),
                "{bad:#x}"
            );
        }
    }
}
