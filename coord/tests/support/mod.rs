//! Helpers shared by the coordinator's integration tests. Each test binary
//! uses a different part, hence the dead-code allowance.
#![allow(dead_code)]

pub mod harness;
pub mod pg;

use meshd_coord::*;
use meshd_proto::{NodeId, NodeKey};

pub fn node(i: u8) -> NodeRecord {
    NodeRecord {
        id: NodeId(1000 + u64::from(i)),
        name: format!("n{i}"),
        key: NodeKey([i; 32]),
        ipv4: [100, 64, 0, i].into(),
        ipv6: format!("fd00::{i}").parse().unwrap(),
        tags: vec!["tag:a".into(), "tag:b".into()],
        slice: Some("blue".into()),
        ephemeral: i.is_multiple_of(2),
        token_id: "00112233aabbccdd".into(),
        created_at: 1_800_000_000_000,
        expires_at: Some(1_900_000_000_000),
        endpoints: vec![
            "192.0.2.1:51820".parse().unwrap(),
            "[2001:db8::1]:7".parse().unwrap(),
        ],
        disconnected_at: None,
    }
}

pub fn token(i: u8) -> TokenRecord {
    TokenRecord {
        id: format!("{i:016x}"),
        secret_hash: [i; 32],
        reusable: true,
        ephemeral: false,
        tags: vec![],
        slice: None,
        created_at: 1_800_000_000_000,
        expires_at: None,
        revoked: false,
        uses: 3,
    }
}

/// What every store must do: keep what was committed, update in place,
/// delete, and apply a batch all or nothing.
pub fn conformance(store: &mut dyn Store) {
    let settings = MeshSettings {
        ipv6_prefix: "fd12:3456:789a::/48".parse().unwrap(),
        created_at: 5,
    };
    store
        .commit(&[
            Change::Settings(settings.clone()),
            Change::PutToken(token(1)),
            Change::PutNode(node(1)),
        ])
        .unwrap();
    store.commit(&[Change::PutNode(node(2))]).unwrap();
    let snap = store.load().unwrap();
    assert_eq!(snap.settings, Some(settings.clone()));
    assert_eq!(snap.nodes, vec![node(1), node(2)]);
    assert_eq!(snap.tokens, vec![token(1)]);

    // Updates replace the record; settings are set once.
    let mut n1 = node(1);
    n1.endpoints.clear();
    n1.tags.clear();
    n1.slice = None;
    n1.expires_at = None;
    n1.disconnected_at = Some(7);
    let other = MeshSettings {
        ipv6_prefix: "fd00:1:2::/48".parse().unwrap(),
        created_at: 9,
    };
    store
        .commit(&[Change::PutNode(n1.clone()), Change::Settings(other)])
        .unwrap();
    let snap = store.load().unwrap();
    assert_eq!(snap.nodes[0], n1);
    assert_eq!(snap.settings, Some(settings));

    // A batch whose last change breaks a uniqueness rule (node 3 takes node
    // 2's address) leaves nothing of the batch behind.
    let mut clash = node(3);
    clash.ipv4 = node(2).ipv4;
    let mut t1 = token(1);
    t1.uses = 4;
    let err = store.commit(&[
        Change::PutToken(t1),
        Change::DeleteNode(node(1).id),
        Change::PutNode(clash),
    ]);
    assert!(matches!(err, Err(StoreError::Conflict(_))), "{err:?}");
    let snap = store.load().unwrap();
    assert_eq!(snap.tokens[0].uses, 3);
    assert_eq!(snap.nodes.len(), 2);

    store
        .commit(&[
            Change::DeleteNode(node(2).id),
            Change::DeleteToken(token(1).id),
        ])
        .unwrap();
    let snap = store.load().unwrap();
    assert_eq!(snap.nodes, vec![n1]);
    assert!(snap.tokens.is_empty());
}
