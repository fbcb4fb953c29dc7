//! The data-plane core: peers, routing and WireGuard sessions, without I/O.
//!
//! A [`Node`] is fed inner packets from the TUN ([`Node::handle_tun_packet`]),
//! datagrams from the network ([`Node::handle_datagram`]) and the time
//! ([`Node::handle_timeout`], due at [`Node::poll_timeout`]); what it produces
//! goes into the batches of a [`Sink`]. The driver owns the sockets and calls
//! these in any order, always with a monotonic `now`.
//!
//! Sessions are boringtun's `noise::Tunn`, one per peer. Incoming datagrams
//! are demultiplexed to a peer by the receiver index boringtun puts in every
//! session (`peer index << 8 | n`), or, for a handshake initiation, by the
//! sender's static key, which only decrypting the initiation reveals.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use ipnet::IpNet;

use crate::allowed_ips::AllowedIps;
use crate::keys::{PrivateKey, PublicKey};
use crate::peers::{self, Change, PeerConfig, PeerDiff, PeerError};
use crate::tun::TunBatch;
use crate::udp::{UdpSendBatch, MAX_GSO_BYTES};

/// WireGuard's data message overhead: type, receiver index, counter, tag.
const DATA_OVERHEAD: usize = 32;

/// The size of a handshake initiation, the largest message boringtun may
/// write instead of the data packet asked for.
const HANDSHAKE_INIT_LEN: usize = 148;

/// How often boringtun's timers want to run (its own device uses 250 ms;
/// every WireGuard timer is a multiple of seconds).
const TIMER_TICK: Duration = Duration::from_millis(250);

/// Handshake initiations per second accepted before cookies are demanded
/// (boringtun's default per device).
const HANDSHAKE_RATE_LIMIT: u64 = 10;

/// Where a [`Node`] puts what it produces. The driver flushes a batch to its
/// socket or device when it lacks room; tests collect the contents.
pub trait Sink {
    /// A send batch with room for a datagram of `len` bytes.
    fn udp(&mut self, len: usize) -> &mut UdpSendBatch;
    /// A TUN batch with room for one more packet.
    fn tun(&mut self) -> &mut TunBatch;
}

/// Packet counters of a node; drops are counted by cause.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Inner packets encrypted and queued for the network.
    pub tx_packets: u64,
    /// Inner packets decrypted and queued for the TUN.
    pub rx_packets: u64,
    /// Inner packets whose destination no peer's allowed IPs cover.
    pub no_route: u64,
    /// Inner packets for a peer whose endpoint is still unknown.
    pub no_endpoint: u64,
    /// Inner packets that are not IP, or too large to encrypt.
    pub bad_inner: u64,
    /// Datagrams that are not WireGuard or failed authentication, replays
    /// included.
    pub bad_datagram: u64,
    /// Datagrams for a session index or static key we do not know.
    pub unknown_peer: u64,
    /// Decrypted packets whose source the sending peer may not use.
    pub spoofed: u64,
    /// Cookie replies sent because handshakes came too fast.
    pub cookies_sent: u64,
}

/// What `wg show` prints about a peer.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerStatus {
    pub public_key: PublicKey,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    /// Time since the last completed handshake.
    pub last_handshake: Option<Duration>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    /// Seconds between persistent keepalives; `None` when off.
    pub persistent_keepalive: Option<u16>,
}

/// The clock boringtun reads.
///
/// boringtun's timers, handshake and rate limiter call `Instant::now()`
/// themselves. Built with its `mock-instant` feature, that `Instant` is
/// `mock_instant`'s, whose "now" is a thread-local value we set. This is the
/// only place that sets it: every `Node` method that reaches a `Tunn` first
/// calls [`Clock::enter`] with the caller's `now`, so boringtun sees exactly
/// our time, and tests drive rekeying with a fake clock. Each method runs to
/// completion on one thread, so nodes sharing a thread cannot see each
/// other's time.
#[derive(Debug)]
struct Clock {
    epoch: Instant,
    last: Duration,
}

impl Clock {
    /// boringtun subtracts durations of up to a few minutes from its
    /// instants; starting the clock an hour in keeps those from underflowing.
    const BASE: Duration = Duration::from_secs(3600);

    fn new(now: Instant) -> Self {
        let mut clock = Clock {
            epoch: now,
            last: Duration::ZERO,
        };
        clock.enter(now);
        clock
    }

    fn enter(&mut self, now: Instant) {
        // boringtun panics on time running backwards; never let it.
        self.last = self.last.max(now.saturating_duration_since(self.epoch));
        mock_instant::MockClock::set_time(Self::BASE + self.last);
    }
}

struct Peer {
    config: PeerConfig,
    tunn: Tunn,
    /// Configured, or learned from the last authenticated datagram.
    endpoint: Option<SocketAddr>,
    keepalive: Option<Duration>,
    /// When we last sent this peer anything, for persistent keepalives.
    last_sent: Instant,
}

/// The data-plane state of one node: its key, its peers and their sessions,
/// and the routing table from inner addresses to peers.
pub struct Node {
    private_key: PrivateKey,
    secret: boringtun::x25519::StaticSecret,
    public: boringtun::x25519::PublicKey,
    clock: Clock,
    rate_limiter: Arc<RateLimiter>,
    /// By boringtun index (the top 24 bits of every session index).
    peers: BTreeMap<u32, Peer>,
    by_key: BTreeMap<PublicKey, u32>,
    routes: AllowedIps<u32>,
    next_index: u32,
    next_tick: Instant,
    /// Where handshake messages are written before they are sent.
    scratch: Box<[u8]>,
    counters: Counters,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("public_key", &self.private_key.public_key())
            .field("peers", &self.by_key.keys().collect::<Vec<_>>())
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl Node {
    pub fn new(private_key: PrivateKey, now: Instant) -> Self {
        let clock = Clock::new(now);
        let secret = private_key.to_static_secret();
        let public = boringtun::x25519::PublicKey::from(&secret);
        Node {
            rate_limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            private_key,
            secret,
            public,
            clock,
            peers: BTreeMap::new(),
            by_key: BTreeMap::new(),
            routes: AllowedIps::new(),
            next_index: 1,
            next_tick: now,
            scratch: vec![0; MAX_GSO_BYTES].into_boxed_slice(),
            counters: Counters::default(),
        }
    }

    pub fn public_key(&self) -> PublicKey {
        self.private_key.public_key()
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// The configured peers, sorted by public key.
    pub fn peer_configs(&self) -> Vec<PeerConfig> {
        self.by_key
            .values()
            .filter_map(|i| self.peers.get(i))
            .map(|p| p.config.clone())
            .collect()
    }

    /// Every allowed-IP prefix of every peer: what the TUN must route.
    pub fn prefixes(&self) -> Vec<IpNet> {
        self.routes.iter().map(|(net, _)| net).collect()
    }

    pub fn peer_status(&mut self, now: Instant) -> Vec<PeerStatus> {
        self.clock.enter(now);
        self.by_key
            .values()
            .filter_map(|i| self.peers.get(i))
            .map(|p| {
                let (last_handshake, tx, rx, _, _) = p.tunn.stats();
                PeerStatus {
                    public_key: p.config.public_key,
                    endpoint: p.endpoint,
                    allowed_ips: p.config.allowed_ips.clone(),
                    last_handshake,
                    tx_bytes: tx as u64,
                    rx_bytes: rx as u64,
                    persistent_keepalive: p.config.persistent_keepalive.filter(|&s| s != 0),
                }
            })
            .collect()
    }

    /// Makes `peers` the peer set, touching only what differs: sessions of
    /// unchanged peers continue. On error nothing changes.
    pub fn set_peers(&mut self, peers: &[PeerConfig], now: Instant) -> Result<(), PeerError> {
        let diff = peers::diff(&self.peer_configs(), peers)?;
        self.apply(&diff, peers, now);
        Ok(())
    }

    fn apply(&mut self, diff: &PeerDiff, new: &[PeerConfig], now: Instant) {
        self.clock.enter(now);
        for key in &diff.removed {
            if let Some(index) = self.by_key.remove(key) {
                self.peers.remove(&index);
                self.routes.remove_value(|&i| i == index);
                tracing::debug!(peer = %key, "peer removed");
            }
        }
        for change in &diff.changed {
            let Some(&index) = self.by_key.get(&change.public_key) else {
                continue;
            };
            let Some(config) = new.iter().find(|p| p.public_key == change.public_key) else {
                continue;
            };
            if change.resets_session() {
                // A new preshared key changes the handshake itself.
                let fresh = self.new_tunn(config, index);
                if let Some(peer) = self.peers.get_mut(&index) {
                    peer.tunn = fresh;
                }
            }
            let Some(peer) = self.peers.get_mut(&index) else {
                continue;
            };
            for c in &change.changes {
                match c {
                    // A configured endpoint wins; dropping it from the
                    // configuration keeps the one learned from the peer.
                    Change::Endpoint(Some(e)) => peer.endpoint = Some(*e),
                    Change::Endpoint(None) => {}
                    Change::AllowedIps { added, removed } => {
                        for net in removed {
                            self.routes.remove(*net);
                        }
                        for net in added {
                            self.routes.insert(*net, index);
                        }
                    }
                    Change::PersistentKeepalive(k) => peer.keepalive = keepalive(*k),
                    Change::PresharedKey(_) => {}
                }
            }
            peer.config = config.clone();
            tracing::debug!(peer = %change.public_key, "peer changed");
        }
        for config in &diff.added {
            let index = self.allocate_index();
            let tunn = self.new_tunn(config, index);
            for net in &config.allowed_ips {
                self.routes.insert(*net, index);
            }
            self.by_key.insert(config.public_key, index);
            self.peers.insert(
                index,
                Peer {
                    config: config.clone(),
                    tunn,
                    endpoint: config.endpoint,
                    keepalive: keepalive(config.persistent_keepalive),
                    last_sent: now,
                },
            );
            tracing::debug!(peer = %config.public_key, index, "peer added");
        }
    }

    fn new_tunn(&self, config: &PeerConfig, index: u32) -> Tunn {
        Tunn::new(
            self.secret.clone(),
            config.public_key.to_x25519(),
            config.preshared_key.as_ref().map(|k| *k.as_bytes()),
            // Persistent keepalives are ours (see handle_timeout), so the
            // interval can change without a new session.
            None,
            index,
            Some(self.rate_limiter.clone()),
        )
    }

    /// Session indices carry the peer index in 24 bits; a fresh one for each
    /// peer keeps stale datagrams of a removed peer from reaching its successor.
    fn allocate_index(&mut self) -> u32 {
        loop {
            let index = self.next_index;
            self.next_index = (self.next_index + 1) & 0x00ff_ffff;
            if index != 0 && !self.peers.contains_key(&index) {
                return index;
            }
        }
    }

    /// An inner packet read from the TUN: encrypted for the peer that routes
    /// its destination (or queued by boringtun while a handshake, which this
    /// starts, completes).
    pub fn handle_tun_packet(&mut self, packet: &[u8], sink: &mut impl Sink, now: Instant) {
        self.clock.enter(now);
        let Some(dst) = Tunn::dst_address(packet) else {
            self.counters.bad_inner += 1;
            return;
        };
        let len = (packet.len() + DATA_OVERHEAD).max(HANDSHAKE_INIT_LEN);
        if len > MAX_GSO_BYTES {
            self.counters.bad_inner += 1;
            return;
        }
        let Some(&index) = self.routes.longest_match(dst) else {
            tracing::trace!(%dst, "no route");
            self.counters.no_route += 1;
            return;
        };
        let Some(peer) = self.peers.get_mut(&index) else {
            self.counters.no_route += 1;
            return;
        };
        let Some(endpoint) = peer.endpoint else {
            self.counters.no_endpoint += 1;
            return;
        };
        let mut data = false;
        sink.udp(len).push_with(endpoint, len, |buf| {
            match peer.tunn.encapsulate(packet, buf) {
                TunnResult::WriteToNetwork(out) => {
                    // A handshake initiation instead means the packet was queued.
                    data = out.first() == Some(&4);
                    out.len()
                }
                TunnResult::Err(e) => {
                    tracing::trace!(error = ?e, "encapsulate failed");
                    0
                }
                _ => 0,
            }
        });
        peer.last_sent = now;
        if data {
            self.counters.tx_packets += 1;
        }
    }

    /// A datagram from the network: data is decrypted into the TUN batch,
    /// handshakes are answered, and the peer's endpoint follows the address
    /// of every authenticated datagram (roaming).
    pub fn handle_datagram(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        sink: &mut impl Sink,
        now: Instant,
    ) {
        self.clock.enter(now);
        let index = match Tunn::parse_incoming_packet(datagram) {
            Ok(Packet::PacketData(p)) => p.receiver_idx >> 8,
            Ok(Packet::HandshakeResponse(p)) => p.receiver_idx >> 8,
            Ok(Packet::PacketCookieReply(p)) => p.receiver_idx >> 8,
            Ok(Packet::HandshakeInit(_)) => match self.initiator(from, datagram, sink) {
                Some(index) => index,
                None => return,
            },
            Err(_) => {
                self.counters.bad_datagram += 1;
                return;
            }
        };
        let Some(peer) = self.peers.get_mut(&index) else {
            self.counters.unknown_peer += 1;
            return;
        };
        if datagram.first() == Some(&4) {
            self.decrypt_data(index, from, datagram, sink);
            return;
        }
        match peer
            .tunn
            .decapsulate(Some(from.ip()), datagram, &mut self.scratch)
        {
            TunnResult::WriteToNetwork(reply) => {
                peer.endpoint = Some(from);
                peer.last_sent = now;
                let len = reply.len();
                sink.udp(len).push(from, reply);
                // A completed handshake releases what boringtun queued.
                while let TunnResult::WriteToNetwork(queued) =
                    peer.tunn.decapsulate(None, &[], &mut self.scratch)
                {
                    sink.udp(queued.len()).push(from, queued);
                    self.counters.tx_packets += 1;
                }
            }
            // A cookie reply: it proves nothing about where the peer is.
            TunnResult::Done => {}
            TunnResult::Err(e) => {
                tracing::trace!(error = ?e, %from, "handshake message rejected");
                self.counters.bad_datagram += 1;
            }
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
        }
    }

    /// Finds the peer a handshake initiation comes from. Under load, a cookie
    /// reply is sent instead and `None` returned.
    fn initiator(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        sink: &mut impl Sink,
    ) -> Option<u32> {
        // The MAC and load check first: decrypting the initiation costs a
        // Diffie-Hellman, which unauthenticated senders must not get for free.
        let mut cookie = [0u8; 64];
        let packet = match self
            .rate_limiter
            .verify_packet(Some(from.ip()), datagram, &mut cookie)
        {
            Ok(Packet::HandshakeInit(p)) => p,
            Ok(_) => return None,
            Err(TunnResult::WriteToNetwork(reply)) => {
                sink.udp(reply.len()).push(from, reply);
                self.counters.cookies_sent += 1;
                return None;
            }
            Err(_) => {
                self.counters.bad_datagram += 1;
                return None;
            }
        };
        match parse_handshake_anon(&self.secret, &self.public, &packet) {
            Ok(half) => {
                let key = PublicKey::from_bytes(half.peer_static_public);
                let index = self.by_key.get(&key).copied();
                if index.is_none() {
                    tracing::trace!(peer = %key, "handshake from unknown peer");
                    self.counters.unknown_peer += 1;
                }
                index
            }
            Err(_) => {
                self.counters.bad_datagram += 1;
                None
            }
        }
    }

    fn decrypt_data(
        &mut self,
        index: u32,
        from: SocketAddr,
        datagram: &[u8],
        sink: &mut impl Sink,
    ) {
        let Node {
            peers,
            routes,
            counters,
            ..
        } = self;
        let Some(peer) = peers.get_mut(&index) else {
            return;
        };
        let mut authenticated = false;
        sink.tun().push_with(|buf| {
            let (packet, src) = match peer.tunn.decapsulate(Some(from.ip()), datagram, buf) {
                TunnResult::WriteToTunnelV4(p, src) => (p, IpAddr::V4(src)),
                TunnResult::WriteToTunnelV6(p, src) => (p, IpAddr::V6(src)),
                // A keepalive.
                TunnResult::Done => {
                    authenticated = true;
                    return 0;
                }
                TunnResult::Err(e) => {
                    tracing::trace!(error = ?e, %from, "data rejected");
                    counters.bad_datagram += 1;
                    return 0;
                }
                TunnResult::WriteToNetwork(_) => return 0,
            };
            authenticated = true;
            if routes.longest_match(src) != Some(&index) {
                tracing::trace!(%src, peer = %peer.config.public_key, "spoofed source");
                counters.spoofed += 1;
                return 0;
            }
            counters.rx_packets += 1;
            packet.len()
        });
        if authenticated && peer.endpoint != Some(from) {
            tracing::debug!(peer = %peer.config.public_key, endpoint = %from, "peer roamed");
            peer.endpoint = Some(from);
        }
    }

    /// When [`Node::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Instant {
        self.next_tick
    }

    /// Runs the WireGuard timers: handshake retries, rekeying, keepalives,
    /// session expiry.
    pub fn handle_timeout(&mut self, sink: &mut impl Sink, now: Instant) {
        if now < self.next_tick {
            return;
        }
        self.clock.enter(now);
        self.next_tick = now + TIMER_TICK;
        // Tunns given a shared limiter leave its reset to us; it keeps its own
        // one-second period.
        self.rate_limiter.reset_count();
        for peer in self.peers.values_mut() {
            let endpoint = peer.endpoint;
            match peer.tunn.update_timers(&mut self.scratch) {
                TunnResult::WriteToNetwork(p) => {
                    if let Some(e) = endpoint {
                        sink.udp(p.len()).push(e, p);
                        peer.last_sent = now;
                    }
                }
                TunnResult::Err(e) => tracing::trace!(error = ?e, "timer"),
                _ => {}
            }
            let (Some(interval), Some(e)) = (peer.keepalive, endpoint) else {
                continue;
            };
            if now.saturating_duration_since(peer.last_sent) >= interval {
                if let TunnResult::WriteToNetwork(p) = peer.tunn.encapsulate(&[], &mut self.scratch)
                {
                    sink.udp(p.len()).push(e, p);
                }
                peer.last_sent = now;
            }
        }
    }
}

fn keepalive(seconds: Option<u16>) -> Option<Duration> {
    seconds
        .filter(|&s| s != 0)
        .map(|s| Duration::from_secs(u64::from(s)))
}
