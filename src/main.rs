//! meshd: the one binary. A thin CLI that wires subcommands to the library crates.
use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

mod coord_cmd;
mod daemon;
mod key_cmd;
mod lab_cmd;
mod relay_cmd;
mod up_cmd;
mod wg_cmd;

#[derive(Parser)]
#[command(
    name = "meshd",
    version,
    about = "Overlay-network mesh for serverless functions"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The network-namespace laboratory: an emulated internet with NATs, firewalls and latency.
    #[command(subcommand)]
    Lab(lab_cmd::LabCmd),
    /// Print a new private key (base64, like `wg genkey`).
    Genkey,
    /// Read a private key on stdin, print its public key (like `wg pubkey`).
    Pubkey,
    /// Print a new preshared key (like `wg genpsk`).
    Genpsk,
    /// A userspace WireGuard interface for wg and wg-quick, or from a wg-quick file.
    #[command(subcommand)]
    Wg(wg_cmd::WgCmd),
    /// The coordinator: run it, or administer a running one (tokens, nodes).
    Coord(coord_cmd::CoordArgs),
    /// Join the mesh (first time with --token) and keep this node in it, as a daemon.
    Up(up_cmd::UpArgs),
    /// This node: its mesh addresses, the coordinator connection, its peers.
    Status(up_cmd::StatusArgs),
    /// Ping a peer through the mesh; each reply says whether it came direct or via a relay.
    Ping(up_cmd::PingArgs),
    /// What this node found of its network: UDP, public address, NAT type, relay latencies.
    Netcheck(up_cmd::StatusArgs),
    /// The relay (TLS/TCP and QUIC on 443) and STUN responder; `meshd relay status` shows its counters.
    Relay(relay_cmd::RelayArgs),
    /// Stop the node daemon and remove its interface.
    Down(up_cmd::StateArg),
    /// Give this node a new key pair; peers learn it within seconds.
    RotateKey(up_cmd::StateArg),
}

fn main() -> ExitCode {
    let daemon_child = std::env::args_os().any(|a| a == "--daemon-child");
    if daemon_child {
        close_inherited_fds();
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    // wg-quick runs WG_QUICK_USERSPACE_IMPLEMENTATION with the interface
    // name alone; under that name meshd is `meshd wg create`.
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let invoked_as = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .map(str::to_owned);
    if invoked_as.as_deref() == Some(wg_cmd::WG_QUICK_NAME) {
        args.splice(1..1, ["wg".into(), "create".into()]);
    }
    match run(Cli::parse_from(args).command) {
        Ok(()) => ExitCode::SUCCESS,
        // The error and its causes on one line, never a backtrace: these
        // are the user's errors, not ours.
        Err(e) => {
            let message = format!("{e:#}");
            if daemon_child {
                daemon::report_failure(&message);
            }
            eprintln!("meshd: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Cmd) -> Result<()> {
    match command {
        Cmd::Lab(cmd) => lab_cmd::run(cmd),
        Cmd::Genkey => key_cmd::genkey(),
        Cmd::Pubkey => key_cmd::pubkey(),
        Cmd::Genpsk => key_cmd::genpsk(),
        Cmd::Wg(cmd) => wg_cmd::run(cmd),
        Cmd::Coord(args) => coord_cmd::run(args),
        Cmd::Up(args) => up_cmd::up(args),
        Cmd::Status(state) => up_cmd::status(state),
        Cmd::Ping(args) => up_cmd::ping(args),
        Cmd::Netcheck(args) => up_cmd::netcheck(args),
        Cmd::Relay(args) => relay_cmd::run(args),
        Cmd::Down(state) => up_cmd::down(state),
        Cmd::RotateKey(state) => up_cmd::rotate_key(state),
    }
}

/// Closes every file descriptor above stderr that this process inherited:
/// a daemon must not hold the shell's files (or a pipe someone waits on)
/// open for its whole life.
fn close_inherited_fds() {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    // The directory's own descriptor is among them, closed by now: skip
    // what no longer exists (closing it would be EBADF, which rustix
    // treats as a bug).
    for fd in fds {
        if std::fs::read_link(format!("/proc/self/fd/{fd}")).is_err() {
            continue;
        }
        // SAFETY: this runs first in `main`, before anything of ours opens a
        // file, and the standard library's start-up opens none above 2: no
        // object in this process owns these descriptors, so closing them
        // cannot invalidate one, and each is open (checked just above, in
        // this single-threaded moment).
        #[allow(unsafe_code)]
        unsafe {
            rustix::io::close(fd)
        };
    }
}
