//! The node's login client: spec/04-crypto.md §4.4 and spec/05-procedures.md §5.2 steps 1, 2, 3
//! and 6, from the node's side. It will become part of the node; alone, it turns an account, a
//! password and the pinned AS key into a [`Session`].
//!
//! ```text
//! login() ─▶ CONFIG_REQUEST (128 bytes, E_n)  ──▶ CONFIG_RESPONSE (E_as, salt, iterations)
//!        ─▶ auth key (PBKDF2), transcript, K_login, proof
//!        ─▶ LOGIN_REQUEST (72 bytes)          ──▶ LOGIN_RESPONSE ─▶ LoginEvent::LoggedIn
//! ```
//!
//! Each request is retransmitted on the schedule of spec/07 §7.1 (a new seal, the same
//! transaction ID); when six transmissions go unanswered the login fails with
//! [`LoginFailure::Timeout`]. The client never retries by itself after a failure: the node
//! decides when to call [`LoginClient::login`] again (after `retry_after` for RateLimited, never
//! automatically after AuthFailed).
//!
//! Drive it like every entity: after each input drain [`LoginClient::poll_event`] and
//! [`LoginClient::poll_transmit`], then wait for [`LoginClient::poll_timeout`].
//!
//! The PBKDF2 stretch (the account's iterations, 100 000 by default) runs inside
//! [`LoginClient::handle_datagram`] when the CONFIG_RESPONSE arrives; it is bounded by
//! [`LoginConfig::max_iterations`].

use core::fmt;
use core::time::Duration;
use std::net::SocketAddr;

use ntm_wire::crypto::{
    auth_key, config_key, config_response_key, login_key, login_proof, login_transcript, x25519,
    x25519_public,
};
use ntm_wire::{
    Account, AddrList, ConfigRequest, ErrorCode, Extension, Extensions, Fqdn, LoginRequest,
    Message, MessageType, PublicKeyBytes, Role, SecretKey, SignalingPacket,
};
use rand_core::{CryptoRng, RngCore};
use zeroize::Zeroizing;

use crate::signaling::{
    DropCounters, DropReason, Expiry, Outbox, RetransmitConfig, RttEstimator, SignalingKey,
    Transaction, Transmit,
};
use crate::time::Time;

/// The fewest PBKDF2 iterations a node accepts (spec/04 §4.4).
pub const MIN_ITERATIONS: u32 = 10_000;

/// The account name length up to which CONFIG_REQUEST is exactly 128 bytes.
const PADDED_ACCOUNT_LEN: usize = 51;

/// What the login client needs besides the password.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginConfig {
    pub account: Account,
    /// The AS's static X25519 public key, pinned in the node's configuration.
    pub as_public_key: PublicKeyBytes,
    pub as_addr: SocketAddr,
    /// The local address to send from; `None` lets the runtime choose.
    pub local: Option<SocketAddr>,
    /// Fewer iterations than this are refused: [`MIN_ITERATIONS`].
    pub min_iterations: u32,
    /// More iterations than this are refused, to bound the work one datagram can cause.
    pub max_iterations: u32,
    pub retransmit: RetransmitConfig,
}

impl LoginConfig {
    /// The defaults for everything but the account and the AS.
    pub fn new(account: Account, as_public_key: PublicKeyBytes, as_addr: SocketAddr) -> Self {
        LoginConfig {
            account,
            as_public_key,
            as_addr,
            local: None,
            min_iterations: MIN_ITERATIONS,
            max_iterations: 10_000_000,
            retransmit: RetransmitConfig::default(),
        }
    }
}

/// The session a successful login opens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub node_fqdn: Fqdn,
    /// The key ID of K_nd (and of the node↔NS and node↔CS keys derived from it).
    pub session_key_id: u32,
    /// K_nd, the node↔DC key.
    pub node_dc_key: SecretKey,
    pub dc_fqdn: Fqdn,
    pub dc_addrs: Vec<SocketAddr>,
    pub ns_addrs: Vec<SocketAddr>,
    pub cs_addrs: Vec<SocketAddr>,
    pub keepalive_interval: Duration,
    pub lifetime: Duration,
    /// When the LOGIN_RESPONSE arrived; the node logs in again at 90 % of `lifetime`.
    pub established_at: Time,
}

/// Why a login failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LoginFailure {
    /// Unknown account or wrong password (the AS does not say which). Do not retry
    /// automatically with the same password.
    AuthFailed,
    /// No answer after the last transmission of a request.
    Timeout,
    /// Too many failures for the account or from this address: wait before trying again.
    RateLimited { retry_after: Duration },
    /// The AS could not complete the login now (its DC did not answer).
    Unavailable { retry_after: Duration },
    /// The AS asked for fewer PBKDF2 iterations than the node accepts, or more.
    UnacceptableIterations { iterations: u32 },
    /// Another ERROR from the AS.
    Refused(ErrorCode),
}

/// What the login client reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoginEvent {
    LoggedIn(Session),
    LoginFailed(LoginFailure),
}

/// A configuration the client refuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LoginConfigError {
    /// The pinned AS key is of low order: no secret can be agreed with it.
    InvalidAsKey,
    /// The PADDING would not fit (cannot happen for a valid account name).
    Unencodable,
}

impl fmt::Display for LoginConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoginConfigError::InvalidAsKey => f.write_str("the pinned AS key is unusable"),
            LoginConfigError::Unencodable => f.write_str("the CONFIG_REQUEST cannot be encoded"),
        }
    }
}

impl std::error::Error for LoginConfigError {}

enum State {
    Idle,
    /// CONFIG_REQUEST sent.
    Configuring {
        e_n_secret: Zeroizing<[u8; 32]>,
        e_n: PublicKeyBytes,
        dh_es: Zeroizing<[u8; 32]>,
        request_key: SignalingKey,
        tx: Transaction,
    },
    /// LOGIN_REQUEST sent.
    LoggingIn {
        login_key: SignalingKey,
        request: Message,
        tx: Transaction,
    },
}

/// The node's login client. See the [module documentation](self).
pub struct LoginClient {
    config: LoginConfig,
    password: Zeroizing<Vec<u8>>,
    config_request: Message,
    state: State,
    rtt: RttEstimator,
    outbox: Outbox,
    event: Option<LoginEvent>,
    drops: DropCounters,
    seal_failures: u64,
}

impl fmt::Debug for LoginClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoginClient")
            .field("account", &self.config.account)
            .field("as_addr", &self.config.as_addr)
            .field("state", &self.state_label())
            .finish_non_exhaustive()
    }
}

impl LoginClient {
    pub fn new(config: LoginConfig, password: &[u8]) -> Result<Self, LoginConfigError> {
        if x25519(&[1u8; 32], &config.as_public_key).is_err() {
            return Err(LoginConfigError::InvalidAsKey);
        }
        let n = config.account.as_str().len();
        let padding = Extension {
            ext_type: Extension::PADDING,
            value: vec![0u8; PADDED_ACCOUNT_LEN.saturating_sub(n)],
        };
        let extensions =
            Extensions::new(vec![padding]).map_err(|_| LoginConfigError::Unencodable)?;
        let config_request = ConfigRequest {
            account: config.account.clone(),
            extensions,
        }
        .into();
        Ok(LoginClient {
            config,
            password: Zeroizing::new(password.to_vec()),
            config_request,
            state: State::Idle,
            rtt: RttEstimator::default(),
            outbox: Outbox::new(8),
            event: None,
            drops: DropCounters::default(),
            seal_failures: 0,
        })
    }

    /// Starts a login, abandoning one in progress.
    pub fn login<R: RngCore + CryptoRng>(&mut self, now: Time, rng: &mut R) {
        self.event = None;
        let mut e_n_secret = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(e_n_secret.as_mut());
        let e_n = x25519_public(&e_n_secret);
        let dh_es = match x25519(&e_n_secret, &self.config.as_public_key) {
            Ok(dh) => dh,
            // `new` checked the AS key; a clamped secret with a valid key always agrees.
            Err(_) => {
                self.state = State::Idle;
                self.event = Some(LoginEvent::LoginFailed(LoginFailure::Refused(
                    ErrorCode::UnknownKey,
                )));
                return;
            }
        };
        let mut request_key = SignalingKey::new(
            &config_key(&dh_es, &e_n, &self.config.as_public_key),
            0,
            Role::A,
        );
        let txid = rng.next_u32();
        let datagram = request_key.seal_to_vec(&self.config_request, txid, Some(e_n));
        self.queue(datagram);
        let tx = Transaction::start(
            now,
            txid,
            MessageType::ConfigRequest,
            self.config.as_addr,
            self.rtt.rto(&self.config.retransmit),
            &self.config.retransmit,
            rng,
        );
        self.state = State::Configuring {
            e_n_secret,
            e_n,
            dh_es,
            request_key,
            tx,
        };
    }

    /// Whether a login is in progress.
    pub fn is_logging_in(&self) -> bool {
        !matches!(self.state, State::Idle)
    }

    /// The RTT estimate towards the AS.
    pub fn rtt(&self) -> &RttEstimator {
        &self.rtt
    }

    /// Datagrams dropped, by reason.
    pub fn drops(&self) -> &DropCounters {
        &self.drops
    }

    fn state_label(&self) -> &'static str {
        match self.state {
            State::Idle => "idle",
            State::Configuring { .. } => "configuring",
            State::LoggingIn { .. } => "logging in",
        }
    }

    /// A datagram arrived at `local` from `remote`. `buf` is opened in place.
    pub fn handle_datagram<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        _local: SocketAddr,
        _remote: SocketAddr,
        buf: &mut [u8],
        rng: &mut R,
    ) {
        let result = match self.state {
            State::Idle => Err(DropReason::Unexpected),
            State::Configuring { .. } => self.on_config_response(now, buf, rng),
            State::LoggingIn { .. } => self.on_login_answer(now, buf),
        };
        if let Err(reason) = result {
            self.drops.record(&reason);
        }
    }

    fn on_config_response<R: RngCore + CryptoRng>(
        &mut self,
        now: Time,
        buf: &mut [u8],
        rng: &mut R,
    ) -> Result<(), DropReason> {
        let State::Configuring {
            e_n_secret,
            e_n,
            dh_es,
            tx,
            ..
        } = &self.state
        else {
            return Err(DropReason::Unexpected);
        };
        let header = *SignalingPacket::parse(buf)
            .map_err(DropReason::Header)?
            .header();
        if header.msg_type != MessageType::ConfigResponse || header.envelope.txid != tx.txid() {
            return Err(DropReason::Unexpected);
        }
        let e_as = header.envelope.ephemeral.ok_or(DropReason::Unexpected)?;
        let as_public = self.config.as_public_key;
        let mut response_key = SignalingKey::new(
            &config_response_key(dh_es, e_n, &as_public, &e_as),
            0,
            Role::A,
        );
        let (_, msg) = response_key.open(buf)?;
        let Message::ConfigResponse(response) = msg else {
            return Err(DropReason::Unexpected);
        };
        let dh_ee = x25519(e_n_secret, &e_as).map_err(|_| DropReason::NonContributoryKey)?;
        if let Some(rtt) = tx.rtt_sample(now) {
            self.rtt.on_sample(rtt);
        }
        let iterations = response.iterations;
        if iterations < self.config.min_iterations || iterations > self.config.max_iterations {
            self.finish(LoginFailure::UnacceptableIterations { iterations });
            return Ok(());
        }
        let transcript = login_transcript(
            e_n,
            &e_as,
            &response.challenge,
            response.login_id,
            self.config.account.as_str().as_bytes(),
        );
        let auth = auth_key(&self.password, &response.salt, iterations);
        let request: Message = LoginRequest {
            proof: login_proof(&auth, &transcript),
            extensions: Extensions::none(),
        }
        .into();
        let mut login_key = SignalingKey::new(
            &login_key(dh_es, &dh_ee, &transcript),
            response.login_id,
            Role::A,
        );
        let txid = rng.next_u32();
        let datagram = login_key.seal_to_vec(&request, txid, None);
        self.queue(datagram);
        let tx = Transaction::start(
            now,
            txid,
            MessageType::LoginRequest,
            self.config.as_addr,
            self.rtt.rto(&self.config.retransmit),
            &self.config.retransmit,
            rng,
        );
        self.state = State::LoggingIn {
            login_key,
            request,
            tx,
        };
        Ok(())
    }

    fn on_login_answer(&mut self, now: Time, buf: &mut [u8]) -> Result<(), DropReason> {
        let State::LoggingIn { login_key, tx, .. } = &mut self.state else {
            return Err(DropReason::Unexpected);
        };
        let (header, msg) = login_key.open(buf)?;
        if header.envelope.txid != tx.txid() {
            return Err(DropReason::Unexpected);
        }
        if !header.sealed {
            // Unsealed ERROR (UnknownKey): a hint only; the retransmissions go on.
            return Err(DropReason::UnsealedHint);
        }
        let rtt = tx.rtt_sample(now);
        let outcome = match msg {
            Message::LoginResponse(r) => Ok(Session {
                node_fqdn: r.node_fqdn,
                session_key_id: r.session_key_id,
                node_dc_key: r.node_dc_key,
                dc_fqdn: r.dc_fqdn,
                dc_addrs: addrs(&r.dc_addrs),
                ns_addrs: addrs(&r.ns_addrs),
                cs_addrs: addrs(&r.cs_addrs),
                keepalive_interval: Duration::from_secs(u64::from(r.keepalive_interval_s)),
                lifetime: Duration::from_secs(u64::from(r.session_lifetime_s)),
                established_at: now,
            }),
            Message::Error(e) => {
                let retry_after = Duration::from_millis(u64::from(e.retry_after_ms));
                Err(match e.code {
                    ErrorCode::AuthFailed => LoginFailure::AuthFailed,
                    ErrorCode::RateLimited => LoginFailure::RateLimited { retry_after },
                    ErrorCode::Unavailable => LoginFailure::Unavailable { retry_after },
                    other => LoginFailure::Refused(other),
                })
            }
            _ => return Err(DropReason::Unexpected),
        };
        if let Some(rtt) = rtt {
            self.rtt.on_sample(rtt);
        }
        self.state = State::Idle;
        self.event = Some(match outcome {
            Ok(session) => LoginEvent::LoggedIn(session),
            Err(failure) => LoginEvent::LoginFailed(failure),
        });
        Ok(())
    }

    fn finish(&mut self, failure: LoginFailure) {
        self.state = State::Idle;
        self.event = Some(LoginEvent::LoginFailed(failure));
    }

    /// Retransmits the request whose deadline passed, or gives the login up.
    pub fn handle_timeout<R: RngCore + CryptoRng>(&mut self, now: Time, rng: &mut R) {
        let cfg = self.config.retransmit;
        let datagram = match &mut self.state {
            State::Idle => return,
            State::Configuring {
                e_n,
                request_key,
                tx,
                ..
            } => match tx.on_timeout(now, &cfg, rng) {
                Expiry::NotDue => return,
                Expiry::Failed => None,
                Expiry::Retransmit => {
                    Some(request_key.seal_to_vec(&self.config_request, tx.txid(), Some(*e_n)))
                }
            },
            State::LoggingIn {
                login_key,
                request,
                tx,
            } => match tx.on_timeout(now, &cfg, rng) {
                Expiry::NotDue => return,
                Expiry::Failed => None,
                Expiry::Retransmit => Some(login_key.seal_to_vec(request, tx.txid(), None)),
            },
        };
        match datagram {
            Some(d) => self.queue(d),
            None => self.finish(LoginFailure::Timeout),
        }
    }

    /// The next datagram to send, written into `buf` (at least
    /// [`ntm_wire::MAX_SIGNALING_LEN`] bytes).
    pub fn poll_transmit(&mut self, _now: Time, buf: &mut [u8]) -> Option<Transmit> {
        self.outbox.poll_transmit(buf)
    }

    pub fn poll_event(&mut self) -> Option<LoginEvent> {
        self.event.take()
    }

    /// The retransmission deadline of the request in flight.
    pub fn poll_timeout(&self) -> Option<(Time, &'static str)> {
        match &self.state {
            State::Idle => None,
            State::Configuring { tx, .. } => Some((tx.deadline(), "CONFIG_REQUEST retransmission")),
            State::LoggingIn { tx, .. } => Some((tx.deadline(), "LOGIN_REQUEST retransmission")),
        }
    }

    fn queue(&mut self, datagram: Result<Vec<u8>, crate::signaling::SealError>) {
        match datagram {
            Ok(d) => {
                self.outbox.push(self.config.local, self.config.as_addr, d);
            }
            Err(_) => self.seal_failures += 1,
        }
    }
}

fn addrs(list: &AddrList) -> Vec<SocketAddr> {
    list.as_slice().iter().map(|a| a.socket_addr()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::as_server::tests::{as_addr, client, config, from_as, from_client, node_addr, rng};
    use crate::as_server::AccountServer;
    use crate::signaling::unsealed_error;

    fn server(iterations: u32) -> AccountServer {
        AccountServer::new(config(iterations)).unwrap()
    }

    #[test]
    fn the_config_request_is_exactly_128_bytes_for_accounts_up_to_51_bytes() {
        let s = server(10_000);
        for (len, expected) in [(1, 128), (51, 128), (52, 129), (64, 141)] {
            let name = "a".repeat(len);
            let mut c = client(&s, &name);
            c.login(Time::ZERO, &mut rng(1));
            assert_eq!(
                from_client(&mut c)[0].len(),
                expected,
                "account of {len} bytes"
            );
        }
    }

    #[test]
    fn a_node_refuses_fewer_than_ten_thousand_iterations_and_sends_no_proof() {
        for (iterations, refused) in [(9_999, true), (10_000, false)] {
            let mut s = server(iterations);
            let (mut r, mut cr) = (rng(1), rng(2));
            let mut c = client(&s, "alice");
            c.login(Time::ZERO, &mut cr);
            for mut d in from_client(&mut c) {
                s.handle_datagram(Time::ZERO, as_addr(), node_addr(), &mut d, &mut r);
            }
            for (_, mut d) in from_as(&mut s) {
                c.handle_datagram(Time::ZERO, node_addr(), as_addr(), &mut d, &mut cr);
            }
            let sent = from_client(&mut c);
            if refused {
                assert_eq!(
                    c.poll_event(),
                    Some(LoginEvent::LoginFailed(
                        LoginFailure::UnacceptableIterations { iterations }
                    ))
                );
                assert!(sent.is_empty());
                assert_eq!(c.poll_timeout(), None);
            } else {
                assert_eq!(c.poll_event(), None);
                assert_eq!(sent.len(), 1);
                assert_eq!(sent[0].len(), 72, "LOGIN_REQUEST has a fixed size");
            }
        }
    }

    #[test]
    fn an_unanswered_login_gives_up_after_six_transmissions_with_timeout() {
        let s = server(10_000);
        let mut cr = rng(3);
        let mut c = client(&s, "alice");
        c.login(Time::ZERO, &mut cr);
        let mut sent = from_client(&mut c).len();
        let mut last = Time::ZERO;
        while let Some((due, label)) = c.poll_timeout() {
            assert_eq!(label, "CONFIG_REQUEST retransmission");
            c.handle_timeout(due, &mut cr);
            sent += from_client(&mut c).len();
            last = due;
        }
        assert_eq!(sent, 6);
        assert_eq!(
            c.poll_event(),
            Some(LoginEvent::LoginFailed(LoginFailure::Timeout))
        );
        // 11.75 s with each wait drawn within ±10 %.
        assert!(
            last >= Time::from_millis(10_575) && last <= Time::from_millis(12_925),
            "{last}"
        );
        assert!(!c.is_logging_in());
    }

    #[test]
    fn an_unsealed_error_does_not_end_the_login() {
        let mut s = server(10_000);
        let (mut r, mut cr) = (rng(1), rng(2));
        let mut c = client(&s, "alice");
        c.login(Time::ZERO, &mut cr);
        for mut d in from_client(&mut c) {
            s.handle_datagram(Time::ZERO, as_addr(), node_addr(), &mut d, &mut r);
        }
        for (_, mut d) in from_as(&mut s) {
            c.handle_datagram(Time::ZERO, node_addr(), as_addr(), &mut d, &mut cr);
        }
        let request = from_client(&mut c).remove(0);
        let h = *SignalingPacket::parse(&request).unwrap().header();
        let mut forged = unsealed_error(
            Role::B,
            h.envelope.key_id,
            h.envelope.txid,
            0x12,
            ErrorCode::AuthFailed,
        )
        .unwrap();
        c.handle_datagram(Time::ZERO, node_addr(), as_addr(), &mut forged, &mut cr);
        assert_eq!(c.poll_event(), None);
        assert_eq!(c.drops().get("unsealed_hint"), 1);
        assert_eq!(
            c.poll_timeout().map(|(_, l)| l),
            Some("LOGIN_REQUEST retransmission")
        );
    }

    #[test]
    fn a_pinned_as_key_of_low_order_is_refused() {
        let cfg = LoginConfig::new(Account::new("alice").unwrap(), [0; 32], as_addr());
        assert_eq!(
            LoginClient::new(cfg, b"pw").err(),
            Some(LoginConfigError::InvalidAsKey)
        );
    }

    #[test]
    fn an_as_without_the_pinned_key_cannot_even_open_the_config_request() {
        let s = server(10_000);
        let mut impostor = AccountServer::new(crate::as_server::AsConfig {
            static_secret: SecretKey::from_bytes([0x66; 32]),
            ..config(10_000)
        })
        .unwrap();
        let (mut r, mut cr) = (rng(1), rng(2));
        let mut c = client(&s, "alice");
        c.login(Time::ZERO, &mut cr);
        for mut d in from_client(&mut c) {
            impostor.handle_datagram(Time::ZERO, as_addr(), node_addr(), &mut d, &mut r);
        }
        assert!(
            from_as(&mut impostor).is_empty(),
            "it cannot even open the request"
        );
        assert_eq!(impostor.drops().get("authentication_failed"), 1);
    }
}
