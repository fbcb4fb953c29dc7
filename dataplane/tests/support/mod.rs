//! Shared by the kernel-facing tests: throwaway network namespaces, and an IP
//! and TCP packet builder/verifier to play the remote side of a connection.
#![allow(dead_code)]
// each test binary uses a different part
// Test support: a failed set-up step should fail the test loudly.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace that exists for the lifetime of the value; dropping it
/// (also while unwinding from a failed assertion) deletes it.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "mtest-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        sh(&["ip", "netns", "add", &name]);
        let ns = NetNs { name };
        sh(&["ip", "-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// Moves the calling thread (only) into the namespace; threads and
    /// processes it starts afterwards are in it too.
    pub fn enter(&self) {
        let file = std::fs::File::open(format!("/run/netns/{}", self.name)).unwrap();
        rustix::thread::move_into_link_name_space(
            file.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .unwrap();
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs `f` on a thread inside a fresh namespace, deleted afterwards; a panic
/// in `f` fails the caller after the cleanup.
pub fn in_netns<T: Send>(f: impl FnOnce(&NetNs) -> T + Send) -> T {
    let ns = NetNs::new();
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            ns.enter();
            f(&ns)
        })
        .join()
    });
    drop(ns);
    match result {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Polls `cond` until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    cond()
}

/// Waits until `fd` is readable, up to `timeout`.
pub fn readable(fd: impl AsFd, timeout: Duration) -> bool {
    let ts = rustix::event::Timespec::try_from(timeout).unwrap();
    let mut fds = [rustix::event::PollFd::new(
        &fd,
        rustix::event::PollFlags::IN,
    )];
    rustix::event::poll(&mut fds, Some(&ts)).unwrap() > 0
}

/// Packets the kernel received from `dev` (for a TUN: written to it), read
/// from /proc/thread-self/net/dev, which unlike /sys follows the thread's
/// network namespace.
pub fn rx_packets(dev: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap();
    let line = text
        .lines()
        .find_map(|l| {
            l.trim_start()
                .strip_prefix(&format!("{dev}:"))
                .map(str::to_owned)
        })
        .unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

/// The Internet checksum of `data`, continuing from a partial `sum`.
pub fn checksum(data: &[u8], mut sum: u32) -> u16 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo_header_sum(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut bytes = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            bytes.extend_from_slice(&s.octets());
            bytes.extend_from_slice(&d.octets());
            bytes.extend_from_slice(&[0, proto]);
            bytes.extend_from_slice(&(len as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            bytes.extend_from_slice(&s.octets());
            bytes.extend_from_slice(&d.octets());
            bytes.extend_from_slice(&(len as u32).to_be_bytes());
            bytes.extend_from_slice(&[0, 0, 0, proto]);
        }
        _ => panic!("mixed address families"),
    }
    bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum()
}

/// An IP packet taken apart (no IPv6 extension headers: the kernel sends
/// none on these paths).
#[derive(Debug)]
pub struct Ip<'a> {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub payload: &'a [u8],
}

/// Parses an IP packet and checks its lengths and checksums (IPv4 header,
/// TCP/UDP/ICMP over the pseudo-header). Errors describe what is wrong.
pub fn parse_verified(packet: &[u8]) -> Result<Ip<'_>, String> {
    let ip = match packet.first().map(|b| b >> 4) {
        Some(4) => {
            if packet.len() < 20 {
                return Err("short IPv4 header".into());
            }
            let ihl = usize::from(packet[0] & 0xf) * 4;
            let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
            if total != packet.len() || ihl < 20 || ihl > total {
                return Err(format!("IPv4 length {total} vs {}", packet.len()));
            }
            if checksum(&packet[..ihl], 0) != 0 {
                return Err("bad IPv4 header checksum".into());
            }
            Ip {
                src: IpAddr::from(<[u8; 4]>::try_from(&packet[12..16]).unwrap()),
                dst: IpAddr::from(<[u8; 4]>::try_from(&packet[16..20]).unwrap()),
                proto: packet[9],
                payload: &packet[ihl..],
            }
        }
        Some(6) => {
            if packet.len() < 40 {
                return Err("short IPv6 header".into());
            }
            let payload_len = usize::from(u16::from_be_bytes([packet[4], packet[5]]));
            if payload_len + 40 != packet.len() {
                return Err(format!("IPv6 length {payload_len} vs {}", packet.len()));
            }
            Ip {
                src: IpAddr::from(<[u8; 16]>::try_from(&packet[8..24]).unwrap()),
                dst: IpAddr::from(<[u8; 16]>::try_from(&packet[24..40]).unwrap()),
                proto: packet[6],
                payload: &packet[40..],
            }
        }
        v => return Err(format!("IP version {v:?}")),
    };
    let sum = match ip.proto {
        PROTO_TCP | PROTO_UDP | PROTO_ICMPV6 => {
            pseudo_header_sum(ip.src, ip.dst, ip.proto, ip.payload.len())
        }
        _ => 0,
    };
    if checksum(ip.payload, sum) != 0 {
        return Err(format!("bad checksum, protocol {}", ip.proto));
    }
    Ok(ip)
}

#[derive(Debug, Clone, Copy)]
pub struct TcpHeader {
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub header_len: usize,
}

pub fn tcp_header(segment: &[u8]) -> TcpHeader {
    TcpHeader {
        src_port: u16::from_be_bytes([segment[0], segment[1]]),
        dst_port: u16::from_be_bytes([segment[2], segment[3]]),
        seq: u32::from_be_bytes(segment[4..8].try_into().unwrap()),
        ack: u32::from_be_bytes(segment[8..12].try_into().unwrap()),
        flags: segment[13],
        header_len: usize::from(segment[12] >> 4) * 4,
    }
}

/// Builds an IPv4 or IPv6 packet carrying `proto` and `l4` (whose checksum,
/// at `csum_at` when given, is filled in).
pub fn ip_packet(
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    mut l4: Vec<u8>,
    csum_at: Option<usize>,
) -> Vec<u8> {
    if let Some(at) = csum_at {
        let sum = match proto {
            PROTO_ICMP => 0,
            _ => pseudo_header_sum(src, dst, proto, l4.len()),
        };
        let c = checksum(&l4, sum);
        l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }
    let mut p = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = (20 + l4.len()) as u16;
            p.extend_from_slice(&[0x45, 0]);
            p.extend_from_slice(&total.to_be_bytes());
            p.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            let c = checksum(&p, 0);
            p[10..12].copy_from_slice(&c.to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend_from_slice(&[0x60, 0, 0, 0]);
            p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            p.extend_from_slice(&[proto, 64]);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
        }
        _ => panic!("mixed address families"),
    }
    p.extend_from_slice(&l4);
    p
}

/// A TCP segment in an IP packet, with checksums.
#[allow(clippy::too_many_arguments)]
pub fn tcp_packet(
    src: SocketAddr,
    dst: SocketAddr,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0);
    let mut t = Vec::new();
    t.extend_from_slice(&src.port().to_be_bytes());
    t.extend_from_slice(&dst.port().to_be_bytes());
    t.extend_from_slice(&seq.to_be_bytes());
    t.extend_from_slice(&ack.to_be_bytes());
    t.push((((20 + options.len()) / 4) as u8) << 4);
    t.push(flags);
    t.extend_from_slice(&window.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 0]);
    t.extend_from_slice(options);
    t.extend_from_slice(payload);
    ip_packet(src.ip(), dst.ip(), PROTO_TCP, t, Some(16))
}

/// SYN options: MSS and window scale 7 (so a 16-bit window reaches 8 MiB).
pub fn syn_options(mss: u16) -> Vec<u8> {
    let mut o = vec![2, 4];
    o.extend_from_slice(&mss.to_be_bytes());
    o.extend_from_slice(&[1, 3, 3, 7]);
    o
}

/// An ICMP (v4) or ICMPv6 echo request.
pub fn echo_request(src: IpAddr, dst: IpAddr, id: u16, payload: &[u8]) -> Vec<u8> {
    let (proto, kind) = match src {
        IpAddr::V4(_) => (PROTO_ICMP, 8),
        IpAddr::V6(_) => (PROTO_ICMPV6, 128),
    };
    let mut m = vec![kind, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    m.extend_from_slice(payload);
    ip_packet(src, dst, proto, m, Some(2))
}
