//! What the coordinator knows: mesh settings, nodes and tokens, as records a
//! [`crate::Store`] persists, and the in-memory indexes built from them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::{Ipv4Net, Ipv6Net};
use meshd_proto::{NodeId, NodeKey, RelayInfo};

/// The mesh's IPv4 range: the shared address space of RFC 6598.
pub const MESH_IPV4: Ipv4Net = match Ipv4Net::new(Ipv4Addr::new(100, 64, 0, 0), 10) {
    Ok(n) => n,
    Err(_) => panic!("100.64.0.0/10 is a valid prefix"),
};

/// Settings chosen once, when the mesh is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshSettings {
    /// The mesh's ULA /48 (RFC 4193: `fd` and 40 random bits).
    pub ipv6_prefix: Ipv6Net,
    /// Unix milliseconds.
    pub created_at: u64,
}

/// One registered node. Times are Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    pub id: NodeId,
    pub name: String,
    pub key: NodeKey,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub tags: Vec<String>,
    pub slice: Option<String>,
    pub ephemeral: bool,
    /// The token it joined with (its id, not its secret).
    pub token_id: String,
    pub created_at: u64,
    /// After this the node is dropped from every peer map and must register again.
    pub expires_at: Option<u64>,
    pub endpoints: Vec<SocketAddr>,
    /// When its last session ended; `None` while a session is open.
    pub disconnected_at: Option<u64>,
    /// A random id of the control session that logged it in last, on
    /// whichever replica; `None` once that session ended. A replica whose
    /// session closes records the disconnect only if it is still this one.
    pub session: Option<u64>,
    /// Counts the writes of this record, from 1 when it was created; a
    /// store refuses a write made from an older version (see [`Change`]).
    pub version: u64,
    /// Set when this is a relay (`meshd relay`), not a node: how nodes reach it.
    pub relay: Option<RelayInfo>,
}

impl NodeRecord {
    pub fn is_expired(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }
}

/// A join token. Only a hash of the secret is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// Short public name of the token (16 hex digits), for listing and revoking.
    pub id: String,
    pub secret_hash: [u8; 32],
    pub reusable: bool,
    pub ephemeral: bool,
    pub tags: Vec<String>,
    pub slice: Option<String>,
    pub created_at: u64,
    pub expires_at: Option<u64>,
    pub revoked: bool,
    pub uses: u64,
    /// Counts the writes of this record, as [`NodeRecord::version`].
    pub version: u64,
}

/// Whether a join token can still be used, and if not, why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenState {
    Valid,
    Revoked,
    Expired,
    /// A one-time token that was used.
    Used,
}

impl TokenRecord {
    /// The token's state at `now` (Unix milliseconds). Revocation counts
    /// first, then expiry, then use.
    pub fn state(&self, now: u64) -> TokenState {
        if self.revoked {
            TokenState::Revoked
        } else if self.expires_at.is_some_and(|e| e <= now) {
            TokenState::Expired
        } else if !self.reusable && self.uses > 0 {
            TokenState::Used
        } else {
            TokenState::Valid
        }
    }
}

/// One durable change. A [`crate::Store`] applies a slice of them atomically.
///
/// Written by a coordinator, each change states the version it was decided
/// from, so a replica never overwrites what another wrote meanwhile: a
/// record of version 1 is created and must not exist yet; a record of version
/// `v > 1` replaces the stored one only if that is at `v - 1`; a delete
/// removes the stored record only if it is at `version`. Otherwise the whole
/// commit fails with [`crate::StoreError::Conflict`], and the coordinator
/// reads the records again and decides again.
///
/// Read from a store ([`crate::Store::poll_remote`], [`crate::Store::read`]),
/// a change is what is stored now, applied to memory as it is; a delete read
/// back carries version 0 (nothing of the record is left).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Settings(MeshSettings),
    PutNode(NodeRecord),
    DeleteNode { id: NodeId, version: u64 },
    PutToken(TokenRecord),
    DeleteToken { id: String, version: u64 },
}

/// Everything a store holds, as loaded at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub settings: Option<MeshSettings>,
    pub nodes: Vec<NodeRecord>,
    pub tokens: Vec<TokenRecord>,
}

/// The records plus the indexes the coordinator looks things up by.
#[derive(Debug, Default)]
pub struct MeshState {
    pub settings: Option<MeshSettings>,
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    pub tokens: BTreeMap<String, TokenRecord>,
    by_key: BTreeMap<NodeKey, NodeId>,
    by_name: BTreeMap<String, NodeId>,
    by_hash: BTreeMap<[u8; 32], String>,
    /// IPv4 addresses in use, as offsets into [`MESH_IPV4`].
    used_v4: BTreeSet<u32>,
    /// Where the next IPv4 search starts: addresses are handed out in
    /// ascending order and the gaps left by deleted nodes are reused only
    /// after the range is exhausted, so a freed address does not come back soon.
    next_v4: u32,
}

impl MeshState {
    pub fn from_snapshot(s: Snapshot) -> Self {
        let mut state = MeshState {
            settings: s.settings,
            ..Default::default()
        };
        for n in s.nodes {
            state.put_node(n);
        }
        for t in s.tokens {
            state.put_token(t);
        }
        state
    }

    pub fn node_by_key(&self, key: &NodeKey) -> Option<&NodeRecord> {
        self.by_key.get(key).and_then(|id| self.nodes.get(id))
    }

    pub fn node_by_name(&self, name: &str) -> Option<&NodeRecord> {
        self.by_name.get(name).and_then(|id| self.nodes.get(id))
    }

    pub fn token_by_hash(&self, hash: &[u8; 32]) -> Option<&TokenRecord> {
        self.by_hash.get(hash).and_then(|id| self.tokens.get(id))
    }

    /// Applies one change; returns the node record it replaced or removed.
    pub fn apply(&mut self, change: &Change) -> Option<NodeRecord> {
        match change {
            Change::Settings(s) => {
                self.settings = Some(s.clone());
                None
            }
            Change::PutNode(n) => self.put_node(n.clone()),
            Change::DeleteNode { id, .. } => self.delete_node(*id),
            Change::PutToken(t) => {
                self.put_token(t.clone());
                None
            }
            Change::DeleteToken { id, .. } => {
                if let Some(t) = self.tokens.remove(id) {
                    self.by_hash.remove(&t.secret_hash);
                }
                None
            }
        }
    }

    fn put_node(&mut self, n: NodeRecord) -> Option<NodeRecord> {
        let old = self.delete_node(n.id);
        self.by_key.insert(n.key, n.id);
        self.by_name.insert(n.name.clone(), n.id);
        if let Some(off) = v4_offset(n.ipv4) {
            self.used_v4.insert(off);
            self.next_v4 = self.next_v4.max(off + 1);
        }
        self.nodes.insert(n.id, n);
        old
    }

    fn delete_node(&mut self, id: NodeId) -> Option<NodeRecord> {
        let old = self.nodes.remove(&id)?;
        self.by_key.remove(&old.key);
        self.by_name.remove(&old.name);
        if let Some(off) = v4_offset(old.ipv4) {
            self.used_v4.remove(&off);
        }
        Some(old)
    }

    fn put_token(&mut self, t: TokenRecord) {
        if let Some(old) = self.tokens.remove(&t.id) {
            self.by_hash.remove(&old.secret_hash);
        }
        self.by_hash.insert(t.secret_hash, t.id.clone());
        self.tokens.insert(t.id.clone(), t);
    }

    /// A free IPv4 address in 100.64.0.0/10, never one a node holds. The
    /// first and last addresses of the range are not used.
    pub fn free_ipv4(&self) -> Option<Ipv4Addr> {
        let size = 1u32 << (32 - MESH_IPV4.prefix_len());
        let usable = 1..size - 1;
        let free_from = |start: u32| {
            (start.max(usable.start)..usable.end).find(|off| !self.used_v4.contains(off))
        };
        let off = free_from(self.next_v4).or_else(|| free_from(usable.start))?;
        Some(Ipv4Addr::from(u32::from(MESH_IPV4.network()) + off))
    }

    /// The IPv6 address that goes with an IPv4 mesh address: the mesh's /48,
    /// zero subnet, and the IPv4 address in the last 32 bits. Unique because
    /// the IPv4 address is, and easy to read next to it.
    pub fn ipv6_for(&self, ipv4: Ipv4Addr) -> Option<Ipv6Addr> {
        let prefix = self.settings.as_ref()?.ipv6_prefix;
        let net = u128::from(prefix.network());
        Some(Ipv6Addr::from(net | u128::from(u32::from(ipv4))))
    }
}

fn v4_offset(ip: Ipv4Addr) -> Option<u32> {
    MESH_IPV4
        .contains(&ip)
        .then(|| u32::from(ip) - u32::from(MESH_IPV4.network()))
}
