//! `meshd coord` as a whole: the state directory, the TLS identity, the
//! store, the control listeners ([`crate::net::Server`]) and the admin API
//! ([`crate::admin`]), started and stopped together.
//!
//! State directory layout: `coord-cert.der`, `coord-key.der`,
//! `coord-x25519.key` (the identity, docs/control-protocol.md), `state.db`
//! (SQLite, unless `--database`), `admin.key` (the admin API key, 0600),
//! `coord.lock` (held while a coordinator runs) and, while it runs,
//! `admin.url` (where its admin API listens).

use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use meshd_proto::token::{Hex, JoinToken};
use meshd_proto::TokenSecret;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

use crate::admin::client::{KEY_FILE, URL_FILE};
use crate::admin::server::{AdminKey, AdminServer};
use crate::admin::TokenContext;
use crate::coordinator::{Config, Coordinator};
use crate::net::tls::{write_private, Identity, IdentityError, FILES};
use crate::net::{NetError, Server};
use crate::store::{PgStore, SqliteStore, Store};

/// Everything `meshd coord` is started with. `Debug` hides the database
/// connection string, which may hold a password.
#[derive(Clone)]
pub struct ServiceConfig {
    /// UDP (QUIC) and TCP (TLS) address of the control protocol.
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    /// `postgres://…`: share state with other replicas instead of SQLite.
    pub database: Option<String>,
    /// `host:port` put into join tokens; empty: the listen address.
    pub advertise: Vec<String>,
    pub admin_listen: SocketAddr,
    /// Allows an admin address that is not loopback.
    pub admin_public: bool,
    pub node_expiry: Option<Duration>,
    pub ephemeral_timeout: Duration,
    /// An operator's certificate and key (PEM) instead of the self-signed one.
    pub certificate: Option<(PathBuf, PathBuf)>,
}

impl std::fmt::Debug for ServiceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceConfig")
            .field("listen", &self.listen)
            .field("state_dir", &self.state_dir)
            .field(
                "database",
                &self.database.as_ref().map(|_| "postgres (hidden)"),
            )
            .field("advertise", &self.advertise)
            .field("admin_listen", &self.admin_listen)
            .field("admin_public", &self.admin_public)
            .field("node_expiry", &self.node_expiry)
            .field("ephemeral_timeout", &self.ephemeral_timeout)
            .field("certificate", &self.certificate)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("the admin API would listen on {0}, which is not a loopback address: anyone who can reach it could try admin keys, and it speaks plain HTTP; pass --admin-public if that is intended")]
    AdminNotLoopback(SocketAddr),
    #[error("--listen {0} does not say how nodes reach this coordinator: give --advertise HOST:PORT (the public address or name nodes connect to)")]
    AdvertiseRequired(SocketAddr),
    #[error("--advertise {0:?}: {1}")]
    Advertise(String, String),
    #[error("state directory {}: {source}", path.display())]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {what}", path.display())]
    AdminKey { path: PathBuf, what: String },
    #[error("state directory {}: another `meshd coord` is using it", path.display())]
    InUse { path: PathBuf },
    #[error("TLS identity: {0}")]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Net(#[from] NetError),
}

/// A running coordinator with its admin API.
#[derive(Debug)]
pub struct Service {
    /// Held while running: a second coordinator on the same directory would
    /// share its SQLite file and overwrite its `admin.url`.
    _lock: fs::File,
    server: Server,
    admin: AdminServer,
    url_file: PathBuf,
    /// Where the control protocol listens (UDP and TCP share the port).
    pub control_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// SHA-256 of the served certificate: the pin in every join token.
    pub cert_pin: [u8; 32],
    /// The addresses join tokens carry.
    pub advertise: Vec<String>,
}

impl Service {
    /// Checks the configuration, prepares the state directory, opens the
    /// store, starts listening, and records the admin URL in the state
    /// directory. Must run inside a multi-threaded tokio runtime.
    pub async fn start(config: ServiceConfig) -> Result<Service, ServiceError> {
        if !config.admin_listen.ip().is_loopback() && !config.admin_public {
            return Err(ServiceError::AdminNotLoopback(config.admin_listen));
        }
        if config.advertise.is_empty() && config.listen.ip().is_unspecified() {
            return Err(ServiceError::AdvertiseRequired(config.listen));
        }
        for a in &config.advertise {
            check_advertise(a)?;
        }
        let dir = &config.state_dir;
        prepare_dir(dir)?;
        let lock = lock_dir(dir)?;
        let url_file = dir.join(URL_FILE);
        // A URL left by a coordinator that was killed would send admin
        // commands to whatever listens there now.
        match fs::remove_file(&url_file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(ServiceError::StateDir {
                    path: url_file,
                    source: e,
                })
            }
            _ => {}
        }
        let identity = match &config.certificate {
            Some((cert, key)) => Identity::with_certificate(dir, &FILES, cert, key)?,
            None => Identity::load_or_create(dir, &FILES)?,
        };
        let admin_key = load_or_create_admin_key(&dir.join(KEY_FILE))?;

        let core_config = Config {
            node_expiry: config.node_expiry,
            ephemeral_timeout: config.ephemeral_timeout,
            single_replica: config.database.is_none(),
            ..Config::default()
        };
        let static_key = identity.static_key.clone();
        let (database, db_path) = (config.database.clone(), dir.join("state.db"));
        let server = Server::start(&identity, config.listen, move |waker| {
            let store: Box<dyn Store> = match database {
                Some(url) => Box::new(PgStore::connect(&url, waker)?),
                None => Box::new(SqliteStore::open(&db_path)?),
            };
            Coordinator::new(
                core_config,
                static_key,
                store,
                Box::new(StdRng::from_os_rng()),
                SystemTime::now(),
            )
        })
        .await?;
        let control_addr = server.quic_addr;
        let advertise = if config.advertise.is_empty() {
            // With port 0 the port is the one actually bound.
            vec![control_addr.to_string()]
        } else {
            config.advertise.clone()
        };
        let cert_pin = identity.pin();
        let ctx = TokenContext {
            cert_pin,
            addresses: advertise.clone(),
        };
        let admin =
            match AdminServer::start(config.admin_listen, admin_key, server.caller(), ctx).await {
                Ok(a) => a,
                Err(e) => {
                    server.shutdown().await;
                    return Err(e.into());
                }
            };
        if let Err(e) = write_url(&url_file, admin.addr) {
            admin.shutdown().await;
            server.shutdown().await;
            return Err(e);
        }
        tracing::info!(
            control = %control_addr,
            admin = %admin.addr,
            pin = %Hex(&cert_pin),
            advertise = ?advertise,
            state = %dir.display(),
            "coordinator ready"
        );
        Ok(Service {
            _lock: lock,
            server,
            admin_addr: admin.addr,
            admin,
            url_file,
            control_addr,
            cert_pin,
            advertise,
        })
    }

    /// Stops the admin API, then the coordinator, and removes `admin.url`.
    pub async fn shutdown(self) {
        self.admin.shutdown().await;
        self.server.shutdown().await;
        if let Err(e) = fs::remove_file(&self.url_file) {
            tracing::warn!(file = %self.url_file.display(), error = %e, "cannot remove the admin URL file");
        }
        tracing::info!("coordinator stopped");
    }
}

/// An advertised address must be `host:port` and fit in a join token, which
/// is checked by making one: a token created later must not fail after its
/// record was stored.
fn check_advertise(a: &str) -> Result<(), ServiceError> {
    let bad = |why: &str| ServiceError::Advertise(a.to_owned(), why.to_owned());
    let (host, port) = a
        .rsplit_once(':')
        .ok_or_else(|| bad("expected HOST:PORT"))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(bad("expected HOST:PORT"));
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => {}
        _ => return Err(bad("the port must be a number from 1 to 65535")),
    }
    JoinToken {
        secret: TokenSecret([0; 32]),
        cert_pin: [0; 32],
        addresses: vec![a.to_owned()],
    }
    .encode()
    .map_err(|e| bad(&e.to_string()))?;
    Ok(())
}

/// Creates the state directory (0700) if needed and checks it can be written
/// to, so a wrong directory fails here with its name, not later in SQLite.
fn prepare_dir(dir: &Path) -> Result<(), ServiceError> {
    let err = |path: &Path, source| ServiceError::StateDir {
        path: path.to_owned(),
        source,
    };
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| err(dir, e))?;
    }
    let meta = fs::metadata(dir).map_err(|e| err(dir, e))?;
    if !meta.is_dir() {
        return Err(err(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
        ));
    }
    let probe = dir.join(".write-test");
    fs::write(&probe, b"").map_err(|e| err(dir, e))?;
    fs::remove_file(&probe).map_err(|e| err(dir, e))?;
    Ok(())
}

/// Locks `coord.lock` in the state directory for as long as the returned
/// file is open (the kernel releases it when the process ends, however).
fn lock_dir(dir: &Path) -> Result<fs::File, ServiceError> {
    let path = dir.join("coord.lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|source| ServiceError::StateDir {
            path: path.clone(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(ServiceError::InUse {
            path: dir.to_owned(),
        }),
        Err(fs::TryLockError::Error(source)) => Err(ServiceError::StateDir { path, source }),
    }
}

/// The admin key: 32 random bytes as 64 hex digits, created on first start
/// in a file only its owner can read. It is never logged or printed.
fn load_or_create_admin_key(path: &Path) -> Result<AdminKey, ServiceError> {
    let key_err = |what: String| ServiceError::AdminKey {
        path: path.to_owned(),
        what,
    };
    match fs::read_to_string(path) {
        Ok(text) => {
            let key = text.trim();
            if key.len() < 32 || !key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(key_err(
                    "not an admin key (at least 32 printable characters expected); remove the file to have a new one made".into(),
                ));
            }
            if let Ok(meta) = fs::metadata(path) {
                if meta.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(file = %path.display(), "the admin key file is readable by others than its owner; chmod 600 it");
                }
            }
            Ok(AdminKey::new(key))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = [0u8; 32];
            rand::rng().fill_bytes(&mut bytes);
            let key = Hex(&bytes).to_string();
            write_private(path, format!("{key}\n").as_bytes())
                .map_err(|e| key_err(e.to_string()))?;
            tracing::info!(file = %path.display(), "created the admin API key");
            Ok(AdminKey::new(&key))
        }
        Err(e) => Err(key_err(e.to_string())),
    }
}

/// Writes `admin.url` whole (a reader never sees half of it). A wildcard
/// listen address is written as loopback, where local admin commands reach it.
fn write_url(path: &Path, addr: SocketAddr) -> Result<(), ServiceError> {
    let mut local = addr;
    if addr.ip().is_unspecified() {
        local.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let tmp = path.with_extension("url.tmp");
    let err = |source| ServiceError::StateDir {
        path: path.to_owned(),
        source,
    };
    fs::write(&tmp, format!("http://{local}\n")).map_err(err)?;
    fs::rename(&tmp, path).map_err(err)
}
