//! Two engines in two network namespaces joined by a veth pair (run as
//! root): TCP through the tunnel both ways, bytes intact.

// Helpers outside #[test] functions count as non-test code for clippy.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::{Scope, ScopedJoinHandle};
use std::time::Duration;

use meshd_dataplane::engine::{Engine, EngineConfig, EngineCounters};
use meshd_dataplane::keys::{PresharedKey, PrivateKey};
use meshd_dataplane::peers::PeerConfig;
use support::*;

struct Side {
    ns: NetNs,
    key: PrivateKey,
    underlay: String,
    inner: String,
}

/// Two sides whose namespaces are joined by a veth pair (`va` in A, `vb` in
/// B) on 192.168.`net`.0/24, with tunnel addresses in 10.`net`.0.0/24, and
/// each one's peer for the other: A knows where B is; B learns A's endpoint
/// from the handshake.
fn linked_pair(net: u8, psk: Option<PresharedKey>) -> (Side, Side, PeerConfig, PeerConfig) {
    let side = |host: u8| Side {
        ns: NetNs::new(),
        key: PrivateKey::generate(),
        underlay: format!("192.168.{net}.{host}"),
        inner: format!("10.{net}.0.{host}"),
    };
    let (a, b) = (side(1), side(2));
    sh(&[
        "ip", "-n", &a.ns.name, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns",
        &b.ns.name,
    ]);
    for (side, dev) in [(&a, "va"), (&b, "vb")] {
        let addr = format!("{}/24", side.underlay);
        sh(&["ip", "-n", &side.ns.name, "addr", "add", &addr, "dev", dev]);
        sh(&["ip", "-n", &side.ns.name, "link", "set", dev, "up"]);
    }
    let peer_of_a = PeerConfig {
        public_key: b.key.public_key(),
        preshared_key: psk.clone(),
        allowed_ips: vec![format!("{}/32", b.inner).parse().unwrap()],
        endpoint: Some(format!("{}:51820", b.underlay).parse().unwrap()),
        persistent_keepalive: None,
    };
    let peer_of_b = PeerConfig {
        public_key: a.key.public_key(),
        preshared_key: psk,
        allowed_ips: vec![format!("{}/32", a.inner).parse().unwrap()],
        endpoint: None,
        persistent_keepalive: None,
    };
    (a, b, peer_of_a, peer_of_b)
}

/// Runs A's and B's engines in `s` until `stop` is set, and returns once
/// both are up with their peer.
fn spawn_engines<'scope, 'env>(
    s: &'scope Scope<'scope, 'env>,
    (a, b): (&'env Side, &'env Side),
    (peer_of_a, peer_of_b): (PeerConfig, PeerConfig),
    offload: bool,
    stop: &'env AtomicBool,
) -> [ScopedJoinHandle<'scope, EngineCounters>; 2] {
    let (ready_tx, ready) = mpsc::channel();
    let ra = ready_tx.clone();
    let ea = s.spawn(move || engine_thread(a, peer_of_a, offload, ra, stop));
    let eb = s.spawn(move || engine_thread(b, peer_of_b, offload, ready_tx, stop));
    for _ in 0..2 {
        ready.recv_timeout(Duration::from_secs(10)).unwrap();
    }
    [ea, eb]
}

fn engine_thread(
    side: &Side,
    peer: PeerConfig,
    offload: bool,
    ready: mpsc::Sender<()>,
    stop: &AtomicBool,
) -> EngineCounters {
    side.ns.enter();
    let mut engine = Engine::new(EngineConfig {
        private_key: side.key.clone(),
        tun_name: "wg0".into(),
        mtu: 1420,
        offload,
        addresses: vec![format!("{}/24", side.inner).parse().unwrap()],
        routes: Vec::new(),
        listen_port: 51820,
        fwmark: 0,
        route_allowed_ips: true,
        answer_poll: meshd_dataplane::engine::DEFAULT_ANSWER_POLL,
    })
    .unwrap();
    assert_eq!(engine.tun().offload(), offload);
    engine.set_peers(&[peer]).unwrap();
    ready.send(()).unwrap();
    engine.run(stop).unwrap();
    let status = engine.peer_status();
    assert!(status[0].last_handshake.is_some());
    engine.counters()
}

fn two_engines_carry_tcp(offload: bool, psk: Option<PresharedKey>) {
    let (a, b, peer_of_a, peer_of_b) = linked_pair(77, psk);

    let stop = AtomicBool::new(false);
    let data: Vec<u8> = (0..8_000_000u32).map(|i| (i % 251) as u8).collect();
    let server_addr: SocketAddr = format!("{}:5000", b.inner).parse().unwrap();
    let (listening, listening_rx) = mpsc::channel();
    let (counters_a, counters_b) = std::thread::scope(|s| {
        let [ea, eb] = spawn_engines(s, (&a, &b), (peer_of_a, peer_of_b), offload, &stop);

        let server = s.spawn(|| {
            b.ns.enter();
            let listener = TcpListener::bind(server_addr).unwrap();
            listening.send(()).unwrap();
            let (mut conn, _) = listener.accept().unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            let mut got = vec![0; data.len()];
            conn.read_exact(&mut got).unwrap();
            assert!(got == data, "A→B bytes differ");
            conn.write_all(&data).unwrap();
        });
        let (a, data) = (&a, &data);
        let client = s.spawn(move || {
            a.ns.enter();
            listening_rx.recv_timeout(Duration::from_secs(5)).unwrap();
            let mut conn =
                TcpStream::connect_timeout(&server_addr, Duration::from_secs(10)).unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            conn.write_all(data).unwrap();
            let mut got = vec![0; data.len()];
            conn.read_exact(&mut got).unwrap();
            assert!(got == *data, "B→A bytes differ");
        });
        let results = [client.join(), server.join()];
        stop.store(true, Ordering::Relaxed);
        let counters = (ea.join().unwrap(), eb.join().unwrap());
        for r in results {
            if let Err(panic) = r {
                std::panic::resume_unwind(panic);
            }
        }
        counters
    });
    for c in [counters_a, counters_b] {
        // 8 MB each way at ≤1380 bytes per segment.
        assert!(c.node.rx_packets > 5000, "{c:?}");
        assert!(c.node.tx_packets > 5000, "{c:?}");
        assert_eq!(c.node.spoofed, 0);
        assert_eq!(c.tun_write_errors + c.tun_read_errors, 0, "{c:?}");
    }
}

#[test]
fn tcp_through_two_engines_offload() {
    two_engines_carry_tcp(true, None);
}

#[test]
fn tcp_through_two_engines_plain_with_psk() {
    two_engines_carry_tcp(false, Some(PresharedKey::generate()));
}

/// Pings `target` from `ns` until one answer comes back or `within` passes.
fn ping_until(ns: &NetNs, target: &str, within: Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        let ok = std::process::Command::new("ip")
            .args([
                "netns", "exec", &ns.name, "ping", "-n", "-q", "-c", "1", "-W", "1", target,
            ])
            .output()
            .unwrap()
            .status
            .success();
        if ok {
            return true;
        }
    }
    false
}

/// A's underlay address changes under a running tunnel (a laptop that
/// changed networks): the socket A connected to B is bound to the old
/// address, so sends through it fail. They must fall back to the main
/// socket at once, B must follow A to its new address, and both ends must
/// end up on fresh peer sockets, with pings working all along the way.
#[test]
fn tunnel_survives_a_local_address_change() {
    let (a, b, peer_of_a, peer_of_b) = linked_pair(78, None);
    let stop = AtomicBool::new(false);
    let counters = std::thread::scope(|s| {
        let [ea, eb] = spawn_engines(s, (&a, &b), (peer_of_a, peer_of_b), true, &stop);
        let before = ping_until(&a.ns, &b.inner, Duration::from_secs(10));
        sh(&[
            "ip",
            "-n",
            &a.ns.name,
            "addr",
            "del",
            "192.168.78.1/24",
            "dev",
            "va",
        ]);
        sh(&[
            "ip",
            "-n",
            &a.ns.name,
            "addr",
            "add",
            "192.168.78.11/24",
            "dev",
            "va",
        ]);
        let after = ping_until(&a.ns, &b.inner, Duration::from_secs(10));
        let back = ping_until(&b.ns, &a.inner, Duration::from_secs(10));
        stop.store(true, Ordering::Relaxed);
        let counters = (ea.join().unwrap(), eb.join().unwrap());
        assert!(before, "no ping before the address change");
        assert!(after, "no ping from A after its address changed");
        assert!(back, "no ping from B to A at its new address");
        counters
    });
    for c in [counters.0, counters.1] {
        assert_eq!(c.node.spoofed, 0, "{c:?}");
    }
}

/// Two engines with no network between them: each one's datagrams for the
/// other leave through its relay outlet and are handed to the other's
/// engine as relayed, as the relay client of the NAT-traversal issue will.
/// TCP crosses both ways, and each engine reports the session and the
/// endpoint it learned through its event handler.
#[test]
fn tcp_through_two_engines_over_their_relay_outlets() {
    use meshd_dataplane::engine::{Endpoint, EngineHandle, Event, RelayId};
    use std::sync::{Arc, OnceLock};

    let sides: Vec<Side> = (1..=2u8)
        .map(|host| Side {
            ns: NetNs::new(),
            key: PrivateKey::generate(),
            underlay: String::new(),
            inner: format!("10.79.0.{host}"),
        })
        .collect();
    let (a, b) = (&sides[0], &sides[1]);
    let handles: [Arc<OnceLock<EngineHandle>>; 2] = Default::default();
    let stop = AtomicBool::new(false);
    let (events_tx, events) = mpsc::channel();
    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    let server_addr: SocketAddr = format!("{}:5000", b.inner).parse().unwrap();
    std::thread::scope(|s| {
        let mut engines = Vec::new();
        for (me, other) in [(0usize, 1usize), (1, 0)] {
            let (side, peer) = (&sides[me], &sides[other]);
            let (own, theirs) = (handles[me].clone(), handles[other].clone());
            let (events_tx, stop) = (events_tx.clone(), &stop);
            let own_key = side.key.public_key();
            engines.push(s.spawn(move || {
                side.ns.enter();
                let mut engine = Engine::new(EngineConfig {
                    private_key: side.key.clone(),
                    tun_name: "wg0".into(),
                    mtu: 1420,
                    offload: true,
                    addresses: vec![format!("{}/24", side.inner).parse().unwrap()],
                    routes: Vec::new(),
                    listen_port: 0,
                    fwmark: 0,
                    route_allowed_ips: true,
                    answer_poll: meshd_dataplane::engine::DEFAULT_ANSWER_POLL,
                })
                .unwrap();
                engine
                    .set_peers(&[PeerConfig {
                        public_key: peer.key.public_key(),
                        preshared_key: None,
                        allowed_ips: vec![format!("{}/32", peer.inner).parse().unwrap()],
                        endpoint: None,
                        persistent_keepalive: None,
                    }])
                    .unwrap();
                // Relay 1 is A's, relay 2 B's: each hands what it carries
                // to the other engine as coming from this one's key.
                let (out_relay, in_relay) = if me == 0 { (1, 2) } else { (2, 1) };
                engine.set_relay_outlet(Box::new(move |relay, to, datagram| {
                    assert_eq!(relay, RelayId(out_relay));
                    assert_ne!(*to, own_key);
                    if let Some(h) = theirs.get() {
                        let _ = h.relayed(RelayId(in_relay), own_key, datagram.to_vec());
                    }
                }));
                engine.set_event_handler(Box::new(move |e| {
                    let _ = events_tx.send((me, e));
                }));
                own.set(engine.handle()).unwrap();
                engine.run(stop).unwrap();
                engine.counters()
            }));
        }
        let wait = |h: &Arc<OnceLock<EngineHandle>>| loop {
            if let Some(h) = h.get() {
                break h.clone();
            }
            std::thread::yield_now();
        };
        let (ha, _) = (wait(&handles[0]), wait(&handles[1]));
        // Only A knows a way to B at first: through its relay.
        let via = Endpoint::Relay {
            relay: RelayId(1),
            peer: b.key.public_key(),
        };
        assert!(ha.set_endpoint(b.key.public_key(), via).unwrap());

        let (listening, listening_rx) = mpsc::channel();
        let data = &data;
        let server = s.spawn(move || {
            b.ns.enter();
            let listener = TcpListener::bind(server_addr).unwrap();
            listening.send(()).unwrap();
            let (mut conn, _) = listener.accept().unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            let mut got = vec![0; data.len()];
            conn.read_exact(&mut got).unwrap();
            assert!(got == *data, "A→B bytes differ");
            conn.write_all(data).unwrap();
        });
        let client = s.spawn(move || {
            a.ns.enter();
            listening_rx.recv_timeout(Duration::from_secs(5)).unwrap();
            let mut conn =
                TcpStream::connect_timeout(&server_addr, Duration::from_secs(10)).unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            conn.write_all(data).unwrap();
            let mut got = vec![0; data.len()];
            conn.read_exact(&mut got).unwrap();
            assert!(got == *data, "B→A bytes differ");
        });
        let results = [client.join(), server.join()];
        stop.store(true, Ordering::Relaxed);
        let counters: Vec<EngineCounters> =
            engines.into_iter().map(|e| e.join().unwrap()).collect();
        for r in results {
            if let Err(panic) = r {
                std::panic::resume_unwind(panic);
            }
        }
        for c in &counters {
            assert!(
                c.node.rx_packets > 1000 && c.node.tx_packets > 1000,
                "{c:?}"
            );
            assert_eq!(c.relay_send_dropped, 0, "{c:?}");
        }
    });
    let events: Vec<(usize, Event)> = events.try_iter().collect();
    for (me, other) in [(0, 1), (1, 0)] {
        let peer = sides[other].key.public_key();
        assert!(
            events.contains(&(me, Event::SessionUp { peer })),
            "{events:?}"
        );
    }
    // B learned where A is from A's first datagram: A's relay, as B's
    // relay reaches it.
    let learned = Event::EndpointChanged {
        peer: a.key.public_key(),
        endpoint: Endpoint::Relay {
            relay: RelayId(2),
            peer: a.key.public_key(),
        },
    };
    assert!(events.contains(&(1, learned)), "{events:?}");
}
