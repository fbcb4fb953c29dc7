//! A relay's membership in its mesh: `meshd relay` registers with the
//! coordinator as a relay (a token tagged `tag:relay`), then keeps one control
//! session open to learn who may use it — every node's key — and the other
//! relays it forwards to. What it learned last stays in force while the
//! coordinator is away, so relayed paths outlive a coordinator outage.
//!
//! The relay's key is its own (the relay protocol's static key, kept by
//! `meshd-relay`); the state directory holds the coordinator's address and
//! pin with the relay's record (`node.toml`), as a node's does. The token's
//! secret is never written.

use std::path::Path;
use std::time::Duration;

use meshd_control::{ClientConn, ConnectOptions};
use meshd_proto::client::{Client, ClientEvent, Join};
use meshd_proto::token::JoinToken;
use meshd_proto::{ErrorCode, Message, NodeKey, RelayEntry, RelayInfo};
use rand::Rng;
use x25519_dalek::StaticSecret;

use crate::control::state_dir::{CoordinatorFile, NodeFile, NodeRecordFile, StateDir, StateError};

/// Who may use the relay, as the coordinator said last.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership {
    /// Every node of the mesh that has not expired.
    pub nodes: Vec<NodeKey>,
    /// Every relay of the mesh, this one included.
    pub relays: Vec<RelayEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum MemberError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(
        "this relay has not joined a mesh yet: give it a join token tagged tag:relay (--token)"
    )]
    NoToken,
    #[error("the coordinator refused this relay: {message} ({code:?})")]
    Refused { code: ErrorCode, message: String },
}

/// How the relay joins.
pub struct MemberConfig<'a> {
    pub state: &'a Path,
    /// Needed the first time; later the relay logs in with its key.
    pub token: Option<JoinToken>,
    /// The name it asks for.
    pub name: String,
    pub info: RelayInfo,
    /// The relay's static key: what it registers with and proves.
    pub key: StaticSecret,
}

/// Reconnection backoff: doubling from this…
const BACKOFF_MIN: Duration = Duration::from_millis(250);
/// …up to this.
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Keeps the relay's session with the coordinator, calling `on_change` with
/// the whole membership each time it changes. Returns only when the
/// coordinator refuses the relay for good (an unknown, expired or deleted
/// relay, a token that is not for relays).
pub async fn run(
    config: MemberConfig<'_>,
    mut on_change: impl FnMut(&Membership),
) -> Result<(), MemberError> {
    let state = StateDir::open(config.state)?;
    let mut file = match (state.load_node()?, &config.token) {
        (Some(f), None) => f,
        (Some(f), Some(t))
            if f.node.is_some() && f.coordinator == CoordinatorFile::from_token(t) =>
        {
            f
        }
        (_, Some(t)) => {
            let f = NodeFile {
                listen_port: None,
                coordinator: CoordinatorFile::from_token(t),
                node: None,
            };
            state.save_node(&f)?;
            f
        }
        (None, None) => return Err(MemberError::NoToken),
    };
    let pin = file
        .coordinator
        .pin_bytes()
        .ok_or_else(|| StateError::Parse {
            path: config.state.join("node.toml"),
            message: "the coordinator's pin is not 64 hex digits".into(),
        })?;
    let mut backoff = BACKOFF_MIN;
    let mut last = Membership::default();
    let mut address = 0usize;
    loop {
        let mut joined = false;
        let join = match (&file.node, &config.token) {
            (Some(_), _) => Join::Login,
            (None, Some(t)) => Join::Register {
                token_secret: t.secret.clone(),
                name: config.name.clone(),
            },
            (None, None) => return Err(MemberError::NoToken),
        };
        let addrs = &file.coordinator.addresses;
        let Some(addr) = addrs.get(address % addrs.len().max(1)).cloned() else {
            return Err(MemberError::NoToken);
        };
        let session = async {
            // Only an error ends a session.
            type Never = std::convert::Infallible;
            let mut conn = ClientConn::connect_any(&addr, pin, &ConnectOptions::default()).await?;
            let mut client =
                Client::new(config.key.clone(), join, conn.binding()).as_relay(config.info.clone());
            loop {
                while let Some(m) = client.poll_transmit() {
                    conn.send(&m).await?;
                }
                while let Some(event) = client.poll_event() {
                    match event {
                        ClientEvent::Joined(info) => {
                            joined = true;
                            tracing::info!(name = %info.name, id = %info.node_id, "relay joined the mesh");
                            if file.node.is_none() {
                                file.node = Some(NodeRecordFile::from_info(&info));
                                state.save_node(&file).map_err(SessionEnd::State)?;
                            }
                        }
                        ClientEvent::PeersChanged | ClientEvent::RelaysChanged => {
                            let now = Membership {
                                nodes: client.peers().values().map(|p| p.node_key).collect(),
                                relays: client.relays().to_vec(),
                            };
                            if now != last {
                                on_change(&now);
                                last = now;
                            }
                        }
                        _ => {}
                    }
                }
                let Some(msg) = conn.recv().await? else {
                    return Err::<Never, _>(SessionEnd::Closed);
                };
                let refusal = match &msg {
                    Message::Error(e) => Some((e.code, e.message.clone())),
                    _ => None,
                };
                if let Err(e) = client.handle_message(msg) {
                    while let Some(m) = client.poll_transmit() {
                        let _ = conn.send(&m).await;
                    }
                    return Err(match refusal {
                        Some((code, message)) => SessionEnd::Refused { code, message },
                        None => SessionEnd::Protocol(e.to_string()),
                    });
                }
            }
        };
        let end: SessionEnd = match session.await {
            Ok(never) => match never {},
            Err(e) => e,
        };
        match end {
            SessionEnd::Refused { code, message } if is_final(code) => {
                return Err(MemberError::Refused { code, message })
            }
            SessionEnd::State(e) => return Err(e.into()),
            other => {
                tracing::warn!(coordinator = %addr, reason = %other, retry_in = ?backoff, "relay's control session ended");
                address += 1;
            }
        }
        if joined {
            backoff = BACKOFF_MIN;
        }
        let jitter = rand::rng().random_range(Duration::ZERO..=backoff / 4);
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Refusals that another attempt cannot change.
fn is_final(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::TokenInvalid
            | ErrorCode::TokenExpired
            | ErrorCode::TokenRevoked
            | ErrorCode::TokenUsed
            | ErrorCode::UnknownNode
            | ErrorCode::NodeExpired
            | ErrorCode::KeyInUse
            | ErrorCode::InvalidName
            | ErrorCode::UnexpectedMessage
            | ErrorCode::Replaced
    )
}

#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("{0}")]
    Conn(#[from] meshd_control::ConnError),
    #[error("the coordinator closed the session")]
    Closed,
    #[error("refused: {message} ({code:?})")]
    Refused { code: ErrorCode, message: String },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error(transparent)]
    State(StateError),
}
