//! The login (spec/05-procedures.md §5.2 steps 1-6) run in the simulator: a node behind a home
//! NAT, the AS and a DC on the internet. The DC is a test double that only acknowledges the AS's
//! KEY_DISTRIBUTION and remembers the key it was given.
//!
//! Every failure message starts with the seed and the simulator's capture (`sim.dump()`).

mod common;

use core::time::Duration;
use std::collections::BTreeSet;
use std::net::SocketAddr;

use common::{
    account, as_dc_key, drain, fqdn, lossy, ms, Drive, Net, Outgoing, Sent, AS_PORT, DC_KEY_ID,
    DC_PORT, HOME_LINK, INTERNET_LINK, NODE_PORT, ONE_WAY, PASSWORD,
};
use ntm_state::as_server::{AccountServer, AsConfig, AsEvent, FailureReason};
use ntm_state::login::{LoginClient, LoginConfig, LoginEvent, LoginFailure, Session};
use ntm_state::signaling::SignalingKey;
use ntm_state::sim::{Delivery, HostId, Link, Mapping};
use ntm_state::time::Time;
use ntm_wire::{Ack, Extensions, Fqdn, Message, MessageType, Role, SecretKey};
use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;

/// The minimum a node accepts, to keep PBKDF2 cheap in debug builds.
const ITERATIONS: u32 = 10_000;

/// The DC double: acknowledges KEY_DISTRIBUTION under the AS↔DC key, installing each key once.
struct DcDouble {
    key: SignalingKey,
    /// (new_key_id, key, subject), in the order installed.
    installed: Vec<(u32, SecretKey, Fqdn)>,
    seen_txids: BTreeSet<u32>,
    outbox: Vec<Outgoing>,
}

impl DcDouble {
    fn new() -> Self {
        DcDouble {
            key: SignalingKey::new(&as_dc_key(), DC_KEY_ID, Role::B),
            installed: Vec::new(),
            seen_txids: BTreeSet::new(),
            outbox: Vec::new(),
        }
    }

    fn handle(&mut self, remote: SocketAddr, buf: &mut [u8]) {
        let Ok((h, Message::KeyDistribution(kd))) = self.key.open(buf) else {
            return;
        };
        if self.seen_txids.insert(h.envelope.txid) {
            self.installed.push((kd.new_key_id, kd.key, kd.subject));
        }
        let ack: Message = Ack {
            acked_type: MessageType::KeyDistribution.to_u8(),
            extensions: Extensions::none(),
        }
        .into();
        let datagram = self
            .key
            .seal_to_vec(&ack, h.envelope.txid, None)
            .expect("seal ACK");
        self.outbox.push(Outgoing {
            src: None,
            dst: remote,
            datagram,
        });
    }
}

struct World {
    net: Net,
    node_host: HostId,
    as_host: HostId,
    dc_host: HostId,
    node_addr: SocketAddr,
    as_addr: SocketAddr,
    dc_addr: SocketAddr,
    node: LoginClient,
    server: AccountServer,
    dc: DcDouble,
    node_rng: ChaCha8Rng,
    as_rng: ChaCha8Rng,
    node_events: Vec<(Time, LoginEvent)>,
    as_events: Vec<AsEvent>,
    /// Sequence reservations the AS announced: (datagrams sent before it, new mark).
    reservations: Vec<(usize, u64)>,
    /// Deliveries for which this returns true are dropped before the machine sees them.
    drop_delivery: Box<dyn FnMut(&Delivery) -> bool>,
    /// Every datagram delivered to the AS, as it arrived.
    to_as: Vec<Delivery>,
}

struct Setup {
    seed: u64,
    /// Every link's properties (host interfaces and the NAT's outside link).
    link: Option<Link>,
    account: &'static str,
    password: &'static [u8],
}

impl Setup {
    fn new(seed: u64) -> Self {
        Setup {
            seed,
            link: None,
            account: "alice@dc1.example",
            password: PASSWORD,
        }
    }
}

/// One account, alice, whose node is alice.dc1.example.
fn as_config(dc_addr: SocketAddr) -> AsConfig {
    let alice = (account("alice@dc1.example"), fqdn("alice.dc1.example"));
    common::as_config(&[dc_addr], [alice], ITERATIONS)
}

impl World {
    /// The node behind an endpoint-independent, port-restricted home NAT; AS and DC on the
    /// internet. Without `setup.link`: node link 5 ms, NAT link 5 ms, AS and DC links 10 ms, so
    /// that node↔AS and AS↔DC are each one 20 ms one-way trip.
    fn new(setup: &Setup) -> World {
        let mut net = Net::new(setup.seed, setup.link);
        let internet = net.sim.internet();
        let (_, home) = net.nat("home", internet, Mapping::EndpointIndependent);
        let node_host = net.host("node", home, HOME_LINK);
        let as_host = net.host("as", internet, INTERNET_LINK);
        let dc_host = net.host("dc", internet, INTERNET_LINK);
        let node_addr = net.v4(node_host, NODE_PORT);
        let as_addr = net.v4(as_host, AS_PORT);
        let dc_addr = net.v4(dc_host, DC_PORT);
        let server = AccountServer::new(as_config(dc_addr)).expect("AS config");
        let node = client(setup.account, setup.password, server.public_key(), as_addr);
        World {
            net,
            node_host,
            as_host,
            dc_host,
            node_addr,
            as_addr,
            dc_addr,
            node,
            server,
            dc: DcDouble::new(),
            node_rng: ChaCha8Rng::seed_from_u64(setup.seed ^ 0x6e6f6465),
            as_rng: ChaCha8Rng::seed_from_u64(setup.seed ^ 0x6173),
            node_events: Vec::new(),
            as_events: Vec::new(),
            reservations: Vec::new(),
            drop_delivery: Box::new(|_| false),
            to_as: Vec::new(),
        }
    }

    fn login(&mut self) {
        let now = self.now();
        self.node.login(now, &mut self.node_rng);
    }

    /// Runs the network and the machines until the node reports an event or `limit` passes.
    fn run_until_node_event(&mut self, limit: Time) -> Option<LoginEvent> {
        let before = self.node_events.len();
        self.run(limit, |w| w.node_events.len() > before);
        self.node_events.get(before).map(|(_, e)| e.clone())
    }
}

impl Drive for World {
    fn net(&self) -> &Net {
        &self.net
    }

    fn net_mut(&mut self) -> &mut Net {
        &mut self.net
    }

    fn describe(&self) -> String {
        format!(
            "node events {:?}\nAS events {:?}\nAS drops {:?}\nnode drops {:?}",
            self.node_events,
            self.as_events,
            self.server.drops(),
            self.node.drops(),
        )
    }

    fn flush(&mut self, now: Time) {
        while let Some(e) = self.node.poll_event() {
            self.node_events.push((now, e));
        }
        let out = drain(|buf| self.node.poll_transmit(now, buf));
        self.send_all(now, "node", self.node_host, self.node_addr, out);
        while let Some(e) = self.server.poll_event() {
            match e {
                AsEvent::SequenceReserved { through, .. } => {
                    self.reservations.push((self.net.sent.len(), through))
                }
                e => self.as_events.push(e),
            }
        }
        let out = drain(|buf| self.server.poll_transmit(now, buf));
        self.send_all(now, "as", self.as_host, self.as_addr, out);
        let out = std::mem::take(&mut self.dc.outbox);
        self.send_all(now, "dc", self.dc_host, self.dc_addr, out);
    }

    fn deliver(&mut self, mut d: Delivery) {
        if (self.drop_delivery)(&d) {
            return;
        }
        if d.host == self.node_host {
            self.node
                .handle_datagram(d.at, d.local, d.remote, &mut d.payload, &mut self.node_rng);
        } else if d.host == self.as_host {
            self.to_as.push(d.clone());
            self.server
                .handle_datagram(d.at, d.local, d.remote, &mut d.payload, &mut self.as_rng);
        } else if d.host == self.dc_host {
            self.dc.handle(d.remote, &mut d.payload);
        }
    }

    fn next_timer(&self) -> Option<Time> {
        [self.node.poll_timeout(), self.server.poll_timeout()]
            .into_iter()
            .flatten()
            .map(|(t, _)| t)
            .min()
    }

    fn handle_timeout(&mut self, now: Time) {
        self.node.handle_timeout(now, &mut self.node_rng);
        self.server.handle_timeout(now, &mut self.as_rng);
    }
}

fn client(
    account_name: &str,
    password: &[u8],
    as_key: [u8; 32],
    as_addr: SocketAddr,
) -> LoginClient {
    LoginClient::new(
        LoginConfig::new(account(account_name), as_key, as_addr),
        password,
    )
    .expect("client")
}

fn logged_in(event: Option<LoginEvent>) -> Option<Session> {
    match event {
        Some(LoginEvent::LoggedIn(s)) => Some(s),
        _ => None,
    }
}

#[test]
fn a_node_behind_a_nat_logs_in_in_six_one_way_trips_and_gets_the_key_its_dc_got() {
    let mut w = World::new(&Setup::new(1));
    w.login();
    let event = w.run_until_node_event(Time::from_secs(30));
    let session = logged_in(event.clone());
    assert!(session.is_some(), "{event:?}\n{}", w.context());
    let session = session.unwrap_or_else(|| unreachable!());
    let at = w.node_events[0].0;
    assert_eq!(
        at,
        Time::ZERO + ONE_WAY * 6,
        "steps 1-6 of 05 §5.2\n{}",
        w.context()
    );
    assert_eq!(session.node_fqdn, fqdn("alice.dc1.example"));
    assert_eq!(session.dc_fqdn, fqdn("dc1.example"));
    assert_eq!(session.dc_addrs, vec![w.dc_addr]);
    assert_eq!(session.keepalive_interval, Duration::from_secs(25));
    assert_eq!(session.lifetime, Duration::from_secs(24 * 3600));
    assert_eq!(
        w.dc.installed,
        vec![(
            session.session_key_id,
            session.node_dc_key.clone(),
            session.node_fqdn.clone()
        )],
        "the DC holds exactly the node's K_nd under its session key ID\n{}",
        w.context()
    );
    assert_eq!(
        w.as_events,
        vec![AsEvent::LoginSucceeded {
            account: account("alice@dc1.example"),
            node_fqdn: fqdn("alice.dc1.example"),
            session_key_id: session.session_key_id,
        }]
    );
    let sizes: Vec<(&str, u8, usize)> = w
        .net
        .sent
        .iter()
        .map(|s| (s.from.as_str(), s.msg_type, s.len))
        .collect();
    assert_eq!(
        sizes,
        vec![
            ("node", 0x10, 128),
            ("as", 0x11, 112),
            ("node", 0x12, 72),
            ("as", 0x20, sizes[3].2),
            ("dc", 0x60, 24 + 1 + 16),
            ("as", 0x13, sizes[5].2),
        ],
        "one transmission of each, CONFIG_REQUEST padded to 128 bytes\n{}",
        w.context()
    );
    assert_eq!(w.server.drops().total(), 0, "{}", w.context());
    assert_eq!(
        w.reservations,
        vec![(3, 1 << 16)],
        "the AS↔DC sequence block is announced before the first KEY_DISTRIBUTION leaves"
    );
}

/// Runs one login of `account_name` with `password` and returns the event and what was sent.
fn failed_login(
    account_name: &'static str,
    password: &'static [u8],
) -> (Option<LoginEvent>, Vec<Sent>, World) {
    let mut w = World::new(&Setup {
        account: account_name,
        password,
        ..Setup::new(2)
    });
    w.login();
    let event = w.run_until_node_event(Time::from_secs(30));
    // Let anything still in flight land.
    w.run(Time::from_secs(31), |_| false);
    let sent = w.net.sent.clone();
    (event, sent, w)
}

#[test]
fn a_wrong_password_is_refused_with_auth_failed() {
    let (event, _, w) = failed_login("alice@dc1.example", b"wrong password");
    assert_eq!(
        event,
        Some(LoginEvent::LoginFailed(LoginFailure::AuthFailed)),
        "{}",
        w.context()
    );
    assert!(w.dc.installed.is_empty(), "no key reaches the DC");
    assert_eq!(
        w.as_events,
        vec![AsEvent::LoginFailed {
            account: account("alice@dc1.example"),
            reason: FailureReason::WrongPassword
        }]
    );
}

#[test]
fn an_unknown_account_is_refused_exactly_like_a_wrong_password() {
    let (wrong, wrong_sent, w1) = failed_login("alice@dc1.example", b"wrong password");
    let (unknown, unknown_sent, w2) = failed_login("zoe@dc1.example", PASSWORD);
    assert_eq!(
        unknown,
        Some(LoginEvent::LoginFailed(LoginFailure::AuthFailed)),
        "{}",
        w2.context()
    );
    assert_eq!(wrong, unknown);
    assert_eq!(
        wrong_sent,
        unknown_sent,
        "same messages, sizes, times and addresses\n{}\n{}",
        w1.context(),
        w2.context()
    );
    let shape: Vec<(u8, usize)> = unknown_sent.iter().map(|s| (s.msg_type, s.len)).collect();
    assert_eq!(
        shape,
        vec![(0x10, 128), (0x11, 112), (0x12, 72), (0x61, 24 + 7 + 16)],
        "{}",
        w2.context()
    );
    assert_eq!(
        w2.as_events,
        vec![AsEvent::LoginFailed {
            account: account("zoe@dc1.example"),
            reason: FailureReason::UnknownAccount
        }],
        "only the operator learns the difference"
    );
}

#[test]
fn an_unknown_account_always_gets_the_same_fake_salt_and_another_account_another() {
    let w = World::new(&Setup::new(3));
    let a = w.server.fake_salt(&account("zoe@dc1.example"));
    let again = AccountServer::new(as_config(w.dc_addr)).expect("config");
    assert_eq!(
        a,
        again.fake_salt(&account("zoe@dc1.example")),
        "stable across restarts"
    );
    assert_ne!(a, w.server.fake_salt(&account("zed@dc1.example")));
}

/// Logs in with retries after Timeout, as a node would; returns the session and the attempts.
fn login_with_retries(w: &mut World, attempts: u32) -> (Option<Session>, u32) {
    for attempt in 1..=attempts {
        w.login();
        let limit = w.now() + Duration::from_secs(60);
        match w.run_until_node_event(limit) {
            Some(LoginEvent::LoggedIn(s)) => return (Some(s), attempt),
            Some(LoginEvent::LoginFailed(LoginFailure::Timeout)) => continue,
            _ => return (None, attempt),
        }
    }
    (None, attempts)
}

/// Every link loses 20%, so node↔AS, which crosses three links (node, NAT, AS), loses 49% each
/// way and a round trip succeeds 26% of the time: six transmissions are not always enough. The
/// node then logs in again (a node keeps trying); what this checks is that retransmission carries
/// most logins through, that every seed ends logged in, and that the DC holds the node's key.
#[test]
fn login_succeeds_with_twenty_percent_loss_on_every_link() {
    let mut first_attempt = 0;
    let mut retransmissions = 0;
    for seed in 100..120 {
        let mut w = World::new(&Setup {
            link: Some(lossy(0.2)),
            ..Setup::new(seed)
        });
        let (session, attempts) = login_with_retries(&mut w, 10);
        assert!(session.is_some(), "{}", w.context());
        let session = session.unwrap_or_else(|| unreachable!());
        if attempts == 1 {
            first_attempt += 1;
        }
        // Let the AS's last retransmissions settle, then check the DC holds the node's key.
        let settle = w.now() + Duration::from_secs(15);
        w.run(settle, |_| false);
        let installed: Vec<_> =
            w.dc.installed
                .iter()
                .filter(|(id, _, _)| *id == session.session_key_id)
                .collect();
        assert_eq!(installed.len(), 1, "{}", w.context());
        assert_eq!(installed[0].1, session.node_dc_key, "{}", w.context());
        let requests = w.sent_by("node", MessageType::ConfigRequest).len()
            + w.sent_by("node", MessageType::LoginRequest).len();
        retransmissions += requests.saturating_sub(2 * attempts as usize);
    }
    eprintln!("{first_attempt}/20 seeds logged in at the first attempt; {retransmissions} node retransmissions");
    assert!(
        retransmissions > 0,
        "20% loss per link must have caused retransmissions"
    );
    // A round trip to the AS succeeds 26% of the time and the AS↔DC one 41%: about two logins
    // in three should get through on their first attempt (13 of these 20 do).
    assert!(
        first_attempt >= 10,
        "only {first_attempt}/20 seeds logged in at the first attempt"
    );
}

#[test]
fn five_failed_logins_lock_the_account_for_a_minute_even_for_the_right_password() {
    let mut w = World::new(&Setup {
        password: b"guess",
        ..Setup::new(4)
    });
    for i in 0..5 {
        w.login();
        let limit = w.now() + Duration::from_secs(30);
        let event = w.run_until_node_event(limit);
        assert_eq!(
            event,
            Some(LoginEvent::LoginFailed(LoginFailure::AuthFailed)),
            "attempt {i}\n{}",
            w.context()
        );
    }
    let fifth_failure = w.node_events[4].0;
    w.node = client(
        "alice@dc1.example",
        PASSWORD,
        w.server.public_key(),
        w.as_addr,
    );
    w.login();
    let limit = w.now() + Duration::from_secs(30);
    let event = w.run_until_node_event(limit);
    let Some(LoginEvent::LoginFailed(LoginFailure::RateLimited { retry_after })) = event else {
        panic!("expected RateLimited, got {event:?}\n{}", w.context());
    };
    let locked_until = fifth_failure + Duration::from_secs(60);
    let answered = w.node_events[5].0;
    assert!(
        answered + retry_after >= locked_until
            && answered + retry_after <= locked_until + ONE_WAY + ms(1),
        "retry_after {retry_after:?} should reach the end of the lockout at {locked_until}\n{}",
        w.context()
    );
    assert!(w.dc.installed.is_empty());
    // After the lockout the right password works again.
    let later = answered + retry_after;
    w.run(later, |_| false);
    w.login();
    let limit = w.now() + Duration::from_secs(30);
    let event = w.run_until_node_event(limit);
    assert!(
        logged_in(event.clone()).is_some(),
        "{event:?}\n{}",
        w.context()
    );
}

#[test]
fn the_lockout_counts_an_unknown_account_like_a_known_one() {
    let mut w = World::new(&Setup {
        account: "zoe@dc1.example",
        ..Setup::new(5)
    });
    let mut outcomes = Vec::new();
    for _ in 0..6 {
        w.login();
        let limit = w.now() + Duration::from_secs(30);
        outcomes.push(w.run_until_node_event(limit));
    }
    assert!(outcomes[..5]
        .iter()
        .all(|e| *e == Some(LoginEvent::LoginFailed(LoginFailure::AuthFailed))));
    assert!(
        matches!(
            outcomes[5],
            Some(LoginEvent::LoginFailed(LoginFailure::RateLimited { .. }))
        ),
        "{:?}\n{}",
        outcomes[5],
        w.context()
    );
}

#[test]
fn a_replayed_login_request_after_success_is_dropped_and_opens_no_second_session() {
    let mut w = World::new(&Setup::new(6));
    w.login();
    let session = logged_in(w.run_until_node_event(Time::from_secs(30)));
    assert!(session.is_some(), "{}", w.context());
    let request = w
        .to_as
        .iter()
        .find(|d| d.payload.first() == Some(&MessageType::LoginRequest.to_u8()))
        .map(|d| d.payload.clone());
    let Some(request) = request else {
        panic!("the AS never got a LOGIN_REQUEST\n{}", w.context());
    };
    let sent_before = w.net.sent.len();
    let now = w.now();
    w.send(
        now,
        "attacker",
        w.node_host,
        w.node_addr,
        w.as_addr,
        request,
    );
    w.run(now + Duration::from_secs(5), |_| false);
    assert_eq!(w.server.drops().get("replayed"), 1, "{}", w.context());
    assert_eq!(
        w.net.sent.len(),
        sent_before + 1,
        "nothing answers the replay\n{}",
        w.context()
    );
    assert_eq!(w.dc.installed.len(), 1);
    assert_eq!(w.as_events.len(), 1, "{:?}", w.as_events);
}

#[test]
fn a_retransmitted_login_request_after_a_lost_response_gets_the_stored_response() {
    let mut w = World::new(&Setup::new(7));
    let mut dropped = false;
    w.drop_delivery = Box::new(move |d: &Delivery| {
        let first_response =
            !dropped && d.payload.first() == Some(&MessageType::LoginResponse.to_u8());
        dropped |= first_response;
        first_response
    });
    w.login();
    let event = w.run_until_node_event(Time::from_secs(30));
    let session = logged_in(event.clone());
    assert!(session.is_some(), "{event:?}\n{}", w.context());
    let session = session.unwrap_or_else(|| unreachable!());
    assert_eq!(
        w.sent_by("node", MessageType::LoginRequest).len(),
        2,
        "{}",
        w.context()
    );
    assert_eq!(
        w.sent_by("as", MessageType::LoginResponse).len(),
        2,
        "{}",
        w.context()
    );
    assert_eq!(
        w.sent_by("as", MessageType::KeyDistribution).len(),
        1,
        "{}",
        w.context()
    );
    assert_eq!(
        w.dc.installed,
        vec![(
            session.session_key_id,
            session.node_dc_key.clone(),
            session.node_fqdn.clone()
        )],
        "one session, the one the node holds\n{}",
        w.context()
    );
    assert_eq!(w.as_events.len(), 1, "{:?}", w.as_events);
}

#[test]
fn a_login_request_ten_minutes_after_success_gets_an_unsealed_unknown_key() {
    let mut w = World::new(&Setup::new(8));
    w.login();
    assert!(
        logged_in(w.run_until_node_event(Time::from_secs(30))).is_some(),
        "{}",
        w.context()
    );
    let request = w
        .to_as
        .iter()
        .find(|d| d.payload.first() == Some(&MessageType::LoginRequest.to_u8()))
        .map(|d| d.payload.clone())
        .unwrap_or_default();
    let later = Time::from_secs(601);
    w.run(later, |_| false);
    assert_eq!(
        w.server.logins_held(),
        0,
        "K_login is forgotten after 10 min"
    );
    let sent_before = w.net.sent.len();
    w.send(
        later,
        "attacker",
        w.node_host,
        w.node_addr,
        w.as_addr,
        request,
    );
    w.run(later + Duration::from_secs(1), |_| false);
    let answers: Vec<&Sent> = w.net.sent[sent_before..]
        .iter()
        .filter(|s| s.from == "as")
        .collect();
    assert_eq!(answers.len(), 1, "{}", w.context());
    assert_eq!(
        (answers[0].msg_type, answers[0].len),
        (0x61, 31),
        "{}",
        w.context()
    );
}

#[test]
fn a_dc_that_never_answers_makes_the_login_fail_as_unavailable() {
    let mut w = World::new(&Setup::new(9));
    let dc_host = w.dc_host;
    w.drop_delivery = Box::new(move |d: &Delivery| d.host == dc_host);
    w.login();
    let event = w.run_until_node_event(Time::from_secs(60));
    assert!(
        matches!(
            event,
            Some(LoginEvent::LoginFailed(
                LoginFailure::Unavailable { .. } | LoginFailure::Timeout
            ))
        ),
        "{event:?}\n{}",
        w.context()
    );
    w.run(Time::from_secs(60), |_| false);
    assert_eq!(
        w.sent_by("as", MessageType::KeyDistribution).len(),
        6,
        "{}",
        w.context()
    );
    assert!(w.as_events.contains(&AsEvent::LoginFailed {
        account: account("alice@dc1.example"),
        reason: FailureReason::DcUnavailable
    }));
}
