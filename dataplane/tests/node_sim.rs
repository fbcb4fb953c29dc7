//! The data-plane core ([`Node`]) with a simulated network and a fake clock:
//! two nodes, datagrams carried between them by the test. Deterministic and
//! unprivileged; the same core runs in the engine over real sockets.

// Helpers outside #[test] functions count as non-test code for clippy.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshd_dataplane::engine::{Endpoint, Event, Node, RelayId, Sink};
use meshd_dataplane::keys::{PresharedKey, PrivateKey, PublicKey};
use meshd_dataplane::peers::PeerConfig;
use meshd_dataplane::tun::TunBatch;
use meshd_dataplane::udp::UdpSendBatch;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

#[derive(Default)]
struct Collect {
    udp: UdpSendBatch,
    tun: TunBatch,
    relayed: Vec<(RelayId, PublicKey, Vec<u8>)>,
    other: Vec<(SocketAddr, Vec<u8>)>,
}

impl Sink for Collect {
    fn udp(&mut self, len: usize) -> &mut UdpSendBatch {
        assert!(self.udp.has_room(len), "test batch overflow");
        &mut self.udp
    }
    fn tun(&mut self) -> &mut TunBatch {
        assert!(!self.tun.is_full(), "test batch overflow");
        &mut self.tun
    }
    fn relay(&mut self, relay: RelayId, peer: &PublicKey, datagram: &[u8]) {
        self.relayed.push((relay, *peer, datagram.to_vec()));
    }
    fn other(&mut self, from: SocketAddr, datagram: &[u8]) {
        self.other.push((from, datagram.to_vec()));
    }
}

impl Collect {
    fn take_datagrams(&mut self) -> Vec<(SocketAddr, Vec<u8>)> {
        let v = self.udp.datagrams().map(|(a, d)| (a, d.to_vec())).collect();
        self.udp.clear();
        v
    }
    fn take_packets(&mut self) -> Vec<Vec<u8>> {
        let v = self.tun.iter().map(<[u8]>::to_vec).collect();
        self.tun.clear();
        v
    }
}

/// A minimal IPv4 packet (the core only reads addresses and the length).
fn ipv4(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 0, 64, 17, 0, 0]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(payload);
    p
}

const A_IP: [u8; 4] = [10, 0, 0, 1];
const B_IP: [u8; 4] = [10, 0, 0, 2];

struct Sim {
    a: Node,
    b: Node,
    kb: PrivateKey,
    sa: Collect,
    sb: Collect,
    /// Where each node's datagrams come from, as the other sees it.
    addr_a: SocketAddr,
    addr_b: SocketAddr,
    now: Instant,
    lost: usize,
}

fn peer(key: &PrivateKey, allowed: &[&str], endpoint: Option<SocketAddr>) -> PeerConfig {
    PeerConfig {
        public_key: key.public_key(),
        preshared_key: None,
        allowed_ips: allowed.iter().map(|s| s.parse().unwrap()).collect(),
        endpoint,
        persistent_keepalive: None,
    }
}

impl Sim {
    /// A knows B's endpoint; B learns A's from the handshake.
    fn new(psk: Option<PresharedKey>) -> Sim {
        let now = Instant::now();
        let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
        let addr_a: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        let addr_b: SocketAddr = "192.0.2.2:51820".parse().unwrap();
        let mut a = Node::new(ka.clone(), now);
        let mut b = Node::new(kb.clone(), now);
        let mut pb = peer(&kb, &["10.0.0.2/32"], Some(addr_b));
        pb.preshared_key = psk.clone();
        let mut pa = peer(&ka, &["10.0.0.1/32"], None);
        pa.preshared_key = psk;
        a.set_peers(&[pb], now).unwrap();
        b.set_peers(&[pa], now).unwrap();
        Sim {
            a,
            b,
            kb,
            sa: Collect::default(),
            sb: Collect::default(),
            addr_a,
            addr_b,
            now,
            lost: 0,
        }
    }

    /// Carries datagrams both ways until none are left; returns how many.
    fn deliver(&mut self) -> usize {
        let mut moved = 0;
        loop {
            let from_a = self.sa.take_datagrams();
            let from_b = self.sb.take_datagrams();
            if from_a.is_empty() && from_b.is_empty() {
                return moved;
            }
            moved += from_a.len() + from_b.len();
            for (dest, d) in from_a {
                if dest == self.addr_b {
                    self.b
                        .handle_datagram(self.addr_a, &d, &mut self.sb, self.now);
                } else {
                    self.lost += 1;
                }
            }
            for (dest, d) in from_b {
                if dest == self.addr_a {
                    self.a
                        .handle_datagram(self.addr_b, &d, &mut self.sa, self.now);
                } else {
                    self.lost += 1;
                }
            }
        }
    }

    fn advance(&mut self, dt: Duration) {
        self.now += dt;
        self.a.handle_timeout(&mut self.sa, self.now);
        self.b.handle_timeout(&mut self.sb, self.now);
        self.deliver();
    }

    fn a_sends(&mut self, payload: &[u8]) -> Vec<u8> {
        let p = ipv4(A_IP, B_IP, payload);
        self.a.handle_tun_packet(&p, &mut self.sa, self.now);
        p
    }

    fn b_sends(&mut self, payload: &[u8]) -> Vec<u8> {
        let p = ipv4(B_IP, A_IP, payload);
        self.b.handle_tun_packet(&p, &mut self.sb, self.now);
        p
    }
}

fn handshake_and_data(psk: Option<PresharedKey>) {
    let mut sim = Sim::new(psk);
    // The first packet starts the handshake and waits in boringtun's queue.
    let p = sim.a_sends(b"hello b");
    assert_eq!(sim.a.counters().tx_packets, 0);
    assert!(sim.deliver() >= 3, "initiation, response, data");
    assert_eq!(sim.sb.take_packets(), vec![p]);
    // B learned A's endpoint from the handshake and can answer.
    let q = sim.b_sends(b"hello a");
    sim.deliver();
    assert_eq!(sim.sa.take_packets(), vec![q]);
    assert_eq!(sim.a.counters().rx_packets, 1);
    assert_eq!(sim.b.counters().rx_packets, 1);
    let status = sim.b.peer_status(sim.now);
    assert_eq!(status[0].endpoint, Some(Endpoint::Udp(sim.addr_a)));
    assert!(status[0].last_handshake.is_some());
    assert_eq!(sim.lost, 0);
}

#[test]
fn handshake_then_data_both_ways() {
    handshake_and_data(None);
}

#[test]
fn handshake_with_preshared_key() {
    handshake_and_data(Some(PresharedKey::generate()));
}

#[test]
fn mismatched_preshared_keys_never_connect() {
    let mut sim = Sim::new(Some(PresharedKey::generate()));
    let mut pa = sim.b.peer_configs()[0].clone();
    pa.preshared_key = Some(PresharedKey::generate());
    sim.b.set_peers(&[pa], sim.now).unwrap();
    sim.a_sends(b"x");
    sim.deliver();
    assert!(sim.sb.take_packets().is_empty());
    // The preshared key enters at the response, which A then rejects.
    assert!(sim.a.counters().bad_datagram > 0);
}

#[test]
fn spoofed_sources_are_dropped() {
    let mut sim = Sim::new(None);
    sim.a_sends(b"connect");
    sim.deliver();
    sim.sb.take_packets();
    // A may only use 10.0.0.1 as a source.
    let forged = ipv4([10, 0, 0, 99], B_IP, b"forged");
    sim.a.handle_tun_packet(&forged, &mut sim.sa, sim.now);
    sim.deliver();
    assert!(sim.sb.take_packets().is_empty());
    assert_eq!(sim.b.counters().spoofed, 1);
}

#[test]
fn unroutable_packets_are_counted() {
    let mut sim = Sim::new(None);
    sim.a
        .handle_tun_packet(&ipv4(A_IP, [10, 9, 9, 9], b""), &mut sim.sa, sim.now);
    assert_eq!(sim.a.counters().no_route, 1);
    sim.a.handle_tun_packet(&[0x45, 0, 0], &mut sim.sa, sim.now);
    sim.a.handle_tun_packet(&[], &mut sim.sa, sim.now);
    assert_eq!(sim.a.counters().bad_inner, 2);
    assert!(sim.sa.take_datagrams().is_empty());
}

#[test]
fn garbage_truncations_and_replays_are_dropped() {
    let mut sim = Sim::new(None);
    sim.a_sends(b"connect");
    sim.deliver();
    sim.sb.take_packets();
    let p = sim.a_sends(b"once only");
    let data = sim.sa.take_datagrams();
    assert_eq!(data.len(), 1);
    let datagram = &data[0].1;
    let from = sim.addr_a;
    sim.b.handle_datagram(from, datagram, &mut sim.sb, sim.now);
    sim.b.handle_datagram(from, datagram, &mut sim.sb, sim.now);
    assert_eq!(sim.sb.take_packets(), vec![p], "a replay was delivered");
    let bad_before = sim.b.counters().bad_datagram;
    assert!(bad_before >= 1);

    let mut rng = SmallRng::seed_from_u64(7);
    for len in 0..datagram.len() {
        sim.b
            .handle_datagram(from, &datagram[..len], &mut sim.sb, sim.now);
    }
    for _ in 0..5000 {
        let len = rng.random_range(0..300);
        let mut d: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        if len >= 4 && rng.random_bool(0.7) {
            // Plausible headers reach deeper into the parsers.
            d[..4].copy_from_slice(&[rng.random_range(1..=4), 0, 0, 0]);
        }
        if len >= 8 && rng.random_bool(0.3) {
            d[4..8].copy_from_slice(&datagram[4..8]);
        }
        sim.b.handle_datagram(from, &d, &mut sim.sb, sim.now);
    }
    assert!(sim.sb.take_packets().is_empty());
    let c = sim.b.counters();
    assert!(c.bad_datagram > bad_before && c.unknown_peer > 0, "{c:?}");
    // The session survived the junk.
    let q = sim.a_sends(b"after the storm");
    sim.deliver();
    assert_eq!(sim.sb.take_packets(), vec![q]);
}

#[test]
fn sessions_rekey_under_a_fake_clock() {
    let mut sim = Sim::new(None);
    let mut sent = 0;
    let mut received = 0;
    let mut waiting = Vec::new();
    // Ten minutes: five rekey intervals (120 s), past the 180 s reject time.
    for second in 0..600 {
        let p = sim.a_sends(format!("a{second}").as_bytes());
        let q = sim.b_sends(format!("b{second}").as_bytes());
        sent += 2;
        sim.deliver();
        let got_b = sim.sb.take_packets();
        let got_a = sim.sa.take_packets();
        received += got_a.len() + got_b.len();
        if second == 0 {
            // B's first packet waits for A's endpoint, and leaves at B's
            // next timer call.
            assert_eq!(got_b, vec![p]);
            assert!(got_a.is_empty());
            waiting.push(q);
        } else {
            assert_eq!(got_b, vec![p], "second {second}");
            waiting.push(q);
            assert_eq!(got_a, std::mem::take(&mut waiting), "second {second}");
        }
        for _ in 0..4 {
            sim.advance(Duration::from_millis(250));
        }
    }
    assert_eq!(received, sent);
    let last = sim.a.peer_status(sim.now)[0].last_handshake.unwrap();
    assert!(last < Duration::from_secs(130), "no rekey: {last:?}");
}

#[test]
fn persistent_keepalive_follows_configuration() {
    let mut sim = Sim::new(None);
    sim.a_sends(b"connect");
    sim.deliver();
    let mut pb = sim.a.peer_configs()[0].clone();
    pb.persistent_keepalive = Some(5);
    sim.a.set_peers(&[pb.clone()], sim.now).unwrap();
    let mut keepalives = 0;
    for _ in 0..(30 * 4) {
        sim.now += Duration::from_millis(250);
        sim.a.handle_timeout(&mut sim.sa, sim.now);
        keepalives += sim
            .sa
            .take_datagrams()
            .iter()
            .filter(|(_, d)| d.len() == 32)
            .count();
    }
    assert!(
        (5..=7).contains(&keepalives),
        "{keepalives} keepalives in 30 s"
    );
    pb.persistent_keepalive = None;
    sim.a.set_peers(&[pb], sim.now).unwrap();
    for _ in 0..(20 * 4) {
        sim.now += Duration::from_millis(250);
        sim.a.handle_timeout(&mut sim.sa, sim.now);
        assert!(sim.sa.take_datagrams().iter().all(|(_, d)| d.len() != 32));
    }
}

#[test]
fn endpoint_follows_a_roaming_peer() {
    let mut sim = Sim::new(None);
    sim.a_sends(b"connect");
    sim.deliver();
    sim.addr_a = "198.51.100.7:40000".parse().unwrap();
    sim.a_sends(b"from elsewhere");
    sim.deliver();
    assert_eq!(
        sim.b.peer_status(sim.now)[0].endpoint,
        Some(Endpoint::Udp(sim.addr_a))
    );
    let q = sim.b_sends(b"reply");
    sim.deliver();
    assert_eq!(sim.sa.take_packets().last(), Some(&q));
    assert_eq!(sim.lost, 0);
}

#[test]
fn peers_change_without_disturbing_others() {
    let mut sim = Sim::new(None);
    sim.a_sends(b"connect");
    sim.deliver();
    sim.sb.take_packets();
    // A adds a second peer and widens B's allowed IPs: B's session stays.
    let third = PrivateKey::generate();
    let mut pb = sim.a.peer_configs()[0].clone();
    pb.allowed_ips.push("10.1.0.0/16".parse().unwrap());
    let pc = peer(
        &third,
        &["10.0.0.3/32"],
        Some("192.0.2.3:1".parse().unwrap()),
    );
    sim.a.set_peers(&[pb.clone(), pc], sim.now).unwrap();
    let p = ipv4(A_IP, [10, 1, 2, 3], b"via the new prefix");
    sim.a.handle_tun_packet(&p, &mut sim.sa, sim.now);
    let out = sim.sa.take_datagrams();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].1[0], 4, "a data packet, not a new handshake");
    // The third peer gets a handshake initiation of its own.
    sim.a
        .handle_tun_packet(&ipv4(A_IP, [10, 0, 0, 3], b""), &mut sim.sa, sim.now);
    let out = sim.sa.take_datagrams();
    assert_eq!(out[0].0, "192.0.2.3:1".parse().unwrap());
    assert_eq!(out[0].1[0], 1);
    // Removing B: its addresses no longer route, and B's datagrams are unknown.
    sim.a.set_peers(&[], sim.now).unwrap();
    assert!(sim.a.prefixes().is_empty());
    sim.a
        .handle_tun_packet(&ipv4(A_IP, B_IP, b""), &mut sim.sa, sim.now);
    assert_eq!(sim.a.counters().no_route, 1);
    sim.b_sends(b"to a removed peer");
    sim.deliver();
    assert!(sim.a.counters().unknown_peer > 0);
    assert!(sim.sa.take_packets().is_empty());
}

#[test]
fn handshake_floods_get_cookie_replies() {
    let mut sim = Sim::new(None);
    sim.a_sends(b"connect");
    let init = sim.sa.take_datagrams().remove(0).1;
    assert_eq!(init[0], 1);
    for _ in 0..40 {
        sim.b
            .handle_datagram(sim.addr_a, &init, &mut sim.sb, sim.now);
    }
    assert!(sim.b.counters().cookies_sent > 0);
    let replies = sim.sb.take_datagrams();
    assert!(replies.iter().any(|(_, d)| d[0] == 3 && d.len() == 64));
}

#[test]
fn ipv6_inner_packets_route() {
    let mut sim = Sim::new(None);
    let mut pb = sim.a.peer_configs()[0].clone();
    pb.allowed_ips.push("fd00::2/128".parse().unwrap());
    sim.a.set_peers(&[pb], sim.now).unwrap();
    let mut pa = sim.b.peer_configs()[0].clone();
    pa.allowed_ips.push("fd00::1/128".parse().unwrap());
    sim.b.set_peers(&[pa], sim.now).unwrap();
    let mut p = vec![0x60, 0, 0, 0, 0, 4, 17, 64];
    p.extend_from_slice(&"fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
    p.extend_from_slice(&"fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets());
    p.extend_from_slice(b"six!");
    sim.a.handle_tun_packet(&p, &mut sim.sa, sim.now);
    sim.deliver();
    assert_eq!(sim.sb.take_packets(), vec![p]);
}

/// Sends one packet each way; both must arrive.
fn exchange(sim: &mut Sim, what: &str) {
    let p = sim.a_sends(format!("a: {what}").as_bytes());
    let q = sim.b_sends(format!("b: {what}").as_bytes());
    sim.deliver();
    assert_eq!(sim.sb.take_packets(), vec![p], "a→b {what}");
    assert_eq!(sim.sa.take_packets(), vec![q], "b→a {what}");
}

/// A connected pair, and A's next key with B's peer entry for it.
fn rotation_setup() -> (Sim, PrivateKey, PeerConfig) {
    let mut sim = Sim::new(None);
    sim.a_sends(b"connect");
    sim.deliver();
    sim.sb.take_packets();
    exchange(&mut sim, "before the rotation");
    let new_a = PrivateKey::generate();
    let mut pa = sim.b.peer_configs()[0].clone();
    pa.public_key = new_a.public_key();
    (sim, new_a, pa)
}

/// A rotates its key and B learns the new one (in either order, as the
/// coordinator's two messages may arrive): no packet is lost at any point,
/// and both end on a session under the new key.
fn rotation_loses_nothing(a_first: bool) {
    let (mut sim, new_a, pa) = rotation_setup();
    let old_handshakes = sim.a.counters();
    for step in 0..2 {
        if (step == 0) == a_first {
            sim.a.set_private_key(new_a.clone(), sim.now);
            assert_eq!(sim.a.public_key(), new_a.public_key());
        } else {
            sim.b.set_peers(std::slice::from_ref(&pa), sim.now).unwrap();
            assert_eq!(sim.b.peer_configs()[0].public_key, new_a.public_key());
        }
        exchange(&mut sim, &format!("right after step {step}"));
        // The timer sends the new handshake at once.
        sim.advance(Duration::from_millis(1));
        exchange(&mut sim, &format!("after step {step}'s handshake"));
    }
    // Past the grace time and a handshake retry: the old sessions are gone
    // and traffic is on the new ones.
    for second in 0..8 {
        for _ in 0..4 {
            sim.advance(Duration::from_millis(250));
        }
        exchange(&mut sim, &format!("{second} s later"));
    }
    assert_eq!(sim.lost, 0);
    let sb = &sim.b.peer_status(sim.now)[0];
    assert_eq!(sb.public_key, new_a.public_key());
    assert!(
        sb.last_handshake.unwrap() < Duration::from_secs(10),
        "{sb:?}"
    );
    assert_eq!(sim.a.counters().spoofed, old_handshakes.spoofed);
    assert_eq!(sim.b.counters().spoofed, 0);
}

#[test]
fn own_key_rotation_then_peer_learns_loses_nothing() {
    rotation_loses_nothing(true);
}

#[test]
fn peer_learns_then_own_key_rotation_loses_nothing() {
    rotation_loses_nothing(false);
}

#[test]
fn old_session_receives_for_a_grace_time_only() {
    let (mut sim, new_a, pa) = rotation_setup();
    // Two datagrams on the old session, held back in the network.
    sim.a_sends(b"late 1");
    sim.a_sends(b"late 2");
    let late = sim.sa.take_datagrams();
    assert_eq!(late.len(), 2);
    sim.a.set_private_key(new_a, sim.now);
    sim.b.set_peers(&[pa], sim.now).unwrap();
    sim.advance(Duration::from_millis(1));
    // The new session is up: A sends on it.
    exchange(&mut sim, "on the new session");
    sim.advance(Duration::from_millis(500));
    sim.b
        .handle_datagram(sim.addr_a, &late[0].1, &mut sim.sb, sim.now);
    assert_eq!(sim.sb.take_packets().len(), 1, "in-flight datagram lost");
    for _ in 0..(5 * 4) {
        sim.advance(Duration::from_millis(250));
    }
    let unknown = sim.b.counters().unknown_peer;
    sim.b
        .handle_datagram(sim.addr_a, &late[1].1, &mut sim.sb, sim.now);
    assert!(sim.sb.take_packets().is_empty());
    assert_eq!(sim.b.counters().unknown_peer, unknown + 1);
    exchange(&mut sim, "after the grace time");
}

#[test]
fn a_new_key_with_other_allowed_ips_is_a_new_peer() {
    let (mut sim, new_a, mut pa) = rotation_setup();
    pa.allowed_ips = vec![
        "10.0.0.1/32".parse().unwrap(),
        "10.7.0.0/16".parse().unwrap(),
    ];
    sim.a.set_private_key(new_a, sim.now);
    sim.b.set_peers(&[pa], sim.now).unwrap();
    // No handover: B dropped the old peer and has no endpoint for the new
    // one, so the packet waits, and nothing leaves.
    sim.b_sends(b"no session, no endpoint");
    assert!(sim.sb.take_datagrams().is_empty());
    assert_eq!(sim.b.peer_status(sim.now)[0].endpoint, None);
}

#[test]
fn a_restarted_node_moves_a_peer_off_the_session_it_lost() {
    let (mut sim, _, _) = rotation_setup();
    // B restarts: same key, no sessions; it knows A's endpoint (from the
    // coordinator, say). A still holds the old session.
    let mut pa = sim.b.peer_configs()[0].clone();
    pa.endpoint = Some(sim.addr_a);
    sim.b = Node::new(sim.kb.clone(), sim.now);
    sim.b.set_peers(&[pa], sim.now).unwrap();
    // A's first packet is for a session B no longer has: lost, but B starts
    // a handshake at once, and A moves to the new session.
    sim.a_sends(b"into the void");
    sim.deliver();
    assert!(sim.sb.take_packets().is_empty());
    assert_eq!(sim.b.counters().unknown_peer, 1);
    exchange(&mut sim, "right after the restart");
    // Junk for unknown sessions from A's address gets no handshake storm.
    let mut junk = vec![4u8, 0, 0, 0];
    junk.extend_from_slice(&[0x5a; 60]);
    for _ in 0..50 {
        sim.b
            .handle_datagram(sim.addr_a, &junk, &mut sim.sb, sim.now);
    }
    assert!(sim.sb.take_datagrams().is_empty());
}

fn events(node: &mut Node) -> Vec<Event> {
    std::iter::from_fn(|| node.poll_event()).collect()
}

#[test]
fn packets_for_a_peer_without_endpoint_wait_for_it() {
    let mut sim = Sim::new(None);
    // B has no endpoint for A until A has been in touch: its packets wait.
    let early: Vec<Vec<u8>> = (0..3u8).map(|i| sim.b_sends(&[b'e', i])).collect();
    assert!(sim.sb.take_datagrams().is_empty());
    assert_eq!(sim.b.counters().no_endpoint, 0);
    // A's first packet brings the handshake, and B learns where A is.
    let p = sim.a_sends(b"hello b");
    sim.deliver();
    assert_eq!(sim.sb.take_packets(), vec![p]);
    let key_a = sim.b.peer_configs()[0].public_key;
    assert_eq!(
        events(&mut sim.b),
        vec![
            Event::SessionUp { peer: key_a },
            Event::EndpointChanged {
                peer: key_a,
                endpoint: Endpoint::Udp(sim.addr_a)
            }
        ]
    );
    // B's next timer call (due at once) sends what waited, in order.
    assert_eq!(sim.b.poll_timeout(), sim.now);
    sim.advance(Duration::ZERO);
    assert_eq!(sim.sa.take_packets(), early);
    // Only the newest few wait; older ones are dropped and counted.
    let mut sim = Sim::new(None);
    for i in 0..40u8 {
        sim.b_sends(&[i]);
    }
    assert_eq!(sim.b.counters().no_endpoint, 8);
    sim.a_sends(b"x");
    sim.deliver();
    sim.advance(Duration::ZERO);
    let got = sim.sa.take_packets();
    assert_eq!(got.len(), 32);
    assert_eq!(got[0], ipv4(B_IP, A_IP, &[8]));
}

#[test]
fn a_session_through_a_relay_and_back_to_udp() {
    let mut sim = Sim::new(None);
    let (key_a, key_b) = (sim.b.peer_configs()[0].public_key, sim.kb.public_key());
    // A reaches B through relay 1; B hears A through its relay 2.
    let via_a = Endpoint::Relay {
        relay: RelayId(1),
        peer: key_b,
    };
    assert!(sim.a.set_endpoint(&key_b, via_a, sim.now));
    assert!(!sim
        .a
        .set_endpoint(&PrivateKey::generate().public_key(), via_a, sim.now));
    let p = sim.a_sends(b"over the relay");
    let carry = |sim: &mut Sim| {
        for _ in 0..8 {
            let from_a = std::mem::take(&mut sim.sa.relayed);
            let from_b = std::mem::take(&mut sim.sb.relayed);
            if from_a.is_empty() && from_b.is_empty() {
                break;
            }
            for (relay, to, d) in from_a {
                assert_eq!((relay, to), (RelayId(1), key_b));
                sim.b
                    .handle_relayed(RelayId(2), key_a, &d, &mut sim.sb, sim.now);
            }
            for (relay, to, d) in from_b {
                assert_eq!((relay, to), (RelayId(2), key_a));
                sim.a
                    .handle_relayed(RelayId(1), key_b, &d, &mut sim.sa, sim.now);
            }
        }
    };
    carry(&mut sim);
    assert!(sim.sa.take_datagrams().is_empty() && sim.sb.take_datagrams().is_empty());
    assert_eq!(sim.sb.take_packets(), vec![p]);
    let q = sim.b_sends(b"and back");
    carry(&mut sim);
    assert_eq!(sim.sa.take_packets(), vec![q]);
    let via_b = Endpoint::Relay {
        relay: RelayId(2),
        peer: key_a,
    };
    assert_eq!(sim.b.peer_status(sim.now)[0].endpoint, Some(via_b));
    assert!(events(&mut sim.b).contains(&Event::EndpointChanged {
        peer: key_a,
        endpoint: via_b
    }));
    assert!(events(&mut sim.a).contains(&Event::SessionUp { peer: key_b }));
    // A relay cannot speak for another peer: B's datagram relayed as from
    // a third key is dropped.
    let r = sim.b_sends(b"impostor");
    let (_, _, d) = sim.sb.relayed.pop().unwrap();
    let unknown = sim.a.counters().unknown_peer;
    let stranger = PrivateKey::generate().public_key();
    sim.a
        .handle_relayed(RelayId(1), stranger, &d, &mut sim.sa, sim.now);
    assert!(sim.sa.take_packets().is_empty(), "{r:?} delivered");
    assert_eq!(sim.a.counters().unknown_peer, unknown + 1);
    // Back to a direct path on the same session: A's owner moves the
    // endpoint, and B follows A's first datagram from there.
    assert!(sim
        .a
        .set_endpoint(&key_b, Endpoint::Udp(sim.addr_b), sim.now));
    let p = sim.a_sends(b"direct again");
    sim.deliver();
    assert_eq!(sim.sb.take_packets(), vec![p]);
    assert!(sim.sa.relayed.is_empty());
    assert_eq!(
        sim.b.peer_status(sim.now)[0].endpoint,
        Some(Endpoint::Udp(sim.addr_a))
    );
    assert_eq!(sim.lost, 0);
}

#[test]
fn with_roaming_off_only_the_owner_moves_a_peer() {
    let mut sim = Sim::new(None);
    sim.b.set_roaming(false);
    // B had no endpoint for A: the first handshake still teaches it one.
    sim.a_sends(b"connect");
    sim.deliver();
    let first = Some(Endpoint::Udp(sim.addr_a));
    assert_eq!(sim.b.peer_status(sim.now)[0].endpoint, first);
    sim.sb.take_packets();
    // A moves; B keeps sending where its owner said, and hears A anyway.
    let old_a = sim.addr_a;
    sim.addr_a = "198.51.100.7:40000".parse().unwrap();
    let p = sim.a_sends(b"from elsewhere");
    sim.deliver();
    assert_eq!(sim.sb.take_packets(), vec![p]);
    assert_eq!(sim.b.peer_status(sim.now)[0].endpoint, first);
    let key_a = sim.b.peer_configs()[0].public_key;
    assert!(!events(&mut sim.b)
        .iter()
        .any(|e| matches!(e, Event::EndpointChanged { endpoint, .. } if *endpoint != Endpoint::Udp(old_a))));
    assert!(sim
        .b
        .set_endpoint(&key_a, Endpoint::Udp(sim.addr_a), sim.now));
    let q = sim.b_sends(b"reply");
    sim.deliver();
    assert_eq!(sim.sa.take_packets(), vec![q]);
}

#[test]
fn datagrams_that_are_not_wireguard_go_to_the_sink_untouched() {
    let mut sim = Sim::new(None);
    let from: SocketAddr = "203.0.113.9:3478".parse().unwrap();
    // A STUN binding response and a discovery packet share the socket.
    let stun = [
        0x01, 0x01, 0, 0, 0x21, 0x12, 0xa4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
    ];
    let disco = [0xff, b'm', b'e', b's', b'h', 1, 2, 3];
    for d in [&stun[..], &disco[..], &[][..], &[4, 0, 0][..]] {
        sim.a.handle_datagram(from, d, &mut sim.sa, sim.now);
    }
    let got: Vec<Vec<u8>> = sim.sa.other.iter().map(|(_, d)| d.clone()).collect();
    assert_eq!(
        got,
        vec![stun.to_vec(), disco.to_vec(), vec![], vec![4, 0, 0]]
    );
    assert_eq!(sim.a.counters().other_datagrams, 4);
    assert_eq!(sim.a.counters().bad_datagram, 0);
    // A WireGuard-shaped datagram that does not verify is still WireGuard's.
    sim.a
        .handle_datagram(from, &[1, 0, 0, 0, 9, 9], &mut sim.sa, sim.now);
    assert_eq!(sim.sa.other.len(), 4);
}
