//! Building and changing the topology: segments, NATs, hosts, interfaces, moves, and the
//! address plan (documented on the `sim` module).

use core::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::nat::{Nat, NatTable};
use super::{HostId, Link, NatConfig, NatId, Owner, SegmentId, Sim};
use crate::time::Time;

/// The address families a segment carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stack {
    /// IPv4 only.
    V4Only,
    /// IPv6 only.
    V6Only,
    /// Both.
    DualStack,
}

impl Stack {
    /// Whether this stack carries `ip`'s family.
    pub fn carries(self, ip: IpAddr) -> bool {
        self.carries_family(ip.is_ipv6())
    }

    fn carries_family(self, v6: bool) -> bool {
        match self {
            Stack::V4Only => !v6,
            Stack::V6Only => v6,
            Stack::DualStack => true,
        }
    }

    /// The families carried, as "is IPv6", IPv4 first.
    fn families(self) -> impl Iterator<Item = bool> {
        [false, true]
            .into_iter()
            .filter(move |v6| self.carries_family(*v6))
    }
}

/// A caller's mistake in building or driving the simulator.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SimError {
    /// No such host in this simulator.
    UnknownHost(HostId),
    /// No such segment in this simulator.
    UnknownSegment(SegmentId),
    /// No such NAT in this simulator.
    UnknownNat(NatId),
    /// The host has no interface with this address.
    NotLocalAddress { host: HostId, addr: IpAddr },
    /// The host has no address of the family asked for.
    NoAddress { host: HostId, v6: bool },
    /// `send` was given a time before the simulator's current time.
    TimeWentBackwards { now: Time, requested: Time },
    /// The address is already in use in the segment's realm.
    AddressInUse(IpAddr),
    /// The segment does not carry the address family asked for.
    FamilyNotCarried(SegmentId),
    /// The segment's address pool for that family is used up.
    AddressesExhausted(SegmentId),
}

impl fmt::Display for SimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SimError::UnknownHost(h) => write!(f, "unknown host {h:?}"),
            SimError::UnknownSegment(s) => write!(f, "unknown segment {s:?}"),
            SimError::UnknownNat(n) => write!(f, "unknown NAT {n:?}"),
            SimError::NotLocalAddress { host, addr } => {
                write!(f, "{addr} is not an address of {host:?}")
            }
            SimError::NoAddress { host, v6 } => {
                write!(
                    f,
                    "{host:?} has no {} address",
                    if *v6 { "IPv6" } else { "IPv4" }
                )
            }
            SimError::TimeWentBackwards { now, requested } => {
                write!(
                    f,
                    "time went backwards: asked for {requested}, already at {now}"
                )
            }
            SimError::AddressInUse(a) => write!(f, "{a} is already in use in its realm"),
            SimError::FamilyNotCarried(s) => {
                write!(f, "segment {s:?} does not carry that address family")
            }
            SimError::AddressesExhausted(s) => write!(f, "segment {s:?} has no free address"),
        }
    }
}

impl std::error::Error for SimError {}

/// What a host should be told when its addresses change: feed it to the node's address-change
/// handler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressChange {
    /// The host whose addresses changed.
    pub host: HostId,
    /// Addresses it no longer has.
    pub removed: Vec<IpAddr>,
    /// Addresses it has gained.
    pub added: Vec<IpAddr>,
}

#[derive(Clone, Debug)]
pub(super) struct Segment {
    pub(super) name: String,
    pub(super) stack: Stack,
    /// The segment this one is routed into (same realm), if any.
    parent: Option<SegmentId>,
    /// The NAT this segment is the inside of, if any.
    pub(super) nat: Option<NatId>,
    /// Next host number in each pool: IPv4, IPv4 for NATs on the internet, IPv6.
    next: [u32; 3],
}

#[derive(Clone, Copy, Debug)]
pub(super) struct Iface {
    pub(super) addr: IpAddr,
    pub(super) segment: SegmentId,
    pub(super) link: Link,
}

#[derive(Clone, Debug)]
pub(super) struct Host {
    pub(super) name: String,
    ifaces: Vec<Iface>,
}

impl Host {
    pub(super) fn iface(&self, addr: IpAddr) -> Option<Iface> {
        self.ifaces.iter().copied().find(|i| i.addr == addr)
    }

    fn addrs(&self) -> Vec<IpAddr> {
        self.ifaces.iter().map(|i| i.addr).collect()
    }
}

const POOL_V4: usize = 0;
const POOL_V4_NAT: usize = 1;
const POOL_V6: usize = 2;

impl Sim {
    /// The internet: the dual-stack root segment without a NAT (made on first call).
    pub fn internet(&mut self) -> SegmentId {
        if let Some(id) = self.internet {
            return id;
        }
        let id = self.push_segment("internet", Stack::DualStack, None, None);
        self.internet = Some(id);
        id
    }

    /// A segment routed without translation into `parent` (sharing its realm and address
    /// pool), or with `None` an isolated one; e.g. an IPv6-only access network:
    /// `sim.segment("lte", Stack::V6Only, Some(internet))`.
    pub fn segment(
        &mut self,
        name: &str,
        stack: Stack,
        parent: Option<SegmentId>,
    ) -> Result<SegmentId, SimError> {
        if let Some(p) = parent {
            let outer = self.segment_ref(p)?.stack;
            if !stack.families().all(|v6| outer.carries_family(v6)) {
                return Err(SimError::FamilyNotCarried(p));
            }
        }
        Ok(self.push_segment(name, stack, parent, None))
    }

    /// A NAT on `outside` and its new inside segment (of stack `config.inside`). The NAT gets
    /// an outside address for each family both segments carry, and the default link.
    pub fn nat(
        &mut self,
        name: &str,
        outside: SegmentId,
        config: NatConfig,
    ) -> Result<(NatId, SegmentId), SimError> {
        let outer = self.segment_ref(outside)?.stack;
        let families: Vec<bool> = config
            .inside
            .families()
            .filter(|v6| outer.carries_family(*v6))
            .collect();
        if families.is_empty() {
            return Err(SimError::FamilyNotCarried(outside));
        }
        let addrs = families
            .into_iter()
            .map(|v6| self.allocate(outside, v6, true, &[]))
            .collect::<Result<Vec<_>, _>>()?;
        let id = NatId(self.nats.len());
        let realm = self.realm(outside);
        for addr in &addrs {
            self.owners.insert((realm, *addr), Owner::Nat(id));
        }
        let inside = self.push_segment(name, config.inside, None, Some(id));
        let (link, table) = (self.default_link, NatTable::default());
        self.nats.push(Nat {
            name: name.to_owned(),
            outside,
            inside,
            addrs,
            link,
            config,
            table,
        });
        Ok((id, inside))
    }

    /// A host on `segment` with one interface per family the segment carries, at the next
    /// free addresses, each with the default link.
    pub fn host(&mut self, name: &str, segment: SegmentId) -> Result<HostId, SimError> {
        let addrs = self.fresh_addrs(segment, &[])?;
        let host = self.push_host(name);
        for addr in addrs {
            self.plug(host, segment, addr);
        }
        Ok(host)
    }

    /// A host on `segment` with one interface at `addr`.
    pub fn host_at(
        &mut self,
        name: &str,
        segment: SegmentId,
        addr: IpAddr,
    ) -> Result<HostId, SimError> {
        self.check_free(segment, addr, &[])?;
        let host = self.push_host(name);
        self.plug(host, segment, addr);
        Ok(host)
    }

    /// Adds interfaces on `segment` to `host`, one per family the segment carries.
    pub fn attach(&mut self, host: HostId, segment: SegmentId) -> Result<AddressChange, SimError> {
        let held = self.host_ref(host)?.addrs();
        let added = self.fresh_addrs(segment, &held)?;
        for addr in &added {
            self.plug(host, segment, *addr);
        }
        Ok(AddressChange {
            host,
            removed: Vec::new(),
            added,
        })
    }

    /// Adds an interface on `segment` at `addr` to `host`.
    pub fn attach_at(
        &mut self,
        host: HostId,
        segment: SegmentId,
        addr: IpAddr,
    ) -> Result<AddressChange, SimError> {
        let held = self.host_ref(host)?.addrs();
        self.check_free(segment, addr, &held)?;
        self.plug(host, segment, addr);
        Ok(AddressChange {
            host,
            removed: Vec::new(),
            added: vec![addr],
        })
    }

    /// Removes `host`'s interface at `addr`. Datagrams on their way to it are dropped when
    /// they arrive; NAT mappings made through it stay until they time out, unused.
    pub fn detach(&mut self, host: HostId, addr: IpAddr) -> Result<AddressChange, SimError> {
        let iface = self
            .host_ref(host)?
            .iface(addr)
            .ok_or(SimError::NotLocalAddress { host, addr })?;
        self.unplug(host, iface);
        Ok(AddressChange {
            host,
            removed: vec![addr],
            added: Vec::new(),
        })
    }

    /// Moves `host` to `segment`: every interface is detached and new ones are attached as by
    /// [`Sim::attach`]. Nothing changes if the new addresses cannot be had.
    pub fn move_host(
        &mut self,
        host: HostId,
        segment: SegmentId,
    ) -> Result<AddressChange, SimError> {
        let old = self.host_ref(host)?.ifaces.clone();
        let added = self.fresh_addrs(segment, &self.addrs(host))?;
        for iface in &old {
            self.unplug(host, *iface);
        }
        for addr in &added {
            self.plug(host, segment, *addr);
        }
        Ok(AddressChange {
            host,
            removed: old.iter().map(|i| i.addr).collect(),
            added,
        })
    }

    /// Sets the link of `host`'s interface at `addr`.
    pub fn set_link(&mut self, host: HostId, addr: IpAddr, link: Link) -> Result<(), SimError> {
        let iface = self
            .hosts
            .get_mut(host.0)
            .ok_or(SimError::UnknownHost(host))?
            .ifaces
            .iter_mut()
            .find(|i| i.addr == addr)
            .ok_or(SimError::NotLocalAddress { host, addr })?;
        iface.link = link;
        Ok(())
    }

    /// Sets the link between `nat` and its outside segment.
    pub fn set_nat_link(&mut self, nat: NatId, link: Link) -> Result<(), SimError> {
        self.nats
            .get_mut(nat.0)
            .ok_or(SimError::UnknownNat(nat))?
            .link = link;
        Ok(())
    }

    /// `host`'s addresses, in the order they were attached.
    pub fn addrs(&self, host: HostId) -> Vec<IpAddr> {
        self.hosts.get(host.0).map_or_else(Vec::new, Host::addrs)
    }

    /// `host`'s first IPv4 address.
    pub fn v4(&self, host: HostId) -> Result<IpAddr, SimError> {
        self.addr_of(host, false)
    }

    /// `host`'s first IPv6 address.
    pub fn v6(&self, host: HostId) -> Result<IpAddr, SimError> {
        self.addr_of(host, true)
    }

    /// `nat`'s outside addresses (IPv4 first).
    pub fn nat_addrs(&self, nat: NatId) -> Vec<IpAddr> {
        self.nats
            .get(nat.0)
            .map_or_else(Vec::new, |n| n.addrs.clone())
    }

    fn addr_of(&self, host: HostId, v6: bool) -> Result<IpAddr, SimError> {
        let h = self.host_ref(host)?;
        let found = h.ifaces.iter().map(|i| i.addr).find(|a| a.is_ipv6() == v6);
        found.ok_or(SimError::NoAddress { host, v6 })
    }

    /// The root of `segment`'s realm: up through routed parents.
    pub(super) fn realm(&self, mut segment: SegmentId) -> SegmentId {
        while let Some(parent) = self.segments.get(segment.0).and_then(|s| s.parent) {
            segment = parent;
        }
        segment
    }

    fn segment_ref(&self, id: SegmentId) -> Result<&Segment, SimError> {
        self.segments.get(id.0).ok_or(SimError::UnknownSegment(id))
    }

    fn host_ref(&self, id: HostId) -> Result<&Host, SimError> {
        self.hosts.get(id.0).ok_or(SimError::UnknownHost(id))
    }

    fn push_segment(
        &mut self,
        name: &str,
        stack: Stack,
        parent: Option<SegmentId>,
        nat: Option<NatId>,
    ) -> SegmentId {
        let name = name.to_owned();
        self.segments.push(Segment {
            name,
            stack,
            parent,
            nat,
            next: [2; 3],
        });
        SegmentId(self.segments.len() - 1)
    }

    fn push_host(&mut self, name: &str) -> HostId {
        self.hosts.push(Host {
            name: name.to_owned(),
            ifaces: Vec::new(),
        });
        HostId(self.hosts.len() - 1)
    }

    /// New addresses on `segment`, one per family, none of them in `held`.
    fn fresh_addrs(
        &mut self,
        segment: SegmentId,
        held: &[IpAddr],
    ) -> Result<Vec<IpAddr>, SimError> {
        let stack = self.segment_ref(segment)?.stack;
        stack
            .families()
            .map(|v6| self.allocate(segment, v6, false, held))
            .collect()
    }

    /// Whether `addr` may be added on `segment` to a host that holds `held` (a host holds an
    /// address once, even across realms).
    fn check_free(
        &self,
        segment: SegmentId,
        addr: IpAddr,
        held: &[IpAddr],
    ) -> Result<(), SimError> {
        if !self.segment_ref(segment)?.stack.carries(addr) {
            return Err(SimError::FamilyNotCarried(segment));
        }
        if held.contains(&addr) || self.owners.contains_key(&(self.realm(segment), addr)) {
            return Err(SimError::AddressInUse(addr));
        }
        Ok(())
    }

    /// Adds an interface; `host`, `segment` and `addr` are already checked.
    fn plug(&mut self, host: HostId, segment: SegmentId, addr: IpAddr) {
        let link = self.default_link;
        self.hosts[host.0].ifaces.push(Iface {
            addr,
            segment,
            link,
        });
        self.owners
            .insert((self.realm(segment), addr), Owner::Host(host));
    }

    /// Removes an interface that `host` has.
    fn unplug(&mut self, host: HostId, iface: Iface) {
        self.hosts[host.0].ifaces.retain(|i| i.addr != iface.addr);
        self.owners.remove(&(self.realm(iface.segment), iface.addr));
    }

    /// The next free address of the family on `segment` (see the module's address plan) that
    /// is not in `held`.
    fn allocate(
        &mut self,
        segment: SegmentId,
        v6: bool,
        for_nat: bool,
        held: &[IpAddr],
    ) -> Result<IpAddr, SimError> {
        let realm = self.realm(segment);
        let public = self.internet == Some(realm);
        let (pool, owner, limit) = match (v6, for_nat && public) {
            (true, _) => (POOL_V6, segment, u32::from(u16::MAX)),
            (false, true) => (POOL_V4_NAT, realm, 254),
            (false, false) => (POOL_V4, realm, 254),
        };
        loop {
            let next = &mut self.segments[owner.0].next[pool];
            let n = *next;
            if n > limit {
                return Err(SimError::AddressesExhausted(segment));
            }
            *next += 1;
            let addr =
                pool_addr(pool, public, owner.0, n).ok_or(SimError::AddressesExhausted(segment))?;
            if !held.contains(&addr) && !self.owners.contains_key(&(realm, addr)) {
                return Ok(addr);
            }
        }
    }
}

/// Host number `n` of `pool` in the plan; `None` when the segment index does not fit it.
fn pool_addr(pool: usize, public: bool, segment: usize, n: u32) -> Option<IpAddr> {
    let segment16 = u16::try_from(segment).ok()?;
    let n16 = u16::try_from(n).ok()?;
    Some(match (pool, public) {
        (POOL_V6, true) => IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, segment16, 0, 0, 0, n16)),
        (POOL_V6, false) => IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, segment16, 0, 0, 0, n16)),
        (POOL_V4_NAT, _) => IpAddr::V4(Ipv4Addr::new(198, 51, 100, u8::try_from(n).ok()?)),
        (_, true) => IpAddr::V4(Ipv4Addr::new(203, 0, 113, u8::try_from(n).ok()?)),
        (_, false) => IpAddr::V4(Ipv4Addr::new(
            192,
            168,
            u8::try_from(segment).ok()?,
            u8::try_from(n).ok()?,
        )),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{Filtering, Mapping, Outcome, Place};
    use core::time::Duration;
    use std::net::SocketAddr;

    fn open() -> NatConfig {
        NatConfig::new(Mapping::EndpointIndependent, Filtering::EndpointIndependent)
    }

    #[test]
    fn addresses_come_from_the_documentation_and_private_ranges() {
        let mut sim = Sim::new(1);
        let internet = sim.internet();
        assert_eq!(sim.internet(), internet, "one internet");
        let cn = sim.host("cn", internet).unwrap();
        let (nat, lan) = sim.nat("home", internet, open()).unwrap();
        let mn = sim.host("mn", lan).unwrap();
        let (inner, inner_lan) = sim.nat("inner", lan, open()).unwrap();
        let deep = sim.host("deep", inner_lan).unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(sim.addrs(cn), [ip("203.0.113.2"), ip("2001:db8:0:0::2")]);
        assert_eq!(sim.nat_addrs(nat), [ip("198.51.100.2")]);
        assert_eq!(sim.addrs(mn), [ip("192.168.1.2")]);
        assert_eq!(sim.nat_addrs(inner), [ip("192.168.1.3")]);
        assert_eq!(sim.addrs(deep), [ip("192.168.2.2")]);
    }

    #[test]
    fn an_address_is_unique_in_its_realm_but_may_repeat_behind_another_nat() {
        let mut sim = Sim::new(1);
        let internet = sim.internet();
        let (_, one) = sim.nat("one", internet, open()).unwrap();
        let (_, two) = sim.nat("two", internet, open()).unwrap();
        let same = IpAddr::from([10, 0, 0, 2]);
        sim.host_at("a", one, same).unwrap();
        assert_eq!(
            sim.host_at("b", one, same),
            Err(SimError::AddressInUse(same))
        );
        sim.host_at("c", two, same).unwrap();
        let routed = sim
            .segment("wifi", Stack::DualStack, Some(internet))
            .unwrap();
        let public = sim.host("d", internet).unwrap();
        let taken = sim.v4(public).unwrap();
        assert_eq!(
            sim.host_at("e", routed, taken),
            Err(SimError::AddressInUse(taken)),
            "a routed segment shares its parent's realm"
        );
    }

    #[test]
    fn a_host_holds_an_address_only_once_even_across_realms() {
        let mut sim = Sim::new(1);
        let internet = sim.internet();
        let (_, one) = sim.nat("one", internet, open()).unwrap();
        let (_, two) = sim.nat("two", internet, open()).unwrap();
        let next_in_two = IpAddr::from([192, 168, 2, 2]);
        let mn = sim.host_at("mn", one, next_in_two).unwrap();
        assert_eq!(
            sim.attach_at(mn, two, next_in_two),
            Err(SimError::AddressInUse(next_in_two))
        );
        let change = sim.attach(mn, two).unwrap();
        assert_eq!(change.added, [IpAddr::from([192, 168, 2, 3])]);
    }

    #[test]
    fn a_segment_refuses_addresses_and_children_of_a_family_it_does_not_carry() {
        let mut sim = Sim::new(1);
        let internet = sim.internet();
        let (_, lan) = sim.nat("home", internet, open()).unwrap();
        let v6 = IpAddr::from([0x2001, 0xdb8, 9, 0, 0, 0, 0, 1]);
        assert_eq!(
            sim.host_at("x", lan, v6),
            Err(SimError::FamilyNotCarried(lan))
        );
        assert_eq!(
            sim.segment("v6", Stack::V6Only, Some(lan)),
            Err(SimError::FamilyNotCarried(lan))
        );
        let v6_only = sim.segment("v6", Stack::V6Only, Some(internet)).unwrap();
        assert_eq!(
            sim.nat("nat44", v6_only, open()),
            Err(SimError::FamilyNotCarried(v6_only))
        );
    }

    #[test]
    fn a_private_pool_runs_out_with_an_error() {
        let mut sim = Sim::new(1);
        let lan = sim.segment("lan", Stack::V4Only, None).unwrap();
        for i in 0..253 {
            sim.host(&format!("h{i}"), lan).unwrap();
        }
        assert_eq!(
            sim.host("one too many", lan),
            Err(SimError::AddressesExhausted(lan))
        );
    }

    #[test]
    fn a_host_that_moves_gets_a_new_address_and_its_old_mapping_is_no_longer_used() {
        let mut sim = Sim::new(1);
        let internet = sim.internet();
        let (nat_a, wifi) = sim.nat("wifi", internet, open()).unwrap();
        let (nat_b, lte) = sim.nat("lte", internet, open()).unwrap();
        let mn = sim.host("mn", wifi).unwrap();
        let cn = sim.host("cn", internet).unwrap();
        let server = SocketAddr::new(sim.v4(cn).unwrap(), 80);
        let old = SocketAddr::new(sim.v4(mn).unwrap(), 5000);
        sim.send(Time::ZERO, mn, old, server, vec![]).unwrap();
        let old_external = sim.step().unwrap().remote;
        assert_eq!(old_external.ip(), sim.nat_addrs(nat_a)[0]);

        let change = sim.move_host(mn, lte).unwrap();
        let new = SocketAddr::new(sim.v4(mn).unwrap(), 5000);
        assert_eq!(
            change,
            AddressChange {
                host: mn,
                removed: vec![old.ip()],
                added: vec![new.ip()]
            }
        );
        assert_eq!(
            sim.send(sim.now(), mn, old, server, vec![]),
            Err(SimError::NotLocalAddress {
                host: mn,
                addr: old.ip()
            })
        );

        sim.send(sim.now(), cn, server, old_external, vec![1])
            .unwrap();
        assert_eq!(
            sim.step(),
            None,
            "the old mapping leads nowhere: {}",
            sim.dump()
        );
        let hop = sim.capture().back().unwrap();
        assert_eq!(
            (hop.place, hop.outcome),
            (Place::Segment(wifi), Outcome::NoRoute)
        );

        sim.send(sim.now(), mn, new, server, vec![2]).unwrap();
        let up = sim.step().unwrap();
        assert_eq!(up.remote.ip(), sim.nat_addrs(nat_b)[0]);
        sim.send(up.at, cn, server, up.remote, vec![3]).unwrap();
        let down = sim.step().unwrap();
        assert_eq!((down.host, down.local, down.payload), (mn, new, vec![3]));
    }

    #[test]
    fn a_datagram_in_flight_to_a_detached_interface_is_dropped_on_arrival() {
        let mut sim = Sim::new(1).with_default_link(Link::latency(Duration::from_millis(10)));
        let internet = sim.internet();
        let (a, b) = (
            sim.host("a", internet).unwrap(),
            sim.host("b", internet).unwrap(),
        );
        let (from, to) = (
            SocketAddr::new(sim.v4(a).unwrap(), 1),
            SocketAddr::new(sim.v4(b).unwrap(), 2),
        );
        sim.send(Time::ZERO, a, from, to, vec![]).unwrap();
        sim.advance(Time::from_millis(15));
        let change = sim.detach(b, to.ip()).unwrap();
        assert_eq!(change.removed, [to.ip()]);
        assert_eq!(sim.step(), None);
        assert_eq!(
            sim.capture().back().unwrap().outcome,
            Outcome::InterfaceGone
        );
        assert_eq!(
            sim.detach(b, to.ip()),
            Err(SimError::NotLocalAddress {
                host: b,
                addr: to.ip()
            })
        );
    }

    #[test]
    fn an_extra_interface_gives_a_host_a_second_path() {
        let mut sim = Sim::new(1);
        let internet = sim.internet();
        let (_, wifi) = sim.nat("wifi", internet, open()).unwrap();
        let lte = sim.segment("lte", Stack::V6Only, Some(internet)).unwrap();
        let mn = sim.host("mn", wifi).unwrap();
        let cn = sim.host("cn", internet).unwrap();
        let change = sim.attach(mn, lte).unwrap();
        assert_eq!(change.added, [sim.v6(mn).unwrap()]);
        assert_eq!(sim.addrs(mn).len(), 2);
        let explicit = IpAddr::from([0x2001, 0xdb8, 0, 7, 0, 0, 0, 9]);
        sim.attach_at(mn, lte, explicit).unwrap();
        let to = SocketAddr::new(sim.v6(cn).unwrap(), 80);
        sim.send(Time::ZERO, mn, SocketAddr::new(explicit, 1), to, vec![])
            .unwrap();
        assert_eq!(sim.step().map(|d| d.remote.ip()), Some(explicit));
    }
}
