//! What `meshd wg show` prints: the layout of `wg show`, plus meshd's packet
//! and drop counters, which `wg` has no place for.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use super::uapi::Status;

/// The status of interface `name` as `wg show` lays it out (without
/// colours), at time `now`: the interface block, then one block per peer,
/// most recent handshake first. The private key is never shown.
pub fn format(name: &str, status: &Status, now: SystemTime) -> String {
    let mut out = String::new();
    let c = &status.counters;
    let n = &c.node;
    let _ = writeln!(out, "interface: {name}");
    if let Some(key) = &status.private_key {
        let _ = writeln!(out, "  public key: {}", key.public_key());
        let _ = writeln!(out, "  private key: (hidden)");
    }
    if status.listen_port != 0 {
        let _ = writeln!(out, "  listening port: {}", status.listen_port);
    }
    if status.fwmark != 0 {
        let _ = writeln!(out, "  fwmark: 0x{:x}", status.fwmark);
    }
    let _ = writeln!(
        out,
        "  packets: {} received, {} sent, {} cookie replies sent",
        n.rx_packets, n.tx_packets, n.cookies_sent
    );
    let _ = writeln!(
        out,
        "  dropped: {} invalid datagrams, {} from unknown peers, {} spoofed sources, \
         {} without route, {} without endpoint, {} bad inner packets, {} send failures, \
         {} receive errors, {} TUN errors",
        // Without NAT traversal, a datagram that is not WireGuard is invalid.
        n.bad_datagram + c.other_dropped,
        n.unknown_peer,
        n.spoofed,
        n.no_route,
        n.no_endpoint,
        n.bad_inner,
        c.udp_send_dropped + c.relay_send_dropped,
        c.udp_recv_errors,
        c.tun_read_errors + c.tun_write_errors,
    );
    let age = |t: Option<SystemTime>| t.map(|t| now.duration_since(t).unwrap_or(Duration::ZERO));
    let mut peers: Vec<_> = status.peers.iter().collect();
    // As wg: most recent handshake first, peers that never had one last.
    peers.sort_by_key(|p| age(p.last_handshake).unwrap_or(Duration::MAX));
    for p in peers {
        let config = &p.config;
        let _ = writeln!(out, "\npeer: {}", config.public_key);
        if config.preshared_key.is_some() {
            let _ = writeln!(out, "  preshared key: (hidden)");
        }
        if let Some(e) = config.endpoint {
            let _ = writeln!(out, "  endpoint: {e}");
        }
        let ips = if config.allowed_ips.is_empty() {
            "(none)".to_owned()
        } else {
            config
                .allowed_ips
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(out, "  allowed ips: {ips}");
        if let Some(h) = age(p.last_handshake) {
            let _ = writeln!(out, "  latest handshake: {}", ago(h));
        }
        if p.rx_bytes != 0 || p.tx_bytes != 0 {
            let _ = writeln!(
                out,
                "  transfer: {} received, {} sent",
                bytes(p.rx_bytes),
                bytes(p.tx_bytes)
            );
        }
        if let Some(k) = config.persistent_keepalive {
            let _ = writeln!(
                out,
                "  persistent keepalive: every {}",
                duration(u64::from(k))
            );
        }
    }
    out
}

/// `wg`'s "1 minute, 5 seconds ago", and "Now" within the current second.
fn ago(d: Duration) -> String {
    match d.as_secs() {
        0 => "Now".to_owned(),
        s => format!("{} ago", duration(s)),
    }
}

/// `wg`'s pretty_time: years, days, hours, minutes and seconds, the zero
/// ones left out.
fn duration(mut secs: u64) -> String {
    let mut parts = Vec::new();
    for (unit, size) in [
        ("year", 365 * 24 * 3600),
        ("day", 24 * 3600),
        ("hour", 3600),
        ("minute", 60),
        ("second", 1),
    ] {
        let count = secs / size;
        secs %= size;
        if count > 0 {
            let plural = if count == 1 { "" } else { "s" };
            parts.push(format!("{count} {unit}{plural}"));
        }
    }
    parts.join(", ")
}

/// `wg`'s byte counts: B below 1 KiB, else two decimals of KiB, MiB, GiB or
/// TiB.
fn bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut value = b as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.2} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Counters, EngineCounters};
    use crate::keys::{PresharedKey, PrivateKey, PublicKey};
    use crate::peers::PeerConfig;
    use crate::standalone::uapi::PeerState;

    #[test]
    fn units() {
        for (b, want) in [
            (0, "0 B"),
            (1023, "1023 B"),
            (1024, "1.00 KiB"),
            (1536, "1.50 KiB"),
            (5 << 20, "5.00 MiB"),
            (3 << 30, "3.00 GiB"),
            (2 << 40, "2.00 TiB"),
            (4096 << 40, "4096.00 TiB"),
        ] {
            assert_eq!(bytes(b), want);
        }
        for (s, want) in [
            (1, "1 second"),
            (65, "1 minute, 5 seconds"),
            (3600, "1 hour"),
            (2 * 86400 + 7200 + 1, "2 days, 2 hours, 1 second"),
            (366 * 86400, "1 year, 1 day"),
        ] {
            assert_eq!(duration(s), want);
        }
        assert_eq!(ago(Duration::from_millis(999)), "Now");
        assert_eq!(ago(Duration::from_millis(5400)), "5 seconds ago");
    }

    #[test]
    fn layout_follows_wg_show() {
        let key = |n| PublicKey::from_bytes([n; 32]);
        let private = PrivateKey::from_bytes([7; 32]);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let peer = |n, endpoint: Option<&str>, ips: &[&str]| PeerConfig {
            public_key: key(n),
            preshared_key: None,
            allowed_ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            endpoint: endpoint.map(|e| e.parse().unwrap()),
            persistent_keepalive: None,
        };
        let status = Status {
            private_key: Some(private.clone()),
            listen_port: 51820,
            fwmark: 0xca6c,
            peers: vec![
                PeerState {
                    config: peer(1, None, &[]),
                    last_handshake: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                },
                PeerState {
                    config: PeerConfig {
                        preshared_key: Some(PresharedKey::from_bytes([3; 32])),
                        persistent_keepalive: Some(25),
                        ..peer(
                            2,
                            Some("198.18.0.2:51820"),
                            &["100.64.0.2/32", "fd00::2/128"],
                        )
                    },
                    last_handshake: Some(now - Duration::from_secs(65)),
                    rx_bytes: 100,
                    tx_bytes: 2048,
                },
            ],
            counters: EngineCounters {
                node: Counters {
                    rx_packets: 5,
                    tx_packets: 6,
                    bad_datagram: 3,
                    unknown_peer: 1,
                    ..Counters::default()
                },
                tun_write_errors: 1,
                tun_read_errors: 1,
                ..EngineCounters::default()
            },
        };
        let want = format!(
            "interface: wg0
  public key: {pk}
  private key: (hidden)
  listening port: 51820
  fwmark: 0xca6c
  packets: 5 received, 6 sent, 0 cookie replies sent
  dropped: 3 invalid datagrams, 1 from unknown peers, 0 spoofed sources, 0 without route, \
0 without endpoint, 0 bad inner packets, 0 send failures, 0 receive errors, 2 TUN errors

peer: {k2}
  preshared key: (hidden)
  endpoint: 198.18.0.2:51820
  allowed ips: 100.64.0.2/32, fd00::2/128
  latest handshake: 1 minute, 5 seconds ago
  transfer: 100 B received, 2.00 KiB sent
  persistent keepalive: every 25 seconds

peer: {k1}
  allowed ips: (none)
",
            pk = private.public_key(),
            k2 = key(2),
            k1 = key(1)
        );
        assert_eq!(format("wg0", &status, now), want);
    }
}
