//! The packet demultiplexer of the data-plane core: `Node::handle_datagram`
//! and `Node::handle_tun_packet` fed arbitrary bytes, interleaved with real
//! WireGuard traffic from a second node (so sessions exist to be attacked),
//! replays and truncations of that traffic, timer runs on a fake clock, and
//! peer-set changes.
//!
//! The input is a program: each byte picks an operation, the bytes after it
//! are its arguments. Fails when the core panics, or when node A writes to its
//! TUN a packet whose source its only live peer (B) may not use.
#![no_main]

use std::cell::RefCell;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use meshd_dataplane::engine::{Node, RelayId, Sink};
use meshd_dataplane::keys::{PresharedKey, PrivateKey, PublicKey};
use meshd_dataplane::peers::PeerConfig;
use meshd_dataplane::tun::TunBatch;
use meshd_dataplane::udp::UdpSendBatch;

const A_IP: [u8; 4] = [10, 0, 0, 1];
const B_IP: [u8; 4] = [10, 0, 0, 2];

#[derive(Default)]
struct Collect {
    udp: UdpSendBatch,
    tun: TunBatch,
}

impl Sink for Collect {
    fn udp(&mut self, len: usize) -> &mut UdpSendBatch {
        if !self.udp.has_room(len) {
            self.udp.clear();
        }
        &mut self.udp
    }
    fn tun(&mut self) -> &mut TunBatch {
        if self.tun.is_full() {
            self.tun.clear();
        }
        &mut self.tun
    }
    fn relay(&mut self, _: RelayId, _: &PublicKey, _: &[u8]) {}
    // Not WireGuard: the core hands it out untouched, which is all there is
    // to check here (it must not panic on the way).
    fn other(&mut self, _: SocketAddr, _: &[u8]) {}
}

impl Collect {
    fn take_datagrams(&mut self) -> Vec<Vec<u8>> {
        let v = self.udp.datagrams().map(|(_, d)| d.to_vec()).collect();
        self.udp.clear();
        v
    }
}

/// The input, read front to back; reading past its end gives zeros.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    fn bytes(&mut self, max: usize) -> &[u8] {
        let n = usize::from(self.byte()) * 4 % (max + 1);
        let (taken, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        taken
    }
}

fn ipv4(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 0, 64, 17, 0, 0]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(payload);
    p
}

fn peer(key: PublicKey, allowed: &str, endpoint: Option<SocketAddr>) -> PeerConfig {
    PeerConfig {
        public_key: key,
        preshared_key: None,
        allowed_ips: vec![allowed.parse().expect("a prefix")],
        endpoint,
        persistent_keepalive: None,
    }
}

thread_local! {
    /// A TUN batch holds 128 × 64 KiB buffers: allocated once, not per input.
    static SINKS: RefCell<(Collect, Collect)> = RefCell::new(Default::default());
}

fuzz_target!(|data: &[u8]| {
    SINKS.with_borrow_mut(|(sa, sb)| {
        sa.udp.clear();
        sa.tun.clear();
        sb.udp.clear();
        sb.tun.clear();
        run(data, sa, sb);
    });
});

fn run(data: &[u8], sa: &mut Collect, sb: &mut Collect) {
    let mut input = Input(data);
    let a_addr: SocketAddr = "192.0.2.1:51820".parse().expect("an address");
    let b_addr: SocketAddr = "192.0.2.2:51820".parse().expect("an address");
    let other: SocketAddr = "[2001:db8::9]:4000".parse().expect("an address");
    let (ka, kb) = (
        PrivateKey::from_bytes([1; 32]),
        PrivateKey::from_bytes([2; 32]),
    );
    let kc = PublicKey::from_bytes([3; 32]);
    let base = Instant::now();
    let mut now = base;
    let mut a = Node::new(ka.clone(), now);
    let mut b = Node::new(kb.clone(), now);
    let b_peer = peer(kb.public_key(), "10.0.0.2/32", Some(b_addr));
    let c_peer = peer(kc, "10.0.1.0/24", None);
    a.set_peers(&[b_peer.clone(), c_peer.clone()], now)
        .expect("valid peers");
    b.set_peers(&[peer(ka.public_key(), "10.0.0.1/32", Some(a_addr))], now)
        .expect("valid peers");
    // Datagrams B really sent to A, for replays.
    let mut wire: Vec<Vec<u8>> = Vec::new();
    let mut ops = 0;

    while !input.0.is_empty() && ops < 256 {
        ops += 1;
        match input.byte() % 9 {
            0 => {
                let from = [b_addr, a_addr, other][usize::from(input.byte() % 3)];
                let d = input.bytes(1024).to_vec();
                a.handle_datagram(from, &d, sa, now);
            }
            1 => {
                let p = input.bytes(1024).to_vec();
                a.handle_tun_packet(&p, sa, now);
            }
            2 => {
                let step = match input.byte() % 3 {
                    0 => Duration::from_millis(u64::from(input.byte()) * 10),
                    1 => Duration::from_secs(u64::from(input.byte())),
                    _ => Duration::from_secs(60 * u64::from(input.byte())),
                };
                now += step;
                a.handle_timeout(sa, now);
                b.handle_timeout(sb, now);
            }
            3 => {
                // B sends a real packet; everything it emits reaches A.
                let payload = input.bytes(256).to_vec();
                b.handle_tun_packet(&ipv4(B_IP, A_IP, &payload), sb, now);
                for d in sb.take_datagrams() {
                    a.handle_datagram(b_addr, &d, sa, now);
                    wire.push(d);
                }
            }
            4 => {
                // What A sent reaches B, and B's answers reach A.
                for d in sa.take_datagrams() {
                    b.handle_datagram(a_addr, &d, sb, now);
                }
                for d in sb.take_datagrams() {
                    a.handle_datagram(b_addr, &d, sa, now);
                    wire.push(d);
                }
            }
            5 => {
                // A replay of real traffic, truncated or with one byte changed.
                if wire.is_empty() {
                    continue;
                }
                let mut d = wire[usize::from(input.byte()) % wire.len()].clone();
                match input.byte() % 3 {
                    0 => {}
                    1 => d.truncate(usize::from(input.byte()) * 4),
                    _ => {
                        let i = usize::from(input.byte()) % d.len().max(1);
                        if let Some(x) = d.get_mut(i) {
                            *x ^= input.byte() | 1;
                        }
                    }
                }
                let from = [b_addr, other][usize::from(input.byte() % 2)];
                a.handle_datagram(from, &d, sa, now);
            }
            6 => {
                // A routes an inner packet: to B, to C (no endpoint), nowhere.
                let dst = [B_IP, [10, 0, 1, 7], [8, 8, 8, 8]][usize::from(input.byte() % 3)];
                let payload = input.bytes(1400).to_vec();
                a.handle_tun_packet(&ipv4(A_IP, dst, &payload), sa, now);
            }
            7 => {
                // Peer changes: C comes and goes, B's preshared key changes.
                let mut b_now = b_peer.clone();
                if input.byte() % 4 == 0 {
                    b_now.preshared_key = Some(PresharedKey::from_bytes([input.byte(); 32]));
                }
                let set = if input.byte() % 2 == 0 {
                    vec![b_now]
                } else {
                    vec![b_now, c_peer.clone()]
                };
                a.set_peers(&set, now).expect("valid peers");
            }
            _ => {
                let _ = a.peer_status(now);
                let _ = a.poll_timeout();
            }
        }
        for packet in sa.tun.iter() {
            assert!(
                packet.len() >= 20 && packet[0] >> 4 == 4 && packet[12..16] == B_IP,
                "A wrote a packet to its TUN that B may not send: {packet:?}"
            );
        }
        sa.tun.clear();
        sb.tun.clear();
    }
}
