//! Standalone mode, `meshd wg`: one engine as a WireGuard interface that
//! `wg(8)` and `wg-quick(8)` drive through WireGuard's userspace API, as
//! they drive wireguard-go. docs/wg-standalone.md describes the commands.
//!
//! [`run`] is the daemon: it claims `/var/run/wireguard/NAME.sock`, creates
//! the engine (TUN, and for a wg-quick file its addresses and routes), serves
//! the socket ([`uapi`]) on other threads through an
//! [`EngineHandle`](crate::engine::EngineHandle), and runs the engine on the
//! calling thread until told to stop or until the interface is deleted
//! (`ip link delete`, as `wg-quick down` does). The client functions
//! ([`get`], [`set`], [`down`]) each send one request.

pub mod show;
pub mod uapi;

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ipnet::IpNet;

use crate::control_socket::{self, Answer, ClaimError, SocketFile};
use crate::engine::{
    ControlError, Engine, EngineConfig, EngineError, EngineHandle, EngineStatus,
    DEFAULT_ANSWER_POLL,
};
use crate::keys::PrivateKey;
use crate::tun::TunError;
use crate::wgconf::WgConfig;
use uapi::{Device, Op, PeerState, Status, UapiError};

/// Where userspace WireGuard implementations keep their UAPI sockets,
/// `NAME.sock`: the path `wg` looks in. /var/run is shared by all network
/// namespaces, so an interface name must be unique on the machine.
pub const SOCKET_DIR: &str = "/var/run/wireguard";

/// The TUN's MTU for a wg-quick file that sets none: the IPv6 minimum,
/// which fits inside any path that carries IPv6. (wg-quick computes 1420
/// from the route to the endpoint; set `MTU = 1420` for the same.)
pub const DEFAULT_MTU: u16 = 1280;

/// The MTU of an interface made for wg-quick, which sets its own: 1420, as
/// wireguard-go.
pub const WG_QUICK_MTU: u16 = 1420;

/// How long `down` waits for the daemon to remove its interface.
const DOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// How an interface starts.
#[derive(Debug, Clone)]
pub struct Setup {
    pub device: Device,
    /// Addresses of the TUN, set by the daemon.
    pub addresses: Vec<IpNet>,
    pub mtu: u16,
    /// Route the peers' allowed IPs into the TUN (`meshd wg up` does;
    /// wg-quick routes them itself).
    pub route_allowed_ips: bool,
    /// See [`EngineConfig::answer_poll`].
    pub answer_poll: Duration,
}

impl Setup {
    /// An interface as `meshd wg up FILE` brings it up: key, port, peers,
    /// addresses and routes from a wg-quick file.
    pub fn from_config(config: &WgConfig) -> Self {
        let iface = &config.interface;
        Setup {
            device: Device {
                private_key: Some(iface.private_key.clone()),
                listen_port: iface.listen_port.unwrap_or(0),
                fwmark: iface.fwmark.unwrap_or(0),
                peers: config.peers.clone(),
            },
            addresses: iface.addresses.clone(),
            mtu: iface.mtu.unwrap_or(DEFAULT_MTU),
            route_allowed_ips: true,
            answer_poll: DEFAULT_ANSWER_POLL,
        }
    }

    /// An empty interface, as wireguard-go creates one for wg-quick: no
    /// key, no peers, no addresses; `wg setconf` and `ip` do the rest.
    pub fn for_wg_quick() -> Self {
        Setup {
            device: Device::default(),
            addresses: Vec::new(),
            mtu: WG_QUICK_MTU,
            route_allowed_ips: false,
            answer_poll: DEFAULT_ANSWER_POLL,
        }
    }
}

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
    #[error("{name}: {error}")]
    Uapi { name: String, error: UapiError },
    #[error(transparent)]
    Control(#[from] ControlError),
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

/// Runs interface `name` until `stop` is set (by a signal handler) or the
/// interface is deleted: claims the control socket, creates the engine,
/// calls `ready` once traffic can flow, and on the way out removes the TUN
/// device and then the socket, so a vanished socket means the interface is
/// gone.
pub fn run(
    name: &str,
    setup: Setup,
    stop: &Arc<AtomicBool>,
    ready: impl FnOnce(&EngineStatus),
) -> Result<(), StandaloneError> {
    validate_name(name)?;
    let (listener, socket_file) = claim_socket(name)?;
    let device = setup.device;
    let mut engine = Engine::new(EngineConfig {
        // Without a key of its own the interface makes no handshakes: the
        // engine gets a throwaway one and no peers until a client sets it.
        private_key: device
            .private_key
            .clone()
            .unwrap_or_else(PrivateKey::generate),
        tun_name: name.to_owned(),
        mtu: setup.mtu,
        offload: true,
        addresses: setup.addresses,
        routes: Vec::new(),
        listen_port: device.listen_port,
        fwmark: device.fwmark,
        route_allowed_ips: setup.route_allowed_ips,
        answer_poll: setup.answer_poll,
    })?;
    if device.private_key.is_some() {
        engine.set_peers(&device.peers)?;
    }
    let daemon = Daemon {
        handle: engine.handle(),
        device: Mutex::new(device),
    };
    let result = std::thread::scope(|s| {
        let control = std::thread::Builder::new()
            .name("meshd-control".into())
            .spawn_scoped(s, || {
                control_socket::serve(&listener, stop, &|request| daemon.answer(request))
            })
            .map_err(io_err("starting the control thread"))?;
        ready(&engine.status());
        let result = match engine.run(stop) {
            Err(EngineError::Tun(TunError::Removed)) => {
                tracing::info!(interface = name, "the interface was removed: stopping");
                Ok(())
            }
            other => other,
        };
        // An engine error ends the control thread too.
        stop.store(true, Ordering::Relaxed);
        let _ = control.join();
        result.map_err(StandaloneError::from)
    });
    drop(engine);
    drop(socket_file);
    result
}

/// The daemon's side of the UAPI socket.
struct Daemon {
    handle: EngineHandle,
    /// What clients set; the engine holds the running state.
    device: Mutex<Device>,
}

impl Daemon {
    fn answer(&self, request: control_socket::Request<'_>) -> Answer {
        let text = match request {
            control_socket::Request::Text(text) => text,
            control_socket::Request::Malformed(why) => {
                tracing::info!(error = why, "UAPI request refused");
                let errno = if why.contains("longer") {
                    uapi::EMSGSIZE
                } else {
                    uapi::EPROTO
                };
                return Answer::reply(uapi::encode_errno(errno));
            }
        };
        let result = uapi::parse(text).and_then(|(op, fields)| match op {
            Op::Get => self.get().map(|status| uapi::encode_get(&status)),
            Op::Set => self.set(&fields).map(|()| uapi::encode_errno(0).into()),
        });
        match result {
            Ok(reply) => Answer {
                reply,
                close: false,
            },
            Err(e) => {
                tracing::info!(errno = e.errno, error = %e, "UAPI request refused");
                Answer::reply(uapi::encode_errno(e.errno))
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Device> {
        // The device is replaced whole or not at all: a panic cannot leave
        // it half changed.
        self.device.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self) -> Result<Status, UapiError> {
        let device = self.lock().clone();
        let engine = self.handle.status().map_err(engine_error)?;
        let now = SystemTime::now();
        let running: BTreeMap<_, _> = engine.peers.iter().map(|p| (p.public_key, p)).collect();
        let peers = device
            .peers
            .iter()
            .map(|config| {
                let live = running.get(&config.public_key);
                let mut config = config.clone();
                // A relayed path has no address to show.
                config.endpoint = live.and_then(|p| p.endpoint?.udp()).or(config.endpoint);
                PeerState {
                    config,
                    last_handshake: live
                        .and_then(|p| p.last_handshake)
                        .and_then(|d| now.checked_sub(d)),
                    rx_bytes: live.map_or(0, |p| p.rx_bytes),
                    tx_bytes: live.map_or(0, |p| p.tx_bytes),
                }
            })
            .collect();
        Ok(Status {
            private_key: device.private_key,
            listen_port: engine.listen_port,
            fwmark: device.fwmark,
            peers,
            counters: engine.counters,
        })
    }

    /// Applies a set operation: the whole of it is checked before anything
    /// changes (see [`uapi::apply_set`]).
    fn set(&self, fields: &[control_socket::Field<'_>]) -> Result<(), UapiError> {
        let mut device = self.lock();
        let new = uapi::apply_set(&device, fields)?;
        if new.listen_port != device.listen_port {
            self.handle
                .set_listen_port(new.listen_port)
                .map_err(engine_error)?;
        }
        if new.fwmark != device.fwmark {
            self.handle.set_fwmark(new.fwmark).map_err(engine_error)?;
        }
        let public = |d: &Device| d.private_key.as_ref().map(PrivateKey::public_key);
        if public(&new) != public(&device) {
            // Peers go before a key that is removed, after one that is set.
            if new.private_key.is_none() {
                self.handle.set_peers(Vec::new()).map_err(engine_error)?;
            }
            let key = new.private_key.clone().unwrap_or_else(PrivateKey::generate);
            self.handle.set_private_key(key).map_err(engine_error)?;
        }
        if new.private_key.is_some() {
            self.handle
                .set_peers(new.peers.clone())
                .map_err(engine_error)?;
        }
        tracing::info!(peers = new.peers.len(), "configuration changed");
        *device = new;
        Ok(())
    }
}

fn engine_error(e: ControlError) -> UapiError {
    use crate::udp::UdpError;
    let errno = match &e {
        ControlError::Engine(EngineError::Udp(UdpError::Bind { source, .. }))
            if source.kind() == io::ErrorKind::AddrInUse =>
        {
            uapi::EADDRINUSE
        }
        ControlError::Engine(EngineError::Peers(_)) => uapi::EINVAL,
        _ => uapi::EIO,
    };
    UapiError {
        errno,
        message: e.to_string(),
    }
}

fn connect(name: &str) -> Result<std::os::unix::net::UnixStream, StandaloneError> {
    validate_name(name)?;
    let path = socket_path(name);
    match control_socket::connect(&path) {
        Ok(Some(s)) => Ok(s),
        Ok(None) => Err(StandaloneError::NotRunning {
            name: name.to_owned(),
            path,
        }),
        Err(e) => Err(io_err(format!("connecting to {}", path.display()))(e)),
    }
}

/// Sends one request to interface `name`'s daemon and returns its answer.
fn request(name: &str, text: &str) -> Result<zeroize::Zeroizing<String>, StandaloneError> {
    let mut stream = connect(name)?;
    control_socket::exchange(&mut stream, text).map_err(io_err(format!(
        "talking to {}",
        socket_path(name).display()
    )))
}

/// The configuration and state of a running interface (meshd's or any
/// other UAPI daemon's).
pub fn get(name: &str) -> Result<Status, StandaloneError> {
    uapi::parse_get(&request(name, "get=1\n\n")?).map_err(|error| StandaloneError::Uapi {
        name: name.to_owned(),
        error,
    })
}

/// Sends a set operation (`set=1` and its lines, see [`uapi`]).
pub fn set(name: &str, operation: &str) -> Result<(), StandaloneError> {
    uapi::parse_errno(&request(name, operation)?).map_err(|error| StandaloneError::Uapi {
        name: name.to_owned(),
        error,
    })
}

/// Stops a running interface as `wg-quick down` does, by deleting it, and
/// waits until its daemon has removed its socket.
pub fn down(name: &str) -> Result<(), StandaloneError> {
    drop(connect(name)?);
    let output = Command::new("ip")
        .args(["link", "delete", "dev", name])
        .output()
        .map_err(io_err("running ip link delete"))?;
    if !output.status.success() {
        return Err(StandaloneError::Io {
            what: format!("ip link delete dev {name}"),
            source: io::Error::other(String::from_utf8_lossy(&output.stderr).trim().to_owned()),
        });
    }
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
