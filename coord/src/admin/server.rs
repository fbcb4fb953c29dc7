//! The admin API's HTTP/1.1 driver (hyper): authentication, body limits and
//! the calls into the coordinator's thread. What a request means is
//! [`super::parse_request`] and [`super::execute`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{
    HeaderValue, ALLOW, AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE,
    WWW_AUTHENTICATE,
};
use hyper::{Request as HttpRequest, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use super::{execute, ApiError, Route, TokenContext, MAX_BODY};
use crate::net::{Caller, NetError};

/// How long a client may take to send its request headers, and its body.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Open connections at most; more are closed at once. An admin API has a
/// handful of clients, so this only bounds what a misbehaving one can hold.
const MAX_CONNECTIONS: usize = 64;

/// The admin key, kept as its SHA-256 so that comparing takes the same time
/// whatever the length or content of what a client presents.
#[derive(Clone)]
pub struct AdminKey([u8; 32]);

impl AdminKey {
    pub fn new(key: &str) -> Self {
        AdminKey(Sha256::digest(key.as_bytes()).into())
    }

    fn matches(&self, presented: &str) -> bool {
        let h: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        h.ct_eq(&self.0).into()
    }
}

impl std::fmt::Debug for AdminKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminKey(..)")
    }
}

struct Shared {
    key: AdminKey,
    caller: Caller,
    ctx: TokenContext,
}

/// The admin API's listener and its connections.
#[derive(Debug)]
pub struct AdminServer {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl AdminServer {
    /// Listens on `listen` and serves until [`AdminServer::shutdown`]. Every
    /// operation goes through `caller`, on the coordinator's thread.
    pub async fn start(
        listen: SocketAddr,
        key: AdminKey,
        caller: Caller,
        ctx: TokenContext,
    ) -> Result<Self, NetError> {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| NetError::Bind {
                addr: listen,
                source,
            })?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared { key, caller, ctx });
        let task = tokio::spawn(accept(listener, shared));
        tracing::info!(%addr, "admin API listening");
        Ok(AdminServer { addr, task })
    }

    /// Stops listening and drops every open connection.
    pub async fn shutdown(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

async fn accept(listener: TcpListener, shared: Arc<Shared>) {
    // Owned here, so aborting this task drops (and aborts) every connection.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin API accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if conns.len() >= MAX_CONNECTIONS {
                    tracing::warn!(%peer, "admin API: too many open connections; closing the new one");
                    continue;
                }
                let shared = shared.clone();
                conns.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, std::convert::Infallible>(handle(req, peer, &shared).await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(READ_TIMEOUT)
                        .serve_connection(TokioIo::new(stream), service);
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, error = %e, "admin API connection ended");
                    }
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn handle(
    req: HttpRequest<Incoming>,
    peer: SocketAddr,
    shared: &Shared,
) -> Response<Full<Bytes>> {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let result = serve(req, peer, shared).await;
    match &result {
        Ok(r) => {
            tracing::debug!(%peer, %method, %path, status = r.status.as_u16(), "admin request")
        }
        Err(e) => {
            tracing::info!(%peer, %method, %path, status = e.status.as_u16(), code = e.code, "admin request refused")
        }
    }
    match result {
        Ok(reply) => response(reply.status, reply.body),
        Err(e) => {
            let body = serde_json::to_string(&e.body()).ok();
            let mut r = response(e.status, body);
            if e.status == StatusCode::UNAUTHORIZED {
                r.headers_mut()
                    .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            if let Some(allow) = e.allow {
                r.headers_mut()
                    .insert(ALLOW, HeaderValue::from_static(allow));
            }
            r
        }
    }
}

fn response(status: StatusCode, body: Option<String>) -> Response<Full<Bytes>> {
    let json = body.is_some();
    let mut r = Response::new(Full::new(Bytes::from(body.unwrap_or_default())));
    *r.status_mut() = status;
    let h = r.headers_mut();
    if json {
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    // A created token's secret must not stay in any cache.
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

async fn serve(
    req: HttpRequest<Incoming>,
    peer: SocketAddr,
    shared: &Shared,
) -> Result<super::Reply, ApiError> {
    authenticate(&req, shared)?;
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    // Route before reading the body, so an unknown route or method costs
    // nothing.
    let route = Route::find(&method, &path)?;
    let body = if route.has_body() {
        read_body(req).await?
    } else {
        Bytes::new()
    };
    let request = route.with_body(&body)?;
    let ctx = shared.ctx.clone();
    tracing::debug!(%peer, ?method, %path, "admin call");
    shared
        .caller
        .call(move |c, now| execute(request, c, now, &ctx))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("the coordinator is stopping: {e}"),
            )
        })?
}

fn authenticate(req: &HttpRequest<Incoming>, shared: &Shared) -> Result<(), ApiError> {
    let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
    let header = req
        .headers()
        .get(AUTHORIZATION)
        .ok_or_else(|| unauthorized("missing `Authorization: Bearer <admin key>` header"))?;
    let presented = header
        .to_str()
        .ok()
        .and_then(|h| h.strip_prefix("Bearer "))
        .ok_or_else(|| unauthorized("the Authorization header must be `Bearer <admin key>`"))?;
    if shared.key.matches(presented.trim()) {
        Ok(())
    } else {
        Err(unauthorized("wrong admin key"))
    }
}

async fn read_body(req: HttpRequest<Incoming>) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body larger than {MAX_BODY} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    let body = Limited::new(req.into_body(), MAX_BODY);
    match tokio::time::timeout(READ_TIMEOUT, body.collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("cannot read the request body: {e}"),
        )),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            "the request body did not arrive in time",
        )),
    }
}
