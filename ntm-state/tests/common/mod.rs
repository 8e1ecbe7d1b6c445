//! What the simulator tests share: the deployment they all run (ports, keys, the AS's
//! configuration, the default latencies), the network with its record of every datagram sent,
//! and the loop that steps the simulator and hands deliveries and timeouts to the machines.
//!
//! Each test file says which machines its world holds by implementing [`Drive`]; every failure
//! message starts with the seed and ends with the simulator's capture ([`Drive::context`]).
//!
//! Every test binary compiles this module on its own and uses only part of it.
#![allow(dead_code)]

pub mod world;

use core::time::Duration;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use ntm_state::as_server::{AccountRecord, AsConfig, AsLimits, DcLink};
use ntm_state::signaling::{RetransmitConfig, Transmit};
use ntm_state::sim::{
    Delivery, Filtering, HostId, Link, Mapping, NatConfig, NatId, SegmentId, Sim,
};
use ntm_state::time::Time;
use ntm_wire::crypto::auth_key;
use ntm_wire::{Account, AddrList, Fqdn, MessageType, SecretKey, TransportAddr, MAX_SIGNALING_LEN};

pub const AS_PORT: u16 = 4280;
pub const DC_PORT: u16 = 4281;
pub const NODE_PORT: u16 = 5000;
/// The ID of the AS↔DC key.
pub const DC_KEY_ID: u32 = 17;
/// Every account's password.
pub const PASSWORD: &[u8] = b"correct horse battery staple";

/// The default link of a host on the internet (the AS, the DC, a node without a NAT).
pub const INTERNET_LINK: Duration = Duration::from_millis(10);
/// The default link of a host behind a NAT, and of the NAT's outside interface.
pub const HOME_LINK: Duration = Duration::from_millis(5);
/// With the default links, node↔AS, node↔DC and AS↔DC are each one trip of this: 10 ms + 10 ms,
/// or 5 ms + 5 ms + 10 ms through a NAT.
pub const ONE_WAY: Duration = Duration::from_millis(20);

/// A link of the loss tests: as slow as an internet link, losing `loss` of what crosses it.
pub fn lossy(loss: f64) -> Link {
    Link {
        loss,
        ..Link::latency(INTERNET_LINK)
    }
}

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

pub fn account(name: &str) -> Account {
    Account::new(name).expect("valid account name")
}

pub fn fqdn(name: &str) -> Fqdn {
    Fqdn::new(name).expect("valid name")
}

pub fn as_dc_key() -> SecretKey {
    SecretKey::from_bytes([0x5a; 32])
}

/// The AS: `accounts` (name, node FQDN), all with [`PASSWORD`] and `iterations` of PBKDF2, all
/// served by the DC `dc1.example` at `dc_addrs`, the first of which the AS reaches it at.
pub fn as_config(
    dc_addrs: &[SocketAddr],
    accounts: impl IntoIterator<Item = (Account, Fqdn)>,
    iterations: u32,
) -> AsConfig {
    let salt = [0x11; 16];
    let verifier = auth_key(PASSWORD, &salt, iterations);
    let dc_list = AddrList::new(dc_addrs.iter().map(|a| TransportAddr::new(*a)).collect())
        .expect("DC addresses");
    let accounts = accounts
        .into_iter()
        .map(|(name, node_fqdn)| {
            let record = AccountRecord {
                auth_key: verifier.clone(),
                salt,
                iterations,
                node_fqdn,
                dc: fqdn("dc1.example"),
                dc_addrs: dc_list.clone(),
                ns_addrs: AddrList::empty(),
                cs_addrs: AddrList::empty(),
                keepalive_interval_s: 25,
            };
            (name, record)
        })
        .collect();
    let mut dcs = BTreeMap::new();
    dcs.insert(
        fqdn("dc1.example"),
        DcLink {
            key: as_dc_key(),
            key_id: DC_KEY_ID,
            addr: dc_addrs[0],
            high_water_mark: 0,
        },
    );
    AsConfig {
        static_secret: SecretKey::from_bytes([0x21; 32]),
        concealment_secret: SecretKey::from_bytes([0x33; 32]),
        // Unknown accounts get what real ones have, as a deployment would configure.
        default_iterations: iterations,
        session_lifetime: Duration::from_secs(24 * 3600),
        dcs,
        accounts,
        limits: AsLimits::default(),
        retransmit: RetransmitConfig::default(),
    }
}

/// One datagram a machine handed to the network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sent {
    pub at: Time,
    /// "as", "dc", "node" or a node's index, "attacker".
    pub from: String,
    pub src: SocketAddr,
    pub to: SocketAddr,
    pub msg_type: u8,
    pub len: usize,
}

/// A datagram a machine hands out: the source it chose (if any), where to, and the bytes.
pub struct Outgoing {
    pub src: Option<SocketAddr>,
    pub dst: SocketAddr,
    pub datagram: Vec<u8>,
}

/// Every datagram `poll_transmit` (given the buffer) hands out now.
pub fn drain(mut poll_transmit: impl FnMut(&mut [u8]) -> Option<Transmit>) -> Vec<Outgoing> {
    let mut buf = [0u8; MAX_SIGNALING_LEN];
    let mut out = Vec::new();
    while let Some(t) = poll_transmit(&mut buf) {
        out.push(Outgoing {
            src: t.src,
            dst: t.dst,
            datagram: buf[..t.len].to_vec(),
        });
    }
    out
}

/// Records every ERROR the machines log (a `tracing` subscriber installed for the test's
/// thread while its [`Net`] lives): an ERROR inside a simulation fails the test.
pub struct ErrorLog {
    errors: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    next_span: std::sync::atomic::AtomicU64,
}

struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn core::fmt::Debug) {
        self.0.push_str(&format!(" {}={value:?}", field.name()));
    }
}

impl tracing::Subscriber for ErrorLog {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        *metadata.level() == tracing::Level::ERROR
    }

    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let n = self
            .next_span
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::span::Id::from_u64(n + 1)
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        let line = format!("{}:{}", event.metadata().target(), fields.0);
        if let Ok(mut e) = self.errors.lock() {
            e.push(line);
        }
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}

/// The simulated network and every datagram sent on it.
pub struct Net {
    pub sim: Sim,
    /// ERRORs logged since the network was made.
    errors: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    _log: tracing::subscriber::DefaultGuard,
    /// In the order the machines handed them over.
    pub sent: Vec<Sent>,
    /// No link was given for all of them, so hosts and NATs get the latencies they are made with.
    default_links: bool,
}

impl Net {
    /// With `every_link`, every link (host interfaces and NATs' outside links) has it; without,
    /// each gets the latency it is made with.
    pub fn new(seed: u64, every_link: Option<Link>) -> Net {
        let mut sim = Sim::new(seed);
        if let Some(link) = every_link {
            sim = sim.with_default_link(link);
        }
        let errors = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = ErrorLog {
            errors: errors.clone(),
            next_span: std::sync::atomic::AtomicU64::new(0),
        };
        Net {
            sim,
            errors,
            _log: tracing::subscriber::set_default(log),
            sent: Vec::new(),
            default_links: every_link.is_none(),
        }
    }

    /// A host on `segment` whose interfaces have `latency`.
    pub fn host(&mut self, name: &str, segment: SegmentId, latency: Duration) -> HostId {
        let host = self.sim.host(name, segment).expect("host");
        let ips = self.sim.addrs(host);
        self.set_links(host, ips, latency);
        host
    }

    /// Gives these interfaces of `host` `latency`, unless every link is set.
    pub fn set_links(&mut self, host: HostId, ips: Vec<IpAddr>, latency: Duration) {
        if self.default_links {
            for ip in ips {
                self.sim
                    .set_link(host, ip, Link::latency(latency))
                    .expect("link");
            }
        }
    }

    /// A NAT on `outside` with this mapping, filtering address-and-port dependent and ports
    /// preserved, its link [`HOME_LINK`]; returns it and the segment inside.
    pub fn nat(&mut self, name: &str, outside: SegmentId, mapping: Mapping) -> (NatId, SegmentId) {
        let (nat, inside) = self
            .sim
            .nat(
                name,
                outside,
                NatConfig::new(mapping, Filtering::AddressAndPortDependent),
            )
            .expect("nat");
        if self.default_links {
            self.sim
                .set_nat_link(nat, Link::latency(HOME_LINK))
                .expect("link");
        }
        (nat, inside)
    }

    /// The ERRORs the machines logged so far.
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// `port` on `host`'s first IPv4 address.
    pub fn v4(&self, host: HostId, port: u16) -> SocketAddr {
        SocketAddr::new(self.sim.v4(host).expect("v4"), port)
    }
}

/// A world of machines on a [`Net`]. The implementation says which machine gets what; the
/// provided methods send, drive and describe.
pub trait Drive: Sized {
    fn net(&self) -> &Net;

    fn net_mut(&mut self) -> &mut Net;

    /// Takes in the machines' events and sends every pending datagram at `now`.
    fn flush(&mut self, now: Time);

    /// Hands a delivery to the machine on its host.
    fn deliver(&mut self, d: Delivery);

    /// The machines' earliest deadline.
    fn next_timer(&self) -> Option<Time>;

    /// Lets every machine handle its deadlines at `now`.
    fn handle_timeout(&mut self, now: Time);

    /// The machines' state, for failure messages.
    fn describe(&self) -> String;

    /// The machines' deadlines and their labels, for failure messages.
    fn timers(&self) -> String {
        String::new()
    }

    /// What every failure message starts with: the seed, the machines' state, the capture.
    fn context(&self) -> String {
        let sim = &self.net().sim;
        format!("seed {}\n{}\n{}", sim.seed(), self.describe(), sim.dump())
    }

    fn now(&self) -> Time {
        self.net().sim.now()
    }

    /// Records the datagram and hands it to the network (which must take it).
    fn send(
        &mut self,
        now: Time,
        from: &str,
        host: HostId,
        src: SocketAddr,
        dst: SocketAddr,
        datagram: Vec<u8>,
    ) {
        let net = self.net_mut();
        net.sent.push(Sent {
            at: now,
            from: from.to_owned(),
            src,
            to: dst,
            msg_type: datagram.first().copied().unwrap_or(0),
            len: datagram.len(),
        });
        let result = net.sim.send(now, host, src, dst, datagram);
        assert!(result.is_ok(), "{result:?}\n{}", self.context());
    }

    /// Sends what a machine handed out, from `default_src` where it chose no source.
    fn send_all(
        &mut self,
        now: Time,
        from: &str,
        host: HostId,
        default_src: SocketAddr,
        out: Vec<Outgoing>,
    ) {
        for o in out {
            let src = o.src.unwrap_or(default_src);
            self.send(now, from, host, src, o.dst, o.datagram);
        }
    }

    /// Runs the network and the machines until `stop` holds (checked after every step) or
    /// `limit` passes.
    fn run(&mut self, limit: Time, stop: impl Fn(&Self) -> bool) {
        let (mut last, mut spins) = (self.now(), 0u32);
        loop {
            let now = self.now();
            self.flush(now);
            if stop(self) || now >= limit {
                return;
            }
            let errors = self.net().errors();
            assert!(
                errors.is_empty(),
                "ERROR logged inside the simulation: {errors:?}\n{}",
                self.context()
            );
            // A machine whose deadline stays due after its timeout ran would spin forever.
            spins = if now == last { spins + 1 } else { 0 };
            last = now;
            assert!(
                spins < 100_000,
                "the machines spin at {now} without time advancing: {}\n{}",
                self.timers(),
                self.context()
            );
            let until = self.next_timer().map_or(limit, |t| t.max(now).min(limit));
            match self.net_mut().sim.step_until(until) {
                Some(d) => self.deliver(d),
                None => {
                    let now = self.now();
                    self.handle_timeout(now);
                }
            }
        }
    }

    fn run_for(&mut self, d: Duration) {
        let limit = self.now() + d;
        self.run(limit, |_| false);
    }

    /// The datagrams of this type `from` sent.
    fn sent_by(&self, from: &str, msg_type: MessageType) -> Vec<&Sent> {
        self.net()
            .sent
            .iter()
            .filter(|s| s.from == from && s.msg_type == msg_type.to_u8())
            .collect()
    }
}
