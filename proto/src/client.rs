//! The node's side of a control session, sans-IO: fed the coordinator's
//! messages, it answers the challenge, assembles the peer map and applies
//! deltas. The caller moves [`Client::poll_transmit`] output to the stream and
//! reacts to [`Client::poll_event`].
//!
//! Calling order: after the transport is up, feed every decoded message to
//! [`Client::handle_message`] (a frame that did not decode to
//! [`Client::handle_decode_error`]), then drain `poll_transmit` and
//! `poll_event`. Any error ends the session: the client has queued the
//! `Error` that tells the coordinator why (unless the coordinator's own
//! `Error` ended it), so drain `poll_transmit`, close, and reconnect with a
//! new `Client`.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;

use x25519_dalek::StaticSecret;

use crate::auth::{self, AuthError, ProofInput, Purpose};
use crate::message::*;
use crate::DecodeError;

/// How the session authenticates.
#[derive(Debug, Clone)]
pub enum Join {
    /// A new node with a join token.
    Register {
        token_secret: TokenSecret,
        name: String,
    },
    /// A registered node.
    Login,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// Authenticated; the peer map follows.
    Joined(NodeInfo),
    /// The peer set changed (the first time: the complete map arrived).
    PeersChanged,
    PolicyChanged,
    /// The coordinator accepted the new key; use it from now on.
    KeyRotated(NodeKey),
    /// This node's own record changed (a rename, a renewed expiry).
    Updated(NodeInfo),
    /// The mesh's relays changed (see [`Client::relays`]).
    RelaysChanged,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("coordinator refused: {} ({:?})", .0.message, .0.code)]
    Rejected(ErrorMessage),
    #[error("coordinator sent {got} while {state}")]
    Unexpected {
        got: &'static str,
        state: &'static str,
    },
    #[error("coordinator sent a change for peer {0}, which is not in the peer map")]
    UnknownPeer(NodeId),
    #[error("coordinator sent node {got}'s record as this node's, which is node {mine}")]
    NotMine { got: NodeId, mine: NodeId },
    #[error("cannot prove key possession: {0}")]
    Auth(#[from] AuthError),
    #[error("a key rotation is already in progress")]
    RotationPending,
}

#[derive(Debug)]
enum State {
    AwaitChallenge,
    AwaitWelcome,
    /// Authenticated; the map is complete once `map_done`.
    Joined {
        map_done: bool,
    },
}

pub struct Client {
    secret: StaticSecret,
    key: NodeKey,
    join: Join,
    binding: Vec<u8>,
    state: State,
    challenge: Option<Challenge>,
    info: Option<NodeInfo>,
    peers: BTreeMap<NodeId, Peer>,
    policy: Vec<FilterRule>,
    rotating: Option<StaticSecret>,
    out: VecDeque<Message>,
    events: VecDeque<ClientEvent>,
    /// Endpoints reported before the join, sent with Register or Login.
    endpoints: Vec<SocketAddr>,
    /// Set for a relay's session: sent with Register or Login.
    relay: Option<RelayInfo>,
    relays: Vec<RelayEntry>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("key", &self.key)
            .field("state", &self.state)
            .field("peers", &self.peers.len())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// `channel_binding` is the TLS exporter output of this connection.
    pub fn new(secret: StaticSecret, join: Join, channel_binding: &[u8]) -> Self {
        Client {
            key: auth::public_key(&secret),
            secret,
            join,
            binding: channel_binding.to_vec(),
            state: State::AwaitChallenge,
            challenge: None,
            info: None,
            peers: BTreeMap::new(),
            policy: Vec::new(),
            rotating: None,
            out: VecDeque::new(),
            events: VecDeque::new(),
            endpoints: Vec::new(),
            relay: None,
            relays: Vec::new(),
        }
    }

    /// Joins as a relay described by `info` rather than as a node (before
    /// the challenge).
    pub fn as_relay(mut self, info: RelayInfo) -> Self {
        self.relay = Some(info);
        self
    }

    /// The mesh's relays, as the last [`ClientEvent::RelaysChanged`] told.
    pub fn relays(&self) -> &[RelayEntry] {
        &self.relays
    }

    pub fn node_key(&self) -> NodeKey {
        self.key
    }

    /// This node's own record, once joined.
    pub fn info(&self) -> Option<&NodeInfo> {
        self.info.as_ref()
    }

    /// The peers, complete once the first [`ClientEvent::PeersChanged`] came.
    pub fn peers(&self) -> &BTreeMap<NodeId, Peer> {
        &self.peers
    }

    pub fn policy(&self) -> &[FilterRule] {
        &self.policy
    }

    pub fn poll_transmit(&mut self) -> Option<Message> {
        self.out.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// Tells the coordinator where this node can be reached now.
    /// Before the challenge: sent with Register or Login, so the node's
    /// first peers learn where it is together with the node. After: an
    /// EndpointReport (which the coordinator reads after Register or Login).
    pub fn report_endpoints(&mut self, endpoints: Vec<SocketAddr>) {
        if matches!(self.state, State::AwaitChallenge) {
            self.endpoints = endpoints;
        } else {
            self.out
                .push_back(Message::EndpointReport(EndpointReport { endpoints }));
        }
    }

    /// Asks to replace the node's key with `new_secret`'s. Keep using the old
    /// key until [`ClientEvent::KeyRotated`].
    pub fn rotate_key(&mut self, new_secret: StaticSecret) -> Result<(), ClientError> {
        if self.rotating.is_some() {
            return Err(ClientError::RotationPending);
        }
        let Some(ch) = &self.challenge else {
            return Err(ClientError::Unexpected {
                got: "a key rotation request",
                state: "not yet authenticated",
            });
        };
        let new_key = auth::public_key(&new_secret);
        let proof = auth::prove(
            &ProofInput {
                purpose: Purpose::RotateKey,
                coordinator_key: ch.coordinator_key,
                node_key: new_key,
                nonce: &ch.nonce,
                channel_binding: &self.binding,
                extra: &self.key.0,
            },
            &new_secret,
        )?;
        self.out
            .push_back(Message::RotateKey(RotateKey { new_key, proof }));
        self.rotating = Some(new_secret);
        Ok(())
    }

    fn state_name(&self) -> &'static str {
        match self.state {
            State::AwaitChallenge => "waiting for the challenge",
            State::AwaitWelcome => "waiting for RegisterOk/LoginOk",
            State::Joined { map_done: false } => "the peer map is incomplete",
            State::Joined { map_done: true } => "joined",
        }
    }

    /// Handles one message from the coordinator. On an error other than the
    /// coordinator's own refusal, an `Error` frame for the coordinator is
    /// queued: the session is over.
    pub fn handle_message(&mut self, msg: Message) -> Result<(), ClientError> {
        let result = self.dispatch(msg);
        if let Err(e) = &result {
            let code = match e {
                ClientError::Rejected(_) => return result,
                ClientError::Auth(AuthError::LowOrderKey(_)) => ErrorCode::InvalidKey,
                _ => ErrorCode::UnexpectedMessage,
            };
            self.refuse(code, e.to_string());
        }
        result
    }

    /// A frame from the coordinator did not decode: the session is over, and
    /// an `Error` saying why is queued.
    pub fn handle_decode_error(&mut self, error: &DecodeError) {
        let code = match error {
            DecodeError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            _ => ErrorCode::Malformed,
        };
        self.refuse(code, error.to_string());
    }

    fn refuse(&mut self, code: ErrorCode, message: String) {
        self.out
            .push_back(Message::Error(ErrorMessage { code, message }));
    }

    fn dispatch(&mut self, msg: Message) -> Result<(), ClientError> {
        let unexpected = |me: &Self, m: &Message| ClientError::Unexpected {
            got: m.name(),
            state: me.state_name(),
        };
        match (&self.state, msg) {
            (_, Message::Error(e)) => Err(ClientError::Rejected(e)),
            (State::AwaitChallenge, Message::Challenge(ch)) => self.answer(ch),
            (State::AwaitWelcome, Message::RegisterOk(info))
                if matches!(self.join, Join::Register { .. }) =>
            {
                self.welcome(info)
            }
            (State::AwaitWelcome, Message::LoginOk(info)) if matches!(self.join, Join::Login) => {
                self.welcome(info)
            }
            (State::Joined { map_done }, Message::PeerMap(part)) => {
                // A second full map (a resync) replaces the first.
                if *map_done {
                    self.peers.clear();
                }
                self.peers
                    .extend(part.peers.into_iter().map(|p| (p.node_id, p)));
                self.state = State::Joined {
                    map_done: part.last,
                };
                if part.last {
                    self.events.push_back(ClientEvent::PeersChanged);
                }
                Ok(())
            }
            (State::Joined { .. }, Message::NodeUpdated(info)) => self.updated(info),
            (State::Joined { .. }, Message::RelayMap(relays)) => {
                self.relays = relays;
                self.events.push_back(ClientEvent::RelaysChanged);
                Ok(())
            }
            (State::Joined { map_done: true }, msg) => self.delta(msg),
            (_, msg) => Err(unexpected(self, &msg)),
        }
    }

    fn answer(&mut self, ch: Challenge) -> Result<(), ClientError> {
        let purpose = match self.join {
            Join::Register { .. } => Purpose::Register,
            Join::Login => Purpose::Login,
        };
        let proof = auth::prove(
            &ProofInput {
                purpose,
                coordinator_key: ch.coordinator_key,
                node_key: self.key,
                nonce: &ch.nonce,
                channel_binding: &self.binding,
                extra: &[],
            },
            &self.secret,
        )?;
        let msg = match &self.join {
            Join::Register { token_secret, name } => Message::Register(Register {
                token_secret: token_secret.clone(),
                node_key: self.key,
                name: name.clone(),
                proof,
                endpoints: self.endpoints.clone(),
                relay: self.relay.clone(),
            }),
            Join::Login => Message::Login(Login {
                node_key: self.key,
                proof,
                endpoints: self.endpoints.clone(),
                relay: self.relay.clone(),
            }),
        };
        self.out.push_back(msg);
        self.challenge = Some(ch);
        self.state = State::AwaitWelcome;
        Ok(())
    }

    fn welcome(&mut self, info: NodeInfo) -> Result<(), ClientError> {
        self.events.push_back(ClientEvent::Joined(info.clone()));
        self.info = Some(info);
        self.state = State::Joined { map_done: false };
        Ok(())
    }

    fn updated(&mut self, info: NodeInfo) -> Result<(), ClientError> {
        let mine = self.info.as_ref().map_or(info.node_id, |i| i.node_id);
        if info.node_id != mine {
            return Err(ClientError::NotMine {
                got: info.node_id,
                mine,
            });
        }
        self.events.push_back(ClientEvent::Updated(info.clone()));
        self.info = Some(info);
        Ok(())
    }

    fn delta(&mut self, msg: Message) -> Result<(), ClientError> {
        match msg {
            // An id already present is replaced whole (a renamed or re-tagged peer).
            Message::PeerAdded(p) => {
                self.peers.insert(p.node_id, p);
            }
            Message::PeerRemoved(id) => {
                self.peers.remove(&id).ok_or(ClientError::UnknownPeer(id))?;
            }
            Message::EndpointChanged(c) => {
                let peer = self
                    .peers
                    .get_mut(&c.node_id)
                    .ok_or(ClientError::UnknownPeer(c.node_id))?;
                peer.endpoints = c.endpoints;
            }
            Message::KeyRotated(k) => {
                let peer = self
                    .peers
                    .get_mut(&k.node_id)
                    .ok_or(ClientError::UnknownPeer(k.node_id))?;
                peer.node_key = k.node_key;
            }
            Message::PolicyChanged(p) => {
                self.policy = p.rules;
                self.events.push_back(ClientEvent::PolicyChanged);
                return Ok(());
            }
            Message::RotateKeyOk(key) => {
                let Some(secret) = self.rotating.take().filter(|s| auth::public_key(s) == key)
                else {
                    return Err(ClientError::Unexpected {
                        got: "RotateKeyOk",
                        state: "no matching key rotation was requested",
                    });
                };
                self.secret = secret;
                self.key = key;
                self.events.push_back(ClientEvent::KeyRotated(key));
                return Ok(());
            }
            other => {
                return Err(ClientError::Unexpected {
                    got: other.name(),
                    state: "joined",
                })
            }
        }
        self.events.push_back(ClientEvent::PeersChanged);
        Ok(())
    }
}
