//! The data-plane engine: one thread joining the TUN device, the UDP socket
//! and the WireGuard core ([`node::Node`]).
//!
//! Each turn waits (in `epoll_wait`) for either descriptor or the next timer,
//! then drains the network into the TUN and the TUN into the network, each up
//! to a budget so one direction cannot starve the other, and finally runs the
//! timers. Outputs collect in batches that are flushed when full and at the end
//! of each turn: one TUN read of a 64 KiB super-packet becomes ~45 encrypted
//! datagrams leaving in one GSO send, and a GRO'd burst of datagrams becomes
//! one coalesced TUN write.
//!
//! Other threads reach a running engine through an [`EngineHandle`]: commands
//! (change the peers, report the status) go into a channel that the engine
//! drains at the start of every turn, and an eventfd in the engine's epoll
//! set wakes it for them. The engine's state stays on its own thread.

mod answer_wait;
pub mod node;

use std::collections::BTreeSet;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use rustix::buffer::spare_capacity;
use rustix::event::epoll::{self, EventData, EventFlags};
use rustix::event::{EventfdFlags, Timespec};
use rustix::time::{
    timerfd_create, timerfd_settime, Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags,
};

use self::answer_wait::AnswerWait;
use crate::keys::{PrivateKey, PublicKey};
use crate::peers::{PeerConfig, PeerError};
use crate::tun::{self, Tun, TunBatch, TunError};
use crate::udp::{
    self, PeerSocketChanges, PeerSockets, UdpError, UdpRecvBatch, UdpSendBatch, UdpSocket,
};
pub use node::{Counters, Endpoint, Event, Node, PeerStatus, RelayId, Sink};

/// See [`EngineConfig::answer_poll`]: off by default. At 1,000 requests a
/// second a 150 µs window cost both ends 2.6 times their CPU and gained
/// nothing; at 100 a second it gained 35 µs a round trip for a third more
/// CPU (docs/benchmarks.md, "Answer polling").
pub const DEFAULT_ANSWER_POLL: Duration = Duration::ZERO;

/// Batches read from each side per turn before serving the other.
const BUDGET: usize = 8;

/// What the engine's epoll set reports for each of its descriptors; peer
/// sockets count up from `SOURCE_PEER_SOCKETS` by slot.
const SOURCE_TUN: u64 = 0;
const SOURCE_UDP: u64 = 1;
const SOURCE_WAKER: u64 = 2;
const SOURCE_TIMER: u64 = 3;
const SOURCE_RELAYED: u64 = 4;
const SOURCE_PEER_SOCKETS: u64 = 16;

/// Events taken from one `epoll_wait`; more stay queued for the next.
const MAX_EVENTS: usize = 64;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub private_key: PrivateKey,
    /// The TUN device to create.
    pub tun_name: String,
    pub mtu: u16,
    /// Use TUN segmentation offloads; falls back to plain packets if the
    /// kernel refuses.
    pub offload: bool,
    /// The node's addresses on the TUN, with their prefix.
    pub addresses: Vec<IpNet>,
    /// Routes into the TUN installed once at start (a mesh's whole range).
    /// Peers' allowed IPs inside them get no route of their own.
    pub routes: Vec<IpNet>,
    /// UDP port for WireGuard; 0 picks one.
    pub listen_port: u16,
    /// `SO_MARK` of the tunnel's datagrams; 0: none.
    pub fwmark: u32,
    /// After sending a lone packet from the TUN, how long to poll for its
    /// answer before sleeping (see `answer_wait`); zero: never.
    /// [`DEFAULT_ANSWER_POLL`] by default.
    pub answer_poll: Duration,
    /// Route each peer's allowed IPs into the TUN. Off when another program
    /// manages the routes (wg-quick does, for a UAPI interface).
    pub route_allowed_ips: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Tun(#[from] TunError),
    #[error(transparent)]
    Udp(#[from] UdpError),
    #[error(transparent)]
    Peers(#[from] PeerError),
    #[error("waiting for packets: {0}")]
    Poll(#[source] io::Error),
    #[error("creating the engine's wake-up eventfd: {0}")]
    Waker(#[source] io::Error),
    #[error("setting the engine's timer: {0}")]
    Timer(#[source] io::Error),
}

/// Counters of the engine: the core's, plus I/O failures.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EngineCounters {
    pub node: Counters,
    /// Datagrams the kernel refused, or the send buffer had no room for.
    pub udp_send_dropped: u64,
    /// TUN writes the kernel refused (each may be a coalesced batch).
    pub tun_write_errors: u64,
    /// TUN reads that could not be split into packets.
    pub tun_read_errors: u64,
    pub udp_recv_errors: u64,
    /// Datagrams for a relay when the engine has no relay outlet.
    pub relay_send_dropped: u64,
    /// Datagrams that are not WireGuard when the engine has no outlet for
    /// them, and [`EngineHandle::send_udp`] datagrams the batch had no room for.
    pub other_dropped: u64,
}

/// Where datagrams for relayed peers go (see [`Engine::set_relay_outlet`]):
/// called on the engine's thread for each, so it must not block.
pub type RelayOutlet = Box<dyn FnMut(RelayId, &PublicKey, &[u8]) + Send>;

/// Where datagrams that are not WireGuard go (see [`Engine::set_other_outlet`]):
/// called on the engine's thread with the sender's address, so it must not block.
pub type OtherOutlet = Box<dyn FnMut(SocketAddr, &[u8]) + Send>;

/// Where the node's [`Event`]s go (see [`Engine::set_event_handler`]):
/// called on the engine's thread, so it must not block.
pub type EventHandler = Box<dyn FnMut(Event) + Send>;

/// What `wg show` needs to know about a running engine.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineStatus {
    pub tun_name: String,
    pub public_key: PublicKey,
    pub listen_port: u16,
    /// Sorted by public key.
    pub peers: Vec<PeerStatus>,
    pub counters: EngineCounters,
}

/// How long the blocking [`EngineHandle`] calls wait for the engine to
/// carry out a command. Replacing the peers runs `ip route` once per changed
/// prefix, so this is generous.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a command sent through an [`EngineHandle`] did not complete.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the engine has stopped")]
    Stopped,
    #[error("the engine did not answer within {} s", .0.as_secs())]
    Timeout(Duration),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Where the engine sends a command's answer: called on the engine's
/// thread once the command is carried out, so it must not block.
pub type Reply<T> = Box<dyn FnOnce(T) + Send>;

enum Command {
    SetPeers {
        peers: Vec<PeerConfig>,
        reply: Reply<Result<(), EngineError>>,
    },
    Status {
        reply: Reply<EngineStatus>,
    },
    SetPrivateKey {
        key: PrivateKey,
        reply: Reply<()>,
    },
    SetListenPort {
        port: u16,
        reply: Reply<Result<u16, EngineError>>,
    },
    SetFwmark {
        mark: u32,
        reply: Reply<Result<(), EngineError>>,
    },
    SetEndpoint {
        peer: PublicKey,
        endpoint: Endpoint,
        reply: Reply<bool>,
    },
    SendUdp {
        to: SocketAddr,
        datagram: Vec<u8>,
    },
    SetSourcePort {
        endpoint: SocketAddr,
        port: Option<u16>,
    },
}

/// A way for other threads to talk to a running [`Engine`]: each command
/// is queued, wakes the engine, and is carried out in its next turn.
///
/// The `*_then` calls return at once and hand the answer to a callback on
/// the engine's thread (an async caller completes a future from it); the
/// others wait for the answer, up to a timeout. Once the engine is dropped
/// every call fails with [`ControlError::Stopped`].
#[derive(Debug, Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
    waker: Arc<OwnedFd>,
    relayed: mpsc::Sender<(RelayId, PublicKey, Vec<u8>)>,
    relayed_waker: Arc<OwnedFd>,
}

impl EngineHandle {
    /// Makes `peers` the engine's peer set, as [`Engine::set_peers`] does:
    /// sessions of peers whose configuration is unchanged continue.
    pub fn set_peers_then(
        &self,
        peers: Vec<PeerConfig>,
        reply: impl FnOnce(Result<(), EngineError>) + Send + 'static,
    ) -> Result<(), ControlError> {
        self.send(Command::SetPeers {
            peers,
            reply: Box::new(reply),
        })
    }

    pub fn status_then(
        &self,
        reply: impl FnOnce(EngineStatus) + Send + 'static,
    ) -> Result<(), ControlError> {
        self.send(Command::Status {
            reply: Box::new(reply),
        })
    }

    /// Replaces the engine's key pair, as [`Engine::set_private_key`] does.
    pub fn set_private_key_then(
        &self,
        key: PrivateKey,
        reply: impl FnOnce(()) + Send + 'static,
    ) -> Result<(), ControlError> {
        self.send(Command::SetPrivateKey {
            key,
            reply: Box::new(reply),
        })
    }

    /// Moves the engine to another UDP port (0: any), as
    /// [`Engine::set_listen_port`] does; answers the port bound.
    pub fn set_listen_port_then(
        &self,
        port: u16,
        reply: impl FnOnce(Result<u16, EngineError>) + Send + 'static,
    ) -> Result<(), ControlError> {
        self.send(Command::SetListenPort {
            port,
            reply: Box::new(reply),
        })
    }

    pub fn set_fwmark_then(
        &self,
        mark: u32,
        reply: impl FnOnce(Result<(), EngineError>) + Send + 'static,
    ) -> Result<(), ControlError> {
        self.send(Command::SetFwmark {
            mark,
            reply: Box::new(reply),
        })
    }

    /// Sends the peer's datagrams to `endpoint` from now on, as
    /// [`Node::set_endpoint`] does; answers whether the peer exists.
    pub fn set_endpoint_then(
        &self,
        peer: PublicKey,
        endpoint: Endpoint,
        reply: impl FnOnce(bool) + Send + 'static,
    ) -> Result<(), ControlError> {
        self.send(Command::SetEndpoint {
            peer,
            endpoint,
            reply: Box::new(reply),
        })
    }

    /// Sends `datagram` to `to` from the engine's UDP socket, the one its
    /// WireGuard datagrams leave by (NAT traversal's probes must share its
    /// NAT mapping). Returns without waiting.
    pub fn send_udp(&self, to: SocketAddr, datagram: Vec<u8>) -> Result<(), ControlError> {
        self.send(Command::SendUdp { to, datagram })
    }

    /// Datagrams to `endpoint` leave from local port `port` (`None`: the
    /// main socket's), on a socket connected to it that also receives what
    /// comes from there. The port is one that NAT traversal's birthday
    /// technique punched a mapping from, on a socket it opened with
    /// `SO_REUSEPORT` (see `udp::PeerSockets::set_source_port`). Returns
    /// without waiting; set it before pointing a peer at the endpoint.
    pub fn set_source_port(
        &self,
        endpoint: SocketAddr,
        port: Option<u16>,
    ) -> Result<(), ControlError> {
        self.send(Command::SetSourcePort { endpoint, port })
    }

    /// Hands the engine a datagram that relay `relay` carried from `peer`.
    /// It is queued without waiting (and without reading the clock on the
    /// engine's side, unlike a command).
    pub fn relayed(
        &self,
        relay: RelayId,
        peer: PublicKey,
        datagram: Vec<u8>,
    ) -> Result<(), ControlError> {
        self.relayed
            .send((relay, peer, datagram))
            .map_err(|_| ControlError::Stopped)?;
        let _ = rustix::io::write(&*self.relayed_waker, &1u64.to_ne_bytes());
        Ok(())
    }

    pub fn set_peers(&self, peers: Vec<PeerConfig>) -> Result<(), ControlError> {
        Ok(Self::wait(|r| self.set_peers_then(peers, r))??)
    }

    pub fn set_endpoint(&self, peer: PublicKey, endpoint: Endpoint) -> Result<bool, ControlError> {
        Self::wait(|r| self.set_endpoint_then(peer, endpoint, r))
    }

    pub fn status(&self) -> Result<EngineStatus, ControlError> {
        Self::wait(|r| self.status_then(r))
    }

    pub fn set_private_key(&self, key: PrivateKey) -> Result<(), ControlError> {
        Self::wait(|r| self.set_private_key_then(key, r))
    }

    pub fn set_listen_port(&self, port: u16) -> Result<u16, ControlError> {
        Ok(Self::wait(|r| self.set_listen_port_then(port, r))??)
    }

    pub fn set_fwmark(&self, mark: u32) -> Result<(), ControlError> {
        Ok(Self::wait(|r| self.set_fwmark_then(mark, r))??)
    }

    fn send(&self, command: Command) -> Result<(), ControlError> {
        self.commands
            .send(command)
            .map_err(|_| ControlError::Stopped)?;
        // The counter only fails to grow when it is about to overflow, and
        // then the engine has a wake-up pending anyway.
        let _ = rustix::io::write(&*self.waker, &1u64.to_ne_bytes());
        Ok(())
    }

    /// Sends a command with `send` and waits for its answer.
    fn wait<T: Send + 'static>(
        send: impl FnOnce(Box<dyn FnOnce(T) + Send>) -> Result<(), ControlError>,
    ) -> Result<T, ControlError> {
        let (tx, answer) = mpsc::channel();
        send(Box::new(move |v| {
            let _ = tx.send(v);
        }))?;
        answer.recv_timeout(COMMAND_TIMEOUT).map_err(|e| match e {
            mpsc::RecvTimeoutError::Timeout => ControlError::Timeout(COMMAND_TIMEOUT),
            // The engine dropped the command unanswered: it is gone.
            mpsc::RecvTimeoutError::Disconnected => ControlError::Stopped,
        })
    }
}

/// A wait that only looks; also a timer interval of none.
const ZERO: Timespec = Timespec {
    tv_sec: 0,
    tv_nsec: 0,
};

pub struct Engine {
    node: Node,
    tun: Tun,
    udp: UdpSocket,
    /// Sockets connected to peers' endpoints, beside `udp` (see [`udp`]).
    peer_sockets: PeerSockets,
    /// The [`Node::endpoint_generation`] that `peer_sockets` matches.
    peer_sockets_generation: Option<u64>,
    tun_in: TunBatch,
    udp_in: UdpRecvBatch,
    tun_out: TunBatch,
    udp_out: UdpSendBatch,
    /// Allowed-IP prefixes currently routed into the TUN.
    routed: BTreeSet<IpNet>,
    /// Routes installed at start; prefixes inside them need none.
    static_routes: Vec<IpNet>,
    /// See [`EngineConfig::route_allowed_ips`].
    route_allowed_ips: bool,
    counters: EngineCounters,
    /// The last turn's TUN reads found the device empty after at most one
    /// packet (or super-packet): see [`Engine::turn`].
    tun_sparse: bool,
    /// The last turn read no UDP socket.
    udp_quiet: bool,
    /// Whether to poll for the answer to a lone packet just sent.
    answer_wait: AnswerWait,
    /// The last clock reading: when the timers last ran or a command
    /// came (see [`Engine::turn`]).
    now: Instant,
    /// A timerfd that fires when the node's timers are due.
    timer: OwnedFd,
    /// The deadline `timer` is set for.
    timer_deadline: Instant,
    commands: mpsc::Receiver<Command>,
    /// Kept to hand out in [`Engine::handle`].
    command_sender: mpsc::Sender<Command>,
    /// An eventfd that handles write to when they queue a command.
    waker: Arc<OwnedFd>,
    /// Datagrams from relays, and the eventfd written when one is queued.
    relayed: mpsc::Receiver<(RelayId, PublicKey, Vec<u8>)>,
    relayed_sender: mpsc::Sender<(RelayId, PublicKey, Vec<u8>)>,
    relayed_waker: Arc<OwnedFd>,
    relay_outlet: Option<RelayOutlet>,
    other_outlet: Option<OtherOutlet>,
    event_handler: Option<EventHandler>,
    /// The TUN, the socket and the waker, registered once: unlike `poll`,
    /// waiting costs no per-call registration on each descriptor.
    epoll: OwnedFd,
    /// Where `epoll::wait` reports.
    events: Vec<epoll::Event>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("node", &self.node)
            .field("tun", &self.tun)
            .field("udp", &self.udp.local_addr())
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Creates the TUN device with its addresses and binds the UDP socket.
    pub fn new(config: EngineConfig) -> Result<Self, EngineError> {
        let tun = match Tun::create(&config.tun_name, config.mtu, config.offload) {
            Err(e) if config.offload => {
                tracing::warn!(error = %e, "TUN offloads unavailable, using plain packets");
                Tun::create(&config.tun_name, config.mtu, false)?
            }
            other => other?,
        };
        tun.set_nonblocking(true)?;
        tun::configure(tun.name(), &config.addresses, &config.routes)?;
        let mut udp = UdpSocket::bind_any(config.listen_port)?;
        if config.fwmark != 0 {
            udp.set_mark(config.fwmark)?;
        }
        let waker = rustix::event::eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC)
            .map_err(|e| EngineError::Waker(e.into()))?;
        let (command_sender, commands) = mpsc::channel();
        let relayed_waker =
            rustix::event::eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC)
                .map_err(|e| EngineError::Waker(e.into()))?;
        let (relayed_sender, relayed) = mpsc::channel();
        let timer = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )
        .map_err(|e| EngineError::Timer(e.into()))?;
        let epoll =
            epoll::create(epoll::CreateFlags::CLOEXEC).map_err(|e| EngineError::Poll(e.into()))?;
        for (fd, source) in [
            (tun.as_fd(), SOURCE_TUN),
            (udp.as_fd(), SOURCE_UDP),
            (waker.as_fd(), SOURCE_WAKER),
            (timer.as_fd(), SOURCE_TIMER),
            (relayed_waker.as_fd(), SOURCE_RELAYED),
        ] {
            // Level-triggered: a side left unread (budget spent) reports again.
            epoll::add(&epoll, fd, EventData::new_u64(source), EventFlags::IN)
                .map_err(|e| EngineError::Poll(e.into()))?;
        }
        tracing::info!(
            tun = tun.name(),
            offload = tun.offload(),
            port = udp.local_addr().port(),
            public_key = %config.private_key.public_key(),
            "engine up"
        );
        let now = Instant::now();
        let mut engine = Engine {
            node: Node::new(config.private_key, now),
            tun,
            udp,
            peer_sockets: PeerSockets::default(),
            peer_sockets_generation: None,
            tun_in: TunBatch::new(),
            udp_in: UdpRecvBatch::new(),
            tun_out: TunBatch::new(),
            udp_out: UdpSendBatch::new(),
            routed: BTreeSet::new(),
            static_routes: config.routes,
            route_allowed_ips: config.route_allowed_ips,
            counters: EngineCounters::default(),
            tun_sparse: true,
            udp_quiet: true,
            answer_wait: AnswerWait::new(config.answer_poll),
            now,
            timer,
            timer_deadline: now,
            commands,
            command_sender,
            waker: Arc::new(waker),
            relayed,
            relayed_sender,
            relayed_waker: Arc::new(relayed_waker),
            relay_outlet: None,
            other_outlet: None,
            event_handler: None,
            epoll,
            events: Vec::with_capacity(MAX_EVENTS),
        };
        engine.set_timer()?;
        Ok(engine)
    }

    /// Sets the timer for the node's next deadline, measured from the last
    /// clock reading.
    fn set_timer(&mut self) -> Result<(), EngineError> {
        let deadline = self.node.poll_timeout();
        // A zero value would disarm the timer: fire at once instead.
        let wait = deadline
            .saturating_duration_since(self.now)
            .max(Duration::from_nanos(1));
        let value = Itimerspec {
            it_interval: ZERO,
            it_value: Timespec::try_from(wait)
                .map_err(|e| EngineError::Timer(io::Error::other(e)))?,
        };
        timerfd_settime(&self.timer, TimerfdTimerFlags::empty(), &value)
            .map_err(|e| EngineError::Timer(e.into()))?;
        self.timer_deadline = deadline;
        Ok(())
    }

    /// Waits up to `timeout` (`None`: not at all) for events.
    fn wait(&mut self, timeout: &Timespec) -> Result<(), EngineError> {
        self.events.clear();
        match epoll::wait(&self.epoll, spare_capacity(&mut self.events), Some(timeout)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => Ok(()),
            Err(e) => Err(EngineError::Poll(e.into())),
        }
    }

    /// A handle for other threads to change the peers and read the status
    /// while this engine runs.
    pub fn handle(&self) -> EngineHandle {
        EngineHandle {
            commands: self.command_sender.clone(),
            waker: self.waker.clone(),
            relayed: self.relayed_sender.clone(),
            relayed_waker: self.relayed_waker.clone(),
        }
    }

    pub fn status(&mut self) -> EngineStatus {
        EngineStatus {
            tun_name: self.tun.name().to_owned(),
            public_key: self.node.public_key(),
            listen_port: self.udp.local_addr().port(),
            peers: self.peer_status(),
            counters: self.counters(),
        }
    }

    /// Gives datagrams for peers behind a relay to `outlet`. Without one
    /// they are dropped and counted.
    pub fn set_relay_outlet(&mut self, outlet: RelayOutlet) {
        self.relay_outlet = Some(outlet);
    }

    /// Gives datagrams that are not WireGuard to `outlet`. Without one they
    /// are dropped and counted.
    pub fn set_other_outlet(&mut self, outlet: OtherOutlet) {
        self.other_outlet = Some(outlet);
    }

    /// See [`Node::set_roaming`]: off when the owner chooses every peer's path.
    pub fn set_roaming(&mut self, on: bool) {
        self.node.set_roaming(on);
    }

    /// Hands every [`Event`] of the node to `handler`, at the end of the
    /// turn that caused it. Without one they are dropped.
    pub fn set_event_handler(&mut self, handler: EventHandler) {
        self.event_handler = Some(handler);
    }

    pub fn tun(&self) -> &Tun {
        &self.tun
    }

    pub fn udp(&self) -> &UdpSocket {
        &self.udp
    }

    pub fn counters(&self) -> EngineCounters {
        EngineCounters {
            node: self.node.counters(),
            ..self.counters
        }
    }

    pub fn peer_status(&mut self) -> Vec<PeerStatus> {
        self.node.peer_status(Instant::now())
    }

    /// Replaces the node's key pair; sessions move over to the new key
    /// without interrupting traffic (see [`node`]'s module docs).
    pub fn set_private_key(&mut self, key: PrivateKey) {
        self.node.set_private_key(key, Instant::now());
    }

    /// Makes `peers` the peer set (sessions of unchanged peers continue) and
    /// routes their allowed IPs into the TUN. Default routes (`/0`) are not
    /// installed: sending everything into the tunnel, the tunnel's own
    /// datagrams included, needs policy routing, which is the caller's call.
    pub fn set_peers(&mut self, peers: &[PeerConfig]) -> Result<(), EngineError> {
        self.node.set_peers(peers, Instant::now())?;
        let wanted: BTreeSet<IpNet> = self
            .node
            .prefixes()
            .into_iter()
            .filter(|net| {
                let default = net.prefix_len() == 0;
                if default {
                    tracing::warn!(%net, "default route not installed");
                }
                self.route_allowed_ips
                    && !default
                    && !self.static_routes.iter().any(|r| r.contains(net))
            })
            .collect();
        let stale: Vec<IpNet> = self.routed.difference(&wanted).copied().collect();
        let new: Vec<IpNet> = wanted.difference(&self.routed).copied().collect();
        tun::remove_routes(self.tun.name(), &stale)?;
        tun::configure(self.tun.name(), &[], &new)?;
        self.routed = wanted;
        self.sync_peer_sockets(Instant::now());
        Ok(())
    }

    /// Moves the tunnel to UDP port `port` (0: any free one) and returns the
    /// port bound. On error the old port stays in use.
    pub fn set_listen_port(&mut self, port: u16) -> Result<u16, EngineError> {
        let current = self.udp.local_addr().port();
        if port == current {
            return Ok(current);
        }
        let mut udp = UdpSocket::bind_any(port)?;
        udp.set_mark(self.udp.mark())?;
        self.replace_socket(udp)?;
        let port = self.udp.local_addr().port();
        tracing::info!(port, "listen port changed");
        Ok(port)
    }

    /// Marks the tunnel's datagrams with `mark` (`SO_MARK`; 0: none).
    pub fn set_fwmark(&mut self, mark: u32) -> Result<(), EngineError> {
        if mark == self.udp.mark() {
            return Ok(());
        }
        self.udp.set_mark(mark)?;
        // Peer sockets chose their routes with the old mark.
        let changes = self.peer_sockets.close_all();
        self.watch_peer_sockets(changes);
        self.peer_sockets_generation = None;
        self.sync_peer_sockets(Instant::now());
        tracing::info!(mark, "fwmark changed");
        Ok(())
    }

    /// Makes `udp` the main socket, and the peer sockets follow it.
    fn replace_socket(&mut self, udp: UdpSocket) -> Result<(), EngineError> {
        epoll::add(
            &self.epoll,
            udp.as_fd(),
            EventData::new_u64(SOURCE_UDP),
            EventFlags::IN,
        )
        .map_err(|e| EngineError::Poll(e.into()))?;
        let old = std::mem::replace(&mut self.udp, udp);
        let _ = epoll::delete(&self.epoll, old.as_fd());
        let changes = self.peer_sockets.close_all();
        self.watch_peer_sockets(changes);
        self.peer_sockets_generation = None;
        self.sync_peer_sockets(Instant::now());
        Ok(())
    }

    /// Gives every peer endpoint its connected socket, and closes those of
    /// endpoints no peer has any more, when the node's endpoints changed;
    /// replaces peer sockets marked stale.
    fn sync_peer_sockets(&mut self, now: Instant) {
        let generation = self.node.endpoint_generation();
        if self.peer_sockets_generation != Some(generation) {
            self.peer_sockets_generation = Some(generation);
            let changes = self
                .peer_sockets
                .sync(&self.udp, self.node.endpoints(), now);
            self.watch_peer_sockets(changes);
            tracing::debug!(sockets = self.peer_sockets.len(), "peer sockets updated");
        }
        let changes = self.peer_sockets.refresh(&self.udp, now);
        self.watch_peer_sockets(changes);
    }

    /// Brings the epoll set in line with changed peer sockets.
    fn watch_peer_sockets(&mut self, changes: PeerSocketChanges) {
        for sock in &changes.removed {
            let _ = epoll::delete(&self.epoll, sock);
        }
        for slot in changes.added {
            let Some(sock) = self.peer_sockets.slot(slot) else {
                continue;
            };
            let token = SOURCE_PEER_SOCKETS + slot as u64;
            if let Err(e) = epoll::add(&self.epoll, sock, EventData::new_u64(token), EventFlags::IN)
            {
                // Unwatched, it would swallow its endpoint's datagrams.
                tracing::warn!(error = %e, "cannot watch a peer socket, closing it");
                self.peer_sockets.close(slot);
            }
        }
    }

    /// Runs turns until `stop` is set (checked at least every 100 ms).
    pub fn run(&mut self, stop: &AtomicBool) -> Result<(), EngineError> {
        while !stop.load(Ordering::Relaxed) {
            self.turn(Duration::from_millis(100))?;
        }
        Ok(())
    }

    /// One turn: waits up to `max_wait` for traffic, a timer or a command,
    /// then moves everything that is queued.
    pub fn turn(&mut self, max_wait: Duration) -> Result<(), EngineError> {
        let max_wait =
            Timespec::try_from(max_wait).map_err(|e| EngineError::Poll(io::Error::other(e)))?;
        // A look without waiting first tells whether this turn follows a
        // sleep. What wakes the engine then is most likely a lone packet, and
        // lone packets are read with plain reads instead of the batch reads,
        // whose set-up touches memory that the sleep left uncached.
        self.wait(&ZERO)?;
        // After a lone packet from the TUN, its answer is polled for before
        // sleeping (see `answer_wait`).
        if let Some(deadline) = self.answer_wait.deadline(!self.events.is_empty()) {
            let mut answered = false;
            while !answered && Instant::now() < deadline {
                std::hint::spin_loop();
                self.wait(&ZERO)?;
                answered = !self.events.is_empty();
            }
            self.answer_wait.ended(answered);
        }
        let slept = self.events.is_empty();
        if slept {
            self.wait(&max_wait)?;
        }
        // Any event, errors and hang-ups included, is worth a read: the read
        // reports it. A descriptor without an event is not read this turn;
        // the next wait returns at once if data arrived since.
        let mut tun_ready = false;
        let mut timer_due = false;
        let mut commands = false;
        let mut relayed = false;
        for event in &self.events {
            match event.data.u64() {
                SOURCE_TUN => tun_ready = true,
                SOURCE_TIMER => timer_due = true,
                SOURCE_WAKER => commands = true,
                SOURCE_RELAYED => relayed = true,
                _ => {}
            }
        }
        // Also alone, most likely: a datagram after a turn that received
        // none (a reply to what that turn sent), and what the TUN holds after
        // a turn that read at most one packet when the wait did not report
        // the TUN (the local stack's answer to a packet just written).
        let lone_udp = slept || self.udp_quiet;
        let lone_tun = slept || (self.tun_sparse && !tun_ready);
        // Packets are handled with the time of the last clock reading, taken
        // when the timers ran (every 250 ms) or a command came, as boringtun
        // keeps time for its own timers. Reading the clock after a sleep
        // costs a lone packet about 3 µs (the vDSO's code and data are no
        // longer cached), a tenth of its way through the engine; WireGuard's
        // timers, keepalives and handshakes count in seconds.
        if timer_due || commands {
            self.now = Instant::now();
        }
        if timer_due {
            let _ = rustix::io::read(&self.timer, &mut [0u8; 8]);
        }
        if commands {
            // Reset the counter, then drain the channel. A handle queues its
            // command before it writes the eventfd, so a command that this
            // drain misses has a write still to come, which the next wait
            // reports.
            let _ = rustix::io::read(&*self.waker, &mut [0u8; 8]);
            while let Ok(command) = self.commands.try_recv() {
                self.execute(command);
            }
        }
        let now = self.now;
        let Engine {
            node,
            tun,
            udp,
            peer_sockets,
            tun_in,
            udp_in,
            tun_out,
            udp_out,
            counters,
            tun_sparse,
            udp_quiet,
            answer_wait,
            events,
            relayed_waker,
            relayed: relayed_queue,
            relay_outlet,
            other_outlet,
            ..
        } = self;
        let mut out = Outbox {
            tun_dev: tun,
            udp_dev: udp,
            peer_sockets,
            tun_batch: tun_out,
            udp_batch: udp_out,
            counters,
            relay_outlet,
            other_outlet,
            tun_written: false,
        };

        // Shared by all UDP sockets: many ready peers must not starve the TUN.
        let mut budget = BUDGET;
        *udp_quiet = true;
        for event in events.iter() {
            let sock = match event.data.u64() {
                SOURCE_UDP => out.udp_dev,
                token => match token
                    .checked_sub(SOURCE_PEER_SOCKETS)
                    .and_then(|slot| out.peer_sockets.slot(usize::try_from(slot).ok()?))
                {
                    Some(sock) => sock,
                    None => continue,
                },
            };
            *udp_quiet = false;
            if lone_udp {
                receive_one(sock, udp_in, node, &mut out, now);
            } else {
                receive_datagrams(sock, udp_in, node, &mut out, now, &mut budget);
            }
        }
        if relayed {
            // As for commands: reset, then drain; a datagram this drain
            // misses has its eventfd write still to come.
            let _ = rustix::io::read(&**relayed_waker, &mut [0u8; 8]);
            while let Ok((relay, peer, datagram)) = relayed_queue.try_recv() {
                node.handle_relayed(relay, peer, &datagram, &mut out, now);
            }
        }
        // Does nothing when nothing was received.
        out.flush_tun();

        // The local stack answers a packet written to the TUN (an echo reply,
        // a TCP ACK) inside that write, so the answer is queued already though
        // the wait did not see it: read it now rather than after another wait.
        if tun_ready || out.tun_written {
            let mut packets = 0;
            for read_no in 0..BUDGET {
                tun_in.clear();
                let read = if read_no == 0 && lone_tun {
                    out.tun_dev.recv_one(tun_in)
                } else {
                    out.tun_dev.recv_batch(tun_in)
                };
                match read {
                    Ok(0) => break,
                    Ok(n) => {
                        for packet in tun_in.iter() {
                            node.handle_tun_packet(packet, &mut out, now);
                        }
                        packets += n;
                        if read_no == 0 && lone_tun {
                            // Send it now. Another packet would have had to
                            // arrive during this turn: the next wait reports
                            // it at once, so no read is spent on finding the
                            // device empty. Under load, reads go on and keep
                            // batching equal-sized datagrams into GSO sends.
                            out.flush_udp();
                            if n == 1 {
                                break;
                            }
                        }
                    }
                    Err(TunError::Malformed(e)) => {
                        tracing::debug!(error = %e, "TUN read dropped");
                        out.counters.tun_read_errors += 1;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            *tun_sparse = packets <= 1;
            // A lone packet out, nothing in: an answer may be on its way.
            if packets == 1 && *udp_quiet {
                answer_wait.sent(Instant::now());
            }
        }

        if timer_due {
            node.handle_timeout(&mut out, now);
        }
        out.flush_udp();
        out.flush_tun();
        // After a roaming or a handshake from a new address (the datagrams
        // just sent there left through the main socket, which is as good),
        // and at each timer tick for sockets found stale.
        if timer_due || self.peer_sockets_generation != Some(self.node.endpoint_generation()) {
            self.sync_peer_sockets(now);
        }
        if timer_due || self.node.poll_timeout() != self.timer_deadline {
            self.set_timer()?;
        }
        while let Some(event) = self.node.poll_event() {
            if let Some(handler) = &mut self.event_handler {
                handler(event);
            }
        }
        Ok(())
    }
}

/// Reads one message from `sock` (see [`UdpSocket::recv_one`]) and hands its
/// datagrams to the node. More queued behind it are read in the next turn,
/// which finds them without waiting.
fn receive_one(
    sock: &UdpSocket,
    batch: &mut UdpRecvBatch,
    node: &mut Node,
    out: &mut Outbox<'_>,
    now: Instant,
) {
    match sock.recv_one(batch) {
        Ok(_) => handle_received(sock, batch, node, out, now),
        Err(e) => {
            tracing::debug!(error = %e, "UDP receive failed");
            out.counters.udp_recv_errors += 1;
        }
    }
}

/// Hands every datagram of `batch`, read from `sock`, to the node.
fn handle_received(
    sock: &UdpSocket,
    batch: &UdpRecvBatch,
    node: &mut Node,
    out: &mut Outbox<'_>,
    now: Instant,
) {
    let mut last_from = None;
    for (from, datagram) in batch.iter() {
        // From an endpoint with a socket of its own, which should have
        // received it: that socket is stale.
        if sock.peer().is_none() && last_from != Some(from) {
            last_from = Some(from);
            out.peer_sockets.mark_stale(from);
        }
        node.handle_datagram(from, datagram, out, now);
    }
}

/// Reads `sock` until it is empty or `budget` batches are spent, handing
/// every datagram to the node.
fn receive_datagrams(
    sock: &UdpSocket,
    batch: &mut UdpRecvBatch,
    node: &mut Node,
    out: &mut Outbox<'_>,
    now: Instant,
    budget: &mut usize,
) {
    while *budget > 0 {
        *budget -= 1;
        match sock.recv_batch(batch) {
            Ok(0) => break,
            Ok(n) => {
                handle_received(sock, batch, node, out, now);
                // A short batch means the queue was empty: asking again
                // would only delay the TUN write by one system call.
                if n < batch.capacity() {
                    break;
                }
            }
            Err(e) => {
                // Also a connected socket's report of an ICMP error from its
                // endpoint (ECONNREFUSED): the next read goes on.
                tracing::debug!(error = %e, "UDP receive failed");
                out.counters.udp_recv_errors += 1;
                break;
            }
        }
    }
}

impl Engine {
    fn execute(&mut self, command: Command) {
        // A requester that gave up waiting has dropped its receiver; the
        // command is still carried out, only the answer is lost.
        match command {
            Command::SetPeers { peers, reply } => {
                let result = self.set_peers(&peers);
                if let Err(e) = &result {
                    tracing::warn!(error = %e, "peer update refused");
                }
                reply(result);
            }
            Command::Status { reply } => reply(self.status()),
            Command::SetPrivateKey { key, reply } => {
                self.set_private_key(key);
                reply(());
            }
            Command::SetListenPort { port, reply } => reply(self.set_listen_port(port)),
            Command::SetFwmark { mark, reply } => reply(self.set_fwmark(mark)),
            Command::SetEndpoint {
                peer,
                endpoint,
                reply,
            } => {
                let found = self.node.set_endpoint(&peer, endpoint, self.now);
                // Before anything leaves for it: an endpoint with its own
                // source port is reachable only from that port's socket.
                self.sync_peer_sockets(self.now);
                reply(found);
            }
            // Sent with the turn's other datagrams; the batch is empty when
            // commands run unless many came at once.
            Command::SendUdp { to, datagram } => {
                if !(self.udp_out.has_room(datagram.len()) && self.udp_out.push(to, &datagram)) {
                    self.counters.other_dropped += 1;
                }
            }
            Command::SetSourcePort { endpoint, port } => {
                let changes = self.peer_sockets.set_source_port(endpoint, port);
                self.watch_peer_sockets(changes);
                self.peer_sockets_generation = None;
                self.sync_peer_sockets(self.now);
            }
        }
    }
}

/// The engine's [`Sink`]: batches that flush to the real devices when full.
struct Outbox<'a> {
    tun_dev: &'a mut Tun,
    udp_dev: &'a UdpSocket,
    peer_sockets: &'a PeerSockets,
    tun_batch: &'a mut TunBatch,
    udp_batch: &'a mut UdpSendBatch,
    counters: &'a mut EngineCounters,
    relay_outlet: &'a mut Option<RelayOutlet>,
    other_outlet: &'a mut Option<OtherOutlet>,
    /// Whether this turn wrote to the TUN.
    tun_written: bool,
}

impl Outbox<'_> {
    fn flush_udp(&mut self) {
        if self.udp_batch.is_empty() {
            return;
        }
        let report = udp::send_batch_via(self.udp_batch, self.udp_dev, self.peer_sockets);
        self.counters.udp_send_dropped += report.dropped as u64;
    }

    fn flush_tun(&mut self) {
        if self.tun_batch.is_empty() {
            return;
        }
        self.tun_written = true;
        if let Err(e) = self.tun_dev.send_batch(self.tun_batch) {
            tracing::debug!(error = %e, "TUN write failed");
            self.counters.tun_write_errors += 1;
        }
    }
}

impl Sink for Outbox<'_> {
    fn udp(&mut self, len: usize) -> &mut UdpSendBatch {
        if !self.udp_batch.has_room(len) {
            self.flush_udp();
        }
        self.udp_batch
    }

    fn tun(&mut self) -> &mut TunBatch {
        if self.tun_batch.is_full() {
            self.flush_tun();
        }
        self.tun_batch
    }

    fn relay(&mut self, relay: RelayId, peer: &PublicKey, datagram: &[u8]) {
        match self.relay_outlet {
            Some(outlet) => outlet(relay, peer, datagram),
            None => self.counters.relay_send_dropped += 1,
        }
    }

    fn other(&mut self, from: SocketAddr, datagram: &[u8]) {
        match self.other_outlet {
            Some(outlet) => outlet(from, datagram),
            None => self.counters.other_dropped += 1,
        }
    }
}
