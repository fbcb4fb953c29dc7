//! STUN Binding (RFC 8489), the part a node needs to learn its public
//! address: a server answers a Binding request with the source address it
//! saw (XOR-MAPPED-ADDRESS), a client builds requests and reads answers.
//! docs/relay-protocol.md, "STUN", lists what is and is not supported.
//! Sans-IO: the caller owns sockets and transaction ids.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The fixed value at bytes 4..8 of every RFC 5389/8489 message.
pub const MAGIC_COOKIE: u32 = 0x2112_a442;
/// Bytes of the message header.
pub const HEADER_LEN: usize = 20;

const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const BINDING_ERROR: u16 = 0x0111;

const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
const ATTR_ERROR_CODE: u16 = 0x0009;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
const ATTR_FINGERPRINT: u16 = 0x8028;
/// Attribute types below this must be understood by the receiver.
const COMPREHENSION_OPTIONAL: u16 = 0x8000;
const FINGERPRINT_XOR: u32 = 0x5354_554e;

/// A transaction id: 96 random bits chosen by the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TransactionId(pub [u8; 12]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StunError {
    #[error("not a STUN message (too short, no magic cookie, or a length that does not match)")]
    NotStun,
    #[error("STUN message type {0:#06x} is not the one expected here")]
    UnexpectedType(u16),
    #[error("STUN attribute {attr:#06x} is cut off or longer than the message")]
    Truncated { attr: u16 },
    #[error("STUN attribute {0:#06x} must be understood and is not supported")]
    UnknownRequired(u16),
    #[error("STUN FINGERPRINT does not match the message, or is not its last attribute")]
    BadFingerprint,
    #[error("STUN address attribute {0:#06x} is malformed")]
    BadAddress(u16),
    #[error("STUN response belongs to another transaction")]
    WrongTransaction,
    #[error("STUN server answered with error {code}")]
    ErrorResponse { code: u16 },
    #[error("STUN response carries no mapped address")]
    NoAddress,
}

/// Whether `packet` is a STUN message rather than a WireGuard datagram.
///
/// A WireGuard datagram starts with its type 1..=4 and three zero bytes; a
/// STUN message has its first two bits zero, a length that is a multiple
/// of 4 and matches the packet, and the magic cookie at bytes 4..8.
pub fn is_stun(packet: &[u8]) -> bool {
    let &[b0, b1, b2, b3, c0, c1, c2, c3, ..] = packet else {
        return false;
    };
    if (1..=4).contains(&b0) && b1 == 0 && b2 == 0 && b3 == 0 {
        return false;
    }
    let len = usize::from(u16::from_be_bytes([b2, b3]));
    packet.len() >= HEADER_LEN
        && b0 & 0xc0 == 0
        && len % 4 == 0
        && packet.len() == HEADER_LEN + len
        && u32::from_be_bytes([c0, c1, c2, c3]) == MAGIC_COOKIE
}

/// A parsed message: type, transaction id and attributes.
struct Message<'a> {
    ty: u16,
    txid: TransactionId,
    attrs: &'a [u8],
}

fn parse(packet: &[u8]) -> Result<Message<'_>, StunError> {
    if !is_stun(packet) {
        return Err(StunError::NotStun);
    }
    let mut txid = [0; 12];
    txid.copy_from_slice(&packet[8..HEADER_LEN]);
    let msg = Message {
        ty: u16::from_be_bytes([packet[0], packet[1]]),
        txid: TransactionId(txid),
        attrs: &packet[HEADER_LEN..],
    };
    // Walks the attributes once to check their framing and the fingerprint.
    let mut at = 0;
    for attr in attrs(msg.attrs) {
        let (ty, value, end) = attr?;
        if ty == ATTR_FINGERPRINT {
            let want = crc32(&packet[..HEADER_LEN + at]) ^ FINGERPRINT_XOR;
            if end != msg.attrs.len() || value != want.to_be_bytes() {
                return Err(StunError::BadFingerprint);
            }
        }
        at = end;
    }
    Ok(msg)
}

/// The attributes as `(type, value, end offset)`; values are padded to 4.
fn attrs(mut rest: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8], usize), StunError>> {
    let total = rest.len();
    std::iter::from_fn(move || {
        let &[t0, t1, l0, l1, ..] = rest else {
            return (!rest.is_empty()).then_some(Err(StunError::Truncated { attr: 0 }));
        };
        let ty = u16::from_be_bytes([t0, t1]);
        let len = usize::from(u16::from_be_bytes([l0, l1]));
        let padded = 4 + len.next_multiple_of(4);
        let (Some(value), Some(next)) = (rest.get(4..4 + len), rest.get(padded..)) else {
            rest = &[];
            return Some(Err(StunError::Truncated { attr: ty }));
        };
        rest = next;
        Some(Ok((ty, value, total - rest.len())))
    })
}

/// Server side: the transaction id of a Binding request. Unknown
/// comprehension-optional attributes are skipped; an unknown
/// comprehension-required one is refused (RFC 8489 §7.3.1 would answer 420;
/// a relay's clients send none).
pub fn parse_binding_request(packet: &[u8]) -> Result<TransactionId, StunError> {
    let msg = parse(packet)?;
    if msg.ty != BINDING_REQUEST {
        return Err(StunError::UnexpectedType(msg.ty));
    }
    for attr in attrs(msg.attrs) {
        let (ty, _, _) = attr?;
        if ty < COMPREHENSION_OPTIONAL {
            return Err(StunError::UnknownRequired(ty));
        }
    }
    Ok(msg.txid)
}

/// Server side: a Binding success response for `txid` telling the client
/// the address it was seen from, written into `out` (cleared first), with
/// a FINGERPRINT.
pub fn write_binding_response(txid: TransactionId, observed: SocketAddr, out: &mut Vec<u8>) {
    write_header(BINDING_SUCCESS, txid, out);
    let port = observed.port() ^ (MAGIC_COOKIE >> 16) as u16;
    let mut mask = [0u8; 16];
    mask[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    mask[4..].copy_from_slice(&txid.0);
    let (family, len): (u8, u16) = match observed.ip() {
        IpAddr::V4(_) => (1, 8),
        IpAddr::V6(_) => (2, 20),
    };
    out.extend_from_slice(&ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&[0, family]);
    out.extend_from_slice(&port.to_be_bytes());
    match observed.ip() {
        IpAddr::V4(ip) => out.extend(ip.octets().iter().zip(mask).map(|(a, m)| a ^ m)),
        IpAddr::V6(ip) => out.extend(ip.octets().iter().zip(mask).map(|(a, m)| a ^ m)),
    }
    finish_with_fingerprint(out);
}

/// Client side: a Binding request for `txid` (no attributes), written into
/// `out` (cleared first).
pub fn write_binding_request(txid: TransactionId, out: &mut Vec<u8>) {
    write_header(BINDING_REQUEST, txid, out);
}

/// Client side: the mapped address in the response to `txid`:
/// XOR-MAPPED-ADDRESS, or the older MAPPED-ADDRESS of RFC 3489 servers.
pub fn parse_binding_response(packet: &[u8], txid: TransactionId) -> Result<SocketAddr, StunError> {
    let msg = parse(packet)?;
    if msg.txid != txid {
        return Err(StunError::WrongTransaction);
    }
    let mut mapped = None;
    for attr in attrs(msg.attrs) {
        let (ty, value, _) = attr?;
        match (msg.ty, ty) {
            (BINDING_ERROR, ATTR_ERROR_CODE) => {
                let code = match value {
                    [_, _, class, number, ..] => u16::from(class & 7) * 100 + u16::from(*number),
                    _ => 0,
                };
                return Err(StunError::ErrorResponse { code });
            }
            (BINDING_SUCCESS, ATTR_XOR_MAPPED_ADDRESS) => {
                return address(ty, value, Some(&txid));
            }
            (BINDING_SUCCESS, ATTR_MAPPED_ADDRESS) => mapped = Some(address(ty, value, None)?),
            _ => {}
        }
    }
    match msg.ty {
        BINDING_SUCCESS => mapped.ok_or(StunError::NoAddress),
        BINDING_ERROR => Err(StunError::ErrorResponse { code: 0 }),
        other => Err(StunError::UnexpectedType(other)),
    }
}

/// An address attribute's value; XORed with the cookie and `txid` if given.
fn address(attr: u16, v: &[u8], xor: Option<&TransactionId>) -> Result<SocketAddr, StunError> {
    let mut mask = [0u8; 16];
    if let Some(txid) = xor {
        mask[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        mask[4..].copy_from_slice(&txid.0);
    }
    let bad = StunError::BadAddress(attr);
    let (&[_, family, p0, p1], ip) = v.split_first_chunk::<4>().ok_or(bad.clone())?;
    let port = u16::from_be_bytes([p0 ^ mask[0], p1 ^ mask[1]]);
    let ip: IpAddr = match (family, ip.len()) {
        (1, 4) => {
            let mut o = [0u8; 4];
            o.iter_mut()
                .zip(ip.iter().zip(mask))
                .for_each(|(o, (a, m))| *o = a ^ m);
            Ipv4Addr::from(o).into()
        }
        (2, 16) => {
            let mut o = [0u8; 16];
            o.iter_mut()
                .zip(ip.iter().zip(mask))
                .for_each(|(o, (a, m))| *o = a ^ m);
            Ipv6Addr::from(o).into()
        }
        _ => return Err(bad),
    };
    Ok(SocketAddr::new(ip, port))
}

fn write_header(ty: u16, txid: TransactionId, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&ty.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    out.extend_from_slice(&txid.0);
}

/// Appends FINGERPRINT and sets the header's length. The CRC covers the
/// message with its length already counting the fingerprint (RFC 8489 §14.7).
fn finish_with_fingerprint(out: &mut Vec<u8>) {
    let len = out.len() + 8 - HEADER_LEN;
    set_len(out, len);
    let crc = crc32(out) ^ FINGERPRINT_XOR;
    out.extend_from_slice(&ATTR_FINGERPRINT.to_be_bytes());
    out.extend_from_slice(&4u16.to_be_bytes());
    out.extend_from_slice(&crc.to_be_bytes());
}

fn set_len(out: &mut [u8], len: usize) {
    // Our messages are a header and at most three short attributes.
    out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
}

/// CRC-32 (ISO-HDLC, as zlib), bit by bit: STUN messages are small and rare.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xedb8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const TXID: TransactionId = TransactionId([
        0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
    ]);

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// RFC 5769 §2.2: the IPv4 sample response's address, without its
    /// MESSAGE-INTEGRITY and FINGERPRINT (the length adjusted).
    #[test]
    fn rfc5769_sample_ipv4_response() {
        let packet = hex("0101001c 2112a442 b7e7a701 bc34d686 fa87dfae
             8022000b 74657374 20766563 746f7220
             00200008 0001a147 e112a643");
        assert!(is_stun(&packet));
        assert_eq!(
            parse_binding_response(&packet, TXID).unwrap(),
            "192.0.2.1:32853".parse().unwrap()
        );
    }

    /// RFC 5769 §2.3: the IPv6 sample response (its SOFTWARE and
    /// MESSAGE-INTEGRITY are skipped, its FINGERPRINT checked).
    #[test]
    fn rfc5769_sample_ipv6_response() {
        let packet = hex("01010048 2112a442 b7e7a701 bc34d686 fa87dfae
             8022000b 74657374 20766563 746f7220
             00200014 0002a147 0113a9fa a5d3f179 bc25f4b5 bed2b9d9
             00080014 a382954e 4be67bf1 1784c97c 8292c275 bfe3ed41
             80280004 c8fb0b4c");
        assert_eq!(
            parse_binding_response(&packet, TXID).unwrap(),
            "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
                .parse()
                .unwrap()
        );
        let mut broken = packet.clone();
        broken[30] ^= 1;
        assert_eq!(
            parse_binding_response(&broken, TXID),
            Err(StunError::BadFingerprint)
        );
    }

    #[test]
    fn a_request_is_answered_with_the_observed_address() {
        for observed in ["198.51.100.7:3478", "[2001:db8::5]:40000"] {
            let observed: SocketAddr = observed.parse().unwrap();
            let mut req = Vec::new();
            write_binding_request(TXID, &mut req);
            assert!(is_stun(&req));
            let txid = parse_binding_request(&req).unwrap();
            let mut resp = Vec::new();
            write_binding_response(txid, observed, &mut resp);
            assert_eq!(parse_binding_response(&resp, TXID), Ok(observed));
            assert_eq!(
                parse_binding_response(&resp, TransactionId([0; 12])),
                Err(StunError::WrongTransaction)
            );
        }
    }

    #[test]
    fn requests_skip_optional_attributes_and_refuse_required_ones() {
        let mut req = Vec::new();
        write_binding_request(TXID, &mut req);
        // SOFTWARE "ab" padded to 4, then a valid FINGERPRINT.
        req.extend_from_slice(&[0x80, 0x22, 0, 2, b'a', b'b', 0, 0]);
        finish_with_fingerprint(&mut req);
        assert_eq!(parse_binding_request(&req), Ok(TXID));
        let mut req = Vec::new();
        write_binding_request(TXID, &mut req);
        req.extend_from_slice(&[0x00, 0x03, 0, 4, 0, 0, 0, 0]);
        set_len(&mut req, 8);
        assert_eq!(
            parse_binding_request(&req),
            Err(StunError::UnknownRequired(3))
        );
    }

    #[test]
    fn wireguard_datagrams_are_never_stun() {
        // A handshake initiation whose sender index is the magic cookie.
        for ty in 1..=4u8 {
            for len in [20, 32, 64, 92, 148] {
                let mut p = vec![0u8; len];
                p[0] = ty;
                p[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
                assert!(!is_stun(&p), "type {ty}, {len} bytes");
            }
        }
        // A STUN message whose header mimics WireGuard's: type 0x0100 and
        // length 0, 20 bytes; WireGuard never sends it, so it is not STUN.
        let mut p = vec![0u8; 20];
        p[0] = 1;
        p[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        assert!(!is_stun(&p));
    }
}
