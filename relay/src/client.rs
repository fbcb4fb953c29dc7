//! A node's connection to a relay: authenticate with the node's key, then
//! send datagrams to other nodes' keys and receive theirs.
//!
//! [`RelayClient::connect`] returns once the relay has accepted the node.
//! Sending never waits: [`RelaySender::send`] queues the datagram (within a
//! byte limit, dropping and counting beyond it) for the connection's task,
//! which writes queued packets in batches. Received datagrams and
//! `PeerGone` notices come out of [`RelayClient::recv`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use meshd_proto::relay::{split_datagram, Frame, MAX_DATAGRAM};
use meshd_proto::NodeKey;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::conn::{
    client_handshake, connect_quic, connect_tls, drive, Cut, End, Incoming, Io, Mailbox, Stop,
    Traffic,
};
use crate::{ClientError, Transport};

pub use meshd_proto::relay::{ErrorCode, GoneReason};

/// Which transports to try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportChoice {
    Quic,
    Tls,
    /// QUIC, and TLS/TCP too if QUIC is not up within the head start (or
    /// has failed); the first to be accepted is used.
    Auto,
}

/// How to reach a relay and what to hold for it.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// `host:port`; QUIC and TLS/TCP share the port.
    pub addr: String,
    /// SHA-256 of the relay's certificate.
    pub pin: [u8; 32],
    /// The relay's static key, if known: a relay presenting another is
    /// refused. Without it the pinned certificate vouches for the key.
    pub relay_key: Option<PublicKey>,
    pub transport: TransportChoice,
    /// See [`TransportChoice::Auto`].
    pub quic_head_start: Duration,
    /// Transport and relay handshake together.
    pub handshake_timeout: Duration,
    /// QUIC keep-alive interval (a NAT mapping outlives it).
    pub keep_alive: Duration,
    /// Datagrams queued for sending, in bytes of frames.
    pub queue_bytes: usize,
    /// Events received but not yet taken by [`RelayClient::recv`]; beyond
    /// it received datagrams are dropped and counted.
    pub event_queue: usize,
}

impl ClientOptions {
    pub fn new(addr: impl Into<String>, pin: [u8; 32]) -> Self {
        ClientOptions {
            addr: addr.into(),
            pin,
            relay_key: None,
            transport: TransportChoice::Auto,
            quic_head_start: Duration::from_millis(500),
            handshake_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(5),
            queue_bytes: 1 << 20,
            event_queue: 4096,
        }
    }
}

/// What the relay delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A datagram from the node holding `src` (the relay checked it).
    Packet { src: PublicKey, datagram: Bytes },
    /// Datagrams for `key` cannot be delivered now.
    PeerGone { key: PublicKey, reason: GoneReason },
}

/// Why [`RelaySender::send`] did not queue a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("the relay send queue is full; the datagram was dropped")]
    QueueFull,
    #[error("datagram larger than the relay's limit of {MAX_DATAGRAM} bytes")]
    TooLarge,
    #[error("the connection to the relay has ended")]
    Closed,
}

/// The client's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ClientCounters {
    pub packets_sent: u64,
    pub bytes_sent: u64,
    pub packets_received: u64,
    pub bytes_received: u64,
    /// Datagrams not sent because the send queue was full.
    pub send_dropped: u64,
    /// Datagrams received but dropped because `recv` fell behind.
    pub recv_dropped: u64,
    pub peer_gone: u64,
}

#[derive(Debug)]
struct Shared {
    mailbox: Mailbox,
    sent: Traffic,
    received: Traffic,
    send_dropped: AtomicU64,
    recv_dropped: AtomicU64,
    peer_gone: AtomicU64,
    pings: Mutex<HashMap<[u8; 8], oneshot::Sender<()>>>,
    next_ping: AtomicU64,
    /// Why the connection ended, once it has.
    ended: Mutex<Option<ClientError>>,
}

/// A cheap handle for sending, for threads other than the one that
/// receives (the data plane's engine).
#[derive(Debug, Clone)]
pub struct RelaySender {
    shared: Arc<Shared>,
}

impl RelaySender {
    /// Queues `datagram` for the node holding `dst`. Never waits.
    pub fn send(&self, dst: &PublicKey, datagram: &[u8]) -> Result<(), SendError> {
        if datagram.len() > MAX_DATAGRAM {
            return Err(SendError::TooLarge);
        }
        if self.is_closed() {
            return Err(SendError::Closed);
        }
        let dst = NodeKey(dst.to_bytes());
        // Queued per destination, so one busy peer does not crowd out the
        // packets for the others.
        let pushed = self
            .shared
            .mailbox
            .push_packet(dst, &Frame::SendPacket { dst, datagram });
        if pushed.dropped > 0 {
            self.shared
                .send_dropped
                .fetch_add(pushed.dropped, Ordering::Relaxed);
        }
        if pushed.queued {
            Ok(())
        } else {
            Err(SendError::QueueFull)
        }
    }

    /// The round-trip time to the relay, measured with a Ping: also how a
    /// node notices a relay that vanished without closing (a killed host
    /// sends no FIN, and TCP would take minutes to tell).
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        if self.is_closed() {
            return Err(ClientError::Closed);
        }
        let shared = &self.shared;
        let id = shared
            .next_ping
            .fetch_add(1, Ordering::Relaxed)
            .to_be_bytes();
        let (tx, rx) = oneshot::channel();
        shared
            .pings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, tx);
        let start = Instant::now();
        if !shared.mailbox.push_control(&Frame::Ping(id)) {
            shared
                .pings
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
            return Err(ClientError::Failed("the control queue is full".into()));
        }
        match tokio::time::timeout(PING_TIMEOUT, rx).await {
            Ok(Ok(())) => Ok(start.elapsed()),
            Ok(Err(_)) => Err(ClientError::Closed),
            Err(_) => {
                shared
                    .pings
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&id);
                Err(ClientError::PingTimeout(PING_TIMEOUT))
            }
        }
    }

    fn is_closed(&self) -> bool {
        self.shared
            .ended
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }
}

/// A node's connection to a relay.
#[derive(Debug)]
pub struct RelayClient {
    sender: RelaySender,
    events: mpsc::Receiver<Event>,
    task: Option<JoinHandle<()>>,
    relay_key: PublicKey,
    transport: Transport,
    remote: SocketAddr,
    endpoint: Option<quinn::Endpoint>,
}

/// How long a ping waits for its pong.
const PING_TIMEOUT: Duration = Duration::from_secs(5);

impl RelayClient {
    /// Connects to the relay and authenticates as the holder of `secret`.
    /// Must run inside a tokio runtime, whose task then carries the
    /// connection.
    pub async fn connect(opts: &ClientOptions, secret: &StaticSecret) -> Result<Self, ClientError> {
        let failed = |reason: String| ClientError::Connect {
            addr: opts.addr.clone(),
            reason,
        };
        let target = tokio::net::lookup_host(&opts.addr)
            .await
            .map_err(|e| failed(e.to_string()))?
            .next()
            .ok_or_else(|| failed("name has no address".into()))?;
        let expect = opts.relay_key.map(|k| NodeKey(k.to_bytes()));
        let attempt = |transport| async move {
            tokio::time::timeout(opts.handshake_timeout, async {
                let (mut io, endpoint) = match transport {
                    Transport::Quic => {
                        let (io, e) =
                            connect_quic(&opts.addr, target, opts.pin, opts.keep_alive).await?;
                        (io, Some(e))
                    }
                    Transport::Tls => (connect_tls(&opts.addr, target, opts.pin).await?, None),
                };
                let key = client_handshake(&mut io, secret, expect).await?;
                Ok((io, endpoint, key, transport))
            })
            .await
            .map_err(|_| ClientError::Connect {
                addr: opts.addr.clone(),
                reason: format!("{transport} handshake timed out"),
            })?
        };
        let (io, endpoint, key, transport) = match opts.transport {
            TransportChoice::Quic => attempt(Transport::Quic).await?,
            TransportChoice::Tls => attempt(Transport::Tls).await?,
            TransportChoice::Auto => {
                let (quic_failed, quic_failed_rx) = oneshot::channel::<()>();
                let quic = async {
                    let r = attempt(Transport::Quic).await;
                    if r.is_err() {
                        let _ = quic_failed.send(());
                    }
                    r
                };
                let tls = async {
                    let _ = tokio::time::timeout(opts.quic_head_start, quic_failed_rx).await;
                    attempt(Transport::Tls).await
                };
                tokio::pin!(quic, tls);
                let (mut quic_err, mut tls_err) = (None, None);
                loop {
                    tokio::select! {
                        r = &mut quic, if quic_err.is_none() => match r {
                            Ok(c) => break c,
                            // The relay answered and refused: TLS would be refused too.
                            Err(e @ (ClientError::Refused { .. } | ClientError::WrongRelayKey { .. })) => return Err(e),
                            Err(e) => quic_err = Some(e),
                        },
                        r = &mut tls, if tls_err.is_none() => match r {
                            Ok(c) => break c,
                            Err(e @ (ClientError::Refused { .. } | ClientError::WrongRelayKey { .. })) => return Err(e),
                            Err(e) => tls_err = Some(e),
                        },
                    }
                    if let (Some(q), Some(t)) = (&quic_err, &tls_err) {
                        return Err(failed(format!("{q}; {t}")));
                    }
                }
            }
        };
        tracing::debug!(relay = %opts.addr, %transport, "connected to the relay");
        Ok(Self::start(io, endpoint, key, transport, target, opts))
    }

    fn start(
        io: Io,
        endpoint: Option<quinn::Endpoint>,
        relay_key: NodeKey,
        transport: Transport,
        remote: SocketAddr,
        opts: &ClientOptions,
    ) -> Self {
        let shared = Arc::new(Shared {
            mailbox: Mailbox::new(opts.queue_bytes, 64 << 10),
            sent: Traffic::default(),
            received: Traffic::default(),
            send_dropped: AtomicU64::new(0),
            recv_dropped: AtomicU64::new(0),
            peer_gone: AtomicU64::new(0),
            pings: Mutex::new(HashMap::new()),
            next_ping: AtomicU64::new(1),
            ended: Mutex::new(None),
        });
        let (tx, events) = mpsc::channel(opts.event_queue.max(1));
        let task_shared = shared.clone();
        let task = tokio::spawn(async move {
            let shared = task_shared;
            let mut arena = BytesMut::new();
            let end = drive(io, &shared.mailbox, &shared.sent, |incoming| {
                on_incoming(&shared, &tx, &mut arena, incoming)
            })
            .await;
            let mut ended = shared.ended.lock().unwrap_or_else(PoisonError::into_inner);
            if ended.is_none() {
                *ended = Some(match end {
                    End::Failed(e) => ClientError::Failed(e),
                    End::Refused(_, message) => ClientError::Protocol(message),
                    End::Closed | End::Cut | End::Quiet => ClientError::Closed,
                });
            }
            // Pending pings learn of the end by their senders dropping.
            shared
                .pings
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
        });
        RelayClient {
            sender: RelaySender { shared },
            events,
            task: Some(task),
            relay_key: PublicKey::from(relay_key.0),
            transport,
            remote,
            endpoint,
        }
    }

    /// A handle that sends on this connection from anywhere.
    pub fn sender(&self) -> RelaySender {
        self.sender.clone()
    }

    /// See [`RelaySender::send`].
    pub fn send(&self, dst: &PublicKey, datagram: &[u8]) -> Result<(), SendError> {
        self.sender.send(dst, datagram)
    }

    /// The next datagram or notice. Once the connection has ended and
    /// everything received was taken: why it ended
    /// ([`ClientError::Refused`] if the relay cut it, e.g. as the key stopped
    /// being a member). Cancel-safe.
    pub async fn recv(&mut self) -> Result<Event, ClientError> {
        match self.events.recv().await {
            Some(e) => Ok(e),
            None => Err(self
                .shared()
                .ended
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
                .unwrap_or(ClientError::Closed)),
        }
    }

    /// See [`RelaySender::ping`].
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        self.sender.ping().await
    }

    pub fn counters(&self) -> ClientCounters {
        let s = self.shared();
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ClientCounters {
            packets_sent: get(&s.sent.packets),
            bytes_sent: get(&s.sent.bytes),
            packets_received: get(&s.received.packets),
            bytes_received: get(&s.received.bytes),
            send_dropped: get(&s.send_dropped),
            recv_dropped: get(&s.recv_dropped),
            peer_gone: get(&s.peer_gone),
        }
    }

    /// The relay's static key (from its handshake).
    pub fn relay_key(&self) -> PublicKey {
        self.relay_key
    }

    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// The relay's address.
    pub fn remote(&self) -> SocketAddr {
        self.remote
    }

    /// Ends the connection politely: what is queued is dropped, the stream
    /// closed and, for QUIC, the connection, so the relay notices at once.
    pub async fn close(mut self) {
        self.sender.shared.mailbox.cut(Cut::Close);
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
        }
        if let Some(endpoint) = self.endpoint.take() {
            let _ = tokio::time::timeout(Duration::from_millis(200), endpoint.wait_idle()).await;
        }
    }

    fn shared(&self) -> &Shared {
        &self.sender.shared
    }
}

impl Drop for RelayClient {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// What the relay sent, turned into events.
fn on_incoming(
    shared: &Shared,
    events: &mpsc::Sender<Event>,
    arena: &mut BytesMut,
    incoming: Incoming<'_>,
) -> Result<(), Stop> {
    let (src, datagram) = match incoming {
        // Over QUIC the datagram is a slice of what quinn handed over.
        Incoming::Datagram(payload) => match split_datagram(payload) {
            Some((src, _)) => (src, payload.slice(32..)),
            None => return Ok(()),
        },
        Incoming::Frame(Frame::RecvPacket { src, datagram }) => {
            // Copied into a shared arena: one allocation per many packets.
            if arena.capacity() < datagram.len() {
                arena.reserve((256 << 10).max(datagram.len()));
            }
            arena.extend_from_slice(datagram);
            (src, arena.split().freeze())
        }
        Incoming::Frame(Frame::PeerGone { key, reason }) => {
            shared.peer_gone.fetch_add(1, Ordering::Relaxed);
            let _ = events.try_send(Event::PeerGone {
                key: PublicKey::from(key.0),
                reason,
            });
            return Ok(());
        }
        Incoming::Frame(Frame::Pong(id)) => {
            let waiter = shared
                .pings
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
            if let Some(w) = waiter {
                let _ = w.send(());
            }
            return Ok(());
        }
        Incoming::Frame(Frame::Ping(id)) => {
            shared.mailbox.push_control(&Frame::Pong(id));
            return Ok(());
        }
        Incoming::Frame(Frame::KeepAlive) => return Ok(()),
        Incoming::Frame(Frame::Error { code, message }) => {
            *shared.ended.lock().unwrap_or_else(PoisonError::into_inner) =
                Some(ClientError::Refused {
                    code,
                    message: message.to_owned(),
                });
            return Err(Stop::Quiet);
        }
        Incoming::Frame(other) => {
            return Err(Stop::Answer(
                ErrorCode::UnexpectedFrame,
                format!(
                    "frame type {:#04x} is not sent to nodes",
                    other.frame_type()
                ),
            ))
        }
    };
    let len = datagram.len() as u64;
    tracing::trace!(%src, len, "datagram from the relay");
    let event = Event::Packet {
        src: PublicKey::from(src.0),
        datagram,
    };
    if events.try_send(event).is_ok() {
        shared.received.packets.fetch_add(1, Ordering::Relaxed);
        shared.received.bytes.fetch_add(len, Ordering::Relaxed);
    } else {
        shared.recv_dropped.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}
