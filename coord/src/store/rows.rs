//! Records as table rows, shared by the SQL stores. Lists are stored as text
//! joined by a separator their items cannot contain: tags and names are DNS
//! labels (checked by the coordinator), socket addresses have no spaces.

use std::net::SocketAddr;

use meshd_proto::token::Hex;
use meshd_proto::{NodeId, NodeKey, RelayInfo};

use super::StoreError;
use crate::state::{MeshSettings, NodeRecord, TokenRecord};

pub(crate) struct NodeRow {
    pub id: i64,
    pub name: String,
    pub key: Vec<u8>,
    pub ipv4: String,
    pub ipv6: String,
    pub tags: String,
    pub slice: Option<String>,
    pub ephemeral: bool,
    pub token_id: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub endpoints: String,
    pub disconnected_at: Option<i64>,
    pub session: Option<i64>,
    pub version: i64,
    /// `region pin-hex stun-port addr…`, space-separated; `None` for a node.
    pub relay: Option<String>,
}

pub(crate) struct TokenRow {
    pub id: String,
    pub secret_hash: Vec<u8>,
    pub reusable: bool,
    pub ephemeral: bool,
    pub tags: String,
    pub slice: Option<String>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked: bool,
    pub uses: i64,
    pub version: i64,
}

pub(crate) struct SettingsRow {
    pub ipv6_prefix: String,
    pub created_at: i64,
}

fn corrupt(what: &str, detail: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {detail}"))
}

/// Times, ids and versions are below 2^63 by construction (Unix milliseconds;
/// node and session ids are 63-bit), so they fit SQL's signed 64-bit integers.
pub(crate) fn to_sql(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| corrupt("value out of range for the database", v))
}

fn from_sql(v: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| corrupt(what, "negative"))
}

fn opt_to_sql(v: Option<u64>) -> Result<Option<i64>, StoreError> {
    v.map(to_sql).transpose()
}

fn opt_from_sql(v: Option<i64>, what: &str) -> Result<Option<u64>, StoreError> {
    v.map(|v| from_sql(v, what)).transpose()
}

fn join(items: &[String]) -> String {
    items.join("\n")
}

fn split(s: &str) -> Vec<String> {
    s.split('\n')
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect()
}

fn hash32(v: &[u8], what: &str) -> Result<[u8; 32], StoreError> {
    v.try_into().map_err(|_| corrupt(what, "not 32 bytes"))
}

fn relay_to_text(r: &RelayInfo) -> String {
    let mut s = format!("{} {} {}", r.region, Hex(&r.cert_pin), r.stun_port);
    for a in &r.addrs {
        s.push(' ');
        s.push_str(&a.to_string());
    }
    s
}

fn relay_from_text(s: &str) -> Result<RelayInfo, StoreError> {
    let bad = || corrupt("relay description", s);
    let mut parts = s.split(' ');
    let region = parts.next().filter(|r| !r.is_empty()).ok_or_else(bad)?;
    let cert_pin = parts.next().and_then(Hex::parse32).ok_or_else(bad)?;
    let stun_port = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let addrs = parts
        .map(|a| a.parse().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    Ok(RelayInfo {
        region: region.to_owned(),
        addrs,
        stun_port,
        cert_pin,
    })
}

impl NodeRow {
    pub fn from_record(n: &NodeRecord) -> Result<Self, StoreError> {
        Ok(NodeRow {
            id: to_sql(n.id.0)?,
            name: n.name.clone(),
            key: n.key.0.to_vec(),
            ipv4: n.ipv4.to_string(),
            ipv6: n.ipv6.to_string(),
            tags: join(&n.tags),
            slice: n.slice.clone(),
            ephemeral: n.ephemeral,
            token_id: n.token_id.clone(),
            created_at: to_sql(n.created_at)?,
            expires_at: opt_to_sql(n.expires_at)?,
            endpoints: n
                .endpoints
                .iter()
                .map(SocketAddr::to_string)
                .collect::<Vec<_>>()
                .join(" "),
            disconnected_at: opt_to_sql(n.disconnected_at)?,
            session: opt_to_sql(n.session)?,
            version: to_sql(n.version)?,
            relay: n.relay.as_ref().map(relay_to_text),
        })
    }

    pub fn into_record(self) -> Result<NodeRecord, StoreError> {
        let endpoints = self
            .endpoints
            .split(' ')
            .filter(|e| !e.is_empty())
            .map(|e| e.parse().map_err(|_| corrupt("node endpoint", e)))
            .collect::<Result<_, _>>()?;
        Ok(NodeRecord {
            id: NodeId(from_sql(self.id, "node id")?),
            key: NodeKey(hash32(&self.key, "node key")?),
            ipv4: self
                .ipv4
                .parse()
                .map_err(|_| corrupt("node ipv4", &self.ipv4))?,
            ipv6: self
                .ipv6
                .parse()
                .map_err(|_| corrupt("node ipv6", &self.ipv6))?,
            tags: split(&self.tags),
            slice: self.slice,
            ephemeral: self.ephemeral,
            token_id: self.token_id,
            created_at: from_sql(self.created_at, "node created_at")?,
            expires_at: opt_from_sql(self.expires_at, "node expires_at")?,
            endpoints,
            disconnected_at: opt_from_sql(self.disconnected_at, "node disconnected_at")?,
            session: opt_from_sql(self.session, "node session")?,
            version: from_sql(self.version, "node version")?,
            relay: self.relay.as_deref().map(relay_from_text).transpose()?,
            name: self.name,
        })
    }
}

impl TokenRow {
    pub fn from_record(t: &TokenRecord) -> Result<Self, StoreError> {
        Ok(TokenRow {
            id: t.id.clone(),
            secret_hash: t.secret_hash.to_vec(),
            reusable: t.reusable,
            ephemeral: t.ephemeral,
            tags: join(&t.tags),
            slice: t.slice.clone(),
            created_at: to_sql(t.created_at)?,
            expires_at: opt_to_sql(t.expires_at)?,
            revoked: t.revoked,
            uses: to_sql(t.uses)?,
            version: to_sql(t.version)?,
        })
    }

    pub fn into_record(self) -> Result<TokenRecord, StoreError> {
        Ok(TokenRecord {
            secret_hash: hash32(&self.secret_hash, "token hash")?,
            reusable: self.reusable,
            ephemeral: self.ephemeral,
            tags: split(&self.tags),
            slice: self.slice,
            created_at: from_sql(self.created_at, "token created_at")?,
            expires_at: opt_from_sql(self.expires_at, "token expires_at")?,
            revoked: self.revoked,
            uses: from_sql(self.uses, "token uses")?,
            version: from_sql(self.version, "token version")?,
            id: self.id,
        })
    }
}

impl SettingsRow {
    pub fn from_record(s: &MeshSettings) -> Result<Self, StoreError> {
        Ok(SettingsRow {
            ipv6_prefix: s.ipv6_prefix.to_string(),
            created_at: to_sql(s.created_at)?,
        })
    }

    pub fn into_record(self) -> Result<MeshSettings, StoreError> {
        Ok(MeshSettings {
            ipv6_prefix: self
                .ipv6_prefix
                .parse()
                .map_err(|_| corrupt("mesh ipv6 prefix", &self.ipv6_prefix))?,
            created_at: from_sql(self.created_at, "mesh created_at")?,
        })
    }
}
