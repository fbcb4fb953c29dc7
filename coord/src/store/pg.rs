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
//! Every write states the version it was decided from (`WHERE version = …`),
//! so a replica never overwrites a row another replica changed meanwhile.
//!
//! When the server cannot be reached, writes fail at once with the reason
//! while a thread of its own reconnects in the background: the coordinator's
//! thread never waits for a connection attempt after the first one.
//!
//! The `postgres` client runs its own small runtime, so this store must be
//! used from a plain thread, not from inside an async runtime.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use postgres::error::{DbError, Severity, SqlState};
use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, Config, NoTls, Row, Transaction};

use super::pgpass;
use super::rows::{to_sql, NodeRow, SettingsRow, TokenRow};
use super::{stale, Lookup, Store, StoreError};
use crate::state::{Change, Snapshot};
use meshd_proto::NodeId;

const CHANNEL: &str = "meshd_changes";

/// Serialises migrations between replicas starting at the same time.
const MIGRATION_LOCK: i64 = 0x6d65_7368_6400;

/// Entry `i` takes the schema from version `i` to `i + 1`. Append only.
const MIGRATIONS: &[&str] = &[
    r"
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
",
    r"
ALTER TABLE nodes ADD COLUMN session BIGINT;
ALTER TABLE nodes ADD COLUMN version BIGINT NOT NULL DEFAULT 1;
ALTER TABLE tokens ADD COLUMN version BIGINT NOT NULL DEFAULT 1;
",
    "ALTER TABLE nodes ADD COLUMN relay TEXT;",
];

const NODE_COLUMNS: &str = "id, name, key, ipv4, ipv6, tags, slice, ephemeral, token_id, \
                            created_at, expires_at, endpoints, disconnected_at, session, version, relay";
const TOKEN_COLUMNS: &str = "id, secret_hash, reusable, ephemeral, tags, slice, created_at, \
                             expires_at, revoked, uses, version";

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Note {
    /// The listener lost its connection: anything may have changed meanwhile.
    Resync,
    Settings,
    Node(NodeId),
    Token(String),
}

pub struct PgStore {
    config: Arc<Server>,
    client: Option<Client>,
    /// While the write connection is down: the thread reconnecting.
    reconnect: Option<Reconnect>,
    writer: String,
    notes: mpsc::Receiver<Note>,
    pending: BTreeSet<Note>,
    known_nodes: BTreeSet<NodeId>,
    known_tokens: BTreeSet<String>,
    stop: Arc<AtomicBool>,
    listener: Option<JoinHandle<()>>,
}

/// How to reach the server: the parsed connection string (with the password
/// found outside it, and timeouts) and, for messages, where it points.
struct Server {
    config: Config,
    /// `host:port, …`, never the password.
    name: String,
}

/// A background reconnection of the write connection.
struct Reconnect {
    connected: mpsc::Receiver<Client>,
    /// Why the last attempt failed.
    last_error: Arc<Mutex<String>>,
    since: Instant,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The connection string may hold a password: never shown.
        f.debug_struct("PgStore")
            .field("server", &self.config.name)
            .field("writer", &self.writer)
            .finish_non_exhaustive()
    }
}

/// A PostgreSQL error with its cause: the server's own message for errors
/// it reported (`FATAL: password authentication failed for user "meshd"`),
/// else the client's error and its sources (`error connecting to server:
/// Connection refused (os error 111)`). The `postgres` crate's own `Display`
/// says only "db error".
fn describe(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return describe_db(db);
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn describe_db(db: &DbError) -> String {
    let mut text = format!("{}: {}", db.severity(), db.message());
    if let Some(d) = db.detail() {
        text.push_str(&format!(" ({d})"));
    }
    if let Some(h) = db.hint() {
        text.push_str(&format!("; hint: {h}"));
    }
    text
}

fn map_err(e: postgres::Error) -> StoreError {
    // Another replica's concurrent write; deciding again resolves it.
    let conflicts = [
        SqlState::UNIQUE_VIOLATION,
        SqlState::T_R_SERIALIZATION_FAILURE,
        SqlState::T_R_DEADLOCK_DETECTED,
    ];
    match e.code() {
        Some(c) if conflicts.contains(c) => StoreError::Conflict(describe(&e)),
        _ => StoreError::Unavailable(format!("PostgreSQL: {}", describe(&e))),
    }
}

/// How long a connection attempt may take when the connection string sets no
/// `connect_timeout`: a server behind a firewall that drops packets would
/// otherwise hold the coordinator for the kernel's TCP timeout (minutes).
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long sent data may stay unacknowledged before the connection counts
/// as dead, when the connection string sets no `tcp_user_timeout`: a query
/// to a server that vanished fails after this instead of after the kernel's
/// 15 minutes. Acknowledgements come from the server's kernel, so a busy
/// server does not trip it.
const DEFAULT_TCP_USER_TIMEOUT: Duration = Duration::from_secs(3);

/// TCP keep-alive on idle connections (the listener's), when the connection
/// string leaves libpq's 2-hour default: a vanished server is noticed within
/// seconds, and its notifications are resynchronised from the new connection.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);

/// Between two attempts of a background reconnection.
const RECONNECT_INTERVAL: Duration = Duration::from_millis(500);

impl Server {
    /// Parses a libpq-style connection string (`postgres://…` or `host=…
    /// user=…`) and completes it: a password from `PGPASSWORD` or the password
    /// file if it has none, and timeouts it does not set.
    fn new(url: &str) -> Result<Self, StoreError> {
        // The connection string may hold a password, so it is never quoted in
        // an error; the parser's message does not quote it either.
        let mut config: Config = url.parse().map_err(|e| {
            StoreError::Unavailable(format!(
                "invalid PostgreSQL connection string: {}",
                describe(&e)
            ))
        })?;
        let ports = config.get_ports().to_vec();
        let hosts: Vec<String> = config
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
        if config.get_password().is_none() {
            let host = match config.get_hosts().first() {
                Some(postgres::config::Host::Tcp(h)) => h.clone(),
                _ => "localhost".to_owned(),
            };
            let user = config
                .get_user()
                .map(str::to_owned)
                .or_else(|| std::env::var("USER").ok())
                .unwrap_or_default();
            let target = pgpass::Target {
                host: &host,
                port: ports.first().copied().unwrap_or(5432),
                dbname: config.get_dbname().unwrap_or(&user),
                user: &user,
            };
            if let Some(p) = pgpass::find(&target) {
                config.password(p);
            }
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
        }
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(DEFAULT_TCP_USER_TIMEOUT);
        }
        if config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
            config.keepalives_idle(KEEPALIVE_IDLE);
        }
        // The server's notices (such as `relation "meshd_schema" already
        // exists, skipping` from an idempotent migration) are not news.
        config.notice_callback(|n| match n.parsed_severity() {
            Some(Severity::Warning) => {
                tracing::warn!(notice = %describe_db(&n), "PostgreSQL warning")
            }
            _ => tracing::debug!(notice = %describe_db(&n), "PostgreSQL notice"),
        });
        Ok(Server {
            config,
            name: hosts.join(", "),
        })
    }

    fn connect(&self) -> Result<Client, StoreError> {
        self.config.connect(NoTls).map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot connect to PostgreSQL at {}: {}",
                self.name,
                describe(&e)
            ))
        })
    }
}

impl PgStore {
    /// Connects with a libpq-style connection string (`postgres://…` or
    /// `host=… user=…`; a password it lacks is taken from `PGPASSWORD` or the
    /// password file, `PGPASSFILE` or `~/.pgpass`), migrates the schema and
    /// starts listening for other replicas' changes. `on_change` is called
    /// (from another thread) when [`Store::poll_remote`] has something new.
    pub fn connect(
        url: &str,
        on_change: Box<dyn Fn() + Send + 'static>,
    ) -> Result<Self, StoreError> {
        let server = Arc::new(Server::new(url)?);
        let mut client = server.connect()?;
        migrate(&mut client)?;
        let writer = format!("{:016x}", rand::random::<u64>());
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        // The listener is subscribed before `connect` returns, so nothing
        // written after the caller's `load` can be missed.
        let mut listen = server.connect()?;
        listen
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .map_err(map_err)?;
        let listener = {
            let (server, writer, stop) = (server.clone(), writer.clone(), stop.clone());
            std::thread::Builder::new()
                .name("meshd-pg-listen".into())
                .spawn(move || listen_loop(listen, &server, &writer, &stop, &tx, &*on_change))
                .map_err(|e| StoreError::Unavailable(format!("cannot start listener: {e}")))?
        };
        Ok(PgStore {
            config: server,
            client: Some(client),
            reconnect: None,
            writer,
            notes: rx,
            pending: BTreeSet::new(),
            known_nodes: BTreeSet::new(),
            known_tokens: BTreeSet::new(),
            stop,
            listener: Some(listener),
        })
    }

    /// The write connection. When it is down this fails at once, with why
    /// the last attempt to reconnect failed, and a thread reconnects.
    fn client(&mut self) -> Result<&mut Client, StoreError> {
        if self.client.is_none() {
            let reconnect = self
                .reconnect
                .get_or_insert_with(|| start_reconnect(&self.config, &self.stop, None));
            match reconnect.connected.try_recv() {
                Ok(c) => {
                    tracing::info!(
                        server = %self.config.name,
                        after = ?reconnect.since.elapsed(),
                        "connection to PostgreSQL restored"
                    );
                    self.client = Some(c);
                    self.reconnect = None;
                }
                Err(_) => {
                    let why = reconnect
                        .last_error
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clone();
                    return Err(StoreError::Unavailable(why));
                }
            }
        }
        self.client
            .as_mut()
            .ok_or_else(|| StoreError::Unavailable("no connection to PostgreSQL".into()))
    }

    /// Runs `f` on the connection. A connection that broke is dropped and a
    /// reconnection started, so later calls fail at once until it is back.
    fn with_client<T>(
        &mut self,
        f: impl FnOnce(&mut Client) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let result = f(self.client()?);
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
            let why = match &result {
                Err(e) => e.to_string(),
                Ok(_) => "the connection closed".to_owned(),
            };
            tracing::warn!(server = %self.config.name, error = %why, "lost the connection to PostgreSQL; reconnecting");
            self.reconnect = Some(start_reconnect(&self.config, &self.stop, Some(why)));
        }
        result
    }

    fn apply(tx: &mut Transaction<'_>, writer: &str, change: &Change) -> Result<(), StoreError> {
        let (changed, note) = match change {
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
                (1, "settings".to_owned())
            }
            Change::PutNode(n) => {
                let r = NodeRow::from_record(n)?;
                let previous = r.version - 1;
                let mut params: Vec<Param<'_>> = vec![
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
                    &r.session,
                    &r.version,
                    &r.relay,
                ];
                let sql = if n.version == 1 {
                    format!(
                        "INSERT INTO nodes ({NODE_COLUMNS}) VALUES \
                         ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)"
                    )
                } else {
                    params.push(&previous);
                    "UPDATE nodes SET name = $2, key = $3, ipv4 = $4, ipv6 = $5, tags = $6,
                         slice = $7, ephemeral = $8, token_id = $9, created_at = $10,
                         expires_at = $11, endpoints = $12, disconnected_at = $13,
                         session = $14, version = $15, relay = $16
                     WHERE id = $1 AND version = $17"
                        .to_owned()
                };
                let changed = tx.execute(&sql, &params).map_err(map_err)?;
                (changed, format!("node {}", n.id))
            }
            Change::DeleteNode { id, version } => {
                let changed = tx
                    .execute(
                        "DELETE FROM nodes WHERE id = $1 AND version = $2",
                        &[&to_sql(id.0)?, &to_sql(*version)?],
                    )
                    .map_err(map_err)?;
                (changed, format!("node {id}"))
            }
            Change::PutToken(t) => {
                let r = TokenRow::from_record(t)?;
                let previous = r.version - 1;
                let mut params: Vec<Param<'_>> = vec![
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
                    &r.version,
                ];
                let sql = if t.version == 1 {
                    format!(
                        "INSERT INTO tokens ({TOKEN_COLUMNS}) VALUES \
                         ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
                    )
                } else {
                    params.push(&previous);
                    "UPDATE tokens SET secret_hash = $2, reusable = $3, ephemeral = $4,
                         tags = $5, slice = $6, created_at = $7, expires_at = $8,
                         revoked = $9, uses = $10, version = $11
                     WHERE id = $1 AND version = $12"
                        .to_owned()
                };
                let changed = tx.execute(&sql, &params).map_err(map_err)?;
                (changed, format!("token {}", t.id))
            }
            Change::DeleteToken { id, version } => {
                let changed = tx
                    .execute(
                        "DELETE FROM tokens WHERE id = $1 AND version = $2",
                        &[id, &to_sql(*version)?],
                    )
                    .map_err(map_err)?;
                (changed, format!("token {id}"))
            }
        };
        if changed != 1 {
            return Err(stale(change));
        }
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
                    .map(|id| Change::DeleteNode {
                        id: *id,
                        version: 0,
                    }),
            );
            out.extend(
                self.known_tokens
                    .difference(&tokens)
                    .map(|id| Change::DeleteToken {
                        id: id.clone(),
                        version: 0,
                    }),
            );
            out.extend(snap.tokens.into_iter().map(Change::PutToken));
            out.extend(snap.nodes.into_iter().map(Change::PutNode));
            return Ok(out);
        }
        let lookups: Vec<Lookup> = notes
            .iter()
            .filter_map(|n| match n {
                Note::Node(id) => Some(Lookup::Node(*id)),
                Note::Token(id) => Some(Lookup::Token(id.clone())),
                Note::Settings | Note::Resync => None,
            })
            .collect();
        let settings = notes.contains(&Note::Settings);
        self.with_client(|c| {
            let mut tx = c.transaction().map_err(map_err)?;
            let mut out = Vec::new();
            if settings {
                out.extend(load_settings(&mut tx)?.map(Change::Settings));
            }
            for l in &lookups {
                out.extend(read_one(&mut tx, l)?);
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
                Change::DeleteNode { id, .. } => {
                    self.known_nodes.remove(id);
                }
                Change::PutToken(t) => {
                    self.known_tokens.insert(t.id.clone());
                }
                Change::DeleteToken { id, .. } => {
                    self.known_tokens.remove(id);
                }
                Change::Settings(_) => {}
            }
        }
    }
}

/// Starts a thread that connects to `server` until it succeeds (or the store
/// is dropped), every [`RECONNECT_INTERVAL`]. `why` is what failed first.
fn start_reconnect(server: &Arc<Server>, stop: &Arc<AtomicBool>, why: Option<String>) -> Reconnect {
    let (tx, rx) = mpsc::channel();
    let last_error =
        Arc::new(Mutex::new(why.unwrap_or_else(|| {
            format!("connecting to PostgreSQL at {}", server.name)
        })));
    let (server, stop, last) = (server.clone(), stop.clone(), last_error.clone());
    let spawned = std::thread::Builder::new()
        .name("meshd-pg-connect".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match server.connect() {
                    Ok(c) => {
                        let _ = tx.send(c);
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "PostgreSQL still unreachable");
                        *last.lock().unwrap_or_else(PoisonError::into_inner) = e.to_string();
                    }
                }
                std::thread::sleep(RECONNECT_INTERVAL);
            }
        });
    if let Err(e) = spawned {
        *last_error.lock().unwrap_or_else(PoisonError::into_inner) =
            format!("cannot start a thread to reconnect to PostgreSQL: {e}");
    }
    Reconnect {
        connected: rx,
        last_error,
        since: Instant::now(),
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
            session: r.try_get(13)?,
            version: r.try_get(14)?,
            relay: r.try_get(15)?,
        })
    };
    get().map_err(|e| StoreError::Corrupt(describe(&e)))
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
            version: r.try_get(10)?,
        })
    };
    get().map_err(|e| StoreError::Corrupt(describe(&e)))
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

type Param<'a> = &'a (dyn postgres::types::ToSql + Sync);

fn node_where(
    tx: &mut Transaction<'_>,
    col: &str,
    value: Param<'_>,
) -> Result<Option<crate::state::NodeRecord>, StoreError> {
    tx.query_opt(
        &format!("SELECT {NODE_COLUMNS} FROM nodes WHERE {col} = $1"),
        &[value],
    )
    .map_err(map_err)?
    .map(|r| node_row(&r)?.into_record())
    .transpose()
}

fn token_where(
    tx: &mut Transaction<'_>,
    col: &str,
    value: Param<'_>,
) -> Result<Option<crate::state::TokenRecord>, StoreError> {
    tx.query_opt(
        &format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE {col} = $1"),
        &[value],
    )
    .map_err(map_err)?
    .map(|r| token_row(&r)?.into_record())
    .transpose()
}

/// One [`Lookup`], as [`Store::read`] answers it.
fn read_one(tx: &mut Transaction<'_>, lookup: &Lookup) -> Result<Option<Change>, StoreError> {
    Ok(match lookup {
        Lookup::Node(id) => Some(node_where(tx, "id", &to_sql(id.0)?)?.map_or(
            Change::DeleteNode {
                id: *id,
                version: 0,
            },
            Change::PutNode,
        )),
        Lookup::NodeByKey(k) => node_where(tx, "key", &k.0.to_vec())?.map(Change::PutNode),
        Lookup::NodeByName(n) => node_where(tx, "name", n)?.map(Change::PutNode),
        Lookup::NodeByIpv4(a) => node_where(tx, "ipv4", &a.to_string())?.map(Change::PutNode),
        Lookup::Token(id) => Some(token_where(tx, "id", id)?.map_or(
            Change::DeleteToken {
                id: id.clone(),
                version: 0,
            },
            Change::PutToken,
        )),
        Lookup::TokenByHash(h) => {
            token_where(tx, "secret_hash", &h.to_vec())?.map(Change::PutToken)
        }
    })
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
    server: &Server,
    me: &str,
    stop: &AtomicBool,
    tx: &mpsc::Sender<Note>,
    on_change: &(dyn Fn() + Send),
) {
    while !stop.load(Ordering::Relaxed) {
        let mut lost = None;
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
                        lost = Some(describe(&e));
                        break;
                    }
                }
            }
        }
        if lost.is_none() && !client.is_closed() {
            continue;
        }
        let why = lost.unwrap_or_else(|| "the connection closed".into());
        tracing::warn!(server = %server.name, error = %why, "lost the PostgreSQL notification connection; reconnecting");
        let since = Instant::now();
        // Reconnect, then resync: notifications sent meanwhile are gone.
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(RECONNECT_INTERVAL);
            let mut c = match server.connect() {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "PostgreSQL still unreachable");
                    continue;
                }
            };
            if c.batch_execute(&format!("LISTEN {CHANNEL}")).is_ok() {
                client = c;
                break;
            }
        }
        tracing::info!(server = %server.name, after = ?since.elapsed(), "PostgreSQL notification connection restored");
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

    fn read(&mut self, lookups: &[Lookup]) -> Result<Vec<Change>, StoreError> {
        let changes = self.with_client(|c| {
            let mut tx = c.transaction().map_err(map_err)?;
            let mut out = Vec::new();
            for l in lookups {
                out.extend(read_one(&mut tx, l)?);
            }
            tx.commit().map_err(map_err)?;
            Ok(out)
        })?;
        self.remember(&changes);
        Ok(changes)
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
