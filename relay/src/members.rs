//! Who may use the relay: the mesh's current members, by key and role.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use meshd_proto::NodeKey;
use tokio::sync::watch;
use x25519_dalek::PublicKey;

/// What a member is to the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Role {
    /// A node: sends and receives packets.
    Node,
    /// Another relay of the mesh: exchanges presence and forwarded packets.
    Relay,
}

/// The members a relay admits, shared between whoever feeds it (the
/// coordinator's registration) and the relay's connections. Cheap to clone;
/// every change takes effect at once: a connection whose key is no longer a
/// member with the role it connected as is cut.
#[derive(Debug, Clone)]
pub struct Members {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    keys: RwLock<HashMap<NodeKey, Role>>,
    /// Bumped on every change; the server watches it.
    changed: watch::Sender<u64>,
}

impl Default for Members {
    fn default() -> Self {
        Self::new()
    }
}

impl Members {
    /// No members: everyone is refused until some are added.
    pub fn new() -> Self {
        Members {
            inner: Arc::new(Inner {
                keys: RwLock::new(HashMap::new()),
                changed: watch::Sender::new(0),
            }),
        }
    }

    /// Replaces the whole set (a fresh list from the coordinator).
    pub fn replace(&self, members: impl IntoIterator<Item = (PublicKey, Role)>) {
        let new = members
            .into_iter()
            .map(|(k, r)| (NodeKey(k.to_bytes()), r))
            .collect();
        *self.write() = new;
        self.bump();
    }

    pub fn insert(&self, key: PublicKey, role: Role) {
        self.write().insert(NodeKey(key.to_bytes()), role);
        self.bump();
    }

    /// Removes `key`; its connection, if any, is cut. `true` if it was a
    /// member.
    pub fn remove(&self, key: &PublicKey) -> bool {
        let was = self.write().remove(&NodeKey(key.to_bytes())).is_some();
        self.bump();
        was
    }

    pub fn role(&self, key: &PublicKey) -> Option<Role> {
        self.role_of(&NodeKey(key.to_bytes()))
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    pub(crate) fn role_of(&self, key: &NodeKey) -> Option<Role> {
        self.read().get(key).copied()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    fn bump(&self) {
        self.inner.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<NodeKey, Role>> {
        // Nothing panics while holding the lock; the map is always whole.
        self.inner
            .keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<NodeKey, Role>> {
        self.inner
            .keys
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }
}
