//! The admin API: HTTP+JSON for operators, scripts and the `meshd coord`
//! admin commands (docs/admin-api.md).
//!
//! This module is the API's meaning, without I/O: [`parse_request`] turns a
//! method, a path and a body into a [`Request`] (or the 4xx answer), and
//! [`execute`] carries a request out on the [`Coordinator`]. [`server`] is
//! the HTTP driver that calls them; [`client`] is the other end.

pub mod client;
pub mod server;

use std::time::{Duration, SystemTime};

use hyper::{Method, StatusCode};
use meshd_proto::token::JoinToken;
use meshd_proto::NodeId;
use serde::{Deserialize, Serialize};

use crate::coordinator::{unix_ms, CoordError, Coordinator, TokenSpec};
use crate::state::{NodeRecord, TokenRecord, TokenState};
use crate::store::StoreError;

/// Largest request body accepted, in bytes.
pub const MAX_BODY: usize = 64 * 1024;

/// What a created token must carry besides its secret: how nodes find and
/// recognise this coordinator.
#[derive(Debug, Clone)]
pub struct TokenContext {
    /// SHA-256 of the certificate the coordinator serves.
    pub cert_pin: [u8; 32],
    /// `host:port` of every replica, in the order nodes try them.
    pub addresses: Vec<String>,
}

/// A join token as listed: everything but the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenView {
    pub id: String,
    pub reusable: bool,
    pub ephemeral: bool,
    pub tags: Vec<String>,
    pub slice: Option<String>,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub expires_at: Option<String>,
    pub revoked: bool,
    /// How many nodes joined with it.
    pub uses: u64,
    /// `valid`, `revoked`, `expired` or `used` (a one-time token that was used).
    pub state: String,
}

/// A newly created token: the only answer that contains its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedToken {
    /// The join token text (`meshd1_…`) for `meshd up --token`.
    pub token: String,
    #[serde(flatten)]
    pub info: TokenView,
}

/// A node as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    /// Decimal, as a string: node ids use 63 bits, more than a JSON number
    /// keeps exactly in JavaScript.
    pub id: String,
    pub name: String,
    /// WireGuard public key, base64.
    pub key: String,
    pub ipv4: String,
    pub ipv6: String,
    pub tags: Vec<String>,
    pub slice: Option<String>,
    pub ephemeral: bool,
    pub token_id: String,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub expired: bool,
    /// A control session with this coordinator (this replica) is open.
    pub connected: bool,
    /// When the node's last session (with any replica) ended.
    pub disconnected_at: Option<String>,
    pub endpoints: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenList {
    pub tokens: Vec<TokenView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeList {
    pub nodes: Vec<NodeView>,
}

/// How long a new token is valid: seconds, or a duration such as `"24h"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expires(pub Duration);

impl Serialize for Expires {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0.as_secs())
    }
}

impl<'de> Deserialize<'de> for Expires {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Expires;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a number of seconds or a duration such as \"24h\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Expires, E> {
                Ok(Expires(Duration::from_secs(v)))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Expires, E> {
                u64::try_from(v)
                    .map(|v| Expires(Duration::from_secs(v)))
                    .map_err(|_| E::custom("expires must not be negative"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Expires, E> {
                humantime::parse_duration(v)
                    .map(Expires)
                    .map_err(|e| E::custom(format!("expires {v:?}: {e}")))
            }
        }
        d.deserialize_any(V)
    }
}

/// Body of `POST /v1/tokens`. Unknown fields are refused, so a misspelt
/// option is not silently ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    #[serde(default)]
    pub reusable: bool,
    #[serde(default)]
    pub ephemeral: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<Expires>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slice: Option<String>,
}

/// Body of `PATCH /v1/nodes/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenameNode {
    pub name: String,
}

/// The error body of every failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub message: String,
}

/// A refused request: its HTTP status, a stable code and a sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// For 405: the methods the path allows.
    pub allow: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            allow: None,
        }
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: self.code.to_owned(),
            message: self.message.clone(),
        }
    }
}

impl From<CoordError> for ApiError {
    fn from(e: CoordError) -> Self {
        let (status, code) = match &e {
            CoordError::Store(StoreError::Unavailable(_)) => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            }
            CoordError::Store(StoreError::Conflict(_)) => (StatusCode::CONFLICT, "conflict"),
            CoordError::Store(StoreError::Corrupt(_)) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
            CoordError::NoSuchNode(_) => (StatusCode::NOT_FOUND, "no_such_node"),
            CoordError::NoSuchToken(_) => (StatusCode::NOT_FOUND, "no_such_token"),
            CoordError::InvalidName(_) => (StatusCode::BAD_REQUEST, "invalid_name"),
            CoordError::InvalidTag(_) => (StatusCode::BAD_REQUEST, "invalid_tag"),
            CoordError::TooManyTags => (StatusCode::BAD_REQUEST, "too_many_tags"),
            CoordError::NameTaken(_) => (StatusCode::CONFLICT, "name_taken"),
            CoordError::AddressesExhausted => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        };
        if let CoordError::Store(s) = &e {
            tracing::warn!(error = %s, "admin request failed in the state store");
        }
        ApiError::new(status, code, e.to_string())
    }
}

/// One admin operation, parsed and with its body checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    CreateToken(CreateToken),
    ListTokens,
    RevokeToken(String),
    ListNodes,
    RenameNode(NodeId, String),
    ExpireNode(NodeId),
    DeleteNode(NodeId),
}

/// Which operation a method and path name, before the body is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    CreateToken,
    ListTokens,
    RevokeToken(String),
    ListNodes,
    RenameNode(NodeId),
    ExpireNode(NodeId),
    DeleteNode(NodeId),
}

impl Route {
    /// Finds the operation for `method` and `path`: 404 for an unknown path,
    /// 405 for a method the path does not take, 400 for a node id that is
    /// not a number.
    pub fn find(method: &Method, path: &str) -> Result<Route, ApiError> {
        let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
        let not_allowed = |allow: &'static str| ApiError {
            allow: Some(allow),
            ..ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{method} is not allowed on {path} (allowed: {allow})"),
            )
        };
        match segments.as_slice() {
            ["v1", "tokens"] => match *method {
                Method::POST => Ok(Route::CreateToken),
                Method::GET => Ok(Route::ListTokens),
                _ => Err(not_allowed("GET, POST")),
            },
            ["v1", "tokens", id] if !id.is_empty() => match *method {
                Method::DELETE => Ok(Route::RevokeToken((*id).to_owned())),
                _ => Err(not_allowed("DELETE")),
            },
            ["v1", "nodes"] => match *method {
                Method::GET => Ok(Route::ListNodes),
                _ => Err(not_allowed("GET")),
            },
            ["v1", "nodes", id] if !id.is_empty() => match *method {
                Method::PATCH => Ok(Route::RenameNode(node_id(id)?)),
                Method::DELETE => Ok(Route::DeleteNode(node_id(id)?)),
                _ => Err(not_allowed("PATCH, DELETE")),
            },
            ["v1", "nodes", id, "expire"] if !id.is_empty() => match *method {
                Method::POST => Ok(Route::ExpireNode(node_id(id)?)),
                _ => Err(not_allowed("POST")),
            },
            _ => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no such route: {path}"),
            )),
        }
    }

    /// Whether the operation reads a JSON body (the others ignore theirs).
    pub fn has_body(&self) -> bool {
        matches!(self, Route::CreateToken | Route::RenameNode(_))
    }

    /// The operation with its body decoded.
    pub fn with_body(self, body: &[u8]) -> Result<Request, ApiError> {
        Ok(match self {
            Route::CreateToken => Request::CreateToken(json(body)?),
            Route::ListTokens => Request::ListTokens,
            Route::RevokeToken(id) => Request::RevokeToken(id),
            Route::ListNodes => Request::ListNodes,
            Route::RenameNode(id) => {
                let RenameNode { name } = json(body)?;
                Request::RenameNode(id, name)
            }
            Route::ExpireNode(id) => Request::ExpireNode(id),
            Route::DeleteNode(id) => Request::DeleteNode(id),
        })
    }
}

/// [`Route::find`] and [`Route::with_body`] in one.
pub fn parse_request(method: &Method, path: &str, body: &[u8]) -> Result<Request, ApiError> {
    Route::find(method, path)?.with_body(body)
}

fn json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    // An empty body is an empty object, so `POST /v1/tokens` with no body
    // creates a one-time token with no options.
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("request body is not the expected JSON: {e}"),
        )
    })
}

fn node_id(s: &str) -> Result<NodeId, ApiError> {
    s.parse().map(NodeId).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("{s:?} is not a node id (a decimal number)"),
        )
    })
}

/// A successful answer: its status and JSON body (none for 204).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Option<String>,
}

impl Reply {
    fn json(status: StatusCode, value: &impl Serialize) -> Result<Reply, ApiError> {
        let body = serde_json::to_string(value).map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("cannot encode the answer: {e}"),
            )
        })?;
        Ok(Reply {
            status,
            body: Some(body),
        })
    }
}

/// Carries `request` out on the coordinator (on its thread, at `now`).
pub fn execute(
    request: Request,
    c: &mut Coordinator,
    now: SystemTime,
    ctx: &TokenContext,
) -> Result<Reply, ApiError> {
    let ms = unix_ms(now);
    match request {
        Request::CreateToken(req) => {
            if req.expires.is_some_and(|e| e.0.is_zero()) {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "expires must be longer than zero",
                ));
            }
            let spec = TokenSpec {
                reusable: req.reusable,
                ephemeral: req.ephemeral,
                expires_in: req.expires.map(|e| e.0),
                tags: req.tags,
                slice: req.slice,
            };
            let (record, secret) = c.create_token(spec, now)?;
            // The service checked at start that its addresses make a valid
            // token, so this cannot fail after the token was stored.
            let token = JoinToken {
                secret,
                cert_pin: ctx.cert_pin,
                addresses: ctx.addresses.clone(),
            }
            .encode()
            .map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            })?;
            let created = CreatedToken {
                token,
                info: token_view(&record, ms),
            };
            Reply::json(StatusCode::CREATED, &created)
        }
        Request::ListTokens => {
            let mut tokens: Vec<&TokenRecord> = c.state().tokens.values().collect();
            tokens.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
            let tokens = tokens.into_iter().map(|t| token_view(t, ms)).collect();
            Reply::json(StatusCode::OK, &TokenList { tokens })
        }
        Request::RevokeToken(id) => {
            c.revoke_token(&id, now)?;
            let view = c
                .state()
                .tokens
                .get(&id)
                .map(|t| token_view(t, ms))
                .ok_or(CoordError::NoSuchToken(id))?;
            Reply::json(StatusCode::OK, &view)
        }
        Request::ListNodes => {
            let mut nodes: Vec<&NodeRecord> = c.state().nodes.values().collect();
            nodes.sort_by(|a, b| a.name.cmp(&b.name));
            let nodes = nodes
                .into_iter()
                .map(|n| node_view(n, c.is_connected(n.id), ms))
                .collect();
            Reply::json(StatusCode::OK, &NodeList { nodes })
        }
        Request::RenameNode(id, name) => {
            c.rename_node(id, &name, now)?;
            node_reply(c, id, ms)
        }
        Request::ExpireNode(id) => {
            c.expire_node(id, now)?;
            node_reply(c, id, ms)
        }
        Request::DeleteNode(id) => {
            c.delete_node(id, now)?;
            Ok(Reply {
                status: StatusCode::NO_CONTENT,
                body: None,
            })
        }
    }
}

fn node_reply(c: &Coordinator, id: NodeId, now: u64) -> Result<Reply, ApiError> {
    let n = c.state().nodes.get(&id).ok_or(CoordError::NoSuchNode(id))?;
    Reply::json(StatusCode::OK, &node_view(n, c.is_connected(id), now))
}

/// RFC 3339 in UTC, to the second.
fn time(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(t).to_string()
}

pub fn token_view(t: &TokenRecord, now: u64) -> TokenView {
    let state = match t.state(now) {
        TokenState::Valid => "valid",
        TokenState::Revoked => "revoked",
        TokenState::Expired => "expired",
        TokenState::Used => "used",
    };
    TokenView {
        id: t.id.clone(),
        reusable: t.reusable,
        ephemeral: t.ephemeral,
        tags: t.tags.clone(),
        slice: t.slice.clone(),
        created_at: time(t.created_at),
        expires_at: t.expires_at.map(time),
        revoked: t.revoked,
        uses: t.uses,
        state: state.to_owned(),
    }
}

pub fn node_view(n: &NodeRecord, connected: bool, now: u64) -> NodeView {
    NodeView {
        id: n.id.to_string(),
        name: n.name.clone(),
        key: n.key.to_string(),
        ipv4: n.ipv4.to_string(),
        ipv6: n.ipv6.to_string(),
        tags: n.tags.clone(),
        slice: n.slice.clone(),
        ephemeral: n.ephemeral,
        token_id: n.token_id.clone(),
        created_at: time(n.created_at),
        expires_at: n.expires_at.map(time),
        expired: n.is_expired(now),
        connected,
        disconnected_at: n.disconnected_at.map(time),
        endpoints: n.endpoints.iter().map(ToString::to_string).collect(),
    }
}
