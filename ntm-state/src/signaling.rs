//! What every entity needs to speak signaling: the transmit handed to a runtime, a key as one of
//! its holders sees it (sealing with its own role and sequence numbers, opening with a replay
//! window per peer role), typed drop reasons with counters, and transactions retransmitted on the
//! schedule of spec/07-timers-and-errors.md §7.1.
//!
//! # Sealing and opening
//!
//! A [`SignalingKey`] is one key as one holder sees it. [`SignalingKey::seal`] takes the next
//! sequence number for every seal (a retransmission is a new seal, spec/05-procedures.md §5.1),
//! so no nonce is ever used twice under the key. [`SignalingKey::open`] applies the receiver's
//! rules of spec/02-wire-format.md in order: the header checks, the key ID, the own-role
//! (reflection) check, the replay window *before* the open, the open, and the window update only
//! *after* the open succeeded. An unsealed ERROR passes with `header.sealed == false`: it is a
//! hint, never authenticated, and a caller must not act on it beyond retrying sooner.
//!
//! # Sequence numbers across restarts
//!
//! For a key that outlives a process, [`SignalingKey::resume`] continues from a persisted
//! high-water mark and reserves sequence numbers in blocks (spec/04-crypto.md §4.7): when a seal
//! takes the first number of a new block, [`SignalingKey::take_reserved_through`] returns the
//! block's end once. The entity surfaces it as an event, and the runtime must make it durable
//! before it sends any datagram polled after that event.
//!
//! # Retransmission
//!
//! A [`Transaction`] is one outstanding request: its first transmission counts as one, each
//! expiry of its deadline asks for one more (a new seal, same transaction ID) until the budget is
//! spent. RTO estimates are kept per peer address in an [`RttTable`], fed only by answers to
//! transactions sent once (Karn's rule).

use core::fmt;
use core::time::Duration;
use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use ntm_wire::error::Replay;
use ntm_wire::replay::REJECT_AFTER_COUNTER;
use ntm_wire::{
    open_signaling, AeadKey, ApiMisuse, Envelope, ErrorCode, Extensions, Header, Message,
    MessageType, PublicKeyBytes, ReplayWindow, Role, SecretKey, SignalingPacket, WireError,
    HEADER_LEN,
};
use rand_core::RngCore;

use crate::time::Time;

/// A datagram [`poll_transmit`](crate::as_server::AccountServer::poll_transmit) wrote into the
/// caller's buffer: send `buf[..len]` from `src` (or any local address of `dst`'s family when
/// `None`) to `dst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// The local address to send from; `None` lets the runtime choose.
    pub src: Option<SocketAddr>,
    /// Where to send it.
    pub dst: SocketAddr,
    /// How many bytes of the buffer hold the datagram.
    pub len: usize,
}

/// The length of an unsealed ERROR (spec/07 §7.4): 24-byte header, 7-byte body.
pub const UNSEALED_ERROR_LEN: usize = HEADER_LEN + 7;

/// Why a received datagram was dropped without effect. Each reason has a stable
/// [`label`](DropReason::label), the key under which [`DropCounters`] counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DropReason {
    /// The header checks failed (spec/02): not a signaling datagram of this version.
    Header(WireError),
    /// A DATA packet reached an entity that has no tunnels.
    NotSignaling,
    /// The key ID names no key this receiver holds.
    UnknownKey,
    /// The sender's role is the receiver's own: a reflected datagram.
    Reflected,
    /// The replay window refused the sequence number.
    Replayed(Replay),
    /// The tag did not verify.
    AuthenticationFailed,
    /// The datagram authenticated but its body does not decode.
    UndecodableBody(WireError),
    /// Valid and authentic, but not expected now (type, transaction ID or state).
    Unexpected,
    /// An unsealed ERROR: a hint only, never acted on beyond a retry.
    UnsealedHint,
    /// A CONFIG_REQUEST shorter than the 128 bytes that prevent amplification.
    Unpadded,
    /// The peer's X25519 key is of low order.
    NonContributoryKey,
    /// A bounded table is full (or one source holds its share of it).
    TableFull,
}

impl DropReason {
    /// A stable name for counters and logs.
    pub fn label(&self) -> &'static str {
        match self {
            DropReason::Header(_) => "header",
            DropReason::NotSignaling => "not_signaling",
            DropReason::UnknownKey => "unknown_key",
            DropReason::Reflected => "reflected",
            DropReason::Replayed(_) => "replayed",
            DropReason::AuthenticationFailed => "authentication_failed",
            DropReason::UndecodableBody(_) => "undecodable_body",
            DropReason::Unexpected => "unexpected",
            DropReason::UnsealedHint => "unsealed_hint",
            DropReason::Unpadded => "unpadded",
            DropReason::NonContributoryKey => "non_contributory_key",
            DropReason::TableFull => "table_full",
        }
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DropReason::Header(e) | DropReason::UndecodableBody(e) => {
                write!(f, "{}: {e}", self.label())
            }
            DropReason::Replayed(r) => write!(f, "replayed: {r:?}"),
            other => f.write_str(other.label()),
        }
    }
}

/// How many datagrams were dropped, by [`DropReason::label`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DropCounters {
    counts: BTreeMap<&'static str, u64>,
}

impl DropCounters {
    /// Counts one drop.
    pub fn record(&mut self, reason: &DropReason) {
        let n = self.counts.entry(reason.label()).or_insert(0);
        *n = n.saturating_add(1);
    }

    /// Drops counted under `label`.
    pub fn get(&self, label: &str) -> u64 {
        self.counts.get(label).copied().unwrap_or(0)
    }

    /// Every drop counted.
    pub fn total(&self) -> u64 {
        self.counts.values().fold(0, |a, b| a.saturating_add(*b))
    }

    /// `(label, count)` in label order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        self.counts.iter().map(|(k, v)| (*k, *v))
    }
}

/// Why a seal was refused. Never caused by the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SealError {
    /// The key's sequence numbers reached the hard limit (2^64 − 2^13): replace the key.
    Exhausted,
    /// The key is gone (expired or forgotten) by the time the answer was sealed.
    NoKey,
    /// The message does not fit its envelope or the buffer.
    Api(ApiMisuse),
}

impl From<ApiMisuse> for SealError {
    fn from(e: ApiMisuse) -> Self {
        SealError::Api(e)
    }
}

impl fmt::Display for SealError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SealError::Exhausted => f.write_str("sequence numbers exhausted"),
            SealError::NoKey => f.write_str("no such key"),
            SealError::Api(e) => write!(f, "{e}"),
        }
    }
}

#[derive(Clone, Debug)]
struct Reservation {
    block: u64,
    /// One past the last sequence number that may be used without a new reservation.
    reserved_through: u64,
    /// A new mark not yet taken by the entity.
    announce: Option<u64>,
}

const ROLES: usize = 3;

fn role_index(role: Role) -> usize {
    match role {
        Role::A => 0,
        Role::B => 1,
        Role::Relay => 2,
    }
}

/// One signaling key as one of its holders sees it: the key, its ID, the holder's role, the next
/// sequence number, and a replay window per peer role (allocated when the first datagram from
/// that role authenticates).
pub struct SignalingKey {
    key: AeadKey,
    key_id: u32,
    role: Role,
    next_seq: u64,
    reservation: Option<Reservation>,
    windows: [Option<Box<ReplayWindow>>; ROLES],
}

impl fmt::Debug for SignalingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignalingKey")
            .field("key_id", &self.key_id)
            .field("role", &self.role)
            .field("next_seq", &self.next_seq)
            .finish_non_exhaustive()
    }
}

impl SignalingKey {
    /// A key that does not outlive this process (configuration, login): sequence numbers start
    /// at 0 and are never persisted.
    pub fn new(key: &SecretKey, key_id: u32, role: Role) -> Self {
        SignalingKey {
            key: AeadKey::new(key),
            key_id,
            role,
            next_seq: 0,
            reservation: None,
            windows: [None, None, None],
        }
    }

    /// A key that outlives a process: sealing continues at `high_water_mark` (the last value
    /// persisted, 0 for a new key) and reserves `block` numbers at a time (at least 1).
    pub fn resume(
        key: &SecretKey,
        key_id: u32,
        role: Role,
        high_water_mark: u64,
        block: u64,
    ) -> Self {
        let mut k = SignalingKey::new(key, key_id, role);
        k.next_seq = high_water_mark;
        k.reservation = Some(Reservation {
            block: block.max(1),
            reserved_through: high_water_mark,
            announce: None,
        });
        k
    }

    pub fn key_id(&self) -> u32 {
        self.key_id
    }

    /// This holder's role under the key.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The sequence number the next seal will use.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The new high-water mark to persist, once per block, if a seal started a new block.
    pub fn take_reserved_through(&mut self) -> Option<u64> {
        self.reservation.as_mut().and_then(|r| r.announce.take())
    }

    /// Seals `msg` into `out` with the next sequence number; returns the datagram's length.
    pub fn seal(
        &mut self,
        msg: &Message,
        txid: u32,
        ephemeral: Option<PublicKeyBytes>,
        out: &mut [u8],
    ) -> Result<usize, SealError> {
        let seq = self.next_seq;
        if seq >= REJECT_AFTER_COUNTER {
            return Err(SealError::Exhausted);
        }
        if let Some(r) = &mut self.reservation {
            if seq >= r.reserved_through {
                r.reserved_through = seq.saturating_add(r.block);
                r.announce = Some(r.reserved_through);
            }
        }
        // The number is spent whatever happens next: a nonce is never offered twice.
        self.next_seq = seq + 1;
        let env = Envelope {
            role: self.role,
            key_id: self.key_id,
            seq,
            txid,
            ephemeral,
        };
        Ok(msg.seal_into(&env, &self.key, out)?)
    }

    /// [`SignalingKey::seal`] into a new vector of the datagram's exact length.
    pub fn seal_to_vec(
        &mut self,
        msg: &Message,
        txid: u32,
        ephemeral: Option<PublicKeyBytes>,
    ) -> Result<Vec<u8>, SealError> {
        let env = Envelope {
            role: self.role,
            key_id: self.key_id,
            seq: self.next_seq,
            txid,
            ephemeral,
        };
        let mut v = vec![0u8; msg.datagram_len(&env, true)];
        let n = self.seal(msg, txid, ephemeral, &mut v)?;
        v.truncate(n);
        Ok(v)
    }

    /// Checks, authenticates and decodes a datagram under this key, in place. An unsealed ERROR
    /// comes back with `header.sealed == false`: it authenticates nothing.
    pub fn open(&mut self, buf: &mut [u8]) -> Result<(Header, Message), DropReason> {
        let header = {
            let packet = SignalingPacket::parse(buf).map_err(DropReason::Header)?;
            let header = *packet.header();
            if header.envelope.key_id != self.key_id {
                return Err(DropReason::UnknownKey);
            }
            if !header.sealed {
                // The header checks let only ERROR through unsealed.
                let msg = packet.decode_plain().map_err(DropReason::Header)?;
                return Ok((header, msg));
            }
            header
        };
        let role = header.envelope.role;
        if role == self.role {
            return Err(DropReason::Reflected);
        }
        let seq = header.envelope.seq;
        let slot = role_index(role);
        if let Some(w) = self.windows.get(slot).and_then(Option::as_ref) {
            w.check(seq).map_err(DropReason::Replayed)?;
        } else if seq >= REJECT_AFTER_COUNTER {
            return Err(DropReason::Replayed(Replay::Exhausted));
        }
        let result = open_signaling(buf, &self.key);
        if matches!(result, Err(WireError::AuthenticationFailed)) {
            return Err(DropReason::AuthenticationFailed);
        }
        // Authentic from here on (decode errors come only after the tag verified): the number is
        // used, even if the body turns out undecodable.
        if let Some(w) = self.windows.get_mut(slot) {
            let w = w.get_or_insert_with(Default::default);
            w.accept(seq).map_err(DropReason::Replayed)?;
        }
        result.map_err(DropReason::UndecodableBody)
    }
}

/// The first [`AddrList::MAX`] of `addrs` as an address list.
pub fn addr_list(addrs: &[SocketAddr]) -> ntm_wire::AddrList {
    let list: Vec<ntm_wire::TransportAddr> = addrs
        .iter()
        .take(ntm_wire::AddrList::MAX)
        .map(|a| ntm_wire::TransportAddr::new(*a))
        .collect();
    ntm_wire::AddrList::new(list).unwrap_or_else(|_| ntm_wire::AddrList::empty())
}

/// Logs a datagram that could not be sealed: a key that went away meanwhile is a warning; an
/// exhausted key or a message that does not fit its envelope is a bug (ERROR).
pub fn log_seal_failure(e: &SealError) {
    match e {
        SealError::NoKey => tracing::warn!("no key to seal an answer: dropped"),
        SealError::Exhausted | SealError::Api(_) => {
            tracing::error!(error = %e, "cannot seal a datagram")
        }
    }
}

/// The sealed datagram, or nothing (logged) when sealing failed.
pub fn sealed(r: Result<Vec<u8>, SealError>) -> Option<Vec<u8>> {
    match r {
        Ok(d) => Some(d),
        Err(e) => {
            log_seal_failure(&e);
            None
        }
    }
}

/// Encodes an unsealed ERROR (spec/07 §7.4): the answerer's `role`, the request's key ID (0 for
/// VersionNotSupported) and transaction ID, sequence 0, no tag; 31 bytes.
pub fn unsealed_error(
    role: Role,
    key_id: u32,
    txid: u32,
    failed_type: u8,
    code: ErrorCode,
) -> Result<Vec<u8>, ApiMisuse> {
    let msg: Message = ntm_wire::message::Error {
        code,
        failed_type,
        retry_after_ms: 0,
        extensions: Extensions::none(),
    }
    .into();
    let key_id = if code == ErrorCode::VersionNotSupported {
        0
    } else {
        key_id
    };
    let env = Envelope {
        role,
        key_id,
        seq: 0,
        txid,
        ephemeral: None,
    };
    let mut v = vec![0u8; UNSEALED_ERROR_LEN];
    let n = msg.encode_plain_into(&env, &mut v)?;
    v.truncate(n);
    Ok(v)
}

/// For a datagram that failed the header checks with an unknown version: the ERROR
/// VersionNotSupported that answers it, if it is long enough to be answered (at least 31 bytes,
/// so the answer is never larger).
pub fn version_not_supported(role: Role, datagram: &[u8]) -> Option<Vec<u8>> {
    if datagram.len() < UNSEALED_ERROR_LEN {
        return None;
    }
    let failed_type = *datagram.first()?;
    let txid = u32::from_be_bytes(datagram.get(16..20)?.try_into().ok()?);
    unsealed_error(role, 0, txid, failed_type, ErrorCode::VersionNotSupported).ok()
}

/// Everything a server hands back to its driver: datagrams for `poll_transmit`, events for
/// `poll_event`, and unsealed ERROR hints, rate-limited per source prefix so that forged traffic
/// cannot turn a server into a reflector. Every queue is bounded; what does not fit is counted.
#[derive(Clone, Debug)]
pub struct ServerOutput<E> {
    outbox: Outbox,
    events: VecDeque<E>,
    max_events: usize,
    events_lost: u64,
    seal_failures: u64,
    unsealed_errors: PrefixLimiter,
}

impl<E> ServerOutput<E> {
    /// Bounds: queued datagrams, queued events, unsealed ERRORs per second per source prefix
    /// (/24 for IPv4, /64 for IPv6), and how many prefixes the limiter tracks.
    pub fn new(
        max_transmits: usize,
        max_events: usize,
        unsealed_per_second: u32,
        max_tracked_prefixes: usize,
    ) -> Self {
        ServerOutput {
            outbox: Outbox::new(max_transmits),
            events: VecDeque::new(),
            max_events,
            events_lost: 0,
            seal_failures: 0,
            unsealed_errors: PrefixLimiter::new(
                unsealed_per_second,
                Duration::from_secs(1),
                max_tracked_prefixes,
            ),
        }
    }

    /// Queues an event, or counts it as lost when the queue is full.
    pub fn event(&mut self, e: E) {
        if self.events.len() >= self.max_events {
            self.events_lost = self.events_lost.saturating_add(1);
        } else {
            self.events.push_back(e);
        }
    }

    /// Queues a sealed datagram, or counts the failure to seal it.
    pub fn queue(
        &mut self,
        src: Option<SocketAddr>,
        dst: SocketAddr,
        datagram: Result<Vec<u8>, SealError>,
    ) {
        match datagram {
            Ok(d) => {
                // A full outbox counts the datagram itself.
                if !self.outbox.push(src, dst, d) {
                    tracing::warn!(%dst, "outbox full: datagram dropped");
                }
            }
            Err(e) => {
                log_seal_failure(&e);
                self.seal_failed();
            }
        }
    }

    /// Counts a datagram that could not be sealed (no key, or the key is exhausted).
    pub fn seal_failed(&mut self) {
        self.seal_failures = self.seal_failures.saturating_add(1);
    }

    /// Queues an unsealed datagram (an ERROR hint) unless the sender's prefix used its share.
    pub fn send_unsealed(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        datagram: Vec<u8>,
    ) {
        if self
            .unsealed_errors
            .allow(now, source_prefix(remote.ip(), 24, 64))
        {
            self.outbox.push(Some(local), remote, datagram);
        }
    }

    /// Answers a request under a key this server does not hold with an unsealed ERROR
    /// UnknownKey (spec/07), sent as `role`.
    pub fn unknown_key(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        header: &Header,
        role: Role,
    ) {
        if let Ok(answer) = unsealed_error(
            role,
            header.envelope.key_id,
            header.envelope.txid,
            header.msg_type.to_u8(),
            ErrorCode::UnknownKey,
        ) {
            self.send_unsealed(now, local, remote, answer);
        }
    }

    /// The first step of a server's input ([`server_intake`]): the checked header, or the
    /// reason to drop the datagram, having queued the VersionNotSupported answer it deserves.
    pub fn intake(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        buf: &[u8],
        role: Role,
    ) -> Result<Header, DropReason> {
        server_intake(buf, role).map_err(|refusal| {
            if let Some(answer) = refusal.answer {
                self.send_unsealed(now, local, remote, answer);
            }
            refusal.reason
        })
    }

    pub fn poll_transmit(&mut self, buf: &mut [u8]) -> Option<Transmit> {
        self.outbox.poll_transmit(buf)
    }

    pub fn poll_event(&mut self) -> Option<E> {
        self.events.pop_front()
    }

    /// Events dropped because the queue was full.
    pub fn events_lost(&self) -> u64 {
        self.events_lost
    }

    /// Datagrams that could not be sealed.
    pub fn seal_failures(&self) -> u64 {
        self.seal_failures
    }
}

/// Why a server refused a datagram before looking at its type, and what (if anything) it answers.
#[derive(Debug)]
pub struct Refusal {
    pub reason: DropReason,
    /// An unsealed ERROR VersionNotSupported, for a datagram of another protocol version.
    pub answer: Option<Vec<u8>>,
}

/// The first step of every server's input: the checked signaling header, or a refusal. A data
/// packet is not signaling; a datagram of another version is answered (unsealed) with
/// VersionNotSupported, as spec/07 asks, by the server in `role`.
pub fn server_intake(buf: &[u8], role: Role) -> Result<Header, Refusal> {
    match ntm_wire::classify(buf) {
        Ok(ntm_wire::Datagram::Signaling(p)) => Ok(*p.header()),
        Ok(ntm_wire::Datagram::Data(_)) => Err(Refusal {
            reason: DropReason::NotSignaling,
            answer: None,
        }),
        Err(e @ WireError::UnsupportedVersion(_)) => Err(Refusal {
            reason: DropReason::Header(e),
            answer: version_not_supported(role, buf),
        }),
        Err(e) => Err(Refusal {
            reason: DropReason::Header(e),
            answer: None,
        }),
    }
}

/// Datagrams waiting for `poll_transmit`, at most `limit` of them (the excess is dropped and
/// counted).
#[derive(Clone, Debug)]
pub struct Outbox {
    queue: VecDeque<(Option<SocketAddr>, SocketAddr, Vec<u8>)>,
    limit: usize,
    overflowed: u64,
    too_small: u64,
}

impl Outbox {
    pub fn new(limit: usize) -> Self {
        Outbox {
            queue: VecDeque::new(),
            limit,
            overflowed: 0,
            too_small: 0,
        }
    }

    /// Queues a datagram; false (and counted) when the queue is full.
    pub fn push(&mut self, src: Option<SocketAddr>, dst: SocketAddr, datagram: Vec<u8>) -> bool {
        if self.queue.len() >= self.limit {
            self.overflowed = self.overflowed.saturating_add(1);
            return false;
        }
        self.queue.push_back((src, dst, datagram));
        true
    }

    /// Writes the oldest datagram into `buf`. A buffer shorter than a datagram is a caller's
    /// mistake (pass at least [`ntm_wire::MAX_SIGNALING_LEN`] bytes): that datagram is dropped
    /// and counted in [`Outbox::too_small`].
    pub fn poll_transmit(&mut self, buf: &mut [u8]) -> Option<Transmit> {
        while let Some((src, dst, datagram)) = self.queue.pop_front() {
            match buf.get_mut(..datagram.len()) {
                Some(out) => {
                    out.copy_from_slice(&datagram);
                    return Some(Transmit {
                        src,
                        dst,
                        len: datagram.len(),
                    });
                }
                None => self.too_small = self.too_small.saturating_add(1),
            }
        }
        None
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Datagrams dropped because the queue was full.
    pub fn overflowed(&self) -> u64 {
        self.overflowed
    }

    /// Datagrams dropped because the caller's buffer was too short.
    pub fn too_small(&self) -> u64 {
        self.too_small
    }
}

/// The retransmission schedule (spec/07 §7.1 and §7.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetransmitConfig {
    /// RTO before any RTT sample: 250 ms.
    pub initial_rto: Duration,
    /// The floor of the variance term (clock granularity): 10 ms.
    pub min_variance_term: Duration,
    /// The cap of a backed-off RTO: 4 s.
    pub max_rto: Duration,
    /// Transmissions per request, the first included: 6.
    pub max_transmissions: u32,
    /// Each wait is multiplied by a factor uniform in `1 ± jitter_permille / 1000`: 100.
    pub jitter_permille: u32,
}

impl Default for RetransmitConfig {
    fn default() -> Self {
        RetransmitConfig {
            initial_rto: Duration::from_millis(250),
            min_variance_term: Duration::from_millis(10),
            max_rto: Duration::from_secs(4),
            max_transmissions: 6,
            jitter_permille: 100,
        }
    }
}

/// Multiplies `d` by a factor uniform in `[1 - p/1000, 1 + p/1000]` drawn from `rng`.
pub fn jittered<R: RngCore + ?Sized>(d: Duration, permille: u32, rng: &mut R) -> Duration {
    if permille == 0 {
        return d;
    }
    let span = u64::from(permille.min(1000)) * 2_000; // in parts per million
    let draw = (u64::from(rng.next_u32()) * (span + 1)) >> 32;
    let factor = 1_000_000 - span / 2 + draw;
    let nanos = d.as_nanos().saturating_mul(u128::from(factor)) / 1_000_000;
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// SRTT and RTTVAR for one peer (RFC 6298, α = 1/8, β = 1/4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RttEstimator {
    srtt: Option<Duration>,
    rttvar: Duration,
}

impl RttEstimator {
    /// Takes one RTT sample.
    pub fn on_sample(&mut self, r: Duration) {
        match self.srtt {
            None => {
                self.srtt = Some(r);
                self.rttvar = r / 2;
            }
            Some(srtt) => {
                let delta = srtt.abs_diff(r);
                self.rttvar = (self.rttvar * 3 + delta) / 4;
                self.srtt = Some((srtt * 7 + r) / 8);
            }
        }
    }

    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    pub fn rttvar(&self) -> Duration {
        self.rttvar
    }

    /// SRTT + max(4·RTTVAR, 10 ms) once a sample exists, else the initial RTO; at most the cap.
    pub fn rto(&self, cfg: &RetransmitConfig) -> Duration {
        let rto = match self.srtt {
            None => cfg.initial_rto,
            Some(srtt) => {
                srtt.saturating_add(self.rttvar.saturating_mul(4).max(cfg.min_variance_term))
            }
        };
        rto.min(cfg.max_rto)
    }
}

/// RTT estimators per peer address, at most `limit` (the least recently sampled is forgotten).
#[derive(Clone, Debug)]
pub struct RttTable {
    peers: BTreeMap<SocketAddr, (RttEstimator, Time)>,
    limit: usize,
}

impl RttTable {
    pub fn new(limit: usize) -> Self {
        RttTable {
            peers: BTreeMap::new(),
            limit,
        }
    }

    pub fn get(&self, peer: SocketAddr) -> Option<&RttEstimator> {
        self.peers.get(&peer).map(|(e, _)| e)
    }

    /// The RTO for a new request to `peer`.
    pub fn rto(&self, peer: SocketAddr, cfg: &RetransmitConfig) -> Duration {
        self.get(peer).copied().unwrap_or_default().rto(cfg)
    }

    /// Takes one sample for `peer`.
    pub fn on_sample(&mut self, now: Time, peer: SocketAddr, rtt: Duration) {
        if !self.peers.contains_key(&peer) && self.peers.len() >= self.limit {
            let oldest = self
                .peers
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(a, _)| *a);
            match oldest {
                Some(a) => {
                    self.peers.remove(&a);
                }
                None => return, // limit 0: keep nothing
            }
        }
        let entry = self
            .peers
            .entry(peer)
            .or_insert((RttEstimator::default(), now));
        entry.0.on_sample(rtt);
        entry.1 = now;
    }
}

/// What an expired transaction deadline asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// The deadline has not passed.
    NotDue,
    /// Send the request again: a new seal, the same transaction ID.
    Retransmit,
    /// The budget is spent: the request failed.
    Failed,
}

/// One outstanding request and its retransmission state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transaction {
    txid: u32,
    msg_type: MessageType,
    remote: SocketAddr,
    first_sent: Time,
    transmissions: u32,
    rto: Duration,
    deadline: Time,
}

impl Transaction {
    /// Records the first transmission of a request at `now` with the peer's current `rto`.
    pub fn start<R: RngCore + ?Sized>(
        now: Time,
        txid: u32,
        msg_type: MessageType,
        remote: SocketAddr,
        rto: Duration,
        cfg: &RetransmitConfig,
        rng: &mut R,
    ) -> Self {
        let mut t = Transaction {
            txid,
            msg_type,
            remote,
            first_sent: now,
            transmissions: 1,
            rto,
            deadline: now,
        };
        t.deadline = now + jittered(t.wait(cfg), cfg.jitter_permille, rng);
        t
    }

    /// The wait after the latest transmission: the RTO doubled per earlier transmission, capped.
    fn wait(&self, cfg: &RetransmitConfig) -> Duration {
        let doublings = self.transmissions.saturating_sub(1).min(31);
        self.rto
            .saturating_mul(1u32 << doublings)
            .min(cfg.max_rto.max(self.rto))
    }

    pub fn txid(&self) -> u32 {
        self.txid
    }

    pub fn msg_type(&self) -> MessageType {
        self.msg_type
    }

    pub fn remote(&self) -> SocketAddr {
        self.remote
    }

    /// Transmissions so far, the first included.
    pub fn transmissions(&self) -> u32 {
        self.transmissions
    }

    /// When to retransmit, or when the request fails once the budget is spent.
    pub fn deadline(&self) -> Time {
        self.deadline
    }

    /// Called at `now`: counts a retransmission when the deadline has passed and budget is left.
    pub fn on_timeout<R: RngCore + ?Sized>(
        &mut self,
        now: Time,
        cfg: &RetransmitConfig,
        rng: &mut R,
    ) -> Expiry {
        if now < self.deadline {
            return Expiry::NotDue;
        }
        if self.transmissions >= cfg.max_transmissions {
            return Expiry::Failed;
        }
        self.transmissions += 1;
        self.deadline = now + jittered(self.wait(cfg), cfg.jitter_permille, rng);
        Expiry::Retransmit
    }

    /// The RTT sample an answer at `now` gives: only for a request sent once (Karn's rule).
    pub fn rtt_sample(&self, now: Time) -> Option<Duration> {
        (self.transmissions == 1).then(|| now - self.first_sent)
    }
}

/// The prefix a source address is counted under: IPv4 addresses cut to `v4_bits`, IPv6 to
/// `v6_bits` (an IPv4-mapped IPv6 address counts as IPv4).
pub fn source_prefix(ip: IpAddr, v4_bits: u8, v6_bits: u8) -> IpAddr {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(a) => {
            let bits = u32::from(v4_bits.min(32));
            let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
            IpAddr::V4((u32::from(a) & mask).into())
        }
        IpAddr::V6(a) => {
            let bits = u32::from(v6_bits.min(128));
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
        }
    }
}

/// At most `per_window` events per `window` per source prefix, in fixed windows, tracking at
/// most `limit` prefixes (the one whose window started first is forgotten).
#[derive(Clone, Debug)]
pub struct PrefixLimiter {
    per_window: u32,
    window: Duration,
    limit: usize,
    entries: BTreeMap<IpAddr, (Time, u32)>,
}

impl PrefixLimiter {
    pub fn new(per_window: u32, window: Duration, limit: usize) -> Self {
        PrefixLimiter {
            per_window,
            window,
            limit,
            entries: BTreeMap::new(),
        }
    }

    /// Whether one more event for `prefix` is allowed at `now` (and counts it if so).
    pub fn allow(&mut self, now: Time, prefix: IpAddr) -> bool {
        if !self.entries.contains_key(&prefix) && self.entries.len() >= self.limit {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, (t, _))| *t)
                .map(|(p, _)| *p);
            match oldest {
                Some(p) => {
                    self.entries.remove(&p);
                }
                None => return false,
            }
        }
        let (start, count) = self.entries.entry(prefix).or_insert((now, 0));
        if now >= *start + self.window {
            *start = now;
            *count = 0;
        }
        if *count >= self.per_window {
            return false;
        }
        *count += 1;
        true
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn server_output_bounds_events_counts_seal_failures_and_limits_unsealed_answers() {
        let mut out: ServerOutput<u32> = ServerOutput::new(64, 2, 3, 16);
        for e in 0..5 {
            out.event(e);
        }
        assert_eq!(out.events_lost(), 3);
        assert_eq!(
            (out.poll_event(), out.poll_event(), out.poll_event()),
            (Some(0), Some(1), None)
        );

        let dst: SocketAddr = "198.51.100.7:4285".parse().unwrap();
        out.queue(None, dst, Err(SealError::Exhausted));
        assert_eq!(out.seal_failures(), 1);

        let local: SocketAddr = "203.0.113.1:4281".parse().unwrap();
        for _ in 0..10 {
            out.send_unsealed(Time::ZERO, local, dst, vec![0; UNSEALED_ERROR_LEN]);
        }
        let mut buf = [0u8; 64];
        let mut sent = 0;
        while out.poll_transmit(&mut buf).is_some() {
            sent += 1;
        }
        assert_eq!(sent, 3, "three unsealed answers per second per prefix");
    }
    #[test]
    fn server_intake_answers_only_another_version_and_refuses_data_and_garbage() {
        let mut data = vec![0u8; 40];
        data[0] = ntm_wire::DATA_TYPE;
        let r = server_intake(&data, Role::B).unwrap_err();
        assert!(matches!(r.reason, DropReason::NotSignaling) && r.answer.is_none());

        let mut future = vec![0u8; 40];
        future[0] = 0x7f; // a type version 1 does not know
        future[1] = 2; // version 2
        future[16..20].copy_from_slice(&0xabcd_0001u32.to_be_bytes());
        let r = server_intake(&future, Role::B).unwrap_err();
        let answer = r.answer.expect("another version is answered");
        assert_eq!(answer.len(), UNSEALED_ERROR_LEN);
        assert_eq!(&answer[16..20], &0xabcd_0001u32.to_be_bytes());

        let r = server_intake(&[0x30, 1, 0], Role::B).unwrap_err();
        assert!(matches!(r.reason, DropReason::Header(_)) && r.answer.is_none());
    }

    use super::*;
    use ntm_wire::message::Error as ErrorMsg;
    use ntm_wire::Ack;
    use rand_chacha::ChaCha8Rng;
    use rand_core::SeedableRng;

    fn k() -> SecretKey {
        SecretKey::from_bytes([3; 32])
    }

    fn ack() -> Message {
        Ack {
            acked_type: 0x20,
            extensions: Extensions::none(),
        }
        .into()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn every_seal_takes_a_new_sequence_number_and_the_peer_opens_each_once() {
        let mut a = SignalingKey::new(&k(), 7, Role::A);
        let mut b = SignalingKey::new(&k(), 7, Role::B);
        let mut first = a.seal_to_vec(&ack(), 1, None).unwrap();
        let mut again = a.seal_to_vec(&ack(), 1, None).unwrap();
        assert_ne!(first, again, "a retransmission is a new seal");
        assert_eq!(a.next_seq(), 2);
        let copy = first.clone();
        assert_eq!(b.open(&mut first).unwrap().1, ack());
        assert_eq!(b.open(&mut again).unwrap().0.envelope.seq, 1);
        assert_eq!(
            b.open(&mut copy.clone()).unwrap_err(),
            DropReason::Replayed(Replay::Duplicate)
        );
    }

    #[test]
    fn a_datagram_sealed_with_the_receivers_own_role_is_refused_as_reflected() {
        let mut a = SignalingKey::new(&k(), 7, Role::A);
        let mut also_a = SignalingKey::new(&k(), 7, Role::A);
        let mut d = a.seal_to_vec(&ack(), 1, None).unwrap();
        assert_eq!(also_a.open(&mut d).unwrap_err(), DropReason::Reflected);
    }

    #[test]
    fn a_forged_datagram_does_not_move_the_replay_window() {
        let mut a = SignalingKey::new(&k(), 7, Role::A);
        let mut b = SignalingKey::new(&k(), 7, Role::B);
        let mut real = a.seal_to_vec(&ack(), 1, None).unwrap();
        let mut forged = real.clone();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        assert_eq!(
            b.open(&mut forged).unwrap_err(),
            DropReason::AuthenticationFailed
        );
        assert!(
            b.open(&mut real).is_ok(),
            "the genuine datagram still opens"
        );
    }

    #[test]
    fn a_datagram_under_another_key_id_is_an_unknown_key() {
        let mut a = SignalingKey::new(&k(), 7, Role::A);
        let mut b = SignalingKey::new(&k(), 8, Role::B);
        let mut d = a.seal_to_vec(&ack(), 1, None).unwrap();
        assert_eq!(b.open(&mut d).unwrap_err(), DropReason::UnknownKey);
    }

    #[test]
    fn an_unsealed_error_passes_the_role_check_but_says_it_is_unsealed() {
        let mut d = unsealed_error(Role::B, 7, 99, 0x12, ErrorCode::UnknownKey).unwrap();
        assert_eq!(d.len(), UNSEALED_ERROR_LEN);
        let mut b = SignalingKey::new(&k(), 7, Role::B);
        let (h, m) = b.open(&mut d).unwrap();
        assert!(!h.sealed);
        assert_eq!(h.envelope.txid, 99);
        assert!(matches!(
            m,
            Message::Error(ErrorMsg {
                code: ErrorCode::UnknownKey,
                ..
            })
        ));
    }

    #[test]
    fn a_resumed_key_announces_each_new_block_once_before_using_it() {
        let mut a = SignalingKey::resume(&k(), 7, Role::A, 100, 4);
        assert_eq!(a.take_reserved_through(), None);
        a.seal_to_vec(&ack(), 1, None).unwrap();
        assert_eq!(a.take_reserved_through(), Some(104));
        assert_eq!(a.take_reserved_through(), None);
        for _ in 0..3 {
            a.seal_to_vec(&ack(), 1, None).unwrap();
        }
        assert_eq!(a.take_reserved_through(), None, "101..103 are in the block");
        a.seal_to_vec(&ack(), 1, None).unwrap();
        assert_eq!(a.take_reserved_through(), Some(108));
        assert_eq!(a.next_seq(), 105);
    }

    #[test]
    fn a_key_at_the_counter_limit_refuses_to_seal() {
        let mut a = SignalingKey::resume(&k(), 7, Role::A, REJECT_AFTER_COUNTER, 1);
        assert_eq!(a.seal_to_vec(&ack(), 1, None), Err(SealError::Exhausted));
    }

    #[test]
    fn without_jitter_six_transmissions_leave_on_the_spec_schedule_and_fail_at_eleven_seconds_75() {
        let cfg = RetransmitConfig {
            jitter_permille: 0,
            ..RetransmitConfig::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let peer = SocketAddr::from(([192, 0, 2, 1], 1));
        let mut t = Transaction::start(
            Time::ZERO,
            5,
            MessageType::Ack,
            peer,
            cfg.initial_rto,
            &cfg,
            &mut rng,
        );
        let mut sent_at = vec![Time::ZERO];
        loop {
            let now = t.deadline();
            assert_eq!(
                t.on_timeout(now.checked_sub(ms(1)).unwrap(), &cfg, &mut rng),
                Expiry::NotDue
            );
            match t.on_timeout(now, &cfg, &mut rng) {
                Expiry::Retransmit => sent_at.push(now),
                Expiry::Failed => {
                    assert_eq!(now, Time::from_millis(11_750));
                    break;
                }
                Expiry::NotDue => unreachable!(),
            }
        }
        let expected: Vec<Time> = [0, 250, 750, 1750, 3750, 7750]
            .into_iter()
            .map(Time::from_millis)
            .collect();
        assert_eq!(sent_at, expected);
        assert_eq!(t.transmissions(), 6);
    }

    #[test]
    fn jitter_keeps_each_wait_within_ten_percent_and_varies_it() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let waits: Vec<Duration> = (0..1000)
            .map(|_| jittered(ms(250), 100, &mut rng))
            .collect();
        assert!(waits.iter().all(|w| *w >= ms(225) && *w <= ms(275)));
        assert!(waits.iter().any(|w| *w < ms(230)));
        assert!(waits.iter().any(|w| *w > ms(270)));
    }

    #[test]
    fn the_rto_follows_rfc_6298_with_a_ten_millisecond_floor() {
        let cfg = RetransmitConfig::default();
        let mut e = RttEstimator::default();
        assert_eq!(e.rto(&cfg), ms(250));
        e.on_sample(ms(40));
        assert_eq!((e.srtt(), e.rttvar()), (Some(ms(40)), ms(20)));
        assert_eq!(e.rto(&cfg), ms(120));
        for _ in 0..50 {
            e.on_sample(ms(40));
        }
        assert_eq!(e.srtt(), Some(ms(40)));
        assert_eq!(e.rto(&cfg), ms(50), "4·RTTVAR shrank below the 10 ms floor");
        e.on_sample(Duration::from_secs(60));
        assert_eq!(e.rto(&cfg), cfg.max_rto);
    }

    #[test]
    fn only_a_request_sent_once_gives_an_rtt_sample() {
        let cfg = RetransmitConfig::default();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let peer = SocketAddr::from(([192, 0, 2, 1], 1));
        let mut t = Transaction::start(
            Time::ZERO,
            5,
            MessageType::Ack,
            peer,
            ms(250),
            &cfg,
            &mut rng,
        );
        assert_eq!(t.rtt_sample(Time::from_millis(80)), Some(ms(80)));
        let due = t.deadline();
        assert_eq!(t.on_timeout(due, &cfg, &mut rng), Expiry::Retransmit);
        assert_eq!(t.rtt_sample(due + ms(10)), None);
    }

    #[test]
    fn the_rtt_table_forgets_the_least_recently_sampled_peer_when_full() {
        let mut table = RttTable::new(2);
        let p = |n: u8| SocketAddr::from(([192, 0, 2, n], 1));
        table.on_sample(Time::from_secs(1), p(1), ms(40));
        table.on_sample(Time::from_secs(2), p(2), ms(40));
        table.on_sample(Time::from_secs(3), p(3), ms(40));
        assert!(table.get(p(1)).is_none());
        assert!(table.get(p(2)).is_some() && table.get(p(3)).is_some());
        assert_eq!(table.rto(p(1), &RetransmitConfig::default()), ms(250));
    }

    #[test]
    fn a_prefix_limiter_allows_its_quota_per_window_per_prefix() {
        let mut l = PrefixLimiter::new(2, Duration::from_secs(1), 8);
        let p = source_prefix(IpAddr::from([198, 51, 100, 7]), 24, 64);
        assert_eq!(p, IpAddr::from([198, 51, 100, 0]));
        assert!(l.allow(Time::ZERO, p));
        assert!(l.allow(Time::ZERO, p));
        assert!(!l.allow(Time::from_millis(999), p));
        assert!(l.allow(Time::ZERO, IpAddr::from([198, 51, 101, 0])));
        assert!(l.allow(Time::from_secs(1), p));
    }

    #[test]
    fn an_ipv6_source_is_counted_by_its_64_bit_prefix() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        assert_eq!(source_prefix(a, 32, 64), source_prefix(b, 32, 64));
        assert_ne!(
            source_prefix(a, 32, 64),
            source_prefix("2001:db8:1:3::1".parse().unwrap(), 32, 64)
        );
    }

    #[test]
    fn a_datagram_of_another_version_is_answered_only_when_at_least_31_bytes_long() {
        let mut d = vec![
            0x10, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x12, 0x34,
        ];
        d.resize(30, 0);
        assert_eq!(version_not_supported(Role::B, &d), None);
        d.push(0);
        let answer = version_not_supported(Role::B, &d).unwrap();
        let p = SignalingPacket::parse(&answer).unwrap();
        assert_eq!(p.header().envelope.txid, 0x1234);
        assert!(matches!(
            p.decode_plain().unwrap(),
            Message::Error(ErrorMsg {
                code: ErrorCode::VersionNotSupported,
                failed_type: 0x10,
                ..
            })
        ));
    }

    #[test]
    fn a_buffer_too_short_for_the_datagram_drops_it_and_counts() {
        let mut o = Outbox::new(1);
        let dst = SocketAddr::from(([192, 0, 2, 1], 1));
        assert!(o.push(None, dst, vec![1; 40]));
        assert!(!o.push(None, dst, vec![2; 40]));
        assert_eq!(o.overflowed(), 1);
        let mut small = [0u8; 10];
        assert_eq!(o.poll_transmit(&mut small), None);
        assert_eq!(o.too_small(), 1);
        assert!(o.push(Some(dst), dst, vec![3; 4]));
        let mut buf = [0u8; 64];
        assert_eq!(
            o.poll_transmit(&mut buf),
            Some(Transmit {
                src: Some(dst),
                dst,
                len: 4
            })
        );
        assert_eq!(&buf[..4], &[3; 4]);
    }
}
