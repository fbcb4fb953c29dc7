//! `meshd wg …`: a userspace WireGuard interface from a wg-quick file, run by
//! `meshd_dataplane::standalone`. See docs/wg-standalone.md.
#![allow(clippy::print_stdout)] // a CLI talks to its user on stdout

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use meshd_dataplane::standalone::{self, show};
use meshd_dataplane::wgconf::{self, WgConfig};

use crate::daemon::{self, Started};

/// How long `up` waits for a background daemon to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Subcommand)]
pub enum WgCmd {
    /// Bring up an interface from a wg-quick file and run it in the background
    /// (like wireguard-go), or in the foreground with --foreground.
    Up {
        /// A wg-quick configuration file; see docs/wg-config.md.
        config: PathBuf,
        /// Interface name (default: the file's name without `.conf`, as wg-quick).
        #[arg(long)]
        interface: Option<String>,
        /// Stay in the foreground, logging to stderr, until SIGINT or SIGTERM.
        #[arg(long)]
        foreground: bool,
        /// Internal: this process is the background daemon that `up` started.
        #[arg(long, hide = true)]
        daemon_child: bool,
    },
    /// Show running interfaces like `wg show` (all, or the one named).
    Show { interface: Option<String> },
    /// Stop an interface and wait until it is gone.
    Down { interface: String },
    /// Make the peers of a running interface those of CONFIG; peers whose
    /// settings did not change keep their sessions.
    Syncconf { interface: String, config: PathBuf },
}

pub fn run(cmd: WgCmd) -> Result<()> {
    match cmd {
        WgCmd::Up {
            config,
            interface,
            foreground,
            daemon_child,
        } => up(&config, interface, foreground, daemon_child),
        WgCmd::Show { interface } => show_cmd(interface),
        WgCmd::Down { interface } => Ok(standalone::down(&interface)?),
        WgCmd::Syncconf { interface, config } => syncconf(&interface, &config),
    }
}

/// Reads and parses a wg-quick file; errors and warnings name the file and
/// the line.
fn load(path: &Path, print_warnings: bool) -> Result<WgConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read it", path.display()))?;
    let config = wgconf::parse(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    if print_warnings {
        for (line, warning) in &config.warnings {
            eprintln!("{}: line {line}: warning: {warning}", path.display());
        }
    }
    Ok(config)
}

fn up(path: &Path, interface: Option<String>, foreground: bool, daemon_child: bool) -> Result<()> {
    // The parent already printed the warnings.
    let config = load(path, !daemon_child)?;
    let name = match interface {
        Some(name) => {
            standalone::validate_name(&name)?;
            name
        }
        None => standalone::interface_name(path)?,
    };
    if !(foreground || daemon_child) {
        return start_daemon(path, &name);
    }
    let stop = daemon::stop_on_signal(daemon_child)?;
    standalone::run(&name, &config, &stop, |status| {
        if daemon_child {
            daemon::report_ready();
            daemon::detach_stdio();
        } else {
            eprintln!(
                "meshd: {} is up, listening on UDP port {}; SIGINT, SIGTERM or `meshd wg down {}` stops it",
                status.tun_name, status.listen_port, status.tun_name
            );
        }
    })?;
    Ok(())
}

/// Starts this program again as a detached daemon (`--daemon-child`) and
/// waits until it reports the interface up, or passes on its error.
fn start_daemon(path: &Path, name: &str) -> Result<()> {
    let exe = std::env::current_exe().context("locating the meshd executable")?;
    let config = std::fs::canonicalize(path)
        .with_context(|| format!("{}: cannot resolve the path", path.display()))?;
    let mut child = Command::new(exe)
        .args(["wg", "up"])
        .arg(&config)
        .args(["--interface", name, "--daemon-child"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the meshd daemon")?;
    let stderr = child.stderr.take();
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut err) = stderr {
            let _ = err.read_to_string(&mut text);
        }
        text
    });
    match daemon::wait_ready(&mut child, READY_TIMEOUT)? {
        // The daemon keeps its stderr; nothing more is read from it.
        Started::Ready => Ok(()),
        Started::Exited(status) => {
            daemon::pass_on_failure(status, &errors.join().unwrap_or_default());
            bail!("the meshd daemon for {name} exited ({status}) before the interface was up");
        }
        Started::TimedOut => bail!(
            "the meshd daemon for {name} was not ready within {} s and was killed",
            READY_TIMEOUT.as_secs()
        ),
    }
}

fn show_cmd(interface: Option<String>) -> Result<()> {
    let Some(name) = interface else {
        let mut blocks = Vec::new();
        for name in standalone::interfaces()? {
            match standalone::status(&name) {
                Ok(status) => blocks.push(show::format(&status)),
                // A socket left by a killed daemon; `up` replaces it.
                Err(e) => eprintln!("meshd: {name}: {e}"),
            }
        }
        print!("{}", blocks.join("\n"));
        return Ok(());
    };
    print!("{}", show::format(&standalone::status(&name)?));
    Ok(())
}

fn syncconf(name: &str, path: &Path) -> Result<()> {
    let config = load(path, true)?;
    let running = standalone::status(name)?;
    if config.interface.private_key.public_key() != running.public_key {
        bail!(
            "{}: its PrivateKey is not the one {name} runs with; syncconf changes peers only (use `meshd wg down` and `meshd wg up` to change the key)",
            path.display()
        );
    }
    if let Some(port) = config.interface.listen_port {
        if port != running.listen_port {
            bail!(
                "{}: ListenPort {port} differs from the {} {name} listens on; syncconf changes peers only",
                path.display(),
                running.listen_port
            );
        }
    }
    standalone::set_peers(name, config.peers)?;
    Ok(())
}
