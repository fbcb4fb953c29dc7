//! The TUN device against the real kernel, each test in its own throwaway
//! network namespace (run as root). We play the remote end of TCP
//! connections by hand: the kernel's side is a plain socket, our side reads
//! and writes raw packets through the `Tun`.

// Helpers outside #[test] functions count as non-test code for clippy.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use meshd_dataplane::tun::{configure, Tun, TunBatch, TunError};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use support::*;

const DEV: &str = "mt0";
const MTU: u16 = 1400;

/// Our address (in the TUN) and the fake peer's (routed into it).
fn addresses(v6: bool) -> (IpNet, IpAddr) {
    if v6 {
        (
            "fd00:55::1/64".parse().unwrap(),
            "fd00:55::2".parse().unwrap(),
        )
    } else {
        (
            "10.55.0.1/24".parse().unwrap(),
            "10.55.0.2".parse().unwrap(),
        )
    }
}

fn tun_up(offload: bool, v6: bool) -> (Tun, IpNet, IpAddr) {
    let tun = Tun::create(DEV, MTU, offload).unwrap();
    assert_eq!(tun.offload(), offload);
    tun.set_nonblocking(true).unwrap();
    let (local, peer) = addresses(v6);
    configure(DEV, &[local], &[]).unwrap();
    (tun, local, peer)
}

/// How a test reads the TUN: the batch read, or the one the engine uses for a
/// lone packet after an idle wait (`Tun::recv_one`), which must give the same.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Reads {
    Batch,
    One,
}

impl Reads {
    fn read(self, tun: &mut Tun, batch: &mut TunBatch) -> usize {
        match self {
            Reads::Batch => tun.recv_batch(batch),
            Reads::One => tun.recv_one(batch),
        }
        .unwrap()
    }
}

/// Reads packets until `want` accepts one (which is returned), verifying every
/// packet on the way; ignores what the kernel sends by itself (IPv6 router
/// solicitations, MLD reports).
fn read_until<T>(
    tun: &mut Tun,
    batch: &mut TunBatch,
    reads: Reads,
    mut want: impl FnMut(&[u8]) -> Option<T>,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "timed out reading the TUN");
        batch.clear();
        if reads.read(tun, batch) == 0 {
            readable(&*tun, Duration::from_millis(100));
            continue;
        }
        for p in batch.iter() {
            parse_verified(p).unwrap();
            if let Some(v) = want(p) {
                return v;
            }
        }
    }
}

fn is_tcp(p: &[u8]) -> bool {
    parse_verified(p).is_ok_and(|ip| ip.proto == PROTO_TCP)
}

/// The kernel sends a bulk TCP stream into the TUN. With offload it hands over
/// super-packets, which must arrive split into MTU-sized packets with valid
/// headers and checksums (the kernel leaves lone packets' partial), in
/// sequence, carrying exactly the bytes written.
fn kernel_stream_is_split_correctly(offload: bool, v6: bool, reads: Reads) {
    in_netns(|_| {
        let (mut tun, _, peer_ip) = tun_up(offload, v6);
        let peer = SocketAddr::new(peer_ip, 4000);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::thread::scope(|s| {
            let client = s.spawn(|| {
                let mut c = TcpStream::connect_timeout(&peer, Duration::from_secs(5)).unwrap();
                c.write_all(&data).unwrap();
                c
            });
            let mut batch = TunBatch::new();
            let syn = read_until(&mut tun, &mut batch, reads, |p| {
                let ip = parse_verified(p).ok()?;
                (ip.proto == PROTO_TCP && tcp_header(ip.payload).flags & SYN != 0)
                    .then(|| (ip.src, tcp_header(ip.payload)))
            });
            let local = SocketAddr::new(syn.0, syn.1.src_port);
            let iss = 77_000u32;
            let synack = tcp_packet(
                peer,
                local,
                iss,
                syn.1.seq.wrapping_add(1),
                SYN | ACK,
                65535,
                &syn_options(1360),
                &[],
            );
            batch.clear();
            assert!(batch.push(&synack));
            tun.send_batch(&mut batch).unwrap();

            let mut expected_seq = syn.1.seq.wrapping_add(1);
            let mut received = Vec::new();
            let mut most_per_read = 0;
            let deadline = Instant::now() + Duration::from_secs(20);
            while received.len() < data.len() {
                assert!(
                    Instant::now() < deadline,
                    "stream stalled at {}",
                    received.len()
                );
                batch.clear();
                let n = reads.read(&mut tun, &mut batch);
                if n == 0 {
                    readable(&tun, Duration::from_millis(100));
                    continue;
                }
                let mut tcp_in_read = 0;
                for p in batch.iter() {
                    assert!(p.len() <= usize::from(MTU), "packet of {} > MTU", p.len());
                    let ip = parse_verified(p).unwrap_or_else(|e| panic!("{e}: {p:02x?}"));
                    if ip.proto != PROTO_TCP {
                        continue;
                    }
                    tcp_in_read += 1;
                    let h = tcp_header(ip.payload);
                    let payload = &ip.payload[h.header_len..];
                    // Retransmissions of what we already have are harmless.
                    if h.seq == expected_seq {
                        received.extend_from_slice(payload);
                        expected_seq = expected_seq.wrapping_add(payload.len() as u32);
                    }
                }
                most_per_read = most_per_read.max(tcp_in_read);
                let ack = tcp_packet(peer, local, iss + 1, expected_seq, ACK, 65535, &[], &[]);
                batch.clear();
                assert!(batch.push(&ack));
                tun.send_batch(&mut batch).unwrap();
            }
            assert!(received == data, "stream content differs");
            if offload {
                assert!(
                    most_per_read > 1,
                    "offload on, but no super-packet was split"
                );
            } else {
                assert_eq!(most_per_read, 1);
            }
            drop(client.join().unwrap());
        });
    });
}

#[test]
fn tso_split_ipv4_offload() {
    kernel_stream_is_split_correctly(true, false, Reads::Batch);
}

#[test]
fn tso_split_ipv6_offload() {
    kernel_stream_is_split_correctly(true, true, Reads::Batch);
}

#[test]
fn stream_ipv4_no_offload() {
    kernel_stream_is_split_correctly(false, false, Reads::Batch);
}

#[test]
fn tso_split_ipv4_offload_lone_reads() {
    kernel_stream_is_split_correctly(true, false, Reads::One);
}

#[test]
fn tso_split_ipv6_offload_lone_reads() {
    kernel_stream_is_split_correctly(true, true, Reads::One);
}

#[test]
fn stream_ipv4_no_offload_lone_reads() {
    kernel_stream_is_split_correctly(false, false, Reads::One);
}

/// Opens a connection from the fake peer to a listening socket in the kernel;
/// returns the accepted socket and the sequence numbers to continue with.
fn handshake_into_kernel(
    tun: &mut Tun,
    batch: &mut TunBatch,
    listener: &TcpListener,
    peer: SocketAddr,
) -> (TcpStream, u32, u32) {
    let server = listener.local_addr().unwrap();
    let isn = 5000u32;
    batch.clear();
    assert!(batch.push(&tcp_packet(
        peer,
        server,
        isn,
        0,
        SYN,
        65535,
        &syn_options(1360),
        &[]
    )));
    tun.send_batch(batch).unwrap();
    let server_isn = read_until(tun, batch, Reads::Batch, |p| {
        let ip = parse_verified(p).ok()?;
        let h = (ip.proto == PROTO_TCP).then(|| tcp_header(ip.payload))?;
        (h.flags == SYN | ACK).then_some(h.seq)
    });
    let (seq, ack) = (isn + 1, server_isn.wrapping_add(1));
    batch.clear();
    assert!(batch.push(&tcp_packet(peer, server, seq, ack, ACK, 65535, &[], &[])));
    tun.send_batch(batch).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut accepted = None;
    assert!(wait_for(Duration::from_secs(5), || {
        accepted = listener.accept().ok();
        accepted.is_some()
    }));
    let (stream, _) = accepted.unwrap();
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    (stream, seq, ack)
}

/// Consecutive segments of one flow written as one batch: the kernel socket
/// must read exactly the bytes sent, and with offload the TUN must have seen a
/// single (coalesced) write instead of one per segment.
fn batch_written_into_kernel(offload: bool, v6: bool) {
    in_netns(|_| {
        let (mut tun, local, peer_ip) = tun_up(offload, v6);
        let listener = TcpListener::bind(SocketAddr::new(local.addr(), 5000)).unwrap();
        let peer = SocketAddr::new(peer_ip, 4000);
        let mut batch = TunBatch::new();
        let (mut stream, seq, ack) = handshake_into_kernel(&mut tun, &mut batch, &listener, peer);
        let server = listener.local_addr().unwrap();

        const SEGMENTS: usize = 20;
        const SEGMENT: usize = 1000;
        let data: Vec<u8> = (0..SEGMENTS * SEGMENT).map(|i| (i % 253) as u8).collect();
        batch.clear();
        for (i, chunk) in data.chunks(SEGMENT).enumerate() {
            let flags = if i == SEGMENTS - 1 { ACK | PSH } else { ACK };
            let seg_seq = seq + (i * SEGMENT) as u32;
            assert!(batch.push(&tcp_packet(
                peer,
                server,
                seg_seq,
                ack,
                flags,
                65535,
                &[],
                chunk
            )));
        }
        let before = rx_packets(DEV);
        tun.send_batch(&mut batch).unwrap();
        assert!(batch.is_empty());
        let writes = rx_packets(DEV) - before;

        let mut got = vec![0; data.len()];
        stream.read_exact(&mut got).unwrap();
        assert!(got == data, "stream content differs");
        if offload {
            assert_eq!(writes, 1, "segments were not coalesced");
        } else {
            assert_eq!(writes, SEGMENTS as u64);
        }
    });
}

#[test]
fn gro_coalesce_ipv4_offload() {
    batch_written_into_kernel(true, false);
}

#[test]
fn gro_coalesce_ipv6_offload() {
    batch_written_into_kernel(true, true);
}

#[test]
fn batch_write_ipv4_no_offload() {
    batch_written_into_kernel(false, false);
}

/// Random bytes, and valid TCP flows with random corruption, written as
/// batches: nothing panics, and the device keeps answering pings.
fn garbage_is_survived(offload: bool) {
    in_netns(|_| {
        let (mut tun, local, peer_ip) = tun_up(offload, false);
        let peer = SocketAddr::new(peer_ip, 4000);
        let server = SocketAddr::new(local.addr(), 5000);
        let mut rng = SmallRng::seed_from_u64(4);
        let mut batch = TunBatch::new();
        for round in 0..300 {
            batch.clear();
            for i in 0..rng.random_range(1..40) {
                let mut p = if round % 2 == 0 {
                    let len = rng.random_range(1..3000);
                    let mut p: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                    p[0] = [0x45, 0x60, p[0]][rng.random_range(0..3)];
                    p
                } else {
                    let seq = 1000 + 100 * i as u32;
                    tcp_packet(peer, server, seq, 1, ACK, 1000, &[], &[7; 100])
                };
                for _ in 0..rng.random_range(0..4) {
                    let at = rng.random_range(0..p.len());
                    p[at] = rng.random();
                }
                if rng.random_bool(0.2) {
                    p.truncate(rng.random_range(1..=p.len()));
                }
                assert!(batch.push(&p));
            }
            // Errors are fine (the kernel refuses junk); panics are not.
            let _ = tun.send_batch(&mut batch);
        }
        // The junk provoked answers (resets, ICMP errors) that may fill the
        // device queue; drain it, then ping until a reply comes back.
        let alive = (0..20).any(|_| {
            while {
                batch.clear();
                tun.recv_batch(&mut batch).unwrap() > 0
            } {}
            let ping = echo_request(peer_ip, local.addr(), 99, b"still alive");
            assert!(batch.push(&ping));
            tun.send_batch(&mut batch).unwrap();
            readable(&tun, Duration::from_millis(200));
            batch.clear();
            tun.recv_batch(&mut batch).unwrap();
            batch.iter().any(|p| {
                parse_verified(p).is_ok_and(|ip| {
                    ip.proto == PROTO_ICMP
                        && ip.payload[0] == 0
                        && ip.payload.ends_with(b"still alive")
                })
            })
        });
        assert!(alive, "no echo reply after the garbage");
    });
}

#[test]
fn garbage_offload() {
    garbage_is_survived(true);
}

#[test]
fn garbage_no_offload() {
    garbage_is_survived(false);
}

fn output(args: &[&str]) -> String {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn create_and_configure() {
    in_netns(|_| {
        assert!(matches!(
            Tun::create("x", 100, true),
            Err(TunError::BadMtu(100))
        ));
        assert!(Tun::create("name-longer-than-ifnamsiz", MTU, true).is_err());
        let tun = Tun::create(DEV, MTU, true).unwrap();
        assert_eq!(tun.name(), DEV);
        let addrs: Vec<IpNet> = vec![
            "10.55.0.1/24".parse().unwrap(),
            "fd00:55::1/64".parse().unwrap(),
        ];
        let routes: Vec<IpNet> = vec![
            "10.66.1.2/16".parse().unwrap(),
            "fd00:66::/48".parse().unwrap(),
        ];
        // Twice: configuring is idempotent.
        configure(DEV, &addrs, &routes).unwrap();
        configure(DEV, &addrs, &routes).unwrap();
        let shown = output(&["ip", "-o", "addr", "show", "dev", DEV]);
        assert!(
            shown.contains("10.55.0.1/24") && shown.contains("fd00:55::1/64"),
            "{shown}"
        );
        assert!(output(&["ip", "route"]).contains("10.66.0.0/16 dev mt0"));
        assert!(output(&["ip", "-6", "route"]).contains("fd00:66::/48 dev mt0"));
        assert!(output(&["ip", "-o", "link", "show", DEV]).contains(",UP"));
        assert!(matches!(
            configure("nonexistent0", &addrs, &[]),
            Err(TunError::Command { .. })
        ));
    });
}

#[test]
fn tcp_helpers_are_consistent() {
    // The verifier must reject what it should, or the tests above prove nothing.
    let a: SocketAddr = "10.0.0.1:1".parse().unwrap();
    let b: SocketAddr = "10.0.0.2:2".parse().unwrap();
    let mut p = tcp_packet(a, b, 1, 2, ACK, 100, &[], b"hello");
    assert!(parse_verified(&p).is_ok());
    let last = p.len() - 1;
    p[last] ^= 1;
    assert!(parse_verified(&p).is_err());
    let a6: SocketAddr = "[fd00::1]:1".parse().unwrap();
    let b6: SocketAddr = "[fd00::2]:2".parse().unwrap();
    let mut p = tcp_packet(a6, b6, 1, 2, ACK, 100, &[], b"hello");
    assert!(parse_verified(&p).is_ok());
    p[45] ^= 1;
    assert!(parse_verified(&p).is_err());
    assert!(is_tcp(&tcp_packet(a6, b6, 1, 2, ACK, 100, &[], b"")));
}
