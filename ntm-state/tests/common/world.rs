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
    pub fqdn: Fqdn,
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

/// A second DC (another zone) and the parent zone's name server the DCs resolve through.
pub struct Domain2 {
    pub host: HostId,
    pub dc: DirectionCoordinator,
    pub addrs: Vec<SocketAddr>,
    pub rng: ChaCha8Rng,
    pub resolver_host: HostId,
    pub resolver: SocketAddr,
    pub parent: ntm_state::dns::ParentZone,
    /// DNS queries the parent zone's server answered.
    pub queries: usize,
}

pub const DNS_PORT: u16 = 53;

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
    /// The configuration the AS was made with.
    pub server_config: ntm_state::as_server::AsConfig,
    pub dc: DirectionCoordinator,
    pub as_rng: ChaCha8Rng,
    pub dc_rng: ChaCha8Rng,
    pub nodes: Vec<NodeHost>,
    pub relays: Vec<RsHost>,
    pub dc_events: Vec<(Time, DcEvent)>,
    pub domain2: Option<Domain2>,
    /// Datagrams delivered to hosts that run no machine (a test's own stub).
    pub stray: Vec<Delivery>,
    /// Nodes added from now on get this `NodeLimits::key_packet_limit`.
    pub key_packet_limit: Option<u64>,
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
            server: AccountServer::new(as_config.clone()).expect("AS config"),
            server_config: as_config,
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
            domain2: None,
            stray: Vec::new(),
            key_packet_limit: None,
            by_host: BTreeMap::new(),
        }
    }

    /// Two domains: `dc1.example` (this world's DC) and `dc2.example` (a second DC with the
    /// same RS setup left out: relays belong to dc1), under a parent zone `example` whose name
    /// server delegates both with glue. The DCs know each other only from the directory (DC ID
    /// and static key, no address): they find each other by NS lookups. Accounts
    /// `node{i}@dc1.example` and `node{i}@dc2.example` exist for i < `setup.accounts`.
    pub fn two_domains(setup: &WorldSetup) -> World {
        let mut w = World::new(setup);
        let internet = w.internet;
        let host = w.net.host("dc2", internet, INTERNET_LINK);
        let addrs: Vec<SocketAddr> = w
            .net
            .sim
            .addrs(host)
            .iter()
            .map(|ip| SocketAddr::new(*ip, DC_PORT))
            .collect();
        let resolver_host = w.net.host("ns.example", internet, INTERNET_LINK);
        let resolver = SocketAddr::new(w.net.sim.v4(resolver_host).expect("v4"), DNS_PORT);
        let (s1, s2) = (
            SecretKey::from_bytes([0xd1; 32]),
            SecretKey::from_bytes([0xd2; 32]),
        );
        let p1 = ntm_wire::crypto::x25519_public(s1.expose());
        let p2 = ntm_wire::crypto::x25519_public(s2.expose());
        let entry = |zone: &str, dc_id, public_key| ntm_state::dc::DirectoryEntry {
            zone: fqdn(zone),
            dc_id,
            public_key,
            addrs: Vec::new(),
        };
        let mut c2 = DcConfig::new(
            fqdn("dc2.example"),
            addrs.clone(),
            super::as_dc_key(),
            DC_KEY_ID + 1,
            VirtualPools {
                v4: Ipv4Addr::new(100, 64, 2, 0),
                v4_prefix_len: 24,
                v6: "fd4e:544d:0:2::".parse().expect("v6 pool"),
            },
        );
        c2.dc_id = 2;
        c2.static_secret = Some(s2);
        c2.directory = vec![entry("dc1.example", 1, p1)];
        c2.resolvers = vec![resolver];
        let mut c1 = w.dc.config().clone();
        c1.dc_id = 1;
        c1.static_secret = Some(s1);
        c1.directory = vec![entry("dc2.example", 2, p2)];
        c1.resolvers = vec![resolver];
        w.dc = DirectionCoordinator::new(c1).expect("DC1 config");
        // The AS serves both domains.
        let mut as_config = w.server_config.clone();
        as_config.dcs.insert(
            fqdn("dc2.example"),
            ntm_state::as_server::DcLink {
                key: super::as_dc_key(),
                key_id: DC_KEY_ID + 1,
                addr: addrs[0],
                high_water_mark: 0,
            },
        );
        let dc2_list = ntm_wire::AddrList::new(
            addrs
                .iter()
                .map(|a| ntm_wire::TransportAddr::new(*a))
                .collect(),
        )
        .expect("addrs");
        let template = as_config
            .accounts
            .values()
            .next()
            .cloned()
            .expect("an account");
        for i in 0..setup.accounts {
            let mut record = template.clone();
            record.node_fqdn = fqdn(&format!("node{i}.dc2.example"));
            record.dc = fqdn("dc2.example");
            record.dc_addrs = dc2_list.clone();
            as_config
                .accounts
                .insert(super::account(&format!("node{i}@dc2.example")), record);
        }
        w.server = AccountServer::new(as_config).expect("AS config");
        let mut parent = ntm_state::dns::ParentZone::new(fqdn("example"), 3600);
        for (zone, a) in [("dc1", &w.dc_addrs), ("dc2", &addrs)] {
            let v4 = a.iter().filter_map(|x| match x.ip() {
                IpAddr::V4(v) => Some(v),
                IpAddr::V6(_) => None,
            });
            let v6 = a.iter().filter_map(|x| match x.ip() {
                IpAddr::V6(v) => Some(v),
                IpAddr::V4(_) => None,
            });
            parent
                .delegate(
                    fqdn(&format!("{zone}.example")),
                    fqdn(&format!("ns.{zone}.example")),
                    v4.collect(),
                    v6.collect(),
                )
                .expect("delegation");
        }
        w.domain2 = Some(Domain2 {
            host,
            dc: DirectionCoordinator::new(c2).expect("DC2 config"),
            addrs,
            rng: ChaCha8Rng::seed_from_u64(setup.seed ^ 0x0064_6332),
            resolver_host,
            resolver,
            parent,
            queries: 0,
        });
        w
    }

    /// A node of `dc2.example` (account `node{i}@dc2.example`) on `segment`.
    pub fn add_node_dc2(&mut self, i: usize, segment: SegmentId, link: Duration) -> usize {
        let index = self.nodes.len();
        let host = self.net.host(&format!("dc2-node{i}"), segment, link);
        self.add_node_named(
            index,
            host,
            super::account(&format!("node{i}@dc2.example")),
            fqdn(&format!("node{i}.dc2.example")),
        )
    }

    /// An access network routed into the internet without NAT (e.g. IPv4-only, IPv6-only).
    pub fn segment(&mut self, name: &str, stack: ntm_state::sim::Stack) -> SegmentId {
        let internet = self.internet;
        self.net
            .sim
            .segment(name, stack, Some(internet))
            .expect("segment")
    }

    /// A NAT on `outside` with this mapping (filtering address-and-port dependent).
    pub fn nat_on(&mut self, name: &str, outside: SegmentId, mapping: Mapping) -> SegmentId {
        self.net.nat(name, outside, mapping).1
    }

    /// A NAT on `outside` with this mapping and filtering (ports preserved, no hairpin).
    pub fn nat_with(
        &mut self,
        name: &str,
        outside: SegmentId,
        mapping: Mapping,
        filtering: ntm_state::sim::Filtering,
    ) -> SegmentId {
        let (nat, inside) = self
            .net
            .sim
            .nat(
                name,
                outside,
                ntm_state::sim::NatConfig::new(mapping, filtering),
            )
            .expect("nat");
        let _ = self.net.sim.set_nat_link(nat, Link::latency(HOME_LINK));
        inside
    }

    /// Node `i` (account `node{i}@dc1.example`) on `segment`.
    pub fn add_node(&mut self, segment: SegmentId, link: Duration) -> usize {
        let index = self.nodes.len();
        let host = self.net.host(&format!("node{index}"), segment, link);
        self.add_node_on(index, host)
    }

    /// Node on a host made by the test (e.g. with a chosen address).
    pub fn add_node_on(&mut self, index: usize, host: HostId) -> usize {
        self.add_node_named(index, host, account(index), node_name(index))
    }

    fn add_node_named(
        &mut self,
        index: usize,
        host: HostId,
        account: ntm_wire::Account,
        fqdn: Fqdn,
    ) -> usize {
        let local = self.local_addrs_of(host);
        // The AS is dual-stack: an IPv6-only node logs in over IPv6.
        let as_addr = if local.iter().any(SocketAddr::is_ipv4) {
            self.as_addr
        } else {
            SocketAddr::new(self.net.sim.v6(self.as_host).expect("AS v6"), AS_PORT)
        };
        let login = LoginConfig {
            min_iterations: ITERATIONS,
            ..LoginConfig::new(account, self.server.public_key(), as_addr)
        };
        let mut config = NodeConfig::new(
            login,
            local,
            SecretKey::from_bytes([0x40 + index as u8; 32]),
        );
        if let Some(limit) = self.key_packet_limit {
            config.limits.key_packet_limit = limit;
        }
        let node = Node::new(config, PASSWORD).expect("node config");
        self.nodes.push(NodeHost {
            index,
            fqdn,
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
        let peer = self.nodes[j].fqdn.clone();
        let n = &mut self.nodes[i];
        n.node.resolve(start, &peer, &mut n.rng);
        let me = self.nodes[i].fqdn.clone();
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
            matches!(r, Ok(()) | Err(SendError::Queued | SendError::QueueFull)),
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
        self.nodes[i]
            .node
            .tunnel(&self.nodes[j].fqdn)
            .map(|t| t.path)
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
        if let Some(d) = self.domain2.as_mut() {
            while d.dc.poll_event().is_some() {}
            let out = drain(|b| d.dc.poll_transmit(now, b));
            let (host, addr) = (d.host, d.addrs[0]);
            self.send_all(now, "dc2", host, addr, out);
        }
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
        } else if let Some(dom) = self.domain2.as_mut().filter(|x| x.host == d.host) {
            dom.dc
                .handle_datagram(now, d.local, d.remote, &mut payload, &mut dom.rng);
        } else if let Some(dom) = self.domain2.as_mut().filter(|x| x.resolver_host == d.host) {
            let mut out = [0u8; 1232];
            if let Ok(n) = dom.parent.answer(&payload, &mut out) {
                dom.queries += 1;
                let (host, src) = (dom.resolver_host, dom.resolver);
                self.send(now, "resolver", host, src, d.remote, out[..n].to_vec());
            }
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
        } else {
            self.stray.push(Delivery { payload, ..d });
        }
    }

    fn timers(&self) -> String {
        let mut t = vec![
            format!("as {:?}", self.server.poll_timeout()),
            format!("dc {:?}", self.dc.poll_timeout()),
        ];
        t.extend(
            self.relays
                .iter()
                .map(|r| format!("rs {:?}", r.rs.poll_timeout())),
        );
        t.extend(
            self.nodes
                .iter()
                .map(|n| format!("node{} {:?}", n.index, n.node.poll_timeout())),
        );
        t.join(", ")
    }

    fn next_timer(&self) -> Option<Time> {
        let mut t: Vec<Time> = Vec::new();
        t.extend(self.server.poll_timeout().map(|x| x.0));
        t.extend(self.dc.poll_timeout().map(|x| x.0));
        t.extend(
            self.domain2
                .as_ref()
                .and_then(|d| d.dc.poll_timeout())
                .map(|x| x.0),
        );
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
        if let Some(d) = self.domain2.as_mut() {
            d.dc.handle_timeout(now, &mut d.rng);
        }
        for r in &mut self.relays {
            r.rs.handle_timeout(now, &mut r.rng);
        }
        for n in &mut self.nodes {
            n.node.handle_timeout(now, &mut n.rng);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The same deployment with the DC's cache server and notification server.

use ntm_state::cs::{CacheServer, CsConfig, CsEvent};
use ntm_state::dc::ServerLink;
use ntm_state::node::NsCommand;
use ntm_state::ns::{ConnId, NotificationServer, NsConfig, NsEvent};
use ntm_wire::{AddrList, TransportAddr};

pub const CS_PORT: u16 = 4283;
pub const NS_PORT: u16 = 4284;
/// The DC↔CS and DC↔NS key IDs.
pub const CS_KEY_ID: u32 = 50;
pub const NS_KEY_ID: u32 = 51;

pub fn cs_key() -> SecretKey {
    SecretKey::from_bytes([0xc5; 32])
}

pub fn ns_key() -> SecretKey {
    SecretKey::from_bytes([0x45; 32])
}

/// Something on the modelled TCP push channel, due at a time.
enum StreamEvent {
    /// The node's connection is established (the NS accepts it at this moment).
    Connected { node: usize, conn: ConnId },
    /// Bytes the node wrote reach the NS.
    ToNs { conn: ConnId, bytes: Vec<u8> },
    /// Bytes the NS wrote reach the node.
    ToNode {
        node: usize,
        conn: ConnId,
        bytes: Vec<u8>,
    },
    /// The NS closed the connection: the node learns it.
    ClosedByNs { node: usize, conn: ConnId },
    /// The node closed the connection: the NS learns it.
    ClosedByNode { conn: ConnId },
}

/// A [`World`] whose DC has a CS and an NS (each its own host on the internet, one trip from
/// everything like the DC), whose AS hands out their addresses at login, and which drives them.
///
/// The simulator carries only UDP. The NS push channel is TCP, so it is modelled here and not
/// in the simulator: the bytes a node's `poll_ns_stream` gives reach the NS's `handle_stream`
/// after `stream_delay`, and the NS's `poll_stream_transmit` bytes reach the node's
/// `handle_ns_stream` after the same delay; a connect completes after it too, and a close
/// reaches the other side after it. The channel is not subject to the NATs of the simulated
/// network (a TCP connection's NAT state lives as long as the connection).
pub struct ServersWorld {
    pub w: World,
    pub cs_host: HostId,
    pub cs_addr: SocketAddr,
    pub cs: CacheServer,
    pub cs_rng: ChaCha8Rng,
    pub cs_events: Vec<(Time, CsEvent)>,
    pub ns_host: HostId,
    pub ns_addr: SocketAddr,
    pub ns: NotificationServer,
    pub ns_rng: ChaCha8Rng,
    pub ns_events: Vec<(Time, NsEvent)>,
    pub stream_delay: Duration,
    /// Each node's connection to the NS, while it has one.
    conns: BTreeMap<usize, ConnId>,
    next_conn: u64,
    /// Channel events in flight, in the order they happened (arrival times never decrease,
    /// since every one takes `stream_delay`).
    stream: std::collections::VecDeque<(Time, StreamEvent)>,
}

impl ServersWorld {
    pub fn new(setup: &WorldSetup, stream_delay: Duration) -> ServersWorld {
        let mut w = World::new(setup);
        let internet = w.internet;
        let cs_host = w.net.host("cs", internet, INTERNET_LINK);
        let ns_host = w.net.host("ns", internet, INTERNET_LINK);
        let cs_addr = w.net.v4(cs_host, CS_PORT);
        let ns_addr = w.net.v4(ns_host, NS_PORT);
        let accounts = (0..setup.accounts).map(|i| (account(i), node_name(i)));
        let mut as_config = super::as_config(&w.dc_addrs, accounts, ITERATIONS);
        for record in as_config.accounts.values_mut() {
            record.cs_addrs = AddrList::new(vec![TransportAddr::new(cs_addr)]).expect("cs");
            record.ns_addrs = AddrList::new(vec![TransportAddr::new(ns_addr)]).expect("ns");
        }
        w.server = AccountServer::new(as_config).expect("AS config");
        let mut dc_config = w.dc.config().clone();
        dc_config.cs = Some(ServerLink::new(cs_addr, cs_key(), CS_KEY_ID));
        dc_config.ns = Some(ServerLink::new(ns_addr, ns_key(), NS_KEY_ID));
        w.dc = DirectionCoordinator::new(dc_config).expect("DC config");
        let cs = CacheServer::new(CsConfig::new(
            fqdn("cs.dc1.example"),
            fqdn("dc1.example"),
            w.dc_addrs[0],
            cs_key(),
            CS_KEY_ID,
        ))
        .expect("CS config");
        let ns =
            NotificationServer::new(NsConfig::new(fqdn("ns.dc1.example"), ns_key(), NS_KEY_ID))
                .expect("NS config");
        ServersWorld {
            w,
            cs_host,
            cs_addr,
            cs,
            cs_rng: ChaCha8Rng::seed_from_u64(setup.seed ^ 0x6373),
            cs_events: Vec::new(),
            ns_host,
            ns_addr,
            ns,
            ns_rng: ChaCha8Rng::seed_from_u64(setup.seed ^ 0x6e73),
            ns_events: Vec::new(),
            stream_delay,
            conns: BTreeMap::new(),
            next_conn: 1,
            stream: std::collections::VecDeque::new(),
        }
    }

    /// A new, not yet started node `i` on the host of `w.nodes[i]`, which keeps a push channel
    /// when `push`; the same account and static key as before.
    fn fresh_node(&self, i: usize, push: bool) -> Node {
        let host = self.w.nodes[i].host;
        let local = self.w.local_addrs_of(host);
        let as_addr = if local.iter().any(SocketAddr::is_ipv4) {
            self.w.as_addr
        } else {
            SocketAddr::new(self.w.net.sim.v6(self.w.as_host).expect("AS v6"), AS_PORT)
        };
        let login = LoginConfig {
            min_iterations: ITERATIONS,
            ..LoginConfig::new(account(i), self.w.server.public_key(), as_addr)
        };
        let mut config = NodeConfig::new(login, local, SecretKey::from_bytes([0x40 + i as u8; 32]));
        config.wants_notification = push;
        Node::new(config, PASSWORD).expect("node config")
    }

    /// Node `i` on `segment`, keeping a push channel to the NS when `push`.
    pub fn add_node(&mut self, segment: SegmentId, link: Duration, push: bool) -> usize {
        let i = self.w.add_node(segment, link);
        if push {
            self.w.nodes[i].node = self.fresh_node(i, true);
        }
        i
    }

    /// Node `i`'s device is switched off: its machine is gone (the DC learns nothing; its
    /// registration lapses), and a new one, not yet started, waits on the same host.
    pub fn switch_off(&mut self, i: usize, push: bool) {
        if let Some(conn) = self.conns.remove(&i) {
            self.ns.close_connection(conn);
        }
        self.w.nodes[i].node = self.fresh_node(i, push);
    }

    /// Starts node `i` and runs until it is registered.
    pub fn bring_up(&mut self, i: usize, limit: Duration) {
        let now = self.now();
        let n = &mut self.w.nodes[i];
        n.node.start(now, &mut n.rng);
        let limit = self.now() + limit;
        self.run(limit, |s| s.w.nodes[i].node.phase() == Phase::Ready);
        assert_eq!(
            self.w.nodes[i].node.phase(),
            Phase::Ready,
            "node{i} did not register\n{}",
            self.context()
        );
    }

    fn schedule(&mut self, now: Time, e: StreamEvent) {
        self.stream.push_back((now + self.stream_delay, e));
    }

    fn node_of(&self, conn: ConnId) -> Option<usize> {
        self.conns
            .iter()
            .find(|(_, c)| **c == conn)
            .map(|(i, _)| *i)
    }

    /// Moves what the nodes and the NS wrote onto the modelled channel.
    fn flush_streams(&mut self, now: Time) {
        for i in 0..self.w.nodes.len() {
            while let Some(cmd) = self.w.nodes[i].node.poll_ns_command() {
                match cmd {
                    NsCommand::Connect(addr) if addr == self.ns_addr => {
                        let conn = ConnId(self.next_conn);
                        self.next_conn += 1;
                        self.conns.insert(i, conn);
                        self.schedule(now, StreamEvent::Connected { node: i, conn });
                    }
                    NsCommand::Connect(_) => self.w.nodes[i].node.ns_closed(now),
                    NsCommand::Close => {
                        if let Some(conn) = self.conns.remove(&i) {
                            self.schedule(now, StreamEvent::ClosedByNode { conn });
                        }
                    }
                }
            }
            let mut buf = [0u8; 2048];
            loop {
                let n = self.w.nodes[i].node.poll_ns_stream(&mut buf);
                if n == 0 {
                    break;
                }
                if let Some(&conn) = self.conns.get(&i) {
                    let bytes = buf[..n].to_vec();
                    self.schedule(now, StreamEvent::ToNs { conn, bytes });
                }
            }
        }
        let mut closing = Vec::new();
        while let Some(e) = self.ns.poll_event() {
            if let NsEvent::CloseConnection(conn) = e {
                closing.push(conn);
            }
            self.ns_events.push((now, e));
        }
        let mut buf = [0u8; 2048];
        while let Some((conn, n)) = self.ns.poll_stream_transmit(&mut buf) {
            if let Some(node) = self.node_of(conn) {
                let bytes = buf[..n].to_vec();
                self.schedule(now, StreamEvent::ToNode { node, conn, bytes });
            }
        }
        for conn in closing {
            self.ns.close_connection(conn);
            if let Some(node) = self.node_of(conn) {
                self.schedule(now, StreamEvent::ClosedByNs { node, conn });
            }
        }
    }

    fn stream_due(&mut self, now: Time) {
        while self.stream.front().is_some_and(|(at, _)| *at <= now) {
            let Some((_, e)) = self.stream.pop_front() else {
                break;
            };
            match e {
                StreamEvent::Connected { node, conn } => {
                    if self.conns.get(&node) != Some(&conn) {
                        continue;
                    }
                    let remote = self.w.local_addrs(node)[0];
                    let n = &mut self.w.nodes[node];
                    if self.ns.open_connection(now, conn, remote) {
                        n.node.ns_connected(now, &mut n.rng);
                    } else {
                        self.conns.remove(&node);
                        n.node.ns_closed(now);
                    }
                }
                StreamEvent::ToNs { conn, bytes } => self.ns.handle_stream(now, conn, &bytes),
                StreamEvent::ToNode { node, conn, bytes } => {
                    if self.conns.get(&node) == Some(&conn) {
                        let n = &mut self.w.nodes[node];
                        n.node.handle_ns_stream(now, &bytes, &mut n.rng);
                    }
                }
                StreamEvent::ClosedByNs { node, conn } => {
                    if self.conns.get(&node) == Some(&conn) {
                        self.conns.remove(&node);
                        self.w.nodes[node].node.ns_closed(now);
                    }
                }
                StreamEvent::ClosedByNode { conn } => self.ns.close_connection(conn),
            }
        }
    }
}

impl Drive for ServersWorld {
    fn net(&self) -> &Net {
        &self.w.net
    }

    fn net_mut(&mut self) -> &mut Net {
        &mut self.w.net
    }

    fn describe(&self) -> String {
        format!(
            "{}\nCS {:?} held {:?}\nNS {:?} channels {:?}\nCS events {:?}\nNS events {:?}",
            self.w.describe(),
            self.cs,
            self.cs.held(),
            self.ns,
            self.conns,
            self.cs_events,
            self.ns_events,
        )
    }

    fn flush(&mut self, now: Time) {
        // The channel first: what a node wrote is taken before `w.flush` polls its events.
        self.flush_streams(now);
        self.w.flush(now);
        while let Some(e) = self.cs.poll_event() {
            self.cs_events.push((now, e));
        }
        let out = drain(|b| self.cs.poll_transmit(now, b));
        let (host, addr) = (self.cs_host, self.cs_addr);
        self.send_all(now, "cs", host, addr, out);
        self.flush_streams(now);
        let out = drain(|b| self.ns.poll_transmit(now, b));
        let (host, addr) = (self.ns_host, self.ns_addr);
        self.send_all(now, "ns", host, addr, out);
    }

    fn deliver(&mut self, d: Delivery) {
        let mut payload = d.payload;
        let now = d.at;
        if d.host == self.cs_host {
            self.cs
                .handle_datagram(now, d.local, d.remote, &mut payload, &mut self.cs_rng);
        } else if d.host == self.ns_host {
            self.ns
                .handle_datagram(now, d.local, d.remote, &mut payload, &mut self.ns_rng);
        } else {
            self.w.deliver(Delivery { payload, ..d });
        }
    }

    fn next_timer(&self) -> Option<Time> {
        [
            self.w.next_timer(),
            self.cs.poll_timeout().map(|x| x.0),
            self.ns.poll_timeout().map(|x| x.0),
            self.stream.front().map(|(at, _)| *at),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn handle_timeout(&mut self, now: Time) {
        self.stream_due(now);
        self.w.handle_timeout(now);
        self.cs.handle_timeout(now, &mut self.cs_rng);
        self.ns.handle_timeout(now, &mut self.ns_rng);
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
