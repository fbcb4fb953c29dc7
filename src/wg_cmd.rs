//! `meshd wg …`: a userspace WireGuard interface that `wg` and `wg-quick`
//! drive through WireGuard's UAPI, run by `meshd_dataplane::standalone`.
//! See docs/wg-standalone.md.
#![allow(clippy::print_stdout)] // a CLI talks to its user on stdout

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use meshd_dataplane::engine::DEFAULT_ANSWER_POLL;
use meshd_dataplane::standalone::{self, show, uapi, Setup};
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
        #[command(flatten)]
        poll: AnswerPollArg,
        /// Internal: this process is the background daemon that `up` started.
        #[arg(long, hide = true)]
        daemon_child: bool,
    },
    /// Create an empty interface for `wg setconf` and `wg-quick`, like
    /// wireguard-go does (in the background unless --foreground).
    /// `wg-quick` runs a program named by WG_QUICK_USERSPACE_IMPLEMENTATION
    /// with the interface name alone: a link to meshd named `meshd-wg` runs
    /// this.
    Create {
        interface: String,
        /// Stay in the foreground, logging to stderr, until SIGINT or SIGTERM.
        #[arg(short = 'f', long)]
        foreground: bool,
        #[command(flatten)]
        poll: AnswerPollArg,
        /// Internal: this process is the background daemon.
        #[arg(long, hide = true)]
        daemon_child: bool,
    },
    /// Show userspace interfaces like `wg show` (all, or the one named),
    /// with meshd's packet and drop counters.
    Show { interface: Option<String> },
    /// Remove an interface (as `wg-quick down` does) and wait until its
    /// daemon is gone.
    Down { interface: String },
    /// Make the running interface's configuration that of CONFIG, as
    /// `wg syncconf` does; peers whose settings did not change keep their
    /// sessions.
    Syncconf { interface: String, config: PathBuf },
}

/// How long the data plane polls for the answer to a lone packet.
#[derive(Args, Clone, Copy)]
pub struct AnswerPollArg {
    /// After sending a lone packet (a ping, a request), poll this long for
    /// its answer before sleeping (e.g. 150us): lower latency for sparse
    /// request/response traffic, for CPU (see docs/benchmarks.md). Off (0)
    /// by default.
    #[arg(long = "answer-poll", value_name = "DURATION", value_parser = parse_poll)]
    answer_poll: Option<Duration>,
}

impl AnswerPollArg {
    pub fn get(self) -> Duration {
        self.answer_poll.unwrap_or(DEFAULT_ANSWER_POLL)
    }

    /// The option as the daemon child takes it.
    pub fn to_args(self) -> [String; 2] {
        [
            "--answer-poll".into(),
            format!("{}us", self.get().as_micros()),
        ]
    }
}

fn parse_poll(s: &str) -> Result<Duration, String> {
    let d = if s == "0" {
        Duration::ZERO
    } else {
        humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (e.g. 150us, 0)"))?
    };
    if d > Duration::from_millis(10) {
        return Err(format!("{s:?}: at most 10ms"));
    }
    Ok(d)
}

/// The name under which `meshd` acts as `meshd wg create` (for
/// WG_QUICK_USERSPACE_IMPLEMENTATION, which names one program and gives it
/// the interface name only).
pub const WG_QUICK_NAME: &str = "meshd-wg";

pub fn run(cmd: WgCmd) -> Result<()> {
    match cmd {
        WgCmd::Up {
            config,
            interface,
            foreground,
            poll,
            daemon_child,
        } => up(&config, interface, foreground, poll, daemon_child),
        WgCmd::Create {
            interface,
            foreground,
            poll,
            daemon_child,
        } => create(&interface, foreground, poll, daemon_child),
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

fn up(
    path: &Path,
    interface: Option<String>,
    foreground: bool,
    poll: AnswerPollArg,
    daemon_child: bool,
) -> Result<()> {
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
        let config = std::fs::canonicalize(path)
            .with_context(|| format!("{}: cannot resolve the path", path.display()))?;
        let mut args: Vec<std::ffi::OsString> = vec!["wg".into(), "up".into(), config.into()];
        args.extend(["--interface".into(), name.clone().into()]);
        args.extend(poll.to_args().map(Into::into));
        return start_daemon(args, &name);
    }
    let stop = daemon::stop_on_signal(daemon_child)?;
    let setup = Setup {
        answer_poll: poll.get(),
        ..Setup::from_config(&config)
    };
    standalone::run(&name, setup, &stop, |status| {
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

fn create(name: &str, foreground: bool, poll: AnswerPollArg, daemon_child: bool) -> Result<()> {
    standalone::validate_name(name)?;
    if !(foreground || daemon_child) {
        let mut args: Vec<std::ffi::OsString> = vec!["wg".into(), "create".into(), name.into()];
        args.extend(poll.to_args().map(Into::into));
        return start_daemon(args, name);
    }
    let stop = daemon::stop_on_signal(daemon_child)?;
    let setup = Setup {
        answer_poll: poll.get(),
        ..Setup::for_wg_quick()
    };
    standalone::run(name, setup, &stop, |_| {
        if daemon_child {
            daemon::report_ready();
            daemon::detach_stdio();
        }
    })?;
    Ok(())
}

/// Starts this program again with `args` and `--daemon-child` as a detached
/// daemon and waits until it reports the interface up, or passes on its
/// error.
fn start_daemon(args: Vec<std::ffi::OsString>, name: &str) -> Result<()> {
    let exe = std::env::current_exe().context("locating the meshd executable")?;
    let mut child = Command::new(exe)
        .args(args)
        .arg("--daemon-child")
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
        Started::Failed(message) => Err(anyhow!(message)),
        // Not a failure it could report (a crash, a signal): what it wrote
        // is all there is.
        Started::Exited(status) => bail!(
            "the meshd daemon for {name} exited ({status}) before the interface was up{}",
            said(&errors.join().unwrap_or_default())
        ),
        Started::TimedOut => bail!(
            "the meshd daemon for {name} was not ready within {} s and was killed",
            READY_TIMEOUT.as_secs()
        ),
    }
}

/// A crashed daemon's last words, to append to the error.
fn said(stderr: &str) -> String {
    match stderr.trim() {
        "" => String::new(),
        text => format!(":\n{text}"),
    }
}

fn show_cmd(interface: Option<String>) -> Result<()> {
    let now = SystemTime::now();
    let Some(name) = interface else {
        let mut blocks = Vec::new();
        for name in standalone::interfaces()? {
            match standalone::get(&name) {
                Ok(status) => blocks.push(show::format(&name, &status, now)),
                // A socket left by a killed daemon; `up` replaces it.
                Err(e) => eprintln!("meshd: {name}: {e}"),
            }
        }
        print!("{}", blocks.join("\n"));
        return Ok(());
    };
    print!("{}", show::format(&name, &standalone::get(&name)?, now));
    Ok(())
}

fn syncconf(name: &str, path: &Path) -> Result<()> {
    let config = load(path, true)?;
    standalone::set(name, &uapi::encode_setconf(&config))?;
    Ok(())
}
