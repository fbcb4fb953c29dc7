#![allow(clippy::unwrap_used)]
//! A real coordinator on loopback, with nodes over QUIC and over TLS/TCP.

use std::time::Duration;

use meshd_coord::net::tls::{Identity, FILES};
use meshd_coord::net::{ClientConn, ConnError, Server, Transport};
use meshd_coord::*;
use meshd_proto::client::{Client, ClientEvent, Join};
use meshd_proto::token::JoinToken;
use meshd_proto::*;
use rand::rngs::StdRng;
use rand::SeedableRng;
use x25519_dalek::StaticSecret;

struct Setup {
    server: Server,
    token: JoinToken,
    _dir: tempfile::TempDir,
}

async fn start() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let identity = Identity::load_or_create(dir.path(), &FILES).unwrap();
    let static_key = identity.static_key.clone();
    let db = dir.path().join("state.db");
    let config = Config {
        handshake_timeout: Duration::from_millis(300),
        ..Config::default()
    };
    let server = Server::start(&identity, "127.0.0.1:0".parse().unwrap(), move |_waker| {
        Coordinator::new(
            config,
            static_key,
            Box::new(SqliteStore::open(&db)?),
            Box::new(StdRng::from_os_rng()),
            std::time::SystemTime::now(),
        )
    })
    .await
    .unwrap();
    let spec = TokenSpec {
        reusable: true,
        ..TokenSpec::default()
    };
    let (_, secret) = server
        .call(move |c, now| c.create_token(spec, now))
        .await
        .unwrap()
        .unwrap();
    let token = JoinToken {
        secret,
        cert_pin: identity.pin(),
        addresses: vec![server.quic_addr.to_string()],
    };
    // The token survives its text form, as an operator would paste it.
    let token = JoinToken::parse(&token.encode().unwrap()).unwrap();
    Setup {
        server,
        token,
        _dir: dir,
    }
}

/// Moves messages between a connection and a client until `done` holds.
async fn pump(
    conn: &mut ClientConn,
    client: &mut Client,
    mut done: impl FnMut(&ClientEvent) -> bool,
) {
    let run = async {
        loop {
            while let Some(m) = client.poll_transmit() {
                conn.send(&m).await.unwrap();
            }
            while let Some(e) = client.poll_event() {
                if done(&e) {
                    return;
                }
            }
            let msg = conn
                .recv()
                .await
                .unwrap()
                .expect("coordinator closed the session");
            client.handle_message(msg).unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("timed out");
}

async fn join(s: &Setup, n: u8, name: &str, transport: Transport) -> (ClientConn, Client) {
    let mut conn = ClientConn::connect(&s.token, transport).await.unwrap();
    let join = Join::Register {
        token_secret: s.token.secret.clone(),
        name: name.into(),
    };
    let mut client = Client::new(StaticSecret::from([n; 32]), join, conn.binding());
    pump(&mut conn, &mut client, |e| *e == ClientEvent::PeersChanged).await;
    (conn, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_over_quic_and_tcp_and_see_each_other() {
    let s = start().await;
    let (mut qa, mut a) = join(&s, 1, "over-quic", Transport::Quic).await;
    let (_qb, b) = join(&s, 2, "over-tcp", Transport::Tcp).await;
    let ia = a.info().unwrap().node_id;
    let ib = b.info().unwrap().node_id;
    assert_eq!(b.peers().keys().copied().collect::<Vec<_>>(), [ia]);
    pump(&mut qa, &mut a, |e| *e == ClientEvent::PeersChanged).await;
    assert_eq!(a.peers().keys().copied().collect::<Vec<_>>(), [ib]);
    assert_eq!(a.peers()[&ib].name, "over-tcp");
    let nodes = s.server.call(|c, _| c.state().nodes.len()).await.unwrap();
    assert_eq!(nodes, 2);
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_for_another_coordinator_fails_on_the_pin() {
    let s = start().await;
    for transport in [Transport::Quic, Transport::Tcp] {
        let mut wrong = s.token.clone();
        wrong.cert_pin[0] ^= 1;
        let err = ClientConn::connect(&wrong, transport).await.unwrap_err();
        assert!(
            matches!(&err, ConnError::Connect { reason, .. } if reason.contains("pin")),
            "{transport:?}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_malformed_clients_get_an_error_and_are_closed() {
    let s = start().await;
    for transport in [Transport::Quic, Transport::Tcp] {
        // Never answers the challenge.
        let mut conn = ClientConn::connect(&s.token, transport).await.unwrap();
        assert!(matches!(
            conn.recv().await.unwrap(),
            Some(Message::Challenge(_))
        ));
        match conn.recv().await.unwrap() {
            Some(Message::Error(e)) => {
                assert_eq!(e.code, ErrorCode::HandshakeTimeout, "{transport:?}")
            }
            other => panic!("{transport:?}: {other:?}"),
        }
        assert_eq!(conn.recv().await.unwrap(), None);

        // Sends a frame of a version nobody speaks.
        let mut conn = ClientConn::connect(&s.token, transport).await.unwrap();
        conn.recv().await.unwrap();
        conn.send_raw(&[0, 0, 0, 3, 7, 0, 2]).await.unwrap();
        match conn.recv().await.unwrap() {
            Some(Message::Error(e)) => {
                assert_eq!(e.code, ErrorCode::UnsupportedVersion, "{transport:?}")
            }
            other => panic!("{transport:?}: {other:?}"),
        }
    }
}

/// Datagrams the kernel dropped on the UDP socket bound to 127.0.0.1:`port`
/// (the last column of /proc/net/udp).
fn udp_drops(port: u16) -> u64 {
    let local = format!("0100007F:{port:04X}");
    let table = std::fs::read_to_string("/proc/net/udp").unwrap();
    let line = table
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(local.as_str()))
        .expect("the server's socket is in /proc/net/udp");
    line.split_whitespace().last().unwrap().parse().unwrap()
}

/// In a join storm every node's handshakes and ACKs arrive on the one QUIC
/// socket faster, at times, than the endpoint reads them. With the system's
/// default receive buffer (208 KiB, about 90 such datagrams) the kernel
/// dropped thousands a second, and 1,000 nodes' handshakes timed out
/// (docs/benchmarks.md, "Coordinator scale"). The socket must hold a burst.
#[tokio::test(flavor = "current_thread")]
async fn a_burst_waits_in_the_quic_socket_while_the_endpoint_is_busy() {
    let s = start().await;
    let port = s.server.quic_addr.port();
    let before = udp_drops(port);
    // While this synchronous code runs, the single-threaded runtime polls
    // nothing: the endpoint reads nothing and every datagram must queue.
    let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for _ in 0..1000 {
        sender.send_to(&[0u8; 1200], s.server.quic_addr).unwrap();
    }
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(udp_drops(port) - before, 0, "datagrams dropped");
    // The endpoint discards what is not QUIC and still serves nodes.
    join(&s, 1, "after-the-burst", Transport::Quic).await;
    s.server.shutdown().await;
}

#[test]
fn identity_is_created_once_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let a = Identity::load_or_create(dir.path(), &FILES).unwrap();
    let b = Identity::load_or_create(dir.path(), &FILES).unwrap();
    assert_eq!(a.pin(), b.pin());
    assert_eq!(a.static_key.to_bytes(), b.static_key.to_bytes());
    use std::os::unix::fs::PermissionsExt;
    for f in ["coord-key.der", "coord-x25519.key"] {
        let mode = std::fs::metadata(dir.path().join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    assert!(!format!("{a:?}").contains(&format!("{:?}", a.static_key.to_bytes())));
}

/// A control session is the one stream the coordinator opens. quinn keeps
/// state for every stream a peer may open (9 KiB per connection with its
/// defaults, docs/benchmarks.md "Coordinator scale"), so a node may open
/// none, nor send unreliable datagrams; its session still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_node_may_open_no_streams_and_send_no_datagrams() {
    let s = start().await;
    let (_endpoint, conn) = raw_quic(&s).await;
    assert_eq!(conn.max_datagram_size(), None, "datagrams accepted");
    let (_send, mut recv) = tokio::time::timeout(Duration::from_secs(10), conn.accept_bi())
        .await
        .unwrap()
        .unwrap();
    // The transport parameters arrived with the handshake: without credit an
    // open waits forever, with it it would return at once.
    let wait = Duration::from_millis(300);
    assert!(
        tokio::time::timeout(wait, conn.open_bi()).await.is_err(),
        "a node opened a bidirectional stream"
    );
    assert!(
        tokio::time::timeout(wait, conn.open_uni()).await.is_err(),
        "a node opened a unidirectional stream"
    );
    // The coordinator's stream carries the session: its challenge arrives.
    let mut buf = [0u8; 7];
    tokio::time::timeout(Duration::from_secs(10), recv.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    assert!(len > 3, "a frame with a body");
    s.server.shutdown().await;
}

/// Decodes everything a session's stream carried until its clean end.
/// A plain QUIC connection to the coordinator, pinned as a node's is (the
/// endpoint must live as long as the connection).
async fn raw_quic(s: &Setup) -> (quinn::Endpoint, quinn::Connection) {
    let crypto = meshd_control::client_config(s.token.cert_pin).unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(crypto)));
    let conn = endpoint
        .connect(s.server.quic_addr, SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    (endpoint, conn)
}

fn frames(bytes: &[u8]) -> Vec<Message> {
    let mut d = FrameDecoder::new();
    d.feed(bytes);
    let out = std::iter::from_fn(|| d.next_message().unwrap()).collect();
    d.finish().unwrap();
    out
}

/// A node whose stream ends inside a frame is answered `Malformed`, as the
/// spec promises for every decoding error, and the coordinator then closes
/// its side cleanly: a TLS close_notify (the node's read ends without an
/// "unexpected EOF"), a QUIC FIN. It used to stop reading and drop the TCP
/// connection without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_ends_inside_a_frame_is_answered_malformed_and_closed_cleanly() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = start().await;
    let partial = [0u8, 0, 0, 40, 1, 0, 3, 1];
    let wait = Duration::from_secs(10);

    // TLS over TCP.
    let config = meshd_control::client_config(s.token.cert_pin).unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(s.server.quic_addr)
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from(SERVER_NAME).unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(&partial).await.unwrap();
    tls.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(wait, tls.read_to_end(&mut got))
        .await
        .unwrap()
        .expect("the coordinator ends with close_notify");
    let got = frames(&got);
    assert!(
        matches!(&got[..], [Message::Challenge(_), Message::Error(e)] if e.code == ErrorCode::Malformed),
        "TLS/TCP: {got:?}"
    );

    // QUIC.
    let (_endpoint, conn) = raw_quic(&s).await;
    let (mut send, mut recv) = tokio::time::timeout(wait, conn.accept_bi())
        .await
        .unwrap()
        .unwrap();
    send.write_all(&partial).await.unwrap();
    send.finish().unwrap();
    let got = tokio::time::timeout(wait, recv.read_to_end(1 << 20))
        .await
        .unwrap()
        .expect("the coordinator ends the stream cleanly");
    let got = frames(&got);
    assert!(
        matches!(&got[..], [Message::Challenge(_), Message::Error(e)] if e.code == ErrorCode::Malformed),
        "QUIC: {got:?}"
    );
    s.server.shutdown().await;
}
