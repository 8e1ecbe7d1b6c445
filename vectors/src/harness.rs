//! The fuzz targets' bodies. `fuzz/fuzz_targets/*.rs` call these under libFuzzer, and
//! `tests/fuzz_corpora.rs` replays every committed corpus and regression input through the same
//! functions on each `cargo test`, so a fixed crash stays fixed.
//!
//! Every function asserts the wire contract on what it decodes (decode then encode reproduces the
//! input; sealing then opening gives the message back); a violated assertion is a finding.
//! [`as_server_ops`], [`dc_ops`], [`rs_ops`] and [`node_ops`] drive the state machines of
//! `ntm-state` with sequences of [`ops`] and assert their contract and bounds after each
//! operation.

use arbitrary::{Arbitrary, Unstructured};
use ntm_wire::message::EphemeralRule;
use ntm_wire::{
    classify, crypto, open_data, open_signaling, seal_data, signaling::stream, AeadKey, DataPacket,
    Datagram, Envelope, Message, MessageType, ReplayWindow, SecretKey, SignalingPacket,
    DATA_HEADER_LEN, DATA_OVERHEAD,
};

/// The fixed key every target opens with (also the key of the sealed golden vectors' seeds).
pub fn fixed_key() -> AeadKey {
    AeadKey::new(&SecretKey::from_bytes(FIXED_KEY))
}

/// The bytes of [`fixed_key`].
pub const FIXED_KEY: [u8; 32] = [0x5a; 32];

/// A static X25519 secret for the sealed-box target.
pub const FIXED_BOX_SECRET: [u8; 32] = [0x33; 32];

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// The names of all targets, as directories under `fuzz/corpus/` and `fuzz/regressions/`.
pub const TARGETS: &[(&str, Target)] = &[
    ("datagram", datagram),
    ("signaling_header", signaling_header),
    ("message_body", message_body),
    ("data_open", data_open),
    ("stream_frames", stream_frames),
    ("sealed_box", sealed_box),
    ("roundtrip", roundtrip),
    ("as_server_ops", as_server_ops),
    ("dc_ops", dc_ops),
    ("rs_ops", rs_ops),
    ("node_ops", node_ops),
];

/// Any datagram a node or server can receive: classify, then open or decode it like a receiver.
pub fn datagram(data: &[u8]) {
    let mut buf = data.to_vec();
    match classify(data) {
        Ok(Datagram::Data(p)) => {
            let mut w = ReplayWindow::new();
            if w.check(p.counter()).is_ok() && open_data(&fixed_key(), &mut buf).is_ok() {
                assert!(w.accept(p.counter()).is_ok());
            }
        }
        Ok(Datagram::Signaling(p)) => {
            if p.header().sealed {
                if let Ok((h, m)) = open_signaling(&mut buf, &fixed_key()) {
                    assert_eq!(h, *p.header());
                    let again = m.seal_to_vec(&h.envelope, &fixed_key()).expect("re-seal");
                    assert_eq!(again, data, "re-sealing an opened datagram changed it");
                }
            } else if let Ok(m) = p.decode_plain() {
                let mut out = vec![0u8; data.len()];
                let n = m
                    .encode_plain_into(&p.header().envelope, &mut out)
                    .expect("re-encode");
                assert_eq!(&out[..n], data, "re-encoding a plain datagram changed it");
            }
        }
        Err(_) => {}
    }
}

/// The signaling header check alone.
pub fn signaling_header(data: &[u8]) {
    if let Ok(p) = SignalingPacket::parse(data) {
        let h = p.header();
        assert_eq!(h.msg_type.to_u8(), data[0]);
        match h.msg_type.ephemeral() {
            EphemeralRule::Required => assert!(h.envelope.ephemeral.is_some()),
            EphemeralRule::Forbidden => assert!(h.envelope.ephemeral.is_none()),
            EphemeralRule::Optional => {}
        }
        assert!(h.sealed || h.msg_type.may_be_plaintext());
    }
}

/// A message body: the first byte picks the type, the rest is the body. Whatever decodes must
/// re-encode to exactly the same bytes (one encoding per message).
pub fn message_body(data: &[u8]) {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let t = MessageType::ALL[usize::from(sel) % MessageType::ALL.len()];
    if let Ok(m) = Message::decode_body(t, body) {
        assert_eq!(m.msg_type(), t);
        assert_eq!(m.body_len(), body.len());
        let mut out = Vec::new();
        m.encode_body(&mut out).expect("a Vec grows");
        assert_eq!(out, body, "{} did not re-encode byte-exactly", t.name());
    }
}

/// Data packets under the fixed key: arbitrary bytes are opened as received packets; the first
/// byte also selects a mode that seals the input as an inner packet and flips one bit, so the
/// authenticated path is reached too.
pub fn data_open(data: &[u8]) {
    let mut buf = data.to_vec();
    if let Ok(p) = DataPacket::parse(data) {
        let _ = (p.path_id(), p.key_phase(), p.inner_len());
        let _ = open_data(&fixed_key(), &mut buf);
    }
    if data.len() >= 3 {
        let flip = usize::from(u16::from_be_bytes([data[0], data[1]]));
        let inner = &data[2..];
        let mut pkt = vec![0u8; inner.len() + DATA_OVERHEAD];
        pkt[DATA_HEADER_LEN..DATA_HEADER_LEN + inner.len()].copy_from_slice(inner);
        let n = seal_data(
            &fixed_key(),
            7,
            u64::from(data[0]),
            false,
            &mut pkt,
            inner.len(),
        )
        .expect("buffer sized for the packet");
        let mut opened = pkt.clone();
        let r = open_data(&fixed_key(), &mut opened).expect("own packet opens");
        assert_eq!(&opened[r], inner);
        let i = flip % (8 * n);
        pkt[i / 8] ^= 1 << (i % 8);
        assert!(
            open_data(&fixed_key(), &mut pkt).is_err(),
            "bit {i} flip accepted"
        );
    }
}

/// The NS push channel: a byte stream cut into frames, each frame a signaling datagram.
pub fn stream_frames(data: &[u8]) {
    let mut rest = data;
    let mut frames = 0;
    while let Ok(Some((start, end))) = stream::next_frame(rest) {
        assert!(start <= end && end <= rest.len());
        let frame = &rest[start..end];
        let _ = SignalingPacket::parse(frame);
        frames += 1;
        rest = &rest[end..];
        assert!(frames <= data.len());
    }
}

/// Sealed boxes (cache blobs): arbitrary bytes opened with a fixed secret; and a seal/open
/// round trip of the input.
pub fn sealed_box(data: &[u8]) {
    let _ = crypto::open_box(&FIXED_BOX_SECRET, data);
    let recipient = crypto::x25519_public(&FIXED_BOX_SECRET);
    let mut eph = [0x44u8; 32];
    if let Some(&b) = data.first() {
        eph[0] = b;
    }
    if let Ok(boxed) = crypto::seal_box(&recipient, &eph, data) {
        assert_eq!(
            crypto::open_box(&FIXED_BOX_SECRET, &boxed).expect("opens"),
            data
        );
    }
}

/// Structured: an arbitrary message and envelope must seal, open, and re-encode to themselves.
pub fn roundtrip(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(sel) = u8::arbitrary(&mut u) else {
        return;
    };
    let t = MessageType::ALL[usize::from(sel) % MessageType::ALL.len()];
    let Ok(msg) = Message::arbitrary_of_type(t, &mut u) else {
        return;
    };
    let Ok(mut env) = Envelope::arbitrary(&mut u) else {
        return;
    };
    env.ephemeral = match t.ephemeral() {
        EphemeralRule::Required => Some(env.ephemeral.unwrap_or([9; 32])),
        EphemeralRule::Forbidden => None,
        EphemeralRule::Optional => env.ephemeral,
    };
    let Ok(wire) = msg.seal_to_vec(&env, &fixed_key()) else {
        // Only an over-long message may be refused.
        assert!(msg.datagram_len(&env, true) > ntm_wire::MAX_SIGNALING_LEN);
        return;
    };
    let mut buf = wire.clone();
    let (h, back) = open_signaling(&mut buf, &fixed_key()).expect("own datagram opens");
    assert_eq!(back, msg);
    assert_eq!(h.envelope, env);
    let mut body = Vec::new();
    msg.encode_body(&mut body).expect("a Vec grows");
    assert_eq!(
        Message::decode_body(t, &body).expect("own body decodes"),
        msg
    );
}

// ---------------------------------------------------------------------------------------------
// The state machines of ntm-state, driven by sequences of operations (after quinn's
// `fuzz/fuzz_targets/streams.rs`) from an established state (after turn-proto's
// `turn_recv_authed.rs`). The harness plays every peer honestly (it holds the keys, seals with
// fresh sequence numbers and opens every answer), so the fuzzer's choices reach the code behind
// authentication; after each operation it drains events and transmits and checks the machine's
// contract and bounds.

pub use node_ops::node_ops;
pub use rs_ops::rs_ops;
pub use state::{as_server_ops, dc_ops, MAX_OPS, MAX_RAW_LEN};

mod node_ops;
mod rs_ops;

/// The operations the state-machine targets decode from their input (with `arbitrary`), after an
/// 8-byte RNG seed. Public so that seed inputs can be built and checked outside the harness.
pub mod ops {
    use arbitrary::Arbitrary;

    /// Where a datagram comes from.
    #[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Source {
        /// One of a few fixed addresses: two IPv4 addresses in one /24, another IPv4 address,
        /// two IPv6 addresses in one /64, an IPv4-mapped IPv6 address, the peer server's address
        /// and the machine's own.
        Known(u8),
        V4([u8; 4], u16),
        V6([u8; 16], u16),
    }

    /// How far time moves before the due timers fire.
    #[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Step {
        Millis(u16),
        /// Modulo 4000 s.
        Seconds(u16),
    }

    /// One operation on the account server.
    #[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
    pub enum AsOp {
        /// Any bytes (at most `MAX_RAW_LEN`) from any address.
        Raw {
            source: Source,
            data: Vec<u8>,
        },
        /// A CONFIG_REQUEST sealed by a client the harness plays.
        ConfigRequest {
            client: Client,
            account: AccountChoice,
            /// The PADDING extension's length; none at all when `None`.
            padding: Option<u8>,
            txid: u32,
            source: Source,
        },
        /// A LOGIN_REQUEST under the latest login of client `client` (modulo the clients), or
        /// under a key the AS never gave out when that client has none.
        LoginRequest {
            client: u8,
            proof: Proof,
            /// `None`: the client's previous LOGIN_REQUEST transaction (a retransmission).
            txid: Option<u32>,
            /// `None`: where the client sent its CONFIG_REQUEST from.
            source: Option<Source>,
        },
        /// An ACK from a DC (the second DC when `dc`), sealed under its AS↔DC key.
        DcAck {
            dc: bool,
            txid: Txid,
            /// `None`: KEY_DISTRIBUTION's type.
            acked_type: Option<u8>,
            /// `None`: the DC's address.
            source: Option<Source>,
        },
        /// An ERROR from a DC, sealed under its AS↔DC key; `code` indexes `ErrorCode::ALL`.
        DcError {
            dc: bool,
            txid: Txid,
            code: u8,
            source: Option<Source>,
        },
        /// An earlier datagram again, byte for byte.
        Replay {
            index: u8,
            source: Option<Source>,
        },
        /// An earlier datagram with one byte changed (`xor` 0 counts as 1).
        Mutate {
            index: u8,
            pos: u16,
            xor: u8,
        },
        Advance(Step),
    }

    /// Which client sends a CONFIG_REQUEST.
    #[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Client {
        /// A new client with a fresh ephemeral key (up to a bound, then an existing one).
        New,
        /// An existing client retransmits: the same ephemeral key and account, a new seal.
        Again(u8),
        /// A low-order ephemeral key, from a fixed list.
        LowOrder(u8),
    }

    /// The account a new client names.
    #[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
    pub enum AccountChoice {
        /// One of the configured accounts (modulo their number).
        Known(u8),
        /// `ghost<n>`, which is not configured.
        Unknown(u8),
    }

    /// The proof in a LOGIN_REQUEST.
    #[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Proof {
        /// The right proof for a configured account (for an unknown one, any).
        Right,
        /// 32 copies of the byte.
        Wrong(u8),
    }

    /// A transaction ID in a DC's answer.
    #[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Txid {
        /// The transaction of a KEY_DISTRIBUTION the AS has sent (modulo their number).
        Outstanding(u8),
        Any(u32),
    }

    /// One operation on the direction coordinator.
    #[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
    pub enum DcOp {
        /// Any bytes (at most `MAX_RAW_LEN`) from any address, to DC address `local` (modulo 2).
        Raw {
            source: Source,
            local: u8,
            data: Vec<u8>,
        },
        /// A message of node `node` (modulo the nodes the harness holds keys for; 0 and 1 are
        /// the established ones), sealed under its key with its next sequence number.
        Node {
            node: u8,
            msg: NodeMsg,
            /// `None`: the node's own address.
            source: Option<Source>,
            local: u8,
            /// Sequence numbers skipped before this seal (a gap in the DC's window).
            skip: Option<u8>,
            /// Sealed but not delivered: kept for a later `Replay` (a straggler).
            hold: bool,
        },
        /// A KEY_DISTRIBUTION from the AS, sealed under the AS↔DC key.
        As {
            kd: Distribution,
            /// `None`: the AS's address.
            source: Option<Source>,
            local: u8,
        },
        /// An earlier datagram (delivered or held) again, byte for byte.
        Replay {
            index: u8,
            source: Option<Source>,
            local: u8,
        },
        /// An earlier datagram with one byte changed (`xor` 0 counts as 1).
        Mutate {
            index: u8,
            pos: u16,
            xor: u8,
            local: u8,
        },
        Advance(Step),
    }

    /// What a node sends its DC.
    #[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
    pub enum NodeMsg {
        Register {
            name: Name,
            /// How many of `addr` are the local addresses (modulo 4; none deregisters).
            addrs: u8,
            addr: [Addr; 3],
            /// Indexes `NatBehaviour::ALL`.
            nat: u8,
            /// The public key is 32 copies of it.
            public_key: u8,
            notify: bool,
            /// `None`: the node's previous REGISTRATION_REQUEST transaction.
            txid: Option<u32>,
        },
        Keepalive {
            reply: bool,
            txid: u32,
        },
    }

    /// A node name.
    #[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Name {
        /// The sender's own name (for a KEY_DISTRIBUTION: the key's node, or `n2`).
        Own,
        /// The other established node's name.
        Other,
        /// `n<i % 6>.dc1.example` (`n0` and `n1` are the established nodes).
        Node(u8),
        /// A name that is not one label below the zone, from a fixed list.
        Outside(u8),
    }

    /// A local address in a REGISTRATION_REQUEST.
    #[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Addr {
        /// The datagram's source (the node is behind no NAT).
        Source,
        Known(u8),
        V4([u8; 4], u16),
        V6([u8; 16], u16),
    }

    /// A KEY_DISTRIBUTION's fields.
    #[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Distribution {
        /// `None`: NodeDc; else indexes `KeyRole::ALL`.
        pub role: Option<u8>,
        pub key_id: KeyId,
        pub lifetime: Lifetime,
        pub subject: Name,
        /// `None`: the transaction that last distributed this key ID (a retransmission).
        pub txid: Option<u32>,
    }

    /// A distributed key's ID. The harness gives each key ID one key, drawn at its first use.
    #[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
    pub enum KeyId {
        /// The key of node `i` (modulo the nodes the harness holds keys for).
        Session(u8),
        Fresh(u32),
    }

    /// A distributed key's lifetime.
    #[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Lifetime {
        Day,
        Secs(u16),
    }

    /// One operation on the relay server.
    #[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
    pub enum RsOp {
        /// Any bytes (at most `MAX_RAW_LEN`) from anywhere, to RS address `local` (modulo 2).
        Raw {
            from: Endpoint,
            local: u8,
            data: Vec<u8>,
        },
        /// A RELAY_REQUEST sealed by the harness as DC `dc` (0 or 1; any other value: under a
        /// key ID the RS does not have).
        Request {
            dc: u8,
            path: PathChoice,
            lifetime: Lifetime,
            /// 0 asks for the RS's default rate.
            rate_kbps: u16,
            /// A retransmission of the last RELAY_REQUEST for this Path ID (same DC, transaction
            /// and K_rel, a new seal); without one, a new request with a fresh K_rel.
            again: bool,
            txid: u32,
            /// `None`: the DC's address.
            source: Option<Source>,
            local: u8,
        },
        /// A RELAY_BIND of side A (B when `b`) under the K_rel of the path's live authorization
        /// (or a K_rel the RS never got, when there is none).
        Bind {
            path: PathChoice,
            b: bool,
            from: Endpoint,
            local: u8,
            /// Sequence numbers skipped before this seal.
            skip: Option<u8>,
            /// Sealed but not delivered: kept for a later `Replay` (late delivery).
            hold: bool,
            txid: u32,
        },
        /// A DATA packet for the path with `len % 1400` inner bytes (the RS cannot open it).
        Data {
            path: PathChoice,
            from: Endpoint,
            local: u8,
            len: u16,
            counter: u8,
            /// Through `handle_datagram` (the outbox) instead of `relay`.
            outbox: bool,
        },
        /// A signaling message for the path: `msg_type` indexes a list of forwarded and other
        /// types (one past it: an unsealed ERROR), `role` the envelope's role (modulo 3), and
        /// the body is made from `body` with `arbitrary`. Sealed under a K_tun only the ends
        /// hold.
        Signal {
            path: PathChoice,
            from: Endpoint,
            local: u8,
            msg_type: u8,
            role: u8,
            body: Vec<u8>,
            outbox: bool,
        },
        /// An earlier datagram (delivered or held) again, byte for byte.
        Replay {
            index: u8,
            /// `None`: from where it first came.
            from: Option<Endpoint>,
            local: u8,
        },
        /// An earlier datagram with one byte changed (`xor` 0 counts as 1).
        Mutate {
            index: u8,
            pos: u16,
            xor: u8,
        },
        Advance(Step),
    }

    /// A Path ID.
    #[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
    pub enum PathChoice {
        /// One of a few fixed Path IDs (modulo their number; 0 is among them).
        Known(u8),
        Any(u32),
    }

    /// One operation on a node that is logged in and registered.
    #[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
    pub enum NodeOp {
        /// Any bytes (at most `MAX_RAW_LEN`) from any address, to local address `local`.
        Raw {
            source: Source,
            local: u8,
            data: Vec<u8>,
        },
        /// A ROUTE_DIRECTION sealed by the harness as the DC, under K_nd.
        Direction {
            /// Indexes the harness's peers (modulo their number).
            peer: u8,
            path: PathChoice,
            /// Indexes `RouteKind::ALL`.
            route: u8,
            /// The node is the initiator (else the responder).
            initiator: bool,
            /// Indexes `RouteReason::ALL`.
            reason: u8,
            /// How many peer addresses (modulo 4).
            peer_addrs: u8,
            /// How many relay addresses (modulo 3: none, IPv4, both families).
            relay_addrs: u8,
            /// Whether a K_rel is given (else it follows the route: relayed routes have one).
            relay_key: Option<bool>,
            probe_direct: bool,
            /// `None`: the transaction of the last ROUTE_DIRECTION (a retransmission, with the
            /// same credentials).
            txid: Option<u32>,
        },
        /// The peer's side of the handshake on direction `index` (modulo those given): a
        /// TUNNEL_REQUEST when the node responds, a TUNNEL_RESPONSE to the node's request.
        Handshake {
            index: u8,
            /// From where the direction says the peer (or the relay) is; else from this.
            from: Option<Source>,
            /// A low-order ephemeral key instead of a fresh one.
            low_order: bool,
            hold: bool,
        },
        /// As the RS: ACK (or ERROR PeerNotBound when `refuse`) the node's last RELAY_BIND or
        /// request on direction `index`.
        RelayAnswer {
            index: u8,
            refuse: bool,
        },
        /// A DATA packet from the peer of direction `index` under the keys the harness derived.
        Data {
            index: u8,
            v6: bool,
            /// Which inner addresses: peer → node, or wrong source, or wrong destination.
            inner: u8,
            len: u16,
            /// `None`: the next counter.
            counter: Option<u8>,
            from: Option<Source>,
        },
        /// A control message of the peer under K_ctrl (keep-alive, reply, PATH_UPDATE,
        /// TUNNEL_CLOSE, ACK, ERROR, picked by `kind`).
        Control {
            index: u8,
            kind: u8,
            reply: bool,
            txid: Option<u32>,
            from: Option<Source>,
            hold: bool,
        },
        /// As the DC: answers the node's last REGISTRATION_REQUEST (ERROR with code
        /// `ErrorCode::ALL[code]` when `code` is some), or its last DIRECTION_REQUEST with
        /// ERROR NotFound.
        DcAnswer {
            registration: bool,
            code: Option<u8>,
        },
        /// The application asks for a tunnel to peer `peer`.
        Resolve {
            peer: u8,
        },
        /// The application sends a virtual packet.
        Encapsulate {
            peer: u8,
            v6: bool,
            /// The node's own virtual source (else a wrong one).
            own_source: bool,
            len: u16,
        },
        /// The node's addresses change to the subset `mask` of a few addresses.
        AddressChange {
            mask: u8,
        },
        Replay {
            index: u8,
            source: Option<Source>,
        },
        Mutate {
            index: u8,
            pos: u16,
            xor: u8,
        },
        Advance(Step),
    }

    /// Where a datagram comes from, relative to a path.
    #[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Endpoint {
        /// Where side A (B when true) is bound now; its home when unbound.
        Bound(bool),
        /// The home of end A (IPv4) or end B (IPv6).
        Home(bool),
        Source(Source),
    }
}

mod state {
    use core::time::Duration;
    use std::collections::{BTreeMap, BTreeSet};
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    use std::sync::OnceLock;

    use arbitrary::{Arbitrary, Unstructured};
    use ntm_state::as_server::{
        AccountRecord, AccountServer, AsConfig, AsEvent, AsLimits, DcLink, FailureReason,
    };
    use ntm_state::dc::{
        DcConfig, DcEvent, DcLimits, DirectionCoordinator, RegisteredNode, VirtualAddrs,
        VirtualPools,
    };
    use ntm_state::signaling::{RetransmitConfig, SignalingKey, UNSEALED_ERROR_LEN};
    use ntm_state::time::Time;
    use ntm_wire::crypto::{
        auth_key, config_key, config_response_key, login_key, login_proof, login_transcript,
        x25519, x25519_public,
    };
    use ntm_wire::message::Error as ErrorMsg;
    use ntm_wire::{
        Account, Ack, AddrList, ConfigRequest, ErrorCode, Extension, Extensions, Fqdn, Header,
        Keepalive, KeyDistribution, KeyRole, LoginRequest, Message, MessageType, NatBehaviour,
        RegistrationRequest, Role, SecretKey, SignalingPacket, TransportAddr, MAX_SIGNALING_LEN,
    };
    use rand_chacha::ChaCha8Rng;
    use rand_core::{RngCore, SeedableRng};

    use super::ops::{
        AccountChoice, Addr, AsOp, Client as ClientChoice, DcOp, Distribution, KeyId, Lifetime,
        Name, NodeMsg, Proof, Source, Step, Txid,
    };

    /// Operations per input, at most: bounds each input's work.
    pub const MAX_OPS: usize = 64;
    /// The longest raw datagram delivered (longer than any signaling datagram, so oversize is
    /// tried too).
    pub const MAX_RAW_LEN: usize = 1500;
    /// The buffer `poll_transmit` writes into, as a runtime's would be.
    pub(super) const TRANSMIT_BUF: usize = 1500;
    /// Timer firings per time step, at most; more means a timer that keeps re-arming itself.
    pub(super) const MAX_TIMER_STEPS: usize = 1024;
    /// Clients with their own ephemeral key per input, at most (each costs X25519 work).
    const MAX_CLIENTS: usize = 6;
    /// Nodes the DC harness holds keys for, at most.
    const MAX_NODE_ENDS: usize = 8;
    /// Datagrams kept for `Replay` and `Mutate`.
    pub(super) const MAX_HISTORY: usize = 64;

    /// Reads the RNG seed and up to [`MAX_OPS`] operations.
    pub(super) fn decode<'a, T: Arbitrary<'a>>(data: &'a [u8]) -> (u64, Vec<T>) {
        let mut u = Unstructured::new(data);
        let seed = u64::arbitrary(&mut u).unwrap_or(0);
        let mut ops = Vec::new();
        while ops.len() < MAX_OPS && !u.is_empty() {
            match T::arbitrary(&mut u) {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        (seed, ops)
    }

    /// What failure messages start with: the operation's index and fields, a raw datagram
    /// by its length only (formatting every byte for every operation would slow the fuzzer).
    pub(super) fn describe<T: core::fmt::Debug>(
        i: usize,
        op: &T,
        raw: impl Fn(&T) -> Option<(Source, usize)>,
    ) -> String {
        match raw(op) {
            Some((source, len)) => format!("op {i} Raw {{ source: {source:?}, {len} bytes }}"),
            None => format!("op {i} {op:?}"),
        }
    }

    pub(super) fn v4(a: [u8; 4], port: u16) -> SocketAddr {
        SocketAddr::from((a, port))
    }

    pub(super) fn v6(s: &str, port: u16) -> SocketAddr {
        SocketAddr::new(s.parse::<IpAddr>().expect("a literal address"), port)
    }

    /// The fixed sources: `peer` (the other server) and `own` (the machine's own address) last.
    pub(super) fn known_sources(peer: SocketAddr, own: SocketAddr) -> [SocketAddr; 8] {
        [
            v4([198, 51, 100, 10], 5000),
            v4([198, 51, 100, 11], 5000),
            v4([192, 0, 2, 7], 6000),
            v6("2001:db8:1:2::1", 5000),
            v6("2001:db8:1:2::2", 5001),
            v6("::ffff:198.51.100.10", 5000),
            peer,
            own,
        ]
    }

    pub(super) fn resolve(s: Source, known: &[SocketAddr; 8]) -> SocketAddr {
        match s {
            Source::Known(i) => known[usize::from(i) % known.len()],
            Source::V4(a, p) => SocketAddr::from((Ipv4Addr::from(a), p)),
            Source::V6(a, p) => SocketAddr::from((Ipv6Addr::from(a), p)),
        }
    }

    pub(super) fn step(s: Step) -> Duration {
        match s {
            Step::Millis(ms) => Duration::from_millis(u64::from(ms)),
            Step::Seconds(s) => Duration::from_secs(u64::from(s % 4000)),
        }
    }

    /// Checks a transmitted datagram's form; its header when it parses.
    pub(super) fn check_form(what: &str, d: &[u8]) -> Header {
        assert!(
            d.len() <= MAX_SIGNALING_LEN,
            "{what}: a {}-byte datagram exceeds {MAX_SIGNALING_LEN}",
            d.len()
        );
        match SignalingPacket::parse(d) {
            Ok(p) => {
                let h = *p.header();
                assert!(
                    h.sealed || (h.msg_type == MessageType::Error && d.len() == UNSEALED_ERROR_LEN),
                    "{what}: an unsealed {} of {} bytes",
                    h.msg_type.name(),
                    d.len()
                );
                h
            }
            Err(e) => panic!("{what}: a datagram that does not parse ({e}): {d:02x?}"),
        }
    }

    /// A 32-byte key from `rng`.
    pub(super) fn fresh_key(rng: &mut ChaCha8Rng) -> [u8; 32] {
        let mut k = [0u8; 32];
        rng.fill_bytes(&mut k);
        k
    }

    // -- The account server ---------------------------------------------------------------------

    const AS_DC_KEY_IDS: [u32; 2] = [17, 18];
    const ACCOUNTS: [(&str, &str, usize); 3] = [
        ("alice", "alice.dc1.example", 0),
        ("bob", "bob.dc1.example", 0),
        ("carol", "carol.dc2.example", 1),
    ];
    /// Low-order X25519 points (and non-canonical encodings of 0 and 1).
    const LOW_ORDER: [[u8; 32]; 4] = [
        [0; 32],
        {
            let mut p = [0u8; 32];
            p[0] = 1;
            p
        },
        [
            0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f,
            0xc4, 0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16,
            0x5f, 0x49, 0xb8, 0x00,
        ],
        {
            let mut p = [0xff; 32];
            p[0] = 0xed;
            p[31] = 0x7f;
            p
        },
    ];

    fn as_addr() -> SocketAddr {
        v4([203, 0, 113, 2], 4280)
    }

    fn as_dc_addr(i: usize) -> SocketAddr {
        v4([203, 0, 113, 3 + i as u8], 4281)
    }

    fn as_dc_key(i: usize) -> SecretKey {
        SecretKey::from_bytes([0x5a + i as u8; 32])
    }

    fn password(i: usize) -> Vec<u8> {
        format!("password of account {i}").into_bytes()
    }

    /// The AS every input starts with: three accounts on two DCs, small tables, the default
    /// timers. Made once (PBKDF2).
    fn as_config() -> &'static AsConfig {
        static CONFIG: OnceLock<AsConfig> = OnceLock::new();
        CONFIG.get_or_init(|| {
            let dc_names = [
                Fqdn::new("dc1.example").expect("name"),
                Fqdn::new("dc2.example").expect("name"),
            ];
            let mut accounts = BTreeMap::new();
            for (i, (name, node, dc)) in ACCOUNTS.iter().enumerate() {
                let salt = [0x11 + i as u8; 16];
                let iterations = 1000 + i as u32;
                let dc_addrs =
                    AddrList::new(vec![TransportAddr::new(as_dc_addr(*dc))]).expect("one address");
                accounts.insert(
                    Account::new(name).expect("account"),
                    AccountRecord {
                        auth_key: auth_key(&password(i), &salt, iterations),
                        salt,
                        iterations,
                        node_fqdn: Fqdn::new(node).expect("name"),
                        dc: dc_names[*dc].clone(),
                        dc_addrs,
                        ns_addrs: AddrList::empty(),
                        cs_addrs: AddrList::empty(),
                        keepalive_interval_s: 25,
                    },
                );
            }
            let dcs = dc_names
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    let link = DcLink {
                        key: as_dc_key(i),
                        key_id: AS_DC_KEY_IDS[i],
                        addr: as_dc_addr(i),
                        high_water_mark: 0,
                    };
                    (n.clone(), link)
                })
                .collect();
            AsConfig {
                static_secret: SecretKey::from_bytes([0x21; 32]),
                concealment_secret: SecretKey::from_bytes([0x33; 32]),
                default_iterations: 1000,
                session_lifetime: Duration::from_secs(24 * 3600),
                dcs,
                accounts,
                limits: AsLimits {
                    max_logins: 6,
                    max_pending_per_source: 2,
                    account_failures: 3,
                    source_failures: 5,
                    max_tracked_accounts: 3,
                    max_tracked_sources: 3,
                    unsealed_errors_per_second: 3,
                    max_tracked_prefixes: 3,
                    max_queued_transmits: 12,
                    max_queued_events: 6,
                    max_rtt_peers: 2,
                    sequence_block: 3,
                    ..AsLimits::default()
                },
                retransmit: RetransmitConfig::default(),
            }
        })
    }

    /// One login as the client sees it: after a CONFIG_RESPONSE.
    struct LoginSide {
        login_id: u32,
        key: SignalingKey,
        transcript: [u8; 32],
        /// The transactions of the LOGIN_REQUESTs sent under it, the latest last.
        txids: Vec<u32>,
        /// A right proof was sent under it.
        proven: bool,
    }

    /// A client the harness plays: one ephemeral key, one account.
    struct AsClient {
        account: Account,
        /// Index into [`ACCOUNTS`] for a configured account.
        known: Option<usize>,
        e_n_secret: [u8; 32],
        e_n: [u8; 32],
        dh_es: [u8; 32],
        request_key: SignalingKey,
        source: SocketAddr,
        logins: Vec<LoginSide>,
    }

    /// A datagram the AS was given.
    #[derive(Clone)]
    struct AsSent {
        datagram: Vec<u8>,
        source: SocketAddr,
        /// Sealed by the harness and unchanged (not raw or changed bytes).
        sealed: bool,
        /// A CONFIG_REQUEST of this client.
        config_of: Option<usize>,
    }

    /// What the outputs of one operation are checked against.
    struct AsCtx {
        remote: SocketAddr,
        input_len: usize,
        /// The input was a CONFIG_REQUEST of this client.
        config_of: Option<usize>,
    }

    struct AsBench {
        server: AccountServer,
        rng: ChaCha8Rng,
        mine: ChaCha8Rng,
        now: Time,
        as_public: [u8; 32],
        known: [SocketAddr; 8],
        clients: Vec<AsClient>,
        /// The harness as each DC: role B under the AS↔DC key.
        dc_keys: [SignalingKey; 2],
        /// KEY_DISTRIBUTIONs the AS sent: (DC, txid, key ID, key, subject).
        distributions: Vec<(usize, u32, u32, SecretKey, Fqdn)>,
        /// (DC, txid) of every ACK the harness sent.
        acked: BTreeSet<(usize, u32)>,
        /// Accounts a right proof was sent for.
        proven: BTreeSet<Account>,
        remotes: BTreeSet<SocketAddr>,
        history: Vec<AsSent>,
        /// The sequence numbers reserved under each DC key so far.
        reserved: [u64; 2],
    }

    /// Runs up to [`MAX_OPS`] operations against one [`AccountServer`]. Checks after each: every
    /// datagram parses, is at most 1232 bytes and goes to an address that sent something;
    /// every sealed answer opens under the key the harness holds; a CONFIG_RESPONSE is never
    /// larger than its request and conceals unknown accounts; a LOGIN_RESPONSE goes only to a
    /// login that proved its password and carries the key its DC got; KEY_DISTRIBUTION sequence
    /// numbers are reserved before use; inputs that cannot authenticate change nothing; the
    /// timers make progress; the tables and queues stay within their limits.
    pub fn as_server_ops(data: &[u8]) {
        let (seed, ops) = decode::<AsOp>(data);
        let mut b = AsBench::new(seed);
        for (i, op) in ops.into_iter().enumerate() {
            let what = describe(i, &op, |op| match op {
                AsOp::Raw { source, data } => Some((*source, data.len())),
                _ => None,
            });
            b.apply(&what, op);
        }
    }

    impl AsBench {
        fn new(seed: u64) -> Self {
            let server = AccountServer::new(as_config().clone()).expect("AS configuration");
            let as_public = server.public_key();
            AsBench {
                server,
                rng: ChaCha8Rng::seed_from_u64(seed),
                mine: ChaCha8Rng::seed_from_u64(seed ^ 0x6861_726e_6573_7321),
                now: Time::from_secs(1),
                as_public,
                known: known_sources(as_dc_addr(0), as_addr()),
                clients: Vec::new(),
                dc_keys: [0, 1]
                    .map(|i| SignalingKey::new(&as_dc_key(i), AS_DC_KEY_IDS[i], Role::B)),
                distributions: Vec::new(),
                acked: BTreeSet::new(),
                proven: BTreeSet::new(),
                remotes: BTreeSet::new(),
                history: Vec::new(),
                reserved: [0; 2],
            }
        }

        fn apply(&mut self, what: &str, op: AsOp) {
            match op {
                AsOp::Raw { source, mut data } => {
                    data.truncate(MAX_RAW_LEN);
                    let remote = resolve(source, &self.known);
                    self.deliver_copy(what, data, remote);
                }
                AsOp::ConfigRequest {
                    client,
                    account,
                    padding,
                    txid,
                    source,
                } => self.config_request(what, client, account, padding, txid, source),
                AsOp::LoginRequest {
                    client,
                    proof,
                    txid,
                    source,
                } => self.login_request(what, client, proof, txid, source),
                AsOp::DcAck {
                    dc,
                    txid,
                    acked_type,
                    source,
                } => {
                    let msg: Message = Ack {
                        acked_type: acked_type.unwrap_or(MessageType::KeyDistribution.to_u8()),
                        extensions: Extensions::none(),
                    }
                    .into();
                    self.dc_answer(what, usize::from(dc), txid, &msg, source);
                }
                AsOp::DcError {
                    dc,
                    txid,
                    code,
                    source,
                } => {
                    let msg: Message = ErrorMsg {
                        code: ErrorCode::ALL[usize::from(code) % ErrorCode::ALL.len()],
                        failed_type: MessageType::KeyDistribution.to_u8(),
                        retry_after_ms: 0,
                        extensions: Extensions::none(),
                    }
                    .into();
                    self.dc_answer(what, usize::from(dc), txid, &msg, source);
                }
                AsOp::Replay { index, source } => {
                    let Some(sent) = self.pick(index) else {
                        return;
                    };
                    let remote = source.map_or(sent.source, |s| resolve(s, &self.known));
                    self.deliver_copy(what, sent.datagram, remote);
                }
                AsOp::Mutate { index, pos, xor } => {
                    let Some(mut sent) = self.pick(index) else {
                        return;
                    };
                    if sent.datagram.is_empty() {
                        return;
                    }
                    let at = usize::from(pos) % sent.datagram.len();
                    sent.datagram[at] ^= xor.max(1);
                    self.deliver_copy(what, sent.datagram, sent.source);
                }
                AsOp::Advance(s) => {
                    let target = self.now + step(s);
                    self.run_timers(what, target);
                }
            }
        }

        /// Delivers bytes that are no new seal: an exact copy of a datagram the harness sealed
        /// (which a changed byte may also turn back into) is a replay of it; anything else
        /// cannot authenticate.
        fn deliver_copy(&mut self, what: &str, datagram: Vec<u8>, source: SocketAddr) {
            let genuine = self
                .history
                .iter()
                .find(|h| h.sealed && h.datagram == datagram)
                .cloned();
            match genuine {
                Some(mut sent) => {
                    sent.source = source;
                    self.deliver(what, sent, false, true);
                }
                None => {
                    let sent = AsSent {
                        datagram,
                        source,
                        sealed: false,
                        config_of: None,
                    };
                    self.deliver(what, sent, true, false);
                }
            }
        }

        fn pick(&self, index: u8) -> Option<AsSent> {
            let n = self.history.len();
            (n > 0).then(|| self.history[usize::from(index) % n].clone())
        }

        fn config_request(
            &mut self,
            what: &str,
            client: ClientChoice,
            account: AccountChoice,
            padding: Option<u8>,
            txid: u32,
            source: Source,
        ) {
            let remote = resolve(source, &self.known);
            let extensions = match padding {
                Some(n) => Extensions::new(vec![Extension {
                    ext_type: Extension::PADDING,
                    value: vec![0; usize::from(n)],
                }])
                .expect("one extension"),
                None => Extensions::none(),
            };
            let (account, known) = match account {
                AccountChoice::Known(i) => {
                    let i = usize::from(i) % ACCOUNTS.len();
                    (Account::new(ACCOUNTS[i].0).expect("account"), Some(i))
                }
                AccountChoice::Unknown(n) => {
                    (Account::new(&format!("ghost{n}")).expect("account"), None)
                }
            };
            if let ClientChoice::LowOrder(i) = client {
                let point = LOW_ORDER[usize::from(i) % LOW_ORDER.len()];
                let msg: Message = ConfigRequest {
                    account,
                    extensions,
                }
                .into();
                let mut k = SignalingKey::new(&SecretKey::from_bytes([0x77; 32]), 0, Role::A);
                let datagram = k.seal_to_vec(&msg, txid, Some(point)).expect("seal");
                let sent = AsSent {
                    datagram,
                    source: remote,
                    sealed: true,
                    config_of: None,
                };
                return self.deliver(what, sent, false, false);
            }
            let again = match client {
                ClientChoice::Again(i) if !self.clients.is_empty() => {
                    Some(usize::from(i) % self.clients.len())
                }
                _ if self.clients.len() >= MAX_CLIENTS => Some(txid as usize % self.clients.len()),
                _ => None,
            };
            let c = match again {
                Some(c) => c,
                None => {
                    let e_n_secret = fresh_key(&mut self.mine);
                    let e_n = x25519_public(&e_n_secret);
                    let dh_es = *x25519(&e_n_secret, &self.as_public).expect("the AS key is valid");
                    let request_key =
                        SignalingKey::new(&config_key(&dh_es, &e_n, &self.as_public), 0, Role::A);
                    self.clients.push(AsClient {
                        account,
                        known,
                        e_n_secret,
                        e_n,
                        dh_es,
                        request_key,
                        source: remote,
                        logins: Vec::new(),
                    });
                    self.clients.len() - 1
                }
            };
            let client = &mut self.clients[c];
            let msg: Message = ConfigRequest {
                account: client.account.clone(),
                extensions,
            }
            .into();
            let datagram = client
                .request_key
                .seal_to_vec(&msg, txid, Some(client.e_n))
                .expect("seal");
            let sent = AsSent {
                datagram,
                source: remote,
                sealed: true,
                config_of: Some(c),
            };
            self.deliver(what, sent, false, false);
        }

        fn login_request(
            &mut self,
            what: &str,
            client: u8,
            proof: Proof,
            txid: Option<u32>,
            source: Option<Source>,
        ) {
            let n = self.clients.len();
            let pick = (n > 0).then(|| usize::from(client) % n);
            let Some((c, Some(l))) = pick.map(|c| (c, self.clients[c].logins.len().checked_sub(1)))
            else {
                // No login to send it under: a key ID the AS never gave out.
                let msg: Message = LoginRequest {
                    proof: [0x42; 32],
                    extensions: Extensions::none(),
                }
                .into();
                let key_id = 0x7700_0000 | u32::from(client);
                let mut k = SignalingKey::new(&SecretKey::from_bytes([0x77; 32]), key_id, Role::A);
                let datagram = k.seal_to_vec(&msg, txid.unwrap_or(1), None).expect("seal");
                let remote = source.map_or(self.known[0], |s| resolve(s, &self.known));
                let sent = AsSent {
                    datagram,
                    source: remote,
                    sealed: true,
                    config_of: None,
                };
                return self.deliver(what, sent, false, false);
            };
            let remote = source.map_or(self.clients[c].source, |s| resolve(s, &self.known));
            let client = &mut self.clients[c];
            let known = client.known;
            let login = &mut client.logins[l];
            let proof = match (proof, known) {
                (Proof::Right, Some(_)) => {
                    login.proven = true;
                    self.proven.insert(client.account.clone());
                    let record = &as_config().accounts[&client.account];
                    login_proof(&record.auth_key, &login.transcript)
                }
                (Proof::Right, None) => {
                    login_proof(&SecretKey::from_bytes([0; 32]), &login.transcript)
                }
                (Proof::Wrong(b), _) => [b; 32],
            };
            let txid = txid.or(login.txids.last().copied()).unwrap_or(0x1234);
            login.txids.push(txid);
            let msg: Message = LoginRequest {
                proof,
                extensions: Extensions::none(),
            }
            .into();
            let datagram = login.key.seal_to_vec(&msg, txid, None).expect("seal");
            let sent = AsSent {
                datagram,
                source: remote,
                sealed: true,
                config_of: None,
            };
            self.deliver(what, sent, false, false);
        }

        fn dc_answer(
            &mut self,
            what: &str,
            dc: usize,
            txid: Txid,
            msg: &Message,
            source: Option<Source>,
        ) {
            let txid = match txid {
                Txid::Outstanding(i) if !self.distributions.is_empty() => {
                    self.distributions[usize::from(i) % self.distributions.len()].1
                }
                Txid::Outstanding(_) => 0,
                Txid::Any(t) => t,
            };
            if matches!(msg, Message::Ack(_)) {
                self.acked.insert((dc, txid));
            }
            let datagram = self.dc_keys[dc].seal_to_vec(msg, txid, None).expect("seal");
            let remote = source.map_or(as_dc_addr(dc), |s| resolve(s, &self.known));
            let sent = AsSent {
                datagram,
                source: remote,
                sealed: true,
                config_of: None,
            };
            self.deliver(what, sent, false, false);
        }

        /// Hands a datagram to the AS at `now`, checks what comes out, fires due timers.
        /// `forged`: the input cannot authenticate (raw bytes, or one byte of a datagram
        /// changed); `replayed`: it is an exact copy of a sealed datagram already delivered.
        fn deliver(&mut self, what: &str, sent: AsSent, forged: bool, replayed: bool) {
            let ctx = AsCtx {
                remote: sent.source,
                input_len: sent.datagram.len(),
                config_of: sent.config_of,
            };
            self.remotes.insert(sent.source);
            let before = self.server.logins_held();
            let mut buf = sent.datagram.clone();
            self.server
                .handle_datagram(self.now, as_addr(), sent.source, &mut buf, &mut self.rng);
            if self.history.len() < MAX_HISTORY
                && !self.history.iter().any(|h| h.datagram == sent.datagram)
            {
                self.history.push(sent);
            }
            let (events, sealed) = self.drain(what, Some(&ctx));
            if forged || replayed {
                assert!(
                    events.is_empty(),
                    "{what}: a replayed or forged input raised {events:?}"
                );
            }
            if forged || (replayed && ctx.config_of.is_none()) {
                assert_eq!(
                    self.server.logins_held(),
                    before,
                    "{what}: an input that cannot authenticate changed the logins held"
                );
                assert_eq!(
                    sealed, 0,
                    "{what}: an input that cannot authenticate was answered sealed"
                );
            }
            let now = self.now;
            self.run_timers(what, now);
        }

        /// Fires every deadline up to `target`, each at its time, then sets the clock there.
        fn run_timers(&mut self, what: &str, target: Time) {
            for _ in 0..MAX_TIMER_STEPS {
                let Some((t, label)) = self.server.poll_timeout() else {
                    self.now = target;
                    return;
                };
                if t > target {
                    self.now = target;
                    return;
                }
                let at = t.max(self.now);
                self.now = at;
                self.server.handle_timeout(at, &mut self.rng);
                self.drain(&format!("{what}, timer {label} at {at}"), None);
                if let Some((next, next_label)) = self.server.poll_timeout() {
                    assert!(
                        next > at,
                        "{what}: after handle_timeout({at}) for {label} the next deadline is \
                         {next} ({next_label}): no progress"
                    );
                }
            }
            panic!("{what}: more than {MAX_TIMER_STEPS} timer firings before {target}");
        }

        /// Drains events, then transmits, checking each; returns the events and the number of
        /// sealed datagrams.
        fn drain(&mut self, what: &str, ctx: Option<&AsCtx>) -> (Vec<AsEvent>, usize) {
            let limits = as_config().limits;
            let mut events = Vec::new();
            while let Some(e) = self.server.poll_event() {
                self.check_event(what, &e);
                events.push(e);
                assert!(
                    events.len() <= limits.max_queued_events,
                    "{what}: more events than the queue holds"
                );
            }
            let mut buf = [0u8; TRANSMIT_BUF];
            let mut sealed = 0;
            let mut n = 0;
            while let Some(t) = self.server.poll_transmit(self.now, &mut buf) {
                n += 1;
                assert!(
                    n <= limits.max_queued_transmits,
                    "{what}: more datagrams than the queue holds"
                );
                assert!(t.len <= buf.len(), "{what}: a length beyond the buffer");
                let d = buf[..t.len].to_vec();
                let h = check_form(what, &d);
                if h.sealed {
                    sealed += 1;
                }
                self.check_transmit(what, t.src, t.dst, d, &h, ctx);
            }
            assert!(
                self.server.logins_held() <= limits.max_logins,
                "{what}: {} logins held, limit {}",
                self.server.logins_held(),
                limits.max_logins
            );
            (events, sealed)
        }

        fn check_event(&mut self, what: &str, e: &AsEvent) {
            match e {
                AsEvent::LoginSucceeded {
                    account,
                    node_fqdn,
                    session_key_id,
                } => {
                    assert!(
                        self.proven.contains(account),
                        "{what}: {account:?} logged in without a right proof"
                    );
                    let record = &as_config().accounts[account];
                    assert_eq!(&record.node_fqdn, node_fqdn, "{what}: the wrong node name");
                    let dc = ACCOUNTS
                        .iter()
                        .find(|a| a.0 == account.as_str())
                        .map(|a| a.2)
                        .expect("a configured account");
                    let acked = self
                        .distributions
                        .iter()
                        .any(|(d, txid, key_id, _, subject)| {
                            *d == dc
                                && key_id == session_key_id
                                && subject == node_fqdn
                                && self.acked.contains(&(dc, *txid))
                        });
                    assert!(
                        acked,
                        "{what}: a login succeeded before its DC acknowledged the key"
                    );
                }
                AsEvent::LoginFailed { account, reason } => {
                    let known = as_config().accounts.contains_key(account);
                    match reason {
                        FailureReason::WrongPassword => assert!(known, "{what}: {e:?}"),
                        FailureReason::UnknownAccount => assert!(!known, "{what}: {e:?}"),
                        _ => {}
                    }
                }
                AsEvent::SequenceReserved {
                    key_id, through, ..
                } => {
                    let i = AS_DC_KEY_IDS
                        .iter()
                        .position(|k| k == key_id)
                        .unwrap_or_else(|| panic!("{what}: a reservation under key {key_id}"));
                    assert!(
                        *through > self.reserved[i],
                        "{what}: the reservation went from {} to {through}",
                        self.reserved[i]
                    );
                    self.reserved[i] = *through;
                }
                other => panic!("{what}: an event the AS does not raise: {other:?}"),
            }
        }

        fn check_transmit(
            &mut self,
            what: &str,
            src: Option<SocketAddr>,
            dst: SocketAddr,
            mut d: Vec<u8>,
            h: &Header,
            ctx: Option<&AsCtx>,
        ) {
            let to_dc = h.msg_type == MessageType::KeyDistribution;
            if to_dc {
                let i = AS_DC_KEY_IDS
                    .iter()
                    .position(|k| *k == h.envelope.key_id)
                    .unwrap_or_else(|| panic!("{what}: KEY_DISTRIBUTION under {h:?}"));
                assert_eq!(
                    dst,
                    as_dc_addr(i),
                    "{what}: KEY_DISTRIBUTION to the wrong DC"
                );
                assert!(
                    h.envelope.seq < self.reserved[i],
                    "{what}: sequence number {} sent before its reservation (through {})",
                    h.envelope.seq,
                    self.reserved[i]
                );
                let (h2, msg) = self.dc_keys[i].open(&mut d).unwrap_or_else(|e| {
                    panic!("{what}: the DC cannot open the AS's datagram: {e}")
                });
                let Message::KeyDistribution(kd) = msg else {
                    panic!("{what}: {msg:?} to a DC");
                };
                assert_eq!(kd.key_role, KeyRole::NodeDc, "{what}");
                let proven = ACCOUNTS.iter().any(|(a, node, dc)| {
                    *dc == i
                        && *node == kd.subject.as_str()
                        && self.proven.contains(&Account::new(a).expect("account"))
                });
                assert!(
                    proven,
                    "{what}: a key for {} distributed without a right proof",
                    kd.subject.as_str()
                );
                let txid = h2.envelope.txid;
                match self.distributions.iter().find(|x| x.0 == i && x.1 == txid) {
                    Some((_, _, key_id, key, subject)) => {
                        assert!(
                            *key_id == kd.new_key_id
                                && key.expose() == kd.key.expose()
                                && *subject == kd.subject,
                            "{what}: a retransmission changed the KEY_DISTRIBUTION"
                        );
                    }
                    None => self
                        .distributions
                        .push((i, txid, kd.new_key_id, kd.key, kd.subject)),
                }
                return;
            }
            assert!(
                self.remotes.contains(&dst),
                "{what}: a datagram to {dst}, which never sent anything"
            );
            assert_eq!(
                src,
                Some(as_addr()),
                "{what}: an answer not from where asked"
            );
            let unauthenticated_answer = !h.sealed || h.msg_type == MessageType::ConfigResponse;
            if let (true, Some(c)) = (unauthenticated_answer, ctx) {
                if dst == c.remote {
                    assert!(
                        d.len() <= c.input_len,
                        "{what}: a {}-byte {} answers a {}-byte datagram",
                        d.len(),
                        h.msg_type.name(),
                        c.input_len
                    );
                }
            }
            if !h.sealed {
                return;
            }
            match h.msg_type {
                MessageType::ConfigResponse => {
                    let c = ctx
                        .and_then(|c| c.config_of.map(|i| (i, c.remote)))
                        .unwrap_or_else(|| {
                            panic!("{what}: a CONFIG_RESPONSE to no CONFIG_REQUEST")
                        });
                    assert_eq!(dst, c.1, "{what}: a CONFIG_RESPONSE to the wrong address");
                    self.on_config_response(what, c.0, &mut d, h);
                }
                MessageType::LoginResponse | MessageType::Error => {
                    let key_id = h.envelope.key_id;
                    let login = self
                        .clients
                        .iter_mut()
                        .flat_map(|c| {
                            let account = c.account.clone();
                            c.logins.iter_mut().map(move |l| (account.clone(), l))
                        })
                        .find(|(_, l)| l.login_id == key_id);
                    let Some((account, login)) = login else {
                        panic!(
                            "{what}: a sealed {} under login {key_id}, which no client has",
                            h.msg_type.name()
                        );
                    };
                    let (h2, msg) = login.key.open(&mut d).unwrap_or_else(|e| {
                        panic!("{what}: the client cannot open the AS's answer: {e}")
                    });
                    assert!(
                        login.txids.contains(&h2.envelope.txid),
                        "{what}: answers no LOGIN_REQUEST"
                    );
                    match msg {
                        Message::LoginResponse(r) => {
                            assert!(
                                login.proven,
                                "{what}: a LOGIN_RESPONSE without a right proof"
                            );
                            let record = &as_config().accounts[&account];
                            assert_eq!(r.node_fqdn, record.node_fqdn, "{what}");
                            assert_eq!(r.dc_fqdn, record.dc, "{what}");
                            let dist = self
                                .distributions
                                .iter()
                                .find(|x| x.2 == r.session_key_id && x.4 == r.node_fqdn);
                            let Some((_, _, _, key, _)) = dist else {
                                panic!("{what}: a LOGIN_RESPONSE for a key no DC was given");
                            };
                            assert_eq!(
                                key.expose(),
                                r.node_dc_key.expose(),
                                "{what}: the node and the DC got different keys"
                            );
                        }
                        Message::Error(e) => {
                            assert_eq!(e.failed_type, MessageType::LoginRequest.to_u8(), "{what}");
                        }
                        other => panic!("{what}: {other:?}"),
                    }
                }
                other => panic!("{what}: the AS sent a {}", other.name()),
            }
        }

        fn on_config_response(&mut self, what: &str, c: usize, d: &mut [u8], h: &Header) {
            let as_public = self.as_public;
            let fake_salt = self.server.fake_salt(&self.clients[c].account);
            let client = &mut self.clients[c];
            let e_as = h
                .envelope
                .ephemeral
                .unwrap_or_else(|| panic!("{what}: a CONFIG_RESPONSE without E_as"));
            let key = config_response_key(&client.dh_es, &client.e_n, &as_public, &e_as);
            let (_, msg) = SignalingKey::new(&key, 0, Role::A)
                .open(d)
                .unwrap_or_else(|e| {
                    panic!("{what}: the client cannot open its CONFIG_RESPONSE: {e}")
                });
            let Message::ConfigResponse(r) = msg else {
                panic!("{what}: {msg:?}");
            };
            let (salt, iterations) = match client.known {
                Some(_) => {
                    let record = &as_config().accounts[&client.account];
                    (record.salt, record.iterations)
                }
                None => (fake_salt, as_config().default_iterations),
            };
            assert_eq!(
                (r.salt, r.iterations),
                (salt, iterations),
                "{what}: the wrong salt or iterations for {:?}",
                client.account
            );
            if client.logins.iter().any(|l| l.login_id == r.login_id) {
                return; // the same pending login, answered again
            }
            let dh_ee = x25519(&client.e_n_secret, &e_as)
                .unwrap_or_else(|e| panic!("{what}: E_as is unusable: {e}"));
            let transcript = login_transcript(
                &client.e_n,
                &e_as,
                &r.challenge,
                r.login_id,
                client.account.as_str().as_bytes(),
            );
            let key = SignalingKey::new(
                &login_key(&client.dh_es, &dh_ee, &transcript),
                r.login_id,
                Role::A,
            );
            client.logins.push(LoginSide {
                login_id: r.login_id,
                key,
                transcript,
                txids: Vec::new(),
                proven: false,
            });
        }
    }

    // -- The direction coordinator --------------------------------------------------------------

    const DC_AS_KEY_ID: u32 = 17;
    const ESTABLISHED: [(u32, &str); 2] = [(0x1001, "n0.dc1.example"), (0x1002, "n1.dc1.example")];
    const OUTSIDE: [&str; 5] = [
        "dc1.example",
        "a.n0.dc1.example",
        "n0.dc2.example",
        "example",
        "n0.dc1.example.evil",
    ];

    fn dc_addrs() -> [SocketAddr; 2] {
        [v4([203, 0, 113, 10], 4281), v4([203, 0, 113, 11], 4281)]
    }

    fn dc_as_addr() -> SocketAddr {
        v4([203, 0, 113, 2], 4280)
    }

    fn dc_as_key() -> SecretKey {
        SecretKey::from_bytes([0x4a; 32])
    }

    fn node_name(i: u8) -> Fqdn {
        Fqdn::new(&format!("n{}.dc1.example", i % 6)).expect("name")
    }

    /// The DC every input starts with: two addresses, pools of two pairs, small tables.
    fn dc_config() -> DcConfig {
        let mut c = DcConfig::new(
            Fqdn::new("dc1.example").expect("zone"),
            dc_addrs().to_vec(),
            dc_as_key(),
            DC_AS_KEY_ID,
            VirtualPools {
                v4: Ipv4Addr::new(100, 64, 1, 0),
                v4_prefix_len: 30,
                v6: "fd4e:544d:0:1::".parse().expect("prefix"),
            },
        );
        c.limits = DcLimits {
            max_nodes: 4,
            max_pending_sessions: 3,
            unsealed_errors_per_second: 3,
            max_tracked_prefixes: 3,
            max_queued_transmits: 8,
            max_queued_events: 6,
            sequence_block: 3,
            ..DcLimits::default()
        };
        c
    }

    /// A node's end of its session, as the harness plays it.
    struct NodeEnd {
        key_id: u32,
        fqdn: Fqdn,
        /// Seals the node's messages (replaced when a sequence gap is made).
        seal: SignalingKey,
        /// Opens the DC's answers (its window refuses a sequence number used twice).
        open: SignalingKey,
        home: SocketAddr,
        reg_txid: Option<u32>,
        distribution_txid: u32,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Origin {
        Raw,
        As,
        /// Sealed under this key ID, when its distribution had been acknowledged `epoch` times.
        Node {
            key_id: u32,
            epoch: u32,
        },
    }

    #[derive(Clone)]
    struct DcSent {
        datagram: Vec<u8>,
        source: SocketAddr,
        origin: Origin,
        delivered: bool,
    }

    /// What the DC holds, as its public getters show it.
    #[derive(Debug, PartialEq, Eq)]
    struct DcSnapshot {
        known: usize,
        registered: usize,
        sessions: usize,
        registrations: Vec<Option<RegisteredNode>>,
    }

    struct DcCtx {
        what: String,
        local: SocketAddr,
        remote: SocketAddr,
        input_len: usize,
        origin: Origin,
        /// For a KEY_DISTRIBUTION: (key ID, key, subject, txid).
        kd: Option<(u32, SecretKey, Fqdn, u32)>,
    }

    struct DcBench {
        dc: DirectionCoordinator,
        rng: ChaCha8Rng,
        mine: ChaCha8Rng,
        now: Time,
        known: [SocketAddr; 8],
        as_key: SignalingKey,
        /// The one key the harness uses with each key ID.
        keys: BTreeMap<u32, SecretKey>,
        /// Acknowledged distributions per key ID.
        epochs: BTreeMap<u32, u32>,
        nodes: Vec<NodeEnd>,
        /// Every subject ever distributed: the only names the DC can know.
        names: BTreeSet<Fqdn>,
        /// Every pair the DC has shown, per name: never to change.
        pairs: BTreeMap<Fqdn, VirtualAddrs>,
        remotes: BTreeSet<SocketAddr>,
        history: Vec<DcSent>,
        reserved: u64,
    }

    /// Runs up to [`MAX_OPS`] operations against one [`DirectionCoordinator`] that holds keys
    /// for two nodes. Checks after each: every datagram parses, is at most 1232 bytes and is
    /// sent from the address asked to an address that sent something; every sealed answer opens
    /// (once) under the key the harness holds and reports the right pair and observed address;
    /// the AS's KEY_DISTRIBUTION is always answered; inputs that cannot authenticate, and
    /// replays, change nothing; timers send nothing and make progress; `nodes_registered`,
    /// `nodes_known` and the sessions stay within the limits; a node's pair never changes once
    /// assigned, lies in the pools and is never shared; every registration outlives `now`.
    pub fn dc_ops(data: &[u8]) {
        let (seed, ops) = decode::<DcOp>(data);
        let mut b = DcBench::new(seed);
        for (i, op) in ops.into_iter().enumerate() {
            let what = describe(i, &op, |op| match op {
                DcOp::Raw { source, data, .. } => Some((*source, data.len())),
                _ => None,
            });
            b.apply(&what, op);
        }
    }

    impl DcBench {
        fn new(seed: u64) -> Self {
            let dc = DirectionCoordinator::new(dc_config()).expect("DC configuration");
            let mut b = DcBench {
                dc,
                rng: ChaCha8Rng::seed_from_u64(seed),
                mine: ChaCha8Rng::seed_from_u64(seed ^ 0x6861_726e_6573_7321),
                now: Time::from_secs(1),
                known: known_sources(dc_as_addr(), dc_addrs()[0]),
                as_key: SignalingKey::new(&dc_as_key(), DC_AS_KEY_ID, Role::A),
                keys: BTreeMap::new(),
                epochs: BTreeMap::new(),
                nodes: Vec::new(),
                names: BTreeSet::new(),
                pairs: BTreeMap::new(),
                remotes: BTreeSet::new(),
                history: Vec::new(),
                reserved: 0,
            };
            // The established state: the AS has handed the DC keys for two nodes.
            for (i, (key_id, name)) in ESTABLISHED.iter().enumerate() {
                let kd = Distribution {
                    role: None,
                    key_id: KeyId::Fresh(*key_id),
                    lifetime: Lifetime::Day,
                    subject: Name::Node(i as u8),
                    txid: Some(*key_id),
                };
                let what = format!("setup: the key of {name}");
                b.key_distribution(&what, kd, None, 0);
                assert_eq!(b.nodes.len(), i + 1, "{what}: not acknowledged");
            }
            b.history.clear();
            b
        }

        fn apply(&mut self, what: &str, op: DcOp) {
            match op {
                DcOp::Raw {
                    source,
                    local,
                    mut data,
                } => {
                    data.truncate(MAX_RAW_LEN);
                    let remote = resolve(source, &self.known);
                    self.deliver_copy(what, data, remote, local);
                }
                DcOp::Node {
                    node,
                    msg,
                    source,
                    local,
                    skip,
                    hold,
                } => self.node_message(what, node, msg, source, local, skip, hold),
                DcOp::As { kd, source, local } => self.key_distribution(what, kd, source, local),
                DcOp::Replay {
                    index,
                    source,
                    local,
                } => {
                    let Some(sent) = self.pick(index) else {
                        return;
                    };
                    let remote = source.map_or(sent.source, |s| resolve(s, &self.known));
                    self.deliver_copy(what, sent.datagram, remote, local);
                }
                DcOp::Mutate {
                    index,
                    pos,
                    xor,
                    local,
                } => {
                    let Some(mut sent) = self.pick(index) else {
                        return;
                    };
                    if sent.datagram.is_empty() {
                        return;
                    }
                    let at = usize::from(pos) % sent.datagram.len();
                    sent.datagram[at] ^= xor.max(1);
                    self.deliver_copy(what, sent.datagram, sent.source, local);
                }
                DcOp::Advance(s) => {
                    let target = self.now + step(s);
                    self.run_timers(what, target);
                }
            }
        }

        fn pick(&self, index: u8) -> Option<DcSent> {
            let n = self.history.len();
            (n > 0).then(|| self.history[usize::from(index) % n].clone())
        }

        /// Delivers bytes that are no new seal: an exact copy of a datagram the harness sealed
        /// (which a changed byte may also turn back into) is that datagram again, delivered for
        /// the first time if it was held, else a replay; anything else cannot authenticate.
        fn deliver_copy(&mut self, what: &str, datagram: Vec<u8>, source: SocketAddr, local: u8) {
            let genuine = self
                .history
                .iter()
                .position(|h| h.origin != Origin::Raw && h.datagram == datagram);
            let Some(j) = genuine else {
                let sent = DcSent {
                    datagram,
                    source,
                    origin: Origin::Raw,
                    delivered: true,
                };
                return self.deliver(what, sent, local, None, true);
            };
            let mut sent = self.history[j].clone();
            let replayed = sent.delivered
                && match sent.origin {
                    Origin::Raw | Origin::As => true,
                    Origin::Node { key_id, epoch } => {
                        self.epochs.get(&key_id).copied().unwrap_or(0) == epoch
                    }
                };
            self.history[j].delivered = true;
            sent.delivered = true;
            sent.source = source;
            self.deliver(what, sent, local, None, replayed);
        }

        fn resolve_name(&self, name: Name, own: &Fqdn) -> Fqdn {
            match name {
                Name::Own => own.clone(),
                Name::Other => {
                    let n0 = node_name(0);
                    if *own == n0 {
                        node_name(1)
                    } else {
                        n0
                    }
                }
                Name::Node(i) => node_name(i),
                Name::Outside(i) => {
                    Fqdn::new(OUTSIDE[usize::from(i) % OUTSIDE.len()]).expect("name")
                }
            }
        }

        fn key_distribution(
            &mut self,
            what: &str,
            kd: Distribution,
            source: Option<Source>,
            local: u8,
        ) {
            let session = match kd.key_id {
                KeyId::Session(i) if !self.nodes.is_empty() => {
                    Some(usize::from(i) % self.nodes.len())
                }
                _ => None,
            };
            let (key_id, own, last_txid) = match (kd.key_id, session) {
                (_, Some(s)) => {
                    let n = &self.nodes[s];
                    (n.key_id, n.fqdn.clone(), n.distribution_txid)
                }
                (KeyId::Fresh(id), None) => (id, node_name(2), 0),
                (KeyId::Session(i), None) => (u32::from(i), node_name(2), 0),
            };
            let subject = self.resolve_name(kd.subject, &own);
            let mine = &mut self.mine;
            let key = self
                .keys
                .entry(key_id)
                .or_insert_with(|| SecretKey::from_bytes(fresh_key(mine)))
                .clone();
            let txid = kd.txid.unwrap_or(last_txid);
            let key_role = match kd.role {
                None => KeyRole::NodeDc,
                Some(r) => KeyRole::ALL[usize::from(r) % KeyRole::ALL.len()],
            };
            let lifetime_s = match kd.lifetime {
                Lifetime::Day => 86_400,
                Lifetime::Secs(s) => u32::from(s),
            };
            let msg: Message = KeyDistribution {
                key_role,
                new_key_id: key_id,
                key: key.clone(),
                lifetime_s,
                subject: subject.clone(),
                extensions: Extensions::none(),
            }
            .into();
            self.names.insert(subject.clone());
            let datagram = self.as_key.seal_to_vec(&msg, txid, None).expect("seal");
            let sent = DcSent {
                datagram,
                source: source.map_or(dc_as_addr(), |s| resolve(s, &self.known)),
                origin: Origin::As,
                delivered: true,
            };
            self.deliver(what, sent, local, Some((key_id, key, subject, txid)), false);
        }

        #[allow(clippy::too_many_arguments)]
        fn node_message(
            &mut self,
            what: &str,
            node: u8,
            msg: NodeMsg,
            source: Option<Source>,
            local: u8,
            skip: Option<u8>,
            hold: bool,
        ) {
            let i = usize::from(node) % self.nodes.len();
            let remote = source.map_or(self.nodes[i].home, |s| resolve(s, &self.known));
            let own = self.nodes[i].fqdn.clone();
            let (message, txid) = match msg {
                NodeMsg::Register {
                    name,
                    addrs,
                    addr,
                    nat,
                    public_key,
                    notify,
                    txid,
                } => {
                    let local_addrs = addr
                        .iter()
                        .take(usize::from(addrs % 4))
                        .map(|a| {
                            TransportAddr::new(match *a {
                                Addr::Source => remote,
                                Addr::Known(k) => self.known[usize::from(k) % self.known.len()],
                                Addr::V4(a, p) => SocketAddr::from((Ipv4Addr::from(a), p)),
                                Addr::V6(a, p) => SocketAddr::from((Ipv6Addr::from(a), p)),
                            })
                        })
                        .collect();
                    let txid = txid.or(self.nodes[i].reg_txid).unwrap_or(1);
                    self.nodes[i].reg_txid = Some(txid);
                    let m: Message = RegistrationRequest {
                        node_fqdn: self.resolve_name(name, &own),
                        local_addrs: AddrList::new(local_addrs).expect("at most 3"),
                        nat_mapping: NatBehaviour::ALL[usize::from(nat) % NatBehaviour::ALL.len()],
                        node_public_key: [public_key; 32],
                        wants_notification: notify,
                        extensions: Extensions::none(),
                    }
                    .into();
                    (m, txid)
                }
                NodeMsg::Keepalive { reply, txid } => {
                    let m: Message = Keepalive {
                        reply_requested: reply,
                        extensions: Extensions::none(),
                    }
                    .into();
                    (m, txid)
                }
            };
            let n = &mut self.nodes[i];
            if let Some(k) = skip.filter(|k| *k > 0) {
                let key = self.keys[&n.key_id].clone();
                let next = n.seal.next_seq() + u64::from(k);
                n.seal = SignalingKey::resume(&key, n.key_id, Role::A, next, 1);
            }
            let datagram = n.seal.seal_to_vec(&message, txid, None).expect("seal");
            let origin = Origin::Node {
                key_id: n.key_id,
                epoch: self.epochs.get(&n.key_id).copied().unwrap_or(0),
            };
            let sent = DcSent {
                datagram,
                source: remote,
                origin,
                delivered: !hold,
            };
            if hold {
                if self.history.len() < MAX_HISTORY {
                    self.history.push(sent);
                }
                return;
            }
            self.deliver(what, sent, local, None, false);
        }

        fn snapshot(&self) -> DcSnapshot {
            DcSnapshot {
                known: self.dc.nodes_known(),
                registered: self.dc.nodes_registered(),
                sessions: self.dc.sessions_held(),
                registrations: self.names.iter().map(|n| self.dc.registration(n)).collect(),
            }
        }

        /// Hands a datagram to the DC at `now`, checks what comes out, fires due timers.
        /// `unchanged`: the input must change nothing (it cannot authenticate, or is a replay).
        fn deliver(
            &mut self,
            what: &str,
            sent: DcSent,
            local: u8,
            kd: Option<(u32, SecretKey, Fqdn, u32)>,
            unchanged: bool,
        ) {
            let local = dc_addrs()[usize::from(local) % 2];
            let ctx = DcCtx {
                what: what.to_owned(),
                local,
                remote: sent.source,
                input_len: sent.datagram.len(),
                origin: sent.origin,
                kd,
            };
            self.remotes.insert(sent.source);
            let before = unchanged.then(|| self.snapshot());
            let mut buf = sent.datagram.clone();
            self.dc
                .handle_datagram(self.now, local, sent.source, &mut buf, &mut self.rng);
            if self.history.len() < MAX_HISTORY
                && !self.history.iter().any(|h| h.datagram == sent.datagram)
            {
                self.history.push(sent);
            }
            let (events, sealed) = self.drain(&ctx);
            if let Some(before) = before {
                assert!(
                    events.is_empty(),
                    "{what}: a replayed or forged input raised {events:?}"
                );
                assert_eq!(
                    sealed, 0,
                    "{what}: a replayed or forged input was answered sealed"
                );
                assert_eq!(
                    before,
                    self.snapshot(),
                    "{what}: a replayed or forged input changed the DC"
                );
            }
            let now = self.now;
            self.run_timers(what, now);
        }

        fn run_timers(&mut self, what: &str, target: Time) {
            for _ in 0..MAX_TIMER_STEPS {
                let Some((t, label)) = self.dc.poll_timeout() else {
                    break;
                };
                if t > target {
                    break;
                }
                let at = t.max(self.now);
                self.now = at;
                self.dc.handle_timeout(at, &mut self.rng);
                let mut buf = [0u8; TRANSMIT_BUF];
                assert!(
                    self.dc.poll_transmit(at, &mut buf).is_none(),
                    "{what}: the DC sent something on a timer ({label})"
                );
                while let Some(e) = self.dc.poll_event() {
                    assert!(
                        matches!(e, DcEvent::NodeExpired { .. }),
                        "{what}: {e:?} on a timer ({label})"
                    );
                }
                if let Some((next, next_label)) = self.dc.poll_timeout() {
                    assert!(
                        next > at,
                        "{what}: after handle_timeout({at}) for {label} the next deadline is \
                         {next} ({next_label}): no progress"
                    );
                }
                self.check_state(what);
            }
            if let Some((t, _)) = self.dc.poll_timeout() {
                assert!(
                    t > target,
                    "{what}: more than {MAX_TIMER_STEPS} timer firings"
                );
            }
            self.now = target;
            self.check_state(what);
        }

        /// The bounds and the virtual pairs.
        fn check_state(&mut self, what: &str) {
            let limits = self.dc.config().limits;
            let pools = self.dc.config().pools;
            let known = self.dc.nodes_known();
            assert!(known <= limits.max_nodes, "{what}: {known} nodes known");
            assert!(
                known <= self.names.len(),
                "{what}: nodes nobody distributed a key for"
            );
            let registered = self.dc.nodes_registered();
            assert!(
                registered <= limits.max_nodes,
                "{what}: {registered} nodes registered"
            );
            assert!(
                self.dc.sessions_held() <= limits.max_pending_sessions + known,
                "{what}: {} sessions held",
                self.dc.sessions_held()
            );
            let mut count = 0;
            let mut used = BTreeMap::new();
            for name in &self.names {
                let v = self.dc.virtual_addrs(name);
                match (v, self.pairs.get(name)) {
                    (Some(v), Some(old)) => {
                        assert_eq!(v, *old, "{what}: the pair of {} changed", name.as_str())
                    }
                    (None, Some(_)) => panic!("{what}: {} lost its pair", name.as_str()),
                    (Some(v), None) => {
                        assert!(
                            pools.number_of(v).is_some(),
                            "{what}: {v:?} is not in the pools"
                        );
                        self.pairs.insert(name.clone(), v);
                    }
                    (None, None) => {}
                }
                if let Some(v) = v {
                    if let Some(other) = used.insert(v, name) {
                        panic!(
                            "{what}: {} and {} share {v:?}",
                            other.as_str(),
                            name.as_str()
                        );
                    }
                }
                if let Some(r) = self.dc.registration(name) {
                    count += 1;
                    assert_eq!(Some(r.vaddrs), v, "{what}: registration and pair disagree");
                    assert_eq!(&r.fqdn, name, "{what}");
                    assert!(
                        !r.local_addrs.is_empty(),
                        "{what}: registered without an address"
                    );
                    assert!(
                        r.expires > self.now,
                        "{what}: a registration outlived {:?}",
                        r.expires
                    );
                }
            }
            assert_eq!(
                count, registered,
                "{what}: nodes_registered disagrees with the registrations"
            );
            let [a, b] = [0, 1].map(|i| self.dc.registration(&node_name(i)).map(|r| r.vaddrs));
            if let (Some(a), Some(b)) = (a, b) {
                assert_ne!(a, b, "{what}: the two nodes share a pair");
            }
        }

        /// Drains events, then transmits, checking each; returns the events and the number of
        /// sealed datagrams.
        fn drain(&mut self, ctx: &DcCtx) -> (Vec<DcEvent>, usize) {
            let what = ctx.what.as_str();
            let limits = self.dc.config().limits;
            let mut events = Vec::new();
            while let Some(e) = self.dc.poll_event() {
                match &e {
                    DcEvent::NodeRegistered {
                        fqdn,
                        vip4,
                        vip6,
                        observed,
                    } => {
                        let v = VirtualAddrs {
                            v4: *vip4,
                            v6: *vip6,
                        };
                        assert_eq!(self.dc.virtual_addrs(fqdn), Some(v), "{what}: {e:?}");
                        assert_eq!(*observed, ctx.remote, "{what}: {e:?}");
                    }
                    DcEvent::NodeDeregistered { fqdn } | DcEvent::NodeExpired { fqdn } => {
                        assert!(self.names.contains(fqdn), "{what}: {e:?}");
                    }
                    DcEvent::SequenceReserved { key_id, through } => {
                        assert_eq!(*key_id, DC_AS_KEY_ID, "{what}");
                        assert!(
                            *through > self.reserved,
                            "{what}: {e:?} after {}",
                            self.reserved
                        );
                        self.reserved = *through;
                    }
                    other => panic!("{what}: an event the DC does not raise: {other:?}"),
                }
                events.push(e);
                assert!(
                    events.len() <= limits.max_queued_events,
                    "{what}: too many events"
                );
            }
            let mut buf = [0u8; TRANSMIT_BUF];
            let mut sealed = 0;
            let mut answers = 0;
            while let Some(t) = self.dc.poll_transmit(self.now, &mut buf) {
                answers += 1;
                assert!(
                    answers <= limits.max_queued_transmits,
                    "{what}: too many datagrams"
                );
                let mut d = buf[..t.len].to_vec();
                let h = check_form(what, &d);
                assert_eq!(
                    t.src,
                    Some(ctx.local),
                    "{what}: an answer not from where asked"
                );
                assert!(
                    self.remotes.contains(&t.dst),
                    "{what}: a datagram to {}",
                    t.dst
                );
                assert_eq!(t.dst, ctx.remote, "{what}: an answer to somebody else");
                if !h.sealed {
                    assert!(
                        d.len() <= ctx.input_len,
                        "{what}: an amplifying unsealed ERROR"
                    );
                    continue;
                }
                sealed += 1;
                match ctx.origin {
                    Origin::As => self.on_as_answer(ctx, &mut d),
                    Origin::Node { key_id, .. } => {
                        assert_eq!(
                            h.envelope.key_id, key_id,
                            "{what}: answered under another key"
                        );
                        self.on_node_answer(ctx, key_id, &mut d);
                    }
                    Origin::Raw => panic!("{what}: a sealed answer to raw bytes: {h:?}"),
                }
            }
            if ctx.kd.is_some() {
                assert_eq!(
                    answers, 1,
                    "{what}: a KEY_DISTRIBUTION got {answers} answers"
                );
            }
            (events, sealed)
        }

        fn on_as_answer(&mut self, ctx: &DcCtx, d: &mut [u8]) {
            let what = ctx.what.as_str();
            let (h, msg) = self
                .as_key
                .open(d)
                .unwrap_or_else(|e| panic!("{what}: the AS cannot open the DC's answer: {e}"));
            assert!(
                h.envelope.seq < self.reserved,
                "{what}: sequence number {} sent before its reservation (through {})",
                h.envelope.seq,
                self.reserved
            );
            let Some((key_id, key, subject, txid)) = ctx.kd.clone() else {
                panic!("{what}: an answer under the AS key to no KEY_DISTRIBUTION");
            };
            assert_eq!(h.envelope.txid, txid, "{what}: the wrong transaction");
            match msg {
                Message::Ack(a) => {
                    assert_eq!(a.acked_type, MessageType::KeyDistribution.to_u8(), "{what}");
                    *self.epochs.entry(key_id).or_insert(0) += 1;
                    if let Some(n) = self.nodes.iter_mut().find(|n| n.key_id == key_id) {
                        // Installed again (a fresh window at the DC) or retransmitted: either
                        // way the DC now holds this key for this subject.
                        n.fqdn = subject;
                        n.open = SignalingKey::new(&key, key_id, Role::A);
                        n.distribution_txid = txid;
                    } else if self.nodes.len() < MAX_NODE_ENDS {
                        let home = match self.nodes.len() {
                            0 => self.known[0],
                            1 => self.known[1],
                            i => self.known[i % 6],
                        };
                        self.nodes.push(NodeEnd {
                            key_id,
                            fqdn: subject,
                            seal: SignalingKey::new(&key, key_id, Role::A),
                            open: SignalingKey::new(&key, key_id, Role::A),
                            home,
                            reg_txid: None,
                            distribution_txid: txid,
                        });
                    }
                }
                Message::Error(e) => {
                    assert_eq!(
                        e.failed_type,
                        MessageType::KeyDistribution.to_u8(),
                        "{what}"
                    );
                }
                other => panic!("{what}: the DC answered the AS with {other:?}"),
            }
        }

        fn on_node_answer(&mut self, ctx: &DcCtx, key_id: u32, d: &mut [u8]) {
            let what = ctx.what.as_str();
            let Some(n) = self.nodes.iter_mut().find(|n| n.key_id == key_id) else {
                panic!("{what}: an answer under key {key_id}, which no node holds");
            };
            let (_, msg) = n
                .open
                .open(d)
                .unwrap_or_else(|e| panic!("{what}: the node cannot open the DC's answer: {e}"));
            let fqdn = n.fqdn.clone();
            match msg {
                Message::RegistrationResponse(r) => {
                    let v = VirtualAddrs {
                        v4: r.virtual_v4,
                        v6: r.virtual_v6,
                    };
                    assert_eq!(
                        self.dc.virtual_addrs(&fqdn),
                        Some(v),
                        "{what}: the wrong pair"
                    );
                    assert_eq!(r.observed_addr.socket_addr(), ctx.remote, "{what}");
                }
                Message::KeepaliveReply(r) => {
                    assert_eq!(r.observed_addr.socket_addr(), ctx.remote, "{what}");
                }
                Message::Error(_) => {}
                other => panic!("{what}: the DC answered a node with {other:?}"),
            }
        }
    }
}
