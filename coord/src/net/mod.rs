//! The thin drivers: the framed control protocol over QUIC (UDP) and over
//! TLS on TCP, both on the same port number.
//!
//! The [`Coordinator`] runs on a thread of its own (its store may block, and
//! the PostgreSQL client must not run inside an async runtime). Connection
//! tasks decode frames and send events to it; it answers with encoded frames
//! on each connection's channel. Nothing here decides anything: every
//! protocol decision is the core's.

pub mod tls;

// The node's end lives in `meshd_control` (a node must not link the
// coordinator's databases); re-exported for tests and tools that play a node.
pub use meshd_control::{ClientConn, ConnError, Transport};

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime};

use meshd_proto::{encode, DecodeError, FrameDecoder, Message};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc as tmpsc, oneshot};
use tokio::task::JoinHandle;

use crate::coordinator::{Action, Coordinator, SessionId};
use crate::store::StoreError;
use meshd_proto::EXPORTER_LABEL;
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
        out: tmpsc::UnboundedSender<Out>,
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

enum Out {
    Frame(Vec<u8>),
    Close,
}

/// A running coordinator with its QUIC and TCP listeners.
pub struct Server {
    pub quic_addr: SocketAddr,
    pub tcp_addr: SocketAddr,
    events: mpsc::Sender<Event>,
    core: Option<std::thread::JoinHandle<()>>,
    endpoint: quinn::Endpoint,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("quic_addr", &self.quic_addr)
            .field("tcp_addr", &self.tcp_addr)
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
        let quic_config = quinn::ServerConfig::with_crypto(Arc::new(quic_crypto));
        let bind_err = |source| NetError::Bind {
            addr: listen,
            source,
        };
        let socket = bind_udp(listen, UDP_RECV_BUFFER).map_err(bind_err)?;
        let runtime = quinn::default_runtime()
            .ok_or_else(|| bind_err(io::Error::other("no async runtime")))?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(quic_config),
            socket,
            runtime,
        )
        .map_err(bind_err)?;
        let quic_addr = endpoint.local_addr()?;
        let tcp_addr = SocketAddr::new(listen.ip(), quic_addr.port());
        let tcp = TcpListener::bind(tcp_addr)
            .await
            .map_err(|source| NetError::Bind {
                addr: tcp_addr,
                source,
            })?;

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
            tcp_addr,
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

fn core_loop(mut coord: Coordinator, rx: &mpsc::Receiver<Event>) {
    let mut conns: BTreeMap<u64, (SessionId, tmpsc::UnboundedSender<Out>)> = BTreeMap::new();
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
                conns.insert(conn, (session, out));
                sessions.insert(session, conn);
            }
            Some(Event::Message { conn, msg }) => {
                if let Some((session, _)) = conns.get(&conn) {
                    coord.handle_message(*session, msg, now);
                }
            }
            Some(Event::Malformed { conn, error }) => {
                if let Some((session, _)) = conns.get(&conn) {
                    coord.handle_decode_error(*session, &error, now);
                }
            }
            Some(Event::Closed { conn }) => {
                if let Some((session, _)) = conns.remove(&conn) {
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
            let (session, out) = match action {
                Action::Send { session, message } => match encode(&message) {
                    Ok(bytes) => (session, Out::Frame(bytes)),
                    Err(e) => {
                        tracing::error!(?session, error = %e, "cannot encode a message; closing the session");
                        (session, Out::Close)
                    }
                },
                Action::Close { session } => (session, Out::Close),
            };
            if let Some((_, tx)) = sessions.get(&session).and_then(|c| conns.get(c)) {
                // A closed channel means the connection is already gone; its
                // Closed event is on the way.
                let _ = tx.send(out);
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
            "QUIC receive buffer is small: a join storm may lose packets \
             (raise net.core.rmem_max)"
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
                let mut binding = [0u8; 32];
                connection
                    .export_keying_material(&mut binding, EXPORTER_LABEL, b"")
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
                    run_stream(recv, send, conn, binding.to_vec(), events).await;
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
            let tls =
                match tokio::time::timeout(TRANSPORT_HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                    .await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                };
            let Ok(binding) =
                tls.get_ref()
                    .1
                    .export_keying_material([0u8; 32], EXPORTER_LABEL, Some(b""))
            else {
                return tracing::debug!(%peer, "TLS exporter unavailable");
            };
            let (r, w) = tokio::io::split(tls);
            run_stream(r, w, conn, binding.to_vec(), events).await;
        });
    }
}

/// Carries one session: decodes what arrives, writes what the core sends.
async fn run_stream<R, W>(
    mut r: R,
    mut w: W,
    conn: u64,
    binding: Vec<u8>,
    events: mpsc::Sender<Event>,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (out_tx, mut out_rx) = tmpsc::unbounded_channel();
    if events
        .send(Event::Open {
            conn,
            binding,
            out: out_tx,
        })
        .is_err()
    {
        return;
    }
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 16 * 1024];
    // After a decoding error nothing more is read: the core answers with an
    // error and a close, which are still written.
    let mut reading = true;
    loop {
        tokio::select! {
            n = r.read(&mut buf), if reading => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    decoder.feed(&buf[..n]);
                    loop {
                        match decoder.next_message() {
                            Ok(Some(msg)) => {
                                let _ = events.send(Event::Message { conn, msg });
                            }
                            Ok(None) => break,
                            Err(error) => {
                                let _ = events.send(Event::Malformed { conn, error });
                                reading = false;
                                break;
                            }
                        }
                    }
                }
            },
            out = out_rx.recv() => match out {
                Some(Out::Frame(bytes)) => {
                    if w.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
                Some(Out::Close) | None => {
                    let _ = w.flush().await;
                    let _ = w.shutdown().await;
                    break;
                }
            },
        }
    }
    let _ = events.send(Event::Closed { conn });
}
