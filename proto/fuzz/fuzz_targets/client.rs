//! The node's side of a control session (`proto::client::Client`): frames in
//! any order and shape, through the `FrameDecoder` the node's connection
//! uses, mixed with well-formed coordinator messages (so the fuzzer reaches
//! a joined session with a peer map quickly), key rotations and endpoint
//! reports.
//!
//! The input is a program: each byte picks an operation, the bytes after it
//! are its arguments. Fails when the client panics, or when
//! - a frame that did not decode, or a message the client refused, is not
//!   answered with an `Error` for the coordinator (and the coordinator's own
//!   `Error` is answered);
//! - a message the client sends does not encode;
//! - the decoder holds more than one maximal frame and one input.
//!
//! A session that failed is replaced by a new client, as the node reconnects.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use meshd_proto::client::{Client, ClientError, Join};
use meshd_proto::{
    encode, Challenge, EndpointChanged, ErrorCode, ErrorMessage, FilterRule, FrameDecoder,
    KeyRotated, Message, NodeId, NodeInfo, NodeKey, Peer, PeerMap, PolicyChanged, TokenSecret,
    MAX_ENDPOINTS, MAX_FRAME_LEN,
};
use x25519_dalek::{PublicKey, StaticSecret};

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }

    fn bytes(&mut self, n: usize) -> &[u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }
}

fn secret(n: u8) -> StaticSecret {
    StaticSecret::from([n % 4 + 1; 32])
}

fn public(n: u8) -> NodeKey {
    NodeKey(PublicKey::from(&secret(n)).to_bytes())
}

fn info(id: u8, name: u8) -> NodeInfo {
    NodeInfo {
        node_id: NodeId(u64::from(id % 2 + 1)),
        name: format!("n{name}"),
        ipv4: [100, 64, 0, id].into(),
        ipv6: "fd00::1".parse().expect("an address"),
        mesh_ipv4: "100.64.0.0/10".parse().expect("a prefix"),
        mesh_ipv6: "fd00::/48".parse().expect("a prefix"),
        expires_at: name.is_multiple_of(2).then_some(u64::from(name)),
        tags: vec![],
    }
}

fn peer(id: u8, n: u8) -> Peer {
    Peer {
        node_id: NodeId(u64::from(id % 8)),
        node_key: public(n),
        name: format!("p{id}"),
        ipv4: [100, 64, 1, id].into(),
        ipv6: "fd00::2".parse().expect("an address"),
        endpoints: endpoints(n),
        tags: vec![],
    }
}

fn endpoints(n: u8) -> Vec<SocketAddr> {
    (0..usize::from(n) % (MAX_ENDPOINTS + 1))
        .map(|p| SocketAddr::from(([192, 0, 2, n], p as u16)))
        .collect()
}

/// A well-formed coordinator message, chosen and filled from the input.
fn message(input: &mut Input<'_>) -> Message {
    let (what, a, b) = (input.byte(), input.byte(), input.byte());
    match what % 12 {
        0 => Message::Challenge(Challenge {
            // Key 0 is a low-order point: the client must refuse it.
            coordinator_key: if a == 0 { NodeKey([0; 32]) } else { public(a) },
            nonce: [b; 32],
        }),
        1 => Message::RegisterOk(info(a, b)),
        2 => Message::LoginOk(info(a, b)),
        3 => Message::PeerMap(PeerMap {
            peers: (0..a % 4).map(|i| peer(b.wrapping_add(i), i)).collect(),
            last: b.is_multiple_of(2),
        }),
        4 => Message::PeerAdded(peer(a, b)),
        5 => Message::PeerRemoved(NodeId(u64::from(a % 8))),
        6 => Message::EndpointChanged(EndpointChanged {
            node_id: NodeId(u64::from(a % 8)),
            endpoints: endpoints(b),
        }),
        7 => Message::KeyRotated(KeyRotated {
            node_id: NodeId(u64::from(a % 8)),
            node_key: public(b),
        }),
        8 => Message::PolicyChanged(PolicyChanged {
            rules: (0..a % 3)
                .map(|i| FilterRule {
                    source: "100.64.0.0/10".parse().expect("a prefix"),
                    protocol: i,
                    ports: (u16::from(b), u16::from(b) + u16::from(i)),
                })
                .collect(),
        }),
        9 => Message::RotateKeyOk(public(a)),
        10 => Message::NodeUpdated(info(a, b)),
        _ => Message::Error(ErrorMessage {
            code: ErrorCode::from_u16(u16::from(a)),
            message: "refused".into(),
        }),
    }
}

struct Session {
    client: Client,
    decoder: FrameDecoder,
}

impl Session {
    fn new(input: &mut Input<'_>) -> Session {
        let (k, how) = (input.byte(), input.byte());
        let join = if how.is_multiple_of(2) {
            Join::Login
        } else {
            Join::Register {
                token_secret: TokenSecret([how; 32]),
                name: "node".into(),
            }
        };
        Session {
            client: Client::new(secret(k), join, &[how; 32]),
            decoder: FrameDecoder::new(),
        }
    }

    /// What the client queued to send: each must encode. Returns the last.
    fn sent(&mut self) -> Option<Message> {
        let mut last = None;
        while let Some(m) = self.client.poll_transmit() {
            encode(&m).expect("the client's messages encode");
            last = Some(m);
        }
        last
    }

    /// Bytes from the coordinator; `false` once the session is over.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        self.decoder.feed(bytes);
        assert!(self.decoder.buffered() < 4 + MAX_FRAME_LEN + bytes.len());
        loop {
            match self.decoder.next_message() {
                Ok(Some(msg)) => {
                    let handled = self.client.handle_message(msg);
                    if let Err(e) = handled {
                        let last = self.sent();
                        match e {
                            ClientError::Rejected(_) => {
                                assert!(
                                    last.is_none(),
                                    "answered the coordinator's Error: {last:?}"
                                )
                            }
                            e => assert!(
                                matches!(&last, Some(Message::Error(m)) if m.message == e.to_string()),
                                "{e} not answered: {last:?}"
                            ),
                        }
                        return false;
                    }
                    self.sent();
                }
                Ok(None) => return true,
                Err(e) => {
                    self.malformed(&e);
                    return false;
                }
            }
        }
    }

    fn malformed(&mut self, e: &meshd_proto::DecodeError) {
        self.client.handle_decode_error(e);
        let last = self.sent();
        assert!(
            matches!(&last, Some(Message::Error(m))
                if matches!(m.code, ErrorCode::Malformed | ErrorCode::UnsupportedVersion)),
            "{e} not answered: {last:?}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mut s = Session::new(&mut input);
    while !input.0.is_empty() {
        let alive = match input.byte() % 6 {
            0 => {
                let len = input.byte();
                let bytes = input.bytes(usize::from(len)).to_vec();
                s.feed(&bytes)
            }
            1 | 2 => {
                let m = message(&mut input);
                let bytes = encode(&m).expect("a well-formed message encodes");
                // Cut short or changed in one byte, now and then.
                let (how, at) = (input.byte(), usize::from(input.byte()) % bytes.len());
                let bytes = match how % 8 {
                    0 => bytes[..at].to_vec(),
                    1 => {
                        let mut b = bytes;
                        b[at] ^= how;
                        b
                    }
                    _ => bytes,
                };
                s.feed(&bytes)
            }
            3 => {
                let _ = s.client.rotate_key(secret(input.byte()));
                s.sent();
                true
            }
            4 => {
                s.client.report_endpoints(endpoints(input.byte()));
                s.sent();
                true
            }
            _ => match s.decoder.finish() {
                // The stream ended inside a frame.
                Err(e) => {
                    s.malformed(&e);
                    false
                }
                Ok(()) => true,
            },
        };
        if !alive {
            s = Session::new(&mut input);
        }
    }
});
