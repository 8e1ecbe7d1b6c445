//! Login then registration (spec/05-procedures.md §5.2 steps 1-7 and 10, §5.3 NAT detection,
//! §5.4 upkeep) run in the simulator with the real AS and DC. The DC has two addresses per family
//! on the internet, so nodes can probe their NAT's mapping; nodes log in with a `LoginClient` and
//! hand the session to a `Registrar`, as a node would.
//!
//! Every failure message starts with the seed and the simulator's capture (`sim.dump()`).

mod common;

use core::time::Duration;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use common::{
    as_dc_key, drain, fqdn, lossy, ms, Drive, Net, AS_PORT, DC_KEY_ID, DC_PORT, HOME_LINK,
    INTERNET_LINK, NODE_PORT, ONE_WAY, PASSWORD,
};
use ntm_state::as_server::AccountServer;
use ntm_state::dc::{DcConfig, DcEvent, DirectionCoordinator, VirtualPools};
use ntm_state::login::{LoginClient, LoginConfig, LoginEvent, Session};
use ntm_state::registration::{Registrar, RegistrarConfig, RegistrationEvent, RegistrationFailure};
use ntm_state::sim::{Delivery, HostId, Link, Mapping, SegmentId};
use ntm_state::time::Time;
use ntm_wire::{Account, ErrorCode, Fqdn, MessageType, NatBehaviour};
use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;

/// PBKDF2 is not what these tests are about: a low count keeps 200 logins cheap in debug builds
/// (the nodes are configured to accept it).
const ITERATIONS: u32 = 1_000;

fn account(i: usize) -> Account {
    common::account(&format!("node{i}@dc1.example"))
}

fn node_name(i: usize) -> Fqdn {
    fqdn(&format!("node{i}.dc1.example"))
}

/// The default link of a node on the internet or behind a NAT (unless every link is set).
fn node_link(behind_nat: bool) -> Duration {
    if behind_nat {
        HOME_LINK
    } else {
        INTERNET_LINK
    }
}

/// A node: its host, its login client, and its registrar once logged in.
struct NodeHost {
    index: usize,
    host: HostId,
    login: LoginClient,
    registrar: Option<Registrar>,
    rng: ChaCha8Rng,
    /// What the node registers as; its own FQDN unless a test makes it lie.
    claim: Option<Fqdn>,
    /// Start over (login and registration) after a timeout, as a node would.
    retry: bool,
    logins_started: u32,
    sessions: Vec<(Time, Session)>,
    login_events: Vec<(Time, LoginEvent)>,
    events: Vec<(Time, RegistrationEvent)>,
}

impl NodeHost {
    fn registered(&self) -> Vec<(Time, Ipv4Addr, Ipv6Addr, SocketAddr, NatBehaviour)> {
        self.events
            .iter()
            .filter_map(|(t, e)| match e {
                RegistrationEvent::Registered {
                    vip4,
                    vip6,
                    observed,
                    nat,
                } => Some((*t, *vip4, *vip6, *observed, *nat)),
                RegistrationEvent::Failed(_) => None,
            })
            .collect()
    }
}

struct Setup {
    seed: u64,
    /// Every link's properties (host interfaces and NATs), instead of the default latencies.
    link: Option<Link>,
    accounts: usize,
}

impl Setup {
    fn new(seed: u64) -> Self {
        Setup {
            seed,
            link: None,
            accounts: 4,
        }
    }
}

struct World {
    net: Net,
    internet: SegmentId,
    as_host: HostId,
    dc_host: HostId,
    as_addr: SocketAddr,
    /// v4 #1, v4 #2, v6 #1, v6 #2.
    dc_addrs: Vec<SocketAddr>,
    server: AccountServer,
    dc: DirectionCoordinator,
    as_rng: ChaCha8Rng,
    dc_rng: ChaCha8Rng,
    nodes: Vec<NodeHost>,
    by_host: BTreeMap<HostId, usize>,
    dc_events: Vec<(Time, DcEvent)>,
    /// Every datagram delivered to the DC, as it arrived (source after NAT translation).
    to_dc: Vec<Delivery>,
}

fn dc_config(dc_addrs: &[SocketAddr]) -> DcConfig {
    DcConfig::new(
        fqdn("dc1.example"),
        dc_addrs.to_vec(),
        as_dc_key(),
        DC_KEY_ID,
        VirtualPools {
            v4: Ipv4Addr::new(100, 64, 1, 0),
            v4_prefix_len: 24,
            v6: "fd4e:544d:0:1::".parse().expect("v6 pool"),
        },
    )
}

impl World {
    /// The AS and a DC with two interfaces (two IPv4 and two IPv6 addresses) on the internet.
    /// Without `setup.link`: AS and DC links 10 ms, so a node on the internet (10 ms link) or
    /// behind a NAT (5 ms link, 5 ms NAT link) is one 20 ms trip from the DC.
    fn new(setup: &Setup) -> World {
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
        assert_eq!(dc_addrs.len(), 4, "{dc_addrs:?}");
        let accounts = (0..setup.accounts).map(|i| (account(i), node_name(i)));
        let as_config = common::as_config(&dc_addrs, accounts, ITERATIONS);
        World {
            server: AccountServer::new(as_config).expect("AS config"),
            dc: DirectionCoordinator::new(dc_config(&dc_addrs)).expect("DC config"),
            net,
            internet,
            as_host,
            dc_host,
            as_addr,
            dc_addrs,
            as_rng: ChaCha8Rng::seed_from_u64(setup.seed ^ 0x6173),
            dc_rng: ChaCha8Rng::seed_from_u64(setup.seed ^ 0x6463),
            nodes: Vec::new(),
            by_host: BTreeMap::new(),
            dc_events: Vec::new(),
            to_dc: Vec::new(),
        }
    }

    /// Node `i` (account `node{i}@dc1.example`) on `segment`; `behind_nat` picks its link.
    fn add_node(&mut self, segment: SegmentId, behind_nat: bool) -> usize {
        let index = self.nodes.len();
        let host = self
            .net
            .host(&format!("node{index}"), segment, node_link(behind_nat));
        let config = LoginConfig {
            min_iterations: ITERATIONS,
            ..LoginConfig::new(account(index), self.server.public_key(), self.as_addr)
        };
        let login = LoginClient::new(config, PASSWORD).expect("login client");
        self.nodes.push(NodeHost {
            index,
            host,
            login,
            registrar: None,
            rng: ChaCha8Rng::seed_from_u64(self.net.sim.seed() ^ (0x6e6f6465 + index as u64)),
            claim: None,
            retry: false,
            logins_started: 0,
            sessions: Vec::new(),
            login_events: Vec::new(),
            events: Vec::new(),
        });
        self.by_host.insert(host, index);
        index
    }

    /// A NAT on the internet with this mapping (filtering address-and-port dependent, ports
    /// preserved), its link 5 ms unless every link is set.
    fn nat(&mut self, name: &str, mapping: Mapping) -> (SegmentId, IpAddr) {
        let (nat, inside) = self.net.nat(name, self.internet, mapping);
        let outside = self.net.sim.nat_addrs(nat);
        (inside, outside[0])
    }

    fn local_addrs(&self, i: usize) -> Vec<SocketAddr> {
        self.net
            .sim
            .addrs(self.nodes[i].host)
            .into_iter()
            .map(|ip| SocketAddr::new(ip, NODE_PORT))
            .collect()
    }

    /// Moves node `i` to `segment` (with the default link for where it lands) and tells its
    /// registrar; returns when that happened and the new local addresses.
    fn move_node(
        &mut self,
        i: usize,
        segment: SegmentId,
        behind_nat: bool,
    ) -> (Time, Vec<SocketAddr>) {
        let host = self.nodes[i].host;
        let change = self.net.sim.move_host(host, segment).expect("move");
        assert!(!change.added.is_empty());
        self.net
            .set_links(host, change.added, node_link(behind_nat));
        let now = self.now();
        let local = self.local_addrs(i);
        let node = &mut self.nodes[i];
        if let Some(r) = node.registrar.as_mut() {
            r.handle_address_change(now, local.clone(), &mut node.rng);
        }
        (now, local)
    }

    fn login(&mut self, i: usize) {
        let now = self.now();
        let node = &mut self.nodes[i];
        node.registrar = None;
        node.logins_started += 1;
        node.login.login(now, &mut node.rng);
    }

    /// What node `i` does with its machines' events at `now`: a session becomes a registrar
    /// that registers at once; with `retry`, a timeout starts over with a new login.
    fn node_reacts(&mut self, now: Time, i: usize) {
        let local_addrs = self.local_addrs(i);
        let node = &mut self.nodes[i];
        let mut restart = false;
        while let Some(e) = node.login.poll_event() {
            node.login_events.push((now, e.clone()));
            match e {
                LoginEvent::LoggedIn(session) => {
                    node.sessions.push((now, session.clone()));
                    let mut session = session;
                    if let Some(claim) = &node.claim {
                        session.node_fqdn = claim.clone();
                    }
                    let config = RegistrarConfig::new(local_addrs.clone(), [node.index as u8; 32]);
                    let mut registrar = Registrar::new(config, &session).expect("registrar");
                    registrar.register(now, &mut node.rng);
                    node.registrar = Some(registrar);
                }
                LoginEvent::LoginFailed(_) => restart |= node.retry,
            }
        }
        if let Some(r) = node.registrar.as_mut() {
            while let Some(e) = r.poll_event() {
                let failed = matches!(e, RegistrationEvent::Failed(_));
                node.events.push((now, e));
                restart |= failed && node.retry;
            }
        }
        if restart {
            node.registrar = None;
            node.logins_started += 1;
            node.login.login(now, &mut node.rng);
        }
    }

    /// Logs node `i` in and runs until its registrar reports `n` registrations.
    fn login_and_register(&mut self, i: usize, n: usize, limit: Duration) {
        self.login(i);
        let limit = self.now() + limit;
        self.run(limit, |w| w.nodes[i].registered().len() >= n);
    }

    fn registration_of(&self, i: usize) -> Option<ntm_state::dc::RegisteredNode> {
        self.dc.registration(&node_name(i))
    }
}

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
                    "node{}: logins {} login events {:?}\n  registration events {:?}\n  \
                     registrar {:?} drops {:?}",
                    n.index,
                    n.logins_started,
                    n.login_events,
                    n.events,
                    n.registrar,
                    n.registrar.as_ref().map(|r| r.drops().clone()),
                )
            })
            .take(8)
            .collect();
        format!(
            "{}\nDC {:?}\nDC events {:?}\nAS drops {:?}",
            nodes.join("\n"),
            self.dc,
            self.dc_events.iter().rev().take(20).collect::<Vec<_>>(),
            self.server.drops(),
        )
    }

    fn flush(&mut self, now: Time) {
        for i in 0..self.nodes.len() {
            self.node_reacts(now, i);
            let node = &mut self.nodes[i];
            let mut out = drain(|buf| node.login.poll_transmit(now, buf));
            if let Some(r) = node.registrar.as_mut() {
                out.extend(drain(|buf| r.poll_transmit(now, buf)));
            }
            let host = node.host;
            for o in out {
                let src = o.src.unwrap_or_else(|| {
                    let ip = if o.dst.is_ipv6() {
                        self.net.sim.v6(host)
                    } else {
                        self.net.sim.v4(host)
                    };
                    SocketAddr::new(ip.expect("an address of the family"), NODE_PORT)
                });
                self.send(now, &i.to_string(), host, src, o.dst, o.datagram);
            }
        }
        let out = drain(|buf| self.server.poll_transmit(now, buf));
        self.send_all(now, "as", self.as_host, self.as_addr, out);
        while let Some(e) = self.server.poll_event() {
            let _ = e;
        }
        while let Some(e) = self.dc.poll_event() {
            self.dc_events.push((now, e));
        }
        let out = drain(|buf| self.dc.poll_transmit(now, buf));
        self.send_all(now, "dc", self.dc_host, self.dc_addrs[0], out);
    }

    fn deliver(&mut self, mut d: Delivery) {
        if d.host == self.as_host {
            self.server
                .handle_datagram(d.at, d.local, d.remote, &mut d.payload, &mut self.as_rng);
        } else if d.host == self.dc_host {
            self.to_dc.push(d.clone());
            self.dc
                .handle_datagram(d.at, d.local, d.remote, &mut d.payload, &mut self.dc_rng);
        } else if let Some(&i) = self.by_host.get(&d.host) {
            let node = &mut self.nodes[i];
            if node.login.is_logging_in() {
                node.login
                    .handle_datagram(d.at, d.local, d.remote, &mut d.payload, &mut node.rng);
            } else if let Some(r) = node.registrar.as_mut() {
                r.handle_datagram(d.at, d.local, d.remote, &mut d.payload, &mut node.rng);
            }
        }
    }

    fn next_timer(&self) -> Option<Time> {
        let nodes = self.nodes.iter().flat_map(|n| {
            [
                n.login.poll_timeout(),
                n.registrar.as_ref().and_then(Registrar::poll_timeout),
            ]
        });
        [self.server.poll_timeout(), self.dc.poll_timeout()]
            .into_iter()
            .chain(nodes)
            .flatten()
            .map(|(t, _)| t)
            .min()
    }

    fn handle_timeout(&mut self, now: Time) {
        self.server.handle_timeout(now, &mut self.as_rng);
        self.dc.handle_timeout(now, &mut self.dc_rng);
        for n in &mut self.nodes {
            n.login.handle_timeout(now, &mut n.rng);
            if let Some(r) = n.registrar.as_mut() {
                r.handle_timeout(now, &mut n.rng);
            }
        }
    }
}

/// KEEPALIVEs sent by `from`, probes (reply requested) and keep-alives alike: the two are the
/// same size and sealed, so the capture cannot tell them apart.
fn keepalives(w: &World, from: &str) -> usize {
    w.sent_by(from, MessageType::Keepalive).len()
}

#[test]
fn a_node_on_the_internet_registers_two_trips_after_login_with_no_nat_and_keeps_its_pair() {
    let mut w = World::new(&Setup::new(1));
    let internet = w.internet;
    let i = w.add_node(internet, false);
    w.login_and_register(i, 2, Duration::from_secs(30));
    let ctx = w.context();
    let registered = w.nodes[i].registered();
    assert_eq!(registered.len(), 2, "one per family\n{ctx}");
    let logged_in = w.nodes[i].sessions[0].0;
    let local = w.local_addrs(i);
    for (at, vip4, vip6, observed, nat) in &registered {
        assert_eq!(*at, logged_in + ONE_WAY * 2, "steps 7 and 10\n{ctx}");
        assert_eq!(*nat, NatBehaviour::NoNat, "{ctx}");
        assert!(local.contains(observed), "{observed} is its own\n{ctx}");
        assert_eq!((*vip4, *vip6), (registered[0].1, registered[0].2));
    }
    let vaddrs = w.dc.virtual_addrs(&node_name(i)).expect("assigned");
    assert_eq!((vaddrs.v4, vaddrs.v6), (registered[0].1, registered[0].2));
    assert_eq!(vaddrs.v4, Ipv4Addr::new(100, 64, 1, 1), "{ctx}");
    let reg = w.registration_of(i).expect("registered");
    assert_eq!(reg.nat, [NatBehaviour::NoNat, NatBehaviour::NoNat], "{ctx}");
    assert_eq!(reg.local_addrs, local);
    assert_eq!(
        reg.observed.map(|o| o.map(|(addr, _)| addr)),
        [Some(local[0]), Some(local[1])]
    );
    // Let the probes settle: they agree with the registration, so nothing is sent again, and
    // without a NAT no keep-alive follows.
    w.run_for(Duration::from_secs(100));
    assert_eq!(
        w.sent_by("0", MessageType::RegistrationRequest).len(),
        2,
        "{}",
        w.context()
    );
    assert_eq!(
        keepalives(&w, "0"),
        4,
        "four probes, no keep-alive\n{}",
        w.context()
    );
    assert_eq!(
        w.nodes[i]
            .registrar
            .as_ref()
            .and_then(|r| r.leg(false))
            .and_then(|l| l.measured),
        Some(NatBehaviour::NoNat)
    );
    // A new session (logging in again) registers the same pair.
    w.login_and_register(i, 4, Duration::from_secs(30));
    let again = w.nodes[i].registered();
    assert_eq!(again.len(), 4, "{}", w.context());
    assert!(again.iter().all(|r| (r.1, r.2) == (vaddrs.v4, vaddrs.v6)));
    assert_eq!(w.dc.sessions_held(), 1, "the first session is forgotten");
}

/// A node behind a NAT of this mapping behaviour logs in and registers; returns the world, the
/// node, and the NAT's outside address.
fn behind_nat(seed: u64, mapping: Mapping) -> (World, usize, IpAddr) {
    let mut w = World::new(&Setup::new(seed));
    let (home, outside) = w.nat("home", mapping);
    let i = w.add_node(home, true);
    w.login_and_register(i, 2, Duration::from_secs(30));
    (w, i, outside)
}

/// The source the DC saw on the node's REGISTRATION_REQUESTs: the NAT's mapping towards it.
fn dc_saw(w: &World) -> Vec<SocketAddr> {
    w.to_dc
        .iter()
        .filter(|d| d.payload.first() == Some(&MessageType::RegistrationRequest.to_u8()))
        .map(|d| d.remote)
        .collect()
}

fn check_nat_detection(mapping: Mapping, expected: NatBehaviour) {
    let (mut w, i, outside) = behind_nat(2, mapping);
    let ctx = w.context();
    let registered = w.nodes[i].registered();
    assert_eq!(registered.len(), 2, "{ctx}");
    let logged_in = w.nodes[i].sessions[0].0;
    // The first registration reports Unknown (nothing measured on this network yet); the probes
    // come back in the same flight, and the node registers again at once.
    assert_eq!(registered[0].0, logged_in + ONE_WAY * 2, "{ctx}");
    assert_eq!(registered[0].4, NatBehaviour::Unknown, "{ctx}");
    assert_eq!(registered[1].0, logged_in + ONE_WAY * 4, "{ctx}");
    assert_eq!(registered[1].4, expected, "{ctx}");
    let saw = dc_saw(&w);
    assert_eq!(saw.len(), 2, "{ctx}");
    for (r, observed) in registered.iter().zip(&saw) {
        assert_eq!(r.3, *observed, "the NAT's mapping, as the DC saw it\n{ctx}");
        assert_eq!(observed.ip(), outside, "{ctx}");
    }
    let reg = w.registration_of(i).expect("registered");
    assert_eq!(reg.nat[0], expected, "{ctx}");
    assert_eq!(reg.observed[0], Some((saw[1], w.dc_addrs[0])), "{ctx}");
    assert_eq!(
        w.nodes[i]
            .registrar
            .as_ref()
            .and_then(|r| r.leg(false))
            .map(|l| l.keepalive_interval),
        Some(Duration::from_secs(25))
    );
    w.run_for(Duration::from_secs(10));
    assert_eq!(
        w.sent_by("0", MessageType::RegistrationRequest).len(),
        2,
        "one re-registration only\n{}",
        w.context()
    );
}

#[test]
fn behind_an_endpoint_independent_nat_the_node_registers_endpoint_independent_mapping() {
    check_nat_detection(
        Mapping::EndpointIndependent,
        NatBehaviour::EndpointIndependent,
    );
}

#[test]
fn behind_an_address_and_port_dependent_nat_the_node_registers_that_mapping() {
    check_nat_detection(
        Mapping::AddressAndPortDependent,
        NatBehaviour::AddressAndPortDependent,
    );
}

#[test]
fn refreshes_at_half_the_lifetime_and_a_move_keep_the_pair_and_the_dc_follows_the_node() {
    let (mut w, i, home_outside) = behind_nat(3, Mapping::EndpointIndependent);
    let pair = w.dc.virtual_addrs(&node_name(i)).expect("assigned");
    let registered_at = w.nodes[i].registered()[1].0;
    let first_observed = w.registration_of(i).and_then(|r| r.observed[0]);
    // Twenty minutes and a little: refreshes every 300 s, keep-alives every 25 s between them.
    w.run_for(Duration::from_secs(1250));
    let ctx = w.context();
    let requests: Vec<Time> = w
        .sent_by("0", MessageType::RegistrationRequest)
        .iter()
        .map(|s| s.at)
        .collect();
    let refreshes: Vec<Time> = requests[2..].to_vec();
    assert_eq!(
        refreshes,
        (1..=4)
            .map(|k| registered_at + Duration::from_secs(300 * k) + ONE_WAY * 2 * (k as u32 - 1))
            .collect::<Vec<_>>(),
        "each refresh at half the lifetime after the last answer\n{ctx}"
    );
    assert!(
        !w.dc_events
            .iter()
            .any(|(_, e)| matches!(e, DcEvent::NodeExpired { .. })),
        "{ctx}"
    );
    // The node sends a keep-alive whenever it has sent the DC nothing for 25 s: twelve between
    // two refreshes (the twelfth 40 ms before the refresh, which waits for the answer's time
    // plus 300 s), four intervals, and one after the last refresh; the two probes aside.
    assert_eq!(keepalives(&w, "0") - 2, 4 * 12 + 1, "{ctx}");
    assert_eq!(
        w.registration_of(i).and_then(|r| r.observed[0]),
        first_observed,
        "the keep-alives held the NAT mapping\n{ctx}"
    );
    assert!(w.nodes[i]
        .registered()
        .iter()
        .all(|r| (r.1, r.2) == (pair.v4, pair.v6)));

    // The node moves to a café behind another NAT.
    let (cafe, cafe_outside) = w.nat("cafe", Mapping::EndpointIndependent);
    let before = w.nodes[i].registered().len();
    let (now, local) = w.move_node(i, cafe, true);
    let limit = now + Duration::from_secs(30);
    w.run(limit, |w| w.nodes[i].registered().len() >= before + 2);
    let ctx = w.context();
    let after = &w.nodes[i].registered()[before..];
    assert_eq!(
        after.len(),
        2,
        "Unknown on a new network, then the measurement\n{ctx}"
    );
    assert_eq!(after[0].0, now + ONE_WAY * 2, "{ctx}");
    assert_eq!(after[1].4, NatBehaviour::EndpointIndependent, "{ctx}");
    let reg = w.registration_of(i).expect("registered");
    assert_eq!(reg.vaddrs, pair, "the pair survives the move\n{ctx}");
    assert!(after.iter().all(|r| (r.1, r.2) == (pair.v4, pair.v6)));
    let (observed, _) = reg.observed[0].expect("observed");
    assert_eq!(observed.ip(), cafe_outside, "{ctx}");
    assert_ne!(observed.ip(), home_outside);
    assert_eq!(reg.local_addrs, local);

    // Then onto the internet itself, where there is no NAT.
    let internet = w.internet;
    let before = w.nodes[i].registered().len();
    let (now, local) = w.move_node(i, internet, false);
    let limit = now + Duration::from_secs(30);
    w.run(limit, |w| w.nodes[i].registered().len() >= before + 2);
    let ctx = w.context();
    let after = &w.nodes[i].registered()[before..];
    assert_eq!(after.len(), 2, "one per family, both without NAT\n{ctx}");
    assert!(after.iter().all(|r| r.4 == NatBehaviour::NoNat), "{ctx}");
    let reg = w.registration_of(i).expect("registered");
    assert_eq!(reg.vaddrs, pair, "{ctx}");
    assert_eq!(reg.nat, [NatBehaviour::NoNat, NatBehaviour::NoNat], "{ctx}");
    assert_eq!(
        reg.observed.map(|o| o.map(|(a, _)| a)),
        [Some(local[0]), Some(local[1])],
        "{ctx}"
    );
}

#[test]
fn two_nodes_never_share_an_address_and_two_hundred_nodes_get_two_hundred_pairs() {
    let mut w = World::new(&Setup {
        accounts: 200,
        ..Setup::new(4)
    });
    let internet = w.internet;
    let (home, _) = w.nat("home", Mapping::EndpointIndependent);
    for k in 0..200 {
        // Every other node behind the NAT, all logging in within two seconds.
        let i = w.add_node(if k % 2 == 0 { internet } else { home }, k % 2 == 1);
        let _ = i;
    }
    for k in 0..200 {
        w.login(k);
        let next = w.now() + ms(10);
        w.run(next, |_| false);
    }
    let limit = w.now() + Duration::from_secs(60);
    w.run(limit, |w| w.dc.nodes_registered() == 200);
    // The last answers are still on their way.
    w.run_for(Duration::from_secs(1));
    let ctx = w.context();
    assert_eq!(w.dc.nodes_registered(), 200, "{ctx}");
    let mut v4s = BTreeSet::new();
    let mut v6s = BTreeSet::new();
    for k in 0..200 {
        let pair = w.dc.virtual_addrs(&node_name(k)).expect("assigned");
        v4s.insert(pair.v4);
        v6s.insert(pair.v6);
        let own = w.nodes[k]
            .registrar
            .as_ref()
            .and_then(Registrar::virtual_addrs);
        assert_eq!(own, Some((pair.v4, pair.v6)), "node {k}\n{ctx}");
    }
    assert_eq!((v4s.len(), v6s.len()), (200, 200), "{ctx}");
    let expected: BTreeSet<Ipv4Addr> = (1..=200u8).map(|n| Ipv4Addr::new(100, 64, 1, n)).collect();
    assert_eq!(v4s, expected, "the lowest 200 of the pool");
}

#[test]
fn login_and_registration_complete_with_twenty_percent_loss_on_every_link() {
    let mut first_attempt = 0;
    let mut measured = 0;
    for seed in 200..210 {
        let mut w = World::new(&Setup {
            link: Some(lossy(0.2)),
            ..Setup::new(seed)
        });
        let (home, _) = w.nat("home", Mapping::EndpointIndependent);
        let i = w.add_node(home, true);
        w.nodes[i].retry = true;
        w.login(i);
        w.run(Time::from_secs(600), |w| {
            w.registration_of(0).is_some() && !w.nodes[0].registered().is_empty()
        });
        let ctx = w.context();
        let reg = w.registration_of(i);
        assert!(reg.is_some(), "{ctx}");
        let reg = reg.unwrap_or_else(|| unreachable!());
        let own = w.nodes[i]
            .registrar
            .as_ref()
            .and_then(Registrar::virtual_addrs);
        assert_eq!(own, Some((reg.vaddrs.v4, reg.vaddrs.v6)), "{ctx}");
        let session = &w.nodes[i].sessions.last().expect("a session").1;
        assert_eq!(reg.session_key_id, session.session_key_id, "{ctx}");
        if w.nodes[i].logins_started == 1 {
            first_attempt += 1;
        }
        // Let the probes finish (or give up) and any re-registration land.
        w.run_for(Duration::from_secs(30));
        if w.registration_of(i).map(|r| r.nat[0]) == Some(NatBehaviour::EndpointIndependent) {
            measured += 1;
        }
    }
    eprintln!("{first_attempt}/10 registered at the first login; {measured}/10 measured the NAT");
    assert!(
        first_attempt >= 5,
        "only {first_attempt}/10 at the first login"
    );
    assert!(measured >= 5, "only {measured}/10 measured the NAT");
}

#[test]
fn a_registration_for_another_nodes_name_under_ones_own_key_is_refused() {
    let mut w = World::new(&Setup::new(5));
    let internet = w.internet;
    let bob = w.add_node(internet, false);
    let mallory = w.add_node(internet, false);
    w.login_and_register(bob, 2, Duration::from_secs(30));
    let before = w.registration_of(bob);
    assert!(before.is_some(), "{}", w.context());
    w.nodes[mallory].claim = Some(node_name(bob));
    w.login(mallory);
    let limit = w.now() + Duration::from_secs(30);
    w.run(limit, |w| w.nodes[mallory].events.len() >= 2);
    let ctx = w.context();
    let failures: Vec<&RegistrationEvent> =
        w.nodes[mallory].events.iter().map(|(_, e)| e).collect();
    assert_eq!(
        failures,
        vec![&RegistrationEvent::Failed(RegistrationFailure::Refused(ErrorCode::WrongState)); 2],
        "{ctx}"
    );
    assert_eq!(
        w.registration_of(bob),
        before,
        "bob's registration is untouched\n{ctx}"
    );
    assert_eq!(w.registration_of(mallory), None, "{ctx}");
    assert_eq!(w.dc.nodes_registered(), 1);
}
