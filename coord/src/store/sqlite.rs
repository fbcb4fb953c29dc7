//! The embedded default: one SQLite file in the state directory, in WAL mode,
//! with versioned migrations. Every commit is one transaction.

use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, ErrorCode, OptionalExtension, Row, Transaction};

use super::rows::{to_sql, NodeRow, SettingsRow, TokenRow};
use super::{Lookup, Store, StoreError};
use crate::state::{Change, Snapshot};

/// Schema migrations; entry `i` takes the schema from version `i` to `i + 1`.
/// Append only: a released migration is never edited.
const MIGRATIONS: &[&str] = &[
    r"
CREATE TABLE settings (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    ipv6_prefix TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE TABLE nodes (
    id              INTEGER PRIMARY KEY,
    name            TEXT NOT NULL UNIQUE,
    key             BLOB NOT NULL UNIQUE,
    ipv4            TEXT NOT NULL UNIQUE,
    ipv6            TEXT NOT NULL UNIQUE,
    tags            TEXT NOT NULL,
    slice           TEXT,
    ephemeral       INTEGER NOT NULL,
    token_id        TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    expires_at      INTEGER,
    endpoints       TEXT NOT NULL,
    disconnected_at INTEGER
);
CREATE TABLE tokens (
    id          TEXT PRIMARY KEY,
    secret_hash BLOB NOT NULL UNIQUE,
    reusable    INTEGER NOT NULL,
    ephemeral   INTEGER NOT NULL,
    tags        TEXT NOT NULL,
    slice       TEXT,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER,
    revoked     INTEGER NOT NULL,
    uses        INTEGER NOT NULL
);
",
    r"
ALTER TABLE nodes ADD COLUMN session INTEGER;
ALTER TABLE nodes ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
ALTER TABLE tokens ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
",
    "ALTER TABLE nodes ADD COLUMN relay TEXT;",
];

const NODE_COLUMNS: &str = "id, name, key, ipv4, ipv6, tags, slice, ephemeral, token_id, \
                            created_at, expires_at, endpoints, disconnected_at, session, version, relay";
const TOKEN_COLUMNS: &str = "id, secret_hash, reusable, ephemeral, tags, slice, created_at, \
                             expires_at, revoked, uses, version";

pub struct SqliteStore {
    conn: Connection,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

fn map_err(e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(ErrorCode::ConstraintViolation) => StoreError::Conflict(e.to_string()),
        Some(ErrorCode::NotADatabase) => StoreError::Corrupt(e.to_string()),
        _ => StoreError::Unavailable(e.to_string()),
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and brings its schema
    /// up to date.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", path.display())))?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(map_err)?;
        // WAL: readers never block the writer, and a crash mid-commit leaves
        // the last committed state. synchronous=FULL: a commit is on disk
        // before a node is told about it (writes are rare enough to afford it).
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(map_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Unavailable(format!(
                "{}: cannot use write-ahead logging (journal mode is {mode})",
                path.display()
            )));
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(map_err)?;
        let mut store = SqliteStore { conn };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let tx = self.conn.transaction().map_err(map_err)?;
        let version: i64 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(map_err)?;
        let known = MIGRATIONS.len();
        let version = usize::try_from(version).unwrap_or(usize::MAX);
        if version > known {
            return Err(StoreError::Corrupt(format!(
                "database schema version {version} is newer than this meshd understands ({known})"
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            tx.execute_batch(sql).map_err(map_err)?;
            tx.pragma_update(None, "user_version", i + 1)
                .map_err(map_err)?;
            tracing::info!(version = i + 1, "state database migrated");
        }
        tx.commit().map_err(map_err)
    }

    /// Caps the database at `pages` pages, so tests can make the "disk" fill up.
    #[doc(hidden)]
    pub fn limit_pages_for_tests(&self, pages: u64) -> Result<(), StoreError> {
        self.conn
            .query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))
            .map_err(map_err)
    }

    fn apply(tx: &Transaction<'_>, change: &Change) -> Result<(), StoreError> {
        let changed = match change {
            Change::Settings(s) => {
                let r = SettingsRow::from_record(s)?;
                tx.execute(
                    // Set once, when the mesh is created.
                    "INSERT INTO settings (id, ipv6_prefix, created_at) VALUES (1, ?1, ?2)
                     ON CONFLICT(id) DO NOTHING",
                    params![r.ipv6_prefix, r.created_at],
                )
                .map_err(map_err)?;
                return Ok(());
            }
            Change::PutNode(n) => {
                let r = NodeRow::from_record(n)?;
                let sql = if n.version == 1 {
                    format!(
                        "INSERT INTO nodes ({NODE_COLUMNS})
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)"
                    )
                } else {
                    "UPDATE nodes SET name = ?2, key = ?3, ipv4 = ?4, ipv6 = ?5, tags = ?6,
                         slice = ?7, ephemeral = ?8, token_id = ?9, created_at = ?10,
                         expires_at = ?11, endpoints = ?12, disconnected_at = ?13,
                         session = ?14, version = ?15, relay = ?16
                     WHERE id = ?1 AND version = ?15 - 1"
                        .to_owned()
                };
                tx.execute(
                    &sql,
                    params![
                        r.id,
                        r.name,
                        r.key,
                        r.ipv4,
                        r.ipv6,
                        r.tags,
                        r.slice,
                        r.ephemeral,
                        r.token_id,
                        r.created_at,
                        r.expires_at,
                        r.endpoints,
                        r.disconnected_at,
                        r.session,
                        r.version,
                        r.relay
                    ],
                )
            }
            Change::DeleteNode { id, version } => tx.execute(
                "DELETE FROM nodes WHERE id = ?1 AND version = ?2",
                params![to_sql(id.0)?, to_sql(*version)?],
            ),
            Change::PutToken(t) => {
                let r = TokenRow::from_record(t)?;
                let sql = if t.version == 1 {
                    format!(
                        "INSERT INTO tokens ({TOKEN_COLUMNS})
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
                    )
                } else {
                    "UPDATE tokens SET secret_hash = ?2, reusable = ?3, ephemeral = ?4,
                         tags = ?5, slice = ?6, created_at = ?7, expires_at = ?8,
                         revoked = ?9, uses = ?10, version = ?11
                     WHERE id = ?1 AND version = ?11 - 1"
                        .to_owned()
                };
                tx.execute(
                    &sql,
                    params![
                        r.id,
                        r.secret_hash,
                        r.reusable,
                        r.ephemeral,
                        r.tags,
                        r.slice,
                        r.created_at,
                        r.expires_at,
                        r.revoked,
                        r.uses,
                        r.version
                    ],
                )
            }
            Change::DeleteToken { id, version } => tx.execute(
                "DELETE FROM tokens WHERE id = ?1 AND version = ?2",
                params![id, to_sql(*version)?],
            ),
        }
        .map_err(map_err)?;
        if changed == 1 {
            Ok(())
        } else {
            Err(super::stale(change))
        }
    }

    fn read_one(tx: &Transaction<'_>, lookup: &Lookup) -> Result<Option<Change>, StoreError> {
        let node = |col: &str, value: &dyn rusqlite::ToSql| {
            tx.query_row(
                &format!("SELECT {NODE_COLUMNS} FROM nodes WHERE {col} = ?1"),
                [value],
                node_row,
            )
            .optional()
            .map_err(map_err)?
            .map(NodeRow::into_record)
            .transpose()
        };
        let token = |col: &str, value: &dyn rusqlite::ToSql| {
            tx.query_row(
                &format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE {col} = ?1"),
                [value],
                token_row,
            )
            .optional()
            .map_err(map_err)?
            .map(TokenRow::into_record)
            .transpose()
        };
        Ok(match lookup {
            Lookup::Node(id) => Some(node("id", &to_sql(id.0)?)?.map_or(
                Change::DeleteNode {
                    id: *id,
                    version: 0,
                },
                Change::PutNode,
            )),
            Lookup::NodeByKey(k) => node("key", &k.0.to_vec())?.map(Change::PutNode),
            Lookup::NodeByName(n) => node("name", n)?.map(Change::PutNode),
            Lookup::NodeByIpv4(a) => node("ipv4", &a.to_string())?.map(Change::PutNode),
            Lookup::Token(id) => Some(token("id", id)?.map_or(
                Change::DeleteToken {
                    id: id.clone(),
                    version: 0,
                },
                Change::PutToken,
            )),
            Lookup::TokenByHash(h) => token("secret_hash", &h.to_vec())?.map(Change::PutToken),
        })
    }
}

fn node_row(r: &Row<'_>) -> rusqlite::Result<NodeRow> {
    Ok(NodeRow {
        id: r.get(0)?,
        name: r.get(1)?,
        key: r.get(2)?,
        ipv4: r.get(3)?,
        ipv6: r.get(4)?,
        tags: r.get(5)?,
        slice: r.get(6)?,
        ephemeral: r.get(7)?,
        token_id: r.get(8)?,
        created_at: r.get(9)?,
        expires_at: r.get(10)?,
        endpoints: r.get(11)?,
        disconnected_at: r.get(12)?,
        session: r.get(13)?,
        version: r.get(14)?,
        relay: r.get(15)?,
    })
}

fn token_row(r: &Row<'_>) -> rusqlite::Result<TokenRow> {
    Ok(TokenRow {
        id: r.get(0)?,
        secret_hash: r.get(1)?,
        reusable: r.get(2)?,
        ephemeral: r.get(3)?,
        tags: r.get(4)?,
        slice: r.get(5)?,
        created_at: r.get(6)?,
        expires_at: r.get(7)?,
        revoked: r.get(8)?,
        uses: r.get(9)?,
        version: r.get(10)?,
    })
}

impl Store for SqliteStore {
    fn load(&mut self) -> Result<Snapshot, StoreError> {
        // One read transaction, so the snapshot is consistent.
        let tx = self.conn.transaction().map_err(map_err)?;
        let settings = tx
            .query_row(
                "SELECT ipv6_prefix, created_at FROM settings WHERE id = 1",
                [],
                |r| {
                    Ok(SettingsRow {
                        ipv6_prefix: r.get(0)?,
                        created_at: r.get(1)?,
                    })
                },
            )
            .optional()
            .map_err(map_err)?
            .map(SettingsRow::into_record)
            .transpose()?;
        let nodes = {
            let mut stmt = tx
                .prepare(&format!("SELECT {NODE_COLUMNS} FROM nodes ORDER BY id"))
                .map_err(map_err)?;
            let rows = stmt
                .query_map([], node_row)
                .map_err(map_err)?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(map_err)?;
            rows.into_iter()
                .map(NodeRow::into_record)
                .collect::<Result<Vec<_>, _>>()?
        };
        let tokens = {
            let mut stmt = tx
                .prepare(&format!("SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY id"))
                .map_err(map_err)?;
            let rows = stmt
                .query_map([], token_row)
                .map_err(map_err)?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(map_err)?;
            rows.into_iter()
                .map(TokenRow::into_record)
                .collect::<Result<Vec<_>, _>>()?
        };
        tx.commit().map_err(map_err)?;
        Ok(Snapshot {
            settings,
            nodes,
            tokens,
        })
    }

    fn commit(&mut self, changes: &[Change]) -> Result<(), StoreError> {
        let tx = self.conn.transaction().map_err(map_err)?;
        for c in changes {
            // An error drops `tx`, which rolls back everything before it.
            Self::apply(&tx, c)?;
        }
        tx.commit().map_err(map_err)
    }

    fn read(&mut self, lookups: &[Lookup]) -> Result<Vec<Change>, StoreError> {
        let tx = self.conn.transaction().map_err(map_err)?;
        let mut out = Vec::new();
        for l in lookups {
            out.extend(Self::read_one(&tx, l)?);
        }
        tx.commit().map_err(map_err)?;
        Ok(out)
    }
}
