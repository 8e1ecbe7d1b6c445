//! Route selection (spec/06): which path a tunnel between two nodes takes, who initiates it,
//! which addresses each node tries, and which relay carries it.
//!
//! This module is pure: it reads two [`NodeView`]s and returns a [`RoutePlan`], without time,
//! randomness or I/O, so two DCs given the same inputs direct the same route. The deciding DC
//! (the target's for a new tunnel, spec/05 §5.5.1; the requester's for a rebuild, §5.9.2):
//!
//! 1. answers rule 0 (Offline) itself, before calling anything here;
//! 2. builds a [`NodeView`] for its own node from its registry and one for the other node with
//!    [`NodeView::from_node_info`];
//! 3. calls [`select_route`]`(requester, target, rebuild)`;
//! 4. for a [`RouteKind::Relay`] plan, checks [`RoutePlan::check_relays`] (ERROR NoRoute when the
//!    nodes share no family and no RS serves both) and then walks the RSs with [`pick_relay`],
//!    passing in `skip` those that answered RelayUnavailable or Unavailable or did not answer;
//! 5. fills each node's ROUTE_DIRECTION from the plan: [`RoutePlan::role_of`],
//!    [`RoutePlan::peer_addrs_for`], `reason`, `probe_direct`.
//!
//! ```text
//!  F := usable(R) ∩ usable(T)
//!  (1) F = {}                          Relay, FamilyMismatch, probe 0, dual-stack RS
//!      f := IPv6 if both global in IPv6, else IPv4 if in F, else IPv6
//!  (r) rebuild                         Relay, DirectFailed, probe 1 unless both symmetric in f
//!  (2) neither behind NAT in f         Direct, Reachable, T initiates
//!  (3) exactly one behind NAT in f     Direct, Reachable, the NATed node initiates
//!  (4) same observed IP in f           Direct, SameNat, T initiates
//!  (5) both map address-and-port-dependently
//!                                      Relay, BothSymmetric, probe 0
//!  (6) otherwise                       Relay, BothBehindNat, probe 1
//!  relayed routes: R initiates a new tunnel, T a rebuild
//! ```

use core::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ntm_wire::{ErrorCode, NatBehaviour, NodeInfo, RouteKind, RouteReason, TunnelRole};

/// The most addresses one `peer_addrs` list carries (the wire's address-list limit).
pub const MAX_PEER_ADDRS: usize = ntm_wire::AddrList::MAX;

/// An IP address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// Both families, IPv4 first (the order of [`NodeView::observed`]).
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// The family of a transport address.
    pub fn of(addr: &SocketAddr) -> Family {
        if addr.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }

    /// The index of this family's slot in [`NodeView::observed`]: 0 for IPv4, 1 for IPv6.
    pub fn index(self) -> usize {
        match self {
            Family::V4 => 0,
            Family::V6 => 1,
        }
    }

    fn other(self) -> Family {
        match self {
            Family::V4 => Family::V6,
            Family::V6 => Family::V4,
        }
    }
}

/// One of the two nodes of a route decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The node that sent DIRECTION_REQUEST.
    Requester,
    /// The node it named in `peer_fqdn`.
    Target,
}

impl Side {
    /// The other node.
    pub fn other(self) -> Side {
        match self {
            Side::Requester => Side::Target,
            Side::Target => Side::Requester,
        }
    }
}

/// What the deciding DC knows about one node (spec/06 §6.1).
///
/// `nat` is the mapping behaviour of the family [`NodeView::node_info_observed`] picks (IPv4
/// when the node has an IPv4 observed address, else IPv6): the one family a NodeInfo describes.
/// A DC building the view of its own node from its registry passes that family's entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    /// The node's own addresses (at most 8), as it reported them.
    pub local_addrs: Vec<SocketAddr>,
    /// The observed address per family: `[IPv4, IPv6]`.
    pub observed: [Option<SocketAddr>; 2],
    /// The NAT's mapping behaviour as the node reported it.
    pub nat: NatBehaviour,
}

impl NodeView {
    /// The view of a node described by a NodeInfo from another DC: its one observed address goes
    /// into its family's slot.
    pub fn from_node_info(info: &NodeInfo) -> NodeView {
        let mut observed = [None, None];
        if let Some(addr) = info.observed_addr {
            let addr = addr.socket_addr();
            if let Some(slot) = observed.get_mut(Family::of(&addr).index()) {
                *slot = Some(addr);
            }
        }
        NodeView {
            local_addrs: info
                .local_addrs
                .as_slice()
                .iter()
                .map(|a| a.socket_addr())
                .collect(),
            observed,
            nat: info.nat,
        }
    }

    /// The observed address a DC puts in NodeInfo: IPv4 if the node is registered over IPv4
    /// (where NATs are), otherwise IPv6 (§6.1).
    pub fn node_info_observed(&self) -> Option<SocketAddr> {
        self.observed_in(Family::V4)
            .or_else(|| self.observed_in(Family::V6))
    }

    /// The observed address in family `f`, if any. A slot holding an address of the other family
    /// counts as empty.
    pub fn observed_in(&self, f: Family) -> Option<SocketAddr> {
        self.observed
            .get(f.index())
            .copied()
            .flatten()
            .filter(|a| Family::of(a) == f)
    }

    /// Whether the node can use family `f` (§6.1): IPv4 when it has an IPv4 observed address;
    /// IPv6 when it has an IPv6 observed address or a global unicast IPv6 address (2000::/3)
    /// among its own.
    pub fn usable(&self, f: Family) -> bool {
        self.observed_in(f).is_some()
            || (f == Family::V6
                && self.local_addrs.iter().any(|a| match a.ip() {
                    IpAddr::V6(ip) => is_global_unicast_v6(&ip),
                    IpAddr::V4(_) => false,
                }))
    }

    /// Whether the node is behind a NAT in family `f`: it has an observed address there, and
    /// that transport address (IP address and port, spec/05 §5.3) is not one of its own.
    pub fn behind_nat(&self, f: Family) -> bool {
        match self.observed_in(f) {
            Some(obs) => !self.local_addrs.iter().any(|a| same_endpoint(a, &obs)),
            None => false,
        }
    }

    /// Whether the node is reachable in family `f` without a NAT: usable and not behind a NAT.
    pub fn global(&self, f: Family) -> bool {
        self.usable(f) && !self.behind_nat(f)
    }

    /// The node's mapping behaviour in family `f`. `NoNat` when it is not behind a NAT there;
    /// `nat` when `f` is the family `nat` describes; `Unknown` otherwise, and for a NATed node
    /// that claims `NoNat` (the DC's comparison wins over the node's claim, §5.3).
    pub fn mapping(&self, f: Family) -> NatBehaviour {
        if !self.behind_nat(f) {
            return NatBehaviour::NoNat;
        }
        let described = self.node_info_observed().map(|a| Family::of(&a));
        match self.nat {
            NatBehaviour::NoNat => NatBehaviour::Unknown,
            n if described == Some(f) => n,
            _ => NatBehaviour::Unknown,
        }
    }

    /// Whether the node's NAT in family `f` maps address-and-port-dependently ("symmetric").
    /// `Unknown` counts as not (§6.1).
    fn symmetric(&self, f: Family) -> bool {
        self.mapping(f) == NatBehaviour::AddressAndPortDependent
    }

    /// The node's own addresses in family `f`, in the order it reported them.
    fn locals_in(&self, f: Family) -> impl Iterator<Item = SocketAddr> + '_ {
        self.local_addrs
            .iter()
            .copied()
            .filter(move |a| Family::of(a) == f)
    }
}

/// Which address families the relay of a relayed route must serve (spec/05 §5.13).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayNeed {
    pub v4: bool,
    pub v6: bool,
}

impl RelayNeed {
    /// Only family `f`.
    pub fn family(f: Family) -> RelayNeed {
        RelayNeed {
            v4: f == Family::V4,
            v6: f == Family::V6,
        }
    }

    /// Both families: a dual-stack RS (FamilyMismatch).
    pub const DUAL_STACK: RelayNeed = RelayNeed { v4: true, v6: true };

    /// Whether a relay serving these families meets the need.
    pub fn met_by(&self, c: &RelayCandidate) -> bool {
        (!self.v4 || c.serves_v4) && (!self.v6 || c.serves_v6)
    }
}

/// The route decision for one requester/target pair: everything of both ROUTE_DIRECTIONs that
/// route selection decides (not the Path ID, keys, relay addresses or lifetime).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutePlan {
    /// Direct or Relay; never Offline (rule 0 is the DC's own, before route selection).
    pub route: RouteKind,
    pub reason: RouteReason,
    /// The family the route uses (f); `None` for FamilyMismatch, where the relay joins both.
    pub family: Option<Family>,
    /// The node that sends the first TUNNEL_REQUEST.
    pub initiator: Side,
    /// Whether the nodes probe for a direct path while the relay carries data (same for both).
    pub probe_direct: bool,
    /// `peer_addrs` of the requester's ROUTE_DIRECTION: the target's candidates (at most 8).
    pub requester_peer_addrs: Vec<SocketAddr>,
    /// `peer_addrs` of the target's ROUTE_DIRECTION: the requester's candidates (at most 8).
    pub target_peer_addrs: Vec<SocketAddr>,
    /// For a relayed route, the families the RS must serve; `None` for a direct route.
    pub relay_needs: Option<RelayNeed>,
}

impl RoutePlan {
    /// The `role` of `side`'s ROUTE_DIRECTION.
    pub fn role_of(&self, side: Side) -> TunnelRole {
        if side == self.initiator {
            TunnelRole::Initiator
        } else {
            TunnelRole::Responder
        }
    }

    /// The `peer_addrs` of `side`'s ROUTE_DIRECTION (the other node's candidates).
    pub fn peer_addrs_for(&self, side: Side) -> &[SocketAddr] {
        match side {
            Side::Requester => &self.requester_peer_addrs,
            Side::Target => &self.target_peer_addrs,
        }
    }

    /// ERROR NoRoute when the plan needs a dual-stack RS (FamilyMismatch) and no candidate is one
    /// (spec/05 §5.5.1 step 2). Any other shortage of relays is RelayUnavailable, found by
    /// [`pick_relay`] running out of candidates.
    pub fn check_relays(&self, candidates: &[RelayCandidate]) -> Result<(), RouteError> {
        match self.relay_needs {
            Some(need)
                if self.reason == RouteReason::FamilyMismatch
                    && !candidates.iter().any(|c| need.met_by(c)) =>
            {
                Err(RouteError::NoRoute)
            }
            _ => Ok(()),
        }
    }

    /// The plan's cell code in the outcome matrix of spec/06 §6.3: `Dt` (direct, the target
    /// initiates), `Dr` (direct, the requester initiates), `Rf` (FamilyMismatch), `Rs`
    /// (BothSymmetric), `R+` (relay with probing, `R+D` or `R+R` there depending on the
    /// probes), and for a rebuild `Rr` (DirectFailed, probing) or `Rx` (DirectFailed, no
    /// probing). Same-NAT routes are `Dn`.
    pub fn matrix_code(&self) -> &'static str {
        match (self.route, self.reason, self.initiator) {
            (RouteKind::Direct, RouteReason::SameNat, _) => "Dn",
            (RouteKind::Direct, _, Side::Target) => "Dt",
            (RouteKind::Direct, _, Side::Requester) => "Dr",
            (_, RouteReason::FamilyMismatch, _) => "Rf",
            (_, RouteReason::BothSymmetric, _) => "Rs",
            (_, RouteReason::DirectFailed, _) if self.probe_direct => "Rr",
            (_, RouteReason::DirectFailed, _) => "Rx",
            _ => "R+",
        }
    }
}

/// Why no route can be directed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteError {
    /// The nodes share no address family and the DC has no dual-stack RS.
    NoRoute,
}

impl RouteError {
    /// The ERROR code the requester is answered with.
    pub fn error_code(self) -> ErrorCode {
        match self {
            RouteError::NoRoute => ErrorCode::NoRoute,
        }
    }
}

impl fmt::Display for RouteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteError::NoRoute => {
                f.write_str("the nodes share no address family and no RS serves both")
            }
        }
    }
}

impl std::error::Error for RouteError {}

/// Decides the route between `requester` and `target` (spec/06 §6.2, rules 1 to 6 and r; rule
/// 0, Offline, is the caller's). `rebuild` is true when the requester's DIRECTION_REQUEST named a
/// live path between the two in `rebuild_path_id`.
pub fn select_route(requester: &NodeView, target: &NodeView, rebuild: bool) -> RoutePlan {
    let shared: Vec<Family> = Family::ALL
        .into_iter()
        .filter(|&f| requester.usable(f) && target.usable(f))
        .collect();
    // Relayed routes: the requester initiates a new tunnel; in a rebuild the target's direction
    // arrives last, so it binds last and initiates (§6.2 "Roles on a relayed route").
    let relay_initiator = if rebuild {
        Side::Target
    } else {
        Side::Requester
    };

    // (1) No shared family: only a dual-stack relay joins them, and there is nothing to probe.
    let f = match choose_family(requester, target, &shared) {
        Some(f) => f,
        None => {
            return RoutePlan {
                route: RouteKind::Relay,
                reason: RouteReason::FamilyMismatch,
                family: None,
                initiator: relay_initiator,
                probe_direct: false,
                requester_peer_addrs: Vec::new(),
                target_peer_addrs: Vec::new(),
                relay_needs: Some(RelayNeed::DUAL_STACK),
            }
        }
    };
    let both_symmetric = requester.symmetric(f) && target.symmetric(f);
    let relay = |reason: RouteReason, probe_direct: bool| {
        let (requester_peer_addrs, target_peer_addrs) = if probe_direct {
            (
                probe_candidates(target, f, &shared),
                probe_candidates(requester, f, &shared),
            )
        } else {
            (Vec::new(), Vec::new())
        };
        RoutePlan {
            route: RouteKind::Relay,
            reason,
            family: Some(f),
            initiator: relay_initiator,
            probe_direct,
            requester_peer_addrs,
            target_peer_addrs,
            relay_needs: Some(RelayNeed::family(f)),
        }
    };
    let direct = |reason: RouteReason, initiator: Side| {
        let candidates = match reason {
            RouteReason::SameNat => same_nat_candidates,
            _ => reachable_candidates,
        };
        RoutePlan {
            route: RouteKind::Direct,
            reason,
            family: Some(f),
            initiator,
            probe_direct: false,
            requester_peer_addrs: candidates(target, f),
            target_peer_addrs: candidates(requester, f),
            relay_needs: None,
        }
    };

    // (r) The direct attempt (or the path) failed: relay, and let the nodes find a direct path.
    if rebuild {
        return relay(RouteReason::DirectFailed, !both_symmetric);
    }
    match (requester.behind_nat(f), target.behind_nat(f)) {
        // (2) Either side could initiate; the target's direction arrives a trip sooner.
        (false, false) => direct(RouteReason::Reachable, Side::Target),
        // (3) The NATed node's own request opens its NAT for the response.
        (true, false) => direct(RouteReason::Reachable, Side::Requester),
        (false, true) => direct(RouteReason::Reachable, Side::Target),
        (true, true) => {
            // (4) Equal outermost addresses: one NAT (or a shared outer NAT) in front of both.
            // Private addresses are never compared (Fig. 9).
            let same_outer = match (requester.observed_in(f), target.observed_in(f)) {
                (Some(r), Some(t)) => r.ip() == t.ip(),
                _ => false,
            };
            if same_outer {
                direct(RouteReason::SameNat, Side::Target)
            } else if both_symmetric {
                // (5) Neither can predict the port the other's NAT opens towards it.
                relay(RouteReason::BothSymmetric, false)
            } else {
                // (6)
                relay(RouteReason::BothBehindNat, true)
            }
        }
    }
}

/// Rule 1's choice of f, or `None` when the nodes share no family.
fn choose_family(requester: &NodeView, target: &NodeView, shared: &[Family]) -> Option<Family> {
    if requester.global(Family::V6) && target.global(Family::V6) {
        Some(Family::V6)
    } else if shared.contains(&Family::V4) {
        Some(Family::V4)
    } else if shared.contains(&Family::V6) {
        Some(Family::V6)
    } else {
        None
    }
}

/// Direct, Reachable: the node's observed address in f, then its other own addresses in f.
fn reachable_candidates(node: &NodeView, f: Family) -> Vec<SocketAddr> {
    candidate_list(node.observed_in(f).into_iter().chain(node.locals_in(f)))
}

/// Direct, SameNat: the node's own addresses in f (the shared LAN), then its observed address
/// (hairpinning through the NAT).
fn same_nat_candidates(node: &NodeView, f: Family) -> Vec<SocketAddr> {
    candidate_list(node.locals_in(f).chain(node.observed_in(f)))
}

/// Relay with probing: for every shared family, f first, the node's observed address in it and
/// then its own addresses in it. Grouping by family keeps the list the same whether the DC knows
/// the node from its registry (an observed address per family) or from a NodeInfo (one): a node
/// without NAT in a family lists its own address there either way.
fn probe_candidates(node: &NodeView, f: Family, shared: &[Family]) -> Vec<SocketAddr> {
    let families = [f, f.other()].into_iter().filter(|g| shared.contains(g));
    candidate_list(families.flat_map(|g| node.observed_in(g).into_iter().chain(node.locals_in(g))))
}

/// The addresses in order, without ones a peer cannot use, without repeats, at most
/// [`MAX_PEER_ADDRS`]. Flow labels and scope identifiers are dropped (they mean nothing to the
/// peer), so two spellings of one transport address count once.
fn candidate_list(addrs: impl Iterator<Item = SocketAddr>) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for a in addrs {
        if out.len() >= MAX_PEER_ADDRS {
            break;
        }
        let a = SocketAddr::new(a.ip(), a.port());
        if listable(&a) && !out.contains(&a) {
            out.push(a);
        }
    }
    out
}

/// Whether a transport address may be given to a peer: never link-local, loopback or
/// unspecified (§6.2); nor multicast, broadcast or port 0, which no node can be reached at.
/// An IPv4-mapped IPv6 address is judged by the IPv4 address inside.
pub fn listable(addr: &SocketAddr) -> bool {
    addr.port() != 0
        && match addr.ip() {
            IpAddr::V4(ip) => listable_v4(&ip),
            IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
                Some(v4) => listable_v4(&v4),
                None => {
                    !(ip.is_unspecified()
                        || ip.is_loopback()
                        || ip.is_multicast()
                        || is_link_local_v6(&ip))
                }
            },
        }
}

fn listable_v4(ip: &Ipv4Addr) -> bool {
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast())
}

/// Equal IP address and port; IPv6 flow label and scope identifier do not matter.
fn same_endpoint(a: &SocketAddr, b: &SocketAddr) -> bool {
    a.ip() == b.ip() && a.port() == b.port()
}

/// fe80::/10.
fn is_link_local_v6(ip: &Ipv6Addr) -> bool {
    let [first, ..] = ip.segments();
    first & 0xffc0 == 0xfe80
}

/// 2000::/3, the global unicast range.
fn is_global_unicast_v6(ip: &Ipv6Addr) -> bool {
    let [first, ..] = ip.segments();
    first & 0xe000 == 0x2000
}

/// What the deciding DC knows about one of its RSs when choosing a relay (spec/05 §5.13).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayCandidate {
    pub serves_v4: bool,
    pub serves_v6: bool,
    /// The load last reported in a RELAY_RESPONSE; 0 for an RS not yet heard from.
    pub load_permille: u16,
}

/// The relay to ask next (spec/05 §5.13): among `candidates` (in configuration order) that serve
/// `need` and whose index is not in `skip` (those already tried), the lowest `load_permille`,
/// ties to the first. `None` when no candidate remains: ERROR RelayUnavailable (or NoRoute, see
/// [`RoutePlan::check_relays`]).
pub fn pick_relay(candidates: &[RelayCandidate], need: RelayNeed, skip: &[usize]) -> Option<usize> {
    candidates
        .iter()
        .enumerate()
        .filter(|(i, c)| need.met_by(c) && !skip.contains(i))
        // The index in the key states the tie rule outright: first in configuration order.
        .min_by_key(|(i, c)| (c.load_permille, *i))
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ntm_wire::{AddrList, Fqdn, TransportAddr};
    use std::net::SocketAddrV6;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// The node types of the outcome matrix (spec/06 §6.3), as the DC sees them. Named exactly
    /// as the spec's codes, so that the matrix text can be parsed as it stands.
    #[allow(clippy::upper_case_acronyms)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Kind {
        D,
        G4,
        G6,
        E,
        AD,
        APD,
        V6,
        E4,
    }

    const KINDS: [Kind; 8] = [
        Kind::D,
        Kind::G4,
        Kind::G6,
        Kind::E,
        Kind::AD,
        Kind::APD,
        Kind::V6,
        Kind::E4,
    ];

    /// A node of type `kind`; `n` tells two nodes of one type apart (different hosts, and for
    /// NATed types different NATs). Every node also holds a link-local IPv6 address, as hosts
    /// do, which must neither make IPv6 usable nor be listed.
    fn node(kind: Kind, n: u8) -> NodeView {
        let k = KINDS.iter().position(|&x| x == kind).unwrap() as u8;
        let pub4 = a(&format!("192.0.2.{}:4285", 10 * k + n));
        let pub6 = a(&format!("[2001:db8:{k}::{n}]:4285"));
        let lan4 = a(&format!("192.168.{k}.{n}:4285"));
        let link = a(&format!("[fe80::{k}:{n}]:4285"));
        // NATed types: each node behind its own NAT, with its own outside address.
        let nat4 = a(&format!(
            "203.0.113.{}:{}",
            10 * k + n,
            40000 + u16::from(n)
        ));
        let (local_addrs, observed, nat) = match kind {
            Kind::D => (
                vec![pub4, pub6, link],
                [Some(pub4), Some(pub6)],
                NatBehaviour::NoNat,
            ),
            Kind::G4 => (vec![pub4, link], [Some(pub4), None], NatBehaviour::NoNat),
            // V6's firewall is invisible to the DC: it looks like G6.
            Kind::G6 | Kind::V6 => (vec![pub6, link], [None, Some(pub6)], NatBehaviour::NoNat),
            Kind::E | Kind::E4 => (
                vec![lan4, link],
                [Some(nat4), None],
                NatBehaviour::EndpointIndependent,
            ),
            Kind::AD => (
                vec![lan4, link],
                [Some(nat4), None],
                NatBehaviour::AddressDependent,
            ),
            Kind::APD => (
                vec![lan4, link],
                [Some(nat4), None],
                NatBehaviour::AddressAndPortDependent,
            ),
        };
        NodeView {
            local_addrs,
            observed,
            nat,
        }
    }

    /// The NodeInfo a DC would send for `view`.
    fn node_info(view: &NodeView) -> NodeInfo {
        NodeInfo {
            fqdn: Fqdn::new("mn.dc1.example").unwrap(),
            virtual_v4: Ipv4Addr::new(100, 64, 0, 1),
            virtual_v6: "fd00::1".parse().unwrap(),
            observed_addr: view.node_info_observed().map(TransportAddr::new),
            local_addrs: AddrList::new(
                view.local_addrs
                    .iter()
                    .copied()
                    .map(TransportAddr::new)
                    .collect(),
            )
            .unwrap(),
            nat: view.nat,
            public_key: [7; 32],
            notification: false,
        }
    }

    /// The outcome matrix of spec/06 §6.3, verbatim.
    const MATRIX: &str = "\
 requester \\ target    D      G4     G6     E      AD     APD    V6     E4
 D                     Dt     Dt     Dt     Dt     Dt     Dt     Dt     Dt
 G4                    Dt     Dt     Rf     Dt     Dt     Dt     Rf     Dt
 G6                    Dt     Rf     Dt     Rf     Rf     Rf     Dt     Rf
 E                     Dr     Dr     Rf     R+D    R+D    R+D    Rf     R+D
 AD                    Dr     Dr     Rf     R+D    R+R    R+R    Rf     R+R
 APD                   Dr     Dr     Rf     R+D    R+R    Rs     Rf     R+R
 V6                    Dt!    Rf     Dt!    Rf     Rf     Rf     Dt!    Rf
 E4                    Dr     Dr     Rf     R+D    R+R    R+R    Rf     R+D
";

    fn matrix_cells() -> Vec<(Kind, Kind, &'static str)> {
        let mut lines = MATRIX.lines();
        let header: Vec<&str> = lines.next().unwrap().split_whitespace().skip(3).collect();
        let name = |s: &str| *KINDS.iter().find(|k| format!("{k:?}") == s).unwrap();
        let mut cells = Vec::new();
        for line in lines {
            let mut words = line.split_whitespace();
            let row = name(words.next().unwrap());
            for (col, cell) in header.iter().zip(words) {
                cells.push((row, name(col), cell));
            }
        }
        assert_eq!(cells.len(), 64);
        cells
    }

    #[test]
    fn the_matrix_copied_here_is_the_one_in_the_spec() {
        let spec = include_str!("../../spec/06-route-selection.md");
        assert!(spec.contains(MATRIX), "spec/06 §6.3 matrix changed");
    }

    /// Checks one cell's decision part (initial route, reason, first TUNNEL_REQUEST, probing).
    fn assert_cell(plan: &RoutePlan, cell: &str, ctx: &str) {
        use RouteKind::{Direct, Relay};
        use RouteReason::*;
        let expect = match cell {
            "Dt" | "Dt!" => (Direct, Reachable, Side::Target, false),
            "Dr" => (Direct, Reachable, Side::Requester, false),
            "Rf" => (Relay, FamilyMismatch, Side::Requester, false),
            "Rs" => (Relay, BothSymmetric, Side::Requester, false),
            "R+D" | "R+R" => (Relay, BothBehindNat, Side::Requester, true),
            other => panic!("unknown cell {other}"),
        };
        let got = (plan.route, plan.reason, plan.initiator, plan.probe_direct);
        assert_eq!(got, expect, "{ctx}: cell {cell}");
        match plan.route {
            Direct => assert_eq!(plan.relay_needs, None, "{ctx}"),
            _ => assert!(plan.relay_needs.is_some(), "{ctx}"),
        }
        if plan.reason == FamilyMismatch {
            assert_eq!(plan.family, None, "{ctx}");
            assert_eq!(plan.relay_needs, Some(RelayNeed::DUAL_STACK), "{ctx}");
        } else {
            assert!(plan.family.is_some(), "{ctx}");
        }
        if plan.route == Relay && !plan.probe_direct {
            assert!(plan.requester_peer_addrs.is_empty(), "{ctx}");
            assert!(plan.target_peer_addrs.is_empty(), "{ctx}");
        } else {
            assert!(!plan.requester_peer_addrs.is_empty(), "{ctx}");
            assert!(!plan.target_peer_addrs.is_empty(), "{ctx}");
        }
    }

    #[test]
    fn every_cell_of_the_outcome_matrix_is_decided_as_the_spec_says() {
        for (row, col, cell) in matrix_cells() {
            let (r, t) = (node(row, 1), node(col, 2));
            let plan = select_route(&r, &t, false);
            assert_cell(&plan, cell, &format!("{row:?} asks {col:?}"));
            let code = match cell {
                "Dt!" => "Dt",
                "R+D" | "R+R" => "R+",
                c => c,
            };
            assert_eq!(plan.matrix_code(), code, "{row:?} asks {col:?}");
        }
    }

    #[test]
    fn the_matrix_is_the_same_whichever_side_arrives_as_node_info() {
        // The target's DC sees the requester through NodeInfo (one observed address); the
        // requester's DC, deciding a rebuild, sees the target so. Neither may change the plan.
        for (row, col, _) in matrix_cells() {
            let (r, t) = (node(row, 1), node(col, 2));
            let (ri, ti) = (
                NodeView::from_node_info(&node_info(&r)),
                NodeView::from_node_info(&node_info(&t)),
            );
            for rebuild in [false, true] {
                let plan = select_route(&r, &t, rebuild);
                assert_eq!(select_route(&ri, &t, rebuild), plan, "{row:?}/{col:?}");
                assert_eq!(select_route(&r, &ti, rebuild), plan, "{row:?}/{col:?}");
                assert_eq!(select_route(&ri, &ti, rebuild), plan, "{row:?}/{col:?}");
            }
        }
    }

    #[test]
    fn dual_stack_uses_ipv4_with_ipv4_only_nodes_and_ipv6_with_ipv6_capable_ones() {
        for col in KINDS {
            let plan = select_route(&node(Kind::D, 1), &node(col, 2), false);
            let want = match col {
                Kind::D | Kind::G6 | Kind::V6 => Family::V6,
                _ => Family::V4,
            };
            assert_eq!(plan.family, Some(want), "D asks {col:?}");
        }
    }

    #[test]
    fn only_a_natted_requester_facing_a_node_without_nat_initiates_a_direct_route() {
        for (row, col, _) in matrix_cells() {
            let plan = select_route(&node(row, 1), &node(col, 2), false);
            let natted = |k| matches!(k, Kind::E | Kind::AD | Kind::APD | Kind::E4);
            let requester_initiates =
                plan.route == RouteKind::Direct && plan.initiator == Side::Requester;
            assert_eq!(
                requester_initiates,
                natted(row) && matches!(col, Kind::D | Kind::G4),
                "{row:?} asks {col:?}"
            );
        }
    }

    #[test]
    fn a_firewalled_v6_requester_gets_a_direct_route_then_the_targets_rebuild_makes_it_initiate() {
        // Dt!: V6 asks D, G6 or V6. The target's TUNNEL_REQUEST dies at V6's firewall; the
        // target, now the rebuild's requester, asks again and V6 (the rebuild's target) initiates
        // the relayed tunnel, on which both probe.
        for col in [Kind::D, Kind::G6, Kind::V6] {
            let v6 = node(Kind::V6, 1);
            let peer = node(col, 2);
            let first = select_route(&v6, &peer, false);
            assert_eq!(first.route, RouteKind::Direct);
            assert_eq!(first.initiator, Side::Target);
            let rebuilt = select_route(&peer, &v6, true);
            assert_eq!(rebuilt.route, RouteKind::Relay);
            assert_eq!(rebuilt.reason, RouteReason::DirectFailed);
            assert_eq!(
                rebuilt.initiator,
                Side::Target,
                "V6 initiates the relayed tunnel"
            );
            assert_eq!(rebuilt.role_of(Side::Target), TunnelRole::Initiator);
            assert_eq!(rebuilt.role_of(Side::Requester), TunnelRole::Responder);
            assert!(rebuilt.probe_direct);
            assert_eq!(rebuilt.family, Some(Family::V6));
            assert_eq!(rebuilt.relay_needs, Some(RelayNeed::family(Family::V6)));
            // V6 probes towards the peer's IPv6 address, which its own probes open the way to.
            assert!(rebuilt
                .peer_addrs_for(Side::Target)
                .iter()
                .all(|p| p.is_ipv6()));
        }
    }

    #[test]
    fn a_rebuild_relays_with_direct_failed_and_probes_unless_both_nats_are_symmetric() {
        for (row, col, cell) in matrix_cells() {
            let plan = select_route(&node(row, 1), &node(col, 2), true);
            let ctx = format!("rebuild {row:?} -> {col:?}");
            assert_eq!(plan.route, RouteKind::Relay, "{ctx}");
            assert_eq!(plan.initiator, Side::Target, "{ctx}");
            if cell == "Rf" {
                // Rule 1 comes before rule r: still no shared family, still nothing to probe.
                assert_eq!(plan.reason, RouteReason::FamilyMismatch, "{ctx}");
                assert!(!plan.probe_direct, "{ctx}");
                assert_eq!(plan.matrix_code(), "Rf");
            } else {
                assert_eq!(plan.reason, RouteReason::DirectFailed, "{ctx}");
                let both_symmetric = row == Kind::APD && col == Kind::APD;
                assert_eq!(plan.probe_direct, !both_symmetric, "{ctx}");
                assert_eq!(
                    plan.requester_peer_addrs.is_empty(),
                    both_symmetric,
                    "{ctx}"
                );
                assert_eq!(plan.target_peer_addrs.is_empty(), both_symmetric, "{ctx}");
            }
        }
    }

    #[test]
    fn a_rebuild_of_a_same_nat_route_relays_and_probes() {
        let r = same_nat_node(2, 40001, NatBehaviour::EndpointIndependent);
        let t = same_nat_node(3, 40002, NatBehaviour::EndpointIndependent);
        assert_eq!(select_route(&r, &t, false).reason, RouteReason::SameNat);
        let plan = select_route(&r, &t, true);
        assert_eq!(
            (plan.route, plan.reason, plan.initiator, plan.probe_direct),
            (
                RouteKind::Relay,
                RouteReason::DirectFailed,
                Side::Target,
                true
            )
        );
        assert_eq!(
            plan.requester_peer_addrs,
            vec![a("203.0.113.99:40002"), a("192.168.5.3:4285")]
        );
    }

    #[test]
    fn symmetric_ipv4_nats_do_not_stop_probing_on_a_rebuilt_ipv6_route() {
        // Both have a symmetric IPv4 NAT and global IPv6: f is IPv6, where neither maps at all.
        let home = |n: u8| NodeView {
            local_addrs: vec![
                a(&format!("192.168.0.{n}:4285")),
                a(&format!("[2001:db8:1::{n}]:4285")),
            ],
            observed: [Some(a(&format!("198.51.100.{n}:4000{n}"))), None],
            nat: NatBehaviour::AddressAndPortDependent,
        };
        let plan = select_route(&home(1), &home(2), true);
        assert_eq!(plan.family, Some(Family::V6));
        assert!(plan.probe_direct);
        // Over IPv4 alone the same pair is BothSymmetric.
        let v4_only = |n: u8| {
            let mut v = home(n);
            v.local_addrs.truncate(1);
            v
        };
        let plan = select_route(&v4_only(1), &v4_only(2), true);
        assert_eq!(plan.family, Some(Family::V4));
        assert!(!plan.probe_direct);
        assert_eq!(
            select_route(&v4_only(1), &v4_only(2), false).reason,
            RouteReason::BothSymmetric
        );
    }

    fn same_nat_node(host: u8, port: u16, nat: NatBehaviour) -> NodeView {
        NodeView {
            local_addrs: vec![a(&format!("192.168.5.{host}:4285"))],
            observed: [Some(a(&format!("203.0.113.99:{port}"))), None],
            nat,
        }
    }

    #[test]
    fn nodes_behind_the_same_nat_of_any_type_go_direct_over_the_lan_then_the_hairpin() {
        for nat in [
            NatBehaviour::Unknown,
            NatBehaviour::EndpointIndependent,
            NatBehaviour::AddressDependent,
            NatBehaviour::AddressAndPortDependent,
        ] {
            let r = same_nat_node(2, 40001, nat);
            let t = same_nat_node(3, 40002, nat);
            let plan = select_route(&r, &t, false);
            assert_eq!(
                (plan.route, plan.reason, plan.initiator, plan.probe_direct),
                (RouteKind::Direct, RouteReason::SameNat, Side::Target, false),
                "{nat:?}"
            );
            assert_eq!(plan.matrix_code(), "Dn");
            assert_eq!(plan.family, Some(Family::V4));
            // Local addresses first (the shared LAN), then the observed one (hairpinning).
            assert_eq!(
                plan.requester_peer_addrs,
                vec![a("192.168.5.3:4285"), a("203.0.113.99:40002")]
            );
            assert_eq!(
                plan.target_peer_addrs,
                vec![a("192.168.5.2:4285"), a("203.0.113.99:40001")]
            );
        }
    }

    #[test]
    fn nodes_behind_different_inner_nats_sharing_a_carrier_grade_nat_are_same_nat() {
        // spec/05 §5.11: inner addresses equal or not, the outermost (CGN) address is shared.
        let mn = NodeView {
            local_addrs: vec![a("192.168.0.2:4285")],
            observed: [Some(a("192.0.2.1:40001")), None],
            nat: NatBehaviour::EndpointIndependent,
        };
        let cn = NodeView {
            local_addrs: vec![a("192.168.0.2:4285")],
            observed: [Some(a("192.0.2.1:50002")), None],
            nat: NatBehaviour::AddressAndPortDependent,
        };
        let plan = select_route(&mn, &cn, false);
        assert_eq!(plan.route, RouteKind::Direct);
        assert_eq!(plan.reason, RouteReason::SameNat);
        assert_eq!(plan.initiator, Side::Target);
        assert!(!plan.probe_direct);
        assert_eq!(
            plan.requester_peer_addrs,
            vec![a("192.168.0.2:4285"), a("192.0.2.1:50002")]
        );
    }

    #[test]
    fn equal_private_addresses_behind_different_nats_are_not_the_same_nat() {
        // Fig. 9.
        let mn = NodeView {
            local_addrs: vec![a("192.168.0.2:4285")],
            observed: [Some(a("198.51.100.1:40001")), None],
            nat: NatBehaviour::EndpointIndependent,
        };
        let cn = NodeView {
            local_addrs: vec![a("192.168.0.2:4285")],
            observed: [Some(a("192.0.2.1:50002")), None],
            nat: NatBehaviour::EndpointIndependent,
        };
        let plan = select_route(&mn, &cn, false);
        assert_eq!(plan.route, RouteKind::Relay);
        assert_eq!(plan.reason, RouteReason::BothBehindNat);
        assert_eq!(plan.initiator, Side::Requester);
        assert!(plan.probe_direct);
        // Probes go to the observed address first.
        assert_eq!(
            plan.requester_peer_addrs.first(),
            Some(&a("192.0.2.1:50002"))
        );
        assert_eq!(
            plan.target_peer_addrs.first(),
            Some(&a("198.51.100.1:40001"))
        );
        // Symmetric on both sides, the same private addresses still do not make them one NAT.
        let sym = |v: &NodeView| NodeView {
            nat: NatBehaviour::AddressAndPortDependent,
            ..v.clone()
        };
        assert_eq!(
            select_route(&sym(&mn), &sym(&cn), false).reason,
            RouteReason::BothSymmetric
        );
    }

    #[test]
    fn a_node_behind_unshared_cascaded_nats_is_decided_as_behind_one_nat() {
        // Fig. 10: the DC sees only the outer NAT's address; the node reports the cascade's
        // overall mapping, endpoint-independent only if every stage's is.
        let cascaded = |nat| NodeView {
            local_addrs: vec![a("192.168.0.2:4285")],
            observed: [Some(a("192.0.2.1:50002")), None],
            nat,
        };
        let d = node(Kind::D, 1);
        let plan = select_route(&d, &cascaded(NatBehaviour::AddressDependent), false);
        assert_eq!(plan.matrix_code(), "Dt");
        let plan = select_route(&cascaded(NatBehaviour::EndpointIndependent), &d, false);
        assert_eq!(plan.matrix_code(), "Dr");
        let apd = node(Kind::APD, 1);
        let plan = select_route(
            &apd,
            &cascaded(NatBehaviour::AddressAndPortDependent),
            false,
        );
        assert_eq!(plan.matrix_code(), "Rs");
        let plan = select_route(&apd, &cascaded(NatBehaviour::EndpointIndependent), false);
        assert_eq!(plan.matrix_code(), "R+");
    }

    #[test]
    fn unknown_mapping_counts_as_not_address_and_port_dependent() {
        let apd = node(Kind::APD, 1);
        let mut unknown = node(Kind::APD, 2);
        unknown.nat = NatBehaviour::Unknown;
        let plan = select_route(&apd, &unknown, false);
        assert_eq!(plan.reason, RouteReason::BothBehindNat);
        assert!(plan.probe_direct);
        assert!(select_route(&apd, &unknown, true).probe_direct);
        // A NATed node that claims NoNat is not believed; its mapping is unknown, not symmetric.
        let mut claims = node(Kind::APD, 2);
        claims.nat = NatBehaviour::NoNat;
        assert!(claims.behind_nat(Family::V4));
        assert_eq!(claims.mapping(Family::V4), NatBehaviour::Unknown);
        assert_eq!(
            select_route(&apd, &claims, false).reason,
            RouteReason::BothBehindNat
        );
    }

    #[test]
    fn usable_behind_nat_and_global_follow_the_table_of_6_1() {
        let d = node(Kind::D, 1);
        assert!(d.usable(Family::V4) && d.usable(Family::V6));
        assert!(d.global(Family::V4) && d.global(Family::V6));
        // A link-local IPv6 address does not make IPv6 usable; neither does a ULA.
        let e = node(Kind::E, 1);
        assert!(!e.usable(Family::V6) && !e.global(Family::V6));
        assert!(e.usable(Family::V4) && e.behind_nat(Family::V4) && !e.global(Family::V4));
        let ula = NodeView {
            local_addrs: vec![a("[fd00::1]:4285")],
            observed: [None, None],
            nat: NatBehaviour::Unknown,
        };
        assert!(!ula.usable(Family::V6));
        // A global IPv6 address alone makes IPv6 usable and global (no observation, no NAT).
        let via_v4 = NodeView {
            local_addrs: vec![a("192.168.0.2:4285"), a("[2001:db8::2]:4285")],
            observed: [Some(a("198.51.100.2:40000")), None],
            nat: NatBehaviour::EndpointIndependent,
        };
        assert!(via_v4.global(Family::V6));
        // NAT66: the observed IPv6 address is not the node's own.
        let nat66 = NodeView {
            local_addrs: vec![a("[fd00::2]:4285")],
            observed: [None, Some(a("[2001:db8::99]:4285"))],
            nat: NatBehaviour::EndpointIndependent,
        };
        assert!(nat66.usable(Family::V6) && nat66.behind_nat(Family::V6));
        assert!(!nat66.global(Family::V6));
        assert_eq!(nat66.mapping(Family::V6), NatBehaviour::EndpointIndependent);
        // The port counts: same IP, other port, is a NAT (spec/05 §5.3).
        let port_nat = NodeView {
            local_addrs: vec![a("192.0.2.5:4285")],
            observed: [Some(a("192.0.2.5:1024")), None],
            nat: NatBehaviour::Unknown,
        };
        assert!(port_nat.behind_nat(Family::V4));
        // An address in the wrong slot is no observation at all.
        let misfiled = NodeView {
            local_addrs: vec![],
            observed: [Some(a("[2001:db8::1]:4285")), None],
            nat: NatBehaviour::Unknown,
        };
        assert!(!misfiled.usable(Family::V4) && !misfiled.behind_nat(Family::V4));
        assert_eq!(misfiled.node_info_observed(), None);
        // The mapping reported describes the NodeInfo family; the other family's is unknown.
        let dual = NodeView {
            local_addrs: vec![a("192.168.0.2:4285"), a("[fd00::2]:4285")],
            observed: [
                Some(a("198.51.100.2:40000")),
                Some(a("[2001:db8::99]:4000")),
            ],
            nat: NatBehaviour::AddressAndPortDependent,
        };
        assert_eq!(
            dual.mapping(Family::V4),
            NatBehaviour::AddressAndPortDependent
        );
        assert_eq!(dual.mapping(Family::V6), NatBehaviour::Unknown);
        assert_eq!(d.mapping(Family::V4), NatBehaviour::NoNat);
    }

    #[test]
    fn node_info_carries_the_ipv4_observed_address_when_there_is_one() {
        let d = node(Kind::D, 1);
        assert_eq!(d.node_info_observed(), d.observed[0]);
        let g6 = node(Kind::G6, 1);
        assert_eq!(g6.node_info_observed(), g6.observed[1]);
        let back = NodeView::from_node_info(&node_info(&g6));
        assert_eq!(back.observed, [None, g6.observed[1]]);
        assert_eq!(back.local_addrs, g6.local_addrs);
        let back = NodeView::from_node_info(&node_info(&d));
        assert_eq!(back.observed, [d.observed[0], None]);
        assert_eq!(back.nat, NatBehaviour::NoNat);
        let mut unregistered = node(Kind::E, 1);
        unregistered.observed = [None, None];
        let back = NodeView::from_node_info(&node_info(&unregistered));
        assert_eq!(back.observed, [None, None]);
    }

    #[test]
    fn reachable_lists_the_observed_address_then_the_other_own_addresses_of_the_family() {
        let multi = NodeView {
            local_addrs: vec![
                a("192.0.2.10:4285"),
                a("127.0.0.1:4285"),
                a("198.51.100.10:4285"),
                a("169.254.7.7:4285"),
                a("0.0.0.0:4285"),
                a("[2001:db8::10]:4285"),
                a("[fe80::10]:4285"),
            ],
            observed: [Some(a("198.51.100.10:4285")), None],
            nat: NatBehaviour::NoNat,
        };
        let g4 = node(Kind::G4, 1);
        let plan = select_route(&g4, &multi, false);
        assert_eq!(
            (plan.route, plan.reason),
            (RouteKind::Direct, RouteReason::Reachable)
        );
        assert_eq!(plan.family, Some(Family::V4));
        assert_eq!(
            plan.requester_peer_addrs,
            vec![a("198.51.100.10:4285"), a("192.0.2.10:4285")]
        );
        assert_eq!(plan.target_peer_addrs, vec![a("192.0.2.11:4285")]);
        // In IPv6 only global ones; loopback and link-local never.
        let d = NodeView {
            local_addrs: vec![
                a("[::1]:4285"),
                a("[fe80::1]:4285"),
                a("[2001:db8:1::1]:4285"),
                a("[2001:db8:2::1]:4285"),
                a("192.0.2.1:4285"),
            ],
            observed: [Some(a("192.0.2.1:4285")), Some(a("[2001:db8:2::1]:4285"))],
            nat: NatBehaviour::NoNat,
        };
        let plan = select_route(&node(Kind::G6, 1), &d, false);
        assert_eq!(plan.family, Some(Family::V6));
        assert_eq!(
            plan.requester_peer_addrs,
            vec![a("[2001:db8:2::1]:4285"), a("[2001:db8:1::1]:4285")]
        );
        // A NATed node's candidates: its observed address first.
        let plan = select_route(&node(Kind::E, 1), &node(Kind::D, 2), false);
        assert_eq!(
            plan.target_peer_addrs,
            vec![a("203.0.113.31:40001"), a("192.168.3.1:4285")]
        );
        assert_eq!(plan.requester_peer_addrs, vec![a("192.0.2.2:4285")]);
    }

    #[test]
    fn probing_lists_observed_then_own_addresses_of_each_shared_family_route_family_first() {
        // R: IPv4 behind a NAT, IPv6 global (home dual stack). T: IPv4 behind a NAT, IPv6
        // behind NAT66. Not both global in IPv6, so f = IPv4, F = both.
        let r = NodeView {
            local_addrs: vec![
                a("192.168.0.2:4285"),
                a("[fe80::2]:4285"),
                a("[2001:db8:a::2]:4285"),
            ],
            observed: [Some(a("198.51.100.2:40002")), None],
            nat: NatBehaviour::EndpointIndependent,
        };
        let t = NodeView {
            local_addrs: vec![a("[fd00::3]:4285"), a("10.0.0.3:4285")],
            observed: [
                Some(a("203.0.113.3:40003")),
                Some(a("[2001:db8:b::3]:50003")),
            ],
            nat: NatBehaviour::AddressDependent,
        };
        let plan = select_route(&r, &t, false);
        assert_eq!(
            (plan.route, plan.reason, plan.probe_direct),
            (RouteKind::Relay, RouteReason::BothBehindNat, true)
        );
        assert_eq!(plan.family, Some(Family::V4));
        assert_eq!(plan.relay_needs, Some(RelayNeed::family(Family::V4)));
        assert_eq!(
            plan.requester_peer_addrs,
            vec![
                a("203.0.113.3:40003"),
                a("10.0.0.3:4285"),
                a("[2001:db8:b::3]:50003"),
                a("[fd00::3]:4285"),
            ]
        );
        assert_eq!(
            plan.target_peer_addrs,
            vec![
                a("198.51.100.2:40002"),
                a("192.168.0.2:4285"),
                a("[2001:db8:a::2]:4285"),
            ]
        );
        // With only IPv4 shared, IPv6 addresses are not listed.
        let mut t4 = t.clone();
        t4.observed[1] = None;
        let plan = select_route(&r, &t4, false);
        assert_eq!(
            plan.target_peer_addrs,
            vec![a("198.51.100.2:40002"), a("192.168.0.2:4285")]
        );
        // Without probing, nothing is listed.
        let mut rs = r.clone();
        rs.local_addrs.truncate(1);
        rs.nat = NatBehaviour::AddressAndPortDependent;
        let mut ts = t4.clone();
        ts.local_addrs.truncate(1);
        ts.nat = NatBehaviour::AddressAndPortDependent;
        let plan = select_route(&rs, &ts, false);
        assert_eq!(plan.reason, RouteReason::BothSymmetric);
        assert!(plan.requester_peer_addrs.is_empty() && plan.target_peer_addrs.is_empty());
    }

    #[test]
    fn peer_addrs_hold_at_most_eight_distinct_listable_addresses() {
        let mut locals: Vec<SocketAddr> = (1..=12)
            .map(|i| a(&format!("192.168.0.{i}:4285")))
            .collect();
        // Duplicates, and one spelling with a scope identifier, count once.
        locals.insert(0, a("192.168.0.1:4285"));
        locals.insert(0, a("[::ffff:127.0.0.1]:4285"));
        locals.insert(0, a("192.168.0.9:0"));
        locals.insert(0, a("224.0.0.1:4285"));
        locals.insert(0, a("255.255.255.255:4285"));
        let wide = NodeView {
            local_addrs: locals,
            observed: [Some(a("203.0.113.8:40008")), None],
            nat: NatBehaviour::EndpointIndependent,
        };
        let plan = select_route(&node(Kind::E, 1), &wide, false);
        let list = &plan.requester_peer_addrs;
        assert_eq!(list.len(), MAX_PEER_ADDRS);
        assert_eq!(list.first(), Some(&a("203.0.113.8:40008")));
        assert_eq!(list.get(1), Some(&a("192.168.0.1:4285")));
        assert_eq!(list.last(), Some(&a("192.168.0.7:4285")));
        for (i, x) in list.iter().enumerate() {
            assert!(listable(x), "{x}");
            assert!(!list.iter().skip(i + 1).any(|y| y == x), "{x} twice");
        }

        let scoped = SocketAddr::V6(SocketAddrV6::new(
            "2001:db8::5".parse().unwrap(),
            4285,
            0,
            3,
        ));
        let plain = a("[2001:db8::5]:4285");
        let g6 = NodeView {
            local_addrs: vec![scoped, plain],
            observed: [None, Some(plain)],
            nat: NatBehaviour::NoNat,
        };
        assert!(!g6.behind_nat(Family::V6));
        let plan = select_route(&node(Kind::G6, 1), &g6, false);
        assert_eq!(plan.requester_peer_addrs, vec![plain]);
    }

    #[test]
    fn link_local_loopback_and_unspecified_addresses_are_never_listed() {
        for bad in [
            "127.0.0.1:4285",
            "127.9.9.9:4285",
            "169.254.1.1:4285",
            "0.0.0.0:4285",
            "[::1]:4285",
            "[fe80::1]:4285",
            "[febf::1]:4285",
            "[::]:4285",
            "[::ffff:169.254.0.1]:4285",
        ] {
            assert!(!listable(&a(bad)), "{bad}");
        }
        for good in [
            "192.0.2.1:4285",
            "192.168.0.2:4285",
            "[2001:db8::1]:4285",
            "[fd00::1]:4285",
            "[fec0::1]:4285",
        ] {
            assert!(listable(&a(good)), "{good}");
        }
        // Even a node that reports only such addresses and is observed at one: nothing listed.
        let odd = NodeView {
            local_addrs: vec![a("127.0.0.1:4285"), a("169.254.3.3:4285")],
            observed: [Some(a("127.0.0.1:4285")), None],
            nat: NatBehaviour::NoNat,
        };
        let plan = select_route(&node(Kind::G4, 1), &odd, false);
        assert!(plan.requester_peer_addrs.is_empty());
    }

    #[test]
    fn the_same_inputs_always_give_the_same_plan() {
        for (row, col, _) in matrix_cells() {
            for rebuild in [false, true] {
                let (r, t) = (node(row, 1), node(col, 2));
                let first = select_route(&r, &t, rebuild);
                let again = select_route(&r.clone(), &t.clone(), rebuild);
                assert_eq!(first, again);
            }
        }
    }

    fn rs(serves_v4: bool, serves_v6: bool, load_permille: u16) -> RelayCandidate {
        RelayCandidate {
            serves_v4,
            serves_v6,
            load_permille,
        }
    }

    #[test]
    fn the_least_loaded_relay_serving_the_family_is_picked_ties_to_the_first() {
        let v4 = RelayNeed::family(Family::V4);
        let rss = [
            rs(true, true, 500),
            rs(true, false, 200),
            rs(true, true, 300),
        ];
        assert_eq!(pick_relay(&rss, v4, &[]), Some(1));
        let tied = [
            rs(true, true, 200),
            rs(true, true, 100),
            rs(true, false, 100),
        ];
        assert_eq!(pick_relay(&tied, v4, &[]), Some(1));
        // Not yet heard from (0) wins over any report; the first of several such.
        let fresh = [rs(true, true, 10), rs(true, true, 0), rs(true, true, 0)];
        assert_eq!(pick_relay(&fresh, v4, &[]), Some(1));
        assert_eq!(pick_relay(&[], v4, &[]), None);
    }

    #[test]
    fn relays_already_tried_are_skipped_until_none_remains() {
        let v4 = RelayNeed::family(Family::V4);
        let rss = [
            rs(true, true, 500),
            rs(true, false, 200),
            rs(true, true, 300),
        ];
        assert_eq!(pick_relay(&rss, v4, &[1]), Some(2));
        assert_eq!(pick_relay(&rss, v4, &[1, 2]), Some(0));
        assert_eq!(pick_relay(&rss, v4, &[1, 2, 0]), None);
        // Indices beyond the list are ignored.
        assert_eq!(pick_relay(&rss, v4, &[7]), Some(1));
    }

    #[test]
    fn a_relay_must_serve_the_route_family_and_both_for_family_mismatch() {
        let rss = [
            rs(true, false, 0),
            rs(false, true, 100),
            rs(true, true, 900),
        ];
        assert_eq!(
            pick_relay(&rss, RelayNeed::family(Family::V4), &[]),
            Some(0)
        );
        assert_eq!(
            pick_relay(&rss, RelayNeed::family(Family::V6), &[]),
            Some(1)
        );
        let mismatch = select_route(&node(Kind::G4, 1), &node(Kind::G6, 2), false);
        assert_eq!(mismatch.reason, RouteReason::FamilyMismatch);
        let need = mismatch.relay_needs.unwrap();
        assert_eq!(need, RelayNeed::DUAL_STACK);
        assert_eq!(pick_relay(&rss, need, &[]), Some(2));
        assert_eq!(pick_relay(&rss, need, &[2]), None);
        assert_eq!(mismatch.check_relays(&rss), Ok(()));

        // No dual-stack RS: ERROR NoRoute, decided before any RELAY_REQUEST.
        let single = [rs(true, false, 0), rs(false, true, 0)];
        assert_eq!(mismatch.check_relays(&single), Err(RouteError::NoRoute));
        assert_eq!(RouteError::NoRoute.error_code(), ErrorCode::NoRoute);
        // A relayed route in one family with no RS for it is not NoRoute (RelayUnavailable).
        let both_nat = select_route(&node(Kind::E, 1), &node(Kind::E, 2), false);
        let v6_only = [rs(false, true, 0)];
        assert_eq!(both_nat.check_relays(&v6_only), Ok(()));
        assert_eq!(
            pick_relay(&v6_only, both_nat.relay_needs.unwrap(), &[]),
            None
        );
        // A direct route needs no relay.
        let direct = select_route(&node(Kind::D, 1), &node(Kind::D, 2), false);
        assert_eq!(direct.relay_needs, None);
        assert_eq!(direct.check_relays(&[]), Ok(()));
    }

    #[test]
    fn roles_and_peer_addrs_are_given_per_side() {
        let plan = select_route(&node(Kind::E, 1), &node(Kind::G4, 2), false);
        assert_eq!(plan.role_of(Side::Requester), TunnelRole::Initiator);
        assert_eq!(plan.role_of(Side::Target), TunnelRole::Responder);
        assert_eq!(
            plan.peer_addrs_for(Side::Requester),
            &plan.requester_peer_addrs[..]
        );
        assert_eq!(
            plan.peer_addrs_for(Side::Target),
            &plan.target_peer_addrs[..]
        );
        assert_eq!(Side::Requester.other(), Side::Target);
    }
}
