//! `meshd up`, `status`, `down`, `rotate-key`: the node agent, run by
//! `meshd_agent::node_runtime`. See docs/agent.md.
#![allow(clippy::print_stdout)] // a CLI talks to its user on stdout

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use clap::Args;
use meshd_agent::control::ipc::NodeStatus;
use meshd_agent::control::state_dir::{FirstJoin, StateDir, DEFAULT_STATE_DIR};
use meshd_agent::node_runtime::{self, UpOptions};
use meshd_dataplane::standalone;
use meshd_proto::token::JoinToken;
use meshd_relay::client::TransportChoice;
use zeroize::Zeroizing;

use crate::daemon::{self, Started};

/// The background daemon's log, in the state directory.
const DAEMON_LOG: &str = "meshd.log";

/// How long `up` waits for the background daemon: a first join may try up
/// to 16 coordinator addresses (3 s each when none answers), then wait up to
/// 20 s for the peer map.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Args)]
pub struct UpArgs {
    /// The join token from `meshd coord token create`. Needed the first time
    /// only: afterwards the node logs in with its key.
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
    /// Read the join token from this file instead (keeps it out of `ps`).
    #[arg(long, value_name = "FILE", conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// The node's name in the mesh (default: the host name). Used when
    /// registering.
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    state: StateArg,
    /// The mesh interface (TUN device).
    #[arg(long, default_value = "meshd0", value_name = "NAME")]
    interface: String,
    /// UDP port of the data plane (default: the one used last, else any).
    #[arg(long, value_name = "PORT")]
    listen_port: Option<u16>,
    /// Rotate the node's key this often (e.g. 24h, 30m); peers follow
    /// within seconds and traffic continues.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    rotate_key_every: Option<Duration>,
    /// Stay in the foreground, logging to stderr, until SIGINT or SIGTERM.
    #[arg(long)]
    foreground: bool,
    #[command(flatten)]
    poll: crate::wg_cmd::AnswerPollArg,
    /// How to reach relays: auto (QUIC, with TLS over TCP after a head
    /// start), quic or tls.
    #[arg(long, default_value = "auto", value_parser = ["auto", "quic", "tls"])]
    relay_transport: String,
    /// Keep every peer on the relay; never try a direct path (for tests and
    /// benchmarks).
    #[arg(long)]
    no_direct: bool,
    /// The birthday technique for a NAT that maps per destination facing
    /// one that filters per address and port: extra sockets the hard side
    /// opens (0 turns the technique off).
    #[arg(long, default_value_t = 256)]
    birthday_sockets: u32,
    /// Probes the easy side sends per attempt, 250 a second (0 turns the
    /// technique off).
    #[arg(long, default_value_t = 1024)]
    birthday_probes: u32,
    /// Internal: this process is the background daemon that `up` started;
    /// the token, if any, comes on stdin.
    #[arg(long, hide = true)]
    daemon_child: bool,
}

#[derive(Args, Clone)]
pub struct StateArg {
    /// The node's state directory (keys, coordinator, control socket).
    #[arg(long = "state", default_value = DEFAULT_STATE_DIR, value_name = "DIR")]
    pub dir: PathBuf,
}

#[derive(Args, Clone)]
pub struct StatusArgs {
    #[command(flatten)]
    pub state: StateArg,
    /// Print JSON (fields in docs/agent.md) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// A duration as `meshd coord` takes them: `24h`, `30m`, `7d`, `1h 30m`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be longer than zero".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("{s:?}: {e} (e.g. 24h, 30m, 7d)")),
    }
}

fn read_token(args: &UpArgs) -> Result<Option<Zeroizing<String>>> {
    if args.daemon_child {
        let mut text = Zeroizing::new(String::new());
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading the join token from the parent")?;
        return Ok((!text.trim().is_empty()).then_some(text));
    }
    if let Some(path) = &args.token_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read the join token", path.display()))?;
        return Ok(Some(Zeroizing::new(text)));
    }
    Ok(args.token.clone().map(Zeroizing::new))
}

pub fn up(args: UpArgs) -> Result<()> {
    standalone::validate_name(&args.interface)?;
    let token_text = read_token(&args)?;
    let token = token_text
        .as_ref()
        .map(|t| JoinToken::parse(t))
        .transpose()
        .map_err(|e| anyhow!("--token: {e}"))?;
    if args.daemon_child {
        return run(&args, token);
    }
    // A first join that fails leaves nothing behind; the daemon child's
    // parent, or the foreground run, cleans up.
    let first_join = token
        .as_ref()
        .and_then(|_| FirstJoin::note(&absolute(&args.state.dir).ok()?));
    let result = if args.foreground {
        run(&args, token)
    } else {
        start_daemon(&args, token_text.as_deref().map(String::as_str))
    };
    result.inspect_err(|e| {
        if let Some(first_join) = first_join {
            first_join.undo(e.is::<SeeLog>());
        }
    })
}

fn run(args: &UpArgs, token: Option<JoinToken>) -> Result<()> {
    let stop = daemon::stop_on_signal(args.daemon_child)?;
    let mut opts = UpOptions::new(absolute(&args.state.dir)?, args.interface.clone());
    opts.token = token;
    opts.name = args.name.clone();
    opts.listen_port = args.listen_port;
    opts.rotate_every = args.rotate_key_every;
    opts.answer_poll = args.poll.get();
    opts.traversal.no_direct = args.no_direct;
    opts.traversal.birthday.sockets = args.birthday_sockets;
    opts.traversal.birthday.probes = args.birthday_probes;
    opts.traversal.birthday.enabled = args.birthday_sockets > 0 && args.birthday_probes > 0;
    opts.traversal.relay_transport = match args.relay_transport.as_str() {
        "quic" => Some(TransportChoice::Quic),
        "tls" => Some(TransportChoice::Tls),
        _ => None,
    };
    let daemon_child = args.daemon_child;
    node_runtime::run(opts, &stop, |status| {
        if daemon_child {
            daemon::report_ready();
        } else {
            eprintln!("{}", ready_line(status));
        }
    })?;
    Ok(())
}

fn ready_line(s: &NodeStatus) -> String {
    let addrs = [s.ipv4.map(|a| a.to_string()), s.ipv6.map(|a| a.to_string())]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "meshd: {} is up on {} ({addrs}); `meshd status` shows the mesh, `meshd down` stops it",
        if s.name.is_empty() {
            "this node"
        } else {
            &s.name
        },
        s.interface
    )
}

fn absolute(p: &Path) -> Result<PathBuf> {
    if p.is_absolute() {
        return Ok(p.to_owned());
    }
    Ok(std::env::current_dir()
        .context("the current directory")?
        .join(p))
}

/// Starts this program again as a detached daemon (`--daemon-child`, the
/// token on its stdin, its log appended to `meshd.log` in the state
/// directory), waits until it reports the node up, or passes on its error.
fn start_daemon(args: &UpArgs, token: Option<&str>) -> Result<()> {
    let exe = std::env::current_exe().context("locating the meshd executable")?;
    let state = absolute(&args.state.dir)?;
    StateDir::open(&state)?;
    // A file, not a pipe: the daemon outlives this process, and a log line
    // written to a pipe nobody reads any more would be its end.
    let log_path = state.join(DAEMON_LOG);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_path)
        .with_context(|| format!("{}: cannot open the daemon's log", log_path.display()))?;
    let mut cmd = Command::new(exe);
    cmd.arg("up").arg("--state").arg(&state).args([
        "--interface",
        &args.interface,
        "--daemon-child",
    ]);
    if let Some(name) = &args.name {
        cmd.args(["--name", name]);
    }
    if let Some(port) = args.listen_port {
        cmd.args(["--listen-port", &port.to_string()]);
    }
    if let Some(d) = args.rotate_key_every {
        cmd.args(["--rotate-key-every", &format!("{}ms", d.as_millis())]);
    }
    cmd.args(args.poll.to_args());
    cmd.args(["--relay-transport", &args.relay_transport]);
    if args.no_direct {
        cmd.arg("--no-direct");
    }
    cmd.args(["--birthday-sockets", &args.birthday_sockets.to_string()]);
    cmd.args(["--birthday-probes", &args.birthday_probes.to_string()]);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .context("starting the meshd daemon")?;
    if let Some(mut stdin) = child.stdin.take() {
        // The token goes through a pipe, not the daemon's command line.
        stdin
            .write_all(token.unwrap_or_default().as_bytes())
            .context("passing the join token to the daemon")?;
    }
    match daemon::wait_ready(&mut child, READY_TIMEOUT)? {
        Started::Ready => {
            match node_runtime::status(&state) {
                Ok(s) => eprintln!("{}", ready_line(&s)),
                Err(_) => eprintln!("meshd: up"),
            }
            Ok(())
        }
        Started::Failed(message) => Err(anyhow!(message)),
        Started::Exited(status) => Err(SeeLog(format!(
            "the meshd daemon exited ({status}) before the node was up; its log is {}",
            log_path.display()
        ))
        .into()),
        Started::TimedOut => Err(SeeLog(format!(
            "the meshd daemon was not up within {} s and was killed; its log is {}",
            READY_TIMEOUT.as_secs(),
            log_path.display()
        ))
        .into()),
    }
}

/// A daemon that failed without saying why: its log is where to look.
#[derive(Debug)]
struct SeeLog(String);

impl std::fmt::Display for SeeLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SeeLog {}

pub fn status(args: StatusArgs) -> Result<()> {
    let s = node_runtime::status(&absolute(&args.state.dir)?)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status_json(&s))?);
    } else {
        print!("{}", format_status(&s));
    }
    Ok(())
}

/// `meshd status --json` (docs/agent.md, "Status").
fn status_json(s: &NodeStatus) -> serde_json::Value {
    let c = &s.control;
    let peers: Vec<serde_json::Value> = s
        .peers
        .iter()
        .map(|p| {
            let via = match (p.path.as_str(), p.endpoint, &p.relay) {
                ("direct", Some(e), _) => Some(e.to_string()),
                ("relay", _, Some(r)) => Some(r.clone()),
                _ => None,
            };
            serde_json::json!({
                "name": p.name,
                "node_id": p.node_id,
                "public_key": p.public_key.to_string(),
                "ipv4": p.ipv4.to_string(),
                "ipv6": p.ipv6.to_string(),
                "path": {
                    "kind": p.path,
                    "via": via,
                    "rtt_ms": p.rtt_us.map(|r| r as f64 / 1000.0),
                },
                "endpoint": p.endpoint.map(|e| e.to_string()),
                "candidates": p.candidates.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "last_handshake_s": p.handshake_age,
                "rx_bytes": p.rx_bytes,
                "tx_bytes": p.tx_bytes,
            })
        })
        .collect();
    serde_json::json!({
        "name": s.name,
        "node_id": s.node_id,
        "public_key": s.public_key.map(|k| k.to_string()),
        "ipv4": s.ipv4.map(|a| a.to_string()),
        "ipv6": s.ipv6.map(|a| a.to_string()),
        "interface": s.interface,
        "listen_port": s.listen_port,
        "home_relay": s.home_relay,
        "control": {
            "state": c.state,
            "coordinator": c.coordinator,
            "transport": c.transport,
            "connected_for_s": c.connected_for,
            "retry_in_ms": c.retry_in_ms,
            "last_error": c.last_error,
            "sessions": c.sessions,
        },
        "peers": peers,
    })
}

#[derive(Args)]
pub struct PingArgs {
    /// The peer: its name or mesh address.
    peer: String,
    /// How many pings (one a second).
    #[arg(short = 'c', long, default_value_t = 5)]
    count: u32,
    #[command(flatten)]
    state: StateArg,
    /// One JSON object per reply.
    #[arg(long)]
    json: bool,
}

/// `meshd ping`: discovery pings on the peer's current path; each reply
/// says which path answered, so an upgrade from relay to direct shows.
pub fn ping(args: PingArgs) -> Result<()> {
    let dir = absolute(&args.state.dir)?;
    let mut answered = 0;
    let mut last_via: Option<String> = None;
    for i in 0..args.count {
        if i > 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
        match node_runtime::ping(&dir, &args.peer) {
            Ok((via, rtt, age)) => {
                answered += 1;
                let ms = rtt.as_secs_f64() * 1000.0;
                if args.json {
                    let v = serde_json::json!({
                        "peer": args.peer, "seq": i, "via": via, "rtt_ms": ms,
                        "path_age_s": age.as_secs_f64(),
                    });
                    println!("{v}");
                } else {
                    let changed = match &last_via {
                        Some(prev) if *prev != via => {
                            format!(" (path changed {:.1} s ago, was {prev})", age.as_secs_f64())
                        }
                        _ => String::new(),
                    };
                    println!("pong from {} via {via} in {ms:.2} ms{changed}", args.peer);
                }
                last_via = Some(via);
            }
            Err(node_runtime::NodeError::Daemon(e)) if e == "no answer" => {
                if args.json {
                    println!(
                        "{}",
                        serde_json::json!({"peer": args.peer, "seq": i, "timeout": true})
                    );
                } else {
                    println!("no answer from {}", args.peer);
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    if answered == 0 {
        anyhow::bail!("{} did not answer", args.peer);
    }
    Ok(())
}

/// `meshd netcheck`: what the node found of its network.
pub fn netcheck(args: StatusArgs) -> Result<()> {
    let fields = node_runtime::netcheck(&absolute(&args.state.dir)?)?;
    let get = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| v.clone());
    let relays: Vec<(String, f64)> = fields
        .iter()
        .filter(|(k, _)| k == "relay")
        .filter_map(|(_, v)| {
            let (r, ms) = v.split_once(' ')?;
            Some((r.to_owned(), ms.parse().ok()?))
        })
        .collect();
    let udp = get("udp").as_deref() == Some("true");
    let varies = get("mapping_varies").map(|v| v == "true");
    if args.json {
        let latency: serde_json::Map<String, serde_json::Value> = relays
            .iter()
            .map(|(r, ms)| (r.clone(), (*ms).into()))
            .collect();
        let v = serde_json::json!({
            "udp": udp,
            "public_address": get("public"),
            "mapping_varies_by_destination": varies,
            "relay_latency_ms": latency,
            "preferred_relay": get("preferred"),
            "home_relay": get("home"),
            "home_relay_transport": get("home_transport"),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "UDP: {}",
        if udp {
            "works"
        } else {
            "blocked (relays over TLS/TCP only)"
        }
    );
    if let Some(p) = get("public") {
        println!("public address: {p}");
    }
    match varies {
        Some(true) => println!("mapping varies by destination: yes (a symmetric NAT: direct paths need the peer to be reachable)"),
        Some(false) => println!("mapping varies by destination: no"),
        None => println!("mapping varies by destination: unknown"),
    }
    for (r, ms) in &relays {
        println!("relay {r}: {ms:.1} ms");
    }
    if let Some(p) = get("preferred") {
        println!("preferred relay: {p}");
    }
    if let Some(h) = get("home") {
        println!(
            "home relay: {h} over {}",
            get("home_transport").unwrap_or_default()
        );
    }
    Ok(())
}

pub fn down(state: StateArg) -> Result<()> {
    Ok(node_runtime::down(&absolute(&state.dir)?)?)
}

pub fn rotate_key(state: StateArg) -> Result<()> {
    let key = node_runtime::rotate_key(&absolute(&state.dir)?)?;
    println!("{key}");
    Ok(())
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[unit])
    }
}

/// `meshd status`: the node, its control connection, then each peer, in
/// `label: value` lines like `wg show`.
pub fn format_status(s: &NodeStatus) -> String {
    let mut out = String::new();
    let id = s.node_id.map(|i| format!(" (id {i})")).unwrap_or_default();
    let name = if s.name.is_empty() {
        "(not joined yet)"
    } else {
        &s.name
    };
    out.push_str(&format!("node: {name}{id}\n"));
    if let Some(k) = s.public_key {
        out.push_str(&format!("  public key: {k}\n"));
    }
    let addrs: Vec<String> = [s.ipv4.map(|a| a.to_string()), s.ipv6.map(|a| a.to_string())]
        .into_iter()
        .flatten()
        .collect();
    if !addrs.is_empty() {
        out.push_str(&format!("  addresses: {}\n", addrs.join(", ")));
    }
    match s.listen_port {
        Some(p) => out.push_str(&format!("  interface: {}, UDP port {p}\n", s.interface)),
        None => out.push_str(&format!("  interface: {} (not up yet)\n", s.interface)),
    }
    let c = &s.control;
    let at = c.coordinator.as_deref().unwrap_or("?");
    let line = match c.state.as_str() {
        "connected" => format!(
            "connected to {at} over {} for {} s",
            c.transport.as_deref().unwrap_or("?"),
            c.connected_for.unwrap_or(0)
        ),
        "connecting" => format!("connecting to {at}"),
        "joining" => format!("joining at {at}"),
        "waiting" => format!(
            "disconnected, next attempt in {:.1} s",
            c.retry_in_ms.unwrap_or(0) as f64 / 1000.0
        ),
        other => other.to_owned(),
    };
    out.push_str(&format!("  coordinator: {line}\n"));
    out.push_str(&format!("  control sessions: {}\n", c.sessions));
    if let Some(e) = &c.last_error {
        out.push_str(&format!("  last error: {e}\n"));
    }
    for p in &s.peers {
        out.push_str(&format!("\npeer: {} (id {})\n", p.name, p.node_id));
        out.push_str(&format!("  addresses: {}, {}\n", p.ipv4, p.ipv6));
        out.push_str(&format!("  public key: {}\n", p.public_key));
        if let Some(e) = p.endpoint {
            out.push_str(&format!("  endpoint: {e}\n"));
        }
        if !p.candidates.is_empty() {
            let c: Vec<String> = p.candidates.iter().map(ToString::to_string).collect();
            out.push_str(&format!("  candidates: {}\n", c.join(", ")));
        }
        let rtt = p
            .rtt_us
            .map(|r| format!(", rtt {:.1} ms", r as f64 / 1000.0))
            .unwrap_or_default();
        match (p.path.as_str(), p.endpoint, &p.relay) {
            ("direct", Some(e), _) => out.push_str(&format!("  path: direct {e}{rtt}\n")),
            ("relay", _, Some(r)) => out.push_str(&format!("  path: relay {r}{rtt}\n")),
            (other, _, _) => out.push_str(&format!("  path: {other}\n")),
        }
        match p.handshake_age {
            Some(a) => out.push_str(&format!("  latest handshake: {a} s ago\n")),
            None => out.push_str("  latest handshake: none\n"),
        }
        out.push_str(&format!(
            "  transfer: {} received, {} sent\n",
            bytes(p.rx_bytes),
            bytes(p.tx_bytes)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_a_unit() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604800)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("soon").is_err());
    }
}
