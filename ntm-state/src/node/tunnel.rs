//! The node's tunnels: establishment on a direction (spec/05 §5.7), the data path (§5.8), path
//! updates on handover (§5.9), route optimization (§5.10), keep-alives, idle expiry and
//! teardown (§5.16).

use core::time::Duration;
use std::net::{IpAddr, SocketAddr};

use ntm_wire::crypto::{tunnel_keys, x25519, x25519_public};
use ntm_wire::data::VIRTUAL_MTU;
use ntm_wire::{
    open_data, seal_data, AeadKey, CloseReason, DataPacket, ErrorCode, Extensions, Fqdn, Header,
    Keepalive, KeepaliveReply, Message, MessageType, PathUpdate, PathUpdateReason, RelayBind,
    ReplayWindow, Role, RouteDirection, RouteKind, RouteReason, SignalingPacket, TransportAddr,
    TunnelClose, TunnelRequest, TunnelResponse, TunnelRole, DATA_HEADER_LEN, DATA_OVERHEAD,
};
use rand_core::{CryptoRng, RngCore};
use zeroize::Zeroizing;

use super::{inner_addrs, DownReason, Node, NodeError, NodeEvent, Received, SendError, TunnelPath};
use crate::signaling::{addr_list, DropReason, Expiry, SignalingKey, Transaction, Transmit};
use crate::time::Time;

/// How long the RS keeps a binding without traffic or RELAY_BIND (spec/05 §5.6).
const RELAY_BINDING_LIFE: Duration = Duration::from_secs(120);

/// One side's binding at the RS of a relayed path.
pub(super) struct RelayLeg {
    /// The RS address of our family.
    rs: SocketAddr,
    key: SignalingKey,
    /// RELAY_BIND in flight.
    bind: Option<Transaction>,
    /// When the RS last acknowledged a bind, or when we last sent through it.
    last_used: Time,
}

impl RelayLeg {
    /// Opens the RS's answer under K_rel (role Relay): the ACK of this side's RELAY_BIND is
    /// taken here; an ERROR comes back with the transaction ID it answers.
    fn take_answer(
        &mut self,
        now: Time,
        buf: &mut [u8],
    ) -> Result<Option<(ErrorCode, u32)>, DropReason> {
        let (h, msg) = self.key.open(buf)?;
        if !h.sealed {
            return Err(DropReason::UnsealedHint);
        }
        let txid = h.envelope.txid;
        match msg {
            Message::Ack(a) if a.acked_type == MessageType::RelayBind.to_u8() => {
                if self.bind.as_ref().is_some_and(|t| t.txid() == txid) {
                    self.bind = None;
                }
                self.last_used = now;
                Ok(None)
            }
            Message::Error(e) => Ok(Some((e.code, txid))),
            _ => Err(DropReason::Unexpected),
        }
    }
}

/// A direction not yet turned into a tunnel.
pub(super) struct Pending {
    pub(super) rd: RouteDirection,
    /// The transaction ID of the ROUTE_DIRECTION (a retransmission is ACKed, not acted on).
    pub(super) dc_txid: u32,
    expires: Time,
    /// The Path ID this direction rebuilds, if it answers a rebuild request of ours.
    rebuild_of: Option<u32>,
    tun_key: SignalingKey,
    relay: Option<RelayLeg>,
    eph_secret: Zeroizing<[u8; 32]>,
    eph_public: [u8; 32],
    /// Initiator: the TUNNEL_REQUEST in flight and where each copy goes (local, remote).
    request: Option<(Transaction, Vec<(SocketAddr, SocketAddr)>)>,
    /// Initiator on a direct route: when to give up and ask for a rebuild.
    give_up_at: Option<Time>,
}

/// The responder's handshake state, kept to answer retransmitted TUNNEL_REQUESTs the same way.
struct Handshake {
    txid: u32,
    key: SignalingKey,
    eph_public: [u8; 32],
    until: Time,
}

/// A keep-alive or probe waiting for its reply.
struct AwaitReply {
    txid: u32,
    deadline: Time,
}

/// A round of route-optimization probes (spec/05 §5.10).
struct ProbeRound {
    next: Time,
    until: Time,
    txid: u32,
}

/// A PATH_UPDATE in flight.
struct Update {
    tx: Transaction,
    msg: Message,
    /// Give up (and rebuild) at this time: 2 RTO after the first transmission.
    give_up_at: Time,
    /// A retry of an unacknowledged move: giving up only schedules the next retry.
    retry_only: bool,
}

pub(super) struct Tunnel {
    pub(super) dc_txid: u32,
    /// K_tun of its direction (a direction repeated by the DC is recognized by it).
    pub(super) credential: ntm_wire::SecretKey,
    peer: Fqdn,
    peer_v4: std::net::Ipv4Addr,
    peer_v6: std::net::Ipv6Addr,
    role: TunnelRole,
    reason: RouteReason,
    /// Where DATA and control go now: the peer (direct) or the RS.
    path: TunnelPath,
    local: SocketAddr,
    relay: Option<RelayLeg>,
    send_key: AeadKey,
    recv_key: AeadKey,
    send_counter: u64,
    replay: ReplayWindow,
    ctrl: SignalingKey,
    handshake: Option<Handshake>,
    /// The peer's candidate addresses for probing: the direction's, then its latest PATH_UPDATE's.
    candidates: Vec<SocketAddr>,
    /// The addresses of the peer's latest accepted PATH_UPDATE (probed besides `candidates`).
    update_addrs: Vec<SocketAddr>,
    probe_direct: bool,
    probes: Option<ProbeRound>,
    next_round: Option<Time>,
    update: Option<Update>,
    last_update_seq: Option<u64>,
    close: Option<Transaction>,
    /// Why this end is closing it (sent again with each retransmission).
    close_reason: CloseReason,
    last_data: Time,
    last_sent: Time,
    last_received: Time,
    keepalive: Option<AwaitReply>,
    missed: u8,
    /// Replaced by a newer tunnel to the same peer: dropped at this time.
    retire_at: Option<Time>,
    /// Lost the lower-Path-ID rule against a tunnel to the same peer: close it.
    close_wanted: bool,
    /// Its send key reached `NodeLimits::key_packet_limit`: close it (TUNNEL_CLOSE(Error)).
    key_used_up: bool,
    /// A handover PATH_UPDATE the peer never acknowledged: when to send another.
    move_unconfirmed: Option<Time>,
    established: Time,
    /// Installed while another tunnel to the peer was current (a rebuild).
    replacement: bool,
    pub(super) stats: TunnelStats,
}

/// Counters of one tunnel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunnelStats {
    pub packets_sent: u64,
    pub bytes_sent: u64,
    pub packets_received: u64,
    pub bytes_received: u64,
}

/// A tunnel as [`Node::tunnels`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelStatus {
    pub path_id: u32,
    pub peer: Fqdn,
    pub peer_v4: std::net::Ipv4Addr,
    pub peer_v6: std::net::Ipv6Addr,
    pub path: TunnelPath,
    /// Why the DC chose the route it started on.
    pub reason: RouteReason,
    pub role: TunnelRole,
    pub stats: TunnelStats,
    /// Replaced and about to be dropped.
    pub retiring: bool,
}

fn random_ephemeral<R: RngCore + CryptoRng>(rng: &mut R) -> (Zeroizing<[u8; 32]>, [u8; 32]) {
    let mut s = Zeroizing::new([0u8; 32]);
    rng.fill_bytes(s.as_mut());
    let p = x25519_public(&s);
    (s, p)
}

fn my_role(role: TunnelRole) -> Role {
    if role == TunnelRole::Initiator {
        Role::A
    } else {
        Role::B
    }
}

/// How this end reports a tunnel it closed.
fn down_reason(reason: CloseReason) -> DownReason {
    match reason {
        CloseReason::Idle => DownReason::Idle,
        _ => DownReason::Closed,
    }
}

fn ack(t: MessageType) -> Message {
    ntm_wire::Ack {
        acked_type: t.to_u8(),
        extensions: Extensions::none(),
    }
    .into()
}

impl Node {
    /// The socket of `dst`'s family: the node's first local address of that family.
    fn socket_for(&self, dst: SocketAddr) -> Option<SocketAddr> {
        self.config
            .local_addrs
            .iter()
            .copied()
            .find(|a| a.is_ipv6() == dst.is_ipv6())
    }

    fn is_own(&self, a: SocketAddr) -> bool {
        self.config.local_addrs.iter().any(|l| l.ip() == a.ip())
    }

    /// The Path ID of the current tunnel to `peer`, if any.
    pub(super) fn tunnel_to(&self, peer: &Fqdn) -> Option<u32> {
        self.tunnels
            .iter()
            .find(|(_, t)| &t.peer == peer && t.retire_at.is_none())
            .map(|(id, _)| *id)
    }

    /// The tunnels, current and retiring.
    pub fn tunnels(&self) -> Vec<TunnelStatus> {
        self.tunnels
            .iter()
            .map(|(&path_id, t)| TunnelStatus {
                path_id,
                peer: t.peer.clone(),
                peer_v4: t.peer_v4,
                peer_v6: t.peer_v6,
                path: t.path,
                reason: t.reason,
                role: t.role,
                stats: t.stats,
                retiring: t.retire_at.is_some(),
            })
            .collect()
    }

    /// The current tunnel to `peer`.
    pub fn tunnel(&self, peer: &Fqdn) -> Option<TunnelStatus> {
        let id = self.tunnel_to(peer)?;
        self.tunnels().into_iter().find(|t| t.path_id == id)
    }

    // -- Directions into pending tunnels --------------------------------------------------------

    pub(super) fn start_pending<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        dc_txid: u32,
        rd: RouteDirection,
        rebuild_of: Option<u32>,
        rng: &mut R,
    ) {
        let path_id = rd.path_id;
        let role = my_role(rd.role);
        let (eph_secret, eph_public) = random_ephemeral(rng);
        let relay = match (&rd.relay_key, rd.route) {
            (Some(k), RouteKind::Relay) => {
                let mine = rd
                    .relay_addrs
                    .as_slice()
                    .iter()
                    .map(|a| a.socket_addr())
                    .find(|a| self.socket_for(*a).is_some());
                match mine {
                    Some(rs) => Some(RelayLeg {
                        rs,
                        key: SignalingKey::new(k, path_id, role),
                        bind: None,
                        last_used: now,
                    }),
                    None => {
                        // The relay serves no family this node has: nothing can work.
                        self.event(NodeEvent::Error(NodeError::Unreachable {
                            peer: rd.peer_fqdn.clone(),
                        }));
                        return;
                    }
                }
            }
            _ => None,
        };
        let pending = Pending {
            tun_key: SignalingKey::new(&rd.tunnel_credential, path_id, role),
            dc_txid,
            expires: now + self.config.timers.pending_direction,
            rebuild_of,
            relay,
            eph_secret,
            eph_public,
            request: None,
            give_up_at: None,
            rd,
        };
        self.pending.insert(path_id, pending);
        let relayed = self
            .pending
            .get(&path_id)
            .is_some_and(|p| p.relay.is_some());
        if relayed {
            self.send_relay_bind(now, path_id, rng);
        }
        let initiator = self
            .pending
            .get(&path_id)
            .is_some_and(|p| p.rd.role == TunnelRole::Initiator);
        if initiator {
            self.send_tunnel_request(now, path_id, true, rng);
        }
    }

    /// RELAY_BIND for a pending direction, from the socket of the RS's family.
    fn send_relay_bind<R: RngCore + CryptoRng>(&mut self, now: Time, path_id: u32, rng: &mut R) {
        let cfg = self.config.retransmit;
        let Some(rs) = self
            .pending
            .get(&path_id)
            .and_then(|p| p.relay.as_ref())
            .map(|r| r.rs)
        else {
            return;
        };
        let Some(local) = self.socket_for(rs) else {
            return;
        };
        let rto = self.rtt.rto(rs, &cfg);
        let Some(leg) = self
            .pending
            .get_mut(&path_id)
            .and_then(|p| p.relay.as_mut())
        else {
            return;
        };
        let txid = rng.next_u32();
        let tx = Transaction::start(now, txid, MessageType::RelayBind, rs, rto, &cfg, rng);
        let msg: Message = RelayBind {
            extensions: Extensions::none(),
        }
        .into();
        if let Some(d) = crate::signaling::sealed(leg.key.seal_to_vec(&msg, txid, None)) {
            self.outbox.push(Some(local), rs, d);
        }
        leg.bind = Some(tx);
    }

    /// The initiator's TUNNEL_REQUEST: to the RS, or to every usable candidate of the peer.
    fn send_tunnel_request<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        path_id: u32,
        first: bool,
        rng: &mut R,
    ) {
        let cfg = self.config.retransmit;
        let Some(vaddrs) = self.vaddrs else {
            return;
        };
        let Some(fqdn) = self.fqdn().cloned() else {
            return;
        };
        let Some(p) = self.pending.get(&path_id) else {
            return;
        };
        let targets: Vec<(SocketAddr, SocketAddr)> = if let Some(r) = &p.relay {
            self.socket_for(r.rs)
                .map(|l| (l, r.rs))
                .into_iter()
                .collect()
        } else {
            p.rd.peer_addrs
                .as_slice()
                .iter()
                .map(|a| a.socket_addr())
                .filter(|a| !self.is_own(*a))
                .filter_map(|a| self.socket_for(a).map(|l| (l, a)))
                .collect()
        };
        let Some(&(_, first_dst)) = targets.first() else {
            // No candidate of a family this node has: ask for another route at once.
            self.give_up_direct(now, path_id, rng);
            return;
        };
        let same_nat = p.rd.reason == RouteReason::SameNat && p.relay.is_none();
        let msg: Message = TunnelRequest {
            ephemeral: p.eph_public,
            sender_fqdn: fqdn,
            sender_virtual_v4: vaddrs.0,
            sender_virtual_v6: vaddrs.1,
            extensions: Extensions::none(),
        }
        .into();
        let rto = self.rtt.rto(first_dst, &cfg);
        let Some(p) = self.pending.get_mut(&path_id) else {
            return;
        };
        let txid = match (&p.request, first) {
            (Some((tx, _)), false) => tx.txid(),
            _ => {
                let txid = rng.next_u32();
                let tx = Transaction::start(
                    now,
                    txid,
                    MessageType::TunnelRequest,
                    first_dst,
                    rto,
                    &cfg,
                    rng,
                );
                p.request = Some((tx, targets.clone()));
                if p.relay.is_none() {
                    p.give_up_at = same_nat.then(|| now + self.config.timers.same_nat_attempt);
                }
                txid
            }
        };
        for (local, dst) in targets {
            if let Some(d) = crate::signaling::sealed(p.tun_key.seal_to_vec(&msg, txid, None)) {
                self.outbox.push(Some(local), dst, d);
            }
        }
    }

    /// A direct attempt heard nothing: ask the DC for a new route (once), else report.
    fn give_up_direct<R: RngCore + CryptoRng>(&mut self, now: Time, path_id: u32, rng: &mut R) {
        let Some(p) = self.pending.remove(&path_id) else {
            return;
        };
        let peer = p.rd.peer_fqdn.clone();
        // A direction this node itself asked to rebuild gets no second rebuild (spec/05 §5.7);
        // the target of someone else's rebuild asks once for its own.
        if p.rebuild_of.is_some() {
            self.queued.remove(&peer);
            self.event(NodeEvent::Error(NodeError::Unreachable { peer }));
            return;
        }
        self.request_direction(now, peer, path_id, rng);
    }

    /// Processes held TUNNEL_REQUESTs whose direction has arrived.
    pub(super) fn release_held<R: RngCore + CryptoRng>(&mut self, now: Time, rng: &mut R) {
        let held: Vec<_> = self.held.drain(..).collect();
        for (until, local, remote, mut d) in held {
            let key_id = SignalingPacket::parse(&d)
                .map(|p| p.header().envelope.key_id)
                .unwrap_or(0);
            if self.pending.contains_key(&key_id) {
                let r = self.handle_datagram(now, local, remote, &mut d, rng);
                let _ = r;
            } else {
                self.held.push_back((until, local, remote, d));
            }
        }
    }

    // -- Signaling under tunnel keys ------------------------------------------------------------

    pub(super) fn on_tunnel_signaling<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        buf: &mut [u8],
        header: &Header,
        rng: &mut R,
    ) -> Result<(), DropReason> {
        let path_id = header.envelope.key_id;
        let from_relay = header.envelope.role == Role::Relay;
        if self.pending.contains_key(&path_id) {
            return self.on_pending_signaling(now, local, remote, buf, header, rng);
        }
        if self.tunnels.contains_key(&path_id) {
            if from_relay {
                return self.on_relay_answer_tunnel(now, path_id, buf);
            }
            return self.on_established_signaling(now, local, remote, buf, header, rng);
        }
        if header.msg_type == MessageType::TunnelRequest && header.sealed {
            // It may have outrun its direction (spec/05 §5.7): hold it, unopened.
            if self.held.len() >= self.config.limits.max_held_requests {
                self.held.pop_front();
            }
            let until = now + self.config.timers.held_request;
            self.held.push_back((until, local, remote, buf.to_vec()));
            return Ok(());
        }
        Err(DropReason::UnknownKey)
    }

    fn on_pending_signaling<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        buf: &mut [u8],
        header: &Header,
        rng: &mut R,
    ) -> Result<(), DropReason> {
        let path_id = header.envelope.key_id;
        let Some(p) = self.pending.get_mut(&path_id) else {
            return Err(DropReason::UnknownKey);
        };
        if header.envelope.role == Role::Relay {
            let Some(leg) = p.relay.as_mut() else {
                return Err(DropReason::Unexpected);
            };
            if let Some((ErrorCode::PeerNotBound, txid)) = leg.take_answer(now, buf)? {
                // The responder has not bound yet: resend the request now (spec/05 §5.6).
                let ours = p.request.as_ref().is_some_and(|(tx, _)| tx.txid() == txid);
                if ours {
                    self.send_tunnel_request(now, path_id, false, rng);
                }
            }
            Ok(())
        } else {
            match header.msg_type {
                MessageType::TunnelRequest if p.rd.role == TunnelRole::Responder => {
                    let (h, msg) = p.tun_key.open(buf)?;
                    let Message::TunnelRequest(req) = msg else {
                        return Err(DropReason::Unexpected);
                    };
                    if !h.sealed
                        || req.sender_fqdn != p.rd.peer_fqdn
                        || req.sender_virtual_v4 != p.rd.peer_virtual_v4
                        || req.sender_virtual_v6 != p.rd.peer_virtual_v6
                    {
                        return Err(DropReason::Unexpected);
                    }
                    self.respond(now, local, remote, path_id, h.envelope.txid, req.ephemeral);
                    Ok(())
                }
                MessageType::TunnelResponse if p.rd.role == TunnelRole::Initiator => {
                    let (h, msg) = p.tun_key.open(buf)?;
                    let Message::TunnelResponse(resp) = msg else {
                        return Err(DropReason::Unexpected);
                    };
                    let ours = p
                        .request
                        .as_ref()
                        .is_some_and(|(tx, _)| tx.txid() == h.envelope.txid);
                    if !h.sealed || !ours {
                        return Err(DropReason::Unexpected);
                    }
                    self.complete(now, local, remote, path_id, resp.ephemeral);
                    Ok(())
                }
                _ => Err(DropReason::Unexpected),
            }
        }
    }

    /// The responder answers a TUNNEL_REQUEST and installs the tunnel.
    fn respond(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        path_id: u32,
        txid: u32,
        initiator_ephemeral: [u8; 32],
    ) {
        if self.tunnels.len() >= self.config.limits.max_tunnels {
            // No room: do not answer (the initiator must not think the tunnel is up).
            self.drops.record(&DropReason::TableFull);
            return;
        }
        let Some(p) = self.pending.remove(&path_id) else {
            return;
        };
        let Ok(dh) = x25519(&p.eph_secret, &initiator_ephemeral) else {
            self.drops.record(&DropReason::NonContributoryKey);
            return;
        };
        let keys = tunnel_keys(
            &dh,
            &p.rd.tunnel_credential,
            path_id,
            &initiator_ephemeral,
            &p.eph_public,
        );
        let msg: Message = TunnelResponse {
            ephemeral: p.eph_public,
            observed_addr: TransportAddr::new(remote),
            extensions: Extensions::none(),
        }
        .into();
        let mut tun_key = p.tun_key;
        if let Some(d) = crate::signaling::sealed(tun_key.seal_to_vec(&msg, txid, None)) {
            self.outbox.push(Some(local), remote, d);
        }
        let path = match &p.relay {
            Some(r) => TunnelPath::Relay(r.rs),
            None => TunnelPath::Direct(remote),
        };
        let handshake = Handshake {
            txid,
            key: tun_key,
            eph_public: p.eph_public,
            until: now + self.config.timers.pending_direction,
        };
        self.install(
            now,
            path_id,
            p.dc_txid,
            p.rd,
            p.relay,
            &keys,
            path,
            local,
            Some(handshake),
        );
    }

    /// The initiator's TUNNEL_RESPONSE arrived: install the tunnel.
    fn complete(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        path_id: u32,
        responder_ephemeral: [u8; 32],
    ) {
        let Some(p) = self.pending.remove(&path_id) else {
            return;
        };
        let Ok(dh) = x25519(&p.eph_secret, &responder_ephemeral) else {
            self.drops.record(&DropReason::NonContributoryKey);
            return;
        };
        if let Some((tx, _)) = &p.request {
            if let Some(rtt) = tx.rtt_sample(now) {
                self.rtt.on_sample(now, remote, rtt);
            }
        }
        let keys = tunnel_keys(
            &dh,
            &p.rd.tunnel_credential,
            path_id,
            &p.eph_public,
            &responder_ephemeral,
        );
        let path = match &p.relay {
            Some(r) => TunnelPath::Relay(r.rs),
            None => TunnelPath::Direct(remote),
        };
        self.install(
            now, path_id, p.dc_txid, p.rd, p.relay, &keys, path, local, None,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn install(
        &mut self,
        now: Time,
        path_id: u32,
        dc_txid: u32,
        rd: RouteDirection,
        relay: Option<RelayLeg>,
        keys: &ntm_wire::TunnelKeys,
        path: TunnelPath,
        local: SocketAddr,
        handshake: Option<Handshake>,
    ) {
        let initiator = rd.role == TunnelRole::Initiator;
        let (send, recv) = if initiator {
            (&keys.initiator_to_responder, &keys.responder_to_initiator)
        } else {
            (&keys.responder_to_initiator, &keys.initiator_to_responder)
        };
        let peer = rd.peer_fqdn.clone();
        if self.tunnels.len() >= self.config.limits.max_tunnels {
            self.drops.record(&DropReason::TableFull);
            return;
        }
        // A newer tunnel to the same peer replaces the older one, kept a little for packets in
        // flight (spec/05 §5.7).
        let retire = now + self.config.timers.replaced_tunnel;
        let older: Vec<(u32, bool)> = self
            .tunnels
            .iter()
            .filter(|(_, t)| t.peer == peer && t.retire_at.is_none())
            .map(|(id, t)| {
                let recent = t.established + self.config.timers.duplicate_tunnel > now;
                (*id, recent && t.replacement)
            })
            .collect();
        // Two rebuilt tunnels to one peer within 10 s of each other (both ends rebuilt at once):
        // both nodes keep the lower Path ID and close the other (spec/05 §5.7). A rebuild that
        // replaces the tunnel it rebuilds always wins.
        let replacement = !older.is_empty();
        let loses = older.iter().any(|(id, twin)| *twin && *id < path_id);
        let older = if loses { Vec::new() } else { older };
        for (id, twin) in older {
            if let Some(t) = self.tunnels.get_mut(&id) {
                t.retire_at = Some(retire);
                t.close_wanted = twin;
            }
            self.event(NodeEvent::TunnelDown {
                peer: peer.clone(),
                path_id: id,
                reason: DownReason::Replaced,
            });
        }
        let probe_direct = rd.probe_direct && relay.is_some();
        let tunnel = Tunnel {
            dc_txid,
            credential: rd.tunnel_credential.clone(),
            peer: peer.clone(),
            peer_v4: rd.peer_virtual_v4,
            peer_v6: rd.peer_virtual_v6,
            role: rd.role,
            reason: rd.reason,
            path,
            local,
            relay,
            send_key: AeadKey::new(send),
            recv_key: AeadKey::new(recv),
            send_counter: 0,
            replay: ReplayWindow::new(),
            ctrl: SignalingKey::new(&keys.control, path_id, my_role(rd.role)),
            handshake,
            candidates: rd
                .peer_addrs
                .as_slice()
                .iter()
                .map(|a| a.socket_addr())
                .collect(),
            update_addrs: Vec::new(),
            probe_direct,
            probes: probe_direct.then(|| ProbeRound {
                next: now,
                until: now + self.config.timers.probe_round,
                txid: 0,
            }),
            next_round: None,
            update: None,
            last_update_seq: None,
            close: None,
            close_reason: CloseReason::Normal,
            last_data: now,
            last_sent: now,
            last_received: now,
            keepalive: None,
            missed: 0,
            retire_at: loses.then_some(retire),
            close_wanted: loses,
            key_used_up: false,
            move_unconfirmed: None,
            established: now,
            replacement,
            stats: TunnelStats::default(),
        };
        self.tunnels.insert(path_id, tunnel);
        if loses {
            return;
        }
        self.by_vaddr
            .insert(IpAddr::V4(rd.peer_virtual_v4), path_id);
        self.by_vaddr
            .insert(IpAddr::V6(rd.peer_virtual_v6), path_id);
        self.event(NodeEvent::TunnelUp {
            peer: peer.clone(),
            path_id,
            vip4: rd.peer_virtual_v4,
            vip6: rd.peer_virtual_v6,
            path,
        });
        // Packets queued while the tunnel was built go now.
        if let Some(q) = self.queued.remove(&peer) {
            let mut buf = vec![0u8; VIRTUAL_MTU + DATA_OVERHEAD];
            for packet in q {
                if let Ok(t) = self.encapsulate(now, &packet, &mut buf) {
                    if let Some(d) = buf.get(..t.len) {
                        self.outbox.push(t.src, t.dst, d.to_vec());
                    }
                }
            }
        }
    }

    /// An ACK or ERROR from the RS (role Relay) on an established relayed tunnel.
    fn on_relay_answer_tunnel(
        &mut self,
        now: Time,
        path_id: u32,
        buf: &mut [u8],
    ) -> Result<(), DropReason> {
        let Some(leg) = self
            .tunnels
            .get_mut(&path_id)
            .and_then(|t| t.relay.as_mut())
        else {
            return Err(DropReason::Unexpected);
        };
        // PeerNotBound for a PATH_UPDATE or keep-alive: the retransmissions go on.
        leg.take_answer(now, buf).map(|_| ())
    }

    /// Signaling on an established tunnel: K_ctrl messages, and retransmitted handshakes.
    fn on_established_signaling<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        buf: &mut [u8],
        header: &Header,
        rng: &mut R,
    ) -> Result<(), DropReason> {
        let path_id = header.envelope.key_id;
        let own = self.config.local_addrs.clone();
        let Some(t) = self.tunnels.get_mut(&path_id) else {
            return Err(DropReason::UnknownKey);
        };
        match header.msg_type {
            MessageType::TunnelRequest => {
                // A copy or retransmission of the handshake: the same answer, re-sealed.
                let Some(hs) = t.handshake.as_mut() else {
                    return Err(DropReason::Unexpected); // a rekey: not supported yet
                };
                let (h, _msg) = hs.key.open(buf)?;
                if h.envelope.txid != hs.txid {
                    return Err(DropReason::Unexpected);
                }
                let msg: Message = TunnelResponse {
                    ephemeral: hs.eph_public,
                    observed_addr: TransportAddr::new(remote),
                    extensions: Extensions::none(),
                }
                .into();
                if let Some(d) = crate::signaling::sealed(hs.key.seal_to_vec(&msg, hs.txid, None)) {
                    self.outbox.push(Some(local), remote, d);
                }
                Ok(())
            }
            MessageType::TunnelResponse => Err(DropReason::Unexpected), // a later copy
            _ => {
                let (h, msg) = t.ctrl.open(buf)?;
                if !h.sealed {
                    return Err(DropReason::UnsealedHint);
                }
                let txid = h.envelope.txid;
                let via_relay = matches!(t.path, TunnelPath::Relay(rs) if rs == remote)
                    || t.relay.as_ref().is_some_and(|r| r.rs == remote);
                t.last_received = now;
                match msg {
                    Message::Keepalive(k) => {
                        if k.reply_requested {
                            let reply: Message = KeepaliveReply {
                                observed_addr: TransportAddr::new(remote),
                                extensions: Extensions::none(),
                            }
                            .into();
                            if let Some(d) =
                                crate::signaling::sealed(t.ctrl.seal_to_vec(&reply, txid, None))
                            {
                                self.outbox.push(Some(local), remote, d);
                            }
                        }
                        Ok(())
                    }
                    Message::KeepaliveReply(_) => {
                        let is_probe = t.probes.as_ref().is_some_and(|p| p.txid == txid)
                            && !via_relay
                            && matches!(t.path, TunnelPath::Relay(_));
                        if is_probe {
                            // The direct path works both ways (spec/05 §5.10): switch to it.
                            t.path = TunnelPath::Direct(remote);
                            t.local = local;
                            t.probes = None;
                            t.next_round = None;
                            t.missed = 0;
                            t.keepalive = None;
                            let msg: Message = PathUpdate {
                                reason: PathUpdateReason::RouteOptimization,
                                local_addrs: addr_list(&own),
                                extensions: Extensions::none(),
                            }
                            .into();
                            let peer = t.peer.clone();
                            self.start_update(now, path_id, msg, rng);
                            self.event(NodeEvent::PathChanged {
                                peer,
                                path_id,
                                path: TunnelPath::Direct(remote),
                            });
                            return Ok(());
                        }
                        if t.keepalive.as_ref().is_some_and(|k| k.txid == txid) {
                            t.keepalive = None;
                            t.missed = 0;
                        }
                        Ok(())
                    }
                    Message::PathUpdate(u) => {
                        let seq = h.envelope.seq;
                        let newer = t.last_update_seq.is_none_or(|s| seq > s);
                        if newer {
                            t.last_update_seq = Some(seq);
                            // The latest PATH_UPDATE's addresses replace the previous ones.
                            t.update_addrs = u
                                .local_addrs
                                .as_slice()
                                .iter()
                                .map(|a| a.socket_addr())
                                .collect();
                            let moves = !via_relay
                                && (matches!(t.path, TunnelPath::Direct(_))
                                    || u.reason == PathUpdateReason::RouteOptimization);
                            if moves && t.path != TunnelPath::Direct(remote) {
                                t.path = TunnelPath::Direct(remote);
                                t.local = local;
                                t.probes = None;
                                t.next_round = None;
                                let peer = t.peer.clone();
                                self.event(NodeEvent::PathChanged {
                                    peer,
                                    path_id,
                                    path: TunnelPath::Direct(remote),
                                });
                            } else if via_relay {
                                if let (TunnelPath::Direct(_), Some(rs)) =
                                    (t.path, t.relay.as_ref().map(|r| r.rs))
                                {
                                    // The peer went back to the relay (demoted, or moved
                                    // where the direct path cannot follow): so does this end.
                                    t.path = TunnelPath::Relay(rs);
                                    if let Some(l) =
                                        own.iter().find(|l| l.is_ipv6() == rs.is_ipv6())
                                    {
                                        t.local = *l;
                                    }
                                    let peer = t.peer.clone();
                                    self.event(NodeEvent::PathChanged {
                                        peer,
                                        path_id,
                                        path: TunnelPath::Relay(rs),
                                    });
                                }
                                let Some(t) = self.tunnels.get_mut(&path_id) else {
                                    return Ok(());
                                };
                                if t.probe_direct {
                                    // The peer moved: probe again at once (spec/05 §5.10).
                                    t.probes = Some(ProbeRound {
                                        next: now,
                                        until: now + self.config.timers.probe_round,
                                        txid: 0,
                                    });
                                }
                            }
                        }
                        let Some(t) = self.tunnels.get_mut(&path_id) else {
                            return Ok(());
                        };
                        if let Ok(d) = t
                            .ctrl
                            .seal_to_vec(&ack(MessageType::PathUpdate), txid, None)
                        {
                            self.outbox.push(Some(local), remote, d);
                        }
                        Ok(())
                    }
                    Message::TunnelClose(_) => {
                        if let Ok(d) =
                            t.ctrl
                                .seal_to_vec(&ack(MessageType::TunnelClose), txid, None)
                        {
                            self.outbox.push(Some(local), remote, d);
                        }
                        self.remove_tunnel(path_id, DownReason::ClosedByPeer);
                        Ok(())
                    }
                    Message::Ack(a) => {
                        if a.acked_type == MessageType::PathUpdate.to_u8()
                            && t.update.as_ref().is_some_and(|u| u.tx.txid() == txid)
                        {
                            t.update = None;
                            t.move_unconfirmed = None;
                        }
                        if a.acked_type == MessageType::TunnelClose.to_u8()
                            && t.close.as_ref().is_some_and(|c| c.txid() == txid)
                        {
                            let reason = down_reason(t.close_reason);
                            self.remove_tunnel(path_id, reason);
                        }
                        Ok(())
                    }
                    Message::Error(_) => Ok(()),
                    _ => Err(DropReason::Unexpected),
                }
            }
        }
    }

    /// Sends a PATH_UPDATE on a tunnel and retransmits it until ACKed.
    fn start_update<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        path_id: u32,
        msg: Message,
        rng: &mut R,
    ) {
        let cfg = self.config.retransmit;
        let Some(t) = self.tunnels.get_mut(&path_id) else {
            return;
        };
        let dst = t.path.addr();
        let rto = self.rtt.rto(dst, &cfg);
        let txid = rng.next_u32();
        let tx = Transaction::start(now, txid, MessageType::PathUpdate, dst, rto, &cfg, rng);
        if let Some(d) = crate::signaling::sealed(t.ctrl.seal_to_vec(&msg, txid, None)) {
            self.outbox.push(Some(t.local), dst, d);
        }
        t.last_sent = now;
        t.update = Some(Update {
            tx,
            msg,
            give_up_at: now + rto * 2,
            retry_only: false,
        });
    }

    fn remove_tunnel(&mut self, path_id: u32, reason: DownReason) {
        let Some(t) = self.tunnels.remove(&path_id) else {
            return;
        };
        for ip in [IpAddr::V4(t.peer_v4), IpAddr::V6(t.peer_v6)] {
            if self.by_vaddr.get(&ip) == Some(&path_id) {
                self.by_vaddr.remove(&ip);
            }
        }
        if t.retire_at.is_none() {
            self.event(NodeEvent::TunnelDown {
                peer: t.peer,
                path_id,
                reason,
            });
        }
    }

    /// Closes the tunnel to `peer` (TUNNEL_CLOSE Normal), if there is one.
    pub fn close<R: RngCore + CryptoRng>(&mut self, now: Time, peer: &Fqdn, rng: &mut R) {
        if let Some(id) = self.tunnel_to(peer) {
            self.send_close(now, id, CloseReason::Normal, rng);
        }
    }

    fn send_close<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        path_id: u32,
        reason: CloseReason,
        rng: &mut R,
    ) {
        let cfg = self.config.retransmit;
        // The peer's next packet builds a new tunnel instead of going into this one.
        self.by_vaddr.retain(|_, id| *id != path_id);
        let Some(t) = self.tunnels.get_mut(&path_id) else {
            return;
        };
        let dst = t.path.addr();
        let txid = rng.next_u32();
        let rto = self.rtt.rto(dst, &cfg);
        let msg: Message = TunnelClose {
            reason,
            extensions: Extensions::none(),
        }
        .into();
        if let Some(d) = crate::signaling::sealed(t.ctrl.seal_to_vec(&msg, txid, None)) {
            self.outbox.push(Some(t.local), dst, d);
        }
        t.close_reason = reason;
        t.close = Some(Transaction::start(
            now,
            txid,
            MessageType::TunnelClose,
            dst,
            rto,
            &cfg,
            rng,
        ));
    }

    // -- Data ----------------------------------------------------------------------------------

    /// Seals a virtual IP packet for its tunnel into `out` (which must hold the packet plus
    /// [`DATA_OVERHEAD`] bytes) and says where to send it. Without a tunnel, a packet for a
    /// known peer starts one and is queued.
    pub fn encapsulate(
        &mut self,
        now: Time,
        packet: &[u8],
        out: &mut [u8],
    ) -> Result<Transmit, SendError> {
        if packet.len() > VIRTUAL_MTU {
            return Err(SendError::TooLarge);
        }
        let (src, dst) = inner_addrs(packet).ok_or(SendError::NotIp)?;
        let own = self.vaddrs.ok_or(SendError::NoRoute)?;
        if src != IpAddr::V4(own.0) && src != IpAddr::V6(own.1) {
            return Err(SendError::WrongSource);
        }
        let Some(&path_id) = self.by_vaddr.get(&dst) else {
            return self.queue_for(dst, packet);
        };
        let stranded = self
            .tunnels
            .get(&path_id)
            .is_some_and(|t| !self.config.local_addrs.contains(&t.local));
        if stranded {
            // The move left no socket for this tunnel's path; its rebuild is under way.
            return self.queue_for(dst, packet);
        }
        let Some(t) = self.tunnels.get_mut(&path_id) else {
            return Err(SendError::NoRoute);
        };
        let Some(slot) = out.get_mut(DATA_HEADER_LEN..DATA_HEADER_LEN + packet.len()) else {
            return Err(SendError::BufferTooSmall);
        };
        slot.copy_from_slice(packet);
        if t.send_counter >= self.config.limits.key_packet_limit {
            // AES-GCM's confidentiality limit for one key (spec/07 §7.2). Without an in-place
            // rekey (spec/05 §5.15, not implemented yet) the tunnel is closed and the next
            // packet builds a new one with fresh keys.
            t.key_used_up = true;
            return Err(SendError::KeyExhausted);
        }
        let n = seal_data(
            &t.send_key,
            path_id,
            t.send_counter,
            false,
            out,
            packet.len(),
        )
        .map_err(|_| SendError::BufferTooSmall)?;
        t.send_counter += 1;
        t.last_data = now;
        t.last_sent = now;
        t.stats.packets_sent += 1;
        t.stats.bytes_sent += packet.len() as u64;
        let dst_addr = t.path.addr();
        if let (TunnelPath::Relay(_), Some(leg)) = (t.path, t.relay.as_mut()) {
            leg.last_used = now;
        }
        Ok(Transmit {
            src: Some(t.local),
            dst: dst_addr,
            len: n,
        })
    }

    /// A packet for a peer without a tunnel: queued (and a tunnel started) if the node knows the
    /// peer's FQDN; the caller sees `Queued`, and the runtime's next `handle_timeout` or input
    /// sends the DIRECTION_REQUEST.
    fn queue_for(&mut self, dst: IpAddr, packet: &[u8]) -> Result<Transmit, SendError> {
        let Some(peer) = self.known_peers.get(&dst).cloned() else {
            return Err(SendError::NoRoute);
        };
        let limit = self.config.limits.max_queued_packets;
        let q = self.queued.entry(peer.clone()).or_default();
        if q.len() >= limit {
            return Err(SendError::QueueFull);
        }
        q.push_back(packet.to_vec());
        if !self.lookups.contains_key(&peer)
            && !self.pending.values().any(|p| p.rd.peer_fqdn == peer)
            && !self.wanted.iter().any(|(p, _)| *p == peer)
        {
            self.wanted.push((peer, 0));
        }
        Err(SendError::Queued)
    }

    /// A DATA packet: tunnel by Path ID, replay check, open, inner address check (spec/05 §5.8).
    pub(super) fn on_data(
        &mut self,
        now: Time,
        _remote: SocketAddr,
        buf: &mut [u8],
    ) -> Result<Received, DropReason> {
        let packet = DataPacket::parse(buf).map_err(DropReason::Header)?;
        let (path_id, counter) = (packet.path_id(), packet.counter());
        let own = self.vaddrs;
        let Some(t) = self.tunnels.get_mut(&path_id) else {
            return Err(DropReason::UnknownKey);
        };
        t.replay.check(counter).map_err(DropReason::Replayed)?;
        let range = open_data(&t.recv_key, buf).map_err(|_| DropReason::AuthenticationFailed)?;
        t.replay.accept(counter).map_err(DropReason::Replayed)?;
        let inner = buf.get(range.clone()).ok_or(DropReason::Unexpected)?;
        let (src, dst) = inner_addrs(inner).ok_or(DropReason::Unexpected)?;
        let from_peer = src == IpAddr::V4(t.peer_v4) || src == IpAddr::V6(t.peer_v6);
        let to_us = own.is_some_and(|(v4, v6)| dst == IpAddr::V4(v4) || dst == IpAddr::V6(v6));
        if !from_peer || !to_us {
            return Err(DropReason::Unexpected);
        }
        t.last_data = now;
        t.last_received = now;
        t.stats.packets_received += 1;
        t.missed = 0;
        t.stats.bytes_received += inner.len() as u64;
        Ok(Received::Packet(range))
    }

    // -- Handover ------------------------------------------------------------------------------

    /// After an address change: PATH_UPDATE on direct tunnels, RELAY_BIND (and PATH_UPDATE
    /// through the RS) on relayed ones, a rebuild where the family is gone (spec/05 §5.9).
    pub(super) fn move_tunnels<R: RngCore + CryptoRng>(&mut self, now: Time, rng: &mut R) {
        let own = self.config.local_addrs.clone();
        let ids: Vec<u32> = self
            .tunnels
            .iter()
            .filter(|(_, t)| t.retire_at.is_none())
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let Some(t) = self.tunnels.get(&id) else {
                continue;
            };
            let relay_rs = t.relay.as_ref().map(|r| r.rs);
            let dst = t.path.addr();
            let peer = t.peer.clone();
            let on_relay = matches!(t.path, TunnelPath::Relay(_));
            let Some(local) = self.socket_for(dst) else {
                // No family in common with the endpoint: ask for another route at once (sent
                // once the node is registered from its new address).
                if let Some(t) = self.tunnels.get_mut(&id) {
                    t.update = None;
                    t.keepalive = None;
                    t.probes = None;
                }
                match relay_rs.and_then(|rs| self.socket_for(rs).map(|l| (l, rs))) {
                    Some((l, rs)) => {
                        self.demote(now, id, l, rs, rng);
                    }
                    None => self.request_direction(now, peer, id, rng),
                }
                continue;
            };
            if let Some(t) = self.tunnels.get_mut(&id) {
                t.local = local;
            }
            if on_relay {
                self.rebind(now, id, rng);
            }
            let msg: Message = PathUpdate {
                reason: PathUpdateReason::Handover,
                local_addrs: addr_list(&own),
                extensions: Extensions::none(),
            }
            .into();
            self.start_update(now, id, msg, rng);
            if let Some(t) = self.tunnels.get_mut(&id) {
                if on_relay && t.probe_direct {
                    t.probes = Some(ProbeRound {
                        next: now,
                        until: now + self.config.timers.probe_round,
                        txid: 0,
                    });
                }
            }
        }
        // Pending relayed directions bind again from the new address.
        let pending: Vec<u32> = self
            .pending
            .iter()
            .filter(|(_, p)| p.relay.is_some())
            .map(|(id, _)| *id)
            .collect();
        for id in pending {
            self.send_relay_bind(now, id, rng);
        }
    }

    /// RELAY_BIND from the tunnel's current socket (handover, demotion).
    fn rebind<R: RngCore + CryptoRng>(&mut self, now: Time, path_id: u32, rng: &mut R) {
        let cfg = self.config.retransmit;
        let Some(t) = self.tunnels.get_mut(&path_id) else {
            return;
        };
        let local = t.local;
        let Some(leg) = t.relay.as_mut() else {
            return;
        };
        let rs = leg.rs;
        let rto = self.rtt.rto(rs, &cfg);
        let txid = rng.next_u32();
        let msg: Message = RelayBind {
            extensions: Extensions::none(),
        }
        .into();
        if let Some(d) = crate::signaling::sealed(leg.key.seal_to_vec(&msg, txid, None)) {
            self.outbox.push(Some(local), rs, d);
        }
        leg.bind = Some(Transaction::start(
            now,
            txid,
            MessageType::RelayBind,
            rs,
            rto,
            &cfg,
            rng,
        ));
        leg.last_used = now;
    }

    /// Back to the relay from a failed direct path (spec/05 §5.10 demotion).
    fn demote<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        path_id: u32,
        local: SocketAddr,
        rs: SocketAddr,
        rng: &mut R,
    ) {
        let Some(t) = self.tunnels.get_mut(&path_id) else {
            return;
        };
        t.path = TunnelPath::Relay(rs);
        t.local = local;
        t.missed = 0;
        t.keepalive = None;
        t.next_round = Some(now + self.config.timers.probe_repeat);
        let peer = t.peer.clone();
        self.rebind(now, path_id, rng);
        self.event(NodeEvent::PathChanged {
            peer,
            path_id,
            path: TunnelPath::Relay(rs),
        });
        // Tell the peer through the RS, so that it goes back to the relay too.
        let msg: Message = PathUpdate {
            reason: PathUpdateReason::Handover,
            local_addrs: addr_list(&self.config.local_addrs),
            extensions: Extensions::none(),
        }
        .into();
        self.start_update(now, path_id, msg, rng);
    }

    // -- Timers --------------------------------------------------------------------------------

    pub(super) fn tunnel_deadline(&self) -> Option<(Time, &'static str)> {
        let t = &self.config.timers;
        let mut best: Option<(Time, &'static str)> = None;
        let mut take = |at: Time, label: &'static str| {
            if best.is_none_or(|(b, _)| at < b) {
                best = Some((at, label));
            }
        };
        for p in self.pending.values() {
            take(p.expires, "pending direction expiry");
            if let Some((tx, _)) = &p.request {
                take(tx.deadline(), "tunnel request retransmission");
            }
            if let Some(g) = p.give_up_at {
                take(g, "direct attempt deadline");
            }
            if let Some(b) = p.relay.as_ref().and_then(|r| r.bind.as_ref()) {
                take(b.deadline(), "relay bind retransmission");
            }
        }
        for tun in self.tunnels.values() {
            if (tun.close_wanted || tun.key_used_up) && tun.close.is_none() {
                take(Time::ZERO, "closing the duplicate tunnel");
            }
            if let Some(r) = tun.retire_at {
                take(r, "replaced tunnel removal");
                if let Some(c) = &tun.close {
                    take(c.deadline(), "tunnel close retransmission");
                }
                continue;
            }
            if let Some(c) = &tun.close {
                // Closing: only the close's retransmissions remain.
                take(c.deadline(), "tunnel close retransmission");
                continue;
            }
            take(tun.last_data + t.idle, "tunnel idle expiry");
            match &tun.keepalive {
                Some(k) => take(k.deadline, "tunnel keep-alive reply wait"),
                None => take(
                    tun.last_sent.min(tun.last_received) + t.keepalive,
                    "tunnel keep-alive",
                ),
            }
            if let Some(p) = &tun.probes {
                take(p.next, "route optimization probe");
            }
            if let Some(r) = tun.next_round {
                take(r, "route optimization round");
            }
            if let Some(u) = &tun.update {
                take(
                    u.tx.deadline().min(u.give_up_at),
                    "path update retransmission",
                );
            }
            if let (None, Some(at)) = (&tun.update, tun.move_unconfirmed) {
                take(at, "unacknowledged path update retry");
            }
            if let Some(b) = tun.relay.as_ref().and_then(|r| r.bind.as_ref()) {
                take(b.deadline(), "relay bind retransmission");
            }
            if let Some(h) = &tun.handshake {
                take(h.until, "tunnel handshake answer expiry");
            }
        }
        best
    }

    pub(super) fn tunnels_due<R: RngCore + CryptoRng>(&mut self, now: Time, rng: &mut R) {
        if self.dc_leg().is_some() {
            let wanted: Vec<(Fqdn, u32)> = self.wanted.drain(..).collect();
            for (peer, rebuild) in wanted {
                let live = self.tunnel_to(&peer);
                // A rebuild is still wanted if the tunnel it rebuilds is the current one.
                let needed = match rebuild {
                    0 => live.is_none(),
                    id => live.is_none() || live == Some(id),
                };
                if needed && !self.lookups.contains_key(&peer) {
                    self.request_direction(now, peer, rebuild, rng);
                }
            }
        }
        let ids: Vec<u32> = self.pending.keys().copied().collect();
        for id in ids {
            self.pending_due(now, id, rng);
        }
        let ids: Vec<u32> = self.tunnels.keys().copied().collect();
        for id in ids {
            self.tunnel_due(now, id, rng);
        }
    }

    fn pending_due<R: RngCore + CryptoRng>(&mut self, now: Time, path_id: u32, rng: &mut R) {
        let cfg = self.config.retransmit;
        let Some(p) = self.pending.get_mut(&path_id) else {
            return;
        };
        if p.expires <= now {
            let peer = p.rd.peer_fqdn.clone();
            self.pending.remove(&path_id);
            self.queued.remove(&peer);
            self.event(NodeEvent::Error(NodeError::Unreachable { peer }));
            return;
        }
        if p.give_up_at.is_some_and(|g| g <= now) {
            self.give_up_direct(now, path_id, rng);
            return;
        }
        // RELAY_BIND retransmission.
        let mut rebind = false;
        if let Some(leg) = p.relay.as_mut() {
            if let Some(b) = leg.bind.as_mut() {
                match b.on_timeout(now, &cfg, rng) {
                    Expiry::Retransmit => rebind = true,
                    Expiry::Failed => leg.bind = None,
                    Expiry::NotDue => {}
                }
            }
        }
        if rebind {
            let txid = p
                .relay
                .as_ref()
                .and_then(|l| l.bind.as_ref())
                .map(|b| b.txid());
            let rs = p.relay.as_ref().map(|l| l.rs);
            if let (Some(txid), Some(rs)) = (txid, rs) {
                let local = self.socket_for(rs);
                if let (Some(local), Some(leg)) = (
                    local,
                    self.pending
                        .get_mut(&path_id)
                        .and_then(|p| p.relay.as_mut()),
                ) {
                    let msg: Message = RelayBind {
                        extensions: Extensions::none(),
                    }
                    .into();
                    if let Some(d) = crate::signaling::sealed(leg.key.seal_to_vec(&msg, txid, None))
                    {
                        self.outbox.push(Some(local), rs, d);
                    }
                }
            }
        }
        let Some(p) = self.pending.get_mut(&path_id) else {
            return;
        };
        let direct = p.relay.is_none();
        let Some((tx, _)) = p.request.as_mut() else {
            return;
        };
        if tx.deadline() > now {
            return;
        }
        // A direct attempt other than SameNat gives up at the 4th transmission's RTO.
        if direct && tx.transmissions() >= 4 {
            self.give_up_direct(now, path_id, rng);
            return;
        }
        match tx.on_timeout(now, &cfg, rng) {
            Expiry::Retransmit => self.send_tunnel_request(now, path_id, false, rng),
            Expiry::Failed => self.give_up_direct(now, path_id, rng),
            Expiry::NotDue => {}
        }
    }

    fn tunnel_due<R: RngCore + CryptoRng>(&mut self, now: Time, path_id: u32, rng: &mut R) {
        let cfg = self.config.retransmit;
        let timers = self.config.timers;
        let own = self.config.local_addrs.clone();
        let Some(t) = self.tunnels.get_mut(&path_id) else {
            return;
        };
        if t.close_wanted || t.key_used_up {
            let reason = if t.key_used_up {
                CloseReason::Error
            } else {
                CloseReason::Normal
            };
            t.close_wanted = false;
            t.key_used_up = false;
            if t.close.is_none() {
                self.send_close(now, path_id, reason, rng);
                return;
            }
        }
        if t.retire_at.is_some_and(|r| r <= now) {
            self.remove_tunnel(path_id, DownReason::Replaced);
            return;
        }
        if t.handshake.as_ref().is_some_and(|h| h.until <= now) {
            t.handshake = None;
        }
        // TUNNEL_CLOSE retransmission; removal after the last.
        if let Some(c) = t.close.as_mut() {
            match c.on_timeout(now, &cfg, rng) {
                Expiry::Failed => {
                    let reason = down_reason(t.close_reason);
                    self.remove_tunnel(path_id, reason);
                    return;
                }
                Expiry::Retransmit => {
                    let txid = c.txid();
                    let msg: Message = TunnelClose {
                        reason: t.close_reason,
                        extensions: Extensions::none(),
                    }
                    .into();
                    let dst = c.remote();
                    if let Some(d) = crate::signaling::sealed(t.ctrl.seal_to_vec(&msg, txid, None))
                    {
                        self.outbox.push(Some(t.local), dst, d);
                    }
                }
                Expiry::NotDue => {}
            }
            return;
        }
        if t.retire_at.is_some() {
            return;
        }
        // Idle expiry.
        if t.last_data + timers.idle <= now {
            self.send_close(now, path_id, CloseReason::Idle, rng);
            return;
        }
        // PATH_UPDATE: retransmit; after 2 RTO without ACK the path is presumed lost.
        if let Some(u) = t.update.as_mut() {
            if u.give_up_at <= now {
                let first = !u.retry_only;
                let optimization = matches!(
                    &u.msg,
                    Message::PathUpdate(p) if p.reason == PathUpdateReason::RouteOptimization
                );
                t.update = None;
                if first && optimization {
                    // The direct path found by probing did not carry the PATH_UPDATE: back to
                    // the relay, whose binding is still live (spec/05 §5.10).
                    let rs = t.relay.as_ref().map(|r| r.rs);
                    let local =
                        rs.and_then(|rs| own.iter().copied().find(|l| l.is_ipv6() == rs.is_ipv6()));
                    if let (Some(rs), Some(local)) = (rs, local) {
                        self.demote(now, path_id, local, rs, rng);
                        return;
                    }
                }
                // An unacknowledged PATH_UPDATE is tried again now and then while the tunnel
                // stays: until the peer hears of it, it sends to the old address.
                t.move_unconfirmed = Some(now + timers.move_retry);
                if first && matches!(t.path, TunnelPath::Direct(_)) {
                    // The peer never heard of the move: only the DC can direct both ends to a
                    // new path (spec/05 §5.9.1); rebinding at the RS alone would leave the peer
                    // sending to the old address.
                    let peer = t.peer.clone();
                    self.request_direction(now, peer, path_id, rng);
                    return;
                }
            } else if u.tx.on_timeout(now, &cfg, rng) == Expiry::Retransmit {
                let (txid, dst) = (u.tx.txid(), u.tx.remote());
                if let Some(d) = crate::signaling::sealed(t.ctrl.seal_to_vec(&u.msg, txid, None)) {
                    self.outbox.push(Some(t.local), dst, d);
                }
            }
        }
        if t.update.is_none() && t.move_unconfirmed.is_some_and(|at| at <= now) {
            t.move_unconfirmed = Some(now + timers.move_retry);
            let msg: Message = PathUpdate {
                reason: PathUpdateReason::Handover,
                local_addrs: addr_list(&own),
                extensions: Extensions::none(),
            }
            .into();
            self.start_update(now, path_id, msg, rng);
            // Its give-up sets the next retry; it does not ask for another rebuild.
            if let Some(u) = self
                .tunnels
                .get_mut(&path_id)
                .and_then(|t| t.update.as_mut())
            {
                u.retry_only = true;
            }
            return;
        }
        // RELAY_BIND retransmission.
        if let Some(leg) = t.relay.as_mut() {
            if let Some(b) = leg.bind.as_mut() {
                match b.on_timeout(now, &cfg, rng) {
                    Expiry::Retransmit => {
                        let local = own
                            .iter()
                            .copied()
                            .find(|l| l.is_ipv6() == leg.rs.is_ipv6());
                        let txid = b.txid();
                        let msg: Message = RelayBind {
                            extensions: Extensions::none(),
                        }
                        .into();
                        match local {
                            // No address of the RS's family left (the node moved): this bind
                            // cannot be sent; the tunnel's rebuild takes over.
                            None => leg.bind = None,
                            Some(local) => {
                                if let Some(d) =
                                    crate::signaling::sealed(leg.key.seal_to_vec(&msg, txid, None))
                                {
                                    self.outbox.push(Some(local), leg.rs, d);
                                }
                            }
                        }
                    }
                    Expiry::Failed => leg.bind = None,
                    Expiry::NotDue => {}
                }
            }
        }
        // Route-optimization probes: one per candidate per interval during a round.
        if let Some(p) = t.probes.as_mut() {
            if p.until <= now {
                t.probes = None;
                t.next_round = Some(now + timers.probe_repeat);
            } else if p.next <= now {
                if p.txid == 0 {
                    p.txid = rng.next_u32() | 1;
                }
                p.next = now + timers.probe_interval;
                let txid = p.txid;
                let msg: Message = Keepalive {
                    reply_requested: true,
                    extensions: Extensions::none(),
                }
                .into();
                let rs = t.relay.as_ref().map(|r| r.rs);
                let mut probe_to = t.candidates.clone();
                for a in &t.update_addrs {
                    if !probe_to.contains(a) {
                        probe_to.push(*a);
                    }
                }
                for c in probe_to {
                    if own.iter().any(|l| l.ip() == c.ip()) || Some(c) == rs {
                        continue;
                    }
                    let Some(local) = own.iter().copied().find(|l| l.is_ipv6() == c.is_ipv6())
                    else {
                        continue;
                    };
                    if let Some(d) = crate::signaling::sealed(t.ctrl.seal_to_vec(&msg, txid, None))
                    {
                        self.outbox.push(Some(local), c, d);
                    }
                }
            }
        }
        if t.next_round.is_some_and(|r| r <= now) && matches!(t.path, TunnelPath::Relay(_)) {
            t.next_round = None;
            t.probes = Some(ProbeRound {
                next: now,
                until: now + timers.probe_round,
                txid: 0,
            });
        }
        // Keep-alives and path failure (spec/05 §5.16).
        let dst = t.path.addr();
        if let Some(k) = &t.keepalive {
            if k.deadline <= now {
                t.keepalive = None;
                t.missed = t.missed.saturating_add(1);
                if t.missed >= timers.missed_replies {
                    t.missed = 0;
                    // Back to the relay only while its binding is live (the RS forgets a side
                    // 120 s after its last use, spec/05 §5.6); else a rebuild (spec/05 §5.10).
                    let relay = t
                        .relay
                        .as_ref()
                        .filter(|r| r.last_used + RELAY_BINDING_LIFE > now)
                        .map(|r| r.rs);
                    let direct = matches!(t.path, TunnelPath::Direct(_));
                    let peer = t.peer.clone();
                    match (direct, relay) {
                        (true, Some(rs)) => {
                            if let Some(local) =
                                own.iter().copied().find(|l| l.is_ipv6() == rs.is_ipv6())
                            {
                                self.demote(now, path_id, local, rs, rng);
                            }
                        }
                        _ => self.request_direction(now, peer, path_id, rng),
                    }
                    return;
                }
                // After a miss the next KEEPALIVE goes at once.
                t.last_sent = Time::ZERO;
            }
        }
        // A keep-alive after 25 s of send silence keeps mappings open; one after 25 s of receive
        // silence asks for a reply, so a node that only sends still notices a dead path.
        let quiet = t.last_received + timers.keepalive <= now;
        if t.keepalive.is_none() && (t.last_sent + timers.keepalive <= now || quiet) {
            let txid = rng.next_u32();
            let msg: Message = Keepalive {
                reply_requested: quiet,
                extensions: Extensions::none(),
            }
            .into();
            if let Some(d) = crate::signaling::sealed(t.ctrl.seal_to_vec(&msg, txid, None)) {
                self.outbox.push(Some(t.local), dst, d);
            }
            t.last_sent = now;
            if quiet {
                let srtt3 = self
                    .rtt
                    .get(dst)
                    .and_then(|e| e.srtt())
                    .map_or(Duration::ZERO, |s| s * 3);
                t.keepalive = Some(AwaitReply {
                    txid,
                    deadline: now + timers.reply_wait.max(srtt3),
                });
            }
        }
    }
}
