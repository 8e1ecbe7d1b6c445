//! The state machines over real UDP sockets on loopback, driven by the runtime: an RS, a DC, an
//! AS and two nodes in one process; both nodes log in and register, one resolves the other by
//! name, the tunnel comes up (direct: both are on 127.0.0.1), and virtual IP packets go both ways
//! through the kernel.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use ntm_mio::{NodeMachine, Runtime};
use ntm_state::as_server::{AccountRecord, AccountServer, AsConfig, AsLimits, DcLink};
use ntm_state::dc::{DcConfig, DirectionCoordinator, RelayLink, VirtualPools};
use ntm_state::login::LoginConfig;
use ntm_state::node::{Node, NodeConfig, Phase};
use ntm_state::rs::{DcKey, RelayServer, RsConfig};
use ntm_state::signaling::RetransmitConfig;
use ntm_wire::crypto::auth_key;
use ntm_wire::{Account, AddrList, Fqdn, SecretKey, TransportAddr};

const PASSWORD: &[u8] = b"loopback password";
const ITERATIONS: u32 = 1_000;

fn fqdn(s: &str) -> Fqdn {
    Fqdn::new(s).expect("name")
}

fn any_port() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

fn ipv4_packet(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

#[test]
fn two_nodes_build_a_tunnel_and_exchange_packets_over_loopback() {
    let mut rt = Runtime::new().expect("poll");
    let rs_key = SecretKey::from_bytes([0x70; 32]);
    let rs = rt
        .add_with(&[any_port()], |bound| {
            RelayServer::new(RsConfig::new(
                bound.to_vec(),
                vec![DcKey {
                    key: rs_key.clone(),
                    key_id: 40,
                    high_water_mark: 0,
                }],
            ))
            .expect("RS config")
        })
        .expect("RS sockets");
    let rs_addr = rt.addrs(rs)[0];
    let as_dc_key = SecretKey::from_bytes([0x5a; 32]);
    let dc = rt
        .add_with(&[any_port()], |bound| {
            let mut c = DcConfig::new(
                fqdn("dc1.example"),
                bound.to_vec(),
                as_dc_key.clone(),
                17,
                VirtualPools {
                    v4: Ipv4Addr::new(100, 64, 1, 0),
                    v4_prefix_len: 24,
                    v6: "fd4e:544d:0:1::".parse().expect("pool"),
                },
            );
            c.relays = vec![RelayLink {
                addr: rs_addr,
                key: rs_key.clone(),
                key_id: 40,
                serves_v4: true,
                serves_v6: false,
            }];
            DirectionCoordinator::new(c).expect("DC config")
        })
        .expect("DC sockets");
    let dc_addr = rt.addrs(dc)[0];
    let salt = [0x11; 16];
    let record = |node: &str| AccountRecord {
        auth_key: auth_key(PASSWORD, &salt, ITERATIONS),
        salt,
        iterations: ITERATIONS,
        node_fqdn: fqdn(node),
        dc: fqdn("dc1.example"),
        dc_addrs: AddrList::new(vec![TransportAddr::new(dc_addr)]).expect("addrs"),
        ns_addrs: AddrList::empty(),
        cs_addrs: AddrList::empty(),
        keepalive_interval_s: 25,
    };
    let mut accounts = BTreeMap::new();
    for i in 0..2 {
        accounts.insert(
            Account::new(&format!("node{i}@dc1.example")).expect("account"),
            record(&format!("node{i}.dc1.example")),
        );
    }
    let mut dcs = BTreeMap::new();
    dcs.insert(
        fqdn("dc1.example"),
        DcLink {
            key: as_dc_key.clone(),
            key_id: 17,
            addr: dc_addr,
            high_water_mark: 0,
        },
    );
    let server = AccountServer::new(AsConfig {
        static_secret: SecretKey::from_bytes([0x21; 32]),
        concealment_secret: SecretKey::from_bytes([0x33; 32]),
        default_iterations: ITERATIONS,
        session_lifetime: Duration::from_secs(3600),
        dcs,
        accounts,
        limits: AsLimits::default(),
        retransmit: RetransmitConfig::default(),
    })
    .expect("AS config");
    let as_public = server.public_key();
    let as_id = rt.add(server, &[any_port()]).expect("AS sockets");
    let as_addr = rt.addrs(as_id)[0];
    let mut nodes = Vec::new();
    for i in 0..2u8 {
        let id = rt
            .add_with(&[any_port()], |bound| {
                let login = LoginConfig {
                    min_iterations: ITERATIONS,
                    ..LoginConfig::new(
                        Account::new(&format!("node{i}@dc1.example")).expect("account"),
                        as_public,
                        as_addr,
                    )
                };
                let config =
                    NodeConfig::new(login, bound.to_vec(), SecretKey::from_bytes([0x40 + i; 32]));
                NodeMachine::new(Node::new(config, PASSWORD).expect("node config"))
            })
            .expect("node sockets");
        rt.with::<NodeMachine, _>(id, |m, now, rng| m.node.start(now, rng));
        nodes.push(id);
    }
    let (a, b) = (nodes[0], nodes[1]);
    // Generous bounds: these only stop a broken run; the machines need a few milliseconds.
    let phase = |rt: &mut Runtime, id| rt.with::<NodeMachine, _>(id, |m, _, _| m.node.phase());
    let ready = rt
        .run_until(Instant::now() + Duration::from_secs(20), |rt| {
            phase(rt, a) == Some(Phase::Ready) && phase(rt, b) == Some(Phase::Ready)
        })
        .expect("loop");
    assert!(ready, "the nodes did not register");
    let peer = fqdn("node1.dc1.example");
    let me = fqdn("node0.dc1.example");
    rt.with::<NodeMachine, _>(a, |m, now, rng| m.node.resolve(now, &peer, rng));
    let up = rt
        .run_until(Instant::now() + Duration::from_secs(20), |rt| {
            let pa = peer.clone();
            let pb = me.clone();
            rt.with::<NodeMachine, _>(a, move |m, _, _| m.node.tunnel(&pa).is_some()) == Some(true)
                && rt.with::<NodeMachine, _>(b, move |m, _, _| m.node.tunnel(&pb).is_some())
                    == Some(true)
        })
        .expect("loop");
    assert!(up, "no tunnel");
    let va = rt
        .with::<NodeMachine, _>(a, |m, _, _| m.node.virtual_addrs())
        .flatten()
        .expect("vaddrs");
    let vb = rt
        .with::<NodeMachine, _>(b, |m, _, _| m.node.virtual_addrs())
        .flatten()
        .expect("vaddrs");
    for (from, to, src, dst) in [(a, b, va.0, vb.0), (b, a, vb.0, va.0)] {
        let packet = ipv4_packet(src, dst, b"over the kernel");
        let sent = rt.with::<NodeMachine, _>(from, |m, now, _| m.send_packet(now, &packet));
        assert_eq!(sent, Some(Ok(())));
        let got = rt
            .run_until(Instant::now() + Duration::from_secs(10), |rt| {
                rt.with::<NodeMachine, _>(to, |m, _, _| {
                    m.received.iter().any(|p| p.ends_with(b"over the kernel"))
                }) == Some(true)
            })
            .expect("loop");
        assert!(got, "the packet did not arrive");
    }
    assert_eq!(rt.send_failures, 0);
}
