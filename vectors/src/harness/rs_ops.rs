//! The relay server under a sequence of operations: see [`rs_ops`].

use core::time::Duration;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use arbitrary::Unstructured;
use ntm_state::rs::{
    BoundSide, DcKey, RelayDecision, RelayDrop, RelayServer, RsConfig, RsEvent, RsLimits, Side,
};
use ntm_state::signaling::{unsealed_error, SignalingKey};
use ntm_state::time::Time;
use ntm_wire::{
    classify, seal_data, AeadKey, Datagram, ErrorCode, Extensions, Message, MessageType, RelayBind,
    RelayRequest, ReplayWindow, Role, SecretKey, DATA_HEADER_LEN, DATA_OVERHEAD, MAX_SIGNALING_LEN,
};
use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;

use super::ops::{Endpoint, Lifetime, PathChoice, RsOp, Source};
use super::state::{
    check_form, decode, describe, fresh_key, known_sources, resolve, step, v4, v6, MAX_HISTORY,
    MAX_TIMER_STEPS, TRANSMIT_BUF,
};
use super::MAX_RAW_LEN;

/// The Path IDs `PathChoice::Known` picks from; 0 is never valid.
const PATH_IDS: [u32; 6] = [
    0x5a5a_0001,
    0x5a5a_0002,
    0x5a5a_0003,
    0x5a5a_0004,
    0x5a5a_0005,
    0,
];
/// The DC↔RS key IDs the RS is configured with; the harness holds both keys.
const DC_KEY_IDS: [u32; 2] = [7, 8];
/// A key ID the RS does not have.
const UNKNOWN_DC_KEY_ID: u32 = 99;
/// The signaling types `RsOp::Signal` picks from: the forwarded ones, then some that are not.
const SIGNAL_TYPES: [MessageType; 11] = [
    MessageType::TunnelRequest,
    MessageType::TunnelResponse,
    MessageType::PathUpdate,
    MessageType::TunnelClose,
    MessageType::Keepalive,
    MessageType::KeepaliveReply,
    MessageType::Ack,
    MessageType::Error,
    MessageType::RegistrationRequest,
    MessageType::RelayResponse,
    MessageType::RouteDirection,
];

fn rs_addrs() -> [SocketAddr; 2] {
    [v4([203, 0, 113, 9], 4282), v6("2001:db8:9::9", 4282)]
}

fn dc_addr() -> SocketAddr {
    v4([203, 0, 113, 2], 4281)
}

fn dc_secret(i: usize) -> SecretKey {
    SecretKey::from_bytes([0x70 + i as u8; 32])
}

/// The K_tun of a path's ends: the RS never holds it.
fn tun_secret(path_id: u32) -> SecretKey {
    SecretKey::from_bytes([path_id as u8 ^ 0x3c; 32])
}

/// The RS every input starts with: dual-stack, two DC keys, three paths at most, a low default
/// rate (rate limiting is reached), the shortest idle expiry, small queues.
fn rs_config() -> RsConfig {
    let keys = DC_KEY_IDS
        .iter()
        .enumerate()
        .map(|(i, id)| DcKey {
            key: dc_secret(i),
            key_id: *id,
            high_water_mark: 0,
        })
        .collect();
    let mut c = RsConfig::new(rs_addrs().to_vec(), keys);
    c.default_rate_limit_kbps = 64;
    c.idle_expiry = Duration::from_secs(60);
    c.limits = RsLimits {
        max_paths: 3,
        max_expired_paths: 2,
        peer_not_bound_per_second: 2,
        unsealed_errors_per_second: 3,
        max_tracked_prefixes: 3,
        max_queued_transmits: 8,
        max_queued_events: 6,
        sequence_block: 3,
        ..RsLimits::default()
    };
    c
}

/// One authorization of a Path ID, as the ends (and the DC) hold it.
struct Grant {
    /// Counts authorizations across all paths: tells a path's lives apart.
    generation: u64,
    krel: SecretKey,
    /// The ends' K_rel, as sides A and B seal with it.
    seal: [SignalingKey; 2],
    /// The sequence number of the last RELAY_BIND the RS accepted, per side.
    bound_seq: [Option<u64>; 2],
    /// The highest sequence number of a RELAY_BIND that authenticated, per side (the RS's
    /// replay window refuses what lies a window below it).
    seen_high: [Option<u64>; 2],
}

/// The last RELAY_REQUEST the harness sealed for a Path ID (for retransmissions).
#[derive(Clone)]
struct Asked {
    dc: u8,
    txid: u32,
    krel: SecretKey,
    lifetime_s: u32,
    rate: u32,
}

#[derive(Clone, Debug)]
enum Origin {
    /// Raw, changed, or sealed under a key the RS cannot have: authenticates nothing.
    Forged,
    /// A RELAY_REQUEST under a configured DC key; it authorizes `krel` when it creates a path.
    Request { path_id: u32, krel: SecretKey },
    /// A RELAY_BIND under `krel`; `delivered_in` the generation it was last delivered in.
    Bind {
        path_id: u32,
        side: usize,
        seq: u64,
        krel: SecretKey,
        delivered_in: Option<u64>,
    },
    /// DATA or end-to-end signaling: the RS does not authenticate it.
    EndToEnd,
}

#[derive(Clone)]
struct Sent {
    datagram: Vec<u8>,
    source: SocketAddr,
    path_id: Option<u32>,
    origin: Origin,
    delivered: bool,
}

/// The bindings the RS shows: what nothing unauthenticated may change.
type Bindings = BTreeMap<u32, (Option<BoundSide>, Option<BoundSide>)>;

/// What to expect of a datagram's delivery.
#[derive(Debug)]
enum Expect {
    /// It cannot authenticate (or is a replay): no binding made or moved, no path created.
    /// Unless `late` (a genuine datagram whose path has ended, which may be answered ERROR
    /// Expired), no answer larger than it.
    Nothing { late: bool },
    /// A genuine RELAY_REQUEST, first delivery.
    Request { path_id: u32, krel: SecretKey },
    /// A genuine RELAY_BIND of `side` with `seq`, first delivered in the path's live
    /// authorization: the side ends up bound here, unless the bind is stale or conflicts.
    Bind { path_id: u32, side: usize, seq: u64 },
}

struct RsBench {
    rs: RelayServer,
    rng: ChaCha8Rng,
    mine: ChaCha8Rng,
    now: Time,
    known: [SocketAddr; 8],
    /// The harness as each DC: role A under the DC↔RS key.
    dc_keys: [SignalingKey; 2],
    /// The live authorization of each path the RS holds (by its PathAuthorized event).
    grants: BTreeMap<u32, Grant>,
    generations: u64,
    asked: BTreeMap<u32, Asked>,
    /// Every Path ID the RS ever reported authorized: the only ones it may relay.
    authorized: BTreeSet<u32>,
    /// The highest sequence number reserved under each DC key.
    reserved: [u64; 2],
    history: Vec<Sent>,
}

/// Runs up to `MAX_OPS` operations against one [`RelayServer`] that starts with two paths its
/// DC authorized, one bound on both sides (A over IPv4, B over IPv6), one on side B only. Checks
/// after each: a `Forward` goes to the other side of the sender's path, where it is bound, from
/// the RS address it bound to, and only when the sender is bound, its role (for signaling) is
/// its side's and the other side is bound (else only a rate-limit drop excuses it); nothing goes
/// out for a Path ID no DC authorized; every answer parses, fits 1232 bytes, goes back where
/// the input came from, from where it arrived, and is no larger than an input that cannot
/// authenticate; sealed answers open under the key the harness holds; a genuine RELAY_BIND
/// binds exactly as the spec says (stale and conflicting ones change nothing); forged, changed
/// and replayed datagrams create no path and make or move no binding; timers send nothing and
/// make progress; path_count stays within `max_paths`.
pub fn rs_ops(data: &[u8]) {
    let (seed, ops) = decode::<RsOp>(data);
    let mut b = RsBench::new(seed);
    for (i, op) in ops.into_iter().enumerate() {
        let what = describe(i, &op, |op| match op {
            RsOp::Raw { from, data, .. } => Some((
                match from {
                    Endpoint::Source(s) => *s,
                    _ => Source::Known(0),
                },
                data.len(),
            )),
            _ => None,
        });
        b.apply(&what, op);
    }
}

impl RsBench {
    fn new(seed: u64) -> Self {
        let mut b = RsBench {
            rs: RelayServer::new(rs_config()).expect("RS configuration"),
            rng: ChaCha8Rng::seed_from_u64(seed),
            mine: ChaCha8Rng::seed_from_u64(seed ^ 0x6861_726e_6573_7321),
            now: Time::from_secs(1),
            known: known_sources(dc_addr(), rs_addrs()[0]),
            dc_keys: [0, 1].map(|i| SignalingKey::new(&dc_secret(i), DC_KEY_IDS[i], Role::A)),
            grants: BTreeMap::new(),
            generations: 0,
            asked: BTreeMap::new(),
            authorized: BTreeSet::new(),
            reserved: [0; 2],
            history: Vec::new(),
        };
        // The established state: P1 bound on both sides, P2 on side B only.
        let what = "setup";
        for (dc, path) in [(0u8, 0u8), (1, 1)] {
            b.request(
                what,
                dc,
                PathChoice::Known(path),
                Lifetime::Day,
                0,
                false,
                u32::from(path) + 1,
                None,
                0,
            );
        }
        let bind = |b: &mut RsBench, path: u8, side_b: bool, from: Endpoint, local: u8| {
            b.bind(
                what,
                PathChoice::Known(path),
                side_b,
                from,
                local,
                None,
                false,
                7,
            )
        };
        bind(&mut b, 0, false, Endpoint::Home(false), 0);
        bind(&mut b, 0, true, Endpoint::Home(true), 1);
        bind(&mut b, 1, true, Endpoint::Source(Source::Known(2)), 0);
        let p1 = b.rs.path(PATH_IDS[0]).expect("P1 authorized");
        assert!(
            p1.side_a.is_some() && p1.side_b.is_some(),
            "setup: P1 not bound"
        );
        assert!(
            b.rs.path(PATH_IDS[1]).is_some_and(|p| p.side_b.is_some()),
            "setup: P2 not bound"
        );
        b
    }

    fn path_id(c: PathChoice) -> u32 {
        match c {
            PathChoice::Known(i) => PATH_IDS[usize::from(i) % PATH_IDS.len()],
            PathChoice::Any(id) => id,
        }
    }

    fn home(&self, side_b: bool) -> SocketAddr {
        if side_b {
            self.known[3]
        } else {
            self.known[0]
        }
    }

    fn endpoint(&self, e: Endpoint, path_id: Option<u32>) -> SocketAddr {
        match e {
            Endpoint::Bound(side_b) => {
                let bound = path_id.and_then(|id| self.rs.path(id)).and_then(|p| {
                    if side_b {
                        p.side_b
                    } else {
                        p.side_a
                    }
                });
                bound.map_or(self.home(side_b), |s| s.addr)
            }
            Endpoint::Home(side_b) => self.home(side_b),
            Endpoint::Source(s) => resolve(s, &self.known),
        }
    }

    fn local(i: u8) -> SocketAddr {
        rs_addrs()[usize::from(i) % 2]
    }

    fn apply(&mut self, what: &str, op: RsOp) {
        match op {
            RsOp::Raw {
                from,
                local,
                mut data,
            } => {
                data.truncate(MAX_RAW_LEN);
                let remote = self.endpoint(from, None);
                self.deliver_copy(what, data, remote, None, local, false);
            }
            RsOp::Request {
                dc,
                path,
                lifetime,
                rate_kbps,
                again,
                txid,
                source,
                local,
            } => self.request(
                what, dc, path, lifetime, rate_kbps, again, txid, source, local,
            ),
            RsOp::Bind {
                path,
                b,
                from,
                local,
                skip,
                hold,
                txid,
            } => self.bind(what, path, b, from, local, skip, hold, txid),
            RsOp::Data {
                path,
                from,
                local,
                len,
                counter,
                outbox,
            } => {
                let path_id = Self::path_id(path);
                let inner = usize::from(len) % 1400;
                let mut d = vec![0u8; inner + DATA_OVERHEAD];
                for (i, x) in d.iter_mut().enumerate().skip(DATA_HEADER_LEN) {
                    *x = i as u8;
                }
                let key = AeadKey::new(&tun_secret(path_id));
                let n = seal_data(&key, path_id, u64::from(counter), false, &mut d, inner)
                    .expect("sized");
                d.truncate(n);
                let remote = self.endpoint(from, Some(path_id));
                let sent = Sent {
                    datagram: d,
                    source: remote,
                    path_id: Some(path_id),
                    origin: Origin::EndToEnd,
                    delivered: true,
                };
                self.deliver(what, sent, local, Expect::Nothing { late: false }, outbox);
            }
            RsOp::Signal {
                path,
                from,
                local,
                msg_type,
                role,
                body,
                outbox,
            } => {
                let path_id = Self::path_id(path);
                let role = [Role::A, Role::B, Role::Relay][usize::from(role) % 3];
                let i = usize::from(msg_type) % (SIGNAL_TYPES.len() + 1);
                let datagram = match SIGNAL_TYPES.get(i) {
                    Some(t) => {
                        let Ok(msg) = Message::arbitrary_of_type(*t, &mut Unstructured::new(&body))
                        else {
                            return;
                        };
                        let mut k = SignalingKey::new(&tun_secret(path_id), path_id, role);
                        match k.seal_to_vec(&msg, u32::from(msg_type), None) {
                            Ok(d) => d,
                            Err(_) => return,
                        }
                    }
                    None => unsealed_error(
                        role,
                        path_id,
                        7,
                        MessageType::TunnelRequest.to_u8(),
                        ErrorCode::PeerNotBound,
                    )
                    .expect("an unsealed ERROR"),
                };
                let remote = self.endpoint(from, Some(path_id));
                let sent = Sent {
                    datagram,
                    source: remote,
                    path_id: Some(path_id),
                    origin: Origin::EndToEnd,
                    delivered: true,
                };
                self.deliver(what, sent, local, Expect::Nothing { late: false }, outbox);
            }
            RsOp::Replay { index, from, local } => {
                let n = self.history.len();
                if n == 0 {
                    return;
                }
                let sent = self.history[usize::from(index) % n].clone();
                let remote = from.map_or(sent.source, |e| self.endpoint(e, sent.path_id));
                self.deliver_copy(what, sent.datagram, remote, sent.path_id, local, false);
            }
            RsOp::Mutate { index, pos, xor } => {
                let n = self.history.len();
                if n == 0 {
                    return;
                }
                let mut sent = self.history[usize::from(index) % n].clone();
                if sent.datagram.is_empty() {
                    return;
                }
                let at = usize::from(pos) % sent.datagram.len();
                sent.datagram[at] ^= xor.max(1);
                self.deliver_copy(what, sent.datagram, sent.source, sent.path_id, 0, false);
            }
            RsOp::Advance(s) => {
                let target = self.now + step(s);
                self.run_timers(what, target);
            }
        }
    }

    /// Delivers bytes that are no new seal: an exact copy of a datagram the harness sealed is
    /// that datagram again (delivered for the first time if it was held, else a replay, except
    /// a RELAY_BIND whose path has been authorized anew with the same K_rel since); anything
    /// else cannot authenticate.
    fn deliver_copy(
        &mut self,
        what: &str,
        datagram: Vec<u8>,
        source: SocketAddr,
        path_id: Option<u32>,
        local: u8,
        outbox: bool,
    ) {
        let genuine = self
            .history
            .iter()
            .position(|h| !matches!(h.origin, Origin::Forged) && h.datagram == datagram);
        let Some(j) = genuine else {
            let sent = Sent {
                datagram,
                source,
                path_id,
                origin: Origin::Forged,
                delivered: true,
            };
            return self.deliver(what, sent, local, Expect::Nothing { late: false }, outbox);
        };
        let mut sent = self.history[j].clone();
        let first = !sent.delivered;
        self.history[j].delivered = true;
        sent.delivered = true;
        sent.source = source;
        let expect = match &sent.origin {
            Origin::Request { path_id, krel } if first => Expect::Request {
                path_id: *path_id,
                krel: krel.clone(),
            },
            Origin::Bind {
                path_id,
                side,
                seq,
                krel,
                delivered_in,
            } => match self.grants.get(path_id) {
                Some(g)
                    if g.krel.expose() == krel.expose() && *delivered_in != Some(g.generation) =>
                {
                    Expect::Bind {
                        path_id: *path_id,
                        side: *side,
                        seq: *seq,
                    }
                }
                // Genuine, but its path has ended (an ended path may answer ERROR Expired to a
                // bind its replay window has not seen, such as one of an earlier life of the
                // Path ID under the same K_rel) or lives under another K_rel.
                _ => Expect::Nothing { late: true },
            },
            _ => Expect::Nothing { late: false },
        };
        self.deliver(what, sent, local, expect, outbox);
    }

    #[allow(clippy::too_many_arguments)]
    fn request(
        &mut self,
        what: &str,
        dc: u8,
        path: PathChoice,
        lifetime: Lifetime,
        rate_kbps: u16,
        again: bool,
        txid: u32,
        source: Option<Source>,
        local: u8,
    ) {
        let path_id = Self::path_id(path);
        let asked = match self.asked.get(&path_id) {
            Some(a) if again => a.clone(),
            _ => Asked {
                dc,
                txid,
                krel: SecretKey::from_bytes(fresh_key(&mut self.mine)),
                lifetime_s: match lifetime {
                    Lifetime::Day => 86_400,
                    Lifetime::Secs(s) => u32::from(s),
                },
                rate: u32::from(rate_kbps),
            },
        };
        self.asked.insert(path_id, asked.clone());
        let msg: Message = RelayRequest {
            path_id,
            relay_key: asked.krel.clone(),
            lifetime_s: asked.lifetime_s,
            rate_limit_kbps: asked.rate,
            extensions: Extensions::none(),
        }
        .into();
        let (datagram, origin, expect) = match self.dc_keys.get_mut(usize::from(asked.dc)) {
            Some(k) => (
                k.seal_to_vec(&msg, asked.txid, None).expect("seal"),
                Origin::Request {
                    path_id,
                    krel: asked.krel.clone(),
                },
                Expect::Request {
                    path_id,
                    krel: asked.krel.clone(),
                },
            ),
            None => {
                let mut k =
                    SignalingKey::new(&asked.krel, UNKNOWN_DC_KEY_ID + u32::from(dc), Role::A);
                let d = k.seal_to_vec(&msg, asked.txid, None).expect("seal");
                (d, Origin::Forged, Expect::Nothing { late: false })
            }
        };
        let sent = Sent {
            datagram,
            source: source.map_or(dc_addr(), |s| resolve(s, &self.known)),
            path_id: Some(path_id),
            origin,
            delivered: true,
        };
        self.deliver(what, sent, local, expect, false);
    }

    #[allow(clippy::too_many_arguments)]
    fn bind(
        &mut self,
        what: &str,
        path: PathChoice,
        side_b: bool,
        from: Endpoint,
        local: u8,
        skip: Option<u8>,
        hold: bool,
        txid: u32,
    ) {
        let path_id = Self::path_id(path);
        let side = usize::from(side_b);
        let remote = self.endpoint(from, Some(path_id));
        let msg: Message = RelayBind {
            extensions: Extensions::none(),
        }
        .into();
        let (datagram, origin) = match self.grants.get_mut(&path_id) {
            Some(g) => {
                let k = &mut g.seal[side];
                if let Some(n) = skip.filter(|n| *n > 0) {
                    let next = k.next_seq() + u64::from(n);
                    *k = SignalingKey::resume(&g.krel, path_id, k.role(), next, 1);
                }
                let seq = k.next_seq();
                let d = k.seal_to_vec(&msg, txid, None).expect("seal");
                let origin = Origin::Bind {
                    path_id,
                    side,
                    seq,
                    krel: g.krel.clone(),
                    delivered_in: None,
                };
                (d, origin)
            }
            None => {
                // No live authorization: a K_rel the RS never got.
                let role = if side_b { Role::B } else { Role::A };
                let krel = SecretKey::from_bytes(fresh_key(&mut self.mine));
                let mut k = SignalingKey::new(&krel, path_id, role);
                (
                    k.seal_to_vec(&msg, txid, None).expect("seal"),
                    Origin::Forged,
                )
            }
        };
        let genuine = matches!(origin, Origin::Bind { .. });
        let expect = match &origin {
            Origin::Bind { seq, .. } => Expect::Bind {
                path_id,
                side,
                seq: *seq,
            },
            _ => Expect::Nothing { late: false },
        };
        let sent = Sent {
            datagram,
            source: remote,
            path_id: Some(path_id),
            origin,
            delivered: !hold,
        };
        if hold && genuine {
            if self.history.len() < MAX_HISTORY {
                self.history.push(sent);
            }
            return;
        }
        self.deliver(what, sent, local, expect, false);
    }

    fn bindings(&self) -> Bindings {
        self.rs
            .paths()
            .map(|p| (p.path_id, (p.side_a, p.side_b)))
            .collect()
    }

    /// What the spec says of a datagram from `remote` on the data path: `Some((src, dst))`
    /// when it is to be forwarded (a rate limit may still drop it), `None` when it must not.
    fn forward_expected(
        &self,
        d: &[u8],
        remote: SocketAddr,
    ) -> Option<(u32, SocketAddr, SocketAddr)> {
        let (path_id, role) = match classify(d) {
            Ok(Datagram::Data(p)) => (p.path_id(), None),
            Ok(Datagram::Signaling(p)) => {
                let h = p.header();
                let forwarded = matches!(
                    h.msg_type,
                    MessageType::TunnelRequest
                        | MessageType::TunnelResponse
                        | MessageType::PathUpdate
                        | MessageType::TunnelClose
                        | MessageType::Keepalive
                        | MessageType::KeepaliveReply
                        | MessageType::Ack
                        | MessageType::Error
                );
                if !forwarded {
                    return None;
                }
                (h.envelope.key_id, Some(h.envelope.role))
            }
            Err(_) => return None,
        };
        let p = self.rs.path(path_id)?;
        let from = if p.side_a.is_some_and(|s| s.addr == remote) {
            Side::A
        } else if p.side_b.is_some_and(|s| s.addr == remote) {
            Side::B
        } else {
            return None;
        };
        if let Some(role) = role {
            let expected = match from {
                Side::A => Role::A,
                Side::B => Role::B,
            };
            if role != expected {
                return None;
            }
        }
        let to = match from {
            Side::A => p.side_b,
            Side::B => p.side_a,
        }?;
        Some((path_id, to.local, to.addr))
    }

    /// Hands a datagram to the RS at `now` (through `relay`, or `handle_datagram` when
    /// `outbox`), checks the decision and what comes out against `expect`, fires due timers.
    fn deliver(&mut self, what: &str, mut sent: Sent, local: u8, expect: Expect, outbox: bool) {
        let local = Self::local(local);
        let remote = sent.source;
        let before = self.bindings();
        let forward = self.forward_expected(&sent.datagram, remote);
        let decision = if outbox {
            let mut buf = sent.datagram.clone();
            self.rs
                .handle_datagram(self.now, local, remote, &mut buf, &mut self.rng);
            assert_eq!(
                buf, sent.datagram,
                "{what}: handle_datagram changed the bytes"
            );
            None
        } else {
            Some(
                self.rs
                    .relay(self.now, local, remote, &sent.datagram, &mut self.rng),
            )
        };
        // The decision against the relay table as it was.
        match (decision, forward) {
            (Some(RelayDecision::Forward { src, dst }), Some((path_id, l, a))) => {
                assert_eq!(
                    (src, dst),
                    (l, a),
                    "{what}: path {path_id:#x} forwarded elsewhere than its other side"
                );
                assert!(
                    self.authorized.contains(&path_id),
                    "{what}: forwarded on a path no DC authorized"
                );
            }
            (Some(RelayDecision::Forward { src, dst }), None) => panic!(
                "{what}: forwarded to {dst} from {src} a datagram from {remote} that no bound \
                 path carries (bindings {before:?})"
            ),
            (Some(d), Some((path_id, ..))) => assert!(
                matches!(d, RelayDecision::Drop(RelayDrop::RateLimited)),
                "{what}: path {path_id:#x} has both sides bound and the sender's role, yet {d:?}"
            ),
            _ => {}
        }
        // Bookkeeping of genuine datagrams before their answers are opened.
        if let Origin::Bind { delivered_in, .. } = &mut sent.origin {
            if let Some(g) = sent.path_id.and_then(|id| self.grants.get(&id)) {
                *delivered_in = Some(g.generation);
            }
        }
        let room = self.history.len() < MAX_HISTORY;
        match self
            .history
            .iter_mut()
            .find(|h| h.datagram == sent.datagram)
        {
            Some(h) => {
                if let (
                    Origin::Bind {
                        delivered_in: a, ..
                    },
                    Origin::Bind {
                        delivered_in: b, ..
                    },
                ) = (&mut h.origin, &sent.origin)
                {
                    *a = *b;
                }
            }
            None if room => self.history.push(sent.clone()),
            None => {}
        }
        let ctx = Ctx {
            what,
            local,
            remote,
            input: &sent.datagram,
            outbox,
            forward,
        };
        let (events, answers) = self.drain(&ctx, &expect);
        let after = self.bindings();
        match expect {
            Expect::Nothing { late } => {
                for (id, sides) in &after {
                    assert_eq!(
                        before.get(id),
                        Some(sides),
                        "{what}: an input that cannot authenticate (or a replay) made or moved \
                         a binding of path {id:#x}"
                    );
                }
                assert!(
                    !events.iter().any(|e| matches!(
                        e,
                        RsEvent::PathAuthorized { .. } | RsEvent::SideBound { .. }
                    )),
                    "{what}: an input that cannot authenticate raised {events:?}"
                );
                for a in answers.iter().filter(|_| !late) {
                    assert!(
                        a.len() <= sent.datagram.len(),
                        "{what}: a {}-byte answer to a {}-byte datagram that cannot authenticate",
                        a.len(),
                        sent.datagram.len()
                    );
                }
            }
            Expect::Request { path_id, krel } => {
                assert_eq!(
                    answers.len(),
                    1,
                    "{what}: a RELAY_REQUEST got {} answers",
                    answers.len()
                );
                let created = events.iter().any(
                    |e| matches!(e, RsEvent::PathAuthorized { path_id: p, .. } if *p == path_id),
                );
                if created {
                    self.generations += 1;
                    let mk = |role| SignalingKey::new(&krel, path_id, role);
                    self.grants.insert(
                        path_id,
                        Grant {
                            generation: self.generations,
                            krel: krel.clone(),
                            seal: [mk(Role::A), mk(Role::B)],
                            bound_seq: [None, None],
                            seen_high: [None, None],
                        },
                    );
                    let p = self
                        .rs
                        .path(path_id)
                        .unwrap_or_else(|| panic!("{what}: authorized, yet not in the table"));
                    assert!(
                        p.side_a.is_none() && p.side_b.is_none(),
                        "{what}: a new path with a side bound"
                    );
                }
                for (id, sides) in &after {
                    if *id != path_id || !created {
                        assert_eq!(
                            before.get(id),
                            Some(sides),
                            "{what}: a RELAY_REQUEST moved a binding of path {id:#x}"
                        );
                    }
                }
            }
            Expect::Bind { path_id, side, seq } => {
                let was = before.get(&path_id).copied();
                let now = after.get(&path_id).copied();
                let g = self.grants.get_mut(&path_id);
                match (was, g) {
                    (Some((a, b)), Some(g)) => {
                        let (mine, other) = if side == 0 { (a, b) } else { (b, a) };
                        let too_old = g.seen_high[side]
                            .is_some_and(|h| seq <= h && h + 1 - seq > ReplayWindow::SIZE);
                        if !too_old {
                            g.seen_high[side] = Some(g.seen_high[side].map_or(seq, |h| h.max(seq)));
                        }
                        let stale = too_old || g.bound_seq[side].is_some_and(|s| seq <= s);
                        let conflict = other.is_some_and(|o| o.addr == remote);
                        let expected = if stale || conflict {
                            (a, b)
                        } else {
                            let at = Some(BoundSide {
                                addr: remote,
                                local,
                            });
                            g.bound_seq[side] = Some(seq);
                            if side == 0 {
                                (at, b)
                            } else {
                                (a, at)
                            }
                        };
                        assert_eq!(
                            now,
                            Some(expected),
                            "{what}: a RELAY_BIND of side {side} seq {seq} (stale {stale}, \
                             conflict {conflict}, bound {mine:?})"
                        );
                        assert_eq!(
                            answers.len(),
                            usize::from(!stale && !conflict),
                            "{what}: a RELAY_BIND answered {} times",
                            answers.len()
                        );
                    }
                    _ => assert_eq!(now, None, "{what}: a RELAY_BIND made a path"),
                }
                for (id, sides) in &after {
                    if *id != path_id {
                        assert_eq!(before.get(id), Some(sides), "{what}: moved path {id:#x}");
                    }
                }
            }
        }
        self.check_state(what);
        let now = self.now;
        self.run_timers(what, now);
    }

    /// Drains events, then transmits, checking each; returns the events and the RS's own
    /// answers.
    fn drain(&mut self, ctx: &Ctx, expect: &Expect) -> (Vec<RsEvent>, Vec<Vec<u8>>) {
        let what = ctx.what;
        let limits = self.rs.config().limits;
        let mut events = Vec::new();
        while let Some(e) = self.rs.poll_event() {
            match &e {
                RsEvent::PathAuthorized {
                    path_id, dc_key_id, ..
                } => {
                    assert!(
                        matches!(expect, Expect::Request { path_id: p, .. } if p == path_id),
                        "{what}: {e:?} without its RELAY_REQUEST"
                    );
                    assert!(DC_KEY_IDS.contains(dc_key_id), "{what}: {e:?}");
                    self.authorized.insert(*path_id);
                }
                RsEvent::SideBound {
                    path_id,
                    side,
                    addr,
                    local,
                    ..
                } => {
                    let s = match side {
                        Side::A => 0,
                        Side::B => 1,
                    };
                    assert!(
                        matches!(expect, Expect::Bind { path_id: p, side: x, .. } if p == path_id && *x == s),
                        "{what}: {e:?} without its RELAY_BIND"
                    );
                    assert_eq!((*addr, *local), (ctx.remote, ctx.local), "{what}: {e:?}");
                }
                RsEvent::PathEnded { path_id, .. } => {
                    assert!(
                        self.rs.path(*path_id).is_none(),
                        "{what}: {e:?}, still live"
                    );
                    self.grants.remove(path_id);
                }
                RsEvent::SequenceReserved { key_id, through } => {
                    let i = DC_KEY_IDS
                        .iter()
                        .position(|k| k == key_id)
                        .unwrap_or_else(|| panic!("{what}: {e:?}"));
                    assert!(*through > self.reserved[i], "{what}: {e:?}");
                    self.reserved[i] = *through;
                }
                other => panic!("{what}: an event the RS does not raise: {other:?}"),
            }
            events.push(e);
            assert!(
                events.len() <= limits.max_queued_events,
                "{what}: too many events"
            );
        }
        let mut buf = [0u8; TRANSMIT_BUF];
        let mut answers = Vec::new();
        let mut n = 0;
        let mut forwarded = 0;
        while let Some(t) = self.rs.poll_transmit(self.now, &mut buf) {
            n += 1;
            assert!(
                n <= limits.max_queued_transmits,
                "{what}: too many datagrams"
            );
            assert!(t.len <= buf.len(), "{what}: a length beyond the buffer");
            let mut d = buf[..t.len].to_vec();
            if ctx.outbox && t.dst != ctx.remote {
                // The forwarded copy (a side never shares its address with the other side).
                forwarded += 1;
                let Some((path_id, l, a)) = ctx.forward else {
                    panic!(
                        "{what}: forwarded to {} a datagram no bound path carries",
                        t.dst
                    );
                };
                assert_eq!(
                    (t.src, t.dst),
                    (Some(l), a),
                    "{what}: path {path_id:#x} forwarded elsewhere than its other side"
                );
                assert_eq!(d, ctx.input, "{what}: forwarded bytes changed");
                continue;
            }
            let h = check_form(what, &d);
            assert_eq!(
                t.src,
                Some(ctx.local),
                "{what}: an answer not from where asked"
            );
            assert_eq!(t.dst, ctx.remote, "{what}: an answer to somebody else");
            assert!(d.len() <= MAX_SIGNALING_LEN, "{what}");
            if h.sealed {
                self.open_answer(what, &mut d, expect);
            }
            answers.push(buf[..t.len].to_vec());
        }
        assert!(forwarded <= 1, "{what}: forwarded {forwarded} times");
        (events, answers)
    }

    /// A sealed answer opens under the key the harness holds for it.
    fn open_answer(&mut self, what: &str, d: &mut [u8], expect: &Expect) {
        let h = *ntm_wire::SignalingPacket::parse(d)
            .expect("checked")
            .header();
        match h.envelope.role {
            Role::B => {
                let i = DC_KEY_IDS
                    .iter()
                    .position(|k| *k == h.envelope.key_id)
                    .unwrap_or_else(|| panic!("{what}: sealed as role B under {h:?}"));
                assert!(
                    h.envelope.seq < self.reserved[i],
                    "{what}: sequence number {} before its reservation (through {})",
                    h.envelope.seq,
                    self.reserved[i]
                );
                let (_, msg) = self.dc_keys[i]
                    .open(d)
                    .unwrap_or_else(|e| panic!("{what}: the DC cannot open the RS's answer: {e}"));
                let Expect::Request { path_id, .. } = expect else {
                    panic!("{what}: {msg:?} to no RELAY_REQUEST");
                };
                match msg {
                    Message::RelayResponse(r) => {
                        assert_eq!(r.path_id, *path_id, "{what}");
                        let addrs: Vec<SocketAddr> = r
                            .relay_addrs
                            .as_slice()
                            .iter()
                            .map(|a| a.socket_addr())
                            .collect();
                        assert_eq!(addrs, rs_addrs().to_vec(), "{what}");
                        assert!(
                            self.rs.path(*path_id).is_some(),
                            "{what}: RELAY_RESPONSE for a path not in the table"
                        );
                    }
                    Message::Error(e) => {
                        assert_eq!(e.failed_type, MessageType::RelayRequest.to_u8(), "{what}")
                    }
                    other => panic!("{what}: the RS answered a DC with {other:?}"),
                }
            }
            Role::Relay => {
                // Under some K_rel: the live grant's, or one of a RELAY_BIND the harness sealed.
                let path_id = h.envelope.key_id;
                let mut keys: Vec<SecretKey> = Vec::new();
                if let Some(g) = self.grants.get(&path_id) {
                    keys.push(g.krel.clone());
                }
                keys.extend(self.history.iter().filter_map(|s| match &s.origin {
                    Origin::Bind {
                        path_id: p, krel, ..
                    } if *p == path_id => Some(krel.clone()),
                    _ => None,
                }));
                if let Some(a) = self.asked.get(&path_id) {
                    keys.push(a.krel.clone());
                }
                let opened = keys.iter().find_map(|k| {
                    let mut copy = d.to_vec();
                    SignalingKey::new(k, path_id, Role::A)
                        .open(&mut copy)
                        .ok()
                        .map(|(_, m)| m)
                });
                let Some(msg) = opened else {
                    panic!("{what}: an answer under K_rel of {path_id:#x} no end can open: {h:?}");
                };
                match msg {
                    Message::Ack(a) => {
                        assert_eq!(a.acked_type, MessageType::RelayBind.to_u8(), "{what}");
                        assert!(
                            matches!(expect, Expect::Bind { .. }),
                            "{what}: an ACK to no genuine RELAY_BIND"
                        );
                    }
                    Message::Error(_) => {}
                    other => panic!("{what}: the RS sent a node {other:?}"),
                }
            }
            Role::A => panic!("{what}: the RS sealed as role A: {h:?}"),
        }
    }

    fn run_timers(&mut self, what: &str, target: Time) {
        for _ in 0..MAX_TIMER_STEPS {
            let Some((t, label)) = self.rs.poll_timeout() else {
                break;
            };
            if t > target {
                break;
            }
            let at = t.max(self.now);
            self.now = at;
            self.rs.handle_timeout(at, &mut self.rng);
            let mut buf = [0u8; TRANSMIT_BUF];
            assert!(
                self.rs.poll_transmit(at, &mut buf).is_none(),
                "{what}: the RS sent something on a timer ({label})"
            );
            while let Some(e) = self.rs.poll_event() {
                let RsEvent::PathEnded { path_id, .. } = e else {
                    panic!("{what}: {e:?} on a timer ({label})");
                };
                assert!(self.rs.path(path_id).is_none(), "{what}: {e:?}, still live");
                self.grants.remove(&path_id);
            }
            if let Some((next, next_label)) = self.rs.poll_timeout() {
                assert!(
                    next > at,
                    "{what}: after handle_timeout({at}) for {label} the next deadline is \
                     {next} ({next_label}): no progress"
                );
            }
        }
        if let Some((t, _)) = self.rs.poll_timeout() {
            assert!(
                t > target,
                "{what}: more than {MAX_TIMER_STEPS} timer firings"
            );
        }
        self.now = target;
        self.check_state(what);
    }

    /// The bounds, and the relay table against what the DCs authorized.
    fn check_state(&self, what: &str) {
        let max = self.rs.config().limits.max_paths;
        let count = self.rs.path_count();
        assert!(count <= max, "{what}: {count} paths, limit {max}");
        assert_eq!(
            self.rs.paths().count(),
            count,
            "{what}: path_count disagrees"
        );
        for p in self.rs.paths() {
            assert!(
                self.authorized.contains(&p.path_id),
                "{what}: path {:#x} in the table without an authorization",
                p.path_id
            );
            assert!(
                self.grants.contains_key(&p.path_id),
                "{what}: path {:#x} outlived its PathEnded",
                p.path_id
            );
            assert!(
                p.ends > self.now,
                "{what}: path {:#x} outlived its end",
                p.path_id
            );
            for s in [p.side_a, p.side_b].into_iter().flatten() {
                assert!(rs_addrs().contains(&s.local), "{what}: bound to {s:?}");
            }
            if let (Some(a), Some(b)) = (p.side_a, p.side_b) {
                assert_ne!(a.addr, b.addr, "{what}: both sides at one address");
            }
        }
        for id in self.grants.keys().filter(|_| self.rs.events_lost() == 0) {
            assert!(
                self.rs.path(*id).is_some(),
                "{what}: path {id:#x} left the table without PathEnded"
            );
        }
    }
}

struct Ctx<'a> {
    what: &'a str,
    local: SocketAddr,
    remote: SocketAddr,
    input: &'a [u8],
    outbox: bool,
    forward: Option<(u32, SocketAddr, SocketAddr)>,
}
