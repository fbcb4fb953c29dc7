//! WireGuard's cross-platform userspace API (UAPI), the protocol that
//! `wg(8)` speaks to wireguard-go and boringtun over
//! `/var/run/wireguard/NAME.sock`, without I/O: a set operation applied to
//! a [`Device`], and the answer to a get operation. docs/wg-standalone.md
//! describes it (after <https://www.wireguard.com/xplatform/>).
//!
//! A request is `get=1` or `set=1` on its first line, then for `set` its
//! `key=value` lines, then an empty line. Every answer ends with
//! `errno=N` and an empty line: 0, or a negated Linux errno, as wireguard-go
//! writes it. A set operation is applied to a copy of the device and only
//! if all of it is valid, so a bad one changes nothing.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use zeroize::Zeroizing;

use crate::control_socket::{self, Field};
use crate::engine::EngineCounters;
use crate::keys::{PresharedKey, PrivateKey, PublicKey};
use crate::peers::{self, PeerConfig};
use crate::wgconf::WgConfig;

/// Linux errno values of the answers.
pub const EIO: i32 = 5;
pub const EINVAL: i32 = 22;
pub const EPROTO: i32 = 71;
pub const EMSGSIZE: i32 = 90;
pub const EADDRINUSE: i32 = 98;

/// The configuration a UAPI client sets and reads.
#[derive(Debug, Clone, Default)]
pub struct Device {
    /// `None` until a client sets one; without it no handshake is made.
    pub private_key: Option<PrivateKey>,
    /// 0: any free port.
    pub listen_port: u16,
    /// The mark of the tunnel's own datagrams (`SO_MARK`); 0: none. wg-quick
    /// sets it so that policy routing keeps them out of the tunnel.
    pub fwmark: u32,
    /// In the order they were added.
    pub peers: Vec<PeerConfig>,
}

/// A refused request: the errno to answer and why, for the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct UapiError {
    pub errno: i32,
    pub message: String,
}

fn invalid(line: usize, message: impl std::fmt::Display) -> UapiError {
    UapiError {
        errno: EINVAL,
        message: format!("line {line}: {message}"),
    }
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Get,
    Set,
}

/// The operation of a request and its `key=value` lines.
pub fn parse(text: &str) -> Result<(Op, Vec<Field<'_>>), UapiError> {
    let (head, rest) = text.split_once('\n').unwrap_or((text, ""));
    let op = match head {
        "get=1" => Op::Get,
        "set=1" => Op::Set,
        other => {
            return Err(UapiError {
                errno: EPROTO,
                message: format!(
                    "unknown operation {:?}; expected get=1 or set=1",
                    short(other)
                ),
            })
        }
    };
    let key_byte = |b: u8| b.is_ascii_lowercase() || b == b'_';
    let fields = control_socket::fields(rest, 2, key_byte, QUOTE_CHARS).map_err(|e| UapiError {
        errno: EPROTO,
        message: e.to_string(),
    })?;
    if op == Op::Get {
        if let Some(f) = fields.first() {
            return Err(invalid(f.line, "get=1 takes no fields"));
        }
    }
    Ok((op, fields))
}

/// How much of a bad word errors quote (never a whole key).
const QUOTE_CHARS: usize = 16;

fn short(s: &str) -> String {
    control_socket::shorten(s, QUOTE_CHARS)
}

fn hex_key(f: &Field<'_>) -> Result<[u8; 32], UapiError> {
    let v = f.value.as_bytes();
    let digit = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    };
    let mut key = [0u8; 32];
    if v.len() != 64 {
        return Err(invalid(f.line, format!("{}: not 64 hex digits", f.key)));
    }
    for (i, pair) in v.chunks(2).enumerate() {
        match (digit(pair[0]), digit(pair[1])) {
            (Some(h), Some(l)) => key[i] = h << 4 | l,
            _ => return Err(invalid(f.line, format!("{}: not 64 hex digits", f.key))),
        }
    }
    Ok(key)
}

fn number<T: std::str::FromStr>(f: &Field<'_>, what: &str) -> Result<T, UapiError> {
    f.value
        .parse()
        .map_err(|_| invalid(f.line, format!("{}: not {what}", f.key)))
}

fn flag(f: &Field<'_>) -> Result<(), UapiError> {
    if f.value == "true" {
        Ok(())
    } else {
        Err(invalid(
            f.line,
            format!("{}: only \"true\" is allowed", f.key),
        ))
    }
}

/// The peer a set operation's lines are about.
enum Selected {
    /// None yet: device lines.
    Device,
    /// An index into the new peer list, and whether its `public_key` line
    /// created it (for `update_only`).
    Peer { index: usize, created: bool },
    /// Lines to check and ignore: this device's own key, a removed peer, or
    /// `update_only` for a peer that did not exist.
    Ignored,
}

/// Applies the lines of a set operation to a copy of `device`, as
/// wireguard-go does, and returns it if the whole operation is valid.
/// An allowed IP that another peer has moves to this peer (as in
/// wireguard-go and the kernel).
pub fn apply_set(device: &Device, fields: &[Field<'_>]) -> Result<Device, UapiError> {
    let mut dev = device.clone();
    let mut selected = Selected::Device;
    for f in fields {
        if f.key == "public_key" {
            let key = PublicKey::from_bytes(hex_key(f)?);
            let own = dev.private_key.as_ref().map(PrivateKey::public_key);
            selected = if own == Some(key) {
                Selected::Ignored
            } else if let Some(index) = dev.peers.iter().position(|p| p.public_key == key) {
                Selected::Peer {
                    index,
                    created: false,
                }
            } else {
                dev.peers.push(PeerConfig {
                    public_key: key,
                    preshared_key: None,
                    allowed_ips: Vec::new(),
                    endpoint: None,
                    persistent_keepalive: None,
                });
                Selected::Peer {
                    index: dev.peers.len() - 1,
                    created: true,
                }
            };
            continue;
        }
        match selected {
            Selected::Device => device_line(&mut dev, f)?,
            Selected::Ignored => ignored_peer_line(f)?,
            Selected::Peer { index, created } => match f.key {
                "remove" => {
                    flag(f)?;
                    dev.peers.remove(index);
                    selected = Selected::Ignored;
                }
                "update_only" => {
                    flag(f)?;
                    if created {
                        dev.peers.remove(index);
                        selected = Selected::Ignored;
                    }
                }
                _ => peer_line(&mut dev, index, f)?,
            },
        }
    }
    peers::validate(&dev.peers).map_err(|e| UapiError {
        errno: EINVAL,
        message: e.to_string(),
    })?;
    Ok(dev)
}

fn device_line(dev: &mut Device, f: &Field<'_>) -> Result<(), UapiError> {
    match f.key {
        "private_key" => {
            let key = hex_key(f)?;
            dev.private_key = (key != [0; 32]).then(|| PrivateKey::from_bytes(key));
        }
        "listen_port" => dev.listen_port = number(f, "a port (0 to 65535)")?,
        "fwmark" => dev.fwmark = number(f, "a number (0 to 4294967295)")?,
        "replace_peers" => {
            flag(f)?;
            dev.peers.clear();
        }
        "protocol_version" => protocol_version(f)?,
        other => {
            return Err(invalid(
                f.line,
                format!("unknown device key {:?}", short(other)),
            ))
        }
    }
    Ok(())
}

/// The lines of a peer that is not configured are still checked.
fn ignored_peer_line(f: &Field<'_>) -> Result<(), UapiError> {
    let mut scratch = Device {
        peers: vec![PeerConfig {
            public_key: PublicKey::from_bytes([0; 32]),
            preshared_key: None,
            allowed_ips: Vec::new(),
            endpoint: None,
            persistent_keepalive: None,
        }],
        ..Device::default()
    };
    match f.key {
        "remove" | "update_only" => flag(f),
        _ => peer_line(&mut scratch, 0, f),
    }
}

fn protocol_version(f: &Field<'_>) -> Result<(), UapiError> {
    if f.value == "1" {
        Ok(())
    } else {
        Err(invalid(f.line, "protocol_version: only 1 exists"))
    }
}

fn peer_line(dev: &mut Device, i: usize, f: &Field<'_>) -> Result<(), UapiError> {
    match f.key {
        "preshared_key" => {
            let key = hex_key(f)?;
            dev.peers[i].preshared_key = (key != [0; 32]).then(|| PresharedKey::from_bytes(key));
        }
        "endpoint" => {
            let endpoint: SocketAddr = number(f, "an IP:port or [IPv6]:port")?;
            dev.peers[i].endpoint = Some(endpoint);
        }
        "persistent_keepalive_interval" => {
            let secs: u16 = number(f, "a number of seconds (0 to 65535)")?;
            dev.peers[i].persistent_keepalive = (secs != 0).then_some(secs);
        }
        "replace_allowed_ips" => {
            flag(f)?;
            dev.peers[i].allowed_ips.clear();
        }
        "allowed_ip" => {
            let (remove, text) = match f.value.strip_prefix('-') {
                Some(rest) => (true, rest),
                None => (false, f.value),
            };
            let net: IpNet = text.parse().map_err(|_| {
                invalid(
                    f.line,
                    format!(
                        "allowed_ip: {:?} is not a prefix (address/length)",
                        short(text)
                    ),
                )
            })?;
            let net = net.trunc();
            if remove {
                dev.peers[i].allowed_ips.retain(|n| n.trunc() != net);
            } else {
                // A prefix belongs to one peer: the last to claim it.
                for (j, p) in dev.peers.iter_mut().enumerate() {
                    if j != i {
                        p.allowed_ips.retain(|n| n.trunc() != net);
                    }
                }
                let ips = &mut dev.peers[i].allowed_ips;
                if !ips.iter().any(|n| n.trunc() == net) {
                    ips.push(net);
                }
            }
        }
        "protocol_version" => protocol_version(f)?,
        other => {
            return Err(invalid(
                f.line,
                format!("unknown peer key {:?}", short(other)),
            ))
        }
    }
    Ok(())
}

/// A peer as a get operation reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerState {
    /// With the endpoint in use (configured, or learned from the peer).
    pub config: PeerConfig,
    /// When the last handshake completed.
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// What a get operation reports.
#[derive(Debug, Clone)]
pub struct Status {
    pub private_key: Option<PrivateKey>,
    /// The port bound.
    pub listen_port: u16,
    pub fwmark: u32,
    pub peers: Vec<PeerState>,
    /// meshd's packet and drop counters, as `meshd_…` keys that `wg`
    /// skips.
    pub counters: EngineCounters,
}

fn push_hex(out: &mut String, key: &str, bytes: &[u8; 32]) {
    out.push_str(key);
    out.push('=');
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out.push('\n');
}

/// The counters as `meshd_…` keys, in order.
fn counter_fields(c: &EngineCounters) -> [(&'static str, u64); 15] {
    let n = &c.node;
    [
        ("meshd_tx_packets", n.tx_packets),
        ("meshd_rx_packets", n.rx_packets),
        ("meshd_no_route", n.no_route),
        ("meshd_no_endpoint", n.no_endpoint),
        ("meshd_bad_inner", n.bad_inner),
        ("meshd_bad_datagram", n.bad_datagram),
        ("meshd_unknown_peer", n.unknown_peer),
        ("meshd_spoofed", n.spoofed),
        ("meshd_cookies_sent", n.cookies_sent),
        ("meshd_udp_send_dropped", c.udp_send_dropped),
        ("meshd_tun_write_errors", c.tun_write_errors),
        ("meshd_tun_read_errors", c.tun_read_errors),
        ("meshd_udp_recv_errors", c.udp_recv_errors),
        ("meshd_relay_send_dropped", c.relay_send_dropped),
        ("meshd_other_dropped", c.other_dropped),
    ]
}

fn counter_mut<'a>(c: &'a mut EngineCounters, key: &str) -> Option<&'a mut u64> {
    let n = &mut c.node;
    Some(match key {
        "meshd_tx_packets" => &mut n.tx_packets,
        "meshd_rx_packets" => &mut n.rx_packets,
        "meshd_no_route" => &mut n.no_route,
        "meshd_no_endpoint" => &mut n.no_endpoint,
        "meshd_bad_inner" => &mut n.bad_inner,
        "meshd_bad_datagram" => &mut n.bad_datagram,
        "meshd_unknown_peer" => &mut n.unknown_peer,
        "meshd_spoofed" => &mut n.spoofed,
        "meshd_cookies_sent" => &mut n.cookies_sent,
        "meshd_udp_send_dropped" => &mut c.udp_send_dropped,
        "meshd_tun_write_errors" => &mut c.tun_write_errors,
        "meshd_tun_read_errors" => &mut c.tun_read_errors,
        "meshd_udp_recv_errors" => &mut c.udp_recv_errors,
        "meshd_relay_send_dropped" => &mut c.relay_send_dropped,
        "meshd_other_dropped" => &mut c.other_dropped,
        _ => return None,
    })
}

/// The answer to a get operation. It holds the private key (as
/// wireguard-go's does: `wg showconf` prints it), hence zeroized on drop;
/// the socket is root's alone.
pub fn encode_get(s: &Status) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::new());
    if let Some(k) = &s.private_key {
        push_hex(&mut out, "private_key", k.as_bytes());
    }
    if s.listen_port != 0 {
        let _ = writeln!(out, "listen_port={}", s.listen_port);
    }
    if s.fwmark != 0 {
        let _ = writeln!(out, "fwmark={}", s.fwmark);
    }
    for (key, value) in counter_fields(&s.counters) {
        let _ = writeln!(out, "{key}={value}");
    }
    for p in &s.peers {
        let c = &p.config;
        push_hex(&mut out, "public_key", c.public_key.as_bytes());
        let psk = c.preshared_key.as_ref().map_or([0; 32], |k| *k.as_bytes());
        push_hex(&mut out, "preshared_key", &psk);
        out.push_str("protocol_version=1\n");
        if let Some(e) = c.endpoint {
            let _ = writeln!(out, "endpoint={e}");
        }
        let since = p
            .last_handshake
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .unwrap_or(Duration::ZERO);
        let _ = writeln!(out, "last_handshake_time_sec={}", since.as_secs());
        let _ = writeln!(out, "last_handshake_time_nsec={}", since.subsec_nanos());
        let _ = writeln!(out, "tx_bytes={}", p.tx_bytes);
        let _ = writeln!(out, "rx_bytes={}", p.rx_bytes);
        let _ = writeln!(
            out,
            "persistent_keepalive_interval={}",
            c.persistent_keepalive.unwrap_or(0)
        );
        for net in &c.allowed_ips {
            let _ = writeln!(out, "allowed_ip={net}");
        }
    }
    out.push_str("errno=0\n\n");
    out
}

/// The answer to a set operation that succeeded (`0`) or to any refused
/// request.
pub fn encode_errno(errno: i32) -> String {
    format!("errno={}\n\n", -errno)
}

/// Reads the answer to a get operation (what [`encode_get`] writes, or
/// wireguard-go's). Unknown keys are skipped, as `wg` does.
pub fn parse_get(text: &str) -> Result<Status, UapiError> {
    let key_byte = |b: u8| b.is_ascii_lowercase() || b == b'_';
    let fields = control_socket::fields(text, 1, key_byte, QUOTE_CHARS).map_err(|e| UapiError {
        errno: EPROTO,
        message: e.to_string(),
    })?;
    let mut s = Status {
        private_key: None,
        listen_port: 0,
        fwmark: 0,
        peers: Vec::new(),
        counters: EngineCounters::default(),
    };
    let mut errno = None;
    let mut handshake_secs = 0u64;
    let mut handshake_nsec = 0u32;
    let finish = |p: Option<&mut PeerState>, secs: u64, nsec: u32| {
        if let Some(p) = p {
            if secs != 0 || nsec != 0 {
                p.last_handshake =
                    Some(SystemTime::UNIX_EPOCH + Duration::new(secs, nsec.min(999_999_999)));
            }
        }
    };
    for f in &fields {
        if f.key == "errno" {
            errno = Some(number::<i64>(f, "a number")?);
            continue;
        }
        if f.key == "public_key" {
            finish(s.peers.last_mut(), handshake_secs, handshake_nsec);
            (handshake_secs, handshake_nsec) = (0, 0);
            s.peers.push(PeerState {
                config: PeerConfig {
                    public_key: PublicKey::from_bytes(hex_key(f)?),
                    preshared_key: None,
                    allowed_ips: Vec::new(),
                    endpoint: None,
                    persistent_keepalive: None,
                },
                last_handshake: None,
                rx_bytes: 0,
                tx_bytes: 0,
            });
            continue;
        }
        let Some(p) = s.peers.last_mut() else {
            match f.key {
                "private_key" => s.private_key = Some(PrivateKey::from_bytes(hex_key(f)?)),
                "listen_port" => s.listen_port = number(f, "a port")?,
                "fwmark" => s.fwmark = number(f, "a number")?,
                key => {
                    if let Some(c) = counter_mut(&mut s.counters, key) {
                        *c = number(f, "a number")?;
                    }
                }
            }
            continue;
        };
        match f.key {
            "preshared_key" => {
                let key = hex_key(f)?;
                p.config.preshared_key = (key != [0; 32]).then(|| PresharedKey::from_bytes(key));
            }
            "endpoint" => p.config.endpoint = Some(number(f, "an IP:port")?),
            "last_handshake_time_sec" => handshake_secs = number(f, "a number")?,
            "last_handshake_time_nsec" => handshake_nsec = number(f, "a number")?,
            "tx_bytes" => p.tx_bytes = number(f, "a number")?,
            "rx_bytes" => p.rx_bytes = number(f, "a number")?,
            "persistent_keepalive_interval" => {
                let secs: u16 = number(f, "a number")?;
                p.config.persistent_keepalive = (secs != 0).then_some(secs);
            }
            "allowed_ip" => p.config.allowed_ips.push(number(f, "a prefix")?),
            _ => {}
        }
    }
    finish(s.peers.last_mut(), handshake_secs, handshake_nsec);
    match errno {
        Some(0) => Ok(s),
        Some(n) => Err(UapiError {
            errno: i32::try_from(n.unsigned_abs()).unwrap_or(EIO),
            message: format!("the daemon answered errno={n}"),
        }),
        None => Err(UapiError {
            errno: EPROTO,
            message: "the answer has no errno line".into(),
        }),
    }
}

/// Reads the answer to a set operation: `Ok` for `errno=0`.
pub fn parse_errno(text: &str) -> Result<(), UapiError> {
    let status = text
        .lines()
        .find_map(|l| l.strip_prefix("errno="))
        .and_then(|v| v.parse::<i64>().ok());
    match status {
        Some(0) => Ok(()),
        Some(n) => Err(UapiError {
            errno: i32::try_from(n.unsigned_abs()).unwrap_or(EIO),
            message: format!(
                "the daemon refused the change ({})",
                std::io::Error::from_raw_os_error(i32::try_from(n.unsigned_abs()).unwrap_or(EIO))
            ),
        }),
        None => Err(UapiError {
            errno: EPROTO,
            message: "the answer has no errno line".into(),
        }),
    }
}

/// The set operation of a wg-quick file, as `wg setconf` sends it: the
/// file's key, its port and mark when it sets them, and its peers instead
/// of the running ones (in meshd, peers that did not change keep their
/// sessions).
pub fn encode_setconf(config: &WgConfig) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::from("set=1\n"));
    let iface = &config.interface;
    push_hex(&mut out, "private_key", iface.private_key.as_bytes());
    if let Some(port) = iface.listen_port {
        let _ = writeln!(out, "listen_port={port}");
    }
    if let Some(mark) = iface.fwmark {
        let _ = writeln!(out, "fwmark={mark}");
    }
    out.push_str("replace_peers=true\n");
    for p in &config.peers {
        push_hex(&mut out, "public_key", p.public_key.as_bytes());
        if let Some(k) = &p.preshared_key {
            push_hex(&mut out, "preshared_key", k.as_bytes());
        }
        if let Some(e) = p.endpoint {
            let _ = writeln!(out, "endpoint={e}");
        }
        if let Some(k) = p.persistent_keepalive {
            let _ = writeln!(out, "persistent_keepalive_interval={k}");
        }
        out.push_str("replace_allowed_ips=true\n");
        for net in &p.allowed_ips {
            let _ = writeln!(out, "allowed_ip={net}");
        }
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(n: u8) -> String {
        format!("{n:02x}").repeat(32)
    }

    fn key(n: u8) -> PublicKey {
        PublicKey::from_bytes([n; 32])
    }

    /// Applies a set operation's text to `dev`.
    fn set(dev: &Device, text: &str) -> Result<Device, UapiError> {
        let (op, fields) = parse(text)?;
        assert_eq!(op, Op::Set);
        apply_set(dev, &fields)
    }

    fn peer(dev: &Device, n: u8) -> &PeerConfig {
        dev.peers.iter().find(|p| p.public_key == key(n)).unwrap()
    }

    #[test]
    fn a_set_builds_a_device_as_wg_setconf_sends_it() {
        let text = format!(
            "set=1\nprivate_key={}\nlisten_port=51820\nfwmark=51820\nreplace_peers=true\n\
             public_key={}\npreshared_key={}\nendpoint=[2001:db8::1]:4500\n\
             persistent_keepalive_interval=25\nreplace_allowed_ips=true\n\
             allowed_ip=10.0.0.7/24\nallowed_ip=fd00::2/128\nprotocol_version=1\n\
             public_key={}\nendpoint=198.18.0.2:51820\nallowed_ip=10.1.0.0/16\n\n",
            hex(9),
            hex(1),
            hex(3),
            hex(2)
        );
        let dev = set(&Device::default(), &text).unwrap();
        assert_eq!(
            dev.private_key.as_ref().map(|k| *k.as_bytes()),
            Some([9; 32])
        );
        assert_eq!((dev.listen_port, dev.fwmark), (51820, 51820));
        assert_eq!(
            dev.peers,
            vec![
                PeerConfig {
                    public_key: key(1),
                    preshared_key: Some(PresharedKey::from_bytes([3; 32])),
                    // Host bits cleared, as the kernel and wireguard-go keep them.
                    allowed_ips: vec![
                        "10.0.0.0/24".parse().unwrap(),
                        "fd00::2/128".parse().unwrap()
                    ],
                    endpoint: Some("[2001:db8::1]:4500".parse().unwrap()),
                    persistent_keepalive: Some(25),
                },
                PeerConfig {
                    public_key: key(2),
                    preshared_key: None,
                    allowed_ips: vec!["10.1.0.0/16".parse().unwrap()],
                    endpoint: Some("198.18.0.2:51820".parse().unwrap()),
                    persistent_keepalive: None,
                },
            ]
        );
    }

    #[test]
    fn peers_are_changed_removed_and_updated_only_as_asked() {
        let base = set(
            &Device::default(),
            &format!(
                "set=1\nprivate_key={}\npublic_key={}\nallowed_ip=10.0.0.1/32\n\
                 public_key={}\nallowed_ip=10.0.0.2/32\n\n",
                hex(9),
                hex(1),
                hex(2)
            ),
        )
        .unwrap();
        // Without replace_allowed_ips, allowed IPs add up; `-` removes one;
        // a prefix claimed by another peer moves.
        let dev = set(
            &base,
            &format!(
                "set=1\npublic_key={}\nallowed_ip=10.9.0.0/16\nallowed_ip=-10.0.0.1/32\n\
                 allowed_ip=10.0.0.2/32\n\n",
                hex(1)
            ),
        )
        .unwrap();
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        assert_eq!(
            peer(&dev, 1).allowed_ips,
            vec![net("10.9.0.0/16"), net("10.0.0.2/32")]
        );
        assert!(peer(&dev, 2).allowed_ips.is_empty());
        // remove, update_only on an unknown peer (ignored, its lines still
        // checked), update_only on a known one, own key ignored.
        let dev = set(
            &base,
            &format!(
                "set=1\npublic_key={}\nremove=true\npublic_key={}\nupdate_only=true\n\
                 allowed_ip=10.5.0.0/16\npublic_key={}\nupdate_only=true\n\
                 persistent_keepalive_interval=5\npublic_key={}\nallowed_ip=10.6.0.0/16\n\n",
                hex(1),
                hex(4),
                hex(2),
                PrivateKey::from_bytes([9; 32])
                    .public_key()
                    .as_bytes()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            ),
        )
        .unwrap();
        assert_eq!(
            dev.peers.iter().map(|p| p.public_key).collect::<Vec<_>>(),
            vec![key(2)]
        );
        assert_eq!(peer(&dev, 2).persistent_keepalive, Some(5));
        // replace_peers, then a zero key removes the private key.
        let dev = set(
            &base,
            &format!("set=1\nprivate_key={}\nreplace_peers=true\n\n", hex(0)),
        )
        .unwrap();
        assert!(dev.private_key.is_none() && dev.peers.is_empty());
        // A zero preshared key is none; keepalive 0 is off.
        let dev = set(
            &base,
            &format!(
                "set=1\npublic_key={}\npreshared_key={}\npersistent_keepalive_interval=0\n\n",
                hex(1),
                hex(0)
            ),
        )
        .unwrap();
        assert_eq!(peer(&dev, 1).preshared_key, None);
        assert_eq!(peer(&dev, 1).persistent_keepalive, None);
    }

    #[test]
    fn bad_requests_get_an_errno_and_change_nothing() {
        let base = Device::default();
        let k = hex(1);
        for (text, errno, want) in [
            ("", EPROTO, "unknown operation"),
            ("list=1\n\n", EPROTO, "unknown operation"),
            ("get=1\nx=1\n\n", EINVAL, "get=1 takes no fields"),
            ("set=1\nnoequals\n\n", EPROTO, "expected key=value"),
            ("set=1\nBAD=1\n\n", EPROTO, "bad key"),
            ("set=1\nlisten_port=70000\n\n", EINVAL, "listen_port"),
            ("set=1\nprivate_key=abc\n\n", EINVAL, "64 hex digits"),
            ("set=1\nprivate_key=zz\n\n", EINVAL, "64 hex digits"),
            ("set=1\nreplace_peers=yes\n\n", EINVAL, "only \"true\""),
            (
                "set=1\nendpoint=1.2.3.4:5\n\n",
                EINVAL,
                "unknown device key",
            ),
            (
                &format!("set=1\npublic_key={k}\nendpoint=nowhere\n\n"),
                EINVAL,
                "endpoint",
            ),
            (
                &format!("set=1\npublic_key={k}\nallowed_ip=10.0.0.1\n\n"),
                EINVAL,
                "not a prefix",
            ),
            (
                &format!("set=1\npublic_key={k}\nprotocol_version=2\n\n"),
                EINVAL,
                "only 1",
            ),
            (
                &format!("set=1\npublic_key={k}\nlisten_port=1\n\n"),
                EINVAL,
                "unknown peer key",
            ),
            (
                &format!("set=1\npublic_key={k}\nremove=true\nallowed_ip=x\n\n"),
                EINVAL,
                "not a prefix",
            ),
        ] {
            let result = parse(text).and_then(|(_, fields)| apply_set(&base, &fields));
            let e = result
                .err()
                .unwrap_or_else(|| panic!("{text:?} was accepted"));
            assert_eq!(e.errno, errno, "{text:?}: {e}");
            assert!(e.message.contains(want), "{text:?}: {e}");
        }
        // A whole operation or nothing: the valid first half of a bad set
        // is not applied (apply_set returns a new device only on success).
        let bad = format!("set=1\nlisten_port=1234\npublic_key={k}\nallowed_ip=nope\n\n");
        assert!(set(&base, &bad).is_err());
        assert_eq!(base.listen_port, 0);
        // Errors quote little of what they were given (never a whole key).
        let secret = hex(7);
        let e = set(&base, &format!("set=1\n{secret}={secret}\n\n")).unwrap_err();
        assert!(!e.message.contains(&secret[..20]), "{e}");
    }

    #[test]
    fn get_answers_round_trip_and_read_wireguard_go() {
        let status = Status {
            private_key: Some(PrivateKey::from_bytes([9; 32])),
            listen_port: 51820,
            fwmark: 7,
            peers: vec![PeerState {
                config: PeerConfig {
                    public_key: key(1),
                    preshared_key: Some(PresharedKey::from_bytes([3; 32])),
                    allowed_ips: vec!["10.0.0.0/24".parse().unwrap()],
                    endpoint: Some("198.18.0.2:51820".parse().unwrap()),
                    persistent_keepalive: Some(25),
                },
                last_handshake: Some(SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 5)),
                rx_bytes: 10,
                tx_bytes: 20,
            }],
            counters: EngineCounters {
                udp_recv_errors: 4,
                ..EngineCounters::default()
            },
        };
        let text = encode_get(&status);
        assert!(text.ends_with("errno=0\n\n"), "{}", *text);
        assert!(text.contains("\nmeshd_udp_recv_errors=4\n"), "{}", *text);
        let back = parse_get(&text).unwrap();
        assert_eq!(back.peers, status.peers);
        assert_eq!((back.listen_port, back.fwmark), (51820, 7));
        assert_eq!(back.counters, status.counters);
        // What wireguard-go writes (no key: a device not yet configured).
        let go = format!(
            "listen_port=4000\npublic_key={}\npreshared_key={}\nprotocol_version=1\n\
             last_handshake_time_sec=0\nlast_handshake_time_nsec=0\ntx_bytes=0\nrx_bytes=0\n\
             persistent_keepalive_interval=0\nerrno=0\n\n",
            hex(1),
            hex(0)
        );
        let s = parse_get(&go).unwrap();
        assert!(s.private_key.is_none());
        assert_eq!(s.peers[0].config.preshared_key, None);
        assert_eq!(s.peers[0].last_handshake, None);
        assert_eq!(parse_get("errno=-22\n\n").unwrap_err().errno, EINVAL);
        assert_eq!(
            parse_errno(&encode_errno(EADDRINUSE)).unwrap_err().errno,
            EADDRINUSE
        );
        assert!(parse_errno(&encode_errno(0)).is_ok());
    }

    #[test]
    fn setconf_of_a_file_is_what_it_says() {
        let text = format!(
            "[Interface]\nPrivateKey = {}\nFwMark = 0x10\n\n[Peer]\nPublicKey = {}\n\
             AllowedIPs = 10.0.0.2/32\nPersistentKeepalive = 25\n",
            PrivateKey::from_bytes([9; 32]).to_base64().as_str(),
            key(1)
        );
        let config = crate::wgconf::parse(&text).unwrap();
        let op = encode_setconf(&config);
        // No ListenPort in the file: the running port stays.
        assert!(!op.contains("listen_port"), "{}", *op);
        let running = Device {
            listen_port: 4000,
            ..Device::default()
        };
        let dev = set(&running, &op).unwrap();
        assert_eq!((dev.listen_port, dev.fwmark), (4000, 16));
        assert_eq!(dev.peers, config.peers);
    }
}
