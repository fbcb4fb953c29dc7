//! The node's state directory (default `/var/lib/meshd`, mode 0700):
//!
//! | file | holds |
//! |---|---|
//! | `node.key` | the WireGuard private key (0600, `wg genkey` form); never leaves the node |
//! | `node.key.next` | the key of a rotation not yet confirmed by the coordinator |
//! | `node.toml` | the coordinator's addresses and certificate pin, the node's record (id, name, addresses) once registered, its UDP port |
//! | `peers.toml` | the last peer map, so tunnels come up before the coordinator answers |
//! | `relays.toml` | the last relay map, so relayed paths come back before it answers |
//! | `control.sock` | the running daemon's control socket (0600) |
//!
//! The join token's secret is never written: once registered, the node
//! logs in with its key. Every file is replaced atomically (written to a
//! temporary file, synced, renamed), so a crash leaves the old or the new
//! version.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use meshd_proto::token::{Hex, JoinToken};
use meshd_proto::{NodeId, NodeInfo, NodeKey, Peer, RelayEntry, RelayInfo};
use serde::{Deserialize, Serialize};

use meshd_dataplane::keys::{self, KeyError, PrivateKey, PublicKey};

pub const DEFAULT_STATE_DIR: &str = "/var/lib/meshd";

const KEY_FILE: &str = "node.key";
const PENDING_KEY_FILE: &str = "node.key.next";
const NODE_FILE: &str = "node.toml";
const PEERS_FILE: &str = "peers.toml";
const RELAYS_FILE: &str = "relays.toml";
const SOCKET_FILE: &str = "control.sock";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error(transparent)]
    Key(#[from] KeyError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where the coordinator is and how to recognise it (from the join token,
/// without its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorFile {
    pub addresses: Vec<String>,
    /// SHA-256 of its certificate, hex.
    pub pin: String,
}

impl CoordinatorFile {
    pub fn from_token(token: &JoinToken) -> Self {
        CoordinatorFile {
            addresses: token.addresses.clone(),
            pin: Hex(&token.cert_pin).to_string(),
        }
    }

    pub fn pin_bytes(&self) -> Option<[u8; 32]> {
        Hex::parse32(&self.pin)
    }
}

/// The node's record as the coordinator gave it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecordFile {
    pub id: u64,
    pub name: String,
    pub ipv4: String,
    pub ipv6: String,
    pub mesh_ipv4: String,
    pub mesh_ipv6: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    #[serde(default)]
    pub tags: Vec<String>,
}

impl NodeRecordFile {
    pub fn from_info(info: &NodeInfo) -> Self {
        NodeRecordFile {
            id: info.node_id.0,
            name: info.name.clone(),
            ipv4: info.ipv4.to_string(),
            ipv6: info.ipv6.to_string(),
            mesh_ipv4: info.mesh_ipv4.to_string(),
            mesh_ipv6: info.mesh_ipv6.to_string(),
            expires_at: info.expires_at,
            tags: info.tags.clone(),
        }
    }

    pub fn to_info(&self) -> Option<NodeInfo> {
        Some(NodeInfo {
            node_id: NodeId(self.id),
            name: self.name.clone(),
            ipv4: self.ipv4.parse().ok()?,
            ipv6: self.ipv6.parse().ok()?,
            mesh_ipv4: self.mesh_ipv4.parse().ok()?,
            mesh_ipv6: self.mesh_ipv6.parse().ok()?,
            expires_at: self.expires_at,
            tags: self.tags.clone(),
        })
    }
}

/// `node.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    /// The UDP port the data plane used last, reused so peers' endpoints
    /// stay right across restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_port: Option<u16>,
    pub coordinator: CoordinatorFile,
    /// Present once the coordinator accepted the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeRecordFile>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PeerFile {
    id: u64,
    name: String,
    key: String,
    ipv4: String,
    ipv6: String,
    #[serde(default)]
    endpoints: Vec<String>,
    #[serde(default)]
    tags: Vec<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct PeersFile {
    #[serde(default)]
    peer: Vec<PeerFile>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RelayFile {
    id: u64,
    name: String,
    key: String,
    region: String,
    addrs: Vec<String>,
    stun_port: u16,
    /// SHA-256 of its certificate, hex.
    pin: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct RelaysFile {
    #[serde(default)]
    relay: Vec<RelayFile>,
}

/// What a first join may leave behind, noted before it starts: when it
/// fails, [`FirstJoin::undo`] removes the key and `node.toml` it made and,
/// if the directory was made for it, the directory, so a failed
/// `meshd up --token` leaves no half-joined node.
#[derive(Debug)]
pub struct FirstJoin {
    dir: StateDir,
    dir_existed: bool,
    made: Vec<PathBuf>,
}

impl FirstJoin {
    /// `None` when the node has joined already.
    pub fn note(path: &Path) -> Option<FirstJoin> {
        let dir = StateDir::at(path);
        if dir.joined() {
            return None;
        }
        let made = [KEY_FILE, NODE_FILE]
            .iter()
            .map(|f| dir.file(f))
            .filter(|p| !p.exists())
            .collect();
        Some(FirstJoin {
            dir_existed: path.exists(),
            dir,
            made,
        })
    }

    /// Removes what the failed join made. `keep_log`: the directory stays
    /// when the daemon's log in it is where the user must look.
    pub fn undo(self, keep_log: bool) {
        if self.dir.joined() {
            return;
        }
        for path in &self.made {
            let _ = fs::remove_file(path);
        }
        if !self.dir_existed && !keep_log {
            let _ = fs::remove_dir_all(self.dir.path());
        }
    }
}

#[derive(Debug, Clone)]
pub struct StateDir {
    path: PathBuf,
}

impl StateDir {
    /// Opens the directory, creating it with mode 0700.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(io_err(path))?;
        Ok(StateDir {
            path: path.to_owned(),
        })
    }

    /// The directory without creating it (for clients of a running daemon).
    pub fn at(path: &Path) -> Self {
        StateDir {
            path: path.to_owned(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn socket_path(&self) -> PathBuf {
        self.path.join(SOCKET_FILE)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// The node's key, generated (OS RNG) and saved 0600 on first use;
    /// `true` when it was created now.
    pub fn load_or_create_key(&self) -> Result<(PrivateKey, bool), StateError> {
        let path = self.file(KEY_FILE);
        match keys::load_private_key(&path) {
            Ok(k) => Ok((k, false)),
            Err(KeyError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                let key = PrivateKey::generate();
                keys::save_private_key(&path, &key)?;
                tracing::info!(public_key = %key.public_key(), "created the node's key pair");
                Ok((key, true))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn load_pending_key(&self) -> Result<Option<PrivateKey>, StateError> {
        match keys::load_private_key(&self.file(PENDING_KEY_FILE)) {
            Ok(k) => Ok(Some(k)),
            Err(KeyError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn save_pending_key(&self, key: &PrivateKey) -> Result<(), StateError> {
        keys::save_private_key(&self.file(PENDING_KEY_FILE), key)?;
        Ok(())
    }

    /// Makes the pending key the node's key (one rename) and returns it.
    pub fn promote_pending_key(&self) -> Result<PrivateKey, StateError> {
        let from = self.file(PENDING_KEY_FILE);
        let key = keys::load_private_key(&from)?;
        let to = self.file(KEY_FILE);
        fs::rename(&from, &to).map_err(io_err(&to))?;
        self.sync_dir();
        Ok(key)
    }

    pub fn discard_pending_key(&self) -> Result<(), StateError> {
        let path = self.file(PENDING_KEY_FILE);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(&path)(e)),
            _ => Ok(()),
        }
    }

    /// Whether the coordinator has accepted this node (its record is saved).
    fn joined(&self) -> bool {
        self.load_node()
            .is_ok_and(|n| n.is_some_and(|n| n.node.is_some()))
    }

    pub fn load_node(&self) -> Result<Option<NodeFile>, StateError> {
        let path = self.file(NODE_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        toml::from_str(&text)
            .map(Some)
            .map_err(|e| StateError::Parse {
                path,
                message: e.message().to_owned(),
            })
    }

    pub fn save_node(&self, node: &NodeFile) -> Result<(), StateError> {
        self.write_toml(NODE_FILE, node)
    }

    fn write_toml(&self, name: &str, value: &impl Serialize) -> Result<(), StateError> {
        let path = self.file(name);
        let text = toml::to_string(value).map_err(|e| StateError::Parse {
            path: path.clone(),
            message: e.to_string(),
        })?;
        self.write_atomic(&path, text.as_bytes())
    }

    /// A cache file: missing or unreadable is empty (a cache is only a head
    /// start: the coordinator sends the real thing), with a warning if broken.
    fn read_cache<T: serde::de::DeserializeOwned + Default>(&self, name: &str) -> T {
        let path = self.file(name);
        let Ok(text) = fs::read_to_string(&path) else {
            return T::default();
        };
        toml::from_str(&text).unwrap_or_else(|e: toml::de::Error| {
            tracing::warn!(path = %path.display(), error = %e.message(), "ignoring a broken cache");
            T::default()
        })
    }

    /// The cached peer map; a missing or unreadable cache is an empty map
    /// (it is only a head start: the coordinator sends the real one).
    pub fn load_peers(&self) -> BTreeMap<NodeId, Peer> {
        let file: PeersFile = self.read_cache(PEERS_FILE);
        file.peer
            .into_iter()
            .filter_map(|p| {
                let key: PublicKey = p.key.parse().ok()?;
                Some(Peer {
                    node_id: NodeId(p.id),
                    node_key: NodeKey(*key.as_bytes()),
                    name: p.name,
                    ipv4: p.ipv4.parse().ok()?,
                    ipv6: p.ipv6.parse().ok()?,
                    endpoints: p.endpoints.iter().filter_map(|e| e.parse().ok()).collect(),
                    tags: p.tags,
                })
            })
            .map(|p| (p.node_id, p))
            .collect()
    }

    pub fn save_peers(&self, peers: &BTreeMap<NodeId, Peer>) -> Result<(), StateError> {
        let file = PeersFile {
            peer: peers
                .values()
                .map(|p| PeerFile {
                    id: p.node_id.0,
                    name: p.name.clone(),
                    key: p.node_key.to_string(),
                    ipv4: p.ipv4.to_string(),
                    ipv6: p.ipv6.to_string(),
                    endpoints: p.endpoints.iter().map(ToString::to_string).collect(),
                    tags: p.tags.clone(),
                })
                .collect(),
        };
        self.write_toml(PEERS_FILE, &file)
    }

    /// The cached relay map.
    pub fn load_relays(&self) -> Vec<RelayEntry> {
        let file: RelaysFile = self.read_cache(RELAYS_FILE);
        file.relay
            .into_iter()
            .filter_map(|r| {
                let key: PublicKey = r.key.parse().ok()?;
                let pin = Hex::parse32(&r.pin)?;
                Some(RelayEntry {
                    node_id: NodeId(r.id),
                    key: NodeKey(*key.as_bytes()),
                    name: r.name,
                    info: RelayInfo {
                        region: r.region,
                        addrs: r.addrs.iter().filter_map(|a| a.parse().ok()).collect(),
                        stun_port: r.stun_port,
                        cert_pin: pin,
                    },
                })
            })
            .collect()
    }

    pub fn save_relays(&self, relays: &[RelayEntry]) -> Result<(), StateError> {
        let file = RelaysFile {
            relay: relays
                .iter()
                .map(|r| RelayFile {
                    id: r.node_id.0,
                    name: r.name.clone(),
                    key: r.key.to_string(),
                    region: r.info.region.clone(),
                    addrs: r.info.addrs.iter().map(ToString::to_string).collect(),
                    stun_port: r.info.stun_port,
                    pin: Hex(&r.info.cert_pin).to_string(),
                })
                .collect(),
        };
        self.write_toml(RELAYS_FILE, &file)
    }

    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<(), StateError> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let write = || -> io::Result<()> {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.set_permissions(fs::Permissions::from_mode(0o600))?;
            f.write_all(bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, path)
        };
        write().map_err(io_err(path))?;
        self.sync_dir();
        Ok(())
    }

    /// Makes renames durable; best effort (a failure only weakens that).
    fn sync_dir(&self) {
        if let Ok(d) = fs::File::open(&self.path) {
            let _ = d.sync_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relay_map_round_trips_and_a_broken_cache_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        assert!(state.load_relays().is_empty());
        let relays = vec![RelayEntry {
            node_id: NodeId(7),
            key: NodeKey([3; 32]),
            name: "relay-eu".into(),
            info: RelayInfo {
                region: "eu".into(),
                addrs: vec![
                    "198.18.2.2:443".parse().unwrap(),
                    "[2001:db8::2]:443".parse().unwrap(),
                ],
                stun_port: 3478,
                cert_pin: [9; 32],
            },
        }];
        state.save_relays(&relays).unwrap();
        assert_eq!(state.load_relays(), relays);
        fs::write(dir.path().join(RELAYS_FILE), "relay = 3").unwrap();
        assert!(state.load_relays().is_empty());
    }

    #[test]
    fn key_is_created_once_0600_and_promoted_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(&dir.path().join("s")).unwrap();
        let mode = fs::metadata(state.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let (k1, created) = state.load_or_create_key().unwrap();
        assert!(created);
        let (k2, created) = state.load_or_create_key().unwrap();
        assert!(!created);
        assert_eq!(k1.public_key(), k2.public_key());
        let mode = fs::metadata(state.file(KEY_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);

        assert!(state.load_pending_key().unwrap().is_none());
        let next = PrivateKey::generate();
        state.save_pending_key(&next).unwrap();
        assert_eq!(
            state.load_pending_key().unwrap().unwrap().public_key(),
            next.public_key()
        );
        assert_eq!(
            state.promote_pending_key().unwrap().public_key(),
            next.public_key()
        );
        assert!(state.load_pending_key().unwrap().is_none());
        assert_eq!(
            state.load_or_create_key().unwrap().0.public_key(),
            next.public_key()
        );
        state.save_pending_key(&PrivateKey::generate()).unwrap();
        state.discard_pending_key().unwrap();
        state.discard_pending_key().unwrap();
        assert!(state.load_pending_key().unwrap().is_none());
    }

    #[test]
    fn node_file_and_peer_cache_round_trip_without_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        assert_eq!(state.load_node().unwrap(), None);
        let info = NodeInfo {
            node_id: NodeId(4),
            name: "edge1".into(),
            ipv4: "100.64.0.4".parse().unwrap(),
            ipv6: "fd00:1:2::4".parse().unwrap(),
            mesh_ipv4: "100.64.0.0/10".parse().unwrap(),
            mesh_ipv6: "fd00:1:2::/48".parse().unwrap(),
            expires_at: Some(99),
            tags: vec!["tag:edge".into()],
        };
        let token = JoinToken {
            secret: meshd_proto::TokenSecret([0xab; 32]),
            cert_pin: [7; 32],
            addresses: vec!["192.0.2.1:443".into(), "coord.example:443".into()],
        };
        let node = NodeFile {
            listen_port: Some(41641),
            coordinator: CoordinatorFile::from_token(&token),
            node: Some(NodeRecordFile::from_info(&info)),
        };
        state.save_node(&node).unwrap();
        assert_eq!(state.load_node().unwrap().as_ref(), Some(&node));
        let loaded = state.load_node().unwrap().unwrap();
        assert_eq!(loaded.coordinator.pin_bytes(), Some([7; 32]));
        assert_eq!(loaded.node.unwrap().to_info(), Some(info));
        let text = fs::read_to_string(state.file(NODE_FILE)).unwrap();
        assert!(
            !text.contains("abab"),
            "the token secret was stored:\n{text}"
        );

        let peers: BTreeMap<NodeId, Peer> = [Peer {
            node_id: NodeId(9),
            node_key: NodeKey([3; 32]),
            name: "n9".into(),
            ipv4: "100.64.0.9".parse().unwrap(),
            ipv6: "fd00:1:2::9".parse().unwrap(),
            endpoints: vec!["198.18.2.2:41641".parse().unwrap()],
            tags: vec![],
        }]
        .into_iter()
        .map(|p| (p.node_id, p))
        .collect();
        state.save_peers(&peers).unwrap();
        assert_eq!(state.load_peers(), peers);
        fs::write(state.file(PEERS_FILE), "peer = 3").unwrap();
        assert!(state.load_peers().is_empty());
    }

    #[test]
    fn a_damaged_node_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        fs::write(state.file(NODE_FILE), "coordinator = 5\n").unwrap();
        let err = state.load_node().unwrap_err().to_string();
        assert!(err.contains("node.toml"), "{err}");
        assert_eq!(
            CoordinatorFile {
                addresses: vec![],
                pin: "zz".into()
            }
            .pin_bytes(),
            None
        );
    }
}
