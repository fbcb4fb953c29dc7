//! The control-protocol messages and their bodies (docs/control-protocol.md,
//! "Messages"). Every struct here is plain data; encoding checks the limits
//! the decoder enforces, so a message that encodes also decodes.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::codec::{DecodeError, EncodeError, Fields, Writer};

/// Longest node name, in bytes (one DNS label).
pub const MAX_NAME_LEN: usize = 63;
/// Longest tag, in bytes (`tag:` included).
pub const MAX_TAG_LEN: usize = 64;
/// Most tags on one node.
pub const MAX_TAGS: usize = 32;
/// The tag of Register's and Login's endpoints: ignorable (≥ 128), so a
/// coordinator that predates it still accepts the join.
const JOIN_ENDPOINTS: u8 = 128;

/// The tag of Register's and Login's relay description: not ignorable, so a
/// coordinator that knows no relays refuses a relay rather than taking it
/// for a node.
const JOIN_RELAY: u8 = 5;
/// Most relays in one `RelayMap`.
pub const MAX_RELAYS: usize = 64;

/// Most endpoints a node may report or a peer may carry.
pub const MAX_ENDPOINTS: usize = 16;
/// Most rules in one packet filter.
pub const MAX_RULES: usize = 1024;
/// Longest human-readable error text, in bytes.
pub const MAX_ERROR_MESSAGE_LEN: usize = 1024;
/// Most peers in one `PeerMap` frame; larger maps are sent in several frames.
pub const MAX_PEERS_PER_FRAME: usize = 256;

/// Largest possible encoding of one [`Peer`] as a nested field (header
/// included), with every field at its limit.
pub const MAX_PEER_FIELD_LEN: usize = 3
    + (3 + 8)
    + (3 + 32)
    + (3 + MAX_NAME_LEN)
    + (3 + 4)
    + (3 + 16)
    + MAX_ENDPOINTS * (3 + 18)
    + MAX_TAGS * (3 + MAX_TAG_LEN);

// A full PeerMap frame must fit in a frame whatever its peers contain.
const _: () = assert!(4 + 3 + 4 + MAX_PEERS_PER_FRAME * MAX_PEER_FIELD_LEN <= crate::MAX_FRAME_LEN);
const _: () = assert!(MAX_PEER_FIELD_LEN <= u16::MAX as usize);

/// A node's WireGuard (Curve25519) public key. Shown in base64, as `wg` does.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeKey(pub [u8; 32]);

impl fmt::Display for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeKey({self})")
    }
}

/// The coordinator's number for a node; never reused within a mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The secret part of a join token. Its `Debug` never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenSecret(pub [u8; 32]);

impl fmt::Debug for TokenSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenSecret(..)")
    }
}

/// First message of every session, from the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// The coordinator's static X25519 public key, the other half of every proof.
    pub coordinator_key: NodeKey,
    /// Fresh random bytes; every proof in this session covers them.
    pub nonce: [u8; 32],
}

/// A new node joins with a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Register {
    pub token_secret: TokenSecret,
    pub node_key: NodeKey,
    pub name: String,
    /// [`crate::auth::Purpose::Register`] proof over the challenge.
    pub proof: [u8; 32],
    /// Where the node can be reached now, so its first peers learn it with
    /// the node itself (ignorable tag 128: older coordinators skip it).
    pub endpoints: Vec<SocketAddr>,
    /// Set when the joining process is a relay (`meshd relay`), not a node.
    pub relay: Option<RelayInfo>,
}

/// A registered node opens a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    pub node_key: NodeKey,
    /// [`crate::auth::Purpose::Login`] proof over the challenge.
    pub proof: [u8; 32],
    /// As in [`Register`].
    pub endpoints: Vec<SocketAddr>,
    /// As in [`Register`]; a relay states it on every login, so a moved
    /// relay is announced with its new addresses.
    pub relay: Option<RelayInfo>,
}

/// How nodes reach a relay (docs/relay-protocol.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayInfo {
    /// The region it serves (a DNS label); nodes home on the nearest region.
    pub region: String,
    /// Its public addresses: TLS over TCP and QUIC over UDP on each.
    pub addrs: Vec<SocketAddr>,
    /// The UDP port of its STUN responder, on the same addresses.
    pub stun_port: u16,
    /// SHA-256 of its TLS certificate, the only one a node accepts from it.
    pub cert_pin: [u8; 32],
}

/// One relay of the mesh as nodes learn it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayEntry {
    pub node_id: NodeId,
    /// Its static X25519 key: the other half of every proof to it.
    pub key: NodeKey,
    pub name: String,
    pub info: RelayInfo,
}

/// What a node learns about itself on `RegisterOk` and `LoginOk`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub node_id: NodeId,
    pub name: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// The whole mesh's IPv4 range (100.64.0.0/10): the route into the tunnel.
    pub mesh_ipv4: Ipv4Net,
    /// The mesh's ULA /48.
    pub mesh_ipv6: Ipv6Net,
    /// Unix seconds after which the node must register again; `None`: never.
    pub expires_at: Option<u64>,
    pub tags: Vec<String>,
}

/// One peer as a node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub node_id: NodeId,
    pub node_key: NodeKey,
    pub name: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub endpoints: Vec<SocketAddr>,
    pub tags: Vec<String>,
}

/// A part of the full peer map; the map is complete at the part with `last`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerMap {
    pub peers: Vec<Peer>,
    pub last: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointChanged {
    pub node_id: NodeId,
    pub endpoints: Vec<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRotated {
    pub node_id: NodeId,
    pub node_key: NodeKey,
}

/// One inbound allow rule: packets from `source` with this protocol (0: any)
/// and a destination port in `ports` (inclusive; ignored for protocols
/// without ports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterRule {
    pub source: IpNet,
    pub protocol: u8,
    pub ports: (u16, u16),
}

/// The receiving node's complete inbound packet filter: a packet is allowed
/// when any rule matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyChanged {
    pub rules: Vec<FilterRule>,
}

/// The complete set of endpoints a node can be reached at right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointReport {
    pub endpoints: Vec<SocketAddr>,
}

/// The node asks to replace its key; sent on a logged-in session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotateKey {
    pub new_key: NodeKey,
    /// [`crate::auth::Purpose::RotateKey`] proof made with the *new* private key.
    pub proof: [u8; 32],
}

/// Machine-readable error codes; see docs/control-protocol.md for each one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    Malformed,
    UnsupportedVersion,
    UnexpectedMessage,
    TokenInvalid,
    TokenExpired,
    TokenRevoked,
    TokenUsed,
    BadProof,
    KeyInUse,
    UnknownNode,
    NodeExpired,
    InvalidName,
    InvalidKey,
    HandshakeTimeout,
    Unavailable,
    Internal,
    Replaced,
    /// A code this side does not know; kept so it can be shown.
    Other(u16),
}

impl ErrorCode {
    const TABLE: [(ErrorCode, u16); 17] = [
        (ErrorCode::Malformed, 1),
        (ErrorCode::UnsupportedVersion, 2),
        (ErrorCode::UnexpectedMessage, 3),
        (ErrorCode::TokenInvalid, 4),
        (ErrorCode::TokenExpired, 5),
        (ErrorCode::TokenRevoked, 6),
        (ErrorCode::TokenUsed, 7),
        (ErrorCode::BadProof, 8),
        (ErrorCode::KeyInUse, 9),
        (ErrorCode::UnknownNode, 10),
        (ErrorCode::NodeExpired, 11),
        (ErrorCode::InvalidName, 12),
        (ErrorCode::InvalidKey, 13),
        (ErrorCode::HandshakeTimeout, 14),
        (ErrorCode::Unavailable, 15),
        (ErrorCode::Internal, 16),
        (ErrorCode::Replaced, 17),
    ];

    pub fn to_u16(self) -> u16 {
        if let ErrorCode::Other(c) = self {
            return c;
        }
        Self::TABLE
            .iter()
            .find(|(code, _)| *code == self)
            .map_or(0, |&(_, n)| n)
    }

    pub fn from_u16(n: u16) -> Self {
        Self::TABLE
            .iter()
            .find(|&&(_, v)| v == n)
            .map_or(ErrorCode::Other(n), |&(code, _)| code)
    }
}

/// The last message of a session that failed, from either side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorMessage {
    pub code: ErrorCode,
    pub message: String,
}

/// Which side sends a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    Coordinator,
    Node,
    Either,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Challenge(Challenge),
    Register(Register),
    Login(Login),
    RegisterOk(NodeInfo),
    LoginOk(NodeInfo),
    PeerMap(PeerMap),
    PeerAdded(Peer),
    PeerRemoved(NodeId),
    EndpointChanged(EndpointChanged),
    KeyRotated(KeyRotated),
    PolicyChanged(PolicyChanged),
    EndpointReport(EndpointReport),
    RotateKey(RotateKey),
    RotateKeyOk(NodeKey),
    Error(ErrorMessage),
    /// The node's own record changed during the session (a rename, a renewed
    /// expiry): the whole record as it is now.
    NodeUpdated(NodeInfo),
    /// Every relay of the mesh, whole, after the peer map and whenever a
    /// relay joins, moves or leaves.
    RelayMap(Vec<RelayEntry>),
}

pub(crate) mod msg_type {
    pub const CHALLENGE: u16 = 0x0001;
    pub const REGISTER: u16 = 0x0002;
    pub const LOGIN: u16 = 0x0003;
    pub const REGISTER_OK: u16 = 0x0004;
    pub const LOGIN_OK: u16 = 0x0005;
    pub const PEER_MAP: u16 = 0x0006;
    pub const PEER_ADDED: u16 = 0x0007;
    pub const PEER_REMOVED: u16 = 0x0008;
    pub const ENDPOINT_CHANGED: u16 = 0x0009;
    pub const KEY_ROTATED: u16 = 0x000a;
    pub const POLICY_CHANGED: u16 = 0x000b;
    pub const ENDPOINT_REPORT: u16 = 0x000c;
    pub const ROTATE_KEY: u16 = 0x000d;
    pub const ROTATE_KEY_OK: u16 = 0x000e;
    pub const ERROR: u16 = 0x000f;
    /// Ignorable: a node that does not know it only misses news about itself.
    pub const NODE_UPDATED: u16 = 0x8001;
    /// Ignorable: a node that does not know it cannot use relays.
    pub const RELAY_MAP: u16 = 0x8002;
}

/// Message types with this bit set may be skipped by a receiver that does not
/// know them; any other unknown type is an error.
pub const IGNORABLE_MESSAGE: u16 = 0x8000;

impl Message {
    pub fn msg_type(&self) -> u16 {
        use msg_type::*;
        match self {
            Message::Challenge(_) => CHALLENGE,
            Message::Register(_) => REGISTER,
            Message::Login(_) => LOGIN,
            Message::RegisterOk(_) => REGISTER_OK,
            Message::LoginOk(_) => LOGIN_OK,
            Message::PeerMap(_) => PEER_MAP,
            Message::PeerAdded(_) => PEER_ADDED,
            Message::PeerRemoved(_) => PEER_REMOVED,
            Message::EndpointChanged(_) => ENDPOINT_CHANGED,
            Message::KeyRotated(_) => KEY_ROTATED,
            Message::PolicyChanged(_) => POLICY_CHANGED,
            Message::EndpointReport(_) => ENDPOINT_REPORT,
            Message::RotateKey(_) => ROTATE_KEY,
            Message::RotateKeyOk(_) => ROTATE_KEY_OK,
            Message::Error(_) => ERROR,
            Message::NodeUpdated(_) => NODE_UPDATED,
            Message::RelayMap(_) => RELAY_MAP,
        }
    }

    /// A short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Challenge(_) => "Challenge",
            Message::Register(_) => "Register",
            Message::Login(_) => "Login",
            Message::RegisterOk(_) => "RegisterOk",
            Message::LoginOk(_) => "LoginOk",
            Message::PeerMap(_) => "PeerMap",
            Message::PeerAdded(_) => "PeerAdded",
            Message::PeerRemoved(_) => "PeerRemoved",
            Message::EndpointChanged(_) => "EndpointChanged",
            Message::KeyRotated(_) => "KeyRotated",
            Message::PolicyChanged(_) => "PolicyChanged",
            Message::EndpointReport(_) => "EndpointReport",
            Message::RotateKey(_) => "RotateKey",
            Message::RotateKeyOk(_) => "RotateKeyOk",
            Message::Error(_) => "Error",
            Message::NodeUpdated(_) => "NodeUpdated",
            Message::RelayMap(_) => "RelayMap",
        }
    }

    pub fn sender(&self) -> Sender {
        match self {
            Message::Register(_)
            | Message::Login(_)
            | Message::EndpointReport(_)
            | Message::RotateKey(_) => Sender::Node,
            Message::Error(_) => Sender::Either,
            _ => Sender::Coordinator,
        }
    }

    /// Appends the body (the fields after the frame header) to `buf`.
    pub(crate) fn encode_body(&self, buf: &mut Vec<u8>) -> Result<(), EncodeError> {
        let w = &mut Writer {
            buf,
            ctx: self.name(),
        };
        match self {
            Message::Challenge(m) => {
                w.bytes(1, &m.coordinator_key.0)?;
                w.bytes(2, &m.nonce)
            }
            Message::Register(m) => {
                w.bytes(1, &m.token_secret.0)?;
                w.bytes(2, &m.node_key.0)?;
                w.str(3, &m.name, MAX_NAME_LEN)?;
                w.bytes(4, &m.proof)?;
                if let Some(r) = &m.relay {
                    w.nested(JOIN_RELAY, "RelayInfo", |w| encode_relay_info(w, r))?;
                }
                w.socket_addrs(JOIN_ENDPOINTS, &m.endpoints, MAX_ENDPOINTS)
            }
            Message::Login(m) => {
                w.bytes(1, &m.node_key.0)?;
                w.bytes(2, &m.proof)?;
                if let Some(r) = &m.relay {
                    w.nested(JOIN_RELAY, "RelayInfo", |w| encode_relay_info(w, r))?;
                }
                w.socket_addrs(JOIN_ENDPOINTS, &m.endpoints, MAX_ENDPOINTS)
            }
            Message::RegisterOk(m) | Message::LoginOk(m) | Message::NodeUpdated(m) => {
                encode_node_info(w, m)
            }
            Message::PeerMap(m) => {
                w.bool(1, m.last)?;
                w.check_count(2, m.peers.len(), MAX_PEERS_PER_FRAME)?;
                m.peers
                    .iter()
                    .try_for_each(|p| w.nested(2, "Peer", |w| encode_peer(w, p)))
            }
            Message::PeerAdded(p) => encode_peer(w, p),
            Message::PeerRemoved(id) => w.u64(1, id.0),
            Message::EndpointChanged(m) => {
                w.u64(1, m.node_id.0)?;
                w.socket_addrs(2, &m.endpoints, MAX_ENDPOINTS)
            }
            Message::KeyRotated(m) => {
                w.u64(1, m.node_id.0)?;
                w.bytes(2, &m.node_key.0)
            }
            Message::PolicyChanged(m) => {
                w.check_count(1, m.rules.len(), MAX_RULES)?;
                m.rules.iter().try_for_each(|r| {
                    w.nested(1, "FilterRule", |w| {
                        w.prefix(1, r.source)?;
                        w.u8(2, r.protocol)?;
                        w.u16(3, r.ports.0)?;
                        w.u16(4, r.ports.1)
                    })
                })
            }
            Message::EndpointReport(m) => w.socket_addrs(1, &m.endpoints, MAX_ENDPOINTS),
            Message::RotateKey(m) => {
                w.bytes(1, &m.new_key.0)?;
                w.bytes(2, &m.proof)
            }
            Message::RotateKeyOk(k) => w.bytes(1, &k.0),
            Message::Error(m) => {
                w.u16(1, m.code.to_u16())?;
                w.str(2, &m.message, MAX_ERROR_MESSAGE_LEN)
            }
            Message::RelayMap(relays) => {
                w.check_count(1, relays.len(), MAX_RELAYS)?;
                relays.iter().try_for_each(|r| {
                    w.nested(1, "RelayEntry", |w| {
                        w.u64(1, r.node_id.0)?;
                        w.bytes(2, &r.key.0)?;
                        w.str(3, &r.name, MAX_NAME_LEN)?;
                        w.nested(4, "RelayInfo", |w| encode_relay_info(w, &r.info))
                    })
                })
            }
        }
    }

    /// Decodes the body of a frame of a known type; `None` for an unknown type.
    pub(crate) fn decode_body(ty: u16, body: &[u8]) -> Option<Result<Message, DecodeError>> {
        use msg_type::*;
        let decoded = match ty {
            CHALLENGE => decode_challenge(body).map(Message::Challenge),
            REGISTER => decode_register(body).map(Message::Register),
            LOGIN => decode_login(body).map(Message::Login),
            REGISTER_OK => decode_node_info(body, "RegisterOk").map(Message::RegisterOk),
            LOGIN_OK => decode_node_info(body, "LoginOk").map(Message::LoginOk),
            PEER_MAP => decode_peer_map(body).map(Message::PeerMap),
            PEER_ADDED => decode_peer(body, "PeerAdded").map(Message::PeerAdded),
            PEER_REMOVED => decode_node_id_only(body).map(Message::PeerRemoved),
            ENDPOINT_CHANGED => decode_endpoint_changed(body).map(Message::EndpointChanged),
            KEY_ROTATED => decode_key_rotated(body).map(Message::KeyRotated),
            POLICY_CHANGED => decode_policy(body).map(Message::PolicyChanged),
            ENDPOINT_REPORT => decode_endpoint_report(body).map(Message::EndpointReport),
            ROTATE_KEY => decode_rotate_key(body).map(Message::RotateKey),
            ROTATE_KEY_OK => decode_rotate_key_ok(body).map(Message::RotateKeyOk),
            ERROR => decode_error(body).map(Message::Error),
            NODE_UPDATED => decode_node_info(body, "NodeUpdated").map(Message::NodeUpdated),
            RELAY_MAP => decode_relay_map(body).map(Message::RelayMap),
            _ => return None,
        };
        Some(decoded)
    }
}

fn encode_node_info(w: &mut Writer<'_>, m: &NodeInfo) -> Result<(), EncodeError> {
    w.u64(1, m.node_id.0)?;
    w.str(2, &m.name, MAX_NAME_LEN)?;
    w.ipv4(3, m.ipv4)?;
    w.ipv6(4, m.ipv6)?;
    w.prefix(5, IpNet::V4(m.mesh_ipv4))?;
    w.prefix(6, IpNet::V6(m.mesh_ipv6))?;
    if let Some(t) = m.expires_at {
        w.u64(7, t)?;
    }
    w.strs(8, &m.tags, MAX_TAG_LEN, MAX_TAGS)
}

fn encode_relay_info(w: &mut Writer<'_>, r: &RelayInfo) -> Result<(), EncodeError> {
    w.str(1, &r.region, MAX_NAME_LEN)?;
    w.socket_addrs(2, &r.addrs, MAX_ENDPOINTS)?;
    w.u16(3, r.stun_port)?;
    w.bytes(4, &r.cert_pin)
}

fn decode_relay_info(body: &[u8]) -> Result<RelayInfo, DecodeError> {
    let mut f = Fields::new(body, "RelayInfo");
    let (mut region, mut stun_port, mut pin) = (None, None, None);
    let mut addrs = Vec::new();
    while let Some((tag, v)) = f.next_field()? {
        match tag {
            1 => f.set(&mut region, tag, f.str(tag, v, MAX_NAME_LEN)?)?,
            2 => f.push(&mut addrs, MAX_ENDPOINTS, tag, f.socket_addr(tag, v)?)?,
            3 => f.set(&mut stun_port, tag, f.u16(tag, v)?)?,
            4 => f.set(&mut pin, tag, f.array(tag, v, "32")?)?,
            t => f.unknown(t)?,
        }
    }
    Ok(RelayInfo {
        region: f.need(region, 1)?,
        addrs,
        stun_port: f.need(stun_port, 3)?,
        cert_pin: f.need(pin, 4)?,
    })
}

fn decode_relay_map(body: &[u8]) -> Result<Vec<RelayEntry>, DecodeError> {
    let mut f = Fields::new(body, "RelayMap");
    let mut relays = Vec::new();
    while let Some((tag, v)) = f.next_field()? {
        match tag {
            1 => f.push(&mut relays, MAX_RELAYS, tag, decode_relay_entry(v)?)?,
            t => f.unknown(t)?,
        }
    }
    Ok(relays)
}

fn decode_relay_entry(body: &[u8]) -> Result<RelayEntry, DecodeError> {
    let mut f = Fields::new(body, "RelayEntry");
    let (mut id, mut key, mut name, mut info) = (None, None, None, None);
    while let Some((tag, v)) = f.next_field()? {
        match tag {
            1 => f.set(&mut id, tag, NodeId(f.u64(tag, v)?))?,
            2 => f.set(&mut key, tag, NodeKey(f.array(tag, v, "32")?))?,
            3 => f.set(&mut name, tag, f.str(tag, v, MAX_NAME_LEN)?)?,
            4 => f.set(&mut info, tag, decode_relay_info(v)?)?,
            t => f.unknown(t)?,
        }
    }
    Ok(RelayEntry {
        node_id: f.need(id, 1)?,
        key: f.need(key, 2)?,
        name: f.need(name, 3)?,
        info: f.need(info, 4)?,
    })
}

fn encode_peer(w: &mut Writer<'_>, p: &Peer) -> Result<(), EncodeError> {
    w.u64(1, p.node_id.0)?;
    w.bytes(2, &p.node_key.0)?;
    w.str(3, &p.name, MAX_NAME_LEN)?;
    w.ipv4(4, p.ipv4)?;
    w.ipv6(5, p.ipv6)?;
    w.socket_addrs(6, &p.endpoints, MAX_ENDPOINTS)?;
    w.strs(7, &p.tags, MAX_TAG_LEN, MAX_TAGS)
}

fn decode_challenge(body: &[u8]) -> Result<Challenge, DecodeError> {
    let mut f = Fields::new(body, "Challenge");
    let (mut key, mut nonce) = (None, None);
    while let Some((tag, v)) = f.next_field()? {
        match tag {
            1 => f.set(&mut key, tag, NodeKey(f.array(tag, v, "32")?))?,
            2 => f.set(&mut nonce, tag, f.array(tag, v, "32")?)?,
            t => f.unknown(t)?,
        }
    }
    Ok(Challenge {
        coordinator_key: f.need(key, 1)?,
        nonce: f.need(nonce, 2)?,
    })
}

fn decode_register(body: &[u8]) -> Result<Register, DecodeError> {
    let mut f = Fields::new(body, "Register");
    let (mut secret, mut key, mut name, mut proof, mut relay) = (None, None, None, None, None);
    let mut endpoints = Vec::new();
    while let Some((tag, v)) = f.next_field()? {
        match tag {
            1 => f.set(&mut secret, tag, TokenSecret(f.array(tag, v, "32")?))?,
            2 => f.set(&mut key, tag, NodeKey(f.array(tag, v, "32")?))?,
            3 => f.set(&mut name, tag, f.str(tag, v, MAX_NAME_LEN)?)?,
            4 => f.set(&mut proof, tag, f.array(tag, v, "32")?)?,
            JOIN_RELAY => f.set(&mut relay, tag, decode_relay_info(v)?)?,
            JOIN_ENDPOINTS => f.push(&mut endpoints, MAX_ENDPOINTS, tag, f.socket_addr(tag, v)?)?,
            t => f.unknown(t)?,
        }
    }
    Ok(Register {
        token_secret: f.need(secret, 1)?,
        node_key: f.need(key, 2)?,
        name: f.need(name, 3)?,
        proof: f.need(proof, 4)?,
        endpoints,
        relay,
    })
}

fn decode_login(body: &[u8]) -> Result<Login, DecodeError> {
    let mut f = Fields::new(body, "Login");
    let (mut key, mut proof, mut relay) = (None, None, None);
    let mut endpoints = Vec::new();
    while let Some((tag, v)) = f.next_field()? {
        match tag {
            1 => f.set(&mut key, tag, NodeKey(f.array(tag, v, "32")?))?,
            2 => f.set(&mut proof, tag, f.array(tag, v, "32")?)?,
            JOIN_RELAY => f.set(&mut relay, tag, decode_relay_info(v)?)?,
            JOIN_ENDPOINTS => f.push(&mut endpoints, MAX_ENDPOINTS, tag, f.socket_addr(tag, v)?)?,
            t => f.unknown(t)?,
        }
    }
    Ok(Login {
        node_key: f.need(key, 1)?,
        proof: f.need(proof, 2)?,
        endpoints,
        relay,
    })
}

fn decode_node_info(body: &[u8], ctx: &'static str) -> Result<NodeInfo, DecodeError> {
    let mut f = Fields::new(body, ctx);
    let (mut id, mut name, mut v4, mut v6, mut net4, mut net6, mut exp) =
        (None, None, None, None, None, None, None);
    let mut tags = Vec::new();
    while let Some((tag, v)) = f.next_field()? {
        match tag {
            1 => f.set(&mut id, tag, NodeId(f.u64(tag, v)?))?,
            2 => f.set(&mut name, tag, f.str(tag, v, MAX_NAME_LEN)?)?,
            3 => f.set(&mut v4, tag, f.ipv4(tag, v)?)?,
            4 => f.set(&mut v6, tag, f.ipv6(tag, v)?)?,
            5 => match f.prefix(tag, v)? {
                IpNet::V4(n) => f.set(&mut net4, tag, n)?,
                IpNet::V6(_) => return Err(wrong_family(ctx, tag)),
            },
            6 => match f.prefix(tag, v)? {
                IpNet::V6(n) => f.set(&mut net6, tag, n)?,
                IpNet::V4(_) => return Err(wrong_family(ctx, tag)),
            },
            7 => f.set(&mut exp, tag, f.u64(tag, v)?)?,
            8 => f.push(&mut tags, MAX_TAGS, tag, f.str(tag, v, MAX_TAG_LEN)?)?,
            t => f.unknown(t)?,
        }
    }
    Ok(NodeInfo {
        node_id: f.need(id, 1)?,
        name: f.need(name, 2)?,
        ipv4: f.need(v4, 3)?,
        ipv6: f.need(v6, 4)?,
        mesh_ipv4: f.need(net4, 5)?,
        mesh_ipv6: f.need(net6, 6)?,
        expires_at: exp,
        tags,
    })
}

fn wrong_family(ctx: &'static str, tag: u8) -> DecodeError {
    DecodeError::InvalidValue {
        ctx,
        tag,
        reason: "prefix of the wrong address family",
    }
}

fn decode_peer(body: &[u8], ctx: &'static str) -> Result<Peer, DecodeError> {
    let mut f = Fields::new(body, ctx);
    let (mut id, mut key, mut name, mut v4, mut v6) = (None, None, None, None, None);
    let (mut endpoints, mut tags) = (Vec::new(), Vec::new());
    while let Some((tag, v)) = f.next_field()? {
        match tag {
            1 => f.set(&mut id, tag, NodeId(f.u64(tag, v)?))?,
            2 => f.set(&mut key, tag, NodeKey(f.array(tag, v, "32")?))?,
            3 => f.set(&mut name, tag, f.str(tag, v, MAX_NAME_LEN)?)?,
            4 => f.set(&mut v4, tag, f.ipv4(tag, v)?)?,
            5 => f.set(&mut v6, tag, f.ipv6(tag, v)?)?,
            6 => f.push(&mut endpoints, MAX_ENDPOINTS, tag, f.socket_addr(tag, v)?)?,
            7 => f.push(&mut tags, MAX_TAGS, tag, f.str(tag, v, MAX_TAG_LEN)?)?,
            t => f.unknown(t)?,
        }
    }
    Ok(Peer {
        node_id: f.need(id, 1)?,
        node_key: f.need(key, 2)?,
        name: f.need(name, 3)?,
        ipv4: f.need(v4, 4)?,
        ipv6: f.need(v6, 5)?,
        endpoints,
        tags,
    })
}

fn decode_peer_map(body: &[u8]) -> Result<PeerMap, DecodeError> {
    let mut f = Fields::new(body, "PeerMap");
    let mut last = None;
    let mut peers = Vec::new();
    while let Some((tag, v)) = f.next_field()? {
        match tag {
            1 => f.set(&mut last, tag, f.bool(tag, v)?)?,
            2 => f.push(
                &mut peers,
                MAX_PEERS_PER_FRAME,
                tag,
                decode_peer(v, "Peer")?,
            )?,
            t => f.unknown(t)?,
        }
    }
    Ok(PeerMap {
        peers,
        last: f.need(last, 1)?,
    })
}

fn decode_node_id_only(body: &[u8]) -> Result<NodeId, DecodeError> {
    let mut f = Fields::new(body, "PeerRemoved");
    let mut id = None;
    while let Some((tag, v)) = f.next_field()? {
        match tag {
            1 => f.set(&mut id, tag, NodeId(f.u64(tag, v)?))?,
            t => f.unknown(t)?,
        }
    }
    f.need(id, 1)
}

fn decode_endpoint_changed(body: &[u8]) -> Result<EndpointChanged, DecodeError> {
    let mut f = Fields::new(body, "EndpointChanged");
    let mut id = None;
    let mut endpoints = Vec::new();
    while let Some((tag, v)) = f.next_field()? {
        match tag {
            1 => f.set(&mut id, tag, NodeId(f.u64(tag, v)?))?,
            2 => f.push(&mut endpoints, MAX_ENDPOINTS, tag, f.socket_addr(tag, v)?)?,
            t => f.unknown(t)?,
        }
    }
    Ok(EndpointChanged {
        node_id: f.need(id, 1)?,
        endpoints,
    })
}

fn decode_key_rotated(body: &[u8]) -> Result<KeyRotated, DecodeError> {
    let mut f = Fields::new(body, "KeyRotated");
    let (mut id, mut key) = (None, None);
    while let Some((tag, v)) = f.next_field()? {
        match tag {
            1 => f.set(&mut id, tag, NodeId(f.u64(tag, v)?))?,
            2 => f.set(&mut key, tag, NodeKey(f.array(tag, v, "32")?))?,
            t => f.unknown(t)?,
        }
    }
    Ok(KeyRotated {
        node_id: f.need(id, 1)?,
        node_key: f.need(key, 2)?,
    })
}

fn decode_rule(body: &[u8]) -> Result<FilterRule, DecodeError> {
    let mut f = Fields::new(body, "FilterRule");
    let (mut source, mut protocol, mut lo, mut hi) = (None, None, None, None);
    while let Some((tag, v)) = f.next_field()? {
        match tag {
            1 => f.set(&mut source, tag, f.prefix(tag, v)?)?,
            2 => f.set(&mut protocol, tag, f.u8(tag, v)?)?,
            3 => f.set(&mut lo, tag, f.u16(tag, v)?)?,
            4 => f.set(&mut hi, tag, f.u16(tag, v)?)?,
            t => f.unknown(t)?,
        }
    }
    let ports = (f.need(lo, 3)?, f.need(hi, 4)?);
    if ports.0 > ports.1 {
        return Err(DecodeError::InvalidValue {
            ctx: "FilterRule",
            tag: 4,
            reason: "last port below first port",
        });
    }
    Ok(FilterRule {
        source: f.need(source, 1)?,
        protocol: f.need(protocol, 2)?,
        ports,
    })
}

fn decode_policy(body: &[u8]) -> Result<PolicyChanged, DecodeError> {
    let mut f = Fields::new(body, "PolicyChanged");
    let mut rules = Vec::new();
    while let Some((tag, v)) = f.next_field()? {
        match tag {
            1 => f.push(&mut rules, MAX_RULES, tag, decode_rule(v)?)?,
            t => f.unknown(t)?,
        }
    }
    Ok(PolicyChanged { rules })
}

fn decode_endpoint_report(body: &[u8]) -> Result<EndpointReport, DecodeError> {
    let mut f = Fields::new(body, "EndpointReport");
    let mut endpoints = Vec::new();
    while let Some((tag, v)) = f.next_field()? {
        match tag {
            1 => f.push(&mut endpoints, MAX_ENDPOINTS, tag, f.socket_addr(tag, v)?)?,
            t => f.unknown(t)?,
        }
    }
    Ok(EndpointReport { endpoints })
}

fn decode_rotate_key(body: &[u8]) -> Result<RotateKey, DecodeError> {
    let mut f = Fields::new(body, "RotateKey");
    let (mut key, mut proof) = (None, None);
    while let Some((tag, v)) = f.next_field()? {
        match tag {
            1 => f.set(&mut key, tag, NodeKey(f.array(tag, v, "32")?))?,
            2 => f.set(&mut proof, tag, f.array(tag, v, "32")?)?,
            t => f.unknown(t)?,
        }
    }
    Ok(RotateKey {
        new_key: f.need(key, 1)?,
        proof: f.need(proof, 2)?,
    })
}

fn decode_rotate_key_ok(body: &[u8]) -> Result<NodeKey, DecodeError> {
    let mut f = Fields::new(body, "RotateKeyOk");
    let mut key = None;
    while let Some((tag, v)) = f.next_field()? {
        match tag {
            1 => f.set(&mut key, tag, NodeKey(f.array(tag, v, "32")?))?,
            t => f.unknown(t)?,
        }
    }
    f.need(key, 1)
}

fn decode_error(body: &[u8]) -> Result<ErrorMessage, DecodeError> {
    let mut f = Fields::new(body, "Error");
    let (mut code, mut message) = (None, None);
    while let Some((tag, v)) = f.next_field()? {
        match tag {
            1 => f.set(&mut code, tag, ErrorCode::from_u16(f.u16(tag, v)?))?,
            2 => f.set(&mut message, tag, f.str(tag, v, MAX_ERROR_MESSAGE_LEN)?)?,
            t => f.unknown(t)?,
        }
    }
    Ok(ErrorMessage {
        code: f.need(code, 1)?,
        message: f.need(message, 2)?,
    })
}
