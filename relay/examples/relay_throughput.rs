//! Relayed throughput on loopback: one relay, one sender, one receiver, per
//! transport and datagram size, for a few seconds each. A sanity check of
//! the relay's data path, not a benchmark of a network.
//!
//!     cargo run --release -p meshd-relay --example relay_throughput [SECONDS]
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use meshd_relay::client::{ClientOptions, Event, RelayClient, SendError, TransportChoice};
use meshd_relay::{Members, RelayConfig, RelayServer, Role};
use rand::RngCore;
use x25519_dalek::{PublicKey, StaticSecret};

fn secret() -> StaticSecret {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    StaticSecret::from(b)
}

#[tokio::main]
async fn main() {
    let secs: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let dir = tempfile::tempdir().unwrap();
    let members = Members::new();
    let mut config = RelayConfig::new(dir.path());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.stun_listen = None;
    let relay = RelayServer::start(config, members.clone()).await.unwrap();
    println!("transport  datagram  Mbit/s  packets/s  sender drops  relay drops");
    for transport in [TransportChoice::Tls, TransportChoice::Quic] {
        for size in [1200usize, 1452] {
            let (sa, sb) = (secret(), secret());
            members.insert(PublicKey::from(&sa), Role::Node);
            members.insert(PublicKey::from(&sb), Role::Node);
            let mut opts = ClientOptions::new(relay.addr().to_string(), relay.pin());
            opts.transport = transport;
            let a = RelayClient::connect(&opts, &sa).await.unwrap();
            let mut b = RelayClient::connect(&opts, &sb).await.unwrap();
            let before = relay.counters().drops.queue_full;
            let dst = PublicKey::from(&sb);
            let datagram = vec![0x5a; size];
            let stop = Instant::now() + Duration::from_secs(secs);
            let sender = a.sender();
            let send = tokio::spawn(async move {
                while Instant::now() < stop {
                    // A burst, then a yield: the queue absorbs it, and a full
                    // queue means the writer needs the turn.
                    for _ in 0..64 {
                        if let Err(SendError::QueueFull) = sender.send(&dst, &datagram) {
                            break;
                        }
                    }
                    tokio::task::yield_now().await;
                }
            });
            let start = Instant::now();
            let (mut packets, mut bytes) = (0u64, 0u64);
            while let Ok(Ok(Event::Packet { datagram, .. })) =
                tokio::time::timeout(Duration::from_millis(500), b.recv()).await
            {
                packets += 1;
                bytes += datagram.len() as u64;
            }
            let elapsed = start.elapsed().as_secs_f64() - 0.5;
            send.await.unwrap();
            println!(
                "{:<9}  {:>8}  {:>6.0}  {:>9.0}  {:>12}  {:>11}",
                a.transport().to_string(),
                size,
                bytes as f64 * 8.0 / elapsed / 1e6,
                packets as f64 / elapsed,
                a.counters().send_dropped,
                relay.counters().drops.queue_full - before,
            );
            a.close().await;
            b.close().await;
        }
    }
}
