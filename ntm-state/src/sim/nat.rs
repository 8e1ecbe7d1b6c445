//! NATs in RFC 4787 terms: mapping behaviour, filtering behaviour, port assignment, timeouts,
//! hairpinning.

use core::time::Duration;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use rand_chacha::ChaCha8Rng;

use super::capture::Outcome;
use super::link::{uniform, Link};
use super::{SegmentId, Stack};
use crate::time::Time;

/// Which outbound datagrams share an external port (RFC 4787 §4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// One mapping per internal address and port, whatever the destination ("EIM"; what
    /// full-cone, restricted-cone and port-restricted-cone NATs do).
    EndpointIndependent,
    /// One mapping per internal endpoint and destination IP address ("ADM").
    AddressDependent,
    /// One mapping per internal endpoint and destination IP address and port ("APDM", a
    /// "symmetric" NAT).
    AddressAndPortDependent,
}

/// Which inbound datagrams a mapping admits (RFC 4787 §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filtering {
    /// Any source, once the mapping exists ("EIF").
    EndpointIndependent,
    /// Only sources whose IP address the internal endpoint has sent to through this mapping
    /// ("ADF").
    AddressDependent,
    /// Only sources whose IP address and port the internal endpoint has sent to through this
    /// mapping ("APDF").
    AddressAndPortDependent,
}

/// How a NAT chooses the external port of a new mapping (RFC 4787 §4.2.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortAssignment {
    /// Keep the internal port if no live mapping uses it, else pick a random one.
    Preserve,
    /// Always a random port in 1024..=65535 (from the simulator's seeded RNG).
    Random,
}

/// How a NAT behaves. `NatConfig::new(mapping, filtering)` gives the defaults below; change a
/// field with struct update syntax: `NatConfig { hairpin: true, ..NatConfig::new(m, f) }`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatConfig {
    /// Mapping behaviour.
    pub mapping: Mapping,
    /// Filtering behaviour.
    pub filtering: Filtering,
    /// Port assignment; default [`PortAssignment::Preserve`].
    pub ports: PortAssignment,
    /// A mapping expires this long after the last datagram that refreshed it; default 120 s
    /// (RFC 4787 REQ-5's minimum).
    pub timeout: Duration,
    /// Whether admitted inbound datagrams refresh the mapping too (outbound ones always do,
    /// RFC 4787 REQ-6); default false.
    pub refresh_on_inbound: bool,
    /// Whether a datagram from inside to the NAT's own outside address is turned back inside
    /// (RFC 4787 §6); default false.
    pub hairpin: bool,
    /// The address families of the inside segment; default [`Stack::V4Only`]. The NAT gets an
    /// outside address for each family that both sides carry.
    pub inside: Stack,
}

impl NatConfig {
    /// A NAT with these behaviours and the defaults listed on the fields.
    pub const fn new(mapping: Mapping, filtering: Filtering) -> NatConfig {
        NatConfig {
            mapping,
            filtering,
            ports: PortAssignment::Preserve,
            timeout: Duration::from_secs(120),
            refresh_on_inbound: false,
            hairpin: false,
            inside: Stack::V4Only,
        }
    }
}

/// A NAT device: joins its inside segment to its outside segment.
#[derive(Clone, Debug)]
pub(super) struct Nat {
    pub(super) name: String,
    pub(super) outside: SegmentId,
    pub(super) inside: SegmentId,
    /// Outside addresses, at most one per family.
    pub(super) addrs: Vec<IpAddr>,
    /// The link between the NAT and its outside segment.
    pub(super) link: Link,
    pub(super) config: NatConfig,
    pub(super) table: NatTable,
}

impl Nat {
    /// The outside address of the family of `ip`.
    pub(super) fn addr_like(&self, ip: IpAddr) -> Option<IpAddr> {
        self.addrs
            .iter()
            .copied()
            .find(|a| a.is_ipv6() == ip.is_ipv6())
    }
}

/// What an outbound mapping is keyed on besides the internal endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Dest {
    Any,
    Ip(IpAddr),
    Endpoint(SocketAddr),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    internal: SocketAddr,
    dest: Dest,
}

/// One mapping: an external port bound to an internal endpoint.
#[derive(Clone, Debug)]
struct Binding {
    key: Key,
    expires: Time,
    /// Every destination the internal endpoint sent to through this mapping (for filtering).
    contacted: BTreeSet<SocketAddr>,
}

/// The mapping table. External ports are per family (`bool` is "IPv6"); each belongs to at
/// most one mapping. Expired mappings are removed lazily: when an inbound datagram finds one
/// (reported as [`Outcome::MappingExpired`]) and all at once before a new mapping is made.
#[derive(Clone, Debug, Default)]
pub(super) struct NatTable {
    by_key: BTreeMap<Key, u16>,
    by_port: BTreeMap<(bool, u16), Binding>,
}

const FIRST_RANDOM_PORT: u16 = 1024;
const RANDOM_PORTS: u64 = 65536 - FIRST_RANDOM_PORT as u64;

impl NatTable {
    /// An outbound datagram from internal `src` to `dst` at `t`: the external port, after
    /// making or refreshing the mapping. `None` when no port is free.
    pub(super) fn outbound(
        &mut self,
        t: Time,
        config: &NatConfig,
        src: SocketAddr,
        dst: SocketAddr,
        rng: &mut ChaCha8Rng,
    ) -> Option<u16> {
        let v6 = src.is_ipv6();
        let dest = match config.mapping {
            Mapping::EndpointIndependent => Dest::Any,
            Mapping::AddressDependent => Dest::Ip(dst.ip()),
            Mapping::AddressAndPortDependent => Dest::Endpoint(dst),
        };
        let key = Key {
            internal: src,
            dest,
        };
        let live = self.by_key.get(&key).copied().filter(|port| {
            self.by_port
                .get(&(v6, *port))
                .is_some_and(|b| b.expires > t)
        });
        let port = match live {
            Some(port) => port,
            None => {
                self.sweep(t);
                let port = self.free_port(config.ports, v6, src.port(), rng)?;
                self.by_key.insert(key, port);
                let binding = Binding {
                    key,
                    expires: t,
                    contacted: BTreeSet::new(),
                };
                self.by_port.insert((v6, port), binding);
                port
            }
        };
        if let Some(binding) = self.by_port.get_mut(&(v6, port)) {
            binding.expires = t + config.timeout;
            binding.contacted.insert(dst);
        }
        Some(port)
    }

    /// An inbound datagram from `remote` to external `port` at `t`: the internal endpoint to
    /// forward it to, or why it is dropped.
    pub(super) fn inbound(
        &mut self,
        t: Time,
        config: &NatConfig,
        v6: bool,
        port: u16,
        remote: SocketAddr,
    ) -> Result<SocketAddr, Outcome> {
        let binding = self
            .by_port
            .get_mut(&(v6, port))
            .ok_or(Outcome::NoMapping)?;
        if binding.expires <= t {
            let key = binding.key;
            self.by_key.remove(&key);
            self.by_port.remove(&(v6, port));
            return Err(Outcome::MappingExpired);
        }
        let admitted = match config.filtering {
            Filtering::EndpointIndependent => true,
            Filtering::AddressDependent => binding.contacted.iter().any(|c| c.ip() == remote.ip()),
            Filtering::AddressAndPortDependent => binding.contacted.contains(&remote),
        };
        if !admitted {
            return Err(Outcome::Filtered);
        }
        if config.refresh_on_inbound {
            binding.expires = t + config.timeout;
        }
        Ok(binding.key.internal)
    }

    /// Removes every mapping expired at `t`.
    fn sweep(&mut self, t: Time) {
        let by_key = &mut self.by_key;
        self.by_port.retain(|_, b| {
            let live = b.expires > t;
            if !live {
                by_key.remove(&b.key);
            }
            live
        });
    }

    fn free_port(
        &self,
        ports: PortAssignment,
        v6: bool,
        preferred: u16,
        rng: &mut ChaCha8Rng,
    ) -> Option<u16> {
        let free = |port: &u16| !self.by_port.contains_key(&(v6, *port));
        if ports == PortAssignment::Preserve && preferred != 0 && free(&preferred) {
            return Some(preferred);
        }
        // Scan from a random start so that the first free port found is a random one.
        let start = uniform(rng, RANDOM_PORTS - 1);
        (0..RANDOM_PORTS)
            .filter_map(|i| u16::try_from((start + i) % RANDOM_PORTS).ok())
            .map(|offset| FIRST_RANDOM_PORT + offset)
            .find(free)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{Hop, HostId, NatId, Outcome, Place, Sim, SimError};
    use std::net::SocketAddr;

    /// `inner` behind a NAT of `config` on the internet; servers `a` and `b` on the internet.
    struct Net {
        sim: Sim,
        nat: NatId,
        inner: HostId,
        a: HostId,
        b: HostId,
    }

    fn net(config: NatConfig) -> Result<Net, SimError> {
        let mut sim = Sim::new(1);
        let internet = sim.internet();
        let (nat, lan) = sim.nat("nat", internet, config)?;
        let inner = sim.host("inner", lan)?;
        let a = sim.host("a", internet)?;
        let b = sim.host("b", internet)?;
        Ok(Net {
            sim,
            nat,
            inner,
            a,
            b,
        })
    }

    impl Net {
        fn ep(&self, host: HostId, port: u16) -> SocketAddr {
            SocketAddr::new(self.sim.v4(host).expect("every host here has IPv4"), port)
        }

        /// Sends one datagram at `t` and returns the delivery it causes, if any.
        fn send(
            &mut self,
            t: Time,
            host: HostId,
            from: SocketAddr,
            to: SocketAddr,
        ) -> Option<(HostId, SocketAddr)> {
            self.sim
                .send(t, host, from, to, b"x".to_vec())
                .expect("valid send");
            self.sim.step().map(|d| (d.host, d.remote))
        }

        /// The external endpoint `server` sees for `inner:5000` when it sends to `server:port`.
        fn seen_by(&mut self, server: HostId, port: u16) -> SocketAddr {
            let (from, to) = (self.ep(self.inner, 5000), self.ep(server, port));
            let (host, remote) = self
                .send(Time::ZERO, self.inner, from, to)
                .expect("delivered");
            assert_eq!(host, server);
            remote
        }

        fn last_outcome(&self) -> Outcome {
            self.sim
                .capture()
                .back()
                .expect("something was captured")
                .outcome
        }
    }

    fn config(mapping: Mapping, filtering: Filtering) -> NatConfig {
        NatConfig::new(mapping, filtering)
    }

    #[test]
    fn an_endpoint_independent_nat_reuses_the_external_port_for_every_destination() {
        let mut n = net(config(
            Mapping::EndpointIndependent,
            Filtering::EndpointIndependent,
        ))
        .unwrap();
        let (a, b) = (n.a, n.b);
        let first = n.seen_by(a, 1000);
        assert_eq!(
            first,
            SocketAddr::new(n.sim.nat_addrs(n.nat)[0], 5000),
            "port preserved"
        );
        assert_eq!(n.seen_by(a, 2000), first);
        assert_eq!(n.seen_by(b, 1000), first);
    }

    #[test]
    fn an_address_dependent_nat_gives_each_destination_address_its_own_port() {
        let mut n = net(config(
            Mapping::AddressDependent,
            Filtering::EndpointIndependent,
        ))
        .unwrap();
        let (a, b) = (n.a, n.b);
        let first = n.seen_by(a, 1000);
        assert_eq!(n.seen_by(a, 2000), first);
        let other = n.seen_by(b, 1000);
        assert_eq!(other.ip(), first.ip());
        assert_ne!(other.port(), first.port());
    }

    #[test]
    fn an_address_and_port_dependent_nat_gives_each_destination_its_own_port() {
        let mut n = net(config(
            Mapping::AddressAndPortDependent,
            Filtering::EndpointIndependent,
        ))
        .unwrap();
        let (a, b) = (n.a, n.b);
        let ports = [
            n.seen_by(a, 1000),
            n.seen_by(a, 2000),
            n.seen_by(b, 1000),
            n.seen_by(a, 1000),
        ]
        .map(|e| e.port());
        assert!(
            ports[0] != ports[1] && ports[1] != ports[2] && ports[0] != ports[2],
            "{ports:?}"
        );
        assert_eq!(
            ports[3], ports[0],
            "the same destination reuses its mapping"
        );
    }

    #[test]
    fn a_random_port_nat_does_not_keep_the_internal_port() {
        let cfg = NatConfig {
            ports: PortAssignment::Random,
            ..config(Mapping::EndpointIndependent, Filtering::EndpointIndependent)
        };
        let mut n = net(cfg).unwrap();
        let a = n.a;
        let port = n.seen_by(a, 1000).port();
        assert!(port != 5000 && port >= FIRST_RANDOM_PORT, "{port}");
    }

    #[test]
    fn a_port_preserving_nat_picks_another_port_when_the_internal_one_is_taken() {
        let mut n = net(config(
            Mapping::EndpointIndependent,
            Filtering::EndpointIndependent,
        ))
        .unwrap();
        let (a, nat) = (n.a, n.nat);
        let lan = n.sim.nats[nat.0].inside;
        let second = n.sim.host("second", lan).unwrap();
        assert_eq!(n.seen_by(a, 1000).port(), 5000);
        let (from, to) = (n.ep(second, 5000), n.ep(a, 1000));
        let (_, remote) = n.send(Time::ZERO, second, from, to).unwrap();
        assert_ne!(remote.port(), 5000);
    }

    /// After `inner:5000` sent to `a:1000`: which of `b:1000`, `a:2000` and `a:1000` get in.
    fn admitted(filtering: Filtering) -> [bool; 3] {
        let mut n = net(config(Mapping::EndpointIndependent, filtering)).unwrap();
        let (a, b, inner) = (n.a, n.b, n.inner);
        let external = n.seen_by(a, 1000);
        [(b, 1000), (a, 2000), (a, 1000)].map(|(host, port)| {
            let from = n.ep(host, port);
            match n.send(Time::ZERO, host, from, external) {
                Some((to, remote)) => to == inner && remote == from,
                None => {
                    assert_eq!(n.last_outcome(), Outcome::Filtered);
                    false
                }
            }
        })
    }

    #[test]
    fn endpoint_independent_filtering_admits_any_source_once_mapped() {
        assert_eq!(admitted(Filtering::EndpointIndependent), [true, true, true]);
    }

    #[test]
    fn address_dependent_filtering_admits_only_contacted_addresses() {
        assert_eq!(admitted(Filtering::AddressDependent), [false, true, true]);
    }

    #[test]
    fn address_and_port_dependent_filtering_admits_only_contacted_endpoints() {
        assert_eq!(
            admitted(Filtering::AddressAndPortDependent),
            [false, false, true]
        );
    }

    #[test]
    fn an_unmapped_inbound_datagram_is_dropped_even_by_an_open_nat() {
        let mut n = net(config(
            Mapping::EndpointIndependent,
            Filtering::EndpointIndependent,
        ))
        .unwrap();
        let (a, nat) = (n.a, n.nat);
        let external = n.seen_by(a, 1000);
        let unmapped = SocketAddr::new(external.ip(), 6000);
        let from = n.ep(a, 1000);
        assert_eq!(n.send(Time::ZERO, a, from, unmapped), None);
        assert_eq!(n.last_outcome(), Outcome::NoMapping);
        assert_eq!(n.sim.capture().back().unwrap().place, Place::Nat(nat));
    }

    fn with_timeout(refresh_on_inbound: bool) -> Net {
        let base = config(
            Mapping::EndpointIndependent,
            Filtering::AddressAndPortDependent,
        );
        net(NatConfig {
            timeout: Duration::from_secs(30),
            refresh_on_inbound,
            ..base
        })
        .unwrap()
    }

    #[test]
    fn a_mapping_expires_after_its_timeout_and_a_new_one_can_be_made() {
        let mut n = with_timeout(false);
        let (a, inner) = (n.a, n.inner);
        let external = n.seen_by(a, 1000);
        let (server, mine) = (n.ep(a, 1000), n.ep(inner, 5000));
        assert!(
            n.send(Time::from_secs(29), a, server, external).is_some(),
            "{}",
            n.sim.dump()
        );
        assert_eq!(n.send(Time::from_secs(30), a, server, external), None);
        assert_eq!(n.last_outcome(), Outcome::MappingExpired);
        assert_eq!(n.send(Time::from_secs(31), a, server, external), None);
        assert_eq!(
            n.last_outcome(),
            Outcome::NoMapping,
            "the expired mapping was removed"
        );
        assert_eq!(
            n.send(Time::from_secs(40), inner, mine, server),
            Some((a, external))
        );
        assert!(n.send(Time::from_secs(41), a, server, external).is_some());
    }

    #[test]
    fn outbound_traffic_refreshes_a_mapping() {
        let mut n = with_timeout(false);
        let (a, inner) = (n.a, n.inner);
        let external = n.seen_by(a, 1000);
        let (server, mine) = (n.ep(a, 1000), n.ep(inner, 5000));
        assert!(n.send(Time::from_secs(20), inner, mine, server).is_some());
        assert!(
            n.send(Time::from_secs(49), a, server, external).is_some(),
            "{}",
            n.sim.dump()
        );
        assert_eq!(n.send(Time::from_secs(50), a, server, external), None);
        assert_eq!(n.last_outcome(), Outcome::MappingExpired);
    }

    #[test]
    fn inbound_traffic_refreshes_a_mapping_only_when_configured() {
        for refresh in [false, true] {
            let mut n = with_timeout(refresh);
            let a = n.a;
            let external = n.seen_by(a, 1000);
            let server = n.ep(a, 1000);
            assert!(n.send(Time::from_secs(25), a, server, external).is_some());
            let late = n.send(Time::from_secs(50), a, server, external);
            assert_eq!(late.is_some(), refresh, "{}", n.sim.dump());
        }
    }

    /// `h1:5000` sends to the external endpoint of `h2:6000` (made by sending to `a`).
    fn hairpin(on: bool) -> (Net, HostId, Option<(HostId, SocketAddr)>) {
        let cfg = NatConfig {
            hairpin: on,
            ..config(Mapping::EndpointIndependent, Filtering::EndpointIndependent)
        };
        let mut n = net(cfg).unwrap();
        let lan = n.sim.nats[n.nat.0].inside;
        let h2 = n.sim.host("h2", lan).unwrap();
        let (h1, a) = (n.inner, n.a);
        let (from, to) = (n.ep(h2, 6000), n.ep(a, 1000));
        let (_, h2_external) = n.send(Time::ZERO, h2, from, to).unwrap();
        let from = n.ep(h1, 5000);
        let got = n.send(Time::ZERO, h1, from, h2_external);
        (n, h2, got)
    }

    #[test]
    fn a_hairpinning_nat_turns_a_datagram_for_its_own_address_back_inside() {
        let (n, h2, got) = hairpin(true);
        let h1_external = SocketAddr::new(n.sim.nat_addrs(n.nat)[0], 5000);
        assert_eq!(got, Some((h2, h1_external)), "{}", n.sim.dump());
    }

    #[test]
    fn a_nat_without_hairpinning_drops_a_datagram_for_its_own_address() {
        let (n, _, got) = hairpin(false);
        assert_eq!(got, None);
        assert_eq!(n.last_outcome(), Outcome::HairpinOff);
    }

    #[test]
    fn cascaded_nats_translate_twice_and_replies_find_their_way_back() {
        let mut sim = Sim::new(5);
        let internet = sim.internet();
        let open = config(Mapping::EndpointIndependent, Filtering::EndpointIndependent);
        let (cgn, carrier) = sim.nat("cgn", internet, open).unwrap();
        let strict = config(
            Mapping::AddressAndPortDependent,
            Filtering::AddressAndPortDependent,
        );
        let (home, lan) = sim.nat("home", carrier, strict).unwrap();
        let mn = sim.host("mn", lan).unwrap();
        let cn = sim.host("cn", internet).unwrap();
        let (mine, server) = (
            SocketAddr::new(sim.v4(mn).unwrap(), 5000),
            SocketAddr::new(sim.v4(cn).unwrap(), 80),
        );
        sim.send(Time::ZERO, mn, mine, server, b"up".to_vec())
            .unwrap();
        let up = sim.step().unwrap();
        assert_eq!((up.host, up.remote.ip()), (cn, sim.nat_addrs(cgn)[0]));
        sim.send(up.at, cn, server, up.remote, b"down".to_vec())
            .unwrap();
        let down = sim.step().unwrap();
        assert_eq!(
            (down.host, down.local, down.remote),
            (mn, mine, server),
            "{}",
            sim.dump()
        );
        let translations = |nat| {
            let at_nat = |h: &&Hop| {
                h.place == Place::Nat(nat) && matches!(h.outcome, Outcome::Translated { .. })
            };
            sim.capture().iter().filter(at_nat).count()
        };
        assert_eq!(
            (translations(home), translations(cgn)),
            (2, 2),
            "{}",
            sim.dump()
        );
    }

    #[test]
    fn two_hosts_at_the_same_private_address_behind_different_nats_are_both_reachable() {
        let mut sim = Sim::new(6);
        let internet = sim.internet();
        let apdf = config(
            Mapping::EndpointIndependent,
            Filtering::AddressAndPortDependent,
        );
        let private = IpAddr::from([192, 168, 0, 10]);
        let mut hosts = Vec::new();
        for name in ["one", "two"] {
            let (_, lan) = sim.nat(name, internet, apdf).unwrap();
            hosts.push(sim.host_at(name, lan, private).unwrap());
        }
        let server = sim.host("server", internet).unwrap();
        let server_ep = SocketAddr::new(sim.v4(server).unwrap(), 80);
        let mine = SocketAddr::new(private, 5000);
        let mut externals = Vec::new();
        for host in &hosts {
            sim.send(Time::ZERO, *host, mine, server_ep, vec![])
                .unwrap();
            externals.push(sim.step().unwrap().remote);
        }
        assert_ne!(externals[0], externals[1]);
        for (i, external) in externals.iter().enumerate() {
            sim.send(Time::ZERO, server, server_ep, *external, vec![i as u8])
                .unwrap();
            let d = sim.step().unwrap();
            assert_eq!(
                (d.host, d.local, d.payload),
                (hosts[i], mine, vec![i as u8])
            );
        }
    }
}
