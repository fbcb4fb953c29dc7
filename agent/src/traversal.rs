//! NAT traversal's driver: one task that carries out what the sans-IO cores
//! decide — [`crate::paths::PathManager`] (which path each peer takes) and
//! [`crate::discovery::Discovery`] (this node's public address) — over the
//! engine's UDP socket and the home relay's connection.
//!
//! The engine hands it every datagram that is not WireGuard (STUN answers,
//! disco packets) through [`Outlets::other`], and every datagram for a
//! relayed peer through [`Outlets::relay`], which writes straight into the
//! home relay's connection without a hop through this task. The task
//! forwards relayed WireGuard datagrams to the engine, sets peers'
//! endpoints, and tells the node runtime when its endpoints change (to
//! report them to the coordinator).
//!
//! For the birthday technique it opens the extra sockets the manager asks
//! for (plain `SO_REUSEPORT` sockets, one receiving task each), sends from
//! them, and when a path through one wins, has the engine send that peer's
//! datagrams from its port ([`EngineHandle::set_source_port`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshd_dataplane::engine::{self as dp, EngineHandle, EngineStatus, OtherOutlet, RelayOutlet};
use meshd_dataplane::keys::{PrivateKey, PublicKey};
use meshd_proto::{disco, stun, NodeKey, RelayEntry};
use rand::RngCore;
use tokio::sync::{mpsc, oneshot};

use crate::discovery::{Discovery, NetcheckReport, StunTarget};
use crate::paths::{
    Action, BirthdayConfig, Endpoint, Path, PathConfig, PathEvent, PathManager, RelayId, SocketId,
};
use crate::relay_link;
use meshd_relay::client::RelaySender;

/// The home relay's connection, shared with the engine's relay outlet.
type HomeLink = Arc<Mutex<Option<RelaySender>>>;

/// How often peers' byte counters are read to tell which peers are in use.
const ACTIVITY_INTERVAL: Duration = Duration::from_secs(1);
/// Waits before connecting to a relay again: doubling from the first to the last.
const RETRY_MIN: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(8);
/// How long `meshd ping` waits for one answer.
pub const PING_TIMEOUT: Duration = Duration::from_secs(3);

/// How traversal may choose paths (for tests, benchmarks and odd networks).
#[derive(Debug, Clone, Default)]
pub struct TraversalOptions {
    /// Keep every peer on the relay: no direct path is ever tried.
    pub no_direct: bool,
    /// How to reach relays: QUIC with TLS/TCP after a head start (the
    /// default), or only one of them.
    pub relay_transport: Option<meshd_relay::client::TransportChoice>,
    /// The birthday technique's budget (docs/disco-protocol.md).
    pub birthday: BirthdayConfig,
}

/// What the engine is given at start; see the module doc.
pub struct Outlets {
    pub other: OtherOutlet,
    pub relay: RelayOutlet,
}

/// What the task tells the node runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraversalEvent {
    /// Every endpoint this node can be reached at now, to report.
    Endpoints(Vec<SocketAddr>),
}

/// A peer's path, for `meshd status`.
#[derive(Debug, Clone, PartialEq)]
pub struct PathStatus {
    pub path: Path,
    pub relay_region: Option<String>,
    pub rtt: Option<Duration>,
}

/// Everything `meshd status` and `meshd netcheck` show of traversal.
#[derive(Debug, Clone, Default)]
pub struct TraversalStatus {
    pub home_relay: Option<String>,
    /// `QUIC` or `TLS`, once connected to the home relay.
    pub relay_transport: Option<String>,
    pub peers: BTreeMap<PublicKey, PathStatus>,
    pub netcheck: NetcheckReport,
}

/// One reply of `meshd ping`.
#[derive(Debug, Clone, PartialEq)]
pub struct PingResult {
    /// `direct ip:port` or `relay REGION`.
    pub via: String,
    pub rtt: Duration,
    /// How long ago the peer's path last changed.
    pub path_age: Duration,
}

enum Cmd {
    Peers(Vec<(NodeKey, Vec<SocketAddr>)>),
    Relays(Vec<RelayEntry>),
    Local(Vec<SocketAddr>),
    Status(oneshot::Sender<TraversalStatus>),
    Ping(NodeKey, oneshot::Sender<Result<PingResult, String>>),
    Key(PrivateKey),
}

/// The runtime's handle on the task; when every clone is dropped the task stops.
#[derive(Debug, Clone)]
pub struct Traversal {
    cmds: mpsc::UnboundedSender<Cmd>,
}

/// Made before the engine, so that its outlets exist when it starts; the
/// task starts once the engine does ([`Pending::start`]).
pub struct Pending {
    udp_rx: mpsc::UnboundedReceiver<(SocketAddr, Vec<u8>)>,
    link: HomeLink,
}

pub fn prepare() -> (Pending, Outlets) {
    let (udp_tx, udp_rx) = mpsc::unbounded_channel();
    let link: HomeLink = Arc::default();
    let relay_link = link.clone();
    let outlets = Outlets {
        other: Box::new(move |from, datagram| {
            // Only what a core may want; anything else is dropped here.
            if stun::is_stun(datagram) || disco::is_disco(datagram) {
                let _ = udp_tx.send((from, datagram.to_vec()));
            }
        }),
        // Whatever relay a peer's endpoint names, its datagrams go through
        // the home relay: relays forward to each other.
        relay: Box::new(move |_, peer, datagram| {
            let guard = relay_link.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(l) = guard.as_ref() {
                let _ = l.send(&x25519_dalek::PublicKey::from(*peer.as_bytes()), datagram);
            }
        }),
    };
    (Pending { udp_rx, link }, outlets)
}

impl Pending {
    pub fn start(
        self,
        key: &PrivateKey,
        options: TraversalOptions,
        engine: EngineHandle,
        events: mpsc::UnboundedSender<TraversalEvent>,
    ) -> Traversal {
        let (cmds, cmd_rx) = mpsc::unbounded_channel();
        let (relayed_tx, relayed_rx) = mpsc::unbounded_channel();
        let (lost_tx, lost_rx) = mpsc::unbounded_channel();
        let (latency_tx, latency_rx) = mpsc::unbounded_channel();
        let (extra_tx, extra_rx) = mpsc::unbounded_channel();
        let mut seed = [0u8; 32];
        rand::rng().fill_bytes(&mut seed);
        let now = Instant::now();
        let config = PathConfig {
            birthday: options.birthday.clone(),
            ..PathConfig::default()
        };
        let task = Task {
            options,
            key: key.clone(),
            pm: PathManager::new(config, key.to_static_secret(), seed),
            discovery: Discovery::new(
                u64::from_le_bytes(seed[..8].try_into().unwrap_or([1; 8])),
                now,
            ),
            engine,
            events,
            link: self.link,
            relays: Vec::new(),
            relay_ids: BTreeMap::new(),
            home: None,
            connecting: None,
            home_link: None,
            generation: 0,
            lost_tx,
            retry_at: None,
            retry_backoff: RETRY_MIN,
            failed: BTreeMap::new(),
            pings: BTreeMap::new(),
            counters: BTreeMap::new(),
            reported: Vec::new(),
            tcp_latency: BTreeMap::new(),
            relayed_tx,
            latency_tx,
            extra: BTreeMap::new(),
            extra_tx,
            pinned: BTreeMap::new(),
        };
        let rx = Receivers {
            cmds: cmd_rx,
            udp: self.udp_rx,
            relayed: relayed_rx,
            latency: latency_rx,
            lost: lost_rx,
            extra: extra_rx,
        };
        tokio::spawn(task.run(rx));
        Traversal { cmds }
    }
}

impl Traversal {
    pub fn set_peers(&self, peers: Vec<(NodeKey, Vec<SocketAddr>)>) {
        let _ = self.cmds.send(Cmd::Peers(peers));
    }

    pub fn set_relays(&self, relays: Vec<RelayEntry>) {
        let _ = self.cmds.send(Cmd::Relays(relays));
    }

    /// The node's new key after a rotation: disco packets are sealed with it
    /// and relays are proven it from now on.
    pub fn set_key(&self, key: PrivateKey) {
        let _ = self.cmds.send(Cmd::Key(key));
    }

    pub fn set_local(&self, local: Vec<SocketAddr>) {
        let _ = self.cmds.send(Cmd::Local(local));
    }

    pub async fn status(&self) -> Option<TraversalStatus> {
        let (tx, rx) = oneshot::channel();
        self.cmds.send(Cmd::Status(tx)).ok()?;
        rx.await.ok()
    }

    pub async fn ping(&self, peer: NodeKey) -> Result<PingResult, String> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Ping(peer, tx))
            .map_err(|_| "NAT traversal is not running".to_owned())?;
        rx.await.map_err(|_| "NAT traversal stopped".to_owned())?
    }
}

type Connected = Result<relay_link::Link, String>;

/// What the task listens to besides its timers.
struct Receivers {
    cmds: mpsc::UnboundedReceiver<Cmd>,
    udp: mpsc::UnboundedReceiver<(SocketAddr, Vec<u8>)>,
    relayed: mpsc::UnboundedReceiver<(RelayId, NodeKey, Vec<u8>)>,
    latency: mpsc::UnboundedReceiver<(RelayId, Option<Duration>)>,
    lost: mpsc::UnboundedReceiver<u64>,
    extra: mpsc::UnboundedReceiver<(SocketId, SocketAddr, Vec<u8>)>,
}

struct Task {
    options: TraversalOptions,
    key: PrivateKey,
    pm: PathManager,
    discovery: Discovery,
    engine: EngineHandle,
    events: mpsc::UnboundedSender<TraversalEvent>,
    link: HomeLink,
    relays: Vec<RelayEntry>,
    /// Stable ids: a relay keeps its id while the map changes around it.
    relay_ids: BTreeMap<NodeKey, RelayId>,
    home: Option<RelayId>,
    connecting: Option<(RelayId, oneshot::Receiver<Connected>)>,
    /// The home relay's connection (closed when dropped).
    home_link: Option<relay_link::Link>,
    /// Numbers connections, so that the loss of a replaced one is ignored.
    generation: u64,
    lost_tx: mpsc::UnboundedSender<u64>,
    /// When to connect to the home relay again, and the wait after that.
    retry_at: Option<Instant>,
    retry_backoff: Duration,
    /// Relays that failed, with the STUN round count after which they may
    /// be believed again.
    failed: BTreeMap<RelayId, u64>,
    pings: BTreeMap<u64, (Instant, oneshot::Sender<Result<PingResult, String>>)>,
    /// Each peer's byte counters at the last activity check.
    counters: BTreeMap<PublicKey, (u64, u64)>,
    reported: Vec<SocketAddr>,
    /// Connect times to relays over TCP: their latency where UDP is blocked.
    tcp_latency: BTreeMap<RelayId, Duration>,
    /// Where relay connections deliver what they receive (an empty datagram
    /// from key zero: the connection is lost).
    relayed_tx: mpsc::UnboundedSender<(RelayId, NodeKey, Vec<u8>)>,
    latency_tx: mpsc::UnboundedSender<(RelayId, Option<Duration>)>,
    /// The birthday technique's extra sockets, open now.
    extra: BTreeMap<SocketId, ExtraSocket>,
    /// Where the extra sockets deliver the disco packets they receive.
    extra_tx: mpsc::UnboundedSender<(SocketId, SocketAddr, Vec<u8>)>,
    /// Per peer, the endpoint the engine sends to from an extra socket's port.
    pinned: BTreeMap<NodeKey, SocketAddr>,
}

/// An extra socket and the task that reads it (stopped when dropped).
struct ExtraSocket {
    /// For sending: a plain non-blocking socket sends at once, where
    /// tokio's `try_send_to` refuses until the reactor has seen the socket
    /// writable (not yet, right after it was opened).
    sock: std::net::UdpSocket,
    port: u16,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for ExtraSocket {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl ExtraSocket {
    fn open(
        id: SocketId,
        to: mpsc::UnboundedSender<(SocketId, SocketAddr, Vec<u8>)>,
    ) -> std::io::Result<ExtraSocket> {
        let std_sock = meshd_dataplane::udp::bind_extra_v4()?;
        let port = std_sock.local_addr()?.port();
        let sock = std_sock.try_clone()?;
        let reader_sock = tokio::net::UdpSocket::from_std(std_sock)?;
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; disco::MAX_PACKET_LEN + 1];
            // Only disco packets matter here: WireGuard that arrives
            // before the engine's own socket on this port exists is
            // dropped, and its retransmissions reach the engine.
            while let Ok((n, from)) = reader_sock.recv_from(&mut buf).await {
                let d = &buf[..n];
                if disco::is_disco(d) && to.send((id, from, d.to_vec())).is_err() {
                    break;
                }
            }
        });
        Ok(ExtraSocket { sock, port, reader })
    }
}

impl Task {
    async fn run(mut self, rx: Receivers) {
        let Receivers {
            mut cmds,
            mut udp,
            mut relayed,
            mut latency,
            mut lost,
            mut extra,
        } = rx;
        let mut activity = tokio::time::interval(ACTIVITY_INTERVAL);
        let (activity_tx, mut activity_rx) = mpsc::unbounded_channel();
        activity.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wake = self.next_wake();
            let connecting = self.connecting.as_mut().map(|(_, rx)| rx);
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(c) => self.on_cmd(c),
                    None => break,
                },
                Some((from, d)) = udp.recv() => self.on_udp(SocketId::MAIN, from, &d),
                Some((socket, from, d)) = extra.recv() => self.on_udp(socket, from, &d),
                Some((relay, from, d)) = relayed.recv() => self.on_relayed(relay, from, d),
                Some(generation) = lost.recv() => {
                    if generation == self.generation {
                        self.on_relay_lost();
                    }
                }
                Some((relay, l)) = latency.recv() => {
                    if let Some(l) = l {
                        self.tcp_latency.insert(relay, l);
                    }
                    self.report_latencies();
                }
                r = async { match connecting { Some(rx) => rx.await, None => std::future::pending().await } } => {
                    self.on_connected(r.unwrap_or_else(|_| Err("connection task ended".into())));
                }
                () = tokio::time::sleep_until(wake.into()) => {
                    let now = Instant::now();
                    self.pm.handle_timeout(now);
                    self.discovery.handle_timeout(now);
                    self.after_discovery();
                    self.retry_home(now);
                }
                _ = activity.tick() => self.check_activity(&activity_tx),
                Some(status) = activity_rx.recv() => self.on_activity(status),
            }
            self.flush();
        }
        *self.link.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn next_wake(&self) -> Instant {
        let d = self.discovery.poll_timeout();
        let d = self.retry_at.map_or(d, |r| r.min(d));
        self.pm.poll_timeout().map_or(d, |p| p.min(d))
    }

    /// Without a home relay connection (it failed, was refused — a relay may
    /// hear of a new node a moment after the node itself — or was lost),
    /// connects again to the home relay path selection prefers, with backoff.
    fn retry_home(&mut self, now: Instant) {
        if self.retry_at.is_none_or(|t| t > now) || self.connecting.is_some() {
            return;
        }
        self.retry_at = None;
        if self.home_link.is_none() {
            if let Some(id) = self.pm.home_relay() {
                self.connect(id);
            }
        }
    }

    fn relay_id(&mut self, key: NodeKey) -> RelayId {
        let next = RelayId(u16::try_from(self.relay_ids.len()).unwrap_or(u16::MAX));
        *self.relay_ids.entry(key).or_insert(next)
    }

    fn entry(&self, id: RelayId) -> Option<&RelayEntry> {
        self.relays
            .iter()
            .find(|r| self.relay_ids.get(&r.key) == Some(&id))
    }

    fn region(&self, id: RelayId) -> Option<String> {
        self.entry(id).map(|e| e.info.region.clone())
    }

    fn on_cmd(&mut self, cmd: Cmd) {
        let now = Instant::now();
        match cmd {
            Cmd::Peers(peers) => {
                let keep: Vec<NodeKey> = peers.iter().map(|(k, _)| *k).collect();
                let stale: Vec<NodeKey> = self
                    .counters
                    .keys()
                    .map(|k| NodeKey(*k.as_bytes()))
                    .filter(|k| !keep.contains(k))
                    .collect();
                for k in stale {
                    self.pm.remove_peer(&k);
                    if let Some(a) = self.pinned.remove(&k) {
                        let _ = self.engine.set_source_port(a, None);
                    }
                    self.counters.remove(&PublicKey::from_bytes(k.0));
                }
                for (key, candidates) in peers {
                    if let Err(e) = self.pm.upsert_peer(key, &candidates, self.home, now) {
                        tracing::warn!(peer = %key, error = %e, "peer not managed by NAT traversal");
                        continue;
                    }
                    self.counters
                        .entry(PublicKey::from_bytes(key.0))
                        .or_default();
                }
            }
            Cmd::Relays(relays) => {
                for r in &relays {
                    self.relay_id(r.key);
                }
                self.relays = relays;
                let targets: Vec<StunTarget> = self
                    .relays
                    .iter()
                    .filter_map(|r| {
                        let addr = r
                            .info
                            .addrs
                            .iter()
                            .find(|a| a.is_ipv4())
                            .or(r.info.addrs.first())?;
                        Some(StunTarget {
                            region: r.info.region.clone(),
                            addr: SocketAddr::new(addr.ip(), r.info.stun_port),
                        })
                    })
                    .collect();
                self.discovery.set_targets(targets, now);
                // Where UDP is blocked STUN says nothing: a TCP connect's
                // time stands in for each relay's latency.
                let ids: Vec<RelayId> = self.relay_ids.values().copied().collect();
                for id in ids {
                    self.measure_tcp(id, Duration::ZERO);
                }
                self.discovery.handle_timeout(now);
            }
            Cmd::Local(local) => {
                self.discovery.set_local(local, now);
                self.discovery.handle_timeout(now);
                self.after_discovery();
            }
            Cmd::Status(reply) => {
                let _ = reply.send(self.status(now));
            }
            Cmd::Key(key) => {
                if let Err(e) = self.pm.rotate_key(key.to_static_secret()) {
                    tracing::warn!(error = %e, "NAT traversal cannot use the new key");
                }
                self.key = key;
                // The home relay knows the old key only: connect again.
                if let Some(home) = self.home.take() {
                    self.set_link(None);
                    self.connect(home);
                }
            }
            Cmd::Ping(peer, reply) => match self.pm.ping(&peer, now) {
                Ok(id) => {
                    self.pings.insert(id, (now, reply));
                }
                Err(e) => {
                    let _ = reply.send(Err(e.to_string()));
                }
            },
        }
    }

    fn status(&self, now: Instant) -> TraversalStatus {
        let peers = self
            .counters
            .keys()
            .filter_map(|k| {
                let s = self.pm.status(&NodeKey(*k.as_bytes()))?;
                let relay_region = match s.path {
                    Path::Relay(r) => self.region(r),
                    _ => None,
                };
                let _ = now;
                Some((
                    *k,
                    PathStatus {
                        path: s.path,
                        relay_region,
                        rtt: s.rtt,
                    },
                ))
            })
            .collect();
        TraversalStatus {
            home_relay: self.home.and_then(|h| self.region(h)),
            relay_transport: self.home_link.as_ref().map(|l| l.transport.clone()),
            peers,
            netcheck: self.discovery.report().clone(),
        }
    }

    fn on_udp(&mut self, socket: SocketId, from: SocketAddr, d: &[u8]) {
        let now = Instant::now();
        if socket != SocketId::MAIN {
            if let Err(e) = self.pm.handle_udp_on(socket, from, d, now) {
                tracing::debug!(%from, ?socket, error = %e, "disco packet dropped");
            }
        } else if stun::is_stun(d) {
            if self.discovery.handle_stun(from, d, now) {
                self.after_discovery();
            }
        } else if self.options.no_direct {
            tracing::trace!(%from, "disco packet ignored: direct paths are off");
        } else if let Err(e) = self.pm.handle_udp(from, d, now) {
            tracing::debug!(%from, error = %e, "disco packet dropped");
        }
    }

    /// Measures a TCP connect to relay `id` after `delay`.
    fn measure_tcp(&self, id: RelayId, delay: Duration) {
        let Some(addr) = self.entry(id).and_then(|r| r.info.addrs.first().copied()) else {
            return;
        };
        let tx = self.latency_tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let start = Instant::now();
            let ok =
                tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(addr))
                    .await
                    .is_ok_and(|r| r.is_ok());
            let _ = tx.send((id, ok.then(|| start.elapsed())));
        });
    }

    fn on_relayed(&mut self, relay: RelayId, from: NodeKey, d: Vec<u8>) {
        if disco::is_disco(&d) {
            if let Err(e) = self.pm.handle_relayed(relay, from, &d, Instant::now()) {
                tracing::debug!(peer = %from, error = %e, "relayed disco packet dropped");
            }
            return;
        }
        let peer = PublicKey::from_bytes(from.0);
        let _ = self.engine.relayed(dp::RelayId(relay.0), peer, d);
    }

    fn after_discovery(&mut self) {
        self.report_latencies();
        let eps = self.discovery.endpoints();
        let report = self.discovery.report();
        let varies = report.mapping_varies == Some(true);
        // Where the mapping varies only the IP means anything: the port is 0.
        let public = report
            .public
            .or_else(|| report.public_ip.map(|ip| SocketAddr::new(ip, 0)));
        self.pm.set_public(public, varies);
        if eps != self.reported {
            self.pm.set_own_candidates(eps.clone(), Instant::now());
            let _ = self.events.send(TraversalEvent::Endpoints(eps.clone()));
            self.reported = eps;
        }
    }

    /// Relay latencies for the home relay's choice: STUN's where UDP
    /// works, TCP connect times where it does not.
    fn report_latencies(&mut self) {
        let stun: BTreeMap<String, f64> = self.discovery.report().latency.iter().cloned().collect();
        let ids: Vec<(RelayId, String)> = self
            .relays
            .iter()
            .filter_map(|r| Some((*self.relay_ids.get(&r.key)?, r.info.region.clone())))
            .collect();
        for (id, region) in ids {
            // A relay that failed is believed again only on a STUN round
            // that ended after the failure: the last report's latency for
            // it is from before, and would make it home again at once.
            if let Some(&round) = self.failed.get(&id) {
                if round >= self.discovery.rounds() && self.discovery.report().udp {
                    continue;
                }
                self.failed.remove(&id);
            }
            let l = match stun.get(&region) {
                Some(ms) => Some(Duration::from_secs_f64(ms / 1000.0)),
                None if !self.discovery.report().udp => self.tcp_latency.get(&id).copied(),
                None => None,
            };
            if l.is_some() {
                self.pm.handle_relay_latency(id, l);
            }
        }
    }

    /// Asks the engine for its counters; the answer comes back through
    /// `activity` (the engine's thread must never be waited for here).
    fn check_activity(&self, activity: &mpsc::UnboundedSender<EngineStatus>) {
        let tx = activity.clone();
        let _ = self.engine.status_then(move |s| {
            let _ = tx.send(s);
        });
    }

    /// Peers whose byte counters moved are in use.
    fn on_activity(&mut self, status: EngineStatus) {
        let now = Instant::now();
        for p in status.peers {
            if let Some(last) = self.counters.get_mut(&p.public_key) {
                let now_counts = (p.rx_bytes, p.tx_bytes);
                if now_counts != *last {
                    *last = now_counts;
                    self.pm
                        .note_activity(&NodeKey(*p.public_key.as_bytes()), now);
                }
            }
        }
    }

    /// Makes `link` the home relay's connection (closing the one before).
    fn set_link(&mut self, link: Option<(RelayId, relay_link::Link)>) {
        let mut shared = self.link.lock().unwrap_or_else(|e| e.into_inner());
        *shared = link.as_ref().map(|(_, l)| l.sender.clone());
        drop(shared);
        self.home_link = link.map(|(_, l)| l);
    }

    fn mark_failed(&mut self, id: RelayId) {
        // +1: a round running now may have heard the relay before it failed.
        self.failed.insert(id, self.discovery.rounds() + 1);
        self.discovery.probe_soon(Instant::now());
        self.pm.handle_relay_latency(id, None);
    }

    fn on_relay_lost(&mut self) {
        if let Some(id) = self.home.take() {
            self.set_link(None);
            tracing::warn!(region = %self.region(id).unwrap_or_default(), "lost the home relay");
            self.tcp_latency.remove(&id);
            // Another relay becomes home if there is one; this one is
            // measured again shortly, and taken back when it answers.
            self.mark_failed(id);
            self.measure_tcp(id, Duration::from_secs(1));
            self.retry_at = Some(Instant::now() + self.retry_backoff);
        }
    }

    fn on_connected(&mut self, result: Connected) {
        let Some((id, _)) = self.connecting.take() else {
            return;
        };
        let region = self.region(id).unwrap_or_default();
        match result {
            Ok(link) => {
                tracing::info!(%region, transport = %link.transport, "connected to the home relay");
                self.retry_backoff = RETRY_MIN;
                self.retry_at = None;
                self.set_link(Some((id, link)));
                self.home = Some(id);
                let now = Instant::now();
                let keys: Vec<NodeKey> = self
                    .counters
                    .keys()
                    .map(|k| NodeKey(*k.as_bytes()))
                    .collect();
                for k in keys {
                    let candidates = self.pm.status(&k).map(|s| s.candidates).unwrap_or_default();
                    let _ = self.pm.upsert_peer(k, &candidates, Some(id), now);
                }
            }
            Err(e) => {
                tracing::warn!(%region, error = %e, retry_in = ?self.retry_backoff, "cannot connect to the relay");
                self.tcp_latency.remove(&id);
                self.mark_failed(id);
                self.measure_tcp(id, Duration::from_secs(2));
                self.retry_at = Some(Instant::now() + self.retry_backoff);
                self.retry_backoff = (self.retry_backoff * 2).min(RETRY_MAX);
            }
        }
    }

    fn connect(&mut self, id: RelayId) {
        let Some(entry) = self.entry(id).cloned() else {
            return;
        };
        let (tx, rx) = oneshot::channel();
        let key = self.key.clone();
        let relayed_tx = self.relayed_tx.clone();
        let lost_tx = self.lost_tx.clone();
        let engine = self.engine.clone();
        let transport = self.options.relay_transport;
        self.generation += 1;
        let generation = self.generation;
        tokio::spawn(async move {
            let to = relay_link::Receivers {
                id,
                generation,
                engine,
                delivered: relayed_tx,
                lost: lost_tx,
            };
            let r = relay_link::connect(&entry, &key, transport, to).await;
            let _ = tx.send(r);
        });
        self.connecting = Some((id, rx));
    }

    /// Carries out what the cores decided.
    fn flush(&mut self) {
        while let Some((to, bytes)) = self.discovery.poll_transmit() {
            let _ = self.engine.send_udp(to, bytes);
        }
        // Actions first: a transmit may leave from a socket opened just now.
        while let Some(a) = self.pm.poll_action() {
            self.on_action(a);
        }
        while let Some(t) = self.pm.poll_transmit() {
            match t.to {
                Endpoint::Udp(_) if self.options.no_direct => {}
                Endpoint::Udp(addr) if t.from != SocketId::MAIN => {
                    // A socket that could not be opened loses what it sends.
                    if let Some(s) = self.extra.get(&t.from) {
                        if let Err(e) = s.sock.send_to(&t.packet, addr) {
                            tracing::debug!(%addr, socket = ?t.from, error = %e, "disco packet not sent");
                        }
                    }
                }
                Endpoint::Udp(addr) => {
                    let _ = self.engine.send_udp(addr, t.packet);
                }
                Endpoint::Relay { peer, .. } => {
                    let guard = self.link.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(l) = guard.as_ref() {
                        let _ = l.send(&x25519_dalek::PublicKey::from(peer.0), &t.packet);
                    }
                }
            }
        }
        while let Some(e) = self.pm.poll_event() {
            self.on_event(e);
        }
    }

    fn on_action(&mut self, a: Action) {
        match a {
            Action::SetEndpoint {
                peer,
                endpoint,
                from,
            } => {
                self.pin(peer, endpoint, from);
                let e = match endpoint {
                    Endpoint::Udp(addr) => dp::Endpoint::Udp(addr),
                    Endpoint::Relay { relay, peer } => dp::Endpoint::Relay {
                        relay: dp::RelayId(relay.0),
                        peer: PublicKey::from_bytes(peer.0),
                    },
                };
                let _ = self
                    .engine
                    .set_endpoint_then(PublicKey::from_bytes(peer.0), e, |_| {});
            }
            Action::OpenSocket(id) => {
                if self.options.no_direct {
                    return;
                }
                match ExtraSocket::open(id, self.extra_tx.clone()) {
                    Ok(s) => {
                        self.extra.insert(id, s);
                    }
                    Err(e) => tracing::debug!(?id, error = %e, "no extra socket"),
                }
            }
            Action::CloseSocket(id) => {
                self.extra.remove(&id);
            }
            Action::SetHomeRelay(id) => {
                if self.connecting.as_ref().map(|c| c.0) != Some(id) && self.home != Some(id) {
                    self.connect(id);
                }
            }
        }
    }

    /// Has the engine send the peer's datagrams from the extra socket's port
    /// (only its NAT mapping reaches the peer), or from the main socket's
    /// again. Told before the endpoint itself, so the first datagram to it
    /// already leaves from the right port.
    fn pin(&mut self, peer: NodeKey, endpoint: Endpoint, from: SocketId) {
        let want = match endpoint {
            Endpoint::Udp(addr) if from != SocketId::MAIN => {
                self.extra.get(&from).map(|s| (addr, s.port))
            }
            _ => None,
        };
        let before = self.pinned.get(&peer).copied();
        if before.is_some() && before != want.map(|(a, _)| a) {
            if let Some(old) = self.pinned.remove(&peer) {
                let _ = self.engine.set_source_port(old, None);
            }
        }
        if let Some((addr, port)) = want {
            tracing::info!(%peer, %addr, port, "sending from the birthday technique's socket");
            let _ = self.engine.set_source_port(addr, Some(port));
            self.pinned.insert(peer, addr);
        }
    }

    fn on_event(&mut self, e: PathEvent) {
        let now = Instant::now();
        match e {
            PathEvent::Upgraded {
                peer,
                addr,
                after,
                rtt,
            } => {
                tracing::info!(%peer, %addr, after_ms = after.as_millis(), rtt_ms = rtt.as_secs_f64() * 1000.0, "path upgraded to direct");
            }
            PathEvent::Switched {
                peer,
                from,
                to,
                rtt,
            } => {
                tracing::info!(%peer, %from, %to, rtt_ms = rtt.as_secs_f64() * 1000.0, "direct path switched");
            }
            PathEvent::FellBack {
                peer,
                from,
                to,
                silent_for,
            } => {
                tracing::info!(%peer, %from, to = %to, silent_ms = silent_for.as_millis(), "direct path lost");
                // Perhaps this node's NAT rebound: its public address is
                // checked again, and peers told if it moved.
                self.discovery.probe_soon(now);
            }
            PathEvent::PingReply { peer, id, via, rtt } => {
                if let Some((_, reply)) = self.pings.remove(&id) {
                    let via = match via {
                        Path::Direct(a) => format!("direct {a}"),
                        Path::Relay(r) => format!("relay {}", self.region(r).unwrap_or_default()),
                        Path::None => "no path".into(),
                    };
                    let path_age = self
                        .pm
                        .status(&peer)
                        .map_or(Duration::ZERO, |s| now.saturating_duration_since(s.since));
                    let _ = reply.send(Ok(PingResult { via, rtt, path_age }));
                }
            }
            PathEvent::PingTimedOut { id, .. } => {
                if let Some((_, reply)) = self.pings.remove(&id) {
                    let _ = reply.send(Err("no answer".into()));
                }
            }
        }
    }
}
