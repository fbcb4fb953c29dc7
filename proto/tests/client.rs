#![allow(clippy::unwrap_used)]
//! The node's session state machine against scripted coordinator messages.

use meshd_proto::auth::{self, ProofInput, Purpose};
use meshd_proto::client::{Client, ClientError, ClientEvent, Join};
use meshd_proto::*;
use x25519_dalek::StaticSecret;

fn peer(id: u64) -> Peer {
    Peer {
        node_id: NodeId(id),
        node_key: NodeKey([id as u8; 32]),
        name: format!("p{id}"),
        ipv4: [100, 64, 0, id as u8].into(),
        ipv6: "fd00::1".parse().unwrap(),
        endpoints: vec![],
        tags: vec![],
    }
}

fn info() -> NodeInfo {
    NodeInfo {
        node_id: NodeId(1),
        name: "me".into(),
        ipv4: [100, 64, 0, 1].into(),
        ipv6: "fd00::1".parse().unwrap(),
        mesh_ipv4: "100.64.0.0/10".parse().unwrap(),
        mesh_ipv6: "fd00::/48".parse().unwrap(),
        expires_at: None,
        tags: vec![],
    }
}

/// A client that has answered the challenge with a Login.
fn logged_in() -> Client {
    let coord = StaticSecret::from([9; 32]);
    let node = StaticSecret::from([1; 32]);
    let mut c = Client::new(node.clone(), Join::Login, b"cb");
    let nonce = [4; 32];
    c.handle_message(Message::Challenge(Challenge {
        coordinator_key: auth::public_key(&coord),
        nonce,
    }))
    .unwrap();
    let Some(Message::Login(l)) = c.poll_transmit() else {
        panic!("expected Login")
    };
    let input = ProofInput {
        purpose: Purpose::Login,
        coordinator_key: auth::public_key(&coord),
        node_key: auth::public_key(&node),
        nonce: &nonce,
        channel_binding: b"cb",
        extra: b"",
    };
    assert_eq!(auth::verify(&input, &coord, &l.proof), Ok(()));
    c
}

#[test]
fn map_in_parts_then_deltas() {
    let mut c = logged_in();
    c.handle_message(Message::LoginOk(info())).unwrap();
    c.handle_message(Message::PeerMap(PeerMap {
        peers: vec![peer(2)],
        last: false,
    }))
    .unwrap();
    assert_eq!(c.poll_event(), Some(ClientEvent::Joined(info())));
    assert_eq!(
        c.poll_event(),
        None,
        "no peer event before the map is complete"
    );
    c.handle_message(Message::PeerMap(PeerMap {
        peers: vec![peer(3)],
        last: true,
    }))
    .unwrap();
    assert_eq!(c.poll_event(), Some(ClientEvent::PeersChanged));
    assert_eq!(c.peers().len(), 2);
    c.handle_message(Message::PeerRemoved(NodeId(2))).unwrap();
    c.handle_message(Message::EndpointChanged(EndpointChanged {
        node_id: NodeId(3),
        endpoints: vec!["192.0.2.1:1".parse().unwrap()],
    }))
    .unwrap();
    assert_eq!(c.peers().keys().copied().collect::<Vec<_>>(), [NodeId(3)]);
    assert_eq!(c.peers()[&NodeId(3)].endpoints.len(), 1);
    assert_eq!(
        c.handle_message(Message::PeerRemoved(NodeId(2))),
        Err(ClientError::UnknownPeer(NodeId(2)))
    );
}

#[test]
fn out_of_order_messages_are_errors() {
    let mut c = logged_in();
    // A delta before the welcome and the complete map.
    assert!(matches!(
        c.handle_message(Message::PeerRemoved(NodeId(2))),
        Err(ClientError::Unexpected {
            got: "PeerRemoved",
            ..
        })
    ));
    let mut c = logged_in();
    c.handle_message(Message::LoginOk(info())).unwrap();
    c.handle_message(Message::PeerMap(PeerMap {
        peers: vec![],
        last: false,
    }))
    .unwrap();
    assert!(matches!(
        c.handle_message(Message::PeerAdded(peer(2))),
        Err(ClientError::Unexpected { .. })
    ));
    // A RegisterOk on a Login session.
    let mut c = logged_in();
    assert!(matches!(
        c.handle_message(Message::RegisterOk(info())),
        Err(ClientError::Unexpected { .. })
    ));
    // An error from the coordinator ends the session with its text.
    let mut c = logged_in();
    let e = ErrorMessage {
        code: ErrorCode::TokenRevoked,
        message: "revoked".into(),
    };
    assert_eq!(
        c.handle_message(Message::Error(e.clone())),
        Err(ClientError::Rejected(e))
    );
}

/// The node's own record can change during a session (a rename, a renewed
/// expiry); another node's record is not taken for its own.
#[test]
fn node_updated_replaces_the_nodes_own_record() {
    let mut c = logged_in();
    c.handle_message(Message::LoginOk(info())).unwrap();
    while c.poll_event().is_some() {}
    let renamed = NodeInfo {
        name: "renamed".into(),
        expires_at: Some(1_900_000_000),
        ..info()
    };
    c.handle_message(Message::NodeUpdated(renamed.clone()))
        .unwrap();
    assert_eq!(c.info(), Some(&renamed));
    assert_eq!(c.poll_event(), Some(ClientEvent::Updated(renamed)));
    let other = NodeInfo {
        node_id: NodeId(2),
        ..info()
    };
    assert_eq!(
        c.handle_message(Message::NodeUpdated(other)),
        Err(ClientError::NotMine {
            got: NodeId(2),
            mine: NodeId(1)
        })
    );
    // Before the welcome it is out of place.
    let mut c = logged_in();
    assert!(matches!(
        c.handle_message(Message::NodeUpdated(info())),
        Err(ClientError::Unexpected { .. })
    ));
}

/// The spec: the side that detects a bad frame or message sends an `Error`
/// and closes. The node's side queues it; a refusal from the coordinator is
/// not answered.
#[test]
fn a_rejected_message_or_frame_is_answered_with_an_error() {
    let mut c = logged_in();
    assert!(c.handle_message(Message::PeerRemoved(NodeId(2))).is_err());
    assert!(matches!(c.poll_transmit(),
        Some(Message::Error(e)) if e.code == ErrorCode::UnexpectedMessage && e.message.contains("PeerRemoved")));

    let mut c = logged_in();
    let mut d = FrameDecoder::new();
    d.feed(&[0, 0, 0, 3, 2, 0, 1]);
    c.handle_decode_error(&d.next_message().unwrap_err());
    assert!(matches!(c.poll_transmit(),
        Some(Message::Error(e)) if e.code == ErrorCode::UnsupportedVersion));

    let mut c = logged_in();
    let e = ErrorMessage {
        code: ErrorCode::Replaced,
        message: "replaced".into(),
    };
    assert!(c.handle_message(Message::Error(e)).is_err());
    assert_eq!(c.poll_transmit(), None);
}
