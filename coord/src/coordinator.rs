//! The coordinator's core: sessions, registration, login, peer maps and their
//! deltas, token and node administration, expiry. No sockets and no clock:
//! time comes in as `now`, randomness from the RNG it is built with, and
//! durable state goes through the [`Store`] it owns.
//!
//! Calling order (the driver's loop): [`Coordinator::open_session`] when a
//! transport connects, [`Coordinator::handle_message`] for each decoded
//! message, [`Coordinator::close_session`] when a transport goes away,
//! [`Coordinator::handle_timeout`] when [`Coordinator::poll_timeout`] is due,
//! [`Coordinator::poll_store`] when the store signals remote changes; after
//! each, drain [`Coordinator::poll_action`]. `now` must not go backwards.
//!
//! Invariant: memory changes only after the store committed the change
//! (write-ahead), so nothing a node is told is lost by a crash or restart.
//!
//! Invariant: no decision that another replica may have changed is taken
//! from memory alone. Every write carries the version of the records it was
//! decided from ([`Change`]); when the store refuses it because another
//! replica wrote first, the records are read again and the decision is made
//! again ([`Coordinator::transact`]). A refusal that rests on records another
//! replica may have written (an unknown token or key, an expired node, a
//! taken name, a token used up) reads them again once before it is final.
//! Only a revocation, which nothing reverts, is taken from memory alone.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::Ipv6Net;
use meshd_proto::auth::{self, AuthError, ProofInput, Purpose};
use meshd_proto::token::{secret_hash, Hex};
use meshd_proto::{
    Challenge, ErrorCode, ErrorMessage, KeyRotated, Message, NodeId, NodeInfo, NodeKey, Peer,
    PeerMap, PolicyChanged, RelayEntry, RelayInfo, Sender, TokenSecret, MAX_ENDPOINTS,
    MAX_NAME_LEN, MAX_PEERS_PER_FRAME, MAX_RELAYS, MAX_TAGS, MAX_TAG_LEN,
};
use rand::RngCore;
use x25519_dalek::StaticSecret;

use crate::state::{
    Change, MeshSettings, MeshState, NodeRecord, TokenRecord, TokenState, MESH_IPV4,
};
use crate::store::{Lookup, Store, StoreError};
use crate::visibility::{can_see, filter_for, visible_peers};

/// A transport connection, numbered by the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionId(pub u64);

#[derive(Debug, Clone)]
pub struct Config {
    /// A session that has not sent Register or Login by then is closed.
    pub handshake_timeout: Duration,
    /// How long a registration lasts; `None`: until deleted. Renewed by a key
    /// rotation.
    pub node_expiry: Option<Duration>,
    /// An ephemeral node disconnected this long is deleted.
    pub ephemeral_timeout: Duration,
    /// True when no other coordinator shares the store (SQLite): then at start
    /// no node can still be connected anywhere, so every node counts as
    /// disconnected from then on.
    pub single_replica: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            handshake_timeout: Duration::from_secs(10),
            node_expiry: None,
            ephemeral_timeout: Duration::from_secs(300),
            single_replica: true,
        }
    }
}

/// What the driver must do.
// Actions are queued briefly and drained at once: boxing messages to keep
// `Close` small would cost an allocation per message for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Send {
        session: SessionId,
        message: Message,
    },
    /// Close the transport after sending what was queued before this.
    Close { session: SessionId },
}

/// How a new token behaves.
#[derive(Debug, Clone, Default)]
pub struct TokenSpec {
    /// Any number of nodes may join with it (otherwise exactly one).
    pub reusable: bool,
    /// Nodes that join with it are deleted after staying disconnected.
    pub ephemeral: bool,
    pub expires_in: Option<Duration>,
    /// `tag:name` labels given to every node that joins with it.
    pub tags: Vec<String>,
    /// The network slice its nodes belong to.
    pub slice: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no node with id {0}")]
    NoSuchNode(NodeId),
    #[error("no token with id {0}")]
    NoSuchToken(String),
    #[error("invalid name {0:?}: use 1-63 lowercase letters, digits and hyphens, not starting or ending with a hyphen")]
    InvalidName(String),
    #[error("invalid tag {0:?}: a tag is `tag:` followed by a name, at most {MAX_TAG_LEN} bytes")]
    InvalidTag(String),
    #[error("too many tags: at most {MAX_TAGS}")]
    TooManyTags,
    #[error("the name {0:?} is taken by another node")]
    NameTaken(String),
    #[error("the mesh's IPv4 range 100.64.0.0/10 is full")]
    AddressesExhausted,
}

/// How many times one operation is decided again after its write conflicted
/// with another replica's before it gives up.
const MAX_ATTEMPTS: usize = 5;

/// A refusal sent to a session before it is closed.
struct Reject {
    code: ErrorCode,
    message: String,
}

impl Reject {
    fn new(code: ErrorCode, msg: impl Into<String>) -> Self {
        Reject {
            code,
            message: msg.into(),
        }
    }
}

impl From<StoreError> for Reject {
    fn from(e: StoreError) -> Self {
        tracing::warn!(error = %e, "state store write failed");
        // The database's own words are for the operator (the log, the admin
        // API), not for nodes.
        let message = match e {
            StoreError::Conflict(_) => {
                "the coordinator's database is busy with conflicting writes; try again later"
            }
            _ => "the coordinator cannot save state: its database is unavailable; try again later",
        };
        Reject::new(ErrorCode::Unavailable, message)
    }
}

/// A refusal from a decision, with the records it rests on that another
/// replica may have changed: [`Coordinator::transact`] reads them again and
/// decides again once before the refusal stands.
struct Refused<E> {
    error: E,
    recheck: Vec<Lookup>,
}

impl<E> From<E> for Refused<E> {
    fn from(error: E) -> Self {
        Refused {
            error,
            recheck: Vec::new(),
        }
    }
}

/// A node's endpoints as reported, without repeats, at most [`MAX_ENDPOINTS`].
fn unique_endpoints(endpoints: Vec<std::net::SocketAddr>) -> Vec<std::net::SocketAddr> {
    let mut seen = BTreeSet::new();
    endpoints
        .into_iter()
        .filter(|e| seen.insert(*e))
        .take(MAX_ENDPOINTS)
        .collect()
}

fn unless_changed<E>(error: E, recheck: Vec<Lookup>) -> Refused<E> {
    Refused { error, recheck }
}

/// What a decision yields: the changes to commit (none: nothing to write)
/// and what the caller gets once they are committed.
type Decision<T, E> = Result<(Vec<Change>, T), Refused<E>>;

impl From<AuthError> for Reject {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::LowOrderKey(_) => Reject::new(ErrorCode::InvalidKey, e.to_string()),
            AuthError::BadProof | AuthError::BindingTooLong(_) => Reject::new(
                ErrorCode::BadProof,
                "proof of key possession does not verify: this node does not hold the private key it claims",
            ),
        }
    }
}

#[derive(Debug)]
enum SessionState {
    Handshake { deadline: u64 },
    Active(NodeId),
}

#[derive(Debug)]
struct Session {
    nonce: [u8; 32],
    binding: Vec<u8>,
    /// Random, 63 bits: what the node's record holds while this session is
    /// its current one ([`NodeRecord::session`]).
    tag: u64,
    state: SessionState,
}

pub struct Coordinator {
    config: Config,
    secret: StaticSecret,
    public: NodeKey,
    store: Box<dyn Store>,
    rng: Box<dyn RngCore + Send>,
    state: MeshState,
    sessions: BTreeMap<SessionId, Session>,
    /// The one active session of each connected node.
    session_of: BTreeMap<NodeId, SessionId>,
    next_session: u64,
    handshakes: BTreeSet<(u64, SessionId)>,
    expiries: BTreeSet<(u64, NodeId)>,
    ephemeral: BTreeSet<(u64, NodeId)>,
    actions: VecDeque<Action>,
    /// Writes refused because another replica wrote first.
    conflicts: u64,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("public", &self.public)
            .field("nodes", &self.state.nodes.len())
            .field("sessions", &self.sessions.len())
            .finish_non_exhaustive()
    }
}

/// Unix milliseconds; times before 1970 count as 0.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

fn add_ms(now: u64, d: Duration) -> u64 {
    now.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A DNS label: what node names must be, so they can be resolved in the mesh domain.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

fn valid_tag(tag: &str) -> bool {
    tag.len() <= MAX_TAG_LEN && tag.strip_prefix("tag:").is_some_and(valid_name)
}

impl Coordinator {
    /// Loads the state from `store`, creating the mesh (its ULA /48) on first
    /// start. `static_key` is the coordinator's X25519 key for proofs.
    pub fn new(
        config: Config,
        static_key: StaticSecret,
        mut store: Box<dyn Store>,
        mut rng: Box<dyn RngCore + Send>,
        now: SystemTime,
    ) -> Result<Self, StoreError> {
        let now = unix_ms(now);
        let mut snapshot = store.load()?;
        if snapshot.settings.is_none() {
            let settings = MeshSettings {
                ipv6_prefix: random_ula(&mut *rng),
                created_at: now,
            };
            store.commit(&[Change::Settings(settings.clone())])?;
            // Another replica may have created the mesh at the same moment;
            // the store keeps the first settings, so read back what won.
            snapshot = store.load()?;
            tracing::info!(ipv6_prefix = ?snapshot.settings.as_ref().map(|s| s.ipv6_prefix), "created a new mesh");
        }
        let state = MeshState::from_snapshot(snapshot);
        let mut c = Coordinator {
            public: auth::public_key(&static_key),
            secret: static_key,
            config,
            store,
            rng,
            state,
            sessions: BTreeMap::new(),
            session_of: BTreeMap::new(),
            next_session: 1,
            handshakes: BTreeSet::new(),
            expiries: BTreeSet::new(),
            ephemeral: BTreeSet::new(),
            actions: VecDeque::new(),
            conflicts: 0,
        };
        let nodes: Vec<NodeRecord> = c.state.nodes.values().cloned().collect();
        for n in &nodes {
            c.schedule(None, Some(n), now);
            if c.config.single_replica && n.ephemeral && n.disconnected_at.is_none() {
                let at = add_ms(now, c.config.ephemeral_timeout);
                c.ephemeral.insert((at, n.id));
            }
        }
        Ok(c)
    }

    pub fn public_key(&self) -> NodeKey {
        self.public
    }

    pub fn state(&self) -> &MeshState {
        &self.state
    }

    pub fn is_connected(&self, node: NodeId) -> bool {
        self.session_of.contains_key(&node)
    }

    /// How many writes the store refused because another replica had written
    /// the same records first (each was decided again).
    pub fn write_conflicts(&self) -> u64 {
        self.conflicts
    }

    /// A transport connected; its `Challenge` is queued. `channel_binding` is
    /// the TLS exporter output of the connection.
    pub fn open_session(&mut self, channel_binding: &[u8], now: SystemTime) -> SessionId {
        let id = SessionId(self.next_session);
        self.next_session += 1;
        let mut nonce = [0u8; 32];
        self.rng.fill_bytes(&mut nonce);
        let tag = self.rng.next_u64() >> 1;
        let deadline = add_ms(unix_ms(now), self.config.handshake_timeout);
        self.sessions.insert(
            id,
            Session {
                nonce,
                binding: channel_binding.to_vec(),
                tag,
                state: SessionState::Handshake { deadline },
            },
        );
        self.handshakes.insert((deadline, id));
        self.send(
            id,
            Message::Challenge(Challenge {
                coordinator_key: self.public,
                nonce,
            }),
        );
        id
    }

    /// The transport is gone (closed by either side).
    pub fn close_session(&mut self, session: SessionId, now: SystemTime) {
        self.end_session(session, unix_ms(now));
    }

    fn end_session(&mut self, session: SessionId, now: u64) {
        let Some(s) = self.sessions.remove(&session) else {
            return;
        };
        match s.state {
            SessionState::Handshake { deadline } => {
                self.handshakes.remove(&(deadline, session));
            }
            SessionState::Active(node) => {
                if self.session_of.get(&node) != Some(&session) {
                    return;
                }
                self.session_of.remove(&node);
                // Only if no later session (here or on another replica) has
                // taken over the node since.
                let recorded = self.transact::<_, StoreError>(now, |c| {
                    let Some(rec) = c.state.nodes.get(&node) else {
                        return Ok((vec![], ()));
                    };
                    if rec.session != Some(s.tag) {
                        return Ok((vec![], ()));
                    }
                    let mut rec = rec.clone();
                    rec.disconnected_at = Some(now);
                    rec.session = None;
                    rec.version += 1;
                    Ok((vec![Change::PutNode(rec)], ()))
                });
                if let Err(e) = recorded {
                    tracing::warn!(%node, error = %e, "could not record disconnect");
                }
                tracing::info!(%node, "node disconnected");
            }
        }
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Coordinator::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<SystemTime> {
        [
            self.handshakes.first().map(|e| e.0),
            self.expiries.first().map(|e| e.0),
            self.ephemeral.first().map(|e| e.0),
        ]
        .into_iter()
        .flatten()
        .min()
        .map(from_ms)
    }

    /// A frame from `session` did not decode: refuse and close.
    pub fn handle_decode_error(
        &mut self,
        session: SessionId,
        error: &meshd_proto::DecodeError,
        now: SystemTime,
    ) {
        let code = match error {
            meshd_proto::DecodeError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            _ => ErrorCode::Malformed,
        };
        self.refuse(session, Reject::new(code, error.to_string()), unix_ms(now));
    }

    pub fn handle_message(&mut self, session: SessionId, msg: Message, now: SystemTime) {
        let now = unix_ms(now);
        let Some(s) = self.sessions.get(&session) else {
            return;
        };
        let result = match (&s.state, msg) {
            (_, Message::Error(e)) => {
                tracing::info!(?session, code = ?e.code, message = %e.message, "node reported an error");
                self.actions.push_back(Action::Close { session });
                self.end_session(session, now);
                return;
            }
            (SessionState::Handshake { .. }, Message::Register(r)) => {
                self.on_register(session, r, now)
            }
            (SessionState::Handshake { .. }, Message::Login(l)) => self.on_login(session, l, now),
            (SessionState::Active(node), Message::EndpointReport(r)) => {
                let node = *node;
                self.on_endpoints(node, r.endpoints, now)
            }
            (SessionState::Active(node), Message::RotateKey(r)) => {
                let node = *node;
                self.on_rotate(session, node, r, now)
            }
            (state, m) => {
                let why = if m.sender() == Sender::Coordinator {
                    "only the coordinator sends it"
                } else if matches!(state, SessionState::Handshake { .. }) {
                    "the session must start with Register or Login"
                } else {
                    "the session is already authenticated"
                };
                Err(Reject::new(
                    ErrorCode::UnexpectedMessage,
                    format!("unexpected {}: {why}", m.name()),
                ))
            }
        };
        if let Err(r) = result {
            self.refuse(session, r, now);
        }
    }

    /// Expires handshakes and nodes and deletes ephemeral nodes that are due.
    pub fn handle_timeout(&mut self, now: SystemTime) {
        let now = unix_ms(now);
        while let Some(&(t, session)) = self.handshakes.first() {
            if t > now {
                break;
            }
            self.handshakes.remove(&(t, session));
            self.refuse(
                session,
                Reject::new(
                    ErrorCode::HandshakeTimeout,
                    "no Register or Login within the handshake timeout",
                ),
                now,
            );
        }
        self.expire_due(now);
        while let Some(&(t, id)) = self.ephemeral.first() {
            if t > now {
                break;
            }
            self.ephemeral.remove(&(t, id));
            let timeout = self.config.ephemeral_timeout;
            let removed = self.transact::<_, StoreError>(now, |c| {
                let Some(n) = c.state.nodes.get(&id) else {
                    return Ok((vec![], false));
                };
                // With replicas, only the record tells whether it is still
                // disconnected; alone, this coordinator's timers do.
                let due = n.ephemeral
                    && !c.session_of.contains_key(&id)
                    && (c.config.single_replica
                        || n.disconnected_at.is_some_and(|d| add_ms(d, timeout) <= now));
                if !due {
                    return Ok((vec![], false));
                }
                let delete = Change::DeleteNode {
                    id,
                    version: n.version,
                };
                Ok((vec![delete], true))
            });
            match removed {
                Ok(false) => {}
                Ok(true) => {
                    tracing::info!(node = %id, "ephemeral node removed after staying disconnected")
                }
                Err(e) => {
                    tracing::warn!(node = %id, error = %e, "could not remove ephemeral node; retrying in 1 s");
                    self.ephemeral.insert((now + 1000, id));
                }
            }
        }
    }

    /// Applies changes other coordinator replicas wrote to the shared store.
    pub fn poll_store(&mut self, now: SystemTime) -> Result<(), StoreError> {
        let changes = self.store.poll_remote()?;
        self.apply(changes, unix_ms(now));
        Ok(())
    }

    // ---- administration ----

    /// Creates a join token; returns its record and the secret (shown once).
    pub fn create_token(
        &mut self,
        spec: TokenSpec,
        now: SystemTime,
    ) -> Result<(TokenRecord, TokenSecret), CoordError> {
        let now = unix_ms(now);
        check_tags(&spec.tags)?;
        if let Some(slice) = &spec.slice {
            if !valid_name(slice) {
                return Err(CoordError::InvalidName(slice.clone()));
            }
        }
        let (record, secret) = self.transact::<_, CoordError>(now, |c| {
            let mut secret = TokenSecret([0; 32]);
            c.rng.fill_bytes(&mut secret.0);
            let mut id = [0u8; 8];
            c.rng.fill_bytes(&mut id);
            let record = TokenRecord {
                id: Hex(&id).to_string(),
                secret_hash: secret_hash(&secret),
                reusable: spec.reusable,
                ephemeral: spec.ephemeral,
                tags: spec.tags.clone(),
                slice: spec.slice.clone(),
                created_at: now,
                expires_at: spec.expires_in.map(|d| add_ms(now, d)),
                revoked: false,
                uses: 0,
                version: 1,
            };
            Ok((vec![Change::PutToken(record.clone())], (record, secret)))
        })?;
        tracing::info!(token = %record.id, reusable = record.reusable, "join token created");
        Ok((record, secret))
    }

    pub fn revoke_token(&mut self, id: &str, now: SystemTime) -> Result<(), CoordError> {
        self.transact::<_, CoordError>(unix_ms(now), |c| {
            let t = c.state.tokens.get(id).ok_or_else(|| {
                unless_changed(
                    CoordError::NoSuchToken(id.to_owned()),
                    vec![Lookup::Token(id.to_owned())],
                )
            })?;
            // Already revoked: the record is written again all the same, so
            // the answer does not rest on this replica's copy alone (another
            // may have deleted the token meanwhile).
            let mut t = t.clone();
            t.revoked = true;
            t.version += 1;
            Ok((vec![Change::PutToken(t)], ()))
        })?;
        tracing::info!(token = %id, "join token revoked");
        Ok(())
    }

    pub fn rename_node(
        &mut self,
        id: NodeId,
        name: &str,
        now: SystemTime,
    ) -> Result<(), CoordError> {
        if !valid_name(name) {
            return Err(CoordError::InvalidName(name.to_owned()));
        }
        self.transact::<_, CoordError>(unix_ms(now), |c| {
            if let Some(other) = c.state.node_by_name(name).filter(|n| n.id != id) {
                return Err(unless_changed(
                    CoordError::NameTaken(name.to_owned()),
                    vec![Lookup::NodeByName(name.to_owned()), Lookup::Node(other.id)],
                ));
            }
            // Even when the name is the same: the conditional write checks
            // that the node still exists as this replica saw it. A missing
            // node is checked with the name, which one coordinator checks
            // first (another replica may have just given it away).
            let mut n = c.state.nodes.get(&id).cloned().ok_or_else(|| {
                unless_changed(
                    CoordError::NoSuchNode(id),
                    vec![Lookup::Node(id), Lookup::NodeByName(name.to_owned())],
                )
            })?;
            n.name = name.to_owned();
            n.version += 1;
            Ok((vec![Change::PutNode(n)], ()))
        })
    }

    /// Expires a node now: it leaves every peer map and must register again.
    pub fn expire_node(&mut self, id: NodeId, now: SystemTime) -> Result<(), CoordError> {
        let now = unix_ms(now);
        self.transact::<_, CoordError>(now, |c| {
            // Already expired: written again unchanged, so the answer does not
            // rest on this replica's copy alone.
            let mut n = c.node(id)?;
            if !n.is_expired(now) {
                n.expires_at = Some(now);
            }
            n.version += 1;
            Ok((vec![Change::PutNode(n)], ()))
        })
    }

    pub fn delete_node(&mut self, id: NodeId, now: SystemTime) -> Result<(), CoordError> {
        self.transact::<_, CoordError>(unix_ms(now), |c| {
            let n = c.node(id)?;
            let delete = Change::DeleteNode {
                id,
                version: n.version,
            };
            Ok((vec![delete], ()))
        })?;
        tracing::info!(node = %id, "node deleted");
        Ok(())
    }

    /// The node's record, or a refusal that is checked against the store
    /// (it may have been created through another replica a moment ago).
    fn node(&self, id: NodeId) -> Result<NodeRecord, Refused<CoordError>> {
        self.state
            .nodes
            .get(&id)
            .cloned()
            .ok_or_else(|| unless_changed(CoordError::NoSuchNode(id), vec![Lookup::Node(id)]))
    }
    // ---- sessions ----

    fn send(&mut self, session: SessionId, message: Message) {
        self.actions.push_back(Action::Send { session, message });
    }

    fn forget_handshake(&mut self, session: SessionId) {
        if let Some(Session {
            state: SessionState::Handshake { deadline },
            ..
        }) = self.sessions.get(&session)
        {
            self.handshakes.remove(&(*deadline, session));
        }
    }

    /// Sends an error, asks the driver to close, and ends the session now, so
    /// a message still in flight from it is ignored.
    fn refuse(&mut self, session: SessionId, Reject { code, message }: Reject, now: u64) {
        if !self.sessions.contains_key(&session) {
            return;
        }
        tracing::debug!(?session, ?code, %message, "refusing session");
        self.send(session, Message::Error(ErrorMessage { code, message }));
        self.actions.push_back(Action::Close { session });
        self.end_session(session, now);
    }

    fn verify(
        &self,
        session: SessionId,
        purpose: Purpose,
        key: NodeKey,
        extra: &[u8],
        proof: &[u8; 32],
    ) -> Result<(), Reject> {
        let s = self
            .sessions
            .get(&session)
            .ok_or_else(|| Reject::new(ErrorCode::Internal, "session vanished"))?;
        auth::verify(
            &ProofInput {
                purpose,
                coordinator_key: self.public,
                node_key: key,
                nonce: &s.nonce,
                channel_binding: &s.binding,
                extra,
            },
            &self.secret,
            proof,
        )?;
        Ok(())
    }

    /// The random tag of a session (see [`Session::tag`]).
    fn tag(&self, session: SessionId) -> Result<u64, Reject> {
        self.sessions
            .get(&session)
            .map(|s| s.tag)
            .ok_or_else(|| Reject::new(ErrorCode::Internal, "session vanished"))
    }

    fn on_register(
        &mut self,
        session: SessionId,
        r: meshd_proto::Register,
        now: u64,
    ) -> Result<(), Reject> {
        self.verify(session, Purpose::Register, r.node_key, &[], &r.proof)?;
        let tag = self.tag(session)?;
        let node = self.transact(now, |c| c.decide_register(&r, tag, now))?;
        tracing::info!(node = %node.id, name = %node.name, ipv4 = %node.ipv4, key = %node.key, "node registered");
        self.activate(session, node.id);
        self.send(session, Message::RegisterOk(self.info_of(&node)));
        self.send_map(session, &node, now);
        Ok(())
    }

    /// A new node and its token's use, in one transaction: a node never
    /// exists without its token's use counted.
    fn decide_register(
        &mut self,
        r: &meshd_proto::Register,
        tag: u64,
        now: u64,
    ) -> Decision<NodeRecord, Reject> {
        let hash = secret_hash(&r.token_secret);
        let token = self.state.token_by_hash(&hash).cloned().ok_or_else(|| {
            unless_changed(
                Reject::new(
                    ErrorCode::TokenInvalid,
                    "join token not recognised by this coordinator (another mesh's, or deleted)",
                ),
                vec![Lookup::TokenByHash(hash)],
            )
        })?;
        let refused = match token.state(now) {
            TokenState::Valid => None,
            TokenState::Revoked => Some((ErrorCode::TokenRevoked, "was revoked")),
            TokenState::Expired => Some((ErrorCode::TokenExpired, "has expired")),
            TokenState::Used => Some((
                ErrorCode::TokenUsed,
                "was for one node and has been used; create a new one or a --reusable one",
            )),
        };
        if let Some((code, why)) = refused {
            // Used or expired stays so, but it may have been revoked too,
            // which is what a refusal says first.
            let recheck = match code {
                ErrorCode::TokenRevoked => vec![],
                _ => vec![Lookup::Token(token.id.clone())],
            };
            return Err(unless_changed(
                Reject::new(code, format!("join token {} {why}", token.id)),
                recheck,
            ));
        }
        // An expired node registers again with its own key: its record is
        // renewed (same id and addresses) rather than refused as a key in use.
        let expired = match self.state.node_by_key(&r.node_key) {
            Some(n) if n.is_expired(now) => Some(n.clone()),
            None => None,
            Some(other) => return Err(unless_changed(
                Reject::new(
                    ErrorCode::KeyInUse,
                    format!(
                        "this key is already registered as node {} ({}); log in instead of registering",
                        other.id, other.name
                    ),
                ),
                vec![Lookup::NodeByKey(r.node_key), Lookup::Node(other.id)],
            )),
        };
        if !valid_name(&r.name) {
            return Err(Reject::new(
                ErrorCode::InvalidName,
                format!(
                    "invalid node name {:?}: use 1-63 lowercase letters, digits and hyphens",
                    r.name
                ),
            )
            .into());
        }
        if let Some(relay) = &r.relay {
            if !token.tags.iter().any(|t| t == RELAY_TAG) {
                return Err(Reject::new(
                    ErrorCode::TokenInvalid,
                    format!(
                        "join token {} is not for relays: create one with --tag {RELAY_TAG}",
                        token.id
                    ),
                )
                .into());
            }
            check_relay(relay)?;
        }
        if expired
            .as_ref()
            .is_some_and(|o| o.relay.is_some() != r.relay.is_some())
        {
            return Err(Reject::new(
                ErrorCode::KeyInUse,
                "this key belonged to a relay and a node cannot reuse it (or the reverse)",
            )
            .into());
        }
        let name = self.unique_name(&r.name, expired.as_ref().map(|n| n.id));
        let mut token = token;
        token.uses += 1;
        token.version += 1;
        // A renewed record keeps its id, addresses and creation time.
        let (id, ipv4, ipv6, created_at, version) = match expired {
            Some(old) => (old.id, old.ipv4, old.ipv6, old.created_at, old.version + 1),
            None => {
                let ipv4 = self.state.free_ipv4().ok_or_else(|| {
                    Reject::new(
                        ErrorCode::Unavailable,
                        "the mesh has no free IPv4 address left",
                    )
                })?;
                let ipv6 = self
                    .state
                    .ipv6_for(ipv4)
                    .ok_or_else(|| Reject::new(ErrorCode::Internal, "mesh settings missing"))?;
                (self.new_node_id(), ipv4, ipv6, now, 1)
            }
        };
        let node = NodeRecord {
            id,
            name,
            key: r.node_key,
            ipv4,
            ipv6,
            tags: token.tags.clone(),
            slice: token.slice.clone(),
            ephemeral: token.ephemeral,
            token_id: token.id.clone(),
            created_at,
            expires_at: self.config.node_expiry.map(|d| add_ms(now, d)),
            endpoints: unique_endpoints(r.endpoints.clone()),
            disconnected_at: None,
            session: Some(tag),
            version,
            relay: r.relay.clone(),
        };
        Ok((
            vec![Change::PutToken(token), Change::PutNode(node.clone())],
            node,
        ))
    }

    fn on_login(
        &mut self,
        session: SessionId,
        l: meshd_proto::Login,
        now: u64,
    ) -> Result<(), Reject> {
        self.verify(session, Purpose::Login, l.node_key, &[], &l.proof)?;
        let tag = self.tag(session)?;
        // Every login is a write, so that what it is decided from (the node
        // exists, has this key, has not expired) is checked by the store.
        let node = self.transact(now, |c| {
            let node = c.state.node_by_key(&l.node_key).ok_or_else(|| {
                unless_changed(
                    Reject::new(
                        ErrorCode::UnknownNode,
                        "no node with this key: register with a join token",
                    ),
                    vec![Lookup::NodeByKey(l.node_key)],
                )
            })?;
            if node.is_expired(now) {
                return Err(unless_changed(
                    Reject::new(
                        ErrorCode::NodeExpired,
                        format!(
                            "node {} ({}) has expired: register again with a join token",
                            node.id, node.name
                        ),
                    ),
                    vec![Lookup::Node(node.id)],
                ));
            }
            if node.relay.is_some() != l.relay.is_some() {
                let what = if node.relay.is_some() {
                    "a relay"
                } else {
                    "a node"
                };
                return Err(Reject::new(
                    ErrorCode::UnexpectedMessage,
                    format!(
                        "node {} ({}) registered as {what} and must log in as one",
                        node.id, node.name
                    ),
                )
                .into());
            }
            if let Some(relay) = &l.relay {
                check_relay(relay)?;
            }
            let mut rec = node.clone();
            rec.relay = l.relay.clone().or(rec.relay);
            rec.disconnected_at = None;
            rec.session = Some(tag);
            if !l.endpoints.is_empty() {
                rec.endpoints = unique_endpoints(l.endpoints.clone());
            }
            rec.version += 1;
            Ok((vec![Change::PutNode(rec.clone())], rec))
        })?;
        if let Some(old) = self.session_of.get(&node.id).copied() {
            tracing::info!(node = %node.id, ?old, "new session replaces the old one");
            // Told why, so that its node does not take it for a coordinator
            // that went away (and log in again, replacing the new one).
            self.sessions.remove(&old);
            self.send(
                old,
                Message::Error(ErrorMessage {
                    code: ErrorCode::Replaced,
                    message: "a newer session of this node (the same key) replaced this one".into(),
                }),
            );
            self.actions.push_back(Action::Close { session: old });
        }
        tracing::info!(node = %node.id, name = %node.name, "node logged in");
        self.activate(session, node.id);
        self.send(session, Message::LoginOk(self.info_of(&node)));
        self.send_map(session, &node, now);
        Ok(())
    }

    fn on_endpoints(
        &mut self,
        node: NodeId,
        endpoints: Vec<std::net::SocketAddr>,
        now: u64,
    ) -> Result<(), Reject> {
        let endpoints = unique_endpoints(endpoints);
        self.transact(now, |c| {
            let Some(rec) = c.state.nodes.get(&node) else {
                return Err(Reject::new(ErrorCode::UnknownNode, "this node was deleted").into());
            };
            if rec.endpoints == endpoints {
                return Ok((vec![], ()));
            }
            let mut rec = rec.clone();
            rec.endpoints = endpoints.clone();
            rec.version += 1;
            Ok((vec![Change::PutNode(rec)], ()))
        })
    }

    fn on_rotate(
        &mut self,
        session: SessionId,
        node: NodeId,
        r: meshd_proto::RotateKey,
        now: u64,
    ) -> Result<(), Reject> {
        let Some(old) = self.state.nodes.get(&node).map(|n| n.key) else {
            return Err(Reject::new(ErrorCode::UnknownNode, "this node was deleted"));
        };
        self.verify(session, Purpose::RotateKey, r.new_key, &old.0, &r.proof)?;
        self.transact(now, |c| {
            let Some(rec) = c.state.nodes.get(&node) else {
                return Err(Reject::new(ErrorCode::UnknownNode, "this node was deleted").into());
            };
            if let Some(other) = c.state.node_by_key(&r.new_key).filter(|o| o.id != node) {
                return Err(unless_changed(
                    Reject::new(
                        ErrorCode::KeyInUse,
                        format!("the new key is already registered as node {}", other.id),
                    ),
                    vec![Lookup::NodeByKey(r.new_key), Lookup::Node(other.id)],
                ));
            }
            let mut rec = rec.clone();
            rec.key = r.new_key;
            if let Some(d) = c.config.node_expiry {
                rec.expires_at = Some(add_ms(now, d));
            }
            rec.version += 1;
            Ok((vec![Change::PutNode(rec)], ()))
        })?;
        tracing::info!(%node, %old, new = %r.new_key, "node key rotated");
        self.send(session, Message::RotateKeyOk(r.new_key));
        Ok(())
    }

    /// Announces every expiry that is due. Runs before any change is applied,
    /// so deltas are always computed against a state whose expiries are told.
    fn expire_due(&mut self, now: u64) {
        while let Some(&(t, id)) = self.expiries.first() {
            if t > now {
                break;
            }
            self.expiries.remove(&(t, id));
            self.on_expired(id, t);
        }
    }

    fn on_expired(&mut self, id: NodeId, at: u64) {
        let Some(node) = self.state.nodes.get(&id).cloned() else {
            return;
        };
        if !node.is_expired(at) {
            return;
        }
        tracing::info!(node = %id, "node expired");
        // Who could see it just before it expired learns that it is gone.
        let before = at.saturating_sub(1);
        let viewers: Vec<SessionId> = self
            .session_of
            .iter()
            .filter(|(v, _)| **v != id)
            .filter(|(v, _)| {
                self.state
                    .nodes
                    .get(v)
                    .is_some_and(|v| can_see(v, &node, before))
            })
            .map(|(_, s)| *s)
            .collect();
        for s in viewers {
            self.send(s, Message::PeerRemoved(id));
        }
        if node.relay.is_some() {
            self.send_relay_map_to_all(at);
        }
        if let Some(s) = self.session_of.get(&id).copied() {
            self.refuse(
                s,
                Reject::new(
                    ErrorCode::NodeExpired,
                    "this node has expired: register again with a join token",
                ),
                at,
            );
        }
    }

    fn activate(&mut self, session: SessionId, node: NodeId) {
        self.forget_handshake(session);
        if let Some(s) = self.sessions.get_mut(&session) {
            s.state = SessionState::Active(node);
        }
        self.session_of.insert(node, session);
    }

    fn send_map(&mut self, session: SessionId, node: &NodeRecord, now: u64) {
        let peers: Vec<Peer> = visible_peers(node, &self.state, now).map(peer_of).collect();
        let mut chunks = peers.chunks(MAX_PEERS_PER_FRAME).peekable();
        if chunks.peek().is_none() {
            self.send(
                session,
                Message::PeerMap(PeerMap {
                    peers: vec![],
                    last: true,
                }),
            );
        }
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            self.send(
                session,
                Message::PeerMap(PeerMap {
                    peers: chunk.to_vec(),
                    last,
                }),
            );
        }
        let rules = filter_for(node, &self.state);
        self.send(session, Message::PolicyChanged(PolicyChanged { rules }));
        let relays = self.relay_map(now);
        self.send(session, Message::RelayMap(relays));
    }

    /// Every unexpired relay, in node-id order.
    fn relay_map(&self, now: u64) -> Vec<RelayEntry> {
        self.state
            .nodes
            .values()
            .filter(|n| !n.is_expired(now))
            .filter_map(relay_entry)
            .take(MAX_RELAYS)
            .collect()
    }

    fn send_relay_map_to_all(&mut self, now: u64) {
        let relays = self.relay_map(now);
        let sessions: Vec<SessionId> = self.session_of.values().copied().collect();
        for s in sessions {
            self.send(s, Message::RelayMap(relays.clone()));
        }
    }

    fn info_of(&self, n: &NodeRecord) -> NodeInfo {
        NodeInfo {
            node_id: n.id,
            name: n.name.clone(),
            ipv4: n.ipv4,
            ipv6: n.ipv6,
            mesh_ipv4: MESH_IPV4,
            mesh_ipv6: self.state.settings.as_ref().map_or(
                Ipv6Net::new(std::net::Ipv6Addr::UNSPECIFIED, 48).unwrap_or_default(),
                |s| s.ipv6_prefix,
            ),
            expires_at: n.expires_at.map(|t| t / 1000),
            tags: n.tags.clone(),
        }
    }

    /// `base`, or `base-2`, `base-3`… if it is taken by a node other than
    /// `own`.
    fn unique_name(&self, base: &str, own: Option<NodeId>) -> String {
        let free = |n: &str| self.state.node_by_name(n).is_none_or(|o| Some(o.id) == own);
        if free(base) {
            return base.to_owned();
        }
        (2u64..)
            .map(|i| {
                let suffix = format!("-{i}");
                let stem =
                    base[..base.len().min(MAX_NAME_LEN - suffix.len())].trim_end_matches('-');
                format!("{stem}{suffix}")
            })
            .find(|n| free(n))
            .unwrap_or_else(|| base.to_owned())
    }

    fn new_node_id(&mut self) -> NodeId {
        // Random ids need no coordination between replicas; the store's
        // uniqueness rule catches the (2^-64) collision with another replica.
        loop {
            let id = NodeId(self.rng.next_u64() >> 1);
            if id.0 != 0 && !self.state.nodes.contains_key(&id) {
                return id;
            }
        }
    }

    // ---- changes ----

    /// Runs `decide` on the state in memory and commits the changes it
    /// returns, then applies them. When the store refuses the commit because
    /// another replica wrote first, the records concerned are read again
    /// (and applied, as any other replica's change) and `decide` runs again,
    /// up to [`MAX_ATTEMPTS`] times. A refusal that names records to check
    /// is checked the same way, once per record: a fresh read may lead to a
    /// refusal that names others (a name's stale owner turns out deleted,
    /// and then the node renamed is one this replica has not seen yet).
    fn transact<T, E: From<StoreError>>(
        &mut self,
        now: u64,
        mut decide: impl FnMut(&mut Self) -> Decision<T, E>,
    ) -> Result<T, E> {
        let mut rechecked: Vec<Lookup> = Vec::new();
        for _ in 0..MAX_ATTEMPTS {
            let lookups = match decide(self) {
                Err(Refused { error, recheck }) => {
                    let fresh: Vec<Lookup> = recheck
                        .into_iter()
                        .filter(|l| !rechecked.contains(l))
                        .collect();
                    if fresh.is_empty() {
                        return Err(error);
                    }
                    rechecked.extend(fresh.iter().cloned());
                    fresh
                }
                Ok((changes, out)) => {
                    if changes.is_empty() {
                        return Ok(out);
                    }
                    match self.store.commit(&changes) {
                        Ok(()) => {
                            self.apply(changes, now);
                            return Ok(out);
                        }
                        Err(StoreError::Conflict(why)) => {
                            self.conflicts += 1;
                            tracing::debug!(%why, "a write raced another replica's; deciding again");
                            // This replica is behind: catch up with what the
                            // others announced, beside the records at hand.
                            if let Err(e) = self.poll_store(from_ms(now)) {
                                tracing::warn!(error = %e, "cannot read other replicas' changes");
                            }
                            Lookup::for_changes(&changes)
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            };
            let fresh = self.store.read(&lookups)?;
            self.apply(fresh, now);
        }
        Err(StoreError::Conflict(format!(
            "still conflicting with other replicas' writes after {MAX_ATTEMPTS} attempts"
        ))
        .into())
    }

    /// Applies committed changes (local or from another replica) to memory and
    /// tells every session that must learn of them. Applying a change twice
    /// sends nothing the second time.
    fn apply(&mut self, changes: Vec<Change>, now: u64) {
        self.expire_due(now);
        for change in changes {
            let old = self.state.apply(&change);
            let new = match &change {
                Change::PutNode(n) => Some(n.clone()),
                _ => None,
            };
            if old.is_none() && new.is_none() {
                continue;
            }
            self.schedule(old.as_ref(), new.as_ref(), now);
            self.fan_out(old.as_ref(), new.as_ref(), now);
        }
    }

    fn schedule(&mut self, old: Option<&NodeRecord>, new: Option<&NodeRecord>, now: u64) {
        let timeout = self.config.ephemeral_timeout;
        let ephemeral_at = |n: &NodeRecord| {
            n.ephemeral
                .then_some(n.disconnected_at)
                .flatten()
                .map(|d| add_ms(d, timeout))
        };
        if let Some(o) = old {
            if let Some(t) = o.expires_at {
                self.expiries.remove(&(t, o.id));
            }
            if let Some(t) = ephemeral_at(o) {
                self.ephemeral.remove(&(t, o.id));
            }
        }
        if let Some(n) = new {
            // An expiry already past is announced by the change itself (fan_out).
            if let Some(t) = n.expires_at.filter(|&t| t > now) {
                self.expiries.insert((t, n.id));
            }
            if let Some(t) = ephemeral_at(n) {
                self.ephemeral.insert((t, n.id));
            }
        }
    }

    fn fan_out(&mut self, old: Option<&NodeRecord>, new: Option<&NodeRecord>, now: u64) {
        let Some(id) = new.or(old).map(|n| n.id) else {
            return;
        };
        let (old_peer, new_peer) = (old.map(peer_of), new.map(peer_of));
        let mut out = Vec::new();
        for (viewer_id, &session) in &self.session_of {
            if *viewer_id == id {
                continue;
            }
            let Some(viewer) = self.state.nodes.get(viewer_id) else {
                continue;
            };
            let before = old.is_some_and(|o| can_see(viewer, o, now));
            let after = new.is_some_and(|n| can_see(viewer, n, now));
            match (before, after, &old_peer, &new_peer) {
                (false, true, _, Some(p)) => out.push((session, Message::PeerAdded(p.clone()))),
                (true, false, _, _) => out.push((session, Message::PeerRemoved(id))),
                (true, true, Some(o), Some(n)) => {
                    for m in peer_deltas(o, n) {
                        out.push((session, m));
                    }
                }
                _ => {}
            }
        }
        // The node's own session: what it sees may depend on its own record
        // (today only on its id, so this finds nothing; the ACL issue makes
        // slices and tags count).
        if let (Some(o), Some(n), Some(&session)) = (old, new, self.session_of.get(&id)) {
            if o.tags != n.tags || o.slice != n.slice {
                for peer in self.state.nodes.values() {
                    match (can_see(o, peer, now), can_see(n, peer, now)) {
                        (false, true) => out.push((session, Message::PeerAdded(peer_of(peer)))),
                        (true, false) => out.push((session, Message::PeerRemoved(peer.id))),
                        _ => {}
                    }
                }
            }
        }
        // The node's own record as it knows it (a rename, a renewed expiry).
        if let (Some(o), Some(n), Some(&session)) = (old, new, self.session_of.get(&id)) {
            let info = self.info_of(n);
            if !n.is_expired(now) && self.info_of(o) != info {
                out.push((session, Message::NodeUpdated(info)));
            }
        }
        for (session, message) in out {
            self.send(session, message);
        }
        let live = |n: Option<&NodeRecord>| n.filter(|n| !n.is_expired(now)).and_then(relay_entry);
        if live(old) != live(new) {
            self.send_relay_map_to_all(now);
        }
        match (new, self.session_of.get(&id).copied()) {
            (None, Some(s)) => self.refuse(
                s,
                Reject::new(ErrorCode::UnknownNode, "this node was deleted"),
                now,
            ),
            (Some(n), Some(s)) if n.is_expired(now) => {
                self.refuse(
                    s,
                    Reject::new(
                        ErrorCode::NodeExpired,
                        "this node has expired: register again with a join token",
                    ),
                    now,
                );
            }
            _ => {}
        }
    }
}

/// The smallest set of deltas that turns `old` into `new` for a viewer.
fn peer_deltas(old: &Peer, new: &Peer) -> Vec<Message> {
    if old == new {
        return Vec::new();
    }
    let same_rest = Peer {
        node_key: new.node_key,
        endpoints: new.endpoints.clone(),
        ..old.clone()
    } == *new;
    if !same_rest {
        return vec![Message::PeerAdded(new.clone())];
    }
    let mut out = Vec::new();
    if old.node_key != new.node_key {
        out.push(Message::KeyRotated(KeyRotated {
            node_id: new.node_id,
            node_key: new.node_key,
        }));
    }
    if old.endpoints != new.endpoints {
        out.push(Message::EndpointChanged(meshd_proto::EndpointChanged {
            node_id: new.node_id,
            endpoints: new.endpoints.clone(),
        }));
    }
    out
}

/// The tag a join token needs to register a relay: a relay learns every
/// member's key and endpoints.
pub const RELAY_TAG: &str = "tag:relay";

fn relay_entry(n: &NodeRecord) -> Option<RelayEntry> {
    n.relay.as_ref().map(|info| RelayEntry {
        node_id: n.id,
        key: n.key,
        name: n.name.clone(),
        info: info.clone(),
    })
}

fn check_relay(r: &RelayInfo) -> Result<(), Reject> {
    if !valid_name(&r.region) {
        return Err(Reject::new(
            ErrorCode::InvalidName,
            format!("invalid relay region {:?}: use a DNS label", r.region),
        ));
    }
    if r.addrs.is_empty() {
        return Err(Reject::new(
            ErrorCode::Malformed,
            "a relay must state at least one address nodes can reach it at",
        ));
    }
    Ok(())
}

pub fn peer_of(n: &NodeRecord) -> Peer {
    Peer {
        node_id: n.id,
        node_key: n.key,
        name: n.name.clone(),
        ipv4: n.ipv4,
        ipv6: n.ipv6,
        endpoints: n.endpoints.clone(),
        tags: n.tags.clone(),
    }
}

fn check_tags(tags: &[String]) -> Result<(), CoordError> {
    if tags.len() > MAX_TAGS {
        return Err(CoordError::TooManyTags);
    }
    match tags.iter().find(|t| !valid_tag(t)) {
        Some(t) => Err(CoordError::InvalidTag(t.clone())),
        None => Ok(()),
    }
}

/// A ULA /48: `fd` and a 40-bit random global id (RFC 4193 §3.2).
fn random_ula(rng: &mut dyn RngCore) -> Ipv6Net {
    let mut g = [0u8; 5];
    rng.fill_bytes(&mut g);
    let mut b = [0u8; 16];
    b[0] = 0xfd;
    b[1..6].copy_from_slice(&g);
    Ipv6Net::new(b.into(), 48).unwrap_or_default()
}
