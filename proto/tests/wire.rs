#![allow(clippy::unwrap_used)]
//! The control protocol's wire format: golden bytes, round trips, and every
//! decoding error by rule.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use meshd_proto::auth::{self, AuthError, ProofInput, Purpose};
use meshd_proto::token::{self, JoinToken, TokenError};
use meshd_proto::*;
use x25519_dalek::StaticSecret;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn to_hex(b: &[u8]) -> String {
    token::Hex(b).to_string()
}

fn sample_peer(id: u64) -> Peer {
    Peer {
        node_id: NodeId(id),
        node_key: NodeKey([id as u8; 32]),
        name: format!("node-{id}"),
        ipv4: Ipv4Addr::new(100, 64, 0, id as u8),
        ipv6: "fd12:3456:789a::6440:1".parse().unwrap(),
        endpoints: vec![
            "192.0.2.1:51820".parse().unwrap(),
            "[2001:db8::1]:51820".parse().unwrap(),
        ],
        tags: vec!["tag:edge".into()],
    }
}

fn samples() -> Vec<Message> {
    let info = NodeInfo {
        node_id: NodeId(7),
        name: "edge-1".into(),
        ipv4: Ipv4Addr::new(100, 64, 0, 7),
        ipv6: Ipv6Addr::new(0xfd12, 0x3456, 0x789a, 0, 0, 0, 0x6440, 7),
        mesh_ipv4: "100.64.0.0/10".parse().unwrap(),
        mesh_ipv6: "fd12:3456:789a::/48".parse().unwrap(),
        expires_at: Some(1_900_000_000),
        tags: vec!["tag:a".into(), "tag:b".into()],
    };
    vec![
        Message::Challenge(Challenge {
            coordinator_key: NodeKey([1; 32]),
            nonce: [2; 32],
        }),
        Message::Register(Register {
            token_secret: TokenSecret([3; 32]),
            node_key: NodeKey([4; 32]),
            name: "edge-1".into(),
            proof: [5; 32],
            endpoints: vec![
                "192.0.2.1:41641".parse().unwrap(),
                "[2001:db8::1]:41641".parse().unwrap(),
            ],
            relay: None,
        }),
        Message::Login(Login {
            node_key: NodeKey([4; 32]),
            proof: [6; 32],
            endpoints: vec![],
            relay: Some(RelayInfo {
                region: "eu".into(),
                addrs: vec!["198.18.2.2:443".parse().unwrap()],
                stun_port: 3478,
                cert_pin: [7; 32],
            }),
        }),
        Message::RelayMap(vec![RelayEntry {
            node_id: NodeId(9),
            key: NodeKey([8; 32]),
            name: "relay-eu".into(),
            info: RelayInfo {
                region: "eu".into(),
                addrs: vec!["[2001:db8::2]:443".parse().unwrap()],
                stun_port: 3478,
                cert_pin: [7; 32],
            },
        }]),
        Message::RegisterOk(info.clone()),
        Message::LoginOk(NodeInfo {
            expires_at: None,
            tags: vec![],
            ..info.clone()
        }),
        Message::PeerMap(PeerMap {
            peers: vec![sample_peer(1), sample_peer(2)],
            last: true,
        }),
        Message::PeerMap(PeerMap {
            peers: vec![],
            last: false,
        }),
        Message::PeerAdded(sample_peer(3)),
        Message::PeerRemoved(NodeId(3)),
        Message::EndpointChanged(EndpointChanged {
            node_id: NodeId(2),
            endpoints: vec!["198.51.100.9:4000".parse().unwrap()],
        }),
        Message::KeyRotated(KeyRotated {
            node_id: NodeId(2),
            node_key: NodeKey([9; 32]),
        }),
        Message::PolicyChanged(PolicyChanged {
            rules: vec![
                FilterRule {
                    source: "100.64.0.0/10".parse().unwrap(),
                    protocol: 0,
                    ports: (0, 65535),
                },
                FilterRule {
                    source: "fd12:3456:789a::/48".parse().unwrap(),
                    protocol: 6,
                    ports: (443, 443),
                },
            ],
        }),
        Message::EndpointReport(EndpointReport {
            endpoints: vec!["10.0.0.2:51820".parse().unwrap()],
        }),
        Message::RotateKey(RotateKey {
            new_key: NodeKey([10; 32]),
            proof: [11; 32],
        }),
        Message::RotateKeyOk(NodeKey([10; 32])),
        Message::NodeUpdated(NodeInfo {
            name: "renamed".into(),
            ..info
        }),
        Message::Error(ErrorMessage {
            code: ErrorCode::TokenRevoked,
            message: "join token revoked".into(),
        }),
        Message::Error(ErrorMessage {
            code: ErrorCode::Other(999),
            message: String::new(),
        }),
    ]
}

#[test]
fn every_message_round_trips_whole_and_byte_by_byte() {
    let mut stream = Vec::new();
    for msg in samples() {
        let bytes = encode(&msg).unwrap();
        assert_eq!(
            decode(&bytes).unwrap().as_ref(),
            Some(&msg),
            "{}",
            msg.name()
        );
        encode_frame(&msg, &mut stream).unwrap();
    }
    let mut d = FrameDecoder::new();
    let mut got = Vec::new();
    for b in &stream {
        d.feed(std::slice::from_ref(b));
        while let Some(m) = d.next_message().unwrap() {
            got.push(m);
        }
    }
    d.finish().unwrap();
    assert_eq!(got, samples());
}

/// The examples in docs/control-protocol.md, byte for byte.
#[test]
fn golden_frames() {
    let check = |msg: Message, expect: &str| {
        let bytes = encode(&msg).unwrap();
        assert_eq!(to_hex(&bytes), to_hex(&hex(expect)), "{}", msg.name());
        assert_eq!(decode(&hex(expect)).unwrap(), Some(msg));
    };
    check(
        Message::PeerRemoved(NodeId(5)),
        "0000000e 01 0008 01 0008 0000000000000005",
    );
    check(
        Message::Error(ErrorMessage {
            code: ErrorCode::TokenExpired,
            message: "expired".into(),
        }),
        "00000012 01 000f 01 0002 0005 02 0007 65787069726564",
    );
    check(
        Message::EndpointReport(EndpointReport {
            endpoints: vec![
                "192.0.2.1:51820".parse().unwrap(),
                "[2001:db8::1]:443".parse().unwrap(),
            ],
        }),
        "00000021 01 000c
         01 0006 c0000201 ca6c
         01 0012 20010db8000000000000000000000001 01bb",
    );
}

/// One malformed input and the error it must produce.
fn check_err(input: &str, expect: DecodeError) {
    let bytes = hex(input);
    assert_eq!(decode(&bytes), Err(expect.clone()), "input {input}");
    // The same error however the bytes are split up.
    let mut d = FrameDecoder::new();
    let mut result = Ok(());
    for b in &bytes {
        d.feed(std::slice::from_ref(b));
        loop {
            match d.next_message() {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if result.is_err() {
            break;
        }
    }
    if result.is_err() {
        assert_eq!(result, Err(expect.clone()), "input {input} byte by byte");
        // Once failed, the decoder stays failed: the stream is out of step.
        d.feed(&encode(&Message::PeerRemoved(NodeId(1))).unwrap());
        assert_eq!(d.next_message(), Err(expect));
    } else {
        assert_eq!(d.finish(), Err(expect), "input {input} byte by byte");
    }
}

#[test]
fn malformed_frames_are_refused_by_rule() {
    use DecodeError::*;
    // Oversized: refused from the length alone, before the body arrives.
    check_err(
        "00100001 01",
        FrameTooLarge {
            len: MAX_FRAME_LEN + 1,
            max: MAX_FRAME_LEN,
        },
    );
    check_err(
        "ffffffff",
        FrameTooLarge {
            len: u32::MAX as usize,
            max: MAX_FRAME_LEN,
        },
    );
    check_err("00000002 0100", FrameTooShort { len: 2 });
    // Truncated stream: inside the length, inside the frame.
    check_err("0000", Truncated { have: 2, need: 4 });
    check_err(
        "0000000e 01 0008 01 0008 00",
        Truncated { have: 11, need: 18 },
    );
    check_err("00000003 02 0008", UnsupportedVersion(2));
    // An unknown type below 0x8000 is refused ...
    check_err("00000003 01 0042", UnknownMessage(0x42));
    // ... field trouble, each with the structure it happened in.
    check_err(
        "00000005 01 0008 01 00",
        FieldHeaderTruncated {
            ctx: "PeerRemoved",
            have: 2,
        },
    );
    check_err(
        "00000007 01 0008 01 0008 00",
        FieldTruncated {
            ctx: "PeerRemoved",
            tag: 1,
            len: 8,
            have: 1,
        },
    );
    check_err(
        "00000007 01 0008 01 0001 05",
        BadLength {
            ctx: "PeerRemoved",
            tag: 1,
            len: 1,
            expected: "8",
        },
    );
    check_err(
        "00000003 01 0008",
        MissingField {
            ctx: "PeerRemoved",
            tag: 1,
        },
    );
    check_err(
        "00000019 01 0008 01 0008 0000000000000001 01 0008 0000000000000002",
        DuplicateField {
            ctx: "PeerRemoved",
            tag: 1,
        },
    );
    check_err(
        "00000011 01 0008 05 0000 01 0008 0000000000000001",
        UnknownField {
            ctx: "PeerRemoved",
            tag: 5,
        },
    );
    // Out of order: EndpointChanged with its endpoint (2) before its node id (1).
    check_err(
        "00000017 01 0009 02 0006 c0000201 ca6c 01 0008 0000000000000001",
        FieldOrder {
            ctx: "EndpointChanged",
            tag: 1,
            after: 2,
        },
    );
    check_err(
        "00000007 01 0006 01 0001 02",
        InvalidValue {
            ctx: "PeerMap",
            tag: 1,
            reason: "a boolean must be 0 or 1",
        },
    );
    check_err(
        "0000000c 01 000f 01 0002 0001 02 0001 ff",
        InvalidValue {
            ctx: "Error",
            tag: 2,
            reason: "not valid UTF-8",
        },
    );
    check_err(
        "0000000b 01 000c 01 0005 0102030405",
        BadLength {
            ctx: "EndpointReport",
            tag: 1,
            len: 5,
            expected: "6 or 18",
        },
    );
    // A nested record reports its own name: a rule whose prefix is /33.
    check_err(
        "0000001c 01 000b 01 0016 01 0005 6440000021 02 0001 00 03 0002 0000 04 0002 ffff",
        InvalidValue {
            ctx: "FilterRule",
            tag: 1,
            reason: "prefix length longer than the address",
        },
    );
    check_err(
        "0000001c 01 000b 01 0016 01 0005 6440000010 02 0001 00 03 0002 0002 04 0002 0001",
        InvalidValue {
            ctx: "FilterRule",
            tag: 4,
            reason: "last port below first port",
        },
    );
}

#[test]
fn too_many_repetitions_are_refused() {
    let mut body = Vec::new();
    for _ in 0..=MAX_ENDPOINTS {
        body.extend_from_slice(&hex("01 0006 c0000201 ca6c"));
    }
    let mut frame = ((body.len() + 3) as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&hex("01 000c"));
    frame.extend_from_slice(&body);
    assert_eq!(
        decode(&frame),
        Err(DecodeError::TooMany {
            ctx: "EndpointReport",
            tag: 1,
            max: MAX_ENDPOINTS
        })
    );
    // The encoder refuses to produce what the decoder would refuse.
    let msg = Message::EndpointReport(EndpointReport {
        endpoints: vec!["192.0.2.1:1".parse().unwrap(); MAX_ENDPOINTS + 1],
    });
    assert!(matches!(
        encode(&msg),
        Err(EncodeError::TooMany { tag: 1, .. })
    ));
    let long_name = Message::Register(Register {
        token_secret: TokenSecret([0; 32]),
        node_key: NodeKey([0; 32]),
        name: "x".repeat(MAX_NAME_LEN + 1),
        proof: [0; 32],
        endpoints: vec![],
        relay: None,
    });
    assert!(matches!(
        encode(&long_name),
        Err(EncodeError::TooLong { tag: 3, .. })
    ));
}

#[test]
fn ignorable_types_and_fields_are_skipped() {
    // An unknown message type with the high bit set, then a known message.
    let mut stream = hex("00000005 01 8fff abcd");
    // A PeerRemoved with an unknown field 0x90 after its node id.
    stream.extend_from_slice(&hex("00000012 01 0008 01 0008 0000000000000009 90 0001 ff"));
    let mut d = FrameDecoder::new();
    d.feed(&stream);
    assert_eq!(d.next_message(), Ok(Some(Message::PeerRemoved(NodeId(9)))));
    assert_eq!(d.next_message(), Ok(None));
    d.finish().unwrap();
}

#[test]
fn largest_peer_map_fits_in_a_frame() {
    let peer = Peer {
        node_id: NodeId(u64::MAX),
        node_key: NodeKey([0xff; 32]),
        name: "n".repeat(MAX_NAME_LEN),
        ipv4: Ipv4Addr::BROADCAST,
        ipv6: Ipv6Addr::LOCALHOST,
        endpoints: vec!["[2001:db8::1]:1".parse::<SocketAddr>().unwrap(); MAX_ENDPOINTS],
        tags: vec!["t".repeat(MAX_TAG_LEN); MAX_TAGS],
    };
    let msg = Message::PeerMap(PeerMap {
        peers: vec![peer; MAX_PEERS_PER_FRAME],
        last: true,
    });
    let bytes = encode(&msg).unwrap();
    assert!(bytes.len() <= MAX_FRAME_LEN + 4);
    assert_eq!(decode(&bytes).unwrap(), Some(msg));
}

fn proof_input<'a>(
    purpose: Purpose,
    coord: NodeKey,
    node: NodeKey,
    nonce: &'a [u8; 32],
) -> ProofInput<'a> {
    ProofInput {
        purpose,
        coordinator_key: coord,
        node_key: node,
        nonce,
        channel_binding: b"binding",
        extra: b"",
    }
}

#[test]
fn proofs_verify_only_for_the_key_holder_and_their_context() {
    let coord = StaticSecret::from([0x11; 32]);
    let node = StaticSecret::from([0x22; 32]);
    let other = StaticSecret::from([0x33; 32]);
    let (ck, nk) = (auth::public_key(&coord), auth::public_key(&node));
    let nonce = [7; 32];
    let input = proof_input(Purpose::Login, ck, nk, &nonce);
    let proof = auth::prove(&input, &node).unwrap();
    assert_eq!(auth::verify(&input, &coord, &proof), Ok(()));

    // Someone without the node's key cannot make a proof for it.
    let forged = auth::prove(&input, &other).unwrap();
    assert_eq!(
        auth::verify(&input, &coord, &forged),
        Err(AuthError::BadProof)
    );
    // A proof does not carry over to another nonce, binding, purpose or coordinator.
    let nonce2 = [8; 32];
    let changed = [
        proof_input(Purpose::Login, ck, nk, &nonce2),
        ProofInput {
            channel_binding: b"other",
            ..input
        },
        ProofInput {
            purpose: Purpose::Register,
            ..input
        },
        ProofInput {
            extra: b"x",
            ..input
        },
    ];
    for c in &changed {
        assert_eq!(auth::verify(c, &coord, &proof), Err(AuthError::BadProof));
    }
    let coord2 = StaticSecret::from([0x44; 32]);
    let input2 = proof_input(Purpose::Login, auth::public_key(&coord2), nk, &nonce);
    assert_eq!(
        auth::verify(&input2, &coord2, &proof),
        Err(AuthError::BadProof)
    );
}

#[test]
fn low_order_keys_are_refused() {
    // The all-zero point has order 1: every shared secret with it is zero.
    let coord = StaticSecret::from([0x11; 32]);
    let nonce = [0; 32];
    let input = proof_input(
        Purpose::Login,
        auth::public_key(&coord),
        NodeKey([0; 32]),
        &nonce,
    );
    assert_eq!(
        auth::verify(&input, &coord, &[0; 32]),
        Err(AuthError::LowOrderKey(NodeKey([0; 32])))
    );
}

#[test]
fn join_tokens_round_trip_and_refuse_damage() {
    let t = JoinToken {
        secret: TokenSecret([0xab; 32]),
        cert_pin: [0xcd; 32],
        addresses: vec!["coord.example:443".into(), "192.0.2.10:443".into()],
    };
    let text = t.encode().unwrap();
    assert!(text.starts_with("meshd1_"));
    assert!(
        !format!("{t:?}").contains("ab, ab"),
        "Debug must hide the secret"
    );
    assert_eq!(JoinToken::parse(&format!("  {text}\n")).unwrap(), t);
    assert_eq!(JoinToken::parse("tskey-abc"), Err(TokenError::Prefix));
    assert_eq!(JoinToken::parse("meshd1_***"), Err(TokenError::Base64));
    // Cut short: the checksum (or, shorter, the last address) is missing.
    let cut = &text[..text.len() - 8];
    assert!(matches!(JoinToken::parse(cut), Err(TokenError::Decode(_))));
    // A typo anywhere (one character changed) says the token is damaged,
    // never that it is for another coordinator or another mesh.
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let body_start = "meshd1_".len();
    let bytes = b64.decode(&text[body_start..]).unwrap();
    for i in body_start..text.len() {
        let mut typo = text.clone().into_bytes();
        typo[i] = if typo[i] == b'A' { b'B' } else { b'A' };
        let typo = String::from_utf8(typo).unwrap();
        // The last character's low bits carry nothing: no change there.
        if b64.decode(&typo[body_start..]).ok().as_ref() == Some(&bytes) {
            continue;
        }
        match JoinToken::parse(&typo) {
            Err(TokenError::Checksum | TokenError::Decode(_) | TokenError::Base64) => {}
            other => panic!("a typo at {i} gave {other:?}"),
        }
    }
    // A token from before checksums (no field 128) is still accepted.
    let old = format!("meshd1_{}", b64.encode(&bytes[..bytes.len() - 7]));
    assert_eq!(JoinToken::parse(&old).unwrap(), t);
    let none = JoinToken {
        addresses: vec![],
        ..t
    };
    assert_eq!(none.encode(), Err(TokenError::NoAddress));
    assert_ne!(
        token::secret_hash(&TokenSecret([1; 32])),
        token::secret_hash(&TokenSecret([2; 32]))
    );
}
