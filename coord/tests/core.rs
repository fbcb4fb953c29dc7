#![allow(clippy::unwrap_used)]
//! The coordinator core driven by real protocol clients over an in-memory
//! transport and a fake clock.

mod support;

use std::time::{Duration, UNIX_EPOCH};

use meshd_coord::*;
use meshd_proto::client::{ClientEvent, Join};
use meshd_proto::*;
use support::harness::*;

fn reusable() -> TokenSpec {
    TokenSpec {
        reusable: true,
        ..Default::default()
    }
}

#[test]
fn first_node_joins_and_gets_addresses_an_empty_map_a_policy_and_the_relays() {
    let mut h = Harness::new(Config::default());
    let (_, secret) = h.token(TokenSpec {
        tags: vec!["tag:edge".into()],
        ..Default::default()
    });
    let a = h.register(1, "edge-1", &secret);
    let got = h.take(a);
    let names: Vec<&str> = got.iter().map(Message::name).collect();
    assert_eq!(
        names,
        [
            "Challenge",
            "RegisterOk",
            "PeerMap",
            "PolicyChanged",
            "RelayMap"
        ]
    );
    let info = h.info(a);
    assert_eq!(info.name, "edge-1");
    assert_eq!(info.ipv4.to_string(), "100.64.0.1");
    assert_eq!(info.mesh_ipv4, MESH_IPV4);
    assert_eq!(info.mesh_ipv6.prefix_len(), 48);
    assert_eq!(info.mesh_ipv6.network().octets()[0], 0xfd);
    assert!(info.mesh_ipv6.contains(&info.ipv6));
    assert_eq!(info.ipv6.octets()[12..], [100, 64, 0, 1]);
    assert_eq!(info.tags, ["tag:edge"]);
    assert!(h.peer_ids(a).is_empty());
    assert_eq!(h.conn(a).client.policy().len(), 2);
    assert!(h.coord.is_connected(info.node_id));
}

#[test]
fn second_node_sees_the_first_and_the_first_learns_of_the_second() {
    let mut h = Harness::new(Config::default());
    let (_, secret) = h.token(reusable());
    let a = h.register(1, "a", &secret);
    let b = h.register(2, "b", &secret);
    let (ia, ib) = (h.info(a), h.info(b));
    assert_ne!(ia.ipv4, ib.ipv4);
    assert_eq!(h.peer_ids(b), [ia.node_id]);
    assert_eq!(h.peer_ids(a), [ib.node_id]);
    let pa = &h.conn(b).client.peers()[&ia.node_id];
    assert_eq!(
        (pa.node_key, pa.ipv4, pa.name.as_str()),
        (pubkey(1), ia.ipv4, "a")
    );
    assert!(matches!(h.take(a).last(), Some(Message::PeerAdded(p)) if p.node_id == ib.node_id));
}

#[test]
fn endpoints_given_with_the_join_reach_peers_with_the_node() {
    let mut h = Harness::new(Config::default());
    let (_, secret) = h.token(reusable());
    let first = h.register(1, "n1", &secret);
    h.take(first);
    let join = Join::Register {
        token_secret: secret.clone(),
        name: "n2".into(),
    };
    let eps = ["192.0.2.2:51820", "[2001:db8::2]:51820"];
    let second = h.connect_at(key(2), join, &eps);
    let id = h.info(second).node_id;
    let got = h.take(first);
    assert_eq!(got.len(), 1, "{got:?}");
    let Message::PeerAdded(p) = &got[0] else {
        panic!("{got:?}")
    };
    assert_eq!(p.node_id, id);
    let want: Vec<std::net::SocketAddr> = eps.iter().map(|e| e.parse().unwrap()).collect();
    assert_eq!(p.endpoints, want);
    // A login with other endpoints replaces them; one without keeps them.
    h.disconnect(second);
    h.take(first);
    let again = h.connect_at(key(2), Join::Login, &["192.0.2.3:51820"]);
    assert!(h.outcome(again).is_ok());
    assert_eq!(
        h.conn(first).client.peers()[&id].endpoints,
        vec!["192.0.2.3:51820".parse::<std::net::SocketAddr>().unwrap()]
    );
    h.disconnect(again);
    let plain = h.login(2);
    assert!(h.outcome(plain).is_ok());
    assert_eq!(h.conn(first).client.peers()[&id].endpoints.len(), 1);
}

#[test]
fn endpoint_changes_reach_exactly_the_other_nodes_with_bytes_independent_of_mesh_size() {
    let bytes_per_viewer = |n: u8| {
        let mut h = Harness::new(Config::default());
        let (_, secret) = h.token(reusable());
        let sessions: Vec<SessionId> = (1..=n)
            .map(|i| h.register(i, &format!("n{i}"), &secret))
            .collect();
        for &s in &sessions {
            h.take(s);
            h.conn(s).bytes = 0;
        }
        h.report(sessions[0], &["192.0.2.1:51820", "[2001:db8::1]:51820"]);
        let origin = h.info(sessions[0]).node_id;
        assert!(
            h.take(sessions[0]).is_empty(),
            "the reporter is not told its own change"
        );
        for &s in &sessions[1..] {
            let got = h.take(s);
            assert_eq!(got.len(), 1);
            let Message::EndpointChanged(c) = &got[0] else {
                panic!("{got:?}")
            };
            assert_eq!(c.node_id, origin);
            assert_eq!(c.endpoints.len(), 2);
            assert_eq!(h.conn(s).client.peers()[&origin].endpoints, c.endpoints);
        }
        // Reporting the same endpoints again changes nothing and sends nothing.
        h.report(sessions[0], &["192.0.2.1:51820", "[2001:db8::1]:51820"]);
        assert!(sessions.iter().all(|&s| h.take(s).is_empty()));
        let per: Vec<usize> = sessions[1..].iter().map(|&s| h.conns[&s].bytes).collect();
        assert!(per.windows(2).all(|w| w[0] == w[1]));
        per[0]
    };
    assert_eq!(bytes_per_viewer(3), bytes_per_viewer(40));
}

#[test]
fn key_rotation_reaches_peers_and_only_the_new_key_logs_in() {
    let mut h = Harness::new(Config::default());
    let (_, secret) = h.token(reusable());
    let a = h.register(1, "a", &secret);
    let b = h.register(2, "b", &secret);
    let ia = h.info(a).node_id;
    h.take(b);
    h.conn(a).client.rotate_key(key(11)).unwrap();
    h.drive();
    let events: Vec<ClientEvent> = std::iter::from_fn(|| h.conn(a).client.poll_event()).collect();
    assert!(events.contains(&ClientEvent::KeyRotated(pubkey(11))));
    assert_eq!(
        h.take(b),
        [Message::KeyRotated(KeyRotated {
            node_id: ia,
            node_key: pubkey(11)
        })]
    );
    assert_eq!(h.conn(b).client.peers()[&ia].node_key, pubkey(11));
    h.disconnect(a);
    let old = h.login(1);
    assert_eq!(h.refused(old), ErrorCode::UnknownNode);
    let new = h.login(11);
    assert_eq!(h.info(new).node_id, ia);
}

#[test]
fn a_node_cannot_claim_another_nodes_key() {
    let mut h = Harness::new(Config::default());
    let (_, secret) = h.token(reusable());
    let _victim = h.register(2, "victim", &secret);
    let victim_key = pubkey(2);
    // The attacker knows the victim's public key but not its private key: it
    // sends the victim's key with a proof made with its own key.
    for purpose in ["login", "register"] {
        let id = h.coord.open_session(b"binding", h.now);
        let msg = if purpose == "login" {
            Message::Login(Login {
                node_key: victim_key,
                proof: [0x5a; 32],
                endpoints: vec![],
                relay: None,
            })
        } else {
            Message::Register(Register {
                token_secret: secret.clone(),
                node_key: victim_key,
                name: "evil".into(),
                proof: [0x5a; 32],
                endpoints: vec![],
                relay: None,
            })
        };
        h.coord.handle_message(id, msg, h.now);
        let actions: Vec<Action> = std::iter::from_fn(|| h.coord.poll_action()).collect();
        let error = actions.iter().find_map(|a| match a {
            Action::Send {
                session,
                message: Message::Error(e),
            } if *session == id => Some(e.code),
            _ => None,
        });
        assert_eq!(error, Some(ErrorCode::BadProof), "{purpose}");
        assert!(actions.contains(&Action::Close { session: id }));
    }
    // Registering a key that is already registered (with a valid proof) is
    // refused too: that node must log in.
    let again = h.register(2, "victim-again", &secret);
    assert_eq!(h.refused(again), ErrorCode::KeyInUse);
    assert_eq!(h.coord.state().nodes.len(), 1);
}

#[test]
fn token_errors_are_distinct() {
    let mut h = Harness::new(Config::default());
    let (one, once) = h.token(TokenSpec::default());
    let ok = h.register(1, "a", &once);
    assert_eq!(h.info(ok).name, "a");
    let used = h.register(2, "b", &once);
    assert_eq!(h.refused(used), ErrorCode::TokenUsed);
    assert_eq!(h.coord.state().tokens[&one.id].uses, 1);

    let (rev, revoked) = h.token(reusable());
    h.coord.revoke_token(&rev.id, h.now).unwrap();
    let s = h.register(3, "c", &revoked);
    assert_eq!(h.refused(s), ErrorCode::TokenRevoked);

    let (_, short) = h.token(TokenSpec {
        expires_in: Some(Duration::from_secs(60)),
        ..reusable()
    });
    h.advance(Duration::from_secs(61));
    let s = h.register(4, "d", &short);
    assert_eq!(h.refused(s), ErrorCode::TokenExpired);

    let s = h.register(5, "e", &TokenSecret([0x77; 32]));
    assert_eq!(h.refused(s), ErrorCode::TokenInvalid);
    assert_eq!(h.coord.state().nodes.len(), 1);
    assert!(matches!(
        h.coord.revoke_token("nope", h.now),
        Err(CoordError::NoSuchToken(_))
    ));
}

#[test]
fn expired_nodes_leave_every_map_and_cannot_log_in() {
    let mut h = Harness::new(Config {
        node_expiry: Some(Duration::from_secs(3600)),
        ..Config::default()
    });
    let (_, secret) = h.token(reusable());
    let a = h.register(1, "a", &secret);
    h.advance(Duration::from_secs(1800));
    let b = h.register(2, "b", &secret);
    let (ia, ib) = (h.info(a), h.info(b));
    assert_eq!(ia.expires_at, Some(T0 + 3600));
    assert_eq!(
        h.coord.poll_timeout(),
        Some(UNIX_EPOCH + Duration::from_secs(T0 + 3600))
    );
    h.take(b);
    h.advance(Duration::from_secs(1799));
    assert!(h.take(b).is_empty());
    h.advance(Duration::from_secs(1));
    assert_eq!(h.refused(a), ErrorCode::NodeExpired);
    assert_eq!(h.take(b), [Message::PeerRemoved(ia.node_id)]);
    assert!(h.peer_ids(b).is_empty());
    let again = h.login(1);
    assert_eq!(h.refused(again), ErrorCode::NodeExpired);
    // An operator expiring a node now has the same effect.
    let c = h.register(3, "c", &secret);
    h.take(b);
    h.coord.expire_node(ib.node_id, h.now).unwrap();
    h.drive();
    assert_eq!(h.refused(b), ErrorCode::NodeExpired);
    assert_eq!(h.take(c).last(), Some(&Message::PeerRemoved(ib.node_id)));
}

#[test]
fn ephemeral_nodes_are_removed_after_staying_disconnected() {
    let mut h = Harness::new(Config {
        ephemeral_timeout: Duration::from_secs(60),
        ..Config::default()
    });
    let (_, eph) = h.token(TokenSpec {
        ephemeral: true,
        ..reusable()
    });
    let (_, normal) = h.token(reusable());
    let a = h.register(1, "fn-1", &eph);
    let b = h.register(2, "b", &normal);
    let ia = h.info(a).node_id;
    h.disconnect(a);
    h.take(b);
    h.advance(Duration::from_secs(30));
    // Reconnecting resets the clock.
    let a2 = h.login(1);
    h.advance(Duration::from_secs(45));
    h.disconnect(a2);
    h.advance(Duration::from_secs(59));
    assert!(h.coord.state().nodes.contains_key(&ia));
    assert!(h.take(b).is_empty());
    h.advance(Duration::from_secs(1));
    assert!(!h.coord.state().nodes.contains_key(&ia));
    assert_eq!(h.take(b), [Message::PeerRemoved(ia)]);
    assert!(!h.store.lock().unwrap().nodes.contains_key(&ia));
    // A normal node that disconnects stays.
    let ib = h.info(b).node_id;
    h.disconnect(b);
    h.advance(Duration::from_secs(3600));
    assert!(h.coord.state().nodes.contains_key(&ib));
}

#[test]
fn restart_keeps_nodes_addresses_and_tokens_and_nodes_log_back_in() {
    let mut h = Harness::new(Config::default());
    let (tok, secret) = h.token(reusable());
    let a = h.register(1, "a", &secret);
    let b = h.register(2, "b", &secret);
    let (ia, ib) = (h.info(a), h.info(b));
    let prefix = ia.mesh_ipv6;
    h.restart();
    assert_eq!(h.coord.state().tokens[&tok.id].uses, 2);
    let a = h.login(1);
    let b = h.login(2);
    assert_eq!(h.info(a), ia);
    assert_eq!(h.info(b).mesh_ipv6, prefix);
    assert_eq!(h.peer_ids(a), [ib.node_id]);
    // The token still works, and addresses are not handed out twice.
    let c = h.register(3, "c", &secret);
    assert_eq!(h.info(c).ipv4.to_string(), "100.64.0.3");
}

#[test]
fn store_failure_refuses_cleanly_and_changes_nothing() {
    let mut h = Harness::new(Config::default());
    let (_, secret) = h.token(reusable());
    let a = h.register(1, "a", &secret);
    h.take(a);
    let before = h.store.lock().unwrap().clone();
    h.store.lock().unwrap().fail_commits = true;
    let b = h.register(2, "b", &secret);
    assert_eq!(h.refused(b), ErrorCode::Unavailable);
    assert_eq!(h.coord.state().nodes.len(), 1);
    assert_eq!(h.store.lock().unwrap().nodes, before.nodes);
    assert_eq!(h.store.lock().unwrap().tokens, before.tokens);
    assert!(
        h.take(a).is_empty(),
        "no one hears of a node that was not saved"
    );
    h.store.lock().unwrap().fail_commits = false;
    let b = h.register(2, "b", &secret);
    assert_eq!(h.info(b).name, "b");
}

#[test]
fn handshake_timeout_and_out_of_order_messages_close_the_session() {
    let mut h = Harness::new(Config::default());
    let silent = h.coord.open_session(b"x", h.now);
    assert!(matches!(
        h.coord.poll_action(),
        Some(Action::Send {
            message: Message::Challenge(_),
            ..
        })
    ));
    h.now += Duration::from_secs(10);
    h.coord.handle_timeout(h.now);
    let actions: Vec<Action> = std::iter::from_fn(|| h.coord.poll_action()).collect();
    assert!(
        matches!(&actions[0], Action::Send { session, message: Message::Error(e) }
        if *session == silent && e.code == ErrorCode::HandshakeTimeout)
    );
    assert_eq!(actions[1], Action::Close { session: silent });
    assert_eq!(h.coord.poll_timeout(), None);

    let check = |h: &mut Harness, msg: Message| {
        let s = h.coord.open_session(b"x", h.now);
        h.coord.poll_action();
        h.coord.handle_message(s, msg.clone(), h.now);
        let a: Vec<Action> = std::iter::from_fn(|| h.coord.poll_action()).collect();
        assert!(
            matches!(&a[..], [Action::Send { message: Message::Error(e), .. }, Action::Close { .. }]
                if e.code == ErrorCode::UnexpectedMessage),
            "{}: {a:?}",
            msg.name()
        );
    };
    check(
        &mut h,
        Message::EndpointReport(EndpointReport { endpoints: vec![] }),
    );
    check(
        &mut h,
        Message::PeerMap(PeerMap {
            peers: vec![],
            last: true,
        }),
    );
    check(
        &mut h,
        Message::RotateKey(RotateKey {
            new_key: pubkey(3),
            proof: [0; 32],
        }),
    );

    let mut d = FrameDecoder::new();
    d.feed(&[0, 0, 0, 3, 9, 0, 1]);
    let err = d.next_message().unwrap_err();
    let s = h.coord.open_session(b"x", h.now);
    h.coord.poll_action();
    h.coord.handle_decode_error(s, &err, h.now);
    assert!(matches!(h.coord.poll_action(),
        Some(Action::Send { message: Message::Error(e), .. }) if e.code == ErrorCode::UnsupportedVersion));
}

#[test]
fn names_are_checked_and_made_unique_and_addresses_are_not_reused_soon() {
    let mut h = Harness::new(Config::default());
    let (_, secret) = h.token(reusable());
    let bad = h.register(1, "Not A Label", &secret);
    assert_eq!(h.refused(bad), ErrorCode::InvalidName);
    let a = h.register(1, "web", &secret);
    let b = h.register(2, "web", &secret);
    let c = h.register(3, "web", &secret);
    assert_eq!(
        (h.info(a).name, h.info(b).name, h.info(c).name),
        ("web".into(), "web-2".into(), "web-3".into())
    );
    let ib = h.info(b).node_id;
    h.coord.delete_node(ib, h.now).unwrap();
    h.drive();
    assert_eq!(h.refused(b), ErrorCode::UnknownNode);
    assert_eq!(h.take(a).last(), Some(&Message::PeerRemoved(ib)));
    let d = h.register(4, "d", &secret);
    assert_eq!(h.info(d).ipv4.to_string(), "100.64.0.4");
    let ia = h.info(a).node_id;
    assert!(matches!(
        h.coord.rename_node(ia, "web-3", h.now),
        Err(CoordError::NameTaken(_))
    ));
    h.coord.rename_node(ia, "api", h.now).unwrap();
    h.drive();
    assert!(matches!(h.take(c).last(), Some(Message::PeerAdded(p)) if p.name == "api"));
    assert!(matches!(
        h.coord.create_token(
            TokenSpec {
                tags: vec!["edge".into()],
                ..TokenSpec::default()
            },
            h.now
        ),
        Err(CoordError::InvalidTag(_))
    ));
}

#[test]
fn a_second_session_for_a_node_replaces_the_first() {
    let mut h = Harness::new(Config::default());
    let (_, secret) = h.token(reusable());
    let a = h.register(1, "a", &secret);
    let b = h.register(2, "b", &secret);
    let a2 = h.login(1);
    assert!(h.conn(a).closed);
    let ia = h.info(a2).node_id;
    assert!(h.coord.is_connected(ia));
    // The old session's late close does not mark the node disconnected.
    h.coord.close_session(a, h.now);
    assert!(h.coord.is_connected(ia));
    h.take(b);
    h.report(a2, &["192.0.2.7:1"]);
    assert_eq!(h.take(b).len(), 1);
}

/// The spec says an expired node registers again. With its own key, that was
/// refused as `KeyInUse` (the expired record still held the key) while Login
/// said `NodeExpired`: the node could never come back.
#[test]
fn an_expired_node_registers_again_with_its_key_and_keeps_its_record() {
    let mut h = Harness::new(Config {
        node_expiry: Some(Duration::from_secs(3600)),
        ..Config::default()
    });
    let (tok, secret) = h.token(reusable());
    let a = h.register(1, "a", &secret);
    let b = h.register(2, "b", &secret);
    let ia = h.info(a);
    h.coord.expire_node(ia.node_id, h.now).unwrap();
    h.drive();
    assert_eq!(h.refused(a), ErrorCode::NodeExpired);
    let login = h.login(1);
    assert_eq!(h.refused(login), ErrorCode::NodeExpired);
    h.take(b);

    h.advance(Duration::from_secs(10));
    let again = h.register(1, "a", &secret);
    assert_eq!(h.outcome(again), Ok(()));
    let renewed = h.info(again);
    assert_eq!(
        (
            renewed.node_id,
            renewed.name.as_str(),
            renewed.ipv4,
            renewed.ipv6
        ),
        (ia.node_id, "a", ia.ipv4, ia.ipv6)
    );
    assert_eq!(renewed.expires_at, Some(T0 + 10 + 3600));
    assert_eq!(h.peer_ids(again), [h.info(b).node_id]);
    assert!(
        matches!(&h.take(b)[..], [Message::PeerAdded(p)] if p.node_id == ia.node_id && p.ipv4 == ia.ipv4),
        "its peers see it again"
    );
    assert_eq!(h.coord.state().nodes.len(), 2);
    assert_eq!(h.coord.state().tokens[&tok.id].uses, 3);
    // The renewed record is stored, and the node logs in as before.
    h.restart();
    let later = h.login(1);
    assert_eq!(h.info(later), renewed);
}

/// A node whose key is registered and not expired still cannot register
/// again (it must log in), and a name taken meanwhile is not taken back.
#[test]
fn an_expired_node_that_registers_again_gets_a_free_name() {
    let mut h = Harness::new(Config::default());
    let (_, secret) = h.token(reusable());
    let a = h.register(1, "a", &secret);
    let ia = h.info(a).node_id;
    h.coord.expire_node(ia, h.now).unwrap();
    h.coord.rename_node(ia, "old", h.now).unwrap();
    h.drive();
    let other = h.register(2, "a", &secret);
    assert_eq!(h.info(other).name, "a");
    let again = h.register(1, "a", &secret);
    assert_eq!(h.info(again).node_id, ia);
    assert_eq!(h.info(again).name, "a-2");
    let twice = h.register(1, "a", &secret);
    assert_eq!(h.refused(twice), ErrorCode::KeyInUse);
}

/// A node whose session was replaced by a newer login of the same node is
/// told so, and can tell it from a coordinator that went away.
#[test]
fn a_replaced_session_gets_an_error_before_it_is_closed() {
    let mut h = Harness::new(Config::default());
    let (_, secret) = h.token(reusable());
    let a = h.register(1, "a", &secret);
    h.take(a);
    let a2 = h.login(1);
    assert_eq!(h.refused(a), ErrorCode::Replaced);
    assert!(matches!(h.take(a)[..], [Message::Error(_)]));
    assert_eq!(h.outcome(a2), Ok(()));
}

/// A node hears of changes to its own record during a session: a rename by
/// the operator, and the expiry a key rotation renews.
#[test]
fn a_node_is_told_its_own_rename_and_renewed_expiry() {
    let mut h = Harness::new(Config {
        node_expiry: Some(Duration::from_secs(3600)),
        ..Config::default()
    });
    let (_, secret) = h.token(reusable());
    let a = h.register(1, "a", &secret);
    let ia = h.info(a);
    h.take(a);
    h.coord.rename_node(ia.node_id, "renamed", h.now).unwrap();
    h.drive();
    let renamed = NodeInfo {
        name: "renamed".into(),
        ..ia.clone()
    };
    assert_eq!(h.take(a), [Message::NodeUpdated(renamed.clone())]);
    assert_eq!(h.info(a), renamed);

    h.advance(Duration::from_secs(600));
    h.conn(a).client.rotate_key(key(11)).unwrap();
    h.drive();
    let renewed = NodeInfo {
        expires_at: Some(T0 + 600 + 3600),
        ..renamed
    };
    assert_eq!(
        h.take(a),
        [
            Message::NodeUpdated(renewed.clone()),
            Message::RotateKeyOk(pubkey(11))
        ]
    );
    assert_eq!(h.info(a), renewed);
    let events: Vec<ClientEvent> = std::iter::from_fn(|| h.conn(a).client.poll_event()).collect();
    assert!(
        events.contains(&ClientEvent::Updated(renewed)),
        "{events:?}"
    );
}

fn relay_token() -> TokenSpec {
    TokenSpec {
        reusable: true,
        tags: vec!["tag:relay".into()],
        ..Default::default()
    }
}

fn relay_regions(h: &mut Harness, id: SessionId) -> Vec<String> {
    h.conn(id)
        .client
        .relays()
        .iter()
        .map(|r| r.info.region.clone())
        .collect()
}

#[test]
fn relays_join_with_a_relay_token_and_reach_every_node_in_its_relay_map() {
    let mut h = Harness::new(Config::default());
    let (_, nodes) = h.token(reusable());
    let (_, relays) = h.token(relay_token());
    let a = h.register(1, "a", &nodes);
    // A node's token cannot make a relay: a relay learns every member.
    let stranger = h.connect_relay(9, "eu", Some(&nodes));
    assert_eq!(h.refused(stranger), ErrorCode::TokenInvalid);
    let eu = h.connect_relay(10, "eu", Some(&relays));
    assert!(h.outcome(eu).is_ok());
    // The node learns the relay from the relay map, never as a peer.
    assert_eq!(relay_regions(&mut h, a), ["eu"]);
    assert!(h.peer_ids(a).is_empty());
    let entry = h.conn(a).client.relays()[0].clone();
    assert_eq!((entry.key, entry.info.cert_pin), (pubkey(10), [10; 32]));
    // The relay sees every node, and the nodes that join later.
    let ia = h.info(a).node_id;
    assert_eq!(h.peer_ids(eu), [ia]);
    let b = h.register(2, "b", &nodes);
    let ib = h.info(b).node_id;
    assert_eq!(relay_regions(&mut h, b), ["eu"]);
    let mut seen = h.peer_ids(eu);
    seen.sort();
    let mut want = vec![ia, ib];
    want.sort();
    assert_eq!(seen, want);
    assert_eq!(h.peer_ids(a), [ib]);
    // A second region reaches everyone, the first relay included.
    let us = h.connect_relay(11, "us", Some(&relays));
    assert!(h.outcome(us).is_ok());
    for s in [a, b, eu, us] {
        assert_eq!(relay_regions(&mut h, s), ["eu", "us"], "session {s:?}");
    }
    // A relay logs in as a relay; a node cannot log in as one.
    h.disconnect(us);
    let again = h.connect_relay(11, "us", None);
    assert!(h.outcome(again).is_ok());
    h.disconnect(a);
    let fake = h.connect_relay(1, "eu", None);
    assert_eq!(h.refused(fake), ErrorCode::UnexpectedMessage);
}

#[test]
fn a_deleted_or_expired_relay_leaves_every_relay_map_and_its_members_leave_it() {
    let mut h = Harness::new(Config {
        node_expiry: Some(Duration::from_secs(3600)),
        ..Config::default()
    });
    let (_, nodes) = h.token(reusable());
    let (_, relays) = h.token(relay_token());
    let eu = h.connect_relay(10, "eu", Some(&relays));
    let us = h.connect_relay(11, "us", Some(&relays));
    let a = h.register(1, "a", &nodes);
    let ia = h.info(a).node_id;
    assert_eq!(relay_regions(&mut h, a), ["eu", "us"]);
    let us_id = h.info(us).node_id;
    h.coord.delete_node(us_id, h.now).unwrap();
    h.drive();
    assert_eq!(relay_regions(&mut h, a), ["eu"]);
    assert_eq!(relay_regions(&mut h, eu), ["eu"]);
    // A member that is deleted leaves the relay's view at once.
    h.coord.delete_node(ia, h.now).unwrap();
    h.drive();
    assert!(h.peer_ids(eu).is_empty());
    let b = h.register(2, "b", &nodes);
    h.advance(Duration::from_secs(3601));
    h.drive();
    assert!(relay_regions(&mut h, b).is_empty() || h.conn(b).closed);
    assert!(h.conn(eu).closed, "an expired relay's session ends");
}
