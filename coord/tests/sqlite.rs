#![allow(clippy::unwrap_used)]
//! The SQLite store: conformance, restart, a full disk, schemas it does not know.

mod support;

use std::path::Path;

use meshd_coord::*;
use support::harness::Harness;
use support::{conformance, node};

#[test]
fn sqlite_store_conformance() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = SqliteStore::open(&dir.path().join("state.db")).unwrap();
    conformance(&mut store);
    let mode: String = rusqlite::Connection::open(dir.path().join("state.db"))
        .unwrap()
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

fn sqlite_harness(path: &Path) -> Harness {
    let path = path.to_owned();
    Harness::with_store(
        Config::default(),
        Box::new(move || Box::new(SqliteStore::open(&path).unwrap())),
    )
}

#[test]
fn restart_on_sqlite_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let mut h = sqlite_harness(&path);
    let (tok, secret) = h.token(TokenSpec {
        reusable: true,
        ..TokenSpec::default()
    });
    let a = h.register(1, "a", &secret);
    let b = h.register(2, "b", &secret);
    h.report(a, &["192.0.2.1:51820"]);
    let (ia, ib) = (h.info(a), h.info(b));
    let before = SqliteStore::open(&path).unwrap().load().unwrap();
    drop(h);

    // A fresh process: everything is read back from the file.
    let mut h = sqlite_harness(&path);
    assert_eq!(
        SqliteStore::open(&path)
            .unwrap()
            .load()
            .unwrap()
            .nodes
            .len(),
        2
    );
    assert_eq!(h.coord.state().tokens[&tok.id].uses, 2);
    let b = h.login(2);
    assert_eq!(h.info(b), ib);
    let pa = h.conn(b).client.peers()[&ia.node_id].clone();
    assert_eq!(pa.endpoints, ["192.0.2.1:51820".parse().unwrap()]);
    assert_eq!(pa.ipv4, ia.ipv4);
    let after = SqliteStore::open(&path).unwrap().load().unwrap();
    assert_eq!(after.settings, before.settings);
    assert_eq!(after.tokens, before.tokens);
}

#[test]
fn a_full_disk_refuses_cleanly_and_leaves_no_half_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let mut store = SqliteStore::open(&path).unwrap();
    let pages: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .unwrap();
    store.limit_pages_for_tests(pages as u64 + 2).unwrap();
    let mut written = 0;
    let err = loop {
        let mut n = node(written as u8 + 1);
        n.tags = (0..30)
            .map(|t| format!("tag:t{t}-{}", "x".repeat(50)))
            .collect();
        match store.commit(&[
            Change::PutToken(support::token(written as u8 + 1)),
            Change::PutNode(n),
        ]) {
            Ok(()) => written += 1,
            Err(e) => break e,
        }
        assert!(written < 200, "the size limit never hit");
    };
    assert!(
        matches!(&err, StoreError::Unavailable(m) if m.contains("full")),
        "{err}"
    );
    let snap = SqliteStore::open(&path).unwrap().load().unwrap();
    assert_eq!((snap.nodes.len(), snap.tokens.len()), (written, written));

    // The coordinator's answer to a failing store (refuse with Unavailable,
    // change nothing in memory) is tested in core.rs with a failing store.
}

#[test]
fn unknown_schema_or_garbage_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    drop(SqliteStore::open(&path).unwrap());
    rusqlite::Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", 99)
        .unwrap();
    let err = SqliteStore::open(&path).unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt(m) if m.contains("newer")),
        "{err}"
    );

    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, vec![0x42; 8192]).unwrap();
    assert!(SqliteStore::open(&junk).is_err());
    let missing = dir.path().join("no/such/dir/state.db");
    assert!(matches!(
        SqliteStore::open(&missing),
        Err(StoreError::Unavailable(_))
    ));
}

// ---- two coordinators on one SQLite file against one coordinator alone ----
//
// A property test of the rules the PostgreSQL race tests check: two
// coordinators on one database file, neither told of the other's writes
// (SQLite has no notifications, so each works from a copy that is out of
// date), run random operations one after another, and every answer must be
// the one a single coordinator gives to the same operations in the same
// order (the serial order they were run in). After every step, no count has
// gone backwards and no revoked token is valid.

mod serial {
    use std::collections::BTreeMap;
    use std::path::Path;

    use meshd_coord::*;
    use meshd_proto::client::Join;
    use meshd_proto::{ErrorCode, NodeId, TokenSecret};
    use proptest::prelude::*;
    use x25519_dalek::StaticSecret;

    use super::support::harness::Harness;

    #[derive(Debug, Clone)]
    enum Op {
        CreateToken {
            reusable: bool,
        },
        Revoke {
            token: usize,
        },
        Join {
            token: usize,
        },
        /// Log in, report an endpoint with this port, disconnect.
        Login {
            node: usize,
            port: u16,
        },
        Rename {
            node: usize,
            name: u8,
        },
        Expire {
            node: usize,
        },
        Delete {
            node: usize,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            2 => any::<bool>().prop_map(|reusable| Op::CreateToken { reusable }),
            1 => (0..8usize).prop_map(|token| Op::Revoke { token }),
            3 => (0..8usize).prop_map(|token| Op::Join { token }),
            3 => (0..12usize, 1..4u16).prop_map(|(node, port)| Op::Login { node, port }),
            1 => (0..12usize, 0..3u8).prop_map(|(node, name)| Op::Rename { node, name }),
            1 => (0..12usize).prop_map(|node| Op::Expire { node }),
            1 => (0..12usize).prop_map(|node| Op::Delete { node }),
        ]
    }

    /// One side of the comparison: the coordinators it runs operations on,
    /// and what its tokens and nodes are called there.
    struct Side {
        coords: Vec<Harness>,
        tokens: Vec<(String, TokenSecret)>,
        /// By join: the node's id, if the join succeeded.
        nodes: Vec<Option<NodeId>>,
    }

    /// An answer, comparable between the two sides (ids differ).
    type Answer = Result<(), String>;

    fn node_key(slot: usize) -> StaticSecret {
        let mut k = [0x33; 32];
        k[1..9].copy_from_slice(&(slot as u64).to_le_bytes());
        StaticSecret::from(k)
    }

    fn coord_err(e: CoordError) -> String {
        match e {
            CoordError::NoSuchNode(_) => "no such node".into(),
            CoordError::NoSuchToken(_) => "no such token".into(),
            CoordError::NameTaken(_) => "name taken".into(),
            // Gave up after conflicts: "try again later", as nodes hear it.
            CoordError::Store(StoreError::Conflict(_)) => format!("{:?}", ErrorCode::Unavailable),
            other => panic!("unexpected error: {other}"),
        }
    }

    impl Side {
        /// Runs `op` on coordinator `which`.
        fn run(&mut self, which: usize, op: &Op) -> Answer {
            let h = &mut self.coords[which];
            let now = h.now;
            match *op {
                Op::CreateToken { reusable } => {
                    let (t, secret) = h.token(TokenSpec {
                        reusable,
                        ..TokenSpec::default()
                    });
                    self.tokens.push((t.id, secret));
                    Ok(())
                }
                Op::Revoke { token } => {
                    let Some((id, _)) = self.tokens.get(token) else {
                        return Ok(());
                    };
                    h.coord.revoke_token(id, now).map_err(coord_err)
                }
                Op::Join { token } => {
                    let Some((_, secret)) = self.tokens.get(token) else {
                        return Ok(());
                    };
                    let slot = self.nodes.len();
                    let s = h.connect(
                        node_key(slot),
                        Join::Register {
                            token_secret: secret.clone(),
                            name: format!("j{slot}"),
                        },
                    );
                    let answer = h.outcome(s);
                    if answer == Err(ErrorCode::Unavailable) {
                        return Err(format!("{:?}", ErrorCode::Unavailable));
                    }
                    self.nodes.push(answer.ok().map(|()| h.info(s).node_id));
                    if answer.is_ok() {
                        h.disconnect(s);
                    }
                    answer.map_err(|c| format!("{c:?}"))
                }
                Op::Login { node, port } => {
                    if node >= self.nodes.len() {
                        return Ok(());
                    }
                    let s = h.connect(node_key(node), Join::Login);
                    h.outcome(s).map_err(|c| format!("{c:?}"))?;
                    h.report(s, &[&format!("192.0.2.1:{port}")]);
                    if h.conn(s).closed {
                        return Err(format!("{:?}", h.refused(s)));
                    }
                    h.disconnect(s);
                    Ok(())
                }
                Op::Rename { node, name } => match self.nodes.get(node).copied().flatten() {
                    Some(id) => h
                        .coord
                        .rename_node(id, &format!("x{name}"), now)
                        .map_err(coord_err),
                    None => Ok(()),
                },
                Op::Expire { node } => match self.nodes.get(node).copied().flatten() {
                    Some(id) => h.coord.expire_node(id, now).map_err(coord_err),
                    None => Ok(()),
                },
                Op::Delete { node } => match self.nodes.get(node).copied().flatten() {
                    Some(id) => h.coord.delete_node(id, now).map_err(coord_err),
                    None => Ok(()),
                },
            }
        }
    }

    fn sqlite_replica(path: &Path, seed: u64) -> Harness {
        let path = path.to_owned();
        let config = Config {
            single_replica: false,
            ..Config::default()
        };
        Harness::replica(
            config,
            Box::new(move || Box::new(SqliteStore::open(&path).unwrap())),
            seed,
        )
    }

    /// Per token (by creation): revoked and uses; per join: the node's name
    /// and whether it has expired, if it exists.
    type Summary = (Vec<(bool, u64)>, Vec<Option<(String, bool)>>);

    fn summary(snap: &Snapshot, side: &Side, now: u64) -> Summary {
        let tokens: BTreeMap<&str, &TokenRecord> =
            snap.tokens.iter().map(|t| (t.id.as_str(), t)).collect();
        let nodes: BTreeMap<NodeId, &NodeRecord> = snap.nodes.iter().map(|n| (n.id, n)).collect();
        (
            side.tokens
                .iter()
                .map(|(id, _)| (tokens[id.as_str()].revoked, tokens[id.as_str()].uses))
                .collect(),
            side.nodes
                .iter()
                .map(|id| {
                    id.and_then(|id| nodes.get(&id))
                        .map(|n| (n.name.clone(), n.is_expired(now)))
                })
                .collect(),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn two_coordinators_on_one_file_answer_as_one_would(
            steps in proptest::collection::vec((0..2usize, op()), 1..60),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("state.db");
            let mut replicas = Side {
                coords: vec![sqlite_replica(&path, 1), sqlite_replica(&path, 2)],
                tokens: vec![],
                nodes: vec![],
            };
            let mut alone = Side {
                coords: vec![Harness::new(Config::default())],
                tokens: vec![],
                nodes: vec![],
            };
            let now = unix_ms(alone.coords[0].now);
            let mut db = SqliteStore::open(&path).unwrap();
            let mut uses_before: BTreeMap<String, u64> = BTreeMap::new();
            let mut revoked = std::collections::BTreeSet::new();
            for (i, (which, op)) in steps.iter().enumerate() {
                // A coordinator far behind the other may give up after a few
                // conflicts with "try again later", having written nothing;
                // it is tried again, as a node or an operator would.
                let mut got = replicas.run(*which, op);
                for _ in 0..20 {
                    if got != Err(format!("{:?}", ErrorCode::Unavailable)) {
                        break;
                    }
                    got = replicas.run(*which, op);
                }
                let want = alone.run(0, op);
                prop_assert_eq!(&got, &want, "step {}: {:?} through coordinator {}", i, op, which);
                let snap = db.load().unwrap();
                for t in &snap.tokens {
                    prop_assert!(t.revoked || !revoked.contains(&t.id), "step {}: token {} revoked no more", i, t.id);
                    if t.revoked {
                        revoked.insert(t.id.clone());
                    }
                    let before = uses_before.insert(t.id.clone(), t.uses).unwrap_or(0);
                    prop_assert!(t.uses >= before, "step {}: token {} uses went back", i, t.id);
                    let joined = snap.nodes.iter().filter(|n| n.token_id == t.id).count() as u64;
                    prop_assert!(joined <= t.uses, "step {}: more nodes than uses", i);
                    prop_assert!(t.reusable || t.uses <= 1, "step {}: one-time token used {} times", i, t.uses);
                }
            }
            let model = alone.coords[0].store.lock().unwrap().load().unwrap();
            prop_assert_eq!(
                summary(&db.load().unwrap(), &replicas, now),
                summary(&model, &alone, now)
            );
        }
    }
}
