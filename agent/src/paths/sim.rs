//! A deterministic simulated network for [`PathManager`]s: a fake clock,
//! nodes behind NATs modelled after RFC 4787 (mapping, filtering, expiry of
//! unreplied mappings refreshed by outbound packets, port allocation), links
//! with latency and loss, a relay that always delivers (until killed), and
//! links that can be cut. Everything is decided by one seed. A node has its
//! main socket and the extra sockets its manager opens (each on its own
//! local port, so a NAT gives each its own mappings).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use meshd_proto::NodeKey;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use x25519_dalek::{PublicKey, StaticSecret};

use super::{
    Action, Endpoint, Path, PathConfig, PathError, PathEvent, PathManager, RelayId, SocketId,
};

/// What a NAT's mapping for an outbound flow depends on (RFC 4787, 4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mapping {
    EndpointIndependent,
    AddressDependent,
    AddressAndPortDependent,
}

/// Which inbound packets a mapping lets in (RFC 4787, 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Filtering {
    EndpointIndependent,
    AddressDependent,
    AddressAndPortDependent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ports {
    /// The local port if it is free on the public side.
    Preserving,
    Random,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Nat {
    pub mapping: Mapping,
    pub filtering: Filtering,
    pub ports: Ports,
    /// A mapping without outbound packets this long is gone.
    pub timeout: Duration,
}

impl Nat {
    /// Linux masquerade, as in the lab: endpoint-independent mapping with
    /// the port preserved, address-and-port-dependent filtering.
    pub fn masquerade() -> Nat {
        Nat {
            mapping: Mapping::EndpointIndependent,
            filtering: Filtering::AddressAndPortDependent,
            ports: Ports::Preserving,
            timeout: Duration::from_secs(30),
        }
    }

    /// A new random port per destination, address-and-port-dependent
    /// filtering.
    pub fn symmetric() -> Nat {
        Nat {
            mapping: Mapping::AddressAndPortDependent,
            filtering: Filtering::AddressAndPortDependent,
            ports: Ports::Random,
            timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Net {
    /// A public address on the node itself.
    Open,
    Nat(Nat),
    /// No UDP in or out at all (the relay still works).
    UdpBlocked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct MapKey {
    local: SocketAddr,
    dst_ip: Option<IpAddr>,
    dst_port: Option<u16>,
}

#[derive(Debug)]
struct MapEntry {
    port: u16,
    expires: Instant,
    sent_to: BTreeSet<SocketAddr>,
}

#[derive(Debug)]
struct NatState {
    config: Nat,
    public_ip: Ipv4Addr,
    mappings: BTreeMap<MapKey, MapEntry>,
}

impl NatState {
    fn expire(&mut self, now: Instant) {
        self.mappings.retain(|_, e| e.expires > now);
    }

    fn outbound(
        &mut self,
        local: SocketAddr,
        dst: SocketAddr,
        now: Instant,
        rng: &mut StdRng,
    ) -> SocketAddr {
        self.expire(now);
        let key = MapKey {
            local,
            dst_ip: (self.config.mapping != Mapping::EndpointIndependent).then_some(dst.ip()),
            dst_port: (self.config.mapping == Mapping::AddressAndPortDependent)
                .then_some(dst.port()),
        };
        let taken: BTreeSet<u16> = self.mappings.values().map(|e| e.port).collect();
        let ports = self.config.ports;
        let e = self.mappings.entry(key).or_insert_with(|| {
            let mut port = match ports {
                Ports::Preserving => local.port(),
                Ports::Random => rng.random_range(1024..=65535),
            };
            while taken.contains(&port) {
                port = rng.random_range(1024..=65535);
            }
            MapEntry {
                port,
                expires: now,
                sent_to: BTreeSet::new(),
            }
        });
        e.expires = now + self.config.timeout;
        e.sent_to.insert(dst);
        SocketAddr::new(self.public_ip.into(), e.port)
    }

    /// The local address an inbound packet to `port` from `src` reaches.
    fn inbound(&mut self, port: u16, src: SocketAddr, now: Instant) -> Option<SocketAddr> {
        self.expire(now);
        let filtering = self.config.filtering;
        self.mappings.iter().find_map(|(k, e)| {
            let allowed = match filtering {
                Filtering::EndpointIndependent => true,
                Filtering::AddressDependent => e.sent_to.iter().any(|d| d.ip() == src.ip()),
                Filtering::AddressAndPortDependent => e.sent_to.contains(&src),
            };
            (e.port == port && allowed).then_some(k.local)
        })
    }
}

/// Every simulated packet is well formed, but one may come before the
/// coordinator told the receiver of its sender (the driver drops those).
fn expect_ours(r: Result<(), PathError>) {
    match r {
        Ok(()) | Err(PathError::UnknownPeer(_)) => {}
        Err(e) => panic!("a simulated packet was refused: {e}"),
    }
}

/// The STUN server nodes learn their mapped address from.
const STUN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)), 3478);
pub(super) const RELAY: RelayId = RelayId(0);

pub(super) struct SimNode {
    pub pm: PathManager,
    pub key: NodeKey,
    secret: StaticSecret,
    local: SocketAddr,
    net: Net,
    nat: Option<NatState>,
    public_ip: Ipv4Addr,
    /// One way, between the node and the core.
    latency: Duration,
    /// Chance that a packet is lost on the node's link, each way.
    loss: f64,
    /// The WireGuard endpoint per peer, as set by the manager's actions.
    pub endpoints: BTreeMap<NodeKey, Endpoint>,
    pub events: Vec<(Instant, PathEvent)>,
    /// Peers with data flowing, noted as activity every second.
    busy: BTreeSet<NodeKey>,
    /// Disco packets this node sent over UDP.
    pub udp_sent: usize,
    /// The extra sockets open now, by id, with their local port.
    sockets: BTreeMap<SocketId, u16>,
    next_port: u16,
    /// The most extra sockets open at once.
    pub max_sockets: usize,
    /// The socket WireGuard sends from, per peer, as set by the manager.
    pub sources: BTreeMap<NodeKey, SocketId>,
}

#[derive(Debug)]
enum Delivery {
    Udp {
        to: usize,
        dst: SocketAddr,
        src: SocketAddr,
        packet: Vec<u8>,
    },
    Relay {
        to: usize,
        from: NodeKey,
        packet: Vec<u8>,
    },
    Activity {
        node: usize,
    },
}

pub(super) struct Sim {
    pub now: Instant,
    pub start: Instant,
    pub nodes: Vec<SimNode>,
    queue: BTreeMap<(Instant, u64), Delivery>,
    seq: u64,
    rng: StdRng,
    config: PathConfig,
    relay_alive: bool,
    /// One way, across the relay (on top of both nodes' links).
    relay_latency: Duration,
    /// Node pairs whose direct UDP is dropped (a firewall in between).
    cut: BTreeSet<(usize, usize)>,
}

impl Sim {
    pub fn new(seed: u64) -> Sim {
        let now = Instant::now();
        Sim {
            now,
            start: now,
            nodes: Vec::new(),
            queue: BTreeMap::new(),
            seq: 0,
            rng: StdRng::seed_from_u64(seed),
            config: PathConfig::default(),
            relay_alive: true,
            relay_latency: Duration::from_millis(10),
            cut: BTreeSet::new(),
        }
    }

    /// The managers' configuration, for nodes added after this.
    pub fn set_config(&mut self, config: PathConfig) {
        self.config = config;
    }

    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// A node on `net` with a one-way latency to the core of `latency_ms`.
    pub fn add_node(&mut self, net: Net, latency_ms: u64) -> usize {
        let i = self.nodes.len();
        let n = u8::try_from(i + 1).expect("fewer than 255 nodes");
        let secret = StaticSecret::from([n; 32]);
        let key = NodeKey(PublicKey::from(&secret).to_bytes());
        let public_ip = Ipv4Addr::new(198, 19, n, 1);
        let local = match net {
            Net::Open => SocketAddr::new(public_ip.into(), 51820),
            _ => SocketAddr::new(Ipv4Addr::new(10, 0, n, 2).into(), 51820),
        };
        let nat = match net {
            Net::Nat(config) => Some(NatState {
                config,
                public_ip,
                mappings: BTreeMap::new(),
            }),
            _ => None,
        };
        let mut pm = PathManager::new(self.config.clone(), secret.clone(), self.rng.random());
        pm.handle_relay_latency(RELAY, Some(Duration::from_millis(10)));
        self.nodes.push(SimNode {
            pm,
            key,
            secret,
            local,
            net,
            nat,
            public_ip,
            latency: Duration::from_millis(latency_ms),
            loss: 0.0,
            endpoints: BTreeMap::new(),
            events: Vec::new(),
            busy: BTreeSet::new(),
            udp_sent: 0,
            sockets: BTreeMap::new(),
            next_port: 40000,
            max_sockets: 0,
            sources: BTreeMap::new(),
        });
        self.refresh_candidates(i);
        self.drain(i);
        i
    }

    pub fn set_loss(&mut self, i: usize, loss: f64) {
        self.nodes[i].loss = loss;
    }

    /// The node's candidates as its driver would find them: its local
    /// address and the address a STUN server sees (which, behind a NAT,
    /// refreshes that mapping).
    pub fn refresh_candidates(&mut self, i: usize) {
        let now = self.now;
        let n = &mut self.nodes[i];
        let mut candidates = vec![n.local];
        let mut public = (!matches!(n.net, Net::UdpBlocked)).then_some(n.local);
        let mut varies = false;
        if let (Some(nat), Net::Nat(_)) = (&mut n.nat, n.net) {
            let mapped = nat.outbound(n.local, STUN, now, &mut self.rng);
            candidates.push(mapped);
            public = Some(mapped);
            // What a second STUN server would show.
            varies = nat.config.mapping != Mapping::EndpointIndependent;
        }
        n.pm.set_public(public, varies);
        n.pm.set_own_candidates(candidates, now);
        self.drain(i);
    }

    /// The coordinator tells `i` about `j` (its candidates and relay).
    pub fn introduce(&mut self, i: usize, j: usize) {
        let candidates = self.nodes[j].pm.own_candidates().to_vec();
        let key = self.nodes[j].key;
        let now = self.now;
        self.nodes[i]
            .pm
            .upsert_peer(key, &candidates, Some(RELAY), now)
            .expect("a valid peer key");
        self.drain(i);
    }

    /// Both learn of each other, `j` after `i` by `lag`; data flows both ways.
    pub fn connect(&mut self, i: usize, j: usize, lag: Duration) {
        self.introduce(i, j);
        self.busy(i, j, true);
        self.run_for(lag);
        self.introduce(j, i);
        self.busy(j, i, true);
    }

    /// Data from `i` to `j` flows (or stops): `i` notes activity each second.
    pub fn busy(&mut self, i: usize, j: usize, busy: bool) {
        let key = self.nodes[j].key;
        if busy {
            let first = self.nodes[i].busy.is_empty();
            self.nodes[i].busy.insert(key);
            if first {
                self.schedule(self.now, Delivery::Activity { node: i });
            }
        } else {
            self.nodes[i].busy.remove(&key);
        }
    }

    pub fn cut(&mut self, i: usize, j: usize, cut: bool) {
        let pair = (i.min(j), i.max(j));
        if cut {
            self.cut.insert(pair);
        } else {
            self.cut.remove(&pair);
        }
    }

    pub fn kill_relay(&mut self) {
        self.relay_alive = false;
    }

    /// The node's NAT forgets its mappings and allocates new ports.
    pub fn rebind(&mut self, i: usize) {
        if let Some(nat) = &mut self.nodes[i].nat {
            nat.mappings.clear();
            nat.config.ports = Ports::Random;
        }
    }

    /// The node restarts on another local port: a new manager, new
    /// candidates, and its peers hear of them from the coordinator.
    pub fn restart(&mut self, i: usize, peers: &[usize]) {
        let seed = self.rng.random();
        let n = &mut self.nodes[i];
        n.local.set_port(n.local.port() + 1);
        n.pm = PathManager::new(self.config.clone(), n.secret.clone(), seed);
        n.pm.handle_relay_latency(RELAY, Some(Duration::from_millis(10)));
        n.endpoints.clear();
        self.refresh_candidates(i);
        for &j in peers {
            self.introduce(i, j);
            self.introduce(j, i);
        }
    }

    /// An operator's ping from `i` to `j`, sent at once.
    pub fn ping(&mut self, i: usize, j: usize) -> u64 {
        let (key, now) = (self.nodes[j].key, self.now);
        let id = self.nodes[i].pm.ping(&key, now).expect("a path");
        self.drain(i);
        id
    }

    pub fn path(&self, i: usize, j: usize) -> Path {
        let n = &self.nodes[i];
        let p = n.pm.status(&self.nodes[j].key).expect("a known peer").path;
        // The engine's endpoint always follows the decision.
        let want = match p {
            Path::Direct(a) => Some(Endpoint::Udp(a)),
            Path::Relay(relay) => Some(Endpoint::Relay {
                relay,
                peer: self.nodes[j].key,
            }),
            Path::None => None,
        };
        if want.is_some() {
            assert_eq!(n.endpoints.get(&self.nodes[j].key).copied(), want);
        }
        p
    }

    pub fn is_direct(&self, i: usize, j: usize) -> bool {
        matches!(self.path(i, j), Path::Direct(_))
    }

    /// Runs until `cond` holds (checked after every step) or `limit` passes;
    /// returns whether it held.
    pub fn run_until(&mut self, limit: Duration, mut cond: impl FnMut(&Sim) -> bool) -> bool {
        let end = self.now + limit;
        let mut steps_at_now = 0u32;
        loop {
            if cond(self) {
                return true;
            }
            let next_packet = self.queue.keys().next().map(|(t, _)| *t);
            let next_timer = self.nodes.iter().filter_map(|n| n.pm.poll_timeout()).min();
            let Some(next) = [next_packet, next_timer].into_iter().flatten().min() else {
                self.now = end;
                return cond(self);
            };
            if next > end {
                self.now = end;
                return cond(self);
            }
            if next <= self.now {
                steps_at_now += 1;
                assert!(
                    steps_at_now < 10_000,
                    "the managers make no progress at {:?}",
                    self.elapsed()
                );
            } else {
                steps_at_now = 0;
                self.now = next;
            }
            self.step();
        }
    }

    pub fn run_for(&mut self, d: Duration) {
        self.run_until(d, |_| false);
    }

    fn step(&mut self) {
        let now = self.now;
        while let Some(entry) = self.queue.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let d = entry.remove();
            self.deliver(d);
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i].pm.poll_timeout().is_some_and(|t| t <= now) {
                self.nodes[i].pm.handle_timeout(now);
                self.drain(i);
            }
        }
    }

    fn deliver(&mut self, d: Delivery) {
        let now = self.now;
        match d {
            Delivery::Udp {
                to,
                dst,
                src,
                packet,
            } => {
                let lost = self.rng.random_bool(self.nodes[to].loss);
                let n = &mut self.nodes[to];
                let local = match (&mut n.nat, n.net) {
                    (_, Net::UdpBlocked) => None,
                    (Some(nat), _) => nat.inbound(dst.port(), src, now),
                    (None, _) => (dst.ip() == n.local.ip()).then_some(dst),
                };
                let Some(local) = local.filter(|_| !lost) else {
                    return;
                };
                let socket = if local == n.local {
                    SocketId::MAIN
                } else if let Some((&id, _)) = n
                    .sockets
                    .iter()
                    .find(|(_, &port)| local == SocketAddr::new(n.local.ip(), port))
                {
                    id
                } else {
                    return;
                };
                expect_ours(n.pm.handle_udp_on(socket, src, &packet, now));
            }
            Delivery::Relay { to, from, packet } => {
                expect_ours(self.nodes[to].pm.handle_relayed(RELAY, from, &packet, now));
            }
            Delivery::Activity { node } => {
                let busy: Vec<NodeKey> = self.nodes[node].busy.iter().copied().collect();
                if busy.is_empty() {
                    return;
                }
                for k in busy {
                    self.nodes[node].pm.note_activity(&k, now);
                }
                self.schedule(now + Duration::from_secs(1), Delivery::Activity { node });
            }
        }
        for i in 0..self.nodes.len() {
            self.drain(i);
        }
    }

    fn schedule(&mut self, at: Instant, d: Delivery) {
        self.seq += 1;
        self.queue.insert((at, self.seq), d);
    }

    /// Carries out what node `i`'s manager asks.
    fn drain(&mut self, i: usize) {
        let now = self.now;
        while let Some(a) = self.nodes[i].pm.poll_action() {
            let n = &mut self.nodes[i];
            match a {
                Action::SetEndpoint {
                    peer,
                    endpoint,
                    from,
                } => {
                    n.endpoints.insert(peer, endpoint);
                    n.sources.insert(peer, from);
                }
                Action::OpenSocket(id) => {
                    assert!(!n.sockets.contains_key(&id), "{id:?} opened twice");
                    n.next_port = n.next_port.wrapping_add(1).max(40000);
                    n.sockets.insert(id, n.next_port);
                    n.max_sockets = n.max_sockets.max(n.sockets.len());
                }
                Action::CloseSocket(id) => {
                    assert!(
                        n.sockets.remove(&id).is_some(),
                        "{id:?} closed but not open"
                    );
                }
                Action::SetHomeRelay(_) => {}
            }
        }
        while let Some(e) = self.nodes[i].pm.poll_event() {
            self.nodes[i].events.push((now, e));
        }
        while let Some(t) = self.nodes[i].pm.poll_transmit() {
            match t.to {
                Endpoint::Udp(dst) => self.send_udp(i, t.from, dst, t.packet),
                Endpoint::Relay { peer, .. } => {
                    let Some(to) = self.nodes.iter().position(|n| n.key == peer) else {
                        continue;
                    };
                    if self.relay_alive {
                        let at = now
                            + self.nodes[i].latency
                            + self.relay_latency
                            + self.nodes[to].latency;
                        let from = self.nodes[i].key;
                        self.schedule(
                            at,
                            Delivery::Relay {
                                to,
                                from,
                                packet: t.packet,
                            },
                        );
                    }
                }
            }
        }
    }

    fn send_udp(&mut self, i: usize, from: SocketId, dst: SocketAddr, packet: Vec<u8>) {
        let now = self.now;
        self.nodes[i].udp_sent += 1;
        let n = &mut self.nodes[i];
        let local = if from == SocketId::MAIN {
            n.local
        } else {
            let port = *n
                .sockets
                .get(&from)
                .expect("sent from a socket that is not open");
            SocketAddr::new(n.local.ip(), port)
        };
        let src = match (&mut n.nat, n.net) {
            (_, Net::UdpBlocked) => return,
            (Some(nat), _) => nat.outbound(local, dst, now, &mut self.rng),
            (None, _) => local,
        };
        if self.rng.random_bool(self.nodes[i].loss) {
            return;
        }
        let Some(to) = self
            .nodes
            .iter()
            .position(|n| IpAddr::V4(n.public_ip) == dst.ip())
        else {
            return;
        };
        if self.cut.contains(&(i.min(to), i.max(to))) {
            return;
        }
        let at = now + self.nodes[i].latency + self.nodes[to].latency;
        self.schedule(
            at,
            Delivery::Udp {
                to,
                dst,
                src,
                packet,
            },
        );
    }

    /// Extra sockets open on node `i` now.
    pub fn sockets_open(&self, i: usize) -> usize {
        assert_eq!(
            self.nodes[i].sockets.len(),
            self.nodes[i].pm.sockets_open() as usize,
            "the manager's count of sockets matches the driver's"
        );
        self.nodes[i].sockets.len()
    }

    /// When `i` first went direct to `j` after `since`.
    pub fn upgraded_after(&self, i: usize, j: usize, since: Instant) -> Option<Duration> {
        let key = self.nodes[j].key;
        self.nodes[i].events.iter().find_map(|(t, e)| match e {
            PathEvent::Upgraded { peer, .. } if *peer == key && *t >= since => Some(*t - since),
            _ => None,
        })
    }

    /// When `i` fell back from its direct path to `j` after `since`.
    pub fn fell_back_after(&self, i: usize, j: usize, since: Instant) -> Option<Duration> {
        let key = self.nodes[j].key;
        self.nodes[i].events.iter().find_map(|(t, e)| match e {
            PathEvent::FellBack { peer, .. } if *peer == key && *t >= since => Some(*t - since),
            _ => None,
        })
    }
}
