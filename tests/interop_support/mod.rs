//! Shared by the `meshd wg` tests: running `meshd wg show` in a lab node and
//! reading what it prints.
#![allow(dead_code)] // each test binary uses a different part
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use meshd_netlab::Lab;

pub const MESHD: &str = env!("CARGO_BIN_EXE_meshd");

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
