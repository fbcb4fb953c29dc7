//! The UDP socket carrying WireGuard for all peers, with batched I/O.
//!
//! Sending: [`UdpSendBatch`] lays datagrams out back to back and groups runs of
//! equal-size datagrams to one destination (the last of a run may be shorter)
//! into one UDP GSO message (`UDP_SEGMENT`): one `sendmsg` carries up to 64
//! datagrams. Receiving: `recvmmsg` with `UDP_GRO`, so one system call returns
//! up to 32 buffers of up to 64 datagrams each; [`UdpRecvBatch::iter`] splits
//! them at the segment boundaries again.
//!
//! The control-message plumbing (and its fallbacks: GSO switched off when a
//! driver answers EIO) comes from `quinn-udp`, Quinn's small crate for exactly
//! this; this module owns the buffers, the grouping and the socket setup.
//!
//! One dual-stack IPv6 socket serves IPv4 peers through v4-mapped addresses;
//! addresses are mapped on the way out and unmapped on the way in, so callers
//! only ever see plain IPv4 and IPv6 addresses.
//!
//! Beside that main socket, each peer endpoint may get a socket of its own,
//! bound to the same port (`SO_REUSEPORT`) and connected to the endpoint
//! ([`PeerSockets`]), as boringtun does. The kernel then keeps the route in
//! the socket instead of looking it up for every datagram sent, and hands a
//! datagram from that endpoint to the connected socket straight from IP's
//! early demultiplexing, skipping the input route lookup too. For a lone
//! packet that is about a fifth of the sending system call. Datagrams from
//! anyone else still arrive at the main socket: the kernel never picks a
//! connected socket of a reuseport group for a datagram it was not
//! connected to.
//!
//! A peer socket may also be bound to another local port than the main
//! socket's ([`PeerSockets::set_source_port`]): NAT traversal's birthday
//! technique punches a mapping from an extra socket of its own (opened with
//! `SO_REUSEPORT`), and only datagrams from that port use the mapping, so
//! the peer's WireGuard datagrams must leave from, and arrive at, that port.

use std::collections::BTreeMap;
use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, RecvMsg, SockaddrStorage};
use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::net::{sockopt, AddressFamily, SendFlags, SocketFlags, SocketType};

/// Socket buffer size asked for (wireguard-go uses the same): enough for
/// ~5000 full-size datagrams, so a burst while the engine is busy encrypting
/// is queued rather than dropped.
pub const SOCKET_BUFFER: usize = 7 << 20;

/// The largest UDP payload the kernel accepts in one GSO message over IPv4
/// (65535 - 20 - 8); also used for IPv6, which allows 20 bytes more. It is
/// also the largest single datagram.
pub const MAX_GSO_BYTES: usize = 65507;

/// The kernel's limit on segments per GSO message (`UDP_MAX_SEGMENTS`).
const MAX_GSO_SEGMENTS: usize = 64;

/// Bytes of datagram space in one send batch: one 64 KiB TUN super-packet
/// encrypted (~46 × 1452 B) fits several times over.
const SEND_BATCH_BYTES: usize = 256 * 1024;

/// Datagrams (or GSO messages) in one send batch.
const SEND_BATCH_MESSAGES: usize = 256;

/// Messages per `recvmmsg`, quinn-udp's batch size.
const RECV_MESSAGES: usize = quinn_udp::BATCH_SIZE;

/// Room for one GRO message: at most 64 KiB of coalesced datagrams.
const RECV_BUF: usize = 65536;

/// How long binding waits for a just-closed probe socket to let go of its
/// port (see `UdpSocket::bind_shared`).
const PROBE_LINGER: Duration = Duration::from_secs(1);

/// How long `send_batch` waits for room in a full socket send buffer before
/// dropping the rest of the batch.
const SEND_WAIT: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum UdpError {
    #[error("binding UDP socket to {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("UDP I/O: {0}")]
    Io(#[from] io::Error),
}

/// What [`UdpSocket::send_batch`] did with a batch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SendReport {
    /// Datagrams handed to the kernel.
    pub sent: usize,
    /// Datagrams dropped: refused by the kernel (unreachable, too big, wrong
    /// address family) or the send buffer stayed full.
    pub dropped: usize,
    /// `sendmsg` calls made.
    pub syscalls: usize,
}

/// Effective socket buffer sizes, as the kernel reports them (it doubles what
/// was asked to account for its bookkeeping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferSizes {
    pub send: usize,
    pub recv: usize,
}

/// A non-blocking UDP socket with batched, segmentation-offloaded I/O.
#[derive(Debug)]
pub struct UdpSocket {
    sock: std::net::UdpSocket,
    state: UdpSocketState,
    /// An IPv6 socket that also carries IPv4 as v4-mapped addresses.
    dual_stack: bool,
    local: SocketAddr,
    /// The endpoint a peer socket is connected to (unmapped).
    peer: Option<SocketAddr>,
    /// A peer socket that looks stale (see [`PeerSockets::refresh`]).
    stale: AtomicBool,
    /// `SO_MARK` of its datagrams (0: none); peer sockets take the main
    /// socket's.
    mark: u32,
}

/// How a socket is opened.
#[derive(Debug, Clone, Copy)]
struct Open {
    /// Joins (or starts) the port's `SO_REUSEPORT` group.
    reuse_port: bool,
    /// Connects to this (family-mapped) address after binding.
    connect: Option<SocketAddr>,
    /// An unspecified IPv6 address also takes IPv4 (v4-mapped).
    dual_stack: bool,
    /// `SO_MARK`, set before a connect so that its route lookup sees it.
    mark: u32,
}

impl UdpSocket {
    /// Binds a socket on all addresses, IPv4 and IPv6, at `port` (0: any
    /// port). Falls back to IPv4 only where IPv6 is unavailable. The socket
    /// can have [peer sockets](Self::connect_peer) on its port.
    pub fn bind_any(port: u16) -> Result<Self, UdpError> {
        let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
        match Self::bind_shared(v6) {
            Err(UdpError::Bind { source, .. })
                if source.raw_os_error() == Some(rustix::io::Errno::AFNOSUPPORT.raw_os_error()) =>
            {
                tracing::info!("IPv6 unavailable, binding IPv4 only");
                Self::bind_shared(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))
            }
            other => other,
        }
    }

    /// Binds to `addr`. An unspecified IPv6 address gives a dual-stack socket.
    pub fn bind(addr: SocketAddr) -> Result<Self, UdpError> {
        Self::open(
            addr,
            Open {
                reuse_port: false,
                connect: None,
                dual_stack: true,
                mark: 0,
            },
        )
    }

    /// Binds to `addr` in a `SO_REUSEPORT` group, so that peer sockets can
    /// join it. A reuseport bind succeeds beside any other socket of the same
    /// user in such a group, another meshd on the same port included, so a
    /// plain bind first checks that the port is free.
    fn bind_shared(addr: SocketAddr) -> Result<Self, UdpError> {
        let how = Open {
            reuse_port: true,
            connect: None,
            dual_stack: true,
            mark: 0,
        };
        if addr.port() == 0 {
            return Self::open(addr, how);
        }
        drop(Self::bind(addr)?);
        // A process another thread forks right now holds the probe's
        // descriptor until it execs, and with it the port: the reuseport
        // bind then fails for a moment.
        let deadline = std::time::Instant::now() + PROBE_LINGER;
        loop {
            match Self::open(addr, how) {
                Err(UdpError::Bind { source, .. })
                    if source.kind() == io::ErrorKind::AddrInUse
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
                other => return other,
            }
        }
    }

    /// A socket on this one's port, connected to `endpoint`: datagrams from
    /// there arrive on it instead of here, and what it sends there skips the
    /// route lookup (see the module docs). This socket must come from
    /// [`UdpSocket::bind_any`].
    ///
    /// The socket is of the endpoint's own family, even when this one is
    /// dual-stack: IPv4 through an IPv6 socket pays for the mapping on both
    /// paths (about 14 µs per round trip between two meshd on the standard
    /// machine, idle).
    pub fn connect_peer(&self, endpoint: SocketAddr) -> Result<Self, UdpError> {
        self.connect_peer_on(endpoint, self.local.port())
    }

    /// As [`UdpSocket::connect_peer`], on local port `port`: the port of
    /// another socket of ours that set `SO_REUSEPORT` (this one joins its
    /// group, as the same user).
    pub fn connect_peer_on(&self, endpoint: SocketAddr, port: u16) -> Result<Self, UdpError> {
        let endpoint = canonical(endpoint);
        if self.map_destination(endpoint).is_none() {
            return Err(UdpError::Bind {
                addr: endpoint,
                source: io::Error::from(io::ErrorKind::Unsupported),
            });
        }
        let local = match (endpoint, self.local) {
            (SocketAddr::V4(_), _) if self.dual_stack => {
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))
            }
            (SocketAddr::V6(_), _) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
            (_, local) => local,
        };
        let mut sock = Self::open(
            local,
            Open {
                reuse_port: true,
                connect: Some(endpoint),
                dual_stack: false,
                mark: self.mark,
            },
        )?;
        sock.peer = Some(endpoint);
        Ok(sock)
    }

    fn open(addr: SocketAddr, how: Open) -> Result<Self, UdpError> {
        let bind_err = |source: io::Error| UdpError::Bind { addr, source };
        let family = match addr {
            SocketAddr::V4(_) => AddressFamily::INET,
            SocketAddr::V6(_) => AddressFamily::INET6,
        };
        let fd: OwnedFd = rustix::net::socket_with(
            family,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC,
            Some(rustix::net::ipproto::UDP),
        )
        .map_err(|e| bind_err(e.into()))?;
        let dual_stack =
            how.dual_stack && matches!(addr, SocketAddr::V6(a) if a.ip().is_unspecified());
        if family == AddressFamily::INET6 {
            sockopt::set_ipv6_v6only(&fd, !dual_stack).map_err(|e| bind_err(e.into()))?;
        }
        if how.reuse_port {
            sockopt::set_socket_reuseport(&fd, true).map_err(|e| bind_err(e.into()))?;
        }
        if how.mark != 0 {
            set_mark(&fd, how.mark).map_err(bind_err)?;
        }
        rustix::net::bind(&fd, &addr).map_err(|e| bind_err(e.into()))?;
        if let Some(remote) = how.connect {
            rustix::net::connect(&fd, &remote).map_err(|e| UdpError::Bind {
                addr: remote,
                source: e.into(),
            })?;
        }
        let sock = std::net::UdpSocket::from(fd);
        set_buffer_sizes(&sock, SOCKET_BUFFER);
        // Also switches the socket to non-blocking and turns on UDP_GRO.
        let state = UdpSocketState::new(UdpSockRef::from(&sock)).map_err(bind_err)?;
        // quinn-udp asks for the TOS / traffic class of every datagram (for
        // ECN, which WireGuard does not use): one control message less for
        // the kernel to write and for us to parse per receive.
        // Failing costs nothing but that parsing, so it is not an error.
        if family == AddressFamily::INET || dual_stack {
            let _ = sockopt::set_ip_recvtos(&sock, false);
        }
        if family == AddressFamily::INET6 {
            let _ = sockopt::set_ipv6_recvtclass(&sock, false);
        }
        {
            use nix::sys::socket::{setsockopt, sockopt as nso};
            let _ = setsockopt(&sock, nso::ReceiveTimestampns, &false);
            if family == AddressFamily::INET || dual_stack {
                let _ = setsockopt(&sock, nso::Ipv4PacketInfo, &false);
            }
            if family == AddressFamily::INET6 {
                let _ = setsockopt(&sock, nso::Ipv6RecvPacketInfo, &false);
            }
        }
        // A connected socket reports the address it is bound to, not the
        // wildcard it was bound with.
        let local = match how.connect {
            Some(_) => addr,
            None => sock.local_addr().map_err(bind_err)?,
        };
        tracing::debug!(
            %local,
            dual_stack,
            connected = ?how.connect,
            gso_segments = state.max_gso_segments(),
            gro_segments = state.gro_segments(),
            "UDP socket bound"
        );
        Ok(UdpSocket {
            sock,
            state,
            dual_stack,
            local,
            peer: None,
            stale: AtomicBool::new(false),
            mark: how.mark,
        })
    }

    pub fn mark(&self) -> u32 {
        self.mark
    }

    /// Marks this socket's datagrams with `mark` (`SO_MARK`; 0: none), for
    /// policy routing. Peer sockets made later take it; existing ones keep
    /// theirs and must be replaced.
    pub fn set_mark(&mut self, mark: u32) -> Result<(), UdpError> {
        set_mark(self.sock.as_fd(), mark).map_err(|source| UdpError::Bind {
            addr: self.local,
            source,
        })?;
        self.mark = mark;
        Ok(())
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Datagrams one send may carry (1 when the kernel or driver lacks GSO).
    pub fn max_gso_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// Datagrams the kernel may coalesce into one received buffer.
    pub fn gro_segments(&self) -> usize {
        self.state.gro_segments()
    }

    pub fn buffer_sizes(&self) -> Result<BufferSizes, UdpError> {
        Ok(BufferSizes {
            send: sockopt::socket_send_buffer_size(&self.sock).map_err(io::Error::from)?,
            recv: sockopt::socket_recv_buffer_size(&self.sock).map_err(io::Error::from)?,
        })
    }

    /// Receives what is queued (up to 32 messages, each possibly coalesced
    /// from many datagrams) into `batch`, replacing its contents. Returns the
    /// number of messages; 0 when nothing is queued.
    pub fn recv_batch(&self, batch: &mut UdpRecvBatch) -> Result<usize, UdpError> {
        batch.count = 0;
        let mut chunks = batch.bufs.chunks_mut(RECV_BUF);
        let mut slices: [IoSliceMut<'_>; RECV_MESSAGES] =
            std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or_default()));
        match self
            .state
            .recv(UdpSockRef::from(&self.sock), &mut slices, &mut batch.meta)
        {
            Ok(n) => {
                for meta in &mut batch.meta[..n] {
                    meta.addr = canonical(meta.addr);
                }
                batch.count = n;
                tracing::trace!(messages = n, "UDP recv");
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// Receives one message (a datagram, or a run of them that the kernel
    /// coalesced) into `batch`, replacing its contents, with a plain
    /// `recvmsg`. After an idle wait a datagram most likely arrives alone,
    /// and then this is cheaper than [`UdpSocket::recv_batch`], whose
    /// 32-message `recvmmsg` first sets up headers in memory that the wait
    /// left uncached. Returns 1, or 0 when nothing is queued.
    pub fn recv_one(&self, batch: &mut UdpRecvBatch) -> Result<usize, UdpError> {
        batch.count = 0;
        let mut iov = [IoSliceMut::new(&mut batch.bufs[..RECV_BUF])];
        let fd = self.sock.as_raw_fd();
        let flags = MsgFlags::MSG_DONTWAIT;
        let control = Some(&mut batch.control[..]);
        // A connected socket's datagrams all come from its endpoint: the
        // kernel need not write the address.
        let received = match self.peer {
            Some(endpoint) => {
                recvmsg::<()>(fd, &mut iov, control, flags).map(|msg| (Some(endpoint), sizes(&msg)))
            }
            None => recvmsg::<SockaddrStorage>(fd, &mut iov, control, flags)
                .map(|msg| (msg.address.as_ref().and_then(std_addr), sizes(&msg))),
        };
        let (from, (len, stride)) = match received {
            Ok((from, sizes)) => (from, sizes?),
            Err(Errno::EAGAIN) => return Ok(0),
            Err(e) => return Err(io::Error::from(e).into()),
        };
        let from = from.ok_or_else(|| io::Error::other("datagram without a sender address"))?;
        let meta = &mut batch.meta[0];
        meta.addr = canonical(from);
        meta.len = len;
        meta.stride = stride;
        batch.count = 1;
        tracing::trace!(bytes = meta.len, "UDP recv");
        Ok(1)
    }

    /// The endpoint this socket is connected to, for a peer socket.
    pub fn peer(&self) -> Option<SocketAddr> {
        self.peer
    }

    /// Sends every datagram of `batch` and clears it. A datagram the kernel
    /// refuses is dropped and counted, and the rest are still sent; when the
    /// send buffer is full this waits up to 200 ms for room (the backpressure
    /// that keeps a fast sender from losing its own packets), then drops.
    pub fn send_batch(&self, batch: &mut UdpSendBatch) -> SendReport {
        send_batch_via(batch, self, &PeerSockets::default())
    }

    /// Sends one datagram or GSO message to `dest` (unmapped), waiting for
    /// room as [`UdpSocket::send_batch`] describes.
    fn send_one(
        &self,
        dest: SocketAddr,
        contents: &[u8],
        segment_size: Option<usize>,
        syscalls: &mut usize,
    ) -> io::Result<()> {
        // To its own endpoint, a connected socket sends without an address or
        // control message: either would make the kernel look the route up
        // again. GSO needs a control message, but then one lookup serves
        // up to 64 datagrams.
        let transmit = if self.peer == Some(dest) && segment_size.is_none() {
            None
        } else {
            let destination = self.map_destination(dest).ok_or_else(|| {
                io::Error::new(io::ErrorKind::Unsupported, "no route for address family")
            })?;
            Some(Transmit {
                destination,
                ecn: None,
                contents,
                segment_size,
                src_ip: None,
            })
        };
        loop {
            *syscalls += 1;
            let result = match &transmit {
                None => rustix::net::send(&self.sock, contents, SendFlags::empty())
                    .map(drop)
                    .map_err(io::Error::from),
                Some(transmit) => self.state.try_send(UdpSockRef::from(&self.sock), transmit),
            };
            match result {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !self.wait_writable(SEND_WAIT)? {
                        return Err(e);
                    }
                }
                other => return other,
            }
        }
    }

    /// Waits until the socket can take a datagram; false on timeout.
    fn wait_writable(&self, timeout: Duration) -> io::Result<bool> {
        let timeout = Timespec::try_from(timeout).map_err(io::Error::other)?;
        let mut fds = [PollFd::new(&self.sock, PollFlags::OUT)];
        let ready = rustix::event::poll(&mut fds, Some(&timeout))?;
        Ok(ready > 0)
    }

    fn map_destination(&self, dest: SocketAddr) -> Option<SocketAddr> {
        match (dest, self.local) {
            (SocketAddr::V4(v4), SocketAddr::V6(_)) if self.dual_stack => Some(SocketAddr::V6(
                SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0),
            )),
            (SocketAddr::V4(_), SocketAddr::V4(_)) | (SocketAddr::V6(_), SocketAddr::V6(_)) => {
                Some(dest)
            }
            _ => None,
        }
    }
}

impl AsFd for UdpSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

/// Sends every datagram of `batch` through its destination's peer socket, or
/// `main` if it has none, then clears the batch; see
/// [`UdpSocket::send_batch`]. A peer socket the kernel refuses a datagram to
/// (its local address went away, say) is marked stale and the datagram goes
/// through `main` instead.
pub fn send_batch_via(
    batch: &mut UdpSendBatch,
    main: &UdpSocket,
    peers: &PeerSockets,
) -> SendReport {
    let mut report = SendReport::default();
    let mut stalled = false;
    for msg in &batch.msgs {
        let data = &batch.buf[msg.start..msg.start + msg.len];
        if stalled {
            report.dropped += msg.count;
            continue;
        }
        // A destination of a family the socket lacks is refused (and
        // counted) by `send_one`, chunk by chunk.
        let mut sock = peers.get(msg.dest).unwrap_or(main);
        // GSO may have been switched off after the batch was built, so
        // split the message into what the socket takes now.
        let per_send = sock.state.max_gso_segments().clamp(1, MAX_GSO_SEGMENTS);
        for chunk in data.chunks(msg.segment * per_send) {
            let segments = chunk.len().div_ceil(msg.segment);
            if stalled {
                report.dropped += segments;
                continue;
            }
            let segment_size = (segments > 1).then_some(msg.segment);
            let mut result = sock.send_one(msg.dest, chunk, segment_size, &mut report.syscalls);
            if let Err(e) = &result {
                if sock.peer.is_some() && e.kind() != io::ErrorKind::WouldBlock {
                    tracing::debug!(dest = %msg.dest, error = %e, "peer socket refused, using the main one");
                    peers.mark_stale(msg.dest);
                    sock = main;
                    result = sock.send_one(msg.dest, chunk, segment_size, &mut report.syscalls);
                }
            }
            match result {
                Ok(()) => report.sent += segments,
                Err(e) => {
                    if e.kind() == io::ErrorKind::WouldBlock {
                        tracing::debug!("UDP send buffer stayed full, dropping the batch");
                        stalled = true;
                    } else {
                        tracing::trace!(dest = %msg.dest, error = %e, "UDP send refused");
                    }
                    report.dropped += segments;
                }
            }
        }
    }
    batch.clear();
    report
}

/// A plain IPv4 socket on any free port with `SO_REUSEPORT` set, non-blocking:
/// the extra socket NAT traversal's birthday technique sends from, whose
/// port a peer socket may later join (see [`PeerSockets::set_source_port`]).
pub fn bind_extra_v4() -> io::Result<std::net::UdpSocket> {
    let fd = rustix::net::socket_with(
        AddressFamily::INET,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        Some(rustix::net::ipproto::UDP),
    )?;
    sockopt::set_socket_reuseport(&fd, true)?;
    rustix::net::bind(&fd, &SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))?;
    Ok(std::net::UdpSocket::from(fd))
}

/// At most this many peer sockets: each is a descriptor, and the usual soft
/// limit is 1024 per process. Endpoints beyond it use the main socket.
pub const MAX_PEER_SOCKETS: usize = 256;

/// A stale-looking peer socket younger than this is kept: right after it
/// was made, datagrams its endpoint sent before still arrive at the main
/// socket, which is no sign of trouble. It also bounds how often a socket
/// that keeps looking stale is remade.
const PEER_SOCKET_MIN_AGE: Duration = Duration::from_secs(1);

/// The peer sockets of a main socket (see the module docs), one per peer
/// endpoint, each in a numbered slot that the engine uses as its epoll token.
///
/// A peer socket is bound to the local address the route to its endpoint
/// had when it was made. When that address goes away (a laptop changes
/// networks) the socket can neither send nor receive: its sends fail and
/// the endpoint's datagrams, now sent to another of our addresses, arrive
/// at the main socket. Either marks it stale, and [`PeerSockets::refresh`]
/// replaces it with one on the current route.
#[derive(Debug, Default)]
pub struct PeerSockets {
    slots: Vec<Option<(UdpSocket, Instant)>>,
    by_endpoint: BTreeMap<SocketAddr, usize>,
    /// Endpoints whose socket is bound to this local port rather than the
    /// main socket's (see the module docs).
    source_ports: BTreeMap<SocketAddr, u16>,
    /// Some socket was marked stale since the last [`PeerSockets::refresh`].
    any_stale: AtomicBool,
}

/// What [`PeerSockets::sync`] and [`PeerSockets::refresh`] changed.
#[derive(Debug, Default)]
pub struct PeerSocketChanges {
    /// Slots of new sockets.
    pub added: Vec<usize>,
    /// Sockets closed; datagrams still queued on them are lost when they
    /// are dropped.
    pub removed: Vec<UdpSocket>,
}

impl PeerSockets {
    /// The socket connected to `endpoint`.
    pub fn get(&self, endpoint: SocketAddr) -> Option<&UdpSocket> {
        let slot = *self.by_endpoint.get(&endpoint)?;
        self.slot(slot)
    }

    /// Marks the socket connected to `endpoint`, if there is one, for
    /// [`PeerSockets::refresh`].
    pub fn mark_stale(&self, endpoint: SocketAddr) {
        if let Some(sock) = self.get(endpoint) {
            sock.stale.store(true, Ordering::Relaxed);
            self.any_stale.store(true, Ordering::Relaxed);
        }
    }

    pub fn slot(&self, slot: usize) -> Option<&UdpSocket> {
        self.slots.get(slot)?.as_ref().map(|(sock, _)| sock)
    }

    pub fn len(&self) -> usize {
        self.by_endpoint.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_endpoint.is_empty()
    }

    /// Datagrams to `endpoint` leave from local port `port` (`None`: the
    /// main socket's) once [`PeerSockets::sync`] next lists the endpoint;
    /// a socket it has on another port is closed now.
    pub fn set_source_port(
        &mut self,
        endpoint: SocketAddr,
        port: Option<u16>,
    ) -> PeerSocketChanges {
        let endpoint = canonical(endpoint);
        let mut changes = PeerSocketChanges::default();
        let before = match port {
            Some(p) => self.source_ports.insert(endpoint, p),
            None => self.source_ports.remove(&endpoint),
        };
        if before != port {
            if let Some(&slot) = self.by_endpoint.get(&endpoint) {
                changes.removed.extend(self.close(slot));
            }
        }
        changes
    }

    /// Closes the socket in `slot`; its endpoint falls back to the main
    /// socket.
    pub fn close(&mut self, slot: usize) -> Option<UdpSocket> {
        let (sock, _) = self.slots.get_mut(slot).and_then(Option::take)?;
        if let Some(endpoint) = sock.peer {
            self.by_endpoint.remove(&endpoint);
        }
        Some(sock)
    }

    /// Closes every socket (the main socket's port or mark changed: they
    /// must follow).
    pub fn close_all(&mut self) -> PeerSocketChanges {
        let removed = (0..self.slots.len())
            .filter_map(|slot| self.close(slot))
            .collect();
        PeerSocketChanges {
            added: Vec::new(),
            removed,
        }
    }

    /// Keeps a socket for exactly the endpoints given (up to
    /// [`MAX_PEER_SOCKETS`]), connecting new ones next to `main`. An endpoint
    /// whose socket cannot be made is left to the main socket.
    pub fn sync(
        &mut self,
        main: &UdpSocket,
        endpoints: impl IntoIterator<Item = SocketAddr>,
        now: Instant,
    ) -> PeerSocketChanges {
        // Endpoints with their own source port first: without their socket
        // they cannot be reached at all, the others only lose some speed.
        let mut all: Vec<SocketAddr> = endpoints.into_iter().map(canonical).collect();
        all.sort_by_key(|e| !self.source_ports.contains_key(e));
        let wanted: std::collections::BTreeSet<SocketAddr> =
            all.into_iter().take(MAX_PEER_SOCKETS).collect();
        let mut changes = PeerSocketChanges::default();
        let unwanted: Vec<usize> = self
            .by_endpoint
            .iter()
            .filter(|(e, _)| !wanted.contains(e))
            .map(|(_, &slot)| slot)
            .collect();
        for slot in unwanted {
            changes.removed.extend(self.close(slot));
        }
        for endpoint in wanted {
            if !self.by_endpoint.contains_key(&endpoint) {
                self.open(main, endpoint, now, &mut changes);
            }
        }
        changes
    }

    /// Replaces every peer socket marked stale that is old enough (see
    /// [`PEER_SOCKET_MIN_AGE`]); younger ones are unmarked. Without a mark
    /// since the last call it returns at once, so it can be called often.
    pub fn refresh(&mut self, main: &UdpSocket, now: Instant) -> PeerSocketChanges {
        let mut changes = PeerSocketChanges::default();
        if !std::mem::take(self.any_stale.get_mut()) {
            return changes;
        }
        let mut stale = Vec::new();
        for (slot, entry) in self.slots.iter().enumerate() {
            let Some((sock, created)) = entry else {
                continue;
            };
            if sock.stale.swap(false, Ordering::Relaxed)
                && now.saturating_duration_since(*created) >= PEER_SOCKET_MIN_AGE
            {
                stale.push(slot);
            }
        }
        for slot in stale {
            let Some(sock) = self.close(slot) else {
                continue;
            };
            if let Some(endpoint) = sock.peer {
                tracing::debug!(%endpoint, "replacing a stale peer socket");
                changes.removed.push(sock);
                self.open(main, endpoint, now, &mut changes);
            }
        }
        changes
    }

    fn open(
        &mut self,
        main: &UdpSocket,
        endpoint: SocketAddr,
        now: Instant,
        changes: &mut PeerSocketChanges,
    ) {
        let port = self
            .source_ports
            .get(&endpoint)
            .copied()
            .unwrap_or(main.local.port());
        match main.connect_peer_on(endpoint, port) {
            Ok(sock) => {
                let slot = match self.slots.iter().position(Option::is_none) {
                    Some(free) => free,
                    None => {
                        self.slots.push(None);
                        self.slots.len() - 1
                    }
                };
                self.slots[slot] = Some((sock, now));
                self.by_endpoint.insert(endpoint, slot);
                changes.added.push(slot);
            }
            Err(e) => {
                tracing::debug!(%endpoint, error = %e, "no peer socket, using the main one");
            }
        }
    }
}

fn set_mark(fd: impl AsFd, mark: u32) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt as nso};
    setsockopt(&fd, nso::Mark, &mark).map_err(io::Error::from)
}

/// Asks for `bytes` of socket buffer in each direction. As root the
/// `*BUFFORCE` options go past `net.core.{r,w}mem_max`; otherwise the kernel
/// caps the request at those limits. Failure only costs throughput, so it is
/// logged, not returned.
fn set_buffer_sizes(sock: &std::net::UdpSocket, bytes: usize) {
    if sockopt::set_socket_send_buffer_size_force(sock, bytes).is_err() {
        if let Err(e) = sockopt::set_socket_send_buffer_size(sock, bytes) {
            tracing::warn!(error = %e, "cannot set UDP send buffer size");
        }
    }
    if sockopt::set_socket_recv_buffer_size_force(sock, bytes).is_err() {
        if let Err(e) = sockopt::set_socket_recv_buffer_size(sock, bytes) {
            tracing::warn!(error = %e, "cannot set UDP receive buffer size");
        }
    }
}

/// IPv4 peers on a dual-stack socket show up as `::ffff:a.b.c.d`.
/// The length of a message `recvmsg` received, and the size of the datagrams
/// it coalesces.
fn sizes<S>(msg: &RecvMsg<'_, '_, S>) -> io::Result<(usize, usize)> {
    if msg.flags.contains(MsgFlags::MSG_TRUNC) {
        return Err(io::Error::other("datagram larger than the receive buffer"));
    }
    let mut stride = msg.bytes;
    // Truncated control data could have hidden the segment size.
    let cmsgs = msg
        .cmsgs()
        .map_err(|_| io::Error::other("control messages truncated"))?;
    for cmsg in cmsgs {
        if let ControlMessageOwned::UdpGroSegments(size) = cmsg {
            stride = usize::try_from(size).unwrap_or(0);
        }
    }
    Ok((msg.bytes, stride))
}

/// A received datagram's sender as a standard address.
fn std_addr(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    addr.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6((*v6).into()))
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

#[derive(Debug, Clone, Copy)]
struct Message {
    dest: SocketAddr,
    start: usize,
    /// Bytes in all segments.
    len: usize,
    /// Size of every segment but possibly the last.
    segment: usize,
    count: usize,
    /// The last segment was shorter than `segment`: nothing more may join.
    closed: bool,
}

/// Datagrams waiting to be sent, grouped into GSO messages as they arrive.
#[derive(Debug)]
pub struct UdpSendBatch {
    buf: Box<[u8]>,
    used: usize,
    msgs: Vec<Message>,
    datagrams: usize,
}

impl Default for UdpSendBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl UdpSendBatch {
    pub fn new() -> Self {
        UdpSendBatch {
            buf: vec![0; SEND_BATCH_BYTES].into_boxed_slice(),
            used: 0,
            msgs: Vec::with_capacity(SEND_BATCH_MESSAGES),
            datagrams: 0,
        }
    }

    /// Datagrams in the batch.
    pub fn len(&self) -> usize {
        self.datagrams
    }

    pub fn is_empty(&self) -> bool {
        self.datagrams == 0
    }

    /// GSO messages the batch groups its datagrams into.
    pub fn messages(&self) -> usize {
        self.msgs.len()
    }

    pub fn clear(&mut self) {
        self.used = 0;
        self.msgs.clear();
        self.datagrams = 0;
    }

    /// Whether a datagram of up to `max_len` bytes fits.
    pub fn has_room(&self, max_len: usize) -> bool {
        self.used + max_len.min(MAX_GSO_BYTES) <= self.buf.len()
            && self.msgs.len() < SEND_BATCH_MESSAGES
    }

    /// Every datagram in the batch with its destination, in order.
    pub fn datagrams(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> + '_ {
        self.msgs.iter().flat_map(|m| {
            self.buf[m.start..m.start + m.len]
                .chunks(m.segment.max(1))
                .map(move |d| (m.dest, d))
        })
    }

    /// Appends a datagram for `dest` by letting `fill` write at most `max_len`
    /// bytes of it into the batch (for example encrypting straight into it).
    /// `fill` returns the length; 0 means "no datagram". Returns false, without
    /// calling `fill`, when the batch lacks room: send it, then push again.
    pub fn push_with(
        &mut self,
        dest: SocketAddr,
        max_len: usize,
        fill: impl FnOnce(&mut [u8]) -> usize,
    ) -> bool {
        if !self.has_room(max_len) {
            return false;
        }
        let max_len = max_len.min(MAX_GSO_BYTES);
        let start = self.used;
        let n = fill(&mut self.buf[start..start + max_len]).min(max_len);
        if n == 0 {
            return true;
        }
        self.used += n;
        self.datagrams += 1;
        if let Some(last) = self.msgs.last_mut() {
            let joins = last.dest == dest
                && !last.closed
                && n <= last.segment
                && last.count < MAX_GSO_SEGMENTS
                && last.len + n <= MAX_GSO_BYTES
                && last.start + last.len == start;
            if joins {
                last.len += n;
                last.count += 1;
                last.closed = n < last.segment;
                return true;
            }
        }
        self.msgs.push(Message {
            dest,
            start,
            len: n,
            segment: n,
            count: 1,
            closed: false,
        });
        true
    }

    /// Appends a copy of `datagram`; false when the batch lacks room (or the
    /// datagram is empty or larger than a UDP payload can be).
    pub fn push(&mut self, dest: SocketAddr, datagram: &[u8]) -> bool {
        if datagram.is_empty() || datagram.len() > MAX_GSO_BYTES {
            return false;
        }
        self.push_with(dest, datagram.len(), |buf| {
            buf[..datagram.len()].copy_from_slice(datagram);
            datagram.len()
        })
    }
}

/// Received datagrams: up to 32 messages of up to 64 KiB each.
#[derive(Debug)]
pub struct UdpRecvBatch {
    bufs: Box<[u8]>,
    meta: [RecvMeta; RECV_MESSAGES],
    count: usize,
    /// Control-message space for [`UdpSocket::recv_one`]: the GRO segment
    /// size, with room to spare for messages the socket should not send.
    control: Vec<u8>,
}

impl Default for UdpRecvBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl UdpRecvBatch {
    pub fn new() -> Self {
        UdpRecvBatch {
            bufs: vec![0; RECV_MESSAGES * RECV_BUF].into_boxed_slice(),
            meta: [RecvMeta::default(); RECV_MESSAGES],
            count: 0,
            control: nix::cmsg_space!(
                nix::libc::c_int,
                nix::libc::in6_pktinfo,
                nix::libc::timespec,
                nix::libc::c_int
            ),
        }
    }

    /// Messages received by the last `recv_batch` (each may hold many datagrams).
    pub fn messages(&self) -> usize {
        self.count
    }

    /// The most messages one `recv_batch` returns. Fewer means the socket's
    /// queue was empty when the kernel looked for the next one.
    pub fn capacity(&self) -> usize {
        RECV_MESSAGES
    }

    /// Every datagram received, in order, with its sender; coalesced messages
    /// are split at their segment boundaries.
    pub fn iter(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> + '_ {
        self.meta[..self.count]
            .iter()
            .zip(self.bufs.chunks(RECV_BUF))
            .flat_map(|(meta, buf)| {
                let data = &buf[..meta.len.min(buf.len())];
                // A stride of 0 never comes from the kernel; treat it as "one datagram".
                let stride = if meta.stride == 0 {
                    data.len().max(1)
                } else {
                    meta.stride
                };
                data.chunks(stride).map(move |d| (meta.addr, d))
            })
    }
}

/// UDP receive errors counted by the kernel for the calling thread's network
/// namespace, IPv4 and IPv6 together.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UdpDropCounters {
    /// Datagrams dropped because a socket receive buffer was full.
    pub rcvbuf_errors: u64,
    /// All datagrams that could not be delivered (includes `rcvbuf_errors`).
    pub in_errors: u64,
}

/// Reads [`UdpDropCounters`] from `/proc/thread-self/net/snmp` and `snmp6`
/// (thread-self, because a thread may have entered another namespace).
pub fn udp_drop_counters() -> io::Result<UdpDropCounters> {
    let v4 = std::fs::read_to_string("/proc/thread-self/net/snmp")?;
    let mut counters = parse_snmp(&v4).ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidData, "no Udp lines in /proc/net/snmp")
    })?;
    // IPv6 may be disabled, and with it snmp6.
    if let Ok(v6) = std::fs::read_to_string("/proc/thread-self/net/snmp6") {
        let six = parse_snmp6(&v6);
        counters.rcvbuf_errors += six.rcvbuf_errors;
        counters.in_errors += six.in_errors;
    }
    Ok(counters)
}

/// `/proc/net/snmp` has a header line and a value line per protocol:
/// `Udp: InDatagrams NoPorts InErrors …` then `Udp: 1 0 3 …`.
fn parse_snmp(text: &str) -> Option<UdpDropCounters> {
    let mut lines = text.lines().filter(|l| l.starts_with("Udp: "));
    let names: Vec<&str> = lines.next()?.split_whitespace().collect();
    let values: Vec<&str> = lines.next()?.split_whitespace().collect();
    let field = |name: &str| -> u64 {
        names
            .iter()
            .position(|n| *n == name)
            .and_then(|i| values.get(i))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Some(UdpDropCounters {
        rcvbuf_errors: field("RcvbufErrors"),
        in_errors: field("InErrors"),
    })
}

/// `/proc/net/snmp6` has one `Name value` pair per line.
fn parse_snmp6(text: &str) -> UdpDropCounters {
    let mut counters = UdpDropCounters::default();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let (Some(name), Some(value)) = (parts.next(), parts.next()) else {
            continue;
        };
        let value = value.parse().unwrap_or(0);
        match name {
            "Udp6RcvbufErrors" => counters.rcvbuf_errors = value,
            "Udp6InErrors" => counters.in_errors = value,
            _ => {}
        }
    }
    counters
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn shape(batch: &UdpSendBatch) -> Vec<(SocketAddr, usize, usize, usize)> {
        batch
            .msgs
            .iter()
            .map(|m| (m.dest, m.segment, m.count, m.len))
            .collect()
    }

    #[test]
    fn send_batch_groups_runs_into_gso_messages() {
        let a = addr("10.0.0.1:51820");
        let b = addr("[fd00::2]:51820");
        let mut batch = UdpSendBatch::new();
        for len in [1000, 1000, 1000, 300, 1000] {
            assert!(batch.push(a, &vec![1; len]));
        }
        assert!(batch.push(b, &[2; 1000]));
        assert!(batch.push(b, &[2; 1200]));
        assert!(batch.push(a, &[3; 1200]));
        assert_eq!(
            shape(&batch),
            vec![
                // The short datagram closes the run.
                (a, 1000, 4, 3300),
                (a, 1000, 1, 1000),
                (b, 1000, 1, 1000),
                // A longer datagram cannot join a run of shorter ones.
                (b, 1200, 1, 1200),
                (a, 1200, 1, 1200),
            ]
        );
        assert_eq!(batch.len(), 8);
        let lens: Vec<(SocketAddr, usize)> = batch.datagrams().map(|(d, p)| (d, p.len())).collect();
        assert_eq!(
            lens,
            [
                (a, 1000),
                (a, 1000),
                (a, 1000),
                (a, 300),
                (a, 1000),
                (b, 1000),
                (b, 1200),
                (a, 1200)
            ]
        );
        batch.clear();
        assert!(batch.is_empty());
        assert_eq!(batch.messages(), 0);
    }

    #[test]
    fn send_batch_respects_gso_limits_and_capacity() {
        let a = addr("10.0.0.1:1");
        let mut batch = UdpSendBatch::new();
        for _ in 0..70 {
            assert!(batch.push(a, &[0; 100]));
        }
        // 64 segments per message at most.
        assert_eq!(shape(&batch), vec![(a, 100, 64, 6400), (a, 100, 6, 600)]);
        batch.clear();
        for _ in 0..50 {
            assert!(batch.push(a, &[0; 1452]));
        }
        // 65507 bytes per message at most: 45 × 1452 = 65340.
        assert_eq!(shape(&batch)[0], (a, 1452, 45, 65340));
        batch.clear();
        let mut pushed = 0;
        while batch.push(a, &[0; 9000]) {
            pushed += 1;
        }
        assert_eq!(pushed, SEND_BATCH_BYTES / 9000);
        assert!(!batch.push(a, &[]));
        assert!(batch.push_with(a, 10, |_| 0));
    }

    #[test]
    fn addresses_are_unmapped() {
        assert_eq!(canonical(addr("[::ffff:10.1.2.3]:9")), addr("10.1.2.3:9"));
        assert_eq!(canonical(addr("[fd00::1]:9")), addr("[fd00::1]:9"));
        assert_eq!(canonical(addr("10.1.2.3:9")), addr("10.1.2.3:9"));
    }

    #[test]
    fn snmp_parsing() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
            Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
            Udp: 100 2 7 90 5 0\n\
            UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
            UdpLite: 0 0 99 0 99 0\n";
        assert_eq!(
            parse_snmp(snmp),
            Some(UdpDropCounters {
                rcvbuf_errors: 5,
                in_errors: 7
            })
        );
        assert_eq!(parse_snmp("Ip: 1\n"), None);
        assert_eq!(
            parse_snmp("Udp: InErrors\nUdp: x\n"),
            Some(UdpDropCounters::default())
        );
        let snmp6 = "Udp6InDatagrams 4\nUdp6InErrors 3\nUdp6RcvbufErrors 1\ngarbage\n";
        assert_eq!(
            parse_snmp6(snmp6),
            UdpDropCounters {
                rcvbuf_errors: 1,
                in_errors: 3
            }
        );
    }
}
