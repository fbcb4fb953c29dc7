//! Shared by the `meshd wg` tests: running `meshd wg show` in a lab node and
//! reading what it prints.
#![allow(dead_code)] // each test binary uses a different part
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use meshd_netlab::Lab;

pub const MESHD: &str = env!("CARGO_BIN_EXE_meshd");

pub const SOCKET_DIR: &str = "/var/run/wireguard";

pub fn meshd(args: &[&str], stdin: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(MESHD)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A private key and its public key.
pub fn keypair() -> (String, String) {
    let private = meshd(&["genkey"], "");
    let public = meshd(&["pubkey"], &private);
    (private, public)
}

/// A directory of this test's own, removed on drop.
pub struct Dir(pub PathBuf);

impl Dir {
    pub fn new() -> Dir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "meshd-wg-cli-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }

    /// Writes a configuration file (0600: it holds a private key).
    pub fn file(&self, name: &str, text: &str) -> String {
        use std::io::Write;
        let path = self.0.join(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        path.display().to_string()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn socket(name: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{name}.sock"))
}

/// Stops a background interface that a failed test left running (the lab's
/// teardown would kill it, but leave its socket behind).
pub struct DownOnDrop<'a> {
    pub lab: &'a Lab,
    pub node: &'a str,
    pub name: String,
}

impl Drop for DownOnDrop<'_> {
    fn drop(&mut self) {
        if socket(&self.name).exists() {
            let _ = self.lab.exec(self.node, &[MESHD, "wg", "down", &self.name]);
            let _ = std::fs::remove_file(socket(&self.name));
        }
    }
}

/// Removes control sockets that daemons killed by a failing test leave.
pub struct RemoveSockets(pub Vec<String>);

impl Drop for RemoveSockets {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = std::fs::remove_file(socket(name));
        }
    }
}

pub fn link_exists(lab: &Lab, node: &str, name: &str) -> bool {
    lab.exec(node, &["ip", "link", "show", "dev", name])
        .unwrap()
        .status
        .success()
}

/// `meshd wg show IFACE` in `node`; fails the test if it fails.
pub fn show(lab: &Lab, node: &str, iface: &str) -> Show {
    let out = lab.exec(node, &[MESHD, "wg", "show", iface]).unwrap();
    assert!(out.status.success(), "meshd wg show {iface}: {out:?}");
    Show(out.stdout)
}

/// The text of `meshd wg show` for one interface.
#[derive(Debug, Clone)]
pub struct Show(pub String);

impl Show {
    /// The interface block's `label: value` line.
    pub fn interface_field(&self, label: &str) -> Option<String> {
        let block = self.0.split("\npeer: ").next()?;
        field(block, label)
    }

    /// Each peer's block, by public key.
    pub fn peers(&self) -> BTreeMap<String, String> {
        self.0
            .split("\npeer: ")
            .skip(1)
            .map(|b| {
                let (key, rest) = b.split_once('\n').unwrap_or((b, ""));
                (key.trim().to_owned(), rest.to_owned())
            })
            .collect()
    }

    pub fn peer(&self, key: &str) -> String {
        self.peers()
            .remove(key)
            .unwrap_or_else(|| panic!("no peer {key} in:\n{}", self.0))
    }

    /// The drop counters (`dropped: 3 invalid datagrams, 0 from unknown peers, …`), by label.
    pub fn dropped(&self) -> BTreeMap<String, u64> {
        let line = self
            .interface_field("dropped")
            .unwrap_or_else(|| panic!("no dropped line in:\n{}", self.0));
        line.split(", ")
            .map(|part| {
                let (n, label) = part.split_once(' ').unwrap();
                (label.to_owned(), n.parse().unwrap())
            })
            .collect()
    }

    /// Datagrams dropped before they reached a session: not WireGuard, failed
    /// authentication, replayed, or for an unknown session.
    pub fn rejected_datagrams(&self) -> u64 {
        let d = self.dropped();
        d["invalid datagrams"] + d["from unknown peers"]
    }
}

/// The value of `  label: value` in a block of `wg show` text.
pub fn field(block: &str, label: &str) -> Option<String> {
    block
        .lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{label}: ")))
        .map(str::to_owned)
}

/// Seconds since a peer's handshake, from its `latest handshake:` line
/// (`Now`, or `1 minute, 5 seconds ago`); None without one.
pub fn handshake_age(peer_block: &str) -> Option<u64> {
    let text = field(peer_block, "latest handshake")?;
    if text == "Now" {
        return Some(0);
    }
    let text = text.strip_suffix(" ago").unwrap();
    Some(
        text.split(", ")
            .map(|part| {
                let (n, unit) = part.split_once(' ').unwrap();
                let n: u64 = n.parse().unwrap();
                n * match unit.trim_end_matches('s') {
                    "second" => 1,
                    "minute" => 60,
                    "hour" => 3600,
                    "day" => 86400,
                    "year" => 365 * 86400,
                    other => panic!("unit {other:?} in {text:?}"),
                }
            })
            .sum(),
    )
}

/// (received, sent) bytes from a peer's `transfer:` line, to the precision
/// printed; (0, 0) without one.
pub fn transfer(peer_block: &str) -> (f64, f64) {
    let Some(text) = field(peer_block, "transfer") else {
        return (0.0, 0.0);
    };
    let amount = |s: &str| -> f64 {
        let (n, unit) = s.split_once(' ').unwrap();
        let n: f64 = n.parse().unwrap();
        n * match unit {
            "B" => 1.0,
            "KiB" => 1024.0,
            "MiB" => 1024.0 * 1024.0,
            "GiB" => 1024.0 * 1024.0 * 1024.0,
            "TiB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
            other => panic!("unit {other:?} in {text:?}"),
        }
    };
    let (rx, tx) = text.split_once(" received, ").unwrap();
    (amount(rx), amount(tx.strip_suffix(" sent").unwrap()))
}
