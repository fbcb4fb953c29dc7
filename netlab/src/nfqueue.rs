//! A minimal NFQUEUE client over a raw netlink socket: bind queues, receive packet ids,
//! give verdicts. Only metadata is copied to userspace; the packets wait in the kernel.
//!
//! Message layout (all NFQA attribute integers are big-endian): `nlmsghdr` (16 bytes),
//! `nfgenmsg` (family, version, queue number as be16), then netlink attributes.
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::net::{self, netlink, AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

const NFNL_SUBSYS_QUEUE: u16 = 3;
const MSG_PACKET: u16 = NFNL_SUBSYS_QUEUE << 8;
const MSG_VERDICT: u16 = (NFNL_SUBSYS_QUEUE << 8) | 1;
const MSG_CONFIG: u16 = (NFNL_SUBSYS_QUEUE << 8) | 2;
const MSG_VERDICT_BATCH: u16 = (NFNL_SUBSYS_QUEUE << 8) | 3;

const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_HDRLEN: usize = 16;
const NFGEN_HDRLEN: usize = 4;

const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQA_CFG_MASK: u16 = 4;
const NFQA_CFG_FLAGS: u16 = 5;
const CMD_BIND: u8 = 1;
const COPY_META: u8 = 1;
/// Take GSO super-packets as they are instead of having the kernel segment them.
const F_GSO: u32 = 1 << 2;

pub const NF_DROP: u32 = 0;
pub const NF_ACCEPT: u32 = 1;

/// One packet waiting for a verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queued {
    pub queue: u16,
    pub id: u32,
}

pub struct NfQueue {
    fd: OwnedFd,
    seq: u32,
    rx: Vec<u8>,
}

impl AsFd for NfQueue {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl NfQueue {
    /// Opens a non-blocking NETLINK_NETFILTER socket in the calling thread's namespace.
    pub fn open() -> io::Result<Self> {
        let fd = net::socket_with(
            AddressFamily::NETLINK,
            SocketType::RAW,
            SocketFlags::CLOEXEC,
            Some(netlink::NETFILTER),
        )?;
        net::bind(&fd, &netlink::SocketAddrNetlink::new(0, 0))?;
        // A deep buffer: a burst of queued packets must not overflow the socket, because
        // an overflowed notification makes the kernel drop the packet it announced.
        if net::sockopt::set_socket_recv_buffer_size_force(&fd, 32 << 20).is_err() {
            net::sockopt::set_socket_recv_buffer_size(&fd, 8 << 20)?;
        }
        Ok(NfQueue {
            fd,
            seq: 0,
            rx: vec![0; 1 << 18],
        })
    }

    /// Binds `queue`, asks for metadata only, sets its length and accepts GSO packets whole.
    pub fn bind(&mut self, queue: u16, max_len: u32) -> io::Result<()> {
        let mut cmd = [0u8; 4];
        cmd[0] = CMD_BIND;
        self.request(queue, &[(NFQA_CFG_CMD, &cmd)])?;
        let mut params = [0u8; 5];
        params[4] = COPY_META;
        self.request(
            queue,
            &[
                (NFQA_CFG_PARAMS, &params),
                (NFQA_CFG_QUEUE_MAXLEN, &max_len.to_be_bytes()),
                (NFQA_CFG_MASK, &F_GSO.to_be_bytes()),
                (NFQA_CFG_FLAGS, &F_GSO.to_be_bytes()),
            ],
        )
    }

    /// Reads every packet notification available now (never blocks) into `out`.
    pub fn recv(&mut self, out: &mut Vec<Queued>) -> io::Result<()> {
        loop {
            let n = match net::recv(&self.fd, &mut self.rx[..], RecvFlags::DONTWAIT) {
                Ok((n, _)) => n,
                Err(rustix::io::Errno::AGAIN) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            parse_packets(&self.rx[..n], out);
        }
    }

    /// Gives one verdict to one packet.
    pub fn verdict(&mut self, q: Queued, verdict: u32) -> io::Result<()> {
        self.send_verdict(MSG_VERDICT, q, verdict)
    }

    /// Gives the same verdict to every packet of `q.queue` with an id up to `q.id`.
    pub fn verdict_batch(&mut self, q: Queued, verdict: u32) -> io::Result<()> {
        self.send_verdict(MSG_VERDICT_BATCH, q, verdict)
    }

    fn send_verdict(&mut self, kind: u16, q: Queued, verdict: u32) -> io::Result<()> {
        let mut hdr = [0u8; 8];
        hdr[..4].copy_from_slice(&verdict.to_be_bytes());
        hdr[4..].copy_from_slice(&q.id.to_be_bytes());
        let msg = self.message(kind, NLM_F_REQUEST, q.queue, &[(NFQA_VERDICT_HDR, &hdr)]);
        self.send(&msg)
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        let kernel = netlink::SocketAddrNetlink::new(0, 0);
        net::sendto(&self.fd, msg, SendFlags::empty(), &kernel)?;
        Ok(())
    }

    /// Sends a config request and waits for the kernel's acknowledgement.
    fn request(&mut self, queue: u16, attrs: &[(u16, &[u8])]) -> io::Result<()> {
        let msg = self.message(MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, queue, attrs);
        let seq = self.seq;
        self.send(&msg)?;
        loop {
            let (n, _) = net::recv(&self.fd, &mut self.rx[..], RecvFlags::empty())?;
            if let Some(errno) = find_ack(&self.rx[..n], seq) {
                return if errno == 0 {
                    Ok(())
                } else {
                    Err(io::Error::from_raw_os_error(errno))
                };
            }
        }
    }

    fn message(&mut self, kind: u16, flags: u16, queue: u16, attrs: &[(u16, &[u8])]) -> Vec<u8> {
        self.seq = self.seq.wrapping_add(1);
        let mut m = Vec::with_capacity(64);
        m.extend_from_slice(&[0; 4]); // length, patched below
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&self.seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&[0, 0]); // AF_UNSPEC, NFNETLINK_V0
        m.extend_from_slice(&queue.to_be_bytes());
        for (ty, data) in attrs {
            let len = (4 + data.len()) as u16;
            m.extend_from_slice(&len.to_ne_bytes());
            m.extend_from_slice(&ty.to_ne_bytes());
            m.extend_from_slice(data);
            m.resize(align4(m.len()), 0);
        }
        let total = (m.len() as u32).to_ne_bytes();
        m[..4].copy_from_slice(&total);
        m
    }
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Iterates over the netlink messages in a datagram: (type, seq, payload after the header).
fn messages(mut buf: &[u8]) -> impl Iterator<Item = (u16, u32, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < NLMSG_HDRLEN {
            return None;
        }
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return None;
        }
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        let seq = u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]);
        let payload = &buf[NLMSG_HDRLEN..len];
        buf = &buf[align4(len).min(buf.len())..];
        Some((kind, seq, payload))
    })
}

fn find_ack(buf: &[u8], seq: u32) -> Option<i32> {
    messages(buf).find_map(|(kind, s, payload)| {
        (kind == NLMSG_ERROR && s == seq && payload.len() >= 4)
            .then(|| -i32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]]))
    })
}

/// Extracts (queue, packet id) from every packet notification; anything else is skipped.
fn parse_packets(buf: &[u8], out: &mut Vec<Queued>) {
    for (kind, _, payload) in messages(buf) {
        if kind != MSG_PACKET || payload.len() < NFGEN_HDRLEN {
            continue;
        }
        let queue = u16::from_be_bytes([payload[2], payload[3]]);
        let mut attrs = &payload[NFGEN_HDRLEN..];
        while attrs.len() >= 4 {
            let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
            let ty = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
            if len < 4 || len > attrs.len() {
                break;
            }
            if ty == NFQA_PACKET_HDR && len >= 8 {
                let id = u32::from_be_bytes([attrs[4], attrs[5], attrs[6], attrs[7]]);
                out.push(Queued { queue, id });
                break;
            }
            attrs = &attrs[align4(len).min(attrs.len())..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet_msg(queue: u16, id: u32) -> Vec<u8> {
        let mut q = NfQueue {
            fd: net::socket(AddressFamily::UNIX, SocketType::DGRAM, None).unwrap(),
            seq: 0,
            rx: vec![],
        };
        let mut hdr = [0u8; 7];
        hdr[..4].copy_from_slice(&id.to_be_bytes());
        q.message(MSG_PACKET, 0, queue, &[(NFQA_PACKET_HDR, &hdr)])
    }

    #[test]
    fn parses_packet_ids_and_skips_garbage() {
        let mut buf = packet_msg(7, 42);
        buf.extend(packet_msg(9, 43));
        let mut out = vec![];
        parse_packets(&buf, &mut out);
        assert_eq!(
            out,
            vec![Queued { queue: 7, id: 42 }, Queued { queue: 9, id: 43 }]
        );
        // Every truncation of a valid buffer, and bytes that claim absurd lengths, parse
        // without panicking and yield no made-up packets.
        for cut in 0..buf.len() {
            let mut out = vec![];
            parse_packets(&buf[..cut], &mut out);
            assert!(out.len() <= 2);
        }
        let mut out = vec![];
        parse_packets(&[0xff; 64], &mut out);
        parse_packets(&[16, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &mut out);
        assert!(out.is_empty());
    }
}
