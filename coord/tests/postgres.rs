#![allow(clippy::unwrap_used)]
//! The PostgreSQL store against a real server: conformance, restart, two
//! coordinator replicas, and the database going away.

mod support;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use meshd_coord::*;
use meshd_proto::{ErrorCode, Message};
use support::conformance;
use support::harness::Harness;
use support::pg::TestPostgres;

fn pg_store(pg: &TestPostgres) -> PgStore {
    PgStore::connect(&pg.url(), Box::new(|| {})).unwrap()
}

fn pg_harness(url: String, config: Config, changed: Option<mpsc::Sender<()>>) -> Harness {
    Harness::with_store(
        config,
        Box::new(move || {
            let tx = changed.clone();
            let wake = Box::new(move || {
                if let Some(tx) = &tx {
                    let _ = tx.send(());
                }
            });
            Box::new(PgStore::connect(&url, wake).unwrap())
        }),
    )
}

fn replica_config() -> Config {
    Config {
        single_replica: false,
        ..Config::default()
    }
}

#[test]
fn pg_conformance_and_restart() {
    let pg = TestPostgres::start();
    conformance(&mut pg_store(&pg));

    // A second database on the same server, for a clean coordinator.
    let mut admin = postgres::Client::connect(&pg.url(), postgres::NoTls).unwrap();
    admin.batch_execute("CREATE DATABASE mesh").unwrap();
    let url = pg.url().replace("dbname=postgres", "dbname=mesh");
    let mut h = pg_harness(url.clone(), Config::default(), None);
    let (tok, secret) = h.token(TokenSpec {
        reusable: true,
        ..TokenSpec::default()
    });
    let a = h.register(1, "a", &secret);
    let b = h.register(2, "b", &secret);
    let (ia, ib) = (h.info(a), h.info(b));
    drop(h);
    // Migrations run again on every start and change nothing.
    let mut h = pg_harness(url, Config::default(), None);
    assert_eq!(h.coord.state().tokens[&tok.id].uses, 2);
    let a = h.login(1);
    assert_eq!(h.info(a), ia);
    assert_eq!(h.peer_ids(a), [ib.node_id]);
}

#[test]
fn pg_replicas_learn_each_others_writes_within_a_second() {
    let pg = TestPostgres::start();
    let (tx_b, rx_b) = mpsc::channel();
    let mut a = pg_harness(pg.url(), replica_config(), None);
    let mut b = pg_harness(pg.url(), replica_config(), Some(tx_b));
    // Both replicas work on the same mesh.
    assert_eq!(a.coord.state().settings, b.coord.state().settings);

    // Apply what B hears until `done` holds; fails after 1 s. A transaction
    // may arrive as several notifications, so one wake-up is not enough.
    fn sync_b(
        b: &mut Harness,
        rx: &mpsc::Receiver<()>,
        started: Instant,
        step: &str,
        done: impl Fn(&mut Harness) -> bool,
    ) -> Duration {
        let deadline = started + Duration::from_secs(1);
        loop {
            b.coord.poll_store(b.now).unwrap();
            b.drive();
            if done(b) {
                return started.elapsed();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "replica B did not learn of {step} within 1 s"
            );
            let _ = rx.recv_timeout(left);
        }
    }

    // A token made on A admits a node through B.
    let t = Instant::now();
    let (_, secret) = a.token(TokenSpec {
        reusable: true,
        ..TokenSpec::default()
    });
    sync_b(&mut b, &rx_b, t, "the token", |b| {
        b.coord.state().tokens.len() == 1
    });
    let nb = b.register(2, "on-b", &secret);
    b.take(nb);

    // A node joining through A appears in the map of the node on B.
    let t = Instant::now();
    // A does not know B's node yet and picks the same address: the store
    // refuses, A reads B's writes and succeeds on its second try.
    let na = a.register(1, "on-a", &secret);
    assert_eq!(a.info(na).ipv4.to_string(), "100.64.0.2");
    let elapsed = sync_b(&mut b, &rx_b, t, "the join", |b| {
        !b.conns[&nb].got.is_empty()
    });
    assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");
    let ia = a.info(na).node_id;
    assert!(matches!(&b.take(nb)[..], [Message::PeerAdded(p)] if p.node_id == ia));
    // Its endpoint change too, as one delta.
    let t = Instant::now();
    a.report(na, &["192.0.2.9:51820"]);
    sync_b(&mut b, &rx_b, t, "the endpoint change", |b| {
        !b.conns[&nb].got.is_empty()
    });
    assert!(matches!(&b.take(nb)[..], [Message::EndpointChanged(c)] if c.node_id == ia));
    // And its deletion.
    let t = Instant::now();
    a.coord.delete_node(ia, a.now).unwrap();
    sync_b(&mut b, &rx_b, t, "the deletion", |b| {
        !b.conns[&nb].got.is_empty()
    });
    assert_eq!(b.take(nb), [Message::PeerRemoved(ia)]);
}

#[test]
fn pg_unavailable_at_start_and_mid_run() {
    let pg = TestPostgres::start();
    // Nothing listens on port 1.
    let closed = "host=127.0.0.1 port=1 user=meshd dbname=postgres connect_timeout=2";
    let err = PgStore::connect(closed, Box::new(|| {})).unwrap_err();
    assert!(
        matches!(&err, StoreError::Unavailable(m) if m.contains("cannot connect")),
        "{err}"
    );

    let mut h = pg_harness(pg.url(), replica_config(), None);
    let (_, secret) = h.token(TokenSpec {
        reusable: true,
        ..TokenSpec::default()
    });
    let a = h.register(1, "a", &secret);
    h.take(a);
    pg.stop_server();
    let b = h.register(2, "b", &secret);
    assert_eq!(h.refused(b), ErrorCode::Unavailable);
    assert!(h.take(a).is_empty());
    assert_eq!(h.coord.state().nodes.len(), 1);

    pg.start_server();
    // The store reconnects on the next write.
    let b = h.register(2, "b", &secret);
    assert_eq!(h.info(b).name, "b");
    assert_eq!(pg_store(&pg).load().unwrap().nodes.len(), 2);

    // The notification listener reconnected too: another writer's change
    // reaches this coordinator (through a resync of what it may have missed).
    pg_store(&pg)
        .commit(&[Change::PutToken(support::token(9))])
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !h.coord.state().tokens.contains_key(&support::token(9).id) {
        assert!(
            Instant::now() < deadline,
            "change from another writer never arrived"
        );
        let _ = h.coord.poll_store(h.now);
        std::thread::sleep(Duration::from_millis(50));
    }
}
