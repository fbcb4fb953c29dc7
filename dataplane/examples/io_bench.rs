//! Microbenchmark of the data plane's operating-system I/O (run as root; not a
//! CI timing test). Everything runs in throwaway network namespaces.
//!
//! `io_bench tun [SECONDS]`: a single-threaded forwarder joins two TUN devices
//! in two namespaces (`Tun::recv_batch` on one, `Tun::send_batch` on the
//! other, both directions) while one TCP stream runs across; with offload on
//! and off. This is the engine's TUN path without the crypto.
//!
//! `io_bench engine [SECONDS]`: two engines (one thread each) in two
//! namespaces joined by a veth pair, one TCP stream through the tunnel; with
//! TUN offload on and off. This is the data plane end to end.
//!
//! `io_bench udp [SECONDS]`: 1452-byte datagrams (a 1420-byte inner packet
//! plus WireGuard's 32 bytes) sent as fast as possible into a veth whose peer
//! is down (a sink): one `send_to` per datagram, `sendmmsg` of 64, and our GSO
//! `send_batch`. Caveat: veth takes GSO packets whole, so the GSO figure
//! leaves out the segmentation that a NIC (in hardware) or the kernel (just
//! before a driver without USO) would do; between the lab's namespaces, over
//! veth, that cost is indeed never paid.

// The output of this tool is its report.
#![allow(clippy::print_stdout)]

use std::error::Error;
use std::io::{IoSlice, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use meshd_dataplane::engine::{Engine, EngineConfig};
use meshd_dataplane::keys::PrivateKey;
use meshd_dataplane::peers::PeerConfig;
use meshd_dataplane::tun::{configure, Tun, TunBatch};
use meshd_dataplane::udp::{UdpSendBatch, UdpSocket};
use rustix::event::{PollFd, PollFlags, Timespec};

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

struct NetNs(String);

impl NetNs {
    fn new(tag: &str) -> Result<Self> {
        let name = format!("mbench-{}-{tag}", std::process::id());
        run(&["ip", "netns", "add", &name])?;
        let ns = NetNs(name);
        run(&["ip", "-n", &ns.0, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Moves the calling thread into the namespace.
    fn enter(&self) -> Result<()> {
        let file = std::fs::File::open(format!("/run/netns/{}", self.0))?;
        rustix::thread::move_into_link_name_space(
            file.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )?;
        Ok(())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    if !out.status.success() {
        return Err(format!("{args:?}: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(())
}

/// Runs `f` on a new thread inside `ns` and waits for it.
fn in_ns<T: Send>(ns: &NetNs, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            ns.enter()?;
            f()
        })
        .join()
        .map_err(|_| "thread panicked")?
    })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let seconds: f64 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(3.0);
    let duration = Duration::from_secs_f64(seconds);
    match args.get(1).map(String::as_str) {
        Some("tun") => {
            for offload in [true, false] {
                bench_tun(offload, duration)?;
            }
        }
        Some("udp") => bench_udp(duration)?,
        Some("engine") => {
            for offload in [true, false] {
                bench_engine(offload, duration)?;
            }
        }
        _ => return Err("usage: io_bench tun|udp|engine [SECONDS]".into()),
    }
    Ok(())
}

fn bench_tun(offload: bool, duration: Duration) -> Result<()> {
    const MTU: u16 = 1420;
    let ns_a = NetNs::new("a")?;
    let ns_b = NetNs::new("b")?;
    let mut tun_a = in_ns(&ns_a, || {
        let t = Tun::create("bench0", MTU, offload)?;
        configure("bench0", &["10.88.0.1/24".parse()?], &[])?;
        Ok(t)
    })?;
    let mut tun_b = in_ns(&ns_b, || {
        let t = Tun::create("bench0", MTU, offload)?;
        configure("bench0", &["10.88.0.2/24".parse()?], &[])?;
        Ok(t)
    })?;
    tun_a.set_nonblocking(true)?;
    tun_b.set_nonblocking(true)?;

    let stop = AtomicBool::new(false);
    let packets = AtomicU64::new(0);
    let reads = AtomicU64::new(0);
    let (bytes, elapsed) = std::thread::scope(|s| -> Result<(u64, Duration)> {
        let forwarder = s.spawn(|| forward(&mut tun_a, &mut tun_b, &stop, &packets, &reads));
        let receiver = s.spawn(|| {
            in_ns(&ns_b, || {
                let listener = TcpListener::bind("10.88.0.2:5201")?;
                let (mut conn, _) = listener.accept()?;
                let mut buf = vec![0; 256 * 1024];
                let mut total = 0u64;
                let start = Instant::now();
                loop {
                    let n = conn.read(&mut buf)?;
                    if n == 0 {
                        return Ok((total, start.elapsed()));
                    }
                    total += n as u64;
                }
            })
        });
        let sender = in_ns(&ns_a, || {
            let addr: SocketAddr = "10.88.0.2:5201".parse()?;
            let mut conn = connect_retrying(addr)?;
            let buf = vec![0x5a; 256 * 1024];
            let start = Instant::now();
            while start.elapsed() < duration {
                conn.write_all(&buf)?;
            }
            conn.shutdown(std::net::Shutdown::Write)?;
            Ok(())
        });
        let received = receiver.join().map_err(|_| "receiver panicked")?;
        stop.store(true, Ordering::Relaxed);
        forwarder.join().map_err(|_| "forwarder panicked")??;
        sender?;
        received
    })?;
    let secs = elapsed.as_secs_f64();
    let pkts = packets.load(Ordering::Relaxed) as f64;
    println!(
        "tun offload={:<5} {:6.2} Gbit/s TCP goodput, {:8.0} packets/s forwarded, {:5.1} packets per read",
        offload,
        bytes as f64 * 8.0 / secs / 1e9,
        pkts / secs,
        pkts / (reads.load(Ordering::Relaxed) as f64).max(1.0),
    );
    Ok(())
}

/// Sends one TCP stream from `from` to `to_addr` (listening in `to`) for
/// `duration`; returns the bytes received and the receiver's elapsed time.
fn tcp_stream(
    from: &NetNs,
    to: &NetNs,
    to_addr: SocketAddr,
    duration: Duration,
) -> Result<(u64, Duration)> {
    std::thread::scope(|s| {
        let (listening, listening_rx) = std::sync::mpsc::channel();
        let receiver = s.spawn(move || {
            in_ns(to, || {
                let listener = TcpListener::bind(to_addr)?;
                listening.send(())?;
                let (mut conn, _) = listener.accept()?;
                let mut buf = vec![0; 256 * 1024];
                let mut total = 0u64;
                let start = Instant::now();
                loop {
                    let n = conn.read(&mut buf)?;
                    if n == 0 {
                        return Ok((total, start.elapsed()));
                    }
                    total += n as u64;
                }
            })
        });
        listening_rx.recv_timeout(Duration::from_secs(5))?;
        in_ns(from, || {
            let mut conn = connect_retrying(to_addr)?;
            let buf = vec![0x5a; 256 * 1024];
            let start = Instant::now();
            while start.elapsed() < duration {
                conn.write_all(&buf)?;
            }
            conn.shutdown(std::net::Shutdown::Write)?;
            Ok(())
        })?;
        receiver.join().map_err(|_| "receiver panicked")?
    })
}

fn bench_engine(offload: bool, duration: Duration) -> Result<()> {
    let ns_a = NetNs::new("ea")?;
    let ns_b = NetNs::new("eb")?;
    run(&[
        "ip", "-n", &ns_a.0, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns",
        &ns_b.0,
    ])?;
    for (ns, dev, addr) in [
        (&ns_a, "va", "192.168.88.1/24"),
        (&ns_b, "vb", "192.168.88.2/24"),
    ] {
        run(&["ip", "-n", &ns.0, "addr", "add", addr, "dev", dev])?;
        run(&["ip", "-n", &ns.0, "link", "set", dev, "up"])?;
    }
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let peer = |key: &PrivateKey, inner: &str, endpoint: &str| -> Result<PeerConfig> {
        Ok(PeerConfig {
            public_key: key.public_key(),
            preshared_key: None,
            allowed_ips: vec![inner.parse()?],
            endpoint: Some(endpoint.parse()?),
            persistent_keepalive: None,
        })
    };
    let sides = [
        (
            &ns_a,
            ka.clone(),
            "10.88.0.1/24",
            peer(&kb, "10.88.0.2/32", "192.168.88.2:51820")?,
        ),
        (
            &ns_b,
            kb,
            "10.88.0.2/24",
            peer(&ka, "10.88.0.1/32", "192.168.88.1:51820")?,
        ),
    ];
    let stop = AtomicBool::new(false);
    let (bytes, elapsed) = std::thread::scope(|s| -> Result<(u64, Duration)> {
        let (ready_tx, ready) = std::sync::mpsc::channel::<()>();
        let mut engines = Vec::new();
        for (ns, key, addr, peer) in &sides {
            let ready_tx = ready_tx.clone();
            let stop = &stop;
            engines.push(s.spawn(move || {
                in_ns(ns, || {
                    let mut engine = Engine::new(EngineConfig {
                        private_key: key.clone(),
                        tun_name: "wg0".into(),
                        mtu: 1420,
                        offload,
                        addresses: vec![addr.parse()?],
                        routes: Vec::new(),
                        listen_port: 51820,
                        fwmark: 0,
                        route_allowed_ips: true,
                        answer_poll: meshd_dataplane::engine::DEFAULT_ANSWER_POLL,
                    })?;
                    engine.set_peers(std::slice::from_ref(peer))?;
                    ready_tx.send(())?;
                    engine.run(stop)?;
                    Ok(engine.counters())
                })
            }));
        }
        for _ in 0..2 {
            ready.recv_timeout(Duration::from_secs(10))?;
        }
        let result = tcp_stream(&ns_a, &ns_b, "10.88.0.2:5201".parse()?, duration);
        let rtt = udp_rtt(&ns_a, &ns_b);
        stop.store(true, Ordering::Relaxed);
        let (tunnel, direct) = rtt?;
        println!(
            "engine offload={:<5} median UDP round trip {:.0} µs through the tunnel, {:.0} µs over the bare veth",
            offload,
            tunnel.as_secs_f64() * 1e6,
            direct.as_secs_f64() * 1e6,
        );
        for e in engines {
            let counters = e.join().map_err(|_| "engine panicked")??;
            if counters.udp_send_dropped > 0 {
                println!("  {counters:?}");
            }
        }
        result
    })?;
    println!(
        "engine offload={:<5} {:6.2} Gbit/s single TCP stream through the tunnel",
        offload,
        bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e9,
    );
    Ok(())
}

/// Median round trip of 64-byte UDP echoes from `from` to `to`, through the
/// tunnel and over the veth underneath, 500 each.
fn udp_rtt(from: &NetNs, to: &NetNs) -> Result<(Duration, Duration)> {
    std::thread::scope(|s| {
        let (bound, bound_rx) = std::sync::mpsc::channel();
        let echo = s.spawn(move || {
            in_ns(to, || {
                let sock = std::net::UdpSocket::bind("0.0.0.0:7777")?;
                sock.set_read_timeout(Some(Duration::from_secs(2)))?;
                bound.send(())?;
                let mut buf = [0u8; 64];
                // Ends when the client stops sending.
                while let Ok((n, peer)) = sock.recv_from(&mut buf) {
                    sock.send_to(&buf[..n], peer)?;
                }
                Ok(())
            })
        });
        bound_rx.recv_timeout(Duration::from_secs(5))?;
        let result = in_ns(from, || {
            let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
            sock.set_read_timeout(Some(Duration::from_secs(1)))?;
            let mut medians = Vec::new();
            for target in ["10.88.0.2:7777", "192.168.88.2:7777"] {
                let mut rtts = Vec::new();
                let mut buf = [0u8; 64];
                for _ in 0..500 {
                    let start = Instant::now();
                    sock.send_to(&[1; 64], target)?;
                    sock.recv_from(&mut buf)?;
                    rtts.push(start.elapsed());
                }
                rtts.sort();
                medians.push(rtts[rtts.len() / 2]);
            }
            Ok((medians[0], medians[1]))
        });
        echo.join().map_err(|_| "echo panicked")??;
        result
    })
}

fn connect_retrying(addr: SocketAddr) -> Result<TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The single-threaded forwarding loop: drain each device into the other,
/// sleep in poll when both are idle.
fn forward(
    a: &mut Tun,
    b: &mut Tun,
    stop: &AtomicBool,
    packets: &AtomicU64,
    reads: &AtomicU64,
) -> Result<()> {
    let mut batch = TunBatch::new();
    let timeout = Timespec::try_from(Duration::from_millis(50))?;
    while !stop.load(Ordering::Relaxed) {
        let moved =
            pump(a, b, &mut batch, packets, reads)? + pump(b, a, &mut batch, packets, reads)?;
        if moved == 0 {
            let mut fds = [
                PollFd::new(&*a, PollFlags::IN),
                PollFd::new(&*b, PollFlags::IN),
            ];
            rustix::event::poll(&mut fds, Some(&timeout))?;
        }
    }
    Ok(())
}

/// Moves what `from` has queued to `to`; returns the packet count.
fn pump(
    from: &mut Tun,
    to: &mut Tun,
    batch: &mut TunBatch,
    packets: &AtomicU64,
    reads: &AtomicU64,
) -> Result<usize> {
    batch.clear();
    let mut moved = 0;
    // Several reads per write, so that coalescing has runs to work on.
    for _ in 0..8 {
        let n = from.recv_batch(batch)?;
        if n == 0 {
            break;
        }
        reads.fetch_add(1, Ordering::Relaxed);
        packets.fetch_add(n as u64, Ordering::Relaxed);
        moved += n;
    }
    if let Err(e) = to.send_batch(batch) {
        eprintln!("write: {e}");
    }
    Ok(moved)
}

fn bench_udp(duration: Duration) -> Result<()> {
    const SIZE: usize = 1452;
    let ns = NetNs::new("u")?;
    in_ns(&ns, || {
        // A veth whose peer stays down drops everything it is given; the
        // static neighbour spares the ARP resolution that would otherwise
        // hold all but a few packets back.
        run(&[
            "ip", "link", "add", "sink0", "type", "veth", "peer", "name", "sink1",
        ])?;
        run(&["ip", "addr", "add", "10.99.0.1/24", "dev", "sink0"])?;
        run(&["ip", "link", "set", "sink0", "up"])?;
        run(&[
            "ip",
            "neigh",
            "replace",
            "10.99.0.2",
            "lladdr",
            "02:00:00:00:00:02",
            "dev",
            "sink0",
            "nud",
            "permanent",
        ])?;
        let dest: SocketAddr = "10.99.0.2:9".parse()?;
        let payload = vec![0xa5; SIZE];
        let report = |name: &str, datagrams: u64, syscalls: u64, elapsed: Duration| {
            let secs = elapsed.as_secs_f64();
            println!(
                "udp {name:<9} {:6.2} Gbit/s, {:8.0} datagrams/s, {:5.1} datagrams per syscall",
                datagrams as f64 * SIZE as f64 * 8.0 / secs / 1e9,
                datagrams as f64 / secs,
                datagrams as f64 / syscalls.max(1) as f64,
            );
        };

        // One sendto per datagram.
        let plain = std::net::UdpSocket::bind("0.0.0.0:0")?;
        let (mut sent, start) = (0u64, Instant::now());
        while start.elapsed() < duration {
            for _ in 0..64 {
                plain.send_to(&payload, dest)?;
            }
            sent += 64;
        }
        report("send_to", sent, sent, start.elapsed());

        // sendmmsg, 64 datagrams per call.
        use nix::sys::socket::{sendmmsg, MsgFlags, MultiHeaders, SockaddrIn};
        let dest_v4 = SockaddrIn::new(10, 99, 0, 2, 9);
        let iovs: Vec<[IoSlice<'_>; 1]> = (0..64).map(|_| [IoSlice::new(&payload)]).collect();
        let addrs = vec![Some(dest_v4); 64];
        let mut headers = MultiHeaders::<SockaddrIn>::preallocate(64, None);
        let (mut sent, mut calls, start) = (0u64, 0u64, Instant::now());
        while start.elapsed() < duration {
            let results = sendmmsg(
                std::os::fd::AsRawFd::as_raw_fd(&plain),
                &mut headers,
                &iovs,
                &addrs,
                [],
                MsgFlags::empty(),
            )?;
            sent += results.count() as u64;
            calls += 1;
        }
        report("sendmmsg", sent, calls, start.elapsed());

        // GSO through our batch: 64 datagrams per batch, grouped by send_batch.
        let sock = UdpSocket::bind("0.0.0.0:0".parse()?)?;
        let mut batch = UdpSendBatch::new();
        let (mut sent, mut calls, start) = (0u64, 0u64, Instant::now());
        while start.elapsed() < duration {
            for _ in 0..64 {
                batch.push(dest, &payload);
            }
            let r = sock.send_batch(&mut batch);
            sent += r.sent as u64;
            calls += r.syscalls as u64;
        }
        report("gso", sent, calls, start.elapsed());
        Ok(())
    })
}
