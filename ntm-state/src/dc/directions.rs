//! The DC's directions: DIRECTION_REQUEST in, route selection (spec/06), relay authorization
//! (spec/05 §5.6, §5.13), ROUTE_DIRECTION to both nodes, path records, rebuilds (§5.9.2), and the
//! concealment rule (spec/07 §7.4). Directions between two domains (NTM_INFO_REQUEST) use the
//! same core: the deciding DC's *parties* are either its own nodes or a node another DC told it
//! about.
//!
//! ```text
//! node R             DC (decides)                RS               node T
//!  | DIRECTION_REQUEST |                          |                  |
//!  |------------------>| route selection          |                  |
//!  |                   | [relayed] RELAY_REQUEST  |                  |
//!  |                   |------------------------->|                  |
//!  |                   |        RELAY_RESPONSE    |                  |
//!  |                   |<-------------------------|                  |
//!  |                   | ROUTE_DIRECTION (unsolicited, retransmitted until ACK)
//!  |                   |-------------------------------------------->|
//!  | ROUTE_DIRECTION (the answer, retransmitted until ACK)           |
//!  |<------------------|                          |                  |
//! ```

use core::time::Duration;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use ntm_wire::{
    AddrList, DirectionRequest, ErrorCode, Extensions, Fqdn, Message, MessageType, NodeInfo,
    RelayRequest, RouteDirection, RouteKind, RouteReason, SecretKey, TransportAddr, TunnelRole,
};
use rand_core::{CryptoRng, RngCore};

use super::{error_msg, DirectionCoordinator, Sender};
use crate::route::{pick_relay, select_route, NodeView, RelayCandidate, RoutePlan, Side};
use crate::signaling::{addr_list, DropReason, Expiry, RttTable, SignalingKey, Transaction};
use crate::time::Time;

/// How long an answered DIRECTION_REQUEST's outcome is kept for its retransmissions (spec/07).
const ANSWER_CACHE: Duration = Duration::from_secs(30);

/// How long the DC remembers which path replaced a rebuilt one (spec/05 §5.9.1).
const REBUILD_MEMORY: Duration = Duration::from_secs(10);

/// Who may reach whom (spec/07 §7.4). By default every node may reach every other; a
/// restricted target is reachable only by the FQDNs listed for it, and is concealed from every
/// other caller (and from DNS, which answers for every caller).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccessPolicy {
    restricted: BTreeMap<Fqdn, BTreeSet<Fqdn>>,
}

impl AccessPolicy {
    /// Everyone may reach everyone.
    pub fn open() -> Self {
        AccessPolicy::default()
    }

    /// Makes `target` reachable only by `allowed`.
    pub fn restrict(&mut self, target: Fqdn, allowed: impl IntoIterator<Item = Fqdn>) {
        self.restricted
            .insert(target, allowed.into_iter().collect());
    }

    /// Whether `requester` may reach `target`.
    pub fn may_reach(&self, requester: &Fqdn, target: &Fqdn) -> bool {
        self.restricted
            .get(target)
            .is_none_or(|allowed| allowed.contains(requester))
    }

    /// Whether every caller may reach `target` (what DNS may reveal).
    pub fn is_public(&self, target: &Fqdn) -> bool {
        !self.restricted.contains_key(target)
    }
}

/// An RS the DC may direct paths through, with the DC↔RS pre-shared key.
#[derive(Clone, Debug)]
pub struct RelayLink {
    /// The RS's signaling address (where RELAY_REQUEST goes).
    pub addr: SocketAddr,
    pub key: SecretKey,
    /// Non-zero, top bit clear, distinct from every other key ID the DC is configured with.
    pub key_id: u32,
    pub serves_v4: bool,
    pub serves_v6: bool,
}

/// A path the DC decided, as `paths()` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathStatus {
    pub path_id: u32,
    pub requester: Fqdn,
    pub target: Fqdn,
    pub route: RouteKind,
    pub reason: RouteReason,
    /// The RS (its signaling address) for a relayed path.
    pub relay: Option<SocketAddr>,
    /// Whether each node (requester, target) acknowledged its direction.
    pub acked: [bool; 2],
    pub expires: Time,
}

/// One side of a path the DC decides.
#[derive(Clone, Debug)]
pub(super) enum Party {
    /// One of the DC's nodes, by index.
    Local(u32),
    /// Another DC's node, as that DC described it (NTM_INFO_REQUEST.requester).
    Remote { info: Box<NodeInfo> },
}

#[derive(Clone, Debug)]
enum PathState {
    /// Waiting for a relay: the candidate asked now and those already tried.
    AwaitingRelay { relay: usize, tried: Vec<usize> },
    /// Directions sent.
    Directed,
}

struct PathRecord {
    requester: Party,
    target: Party,
    requester_fqdn: Fqdn,
    target_fqdn: Fqdn,
    plan: RoutePlan,
    tunnel_credential: SecretKey,
    relay_key: Option<SecretKey>,
    relay: Option<usize>,
    relay_addrs: AddrList,
    lifetime_s: u32,
    expires: Time,
    state: PathState,
    /// The requester's DIRECTION_REQUEST: its key ID, transaction ID and where it came from.
    request: Sender,
    acked: [bool; 2],
}

/// What an outstanding request of the DC is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Purpose {
    /// ROUTE_DIRECTION to a node of this DC: the path and which side.
    Direction { path_id: u32, side: Side },
    /// RELAY_REQUEST for a path to the relay of that index.
    Relay { path_id: u32, relay: usize },
    /// NTM_INFO_REQUEST to another DC for the node's DIRECTION_REQUEST `request`.
    NtmInfo { node_idx: u32, request: Sender },
    /// A ROUTE_DIRECTION another DC decided, relayed to the node (answering `request`).
    Forwarded,
}

pub(super) struct Outstanding {
    pub(super) tx: Transaction,
    pub(super) purpose: Purpose,
    /// Where it goes from (one of the DC's addresses).
    local: SocketAddr,
}

/// The outcome of a DIRECTION_REQUEST, for its retransmissions.
#[derive(Clone, Debug)]
pub(super) enum Answered {
    /// Directed on this path (the ROUTE_DIRECTION is retransmitted until ACK); or waiting.
    Path(u32),
    /// An ERROR, or a ROUTE_DIRECTION(Offline): sent again as it was.
    Message(Box<Message>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Due {
    /// An outstanding request, by (key ID, transaction ID).
    Outstanding(u32, u32),
    Path(u32),
    Answer(u32, u32),
}

/// The directions table of a DC.
pub(super) struct Directions {
    relays: Vec<RelayState>,
    /// Messages kept for retransmission, by (key ID, transaction ID): NTM_INFO_REQUESTs and
    /// relayed ROUTE_DIRECTIONs.
    pub(super) kept: BTreeMap<(u32, u32), Message>,
    /// The path recorded between two of the DC's nodes (lower node index first).
    by_pair: BTreeMap<(u32, u32), u32>,
    /// Rebuilt Path ID → the Path ID that replaced it and when, bounded by `max_paths`.
    rebuilt: BTreeMap<u32, (u32, Time)>,
    paths: BTreeMap<u32, PathRecord>,
    pub(super) outstanding: BTreeMap<(u32, u32), Outstanding>,
    pub(super) answers: BTreeMap<(u32, u32), (Answered, Time)>,
    deadlines: BTreeSet<(Time, Due)>,
    pub(super) rtt: RttTable,
}

struct RelayState {
    link: RelayLink,
    key: SignalingKey,
    load_permille: u16,
}

impl Directions {
    pub(super) fn new(relays: &[RelayLink]) -> Self {
        Directions {
            relays: relays
                .iter()
                .map(|link| RelayState {
                    key: SignalingKey::new(&link.key, link.key_id, ntm_wire::Role::A),
                    link: link.clone(),
                    load_permille: 0,
                })
                .collect(),
            kept: BTreeMap::new(),
            rebuilt: BTreeMap::new(),
            by_pair: BTreeMap::new(),
            paths: BTreeMap::new(),
            outstanding: BTreeMap::new(),
            answers: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            rtt: RttTable::new(64),
        }
    }

    pub(super) fn is_relay_key(&self, key_id: u32) -> bool {
        self.relays.iter().any(|r| r.link.key_id == key_id)
    }

    pub(super) fn next_deadline(&self) -> Option<(Time, &'static str)> {
        let &(at, due) = self.deadlines.first()?;
        let label = match due {
            Due::Outstanding(..) => "route direction or relay request retransmission",
            Due::Path(_) => "path record expiry",
            Due::Answer(..) => "direction answer cache expiry",
        };
        Some((at, label))
    }
}

/// The two node indices of a path between two of the DC's nodes, lower first.
fn local_pair(p: &PathRecord) -> Option<(u32, u32)> {
    match (&p.requester, &p.target) {
        (Party::Local(a), Party::Local(b)) => Some(((*a).min(*b), (*a).max(*b))),
        _ => None,
    }
}

fn random_key<R: RngCore + CryptoRng>(rng: &mut R) -> SecretKey {
    let mut k = [0u8; 32];
    rng.fill_bytes(&mut k);
    SecretKey::from_bytes(k)
}

impl DirectionCoordinator {
    /// Replaces who may reach whom; decisions already taken stand.
    pub fn set_access_policy(&mut self, access: AccessPolicy) {
        self.config.access = access;
    }

    /// The paths the DC decided and still records.
    pub fn paths(&self) -> Vec<PathStatus> {
        let d = &self.directions;
        d.paths
            .iter()
            .map(|(&path_id, p)| PathStatus {
                path_id,
                requester: p.requester_fqdn.clone(),
                target: p.target_fqdn.clone(),
                route: p.plan.route,
                reason: p.plan.reason,
                relay: p.relay.and_then(|i| d.relays.get(i)).map(|r| r.link.addr),
                acked: p.acked,
                expires: p.expires,
            })
            .collect()
    }

    /// What the deciding DC knows about node `idx`, if it is registered (spec/06 §6.1).
    pub(super) fn view_of(&self, idx: u32) -> Option<NodeView> {
        let node = self.node(idx)?;
        let reg = node.reg.as_ref()?;
        let observed = reg.observed.map(|o| o.map(|s| s.at.socket_addr()));
        // NodeView's mapping describes the family of the observed address NodeInfo carries.
        let nat = if observed[0].is_some() {
            reg.nat(0)
        } else {
            reg.nat(1)
        };
        Some(NodeView {
            local_addrs: reg.local_addrs.iter().map(|e| e.socket_addr()).collect(),
            observed,
            nat,
        })
    }

    /// What the deciding DC knows about a party.
    pub(super) fn view_of_party(&self, p: &Party) -> Option<NodeView> {
        match p {
            Party::Local(idx) => self.view_of(*idx),
            Party::Remote { info, .. } => Some(NodeView::from_node_info(info)),
        }
    }

    /// Where to send a DC → node datagram: the node's observed address (IPv4 first) and the DC
    /// address it reached, the one its NAT mapping admits.
    fn node_route(&self, idx: u32) -> Option<(SocketAddr, SocketAddr, u32)> {
        let node = self.node(idx)?;
        let reg = node.reg.as_ref()?;
        let (key_id, _) = node.session.as_ref()?;
        let seen = reg.observed.iter().flatten().next()?;
        let local = *self.config.addrs.get(usize::from(seen.via))?;
        Some((local, seen.at.socket_addr(), *key_id))
    }

    /// The node information another DC is told (spec/03 §3.5, spec/06 §6.1).
    pub(super) fn node_info(&self, idx: u32) -> Option<NodeInfo> {
        let node = self.node(idx)?;
        let v = self.config.pools.pair(node.pair)?;
        let view = self.view_of(idx);
        let reg = node.reg.as_ref();
        Some(NodeInfo {
            fqdn: node.fqdn.clone(),
            virtual_v4: v.v4,
            virtual_v6: v.v6,
            observed_addr: view
                .as_ref()
                .and_then(NodeView::node_info_observed)
                .map(TransportAddr::new),
            local_addrs: view
                .as_ref()
                .map(|v| addr_list(&v.local_addrs))
                .unwrap_or_else(AddrList::empty),
            nat: view.map_or(ntm_wire::NatBehaviour::Unknown, |v| v.nat),
            public_key: node.public_key,
            notification: reg.is_some_and(|r| r.wants_notification),
        })
    }

    // -- DIRECTION_REQUEST ---------------------------------------------------------------------

    pub(super) fn on_direction_request<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        from: Sender,
        node_idx: u32,
        req: DirectionRequest,
        rng: &mut R,
    ) {
        let cache_key = (from.key_id, from.txid);
        if let Some((answered, _)) = self.directions.answers.get(&cache_key).cloned() {
            match answered {
                Answered::Path(path_id) => self.resend_requester_direction(path_id),
                Answered::Message(msg) => {
                    self.send_to_node(from.local, from.remote, from.key_id, &msg, from.txid)
                }
            }
            return;
        }
        let registered = self
            .node(node_idx)
            .is_some_and(|n| n.reg.is_some() && self.by_key.get(&from.key_id) == Some(&node_idx));
        if !registered {
            self.answer_direction(
                now,
                from,
                error_msg(ErrorCode::WrongState, MessageType::DirectionRequest),
            );
            return;
        }
        let Some(requester_fqdn) = self.node(node_idx).map(|n| n.fqdn.clone()) else {
            return;
        };
        if !super::is_node_of(&req.peer_fqdn, &self.config.zone) {
            // Another domain's node: its DC decides (spec/05 §5.5.1).
            self.start_remote_direction(now, from, node_idx, req, rng);
            return;
        }
        // Concealment (spec/07 §7.4): a missing name and a hidden one take the same steps and
        // get the same answer.
        let target = self.by_fqdn.get(&req.peer_fqdn).copied();
        let allowed = self
            .config
            .access
            .may_reach(&requester_fqdn, &req.peer_fqdn);
        let target = match target {
            Some(t) if allowed && t != node_idx && self.node(t).is_some_and(|n| n.pair != 0) => t,
            _ => {
                self.answer_direction(
                    now,
                    from,
                    error_msg(ErrorCode::NotFound, MessageType::DirectionRequest),
                );
                return;
            }
        };
        let Some(target_view) = self.view_of(target) else {
            let offline = self.offline_direction(target);
            self.answer_direction(now, from, offline);
            return;
        };
        let Some(requester_view) = self.view_of(node_idx) else {
            return;
        };
        let rebuild = req.rebuild_path_id != 0
            && self
                .directions
                .paths
                .get(&req.rebuild_path_id)
                .is_some_and(|p| {
                    matches!((&p.requester, &p.target),
                    (Party::Local(a), Party::Local(b))
                        if (*a == node_idx && *b == target) || (*a == target && *b == node_idx))
                });
        if !rebuild && req.rebuild_path_id != 0 {
            // Both ends asked to rebuild the same path (both moved at once): the second gets
            // its side of the rebuild already decided, so one tunnel results, not two.
            let twin = self
                .directions
                .rebuilt
                .get(&req.rebuild_path_id)
                .filter(|(_, at)| *at + REBUILD_MEMORY > now)
                .map(|(id, _)| *id);
            let side = twin.and_then(|id| {
                let p = self.directions.paths.get(&id)?;
                match (&p.requester, &p.target) {
                    (Party::Local(a), Party::Local(b)) if *a == target && *b == node_idx => {
                        Some((id, Side::Target))
                    }
                    (Party::Local(a), Party::Local(b)) if *a == node_idx && *b == target => {
                        Some((id, Side::Requester))
                    }
                    _ => None,
                }
            });
            if let Some((id, side)) = side {
                if let Some(msg) = self.direction_for(id, side) {
                    self.answer_direction(now, from, msg);
                    return;
                }
            }
        }
        let plan = select_route(&requester_view, &target_view, rebuild);
        let Some(target_fqdn) = self.node(target).map(|n| n.fqdn.clone()) else {
            return;
        };
        let new_path = self.decide(
            now,
            from,
            (Party::Local(node_idx), requester_fqdn),
            (Party::Local(target), target_fqdn),
            plan,
            rng,
        );
        if let (true, Some(id)) = (rebuild, new_path) {
            // The rebuilt path goes once its replacement is decided (a failed decision leaves
            // it, so the node's retry is still a rebuild).
            self.forget_path(req.rebuild_path_id);
            let d = &mut self.directions;
            d.rebuilt.retain(|_, (_, at)| *at + REBUILD_MEMORY > now);
            if d.rebuilt.len() < self.config.limits.max_paths {
                d.rebuilt.insert(req.rebuild_path_id, (id, now));
            }
        }
    }

    /// ROUTE_DIRECTION(Offline) for the requester: the peer's name, virtual addresses and key.
    pub(super) fn offline_direction(&self, target: u32) -> Message {
        let Some(node) = self.node(target) else {
            return error_msg(ErrorCode::NotFound, MessageType::DirectionRequest);
        };
        let Some(v) = self.config.pools.pair(node.pair) else {
            return error_msg(ErrorCode::NotFound, MessageType::DirectionRequest);
        };
        RouteDirection {
            path_id: 0,
            route: RouteKind::Offline,
            role: TunnelRole::Initiator,
            reason: RouteReason::Reachable,
            peer_fqdn: node.fqdn.clone(),
            peer_virtual_v4: v.v4,
            peer_virtual_v6: v.v6,
            peer_public_key: node.public_key,
            peer_addrs: AddrList::empty(),
            relay_addrs: AddrList::empty(),
            tunnel_credential: SecretKey::from_bytes([0; 32]),
            relay_key: None,
            probe_direct: false,
            lifetime_s: 0,
            extensions: Extensions::none(),
        }
        .into()
    }

    /// Answers a DIRECTION_REQUEST with a final message (ERROR or Offline), kept for its
    /// retransmissions.
    pub(super) fn answer_direction(&mut self, now: Time, from: Sender, msg: Message) {
        self.send_answer(from, &msg);
        self.remember_answer(
            now,
            (from.key_id, from.txid),
            Answered::Message(Box::new(msg)),
        );
    }

    /// Sends an answer to a request from one of the DC's nodes (under its K_nd) or from another
    /// DC (under the DC↔DC key the request came under).
    pub(super) fn send_answer(&mut self, from: Sender, msg: &Message) {
        if from.peer.is_some() {
            self.send_to_peer(from.local, from.remote, from.key_id, msg, from.txid);
        } else {
            self.send_to_node(from.local, from.remote, from.key_id, msg, from.txid);
        }
    }

    pub(super) fn remember_answer(&mut self, now: Time, key: (u32, u32), answered: Answered) {
        let limit = self.config.limits.max_pending_directions;
        let d = &mut self.directions;
        if d.answers.len() >= limit && !d.answers.contains_key(&key) {
            // Full: the oldest answer goes (its request's retransmission is decided again).
            if let Some(&(at, due)) = d
                .deadlines
                .iter()
                .find(|(_, due)| matches!(due, Due::Answer(..)))
            {
                d.deadlines.remove(&(at, due));
                if let Due::Answer(k, t) = due {
                    d.answers.remove(&(k, t));
                }
            }
        }
        if let Some((_, old)) = d.answers.insert(key, (answered, now + ANSWER_CACHE)) {
            d.deadlines.remove(&(old, Due::Answer(key.0, key.1)));
        }
        d.deadlines
            .insert((now + ANSWER_CACHE, Due::Answer(key.0, key.1)));
    }

    /// Draws the path and its credentials, then directs both sides (after the relay, if any).
    pub(super) fn decide<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        from: Sender,
        requester: (Party, Fqdn),
        target: (Party, Fqdn),
        plan: RoutePlan,
        rng: &mut R,
    ) -> Option<u32> {
        let limit = self.config.limits.max_paths;
        if self.directions.paths.len() >= limit {
            self.answer_direction(
                now,
                from,
                error_msg(ErrorCode::Unavailable, MessageType::DirectionRequest),
            );
            return None;
        }
        let path_id = loop {
            let p = rng.next_u32();
            if p != 0 && !self.directions.paths.contains_key(&p) {
                break p;
            }
        };
        let lifetime = self.path_lifetime(now, &requester.0, &target.0);
        let lifetime_s = u32::try_from(lifetime.as_secs()).unwrap_or(u32::MAX);
        let relayed = plan.route == RouteKind::Relay;
        let mut record = PathRecord {
            requester: requester.0,
            target: target.0,
            requester_fqdn: requester.1,
            target_fqdn: target.1,
            tunnel_credential: random_key(rng),
            relay_key: relayed.then(|| random_key(rng)),
            relay: None,
            relay_addrs: AddrList::empty(),
            lifetime_s,
            expires: now + lifetime,
            state: PathState::Directed,
            request: from,
            acked: [false, false],
            plan,
        };
        if relayed {
            let Some(relay) = self.next_relay(&record.plan, &[]) else {
                self.answer_direction(
                    now,
                    from,
                    error_msg(
                        self.no_relay_code(&record.plan),
                        MessageType::DirectionRequest,
                    ),
                );
                return None;
            };
            record.state = PathState::AwaitingRelay {
                relay,
                tried: vec![relay],
            };
            record.relay = Some(relay);
        }
        // A new path between two of this DC's nodes supersedes older ones between them: their
        // tunnels are replaced at the nodes (spec/05 §5.7), so their records would only linger.
        let pair = local_pair(&record);
        if let Some(old) = pair.and_then(|k| self.directions.by_pair.get(&k).copied()) {
            self.forget_path(old);
        }
        if let Some(k) = pair {
            self.directions.by_pair.insert(k, path_id);
        }
        let expires = record.expires;
        self.directions.paths.insert(path_id, record);
        self.directions
            .deadlines
            .insert((expires, Due::Path(path_id)));
        self.remember_answer(now, (from.key_id, from.txid), Answered::Path(path_id));
        match self.directions.paths.get(&path_id).map(|p| p.state.clone()) {
            Some(PathState::AwaitingRelay { relay, .. }) => {
                self.send_relay_request(now, path_id, relay, rng)
            }
            _ => self.send_directions(now, path_id, rng),
        }
        Some(path_id)
    }

    /// ERROR NoRoute when no configured RS could ever serve the route, RelayUnavailable when
    /// those that could have failed.
    fn no_relay_code(&self, plan: &RoutePlan) -> ErrorCode {
        let any = self.next_relay(plan, &[]).is_some();
        if any || plan.reason != RouteReason::FamilyMismatch {
            ErrorCode::RelayUnavailable
        } else {
            ErrorCode::NoRoute
        }
    }

    fn next_relay(&self, plan: &RoutePlan, skip: &[usize]) -> Option<usize> {
        let need = plan.relay_needs?;
        let candidates: Vec<RelayCandidate> = self
            .directions
            .relays
            .iter()
            .map(|r| RelayCandidate {
                serves_v4: r.link.serves_v4,
                serves_v6: r.link.serves_v6,
                load_permille: r.load_permille,
            })
            .collect();
        pick_relay(&candidates, need, skip)
    }

    /// The direction lifetime: the configured one, at most both sessions' remaining life.
    fn path_lifetime(&self, now: Time, a: &Party, b: &Party) -> Duration {
        let mut life = self.config.direction_lifetime;
        for p in [a, b] {
            let Party::Local(idx) = p else {
                continue; // the other DC cuts its own node's lifetime
            };
            if let Some((_, s)) = self.node(*idx).and_then(|n| n.session.as_ref()) {
                life = life.min(s.deadline.checked_duration_since(now).unwrap_or_default());
            }
        }
        life
    }

    fn send_relay_request<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        path_id: u32,
        relay: usize,
        rng: &mut R,
    ) {
        let Some(p) = self.directions.paths.get(&path_id) else {
            return;
        };
        let Some(relay_key) = p.relay_key.clone() else {
            return;
        };
        let msg: Message = RelayRequest {
            path_id,
            relay_key,
            lifetime_s: p.lifetime_s,
            rate_limit_kbps: self.config.relay_rate_limit_kbps,
            extensions: Extensions::none(),
        }
        .into();
        let Some(r) = self.directions.relays.get(relay) else {
            return;
        };
        let (dst, key_id) = (r.link.addr, r.link.key_id);
        let local = self.local_for(dst);
        let txid = self.fresh_txid(key_id, rng);
        let rto = self.directions.rtt.rto(dst, &self.config.retransmit);
        let tx = Transaction::start(
            now,
            txid,
            MessageType::RelayRequest,
            dst,
            rto,
            &self.config.retransmit,
            rng,
        );
        self.track(key_id, tx, Purpose::Relay { path_id, relay }, local);
        self.transmit_relay_request(path_id, relay, txid, &msg);
    }

    fn transmit_relay_request(&mut self, _path_id: u32, relay: usize, txid: u32, msg: &Message) {
        let Some(r) = self.directions.relays.get_mut(relay) else {
            return;
        };
        let dst = r.link.addr;
        let datagram = r.key.seal_to_vec(msg, txid, None);
        let local = self.local_for(dst);
        self.output.queue(Some(local), dst, datagram);
    }

    /// One of the DC's addresses in `dst`'s family (the first one), or its first address.
    pub(super) fn local_for(&self, dst: SocketAddr) -> SocketAddr {
        let addrs = &self.config.addrs;
        addrs
            .iter()
            .find(|a| a.is_ipv6() == dst.is_ipv6())
            .or(addrs.first())
            .copied()
            .unwrap_or(dst)
    }

    pub(super) fn fresh_txid<R: RngCore>(&self, key_id: u32, rng: &mut R) -> u32 {
        loop {
            let t = rng.next_u32();
            if !self.directions.outstanding.contains_key(&(key_id, t)) {
                return t;
            }
        }
    }

    pub(super) fn track(
        &mut self,
        key_id: u32,
        tx: Transaction,
        purpose: Purpose,
        local: SocketAddr,
    ) {
        let d = &mut self.directions;
        let key = (key_id, tx.txid());
        d.deadlines
            .insert((tx.deadline(), Due::Outstanding(key.0, key.1)));
        if let Some(old) = d
            .outstanding
            .insert(key, Outstanding { tx, purpose, local })
        {
            d.deadlines
                .remove(&(old.tx.deadline(), Due::Outstanding(key.0, key.1)));
        }
    }

    pub(super) fn untrack(&mut self, key: (u32, u32)) -> Option<Outstanding> {
        let d = &mut self.directions;
        let o = d.outstanding.remove(&key)?;
        d.deadlines
            .remove(&(o.tx.deadline(), Due::Outstanding(key.0, key.1)));
        Some(o)
    }

    /// The ROUTE_DIRECTION for one side of a path.
    pub(super) fn direction_for(&self, path_id: u32, side: Side) -> Option<Message> {
        let p = self.directions.paths.get(&path_id)?;
        let (peer, peer_addrs) = match side {
            Side::Requester => (&p.target, &p.plan.requester_peer_addrs),
            Side::Target => (&p.requester, &p.plan.target_peer_addrs),
        };
        let (peer_fqdn, v4, v6, peer_public_key) = match peer {
            Party::Local(idx) => {
                let n = self.node(*idx)?;
                let v = self.config.pools.pair(n.pair)?;
                (n.fqdn.clone(), v.v4, v.v6, n.public_key)
            }
            Party::Remote { info, .. } => (
                info.fqdn.clone(),
                info.virtual_v4,
                info.virtual_v6,
                info.public_key,
            ),
        };
        let role = if p.plan.initiator == side {
            TunnelRole::Initiator
        } else {
            TunnelRole::Responder
        };
        Some(
            RouteDirection {
                path_id,
                route: p.plan.route,
                role,
                reason: p.plan.reason,
                peer_fqdn,
                peer_virtual_v4: v4,
                peer_virtual_v6: v6,
                peer_public_key,
                peer_addrs: addr_list(peer_addrs),
                relay_addrs: p.relay_addrs.clone(),
                tunnel_credential: p.tunnel_credential.clone(),
                relay_key: p.relay_key.clone(),
                probe_direct: p.plan.probe_direct,
                lifetime_s: p.lifetime_s,
                extensions: Extensions::none(),
            }
            .into(),
        )
    }

    /// Sends both directions: the target's first (unsolicited), then the requester's answer.
    fn send_directions<R: RngCore + CryptoRng>(&mut self, now: Time, path_id: u32, rng: &mut R) {
        if let Some(p) = self.directions.paths.get_mut(&path_id) {
            p.state = PathState::Directed;
        }
        for side in [Side::Target, Side::Requester] {
            self.send_direction(now, path_id, side, rng);
        }
    }

    fn send_direction<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        path_id: u32,
        side: Side,
        rng: &mut R,
    ) {
        let Some(p) = self.directions.paths.get(&path_id) else {
            return;
        };
        let request = p.request;
        let party = match side {
            Side::Requester => p.requester.clone(),
            Side::Target => p.target.clone(),
        };
        let Some(msg) = self.direction_for(path_id, side) else {
            return;
        };
        let idx = match party {
            Party::Local(idx) => idx,
            Party::Remote { .. } => {
                // The answer to the other DC's NTM_INFO_REQUEST: a response, not retransmitted
                // (the other DC retransmits its request and gets it again).
                self.send_answer(request, &msg);
                if let Some(p) = self.directions.paths.get_mut(&path_id) {
                    p.acked[0] = true;
                }
                return;
            }
        };
        let (local, remote, key_id, txid) = match side {
            Side::Requester => (request.local, request.remote, request.key_id, request.txid),
            Side::Target => {
                let Some((local, remote, key_id)) = self.node_route(idx) else {
                    return;
                };
                (local, remote, key_id, self.fresh_txid(key_id, rng))
            }
        };
        let rto = self.directions.rtt.rto(remote, &self.config.retransmit);
        let tx = Transaction::start(
            now,
            txid,
            MessageType::RouteDirection,
            remote,
            rto,
            &self.config.retransmit,
            rng,
        );
        self.track(key_id, tx, Purpose::Direction { path_id, side }, local);
        self.send_to_node_or_ns(now, local, remote, key_id, &msg, txid, rng);
    }

    /// A retransmitted DIRECTION_REQUEST whose direction is out: send it again now.
    pub(super) fn resend_requester_direction(&mut self, path_id: u32) {
        let Some(p) = self.directions.paths.get(&path_id) else {
            return;
        };
        let remote = matches!(p.requester, Party::Remote { .. });
        if !matches!(p.state, PathState::Directed) || (p.acked[0] && !remote) {
            return; // still waiting for the relay (absorbed), or already acknowledged
        }
        let r = p.request;
        if let Some(msg) = self.direction_for(path_id, Side::Requester) {
            self.send_answer(r, &msg);
        }
    }

    // -- Answers -------------------------------------------------------------------------------

    /// A node's ACK or ERROR for a ROUTE_DIRECTION (key ID = its session).
    pub(super) fn on_direction_answer<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        key_id: u32,
        txid: u32,
        msg: Message,
        rng: &mut R,
    ) -> Result<(), DropReason> {
        let Some(o) = self.directions.outstanding.get(&(key_id, txid)) else {
            return Err(DropReason::Unexpected);
        };
        if o.purpose == Purpose::Forwarded {
            self.untrack((key_id, txid));
            self.directions.kept.remove(&(key_id, txid));
            return Ok(());
        }
        let Purpose::Direction { path_id, side } = o.purpose else {
            return Err(DropReason::Unexpected);
        };
        let sample = o.tx.rtt_sample(now).map(|s| (o.tx.remote(), s));
        match msg {
            Message::Ack(a) if a.acked_type == MessageType::RouteDirection.to_u8() => {
                self.untrack((key_id, txid));
                if let Some((peer, rtt)) = sample {
                    self.directions.rtt.on_sample(now, peer, rtt);
                }
                if let Some(p) = self.directions.paths.get_mut(&path_id) {
                    let i = usize::from(side == Side::Target);
                    if let Some(a) = p.acked.get_mut(i) {
                        *a = true;
                    }
                }
                Ok(())
            }
            Message::Error(e) if e.code == ErrorCode::PathIdInUse => {
                // The node already uses this Path ID: decide the pair again with a new one.
                self.untrack((key_id, txid));
                self.redecide(now, path_id, rng);
                Ok(())
            }
            Message::Error(_) => {
                // Malformed or another refusal: the node will not build this path.
                self.untrack((key_id, txid));
                Ok(())
            }
            _ => Err(DropReason::Unexpected),
        }
    }

    /// Decides a refused path again (spec/05 §5.7): same parties, new Path ID and credentials.
    fn redecide<R: RngCore + CryptoRng>(&mut self, now: Time, path_id: u32, rng: &mut R) {
        let Some(p) = self.forget_path(path_id) else {
            return;
        };
        let (Some(rv), Some(tv)) = (
            self.view_of_party(&p.requester),
            self.view_of_party(&p.target),
        ) else {
            return;
        };
        let plan = select_route(&rv, &tv, p.plan.reason == RouteReason::DirectFailed);
        // The new direction answers the same DIRECTION_REQUEST.
        self.directions
            .answers
            .remove(&(p.request.key_id, p.request.txid));
        self.decide(
            now,
            p.request,
            (p.requester, p.requester_fqdn),
            (p.target, p.target_fqdn),
            plan,
            rng,
        );
    }

    /// Forgets a path and every request outstanding for it.
    fn forget_path(&mut self, path_id: u32) -> Option<PathRecord> {
        let p = self.directions.paths.remove(&path_id)?;
        if let Some(k) = local_pair(&p) {
            if self.directions.by_pair.get(&k) == Some(&path_id) {
                self.directions.by_pair.remove(&k);
            }
        }
        self.directions
            .deadlines
            .remove(&(p.expires, Due::Path(path_id)));
        let keys: Vec<(u32, u32)> = self
            .directions
            .outstanding
            .iter()
            .filter(|(_, o)| match o.purpose {
                Purpose::Direction { path_id: id, .. } | Purpose::Relay { path_id: id, .. } => {
                    id == path_id
                }
                Purpose::NtmInfo { .. } | Purpose::Forwarded => false,
            })
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            self.untrack(k);
        }
        Some(p)
    }

    /// RELAY_RESPONSE, ACK or ERROR from an RS under its key.
    pub(super) fn on_relay_datagram<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        buf: &mut [u8],
        key_id: u32,
        rng: &mut R,
    ) -> Result<(), DropReason> {
        let Some(relay) = self
            .directions
            .relays
            .iter()
            .position(|r| r.link.key_id == key_id)
        else {
            return Err(DropReason::UnknownKey);
        };
        let (header, msg) = match self.directions.relays.get_mut(relay) {
            Some(r) => r.key.open(buf)?,
            None => return Err(DropReason::UnknownKey),
        };
        if !header.sealed {
            return Err(DropReason::UnsealedHint);
        }
        let txid = header.envelope.txid;
        let Some(o) = self.directions.outstanding.get(&(key_id, txid)) else {
            return Err(DropReason::Unexpected);
        };
        let Purpose::Relay { path_id, .. } = o.purpose else {
            return Err(DropReason::Unexpected);
        };
        let sample = o.tx.rtt_sample(now).map(|s| (o.tx.remote(), s));
        match msg {
            Message::RelayResponse(r) if r.path_id == path_id => {
                self.untrack((key_id, txid));
                if let Some((peer, rtt)) = sample {
                    self.directions.rtt.on_sample(now, peer, rtt);
                }
                if let Some(rs) = self.directions.relays.get_mut(relay) {
                    rs.load_permille = r.load_permille;
                }
                if let Some(p) = self.directions.paths.get_mut(&path_id) {
                    p.relay_addrs = r.relay_addrs;
                }
                self.send_directions(now, path_id, rng);
                Ok(())
            }
            Message::Error(_) => {
                self.untrack((key_id, txid));
                self.try_next_relay(now, path_id, rng);
                Ok(())
            }
            _ => Err(DropReason::Unexpected),
        }
    }

    /// The relay asked could not take the path: ask the next candidate, or give up.
    fn try_next_relay<R: RngCore + CryptoRng>(&mut self, now: Time, path_id: u32, rng: &mut R) {
        let Some(p) = self.directions.paths.get(&path_id) else {
            return;
        };
        let PathState::AwaitingRelay { tried, .. } = &p.state else {
            return;
        };
        let tried = tried.clone();
        match self.next_relay(&p.plan, &tried) {
            Some(next) => {
                if let Some(p) = self.directions.paths.get_mut(&path_id) {
                    let mut t = tried;
                    t.push(next);
                    p.state = PathState::AwaitingRelay {
                        relay: next,
                        tried: t,
                    };
                    p.relay = Some(next);
                }
                self.send_relay_request(now, path_id, next, rng);
            }
            None => {
                let Some(p) = self.forget_path(path_id) else {
                    return;
                };
                let error = error_msg(ErrorCode::RelayUnavailable, MessageType::DirectionRequest);
                self.answer_direction(now, p.request, error);
            }
        }
    }

    // -- Time ----------------------------------------------------------------------------------

    pub(super) fn directions_timeout<R: RngCore + CryptoRng>(&mut self, now: Time, rng: &mut R) {
        while let Some(&(at, due)) = self.directions.deadlines.first() {
            if at > now {
                break;
            }
            self.directions.deadlines.remove(&(at, due));
            match due {
                Due::Answer(k, t) => {
                    if self
                        .directions
                        .answers
                        .get(&(k, t))
                        .is_some_and(|(_, e)| *e == at)
                    {
                        self.directions.answers.remove(&(k, t));
                    }
                }
                Due::Path(path_id) => {
                    if self
                        .directions
                        .paths
                        .get(&path_id)
                        .is_some_and(|p| p.expires == at)
                    {
                        self.forget_path(path_id);
                    }
                }
                Due::Outstanding(k, t) => self.outstanding_due(now, (k, t), rng),
            }
        }
    }

    fn outstanding_due<R: RngCore + CryptoRng>(&mut self, now: Time, key: (u32, u32), rng: &mut R) {
        let cfg = self.config.retransmit;
        let Some(o) = self.directions.outstanding.get_mut(&key) else {
            return;
        };
        let expiry = o.tx.on_timeout(now, &cfg, rng);
        let (purpose, local, remote, transmissions) =
            (o.purpose, o.local, o.tx.remote(), o.tx.transmissions());
        match expiry {
            Expiry::NotDue => {
                let at = o.tx.deadline();
                self.directions
                    .deadlines
                    .insert((at, Due::Outstanding(key.0, key.1)));
            }
            Expiry::Retransmit => {
                let at = o.tx.deadline();
                self.directions
                    .deadlines
                    .insert((at, Due::Outstanding(key.0, key.1)));
                match purpose {
                    Purpose::Direction { path_id, side } => {
                        if let Some(msg) = self.direction_for(path_id, side) {
                            self.send_to_node_or_ns(now, local, remote, key.0, &msg, key.1, rng);
                        }
                    }
                    Purpose::Forwarded => {
                        if let Some(msg) = self.directions.kept.get(&key).cloned() {
                            self.send_to_node(local, remote, key.0, &msg, key.1);
                        }
                    }
                    Purpose::NtmInfo { .. } => {
                        if let Some(msg) = self.directions.kept.get(&key).cloned() {
                            self.send_to_peer(local, remote, key.0, &msg, key.1);
                        }
                    }
                    Purpose::Relay { path_id, relay } => {
                        // spec/05 §5.13: no answer within 2 transmissions, next candidate
                        // (the only candidate keeps its whole retransmission budget).
                        let tried = match self.directions.paths.get(&path_id).map(|p| &p.state) {
                            Some(PathState::AwaitingRelay { tried, .. }) => tried.clone(),
                            _ => Vec::new(),
                        };
                        let other = self
                            .directions
                            .paths
                            .get(&path_id)
                            .and_then(|p| self.next_relay(&p.plan, &tried))
                            .is_some();
                        if transmissions > 2 && other {
                            self.untrack(key);
                            self.try_next_relay(now, path_id, rng);
                            return;
                        }
                        let msg = self.directions.paths.get(&path_id).and_then(|p| {
                            Some(Message::from(RelayRequest {
                                path_id,
                                relay_key: p.relay_key.clone()?,
                                lifetime_s: p.lifetime_s,
                                rate_limit_kbps: self.config.relay_rate_limit_kbps,
                                extensions: Extensions::none(),
                            }))
                        });
                        if let Some(msg) = msg {
                            self.transmit_relay_request(path_id, relay, key.1, &msg);
                        }
                    }
                }
            }
            Expiry::Failed => {
                self.untrack(key);
                self.directions.kept.remove(&key);
                if let Purpose::Relay { path_id, .. } = purpose {
                    self.try_next_relay(now, path_id, rng);
                }
                if let Purpose::NtmInfo { request, .. } = purpose {
                    // The peer's DC never answered (spec/05 §5.5.1).
                    let e = error_msg(ErrorCode::Unavailable, MessageType::DirectionRequest);
                    self.answer_direction(now, request, e);
                }
                // A node that never acknowledged its direction keeps the path record until it
                // expires: a later DIRECTION_REQUEST(rebuild) can still name it.
            }
        }
    }
}
