//! Direction-coordinator benchmark: what one core of a DC handles per second (key
//! distributions, registrations and their refreshes, directions), each against the bare
//! AES-256-GCM work of the same datagrams.
//!
//!     cargo bench -p ntm-state --bench dc
//!
//! Machines here are shared and noisy, so every figure is also a ratio measured in one run: each
//! round hands the DC a batch of sealed datagrams (the subject), then does the bare AES-256-GCM
//! open of every datagram the DC received and seal of every datagram it sent, at the same sizes,
//! with one pre-expanded key (the baseline: the crypto no DC can avoid). The median of the
//! per-round ratios subject/baseline is reported, with the median absolute rates for context.
//! Times are the thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`), so a round in which another
//! process held the core is not charged for it; rates are per CPU-second of one core.
//! Set `NTM_BENCH_QUICK=1` for a smoke run of a second or two (what CI does).
//!
//! What the subject is: `handle_datagram` on a datagram sealed beforehand (the node's, AS's or
//! RS's sealing is never timed), then draining `poll_event` and `poll_transmit`, exactly as a
//! runtime does. Every answer is opened and checked afterwards (message type, transaction ID,
//! destination, contents), so a DC that answered wrongly, or not at all, fails the run instead
//! of producing a figure.
//!
//! * Key distribution: KEY_DISTRIBUTION from the AS (open, session installed, ACK sealed).
//! * First registration: REGISTRATION_REQUEST under a session no registration used yet (open,
//!   virtual pair assigned, node record filled, REGISTRATION_RESPONSE sealed).
//! * Refresh: the same node's next REGISTRATION_REQUEST (open, record replaced, answer sealed).
//! * Direction: DIRECTION_REQUEST between two registered nodes with a mix of NAT situations
//!   (open, route selection, path record, for a relayed route RELAY_REQUEST sealed and the RS's
//!   RELAY_RESPONSE opened, then both ROUTE_DIRECTIONs sealed), then both nodes' ACKs (open,
//!   outstanding transactions closed), then the expiry of the path record and of the answer
//!   kept for retransmissions (`handle_timeout`, virtual time moved past the path lifetime).
//!   The RS's and nodes' side in between (opening RELAY_REQUEST, sealing RELAY_RESPONSE and the
//!   ACKs) is not timed.
//!
//! Bytes of DC state per registered node are measured by `tests/dc_memory.rs` with a counting
//! allocator (a global allocator here would slow every timed allocation):
//! `cargo test -p ntm-state --release --test dc_memory -- --nocapture`.

use std::hint::black_box;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::time::Duration;

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use ntm_state::dc::{DcConfig, DcEvent, DirectionCoordinator, RelayLink, VirtualPools};
use ntm_state::signaling::SignalingKey;
use ntm_state::time::Time;
use ntm_wire::{
    open_signaling, Ack, AddrList, AeadKey, DirectionRequest, Envelope, Extensions, Fqdn, Header,
    KeyDistribution, KeyRole, Message, MessageType, NatBehaviour, RegistrationRequest,
    RelayResponse, Role, RouteDirection, RouteKind, RouteReason, SecretKey, SignalingPacket,
    TransportAddr, TunnelRole, HEADER_LEN, MAX_SIGNALING_LEN,
};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

const TAG_LEN: usize = 16;
const AS_KEY_ID: u32 = 17;
const RS_KEY_ID: u32 = 40;
/// What the AS grants each node↔DC key; long enough that no session ends during the run,
/// whose virtual clock moves a day per direction round.
const SESSION_LIFETIME_S: u32 = 120 * 86_400;

/// The CPU time this thread has used. Every figure is CPU time, not wall time: on the shared
/// cores another process often takes a few milliseconds from a round, which wall time would
/// charge to whatever the round measured.
#[cfg(unix)]
fn cpu_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through the pointer, which is valid for it.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Without a thread CPU clock, wall time.
#[cfg(not(unix))]
fn cpu_now() -> Duration {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed()
}

fn quick() -> bool {
    std::env::var_os("NTM_BENCH_QUICK").is_some()
}

/// How much work a run does.
struct Params {
    /// Measured rounds (one more, first, warms up and is not counted).
    rounds: usize,
    /// Requests per round.
    batch: u32,
    /// Nodes registered before the registration rounds start.
    base_nodes: u32,
    /// Registered nodes the direction rounds pick requesters and targets from.
    direction_nodes: u32,
}

fn params() -> Params {
    if quick() {
        Params {
            rounds: 5,
            batch: 500,
            base_nodes: 2_000,
            direction_nodes: 1_024,
        }
    } else {
        Params {
            rounds: 41,
            batch: 2_000,
            base_nodes: 50_000,
            direction_nodes: 16_384,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The deployment around the DC.

fn dc_addr(i: u32) -> SocketAddr {
    SocketAddr::from(([203, 0, 113, 10 + (i % 2) as u8], 4281))
}

fn as_addr() -> SocketAddr {
    SocketAddr::from(([203, 0, 113, 2], 4280))
}

/// The RS's signaling address (RELAY_REQUEST goes there).
fn rs_addr() -> SocketAddr {
    SocketAddr::from(([203, 0, 113, 30], 4282))
}

/// The RS's relay address (what RELAY_RESPONSE hands the nodes).
fn relay_addr() -> SocketAddr {
    SocketAddr::from(([203, 0, 113, 30], 4283))
}

fn as_secret() -> SecretKey {
    SecretKey::from_bytes([0x5a; 32])
}

fn rs_secret() -> SecretKey {
    SecretKey::from_bytes([0x7e; 32])
}

fn fqdn(s: &str) -> Fqdn {
    Fqdn::new(s).expect("valid name")
}

fn config() -> DcConfig {
    let mut c = DcConfig::new(
        fqdn("dc1.example"),
        vec![dc_addr(0), dc_addr(1)],
        as_secret(),
        AS_KEY_ID,
        VirtualPools {
            v4: Ipv4Addr::new(100, 64, 0, 0),
            v4_prefix_len: 10,
            v6: "fd4e:544d:0:1::".parse().expect("v6 pool"),
        },
    );
    c.limits.max_nodes = 1 << 20;
    c.relays = vec![RelayLink {
        addr: rs_addr(),
        key: rs_secret(),
        key_id: RS_KEY_ID,
        serves_v4: true,
        serves_v6: true,
    }];
    c
}

/// A node's NAT situation (IPv4 only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// No NAT: its observed address is its own.
    Public,
    /// Behind its own endpoint-independent NAT.
    Cone,
    /// Behind its own address-and-port-dependent ("symmetric") NAT.
    Symmetric,
    /// Behind an endpoint-independent NAT shared with the node next to it (same public IP).
    Shared,
}

/// One node's end of its session with the DC, and where it is.
struct NodeEnd {
    fqdn: Fqdn,
    key_id: u32,
    secret: SecretKey,
    next_seq: u64,
    next_txid: u32,
    local_addrs: Vec<SocketAddr>,
    observed: SocketAddr,
    nat: NatBehaviour,
    /// The DC address it talks to.
    dc: SocketAddr,
    kind: Kind,
}

impl NodeEnd {
    fn new(i: u32, kind: Kind) -> NodeEnd {
        let mut k = [0x3c; 32];
        k[..4].copy_from_slice(&i.to_le_bytes());
        let private = SocketAddr::from(([192, 168, 1, 2], 5000));
        let (local_addrs, observed, nat) = match kind {
            Kind::Public => {
                let a = SocketAddr::from((Ipv4Addr::from(0xc612_0000 + i), 5000));
                (vec![a], a, NatBehaviour::NoNat)
            }
            Kind::Cone => (
                vec![private],
                SocketAddr::from((Ipv4Addr::from(0x0b00_0000 + i), 40_000)),
                NatBehaviour::EndpointIndependent,
            ),
            Kind::Symmetric => (
                vec![private],
                SocketAddr::from((Ipv4Addr::from(0x0b00_0000 + i), 40_000 + (i % 7) as u16)),
                NatBehaviour::AddressAndPortDependent,
            ),
            Kind::Shared => (
                vec![SocketAddr::from(([192, 168, 1, 10 + (i % 2) as u8], 5000))],
                SocketAddr::from((Ipv4Addr::from(0x0c00_0000 + i / 2), 40_000 + (i % 2) as u16)),
                NatBehaviour::EndpointIndependent,
            ),
        };
        NodeEnd {
            fqdn: fqdn(&format!("n{i:07}.dc1.example")),
            key_id: 0x0100_0000 + i,
            secret: SecretKey::from_bytes(k),
            next_seq: 0,
            next_txid: 0,
            local_addrs,
            observed,
            nat,
            dc: dc_addr(i),
            kind,
        }
    }

    fn txid(&mut self) -> u32 {
        self.next_txid += 1;
        self.next_txid
    }

    /// Seals `msg` as the node does (role A, next sequence number).
    fn seal(&mut self, msg: &Message, txid: u32) -> Vec<u8> {
        let env = Envelope {
            role: Role::A,
            key_id: self.key_id,
            seq: self.next_seq,
            txid,
            ephemeral: None,
        };
        self.next_seq += 1;
        let mut v = vec![0u8; msg.datagram_len(&env, true)];
        let n = msg
            .seal_into(&env, &AeadKey::new(&self.secret), &mut v)
            .expect("seal");
        v.truncate(n);
        v
    }

    /// Opens a datagram of the DC under this node's key.
    fn open(&self, d: &mut [u8]) -> (Header, Message) {
        open_signaling(d, &AeadKey::new(&self.secret)).expect("the DC's datagram opens")
    }

    /// The AS's KEY_DISTRIBUTION of this node's session key to the DC.
    fn key_distribution(&self, as_key: &mut SignalingKey, txid: u32) -> Input {
        let kd: Message = KeyDistribution {
            key_role: KeyRole::NodeDc,
            new_key_id: self.key_id,
            key: self.secret.clone(),
            lifetime_s: SESSION_LIFETIME_S,
            subject: self.fqdn.clone(),
            extensions: Extensions::none(),
        }
        .into();
        Input {
            local: dc_addr(0),
            remote: as_addr(),
            txid,
            datagram: as_key.seal_to_vec(&kd, txid, None).expect("seal"),
        }
    }

    /// A REGISTRATION_REQUEST with the node's addresses, from its observed address.
    fn registration(&mut self) -> Input {
        let req: Message = RegistrationRequest {
            node_fqdn: self.fqdn.clone(),
            local_addrs: AddrList::new(
                self.local_addrs
                    .iter()
                    .map(|a| TransportAddr::new(*a))
                    .collect(),
            )
            .expect("addresses"),
            nat_mapping: self.nat,
            node_public_key: [0x11; 32],
            wants_notification: false,
            extensions: Extensions::none(),
        }
        .into();
        self.send(&req)
    }

    fn send(&mut self, msg: &Message) -> Input {
        let txid = self.txid();
        let datagram = self.seal(msg, txid);
        Input {
            local: self.dc,
            remote: self.observed,
            txid,
            datagram,
        }
    }
}

/// A datagram for the DC: where it arrives, from where, and its transaction ID.
struct Input {
    local: SocketAddr,
    remote: SocketAddr,
    txid: u32,
    datagram: Vec<u8>,
}

// ---------------------------------------------------------------------------------------------
// Driving the DC.

/// One datagram the DC handed out, kept in the sink's arena.
#[derive(Clone, Copy, Debug)]
struct Out {
    src: Option<SocketAddr>,
    dst: SocketAddr,
    at: usize,
    len: usize,
}

/// A datagram of the DC copied out of the sink: where it went, and its bytes.
type Sent = (Out, Vec<u8>);

/// Where the DC's datagrams go while timed: `poll_transmit` writes straight into a preallocated
/// arena, so collecting them costs no copy and no allocation.
struct Sink {
    arena: Vec<u8>,
    used: usize,
    out: Vec<Out>,
    /// NodeRegistered events since the last clear.
    registered: usize,
}

impl Sink {
    fn new(max_datagrams: usize) -> Sink {
        Sink {
            arena: vec![0u8; (max_datagrams + 1) * MAX_SIGNALING_LEN],
            used: 0,
            out: Vec::with_capacity(max_datagrams),
            registered: 0,
        }
    }

    fn clear(&mut self) {
        self.used = 0;
        self.out.clear();
        self.registered = 0;
    }

    /// Events first, then datagrams, as the DC's documentation asks of a runtime.
    fn drain(&mut self, dc: &mut DirectionCoordinator, now: Time) {
        while let Some(e) = dc.poll_event() {
            if matches!(e, DcEvent::NodeRegistered { .. }) {
                self.registered += 1;
            }
        }
        loop {
            let room = self
                .arena
                .get_mut(self.used..self.used + MAX_SIGNALING_LEN)
                .expect("sink sized for the phase");
            let Some(t) = dc.poll_transmit(now, room) else {
                break;
            };
            self.out.push(Out {
                src: t.src,
                dst: t.dst,
                at: self.used,
                len: t.len,
            });
            self.used += t.len;
        }
    }

    /// A copy of datagram `i`, its source and destination.
    fn take(&self, i: usize) -> Sent {
        let o = self.out[i];
        (o, self.arena[o.at..o.at + o.len].to_vec())
    }
}

/// A DC and what drives it.
struct Driver {
    dc: DirectionCoordinator,
    rng: ChaCha8Rng,
    now: Time,
    sink: Sink,
}

/// What one timed phase did: its duration and, per input, the range of the sink's datagrams
/// that input drew.
struct Phase {
    elapsed: Duration,
    answers: Vec<Range<usize>>,
}

impl Driver {
    fn new(config: DcConfig, max_datagrams: usize) -> Driver {
        Driver {
            dc: DirectionCoordinator::new(config).expect("DC configuration"),
            rng: ChaCha8Rng::seed_from_u64(0x6463),
            now: Time::ZERO,
            sink: Sink::new(max_datagrams),
        }
    }

    /// Times handing every input to the DC, each followed by draining its output.
    fn run(&mut self, inputs: &mut [Input]) -> Phase {
        self.sink.clear();
        let mut marks = Vec::with_capacity(inputs.len());
        let start = cpu_now();
        for i in inputs.iter_mut() {
            self.dc
                .handle_datagram(self.now, i.local, i.remote, &mut i.datagram, &mut self.rng);
            self.sink.drain(&mut self.dc, self.now);
            marks.push(self.sink.out.len());
        }
        let elapsed = cpu_now() - start;
        let mut from = 0;
        let answers = marks
            .into_iter()
            .map(|to| {
                let r = from..to;
                from = to;
                r
            })
            .collect();
        Phase { elapsed, answers }
    }

    /// Times moving the clock to `to` and handling what falls due.
    fn advance(&mut self, to: Time) -> Duration {
        self.sink.clear();
        let start = cpu_now();
        self.now = to;
        self.dc.handle_timeout(to, &mut self.rng);
        self.sink.drain(&mut self.dc, to);
        cpu_now() - start
    }
}

/// The one answer of each input, which must exist.
fn single_answers(phase: &Phase, what: &str) -> Vec<usize> {
    phase
        .answers
        .iter()
        .enumerate()
        .map(|(i, r)| {
            assert_eq!(r.len(), 1, "{what} {i} drew {} datagrams", r.len());
            r.start
        })
        .collect()
}

fn msg_type(d: &[u8]) -> MessageType {
    SignalingPacket::parse(d)
        .expect("a signaling datagram")
        .header()
        .msg_type
}

// ---------------------------------------------------------------------------------------------
// The baseline: bare AES-256-GCM on the same datagram sizes.

/// One crypto operation of the subject: opening a datagram it received or sealing one it sent,
/// of that many bytes (24-byte header as associated data, 16-byte tag).
#[derive(Clone, Copy, Debug)]
enum Op {
    Open(usize),
    Seal(usize),
}

/// The crypto of a phase: each input opened, then its answers sealed.
fn trace_of(inputs: &[Input], phase: &Phase, sink: &Sink, trace: &mut Vec<Op>) {
    for (input, r) in inputs.iter().zip(&phase.answers) {
        trace.push(Op::Open(input.datagram.len()));
        for o in &sink.out[r.clone()] {
            trace.push(Op::Seal(o.len));
        }
    }
}

struct Baseline {
    cipher: Aes256Gcm,
    counter: u64,
}

/// A prepared baseline step: a sealed datagram to open, or a buffer to seal.
enum Step {
    Open(Vec<u8>),
    Seal(Vec<u8>),
}

const OPEN_NONCE: [u8; 12] = [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];

impl Baseline {
    fn new() -> Baseline {
        Baseline {
            cipher: Aes256Gcm::new((&[0x42u8; 32]).into()),
            counter: 0,
        }
    }

    /// Fresh buffers for `trace` (opening consumes a datagram, as the DC's open does).
    fn prepare(&self, trace: &[Op]) -> Vec<Step> {
        trace
            .iter()
            .map(|op| match *op {
                Op::Open(len) => {
                    let mut d: Vec<u8> = (0..len).map(|i| i as u8).collect();
                    let (aad, rest) = d.split_at_mut(HEADER_LEN);
                    let (body, tag) = rest.split_at_mut(len - HEADER_LEN - TAG_LEN);
                    let t = self
                        .cipher
                        .encrypt_in_place_detached(Nonce::from_slice(&OPEN_NONCE), aad, body)
                        .expect("small");
                    tag.copy_from_slice(&t);
                    Step::Open(d)
                }
                Op::Seal(len) => Step::Seal(vec![0x5c; len]),
            })
            .collect()
    }

    fn run(&mut self, steps: &mut [Step]) -> Duration {
        let start = cpu_now();
        for s in steps.iter_mut() {
            match s {
                Step::Open(d) => {
                    let (aad, rest) = d.split_at_mut(HEADER_LEN);
                    let n = rest.len() - TAG_LEN;
                    let (body, tag) = rest.split_at_mut(n);
                    self.cipher
                        .decrypt_in_place_detached(
                            Nonce::from_slice(&OPEN_NONCE),
                            aad,
                            black_box(body),
                            Tag::from_slice(tag),
                        )
                        .expect("own datagram");
                }
                Step::Seal(d) => {
                    self.counter += 1;
                    let mut nonce = [0u8; 12];
                    nonce[0] = 2;
                    nonce[4..].copy_from_slice(&self.counter.to_be_bytes());
                    let (aad, rest) = d.split_at_mut(HEADER_LEN);
                    let n = rest.len() - TAG_LEN;
                    let (body, tag) = rest.split_at_mut(n);
                    let t = self
                        .cipher
                        .encrypt_in_place_detached(Nonce::from_slice(&nonce), aad, black_box(body))
                        .expect("small");
                    tag.copy_from_slice(&t);
                }
            }
        }
        cpu_now() - start
    }

    /// Prepares and times the baseline of `trace`.
    fn time(&mut self, trace: &[Op]) -> Duration {
        let mut steps = self.prepare(trace);
        let d = self.run(&mut steps);
        black_box(&steps);
        d
    }
}

// ---------------------------------------------------------------------------------------------
// Figures.

/// Per measured round: nanoseconds per request of the subject and of its baseline.
#[derive(Default)]
struct Series {
    subject: Vec<f64>,
    baseline: Vec<f64>,
    ratio: Vec<f64>,
}

impl Series {
    fn push(&mut self, requests: u32, subject: Duration, baseline: Duration) {
        let n = f64::from(requests);
        let s = subject.as_nanos() as f64 / n;
        let b = baseline.as_nanos() as f64 / n;
        self.subject.push(s);
        self.baseline.push(b);
        self.ratio.push(s / b);
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn header() {
    println!(
        "{:<44} {:>9} {:>9} {:>7} {:>10}  target",
        "request (one core)", "DC ns", "AES ns", "ratio", "per second"
    );
}

fn row(name: &str, s: &Series, target: &str) {
    let (subject, baseline, ratio) = (median(&s.subject), median(&s.baseline), median(&s.ratio));
    println!(
        "{name:<44} {subject:>9.0} {baseline:>9.0} {ratio:>7.2} {:>10.0}  {target}",
        1e9 / subject
    );
}

// ---------------------------------------------------------------------------------------------
// Registration.

/// Logs in (KEY_DISTRIBUTION) and registers `nodes`, untimed, checking that all registered.
fn populate(d: &mut Driver, as_key: &mut SignalingKey, nodes: &mut [NodeEnd], txid: &mut u32) {
    for chunk in nodes.chunks_mut(1000) {
        let mut kds: Vec<Input> = chunk
            .iter()
            .map(|n| {
                *txid += 1;
                n.key_distribution(as_key, *txid)
            })
            .collect();
        let p = d.run(&mut kds);
        single_answers(&p, "KEY_DISTRIBUTION");
        let mut regs: Vec<Input> = chunk.iter_mut().map(NodeEnd::registration).collect();
        let p = d.run(&mut regs);
        for (i, n) in single_answers(&p, "REGISTRATION_REQUEST")
            .into_iter()
            .zip(&*chunk)
        {
            let (_, mut a) = d.sink.take(i);
            let (_, m) = n.open(&mut a);
            assert!(matches!(m, Message::RegistrationResponse(_)), "{m:?}");
        }
    }
}

/// Checks that every KEY_DISTRIBUTION drew an ACK for it, sealed to the AS.
fn check_key_acks(d: &Driver, as_key: &mut SignalingKey, kds: &[Input], phase: &Phase) {
    for (i, kd) in single_answers(phase, "KEY_DISTRIBUTION")
        .into_iter()
        .zip(kds)
    {
        let (o, mut a) = d.sink.take(i);
        assert_eq!((o.src, o.dst), (Some(kd.local), kd.remote));
        let (h, m) = as_key.open(&mut a).expect("ACK opens under the AS key");
        assert_eq!(h.envelope.txid, kd.txid);
        match m {
            Message::Ack(a) => assert_eq!(a.acked_type, MessageType::KeyDistribution.to_u8()),
            other => panic!("KEY_DISTRIBUTION answered with {other:?}"),
        }
    }
}

/// Checks that every REGISTRATION_REQUEST drew its REGISTRATION_RESPONSE; returns the pairs.
fn check_registrations(
    d: &Driver,
    nodes: &[NodeEnd],
    regs: &[Input],
    phase: &Phase,
) -> Vec<(Ipv4Addr, Ipv6Addr)> {
    single_answers(phase, "REGISTRATION_REQUEST")
        .into_iter()
        .zip(nodes.iter().zip(regs))
        .map(|(i, (n, req))| {
            let (o, mut a) = d.sink.take(i);
            assert_eq!((o.src, o.dst), (Some(n.dc), n.observed));
            let (h, m) = n.open(&mut a);
            assert_eq!(h.envelope.txid, req.txid);
            let Message::RegistrationResponse(r) = m else {
                panic!("REGISTRATION_REQUEST answered with {m:?}");
            };
            assert_eq!(r.observed_addr.socket_addr(), n.observed);
            assert_eq!((r.lifetime_s, r.keepalive_interval_s), (600, 25));
            (r.virtual_v4, r.virtual_v6)
        })
        .collect()
}

struct RegistrationFigures {
    key_distribution: Series,
    first: Series,
    refresh: Series,
    nodes_at_end: usize,
}

fn registrations(p: &Params) -> RegistrationFigures {
    let mut d = Driver::new(config(), p.batch as usize);
    let mut as_key = SignalingKey::new(&as_secret(), AS_KEY_ID, Role::A);
    let mut as_txid = 0u32;
    // The registration nodes sit behind their own cone NAT, with a private IPv4 address and a
    // global IPv6 one: the most common registration.
    let new_node = |i: u32| {
        let mut n = NodeEnd::new(i, Kind::Cone);
        let v6 = Ipv6Addr::from(0x2001_0db8_0001_0000_0000_0000_0000_0000u128 | u128::from(i));
        n.local_addrs.push(SocketAddr::from((v6, 5000)));
        n
    };
    let mut base: Vec<NodeEnd> = (0..p.base_nodes).map(new_node).collect();
    populate(&mut d, &mut as_key, &mut base, &mut as_txid);
    drop(base);
    assert_eq!(d.dc.nodes_registered(), p.base_nodes as usize);

    let mut figures = RegistrationFigures {
        key_distribution: Series::default(),
        first: Series::default(),
        refresh: Series::default(),
        nodes_at_end: 0,
    };
    let mut baseline = Baseline::new();
    let mut next = p.base_nodes;
    for round in 0..=p.rounds {
        let mut nodes: Vec<NodeEnd> = (next..next + p.batch).map(new_node).collect();
        next += p.batch;
        let mut kds: Vec<Input> = nodes
            .iter()
            .map(|n| {
                as_txid += 1;
                n.key_distribution(&mut as_key, as_txid)
            })
            .collect();
        let mut firsts: Vec<Input> = nodes.iter_mut().map(NodeEnd::registration).collect();
        let mut refreshes: Vec<Input> = nodes.iter_mut().map(NodeEnd::registration).collect();
        let registered_before = d.dc.nodes_registered();

        let phase = d.run(&mut kds);
        let mut trace = Vec::new();
        trace_of(&kds, &phase, &d.sink, &mut trace);
        let base_kd = baseline.time(&trace);
        check_key_acks(&d, &mut as_key, &kds, &phase);
        let subject_kd = phase.elapsed;

        let phase = d.run(&mut firsts);
        trace.clear();
        trace_of(&firsts, &phase, &d.sink, &mut trace);
        let base_first = baseline.time(&trace);
        let pairs = check_registrations(&d, &nodes, &firsts, &phase);
        assert_eq!(d.sink.registered, p.batch as usize, "NodeRegistered events");
        assert_eq!(
            d.dc.nodes_registered(),
            registered_before + p.batch as usize
        );
        let mut distinct = pairs.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), pairs.len(), "every node its own pair");
        let subject_first = phase.elapsed;

        let phase = d.run(&mut refreshes);
        trace.clear();
        trace_of(&refreshes, &phase, &d.sink, &mut trace);
        let base_refresh = baseline.time(&trace);
        let again = check_registrations(&d, &nodes, &refreshes, &phase);
        assert_eq!(again, pairs, "a refresh keeps the pair");
        assert_eq!(d.sink.registered, p.batch as usize, "NodeRegistered events");
        let subject_refresh = phase.elapsed;

        if round > 0 {
            figures.key_distribution.push(p.batch, subject_kd, base_kd);
            figures.first.push(p.batch, subject_first, base_first);
            figures.refresh.push(p.batch, subject_refresh, base_refresh);
        }
    }
    assert_eq!(d.dc.drops().total(), 0, "{:?}", d.dc.drops());
    figures.nodes_at_end = d.dc.nodes_registered();
    figures
}

// ---------------------------------------------------------------------------------------------
// Directions.

/// The population's NAT situations, by node index: a quarter each.
fn kind_of(i: u32) -> Kind {
    match i % 8 {
        0 | 1 => Kind::Public,
        2 | 3 => Kind::Cone,
        4 | 5 => Kind::Symmetric,
        _ => Kind::Shared,
    }
}

/// The route spec/06 gives a requester and a target in these situations (IPv4 only).
fn expected_route(r: &NodeEnd, t: &NodeEnd) -> (RouteKind, RouteReason) {
    if r.kind == Kind::Public || t.kind == Kind::Public {
        (RouteKind::Direct, RouteReason::Reachable)
    } else if r.observed.ip() == t.observed.ip() {
        (RouteKind::Direct, RouteReason::SameNat)
    } else if r.kind == Kind::Symmetric && t.kind == Kind::Symmetric {
        (RouteKind::Relay, RouteReason::BothSymmetric)
    } else {
        (RouteKind::Relay, RouteReason::BothBehindNat)
    }
}

struct Request {
    requester: usize,
    target: usize,
    route: (RouteKind, RouteReason),
    /// For a relayed route, what the RELAY_REQUEST authorized: Path ID and relay key.
    relay: Option<(u32, SecretKey)>,
}

struct DirectionFigures {
    /// DIRECTION_REQUEST until both ROUTE_DIRECTIONs are out (relay round trip included).
    directed: Series,
    /// That, plus both ACKs and the expiry of what the direction left behind.
    whole: Series,
    /// Requests per route: Direct Reachable, Direct SameNat, Relay BothBehindNat, BothSymmetric.
    mix: [usize; 4],
}

fn mix_slot(route: (RouteKind, RouteReason)) -> usize {
    match route {
        (RouteKind::Direct, RouteReason::Reachable) => 0,
        (RouteKind::Direct, _) => 1,
        (_, RouteReason::BothBehindNat) => 2,
        _ => 3,
    }
}

/// Picks a requester and a target: one in ten a pair behind one NAT, else any two nodes.
fn pick_pair(rng: &mut ChaCha8Rng, n: u32) -> (usize, usize) {
    if rng.next_u32().is_multiple_of(10) {
        let block = rng.next_u32() % (n / 8);
        let (a, b) = (block * 8 + 6, block * 8 + 7);
        if rng.next_u32().is_multiple_of(2) {
            (a as usize, b as usize)
        } else {
            (b as usize, a as usize)
        }
    } else {
        loop {
            let (r, t) = (rng.next_u32() % n, rng.next_u32() % n);
            if r != t {
                return (r as usize, t as usize);
            }
        }
    }
}

/// Checks the two ROUTE_DIRECTIONs of one request (the target's, then the requester's) and
/// returns the nodes' ACKs for them.
fn check_directions(
    nodes: &mut [NodeEnd],
    req: &Request,
    request_txid: u32,
    directions: [Sent; 2],
) -> [Input; 2] {
    let [(to_target, mut for_target), (to_requester, mut for_requester)] = directions;
    let (t, r) = (&nodes[req.target], &nodes[req.requester]);
    assert_eq!((to_target.src, to_target.dst), (Some(t.dc), t.observed));
    assert_eq!(
        (to_requester.src, to_requester.dst),
        (Some(r.dc), r.observed)
    );
    let (ht, mt) = t.open(&mut for_target);
    let (hr, mr) = r.open(&mut for_requester);
    assert_eq!(hr.envelope.txid, request_txid, "the answer to the request");
    let (Message::RouteDirection(dt), Message::RouteDirection(dr)) = (mt, mr) else {
        panic!("not two ROUTE_DIRECTIONs");
    };
    let check = |d: &RouteDirection, peer: &NodeEnd| {
        assert_eq!((d.route, d.reason), req.route, "{d:?}");
        assert_eq!(d.peer_fqdn, peer.fqdn);
        assert!(d.path_id != 0 && d.lifetime_s > 0, "{d:?}");
        // Only nodes behind two NATs, not both symmetric, probe for a direct path.
        assert_eq!(
            d.probe_direct,
            req.route.1 == RouteReason::BothBehindNat,
            "{d:?}"
        );
        match &req.relay {
            Some((path_id, key)) => {
                assert_eq!(d.path_id, *path_id);
                assert_eq!(d.relay_key.as_ref(), Some(key));
                assert_eq!(
                    d.relay_addrs.as_slice(),
                    &[TransportAddr::new(relay_addr())]
                );
            }
            None => {
                assert!(d.relay_key.is_none() && d.relay_addrs.is_empty(), "{d:?}");
                assert!(!d.peer_addrs.is_empty(), "{d:?}");
            }
        }
    };
    check(&dt, r);
    check(&dr, t);
    assert_eq!(dt.path_id, dr.path_id);
    assert_eq!(dt.tunnel_credential, dr.tunnel_credential);
    // spec/06: on a direct route the NATed node initiates (the target when both or neither
    // are); the requester initiates a new relayed tunnel.
    let requester_initiates = match req.route {
        (RouteKind::Relay, _) => true,
        (_, RouteReason::SameNat) => false,
        _ => r.kind != Kind::Public && t.kind == Kind::Public,
    };
    let initiator = |yes: bool| {
        if yes {
            TunnelRole::Initiator
        } else {
            TunnelRole::Responder
        }
    };
    assert_eq!(
        (dr.role, dt.role),
        (
            initiator(requester_initiates),
            initiator(!requester_initiates)
        ),
        "{:?}",
        req.route
    );

    let ack: Message = Ack {
        acked_type: MessageType::RouteDirection.to_u8(),
        extensions: Extensions::none(),
    }
    .into();
    let ack_from = |n: &mut NodeEnd, txid: u32, dc: SocketAddr| Input {
        local: dc,
        remote: n.observed,
        txid,
        datagram: n.seal(&ack, txid),
    };
    [
        ack_from(
            &mut nodes[req.target],
            ht.envelope.txid,
            sent_from(&to_target),
        ),
        ack_from(
            &mut nodes[req.requester],
            hr.envelope.txid,
            sent_from(&to_requester),
        ),
    ]
}

fn sent_from(o: &Out) -> SocketAddr {
    o.src.expect("the DC names the address it sends from")
}

fn directions(p: &Params) -> DirectionFigures {
    let mut cfg = config();
    // Registrations outlive the run's virtual days (the clock jumps past each round's paths).
    cfg.registration_lifetime = Duration::from_secs(u64::from(SESSION_LIFETIME_S));
    let lifetime = cfg.direction_lifetime;
    let mut d = Driver::new(cfg, 2 * p.batch as usize);
    let mut as_key = SignalingKey::new(&as_secret(), AS_KEY_ID, Role::A);
    let mut rs_key = SignalingKey::new(&rs_secret(), RS_KEY_ID, Role::B);
    let mut as_txid = 0u32;
    let mut nodes: Vec<NodeEnd> = (0..p.direction_nodes)
        .map(|i| NodeEnd::new(i, kind_of(i)))
        .collect();
    populate(&mut d, &mut as_key, &mut nodes, &mut as_txid);
    assert_eq!(d.dc.nodes_registered(), nodes.len());

    let mut figures = DirectionFigures {
        directed: Series::default(),
        whole: Series::default(),
        mix: [0; 4],
    };
    let mut baseline = Baseline::new();
    let mut pairs = ChaCha8Rng::seed_from_u64(0x7061);
    for round in 0..=p.rounds {
        let mut requests: Vec<Request> = Vec::new();
        let mut inputs: Vec<Input> = Vec::new();
        // Distinct pairs within a batch: a new path between two nodes supersedes the DC's
        // record of an older one between them, whose ACKs would then be unexpected.
        let mut taken = std::collections::BTreeSet::new();
        for _ in 0..p.batch {
            let (r, t) = loop {
                let (r, t) = pick_pair(&mut pairs, p.direction_nodes);
                if taken.insert((r.min(t), r.max(t))) {
                    break (r, t);
                }
            };
            let msg: Message = DirectionRequest {
                peer_fqdn: nodes[t].fqdn.clone(),
                rebuild_path_id: 0,
                extensions: Extensions::none(),
            }
            .into();
            inputs.push(nodes[r].send(&msg));
            requests.push(Request {
                requester: r,
                target: t,
                route: expected_route(&nodes[r], &nodes[t]),
                relay: None,
            });
        }

        // DIRECTION_REQUEST: both directions out for a direct route, RELAY_REQUEST for a
        // relayed one.
        let asked = d.run(&mut inputs);
        let mut trace_directed = Vec::new();
        trace_of(&inputs, &asked, &d.sink, &mut trace_directed);
        let mut sent: Vec<Option<[Sent; 2]>> = Vec::new();
        let mut relay_inputs: Vec<Input> = Vec::new();
        let mut relayed: Vec<usize> = Vec::new();
        for (j, (req, r)) in requests.iter_mut().zip(&asked.answers).enumerate() {
            if req.route.0 == RouteKind::Relay {
                assert_eq!(r.len(), 1, "a relayed route asks the RS first");
                let (o, mut a) = d.sink.take(r.start);
                assert_eq!(o.dst, rs_addr());
                let (h, m) = rs_key.open(&mut a).expect("RELAY_REQUEST opens at the RS");
                let Message::RelayRequest(rr) = m else {
                    panic!("a relayed route drew {m:?}");
                };
                assert!(rr.lifetime_s > 0);
                req.relay = Some((rr.path_id, rr.relay_key.clone()));
                let answer: Message = RelayResponse {
                    path_id: rr.path_id,
                    relay_addrs: AddrList::new(vec![TransportAddr::new(relay_addr())])
                        .expect("one address"),
                    load_permille: 0,
                    extensions: Extensions::none(),
                }
                .into();
                relay_inputs.push(Input {
                    local: sent_from(&o),
                    remote: rs_addr(),
                    txid: h.envelope.txid,
                    datagram: rs_key
                        .seal_to_vec(&answer, h.envelope.txid, None)
                        .expect("seal"),
                });
                relayed.push(j);
                sent.push(None);
            } else {
                assert_eq!(r.len(), 2, "{:?} drew {} datagrams", req.route, r.len());
                sent.push(Some([d.sink.take(r.start), d.sink.take(r.start + 1)]));
            }
        }
        for o in &d.sink.out {
            assert_eq!(
                msg_type(&d.sink.arena[o.at..o.at + o.len]),
                if o.dst == rs_addr() {
                    MessageType::RelayRequest
                } else {
                    MessageType::RouteDirection
                }
            );
        }

        // RELAY_RESPONSE: both directions out.
        let relays_answered = d.run(&mut relay_inputs);
        trace_of(
            &relay_inputs,
            &relays_answered,
            &d.sink,
            &mut trace_directed,
        );
        for (&j, r) in relayed.iter().zip(&relays_answered.answers) {
            assert_eq!(r.len(), 2, "RELAY_RESPONSE drew {} datagrams", r.len());
            sent[j] = Some([d.sink.take(r.start), d.sink.take(r.start + 1)]);
        }

        // The nodes check their directions and acknowledge them.
        let mut acks: Vec<Input> = Vec::new();
        for ((req, input), s) in requests.iter().zip(&inputs).zip(sent) {
            let s = s.expect("every request directed");
            acks.extend(check_directions(&mut nodes, req, input.txid, s));
            figures.mix[mix_slot(req.route)] += usize::from(round > 0);
        }
        let drops_before = d.dc.drops().total();
        let acked = d.run(&mut acks);
        assert!(d.sink.out.is_empty(), "an ACK draws no answer");
        assert_eq!(d.dc.drops().total(), drops_before, "{:?}", d.dc.drops());
        let mut trace_acks = Vec::new();
        trace_of(&acks, &acked, &d.sink, &mut trace_acks);
        let paths = d.dc.paths();
        assert_eq!(paths.len(), p.batch as usize);
        assert!(paths.iter().all(|p| p.acked == [true, true]), "all ACKed");
        assert_eq!(
            d.dc.poll_timeout().map(|(_, what)| what),
            Some("direction answer cache expiry"),
            "nothing outstanding"
        );

        // The path records and the answers kept for retransmissions expire.
        let expired = d.advance(d.now + lifetime + Duration::from_secs(1));
        assert!(d.sink.out.is_empty() && d.dc.paths().is_empty());

        let base_directed = baseline.time(&trace_directed);
        let base_acks = baseline.time(&trace_acks);
        if round > 0 {
            let directed = asked.elapsed + relays_answered.elapsed;
            figures.directed.push(p.batch, directed, base_directed);
            figures.whole.push(
                p.batch,
                directed + acked.elapsed + expired,
                base_directed + base_acks,
            );
        }
    }
    assert_eq!(
        d.dc.nodes_registered(),
        nodes.len(),
        "no registration lapsed"
    );
    assert_eq!(d.dc.drops().total(), 0, "{:?}", d.dc.drops());
    figures
}

/// Nanoseconds of one AES-256-GCM key expansion (what the DC does per datagram under a node
/// key, and the baseline does not), median of a few rounds.
fn key_expansion_ns() -> f64 {
    let secret = SecretKey::from_bytes([0x42; 32]);
    let n = if quick() { 2_000u32 } else { 20_000 };
    let rounds: Vec<f64> = (0..7)
        .map(|_| {
            let start = cpu_now();
            for _ in 0..n {
                black_box(AeadKey::new(black_box(&secret)));
            }
            (cpu_now() - start).as_nanos() as f64 / f64::from(n)
        })
        .collect();
    median(&rounds)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing and expects a fast run.
    let benching = std::env::args().any(|a| a == "--bench");
    if !benching && !quick() {
        return;
    }
    let p = params();
    println!(
        "DC on one core: {} rounds of {} requests (CPU time, median per round; ratio = DC time \
         / bare AES-256-GCM open and seal of the same datagrams)",
        p.rounds, p.batch
    );
    let reg = registrations(&p);
    println!();
    println!(
        "registry: {} nodes registered before the rounds, {} after",
        p.base_nodes, reg.nodes_at_end
    );
    header();
    row("KEY_DISTRIBUTION (AS, login)", &reg.key_distribution, "");
    row(
        "REGISTRATION_REQUEST, first (new pair)",
        &reg.first,
        ">= 100000/s",
    );
    row("REGISTRATION_REQUEST, refresh", &reg.refresh, ">= 100000/s");

    let dir = directions(&p);
    let total: usize = dir.mix.iter().sum();
    let pct = |n: usize| 100.0 * n as f64 / total as f64;
    println!();
    println!(
        "directions among {} registered nodes; routes: direct {:.0}% (reachable {:.0}%, same \
         NAT {:.0}%), relayed {:.0}% (both behind NAT {:.0}%, both symmetric {:.0}%)",
        p.direction_nodes,
        pct(dir.mix[0] + dir.mix[1]),
        pct(dir.mix[0]),
        pct(dir.mix[1]),
        pct(dir.mix[2] + dir.mix[3]),
        pct(dir.mix[2]),
        pct(dir.mix[3]),
    );
    header();
    row(
        "DIRECTION_REQUEST -> 2 ROUTE_DIRECTION out",
        &dir.directed,
        ">= 50000/s",
    );
    row(
        "  + both ACKs and the path's expiry",
        &dir.whole,
        ">= 50000/s",
    );
    println!();
    println!(
        "context: one AES-256-GCM key expansion takes {:.0} ns; the DC expands a node's key for \
         every datagram it opens or seals under it (keeping 32 bytes per node instead of ~1 KiB), \
         the baseline never",
        key_expansion_ns()
    );
    println!(
        "DC state per registered node (target <= 512 B): \
         cargo test -p ntm-state --release --test dc_memory -- --nocapture"
    );
}
