#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
//! The control plane end to end, with the real `meshd` binary in a netlab
//! federation: `meshd coord` on a public host; nodes in an open site (public
//! addresses), behind an endpoint-independent NAT, and behind a firewall
//! that drops UDP. There is no relay here (tests/traversal.rs has them), so
//! only direct paths carry data: the open nodes both ways, a NATed node and
//! an open node (NAT traversal's pings open the NAT), the two NATed nodes
//! over their shared LAN. The node behind the UDP-blocking firewall reaches
//! the coordinator over TLS/TCP but has no data path.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use meshd_netlab::{Firewall, Lab, Nat, Output, Proc, Site, Topology};

const MESHD: &str = env!("CARGO_BIN_EXE_meshd");

fn topology() -> Topology {
    Topology::new()
        .host("coord")
        .site(Site::new("open", ["open1", "open2", "open3"]))
        .site(Site::new("home", ["nat1", "nat2"]).nat(Nat::EndpointIndependent))
        .site(
            Site::new("corp", ["tcp1"])
                .nat(Nat::EndpointIndependent)
                .firewall(Firewall::UdpBlocked),
        )
}

struct Coordinator {
    host: &'static str,
    proc: Option<Proc>,
    state: PathBuf,
    addr: String,
}

impl Coordinator {
    fn start(lab: &Lab, state: &Path) -> Coordinator {
        Self::start_on(lab, "coord", state, &[])
    }

    /// `meshd coord` on `host`, port 443, with `extra` flags.
    fn start_on(lab: &Lab, host: &'static str, state: &Path, extra: &[&str]) -> Coordinator {
        let addr = format!("{}:443", lab.addr(host).unwrap());
        let _ = std::fs::remove_file(state.join("admin.url"));
        let state_s = state.to_str().unwrap();
        let mut argv = vec![
            "env",
            "RUST_LOG=info",
            MESHD,
            "coord",
            "--listen",
            &addr,
            "--state",
            state_s,
        ];
        argv.extend_from_slice(extra);
        let proc = lab.spawn(host, "coord", &argv).unwrap();
        lab.wait_until("meshd coord to be ready", Duration::from_secs(30), || {
            state.join("admin.url").exists()
        })
        .unwrap();
        Coordinator {
            host,
            proc: Some(proc),
            state: state.to_owned(),
            addr,
        }
    }

    /// `meshd coord ARGS --state DIR` on the coordinator's host.
    fn admin(&self, lab: &Lab, args: &[&str]) -> String {
        let mut argv = vec![MESHD, "coord"];
        argv.extend_from_slice(args);
        argv.extend_from_slice(&["--state", self.state.to_str().unwrap()]);
        lab.exec(self.host, &argv).unwrap().ok().unwrap()
    }

    /// Killed at once (SIGKILL): no goodbye to anyone.
    fn kill(&mut self) {
        drop(self.proc.take());
    }
}

/// A node's `meshd up --foreground`, with its state directory.
struct Node {
    name: &'static str,
    state: PathBuf,
    proc: Option<Proc>,
}

impl Node {
    fn up(lab: &Lab, name: &'static str, root: &Path, token: Option<&str>) -> Node {
        let state = root.join(name);
        let mut node = Node {
            name,
            state,
            proc: None,
        };
        node.start(lab, token);
        node
    }

    fn start(&mut self, lab: &Lab, token: Option<&str>) {
        let state = self.state.to_str().unwrap().to_owned();
        let mut argv = vec![
            "env",
            "RUST_LOG=info",
            MESHD,
            "up",
            "--foreground",
            "--name",
            self.name,
            "--state",
            &state,
        ];
        if let Some(t) = token {
            argv.extend_from_slice(&["--token", t]);
        }
        static STARTS: AtomicUsize = AtomicUsize::new(0);
        let label = format!("up{}", STARTS.fetch_add(1, Ordering::Relaxed));
        self.proc = Some(lab.spawn(self.name, &label, &argv).unwrap());
    }

    /// `meshd CMD ARGS --state DIR` on the node's host, run to its end.
    fn meshd(&self, lab: &Lab, cmd: &str, args: &[&str]) -> Output {
        let mut argv = vec![MESHD, cmd];
        argv.extend_from_slice(args);
        argv.extend_from_slice(&["--state", self.state.to_str().unwrap()]);
        lab.exec(self.name, &argv).unwrap()
    }

    fn status(&self, lab: &Lab) -> Status {
        let out = self.meshd(lab, "status", &[]);
        Status(if out.status.success() {
            out.stdout
        } else {
            String::new()
        })
    }

    fn private_key(&self) -> String {
        std::fs::read_to_string(self.state.join("node.key"))
            .unwrap()
            .trim()
            .to_owned()
    }

    fn log(&self) -> String {
        self.proc.as_ref().map(Proc::log).unwrap_or_default()
    }
}

/// `meshd status` output.
#[derive(Debug, Clone)]
struct Status(String);

impl Status {
    fn node_field(&self, label: &str) -> Option<String> {
        let block = self.0.split("\npeer: ").next()?;
        field(block, label)
    }

    fn connected(&self) -> bool {
        self.node_field("coordinator")
            .is_some_and(|c| c.starts_with("connected"))
    }

    fn sessions(&self) -> u64 {
        self.node_field("control sessions")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    fn ipv4(&self) -> Ipv4Addr {
        let a = self.node_field("addresses").unwrap();
        a.split(", ").next().unwrap().parse().unwrap()
    }

    fn ipv6(&self) -> String {
        let a = self.node_field("addresses").unwrap();
        a.split(", ").nth(1).unwrap().to_owned()
    }

    fn public_key(&self) -> String {
        self.node_field("public key").unwrap()
    }

    fn node_id(&self) -> String {
        let line = self.0.lines().next().unwrap();
        line.split("(id ")
            .nth(1)
            .unwrap()
            .trim_end_matches(')')
            .to_owned()
    }

    /// Each peer's block by name.
    fn peers(&self) -> std::collections::BTreeMap<String, String> {
        self.0
            .split("\npeer: ")
            .skip(1)
            .map(|b| {
                let (head, rest) = b.split_once('\n').unwrap_or((b, ""));
                let name = head.split(" (id").next().unwrap().to_owned();
                (name, rest.to_owned())
            })
            .collect()
    }
}

fn field(block: &str, label: &str) -> Option<String> {
    block
        .lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{label}: ")))
        .map(str::to_owned)
}

/// Pings `to` from `from`: how many of `count` came back.
fn pings(lab: &Lab, from: &str, to: &str, count: u32) -> u32 {
    let c = count.to_string();
    let out = lab
        .exec(from, &["ping", "-n", "-c", &c, "-i", "0.2", "-W", "2", to])
        .unwrap();
    received(&out.stdout)
}

/// `M received` from ping's summary line.
fn received(ping_output: &str) -> u32 {
    ping_output
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn transmitted(ping_output: &str) -> u32 {
    ping_output
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A ping that runs in the background for `count` × 100 ms.
fn background_ping(lab: &Lab, from: &str, to: Ipv4Addr, count: u32, label: &str) -> Proc {
    let (c, t) = (count.to_string(), to.to_string());
    lab.spawn(
        from,
        label,
        &["ping", "-n", "-c", &c, "-i", "0.1", "-W", "2", &t],
    )
    .unwrap()
}

/// Waits for a background ping to finish; its (transmitted, received).
fn ping_result(mut p: Proc, timeout: Duration) -> (u32, u32, String) {
    p.wait_timeout(timeout).unwrap();
    let log = p.log();
    (transmitted(&log), received(&log), log)
}

/// Waits until each node is connected (in its `sessions`-th session or a
/// later one) and knows `peers` peers, each with the endpoints it reported.
fn wait_all_connected(lab: &Lab, nodes: &[&Node], sessions: u64, peers: usize) {
    for n in nodes {
        lab.wait_until(
            &format!(
                "{} connected (session {sessions}) with {peers} peers",
                n.name
            ),
            Duration::from_secs(60),
            || {
                let s = n.status(lab);
                let ps = s.peers();
                s.connected()
                    && s.sessions() >= sessions
                    && ps.len() == peers
                    && ps.values().all(|p| field(p, "candidates").is_some())
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", n.status(lab).0, n.log()));
    }
}

#[test]
fn nodes_join_survive_a_coordinator_restart_rotate_keys_and_tokens_are_revoked() {
    // The state outlives the lab: its processes are gone before it is removed.
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::up(&topology()).unwrap();
    let mut coord = Coordinator::start(&lab, &dir.path().join("coord"));
    let token = coord.admin(&lab, &["token", "create", "--reusable"]);
    let token = token.trim().to_owned();
    assert!(token.starts_with("meshd1_"), "{token}");

    // ---- everyone joins with the one reusable token ----
    let root = dir.path();
    let open1 = Node::up(&lab, "open1", root, Some(&token));
    let mut open2 = Node::up(&lab, "open2", root, Some(&token));
    let nat1 = Node::up(&lab, "nat1", root, Some(&token));
    let tcp1 = Node::up(&lab, "tcp1", root, Some(&token));
    // nat2 runs as a daemon: `meshd up` returns once the node is in the mesh.
    let nat2 = Node {
        name: "nat2",
        state: root.join("nat2"),
        proc: None,
    };
    // Started from a shell holding a file open without close-on-exec, as
    // shells do: the daemon must not keep it.
    let held = root.join("held-by-the-shell");
    let script = format!(
        "exec 9>>{}; exec {MESHD} up --name nat2 --token {token} --state {}",
        held.display(),
        nat2.state.display()
    );
    let out = lab.exec("nat2", &["sh", "-c", &script]).unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stderr.contains("nat2 is up on meshd0"),
        "{}",
        out.stderr
    );
    // No colour codes off a terminal, in what it printed or in its log.
    assert!(!out.stderr.contains('\x1b'), "{}", out.stderr);
    let daemon_log = std::fs::read_to_string(nat2.state.join("meshd.log")).unwrap();
    assert!(!daemon_log.contains('\x1b'), "{daemon_log}");
    let daemon = daemon_pid(&nat2.state);
    let open: Vec<_> = std::fs::read_dir(format!("/proc/{daemon}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .collect();
    assert!(!open.contains(&held), "{open:?}");
    let all = [&open1, &open2, &nat1, &tcp1, &nat2];
    wait_all_connected(&lab, &all, 1, 4);
    // One daemon per state directory.
    let again = nat2.meshd(&lab, "up", &[]);
    assert!(!again.status.success());
    assert!(again.stderr.contains("already running"), "{}", again.stderr);

    let status: Vec<Status> = all.iter().map(|n| n.status(&lab)).collect();
    let ip = |i: usize| status[i].ipv4();
    for s in &status {
        assert!(
            Ipv4Addr::new(100, 64, 0, 0) <= s.ipv4()
                && s.ipv4() <= Ipv4Addr::new(100, 127, 255, 255),
            "{}",
            s.0
        );
    }
    // The control session behind the UDP-blocking firewall fell back to TLS/TCP.
    assert!(
        status[3]
            .node_field("coordinator")
            .unwrap()
            .contains("over TLS/TCP"),
        "{}",
        status[3].0
    );
    assert!(
        status[0]
            .node_field("coordinator")
            .unwrap()
            .contains("over QUIC"),
        "{}",
        status[0].0
    );
    // The private key never left its node: not in any output or log.
    for (n, s) in all.iter().zip(&status) {
        let key = n.private_key();
        assert!(!s.0.contains(&key));
        assert!(!n.log().contains(&key));
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(n.state.join("node.key"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let saved = std::fs::read_to_string(n.state.join("node.toml")).unwrap();
        assert!(!saved.contains(&token[7..20]), "token secret stored");
    }
    let coord_log = coord.proc.as_ref().unwrap().log();
    for n in &all {
        assert!(!coord_log.contains(&n.private_key()));
    }

    // ---- pings over every pair with a direct path ----
    assert_eq!(pings(&lab, "open1", &ip(1).to_string(), 3), 3);
    assert_eq!(pings(&lab, "open2", &ip(0).to_string(), 3), 3);
    assert_eq!(
        lab.exec(
            "open1",
            &["ping", "-6", "-n", "-c", "2", "-W", "2", &status[1].ipv6()]
        )
        .unwrap()
        .status
        .code(),
        Some(0),
        "IPv6 mesh address"
    );
    assert_eq!(pings(&lab, "nat1", &ip(0).to_string(), 3), 3);
    assert_eq!(pings(&lab, "nat1", &ip(1).to_string(), 3), 3);
    // Back through the mapping nat1's own traffic opened.
    assert_eq!(pings(&lab, "open1", &ip(2).to_string(), 3), 3);
    assert_eq!(pings(&lab, "nat1", &ip(4).to_string(), 3), 3);
    assert_eq!(pings(&lab, "nat2", &ip(2).to_string(), 3), 3);

    // ---- kill the coordinator: tunnels carry on, nodes come back ----
    let during_restart = [
        background_ping(&lab, "open1", ip(1), 600, "ping-restart-a"),
        background_ping(&lab, "nat1", ip(0), 600, "ping-restart-b"),
    ];
    coord.kill();
    for n in &all {
        lab.wait_until(
            &format!("{} to notice the coordinator is gone", n.name),
            Duration::from_secs(40),
            || !n.status(&lab).connected(),
        )
        .unwrap();
    }
    let coord_state = coord.state.clone();
    let addr_before = coord.addr.clone();
    coord = Coordinator::start(&lab, &coord_state);
    assert_eq!(coord.addr, addr_before);
    wait_all_connected(&lab, &all, 2, 4);
    for p in during_restart {
        let (sent, got, log) = ping_result(p, Duration::from_secs(90));
        assert!(sent >= 590, "{log}");
        assert_eq!(
            got, sent,
            "pings lost while the coordinator was away:\n{log}"
        );
    }
    // Same identities and addresses after the resync.
    for (n, before) in all.iter().zip(&status) {
        let after = n.status(&lab);
        assert_eq!(after.ipv4(), before.ipv4(), "{}", n.name);
        assert_eq!(after.node_id(), before.node_id(), "{}", n.name);
    }
    // A quick restart, before the nodes' heartbeats notice: the new process
    // resets their old QUIC sessions (its reset key comes from its stored
    // identity), and they are back at once.
    coord.kill();
    coord = Coordinator::start(&lab, &coord_state);
    wait_all_connected(&lab, &all, 3, 4);
    // Timed by the coordinator's own log (polling five nodes' status
    // would add its own delay): its ready line to the last login.
    let log = coord.proc.as_ref().unwrap().log();
    let at = |line: &str| log_seconds(line).unwrap_or_else(|| panic!("{line}"));
    let ready = at(log
        .lines()
        .find(|l| l.contains("coordinator ready"))
        .unwrap());
    // Each node's first login after the restart.
    let mut logins = std::collections::BTreeMap::new();
    for l in log.lines().filter(|l| l.contains("node logged in")) {
        let name = l.split("name=").nth(1).unwrap_or_default().to_owned();
        logins.entry(name).or_insert_with(|| at(l));
    }
    assert_eq!(logins.len(), all.len(), "{log}");
    let last = logins.values().copied().fold(ready, f64::max);
    let back = Duration::from_secs_f64((last - ready).rem_euclid(86_400.0));
    println!(
        "quick restart: every node on a new session {:.2} s after the coordinator was up",
        back.as_secs_f64()
    );
    assert!(back <= Duration::from_secs(2), "{back:?}");

    // ---- rotate open1's key while two peers talk to it ----
    let old_key = status[0].public_key();
    let during_rotation = [
        background_ping(&lab, "open2", ip(0), 100, "ping-rotate-a"),
        background_ping(&lab, "nat1", ip(0), 100, "ping-rotate-b"),
    ];
    // Both pings are under way before the rotation.
    lab.wait_until("pings to start", Duration::from_secs(10), || {
        during_rotation
            .iter()
            .all(|p| p.log().contains("bytes from"))
    })
    .unwrap();
    let out = open1.meshd(&lab, "rotate-key", &[]);
    assert!(out.status.success(), "{out:?}");
    let new_key = out.stdout.trim().to_owned();
    assert_ne!(new_key, old_key);
    assert_eq!(open1.status(&lab).public_key(), new_key);
    for n in [&open2, &nat1, &tcp1, &nat2] {
        lab.wait_until(
            &format!("{} to learn open1's new key", n.name),
            Duration::from_secs(10),
            || {
                n.status(&lab)
                    .peers()
                    .get("open1")
                    .is_some_and(|b| field(b, "public key").as_deref() == Some(&new_key))
            },
        )
        .unwrap();
    }
    for p in during_rotation {
        let (sent, got, log) = ping_result(p, Duration::from_secs(60));
        assert_eq!(sent, 100, "{log}");
        assert_eq!(got, sent, "pings lost across the key rotation:\n{log}");
    }
    // New sessions under the new key carry traffic.
    assert_eq!(pings(&lab, "open2", &ip(0).to_string(), 3), 3);
    assert!(
        open1.private_key().len() == 44
            && !std::path::Path::new(&open1.state.join("node.key.next")).exists()
    );

    // ---- a revoked token admits nobody ----
    let tokens: serde_json::Value =
        serde_json::from_str(&coord.admin(&lab, &["tokens", "list", "--json"])).unwrap();
    let id = tokens["tokens"][0]["id"].as_str().unwrap().to_owned();
    coord.admin(&lab, &["tokens", "revoke", &id]);
    let late = Node {
        name: "open3",
        state: root.join("open3"),
        proc: None,
    };
    let out = lab
        .exec(
            "open3",
            &[
                "env",
                "RUST_BACKTRACE=1",
                MESHD,
                "up",
                "--name",
                "open3",
                "--token",
                &token,
                "--state",
                late.state.to_str().unwrap(),
            ],
        )
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(
        out.stderr.contains("cannot join") && out.stderr.contains("revoked"),
        "{}",
        out.stderr
    );
    // The one error that matters, on one line: no backtrace, no log lines.
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
    assert!(out.stderr.starts_with("meshd: "), "{}", out.stderr);
    // A failed first join leaves no state directory (and no key) behind.
    assert!(!late.state.exists());
    // ... while the nodes that joined with it stay.
    assert!(open1.status(&lab).connected());

    // ---- a restarted node logs in with its key, no token ----
    let before = open2.status(&lab);
    let key_before = open2.private_key();
    let out = open2.meshd(&lab, "down", &[]);
    assert!(out.status.success(), "{out:?}");
    let status_code = open2
        .proc
        .as_mut()
        .unwrap()
        .wait_timeout(Duration::from_secs(10))
        .unwrap();
    assert!(status_code.success(), "{}", open2.log());
    assert!(!open2.state.join("control.sock").exists());
    open2.start(&lab, None);
    wait_all_connected(&lab, &[&open2], 1, 4);
    let after = open2.status(&lab);
    assert_eq!(after.node_id(), before.node_id());
    assert_eq!(after.ipv4(), before.ipv4());
    assert_eq!(after.public_key(), before.public_key());
    assert_eq!(open2.private_key(), key_before);
    // open1 still holds a session open2 lost in its restart: its first
    // packet makes open2 start a handshake (instead of open1 noticing after
    // its 15 s timeout), so at most that one is lost.
    let first = pings(&lab, "open1", &ip(1).to_string(), 1);
    assert_eq!(
        pings(&lab, "open1", &ip(1).to_string(), 1),
        1,
        "first: {first}"
    );
    assert_eq!(pings(&lab, "open1", &ip(1).to_string(), 3), 3);
    let nodes: serde_json::Value =
        serde_json::from_str(&coord.admin(&lab, &["nodes", "list", "--json"])).unwrap();
    assert_eq!(nodes["nodes"].as_array().unwrap().len(), 5, "{nodes}");

    // The daemon started in the background stops on request.
    let out = nat2.meshd(&lab, "down", &[]);
    assert!(out.status.success(), "{out:?}");
    assert!(!nat2.state.join("control.sock").exists());
    let gone = lab.exec("nat2", &["ip", "link", "show", "meshd0"]).unwrap();
    assert!(!gone.status.success(), "meshd0 left behind");
}

/// An expired node registers again with its own key. It used to be refused
/// `KeyInUse` (its expired record still held the key) while a login said
/// `NodeExpired`, so the agent alternated between the two for ever. open1
/// still holds the reusable token it joined with and comes back by itself;
/// open2's one-time token is used up, so it stops with the reason until the
/// operator gives it a new token. Both come back as the same node, with the
/// same addresses, and carry traffic.
#[test]
fn an_expired_node_given_a_token_is_back_in_the_mesh_within_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::up(
        &Topology::new()
            .host("coord")
            .site(Site::new("open", ["open1", "open2"])),
    )
    .unwrap();
    let coord = Coordinator::start(&lab, &dir.path().join("coord"));
    let reusable = coord.admin(&lab, &["token", "create", "--reusable"]);
    let once = coord.admin(&lab, &["token", "create"]);
    let root = dir.path();
    let open1 = Node::up(&lab, "open1", root, Some(reusable.trim()));
    let mut open2 = Node::up(&lab, "open2", root, Some(once.trim()));
    wait_all_connected(&lab, &[&open1, &open2], 1, 1);
    let before = [open1.status(&lab), open2.status(&lab)];

    // ---- open1 has a token that still admits nodes: back by itself ----
    coord.admin(&lab, &["nodes", "expire", &before[0].node_id()]);
    let back = time_until("open1 back in the mesh", Duration::from_secs(30), || {
        let s = open1.status(&lab);
        s.connected() && s.sessions() >= 2 && open2.status(&lab).peers().contains_key("open1")
    });
    println!("open1 back in the mesh {back:?} after it was expired");
    assert!(back < Duration::from_secs(5), "{back:?}\n{}", open1.log());
    let after = open1.status(&lab);
    assert_eq!(after.node_id(), before[0].node_id());
    assert_eq!(after.ipv4(), before[0].ipv4());
    assert_eq!(pings(&lab, "open2", &after.ipv4().to_string(), 3), 3);

    // ---- open2's token is used up: it stops until given a new one ----
    coord.admin(&lab, &["nodes", "expire", &before[1].node_id()]);
    lab.wait_until("open2 to stop", Duration::from_secs(30), || {
        open2
            .status(&lab)
            .node_field("coordinator")
            .is_some_and(|c| c.contains("stopped"))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", open2.status(&lab).0, open2.log()));
    let why = open2
        .status(&lab)
        .node_field("last error")
        .unwrap_or_default();
    assert!(why.contains("used"), "{why}");
    let out = open2.meshd(&lab, "down", &[]);
    assert!(out.status.success(), "{out:?}");
    open2
        .proc
        .as_mut()
        .unwrap()
        .wait_timeout(Duration::from_secs(10))
        .unwrap();
    let fresh = coord.admin(&lab, &["token", "create"]);
    let start = std::time::Instant::now();
    open2.start(&lab, Some(fresh.trim()));
    wait_all_connected(&lab, &[&open2], 1, 1);
    println!(
        "open2 back in the mesh {:?} after its restart with a new token",
        start.elapsed()
    );
    let after = open2.status(&lab);
    assert_eq!(after.node_id(), before[1].node_id());
    assert_eq!(after.ipv4(), before[1].ipv4());
    assert_eq!(pings(&lab, "open1", &after.ipv4().to_string(), 3), 3);
}

/// The first ping after `meshd up` returns gets its answer, both ways
/// between open hosts and from a node behind a NAT, 5 joins each: a new
/// node's endpoints reach its peers right after its registration, and
/// packets wait (instead of being dropped) while a peer's endpoint or
/// session is pending.
#[test]
fn the_first_ping_after_up_returns_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::up(&topology()).unwrap();
    let coord = Coordinator::start(&lab, &dir.path().join("coord"));
    let token = coord.admin(&lab, &["token", "create", "--reusable"]);
    let token = token.trim();
    let open1 = Node::up(&lab, "open1", dir.path(), Some(token));
    wait_all_connected(&lab, &[&open1], 1, 0);
    let ip1 = open1.status(&lab).ipv4().to_string();
    for round in 0..5 {
        for (name, both_ways) in [("open2", true), ("nat1", false)] {
            let n = Node {
                name,
                state: dir.path().join(format!("{name}-{round}")),
                proc: None,
            };
            let out = n.meshd(&lab, "up", &["--name", name, "--token", token]);
            assert!(out.status.success(), "{out:?}");
            let first = lab
                .exec(name, &["ping", "-n", "-c", "1", "-W", "2", &ip1])
                .unwrap();
            assert_eq!(
                received(&first.stdout),
                1,
                "round {round}: {name} -> open1 {first:?}"
            );
            if both_ways {
                let ip = n.status(&lab).ipv4().to_string();
                let back = lab
                    .exec("open1", &["ping", "-n", "-c", "1", "-W", "2", &ip])
                    .unwrap();
                assert_eq!(
                    received(&back.stdout),
                    1,
                    "round {round}: open1 -> {name} {back:?}"
                );
            }
            let out = n.meshd(&lab, "down", &[]);
            assert!(out.status.success(), "{out:?}");
        }
    }
}

/// The time of day, in seconds, of a log line (`2026-12-07T22:10:15.908Z …`).
fn log_seconds(line: &str) -> Option<f64> {
    let time = line.split_whitespace().next()?.split('T').nth(1)?;
    let mut parts = time.trim_end_matches('Z').split(':');
    let (h, m, s): (f64, f64, f64) = (
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
    );
    Some(h * 3600.0 + m * 60.0 + s)
}

/// The pid of the background daemon that serves the state directory `state`.
fn daemon_pid(state: &Path) -> u32 {
    let state = state.to_str().unwrap();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let args: Vec<&[u8]> = c.split(|&b| b == 0).collect();
                args.contains(&b"--daemon-child".as_slice()) && args.contains(&state.as_bytes())
            })
        })
        .unwrap_or_else(|| panic!("no daemon for {state}"))
}

/// A PostgreSQL server on a lab host, listening on its lab address.
struct Postgres {
    _proc: Proc,
    url: String,
}

fn postgres(lab: &Lab, host: &str, dir: &Path) -> Postgres {
    let bin = std::fs::read_dir("/usr/lib/postgresql")
        .expect(
            "PostgreSQL server binaries (Debian `postgresql`, scripts/install-deps installs it)",
        )
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("postgres").exists())
        .max()
        .expect("no /usr/lib/postgresql/*/bin/postgres");
    let id = |args: &[&str]| -> u32 {
        let out = std::process::Command::new("id")
            .args(args)
            .output()
            .unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let (uid, gid) = (id(&["-u", "postgres"]), id(&["-g", "postgres"]));
    std::fs::create_dir_all(dir).unwrap();
    std::os::unix::fs::chown(dir, Some(uid), Some(gid)).unwrap();
    let data = dir.join("data");
    let as_postgres = |tool: &Path| {
        let mut c = std::process::Command::new("setpriv");
        c.args([
            "--reuid",
            "postgres",
            "--regid",
            "postgres",
            "--init-groups",
            "--",
        ])
        .arg(tool);
        c
    };
    let out = as_postgres(&bin.join("initdb"))
        .args([
            "-U",
            "meshd",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
            "-D",
        ])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success(), "initdb: {out:?}");
    // Replicas connect over the lab's network, not loopback.
    let mut hba = std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("pg_hba.conf"))
        .unwrap();
    std::io::Write::write_all(&mut hba, b"host all all 198.18.0.0/15 trust\n").unwrap();
    let addr = lab.addr(host).unwrap();
    let listen = format!("listen_addresses={addr}");
    let postgres = bin.join("postgres");
    let (data_s, dir_s) = (data.to_str().unwrap(), dir.to_str().unwrap());
    let proc = lab
        .spawn(
            host,
            "postgres",
            &[
                "setpriv",
                "--reuid",
                "postgres",
                "--regid",
                "postgres",
                "--init-groups",
                "--",
                postgres.to_str().unwrap(),
                "-D",
                data_s,
                "-p",
                "5432",
                "-k",
                dir_s,
                "-c",
                &listen,
                "-c",
                "fsync=off",
            ],
        )
        .unwrap();
    let target = std::net::SocketAddr::from((addr, 5432));
    lab.wait_until("PostgreSQL to listen", Duration::from_secs(60), || {
        meshd_netlab::tools::tcp_connects(lab, host, target, Duration::from_secs(1)).unwrap()
    })
    .unwrap();
    Postgres {
        _proc: proc,
        url: format!("host={addr} port=5432 user=meshd dbname=postgres"),
    }
}

/// `token` with its coordinator addresses in reverse order.
fn reversed(token: &str) -> String {
    let mut t = meshd_proto::token::JoinToken::parse(token).unwrap();
    t.addresses.reverse();
    t.encode().unwrap()
}

/// How long until `cond` holds, polled every 20 ms (a measurement, so finer
/// than `Lab::wait_until`); panics with `what` after `timeout`.
fn time_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = std::time::Instant::now();
    loop {
        if cond() {
            return start.elapsed();
        }
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `meshd up --token TOKEN` in the background, as a user runs it: how long
/// until it returned (the node in the mesh), and its output.
fn timed_join(lab: &Lab, node: &Node, token: &str) -> (Duration, Output) {
    let start = std::time::Instant::now();
    let out = node.meshd(lab, "up", &["--name", node.name, "--token", token]);
    (start.elapsed(), out)
}

/// Two `meshd coord` replicas on one PostgreSQL, a node homed on each (the
/// first address of its token). Replica A is killed: its node is on B within
/// 3 s, with its tunnel carrying on, and a node joining meanwhile takes no
/// longer than one joining while both were up. A comes back: its node
/// returns to it. The database goes away: a first `meshd up` fails within
/// 5 s with the reason. Timings are printed (`--nocapture`).
#[test]
fn replicas_on_postgres_serve_one_mesh_and_nodes_fail_over() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::up(
        &Topology::new()
            .host("db")
            .host("coorda")
            .host("coordb")
            .site(Site::new("open", ["n1", "n2", "n3", "n4", "n5"])),
    )
    .unwrap();
    let pg = postgres(&lab, "db", &dir.path().join("pg"));
    let (a_addr, b_addr) = (
        format!("{}:443", lab.addr("coorda").unwrap()),
        format!("{}:443", lab.addr("coordb").unwrap()),
    );
    let flags = [
        "--database",
        &pg.url,
        "--advertise",
        &a_addr,
        "--advertise",
        &b_addr,
    ];
    let (state_a, state_b) = (dir.path().join("coorda"), dir.path().join("coordb"));
    let mut a = Coordinator::start_on(&lab, "coorda", &state_a, &flags);
    // One certificate for both, as a token pins one (docs/admin-api.md).
    std::fs::create_dir_all(&state_b).unwrap();
    for f in ["coord-cert.der", "coord-key.der", "coord-x25519.key"] {
        std::fs::copy(state_a.join(f), state_b.join(f)).unwrap();
    }
    let b = Coordinator::start_on(&lab, "coordb", &state_b, &flags);

    let token = a.admin(&lab, &["token", "create", "--reusable"]);
    let token = token.trim();
    let n1 = Node::up(&lab, "n1", dir.path(), Some(token));
    // n2 tries replica B first.
    let n2 = Node::up(&lab, "n2", dir.path(), Some(&reversed(token)));
    wait_all_connected(&lab, &[&n1, &n2], 1, 1);
    let (s1, s2) = (n1.status(&lab), n2.status(&lab));
    let on = |n: &Node, addr: &str| {
        let s = n.status(&lab);
        s.connected() && s.node_field("coordinator").unwrap().contains(addr)
    };
    assert!(on(&n1, &a_addr), "{}", s1.0);
    assert!(on(&n2, &b_addr), "{}", s2.0);
    // Joined through different replicas, each sees the other, with the
    // endpoints it reported to its own replica.
    for (n, other) in [(&n1, "n2"), (&n2, "n1")] {
        lab.wait_until(
            &format!("{} to learn {other}'s endpoint", n.name),
            Duration::from_secs(10),
            || {
                n.status(&lab)
                    .peers()
                    .get(other)
                    .is_some_and(|p| field(p, "candidates").is_some())
            },
        )
        .unwrap();
    }
    assert_eq!(pings(&lab, "n1", &s2.ipv4().to_string(), 3), 3);
    assert_eq!(pings(&lab, "n2", &s1.ipv4().to_string(), 3), 3);

    // A join with both replicas up, for comparison.
    let n3 = Node {
        name: "n3",
        state: dir.path().join("n3"),
        proc: None,
    };
    let (join_up, out) = timed_join(&lab, &n3, token);
    assert!(out.status.success(), "{out:?}");

    // Replica A dies: n1 moves to B, the tunnel carries on.
    // 10 s of pings: across the failover, the join and the key rotation.
    let during = background_ping(&lab, "n1", s2.ipv4(), 100, "ping-failover");
    lab.wait_until("the ping to start", Duration::from_secs(10), || {
        during.log().contains("bytes from")
    })
    .unwrap();
    a.kill();
    let failover = time_until(
        "n1 to fail over to replica B",
        Duration::from_secs(30),
        || on(&n1, &b_addr),
    );
    let after = n1.status(&lab);
    assert_eq!(after.node_id(), s1.node_id());
    // Connected again: the error that ended the session is not shown.
    assert!(after.node_field("last error").is_none(), "{}", after.0);
    // A node joining now, with replica A (its token's first) down.
    let n4 = Node {
        name: "n4",
        state: dir.path().join("n4"),
        proc: None,
    };
    let (join_down, out) = timed_join(&lab, &n4, token);
    assert!(out.status.success(), "{out:?}");
    assert!(on(&n4, &b_addr));
    println!(
        "failover: n1 on replica B {:.2} s after replica A was killed; \
         join with both replicas up {:.2} s, with A down {:.2} s",
        failover.as_secs_f64(),
        join_up.as_secs_f64(),
        join_down.as_secs_f64()
    );
    assert!(
        failover <= Duration::from_secs(3),
        "{failover:?}\n{}",
        n1.log()
    );
    assert!(
        join_down <= join_up + Duration::from_millis(500),
        "join with A down {join_down:?}, with both up {join_up:?}"
    );
    // A change made through B reaches n2, also on B: n1's new key.
    let out = n1.meshd(&lab, "rotate-key", &[]);
    assert!(out.status.success(), "{out:?}");
    let new_key = out.stdout.trim().to_owned();
    lab.wait_until("n2 to learn n1's new key", Duration::from_secs(10), || {
        n2.status(&lab)
            .peers()
            .get("n1")
            .is_some_and(|p| field(p, "public key").as_deref() == Some(&new_key))
    })
    .unwrap();
    let (sent, got, log) = ping_result(during, Duration::from_secs(30));
    assert!(sent >= 95, "{log}");
    assert_eq!(got, sent, "pings lost during the failover:\n{log}");

    // Replica A returns: n1 goes home (checked every 10-20 s), n2 stays.
    a = Coordinator::start_on(&lab, "coorda", &state_a, &flags);
    let back = time_until("n1 to return to replica A", Duration::from_secs(45), || {
        on(&n1, &a_addr)
    });
    println!(
        "return: n1 back on replica A {:.1} s after it restarted",
        back.as_secs_f64()
    );
    assert!(on(&n2, &b_addr));

    // The database goes away: a first join fails at once, saying why.
    drop(pg);
    let n5 = Node {
        name: "n5",
        state: dir.path().join("n5"),
        proc: None,
    };
    let (took, out) = timed_join(&lab, &n5, token);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        out.stderr.contains(
            "the coordinator cannot save state: its database is unavailable; try again later"
        ),
        "{}",
        out.stderr
    );
    assert!(took < Duration::from_secs(5), "{took:?}: {}", out.stderr);
    println!(
        "database down: meshd up failed after {:.2} s",
        took.as_secs_f64()
    );
    // The nodes in the mesh keep their tunnels.
    assert_eq!(pings(&lab, "n2", &s1.ipv4().to_string(), 3), 3);
    // The daemons `meshd up` left running stop on request.
    for n in [&n3, &n4] {
        let out = n.meshd(&lab, "down", &[]);
        assert!(out.status.success(), "{out:?}");
    }
    drop((a, b));
}
