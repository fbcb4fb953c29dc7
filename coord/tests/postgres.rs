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
    pg_replica(url, config, changed, 1)
}

fn pg_replica(
    url: String,
    config: Config,
    changed: Option<mpsc::Sender<()>>,
    seed: u64,
) -> Harness {
    Harness::replica(
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
        seed,
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
    let mut a = pg_replica(pg.url(), replica_config(), None, 1);
    let mut b = pg_replica(pg.url(), replica_config(), Some(tx_b), 2);
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
    // The store reconnects in the background; until it has, writes fail at
    // once with the reason.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let b = h.register(2, "b", &secret);
        if h.conn(b).client.info().is_some() {
            assert_eq!(h.info(b).name, "b");
            break;
        }
        assert_eq!(h.refused(b), ErrorCode::Unavailable);
        assert!(Instant::now() < deadline, "the store never reconnected");
        std::thread::sleep(Duration::from_millis(50));
    }
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

// ---- races between two replicas ----
//
// Each race runs two operations at the same moment through two replicas on
// one database, 100 times, each after a random delay, and checks that the
// outcome is one of the two serial orders. Each operation is preceded by
// what the replica's driver does between events: applying what it has heard
// from the other replica so far. Counts are printed (`--nocapture`).

const TRIALS: u32 = 100;
/// The random delay before each operation: about one operation's duration,
/// so they overlap in most trials and run one after the other in some.
const MAX_DELAY_US: u64 = 3000;

/// Two replicas of one mesh on `pg`, and a plain client to look at the rows.
fn two_replicas(pg: &TestPostgres) -> (Harness, Harness, postgres::Client) {
    let a = pg_replica(pg.url(), replica_config(), None, 1);
    let b = pg_replica(pg.url(), replica_config(), None, 2);
    let db = postgres::Client::connect(&pg.url(), postgres::NoTls).unwrap();
    (a, b, db)
}

/// A node key of its own for each trial.
fn trial_key(trial: u32, which: u8) -> x25519_dalek::StaticSecret {
    // Byte 0 loses its low bits to X25519's clamping.
    let mut k = [0x5a; 32];
    k[1..5].copy_from_slice(&trial.to_le_bytes());
    k[5] = which;
    x25519_dalek::StaticSecret::from(k)
}

fn register_as(
    h: &mut Harness,
    key: x25519_dalek::StaticSecret,
    name: &str,
    secret: &meshd_proto::TokenSecret,
) -> SessionId {
    h.connect(
        key,
        meshd_proto::client::Join::Register {
            token_secret: secret.clone(),
            name: name.into(),
        },
    )
}

/// Runs `fa` on replica A and `fb` on replica B at the same moment, each after
/// a random delay of up to [`MAX_DELAY_US`] and after applying what its
/// replica has heard from the other.
fn race<RA: Send, RB: Send>(
    a: &mut Harness,
    b: &mut Harness,
    rng: &mut rand::rngs::StdRng,
    fa: impl FnOnce(&mut Harness) -> RA + Send,
    fb: impl FnOnce(&mut Harness) -> RB + Send,
) -> (RA, RB) {
    use rand::Rng;
    let delays = [
        rng.random_range(0..=MAX_DELAY_US),
        rng.random_range(0..=MAX_DELAY_US),
    ];
    let start = std::sync::Barrier::new(2);
    let run = |h: &mut Harness, delay: u64| {
        start.wait();
        std::thread::sleep(Duration::from_micros(delay));
        h.coord.poll_store(h.now).unwrap();
        h.drive();
    };
    std::thread::scope(|s| {
        let ta = s.spawn(|| {
            run(a, delays[0]);
            fa(a)
        });
        let tb = s.spawn(|| {
            run(b, delays[1]);
            fb(b)
        });
        (ta.join().unwrap(), tb.join().unwrap())
    })
}

/// Lets both replicas apply each other's writes until `done` holds for each
/// (at most 5 s).
fn settle(a: &mut Harness, b: &mut Harness, what: &str, done: impl Fn(&mut Harness) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut all = true;
        for h in [&mut *a, &mut *b] {
            h.coord.poll_store(h.now).unwrap();
            h.drive();
            all &= done(h);
        }
        if all {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replicas did not agree on {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn rng_for(test: &str) -> rand::rngs::StdRng {
    use rand::SeedableRng;
    // A fresh seed each run, printed so a failure can be replayed.
    let seed: u64 = std::env::var("RACE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("{test}: RACE_SEED={seed}");
    rand::rngs::StdRng::seed_from_u64(seed)
}

fn token_row(db: &mut postgres::Client, id: &str) -> (bool, i64, i64) {
    let r = db
        .query_one(
            "SELECT revoked, uses, (SELECT count(*) FROM nodes WHERE token_id = $1)
             FROM tokens WHERE id = $1",
            &[&id],
        )
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

#[test]
fn pg_race_revoke_versus_join() {
    let pg = TestPostgres::start();
    let (mut a, mut b, mut db) = two_replicas(&pg);
    let mut rng = rng_for("revoke-versus-join");
    let (mut join_first, mut revoke_first) = (0, 0);
    for i in 0..TRIALS {
        let (tok, secret) = a.token(TokenSpec {
            reusable: true,
            ..TokenSpec::default()
        });
        settle(&mut a, &mut b, "the new token", |h| {
            h.coord.state().tokens.contains_key(&tok.id)
        });
        let id = tok.id.clone();
        let (revoked, joined) = race(
            &mut a,
            &mut b,
            &mut rng,
            |a| a.coord.revoke_token(&id, a.now),
            |b| {
                let s = register_as(b, trial_key(i, 0), &format!("rj{i}"), &secret);
                (s, b.outcome(s))
            },
        );
        revoked.unwrap();
        let (session, joined) = joined;
        let (is_revoked, uses, nodes) = token_row(&mut db, &tok.id);
        assert!(
            is_revoked,
            "trial {i}: the revocation reported success but the token is valid"
        );
        match joined {
            Ok(()) => {
                join_first += 1;
                assert_eq!((uses, nodes), (1, 1), "trial {i}: join, then revoke");
            }
            Err(ErrorCode::TokenRevoked) => {
                revoke_first += 1;
                assert_eq!((uses, nodes), (0, 0), "trial {i}: revoke, then join");
            }
            Err(other) => panic!("trial {i}: join refused with {other:?}"),
        }
        settle(&mut a, &mut b, "the revocation", |h| {
            let t = &h.coord.state().tokens[&tok.id];
            t.revoked && t.uses == u64::try_from(uses).unwrap()
        });
        // A revoked token stays revoked on both replicas.
        for h in [&mut a, &mut b] {
            let late = register_as(h, trial_key(i, 9), &format!("late{i}"), &secret);
            assert_eq!(h.outcome(late), Err(ErrorCode::TokenRevoked), "trial {i}");
        }
        if joined.is_ok() {
            b.disconnect(session);
        }
    }
    println!(
        "revoke-versus-join: {TRIALS} trials: {join_first} join first, {revoke_first} revoke first; {} writes decided again after a conflict",
        a.coord.write_conflicts() + b.coord.write_conflicts()
    );
}

#[test]
fn pg_race_use_versus_use_of_a_one_time_token() {
    let pg = TestPostgres::start();
    let (mut a, mut b, mut db) = two_replicas(&pg);
    let mut rng = rng_for("use-versus-use");
    let (mut a_won, mut b_won) = (0, 0);
    let (_, spare) = a.token(TokenSpec {
        reusable: true,
        ..TokenSpec::default()
    });
    settle(&mut a, &mut b, "the spare token", |h| {
        h.coord.state().tokens.len() == 1
    });
    for i in 0..TRIALS {
        // B makes and deletes a node that A never sees (A reads both writes
        // at once, when the node is gone), so B picks a higher address than
        // A next: only the token's use can keep a second node out.
        let s = register_as(&mut b, trial_key(i, 5), &format!("spare{i}"), &spare);
        let spare_id = b.info(s).node_id;
        b.disconnect(s);
        b.coord.delete_node(spare_id, b.now).unwrap();
        let (tok, secret) = a.token(TokenSpec::default());
        settle(&mut a, &mut b, "the new token", |h| {
            h.coord.state().tokens.contains_key(&tok.id)
        });
        let ((sa, ra), (sb, rb)) = race(
            &mut a,
            &mut b,
            &mut rng,
            |a| {
                let s = register_as(a, trial_key(i, 1), &format!("ua{i}"), &secret);
                (s, a.outcome(s))
            },
            |b| {
                let s = register_as(b, trial_key(i, 2), &format!("ub{i}"), &secret);
                (s, b.outcome(s))
            },
        );
        let (_, uses, nodes) = token_row(&mut db, &tok.id);
        assert_eq!(
            (uses, nodes),
            (1, 1),
            "trial {i}: one-time token used {uses} times ({nodes} nodes): {ra:?} {rb:?}"
        );
        match (ra, rb) {
            (Ok(()), Err(ErrorCode::TokenUsed)) => {
                a_won += 1;
                a.disconnect(sa);
            }
            (Err(ErrorCode::TokenUsed), Ok(())) => {
                b_won += 1;
                b.disconnect(sb);
            }
            other => panic!("trial {i}: {other:?}"),
        }
        settle(&mut a, &mut b, "the use", |h| {
            h.coord.state().tokens[&tok.id].uses == 1
        });
    }
    println!("use-versus-use: {TRIALS} trials: {a_won} won through A, {b_won} through B; {} writes decided again after a conflict",
        a.coord.write_conflicts() + b.coord.write_conflicts());
}

#[test]
fn pg_race_delete_versus_rename() {
    let pg = TestPostgres::start();
    let (mut a, mut b, mut db) = two_replicas(&pg);
    let mut rng = rng_for("delete-versus-rename");
    let (_, secret) = a.token(TokenSpec {
        reusable: true,
        ..TokenSpec::default()
    });
    let (mut rename_first, mut delete_first) = (0, 0);
    for i in 0..TRIALS {
        let s = register_as(&mut a, trial_key(i, 3), &format!("dr{i}"), &secret);
        let id = a.info(s).node_id;
        a.disconnect(s);
        settle(&mut a, &mut b, "the new node", |h| {
            h.coord
                .state()
                .nodes
                .get(&id)
                .is_some_and(|n| n.disconnected_at.is_some())
        });
        let (deleted, renamed) = race(
            &mut a,
            &mut b,
            &mut rng,
            |a| a.coord.delete_node(id, a.now),
            |b| b.coord.rename_node(id, &format!("renamed{i}"), b.now),
        );
        deleted.unwrap();
        match renamed {
            Ok(()) => rename_first += 1,
            Err(CoordError::NoSuchNode(_)) => delete_first += 1,
            Err(e) => panic!("trial {i}: rename failed: {e}"),
        }
        let left: i64 = db
            .query_one(
                "SELECT count(*) FROM nodes WHERE id = $1",
                &[&(id.0 as i64)],
            )
            .unwrap()
            .get(0);
        assert_eq!(left, 0, "trial {i}: the deleted node is back ({renamed:?})");
        settle(&mut a, &mut b, "the deletion", |h| {
            !h.coord.state().nodes.contains_key(&id)
        });
    }
    println!(
        "delete-versus-rename: {TRIALS} trials: {rename_first} rename first, {delete_first} delete first; {} writes decided again after a conflict",
        a.coord.write_conflicts() + b.coord.write_conflicts()
    );
}

#[test]
fn pg_race_expire_versus_login() {
    let pg = TestPostgres::start();
    let (mut a, mut b, mut db) = two_replicas(&pg);
    let mut rng = rng_for("expire-versus-login");
    let (_, secret) = a.token(TokenSpec {
        reusable: true,
        ..TokenSpec::default()
    });
    let (mut login_first, mut expire_first) = (0, 0);
    for i in 0..TRIALS {
        let s = register_as(&mut a, trial_key(i, 4), &format!("el{i}"), &secret);
        let id = a.info(s).node_id;
        a.disconnect(s);
        settle(&mut a, &mut b, "the new node", |h| {
            h.coord
                .state()
                .nodes
                .get(&id)
                .is_some_and(|n| n.disconnected_at.is_some())
        });
        let (expired, (session, login)) = race(
            &mut a,
            &mut b,
            &mut rng,
            |a| a.coord.expire_node(id, a.now),
            |b| {
                let s = b.connect(trial_key(i, 4), meshd_proto::client::Join::Login);
                (s, b.outcome(s))
            },
        );
        expired.unwrap();
        let expires_at: Option<i64> = db
            .query_one(
                "SELECT expires_at FROM nodes WHERE id = $1",
                &[&(id.0 as i64)],
            )
            .unwrap()
            .get(0);
        let now = meshd_coord::unix_ms(a.now) as i64;
        assert!(
            expires_at.is_some_and(|t| t <= now),
            "trial {i}: the expiry was lost ({login:?}, expires_at {expires_at:?})"
        );
        match login {
            // Logged in first: the expiry then closes the session.
            Ok(()) => {
                login_first += 1;
                settle(&mut a, &mut b, "the expiry", |h| {
                    h.coord.state().nodes[&id].is_expired(now as u64) && !h.coord.is_connected(id)
                });
                assert!(b.conn(session).closed, "trial {i}");
                assert_eq!(b.refused(session), ErrorCode::NodeExpired, "trial {i}");
            }
            Err(ErrorCode::NodeExpired) => expire_first += 1,
            Err(other) => panic!("trial {i}: login refused with {other:?}"),
        }
        settle(&mut a, &mut b, "the expiry", |h| {
            h.coord.state().nodes[&id].is_expired(now as u64)
        });
        // Expired on both: neither lets it in again.
        for h in [&mut a, &mut b] {
            let again = h.connect(trial_key(i, 4), meshd_proto::client::Join::Login);
            assert_eq!(h.outcome(again), Err(ErrorCode::NodeExpired), "trial {i}");
        }
    }
    println!(
        "expire-versus-login: {TRIALS} trials: {login_first} login first, {expire_first} expire first; {} writes decided again after a conflict",
        a.coord.write_conflicts() + b.coord.write_conflicts()
    );
}

/// An expired node registering again through both replicas at once (its
/// agent retrying on another address, say) renews its record once: one
/// session gets it back, the other is refused `KeyInUse` as the record it
/// re-read has not expired, and the database holds one node with that key.
#[test]
fn pg_race_rejoin_versus_rejoin_of_an_expired_node() {
    let pg = TestPostgres::start();
    let (mut a, mut b, mut db) = two_replicas(&pg);
    let mut rng = rng_for("rejoin-versus-rejoin");
    let (mut a_won, mut b_won) = (0, 0);
    let (_, secret) = a.token(TokenSpec {
        reusable: true,
        ..TokenSpec::default()
    });
    settle(&mut a, &mut b, "the token", |h| {
        h.coord.state().tokens.len() == 1
    });
    for i in 0..TRIALS {
        let s = register_as(&mut a, trial_key(i, 6), &format!("re{i}"), &secret);
        let info = a.info(s);
        a.coord.expire_node(info.node_id, a.now).unwrap();
        a.drive();
        let now = a.now;
        settle(&mut a, &mut b, "the expiry", |h| {
            h.coord
                .state()
                .nodes
                .get(&info.node_id)
                .is_some_and(|n| n.is_expired(meshd_coord::unix_ms(now)))
        });
        let ((sa, ra), (sb, rb)) = race(
            &mut a,
            &mut b,
            &mut rng,
            |a| {
                let s = register_as(a, trial_key(i, 6), &format!("re{i}"), &secret);
                (s, a.outcome(s))
            },
            |b| {
                let s = register_as(b, trial_key(i, 6), &format!("re{i}"), &secret);
                (s, b.outcome(s))
            },
        );
        let winner = match (ra, rb) {
            (Ok(()), Err(ErrorCode::KeyInUse)) => {
                a_won += 1;
                a.info(sa)
            }
            (Err(ErrorCode::KeyInUse), Ok(())) => {
                b_won += 1;
                b.info(sb)
            }
            other => panic!("trial {i}: {other:?}"),
        };
        assert_eq!(
            (winner.node_id, winner.ipv4),
            (info.node_id, info.ipv4),
            "trial {i}"
        );
        let rows: i64 = db
            .query_one(
                "SELECT count(*) FROM nodes WHERE key = $1 AND expires_at IS NULL",
                &[&trial_key_public(i, 6).as_slice()],
            )
            .unwrap()
            .get(0);
        assert_eq!(rows, 1, "trial {i}");
    }
    println!("rejoin-versus-rejoin: {TRIALS} trials: {a_won} renewed through A, {b_won} through B; {} writes decided again after a conflict",
        a.coord.write_conflicts() + b.coord.write_conflicts());
}

fn trial_key_public(trial: u32, which: u8) -> [u8; 32] {
    meshd_proto::auth::public_key(&trial_key(trial, which)).0
}
