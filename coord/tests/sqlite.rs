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
