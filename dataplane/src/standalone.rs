//! Standalone mode, `meshd wg`: one engine configured from a wg-quick file,
//! with a control socket through which `show`, `syncconf` and `down` reach
//! it. docs/wg-standalone.md describes the commands and the protocol.
//!
//! [`run`] is the daemon: it claims the socket, creates the engine (TUN,
//! addresses, routes, UDP), serves the socket on a second thread through an
//! [`EngineHandle`](crate::engine::EngineHandle) and runs the engine on the
//! calling thread until told to stop. The client functions ([`status`],
//! [`set_peers`], [`down`]) each send one request.

pub mod protocol;
pub mod show;

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::control_socket::{self, Answer, ClaimError, SocketFile};
use crate::engine::{Engine, EngineConfig, EngineError, EngineHandle, EngineStatus};
use crate::peers::PeerConfig;
use crate::wgconf::WgConfig;
use protocol::{ProtocolError, Reply, Request};

/// Where the control sockets live, `NAME.sock`. /run is shared by all
/// network namespaces, so an interface name is unique on the machine.
pub const SOCKET_DIR: &str = "/run/meshd/wg";

/// The TUN's MTU when the file sets none: the IPv6 minimum, which fits
/// inside any path that carries IPv6. (wg-quick computes 1420 from the
/// route to the endpoint; set `MTU = 1420` for the same.)
pub const DEFAULT_MTU: u16 = 1280;

/// How long `down` waits for the daemon to remove its interface.
const DOWN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    #[error("{0:?} is not a valid interface name: use 1 to 15 of the characters a-z A-Z 0-9 _ = + . - (as wg-quick does)")]
    BadName(String),
    #[error("interface {name} is already up: a running meshd answers on {}", path.display())]
    AlreadyRunning { name: String, path: PathBuf },
    #[error("no meshd interface {name} is running (nothing answers on {})", path.display())]
    NotRunning { name: String, path: PathBuf },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("{name}: {message}")]
    Daemon { name: String, message: String },
    #[error("{name} did not go down within {} s", DOWN_TIMEOUT.as_secs())]
    StillUp { name: String },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> StandaloneError {
    let what = what.into();
    move |source| StandaloneError::Io { what, source }
}

/// Checks an interface name as wg-quick does (`[a-zA-Z0-9_=+.-]{1,15}`);
/// it also names the control socket, so `.` and `..` are refused too.
pub fn validate_name(name: &str) -> Result<(), StandaloneError> {
    let ok = (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_=+.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(StandaloneError::BadName(name.to_owned()))
    }
}

/// The interface name wg-quick would use for a configuration file: its
/// name without the extension (`/etc/wireguard/wg0.conf` → `wg0`).
pub fn interface_name(config: &Path) -> Result<String, StandaloneError> {
    let file = config
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = match file.strip_suffix(".conf") {
        Some(stem) => stem.to_owned(),
        None => Path::new(&file)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    validate_name(&stem)?;
    Ok(stem)
}

pub fn socket_path(name: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{name}.sock"))
}

/// Binds the control socket of `name` (see [`control_socket::claim`]).
fn claim_socket(name: &str) -> Result<(UnixListener, SocketFile), StandaloneError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(SOCKET_DIR)
        .map_err(io_err(format!("creating {SOCKET_DIR}")))?;
    let path = socket_path(name);
    control_socket::claim(&path).map_err(|e| match e {
        ClaimError::Running(path) => StandaloneError::AlreadyRunning {
            name: name.to_owned(),
            path,
        },
        ClaimError::Io { what, source } => StandaloneError::Io { what, source },
    })
}

/// Runs interface `name` from `config` until `stop` is set (by a signal
/// handler or a `stop` request): claims the control socket, creates the
/// engine, calls `ready` once traffic can flow, and on the way out removes
/// the TUN device and then the socket, so a vanished socket means the
/// interface is gone.
pub fn run(
    name: &str,
    config: &WgConfig,
    stop: &Arc<AtomicBool>,
    ready: impl FnOnce(&EngineStatus),
) -> Result<(), StandaloneError> {
    validate_name(name)?;
    let (listener, socket_file) = claim_socket(name)?;
    let iface = &config.interface;
    let mut engine = Engine::new(EngineConfig {
        private_key: iface.private_key.clone(),
        tun_name: name.to_owned(),
        mtu: iface.mtu.unwrap_or(DEFAULT_MTU),
        offload: true,
        addresses: iface.addresses.clone(),
        routes: Vec::new(),
        listen_port: iface.listen_port.unwrap_or(0),
    })?;
    engine.set_peers(&config.peers)?;
    let handle = engine.handle();
    let result = std::thread::scope(|s| {
        let control = std::thread::Builder::new()
            .name("meshd-control".into())
            .spawn_scoped(s, || {
                control_socket::serve(&listener, stop, &|text: &str| answer(text, &handle, stop))
            })
            .map_err(io_err("starting the control thread"))?;
        ready(&engine.status());
        let result = engine.run(stop);
        // An engine error ends the control thread too.
        stop.store(true, Ordering::Relaxed);
        let _ = control.join();
        result.map_err(StandaloneError::from)
    });
    drop(engine);
    drop(socket_file);
    result
}

/// Answers one control request.
fn answer(text: &str, handle: &EngineHandle, stop: &AtomicBool) -> Answer {
    let reply = match Request::parse(text) {
        Err(e) => protocol::encode_error(&e.to_string()),
        Ok(Request::Get) => match handle.status() {
            Ok(status) => protocol::encode_status(&status),
            Err(e) => protocol::encode_error(&e.to_string()),
        },
        Ok(Request::SetPeers(peers)) => {
            tracing::info!(peers = peers.len(), "peer set replaced");
            match handle.set_peers(peers) {
                Ok(()) => protocol::encode_ok(),
                Err(e) => protocol::encode_error(&e.to_string()),
            }
        }
        Ok(Request::Stop) => {
            tracing::info!("stop requested");
            stop.store(true, Ordering::Relaxed);
            protocol::encode_ok()
        }
    };
    Answer::reply(reply)
}

/// Sends one request to interface `name`'s daemon and returns the text of
/// its `ok` reply.
pub fn request(name: &str, request: &Request) -> Result<String, StandaloneError> {
    validate_name(name)?;
    let path = socket_path(name);
    let mut stream = match control_socket::connect(&path) {
        Ok(Some(s)) => s,
        Ok(None) => {
            return Err(StandaloneError::NotRunning {
                name: name.to_owned(),
                path,
            })
        }
        Err(e) => return Err(io_err(format!("connecting to {}", path.display()))(e)),
    };
    let text = control_socket::exchange(&mut stream, &request.encode())
        .map_err(io_err(format!("talking to {}", path.display())))?;
    match protocol::parse_reply(&text)? {
        Reply::Ok(text) => Ok(text),
        Reply::Error(message) => Err(StandaloneError::Daemon {
            name: name.to_owned(),
            message,
        }),
    }
}

/// The status of a running interface.
pub fn status(name: &str) -> Result<EngineStatus, StandaloneError> {
    Ok(protocol::parse_status(&request(name, &Request::Get)?)?)
}

/// Makes `peers` the running interface's peer set: peers whose
/// configuration is unchanged keep their sessions.
pub fn set_peers(name: &str, peers: Vec<PeerConfig>) -> Result<(), StandaloneError> {
    request(name, &Request::SetPeers(peers)).map(drop)
}

/// Stops a running interface and waits until its daemon has removed the
/// TUN device and the socket.
pub fn down(name: &str) -> Result<(), StandaloneError> {
    request(name, &Request::Stop)?;
    let path = socket_path(name);
    let deadline = Instant::now() + DOWN_TIMEOUT;
    while path.exists() {
        if Instant::now() >= deadline {
            return Err(StandaloneError::StillUp {
                name: name.to_owned(),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Names of the interfaces with a control socket, sorted. A socket left by
/// a killed daemon is listed too; asking it for its status says so.
pub fn interfaces() -> Result<Vec<String>, StandaloneError> {
    let entries = match std::fs::read_dir(SOCKET_DIR) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        other => other.map_err(io_err(format!("reading {SOCKET_DIR}")))?,
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".sock")
                .map(str::to_owned)
        })
        .filter(|n| validate_name(n).is_ok())
        .collect();
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_wg_quick() {
        for (path, want) in [
            ("/etc/wireguard/wg0.conf", Some("wg0")),
            ("wg-home.conf", Some("wg-home")),
            ("dir/a.b.conf", Some("a.b")),
            ("noext", Some("noext")),
            ("/etc/wireguard/this-name-is-too-long.conf", None),
            ("/etc/wireguard/bad name.conf", None),
            ("/etc/wireguard/.conf", None),
            ("/", None),
        ] {
            let got = interface_name(Path::new(path)).ok();
            assert_eq!(got.as_deref(), want, "{path}");
        }
        assert!(validate_name("..").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name("wg_0=+.-").is_ok());
    }
}
