//! The scenarios of the state-machine milestone, each run in the simulator with the real AS, DC,
//! RS and nodes: who builds which path, data both ways, and virtual time. One-way trips are
//! counted in units of the topology's one-way delay (every server and node is one 20 ms trip
//! from every other with the default links; see `common`).
//!
//! Every failure message starts with the seed and ends with the simulator's capture.

mod common;

use core::time::Duration;
use std::net::SocketAddr;

use common::world::{node_name, World, WorldSetup, NAT_LINK};
use common::{ms, Drive, INTERNET_LINK, ONE_WAY};
use ntm_state::node::{NodeEvent, SendError, TunnelPath};
use ntm_state::sim::{Mapping, Stack};
use ntm_wire::{MessageType, RouteReason};

/// Logs nodes in and registers them, and lets their NAT detection settle (a node registers
/// again when its probes measured another mapping than it reported).
fn up(w: &mut World, nodes: &[usize]) {
    for &i in nodes {
        w.bring_up(i, Duration::from_secs(10));
    }
    w.run_for(Duration::from_millis(200));
}

/// Data both ways on the tunnel between `a` and `b`, IPv4 and IPv6 inner packets.
fn data_both_ways(w: &mut World, a: usize, b: usize) {
    for (i, j) in [(a, b), (b, a)] {
        let payload = format!("hello from node{i} to node{j} at {}", w.now());
        let got = w.deliver_v4(i, j, payload.as_bytes(), Duration::from_secs(2));
        assert!(
            got.is_some(),
            "node{j} did not get {payload:?}\n{}",
            w.context()
        );
        let before = w.nodes[j].received.len();
        w.send_v6(i, j, b"over v6").expect("send v6");
        w.run_for(Duration::from_millis(500));
        assert!(
            w.nodes[j]
                .payloads()
                .iter()
                .skip(before)
                .any(|p| p == b"over v6"),
            "node{j} did not get the IPv6 packet\n{}",
            w.context()
        );
    }
}

/// When the tunnel between `a` and `b` was up at both ends.
fn both_up(w: &World, a: usize, b: usize) -> ntm_state::time::Time {
    let (ta, _) = w.nodes[a].tunnel_up(&w.nodes[b].fqdn).expect("tunnel up");
    let (tb, _) = w.nodes[b].tunnel_up(&w.nodes[a].fqdn).expect("tunnel up");
    ta.max(tb)
}

/// Scenario 1 (Fig. 4): login and registration; the virtual addresses come from the DC's pools.
#[test]
fn s01_login_and_registration() {
    let mut w = World::new(&WorldSetup::new(1));
    let internet = w.internet;
    let mn = w.add_node(internet, INTERNET_LINK);
    let start = w.now();
    up(&mut w, &[mn]);
    let registered = w.nodes[mn]
        .events
        .iter()
        .find_map(|(t, e)| matches!(e, NodeEvent::Registered { .. }).then_some(*t))
        .expect("registered");
    let t = registered - start;
    // 6 one-way trips of login, 2 of registration: 8 × 20 ms.
    assert_eq!(
        t,
        ONE_WAY * 8,
        "login + registration took {t:?}\n{}",
        w.context()
    );
    let (v4, v6) = w.nodes[mn].vaddrs();
    assert_eq!(v4.octets()[..3], [100, 64, 1]);
    assert!(v6.segments()[..4] == [0xfd4e, 0x544d, 0, 1]);
    assert!(w.nodes[mn]
        .events
        .iter()
        .any(|(_, e)| matches!(e, NodeEvent::LoggedIn { fqdn } if *fqdn == node_name(mn))));
}

/// Scenario 2 (Fig. 5): MN on global IPv4, CN behind a NAT: direct, and CN (the NATed target)
/// sends the first TUNNEL_REQUEST. Same DC: 4 one-way trips.
#[test]
fn s02_global_mn_to_natted_cn_is_direct_cn_first() {
    let mut w = World::new(&WorldSetup::new(2));
    let internet = w.internet;
    let g4 = w.segment("g4", Stack::V4Only);
    let home = w.nat_on("nat-cn", internet, Mapping::AddressAndPortDependent);
    let mn = w.add_node(g4, INTERNET_LINK);
    let cn = w.add_node(home, NAT_LINK);
    up(&mut w, &[mn, cn]);
    let start = w.connect(mn, cn, Duration::from_secs(5));
    let first = w
        .net
        .sent
        .iter()
        .find(|s| s.at >= start && s.msg_type == MessageType::TunnelRequest.to_u8())
        .expect("a tunnel request");
    assert_eq!(first.from, format!("node{cn}"), "{}", w.context());
    assert!(matches!(w.path(mn, cn), Some(TunnelPath::Direct(_))));
    assert!(matches!(w.path(cn, mn), Some(TunnelPath::Direct(_))));
    // DIRECTION_REQUEST, both ROUTE_DIRECTIONs, TUNNEL_REQUEST, TUNNEL_RESPONSE.
    assert_eq!(both_up(&w, mn, cn) - start, ONE_WAY * 4, "{}", w.context());
    data_both_ways(&mut w, mn, cn);
}

/// Scenario 7: both behind the same NAT: direct over the private addresses (SameNat).
#[test]
fn s07_same_nat_direct_over_private_addresses() {
    let mut w = World::new(&WorldSetup::new(7));
    let internet = w.internet;
    let home = w.nat_on("nat", internet, Mapping::AddressAndPortDependent);
    let mn = w.add_node(home, NAT_LINK);
    let cn = w.add_node(home, NAT_LINK);
    up(&mut w, &[mn, cn]);
    w.connect(mn, cn, Duration::from_secs(5));
    let cn_private = w.local_addrs(cn)[0];
    assert_eq!(
        w.path(mn, cn),
        Some(TunnelPath::Direct(cn_private)),
        "{}",
        w.context()
    );
    let status = w.nodes[mn].node.tunnel(&node_name(cn)).expect("tunnel");
    assert_eq!(status.reason, RouteReason::SameNat);
    data_both_ways(&mut w, mn, cn);
}

/// Scenario 11: an unauthorized direction request for an existing name gets exactly the answer
/// for a missing name.
#[test]
fn s11_concealment() {
    let mut setup = WorldSetup::new(11);
    setup.accounts = 4;
    let mut w = World::new(&setup);
    // node1 may be reached by node2 only.
    let mut policy = ntm_state::dc::AccessPolicy::open();
    policy.restrict(node_name(1), [node_name(2)]);
    w.dc.set_access_policy(policy);
    let internet = w.internet;
    let a = w.add_node(internet, INTERNET_LINK);
    let b = w.add_node(internet, INTERNET_LINK);
    up(&mut w, &[a, b]);
    let now = w.now();
    let n = &mut w.nodes[a];
    n.node.resolve(now, &node_name(1), &mut n.rng);
    w.run_for(Duration::from_secs(1));
    let now = w.now();
    let n = &mut w.nodes[a];
    n.node
        .resolve(now, &common::fqdn("nobody.dc1.example"), &mut n.rng);
    w.run_for(Duration::from_secs(1));
    let codes: Vec<String> = w
        .errors(a)
        .iter()
        .map(|e| match e {
            NodeEvent::Error(ntm_state::node::NodeError::Direction { code, .. }) => {
                format!("{code:?}")
            }
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(codes, ["NotFound", "NotFound"], "{}", w.context());
    // The two answers have the same length on the wire, and took the same time.
    let answers: Vec<_> = w
        .net
        .sent
        .iter()
        .filter(|s| s.from == "dc" && s.msg_type == MessageType::Error.to_u8())
        .collect();
    assert_eq!(answers.len(), 2, "{}", w.context());
    assert_eq!(answers[0].len, answers[1].len);
    assert!(w.dc.paths().is_empty());
    let _: Option<SocketAddr> = None;
    let _ = ms(0);
}

/// A NAT with this mapping and filtering on `outside`.
fn nat(
    w: &mut World,
    name: &str,
    outside: ntm_state::sim::SegmentId,
    mapping: Mapping,
) -> ntm_state::sim::SegmentId {
    w.nat_on(name, outside, mapping)
}

/// Scenario 3, first half (Figs. 7, 8): both behind different NATs with endpoint-independent
/// mapping: the relay carries data at once, probing finds the direct path, data moves to it.
#[test]
fn s03_both_natted_relay_then_route_optimization_to_direct() {
    let mut w = World::new(&WorldSetup::new(3));
    let internet = w.internet;
    let home_a = nat(&mut w, "nat-a", internet, Mapping::EndpointIndependent);
    let home_b = nat(&mut w, "nat-b", internet, Mapping::EndpointIndependent);
    let mn = w.add_node(home_a, NAT_LINK);
    let cn = w.add_node(home_b, NAT_LINK);
    up(&mut w, &[mn, cn]);
    let start = w.connect(mn, cn, Duration::from_secs(5));
    let (_, first) = w.nodes[mn].tunnel_up(&node_name(cn)).expect("up");
    assert!(
        matches!(first, TunnelPath::Relay(_)),
        "{first:?}\n{}",
        w.context()
    );
    let status = w.nodes[mn].node.tunnel(&node_name(cn)).expect("tunnel");
    assert_eq!(status.reason, RouteReason::BothBehindNat);
    // DIRECTION_REQUEST, RELAY_REQUEST, RELAY_RESPONSE, ROUTE_DIRECTIONs, RELAY_BIND +
    // TUNNEL_REQUEST to the RS, to CN, TUNNEL_RESPONSE to the RS, to MN: 8 one-way trips.
    assert_eq!(both_up(&w, mn, cn) - start, ONE_WAY * 8, "{}", w.context());
    data_both_ways(&mut w, mn, cn);
    // Probing moves both ends to the direct path within a round.
    w.run_for(Duration::from_secs(3));
    assert!(
        matches!(w.path(mn, cn), Some(TunnelPath::Direct(_))),
        "{}",
        w.context()
    );
    assert!(
        matches!(w.path(cn, mn), Some(TunnelPath::Direct(_))),
        "{}",
        w.context()
    );
    let relayed_before = w.relays[0].rs.forwarded().datagrams;
    data_both_ways(&mut w, mn, cn);
    assert_eq!(
        w.relays[0].rs.forwarded().datagrams,
        relayed_before,
        "data still goes through the RS\n{}",
        w.context()
    );
}

/// Scenario 3, second half: both NATs symmetric: the relay stays and nobody probes.
#[test]
fn s03_both_symmetric_stays_on_the_relay() {
    let mut w = World::new(&WorldSetup::new(30));
    let internet = w.internet;
    let home_a = nat(&mut w, "nat-a", internet, Mapping::AddressAndPortDependent);
    let home_b = nat(&mut w, "nat-b", internet, Mapping::AddressAndPortDependent);
    let mn = w.add_node(home_a, NAT_LINK);
    let cn = w.add_node(home_b, NAT_LINK);
    up(&mut w, &[mn, cn]);
    w.connect(mn, cn, Duration::from_secs(5));
    let status = w.nodes[mn].node.tunnel(&node_name(cn)).expect("tunnel");
    assert_eq!(status.reason, RouteReason::BothSymmetric);
    data_both_ways(&mut w, mn, cn);
    w.run_for(Duration::from_secs(15));
    assert!(
        matches!(w.path(mn, cn), Some(TunnelPath::Relay(_))),
        "{}",
        w.context()
    );
    let probes = w
        .net
        .sent
        .iter()
        .filter(|s| s.from.starts_with("node") && s.msg_type == MessageType::Keepalive.to_u8())
        .filter(|s| {
            !w.relays
                .iter()
                .any(|r| r.rs.config().relay_addrs.contains(&s.to))
        })
        .filter(|s| !w.dc_addrs.contains(&s.to))
        .count();
    assert_eq!(probes, 0, "nodes probed a symmetric pair\n{}", w.context());
    data_both_ways(&mut w, mn, cn);
}

/// Scenario 4: MN IPv6-only, CN IPv4-only behind a NAT: relayed through the dual-stack RS.
#[test]
fn s04_ipv6_only_to_ipv4_only_through_a_dual_stack_relay() {
    let mut w = World::new(&WorldSetup::new(4));
    let internet = w.internet;
    let v6 = w.segment("lte", Stack::V6Only);
    let home = nat(&mut w, "nat-cn", internet, Mapping::EndpointIndependent);
    let mn = w.add_node(v6, INTERNET_LINK);
    let cn = w.add_node(home, NAT_LINK);
    up(&mut w, &[mn, cn]);
    w.connect(mn, cn, Duration::from_secs(5));
    let status = w.nodes[mn].node.tunnel(&node_name(cn)).expect("tunnel");
    assert_eq!(status.reason, RouteReason::FamilyMismatch);
    match (w.path(mn, cn), w.path(cn, mn)) {
        (Some(TunnelPath::Relay(a)), Some(TunnelPath::Relay(b))) => {
            assert!(a.is_ipv6() && b.is_ipv4(), "{a} {b}");
        }
        other => panic!("{other:?}\n{}", w.context()),
    }
    data_both_ways(&mut w, mn, cn);
}

/// Scenario 5 (Fig. 9): the same private address on both sides behind different NATs: route
/// selection sees two NATs (not one), the relay carries data, probing finds the direct path, and
/// no node ever sends to its own private address.
#[test]
fn s05_same_private_address_behind_different_nats() {
    let mut w = World::new(&WorldSetup::new(5));
    let internet = w.internet;
    let home_a = nat(&mut w, "nat-a", internet, Mapping::EndpointIndependent);
    let home_b = nat(&mut w, "nat-b", internet, Mapping::EndpointIndependent);
    let private: std::net::IpAddr = "192.168.0.2".parse().expect("ip");
    let ha = w.net.sim.host_at("node0", home_a, private).expect("host");
    let hb = w.net.sim.host_at("node1", home_b, private).expect("host");
    w.net.set_links(ha, vec![private], NAT_LINK);
    w.net.set_links(hb, vec![private], NAT_LINK);
    let mn = w.add_node_on(0, ha);
    let cn = w.add_node_on(1, hb);
    up(&mut w, &[mn, cn]);
    w.connect(mn, cn, Duration::from_secs(5));
    let status = w.nodes[mn].node.tunnel(&node_name(cn)).expect("tunnel");
    assert_eq!(status.reason, RouteReason::BothBehindNat, "{}", w.context());
    data_both_ways(&mut w, mn, cn);
    w.run_for(Duration::from_secs(3));
    assert!(
        matches!(w.path(mn, cn), Some(TunnelPath::Direct(a)) if a.ip() != private),
        "{}",
        w.context()
    );
    data_both_ways(&mut w, mn, cn);
    let to_self = w
        .net
        .sent
        .iter()
        .filter(|s| s.from.starts_with("node") && s.to.ip() == private)
        .count();
    assert_eq!(
        to_self,
        0,
        "a node sent to its own private address\n{}",
        w.context()
    );
}

/// Scenario 6 (Fig. 10): CN behind two cascaded NATs, MN global: one NATed node, which
/// initiates; direct.
#[test]
fn s06_cascaded_nats() {
    let mut w = World::new(&WorldSetup::new(6));
    let internet = w.internet;
    let outer = nat(
        &mut w,
        "nat-cn2",
        internet,
        Mapping::AddressAndPortDependent,
    );
    let inner = nat(&mut w, "nat-cn1", outer, Mapping::EndpointIndependent);
    let g4 = w.segment("g4", Stack::V4Only);
    let mn = w.add_node(g4, INTERNET_LINK);
    let cn = w.add_node(inner, NAT_LINK);
    up(&mut w, &[mn, cn]);
    w.connect(mn, cn, Duration::from_secs(5));
    assert!(
        matches!(w.path(mn, cn), Some(TunnelPath::Direct(_))),
        "{}",
        w.context()
    );
    assert!(
        matches!(w.path(cn, mn), Some(TunnelPath::Direct(_))),
        "{}",
        w.context()
    );
    data_both_ways(&mut w, mn, cn);
}

/// Scenario 12: the RS forwards nothing for a Path ID its DC did not authorize.
#[test]
fn s12_relay_refuses_an_unauthorized_path() {
    let mut w = World::new(&WorldSetup::new(12));
    let internet = w.internet;
    let a = w.add_node(internet, INTERNET_LINK);
    let b = w.add_node(internet, INTERNET_LINK);
    up(&mut w, &[a, b]);
    let rs_addr = w.relays[0].signaling;
    let host_a = w.nodes[a].host;
    let src = w.local_addrs(a)[0];
    // A RELAY_BIND and DATA under a key the DC never gave the RS, for a made-up Path ID.
    let key = ntm_wire::SecretKey::from_bytes([9; 32]);
    let mut k = ntm_state::signaling::SignalingKey::new(&key, 0xdead_beef, ntm_wire::Role::A);
    let bind: ntm_wire::Message = ntm_wire::RelayBind {
        extensions: ntm_wire::Extensions::none(),
    }
    .into();
    let d = k.seal_to_vec(&bind, 1, None).expect("seal");
    let now = w.now();
    w.send(now, "attacker", host_a, src, rs_addr, d);
    let mut data = vec![0u8; 64];
    let n = ntm_wire::seal_data(
        &ntm_wire::AeadKey::new(&key),
        0xdead_beef,
        0,
        false,
        &mut data,
        32,
    )
    .expect("seal");
    w.send(now, "attacker", host_a, src, rs_addr, data[..n].to_vec());
    w.run_for(Duration::from_secs(1));
    assert_eq!(w.relays[0].rs.forwarded().datagrams, 0, "{}", w.context());
    assert!(w.relays[0].rs.drops().total() >= 2, "{}", w.context());
    assert_eq!(w.relays[0].rs.path_count(), 0);
}

/// Both ends send a numbered packet every `every` for `d`; returns, per direction (a→b, b→a),
/// the send times of packets that arrived and when they arrived.
struct Flow {
    /// (direction 0 = a→b or 1 = b→a, sequence number) → send time.
    sent: std::collections::BTreeMap<(usize, u64), ntm_state::time::Time>,
    next: u64,
}

impl Flow {
    fn new() -> Flow {
        Flow {
            sent: Default::default(),
            next: 0,
        }
    }

    fn run(&mut self, w: &mut World, a: usize, b: usize, d: Duration, every: Duration) {
        let end = w.now() + d;
        while w.now() < end {
            for (dir, (i, j)) in [(a, b), (b, a)].into_iter().enumerate() {
                let n = self.next;
                self.next += 1;
                let payload = format!("flow {dir} {n}");
                let now = w.now();
                if w.send_v4(i, j, payload.as_bytes()).is_ok() {
                    self.sent.insert((dir, n), now);
                } else {
                    // Queued or no tunnel yet: counts as sent now (the node may deliver it later).
                    self.sent.insert((dir, n), now);
                }
            }
            w.run_for(every);
        }
    }

    /// Arrivals per direction: (send time, arrival time), in arrival order.
    fn arrivals(
        &self,
        w: &World,
        a: usize,
        b: usize,
    ) -> [Vec<(ntm_state::time::Time, ntm_state::time::Time)>; 2] {
        let mut out = [Vec::new(), Vec::new()];
        for (dir, j) in [(0usize, b), (1usize, a)] {
            for (at, p) in &w.nodes[j].received {
                let h = if p.first().map(|x| x >> 4) == Some(6) {
                    40
                } else {
                    20
                };
                let Ok(text) = std::str::from_utf8(&p[h..]) else {
                    continue;
                };
                let mut parts = text.split(' ');
                if parts.next() != Some("flow") {
                    continue;
                }
                let d: usize = parts.next().and_then(|x| x.parse().ok()).unwrap_or(9);
                let n: u64 = parts.next().and_then(|x| x.parse().ok()).unwrap_or(0);
                if d == dir {
                    if let Some(sent) = self.sent.get(&(dir, n)) {
                        out[dir].push((*sent, *at));
                    }
                }
            }
        }
        out
    }

    /// After `moved_at`: how long until a packet sent at or after it arrived, per direction.
    fn interruption(
        &self,
        w: &World,
        a: usize,
        b: usize,
        moved_at: ntm_state::time::Time,
    ) -> [Option<Duration>; 2] {
        let arr = self.arrivals(w, a, b);
        [0, 1].map(|d| {
            arr[d]
                .iter()
                .filter(|(s, _)| *s >= moved_at)
                .map(|(_, at)| *at - moved_at)
                .min()
        })
    }
}

/// Scenario 8, relayed: a node of dc2.example asks for one of dc1.example, both behind NATs; the
/// deciding DC (dc1) authorizes its RS while the requesting DC retransmits its NTM_INFO_REQUEST
/// (the retransmission is absorbed, not answered with a direction that has no relay yet).
#[test]
fn s08_two_domains_relayed() {
    let mut setup = WorldSetup::new(81);
    setup.accounts = 2;
    let mut w = World::two_domains(&setup);
    let internet = w.internet;
    let home_a = nat(&mut w, "nat-a", internet, Mapping::EndpointIndependent);
    let home_b = nat(&mut w, "nat-b", internet, Mapping::EndpointIndependent);
    let target = w.add_node(home_a, NAT_LINK);
    let requester = w.add_node_dc2(0, home_b, NAT_LINK);
    up(&mut w, &[target, requester]);
    // A slow RS: the DC-to-DC retransmission timer fires before the relay answers.
    let rs = w.relays[0].host;
    for ip in w.net.sim.addrs(rs) {
        w.net
            .sim
            .set_link(
                rs,
                ip,
                ntm_state::sim::Link::latency(Duration::from_millis(150)),
            )
            .expect("link");
    }
    w.connect(requester, target, Duration::from_secs(10));
    let (_, first) = w.nodes[requester]
        .tunnel_up(&w.nodes[target].fqdn)
        .expect("up");
    assert!(
        matches!(first, TunnelPath::Relay(_)),
        "{first:?}\n{}",
        w.context()
    );
    data_both_ways(&mut w, requester, target);
}

/// Scenario 9: handover during a data flow. MN moves from global IPv4 to a private NAT, to an
/// IPv6-only network, and back; CN is global dual-stack. Virtual addresses never change; data
/// resumes after each move; the interruption is measured.
#[test]
fn s09_handover_during_a_data_flow() {
    let mut w = World::new(&WorldSetup::new(9));
    let internet = w.internet;
    let g4 = w.segment("g4", Stack::V4Only);
    let home = nat(&mut w, "home", internet, Mapping::EndpointIndependent);
    let lte = w.segment("lte", Stack::V6Only);
    let mn = w.add_node(g4, INTERNET_LINK);
    let cn = w.add_node(internet, INTERNET_LINK);
    up(&mut w, &[mn, cn]);
    w.connect(mn, cn, Duration::from_secs(5));
    assert!(
        matches!(w.path(mn, cn), Some(TunnelPath::Direct(_))),
        "{}",
        w.context()
    );
    let vaddrs = (w.nodes[mn].vaddrs(), w.nodes[cn].vaddrs());
    let mut flow = Flow::new();
    let every = Duration::from_millis(10);
    flow.run(&mut w, mn, cn, Duration::from_millis(500), every);
    let mut report = Vec::new();
    for (name, segment, link) in [
        ("private NAT", home, NAT_LINK),
        ("IPv6-only", lte, INTERNET_LINK),
        ("global IPv4", g4, INTERNET_LINK),
    ] {
        let moved = w.move_node(mn, segment, link);
        flow.run(&mut w, mn, cn, Duration::from_secs(6), every);
        let gap = flow.interruption(&w, mn, cn, moved);
        assert!(
            gap[0].is_some() && gap[1].is_some(),
            "data did not resume after the move to {name}: {gap:?}\n{}",
            w.context()
        );
        report.push((name, gap, w.path(mn, cn)));
        assert_eq!(
            (w.nodes[mn].vaddrs(), w.nodes[cn].vaddrs()),
            vaddrs,
            "virtual addresses changed"
        );
    }
    let rtt = ONE_WAY * 2;
    println!(
        "handover interruption (MN→CN, CN→MN), in RTTs of {rtt:?}, and the path after the move:"
    );
    for (name, gap, path) in &report {
        let r = gap.map(|g| g.map(|g| g.as_secs_f64() / rtt.as_secs_f64()));
        println!("  to {name}: {gap:?} = {r:.2?} RTT, on {path:?}");
    }
    // Packets leave every 10 ms, so a measured gap includes up to that much waiting to send.
    // The direct path survives the move to the NAT (IPv4 on both sides): data flows again
    // within one RTT to the peer.
    let [a, b] = report[0].1;
    assert!(
        a.expect("a") <= rtt + every && b.expect("b") <= rtt + every,
        "{report:?}"
    );
    // It cannot survive the moves that change the family: registration (2 trips), then a
    // relayed rebuild (8 trips, 10 when the initiator's TUNNEL_REQUEST reaches the RS before
    // the responder's RELAY_BIND), and one more trip for the initiator's own side to be up.
    for (name, gap, _) in &report[1..] {
        for g in gap {
            assert!(
                g.expect("gap") <= ONE_WAY * 14 + every,
                "{name}: {report:?}"
            );
        }
    }
}

/// Scenario 8: two domains. MN in dc1.example's zone, CN in dc2.example's; DC1 finds DC2 by an
/// NS lookup through the parent zone's name server, bootstraps a DC↔DC key from the directory's
/// static keys, and DC2 decides. First contact: 7 one-way trips (5 + the DNS round trip); a
/// second pair between the same DCs: 5.
#[test]
fn s08_two_domains_found_through_dns() {
    let mut setup = WorldSetup::new(8);
    setup.accounts = 3;
    let mut w = World::two_domains(&setup);
    let internet = w.internet;
    let g4 = w.segment("g4", Stack::V4Only);
    let home = nat(&mut w, "nat-cn", internet, Mapping::EndpointIndependent);
    let mn = w.add_node(g4, INTERNET_LINK);
    let cn = w.add_node_dc2(0, home, NAT_LINK);
    let mn2 = w.add_node(g4, INTERNET_LINK);
    let cn2 = w.add_node_dc2(1, home, NAT_LINK);
    up(&mut w, &[mn, cn, mn2, cn2]);
    assert_eq!(w.nodes[cn].fqdn.as_str(), "node0.dc2.example");
    let (cn_v4, _) = w.nodes[cn].vaddrs();
    assert_eq!(
        cn_v4.octets()[..3],
        [100, 64, 2],
        "CN's address is from DC2's pool"
    );
    let start = w.connect(mn, cn, Duration::from_secs(5));
    assert!(
        w.domain2.as_ref().expect("dc2").queries >= 1,
        "no NS lookup\n{}",
        w.context()
    );
    assert!(
        matches!(w.path(mn, cn), Some(TunnelPath::Direct(_))),
        "{}",
        w.context()
    );
    let first = both_up(&w, mn, cn) - start;
    assert_eq!(first, ONE_WAY * 7, "{}", w.context());
    data_both_ways(&mut w, mn, cn);
    let start = w.connect(mn2, cn2, Duration::from_secs(5));
    let second = both_up(&w, mn2, cn2) - start;
    assert_eq!(second, ONE_WAY * 5, "{}", w.context());
    data_both_ways(&mut w, mn2, cn2);
    println!("two domains, direct: first contact {first:?}, DCs known {second:?}");
}

/// Scenario 10: both ends move at the same time, each to its own NAT. Each one's PATH_UPDATE
/// goes to the other's old address and is lost; both fall back to their DC with a rebuild, the
/// DC decides once (the second request gets its side of the first's decision), and data resumes
/// on one tunnel, relayed and then direct after probing.
#[test]
fn s10_both_ends_move_at_once() {
    let mut w = World::new(&WorldSetup::new(10));
    let internet = w.internet;
    let g4a = w.segment("g4a", Stack::V4Only);
    let g4b = w.segment("g4b", Stack::V4Only);
    let home_a = nat(&mut w, "nat-a", internet, Mapping::EndpointIndependent);
    let home_b = nat(&mut w, "nat-b", internet, Mapping::EndpointIndependent);
    let mn = w.add_node(g4a, INTERNET_LINK);
    let cn = w.add_node(g4b, INTERNET_LINK);
    up(&mut w, &[mn, cn]);
    w.connect(mn, cn, Duration::from_secs(5));
    let vaddrs = (w.nodes[mn].vaddrs(), w.nodes[cn].vaddrs());
    let mut flow = Flow::new();
    let every = Duration::from_millis(10);
    flow.run(&mut w, mn, cn, Duration::from_millis(300), every);
    let moved = w.move_node(mn, home_a, NAT_LINK);
    w.move_node(cn, home_b, NAT_LINK);
    flow.run(&mut w, mn, cn, Duration::from_secs(15), every);
    let gap = flow.interruption(&w, mn, cn, moved);
    println!("both moved: interruption (MN→CN, CN→MN) {gap:?}");
    assert!(
        gap[0].is_some() && gap[1].is_some(),
        "{gap:?}\n{}",
        w.context()
    );
    // One tunnel at each end, the same one, direct after probing.
    let a = w.nodes[mn].node.tunnels();
    let b = w.nodes[cn].node.tunnels();
    let live_a: Vec<u32> = a
        .iter()
        .filter(|t| !t.retiring)
        .map(|t| t.path_id)
        .collect();
    let live_b: Vec<u32> = b
        .iter()
        .filter(|t| !t.retiring)
        .map(|t| t.path_id)
        .collect();
    assert_eq!(live_a, live_b, "{}", w.context());
    assert_eq!(live_a.len(), 1, "{}", w.context());
    assert!(
        matches!(w.path(mn, cn), Some(TunnelPath::Direct(_))),
        "{}",
        w.context()
    );
    assert_eq!((w.nodes[mn].vaddrs(), w.nodes[cn].vaddrs()), vaddrs);
    data_both_ways(&mut w, mn, cn);
}

/// Under loss, a node's application resolves again when a direction fails, and resends data
/// until it arrives (as a transport above the tunnel would).
fn connect_retrying(w: &mut World, a: usize, b: usize, limit: Duration) {
    let end = w.now() + limit;
    let (pa, pb) = (w.nodes[a].fqdn.clone(), w.nodes[b].fqdn.clone());
    while w.now() < end {
        if w.nodes[a].node.tunnel(&pb).is_some() && w.nodes[b].node.tunnel(&pa).is_some() {
            return;
        }
        let now = w.now();
        let n = &mut w.nodes[a];
        n.node.resolve(now, &pb, &mut n.rng);
        let until = (w.now() + Duration::from_secs(2)).min(end);
        w.run(until, |w| {
            w.nodes[a].node.tunnel(&pb).is_some() && w.nodes[b].node.tunnel(&pa).is_some()
        });
    }
    let tail: Vec<String> = w
        .net
        .sent
        .iter()
        .rev()
        .take(40)
        .map(|s| format!("{s:?}"))
        .collect();
    panic!(
        "no tunnel under loss\n{}\nlast sent:\n{}",
        w.context(),
        tail.join("\n")
    );
}

fn data_both_ways_retrying(w: &mut World, a: usize, b: usize) {
    for (i, j) in [(a, b), (b, a)] {
        let payload = format!("lossy from node{i} at {}", w.now());
        let mut got = false;
        let peer = w.nodes[j].fqdn.clone();
        for _ in 0..600 {
            // A persistent application: without a tunnel (the node gave up), it resolves again.
            let now = w.now();
            let n = &mut w.nodes[i];
            if n.node.tunnel(&peer).is_none() {
                n.node.resolve(now, &peer, &mut n.rng);
            }
            if w.deliver_v4(i, j, payload.as_bytes(), Duration::from_millis(500))
                .is_some()
            {
                got = true;
                break;
            }
        }
        if !got {
            let tail: Vec<String> = w
                .net
                .sent
                .iter()
                .filter(|s| [53, 64, 65, 68, 96, 97].contains(&s.msg_type))
                .rev()
                .take(60)
                .map(|s| format!("{s:?}"))
                .collect();
            panic!(
                "node{j} never got {payload:?}\n{}\nlast:\n{}",
                w.context(),
                tail.join("\n")
            );
        }
    }
}

/// Under loss: both nodes up, a tunnel between them, data both ways.
fn pair_under_loss(w: &mut World, mn: usize, cn: usize) {
    bring_up_retrying(w, &[mn, cn]);
    connect_retrying(w, mn, cn, Duration::from_secs(300));
    data_both_ways_retrying(w, mn, cn);
}

fn bring_up_retrying(w: &mut World, nodes: &[usize]) {
    for &i in nodes {
        // The node retries its login and registration itself, with back-off.
        w.bring_up(i, Duration::from_secs(120));
    }
    w.run_for(Duration::from_secs(1));
}

/// Scenario 14: 20% loss on every link (hosts' and NATs'); the scenarios above still complete:
/// login and registration, direct (2), relay then direct (3), IPv6 ↔ IPv4 relay (4), same NAT
/// (7), two domains (8), and a handover with data resuming (9), over several seeds.
#[test]
fn s14_every_scenario_completes_under_20_percent_loss() {
    use ntm_state::sim::Link;
    let seeds: u64 = std::env::var("NTM_LOSS_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let first: u64 = std::env::var("NTM_LOSS_FIRST")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    for seed in first..first + seeds {
        if std::env::var("NTM_LOSS_VERBOSE").is_ok() {
            eprintln!("loss seed {seed}");
        }
        let lossy = Some(Link {
            loss: 0.2,
            ..Link::latency(Duration::from_millis(10))
        });
        let setup = |s: u64| WorldSetup {
            link: lossy,
            ..WorldSetup::new(1400 + s * 10 + seed * 1000)
        };
        // 2: direct, the NATed target first.
        let mut w = World::new(&setup(2));
        let internet = w.internet;
        let g4 = w.segment("g4", Stack::V4Only);
        let home = nat(&mut w, "nat", internet, Mapping::AddressAndPortDependent);
        let (mn, cn) = (w.add_node(g4, INTERNET_LINK), w.add_node(home, NAT_LINK));
        pair_under_loss(&mut w, mn, cn);
        // 3: both behind endpoint-independent NATs: relay, then probing.
        let mut w = World::new(&setup(3));
        let internet = w.internet;
        let a = nat(&mut w, "nat-a", internet, Mapping::EndpointIndependent);
        let b = nat(&mut w, "nat-b", internet, Mapping::EndpointIndependent);
        let (mn, cn) = (w.add_node(a, NAT_LINK), w.add_node(b, NAT_LINK));
        pair_under_loss(&mut w, mn, cn);
        w.run_for(Duration::from_secs(12));
        data_both_ways_retrying(&mut w, mn, cn);
        // 4: IPv6-only to IPv4-only behind a NAT, through the dual-stack RS.
        let mut w = World::new(&setup(4));
        let internet = w.internet;
        let v6 = w.segment("lte", Stack::V6Only);
        let home = nat(&mut w, "nat", internet, Mapping::EndpointIndependent);
        let (mn, cn) = (w.add_node(v6, INTERNET_LINK), w.add_node(home, NAT_LINK));
        pair_under_loss(&mut w, mn, cn);
        // 7: same NAT.
        let mut w = World::new(&setup(7));
        let internet = w.internet;
        let home = nat(&mut w, "nat", internet, Mapping::AddressAndPortDependent);
        let (mn, cn) = (w.add_node(home, NAT_LINK), w.add_node(home, NAT_LINK));
        pair_under_loss(&mut w, mn, cn);
        // 8: two domains.
        let mut w = World::two_domains(&setup(8));
        let internet = w.internet;
        let home = nat(&mut w, "nat", internet, Mapping::EndpointIndependent);
        let mn = w.add_node(internet, INTERNET_LINK);
        let cn = w.add_node_dc2(0, home, NAT_LINK);
        pair_under_loss(&mut w, mn, cn);
        // 9: handover to a NAT and to IPv6-only, data resuming after each.
        let mut w = World::new(&setup(9));
        let internet = w.internet;
        let g4 = w.segment("g4", Stack::V4Only);
        let home = nat(&mut w, "home", internet, Mapping::EndpointIndependent);
        let lte = w.segment("lte", Stack::V6Only);
        let (mn, cn) = (
            w.add_node(g4, INTERNET_LINK),
            w.add_node(internet, INTERNET_LINK),
        );
        bring_up_retrying(&mut w, &[mn, cn]);
        connect_retrying(&mut w, mn, cn, Duration::from_secs(300));
        for segment in [home, lte] {
            w.move_node(mn, segment, NAT_LINK);
            w.run_for(Duration::from_secs(1));
            data_both_ways_retrying(&mut w, mn, cn);
        }
    }
}

/// Teardown (spec/05 §5.16): a tunnel that carried no DATA for 180 s is closed at both ends
/// (keep-alives do not count); the next packet for the peer's virtual address builds a new
/// tunnel and is delivered; an application close removes it at both ends.
#[test]
fn idle_expiry_close_and_rebuild_on_the_next_packet() {
    let mut w = World::new(&WorldSetup::new(16));
    let internet = w.internet;
    let home = nat(&mut w, "nat", internet, Mapping::EndpointIndependent);
    let mn = w.add_node(internet, INTERNET_LINK);
    let cn = w.add_node(home, NAT_LINK);
    up(&mut w, &[mn, cn]);
    w.connect(mn, cn, Duration::from_secs(5));
    data_both_ways(&mut w, mn, cn);
    let first = w.nodes[mn]
        .node
        .tunnel(&w.nodes[cn].fqdn)
        .expect("tunnel")
        .path_id;
    // Idle: keep-alives flow (CN is behind a NAT), DATA does not.
    w.run_for(Duration::from_secs(179));
    assert!(
        w.nodes[mn].node.tunnel(&w.nodes[cn].fqdn).is_some(),
        "closed too early"
    );
    w.run_for(Duration::from_secs(3));
    for (i, j) in [(mn, cn), (cn, mn)] {
        assert!(
            w.nodes[i].node.tunnel(&w.nodes[j].fqdn).is_none(),
            "{}",
            w.context()
        );
        let down = w.nodes[i].events.iter().any(|(_, e)| {
            matches!(e, NodeEvent::TunnelDown { path_id, reason, .. }
                if *path_id == first
                    && matches!(reason, ntm_state::node::DownReason::Idle
                        | ntm_state::node::DownReason::ClosedByPeer))
        });
        assert!(down, "node{i} reported no idle close\n{}", w.context());
    }
    // The next packet for CN's virtual address builds a new tunnel and arrives.
    let t0 = w.now();
    let got = w.deliver_v4(mn, cn, b"after idle", Duration::from_secs(3));
    // DIRECTION_REQUEST, both ROUTE_DIRECTIONs, TUNNEL_REQUEST (the NATed target initiates),
    // TUNNEL_RESPONSE, then the queued packet.
    assert!(
        got.is_some_and(|t| t - t0 <= ONE_WAY * 6),
        "{got:?}\n{}",
        w.context()
    );
    let second = w.nodes[mn]
        .node
        .tunnel(&w.nodes[cn].fqdn)
        .expect("tunnel")
        .path_id;
    assert_ne!(first, second);
    // An application close removes it at both ends.
    let now = w.now();
    let peer = w.nodes[cn].fqdn.clone();
    let n = &mut w.nodes[mn];
    n.node.close(now, &peer, &mut n.rng);
    w.run_for(Duration::from_millis(200));
    assert!(w.nodes[mn].node.tunnels().is_empty(), "{}", w.context());
    assert!(w.nodes[cn].node.tunnels().is_empty(), "{}", w.context());
}

/// A data key is used for at most `key_packet_limit` packets (spec/07: AES-GCM's limit): the
/// sender then closes the tunnel (TUNNEL_CLOSE Error) and its next packet builds a new one with
/// fresh keys; the stream goes on.
#[test]
fn a_used_up_data_key_replaces_the_tunnel() {
    let mut w = World::new(&WorldSetup::new(18));
    w.key_packet_limit = Some(50);
    let internet = w.internet;
    let (mn, cn) = (
        w.add_node(internet, INTERNET_LINK),
        w.add_node(internet, INTERNET_LINK),
    );
    up(&mut w, &[mn, cn]);
    w.connect(mn, cn, Duration::from_secs(5));
    let first = w.nodes[mn]
        .node
        .tunnel(&w.nodes[cn].fqdn)
        .expect("tunnel")
        .path_id;
    let mut refused = 0;
    for n in 0..120 {
        match w.send_v4(mn, cn, format!("n{n}").as_bytes()) {
            Ok(()) | Err(SendError::Queued) => {}
            Err(SendError::KeyExhausted) => refused += 1,
            Err(e) => panic!("{e:?}\n{}", w.context()),
        }
        w.run_for(Duration::from_millis(20));
    }
    // 120 packets under a 50-packet limit: the first key and its replacement are each used up.
    assert_eq!(
        refused,
        2,
        "one packet meets each used-up key\n{}",
        w.context()
    );
    let second = w.nodes[mn]
        .node
        .tunnel(&w.nodes[cn].fqdn)
        .expect("tunnel")
        .path_id;
    assert_ne!(first, second);
    // Every packet but the refused one arrives (some waited in the queue for the new tunnel).
    let got = w.nodes[cn].payloads().len();
    assert!(got >= 110, "{got} arrived\n{}", w.context());
}

/// The DC answers DNS for its zone on port 53 in the simulator: a node's virtual addresses for
/// A and AAAA, NXDOMAIN for a missing name, and a restricted name exactly as a missing one.
#[test]
fn the_dc_answers_dns_for_its_zone() {
    use hickory_proto::op::{Message, MessageType as DnsType, OpCode, Query, ResponseCode};
    use hickory_proto::rr::{Name, RData, RecordType};
    let mut w = World::new(&WorldSetup::new(17));
    let mut policy = ntm_state::dc::AccessPolicy::open();
    policy.restrict(node_name(1), [node_name(0)]);
    w.dc.set_access_policy(policy);
    let internet = w.internet;
    let a = w.add_node(internet, INTERNET_LINK);
    let b = w.add_node(internet, INTERNET_LINK);
    up(&mut w, &[a, b]);
    let asker = w.net.host("stub", internet, INTERNET_LINK);
    let src = w.net.v4(asker, 5353);
    let dns = SocketAddr::new(w.dc_addrs[0].ip(), 53);
    let ask = |w: &mut World, id: u16, name: &str, t: RecordType| -> Message {
        let mut q = Message::new(id, DnsType::Query, OpCode::Query);
        q.queries
            .push(Query::query(Name::from_ascii(name).expect("name"), t));
        let now = w.now();
        w.send(now, "stub", asker, src, dns, q.to_vec().expect("query"));
        w.run_for(Duration::from_millis(100));
        let d = w.stray.pop().expect("an answer").payload;
        Message::from_vec(&d).expect("a DNS message")
    };
    let (v4, v6) = w.nodes[a].vaddrs();
    let m = ask(&mut w, 1, "node0.dc1.example.", RecordType::A);
    assert!(m.metadata.authoritative);
    assert!(matches!(m.answers.first().map(|r| &r.data), Some(RData::A(x)) if x.0 == v4));
    let m = ask(&mut w, 2, "node0.dc1.example.", RecordType::AAAA);
    assert!(matches!(m.answers.first().map(|r| &r.data), Some(RData::AAAA(x)) if x.0 == v6));
    let missing = ask(&mut w, 3, "nobody.dc1.example.", RecordType::A);
    assert_eq!(missing.metadata.response_code, ResponseCode::NXDomain);
    let hidden = ask(&mut w, 3, "node1.dc1.example.", RecordType::A);
    assert_eq!(hidden.metadata.response_code, ResponseCode::NXDomain);
    assert!(hidden.answers.is_empty());
}

// ---------------------------------------------------------------------------------------------
// The DC's CS and NS (spec/05 §5.2 steps 8-12, §5.4, §5.5.4, §5.14).

mod servers {
    use core::time::Duration;

    use super::common::world::{node_name, ServersWorld, WorldSetup, NAT_LINK};
    use super::common::{Drive, HOME_LINK, INTERNET_LINK, ONE_WAY};
    use ntm_state::node::{NodeEvent, TunnelPath};
    use ntm_state::sim::{Filtering, Mapping, NatConfig, Stack};
    use ntm_wire::MessageType;

    /// Scenario 13 (spec/05 §5.14): the CS holds data for an offline CN, which fetches it after
    /// coming online. CN registers once (so its DC knows its name and static key), is switched
    /// off until its registration lapses; MN's resolve answers ROUTE_DIRECTION(Offline), MN
    /// leaves a blob at the CS; CN logs in again, its DC hands the CS the new session's key, the
    /// CS announces the blob through the DC, CN fetches it and acknowledges it.
    #[test]
    fn s13_the_cs_holds_data_for_an_offline_cn_which_fetches_it_after_coming_online() {
        let mut s = ServersWorld::new(&WorldSetup::new(13), ONE_WAY);
        let internet = s.w.internet;
        let home = s.w.nat_on("nat-cn", internet, Mapping::EndpointIndependent);
        let mn = s.add_node(internet, INTERNET_LINK, false);
        let cn = s.add_node(home, NAT_LINK, false);
        s.bring_up(mn, Duration::from_secs(10));
        s.bring_up(cn, Duration::from_secs(10));
        let cn_name = node_name(cn);
        let cn_key = s.w.nodes[cn].node.public_key();
        s.switch_off(cn, false);
        s.run_for(Duration::from_secs(601));
        assert!(
            s.w.dc.registration(&cn_name).is_none(),
            "CN's registration did not lapse\n{}",
            s.context()
        );
        // MN learns that CN is offline, with CN's static key.
        let now = s.now();
        let n = &mut s.w.nodes[mn];
        n.node.resolve(now, &cn_name, &mut n.rng);
        s.run_for(Duration::from_secs(1));
        let offline = s.w.nodes[mn].events.iter().find_map(|(_, e)| match e {
            NodeEvent::PeerOffline { peer, public_key } if *peer == cn_name => Some(*public_key),
            _ => None,
        });
        assert_eq!(offline, Some(cn_key), "{}", s.context());
        let data: Vec<u8> = (0..600u32).map(|i| (i * 7 % 251) as u8).collect();
        let now = s.now();
        let n = &mut s.w.nodes[mn];
        n.node
            .leave_for_offline_peer(now, &cn_name, &data, &mut n.rng)
            .expect("store started");
        s.run_for(Duration::from_secs(1));
        assert!(
            s.w.nodes[mn].events.iter().any(|(_, e)| *e
                == NodeEvent::CacheStored {
                    peer: cn_name.clone()
                }),
            "{}",
            s.context()
        );
        assert_eq!(s.cs.held_for(&cn_name), [1]);
        // CN comes back: a new login, a new session.
        let back = s.now();
        s.bring_up(cn, Duration::from_secs(10));
        s.run_for(Duration::from_secs(5));
        let got: Vec<_> = s.w.nodes[cn]
            .events
            .iter()
            .filter_map(|(t, e)| match e {
                NodeEvent::CachedData { from, data } => Some((*t, from.clone(), data.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(got.len(), 1, "delivered once\n{}", s.context());
        assert_eq!(got[0].1, node_name(mn));
        assert_eq!(got[0].2, data, "the exact bytes");
        // Registered (8 trips), then KEY_DISTRIBUTION(NodeCs), NOTIFICATION CS -> DC -> CN,
        // CACHE_FETCH, CACHE_DATA: within a second.
        assert!(got[0].0 - back < Duration::from_secs(1), "{got:?}");
        // CN acknowledged it: the CS holds nothing for it any more.
        assert!(s.cs.held_for(&cn_name).is_empty(), "{}", s.context());
        let fetches = s.sent_by("node1", MessageType::CacheFetch).len();
        assert!(fetches >= 2, "fetched, then acknowledged: {fetches}");
    }

    /// Scenario 14 (spec/05 §5.5.4): CN behind a NAT keeps its NS push channel up and therefore
    /// no UDP keep-alives; its NAT mapping towards the DC times out (30 s). MN's direction
    /// request makes CN's DC send CN's ROUTE_DIRECTION through the NS, CN initiates, and the
    /// tunnel comes up. The push channel is TCP and the simulator is UDP-only: `ServersWorld`
    /// models it by moving bytes between the NS's and the node's stream calls with a fixed
    /// delay of one trip.
    #[test]
    fn s14_a_cn_reachable_only_through_its_ns_is_woken_and_the_tunnel_comes_up() {
        let mut s = ServersWorld::new(&WorldSetup::new(14), ONE_WAY);
        let internet = s.w.internet;
        let g4 = s.w.segment("g4", Stack::V4Only);
        let (nat, home) =
            s.w.net
                .sim
                .nat(
                    "nat-cn",
                    internet,
                    NatConfig {
                        timeout: Duration::from_secs(30),
                        ..NatConfig::new(
                            Mapping::AddressAndPortDependent,
                            Filtering::AddressAndPortDependent,
                        )
                    },
                )
                .expect("nat");
        s.w.net
            .sim
            .set_nat_link(nat, ntm_state::sim::Link::latency(HOME_LINK))
            .expect("link");
        let mn = s.add_node(g4, INTERNET_LINK, false);
        let cn = s.add_node(home, NAT_LINK, true);
        s.bring_up(mn, Duration::from_secs(10));
        let start = s.now();
        s.bring_up(cn, Duration::from_secs(10));
        s.run_for(Duration::from_secs(1));
        let at = |s: &ServersWorld, want: &dyn Fn(&NodeEvent) -> bool| {
            s.w.nodes[cn]
                .events
                .iter()
                .find_map(|(t, e)| want(e).then_some(*t))
        };
        let registered = at(&s, &|e| matches!(e, NodeEvent::Registered { .. }));
        let push_up = at(&s, &|e| *e == NodeEvent::PushChannel { up: true });
        // spec/05 §5.2: registered in 10 one-way trips with an NS (the DC waits for the NS's
        // ACK), push channel up in 12.
        assert_eq!(
            registered.map(|t| t - start),
            Some(ONE_WAY * 10),
            "{}",
            s.context()
        );
        assert_eq!(
            push_up.map(|t| t - start),
            Some(ONE_WAY * 12),
            "{}",
            s.context()
        );
        assert!(s.ns.channel_of(&node_name(cn)).is_some());
        let up = push_up.expect("up");
        // A minute of silence: no UDP keep-alive to the DC, so the NAT forgets the mapping.
        s.run_for(Duration::from_secs(60));
        let keepalives =
            s.w.net
                .sent
                .iter()
                .filter(|x| x.from == format!("node{cn}") && x.at > up)
                .filter(|x| x.msg_type == MessageType::Keepalive.to_u8())
                .count();
        assert_eq!(keepalives, 0, "{}", s.context());
        // MN asks for CN.
        let start = s.now();
        let now = s.now();
        let peer = node_name(cn);
        let n = &mut s.w.nodes[mn];
        n.node.resolve(now, &peer, &mut n.rng);
        let me = node_name(mn);
        s.run(start + Duration::from_secs(5), |s| {
            s.w.nodes[mn].node.tunnel(&peer).is_some() && s.w.nodes[cn].node.tunnel(&me).is_some()
        });
        let pushed =
            s.w.net
                .sent
                .iter()
                .filter(|x| x.at >= start && x.from == "dc" && x.to == s.ns_addr)
                .filter(|x| x.msg_type == MessageType::Notification.to_u8())
                .count();
        assert_eq!(pushed, 1, "{}", s.context());
        let (a, _) = s.w.nodes[mn].tunnel_up(&peer).expect("MN's tunnel");
        let (b, _) = s.w.nodes[cn].tunnel_up(&me).expect("CN's tunnel");
        // DIRECTION_REQUEST, NOTIFICATION to the NS, the push to CN, TUNNEL_REQUEST,
        // TUNNEL_RESPONSE: 5 one-way trips (spec/05 §5.5.4 counts 6 with a second DC).
        assert_eq!(a.max(b) - start, ONE_WAY * 5, "{}", s.context());
        assert!(matches!(
            s.w.nodes[mn].node.tunnel(&peer).map(|t| t.path),
            Some(TunnelPath::Direct(_))
        ));
        // Data both ways on it.
        for (i, j) in [(mn, cn), (cn, mn)] {
            let before = s.w.nodes[j].received.len();
            s.w.send_v4(i, j, b"woken").expect("send");
            s.run_for(Duration::from_millis(200));
            assert!(
                s.w.nodes[j]
                    .payloads()
                    .iter()
                    .skip(before)
                    .any(|p| p == b"woken"),
                "node{j} got nothing\n{}",
                s.context()
            );
        }
    }
}

/// An ERROR logged by a machine inside a simulation fails the test (the harness's subscriber
/// records it and the run loop stops with the seed and the capture).
#[test]
#[should_panic(expected = "ERROR logged inside the simulation")]
fn an_error_log_inside_a_simulation_fails_the_test() {
    let mut w = World::new(&WorldSetup::new(99));
    tracing::error!(what = "a machine's bug", "something impossible happened");
    w.run_for(Duration::from_millis(1));
}
