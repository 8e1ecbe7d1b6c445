//! The node's side of its cache server (CS) and notification server (NS): offline data (spec/05
//! §5.14) and the push channel (§5.2 steps 11-12, §5.4, §5.5.4).
//!
//! ```text
//! application                     Node                                  network
//!  leave_for_offline_peer ──▶ CACHE_STORE [K_cs] (sealed box) ──────────▶ CS, until ACK
//!  CacheStored ◀──────────── ACK ◀────────────────────────────────────── CS
//!                             NOTIFICATION(CachedData) [K_nd] ◀───────── DC (or via the NS)
//!                             ACK ──────────────────────────────────────▶ DC
//!                             CACHE_FETCH(acknowledged_through) [K_cs] ──▶ CS
//!  CachedData ◀────────────── CACHE_DATA (opened with the static secret) ◀ CS
//!                             CACHE_FETCH(acknowledged_through = last) ─▶ CS, until ACK
//!
//!  runtime (TCP)  ◀── NsCommand::Connect(ns_addr) ── after login
//!  ns_connected ──▶ NOTIFICATION_SUBSCRIBE [K_ns] (once registered) ═════▶ NS
//!                   ACK ◀═══════════════════════════════════════════════ NS: channel up,
//!                                                      no more UDP keep-alives to the DC
//!                   KEEPALIVE(reply_requested) every 5 min ═════════════▶ NS
//!                   NOTIFICATION [K_ns] ◀═══════════════════════════════ NS
//!                   ACK ════════════════════════════════════════════════▶ NS; the payload is
//!                                            taken as a datagram from the DC (answered by UDP)
//! ```
//!
//! # Offline data
//!
//! A ROUTE_DIRECTION(Offline) gives the peer's static public key ([`NodeEvent::PeerOffline`]);
//! the node remembers it (at most [`NodeLimits::max_offline_peers`] peers, the oldest forgotten
//! first) so that [`Node::leave_for_offline_peer`] can seal data to it and store it at the CS
//! of `cs_addrs`. The outcome comes as [`NodeEvent::CacheStored`] or
//! [`NodeError::CacheStore`].
//!
//! When its DC announces cached data (NOTIFICATION(CachedData), directly or through the NS), the
//! node fetches until the CS answers ACK, and reports each blob once as
//! [`NodeEvent::CachedData`]. Delivery is at least once (spec/05 §5.14): the node acknowledges
//! an `item_id` only in a later CACHE_FETCH, and only when it is sure it received every
//! CACHE_DATA up to it. `remaining` counts down by one per message, which shows a gap inside a
//! batch but not the loss of a batch's *first* message; so the node acknowledges a batch only
//! when its lowest `item_id` follows the last one acknowledged, or when the previous batch began
//! with the same `item_id` (otherwise it fetches once more without acknowledging). `item_id`s
//! already handed to the application are dropped when they come again.
//!
//! # The push channel: driving the TCP connection
//!
//! The node does no I/O; the runtime owns the TCP socket to the NS:
//!
//! * [`Node::poll_ns_command`] says what to do: [`NsCommand::Connect`] (open a connection to
//!   that address) or [`NsCommand::Close`] (close it; the node already considers it gone).
//! * [`Node::ns_connected`] when the connection is established; [`Node::ns_closed`] when it
//!   failed or closed by itself (not after a `Close` the node asked for).
//! * [`Node::handle_ns_stream`] with every byte read, split anywhere;
//!   [`Node::poll_ns_stream`] for the bytes to write (call it after every input, like
//!   `poll_transmit`).
//!
//! The node asks to connect as soon as it is logged in (when it wants push and `ns_addrs` is
//! not empty) and subscribes once registered. While the channel is up it sends no UDP
//! keep-alives to its DC ([`NodeEvent::PushChannel`] says when that changes); a KEEPALIVE
//! goes on the channel every 5 min. A refused subscription, a reply missing for 30 s, corrupt
//! framing or a closed connection take the channel down; the node then resumes UDP keep-alives
//! and reconnects after a back-off of 1 s doubling to 60 s (spec/07 §7.2).

use core::time::Duration;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;

use ntm_wire::crypto::{node_cs_key, node_ns_key, open_box, seal_box};
use ntm_wire::signaling::stream;
use ntm_wire::{
    Ack, Blob, CacheData, CacheFetch, CacheStore, ErrorCode, Extensions, Fqdn, Header, Keepalive,
    Message, MessageType, Notification, NotificationSubscribe, NotifyReason, Role,
    MAX_SIGNALING_LEN,
};
use rand_core::{CryptoRng, RngCore};

use super::{Node, NodeError, NodeEvent};
use crate::signaling::{DropReason, Expiry, SignalingKey, Transaction};
use crate::time::Time;

/// The most CACHE_DATA one CACHE_FETCH asks for (spec/05 §5.14).
pub const FETCH_BATCH: u8 = 8;

/// The most bytes waiting to be written to the NS; a channel that does not drain is dropped.
const MAX_STREAM_OUT: usize = 16 * 1024;

/// What the runtime should do with the node's TCP connection to its NS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NsCommand {
    /// Open a TCP connection to this NS address, then call [`Node::ns_connected`] (or
    /// [`Node::ns_closed`] if it fails).
    Connect(SocketAddr),
    /// Close the connection. The node already counts it as closed.
    Close,
}

/// Why [`Node::leave_for_offline_peer`] did not start a CACHE_STORE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CacheStoreError {
    /// Not logged in.
    NotLoggedIn,
    /// The login gave no CS address of a family the node has an address in.
    NoCacheServer,
    /// No ROUTE_DIRECTION(Offline) told the node this peer's public key.
    UnknownPeer,
    /// More than 852 bytes: the sealed box would not fit a blob.
    TooLarge,
    /// [`NodeLimits::max_cache_stores`] stores are waiting for the CS already.
    Busy,
}

/// A CACHE_STORE waiting for the CS's answer.
struct Store {
    peer: Fqdn,
    tx: Transaction,
    msg: Message,
}

/// A CACHE_FETCH waiting for its CACHE_DATA or ACK.
struct Fetch {
    tx: Transaction,
    /// Its `acknowledged_through`.
    acked: u64,
    /// What arrived since its latest transmission: `item_id` → `remaining`.
    batch: BTreeMap<u64, u16>,
}

/// The node's end of its CS: K_cs of the current session and the requests in flight.
struct CacheClient {
    key: SignalingKey,
    cs: SocketAddr,
    local: SocketAddr,
    stores: BTreeMap<u32, Store>,
    fetch: Option<Fetch>,
    /// Another announcement came during a fetch: fetch again after it.
    again: bool,
    /// The highest `item_id` acknowledged to the CS.
    acked: u64,
    /// `item_id`s above `acked` already handed to the application.
    delivered: BTreeSet<u64>,
    /// The lowest `item_id` of the last batch not acknowledged for want of certainty.
    unconfirmed_low: Option<u64>,
    /// The transaction ID of the DC's latest announcement (its retransmissions are only ACKed).
    last_notice: Option<u32>,
}

/// The push channel's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Channel {
    /// Not wanted: not logged in, no NS, or no push wanted.
    Off,
    /// Reconnect at this time.
    Waiting(Time),
    /// Asked the runtime to connect at this time.
    Connecting(Time),
    /// Connected; the subscription (transaction ID, when sent) once the node is registered.
    Open(Option<(u32, Time)>),
    /// Subscribed: the next KEEPALIVE, and the one awaiting its reply.
    Up {
        next_keepalive: Time,
        awaiting: Option<(u32, Time)>,
    },
}

struct PushChannel {
    state: Channel,
    /// K_ns of the current session.
    key: Option<SignalingKey>,
    ns_addrs: Vec<SocketAddr>,
    /// Which of `ns_addrs` the next connection goes to.
    next_addr: usize,
    backoff: Duration,
    /// The frame being received.
    inbuf: Vec<u8>,
    /// Framed bytes to write.
    out: Vec<u8>,
    commands: VecDeque<NsCommand>,
}

/// What the node keeps for its CS and NS.
pub(super) struct ServerState {
    cache: Option<CacheClient>,
    channel: PushChannel,
    /// Static public keys from ROUTE_DIRECTION(Offline), oldest first.
    offline_keys: VecDeque<(Fqdn, [u8; 32])>,
}

impl ServerState {
    pub(super) fn new() -> Self {
        ServerState {
            cache: None,
            channel: PushChannel {
                state: Channel::Off,
                key: None,
                ns_addrs: Vec::new(),
                next_addr: 0,
                backoff: Duration::ZERO,
                inbuf: Vec::new(),
                out: Vec::new(),
                commands: VecDeque::new(),
            },
            offline_keys: VecDeque::new(),
        }
    }
}

/// The address of `addrs` the node can reach from one of `local`, and that local address.
fn reachable(addrs: &[SocketAddr], local: &[SocketAddr]) -> Option<(SocketAddr, SocketAddr)> {
    addrs.iter().find_map(|a| {
        local
            .iter()
            .find(|l| l.is_ipv6() == a.is_ipv6())
            .map(|l| (*a, *l))
    })
}

impl Node {
    // -- Session ---------------------------------------------------------------------------------

    /// A new session: keys derived from its K_nd, the fetch state reset (the CS may number a
    /// new session's blobs from 1 again), and the push channel (re)opened.
    pub(super) fn servers_logged_in(&mut self, now: Time) {
        let Some(session) = self.session.as_ref() else {
            return;
        };
        let key_id = session.session_key_id;
        let local = &self.config.local_addrs;
        let cs = reachable(&session.cs_addrs, local);
        let stores = self
            .servers
            .cache
            .take()
            .map(|c| c.stores)
            .unwrap_or_default();
        for s in stores.into_values() {
            // Sealed under the old session's K_cs: the CS would not take them any more.
            self.event(NodeEvent::Error(NodeError::CacheStore {
                peer: s.peer,
                code: Some(ErrorCode::Expired),
            }));
        }
        let Some(session) = self.session.as_ref() else {
            return;
        };
        self.servers.cache = cs.map(|(cs, local)| CacheClient {
            key: SignalingKey::new(&node_cs_key(&session.node_dc_key), key_id, Role::A),
            cs,
            local,
            stores: BTreeMap::new(),
            fetch: None,
            again: false,
            acked: 0,
            delivered: BTreeSet::new(),
            unconfirmed_low: None,
            last_notice: None,
        });
        let wanted = self.config.wants_notification && !session.ns_addrs.is_empty();
        let ns_key = SignalingKey::new(&node_ns_key(&session.node_dc_key), key_id, Role::A);
        let ns_addrs = session.ns_addrs.clone();
        let ch = &mut self.servers.channel;
        let open = matches!(
            ch.state,
            Channel::Connecting(_) | Channel::Open(_) | Channel::Up { .. }
        );
        if open {
            // The old connection is bound to the old session's key.
            ch.commands.push_back(NsCommand::Close);
        }
        let was_up = matches!(ch.state, Channel::Up { .. });
        ch.inbuf.clear();
        ch.out.clear();
        ch.ns_addrs = ns_addrs;
        ch.next_addr = 0;
        ch.backoff = Duration::ZERO;
        ch.key = wanted.then_some(ns_key);
        ch.state = if wanted {
            Channel::Waiting(now)
        } else {
            Channel::Off
        };
        if was_up {
            self.event(NodeEvent::PushChannel { up: false });
        }
        self.ns_connect_if_due(now);
    }

    // -- Offline data: store -----------------------------------------------------------------

    /// The static public key a ROUTE_DIRECTION(Offline) gave for `peer`.
    pub(super) fn remember_offline_key(&mut self, peer: &Fqdn, key: [u8; 32]) {
        let keys = &mut self.servers.offline_keys;
        keys.retain(|(p, _)| p != peer);
        if self.config.limits.max_offline_peers == 0 {
            return;
        }
        while keys.len() >= self.config.limits.max_offline_peers {
            keys.pop_front();
        }
        keys.push_back((peer.clone(), key));
    }

    /// The static public key the node learned for an offline `peer`, if it still has it.
    pub fn offline_peer_key(&self, peer: &Fqdn) -> Option<[u8; 32]> {
        self.servers
            .offline_keys
            .iter()
            .find(|(p, _)| p == peer)
            .map(|(_, k)| *k)
    }

    /// Leaves `data` (at most 852 bytes) for `peer`, which a ROUTE_DIRECTION(Offline) said is
    /// offline: seals it to the peer's static key and stores it at the node's CS for the CS's
    /// default time (spec/05 §5.14). The outcome comes as [`NodeEvent::CacheStored`] or
    /// [`NodeError::CacheStore`]; the CS asserts this node as the sender, and nothing in the
    /// box authenticates it.
    pub fn leave_for_offline_peer<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        peer: &Fqdn,
        data: &[u8],
        rng: &mut R,
    ) -> Result<(), CacheStoreError> {
        if self.session.is_none() {
            return Err(CacheStoreError::NotLoggedIn);
        }
        let public = self
            .offline_peer_key(peer)
            .ok_or(CacheStoreError::UnknownPeer)?;
        let limit = self.config.limits.max_cache_stores;
        let cfg = self.config.retransmit;
        let cache = self
            .servers
            .cache
            .as_mut()
            .ok_or(CacheStoreError::NoCacheServer)?;
        if cache.stores.len() >= limit {
            return Err(CacheStoreError::Busy);
        }
        let mut eph = zeroize::Zeroizing::new([0u8; 32]);
        rng.fill_bytes(eph.as_mut());
        let sealed = seal_box(&public, &eph, data).map_err(|_| CacheStoreError::UnknownPeer)?;
        let blob = Blob::new(sealed).map_err(|_| CacheStoreError::TooLarge)?;
        let msg: Message = CacheStore {
            recipient_fqdn: peer.clone(),
            ttl_s: 0,
            blob,
            extensions: Extensions::none(),
        }
        .into();
        let txid = loop {
            let t = rng.next_u32();
            if t != 0 && !cache.stores.contains_key(&t) && cache.fetch_txid() != Some(t) {
                break t;
            }
        };
        let cs = cache.cs;
        let rto = self.rtt.rto(cs, &cfg);
        let tx = Transaction::start(now, txid, MessageType::CacheStore, cs, rto, &cfg, rng);
        cache.stores.insert(
            txid,
            Store {
                peer: peer.clone(),
                tx,
                msg: msg.clone(),
            },
        );
        self.send_to_cs(&msg, txid);
        Ok(())
    }

    fn send_to_cs(&mut self, msg: &Message, txid: u32) {
        let Some(c) = self.servers.cache.as_mut() else {
            return;
        };
        if let Some(d) = crate::signaling::sealed(c.key.seal_to_vec(msg, txid, None)) {
            self.outbox.push(Some(c.local), c.cs, d);
        }
    }

    // -- Offline data: fetch -----------------------------------------------------------------

    /// NOTIFICATION from the DC (under K_nd, over UDP or inside the NS's NOTIFICATION): ACK it
    /// and fetch what the CS holds.
    pub(super) fn on_dc_notification<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        header: &Header,
        n: Notification,
        rng: &mut R,
    ) {
        let txid = header.envelope.txid;
        let ack: Message = Ack {
            acked_type: MessageType::Notification.to_u8(),
            extensions: Extensions::none(),
        }
        .into();
        self.send_to_dc(local, remote, &ack, txid);
        if n.reason != NotifyReason::CachedData {
            return;
        }
        let repeated = self
            .servers
            .cache
            .as_ref()
            .is_some_and(|c| c.last_notice == Some(txid));
        if let Some(c) = self.servers.cache.as_mut() {
            c.last_notice = Some(txid);
        }
        if !repeated {
            self.fetch_cached(now, rng);
        }
    }

    /// Starts fetching, or fetches again after the fetch in flight.
    fn fetch_cached<R: RngCore + CryptoRng>(&mut self, now: Time, rng: &mut R) {
        let Some(c) = self.servers.cache.as_mut() else {
            return;
        };
        if c.fetch.is_some() {
            c.again = true;
            return;
        }
        let acked = c.acked;
        self.start_fetch(now, acked, rng);
    }

    fn start_fetch<R: RngCore + CryptoRng>(&mut self, now: Time, acked: u64, rng: &mut R) {
        let cfg = self.config.retransmit;
        let Some(c) = self.servers.cache.as_mut() else {
            return;
        };
        let txid = loop {
            let t = rng.next_u32();
            if t != 0 && !c.stores.contains_key(&t) && c.fetch_txid() != Some(t) {
                break t;
            }
        };
        let rto = self.rtt.rto(c.cs, &cfg);
        let tx = Transaction::start(now, txid, MessageType::CacheFetch, c.cs, rto, &cfg, rng);
        c.acked = acked;
        c.delivered.retain(|id| *id > acked);
        c.fetch = Some(Fetch {
            tx,
            acked,
            batch: BTreeMap::new(),
        });
        self.send_to_cs(&fetch_msg(acked), txid);
    }

    /// Whether a datagram under the session's key ID is the CS's: CACHE_DATA, or an answer to
    /// one of the CS requests in flight (its transaction ID, not yet authenticated, only routes
    /// it; the CS's key then authenticates it).
    pub(super) fn is_cs_datagram(&self, header: &Header) -> bool {
        let Some(c) = self.servers.cache.as_ref() else {
            return false;
        };
        if header.envelope.key_id != c.key.key_id() {
            return false;
        }
        let txid = header.envelope.txid;
        match header.msg_type {
            MessageType::CacheData => true,
            MessageType::Ack | MessageType::Error => {
                c.stores.contains_key(&txid) || c.fetch_txid() == Some(txid)
            }
            _ => false,
        }
    }

    /// A datagram from the CS (see [`Node::is_cs_datagram`]).
    pub(super) fn on_cs_datagram<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        buf: &mut [u8],
        rng: &mut R,
    ) -> Result<(), DropReason> {
        let c = self.servers.cache.as_mut().ok_or(DropReason::UnknownKey)?;
        let (h, msg) = c.key.open(buf)?;
        if !h.sealed {
            // UnknownKey: the CS has not received this session's key yet; retransmit as usual.
            return Err(DropReason::UnsealedHint);
        }
        if h.envelope.role != Role::B {
            return Err(DropReason::Unexpected);
        }
        let txid = h.envelope.txid;
        if let Some(store) = c.stores.get(&txid) {
            let outcome = match &msg {
                Message::Ack(a) if a.acked_type == MessageType::CacheStore.to_u8() => None,
                Message::Error(e) if e.failed_type == MessageType::CacheStore.to_u8() => {
                    Some(e.code)
                }
                _ => return Err(DropReason::Unexpected),
            };
            if let Some(sample) = store.tx.rtt_sample(now) {
                let cs = c.cs;
                self.rtt.on_sample(now, cs, sample);
            }
            let Some(store) = self
                .servers
                .cache
                .as_mut()
                .and_then(|c| c.stores.remove(&txid))
            else {
                return Err(DropReason::Unexpected);
            };
            self.event(match outcome {
                None => NodeEvent::CacheStored { peer: store.peer },
                code => NodeEvent::Error(NodeError::CacheStore {
                    peer: store.peer,
                    code,
                }),
            });
            return Ok(());
        }
        if c.fetch_txid() != Some(txid) {
            return Err(DropReason::Unexpected);
        }
        match msg {
            Message::CacheData(d) => {
                self.on_cache_data(now, d, rng);
                Ok(())
            }
            Message::Ack(a) if a.acked_type == MessageType::CacheFetch.to_u8() => {
                // Nothing held beyond what the fetch acknowledged.
                let again = match self.servers.cache.as_mut() {
                    Some(c) => {
                        c.fetch = None;
                        let acked = c.acked;
                        c.delivered.retain(|id| *id > acked);
                        core::mem::take(&mut c.again)
                    }
                    None => false,
                };
                if again {
                    self.fetch_cached(now, rng);
                }
                Ok(())
            }
            Message::Error(e) if e.failed_type == MessageType::CacheFetch.to_u8() => {
                if let Some(c) = self.servers.cache.as_mut() {
                    c.fetch = None;
                    c.again = false;
                }
                self.event(NodeEvent::Error(NodeError::CacheFetch {
                    code: Some(e.code),
                }));
                Ok(())
            }
            _ => Err(DropReason::Unexpected),
        }
    }

    fn on_cache_data<R: RngCore + CryptoRng>(&mut self, now: Time, d: CacheData, rng: &mut R) {
        let secret = self.config.static_secret.clone();
        let Some(c) = self.servers.cache.as_mut() else {
            return;
        };
        let Some(f) = c.fetch.as_mut() else {
            return;
        };
        if d.item_id <= f.acked {
            return; // deleted already; a stray copy
        }
        f.batch.insert(d.item_id, d.remaining);
        let complete = d.remaining == 0 || f.batch.len() >= usize::from(FETCH_BATCH);
        let fresh = !c.delivered.contains(&d.item_id);
        if fresh {
            // Bounded even against a CS that never lets a batch complete: forgetting the
            // oldest at worst hands one blob over twice, which at-least-once allows.
            while c.delivered.len() >= 4 * usize::from(FETCH_BATCH) {
                c.delivered.pop_first();
            }
            c.delivered.insert(d.item_id);
            let event = match open_box(secret.expose(), d.blob.as_bytes()) {
                Ok(data) => NodeEvent::CachedData {
                    from: d.sender_fqdn,
                    data,
                },
                Err(_) => NodeEvent::Error(NodeError::CachedDataUnreadable {
                    from: d.sender_fqdn,
                }),
            };
            self.event(event);
        }
        if complete {
            self.finish_batch(now, rng);
        }
    }

    /// A batch is in: acknowledge what is certain and fetch again.
    fn finish_batch<R: RngCore + CryptoRng>(&mut self, now: Time, rng: &mut R) {
        let Some(c) = self.servers.cache.as_mut() else {
            return;
        };
        let Some(f) = c.fetch.take() else {
            return;
        };
        let mut items = f.batch.iter();
        let Some((&low, &low_remaining)) = items.next() else {
            return;
        };
        // The run from the lowest item in which `remaining` counts down by one has no gap.
        let (mut through, mut prev) = (low, low_remaining);
        for (&id, &remaining) in items {
            if prev.checked_sub(1) != Some(remaining) {
                break;
            }
            (through, prev) = (id, remaining);
        }
        let certain = low == f.acked.saturating_add(1) || c.unconfirmed_low == Some(low);
        let acked = if certain {
            c.unconfirmed_low = None;
            through
        } else {
            c.unconfirmed_low = Some(low);
            f.acked
        };
        self.start_fetch(now, acked, rng);
    }

    // -- The push channel --------------------------------------------------------------------

    /// What the runtime should do with the TCP connection to the NS, if anything.
    pub fn poll_ns_command(&mut self) -> Option<NsCommand> {
        self.servers.channel.commands.pop_front()
    }

    /// Whether the push channel is up (subscribed): the node then sends no UDP keep-alives.
    pub fn ns_channel_up(&self) -> bool {
        matches!(self.servers.channel.state, Channel::Up { .. })
    }

    /// The connection [`NsCommand::Connect`] asked for is established.
    pub fn ns_connected<R: RngCore + CryptoRng>(&mut self, now: Time, rng: &mut R) {
        let ch = &mut self.servers.channel;
        if matches!(ch.state, Channel::Connecting(_)) {
            ch.state = Channel::Open(None);
            self.ns_subscribe_if_ready(now, rng);
        }
    }

    /// The connection failed or closed (by the NS or the network).
    pub fn ns_closed(&mut self, now: Time) {
        let ch = &self.servers.channel;
        if matches!(
            ch.state,
            Channel::Connecting(_) | Channel::Open(_) | Channel::Up { .. }
        ) {
            self.ns_channel_lost(now, false);
        }
    }

    /// Bytes read from the connection, split anywhere.
    pub fn handle_ns_stream<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        bytes: &[u8],
        rng: &mut R,
    ) {
        let mut input = bytes;
        while !input.is_empty() {
            let ch = &mut self.servers.channel;
            if !matches!(ch.state, Channel::Open(_) | Channel::Up { .. }) {
                return;
            }
            // Take only what completes the prefix or the frame: at most one frame is buffered.
            let need = match ch.inbuf.get(..stream::FRAME_PREFIX_LEN) {
                Some(&[hi, lo]) => (stream::FRAME_PREFIX_LEN
                    + usize::from(u16::from_be_bytes([hi, lo])))
                .saturating_sub(ch.inbuf.len()),
                _ => stream::FRAME_PREFIX_LEN.saturating_sub(ch.inbuf.len()),
            };
            let (take, rest) = input.split_at(need.min(input.len()));
            input = rest;
            ch.inbuf.extend_from_slice(take);
            match stream::next_frame(&ch.inbuf) {
                Err(_) => {
                    self.drops.record(&DropReason::Unexpected);
                    self.ns_channel_lost(now, true);
                    return;
                }
                Ok(None) => {}
                Ok(Some((start, end))) => {
                    let mut frame = core::mem::take(&mut ch.inbuf);
                    let result = match frame.get_mut(start..end) {
                        Some(datagram) => self.on_ns_frame(now, datagram, rng),
                        None => Err(DropReason::Unexpected),
                    };
                    if let Err(reason) = result {
                        // On a stream nothing after a bad frame can be trusted.
                        self.drops.record(&reason);
                        self.ns_channel_lost(now, true);
                        return;
                    }
                }
            }
        }
    }

    /// Copies bytes to write to the NS into `buf` and consumes them; 0 when there are none.
    pub fn poll_ns_stream(&mut self, buf: &mut [u8]) -> usize {
        let out = &mut self.servers.channel.out;
        let n = out.len().min(buf.len());
        match (buf.get_mut(..n), out.get(..n)) {
            (Some(dst), Some(src)) => dst.copy_from_slice(src),
            _ => return 0,
        }
        out.drain(..n);
        n
    }

    /// One frame from the NS.
    fn on_ns_frame<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        frame: &mut [u8],
        rng: &mut R,
    ) -> Result<(), DropReason> {
        let ch = &mut self.servers.channel;
        let key = ch.key.as_mut().ok_or(DropReason::UnknownKey)?;
        let (h, msg) = key.open(frame)?;
        let txid = h.envelope.txid;
        if !h.sealed {
            // ERROR UnknownKey to the subscription: the NS has no K_ns for the session.
            return match (ch.state, msg) {
                (Channel::Open(Some((t, _))), Message::Error(_)) if t == txid => {
                    Err(DropReason::UnsealedHint)
                }
                _ => {
                    self.drops.record(&DropReason::UnsealedHint);
                    Ok(())
                }
            };
        }
        if h.envelope.role != Role::B {
            return Err(DropReason::Unexpected);
        }
        match (ch.state, msg) {
            (Channel::Open(Some((t, _))), Message::Ack(a))
                if t == txid && a.acked_type == MessageType::NotificationSubscribe.to_u8() =>
            {
                ch.state = Channel::Up {
                    next_keepalive: now + self.config.timers.ns_keepalive,
                    awaiting: None,
                };
                ch.backoff = Duration::ZERO;
                if let Some(r) = self.registrar.as_mut() {
                    r.set_push_channel(true);
                }
                self.event(NodeEvent::PushChannel { up: true });
                Ok(())
            }
            (Channel::Open(Some((t, _))), Message::Error(_)) if t == txid => {
                Err(DropReason::Unexpected)
            }
            (
                Channel::Up {
                    next_keepalive,
                    awaiting: Some((t, _)),
                },
                Message::KeepaliveReply(_),
            ) if t == txid => {
                ch.state = Channel::Up {
                    next_keepalive,
                    awaiting: None,
                };
                Ok(())
            }
            (Channel::Up { .. }, Message::Error(e))
                if e.failed_type == MessageType::Keepalive.to_u8() =>
            {
                // Expired: the session is over; the node logs in again and reconnects.
                Err(DropReason::Unexpected)
            }
            (Channel::Up { .. }, Message::Notification(n)) => {
                let ack: Message = Ack {
                    acked_type: MessageType::Notification.to_u8(),
                    extensions: Extensions::none(),
                }
                .into();
                self.ns_write(&ack, txid);
                self.on_pushed(now, n, rng);
                Ok(())
            }
            _ => {
                self.drops.record(&DropReason::Unexpected);
                Ok(())
            }
        }
    }

    /// A NOTIFICATION the NS pushed: its payload is a datagram from the DC, taken as if it had
    /// arrived over UDP (spec/03 §0x3c); an empty CachedData one asks for a fetch.
    fn on_pushed<R: RngCore + CryptoRng>(&mut self, now: Time, n: Notification, rng: &mut R) {
        let session = self.session.as_ref().map(|s| s.session_key_id);
        if session != Some(n.node_key_id) {
            self.drops.record(&DropReason::UnknownKey);
            return;
        }
        if n.payload.as_bytes().is_empty() {
            if n.reason == NotifyReason::CachedData {
                self.fetch_cached(now, rng);
            }
            return;
        }
        // Answers go to the DC over UDP, from the leg the node registered on.
        let leg = self.dc_leg().or_else(|| {
            let s = self.session.as_ref()?;
            reachable(&s.dc_addrs, &self.config.local_addrs).map(|(dc, local)| (local, dc))
        });
        let Some((local, dc)) = leg else {
            return;
        };
        let mut datagram = n.payload.into_vec();
        if let Err(reason) = self.on_dc_datagram(now, local, dc, &mut datagram, rng) {
            self.drops.record(&reason);
        }
    }

    /// Seals `msg` under K_ns and queues it, framed, for the NS.
    fn ns_write(&mut self, msg: &Message, txid: u32) {
        let ch = &mut self.servers.channel;
        let Some(key) = ch.key.as_mut() else {
            return;
        };
        let Ok(d) = key.seal_to_vec(msg, txid, None) else {
            return;
        };
        let Ok(prefix) = stream::frame_prefix(d.len()) else {
            return;
        };
        let needed = ch
            .out
            .len()
            .saturating_add(prefix.len())
            .saturating_add(d.len());
        if needed > MAX_STREAM_OUT {
            return;
        }
        ch.out.extend_from_slice(&prefix);
        ch.out.extend_from_slice(&d);
    }

    /// Sends the subscription on an open connection once the node is registered.
    pub(super) fn ns_subscribe_if_ready<R: RngCore + CryptoRng>(&mut self, now: Time, rng: &mut R) {
        if self.servers.channel.state != Channel::Open(None) {
            return;
        }
        let Some(r) = self.registrar.as_ref().filter(|r| r.is_registered()) else {
            return;
        };
        let msg: Message = NotificationSubscribe {
            node_fqdn: r.node_fqdn().clone(),
            extensions: Extensions::none(),
        }
        .into();
        let txid = rng.next_u32();
        self.ns_write(&msg, txid);
        self.servers.channel.state = Channel::Open(Some((txid, now)));
    }

    /// Asks for a connection when one is due.
    fn ns_connect_if_due(&mut self, now: Time) {
        let local = self.config.local_addrs.clone();
        let ch = &mut self.servers.channel;
        let Channel::Waiting(at) = ch.state else {
            return;
        };
        if at > now {
            return;
        }
        // Rotate through the NS addresses the node can reach.
        let usable: Vec<SocketAddr> = ch
            .ns_addrs
            .iter()
            .copied()
            .filter(|a| local.iter().any(|l| l.is_ipv6() == a.is_ipv6()))
            .collect();
        let Some(addr) = usable.get(ch.next_addr % usable.len().max(1)).copied() else {
            ch.state = Channel::Off;
            return;
        };
        ch.next_addr = ch.next_addr.wrapping_add(1);
        ch.inbuf.clear();
        ch.out.clear();
        ch.commands.push_back(NsCommand::Connect(addr));
        ch.state = Channel::Connecting(now);
    }

    /// The channel is gone: UDP keep-alives resume and a reconnection waits for the back-off.
    fn ns_channel_lost(&mut self, now: Time, close: bool) {
        let t = self.config.timers;
        let ch = &mut self.servers.channel;
        let was_up = matches!(ch.state, Channel::Up { .. });
        if close {
            ch.commands.push_back(NsCommand::Close);
        }
        ch.inbuf.clear();
        ch.out.clear();
        ch.backoff = if ch.backoff.is_zero() {
            t.ns_backoff_min
        } else {
            ch.backoff.saturating_mul(2).min(t.ns_backoff_max)
        };
        ch.state = Channel::Waiting(now + ch.backoff);
        if let Some(r) = self.registrar.as_mut() {
            r.set_push_channel(false);
        }
        if was_up {
            self.event(NodeEvent::PushChannel { up: false });
        }
    }

    // -- Time ----------------------------------------------------------------------------------

    /// After any input: a registration may have completed, so the subscription can go.
    pub(super) fn servers_after_input<R: RngCore + CryptoRng>(&mut self, now: Time, rng: &mut R) {
        self.ns_subscribe_if_ready(now, rng);
    }

    pub(super) fn servers_timeout<R: RngCore + CryptoRng>(&mut self, now: Time, rng: &mut R) {
        self.cache_timeout(now, rng);
        let t = self.config.timers;
        match self.servers.channel.state {
            Channel::Off | Channel::Open(None) => {}
            Channel::Waiting(_) => self.ns_connect_if_due(now),
            Channel::Connecting(since) | Channel::Open(Some((_, since))) => {
                if since + t.ns_reply_wait <= now {
                    self.ns_channel_lost(now, true);
                }
            }
            Channel::Up {
                next_keepalive,
                awaiting,
            } => {
                if awaiting.is_some_and(|(_, sent)| sent + t.ns_reply_wait <= now) {
                    self.ns_channel_lost(now, true);
                } else if next_keepalive <= now {
                    let txid = rng.next_u32();
                    let msg: Message = Keepalive {
                        reply_requested: true,
                        extensions: Extensions::none(),
                    }
                    .into();
                    self.ns_write(&msg, txid);
                    self.servers.channel.state = Channel::Up {
                        next_keepalive: now + t.ns_keepalive,
                        awaiting: awaiting.or(Some((txid, now))),
                    };
                }
            }
        }
        self.servers_after_input(now, rng);
    }

    fn cache_timeout<R: RngCore + CryptoRng>(&mut self, now: Time, rng: &mut R) {
        let cfg = self.config.retransmit;
        let Some(c) = self.servers.cache.as_mut() else {
            return;
        };
        let mut resend = Vec::new();
        let mut failed = Vec::new();
        for (txid, s) in c.stores.iter_mut() {
            match s.tx.on_timeout(now, &cfg, rng) {
                Expiry::NotDue => {}
                Expiry::Retransmit => resend.push((*txid, s.msg.clone())),
                Expiry::Failed => failed.push(*txid),
            }
        }
        let mut fetch_failed = false;
        if let Some(f) = c.fetch.as_mut() {
            match f.tx.on_timeout(now, &cfg, rng) {
                Expiry::NotDue => {}
                Expiry::Retransmit => {
                    // The CS answers it with every unacknowledged blob again: a new batch.
                    f.batch.clear();
                    resend.push((f.tx.txid(), fetch_msg(f.acked)));
                }
                Expiry::Failed => fetch_failed = true,
            }
        }
        if fetch_failed {
            c.fetch = None;
            c.again = false;
        }
        let failed: Vec<Store> = failed.iter().filter_map(|t| c.stores.remove(t)).collect();
        for (txid, msg) in resend {
            self.send_to_cs(&msg, txid);
        }
        for s in failed {
            self.event(NodeEvent::Error(NodeError::CacheStore {
                peer: s.peer,
                code: None,
            }));
        }
        if fetch_failed {
            self.event(NodeEvent::Error(NodeError::CacheFetch { code: None }));
        }
    }

    /// The earliest deadline of the CS requests and the push channel.
    pub(super) fn servers_deadline(&self) -> Option<(Time, &'static str)> {
        let t = self.config.timers;
        let channel = match self.servers.channel.state {
            Channel::Off | Channel::Open(None) => None,
            Channel::Waiting(at) => Some((at, "NS channel reconnect")),
            Channel::Connecting(since) => Some((since + t.ns_reply_wait, "NS connect wait")),
            Channel::Open(Some((_, sent))) => {
                Some((sent + t.ns_reply_wait, "NS subscription answer wait"))
            }
            Channel::Up {
                next_keepalive,
                awaiting,
            } => match awaiting {
                Some((_, sent)) if sent + t.ns_reply_wait < next_keepalive => {
                    Some((sent + t.ns_reply_wait, "NS keep-alive reply wait"))
                }
                _ => Some((next_keepalive, "NS channel keep-alive")),
            },
        };
        let cache = self.servers.cache.as_ref().and_then(|c| {
            c.stores
                .values()
                .map(|s| s.tx.deadline())
                .chain(c.fetch.as_ref().map(|f| f.tx.deadline()))
                .min()
                .map(|at| (at, "CS request retransmission"))
        });
        [channel, cache]
            .into_iter()
            .flatten()
            .min_by_key(|(at, _)| *at)
    }
}

impl CacheClient {
    fn fetch_txid(&self) -> Option<u32> {
        self.fetch.as_ref().map(|f| f.tx.txid())
    }
}

fn fetch_msg(acked: u64) -> Message {
    CacheFetch {
        max_items: FETCH_BATCH,
        acknowledged_through: acked,
        extensions: Extensions::none(),
    }
    .into()
}

// MAX_SIGNALING_LEN bounds a frame; the prefix check in `handle_ns_stream` relies on it.
const _: () = assert!(MAX_SIGNALING_LEN <= u16::MAX as usize);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::login::{LoginConfig, Session};
    use crate::node::NodeConfig;
    use crate::registration::{Registrar, RegistrarConfig};
    use ntm_wire::crypto::x25519_public;
    use ntm_wire::{
        Account, AddrList, KeepaliveReply, RegistrationResponse, RouteDirection, RouteKind,
        RouteReason, SecretKey, TransportAddr, TunnelRole,
    };
    use rand_chacha::ChaCha8Rng;
    use rand_core::SeedableRng;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const KEY_ID: u32 = 0x5e55;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn fqdn(s: &str) -> Fqdn {
        Fqdn::new(s).unwrap()
    }

    fn k_nd() -> SecretKey {
        SecretKey::from_bytes([0x3d; 32])
    }

    const LOCAL: &str = "192.168.1.2:5000";
    const PUBLIC: &str = "198.51.100.7:41000";
    const DC: &str = "203.0.113.10:4281";
    const CS: &str = "203.0.113.30:4283";
    const NS: &str = "203.0.113.31:4284";

    /// A node with a session (as if logged in), and the DC's, CS's and NS's ends of its keys.
    struct Bench {
        node: Node,
        rng: ChaCha8Rng,
        now: Time,
        dc: SignalingKey,
        cs: SignalingKey,
        ns: SignalingKey,
        /// Bytes the node wrote to the NS, not yet read by the test.
        stream: Vec<u8>,
    }

    impl Bench {
        fn new(push: bool) -> Bench {
            let login = LoginConfig::new(
                Account::new("me@dc1.example").unwrap(),
                [1; 32],
                addr("203.0.113.2:4280"),
            );
            let mut config =
                NodeConfig::new(login, vec![addr(LOCAL)], SecretKey::from_bytes([0x44; 32]));
            config.wants_notification = push;
            let mut b = Bench {
                node: Node::new(config, b"pw").unwrap(),
                rng: ChaCha8Rng::seed_from_u64(3),
                now: Time::ZERO,
                dc: SignalingKey::new(&k_nd(), KEY_ID, Role::B),
                cs: SignalingKey::new(&node_cs_key(&k_nd()), KEY_ID, Role::B),
                ns: SignalingKey::new(&node_ns_key(&k_nd()), KEY_ID, Role::B),
                stream: Vec::new(),
            };
            let session = Session {
                node_fqdn: fqdn("me.dc1.example"),
                session_key_id: KEY_ID,
                node_dc_key: k_nd(),
                dc_fqdn: fqdn("dc1.example"),
                dc_addrs: vec![addr(DC)],
                ns_addrs: vec![addr(NS)],
                cs_addrs: vec![addr(CS)],
                keepalive_interval: Duration::from_secs(25),
                lifetime: Duration::from_secs(86_400),
                established_at: Time::ZERO,
            };
            // What the login does on LOGIN_RESPONSE (the login itself is tested elsewhere).
            let rc = RegistrarConfig {
                local_addrs: vec![addr(LOCAL)],
                public_key: b.node.static_public,
                wants_notification: push,
                retransmit: b.node.config.retransmit,
            };
            let mut r = Registrar::new(rc, &session).unwrap();
            r.register(b.now, &mut b.rng);
            b.node.registrar = Some(r);
            b.node.session = Some(session);
            b.node.servers_logged_in(b.now);
            b
        }

        /// Datagrams the node sends: (to, bytes).
        fn sent(&mut self) -> Vec<(SocketAddr, Vec<u8>)> {
            let mut buf = [0u8; MAX_SIGNALING_LEN];
            let mut out = Vec::new();
            while let Some(t) = self.node.poll_transmit(self.now, &mut buf) {
                out.push((t.dst, buf[..t.len].to_vec()));
            }
            let mut sbuf = [0u8; 100];
            loop {
                let n = self.node.poll_ns_stream(&mut sbuf);
                if n == 0 {
                    break;
                }
                self.stream.extend_from_slice(&sbuf[..n]);
            }
            out
        }

        /// The frames the node wrote to the NS since the last call, opened.
        fn frames(&mut self) -> Vec<(u32, Message)> {
            self.sent_keep();
            let mut out = Vec::new();
            while let Ok(Some((s, e))) = stream::next_frame(&self.stream) {
                let mut d = self.stream[s..e].to_vec();
                self.stream.drain(..e);
                let (h, m) = self.ns.open(&mut d).unwrap();
                out.push((h.envelope.txid, m));
            }
            out
        }

        /// Collects stream bytes without losing datagrams (they are re-queued as nothing: the
        /// tests that read frames read datagrams separately first).
        fn sent_keep(&mut self) {
            let mut sbuf = [0u8; 100];
            loop {
                let n = self.node.poll_ns_stream(&mut sbuf);
                if n == 0 {
                    break;
                }
                self.stream.extend_from_slice(&sbuf[..n]);
            }
        }

        fn events(&mut self) -> Vec<NodeEvent> {
            std::iter::from_fn(|| self.node.poll_event()).collect()
        }

        fn deliver(&mut self, from: &str, mut d: Vec<u8>) {
            self.node
                .handle_datagram(self.now, addr(LOCAL), addr(from), &mut d, &mut self.rng);
        }

        fn dc_sends(&mut self, msg: &Message, txid: u32) {
            let d = self.dc.seal_to_vec(msg, txid, None).unwrap();
            self.deliver(DC, d);
        }

        fn cs_sends(&mut self, msg: &Message, txid: u32) {
            let d = self.cs.seal_to_vec(msg, txid, None).unwrap();
            self.deliver(CS, d);
        }

        fn push_frame(&mut self, msg: &Message, txid: u32, split: bool) {
            let d = self.ns.seal_to_vec(msg, txid, None).unwrap();
            let mut bytes = stream::frame_prefix(d.len()).unwrap().to_vec();
            bytes.extend_from_slice(&d);
            if split {
                for b in bytes {
                    self.node.handle_ns_stream(self.now, &[b], &mut self.rng);
                }
            } else {
                self.node.handle_ns_stream(self.now, &bytes, &mut self.rng);
            }
        }

        fn advance_to(&mut self, t: Time) -> Vec<(SocketAddr, Vec<u8>)> {
            let mut out = Vec::new();
            while let Some((at, _)) = self.node.poll_timeout() {
                if at > t {
                    break;
                }
                self.now = at;
                self.node.handle_timeout(at, &mut self.rng);
                out.extend(self.sent());
            }
            self.now = t;
            out
        }

        /// Answers the node's REGISTRATION_REQUEST as its DC would (behind a NAT: keep-alive
        /// every 25 s).
        fn registered(&mut self) {
            let sent = self.sent();
            let (_, mut req) = sent
                .into_iter()
                .find(|(to, _)| *to == addr(DC))
                .expect("a registration request");
            let (h, m) = self.dc.open(&mut req).unwrap();
            assert!(matches!(m, Message::RegistrationRequest(_)), "{m:?}");
            let resp: Message = RegistrationResponse {
                virtual_v4: Ipv4Addr::new(100, 64, 1, 9),
                virtual_v6: Ipv6Addr::LOCALHOST,
                observed_addr: TransportAddr::new(addr(PUBLIC)),
                lifetime_s: 600,
                keepalive_interval_s: 25,
                extensions: Extensions::none(),
            }
            .into();
            self.dc_sends(&resp, h.envelope.txid);
        }

        /// Opens what went to the CS.
        fn sent_to_cs(&mut self, sent: &[(SocketAddr, Vec<u8>)]) -> Vec<(u32, Message)> {
            sent.iter()
                .filter(|(to, _)| *to == addr(CS))
                .map(|(_, d)| {
                    let mut d = d.clone();
                    let (h, m) = self.cs.open(&mut d).unwrap();
                    (h.envelope.txid, m)
                })
                .collect()
        }
    }

    fn cached_data(item_id: u64, remaining: u16, blob: &[u8]) -> Message {
        CacheData {
            item_id,
            sender_fqdn: fqdn("alice.dc1.example"),
            age_s: 5,
            remaining,
            blob: Blob::new(blob.to_vec()).unwrap(),
            extensions: Extensions::none(),
        }
        .into()
    }

    /// A blob sealed to the bench node's static key.
    fn blob_for_node(text: &[u8]) -> Vec<u8> {
        let public = x25519_public(&[0x44; 32]);
        seal_box(&public, &[0x77; 32], text).unwrap()
    }

    fn announce(b: &mut Bench, txid: u32) -> Vec<(SocketAddr, Vec<u8>)> {
        let n: Message = Notification {
            node_key_id: KEY_ID,
            reason: NotifyReason::CachedData,
            payload: Blob::default(),
            extensions: Extensions::none(),
        }
        .into();
        b.dc_sends(&n, txid);
        b.sent()
    }

    fn fetch_of(m: &Message) -> u64 {
        match m {
            Message::CacheFetch(f) => {
                assert_eq!(f.max_items, FETCH_BATCH);
                f.acknowledged_through
            }
            other => panic!("not a CACHE_FETCH: {other:?}"),
        }
    }

    fn data_events(events: &[NodeEvent]) -> Vec<Vec<u8>> {
        events
            .iter()
            .filter_map(|e| match e {
                NodeEvent::CachedData { from, data } => {
                    assert_eq!(*from, fqdn("alice.dc1.example"));
                    Some(data.clone())
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn data_left_for_an_offline_peer_is_sealed_to_its_key_and_retransmitted_until_the_cs_acks() {
        let mut b = Bench::new(false);
        b.registered();
        let peer = fqdn("bob.dc1.example");
        let bob_secret = [0x55; 32];
        assert_eq!(
            b.node
                .leave_for_offline_peer(b.now, &peer, b"hi", &mut b.rng),
            Err(CacheStoreError::UnknownPeer)
        );
        b.node
            .remember_offline_key(&peer, x25519_public(&bob_secret));
        assert_eq!(
            b.node
                .leave_for_offline_peer(b.now, &peer, &[0; 853], &mut b.rng),
            Err(CacheStoreError::TooLarge)
        );
        b.node
            .leave_for_offline_peer(b.now, &peer, b"see you later", &mut b.rng)
            .unwrap();
        let sent = b.sent();
        let stores = b.sent_to_cs(&sent);
        let [(txid, Message::CacheStore(s))] = stores.as_slice() else {
            panic!("{stores:?}");
        };
        assert_eq!(s.recipient_fqdn, peer);
        assert_eq!(s.ttl_s, 0);
        assert_eq!(
            open_box(&bob_secret, s.blob.as_bytes()).unwrap(),
            b"see you later"
        );
        let txid = *txid;
        // No answer: the same request again, same transaction ID.
        let later = b.advance_to(b.now + Duration::from_millis(400));
        let again = b.sent_to_cs(&later);
        assert!(
            matches!(again.as_slice(), [(t, Message::CacheStore(_))] if *t == txid),
            "{again:?}"
        );
        let ack: Message = Ack {
            acked_type: MessageType::CacheStore.to_u8(),
            extensions: Extensions::none(),
        }
        .into();
        b.cs_sends(&ack, txid);
        assert!(b
            .events()
            .contains(&NodeEvent::CacheStored { peer: peer.clone() }));
        let rest = b.advance_to(b.now + Duration::from_secs(20));
        assert!(b.sent_to_cs(&rest).is_empty());
    }

    #[test]
    fn a_fetch_hands_each_blob_over_once_and_acknowledges_only_through_a_gap() {
        let mut b = Bench::new(false);
        b.registered();
        b.events();
        let sent = announce(&mut b, 0x77);
        // ACK to the DC, CACHE_FETCH(0) to the CS.
        let to_dc: Vec<Message> = sent
            .iter()
            .filter(|(to, _)| *to == addr(DC))
            .map(|(_, d)| b.dc.open(&mut d.clone()).unwrap().1)
            .collect();
        assert!(
            matches!(to_dc.as_slice(), [Message::Ack(a)] if a.acked_type == 0x3c),
            "{to_dc:?}"
        );
        let fetches = b.sent_to_cs(&sent);
        let [(txid, f)] = fetches.as_slice() else {
            panic!("{fetches:?}");
        };
        assert_eq!(fetch_of(f), 0);
        // Items 1 and 3 arrive, 2 is lost: remaining 2 then 0 shows the gap.
        let txid = *txid;
        b.cs_sends(&cached_data(1, 2, &blob_for_node(b"one")), txid);
        b.cs_sends(&cached_data(3, 0, &blob_for_node(b"three")), txid);
        let events = b.events();
        assert_eq!(data_events(&events), [b"one".to_vec(), b"three".to_vec()]);
        let sent = b.sent();
        let next = b.sent_to_cs(&sent);
        let [(txid2, f)] = next.as_slice() else {
            panic!("{next:?}");
        };
        assert_eq!(fetch_of(f), 1, "acknowledged through the gap only");
        // The CS sends what it still holds: 2 is new, 3 is dropped as already processed.
        let txid2 = *txid2;
        b.cs_sends(&cached_data(2, 1, &blob_for_node(b"two")), txid2);
        b.cs_sends(&cached_data(3, 0, &blob_for_node(b"three")), txid2);
        assert_eq!(data_events(&b.events()), [b"two".to_vec()]);
        let sent = b.sent();
        let last = b.sent_to_cs(&sent);
        let [(txid3, f)] = last.as_slice() else {
            panic!("{last:?}");
        };
        assert_eq!(fetch_of(f), 3);
        // Nothing more held: the CS's ACK ends the fetch.
        let ack: Message = Ack {
            acked_type: MessageType::CacheFetch.to_u8(),
            extensions: Extensions::none(),
        }
        .into();
        b.cs_sends(&ack, *txid3);
        assert!(b.sent().is_empty());
        let rest = b.advance_to(b.now + Duration::from_secs(20));
        assert!(
            b.sent_to_cs(&rest).is_empty(),
            "fetching after the CS said nothing is held"
        );
        // The DC's retransmitted announcement is ACKed again but fetches nothing.
        let again = announce(&mut b, 0x77);
        assert!(b.sent_to_cs(&again).is_empty());
        assert_eq!(again.len(), 1);
    }

    #[test]
    fn a_batch_whose_first_blob_may_be_lost_is_acknowledged_only_once_confirmed() {
        let mut b = Bench::new(false);
        b.registered();
        let sent = announce(&mut b, 1);
        let txid = b.sent_to_cs(&sent)[0].0;
        // Only item 2 arrives (1 was lost, or expired: the node cannot tell).
        b.cs_sends(&cached_data(2, 0, &blob_for_node(b"two")), txid);
        let sent = b.sent();
        let next = b.sent_to_cs(&sent);
        assert_eq!(fetch_of(&next[0].1), 0, "not acknowledged on a guess");
        // Fetched again, the CS shows item 1 was only lost.
        let txid = next[0].0;
        b.cs_sends(&cached_data(1, 1, &blob_for_node(b"one")), txid);
        b.cs_sends(&cached_data(2, 0, &blob_for_node(b"two")), txid);
        assert_eq!(data_events(&b.events()), [b"two".to_vec(), b"one".to_vec()]);
        let sent = b.sent();
        let next = b.sent_to_cs(&sent);
        assert_eq!(fetch_of(&next[0].1), 2);
        // An item that expired at the CS (5 held after 2): acknowledged once seen twice.
        let txid = next[0].0;
        b.cs_sends(&cached_data(5, 0, &blob_for_node(b"five")), txid);
        let sent = b.sent();
        let next = b.sent_to_cs(&sent);
        assert_eq!(fetch_of(&next[0].1), 2);
        let txid = next[0].0;
        b.cs_sends(&cached_data(5, 0, &blob_for_node(b"five")), txid);
        let sent = b.sent();
        let next = b.sent_to_cs(&sent);
        assert_eq!(fetch_of(&next[0].1), 5);
        assert_eq!(data_events(&b.events()), [b"five".to_vec()]);
    }

    #[test]
    fn the_push_channel_subscribes_once_registered_and_replaces_udp_keep_alives() {
        let mut b = Bench::new(true);
        assert_eq!(b.node.poll_ns_command(), Some(NsCommand::Connect(addr(NS))));
        b.node.ns_connected(b.now, &mut b.rng);
        assert!(
            b.frames().is_empty(),
            "no subscription before the registration"
        );
        b.registered();
        let frames = b.frames();
        let [(sub, Message::NotificationSubscribe(s))] = frames.as_slice() else {
            panic!("{frames:?}");
        };
        assert_eq!(s.node_fqdn, fqdn("me.dc1.example"));
        let ack: Message = Ack {
            acked_type: MessageType::NotificationSubscribe.to_u8(),
            extensions: Extensions::none(),
        }
        .into();
        b.push_frame(&ack, *sub, true);
        assert!(b.node.ns_channel_up());
        assert!(b.events().contains(&NodeEvent::PushChannel { up: true }));
        // Behind a NAT (keepalive_interval_s = 25) yet silent towards the DC for 5 min.
        let start = b.now;
        let quiet = b.advance_to(start + Duration::from_secs(299));
        let udp_keepalives = |sent: &[(SocketAddr, Vec<u8>)]| {
            sent.iter()
                .filter(|(to, d)| {
                    *to == addr(DC) && d.first() == Some(&MessageType::Keepalive.to_u8())
                })
                .count()
        };
        assert_eq!(udp_keepalives(&quiet), 0, "{quiet:?}");
        // The channel's own KEEPALIVE at 5 min.
        b.advance_to(start + Duration::from_secs(300));
        let frames = b.frames();
        assert!(
            matches!(frames.as_slice(), [(_, Message::Keepalive(k))] if k.reply_requested),
            "{frames:?}"
        );
        let ka = frames[0].0;
        let reply: Message = KeepaliveReply {
            observed_addr: TransportAddr::new(addr(PUBLIC)),
            extensions: Extensions::none(),
        }
        .into();
        b.push_frame(&reply, ka, false);
        // The next one goes unanswered: 30 s later the channel is down, UDP keep-alives resume
        // at once, and the node reconnects after 1 s.
        b.advance_to(start + Duration::from_secs(600));
        assert_eq!(b.frames().len(), 1);
        let down = b.advance_to(start + Duration::from_secs(630));
        assert!(!b.node.ns_channel_up());
        assert_eq!(b.node.poll_ns_command(), Some(NsCommand::Close));
        assert!(b.events().contains(&NodeEvent::PushChannel { up: false }));
        // UDP to the DC resumes: keep-alives, or the registration refresh this harness leaves
        // unanswered (the node retries it), which keeps the NAT mapping open as well.
        let to_dc = down
            .iter()
            .filter(|(to, d)| {
                *to == addr(DC)
                    && [MessageType::Keepalive, MessageType::RegistrationRequest]
                        .iter()
                        .any(|t| d.first() == Some(&t.to_u8()))
            })
            .count();
        assert!(to_dc >= 1, "{down:?}");
        b.advance_to(start + Duration::from_secs(631));
        assert_eq!(b.node.poll_ns_command(), Some(NsCommand::Connect(addr(NS))));
    }

    #[test]
    fn a_pushed_notification_is_acked_on_the_channel_and_its_payload_taken_as_from_the_dc() {
        let mut b = Bench::new(true);
        b.node.poll_ns_command();
        b.node.ns_connected(b.now, &mut b.rng);
        b.registered();
        let sub = b.frames()[0].0;
        let ack: Message = Ack {
            acked_type: MessageType::NotificationSubscribe.to_u8(),
            extensions: Extensions::none(),
        }
        .into();
        b.push_frame(&ack, sub, false);
        b.events();
        // The DC's ROUTE_DIRECTION(Offline) for the node, sealed under K_nd, inside the push.
        let rd: Message = RouteDirection {
            path_id: 0,
            route: RouteKind::Offline,
            role: TunnelRole::Initiator,
            reason: RouteReason::Reachable,
            peer_fqdn: fqdn("bob.dc1.example"),
            peer_virtual_v4: Ipv4Addr::new(100, 64, 1, 3),
            peer_virtual_v6: Ipv6Addr::LOCALHOST,
            peer_public_key: [0x66; 32],
            peer_addrs: AddrList::empty(),
            relay_addrs: AddrList::empty(),
            tunnel_credential: SecretKey::from_bytes([0; 32]),
            relay_key: None,
            probe_direct: false,
            lifetime_s: 0,
            extensions: Extensions::none(),
        }
        .into();
        let inner = b.dc.seal_to_vec(&rd, 0xd1, None).unwrap();
        let push: Message = Notification {
            node_key_id: KEY_ID,
            reason: NotifyReason::IncomingTunnel,
            payload: Blob::new(inner).unwrap(),
            extensions: Extensions::none(),
        }
        .into();
        b.push_frame(&push, 0x99, true);
        let frames = b.frames();
        assert!(
            matches!(frames.as_slice(), [(0x99, Message::Ack(a))] if a.acked_type == 0x3c),
            "{frames:?}"
        );
        // The direction is answered to the DC over UDP, and acted on.
        let sent = b.sent();
        let answers: Vec<(u32, Message)> = sent
            .iter()
            .filter(|(to, _)| *to == addr(DC))
            .map(|(_, d)| {
                let (h, m) = b.dc.open(&mut d.clone()).unwrap();
                (h.envelope.txid, m)
            })
            .collect();
        assert!(
            matches!(answers.as_slice(), [(0xd1, Message::Ack(a))] if a.acked_type == 0x35),
            "{answers:?}"
        );
        assert!(b.events().contains(&NodeEvent::PeerOffline {
            peer: fqdn("bob.dc1.example"),
            public_key: [0x66; 32],
        }));
        assert_eq!(
            b.node.offline_peer_key(&fqdn("bob.dc1.example")),
            Some([0x66; 32])
        );
        // A frame that does not authenticate closes the channel.
        let mut bad = b.ns.seal_to_vec(&ack, 1, None).unwrap();
        if let Some(last) = bad.last_mut() {
            *last ^= 1;
        }
        let mut bytes = stream::frame_prefix(bad.len()).unwrap().to_vec();
        bytes.extend_from_slice(&bad);
        b.node.handle_ns_stream(b.now, &bytes, &mut b.rng);
        assert!(!b.node.ns_channel_up());
        assert_eq!(b.node.poll_ns_command(), Some(NsCommand::Close));
    }
}
