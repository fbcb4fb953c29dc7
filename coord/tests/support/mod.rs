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
        session: Some(77 + u64::from(i)),
        version: 1,
        // Every third one a relay, so the stores' round trips cover it.
        relay: i.is_multiple_of(3).then(|| meshd_proto::RelayInfo {
            region: "eu-west".into(),
            addrs: vec![
                "198.18.2.2:443".parse().unwrap(),
                "[2001:db8::2]:443".parse().unwrap(),
            ],
            stun_port: 3478,
            cert_pin: [i; 32],
        }),
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
        version: 1,
    }
}

/// What every store must do: keep what was committed, update in place only
/// from the stored version, delete, apply a batch all or nothing, and read
/// records back by what identifies them.
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
    n1.session = None;
    n1.version = 2;
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

    // A write decided from an older version is refused and changes nothing:
    // an update from version 1 again, a second creation, a delete of the
    // wrong version, a token update skipping a version.
    let mut stale = node(1);
    stale.name = "stale".into();
    stale.version = 2;
    let mut skip = token(1);
    skip.version = 3;
    for change in [
        Change::PutNode(stale),
        Change::PutNode(node(1)),
        Change::DeleteNode {
            id: node(2).id,
            version: 2,
        },
        Change::PutToken(skip),
        Change::PutToken(token(1)),
        Change::DeleteToken {
            id: token(1).id,
            version: 2,
        },
    ] {
        let err = store.commit(std::slice::from_ref(&change));
        assert!(
            matches!(err, Err(StoreError::Conflict(_))),
            "{change:?}: {err:?}"
        );
    }
    let snap = store.load().unwrap();
    assert_eq!(snap.nodes, vec![n1.clone(), node(2)]);
    assert_eq!(snap.tokens, vec![token(1)]);

    // A batch whose last change breaks a uniqueness rule (node 3 takes node
    // 2's address) leaves nothing of the batch behind.
    let mut clash = node(3);
    clash.ipv4 = node(2).ipv4;
    let mut t1 = token(1);
    t1.uses = 4;
    t1.version = 2;
    let err = store.commit(&[
        Change::PutToken(t1),
        Change::DeleteNode {
            id: node(1).id,
            version: 2,
        },
        Change::PutNode(clash),
    ]);
    assert!(matches!(err, Err(StoreError::Conflict(_))), "{err:?}");
    let snap = store.load().unwrap();
    assert_eq!(snap.tokens[0].uses, 3);
    assert_eq!(snap.nodes.len(), 2);

    // Records read back by id, key, name, address and token hash; an id
    // that names nothing reads as a delete.
    let n2 = node(2);
    let got = store
        .read(&[
            Lookup::Node(n1.id),
            Lookup::Node(node(9).id),
            Lookup::NodeByKey(n2.key),
            Lookup::NodeByName(n2.name.clone()),
            Lookup::NodeByIpv4(n2.ipv4),
            Lookup::NodeByName("nobody".into()),
            Lookup::Token(token(1).id),
            Lookup::Token(token(9).id),
            Lookup::TokenByHash(token(1).secret_hash),
            Lookup::TokenByHash([0xee; 32]),
        ])
        .unwrap();
    assert_eq!(
        got,
        [
            Change::PutNode(n1.clone()),
            Change::DeleteNode {
                id: node(9).id,
                version: 0
            },
            Change::PutNode(n2.clone()),
            Change::PutNode(n2.clone()),
            Change::PutNode(n2),
            Change::PutToken(token(1)),
            Change::DeleteToken {
                id: token(9).id,
                version: 0
            },
            Change::PutToken(token(1)),
        ]
    );

    store
        .commit(&[
            Change::DeleteNode {
                id: node(2).id,
                version: 1,
            },
            Change::DeleteToken {
                id: token(1).id,
                version: 1,
            },
        ])
        .unwrap();
    let snap = store.load().unwrap();
    assert_eq!(snap.nodes, vec![n1]);
    assert!(snap.tokens.is_empty());
}
