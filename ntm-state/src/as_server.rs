//! The account server (AS) as a sans-IO state machine: the login of spec/04-crypto.md §4.4 and
//! spec/05-procedures.md §5.2, steps 1 to 6.
//!
//! ```text
//! node                      AS                          DC
//!  | CONFIG_REQUEST [K_cfg]  |                           |
//!  |------------------------>| pending login (30 s)      |
//!  | CONFIG_RESPONSE [K_cfg_resp], E_as                  |
//!  |<------------------------|                           |
//!  | LOGIN_REQUEST [K_login] |                           |
//!  |------------------------>| proof verified            |
//!  |                         | KEY_DISTRIBUTION(NodeDc) [K_as-dc]
//!  |                         |-------------------------->|
//!  |                         | ACK                       |
//!  |                         |<--------------------------|
//!  | LOGIN_RESPONSE [K_login] (kept 10 min)              |
//!  |<------------------------|                           |
//! ```
//!
//! # Driving it
//!
//! Feed every datagram to [`AccountServer::handle_datagram`] and call
//! [`AccountServer::handle_timeout`] when the deadline of [`AccountServer::poll_timeout`] has
//! passed. After each input, drain the outputs in this order until only a timeout is left:
//! [`AccountServer::poll_event`] first (a [`AsEvent::SequenceReserved`] must be made durable
//! before any datagram polled after it is sent), then [`AccountServer::poll_transmit`].
//!
//! # What it keeps, and for how long
//!
//! One entry per login, at most [`AsLimits::max_logins`], each with one deadline: a pending login
//! (CONFIG_RESPONSE sent) 30 s; a login whose KEY_DISTRIBUTION is outstanding until the DC's ACK
//! or the retransmission budget is spent; a LOGIN_RESPONSE, with its K_login, 10 min; a refusal
//! (AuthFailed, RateLimited, Unavailable) 30 s, so that a retransmitted LOGIN_REQUEST gets the same
//! answer and is never counted twice.
//!
//! # Concealment
//!
//! An unknown account gets a CONFIG_RESPONSE with a deterministic fake salt and the default
//! iterations, its proof is checked against a dummy verifier, and it is refused with the same
//! sealed ERROR AuthFailed as a wrong password, after the same work (the fake salt and the dummy
//! verifier are computed for every login). Failures count against the account name either way.
//!
//! # Rate limits
//!
//! Checked when a LOGIN_REQUEST arrives, before the proof (spec/07 §7.2): the account's failures
//! (5 per minute, then a lockout of 1 min doubling per further lockout up to 1 h, reset by a
//! success or a day without failure) and the source's (20 per minute, IPv6 per /64). A refused
//! login gets ERROR RateLimited sealed under K_login with the time left. The AS does not answer
//! RateLimited to CONFIG_REQUEST: anyone can replay one, and the only key it could seal under
//! there, K_cfg, would then carry the same nonce twice.

use core::fmt;
use core::time::Duration;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, SocketAddr};

use hmac::{Hmac, Mac};
use ntm_wire::crypto::{
    config_key, config_response_key, login_key, login_transcript, verify_login_proof, x25519,
    x25519_public,
};
use ntm_wire::message::Error as ErrorMsg;
use ntm_wire::{
    Account, AddrList, ConfigResponse, ErrorCode, Extensions, Fqdn, Header, KeyDistribution,
    KeyRole, LoginResponse, Message, MessageType, PublicKeyBytes, Role, SecretKey,
};
use rand_core::{CryptoRng, RngCore};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::signaling::{
    source_prefix, DropCounters, DropReason, Expiry, RetransmitConfig, RttTable, ServerOutput,
    SignalingKey, Transaction, Transmit,
};
use crate::time::Time;

/// The smallest CONFIG_REQUEST an AS answers (spec/03 §0x10): larger than its answer.
pub const CONFIG_REQUEST_MIN_LEN: usize = 128;

/// The default PBKDF2 iterations (spec/04 §4.4), also given for unknown accounts.
pub const DEFAULT_ITERATIONS: u32 = 100_000;

/// One account: its verifier and what its node is told at login.
#[derive(Clone, Debug)]
pub struct AccountRecord {
    /// The authentication key `ntm_wire::crypto::auth_key(password, salt, iterations)`.
    pub auth_key: SecretKey,
    pub salt: [u8; 16],
    pub iterations: u32,
    pub node_fqdn: Fqdn,
    /// The account's DC: a key of [`AsConfig::dcs`].
    pub dc: Fqdn,
    /// The DC's addresses, as the node is to use them.
    pub dc_addrs: AddrList,
    pub ns_addrs: AddrList,
    pub cs_addrs: AddrList,
    pub keepalive_interval_s: u16,
}

/// The pre-shared key between the AS and one DC.
#[derive(Clone, Debug)]
pub struct DcLink {
    pub key: SecretKey,
    /// Configured, non-zero, top bit clear, unique among the AS's DC keys.
    pub key_id: u32,
    /// Where the AS sends KEY_DISTRIBUTION.
    pub addr: SocketAddr,
    /// The persisted high-water mark of the AS's sequence numbers under this key (0 when new).
    pub high_water_mark: u64,
}

/// Every bound on the AS's memory and work, and its timers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AsLimits {
    /// Login entries of every phase together.
    pub max_logins: usize,
    /// Pending logins (CONFIG_RESPONSE sent, no LOGIN_REQUEST yet) per source address.
    pub max_pending_per_source: usize,
    /// How long a pending login waits for its LOGIN_REQUEST: 30 s.
    pub login_pending: Duration,
    /// How long a LOGIN_RESPONSE and its K_login are kept: 10 min.
    pub login_response_kept: Duration,
    /// How long a refusal is kept for retransmitted LOGIN_REQUESTs: 30 s.
    pub answer_kept: Duration,
    /// Failed logins per account per window before a lockout: 5.
    pub account_failures: u32,
    /// Failed logins per source address (IPv6: /64) per window: 20.
    pub source_failures: u32,
    /// The failure-counting window: 1 min.
    pub failure_window: Duration,
    /// The first lockout; each further one doubles: 1 min.
    pub first_lockout: Duration,
    /// The longest lockout: 1 h.
    pub max_lockout: Duration,
    /// An account's lockout history is forgotten after this long without failure: 24 h.
    pub failure_memory: Duration,
    pub max_tracked_accounts: usize,
    pub max_tracked_sources: usize,
    /// Unsealed ERRORs per source prefix (IPv4 /24, IPv6 /64) per second: 10.
    pub unsealed_errors_per_second: u32,
    pub max_tracked_prefixes: usize,
    pub max_queued_transmits: usize,
    pub max_queued_events: usize,
    pub max_rtt_peers: usize,
    /// Sequence numbers reserved at a time under a DC key (spec/04 §4.7).
    pub sequence_block: u64,
}

impl Default for AsLimits {
    fn default() -> Self {
        AsLimits {
            max_logins: 16_384,
            max_pending_per_source: 16,
            login_pending: Duration::from_secs(30),
            login_response_kept: Duration::from_secs(600),
            answer_kept: Duration::from_secs(30),
            account_failures: 5,
            source_failures: 20,
            failure_window: Duration::from_secs(60),
            first_lockout: Duration::from_secs(60),
            max_lockout: Duration::from_secs(3600),
            failure_memory: Duration::from_secs(24 * 3600),
            max_tracked_accounts: 16_384,
            max_tracked_sources: 16_384,
            unsealed_errors_per_second: 10,
            max_tracked_prefixes: 4096,
            max_queued_transmits: 1024,
            max_queued_events: 1024,
            max_rtt_peers: 64,
            sequence_block: 1 << 16,
        }
    }
}

/// The AS's configuration.
#[derive(Clone, Debug)]
pub struct AsConfig {
    /// The AS's static X25519 secret; nodes pin its public key.
    pub static_secret: SecretKey,
    /// The secret behind fake salts and dummy verifiers. It must stay the same across restarts,
    /// or an unknown account's salt would change and give its absence away.
    pub concealment_secret: SecretKey,
    /// The iterations given for unknown accounts (the default for new accounts too).
    pub default_iterations: u32,
    /// The lifetime of the sessions the AS opens: 24 h.
    pub session_lifetime: Duration,
    /// The DCs, by name (zone).
    pub dcs: BTreeMap<Fqdn, DcLink>,
    pub accounts: BTreeMap<Account, AccountRecord>,
    pub limits: AsLimits,
    pub retransmit: RetransmitConfig,
}

/// A configuration the AS refuses to run with.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// An account names a DC that is not configured.
    UnknownDc { account: Account, dc: Fqdn },
    /// A DC key ID is 0, has the top bit set, or is used twice.
    InvalidDcKeyId { dc: Fqdn, key_id: u32 },
    /// The static secret's public key is of low order (cannot happen for a clamped secret; kept
    /// for safety).
    InvalidStaticKey,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::UnknownDc { account, dc } => {
                write!(
                    f,
                    "account {account:?} names DC {dc} which is not configured"
                )
            }
            ConfigError::InvalidDcKeyId { dc, key_id } => {
                write!(
                    f,
                    "DC {dc} has key ID {key_id:#x}: must be non-zero, top bit clear, unique"
                )
            }
            ConfigError::InvalidStaticKey => f.write_str("the static key is unusable"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Why a login failed, as the operator sees it (the node sees only AuthFailed for the first two).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailureReason {
    UnknownAccount,
    WrongPassword,
    /// Refused by a rate limit before the proof was checked.
    RateLimited {
        retry_after: Duration,
    },
    /// The DC never acknowledged the KEY_DISTRIBUTION.
    DcUnavailable,
    /// The DC refused the KEY_DISTRIBUTION.
    DcRefused(ErrorCode),
}

/// What the AS reports to its operator.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AsEvent {
    /// A node logged in: its DC holds the new key and the LOGIN_RESPONSE is on its way.
    LoginSucceeded {
        account: Account,
        node_fqdn: Fqdn,
        session_key_id: u32,
    },
    /// A login was refused. `account` is the name the node claimed.
    LoginFailed {
        account: Account,
        reason: FailureReason,
    },
    /// Persist `through` as the high-water mark of the AS's sequence numbers under this DC key
    /// before sending any datagram polled after this event.
    SequenceReserved { dc: Fqdn, key_id: u32, through: u64 },
}

/// The AS's timers; each login entry has exactly one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AsTimer {
    LoginPending,
    KeyDistribution,
    LoginResponseKept,
    RefusalKept,
}

impl AsTimer {
    fn label(self) -> &'static str {
        match self {
            AsTimer::LoginPending => "login pending expiry",
            AsTimer::KeyDistribution => "KEY_DISTRIBUTION retransmission",
            AsTimer::LoginResponseKept => "LOGIN_RESPONSE expiry",
            AsTimer::RefusalKept => "login refusal expiry",
        }
    }
}

struct Pending {
    /// Counted against this source for `max_pending_per_source`.
    source: IpAddr,
    e_n: PublicKeyBytes,
    /// K_cfg: opens retransmissions of the CONFIG_REQUEST (its window drops exact replays).
    request_key: SignalingKey,
    response_key: SignalingKey,
    e_as: PublicKeyBytes,
    response: Message,
    transcript: [u8; 32],
}

struct Distributing {
    request_txid: u32,
    client: SocketAddr,
    local: SocketAddr,
    dc: Fqdn,
    tx: Transaction,
    distribution: Message,
    response: Message,
    node_fqdn: Fqdn,
    session_key_id: u32,
}

enum Phase {
    Pending(Box<Pending>),
    Distributing(Box<Distributing>),
    Answered {
        request_txid: u32,
        answer: Box<Message>,
        timer: AsTimer,
    },
}

struct Login {
    account: Account,
    login_key: SignalingKey,
    deadline: Time,
    phase: Phase,
}

impl Login {
    fn timer(&self) -> AsTimer {
        match &self.phase {
            Phase::Pending(_) => AsTimer::LoginPending,
            Phase::Distributing(_) => AsTimer::KeyDistribution,
            Phase::Answered { timer, .. } => *timer,
        }
    }
}

#[derive(Default)]
struct AccountFailures {
    recent: VecDeque<Time>,
    lockouts: u32,
    locked_until: Option<Time>,
    last_failure: Time,
}

/// Failed-login accounting per account name and per source, in bounded tables.
#[derive(Default)]
struct Throttle {
    accounts: BTreeMap<Account, AccountFailures>,
    sources: BTreeMap<IpAddr, VecDeque<Time>>,
}

impl Throttle {
    /// How long a login of `account` from `source` must wait, if it is refused now.
    fn refusal(
        &mut self,
        now: Time,
        account: &Account,
        source: IpAddr,
        l: &AsLimits,
    ) -> Option<Duration> {
        let mut wait = Duration::ZERO;
        if let Some(a) = self.accounts.get(account) {
            if now >= a.last_failure + l.failure_memory {
                self.accounts.remove(account);
            } else if let Some(until) = a.locked_until {
                wait = wait.max(until - now);
            }
        }
        if let Some(recent) = self.sources.get_mut(&source) {
            while recent.front().is_some_and(|t| *t + l.failure_window <= now) {
                recent.pop_front();
            }
            if recent.len() >= l.source_failures as usize {
                if let Some(oldest) = recent.front() {
                    wait = wait.max((*oldest + l.failure_window) - now);
                }
            }
        }
        (wait > Duration::ZERO).then_some(wait)
    }

    fn record_failure(&mut self, now: Time, account: &Account, source: IpAddr, l: &AsLimits) {
        if !self.accounts.contains_key(account) && self.accounts.len() >= l.max_tracked_accounts {
            // Forget the entry that matters least: an unlocked one failing longest ago, else the
            // lockout that ends first.
            let victim = self
                .accounts
                .iter()
                .min_by_key(|(_, a)| match a.locked_until {
                    Some(u) if u > now => (1, u),
                    _ => (0, a.last_failure),
                })
                .map(|(k, _)| k.clone());
            if let Some(v) = victim {
                self.accounts.remove(&v);
            }
        }
        if l.max_tracked_accounts > 0 {
            let a = self.accounts.entry(account.clone()).or_default();
            a.last_failure = now;
            while a
                .recent
                .front()
                .is_some_and(|t| *t + l.failure_window <= now)
            {
                a.recent.pop_front();
            }
            a.recent.push_back(now);
            if a.recent.len() >= l.account_failures as usize {
                a.recent.clear();
                let doublings = a.lockouts.min(31);
                a.lockouts = a.lockouts.saturating_add(1);
                let lock = l
                    .first_lockout
                    .saturating_mul(1u32 << doublings)
                    .min(l.max_lockout);
                a.locked_until = Some(now + lock);
            }
        }
        if !self.sources.contains_key(&source) && self.sources.len() >= l.max_tracked_sources {
            let victim = self
                .sources
                .iter()
                .min_by_key(|(_, r)| r.back().copied().unwrap_or(Time::ZERO))
                .map(|(k, _)| *k);
            if let Some(v) = victim {
                self.sources.remove(&v);
            }
        }
        if l.max_tracked_sources > 0 {
            let recent = self.sources.entry(source).or_default();
            recent.push_back(now);
            while recent.len() > l.source_failures as usize {
                recent.pop_front();
            }
        }
    }

    fn record_success(&mut self, account: &Account) {
        self.accounts.remove(account);
    }
}

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &SecretKey, parts: &[&[u8]]) -> Zeroizing<[u8; 32]> {
    let mut out = Zeroizing::new([0u8; 32]);
    // HMAC takes keys of any length: `new_from_slice` cannot fail.
    if let Ok(mut mac) = <HmacSha256 as Mac>::new_from_slice(key.expose()) {
        for p in parts {
            mac.update(p);
        }
        out.copy_from_slice(&mac.finalize().into_bytes());
    }
    out
}

/// A random non-zero `u32`; bounded work even for a degenerate generator.
fn random_nonzero_u32<R: RngCore + ?Sized>(rng: &mut R) -> u32 {
    (0..16)
        .map(|_| rng.next_u32())
        .find(|v| *v != 0)
        .unwrap_or(1)
}

/// The account server. See the [module documentation](self).
pub struct AccountServer {
    config: AsConfig,
    public: PublicKeyBytes,
    dc_keys: BTreeMap<Fqdn, SignalingKey>,
    dc_by_key_id: BTreeMap<u32, Fqdn>,
    logins: BTreeMap<u32, Login>,
    deadlines: BTreeSet<(Time, u32)>,
    pending_by_ephemeral: BTreeMap<PublicKeyBytes, u32>,
    pending_by_source: BTreeMap<IpAddr, usize>,
    login_by_distribution: BTreeMap<u32, u32>,
    throttle: Throttle,
    rtt: RttTable,
    output: ServerOutput<AsEvent>,
    drops: DropCounters,
}

impl fmt::Debug for AccountServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccountServer")
            .field("logins", &self.logins.len())
            .field("drops", &self.drops)
            .finish_non_exhaustive()
    }
}

impl AccountServer {
    /// Checks the configuration and starts with no login in progress.
    pub fn new(config: AsConfig) -> Result<Self, ConfigError> {
        let public = x25519_public(config.static_secret.expose());
        if x25519(&[1u8; 32], &public).is_err() {
            return Err(ConfigError::InvalidStaticKey);
        }
        let mut dc_keys = BTreeMap::new();
        let mut dc_by_key_id = BTreeMap::new();
        for (name, link) in &config.dcs {
            let bad = link.key_id == 0
                || link.key_id & 0x8000_0000 != 0
                || dc_by_key_id.contains_key(&link.key_id);
            if bad {
                return Err(ConfigError::InvalidDcKeyId {
                    dc: name.clone(),
                    key_id: link.key_id,
                });
            }
            dc_by_key_id.insert(link.key_id, name.clone());
            dc_keys.insert(
                name.clone(),
                SignalingKey::resume(
                    &link.key,
                    link.key_id,
                    Role::A,
                    link.high_water_mark,
                    config.limits.sequence_block,
                ),
            );
        }
        for (account, record) in &config.accounts {
            if !config.dcs.contains_key(&record.dc) {
                return Err(ConfigError::UnknownDc {
                    account: account.clone(),
                    dc: record.dc.clone(),
                });
            }
        }
        let l = config.limits;
        Ok(AccountServer {
            public,
            dc_keys,
            dc_by_key_id,
            logins: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            pending_by_ephemeral: BTreeMap::new(),
            pending_by_source: BTreeMap::new(),
            login_by_distribution: BTreeMap::new(),
            throttle: Throttle::default(),
            rtt: RttTable::new(l.max_rtt_peers),
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

    /// The AS's static public key, which nodes pin.
    pub fn public_key(&self) -> PublicKeyBytes {
        self.public
    }

    /// Datagrams dropped, by reason.
    pub fn drops(&self) -> &DropCounters {
        &self.drops
    }

    /// Login entries held, every phase together.
    pub fn logins_held(&self) -> usize {
        self.logins.len()
    }

    /// Events lost because the queue was full.
    pub fn events_lost(&self) -> u64 {
        self.output.events_lost()
    }

    /// The salt an unknown account is given: the first 16 bytes of
    /// `HMAC(concealment secret, "fake salt" || account)` (spec/04 §4.4).
    pub fn fake_salt(&self, account: &Account) -> [u8; 16] {
        let mac = hmac(
            &self.config.concealment_secret,
            &[b"fake salt", account.as_str().as_bytes()],
        );
        let mut salt = [0u8; 16];
        salt.copy_from_slice(&mac[..16]);
        salt
    }

    fn dummy_verifier(&self, account: &Account) -> SecretKey {
        let mac = hmac(
            &self.config.concealment_secret,
            &[b"dummy verifier", account.as_str().as_bytes()],
        );
        SecretKey::from_bytes(*mac)
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
            MessageType::ConfigRequest => {
                self.on_config_request(now, local, remote, buf, &header, rng)
            }
            MessageType::LoginRequest => {
                self.on_login_request(now, local, remote, buf, &header, rng)
            }
            MessageType::Ack | MessageType::Error => self.on_dc_answer(now, buf, &header),
            _ => Err(DropReason::Unexpected),
        }
    }

    fn on_config_request<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        buf: &mut [u8],
        header: &Header,
        rng: &mut R,
    ) -> Result<(), DropReason> {
        if buf.len() < CONFIG_REQUEST_MIN_LEN {
            return Err(DropReason::Unpadded);
        }
        if header.envelope.key_id != 0 {
            return Err(DropReason::UnknownKey);
        }
        // The header checks guarantee the ephemeral key of a CONFIG_REQUEST.
        let e_n = header.envelope.ephemeral.ok_or(DropReason::Unexpected)?;
        if let Some(&id) = self.pending_by_ephemeral.get(&e_n) {
            return self.answer_config_again(id, local, remote, buf);
        }
        let dh_es = x25519(self.config.static_secret.expose(), &e_n)
            .map_err(|_| DropReason::NonContributoryKey)?;
        let mut request_key =
            SignalingKey::new(&config_key(&dh_es, &e_n, &self.public), 0, Role::B);
        let (h, msg) = request_key.open(buf)?;
        let Message::ConfigRequest(request) = msg else {
            return Err(DropReason::Unexpected);
        };
        if !h.sealed {
            return Err(DropReason::Unexpected);
        }
        let source = remote.ip();
        if self.logins.len() >= self.config.limits.max_logins
            || self.pending_by_source.get(&source).copied().unwrap_or(0)
                >= self.config.limits.max_pending_per_source
        {
            return Err(DropReason::TableFull);
        }
        let login_id = self.fresh_login_id(rng).ok_or(DropReason::TableFull)?;
        let mut challenge = [0u8; 16];
        rng.fill_bytes(&mut challenge);
        let mut e_as_secret = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(e_as_secret.as_mut());
        let e_as = x25519_public(&e_as_secret);
        let dh_ee = x25519(&e_as_secret, &e_n).map_err(|_| DropReason::NonContributoryKey)?;
        let account = request.account;
        let transcript = login_transcript(
            &e_n,
            &e_as,
            &challenge,
            login_id,
            account.as_str().as_bytes(),
        );
        // The same work for known and unknown accounts.
        let fake_salt = self.fake_salt(&account);
        let (salt, iterations) = match self.config.accounts.get(&account) {
            Some(r) => (r.salt, r.iterations),
            None => (fake_salt, self.config.default_iterations),
        };
        let response: Message = ConfigResponse {
            login_id,
            challenge,
            salt,
            iterations,
            extensions: Extensions::none(),
        }
        .into();
        let mut response_key = SignalingKey::new(
            &config_response_key(&dh_es, &e_n, &self.public, &e_as),
            0,
            Role::B,
        );
        let datagram = response_key.seal_to_vec(&response, h.envelope.txid, Some(e_as));
        self.output.queue(Some(local), remote, datagram);
        let deadline = now + self.config.limits.login_pending;
        let login = Login {
            account,
            login_key: SignalingKey::new(
                &login_key(&dh_es, &dh_ee, &transcript),
                login_id,
                Role::B,
            ),
            deadline,
            phase: Phase::Pending(Box::new(Pending {
                source,
                e_n,
                request_key,
                response_key,
                e_as,
                response,
                transcript,
            })),
        };
        *self.pending_by_source.entry(source).or_insert(0) += 1;
        self.pending_by_ephemeral.insert(e_n, login_id);
        self.logins.insert(login_id, login);
        self.deadlines.insert((deadline, login_id));
        Ok(())
    }

    /// A retransmitted CONFIG_REQUEST (same E_n): the same CONFIG_RESPONSE, sealed again.
    fn answer_config_again(
        &mut self,
        id: u32,
        local: SocketAddr,
        remote: SocketAddr,
        buf: &mut [u8],
    ) -> Result<(), DropReason> {
        let Some(Login {
            phase: Phase::Pending(p),
            ..
        }) = self.logins.get_mut(&id)
        else {
            return Err(DropReason::Unexpected);
        };
        let (h, msg) = p.request_key.open(buf)?;
        if !h.sealed || !matches!(msg, Message::ConfigRequest(_)) {
            return Err(DropReason::Unexpected);
        }
        let datagram = p
            .response_key
            .seal_to_vec(&p.response, h.envelope.txid, Some(p.e_as));
        self.output.queue(Some(local), remote, datagram);
        Ok(())
    }

    fn fresh_login_id<R: RngCore + ?Sized>(&self, rng: &mut R) -> Option<u32> {
        (0..16)
            .map(|_| rng.next_u32())
            .find(|id| *id != 0 && !self.logins.contains_key(id))
    }

    fn on_login_request<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        buf: &mut [u8],
        header: &Header,
        rng: &mut R,
    ) -> Result<(), DropReason> {
        let login_id = header.envelope.key_id;
        let Some(mut login) = self.logins.remove(&login_id) else {
            if header.sealed {
                self.output.unknown_key(now, local, remote, header, Role::B);
            }
            return Err(DropReason::UnknownKey);
        };
        let old = login.deadline;
        let result = self.login_request_for(now, local, remote, buf, &mut login, rng);
        self.logins.insert(login_id, login);
        self.reschedule(login_id, old);
        result
    }

    /// Moves the deadline index of `id` from `old` to the entry's current deadline.
    fn reschedule(&mut self, id: u32, old: Time) {
        if let Some(login) = self.logins.get(&id) {
            if login.deadline != old {
                self.deadlines.remove(&(old, id));
                self.deadlines.insert((login.deadline, id));
            }
        }
    }

    fn login_request_for<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        buf: &mut [u8],
        login: &mut Login,
        rng: &mut R,
    ) -> Result<(), DropReason> {
        let (h, msg) = login.login_key.open(buf)?;
        let Message::LoginRequest(request) = msg else {
            return Err(DropReason::Unexpected);
        };
        if !h.sealed {
            return Err(DropReason::Unexpected);
        }
        let txid = h.envelope.txid;
        let pending = match &login.phase {
            Phase::Pending(p) => (p.transcript, p.e_n, p.source),
            Phase::Distributing(d) => {
                // The answer is being prepared: a retransmission is absorbed silently.
                return if d.request_txid == txid {
                    Ok(())
                } else {
                    Err(DropReason::Unexpected)
                };
            }
            Phase::Answered {
                request_txid,
                answer,
                ..
            } => {
                if *request_txid != txid {
                    return Err(DropReason::Unexpected);
                }
                let datagram = login.login_key.seal_to_vec(answer, txid, None);
                self.output.queue(Some(local), remote, datagram);
                return Ok(());
            }
        };
        let (transcript, e_n, pending_source) = pending;
        self.pending_by_ephemeral.remove(&e_n);
        if let Some(n) = self.pending_by_source.get_mut(&pending_source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.pending_by_source.remove(&pending_source);
            }
        }
        let limits = self.config.limits;
        let source = source_prefix(remote.ip(), 32, 64);
        let account = login.account.clone();
        if let Some(wait) = self.throttle.refusal(now, &account, source, &limits) {
            // Rounded up: waiting the whole time always suffices.
            let retry_after_ms =
                u32::try_from(wait.as_nanos().div_ceil(1_000_000)).unwrap_or(u32::MAX);
            self.refuse(
                now,
                local,
                remote,
                login,
                txid,
                ErrorCode::RateLimited,
                retry_after_ms,
            );
            self.output.event(AsEvent::LoginFailed {
                account,
                reason: FailureReason::RateLimited { retry_after: wait },
            });
            return Ok(());
        }
        // The same work for known and unknown accounts: one proof check, against the stored
        // verifier or the dummy one.
        let dummy = self.dummy_verifier(&account);
        let record = self.config.accounts.get(&account);
        let verifier = record.map_or(&dummy, |r| &r.auth_key);
        let proof_ok = verify_login_proof(verifier, &transcript, &request.proof);
        let record = match record {
            Some(r) if proof_ok => r.clone(),
            _ => {
                let reason = if record.is_some() {
                    FailureReason::WrongPassword
                } else {
                    FailureReason::UnknownAccount
                };
                self.throttle.record_failure(now, &account, source, &limits);
                self.refuse(now, local, remote, login, txid, ErrorCode::AuthFailed, 0);
                self.output.event(AsEvent::LoginFailed { account, reason });
                return Ok(());
            }
        };
        self.throttle.record_success(&account);
        let Some(dc_link) = self.config.dcs.get(&record.dc) else {
            // `new` checked that every account's DC is configured.
            self.refuse(now, local, remote, login, txid, ErrorCode::Unavailable, 0);
            return Ok(());
        };
        let dc_addr = dc_link.addr;
        let mut k_nd = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(k_nd.as_mut());
        let session_key_id = random_nonzero_u32(rng);
        let lifetime_s = u32::try_from(self.config.session_lifetime.as_secs()).unwrap_or(u32::MAX);
        let distribution: Message = KeyDistribution {
            key_role: KeyRole::NodeDc,
            new_key_id: session_key_id,
            key: SecretKey::from_bytes(*k_nd),
            lifetime_s,
            subject: record.node_fqdn.clone(),
            extensions: Extensions::none(),
        }
        .into();
        let response: Message = LoginResponse {
            node_fqdn: record.node_fqdn.clone(),
            session_key_id,
            node_dc_key: SecretKey::from_bytes(*k_nd),
            session_lifetime_s: lifetime_s,
            dc_fqdn: record.dc.clone(),
            dc_addrs: record.dc_addrs.clone(),
            ns_addrs: record.ns_addrs.clone(),
            cs_addrs: record.cs_addrs.clone(),
            keepalive_interval_s: record.keepalive_interval_s,
            extensions: Extensions::none(),
        }
        .into();
        let fresh = (0..16)
            .map(|_| rng.next_u32())
            .find(|t| !self.login_by_distribution.contains_key(t));
        let Some(dist_txid) = fresh else {
            self.refuse(now, local, remote, login, txid, ErrorCode::Unavailable, 0);
            return Ok(());
        };
        self.send_to_dc(&record.dc, dc_addr, &distribution, dist_txid);
        let rto = self.rtt.rto(dc_addr, &self.config.retransmit);
        let tx = Transaction::start(
            now,
            dist_txid,
            MessageType::KeyDistribution,
            dc_addr,
            rto,
            &self.config.retransmit,
            rng,
        );
        login.deadline = tx.deadline();
        self.login_by_distribution
            .insert(dist_txid, login.login_key.key_id());
        login.phase = Phase::Distributing(Box::new(Distributing {
            request_txid: txid,
            client: remote,
            local,
            dc: record.dc.clone(),
            tx,
            distribution,
            response,
            node_fqdn: record.node_fqdn,
            session_key_id,
        }));
        Ok(())
    }

    /// Answers the login with a sealed ERROR and keeps the answer for retransmissions.
    #[allow(clippy::too_many_arguments)]
    fn refuse(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        login: &mut Login,
        txid: u32,
        code: ErrorCode,
        retry_after_ms: u32,
    ) {
        let answer: Message = ErrorMsg {
            code,
            failed_type: MessageType::LoginRequest.to_u8(),
            retry_after_ms,
            extensions: Extensions::none(),
        }
        .into();
        let datagram = login.login_key.seal_to_vec(&answer, txid, None);
        self.output.queue(Some(local), remote, datagram);
        login.deadline = now + self.config.limits.answer_kept;
        login.phase = Phase::Answered {
            request_txid: txid,
            answer: Box::new(answer),
            timer: AsTimer::RefusalKept,
        };
    }

    fn send_to_dc(&mut self, dc: &Fqdn, addr: SocketAddr, msg: &Message, txid: u32) {
        let Some(key) = self.dc_keys.get_mut(dc) else {
            self.output.seal_failed();
            return;
        };
        let datagram = key.seal_to_vec(msg, txid, None);
        if let Some(through) = key.take_reserved_through() {
            let key_id = key.key_id();
            self.output.event(AsEvent::SequenceReserved {
                dc: dc.clone(),
                key_id,
                through,
            });
        }
        self.output.queue(None, addr, datagram);
    }

    fn on_dc_answer(
        &mut self,
        now: Time,
        buf: &mut [u8],
        header: &Header,
    ) -> Result<(), DropReason> {
        let dc = self
            .dc_by_key_id
            .get(&header.envelope.key_id)
            .ok_or(DropReason::UnknownKey)?
            .clone();
        let key = self.dc_keys.get_mut(&dc).ok_or(DropReason::UnknownKey)?;
        let (h, msg) = key.open(buf)?;
        if !h.sealed {
            return Err(DropReason::UnsealedHint);
        }
        let login_id = *self
            .login_by_distribution
            .get(&h.envelope.txid)
            .ok_or(DropReason::Unexpected)?;
        let Some(mut login) = self.logins.remove(&login_id) else {
            return Err(DropReason::Unexpected);
        };
        let old = login.deadline;
        let result = self.dc_answer_for(now, &dc, msg, &mut login);
        self.logins.insert(login_id, login);
        self.reschedule(login_id, old);
        result
    }

    fn dc_answer_for(
        &mut self,
        now: Time,
        dc: &Fqdn,
        msg: Message,
        login: &mut Login,
    ) -> Result<(), DropReason> {
        let Phase::Distributing(d) = &login.phase else {
            return Err(DropReason::Unexpected);
        };
        if &d.dc != dc {
            return Err(DropReason::Unexpected);
        }
        let (request_txid, client, local) = (d.request_txid, d.client, d.local);
        match msg {
            Message::Ack(ack) if ack.acked_type == MessageType::KeyDistribution.to_u8() => {
                if let Some(rtt) = d.tx.rtt_sample(now) {
                    self.rtt.on_sample(now, d.tx.remote(), rtt);
                }
                self.login_by_distribution.remove(&d.tx.txid());
                let event = AsEvent::LoginSucceeded {
                    account: login.account.clone(),
                    node_fqdn: d.node_fqdn.clone(),
                    session_key_id: d.session_key_id,
                };
                let response = d.response.clone();
                let datagram = login.login_key.seal_to_vec(&response, request_txid, None);
                self.output.queue(Some(local), client, datagram);
                login.deadline = now + self.config.limits.login_response_kept;
                login.phase = Phase::Answered {
                    request_txid,
                    answer: Box::new(response),
                    timer: AsTimer::LoginResponseKept,
                };
                self.output.event(event);
                Ok(())
            }
            Message::Error(e) => {
                self.login_by_distribution.remove(&d.tx.txid());
                let account = login.account.clone();
                self.refuse(
                    now,
                    local,
                    client,
                    login,
                    request_txid,
                    ErrorCode::Unavailable,
                    0,
                );
                self.output.event(AsEvent::LoginFailed {
                    account,
                    reason: FailureReason::DcRefused(e.code),
                });
                Ok(())
            }
            _ => Err(DropReason::Unexpected),
        }
    }

    /// Timers due at `now` fire: pending logins and kept answers expire, KEY_DISTRIBUTIONs are
    /// retransmitted or given up.
    pub fn handle_timeout<R: RngCore + CryptoRng>(&mut self, now: Time, rng: &mut R) {
        while let Some(&(deadline, id)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            self.deadlines.remove(&(deadline, id));
            if self.logins.get(&id).map(|l| l.deadline) != Some(deadline) {
                continue; // an index entry the login has moved away from
            }
            let Some(mut login) = self.logins.remove(&id) else {
                continue;
            };
            match &mut login.phase {
                Phase::Pending(p) => {
                    self.pending_by_ephemeral.remove(&p.e_n);
                    if let Some(n) = self.pending_by_source.get_mut(&p.source) {
                        *n = n.saturating_sub(1);
                        if *n == 0 {
                            self.pending_by_source.remove(&p.source);
                        }
                    }
                }
                Phase::Answered { .. } => {}
                Phase::Distributing(d) => {
                    match d.tx.on_timeout(now, &self.config.retransmit, rng) {
                        Expiry::NotDue => login.deadline = d.tx.deadline(),
                        Expiry::Retransmit => {
                            let (dc, addr, txid) = (d.dc.clone(), d.tx.remote(), d.tx.txid());
                            let msg = d.distribution.clone();
                            login.deadline = d.tx.deadline();
                            self.send_to_dc(&dc, addr, &msg, txid);
                        }
                        Expiry::Failed => {
                            self.login_by_distribution.remove(&d.tx.txid());
                            let (local, client, txid) = (d.local, d.client, d.request_txid);
                            let account = login.account.clone();
                            self.refuse(
                                now,
                                local,
                                client,
                                &mut login,
                                txid,
                                ErrorCode::Unavailable,
                                0,
                            );
                            self.output.event(AsEvent::LoginFailed {
                                account,
                                reason: FailureReason::DcUnavailable,
                            });
                        }
                    }
                    self.deadlines.insert((login.deadline, id));
                    self.logins.insert(id, login);
                }
            }
        }
    }

    /// The next datagram to send, written into `buf` (give it at least
    /// [`ntm_wire::MAX_SIGNALING_LEN`] bytes).
    pub fn poll_transmit(&mut self, _now: Time, buf: &mut [u8]) -> Option<Transmit> {
        self.output.poll_transmit(buf)
    }

    pub fn poll_event(&mut self) -> Option<AsEvent> {
        self.output.poll_event()
    }

    /// The earliest deadline and what it is for.
    pub fn poll_timeout(&self) -> Option<(Time, &'static str)> {
        let &(at, id) = self.deadlines.first()?;
        let label = self
            .logins
            .get(&id)
            .map_or("login entry", |l| l.timer().label());
        Some((at, label))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::login::{LoginClient, LoginConfig, LoginEvent};
    use ntm_wire::crypto::auth_key;
    use ntm_wire::{SignalingPacket, TransportAddr, MAX_SIGNALING_LEN};
    use rand_chacha::ChaCha8Rng;
    use rand_core::SeedableRng;

    pub(crate) const PASSWORD: &[u8] = b"hunter2 but longer";

    pub(crate) fn as_addr() -> SocketAddr {
        SocketAddr::from(([203, 0, 113, 2], 4280))
    }

    pub(crate) fn node_addr() -> SocketAddr {
        SocketAddr::from(([198, 51, 100, 2], 5000))
    }

    fn dc_addr() -> SocketAddr {
        SocketAddr::from(([203, 0, 113, 3], 4281))
    }

    pub(crate) fn config(iterations: u32) -> AsConfig {
        let salt = [9; 16];
        let dc = Fqdn::new("dc1.example").unwrap();
        let mut accounts = BTreeMap::new();
        accounts.insert(
            Account::new("alice").unwrap(),
            AccountRecord {
                auth_key: auth_key(PASSWORD, &salt, iterations),
                salt,
                iterations,
                node_fqdn: Fqdn::new("alice.dc1.example").unwrap(),
                dc: dc.clone(),
                dc_addrs: AddrList::new(vec![TransportAddr::new(dc_addr())]).unwrap(),
                ns_addrs: AddrList::empty(),
                cs_addrs: AddrList::empty(),
                keepalive_interval_s: 25,
            },
        );
        let mut dcs = BTreeMap::new();
        dcs.insert(
            dc,
            DcLink {
                key: SecretKey::from_bytes([4; 32]),
                key_id: 17,
                addr: dc_addr(),
                high_water_mark: 0,
            },
        );
        AsConfig {
            static_secret: SecretKey::from_bytes([1; 32]),
            concealment_secret: SecretKey::from_bytes([2; 32]),
            default_iterations: 10_000,
            session_lifetime: Duration::from_secs(86_400),
            dcs,
            accounts,
            limits: AsLimits::default(),
            retransmit: RetransmitConfig::default(),
        }
    }

    pub(crate) fn client(server: &AccountServer, account: &str) -> LoginClient {
        let cfg = LoginConfig::new(
            Account::new(account).unwrap(),
            server.public_key(),
            as_addr(),
        );
        LoginClient::new(cfg, PASSWORD).unwrap()
    }

    pub(crate) fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    /// Every datagram the client has queued.
    pub(crate) fn from_client(c: &mut LoginClient) -> Vec<Vec<u8>> {
        let mut buf = [0u8; MAX_SIGNALING_LEN];
        std::iter::from_fn(|| {
            c.poll_transmit(Time::ZERO, &mut buf)
                .map(|t| buf[..t.len].to_vec())
        })
        .collect()
    }

    /// Every datagram the AS has queued, with its destination.
    pub(crate) fn from_as(s: &mut AccountServer) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut buf = [0u8; MAX_SIGNALING_LEN];
        std::iter::from_fn(|| {
            s.poll_transmit(Time::ZERO, &mut buf)
                .map(|t| (t.dst, buf[..t.len].to_vec()))
        })
        .collect()
    }

    fn to_as(s: &mut AccountServer, now: Time, from: SocketAddr, d: &[u8], r: &mut ChaCha8Rng) {
        s.handle_datagram(now, as_addr(), from, &mut d.to_vec(), r);
    }

    #[test]
    fn a_config_request_under_128_bytes_is_dropped_without_an_answer() {
        let mut server = AccountServer::new(config(10_000)).unwrap();
        let mut r = rng(1);
        // A CONFIG_REQUEST sealed correctly but without its PADDING.
        let e_n_secret = [7u8; 32];
        let e_n = x25519_public(&e_n_secret);
        let dh = x25519(&e_n_secret, &server.public_key()).unwrap();
        let mut k = SignalingKey::new(&config_key(&dh, &e_n, &server.public_key()), 0, Role::A);
        let msg: Message = ntm_wire::ConfigRequest {
            account: Account::new("alice").unwrap(),
            extensions: Extensions::none(),
        }
        .into();
        let short = k.seal_to_vec(&msg, 1, Some(e_n)).unwrap();
        assert_eq!(short.len(), 73 + 5, "no extension area at all");
        to_as(&mut server, Time::ZERO, node_addr(), &short, &mut r);
        assert!(from_as(&mut server).is_empty());
        assert_eq!(server.drops().get("unpadded"), 1);
        assert_eq!(server.logins_held(), 0);
        let mut c = client(&server, "alice");
        c.login(Time::ZERO, &mut rng(2));
        let padded = from_client(&mut c).remove(0);
        assert_eq!(padded.len(), 128);
        to_as(&mut server, Time::ZERO, node_addr(), &padded, &mut r);
        let answers = from_as(&mut server);
        assert_eq!(answers.len(), 1);
        assert!(answers[0].1.len() < padded.len(), "never amplified");
    }

    #[test]
    fn a_retransmitted_config_request_gets_the_same_pending_login_sealed_anew_and_a_copy_gets_nothing(
    ) {
        let mut server = AccountServer::new(config(10_000)).unwrap();
        let (mut r, mut cr) = (rng(1), rng(2));
        let mut c = client(&server, "alice");
        c.login(Time::ZERO, &mut cr);
        let first = from_client(&mut c).remove(0);
        let (due, _) = c.poll_timeout().unwrap();
        c.handle_timeout(due, &mut cr);
        let second = from_client(&mut c).remove(0);
        assert_ne!(first, second);
        to_as(&mut server, Time::ZERO, node_addr(), &first, &mut r);
        to_as(&mut server, due, node_addr(), &second, &mut r);
        to_as(&mut server, due, node_addr(), &second, &mut r);
        let answers = from_as(&mut server);
        assert_eq!(answers.len(), 2, "the copy is a replay");
        assert_eq!(server.drops().get("replayed"), 1);
        assert_eq!(server.logins_held(), 1, "one pending login for one E_n");
        let eph = |d: &[u8]| {
            SignalingPacket::parse(d)
                .unwrap()
                .header()
                .envelope
                .ephemeral
        };
        assert_eq!(eph(&answers[0].1), eph(&answers[1].1), "the same E_as");
        assert_ne!(answers[0].1, answers[1].1, "a new seal");
    }

    /// Runs CONFIG_REQUEST and CONFIG_RESPONSE; returns the client's LOGIN_REQUEST.
    fn to_login_request(
        server: &mut AccountServer,
        c: &mut LoginClient,
        r: &mut ChaCha8Rng,
        cr: &mut ChaCha8Rng,
    ) -> Vec<u8> {
        c.login(Time::ZERO, cr);
        for d in from_client(c) {
            to_as(server, Time::ZERO, node_addr(), &d, r);
        }
        for (_, mut d) in from_as(server) {
            c.handle_datagram(Time::ZERO, node_addr(), as_addr(), &mut d, cr);
        }
        from_client(c).remove(0)
    }

    #[test]
    fn a_pending_login_is_forgotten_after_30_seconds_and_its_login_id_becomes_unknown() {
        let mut server = AccountServer::new(config(10_000)).unwrap();
        let (mut r, mut cr) = (rng(1), rng(2));
        let mut c = client(&server, "alice");
        let request = to_login_request(&mut server, &mut c, &mut r, &mut cr);
        assert_eq!(
            server.poll_timeout(),
            Some((Time::from_secs(30), "login pending expiry"))
        );
        server.handle_timeout(Time::from_millis(29_999), &mut r);
        assert_eq!(server.logins_held(), 1);
        server.handle_timeout(Time::from_secs(30), &mut r);
        assert_eq!(server.logins_held(), 0);
        assert_eq!(server.poll_timeout(), None);
        to_as(
            &mut server,
            Time::from_secs(30),
            node_addr(),
            &request,
            &mut r,
        );
        let answers = from_as(&mut server);
        assert_eq!(answers.len(), 1);
        let p = SignalingPacket::parse(&answers[0].1).unwrap();
        assert_eq!(answers[0].1.len(), 31);
        assert!(!p.header().sealed);
        assert_eq!(p.header().envelope.role, Role::B);
        assert!(matches!(
            p.decode_plain().unwrap(),
            Message::Error(ErrorMsg {
                code: ErrorCode::UnknownKey,
                failed_type: 0x12,
                ..
            })
        ));
    }

    #[test]
    fn unsealed_errors_go_out_at_most_ten_per_second_per_prefix() {
        let mut server = AccountServer::new(config(10_000)).unwrap();
        let mut r = rng(1);
        let mut k = SignalingKey::new(&SecretKey::from_bytes([0; 32]), 12345, Role::A);
        let msg: Message = ntm_wire::LoginRequest {
            proof: [0; 32],
            extensions: Extensions::none(),
        }
        .into();
        for i in 0..12u8 {
            let d = k.seal_to_vec(&msg, 1, None).unwrap();
            let from = SocketAddr::from(([198, 51, 100, i], 5000));
            to_as(&mut server, Time::ZERO, from, &d, &mut r);
        }
        assert_eq!(from_as(&mut server).len(), 10);
        let d = k.seal_to_vec(&msg, 1, None).unwrap();
        to_as(&mut server, Time::from_secs(1), node_addr(), &d, &mut r);
        assert_eq!(from_as(&mut server).len(), 1, "a new second, a new budget");
        assert_eq!(server.drops().get("unknown_key"), 13);
    }

    #[test]
    fn a_source_holding_its_share_of_pending_logins_is_refused_another() {
        let mut cfg = config(10_000);
        cfg.limits.max_pending_per_source = 2;
        let mut server = AccountServer::new(cfg).unwrap();
        let mut r = rng(1);
        for seed in 0..3 {
            let mut c = client(&server, "alice");
            c.login(Time::ZERO, &mut rng(10 + seed));
            for d in from_client(&mut c) {
                to_as(&mut server, Time::ZERO, node_addr(), &d, &mut r);
            }
        }
        assert_eq!(from_as(&mut server).len(), 2);
        assert_eq!(server.drops().get("table_full"), 1);
        let other = SocketAddr::from(([198, 51, 100, 99], 5000));
        let mut c = client(&server, "alice");
        c.login(Time::ZERO, &mut rng(20));
        to_as(
            &mut server,
            Time::ZERO,
            other,
            &from_client(&mut c)[0],
            &mut r,
        );
        assert_eq!(
            from_as(&mut server).len(),
            1,
            "another source still gets in"
        );
    }

    #[test]
    fn an_ack_under_the_dc_key_for_no_outstanding_distribution_changes_nothing() {
        let mut server = AccountServer::new(config(10_000)).unwrap();
        let mut r = rng(1);
        let mut dc = SignalingKey::new(&SecretKey::from_bytes([4; 32]), 17, Role::B);
        let ack: Message = ntm_wire::Ack {
            acked_type: 0x20,
            extensions: Extensions::none(),
        }
        .into();
        let d = dc.seal_to_vec(&ack, 77, None).unwrap();
        to_as(&mut server, Time::ZERO, dc_addr(), &d, &mut r);
        assert!(from_as(&mut server).is_empty());
        assert_eq!(server.drops().get("unexpected"), 1);
        let mut reflected = SignalingKey::new(&SecretKey::from_bytes([4; 32]), 17, Role::A);
        let d = reflected.seal_to_vec(&ack, 77, None).unwrap();
        to_as(&mut server, Time::ZERO, dc_addr(), &d, &mut r);
        assert_eq!(server.drops().get("reflected"), 1);
    }

    #[test]
    fn the_as_refuses_an_account_whose_dc_is_not_configured_and_a_duplicate_dc_key_id() {
        let mut cfg = config(10_000);
        cfg.dcs.clear();
        assert!(matches!(
            AccountServer::new(cfg),
            Err(ConfigError::UnknownDc { .. })
        ));
        let mut cfg = config(10_000);
        let link = cfg.dcs.values().next().unwrap().clone();
        cfg.dcs.insert(Fqdn::new("dc2.example").unwrap(), link);
        assert!(matches!(
            AccountServer::new(cfg),
            Err(ConfigError::InvalidDcKeyId { key_id: 17, .. })
        ));
        let mut cfg = config(10_000);
        cfg.dcs.values_mut().for_each(|l| l.key_id = 0x8000_0001);
        assert!(matches!(
            AccountServer::new(cfg),
            Err(ConfigError::InvalidDcKeyId { .. })
        ));
    }

    #[test]
    fn each_further_lockout_doubles_and_a_success_forgets_them() {
        let l = AsLimits::default();
        let mut t = Throttle::default();
        let a = Account::new("alice").unwrap();
        let ip = IpAddr::from([198, 51, 100, 2]);
        let other_ip = |n: u8| IpAddr::from([198, 51, 101, n]);
        let mut now = Time::from_secs(1000);
        for i in 0..4 {
            t.record_failure(now, &a, other_ip(i), &l);
            assert_eq!(t.refusal(now, &a, ip, &l), None, "failure {i}");
        }
        t.record_failure(now, &a, other_ip(4), &l);
        assert_eq!(t.refusal(now, &a, ip, &l), Some(Duration::from_secs(60)));
        now += Duration::from_secs(60);
        assert_eq!(t.refusal(now, &a, ip, &l), None);
        for i in 0..5 {
            t.record_failure(now, &a, other_ip(i), &l);
        }
        assert_eq!(t.refusal(now, &a, ip, &l), Some(Duration::from_secs(120)));
        t.record_success(&a);
        assert_eq!(t.refusal(now, &a, ip, &l), None);
    }

    #[test]
    fn twenty_failures_from_one_source_in_a_minute_refuse_it_for_any_account() {
        let l = AsLimits::default();
        let mut t = Throttle::default();
        let ip = IpAddr::from([198, 51, 100, 2]);
        let now = Time::from_secs(1000);
        for i in 0..20u8 {
            let a = Account::new(&format!("user{i}")).unwrap();
            assert_eq!(t.refusal(now, &a, ip, &l), None);
            t.record_failure(now, &a, ip, &l);
        }
        let fresh = Account::new("fresh").unwrap();
        assert_eq!(
            t.refusal(now, &fresh, ip, &l),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            t.refusal(now + Duration::from_secs(60), &fresh, ip, &l),
            None
        );
    }

    #[test]
    fn the_tracked_accounts_stay_within_their_bound() {
        let l = AsLimits {
            max_tracked_accounts: 3,
            ..AsLimits::default()
        };
        let mut t = Throttle::default();
        for i in 0..10u8 {
            let a = Account::new(&format!("user{i}")).unwrap();
            t.record_failure(
                Time::from_secs(u64::from(i)),
                &a,
                IpAddr::from([10, 0, 0, i]),
                &l,
            );
        }
        assert_eq!(t.accounts.len(), 3);
    }

    #[test]
    fn a_login_ends_in_a_session_the_node_and_the_dc_share() {
        let mut server = AccountServer::new(config(10_000)).unwrap();
        let (mut r, mut cr) = (rng(1), rng(2));
        let mut c = client(&server, "alice");
        let request = to_login_request(&mut server, &mut c, &mut r, &mut cr);
        to_as(&mut server, Time::ZERO, node_addr(), &request, &mut r);
        let mut out = from_as(&mut server);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, dc_addr());
        assert_eq!(
            server.poll_event(),
            Some(AsEvent::SequenceReserved {
                dc: Fqdn::new("dc1.example").unwrap(),
                key_id: 17,
                through: 1 << 16
            })
        );
        let mut dc = SignalingKey::new(&SecretKey::from_bytes([4; 32]), 17, Role::B);
        let (h, msg) = dc.open(&mut out[0].1).unwrap();
        let Message::KeyDistribution(kd) = msg else {
            panic!("{msg:?}")
        };
        let ack: Message = ntm_wire::Ack {
            acked_type: 0x20,
            extensions: Extensions::none(),
        }
        .into();
        let d = dc.seal_to_vec(&ack, h.envelope.txid, None).unwrap();
        to_as(&mut server, Time::from_millis(40), dc_addr(), &d, &mut r);
        assert!(matches!(
            server.poll_event(),
            Some(AsEvent::LoginSucceeded { .. })
        ));
        assert_eq!(
            server.poll_timeout(),
            Some((
                Time::from_millis(40) + Duration::from_secs(600),
                "LOGIN_RESPONSE expiry"
            ))
        );
        for (_, mut d) in from_as(&mut server) {
            c.handle_datagram(
                Time::from_millis(60),
                node_addr(),
                as_addr(),
                &mut d,
                &mut cr,
            );
        }
        let Some(LoginEvent::LoggedIn(session)) = c.poll_event() else {
            panic!("not logged in")
        };
        assert_eq!(session.node_dc_key, kd.key);
        assert_eq!(session.session_key_id, kd.new_key_id);
        assert_eq!(kd.key_role, KeyRole::NodeDc);
        assert_eq!(kd.subject, session.node_fqdn);
    }

    #[test]
    fn random_and_bit_flipped_datagrams_never_panic_and_never_open_a_session() {
        let mut server = AccountServer::new(config(10_000)).unwrap();
        let (mut r, mut cr, mut noise) = (rng(1), rng(2), rng(3));
        let mut c = client(&server, "alice");
        let request = to_login_request(&mut server, &mut c, &mut r, &mut cr);
        let mut valid = vec![request];
        c.login(Time::ZERO, &mut cr);
        valid.extend(from_client(&mut c));
        for i in 0..20_000u32 {
            let mut d = match i % 2 {
                0 => {
                    let len = (noise.next_u32() % 300) as usize;
                    let mut d = vec![0u8; len];
                    noise.fill_bytes(&mut d);
                    // Mostly well-formed headers of the types the AS takes, to get past parse.
                    if let Some(b) = d.get_mut(..2) {
                        b.copy_from_slice(&[[0x10, 0x12, 0x60, 0x61][i as usize / 2 % 4], 1]);
                    }
                    d
                }
                _ => {
                    let mut d = valid[(i as usize / 2) % valid.len()].clone();
                    let bit = noise.next_u32() as usize % (d.len() * 8);
                    d[bit / 8] ^= 1 << (bit % 8);
                    d
                }
            };
            let now = Time::from_millis(u64::from(i));
            server.handle_datagram(now, as_addr(), node_addr(), &mut d.clone(), &mut r);
            c.handle_datagram(now, node_addr(), as_addr(), &mut d, &mut cr);
            server.handle_timeout(now, &mut r);
        }
        from_as(&mut server);
        while let Some(e) = server.poll_event() {
            assert!(!matches!(e, AsEvent::LoginSucceeded { .. }), "{e:?}");
        }
        assert!(server.drops().total() >= 19_000, "{:?}", server.drops());
    }
}
