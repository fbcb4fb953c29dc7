//! Path selection for NAT traversal, sans-IO: per peer, whether WireGuard
//! sends through the relay or directly, and to which address
//! (docs/disco-protocol.md has the packets and the rules).
//!
//! The driver feeds [`PathManager`] what it learns — its own endpoint
//! candidates, the peers and their candidates and home relays from the
//! coordinator, the disco packets that arrive (told apart from WireGuard
//! with [`meshd_proto::disco::is_disco`]), relay latencies, data activity —
//! always with `now`, and carries out what comes out: [`Transmit`]s (from
//! the WireGuard UDP socket, so the NAT mapping is the one WireGuard uses,
//! or through a relay), [`Action`]s (set a peer's WireGuard endpoint, change
//! the home relay) and [`PathEvent`]s (for logs and status). It never reads
//! a clock or touches a socket; randomness (nonces, transaction ids) comes
//! from the seed, so a run is reproducible.
//!
//! Calling order: after every `handle_*`, `upsert_peer`, `set_*`, `ping` or
//! `note_activity`, drain [`PathManager::poll_transmit`],
//! [`PathManager::poll_action`] and [`PathManager::poll_event`]; call
//! [`PathManager::handle_timeout`] when [`PathManager::poll_timeout`] is
//! due. `now` must not go backwards.
//!
//! Its decision is the only authority over a managed peer's endpoint: the
//! data plane's roaming must be off for these peers, or the two would fight.
//!
//! The birthday technique (docs/disco-protocol.md, "The birthday
//! technique") reaches a peer behind a NAT that filters per address and
//! port when our NAT maps per destination, or the other way round. The
//! driver says whether our mapping varies and what our public address is
//! ([`PathManager::set_public`]); the hard side asks for extra local
//! sockets ([`Action::OpenSocket`], closed again with
//! [`Action::CloseSocket`]), packets leave from the socket named in
//! [`Transmit::from`], arrive through [`PathManager::handle_udp_on`], and a
//! direct path found through an extra socket is set with that socket in
//! [`Action::SetEndpoint`] (the data plane must send the peer's datagrams
//! from it, as only it holds the punched mapping). [`BirthdayConfig`]
//! bounds sockets, probes, their rate and the time spent.

mod peer;
mod relay;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshd_proto::disco::{self, DiscoError, DiscoKeys};
use meshd_proto::NodeKey;
use rand::rngs::StdRng;
use rand::SeedableRng;
use x25519_dalek::StaticSecret;

use peer::Peer;
use relay::RelayChoice;

/// A relay, numbered as the driver numbers them (the data plane's
/// `RelayId` has the same meaning).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelayId(pub u16);

impl fmt::Display for RelayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "relay {}", self.0)
    }
}

/// Where a packet goes: a UDP address from the WireGuard socket, or a relay
/// that carries it to the peer's key. Also what the WireGuard engine's
/// endpoint for a peer is set to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Endpoint {
    Udp(SocketAddr),
    Relay { relay: RelayId, peer: NodeKey },
}

/// The path WireGuard uses for a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// No relay known and no direct path proven: packets for it wait.
    None,
    Relay(RelayId),
    Direct(SocketAddr),
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::None => f.write_str("no path"),
            Path::Relay(r) => write!(f, "via {r}"),
            Path::Direct(a) => write!(f, "direct {a}"),
        }
    }
}

/// A local UDP socket: [`SocketId::MAIN`] is WireGuard's, the others are
/// the extra sockets of the birthday technique, numbered by the manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SocketId(pub u32);

impl SocketId {
    pub const MAIN: SocketId = SocketId(0);
}

/// A disco packet to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// The local socket it leaves from (meaningless for a relay).
    pub from: SocketId,
    pub to: Endpoint,
    pub packet: Vec<u8>,
}

/// Something the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Point the peer's WireGuard endpoint here (`Node::set_endpoint`),
    /// its datagrams leaving from local socket `from` (for a relay, always
    /// [`SocketId::MAIN`]).
    SetEndpoint {
        peer: NodeKey,
        endpoint: Endpoint,
        from: SocketId,
    },
    /// Open an extra UDP socket on a new local port, for the birthday
    /// technique; packets that arrive on it go to
    /// [`PathManager::handle_udp_on`]. One that cannot be opened is simply
    /// never used (what is sent from it is lost).
    OpenSocket(SocketId),
    /// Close an extra socket: it did not win, or its path is gone.
    CloseSocket(SocketId),
    /// Connect to this relay as the node's home and report it to the
    /// coordinator, so peers send relayed packets there.
    SetHomeRelay(RelayId),
}

/// What happened, for logs and status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathEvent {
    /// The first direct path since the peer was relayed (or added), `after`
    /// that began.
    Upgraded {
        peer: NodeKey,
        addr: SocketAddr,
        after: Duration,
        rtt: Duration,
    },
    /// Another direct path: faster over several samples, or the old one
    /// stopped answering while this one answers.
    Switched {
        peer: NodeKey,
        from: SocketAddr,
        to: SocketAddr,
        rtt: Duration,
    },
    /// The direct path stopped answering: back to the relay (or to no path,
    /// without one) after `silent_for` without a pong.
    FellBack {
        peer: NodeKey,
        from: SocketAddr,
        to: Path,
        silent_for: Duration,
    },
    /// The answer to [`PathManager::ping`] number `id`.
    PingReply {
        peer: NodeKey,
        id: u64,
        via: Path,
        rtt: Duration,
    },
    PingTimedOut {
        peer: NodeKey,
        id: u64,
    },
}

/// A peer's path, for `meshd status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    pub path: Path,
    /// The current path's round-trip time (median of the recent pongs).
    pub rtt: Option<Duration>,
    /// When the path last changed.
    pub since: Instant,
    /// The candidates known for the peer, in address order.
    pub candidates: Vec<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error(transparent)]
    Disco(#[from] DiscoError),
    #[error("disco packet from {0}, which is not a peer")]
    UnknownPeer(NodeKey),
    #[error("the relay says the packet is from {relayed}, but it is sealed as from {sealed}")]
    RelayMismatch { relayed: NodeKey, sealed: NodeKey },
    #[error("peer {0} has neither a direct path nor a relay")]
    NoPath(NodeKey),
}

/// The timings and bounds of path selection. The defaults detect a dead
/// direct path within 3 s and keep NAT mappings alive well under the usual
/// 30 s timeout of unreplied UDP.
#[derive(Debug, Clone)]
pub struct PathConfig {
    /// While the peer is in use, the active direct path is pinged this often.
    pub heartbeat: Duration,
    /// While it is idle, this often: enough to hold the NAT mappings open.
    pub keepalive: Duration,
    /// A ping on the active path unanswered this long makes it suspect: it
    /// is pinged every `suspect_interval`, and another direct path that
    /// answers meanwhile takes over at once.
    pub suspect_after: Duration,
    pub suspect_interval: Duration,
    /// A ping on the active path unanswered this long makes it dead.
    pub dead_after: Duration,
    /// A peer without data activity (or pings asked for) this long is idle:
    /// no heartbeats, only keepalives, and no re-probing while relayed.
    pub idle_after: Duration,
    /// While not direct, probes (pings to every candidate and a
    /// call-me-maybe) start at this interval and double up to
    /// `reprobe_relayed`.
    pub reprobe_min: Duration,
    pub reprobe_relayed: Duration,
    /// While direct and in use, the other candidates are probed this often,
    /// to find a faster path.
    pub reprobe_direct: Duration,
    /// Pings forgotten after this long.
    pub ping_timeout: Duration,
    /// A direct path that answered within this is a fallback if the active
    /// one dies.
    pub alive_for: Duration,
    /// A direct path replaces the active one only when each of
    /// `switch_samples` pongs in a row beats the active path's RTT by at
    /// least `switch_margin` and `switch_percent` % of it.
    pub switch_margin: Duration,
    pub switch_percent: u32,
    pub switch_samples: u32,
    /// Candidates kept per peer (from the coordinator, from call-me-maybes
    /// and learned from pings together).
    pub max_candidates: usize,
    /// Pings in flight per peer; the oldest is forgotten beyond this.
    pub max_outstanding: usize,
    pub birthday: BirthdayConfig,
}

/// The bounds of the birthday technique. With `sockets` mappings open on
/// the hard side among the ~64 000 ports a NAT picks from, each probe hits
/// with a chance of about `sockets / 64 512`, so `probes` probes succeed
/// with a chance of about `1 - exp(-sockets * probes / 64 512)`: 98 % for
/// 256 sockets and 1024 probes (docs/disco-protocol.md has the measurements).
#[derive(Debug, Clone)]
pub struct BirthdayConfig {
    pub enabled: bool,
    /// Extra sockets the hard side opens, for all its peers together.
    pub sockets: u32,
    /// Probes the easy side sends in one attempt.
    pub probes: u32,
    /// Probes per second, for all peers together (one attempt at a time).
    pub probe_rate: u32,
    /// An attempt ends this long after it began, hit or not: the hard side
    /// closes its sockets, the easy side stops probing.
    pub timeout: Duration,
    /// The hard side offers an attempt once the peer has been relayed this
    /// long (so peers that ordinary probing reaches never pay for it) and
    /// then at most once per `retry_after` while the peer is in use.
    pub after: Duration,
    pub retry_after: Duration,
}

impl Default for BirthdayConfig {
    fn default() -> Self {
        BirthdayConfig {
            enabled: true,
            sockets: 256,
            probes: 1024,
            probe_rate: 250,
            timeout: Duration::from_secs(8),
            after: Duration::from_secs(2),
            retry_after: Duration::from_secs(60),
        }
    }
}

impl Default for PathConfig {
    fn default() -> Self {
        PathConfig {
            heartbeat: Duration::from_secs(1),
            keepalive: Duration::from_secs(12),
            suspect_after: Duration::from_millis(400),
            suspect_interval: Duration::from_millis(150),
            dead_after: Duration::from_millis(1800),
            idle_after: Duration::from_secs(45),
            reprobe_min: Duration::from_secs(2),
            reprobe_relayed: Duration::from_secs(30),
            reprobe_direct: Duration::from_secs(60),
            ping_timeout: Duration::from_secs(5),
            alive_for: Duration::from_secs(5),
            switch_margin: Duration::from_millis(5),
            switch_percent: 20,
            switch_samples: 3,
            max_candidates: 2 * disco::MAX_CANDIDATES,
            max_outstanding: 64,
            birthday: BirthdayConfig::default(),
        }
    }
}

/// Everything a peer's state machine writes to: the queues, the RNG, and
/// the node-wide budget of the birthday technique.
struct Out {
    rng: StdRng,
    transmits: VecDeque<Transmit>,
    actions: VecDeque<Action>,
    events: VecDeque<PathEvent>,
    /// Extra sockets open now (at most `BirthdayConfig::sockets`).
    sockets_open: u32,
    /// The last socket id given out.
    last_socket: u32,
    /// A peer is being probed (one at a time, so the rate holds node-wide).
    probing: bool,
}

impl Out {
    fn open_socket(&mut self) -> SocketId {
        self.last_socket = self.last_socket.wrapping_add(1).max(1);
        self.sockets_open += 1;
        let id = SocketId(self.last_socket);
        self.actions.push_back(Action::OpenSocket(id));
        id
    }

    fn close_socket(&mut self, id: SocketId) {
        self.sockets_open = self.sockets_open.saturating_sub(1);
        self.actions.push_back(Action::CloseSocket(id));
    }
}

/// What the node knows of itself: its candidates, and for the birthday
/// technique its public address and whether its NAT maps per destination.
#[derive(Debug, Default)]
struct Own {
    candidates: Vec<SocketAddr>,
    public: Option<SocketAddr>,
    mapping_varies: bool,
}

/// The path decisions of one node for all its peers; see the module doc.
pub struct PathManager {
    config: PathConfig,
    secret: StaticSecret,
    own: Own,
    peers: BTreeMap<NodeKey, Peer>,
    relays: RelayChoice,
    next_ping_id: u64,
    out: Out,
}

impl fmt::Debug for PathManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PathManager")
            .field("own", &self.own)
            .field("peers", &self.peers.len())
            .field("home_relay", &self.relays.home())
            .finish_non_exhaustive()
    }
}

impl PathManager {
    /// `secret` is the node's WireGuard key (disco packets are sealed with
    /// it); `seed` feeds nonces and transaction ids, so it must be random in
    /// production (32 bytes from the OS).
    pub fn new(config: PathConfig, secret: StaticSecret, seed: [u8; 32]) -> Self {
        PathManager {
            config,
            secret,
            own: Own::default(),
            peers: BTreeMap::new(),
            relays: RelayChoice::default(),
            next_ping_id: 0,
            out: Out {
                rng: StdRng::from_seed(seed),
                transmits: VecDeque::new(),
                actions: VecDeque::new(),
                events: VecDeque::new(),
                sockets_open: 0,
                last_socket: 0,
                probing: false,
            },
        }
    }

    /// The node's own endpoint candidates (local addresses, STUN-mapped
    /// ones), sent to peers in call-me-maybes. A change re-probes the peers
    /// in use, as the old paths may be gone.
    pub fn set_own_candidates(&mut self, mut candidates: Vec<SocketAddr>, now: Instant) {
        candidates.sort();
        candidates.dedup();
        candidates.truncate(disco::MAX_CANDIDATES);
        if candidates == self.own.candidates {
            return;
        }
        tracing::debug!(?candidates, "own endpoint candidates changed");
        self.own.candidates = candidates;
        for p in self.peers.values_mut() {
            p.reprobe_soon(&self.config, now);
        }
    }

    /// The node's WireGuard key changed (a rotation): disco packets are
    /// sealed and opened with the new one from now on. Paths stay as they
    /// are; the peers learn the new key from the coordinator.
    pub fn rotate_key(&mut self, secret: StaticSecret) -> Result<(), PathError> {
        let mut keys = BTreeMap::new();
        for key in self.peers.keys() {
            keys.insert(*key, DiscoKeys::new(&secret, *key)?);
        }
        for (key, k) in keys {
            if let Some(p) = self.peers.get_mut(&key) {
                p.set_keys(k);
            }
        }
        self.secret = secret;
        Ok(())
    }

    pub fn own_candidates(&self) -> &[SocketAddr] {
        &self.own.candidates
    }

    /// What STUN says of this node: its public address, and whether its NAT
    /// maps per destination (two STUN servers saw different ports). A node
    /// whose mapping varies is the hard side of the birthday technique.
    pub fn set_public(&mut self, public: Option<SocketAddr>, mapping_varies: bool) {
        if (public, mapping_varies) != (self.own.public, self.own.mapping_varies) {
            tracing::debug!(?public, mapping_varies, "own public address");
        }
        self.own.public = public;
        self.own.mapping_varies = mapping_varies;
    }

    /// Adds a peer or updates what the coordinator says of it. A new peer
    /// starts on its relay at once (so its first packet does not wait for
    /// hole punching) and is probed; new candidates are probed.
    pub fn upsert_peer(
        &mut self,
        key: NodeKey,
        candidates: &[SocketAddr],
        relay: Option<RelayId>,
        now: Instant,
    ) -> Result<(), PathError> {
        let config = &self.config;
        if let Some(p) = self.peers.get_mut(&key) {
            p.update(config, candidates, relay, &mut self.out, now);
            return Ok(());
        }
        let keys = DiscoKeys::new(&self.secret, key)?;
        let p = Peer::new(config, keys, candidates, relay, &mut self.out, now);
        self.peers.insert(key, p);
        Ok(())
    }

    /// Forgets a peer (its pings in flight too), closing its extra sockets.
    pub fn remove_peer(&mut self, key: &NodeKey) {
        if let Some(mut p) = self.peers.remove(key) {
            p.close_sockets(&mut self.out);
        }
    }

    /// Data went to or came from the peer: it is in use, so its direct path
    /// is watched closely and re-probed while relayed. Calling it once a
    /// second per busy peer is enough.
    pub fn note_activity(&mut self, key: &NodeKey, now: Instant) {
        if let Some(p) = self.peers.get_mut(key) {
            p.note_activity(&self.config, now);
        }
    }

    /// A measurement of a relay's latency, or `None` when it cannot be
    /// reached. The home relay is the fastest one, changed only when another
    /// is clearly faster or the home one is gone.
    pub fn handle_relay_latency(&mut self, relay: RelayId, latency: Option<Duration>) {
        if let Some(home) = self.relays.report(relay, latency) {
            tracing::info!(%home, "home relay chosen");
            self.out.actions.push_back(Action::SetHomeRelay(home));
        }
    }

    pub fn home_relay(&self) -> Option<RelayId> {
        self.relays.home()
    }

    /// A disco packet that came to the WireGuard socket from `src`.
    pub fn handle_udp(
        &mut self,
        src: SocketAddr,
        packet: &[u8],
        now: Instant,
    ) -> Result<(), PathError> {
        self.handle_udp_on(SocketId::MAIN, src, packet, now)
    }

    /// A disco packet that came to local socket `socket` from `src`.
    pub fn handle_udp_on(
        &mut self,
        socket: SocketId,
        src: SocketAddr,
        packet: &[u8],
        now: Instant,
    ) -> Result<(), PathError> {
        tracing::trace!(%src, ?socket, len = packet.len(), "disco packet");
        self.deliver(packet, Endpoint::Udp(src), socket, now)
    }

    /// A disco packet that `relay` delivered from the node with key `from`.
    pub fn handle_relayed(
        &mut self,
        relay: RelayId,
        from: NodeKey,
        packet: &[u8],
        now: Instant,
    ) -> Result<(), PathError> {
        let sealed = disco::sender(packet)?;
        if sealed != from {
            return Err(PathError::RelayMismatch {
                relayed: from,
                sealed,
            });
        }
        tracing::trace!(peer = %from, %relay, len = packet.len(), "relayed disco packet");
        self.deliver(
            packet,
            Endpoint::Relay { relay, peer: from },
            SocketId::MAIN,
            now,
        )
    }

    fn deliver(
        &mut self,
        packet: &[u8],
        from: Endpoint,
        socket: SocketId,
        now: Instant,
    ) -> Result<(), PathError> {
        let key = disco::sender(packet)?;
        let p = self
            .peers
            .get_mut(&key)
            .ok_or(PathError::UnknownPeer(key))?;
        let msg = p.open(packet)?;
        if let (Endpoint::Udp(src), false) = (from, socket == SocketId::MAIN) {
            if !p.hit(&self.config, socket, src, now) {
                tracing::debug!(peer = %key, ?socket, %src, "disco packet on a socket not the peer's");
                return Ok(());
            }
        }
        p.handle(&self.config, msg, from, &mut self.out, &self.own, now);
        Ok(())
    }

    /// Pings the peer once on its current path (for `meshd ping`); the
    /// answer comes as [`PathEvent::PingReply`] with this id, or
    /// [`PathEvent::PingTimedOut`]. While relayed it also probes the direct
    /// candidates, so repeated pings show an upgrade.
    pub fn ping(&mut self, key: &NodeKey, now: Instant) -> Result<u64, PathError> {
        let p = self
            .peers
            .get_mut(key)
            .ok_or(PathError::UnknownPeer(*key))?;
        let id = self.next_ping_id;
        if !p.user_ping(&self.config, id, &mut self.out, now) {
            return Err(PathError::NoPath(*key));
        }
        self.next_ping_id += 1;
        Ok(id)
    }

    /// Extra sockets open now (the birthday technique's), for status and
    /// tests.
    pub fn sockets_open(&self) -> u32 {
        self.out.sockets_open
    }

    pub fn status(&self, key: &NodeKey) -> Option<PeerStatus> {
        self.peers.get(key).map(Peer::status)
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.transmits.pop_front()
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.out.actions.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<PathEvent> {
        self.out.events.pop_front()
    }

    /// When [`PathManager::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.peers
            .values()
            .filter_map(|p| p.next_wake(&self.config))
            .min()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        for p in self.peers.values_mut() {
            p.tick(&self.config, &mut self.out, &self.own, now);
        }
    }
}
