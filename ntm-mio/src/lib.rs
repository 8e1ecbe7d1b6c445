//! The reference runtime: a mio event loop that drives `ntm-state` machines over real UDP
//! sockets, with their timers from `poll_timeout`. No protocol logic lives here: the loop reads
//! datagrams into the machines, sends what they hand out, and calls them back when their
//! deadline passes.
//!
//! What exists so far is the UDP core: [`Runtime`] drives any number of machines in one thread
//! (each bound to its own sockets), which is what an in-process demo and the loopback tests need.
//! TCP for the NS channel, TUN, netlink address changes, batching (recvmmsg/sendmmsg) and signal
//! handling arrive with the daemons.
//!
//! ```no_run
//! # use ntm_mio::{Runtime, Machine};
//! # fn demo(dc: ntm_state::dc::DirectionCoordinator) -> std::io::Result<()> {
//! let mut rt = Runtime::new()?;
//! let dc = rt.add(dc, &["127.0.0.1:4281".parse().unwrap()])?;
//! rt.run_for(std::time::Duration::from_millis(100))?;
//! # Ok(()) }
//! ```

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};
use ntm_state::signaling::Transmit;
use ntm_state::time::Time;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

pub use ntm_state as state;

/// The largest datagram read: a DATA packet at the virtual MTU with its overhead fits.
const RECV_BUF: usize = 2048;
/// Datagrams read from one socket per loop turn, so that one busy socket cannot starve others.
const READS_PER_TURN: usize = 64;
/// Datagrams a machine may hand out per loop turn before the loop looks at input again.
const SENDS_PER_TURN: usize = 1024;

/// What the runtime needs of a machine: the contract every `ntm-state` entity follows.
pub trait Machine: std::any::Any {
    /// A datagram arrived at `local` from `remote`; `buf` may be opened in place.
    fn on_datagram(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        buf: &mut [u8],
        rng: &mut ChaCha20Rng,
    );
    fn on_timeout(&mut self, now: Time, rng: &mut ChaCha20Rng);
    fn next_transmit(&mut self, now: Time, buf: &mut [u8]) -> Option<Transmit>;
    fn next_deadline(&self) -> Option<Time>;
}

macro_rules! server_machine {
    ($t:ty) => {
        impl Machine for $t {
            fn on_datagram(
                &mut self,
                now: Time,
                local: SocketAddr,
                remote: SocketAddr,
                buf: &mut [u8],
                rng: &mut ChaCha20Rng,
            ) {
                self.handle_datagram(now, local, remote, buf, rng);
            }
            fn on_timeout(&mut self, now: Time, rng: &mut ChaCha20Rng) {
                self.handle_timeout(now, rng);
            }
            fn next_transmit(&mut self, now: Time, buf: &mut [u8]) -> Option<Transmit> {
                self.poll_transmit(now, buf)
            }
            fn next_deadline(&self) -> Option<Time> {
                self.poll_timeout().map(|(t, _)| t)
            }
        }
    };
}

server_machine!(ntm_state::as_server::AccountServer);
server_machine!(ntm_state::dc::DirectionCoordinator);
server_machine!(ntm_state::rs::RelayServer);

/// A node with the virtual IP packets it received, for an application in the same process.
pub struct NodeMachine {
    pub node: ntm_state::node::Node,
    /// Inner packets delivered to this node, oldest first (bounded by `max_received`).
    pub received: std::collections::VecDeque<Vec<u8>>,
    pub max_received: usize,
    /// DATA sealed by [`NodeMachine::send_packet`], waiting for the loop to send it.
    outgoing: std::collections::VecDeque<(Option<SocketAddr>, SocketAddr, Vec<u8>)>,
}

impl NodeMachine {
    pub fn new(node: ntm_state::node::Node) -> Self {
        NodeMachine {
            node,
            received: std::collections::VecDeque::new(),
            max_received: 4096,
            outgoing: std::collections::VecDeque::new(),
        }
    }

    /// Seals a virtual IP packet for its tunnel; the loop sends it. Without a tunnel the node
    /// queues it and builds one (the error says so).
    pub fn send_packet(
        &mut self,
        now: Time,
        packet: &[u8],
    ) -> Result<(), ntm_state::node::SendError> {
        let mut buf = vec![0u8; packet.len() + ntm_state::wire::DATA_OVERHEAD];
        let t = self.node.encapsulate(now, packet, &mut buf)?;
        buf.truncate(t.len);
        if self.outgoing.len() < self.max_received {
            self.outgoing.push_back((t.src, t.dst, buf));
        }
        Ok(())
    }
}

impl Machine for NodeMachine {
    fn on_datagram(
        &mut self,
        now: Time,
        local: SocketAddr,
        remote: SocketAddr,
        buf: &mut [u8],
        rng: &mut ChaCha20Rng,
    ) {
        if let ntm_state::node::Received::Packet(range) =
            self.node.handle_datagram(now, local, remote, buf, rng)
        {
            if let Some(p) = buf.get(range) {
                if self.received.len() >= self.max_received {
                    self.received.pop_front();
                }
                self.received.push_back(p.to_vec());
            }
        }
    }
    fn on_timeout(&mut self, now: Time, rng: &mut ChaCha20Rng) {
        self.node.handle_timeout(now, rng);
    }
    fn next_transmit(&mut self, now: Time, buf: &mut [u8]) -> Option<Transmit> {
        while let Some((src, dst, d)) = self.outgoing.pop_front() {
            if let Some(out) = buf.get_mut(..d.len()) {
                out.copy_from_slice(&d);
                return Some(Transmit {
                    src,
                    dst,
                    len: d.len(),
                });
            }
        }
        self.node.poll_transmit(now, buf)
    }
    fn next_deadline(&self) -> Option<Time> {
        self.node.poll_timeout().map(|(t, _)| t)
    }
}

/// A machine's handle in a [`Runtime`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MachineId(usize);

struct Slot {
    machine: Box<dyn Machine>,
    /// Its sockets: bound address and socket.
    sockets: Vec<(SocketAddr, UdpSocket)>,
    rng: ChaCha20Rng,
}

/// A single-threaded mio loop driving machines over UDP. Time is the wall clock since the
/// runtime was made, handed to the machines as [`Time`].
pub struct Runtime {
    poll: Poll,
    events: Events,
    start: Instant,
    slots: Vec<Slot>,
    /// Token → (slot, socket index).
    tokens: Vec<(usize, usize)>,
    /// Datagrams that could not be sent (no socket for the source, or the kernel refused).
    pub send_failures: u64,
}

impl Runtime {
    pub fn new() -> io::Result<Self> {
        Ok(Runtime {
            poll: Poll::new()?,
            events: Events::with_capacity(256),
            start: Instant::now(),
            slots: Vec::new(),
            tokens: Vec::new(),
            send_failures: 0,
        })
    }

    /// The time the machines see now.
    pub fn now(&self) -> Time {
        let nanos = self.start.elapsed().as_nanos();
        Time::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// Binds `addrs` (port 0 picks one) and adds the machine. Fails if an address is in use.
    pub fn add(
        &mut self,
        machine: impl Machine + 'static,
        addrs: &[SocketAddr],
    ) -> io::Result<MachineId> {
        self.add_with(addrs, |_| machine)
    }

    /// Binds `addrs` (port 0 picks one), then makes the machine knowing the bound addresses
    /// (a node's configuration names its sockets).
    pub fn add_with<M: Machine + 'static>(
        &mut self,
        addrs: &[SocketAddr],
        make: impl FnOnce(&[SocketAddr]) -> M,
    ) -> io::Result<MachineId> {
        let idx = self.slots.len();
        let mut sockets = Vec::new();
        for a in addrs {
            let mut s = UdpSocket::bind(*a)
                .map_err(|e| io::Error::new(e.kind(), format!("binding {a}: {e}")))?;
            let token = Token(self.tokens.len());
            self.poll
                .registry()
                .register(&mut s, token, Interest::READABLE)?;
            self.tokens.push((idx, sockets.len()));
            sockets.push((s.local_addr()?, s));
        }
        let bound: Vec<SocketAddr> = sockets.iter().map(|(a, _)| *a).collect();
        let machine = make(&bound);
        self.slots.push(Slot {
            machine: Box::new(machine),
            sockets,
            rng: ChaCha20Rng::from_entropy(),
        });
        Ok(MachineId(idx))
    }

    /// The addresses a machine's sockets are bound to.
    pub fn addrs(&self, id: MachineId) -> Vec<SocketAddr> {
        self.slots
            .get(id.0)
            .map(|s| s.sockets.iter().map(|(a, _)| *a).collect())
            .unwrap_or_default()
    }

    /// Runs `f` on a machine (an application's commands), then sends what it handed out.
    pub fn with<M: Machine + 'static, T>(
        &mut self,
        id: MachineId,
        f: impl FnOnce(&mut M, Time, &mut ChaCha20Rng) -> T,
    ) -> Option<T> {
        let now = self.now();
        let slot = self.slots.get_mut(id.0)?;
        let any: &mut dyn std::any::Any = slot.machine.as_mut();
        let m = any.downcast_mut::<M>()?;
        let out = f(m, now, &mut slot.rng);
        self.flush(id.0, now);
        Some(out)
    }

    /// Runs the loop for `d`.
    pub fn run_for(&mut self, d: Duration) -> io::Result<()> {
        self.run_until(Instant::now() + d, |_| false).map(|_| ())
    }

    /// Runs until `stop` holds (checked after every turn) or `deadline`; true if `stop` held.
    pub fn run_until(
        &mut self,
        deadline: Instant,
        mut stop: impl FnMut(&mut Self) -> bool,
    ) -> io::Result<bool> {
        let mut buf = vec![0u8; RECV_BUF];
        loop {
            let now = self.now();
            for i in 0..self.slots.len() {
                self.fire_timer(i, now);
                self.flush(i, now);
            }
            if stop(self) {
                return Ok(true);
            }
            let wall = Instant::now();
            if wall >= deadline {
                return Ok(false);
            }
            // Sleep until the earliest machine deadline, the caller's deadline, or input.
            let now = self.now();
            let next = self
                .slots
                .iter()
                .filter_map(|s| s.machine.next_deadline())
                .min()
                .map(|t| Duration::from_nanos(t.as_nanos().saturating_sub(now.as_nanos())));
            let limit = deadline - wall;
            let timeout = next.map_or(limit, |n| n.min(limit));
            self.poll.poll(&mut self.events, Some(timeout))?;
            let ready: Vec<Token> = self.events.iter().map(|e| e.token()).collect();
            for token in ready {
                let Some(&(i, j)) = self.tokens.get(token.0) else {
                    continue;
                };
                for _ in 0..READS_PER_TURN {
                    let now = self.now();
                    let Some(slot) = self.slots.get_mut(i) else {
                        break;
                    };
                    let Some((local, sock)) = slot.sockets.get(j) else {
                        break;
                    };
                    let local = *local;
                    match sock.recv_from(&mut buf) {
                        Ok((n, remote)) => {
                            if let Some(d) = buf.get_mut(..n) {
                                slot.machine
                                    .on_datagram(now, local, remote, d, &mut slot.rng);
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(_) => break, // ICMP errors reported on the socket: nothing to do
                    }
                }
                let now = self.now();
                self.flush(i, now);
            }
        }
    }

    fn fire_timer(&mut self, i: usize, now: Time) {
        if let Some(slot) = self.slots.get_mut(i) {
            if slot.machine.next_deadline().is_some_and(|t| t <= now) {
                slot.machine.on_timeout(now, &mut slot.rng);
            }
        }
    }

    /// Sends what machine `i` hands out, from the socket bound to the source it names (or its
    /// first socket of the destination's family).
    fn flush(&mut self, i: usize, now: Time) {
        let Some(slot) = self.slots.get_mut(i) else {
            return;
        };
        let mut buf = [0u8; RECV_BUF];
        for _ in 0..SENDS_PER_TURN {
            let Some(t) = slot.machine.next_transmit(now, &mut buf) else {
                break;
            };
            let sock = slot
                .sockets
                .iter()
                .find(|(a, _)| Some(*a) == t.src)
                .or_else(|| {
                    slot.sockets
                        .iter()
                        .find(|(a, _)| t.src.is_none() && a.is_ipv6() == t.dst.is_ipv6())
                });
            let sent = match (sock, buf.get(..t.len)) {
                (Some((_, s)), Some(d)) => s.send_to(d, t.dst).is_ok(),
                _ => false,
            };
            if !sent {
                self.send_failures += 1;
            }
        }
    }
}
