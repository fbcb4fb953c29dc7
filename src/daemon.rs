//! The background-daemon plumbing `meshd up` and `meshd wg up` share: the
//! parent starts this program again with `--daemon-child` and waits for it to
//! print `ready`, or `failed` and the one error that matters; the child (or a
//! `--foreground` run) stops on a signal.
#![allow(clippy::print_stdout)] // the READY line is for the waiting parent

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::{Context, Result};

/// What a background daemon prints on its stdout once it is up.
const READY: &str = "ready";
/// What it prints instead when it cannot start, followed by the error.
const FAILED: &str = "failed";

/// Installs the SIGINT/SIGTERM handler and returns the flag it sets. A
/// daemon child also leaves the terminal's session, so its hangup does not
/// reach it, and the current directory.
pub fn stop_on_signal(daemon_child: bool) -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::Relaxed))
        .context("installing the SIGINT/SIGTERM handler")?;
    if daemon_child {
        rustix::process::setsid().context("setsid")?;
        std::env::set_current_dir("/").context("chdir /")?;
    }
    Ok(stop)
}

/// In the daemon child: tells the waiting parent that it is up.
pub fn report_ready() {
    println!("{READY}");
    let _ = std::io::stdout().flush();
}

/// In the daemon child: tells the waiting parent why it could not start.
/// After `report_ready` stdout is /dev/null, and this goes nowhere.
pub fn report_failure(message: &str) {
    println!("{FAILED}\n{message}");
    let _ = std::io::stdout().flush();
}

/// Points a ready daemon's stdout and stderr at /dev/null. They are pipes to the `up` that
/// started it, which exits now; a later log line would meet a broken pipe, and the log
/// writer's own error report (to stderr, again) would panic the daemon.
pub fn detach_stdio() {
    match std::fs::OpenOptions::new().write(true).open("/dev/null") {
        Ok(null) => {
            let _ = rustix::stdio::dup2_stdout(&null);
            let _ = rustix::stdio::dup2_stderr(&null);
        }
        Err(e) => tracing::warn!(error = %e, "cannot open /dev/null; later log lines may be lost"),
    }
}

/// How a started daemon child turned out.
pub enum Started {
    Ready,
    /// It said why it could not start, and exited.
    Failed(String),
    /// It exited (or closed its stdout) without reporting ready.
    Exited(ExitStatus),
    /// It was not ready within the timeout and has been killed.
    TimedOut,
}

/// Waits until `child`, started with its stdout piped, reports ready, exits,
/// or is not ready within `timeout` (then it is killed).
pub fn wait_ready(child: &mut Child, timeout: Duration) -> Result<Started> {
    let stdout = child.stdout.take();
    let (said_tx, said) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = stdout
            .map(|out| BufReader::new(out).lines().map_while(Result::ok))
            .into_iter()
            .flatten();
        let outcome = loop {
            match lines.next().as_deref() {
                Some(READY) => break Some(Ok(())),
                Some(FAILED) => break Some(Err(lines.collect::<Vec<_>>().join("\n"))),
                Some(_) => {}
                None => break None,
            }
        };
        let _ = said_tx.send(outcome);
    });
    match said.recv_timeout(timeout) {
        Ok(Some(Ok(()))) => Ok(Started::Ready),
        Ok(Some(Err(message))) => {
            let _ = child.wait();
            Ok(Started::Failed(message))
        }
        Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => Ok(Started::Exited(
            child.wait().context("waiting for the meshd daemon")?,
        )),
        Err(mpsc::RecvTimeoutError::Timeout) => {
            let _ = child.kill();
            let _ = child.wait();
            Ok(Started::TimedOut)
        }
    }
}
