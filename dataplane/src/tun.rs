//! The TUN device: inner IP packets in and out of the kernel, in batches.
//!
//! With offload on, the device is opened with `IFF_VNET_HDR` and `TUNSETOFFLOAD`
//! (checksum, TSO4/6 and, on Linux ≥ 6.2, USO4/6). The kernel then hands us TCP
//! and UDP super-packets of up to 64 KiB in one `read`, which we split into
//! MTU-sized packets with correct headers and checksums; when writing, runs of
//! consecutive TCP segments (and UDP datagrams) of one flow are coalesced back
//! into one super-packet per `write`. One system call then moves ~45 packets
//! instead of one, which is where userspace WireGuard loses most of its time.
//!
//! The virtio-net header parsing, segmentation and coalescing come from the
//! `tun-rs` crate, a port of wireguard-go's `tun/offload_linux.go`; this module
//! owns the buffers so that the hot path neither allocates nor locks.
//!
//! With offload off, the device is a plain `IFF_NO_PI` TUN: one packet per
//! system call. It is the fallback for kernels or sandboxes that refuse
//! `IFF_VNET_HDR`, and the baseline in the benchmark.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::process::Command;

use ipnet::IpNet;
use tun_rs::{
    gso_split, DeviceBuilder, ExpandBuffer, GROTable, SyncDevice, VirtioNetHdr,
    VIRTIO_NET_HDR_GSO_UDP_L4, VIRTIO_NET_HDR_LEN,
};

/// virtio-net header values (linux/virtio_net.h) that tun-rs does not export.
const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;

/// The largest IP packet (and super-packet) the kernel can hand over or accept.
pub const MAX_PACKET: usize = 65535;

/// The smallest MTU we accept: the IPv4 minimum reassembly size. (IPv6 needs
/// 1280, which the caller chooses when it assigns IPv6 addresses.)
pub const MIN_MTU: u16 = 576;

/// How many packets one batch holds. A 64 KiB super-packet at the minimum MTU
/// splits into 65535 / (576 - 40) = 122 segments, so one read always fits.
pub const BATCH_PACKETS: usize = 128;

/// Bytes in front of every packet buffer, where the virtio-net header goes.
const HEADROOM: usize = VIRTIO_NET_HDR_LEN;

#[derive(Debug, thiserror::Error)]
pub enum TunError {
    #[error("MTU {0} is out of range ({MIN_MTU}..=65535)")]
    BadMtu(u16),
    #[error("creating TUN device {name:?}: {source}")]
    Create { name: String, source: io::Error },
    /// The kernel refused a read or write (for a write, it may be one packet of
    /// the batch: the others were still written).
    #[error("TUN I/O: {0}")]
    Io(#[source] io::Error),
    /// A packet did not parse: a super-packet from the kernel that cannot be
    /// split, or a batch to write whose packets cannot be framed. The packets
    /// concerned are dropped.
    #[error("malformed packet: {0}")]
    Malformed(#[source] io::Error),
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    /// The device was deleted (`ip link delete`, as `wg-quick down` does).
    #[error("the TUN device was removed")]
    Removed,
}

impl TunError {
    /// `tun-rs` reports both kernel errors and its own parse errors as
    /// `io::Error`; only the kernel's carry an errno.
    fn classify(e: io::Error) -> Self {
        if e.raw_os_error() == Some(rustix::io::Errno::BADFD.raw_os_error()) {
            TunError::Removed
        } else if e.raw_os_error().is_some() {
            TunError::Io(e)
        } else {
            TunError::Malformed(e)
        }
    }
}

/// One packet buffer of fixed capacity, with room for the virtio-net header in
/// front. Its storage is allocated once; "resizing" only moves `len`, so the
/// hot path never allocates (a `Vec` would zero-fill on every regrowth).
#[derive(Debug)]
pub struct PacketBuf {
    data: Box<[u8]>,
    len: usize,
}

impl PacketBuf {
    fn new() -> Self {
        PacketBuf {
            // Zeroed pages are mapped lazily, so untouched capacity costs no memory.
            data: vec![0; HEADROOM + MAX_PACKET].into_boxed_slice(),
            len: 0,
        }
    }
}

impl AsRef<[u8]> for PacketBuf {
    fn as_ref(&self) -> &[u8] {
        &self.data[..self.len]
    }
}

impl AsMut<[u8]> for PacketBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.data[..self.len]
    }
}

impl ExpandBuffer for PacketBuf {
    fn buf_capacity(&self) -> usize {
        self.data.len()
    }

    fn buf_resize(&mut self, new_len: usize, value: u8) {
        let new_len = new_len.min(self.data.len());
        if new_len > self.len {
            self.data[self.len..new_len].fill(value);
        }
        self.len = new_len;
    }

    fn buf_extend_from_slice(&mut self, src: &[u8]) {
        // tun-rs checks the capacity before extending; clamping keeps a
        // violated assumption from turning into a panic.
        let n = src.len().min(self.data.len() - self.len);
        self.data[self.len..self.len + n].copy_from_slice(&src[..n]);
        self.len += n;
    }
}

/// A batch of inner IP packets, read from or to be written to a [`Tun`].
///
/// Buffers are allocated once (128 × 64 KiB of address space, touched only as
/// far as packets fill them) and reused.
#[derive(Debug)]
pub struct TunBatch {
    bufs: Vec<PacketBuf>,
    sizes: Vec<usize>,
    len: usize,
    /// Every buffer from this index on has its full length, as reads need.
    /// Only writes shorten buffers, so a read restores just those instead of
    /// touching all 128 (cache misses on a lone packet's path).
    full_from: usize,
}

impl Default for TunBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl TunBatch {
    pub fn new() -> Self {
        TunBatch {
            bufs: (0..BATCH_PACKETS).map(|_| PacketBuf::new()).collect(),
            sizes: vec![0; BATCH_PACKETS],
            len: 0,
            // New buffers have length 0.
            full_from: BATCH_PACKETS,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_full(&self) -> bool {
        self.len == self.bufs.len()
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// The packet at `index`, without the headroom.
    pub fn get(&self, index: usize) -> Option<&[u8]> {
        if index >= self.len {
            return None;
        }
        let size = self.sizes[index];
        self.bufs[index].data.get(HEADROOM..HEADROOM + size)
    }

    pub fn iter(&self) -> impl Iterator<Item = &[u8]> + '_ {
        (0..self.len).filter_map(|i| self.get(i))
    }

    /// Appends a packet by letting `fill` write it into the next buffer (for
    /// example decrypting straight into it). `fill` returns the packet length;
    /// 0 means "no packet" and leaves the batch unchanged. Returns false when
    /// the batch is full; `fill` is not called then.
    pub fn push_with(&mut self, fill: impl FnOnce(&mut [u8]) -> usize) -> bool {
        if self.is_full() {
            return false;
        }
        let buf = &mut self.bufs[self.len];
        let n = fill(&mut buf.data[HEADROOM..]).min(MAX_PACKET);
        if n > 0 {
            self.sizes[self.len] = n;
            self.len += 1;
        }
        true
    }

    /// Appends a copy of `packet`; false when the batch is full or the packet
    /// is empty or larger than [`MAX_PACKET`].
    pub fn push(&mut self, packet: &[u8]) -> bool {
        if packet.is_empty() || packet.len() > MAX_PACKET || self.is_full() {
            return false;
        }
        self.push_with(|buf| {
            buf[..packet.len()].copy_from_slice(packet);
            packet.len()
        })
    }
}

/// A TUN device. Reads and writes are batched; see the module documentation.
pub struct Tun {
    dev: SyncDevice,
    name: String,
    mtu: u16,
    offload: bool,
    gro: GROTable,
    /// The raw read buffer: virtio-net header plus a super-packet.
    raw: Box<[u8]>,
}

impl Tun {
    /// Creates (or attaches to) the TUN device `name` with the given MTU.
    /// Addresses and routes are set separately, see [`configure`]. The device
    /// disappears when the `Tun` is dropped.
    ///
    /// With `offload`, the kernel must accept `IFF_VNET_HDR` and the TCP
    /// offloads; otherwise this fails and the caller may retry without.
    pub fn create(name: &str, mtu: u16, offload: bool) -> Result<Self, TunError> {
        if mtu < MIN_MTU {
            return Err(TunError::BadMtu(mtu));
        }
        let dev = DeviceBuilder::new()
            .name(name)
            .mtu(mtu)
            .offload(offload)
            .build_sync()
            .map_err(|source| TunError::Create {
                name: name.to_owned(),
                source,
            })?;
        // The kernel may have picked the name (a "%d" pattern).
        let name = dev.name().unwrap_or_else(|_| name.to_owned());
        tracing::debug!(%name, mtu, offload, "TUN device created");
        Ok(Tun {
            dev,
            name,
            mtu,
            offload,
            gro: GROTable::new(),
            raw: vec![0; HEADROOM + MAX_PACKET].into_boxed_slice(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// Whether the device runs with `IFF_VNET_HDR` segmentation offloads.
    pub fn offload(&self) -> bool {
        self.offload
    }

    pub fn set_nonblocking(&self, nonblocking: bool) -> Result<(), TunError> {
        self.dev.set_nonblocking(nonblocking).map_err(TunError::Io)
    }

    /// Reads one packet from the kernel (with offload, possibly a super-packet,
    /// split here into MTU-sized packets) and appends it to `batch`. Returns
    /// how many packets were appended: 0 when a non-blocking device has nothing
    /// to read, or when `batch` has no room for a whole super-packet (flush it
    /// first; nothing is read then).
    pub fn recv_batch(&mut self, batch: &mut TunBatch) -> Result<usize, TunError> {
        let start = batch.len;
        if batch.bufs.len() - start < self.room_needed() {
            return Ok(0);
        }
        for buf in batch.bufs.iter_mut().take(batch.full_from).skip(start) {
            // Only `len` moves: the storage is always MAX_PACKET long.
            buf.len = HEADROOM + MAX_PACKET;
        }
        batch.full_from = batch.full_from.min(start);
        let result = self.dev.recv_multiple(
            &mut self.raw,
            &mut batch.bufs[start..],
            &mut batch.sizes[start..],
            HEADROOM,
        );
        match result {
            Ok(n) => {
                tracing::trace!(packets = n, "TUN read");
                batch.len += n;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(TunError::classify(e)),
        }
    }

    /// Reads one packet like [`Tun::recv_batch`], but straight into the
    /// batch's next buffer, the virtio-net header landing in its headroom.
    /// tun-rs reads into a buffer of its own, checks every buffer of the batch
    /// and copies the packet over: for a lone packet (a ping, a request) after
    /// an idle wait that is microseconds of cache misses. A super-packet is
    /// split into the batch as `recv_batch` splits it.
    pub fn recv_one(&mut self, batch: &mut TunBatch) -> Result<usize, TunError> {
        if !self.offload {
            // tun-rs reads a plain packet straight into the buffer already.
            return self.recv_batch(batch);
        }
        let start = batch.len;
        if batch.bufs.len() - start < self.room_needed() {
            return Ok(0);
        }
        let data = &mut batch.bufs[start].data;
        let n = match self.dev.recv(data) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) => return Err(TunError::classify(e)),
        };
        if n <= HEADROOM {
            return Err(malformed(format!(
                "a read of {n} bytes has no packet after its virtio-net header"
            )));
        }
        let hdr = VirtioNetHdr::decode(&data[..HEADROOM]).map_err(TunError::Malformed)?;
        if hdr.gso_type == VIRTIO_NET_HDR_GSO_NONE {
            if hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
                complete_checksum(&mut data[HEADROOM..n], hdr)?;
            }
            batch.sizes[start] = n - HEADROOM;
            batch.len += 1;
            tracing::trace!(packets = 1, "TUN read");
            return Ok(1);
        }
        // Split from the read buffer: swap it in (no copy), then give the
        // split its output buffers' full length, as `recv_batch` does.
        std::mem::swap(&mut self.raw, &mut batch.bufs[start].data);
        for buf in batch.bufs.iter_mut().take(batch.full_from).skip(start) {
            buf.len = HEADROOM + MAX_PACKET;
        }
        batch.full_from = batch.full_from.min(start);
        let packets = split_super_packet(
            hdr,
            &mut self.raw[HEADROOM..n],
            &mut batch.bufs[start..],
            &mut batch.sizes[start..],
        )
        .map_err(TunError::Malformed)?;
        batch.len += packets;
        tracing::trace!(packets, "TUN read");
        Ok(packets)
    }

    /// Free buffers a read needs in its batch: a super-packet must land in
    /// one call, so room for the worst case at full-sized segments. (A flow
    /// with a tiny MSS could need more than a whole batch; its super-packet is
    /// then rejected, as wireguard-go does.)
    fn room_needed(&self) -> usize {
        if self.offload {
            MAX_PACKET / usize::from(self.mtu - 40) + 1
        } else {
            1
        }
    }

    /// Writes every packet of `batch` to the kernel and clears it. With
    /// offload, consecutive segments of one TCP (or UDP) flow are coalesced
    /// into one write. A packet the kernel rejects does not stop the others:
    /// the last such error is returned after the whole batch was tried.
    pub fn send_batch(&mut self, batch: &mut TunBatch) -> Result<(), TunError> {
        let n = batch.len;
        batch.len = 0;
        if n == 0 {
            return Ok(());
        }
        if n == 1 {
            // Nothing to coalesce: skip tun-rs's flow tables, whose upkeep
            // costs a lone packet (a ping, an ACK) more than its write. A
            // zero virtio-net header says "one whole packet, checksummed",
            // which a decrypted packet is.
            let size = batch.sizes[0];
            let data = &mut batch.bufs[0].data;
            let start = if self.offload {
                data[..HEADROOM].fill(0);
                0
            } else {
                HEADROOM
            };
            let result = self.dev.send(&data[start..HEADROOM + size]);
            tracing::trace!(packets = 1, "TUN write");
            return result.map(drop).map_err(TunError::classify);
        }
        for (buf, &size) in batch.bufs[..n].iter_mut().zip(&batch.sizes[..n]) {
            buf.len = HEADROOM + size;
        }
        // tun-rs also resizes buffers while coalescing, but only these.
        batch.full_from = batch.full_from.max(n);
        // Without vnet headers tun-rs writes each packet from the offset on,
        // skipping the unused headroom.
        let offset = HEADROOM;
        let result = self
            .dev
            .send_multiple(&mut self.gro, &mut batch.bufs[..n], offset);
        tracing::trace!(packets = n, "TUN write");
        result.map(|_| ()).map_err(TunError::classify)
    }
}

impl std::fmt::Debug for Tun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tun")
            .field("name", &self.name)
            .field("mtu", &self.mtu)
            .field("offload", &self.offload)
            .finish_non_exhaustive()
    }
}

impl AsFd for Tun {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.dev.as_fd()
    }
}

fn malformed(what: String) -> TunError {
    TunError::Malformed(io::Error::new(io::ErrorKind::InvalidData, what))
}

/// Finishes the transport checksum of a packet the kernel left partial
/// (`VIRTIO_NET_HDR_F_NEEDS_CSUM`): the field at `csum_start + csum_offset`
/// holds the pseudo-header's sum, to which the sum from `csum_start` on is
/// added.
fn complete_checksum(packet: &mut [u8], hdr: VirtioNetHdr) -> Result<(), TunError> {
    let from = usize::from(hdr.csum_start);
    let at = from + usize::from(hdr.csum_offset);
    if at + 2 > packet.len() {
        return Err(malformed(format!(
            "checksum field at {at} is outside the {}-byte packet",
            packet.len()
        )));
    }
    let partial = u16::from_be_bytes([packet[at], packet[at + 1]]);
    packet[at..at + 2].fill(0);
    let sum = tun_rs::checksum(&packet[from..], u64::from(partial));
    packet[at..at + 2].copy_from_slice(&(!sum).to_be_bytes());
    Ok(())
}

/// Splits a TCP or UDP super-packet (without its virtio-net header) into
/// MTU-sized packets in `bufs`, making the checks tun-rs's own read path
/// makes before its `gso_split`. As there, the header length is taken from
/// the transport header, not from the kernel: for forwarded packets the
/// kernel's can cover the whole first segment.
fn split_super_packet(
    mut hdr: VirtioNetHdr,
    packet: &mut [u8],
    bufs: &mut [PacketBuf],
    sizes: &mut [usize],
) -> io::Result<usize> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let is_v6 = match packet.first().map(|b| b >> 4) {
        Some(4) => false,
        Some(6) => true,
        _ => return Err(invalid("super-packet is neither IPv4 nor IPv6")),
    };
    let transport_start = usize::from(hdr.csum_start);
    let transport_len = if hdr.gso_type & !VIRTIO_NET_HDR_GSO_ECN == VIRTIO_NET_HDR_GSO_UDP_L4 {
        8
    } else {
        let offset = packet
            .get(transport_start + 12)
            .ok_or_else(|| invalid("super-packet ends inside its TCP header"))?;
        let len = u16::from(offset >> 4) * 4;
        if !(20..=60).contains(&len) {
            return Err(invalid("TCP header length outside 20..=60"));
        }
        len
    };
    hdr.hdr_len = hdr
        .csum_start
        .checked_add(transport_len)
        .ok_or_else(|| invalid("header length overflows"))?;
    if transport_start + usize::from(hdr.csum_offset) + 2 > packet.len() {
        return Err(invalid("checksum field outside the super-packet"));
    }
    gso_split(packet, hdr, bufs, sizes, HEADROOM, is_v6)
}

/// Gives the device its addresses, brings it up and routes `routes` into it,
/// with the `ip` command (the engine runs as root; netlink would only move the
/// same three requests into this process). Idempotent: addresses already
/// present and existing routes are replaced, not duplicated.
pub fn configure(name: &str, addrs: &[IpNet], routes: &[IpNet]) -> Result<(), TunError> {
    for addr in addrs {
        let a = addr.to_string();
        // A TUN has no link on which an address could be duplicated; without `nodad` an IPv6
        // address stays tentative (unusable: bind fails with EADDRNOTAVAIL) for DAD's second.
        match addr {
            IpNet::V6(_) => ip(&["-6", "addr", "replace", &a, "dev", name, "nodad"])?,
            IpNet::V4(_) => ip(&["addr", "replace", &a, "dev", name])?,
        };
    }
    ip(&["link", "set", "dev", name, "up"])?;
    for route in routes {
        ip(&["route", "replace", &route.trunc().to_string(), "dev", name])?;
    }
    Ok(())
}

/// Removes routes that [`configure`] added; routes already gone are fine.
pub fn remove_routes(name: &str, routes: &[IpNet]) -> Result<(), TunError> {
    for route in routes {
        let net = route.trunc().to_string();
        match ip(&["route", "del", &net, "dev", name]) {
            Err(TunError::Command { detail, .. }) if detail.contains("No such process") => {}
            other => other?,
        }
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<(), TunError> {
    let command = format!("ip {}", args.join(" "));
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| TunError::Command {
            command: command.clone(),
            detail: e.to_string(),
        })?;
    if !output.status.success() {
        return Err(TunError::Command {
            command,
            detail: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_buf_resizes_within_capacity() {
        let mut b = PacketBuf::new();
        b.buf_resize(4, 7);
        assert_eq!(b.as_ref(), &[7, 7, 7, 7]);
        b.buf_extend_from_slice(&[1, 2]);
        assert_eq!(b.as_ref(), &[7, 7, 7, 7, 1, 2]);
        b.buf_resize(2, 0);
        assert_eq!(b.as_ref(), &[7, 7]);
        b.buf_resize(usize::MAX, 0);
        assert_eq!(b.as_ref().len(), b.buf_capacity());
        b.buf_extend_from_slice(&[9; 10]);
        assert_eq!(b.as_ref().len(), b.buf_capacity());
    }

    #[test]
    fn batch_push_and_iterate() {
        let mut batch = TunBatch::new();
        assert!(batch.push(&[0x45, 1, 2]));
        assert!(!batch.push(&[]));
        assert!(batch.push_with(|buf| {
            buf[..2].copy_from_slice(&[0x60, 9]);
            2
        }));
        assert!(batch.push_with(|_| 0));
        let packets: Vec<&[u8]> = batch.iter().collect();
        assert_eq!(packets, vec![&[0x45, 1, 2][..], &[0x60, 9][..]]);
        while !batch.is_full() {
            assert!(batch.push(&[0x45]));
        }
        assert!(!batch.push(&[0x45]));
        assert!(!batch.push_with(|_| unreachable!()));
        batch.clear();
        assert!(batch.is_empty());
        assert_eq!(batch.get(0), None);
    }

    fn hdr(gso_type: u8, csum_start: u16, csum_offset: u16) -> VirtioNetHdr {
        VirtioNetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type,
            hdr_len: 0,
            gso_size: 1000,
            csum_start,
            csum_offset,
        }
    }

    /// A 20-byte IPv4 header with `proto`, then `transport`.
    fn ipv4(proto: u8, transport: &[u8]) -> Vec<u8> {
        let mut p = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, proto, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        let total = (p.len() + transport.len()) as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p.extend_from_slice(transport);
        p
    }

    #[test]
    fn partial_checksum_is_completed() {
        // A UDP datagram whose checksum field holds a partial sum, as the
        // kernel leaves it: the result adds the datagram's words to it.
        let mut udp = vec![
            0x30, 0x39, 0x00, 0x35, 0x00, 0x0d, 0x12, 0x34, b'h', b'e', b'l', b'l', b'o',
        ];
        let partial = 0x1234u16;
        let mut zeroed = udp.clone();
        zeroed[6..8].fill(0);
        let want = !tun_rs::checksum(&zeroed, u64::from(partial));
        let mut packet = ipv4(17, &udp);
        complete_checksum(&mut packet, hdr(0, 20, 6)).unwrap();
        udp[6..8].copy_from_slice(&want.to_be_bytes());
        assert_eq!(&packet[20..], &udp[..]);
    }

    #[test]
    fn checksum_fields_outside_the_packet_are_refused() {
        let packet = ipv4(17, &[0; 8]);
        for (start, offset) in [(20, 7), (27, 0), (28, 6), (u16::MAX, u16::MAX), (0, 27)] {
            let mut p = packet.clone();
            assert!(
                complete_checksum(&mut p, hdr(0, start, offset)).is_err(),
                "csum_start {start} csum_offset {offset}"
            );
            assert_eq!(p, packet, "a refused packet is left alone");
        }
    }

    #[test]
    fn malformed_super_packets_are_refused() {
        let mut bufs: Vec<PacketBuf> = (0..BATCH_PACKETS)
            .map(|_| {
                let mut b = PacketBuf::new();
                b.len = HEADROOM + MAX_PACKET;
                b
            })
            .collect();
        let mut sizes = vec![0; BATCH_PACKETS];
        let tcp = |offset_byte: u8, len: usize| {
            let mut t = vec![0u8; len];
            if len > 12 {
                t[12] = offset_byte;
            }
            ipv4(6, &t)
        };
        let tcpv4 = tun_rs::VIRTIO_NET_HDR_GSO_TCPV4;
        let cases: Vec<(&str, Vec<u8>, VirtioNetHdr)> = vec![
            ("empty", vec![], hdr(tcpv4, 20, 16)),
            ("IP version 5", vec![0x55; 60], hdr(tcpv4, 20, 16)),
            (
                "cut inside the TCP header",
                tcp(0x50, 10),
                hdr(tcpv4, 20, 16),
            ),
            (
                "TCP header of 16 bytes",
                tcp(0x40, 2000),
                hdr(tcpv4, 20, 16),
            ),
            (
                "TCP header beyond the packet",
                tcp(0xf0, 40),
                hdr(tcpv4, 20, 16),
            ),
            (
                "checksum beyond the packet",
                tcp(0x50, 20),
                hdr(tcpv4, 20, 40),
            ),
            (
                "IPv4 packet, IPv6 type",
                tcp(0x50, 2000),
                hdr(tun_rs::VIRTIO_NET_HDR_GSO_TCPV6, 20, 16),
            ),
            ("unknown type", tcp(0x50, 2000), hdr(9, 20, 16)),
            (
                "transport inside the IP header",
                tcp(0x50, 2000),
                hdr(tcpv4, 4, 16),
            ),
            (
                "csum_start past the end",
                tcp(0x50, 100),
                hdr(tcpv4, u16::MAX, 16),
            ),
            (
                "segment size 0",
                tcp(0x50, 2000),
                VirtioNetHdr {
                    gso_size: 0,
                    ..hdr(tcpv4, 20, 16)
                },
            ),
        ];
        for (what, mut packet, h) in cases {
            assert!(
                split_super_packet(h, &mut packet, &mut bufs, &mut sizes).is_err(),
                "{what} was accepted"
            );
        }
        // A well-formed one splits.
        let mut packet = tcp(0x50, 20 + 3000);
        let n = split_super_packet(hdr(tcpv4, 20, 16), &mut packet, &mut bufs, &mut sizes).unwrap();
        assert_eq!(n, 3);
        assert_eq!(&sizes[..3], &[1040, 1040, 1040]);
    }
}
