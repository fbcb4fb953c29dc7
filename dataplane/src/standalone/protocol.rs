//! The control-socket protocol of `meshd wg`, without I/O: requests and
//! replies to and from text. docs/wg-standalone.md describes it for other
//! implementations.
//!
//! A message is UTF-8 text: a head line, then `key=value` lines, then an
//! empty line. A client sends one request (head `get`, `set_peers` or
//! `stop`); the daemon answers with one reply (head `ok` or `error`) and
//! closes the connection.

use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;
use zeroize::Zeroizing;

use crate::control_socket::{self, Field};
use crate::engine::{EngineCounters, EngineStatus, PeerStatus};
use crate::keys::{PresharedKey, PublicKey};
use crate::peers::{self, PeerConfig};

/// A message that does not follow the protocol. `line` is 1-based.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("control message, line {line}: {message}")]
pub struct ProtocolError {
    pub line: usize,
    pub message: String,
}

fn err(line: usize, message: impl Into<String>) -> ProtocolError {
    ProtocolError {
        line,
        message: message.into(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// The interface's status: answered with [`encode_status`].
    Get,
    /// Makes these peers the peer set, as a diff against the running one.
    SetPeers(Vec<PeerConfig>),
    /// Stops the daemon, which removes the interface and then the socket.
    Stop,
}

/// Splits a message into its head line and `key=value` fields; keys are
/// lower-case letters and `_`.
fn split(text: &str) -> Result<(&str, Vec<Field<'_>>), ProtocolError> {
    let (head, rest) = text.split_once('\n').unwrap_or((text, ""));
    if head.is_empty() {
        return Err(err(1, "empty message"));
    }
    let key_byte = |b: u8| b.is_ascii_lowercase() || b == b'_';
    let fields = control_socket::fields(rest, 2, key_byte, QUOTE_CHARS)
        .map_err(|e| err(e.line, e.message))?;
    Ok((head, fields))
}

/// How much of a bad word this socket's errors quote.
const QUOTE_CHARS: usize = 16;

fn shorten(s: &str) -> String {
    control_socket::shorten(s, QUOTE_CHARS)
}

fn parse_value<T: std::str::FromStr>(f: &Field<'_>, what: &str) -> Result<T, ProtocolError> {
    f.value
        .parse()
        .map_err(|_| err(f.line, format!("{}: not a valid {what}", f.key)))
}

impl Request {
    /// The message text; it holds preshared keys, hence zeroized on drop.
    pub fn encode(&self) -> Zeroizing<String> {
        let mut out = Zeroizing::new(String::new());
        match self {
            Request::Get => out.push_str("get\n"),
            Request::Stop => out.push_str("stop\n"),
            Request::SetPeers(peers) => {
                out.push_str("set_peers\n");
                for p in peers {
                    out.push_str(&format!("peer={}\n", p.public_key));
                    if let Some(psk) = &p.preshared_key {
                        out.push_str("preshared_key=");
                        out.push_str(&psk.to_base64());
                        out.push('\n');
                    }
                    if let Some(e) = p.endpoint {
                        out.push_str(&format!("endpoint={e}\n"));
                    }
                    for net in &p.allowed_ips {
                        out.push_str(&format!("allowed_ip={net}\n"));
                    }
                    if let Some(k) = p.persistent_keepalive.filter(|&k| k != 0) {
                        out.push_str(&format!("persistent_keepalive={k}\n"));
                    }
                }
            }
        }
        out.push('\n');
        out
    }

    pub fn parse(text: &str) -> Result<Request, ProtocolError> {
        let (head, fields) = split(text)?;
        let request = match head {
            "get" => Request::Get,
            "stop" => Request::Stop,
            "set_peers" => return parse_peers(&fields).map(Request::SetPeers),
            other => {
                return Err(err(
                    1,
                    format!(
                        "unknown request {:?}; expected get, set_peers or stop",
                        shorten(other)
                    ),
                ))
            }
        };
        match fields.first() {
            Some(f) => Err(err(f.line, format!("{head} takes no fields"))),
            None => Ok(request),
        }
    }
}

fn parse_peers(fields: &[Field<'_>]) -> Result<Vec<PeerConfig>, ProtocolError> {
    let mut peers: Vec<PeerConfig> = Vec::new();
    // Which optional fields the current peer has had, to refuse repeats.
    let mut seen: Vec<&str> = Vec::new();
    for f in fields {
        if f.key == "peer" {
            peers.push(PeerConfig {
                public_key: parse_value::<PublicKey>(f, "public key")?,
                preshared_key: None,
                allowed_ips: Vec::new(),
                endpoint: None,
                persistent_keepalive: None,
            });
            seen.clear();
            continue;
        }
        let Some(peer) = peers.last_mut() else {
            return Err(err(f.line, format!("{} before the first peer=", f.key)));
        };
        if f.key != "allowed_ip" {
            if seen.contains(&f.key) {
                return Err(err(f.line, format!("{} given twice for one peer", f.key)));
            }
            seen.push(f.key);
        }
        match f.key {
            "preshared_key" => {
                peer.preshared_key = Some(parse_value::<PresharedKey>(f, "key")?);
            }
            "endpoint" => peer.endpoint = Some(parse_value::<SocketAddr>(f, "IP:port")?),
            "allowed_ip" => peer
                .allowed_ips
                .push(parse_value::<IpNet>(f, "prefix (address/length)")?),
            "persistent_keepalive" => {
                peer.persistent_keepalive =
                    Some(parse_value::<u16>(f, "number of seconds (0 to 65535)")?);
            }
            other => {
                return Err(err(
                    f.line,
                    format!(
                        "unknown peer field {:?}; expected peer, preshared_key, endpoint, allowed_ip or persistent_keepalive",
                        shorten(other)
                    ),
                ))
            }
        }
    }
    peers::validate(&peers).map_err(|e| err(1, e.to_string()))?;
    Ok(peers)
}

/// The reply to a request that succeeded and has nothing to report.
pub fn encode_ok() -> String {
    "ok\n\n".to_owned()
}

/// The reply to a request that failed. Line breaks in `message` become
/// spaces, since a message is one line.
pub fn encode_error(message: &str) -> String {
    format!("error\nmessage={}\n\n", message.replace('\n', " "))
}

/// What a reply said: `Ok` with its fields' text, or the daemon's error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ok(String),
    Error(String),
}

pub fn parse_reply(text: &str) -> Result<Reply, ProtocolError> {
    let (head, fields) = split(text)?;
    match head {
        "ok" => Ok(Reply::Ok(text.to_owned())),
        "error" => Ok(Reply::Error(
            fields
                .iter()
                .find(|f| f.key == "message")
                .map_or_else(|| "(no message)".to_owned(), |f| f.value.to_owned()),
        )),
        other => Err(err(
            1,
            format!("unknown reply {:?}; expected ok or error", shorten(other)),
        )),
    }
}

/// The counters as they appear in a status reply, in order.
fn counter_fields(c: &EngineCounters) -> [(&'static str, u64); 13] {
    let n = &c.node;
    [
        ("tx_packets", n.tx_packets),
        ("rx_packets", n.rx_packets),
        ("no_route", n.no_route),
        ("no_endpoint", n.no_endpoint),
        ("bad_inner", n.bad_inner),
        ("bad_datagram", n.bad_datagram),
        ("unknown_peer", n.unknown_peer),
        ("spoofed", n.spoofed),
        ("cookies_sent", n.cookies_sent),
        ("udp_send_dropped", c.udp_send_dropped),
        ("tun_write_errors", c.tun_write_errors),
        ("tun_read_errors", c.tun_read_errors),
        ("udp_recv_errors", c.udp_recv_errors),
    ]
}

fn counter_mut<'a>(c: &'a mut EngineCounters, name: &str) -> Option<&'a mut u64> {
    let n = &mut c.node;
    Some(match name {
        "tx_packets" => &mut n.tx_packets,
        "rx_packets" => &mut n.rx_packets,
        "no_route" => &mut n.no_route,
        "no_endpoint" => &mut n.no_endpoint,
        "bad_inner" => &mut n.bad_inner,
        "bad_datagram" => &mut n.bad_datagram,
        "unknown_peer" => &mut n.unknown_peer,
        "spoofed" => &mut n.spoofed,
        "cookies_sent" => &mut n.cookies_sent,
        "udp_send_dropped" => &mut c.udp_send_dropped,
        "tun_write_errors" => &mut c.tun_write_errors,
        "tun_read_errors" => &mut c.tun_read_errors,
        "udp_recv_errors" => &mut c.udp_recv_errors,
        _ => return None,
    })
}

/// The reply to `get`. It never holds a private or preshared key.
pub fn encode_status(s: &EngineStatus) -> String {
    let mut out = format!(
        "ok\ninterface={}\npublic_key={}\nlisten_port={}\n",
        s.tun_name, s.public_key, s.listen_port
    );
    for (name, value) in counter_fields(&s.counters) {
        out.push_str(&format!("{name}={value}\n"));
    }
    for p in &s.peers {
        out.push_str(&format!("peer={}\n", p.public_key));
        if let Some(e) = p.endpoint {
            out.push_str(&format!("endpoint={e}\n"));
        }
        for net in &p.allowed_ips {
            out.push_str(&format!("allowed_ip={net}\n"));
        }
        if let Some(h) = p.last_handshake {
            out.push_str(&format!("latest_handshake_ms={}\n", h.as_millis()));
        }
        out.push_str(&format!(
            "rx_bytes={}\ntx_bytes={}\n",
            p.rx_bytes, p.tx_bytes
        ));
        if let Some(k) = p.persistent_keepalive {
            out.push_str(&format!("persistent_keepalive={k}\n"));
        }
    }
    out.push('\n');
    out
}

/// Reads a reply to `get`. Unknown fields are skipped, so an older client
/// can read a newer daemon's status.
pub fn parse_status(text: &str) -> Result<EngineStatus, ProtocolError> {
    let (head, fields) = split(text)?;
    if head != "ok" {
        return Err(err(1, format!("expected ok, got {:?}", shorten(head))));
    }
    let mut tun_name = None;
    let mut public_key = None;
    let mut listen_port = None;
    let mut counters = EngineCounters::default();
    let mut peers: Vec<PeerStatus> = Vec::new();
    for f in &fields {
        if f.key == "peer" {
            peers.push(PeerStatus {
                public_key: parse_value(f, "public key")?,
                endpoint: None,
                allowed_ips: Vec::new(),
                last_handshake: None,
                tx_bytes: 0,
                rx_bytes: 0,
                persistent_keepalive: None,
            });
            continue;
        }
        if let Some(peer) = peers.last_mut() {
            match f.key {
                "endpoint" => peer.endpoint = Some(parse_value(f, "IP:port")?),
                "allowed_ip" => peer.allowed_ips.push(parse_value(f, "prefix")?),
                "latest_handshake_ms" => {
                    peer.last_handshake = Some(Duration::from_millis(parse_value(f, "number")?));
                }
                "rx_bytes" => peer.rx_bytes = parse_value(f, "number")?,
                "tx_bytes" => peer.tx_bytes = parse_value(f, "number")?,
                "persistent_keepalive" => {
                    peer.persistent_keepalive = Some(parse_value(f, "number")?);
                }
                _ => {}
            }
            continue;
        }
        match f.key {
            "interface" => tun_name = Some(f.value.to_owned()),
            "public_key" => public_key = Some(parse_value(f, "public key")?),
            "listen_port" => listen_port = Some(parse_value(f, "port")?),
            name => {
                if let Some(c) = counter_mut(&mut counters, name) {
                    *c = parse_value(f, "number")?;
                }
            }
        }
    }
    let missing = |what: &str| err(1, format!("status without {what}"));
    Ok(EngineStatus {
        tun_name: tun_name.ok_or_else(|| missing("interface"))?,
        public_key: public_key.ok_or_else(|| missing("public_key"))?,
        listen_port: listen_port.ok_or_else(|| missing("listen_port"))?,
        peers,
        counters,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control_socket::message_end;
    use crate::engine::Counters;

    fn key(n: u8) -> PublicKey {
        PublicKey::from_bytes([n; 32])
    }

    #[test]
    fn requests_round_trip() {
        let peers = vec![
            PeerConfig {
                public_key: key(1),
                preshared_key: Some(PresharedKey::from_bytes([9; 32])),
                allowed_ips: vec!["10.0.0.2/32".parse().unwrap(), "fd00::/64".parse().unwrap()],
                endpoint: Some("[2001:db8::1]:51820".parse().unwrap()),
                persistent_keepalive: Some(25),
            },
            PeerConfig {
                public_key: key(2),
                preshared_key: None,
                allowed_ips: vec![],
                endpoint: None,
                persistent_keepalive: None,
            },
        ];
        for r in [Request::Get, Request::Stop, Request::SetPeers(peers)] {
            let text = r.encode();
            assert_eq!(message_end(text.as_bytes()), Some(text.len()), "{r:?}");
            assert_eq!(Request::parse(&text).unwrap(), r);
        }
        assert_eq!(Request::parse("get").unwrap(), Request::Get);
        assert_eq!(
            Request::parse("set_peers\n\n").unwrap(),
            Request::SetPeers(vec![])
        );
    }

    #[test]
    fn bad_requests_name_the_line() {
        let k1 = key(1).to_string();
        let cases = [
            ("", 1, "empty message"),
            ("\n\n", 1, "empty message"),
            ("put\n\n", 1, "unknown request \"put\""),
            ("get\nx=1\n\n", 2, "get takes no fields"),
            (
                "set_peers\nendpoint=1.2.3.4:5\n",
                2,
                "endpoint before the first peer=",
            ),
            ("set_peers\npeer=abc\n", 2, "peer: not a valid public key"),
            ("set_peers\nnoequals\n", 2, "expected key=value"),
            ("set_peers\nBad=1\n", 2, "bad key \"Bad\""),
            (
                &format!("set_peers\npeer={k1}\nendpoint=1.2.3.4:5\nendpoint=1.2.3.4:6\n"),
                4,
                "endpoint given twice",
            ),
            (
                &format!("set_peers\npeer={k1}\npreshared_key=c2VjcmV0\n"),
                3,
                "preshared_key: not a valid key",
            ),
            (
                &format!("set_peers\npeer={k1}\nallowed_ip=10.0.0.0\n"),
                3,
                "allowed_ip: not a valid prefix",
            ),
            (
                &format!("set_peers\npeer={k1}\npersistent_keepalive=70000\n"),
                3,
                "persistent_keepalive: not a valid number",
            ),
            (
                &format!("set_peers\npeer={k1}\nmtu=1400\n"),
                3,
                "unknown peer field \"mtu\"",
            ),
            (
                &format!("set_peers\npeer={k1}\npeer={k1}\n"),
                1,
                "configured more than once",
            ),
        ];
        for (text, line, want) in cases {
            let e = Request::parse(text).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.message.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn errors_never_echo_key_material() {
        let secret = "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2U=";
        let k1 = key(1).to_string();
        for text in [
            format!("set_peers\npeer={k1}\npreshared_key={secret}x\n"),
            format!("set_peers\npeer={k1}\n{secret}={secret}\n"),
            format!("{secret}\n"),
        ] {
            let e = Request::parse(&text).unwrap_err().to_string();
            assert!(!e.contains(&secret[..17]), "{e}");
        }
    }

    #[test]
    fn status_round_trips_without_secrets() {
        let status = EngineStatus {
            tun_name: "wg0".into(),
            public_key: key(7),
            listen_port: 51820,
            peers: vec![
                PeerStatus {
                    public_key: key(1),
                    endpoint: Some("198.18.0.2:51820".parse().unwrap()),
                    allowed_ips: vec!["100.64.0.2/32".parse().unwrap()],
                    last_handshake: Some(Duration::from_millis(1500)),
                    tx_bytes: 10,
                    rx_bytes: 20,
                    persistent_keepalive: Some(25),
                },
                PeerStatus {
                    public_key: key(2),
                    endpoint: None,
                    allowed_ips: vec![],
                    last_handshake: None,
                    tx_bytes: 0,
                    rx_bytes: 0,
                    persistent_keepalive: None,
                },
            ],
            counters: EngineCounters {
                node: Counters {
                    bad_datagram: 3,
                    cookies_sent: 1,
                    ..Counters::default()
                },
                udp_recv_errors: 2,
                ..EngineCounters::default()
            },
        };
        let text = encode_status(&status);
        assert_eq!(parse_status(&text).unwrap(), status);
        assert_eq!(parse_reply(&text).unwrap(), Reply::Ok(text.clone()));
        assert!(text.contains("\nbad_datagram=3\n"), "{text}");
        assert!(!text.contains("private") && !text.contains("preshared"));
        // A newer daemon's extra fields are skipped.
        let newer = text.replacen("listen_port", "flavour=new\nlisten_port", 1);
        assert_eq!(parse_status(&newer).unwrap(), status);
    }

    #[test]
    fn replies() {
        assert_eq!(
            parse_reply(&encode_ok()).unwrap(),
            Reply::Ok("ok\n\n".into())
        );
        assert_eq!(
            parse_reply(&encode_error("no\nway")).unwrap(),
            Reply::Error("no way".into())
        );
        assert!(parse_reply("maybe\n\n").is_err());
        assert!(parse_status("ok\ninterface=wg0\n\n")
            .unwrap_err()
            .message
            .contains("public_key"));
    }
}
