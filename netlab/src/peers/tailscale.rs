//! Tailscale in lab nodes: the seed prototype (Headscale as the control server, `derper` as
//! DERP relay and STUN server, `tailscaled` with a real TUN in every node), all built by
//! `scripts/install-peers tailscale headscale`.
//!
//! [`SeedPrototype::up`] builds it on any lab in one call; [`super::Impl::Tailscale`] is the
//! same thing as a [`super::TunnelPair`] (control and relay in the left node).
//!
//! Nothing here reaches beyond the lab: Headscale gets no DERP map URL (only a file naming
//! the lab's derper), no update check and no log upload, and every `tailscaled` runs with
//! `--no-logs-no-support`. DERP is spoken over plain HTTP (`TS_DEBUG_USE_DERP_HTTP`): the lab
//! has no certificate authority. Each daemon has its own state directory (which also holds
//! its log configuration: `TS_LOGS_DIR`) and socket under the lab's log directory, so several
//! run on one machine and nothing is left outside it.
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{died, locate_installed_peer, wait_running, End, EndSpec, TunnelOptions};
use crate::tools::tail;
use crate::{Lab, LabError, Output, Proc};

/// Headscale's HTTP port (the Tailscale control protocol, and the clients' registration).
pub const HEADSCALE_PORT: u16 = 8080;
/// derper's DERP port, plain HTTP.
pub const DERP_PORT: u16 = 3340;
/// derper's STUN port.
pub const STUN_PORT: u16 = 3478;
/// The UDP port every `tailscaled` listens on.
pub const TAILSCALED_PORT: u16 = 41641;
/// The region id of the lab's derper in the DERP map.
const DERP_REGION: u32 = 900;
/// The one Headscale user every node joins as.
const USER: &str = "lab";

/// Fails naming `scripts/install-peers` unless Tailscale's and Headscale's programs are built.
pub(super) fn check_installed() -> Result<(), LabError> {
    for program in ["tailscaled", "tailscale", "derper"] {
        locate_installed_peer(program, "tailscale")?;
    }
    locate_installed_peer("headscale", "headscale").map(drop)
}

/// "tailscale 1.102.5, headscale 0.28.0".
pub(super) fn version() -> Result<String, LabError> {
    let first_line = |program: &str, peer: &str, args: &[&str]| -> Result<String, LabError> {
        let path = locate_installed_peer(program, peer)?.display().to_string();
        let out = crate::sys::run(&path, args, None)?;
        out.lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| super::bad_output(&format!("{program} {}", args.join(" ")), &out))
    };
    let ts = first_line("tailscaled", "tailscale", &["--version"])?;
    // Built by `go install` rather than its own build script, it cannot tell its commit.
    let ts = ts.trim_end_matches("-ERR-BuildInfo");
    let hs = first_line("headscale", "headscale", &["version"])?;
    Ok(format!(
        "tailscale {ts}, headscale {}",
        hs.trim_start_matches("headscale version ")
            .trim_start_matches('v')
    ))
}

fn program(name: &str) -> Result<String, LabError> {
    let peer = if name == "headscale" {
        "headscale"
    } else {
        "tailscale"
    };
    Ok(locate_installed_peer(name, peer)?.display().to_string())
}

/// Headscale and derper, running in lab nodes. Dropping it stops both.
pub struct Control {
    headscale: Proc,
    derper: Proc,
    control_host: String,
    config: String,
    url: String,
    authkey: String,
}

impl Control {
    /// Starts derper on `relay_host` and Headscale on `control_host` (which may be the same
    /// node), waits until both answer, and makes a reusable pre-authentication key.
    fn start(
        lab: &Lab,
        dir: &Path,
        control_host: &str,
        relay_host: &str,
        timeout: Duration,
    ) -> Result<Control, LabError> {
        let (control_addr, relay_addr) = (lab.addr(control_host)?, lab.addr(relay_host)?);
        let derp_map = dir.join("derp.yaml");
        write_file(&derp_map, &derp_map_yaml(relay_addr))?;
        let config = dir.join("headscale.yaml");
        write_file(&config, &headscale_config(dir, control_addr, &derp_map))?;
        let config = config.display().to_string();

        let listen = format!("{relay_addr}:{DERP_PORT}");
        let relay_s = relay_addr.to_string();
        let stun_port = STUN_PORT.to_string();
        let mut derper = lab.spawn(
            relay_host,
            "derper",
            &[
                &program("derper")?,
                "-a",
                &listen,
                "-http-port",
                "-1",
                "-stun-port",
                &stun_port,
                "-hostname",
                &relay_s,
                "-home",
                "blank",
            ],
        )?;
        let derp_at = std::net::SocketAddr::from((relay_addr, DERP_PORT));
        let who = format!("derper in {relay_host}");
        wait_running(lab, &mut derper, &who, "derper to listen", timeout, || {
            crate::tools::tcp_connects(lab, relay_host, derp_at, Duration::from_millis(500))
                .unwrap_or(false)
        })?;

        let headscale_bin = program("headscale")?;
        let mut headscale = lab.spawn(
            control_host,
            "headscale",
            &[&headscale_bin, "-c", &config, "serve"],
        )?;
        let http_at = std::net::SocketAddr::from((control_addr, HEADSCALE_PORT));
        let who = format!("headscale in {control_host}");
        wait_running(
            lab,
            &mut headscale,
            &who,
            "headscale to listen",
            timeout,
            || {
                crate::tools::tcp_connects(lab, control_host, http_at, Duration::from_millis(500))
                    .unwrap_or(false)
                    && dir.join("headscale.sock").exists()
            },
        )?;

        let mut control = Control {
            headscale,
            derper,
            control_host: control_host.to_owned(),
            config,
            url: format!("http://{control_addr}:{HEADSCALE_PORT}"),
            authkey: String::new(),
        };
        let user: HeadscaleUser =
            parse_json(&control.headscale_cli(lab, &["users", "create", USER, "-o", "json"])?)?;
        let id = user.id.to_string();
        let key: HeadscaleKey = parse_json(&control.headscale_cli(
            lab,
            &[
                "preauthkeys",
                "create",
                "--user",
                &id,
                "--reusable",
                "--expiration",
                "24h",
                "-o",
                "json",
            ],
        )?)?;
        control.authkey = key.key;
        Ok(control)
    }

    /// Runs the `headscale` CLI against the server (over its Unix socket).
    fn headscale_cli(&self, lab: &Lab, args: &[&str]) -> Result<String, LabError> {
        let bin = program("headscale")?;
        let mut argv = vec![bin.as_str(), "-c", &self.config];
        argv.extend_from_slice(args);
        lab.exec(&self.control_host, &argv)?.ok()
    }

    /// The URL nodes log in to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The process ids of Headscale and derper.
    pub fn pids(&self) -> [u32; 2] {
        [self.headscale.pid(), self.derper.pid()]
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = self.headscale.stop(Duration::from_secs(2));
        let _ = self.derper.stop(Duration::from_secs(2));
    }
}

#[derive(Deserialize)]
struct HeadscaleUser {
    id: u64,
}

#[derive(Deserialize)]
struct HeadscaleKey {
    key: String,
}

fn parse_json<T: for<'de> Deserialize<'de>>(text: &str) -> Result<T, LabError> {
    serde_json::from_str(text).map_err(|e| {
        LabError::Lab(format!(
            "unexpected JSON ({e}): {:?}",
            tail(text.trim(), 500)
        ))
    })
}

fn write_file(path: &Path, text: &str) -> Result<(), LabError> {
    std::fs::write(path, text).map_err(|source| LabError::Io {
        what: format!("writing {}", path.display()),
        source,
    })
}

/// One region with the lab's derper, the only one: no DERP map is fetched from anywhere.
fn derp_map_yaml(relay: Ipv4Addr) -> String {
    format!(
        "regions:\n  {DERP_REGION}:\n    regionid: {DERP_REGION}\n    regioncode: lab\n    \
         regionname: netlab relay\n    nodes:\n      - name: {DERP_REGION}a\n        \
         regionid: {DERP_REGION}\n        hostname: \"{relay}\"\n        ipv4: \"{relay}\"\n        \
         ipv6: none\n        stunport: {STUN_PORT}\n        stunonly: false\n        \
         derpport: {DERP_PORT}\n"
    )
}

/// Headscale's configuration: everything under `dir`, its API on `addr`, the lab's DERP map,
/// no update checks, no DNS pushed to nodes, sequential addresses from 100.64.0.1 (so the
/// first node to join gets 100.64.0.1, the second 100.64.0.2).
fn headscale_config(dir: &Path, addr: Ipv4Addr, derp_map: &Path) -> String {
    let d = dir.display();
    format!(
        "server_url: http://{addr}:{HEADSCALE_PORT}\n\
         listen_addr: {addr}:{HEADSCALE_PORT}\n\
         metrics_listen_addr: 127.0.0.1:9090\n\
         grpc_listen_addr: 127.0.0.1:50443\n\
         grpc_allow_insecure: false\n\
         noise:\n  private_key_path: {d}/noise_private.key\n\
         prefixes:\n  v4: 100.64.0.0/10\n  v6: fd7a:115c:a1e0::/48\n  allocation: sequential\n\
         derp:\n  server:\n    enabled: false\n  urls: []\n  paths:\n    - {map}\n  \
         auto_update_enabled: false\n  update_frequency: 24h\n\
         disable_check_updates: true\n\
         ephemeral_node_inactivity_timeout: 30m\n\
         database:\n  type: sqlite\n  sqlite:\n    path: {d}/db.sqlite\n    write_ahead_log: true\n\
         log:\n  level: info\n  format: text\n\
         policy:\n  mode: file\n  path: \"\"\n\
         dns:\n  magic_dns: false\n  base_domain: netlab.internal\n  override_local_dns: false\n  \
         nameservers:\n    global: []\n\
         unix_socket: {d}/headscale.sock\n\
         unix_socket_permission: \"0770\"\n\
         logtail:\n  enabled: false\n\
         randomize_client_port: false\n\
         taildrop:\n  enabled: false\n",
        map = derp_map.display(),
    )
}

/// One `tailscaled` and how to reach it. Its owner stops it with SIGTERM ([`stop`]), so that
/// it removes its TUN, routes and netfilter rules itself; dropped, it is killed.
struct Daemon {
    node: String,
    iface: String,
    socket: String,
    proc: Proc,
}

const STOP_GRACE: Duration = Duration::from_secs(3);

/// The socket of the `tailscaled` that [`start_daemon`] starts in `node` under `dir`.
fn socket_path(dir: &Path, node: &str) -> PathBuf {
    dir.join(format!("tailscaled-{node}"))
        .join("tailscaled.sock")
}

/// Starts `tailscaled` in `node` with a real TUN named `iface`; returns once its socket is open.
fn start_daemon(
    lab: &Lab,
    dir: &Path,
    node: &str,
    iface: &str,
    mtu: Option<u16>,
    env: &[String],
    timeout: Duration,
) -> Result<Daemon, LabError> {
    let socket = socket_path(dir, node);
    let state_dir = socket.parent().unwrap_or(dir).to_path_buf();
    std::fs::create_dir_all(&state_dir).map_err(|source| LabError::Io {
        what: format!("creating {}", state_dir.display()),
        source,
    })?;
    let (state_s, socket_s) = (
        state_dir.display().to_string(),
        socket.display().to_string(),
    );
    let state_file = format!("{state_s}/tailscaled.state");
    let tun = format!("--tun={iface}");
    let port = TAILSCALED_PORT.to_string();
    let bin = program("tailscaled")?;
    let mtu_env = mtu.map(|m| format!("TS_DEBUG_MTU={m}"));
    // Its log configuration would otherwise go to the machine's /var/lib/tailscale.
    let logs_env = format!("TS_LOGS_DIR={state_s}");
    let mut argv = vec![
        "env",
        "TS_NO_LOGS_NO_SUPPORT=true",
        &logs_env,
        // The lab's derper speaks plain HTTP: there is no certificate authority here.
        "TS_DEBUG_USE_DERP_HTTP=true",
    ];
    if let Some(m) = &mtu_env {
        argv.push(m);
    }
    argv.extend(env.iter().map(String::as_str));
    argv.extend_from_slice(&[
        &bin,
        &tun,
        "--statedir",
        &state_s,
        "--state",
        &state_file,
        "--socket",
        &socket_s,
        "--port",
        &port,
        "--no-logs-no-support",
    ]);
    let mut proc = lab.spawn(node, &format!("tailscaled-{iface}"), &argv)?;
    wait_running(
        lab,
        &mut proc,
        &format!("tailscaled in {node}"),
        &format!("tailscaled in {node} to open {socket_s}"),
        timeout,
        || socket.exists(),
    )?;
    Ok(Daemon {
        node: node.to_owned(),
        iface: iface.to_owned(),
        socket: socket_s,
        proc,
    })
}

/// Runs the `tailscale` CLI against one node's daemon.
fn cli(
    lab: &Lab,
    node: &str,
    socket: &str,
    args: &[&str],
    timeout: Duration,
) -> Result<Output, LabError> {
    let bin = program("tailscale")?;
    let mut argv = vec![bin.as_str(), "--socket", socket];
    argv.extend_from_slice(args);
    lab.exec_timeout(node, &argv, timeout)
}

/// `tailscale up` against the control server; returns once the node is logged in and running.
fn join(lab: &Lab, control: &Control, d: &mut Daemon, timeout: Duration) -> Result<(), LabError> {
    let login = format!("--login-server={}", control.url);
    let key = format!("--authkey={}", control.authkey);
    let host = format!("--hostname={}", d.node);
    let wait = format!("--timeout={}s", timeout.as_secs().max(1));
    let out = cli(
        lab,
        &d.node,
        &d.socket,
        &["up", &login, &key, &host, "--accept-dns=false", &wait],
        timeout + Duration::from_secs(5),
    )?;
    if let Some(e) = died(&mut d.proc, &format!("tailscaled in {}", d.node)) {
        return Err(LabError::Lab(e));
    }
    out.ok().map(drop)
}

/// What `tailscale status --json` says, the parts used here.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Status {
    pub backend_state: String,
    #[serde(rename = "Self")]
    pub self_: Option<PeerStatus>,
    #[serde(default)]
    pub peer: Option<std::collections::BTreeMap<String, PeerStatus>>,
}

/// One node in `tailscale status --json`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PeerStatus {
    pub host_name: String,
    #[serde(rename = "TailscaleIPs", default)]
    pub tailscale_ips: Option<Vec<String>>,
    /// The direct address in use ("ip:port"), empty while the path is relayed.
    #[serde(default)]
    pub cur_addr: String,
    /// The home DERP region's code.
    #[serde(default)]
    pub relay: String,
    /// A Tailscale peer relay in use ("ip:port:vni"), empty if none.
    #[serde(default)]
    pub peer_relay: String,
    #[serde(default)]
    pub online: bool,
}

impl PeerStatus {
    fn ipv4(&self) -> Option<Ipv4Addr> {
        self.tailscale_ips
            .as_deref()?
            .iter()
            .find_map(|a| a.parse().ok())
    }

    /// The path to this peer as tailscaled reports it.
    pub fn path(&self) -> PathKind {
        if !self.cur_addr.is_empty() {
            PathKind::Direct(self.cur_addr.clone())
        } else if !self.peer_relay.is_empty() {
            PathKind::PeerRelay(self.peer_relay.clone())
        } else if !self.relay.is_empty() {
            PathKind::Derp(self.relay.clone())
        } else {
            PathKind::None
        }
    }
}

impl Status {
    fn peer_named(&self, host: &str) -> Option<&PeerStatus> {
        self.peer.as_ref()?.values().find(|p| p.host_name == host)
    }
}

/// How a node reaches a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathKind {
    /// UDP straight to the peer at this address.
    Direct(String),
    /// Through the DERP relay of this region (its code).
    Derp(String),
    /// Through a Tailscale peer relay.
    PeerRelay(String),
    /// No path yet.
    None,
}

impl fmt::Display for PathKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathKind::Direct(a) => write!(f, "direct ({a})"),
            PathKind::Derp(r) => write!(f, "DERP ({r})"),
            PathKind::PeerRelay(r) => write!(f, "peer relay ({r})"),
            PathKind::None => f.write_str("none"),
        }
    }
}

fn status(lab: &Lab, d: &Daemon) -> Result<Status, LabError> {
    pair_status(lab, &d.node, &d.socket)
}

/// How [`SeedPrototype::up_with`] runs.
#[derive(Debug, Clone)]
pub struct SeedOptions {
    /// How long each step (a daemon starting, a node joining, all seeing each other) may take.
    pub timeout: Duration,
    /// The MTU of the nodes' TUN (`TS_DEBUG_MTU`); None keeps Tailscale's default (1280).
    pub mtu: Option<u16>,
    /// Extra `NAME=value` environment of every `tailscaled` (e.g. `TS_DEBUG_ALWAYS_USE_DERP=1`).
    pub env: Vec<String>,
}

impl Default for SeedOptions {
    fn default() -> Self {
        SeedOptions {
            timeout: Duration::from_secs(60),
            mtu: None,
            env: Vec::new(),
        }
    }
}

/// The seed prototype on a lab: Headscale on a control host, derper (DERP and STUN) on a
/// relay host, and `tailscaled` (TUN `tailscale0`) in each listed node, all joined. Dropping
/// it stops every daemon.
pub struct SeedPrototype<'lab> {
    lab: &'lab Lab,
    /// Dropped before the control server.
    daemons: Vec<Daemon>,
    control: Control,
    dir: PathBuf,
    opts: SeedOptions,
}

impl<'lab> SeedPrototype<'lab> {
    /// Builds it with [`SeedOptions::default`].
    pub fn up(
        lab: &'lab Lab,
        control_host: &str,
        relay_host: &str,
        nodes: &[&str],
    ) -> Result<Self, LabError> {
        Self::up_with(
            lab,
            control_host,
            relay_host,
            nodes,
            &SeedOptions::default(),
        )
    }

    /// Starts Headscale and derper, then `tailscaled` in every node, joins them in order,
    /// and returns once every node is running and sees every other one online in its map
    /// (the path between two nodes may still be relayed: see [`Self::path`]).
    pub fn up_with(
        lab: &'lab Lab,
        control_host: &str,
        relay_host: &str,
        nodes: &[&str],
        opts: &SeedOptions,
    ) -> Result<Self, LabError> {
        check_installed()?;
        // Numbered like the tunnels, so one lab may hold several (on different nodes).
        let seq = super::NEXT_TUNNEL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = lab.log_dir().join(format!("seed{seq}"));
        std::fs::create_dir_all(&dir).map_err(|source| LabError::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        let control = Control::start(lab, &dir, control_host, relay_host, opts.timeout)?;
        let mut daemons = Vec::with_capacity(nodes.len());
        for node in nodes {
            daemons.push(start_daemon(
                lab,
                &dir,
                node,
                "tailscale0",
                opts.mtu,
                &opts.env,
                opts.timeout,
            )?);
        }
        for d in &mut daemons {
            join(lab, &control, d, opts.timeout)?;
        }
        let seed = SeedPrototype {
            lab,
            daemons,
            control,
            dir,
            opts: opts.clone(),
        };
        for d in &seed.daemons {
            let others: Vec<&str> = nodes.iter().copied().filter(|n| *n != d.node).collect();
            lab.wait_until(
                &format!("{} to see {} online", d.node, others.join(", ")),
                opts.timeout,
                || {
                    status(lab, d).is_ok_and(|s| {
                        s.backend_state == "Running"
                            && others
                                .iter()
                                .all(|o| s.peer_named(o).is_some_and(|p| p.online))
                    })
                },
            )?;
        }
        tracing::info!(nodes = ?nodes, control = seed.control.url(), "seed prototype is up");
        Ok(seed)
    }

    /// Stops `tailscaled` in `node` (SIGTERM: it removes its TUN and rules); [`Self::start`]
    /// starts it again from its state.
    pub fn stop(&mut self, node: &str) {
        if let Some(at) = self.daemons.iter().position(|d| d.node == node) {
            let mut d = self.daemons.remove(at);
            d.proc.stop(STOP_GRACE);
        }
    }

    /// Starts `tailscaled` in `node` again after [`Self::stop`]: it logs in with the keys in
    /// its state and learns its peers afresh. Returns once it is running.
    pub fn start(&mut self, node: &str) -> Result<(), LabError> {
        if self.daemons.iter().any(|d| d.node == node) {
            return Err(LabError::Lab(format!("tailscaled already runs in {node}")));
        }
        let d = start_daemon(
            self.lab,
            &self.dir,
            node,
            "tailscale0",
            self.opts.mtu,
            &self.opts.env,
            self.opts.timeout,
        )?;
        self.lab.wait_until(
            &format!("tailscaled in {node} to run again"),
            self.opts.timeout,
            || status(self.lab, &d).is_ok_and(|s| s.backend_state == "Running"),
        )?;
        self.daemons.push(d);
        Ok(())
    }

    /// The process id of derper.
    pub fn derper_pid(&self) -> u32 {
        self.control.pids()[1]
    }

    fn daemon(&self, node: &str) -> Result<&Daemon, LabError> {
        self.daemons
            .iter()
            .find(|d| d.node == node)
            .ok_or_else(|| LabError::Lab(format!("{node} is not a node of this seed prototype")))
    }

    /// A node's Tailscale IPv4 address (100.64.0.0/10).
    pub fn addr(&self, node: &str) -> Result<Ipv4Addr, LabError> {
        let s = self.status(node)?;
        s.self_
            .as_ref()
            .and_then(PeerStatus::ipv4)
            .ok_or_else(|| LabError::Lab(format!("{node} reports no Tailscale IPv4 address")))
    }

    /// `tailscale status --json` of a node.
    pub fn status(&self, node: &str) -> Result<Status, LabError> {
        status(self.lab, self.daemon(node)?)
    }

    /// How `from` reaches `to` now, as `from`'s tailscaled reports it.
    pub fn path(&self, from: &str, to: &str) -> Result<PathKind, LabError> {
        let s = self.status(from)?;
        s.peer_named(to)
            .map(PeerStatus::path)
            .ok_or_else(|| LabError::Lab(format!("{from} does not know {to}")))
    }

    /// Runs `tailscale ARGS…` against a node's daemon.
    pub fn tailscale(
        &self,
        node: &str,
        args: &[&str],
        timeout: Duration,
    ) -> Result<Output, LabError> {
        let d = self.daemon(node)?;
        cli(self.lab, &d.node, &d.socket, args, timeout)
    }

    /// The TUN interface of a node.
    pub fn iface(&self, node: &str) -> Result<&str, LabError> {
        Ok(&self.daemon(node)?.iface)
    }

    /// The control server's URL.
    pub fn control_url(&self) -> &str {
        self.control.url()
    }

    /// Where the configuration, state and sockets are (inside the lab's log directory).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for SeedPrototype<'_> {
    fn drop(&mut self) {
        for d in &mut self.daemons {
            let _ = d.proc.stop(STOP_GRACE);
        }
        // The control server stops after them, as a field dropped after this.
    }
}

/// Both ends of a [`super::TunnelPair`] of Tailscale: Headscale and derper in the left node,
/// `tailscaled` in each with the pair's interface names and MTU. The left end joins first, so
/// the ends get 100.64.0.1 and 100.64.0.2, the pair's usual addresses (checked).
pub(super) fn start_pair(
    lab: &Lab,
    specs: &[EndSpec<'_>; 2],
    dir: &Path,
    opts: &TunnelOptions,
) -> Result<([End; 2], Control), LabError> {
    let left = specs[0].node;
    let control = Control::start(lab, dir, left, left, opts.timeout)?;
    let mut ends = Vec::with_capacity(2);
    for spec in specs {
        let mut d = start_daemon(
            lab,
            dir,
            spec.node,
            &spec.iface,
            Some(opts.mtu),
            &[],
            opts.timeout,
        )?;
        join(lab, &control, &mut d, opts.timeout)?;
        let got = status(lab, &d)?.self_.as_ref().and_then(PeerStatus::ipv4);
        if got != Some(spec.side.tunnel_addr()) {
            return Err(LabError::Lab(format!(
                "Headscale gave {} {got:?}, not {}",
                spec.node,
                spec.side.tunnel_addr()
            )));
        }
        ends.push(d);
    }
    let ends = ends
        .into_iter()
        .zip(specs)
        .map(|(d, spec)| End {
            node: d.node,
            imp: spec.imp,
            iface: d.iface,
            proc: d.proc,
            uapi_socket: None,
        })
        .collect();
    Ok((super::into_pair(ends)?, control))
}

/// Waits until each end of a pair reaches the other directly: `tailscale ping` stops at the
/// first direct pong and fails if none comes, and the daemon then reports the direct address.
pub(super) fn wait_direct(
    lab: &Lab,
    dir: &Path,
    ends: [(&str, Ipv4Addr); 2],
    timeout: Duration,
) -> Result<(), LabError> {
    for (i, (node, _)) in ends.iter().enumerate() {
        let (peer, peer_addr) = ends[1 - i];
        let socket = socket_path(dir, node).display().to_string();
        let target = peer_addr.to_string();
        let mut last = PathKind::None;
        lab.wait_until(
            &format!("a direct path from {node} to {peer}"),
            timeout,
            || {
                let pinged = cli(
                    lab,
                    node,
                    &socket,
                    &["ping", "--c", "5", "--timeout", "1s", &target],
                    Duration::from_secs(10),
                )
                .is_ok_and(|o| o.status.success());
                if let Ok(s) = pair_status(lab, node, &socket) {
                    if let Some(p) = s.peer.as_ref().and_then(|m| m.values().next()) {
                        last = p.path();
                    }
                }
                pinged && matches!(last, PathKind::Direct(_))
            },
        )
        .map_err(|e| LabError::Lab(format!("{e} (last path: {last})")))?;
    }
    Ok(())
}

fn pair_status(lab: &Lab, node: &str, socket: &str) -> Result<Status, LabError> {
    let out = cli(
        lab,
        node,
        socket,
        &["status", "--json"],
        Duration::from_secs(20),
    )?
    .ok()?;
    parse_json(&out)
}

/// The path from one end of a pair to the other, as its daemon reports it.
pub(super) fn pair_path(lab: &Lab, dir: &Path, node: &str) -> Result<PathKind, LabError> {
    let socket = socket_path(dir, node).display().to_string();
    let s = pair_status(lab, node, &socket)?;
    Ok(s.peer
        .as_ref()
        .and_then(|m| m.values().next())
        .map_or(PathKind::None, PeerStatus::path))
}
