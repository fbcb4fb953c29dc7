#![allow(clippy::unwrap_used)]
//! The transport against small loopback servers: QUIC preferred, TLS/TCP
//! when UDP gets no answer, both with the pinned certificate only.

use std::sync::Arc;
use std::time::{Duration, Instant};

use meshd_control::{ClientConn, ConnError, ConnectOptions, Transport};
use meshd_proto::token::cert_pin;
use meshd_proto::{ALPN, EXPORTER_LABEL, SERVER_NAME};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::AsyncWriteExt;

struct Cert {
    der: Vec<u8>,
    key: Vec<u8>,
}

fn cert() -> Cert {
    let ck = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_owned()]).unwrap();
    Cert {
        der: ck.cert.der().to_vec(),
        key: ck.signing_key.serialize_der(),
    }
}

fn server_config(c: &Cert) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(c.der.clone())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(c.key.clone())),
        )
        .unwrap();
    config.alpn_protocols = vec![ALPN.to_vec()];
    Arc::new(config)
}

/// A TLS/TCP server that sends one frame (a PeerRemoved) to each client and
/// reports the channel binding it computed.
async fn tcp_server(c: &Cert) -> (std::net::SocketAddr, tokio::sync::mpsc::Receiver<[u8; 32]>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config(c));
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let Ok(mut tls) = acceptor.accept(stream).await else {
                continue;
            };
            let binding = tls
                .get_ref()
                .1
                .export_keying_material([0u8; 32], EXPORTER_LABEL, Some(b""))
                .unwrap();
            let frame =
                meshd_proto::encode(&meshd_proto::Message::PeerRemoved(meshd_proto::NodeId(7)))
                    .unwrap();
            tls.write_all(&frame).await.unwrap();
            tls.flush().await.unwrap();
            let _ = tx.send(binding).await;
            // Keep the connection open until the client goes.
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                let _ = tokio::io::AsyncReadExt::read(&mut tls, &mut buf).await;
            });
        }
    });
    (addr, rx)
}

fn quick() -> ConnectOptions {
    ConnectOptions {
        handshake_timeout: Duration::from_secs(3),
        quic_head_start: Duration::from_millis(300),
        ..ConnectOptions::default()
    }
}

#[tokio::test]
async fn falls_back_to_tcp_when_quic_gets_no_answer() {
    let c = cert();
    let (addr, mut bindings) = tcp_server(&c).await;
    // Nothing listens on the UDP port: QUIC waits, TCP starts after the head start.
    let t0 = Instant::now();
    let mut conn = ClientConn::connect_any(&addr.to_string(), cert_pin(&c.der), &quick())
        .await
        .unwrap();
    assert_eq!(conn.transport(), Transport::Tcp);
    assert!(t0.elapsed() >= Duration::from_millis(300));
    assert_eq!(conn.remote(), addr);
    assert_eq!(
        conn.recv().await.unwrap(),
        Some(meshd_proto::Message::PeerRemoved(meshd_proto::NodeId(7)))
    );
    assert_eq!(&bindings.recv().await.unwrap(), conn.binding());
}

/// Here nothing listens on TCP: QUIC answering soon after the refusal still
/// wins (a firewall that resets TCP but lets UDP through).
#[tokio::test]
async fn uses_quic_when_it_answers() {
    let c = cert();
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(server_config(&c)).unwrap();
    let endpoint = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(quic)),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let connection = endpoint.accept().await.unwrap().await.unwrap();
        let (mut send, _recv) = connection.open_bi().await.unwrap();
        let frame = meshd_proto::encode(&meshd_proto::Message::PeerRemoved(meshd_proto::NodeId(9)))
            .unwrap();
        send.write_all(&frame).await.unwrap();
        connection.closed().await;
    });
    let mut conn = ClientConn::connect_any(&addr.to_string(), cert_pin(&c.der), &quick())
        .await
        .unwrap();
    assert_eq!(conn.transport(), Transport::Quic);
    assert_eq!(
        conn.recv().await.unwrap(),
        Some(meshd_proto::Message::PeerRemoved(meshd_proto::NodeId(9)))
    );
    conn.close().await;
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_wrong_pin_fails_on_both_transports_and_says_so() {
    let c = cert();
    let (addr, _bindings) = tcp_server(&c).await;
    let mut pin = cert_pin(&c.der);
    pin[0] ^= 1;
    let err = ClientConn::connect_any(&addr.to_string(), pin, &quick())
        .await
        .unwrap_err();
    match &err {
        ConnError::Connect { reason, .. } => {
            assert!(reason.contains("QUIC"), "{err}");
            assert!(
                reason.contains("does not match the join token's pin"),
                "{err}"
            );
        }
        other => panic!("{other:?}"),
    }
}

/// A host that refuses TCP has no coordinator: the address fails at once,
/// without waiting for QUIC's handshake timeout or its head start.
#[tokio::test]
async fn nothing_listening_fails_at_once() {
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = udp.local_addr().unwrap();
    drop(udp);
    let t0 = Instant::now();
    let err = ClientConn::connect_any(&addr.to_string(), [0; 32], &quick())
        .await
        .unwrap_err();
    assert!(
        t0.elapsed() < Duration::from_millis(300),
        "{:?}",
        t0.elapsed()
    );
    assert!(
        err.to_string().contains("TLS/TCP: connection refused"),
        "{err}"
    );
}

/// Nothing answers at all (packets dropped): the handshake timeout ends it.
#[tokio::test]
async fn silence_fails_after_the_handshake_timeout() {
    // A TCP listener that never accepts still completes TCP handshakes (the
    // backlog), and a bound UDP socket never answers QUIC.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let _udp = std::net::UdpSocket::bind(addr).unwrap();
    let opts = ConnectOptions {
        handshake_timeout: Duration::from_millis(700),
        ..quick()
    };
    let t0 = Instant::now();
    let err = ClientConn::connect_any(&addr.to_string(), [0; 32], &opts)
        .await
        .unwrap_err();
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(700), "{took:?}");
    assert!(took < Duration::from_millis(2000), "{took:?}");
    assert!(err.to_string().contains("timed out"), "{err}");
}
