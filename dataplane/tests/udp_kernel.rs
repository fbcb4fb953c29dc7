//! The batched UDP socket against the real kernel, in throwaway namespaces
//! (run as root): GSO sends and GRO receives must preserve every datagram
//! boundary, and addresses must come back as they were sent to.

// Helpers outside #[test] functions count as non-test code for clippy.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshd_dataplane::udp::{
    send_batch_via, udp_drop_counters, PeerSockets, UdpRecvBatch, UdpSendBatch, UdpSocket,
    SOCKET_BUFFER,
};
use support::*;

/// A datagram whose content names it, so reordering or merging shows.
fn datagram(index: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| (index * 31 + i) as u8).collect()
}

/// Receives until `count` datagrams arrived (or 5 s passed); returns them with
/// their senders and the number of `recvmmsg` messages they came in.
fn receive(sock: &UdpSocket, count: usize) -> (Vec<(SocketAddr, Vec<u8>)>, usize) {
    let mut batch = UdpRecvBatch::new();
    let mut got = Vec::new();
    let mut messages = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while got.len() < count && Instant::now() < deadline {
        if sock.recv_batch(&mut batch).unwrap() == 0 {
            readable(sock, Duration::from_millis(100));
            continue;
        }
        messages += batch.messages();
        got.extend(batch.iter().map(|(a, d)| (a, d.to_vec())));
    }
    (got, messages)
}

fn round_trip(dest_ip: &str) {
    in_netns(|_| {
        let tx = UdpSocket::bind_any(0).unwrap();
        let rx = UdpSocket::bind_any(0).unwrap();
        let dest = SocketAddr::new(dest_ip.parse().unwrap(), rx.local_addr().port());
        let sizes: Vec<usize> = [
            vec![1000; 10],
            vec![300],
            vec![1200; 5],
            vec![500; 3],
            vec![1],
        ]
        .concat();
        let sent: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &len)| datagram(i, len))
            .collect();
        let mut batch = UdpSendBatch::new();
        for d in &sent {
            assert!(batch.push(dest, d));
        }
        // Runs: 10×1000 + 300 | 5×1200 + 500 | 2×500 + 1.
        assert_eq!(batch.messages(), 3);
        let report = tx.send_batch(&mut batch);
        assert_eq!(report.sent, sent.len());
        assert_eq!(report.dropped, 0);
        if tx.max_gso_segments() > 1 {
            assert_eq!(report.syscalls, 3);
        }
        assert!(batch.is_empty());

        let (got, messages) = receive(&rx, sent.len());
        let from = SocketAddr::new(dest.ip(), tx.local_addr().port());
        assert_eq!(got.len(), sent.len());
        for ((addr, data), want) in got.iter().zip(&sent) {
            assert_eq!(*addr, from);
            assert!(data == want, "datagram of {} bytes differs", want.len());
        }
        if tx.max_gso_segments() > 1 && rx.gro_segments() > 1 {
            assert!(
                messages < sent.len(),
                "GRO never coalesced ({messages} messages)"
            );
        }
    });
}

#[test]
fn gso_gro_round_trip_ipv4() {
    round_trip("127.0.0.1");
}

#[test]
fn gso_gro_round_trip_ipv6() {
    round_trip("::1");
}

#[test]
fn interleaved_destinations_keep_their_datagrams() {
    in_netns(|_| {
        let tx = UdpSocket::bind_any(0).unwrap();
        let a = UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let b = UdpSocket::bind("[::1]:0".parse().unwrap()).unwrap();
        let mut batch = UdpSendBatch::new();
        let mut for_a = Vec::new();
        let mut for_b = Vec::new();
        for i in 0..40 {
            let d = datagram(i, 700 + i % 3);
            if i % 3 == 0 {
                assert!(batch.push(b.local_addr(), &d));
                for_b.push(d);
            } else {
                assert!(batch.push(a.local_addr(), &d));
                for_a.push(d);
            }
        }
        assert_eq!(tx.send_batch(&mut batch).sent, 40);
        for (sock, want) in [(&a, for_a), (&b, for_b)] {
            let (got, _) = receive(sock, want.len());
            let got: Vec<Vec<u8>> = got.into_iter().map(|(_, d)| d).collect();
            assert_eq!(got, want);
        }
    });
}

#[test]
fn wrong_family_and_unreachable_are_dropped_not_fatal() {
    in_netns(|_| {
        let v4 = UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let rx = UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut batch = UdpSendBatch::new();
        assert!(batch.push("[::1]:9".parse().unwrap(), b"no v6 here"));
        // No route to this network in an empty namespace.
        assert!(batch.push("192.0.2.1:9".parse().unwrap(), b"unreachable"));
        assert!(batch.push(rx.local_addr(), b"fine"));
        let report = v4.send_batch(&mut batch);
        assert_eq!((report.sent, report.dropped), (1, 2));
        let (got, _) = receive(&rx, 1);
        assert_eq!(got, vec![(v4.local_addr(), b"fine".to_vec())]);
    });
}

#[test]
fn buffers_are_enlarged() {
    in_netns(|_| {
        let sock = UdpSocket::bind_any(0).unwrap();
        let sizes = sock.buffer_sizes().unwrap();
        // As root the *BUFFORCE options apply; the kernel reports double.
        assert!(sizes.recv >= SOCKET_BUFFER, "{sizes:?}");
        assert!(sizes.send >= SOCKET_BUFFER, "{sizes:?}");
    });
}

#[test]
fn receive_buffer_drops_are_counted() {
    in_netns(|_| {
        let before = udp_drop_counters().unwrap();
        let tx = UdpSocket::bind_any(0).unwrap();
        // A small, never-read receive buffer overflows at once.
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rustix::net::sockopt::set_socket_recv_buffer_size(&rx, 4096).unwrap();
        let dest = rx.local_addr().unwrap();
        let mut batch = UdpSendBatch::new();
        for i in 0..200 {
            assert!(batch.push(dest, &datagram(i, 1000)));
        }
        tx.send_batch(&mut batch);
        let after = udp_drop_counters().unwrap();
        assert!(
            after.rcvbuf_errors > before.rcvbuf_errors,
            "{before:?} {after:?}"
        );
        assert!(after.in_errors >= after.rcvbuf_errors);
    });
}

#[test]
fn peer_sockets_carry_their_endpoint_and_only_theirs() {
    for (ip, other_ip) in [("127.0.0.1", "127.0.0.2"), ("::1", "127.0.0.1")] {
        in_netns(|_| {
            let main = UdpSocket::bind_any(0).unwrap();
            let port = main.local_addr().port();
            let peer = UdpSocket::bind_any(0).unwrap();
            let stranger = UdpSocket::bind(SocketAddr::new(other_ip.parse().unwrap(), 0)).unwrap();
            let endpoint = SocketAddr::new(ip.parse().unwrap(), peer.local_addr().port());
            let mut sockets = PeerSockets::default();
            let changes = sockets.sync(&main, [endpoint], Instant::now());
            assert_eq!((changes.added.len(), changes.removed.len()), (1, 0));
            let connected = sockets.get(endpoint).unwrap();
            assert_eq!(connected.peer(), Some(endpoint));

            // Out: a lone datagram and a GSO run both leave from the shared
            // port, whichever socket carries them.
            let mut batch = UdpSendBatch::new();
            assert!(batch.push(endpoint, b"lone"));
            for i in 0..5 {
                assert!(batch.push(endpoint, &datagram(i, 600)));
            }
            let report = send_batch_via(&mut batch, &main, &sockets);
            assert_eq!((report.sent, report.dropped), (6, 0));
            let (got, _) = receive(&peer, 6);
            assert_eq!(got.len(), 6);
            let our_ip = if ip == "::1" { "::1" } else { "127.0.0.1" };
            let from_us = SocketAddr::new(our_ip.parse().unwrap(), port);
            assert!(got.iter().all(|(from, _)| *from == from_us), "{got:?}");
            assert_eq!(got[0].1, b"lone");

            // In: the endpoint's datagrams reach the peer socket, anyone
            // else's the main one.
            let to_us = SocketAddr::new(ip.parse().unwrap(), port);
            let mut batch = UdpSendBatch::new();
            assert!(batch.push(to_us, b"from the peer"));
            peer.send_batch(&mut batch);
            let to_us_too = SocketAddr::new(other_ip.parse().unwrap(), port);
            assert!(batch.push(to_us_too, b"from a stranger"));
            stranger.send_batch(&mut batch);
            assert_eq!(
                receive(connected, 1).0,
                vec![(endpoint, b"from the peer".to_vec())]
            );
            assert_eq!(
                receive(&main, 1).0,
                vec![(stranger.local_addr(), b"from a stranger".to_vec())]
            );

            // An endpoint nobody has any more loses its socket.
            let changes = sockets.sync(&main, [], Instant::now());
            assert_eq!((changes.added.len(), changes.removed.len()), (0, 1));
            assert!(sockets.is_empty());
        });
    }
}

#[test]
fn a_taken_port_is_refused_despite_reuseport() {
    in_netns(|_| {
        let first = UdpSocket::bind_any(0).unwrap();
        let port = first.local_addr().port();
        assert!(UdpSocket::bind_any(port).is_err());
        drop(first);
        // Until a process that other tests fork at this moment execs, it
        // still holds the closed socket's descriptor: wait for that.
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Err(e) = UdpSocket::bind_any(port) {
            assert!(Instant::now() < deadline, "{e}");
            std::thread::yield_now();
        }
    });
}

#[test]
fn stale_peer_sockets_are_replaced_once_old_enough() {
    in_netns(|_| {
        let main = UdpSocket::bind_any(0).unwrap();
        let peer = UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let endpoint = peer.local_addr();
        let mut sockets = PeerSockets::default();
        let start = Instant::now();
        sockets.sync(&main, [endpoint], start);

        // Young: datagrams sent before it existed still reach the main
        // socket, so a mark alone does not replace it.
        sockets.mark_stale(endpoint);
        let changes = sockets.refresh(&main, start + Duration::from_millis(10));
        assert_eq!((changes.added.len(), changes.removed.len()), (0, 0));

        sockets.mark_stale(endpoint);
        let changes = sockets.refresh(&main, start + Duration::from_secs(2));
        assert_eq!((changes.added.len(), changes.removed.len()), (1, 1));
        drop(changes);
        let fresh = sockets.get(endpoint).unwrap();
        assert_eq!(fresh.peer(), Some(endpoint));

        // The replacement carries the endpoint's traffic both ways.
        let mut batch = UdpSendBatch::new();
        assert!(batch.push(endpoint, b"out"));
        assert_eq!(send_batch_via(&mut batch, &main, &sockets).sent, 1);
        assert_eq!(receive(&peer, 1).0[0].1, b"out");
        let to_us = SocketAddr::new(endpoint.ip(), main.local_addr().port());
        assert!(batch.push(to_us, b"in"));
        peer.send_batch(&mut batch);
        assert_eq!(receive(fresh, 1).0, vec![(endpoint, b"in".to_vec())]);

        // Unmarked sockets stay.
        let changes = sockets.refresh(&main, start + Duration::from_secs(9));
        assert_eq!((changes.added.len(), changes.removed.len()), (0, 0));
    });
}

/// NAT traversal's birthday technique: a mapping punched from an extra
/// socket of another port (reuseport, as the agent opens it) carries the
/// endpoint's datagrams once the peer socket is set to that port, both ways.
#[test]
fn a_peer_socket_on_another_source_port_carries_its_endpoint() {
    in_netns(|_| {
        let main = UdpSocket::bind_any(0).unwrap();
        let peer = UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let endpoint = peer.local_addr();
        let extra = meshd_dataplane::udp::bind_extra_v4().unwrap();
        let port = extra.local_addr().unwrap().port();
        let mut sockets = PeerSockets::default();
        let now = Instant::now();
        sockets.sync(&main, [endpoint], now);
        // Set after its socket exists: that one is closed, the next sync
        // opens it on the new port.
        let changes = sockets.set_source_port(endpoint, Some(port));
        assert_eq!(changes.removed.len(), 1);
        let changes = sockets.sync(&main, [endpoint], now);
        assert_eq!((changes.added.len(), changes.removed.len()), (1, 0));
        let connected = sockets.get(endpoint).unwrap();
        assert_eq!(connected.local_addr().port(), port);

        let mut batch = UdpSendBatch::new();
        assert!(batch.push(endpoint, b"out"));
        assert_eq!(send_batch_via(&mut batch, &main, &sockets).sent, 1);
        let got = receive(&peer, 1).0;
        assert_eq!(
            got,
            vec![(SocketAddr::from(([127, 0, 0, 1], port)), b"out".to_vec())]
        );

        // The endpoint's answer reaches the connected socket, not the extra
        // one that shares its port.
        let to_us = SocketAddr::from(([127, 0, 0, 1], port));
        assert!(batch.push(to_us, b"in"));
        peer.send_batch(&mut batch);
        assert_eq!(receive(connected, 1).0, vec![(endpoint, b"in".to_vec())]);
        assert!(extra.recv_from(&mut [0; 16]).is_err());

        // Back to the main socket's port.
        let changes = sockets.set_source_port(endpoint, None);
        assert_eq!(changes.removed.len(), 1);
        sockets.sync(&main, [endpoint], now);
        assert_eq!(
            sockets.get(endpoint).unwrap().local_addr().port(),
            main.local_addr().port()
        );
    });
}
