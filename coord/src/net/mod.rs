//! The thin drivers: the framed control protocol over QUIC (UDP) and over
//! TLS on TCP, both on the same port number.
//!
//! The [`Coordinator`] runs on a thread of its own (its store may block, and
//! the PostgreSQL client must not run inside an async runtime). Connection
//! tasks decode frames and send events to it; it answers by encoding frames
//! into each connection's [`Outbox`], from which the connection's task takes
//! everything queued in one write. Nothing here decides anything: every
//! protocol decision is the core's.

pub mod tls;

// The node's end lives in `meshd_control` (a node must not link the
// coordinator's databases); re-exported for tests and tools that play a node.
pub use meshd_control::{ClientConn, ConnError, Transport};

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use meshd_control::quic_binding;
use meshd_proto::{encode_frame, DecodeError, EncodeError, FrameDecoder, Message};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

use crate::coordinator::{Action, Coordinator, SessionId};
use crate::store::StoreError;
use tls::{Identity, IdentityError};

/// How long a connection may take to finish its TLS or QUIC handshake. The
/// control protocol's own handshake timeout is the core's.
const TRANSPORT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The receive buffer asked for on the QUIC socket. Every node's packets
/// (handshakes, ACKs of the deltas, keep-alives) arrive on this one socket;
/// with the Linux default (208 KiB, about 100 QUIC datagrams) a join storm
/// overflows it while the endpoint is busy, and the kernel drops new nodes'
/// handshake packets along with everything else (docs/benchmarks.md,
/// "Coordinator scale"). 8 MiB holds several thousand datagrams.
const UDP_RECV_BUFFER: usize = 8 << 20;

/// The read buffer of a session on TLS/TCP. rustls holds decrypted records
/// itself, so this only sets how much one read copies out; nodes send small
/// messages (a Register, an endpoint report), and a larger frame just takes
/// several reads. QUIC sessions need none: quinn hands out the chunks it holds.
const TLS_READ_BUFFER: usize = 1024;

/// Flow-control limits for what a node may send before the coordinator has
/// read it, per control session: nodes send a few small messages, so 64 KiB
/// never slows them, and it bounds what quinn buffers for one session (the
/// default, 1.25 MB per stream and no connection limit, would let 10,000
/// nodes make the coordinator hold gigabytes).
const QUIC_RECEIVE_WINDOW: u32 = 64 * 1024;

/// The QUIC transport settings for control sessions. quinn's defaults suit
/// bulk transfer; a control session is one coordinator-opened stream of small
/// frames, and at 10,000 sessions every per-connection byte counts
/// (docs/benchmarks.md, "Coordinator scale", measured with heaptrack):
/// - Nodes open no streams (the coordinator opens the session's one stream),
///   so the node-initiated stream limits are 0. quinn pre-allocates hash map
///   slots for every stream the peer may open: 9 KiB per connection with the
///   defaults of 100 bidirectional and 100 unidirectional.
/// - No unreliable datagrams are used, so none are accepted.
/// - No segmentation offload and no path MTU discovery: quinn keeps a
///   transmit buffer per connection sized for one batch of datagrams (10 with
///   GSO, 15 KiB; it still grew to 3.6 KiB without GSO as discovery raised
///   the MTU). Control frames are small: a batch and bigger datagrams only
///   help when a big peer map goes out, which then takes more `sendmsg`
///   calls and 1,200-byte datagrams, the size every QUIC path carries.
/// - The receive windows, see [`QUIC_RECEIVE_WINDOW`].
///
/// The keep-alive comes from nodes (`meshd_control`); the idle timeout stays
/// quinn's 30 s (the smaller of the two sides' applies).
pub fn control_transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(0u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .datagram_receive_buffer_size(None)
        .enable_segmentation_offload(false)
        .mtu_discovery_config(None)
        .stream_receive_window(QUIC_RECEIVE_WINDOW.into())
        .receive_window(QUIC_RECEIVE_WINDOW.into());
    t
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("the coordinator thread has stopped")]
    Stopped,
    #[error("connection: {0}")]
    Io(#[from] io::Error),
}

/// Wakes the coordinator thread when the store has remote changes.
pub type StoreWaker = Box<dyn Fn() + Send + 'static>;

type Call = Box<dyn FnOnce(&mut Coordinator, SystemTime) + Send>;

enum Event {
    Open {
        conn: u64,
        binding: Vec<u8>,
        out: Arc<Outbox>,
    },
    Message {
        conn: u64,
        msg: Message,
    },
    Malformed {
        conn: u64,
        error: DecodeError,
    },
    Closed {
        conn: u64,
    },
    StoreChanged,
    Call(Call),
    Stop,
}

/// What the core has for one session and its task has not written yet:
/// frames queued while the task was writing earlier ones (a slow node, a
/// join storm) go out together in one write, and a session with nothing to
/// send holds no buffer. Unbounded, like the core's queue of actions.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    pending: Mutex<Pending>,
    ready: Notify,
}

#[derive(Debug, Default)]
pub(crate) struct Pending {
    /// Whole frames, in order.
    pub(crate) bytes: Vec<u8>,
    /// Write `bytes`, then end the session.
    pub(crate) close: bool,
}

impl Outbox {
    /// Appends `msg` as a frame; on error nothing is queued.
    pub(crate) fn push(&self, msg: &Message) -> Result<(), EncodeError> {
        let mut p = self.lock();
        if p.close {
            return Ok(());
        }
        encode_frame(msg, &mut p.bytes)?;
        drop(p);
        self.ready.notify_one();
        Ok(())
    }

    /// Ends the session once what is queued has been written.
    pub(crate) fn close(&self) {
        self.lock().close = true;
        self.ready.notify_one();
    }

    /// Waits until there is something to write or the session is to close,
    /// and takes all of it. Cancel-safe: nothing is taken until it returns.
    pub(crate) async fn take(&self) -> Pending {
        loop {
            {
                let mut p = self.lock();
                if !p.bytes.is_empty() || p.close {
                    return std::mem::take(&mut *p);
                }
            }
            self.ready.notified().await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        // Nothing panics while holding the lock, and a half-appended frame
        // cannot be seen: `encode_frame` truncates what it added on error.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running coordinator with its QUIC and TCP listeners.
pub struct Server {
    /// Where the control protocol listens: QUIC on UDP and TLS on TCP share
    /// the address and port.
    pub quic_addr: SocketAddr,
    events: mpsc::Sender<Event>,
    core: Option<std::thread::JoinHandle<()>>,
    endpoint: quinn::Endpoint,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("quic_addr", &self.quic_addr)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Listens for QUIC on UDP `listen` and for TLS on TCP at the same address
    /// and port (with port 0, TCP takes the port UDP was given), and runs the
    /// coordinator that `build` makes on its own thread. `build` gets a waker
    /// for the store to call when other replicas wrote something.
    pub async fn start(
        identity: &Identity,
        listen: SocketAddr,
        build: impl FnOnce(StoreWaker) -> Result<Coordinator, StoreError> + Send + 'static,
    ) -> Result<Server, NetError> {
        let server_tls = Arc::new(identity.server_config()?);
        let quic_crypto = quinn::crypto::rustls::QuicServerConfig::try_from(server_tls.clone())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let mut quic_config = quinn::ServerConfig::with_crypto(Arc::new(quic_crypto));
        quic_config.transport_config(Arc::new(control_transport_config()));
        let bind_err = |source| NetError::Bind {
            addr: listen,
            source,
        };
        let (socket, tcp) =
            meshd_control::listen::bind_pair(listen, |a| bind_udp(a, UDP_RECV_BUFFER))
                .await
                .map_err(|e| NetError::Bind {
                    addr: e.addr,
                    source: e.source,
                })?;
        let runtime = quinn::default_runtime()
            .ok_or_else(|| bind_err(io::Error::other("no async runtime")))?;
        let endpoint = quinn::Endpoint::new(
            restartable_endpoint(identity),
            Some(quic_config),
            socket,
            runtime,
        )
        .map_err(bind_err)?;
        let quic_addr = endpoint.local_addr()?;
        let tcp_addr = tcp.local_addr()?;

        let (events, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let waker_events = events.clone();
        let core = std::thread::Builder::new()
            .name("meshd-coord".into())
            .spawn(move || {
                let waker: StoreWaker = Box::new(move || {
                    let _ = waker_events.send(Event::StoreChanged);
                });
                match build(waker) {
                    Ok(coord) => {
                        let _ = ready_tx.send(Ok(()));
                        core_loop(coord, &rx);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })?;
        ready_rx.await.map_err(|_| NetError::Stopped)??;

        let next_conn = Arc::new(AtomicU64::new(1));
        let quic_task = tokio::spawn(accept_quic(
            endpoint.clone(),
            events.clone(),
            next_conn.clone(),
        ));
        let acceptor = tokio_rustls::TlsAcceptor::from(server_tls);
        let tcp_task = tokio::spawn(accept_tcp(tcp, acceptor, events.clone(), next_conn));
        tracing::info!(%quic_addr, %tcp_addr, "coordinator listening");
        Ok(Server {
            quic_addr,
            events,
            core: Some(core),
            endpoint,
            tasks: vec![quic_task, tcp_task],
        })
    }

    /// Runs `f` on the coordinator's thread (administration: tokens, nodes).
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Coordinator, SystemTime) -> R + Send + 'static,
    ) -> Result<R, NetError> {
        self.caller().call(f).await
    }

    /// A handle for [`Server::call`] that other tasks can keep (the admin
    /// API); it does not keep the coordinator running after
    /// [`Server::shutdown`].
    pub fn caller(&self) -> Caller {
        Caller {
            events: self.events.clone(),
        }
    }

    /// Stops listening, closes every connection and stops the coordinator.
    pub async fn shutdown(mut self) {
        self.stop();
        if let Some(core) = self.core.take() {
            let _ = tokio::task::spawn_blocking(move || core.join()).await;
        }
    }

    fn stop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.endpoint.close(0u32.into(), b"coordinator stopping");
        let _ = self.events.send(Event::Stop);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs functions on the coordinator's thread; see [`Server::caller`].
#[derive(Clone)]
pub struct Caller {
    events: mpsc::Sender<Event>,
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caller").finish_non_exhaustive()
    }
}

impl Caller {
    /// Runs `f` on the coordinator's thread, between two events, with the
    /// current time. [`NetError::Stopped`] once the coordinator has stopped.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Coordinator, SystemTime) -> R + Send + 'static,
    ) -> Result<R, NetError> {
        let (tx, rx) = oneshot::channel();
        let call: Call = Box::new(move |c, now| {
            let _ = tx.send(f(c, now));
        });
        self.events
            .send(Event::Call(call))
            .map_err(|_| NetError::Stopped)?;
        rx.await.map_err(|_| NetError::Stopped)
    }
}

/// The sessions' outboxes by connection. When the core stops (or panics),
/// every outbox is closed so that the sessions' tasks end.
#[derive(Default)]
struct Conns(BTreeMap<u64, (SessionId, Arc<Outbox>)>);

impl Drop for Conns {
    fn drop(&mut self) {
        for (_, out) in self.0.values() {
            out.close();
        }
    }
}

fn core_loop(mut coord: Coordinator, rx: &mpsc::Receiver<Event>) {
    let mut conns = Conns::default();
    let mut sessions: BTreeMap<SessionId, u64> = BTreeMap::new();
    let mut last_store_poll = Instant::now();
    loop {
        let now = SystemTime::now();
        // Wake for the next timer, and at least once a second to pick up store
        // changes a lost notification would otherwise delay.
        let wait = coord
            .poll_timeout()
            .map_or(Duration::from_secs(1), |t| {
                t.duration_since(now).unwrap_or(Duration::ZERO)
            })
            .min(Duration::from_secs(1));
        let event = match rx.recv_timeout(wait) {
            Ok(Event::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Ok(e) => Some(e),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
        };
        let now = SystemTime::now();
        match event {
            Some(Event::Open { conn, binding, out }) => {
                let session = coord.open_session(&binding, now);
                conns.0.insert(conn, (session, out));
                sessions.insert(session, conn);
            }
            Some(Event::Message { conn, msg }) => {
                if let Some((session, _)) = conns.0.get(&conn) {
                    coord.handle_message(*session, msg, now);
                }
            }
            Some(Event::Malformed { conn, error }) => {
                if let Some((session, _)) = conns.0.get(&conn) {
                    coord.handle_decode_error(*session, &error, now);
                }
            }
            Some(Event::Closed { conn }) => {
                if let Some((session, _)) = conns.0.remove(&conn) {
                    sessions.remove(&session);
                    coord.close_session(session, now);
                }
            }
            Some(Event::StoreChanged) => last_store_poll = Instant::now() - Duration::from_secs(2),
            Some(Event::Call(f)) => f(&mut coord, now),
            Some(Event::Stop) | None => {}
        }
        coord.handle_timeout(now);
        if last_store_poll.elapsed() >= Duration::from_secs(1) {
            last_store_poll = Instant::now();
            if let Err(e) = coord.poll_store(now) {
                tracing::warn!(error = %e, "cannot read other replicas' changes");
            }
        }
        while let Some(action) = coord.poll_action() {
            let session = match &action {
                Action::Send { session, .. } | Action::Close { session } => *session,
            };
            // A session without an outbox is gone already. One whose task
            // has ended keeps its outbox until its Closed event is handled.
            let Some((_, out)) = sessions.get(&session).and_then(|c| conns.0.get(c)) else {
                continue;
            };
            match action {
                Action::Send { message, .. } => {
                    if let Err(e) = out.push(&message) {
                        tracing::error!(?session, error = %e, "cannot encode a message; closing the session");
                        out.close();
                    }
                }
                Action::Close { .. } => out.close(),
            }
        }
    }
}

/// Binds the QUIC socket with a receive buffer of `want` bytes, or as close
/// as the system allows: above `net.core.rmem_max` only a process with
/// CAP_NET_ADMIN gets it (SO_RCVBUFFORCE); others get `rmem_max`, which an
/// administrator can raise.
fn bind_udp(listen: SocketAddr, want: usize) -> io::Result<std::net::UdpSocket> {
    use rustix::net::sockopt;
    let socket = std::net::UdpSocket::bind(listen)?;
    if sockopt::set_socket_recv_buffer_size_force(&socket, want).is_err() {
        if let Err(e) = sockopt::set_socket_recv_buffer_size(&socket, want) {
            tracing::warn!(error = %e, "cannot size the QUIC socket's receive buffer");
        }
    }
    // Linux reports twice the size asked for (the rest is its bookkeeping).
    let got = sockopt::socket_recv_buffer_size(&socket).map_or(0, |b| b / 2);
    if got < want {
        tracing::warn!(
            bytes = got,
            wanted = want,
            "QUIC receive buffer is smaller than asked: a join storm may drop nodes' \
             packets; run with CAP_NET_ADMIN or raise the limit \
             (sysctl -w net.core.rmem_max={want})"
        );
    } else {
        tracing::debug!(bytes = got, "QUIC receive buffer");
    }
    Ok(socket)
}

async fn accept_quic(endpoint: quinn::Endpoint, events: mpsc::Sender<Event>, next: Arc<AtomicU64>) {
    while let Some(incoming) = endpoint.accept().await {
        let (events, conn) = (events.clone(), next.fetch_add(1, Ordering::Relaxed));
        tokio::spawn(async move {
            let result = tokio::time::timeout(TRANSPORT_HANDSHAKE_TIMEOUT, async {
                let connection = incoming.await?;
                let binding = quic_binding(&connection)
                    .map_err(|_| io::Error::other("TLS exporter unavailable"))?;
                // The coordinator speaks first, so it opens the stream: a
                // QUIC stream opened by the node would stay invisible here
                // until the node sent something on it.
                let (send, recv) = connection.open_bi().await?;
                Ok::<_, io::Error>((connection, binding, send, recv))
            })
            .await;
            match result {
                Ok(Ok((connection, binding, send, recv))) => {
                    run_stream(QuicRead(recv), send, conn, binding.to_vec(), events).await;
                    // Closing the connection at once would discard stream data
                    // not yet delivered (the last Error); give the node a moment
                    // to read it and hang up itself.
                    let _ = tokio::time::timeout(Duration::from_secs(2), connection.closed()).await;
                    connection.close(0u32.into(), b"");
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "QUIC connection failed"),
                Err(_) => tracing::debug!("QUIC handshake timed out"),
            }
        });
    }
}

async fn accept_tcp(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    events: mpsc::Sender<Event>,
    next: Arc<AtomicU64>,
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
        let (events, acceptor, conn) = (
            events.clone(),
            acceptor.clone(),
            next.fetch_add(1, Ordering::Relaxed),
        );
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let label = meshd_proto::EXPORTER_LABEL;
            let timeout = TRANSPORT_HANDSHAKE_TIMEOUT;
            let Some((tls, binding)) =
                meshd_control::listen::accept_tls(&acceptor, stream, peer, timeout, label).await
            else {
                return;
            };
            let (r, w) = tokio::io::split(tls);
            let r = BufferedRead {
                inner: r,
                buf: vec![0; TLS_READ_BUFFER].into_boxed_slice(),
            };
            run_stream(r, w, conn, binding.to_vec(), events).await;
        });
    }
}

/// What one read from a session's stream brought.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    /// Bytes, fed to the decoder.
    Bytes,
    /// The node ended its side of the stream cleanly (TLS close_notify, a
    /// QUIC FIN); it may still read.
    End,
    /// The stream failed (reset, TCP closed without close_notify): nothing
    /// more can be sent either.
    Failed,
}

/// The receiving half of a session.
trait ReadHalf {
    /// Waits for bytes and feeds them to `decoder`. Cancel-safe: bytes are
    /// fed in the same poll that takes them from the stream.
    fn read_into(&mut self, decoder: &mut FrameDecoder) -> impl Future<Output = Read> + Send;
}

/// A QUIC stream: quinn's own chunks go to the decoder, no copy, no buffer.
struct QuicRead(quinn::RecvStream);

impl ReadHalf for QuicRead {
    async fn read_into(&mut self, decoder: &mut FrameDecoder) -> Read {
        match self.0.read_chunk(usize::MAX, true).await {
            Ok(Some(chunk)) => {
                decoder.feed(&chunk.bytes);
                Read::Bytes
            }
            Ok(None) => Read::End,
            Err(_) => Read::Failed,
        }
    }
}

/// A byte stream (TLS on TCP), read through a buffer of its own.
struct BufferedRead<R> {
    inner: R,
    buf: Box<[u8]>,
}

impl<R: AsyncRead + Unpin + Send> ReadHalf for BufferedRead<R> {
    async fn read_into(&mut self, decoder: &mut FrameDecoder) -> Read {
        match self.inner.read(&mut self.buf).await {
            Ok(0) => Read::End,
            Err(_) => Read::Failed,
            Ok(n) => {
                decoder.feed(&self.buf[..n]);
                Read::Bytes
            }
        }
    }
}

/// Carries one session: decodes what arrives, writes what the core queues.
async fn run_stream<R, W>(
    mut r: R,
    mut w: W,
    conn: u64,
    binding: Vec<u8>,
    events: mpsc::Sender<Event>,
) where
    R: ReadHalf,
    W: AsyncWrite + Unpin,
{
    let out = Arc::new(Outbox::default());
    if events
        .send(Event::Open {
            conn,
            binding,
            out: out.clone(),
        })
        .is_err()
    {
        return;
    }
    let mut decoder = FrameDecoder::new();
    // After a decoding error nothing more is read: the core answers with an
    // error and a close, which are still written.
    let mut reading = true;
    loop {
        tokio::select! {
            read = r.read_into(&mut decoder), if reading => {
                let error = match read {
                    Read::Failed => break,
                    // Ended inside a frame: malformed, answered as any
                    // other decoding error. Ended between frames: the node
                    // has left; close our side cleanly too (close_notify).
                    Read::End => match decoder.finish() {
                        Err(error) => Some(error),
                        Ok(()) => {
                            let _ = w.shutdown().await;
                            break;
                        }
                    },
                    Read::Bytes => loop {
                        match decoder.next_message() {
                            Ok(Some(msg)) => {
                                let _ = events.send(Event::Message { conn, msg });
                            }
                            Ok(None) => break None,
                            Err(error) => break Some(error),
                        }
                    },
                };
                if let Some(error) = error {
                    let _ = events.send(Event::Malformed { conn, error });
                    reading = false;
                }
            },
            pending = out.take() => {
                if !write_pending(&mut w, pending).await {
                    break;
                }
            },
        }
    }
    let _ = events.send(Event::Closed { conn });
}

/// Writes what was queued, in one write; `false` when the session is over
/// (closed as asked, or the write failed).
async fn write_pending<W: AsyncWrite + Unpin>(w: &mut W, pending: Pending) -> bool {
    if !pending.bytes.is_empty() && w.write_all(&pending.bytes).await.is_err() {
        return false;
    }
    if pending.close {
        let _ = w.flush().await;
        let _ = w.shutdown().await;
        return false;
    }
    true
}

/// An endpoint whose connection IDs and stateless resets survive a restart:
/// both keys are derived from the coordinator's stored identity (quinn's
/// defaults are random at every start). A restarted coordinator (or another
/// replica with the same identity) then recognises its old connection IDs
/// as its own and answers a packet of a session it no longer has with a
/// reset its client accepts, so the client reconnects at once instead of
/// waiting for its idle timeout.
fn restartable_endpoint(identity: &Identity) -> quinn::EndpointConfig {
    use ring::hmac;
    let master = hmac::Key::new(hmac::HMAC_SHA256, identity.static_key.as_bytes());
    let reset = hmac::sign(&master, b"meshd QUIC stateless reset key");
    let cid = hmac::sign(&master, b"meshd QUIC connection ID key");
    let mut cid_key = [0; 8];
    cid_key.copy_from_slice(&cid.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    let mut config =
        quinn::EndpointConfig::new(Arc::new(hmac::Key::new(hmac::HMAC_SHA256, reset.as_ref())));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    config
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};

    use meshd_proto::{encode, NodeId};

    use super::*;

    /// A node that sends nothing.
    struct Silent;

    impl ReadHalf for Silent {
        async fn read_into(&mut self, _: &mut FrameDecoder) -> Read {
            std::future::pending().await
        }
    }

    /// A writer that records each write, and holds writes back while shut.
    #[derive(Default)]
    struct Gate {
        open: bool,
        /// A write has been attempted while shut.
        waiting: bool,
        waker: Option<Waker>,
        writes: Vec<Vec<u8>>,
        shut_down: bool,
    }

    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Gate>>);

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let mut g = self.0.lock().unwrap();
            if !g.open {
                g.waiting = true;
                g.waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            g.writes.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.0.lock().unwrap().shut_down = true;
            Poll::Ready(Ok(()))
        }
    }

    fn frame(i: u64) -> (Message, Vec<u8>) {
        let msg = Message::PeerRemoved(NodeId(i));
        let bytes = encode(&msg).unwrap();
        (msg, bytes)
    }

    async fn until(mut cond: impl FnMut() -> bool) {
        for _ in 0..10_000 {
            if cond() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("condition not reached");
    }

    /// Frames the core queues while a session is still writing earlier ones
    /// (a slow node, a join storm) go out together in one write, in order,
    /// and a close is carried out after what was queued before it.
    #[tokio::test(flavor = "current_thread")]
    async fn frames_queued_while_a_session_writes_are_coalesced_into_one_write() {
        let (events, rx) = mpsc::channel();
        let w = Recorder::default();
        let task = tokio::spawn(run_stream(Silent, w.clone(), 7, vec![], events));
        let out = loop {
            match rx.try_recv() {
                Ok(Event::Open { conn: 7, out, .. }) => break out,
                Ok(_) => panic!("unexpected event"),
                Err(_) => tokio::task::yield_now().await,
            }
        };
        let (m0, f0) = frame(0);
        out.push(&m0).unwrap();
        // The session is now stuck writing the first frame.
        until(|| w.0.lock().unwrap().waiting).await;
        let mut rest = Vec::new();
        for i in 1..=3 {
            let (m, f) = frame(i);
            out.push(&m).unwrap();
            rest.extend(f);
        }
        out.close();
        let waker = {
            let mut g = w.0.lock().unwrap();
            g.open = true;
            g.waker.take()
        };
        waker.unwrap().wake();
        task.await.unwrap();
        let g = w.0.lock().unwrap();
        assert_eq!(g.writes, vec![f0, rest], "one write for the queued frames");
        assert!(g.shut_down, "closed after writing");
        assert!(matches!(rx.try_recv(), Ok(Event::Closed { conn: 7 })));
    }

    /// Nothing queued after a close is sent, and an empty outbox holds no
    /// buffer.
    #[tokio::test(flavor = "current_thread")]
    async fn an_outbox_is_taken_whole() {
        let out = Outbox::default();
        let (m, f) = frame(1);
        out.push(&m).unwrap();
        out.push(&m).unwrap();
        let p = out.take().await;
        assert_eq!(p.bytes, [f.clone(), f].concat());
        assert!(!p.close);
        assert_eq!(out.lock().bytes.capacity(), 0);
        out.close();
        out.push(&m).unwrap();
        let p = out.take().await;
        assert!(p.bytes.is_empty() && p.close);
    }
}
