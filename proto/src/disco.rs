//! Discovery packets (docs/disco-protocol.md): the pings, pongs and
//! call-me-maybes that NAT traversal sends between two nodes, on the
//! WireGuard UDP socket and through relays.
//!
//! A packet is `magic | version | sender key | nonce | box`: the box is
//! XChaCha20-Poly1305 under a key derived from X25519(sender's WireGuard
//! key, receiver's WireGuard key) and both public keys in sending order, so
//! only the two nodes can read or forge it and a packet reflected back to
//! its sender does not open. The magic's first byte, 0xFF, can start neither
//! a WireGuard message (1..=4) nor a STUN message (top two bits zero), so
//! the three share one socket. Sans-IO: the nonce comes from the caller.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::message::NodeKey;

type HmacSha256 = Hmac<Sha256>;

/// The first bytes of every disco packet: 0xFF then "mdsc".
pub const MAGIC: [u8; 5] = [0xFF, b'm', b'd', b's', b'c'];
/// The disco version this build speaks; the byte after the magic.
pub const VERSION: u8 = 1;
/// Magic, version and the sender's key: authenticated, not encrypted.
const AAD_LEN: usize = MAGIC.len() + 1 + 32;
/// Everything before the box.
pub const HEADER_LEN: usize = AAD_LEN + NONCE_LEN;
pub const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// Most endpoint candidates in one CallMeMaybe (as many as a node may report
/// to the coordinator).
pub const MAX_CANDIDATES: usize = crate::MAX_ENDPOINTS;
/// An encoded address: family, IPv6 address, port.
const MAX_ADDR_LEN: usize = 1 + 16 + 2;
/// The largest plaintext: a CallMeMaybe with every candidate an IPv6 one.
const MAX_PLAINTEXT_LEN: usize = 1 + 1 + MAX_CANDIDATES * MAX_ADDR_LEN;
/// The largest packet this build sends or accepts. Far below 1280 bytes (the
/// IPv6 minimum MTU), so no disco packet is ever fragmented.
pub const MAX_PACKET_LEN: usize = HEADER_LEN + MAX_PLAINTEXT_LEN + TAG_LEN;
const _: () = assert!(MAX_PACKET_LEN <= 1280 - 48);

const KDF_SALT: &[u8] = b"meshd disco v1";
const KDF_INFO: &[u8] = b"meshd disco v1 box key";

const TYPE_PING: u8 = 1;
const TYPE_PONG: u8 = 2;
const TYPE_CALL_ME_MAYBE: u8 = 3;
const TYPE_BIRTHDAY: u8 = 4;

/// A ping's transaction id: its pong carries it back.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TxId(pub [u8; 12]);

impl fmt::Debug for TxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TxId(")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        f.write_str(")")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// "Are you there on this path?"
    Ping { txid: TxId },
    /// The answer to a ping, sent back the way the ping came, with the
    /// address the ping came from as the receiver saw it (for a ping that
    /// came through a relay, `0.0.0.0:0`).
    Pong { txid: TxId, observed: SocketAddr },
    /// "Ping me on these addresses now": sent through the relay so both
    /// sides send towards each other at the same time.
    CallMeMaybe { candidates: Vec<SocketAddr> },
    /// A step of the birthday technique between a node whose NAT maps per
    /// destination and one whose NAT does not (docs/disco-protocol.md),
    /// sent through the relay. `addr` is the sender's public address.
    Birthday {
        step: BirthdayStep,
        addr: SocketAddr,
    },
}

/// Which step of the birthday exchange a [`Message::Birthday`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BirthdayStep {
    /// From the hard side: "my mapping varies by destination; my public
    /// address is `addr`" (the peer probes ports of its IP).
    Offer = 1,
    /// From the easy side: "send from your extra sockets to `addr`".
    Accept = 2,
    /// From the hard side: "my extra sockets have sent to you: probe now".
    Go = 3,
}

impl Message {
    fn name(&self) -> &'static str {
        match self {
            Message::Ping { .. } => "ping",
            Message::Pong { .. } => "pong",
            Message::CallMeMaybe { .. } => "call-me-maybe",
            Message::Birthday { .. } => "birthday",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiscoError {
    #[error("not a disco packet: {len} bytes without the 0xFF \"mdsc\" prefix and a full header")]
    NotDisco { len: usize },
    #[error("disco version {0} is not supported (this side speaks version {VERSION})")]
    UnsupportedVersion(u8),
    #[error("disco packet of {0} bytes is longer than the maximum of {MAX_PACKET_LEN}")]
    TooLong(usize),
    #[error("disco packet of {0} bytes is too short to hold a sealed box")]
    TooShort(usize),
    /// A low-order key makes the shared secret a constant anyone can compute.
    #[error("key {0} is a low-order point and cannot be used")]
    LowOrderKey(NodeKey),
    #[error("disco packet from {got}, but these keys are for {expected}")]
    WrongSender { got: NodeKey, expected: NodeKey },
    #[error("disco packet claiming to be from {0} does not authenticate")]
    BadSeal(NodeKey),
    #[error("disco message type {0:#04x} is unknown")]
    UnknownType(u8),
    #[error("empty disco message")]
    Empty,
    #[error("{what}: ends after {have} bytes, {need} needed")]
    Truncated {
        what: &'static str,
        have: usize,
        need: usize,
    },
    #[error("{what}: {extra} bytes after the message")]
    TrailingBytes { what: &'static str, extra: usize },
    #[error("{what}: address family {family} is neither 4 nor 6")]
    BadFamily { what: &'static str, family: u8 },
    #[error("call-me-maybe with {0} candidates, more than the limit of {MAX_CANDIDATES}")]
    TooManyCandidates(usize),
    #[error("birthday step {0} is neither 1, 2 nor 3")]
    BadBirthdayStep(u8),
}

/// Whether `packet` is meant to be a disco packet (it may still fail to
/// open): the magic prefix and room for a header and an empty box.
pub fn is_disco(packet: &[u8]) -> bool {
    packet.len() >= HEADER_LEN + TAG_LEN && packet.starts_with(&MAGIC)
}

/// The sender's key as the packet claims it, so the receiver can find the
/// peer's [`DiscoKeys`]. Only [`DiscoKeys::open`] proves it.
pub fn sender(packet: &[u8]) -> Result<NodeKey, DiscoError> {
    if !is_disco(packet) {
        return Err(DiscoError::NotDisco { len: packet.len() });
    }
    if packet.len() > MAX_PACKET_LEN {
        return Err(DiscoError::TooLong(packet.len()));
    }
    let version = packet[MAGIC.len()];
    if version != VERSION {
        return Err(DiscoError::UnsupportedVersion(version));
    }
    let mut key = [0; 32];
    key.copy_from_slice(&packet[MAGIC.len() + 1..AAD_LEN]);
    Ok(NodeKey(key))
}

/// The two boxes between this node and one peer: one for each direction.
/// Deriving them costs an X25519 multiplication, so a node keeps one per
/// peer rather than per packet.
pub struct DiscoKeys {
    own: NodeKey,
    peer: NodeKey,
    seal: XChaCha20Poly1305,
    open: XChaCha20Poly1305,
}

impl fmt::Debug for DiscoKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiscoKeys")
            .field("own", &self.own)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl DiscoKeys {
    pub fn new(own_secret: &StaticSecret, peer: NodeKey) -> Result<Self, DiscoError> {
        let own = NodeKey(PublicKey::from(own_secret).to_bytes());
        let shared = own_secret.diffie_hellman(&PublicKey::from(peer.0));
        if !shared.was_contributory() {
            return Err(DiscoError::LowOrderKey(peer));
        }
        let seal = box_key(shared.as_bytes(), own, peer);
        let open = box_key(shared.as_bytes(), peer, own);
        Ok(DiscoKeys {
            own,
            peer,
            seal,
            open,
        })
    }

    pub fn peer(&self) -> NodeKey {
        self.peer
    }

    /// Seals `msg` for the peer. `nonce` must never repeat for this pair of
    /// keys: draw it at random (24 bytes make collisions negligible).
    pub fn seal(&self, msg: &Message, nonce: [u8; NONCE_LEN]) -> Result<Vec<u8>, DiscoError> {
        let plaintext = encode(msg)?;
        let mut packet = Vec::with_capacity(HEADER_LEN + plaintext.len() + TAG_LEN);
        packet.extend_from_slice(&MAGIC);
        packet.push(VERSION);
        packet.extend_from_slice(&self.own.0);
        let sealed = self
            .seal
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &plaintext,
                    aad: &packet,
                },
            )
            .map_err(|_| DiscoError::TooLong(plaintext.len()))?;
        packet.extend_from_slice(&nonce);
        packet.extend_from_slice(&sealed);
        Ok(packet)
    }

    /// Opens a packet from the peer; anything else is an error.
    pub fn open(&self, packet: &[u8]) -> Result<Message, DiscoError> {
        let got = sender(packet)?;
        if got != self.peer {
            return Err(DiscoError::WrongSender {
                got,
                expected: self.peer,
            });
        }
        let (aad, rest) = packet.split_at(AAD_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let plaintext = self
            .open
            .decrypt(XNonce::from_slice(nonce), Payload { msg: sealed, aad })
            .map_err(|_| DiscoError::BadSeal(got))?;
        decode(&plaintext)
    }
}

/// HKDF-SHA256 (RFC 5869) of the shared secret with one output block; the
/// info names both keys in sending order, so each direction has its own key.
fn box_key(shared: &[u8; 32], from: NodeKey, to: NodeKey) -> XChaCha20Poly1305 {
    let mut extract =
        <HmacSha256 as Mac>::new_from_slice(KDF_SALT).expect("HMAC takes a key of any length");
    extract.update(shared);
    let prk = extract.finalize().into_bytes();
    let mut expand =
        <HmacSha256 as Mac>::new_from_slice(&prk).expect("HMAC takes a key of any length");
    expand.update(KDF_INFO);
    expand.update(&from.0);
    expand.update(&to.0);
    expand.update(&[1]);
    XChaCha20Poly1305::new(&expand.finalize().into_bytes())
}

/// The plaintext of a message: `type | body`.
pub fn encode(msg: &Message) -> Result<Vec<u8>, DiscoError> {
    let mut out = Vec::with_capacity(MAX_PLAINTEXT_LEN);
    match msg {
        Message::Ping { txid } => {
            out.push(TYPE_PING);
            out.extend_from_slice(&txid.0);
        }
        Message::Pong { txid, observed } => {
            out.push(TYPE_PONG);
            out.extend_from_slice(&txid.0);
            put_addr(&mut out, *observed);
        }
        Message::CallMeMaybe { candidates } => {
            let count = u8::try_from(candidates.len())
                .ok()
                .filter(|&n| usize::from(n) <= MAX_CANDIDATES)
                .ok_or(DiscoError::TooManyCandidates(candidates.len()))?;
            out.push(TYPE_CALL_ME_MAYBE);
            out.push(count);
            for a in candidates {
                put_addr(&mut out, *a);
            }
        }
        Message::Birthday { step, addr } => {
            out.push(TYPE_BIRTHDAY);
            out.push(*step as u8);
            put_addr(&mut out, *addr);
        }
    }
    Ok(out)
}

/// Parses a plaintext; every byte must belong to the message.
pub fn decode(plaintext: &[u8]) -> Result<Message, DiscoError> {
    let (&kind, body) = plaintext.split_first().ok_or(DiscoError::Empty)?;
    let mut r = Reader {
        what: "",
        rest: body,
        read: 1,
    };
    let msg = match kind {
        TYPE_PING => {
            r.what = "ping";
            Message::Ping { txid: r.txid()? }
        }
        TYPE_PONG => {
            r.what = "pong";
            Message::Pong {
                txid: r.txid()?,
                observed: r.addr()?,
            }
        }
        TYPE_CALL_ME_MAYBE => {
            r.what = "call-me-maybe";
            let count = usize::from(r.bytes(1)?[0]);
            if count > MAX_CANDIDATES {
                return Err(DiscoError::TooManyCandidates(count));
            }
            let candidates = (0..count).map(|_| r.addr()).collect::<Result<_, _>>()?;
            Message::CallMeMaybe { candidates }
        }
        TYPE_BIRTHDAY => {
            r.what = "birthday";
            let step = match r.bytes(1)?[0] {
                1 => BirthdayStep::Offer,
                2 => BirthdayStep::Accept,
                3 => BirthdayStep::Go,
                other => return Err(DiscoError::BadBirthdayStep(other)),
            };
            Message::Birthday {
                step,
                addr: r.addr()?,
            }
        }
        other => return Err(DiscoError::UnknownType(other)),
    };
    if !r.rest.is_empty() {
        return Err(DiscoError::TrailingBytes {
            what: msg.name(),
            extra: r.rest.len(),
        });
    }
    Ok(msg)
}

fn put_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

struct Reader<'a> {
    what: &'static str,
    rest: &'a [u8],
    /// Bytes consumed so far, type byte included, for error messages.
    read: usize,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], DiscoError> {
        if self.rest.len() < n {
            return Err(DiscoError::Truncated {
                what: self.what,
                have: self.read + self.rest.len(),
                need: self.read + n,
            });
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        self.read += n;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DiscoError> {
        let mut a = [0; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    fn txid(&mut self) -> Result<TxId, DiscoError> {
        Ok(TxId(self.array()?))
    }

    fn addr(&mut self) -> Result<SocketAddr, DiscoError> {
        let ip = match self.bytes(1)?[0] {
            4 => IpAddr::V4(Ipv4Addr::from(self.array::<4>()?)),
            6 => IpAddr::V6(Ipv6Addr::from(self.array::<16>()?)),
            family => {
                return Err(DiscoError::BadFamily {
                    what: self.what,
                    family,
                })
            }
        };
        let port = u16::from_be_bytes(self.array()?);
        Ok(SocketAddr::new(ip, port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(n: u8) -> StaticSecret {
        StaticSecret::from([n; 32])
    }

    fn key(n: u8) -> NodeKey {
        NodeKey(PublicKey::from(&secret(n)).to_bytes())
    }

    fn pair() -> (DiscoKeys, DiscoKeys) {
        (
            DiscoKeys::new(&secret(1), key(2)).unwrap(),
            DiscoKeys::new(&secret(2), key(1)).unwrap(),
        )
    }

    fn messages() -> Vec<Message> {
        vec![
            Message::Ping {
                txid: TxId([7; 12]),
            },
            Message::Pong {
                txid: TxId([9; 12]),
                observed: "198.51.100.7:41641".parse().unwrap(),
            },
            Message::Pong {
                txid: TxId([0; 12]),
                observed: "[2001:db8::1]:51820".parse().unwrap(),
            },
            Message::CallMeMaybe { candidates: vec![] },
            Message::CallMeMaybe {
                candidates: (0..MAX_CANDIDATES as u16)
                    .map(|p| SocketAddr::new("2001:db8::2".parse().unwrap(), p))
                    .collect(),
            },
            Message::Birthday {
                step: BirthdayStep::Offer,
                addr: "198.51.100.7:1".parse().unwrap(),
            },
            Message::Birthday {
                step: BirthdayStep::Accept,
                addr: "[2001:db8::1]:51820".parse().unwrap(),
            },
            Message::Birthday {
                step: BirthdayStep::Go,
                addr: "203.0.113.9:65535".parse().unwrap(),
            },
        ]
    }

    #[test]
    fn every_message_round_trips_between_the_two_nodes() {
        let (a, b) = pair();
        for (i, msg) in messages().into_iter().enumerate() {
            let packet = a.seal(&msg, [i as u8; NONCE_LEN]).unwrap();
            assert!(is_disco(&packet));
            assert!(packet.len() <= MAX_PACKET_LEN);
            assert_eq!(sender(&packet), Ok(key(1)));
            assert_eq!(b.open(&packet), Ok(msg));
        }
    }

    #[test]
    fn the_largest_message_is_exactly_the_maximum_packet() {
        let (a, _) = pair();
        let largest = messages()
            .into_iter()
            .max_by_key(|m| encode(m).unwrap().len())
            .unwrap();
        assert_eq!(a.seal(&largest, [0; 24]).unwrap().len(), MAX_PACKET_LEN);
    }

    #[test]
    fn only_the_addressee_opens_and_nobody_forges() {
        let (a, b) = pair();
        let packet = a.seal(&messages()[0], [1; 24]).unwrap();
        // Reflected back to its sender: the direction is part of the key.
        let back = DiscoKeys::new(&secret(1), key(1)).unwrap();
        assert_eq!(back.open(&packet), Err(DiscoError::BadSeal(key(1))));
        // A third node that knows both public keys.
        let c = DiscoKeys::new(&secret(3), key(1)).unwrap();
        assert_eq!(c.open(&packet), Err(DiscoError::BadSeal(key(1))));
        // Every single bit flipped anywhere after the magic and version.
        for i in MAGIC.len() + 1..packet.len() {
            let mut p = packet.clone();
            p[i] ^= 0x10;
            assert!(b.open(&p).is_err(), "byte {i} changed and it opened");
        }
        // A packet that names another sender.
        let mut p = packet.clone();
        p[MAGIC.len() + 1..AAD_LEN].copy_from_slice(&key(3).0);
        assert_eq!(
            b.open(&p),
            Err(DiscoError::WrongSender {
                got: key(3),
                expected: key(1)
            })
        );
    }

    #[test]
    fn wireguard_and_stun_are_never_disco() {
        let mut wg = vec![0u8; 148];
        for t in 1..=4 {
            wg[0] = t;
            assert!(!is_disco(&wg));
        }
        let mut stun = vec![0u8; 100];
        stun[..2].copy_from_slice(&[0x00, 0x01]);
        stun[4..8].copy_from_slice(&0x2112_A442u32.to_be_bytes());
        assert!(!is_disco(&stun));
        assert!(!is_disco(&MAGIC));
    }

    #[test]
    fn low_order_keys_are_refused() {
        assert_eq!(
            DiscoKeys::new(&secret(1), NodeKey([0; 32])).unwrap_err(),
            DiscoError::LowOrderKey(NodeKey([0; 32]))
        );
    }

    #[test]
    fn malformed_headers_are_errors() {
        let (a, b) = pair();
        let packet = a.seal(&messages()[1], [2; 24]).unwrap();
        let mut v2 = packet.clone();
        v2[MAGIC.len()] = 2;
        assert_eq!(b.open(&v2), Err(DiscoError::UnsupportedVersion(2)));
        assert_eq!(
            b.open(&packet[..HEADER_LEN]),
            Err(DiscoError::NotDisco { len: HEADER_LEN })
        );
        let mut long = packet.clone();
        long.resize(MAX_PACKET_LEN + 1, 0);
        assert_eq!(b.open(&long), Err(DiscoError::TooLong(MAX_PACKET_LEN + 1)));
    }

    #[test]
    fn malformed_plaintexts_are_errors_that_say_what_was_wrong() {
        let check = |bytes: &[u8], want: DiscoError| assert_eq!(decode(bytes), Err(want));
        check(&[], DiscoError::Empty);
        check(&[9], DiscoError::UnknownType(9));
        check(
            &[TYPE_PING, 1, 2],
            DiscoError::Truncated {
                what: "ping",
                have: 3,
                need: 13,
            },
        );
        check(
            &[[TYPE_PING].as_slice(), &[0; 13]].concat(),
            DiscoError::TrailingBytes {
                what: "ping",
                extra: 1,
            },
        );
        check(
            &[[TYPE_PONG].as_slice(), &[0; 12], &[5]].concat(),
            DiscoError::BadFamily {
                what: "pong",
                family: 5,
            },
        );
        check(&[TYPE_CALL_ME_MAYBE, 17], DiscoError::TooManyCandidates(17));
        check(
            &[TYPE_CALL_ME_MAYBE, 1, 4, 1, 2, 3],
            DiscoError::Truncated {
                what: "call-me-maybe",
                have: 6,
                need: 7,
            },
        );
        check(&[TYPE_BIRTHDAY, 4], DiscoError::BadBirthdayStep(4));
        check(
            &[TYPE_BIRTHDAY, 1, 4, 1, 2, 3, 4, 0],
            DiscoError::Truncated {
                what: "birthday",
                have: 8,
                need: 9,
            },
        );
        check(
            &[TYPE_BIRTHDAY, 3, 4, 1, 2, 3, 4, 0, 1, 0],
            DiscoError::TrailingBytes {
                what: "birthday",
                extra: 1,
            },
        );
        let too_many = Message::CallMeMaybe {
            candidates: vec!["192.0.2.1:1".parse().unwrap(); MAX_CANDIDATES + 1],
        };
        assert_eq!(
            encode(&too_many),
            Err(DiscoError::TooManyCandidates(MAX_CANDIDATES + 1))
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            let (_, b) = pair();
            let _ = decode(&bytes);
            let _ = sender(&bytes);
            let mut p = MAGIC.to_vec();
            p.push(VERSION);
            p.extend_from_slice(&key(1).0);
            p.extend_from_slice(&bytes);
            let _ = b.open(&p);
        }
    }
}
