//! Tunnels of real implementations between lab nodes (needs root, wireguard-go, wireguard-tools,
//! nebula and iperf3, and the current wireguard-go, Tailscale and Headscale; fails, never skips,
//! when one is missing: scripts/install-deps and scripts/install-peers install them).
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use meshd_netlab::peers::tailscale::{PathKind, SeedPrototype};
use meshd_netlab::peers::{Impl, Side, TunnelOptions, TunnelPair};
use meshd_netlab::tools::{self, Iperf3Test};
use meshd_netlab::{Lab, Topology};

const PINGS: u32 = 10;

/// Pings both ways, then a short iperf3 TCP test each way; the receiving tunnel interface
/// must have counted at least the bytes iperf3 received, so the traffic crossed the tunnel.
fn carries_ping_and_tcp_both_ways(pair: &TunnelPair<'_>) {
    for from in [Side::Left, Side::Right] {
        let rtts = pair.ping(from, PINGS, Duration::from_millis(20)).unwrap();
        assert!(
            rtts.len() as u32 >= PINGS - 1,
            "{from:?} -> {:?}: {} of {PINGS} pings came back through {}",
            from.other(),
            rtts.len(),
            pair.imp(from)
        );
    }
    for reverse in [false, true] {
        let receiver = if reverse { Side::Left } else { Side::Right };
        let (rx_before, _) = pair.iface_bytes(receiver).unwrap();
        let r = pair
            .iperf3(Iperf3Test {
                secs: 1,
                streams: 1,
                reverse,
            })
            .unwrap();
        let (rx_after, _) = pair.iface_bytes(receiver).unwrap();
        eprintln!(
            "{} -> {}: {:.0} Mbit/s",
            pair.imp(receiver.other()),
            pair.imp(receiver),
            r.bits_per_second / 1e6
        );
        // Far below what any of these tunnels does even on a loaded machine, far above nothing.
        assert!(
            r.bits_per_second > 10e6,
            "TCP through the tunnel (reverse: {reverse}): {:.1} Mbit/s",
            r.bits_per_second / 1e6
        );
        assert!(
            rx_after - rx_before >= r.bytes,
            "{receiver:?}'s tunnel interface received {} bytes, iperf3 {}: TCP went around the tunnel",
            rx_after - rx_before,
            r.bytes
        );
    }
}

fn both_ends_handshook(pair: &TunnelPair<'_>) {
    for side in [Side::Left, Side::Right] {
        let at = pair.latest_handshake(side).unwrap();
        assert!(matches!(at, Some(t) if t > 0), "{side:?}: {at:?}");
    }
}

#[test]
fn wireguard_go_pair_carries_ping_and_tcp_both_ways() {
    let lab = Lab::veth_pair().unwrap();
    let pair = TunnelPair::up(
        &lab,
        "left",
        "right",
        Impl::WireguardGo,
        &TunnelOptions::default(),
    )
    .unwrap();
    both_ends_handshook(&pair);
    for side in [Side::Left, Side::Right] {
        assert_eq!(pair.preshared_key(side).unwrap().as_deref(), Some("(none)"));
    }
    carries_ping_and_tcp_both_ways(&pair);
}

#[test]
fn wireguard_go_pair_with_a_preshared_key_carries_ping_and_tcp_both_ways() {
    let lab = Lab::veth_pair().unwrap();
    let opts = TunnelOptions {
        preshared_key: true,
        ..TunnelOptions::default()
    };
    let pair = TunnelPair::up(&lab, "left", "right", Impl::WireguardGo, &opts).unwrap();
    both_ends_handshook(&pair);
    let left = pair.preshared_key(Side::Left).unwrap().unwrap();
    assert_eq!(left.len(), 44, "a base64 key, not {left:?}");
    assert_eq!(pair.preshared_key(Side::Right).unwrap(), Some(left));
    carries_ping_and_tcp_both_ways(&pair);
}

/// The current wireguard-go, with its TUN and UDP offloads.
#[test]
fn current_wireguard_go_pair_carries_ping_and_tcp_both_ways() {
    let lab = Lab::veth_pair().unwrap();
    let pair = TunnelPair::up(
        &lab,
        "left",
        "right",
        Impl::WireguardGoCurrent,
        &TunnelOptions::default(),
    )
    .unwrap();
    both_ends_handshook(&pair);
    let version = Impl::WireguardGoCurrent.version().unwrap();
    assert_ne!(version, Impl::WireguardGo.version().unwrap());
    carries_ping_and_tcp_both_ways(&pair);
}

/// tailscaled with a real TUN at each end, joined to Headscale in the left node; the pair is
/// up only once each end reports a direct path to the other.
#[test]
fn tailscale_pair_carries_ping_and_tcp_both_ways() {
    let lab = Lab::veth_pair().unwrap();
    let pair = TunnelPair::up(
        &lab,
        "left",
        "right",
        Impl::Tailscale,
        &TunnelOptions::default(),
    )
    .unwrap();
    for side in [Side::Left, Side::Right] {
        let path = pair.tailscale_path(side).unwrap().unwrap();
        let want = format!("{}:41641", lab.addr(pair.node(side.other())).unwrap());
        assert_eq!(path, PathKind::Direct(want), "{side:?}");
        assert_eq!(pair.latest_handshake(side).unwrap(), None);
    }
    carries_ping_and_tcp_both_ways(&pair);
}

/// The seed prototype (Headscale, derper, tailscaled) on the federation lab in one call: nodes
/// ping each other over their 100.64 addresses; the public node and the node behind an
/// endpoint-independent NAT end up direct, the node whose site blocks UDP goes through DERP.
#[test]
fn seed_prototype_joins_the_federation_lab() {
    let topo = Topology::from_file(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/federation.toml"
    )))
    .unwrap();
    let lab = Lab::up(&topo).unwrap();
    let nodes = ["cloud1", "edge1", "cgn1", "corp1"];
    let seed = SeedPrototype::up(&lab, "coord", "relay", &nodes).unwrap();
    let addr: Vec<_> = nodes.iter().map(|n| seed.addr(n).unwrap()).collect();
    for a in &addr {
        assert!(
            a.octets()[0] == 100 && (64..128).contains(&a.octets()[1]),
            "{a}"
        );
    }
    for (from, to) in [(0, 1), (1, 0), (1, 2), (2, 1), (0, 3), (3, 0)] {
        let rtts =
            tools::ping_addr(&lab, nodes[from], addr[to], 5, Duration::from_millis(200)).unwrap();
        assert!(
            rtts.len() >= 4,
            "{} -> {} ({}): {} of 5 pings came back",
            nodes[from],
            nodes[to],
            addr[to],
            rtts.len()
        );
    }
    // `tailscale ping` stops at the first direct pong; the daemon then reports that path.
    lab.wait_until(
        "a direct path from edge1 to cloud1",
        Duration::from_secs(30),
        || {
            seed.tailscale(
                "edge1",
                &["ping", "--c", "5", "--timeout", "1s", &addr[0].to_string()],
                Duration::from_secs(10),
            )
            .is_ok_and(|o| o.status.success())
        },
    )
    .unwrap();
    let direct = seed.path("edge1", "cloud1").unwrap();
    let cloud1 = lab.addr("cloud1").unwrap();
    assert_eq!(direct, PathKind::Direct(format!("{cloud1}:41641")));
    assert_eq!(
        seed.path("corp1", "cloud1").unwrap(),
        PathKind::Derp("lab".into())
    );
    for (from, to) in [
        ("edge1", "cloud1"),
        ("edge1", "cgn1"),
        ("cgn1", "edge1"),
        ("corp1", "cloud1"),
    ] {
        eprintln!("{from} -> {to}: {}", seed.path(from, to).unwrap());
    }
}

/// Over a routed underlay (host → core → host) rather than one veth.
#[test]
fn nebula_pair_carries_ping_and_tcp_both_ways() {
    let lab = Lab::up(&Topology::new().host("a").host("b")).unwrap();
    let pair = TunnelPair::up(&lab, "a", "b", Impl::Nebula, &TunnelOptions::default()).unwrap();
    assert_eq!(pair.latest_handshake(Side::Left).unwrap(), None);
    carries_ping_and_tcp_both_ways(&pair);
}

/// The checks above see the tunnel, not some other path: once one end forgets its peer,
/// pings to the tunnel address stop.
#[test]
fn pings_stop_when_one_end_forgets_its_peer() {
    let lab = Lab::veth_pair().unwrap();
    let pair = TunnelPair::up(
        &lab,
        "left",
        "right",
        Impl::WireguardGo,
        &TunnelOptions::default(),
    )
    .unwrap();
    let iface = pair.iface(Side::Right).to_owned();
    let peers = lab
        .exec("right", &["wg", "show", &iface, "peers"])
        .unwrap()
        .ok()
        .unwrap();
    let peer = peers.trim();
    assert_eq!(peer.len(), 44, "{peers:?}");
    lab.exec("right", &["wg", "set", &iface, "peer", peer, "remove"])
        .unwrap()
        .ok()
        .unwrap();
    let rtts = pair
        .ping(Side::Left, 3, Duration::from_millis(200))
        .unwrap();
    assert!(rtts.is_empty(), "pings came back without a peer: {rtts:?}");
}

#[test]
fn wireguard_and_nebula_do_not_pair() {
    let lab = Lab::veth_pair().unwrap();
    let err = TunnelPair::up_mixed(
        &lab,
        ("left", Impl::WireguardGo),
        ("right", Impl::Nebula),
        &TunnelOptions::default(),
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("same protocol"), "{err}");
}
