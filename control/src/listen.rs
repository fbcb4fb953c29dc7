//! What the coordinator and the relay share as servers: QUIC on a UDP port
//! and TLS on the same TCP port.

use std::io;
use std::net::{SocketAddr, UdpSocket};

use tokio::net::TcpListener;

/// Which half of [`bind_pair`] failed, and where.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {proto} {addr}: {source}")]
pub struct BindError {
    /// `UDP` or `TCP`.
    pub proto: &'static str,
    pub addr: SocketAddr,
    #[source]
    pub source: io::Error,
}

/// A UDP socket (made by `bind_udp`, which sizes its buffers) and a TCP
/// listener on the same port. When the port is left to the system (0), the
/// one it picks for UDP may be taken for TCP (by another listener, or as a
/// connection's local port): another is tried then.
pub async fn bind_pair(
    listen: SocketAddr,
    bind_udp: impl Fn(SocketAddr) -> io::Result<UdpSocket>,
) -> Result<(UdpSocket, TcpListener), BindError> {
    const ATTEMPTS: usize = 16;
    let mut attempt = 1;
    loop {
        let udp = bind_udp(listen).map_err(|source| BindError {
            proto: "UDP",
            addr: listen,
            source,
        })?;
        let port = udp.local_addr().map_or(listen.port(), |a| a.port());
        let tcp_addr = SocketAddr::new(listen.ip(), port);
        match TcpListener::bind(tcp_addr).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e)
                if listen.port() == 0
                    && e.kind() == io::ErrorKind::AddrInUse
                    && attempt < ATTEMPTS =>
            {
                attempt += 1;
            }
            Err(source) => {
                return Err(BindError {
                    proto: "TCP",
                    addr: tcp_addr,
                    source,
                })
            }
        }
    }
}

/// The server's side of a TLS handshake on `stream`, within `timeout`, and
/// the connection's channel binding (TLS exporter under `label`, 32 bytes,
/// empty context). A failure is logged at debug level (a stranger's
/// business, not the operator's) and gives `None`.
pub async fn accept_tls(
    acceptor: &tokio_rustls::TlsAcceptor,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    timeout: std::time::Duration,
    label: &[u8],
) -> Option<(
    tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    [u8; 32],
)> {
    let tls = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return None;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            return None;
        }
    };
    match tls
        .get_ref()
        .1
        .export_keying_material([0u8; 32], label, Some(b""))
    {
        Ok(binding) => Some((tls, binding)),
        Err(e) => {
            tracing::debug!(%peer, error = %e, "TLS exporter unavailable");
            None
        }
    }
}
