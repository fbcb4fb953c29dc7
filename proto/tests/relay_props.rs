#![allow(clippy::unwrap_used)]
//! Properties of the relay frames and STUN: no input panics a decoder, the
//! way a stream is cut up never changes what is decoded, and every frame and
//! STUN answer round-trips.

use std::net::{IpAddr, SocketAddr};

use meshd_proto::relay::{Decoder, ErrorCode, Frame, GoneReason, MAX_DATAGRAM};
use meshd_proto::stun;
use meshd_proto::NodeKey;
use proptest::collection::vec;
use proptest::prelude::*;

/// What a frame is made of, owned, so a strategy can produce it.
#[derive(Debug, Clone)]
struct Parts {
    which: u8,
    a: [u8; 32],
    b: [u8; 32],
    small: [u8; 8],
    code: u16,
    text: String,
    data: Vec<u8>,
}

fn parts() -> impl Strategy<Value = Parts> {
    (
        0u8..13,
        any::<[u8; 32]>(),
        any::<[u8; 32]>(),
        any::<[u8; 8]>(),
        any::<u16>(),
        ".{0,40}",
        vec(any::<u8>(), 0..1500),
    )
        .prop_map(|(which, a, b, small, code, text, data)| Parts {
            which,
            a,
            b,
            small,
            code,
            text,
            data,
        })
}

fn frame(p: &Parts) -> Frame<'_> {
    let (a, b) = (NodeKey(p.a), NodeKey(p.b));
    match p.which {
        0 => Frame::ServerHello {
            relay_key: a,
            nonce: p.b,
        },
        1 => Frame::ClientAuth {
            node_key: a,
            proof: p.b,
        },
        2 => Frame::ServerOk,
        3 => Frame::Error {
            code: ErrorCode::from_u16(p.code),
            message: &p.text,
        },
        4 => Frame::SendPacket {
            dst: a,
            datagram: &p.data,
        },
        5 => Frame::RecvPacket {
            src: a,
            datagram: &p.data,
        },
        6 => Frame::KeepAlive,
        7 => Frame::Ping(p.small),
        8 => Frame::Pong(p.small),
        9 => Frame::PeerGone {
            key: a,
            reason: GoneReason::from_u8(p.small[0]),
        },
        10 => Frame::PeerPresent(a),
        11 => Frame::PeerAbsent(a),
        _ => Frame::ForwardPacket {
            src: a,
            dst: b,
            datagram: &p.data,
        },
    }
}

/// Everything `bytes` decodes to, fed in pieces of the given sizes.
fn decode_in_pieces(bytes: &[u8], sizes: &[usize]) -> (Vec<String>, Option<String>) {
    let mut d = Decoder::new();
    let mut frames = Vec::new();
    let mut rest = bytes;
    let mut sizes = sizes.iter().cycle();
    loop {
        let n = sizes
            .next()
            .copied()
            .unwrap_or(1)
            .clamp(1, rest.len().max(1));
        let (piece, tail) = rest.split_at(n.min(rest.len()));
        rest = tail;
        d.feed(piece);
        assert!(d.buffered() <= 3 + 65535 + n, "decoder holds too much");
        loop {
            match d.next_frame() {
                Ok(Some(f)) => frames.push(format!("{f:?}")),
                Ok(None) => break,
                Err(e) => return (frames, Some(e.to_string())),
            }
        }
        if rest.is_empty() {
            return (frames, d.finish().err().map(|e| e.to_string()));
        }
    }
}

proptest! {
    #[test]
    fn frames_round_trip_however_the_stream_is_cut(
        frames in vec(parts(), 0..8),
        sizes in vec(1usize..200, 1..8),
    ) {
        let mut bytes = Vec::new();
        let mut want = Vec::new();
        for p in &frames {
            let f = frame(p);
            f.encode(&mut bytes).unwrap();
            want.push(format!("{f:?}"));
        }
        prop_assert_eq!(decode_in_pieces(&bytes, &sizes), (want.clone(), None));
        prop_assert_eq!(decode_in_pieces(&bytes, &[bytes.len().max(1)]), (want, None));
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_cutting_does_not_matter(
        bytes in vec(any::<u8>(), 0..2048),
        sizes in vec(1usize..300, 1..8),
    ) {
        let whole = decode_in_pieces(&bytes, &[bytes.len().max(1)]);
        prop_assert_eq!(decode_in_pieces(&bytes, &sizes), whole);
    }

    #[test]
    fn decoded_frames_encode_to_the_same_bytes(ty in any::<u8>(), body in vec(any::<u8>(), 0..200)) {
        if let Some(Ok(f)) = Frame::decode(ty, &body) {
            let mut out = Vec::new();
            f.encode(&mut out).unwrap();
            prop_assert_eq!(out[0], ty);
            prop_assert_eq!(&out[3..], &body[..]);
        }
    }

    #[test]
    fn stun_never_panics_and_never_claims_wireguard(bytes in vec(any::<u8>(), 0..300), ty in 1u8..=4) {
        let _ = stun::parse_binding_request(&bytes);
        let _ = stun::parse_binding_response(&bytes, stun::TransactionId([0; 12]));
        let mut wg = bytes.clone();
        wg.resize(wg.len().max(32), 0);
        wg[0] = ty;
        wg[1..4].fill(0);
        prop_assert!(!stun::is_stun(&wg));
    }

    #[test]
    fn stun_answers_carry_the_observed_address(
        txid in any::<[u8; 12]>(),
        ip in prop_oneof![any::<[u8; 4]>().prop_map(IpAddr::from), any::<[u8; 16]>().prop_map(IpAddr::from)],
        port in any::<u16>(),
    ) {
        let txid = stun::TransactionId(txid);
        let observed = SocketAddr::new(ip, port);
        let mut req = Vec::new();
        stun::write_binding_request(txid, &mut req);
        prop_assert_eq!(stun::parse_binding_request(&req), Ok(txid));
        let mut resp = Vec::new();
        stun::write_binding_response(txid, observed, &mut resp);
        prop_assert!(stun::is_stun(&resp));
        prop_assert_eq!(stun::parse_binding_response(&resp, txid), Ok(observed));
    }
}

#[test]
fn the_largest_datagram_round_trips_in_every_packet_frame() {
    let data = vec![0x5a; MAX_DATAGRAM];
    let parts = Parts {
        which: 0,
        a: [1; 32],
        b: [2; 32],
        small: [0; 8],
        code: 0,
        text: String::new(),
        data,
    };
    for which in [4, 5, 12] {
        let p = Parts {
            which,
            ..parts.clone()
        };
        let mut bytes = Vec::new();
        frame(&p).encode(&mut bytes).unwrap();
        let (frames, err) = decode_in_pieces(&bytes, &[4096]);
        assert_eq!((frames.len(), err), (1, None));
    }
}
