//! Tunnels between two lab nodes made by real implementations of other meshes: `wireguard-go`
//! (Debian's 2022 release and the current one, built by `scripts/install-peers`) and
//! `boringtun-cli` (all configured over the WireGuard UAPI with `wg setconf`), `nebula`, and
//! Tailscale (`tailscaled` with a real TUN, joined to Headscale: see [`tailscale`]). Interop
//! tests pair them with meshd; the data-plane benchmark measures them. [`Impl::Meshd`] is
//! meshd's own `meshd wg up`, started the same way, so it pairs with any of the WireGuard
//! implementations.
//!
//! A [`TunnelPair`] gives the left node 100.64.0.1/24 and the right node 100.64.0.2/24 inside
//! the tunnel, carries the tunnel's UDP between the nodes' lab addresses ([`Lab::addr`], so
//! both ends must be reachable there: a [`Lab::veth_pair`], public hosts, or nodes of sites
//! without NAT), and returns only once a ping has crossed the tunnel both ways. Dropping it
//! stops both daemons; their interfaces and routes go with them.
use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use crate::tools::{ping_addr, tail, Iperf3Result, Iperf3Server, Iperf3Test};
use crate::{sys, Lab, LabError, Proc};

pub mod tailscale;

/// The left end's address inside the tunnel.
pub const LEFT_ADDR: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
/// The right end's address inside the tunnel.
pub const RIGHT_ADDR: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
/// Prefix length of the tunnel network.
pub const TUNNEL_PREFIX: u8 = 24;

/// Where wireguard-go, boringtun and `wg` keep a userspace interface's control socket. The
/// path is compiled into all three, and /var/run is shared by every namespace: interface names
/// must therefore be unique on the machine, not only in a namespace.
pub(crate) const UAPI_DIR: &str = "/var/run/wireguard";

/// Numbers the tunnels this process makes, so interface names never repeat within a lab.
static NEXT_TUNNEL: AtomicU32 = AtomicU32::new(0);

/// A tunnel implementation that runs as a process in a lab node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impl {
    /// Debian's `wireguard-go`, the reference userspace WireGuard (the 2022 release, without
    /// the TUN and UDP offloads of 2023).
    WireguardGo,
    /// The current `wireguard-go`, with its offloads, built by `scripts/install-peers
    /// wireguard-go` (see [`locate_installed_peer`]).
    WireguardGoCurrent,
    /// `boringtun-cli` from crates.io (`cargo install boringtun-cli --locked`); `threads: None`
    /// keeps its default (4).
    BoringtunCli { threads: Option<u32> },
    /// Debian's `nebula`, with certificates from `nebula-cert`; does not interoperate with the
    /// WireGuard implementations.
    Nebula,
    /// meshd's standalone mode, `meshd wg up --foreground` with a wg-quick file (see
    /// [`locate_meshd`] for which binary).
    Meshd,
    /// Tailscale's `tailscaled` with a real TUN in each node, joined to a Headscale control
    /// server (and a `derper`) in the left node, built by `scripts/install-peers tailscale
    /// headscale`; pairs only with itself. The pair is measured once the path is direct.
    Tailscale,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    WireGuard,
    Nebula,
    Tailscale,
}

impl Impl {
    fn family(self) -> Family {
        match self {
            Impl::WireguardGo
            | Impl::WireguardGoCurrent
            | Impl::BoringtunCli { .. }
            | Impl::Meshd => Family::WireGuard,
            Impl::Nebula => Family::Nebula,
            Impl::Tailscale => Family::Tailscale,
        }
    }

    /// Fails with an install hint unless every program this implementation needs is present.
    pub fn check_installed(self) -> Result<(), LabError> {
        match self {
            Impl::WireguardGo => {
                sys::require_tool("wireguard-go", "wireguard-go")?;
                sys::require_tool("wg", "wireguard-tools")
            }
            Impl::WireguardGoCurrent => {
                locate_installed_peer("wireguard-go", "wireguard-go")?;
                sys::require_tool("wg", "wireguard-tools")
            }
            Impl::Tailscale => tailscale::check_installed(),
            Impl::BoringtunCli { .. } => {
                locate_boringtun_cli()?;
                sys::require_tool("wg", "wireguard-tools")
            }
            Impl::Nebula => {
                sys::require_tool("nebula", "nebula")?;
                sys::require_tool("nebula-cert", "nebula")
            }
            Impl::Meshd => locate_meshd().map(drop),
        }
    }
}

impl Impl {
    /// What `scripts/install-peers` must build for this implementation (nothing for those
    /// that come from Debian, and meshd).
    pub fn install_peers_args(self) -> &'static [&'static str] {
        match self {
            Impl::WireguardGoCurrent => &["wireguard-go"],
            Impl::Tailscale => &["tailscale", "headscale"],
            Impl::BoringtunCli { .. } => &["boringtun"],
            Impl::WireguardGo | Impl::Nebula | Impl::Meshd => &[],
        }
    }

    /// The installed version, as the program itself reports it ("wireguard-go v0.0.20220316",
    /// "boringtun 0.7.1", "nebula 1.6.1", "tailscale 1.102.5").
    pub fn version(self) -> Result<String, LabError> {
        let (program, flag) = match self {
            Impl::WireguardGo => ("wireguard-go".to_owned(), "--version"),
            Impl::WireguardGoCurrent => (
                locate_installed_peer("wireguard-go", "wireguard-go")?
                    .display()
                    .to_string(),
                "--version",
            ),
            Impl::Tailscale => return tailscale::version(),
            Impl::BoringtunCli { .. } => {
                (locate_boringtun_cli()?.display().to_string(), "--version")
            }
            Impl::Nebula => ("nebula".to_owned(), "-version"),
            Impl::Meshd => (locate_meshd()?.display().to_string(), "--version"),
        };
        let out = sys::run(&program, &[flag], None)?;
        let line = out
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .ok_or_else(|| bad_output(&format!("{program} {flag}"), &out))?;
        Ok(match line.strip_prefix("Version: ") {
            Some(v) => format!("nebula {v}"),
            None => line.to_owned(),
        })
    }
}

impl fmt::Display for Impl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Impl::WireguardGo => f.write_str("wireguard-go"),
            Impl::WireguardGoCurrent => f.write_str("wireguard-go (current)"),
            Impl::Tailscale => f.write_str("tailscale"),
            Impl::BoringtunCli { threads: Some(n) } => write!(f, "boringtun-cli --threads {n}"),
            Impl::BoringtunCli { threads: None } => {
                f.write_str("boringtun-cli (default, 4 threads)")
            }
            Impl::Nebula => f.write_str("nebula"),
            Impl::Meshd => f.write_str("meshd"),
        }
    }
}

/// How a [`TunnelPair`] is configured.
#[derive(Debug, Clone)]
pub struct TunnelOptions {
    /// WireGuard only: both peers share a freshly generated preshared key.
    pub preshared_key: bool,
    /// MTU of both tunnel interfaces (1420 is WireGuard's usual value over a 1500-byte path).
    pub mtu: u16,
    /// UDP port each end listens on, at its lab address.
    pub listen_port: u16,
    /// How long the daemons may take to start and the first ping to cross the tunnel.
    pub timeout: Duration,
    /// Extra arguments of `meshd wg up` for [`Impl::Meshd`] ends.
    pub meshd_args: Vec<String>,
}

impl Default for TunnelOptions {
    fn default() -> Self {
        TunnelOptions {
            preshared_key: false,
            mtu: 1420,
            listen_port: 51820,
            timeout: Duration::from_secs(20),
            meshd_args: Vec::new(),
        }
    }
}

/// One of the two ends of a [`TunnelPair`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Left,
    Right,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::Left => Side::Right,
            Side::Right => Side::Left,
        }
    }

    fn index(self) -> usize {
        match self {
            Side::Left => 0,
            Side::Right => 1,
        }
    }

    fn letter(self) -> char {
        match self {
            Side::Left => 'l',
            Side::Right => 'r',
        }
    }

    /// The address of this end inside the tunnel.
    pub fn tunnel_addr(self) -> Ipv4Addr {
        match self {
            Side::Left => LEFT_ADDR,
            Side::Right => RIGHT_ADDR,
        }
    }
}

/// One running daemon.
struct End {
    node: String,
    imp: Impl,
    iface: String,
    proc: Proc,
    /// WireGuard family: the control socket, removed on drop if the daemon left it behind.
    uapi_socket: Option<PathBuf>,
}

impl End {}

impl End {
    /// A description of how the daemon ended, if it has.
    fn exited(&mut self) -> Option<String> {
        died(&mut self.proc, &format!("{} in {}", self.imp, self.node))
    }
}

impl Drop for End {
    fn drop(&mut self) {
        // SIGTERM first: wireguard-go and nebula then remove their control socket and device
        // themselves; a SIGKILL would leave the socket in the shared /var/run.
        let _ = self.proc.stop(Duration::from_secs(2));
        if let Some(sock) = &self.uapi_socket {
            let _ = std::fs::remove_file(sock);
        }
    }
}

/// Two lab nodes joined by a tunnel of a real implementation. Dropping it stops both daemons.
pub struct TunnelPair<'lab> {
    lab: &'lab Lab,
    ends: [End; 2],
    dir: PathBuf,
    /// Tailscale: Headscale and derper, stopped after the ends (fields drop in order).
    control: Option<tailscale::Control>,
}

/// Everything one end needs to know to start.
struct EndSpec<'a> {
    side: Side,
    node: &'a str,
    imp: Impl,
    iface: String,
    underlay: Ipv4Addr,
    peer_underlay: Ipv4Addr,
}

impl<'lab> TunnelPair<'lab> {
    /// Both ends run `imp`.
    pub fn up(
        lab: &'lab Lab,
        left: &str,
        right: &str,
        imp: Impl,
        opts: &TunnelOptions,
    ) -> Result<Self, LabError> {
        Self::up_mixed(lab, (left, imp), (right, imp), opts)
    }

    /// Each end runs its own implementation; they must speak the same protocol (any two of
    /// the WireGuard family interoperate, nebula only with nebula, Tailscale only with
    /// Tailscale).
    pub fn up_mixed(
        lab: &'lab Lab,
        left: (&str, Impl),
        right: (&str, Impl),
        opts: &TunnelOptions,
    ) -> Result<Self, LabError> {
        let family = left.1.family();
        if right.1.family() != family {
            return Err(LabError::Lab(format!(
                "{} and {} do not speak the same protocol; pair nebula only with nebula and \
                 tailscale only with tailscale",
                left.1, right.1
            )));
        }
        if opts.preshared_key && family != Family::WireGuard {
            return Err(LabError::Lab(
                "a preshared key is an option of the WireGuard peers; nebula and tailscale have \
                 none"
                    .into(),
            ));
        }
        left.1.check_installed()?;
        right.1.check_installed()?;

        let seq = NEXT_TUNNEL.fetch_add(1, Ordering::Relaxed);
        let dir = lab.log_dir().join(format!("tunnel{seq}"));
        std::fs::create_dir_all(&dir).map_err(|source| LabError::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        let prefix = match family {
            Family::WireGuard => "wg",
            Family::Nebula => "nb",
            Family::Tailscale => "ts",
        };
        let (la, ra) = (lab.addr(left.0)?, lab.addr(right.0)?);
        let specs = [(Side::Left, left, la, ra), (Side::Right, right, ra, la)].map(
            |(side, (node, imp), underlay, peer_underlay)| EndSpec {
                side,
                node,
                imp,
                // Unique on the machine (see UAPI_DIR) and at most 15 bytes (IFNAMSIZ - 1):
                // 2 + 5-character lab id + sequence + side.
                iface: format!("{prefix}{}{seq}{}", lab.id(), side.letter()),
                underlay,
                peer_underlay,
            },
        );
        if let Some(long) = specs.iter().find(|s| s.iface.len() > 15) {
            return Err(LabError::Lab(format!(
                "interface name {} is longer than Linux allows; this process has made too many tunnels",
                long.iface
            )));
        }

        let (ends, control) = match family {
            Family::WireGuard => (start_wireguard_pair(lab, &specs, &dir, opts)?, None),
            Family::Nebula => (start_nebula_pair(lab, &specs, &dir, opts)?, None),
            Family::Tailscale => {
                let (ends, control) = tailscale::start_pair(lab, &specs, &dir, opts)?;
                (ends, Some(control))
            }
        };
        let mut pair = TunnelPair {
            lab,
            ends,
            dir,
            control,
        };
        pair.wait_for_traffic(opts.timeout)?;
        if family == Family::Tailscale {
            // Measured once the path is direct, not relayed through DERP.
            tailscale::wait_direct(
                lab,
                &pair.dir,
                [(left.0, LEFT_ADDR), (right.0, RIGHT_ADDR)],
                opts.timeout,
            )?;
        }
        tracing::info!(left = %pair.ends[0].imp, right = %pair.ends[1].imp, "tunnel is up");
        Ok(pair)
    }

    /// Waits until a ping crosses the tunnel each way; for wireguard-go ends, also checks that
    /// they report a completed handshake.
    fn wait_for_traffic(&mut self, timeout: Duration) -> Result<(), LabError> {
        let lab = self.lab;
        for from in [Side::Left, Side::Right] {
            let node = self.ends[from.index()].node.clone();
            let target = from.other().tunnel_addr().to_string();
            let mut died = None;
            let ends = &mut self.ends;
            lab.wait_until(
                &format!("a ping from {node} to {target} through the tunnel"),
                timeout,
                || {
                    if let Some(d) = ends.iter_mut().find_map(End::exited) {
                        died = Some(d);
                        return true;
                    }
                    lab.exec_timeout(
                        &node,
                        &["ping", "-n", "-q", "-c", "1", "-W", "1", &target],
                        Duration::from_secs(5),
                    )
                    .is_ok_and(|o| o.status.success())
                },
            )?;
            if let Some(d) = died {
                return Err(LabError::Lab(d));
            }
        }
        for side in [Side::Left, Side::Right] {
            // Not boringtun-cli: it reports the seconds since the handshake where the UAPI
            // wants a timestamp (cloudflare/boringtun#447), which is 0 right after one.
            if matches!(
                self.ends[side.index()].imp,
                Impl::WireguardGo | Impl::WireguardGoCurrent
            ) && self.latest_handshake(side)? == Some(0)
            {
                return Err(LabError::Lab(format!(
                    "pings crossed, yet {} reports no handshake with its peer",
                    self.ends[side.index()].imp
                )));
            }
        }
        Ok(())
    }

    pub fn lab(&self) -> &'lab Lab {
        self.lab
    }

    /// The lab node an end runs in.
    pub fn node(&self, side: Side) -> &str {
        &self.ends[side.index()].node
    }

    /// The implementation an end runs.
    pub fn imp(&self, side: Side) -> Impl {
        self.ends[side.index()].imp
    }

    /// The tunnel interface's name in its node.
    pub fn iface(&self, side: Side) -> &str {
        &self.ends[side.index()].iface
    }

    /// The daemons' process ids (their CPU time is in /proc/PID/stat).
    pub fn pids(&self) -> [u32; 2] {
        [self.ends[0].proc.pid(), self.ends[1].proc.pid()]
    }

    /// Tailscale ends: the path to the other end as tailscaled reports it; None for the others.
    pub fn tailscale_path(&self, side: Side) -> Result<Option<tailscale::PathKind>, LabError> {
        let end = &self.ends[side.index()];
        if end.imp != Impl::Tailscale {
            return Ok(None);
        }
        tailscale::pair_path(self.lab, &self.dir, &end.node).map(Some)
    }

    /// Tailscale pairs: Headscale and derper (in the left node).
    pub fn tailscale_control(&self) -> Option<&tailscale::Control> {
        self.control.as_ref()
    }

    /// Where the configuration files of this pair are (inside the lab's log directory).
    pub fn config_dir(&self) -> &Path {
        &self.dir
    }

    /// WireGuard ends: seconds since the epoch of the last handshake with the peer (0: none
    /// yet), from `wg show IFACE latest-handshakes`. None for nebula and meshd (`meshd wg
    /// show` reports it). boringtun-cli answers with the seconds elapsed since the handshake
    /// instead (cloudflare/boringtun#447).
    pub fn latest_handshake(&self, side: Side) -> Result<Option<u64>, LabError> {
        let end = &self.ends[side.index()];
        if end.imp.family() != Family::WireGuard || end.imp == Impl::Meshd {
            return Ok(None);
        }
        let out = self
            .lab
            .exec(&end.node, &["wg", "show", &end.iface, "latest-handshakes"])?
            .ok()?;
        parse_wg_peer_field(&out, 1)
            .map(Some)
            .ok_or_else(|| bad_output("wg show latest-handshakes", &out))
    }

    /// WireGuard ends: the preshared key of the peer as `wg show` prints it ("(none)" when
    /// there is none). None for nebula and meshd (which never shows keys).
    pub fn preshared_key(&self, side: Side) -> Result<Option<String>, LabError> {
        let end = &self.ends[side.index()];
        if end.imp.family() != Family::WireGuard || end.imp == Impl::Meshd {
            return Ok(None);
        }
        let out = self
            .lab
            .exec(&end.node, &["wg", "show", &end.iface, "preshared-keys"])?
            .ok()?;
        out.lines()
            .next()
            .and_then(|l| l.split('\t').nth(1))
            .map(|k| Some(k.trim().to_owned()))
            .ok_or_else(|| bad_output("wg show preshared-keys", &out))
    }

    /// Bytes (received, sent) by the tunnel interface of an end, from the kernel's counters.
    pub fn iface_bytes(&self, side: Side) -> Result<(u64, u64), LabError> {
        let end = &self.ends[side.index()];
        let base = format!("/sys/class/net/{}/statistics", end.iface);
        // `ip netns exec` mounts the namespace's own /sys, so the counters are read there.
        let out = self
            .lab
            .exec(
                &end.node,
                &[
                    "cat",
                    &format!("{base}/rx_bytes"),
                    &format!("{base}/tx_bytes"),
                ],
            )?
            .ok()?;
        let mut n = out.lines().map(|l| l.trim().parse::<u64>());
        match (n.next(), n.next()) {
            (Some(Ok(rx)), Some(Ok(tx))) => Ok((rx, tx)),
            _ => Err(bad_output("interface statistics", &out)),
        }
    }

    /// Round-trip times (ms) of `count` pings from one end to the other through the tunnel.
    pub fn ping(&self, from: Side, count: u32, interval: Duration) -> Result<Vec<f64>, LabError> {
        ping_addr(
            self.lab,
            self.node(from),
            from.other().tunnel_addr(),
            count,
            interval,
        )
    }

    /// One iperf3 TCP test through the tunnel: client in the left node, server in the right
    /// (`reverse`: the right node sends).
    pub fn iperf3(&self, test: Iperf3Test) -> Result<Iperf3Result, LabError> {
        let server = Iperf3Server::start(self.lab, self.node(Side::Right))?;
        server.run(self.node(Side::Left), RIGHT_ADDR, test)
    }

    /// Stops both daemons now (dropping does the same).
    pub fn down(self) {}
}

/// Keys, config files and daemons of two WireGuard-family ends.
fn start_wireguard_pair(
    lab: &Lab,
    specs: &[EndSpec<'_>; 2],
    dir: &Path,
    opts: &TunnelOptions,
) -> Result<[End; 2], LabError> {
    let private = [wg_output(&["genkey"], None)?, wg_output(&["genkey"], None)?];
    let public = [
        wg_output(&["pubkey"], Some(&private[0]))?,
        wg_output(&["pubkey"], Some(&private[1]))?,
    ];
    let psk = if opts.preshared_key {
        Some(wg_output(&["genpsk"], None)?)
    } else {
        None
    };
    let mut ends = Vec::with_capacity(2);
    for spec in specs {
        let (me, peer) = (spec.side.index(), spec.side.other().index());
        let mut conf = format!(
            "[Interface]\nPrivateKey = {}\nListenPort = {}\n",
            private[me], opts.listen_port
        );
        // meshd reads a wg-quick file and sets the interface up itself; `wg setconf` would
        // refuse these keys.
        if spec.imp == Impl::Meshd {
            let _ = writeln!(
                conf,
                "Address = {}/{TUNNEL_PREFIX}\nMTU = {}",
                spec.side.tunnel_addr(),
                opts.mtu
            );
        }
        let _ = write!(
            conf,
            "\n[Peer]\nPublicKey = {}\nAllowedIPs = {}/32\nEndpoint = {}:{}\n",
            public[peer],
            spec.side.other().tunnel_addr(),
            spec.peer_underlay,
            opts.listen_port,
        );
        if let Some(k) = &psk {
            let _ = writeln!(conf, "PresharedKey = {k}");
        }
        let conf_path = dir.join(format!("{}.conf", spec.iface));
        write_secret(&conf_path, &conf)?;
        ends.push(start_wireguard_end(lab, spec, &conf_path, opts)?);
    }
    into_pair(ends)
}

fn start_wireguard_end(
    lab: &Lab,
    spec: &EndSpec<'_>,
    conf: &Path,
    opts: &TunnelOptions,
) -> Result<End, LabError> {
    let iface = spec.iface.as_str();
    if spec.imp == Impl::Meshd {
        return start_meshd_end(lab, spec, conf, opts);
    }
    let mut argv: Vec<String> = match spec.imp {
        Impl::WireguardGo => vec!["wireguard-go".into(), "-f".into()],
        Impl::WireguardGoCurrent => vec![
            locate_installed_peer("wireguard-go", "wireguard-go")?
                .display()
                .to_string(),
            "-f".into(),
        ],
        Impl::BoringtunCli { threads } => {
            let mut v = vec![
                locate_boringtun_cli()?.display().to_string(),
                "--foreground".into(),
                // It would otherwise switch to an unprivileged user, which may not exist.
                "--disable-drop-privileges".into(),
            ];
            if let Some(n) = threads {
                v.extend(["--threads".into(), n.to_string()]);
            }
            v
        }
        Impl::Nebula | Impl::Meshd | Impl::Tailscale => {
            return Err(LabError::Lab(format!(
                "{} is not configured with wg setconf",
                spec.imp
            )))
        }
    };
    argv.push(iface.to_owned());
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let socket = Path::new(UAPI_DIR).join(format!("{iface}.sock"));
    let mut end = End {
        node: spec.node.to_owned(),
        imp: spec.imp,
        iface: iface.to_owned(),
        proc: lab.spawn(spec.node, iface, &argv)?,
        uapi_socket: Some(socket.clone()),
    };
    // The daemons create the interface before they open the control socket.
    wait_started(
        lab,
        &mut end,
        &format!("{} to open {}", spec.imp, socket.display()),
        opts.timeout,
        || socket.exists(),
    )?;
    let conf_s = conf.display().to_string();
    lab.exec(spec.node, &["wg", "setconf", iface, &conf_s])?
        .ok()?;
    let ns = lab.ns(spec.node)?;
    sys::run(
        "ip",
        &["-n", ns, "-batch", "-"],
        Some(&format!(
            "address add {}/{TUNNEL_PREFIX} dev {iface}\nlink set dev {iface} mtu {} up\n\
             route replace {}/32 dev {iface}\n",
            spec.side.tunnel_addr(),
            opts.mtu,
            spec.side.other().tunnel_addr(),
        )),
    )?;
    tracing::debug!(node = spec.node, imp = %spec.imp, iface, underlay = %spec.underlay, "WireGuard end configured");
    Ok(end)
}

/// `meshd wg up --foreground`: it creates, addresses and routes the interface itself, and its
/// control socket appears once the interface is up.
fn start_meshd_end(
    lab: &Lab,
    spec: &EndSpec<'_>,
    conf: &Path,
    opts: &TunnelOptions,
) -> Result<End, LabError> {
    let (meshd, conf) = (
        locate_meshd()?.display().to_string(),
        conf.display().to_string(),
    );
    let iface = spec.iface.as_str();
    let mut argv = vec![
        meshd.as_str(),
        "wg",
        "up",
        &conf,
        "--foreground",
        "--interface",
        iface,
    ];
    argv.extend(opts.meshd_args.iter().map(String::as_str));
    let socket = Path::new(UAPI_DIR).join(format!("{iface}.sock"));
    let mut end = End {
        node: spec.node.to_owned(),
        imp: spec.imp,
        iface: iface.to_owned(),
        proc: lab.spawn(spec.node, iface, &argv)?,
        uapi_socket: Some(socket.clone()),
    };
    wait_started(
        lab,
        &mut end,
        &format!("meshd to open {}", socket.display()),
        opts.timeout,
        || socket.exists(),
    )?;
    Ok(end)
}

/// A CA, two certificates and two nebula daemons that find each other through a static host
/// map (no lighthouse: both underlay addresses are known).
fn start_nebula_pair(
    lab: &Lab,
    specs: &[EndSpec<'_>; 2],
    dir: &Path,
    opts: &TunnelOptions,
) -> Result<[End; 2], LabError> {
    let path = |name: &str| dir.join(name).display().to_string();
    let (ca_crt, ca_key) = (path("ca.crt"), path("ca.key"));
    sys::run(
        "nebula-cert",
        &[
            "ca",
            "-name",
            "meshd-lab",
            "-out-crt",
            &ca_crt,
            "-out-key",
            &ca_key,
        ],
        None,
    )?;
    let mut ends = Vec::with_capacity(2);
    for spec in specs {
        let (crt, key) = (
            path(&format!("{}.crt", spec.iface)),
            path(&format!("{}.key", spec.iface)),
        );
        let ip = format!("{}/{TUNNEL_PREFIX}", spec.side.tunnel_addr());
        sys::run(
            "nebula-cert",
            &[
                "sign", "-name", spec.node, "-ip", &ip, "-ca-crt", &ca_crt, "-ca-key", &ca_key,
                "-out-crt", &crt, "-out-key", &key,
            ],
            None,
        )?;
        let config = nebula_config(spec, opts, &ca_crt, &crt, &key);
        let config_path = dir.join(format!("{}.yml", spec.iface));
        write_secret(&config_path, &config)?;
        let config_s = config_path.display().to_string();
        let mut end = End {
            node: spec.node.to_owned(),
            imp: spec.imp,
            iface: spec.iface.clone(),
            proc: lab.spawn(spec.node, &spec.iface, &["nebula", "-config", &config_s])?,
            uapi_socket: None,
        };
        // Nebula assigns the address from its certificate itself; once it is there, the
        // interface is up and routed.
        let want = format!("inet {ip} ");
        let (node, iface) = (spec.node.to_owned(), spec.iface.clone());
        wait_started(
            lab,
            &mut end,
            &format!("nebula to configure {iface} in {node}"),
            opts.timeout,
            || {
                lab.exec(&node, &["ip", "-o", "-4", "address", "show", "dev", &iface])
                    .is_ok_and(|o| o.stdout.contains(&want))
            },
        )?;
        ends.push(end);
    }
    into_pair(ends)
}

fn nebula_config(
    spec: &EndSpec<'_>,
    opts: &TunnelOptions,
    ca: &str,
    crt: &str,
    key: &str,
) -> String {
    let port = opts.listen_port;
    format!(
        "pki:\n  ca: {ca}\n  cert: {crt}\n  key: {key}\n\
         static_host_map:\n  \"{peer}\": [\"{peer_underlay}:{port}\"]\n\
         lighthouse:\n  am_lighthouse: false\n  hosts: []\n\
         listen:\n  host: {underlay}\n  port: {port}\n\
         punchy:\n  punch: false\n\
         tun:\n  dev: {iface}\n  mtu: {mtu}\n\
         logging:\n  level: info\n\
         firewall:\n  outbound:\n    - port: any\n      proto: any\n      host: any\n  \
         inbound:\n    - port: any\n      proto: any\n      host: any\n",
        peer = spec.side.other().tunnel_addr(),
        peer_underlay = spec.peer_underlay,
        underlay = spec.underlay,
        iface = spec.iface,
        mtu = opts.mtu,
    )
}

/// Waits for `ready`, failing at once with the daemon's output if it exits first.
fn wait_started(
    lab: &Lab,
    end: &mut End,
    what: &str,
    timeout: Duration,
    ready: impl FnMut() -> bool,
) -> Result<(), LabError> {
    let who = format!("{} in {}", end.imp, end.node);
    wait_running(lab, &mut end.proc, &who, what, timeout, ready)
}

/// Waits for `ready`, failing at once with `who`'s output if `proc` exits first.
fn wait_running(
    lab: &Lab,
    proc: &mut Proc,
    who: &str,
    what: &str,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<(), LabError> {
    let mut ended = None;
    lab.wait_until(what, timeout, || {
        ended = died(proc, who);
        ended.is_some() || ready()
    })?;
    ended.map_or(Ok(()), |e| Err(LabError::Lab(e)))
}

/// How `proc` ended, if it has: `who` exited, with the end of its output.
fn died(proc: &mut Proc, who: &str) -> Option<String> {
    let status = proc.try_wait()?;
    Some(format!(
        "{who} exited ({status}); its output ({}):\n{}",
        proc.log_path().display(),
        tail(&proc.log(), 2000)
    ))
}

fn into_pair(ends: Vec<End>) -> Result<[End; 2], LabError> {
    ends.try_into()
        .map_err(|_| LabError::Lab("a tunnel pair needs exactly two ends".into()))
}

/// Runs `wg` (key generation only: no interface, no namespace) and returns its one line.
fn wg_output(args: &[&str], stdin: Option<&str>) -> Result<String, LabError> {
    let out = sys::run("wg", args, stdin.map(|s| format!("{s}\n")).as_deref())?;
    let key = out.trim().to_owned();
    if key.len() == 44 {
        Ok(key)
    } else {
        Err(bad_output(&format!("wg {}", args.join(" ")), &out))
    }
}

/// Writes a file that holds a private key, readable by its owner only.
fn write_secret(path: &Path, text: &str) -> Result<(), LabError> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|source| LabError::Io {
            what: format!("writing {}", path.display()),
            source,
        })
}

fn bad_output(what: &str, out: &str) -> LabError {
    LabError::Lab(format!(
        "unexpected output from {what}: {:?}",
        tail(out, 500)
    ))
}

/// The `field`-th tab-separated value after the key on the first peer line of `wg show`.
fn parse_wg_peer_field(out: &str, field: usize) -> Option<u64> {
    out.lines()
        .next()?
        .split('\t')
        .nth(field)?
        .trim()
        .parse()
        .ok()
}

static MESHD_BINARY: OnceLock<PathBuf> = OnceLock::new();

/// Makes [`Impl::Meshd`] run this binary; tests pass `env!("CARGO_BIN_EXE_meshd")`. The first
/// call wins.
pub fn use_meshd_binary(path: impl Into<PathBuf>) {
    let _ = MESHD_BINARY.set(path.into());
}

/// The meshd binary for [`Impl::Meshd`]: the one given to [`use_meshd_binary`], else this
/// process's own executable when it is meshd (`meshd lab bench`), else `meshd` in PATH.
pub fn locate_meshd() -> Result<PathBuf, LabError> {
    if let Some(path) = MESHD_BINARY.get() {
        return Ok(path.clone());
    }
    if let Ok(exe) = std::env::current_exe() {
        if exe.file_name().is_some_and(|n| n == "meshd") {
            return Ok(exe);
        }
    }
    let dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    find_program(&dirs, "meshd").ok_or_else(|| {
        LabError::Lab(
            "no meshd binary: call peers::use_meshd_binary, run from the meshd binary, or put \
             meshd in PATH"
                .into(),
        )
    })
}

/// Finds `boringtun-cli` where `scripts/install-peers boringtun` puts it, then in PATH, then in
/// Cargo's bin directory, where a `cargo install` by hand puts it.
pub fn locate_boringtun_cli() -> Result<PathBuf, LabError> {
    let mut dirs: Vec<PathBuf> = vec![installed_peers_dir()];
    dirs.extend(
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .unwrap_or_default(),
    );
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    find_program(&dirs, "boringtun-cli").ok_or_else(|| {
        LabError::Lab(
            "`boringtun-cli` is not installed (it is not a Debian package): run \
             `scripts/install-peers boringtun` (PATH and ~/.cargo/bin are searched too)"
                .into(),
        )
    })
}

/// Where `scripts/install-peers` puts what it builds: `$MESHD_PEERS_DIR/bin`, by default
/// /opt/meshd-peers/bin.
pub fn installed_peers_dir() -> PathBuf {
    std::env::var_os("MESHD_PEERS_DIR")
        .map_or_else(|| PathBuf::from("/opt/meshd-peers"), PathBuf::from)
        .join("bin")
}

/// A program built by `scripts/install-peers PEER`; fails naming that command if it is not
/// there. PATH is not searched: Debian's `wireguard-go` has the same name as the current one.
pub fn locate_installed_peer(program: &str, peer: &str) -> Result<PathBuf, LabError> {
    let dir = installed_peers_dir();
    find_program(std::slice::from_ref(&dir), program).ok_or_else(|| {
        LabError::Lab(format!(
            "`{program}` is not built in {}; build it with `scripts/install-peers {peer}`",
            dir.display()
        ))
    })
}

/// Runs this source tree's `scripts/install-peers` with `peers` (it skips what is already built
/// at its pin; a build takes minutes). Its output goes to this process's stderr. Fails if the
/// script is gone (a binary moved away from its source tree): then run it by hand.
pub fn install_peers(peers: &[&str]) -> Result<(), LabError> {
    if peers.is_empty() {
        return Ok(());
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install-peers");
    if !script.is_file() {
        return Err(LabError::Lab(format!(
            "{} is not there to build {}; build them with scripts/install-peers from meshd's \
             source tree",
            script.display(),
            peers.join(", ")
        )));
    }
    tracing::info!(peers = ?peers, "scripts/install-peers");
    let status = std::process::Command::new(&script)
        .args(peers)
        // stdout too: a benchmark's stdout is its table.
        .stdout(std::io::stderr())
        .stderr(std::process::Stdio::inherit())
        .status()
        .map_err(|source| LabError::Io {
            what: format!("running {}", script.display()),
            source,
        })?;
    if status.success() {
        Ok(())
    } else {
        Err(LabError::Lab(format!(
            "{} {} failed ({status})",
            script.display(),
            peers.join(" ")
        )))
    }
}

fn find_program(dirs: &[PathBuf], name: &str) -> Option<PathBuf> {
    dirs.iter().map(|d| d.join(name)).find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wg_show_output() {
        let key = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
        assert_eq!(
            parse_wg_peer_field(&format!("{key}\t1700000000\n"), 1),
            Some(1_700_000_000)
        );
        assert_eq!(parse_wg_peer_field(&format!("{key}\t0\n"), 1), Some(0));
        assert_eq!(
            parse_wg_peer_field(&format!("{key}\t1200\t3400\n"), 2),
            Some(3400)
        );
        assert_eq!(parse_wg_peer_field("", 1), None);
        assert_eq!(parse_wg_peer_field(&format!("{key}\tnever\n"), 1), None);
    }

    #[test]
    fn finds_programs_only_where_they_are() {
        let dir = std::env::temp_dir().join(format!("netlab-peers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("boringtun-cli"), b"").unwrap();
        let nowhere = dir.join("missing");
        assert_eq!(
            find_program(&[nowhere.clone(), dir.clone()], "boringtun-cli"),
            Some(dir.join("boringtun-cli"))
        );
        assert_eq!(find_program(&[nowhere], "boringtun-cli"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tail_keeps_the_end_on_a_character_boundary() {
        assert_eq!(tail("abcdef", 3), "def");
        assert_eq!(tail("ab", 10), "ab");
        assert_eq!(tail("aé", 1), "");
    }
}
