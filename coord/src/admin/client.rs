//! The admin API's client, as `meshd coord token|tokens|nodes …` uses it:
//! one HTTP/1.1 request per connection to the running coordinator.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use meshd_proto::NodeId;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpStream;

use super::{
    CreateToken, CreatedToken, ErrorBody, NodeList, NodeView, RenameNode, TokenList, TokenView,
};

/// The file in the state directory holding the admin key.
pub const KEY_FILE: &str = "admin.key";
/// The file in the state directory holding the admin API's URL
/// (`http://HOST:PORT`), written by a running coordinator once it listens.
pub const URL_FILE: &str = "admin.url";

/// Largest answer read (a list of many nodes).
const MAX_ANSWER: usize = 64 * 1024 * 1024;
const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{}: {error}{hint}", path.display())]
    File {
        path: PathBuf,
        error: std::io::Error,
        hint: &'static str,
    },
    #[error("invalid admin URL {0:?}: expected http://HOST:PORT")]
    Url(String),
    #[error("{0}")]
    Invalid(String),
    #[error("cannot reach the admin API at {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("the admin API at {addr} did not answer within {}s", TIMEOUT.as_secs())]
    Timeout { addr: String },
    /// The coordinator refused the request.
    #[error("{message} ({status}, {code})")]
    Api {
        status: StatusCode,
        code: String,
        message: String,
    },
    #[error("unexpected answer from the admin API ({status}): {reason}")]
    Answer { status: StatusCode, reason: String },
}

/// Where the admin API is and the key to it.
pub struct AdminClient {
    /// `host:port`.
    addr: String,
    key: String,
}

impl std::fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminClient")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

fn read_file(path: &Path, hint: &'static str) -> Result<String, ClientError> {
    fs::read_to_string(path).map_err(|error| ClientError::File {
        path: path.to_owned(),
        error,
        hint,
    })
}

impl AdminClient {
    /// `url` is `http://HOST:PORT` (a trailing `/` is allowed).
    pub fn new(url: &str, key: &str) -> Result<Self, ClientError> {
        let addr = url
            .trim()
            .strip_prefix("http://")
            .map(|a| a.strip_suffix('/').unwrap_or(a))
            .filter(|a| {
                !a.contains('/')
                    && a.rsplit_once(':')
                        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
            })
            .ok_or_else(|| ClientError::Url(url.trim().to_owned()))?;
        let key = key.trim();
        if key.is_empty() || HeaderValue::from_str(&format!("Bearer {key}")).is_err() {
            return Err(ClientError::Invalid(
                "the admin key is empty or not printable text".into(),
            ));
        }
        Ok(AdminClient {
            addr: addr.to_owned(),
            key: key.to_owned(),
        })
    }

    pub fn with_key_file(url: &str, key_file: &Path) -> Result<Self, ClientError> {
        let key = read_file(key_file, "")?;
        Self::new(url, &key)
    }

    pub async fn create_token(&self, req: &CreateToken) -> Result<CreatedToken, ClientError> {
        self.call(Method::POST, "/v1/tokens", Some(req)).await
    }

    pub async fn list_tokens(&self) -> Result<Vec<TokenView>, ClientError> {
        let list: TokenList = self.call(Method::GET, "/v1/tokens", None::<&()>).await?;
        Ok(list.tokens)
    }

    pub async fn revoke_token(&self, id: &str) -> Result<TokenView, ClientError> {
        if id.is_empty()
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(ClientError::Invalid(format!(
                "{id:?} is not a token id (as `meshd coord tokens list` shows)"
            )));
        }
        let path = format!("/v1/tokens/{id}");
        self.call(Method::DELETE, &path, None::<&()>).await
    }

    pub async fn list_nodes(&self) -> Result<Vec<NodeView>, ClientError> {
        let list: NodeList = self.call(Method::GET, "/v1/nodes", None::<&()>).await?;
        Ok(list.nodes)
    }

    pub async fn rename_node(&self, id: NodeId, name: &str) -> Result<NodeView, ClientError> {
        let body = RenameNode {
            name: name.to_owned(),
        };
        self.call(Method::PATCH, &format!("/v1/nodes/{id}"), Some(&body))
            .await
    }

    pub async fn expire_node(&self, id: NodeId) -> Result<NodeView, ClientError> {
        let path = format!("/v1/nodes/{id}/expire");
        self.call(Method::POST, &path, None::<&()>).await
    }

    pub async fn delete_node(&self, id: NodeId) -> Result<(), ClientError> {
        let path = format!("/v1/nodes/{id}");
        self.request(Method::DELETE, &path, None::<&()>).await?;
        Ok(())
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let (status, bytes) = self.request(method, path, body).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Answer {
            status,
            reason: e.to_string(),
        })
    }

    /// Sends one request; a non-2xx answer becomes [`ClientError::Api`].
    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let addr = self.addr.clone();
        tokio::time::timeout(TIMEOUT, self.request_inner(method, path, body))
            .await
            .map_err(|_| ClientError::Timeout { addr })?
    }

    async fn request_inner(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let connect_err = |reason: String| ClientError::Connect {
            addr: self.addr.clone(),
            reason,
        };
        let body = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| ClientError::Invalid(e.to_string()))?,
            None => Vec::new(),
        };
        let stream = TcpStream::connect(&self.addr)
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        let driver = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "admin API connection ended");
            }
        });
        let invalid = |e: hyper::http::Error| ClientError::Invalid(e.to_string());
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, &self.addr)
            .header(AUTHORIZATION, format!("Bearer {}", self.key));
        if !body.is_empty() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(Bytes::from(body))).map_err(invalid)?;
        let result = async {
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| connect_err(e.to_string()))?;
            let status = resp.status();
            let bytes = Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| ClientError::Answer {
                    status,
                    reason: e.to_string(),
                })?
                .to_bytes();
            Ok((status, bytes))
        }
        .await;
        driver.abort();
        let (status, bytes) = result?;
        if status.is_success() {
            return Ok((status, bytes));
        }
        Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(e) => ClientError::Api {
                status,
                code: e.error,
                message: e.message,
            },
            Err(_) => ClientError::Answer {
                status,
                reason: String::from_utf8_lossy(&bytes).chars().take(200).collect(),
            },
        })
    }
}
