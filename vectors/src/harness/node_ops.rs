//! The node under a sequence of operations: see [`node_ops`].

use core::time::Duration;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::OnceLock;

use ntm_state::as_server::{AccountRecord, AccountServer, AsConfig, AsLimits, DcLink};
use ntm_state::login::LoginConfig;
use ntm_state::node::{Node, NodeConfig, NodeLimits, Phase, Received};
use ntm_state::signaling::{RetransmitConfig, SignalingKey};
use ntm_state::time::Time;
use ntm_wire::crypto::{auth_key, tunnel_keys, x25519, x25519_public};
use ntm_wire::data::VIRTUAL_MTU;
use ntm_wire::message::Error as ErrorMsg;
use ntm_wire::{
    classify, open_data, seal_data, Account, Ack, AddrList, AeadKey, CloseReason, DataPacket,
    Datagram, ErrorCode, Extensions, Fqdn, Keepalive, KeepaliveReply, KeyRole, Message,
    MessageType, PathUpdate, PathUpdateReason, RegistrationResponse, Role, RouteDirection,
    RouteKind, RouteReason, SecretKey, SignalingPacket, TransportAddr, TunnelClose, TunnelRequest,
    TunnelResponse, TunnelRole, DATA_HEADER_LEN, DATA_OVERHEAD,
};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

use super::ops::{NodeOp, PathChoice};
use super::state::{
    check_form, decode, describe, fresh_key, known_sources, resolve, step, v4, v6, MAX_HISTORY,
    TRANSMIT_BUF,
};
use super::MAX_RAW_LEN;

const ACCOUNT: &str = "alice";
const PASSWORD: &[u8] = b"password of alice";
const OWN_NAME: &str = "n0.dc1.example";
const AS_DC_KEY_ID: u32 = 17;
/// The fewest PBKDF2 iterations there are: the login costs the fuzzer almost nothing.
const ITERATIONS: u32 = 1;
/// Path IDs `PathChoice::Known` picks from; 0 is never valid for a tunnel.
const PATH_IDS: [u32; 5] = [0x7000_0001, 0x7000_0002, 0x7000_0003, 0x7000_0004, 0];
/// Tunnels the node may hold.
const MAX_TUNNELS: usize = 3;
/// Directions the harness remembers.
const MAX_DIRECTIONS: usize = 16;
/// Repeated firings at one instant before a timer counts as spinning.
const MAX_SAME_INSTANT: usize = 4;
/// Timer firings per time step, at most.
const MAX_TIMER_STEPS: usize = 4096;

fn as_addr() -> SocketAddr {
    v4([203, 0, 113, 2], 4280)
}

fn dc_addr() -> SocketAddr {
    v4([203, 0, 113, 10], 4281)
}

fn rs_addrs() -> [SocketAddr; 2] {
    [v4([203, 0, 113, 9], 4282), v6("2001:db8:9::9", 4282)]
}

/// The addresses the node may have: its first two at the start.
fn node_addrs() -> [SocketAddr; 4] {
    [
        v4([198, 51, 100, 10], 5000),
        v6("2001:db8:1:2::1", 5000),
        v4([198, 51, 100, 77], 5000),
        v6("2001:db8:7:7::7", 5000),
    ]
}

fn own_vaddrs() -> (Ipv4Addr, Ipv6Addr) {
    (
        Ipv4Addr::new(100, 64, 1, 1),
        "fd4e:544d:0:1::1".parse().expect("v6"),
    )
}

/// The peers the harness plays: name and virtual pair.
fn peer(i: usize) -> (Fqdn, Ipv4Addr, Ipv6Addr) {
    let names = ["n1.dc1.example", "n2.dc1.example", "n3.dc2.example"];
    let i = i % names.len();
    (
        Fqdn::new(names[i]).expect("name"),
        Ipv4Addr::new(100, 64, 1, 2 + i as u8),
        Ipv6Addr::new(0xfd4e, 0x544d, 0, 1, 0, 0, 0, 2 + i as u16),
    )
}

fn as_config() -> &'static AsConfig {
    static CONFIG: OnceLock<AsConfig> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let salt = [0x11; 16];
        let dc = Fqdn::new("dc1.example").expect("name");
        let mut accounts = BTreeMap::new();
        accounts.insert(
            Account::new(ACCOUNT).expect("account"),
            AccountRecord {
                auth_key: auth_key(PASSWORD, &salt, ITERATIONS),
                salt,
                iterations: ITERATIONS,
                node_fqdn: Fqdn::new(OWN_NAME).expect("name"),
                dc: dc.clone(),
                dc_addrs: AddrList::new(vec![TransportAddr::new(dc_addr())]).expect("one"),
                ns_addrs: AddrList::empty(),
                cs_addrs: AddrList::empty(),
                keepalive_interval_s: 25,
            },
        );
        let mut dcs = BTreeMap::new();
        dcs.insert(
            dc,
            DcLink {
                key: SecretKey::from_bytes([0x5a; 32]),
                key_id: AS_DC_KEY_ID,
                addr: dc_addr(),
                high_water_mark: 0,
            },
        );
        AsConfig {
            static_secret: SecretKey::from_bytes([0x21; 32]),
            concealment_secret: SecretKey::from_bytes([0x33; 32]),
            default_iterations: ITERATIONS,
            session_lifetime: Duration::from_secs(24 * 3600),
            dcs,
            accounts,
            limits: AsLimits::default(),
            retransmit: RetransmitConfig::default(),
        }
    })
}

/// One direction the harness (as the DC) gave the node, with the harness as its peer.
struct Direction {
    path_id: u32,
    txid: u32,
    rd: RouteDirection,
    /// The peer's end of K_tun (the opposite role of the node's).
    tun: SignalingKey,
    /// The RS's end of K_rel (role Relay), on relayed routes.
    rel: Option<SignalingKey>,
    /// Where the peer sends from: the relay of the node's family, or its first address.
    peer_at: SocketAddr,
    my_secret: [u8; 32],
    my_public: [u8; 32],
    node_ephemeral: Option<[u8; 32]>,
    /// The node's TUNNEL_REQUEST transaction (the node initiates) or the one the harness sent.
    handshake_txid: Option<u32>,
    /// The node's last RELAY_BIND transaction.
    bind_txid: Option<u32>,
    /// Once the handshake is known to both: (peer → node, node → peer, K_ctrl as the peer).
    keys: Option<(AeadKey, AeadKey, SignalingKey)>,
    counter: u64,
}

impl Direction {
    fn node_role(&self) -> Role {
        if self.rd.role == TunnelRole::Initiator {
            Role::A
        } else {
            Role::B
        }
    }

    /// Derives the tunnel keys once both ephemerals are known.
    fn derive(&mut self) {
        let Some(node_e) = self.node_ephemeral else {
            return;
        };
        if self.keys.is_some() {
            return;
        }
        let Ok(dh) = x25519(&self.my_secret, &node_e) else {
            return;
        };
        let node_initiates = self.rd.role == TunnelRole::Initiator;
        let (ei, er) = if node_initiates {
            (node_e, self.my_public)
        } else {
            (self.my_public, node_e)
        };
        let k = tunnel_keys(&dh, &self.rd.tunnel_credential, self.path_id, &ei, &er);
        let (to_node, from_node) = if node_initiates {
            (&k.responder_to_initiator, &k.initiator_to_responder)
        } else {
            (&k.initiator_to_responder, &k.responder_to_initiator)
        };
        let peer_role = if node_initiates { Role::B } else { Role::A };
        self.keys = Some((
            AeadKey::new(to_node),
            AeadKey::new(from_node),
            SignalingKey::new(&k.control, self.path_id, peer_role),
        ));
    }
}

#[derive(Clone)]
struct Sent {
    datagram: Vec<u8>,
    source: SocketAddr,
    local: SocketAddr,
}

struct NodeBench {
    node: Node,
    server: AccountServer,
    rng: ChaCha8Rng,
    mine: ChaCha8Rng,
    now: Time,
    known: [SocketAddr; 8],
    locals: Vec<SocketAddr>,
    /// The harness as the DC: K_nd, role B.
    dc: Option<SignalingKey>,
    session_key_id: u32,
    as_dc: SignalingKey,
    last_registration: Option<u32>,
    last_direction_request: Option<u32>,
    directions: Vec<Direction>,
    history: Vec<Sent>,
    /// The node is being set up: the AS and the harness's DC answer at once.
    setup: bool,
}

/// Runs up to `MAX_OPS` operations against a [`Node`] logged in (with a real
/// [`AccountServer`], one PBKDF2 iteration) and registered with the harness as its DC. Checks
/// after each: nothing panics; every datagram the node sends parses, fits 1232 bytes (signaling)
/// and leaves from one of the node's current addresses; every datagram to the DC opens under
/// K_nd; a received packet the node hands up comes from the virtual address of the peer of its
/// tunnel to the node's own; an encapsulated packet leaves from a current address and opens under
/// the tunnel's keys to the same packet; the timers never stay due after they fire (a bounded
/// number of firings at one instant reaches a later deadline); the tunnel table stays within
/// its limit.
pub fn node_ops(data: &[u8]) {
    let (seed, ops) = decode::<NodeOp>(data);
    let mut b = NodeBench::new(seed);
    for (i, op) in ops.into_iter().enumerate() {
        let what = describe(i, &op, |op| match op {
            NodeOp::Raw { source, data, .. } => Some((*source, data.len())),
            _ => None,
        });
        b.apply(&what, op);
    }
}

impl NodeBench {
    fn new(seed: u64) -> Self {
        let server = AccountServer::new(as_config().clone()).expect("AS configuration");
        let login = LoginConfig {
            min_iterations: ITERATIONS,
            ..LoginConfig::new(
                Account::new(ACCOUNT).expect("account"),
                server.public_key(),
                as_addr(),
            )
        };
        let locals = node_addrs()[..2].to_vec();
        let mut config = NodeConfig::new(login, locals.clone(), SecretKey::from_bytes([0x40; 32]));
        config.limits = NodeLimits {
            max_tunnels: MAX_TUNNELS,
            max_pending: 3,
            max_held_requests: 2,
            max_queued_packets: 2,
            max_known_peers: 4,
            max_queued_transmits: 16,
            max_queued_events: 16,
            ..NodeLimits::default()
        };
        let node = Node::new(config, PASSWORD).expect("node configuration");
        let mut b = NodeBench {
            node,
            server,
            // The setup is the same for every input; the fuzzer's seed takes over after it.
            rng: ChaCha8Rng::seed_from_u64(0x6e6f6465),
            mine: ChaCha8Rng::seed_from_u64(seed ^ 0x6861_726e_6573_7321),
            now: Time::from_secs(1),
            known: known_sources(dc_addr(), locals[0]),
            locals,
            dc: None,
            session_key_id: 0,
            as_dc: SignalingKey::new(&SecretKey::from_bytes([0x5a; 32]), AS_DC_KEY_ID, Role::B),
            last_registration: None,
            last_direction_request: None,
            directions: Vec::new(),
            history: Vec::new(),
            setup: true,
        };
        b.node.start(b.now, &mut b.rng);
        b.drain("setup");
        for _ in 0..8 {
            if b.node.phase() == Phase::Ready {
                break;
            }
            let t = b.now + Duration::from_millis(1);
            b.run_timers("setup", t);
        }
        assert_eq!(
            b.node.phase(),
            Phase::Ready,
            "setup: the node did not register"
        );
        assert_eq!(b.node.virtual_addrs(), Some(own_vaddrs()), "setup");
        b.setup = false;
        b.rng = ChaCha8Rng::seed_from_u64(seed);
        b
    }

    fn path_id(c: PathChoice) -> u32 {
        match c {
            PathChoice::Known(i) => PATH_IDS[usize::from(i) % PATH_IDS.len()],
            PathChoice::Any(id) => id,
        }
    }

    fn apply(&mut self, what: &str, op: NodeOp) {
        match op {
            NodeOp::Raw {
                source,
                local,
                mut data,
            } => {
                data.truncate(MAX_RAW_LEN);
                let remote = resolve(source, &self.known);
                let local = self.local(local);
                self.deliver(what, data, remote, local);
            }
            NodeOp::Direction {
                peer: p,
                path,
                route,
                initiator,
                reason,
                peer_addrs,
                relay_addrs,
                relay_key,
                probe_direct,
                txid,
            } => {
                let Some(dc) = self.dc.as_mut() else {
                    return;
                };
                let last = self.directions.last();
                let (rd, txid) = match (txid, last) {
                    (None, Some(d)) => (d.rd.clone(), d.txid),
                    (t, _) => {
                        let (name, pv4, pv6) = peer(usize::from(p));
                        let route = RouteKind::ALL[usize::from(route) % RouteKind::ALL.len()];
                        let addrs = [self.known[2], self.known[4], self.known[0], self.known[3]];
                        let peer_addrs = addrs[..usize::from(peer_addrs % 4)]
                            .iter()
                            .map(|a| TransportAddr::new(*a))
                            .collect();
                        let relay_addrs = rs_addrs()[..usize::from(relay_addrs % 3)]
                            .iter()
                            .map(|a| TransportAddr::new(*a))
                            .collect();
                        let with_key = relay_key.unwrap_or(route == RouteKind::Relay);
                        let rd = RouteDirection {
                            path_id: Self::path_id(path),
                            route,
                            role: if initiator {
                                TunnelRole::Initiator
                            } else {
                                TunnelRole::Responder
                            },
                            reason: RouteReason::ALL[usize::from(reason) % RouteReason::ALL.len()],
                            peer_fqdn: name,
                            peer_virtual_v4: pv4,
                            peer_virtual_v6: pv6,
                            peer_public_key: [0x42; 32],
                            peer_addrs: AddrList::new(peer_addrs).expect("at most 3"),
                            relay_addrs: AddrList::new(relay_addrs).expect("at most 2"),
                            tunnel_credential: SecretKey::from_bytes(fresh_key(&mut self.mine)),
                            relay_key: with_key
                                .then(|| SecretKey::from_bytes(fresh_key(&mut self.mine))),
                            probe_direct,
                            lifetime_s: 3600,
                            extensions: Extensions::none(),
                        };
                        (rd, t.unwrap_or(1))
                    }
                };
                let msg: Message = rd.clone().into();
                let datagram = dc.seal_to_vec(&msg, txid, None).expect("seal");
                if self.directions.len() < MAX_DIRECTIONS {
                    let node_role = if rd.role == TunnelRole::Initiator {
                        Role::A
                    } else {
                        Role::B
                    };
                    let peer_role = if node_role == Role::A {
                        Role::B
                    } else {
                        Role::A
                    };
                    let relay = rd
                        .relay_addrs
                        .as_slice()
                        .iter()
                        .map(|a| a.socket_addr())
                        .find(|a| self.locals.iter().any(|l| l.is_ipv6() == a.is_ipv6()));
                    let peer_at = match (rd.route, relay) {
                        (RouteKind::Relay, Some(rs)) => rs,
                        _ => rd
                            .peer_addrs
                            .as_slice()
                            .first()
                            .map_or(self.known[2], |a| a.socket_addr()),
                    };
                    let my_secret = fresh_key(&mut self.mine);
                    self.directions.push(Direction {
                        path_id: rd.path_id,
                        txid,
                        tun: SignalingKey::new(&rd.tunnel_credential, rd.path_id, peer_role),
                        rel: rd
                            .relay_key
                            .as_ref()
                            .map(|k| SignalingKey::new(k, rd.path_id, Role::Relay)),
                        peer_at,
                        my_public: x25519_public(&my_secret),
                        my_secret,
                        node_ephemeral: None,
                        handshake_txid: None,
                        bind_txid: None,
                        keys: None,
                        counter: 0,
                        rd,
                    });
                }
                let local = self.local(0);
                self.deliver(what, datagram, dc_addr(), local);
            }
            NodeOp::Handshake {
                index,
                from,
                low_order,
                hold,
            } => {
                let Some(i) = self.pick(index) else {
                    return;
                };
                let observed = self.local(0);
                let d = &mut self.directions[i];
                let ephemeral = if low_order { [0u8; 32] } else { d.my_public };
                let msg: Message = if d.rd.role == TunnelRole::Responder {
                    TunnelRequest {
                        ephemeral,
                        sender_fqdn: d.rd.peer_fqdn.clone(),
                        sender_virtual_v4: d.rd.peer_virtual_v4,
                        sender_virtual_v6: d.rd.peer_virtual_v6,
                        extensions: Extensions::none(),
                    }
                    .into()
                } else {
                    TunnelResponse {
                        ephemeral,
                        observed_addr: TransportAddr::new(observed),
                        extensions: Extensions::none(),
                    }
                    .into()
                };
                let txid = match d.handshake_txid {
                    Some(t) => t,
                    None => {
                        let t = self.mine.next_u32();
                        if d.rd.role == TunnelRole::Responder {
                            d.handshake_txid = Some(t);
                        }
                        t
                    }
                };
                let datagram = d.tun.seal_to_vec(&msg, txid, None).expect("seal");
                let remote = from.map_or(d.peer_at, |s| resolve(s, &self.known));
                self.send_or_hold(what, datagram, remote, hold);
            }
            NodeOp::RelayAnswer { index, refuse } => {
                let Some(i) = self.pick(index) else {
                    return;
                };
                let d = &mut self.directions[i];
                let Some(rel) = d.rel.as_mut() else {
                    return;
                };
                let (msg, txid): (Message, u32) = if refuse {
                    let m = ErrorMsg {
                        code: ErrorCode::PeerNotBound,
                        failed_type: MessageType::TunnelRequest.to_u8(),
                        retry_after_ms: 0,
                        extensions: Extensions::none(),
                    };
                    (m.into(), d.handshake_txid.unwrap_or(0))
                } else {
                    let m = Ack {
                        acked_type: MessageType::RelayBind.to_u8(),
                        extensions: Extensions::none(),
                    };
                    (m.into(), d.bind_txid.unwrap_or(0))
                };
                let datagram = rel.seal_to_vec(&msg, txid, None).expect("seal");
                let remote = d.peer_at;
                self.send_or_hold(what, datagram, remote, false);
            }
            NodeOp::Data {
                index,
                v6,
                inner,
                len,
                counter,
                from,
            } => {
                let Some(i) = self.pick(index) else {
                    return;
                };
                let (own4, own6) = own_vaddrs();
                let d = &mut self.directions[i];
                let Some((to_node, _, _)) = d.keys.as_ref() else {
                    return;
                };
                let (src, dst) = match (v6, inner % 3) {
                    (false, 0) => (IpAddr::V4(d.rd.peer_virtual_v4), IpAddr::V4(own4)),
                    (false, 1) => (IpAddr::V4(Ipv4Addr::new(100, 64, 1, 99)), IpAddr::V4(own4)),
                    (false, _) => (
                        IpAddr::V4(d.rd.peer_virtual_v4),
                        IpAddr::V4(d.rd.peer_virtual_v4),
                    ),
                    (true, 0) => (IpAddr::V6(d.rd.peer_virtual_v6), IpAddr::V6(own6)),
                    (true, 1) => (IpAddr::V6(Ipv6Addr::LOCALHOST), IpAddr::V6(own6)),
                    (true, _) => (
                        IpAddr::V6(d.rd.peer_virtual_v6),
                        IpAddr::V6(Ipv6Addr::LOCALHOST),
                    ),
                };
                let packet = ip_packet(src, dst, usize::from(len));
                let c = counter.map_or(d.counter, u64::from);
                d.counter = d.counter.max(c + 1);
                let mut buf = vec![0u8; packet.len() + DATA_OVERHEAD];
                buf[DATA_HEADER_LEN..DATA_HEADER_LEN + packet.len()].copy_from_slice(&packet);
                let n =
                    seal_data(to_node, d.path_id, c, false, &mut buf, packet.len()).expect("sized");
                buf.truncate(n);
                let remote = from.map_or(d.peer_at, |s| resolve(s, &self.known));
                self.send_or_hold(what, buf, remote, false);
            }
            NodeOp::Control {
                index,
                kind,
                reply,
                txid,
                from,
                hold,
            } => {
                let Some(i) = self.pick(index) else {
                    return;
                };
                let locals = self.locals.clone();
                let d = &mut self.directions[i];
                let Some((_, _, ctrl)) = d.keys.as_mut() else {
                    return;
                };
                let remote = from.map_or(d.peer_at, |s| resolve(s, &self.known));
                let msg: Message = match kind % 7 {
                    0 => Keepalive {
                        reply_requested: reply,
                        extensions: Extensions::none(),
                    }
                    .into(),
                    1 => KeepaliveReply {
                        observed_addr: TransportAddr::new(
                            locals.first().copied().unwrap_or(node_addrs()[0]),
                        ),
                        extensions: Extensions::none(),
                    }
                    .into(),
                    2 | 3 => PathUpdate {
                        reason: if reply {
                            PathUpdateReason::RouteOptimization
                        } else {
                            PathUpdateReason::ALL[usize::from(kind) % PathUpdateReason::ALL.len()]
                        },
                        local_addrs: AddrList::new(vec![TransportAddr::new(remote)]).expect("one"),
                        extensions: Extensions::none(),
                    }
                    .into(),
                    4 => TunnelClose {
                        reason: CloseReason::ALL[usize::from(kind) % CloseReason::ALL.len()],
                        extensions: Extensions::none(),
                    }
                    .into(),
                    5 => Ack {
                        acked_type: if reply {
                            MessageType::PathUpdate.to_u8()
                        } else {
                            MessageType::TunnelClose.to_u8()
                        },
                        extensions: Extensions::none(),
                    }
                    .into(),
                    _ => ErrorMsg {
                        code: ErrorCode::ALL[usize::from(kind) % ErrorCode::ALL.len()],
                        failed_type: MessageType::PathUpdate.to_u8(),
                        retry_after_ms: 0,
                        extensions: Extensions::none(),
                    }
                    .into(),
                };
                let txid = txid.unwrap_or_else(|| self.mine.next_u32());
                let datagram = ctrl.seal_to_vec(&msg, txid, None).expect("seal");
                self.send_or_hold(what, datagram, remote, hold);
            }
            NodeOp::DcAnswer { registration, code } => {
                let txid = if registration {
                    self.last_registration
                } else {
                    self.last_direction_request
                };
                let observed = self.local(0);
                let (Some(txid), Some(dc)) = (txid, self.dc.as_mut()) else {
                    return;
                };
                let msg: Message = match (registration, code) {
                    (true, None) => registration_response(observed),
                    (true, Some(c)) => ErrorMsg {
                        code: ErrorCode::ALL[usize::from(c) % ErrorCode::ALL.len()],
                        failed_type: MessageType::RegistrationRequest.to_u8(),
                        retry_after_ms: u32::from(c) * 10,
                        extensions: Extensions::none(),
                    }
                    .into(),
                    (false, c) => ErrorMsg {
                        code: ErrorCode::ALL[usize::from(c.unwrap_or(0)) % ErrorCode::ALL.len()],
                        failed_type: MessageType::DirectionRequest.to_u8(),
                        retry_after_ms: 0,
                        extensions: Extensions::none(),
                    }
                    .into(),
                };
                let datagram = dc.seal_to_vec(&msg, txid, None).expect("seal");
                let local = self.local(0);
                self.deliver(what, datagram, dc_addr(), local);
            }
            NodeOp::Resolve { peer: p } => {
                let (name, ..) = peer(usize::from(p));
                self.node.resolve(self.now, &name, &mut self.rng);
                self.drain(what);
                let now = self.now;
                self.run_timers(what, now);
            }
            NodeOp::Encapsulate {
                peer: p,
                v6,
                own_source,
                len,
            } => {
                let (own4, own6) = own_vaddrs();
                let (_, pv4, pv6) = peer(usize::from(p));
                let (src, dst) = match (v6, own_source) {
                    (false, true) => (IpAddr::V4(own4), IpAddr::V4(pv4)),
                    (false, false) => (IpAddr::V4(pv4), IpAddr::V4(pv4)),
                    (true, true) => (IpAddr::V6(own6), IpAddr::V6(pv6)),
                    (true, false) => (IpAddr::V6(Ipv6Addr::LOCALHOST), IpAddr::V6(pv6)),
                };
                let packet = ip_packet(src, dst, usize::from(len) % (VIRTUAL_MTU + 40));
                let mut out = vec![0u8; VIRTUAL_MTU + DATA_OVERHEAD];
                let r = self.node.encapsulate(self.now, &packet, &mut out);
                if let Ok(t) = r {
                    self.check_src(what, t.src, t.dst);
                    assert!(t.len <= out.len(), "{what}: beyond the buffer");
                    let mut d = out[..t.len].to_vec();
                    let path_id = DataPacket::parse(&d).expect("DATA").path_id();
                    let tunnel = self
                        .node
                        .tunnels()
                        .into_iter()
                        .find(|t| t.path_id == path_id)
                        .unwrap_or_else(|| panic!("{what}: DATA on path {path_id:#x}, no tunnel"));
                    assert!(
                        dst == IpAddr::V4(tunnel.peer_v4) || dst == IpAddr::V6(tunnel.peer_v6),
                        "{what}: a packet to {dst} in the tunnel to {:?}",
                        tunnel.peer
                    );
                    let opened = self
                        .directions
                        .iter()
                        .filter(|x| x.path_id == path_id)
                        .filter_map(|x| x.keys.as_ref())
                        .find_map(|(_, from_node, _)| {
                            let mut c = d.clone();
                            open_data(from_node, &mut c).ok().map(|r| c[r].to_vec())
                        });
                    if let Some(inner) = opened {
                        assert_eq!(inner, packet, "{what}: the peer opens another packet");
                    }
                    d.clear();
                }
                self.drain(what);
                let now = self.now;
                self.run_timers(what, now);
            }
            NodeOp::AddressChange { mask } => {
                let all = node_addrs();
                let mut addrs: Vec<SocketAddr> = all
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| mask & (1 << i) != 0)
                    .map(|(_, a)| *a)
                    .collect();
                if mask & 0x10 != 0 {
                    addrs.reverse();
                }
                self.locals = addrs.clone();
                self.node
                    .handle_address_change(self.now, addrs, &mut self.rng);
                self.drain(what);
                let now = self.now;
                self.run_timers(what, now);
            }
            NodeOp::Replay { index, source } => {
                let n = self.history.len();
                if n == 0 {
                    return;
                }
                let s = self.history[usize::from(index) % n].clone();
                let remote = source.map_or(s.source, |x| resolve(x, &self.known));
                let local = self.local_like(s.local);
                self.deliver(what, s.datagram, remote, local);
            }
            NodeOp::Mutate { index, pos, xor } => {
                let n = self.history.len();
                if n == 0 {
                    return;
                }
                let mut s = self.history[usize::from(index) % n].clone();
                if s.datagram.is_empty() {
                    return;
                }
                let at = usize::from(pos) % s.datagram.len();
                s.datagram[at] ^= xor.max(1);
                let local = self.local_like(s.local);
                self.deliver(what, s.datagram, s.source, local);
            }
            NodeOp::Advance(s) => {
                let target = self.now + step(s);
                self.run_timers(what, target);
            }
        }
    }

    fn pick(&self, index: u8) -> Option<usize> {
        let n = self.directions.len();
        (n > 0).then(|| usize::from(index) % n)
    }

    /// A current local address (the first, when the node has none left, which it then
    /// receives nothing on: the datagram still goes in, as a runtime might race).
    fn local(&self, i: u8) -> SocketAddr {
        let n = self.locals.len();
        if n == 0 {
            return node_addrs()[0];
        }
        self.locals[usize::from(i) % n]
    }

    /// The node's current socket of `a`'s family, else `a`.
    fn local_like(&self, a: SocketAddr) -> SocketAddr {
        self.locals
            .iter()
            .copied()
            .find(|l| l.is_ipv6() == a.is_ipv6())
            .unwrap_or(a)
    }

    fn send_or_hold(&mut self, what: &str, datagram: Vec<u8>, remote: SocketAddr, hold: bool) {
        let local = self.local_like(remote);
        if hold {
            if self.history.len() < MAX_HISTORY {
                self.history.push(Sent {
                    datagram,
                    source: remote,
                    local,
                });
            }
            return;
        }
        self.deliver(what, datagram, remote, local);
    }

    /// Hands a datagram to the node, checks what it makes of it and what comes out, fires due
    /// timers.
    fn deliver(&mut self, what: &str, datagram: Vec<u8>, remote: SocketAddr, local: SocketAddr) {
        let before = self.node.tunnels();
        let own = self.node.virtual_addrs();
        let mut buf = datagram.clone();
        let r = self
            .node
            .handle_datagram(self.now, local, remote, &mut buf, &mut self.rng);
        if let Received::Packet(range) = r {
            let inner = buf
                .get(range.clone())
                .unwrap_or_else(|| panic!("{what}: a packet range {range:?} beyond the buffer"));
            let path_id = DataPacket::parse(&datagram).expect("DATA").path_id();
            let tunnel = before
                .iter()
                .find(|t| t.path_id == path_id)
                .unwrap_or_else(|| panic!("{what}: a packet on path {path_id:#x}, no tunnel"));
            let (src, dst) = inner_addrs(inner)
                .unwrap_or_else(|| panic!("{what}: a packet that is not IP: {inner:02x?}"));
            assert!(
                src == IpAddr::V4(tunnel.peer_v4) || src == IpAddr::V6(tunnel.peer_v6),
                "{what}: a packet from {src} on the tunnel to {:?}",
                tunnel.peer
            );
            let known_peer = (0..3).any(|i| {
                let (n, a, b) = peer(i);
                n == tunnel.peer && (src == IpAddr::V4(a) || src == IpAddr::V6(b))
            });
            assert!(
                known_peer,
                "{what}: a packet from {src}, no peer of the harness"
            );
            let (o4, o6) = own.unwrap_or_else(|| panic!("{what}: a packet before registration"));
            assert!(
                dst == IpAddr::V4(o4) || dst == IpAddr::V6(o6),
                "{what}: a packet to {dst}, not the node"
            );
        }
        if self.history.len() < MAX_HISTORY && !self.history.iter().any(|h| h.datagram == datagram)
        {
            self.history.push(Sent {
                datagram,
                source: remote,
                local,
            });
        }
        self.drain(what);
        let now = self.now;
        self.run_timers(what, now);
    }

    fn check_src(&self, what: &str, src: Option<SocketAddr>, dst: SocketAddr) {
        match src {
            Some(s) => assert!(
                self.locals.contains(&s),
                "{what}: a datagram to {dst} from {s}, not a current address ({:?})",
                self.locals
            ),
            None => assert_eq!(dst, as_addr(), "{what}: no source for a datagram to {dst}"),
        }
    }

    /// Drains events and transmits; plays the AS and DC while setting up; learns the node's
    /// handshake and binds; checks the bounds.
    fn drain(&mut self, what: &str) {
        while self.node.poll_event().is_some() {}
        let mut buf = [0u8; TRANSMIT_BUF];
        let mut n = 0;
        while let Some(t) = self.node.poll_transmit(self.now, &mut buf) {
            n += 1;
            assert!(n <= 4096, "{what}: the node keeps sending");
            assert!(t.len <= buf.len(), "{what}: a length beyond the buffer");
            self.check_src(what, t.src, t.dst);
            let mut d = buf[..t.len].to_vec();
            match classify(&d) {
                Ok(Datagram::Data(_)) => {}
                Ok(Datagram::Signaling(_)) => {
                    check_form(what, &d);
                    self.on_node_signaling(what, t.src, t.dst, &mut d);
                }
                Err(e) => panic!("{what}: the node sent a datagram that does not parse: {e}"),
            }
        }
        let tunnels = self.node.tunnels().len();
        assert!(tunnels <= MAX_TUNNELS, "{what}: {tunnels} tunnels");
    }

    fn on_node_signaling(
        &mut self,
        what: &str,
        src: Option<SocketAddr>,
        dst: SocketAddr,
        d: &mut [u8],
    ) {
        let h = *SignalingPacket::parse(d).expect("checked").header();
        if dst == as_addr() {
            if self.setup {
                self.play_as(what, src, d);
            }
            return;
        }
        let key_id = h.envelope.key_id;
        if key_id == self.session_key_id && self.dc.is_some() {
            assert_eq!(dst, dc_addr(), "{what}: K_nd to {dst}");
            let dc = self.dc.as_mut().expect("checked");
            let (h, msg) = dc
                .open(d)
                .unwrap_or_else(|e| panic!("{what}: the DC cannot open the node's datagram: {e}"));
            match msg {
                Message::RegistrationRequest(_) => {
                    self.last_registration = Some(h.envelope.txid);
                    if self.setup {
                        let answer = registration_response(src.unwrap_or(self.local(0)));
                        let dc = self.dc.as_mut().expect("checked");
                        let datagram = dc
                            .seal_to_vec(&answer, h.envelope.txid, None)
                            .expect("seal");
                        let local = src.unwrap_or(self.local(0));
                        self.deliver(what, datagram, dc_addr(), local);
                    }
                }
                Message::DirectionRequest(_) => {
                    self.last_direction_request = Some(h.envelope.txid);
                }
                Message::Keepalive(_) | Message::Ack(_) | Message::Error(_) => {}
                other => panic!("{what}: the node sent its DC {other:?}"),
            }
            return;
        }
        // Tunnel signaling: learn the node's ephemeral and its binds.
        for x in self.directions.iter_mut().filter(|x| x.path_id == key_id) {
            let mut c = d.to_vec();
            if h.msg_type == MessageType::RelayBind {
                let Some(rel) = x.rel.as_mut() else {
                    continue;
                };
                if let Ok((h2, _)) = SignalingKey::new(
                    &x.rd.relay_key.clone().expect("with rel"),
                    x.path_id,
                    Role::Relay,
                )
                .open(&mut c)
                {
                    let _ = rel;
                    x.bind_txid = Some(h2.envelope.txid);
                    break;
                }
                continue;
            }
            let mut tun = SignalingKey::new(&x.rd.tunnel_credential, x.path_id, x.tun.role());
            if let Ok((h2, msg)) = tun.open(&mut c) {
                match msg {
                    Message::TunnelRequest(r) if x.rd.role == TunnelRole::Initiator => {
                        x.node_ephemeral = Some(r.ephemeral);
                        x.handshake_txid = Some(h2.envelope.txid);
                    }
                    Message::TunnelResponse(r) if x.rd.role == TunnelRole::Responder => {
                        x.node_ephemeral = Some(r.ephemeral);
                    }
                    _ => {}
                }
                assert_eq!(h2.envelope.role, x.node_role(), "{what}: the node's role");
                x.derive();
                break;
            }
        }
    }

    /// Setup: the AS answers, and the harness as the DC acknowledges the AS's key.
    fn play_as(&mut self, what: &str, src: Option<SocketAddr>, d: &[u8]) {
        let from = src.unwrap_or(self.local(0));
        let mut buf = d.to_vec();
        self.server
            .handle_datagram(self.now, as_addr(), from, &mut buf, &mut self.rng);
        let mut out = [0u8; TRANSMIT_BUF];
        let mut to_node = Vec::new();
        loop {
            while self.server.poll_event().is_some() {}
            let Some(t) = self.server.poll_transmit(self.now, &mut out) else {
                break;
            };
            let mut d = out[..t.len].to_vec();
            if t.dst == dc_addr() {
                let (h, msg) = self.as_dc.open(&mut d).expect("the AS's KEY_DISTRIBUTION");
                let Message::KeyDistribution(kd) = msg else {
                    panic!("{what}: {msg:?} to the DC");
                };
                assert_eq!(kd.key_role, KeyRole::NodeDc);
                self.session_key_id = kd.new_key_id;
                self.dc = Some(SignalingKey::new(&kd.key, kd.new_key_id, Role::B));
                let ack: Message = Ack {
                    acked_type: MessageType::KeyDistribution.to_u8(),
                    extensions: Extensions::none(),
                }
                .into();
                let mut a = self
                    .as_dc
                    .seal_to_vec(&ack, h.envelope.txid, None)
                    .expect("seal");
                self.server
                    .handle_datagram(self.now, as_addr(), dc_addr(), &mut a, &mut self.rng);
            } else {
                to_node.push(d);
            }
        }
        for d in to_node {
            self.deliver(what, d, as_addr(), from);
        }
    }

    /// Fires every deadline up to `target`, each at its time; a deadline that stays due after
    /// its firing must give way to a later one within a few firings at the same instant.
    fn run_timers(&mut self, what: &str, target: Time) {
        let mut same = 0;
        let mut last = None;
        for _ in 0..MAX_TIMER_STEPS {
            let Some((t, label)) = self.node.poll_timeout() else {
                self.now = target;
                return;
            };
            if t > target {
                self.now = target;
                return;
            }
            let at = t.max(self.now);
            if last == Some(at) {
                same += 1;
                assert!(
                    same < MAX_SAME_INSTANT,
                    "{what}: handle_timeout({at}) fired {same} times and {label} is still due"
                );
            } else {
                same = 0;
            }
            last = Some(at);
            self.now = at;
            self.node.handle_timeout(at, &mut self.rng);
            self.drain(&format!("{what}, timer {label} at {at}"));
        }
        panic!("{what}: more than {MAX_TIMER_STEPS} timer firings before {target}");
    }
}

fn registration_response(observed: SocketAddr) -> Message {
    let (v4, v6) = own_vaddrs();
    RegistrationResponse {
        virtual_v4: v4,
        virtual_v6: v6,
        observed_addr: TransportAddr::new(observed),
        lifetime_s: 3600,
        keepalive_interval_s: 25,
        extensions: Extensions::none(),
    }
    .into()
}

/// An IPv4/UDP or IPv6/UDP packet of about `len` bytes (at least its headers).
fn ip_packet(src: IpAddr, dst: IpAddr, len: usize) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = len.clamp(28, VIRTUAL_MTU);
            let mut p = vec![0u8; total];
            p[0] = 0x45;
            p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            p[8] = 64;
            p[9] = 17;
            p[12..16].copy_from_slice(&s.octets());
            p[16..20].copy_from_slice(&d.octets());
            p
        }
        (s, d) => {
            let to6 = |a: IpAddr| match a {
                IpAddr::V6(x) => x,
                IpAddr::V4(x) => x.to_ipv6_mapped(),
            };
            let total = len.clamp(48, VIRTUAL_MTU);
            let mut p = vec![0u8; total];
            p[0] = 0x60;
            p[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
            p[6] = 17;
            p[7] = 64;
            p[8..24].copy_from_slice(&to6(s).octets());
            p[24..40].copy_from_slice(&to6(d).octets());
            p
        }
    }
}

fn inner_addrs(p: &[u8]) -> Option<(IpAddr, IpAddr)> {
    match p.first()? >> 4 {
        4 => {
            let s: [u8; 4] = p.get(12..16)?.try_into().ok()?;
            let d: [u8; 4] = p.get(16..20)?.try_into().ok()?;
            Some((IpAddr::from(s), IpAddr::from(d)))
        }
        6 => {
            let s: [u8; 16] = p.get(8..24)?.try_into().ok()?;
            let d: [u8; 16] = p.get(24..40)?.try_into().ok()?;
            Some((IpAddr::from(s), IpAddr::from(d)))
        }
        _ => None,
    }
}
