//! A whole meshd mesh in a lab, with the real binary: `meshd coord` on a public
//! host, `meshd relay` on others, `meshd up` on every node, all joined with
//! one token each. Shared by `meshd lab demo` and the end-to-end tests.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{tools, Lab, LabError, Proc};

/// A relay to start: on which public host, serving which region.
#[derive(Debug, Clone)]
pub struct RelaySpec {
    pub host: String,
    pub region: String,
}

/// What runs where.
#[derive(Debug, Clone)]
pub struct MeshSpec {
    /// The `meshd` binary.
    pub meshd: PathBuf,
    pub coordinator: String,
    pub relays: Vec<RelaySpec>,
    pub nodes: Vec<String>,
    /// `RUST_LOG` of every process.
    pub log: String,
    /// Extra arguments of every `meshd up` (e.g. `--no-direct`).
    pub up_args: Vec<String>,
}

/// A running mesh; every process is stopped on drop.
pub struct Mesh<'l> {
    lab: &'l Lab,
    spec: MeshSpec,
    dir: PathBuf,
    coordinator: Option<Proc>,
    relays: BTreeMap<String, Proc>,
    nodes: BTreeMap<String, Proc>,
    node_token: String,
    relay_token: String,
    /// Node restarts so far, to name their logs.
    restarts: usize,
}

/// How one node reaches one peer, from the node's `meshd status --json`.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerPath {
    /// `direct`, `relay` or `none`.
    pub kind: String,
    /// `ip:port` for a direct path, the region for a relayed one.
    pub via: String,
    pub rtt_ms: Option<f64>,
}

fn err(what: impl Into<String>) -> LabError {
    LabError::Lab(what.into())
}

impl<'l> Mesh<'l> {
    /// Starts the coordinator, creates the tokens, starts the relays and
    /// joins every node; returns once every node is connected and sees every
    /// other node as a peer.
    pub fn up(lab: &'l Lab, spec: MeshSpec) -> Result<Mesh<'l>, LabError> {
        // A lab may hold one mesh after another: each gets a fresh directory, so no state
        // (nor the coordinator's `admin.url`, which says it is ready) is left from the last.
        let dir = (1..)
            .map(|i| match i {
                1 => lab.log_dir().join("mesh"),
                i => lab.log_dir().join(format!("mesh-{i}")),
            })
            .find(|d| !d.exists())
            .unwrap_or_else(|| lab.log_dir().join("mesh"));
        std::fs::create_dir_all(&dir).map_err(|source| LabError::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        let mut mesh = Mesh {
            lab,
            spec,
            dir,
            coordinator: None,
            relays: BTreeMap::new(),
            nodes: BTreeMap::new(),
            node_token: String::new(),
            relay_token: String::new(),
            restarts: 0,
        };
        mesh.start_coordinator()?;
        mesh.node_token = mesh.create_token(&[])?;
        mesh.relay_token = mesh.create_token(&["--tag", "tag:relay"])?;
        for r in mesh.spec.relays.clone() {
            mesh.start_relay(&r)?;
        }
        for n in mesh.spec.nodes.clone() {
            mesh.start_node(&n)?;
        }
        let nodes = mesh.spec.nodes.clone();
        let peers = nodes.len().saturating_sub(1);
        for n in &nodes {
            lab.wait_until(
                &format!("{n} to join and see {peers} peers"),
                Duration::from_secs(60),
                || {
                    mesh.status(n).is_ok_and(|s| {
                        s["control"]["state"] == "connected"
                            && s["peers"].as_array().is_some_and(|p| p.len() == peers)
                    })
                },
            )?;
        }
        Ok(mesh)
    }

    pub fn lab(&self) -> &Lab {
        self.lab
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn state(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn meshd(&self) -> &str {
        self.spec.meshd.to_str().unwrap_or("meshd")
    }

    fn coordinator_addr(&self) -> Result<String, LabError> {
        Ok(format!("{}:443", self.lab.addr(&self.spec.coordinator)?))
    }

    fn start_coordinator(&mut self) -> Result<(), LabError> {
        let host = self.spec.coordinator.clone();
        let state = self.state(&host);
        let addr = self.coordinator_addr()?;
        let log = format!("RUST_LOG={}", self.spec.log);
        let state_s = state.display().to_string();
        let argv = [
            "env",
            &log,
            self.meshd(),
            "coord",
            "--listen",
            &addr,
            "--state",
            &state_s,
        ];
        let proc = self.lab.spawn(&host, "coord", &argv)?;
        self.coordinator = Some(proc);
        self.lab
            .wait_until("meshd coord to be ready", Duration::from_secs(30), || {
                state.join("admin.url").exists()
            })
    }

    /// `meshd coord ARGS --state DIR` on the coordinator's host: its output.
    pub fn admin(&self, args: &[&str]) -> Result<String, LabError> {
        let state = self.state(&self.spec.coordinator).display().to_string();
        let mut argv = vec![self.meshd(), "coord"];
        argv.extend_from_slice(args);
        argv.extend_from_slice(&["--state", &state]);
        self.lab.exec(&self.spec.coordinator, &argv)?.ok()
    }

    /// `meshd relay status --json` of the relay on `host`.
    pub fn relay_counters(&self, host: &str) -> Result<Value, LabError> {
        let state = self.state(host).display().to_string();
        let out = self
            .lab
            .exec(
                host,
                &[self.meshd(), "relay", "status", "--json", "--state", &state],
            )?
            .ok()?;
        serde_json::from_str(&out)
            .map_err(|e| err(format!("{host}: meshd relay status --json: {e}")))
    }

    fn create_token(&self, extra: &[&str]) -> Result<String, LabError> {
        let state = self.state(&self.spec.coordinator).display().to_string();
        let mut argv = vec![
            self.meshd(),
            "coord",
            "token",
            "create",
            "--reusable",
            "--state",
            &state,
        ];
        argv.extend_from_slice(extra);
        let out = self.lab.exec(&self.spec.coordinator, &argv)?.ok()?;
        Ok(out.trim().to_owned())
    }

    /// Starts (or restarts) `meshd relay` on its host.
    pub fn start_relay(&mut self, r: &RelaySpec) -> Result<(), LabError> {
        let state = self.state(&r.host).display().to_string();
        let public = self.lab.addr(&r.host)?;
        let listen = format!("{public}:443");
        let log = format!("RUST_LOG={}", self.spec.log);
        let argv = [
            "env",
            &log,
            self.meshd(),
            "relay",
            "--token",
            &self.relay_token,
            "--region",
            &r.region,
            "--listen",
            &listen,
            "--state",
            &state,
        ];
        let proc = self
            .lab
            .spawn(&r.host, &format!("relay-{}", r.region), &argv)?;
        self.relays.insert(r.host.clone(), proc);
        Ok(())
    }

    /// Kills the relay on `host` at once (SIGKILL).
    pub fn kill_relay(&mut self, host: &str) {
        self.relays.remove(host);
    }

    /// The process id of the relay on `host`.
    pub fn relay_pid(&self, host: &str) -> Result<u32, LabError> {
        self.relays
            .get(host)
            .map(Proc::pid)
            .ok_or_else(|| err(format!("no relay runs on {host}")))
    }

    /// Stops `meshd up` on `node` (SIGTERM, so it removes its interface); [`Self::start_node`]
    /// starts it again with the same state, and it logs in with its key.
    pub fn stop_node(&mut self, node: &str) {
        if let Some(mut p) = self.nodes.remove(node) {
            p.stop(Duration::from_secs(5));
        }
    }

    /// Kills the coordinator at once (SIGKILL).
    pub fn kill_coordinator(&mut self) {
        self.coordinator = None;
    }

    /// Starts `meshd up` on `name` (the first time, it joins with the mesh's token).
    /// Kills `name`'s daemon at once (SIGKILL) and starts it again, with its
    /// state (it logs in with its key); its new log is `NAME.up-N.log`.
    pub fn restart_node(&mut self, name: &str) -> Result<(), LabError> {
        self.nodes.remove(name);
        self.restarts += 1;
        let label = format!("up-{}", self.restarts);
        self.spawn_node(name, &label)
    }

    pub fn start_node(&mut self, name: &str) -> Result<(), LabError> {
        self.spawn_node(name, "up")
    }

    fn spawn_node(&mut self, name: &str, label: &str) -> Result<(), LabError> {
        let state = self.state(name).display().to_string();
        let log = format!("RUST_LOG={}", self.spec.log);
        let mut argv = vec![
            "env",
            &log,
            self.meshd(),
            "up",
            "--foreground",
            "--name",
            name,
            "--state",
            &state,
            "--token",
            &self.node_token,
        ];
        argv.extend(self.spec.up_args.iter().map(String::as_str));
        let proc = self.lab.spawn(name, label, &argv)?;
        self.nodes.insert(name.to_owned(), proc);
        Ok(())
    }

    /// `meshd status --json` on `node`.
    pub fn status(&self, node: &str) -> Result<Value, LabError> {
        let state = self.state(node).display().to_string();
        let out = self
            .lab
            .exec(node, &[self.meshd(), "status", "--json", "--state", &state])?
            .ok()?;
        serde_json::from_str(&out).map_err(|e| err(format!("{node}: meshd status --json: {e}")))
    }

    /// `node`'s mesh IPv4 address.
    pub fn mesh_ip(&self, node: &str) -> Result<Ipv4Addr, LabError> {
        let s = self.status(node)?;
        s["ipv4"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| err(format!("{node} has no mesh address yet")))
    }

    /// How `from` reaches `to` now.
    pub fn path(&self, from: &str, to: &str) -> Result<PeerPath, LabError> {
        let s = self.status(from)?;
        let peer = s["peers"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == to))
            .ok_or_else(|| err(format!("{from} does not list {to} as a peer")))?;
        let path = &peer["path"];
        Ok(PeerPath {
            kind: path["kind"].as_str().unwrap_or("none").to_owned(),
            via: path["via"].as_str().unwrap_or("").to_owned(),
            rtt_ms: path["rtt_ms"].as_f64(),
        })
    }

    /// Waits until `from` reaches `to` by a path of `kind`.
    pub fn wait_path(
        &self,
        from: &str,
        to: &str,
        kind: &str,
        timeout: Duration,
    ) -> Result<Duration, LabError> {
        let start = Instant::now();
        self.lab.wait_until(
            &format!("{from} to reach {to} by a {kind} path"),
            timeout,
            || self.path(from, to).is_ok_and(|p| p.kind == kind),
        )?;
        Ok(start.elapsed())
    }

    /// Pings `to`'s mesh address from `from` every 100 ms in the background,
    /// until [`stop_pinging`].
    pub fn start_pinging(&self, from: &str, to: &str, label: &str) -> Result<Proc, LabError> {
        let target = self.mesh_ip(to)?.to_string();
        self.lab.spawn(
            from,
            label,
            &["ping", "-n", "-i", "0.1", "-W", "1", &target],
        )
    }

    /// Round-trip times (ms) of `count` pings from `from` to `to`'s mesh address.
    pub fn ping(&self, from: &str, to: &str, count: u32) -> Result<Vec<f64>, LabError> {
        let target = self.mesh_ip(to)?;
        tools::ping_addr(self.lab, from, target, count, Duration::from_millis(200))
    }
}

/// The path two nodes of these sites must end up on: direct wherever UDP
/// can get through both NATs (a public side, or two endpoint-independent
/// mappings, or one LAN), the relay otherwise (`relay-tls` when a side drops
/// UDP, so only TLS over TCP reaches the relay). The hard pairing of an
/// endpoint-independent and a symmetric NAT is `relay` here, the path it is
/// sure to get: the birthday technique makes it direct in most attempts
/// (98 % expected with the default budget; 5 of 5 trials in
/// `tests/hard_nat.rs`), so callers accept `direct` for it too (see
/// [`hard_pairing`]).
pub fn expected_path(a: &crate::Site, b: &crate::Site) -> &'static str {
    use crate::{Firewall, Nat};
    let blocked = |s: &crate::Site| s.firewall != Firewall::Open;
    if a.name == b.name {
        return "direct";
    }
    if blocked(a) || blocked(b) {
        return "relay-tls";
    }
    match (a.nat, b.nat) {
        (Nat::None, _) | (_, Nat::None) => "direct",
        (Nat::EndpointIndependent, Nat::EndpointIndependent) => "direct",
        _ => "relay",
    }
}

/// Whether the sites are the pairing only the birthday technique gets
/// direct (one endpoint-independent NAT, one symmetric), where
/// [`expected_path`] says `relay` and `direct` is the usual outcome.
pub fn hard_pairing(a: &crate::Site, b: &crate::Site) -> bool {
    use crate::{Firewall, Nat};
    let open = |s: &crate::Site| s.firewall == Firewall::Open;
    open(a)
        && open(b)
        && matches!(
            (a.nat, b.nat),
            (Nat::EndpointIndependent, Nat::Symmetric) | (Nat::Symmetric, Nat::EndpointIndependent)
        )
}

/// Stops a [`Mesh::start_pinging`]: (sent, received).
pub fn stop_pinging(mut p: Proc) -> (u32, u32) {
    if let Some(pid) = i32::try_from(p.pid())
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
    }
    let _ = p.wait_timeout(Duration::from_secs(5));
    let log = p.log();
    let line = log
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or("");
    let num = |word: &str| -> u32 {
        line.split(", ")
            .find(|part| part.contains(word))
            .and_then(|part| part.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (num("transmitted"), num("received"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Firewall, Nat, Site};

    #[test]
    fn expected_paths_follow_nat_and_firewall() {
        let open = Site::new("cloud", ["c1"]);
        let eim = Site::new("edge", ["e1"]).nat(Nat::EndpointIndependent);
        let eim2 = Site::new("home", ["h1"]).nat(Nat::EndpointIndependent);
        let sym = Site::new("cgnat", ["g1"]).nat(Nat::Symmetric);
        let sym2 = Site::new("mobile", ["m1"]).nat(Nat::Symmetric);
        let corp = Site::new("corp", ["t1"])
            .nat(Nat::EndpointIndependent)
            .firewall(Firewall::UdpBlocked);
        assert_eq!(expected_path(&open, &sym), "direct");
        assert_eq!(expected_path(&eim, &eim2), "direct");
        assert_eq!(expected_path(&sym, &sym), "direct");
        assert_eq!(expected_path(&sym, &sym2), "relay");
        assert_eq!(expected_path(&eim, &sym), "relay");
        assert!(hard_pairing(&eim, &sym) && hard_pairing(&sym, &eim2));
        assert!(!hard_pairing(&sym, &sym2) && !hard_pairing(&eim, &eim2));
        assert!(!hard_pairing(&open, &sym) && !hard_pairing(&corp, &sym));
        assert_eq!(expected_path(&open, &corp), "relay-tls");
        assert_eq!(expected_path(&corp, &eim), "relay-tls");
    }
}
