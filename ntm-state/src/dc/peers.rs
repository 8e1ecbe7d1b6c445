//! Other DCs: the directory, discovery by DNS (spec/05 §5.12), DC↔DC key bootstrap (§5.5.3),
//! and directions between two domains (§5.5.1): the requester's DC asks the target's DC with
//! NTM_INFO_REQUEST(`decide_route = 1`), the target's DC decides, directs its node and answers
//! with the requester's ROUTE_DIRECTION, which the requester's DC relays to its node.
//!
//! ```text
//! DC_MN                                   DC_CN
//!  | [first contact] DNS NS zone ──▶ resolver (answer cached)
//!  | KEY_DISTRIBUTION(DcDc) [bootstrap, E_a] ──▶ installs K_dd, ACK [K_dd]
//!  | NTM_INFO_REQUEST [K_dd]               ──▶ route selection, ROUTE_DIRECTION to CN
//!  | ◀── ROUTE_DIRECTION [K_dd] (the answer; resent for a retransmitted request)
//!  | ROUTE_DIRECTION [K_nd] ──▶ MN (until ACK)
//! ```
//!
//! A rebuild across two domains is treated as a new direction decided by the target's DC.

use core::time::Duration;
use std::collections::BTreeMap;
use std::net::SocketAddr;

use ntm_wire::crypto::{dc_bootstrap_key, x25519, x25519_public};
use ntm_wire::{
    DirectionRequest, ErrorCode, Extensions, Fqdn, Header, KeyDistribution, KeyRole, Message,
    MessageType, NtmInfoRequest, NtmInfoResponse, PublicKeyBytes, Role, SecretKey,
};
use rand_core::{CryptoRng, RngCore};

use super::directions::{Answered, Party, Purpose};
use super::{error_msg, is_node_of, DirectionCoordinator, Sender};
use crate::dns::{DcDiscovery, DirectoryZone, DiscoveryConfig, DiscoveryEvent, Lookup};
use crate::route::select_route;
use crate::signaling::{DropReason, SignalingKey, Transaction};
use crate::time::Time;

/// Another DC as the directory (published by the AS, installed in every DC) lists it: who it is
/// (DC ID, static key) and where to find it when DNS fails.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectoryEntry {
    pub zone: Fqdn,
    /// Unique in the directory; the key ID of this DC's bootstrap KEY_DISTRIBUTIONs.
    pub dc_id: u32,
    pub public_key: PublicKeyBytes,
    /// Fallback signaling addresses (their port also applies to addresses DNS finds).
    pub addrs: Vec<SocketAddr>,
}

/// A DC↔DC key as one of its holders sees it.
struct PeerKey {
    peer: usize,
    key: SignalingKey,
    expires: Time,
}

/// A DIRECTION_REQUEST waiting for the other DC's address.
struct Waiting {
    peer: usize,
    from: Sender,
    node_idx: u32,
    target: Fqdn,
    since: Time,
}

/// A bootstrap KEY_DISTRIBUTION in flight.
struct Bootstrap {
    tx: Transaction,
    new_key_id: u32,
    key: SignalingKey,
    msg: Message,
    ephemeral: PublicKeyBytes,
}

/// How long a DIRECTION_REQUEST may wait for discovery before the node is told Unavailable.
const WAIT_LIMIT: Duration = Duration::from_secs(5);

pub(super) struct Peers {
    discovery: Option<DcDiscovery>,
    resolvers: Vec<SocketAddr>,
    keys: BTreeMap<u32, PeerKey>,
    /// The key each peer's messages go under (the newest).
    current: BTreeMap<usize, u32>,
    addrs: BTreeMap<usize, SocketAddr>,
    bootstraps: BTreeMap<usize, Bootstrap>,
    /// Bootstrap ephemerals accepted: (until, transaction ID, new key ID) (spec/05 §5.5.3).
    seen: BTreeMap<PublicKeyBytes, (Time, u32, u32)>,
    waiting: Vec<Waiting>,
}

impl Peers {
    pub(super) fn new(directory: &[DirectoryEntry], resolvers: &[SocketAddr]) -> Peers {
        let zones: Vec<DirectoryZone> = directory
            .iter()
            .map(|e| DirectoryZone {
                zone: e.zone.clone(),
                addrs: e.addrs.clone(),
            })
            .collect();
        let discovery = (!directory.is_empty())
            .then(|| DcDiscovery::new(DiscoveryConfig::new(resolvers.to_vec(), zones)).ok())
            .flatten();
        Peers {
            discovery,
            resolvers: resolvers.to_vec(),
            keys: BTreeMap::new(),
            current: BTreeMap::new(),
            addrs: BTreeMap::new(),
            bootstraps: BTreeMap::new(),
            seen: BTreeMap::new(),
            waiting: Vec::new(),
        }
    }

    pub(super) fn is_resolver(&self, a: SocketAddr) -> bool {
        self.resolvers.contains(&a)
    }

    pub(super) fn holds_key(&self, key_id: u32) -> bool {
        self.keys.contains_key(&key_id)
    }

    pub(super) fn next_deadline(&self) -> Option<(Time, &'static str)> {
        let mut best: Option<(Time, &'static str)> = None;
        let mut take = |t: Time, l: &'static str| {
            if best.is_none_or(|(b, _)| t < b) {
                best = Some((t, l));
            }
        };
        if let Some(d) = self.discovery.as_ref().and_then(DcDiscovery::poll_timeout) {
            take(d.0, d.1);
        }
        for b in self.bootstraps.values() {
            take(b.tx.deadline(), "DC key bootstrap retransmission");
        }
        for k in self.keys.values() {
            take(k.expires, "DC-DC key expiry");
        }
        for w in &self.waiting {
            take(w.since + WAIT_LIMIT, "direction waiting for DC discovery");
        }
        best
    }
}

/// The zone of a node name: the name minus its first label.
fn zone_of(name: &Fqdn) -> Option<Fqdn> {
    let s = name.as_str();
    let dot = s.find('.')?;
    Fqdn::new(s.get(dot + 1..)?).ok()
}

impl DirectionCoordinator {
    fn directory_index(&self, zone: &Fqdn) -> Option<usize> {
        self.config.directory.iter().position(|e| &e.zone == zone)
    }

    /// Seals `msg` under the DC↔DC key `key_id` and queues it.
    pub(super) fn send_to_peer(
        &mut self,
        local: SocketAddr,
        remote: SocketAddr,
        key_id: u32,
        msg: &Message,
        txid: u32,
    ) {
        let datagram = match self.peers.keys.get_mut(&key_id) {
            Some(k) => k.key.seal_to_vec(msg, txid, None),
            None => Err(crate::signaling::SealError::NoKey),
        };
        self.output.queue(Some(local), remote, datagram);
    }

    // -- The requester's DC ----------------------------------------------------------------------

    pub(super) fn start_remote_direction<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        from: Sender,
        node_idx: u32,
        req: DirectionRequest,
        rng: &mut R,
    ) {
        let not_found = error_msg(ErrorCode::NotFound, MessageType::DirectionRequest);
        let Some(peer) = zone_of(&req.peer_fqdn).and_then(|z| self.directory_index(&z)) else {
            // A zone outside the directory cannot be authenticated (spec/05 §5.12).
            self.answer_direction(now, from, not_found);
            return;
        };
        if self.peers.waiting.len() >= self.config.limits.max_pending_directions {
            let e = error_msg(ErrorCode::Unavailable, MessageType::DirectionRequest);
            self.answer_direction(now, from, e);
            return;
        }
        self.remember_answer(now, (from.key_id, from.txid), Answered::Path(0));
        self.peers.waiting.push(Waiting {
            peer,
            from,
            node_idx,
            target: req.peer_fqdn,
            since: now,
        });
        if self.peers.addrs.contains_key(&peer) && self.peers.current.contains_key(&peer) {
            self.release_waiting(now, peer, rng);
            return;
        }
        if self.peers.addrs.contains_key(&peer) {
            self.bootstrap(now, peer, rng);
            return;
        }
        let Some(zone) = self.config.directory.get(peer).map(|e| e.zone.clone()) else {
            return;
        };
        let lookup = match self.peers.discovery.as_mut() {
            Some(d) => d.lookup(now, &zone, rng),
            None => Lookup::NotFound,
        };
        self.drain_discovery();
        match lookup {
            Lookup::Ready { addrs, .. } => self.peer_found(now, peer, &addrs, rng),
            Lookup::Pending => {}
            Lookup::NotFound => self.fail_waiting(now, peer, ErrorCode::NotFound),
            Lookup::Failed | Lookup::Busy => self.fail_waiting(now, peer, ErrorCode::Unavailable),
        }
    }

    /// Discovery's queries go out with the DC's other datagrams.
    fn drain_discovery(&mut self) {
        let Some(d) = self.peers.discovery.as_mut() else {
            return;
        };
        let mut buf = [0u8; 1500];
        while let Some(t) = d.poll_transmit(Time::ZERO, &mut buf) {
            if let Some(b) = buf.get(..t.len) {
                let src = t.src.or_else(|| {
                    self.config
                        .addrs
                        .iter()
                        .copied()
                        .find(|a| a.is_ipv6() == t.dst.is_ipv6())
                });
                self.output.queue(src, t.dst, Ok(b.to_vec()));
            }
        }
    }

    fn discovery_events<R: RngCore + CryptoRng>(&mut self, now: Time, rng: &mut R) {
        self.drain_discovery();
        while let Some(e) = self
            .peers
            .discovery
            .as_mut()
            .and_then(DcDiscovery::poll_event)
        {
            match e {
                DiscoveryEvent::Resolved { zone, addrs, .. } => {
                    if let Some(peer) = self.directory_index(&zone) {
                        self.peer_found(now, peer, &addrs, rng);
                    }
                }
                DiscoveryEvent::Failed { zone } => {
                    if let Some(peer) = self.directory_index(&zone) {
                        self.fail_waiting(now, peer, ErrorCode::Unavailable);
                    }
                }
            }
        }
    }

    /// A DNS answer from a configured resolver.
    pub(super) fn on_resolver_datagram<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        buf: &[u8],
        rng: &mut R,
    ) {
        if let Some(d) = self.peers.discovery.as_mut() {
            d.handle_datagram(now, local, remote, buf, rng);
        }
        self.discovery_events(now, rng);
    }

    fn peer_found<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        peer: usize,
        addrs: &[SocketAddr],
        rng: &mut R,
    ) {
        let own = &self.config.addrs;
        let Some(addr) = addrs
            .iter()
            .copied()
            .find(|a| own.iter().any(|o| o.is_ipv6() == a.is_ipv6()))
        else {
            self.fail_waiting(now, peer, ErrorCode::Unavailable);
            return;
        };
        self.peers.addrs.insert(peer, addr);
        if self.peers.current.contains_key(&peer) {
            self.release_waiting(now, peer, rng);
        } else {
            self.bootstrap(now, peer, rng);
        }
    }

    fn fail_waiting(&mut self, now: Time, peer: usize, code: ErrorCode) {
        let (failed, kept): (Vec<Waiting>, Vec<Waiting>) =
            self.peers.waiting.drain(..).partition(|w| w.peer == peer);
        self.peers.waiting = kept;
        for w in failed {
            self.answer_direction(now, w.from, error_msg(code, MessageType::DirectionRequest));
        }
    }

    /// First contact: a fresh K_dd in a KEY_DISTRIBUTION sealed under the bootstrap key, and
    /// the waiting NTM_INFO_REQUESTs right behind it under the new key (spec/05 §5.5.3).
    fn bootstrap<R: RngCore + CryptoRng>(&mut self, now: Time, peer: usize, rng: &mut R) {
        if self.peers.bootstraps.contains_key(&peer) {
            return;
        }
        let (Some(entry), Some(secret), Some(&dst)) = (
            self.config.directory.get(peer).cloned(),
            self.config.static_secret.clone(),
            self.peers.addrs.get(&peer),
        ) else {
            self.fail_waiting(now, peer, ErrorCode::Unavailable);
            return;
        };
        let mut e = [0u8; 32];
        rng.fill_bytes(&mut e);
        let e = zeroize::Zeroizing::new(e);
        let e_pub = x25519_public(&e);
        let (Ok(dh_es), Ok(dh_ss)) = (
            x25519(&e, &entry.public_key),
            x25519(secret.expose(), &entry.public_key),
        ) else {
            self.fail_waiting(now, peer, ErrorCode::Unavailable);
            return;
        };
        let own_public = x25519_public(secret.expose());
        let boot = dc_bootstrap_key(&dh_es, &dh_ss, &e_pub, &own_public, &entry.public_key);
        let new_key_id = loop {
            let id = rng.next_u32() | 0x8000_0000;
            if !self.peers.keys.contains_key(&id) {
                break id;
            }
        };
        let mut k = [0u8; 32];
        rng.fill_bytes(&mut k);
        let k_dd = SecretKey::from_bytes(k);
        let lifetime = self.config.dc_key_lifetime;
        let msg: Message = KeyDistribution {
            key_role: KeyRole::DcDc,
            new_key_id,
            key: k_dd.clone(),
            lifetime_s: u32::try_from(lifetime.as_secs()).unwrap_or(u32::MAX),
            subject: self.config.zone.clone(),
            extensions: Extensions::none(),
        }
        .into();
        let mut key = SignalingKey::new(&boot, self.config.dc_id, Role::A);
        let txid = rng.next_u32();
        let datagram = key.seal_to_vec(&msg, txid, Some(e_pub));
        let local = self.local_for(dst);
        self.output.queue(Some(local), dst, datagram);
        let rto = self.directions.rtt.rto(dst, &self.config.retransmit);
        let tx = Transaction::start(
            now,
            txid,
            MessageType::KeyDistribution,
            dst,
            rto,
            &self.config.retransmit,
            rng,
        );
        self.peers.bootstraps.insert(
            peer,
            Bootstrap {
                tx,
                new_key_id,
                key,
                msg,
                ephemeral: e_pub,
            },
        );
        // We distributed it: role A under it, usable at once.
        self.peers.keys.insert(
            new_key_id,
            PeerKey {
                peer,
                key: SignalingKey::new(&k_dd, new_key_id, Role::A),
                expires: now + lifetime,
            },
        );
        self.peers.current.insert(peer, new_key_id);
        self.release_waiting(now, peer, rng);
    }

    /// Sends the NTM_INFO_REQUEST of every direction waiting for `peer`.
    fn release_waiting<R: RngCore + CryptoRng>(&mut self, now: Time, peer: usize, rng: &mut R) {
        let (ready, kept): (Vec<Waiting>, Vec<Waiting>) =
            self.peers.waiting.drain(..).partition(|w| w.peer == peer);
        self.peers.waiting = kept;
        let (Some(&key_id), Some(&dst)) =
            (self.peers.current.get(&peer), self.peers.addrs.get(&peer))
        else {
            return;
        };
        for w in ready {
            let Some(requester) = self.node_info(w.node_idx) else {
                continue;
            };
            let msg: Message = NtmInfoRequest {
                target_fqdn: w.target,
                requester,
                decide_route: true,
                extensions: Extensions::none(),
            }
            .into();
            let txid = self.fresh_txid(key_id, rng);
            let local = self.local_for(dst);
            let rto = self.directions.rtt.rto(dst, &self.config.retransmit);
            let tx = Transaction::start(
                now,
                txid,
                MessageType::NtmInfoRequest,
                dst,
                rto,
                &self.config.retransmit,
                rng,
            );
            self.send_to_peer(local, dst, key_id, &msg, txid);
            self.track(
                key_id,
                tx,
                Purpose::NtmInfo {
                    node_idx: w.node_idx,
                    request: w.from,
                },
                local,
            );
            self.directions.kept.insert((key_id, txid), msg);
        }
    }

    // -- Both sides: datagrams under DC↔DC keys --------------------------------------------------

    /// A bootstrap KEY_DISTRIBUTION from another DC (key ID = its DC ID, header ephemeral).
    pub(super) fn on_bootstrap(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        buf: &mut [u8],
        header: &Header,
    ) -> Result<(), DropReason> {
        let dc_id = header.envelope.key_id;
        let Some(peer) = self.config.directory.iter().position(|e| e.dc_id == dc_id) else {
            return Err(DropReason::UnknownKey);
        };
        let (Some(entry), Some(secret), Some(e_a)) = (
            self.config.directory.get(peer).cloned(),
            self.config.static_secret.clone(),
            header.envelope.ephemeral,
        ) else {
            return Err(DropReason::UnknownKey);
        };
        let (Ok(dh_es), Ok(dh_ss)) = (
            x25519(secret.expose(), &e_a),
            x25519(secret.expose(), &entry.public_key),
        ) else {
            return Err(DropReason::NonContributoryKey);
        };
        let own_public = x25519_public(secret.expose());
        let boot = dc_bootstrap_key(&dh_es, &dh_ss, &e_a, &entry.public_key, &own_public);
        let mut key = SignalingKey::new(&boot, dc_id, Role::B);
        let (h, msg) = key.open(buf)?;
        let Message::KeyDistribution(kd) = msg else {
            return Err(DropReason::Unexpected);
        };
        let txid = h.envelope.txid;
        if kd.key_role != KeyRole::DcDc
            || kd.subject != entry.zone
            || kd.new_key_id & 0x8000_0000 == 0
        {
            let e = error_msg(ErrorCode::WrongState, MessageType::KeyDistribution);
            self.output
                .queue(Some(local), remote, key.seal_to_vec(&e, txid, None));
            return Ok(());
        }
        let ack: Message = ntm_wire::Ack {
            acked_type: MessageType::KeyDistribution.to_u8(),
            extensions: Extensions::none(),
        }
        .into();
        if let Some(&(_, seen_txid, seen_id)) = self.peers.seen.get(&e_a) {
            // A retransmission of an accepted bootstrap gets the same ACK; a replay, nothing.
            if seen_txid == txid {
                self.send_to_peer(local, remote, seen_id, &ack, txid);
                return Ok(());
            }
            return Err(DropReason::Replayed(ntm_wire::Replay::Duplicate));
        }
        if self.peers.keys.contains_key(&kd.new_key_id) {
            let e = error_msg(ErrorCode::WrongState, MessageType::KeyDistribution);
            self.output
                .queue(Some(local), remote, key.seal_to_vec(&e, txid, None));
            return Ok(());
        }
        if self.peers.keys.len() >= self.config.limits.max_dc_keys {
            return Err(DropReason::TableFull);
        }
        let expires = now + Duration::from_secs(u64::from(kd.lifetime_s));
        self.peers.seen.insert(e_a, (expires, txid, kd.new_key_id));
        self.peers.keys.insert(
            kd.new_key_id,
            PeerKey {
                peer,
                key: SignalingKey::new(&kd.key, kd.new_key_id, Role::B),
                expires,
            },
        );
        self.peers.current.insert(peer, kd.new_key_id);
        self.peers.addrs.entry(peer).or_insert(remote);
        self.send_to_peer(local, remote, kd.new_key_id, &ack, txid);
        Ok(())
    }

    /// A datagram under a DC↔DC key: NTM_INFO_REQUEST (we decide), ROUTE_DIRECTION or ERROR
    /// (the answer to ours), ACK of our bootstrap.
    pub(super) fn on_peer_datagram<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        buf: &mut [u8],
        key_id: u32,
        rng: &mut R,
    ) -> Result<(), DropReason> {
        let Some(pk) = self.peers.keys.get_mut(&key_id) else {
            return Err(DropReason::UnknownKey);
        };
        let peer = pk.peer;
        let (h, msg) = pk.key.open(buf)?;
        if !h.sealed {
            return Err(DropReason::UnsealedHint);
        }
        let txid = h.envelope.txid;
        match msg {
            Message::Ack(a) if a.acked_type == MessageType::KeyDistribution.to_u8() => {
                let ours = self
                    .peers
                    .bootstraps
                    .get(&peer)
                    .is_some_and(|b| b.new_key_id == key_id && b.tx.txid() == txid);
                if ours {
                    self.peers.bootstraps.remove(&peer);
                    // An NTM_INFO_REQUEST that outran the key goes again now (spec §5.5.3 item 4).
                    let due: Vec<(u32, u32)> = self
                        .directions
                        .outstanding
                        .iter()
                        .filter(|((k, _), o)| {
                            *k == key_id && matches!(o.purpose, Purpose::NtmInfo { .. })
                        })
                        .map(|(k, _)| *k)
                        .collect();
                    for k in due {
                        if let Some(msg) = self.directions.kept.get(&k).cloned() {
                            self.send_to_peer(local, remote, k.0, &msg, k.1);
                        }
                    }
                }
                Ok(())
            }
            Message::NtmInfoRequest(r) => {
                let from = Sender {
                    local,
                    remote,
                    via: 0,
                    key_id,
                    txid,
                    peer: Some(peer),
                };
                self.on_ntm_info_request(now, from, peer, r, rng);
                Ok(())
            }
            msg @ (Message::RouteDirection(_) | Message::Error(_)) => {
                self.on_ntm_info_answer(now, key_id, txid, msg, rng)
            }
            _ => Err(DropReason::Unexpected),
        }
    }

    /// The other DC's answer to our NTM_INFO_REQUEST: relayed to the node that asked.
    fn on_ntm_info_answer<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        key_id: u32,
        txid: u32,
        msg: Message,
        rng: &mut R,
    ) -> Result<(), DropReason> {
        let Some(o) = self.directions.outstanding.get(&(key_id, txid)) else {
            return Err(DropReason::Unexpected); // a late copy
        };
        let Purpose::NtmInfo { request, .. } = o.purpose else {
            return Err(DropReason::Unexpected);
        };
        // The other DC may only direct our node to the node it was asked about.
        let asked = match self.directions.kept.get(&(key_id, txid)) {
            Some(Message::NtmInfoRequest(q)) => Some(q.target_fqdn.clone()),
            _ => None,
        };
        if let Message::RouteDirection(rd) = &msg {
            if asked.as_ref() != Some(&rd.peer_fqdn) {
                return Err(DropReason::Unexpected);
            }
        }
        if let Some(rtt) = o.tx.rtt_sample(now) {
            let peer = o.tx.remote();
            self.directions.rtt.on_sample(now, peer, rtt);
        }
        self.untrack((key_id, txid));
        self.directions.kept.remove(&(key_id, txid));
        match msg {
            Message::Error(e) => {
                let error = ntm_wire::message::Error {
                    failed_type: MessageType::DirectionRequest.to_u8(),
                    ..e
                };
                self.answer_direction(now, request, error.into());
            }
            rd @ Message::RouteDirection(_) => {
                // To the node under its K_nd, retransmitted until its ACK (spec §5.5 4b).
                self.send_to_node(
                    request.local,
                    request.remote,
                    request.key_id,
                    &rd,
                    request.txid,
                );
                self.remember_answer(
                    now,
                    (request.key_id, request.txid),
                    Answered::Message(Box::new(rd.clone())),
                );
                let rto = self
                    .directions
                    .rtt
                    .rto(request.remote, &self.config.retransmit);
                let tx = Transaction::start(
                    now,
                    request.txid,
                    MessageType::RouteDirection,
                    request.remote,
                    rto,
                    &self.config.retransmit,
                    rng,
                );
                let key = (request.key_id, request.txid);
                self.track(key.0, tx, Purpose::Forwarded, request.local);
                self.directions.kept.insert(key, rd);
            }
            _ => return Err(DropReason::Unexpected),
        }
        Ok(())
    }

    // -- The target's DC -------------------------------------------------------------------------

    fn on_ntm_info_request<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        from: Sender,
        peer: usize,
        r: NtmInfoRequest,
        rng: &mut R,
    ) {
        if let Some((answered, _)) = self
            .directions
            .answers
            .get(&(from.key_id, from.txid))
            .cloned()
        {
            match answered {
                Answered::Path(path_id) => self.resend_requester_direction(path_id),
                Answered::Message(m) => self.send_answer(from, &m),
            }
            return;
        }
        let not_found = error_msg(ErrorCode::NotFound, MessageType::NtmInfoRequest);
        let peer_zone = self.config.directory.get(peer).map(|e| e.zone.clone());
        let requester_ok = peer_zone.is_some_and(|z| is_node_of(&r.requester.fqdn, &z));
        let target = self.by_fqdn.get(&r.target_fqdn).copied();
        let allowed = self
            .config
            .access
            .may_reach(&r.requester.fqdn, &r.target_fqdn);
        let target = match target {
            Some(t) if requester_ok && allowed && self.node(t).is_some_and(|n| n.pair != 0) => t,
            _ => {
                self.answer_direction(now, from, not_found);
                return;
            }
        };
        if !r.decide_route {
            let Some(info) = self.node_info(target) else {
                self.answer_direction(now, from, not_found);
                return;
            };
            let msg: Message = NtmInfoResponse {
                target: info,
                extensions: Extensions::none(),
            }
            .into();
            self.answer_direction(now, from, msg);
            return;
        }
        let Some(target_view) = self.view_of(target) else {
            let offline = self.offline_direction(target);
            self.answer_direction(now, from, offline);
            return;
        };
        let requester = Party::Remote {
            info: Box::new(r.requester),
        };
        let Some(requester_view) = self.view_of_party(&requester) else {
            return;
        };
        let plan = select_route(&requester_view, &target_view, false);
        let requester_fqdn = match &requester {
            Party::Remote { info, .. } => info.fqdn.clone(),
            Party::Local(_) => return,
        };
        self.decide(
            now,
            from,
            (requester, requester_fqdn),
            (Party::Local(target), r.target_fqdn),
            plan,
            rng,
        );
    }

    // -- Time --------------------------------------------------------------------------------------

    pub(super) fn peers_timeout<R: RngCore + CryptoRng>(&mut self, now: Time, rng: &mut R) {
        if let Some(d) = self.peers.discovery.as_mut() {
            d.handle_timeout(now, rng);
        }
        self.discovery_events(now, rng);
        // Bootstrap retransmission: a new seal, the same ephemeral and transaction ID.
        let cfg = self.config.retransmit;
        let due: Vec<usize> = self
            .peers
            .bootstraps
            .iter()
            .filter(|(_, b)| b.tx.deadline() <= now)
            .map(|(p, _)| *p)
            .collect();
        for peer in due {
            let Some(b) = self.peers.bootstraps.get_mut(&peer) else {
                continue;
            };
            match b.tx.on_timeout(now, &cfg, rng) {
                crate::signaling::Expiry::Retransmit => {
                    let dst = b.tx.remote();
                    let d = b.key.seal_to_vec(&b.msg, b.tx.txid(), Some(b.ephemeral));
                    let local = self.local_for(dst);
                    self.output.queue(Some(local), dst, d);
                }
                crate::signaling::Expiry::Failed => {
                    // The other DC never took the key: forget it; the next direction starts over.
                    let id = b.new_key_id;
                    self.peers.bootstraps.remove(&peer);
                    self.peers.keys.remove(&id);
                    if self.peers.current.get(&peer) == Some(&id) {
                        self.peers.current.remove(&peer);
                    }
                }
                crate::signaling::Expiry::NotDue => {}
            }
        }
        let expired: Vec<u32> = self
            .peers
            .keys
            .iter()
            .filter(|(_, k)| k.expires <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(k) = self.peers.keys.remove(&id) {
                if self.peers.current.get(&k.peer) == Some(&id) {
                    self.peers.current.remove(&k.peer);
                }
            }
        }
        self.peers.seen.retain(|_, (until, _, _)| *until > now);
        let (stale, kept): (Vec<Waiting>, Vec<Waiting>) = self
            .peers
            .waiting
            .drain(..)
            .partition(|w| w.since + WAIT_LIMIT <= now);
        self.peers.waiting = kept;
        for w in stale {
            let e = error_msg(ErrorCode::Unavailable, MessageType::DirectionRequest);
            self.answer_direction(now, w.from, e);
        }
    }
}
