//! `meshd wg up` against standard WireGuard (Debian's 2022 wireguard-go and the
//! current wireguard-go with its offloads, built by `scripts/install-peers`, both
//! configured with `wg setconf`) and against itself, in two lab namespaces joined
//! by a veth pair, with and without a preshared key: handshake, ping both ways,
//! `meshd wg show`, garbage at meshd's port, `meshd wg down`; with the current
//! wireguard-go also a rekey after two minutes. TCP throughput is in the `timing_`
//! tests, which the test command runs alone.
//!
//! meshd is always the left end; the right end is wireguard-go or meshd.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod interop_support;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use interop_support::{handshake_age, show, transfer, MESHD};
use meshd_netlab::peers::{self, Impl, Side, TunnelOptions, TunnelPair};
use meshd_netlab::tools::Iperf3Test;
use meshd_netlab::Lab;
use rustix::net::{AddressFamily, RecvFlags, SocketType};

const PINGS: u32 = 10;

fn options(preshared_key: bool) -> TunnelOptions {
    TunnelOptions {
        preshared_key,
        ..TunnelOptions::default()
    }
}

fn meshd_and(lab: &Lab, right: Impl, preshared_key: bool) -> TunnelPair<'_> {
    peers::use_meshd_binary(MESHD);
    TunnelPair::up_mixed(
        lab,
        ("left", Impl::Meshd),
        ("right", right),
        &options(preshared_key),
    )
    .unwrap()
}

/// The private key in an end's configuration file, which no output may show.
fn private_key(pair: &TunnelPair<'_>, side: Side) -> String {
    let conf = pair.config_dir().join(format!("{}.conf", pair.iface(side)));
    let text = std::fs::read_to_string(conf).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("PrivateKey = "))
        .unwrap()
        .to_owned()
}

fn pings_cross_both_ways(pair: &TunnelPair<'_>) {
    for from in [Side::Left, Side::Right] {
        let rtts = pair.ping(from, PINGS, Duration::from_millis(20)).unwrap();
        assert!(
            rtts.len() as u32 >= PINGS - 1,
            "{from:?} -> {:?}: {} of {PINGS} pings came back",
            from.other(),
            rtts.len()
        );
    }
}

/// Every meshd end reports a recent handshake and traffic both ways, and
/// never its private key; a wireguard-go end reports its handshake and the
/// preshared key it was given.
fn both_ends_report_the_session(lab: &Lab, pair: &TunnelPair<'_>, preshared_key: bool) {
    for side in [Side::Left, Side::Right] {
        let node = pair.node(side);
        match pair.imp(side) {
            Impl::Meshd => {
                let s = show(lab, node, pair.iface(side));
                assert_eq!(
                    s.interface_field("private key").as_deref(),
                    Some("(hidden)")
                );
                assert!(!s.0.contains(&private_key(pair, side)), "{}", s.0);
                let peers = s.peers();
                assert_eq!(peers.len(), 1, "{}", s.0);
                let peer = peers.values().next().unwrap();
                let age = handshake_age(peer).unwrap_or_else(|| panic!("no handshake:\n{}", s.0));
                assert!(age < 60, "{}", s.0);
                let (rx, tx) = transfer(peer);
                assert!(rx > 0.0 && tx > 0.0, "{}", s.0);
                let other = lab.addr(pair.node(side.other())).unwrap();
                assert_eq!(
                    interop_support::field(peer, "endpoint"),
                    Some(format!("{other}:51820")),
                    "{}",
                    s.0
                );
            }
            Impl::WireguardGo | Impl::WireguardGoCurrent => {
                let at = pair.latest_handshake(side).unwrap();
                assert!(matches!(at, Some(t) if t > 0), "{side:?}: {at:?}");
                let psk = pair.preshared_key(side).unwrap().unwrap();
                if preshared_key {
                    assert_eq!(psk.len(), 44, "{psk:?}");
                } else {
                    assert_eq!(psk, "(none)");
                }
            }
            other => panic!("no checks for {other}"),
        }
    }
}

/// A packet socket in `node` that sees every IP packet of the namespace from
/// now on; the kernel queues them until they are read.
fn capture(lab: &Lab, node: &str) -> OwnedFd {
    lab.in_ns(node, || {
        let fd = rustix::net::socket(
            AddressFamily::PACKET,
            SocketType::DGRAM,
            Some(rustix::net::eth::ALL),
        )
        .unwrap();
        rustix::net::sockopt::set_socket_recv_buffer_size(&fd, 4 << 20).unwrap();
        fd
    })
    .unwrap()
}

/// The UDP payloads sent to `to` among the captured packets (IPv4 only).
fn captured_datagrams_to(fd: &OwnedFd, to: SocketAddrV4) -> Vec<Vec<u8>> {
    let mut buf = vec![0u8; 65536];
    let mut found = Vec::new();
    loop {
        let n = match rustix::net::recv(fd, &mut buf[..], RecvFlags::DONTWAIT) {
            Ok((n, _)) => n,
            Err(rustix::io::Errno::AGAIN) => return found,
            Err(e) => panic!("reading captured packets: {e}"),
        };
        let p = &buf[..n];
        if p.len() < 28 || p[0] >> 4 != 4 || p[9] != 17 {
            continue;
        }
        let ihl = usize::from(p[0] & 0xf) * 4;
        let total = usize::from(u16::from_be_bytes([p[2], p[3]])).min(p.len());
        let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
        if total < ihl + 8 {
            continue;
        }
        let port = u16::from_be_bytes([p[ihl + 2], p[ihl + 3]]);
        if dst == *to.ip() && port == to.port() {
            found.push(p[ihl + 8..total].to_vec());
        }
    }
}

/// xorshift64: reproducible garbage without a dependency.
struct Garbage(u64);

impl Garbage {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn datagram(&mut self) -> Vec<u8> {
        let len = 1 + (self.next() % 200) as usize;
        let mut d: Vec<u8> = (0..len).map(|_| self.next() as u8).collect();
        // Half of them look like WireGuard: a message type and three zero bytes, and
        // some have exactly a handshake message's length.
        if self.next().is_multiple_of(2) {
            d[0] = 1 + (self.next() % 4) as u8;
            if d.len() >= 4 {
                d[1..4].fill(0);
            }
            if self.next().is_multiple_of(4) {
                d.resize([148, 92, 64, 32][usize::from(d[0] - 1)], 0x5a);
            }
        }
        d
    }
}

/// Random datagrams, and truncated and replayed copies of the real session's
/// datagrams, sent at meshd's port from the peer's node: meshd drops and
/// counts every one, its peer's endpoint and session stay as they were, and
/// pings still cross.
fn garbage_is_dropped_and_counted(lab: &Lab, pair: &TunnelPair<'_>, captured: &OwnedFd) {
    let (node, iface) = (pair.node(Side::Left), pair.iface(Side::Left));
    let meshd_at = SocketAddrV4::new(lab.addr(node).unwrap(), 51820);
    let real = captured_datagrams_to(captured, meshd_at);
    assert!(
        real.iter().any(|d| d.first() == Some(&4)),
        "no data message among the {} captured datagrams",
        real.len()
    );
    // meshd handles datagrams in order: once this ping's reply has come back,
    // every datagram captured before it has been handled, so each replay below
    // is a duplicate.
    assert_eq!(
        pair.ping(Side::Left, 1, Duration::from_millis(20))
            .unwrap()
            .len(),
        1
    );

    let mut garbage = Vec::new();
    let mut rng = Garbage(0x9e37_79b9_7f4a_7c15);
    garbage.extend((0..200).map(|_| rng.datagram()));
    for d in &real {
        garbage.push(d.clone());
        let mut cuts = vec![1, 4, 16, 31, 32, d.len() / 2, d.len() - 1];
        cuts.retain(|&c| c > 0 && c < d.len());
        cuts.dedup();
        garbage.extend(cuts.into_iter().map(|c| d[..c].to_vec()));
    }

    let before = show(lab, node, iface);
    let since = Instant::now();
    let peer_key = before.peers().into_keys().next().unwrap();
    let age_before = handshake_age(&before.peer(&peer_key)).unwrap();
    let endpoint = interop_support::field(&before.peer(&peer_key), "endpoint");

    let sender: UdpSocket = lab
        .in_ns(pair.node(Side::Right), || {
            UdpSocket::bind("0.0.0.0:0").unwrap()
        })
        .unwrap();
    for d in &garbage {
        sender.send_to(d, SocketAddr::V4(meshd_at)).unwrap();
    }
    let sent = garbage.len() as u64;
    eprintln!(
        "{sent} garbage datagrams, {} of them replays of the real session's",
        real.len()
    );
    lab.wait_until(
        "meshd to count the garbage datagrams",
        Duration::from_secs(10),
        || show(lab, node, iface).rejected_datagrams() - before.rejected_datagrams() >= sent,
    )
    .unwrap();

    pings_cross_both_ways(pair);
    let after = show(lab, node, iface);
    assert_eq!(
        after.rejected_datagrams() - before.rejected_datagrams(),
        sent,
        "before:\n{}\nafter:\n{}",
        before.0,
        after.0
    );
    let peer = after.peer(&peer_key);
    assert_eq!(
        interop_support::field(&peer, "endpoint"),
        endpoint,
        "a replay moved the endpoint"
    );
    // The handshake the session started with is still the latest one.
    let age_after = handshake_age(&peer).unwrap();
    assert!(
        age_after + 1 >= age_before + since.elapsed().as_secs(),
        "a new handshake after the garbage: {age_before} s before, {age_after} s after"
    );
}

/// `meshd wg down` removes the interface and the control socket.
fn down_removes_the_interface(lab: &Lab, pair: &TunnelPair<'_>, side: Side) {
    let (node, iface) = (pair.node(side), pair.iface(side));
    let out = lab.exec(node, &[MESHD, "wg", "down", iface]).unwrap();
    assert!(out.status.success(), "{out:?}");
    let link = lab
        .exec(node, &["ip", "link", "show", "dev", iface])
        .unwrap();
    assert!(!link.status.success(), "{iface} is still there: {link:?}");
    let socket = format!("/run/meshd/wg/{iface}.sock");
    assert!(!std::path::Path::new(&socket).exists(), "{socket} remains");
}

fn interoperates(right: Impl, preshared_key: bool) {
    let lab = Lab::veth_pair().unwrap();
    let captured = capture(&lab, "left");
    let pair = meshd_and(&lab, right, preshared_key);
    pings_cross_both_ways(&pair);
    both_ends_report_the_session(&lab, &pair, preshared_key);
    garbage_is_dropped_and_counted(&lab, &pair, &captured);
    for side in [Side::Left, Side::Right] {
        if pair.imp(side) == Impl::Meshd {
            down_removes_the_interface(&lab, &pair, side);
        }
    }
}

#[test]
fn meshd_and_wireguard_go_interoperate() {
    interoperates(Impl::WireguardGo, false);
}

#[test]
fn meshd_and_wireguard_go_interoperate_with_a_preshared_key() {
    interoperates(Impl::WireguardGo, true);
}

#[test]
fn meshd_and_current_wireguard_go_interoperate() {
    interoperates(Impl::WireguardGoCurrent, false);
}

#[test]
fn meshd_and_current_wireguard_go_interoperate_with_a_preshared_key() {
    interoperates(Impl::WireguardGoCurrent, true);
}

/// WireGuard's REKEY_AFTER_TIME: a sender starts a new handshake once its
/// session is this old.
const REKEY_AFTER: Duration = Duration::from_secs(120);

/// Pings every 200 ms both ways for a little over two minutes: both ends make a
/// new session (wireguard-go's latest handshake moves on by at least two
/// minutes, meshd's handshake age starts again) and no more than one ping is
/// lost while they do.
#[test]
fn meshd_and_current_wireguard_go_rekey_after_two_minutes() {
    let lab = Lab::veth_pair().unwrap();
    let pair = meshd_and(&lab, Impl::WireguardGoCurrent, false);
    let first = pair.latest_handshake(Side::Right).unwrap().unwrap();
    assert!(first > 0);
    let started = Instant::now();
    let (meshd_node, meshd_iface) = (pair.node(Side::Left), pair.iface(Side::Left));
    let mut sent = 0;
    let mut lost = 0;
    // Rounds of pings from each side in turn until wireguard-go reports a
    // handshake two minutes after the first one; every round is counted.
    lab.wait_until(
        "a new handshake two minutes after the first",
        REKEY_AFTER + Duration::from_secs(60),
        || {
            for from in [Side::Left, Side::Right] {
                let rtts = pair.ping(from, 10, Duration::from_millis(200)).unwrap();
                sent += 10;
                lost += 10 - rtts.len();
            }
            pair.latest_handshake(Side::Right)
                .unwrap()
                .is_some_and(|t| t >= first + REKEY_AFTER.as_secs())
        },
    )
    .unwrap();
    let elapsed = started.elapsed();
    let s = show(&lab, meshd_node, meshd_iface);
    let peer = s.peers().into_values().next().unwrap();
    let age = handshake_age(&peer).unwrap();
    eprintln!(
        "rekeyed after {:.0} s; meshd's handshake is {age} s old; {lost} of {sent} pings lost",
        elapsed.as_secs_f64()
    );
    assert!(
        age + 60 < elapsed.as_secs(),
        "meshd's handshake is {age} s old after {elapsed:?}:\n{}",
        s.0
    );
    assert!(lost <= 1, "{lost} of {sent} pings lost across the rekey");
    pings_cross_both_ways(&pair);
}

#[test]
fn meshd_and_meshd_interoperate() {
    interoperates(Impl::Meshd, false);
}

#[test]
fn meshd_and_meshd_interoperate_with_a_preshared_key() {
    interoperates(Impl::Meshd, true);
}

/// iperf3 TCP for 2 s each way. The floor is far below what the tunnel
/// does here, far above a tunnel that stalls or drops most packets.
fn carries_tcp_both_ways(right: Impl, preshared_key: bool) {
    let lab = Lab::veth_pair().unwrap();
    let pair = meshd_and(&lab, right, preshared_key);
    for reverse in [false, true] {
        let r = pair
            .iperf3(Iperf3Test {
                secs: 2,
                streams: 1,
                reverse,
            })
            .unwrap();
        let (from, to) = if reverse {
            (right.to_string(), "meshd".to_owned())
        } else {
            ("meshd".to_owned(), right.to_string())
        };
        eprintln!(
            "{from} -> {to} (psk: {preshared_key}): {:.0} Mbit/s",
            r.bits_per_second / 1e6
        );
        assert!(
            r.bits_per_second > 100e6,
            "{from} -> {to}: {:.1} Mbit/s",
            r.bits_per_second / 1e6
        );
    }
}

#[test]
fn timing_meshd_and_wireguard_go_carry_tcp_both_ways() {
    carries_tcp_both_ways(Impl::WireguardGo, false);
}

#[test]
fn timing_meshd_and_wireguard_go_carry_tcp_both_ways_with_a_preshared_key() {
    carries_tcp_both_ways(Impl::WireguardGo, true);
}

#[test]
fn timing_meshd_and_current_wireguard_go_carry_tcp_both_ways() {
    carries_tcp_both_ways(Impl::WireguardGoCurrent, false);
}

#[test]
fn timing_meshd_and_meshd_carry_tcp_both_ways() {
    carries_tcp_both_ways(Impl::Meshd, false);
}

#[test]
fn timing_meshd_and_meshd_carry_tcp_both_ways_with_a_preshared_key() {
    carries_tcp_both_ways(Impl::Meshd, true);
}
