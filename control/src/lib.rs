//! The node's end of a control connection (docs/control-protocol.md,
//! "Transport"): the framed protocol over QUIC, or over TLS on TCP for
//! networks that drop UDP, accepting only the coordinator certificate whose
//! SHA-256 the join token pins.
//!
//! This is transport only: what to send and what a message means is
//! [`meshd_proto::client::Client`]'s business. It lives apart from the
//! coordinator so that a node does not link the coordinator's databases.

pub mod identity;
pub mod listen;
mod pin;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshd_proto::token::JoinToken;
use meshd_proto::{encode, DecodeError, EncodeError, FrameDecoder, Message};
use meshd_proto::{EXPORTER_LABEL, SERVER_NAME};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

pub use pin::{client_config, pinned_client_config};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Quic,
    Tcp,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Quic => "QUIC",
            Transport::Tcp => "TLS/TCP",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("cannot reach the coordinator at {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("control connection: {0}")]
    Io(#[from] io::Error),
    #[error("coordinator sent a malformed frame: {0}")]
    Decode(#[from] DecodeError),
    #[error("cannot encode {0}")]
    Encode(#[from] EncodeError),
}

/// Timing of connection attempts and of liveness checks: the heartbeats of
/// a control session are the transport's own (QUIC PINGs, TCP keep-alive
/// probes), answered by the coordinator host's QUIC stack or kernel.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// How long one transport's handshake (TCP + TLS, or QUIC) may take.
    pub handshake_timeout: Duration,
    /// How long QUIC has on its own before TLS/TCP is tried alongside it
    /// (sooner if QUIC fails first). The first transport up is used. The TCP
    /// connection itself is opened at once: if it is refused, nothing
    /// listens at the address, and unless QUIC answers within
    /// [`REFUSED_GRACE`] more (and twice the time the refusal took) the
    /// address fails then, not after the handshake timeout.
    pub quic_head_start: Duration,
    /// QUIC keep-alive interval: an idle session still shows that the
    /// coordinator is there.
    pub quic_keep_alive: Duration,
    /// A QUIC connection that hears nothing this long is dead (a killed
    /// coordinator sends no close).
    pub quic_idle_timeout: Duration,
    /// TCP keep-alive: the first probe after this much silence, then one
    /// every as long; the connection is dead when nothing has been
    /// acknowledged for twice as long (`TCP_USER_TIMEOUT`).
    pub tcp_keepalive: Duration,
}

/// See [`ConnectOptions::quic_head_start`]: what QUIC is given, beyond twice
/// the time a refusal of TCP took, to show it answers where TCP is refused
/// (a firewall that resets TCP but lets UDP through).
pub const REFUSED_GRACE: Duration = Duration::from_millis(100);

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            handshake_timeout: Duration::from_secs(10),
            quic_head_start: Duration::from_secs(1),
            quic_keep_alive: Duration::from_millis(750),
            quic_idle_timeout: Duration::from_millis(1500),
            tcp_keepalive: Duration::from_secs(1),
        }
    }
}

/// What either transport's handshake yields: the channel binding, the
/// stream's two halves and, for QUIC, what keeps the connection alive.
type Halves = (
    [u8; 32],
    Box<dyn AsyncRead + Unpin + Send>,
    Box<dyn AsyncWrite + Unpin + Send>,
    Option<(quinn::Endpoint, quinn::Connection)>,
);

/// The node's end of a control connection.
pub struct ClientConn {
    binding: [u8; 32],
    transport: Transport,
    remote: SocketAddr,
    reader: Box<dyn AsyncRead + Unpin + Send>,
    writer: Box<dyn AsyncWrite + Unpin + Send>,
    decoder: FrameDecoder,
    buf: Vec<u8>,
    // Keeps a QUIC connection (and its endpoint) alive as long as the streams.
    quic: Option<(quinn::Endpoint, quinn::Connection)>,
}

impl fmt::Debug for ClientConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConn")
            .field("transport", &self.transport)
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

/// The channel binding of a QUIC connection (docs/control-protocol.md): 32
/// bytes exported under [`EXPORTER_LABEL`] with an empty context. Both ends
/// compute it with this function or [`tls_binding`].
pub fn quic_binding(
    connection: &quinn::Connection,
) -> Result<[u8; 32], quinn::crypto::ExportKeyingMaterialError> {
    let mut binding = [0u8; 32];
    connection.export_keying_material(&mut binding, EXPORTER_LABEL, b"")?;
    Ok(binding)
}

/// The channel binding of a TLS connection on TCP; see [`quic_binding`].
pub fn tls_binding<D>(tls: &rustls::ConnectionCommon<D>) -> Result<[u8; 32], rustls::Error> {
    tls.export_keying_material([0u8; 32], EXPORTER_LABEL, Some(b""))
}

/// Resolves `host:port` to its first address.
async fn resolve(addr: &str) -> Result<SocketAddr, ConnError> {
    let failed = |reason: String| ConnError::Connect {
        addr: addr.to_owned(),
        reason,
    };
    tokio::net::lookup_host(addr)
        .await
        .map_err(|e| failed(e.to_string()))?
        .next()
        .ok_or_else(|| failed("name has no address".into()))
}

impl ClientConn {
    /// Connects to the first of the token's coordinator addresses that
    /// answers over `transport`, accepting only the certificate the token
    /// pins.
    pub async fn connect(token: &JoinToken, transport: Transport) -> Result<Self, ConnError> {
        let mut last = None;
        for addr in &token.addresses {
            match Self::connect_to(addr, token.cert_pin, transport, &ConnectOptions::default())
                .await
            {
                Ok(c) => return Ok(c),
                Err(e) => {
                    tracing::debug!(%addr, error = %e, "coordinator address failed");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| ConnError::Connect {
            addr: String::new(),
            reason: "the token names no address".into(),
        }))
    }

    /// Connects to `addr` over QUIC, and over TLS/TCP too if QUIC is not up
    /// within the head start; the first to complete wins. Both failing is
    /// one error naming both reasons; a refused TCP connection fails the
    /// address at once unless QUIC answers just after
    /// ([`ConnectOptions::quic_head_start`]).
    pub async fn connect_any(
        addr: &str,
        pin: [u8; 32],
        opts: &ConnectOptions,
    ) -> Result<Self, ConnError> {
        let target = resolve(addr).await?;
        let started = tokio::time::Instant::now();
        let (quic_failed, quic_failed_rx) = tokio::sync::oneshot::channel::<()>();
        let quic = async {
            let deadline = started + opts.handshake_timeout;
            let r = Self::connect_target(addr, target, pin, Transport::Quic, deadline, opts, None)
                .await;
            if r.is_err() {
                let _ = quic_failed.send(());
            }
            r
        };
        let tcp = async {
            // As long as if TCP had been started after the head start.
            let deadline = started + opts.quic_head_start + opts.handshake_timeout;
            let stream = tokio::time::timeout_at(deadline, TcpStream::connect(target))
                .await
                .map_err(|_| Refusal::Other("TLS/TCP handshake timed out".into()))?
                .map_err(|e| match e.kind() {
                    io::ErrorKind::ConnectionRefused => Refusal::Refused(started.elapsed()),
                    _ => Refusal::Other(e.to_string()),
                })?;
            // Either the head start passes or QUIC has already failed.
            let _ = tokio::time::timeout(opts.quic_head_start, quic_failed_rx).await;
            Self::connect_target(
                addr,
                target,
                pin,
                Transport::Tcp,
                deadline,
                opts,
                Some(stream),
            )
            .await
            .map_err(|e| Refusal::Other(reason(&e)))
        };
        tokio::pin!(quic, tcp);
        let (mut quic_err, mut tcp_err) = (None, None);
        // Once TCP was refused: when QUIC must have answered.
        let mut quic_deadline = None;
        loop {
            let deadline = async {
                match quic_deadline {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = &mut quic, if quic_err.is_none() => match r {
                    Ok(c) => return Ok(c),
                    Err(e) => quic_err = Some(reason(&e)),
                },
                r = &mut tcp, if tcp_err.is_none() => match r {
                    Ok(c) => return Ok(c),
                    Err(Refusal::Refused(after)) => {
                        quic_deadline = Some(started + after * 2 + REFUSED_GRACE);
                        tcp_err = Some("connection refused".to_owned());
                    }
                    Err(Refusal::Other(e)) => tcp_err = Some(e),
                },
                () = deadline => {
                    quic_err = Some("no answer before TCP was refused".to_owned());
                }
            }
            if let (Some(q), Some(t)) = (&quic_err, &tcp_err) {
                return Err(ConnError::Connect {
                    addr: addr.to_owned(),
                    reason: format!("QUIC: {q}; TLS/TCP: {t}"),
                });
            }
        }
    }

    /// Connects to `addr` over one transport.
    pub async fn connect_to(
        addr: &str,
        pin: [u8; 32],
        transport: Transport,
        opts: &ConnectOptions,
    ) -> Result<Self, ConnError> {
        let target = resolve(addr).await?;
        let deadline = tokio::time::Instant::now() + opts.handshake_timeout;
        Self::connect_target(addr, target, pin, transport, deadline, opts, None).await
    }

    /// The handshake must be done by `deadline`. `tcp`: for TLS/TCP, a TCP
    /// connection to `target` already set up.
    async fn connect_target(
        addr: &str,
        target: SocketAddr,
        pin: [u8; 32],
        transport: Transport,
        deadline: tokio::time::Instant,
        opts: &ConnectOptions,
        tcp: Option<TcpStream>,
    ) -> Result<Self, ConnError> {
        let failed = |reason: String| ConnError::Connect {
            addr: addr.to_owned(),
            reason,
        };
        let config = client_config(pin)?;
        let connect = async {
            let halves: Halves = match transport {
                Transport::Quic => {
                    let local: SocketAddr = if target.is_ipv4() {
                        ([0, 0, 0, 0], 0).into()
                    } else {
                        ([0u16; 8], 0).into()
                    };
                    let mut endpoint = quinn::Endpoint::client(local)?;
                    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(config)
                        .map_err(|e| failed(e.to_string()))?;
                    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
                    let mut transport_config = quinn::TransportConfig::default();
                    transport_config
                        .keep_alive_interval(Some(opts.quic_keep_alive))
                        .max_idle_timeout(Some(
                            opts.quic_idle_timeout
                                .try_into()
                                .map_err(|_| failed("idle timeout out of range".into()))?,
                        ));
                    client.transport_config(Arc::new(transport_config));
                    endpoint.set_default_client_config(client);
                    let connection = endpoint
                        .connect(target, SERVER_NAME)
                        .map_err(|e| failed(e.to_string()))?
                        .await
                        .map_err(|e| failed(e.to_string()))?;
                    let binding = quic_binding(&connection)
                        .map_err(|_| failed("TLS exporter unavailable".into()))?;
                    // The coordinator speaks first, so it opens the stream.
                    let (send, recv) = connection
                        .accept_bi()
                        .await
                        .map_err(|e| failed(e.to_string()))?;
                    (
                        binding,
                        Box::new(recv),
                        Box::new(send),
                        Some((endpoint, connection)),
                    )
                }
                Transport::Tcp => {
                    let tcp = match tcp {
                        Some(t) => t,
                        None => TcpStream::connect(target)
                            .await
                            .map_err(|e| failed(e.to_string()))?,
                    };
                    let _ = tcp.set_nodelay(true);
                    set_keepalive(&tcp, opts.tcp_keepalive);
                    let name = rustls::pki_types::ServerName::try_from(SERVER_NAME)
                        .map_err(|e| failed(e.to_string()))?;
                    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                        .connect(name, tcp)
                        .await
                        .map_err(|e| failed(e.to_string()))?;
                    let binding = tls_binding(tls.get_ref().1)?;
                    let (r, w) = tokio::io::split(tls);
                    (binding, Box::new(r), Box::new(w), None)
                }
            };
            Ok::<_, ConnError>(halves)
        };
        let (binding, reader, writer, quic) =
            tokio::time::timeout_at(deadline, connect)
                .await
                .map_err(|_| failed(format!("{transport} handshake timed out")))??;
        Ok(ClientConn {
            binding,
            transport,
            remote: target,
            reader,
            writer,
            decoder: FrameDecoder::new(),
            buf: vec![0; 16 * 1024],
            quic,
        })
    }

    /// The channel binding for [`meshd_proto::client::Client::new`].
    pub fn binding(&self) -> &[u8; 32] {
        &self.binding
    }

    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// The coordinator's address.
    pub fn remote(&self) -> SocketAddr {
        self.remote
    }

    pub async fn send(&mut self, msg: &Message) -> Result<(), ConnError> {
        let bytes = encode(msg)?;
        self.send_raw(&bytes).await
    }

    /// Writes bytes as they are (tests use it to send malformed frames).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ConnError> {
        self.writer.write_all(bytes).await?;
        self.writer.flush().await?;
        Ok(())
    }

    /// The next message; `None` when the coordinator closed the stream
    /// cleanly. Cancel-safe: a `recv` dropped before it completes loses no
    /// bytes, so it can wait in a `select!` beside other work.
    pub async fn recv(&mut self) -> Result<Option<Message>, ConnError> {
        loop {
            if let Some(m) = self.decoder.next_message()? {
                return Ok(Some(m));
            }
            let n = self.reader.read(&mut self.buf).await?;
            if n == 0 {
                self.decoder.finish()?;
                return Ok(None);
            }
            self.decoder.feed(&self.buf[..n]);
        }
    }

    /// Ends the session politely: the stream is shut down and, for QUIC, the
    /// connection closed, so the coordinator notices at once.
    pub async fn close(mut self) {
        let _ = self.writer.shutdown().await;
        if let Some((endpoint, connection)) = self.quic.take() {
            connection.close(0u32.into(), b"node leaving");
            // Lets the close frame leave before the socket goes.
            let _ = tokio::time::timeout(Duration::from_millis(200), endpoint.wait_idle()).await;
        }
    }
}

/// Why the TCP side of [`ClientConn::connect_any`] failed.
enum Refusal {
    /// Nothing listens at the address; it said so after this long.
    Refused(Duration),
    Other(String),
}

fn reason(e: &ConnError) -> String {
    match e {
        ConnError::Connect { reason, .. } => reason.clone(),
        other => other.to_string(),
    }
}

/// Makes a dead coordinator host show up as an error on an idle TCP
/// session within about twice `idle`, not only on the next write (and a
/// write that is not acknowledged within that time fails too). Best effort:
/// without it, the session still ends on the next failed write.
fn set_keepalive(tcp: &TcpStream, idle: Duration) {
    use rustix::net::sockopt;
    // The kernel counts keep-alive times in whole seconds.
    let idle = idle.max(Duration::from_secs(1));
    let user_timeout = u32::try_from((idle * 2).as_millis()).unwrap_or(u32::MAX);
    let result = sockopt::set_socket_keepalive(tcp, true)
        .and_then(|()| sockopt::set_tcp_keepidle(tcp, idle))
        .and_then(|()| sockopt::set_tcp_keepintvl(tcp, idle))
        .and_then(|()| sockopt::set_tcp_keepcnt(tcp, 2))
        .and_then(|()| sockopt::set_tcp_user_timeout(tcp, user_timeout));
    if let Err(e) = result {
        tracing::debug!(error = %e, "TCP keep-alive not set");
    }
}
