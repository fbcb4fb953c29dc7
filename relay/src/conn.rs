//! What the relay's connections and the client's share: the transports
//! (TLS on TCP, QUIC with datagrams), the client's side of the handshake,
//! and [`drive`], which reads frames into a handler while it writes what a
//! [`Mailbox`] holds.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use meshd_proto::auth::{self, ProofInput, Purpose};
use meshd_proto::relay::{split_frame, ty, Decoder, ErrorCode, Frame, EXPORTER_LABEL, SERVER_NAME};
use meshd_proto::relay::{FrameError, MAX_ERROR_MESSAGE};
use meshd_proto::NodeKey;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use x25519_dalek::StaticSecret;

use crate::outbox::{Outbox, Pushed, Taken};

/// How much one read of a TLS stream or QUIC stream takes: a whole burst of
/// relayed packets per call.
const READ_CHUNK: usize = 64 * 1024;
/// How much one write gathers: the queued frames of many packets go out as
/// one TLS write (a few records) instead of one write each.
const WRITE_BATCH: usize = 64 * 1024;
/// What the QUIC writer allocates at once for outgoing datagrams; each
/// datagram is a slice of it, so sending one allocates nothing.
const DATAGRAM_ARENA: usize = 256 * 1024;
/// How long an `Error` frame and a close may take before the connection is
/// dropped anyway: a removed member is cut within a second.
const CLOSE_GRACE: Duration = Duration::from_millis(500);
/// QUIC's queues of datagrams received but not yet read, and of datagrams
/// not yet sent, per connection: a burst of 64 KiB reads' worth of packets.
pub(crate) const QUIC_DATAGRAM_BUFFER: usize = 4 << 20;
/// The kernel buffers asked for on UDP sockets (QUIC and STUN): at the
/// Linux default (208 KiB) a burst of relayed packets overflows them while
/// the endpoint is busy.
pub(crate) const UDP_BUFFER: usize = 8 << 20;

pub(crate) type Reader = Box<dyn AsyncRead + Unpin + Send>;
pub(crate) type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// A connection after its transport handshake: one byte stream and, for
/// QUIC, the connection its datagrams travel on.
pub(crate) struct Io {
    pub reader: Reader,
    pub writer: Writer,
    pub quic: Option<quinn::Connection>,
    pub decoder: Decoder,
    pub binding: [u8; 32],
}

/// The frames of the handshake, owned.
#[derive(Debug)]
pub(crate) enum Handshake {
    ServerHello {
        relay_key: NodeKey,
        nonce: [u8; 32],
    },
    ClientAuth {
        node_key: NodeKey,
        proof: [u8; 32],
    },
    ServerOk,
    Error {
        code: ErrorCode,
        message: String,
    },
    /// Any other frame: out of place during a handshake.
    Other(u8),
}

impl Handshake {
    /// For messages about a frame out of place.
    pub(crate) fn name(&self) -> String {
        match self {
            Handshake::ServerHello { .. } => "ServerHello".into(),
            Handshake::ClientAuth { .. } => "ClientAuth".into(),
            Handshake::ServerOk => "ServerOk".into(),
            Handshake::Error { code, .. } => format!("Error ({code})"),
            Handshake::Other(t) => format!("a frame of type {t:#04x}"),
        }
    }
}

/// Why reading a handshake frame failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("connection closed during the handshake")]
    Closed,
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Malformed(#[from] FrameError),
}

impl Io {
    pub(crate) async fn read_handshake(&mut self) -> Result<Handshake, HandshakeError> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(f) = self.decoder.next_frame()? {
                return Ok(match f {
                    Frame::ServerHello { relay_key, nonce } => {
                        Handshake::ServerHello { relay_key, nonce }
                    }
                    Frame::ClientAuth { node_key, proof } => {
                        Handshake::ClientAuth { node_key, proof }
                    }
                    Frame::ServerOk => Handshake::ServerOk,
                    Frame::Error { code, message } => Handshake::Error {
                        code,
                        message: message.to_owned(),
                    },
                    other => Handshake::Other(other.frame_type()),
                });
            }
            let n = self.reader.read(&mut buf).await?;
            if n == 0 {
                self.decoder.finish()?;
                return Err(HandshakeError::Closed);
            }
            self.decoder.feed(&buf[..n]);
        }
    }

    pub(crate) async fn write_frame(&mut self, frame: &Frame<'_>) -> io::Result<()> {
        let mut bytes = Vec::new();
        frame.encode(&mut bytes).map_err(io::Error::other)?;
        self.writer.write_all(&bytes).await?;
        self.writer.flush().await
    }

    /// Sends `Error` and closes, within [`CLOSE_GRACE`]: how a handshake
    /// is refused.
    pub(crate) async fn refuse(mut self, code: ErrorCode, message: &str) {
        finish(&mut self.writer, self.quic.as_ref(), Some((code, message))).await;
    }
}

/// Packets and bytes a connection's writer has sent.
#[derive(Debug, Default)]
pub(crate) struct Traffic {
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
}

impl Traffic {
    fn add(&self, t: Taken) {
        if t.packets > 0 {
            self.packets.fetch_add(t.packets, Ordering::Relaxed);
            self.bytes.fetch_add(t.bytes, Ordering::Relaxed);
        }
    }
}

/// How a connection is to end when it is cut from outside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Cut {
    /// Quietly (the client closing).
    Close,
    /// With an `Error` frame (a removed member, a replaced connection).
    Error(ErrorCode, String),
}

/// A connection's outbox and the signals to its writer.
#[derive(Debug)]
pub(crate) struct Mailbox {
    outbox: Mutex<Outbox>,
    ready: Notify,
    cut: Mutex<Option<Cut>>,
    cut_ready: Notify,
}

impl Mailbox {
    pub(crate) fn new(limit: usize, control_limit: usize) -> Self {
        Mailbox {
            outbox: Mutex::new(Outbox::new(limit, control_limit)),
            ready: Notify::new(),
            cut: Mutex::new(None),
            cut_ready: Notify::new(),
        }
    }

    fn outbox(&self) -> MutexGuard<'_, Outbox> {
        // Nothing panics while holding it; the outbox is consistent after
        // every call.
        self.outbox.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// See [`Outbox::push_packet`]. Wakes the writer when the outbox was
    /// empty (otherwise it is awake already).
    pub(crate) fn push_packet(&self, source: NodeKey, frame: &Frame<'_>) -> Pushed {
        let mut o = self.outbox();
        let was_empty = o.is_empty();
        let pushed = o.push_packet(source, frame);
        drop(o);
        if was_empty && pushed.queued {
            self.ready.notify_one();
        }
        pushed
    }

    pub(crate) fn push_control(&self, frame: &Frame<'_>) -> bool {
        let mut o = self.outbox();
        let was_empty = o.is_empty();
        let ok = o.push_control(frame);
        drop(o);
        if was_empty && ok {
            self.ready.notify_one();
        }
        ok
    }

    /// Packet bytes queued.
    pub(crate) fn queued(&self) -> usize {
        self.outbox().queued()
    }

    /// Ends the connection; the first cut decides how.
    pub(crate) fn cut(&self, how: Cut) {
        let mut c = self.cut.lock().unwrap_or_else(PoisonError::into_inner);
        if c.is_none() {
            *c = Some(how);
            self.cut_ready.notify_one();
        }
    }

    fn take_cut(&self) -> Option<Cut> {
        self.cut
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    async fn cut_notified(&self) {
        loop {
            if self
                .cut
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_some()
            {
                return;
            }
            self.cut_ready.notified().await;
        }
    }
}

/// What came in.
pub(crate) enum Incoming<'a> {
    Frame(Frame<'a>),
    /// A QUIC DATAGRAM payload, `key(32) | datagram`.
    Datagram(&'a Bytes),
}

/// Why a handler stops a connection.
#[derive(Debug)]
pub(crate) enum Stop {
    /// Answer with `Error` and close.
    Answer(ErrorCode, String),
    /// Close without a word (the peer sent its own `Error`).
    Quiet,
}

/// How a connection ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum End {
    /// The peer closed its side.
    Closed,
    /// Cut from outside ([`Mailbox::cut`]).
    Cut,
    /// We refused what the peer sent, with this `Error`.
    Refused(ErrorCode, String),
    /// The handler stopped quietly.
    Quiet,
    /// The transport failed.
    Failed(String),
}

/// Runs a connection until it ends: frames (and QUIC datagrams) go to
/// `handle` as they arrive, and what `mailbox` holds is written in batches.
/// Reading never waits for writing, so a client that does not read its
/// packets only fills its own outbox.
pub(crate) async fn drive<H>(io: Io, mailbox: &Mailbox, traffic: &Traffic, mut handle: H) -> End
where
    H: FnMut(Incoming<'_>) -> Result<(), Stop>,
{
    let Io {
        mut reader,
        mut writer,
        quic,
        mut decoder,
        ..
    } = io;
    // Set while a write is under way: cancelling it may leave half a frame
    // on the stream, after which no `Error` frame can follow.
    let mid_write = AtomicBool::new(false);
    let end = {
        let read = async {
            let mut buf = vec![0u8; READ_CHUNK];
            loop {
                loop {
                    match decoder.next_frame() {
                        Ok(Some(f)) => {
                            if let Err(s) = handle(Incoming::Frame(f)) {
                                return s.into();
                            }
                        }
                        Ok(None) => break,
                        Err(e) => return End::Refused(ErrorCode::Malformed, e.to_string()),
                    }
                }
                tokio::select! {
                    r = reader.read(&mut buf) => match r {
                        Ok(0) => return match decoder.finish() {
                            Ok(()) => End::Closed,
                            Err(e) => End::Refused(ErrorCode::Malformed, e.to_string()),
                        },
                        Ok(n) => decoder.feed(&buf[..n]),
                        Err(e) => return End::Failed(e.to_string()),
                    },
                    d = next_datagram(quic.as_ref()) => match d {
                        Ok(bytes) => {
                            if let Err(s) = handle(Incoming::Datagram(&bytes)) {
                                return s.into();
                            }
                        }
                        Err(e) => return End::Failed(e.to_string()),
                    },
                }
            }
        };
        let write = async {
            let mut batch = Vec::with_capacity(WRITE_BATCH + 4096);
            let mut stream = Vec::new();
            let mut arena = BytesMut::new();
            loop {
                batch.clear();
                let taken = mailbox.outbox().take(&mut batch, WRITE_BATCH);
                if batch.is_empty() {
                    mailbox.ready.notified().await;
                    continue;
                }
                mid_write.store(true, Ordering::Relaxed);
                let written = match &quic {
                    None => write_all(&mut writer, &batch).await,
                    Some(conn) => {
                        send_quic(conn, &mut writer, &batch, &mut stream, &mut arena).await
                    }
                };
                mid_write.store(false, Ordering::Relaxed);
                if let Err(e) = written {
                    return End::Failed(e.to_string());
                }
                traffic.add(taken);
            }
        };
        tokio::pin!(read, write);
        tokio::select! {
            e = &mut read => e,
            e = &mut write => e,
            () = mailbox.cut_notified() => End::Cut,
        }
    };
    let cut = mailbox.take_cut();
    let error = match (&end, &cut) {
        (End::Refused(code, message), _) | (_, Some(Cut::Error(code, message))) => {
            Some((*code, message.as_str()))
        }
        _ => None,
    };
    if !mid_write.load(Ordering::Relaxed) && !matches!(end, End::Failed(_)) {
        finish(&mut writer, quic.as_ref(), error).await;
    } else if let Some(conn) = &quic {
        conn.close(0u32.into(), b"");
    }
    end
}

impl From<Stop> for End {
    fn from(s: Stop) -> End {
        match s {
            Stop::Answer(code, message) => End::Refused(code, message),
            Stop::Quiet => End::Quiet,
        }
    }
}

/// Writes `error` if any, ends the stream (TLS close_notify, QUIC FIN) and,
/// for QUIC, closes the connection once the peer has had a moment to read
/// the error (closing at once would discard it).
async fn finish(
    writer: &mut Writer,
    quic: Option<&quinn::Connection>,
    error: Option<(ErrorCode, &str)>,
) {
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        if let Some((code, message)) = error {
            let mut bytes = Vec::new();
            let message = truncate(message, MAX_ERROR_MESSAGE);
            if (Frame::Error { code, message }).encode(&mut bytes).is_ok() {
                writer.write_all(&bytes).await?;
            }
        }
        writer.flush().await?;
        writer.shutdown().await
    })
    .await;
    if let Some(conn) = quic {
        if error.is_some() {
            let _ = tokio::time::timeout(CLOSE_GRACE, conn.closed()).await;
        }
        conn.close(0u32.into(), b"");
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a
/// character boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

async fn next_datagram(quic: Option<&quinn::Connection>) -> Result<Bytes, quinn::ConnectionError> {
    match quic {
        Some(c) => c.read_datagram().await,
        None => std::future::pending().await,
    }
}

async fn write_all(w: &mut Writer, bytes: &[u8]) -> io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

/// Sends a batch over QUIC: packet frames that fit in a datagram as QUIC
/// datagrams (their body is exactly the datagram layout, `key | datagram`),
/// everything else on the stream.
async fn send_quic(
    conn: &quinn::Connection,
    writer: &mut Writer,
    batch: &[u8],
    stream: &mut Vec<u8>,
    arena: &mut BytesMut,
) -> io::Result<()> {
    stream.clear();
    let max = conn.max_datagram_size().unwrap_or(0);
    let mut rest = batch;
    while let Some((t, body, tail)) = split_frame(rest) {
        let frame = &rest[..rest.len() - tail.len()];
        if (t == ty::RECV_PACKET || t == ty::SEND_PACKET) && body.len() <= max {
            if arena.capacity() < body.len() {
                arena.reserve(DATAGRAM_ARENA.max(body.len()));
            }
            arena.extend_from_slice(body);
            match conn.send_datagram_wait(arena.split().freeze()).await {
                Ok(()) => {}
                // The path's datagram size shrank since it was read.
                Err(quinn::SendDatagramError::TooLarge) => stream.extend_from_slice(frame),
                Err(e) => return Err(io::Error::other(e)),
            }
        } else {
            stream.extend_from_slice(frame);
        }
        rest = tail;
    }
    if stream.is_empty() {
        Ok(())
    } else {
        write_all(writer, stream).await
    }
}

/// The channel binding of a QUIC connection: 32 bytes exported under the
/// relay's label, so a proof made on one connection is useless on another.
pub(crate) fn quic_binding(c: &quinn::Connection) -> io::Result<[u8; 32]> {
    let mut b = [0u8; 32];
    c.export_keying_material(&mut b, EXPORTER_LABEL, b"")
        .map_err(|_| io::Error::other("TLS exporter unavailable"))?;
    Ok(b)
}

/// The channel binding of TLS on TCP; see [`quic_binding`].
pub(crate) fn tls_binding<D>(tls: &rustls::ConnectionCommon<D>) -> io::Result<[u8; 32]> {
    tls.export_keying_material([0u8; 32], EXPORTER_LABEL, Some(b""))
        .map_err(io::Error::other)
}

/// A UDP socket with large kernel buffers (see [`UDP_BUFFER`]).
pub(crate) fn udp_socket(bind: SocketAddr) -> io::Result<std::net::UdpSocket> {
    use rustix::net::sockopt;
    let socket = std::net::UdpSocket::bind(bind)?;
    let recv = sockopt::set_socket_recv_buffer_size_force(&socket, UDP_BUFFER)
        .or_else(|_| sockopt::set_socket_recv_buffer_size(&socket, UDP_BUFFER));
    let send = sockopt::set_socket_send_buffer_size_force(&socket, UDP_BUFFER)
        .or_else(|_| sockopt::set_socket_send_buffer_size(&socket, UDP_BUFFER));
    // Linux reports twice the size asked for (the rest is its bookkeeping).
    let got = sockopt::socket_recv_buffer_size(&socket).map_or(0, |b| b / 2);
    if recv.is_err() || send.is_err() || got < UDP_BUFFER {
        tracing::debug!(
            bytes = got,
            wanted = UDP_BUFFER,
            "UDP buffers are smaller than asked: bursts may be dropped; raise \
             net.core.rmem_max and wmem_max or run with CAP_NET_ADMIN"
        );
    }
    Ok(socket)
}

/// Unsent bytes a relay TCP connection may leave in the kernel
/// (`TCP_NOTSENT_LOWAT`). Without a bound the kernel's send buffer grows to
/// megabytes of one FIFO in front of the fair outboxes, and the writer is
/// woken only when a large part of it has drained, so a slow reader's
/// packets would queue there, unfairly, instead of in its outbox. Bytes in
/// flight are not limited, so throughput on long paths is not either.
const TCP_NOTSENT: u32 = 128 << 10;

/// TCP keep-alive of relay connections: a peer that vanished (a host that
/// died, a NAT that forgot the mapping) is noticed after about 30 s of
/// silence, so its key stops drawing packets into an outbox nobody reads.
const TCP_KEEPALIVE: Duration = Duration::from_secs(15);

/// Prepares a relay TCP connection: no Nagle delay, bounded unsent bytes,
/// keep-alive probes.
pub(crate) fn tune_tcp(tcp: &TcpStream) {
    use rustix::net::sockopt;
    let _ = tcp.set_nodelay(true);
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_notsent_lowat(TCP_NOTSENT) {
        tracing::debug!(error = %e, "TCP_NOTSENT_LOWAT not set");
    }
    let keepalive = sockopt::set_socket_keepalive(tcp, true)
        .and_then(|()| sockopt::set_tcp_keepidle(tcp, TCP_KEEPALIVE))
        .and_then(|()| sockopt::set_tcp_keepintvl(tcp, TCP_KEEPALIVE / 3))
        .and_then(|()| sockopt::set_tcp_keepcnt(tcp, 3));
    if let Err(e) = keepalive {
        tracing::debug!(error = %e, "TCP keep-alive not set");
    }
}

/// QUIC settings of relay connections: datagrams on, large datagram
/// queues, no streams but the one the relay opens. `client`: the side
/// that lets the relay open that stream.
pub(crate) fn quic_transport(client: bool, keep_alive: Option<Duration>) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(u32::from(client).into())
        .max_concurrent_uni_streams(0u32.into())
        .datagram_receive_buffer_size(Some(QUIC_DATAGRAM_BUFFER))
        .datagram_send_buffer_size(QUIC_DATAGRAM_BUFFER)
        .keep_alive_interval(keep_alive);
    t
}

/// Why a client connection to a relay failed or ended.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the relay at {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("the relay refused the connection ({code}): {message}")]
    Refused { code: ErrorCode, message: String },
    #[error(
        "the relay presents key {got}, not the expected {want}: check the relay's address and key"
    )]
    WrongRelayKey { got: NodeKey, want: NodeKey },
    #[error("the relay broke the protocol: {0}")]
    Protocol(String),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("the relay did not answer a ping within {0:?}")]
    PingTimeout(Duration),
    #[error("the connection to the relay has ended")]
    Closed,
    #[error("the connection to the relay failed: {0}")]
    Failed(String),
}

/// The client's TLS configuration: the relay's ALPN and exactly the
/// certificate whose SHA-256 is `pin`.
fn tls_config(pin: [u8; 32]) -> Result<rustls::ClientConfig, rustls::Error> {
    meshd_control::pinned_client_config(
        pin,
        meshd_proto::relay::ALPN,
        "relay certificate does not match the pin",
        "a different relay, or an outdated relay list from the coordinator",
    )
}

/// TLS over TCP to `target`.
pub(crate) async fn connect_tls(
    addr: &str,
    target: SocketAddr,
    pin: [u8; 32],
) -> Result<Io, ClientError> {
    let failed = |e: &dyn std::fmt::Display| ClientError::Connect {
        addr: addr.to_owned(),
        reason: format!("TLS/TCP: {e}"),
    };
    let tcp = TcpStream::connect(target).await.map_err(|e| failed(&e))?;
    tune_tcp(&tcp);
    let name = rustls::pki_types::ServerName::try_from(SERVER_NAME).map_err(|e| failed(&e))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls_config(pin)?))
        .connect(name, tcp)
        .await
        .map_err(|e| failed(&e))?;
    let binding = tls_binding(tls.get_ref().1).map_err(|e| failed(&e))?;
    let (r, w) = tokio::io::split(tls);
    Ok(Io {
        reader: Box::new(r),
        writer: Box::new(w),
        quic: None,
        decoder: Decoder::new(),
        binding,
    })
}

/// QUIC to `target`, on an endpoint of its own; the relay opens the stream.
pub(crate) async fn connect_quic(
    addr: &str,
    target: SocketAddr,
    pin: [u8; 32],
    keep_alive: Duration,
) -> Result<(Io, quinn::Endpoint), ClientError> {
    let failed = |e: &dyn std::fmt::Display| ClientError::Connect {
        addr: addr.to_owned(),
        reason: format!("QUIC: {e}"),
    };
    let local: SocketAddr = if target.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let socket = udp_socket(local).map_err(|e| failed(&e))?;
    let runtime = quinn::default_runtime().ok_or_else(|| failed(&"no async runtime"))?;
    let mut endpoint =
        quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime)
            .map_err(|e| failed(&e))?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls_config(pin)?)
        .map_err(|e| failed(&e))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(quic_transport(true, Some(keep_alive))));
    endpoint.set_default_client_config(client);
    let conn = endpoint
        .connect(target, SERVER_NAME)
        .map_err(|e| failed(&e))?
        .await
        .map_err(|e| failed(&e))?;
    let binding = quic_binding(&conn).map_err(|e| failed(&e))?;
    let (send, recv) = conn.accept_bi().await.map_err(|e| failed(&e))?;
    Ok((
        Io {
            reader: Box::new(recv),
            writer: Box::new(send),
            quic: Some(conn),
            decoder: Decoder::new(),
            binding,
        },
        endpoint,
    ))
}

/// The client's side of the handshake: reads `ServerHello`, proves it holds
/// `secret`, and waits for `ServerOk`. Returns the relay's key.
pub(crate) async fn client_handshake(
    io: &mut Io,
    secret: &StaticSecret,
    expect: Option<NodeKey>,
) -> Result<NodeKey, ClientError> {
    let protocol = |e: HandshakeError| match e {
        HandshakeError::Closed => ClientError::Closed,
        HandshakeError::Io(e) => ClientError::Failed(e.to_string()),
        HandshakeError::Malformed(e) => ClientError::Protocol(e.to_string()),
    };
    let (relay_key, nonce) = match io.read_handshake().await.map_err(protocol)? {
        Handshake::ServerHello { relay_key, nonce } => (relay_key, nonce),
        Handshake::Error { code, message } => return Err(ClientError::Refused { code, message }),
        other => {
            return Err(ClientError::Protocol(format!(
                "expected ServerHello, got {}",
                other.name()
            )))
        }
    };
    if let Some(want) = expect {
        if want != relay_key {
            return Err(ClientError::WrongRelayKey {
                got: relay_key,
                want,
            });
        }
    }
    let node_key = auth::public_key(secret);
    let input = ProofInput {
        purpose: Purpose::Relay,
        coordinator_key: relay_key,
        node_key,
        nonce: &nonce,
        channel_binding: &io.binding,
        extra: &[],
    };
    let proof = auth::prove(&input, secret).map_err(|e| ClientError::Protocol(e.to_string()))?;
    io.write_frame(&Frame::ClientAuth { node_key, proof })
        .await
        .map_err(|e| ClientError::Failed(e.to_string()))?;
    match io.read_handshake().await.map_err(protocol)? {
        Handshake::ServerOk => Ok(relay_key),
        Handshake::Error { code, message } => Err(ClientError::Refused { code, message }),
        other => Err(ClientError::Protocol(format!(
            "expected ServerOk, got {}",
            other.name()
        ))),
    }
}
