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
use tun_rs::{DeviceBuilder, ExpandBuffer, GROTable, SyncDevice, VIRTIO_NET_HDR_LEN};

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
}

impl TunError {
    /// `tun-rs` reports both kernel errors and its own parse errors as
    /// `io::Error`; only the kernel's carry an errno.
    fn classify(e: io::Error) -> Self {
        if e.raw_os_error().is_some() {
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
        let free = batch.bufs.len() - start;
        // A super-packet must land in one call, so require room for the worst
        // case at full-sized segments. (A flow with a tiny MSS could need more
        // than a whole batch; tun-rs then rejects that super-packet, as
        // wireguard-go does.)
        let needed = if self.offload {
            MAX_PACKET / usize::from(self.mtu - 40) + 1
        } else {
            1
        };
        if free < needed {
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
}
