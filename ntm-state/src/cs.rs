//! The cache server (CS) as a sans-IO state machine: store-and-forward of blobs for a node of its
//! DC's zone that is offline (spec/05-procedures.md §5.14). A blob is a sealed box to the
//! recipient's static X25519 key (spec/04-crypto.md §4.10): the CS cannot open it, it only holds
//! it, names who stored it, and hands it out.
//!
//! ```text
//! sender              CS                                DC                recipient
//!  | CACHE_STORE [K_cs]|                                 |                      |
//!  |------------------>| held (TTL, quotas), item_id 1.. |                      |
//!  | ACK               |                                 |                      |
//!  |<------------------|   KEY_DISTRIBUTION(NodeCs) [K_ds] (recipient online)   |
//!  |                   |<--------------------------------|                      |
//!  |                   | ACK, then NOTIFICATION(CachedData) [K_ds], until ACKed |
//!  |                   |-------------------------------->|                      |
//!  |                   |            CACHE_FETCH(max_items, acknowledged_through) |
//!  |                   |<-------------------------------------------------------|
//!  |                   | one CACHE_DATA per held blob (item_id ascending), or ACK
//!  |                   |------------------------------------------------------->|
//! ```
//!
//! # Driving it
//!
//! Feed every UDP datagram to [`CacheServer::handle_datagram`] with the local address it arrived
//! on, and call [`CacheServer::handle_timeout`] when the deadline of
//! [`CacheServer::poll_timeout`] has passed. After each input drain [`CacheServer::poll_event`]
//! first, then [`CacheServer::poll_transmit`], until only a timeout is left. A
//! [`CsEvent::SequenceReserved`] must be made durable before any datagram polled after it is
//! sent (spec/04 §4.7).
//!
//! # What it keeps
//!
//! * The **DC↔CS key** from configuration, and at most one key the DC distributed to replace it
//!   (KEY_DISTRIBUTION(DcCs), sealed under a key the CS holds); the CS notifies under the newest.
//! * One **session** per node↔CS key (KEY_DISTRIBUTION(NodeCs)), at most
//!   [`CsLimits::max_sessions`], until its lifetime ends and then for the expired-key grace, in
//!   which requests under it draw ERROR Expired. Each session remembers its recent CACHE_STOREs
//!   (30 s) so that a retransmission is answered again and never stored twice.
//! * Per **recipient**: the blobs held for it by `item_id`, with the storing node's FQDN, the
//!   time stored and the expiry. Quotas bound blobs and bytes per recipient and in total; a
//!   record is forgotten when it holds nothing and the recipient has no live session (its
//!   `item_id`s then start again from 1, which the recipient cannot tell from a fresh start).
//! * Outstanding **NOTIFICATION(CachedData)** to the DC, at most one per node session,
//!   retransmitted on the schedule of spec/07 until the DC's ACK.
//!
//! A session's node counts as *online* for the CS: the DC sends KEY_DISTRIBUTION(NodeCs) at a
//! session's first registration (spec/05 §5.2 step 8), which is what tells the CS the recipient
//! came online.

use core::fmt;
use core::time::Duration;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;

use ntm_wire::crypto::SEALED_BOX_OVERHEAD;
use ntm_wire::message::Error as ErrorMsg;
use ntm_wire::{
    Ack, Blob, CacheData, CacheFetch, CacheStore, ErrorCode, Extensions, Fqdn, Header,
    KeyDistribution, KeyRole, Message, MessageType, Notification, NotifyReason, Role, SecretKey,
    WireError,
};
use rand_core::{CryptoRng, RngCore};

use crate::signaling::{
    DropCounters, DropReason, Expiry, RetransmitConfig, RttEstimator, SealError, ServerOutput,
    SignalingKey, Transaction, Transmit,
};
use crate::time::Time;

// ---------------------------------------------------------------------------------------------
// The DC↔server key, shared by the CS and the NS.

/// How a KEY_DISTRIBUTION of a DC↔server key was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Installed {
    /// A new key: it replaces the distributed key held before, if any.
    New,
    /// The key already held under that ID (a retransmission): acknowledged again.
    Again,
}

struct DistributedKey {
    key: SignalingKey,
    /// Kept to recognise a retransmitted distribution (compared in constant time).
    secret: SecretKey,
    expires: Time,
}

/// The DC↔server key (K_ds) as a server holds it: the pre-shared key from configuration, whose
/// sequence numbers are reserved in persisted blocks, and at most one key the DC distributed to
/// replace it (spec/01 §1.4). Distributed keys are not persisted: after a restart the server
/// speaks under the configured key until the DC distributes again, so a distributed key's
/// sequence numbers start at 0 and are never reused.
pub(crate) struct DcKeyRing {
    configured: SignalingKey,
    distributed: Option<DistributedKey>,
}

impl DcKeyRing {
    pub(crate) fn new(secret: &SecretKey, key_id: u32, high_water_mark: u64, block: u64) -> Self {
        DcKeyRing {
            configured: SignalingKey::resume(secret, key_id, Role::B, high_water_mark, block),
            distributed: None,
        }
    }

    pub(crate) fn key_mut(&mut self, key_id: u32) -> Option<&mut SignalingKey> {
        if self.configured.key_id() == key_id {
            return Some(&mut self.configured);
        }
        self.distributed
            .as_mut()
            .filter(|d| d.key.key_id() == key_id)
            .map(|d| &mut d.key)
    }

    /// The key ID a server-initiated message is sealed under: the newest key.
    pub(crate) fn current_id(&self) -> u32 {
        self.distributed
            .as_ref()
            .map_or(self.configured.key_id(), |d| d.key.key_id())
    }

    /// When the distributed key expires.
    pub(crate) fn expiry(&self) -> Option<Time> {
        self.distributed.as_ref().map(|d| d.expires)
    }

    /// Forgets the distributed key if its lifetime has ended at `now`.
    pub(crate) fn expire(&mut self, now: Time) -> Option<u32> {
        let due = self.distributed.as_ref().filter(|d| d.expires <= now)?;
        let id = due.key.key_id();
        self.distributed = None;
        Some(id)
    }

    /// Takes a distributed DC↔server key (the caller checked role and subject).
    pub(crate) fn install(
        &mut self,
        now: Time,
        kd: &KeyDistribution,
    ) -> Result<Installed, ErrorCode> {
        if kd.new_key_id == 0 || kd.new_key_id == self.configured.key_id() {
            return Err(ErrorCode::WrongState);
        }
        if let Some(d) = &self.distributed {
            if d.key.key_id() == kd.new_key_id {
                return if d.secret == kd.key {
                    Ok(Installed::Again)
                } else {
                    Err(ErrorCode::WrongState)
                };
            }
        }
        self.distributed = Some(DistributedKey {
            key: SignalingKey::new(&kd.key, kd.new_key_id, Role::B),
            secret: kd.key.clone(),
            expires: now + Duration::from_secs(u64::from(kd.lifetime_s)),
        });
        Ok(Installed::New)
    }

    /// Seals `msg` under `key_id`; also returns a new high-water mark to persist, if any.
    pub(crate) fn seal(
        &mut self,
        key_id: u32,
        msg: &Message,
        txid: u32,
    ) -> (Result<Vec<u8>, SealError>, Option<u64>) {
        let Some(key) = self.key_mut(key_id) else {
            return (Err(SealError::NoKey), None);
        };
        let datagram = key.seal_to_vec(msg, txid, None);
        (datagram, key.take_reserved_through())
    }
}

/// Whether `name` is exactly one label below `zone` (a node name of that zone).
pub(crate) fn is_node_of(name: &Fqdn, zone: &Fqdn) -> bool {
    let (n, z) = (name.as_str(), zone.as_str());
    name.is_within(zone)
        && n.len() > z.len()
        && n.get(..n.len() - z.len() - 1)
            .is_some_and(|label| !label.contains('.'))
}

pub(crate) fn error_msg(code: ErrorCode, failed: MessageType) -> Message {
    ErrorMsg {
        code,
        failed_type: failed.to_u8(),
        retry_after_ms: 0,
        extensions: Extensions::none(),
    }
    .into()
}

pub(crate) fn ack_msg(acked: MessageType) -> Message {
    Ack {
        acked_type: acked.to_u8(),
        extensions: Extensions::none(),
    }
    .into()
}

/// The ERROR code for a request that authenticated but does not decode.
pub(crate) fn undecodable_code(e: &WireError) -> ErrorCode {
    match e {
        WireError::UnknownCriticalExtension(_) => ErrorCode::UnknownCriticalExtension,
        _ => ErrorCode::Malformed,
    }
}

fn secs_u32(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

// ---------------------------------------------------------------------------------------------
// Configuration.

/// Every bound on the CS's memory and work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CsLimits {
    /// Blobs held for one recipient: 64 (spec/07, range 1 to 1024).
    pub max_blobs_per_recipient: usize,
    /// Blob bytes held for one recipient.
    pub max_bytes_per_recipient: usize,
    /// Blobs held in all.
    pub max_blobs_total: usize,
    /// Blob bytes held in all.
    pub max_bytes_total: usize,
    /// Node↔CS keys held (those in grace included); a KEY_DISTRIBUTION(NodeCs) beyond it is
    /// refused with ERROR Unavailable.
    pub max_sessions: usize,
    /// CACHE_STORE answers each session remembers for retransmissions.
    pub max_answers_per_session: usize,
    /// How long a CACHE_STORE answer is remembered: 30 s.
    pub answer_kept: Duration,
    /// The most CACHE_DATA one CACHE_FETCH draws, whatever its `max_items`.
    pub max_fetch_batch: usize,
    /// NOTIFICATION(CachedData) outstanding to the DC.
    pub max_pending_notifications: usize,
    /// How long an expired node↔CS key is kept to answer ERROR Expired: 10 min.
    pub expired_key_grace: Duration,
    /// Unsealed ERRORs per source prefix (IPv4 /24, IPv6 /64) per second: 10.
    pub unsealed_errors_per_second: u32,
    pub max_tracked_prefixes: usize,
    pub max_queued_transmits: usize,
    pub max_queued_events: usize,
    /// Sequence numbers reserved at a time under the configured DC↔CS key (spec/04 §4.7).
    pub sequence_block: u64,
}

impl Default for CsLimits {
    fn default() -> Self {
        CsLimits {
            max_blobs_per_recipient: 64,
            max_bytes_per_recipient: 64 * Blob::MAX_LEN,
            max_blobs_total: 65_536,
            max_bytes_total: 64 << 20,
            max_sessions: 16_384,
            max_answers_per_session: 16,
            answer_kept: Duration::from_secs(30),
            max_fetch_batch: 64,
            max_pending_notifications: 1024,
            expired_key_grace: Duration::from_secs(600),
            unsealed_errors_per_second: 10,
            max_tracked_prefixes: 4096,
            max_queued_transmits: 1024,
            max_queued_events: 1024,
            sequence_block: 1 << 16,
        }
    }
}

/// The CS's configuration.
#[derive(Clone, Debug)]
pub struct CsConfig {
    /// The CS's configured FQDN, in its DC's zone: the subject of KEY_DISTRIBUTION(DcCs).
    pub fqdn: Fqdn,
    /// Its DC's zone: the CS holds blobs only for nodes one label below it.
    pub zone: Fqdn,
    /// Where NOTIFICATION(CachedData) goes: the DC's signaling address.
    pub dc_addr: SocketAddr,
    /// The pre-shared DC↔CS key.
    pub dc_key: SecretKey,
    /// Its configured key ID: non-zero, top bit clear.
    pub dc_key_id: u32,
    /// The persisted high-water mark of the CS's sequence numbers under that key (0 when new).
    pub dc_high_water_mark: u64,
    /// The TTL of a blob stored with `ttl_s = 0`: 1 day.
    pub default_ttl: Duration,
    /// The longest TTL: 7 days; a larger `ttl_s` is cut to it.
    pub max_ttl: Duration,
    pub retransmit: RetransmitConfig,
    pub limits: CsLimits,
}

impl CsConfig {
    /// The defaults of spec/07 for everything but names, the DC's address and key.
    pub fn new(
        fqdn: Fqdn,
        zone: Fqdn,
        dc_addr: SocketAddr,
        dc_key: SecretKey,
        dc_key_id: u32,
    ) -> Self {
        CsConfig {
            fqdn,
            zone,
            dc_addr,
            dc_key,
            dc_key_id,
            dc_high_water_mark: 0,
            default_ttl: Duration::from_secs(86_400),
            max_ttl: Duration::from_secs(7 * 86_400),
            retransmit: RetransmitConfig::default(),
            limits: CsLimits::default(),
        }
    }
}

/// A configuration the CS refuses to run with.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CsConfigError {
    /// The DC key ID is 0 or has the top bit set.
    InvalidDcKeyId(u32),
    /// The CS's name is not in its zone.
    NameOutsideZone,
    /// The TTLs are zero, the default exceeds the maximum, or the maximum does not fit `ttl_s`.
    InvalidTtl,
    /// A limit is zero where at least one is needed, or the per-recipient quota is over 1024.
    InvalidLimit(&'static str),
}

impl fmt::Display for CsConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CsConfigError::InvalidDcKeyId(id) => {
                write!(
                    f,
                    "DC key ID {id:#x}: must be non-zero with the top bit clear"
                )
            }
            CsConfigError::NameOutsideZone => f.write_str("the CS's name must be in its zone"),
            CsConfigError::InvalidTtl => {
                f.write_str("TTLs must be non-zero, default <= max, max below 2^32 s")
            }
            CsConfigError::InvalidLimit(which) => write!(f, "limit {which} is out of range"),
        }
    }
}

impl std::error::Error for CsConfigError {}

/// What the CS reports to its operator and its runtime.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CsEvent {
    /// A blob was stored for `recipient` by `sender`.
    BlobStored {
        recipient: Fqdn,
        sender: Fqdn,
        item_id: u64,
        len: usize,
    },
    /// A CACHE_FETCH acknowledged `count` blobs, which are deleted.
    BlobsDelivered { recipient: Fqdn, count: usize },
    /// A blob outlived its TTL unread and is deleted.
    BlobExpired { recipient: Fqdn, item_id: u64 },
    /// The DC never acknowledged, or refused, a NOTIFICATION(CachedData) for the node.
    NotificationFailed {
        recipient: Fqdn,
        node_key_id: u32,
        /// The DC's sealed ERROR code, or `None` when the retransmissions ran out.
        refused: Option<ErrorCode>,
    },
    /// The DC replaced the DC↔CS key (KEY_DISTRIBUTION(DcCs)).
    DcKeyReplaced { key_id: u32 },
    /// Persist `through` as the high-water mark under the configured DC↔CS key before sending
    /// any datagram polled after this event.
    SequenceReserved { key_id: u32, through: u64 },
}

// ---------------------------------------------------------------------------------------------
// State.

/// A node↔CS key and what the CS keeps with it.
struct Session {
    fqdn: Fqdn,
    /// Kept to recognise a retransmitted KEY_DISTRIBUTION (compared in constant time).
    secret: SecretKey,
    key: SignalingKey,
    /// The lifetime's end, or, once `expired`, the end of the grace.
    deadline: Time,
    expired: bool,
    /// Recent CACHE_STORE answers by transaction ID, oldest first.
    answers: VecDeque<(u32, Time, Message)>,
}

struct Held {
    sender: Fqdn,
    stored: Time,
    expires: Time,
    blob: Blob,
}

#[derive(Default)]
struct Recipient {
    /// The next `item_id` (the first is 1).
    next_item: u64,
    blobs: BTreeMap<u64, Held>,
    bytes: usize,
}

struct PendingNotification {
    recipient: Fqdn,
    node_key_id: u32,
    tx: Transaction,
}

/// What a deadline in the index belongs to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Due {
    /// A held blob's TTL.
    Blob(Fqdn, u64),
    /// A session's expiry, or the end of its grace.
    Session(u32),
    /// The distributed DC↔CS key's expiry.
    DcKey,
    /// A NOTIFICATION's retransmission (by transaction ID).
    Notify(u32),
}

/// The cache server. See the [module documentation](self).
pub struct CacheServer {
    config: CsConfig,
    dc_keys: DcKeyRing,
    dc_rtt: RttEstimator,
    sessions: BTreeMap<u32, Session>,
    /// The newest live session of each node name: the node counts as online.
    online: BTreeMap<Fqdn, u32>,
    recipients: BTreeMap<Fqdn, Recipient>,
    total_blobs: usize,
    total_bytes: usize,
    notifications: BTreeMap<u32, PendingNotification>,
    /// Node session key IDs with a NOTIFICATION outstanding.
    notifying: BTreeSet<u32>,
    deadlines: BTreeSet<(Time, Due)>,
    output: ServerOutput<CsEvent>,
    drops: DropCounters,
}

impl fmt::Debug for CacheServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheServer")
            .field("fqdn", &self.config.fqdn)
            .field("sessions", &self.sessions.len())
            .field("blobs", &self.total_blobs)
            .field("bytes", &self.total_bytes)
            .field("drops", &self.drops)
            .finish_non_exhaustive()
    }
}

impl CacheServer {
    /// Checks the configuration and starts empty.
    pub fn new(config: CsConfig) -> Result<Self, CsConfigError> {
        if config.dc_key_id == 0 || config.dc_key_id & 0x8000_0000 != 0 {
            return Err(CsConfigError::InvalidDcKeyId(config.dc_key_id));
        }
        if !config.fqdn.is_within(&config.zone) {
            return Err(CsConfigError::NameOutsideZone);
        }
        if config.default_ttl.is_zero()
            || config.default_ttl > config.max_ttl
            || u32::try_from(config.max_ttl.as_secs()).is_err()
        {
            return Err(CsConfigError::InvalidTtl);
        }
        let l = config.limits;
        for (v, name) in [
            (l.max_blobs_total, "max_blobs_total"),
            (l.max_bytes_total, "max_bytes_total"),
            (l.max_bytes_per_recipient, "max_bytes_per_recipient"),
            (l.max_fetch_batch, "max_fetch_batch"),
        ] {
            if v == 0 {
                return Err(CsConfigError::InvalidLimit(name));
            }
        }
        if !(1..=1024).contains(&l.max_blobs_per_recipient) {
            return Err(CsConfigError::InvalidLimit("max_blobs_per_recipient"));
        }
        Ok(CacheServer {
            dc_keys: DcKeyRing::new(
                &config.dc_key,
                config.dc_key_id,
                config.dc_high_water_mark,
                l.sequence_block,
            ),
            dc_rtt: RttEstimator::default(),
            sessions: BTreeMap::new(),
            online: BTreeMap::new(),
            recipients: BTreeMap::new(),
            total_blobs: 0,
            total_bytes: 0,
            notifications: BTreeMap::new(),
            notifying: BTreeSet::new(),
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

    pub fn config(&self) -> &CsConfig {
        &self.config
    }

    /// Datagrams dropped, by reason.
    pub fn drops(&self) -> &DropCounters {
        &self.drops
    }

    /// Events lost because the queue was full.
    pub fn events_lost(&self) -> u64 {
        self.output.events_lost()
    }

    /// Node↔CS keys held, those in grace included.
    pub fn sessions_held(&self) -> usize {
        self.sessions.len()
    }

    /// Blobs and blob bytes held in all.
    pub fn held(&self) -> (usize, usize) {
        (self.total_blobs, self.total_bytes)
    }

    /// The `item_id`s held for `recipient`, ascending.
    pub fn held_for(&self, recipient: &Fqdn) -> Vec<u64> {
        self.recipients
            .get(recipient)
            .map(|r| r.blobs.keys().copied().collect())
            .unwrap_or_default()
    }

    /// NOTIFICATION(CachedData) outstanding to the DC.
    pub fn notifications_outstanding(&self) -> usize {
        self.notifications.len()
    }

    /// A datagram arrived at `local` from `remote`. `buf` is opened in place.
    pub fn handle_datagram<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        buf: &mut [u8],
        rng: &mut R,
    ) {
        if let Err(reason) = self.dispatch(now, local, remote, buf, rng) {
            self.drops.record(&reason);
        }
    }

    fn dispatch<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        buf: &mut [u8],
        rng: &mut R,
    ) -> Result<(), DropReason> {
        let header = self.output.intake(now, local, remote, buf, Role::B)?;
        match header.msg_type {
            MessageType::KeyDistribution | MessageType::Ack | MessageType::Error => {
                self.on_dc_datagram(now, local, remote, buf, &header, rng)
            }
            MessageType::CacheStore | MessageType::CacheFetch => {
                self.on_node_request(now, local, remote, buf, &header, rng)
            }
            _ => Err(DropReason::Unexpected),
        }
    }

    // -- From the DC ---------------------------------------------------------------------------

    fn on_dc_datagram<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        buf: &mut [u8],
        header: &Header,
        rng: &mut R,
    ) -> Result<(), DropReason> {
        let key_id = header.envelope.key_id;
        let Some(key) = self.dc_keys.key_mut(key_id) else {
            if header.sealed && header.msg_type == MessageType::KeyDistribution {
                self.output.unknown_key(now, local, remote, header, Role::B);
            }
            return Err(DropReason::UnknownKey);
        };
        let (h, msg) = match key.open(buf) {
            Ok(opened) => opened,
            Err(DropReason::UndecodableBody(e))
                if header.msg_type == MessageType::KeyDistribution =>
            {
                let error = error_msg(undecodable_code(&e), MessageType::KeyDistribution);
                self.send_to_dc(Some(local), remote, key_id, &error, header.envelope.txid);
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
        let txid = h.envelope.txid;
        match msg {
            Message::KeyDistribution(kd) => {
                let (answer, then_notify) = match self.take_key(now, &kd) {
                    Ok(notify) => (ack_msg(MessageType::KeyDistribution), notify),
                    Err(code) => (error_msg(code, MessageType::KeyDistribution), None),
                };
                self.send_to_dc(Some(local), remote, key_id, &answer, txid);
                // The ACK first, then the NOTIFICATION (spec/05 §5.14, Notify).
                if let Some((recipient, node_key_id)) = then_notify {
                    self.notify(now, recipient, node_key_id, rng);
                }
                Ok(())
            }
            Message::Ack(ack) if ack.acked_type == MessageType::Notification.to_u8() => {
                let p = self
                    .notifications
                    .remove(&txid)
                    .ok_or(DropReason::Unexpected)?;
                self.deadlines.remove(&(p.tx.deadline(), Due::Notify(txid)));
                self.notifying.remove(&p.node_key_id);
                if let Some(rtt) = p.tx.rtt_sample(now) {
                    self.dc_rtt.on_sample(rtt);
                }
                Ok(())
            }
            Message::Error(e) if e.failed_type == MessageType::Notification.to_u8() => {
                let p = self
                    .notifications
                    .remove(&txid)
                    .ok_or(DropReason::Unexpected)?;
                self.deadlines.remove(&(p.tx.deadline(), Due::Notify(txid)));
                self.notifying.remove(&p.node_key_id);
                self.output.event(CsEvent::NotificationFailed {
                    recipient: p.recipient,
                    node_key_id: p.node_key_id,
                    refused: Some(e.code),
                });
                Ok(())
            }
            _ => Err(DropReason::Unexpected),
        }
    }

    /// Installs a key from the DC, or says why not. A new node key for a recipient with held
    /// blobs returns the notification to start once the ACK is queued.
    fn take_key(
        &mut self,
        now: Time,
        kd: &KeyDistribution,
    ) -> Result<Option<(Fqdn, u32)>, ErrorCode> {
        match kd.key_role {
            KeyRole::DcCs => {
                if kd.subject != self.config.fqdn {
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
                    self.output.event(CsEvent::DcKeyReplaced {
                        key_id: kd.new_key_id,
                    });
                }
                Ok(None)
            }
            KeyRole::NodeCs => self.take_node_key(now, kd),
            _ => Err(ErrorCode::WrongState),
        }
    }

    fn take_node_key(
        &mut self,
        now: Time,
        kd: &KeyDistribution,
    ) -> Result<Option<(Fqdn, u32)>, ErrorCode> {
        let key_id = kd.new_key_id;
        if key_id == 0 || !is_node_of(&kd.subject, &self.config.zone) {
            return Err(ErrorCode::WrongState);
        }
        if let Some(s) = self.sessions.get(&key_id) {
            // A retransmission (the ACK was lost) is acknowledged again and changes nothing.
            return if s.fqdn == kd.subject && s.secret == kd.key {
                Ok(None)
            } else {
                Err(ErrorCode::WrongState)
            };
        }
        if self.sessions.len() >= self.config.limits.max_sessions {
            return Err(ErrorCode::Unavailable);
        }
        let deadline = now + Duration::from_secs(u64::from(kd.lifetime_s));
        self.sessions.insert(
            key_id,
            Session {
                fqdn: kd.subject.clone(),
                secret: kd.key.clone(),
                key: SignalingKey::new(&kd.key, key_id, Role::B),
                deadline,
                expired: false,
                answers: VecDeque::new(),
            },
        );
        self.deadlines.insert((deadline, Due::Session(key_id)));
        self.online.insert(kd.subject.clone(), key_id);
        let holds = self
            .recipients
            .get(&kd.subject)
            .is_some_and(|r| !r.blobs.is_empty());
        Ok(holds.then(|| (kd.subject.clone(), key_id)))
    }

    /// Starts a NOTIFICATION(CachedData) for the node's session, unless one is outstanding.
    fn notify<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        recipient: Fqdn,
        node_key_id: u32,
        rng: &mut R,
    ) {
        if self.notifying.contains(&node_key_id)
            || self.notifications.len() >= self.config.limits.max_pending_notifications
        {
            return;
        }
        let mut txid = rng.next_u32();
        while txid == 0 || self.notifications.contains_key(&txid) {
            txid = rng.next_u32();
        }
        let dc = self.config.dc_addr;
        let rto = self.dc_rtt.rto(&self.config.retransmit);
        let tx = Transaction::start(
            now,
            txid,
            MessageType::Notification,
            dc,
            rto,
            &self.config.retransmit,
            rng,
        );
        self.deadlines.insert((tx.deadline(), Due::Notify(txid)));
        self.notifications.insert(
            txid,
            PendingNotification {
                recipient,
                node_key_id,
                tx,
            },
        );
        self.notifying.insert(node_key_id);
        self.send_notification(node_key_id, txid);
    }

    fn send_notification(&mut self, node_key_id: u32, txid: u32) {
        let msg: Message = Notification {
            node_key_id,
            reason: NotifyReason::CachedData,
            payload: Blob::default(),
            extensions: Extensions::none(),
        }
        .into();
        let key_id = self.dc_keys.current_id();
        let dc = self.config.dc_addr;
        self.send_to_dc(None, dc, key_id, &msg, txid);
    }

    fn send_to_dc(
        &mut self,
        local: Option<SocketAddr>,
        remote: SocketAddr,
        key_id: u32,
        msg: &Message,
        txid: u32,
    ) {
        let (datagram, reserved) = self.dc_keys.seal(key_id, msg, txid);
        if let Some(through) = reserved {
            self.output
                .event(CsEvent::SequenceReserved { key_id, through });
        }
        self.output.queue(local, remote, datagram);
    }

    // -- From nodes ----------------------------------------------------------------------------

    fn on_node_request<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        buf: &mut [u8],
        header: &Header,
        rng: &mut R,
    ) -> Result<(), DropReason> {
        let key_id = header.envelope.key_id;
        let txid = header.envelope.txid;
        let Some(session) = self.sessions.get_mut(&key_id) else {
            if header.sealed {
                self.output.unknown_key(now, local, remote, header, Role::B);
            }
            return Err(DropReason::UnknownKey);
        };
        let (h, msg) = match session.key.open(buf) {
            Ok(opened) => opened,
            Err(DropReason::UndecodableBody(e)) => {
                let error = error_msg(undecodable_code(&e), header.msg_type);
                self.send_to_node(local, remote, key_id, &error, txid);
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
        if session.expired {
            let error = error_msg(ErrorCode::Expired, h.msg_type);
            self.send_to_node(local, remote, key_id, &error, txid);
            return Ok(());
        }
        match msg {
            Message::CacheStore(store) => {
                let kept = self.config.limits.answer_kept;
                let again = session
                    .answers
                    .iter()
                    .find(|(t, at, _)| *t == txid && now < *at + kept)
                    .map(|(_, _, answer)| answer.clone());
                let answer = match again {
                    Some(answer) => answer,
                    None => {
                        let answer = match self.store(now, key_id, store, rng) {
                            Ok(()) => ack_msg(MessageType::CacheStore),
                            Err(code) => error_msg(code, MessageType::CacheStore),
                        };
                        self.remember(now, key_id, txid, answer.clone());
                        answer
                    }
                };
                self.send_to_node(local, remote, key_id, &answer, txid);
                Ok(())
            }
            Message::CacheFetch(fetch) => {
                self.fetch(now, local, remote, key_id, txid, fetch);
                Ok(())
            }
            _ => Err(DropReason::Unexpected),
        }
    }

    fn remember(&mut self, now: Time, key_id: u32, txid: u32, answer: Message) {
        let l = self.config.limits;
        let Some(s) = self.sessions.get_mut(&key_id) else {
            return;
        };
        while s
            .answers
            .front()
            .is_some_and(|(_, at, _)| *at + l.answer_kept <= now)
        {
            s.answers.pop_front();
        }
        if l.max_answers_per_session == 0 {
            return;
        }
        while s.answers.len() >= l.max_answers_per_session {
            s.answers.pop_front();
        }
        s.answers.push_back((txid, now, answer));
    }

    /// Holds a blob, or says why not.
    fn store<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        key_id: u32,
        store: CacheStore,
        rng: &mut R,
    ) -> Result<(), ErrorCode> {
        let sender = self
            .sessions
            .get(&key_id)
            .map(|s| s.fqdn.clone())
            .ok_or(ErrorCode::WrongState)?;
        // v1 has no message between a CS and another domain (spec/05 §5.14, Scope).
        if !is_node_of(&store.recipient_fqdn, &self.config.zone) {
            return Err(ErrorCode::NotFound);
        }
        let len = store.blob.as_bytes().len();
        // Shorter than an ephemeral key and a tag, it cannot be a sealed box.
        if len < SEALED_BOX_OVERHEAD {
            return Err(ErrorCode::Malformed);
        }
        let l = self.config.limits;
        let (count, bytes) = self
            .recipients
            .get(&store.recipient_fqdn)
            .map_or((0, 0), |r| (r.blobs.len(), r.bytes));
        if count >= l.max_blobs_per_recipient
            || bytes.saturating_add(len) > l.max_bytes_per_recipient
            || self.total_blobs >= l.max_blobs_total
            || self.total_bytes.saturating_add(len) > l.max_bytes_total
        {
            return Err(ErrorCode::QuotaExceeded);
        }
        let ttl = match store.ttl_s {
            0 => self.config.default_ttl,
            s => Duration::from_secs(u64::from(s)).min(self.config.max_ttl),
        };
        let recipient = self
            .recipients
            .entry(store.recipient_fqdn.clone())
            .or_default();
        let item_id = recipient.next_item.max(1);
        recipient.next_item = item_id.saturating_add(1);
        recipient.bytes = recipient.bytes.saturating_add(len);
        recipient.blobs.insert(
            item_id,
            Held {
                sender: sender.clone(),
                stored: now,
                expires: now + ttl,
                blob: store.blob,
            },
        );
        self.total_blobs = self.total_blobs.saturating_add(1);
        self.total_bytes = self.total_bytes.saturating_add(len);
        self.deadlines
            .insert((now + ttl, Due::Blob(store.recipient_fqdn.clone(), item_id)));
        self.output.event(CsEvent::BlobStored {
            recipient: store.recipient_fqdn.clone(),
            sender,
            item_id,
            len,
        });
        if let Some(&node_key_id) = self.online.get(&store.recipient_fqdn) {
            self.notify(now, store.recipient_fqdn, node_key_id, rng);
        }
        Ok(())
    }

    /// Deletes what the fetch acknowledges, then sends what is held, oldest first.
    fn fetch(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        key_id: u32,
        txid: u32,
        fetch: CacheFetch,
    ) {
        let Some(fqdn) = self.sessions.get(&key_id).map(|s| s.fqdn.clone()) else {
            return;
        };
        let mut delivered = 0usize;
        let mut batch = Vec::new();
        if let Some(r) = self.recipients.get_mut(&fqdn) {
            // split_off keeps the keys >= the bound in the second half.
            let keep = r
                .blobs
                .split_off(&fetch.acknowledged_through.saturating_add(1));
            let acked = core::mem::replace(&mut r.blobs, keep);
            for (item, held) in acked {
                delivered = delivered.saturating_add(1);
                let len = held.blob.as_bytes().len();
                r.bytes = r.bytes.saturating_sub(len);
                self.total_blobs = self.total_blobs.saturating_sub(1);
                self.total_bytes = self.total_bytes.saturating_sub(len);
                self.deadlines
                    .remove(&(held.expires, Due::Blob(fqdn.clone(), item)));
            }
            // max_items 0 would leave the node without an answer: it draws one blob.
            let want = usize::from(fetch.max_items)
                .max(1)
                .min(self.config.limits.max_fetch_batch);
            let total = r.blobs.len();
            for (i, (item, held)) in r.blobs.iter().take(want).enumerate() {
                let remaining = total.saturating_sub(i).saturating_sub(1);
                let msg: Message = CacheData {
                    item_id: *item,
                    sender_fqdn: held.sender.clone(),
                    age_s: secs_u32(now - held.stored),
                    remaining: u16::try_from(remaining).unwrap_or(u16::MAX),
                    blob: held.blob.clone(),
                    extensions: Extensions::none(),
                }
                .into();
                batch.push(msg);
            }
        }
        if delivered > 0 {
            self.output.event(CsEvent::BlobsDelivered {
                recipient: fqdn.clone(),
                count: delivered,
            });
        }
        self.forget_if_idle(&fqdn);
        if batch.is_empty() {
            batch.push(ack_msg(MessageType::CacheFetch));
        }
        for msg in batch {
            self.send_to_node(local, remote, key_id, &msg, txid);
        }
    }

    /// Forgets a recipient record that holds nothing while its node has no live session.
    fn forget_if_idle(&mut self, fqdn: &Fqdn) {
        let idle = self
            .recipients
            .get(fqdn)
            .is_some_and(|r| r.blobs.is_empty());
        if idle && !self.online.contains_key(fqdn) {
            self.recipients.remove(fqdn);
        }
    }

    fn send_to_node(
        &mut self,
        local: SocketAddr,
        remote: SocketAddr,
        key_id: u32,
        msg: &Message,
        txid: u32,
    ) {
        let datagram = match self.sessions.get_mut(&key_id) {
            Some(s) => s.key.seal_to_vec(msg, txid, None),
            None => Err(SealError::NoKey),
        };
        self.output.queue(Some(local), remote, datagram);
    }

    // -- Time and output -----------------------------------------------------------------------

    /// Timers due at `now` fire: blobs expire, session keys expire and are forgotten,
    /// NOTIFICATIONs are retransmitted or given up.
    pub fn handle_timeout<R: RngCore + CryptoRng>(&mut self, now: Time, rng: &mut R) {
        while let Some((at, due)) = self.deadlines.first().cloned() {
            if at > now {
                break;
            }
            self.deadlines.remove(&(at, due.clone()));
            match due {
                Due::Blob(fqdn, item) => self.blob_due(at, fqdn, item),
                Due::Session(key_id) => self.session_due(at, key_id),
                Due::DcKey => {
                    self.dc_keys.expire(now);
                }
                Due::Notify(txid) => self.notify_due(now, txid, rng),
            }
        }
    }

    fn blob_due(&mut self, at: Time, fqdn: Fqdn, item: u64) {
        let Some(r) = self.recipients.get_mut(&fqdn) else {
            return;
        };
        if r.blobs.get(&item).is_none_or(|h| h.expires > at) {
            return;
        }
        if let Some(held) = r.blobs.remove(&item) {
            let len = held.blob.as_bytes().len();
            r.bytes = r.bytes.saturating_sub(len);
            self.total_blobs = self.total_blobs.saturating_sub(1);
            self.total_bytes = self.total_bytes.saturating_sub(len);
            self.output.event(CsEvent::BlobExpired {
                recipient: fqdn.clone(),
                item_id: item,
            });
        }
        self.forget_if_idle(&fqdn);
    }

    fn session_due(&mut self, at: Time, key_id: u32) {
        let grace = self.config.limits.expired_key_grace;
        let Some(s) = self.sessions.get_mut(&key_id) else {
            return;
        };
        if s.deadline > at {
            return;
        }
        if s.expired {
            self.sessions.remove(&key_id);
            return;
        }
        s.expired = true;
        s.deadline = at + grace;
        let fqdn = s.fqdn.clone();
        self.deadlines.insert((at + grace, Due::Session(key_id)));
        if self.online.get(&fqdn) == Some(&key_id) {
            self.online.remove(&fqdn);
            self.forget_if_idle(&fqdn);
        }
    }

    fn notify_due<R: RngCore + CryptoRng>(&mut self, now: Time, txid: u32, rng: &mut R) {
        let Some(p) = self.notifications.get_mut(&txid) else {
            return;
        };
        match p.tx.on_timeout(now, &self.config.retransmit, rng) {
            Expiry::NotDue => {
                self.deadlines.insert((p.tx.deadline(), Due::Notify(txid)));
            }
            Expiry::Retransmit => {
                let node_key_id = p.node_key_id;
                self.deadlines.insert((p.tx.deadline(), Due::Notify(txid)));
                self.send_notification(node_key_id, txid);
            }
            Expiry::Failed => {
                if let Some(p) = self.notifications.remove(&txid) {
                    self.notifying.remove(&p.node_key_id);
                    self.output.event(CsEvent::NotificationFailed {
                        recipient: p.recipient,
                        node_key_id: p.node_key_id,
                        refused: None,
                    });
                }
            }
        }
    }

    /// The next datagram to send, written into `buf` (give it at least
    /// [`ntm_wire::MAX_SIGNALING_LEN`] bytes).
    pub fn poll_transmit(&mut self, _now: Time, buf: &mut [u8]) -> Option<Transmit> {
        self.output.poll_transmit(buf)
    }

    pub fn poll_event(&mut self) -> Option<CsEvent> {
        self.output.poll_event()
    }

    /// The earliest deadline and what it is for.
    pub fn poll_timeout(&self) -> Option<(Time, &'static str)> {
        let (at, due) = self.deadlines.first()?;
        let label = match due {
            Due::Blob(..) => "cached blob expiry",
            Due::Session(id) => match self.sessions.get(id) {
                Some(s) if s.expired => "expired node key removal",
                _ => "node key expiry",
            },
            Due::DcKey => "distributed DC key expiry",
            Due::Notify(_) => "notification retransmission",
        };
        Some((*at, label))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ntm_wire::crypto::{node_cs_key, open_box, seal_box, x25519_public};
    use ntm_wire::{SignalingPacket, MAX_SIGNALING_LEN};
    use rand_chacha::ChaCha8Rng;
    use rand_core::SeedableRng;

    const DC_KEY_ID: u32 = 21;

    fn fqdn(s: &str) -> Fqdn {
        Fqdn::new(s).unwrap()
    }

    fn cs_addr() -> SocketAddr {
        SocketAddr::from(([203, 0, 113, 40], 4284))
    }

    fn dc_addr() -> SocketAddr {
        SocketAddr::from(([203, 0, 113, 10], 4281))
    }

    fn node_addr(n: u8) -> SocketAddr {
        SocketAddr::from(([198, 51, 100, n], 5000))
    }

    fn config() -> CsConfig {
        CsConfig::new(
            fqdn("cs1.dc1.example"),
            fqdn("dc1.example"),
            dc_addr(),
            SecretKey::from_bytes([5; 32]),
            DC_KEY_ID,
        )
    }

    /// The recipient's static key pair (for real sealed boxes).
    const RECIPIENT_SECRET: [u8; 32] = [0x42; 32];

    fn sealed_blob(plaintext: &[u8]) -> Blob {
        let public = x25519_public(&RECIPIENT_SECRET);
        Blob::new(seal_box(&public, &[0x17; 32], plaintext).unwrap()).unwrap()
    }

    /// A CS with the DC's end of the DC↔CS key, driven by hand.
    struct Bench {
        cs: CacheServer,
        rng: ChaCha8Rng,
        dc: SignalingKey,
        now: Time,
    }

    /// One node's end of its node↔CS key.
    struct NodeEnd {
        key: SignalingKey,
        addr: SocketAddr,
    }

    impl Bench {
        fn new(config: CsConfig) -> Self {
            Bench {
                cs: CacheServer::new(config).unwrap(),
                rng: ChaCha8Rng::seed_from_u64(7),
                dc: SignalingKey::new(&SecretKey::from_bytes([5; 32]), DC_KEY_ID, Role::A),
                now: Time::ZERO,
            }
        }

        /// Delivers a datagram; returns what the CS sends, as (source, destination, bytes).
        fn deliver(
            &mut self,
            remote: SocketAddr,
            mut d: Vec<u8>,
        ) -> Vec<(Option<SocketAddr>, SocketAddr, Vec<u8>)> {
            self.cs
                .handle_datagram(self.now, cs_addr(), remote, &mut d, &mut self.rng);
            self.drain()
        }

        fn drain(&mut self) -> Vec<(Option<SocketAddr>, SocketAddr, Vec<u8>)> {
            let mut buf = [0u8; MAX_SIGNALING_LEN];
            std::iter::from_fn(|| {
                self.cs
                    .poll_transmit(self.now, &mut buf)
                    .map(|t| (t.src, t.dst, buf[..t.len].to_vec()))
            })
            .collect()
        }

        fn events(&mut self) -> Vec<CsEvent> {
            std::iter::from_fn(|| self.cs.poll_event()).collect()
        }

        /// Sends a KEY_DISTRIBUTION from the DC; returns the opened answers to the DC.
        fn distribute(&mut self, kd: KeyDistribution, txid: u32) -> Vec<(Header, Message)> {
            let d = self.dc.seal_to_vec(&kd.into(), txid, None).unwrap();
            self.deliver(dc_addr(), d)
                .into_iter()
                .map(|(_, dst, mut a)| {
                    assert_eq!(dst, dc_addr());
                    self.dc.open(&mut a).unwrap()
                })
                .collect()
        }

        /// The DC hands the CS a node's key; the node's end is returned.
        fn login(&mut self, key_id: u32, name: &str, n: u8) -> (NodeEnd, Vec<(Header, Message)>) {
            let k_nd = SecretKey::from_bytes([key_id as u8; 32]);
            let k_cs = node_cs_key(&k_nd);
            let answers = self.distribute(
                KeyDistribution {
                    key_role: KeyRole::NodeCs,
                    new_key_id: key_id,
                    key: k_cs.clone(),
                    lifetime_s: 86_400,
                    subject: fqdn(name),
                    extensions: Extensions::none(),
                },
                key_id,
            );
            let (h, first) = answers.first().unwrap();
            assert_eq!(h.envelope.txid, key_id);
            assert_eq!(*first, ack_msg(MessageType::KeyDistribution));
            let node = NodeEnd {
                key: SignalingKey::new(&k_cs, key_id, Role::A),
                addr: node_addr(n),
            };
            (node, answers)
        }

        /// A node's request; returns the opened answers.
        fn ask(&mut self, node: &mut NodeEnd, msg: Message, txid: u32) -> Vec<Message> {
            let d = node.key.seal_to_vec(&msg, txid, None).unwrap();
            self.deliver(node.addr, d)
                .into_iter()
                .filter(|(_, dst, _)| *dst != dc_addr())
                .map(|(src, dst, mut a)| {
                    assert_eq!((src, dst), (Some(cs_addr()), node.addr));
                    let (h, m) = node.key.open(&mut a).unwrap();
                    assert_eq!(h.envelope.txid, txid);
                    assert_eq!(h.envelope.role, Role::B);
                    m
                })
                .collect()
        }

        fn store(
            &mut self,
            node: &mut NodeEnd,
            to: &str,
            ttl_s: u32,
            blob: Blob,
            txid: u32,
        ) -> Message {
            let msg = CacheStore {
                recipient_fqdn: fqdn(to),
                ttl_s,
                blob,
                extensions: Extensions::none(),
            };
            let mut answers = self.ask(node, msg.into(), txid);
            assert_eq!(answers.len(), 1);
            answers.remove(0)
        }

        fn fetch(
            &mut self,
            node: &mut NodeEnd,
            max_items: u8,
            through: u64,
            txid: u32,
        ) -> Vec<Message> {
            let msg = CacheFetch {
                max_items,
                acknowledged_through: through,
                extensions: Extensions::none(),
            };
            self.ask(node, msg.into(), txid)
        }

        fn run_until(&mut self, t: Time) -> Vec<(Option<SocketAddr>, SocketAddr, Vec<u8>)> {
            let mut out = Vec::new();
            while let Some((at, _)) = self.cs.poll_timeout() {
                if at > t {
                    break;
                }
                self.now = at;
                self.cs.handle_timeout(at, &mut self.rng);
                out.extend(self.drain());
            }
            self.now = t;
            out
        }
    }

    fn error_code(m: &Message) -> ErrorCode {
        match m {
            Message::Error(e) => e.code,
            other => panic!("expected an ERROR, got {other:?}"),
        }
    }

    fn data(m: &Message) -> &CacheData {
        match m {
            Message::CacheData(d) => d,
            other => panic!("expected CACHE_DATA, got {other:?}"),
        }
    }

    /// Opens a NOTIFICATION the CS sent the DC; returns its transaction ID and body.
    fn notification(b: &mut Bench, mut d: Vec<u8>) -> (Header, Notification) {
        match b.dc.open(&mut d).unwrap() {
            (h, Message::Notification(n)) => (h, n),
            other => panic!("expected a NOTIFICATION, got {other:?}"),
        }
    }

    #[test]
    fn a_blob_for_an_offline_recipient_is_held_notified_when_it_comes_online_fetched_and_released()
    {
        let mut b = Bench::new(config());
        let (mut alice, answers) = b.login(0x1001, "alice.dc1.example", 1);
        assert_eq!(answers.len(), 1, "nothing held for alice: no notification");
        let first = sealed_blob(b"first");
        assert_eq!(
            b.store(&mut alice, "bob.dc1.example", 0, first.clone(), 11),
            ack_msg(MessageType::CacheStore)
        );
        assert_eq!(
            b.store(&mut alice, "bob.dc1.example", 0, sealed_blob(b"second"), 12),
            ack_msg(MessageType::CacheStore)
        );
        assert_eq!(b.cs.held_for(&fqdn("bob.dc1.example")), vec![1, 2]);
        assert_eq!(b.cs.notifications_outstanding(), 0, "bob is offline");

        // Bob logs in: the DC's KEY_DISTRIBUTION(NodeCs) is ACKed, then the CS notifies.
        b.now = Time::from_secs(60);
        let (mut bob, answers) = b.login(0x2002, "bob.dc1.example", 2);
        assert_eq!(answers.len(), 2);
        let Message::Notification(n) = &answers[1].1 else {
            panic!("{answers:?}");
        };
        assert_eq!(answers[1].0.envelope.key_id, DC_KEY_ID);
        assert_eq!(answers[1].0.envelope.role, Role::B);
        assert_eq!(
            (n.node_key_id, n.reason, n.payload.as_bytes().len()),
            (0x2002, NotifyReason::CachedData, 0)
        );
        let ack =
            b.dc.seal_to_vec(
                &ack_msg(MessageType::Notification),
                answers[1].0.envelope.txid,
                None,
            )
            .unwrap();
        assert!(b.deliver(dc_addr(), ack).is_empty());
        assert_eq!(b.cs.notifications_outstanding(), 0);

        b.now = Time::from_secs(90);
        let batch = b.fetch(&mut bob, 8, 0, 31);
        assert_eq!(batch.len(), 2);
        let (d1, d2) = (data(&batch[0]), data(&batch[1]));
        assert_eq!((d1.item_id, d1.remaining, d1.age_s), (1, 1, 90));
        assert_eq!((d2.item_id, d2.remaining), (2, 0));
        assert_eq!(d1.sender_fqdn, fqdn("alice.dc1.example"));
        assert_eq!(d1.blob, first);
        assert_eq!(
            open_box(&RECIPIENT_SECRET, d1.blob.as_bytes()).unwrap(),
            b"first"
        );
        assert_eq!(
            open_box(&RECIPIENT_SECRET, d2.blob.as_bytes()).unwrap(),
            b"second"
        );

        let done = b.fetch(&mut bob, 8, 2, 32);
        assert_eq!(done, vec![ack_msg(MessageType::CacheFetch)]);
        assert!(b.cs.held_for(&fqdn("bob.dc1.example")).is_empty());
        assert_eq!(b.cs.held(), (0, 0));
        assert!(b.events().contains(&CsEvent::BlobsDelivered {
            recipient: fqdn("bob.dc1.example"),
            count: 2
        }));
    }

    #[test]
    fn a_retransmitted_fetch_gets_the_unacknowledged_blobs_again_and_max_items_bounds_the_batch() {
        let mut b = Bench::new(config());
        let (mut alice, _) = b.login(0x1001, "alice.dc1.example", 1);
        for i in 0..5u8 {
            b.store(
                &mut alice,
                "bob.dc1.example",
                0,
                sealed_blob(&[i]),
                100 + u32::from(i),
            );
        }
        let (mut bob, _) = b.login(0x2002, "bob.dc1.example", 2);
        b.drain();
        let batch = b.fetch(&mut bob, 2, 0, 7);
        let got: Vec<(u64, u16)> = batch
            .iter()
            .map(|m| (data(m).item_id, data(m).remaining))
            .collect();
        assert_eq!(got, vec![(1, 4), (2, 3)]);
        // The same transaction again (the answer was lost): the same blobs.
        let again: Vec<u64> = b
            .fetch(&mut bob, 2, 0, 7)
            .iter()
            .map(|m| data(m).item_id)
            .collect();
        assert_eq!(again, vec![1, 2]);
        // Acknowledging item 1 only: 2 is sent again, then 3; `remaining` counts what is held.
        let next: Vec<(u64, u16)> = b
            .fetch(&mut bob, 2, 1, 8)
            .iter()
            .map(|m| (data(m).item_id, data(m).remaining))
            .collect();
        assert_eq!(next, vec![(2, 3), (3, 2)]);
        // max_items 0 still draws an answer: one blob.
        assert_eq!(b.fetch(&mut bob, 0, 3, 9).len(), 1);
        assert_eq!(b.cs.held_for(&fqdn("bob.dc1.example")), vec![4, 5]);
    }

    #[test]
    fn a_retransmitted_store_is_answered_again_and_held_once() {
        let mut b = Bench::new(config());
        let (mut alice, _) = b.login(0x1001, "alice.dc1.example", 1);
        let blob = sealed_blob(b"once");
        for _ in 0..3 {
            assert_eq!(
                b.store(&mut alice, "bob.dc1.example", 0, blob.clone(), 5),
                ack_msg(MessageType::CacheStore)
            );
        }
        assert_eq!(b.cs.held_for(&fqdn("bob.dc1.example")), vec![1]);
        // After the answer is forgotten (30 s) the same transaction ID is a new store.
        b.now = Time::from_secs(31);
        b.store(&mut alice, "bob.dc1.example", 0, blob, 5);
        assert_eq!(b.cs.held_for(&fqdn("bob.dc1.example")), vec![1, 2]);
    }

    #[test]
    fn a_blob_for_an_online_recipient_is_notified_at_once_and_retransmitted_until_the_dc_acks() {
        let mut b = Bench::new(config());
        let (mut alice, _) = b.login(0x1001, "alice.dc1.example", 1);
        let (_bob, _) = b.login(0x2002, "bob.dc1.example", 2);
        let txid = {
            let msg = CacheStore {
                recipient_fqdn: fqdn("bob.dc1.example"),
                ttl_s: 0,
                blob: sealed_blob(b"hi"),
                extensions: Extensions::none(),
            };
            let d = alice.key.seal_to_vec(&msg.into(), 40, None).unwrap();
            let out = b.deliver(alice.addr, d);
            assert_eq!(
                out.len(),
                2,
                "the ACK to alice and the NOTIFICATION to the DC"
            );
            let (src, dst, n) = out
                .into_iter()
                .find(|(_, dst, _)| *dst == dc_addr())
                .unwrap();
            assert_eq!((src, dst), (None, dc_addr()));
            let (h, n) = notification(&mut b, n);
            assert_eq!(n.node_key_id, 0x2002);
            h.envelope.txid
        };
        // A second blob while the first NOTIFICATION is outstanding starts no second one.
        b.store(&mut alice, "bob.dc1.example", 0, sealed_blob(b"more"), 41);
        assert_eq!(b.cs.notifications_outstanding(), 1);
        assert_eq!(
            b.cs.poll_timeout().unwrap().1,
            "notification retransmission"
        );
        let resent = b.run_until(Time::from_millis(300));
        assert_eq!(resent.len(), 1);
        let (h, _) = notification(&mut b, resent[0].2.clone());
        assert_eq!(
            h.envelope.txid, txid,
            "a retransmission keeps its transaction ID"
        );
        let ack =
            b.dc.seal_to_vec(&ack_msg(MessageType::Notification), txid, None)
                .unwrap();
        b.deliver(dc_addr(), ack);
        assert!(b.run_until(Time::from_secs(20)).is_empty());
    }

    #[test]
    fn a_notification_the_dc_never_acks_fails_after_six_transmissions() {
        let mut b = Bench::new(config());
        let (mut alice, _) = b.login(0x1001, "alice.dc1.example", 1);
        b.store(
            &mut alice,
            "alice.dc1.example",
            0,
            sealed_blob(b"to myself"),
            1,
        );
        b.drain();
        b.events();
        let resent = b.run_until(Time::from_secs(30));
        assert_eq!(resent.len(), 5, "six transmissions in all");
        assert_eq!(
            b.events(),
            vec![CsEvent::NotificationFailed {
                recipient: fqdn("alice.dc1.example"),
                node_key_id: 0x1001,
                refused: None
            }]
        );
        assert_eq!(b.cs.notifications_outstanding(), 0);
    }

    #[test]
    fn the_per_recipient_quota_refuses_the_65th_blob_and_a_fetch_makes_room() {
        let mut b = Bench::new(config());
        let (mut alice, _) = b.login(0x1001, "alice.dc1.example", 1);
        for i in 0..64u32 {
            let a = b.store(
                &mut alice,
                "bob.dc1.example",
                0,
                sealed_blob(b"x"),
                1000 + i,
            );
            assert_eq!(a, ack_msg(MessageType::CacheStore));
        }
        let refused = b.store(&mut alice, "bob.dc1.example", 0, sealed_blob(b"x"), 2000);
        assert_eq!(error_code(&refused), ErrorCode::QuotaExceeded);
        // Another recipient is not affected.
        let other = b.store(&mut alice, "carol.dc1.example", 0, sealed_blob(b"x"), 2001);
        assert_eq!(other, ack_msg(MessageType::CacheStore));
        let (mut bob, _) = b.login(0x2002, "bob.dc1.example", 2);
        b.fetch(&mut bob, 1, 10, 3);
        let a = b.store(&mut alice, "bob.dc1.example", 0, sealed_blob(b"x"), 2002);
        assert_eq!(a, ack_msg(MessageType::CacheStore));
        assert_eq!(b.cs.held_for(&fqdn("bob.dc1.example")).last(), Some(&65));
    }

    #[test]
    fn the_total_byte_and_count_quotas_refuse_with_quota_exceeded() {
        let mut c = config();
        c.limits.max_bytes_total = 200;
        let mut b = Bench::new(c);
        let (mut alice, _) = b.login(0x1001, "alice.dc1.example", 1);
        let blob = Blob::new(vec![9; 90]).unwrap();
        assert_eq!(
            b.store(&mut alice, "bob.dc1.example", 0, blob.clone(), 1),
            ack_msg(MessageType::CacheStore)
        );
        assert_eq!(
            b.store(&mut alice, "carol.dc1.example", 0, blob.clone(), 2),
            ack_msg(MessageType::CacheStore)
        );
        let refused = b.store(&mut alice, "dave.dc1.example", 0, blob, 3);
        assert_eq!(error_code(&refused), ErrorCode::QuotaExceeded);
        assert_eq!(b.cs.held(), (2, 180));

        let mut c = config();
        c.limits.max_blobs_total = 1;
        let mut b = Bench::new(c);
        let (mut alice, _) = b.login(0x1001, "alice.dc1.example", 1);
        b.store(&mut alice, "bob.dc1.example", 0, sealed_blob(b"1"), 1);
        let refused = b.store(&mut alice, "carol.dc1.example", 0, sealed_blob(b"2"), 2);
        assert_eq!(error_code(&refused), ErrorCode::QuotaExceeded);
    }

    #[test]
    fn blobs_expire_after_their_ttl_which_defaults_to_a_day_and_is_cut_to_seven() {
        let mut b = Bench::new(config());
        let (mut alice, _) = b.login(0x1001, "alice.dc1.example", 1);
        b.store(
            &mut alice,
            "bob.dc1.example",
            60,
            sealed_blob(b"a minute"),
            1,
        );
        b.store(&mut alice, "bob.dc1.example", 0, sealed_blob(b"a day"), 2);
        b.store(
            &mut alice,
            "bob.dc1.example",
            u32::MAX,
            sealed_blob(b"forever"),
            3,
        );
        b.events();
        assert_eq!(
            b.cs.poll_timeout(),
            Some((Time::from_secs(60), "cached blob expiry"))
        );
        b.run_until(Time::from_secs(59));
        assert_eq!(b.cs.held_for(&fqdn("bob.dc1.example")), vec![1, 2, 3]);
        b.run_until(Time::from_secs(60));
        assert_eq!(b.cs.held_for(&fqdn("bob.dc1.example")), vec![2, 3]);
        assert_eq!(
            b.events(),
            vec![CsEvent::BlobExpired {
                recipient: fqdn("bob.dc1.example"),
                item_id: 1
            }]
        );
        b.run_until(Time::from_secs(86_400));
        assert_eq!(b.cs.held_for(&fqdn("bob.dc1.example")), vec![3]);
        b.run_until(Time::from_secs(7 * 86_400 - 1));
        assert_eq!(b.cs.held_for(&fqdn("bob.dc1.example")), vec![3]);
        b.run_until(Time::from_secs(7 * 86_400));
        assert!(b.cs.held_for(&fqdn("bob.dc1.example")).is_empty());
        assert_eq!(b.cs.held(), (0, 0));
    }

    #[test]
    fn a_recipient_outside_the_zone_is_not_found_and_a_blob_too_short_for_a_box_is_malformed() {
        let mut b = Bench::new(config());
        let (mut alice, _) = b.login(0x1001, "alice.dc1.example", 1);
        for name in ["bob.dc2.example", "x.bob.dc1.example", "dc1.example"] {
            let a = b.store(&mut alice, name, 0, sealed_blob(b"x"), 1);
            assert_eq!(error_code(&a), ErrorCode::NotFound, "{name}");
        }
        let short = Blob::new(vec![0; SEALED_BOX_OVERHEAD - 1]).unwrap();
        let a = b.store(&mut alice, "bob.dc1.example", 0, short, 2);
        assert_eq!(error_code(&a), ErrorCode::Malformed);
        assert_eq!(b.cs.held(), (0, 0));
    }

    #[test]
    fn a_request_under_an_unknown_key_draws_an_unsealed_unknown_key_of_31_bytes() {
        let mut b = Bench::new(config());
        let mut stranger = NodeEnd {
            key: SignalingKey::new(&SecretKey::from_bytes([1; 32]), 0x9999, Role::A),
            addr: node_addr(9),
        };
        let msg = CacheFetch {
            max_items: 1,
            acknowledged_through: 0,
            extensions: Extensions::none(),
        };
        let d = stranger.key.seal_to_vec(&msg.into(), 77, None).unwrap();
        let out = b.deliver(stranger.addr, d);
        assert_eq!(out.len(), 1);
        let answer = &out[0].2;
        assert_eq!(answer.len(), 31);
        let p = SignalingPacket::parse(answer).unwrap();
        assert!(!p.header().sealed);
        assert_eq!(p.header().envelope.key_id, 0x9999);
        assert_eq!(p.header().envelope.txid, 77);
        assert_eq!(
            error_code(&p.decode_plain().unwrap()),
            ErrorCode::UnknownKey
        );
        // The right key ID with the wrong key: dropped, never answered.
        let (_alice, _) = b.login(0x1001, "alice.dc1.example", 1);
        let mut forger = NodeEnd {
            key: SignalingKey::new(&SecretKey::from_bytes([1; 32]), 0x1001, Role::A),
            addr: node_addr(9),
        };
        let d = forger
            .key
            .seal_to_vec(
                &CacheFetch {
                    max_items: 1,
                    acknowledged_through: 0,
                    extensions: Extensions::none(),
                }
                .into(),
                78,
                None,
            )
            .unwrap();
        assert!(b.deliver(forger.addr, d).is_empty());
        assert_eq!(b.cs.drops().get("authentication_failed"), 1);
    }

    #[test]
    fn key_roles_the_cs_does_not_take_and_a_conflicting_node_key_are_refused_with_wrong_state() {
        let mut b = Bench::new(config());
        let kd = |role, id, subject: &str, key: u8| KeyDistribution {
            key_role: role,
            new_key_id: id,
            key: SecretKey::from_bytes([key; 32]),
            lifetime_s: 600,
            subject: fqdn(subject),
            extensions: Extensions::none(),
        };
        for (role, subject) in [
            (KeyRole::NodeDc, "alice.dc1.example"),
            (KeyRole::DcNs, "cs1.dc1.example"),
            (KeyRole::DcCs, "other.dc1.example"),
            (KeyRole::NodeCs, "alice.dc2.example"),
        ] {
            let a = b.distribute(kd(role, 0x3003, subject, 3), 1);
            assert_eq!(error_code(&a[0].1), ErrorCode::WrongState, "{role:?}");
        }
        assert_eq!(b.cs.sessions_held(), 0);
        b.login(0x1001, "alice.dc1.example", 1);
        // The same distribution again is acknowledged; another key under that ID is refused.
        let again = b.distribute(kd(KeyRole::NodeCs, 0x1001, "alice.dc1.example", 0), 9);
        assert_eq!(error_code(&again[0].1), ErrorCode::WrongState);
        let k = node_cs_key(&SecretKey::from_bytes([0x01; 32]));
        let mut same = kd(KeyRole::NodeCs, 0x1001, "alice.dc1.example", 0);
        same.key = k;
        let again = b.distribute(same, 10);
        assert_eq!(again[0].1, ack_msg(MessageType::KeyDistribution));
        assert_eq!(b.cs.sessions_held(), 1);
    }

    #[test]
    fn a_distributed_dc_key_replaces_the_configured_one_for_notifications_until_it_expires() {
        let mut b = Bench::new(config());
        let new = KeyDistribution {
            key_role: KeyRole::DcCs,
            new_key_id: 0x77,
            key: SecretKey::from_bytes([0x77; 32]),
            lifetime_s: 3600,
            subject: fqdn("cs1.dc1.example"),
            extensions: Extensions::none(),
        };
        let a = b.distribute(new.clone(), 1);
        assert_eq!(
            a[0].0.envelope.key_id, DC_KEY_ID,
            "ACKed under the key it came under"
        );
        assert_eq!(a[0].1, ack_msg(MessageType::KeyDistribution));
        assert!(b
            .events()
            .contains(&CsEvent::DcKeyReplaced { key_id: 0x77 }));
        // Retransmitted: acknowledged again, no second event.
        b.distribute(new, 1);
        assert!(!b
            .events()
            .iter()
            .any(|e| matches!(e, CsEvent::DcKeyReplaced { .. })));

        let (mut alice, _) = b.login(0x1001, "alice.dc1.example", 1);
        let mut new_dc = SignalingKey::new(&SecretKey::from_bytes([0x77; 32]), 0x77, Role::A);
        let msg = CacheStore {
            recipient_fqdn: fqdn("alice.dc1.example"),
            ttl_s: 0,
            blob: sealed_blob(b"x"),
            extensions: Extensions::none(),
        };
        let d = alice.key.seal_to_vec(&msg.into(), 2, None).unwrap();
        let out = b.deliver(alice.addr, d);
        let (_, _, mut n) = out
            .into_iter()
            .find(|(_, dst, _)| *dst == dc_addr())
            .unwrap();
        let (h, m) = new_dc.open(&mut n).unwrap();
        assert_eq!(h.envelope.key_id, 0x77);
        assert!(matches!(m, Message::Notification(_)));
        let ack = new_dc
            .seal_to_vec(&ack_msg(MessageType::Notification), h.envelope.txid, None)
            .unwrap();
        b.deliver(dc_addr(), ack);
        assert_eq!(b.cs.notifications_outstanding(), 0);
        // At its expiry the CS falls back to the configured key.
        b.run_until(Time::from_secs(3600));
        let d = alice
            .key
            .seal_to_vec(
                &CacheStore {
                    recipient_fqdn: fqdn("alice.dc1.example"),
                    ttl_s: 0,
                    blob: sealed_blob(b"y"),
                    extensions: Extensions::none(),
                }
                .into(),
                3,
                None,
            )
            .unwrap();
        let out = b.deliver(alice.addr, d);
        let (_, _, n) = out
            .into_iter()
            .find(|(_, dst, _)| *dst == dc_addr())
            .unwrap();
        let (h, _) = notification(&mut b, n);
        assert_eq!(h.envelope.key_id, DC_KEY_ID);
    }

    #[test]
    fn an_expired_node_key_draws_expired_for_the_grace_then_unknown_key() {
        let mut b = Bench::new(config());
        let k_cs = node_cs_key(&SecretKey::from_bytes([3; 32]));
        b.distribute(
            KeyDistribution {
                key_role: KeyRole::NodeCs,
                new_key_id: 0x3003,
                key: k_cs.clone(),
                lifetime_s: 100,
                subject: fqdn("carol.dc1.example"),
                extensions: Extensions::none(),
            },
            1,
        );
        let mut carol = NodeEnd {
            key: SignalingKey::new(&k_cs, 0x3003, Role::A),
            addr: node_addr(3),
        };
        assert_eq!(
            b.cs.poll_timeout(),
            Some((Time::from_secs(100), "node key expiry"))
        );
        b.run_until(Time::from_secs(100));
        let a = b.fetch(&mut carol, 1, 0, 2);
        assert_eq!(error_code(&a[0]), ErrorCode::Expired);
        let a = b.store(&mut carol, "bob.dc1.example", 0, sealed_blob(b"x"), 3);
        assert_eq!(error_code(&a), ErrorCode::Expired);
        assert_eq!(b.cs.held(), (0, 0));
        assert_eq!(b.cs.poll_timeout().unwrap().1, "expired node key removal");
        b.run_until(Time::from_secs(700));
        assert_eq!(b.cs.sessions_held(), 0);
        let d = carol
            .key
            .seal_to_vec(
                &CacheFetch {
                    max_items: 1,
                    acknowledged_through: 0,
                    extensions: Extensions::none(),
                }
                .into(),
                4,
                None,
            )
            .unwrap();
        let out = b.deliver(carol.addr, d);
        let p = SignalingPacket::parse(&out[0].2).unwrap();
        assert_eq!(
            error_code(&p.decode_plain().unwrap()),
            ErrorCode::UnknownKey
        );
    }

    #[test]
    fn the_cs_refuses_bad_key_ids_names_ttls_and_quotas() {
        let mut c = config();
        c.dc_key_id = 0x8000_0001;
        assert!(matches!(
            CacheServer::new(c),
            Err(CsConfigError::InvalidDcKeyId(_))
        ));
        let mut c = config();
        c.fqdn = fqdn("cs1.dc2.example");
        assert_eq!(
            CacheServer::new(c).unwrap_err(),
            CsConfigError::NameOutsideZone
        );
        let mut c = config();
        c.default_ttl = c.max_ttl + Duration::from_secs(1);
        assert_eq!(CacheServer::new(c).unwrap_err(), CsConfigError::InvalidTtl);
        let mut c = config();
        c.limits.max_blobs_per_recipient = 1025;
        assert!(CacheServer::new(c).is_err());
        assert!(!CsConfigError::InvalidTtl.to_string().is_empty());
    }

    #[test]
    fn random_and_bit_flipped_datagrams_never_panic_and_never_store_anything() {
        let mut b = Bench::new(config());
        let (mut alice, _) = b.login(0x1001, "alice.dc1.example", 1);
        let mut noise = ChaCha8Rng::seed_from_u64(3);
        let store: Message = CacheStore {
            recipient_fqdn: fqdn("bob.dc1.example"),
            ttl_s: 0,
            blob: sealed_blob(b"x"),
            extensions: Extensions::none(),
        }
        .into();
        let kd: Message = KeyDistribution {
            key_role: KeyRole::NodeCs,
            new_key_id: 0x2002,
            key: SecretKey::from_bytes([2; 32]),
            lifetime_s: 600,
            subject: fqdn("bob.dc1.example"),
            extensions: Extensions::none(),
        }
        .into();
        let valid = [
            alice.key.seal_to_vec(&store, 1, None).unwrap(),
            b.dc.seal_to_vec(&kd, 2, None).unwrap(),
        ];
        for i in 0..20_000u32 {
            let d = if i % 2 == 0 {
                let len = (noise.next_u32() % 200) as usize;
                let mut d = vec![0u8; len];
                noise.fill_bytes(&mut d);
                if let Some(h) = d.get_mut(..2) {
                    h.copy_from_slice(&[[0x20, 0x50, 0x51, 0x60][i as usize / 2 % 4], 1]);
                }
                d
            } else {
                let mut d = valid[(i as usize / 2) % valid.len()].clone();
                let bit = noise.next_u32() as usize % (d.len() * 8);
                d[bit / 8] ^= 1 << (bit % 8);
                d
            };
            b.now = Time::from_millis(u64::from(i));
            b.deliver(node_addr(1), d);
            b.cs.handle_timeout(b.now, &mut b.rng);
        }
        assert_eq!(b.cs.held(), (0, 0));
        assert_eq!(b.cs.sessions_held(), 1);
        assert!(b.cs.drops().total() >= 19_000, "{:?}", b.cs.drops());
    }
}
