//! The relay: TLS/TCP, QUIC and STUN listeners, admission of members,
//! routing between clients, and the links to the other relays of the mesh.
//!
//! Each connection runs in a task of its own ([`crate::conn::drive`]). A
//! packet is routed by the task that read it, straight into the
//! destination's outbox (a lock, a copy, no allocation, no await), so no
//! connection ever waits for another; each connection's task writes its own
//! outbox in batches.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use meshd_proto::auth::{self, AuthError, ProofInput, Purpose};
use meshd_proto::relay::{split_datagram, ErrorCode, Frame, GoneReason};
use meshd_proto::stun;
use meshd_proto::token::Hex;
use meshd_proto::NodeKey;
use rand::RngCore;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::conn::{
    client_handshake, connect_tls, drive, quic_binding, quic_transport, tune_tcp, udp_socket,
    ClientError, Cut, End, Handshake, HandshakeError, Incoming, Io, Mailbox, Stop, Traffic,
};
use crate::identity::{Identity, IdentityError, FILES};
use crate::members::{Members, Role};
use crate::Transport;

/// Everything a relay is started with.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Where the certificate, its key and the relay's X25519 key live.
    pub state_dir: PathBuf,
    /// TLS over TCP and QUIC over UDP, on the same port (with port 0, TCP
    /// takes the port UDP was given).
    pub listen: SocketAddr,
    /// The STUN responder (UDP); `None`: no STUN.
    pub stun_listen: Option<SocketAddr>,
    /// A second STUN responder on another port: a node that asks both learns
    /// whether its NAT maps each destination to another public port.
    pub stun_second: Option<SocketAddr>,
    /// The other relays of the mesh, dialled and kept connected.
    pub mesh: Vec<MeshPeer>,
    pub limits: Limits,
    /// How often the one-line summary of the counters is logged.
    pub log_interval: Duration,
}

impl RelayConfig {
    /// The defaults: TLS on TCP 443, QUIC on UDP 443, STUN on UDP 3478, on
    /// every address.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        RelayConfig {
            state_dir: state_dir.into(),
            listen: ([0u16; 8], 443).into(),
            stun_listen: Some(([0u16; 8], 3478).into()),
            stun_second: None,
            mesh: Vec::new(),
            limits: Limits::default(),
            log_interval: Duration::from_secs(60),
        }
    }
}

/// Another relay of the mesh, as the coordinator describes it.
#[derive(Debug, Clone)]
pub struct MeshPeer {
    /// `host:port` of its TLS/TCP listener.
    pub addr: String,
    /// SHA-256 of its certificate.
    pub pin: [u8; 32],
    /// Its static key (what its `ServerHello` must carry).
    pub key: PublicKey,
}

/// Bounds on what the relay holds per connection.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Packets queued for one client, in bytes of frames; beyond it the
    /// longest source queue loses its oldest packets.
    pub queue_bytes: usize,
    /// Control frames (pongs, PeerGone) queued for one client.
    pub control_bytes: usize,
    /// Packets and presence frames queued for one mesh link.
    pub link_queue_bytes: usize,
    /// A client must authenticate within this time of connecting.
    pub handshake_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            queue_bytes: 1 << 20,
            control_bytes: 64 << 10,
            link_queue_bytes: 8 << 20,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("cannot listen for {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// A snapshot of the relay's counters. Packet and byte counts are of
/// datagrams (what clients sent), not of frames.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    pub clients_tls: u64,
    pub clients_quic: u64,
    /// Links to other relays, both directions.
    pub mesh_links: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    /// Bytes of packets waiting in all outboxes now.
    pub queued_bytes: u64,
    pub drops: Drops,
    /// Handshakes refused (strangers, bad proofs, timeouts, malformed).
    pub refused: u64,
    /// Connections cut because their key stopped being a member.
    pub cut_removed: u64,
    pub stun_requests: u64,
}

/// Packets dropped, by cause.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Drops {
    /// The destination's outbox was full (a slow reader or a flood).
    pub queue_full: u64,
    /// The destination is connected neither here nor to a meshed relay.
    pub no_route: u64,
    /// A meshed relay forwarded a packet for a client that is not here.
    pub forward_no_route: u64,
    /// A control frame (a pong, a PeerGone) did not fit its queue.
    pub control_full: u64,
    /// A QUIC datagram shorter than a key, or one from a relay link.
    pub bad_datagram: u64,
}

#[derive(Debug, Default)]
struct Stats {
    clients_tls: AtomicU64,
    clients_quic: AtomicU64,
    mesh_links: AtomicU64,
    packets_in: AtomicU64,
    bytes_in: AtomicU64,
    out: Traffic,
    queue_full: AtomicU64,
    no_route: AtomicU64,
    forward_no_route: AtomicU64,
    control_full: AtomicU64,
    bad_datagram: AtomicU64,
    refused: AtomicU64,
    cut_removed: AtomicU64,
    stun_requests: AtomicU64,
}

fn inc(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// One authenticated connection: a node, or a link to another relay.
#[derive(Debug)]
struct Conn {
    id: u64,
    key: NodeKey,
    role: Role,
    transport: Transport,
    mailbox: Mailbox,
}

#[derive(Debug, Default)]
struct Routes {
    clients: HashMap<NodeKey, Arc<Conn>>,
    links: BTreeMap<u64, Arc<Conn>>,
    /// Keys the meshed relays announced, with the links they came over
    /// (two relays that dial each other have two links).
    remote: HashMap<NodeKey, Vec<Arc<Conn>>>,
}

struct Shared {
    key: NodeKey,
    secret: StaticSecret,
    members: Members,
    routes: RwLock<Routes>,
    stats: Stats,
    limits: Limits,
    next_id: AtomicU64,
}

/// The tasks keeping mesh links up, by the peer relay's key.
type Dialers = BTreeMap<[u8; 32], (MeshPeer, JoinHandle<()>)>;

/// A running relay. Dropping it stops the listeners; [`RelayServer::shutdown`]
/// also tells connected clients.
pub struct RelayServer {
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    tasks: Vec<JoinHandle<()>>,
    /// One task per meshed relay, keeping its link up.
    dialers: std::sync::Mutex<Dialers>,
    /// The runtime the relay was started on, so `set_mesh` works from any
    /// thread.
    runtime: tokio::runtime::Handle,
    addr: SocketAddr,
    stun_addr: Option<SocketAddr>,
    pin: [u8; 32],
}

impl std::fmt::Debug for RelayServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayServer")
            .field("addr", &self.addr)
            .field("stun_addr", &self.stun_addr)
            .finish_non_exhaustive()
    }
}

impl RelayServer {
    /// Loads (or creates) the identity, binds every listener, and starts
    /// serving and dialling the mesh on the current tokio runtime (which
    /// must be multi-threaded to use more than one core). Admits only
    /// `members`.
    pub async fn start(config: RelayConfig, members: Members) -> Result<RelayServer, RelayError> {
        let identity = Identity::load_or_create(&config.state_dir, &FILES)?;
        let server_tls = Arc::new(identity.server_config()?);
        let quic_crypto = quinn::crypto::rustls::QuicServerConfig::try_from(server_tls.clone())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let mut quic_config = quinn::ServerConfig::with_crypto(Arc::new(quic_crypto));
        quic_config.transport_config(Arc::new(quic_transport(false, None)));
        let bind = |what, addr| move |source| RelayError::Bind { what, addr, source };

        let (socket, tcp) = meshd_control::listen::bind_pair(config.listen, udp_socket)
            .await
            .map_err(|e| RelayError::Bind {
                what: if e.proto == "UDP" { "QUIC" } else { "TLS" },
                addr: e.addr,
                source: e.source,
            })?;
        let runtime = quinn::default_runtime()
            .ok_or_else(|| bind("QUIC", config.listen)(io::Error::other("no async runtime")))?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(quic_config),
            socket,
            runtime,
        )
        .map_err(bind("QUIC", config.listen))?;
        let addr = endpoint.local_addr().map_err(bind("QUIC", config.listen))?;
        let stun = match config.stun_listen {
            Some(addr) => Some(stun_socket(addr).map_err(bind("STUN", addr))?),
            None => None,
        };
        let stun_addr = match &stun {
            Some(s) => Some(s.local_addr().map_err(bind("STUN", addr))?),
            None => None,
        };

        let shared = Arc::new(Shared {
            key: auth::public_key(&identity.static_key),
            secret: identity.static_key.clone(),
            members: members.clone(),
            routes: RwLock::default(),
            stats: Stats::default(),
            limits: config.limits.clone(),
            next_id: AtomicU64::new(1),
        });
        let mut tasks = vec![
            tokio::spawn(accept_tcp(
                shared.clone(),
                tcp,
                tokio_rustls::TlsAcceptor::from(server_tls),
            )),
            tokio::spawn(accept_quic(shared.clone(), endpoint.clone())),
            tokio::spawn(enforce_members(shared.clone(), members.subscribe())),
            tokio::spawn(log_counters(shared.clone(), config.log_interval)),
        ];
        if let Some(s) = stun {
            tasks.push(tokio::spawn(serve_stun(shared.clone(), s)));
        }
        if let Some(addr) = config.stun_second {
            let s = stun_socket(addr).map_err(bind("STUN", addr))?;
            tasks.push(tokio::spawn(serve_stun(shared.clone(), s)));
        }
        let pin = identity.pin();
        tracing::info!(
            %addr,
            stun = ?stun_addr,
            key = %shared.key,
            pin = %Hex(&pin),
            "relay listening"
        );
        let server = RelayServer {
            shared,
            endpoint,
            tasks,
            dialers: Default::default(),
            runtime: tokio::runtime::Handle::current(),
            addr,
            stun_addr,
            pin,
        };
        server.set_mesh(config.mesh);
        Ok(server)
    }

    /// Replaces the list of relays to keep links to: links to relays no
    /// longer listed (or listed with another address or pin) are closed,
    /// new ones dialled. The relay's own entry, if listed, is skipped.
    pub fn set_mesh(&self, peers: Vec<MeshPeer>) {
        let mut dialers = self.dialers.lock().unwrap_or_else(PoisonError::into_inner);
        let wanted: BTreeMap<[u8; 32], MeshPeer> = peers
            .into_iter()
            .map(|p| (p.key.to_bytes(), p))
            .filter(|(k, _)| *k != self.shared.key.0)
            .collect();
        dialers.retain(|key, (peer, task)| {
            let keep = wanted
                .get(key)
                .is_some_and(|w| w.addr == peer.addr && w.pin == peer.pin);
            if !keep {
                task.abort();
            }
            keep
        });
        for (key, peer) in wanted {
            dialers.entry(key).or_insert_with(|| {
                let task = self
                    .runtime
                    .spawn(dial_relay(self.shared.clone(), peer.clone()));
                (peer, task)
            });
        }
    }

    /// The relay's static secret, for the coordinator session that makes it
    /// a member of its mesh under this same key.
    pub fn static_key(&self) -> x25519_dalek::StaticSecret {
        self.shared.secret.clone()
    }

    /// The relay's static key: clients prove their keys against it.
    pub fn public_key(&self) -> PublicKey {
        PublicKey::from(self.shared.key.0)
    }

    /// SHA-256 of the relay's certificate, which clients pin.
    pub fn pin(&self) -> [u8; 32] {
        self.pin
    }

    /// Where TLS (TCP) and QUIC (UDP) listen.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stun_addr(&self) -> Option<SocketAddr> {
        self.stun_addr
    }

    pub fn counters(&self) -> Counters {
        self.shared.counters()
    }

    /// Tells every client the relay is going away, and stops.
    pub async fn shutdown(mut self) {
        self.stop();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }

    /// Stops listening and dialling, and cuts every connection (each one's
    /// task then sends `Error{ShuttingDown}` and ends).
    fn stop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.set_mesh(Vec::new());
        let conns: Vec<Arc<Conn>> = {
            let r = self.shared.routes();
            r.clients
                .values()
                .chain(r.links.values())
                .cloned()
                .collect()
        };
        for c in conns {
            c.mailbox.cut(Cut::Error(
                ErrorCode::ShuttingDown,
                "the relay is shutting down".into(),
            ));
        }
        self.endpoint.close(0u32.into(), b"relay stopping");
    }
}

impl Drop for RelayServer {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Shared {
    fn routes(&self) -> RwLockReadGuard<'_, Routes> {
        // Nothing panics while holding the lock, and every change to the
        // routes is whole before it is released.
        self.routes.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn routes_mut(&self) -> RwLockWriteGuard<'_, Routes> {
        self.routes.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn counters(&self) -> Counters {
        let s = &self.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let queued: usize = {
            let r = self.routes();
            r.clients
                .values()
                .chain(r.links.values())
                .map(|c| c.mailbox.queued())
                .sum()
        };
        Counters {
            clients_tls: get(&s.clients_tls),
            clients_quic: get(&s.clients_quic),
            mesh_links: get(&s.mesh_links),
            packets_in: get(&s.packets_in),
            bytes_in: get(&s.bytes_in),
            packets_out: get(&s.out.packets),
            bytes_out: get(&s.out.bytes),
            queued_bytes: queued as u64,
            drops: Drops {
                queue_full: get(&s.queue_full),
                no_route: get(&s.no_route),
                forward_no_route: get(&s.forward_no_route),
                control_full: get(&s.control_full),
                bad_datagram: get(&s.bad_datagram),
            },
            refused: get(&s.refused),
            cut_removed: get(&s.cut_removed),
            stun_requests: get(&s.stun_requests),
        }
    }

    fn new_conn(&self, key: NodeKey, role: Role, transport: Transport) -> Arc<Conn> {
        let l = &self.limits;
        let (queue, control) = match role {
            Role::Node => (l.queue_bytes, l.control_bytes),
            // Presence of every client goes over a link's control queue.
            Role::Relay => (l.link_queue_bytes, l.link_queue_bytes),
        };
        Arc::new(Conn {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            key,
            role,
            transport,
            mailbox: Mailbox::new(queue, control),
        })
    }

    fn control(&self, conn: &Conn, frame: &Frame<'_>) {
        if !conn.mailbox.push_control(frame) {
            inc(&self.stats.control_full, 1);
        }
    }

    /// Makes `conn` reachable: a node by its key (replacing an older
    /// connection with the same key), a relay link as a link that hears of
    /// every client.
    fn register(&self, conn: &Arc<Conn>) {
        let mut r = self.routes_mut();
        match conn.role {
            Role::Node => {
                if let Some(old) = r.clients.insert(conn.key, conn.clone()) {
                    old.mailbox.cut(Cut::Error(
                        ErrorCode::Replaced,
                        "a newer connection with the same key replaced this one".into(),
                    ));
                }
                for link in r.links.values() {
                    self.control(link, &Frame::PeerPresent(conn.key));
                }
            }
            Role::Relay => {
                r.links.insert(conn.id, conn.clone());
                for key in r.clients.keys() {
                    self.control(conn, &Frame::PeerPresent(*key));
                }
            }
        }
        let gauge = match (conn.role, conn.transport) {
            (Role::Relay, _) => &self.stats.mesh_links,
            (Role::Node, Transport::Tls) => &self.stats.clients_tls,
            (Role::Node, Transport::Quic) => &self.stats.clients_quic,
        };
        inc(gauge, 1);
    }

    /// Undoes [`Shared::register`] once `conn` has ended (unless a newer
    /// connection took its place, or the member check removed it already).
    fn unregister(&self, conn: &Arc<Conn>) {
        let mut r = self.routes_mut();
        self.remove(&mut r, conn);
        let gauge = match (conn.role, conn.transport) {
            (Role::Relay, _) => &self.stats.mesh_links,
            (Role::Node, Transport::Tls) => &self.stats.clients_tls,
            (Role::Node, Transport::Quic) => &self.stats.clients_quic,
        };
        gauge.fetch_sub(1, Ordering::Relaxed);
    }

    fn remove(&self, r: &mut Routes, conn: &Conn) {
        match conn.role {
            Role::Node => {
                if r.clients.get(&conn.key).is_some_and(|c| c.id == conn.id) {
                    r.clients.remove(&conn.key);
                    for link in r.links.values() {
                        self.control(link, &Frame::PeerAbsent(conn.key));
                    }
                }
            }
            Role::Relay => {
                r.links.remove(&conn.id);
                r.remote.retain(|_, links| {
                    links.retain(|l| l.id != conn.id);
                    !links.is_empty()
                });
            }
        }
    }

    /// Cuts every connection whose key is no longer a member in its role.
    fn enforce_members(&self) {
        let mut r = self.routes_mut();
        let gone: Vec<Arc<Conn>> = r
            .clients
            .values()
            .chain(r.links.values())
            .filter(|c| self.members.role_of(&c.key) != Some(c.role))
            .cloned()
            .collect();
        for c in gone {
            self.remove(&mut r, &c);
            c.mailbox.cut(Cut::Error(
                ErrorCode::NotMember,
                "this key is no longer a member of the mesh".into(),
            ));
            inc(&self.stats.cut_removed, 1);
            tracing::info!(key = %c.key, role = ?c.role, "cut a connection: no longer a member");
        }
    }

    /// A packet from the authenticated `src` to `dst`: into the outbox of
    /// `dst` if it is connected here, else of the link to the relay that
    /// announced it, else dropped with a `PeerGone` for the sender.
    fn route(&self, src: &Conn, dst: NodeKey, datagram: &[u8]) {
        inc(&self.stats.packets_in, 1);
        inc(&self.stats.bytes_in, datagram.len() as u64);
        let r = self.routes();
        let pushed = if let Some(c) = r.clients.get(&dst) {
            tracing::trace!(src = %src.key, %dst, len = datagram.len(), "relaying");
            c.mailbox.push_packet(
                src.key,
                &Frame::RecvPacket {
                    src: src.key,
                    datagram,
                },
            )
        } else if let Some(link) = r.remote.get(&dst).and_then(|l| l.last()) {
            tracing::trace!(src = %src.key, %dst, len = datagram.len(), "forwarding to a meshed relay");
            link.mailbox.push_packet(
                src.key,
                &Frame::ForwardPacket {
                    src: src.key,
                    dst,
                    datagram,
                },
            )
        } else {
            drop(r);
            tracing::trace!(src = %src.key, %dst, "no route");
            inc(&self.stats.no_route, 1);
            self.control(
                src,
                &Frame::PeerGone {
                    key: dst,
                    reason: GoneReason::NotConnected,
                },
            );
            return;
        };
        inc(&self.stats.queue_full, pushed.dropped);
    }

    /// What a node may send once authenticated.
    fn on_node(&self, conn: &Conn, incoming: Incoming<'_>) -> Result<(), Stop> {
        match incoming {
            Incoming::Frame(Frame::SendPacket { dst, datagram }) => self.route(conn, dst, datagram),
            Incoming::Datagram(payload) => match split_datagram(payload) {
                Some((dst, datagram)) => self.route(conn, dst, datagram),
                None => inc(&self.stats.bad_datagram, 1),
            },
            Incoming::Frame(f) => return self.on_common(conn, f),
        }
        Ok(())
    }

    /// What a meshed relay may send, over a link in either direction.
    fn on_relay(&self, link: &Arc<Conn>, incoming: Incoming<'_>) -> Result<(), Stop> {
        match incoming {
            Incoming::Frame(Frame::PeerPresent(key)) => {
                let mut r = self.routes_mut();
                let links = r.remote.entry(key).or_default();
                if !links.iter().any(|l| l.id == link.id) {
                    links.push(link.clone());
                }
            }
            Incoming::Frame(Frame::PeerAbsent(key)) => {
                let mut r = self.routes_mut();
                if let Some(links) = r.remote.get_mut(&key) {
                    links.retain(|l| l.id != link.id);
                    if links.is_empty() {
                        r.remote.remove(&key);
                    }
                }
            }
            // Delivered to a client of this relay or dropped, never
            // forwarded again: a mesh of any shape has no loops.
            Incoming::Frame(Frame::ForwardPacket { src, dst, datagram }) => {
                inc(&self.stats.packets_in, 1);
                inc(&self.stats.bytes_in, datagram.len() as u64);
                let r = self.routes();
                match r.clients.get(&dst) {
                    Some(c) => {
                        let pushed = c
                            .mailbox
                            .push_packet(src, &Frame::RecvPacket { src, datagram });
                        inc(&self.stats.queue_full, pushed.dropped);
                    }
                    None => inc(&self.stats.forward_no_route, 1),
                }
            }
            Incoming::Datagram(_) => inc(&self.stats.bad_datagram, 1),
            Incoming::Frame(f) => return self.on_common(link, f),
        }
        Ok(())
    }

    /// Frames either kind of peer may send.
    fn on_common(&self, conn: &Conn, frame: Frame<'_>) -> Result<(), Stop> {
        match frame {
            Frame::Ping(data) => self.control(conn, &Frame::Pong(data)),
            Frame::KeepAlive | Frame::Pong(_) => {}
            Frame::Error { code, message } => {
                tracing::debug!(key = %conn.key, %code, message, "peer sent an error");
                return Err(Stop::Quiet);
            }
            other => {
                return Err(Stop::Answer(
                    ErrorCode::UnexpectedFrame,
                    format!(
                        "frame type {:#04x} is not allowed from a {:?} after the handshake",
                        other.frame_type(),
                        conn.role
                    ),
                ))
            }
        }
        Ok(())
    }

    /// Serves one connection from its first byte to its end.
    async fn serve(self: Arc<Self>, mut io: Io, transport: Transport, peer: SocketAddr) {
        let mut nonce = [0u8; 32];
        rand::rng().fill_bytes(&mut nonce);
        let hello = Frame::ServerHello {
            relay_key: self.key,
            nonce,
        };
        if io.write_frame(&hello).await.is_err() {
            return;
        }
        let (code, message) = match self.authenticate(&mut io, &nonce).await {
            Ok((key, role)) => return self.run(io, key, role, transport, peer).await,
            Err(Some(refusal)) => refusal,
            Err(None) => return,
        };
        inc(&self.stats.refused, 1);
        tracing::debug!(%peer, %code, message, "refused a client");
        io.refuse(code, &message).await;
    }

    /// Waits for `ClientAuth` and checks it. `Err(None)`: the client left.
    async fn authenticate(
        &self,
        io: &mut Io,
        nonce: &[u8; 32],
    ) -> Result<(NodeKey, Role), Option<(ErrorCode, String)>> {
        let timeout = self.limits.handshake_timeout;
        let (node_key, proof) = match tokio::time::timeout(timeout, io.read_handshake()).await {
            Err(_) => {
                return Err(Some((
                    ErrorCode::HandshakeTimeout,
                    format!("no ClientAuth within {timeout:?} of connecting"),
                )))
            }
            Ok(Ok(Handshake::ClientAuth { node_key, proof })) => (node_key, proof),
            Ok(Ok(Handshake::Error { .. }))
            | Ok(Err(HandshakeError::Closed | HandshakeError::Io(_))) => return Err(None),
            Ok(Err(HandshakeError::Malformed(e))) => {
                return Err(Some((ErrorCode::Malformed, e.to_string())))
            }
            Ok(Ok(other)) => {
                return Err(Some((
                    ErrorCode::UnexpectedFrame,
                    format!("expected ClientAuth, got {}", other.name()),
                )))
            }
        };
        let input = ProofInput {
            purpose: Purpose::Relay,
            coordinator_key: self.key,
            node_key,
            nonce,
            channel_binding: &io.binding,
            extra: &[],
        };
        match auth::verify(&input, &self.secret, &proof) {
            Ok(()) => {}
            Err(AuthError::LowOrderKey(_)) => {
                return Err(Some((
                    ErrorCode::InvalidKey,
                    format!("key {node_key} is a low-order point"),
                )))
            }
            Err(e) => return Err(Some((ErrorCode::BadProof, e.to_string()))),
        }
        match self.members.role_of(&node_key) {
            Some(role) => Ok((node_key, role)),
            None => Err(Some((
                ErrorCode::NotMember,
                format!("key {node_key} is not a member of this mesh: the coordinator must admit it first"),
            ))),
        }
    }

    /// An authenticated connection: registered, driven, unregistered.
    async fn run(
        self: Arc<Self>,
        io: Io,
        key: NodeKey,
        role: Role,
        transport: Transport,
        peer: SocketAddr,
    ) {
        let conn = self.new_conn(key, role, transport);
        conn.mailbox.push_control(&Frame::ServerOk);
        let _registered = Registered::new(&self, &conn);
        // Checked again now that it is registered: a removal between the
        // first check and the registration would otherwise be missed.
        if self.members.role_of(&key) != Some(role) {
            self.enforce_members();
        }
        tracing::debug!(%peer, %key, ?role, %transport, "client connected");
        let end = match role {
            Role::Node => {
                drive(io, &conn.mailbox, &self.stats.out, |i| {
                    self.on_node(&conn, i)
                })
                .await
            }
            Role::Relay => {
                drive(io, &conn.mailbox, &self.stats.out, |i| {
                    self.on_relay(&conn, i)
                })
                .await
            }
        };
        tracing::debug!(%peer, %key, ?end, "client disconnected");
    }

    /// One link to a meshed relay, dialled by us, until it ends.
    async fn link_once(self: &Arc<Self>, peer: &MeshPeer) -> Result<End, ClientError> {
        let failed = |reason: String| ClientError::Connect {
            addr: peer.addr.clone(),
            reason,
        };
        let target = tokio::net::lookup_host(&peer.addr)
            .await
            .map_err(|e| failed(e.to_string()))?
            .next()
            .ok_or_else(|| failed("name has no address".into()))?;
        let want = NodeKey(peer.key.to_bytes());
        // Frames the peer sent right after ServerOk stay in `io`'s decoder.
        let io = tokio::time::timeout(self.limits.handshake_timeout, async {
            let mut io = connect_tls(&peer.addr, target, peer.pin).await?;
            client_handshake(&mut io, &self.secret, Some(want)).await?;
            Ok::<_, ClientError>(io)
        })
        .await
        .map_err(|_| failed("handshake timed out".into()))??;
        if self.members.role_of(&want) != Some(Role::Relay) {
            return Err(failed(
                "its key is not a member of the mesh with the role relay".into(),
            ));
        }
        let conn = self.new_conn(want, Role::Relay, Transport::Tls);
        let _registered = Registered::new(self, &conn);
        tracing::info!(relay = %peer.addr, "mesh link up");
        Ok(drive(io, &conn.mailbox, &self.stats.out, |i| {
            self.on_relay(&conn, i)
        })
        .await)
    }
}

/// A connection's place in the routes, given up when it is dropped: when
/// its task ends, and also when the task is aborted (a mesh peer removed).
struct Registered {
    shared: Arc<Shared>,
    conn: Arc<Conn>,
}

impl Registered {
    fn new(shared: &Arc<Shared>, conn: &Arc<Conn>) -> Self {
        shared.register(conn);
        Registered {
            shared: shared.clone(),
            conn: conn.clone(),
        }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.shared.unregister(&self.conn);
    }
}

async fn accept_tcp(
    shared: Arc<Shared>,
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!(error = %e, "TCP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (shared, acceptor) = (shared.clone(), acceptor.clone());
        tokio::spawn(async move {
            tune_tcp(&stream);
            let timeout = shared.limits.handshake_timeout;
            let label = meshd_proto::relay::EXPORTER_LABEL;
            let Some((tls, binding)) =
                meshd_control::listen::accept_tls(&acceptor, stream, peer, timeout, label).await
            else {
                return;
            };
            let (r, w) = tokio::io::split(tls);
            let io = Io {
                reader: Box::new(r),
                writer: Box::new(w),
                quic: None,
                decoder: Default::default(),
                binding,
            };
            shared.serve(io, Transport::Tls, peer).await;
        });
    }
}

fn stun_socket(addr: SocketAddr) -> io::Result<tokio::net::UdpSocket> {
    let s = udp_socket(addr)?;
    s.set_nonblocking(true)?;
    tokio::net::UdpSocket::from_std(s)
}

async fn accept_quic(shared: Arc<Shared>, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let peer = incoming.remote_address();
            let timeout = shared.limits.handshake_timeout;
            let io = tokio::time::timeout(timeout, async {
                let conn = incoming.await?;
                let binding = quic_binding(&conn)?;
                // The relay speaks first, so it opens the stream: one opened
                // by the client would stay invisible until it sent on it.
                let (send, recv) = conn.open_bi().await?;
                Ok::<_, io::Error>(Io {
                    reader: Box::new(recv),
                    writer: Box::new(send),
                    quic: Some(conn),
                    decoder: Default::default(),
                    binding,
                })
            })
            .await;
            match io {
                Ok(Ok(io)) => shared.serve(io, Transport::Quic, peer).await,
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "QUIC connection failed"),
                Err(_) => tracing::debug!(%peer, "QUIC handshake timed out"),
            }
        });
    }
}

async fn enforce_members(shared: Arc<Shared>, mut changed: tokio::sync::watch::Receiver<u64>) {
    while changed.changed().await.is_ok() {
        shared.enforce_members();
    }
}

/// Keeps a link to `peer` up, reconnecting with backoff.
async fn dial_relay(shared: Arc<Shared>, peer: MeshPeer) {
    const FIRST: Duration = Duration::from_millis(250);
    let mut backoff = FIRST;
    loop {
        match shared.link_once(&peer).await {
            Ok(end) => {
                tracing::info!(relay = %peer.addr, ?end, "mesh link down");
                backoff = FIRST;
            }
            Err(e) => {
                tracing::warn!(relay = %peer.addr, error = %e, "cannot link to a meshed relay")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

async fn log_counters(shared: Arc<Shared>, every: Duration) {
    let mut tick = tokio::time::interval(every.max(Duration::from_secs(1)));
    tick.tick().await;
    loop {
        tick.tick().await;
        let c = shared.counters();
        tracing::info!(
            tls = c.clients_tls,
            quic = c.clients_quic,
            links = c.mesh_links,
            packets_in = c.packets_in,
            bytes_in = c.bytes_in,
            packets_out = c.packets_out,
            bytes_out = c.bytes_out,
            queued = c.queued_bytes,
            drop_queue_full = c.drops.queue_full,
            drop_no_route = c.drops.no_route,
            drop_forward = c.drops.forward_no_route,
            drop_control = c.drops.control_full,
            refused = c.refused,
            stun = c.stun_requests,
            "relay counters"
        );
    }
}

/// Answers STUN Binding requests with the address they came from.
async fn serve_stun(shared: Arc<Shared>, socket: tokio::net::UdpSocket) {
    let mut buf = vec![0u8; 2048];
    let mut out = Vec::with_capacity(64);
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "STUN receive failed");
                continue;
            }
        };
        match stun::parse_binding_request(&buf[..n]) {
            Ok(txid) => {
                // A dual-stack socket shows IPv4 clients as ::ffff:a.b.c.d.
                let observed = SocketAddr::new(from.ip().to_canonical(), from.port());
                stun::write_binding_response(txid, observed, &mut out);
                if let Err(e) = socket.send_to(&out, from).await {
                    tracing::debug!(%from, error = %e, "STUN answer not sent");
                }
                inc(&shared.stats.stun_requests, 1);
            }
            Err(e) => tracing::trace!(%from, error = %e, "not a STUN Binding request"),
        }
    }
}
