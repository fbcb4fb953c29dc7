//! In-process tests on loopback: real relays, real clients, real TLS and
//! QUIC. Raw connections (the crate's own transport helpers) play clients
//! that misbehave.

#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use meshd_proto::auth::{self, ProofInput, Purpose};
use meshd_proto::relay::{ErrorCode, Frame, GoneReason};
use meshd_proto::{stun, NodeKey};
use rand::RngCore;
use tempfile::TempDir;
use tokio::time::Instant;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::client::{ClientOptions, Event, RelayClient, SendError, TransportChoice};
use crate::conn::{connect_tls, Handshake, Io};
use crate::{ClientError, Limits, Members, MeshPeer, RelayConfig, RelayServer, Role, Transport};

const DEADLINE: Duration = Duration::from_secs(10);

/// Waits until `cond` holds, checking every few milliseconds, or fails.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

struct Relay {
    server: RelayServer,
    members: Members,
    _dir: TempDir,
}

impl Relay {
    async fn start(limits: Limits, mesh: Vec<MeshPeer>) -> Relay {
        let dir = tempfile::tempdir().unwrap();
        let members = Members::new();
        let mut config = RelayConfig::new(dir.path());
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.stun_listen = Some("127.0.0.1:0".parse().unwrap());
        config.mesh = mesh;
        config.limits = limits;
        let server = RelayServer::start(config, members.clone()).await.unwrap();
        Relay {
            server,
            members,
            _dir: dir,
        }
    }

    async fn new() -> Relay {
        Self::start(Limits::default(), vec![]).await
    }

    /// A new key admitted as a node.
    fn node(&self) -> StaticSecret {
        let secret = secret();
        self.members.insert(PublicKey::from(&secret), Role::Node);
        secret
    }

    fn options(&self, transport: TransportChoice) -> ClientOptions {
        let mut o = ClientOptions::new(self.server.addr().to_string(), self.server.pin());
        o.transport = transport;
        o.relay_key = Some(self.server.public_key());
        o
    }

    async fn connect(&self, secret: &StaticSecret, transport: TransportChoice) -> RelayClient {
        within(
            "connect",
            RelayClient::connect(&self.options(transport), secret),
        )
        .await
        .unwrap()
    }

    fn as_peer(&self) -> MeshPeer {
        MeshPeer {
            addr: self.server.addr().to_string(),
            pin: self.server.pin(),
            key: self.server.public_key(),
        }
    }
}

async fn next_packet(c: &mut RelayClient) -> (PublicKey, Vec<u8>) {
    loop {
        match within("a packet", c.recv()).await.unwrap() {
            Event::Packet { src, datagram } => return (src, datagram.to_vec()),
            Event::PeerGone { .. } => continue,
        }
    }
}

fn secret() -> StaticSecret {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    StaticSecret::from(b)
}

fn key(secret: &StaticSecret) -> PublicKey {
    PublicKey::from(secret)
}

#[tokio::test]
async fn two_clients_exchange_datagrams_over_tls_quic_and_mixed() {
    let relay = Relay::new().await;
    use TransportChoice::{Auto, Quic, Tls};
    for (ta, tb) in [(Tls, Tls), (Quic, Quic), (Tls, Quic), (Auto, Tls)] {
        let (sa, sb) = (relay.node(), relay.node());
        let mut a = relay.connect(&sa, ta).await;
        let mut b = relay.connect(&sb, tb).await;
        if ta != Tls {
            assert_eq!(a.transport(), Transport::Quic, "QUIC is preferred");
        }
        a.send(&key(&sb), &[4, 0, 0, 0, 1, 2, 3]).unwrap();
        assert_eq!(
            next_packet(&mut b).await,
            (key(&sa), vec![4, 0, 0, 0, 1, 2, 3])
        );
        // Larger than a QUIC datagram: it goes on the stream instead.
        let big = vec![0x42; 5000];
        b.send(&key(&sa), &big).unwrap();
        b.send(&key(&sa), &[1]).unwrap();
        let mut got = vec![next_packet(&mut a).await, next_packet(&mut a).await];
        got.sort_by_key(|(_, d)| d.len());
        assert_eq!(got, [(key(&sb), vec![1]), (key(&sb), big)]);
        assert!(a.ping().await.unwrap() < Duration::from_secs(1));
        a.close().await;
        b.close().await;
    }
    until("the counters", || relay.server.counters().packets_out == 12).await;
    let c = relay.server.counters();
    assert_eq!((c.packets_in, c.bytes_in), (12, 4 * (7 + 5000 + 1)));
    assert_eq!(c.bytes_out, c.bytes_in);
}

#[tokio::test]
async fn a_packet_for_a_key_that_is_not_connected_is_answered_with_peer_gone() {
    let relay = Relay::new().await;
    let sa = relay.node();
    let mut a = relay.connect(&sa, TransportChoice::Tls).await;
    let absent = key(&secret());
    a.send(&absent, &[1, 0, 0, 0]).unwrap();
    let event = within("PeerGone", a.recv()).await.unwrap();
    assert_eq!(
        event,
        Event::PeerGone {
            key: absent,
            reason: GoneReason::NotConnected
        }
    );
    assert_eq!(relay.server.counters().drops.no_route, 1);
}

#[tokio::test]
async fn strangers_are_refused_and_removed_members_are_cut_within_a_second() {
    let relay = Relay::new().await;
    let stranger = secret();
    for t in [TransportChoice::Tls, TransportChoice::Quic] {
        let err = RelayClient::connect(&relay.options(t), &stranger)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::Refused {
                    code: ErrorCode::NotMember,
                    ..
                }
            ),
            "{err}"
        );
    }
    for t in [TransportChoice::Tls, TransportChoice::Quic] {
        let (sa, sb) = (relay.node(), relay.node());
        let mut a = relay.connect(&sa, t).await;
        let b = relay.connect(&sb, t).await;
        let removed = Instant::now();
        relay.members.remove(&key(&sa));
        let err = within("the cut", a.recv()).await.unwrap_err();
        assert!(
            removed.elapsed() < Duration::from_secs(1),
            "{:?}",
            removed.elapsed()
        );
        assert!(
            matches!(
                err,
                ClientError::Refused {
                    code: ErrorCode::NotMember,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(a.send(&key(&sb), &[1]), Err(SendError::Closed));
        assert!(a.ping().await.is_err());
        // Nothing reaches the removed key any more.
        b.send(&key(&sa), &[1, 0, 0, 0]).unwrap();
        until("no route", || relay.server.counters().drops.no_route > 0).await;
        relay.members.insert(key(&sa), Role::Node);
        let mut a = relay.connect(&sa, t).await;
        b.send(&key(&sa), &[2]).unwrap();
        assert_eq!(next_packet(&mut a).await, (key(&sb), vec![2]));
    }
    assert_eq!(relay.server.counters().cut_removed, 2);
}

#[tokio::test]
async fn a_second_connection_with_the_same_key_replaces_the_first() {
    let relay = Relay::new().await;
    let (sa, sb) = (relay.node(), relay.node());
    let mut first = relay.connect(&sa, TransportChoice::Tls).await;
    let mut second = relay.connect(&sa, TransportChoice::Quic).await;
    let err = within("the cut", first.recv()).await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Refused {
                code: ErrorCode::Replaced,
                ..
            }
        ),
        "{err}"
    );
    let b = relay.connect(&sb, TransportChoice::Tls).await;
    b.send(&key(&sa), &[7]).unwrap();
    assert_eq!(next_packet(&mut second).await, (key(&sb), vec![7]));
}

/// A raw TLS connection, up to the relay's `ServerHello`.
async fn raw(relay: &Relay) -> (Io, NodeKey, [u8; 32]) {
    let addr = relay.server.addr();
    let mut io = connect_tls(&addr.to_string(), addr, relay.server.pin())
        .await
        .unwrap();
    match io.read_handshake().await.unwrap() {
        Handshake::ServerHello { relay_key, nonce } => (io, relay_key, nonce),
        other => panic!("{other:?}"),
    }
}

fn proof(
    io: &Io,
    relay_key: NodeKey,
    nonce: &[u8; 32],
    claimed: NodeKey,
    secret: &StaticSecret,
) -> [u8; 32] {
    let input = ProofInput {
        purpose: Purpose::Relay,
        coordinator_key: relay_key,
        node_key: claimed,
        nonce,
        channel_binding: &io.binding,
        extra: &[],
    };
    auth::prove(&input, secret).unwrap()
}

async fn refusal(io: &mut Io) -> ErrorCode {
    match within("an error", io.read_handshake()).await.unwrap() {
        Handshake::Error { code, .. } => code,
        other => panic!("expected an Error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_client_cannot_claim_a_key_it_does_not_hold() {
    let relay = Relay::new().await;
    let (victim, attacker) = (relay.node(), relay.node());
    let victim_key = auth::public_key(&victim);

    // Its own proof for the victim's key, made with its own secret.
    let (mut io, relay_key, nonce) = raw(&relay).await;
    let p = proof(&io, relay_key, &nonce, victim_key, &attacker);
    io.write_frame(&Frame::ClientAuth {
        node_key: victim_key,
        proof: p,
    })
    .await
    .unwrap();
    assert_eq!(refusal(&mut io).await, ErrorCode::BadProof);

    // A proof the victim made on another connection (replayed).
    let (other, relay_key, other_nonce) = raw(&relay).await;
    let replayed = proof(&other, relay_key, &other_nonce, victim_key, &victim);
    let (mut io, _, _) = raw(&relay).await;
    io.write_frame(&Frame::ClientAuth {
        node_key: victim_key,
        proof: replayed,
    })
    .await
    .unwrap();
    assert_eq!(refusal(&mut io).await, ErrorCode::BadProof);

    // A low-order key.
    let (mut io, _, _) = raw(&relay).await;
    io.write_frame(&Frame::ClientAuth {
        node_key: NodeKey([0; 32]),
        proof: [0; 32],
    })
    .await
    .unwrap();
    assert_eq!(refusal(&mut io).await, ErrorCode::InvalidKey);

    // A node may not announce keys as a relay would, to draw their packets.
    let mut io = raw_authenticated(&relay, &attacker).await;
    io.write_frame(&Frame::PeerPresent(victim_key))
        .await
        .unwrap();
    assert_eq!(refusal(&mut io).await, ErrorCode::UnexpectedFrame);
    assert_eq!(relay.server.counters().refused, 3);
}

#[tokio::test]
async fn meshed_relays_forward_between_their_clients() {
    let a = Relay::new().await;
    // Only B dials; the link carries both directions.
    let b = Relay::start(Limits::default(), vec![a.as_peer()]).await;
    a.members.insert(b.server.public_key(), Role::Relay);
    b.members.insert(a.server.public_key(), Role::Relay);
    until("the mesh link", || {
        a.server.counters().mesh_links == 1 && b.server.counters().mesh_links == 1
    })
    .await;
    let (sx, sy) = (a.node(), b.node());
    let mut x = a.connect(&sx, TransportChoice::Quic).await;
    let mut y = b.connect(&sy, TransportChoice::Tls).await;
    // Presence crosses the link shortly after each connects: until then A
    // answers with PeerGone, so X sends until Y hears it.
    let (sender, to) = (x.sender(), key(&sy));
    let resend = tokio::spawn(async move {
        loop {
            let _ = sender.send(&to, &[1]);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    assert_eq!(next_packet(&mut y).await, (key(&sx), vec![1]));
    resend.abort();
    y.send(&key(&sx), &[2]).unwrap();
    assert_eq!(next_packet(&mut x).await, (key(&sy), vec![2]));
    // A forwarded packet is delivered, never forwarded again.
    let (ca, cb) = (a.server.counters(), b.server.counters());
    assert_eq!(ca.drops.forward_no_route + cb.drops.forward_no_route, 0);
    // When Y leaves, A learns it: packets for Y then have no route there.
    let before = a.server.counters().drops.no_route;
    y.close().await;
    until("A to learn that Y left", || {
        let _ = x.send(&key(&sy), &[3]);
        a.server.counters().drops.no_route > before
    })
    .await;
    // The mesh list changes at run time: the link goes, and comes back.
    b.server.set_mesh(vec![]);
    until("the link to go", || {
        a.server.counters().mesh_links == 0 && b.server.counters().mesh_links == 0
    })
    .await;
    b.server.set_mesh(vec![a.as_peer(), b.as_peer()]);
    until("the link to come back", || {
        a.server.counters().mesh_links == 1 && b.server.counters().mesh_links == 1
    })
    .await;
}

/// A flooding sender and a modest one to the same slow destination: the
/// modest one sends less than half of what the destination reads, so with
/// fair queueing all its packets get through (its queue is never the
/// longest, so it never loses packets), while the flood's are dropped and
/// counted, and the outbox never exceeds its limit. (With one FIFO queue
/// it would lose as large a part of its packets as the flood.)
#[tokio::test]
async fn a_flood_does_not_starve_another_sender_and_queues_stay_bounded() {
    const LIMIT: usize = 256 << 10;
    let limits = Limits {
        queue_bytes: LIMIT,
        ..Limits::default()
    };
    let relay = Relay::start(limits, vec![]).await;
    let (sf, sq, sd) = (relay.node(), relay.node(), relay.node());
    let flood = relay.connect(&sf, TransportChoice::Tls).await;
    let quiet = relay.connect(&sq, TransportChoice::Tls).await;
    // The destination: a raw connection that reads at about 8 MB/s, far
    // less than the flood offers.
    let mut d = raw_authenticated(&relay, &sd).await;
    let dk = auth::public_key(&sd);
    const ROUNDS: u64 = 500;
    let quiet_key = key(&sq).to_bytes();
    let reader = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let (mut from_quiet, mut from_flood) = (0u64, 0u64);
        let mut buf = vec![0u8; 8 << 10];
        while from_quiet < ROUNDS {
            let n =
                match tokio::time::timeout(Duration::from_secs(2), d.reader.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => n,
                    _ => break,
                };
            d.decoder.feed(&buf[..n]);
            while let Some(f) = d.decoder.next_frame().unwrap() {
                if let Frame::RecvPacket { src, .. } = f {
                    if src.0 == quiet_key {
                        from_quiet += 1;
                    } else {
                        from_flood += 1;
                    }
                }
            }
            // The pace of a slow reader, not a wait for anything.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        (from_quiet, from_flood)
    });

    let dst = PublicKey::from(dk.0);
    let datagram = [0u8; 1000];
    let mut max_queued = 0;
    for _ in 0..ROUNDS {
        for _ in 0..40 {
            let _ = flood.send(&dst, &datagram);
        }
        quiet.send(&dst, &datagram).unwrap();
        // The senders' pace: the quiet one sends about one packet per 2 ms,
        // the flood 40, and the destination reads about 16.
        tokio::time::sleep(Duration::from_millis(2)).await;
        max_queued = max_queued.max(relay.server.counters().queued_bytes);
    }
    let (from_quiet, from_flood) = within("the reader", reader).await.unwrap();
    let c = relay.server.counters();
    assert_eq!(
        from_quiet, ROUNDS,
        "the quiet sender's packets all arrive (flood: {from_flood}; {c:?})"
    );
    assert!(
        c.drops.queue_full > 0,
        "the flood overflowed the queue: {c:?}"
    );
    assert!(max_queued <= LIMIT as u64, "queue bounded: {max_queued}");
}

#[tokio::test]
async fn the_stun_responder_reports_the_observed_address() {
    let relay = Relay::new().await;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut txid = [0u8; 12];
    rand::rng().fill_bytes(&mut txid);
    let txid = stun::TransactionId(txid);
    let mut req = Vec::new();
    stun::write_binding_request(txid, &mut req);
    socket
        .send_to(&req, relay.server.stun_addr().unwrap())
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let (n, _) = within("the STUN answer", socket.recv_from(&mut buf))
        .await
        .unwrap();
    let mapped = stun::parse_binding_response(&buf[..n], txid).unwrap();
    assert_eq!(mapped, socket.local_addr().unwrap());
}

/// Debian's `turnutils_stunclient` (package coturn) against the responder.
#[tokio::test]
async fn turnutils_stunclient_reads_its_mapped_address() {
    let Ok(path) = which("turnutils_stunclient") else {
        eprintln!("SKIPPED: turnutils_stunclient not found; apt-get install coturn (scripts/install-deps)");
        return;
    };
    let relay = Relay::new().await;
    let stun_addr: SocketAddr = relay.server.stun_addr().unwrap();
    let port = stun_addr.port().to_string();
    let run = tokio::task::spawn_blocking(move || {
        std::process::Command::new(path)
            .args(["-p", &port, "-L", "127.0.0.1", "127.0.0.1"])
            .output()
    });
    let out = within("turnutils_stunclient", run).await.unwrap().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("UDP reflexive addr: 127.0.0.1:"), "{text}");
    assert_eq!(relay.server.counters().stun_requests, 1, "{text}");
}

fn which(name: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(())
}

#[tokio::test]
async fn the_identity_persists_and_the_keys_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let mut config = RelayConfig::new(dir.path());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.stun_listen = None;
    let first = RelayServer::start(config.clone(), Members::new())
        .await
        .unwrap();
    let (pin, key) = (first.pin(), first.public_key());
    first.shutdown().await;
    let second = RelayServer::start(config, Members::new()).await.unwrap();
    assert_eq!((second.pin(), second.public_key()), (pin, key));
    for f in [
        crate::identity::FILES.key,
        crate::identity::FILES.static_key,
    ] {
        let mode = std::fs::metadata(dir.path().join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    let json = serde_json::to_string(&second.counters()).unwrap();
    assert!(json.contains("\"queue_full\":0"), "{json}");
}

/// A raw connection authenticated with `secret`, after its `ServerOk`.
async fn raw_authenticated(relay: &Relay, secret: &StaticSecret) -> Io {
    let (mut io, relay_key, nonce) = raw(relay).await;
    let k = auth::public_key(secret);
    let p = proof(&io, relay_key, &nonce, k, secret);
    io.write_frame(&Frame::ClientAuth {
        node_key: k,
        proof: p,
    })
    .await
    .unwrap();
    assert!(matches!(
        io.read_handshake().await.unwrap(),
        Handshake::ServerOk
    ));
    io
}

impl Io {
    async fn write_raw(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.writer.write_all(bytes).await.unwrap();
        self.writer.flush().await.unwrap();
    }
}

/// The next frame on a raw connection, owned enough to compare.
async fn next_frame(io: &mut Io) -> String {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    loop {
        if let Some(f) = io.decoder.next_frame().unwrap() {
            return format!("{f:?}");
        }
        let n = within("a frame", io.reader.read(&mut buf)).await.unwrap();
        assert!(n > 0, "closed");
        io.decoder.feed(&buf[..n]);
    }
}

/// Two relays link to this one; the second announces key K. A packet the
/// first forwards for K is dropped, not forwarded over the second link:
/// only a packet from this relay's own client reaches K's relay.
#[tokio::test]
async fn forwarded_packets_are_never_forwarded_again() {
    let relay = Relay::new().await;
    let local = relay.node();
    let mut n = relay.connect(&local, TransportChoice::Tls).await;
    let (r1, r2) = (secret(), secret());
    relay.members.insert(key(&r1), Role::Relay);
    relay.members.insert(key(&r2), Role::Relay);
    let mut l1 = raw_authenticated(&relay, &r1).await;
    let mut l2 = raw_authenticated(&relay, &r2).await;
    let local_key = NodeKey(key(&local).to_bytes());
    // Each link hears of the relay's client.
    assert_eq!(
        next_frame(&mut l1).await,
        format!("{:?}", Frame::PeerPresent(local_key))
    );
    assert_eq!(
        next_frame(&mut l2).await,
        format!("{:?}", Frame::PeerPresent(local_key))
    );

    let far = NodeKey([9; 32]);
    let stranger = NodeKey([8; 32]);
    l2.write_frame(&Frame::PeerPresent(far)).await.unwrap();
    // A forwarded packet for the local client arrives with its source.
    l1.write_frame(&Frame::ForwardPacket {
        src: stranger,
        dst: local_key,
        datagram: &[5],
    })
    .await
    .unwrap();
    assert_eq!(
        next_packet(&mut n).await,
        (PublicKey::from(stranger.0), vec![5])
    );
    // Once L2's announcement is in, a forwarded packet for `far` is dropped.
    until("the announcement", || {
        n.send(&PublicKey::from(far.0), &[6]).unwrap();
        relay.server.counters().packets_out >= 2
    })
    .await;
    assert_eq!(
        next_frame(&mut l2).await,
        format!(
            "{:?}",
            Frame::ForwardPacket {
                src: local_key,
                dst: far,
                datagram: &[6]
            }
        )
    );
    l1.write_frame(&Frame::ForwardPacket {
        src: stranger,
        dst: far,
        datagram: &[7],
    })
    .await
    .unwrap();
    until("the drop", || {
        relay.server.counters().drops.forward_no_route == 1
    })
    .await;
    // Sent after it, and the first thing L2 sees after the packets of `n`.
    n.send(&PublicKey::from(far.0), &[8]).unwrap();
    loop {
        let f = next_frame(&mut l2).await;
        if f == format!(
            "{:?}",
            Frame::ForwardPacket {
                src: local_key,
                dst: far,
                datagram: &[6]
            }
        ) {
            continue;
        }
        assert_eq!(
            f,
            format!(
                "{:?}",
                Frame::ForwardPacket {
                    src: local_key,
                    dst: far,
                    datagram: &[8]
                }
            )
        );
        break;
    }
}

/// Three relays, each linked to both others (B dials A; C dials A and B):
/// presence is only ever of a relay's own clients, so packets take the
/// direct link, and a relay that goes away takes only its own links.
#[tokio::test]
async fn a_three_relay_mesh_keeps_working_when_one_relay_goes() {
    let a = Relay::new().await;
    let b = Relay::start(Limits::default(), vec![a.as_peer()]).await;
    a.members.insert(b.server.public_key(), Role::Relay);
    b.members.insert(a.server.public_key(), Role::Relay);
    let c = Relay::start(Limits::default(), vec![a.as_peer(), b.as_peer()]).await;
    a.members.insert(c.server.public_key(), Role::Relay);
    b.members.insert(c.server.public_key(), Role::Relay);
    c.members.insert(a.server.public_key(), Role::Relay);
    c.members.insert(b.server.public_key(), Role::Relay);
    until("the links", || {
        [&a, &b, &c]
            .iter()
            .all(|r| r.server.counters().mesh_links == 2)
    })
    .await;
    let (sx, sz) = (a.node(), c.node());
    let mut x = a.connect(&sx, TransportChoice::Tls).await;
    let mut z = c.connect(&sz, TransportChoice::Quic).await;
    until("X to reach Z", || {
        let _ = x.send(&key(&sz), &[1]);
        c.server.counters().packets_out > 0
    })
    .await;
    assert_eq!(next_packet(&mut z).await, (key(&sx), vec![1]));
    z.send(&key(&sx), &[2]).unwrap();
    assert_eq!(next_packet(&mut x).await, (key(&sz), vec![2]));
    // B leaves; A and C still have their direct link.
    b.server.shutdown().await;
    until("B's links to go", || {
        a.server.counters().mesh_links == 1 && c.server.counters().mesh_links == 1
    })
    .await;
    z.send(&key(&sx), &[3]).unwrap();
    let (src, data) = next_packet(&mut x).await;
    assert_eq!((src, data), (key(&sz), vec![3]));
}

/// A client that says nothing is refused when the handshake time is up; one
/// that sends bytes that do not decode is told so.
#[tokio::test]
async fn silent_and_malformed_clients_are_refused_with_the_reason() {
    let limits = Limits {
        handshake_timeout: Duration::from_millis(200),
        ..Limits::default()
    };
    let relay = Relay::start(limits, vec![]).await;
    let (mut silent, _, _) = raw(&relay).await;
    assert_eq!(refusal(&mut silent).await, ErrorCode::HandshakeTimeout);

    let (mut garbled, _, _) = raw(&relay).await;
    // A ClientAuth one byte short.
    garbled.write_raw(&[0x02, 0x00, 0x3f]).await;
    garbled.write_raw(&[0; 63]).await;
    assert_eq!(refusal(&mut garbled).await, ErrorCode::Malformed);

    // After the handshake too: a known type with a wrong length.
    let s = relay.node();
    let mut io = raw_authenticated(&relay, &s).await;
    io.write_raw(&[0x08, 0x00, 0x01, 0]).await;
    assert_eq!(refusal(&mut io).await, ErrorCode::Malformed);
    assert_eq!(relay.server.counters().refused, 2);
}
