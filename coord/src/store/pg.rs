//! PostgreSQL, for several coordinator replicas sharing one database. Every
//! commit is one transaction that also sends `NOTIFY meshd_changes` with one
//! payload per changed row; each replica LISTENs on its own connection and
//! reloads those rows, so a write by one replica reaches the nodes connected
//! to another within a round trip.
//!
//! Payload: `<writer> node <id>`, `<writer> token <id>` or `<writer> settings`,
//! where `<writer>` is a random id of the writing store (its own
//! notifications are skipped).
//!
//! The `postgres` client runs its own small runtime, so this store must be
//! used from a plain thread, not from inside an async runtime.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use postgres::error::SqlState;
use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, NoTls, Row, Transaction};

use super::rows::{to_sql, NodeRow, SettingsRow, TokenRow};
use super::{Store, StoreError};
use crate::state::{Change, Snapshot};
use meshd_proto::NodeId;

const CHANNEL: &str = "meshd_changes";

/// Serialises migrations between replicas starting at the same time.
const MIGRATION_LOCK: i64 = 0x6d65_7368_6400;

/// Entry `i` takes the schema from version `i` to `i + 1`. Append only.
const MIGRATIONS: &[&str] = &[r"
CREATE TABLE settings (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    ipv6_prefix TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE TABLE nodes (
    id              BIGINT PRIMARY KEY,
    name            TEXT NOT NULL UNIQUE,
    key             BYTEA NOT NULL UNIQUE,
    ipv4            TEXT NOT NULL UNIQUE,
    ipv6            TEXT NOT NULL UNIQUE,
    tags            TEXT NOT NULL,
    slice           TEXT,
    ephemeral       BOOLEAN NOT NULL,
    token_id        TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    expires_at      BIGINT,
    endpoints       TEXT NOT NULL,
    disconnected_at BIGINT
);
CREATE TABLE tokens (
    id          TEXT PRIMARY KEY,
    secret_hash BYTEA NOT NULL UNIQUE,
    reusable    BOOLEAN NOT NULL,
    ephemeral   BOOLEAN NOT NULL,
    tags        TEXT NOT NULL,
    slice       TEXT,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT,
    revoked     BOOLEAN NOT NULL,
    uses        BIGINT NOT NULL
);
"];

const NODE_COLUMNS: &str = "id, name, key, ipv4, ipv6, tags, slice, ephemeral, token_id, \
                            created_at, expires_at, endpoints, disconnected_at";
const TOKEN_COLUMNS: &str =
    "id, secret_hash, reusable, ephemeral, tags, slice, created_at, expires_at, revoked, uses";

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Note {
    /// The listener lost its connection: anything may have changed meanwhile.
    Resync,
    Settings,
    Node(NodeId),
    Token(String),
}

pub struct PgStore {
    config: String,
    client: Option<Client>,
    writer: String,
    notes: mpsc::Receiver<Note>,
    pending: BTreeSet<Note>,
    known_nodes: BTreeSet<NodeId>,
    known_tokens: BTreeSet<String>,
    stop: Arc<AtomicBool>,
    listener: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The connection string may hold a password: never shown.
        f.debug_struct("PgStore")
            .field("writer", &self.writer)
            .finish_non_exhaustive()
    }
}

fn map_err(e: postgres::Error) -> StoreError {
    if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
        StoreError::Conflict(e.to_string())
    } else {
        StoreError::Unavailable(format!("PostgreSQL: {e}"))
    }
}

/// How long a connection attempt may take when the connection string sets no
/// `connect_timeout`: a server behind a firewall that drops packets would
/// otherwise hold the coordinator for the kernel's TCP timeout (minutes).
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

fn connect(config: &str) -> Result<Client, StoreError> {
    // The connection string may hold a password, so it is never quoted in
    // an error; the parser's message does not quote it either.
    let mut parsed: postgres::Config = config.parse().map_err(|e| {
        StoreError::Unavailable(format!("invalid PostgreSQL connection string: {e}"))
    })?;
    if parsed.get_connect_timeout().is_none() {
        parsed.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
    }
    parsed.connect(NoTls).map_err(|e| {
        let ports = parsed.get_ports();
        let servers: Vec<String> = parsed
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
                match h {
                    postgres::config::Host::Tcp(h) => format!("{h}:{port}"),
                    postgres::config::Host::Unix(p) => format!("{}", p.display()),
                }
            })
            .collect();
        // postgres' own message ("error connecting to server") leaves the
        // cause (refused, timed out, bad password) to its source.
        let cause = std::error::Error::source(&e).map_or(String::new(), |s| format!(": {s}"));
        StoreError::Unavailable(format!(
            "cannot connect to PostgreSQL at {}: {e}{cause}",
            servers.join(", ")
        ))
    })
}

impl PgStore {
    /// Connects with a libpq-style connection string (`postgres://…` or
    /// `host=… user=…`), migrates the schema and starts listening for other
    /// replicas' changes. `on_change` is called (from another thread) when
    /// [`Store::poll_remote`] has something new.
    pub fn connect(
        config: &str,
        on_change: Box<dyn Fn() + Send + 'static>,
    ) -> Result<Self, StoreError> {
        let mut client = connect(config)?;
        migrate(&mut client)?;
        let writer = format!("{:016x}", rand::random::<u64>());
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        // The listener is subscribed before `connect` returns, so nothing
        // written after the caller's `load` can be missed.
        let mut listen = connect(config)?;
        listen
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .map_err(map_err)?;
        let listener = {
            let (config, writer, stop) = (config.to_owned(), writer.clone(), stop.clone());
            std::thread::Builder::new()
                .name("meshd-pg-listen".into())
                .spawn(move || listen_loop(listen, &config, &writer, &stop, &tx, &*on_change))
                .map_err(|e| StoreError::Unavailable(format!("cannot start listener: {e}")))?
        };
        Ok(PgStore {
            config: config.to_owned(),
            client: Some(client),
            writer,
            notes: rx,
            pending: BTreeSet::new(),
            known_nodes: BTreeSet::new(),
            known_tokens: BTreeSet::new(),
            stop,
            listener: Some(listener),
        })
    }

    /// The write connection, reconnecting if the last one broke.
    fn client(&mut self) -> Result<&mut Client, StoreError> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = None;
            self.client = Some(connect(&self.config)?);
        }
        self.client
            .as_mut()
            .ok_or_else(|| StoreError::Unavailable("no connection".into()))
    }

    /// Runs `f` on the connection; a failed connection is dropped so the next
    /// call reconnects.
    fn with_client<T>(
        &mut self,
        f: impl FnOnce(&mut Client) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let result = f(self.client()?);
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
        result
    }

    fn apply(tx: &mut Transaction<'_>, writer: &str, change: &Change) -> Result<(), StoreError> {
        let note = match change {
            Change::Settings(s) => {
                let r = SettingsRow::from_record(s)?;
                // The mesh's settings are set once; a replica that lost the race
                // to create the mesh keeps the winner's.
                tx.execute(
                    "INSERT INTO settings (id, ipv6_prefix, created_at) VALUES (1, $1, $2)
                     ON CONFLICT (id) DO NOTHING",
                    &[&r.ipv6_prefix, &r.created_at],
                )
                .map_err(map_err)?;
                "settings".to_owned()
            }
            Change::PutNode(n) => {
                let r = NodeRow::from_record(n)?;
                tx.execute(
                    &format!(
                        "INSERT INTO nodes ({NODE_COLUMNS})
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
                         ON CONFLICT (id) DO UPDATE SET name = excluded.name, key = excluded.key,
                             ipv4 = excluded.ipv4, ipv6 = excluded.ipv6, tags = excluded.tags,
                             slice = excluded.slice, ephemeral = excluded.ephemeral,
                             token_id = excluded.token_id, created_at = excluded.created_at,
                             expires_at = excluded.expires_at, endpoints = excluded.endpoints,
                             disconnected_at = excluded.disconnected_at"
                    ),
                    &[
                        &r.id,
                        &r.name,
                        &r.key,
                        &r.ipv4,
                        &r.ipv6,
                        &r.tags,
                        &r.slice,
                        &r.ephemeral,
                        &r.token_id,
                        &r.created_at,
                        &r.expires_at,
                        &r.endpoints,
                        &r.disconnected_at,
                    ],
                )
                .map_err(map_err)?;
                format!("node {}", n.id)
            }
            Change::DeleteNode(id) => {
                tx.execute("DELETE FROM nodes WHERE id = $1", &[&to_sql(id.0)?])
                    .map_err(map_err)?;
                format!("node {id}")
            }
            Change::PutToken(t) => {
                let r = TokenRow::from_record(t)?;
                tx.execute(
                    &format!(
                        "INSERT INTO tokens ({TOKEN_COLUMNS})
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                         ON CONFLICT (id) DO UPDATE SET secret_hash = excluded.secret_hash,
                             reusable = excluded.reusable, ephemeral = excluded.ephemeral,
                             tags = excluded.tags, slice = excluded.slice,
                             created_at = excluded.created_at, expires_at = excluded.expires_at,
                             revoked = excluded.revoked, uses = excluded.uses"
                    ),
                    &[
                        &r.id,
                        &r.secret_hash,
                        &r.reusable,
                        &r.ephemeral,
                        &r.tags,
                        &r.slice,
                        &r.created_at,
                        &r.expires_at,
                        &r.revoked,
                        &r.uses,
                    ],
                )
                .map_err(map_err)?;
                format!("token {}", t.id)
            }
            Change::DeleteToken(id) => {
                tx.execute("DELETE FROM tokens WHERE id = $1", &[id])
                    .map_err(map_err)?;
                format!("token {id}")
            }
        };
        // Delivered when (and only if) the transaction commits.
        tx.execute(
            "SELECT pg_notify($1, $2)",
            &[&CHANNEL, &format!("{writer} {note}")],
        )
        .map_err(map_err)?;
        Ok(())
    }

    /// What a set of notes means now, read in one transaction.
    fn read_notes(&mut self, notes: &BTreeSet<Note>) -> Result<Vec<Change>, StoreError> {
        if notes.contains(&Note::Resync) {
            let snap = self.with_client(load)?;
            let mut out = Vec::new();
            out.extend(snap.settings.map(Change::Settings));
            let nodes: BTreeSet<NodeId> = snap.nodes.iter().map(|n| n.id).collect();
            let tokens: BTreeSet<String> = snap.tokens.iter().map(|t| t.id.clone()).collect();
            out.extend(
                self.known_nodes
                    .difference(&nodes)
                    .map(|id| Change::DeleteNode(*id)),
            );
            out.extend(
                self.known_tokens
                    .difference(&tokens)
                    .map(|id| Change::DeleteToken(id.clone())),
            );
            out.extend(snap.tokens.into_iter().map(Change::PutToken));
            out.extend(snap.nodes.into_iter().map(Change::PutNode));
            return Ok(out);
        }
        self.with_client(|c| {
            let mut tx = c.transaction().map_err(map_err)?;
            let mut out = Vec::new();
            for note in notes {
                match note {
                    Note::Resync => {}
                    Note::Settings => {
                        if let Some(s) = load_settings(&mut tx)? {
                            out.push(Change::Settings(s));
                        }
                    }
                    Note::Node(id) => {
                        let row = tx
                            .query_opt(
                                &format!("SELECT {NODE_COLUMNS} FROM nodes WHERE id = $1"),
                                &[&to_sql(id.0)?],
                            )
                            .map_err(map_err)?;
                        out.push(match row {
                            Some(r) => Change::PutNode(node_row(&r)?.into_record()?),
                            None => Change::DeleteNode(*id),
                        });
                    }
                    Note::Token(id) => {
                        let row = tx
                            .query_opt(
                                &format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = $1"),
                                &[id],
                            )
                            .map_err(map_err)?;
                        out.push(match row {
                            Some(r) => Change::PutToken(token_row(&r)?.into_record()?),
                            None => Change::DeleteToken(id.clone()),
                        });
                    }
                }
            }
            tx.commit().map_err(map_err)?;
            Ok(out)
        })
    }

    fn remember(&mut self, changes: &[Change]) {
        for c in changes {
            match c {
                Change::PutNode(n) => {
                    self.known_nodes.insert(n.id);
                }
                Change::DeleteNode(id) => {
                    self.known_nodes.remove(id);
                }
                Change::PutToken(t) => {
                    self.known_tokens.insert(t.id.clone());
                }
                Change::DeleteToken(id) => {
                    self.known_tokens.remove(id);
                }
                Change::Settings(_) => {}
            }
        }
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.listener.take() {
            // The listener wakes at least every 500 ms to look at `stop`.
            let _ = h.join();
        }
    }
}

fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let mut tx = client.transaction().map_err(map_err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .map_err(map_err)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS meshd_schema (version INTEGER NOT NULL)")
        .map_err(map_err)?;
    let version: Option<i32> = tx
        .query_opt("SELECT version FROM meshd_schema", &[])
        .map_err(map_err)?
        .map(|r| r.try_get(0))
        .transpose()
        .map_err(map_err)?;
    let version = version.map_or(0, |v| usize::try_from(v).unwrap_or(usize::MAX));
    let known = MIGRATIONS.len();
    if version > known {
        return Err(StoreError::Corrupt(format!(
            "database schema version {version} is newer than this meshd understands ({known})"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        tx.batch_execute(sql).map_err(map_err)?;
        tracing::info!(version = i + 1, "state database migrated");
    }
    let new = i32::try_from(known).unwrap_or(i32::MAX);
    tx.execute("DELETE FROM meshd_schema", &[])
        .map_err(map_err)?;
    tx.execute("INSERT INTO meshd_schema (version) VALUES ($1)", &[&new])
        .map_err(map_err)?;
    tx.commit().map_err(map_err)
}

fn node_row(r: &Row) -> Result<NodeRow, StoreError> {
    let get = || -> Result<NodeRow, postgres::Error> {
        Ok(NodeRow {
            id: r.try_get(0)?,
            name: r.try_get(1)?,
            key: r.try_get(2)?,
            ipv4: r.try_get(3)?,
            ipv6: r.try_get(4)?,
            tags: r.try_get(5)?,
            slice: r.try_get(6)?,
            ephemeral: r.try_get(7)?,
            token_id: r.try_get(8)?,
            created_at: r.try_get(9)?,
            expires_at: r.try_get(10)?,
            endpoints: r.try_get(11)?,
            disconnected_at: r.try_get(12)?,
        })
    };
    get().map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn token_row(r: &Row) -> Result<TokenRow, StoreError> {
    let get = || -> Result<TokenRow, postgres::Error> {
        Ok(TokenRow {
            id: r.try_get(0)?,
            secret_hash: r.try_get(1)?,
            reusable: r.try_get(2)?,
            ephemeral: r.try_get(3)?,
            tags: r.try_get(4)?,
            slice: r.try_get(5)?,
            created_at: r.try_get(6)?,
            expires_at: r.try_get(7)?,
            revoked: r.try_get(8)?,
            uses: r.try_get(9)?,
        })
    };
    get().map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn load_settings(
    tx: &mut Transaction<'_>,
) -> Result<Option<crate::state::MeshSettings>, StoreError> {
    tx.query_opt(
        "SELECT ipv6_prefix, created_at FROM settings WHERE id = 1",
        &[],
    )
    .map_err(map_err)?
    .map(|r| {
        Ok(SettingsRow {
            ipv6_prefix: r.try_get(0).map_err(map_err)?,
            created_at: r.try_get(1).map_err(map_err)?,
        })
    })
    .transpose()?
    .map(SettingsRow::into_record)
    .transpose()
}

fn load(client: &mut Client) -> Result<Snapshot, StoreError> {
    // REPEATABLE READ: the three tables as of one moment.
    let mut tx = client
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .map_err(map_err)?;
    let settings = load_settings(&mut tx)?;
    let nodes = tx
        .query(
            &format!("SELECT {NODE_COLUMNS} FROM nodes ORDER BY id"),
            &[],
        )
        .map_err(map_err)?
        .iter()
        .map(|r| node_row(r)?.into_record())
        .collect::<Result<Vec<_>, _>>()?;
    let tokens = tx
        .query(
            &format!("SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY id"),
            &[],
        )
        .map_err(map_err)?
        .iter()
        .map(|r| token_row(r)?.into_record())
        .collect::<Result<Vec<_>, _>>()?;
    tx.commit().map_err(map_err)?;
    Ok(Snapshot {
        settings,
        nodes,
        tokens,
    })
}

fn parse_note(payload: &str, me: &str) -> Option<Note> {
    let mut parts = payload.splitn(3, ' ');
    let writer = parts.next()?;
    if writer == me {
        return None;
    }
    match (parts.next()?, parts.next()) {
        ("settings", None) => Some(Note::Settings),
        ("node", Some(id)) => id.parse().ok().map(|id| Note::Node(NodeId(id))),
        ("token", Some(id)) => Some(Note::Token(id.to_owned())),
        _ => None,
    }
}

fn listen_loop(
    mut client: Client,
    config: &str,
    me: &str,
    stop: &AtomicBool,
    tx: &mpsc::Sender<Note>,
    on_change: &(dyn Fn() + Send),
) {
    while !stop.load(Ordering::Relaxed) {
        let mut lost = false;
        {
            let mut notes = client.notifications();
            let mut it = notes.timeout_iter(Duration::from_millis(500));
            loop {
                match it.next() {
                    Ok(Some(n)) => {
                        if let Some(note) = parse_note(n.payload(), me) {
                            if tx.send(note).is_err() {
                                return;
                            }
                            on_change();
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "lost the PostgreSQL notification connection");
                        lost = true;
                        break;
                    }
                }
            }
        }
        if !lost && !client.is_closed() {
            continue;
        }
        // Reconnect, then resync: notifications sent meanwhile are gone.
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
            let Ok(mut c) = connect(config) else { continue };
            if c.batch_execute(&format!("LISTEN {CHANNEL}")).is_ok() {
                client = c;
                break;
            }
        }
        if tx.send(Note::Resync).is_err() {
            return;
        }
        on_change();
    }
}

impl Store for PgStore {
    fn load(&mut self) -> Result<Snapshot, StoreError> {
        let snap = self.with_client(load)?;
        self.known_nodes = snap.nodes.iter().map(|n| n.id).collect();
        self.known_tokens = snap.tokens.iter().map(|t| t.id.clone()).collect();
        Ok(snap)
    }

    fn commit(&mut self, changes: &[Change]) -> Result<(), StoreError> {
        let writer = self.writer.clone();
        self.with_client(|c| {
            let mut tx = c.transaction().map_err(map_err)?;
            for change in changes {
                // An error drops `tx`, which rolls everything back.
                Self::apply(&mut tx, &writer, change)?;
            }
            tx.commit().map_err(map_err)
        })?;
        self.remember(changes);
        Ok(())
    }

    fn request_resync(&mut self) {
        self.pending.insert(Note::Resync);
    }

    fn poll_remote(&mut self) -> Result<Vec<Change>, StoreError> {
        self.pending.extend(self.notes.try_iter());
        if self.pending.is_empty() {
            return Ok(Vec::new());
        }
        let notes = std::mem::take(&mut self.pending);
        match self.read_notes(&notes) {
            Ok(changes) => {
                self.remember(&changes);
                Ok(changes)
            }
            Err(e) => {
                // Keep them for the next attempt.
                self.pending = notes;
                Err(e)
            }
        }
    }
}
