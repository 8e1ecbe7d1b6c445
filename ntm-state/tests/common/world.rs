//! A whole NTMobile deployment in the simulator: the AS, one DC (two addresses per family), the
//! RSs, and nodes running the real `Node` machine. Scenario tests build a topology with it, log
//! nodes in, resolve, send virtual IP packets both ways, move hosts, and assert on paths, data
//! and virtual time.

use core::time::Duration;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ntm_state::as_server::AccountServer;
use ntm_state::dc::{DcConfig, DcEvent, DirectionCoordinator, RelayLink, VirtualPools};
use ntm_state::login::LoginConfig;
use ntm_state::node::{Node, NodeConfig, NodeEvent, Phase, Received, SendError, TunnelPath};
use ntm_state::rs::{DcKey, RelayServer, RsConfig};
use ntm_state::sim::{Delivery, HostId, Link, Mapping, SegmentId};
use ntm_state::time::Time;
use ntm_wire::{Fqdn, SecretKey};
use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;

use super::{
    as_dc_key, drain, fqdn, Drive, Net, AS_PORT, DC_KEY_ID, DC_PORT, HOME_LINK, INTERNET_LINK,
    NODE_PORT, PASSWORD,
};

/// PBKDF2 is not what these tests are about.
pub const ITERATIONS: u32 = 1_000;
pub const RS_PORT: u16 = 4282;
/// The DC↔RS key ID of RS `i` is this plus `i`.
pub const RS_KEY_ID: u32 = 40;

pub fn node_name(i: usize) -> Fqdn {
    fqdn(&format!("node{i}.dc1.example"))
}

fn account(i: usize) -> ntm_wire::Account {
    super::account(&format!("node{i}@dc1.example"))
}

pub fn rs_key(i: usize) -> SecretKey {
    SecretKey::from_bytes([0x70 + i as u8; 32])
}

/// A minimal IPv4 packet (20-byte header, UDP protocol number, no checksum): the node checks
/// only the addresses.
pub fn ipv4_packet(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    let total = (20 + payload.len()) as u16;
    p[2..4].copy_from_slice(&total.to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

/// A minimal IPv6 packet (40-byte header, UDP next header).
pub fn ipv6_packet(src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    p[6] = 17;
    p[7] = 64;
    p[8..24].copy_from_slice(&src.octets());
    p[24..40].copy_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

pub struct NodeHost {
    pub index: usize,
    pub host: HostId,
    pub node: Node,
    pub rng: ChaCha8Rng,
    pub events: Vec<(Time, NodeEvent)>,
    /// Inner packets delivered to the application.
    pub received: Vec<(Time, Vec<u8>)>,
}

impl NodeHost {
    pub fn tunnel_up(&self, peer: &Fqdn) -> Option<(Time, TunnelPath)> {
        self.events.iter().find_map(|(t, e)| match e {
            NodeEvent::TunnelUp { peer: p, path, .. } if p == peer => Some((*t, *path)),
            _ => None,
        })
    }

    pub fn vaddrs(&self) -> (Ipv4Addr, Ipv6Addr) {
        self.node.virtual_addrs().expect("registered")
    }

    /// Payloads received (inner packet without its header).
    pub fn payloads(&self) -> Vec<Vec<u8>> {
        self.received
            .iter()
            .map(|(_, p)| {
                let h = if p.first().map(|b| b >> 4) == Some(6) {
                    40
                } else {
                    20
                };
                p[h..].to_vec()
            })
            .collect()
    }
}

pub struct RsHost {
    pub host: HostId,
    pub rs: RelayServer,
    pub rng: ChaCha8Rng,
    /// Where the DC sends RELAY_REQUEST: the RS's first IPv4 relay address.
    pub signaling: SocketAddr,
}

pub struct World {
    pub net: Net,
    pub internet: SegmentId,
    pub as_host: HostId,
    pub dc_host: HostId,
    pub as_addr: SocketAddr,
    pub dc_addrs: Vec<SocketAddr>,
    pub server: AccountServer,
    pub dc: DirectionCoordinator,
    pub as_rng: ChaCha8Rng,
    pub dc_rng: ChaCha8Rng,
    pub nodes: Vec<NodeHost>,
    pub relays: Vec<RsHost>,
    pub dc_events: Vec<(Time, DcEvent)>,
    by_host: BTreeMap<HostId, usize>,
}

pub struct WorldSetup {
    pub seed: u64,
    /// Every link's properties instead of the default latencies (for loss tests).
    pub link: Option<Link>,
    pub accounts: usize,
    /// Relays to create: each is dual-stack on the internet.
    pub relays: usize,
}

impl WorldSetup {
    pub fn new(seed: u64) -> Self {
        WorldSetup {
            seed,
            link: None,
            accounts: 4,
            relays: 1,
        }
    }
}

impl World {
    pub fn new(setup: &WorldSetup) -> World {
        let mut net = Net::new(setup.seed, setup.link);
        let internet = net.sim.internet();
        let as_host = net.host("as", internet, INTERNET_LINK);
        let dc_host = net.host("dc", internet, INTERNET_LINK);
        let second = net
            .sim
            .attach(dc_host, internet)
            .expect("second DC interface");
        net.set_links(dc_host, second.added, INTERNET_LINK);
        let as_addr = net.v4(as_host, AS_PORT);
        let mut dc_addrs: Vec<SocketAddr> = net
            .sim
            .addrs(dc_host)
            .iter()
            .map(|ip| SocketAddr::new(*ip, DC_PORT))
            .collect();
        dc_addrs.sort_by_key(|a| (a.is_ipv6(), *a));
        let mut relays = Vec::new();
        let mut links = Vec::new();
        for i in 0..setup.relays {
            let host = net.host(&format!("rs{i}"), internet, INTERNET_LINK);
            let ips = net.sim.addrs(host);
            let relay_addrs: Vec<SocketAddr> =
                ips.iter().map(|ip| SocketAddr::new(*ip, RS_PORT)).collect();
            let signaling = SocketAddr::new(net.sim.v4(host).expect("rs v4"), RS_PORT);
            let key_id = RS_KEY_ID + i as u32;
            let config = RsConfig::new(
                relay_addrs,
                vec![DcKey {
                    key: rs_key(i),
                    key_id,
                    high_water_mark: 0,
                }],
            );
            relays.push(RsHost {
                host,
                rs: RelayServer::new(config).expect("RS config"),
                rng: ChaCha8Rng::seed_from_u64(setup.seed ^ (0x7273 + i as u64)),
                signaling,
            });
            links.push(RelayLink {
                addr: signaling,
                key: rs_key(i),
                key_id,
                serves_v4: ips.iter().any(IpAddr::is_ipv4),
                serves_v6: ips.iter().any(IpAddr::is_ipv6),
            });
        }
        let accounts = (0..setup.accounts).map(|i| (account(i), node_name(i)));
        let as_config = super::as_config(&dc_addrs, accounts, ITERATIONS);
        let mut dc_config = DcConfig::new(
            fqdn("dc1.example"),
            dc_addrs.clone(),
            as_dc_key(),
            DC_KEY_ID,
            VirtualPools {
                v4: Ipv4Addr::new(100, 64, 1, 0),
                v4_prefix_len: 24,
                v6: "fd4e:544d:0:1::".parse().expect("v6 pool"),
            },
        );
        dc_config.relays = links;
        World {
            server: AccountServer::new(as_config).expect("AS config"),
            dc: DirectionCoordinator::new(dc_config).expect("DC config"),
            net,
            internet,
            as_host,
            dc_host,
            as_addr,
            dc_addrs,
            as_rng: ChaCha8Rng::seed_from_u64(setup.seed ^ 0x6173),
            dc_rng: ChaCha8Rng::seed_from_u64(setup.seed ^ 0x6463),
            nodes: Vec::new(),
            relays,
            dc_events: Vec::new(),
            by_host: BTreeMap::new(),
        }
    }

    /// A NAT on `outside` with this mapping (filtering address-and-port dependent).
    pub fn nat_on(&mut self, name: &str, outside: SegmentId, mapping: Mapping) -> SegmentId {
        self.net.nat(name, outside, mapping).1
    }

    /// Node `i` (account `node{i}@dc1.example`) on `segment`.
    pub fn add_node(&mut self, segment: SegmentId, link: Duration) -> usize {
        let index = self.nodes.len();
        let host = self.net.host(&format!("node{index}"), segment, link);
        self.add_node_on(index, host)
    }

    /// Node on a host made by the test (e.g. with a chosen address).
    pub fn add_node_on(&mut self, index: usize, host: HostId) -> usize {
        let local = self.local_addrs_of(host);
        // The AS is dual-stack: an IPv6-only node logs in over IPv6.
        let as_addr = if local.iter().any(SocketAddr::is_ipv4) {
            self.as_addr
        } else {
            SocketAddr::new(self.net.sim.v6(self.as_host).expect("AS v6"), AS_PORT)
        };
        let login = LoginConfig {
            min_iterations: ITERATIONS,
            ..LoginConfig::new(account(index), self.server.public_key(), as_addr)
        };
        let config = NodeConfig::new(
            login,
            local,
            SecretKey::from_bytes([0x40 + index as u8; 32]),
        );
        let node = Node::new(config, PASSWORD).expect("node config");
        self.nodes.push(NodeHost {
            index,
            host,
            node,
            rng: ChaCha8Rng::seed_from_u64(self.net.sim.seed() ^ (0x6e6f6465 + index as u64)),
            events: Vec::new(),
            received: Vec::new(),
        });
        self.by_host.insert(host, index);
        index
    }

    fn local_addrs_of(&self, host: HostId) -> Vec<SocketAddr> {
        self.net
            .sim
            .addrs(host)
            .into_iter()
            .map(|ip| SocketAddr::new(ip, NODE_PORT))
            .collect()
    }

    pub fn local_addrs(&self, i: usize) -> Vec<SocketAddr> {
        self.local_addrs_of(self.nodes[i].host)
    }

    /// Starts node `i` and runs until it is registered.
    pub fn bring_up(&mut self, i: usize, limit: Duration) {
        let now = self.now();
        let n = &mut self.nodes[i];
        n.node.start(now, &mut n.rng);
        let limit = self.now() + limit;
        self.run(limit, |w| w.nodes[i].node.phase() == Phase::Ready);
        assert_eq!(
            self.nodes[i].node.phase(),
            Phase::Ready,
            "node{i} did not register\n{}",
            self.context()
        );
    }

    /// Node `i` resolves node `j`; runs until both ends have the tunnel up or `limit`.
    pub fn connect(&mut self, i: usize, j: usize, limit: Duration) -> Time {
        let start = self.now();
        let peer = node_name(j);
        let n = &mut self.nodes[i];
        n.node.resolve(start, &peer, &mut n.rng);
        let me = node_name(i);
        let limit = start + limit;
        self.run(limit, |w| {
            w.nodes[i].node.tunnel(&peer).is_some() && w.nodes[j].node.tunnel(&me).is_some()
        });
        assert!(
            self.nodes[i].node.tunnel(&peer).is_some() && self.nodes[j].node.tunnel(&me).is_some(),
            "no tunnel node{i} <-> node{j}\n{}",
            self.context()
        );
        start
    }

    /// Node `i` sends a virtual IPv4 packet to node `j`'s virtual address.
    pub fn send_v4(&mut self, i: usize, j: usize, payload: &[u8]) -> Result<(), SendError> {
        let src = self.nodes[i].vaddrs().0;
        let dst = self.nodes[j].vaddrs().0;
        self.send_packet(i, &ipv4_packet(src, dst, payload))
    }

    pub fn send_v6(&mut self, i: usize, j: usize, payload: &[u8]) -> Result<(), SendError> {
        let src = self.nodes[i].vaddrs().1;
        let dst = self.nodes[j].vaddrs().1;
        self.send_packet(i, &ipv6_packet(src, dst, payload))
    }

    pub fn send_packet(&mut self, i: usize, packet: &[u8]) -> Result<(), SendError> {
        let now = self.now();
        let mut buf = vec![0u8; 2048];
        let n = &mut self.nodes[i];
        let t = n.node.encapsulate(now, packet, &mut buf)?;
        let host = n.host;
        let src = t.src.expect("the node names its socket");
        self.send(
            now,
            &format!("node{i}"),
            host,
            src,
            t.dst,
            buf[..t.len].to_vec(),
        );
        Ok(())
    }

    /// Sends `payload` from `i` to `j` and runs until `j` got it (or `limit`); returns when.
    pub fn deliver_v4(
        &mut self,
        i: usize,
        j: usize,
        payload: &[u8],
        limit: Duration,
    ) -> Option<Time> {
        let before = self.nodes[j].received.len();
        let r = self.send_v4(i, j, payload);
        assert!(
            matches!(r, Ok(()) | Err(SendError::Queued)),
            "node{i} could not send: {r:?}\n{}",
            self.context()
        );
        let limit = self.now() + limit;
        let p = payload.to_vec();
        self.run(limit, |w| {
            w.nodes[j].payloads().iter().skip(before).any(|x| *x == p)
        });
        self.nodes[j]
            .received
            .iter()
            .skip(before)
            .find(|(_, x)| x.ends_with(payload))
            .map(|(t, _)| *t)
    }

    /// Moves node `i`'s host to `segment` and tells the node; returns when.
    pub fn move_node(&mut self, i: usize, segment: SegmentId, link: Duration) -> Time {
        let host = self.nodes[i].host;
        let change = self.net.sim.move_host(host, segment).expect("move");
        self.net.set_links(host, change.added, link);
        let now = self.now();
        let local = self.local_addrs(i);
        let n = &mut self.nodes[i];
        n.node.handle_address_change(now, local, &mut n.rng);
        now
    }

    pub fn path(&self, i: usize, j: usize) -> Option<TunnelPath> {
        self.nodes[i].node.tunnel(&node_name(j)).map(|t| t.path)
    }

    pub fn errors(&self, i: usize) -> Vec<&NodeEvent> {
        self.nodes[i]
            .events
            .iter()
            .filter(|(_, e)| matches!(e, NodeEvent::Error(_)))
            .map(|(_, e)| e)
            .collect()
    }
}

/// The default link of a node behind a NAT.
pub const NAT_LINK: Duration = HOME_LINK;

impl Drive for World {
    fn net(&self) -> &Net {
        &self.net
    }

    fn net_mut(&mut self) -> &mut Net {
        &mut self.net
    }

    fn describe(&self) -> String {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| {
                format!(
                    "node{}: {:?}\n  events {:?}\n  tunnels {:?}",
                    n.index,
                    n.node,
                    n.events,
                    n.node.tunnels()
                )
            })
            .collect();
        format!(
            "{}\nDC {:?} paths {:?}\nRS {:?}\nAS drops {:?}",
            nodes.join("\n"),
            self.dc,
            self.dc.paths(),
            self.relays.iter().map(|r| &r.rs).collect::<Vec<_>>(),
            self.server.drops(),
        )
    }

    fn flush(&mut self, now: Time) {
        while let Some(e) = self.dc.poll_event() {
            self.dc_events.push((now, e));
        }
        while self.server.poll_event().is_some() {}
        let out = drain(|b| self.server.poll_transmit(now, b));
        let (host, addr) = (self.as_host, self.as_addr);
        self.send_all(now, "as", host, addr, out);
        let out = drain(|b| self.dc.poll_transmit(now, b));
        let (host, addr) = (self.dc_host, self.dc_addrs[0]);
        self.send_all(now, "dc", host, addr, out);
        for i in 0..self.relays.len() {
            while self.relays[i].rs.poll_event().is_some() {}
            let r = &mut self.relays[i];
            let out = drain(|b| r.rs.poll_transmit(now, b));
            let (host, addr) = (r.host, r.signaling);
            self.send_all(now, &format!("rs{i}"), host, addr, out);
        }
        for i in 0..self.nodes.len() {
            let n = &mut self.nodes[i];
            while let Some(e) = n.node.poll_event() {
                n.events.push((now, e));
            }
            let out = drain(|b| n.node.poll_transmit(now, b));
            let host = n.host;
            let default = self.local_addrs(i).first().copied().expect("node address");
            self.send_all(now, &format!("node{i}"), host, default, out);
        }
    }

    fn deliver(&mut self, d: Delivery) {
        let mut payload = d.payload;
        let now = d.at;
        if d.host == self.as_host {
            self.server
                .handle_datagram(now, d.local, d.remote, &mut payload, &mut self.as_rng);
        } else if d.host == self.dc_host {
            self.dc
                .handle_datagram(now, d.local, d.remote, &mut payload, &mut self.dc_rng);
        } else if let Some(r) = self.relays.iter_mut().find(|r| r.host == d.host) {
            r.rs.handle_datagram(now, d.local, d.remote, &mut payload, &mut r.rng);
        } else if let Some(&i) = self.by_host.get(&d.host) {
            let n = &mut self.nodes[i];
            if let Received::Packet(range) =
                n.node
                    .handle_datagram(now, d.local, d.remote, &mut payload, &mut n.rng)
            {
                n.received.push((now, payload[range].to_vec()));
            }
        }
    }

    fn next_timer(&self) -> Option<Time> {
        let mut t: Vec<Time> = Vec::new();
        t.extend(self.server.poll_timeout().map(|x| x.0));
        t.extend(self.dc.poll_timeout().map(|x| x.0));
        t.extend(
            self.relays
                .iter()
                .filter_map(|r| r.rs.poll_timeout().map(|x| x.0)),
        );
        t.extend(
            self.nodes
                .iter()
                .filter_map(|n| n.node.poll_timeout().map(|x| x.0)),
        );
        t.into_iter().min()
    }

    fn handle_timeout(&mut self, now: Time) {
        self.server.handle_timeout(now, &mut self.as_rng);
        self.dc.handle_timeout(now, &mut self.dc_rng);
        for r in &mut self.relays {
            r.rs.handle_timeout(now, &mut r.rng);
        }
        for n in &mut self.nodes {
            n.node.handle_timeout(now, &mut n.rng);
        }
    }
}

impl World {
    /// Restarts node `i`: a fresh `Node` for the same account and static key on the same host
    /// (whatever the old one held is gone), started at once. What the test recorded about the
    /// node (events, packets received) is kept.
    pub fn restart_node(&mut self, i: usize) {
        let local = self.local_addrs(i);
        let as_addr = if local.iter().any(SocketAddr::is_ipv4) {
            self.as_addr
        } else {
            SocketAddr::new(self.net.sim.v6(self.as_host).expect("AS v6"), AS_PORT)
        };
        let login = LoginConfig {
            min_iterations: ITERATIONS,
            ..LoginConfig::new(account(i), self.server.public_key(), as_addr)
        };
        let secret = SecretKey::from_bytes([0x40 + i as u8; 32]);
        let node = Node::new(NodeConfig::new(login, local, secret), PASSWORD).expect("node config");
        let now = self.now();
        let n = &mut self.nodes[i];
        n.node = node;
        n.node.start(now, &mut n.rng);
    }

    /// Gives every host interface and every NAT in `nats` this link from now on.
    pub fn set_every_link(&mut self, nats: &[ntm_state::sim::NatId], link: Link) {
        let mut hosts = vec![self.as_host, self.dc_host];
        hosts.extend(self.relays.iter().map(|r| r.host));
        hosts.extend(self.nodes.iter().map(|n| n.host));
        for host in hosts {
            for ip in self.net.sim.addrs(host) {
                self.net.sim.set_link(host, ip, link).expect("link");
            }
        }
        for nat in nats {
            self.net.sim.set_nat_link(*nat, link).expect("NAT link");
        }
    }
}
