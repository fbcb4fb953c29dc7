//! Durable state behind one trait: the coordinator calls [`Store::commit`]
//! with every change before it acts on it, so what it tells nodes is never
//! ahead of what survives a restart.

use std::collections::BTreeMap;

use crate::state::{Change, MeshSettings, NodeRecord, Snapshot, TokenRecord};
use meshd_proto::NodeId;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or refused the write (disk full, server
    /// down). Nothing of the failed commit was written.
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    /// A uniqueness rule was broken, typically by a concurrent write from
    /// another coordinator replica. Nothing was written; retrying after the
    /// other write has been applied will succeed or fail cleanly.
    #[error("conflicting write: {0}")]
    Conflict(String),
    /// The stored data is not something this version understands.
    #[error("state store is corrupt or from a newer meshd: {0}")]
    Corrupt(String),
}

/// Where the coordinator's records live. `commit` is all-or-nothing: after an
/// error none of `changes` is visible, after success all of them are.
pub trait Store: Send {
    fn load(&mut self) -> Result<Snapshot, StoreError>;
    fn commit(&mut self, changes: &[Change]) -> Result<(), StoreError>;
    /// Changes written by other coordinator replicas since the last call, as
    /// the records now stored (idempotent to apply). Single-writer stores
    /// return nothing.
    fn poll_remote(&mut self) -> Result<Vec<Change>, StoreError> {
        Ok(Vec::new())
    }
    /// Makes the next [`Store::poll_remote`] return everything stored, not
    /// only what notifications named: after a conflicting write, whose cause
    /// may not have been announced yet.
    fn request_resync(&mut self) {}
}

/// A store in memory, for tests and benchmarks. `fail_commits` makes every
/// commit fail as if the database were down.
#[derive(Debug, Default, Clone)]
pub struct MemStore {
    pub settings: Option<MeshSettings>,
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    pub tokens: BTreeMap<String, TokenRecord>,
    pub fail_commits: bool,
    pub commits: usize,
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
        for c in changes {
            match c {
                Change::Settings(s) => self.settings = Some(s.clone()),
                Change::PutNode(n) => {
                    self.nodes.insert(n.id, n.clone());
                }
                Change::DeleteNode(id) => {
                    self.nodes.remove(id);
                }
                Change::PutToken(t) => {
                    self.tokens.insert(t.id.clone(), t.clone());
                }
                Change::DeleteToken(id) => {
                    self.tokens.remove(id);
                }
            }
        }
        self.commits += 1;
        Ok(())
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
    fn poll_remote(&mut self) -> Result<Vec<Change>, StoreError> {
        self.lock()
            .map_err(|_| StoreError::Unavailable("store lock poisoned".into()))?
            .poll_remote()
    }
    fn request_resync(&mut self) {
        if let Ok(mut s) = self.lock() {
            s.request_resync();
        }
    }
}

mod pg;
mod rows;
mod sqlite;

pub use pg::PgStore;
pub use sqlite::SqliteStore;
