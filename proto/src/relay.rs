//! The relay protocol (docs/relay-protocol.md): frames between a node and a
//! relay, and between meshed relays, as `type:u8 | length:u16be | body`.
//!
//! Frames borrow their datagrams from the buffer they were decoded from, so
//! relaying a packet copies it but allocates nothing. Sans-IO: no socket,
//! no clock.

use std::fmt;

use crate::message::NodeKey;

/// ALPN protocol id of relay protocol version 1, on QUIC and on TLS/TCP.
pub const ALPN: &[u8] = b"meshd-relay/1";
/// TLS exporter label of a relay connection's channel binding.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-meshd-relay";
/// The name in a relay's self-signed certificate; clients check its pin,
/// not the name.
pub const SERVER_NAME: &str = "meshd-relay";

/// Bytes before a frame's body: type and length.
pub const HEADER_LEN: usize = 3;
/// Largest body: what its `u16` length can say.
pub const MAX_BODY: usize = u16::MAX as usize;
/// Largest datagram any packet frame carries: the room a `ForwardPacket`
/// leaves after its two keys, so every packet a client may send can also
/// cross a relay mesh.
pub const MAX_DATAGRAM: usize = MAX_BODY - 64;
/// Longest `Error` message, in bytes of UTF-8.
pub const MAX_ERROR_MESSAGE: usize = 1024;
/// Frame types at or above this value are skipped by a receiver that does
/// not know them; an unknown type below it is an error.
pub const IGNORABLE_TYPE: u8 = 0x80;

/// Frame type numbers.
pub mod ty {
    pub const SERVER_HELLO: u8 = 0x01;
    pub const CLIENT_AUTH: u8 = 0x02;
    pub const SERVER_OK: u8 = 0x03;
    pub const ERROR: u8 = 0x04;
    pub const SEND_PACKET: u8 = 0x05;
    pub const RECV_PACKET: u8 = 0x06;
    pub const KEEP_ALIVE: u8 = 0x07;
    pub const PING: u8 = 0x08;
    pub const PONG: u8 = 0x09;
    pub const PEER_GONE: u8 = 0x0a;
    pub const PEER_PRESENT: u8 = 0x0b;
    pub const PEER_ABSENT: u8 = 0x0c;
    pub const FORWARD_PACKET: u8 = 0x0d;
}

/// Why a relay refused or ended a connection (`Error` frames).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The peer's bytes did not decode.
    Malformed,
    /// A frame that decoded but is not allowed now or from that side.
    UnexpectedFrame,
    /// The proof of key possession does not verify.
    BadProof,
    /// A low-order public key.
    InvalidKey,
    /// The key is not a member of the mesh (never was, or was removed).
    NotMember,
    /// A newer connection with the same key replaced this one.
    Replaced,
    /// No `ClientAuth` within the handshake timeout.
    HandshakeTimeout,
    /// The relay is shutting down.
    ShuttingDown,
    /// A code this side does not know; kept so it can be shown.
    Other(u16),
}

impl ErrorCode {
    const TABLE: [(ErrorCode, u16); 8] = [
        (ErrorCode::Malformed, 1),
        (ErrorCode::UnexpectedFrame, 2),
        (ErrorCode::BadProof, 3),
        (ErrorCode::InvalidKey, 4),
        (ErrorCode::NotMember, 5),
        (ErrorCode::Replaced, 6),
        (ErrorCode::HandshakeTimeout, 7),
        (ErrorCode::ShuttingDown, 8),
    ];

    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::Other(c) => c,
            known => Self::TABLE
                .iter()
                .find(|(c, _)| *c == known)
                .map_or(0, |&(_, n)| n),
        }
    }

    pub fn from_u16(n: u16) -> Self {
        Self::TABLE
            .iter()
            .find(|&&(_, v)| v == n)
            .map_or(ErrorCode::Other(n), |&(c, _)| c)
    }
}

/// Why a destination cannot be reached (`PeerGone` frames).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GoneReason {
    /// Not connected to this relay nor to any relay it is meshed with.
    NotConnected,
    /// A reason this side does not know.
    Other(u8),
}

impl GoneReason {
    pub fn to_u8(self) -> u8 {
        match self {
            GoneReason::NotConnected => 1,
            GoneReason::Other(r) => r,
        }
    }

    pub fn from_u8(n: u8) -> Self {
        match n {
            1 => GoneReason::NotConnected,
            r => GoneReason::Other(r),
        }
    }
}

/// One frame. Packet frames borrow their datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Relay → client, first: the relay's static key and a fresh nonce.
    ServerHello {
        relay_key: NodeKey,
        nonce: [u8; 32],
    },
    /// Client → relay: who the client is and its proof of possession.
    ClientAuth {
        node_key: NodeKey,
        proof: [u8; 32],
    },
    /// Relay → client: authenticated; packets may flow.
    ServerOk,
    /// Either side, last: why the connection ends.
    Error {
        code: ErrorCode,
        message: &'a str,
    },
    /// Client → relay: deliver `datagram` to `dst`.
    SendPacket {
        dst: NodeKey,
        datagram: &'a [u8],
    },
    /// Relay → client: `datagram` from the authenticated key `src`.
    RecvPacket {
        src: NodeKey,
        datagram: &'a [u8],
    },
    /// Either side: nothing; keeps middleboxes' state alive.
    KeepAlive,
    /// Either side: answer with a `Pong` carrying the same bytes.
    Ping([u8; 8]),
    Pong([u8; 8]),
    /// Relay → client: packets for `key` cannot be delivered.
    PeerGone {
        key: NodeKey,
        reason: GoneReason,
    },
    /// Relay ↔ relay: `key` is connected to the sender.
    PeerPresent(NodeKey),
    /// Relay ↔ relay: `key` is no longer connected to the sender.
    PeerAbsent(NodeKey),
    /// Relay ↔ relay: deliver to `dst`, a client of the receiver, a packet
    /// the sender received from its authenticated client `src`.
    ForwardPacket {
        src: NodeKey,
        dst: NodeKey,
        datagram: &'a [u8],
    },
}

/// Why bytes did not decode as a frame. After one, the stream is out of
/// step: answer with `Error{Malformed}` and close.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("unknown relay frame type {0:#04x} (below 0x80, so it may not be skipped)")]
    UnknownType(u8),
    #[error("{name} frame has a body of {len} bytes, expected {expected}")]
    BadLength {
        name: &'static str,
        len: usize,
        expected: &'static str,
    },
    #[error("Error frame: the message is not valid UTF-8")]
    InvalidUtf8,
    #[error("stream ended inside a relay frame: {have} of {need} bytes received")]
    Truncated { have: usize, need: usize },
}

/// Why a frame could not be encoded: a receiver would refuse it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("datagram of {len} bytes exceeds the relay's limit of {max}")]
    DatagramTooLarge { len: usize, max: usize },
    #[error("error message of {len} bytes exceeds the limit of {max}")]
    MessageTooLong { len: usize, max: usize },
}

impl Frame<'_> {
    pub fn frame_type(&self) -> u8 {
        match self {
            Frame::ServerHello { .. } => ty::SERVER_HELLO,
            Frame::ClientAuth { .. } => ty::CLIENT_AUTH,
            Frame::ServerOk => ty::SERVER_OK,
            Frame::Error { .. } => ty::ERROR,
            Frame::SendPacket { .. } => ty::SEND_PACKET,
            Frame::RecvPacket { .. } => ty::RECV_PACKET,
            Frame::KeepAlive => ty::KEEP_ALIVE,
            Frame::Ping(_) => ty::PING,
            Frame::Pong(_) => ty::PONG,
            Frame::PeerGone { .. } => ty::PEER_GONE,
            Frame::PeerPresent(_) => ty::PEER_PRESENT,
            Frame::PeerAbsent(_) => ty::PEER_ABSENT,
            Frame::ForwardPacket { .. } => ty::FORWARD_PACKET,
        }
    }

    /// Appends the frame to `out`; on error `out` is unchanged.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let check = |d: &[u8]| {
            if d.len() > MAX_DATAGRAM {
                Err(EncodeError::DatagramTooLarge {
                    len: d.len(),
                    max: MAX_DATAGRAM,
                })
            } else {
                Ok(())
            }
        };
        // Homes for the bytes of the few fields that are not slices already.
        let (code, reason);
        let parts: [&[u8]; 3] = match self {
            Frame::ServerHello { relay_key, nonce } => [&relay_key.0, nonce, &[]],
            Frame::ClientAuth { node_key, proof } => [&node_key.0, proof, &[]],
            Frame::ServerOk | Frame::KeepAlive => [&[], &[], &[]],
            Frame::Error { code: c, message } => {
                if message.len() > MAX_ERROR_MESSAGE {
                    return Err(EncodeError::MessageTooLong {
                        len: message.len(),
                        max: MAX_ERROR_MESSAGE,
                    });
                }
                code = c.to_u16().to_be_bytes();
                [&code, message.as_bytes(), &[]]
            }
            Frame::SendPacket { dst: k, datagram } | Frame::RecvPacket { src: k, datagram } => {
                check(datagram)?;
                [&k.0, datagram, &[]]
            }
            Frame::Ping(b) | Frame::Pong(b) => [b, &[], &[]],
            Frame::PeerGone { key, reason: r } => {
                reason = [r.to_u8()];
                [&key.0, &reason, &[]]
            }
            Frame::PeerPresent(k) | Frame::PeerAbsent(k) => [&k.0, &[], &[]],
            Frame::ForwardPacket { src, dst, datagram } => {
                check(datagram)?;
                [&src.0, &dst.0, datagram]
            }
        };
        write(out, self.frame_type(), &parts);
        Ok(())
    }

    /// Decodes the body of a frame of type `ty`. `None`: an unknown type
    /// (the caller decides whether it may be skipped).
    pub fn decode(ty: u8, body: &[u8]) -> Option<Result<Frame<'_>, FrameError>> {
        let name = type_name(ty)?;
        let bad = |expected| FrameError::BadLength {
            name,
            len: body.len(),
            expected,
        };
        let key = |b: &[u8]| NodeKey(array(b));
        let frame = match ty {
            ty::SERVER_HELLO | ty::CLIENT_AUTH => {
                if body.len() != 64 {
                    return Some(Err(bad("64")));
                }
                let (k, n) = (key(&body[..32]), array(&body[32..]));
                if ty == ty::SERVER_HELLO {
                    Frame::ServerHello {
                        relay_key: k,
                        nonce: n,
                    }
                } else {
                    Frame::ClientAuth {
                        node_key: k,
                        proof: n,
                    }
                }
            }
            ty::SERVER_OK | ty::KEEP_ALIVE => {
                if !body.is_empty() {
                    return Some(Err(bad("0")));
                }
                if ty == ty::SERVER_OK {
                    Frame::ServerOk
                } else {
                    Frame::KeepAlive
                }
            }
            ty::ERROR => {
                if body.len() < 2 || body.len() > 2 + MAX_ERROR_MESSAGE {
                    return Some(Err(bad("2 to 1026")));
                }
                let Ok(message) = std::str::from_utf8(&body[2..]) else {
                    return Some(Err(FrameError::InvalidUtf8));
                };
                Frame::Error {
                    code: ErrorCode::from_u16(u16::from_be_bytes([body[0], body[1]])),
                    message,
                }
            }
            ty::SEND_PACKET | ty::RECV_PACKET => {
                if body.len() < 32 || body.len() > 32 + MAX_DATAGRAM {
                    return Some(Err(bad("32 to 65503")));
                }
                let (k, datagram) = (key(&body[..32]), &body[32..]);
                if ty == ty::SEND_PACKET {
                    Frame::SendPacket { dst: k, datagram }
                } else {
                    Frame::RecvPacket { src: k, datagram }
                }
            }
            ty::PING | ty::PONG => {
                if body.len() != 8 {
                    return Some(Err(bad("8")));
                }
                if ty == ty::PING {
                    Frame::Ping(array(body))
                } else {
                    Frame::Pong(array(body))
                }
            }
            ty::PEER_GONE => {
                if body.len() != 33 {
                    return Some(Err(bad("33")));
                }
                Frame::PeerGone {
                    key: key(&body[..32]),
                    reason: GoneReason::from_u8(body[32]),
                }
            }
            ty::PEER_PRESENT | ty::PEER_ABSENT => {
                if body.len() != 32 {
                    return Some(Err(bad("32")));
                }
                if ty == ty::PEER_PRESENT {
                    Frame::PeerPresent(key(body))
                } else {
                    Frame::PeerAbsent(key(body))
                }
            }
            // FORWARD_PACKET: every other type returned `None` above.
            _ => {
                if body.len() < 64 {
                    return Some(Err(bad("64 to 65535")));
                }
                Frame::ForwardPacket {
                    src: key(&body[..32]),
                    dst: key(&body[32..64]),
                    datagram: &body[64..],
                }
            }
        };
        Some(Ok(frame))
    }
}

/// Copies a slice whose length the caller has checked into an array.
fn array<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0; N];
    a.copy_from_slice(&b[..N]);
    a
}

fn type_name(ty: u8) -> Option<&'static str> {
    Some(match ty {
        ty::SERVER_HELLO => "ServerHello",
        ty::CLIENT_AUTH => "ClientAuth",
        ty::SERVER_OK => "ServerOk",
        ty::ERROR => "Error",
        ty::SEND_PACKET => "SendPacket",
        ty::RECV_PACKET => "RecvPacket",
        ty::KEEP_ALIVE => "KeepAlive",
        ty::PING => "Ping",
        ty::PONG => "Pong",
        ty::PEER_GONE => "PeerGone",
        ty::PEER_PRESENT => "PeerPresent",
        ty::PEER_ABSENT => "PeerAbsent",
        ty::FORWARD_PACKET => "ForwardPacket",
        _ => return None,
    })
}

/// Writes a header and the body parts. The callers' bodies are at most
/// `MAX_BODY` long: their datagrams and messages were checked.
fn write(out: &mut Vec<u8>, ty: u8, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.reserve(HEADER_LEN + len);
    out.push(ty);
    out.extend_from_slice(&(len.min(MAX_BODY) as u16).to_be_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
}

/// Splits a frame at the start of `bytes`: its type, its body and what
/// follows, or `None` when `bytes` does not yet hold a whole frame.
pub fn split_frame(bytes: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let &[ty, hi, lo, ..] = bytes else {
        return None;
    };
    let end = HEADER_LEN + usize::from(u16::from_be_bytes([hi, lo]));
    let frame = bytes.get(..end)?;
    Some((ty, &frame[HEADER_LEN..], &bytes[end..]))
}

/// Turns a byte stream into frames.
///
/// Feed it what arrived with [`Decoder::feed`], then call
/// [`Decoder::next_frame`] until it returns `Ok(None)`. It never holds more
/// than one maximal frame plus what one `feed` brought. After an error it
/// returns the same error forever: close the connection.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Where the unread part of `buf` starts; compacted on the next feed so
    /// a burst of small frames is not a series of copies.
    start: usize,
    failed: Option<FrameError>,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next frame, `Ok(None)` when more bytes are needed. Frames of an
    /// unknown type at or above [`IGNORABLE_TYPE`] are skipped.
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        // Split borrows: the frame borrows `buf` while `failed` is set.
        let Decoder { buf, start, failed } = self;
        next_in(buf, start).inspect_err(|e| *failed = Some(e.clone()))
    }

    /// Call when the stream has ended: an error if it ended inside a frame.
    pub fn finish(&self) -> Result<(), FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match &self.buf[self.start..] {
            [] => Ok(()),
            rest => Err(FrameError::Truncated {
                have: rest.len(),
                need: match rest {
                    [_, hi, lo, ..] => HEADER_LEN + usize::from(u16::from_be_bytes([*hi, *lo])),
                    _ => HEADER_LEN,
                },
            }),
        }
    }

    /// Bytes buffered but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }
}

/// The next frame of `buf` from `start`, which it moves past the frame.
fn next_in<'a>(buf: &'a [u8], start: &mut usize) -> Result<Option<Frame<'a>>, FrameError> {
    loop {
        let Some((ty, body, _)) = split_frame(&buf[*start..]) else {
            return Ok(None);
        };
        *start += HEADER_LEN + body.len();
        match Frame::decode(ty, body) {
            Some(frame) => return frame.map(Some),
            None if ty >= IGNORABLE_TYPE => continue,
            None => return Err(FrameError::UnknownType(ty)),
        }
    }
}

/// Bytes of the key that starts a packet in a QUIC DATAGRAM frame.
pub const DATAGRAM_KEY_LEN: usize = 32;

/// Splits a QUIC DATAGRAM payload, `key(32) | datagram`: the destination
/// when a client sends it, the source when a relay does. `None` if it is
/// shorter than a key. (A payload is the body of the `SendPacket` or
/// `RecvPacket` it stands for, which is how senders make one.)
pub fn split_datagram(payload: &[u8]) -> Option<(NodeKey, &[u8])> {
    let key = payload.get(..DATAGRAM_KEY_LEN)?;
    Some((NodeKey(array(key)), &payload[DATAGRAM_KEY_LEN..]))
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorCode::Other(n) => write!(f, "error {n}"),
            known => write!(f, "{known:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn decode_all(bytes: &[u8]) -> Result<Vec<String>, FrameError> {
        let mut d = Decoder::new();
        d.feed(bytes);
        let mut out = Vec::new();
        while let Some(f) = d.next_frame()? {
            out.push(format!("{f:?}"));
        }
        d.finish()?;
        Ok(out)
    }

    #[test]
    fn example_frames_match_the_spec_byte_for_byte() {
        let mut out = Vec::new();
        Frame::SendPacket {
            dst: NodeKey([0xaa; 32]),
            datagram: &[4, 0, 0, 0],
        }
        .encode(&mut out)
        .unwrap();
        assert_eq!(out[..3], [0x05, 0x00, 0x24]);
        assert_eq!(out[3..35], [0xaa; 32]);
        assert_eq!(out[35..], [4, 0, 0, 0]);
        out.clear();
        Frame::Error {
            code: ErrorCode::NotMember,
            message: "no",
        }
        .encode(&mut out)
        .unwrap();
        assert_eq!(out, [0x04, 0x00, 0x04, 0x00, 0x05, b'n', b'o']);
        out.clear();
        Frame::PeerGone {
            key: NodeKey([1; 32]),
            reason: GoneReason::NotConnected,
        }
        .encode(&mut out)
        .unwrap();
        assert_eq!(out[..3], [0x0a, 0x00, 0x21]);
        assert_eq!(out[35], 1);
    }

    #[test]
    fn errors_name_what_was_wrong() {
        assert_eq!(
            decode_all(&[0x09, 0x00, 0x07, 0, 0, 0, 0, 0, 0, 0]),
            Err(FrameError::BadLength {
                name: "Pong",
                len: 7,
                expected: "8"
            })
        );
        assert_eq!(
            decode_all(&[0x42, 0, 0]),
            Err(FrameError::UnknownType(0x42))
        );
        assert_eq!(
            decode_all(&[0x01, 0x00, 0x40, 1, 2]),
            Err(FrameError::Truncated { have: 5, need: 67 })
        );
        assert_eq!(
            decode_all(&[0x04, 0x00, 0x03, 0, 1, 0xff]),
            Err(FrameError::InvalidUtf8)
        );
        assert_eq!(
            decode_all(&[0x05, 0x00, 0x01, 0]).unwrap_err().to_string(),
            "SendPacket frame has a body of 1 bytes, expected 32 to 65503"
        );
    }

    #[test]
    fn ignorable_frames_are_skipped_and_a_failed_decoder_stays_failed() {
        assert_eq!(
            decode_all(&[0x90, 0x00, 0x02, 1, 2, 0x07, 0, 0]).unwrap(),
            ["KeepAlive"]
        );
        let mut d = Decoder::new();
        d.feed(&[0x33, 0, 0, 0x07, 0, 0]);
        assert!(d.next_frame().is_err());
        d.feed(&[0x07, 0, 0]);
        assert_eq!(d.next_frame(), Err(FrameError::UnknownType(0x33)));
    }

    #[test]
    fn datagrams_too_large_for_a_mesh_are_refused_when_encoding() {
        let big = vec![0; MAX_DATAGRAM + 1];
        let mut out = vec![9];
        let err = Frame::SendPacket {
            dst: NodeKey([0; 32]),
            datagram: &big,
        }
        .encode(&mut out);
        assert!(matches!(err, Err(EncodeError::DatagramTooLarge { .. })));
        assert_eq!(out, [9], "nothing appended");
        Frame::ForwardPacket {
            src: NodeKey([0; 32]),
            dst: NodeKey([0; 32]),
            datagram: &big[1..],
        }
        .encode(&mut out)
        .unwrap();
        assert_eq!(out.len(), 1 + HEADER_LEN + MAX_BODY);
    }

    #[test]
    fn quic_datagrams_carry_the_key_first() {
        let mut frame = Vec::new();
        Frame::RecvPacket {
            src: NodeKey([7; 32]),
            datagram: &[1, 0, 0, 0],
        }
        .encode(&mut frame)
        .unwrap();
        let (_, body, _) = split_frame(&frame).unwrap();
        assert_eq!(
            split_datagram(body),
            Some((NodeKey([7; 32]), &[1, 0, 0, 0][..]))
        );
        assert_eq!(split_datagram(&body[..31]), None);
    }
}
