//! The protocol of the node daemon's control socket (`control.sock` in the
//! state directory), without I/O: a head line, `key=value` lines, an empty
//! line (served by `meshd_dataplane::control_socket`).
//!
//! Requests: `status`, `rotate_key`, `stop`, `netcheck`, and `ping` with
//! `peer=NAME`. Replies: `ok` (with the status's fields for `status`,
//! `public_key=` for `rotate_key`, `via=`, `rtt_us=`, `path_age_ms=` for
//! `ping`, the report's fields for `netcheck`) or `error` with `message=`.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use meshd_dataplane::control_socket::{self, Field};
use meshd_dataplane::keys::PublicKey;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Status,
    RotateKey,
    Stop,
    /// One discovery ping to the peer of this name (or mesh address).
    Ping {
        peer: String,
    },
    Netcheck,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("control message, line {line}: {message}")]
pub struct IpcError {
    pub line: usize,
    pub message: String,
}

fn err(line: usize, message: impl Into<String>) -> IpcError {
    IpcError {
        line,
        message: message.into(),
    }
}

impl Request {
    pub fn encode(&self) -> String {
        match self {
            Request::Status => "status\n\n".to_owned(),
            Request::RotateKey => "rotate_key\n\n".to_owned(),
            Request::Stop => "stop\n\n".to_owned(),
            Request::Netcheck => "netcheck\n\n".to_owned(),
            Request::Ping { peer } => {
                let mut out = "ping\n".to_owned();
                push(&mut out, "peer", peer);
                out.push('\n');
                out
            }
        }
    }

    pub fn parse(text: &str) -> Result<Request, IpcError> {
        let (head, fields) = split(text)?;
        if head == "ping" {
            return match fields.as_slice() {
                [f] if f.key == "peer" && !f.value.is_empty() => Ok(Request::Ping {
                    peer: f.value.to_owned(),
                }),
                _ => Err(err(2, "ping takes one field, peer=NAME")),
            };
        }
        if let Some(field) = fields.first() {
            return Err(err(field.line, "requests take no fields"));
        }
        match head {
            "netcheck" => Ok(Request::Netcheck),
            "status" => Ok(Request::Status),
            "rotate_key" => Ok(Request::RotateKey),
            "stop" => Ok(Request::Stop),
            other => Err(err(1, format!("unknown request {:?}", short(other)))),
        }
    }
}

/// A reply: `ok` and its fields, or an error message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ok(Vec<(String, String)>),
    Error(String),
}

impl Reply {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        match self {
            Reply::Ok(fields) => {
                out.push_str("ok\n");
                for (k, v) in fields {
                    push(&mut out, k, v);
                }
            }
            Reply::Error(message) => {
                out.push_str("error\n");
                push(&mut out, "message", message);
            }
        }
        out.push('\n');
        out
    }

    pub fn parse(text: &str) -> Result<Reply, IpcError> {
        let (head, fields) = split(text)?;
        match head {
            "ok" => Ok(Reply::Ok(
                fields
                    .into_iter()
                    .map(|f| (f.key.to_owned(), f.value.to_owned()))
                    .collect(),
            )),
            "error" => {
                let message = fields
                    .iter()
                    .find(|f| f.key == "message")
                    .map(|f| f.value.to_owned())
                    .unwrap_or_else(|| "(no message)".into());
                Ok(Reply::Error(message))
            }
            other => Err(err(1, format!("unknown reply {:?}", short(other)))),
        }
    }
}

/// One line per field: a value never contains a newline.
fn push(out: &mut String, key: &str, value: &str) {
    out.push_str(key);
    out.push('=');
    out.push_str(&value.replace(['\n', '\r'], " "));
    out.push('\n');
}

/// A head line, then `key=value` fields (keys of lower-case letters,
/// digits and `_`).
fn split(text: &str) -> Result<(&str, Vec<Field<'_>>), IpcError> {
    let (head, rest) = text.split_once('\n').unwrap_or((text, ""));
    if head.is_empty() {
        return Err(err(1, "empty message"));
    }
    let key_byte = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_';
    let fields = control_socket::fields(rest, 2, key_byte, QUOTE_CHARS)
        .map_err(|e| err(e.line, e.message))?;
    Ok((head, fields))
}

/// How much of a bad word this socket's errors quote.
const QUOTE_CHARS: usize = 24;

fn short(s: &str) -> String {
    control_socket::shorten(s, QUOTE_CHARS)
}

/// What `meshd status` shows.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeStatus {
    /// Empty until the coordinator accepted the node.
    pub name: String,
    pub node_id: Option<u64>,
    pub public_key: Option<PublicKey>,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    pub interface: String,
    pub listen_port: Option<u16>,
    pub control: ControlStatus,
    /// The region of the relay this node is homed on, once it has one.
    pub home_relay: Option<String>,
    pub peers: Vec<PeerLine>,
}

/// The control connection, for people.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ControlStatus {
    /// `connected`, `connecting`, `joining`, `waiting` or `stopped`.
    pub state: String,
    /// The coordinator address in use or being tried.
    pub coordinator: Option<String>,
    /// `QUIC` or `TLS/TCP`, when connected.
    pub transport: Option<String>,
    /// Seconds connected.
    pub connected_for: Option<u64>,
    /// Milliseconds until the next attempt, when waiting.
    pub retry_in_ms: Option<u64>,
    pub last_error: Option<String>,
    /// Sessions established since the daemon started.
    pub sessions: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerLine {
    pub node_id: u64,
    pub name: String,
    pub public_key: PublicKey,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub endpoint: Option<SocketAddr>,
    /// Seconds since the last handshake.
    pub handshake_age: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// `direct`, `relay` or `none`.
    pub path: String,
    /// For a relayed path: the relay's region.
    pub relay: Option<String>,
    /// Round-trip time on the current path, in microseconds, when measured.
    pub rtt_us: Option<u64>,
    /// Where the peer said it can be reached (through the coordinator).
    pub candidates: Vec<SocketAddr>,
}

impl NodeStatus {
    pub fn to_fields(&self) -> Vec<(String, String)> {
        let mut f: Vec<(String, String)> = Vec::new();
        let mut add = |k: &str, v: String| f.push((k.to_owned(), v));
        add("name", self.name.clone());
        if let Some(id) = self.node_id {
            add("node_id", id.to_string());
        }
        if let Some(k) = self.public_key {
            add("public_key", k.to_string());
        }
        if let Some(a) = self.ipv4 {
            add("ipv4", a.to_string());
        }
        if let Some(a) = self.ipv6 {
            add("ipv6", a.to_string());
        }
        add("interface", self.interface.clone());
        if let Some(p) = self.listen_port {
            add("listen_port", p.to_string());
        }
        let c = &self.control;
        add("control", c.state.clone());
        if let Some(v) = &c.coordinator {
            add("coordinator", v.clone());
        }
        if let Some(v) = &c.transport {
            add("transport", v.clone());
        }
        if let Some(v) = c.connected_for {
            add("connected_for", v.to_string());
        }
        if let Some(v) = c.retry_in_ms {
            add("retry_in_ms", v.to_string());
        }
        if let Some(v) = &c.last_error {
            add("last_error", v.clone());
        }
        add("sessions", c.sessions.to_string());
        if let Some(r) = &self.home_relay {
            add("home_relay", r.clone());
        }
        for p in &self.peers {
            add("peer", p.node_id.to_string());
            add("peer_name", p.name.clone());
            add("peer_key", p.public_key.to_string());
            add("peer_ipv4", p.ipv4.to_string());
            add("peer_ipv6", p.ipv6.to_string());
            if let Some(e) = p.endpoint {
                add("peer_endpoint", e.to_string());
            }
            if let Some(a) = p.handshake_age {
                add("peer_handshake_age", a.to_string());
            }
            add("peer_rx", p.rx_bytes.to_string());
            add("peer_tx", p.tx_bytes.to_string());
            add("peer_path", p.path.clone());
            if let Some(r) = &p.relay {
                add("peer_relay", r.clone());
            }
            if let Some(r) = p.rtt_us {
                add("peer_rtt_us", r.to_string());
            }
            for c in &p.candidates {
                add("peer_candidate", c.to_string());
            }
        }
        f
    }

    pub fn from_fields(fields: &[(String, String)]) -> Result<NodeStatus, IpcError> {
        fn parse<T: FromStr>(line: usize, k: &str, v: &str) -> Result<T, IpcError> {
            v.parse()
                .map_err(|_| err(line, format!("{k}: not a valid value")))
        }
        let mut s = NodeStatus::default();
        for (i, (k, v)) in fields.iter().enumerate() {
            let line = i + 2;
            let (k, v) = (k.as_str(), v.as_str());
            if k == "peer" {
                s.peers.push(PeerLine {
                    node_id: parse(line, k, v)?,
                    name: String::new(),
                    public_key: PublicKey::from_bytes([0; 32]),
                    ipv4: Ipv4Addr::UNSPECIFIED,
                    ipv6: Ipv6Addr::UNSPECIFIED,
                    endpoint: None,
                    handshake_age: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                    path: "none".into(),
                    relay: None,
                    rtt_us: None,
                    candidates: Vec::new(),
                });
                continue;
            }
            if let Some(field) = k.strip_prefix("peer_") {
                let p = s
                    .peers
                    .last_mut()
                    .ok_or_else(|| err(line, format!("{k} before any peer=")))?;
                match field {
                    "name" => p.name = v.to_owned(),
                    "key" => p.public_key = parse(line, k, v)?,
                    "ipv4" => p.ipv4 = parse(line, k, v)?,
                    "ipv6" => p.ipv6 = parse(line, k, v)?,
                    "endpoint" => p.endpoint = Some(parse(line, k, v)?),
                    "handshake_age" => p.handshake_age = Some(parse(line, k, v)?),
                    "rx" => p.rx_bytes = parse(line, k, v)?,
                    "tx" => p.tx_bytes = parse(line, k, v)?,
                    "path" => p.path = v.to_owned(),
                    "relay" => p.relay = Some(v.to_owned()),
                    "rtt_us" => p.rtt_us = Some(parse(line, k, v)?),
                    "candidate" => p.candidates.push(parse(line, k, v)?),
                    // Newer daemons may say more.
                    _ => {}
                }
                continue;
            }
            match k {
                "name" => s.name = v.to_owned(),
                "node_id" => s.node_id = Some(parse(line, k, v)?),
                "public_key" => s.public_key = Some(parse(line, k, v)?),
                "ipv4" => s.ipv4 = Some(parse(line, k, v)?),
                "ipv6" => s.ipv6 = Some(parse(line, k, v)?),
                "interface" => s.interface = v.to_owned(),
                "listen_port" => s.listen_port = Some(parse(line, k, v)?),
                "control" => s.control.state = v.to_owned(),
                "coordinator" => s.control.coordinator = Some(v.to_owned()),
                "transport" => s.control.transport = Some(v.to_owned()),
                "connected_for" => s.control.connected_for = Some(parse(line, k, v)?),
                "retry_in_ms" => s.control.retry_in_ms = Some(parse(line, k, v)?),
                "last_error" => s.control.last_error = Some(v.to_owned()),
                "sessions" => s.control.sessions = parse(line, k, v)?,
                "home_relay" => s.home_relay = Some(v.to_owned()),
                _ => {}
            }
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_junk_is_refused() {
        for r in [
            Request::Status,
            Request::RotateKey,
            Request::Stop,
            Request::Netcheck,
            Request::Ping {
                peer: "edge1".into(),
            },
        ] {
            assert_eq!(Request::parse(&r.encode()), Ok(r));
        }
        assert!(Request::parse("ping\n\n").is_err());
        assert!(Request::parse("ping\npeer=\n\n").is_err());
        assert_eq!(Request::parse("").unwrap_err().line, 1);
        assert!(Request::parse("reboot\n\n")
            .unwrap_err()
            .message
            .contains("unknown request"));
        assert_eq!(Request::parse("status\nx=1\n\n").unwrap_err().line, 2);
    }

    #[test]
    fn status_round_trips_through_a_reply() {
        let s = NodeStatus {
            name: "edge1".into(),
            node_id: Some(3),
            public_key: Some(PublicKey::from_bytes([5; 32])),
            ipv4: Some("100.64.0.3".parse().unwrap()),
            ipv6: Some("fd00::3".parse().unwrap()),
            interface: "meshd0".into(),
            listen_port: Some(41641),
            control: ControlStatus {
                state: "waiting".into(),
                coordinator: Some("198.18.1.2:443".into()),
                transport: None,
                connected_for: None,
                retry_in_ms: Some(1500),
                last_error: Some("cannot reach\nthe coordinator".into()),
                sessions: 2,
            },
            home_relay: Some("eu".into()),
            peers: vec![
                PeerLine {
                    node_id: 4,
                    name: "edge2".into(),
                    public_key: PublicKey::from_bytes([6; 32]),
                    ipv4: "100.64.0.4".parse().unwrap(),
                    ipv6: "fd00::4".parse().unwrap(),
                    endpoint: Some("198.19.2.11:41641".parse().unwrap()),
                    handshake_age: Some(12),
                    rx_bytes: 100,
                    tx_bytes: 200,
                    path: "direct".into(),
                    relay: None,
                    rtt_us: Some(20_400),
                    candidates: vec!["198.19.2.11:41641".parse().unwrap()],
                },
                PeerLine {
                    node_id: 5,
                    name: "cloud1".into(),
                    public_key: PublicKey::from_bytes([7; 32]),
                    ipv4: "100.64.0.5".parse().unwrap(),
                    ipv6: "fd00::5".parse().unwrap(),
                    endpoint: None,
                    handshake_age: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                    path: "relay".into(),
                    relay: Some("eu".into()),
                    rtt_us: None,
                    candidates: Vec::new(),
                },
            ],
        };
        let text = Reply::Ok(s.to_fields()).encode();
        let Reply::Ok(fields) = Reply::parse(&text).unwrap() else {
            panic!("{text}");
        };
        let mut want = s.clone();
        want.control.last_error = Some("cannot reach the coordinator".into());
        assert_eq!(NodeStatus::from_fields(&fields).unwrap(), want);
        let e = Reply::Error("no".into()).encode();
        assert_eq!(Reply::parse(&e).unwrap(), Reply::Error("no".into()));
        let bad = vec![("peer_name".to_owned(), "x".to_owned())];
        assert!(NodeStatus::from_fields(&bad).is_err());
    }
}
