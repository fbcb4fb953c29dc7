//! Aggregate relayed throughput: one relay and PAIRS sender → receiver pairs of clients, all
//! sending at once, in one process on loopback. The relay runs on a tokio runtime of its own
//! whose threads are named `relay-srv`, so its CPU time is read apart from the load
//! generator's (/proc/self/task/*/stat). Every sender floods (bursts of 64 datagrams, a yield),
//! so the relay's outboxes overflow and drop (counted): the figure is what arrives.
//!
//!     cargo run --release -p meshd-relay --example relay_aggregate [PAIRS] [SECONDS] [tls|quic] [BYTES]
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshd_relay::client::{ClientOptions, Event, RelayClient, SendError, TransportChoice};
use meshd_relay::{Members, RelayConfig, RelayServer, Role};
use rand::RngCore;
use x25519_dalek::{PublicKey, StaticSecret};

const RELAY_THREAD: &str = "relay-srv";

fn secret() -> StaticSecret {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    StaticSecret::from(b)
}

/// utime + stime ticks of this process's threads named [`RELAY_THREAD`].
fn relay_ticks() -> u64 {
    let mut ticks = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if !stat[open + 1..close].starts_with(RELAY_THREAD) {
            continue;
        }
        let mut f = stat[close + 1..].split_whitespace().skip(11);
        let utime: u64 = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        let stime: u64 = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        ticks += utime + stime;
    }
    ticks
}

fn main() {
    let arg = |i: usize| std::env::args().nth(i);
    let pairs: usize = arg(1).and_then(|s| s.parse().ok()).unwrap_or(50);
    let secs: u64 = arg(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    let transport = match arg(3).as_deref() {
        Some("quic") => TransportChoice::Quic,
        _ => TransportChoice::Tls,
    };
    // A full-size WireGuard packet of meshd's default 1280-byte MTU.
    let size: usize = arg(4).and_then(|s| s.parse().ok()).unwrap_or(1312);

    let relay_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(RELAY_THREAD)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let members = Members::new();
    let mut config = RelayConfig::new(dir.path());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.stun_listen = None;
    let relay = relay_rt
        .block_on(RelayServer::start(config, members.clone()))
        .unwrap();

    let load_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    load_rt.block_on(async {
        let mut opts = ClientOptions::new(relay.addr().to_string(), relay.pin());
        opts.transport = transport;
        let mut senders = Vec::new();
        let mut receivers = Vec::new();
        for _ in 0..pairs {
            let (sa, sb) = (secret(), secret());
            members.insert(PublicKey::from(&sa), Role::Node);
            members.insert(PublicKey::from(&sb), Role::Node);
            let a = RelayClient::connect(&opts, &sa).await.unwrap();
            let b = RelayClient::connect(&opts, &sb).await.unwrap();
            senders.push((a, PublicKey::from(&sb)));
            receivers.push(b);
        }
        let transport_name = senders[0].0.transport().to_string();
        let bytes = Arc::new(AtomicU64::new(0));
        let counting = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut rx_tasks = Vec::new();
        for mut b in receivers {
            let (bytes, counting) = (bytes.clone(), counting.clone());
            rx_tasks.push(tokio::spawn(async move {
                while let Ok(Ok(Event::Packet { datagram, .. })) =
                    tokio::time::timeout(Duration::from_millis(500), b.recv()).await
                {
                    if counting.load(Ordering::Relaxed) {
                        bytes.fetch_add(datagram.len() as u64, Ordering::Relaxed);
                    }
                }
                b
            }));
        }
        // One second of warm-up, then `secs` measured.
        let stop = Instant::now() + Duration::from_secs(secs + 1);
        let mut tx_tasks = Vec::new();
        for (a, dst) in &senders {
            let sender = a.sender();
            let dst = *dst;
            let datagram = vec![0x5a; size];
            tx_tasks.push(tokio::spawn(async move {
                while Instant::now() < stop {
                    for _ in 0..64 {
                        if let Err(SendError::QueueFull) = sender.send(&dst, &datagram) {
                            break;
                        }
                    }
                    tokio::task::yield_now().await;
                }
            }));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let drops_before = relay.counters().drops.queue_full;
        let ticks_before = relay_ticks();
        counting.store(true, Ordering::Relaxed);
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs(secs)).await;
        counting.store(false, Ordering::Relaxed);
        let elapsed = start.elapsed().as_secs_f64();
        let ticks = relay_ticks() - ticks_before;
        let drops = relay.counters().drops.queue_full - drops_before;
        let got = bytes.load(Ordering::Relaxed) as f64;
        let hz = rustix::param::clock_ticks_per_second() as f64;
        let relay_cpu = ticks as f64 / hz;
        println!(
            "pairs {pairs}  transport {transport_name}  datagram {size} B  received {:.2} Gbit/s  \
             relay CPU {:.2} s of {:.1} s ({:.2} s per GB)  relay queue-full drops {drops}",
            got * 8.0 / elapsed / 1e9,
            relay_cpu,
            elapsed,
            relay_cpu / (got / 1e9),
        );
        for t in tx_tasks {
            t.await.unwrap();
        }
        for t in rx_tasks {
            t.await.unwrap().close().await;
        }
        for (a, _) in senders {
            a.close().await;
        }
    });
    drop(relay);
}
