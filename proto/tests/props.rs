#![allow(clippy::unwrap_used)]
//! Properties: no input makes the decoder panic, the way bytes are split up
//! never changes what is decoded, and every encodable message round-trips.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use meshd_proto::token::JoinToken;
use meshd_proto::*;
use proptest::collection::vec;
use proptest::prelude::*;

fn key() -> impl Strategy<Value = NodeKey> {
    any::<[u8; 32]>().prop_map(NodeKey)
}

fn name() -> impl Strategy<Value = String> {
    "[a-z0-9-]{0,63}"
}

fn tags() -> impl Strategy<Value = Vec<String>> {
    vec("tag:[a-z]{1,20}", 0..4)
}

fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::new(IpAddr::from(ip), p)),
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::new(IpAddr::from(ip), p)),
    ]
}

fn endpoints() -> impl Strategy<Value = Vec<SocketAddr>> {
    vec(socket_addr(), 0..=MAX_ENDPOINTS)
}

fn prefix() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        (any::<[u8; 4]>(), 0u8..=32)
            .prop_map(|(a, l)| IpNet::V4(Ipv4Net::new(a.into(), l).unwrap())),
        (any::<[u8; 16]>(), 0u8..=128)
            .prop_map(|(a, l)| IpNet::V6(Ipv6Net::new(a.into(), l).unwrap())),
    ]
}

fn peer() -> impl Strategy<Value = Peer> {
    (
        any::<u64>(),
        key(),
        name(),
        any::<[u8; 4]>(),
        any::<[u8; 16]>(),
        endpoints(),
        tags(),
    )
        .prop_map(|(id, node_key, name, v4, v6, endpoints, tags)| Peer {
            node_id: NodeId(id),
            node_key,
            name,
            ipv4: Ipv4Addr::from(v4),
            ipv6: Ipv6Addr::from(v6),
            endpoints,
            tags,
        })
}

fn node_info() -> impl Strategy<Value = NodeInfo> {
    (
        any::<u64>(),
        name(),
        any::<[u8; 4]>(),
        any::<[u8; 16]>(),
        (any::<[u8; 4]>(), 0u8..=32),
        (any::<[u8; 16]>(), 0u8..=128),
        any::<Option<u64>>(),
        tags(),
    )
        .prop_map(|(id, name, v4, v6, n4, n6, expires_at, tags)| NodeInfo {
            node_id: NodeId(id),
            name,
            ipv4: v4.into(),
            ipv6: v6.into(),
            mesh_ipv4: Ipv4Net::new(n4.0.into(), n4.1).unwrap(),
            mesh_ipv6: Ipv6Net::new(n6.0.into(), n6.1).unwrap(),
            expires_at,
            tags,
        })
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (key(), any::<[u8; 32]>()).prop_map(|(coordinator_key, nonce)| Message::Challenge(
            Challenge {
                coordinator_key,
                nonce
            }
        )),
        (
            any::<[u8; 32]>(),
            key(),
            name(),
            any::<[u8; 32]>(),
            endpoints()
        )
            .prop_map(|(s, node_key, name, proof, endpoints)| {
                Message::Register(Register {
                    token_secret: TokenSecret(s),
                    node_key,
                    name,
                    proof,
                    endpoints,
                    relay: None,
                })
            }),
        (key(), any::<[u8; 32]>(), endpoints()).prop_map(|(node_key, proof, endpoints)| {
            Message::Login(Login {
                node_key,
                proof,
                endpoints,
                relay: None,
            })
        }),
        node_info().prop_map(Message::RegisterOk),
        node_info().prop_map(Message::LoginOk),
        (vec(peer(), 0..4), any::<bool>())
            .prop_map(|(peers, last)| Message::PeerMap(PeerMap { peers, last })),
        peer().prop_map(Message::PeerAdded),
        any::<u64>().prop_map(|id| Message::PeerRemoved(NodeId(id))),
        (any::<u64>(), endpoints()).prop_map(|(id, endpoints)| Message::EndpointChanged(
            EndpointChanged {
                node_id: NodeId(id),
                endpoints
            }
        )),
        (any::<u64>(), key()).prop_map(|(id, node_key)| Message::KeyRotated(KeyRotated {
            node_id: NodeId(id),
            node_key
        })),
        vec((prefix(), any::<u8>(), any::<u16>(), any::<u16>()), 0..8).prop_map(|rules| {
            Message::PolicyChanged(PolicyChanged {
                rules: rules
                    .into_iter()
                    .map(|(source, protocol, a, b)| FilterRule {
                        source,
                        protocol,
                        ports: (a.min(b), a.max(b)),
                    })
                    .collect(),
            })
        }),
        endpoints().prop_map(|endpoints| Message::EndpointReport(EndpointReport { endpoints })),
        (key(), any::<[u8; 32]>())
            .prop_map(|(new_key, proof)| Message::RotateKey(RotateKey { new_key, proof })),
        key().prop_map(Message::RotateKeyOk),
        node_info().prop_map(Message::NodeUpdated),
        (any::<u16>(), "\\PC{0,40}").prop_map(|(c, message)| Message::Error(ErrorMessage {
            code: ErrorCode::from_u16(c),
            message
        })),
    ]
}

/// Everything a decoder yields for `bytes` fed in pieces of the given sizes.
fn run(bytes: &[u8], cuts: &[usize]) -> (Vec<Message>, Result<(), DecodeError>) {
    let mut d = FrameDecoder::new();
    let mut out = Vec::new();
    let mut pos = 0;
    let mut sizes = cuts.iter().cycle();
    while pos < bytes.len() {
        let n = (*sizes.next().unwrap_or(&1)).clamp(1, bytes.len() - pos);
        d.feed(&bytes[pos..pos + n]);
        pos += n;
        loop {
            match d.next_message() {
                Ok(Some(m)) => out.push(m),
                Ok(None) => break,
                Err(e) => return (out, Err(e)),
            }
        }
    }
    let end = d.finish();
    (out, end)
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_and_splitting_does_not_matter(
        bytes in vec(any::<u8>(), 0..2048),
        cuts in vec(1usize..64, 1..8),
    ) {
        let whole = run(&bytes, &[bytes.len().max(1)]);
        prop_assert_eq!(run(&bytes, &cuts), whole);
    }

    #[test]
    fn framed_garbage_never_panics(ty in any::<u16>(), body in vec(any::<u8>(), 0..512)) {
        // A well-formed header makes the body reach every message decoder.
        let mut frame = ((body.len() + 3) as u32).to_be_bytes().to_vec();
        frame.push(VERSION);
        frame.extend_from_slice(&ty.to_be_bytes());
        frame.extend_from_slice(&body);
        let _ = decode(&frame);
    }

    #[test]
    fn messages_round_trip(msgs in vec(message(), 1..6), cuts in vec(1usize..100, 1..4)) {
        let mut stream = Vec::new();
        for m in &msgs {
            encode_frame(m, &mut stream).unwrap();
        }
        prop_assert_eq!(run(&stream, &cuts), (msgs, Ok(())));
    }

    #[test]
    fn mutated_frames_never_panic(msg in message(), flips in vec((any::<usize>(), any::<u8>()), 1..8)) {
        let mut bytes = encode(&msg).unwrap();
        for (i, b) in flips {
            let i = i % bytes.len();
            bytes[i] ^= b;
        }
        let _ = decode(&bytes);
    }

    #[test]
    fn token_parsing_never_panics(s in "meshd1_[A-Za-z0-9_-]{0,200}") {
        let _ = JoinToken::parse(&s);
    }
}
