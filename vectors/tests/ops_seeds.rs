//! The seed inputs of the `rs_ops` and `node_ops` fuzz targets, built from named operation
//! sequences: each is encoded the way `arbitrary` decodes it, checked to decode back to the same
//! operations, and compared with its committed file under `fuzz/seeds/TARGET/`. Run with
//! `NTM_WRITE_SEEDS=1` to (re)write the files after changing a sequence or the operations.
//!
//! Also replays the input `node_ops` found a bug with.

use std::path::{Path, PathBuf};

use arbitrary::{Arbitrary, Unstructured};
use vectors::harness::ops::{Endpoint, Lifetime, NodeOp, PathChoice, RsOp, Source, Step};

/// Writes values as `arbitrary` 1.x reads them: integers little-endian from the front, `bool`
/// as a byte, `Option` as a bool then the value, an enum's variant as a `u32` scaled onto the
/// variant count. Vectors (lengths taken from the end) are not supported: seeds avoid them.
#[derive(Default)]
struct Enc(Vec<u8>);

impl Enc {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(u8::from(v))
    }
    fn variant(&mut self, k: u32, n: u32) -> &mut Self {
        let x = (u64::from(k) << 32).div_ceil(u64::from(n));
        self.u32(x as u32)
    }
    fn opt<T>(&mut self, v: Option<T>, f: impl FnOnce(&mut Self, T)) -> &mut Self {
        match v {
            None => self.bool(false),
            Some(x) => {
                self.bool(true);
                f(self, x);
                self
            }
        }
    }
    fn source(&mut self, s: Source) {
        match s {
            Source::Known(i) => self.variant(0, 3).u8(i),
            Source::V4(a, p) => {
                self.variant(1, 3);
                a.iter().for_each(|b| {
                    self.u8(*b);
                });
                self.u16(p)
            }
            Source::V6(a, p) => {
                self.variant(2, 3);
                a.iter().for_each(|b| {
                    self.u8(*b);
                });
                self.u16(p)
            }
        };
    }
    fn step(&mut self, s: Step) {
        match s {
            Step::Millis(n) => self.variant(0, 2).u16(n),
            Step::Seconds(n) => self.variant(1, 2).u16(n),
        };
    }
    fn path(&mut self, p: PathChoice) {
        match p {
            PathChoice::Known(i) => self.variant(0, 2).u8(i),
            PathChoice::Any(id) => self.variant(1, 2).u32(id),
        };
    }
    fn endpoint(&mut self, e: Endpoint) {
        match e {
            Endpoint::Bound(b) => {
                self.variant(0, 3).bool(b);
            }
            Endpoint::Home(b) => {
                self.variant(1, 3).bool(b);
            }
            Endpoint::Source(s) => {
                self.variant(2, 3);
                self.source(s);
            }
        }
    }

    fn rs_op(&mut self, op: &RsOp) {
        match op.clone() {
            RsOp::Raw { .. } | RsOp::Signal { .. } => panic!("seeds avoid vectors"),
            RsOp::Request {
                dc,
                path,
                lifetime,
                rate_kbps,
                again,
                txid,
                source,
                local,
            } => {
                self.variant(1, 8).u8(dc);
                self.path(path);
                match lifetime {
                    Lifetime::Day => self.variant(0, 2),
                    Lifetime::Secs(s) => self.variant(1, 2).u16(s),
                };
                self.u16(rate_kbps).bool(again).u32(txid);
                self.opt(source, |e, s| e.source(s)).u8(local);
            }
            RsOp::Bind {
                path,
                b,
                from,
                local,
                skip,
                hold,
                txid,
            } => {
                self.variant(2, 8);
                self.path(path);
                self.bool(b);
                self.endpoint(from);
                self.u8(local)
                    .opt(skip, |e, s| {
                        e.u8(s);
                    })
                    .bool(hold)
                    .u32(txid);
            }
            RsOp::Data {
                path,
                from,
                local,
                len,
                counter,
                outbox,
            } => {
                self.variant(3, 8);
                self.path(path);
                self.endpoint(from);
                self.u8(local).u16(len).u8(counter).bool(outbox);
            }
            RsOp::Replay { index, from, local } => {
                self.variant(5, 8).u8(index);
                self.opt(from, |e, x| e.endpoint(x)).u8(local);
            }
            RsOp::Mutate { index, pos, xor } => {
                self.variant(6, 8).u8(index).u16(pos).u8(xor);
            }
            RsOp::Advance(s) => {
                self.variant(7, 8);
                self.step(s);
            }
        }
    }

    fn node_op(&mut self, op: &NodeOp) {
        let src = |e: &mut Enc, s: Option<Source>| {
            e.opt(s, |e, s| e.source(s));
        };
        match op.clone() {
            NodeOp::Raw { .. } => panic!("seeds avoid vectors"),
            NodeOp::Direction {
                peer,
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
                self.variant(1, 13).u8(peer);
                self.path(path);
                self.u8(route)
                    .bool(initiator)
                    .u8(reason)
                    .u8(peer_addrs)
                    .u8(relay_addrs)
                    .opt(relay_key, |e, k| {
                        e.bool(k);
                    })
                    .bool(probe_direct)
                    .opt(txid, |e, t| {
                        e.u32(t);
                    });
            }
            NodeOp::Handshake {
                index,
                from,
                low_order,
                hold,
            } => {
                self.variant(2, 13).u8(index);
                src(self, from);
                self.bool(low_order).bool(hold);
            }
            NodeOp::RelayAnswer { index, refuse } => {
                self.variant(3, 13).u8(index).bool(refuse);
            }
            NodeOp::Data {
                index,
                v6,
                inner,
                len,
                counter,
                from,
            } => {
                self.variant(4, 13).u8(index).bool(v6).u8(inner).u16(len);
                self.opt(counter, |e, c| {
                    e.u8(c);
                });
                src(self, from);
            }
            NodeOp::Control {
                index,
                kind,
                reply,
                txid,
                from,
                hold,
            } => {
                self.variant(5, 13).u8(index).u8(kind).bool(reply);
                self.opt(txid, |e, t| {
                    e.u32(t);
                });
                src(self, from);
                self.bool(hold);
            }
            NodeOp::DcAnswer { registration, code } => {
                self.variant(6, 13).bool(registration).opt(code, |e, c| {
                    e.u8(c);
                });
            }
            NodeOp::Resolve { peer } => {
                self.variant(7, 13).u8(peer);
            }
            NodeOp::Encapsulate {
                peer,
                v6,
                own_source,
                len,
            } => {
                self.variant(8, 13)
                    .u8(peer)
                    .bool(v6)
                    .bool(own_source)
                    .u16(len);
            }
            NodeOp::AddressChange { mask } => {
                self.variant(9, 13).u8(mask);
            }
            NodeOp::Replay { index, source } => {
                self.variant(10, 13).u8(index);
                src(self, source);
            }
            NodeOp::Mutate { index, pos, xor } => {
                self.variant(11, 13).u8(index).u16(pos).u8(xor);
            }
            NodeOp::Advance(s) => {
                self.variant(12, 13);
                self.step(s);
            }
        }
    }
}

fn decode<'a, T: Arbitrary<'a>>(data: &'a [u8]) -> (u64, Vec<T>) {
    let mut u = Unstructured::new(data);
    let seed = u64::arbitrary(&mut u).unwrap();
    let mut ops = Vec::new();
    while !u.is_empty() {
        ops.push(T::arbitrary(&mut u).unwrap());
    }
    (seed, ops)
}

fn seeds_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/seeds")
        .join(target)
}

/// Checks (or writes) one seed file.
fn pin(target: &str, name: &str, bytes: &[u8]) {
    let path = seeds_dir(target).join(name);
    if std::env::var_os("NTM_WRITE_SEEDS").is_some() {
        std::fs::create_dir_all(seeds_dir(target)).unwrap();
        std::fs::write(&path, bytes).unwrap();
    }
    let on_disk = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (NTM_WRITE_SEEDS=1 writes it)", path.display()));
    assert_eq!(on_disk, bytes, "{} is stale", path.display());
}

fn rs_seed(name: &str, seed: u64, ops: &[RsOp]) {
    let mut e = Enc::default();
    e.u64(seed);
    ops.iter().for_each(|op| e.rs_op(op));
    assert_eq!(decode::<RsOp>(&e.0), (seed, ops.to_vec()), "{name}");
    vectors::harness::rs_ops(&e.0);
    pin("rs_ops", name, &e.0);
}

fn node_seed(name: &str, seed: u64, ops: &[NodeOp]) {
    let mut e = Enc::default();
    e.u64(seed);
    ops.iter().for_each(|op| e.node_op(op));
    assert_eq!(decode::<NodeOp>(&e.0), (seed, ops.to_vec()), "{name}");
    vectors::harness::node_ops(&e.0);
    pin("node_ops", name, &e.0);
}

fn data(path: u8, from_b: bool, outbox: bool) -> RsOp {
    RsOp::Data {
        path: PathChoice::Known(path),
        from: Endpoint::Bound(from_b),
        local: u8::from(from_b),
        len: 200,
        counter: 1,
        outbox,
    }
}

fn bind(path: u8, b: bool, from: Endpoint, hold: bool, txid: u32) -> RsOp {
    RsOp::Bind {
        path: PathChoice::Known(path),
        b,
        from,
        local: u8::from(b),
        skip: None,
        hold,
        txid,
    }
}

fn request(dc: u8, path: u8, again: bool, txid: u32) -> RsOp {
    RsOp::Request {
        dc,
        path: PathChoice::Known(path),
        lifetime: Lifetime::Secs(300),
        rate_kbps: 0,
        again,
        txid,
        source: None,
        local: 0,
    }
}

#[test]
fn rs_ops_seeds() {
    let moved = Endpoint::Source(Source::Known(1));
    rs_seed(
        "forward_both_ways_and_peer_not_bound",
        1,
        &[
            data(0, false, false),
            data(0, true, true),
            data(0, false, false),
            data(0, false, false),
            data(0, false, false),
            data(1, true, false),
        ],
    );
    rs_seed(
        "rebind_handover_and_stale_bind",
        2,
        &[
            bind(0, false, moved, true, 9),
            bind(0, false, moved, false, 10),
            data(0, true, false),
            RsOp::Replay {
                index: 3,
                from: None,
                local: 0,
            },
            bind(1, false, Endpoint::Bound(true), false, 11),
            bind(1, false, Endpoint::Home(false), false, 12),
            data(1, false, true),
        ],
    );
    rs_seed(
        "authorize_fill_refuse_and_expire",
        3,
        &[
            request(0, 2, false, 30),
            request(0, 2, true, 30),
            request(1, 3, false, 31),
            request(0, 4, false, 32),
            request(2, 4, false, 33),
            bind(2, true, Endpoint::Home(true), false, 5),
            bind(2, false, Endpoint::Home(false), false, 6),
            data(2, false, false),
            RsOp::Advance(Step::Seconds(61)),
            bind(2, false, Endpoint::Home(false), false, 7),
            request(0, 2, true, 30),
            RsOp::Advance(Step::Seconds(700)),
        ],
    );
    rs_seed(
        "replays_and_mutations",
        4,
        &[
            RsOp::Replay {
                index: 0,
                from: None,
                local: 0,
            },
            RsOp::Replay {
                index: 2,
                from: Some(Endpoint::Source(Source::Known(5))),
                local: 1,
            },
            RsOp::Mutate {
                index: 2,
                pos: 30,
                xor: 1,
            },
            RsOp::Mutate {
                index: 0,
                pos: 0,
                xor: 0x80,
            },
            data(0, false, false),
            RsOp::Mutate {
                index: 5,
                pos: 2,
                xor: 0xff,
            },
        ],
    );
}

fn direction(peer: u8, path: u8, relay: bool, initiator: bool) -> NodeOp {
    NodeOp::Direction {
        peer,
        path: PathChoice::Known(path),
        route: u8::from(relay),
        initiator,
        reason: 0,
        peer_addrs: 1,
        relay_addrs: if relay { 2 } else { 0 },
        relay_key: None,
        probe_direct: relay,
        txid: Some(100 + u32::from(path)),
    }
}

fn handshake(index: u8) -> NodeOp {
    NodeOp::Handshake {
        index,
        from: None,
        low_order: false,
        hold: false,
    }
}

fn node_data(index: u8, v6: bool, inner: u8) -> NodeOp {
    NodeOp::Data {
        index,
        v6,
        inner,
        len: 100,
        counter: None,
        from: None,
    }
}

fn control(index: u8, kind: u8, reply: bool) -> NodeOp {
    NodeOp::Control {
        index,
        kind,
        reply,
        txid: None,
        from: None,
        hold: false,
    }
}

fn encapsulate(peer: u8, v6: bool) -> NodeOp {
    NodeOp::Encapsulate {
        peer,
        v6,
        own_source: true,
        len: 200,
    }
}

#[test]
fn node_ops_seeds() {
    node_seed(
        "direct_tunnels_both_roles_and_data",
        1,
        &[
            direction(0, 0, false, false),
            handshake(0),
            node_data(0, false, 0),
            node_data(0, true, 0),
            node_data(0, false, 1),
            encapsulate(0, false),
            encapsulate(0, true),
            direction(1, 1, false, true),
            handshake(1),
            node_data(1, true, 2),
            encapsulate(1, true),
            control(0, 0, true),
            control(1, 2, false),
        ],
    );
    node_seed(
        "relayed_tunnel_handover_and_close",
        2,
        &[
            direction(0, 2, true, true),
            NodeOp::RelayAnswer {
                index: 0,
                refuse: false,
            },
            handshake(0),
            encapsulate(0, false),
            node_data(0, false, 0),
            NodeOp::AddressChange { mask: 0b0110 },
            NodeOp::RelayAnswer {
                index: 0,
                refuse: false,
            },
            NodeOp::DcAnswer {
                registration: true,
                code: None,
            },
            control(0, 5, true),
            control(0, 4, false),
            NodeOp::Advance(Step::Seconds(40)),
        ],
    );
    node_seed(
        "idle_expiry_keepalives_and_timers",
        3,
        &[
            direction(2, 3, false, false),
            handshake(0),
            NodeOp::Resolve { peer: 1 },
            NodeOp::DcAnswer {
                registration: false,
                code: Some(3),
            },
            NodeOp::Advance(Step::Seconds(30)),
            control(0, 1, false),
            NodeOp::Advance(Step::Seconds(200)),
            NodeOp::Advance(Step::Seconds(2000)),
            encapsulate(2, false),
        ],
    );
    node_seed(
        "invalid_directions_replays_and_mutations",
        4,
        &[
            NodeOp::Direction {
                peer: 0,
                path: PathChoice::Known(4),
                route: 0,
                initiator: true,
                reason: 2,
                peer_addrs: 0,
                relay_addrs: 1,
                relay_key: Some(true),
                probe_direct: true,
                txid: Some(7),
            },
            direction(0, 0, false, true),
            NodeOp::Direction {
                peer: 0,
                path: PathChoice::Known(0),
                route: 2,
                initiator: false,
                reason: 0,
                peer_addrs: 0,
                relay_addrs: 0,
                relay_key: None,
                probe_direct: false,
                txid: None,
            },
            NodeOp::Handshake {
                index: 1,
                from: None,
                low_order: true,
                hold: false,
            },
            NodeOp::Replay {
                index: 1,
                source: None,
            },
            NodeOp::Mutate {
                index: 1,
                pos: 40,
                xor: 4,
            },
            NodeOp::Handshake {
                index: 1,
                from: Some(Source::Known(6)),
                low_order: false,
                hold: true,
            },
            NodeOp::Replay {
                index: 5,
                source: None,
            },
        ],
    );
}

/// Found by `node_ops`: a RELAY_BIND retransmitted after the node lost its address of the
/// relay's family left with no source address; now it is not sent (the rebuild takes over).
#[test]
fn node_relay_bind_retransmission_has_a_source() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions/node_ops/unsourced-relay-bind-retransmission");
    let data = std::fs::read(path).unwrap();
    vectors::harness::node_ops(&data);
}
