//! Durable state behind one trait: the coordinator calls [`Store::commit`]
//! with every change before it acts on it, so what it tells nodes is never
//! ahead of what survives a restart.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use crate::state::{Change, MeshSettings, NodeRecord, Snapshot, TokenRecord};
use meshd_proto::{NodeId, NodeKey};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or refused the write (disk full, server
    /// down). Nothing of the failed commit was written. The text says why,
    /// in the database's words.
    #[error("the state database is unavailable: {0}")]
    Unavailable(String),
    /// Another coordinator replica wrote one of the records first (the commit
    /// was decided from an older version), or a uniqueness rule was broken by
    /// such a write. Nothing was written; deciding again on the records as
    /// stored now ([`Store::read`]) will succeed or fail cleanly.
    #[error("conflicting write: {0}")]
    Conflict(String),
    /// The stored data is not something this version understands.
    #[error("state store is corrupt or from a newer meshd: {0}")]
    Corrupt(String),
}

/// A record a decision rests on, to be read again from the store when the
/// coordinator's copy may be out of date: after a conflicting commit, or
/// before refusing something because of what another replica may have
/// changed meanwhile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Node(NodeId),
    NodeByKey(NodeKey),
    NodeByName(String),
    NodeByIpv4(Ipv4Addr),
    Token(String),
    TokenByHash([u8; 32]),
}

impl Lookup {
    /// What a commit of `changes` may have conflicted with: the records it
    /// wrote and, for a new node, the nodes holding its key, name or address.
    pub fn for_changes(changes: &[Change]) -> Vec<Lookup> {
        let mut out = Vec::new();
        for c in changes {
            match c {
                Change::Settings(_) => {}
                Change::PutNode(n) => {
                    out.push(Lookup::Node(n.id));
                    out.push(Lookup::NodeByKey(n.key));
                    out.push(Lookup::NodeByName(n.name.clone()));
                    out.push(Lookup::NodeByIpv4(n.ipv4));
                }
                Change::DeleteNode { id, .. } => out.push(Lookup::Node(*id)),
                Change::PutToken(t) => {
                    out.push(Lookup::Token(t.id.clone()));
                    out.push(Lookup::TokenByHash(t.secret_hash));
                }
                Change::DeleteToken { id, .. } => out.push(Lookup::Token(id.clone())),
            }
        }
        out
    }
}

/// Where the coordinator's records live. `commit` is all-or-nothing: after an
/// error none of `changes` is visible, after success all of them are. Each
/// change is checked against the stored version as [`Change`] says.
pub trait Store: Send {
    fn load(&mut self) -> Result<Snapshot, StoreError>;
    fn commit(&mut self, changes: &[Change]) -> Result<(), StoreError>;
    /// The records `lookups` name, as stored now, read in one transaction:
    /// for [`Lookup::Node`] and [`Lookup::Token`] the record or, if there is
    /// none, a delete; for the others the record that matches, if any.
    fn read(&mut self, lookups: &[Lookup]) -> Result<Vec<Change>, StoreError>;
    /// Changes written by other coordinator replicas since the last call, as
    /// the records now stored (idempotent to apply). Single-writer stores
    /// return nothing.
    fn poll_remote(&mut self) -> Result<Vec<Change>, StoreError> {
        Ok(Vec::new())
    }
}

/// The conflict of a write whose record is not at the version it was
/// decided from.
fn stale(change: &Change) -> StoreError {
    StoreError::Conflict(match change {
        Change::Settings(_) => "mesh settings changed".to_owned(),
        Change::PutNode(n) if n.version == 1 => format!("node {} exists already", n.id),
        Change::PutNode(NodeRecord { id, .. }) | Change::DeleteNode { id, .. } => {
            format!("node {id} was changed or deleted meanwhile")
        }
        Change::PutToken(t) if t.version == 1 => format!("token {} exists already", t.id),
        Change::PutToken(TokenRecord { id, .. }) | Change::DeleteToken { id, .. } => {
            format!("token {id} was changed or deleted meanwhile")
        }
    })
}

/// A store in memory, for tests and benchmarks. It checks versions as the
/// database stores do, but not uniqueness (its one writer never breaks it).
/// `fail_commits` makes every commit fail as if the database were down.
#[derive(Debug, Default, Clone)]
pub struct MemStore {
    pub settings: Option<MeshSettings>,
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    pub tokens: BTreeMap<String, TokenRecord>,
    pub fail_commits: bool,
    pub commits: usize,
}

/// Whether a write decided from `version` may replace what is stored at
/// `stored` (`None`: nothing is stored).
fn version_ok(stored: Option<u64>, version: u64) -> bool {
    match stored {
        None => version == 1,
        Some(v) => version > 1 && v == version - 1,
    }
}

impl MemStore {
    fn check(&self, change: &Change) -> Result<(), StoreError> {
        let ok = match change {
            Change::Settings(_) => true,
            Change::PutNode(n) => version_ok(self.nodes.get(&n.id).map(|s| s.version), n.version),
            Change::DeleteNode { id, version } => {
                self.nodes.get(id).is_some_and(|s| s.version == *version)
            }
            Change::PutToken(t) => version_ok(self.tokens.get(&t.id).map(|s| s.version), t.version),
            Change::DeleteToken { id, version } => {
                self.tokens.get(id).is_some_and(|s| s.version == *version)
            }
        };
        if ok {
            Ok(())
        } else {
            Err(stale(change))
        }
    }
}

impl Store for MemStore {
    fn load(&mut self) -> Result<Snapshot, StoreError> {
        Ok(Snapshot {
            settings: self.settings.clone(),
            nodes: self.nodes.values().cloned().collect(),
            tokens: self.tokens.values().cloned().collect(),
        })
    }

    fn commit(&mut self, changes: &[Change]) -> Result<(), StoreError> {
        if self.fail_commits {
            return Err(StoreError::Unavailable("memory store set to fail".into()));
        }
        // The changes of one commit touch different records, so each can be
        // checked against what is stored before any is applied.
        for c in changes {
            self.check(c)?;
        }
        for c in changes {
            match c {
                Change::Settings(s) => {
                    self.settings.get_or_insert_with(|| s.clone());
                }
                Change::PutNode(n) => {
                    self.nodes.insert(n.id, n.clone());
                }
                Change::DeleteNode { id, .. } => {
                    self.nodes.remove(id);
                }
                Change::PutToken(t) => {
                    self.tokens.insert(t.id.clone(), t.clone());
                }
                Change::DeleteToken { id, .. } => {
                    self.tokens.remove(id);
                }
            }
        }
        self.commits += 1;
        Ok(())
    }

    fn read(&mut self, lookups: &[Lookup]) -> Result<Vec<Change>, StoreError> {
        let node = |n: Option<&NodeRecord>| n.cloned().map(Change::PutNode);
        Ok(lookups
            .iter()
            .filter_map(|l| match l {
                Lookup::Node(id) => Some(self.nodes.get(id).cloned().map_or(
                    Change::DeleteNode {
                        id: *id,
                        version: 0,
                    },
                    Change::PutNode,
                )),
                Lookup::NodeByKey(k) => node(self.nodes.values().find(|n| n.key == *k)),
                Lookup::NodeByName(s) => node(self.nodes.values().find(|n| n.name == *s)),
                Lookup::NodeByIpv4(a) => node(self.nodes.values().find(|n| n.ipv4 == *a)),
                Lookup::Token(id) => Some(self.tokens.get(id).cloned().map_or(
                    Change::DeleteToken {
                        id: id.clone(),
                        version: 0,
                    },
                    Change::PutToken,
                )),
                Lookup::TokenByHash(h) => self
                    .tokens
                    .values()
                    .find(|t| t.secret_hash == *h)
                    .cloned()
                    .map(Change::PutToken),
            })
            .collect())
    }
}

/// A shared handle, so a test can keep looking at (and breaking) the store the
/// coordinator writes to.
impl<S: Store> Store for std::sync::Arc<std::sync::Mutex<S>> {
    fn load(&mut self) -> Result<Snapshot, StoreError> {
        self.lock()
            .map_err(|_| StoreError::Unavailable("store lock poisoned".into()))?
            .load()
    }
    fn commit(&mut self, changes: &[Change]) -> Result<(), StoreError> {
        self.lock()
            .map_err(|_| StoreError::Unavailable("store lock poisoned".into()))?
            .commit(changes)
    }
    fn read(&mut self, lookups: &[Lookup]) -> Result<Vec<Change>, StoreError> {
        self.lock()
            .map_err(|_| StoreError::Unavailable("store lock poisoned".into()))?
            .read(lookups)
    }
    fn poll_remote(&mut self) -> Result<Vec<Change>, StoreError> {
        self.lock()
            .map_err(|_| StoreError::Unavailable("store lock poisoned".into()))?
            .poll_remote()
    }
}

mod pg;
mod pgpass;
mod rows;
mod sqlite;

pub use pg::PgStore;
pub use sqlite::SqliteStore;
