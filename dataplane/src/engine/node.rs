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
//!
//! Key changes are make-before-break. When this node's key changes
//! ([`Node::set_private_key`]) or a peer's does (a peer set in which a new key
//! takes over exactly the allowed IPs of a removed one), the peer gets a new
//! `Tunn` under a new index and the old one stays as its *previous* session:
//! traffic keeps flowing on the old session while a handshake with the new
//! key is started at once, and moves to the new session as soon as it is up.
//! Datagrams for the old index still reach the old session for a short grace
//! time, so nothing in flight is lost. Both ends of a rotation do this, in
//! whichever order they learn of it.

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use ipnet::IpNet;

use rand_core::{OsRng, RngCore};

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

/// The longest a previous session is kept after a key change when the new
/// one never comes up (the other end did not learn the new key).
const HANDOVER_LIMIT: Duration = Duration::from_secs(60);

/// A peer that keeps sending on a session this node does not have (it
/// restarted) gets a new handshake at most this often.
const STALE_HANDSHAKE_INTERVAL: Duration = Duration::from_secs(5);

/// Datagrams for unknown sessions looked up by sender address per timer tick
/// (each lookup walks the peers), so a flood of junk costs little.
const STALE_LOOKUPS_PER_TICK: u32 = 8;

/// How long a previous session still receives after the new one is up:
/// datagrams the other end sent on it before it switched are in flight.
const HANDOVER_GRACE: Duration = Duration::from_secs(3);

/// Packets queued for a peer whose endpoint is not known yet, sent once it
/// is (the oldest are dropped beyond this, and counted as `no_endpoint`).
const PENDING_PACKETS: usize = 32;

/// Events kept for [`Node::poll_event`]; older ones are dropped beyond this.
const MAX_EVENTS: usize = 1024;

/// A relay connection of the driver's, by number (the NAT-traversal issue
/// gives them meaning; the node only passes the number back).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelayId(pub u16);

/// Where a peer's datagrams go and where one came from: a UDP address, or
/// a relay that carries them to and from the peer's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Endpoint {
    Udp(SocketAddr),
    Relay { relay: RelayId, peer: PublicKey },
}

impl Endpoint {
    /// The UDP address, if it is one.
    pub fn udp(self) -> Option<SocketAddr> {
        match self {
            Endpoint::Udp(a) => Some(a),
            Endpoint::Relay { .. } => None,
        }
    }

    /// The source address boringtun's cookie mechanism binds to; a relay
    /// has none.
    fn ip(self) -> Option<IpAddr> {
        self.udp().map(|a| a.ip())
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Udp(a) => write!(f, "{a}"),
            Endpoint::Relay { relay, .. } => write!(f, "relay {}", relay.0),
        }
    }
}

/// What happened that the node's owner may act on, from
/// [`Node::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The peer's endpoint was learned or moved: a handshake or an
    /// authenticated datagram came from elsewhere (configured endpoints
    /// are the owner's own and not reported).
    EndpointChanged { peer: PublicKey, endpoint: Endpoint },
    /// A handshake with the peer completed: a session is up.
    SessionUp { peer: PublicKey },
}

/// Where a [`Node`] puts what it produces. The driver flushes a batch to its
/// socket or device when it lacks room; tests collect the contents.
pub trait Sink {
    /// A send batch with room for a datagram of `len` bytes.
    fn udp(&mut self, len: usize) -> &mut UdpSendBatch;
    /// A TUN batch with room for one more packet.
    fn tun(&mut self) -> &mut TunBatch;
    /// A datagram for `peer` through relay `relay`.
    fn relay(&mut self, relay: RelayId, peer: &PublicKey, datagram: &[u8]);
    /// A datagram that is not WireGuard (NAT traversal's discovery and STUN
    /// share the socket, so that they see the same NAT mapping).
    fn other(&mut self, from: SocketAddr, datagram: &[u8]);
}

/// Whether `datagram` has WireGuard's shape: a message type of 1 to 4 in a
/// little-endian `u32` whose other bytes are zero.
pub fn is_wireguard(datagram: &[u8]) -> bool {
    matches!(datagram, [1..=4, 0, 0, 0, ..])
}

/// Sends `datagram` to `to` through `sink`.
fn send(sink: &mut impl Sink, to: Endpoint, datagram: &[u8]) {
    match to {
        Endpoint::Udp(addr) => {
            sink.udp(datagram.len()).push(addr, datagram);
        }
        Endpoint::Relay { relay, peer } => sink.relay(relay, &peer, datagram),
    }
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
    /// Inner packets for a peer whose endpoint is still unknown, beyond the
    /// few queued until it is.
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
    /// Datagrams that are not WireGuard, handed to [`Sink::other`].
    pub other_datagrams: u64,
}

/// What `wg show` prints about a peer.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerStatus {
    pub public_key: PublicKey,
    pub endpoint: Option<Endpoint>,
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
/// only place that sets it: every `Node` method first calls [`Clock::enter`]
/// with the caller's `now` before a call into a `Tunn` that may read the
/// clock, so boringtun sees exactly our time, and tests drive rekeying with a
/// fake clock. Each method runs to completion on one thread, so nodes sharing
/// a thread cannot see each other's time.
///
/// Moving data on an established session reads no clock (boringtun stamps
/// its timers with the time of the last `update_timers`): decapsulating a
/// data message, and encapsulating for a peer whose last encapsulation gave a
/// data message ([`Peer::sending`]). Those skip `enter`, whose thread-local
/// write costs a lone packet about 2 µs of cache misses after an idle wait.
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

/// A peer's state. Its `Tunn`s (11 KB each) are boxed so that the fields a
/// packet reads share a few cache lines instead of spanning pages.
struct Peer {
    config: PeerConfig,
    tunn: Box<Tunn>,
    /// Configured, set by the owner, or learned from the last
    /// authenticated datagram.
    endpoint: Option<Endpoint>,
    /// Inner packets that came before the endpoint, oldest first.
    pending: VecDeque<Vec<u8>>,
    keepalive: Option<Duration>,
    /// When we last sent this peer anything, for persistent keepalives.
    last_sent: Instant,
    /// The session from before a key change, while the new one comes up.
    previous: Option<Previous>,
    /// Start a handshake at the next timer tick (after a key change).
    initiate: bool,
    /// When a datagram for a session we lost last made us start one.
    stale_handshake: Option<Instant>,
    /// The last `encapsulate` on `tunn` gave a data message, and nothing
    /// since could have dropped its session (timers, handshake messages, a
    /// new `Tunn` reset this): the next one gives a data message again, which
    /// reads no clock (see [`Clock`]).
    sending: bool,
}

/// A peer's session under its previous key pair (see the module docs).
struct Previous {
    tunn: Box<Tunn>,
    /// The index its sessions carry; [`Node::aliases`] maps it to the peer.
    index: u32,
    /// Dropped then.
    until: Instant,
}

/// Whether `encapsulate` would use an established session rather than queue
/// the packet behind a handshake.
fn has_session(tunn: &Tunn) -> bool {
    tunn.time_since_last_handshake().is_some()
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
    /// The index of a peer's previous session → the peer's index.
    aliases: BTreeMap<u32, u32>,
    routes: AllowedIps<u32>,
    next_index: u32,
    next_tick: Instant,
    /// Where handshake messages are written before they are sent.
    scratch: Box<[u8]>,
    /// Lookups left this tick for [`Node::stale_session`].
    stale_lookups: u32,
    /// Grows whenever a peer's endpoint may have changed (see
    /// [`Node::endpoint_generation`]).
    endpoint_generation: u64,
    /// Some peer has pending packets and an endpoint: send them at the next
    /// timer call.
    flush_pending: bool,
    events: VecDeque<Event>,
    counters: Counters,
    /// See [`Node::set_roaming`].
    roaming: bool,
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
            aliases: BTreeMap::new(),
            routes: AllowedIps::new(),
            // A random start: after a restart, a peer's datagrams for the
            // sessions of the previous run then name unknown indices (and
            // get it a new handshake, see `stale_session`) rather than
            // indices of other peers.
            next_index: 1 + OsRng.next_u32() % 0x00ff_fffe,
            next_tick: now,
            scratch: vec![0; MAX_GSO_BYTES].into_boxed_slice(),
            stale_lookups: STALE_LOOKUPS_PER_TICK,
            endpoint_generation: 0,
            flush_pending: false,
            events: VecDeque::new(),
            counters: Counters::default(),
            roaming: true,
        }
    }

    /// With roaming off, a peer's endpoint changes only by
    /// [`Node::set_endpoint`] (or when it had none): the owner chooses the
    /// path (NAT traversal), and a datagram that came another way does not
    /// override that choice. Answers to handshakes still go where they came from.
    pub fn set_roaming(&mut self, on: bool) {
        self.roaming = on;
    }

    pub fn public_key(&self) -> PublicKey {
        self.private_key.public_key()
    }

    /// Replaces this node's key pair (a key rotation). Every peer gets a new
    /// session under the new key, negotiated at once; until it is up, traffic
    /// continues on the old one (see the module docs).
    pub fn set_private_key(&mut self, private_key: PrivateKey, now: Instant) {
        self.clock.enter(now);
        let secret = private_key.to_static_secret();
        self.public = boringtun::x25519::PublicKey::from(&secret);
        self.secret = secret;
        self.private_key = private_key;
        // MAC1 of handshakes is keyed by the receiver's public key.
        self.rate_limiter = Arc::new(RateLimiter::new(&self.public, HANDSHAKE_RATE_LIMIT));
        let indices: Vec<u32> = self.peers.keys().copied().collect();
        for index in indices {
            if let Some(config) = self.peers.get(&index).map(|p| p.config.clone()) {
                self.hand_over(index, &config, now);
            }
        }
        tracing::info!(public_key = %self.public_key(), "private key replaced");
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// A number that changes whenever the set of [`Node::endpoints`] may
    /// have: a driver that keeps something per endpoint compares it after
    /// each call instead of walking the peers.
    pub fn endpoint_generation(&self) -> u64 {
        self.endpoint_generation
    }

    /// The UDP endpoints of all peers that have one, configured or learned.
    pub fn endpoints(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.peers.values().filter_map(|p| p.endpoint?.udp())
    }

    /// The next event, oldest first (see [`Event`]).
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn event(events: &mut VecDeque<Event>, event: Event) {
        if events.len() >= MAX_EVENTS {
            events.pop_front();
        }
        events.push_back(event);
    }

    /// Sends the peer's datagrams to `endpoint` from now on (until the peer
    /// roams, or the configuration names another); what was queued for want
    /// of an endpoint leaves at the next timer call. `false` for a peer the
    /// node does not have.
    pub fn set_endpoint(&mut self, peer: &PublicKey, endpoint: Endpoint, now: Instant) -> bool {
        let Some(p) = self.by_key.get(peer).and_then(|i| self.peers.get_mut(i)) else {
            return false;
        };
        if p.endpoint != Some(endpoint) {
            p.endpoint = Some(endpoint);
            p.sending = false;
            self.endpoint_generation += 1;
        }
        if !p.pending.is_empty() {
            self.flush_pending = true;
            self.next_tick = self.next_tick.min(now);
        }
        true
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
        self.endpoint_generation += 1;
        // A new key that takes over exactly the allowed IPs of a removed one
        // is that peer after a key rotation: hand its session over instead
        // of starting from nothing.
        let mut successors: Vec<&PeerConfig> = Vec::new();
        for config in &diff.added {
            let prefixes = config.prefixes();
            let predecessor = diff.removed.iter().find(|key| {
                !prefixes.is_empty()
                    && self
                        .by_key
                        .get(key)
                        .and_then(|i| self.peers.get(i))
                        .is_some_and(|p| p.config.prefixes() == prefixes)
            });
            let Some(&old_key) = predecessor else {
                continue;
            };
            let Some(index) = self.by_key.remove(&old_key) else {
                continue;
            };
            let new_index = self.hand_over(index, config, now);
            self.by_key.insert(config.public_key, new_index);
            if let Some(peer) = self.peers.get_mut(&new_index) {
                if let Some(e) = config.endpoint {
                    peer.endpoint = Some(Endpoint::Udp(e));
                }
                peer.keepalive = keepalive(config.persistent_keepalive);
                peer.config = config.clone();
            }
            successors.push(config);
            tracing::debug!(old = %old_key, new = %config.public_key, "peer key rotated");
        }
        for key in &diff.removed {
            if let Some(index) = self.by_key.remove(key) {
                self.remove_peer(index);
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
                    *peer.tunn = fresh;
                }
            }
            let Some(peer) = self.peers.get_mut(&index) else {
                continue;
            };
            for c in &change.changes {
                match c {
                    // A configured endpoint wins; dropping it from the
                    // configuration keeps the one learned from the peer.
                    Change::Endpoint(Some(e)) => {
                        peer.endpoint = Some(Endpoint::Udp(*e));
                        peer.sending = false;
                        if !peer.pending.is_empty() {
                            self.flush_pending = true;
                            self.next_tick = self.next_tick.min(now);
                        }
                    }
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
            if successors.iter().any(|s| s.public_key == config.public_key) {
                continue;
            }
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
                    tunn: Box::new(tunn),
                    endpoint: config.endpoint.map(Endpoint::Udp),
                    pending: VecDeque::new(),
                    keepalive: keepalive(config.persistent_keepalive),
                    last_sent: now,
                    previous: None,
                    initiate: false,
                    stale_handshake: None,
                    sending: false,
                },
            );
            tracing::debug!(peer = %config.public_key, index, "peer added");
        }
    }

    fn remove_peer(&mut self, index: u32) {
        if let Some(peer) = self.peers.remove(&index) {
            if let Some(prev) = peer.previous {
                self.aliases.remove(&prev.index);
            }
        }
        self.routes.remove_value(|&i| i == index);
    }

    /// Moves the peer at `index` to a new index with a new `Tunn` for
    /// `config` (under the node's current key), keeping the session that
    /// works as its previous one; returns the new index. The caller updates
    /// `by_key` if the peer's key changed.
    fn hand_over(&mut self, index: u32, config: &PeerConfig, now: Instant) -> u32 {
        let Some(mut peer) = self.peers.remove(&index) else {
            return index;
        };
        let new_index = self.allocate_index_except(index);
        let fresh = self.new_tunn(config, new_index);
        let old = std::mem::replace(&mut peer.tunn, Box::new(fresh));
        // Keep whichever older session carries traffic: after two quick
        // rotations, that is the first one's.
        let keep_old = has_session(&old) || peer.previous.is_none();
        if keep_old {
            if let Some(prev) = peer.previous.take() {
                self.aliases.remove(&prev.index);
            }
            peer.previous = Some(Previous {
                tunn: old,
                index,
                until: now + HANDOVER_LIMIT,
            });
            self.aliases.insert(index, new_index);
        } else if let Some(prev) = &peer.previous {
            self.aliases.insert(prev.index, new_index);
        }
        peer.initiate = true;
        peer.sending = false;
        self.peers.insert(new_index, peer);
        let owned: Vec<IpNet> = self
            .routes
            .iter()
            .filter(|(_, &owner)| owner == index)
            .map(|(net, _)| net)
            .collect();
        for net in owned {
            self.routes.insert(net, new_index);
        }
        for key_index in self.by_key.values_mut() {
            if *key_index == index {
                *key_index = new_index;
            }
        }
        // The handshake goes out at the next timer call, not a tick later.
        self.next_tick = self.next_tick.min(now);
        new_index
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
        self.allocate_index_except(0)
    }

    fn allocate_index_except(&mut self, taken: u32) -> u32 {
        loop {
            let index = self.next_index;
            self.next_index = (self.next_index + 1) & 0x00ff_ffff;
            if index != 0
                && index != taken
                && !self.peers.contains_key(&index)
                && !self.aliases.contains_key(&index)
            {
                return index;
            }
        }
    }

    /// An inner packet read from the TUN: encrypted for the peer that routes
    /// its destination (or queued by boringtun while a handshake, which this
    /// starts, completes).
    pub fn handle_tun_packet(&mut self, packet: &[u8], sink: &mut impl Sink, now: Instant) {
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
            // Kept until the endpoint is known (the coordinator's next
            // message, or the peer's first handshake), as WireGuard keeps
            // packets during a handshake.
            if peer.pending.len() >= PENDING_PACKETS {
                peer.pending.pop_front();
                self.counters.no_endpoint += 1;
            }
            peer.pending.push_back(packet.to_vec());
            return;
        };
        // A handshake may start, or `has_session` reads the clock.
        if !peer.sending || peer.previous.is_some() {
            self.clock.enter(now);
        }
        // During a key change, the old session carries traffic until the
        // new one is up.
        let tunn = match &mut peer.previous {
            Some(prev) if !has_session(&peer.tunn) && has_session(&prev.tunn) => &mut prev.tunn,
            _ => &mut peer.tunn,
        };
        let mut data = false;
        let mut encapsulate = |buf: &mut [u8]| match tunn.encapsulate(packet, buf) {
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
        };
        match endpoint {
            // Straight into the send batch: consecutive datagrams to one
            // address leave in one GSO send.
            Endpoint::Udp(addr) => {
                sink.udp(len).push_with(addr, len, encapsulate);
            }
            Endpoint::Relay { relay, peer: key } => {
                let n = encapsulate(&mut self.scratch[..]);
                if n > 0 {
                    sink.relay(relay, &key, &self.scratch[..n]);
                }
            }
        }
        peer.last_sent = now;
        peer.sending = data;
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
        if !is_wireguard(datagram) {
            self.counters.other_datagrams += 1;
            sink.other(from, datagram);
            return;
        }
        self.handle_from(Endpoint::Udp(from), datagram, sink, now);
    }

    /// A datagram that relay `relay` carried from the peer with key `peer`
    /// (the relay vouches for the key; the datagram itself is
    /// authenticated as any other).
    pub fn handle_relayed(
        &mut self,
        relay: RelayId,
        peer: PublicKey,
        datagram: &[u8],
        sink: &mut impl Sink,
        now: Instant,
    ) {
        self.handle_from(Endpoint::Relay { relay, peer }, datagram, sink, now);
    }

    fn handle_from(&mut self, from: Endpoint, datagram: &[u8], sink: &mut impl Sink, now: Instant) {
        // Data messages read no clock (see [`Clock`]); the others may.
        let data = datagram.first() == Some(&4);
        if !data {
            self.clock.enter(now);
        }
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
        // A session of a peer's previous key pair (during a key change).
        let (index, previous) = match self.aliases.get(&index) {
            Some(&current) => (current, true),
            None => (index, false),
        };
        let Some(peer) = self.peers.get_mut(&index) else {
            self.counters.unknown_peer += 1;
            if data {
                self.stale_session(from, sink, now);
            }
            return;
        };
        // A relay names the sender; a datagram of another peer's session
        // through it would send that peer's answers to the wrong key.
        if matches!(from, Endpoint::Relay { peer: key, .. } if key != peer.config.public_key) {
            self.counters.unknown_peer += 1;
            return;
        }
        if data {
            self.decrypt_data(index, previous, from, datagram, sink);
            return;
        }
        // A handshake message can replace or drop sessions.
        peer.sending = false;
        let tunn = match (&mut peer.previous, previous) {
            (Some(prev), true) => &mut prev.tunn,
            (None, true) => {
                self.counters.unknown_peer += 1;
                return;
            }
            (_, false) => &mut peer.tunn,
        };
        match tunn.decapsulate(from.ip(), datagram, &mut self.scratch) {
            TunnResult::WriteToNetwork(reply) => {
                // An initiation answered, or a response that completes ours.
                let key = peer.config.public_key;
                Self::event(&mut self.events, Event::SessionUp { peer: key });
                if peer.endpoint != Some(from) && (self.roaming || peer.endpoint.is_none()) {
                    peer.endpoint = Some(from);
                    self.endpoint_generation += 1;
                    Self::event(
                        &mut self.events,
                        Event::EndpointChanged {
                            peer: key,
                            endpoint: from,
                        },
                    );
                    if !peer.pending.is_empty() {
                        self.flush_pending = true;
                        self.next_tick = self.next_tick.min(now);
                    }
                }
                peer.last_sent = now;
                send(sink, from, reply);
                // A completed handshake releases what boringtun queued.
                while let TunnResult::WriteToNetwork(queued) =
                    tunn.decapsulate(None, &[], &mut self.scratch)
                {
                    send(sink, from, queued);
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

    /// Data for a session this node does not know, from a peer's endpoint:
    /// the peer still uses a session from before this node restarted, and
    /// would wait for its own timeout (15 s) to notice. A handshake now
    /// moves it to a new session. The datagram is not authenticated, so
    /// this only ever sends the peer a handshake initiation, rarely.
    fn stale_session(&mut self, from: Endpoint, sink: &mut impl Sink, now: Instant) {
        if self.stale_lookups == 0 {
            return;
        }
        self.stale_lookups -= 1;
        let Some(peer) = self.peers.values_mut().find(|p| p.endpoint == Some(from)) else {
            return;
        };
        if peer
            .stale_handshake
            .is_some_and(|t| now.saturating_duration_since(t) < STALE_HANDSHAKE_INTERVAL)
        {
            return;
        }
        peer.stale_handshake = Some(now);
        peer.sending = false;
        self.clock.enter(now);
        if let TunnResult::WriteToNetwork(p) = peer
            .tunn
            .format_handshake_initiation(&mut self.scratch, false)
        {
            tracing::debug!(peer = %peer.config.public_key, "peer uses a session this node lost: new handshake");
            send(sink, from, p);
            peer.last_sent = now;
        }
    }

    /// Finds the peer a handshake initiation comes from. Under load, a cookie
    /// reply is sent instead and `None` returned.
    fn initiator(&mut self, from: Endpoint, datagram: &[u8], sink: &mut impl Sink) -> Option<u32> {
        // The MAC and load check first: decrypting the initiation costs a
        // Diffie-Hellman, which unauthenticated senders must not get for free.
        let mut cookie = [0u8; 64];
        let packet = match self
            .rate_limiter
            .verify_packet(from.ip(), datagram, &mut cookie)
        {
            Ok(Packet::HandshakeInit(p)) => p,
            Ok(_) => return None,
            Err(TunnResult::WriteToNetwork(reply)) => {
                send(sink, from, reply);
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

    /// Decrypts a data datagram of peer `index`, with its previous session's
    /// `Tunn` if `previous`.
    fn decrypt_data(
        &mut self,
        index: u32,
        previous: bool,
        from: Endpoint,
        datagram: &[u8],
        sink: &mut impl Sink,
    ) {
        let Node {
            peers,
            routes,
            counters,
            endpoint_generation,
            events,
            flush_pending,
            roaming,
            ..
        } = self;
        let Some(peer) = peers.get_mut(&index) else {
            return;
        };
        let tunn = match (&mut peer.previous, previous) {
            (Some(prev), true) => &mut prev.tunn,
            (None, true) => {
                counters.unknown_peer += 1;
                return;
            }
            (_, false) => &mut peer.tunn,
        };
        let public_key = &peer.config.public_key;
        let mut authenticated = false;
        sink.tun().push_with(|buf| {
            let (packet, src) = match tunn.decapsulate(from.ip(), datagram, buf) {
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
                tracing::trace!(%src, peer = %public_key, "spoofed source");
                counters.spoofed += 1;
                return 0;
            }
            counters.rx_packets += 1;
            packet.len()
        });
        if authenticated && peer.endpoint != Some(from) && (*roaming || peer.endpoint.is_none()) {
            tracing::debug!(peer = %peer.config.public_key, endpoint = %from, "peer roamed");
            peer.endpoint = Some(from);
            peer.sending = false;
            *endpoint_generation += 1;
            *flush_pending |= !peer.pending.is_empty();
            Self::event(
                events,
                Event::EndpointChanged {
                    peer: peer.config.public_key,
                    endpoint: from,
                },
            );
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
        if std::mem::take(&mut self.flush_pending) {
            let queued: Vec<Vec<u8>> = self
                .peers
                .values_mut()
                .filter(|p| p.endpoint.is_some())
                .flat_map(|p| std::mem::take(&mut p.pending))
                .collect();
            for packet in queued {
                self.handle_tun_packet(&packet, sink, now);
            }
        }
        // Tunns given a shared limiter leave its reset to us; it keeps its own
        // one-second period.
        self.rate_limiter.reset_count();
        self.stale_lookups = STALE_LOOKUPS_PER_TICK;
        let mut retired = Vec::new();
        for peer in self.peers.values_mut() {
            // The timers may expire the session.
            peer.sending = false;
            let endpoint = peer.endpoint;
            if let Some(prev) = &mut peer.previous {
                if has_session(&peer.tunn) {
                    prev.until = prev.until.min(now + HANDOVER_GRACE);
                }
                if now >= prev.until {
                    retired.push(prev.index);
                    peer.previous = None;
                }
            }
            if std::mem::take(&mut peer.initiate) {
                if let Some(e) = endpoint {
                    if let TunnResult::WriteToNetwork(p) = peer
                        .tunn
                        .format_handshake_initiation(&mut self.scratch, false)
                    {
                        send(sink, e, p);
                        peer.last_sent = now;
                    }
                }
            }
            match peer.tunn.update_timers(&mut self.scratch) {
                TunnResult::WriteToNetwork(p) => {
                    if let Some(e) = endpoint {
                        send(sink, e, p);
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
                    send(sink, e, p);
                }
                peer.last_sent = now;
            }
        }
        for index in retired {
            self.aliases.remove(&index);
        }
    }
}

fn keepalive(seconds: Option<u16>) -> Option<Duration> {
    seconds
        .filter(|&s| s != 0)
        .map(|s| Duration::from_secs(u64::from(s)))
}
