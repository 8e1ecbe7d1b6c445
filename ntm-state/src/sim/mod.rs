//! A deterministic simulator of a whole UDP network in virtual time.
//!
//! The simulator is the network only: segments, hosts, links and NATs. Tests attach the
//! protocol's state machines themselves, keep a map from [`HostId`] to machine, hand each
//! [`Delivery`] to its machine and feed what the machine transmits back to [`Sim::send`].
//!
//! # The model
//!
//! * A **segment** is a network with an address-family policy ([`Stack`]). A segment is the
//!   root of its own address realm, sits behind a NAT (it is that NAT's inside segment), or is
//!   routed without translation into a parent segment, with which it then shares a realm.
//!   [`Sim::internet`] is the dual-stack root segment with no NAT above it. Addresses are
//!   unique within a realm, so two NATs' inside segments may reuse the same private address.
//! * A **host** has interfaces; each holds one address on one segment and one [`Link`]
//!   (latency, jitter, loss, duplication, reordering). A host on a dual-stack segment gets one
//!   interface per family.
//! * A **NAT** ([`NatConfig`]: RFC 4787 mapping, filtering, port assignment, timeout,
//!   hairpinning) joins an inside segment to an outside segment, on which it holds one address
//!   per family it translates, and has a [`Link`] to that outside segment. A NAT's outside
//!   segment may itself be behind a NAT (cascaded NATs).
//!
//! # Addresses
//!
//! Addresses come from documentation and private ranges, so a capture reads at a glance:
//!
//! | where | IPv4 | IPv6 |
//! |---|---|---|
//! | hosts in the internet's realm | 203.0.113.0/24 | 2001:db8:0:S::/64 |
//! | NATs' outside addresses on the internet | 198.51.100.0/24 | 2001:db8:0:S::/64 |
//! | everything in another realm (behind a NAT, or isolated) | 192.168.R.0/24 | fd00:0:0:S::/64 |
//!
//! where S is the segment's index and R the index of its realm's root segment; host numbers
//! start at 2 and are not reused. [`Sim::host_at`] and [`Sim::attach_at`] take any address
//! instead (two hosts behind two NATs at the same private address, for instance).
//!
//! # Routing
//!
//! A datagram crosses its sender's link to the sender's segment. There, unless the segment
//! does not carry its family (or its source and destination families differ): to the host in
//! the realm that holds the destination address (across that host's link); else to the NAT
//! whose outside address it is (across the NAT's link, then the NAT's filter and reverse
//! mapping into the inside segment); else up through the realm's NAT (mapping, then the NAT's
//! link to the outside segment, where routing starts again). A datagram that a NAT sends back
//! in is never sent up again, and one that goes up to its own NAT's outside address is
//! hairpinned back in if the NAT allows it. Whatever has nowhere to go is dropped, and every
//! decision is a [`Hop`] in the capture, with its [`Outcome`].
//!
//! # Driving it
//!
//! The API is sans-IO and time only moves forward. [`Sim::send`] injects a datagram at `now`
//! (no earlier than the simulator's [`Sim::now`]). Deliveries come out in time order, ties in
//! the order they were scheduled, in either of two ways:
//!
//! * [`Sim::step_until`]`(t)` returns the next delivery due by `t`, moving time to it, and
//!   `None` once there is none left (time is then `t`). A harness whose machines have timers
//!   takes `t` = the earliest of their timeouts, hands each delivery to its machine at
//!   `delivery.at` and sends what the machine transmits at that same time, then fires the
//!   timers at `t`. [`Sim::step`] is the same without a bound, for tests without timers.
//! * [`Sim::advance`]`(t)` runs the network up to `t` and queues every delivery due by then
//!   for [`Sim::poll_delivery`]; [`Sim::next_event_time`] says when something next happens.
//!   Replies to those deliveries can only be sent at `t` or later.
//!
//! ```
//! use std::net::SocketAddr;
//! use ntm_state::sim::{Filtering, Mapping, NatConfig, Sim};
//! use ntm_state::time::Time;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A correspondent on the global internet, a mobile node behind a home NAT.
//! let mut sim = Sim::new(7);
//! let internet = sim.internet();
//! let cn = sim.host("cn", internet)?;
//! let eim_apdf = NatConfig::new(Mapping::EndpointIndependent, Filtering::AddressAndPortDependent);
//! let (_nat, home) = sim.nat("home", internet, eim_apdf)?;
//! let mn = sim.host("mn", home)?;
//! let mn_addr = SocketAddr::new(sim.v4(mn)?, 5000);
//!
//! sim.send(Time::ZERO, mn, mn_addr, SocketAddr::new(sim.v4(cn)?, 53), b"hi".to_vec())?;
//! let request = sim.step().ok_or("the request was not delivered")?;
//! assert_eq!(request.host, cn);
//! // The reply goes to the MN's mapping on the NAT and is let back in.
//! sim.send(request.at, cn, request.local, request.remote, b"ho".to_vec())?;
//! let reply = sim.step().ok_or("the reply was not delivered")?;
//! assert_eq!((reply.host, reply.local, reply.payload), (mn, mn_addr, b"ho".to_vec()));
//! # Ok(()) }
//! ```
//!
//! # Moving hosts
//!
//! [`Sim::move_host`] detaches every interface of a host and attaches new ones on another
//! segment; [`Sim::attach`], [`Sim::attach_at`] and [`Sim::detach`] add or remove one. Each
//! returns the [`AddressChange`] to feed to the host's node. Mappings made through the old
//! address stay on their NAT until they time out, unused: a datagram sent to one comes in to
//! a segment where nobody holds the address any more and is dropped, as is a datagram still on
//! its way to a removed interface.
//!
//! # Determinism and replay
//!
//! All randomness (link effects, random NAT ports) comes from one `ChaCha8Rng` seeded with
//! [`Sim::new`]'s seed, and all state is kept in ordered structures, so the same seed and the
//! same calls give the same deliveries and the same capture, byte for byte. A failing test
//! should print [`Sim::seed`] and [`Sim::dump`] (`assert!(ok, "{}", sim.dump())`: the dump
//! starts with the seed); running it again with that seed replays the failure.
//!
//! The capture keeps the most recent hops only ([`Sim::with_capture_limit`], default
//! [`DEFAULT_CAPTURE_LIMIT`]) and counts the ones it dropped.

mod capture;
mod link;
mod nat;
mod topology;

use core::fmt;
use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, SocketAddr};

use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;

pub use capture::{Hop, Outcome, Place};
pub use link::Link;
pub use nat::{Filtering, Mapping, NatConfig, PortAssignment};
pub use topology::{AddressChange, SimError, Stack};

use crate::time::Time;
use link::{chance, sample_delay};
use nat::Nat;
use topology::{Host, Segment};

/// How many hops the capture keeps unless told otherwise.
pub const DEFAULT_CAPTURE_LIMIT: usize = 65_536;

/// A segment (network).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentId(usize);

/// A host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostId(usize);

/// A NAT.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NatId(usize);

/// A datagram handed to a host.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Delivery {
    /// When it arrived.
    pub at: Time,
    /// The host it arrived at.
    pub host: HostId,
    /// The host's address and port it was sent to.
    pub local: SocketAddr,
    /// Where it came from, as seen by the host (after any NAT translation).
    pub remote: SocketAddr,
    /// The bytes.
    pub payload: Vec<u8>,
}

#[derive(Clone, Debug)]
struct Datagram {
    src: SocketAddr,
    dst: SocketAddr,
    payload: Vec<u8>,
}

/// Something that happens when a datagram reaches the far end of a link.
#[derive(Clone, Debug)]
enum Event {
    /// Arrives on a segment, from a host or from a NAT below it.
    Segment(SegmentId, Datagram),
    /// Arrives at a NAT's outside address.
    Nat(NatId, Datagram),
    /// Arrives at a host.
    Host(HostId, Datagram),
}

impl Event {
    fn datagram(&self) -> &Datagram {
        match self {
            Event::Segment(_, d) | Event::Nat(_, d) | Event::Host(_, d) => d,
        }
    }
}

/// Who holds an address within a realm.
#[derive(Clone, Copy, Debug)]
enum Owner {
    Host(HostId),
    Nat(NatId),
}

/// The simulated network. See the [module documentation](self).
#[derive(Clone, Debug)]
pub struct Sim {
    seed: u64,
    rng: ChaCha8Rng,
    now: Time,
    default_link: Link,
    segments: Vec<Segment>,
    hosts: Vec<Host>,
    nats: Vec<Nat>,
    internet: Option<SegmentId>,
    /// Every address in use, keyed by (realm root, address).
    owners: BTreeMap<(SegmentId, IpAddr), Owner>,
    /// Pending arrivals, by time and then by insertion order.
    events: BTreeMap<(Time, u64), Event>,
    next_seq: u64,
    deliveries: VecDeque<Delivery>,
    capture: capture::Capture,
}

impl Sim {
    /// An empty network at [`Time::ZERO`] whose randomness all comes from `seed`.
    pub fn new(seed: u64) -> Sim {
        Sim {
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
            now: Time::ZERO,
            default_link: Link::IDEAL,
            segments: Vec::new(),
            hosts: Vec::new(),
            nats: Vec::new(),
            internet: None,
            owners: BTreeMap::new(),
            events: BTreeMap::new(),
            next_seq: 0,
            deliveries: VecDeque::new(),
            capture: capture::Capture::new(DEFAULT_CAPTURE_LIMIT),
        }
    }

    /// Interfaces and NATs created from now on get this link (e.g. 20% loss on every link).
    pub fn with_default_link(mut self, link: Link) -> Sim {
        self.default_link = link;
        self
    }

    /// Keep at most `hops` capture records; older ones are dropped (and counted).
    pub fn with_capture_limit(mut self, hops: usize) -> Sim {
        self.capture.limit = hops;
        self
    }

    /// The seed: print it with a failure to replay it.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The current virtual time: the latest of the times passed in and the events run.
    pub fn now(&self) -> Time {
        self.now
    }

    /// Sends a UDP datagram from `host`, whose interface holds `from`'s address, at `now`
    /// (after running the network up to `now`). Whether and when it arrives is up to the
    /// network; the error cases are the caller's mistakes.
    pub fn send(
        &mut self,
        now: Time,
        host: HostId,
        from: SocketAddr,
        to: SocketAddr,
        payload: Vec<u8>,
    ) -> Result<(), SimError> {
        if now < self.now {
            return Err(SimError::TimeWentBackwards {
                now: self.now,
                requested: now,
            });
        }
        let iface = self
            .hosts
            .get(host.0)
            .ok_or(SimError::UnknownHost(host))?
            .iface(from.ip())
            .ok_or(SimError::NotLocalAddress {
                host,
                addr: from.ip(),
            })?;
        self.advance(now);
        let datagram = Datagram {
            src: from,
            dst: to,
            payload,
        };
        self.record(now, Place::Host(host), &datagram, Outcome::Sent);
        self.cross(
            now,
            iface.link,
            Place::Host(host),
            Event::Segment(iface.segment, datagram),
        );
        Ok(())
    }

    /// Runs every event up to and including `to`, queueing deliveries for
    /// [`Sim::poll_delivery`]. Time never goes back: an earlier `to` does nothing.
    pub fn advance(&mut self, to: Time) {
        while self.run_next(to) {}
        self.now = self.now.max(to);
    }

    /// The next delivery that [`Sim::advance`] queued, oldest first.
    pub fn poll_delivery(&mut self) -> Option<Delivery> {
        self.deliveries.pop_front()
    }

    /// When the next datagram reaches the end of a link, if any is in flight.
    pub fn next_event_time(&self) -> Option<Time> {
        self.events.first_key_value().map(|((at, _), _)| *at)
    }

    /// The next delivery at or before `until`: a queued one, or the next one the network
    /// produces, running events (and moving time) up to it. `None` when there is none; time
    /// is then `until`.
    pub fn step_until(&mut self, until: Time) -> Option<Delivery> {
        loop {
            if let Some(delivery) = self.deliveries.pop_front() {
                return Some(delivery);
            }
            if !self.run_next(until) {
                self.now = self.now.max(until);
                return None;
            }
        }
    }

    /// The next delivery, however far ahead. `None` when nothing is queued or in flight.
    pub fn step(&mut self) -> Option<Delivery> {
        loop {
            if let Some(delivery) = self.deliveries.pop_front() {
                return Some(delivery);
            }
            if !self.run_next(Time::MAX) {
                return None;
            }
        }
    }

    /// The capture, oldest hop first.
    pub fn capture(&self) -> &VecDeque<Hop> {
        &self.capture.hops
    }

    /// The seed and the capture as text, one hop per line, for a failing test's message.
    /// Also what `Display` prints.
    pub fn dump(&self) -> String {
        self.to_string()
    }

    /// Runs the next event if it is due at or before `until`.
    fn run_next(&mut self, until: Time) -> bool {
        match self.events.first_entry() {
            Some(entry) if entry.key().0 <= until => {
                let ((at, _), event) = entry.remove_entry();
                self.run(at, event);
                true
            }
            _ => false,
        }
    }

    fn run(&mut self, at: Time, event: Event) {
        self.now = self.now.max(at);
        match event {
            Event::Segment(segment, d) => self.route(at, segment, d, false),
            Event::Nat(nat, d) => self.inbound(at, nat, d),
            Event::Host(host, d) => {
                if self.hosts[host.0].iface(d.dst.ip()).is_some() {
                    self.record(at, Place::Host(host), &d, Outcome::Delivered);
                    let delivery = Delivery {
                        at,
                        host,
                        local: d.dst,
                        remote: d.src,
                        payload: d.payload,
                    };
                    self.deliveries.push_back(delivery);
                } else {
                    self.record(at, Place::Host(host), &d, Outcome::InterfaceGone);
                }
            }
        }
    }

    /// The routing step on `segment`; `descending` when a NAT just sent the datagram in.
    fn route(&mut self, at: Time, segment: SegmentId, d: Datagram, descending: bool) {
        let carried = self.segments[segment.0].stack.carries(d.dst.ip());
        if !carried || d.src.is_ipv6() != d.dst.is_ipv6() {
            return self.record(at, Place::Segment(segment), &d, Outcome::FamilyMismatch);
        }
        let realm = self.realm(segment);
        match self.owners.get(&(realm, d.dst.ip())).copied() {
            Some(Owner::Host(host)) => match self.hosts[host.0].iface(d.dst.ip()) {
                Some(iface) => self.cross(at, iface.link, Place::Host(host), Event::Host(host, d)),
                None => self.record(at, Place::Host(host), &d, Outcome::InterfaceGone),
            },
            Some(Owner::Nat(nat)) => {
                let link = self.nats[nat.0].link;
                self.cross(at, link, Place::Nat(nat), Event::Nat(nat, d));
            }
            None => match self.segments[realm.0].nat {
                Some(nat) if !descending => self.outbound(at, nat, d),
                _ => self.record(at, Place::Segment(segment), &d, Outcome::NoRoute),
            },
        }
    }

    /// A datagram leaving `nat`'s inside segment.
    fn outbound(&mut self, at: Time, id: NatId, d: Datagram) {
        let nat = &mut self.nats[id.0];
        let Some(external) = nat.addr_like(d.src.ip()) else {
            return self.record(at, Place::Nat(id), &d, Outcome::FamilyMismatch);
        };
        let Some(port) = nat
            .table
            .outbound(at, &nat.config, d.src, d.dst, &mut self.rng)
        else {
            return self.record(at, Place::Nat(id), &d, Outcome::PortsExhausted);
        };
        let (hairpin, link, outside) = (nat.config.hairpin, nat.link, nat.outside);
        let src = SocketAddr::new(external, port);
        self.record(
            at,
            Place::Nat(id),
            &d,
            Outcome::Translated { src, dst: d.dst },
        );
        let translated = Datagram { src, ..d };
        if translated.dst.ip() != external {
            self.cross(
                at,
                link,
                Place::Nat(id),
                Event::Segment(outside, translated),
            );
        } else if hairpin {
            self.inbound(at, id, translated);
        } else {
            self.record(at, Place::Nat(id), &translated, Outcome::HairpinOff);
        }
    }

    /// A datagram for `nat`'s outside address (from outside, or hairpinned).
    fn inbound(&mut self, at: Time, id: NatId, d: Datagram) {
        let nat = &mut self.nats[id.0];
        let v6 = d.dst.is_ipv6();
        match nat.table.inbound(at, &nat.config, v6, d.dst.port(), d.src) {
            Err(outcome) => self.record(at, Place::Nat(id), &d, outcome),
            Ok(internal) => {
                let inside = nat.inside;
                self.record(
                    at,
                    Place::Nat(id),
                    &d,
                    Outcome::Translated {
                        src: d.src,
                        dst: internal,
                    },
                );
                self.route(at, inside, Datagram { dst: internal, ..d }, true);
            }
        }
    }

    /// Applies `link` to the datagram in `event`: lose it, or schedule its arrival (twice if
    /// duplicated).
    fn cross(&mut self, at: Time, link: Link, place: Place, event: Event) {
        if chance(&mut self.rng, link.loss) {
            return self.record(at, place, event.datagram(), Outcome::Lost);
        }
        if chance(&mut self.rng, link.duplicate) {
            self.record(at, place, event.datagram(), Outcome::Duplicated);
            let delay = sample_delay(&mut self.rng, &link);
            self.schedule(at + delay, event.clone());
        }
        let delay = sample_delay(&mut self.rng, &link);
        self.schedule(at + delay, event);
    }

    fn schedule(&mut self, at: Time, event: Event) {
        self.events.insert((at, self.next_seq), event);
        self.next_seq += 1;
    }

    fn record(&mut self, at: Time, place: Place, d: &Datagram, outcome: Outcome) {
        let len = d.payload.len();
        self.capture.push(Hop {
            at,
            place,
            src: d.src,
            dst: d.dst,
            len,
            outcome,
        });
    }

    fn place_name(&self, place: Place) -> (&'static str, &str) {
        let name = match place {
            Place::Host(h) => self.hosts.get(h.0).map(|h| h.name.as_str()),
            Place::Segment(s) => self.segments.get(s.0).map(|s| s.name.as_str()),
            Place::Nat(n) => self.nats.get(n.0).map(|n| n.name.as_str()),
        };
        let kind = match place {
            Place::Host(_) => "host",
            Place::Segment(_) => "segment",
            Place::Nat(_) => "nat",
        };
        (kind, name.unwrap_or("?"))
    }
}

/// The seed, then one line per captured hop: time, place, source -> destination, length,
/// outcome.
impl fmt::Display for Sim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.capture;
        writeln!(
            f,
            "seed {}: {} hops ({} older ones dropped)",
            self.seed,
            c.hops.len(),
            c.dropped
        )?;
        for hop in &c.hops {
            let (kind, name) = self.place_name(hop.place);
            writeln!(
                f,
                "{} {kind} {name}: {} -> {} {}B {}",
                hop.at, hop.src, hop.dst, hop.len, hop.outcome
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::time::Duration;

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    /// Two hosts on the internet; `sender`'s link is `link`, the receiver's is ideal.
    fn pair(seed: u64, link: Link) -> (Sim, HostId, SocketAddr, HostId, SocketAddr) {
        let mut sim = Sim::new(seed);
        let internet = sim.internet();
        let a = sim.host("a", internet).unwrap();
        let b = sim.host("b", internet).unwrap();
        let (a_ep, b_ep) = (
            SocketAddr::new(sim.v4(a).unwrap(), 1),
            SocketAddr::new(sim.v4(b).unwrap(), 2),
        );
        sim.set_link(a, a_ep.ip(), link).unwrap();
        (sim, a, a_ep, b, b_ep)
    }

    /// Sends `n` numbered datagrams 1 ms apart; returns (number, arrival time) in arrival order.
    fn stream(
        sim: &mut Sim,
        from: (HostId, SocketAddr),
        to: SocketAddr,
        n: u32,
    ) -> Vec<(u32, Time)> {
        let number = |d: Delivery| (u32::from_be_bytes(d.payload.try_into().unwrap()), d.at);
        let mut arrived = Vec::new();
        for i in 0..n {
            let at = Time::from_millis(u64::from(i));
            sim.send(at, from.0, from.1, to, i.to_be_bytes().to_vec())
                .unwrap();
            arrived.extend(std::iter::from_fn(|| sim.poll_delivery()).map(number));
        }
        arrived.extend(std::iter::from_fn(|| sim.step()).map(number));
        arrived
    }

    fn count(sim: &Sim, outcome: Outcome) -> usize {
        sim.capture()
            .iter()
            .filter(|h| h.outcome == outcome)
            .count()
    }

    #[test]
    fn a_datagram_across_two_links_arrives_after_the_sum_of_their_latencies() {
        let (mut sim, a, a_ep, b, b_ep) = pair(1, Link::latency(ms(10)));
        sim.set_link(b, b_ep.ip(), Link::latency(ms(25))).unwrap();
        sim.send(Time::from_millis(100), a, a_ep, b_ep, vec![7])
            .unwrap();
        assert_eq!(sim.next_event_time(), Some(Time::from_millis(110)));
        sim.advance(Time::from_millis(134));
        assert_eq!(sim.poll_delivery(), None);
        sim.advance(Time::from_millis(135));
        let d = sim.poll_delivery().unwrap();
        assert_eq!(
            (d.at, d.host, d.local, d.remote, d.payload),
            (Time::from_millis(135), b, b_ep, a_ep, vec![7])
        );
        assert_eq!(sim.now(), Time::from_millis(135));
    }

    #[test]
    fn step_until_stops_at_its_bound_and_moves_time_there() {
        let (mut sim, a, a_ep, b, b_ep) = pair(1, Link::latency(ms(10)));
        sim.send(Time::ZERO, a, a_ep, b_ep, vec![]).unwrap();
        assert_eq!(sim.step_until(Time::from_millis(9)), None);
        assert_eq!(sim.now(), Time::from_millis(9));
        let d = sim.step_until(Time::from_millis(60)).unwrap();
        assert_eq!(
            (d.at, d.host, sim.now()),
            (Time::from_millis(10), b, Time::from_millis(10))
        );
        assert_eq!(sim.step_until(Time::from_millis(60)), None);
        assert_eq!(
            (sim.now(), sim.next_event_time()),
            (Time::from_millis(60), None)
        );
    }

    #[test]
    fn a_nat_adds_its_own_link_to_the_path() {
        let mut sim = Sim::new(1).with_default_link(Link::latency(ms(10)));
        let internet = sim.internet();
        let (nat, lan) = sim
            .nat(
                "home",
                internet,
                NatConfig::new(Mapping::EndpointIndependent, Filtering::EndpointIndependent),
            )
            .unwrap();
        sim.set_nat_link(nat, Link::latency(ms(5))).unwrap();
        let (mn, cn) = (
            sim.host("mn", lan).unwrap(),
            sim.host("cn", internet).unwrap(),
        );
        let to = SocketAddr::new(sim.v4(cn).unwrap(), 80);
        sim.send(
            Time::ZERO,
            mn,
            SocketAddr::new(sim.v4(mn).unwrap(), 5000),
            to,
            vec![],
        )
        .unwrap();
        assert_eq!(sim.step().unwrap().at, Time::from_millis(25));
    }

    #[test]
    fn datagrams_due_at_the_same_time_arrive_in_the_order_they_were_sent() {
        let (mut sim, a, a_ep, _, b_ep) = pair(1, Link::latency(ms(3)));
        for i in 0..5u8 {
            sim.send(Time::ZERO, a, a_ep, b_ep, vec![i]).unwrap();
        }
        let order: Vec<u8> = std::iter::from_fn(|| sim.step())
            .map(|d| d.payload[0])
            .collect();
        assert_eq!(order, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn an_ipv4_only_segment_cannot_send_to_an_ipv6_destination_and_a_dual_stack_one_can() {
        let mut sim = Sim::new(1);
        let internet = sim.internet();
        let (_, lan) = sim
            .nat(
                "home",
                internet,
                NatConfig::new(Mapping::EndpointIndependent, Filtering::EndpointIndependent),
            )
            .unwrap();
        let v4_only = sim.host("v4", lan).unwrap();
        let dual = sim.host("dual", internet).unwrap();
        let cn = sim.host("cn", internet).unwrap();
        assert_eq!(
            sim.v6(v4_only),
            Err(SimError::NoAddress {
                host: v4_only,
                v6: true
            })
        );
        let cn_v6 = SocketAddr::new(sim.v6(cn).unwrap(), 80);

        sim.send(
            Time::ZERO,
            v4_only,
            SocketAddr::new(sim.v4(v4_only).unwrap(), 1),
            cn_v6,
            vec![],
        )
        .unwrap();
        assert_eq!(sim.step(), None);
        let hop = sim.capture().back().unwrap();
        assert_eq!(
            (hop.place, hop.outcome),
            (Place::Segment(lan), Outcome::FamilyMismatch)
        );

        let from = SocketAddr::new(sim.v6(dual).unwrap(), 1);
        sim.send(Time::ZERO, dual, from, cn_v6, vec![]).unwrap();
        assert_eq!(sim.step().map(|d| (d.host, d.remote)), Some((cn, from)));
    }

    #[test]
    fn an_ipv6_only_access_network_reaches_the_internet_over_ipv6_only() {
        let mut sim = Sim::new(1);
        let internet = sim.internet();
        let lte = sim.segment("lte", Stack::V6Only, Some(internet)).unwrap();
        let mn = sim.host("mn", lte).unwrap();
        let cn = sim.host("cn", internet).unwrap();
        assert_eq!(sim.addrs(mn).len(), 1);
        let mine = SocketAddr::new(sim.v6(mn).unwrap(), 1);
        sim.send(
            Time::ZERO,
            mn,
            mine,
            SocketAddr::new(sim.v6(cn).unwrap(), 2),
            vec![],
        )
        .unwrap();
        let up = sim.step().unwrap();
        assert_eq!((up.host, up.remote), (cn, mine));
        sim.send(up.at, cn, up.local, mine, vec![]).unwrap();
        assert_eq!(sim.step().map(|d| d.host), Some(mn));
        sim.send(
            up.at,
            cn,
            SocketAddr::new(sim.v4(cn).unwrap(), 2),
            SocketAddr::new(sim.v6(mn).unwrap(), 1),
            vec![],
        )
        .unwrap();
        assert_eq!(sim.step(), None);
        assert_eq!(
            sim.capture().back().unwrap().outcome,
            Outcome::FamilyMismatch,
            "source and destination families differ"
        );
    }

    #[test]
    fn a_datagram_to_an_address_nobody_holds_has_no_route() {
        let (mut sim, a, a_ep, _, _) = pair(1, Link::IDEAL);
        sim.send(
            Time::ZERO,
            a,
            a_ep,
            SocketAddr::from(([192, 0, 2, 1], 9)),
            vec![],
        )
        .unwrap();
        assert_eq!(sim.step(), None);
        assert_eq!(sim.capture().back().unwrap().outcome, Outcome::NoRoute);
    }

    #[test]
    fn a_link_with_twenty_percent_loss_drops_about_a_fifth_of_the_datagrams() {
        let (mut sim, a, a_ep, _, b_ep) = pair(
            11,
            Link {
                loss: 0.2,
                ..Link::latency(ms(1))
            },
        );
        let arrived = stream(&mut sim, (a, a_ep), b_ep, 10_000).len();
        assert!(
            (7_700..=8_300).contains(&arrived),
            "{arrived} of 10000 arrived, seed {}",
            sim.seed()
        );
        assert_eq!(count(&sim, Outcome::Lost), 10_000 - arrived);
    }

    #[test]
    fn a_default_lossy_link_applies_to_every_link() {
        let mut sim = Sim::new(12).with_default_link(Link {
            loss: 0.2,
            ..Link::IDEAL
        });
        let internet = sim.internet();
        let (a, b) = (
            sim.host("a", internet).unwrap(),
            sim.host("b", internet).unwrap(),
        );
        let (a_ep, b_ep) = (
            SocketAddr::new(sim.v4(a).unwrap(), 1),
            SocketAddr::new(sim.v4(b).unwrap(), 2),
        );
        let arrived = stream(&mut sim, (a, a_ep), b_ep, 10_000).len();
        assert!(
            (6_000..=6_800).contains(&arrived),
            "0.8 * 0.8 expected, {arrived} arrived"
        );
    }

    #[test]
    fn a_duplicating_link_delivers_some_datagrams_twice() {
        let (mut sim, a, a_ep, _, b_ep) = pair(
            2,
            Link {
                duplicate: 0.1,
                jitter: ms(1),
                ..Link::latency(ms(5))
            },
        );
        let arrived = stream(&mut sim, (a, a_ep), b_ep, 2_000);
        let twice = arrived.len() - 2_000;
        assert!((120..=280).contains(&twice), "{twice} duplicates");
        assert_eq!(count(&sim, Outcome::Duplicated), twice);
        let sent = |i: u32| Time::from_millis(u64::from(i));
        let in_band = |&(i, at): &(u32, Time)| at >= sent(i) + ms(4) && at <= sent(i) + ms(6);
        assert!(
            arrived.iter().all(in_band),
            "every copy draws its own delay on the link"
        );
    }

    #[test]
    fn a_reordering_link_lets_later_datagrams_overtake_and_replays_identically() {
        let link = Link {
            reorder: 0.2,
            reorder_delay: ms(50),
            ..Link::latency(ms(10))
        };
        let run = || {
            let (mut sim, a, a_ep, _, b_ep) = pair(3, link);
            let arrived = stream(&mut sim, (a, a_ep), b_ep, 1_000);
            arrived.into_iter().map(|(i, _)| i).collect::<Vec<_>>()
        };
        let arrived = run();
        let mut sorted = arrived.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            (0..1_000).collect::<Vec<_>>(),
            "nothing lost or duplicated"
        );
        let overtaken = arrived.windows(2).filter(|w| w[0] > w[1]).count();
        assert!(overtaken > 50, "only {overtaken} inversions");
        assert_eq!(run(), arrived);
    }

    /// A busy little network with every kind of randomness: jitter, loss, duplication,
    /// reordering and random NAT ports.
    fn scenario(seed: u64) -> (Vec<Delivery>, String) {
        let link = Link {
            jitter: ms(4),
            loss: 0.1,
            duplicate: 0.05,
            reorder: 0.1,
            reorder_delay: ms(20),
            ..Link::latency(ms(10))
        };
        let mut sim = Sim::new(seed).with_default_link(link);
        let internet = sim.internet();
        let cfg = NatConfig {
            ports: PortAssignment::Random,
            ..NatConfig::new(
                Mapping::AddressAndPortDependent,
                Filtering::EndpointIndependent,
            )
        };
        let (_, lan) = sim.nat("home", internet, cfg).unwrap();
        let (mn, cn) = (
            sim.host("mn", lan).unwrap(),
            sim.host("cn", internet).unwrap(),
        );
        let (mine, theirs) = (
            SocketAddr::new(sim.v4(mn).unwrap(), 5000),
            SocketAddr::new(sim.v4(cn).unwrap(), 80),
        );
        let mut deliveries = Vec::new();
        for i in 0..200u64 {
            let at = Time::from_millis(i * 3);
            while let Some(d) = sim.step_until(at) {
                if d.host == cn {
                    sim.send(d.at, cn, d.local, d.remote, d.payload.clone())
                        .unwrap();
                }
                deliveries.push(d);
            }
            let to = SocketAddr::new(theirs.ip(), 80 + (i % 4) as u16);
            sim.send(at, mn, mine, to, vec![0; i as usize % 50])
                .unwrap();
        }
        deliveries.extend(std::iter::from_fn(|| sim.step()));
        (deliveries, sim.dump())
    }

    #[test]
    fn the_same_seed_gives_the_same_deliveries_and_capture_and_another_seed_does_not() {
        let (deliveries, dump) = scenario(42);
        assert!(deliveries.len() > 100, "{dump}");
        assert_eq!(scenario(42), (deliveries.clone(), dump.clone()));
        let (other_deliveries, other_dump) = scenario(43);
        assert_ne!(other_deliveries, deliveries);
        assert_ne!(other_dump, dump);
    }

    #[test]
    fn sending_from_an_address_the_host_does_not_have_is_an_error() {
        let (mut sim, a, _, _, b_ep) = pair(1, Link::IDEAL);
        let err = sim.send(Time::ZERO, a, b_ep, b_ep, vec![]);
        assert_eq!(
            err,
            Err(SimError::NotLocalAddress {
                host: a,
                addr: b_ep.ip()
            })
        );
        assert!(sim.capture().is_empty());
    }

    #[test]
    fn sending_in_the_past_is_an_error_and_advancing_backwards_does_nothing() {
        let (mut sim, a, a_ep, _, b_ep) = pair(1, Link::IDEAL);
        sim.advance(Time::from_secs(5));
        sim.advance(Time::from_secs(1));
        assert_eq!(sim.now(), Time::from_secs(5));
        let err = sim.send(Time::from_secs(4), a, a_ep, b_ep, vec![]);
        assert_eq!(
            err,
            Err(SimError::TimeWentBackwards {
                now: Time::from_secs(5),
                requested: Time::from_secs(4)
            })
        );
    }

    #[test]
    fn the_capture_keeps_only_the_most_recent_hops_and_the_dump_names_seed_and_places() {
        let (sim, a, a_ep, _, b_ep) = pair(77, Link::IDEAL);
        let mut sim = sim.with_capture_limit(3);
        for i in 0..3u8 {
            sim.send(Time::ZERO, a, a_ep, b_ep, vec![i; 4]).unwrap();
        }
        while sim.step().is_some() {}
        assert_eq!(sim.capture().len(), 3);
        assert_eq!(
            sim.capture().back().map(|h| h.outcome),
            Some(Outcome::Delivered)
        );
        let dump = sim.dump();
        assert!(
            dump.starts_with("seed 77: 3 hops (3 older ones dropped)\n"),
            "{dump}"
        );
        let last = format!("0.000000000s host b: {a_ep} -> {b_ep} 4B delivered\n");
        assert!(dump.ends_with(&last), "{dump}");
    }
}
