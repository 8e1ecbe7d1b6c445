//! The notification server (NS) as a sans-IO state machine: the TCP push channel that lets a
//! node drop its UDP keep-alives and still be woken by its DC (spec/05-procedures.md §5.2 steps
//! 8-12, §5.4 "NS channel", §5.5.4).
//!
//! ```text
//! DC                          NS                                   node
//!  | NOTIFICATION_REGISTRATION [K_ds] (node_key_id, K_ns, lifetime) |
//!  |-------------------------->|                                    |
//!  | ACK                       |      NOTIFICATION_SUBSCRIBE [K_ns] |
//!  |<--------------------------|<===================================| first frame on the connection
//!  |                           | ACK [K_ns]                         |
//!  |                           |===================================>|
//!  |                           |   KEEPALIVE(reply_requested) [K_ns]|
//!  |                           |<===================================| every 5 min
//!  |                           | KEEPALIVE_REPLY(observed_addr)     |
//!  |                           |===================================>|
//!  | NOTIFICATION [K_ds]       |                                    |
//!  |-------------------------->| NOTIFICATION [K_ns], same fields   |
//!  | ACK, or ERROR NotFound    |===================================>|
//!  |<--------------------------| ACK [K_ns]                         |
//!  |                           |<===================================|
//! ```
//!
//! `---->` is UDP, `====>` a frame on the TCP channel: a `u16` length (1 to 1232) and one
//! signaling datagram ([`ntm_wire::signaling::stream`]).
//!
//! # Driving it
//!
//! UDP from the DC: [`NotificationServer::handle_datagram`], answers from
//! [`NotificationServer::poll_transmit`]. TCP: the runtime accepts connections itself and names
//! each with a [`ConnId`] of its choosing, then
//!
//! * [`NotificationServer::open_connection`] when one is accepted (false: close it at once);
//! * [`NotificationServer::handle_stream`] with whatever bytes it read, split anywhere: partial
//!   frames are buffered (at most one frame, 1234 bytes, per connection);
//! * [`NotificationServer::stream_pending`] and [`NotificationServer::stream_consumed`] to write
//!   what the NS has for a connection as the socket accepts it (or
//!   [`NotificationServer::poll_stream_transmit`], which copies and consumes in one call, for a
//!   runtime that keeps what its socket did not take);
//! * [`NotificationServer::close_connection`] when a connection is gone, whoever closed it.
//!
//! On [`NsEvent::CloseConnection`] the runtime writes what is still pending for that connection
//! (a last ERROR), closes it, and calls `close_connection`. The NS reads nothing more from a
//! connection it asked to close. Call [`NotificationServer::handle_timeout`] when the deadline
//! of [`NotificationServer::poll_timeout`] has passed. After each input drain
//! [`NotificationServer::poll_event`] first, then the UDP and stream output, until only a
//! timeout is left; a [`NsEvent::SequenceReserved`] must be made durable before any datagram
//! polled after it is sent (spec/04 §4.7).
//!
//! # What it keeps
//!
//! * The DC↔NS key from configuration and at most one the DC distributed to replace it
//!   (KEY_DISTRIBUTION(DcNs)).
//! * One **registration** per node session (NOTIFICATION_REGISTRATION), at most
//!   [`NsLimits::max_registrations`]: the node's FQDN, K_ns with a replay window, its expiry
//!   (`lifetime_s`; then the expired-key grace, in which the node's requests draw ERROR
//!   Expired) and the connection subscribed under it.
//! * One **connection** per accepted TCP connection, at most [`NsLimits::max_connections`]: its
//!   partial frame, the bytes waiting to be written (at most [`NsLimits::max_write_buffer`]; a
//!   peer that does not read is closed), and the NOTIFICATIONs the node has not ACKed yet (at
//!   most [`NsLimits::max_pending_per_node`]). Each connection has one deadline: the
//!   subscription (the first frame must be a NOTIFICATION_SUBSCRIBE within
//!   [`NsLimits::subscribe_timeout`]), a frame begun and not finished within
//!   [`NsLimits::frame_timeout`], a subscribed channel silent for [`NsLimits::idle_timeout`], or
//!   a NOTIFICATION not ACKed within [`NsLimits::notification_ack_timeout`]. When it passes, the
//!   connection is closed.
//! * One channel per node name: a newer subscription for the same FQDN, under any of its
//!   sessions, replaces (closes) the older connection.
//! * The answers to the DC's NOTIFICATIONs for 30 s, so that a retransmission is answered again
//!   and not pushed twice.
//!
//! Frames that fail the header checks, the stream framing or authentication close the
//! connection: on a TCP stream they mean corruption or an attack, and nothing later on that
//! stream can be trusted. An authenticated frame that does not decode is answered with ERROR
//! Malformed on the channel.

use core::fmt;
use core::time::Duration;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;

use ntm_wire::signaling::stream;
use ntm_wire::{
    ErrorCode, Extensions, Fqdn, Header, KeepaliveReply, KeyDistribution, KeyRole, Message,
    MessageType, NotificationRegistration, Role, SecretKey, TransportAddr,
};
use rand_core::{CryptoRng, RngCore};

use crate::cs::{ack_msg, error_msg, undecodable_code, DcKeyRing, Installed};
use crate::signaling::{
    server_intake, unsealed_error, DropCounters, DropReason, ServerOutput, SignalingKey, Transmit,
};
use crate::time::Time;

/// A TCP connection, named by the runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

/// Every bound on the NS's memory and work, and its timers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NsLimits {
    /// Registrations held (those in grace included); beyond it NOTIFICATION_REGISTRATION is
    /// refused with ERROR Unavailable.
    pub max_registrations: usize,
    /// Connections open (subscribed or not, and those the NS asked the runtime to close).
    pub max_connections: usize,
    /// Bytes waiting to be written to one connection; a frame that would exceed it closes the
    /// connection.
    pub max_write_buffer: usize,
    /// NOTIFICATIONs pushed to one node and not yet ACKed; beyond it the DC's NOTIFICATION is
    /// refused with ERROR Unavailable.
    pub max_pending_per_node: usize,
    /// Answers to the DC's NOTIFICATIONs remembered for retransmissions.
    pub max_answers: usize,
    /// How long such an answer is remembered: 30 s.
    pub answer_kept: Duration,
    /// How long a connection may stay without a subscription.
    pub subscribe_timeout: Duration,
    /// How long a frame may take to arrive once its first byte has.
    pub frame_timeout: Duration,
    /// How long a subscribed channel may stay silent. The node's KEEPALIVE interval is 5 min
    /// by default and at most 30 min (spec/07 §7.2).
    pub idle_timeout: Duration,
    /// How long a pushed NOTIFICATION may wait for the node's ACK before the channel is
    /// presumed dead: 30 s (the NS channel reply wait of spec/07 §7.2).
    pub notification_ack_timeout: Duration,
    /// How long an expired registration is kept to answer ERROR Expired: 10 min.
    pub expired_key_grace: Duration,
    /// Unsealed ERRORs per source prefix (IPv4 /24, IPv6 /64) per second: 10.
    pub unsealed_errors_per_second: u32,
    pub max_tracked_prefixes: usize,
    pub max_queued_transmits: usize,
    pub max_queued_events: usize,
    /// Sequence numbers reserved at a time under the configured DC↔NS key (spec/04 §4.7).
    pub sequence_block: u64,
}

impl Default for NsLimits {
    fn default() -> Self {
        NsLimits {
            max_registrations: 65_536,
            max_connections: 65_536,
            max_write_buffer: 16 * 1024,
            max_pending_per_node: 8,
            max_answers: 4096,
            answer_kept: Duration::from_secs(30),
            subscribe_timeout: Duration::from_secs(30),
            frame_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(31 * 60),
            notification_ack_timeout: Duration::from_secs(30),
            expired_key_grace: Duration::from_secs(600),
            unsealed_errors_per_second: 10,
            max_tracked_prefixes: 4096,
            max_queued_transmits: 1024,
            max_queued_events: 1024,
            sequence_block: 1 << 16,
        }
    }
}

/// The NS's configuration.
#[derive(Clone, Debug)]
pub struct NsConfig {
    /// The NS's configured FQDN: the subject of KEY_DISTRIBUTION(DcNs).
    pub fqdn: Fqdn,
    /// The pre-shared DC↔NS key.
    pub dc_key: SecretKey,
    /// Its configured key ID: non-zero, top bit clear.
    pub dc_key_id: u32,
    /// The persisted high-water mark of the NS's sequence numbers under that key (0 when new).
    pub dc_high_water_mark: u64,
    pub limits: NsLimits,
}

impl NsConfig {
    /// The defaults of spec/07 for everything but the name and the DC's key.
    pub fn new(fqdn: Fqdn, dc_key: SecretKey, dc_key_id: u32) -> Self {
        NsConfig {
            fqdn,
            dc_key,
            dc_key_id,
            dc_high_water_mark: 0,
            limits: NsLimits::default(),
        }
    }
}

/// A configuration the NS refuses to run with.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum NsConfigError {
    /// The DC key ID is 0 or has the top bit set.
    InvalidDcKeyId(u32),
    /// The write buffer cannot hold one largest frame, or a timer is zero.
    InvalidLimit(&'static str),
}

impl fmt::Display for NsConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NsConfigError::InvalidDcKeyId(id) => {
                write!(
                    f,
                    "DC key ID {id:#x}: must be non-zero with the top bit clear"
                )
            }
            NsConfigError::InvalidLimit(which) => write!(f, "limit {which} is out of range"),
        }
    }
}

impl std::error::Error for NsConfigError {}

/// What the NS reports to its operator and its runtime.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum NsEvent {
    /// Write what [`NotificationServer::stream_pending`] still holds for the connection, then
    /// close it and call [`NotificationServer::close_connection`].
    CloseConnection(ConnId),
    /// A node subscribed: the connection is its push channel.
    Subscribed {
        fqdn: Fqdn,
        conn: ConnId,
        node_key_id: u32,
    },
    /// A node's push channel is gone (closed, replaced, timed out or expired).
    Unsubscribed { fqdn: Fqdn, conn: ConnId },
    /// A registration's lifetime ended; its channel is closed.
    RegistrationExpired { fqdn: Fqdn, node_key_id: u32 },
    /// The DC replaced the DC↔NS key (KEY_DISTRIBUTION(DcNs)).
    DcKeyReplaced { key_id: u32 },
    /// Persist `through` as the high-water mark under the configured DC↔NS key before sending
    /// any datagram polled after this event.
    SequenceReserved { key_id: u32, through: u64 },
}

struct Registration {
    fqdn: Fqdn,
    /// Kept to recognise a repeated NOTIFICATION_REGISTRATION (compared in constant time).
    secret: SecretKey,
    key: SignalingKey,
    /// The lifetime's end, or, once `expired`, the end of the grace.
    deadline: Time,
    expired: bool,
    conn: Option<ConnId>,
}

struct Conn {
    remote: SocketAddr,
    opened: Time,
    /// The registration (node key ID) it is subscribed under.
    bound: Option<u32>,
    /// The NS asked the runtime to close it: nothing more is read.
    closing: bool,
    /// The frame being received: its prefix and as much of it as has arrived.
    inbuf: Vec<u8>,
    frame_started: Option<Time>,
    last_heard: Time,
    /// Framed bytes waiting to be written.
    out: Vec<u8>,
    /// Pushed NOTIFICATIONs not yet ACKed: transaction ID and when they left.
    pending: VecDeque<(u32, Time)>,
    /// The deadline this connection has in the index.
    indexed: Option<Time>,
}

/// The connection timers, in the order `poll_timeout` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConnTimer {
    Subscribe,
    Frame,
    Idle,
    AckWait,
}

impl ConnTimer {
    fn label(self) -> &'static str {
        match self {
            ConnTimer::Subscribe => "subscription wait",
            ConnTimer::Frame => "partial frame",
            ConnTimer::Idle => "idle channel",
            ConnTimer::AckWait => "notification ack wait",
        }
    }
}

impl Conn {
    /// The connection's one deadline and which timer it is.
    fn deadline(&self, l: &NsLimits) -> Option<(Time, ConnTimer)> {
        if self.closing {
            return None;
        }
        let base = match self.bound {
            None => (self.opened + l.subscribe_timeout, ConnTimer::Subscribe),
            Some(_) => (self.last_heard + l.idle_timeout, ConnTimer::Idle),
        };
        let frame = self
            .frame_started
            .map(|t| (t + l.frame_timeout, ConnTimer::Frame));
        let ack = self
            .pending
            .front()
            .map(|(_, t)| (*t + l.notification_ack_timeout, ConnTimer::AckWait));
        [Some(base), frame, ack]
            .into_iter()
            .flatten()
            .min_by_key(|(t, _)| *t)
    }
}

/// What a deadline in the index belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Due {
    Conn(ConnId),
    Registration(u32),
    DcKey,
}

/// The notification server. See the [module documentation](self).
pub struct NotificationServer {
    config: NsConfig,
    dc_keys: DcKeyRing,
    registrations: BTreeMap<u32, Registration>,
    conns: BTreeMap<ConnId, Conn>,
    /// The subscribed channel of each node name.
    channels: BTreeMap<Fqdn, ConnId>,
    /// Connections with bytes to write.
    writable: BTreeSet<ConnId>,
    /// Answers to the DC's NOTIFICATIONs: key ID, transaction ID, when, the answer.
    answers: VecDeque<(u32, u32, Time, Message)>,
    deadlines: BTreeSet<(Time, Due)>,
    output: ServerOutput<NsEvent>,
    drops: DropCounters,
}

impl fmt::Debug for NotificationServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NotificationServer")
            .field("fqdn", &self.config.fqdn)
            .field("registrations", &self.registrations.len())
            .field("connections", &self.conns.len())
            .field("channels", &self.channels.len())
            .field("drops", &self.drops)
            .finish_non_exhaustive()
    }
}

/// A frame's fate: keep reading the connection, or close it.
type FrameResult = Result<(), DropReason>;

impl NotificationServer {
    /// Checks the configuration and starts with no registration and no connection.
    pub fn new(config: NsConfig) -> Result<Self, NsConfigError> {
        if config.dc_key_id == 0 || config.dc_key_id & 0x8000_0000 != 0 {
            return Err(NsConfigError::InvalidDcKeyId(config.dc_key_id));
        }
        let l = config.limits;
        if l.max_write_buffer < stream::FRAME_PREFIX_LEN + ntm_wire::MAX_SIGNALING_LEN {
            return Err(NsConfigError::InvalidLimit("max_write_buffer"));
        }
        for (d, name) in [
            (l.subscribe_timeout, "subscribe_timeout"),
            (l.frame_timeout, "frame_timeout"),
            (l.idle_timeout, "idle_timeout"),
            (l.notification_ack_timeout, "notification_ack_timeout"),
        ] {
            if d.is_zero() {
                return Err(NsConfigError::InvalidLimit(name));
            }
        }
        Ok(NotificationServer {
            dc_keys: DcKeyRing::new(
                &config.dc_key,
                config.dc_key_id,
                config.dc_high_water_mark,
                l.sequence_block,
            ),
            registrations: BTreeMap::new(),
            conns: BTreeMap::new(),
            channels: BTreeMap::new(),
            writable: BTreeSet::new(),
            answers: VecDeque::new(),
            deadlines: BTreeSet::new(),
            output: ServerOutput::new(
                l.max_queued_transmits,
                l.max_queued_events,
                l.unsealed_errors_per_second,
                l.max_tracked_prefixes,
            ),
            drops: DropCounters::default(),
            config,
        })
    }

    pub fn config(&self) -> &NsConfig {
        &self.config
    }

    /// Datagrams and frames dropped, by reason.
    pub fn drops(&self) -> &DropCounters {
        &self.drops
    }

    /// Events lost because the queue was full.
    pub fn events_lost(&self) -> u64 {
        self.output.events_lost()
    }

    /// Registrations held, those in grace included.
    pub fn registrations_held(&self) -> usize {
        self.registrations.len()
    }

    /// Connections tracked (closing ones included).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// The connection subscribed as `fqdn`'s push channel.
    pub fn channel_of(&self, fqdn: &Fqdn) -> Option<ConnId> {
        self.channels.get(fqdn).copied()
    }

    /// Bytes of a partial frame buffered for `conn`.
    pub fn buffered_input(&self, conn: ConnId) -> usize {
        self.conns.get(&conn).map_or(0, |c| c.inbuf.len())
    }

    // -- UDP from the DC -----------------------------------------------------------------------

    /// A datagram from the DC arrived at `local` from `remote`. `buf` is opened in place.
    pub fn handle_datagram<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        buf: &mut [u8],
        rng: &mut R,
    ) {
        if let Err(reason) = self.on_datagram(now, local, remote, buf, rng) {
            self.drops.record(&reason);
        }
    }

    fn on_datagram<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        buf: &mut [u8],
        rng: &mut R,
    ) -> Result<(), DropReason> {
        let header = self.output.intake(now, local, remote, buf, Role::B)?;
        let is_request = matches!(
            header.msg_type,
            MessageType::KeyDistribution
                | MessageType::NotificationRegistration
                | MessageType::Notification
        );
        if !is_request {
            return Err(DropReason::Unexpected);
        }
        let key_id = header.envelope.key_id;
        let txid = header.envelope.txid;
        let Some(key) = self.dc_keys.key_mut(key_id) else {
            if header.sealed {
                self.output
                    .unknown_key(now, local, remote, &header, Role::B);
            }
            return Err(DropReason::UnknownKey);
        };
        let (h, msg) = match key.open(buf) {
            Ok(opened) => opened,
            Err(DropReason::UndecodableBody(e)) => {
                let error = error_msg(undecodable_code(&e), header.msg_type);
                self.send_to_dc(local, remote, key_id, &error, txid);
                return Err(DropReason::UndecodableBody(e));
            }
            Err(e) => return Err(e),
        };
        if !h.sealed {
            return Err(DropReason::UnsealedHint);
        }
        if h.envelope.role != Role::A {
            return Err(DropReason::Unexpected);
        }
        let answer = match msg {
            Message::KeyDistribution(kd) => match self.take_dc_key(now, &kd) {
                Ok(()) => ack_msg(MessageType::KeyDistribution),
                Err(code) => error_msg(code, MessageType::KeyDistribution),
            },
            Message::NotificationRegistration(r) => match self.register(now, r) {
                Ok(()) => ack_msg(MessageType::NotificationRegistration),
                Err(code) => error_msg(code, MessageType::NotificationRegistration),
            },
            Message::Notification(n) => {
                let kept = self.config.limits.answer_kept;
                let again = self
                    .answers
                    .iter()
                    .find(|(k, t, at, _)| *k == key_id && *t == txid && now < *at + kept)
                    .map(|(_, _, _, a)| a.clone());
                match again {
                    Some(answer) => answer,
                    None => {
                        let answer = match self.push(now, n.into(), rng) {
                            Ok(()) => ack_msg(MessageType::Notification),
                            Err(code) => error_msg(code, MessageType::Notification),
                        };
                        self.remember(now, key_id, txid, answer.clone());
                        answer
                    }
                }
            }
            _ => return Err(DropReason::Unexpected),
        };
        self.send_to_dc(local, remote, key_id, &answer, txid);
        Ok(())
    }

    fn take_dc_key(&mut self, now: Time, kd: &KeyDistribution) -> Result<(), ErrorCode> {
        if kd.key_role != KeyRole::DcNs || kd.subject != self.config.fqdn {
            return Err(ErrorCode::WrongState);
        }
        let old = self.dc_keys.expiry();
        let installed = self.dc_keys.install(now, kd)?;
        if let Some(t) = old {
            self.deadlines.remove(&(t, Due::DcKey));
        }
        if let Some(t) = self.dc_keys.expiry() {
            self.deadlines.insert((t, Due::DcKey));
        }
        if installed == Installed::New {
            self.output.event(NsEvent::DcKeyReplaced {
                key_id: kd.new_key_id,
            });
        }
        Ok(())
    }

    fn register(&mut self, now: Time, r: NotificationRegistration) -> Result<(), ErrorCode> {
        if r.node_key_id == 0 {
            return Err(ErrorCode::WrongState);
        }
        let deadline = now + Duration::from_secs(u64::from(r.lifetime_s));
        if let Some(reg) = self.registrations.get_mut(&r.node_key_id) {
            // The same registration again (a retransmission, or the DC renewing it) extends its
            // lifetime; another node or key under that ID is refused.
            if reg.fqdn != r.node_fqdn || reg.secret != r.node_ns_key {
                return Err(ErrorCode::WrongState);
            }
            let old = reg.deadline;
            reg.deadline = deadline;
            reg.expired = false;
            self.deadlines
                .remove(&(old, Due::Registration(r.node_key_id)));
            self.deadlines
                .insert((deadline, Due::Registration(r.node_key_id)));
            return Ok(());
        }
        if self.registrations.len() >= self.config.limits.max_registrations {
            return Err(ErrorCode::Unavailable);
        }
        self.registrations.insert(
            r.node_key_id,
            Registration {
                fqdn: r.node_fqdn,
                key: SignalingKey::new(&r.node_ns_key, r.node_key_id, Role::B),
                secret: r.node_ns_key,
                deadline,
                expired: false,
                conn: None,
            },
        );
        self.deadlines
            .insert((deadline, Due::Registration(r.node_key_id)));
        Ok(())
    }

    /// Pushes the DC's NOTIFICATION on the node's channel, fields and extensions unchanged.
    fn push<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        msg: Message,
        rng: &mut R,
    ) -> Result<(), ErrorCode> {
        let Message::Notification(n) = &msg else {
            return Err(ErrorCode::WrongState);
        };
        let node_key_id = n.node_key_id;
        let reg = self
            .registrations
            .get(&node_key_id)
            .filter(|r| !r.expired)
            .ok_or(ErrorCode::NotFound)?;
        let conn_id = reg.conn.ok_or(ErrorCode::NotFound)?;
        let conn = self.conns.get(&conn_id).ok_or(ErrorCode::NotFound)?;
        if conn.closing {
            return Err(ErrorCode::NotFound);
        }
        if conn.pending.len() >= self.config.limits.max_pending_per_node {
            return Err(ErrorCode::Unavailable);
        }
        let mut txid = rng.next_u32();
        while txid == 0 || conn.pending.iter().any(|(t, _)| *t == txid) {
            txid = rng.next_u32();
        }
        if !self.send_frame(conn_id, node_key_id, &msg, txid) {
            // The channel could not take it and was closed: the DC sends directly.
            return Err(ErrorCode::NotFound);
        }
        if let Some(c) = self.conns.get_mut(&conn_id) {
            c.pending.push_back((txid, now));
        }
        self.reindex(conn_id);
        Ok(())
    }

    fn remember(&mut self, now: Time, key_id: u32, txid: u32, answer: Message) {
        let l = self.config.limits;
        while self
            .answers
            .front()
            .is_some_and(|(_, _, at, _)| *at + l.answer_kept <= now)
        {
            self.answers.pop_front();
        }
        if l.max_answers == 0 {
            return;
        }
        while self.answers.len() >= l.max_answers {
            self.answers.pop_front();
        }
        self.answers.push_back((key_id, txid, now, answer));
    }

    fn send_to_dc(
        &mut self,
        local: SocketAddr,
        remote: SocketAddr,
        key_id: u32,
        msg: &Message,
        txid: u32,
    ) {
        let (datagram, reserved) = self.dc_keys.seal(key_id, msg, txid);
        if let Some(through) = reserved {
            self.output
                .event(NsEvent::SequenceReserved { key_id, through });
        }
        self.output.queue(Some(local), remote, datagram);
    }

    // -- TCP connections -----------------------------------------------------------------------

    /// A connection from `remote` was accepted and named `conn`. False when the NS holds its
    /// maximum of connections or already tracks `conn`: the runtime closes it at once.
    pub fn open_connection(&mut self, now: Time, conn: ConnId, remote: SocketAddr) -> bool {
        if self.conns.len() >= self.config.limits.max_connections || self.conns.contains_key(&conn)
        {
            return false;
        }
        self.conns.insert(
            conn,
            Conn {
                remote,
                opened: now,
                bound: None,
                closing: false,
                inbuf: Vec::new(),
                frame_started: None,
                last_heard: now,
                out: Vec::new(),
                pending: VecDeque::new(),
                indexed: None,
            },
        );
        self.reindex(conn);
        true
    }

    /// Bytes read from `conn`, split anywhere.
    pub fn handle_stream(&mut self, now: Time, conn: ConnId, bytes: &[u8]) {
        let mut input = bytes;
        while !input.is_empty() {
            let Some(c) = self.conns.get_mut(&conn) else {
                return;
            };
            if c.closing {
                return;
            }
            if c.inbuf.is_empty() {
                c.frame_started = Some(now);
            }
            // Take only what completes the prefix or the frame: at most one frame is buffered.
            let need = match c.inbuf.get(..stream::FRAME_PREFIX_LEN) {
                Some(&[hi, lo]) => (stream::FRAME_PREFIX_LEN
                    + usize::from(u16::from_be_bytes([hi, lo])))
                .saturating_sub(c.inbuf.len()),
                _ => stream::FRAME_PREFIX_LEN.saturating_sub(c.inbuf.len()),
            };
            let (take, rest) = input.split_at(need.min(input.len()));
            input = rest;
            c.inbuf.extend_from_slice(take);
            match stream::next_frame(&c.inbuf) {
                Err(_) => {
                    self.drops.record(&DropReason::Unexpected);
                    self.close(conn);
                    return;
                }
                Ok(None) => {}
                Ok(Some((start, end))) => {
                    let mut frame = core::mem::take(&mut c.inbuf);
                    c.frame_started = None;
                    let result = match frame.get_mut(start..end) {
                        Some(datagram) => self.on_frame(now, conn, datagram),
                        None => Err(DropReason::Unexpected),
                    };
                    if let Err(reason) = result {
                        self.drops.record(&reason);
                        self.close(conn);
                        return;
                    }
                }
            }
        }
        self.reindex(conn);
    }

    /// One whole frame from `conn`. An error closes the connection.
    fn on_frame(&mut self, now: Time, conn: ConnId, frame: &mut [u8]) -> FrameResult {
        let header = match server_intake(frame, Role::B) {
            Ok(h) => h,
            Err(refusal) => {
                if let Some(answer) = refusal.answer {
                    self.write_frame(conn, &answer);
                }
                return Err(refusal.reason);
            }
        };
        let bound = self.conns.get(&conn).and_then(|c| c.bound);
        match bound {
            None => self.on_subscribe(now, conn, frame, &header),
            Some(key_id) => self.on_channel_frame(now, conn, key_id, frame, &header),
        }
    }

    /// The first frame on a connection: it must be a NOTIFICATION_SUBSCRIBE.
    fn on_subscribe(
        &mut self,
        now: Time,
        conn: ConnId,
        frame: &mut [u8],
        header: &Header,
    ) -> FrameResult {
        if header.msg_type != MessageType::NotificationSubscribe || !header.sealed {
            return Err(DropReason::Unexpected);
        }
        let key_id = header.envelope.key_id;
        let txid = header.envelope.txid;
        let Some(reg) = self.registrations.get_mut(&key_id) else {
            // A hint for the node, then the connection closes (spec/03 §0x3b).
            if let Ok(answer) = unsealed_error(
                Role::B,
                key_id,
                txid,
                MessageType::NotificationSubscribe.to_u8(),
                ErrorCode::UnknownKey,
            ) {
                self.write_frame(conn, &answer);
            }
            return Err(DropReason::UnknownKey);
        };
        let (h, msg) = match reg.key.open(frame) {
            Ok(opened) => opened,
            Err(DropReason::UndecodableBody(e)) => {
                let error = error_msg(undecodable_code(&e), header.msg_type);
                self.send_frame(conn, key_id, &error, txid);
                return Err(DropReason::UndecodableBody(e));
            }
            Err(e) => return Err(e),
        };
        if h.envelope.role != Role::A {
            return Err(DropReason::Unexpected);
        }
        let Message::NotificationSubscribe(sub) = msg else {
            return Err(DropReason::Unexpected);
        };
        let refusal = if reg.expired {
            Some(ErrorCode::Expired)
        } else if sub.node_fqdn != reg.fqdn {
            Some(ErrorCode::WrongState)
        } else {
            None
        };
        if let Some(code) = refusal {
            let error = error_msg(code, MessageType::NotificationSubscribe);
            self.send_frame(conn, key_id, &error, txid);
            return Err(DropReason::Unexpected);
        }
        let fqdn = reg.fqdn.clone();
        let previous = reg.conn.replace(conn);
        // A newer subscription for the node replaces its older channel, whichever session that
        // one was subscribed under.
        let older = self.channels.insert(fqdn.clone(), conn);
        for old in [previous, older].into_iter().flatten() {
            if old != conn {
                self.close(old);
            }
        }
        // close() may have cleared the registration's link if both named the same connection.
        if let Some(reg) = self.registrations.get_mut(&key_id) {
            reg.conn = Some(conn);
        }
        self.channels.insert(fqdn.clone(), conn);
        if let Some(c) = self.conns.get_mut(&conn) {
            c.bound = Some(key_id);
            c.last_heard = now;
        }
        self.send_frame(
            conn,
            key_id,
            &ack_msg(MessageType::NotificationSubscribe),
            txid,
        );
        self.output.event(NsEvent::Subscribed {
            fqdn,
            conn,
            node_key_id: key_id,
        });
        Ok(())
    }

    /// A frame on a subscribed channel.
    fn on_channel_frame(
        &mut self,
        now: Time,
        conn: ConnId,
        key_id: u32,
        frame: &mut [u8],
        header: &Header,
    ) -> FrameResult {
        if header.envelope.key_id != key_id {
            return Err(DropReason::UnknownKey);
        }
        let txid = header.envelope.txid;
        let reg = self
            .registrations
            .get_mut(&key_id)
            .ok_or(DropReason::UnknownKey)?;
        let (h, msg) = match reg.key.open(frame) {
            Ok(opened) => opened,
            Err(DropReason::UndecodableBody(e)) => {
                // Authentic but undecodable: the channel itself is fine.
                let is_request = matches!(
                    header.msg_type,
                    MessageType::Keepalive | MessageType::NotificationSubscribe
                );
                if is_request {
                    let error = error_msg(undecodable_code(&e), header.msg_type);
                    self.send_frame(conn, key_id, &error, txid);
                }
                self.drops.record(&DropReason::UndecodableBody(e));
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if !h.sealed {
            self.drops.record(&DropReason::UnsealedHint);
            return Ok(());
        }
        if h.envelope.role != Role::A {
            return Err(DropReason::Unexpected);
        }
        let (expired, fqdn_ok) = match &msg {
            Message::NotificationSubscribe(s) => (reg.expired, s.node_fqdn == reg.fqdn),
            _ => (reg.expired, true),
        };
        let remote = match self.conns.get_mut(&conn) {
            Some(c) => {
                c.last_heard = now;
                c.remote
            }
            None => return Ok(()),
        };
        match msg {
            Message::Keepalive(k) => {
                if k.reply_requested {
                    let answer = if expired {
                        error_msg(ErrorCode::Expired, MessageType::Keepalive)
                    } else {
                        KeepaliveReply {
                            observed_addr: TransportAddr::new(remote),
                            extensions: Extensions::none(),
                        }
                        .into()
                    };
                    self.send_frame(conn, key_id, &answer, txid);
                }
            }
            Message::NotificationSubscribe(_) => {
                let answer = if !fqdn_ok {
                    error_msg(ErrorCode::WrongState, MessageType::NotificationSubscribe)
                } else {
                    ack_msg(MessageType::NotificationSubscribe)
                };
                self.send_frame(conn, key_id, &answer, txid);
            }
            Message::Ack(a) if a.acked_type == MessageType::Notification.to_u8() => {
                self.settle(conn, txid)?;
            }
            Message::Error(e) if e.failed_type == MessageType::Notification.to_u8() => {
                self.settle(conn, txid)?;
            }
            _ => self.drops.record(&DropReason::Unexpected),
        }
        Ok(())
    }

    /// The node answered a pushed NOTIFICATION.
    fn settle(&mut self, conn: ConnId, txid: u32) -> FrameResult {
        let c = self.conns.get_mut(&conn).ok_or(DropReason::Unexpected)?;
        match c.pending.iter().position(|(t, _)| *t == txid) {
            Some(i) => {
                c.pending.remove(i);
            }
            None => self.drops.record(&DropReason::Unexpected),
        }
        Ok(())
    }

    /// Seals `msg` under the registration `key_id` and queues it on `conn`; false if the
    /// connection could not take it (it is then closed).
    fn send_frame(&mut self, conn: ConnId, key_id: u32, msg: &Message, txid: u32) -> bool {
        let datagram = match self.registrations.get_mut(&key_id) {
            Some(reg) => reg.key.seal_to_vec(msg, txid, None),
            None => return false,
        };
        match datagram {
            Ok(d) => self.write_frame(conn, &d),
            Err(_) => {
                self.output.seal_failed();
                false
            }
        }
    }

    /// Queues one framed datagram on `conn`; a connection whose reader lags by more than the
    /// write buffer is closed.
    fn write_frame(&mut self, conn: ConnId, datagram: &[u8]) -> bool {
        let max = self.config.limits.max_write_buffer;
        let Ok(prefix) = stream::frame_prefix(datagram.len()) else {
            return false;
        };
        let Some(c) = self.conns.get_mut(&conn) else {
            return false;
        };
        let needed = c
            .out
            .len()
            .saturating_add(prefix.len())
            .saturating_add(datagram.len());
        if needed > max {
            self.drops.record(&DropReason::TableFull);
            self.close(conn);
            return false;
        }
        c.out.extend_from_slice(&prefix);
        c.out.extend_from_slice(datagram);
        self.writable.insert(conn);
        true
    }

    /// Asks the runtime to close `conn`: it is unbound at once and reads nothing more.
    fn close(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.closing {
            return;
        }
        c.closing = true;
        c.inbuf = Vec::new();
        c.frame_started = None;
        c.pending.clear();
        self.unbind(conn);
        self.reindex(conn);
        self.output.event(NsEvent::CloseConnection(conn));
    }

    /// Detaches `conn` from its registration and its node's channel.
    fn unbind(&mut self, conn: ConnId) {
        let Some(key_id) = self.conns.get_mut(&conn).and_then(|c| c.bound.take()) else {
            return;
        };
        let Some(reg) = self.registrations.get_mut(&key_id) else {
            return;
        };
        if reg.conn == Some(conn) {
            reg.conn = None;
        }
        let fqdn = reg.fqdn.clone();
        if self.channels.get(&fqdn) == Some(&conn) {
            self.channels.remove(&fqdn);
        }
        self.output.event(NsEvent::Unsubscribed { fqdn, conn });
    }

    /// `conn` is closed (by the peer, by the runtime, or as the NS asked): forget it.
    pub fn close_connection(&mut self, conn: ConnId) {
        self.unbind(conn);
        if let Some(c) = self.conns.remove(&conn) {
            if let Some(t) = c.indexed {
                self.deadlines.remove(&(t, Due::Conn(conn)));
            }
        }
        self.writable.remove(&conn);
    }

    /// The bytes waiting to be written to `conn`; call [`Self::stream_consumed`] with what the
    /// socket took.
    pub fn stream_pending(&self, conn: ConnId) -> &[u8] {
        self.conns.get(&conn).map_or(&[], |c| c.out.as_slice())
    }

    /// The socket took the first `n` bytes of [`Self::stream_pending`].
    pub fn stream_consumed(&mut self, conn: ConnId, n: usize) {
        if let Some(c) = self.conns.get_mut(&conn) {
            let n = n.min(c.out.len());
            c.out.drain(..n);
            if c.out.is_empty() {
                self.writable.remove(&conn);
            }
        }
    }

    /// Copies bytes for some connection into `buf` and consumes them: the connection and how
    /// many bytes. The runtime must write them all (keeping what its socket did not take).
    pub fn poll_stream_transmit(&mut self, buf: &mut [u8]) -> Option<(ConnId, usize)> {
        let conn = *self.writable.first()?;
        let pending = self.stream_pending(conn);
        let n = pending.len().min(buf.len());
        match (buf.get_mut(..n), pending.get(..n)) {
            (Some(dst), Some(src)) => dst.copy_from_slice(src),
            _ => return None,
        }
        self.stream_consumed(conn, n);
        Some((conn, n))
    }

    /// Moves `conn`'s entry in the deadline index to its current deadline.
    fn reindex(&mut self, conn: ConnId) {
        let l = self.config.limits;
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let new = c.deadline(&l).map(|(t, _)| t);
        if new == c.indexed {
            return;
        }
        if let Some(t) = c.indexed {
            self.deadlines.remove(&(t, Due::Conn(conn)));
        }
        if let Some(t) = new {
            self.deadlines.insert((t, Due::Conn(conn)));
        }
        c.indexed = new;
    }

    // -- Time and output -----------------------------------------------------------------------

    /// Timers due at `now` fire: connections that waited too long are closed, registrations
    /// expire and are forgotten.
    pub fn handle_timeout<R: RngCore + CryptoRng>(&mut self, now: Time, _rng: &mut R) {
        while let Some(&(at, due)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.deadlines.remove(&(at, due));
            match due {
                Due::Conn(conn) => {
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.indexed = None;
                    }
                    self.close(conn);
                }
                Due::Registration(key_id) => self.registration_due(at, key_id),
                Due::DcKey => {
                    self.dc_keys.expire(now);
                }
            }
        }
    }

    fn registration_due(&mut self, at: Time, key_id: u32) {
        let grace = self.config.limits.expired_key_grace;
        let Some(reg) = self.registrations.get_mut(&key_id) else {
            return;
        };
        if reg.deadline > at {
            return;
        }
        if reg.expired {
            self.registrations.remove(&key_id);
            return;
        }
        reg.expired = true;
        reg.deadline = at + grace;
        let (fqdn, conn) = (reg.fqdn.clone(), reg.conn);
        self.deadlines
            .insert((at + grace, Due::Registration(key_id)));
        if let Some(conn) = conn {
            self.close(conn);
        }
        self.output.event(NsEvent::RegistrationExpired {
            fqdn,
            node_key_id: key_id,
        });
    }

    /// The next datagram to the DC, written into `buf` (give it at least
    /// [`ntm_wire::MAX_SIGNALING_LEN`] bytes).
    pub fn poll_transmit(&mut self, _now: Time, buf: &mut [u8]) -> Option<Transmit> {
        self.output.poll_transmit(buf)
    }

    pub fn poll_event(&mut self) -> Option<NsEvent> {
        self.output.poll_event()
    }

    /// The earliest deadline and what it is for.
    pub fn poll_timeout(&self) -> Option<(Time, &'static str)> {
        let &(at, due) = self.deadlines.first()?;
        let label = match due {
            Due::Conn(conn) => self
                .conns
                .get(&conn)
                .and_then(|c| c.deadline(&self.config.limits))
                .map_or("connection", |(_, timer)| timer.label()),
            Due::Registration(id) => match self.registrations.get(&id) {
                Some(r) if r.expired => "expired registration removal",
                _ => "notification registration expiry",
            },
            Due::DcKey => "distributed DC key expiry",
        };
        Some((at, label))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ntm_wire::crypto::node_ns_key;
    use ntm_wire::{
        Blob, Extension, Keepalive, Notification, NotificationSubscribe, NotifyReason,
        SignalingPacket, MAX_SIGNALING_LEN,
    };
    use rand_chacha::ChaCha8Rng;
    use rand_core::SeedableRng;

    const DC_KEY_ID: u32 = 31;

    fn fqdn(s: &str) -> Fqdn {
        Fqdn::new(s).unwrap()
    }

    fn ns_addr() -> SocketAddr {
        SocketAddr::from(([203, 0, 113, 30], 4283))
    }

    fn dc_addr() -> SocketAddr {
        SocketAddr::from(([203, 0, 113, 10], 4281))
    }

    fn node_addr(n: u8) -> SocketAddr {
        SocketAddr::from(([198, 51, 100, n], 40_000 + u16::from(n)))
    }

    fn config() -> NsConfig {
        NsConfig::new(
            fqdn("ns1.dc1.example"),
            SecretKey::from_bytes([6; 32]),
            DC_KEY_ID,
        )
    }

    fn framed(d: &[u8]) -> Vec<u8> {
        let mut v = stream::frame_prefix(d.len()).unwrap().to_vec();
        v.extend_from_slice(d);
        v
    }

    /// Splits a byte stream into its frames' datagrams.
    fn unframe(mut bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some((start, end)) = stream::next_frame(bytes).unwrap() {
            out.push(bytes[start..end].to_vec());
            bytes = &bytes[end..];
        }
        assert!(bytes.is_empty(), "a partial frame was written");
        out
    }

    /// One node's end of its session with the NS.
    struct NodeEnd {
        key: SignalingKey,
        fqdn: Fqdn,
        addr: SocketAddr,
    }

    impl NodeEnd {
        fn new(key_id: u32, name: &str, n: u8) -> Self {
            let k_ns = node_ns_key(&SecretKey::from_bytes([key_id as u8; 32]));
            NodeEnd {
                key: SignalingKey::new(&k_ns, key_id, Role::A),
                fqdn: fqdn(name),
                addr: node_addr(n),
            }
        }

        fn frame(&mut self, msg: Message, txid: u32) -> Vec<u8> {
            framed(&self.key.seal_to_vec(&msg, txid, None).unwrap())
        }

        fn subscribe(&mut self, txid: u32) -> Vec<u8> {
            let name = self.fqdn.clone();
            self.frame(
                NotificationSubscribe {
                    node_fqdn: name,
                    extensions: Extensions::none(),
                }
                .into(),
                txid,
            )
        }

        fn keepalive(&mut self, txid: u32) -> Vec<u8> {
            self.frame(
                Keepalive {
                    reply_requested: true,
                    extensions: Extensions::none(),
                }
                .into(),
                txid,
            )
        }

        fn open(&mut self, mut d: Vec<u8>) -> (Header, Message) {
            self.key.open(&mut d).unwrap()
        }
    }

    struct Bench {
        ns: NotificationServer,
        rng: ChaCha8Rng,
        dc: SignalingKey,
        now: Time,
    }

    impl Bench {
        fn new(config: NsConfig) -> Self {
            Bench {
                ns: NotificationServer::new(config).unwrap(),
                rng: ChaCha8Rng::seed_from_u64(9),
                dc: SignalingKey::new(&SecretKey::from_bytes([6; 32]), DC_KEY_ID, Role::A),
                now: Time::ZERO,
            }
        }

        /// A DC request; returns the opened answers.
        fn dc_sends(&mut self, msg: Message, txid: u32) -> Vec<Message> {
            let mut d = self.dc.seal_to_vec(&msg, txid, None).unwrap();
            self.ns
                .handle_datagram(self.now, ns_addr(), dc_addr(), &mut d, &mut self.rng);
            let mut buf = [0u8; MAX_SIGNALING_LEN];
            let mut out = Vec::new();
            while let Some(t) = self.ns.poll_transmit(self.now, &mut buf) {
                assert_eq!((t.src, t.dst), (Some(ns_addr()), dc_addr()));
                let (h, m) = self.dc.open(&mut buf[..t.len]).unwrap();
                assert_eq!((h.envelope.txid, h.envelope.role), (txid, Role::B));
                out.push(m);
            }
            out
        }

        fn register(&mut self, key_id: u32, name: &str, lifetime_s: u32) -> Message {
            let k_ns = node_ns_key(&SecretKey::from_bytes([key_id as u8; 32]));
            let mut a = self.dc_sends(
                NotificationRegistration {
                    node_fqdn: fqdn(name),
                    node_key_id: key_id,
                    node_ns_key: k_ns,
                    lifetime_s,
                    extensions: Extensions::none(),
                }
                .into(),
                key_id,
            );
            assert_eq!(a.len(), 1);
            a.remove(0)
        }

        fn notify(&mut self, key_id: u32, payload: &[u8], txid: u32) -> Message {
            let mut a = self.dc_sends(
                Notification {
                    node_key_id: key_id,
                    reason: NotifyReason::IncomingTunnel,
                    payload: Blob::new(payload.to_vec()).unwrap(),
                    extensions: Extensions::none(),
                }
                .into(),
                txid,
            );
            assert_eq!(a.len(), 1);
            a.remove(0)
        }

        fn connect(&mut self, conn: u64, node: &NodeEnd) -> ConnId {
            assert!(self.ns.open_connection(self.now, ConnId(conn), node.addr));
            ConnId(conn)
        }

        /// Feeds bytes; returns the datagrams the NS wrote back on that connection.
        fn feed(&mut self, conn: ConnId, bytes: &[u8]) -> Vec<Vec<u8>> {
            self.ns.handle_stream(self.now, conn, bytes);
            self.written(conn)
        }

        fn written(&mut self, conn: ConnId) -> Vec<Vec<u8>> {
            let out = self.ns.stream_pending(conn).to_vec();
            self.ns.stream_consumed(conn, out.len());
            unframe(&out)
        }

        fn events(&mut self) -> Vec<NsEvent> {
            std::iter::from_fn(|| self.ns.poll_event()).collect()
        }

        fn run_until(&mut self, t: Time) {
            while let Some((at, _)) = self.ns.poll_timeout() {
                if at > t {
                    break;
                }
                self.now = at;
                self.ns.handle_timeout(at, &mut self.rng);
            }
            self.now = t;
        }

        /// Registration, connection and subscription of one node.
        fn subscribed(&mut self, conn: u64, node: &mut NodeEnd, key_id: u32) -> ConnId {
            let name = node.fqdn.as_str().to_owned();
            assert_eq!(
                self.register(key_id, &name, 3600),
                ack_msg(MessageType::NotificationRegistration)
            );
            let c = self.connect(conn, node);
            let sub = node.subscribe(1);
            let answers = self.feed(c, &sub);
            assert_eq!(answers.len(), 1);
            let (h, m) = node.open(answers[0].clone());
            assert_eq!(
                (h.envelope.key_id, h.envelope.role, h.envelope.txid),
                (key_id, Role::B, 1)
            );
            assert_eq!(m, ack_msg(MessageType::NotificationSubscribe));
            c
        }
    }

    fn error_code(m: &Message) -> ErrorCode {
        match m {
            Message::Error(e) => e.code,
            other => panic!("expected an ERROR, got {other:?}"),
        }
    }

    #[test]
    fn a_node_subscribes_keeps_its_channel_alive_and_receives_the_dcs_notification_unchanged() {
        let mut b = Bench::new(config());
        let mut cn = NodeEnd::new(0x2002, "cn.dc1.example", 2);
        let c = b.subscribed(7, &mut cn, 0x2002);
        assert_eq!(b.ns.channel_of(&fqdn("cn.dc1.example")), Some(c));
        assert!(b.events().contains(&NsEvent::Subscribed {
            fqdn: fqdn("cn.dc1.example"),
            conn: c,
            node_key_id: 0x2002
        }));

        let ka = cn.keepalive(2);
        let answers = b.feed(c, &ka);
        let (_, reply) = cn.open(answers[0].clone());
        assert_eq!(
            reply,
            KeepaliveReply {
                observed_addr: TransportAddr::new(cn.addr),
                extensions: Extensions::none()
            }
            .into()
        );

        // The DC's NOTIFICATION, with a non-critical extension the NS does not know.
        let sent = Notification {
            node_key_id: 0x2002,
            reason: NotifyReason::IncomingTunnel,
            payload: Blob::new(vec![0x35; 120]).unwrap(),
            extensions: Extensions::new(vec![Extension {
                ext_type: 0x0042,
                value: vec![1, 2, 3],
            }])
            .unwrap(),
        };
        let a = b.dc_sends(sent.clone().into(), 500);
        assert_eq!(a, vec![ack_msg(MessageType::Notification)]);
        let pushed = b.written(c);
        assert_eq!(pushed.len(), 1);
        let (h, m) = cn.open(pushed[0].clone());
        assert_eq!((h.envelope.key_id, h.envelope.role), (0x2002, Role::B));
        assert_eq!(
            m,
            sent.into(),
            "forwarded with every field and extension unchanged"
        );
        assert_eq!(b.ns.poll_timeout().unwrap().1, "notification ack wait");
        let ack = cn.frame(ack_msg(MessageType::Notification), h.envelope.txid);
        assert!(b.feed(c, &ack).is_empty());
        assert_eq!(b.ns.poll_timeout().unwrap().1, "idle channel");
    }

    #[test]
    fn frames_split_at_every_byte_or_in_random_chunks_are_reassembled() {
        for seed in 0..20u64 {
            let mut b = Bench::new(config());
            let mut cn = NodeEnd::new(0x2002, "cn.dc1.example", 2);
            assert_eq!(
                b.register(0x2002, "cn.dc1.example", 3600),
                ack_msg(MessageType::NotificationRegistration)
            );
            let c = b.connect(1, &cn);
            let mut bytes = cn.subscribe(1);
            for txid in 2..6 {
                bytes.extend(cn.keepalive(txid));
            }
            let mut answers = Vec::new();
            if seed == 0 {
                for byte in &bytes {
                    answers.extend(b.feed(c, std::slice::from_ref(byte)));
                    assert!(b.ns.buffered_input(c) <= 2 + MAX_SIGNALING_LEN);
                }
            } else {
                let mut chunks = ChaCha8Rng::seed_from_u64(seed);
                let mut rest = &bytes[..];
                while !rest.is_empty() {
                    let n = (chunks.next_u32() as usize % 90 + 1).min(rest.len());
                    answers.extend(b.feed(c, &rest[..n]));
                    rest = &rest[n..];
                }
            }
            let txids: Vec<u32> = answers
                .into_iter()
                .map(|a| cn.open(a).0.envelope.txid)
                .collect();
            assert_eq!(txids, vec![1, 2, 3, 4, 5], "seed {seed}");
            assert_eq!(b.ns.buffered_input(c), 0);
        }
    }

    #[test]
    fn a_subscription_under_an_unknown_key_draws_an_unsealed_unknown_key_and_the_connection_closes()
    {
        let mut b = Bench::new(config());
        let mut stranger = NodeEnd::new(0x4004, "stranger.dc1.example", 4);
        let c = b.connect(3, &stranger);
        let mut bytes = stranger.subscribe(77);
        bytes.extend(stranger.keepalive(78));
        let answers = b.feed(c, &bytes);
        assert_eq!(answers.len(), 1, "nothing after the close is read");
        assert_eq!(answers[0].len(), 31);
        let p = SignalingPacket::parse(&answers[0]).unwrap();
        assert!(!p.header().sealed);
        assert_eq!(
            (p.header().envelope.key_id, p.header().envelope.txid),
            (0x4004, 77)
        );
        assert_eq!(
            error_code(&p.decode_plain().unwrap()),
            ErrorCode::UnknownKey
        );
        assert_eq!(b.events(), vec![NsEvent::CloseConnection(c)]);
        b.ns.close_connection(c);
        assert_eq!(b.ns.connections(), 0);
    }

    #[test]
    fn a_subscription_for_another_name_is_refused_with_wrong_state_and_closed() {
        let mut b = Bench::new(config());
        b.register(0x2002, "cn.dc1.example", 3600);
        let mut liar = NodeEnd::new(0x2002, "mn.dc1.example", 5);
        b.events();
        let c = b.connect(1, &liar);
        let sub = liar.subscribe(1);
        let answers = b.feed(c, &sub);
        let (h, m) = liar.open(answers[0].clone());
        assert!(h.sealed);
        assert_eq!(error_code(&m), ErrorCode::WrongState);
        assert_eq!(b.events(), vec![NsEvent::CloseConnection(c)]);
        assert_eq!(b.ns.channel_of(&fqdn("cn.dc1.example")), None);
        assert_eq!(error_code(&b.notify(0x2002, b"x", 9)), ErrorCode::NotFound);
    }

    #[test]
    fn a_first_frame_that_is_not_a_subscription_or_does_not_authenticate_closes_without_answer() {
        let mut b = Bench::new(config());
        b.register(0x2002, "cn.dc1.example", 3600);
        let mut cn = NodeEnd::new(0x2002, "cn.dc1.example", 2);
        b.events();
        let c = b.connect(1, &cn);
        let ka = cn.keepalive(1);
        assert!(b.feed(c, &ka).is_empty());
        assert_eq!(b.events(), vec![NsEvent::CloseConnection(c)]);

        let c = b.connect(2, &cn);
        let mut sub = cn.subscribe(2);
        let last = sub.len() - 1;
        sub[last] ^= 1;
        assert!(b.feed(c, &sub).is_empty());
        assert_eq!(b.events(), vec![NsEvent::CloseConnection(c)]);
        assert_eq!(b.ns.drops().get("authentication_failed"), 1);
    }

    #[test]
    fn a_notification_for_a_node_without_a_channel_is_not_found_and_a_retransmission_is_pushed_once(
    ) {
        let mut b = Bench::new(config());
        assert_eq!(error_code(&b.notify(0x2002, b"x", 1)), ErrorCode::NotFound);
        b.register(0x2002, "cn.dc1.example", 3600);
        assert_eq!(
            error_code(&b.notify(0x2002, b"x", 2)),
            ErrorCode::NotFound,
            "registered, not subscribed"
        );
        let mut cn = NodeEnd::new(0x2002, "cn.dc1.example", 2);
        let c = b.subscribed(1, &mut cn, 0x2002);
        assert_eq!(
            b.notify(0x2002, b"wake", 3),
            ack_msg(MessageType::Notification)
        );
        assert_eq!(
            b.notify(0x2002, b"wake", 3),
            ack_msg(MessageType::Notification)
        );
        assert_eq!(
            b.written(c).len(),
            1,
            "the DC's retransmission is not pushed again"
        );
        b.ns.close_connection(c);
        assert_eq!(error_code(&b.notify(0x2002, b"x", 4)), ErrorCode::NotFound);
        assert!(b.events().contains(&NsEvent::Unsubscribed {
            fqdn: fqdn("cn.dc1.example"),
            conn: c
        }));
    }

    #[test]
    fn a_newer_subscription_of_the_node_replaces_its_older_connection() {
        let mut b = Bench::new(config());
        let mut old_session = NodeEnd::new(0x2002, "cn.dc1.example", 2);
        let first = b.subscribed(1, &mut old_session, 0x2002);
        // The node logged in again: a new session key, a new connection.
        let mut new_session = NodeEnd::new(0x2003, "cn.dc1.example", 3);
        b.events();
        let second = b.subscribed(2, &mut new_session, 0x2003);
        let events = b.events();
        assert!(
            events.contains(&NsEvent::CloseConnection(first)),
            "{events:?}"
        );
        assert!(events.contains(&NsEvent::Unsubscribed {
            fqdn: fqdn("cn.dc1.example"),
            conn: first
        }));
        assert_eq!(b.ns.channel_of(&fqdn("cn.dc1.example")), Some(second));
        // The old connection reads nothing more; the old session has no channel.
        let ka = old_session.keepalive(5);
        assert!(b.feed(first, &ka).is_empty());
        assert_eq!(error_code(&b.notify(0x2002, b"x", 1)), ErrorCode::NotFound);
        assert_eq!(
            b.notify(0x2003, b"x", 2),
            ack_msg(MessageType::Notification)
        );
        assert_eq!(b.written(second).len(), 1);
        // A reconnection under the same session replaces it too.
        let third = b.connect(3, &new_session);
        let sub = new_session.subscribe(9);
        assert_eq!(b.feed(third, &sub).len(), 1);
        assert!(b.events().contains(&NsEvent::CloseConnection(second)));
        assert_eq!(b.ns.channel_of(&fqdn("cn.dc1.example")), Some(third));
    }

    #[test]
    fn a_never_ending_partial_frame_is_held_to_one_frame_and_closed_when_it_times_out() {
        let mut b = Bench::new(config());
        let mut cn = NodeEnd::new(0x2002, "cn.dc1.example", 2);
        let c = b.subscribed(1, &mut cn, 0x2002);
        // A frame that announces 1232 bytes and never ends.
        b.feed(c, &[0x04, 0xd0]);
        for _ in 0..1230 {
            b.feed(c, &[0]);
        }
        assert_eq!(b.ns.buffered_input(c), 2 + 1230);
        assert_eq!(
            b.ns.poll_timeout(),
            Some((Time::from_secs(30), "partial frame"))
        );
        b.run_until(Time::from_secs(30));
        assert!(b.events().contains(&NsEvent::CloseConnection(c)));
        assert_eq!(b.ns.buffered_input(c), 0);

        // A prefix outside 1..=1232 is a corrupt stream: closed at once.
        for (n, prefix) in [[0u8, 0], [0x04, 0xd1], [0xff, 0xff]]
            .into_iter()
            .enumerate()
        {
            let mut other = NodeEnd::new(0x3000 + n as u32, "x.dc1.example", 3);
            let c = b.connect(10 + n as u64, &other);
            let _ = other.subscribe(1);
            b.feed(c, &prefix);
            assert_eq!(b.events(), vec![NsEvent::CloseConnection(c)], "{prefix:?}");
        }
    }

    #[test]
    fn a_connection_that_never_subscribes_is_closed_after_the_subscription_wait() {
        let mut b = Bench::new(config());
        let cn = NodeEnd::new(0x2002, "cn.dc1.example", 2);
        let c = b.connect(1, &cn);
        assert_eq!(
            b.ns.poll_timeout(),
            Some((Time::from_secs(30), "subscription wait"))
        );
        b.run_until(Time::from_secs(29));
        assert!(b.events().is_empty());
        b.run_until(Time::from_secs(30));
        assert_eq!(b.events(), vec![NsEvent::CloseConnection(c)]);
    }

    #[test]
    fn a_node_that_does_not_ack_or_does_not_read_loses_its_channel() {
        let mut b = Bench::new(config());
        let mut cn = NodeEnd::new(0x2002, "cn.dc1.example", 2);
        let c = b.subscribed(1, &mut cn, 0x2002);
        for txid in 0..8 {
            assert_eq!(
                b.notify(0x2002, &[1; 500], 100 + txid),
                ack_msg(MessageType::Notification)
            );
        }
        // Eight unACKed: the ninth is refused, not queued without bound.
        assert_eq!(
            error_code(&b.notify(0x2002, b"x", 200)),
            ErrorCode::Unavailable
        );
        b.events();
        b.run_until(Time::from_secs(30));
        assert!(b.events().contains(&NsEvent::CloseConnection(c)));

        // A reader that takes nothing: the write buffer fills and the connection closes.
        let mut c2 = config();
        c2.limits.max_pending_per_node = 1000;
        let mut b = Bench::new(c2);
        let mut cn = NodeEnd::new(0x2002, "cn.dc1.example", 2);
        let c = b.subscribed(1, &mut cn, 0x2002);
        let mut refused = None;
        for txid in 0..40 {
            let a = b.notify(0x2002, &[1; 900], 100 + txid);
            if let Message::Error(e) = a {
                refused = Some((txid, e.code));
                break;
            }
        }
        let (txid, code) = refused.unwrap();
        assert_eq!(code, ErrorCode::NotFound);
        assert!(txid <= 17, "16 KiB holds at most 17 frames of ~970 bytes");
        assert!(b.ns.stream_pending(c).len() <= 16 * 1024);
        assert!(b.events().contains(&NsEvent::CloseConnection(c)));
    }

    #[test]
    fn an_expired_registration_closes_the_channel_draws_expired_in_grace_then_unknown_key() {
        let mut b = Bench::new(config());
        b.register(0x2002, "cn.dc1.example", 100);
        let mut cn = NodeEnd::new(0x2002, "cn.dc1.example", 2);
        let c = b.connect(1, &cn);
        let sub = cn.subscribe(1);
        b.feed(c, &sub);
        b.events();
        assert_eq!(
            b.ns.poll_timeout(),
            Some((Time::from_secs(100), "notification registration expiry"))
        );
        b.run_until(Time::from_secs(100));
        let events = b.events();
        assert!(events.contains(&NsEvent::RegistrationExpired {
            fqdn: fqdn("cn.dc1.example"),
            node_key_id: 0x2002
        }));
        assert!(events.contains(&NsEvent::CloseConnection(c)));
        b.ns.close_connection(c);
        let c = b.connect(2, &cn);
        let sub = cn.subscribe(2);
        let answers = b.feed(c, &sub);
        assert_eq!(
            error_code(&cn.open(answers[0].clone()).1),
            ErrorCode::Expired
        );
        b.ns.close_connection(c);
        b.run_until(Time::from_secs(700));
        assert_eq!(b.ns.registrations_held(), 0);
        let c = b.connect(3, &cn);
        let sub = cn.subscribe(3);
        let answers = b.feed(c, &sub);
        let p = SignalingPacket::parse(&answers[0]).unwrap();
        assert_eq!(
            error_code(&p.decode_plain().unwrap()),
            ErrorCode::UnknownKey
        );
    }

    #[test]
    fn registrations_and_connections_are_bounded() {
        let mut c = config();
        c.limits.max_registrations = 2;
        c.limits.max_connections = 2;
        let mut b = Bench::new(c);
        assert_eq!(
            b.register(1, "a.dc1.example", 60),
            ack_msg(MessageType::NotificationRegistration)
        );
        assert_eq!(
            b.register(2, "b.dc1.example", 60),
            ack_msg(MessageType::NotificationRegistration)
        );
        assert_eq!(
            error_code(&b.register(3, "c.dc1.example", 60)),
            ErrorCode::Unavailable
        );
        // The same registration again renews it; another key under its ID is refused.
        assert_eq!(
            b.register(1, "a.dc1.example", 600),
            ack_msg(MessageType::NotificationRegistration)
        );
        assert_eq!(
            error_code(&b.register(2, "a.dc1.example", 60)),
            ErrorCode::WrongState
        );
        assert!(b.ns.open_connection(b.now, ConnId(1), node_addr(1)));
        assert!(
            !b.ns.open_connection(b.now, ConnId(1), node_addr(1)),
            "a duplicate ID"
        );
        assert!(b.ns.open_connection(b.now, ConnId(2), node_addr(2)));
        assert!(!b.ns.open_connection(b.now, ConnId(3), node_addr(3)));
        b.ns.close_connection(ConnId(1));
        assert!(b.ns.open_connection(b.now, ConnId(3), node_addr(3)));
    }

    #[test]
    fn the_ns_takes_only_its_own_dc_key_from_the_dc() {
        let mut b = Bench::new(config());
        let kd = |role, subject: &str| KeyDistribution {
            key_role: role,
            new_key_id: 0x55,
            key: SecretKey::from_bytes([0x55; 32]),
            lifetime_s: 3600,
            subject: fqdn(subject),
            extensions: Extensions::none(),
        };
        for (role, subject) in [
            (KeyRole::DcCs, "ns1.dc1.example"),
            (KeyRole::DcNs, "ns2.dc1.example"),
        ] {
            let a = b.dc_sends(kd(role, subject).into(), 1);
            assert_eq!(error_code(&a[0]), ErrorCode::WrongState);
        }
        let a = b.dc_sends(kd(KeyRole::DcNs, "ns1.dc1.example").into(), 2);
        assert_eq!(a, vec![ack_msg(MessageType::KeyDistribution)]);
        assert!(b
            .events()
            .contains(&NsEvent::DcKeyReplaced { key_id: 0x55 }));
        // The DC now registers under the new key, and is answered under it.
        b.dc = SignalingKey::new(&SecretKey::from_bytes([0x55; 32]), 0x55, Role::A);
        assert_eq!(
            b.register(1, "a.dc1.example", 60),
            ack_msg(MessageType::NotificationRegistration)
        );
    }

    #[test]
    fn random_streams_and_datagrams_never_panic_and_never_subscribe_anyone() {
        let mut b = Bench::new(config());
        b.register(0x2002, "cn.dc1.example", 3600);
        let mut cn = NodeEnd::new(0x2002, "cn.dc1.example", 2);
        let valid_sub = cn.subscribe(1);
        let valid_notify =
            b.dc.seal_to_vec(
                &Notification {
                    node_key_id: 0x2002,
                    reason: NotifyReason::Signaling,
                    payload: Blob::new(vec![1; 40]).unwrap(),
                    extensions: Extensions::none(),
                }
                .into(),
                5,
                None,
            )
            .unwrap();
        let mut noise = ChaCha8Rng::seed_from_u64(4);
        for i in 0..3_000u64 {
            b.now = Time::from_millis(i * 50);
            let conn = ConnId(i);
            if b.ns.open_connection(b.now, conn, node_addr(9)) {
                let mut bytes = if i % 2 == 0 {
                    let mut d = vec![0u8; (noise.next_u32() % 400) as usize];
                    noise.fill_bytes(&mut d);
                    // Often a plausible prefix and type, so the frame reaches the parser.
                    if i % 4 == 0 && d.len() > 4 {
                        let len = (d.len() - 2) as u16;
                        d[..2].copy_from_slice(&len.to_be_bytes());
                        d[2] = 0x3b;
                        d[3] = 1;
                    }
                    d
                } else {
                    let mut d = valid_sub.clone();
                    let bit = noise.next_u32() as usize % (d.len() * 8);
                    d[bit / 8] ^= 1 << (bit % 8);
                    d
                };
                while !bytes.is_empty() {
                    let n = (noise.next_u32() as usize % 64 + 1).min(bytes.len());
                    b.ns.handle_stream(b.now, conn, &bytes[..n]);
                    bytes.drain(..n);
                }
                b.written(conn);
            }
            let mut d = valid_notify.clone();
            let bit = noise.next_u32() as usize % (d.len() * 8);
            d[bit / 8] ^= 1 << (bit % 8);
            b.ns.handle_datagram(b.now, ns_addr(), dc_addr(), &mut d, &mut b.rng);
            b.ns.handle_timeout(b.now, &mut b.rng);
            for e in b.events() {
                assert!(!matches!(e, NsEvent::Subscribed { .. }), "{e:?}");
                if let NsEvent::CloseConnection(c) = e {
                    b.ns.close_connection(c);
                }
            }
        }
        assert_eq!(b.ns.channel_of(&fqdn("cn.dc1.example")), None);
        // Whatever is left open waits for a subscription at most 30 s.
        b.run_until(b.now + Duration::from_secs(30));
        for e in b.events() {
            if let NsEvent::CloseConnection(c) = e {
                b.ns.close_connection(c);
            }
        }
        assert_eq!(b.ns.connections(), 0);
        assert!(b.ns.drops().total() > 3_000, "{:?}", b.ns.drops());
    }
}
