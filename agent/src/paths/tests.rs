//! Path selection on the simulated network (`sim.rs`): which NAT pairings
//! end direct, and how the managers survive failures.

use std::time::Duration;

use super::sim::{Filtering, Mapping, Nat, Net, Ports, Sim};
use super::*;

const SECS: fn(u64) -> Duration = Duration::from_secs;
const MS: fn(u64) -> Duration = Duration::from_millis;

fn full_cone() -> Nat {
    Nat {
        mapping: Mapping::EndpointIndependent,
        filtering: Filtering::EndpointIndependent,
        ports: Ports::Preserving,
        timeout: SECS(30),
    }
}

fn address_restricted() -> Nat {
    Nat {
        mapping: Mapping::AddressDependent,
        filtering: Filtering::AddressDependent,
        ports: Ports::Random,
        timeout: SECS(30),
    }
}

/// Endpoint-independent mapping, address-dependent filtering.
fn address_restricted_cone() -> Nat {
    Nat {
        filtering: Filtering::AddressDependent,
        ..full_cone()
    }
}

/// Masquerade that picks a new random port for each new mapping, so a
/// mapping that expired does not come back by chance.
fn masquerade_random() -> Net {
    Net::Nat(Nat {
        ports: Ports::Random,
        ..Nat::masquerade()
    })
}

/// Two nodes with 20 ms RTT between them, introduced with `lag`, busy.
fn pair(seed: u64, a: Net, b: Net, lag: Duration) -> Sim {
    let mut sim = Sim::new(seed);
    sim.add_node(a, 5);
    sim.add_node(b, 5);
    sim.connect(0, 1, lag);
    sim
}

fn kind(p: Path) -> &'static str {
    match p {
        Path::None => "none",
        Path::Relay(_) => "relay",
        Path::Direct(_) => "direct",
    }
}

#[test]
fn each_nat_pairing_ends_on_the_expected_path() {
    use Net::*;
    let masq = Nat(sim::Nat::masquerade());
    let sym = Nat(sim::Nat::symmetric());
    let cases = [
        (Open, Open, "direct"),
        (Open, masq, "direct"),
        (masq, Open, "direct"),
        (Open, sym, "direct"),
        (sym, Open, "direct"),
        (masq, masq, "direct"),
        (Nat(full_cone()), sym, "direct"),
        (Nat(address_restricted()), Open, "direct"),
        (Nat(address_restricted()), Nat(full_cone()), "direct"),
        (Nat(address_restricted_cone()), masq, "direct"),
        // The birthday technique: one side maps per destination, the other
        // filters per address and port (direct in most seeds, these among
        // them; `birthday_*` below measure the rate).
        (Nat(address_restricted()), masq, "direct"),
        (masq, sym, "direct"),
        (sym, masq, "direct"),
        // Two hard sides: neither can aim at the other.
        (sym, sym, "relay"),
        (UdpBlocked, Open, "relay"),
        (masq, UdpBlocked, "relay"),
        (UdpBlocked, UdpBlocked, "relay"),
    ];
    for (i, (a, b, want)) in cases.into_iter().enumerate() {
        let mut sim = Sim::new(i as u64);
        sim.add_node(a, 5);
        sim.add_node(b, 5);
        sim.introduce(0, 1);
        // The first packet never waits: the relay is the endpoint at once.
        assert_eq!(kind(sim.path(0, 1)), "relay", "{a:?} → {b:?} at the start");
        sim.busy(0, 1, true);
        sim.run_for(MS(30));
        sim.introduce(1, 0);
        sim.busy(1, 0, true);
        sim.run_for(SECS(65));
        let got = (kind(sim.path(0, 1)), kind(sim.path(1, 0)));
        assert_eq!(got, (want, want), "{a:?} ↔ {b:?}");
    }
}

/// The times from the first packet to a direct path and from cutting it to
/// the relay, over 20 seeds with 20 ms RTT between two masquerade NATs, the
/// peer hearing of us 0–100 ms after we of it, and `loss` on each link.
fn measure(loss: f64) -> (Vec<Duration>, Vec<Duration>) {
    let masq = Net::Nat(Nat::masquerade());
    let mut to_direct = Vec::new();
    let mut to_relay = Vec::new();
    for seed in 0..20 {
        let lag = MS(seed * 7 % 100);
        let mut sim = Sim::new(seed);
        sim.add_node(masq, 5);
        sim.add_node(masq, 5);
        sim.set_loss(0, loss);
        sim.set_loss(1, loss);
        let t0 = sim.now;
        sim.connect(0, 1, lag);
        assert!(sim.run_until(SECS(20), |s| s.is_direct(0, 1) && s.is_direct(1, 0)));
        to_direct.push(sim.upgraded_after(0, 1, t0).expect("upgraded"));
        // Cut at a random moment between two heartbeats.
        sim.run_for(SECS(5) + MS(seed * 53 % 1000));
        let cut = sim.now;
        sim.cut(0, 1, true);
        assert!(sim.run_until(SECS(5), |s| !s.is_direct(0, 1)));
        let fell = sim.fell_back_after(0, 1, cut).expect("fell back");
        assert!(fell <= SECS(3), "seed {seed}: fell back after {fell:?}");
        to_relay.push(fell);
    }
    to_direct.sort();
    to_relay.sort();
    (to_direct, to_relay)
}

/// The measurements in docs/disco-protocol.md (`--nocapture` shows them).
#[test]
fn time_to_direct_and_to_fall_back() {
    // The 50th and 90th percentiles and the maximum of 20 sorted samples.
    let pct = |v: &[Duration]| (v[10], v[18], v[19]);
    for loss in [0.0, 0.1] {
        let (to_direct, to_relay) = measure(loss);
        let (d50, d90, dmax) = pct(&to_direct);
        let (f50, f90, fmax) = pct(&to_relay);
        println!("loss {loss}: first packet → direct p50 {d50:?} p90 {d90:?} max {dmax:?}");
        println!("loss {loss}: direct path cut → relay p50 {f50:?} p90 {f90:?} max {fmax:?}");
        if loss == 0.0 {
            assert!(d90 < MS(500), "direct after {d90:?} at p90");
        }
    }
}

#[test]
fn keepalives_hold_idle_mappings_open() {
    let masq = masquerade_random();
    let mut sim = pair(1, masq, masq, MS(40));
    assert!(sim.run_until(SECS(5), |s| s.is_direct(0, 1) && s.is_direct(1, 0)));
    sim.busy(0, 1, false);
    sim.busy(1, 0, false);
    // Idle for far longer than the NATs' 30 s.
    sim.run_for(SECS(300));
    assert!(sim.is_direct(0, 1) && sim.is_direct(1, 0));
    for n in 0..2 {
        assert!(
            !sim.nodes[n]
                .events
                .iter()
                .any(|(_, e)| matches!(e, PathEvent::FellBack { .. })),
            "node {n} fell back while idle"
        );
    }
    // Idle means few packets: no heartbeats, keepalives only.
    let sent = sim.nodes[0].udp_sent;
    sim.run_for(SECS(120));
    // One keepalive each way every 12 s, and the answers.
    let sent = sim.nodes[0].udp_sent - sent;
    assert!(sent <= 22, "{sent} packets in 2 min");
}

#[test]
fn without_keepalives_the_simulated_mapping_expires() {
    // The NAT model must bite, or the test above proves nothing.
    let masq = masquerade_random();
    let mut sim = Sim::new(2);
    sim.set_config(PathConfig {
        keepalive: SECS(100),
        ..PathConfig::default()
    });
    sim.add_node(masq, 5);
    sim.add_node(masq, 5);
    sim.connect(0, 1, MS(40));
    assert!(sim.run_until(SECS(5), |s| s.is_direct(0, 1)));
    sim.busy(0, 1, false);
    sim.busy(1, 0, false);
    // In use for `idle_after` (45 s), then a keepalive after 100 s.
    sim.run_for(SECS(150));
    assert!(sim.fell_back_after(0, 1, sim.start).is_some());
}

#[test]
fn a_dead_relay_does_not_disturb_a_direct_path() {
    let mut sim = pair(3, Net::Nat(Nat::masquerade()), Net::Open, MS(10));
    assert!(sim.run_until(SECS(5), |s| s.is_direct(0, 1) && s.is_direct(1, 0)));
    sim.kill_relay();
    sim.run_for(SECS(120));
    assert!(sim.is_direct(0, 1) && sim.is_direct(1, 0));
}

#[test]
fn no_relay_is_needed_when_both_sides_probe() {
    let masq = Net::Nat(Nat::masquerade());
    let mut sim = Sim::new(13);
    sim.add_node(masq, 5);
    sim.add_node(masq, 5);
    sim.kill_relay();
    sim.connect(0, 1, MS(50));
    assert!(sim.run_until(SECS(1), |s| s.is_direct(0, 1) && s.is_direct(1, 0)));
}

#[test]
fn a_direct_path_cut_falls_back_within_3s_and_comes_back() {
    let masq = Net::Nat(Nat::masquerade());
    let mut sim = pair(4, masq, masq, MS(20));
    assert!(sim.run_until(SECS(5), |s| s.is_direct(0, 1) && s.is_direct(1, 0)));
    sim.run_for(SECS(10));
    sim.cut(0, 1, true);
    let cut = sim.now;
    assert!(sim.run_until(SECS(3), |s| !s.is_direct(0, 1) && !s.is_direct(1, 0)));
    assert_eq!(kind(sim.path(0, 1)), "relay");
    sim.run_for(SECS(20));
    assert_eq!(kind(sim.path(0, 1)), "relay");
    sim.cut(0, 1, false);
    let healed = sim.now;
    assert!(sim.run_until(SECS(31), |s| s.is_direct(0, 1) && s.is_direct(1, 0)));
    println!(
        "fell back after {:?}, direct again {:?} after the cut healed",
        sim.fell_back_after(0, 1, cut).expect("fell back"),
        sim.now - healed
    );
}

#[test]
fn a_restarted_peer_on_a_new_port_is_direct_again() {
    let masq = Net::Nat(Nat::masquerade());
    let mut sim = pair(5, masq, masq, MS(20));
    assert!(sim.run_until(SECS(5), |s| s.is_direct(0, 1) && s.is_direct(1, 0)));
    sim.run_for(SECS(10));
    sim.restart(1, &[0]);
    sim.busy(1, 0, true);
    assert!(sim.run_until(SECS(5), |s| {
        matches!(s.path(0, 1), Path::Direct(a) if a.port() == 51821) && s.is_direct(1, 0)
    }));
}

#[test]
fn nat_rebinding_is_followed() {
    // Towards an open peer: its pings and pongs from the new mapping are
    // enough.
    let masq = Net::Nat(Nat::masquerade());
    let mut sim = pair(6, masq, Net::Open, MS(20));
    assert!(sim.run_until(SECS(5), |s| s.is_direct(0, 1) && s.is_direct(1, 0)));
    let Path::Direct(before) = sim.path(1, 0) else {
        unreachable!()
    };
    sim.run_for(SECS(10));
    sim.rebind(0);
    let rebound = sim.now;
    assert!(sim.run_until(
        SECS(3),
        |s| matches!(s.path(1, 0), Path::Direct(a) if a != before)
    ));
    assert!(sim.is_direct(0, 1));
    println!(
        "open side follows the rebinding after {:?}",
        sim.now - rebound
    );

    // Between two filtering NATs the driver finds its new address (STUN)
    // and tells the peer; until then the relay carries the data.
    let mut sim = pair(7, masq, masq, MS(20));
    assert!(sim.run_until(SECS(5), |s| s.is_direct(0, 1) && s.is_direct(1, 0)));
    sim.run_for(SECS(10));
    sim.rebind(0);
    sim.run_for(SECS(1));
    sim.refresh_candidates(0);
    sim.introduce(1, 0);
    assert!(sim.run_until(SECS(5), |s| {
        s.is_direct(0, 1) && matches!(s.path(1, 0), Path::Direct(a) if a.port() != 51820)
    }));
}

#[test]
fn ten_percent_loss_goes_direct_and_does_not_flap() {
    let masq = Net::Nat(Nat::masquerade());
    let mut sim = Sim::new(8);
    sim.add_node(masq, 5);
    sim.add_node(masq, 5);
    sim.set_loss(0, 0.1);
    sim.set_loss(1, 0.1);
    sim.connect(0, 1, MS(20));
    assert!(sim.run_until(SECS(10), |s| s.is_direct(0, 1) && s.is_direct(1, 0)));
    sim.run_for(SECS(600));
    assert!(sim.is_direct(0, 1) && sim.is_direct(1, 0));
    for n in 0..2 {
        let changes = sim.nodes[n]
            .events
            .iter()
            .filter(|(_, e)| !matches!(e, PathEvent::PingReply { .. }))
            .count();
        assert_eq!(changes, 1, "node {n}: {:?}", sim.nodes[n].events);
    }
}

#[test]
fn an_operators_ping_says_which_way_it_went() {
    let mut sim = pair(
        9,
        Net::Nat(Nat::symmetric()),
        Net::Nat(Nat::symmetric()),
        MS(20),
    );
    let id = sim.ping(0, 1);
    sim.run_for(SECS(1));
    assert!(sim.nodes[0].events.iter().any(|(_, e)| matches!(e,
        PathEvent::PingReply { id: i, via: Path::Relay(_), .. } if *i == id)));

    let mut sim = pair(9, Net::Open, Net::Open, MS(20));
    assert!(sim.run_until(SECS(5), |s| s.is_direct(0, 1)));
    let id = sim.ping(0, 1);
    sim.run_for(SECS(1));
    let reply = sim.nodes[0].events.iter().find_map(|(_, e)| match e {
        PathEvent::PingReply {
            id: i, via, rtt, ..
        } if *i == id => Some((*via, *rtt)),
        _ => None,
    });
    assert!(
        matches!(reply, Some((Path::Direct(_), rtt)) if rtt == MS(20)),
        "{reply:?}"
    );
    // Nothing answers once the path is cut: a timeout, not silence.
    sim.cut(0, 1, true);
    let id = sim.ping(0, 1);
    sim.run_for(SECS(6));
    assert!(sim.nodes[0].events.iter().any(|(_, e)| matches!(e,
        PathEvent::PingTimedOut { id: i, .. } if *i == id)));
}

#[test]
fn foreign_and_malformed_packets_are_errors() {
    let mut sim = pair(10, Net::Open, Net::Open, MS(0));
    let now = sim.now;
    let src = "192.0.2.1:1".parse().expect("an address");
    let (a, b) = (sim.nodes[0].key, sim.nodes[1].key);
    let pm = &mut sim.nodes[0].pm;
    assert!(matches!(
        pm.handle_udp(src, b"\x01\0\0\0", now),
        Err(PathError::Disco(_))
    ));
    let stranger = DiscoKeys::new(&StaticSecret::from([99; 32]), a)
        .expect("a key")
        .seal(
            &disco::Message::Ping {
                txid: disco::TxId([0; 12]),
            },
            [0; 24],
        )
        .expect("seals");
    assert!(matches!(
        pm.handle_udp(src, &stranger, now),
        Err(PathError::UnknownPeer(_))
    ));
    assert!(matches!(
        pm.handle_relayed(RelayId(0), b, &stranger, now),
        Err(PathError::RelayMismatch { .. })
    ));
    let mut forged = stranger.clone();
    forged[6..38].copy_from_slice(&b.0);
    assert!(matches!(
        pm.handle_udp(src, &forged, now),
        Err(PathError::Disco(_))
    ));
}

/// One manager whose peer is played by hand: each of its pings to an
/// address is answered after that address's RTT, or never.
struct Scripted {
    pm: PathManager,
    peer: DiscoKeys,
    key: NodeKey,
    now: Instant,
    /// Pongs on their way: (arrival, source, packet).
    pongs: Vec<(Instant, SocketAddr, Vec<u8>)>,
    actions: Vec<Action>,
}

impl Scripted {
    fn new(candidates: &[SocketAddr]) -> Scripted {
        let own = StaticSecret::from([1; 32]);
        let peer_secret = StaticSecret::from([2; 32]);
        let key = NodeKey(x25519_dalek::PublicKey::from(&peer_secret).to_bytes());
        let peer = DiscoKeys::new(
            &peer_secret,
            NodeKey(x25519_dalek::PublicKey::from(&own).to_bytes()),
        )
        .expect("a key");
        let now = Instant::now();
        let mut pm = PathManager::new(PathConfig::default(), own, [7; 32]);
        pm.upsert_peer(key, candidates, Some(RelayId(0)), now)
            .expect("a key");
        Scripted {
            pm,
            peer,
            key,
            now,
            pongs: Vec::new(),
            actions: Vec::new(),
        }
    }

    /// Runs for `d`, answering pings as `rtt` says and keeping the peer busy.
    fn run(&mut self, d: Duration, rtt: impl Fn(SocketAddr) -> Option<Duration>) {
        let end = self.now + d;
        let mut next_activity = self.now;
        loop {
            while let Some(t) = self.pm.poll_transmit() {
                let Endpoint::Udp(to) = t.to else { continue };
                let Ok(disco::Message::Ping { txid }) = self.peer.open(&t.packet) else {
                    continue;
                };
                if let Some(r) = rtt(to) {
                    let observed = "203.0.113.1:1".parse().expect("an address");
                    let pong = self
                        .peer
                        .seal(&disco::Message::Pong { txid, observed }, [0; 24]);
                    self.pongs.push((self.now + r, to, pong.expect("seals")));
                }
            }
            self.actions
                .extend(std::iter::from_fn(|| self.pm.poll_action()));
            let next_pong = self.pongs.iter().map(|p| p.0).min();
            let next = [next_pong, self.pm.poll_timeout(), Some(next_activity)]
                .into_iter()
                .flatten()
                .min()
                .expect("activity is always due");
            if next > end {
                self.now = end;
                return;
            }
            self.now = self.now.max(next);
            if next_activity <= self.now {
                self.pm.note_activity(&self.key, self.now);
                next_activity = self.now + SECS(1);
            }
            let now = self.now;
            let (due, later) = self.pongs.drain(..).partition(|p| p.0 <= now);
            self.pongs = later;
            for (_, from, packet) in due {
                self.pm
                    .handle_udp(from, &packet, now)
                    .expect("our pong opens");
            }
            if self.pm.poll_timeout().is_some_and(|t| t <= now) {
                self.pm.handle_timeout(now);
            }
        }
    }

    fn path(&self) -> Path {
        self.pm.status(&self.key).expect("the peer").path
    }
}

#[test]
fn a_faster_direct_path_wins_only_after_several_samples() {
    let slow: SocketAddr = "198.51.100.1:1000".parse().expect("an address");
    let fast: SocketAddr = "198.51.100.2:2000".parse().expect("an address");
    let mut s = Scripted::new(&[slow, fast]);
    // Only the slow path answers at first.
    s.run(SECS(5), |a| (a == slow).then_some(MS(50)));
    assert_eq!(s.path(), Path::Direct(slow));
    // The fast one, a little faster only (within the margin): no switch,
    // even after the re-probe of every candidate.
    s.run(SECS(120), |a| Some(if a == slow { MS(50) } else { MS(45) }));
    assert_eq!(s.path(), Path::Direct(slow));
    // Clearly faster: after the next re-probe and a few heartbeats.
    let before = s.now;
    s.run(SECS(61), |a| Some(if a == slow { MS(50) } else { MS(20) }));
    assert_eq!(s.path(), Path::Direct(fast));
    let switched = s.pm.status(&s.key).expect("the peer").since - before;
    assert!(switched < SECS(64), "{switched:?}");
    // Never a gap: relay, slow, fast — each endpoint set once.
    let endpoints: Vec<Endpoint> = s
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::SetEndpoint { endpoint, .. } => Some(*endpoint),
            _ => None,
        })
        .collect();
    let relay = Endpoint::Relay {
        relay: RelayId(0),
        peer: s.key,
    };
    assert_eq!(endpoints, [relay, Endpoint::Udp(slow), Endpoint::Udp(fast)]);
}

#[test]
fn one_fast_sample_does_not_switch() {
    let slow: SocketAddr = "198.51.100.1:1000".parse().expect("an address");
    let fast: SocketAddr = "198.51.100.2:2000".parse().expect("an address");
    let mut s = Scripted::new(&[slow, fast]);
    s.run(SECS(5), |a| (a == slow).then_some(MS(50)));
    // A lucky sample at the re-probe, then the fast path is slow again.
    s.run(SECS(56), |a| Some(if a == slow { MS(50) } else { MS(10) }));
    s.run(SECS(60), |a| Some(if a == slow { MS(50) } else { MS(80) }));
    assert_eq!(s.path(), Path::Direct(slow));
}

#[test]
fn a_rotated_key_keeps_the_paths_and_speaks_with_the_new_key() {
    let mut sim = pair(11, Net::Open, Net::Open, MS(10));
    assert!(sim.run_until(SECS(5), |s| s.is_direct(0, 1) && s.is_direct(1, 0)));
    let new = StaticSecret::from([42; 32]);
    let new_key = NodeKey(x25519_dalek::PublicKey::from(&new).to_bytes());
    sim.nodes[0].pm.rotate_key(new.clone()).expect("valid keys");
    // Before the peer hears of it, node 0's packets do not open there.
    let (a, b) = (sim.nodes[0].key, sim.nodes[1].key);
    let ping = DiscoKeys::new(&new, b)
        .expect("a key")
        .seal(
            &disco::Message::Ping {
                txid: disco::TxId([1; 12]),
            },
            [1; 24],
        )
        .expect("seals");
    let now = sim.now;
    let src = "198.19.1.1:51820".parse().expect("an address");
    assert!(matches!(
        sim.nodes[1].pm.handle_udp(src, &ping, now),
        Err(PathError::UnknownPeer(k)) if k == new_key
    ));
    // The coordinator tells the peer: the new key is a peer like any other.
    let candidates = sim.nodes[0].pm.own_candidates().to_vec();
    sim.nodes[1].pm.remove_peer(&a);
    sim.nodes[1]
        .pm
        .upsert_peer(new_key, &candidates, Some(RelayId(0)), now)
        .expect("a key");
    assert!(sim.nodes[1].pm.handle_udp(src, &ping, now).is_ok());
    assert!(sim.is_direct(0, 1));
}

#[test]
fn three_nodes_each_pair_on_its_own_path() {
    let mut sim = Sim::new(12);
    let open = sim.add_node(Net::Open, 5);
    let masq = sim.add_node(Net::Nat(Nat::masquerade()), 5);
    let sym = sim.add_node(Net::Nat(Nat::symmetric()), 5);
    for (i, j) in [(open, masq), (open, sym), (masq, sym)] {
        sim.connect(i, j, MS(10));
    }
    sim.run_for(SECS(65));
    assert!(sim.is_direct(open, masq) && sim.is_direct(masq, open));
    assert!(sim.is_direct(open, sym) && sim.is_direct(sym, open));
    // The open peer is reached from the main socket; the masquerade one
    // through the birthday technique's winning socket, the only one left.
    let key = |i: usize| sim.nodes[i].key;
    assert_eq!(sim.nodes[sym].sources[&key(open)], SocketId::MAIN);
    assert!(sim.is_direct(masq, sym) && sim.is_direct(sym, masq));
    assert_ne!(sim.nodes[sym].sources[&key(masq)], SocketId::MAIN);
    assert_eq!(sim.sockets_open(sym), 1);
    assert_eq!(sim.sockets_open(masq), 0);
}

/// Inputs in any order and shape: garbage, well-sealed messages with
/// arbitrary contents, peers changing, time passing.
#[derive(Debug, Clone)]
enum Op {
    Garbage(Vec<u8>, bool),
    Sealed {
        kind: u8,
        n: u8,
        port: u16,
        relayed: bool,
    },
    Wait(u16),
    Upsert(u8, bool),
    Activity,
    Ping,
    Own(u8),
    RelayLatency(u8, u16),
    Remove,
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        (
            proptest::collection::vec(any::<u8>(), 0..120),
            any::<bool>()
        )
            .prop_map(|(b, r)| Op::Garbage(b, r)),
        (any::<u8>(), any::<u8>(), any::<u16>(), any::<bool>()).prop_map(
            |(kind, n, port, relayed)| Op::Sealed {
                kind,
                n,
                port,
                relayed
            }
        ),
        any::<u16>().prop_map(Op::Wait),
        any::<u16>().prop_map(Op::Wait),
        (any::<u8>(), any::<bool>()).prop_map(|(n, r)| Op::Upsert(n, r)),
        Just(Op::Activity),
        Just(Op::Ping),
        any::<u8>().prop_map(Op::Own),
        (any::<u8>(), any::<u16>()).prop_map(|(r, l)| Op::RelayLatency(r, l)),
        Just(Op::Remove),
    ]
}

fn addrs(n: u8, port: u16) -> Vec<SocketAddr> {
    (0..n % 40)
        .map(|i| SocketAddr::from(([198, 51, 100, i], port.wrapping_add(u16::from(i)))))
        .collect()
}

proptest::proptest! {
    #[test]
    fn any_inputs_keep_the_manager_bounded_and_progressing(ops in proptest::collection::vec(op(), 1..150)) {
        let config = PathConfig::default();
        let peer_secret = StaticSecret::from([2; 32]);
        let own = StaticSecret::from([1; 32]);
        let own_key = NodeKey(x25519_dalek::PublicKey::from(&own).to_bytes());
        let key = NodeKey(x25519_dalek::PublicKey::from(&peer_secret).to_bytes());
        let peer = DiscoKeys::new(&peer_secret, own_key).expect("a key");
        let mut now = Instant::now();
        let mut pm = PathManager::new(config.clone(), own, [0; 32]);
        pm.upsert_peer(key, &addrs(3, 1000), Some(RelayId(0)), now).expect("a key");
        // Txids of our pings, so pongs sometimes answer one.
        let mut txids = vec![disco::TxId([0; 12])];
        let mut open = std::collections::BTreeSet::new();
        let src = |n: u8, port: u16| SocketAddr::from(([198, 51, 100, n % 50], port));
        for (i, op) in ops.into_iter().enumerate() {
            match op {
                Op::Garbage(bytes, relayed) => {
                    let r = if relayed {
                        pm.handle_relayed(RelayId(0), key, &bytes, now)
                    } else {
                        pm.handle_udp(src(1, 1), &bytes, now)
                    };
                    proptest::prop_assert!(r.is_err());
                }
                Op::Sealed { kind, n, port, relayed } => {
                    let msg = match kind % 4 {
                        0 => disco::Message::Ping { txid: disco::TxId([n; 12]) },
                        1 => disco::Message::Pong {
                            txid: txids[usize::from(n) % txids.len()],
                            observed: src(n, port),
                        },
                        2 => disco::Message::CallMeMaybe {
                            candidates: addrs(n % 17, port),
                        },
                        _ => disco::Message::Birthday {
                            step: [
                                disco::BirthdayStep::Offer,
                                disco::BirthdayStep::Accept,
                                disco::BirthdayStep::Go,
                            ][usize::from(n % 3)],
                            addr: src(n, port),
                        },
                    };
                    let packet = peer.seal(&msg, [n; 24]).expect("seals");
                    // Sometimes on an extra socket, open or not.
                    let socket = SocketId(u32::from(kind / 4 % 8));
                    let r = if relayed {
                        pm.handle_relayed(RelayId(0), key, &packet, now)
                    } else {
                        pm.handle_udp_on(socket, src(n, port), &packet, now)
                    };
                    // Fine unless the peer was removed.
                    let known = pm.status(&key).is_some();
                    proptest::prop_assert_eq!(r.is_ok(), known);
                }
                Op::Wait(ms) => {
                    now += Duration::from_millis(u64::from(ms) % 5000);
                    if pm.poll_timeout().is_some_and(|t| t <= now) {
                        pm.handle_timeout(now);
                    }
                }
                Op::Upsert(n, relay) => {
                    let relay = relay.then_some(RelayId(u16::from(n % 3)));
                    pm.upsert_peer(key, &addrs(n, 2000), relay, now).expect("a key");
                }
                Op::Activity => pm.note_activity(&key, now),
                Op::Ping => {
                    let _ = pm.ping(&key, now);
                }
                Op::Own(n) => {
                    pm.set_own_candidates(addrs(n, 3000), now);
                    pm.set_public(addrs(n, 3000).first().copied(), n % 2 == 0);
                }
                Op::RelayLatency(r, l) => pm.handle_relay_latency(
                    RelayId(u16::from(r % 4)),
                    (l % 7 != 0).then(|| Duration::from_millis(u64::from(l))),
                ),
                Op::Remove => {
                    if i % 5 == 0 {
                        pm.remove_peer(&key);
                    }
                }
            }
            // Sockets first: a packet may leave from one opened just now.
            while let Some(a) = pm.poll_action() {
                match a {
                    Action::OpenSocket(id) => {
                        proptest::prop_assert!(id != SocketId::MAIN && open.insert(id));
                    }
                    Action::CloseSocket(id) => proptest::prop_assert!(open.remove(&id)),
                    _ => {}
                }
            }
            proptest::prop_assert!(open.len() <= config.birthday.sockets as usize);
            proptest::prop_assert_eq!(open.len(), pm.sockets_open() as usize);
            if pm.status(&key).is_none() {
                proptest::prop_assert!(open.is_empty(), "a removed peer's sockets are closed");
            }
            while let Some(t) = pm.poll_transmit() {
                proptest::prop_assert!(t.packet.len() <= disco::MAX_PACKET_LEN);
                proptest::prop_assert!(t.from == SocketId::MAIN || open.contains(&t.from));
                if let Ok(disco::Message::Ping { txid }) = peer.open(&t.packet) {
                    txids.push(txid);
                }
            }
            while pm.poll_event().is_some() {}
            if let Some(s) = pm.status(&key) {
                proptest::prop_assert!(s.candidates.len() <= config.max_candidates);
            }
            // A timeout handled is a timeout gone: no busy loop.
            if pm.poll_timeout().is_some_and(|t| t <= now) {
                pm.handle_timeout(now);
                while pm.poll_transmit().is_some() {}
                while let Some(a) = pm.poll_action() {
                    match a {
                        Action::OpenSocket(id) => { open.insert(id); }
                        Action::CloseSocket(id) => { open.remove(&id); }
                        _ => {}
                    }
                }
                proptest::prop_assert!(pm.poll_timeout().is_none_or(|t| t > now));
            }
        }
    }
}

/// Between masquerade (EIM, APDF) and symmetric (random port per
/// destination, APDF) over `seeds` seeds, 20 ms RTT, the hard side first or
/// second: how many end direct within 30 s, and after how long.
fn birthday_runs(config: &PathConfig, seeds: u64) -> (u64, Vec<Duration>) {
    let masq = Net::Nat(Nat::masquerade());
    let sym = Net::Nat(Nat::symmetric());
    let mut direct = 0;
    let mut times = Vec::new();
    for seed in 0..seeds {
        let mut sim = Sim::new(1000 + seed);
        sim.set_config(config.clone());
        let (easy, hard) = if seed % 2 == 0 {
            (sim.add_node(masq, 5), sim.add_node(sym, 5))
        } else {
            let h = sim.add_node(sym, 5);
            (sim.add_node(masq, 5), h)
        };
        let t0 = sim.now;
        sim.connect(easy, hard, MS(seed * 7 % 100));
        sim.run_for(SECS(30));
        let b = &config.birthday;
        // The bounds hold whatever happened.
        assert!(
            sim.nodes[hard].max_sockets <= b.sockets as usize,
            "seed {seed}"
        );
        assert_eq!(
            sim.nodes[easy].max_sockets, 0,
            "the easy side opens nothing"
        );
        assert!(
            sim.nodes[easy].udp_sent <= b.probes as usize + 100,
            "seed {seed}: {} packets from the easy side",
            sim.nodes[easy].udp_sent
        );
        let (he, eh) = (kind(sim.path(hard, easy)), kind(sim.path(easy, hard)));
        if he == "direct" {
            assert_eq!(eh, "direct", "seed {seed}: both sides or neither");
            direct += 1;
            times.push(
                sim.upgraded_after(hard, easy, t0)
                    .expect("an upgrade event"),
            );
            // Only the winning socket stays, and WireGuard sends from it.
            assert_eq!(sim.sockets_open(hard), 1, "seed {seed}");
            assert_ne!(
                sim.nodes[hard].sources[&sim.nodes[easy].key],
                SocketId::MAIN
            );
        } else {
            assert_eq!((he, eh), ("relay", "relay"), "seed {seed}");
            assert_eq!(sim.sockets_open(hard), 0, "seed {seed}: sockets closed");
        }
    }
    times.sort();
    (direct, times)
}

#[test]
fn birthday_reaches_a_symmetric_nat_from_masquerade_in_most_seeds() {
    let config = PathConfig::default();
    let seeds = 50;
    let (direct, times) = birthday_runs(&config, seeds);
    let pct = |p: usize| times[(times.len() - 1) * p / 100];
    eprintln!(
        "birthday, {} sockets, {} probes at {}/s: direct in {direct}/{seeds} seeds \
         (expected about {:.1} %); first packet → direct p50 {:?}, p90 {:?}, max {:?}",
        config.birthday.sockets,
        config.birthday.probes,
        config.birthday.probe_rate,
        100.0
            * (1.0
                - (-(f64::from(config.birthday.sockets) * f64::from(config.birthday.probes))
                    / 64512.0)
                    .exp()),
        pct(50),
        pct(90),
        pct(100),
    );
    assert!(
        direct >= seeds * 9 / 10,
        "direct in only {direct}/{seeds} seeds"
    );
    // The second probe (2 s) offers; the probes take about 4 s at most.
    assert!(pct(100) < SECS(10), "{:?}", pct(100));
}

#[test]
fn birthday_path_holds_and_falls_back_to_the_relay_when_cut() {
    let mut sim = pair(
        3,
        Net::Nat(Nat::masquerade()),
        Net::Nat(Nat::symmetric()),
        MS(20),
    );
    sim.run_for(SECS(15));
    assert!(sim.is_direct(0, 1) && sim.is_direct(1, 0));
    // Heartbeats leave from the winning socket and keep its mapping.
    sim.run_for(SECS(120));
    assert!(sim.is_direct(0, 1) && sim.is_direct(1, 0));
    assert_eq!(sim.sockets_open(1), 1);
    let t = sim.now;
    sim.cut(0, 1, true);
    assert!(sim.run_until(SECS(3), |s| s.fell_back_after(1, 0, t).is_some()));
    // The lost path's socket is closed at once.
    assert_eq!(kind(sim.path(1, 0)), "relay");
    assert_eq!(sim.sockets_open(1), 0);
    assert!(sim.run_until(SECS(3), |s| s.fell_back_after(0, 1, t).is_some()));
    // A new attempt comes once the peer has been relayed for `after` again.
    sim.cut(0, 1, false);
    sim.run_for(SECS(70));
    assert!(sim.is_direct(0, 1) && sim.is_direct(1, 0));
}

#[test]
fn birthday_with_a_tiny_budget_stays_on_the_relay_within_its_bounds() {
    let mut config = PathConfig::default();
    config.birthday.sockets = 4;
    config.birthday.probes = 16;
    let easy_before = 100;
    let mut sim = Sim::new(7);
    sim.set_config(config.clone());
    let easy = sim.add_node(Net::Nat(Nat::masquerade()), 5);
    let hard = sim.add_node(Net::Nat(Nat::symmetric()), 5);
    sim.connect(easy, hard, MS(20));
    // Two attempts (at 2 s and 62 s), each of 4 sockets and 16 probes: a
    // hit has a chance of about 0.1 % each, and does not come in this seed.
    sim.run_for(SECS(90));
    assert_eq!(
        (kind(sim.path(easy, hard)), kind(sim.path(hard, easy))),
        ("relay", "relay")
    );
    assert_eq!(sim.nodes[hard].max_sockets, 4);
    assert_eq!(
        sim.sockets_open(hard),
        0,
        "every socket closed after the attempt"
    );
    assert!(sim.nodes[easy].udp_sent <= 2 * 16 + easy_before);
    // The relay was the endpoint all along: no SetEndpoint went elsewhere.
    for n in [easy, hard] {
        assert!(sim.nodes[n]
            .events
            .iter()
            .all(|(_, e)| !matches!(e, PathEvent::Upgraded { .. })));
    }
}

#[test]
fn birthday_needs_one_easy_side_and_can_be_turned_off() {
    let sym = Net::Nat(Nat::symmetric());
    let mut sim = pair(5, sym, sym, MS(20));
    sim.run_for(SECS(30));
    assert_eq!(
        (kind(sim.path(0, 1)), kind(sim.path(1, 0))),
        ("relay", "relay")
    );
    // Both offered, neither accepted: no socket was opened.
    assert_eq!(sim.nodes[0].max_sockets + sim.nodes[1].max_sockets, 0);

    let mut config = PathConfig::default();
    config.birthday.enabled = false;
    let mut sim = Sim::new(5);
    sim.set_config(config);
    sim.add_node(Net::Nat(Nat::masquerade()), 5);
    sim.add_node(sym, 5);
    sim.connect(0, 1, MS(20));
    sim.run_for(SECS(30));
    assert_eq!(
        (kind(sim.path(0, 1)), kind(sim.path(1, 0))),
        ("relay", "relay")
    );
    assert_eq!(sim.nodes[1].max_sockets, 0);
}

#[test]
fn an_easy_node_takes_two_hard_peers_one_attempt_at_a_time() {
    let mut sim = Sim::new(21);
    let easy = sim.add_node(Net::Nat(Nat::masquerade()), 5);
    let hard1 = sim.add_node(Net::Nat(Nat::symmetric()), 5);
    let hard2 = sim.add_node(Net::Nat(Nat::symmetric()), 5);
    sim.connect(easy, hard1, MS(10));
    sim.connect(easy, hard2, MS(10));
    sim.connect(hard1, hard2, MS(10));
    // One is probed first; the other's offer, refused meanwhile, comes
    // back with its next probe.
    let direct = |sim: &Sim| {
        [hard1, hard2]
            .iter()
            .filter(|&&h| sim.is_direct(easy, h))
            .count()
    };
    assert!(sim.run_until(SECS(30), |s| direct(s) == 2));
    // Never two attempts at once: the easy side sent at most one budget of
    // probes per peer.
    assert!(
        sim.nodes[easy].udp_sent <= 2 * 1024 + 200,
        "{}",
        sim.nodes[easy].udp_sent
    );
    assert!(sim.is_direct(hard1, easy) && sim.is_direct(hard2, easy));
    assert_eq!(kind(sim.path(hard1, hard2)), "relay");
    assert_eq!((sim.sockets_open(hard1), sim.sockets_open(hard2)), (1, 1));
}
