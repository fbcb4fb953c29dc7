//! Building a lab from a topology, using it, and tearing it down.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use crate::registry::{self, ns_name};
use crate::shaper::Shaper;
use crate::sys;
use crate::topology::{Firewall, Impairment, Nat, Topology};
use crate::LabError;

/// The lab resolver's address, on the core's loopback. The only DNS a `udp-blocked` site may reach.
pub const RESOLVER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 53);
const CORE: &str = "inet";
/// Lifetime of a router's UDP mapping after its last packet, before and after it has carried
/// traffic both ways (docs/netlab.md, "Semantics").
const UDP_UNREPLIED_SECS: &str = "30";
const UDP_REPLIED_SECS: &str = "120";

/// How a lab keeps its logs.
#[derive(Debug, Clone, Default)]
pub struct LabOptions {
    /// Where per-lab log directories go (default: the system temp dir).
    pub log_root: Option<PathBuf>,
    /// Keep the logs after a clean teardown (they are always kept after a panic).
    pub keep_logs: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Core,
    Host,
    Router,
    Node,
}

#[derive(Debug, Clone)]
struct Member {
    ns: String,
    role: Role,
    addr: Ipv4Addr,
}

/// A running lab. Dropping it removes everything it created.
pub struct Lab {
    id: String,
    log_dir: PathBuf,
    keep_logs: bool,
    members: BTreeMap<String, Member>,
    shaper: Option<Shaper>,
    children: Mutex<Vec<Child>>,
    torn_down: bool,
}

/// Namespaces of the labs of this process, for the Ctrl-C / SIGTERM handler.
static LIVE: Mutex<BTreeMap<String, Vec<String>>> = Mutex::new(BTreeMap::new());
static SIGNALS: Once = Once::new();

/// On SIGINT, SIGTERM or SIGHUP, removes this process's labs before exiting, since destructors
/// do not run when a signal ends the process.
fn install_signal_handler() {
    SIGNALS.call_once(|| {
        let r = ctrlc::set_handler(|| {
            let labs = std::mem::take(&mut *LIVE.lock().unwrap_or_else(|p| p.into_inner()));
            for (id, namespaces) in labs {
                let _ = registry::remove(&id, &namespaces);
            }
            std::process::exit(130);
        });
        if let Err(e) = r {
            tracing::warn!(error = %e, "could not install the lab's signal handler; `meshd lab clean` removes labs left by a killed process");
        }
    });
}

impl Lab {
    /// Builds the lab described by `topo`.
    pub fn up(topo: &Topology) -> Result<Lab, LabError> {
        Self::up_with(topo, LabOptions::default())
    }

    pub fn up_with(topo: &Topology, opts: LabOptions) -> Result<Lab, LabError> {
        topo.validate()?;
        let mut lab = Lab::reserve(opts)?;
        lab.build(topo)?;
        Ok(lab)
    }

    /// Two namespaces, `left` (198.18.0.1) and `right` (198.18.0.2), joined by one veth pair:
    /// the baseline that throughput through the lab is compared with.
    pub fn veth_pair() -> Result<Lab, LabError> {
        let mut lab = Lab::reserve(LabOptions::default())?;
        let left = lab.add_member("left", Role::Host, Ipv4Addr::new(198, 18, 0, 1));
        let right = lab.add_member("right", Role::Host, Ipv4Addr::new(198, 18, 0, 2));
        let mut b = String::new();
        let _ = writeln!(b, "netns add {left}\nnetns add {right}");
        sys::run("ip", &["-batch", "-"], Some(&b))?;
        lab.ip_batch(
            &left,
            &format!(
                "link set lo up\nlink add name eth0 type veth peer name eth0 netns {right}\n\
                 addr add 198.18.0.1/24 dev eth0\nlink set eth0 up\n"
            ),
        )?;
        lab.ip_batch(
            &right,
            "link set lo up\naddr add 198.18.0.2/24 dev eth0\nlink set eth0 up\n",
        )?;
        Ok(lab)
    }

    fn reserve(opts: LabOptions) -> Result<Lab, LabError> {
        sys::check_privileges()?;
        sys::require_tool("ip", "iproute2")?;
        install_signal_handler();
        let (id, _state) = registry::create()?;
        let root = opts.log_root.clone().unwrap_or_else(std::env::temp_dir);
        let log_dir = root.join(format!("meshd-lab-{id}"));
        let lab = Lab {
            id: id.clone(),
            log_dir: log_dir.clone(),
            keep_logs: opts.keep_logs,
            members: BTreeMap::new(),
            shaper: None,
            children: Mutex::new(Vec::new()),
            torn_down: false,
        };
        lock_live().insert(id, Vec::new());
        std::fs::create_dir_all(&log_dir).map_err(|source| LabError::Io {
            what: format!("creating {}", log_dir.display()),
            source,
        })?;
        Ok(lab)
    }

    /// Records a namespace as part of this lab before it is created, so that teardown removes
    /// it even if building fails half-way.
    fn add_member(&mut self, name: &str, role: Role, addr: Ipv4Addr) -> String {
        let ns = ns_name(&self.id, name);
        self.members.insert(
            name.to_owned(),
            Member {
                ns: ns.clone(),
                role,
                addr,
            },
        );
        lock_live()
            .entry(self.id.clone())
            .or_default()
            .push(ns.clone());
        ns
    }

    fn ip_batch(&self, ns: &str, batch: &str) -> Result<(), LabError> {
        sys::run("ip", &["-n", ns, "-batch", "-"], Some(batch)).map(drop)
    }

    fn build(&mut self, topo: &Topology) -> Result<(), LabError> {
        let needs_nft = topo
            .sites
            .iter()
            .any(|s| s.nat != Nat::None || s.firewall != Firewall::Open);
        if needs_nft {
            sys::require_tool("nft", "nftables")?;
        }
        let impaired: Vec<(usize, Impairment)> = topo
            .hosts
            .iter()
            .map(|h| h.link)
            .chain(topo.sites.iter().map(|s| s.link))
            .enumerate()
            .map(|(i, l)| (i + 1, l))
            .filter(|(_, l)| l.is_active())
            .collect();
        if !impaired.is_empty() {
            sys::require_tool("iptables-restore", "iptables")?;
        }

        // 1. Every namespace, in one `ip` run.
        let core = self.add_member(CORE, Role::Core, RESOLVER_ADDR);
        for (k, h) in topo.hosts.iter().enumerate() {
            self.add_member(&h.name, Role::Host, Ipv4Addr::new(198, 18, k as u8 + 1, 2));
        }
        for (j, s) in topo.sites.iter().enumerate() {
            let k = (topo.hosts.len() + j + 1) as u8;
            self.add_member(&s.name, Role::Router, Ipv4Addr::new(198, 18, k, 2));
            for (i, n) in s.nodes.iter().enumerate() {
                self.add_member(n, Role::Node, Ipv4Addr::new(198, 19, k, 10 + i as u8));
            }
        }
        let all: String = self
            .members
            .values()
            .map(|m| format!("netns add {}\n", m.ns))
            .collect();
        sys::run("ip", &["-batch", "-"], Some(&all))?;

        // 2. The core: one link per attachment K, 198.18.K.1 on its side.
        let mut core_b = String::from("link set lo up\naddr add 198.18.0.53/32 dev lo\n");
        let attachments: Vec<(&str, u8)> = topo
            .hosts
            .iter()
            .map(|h| h.name.as_str())
            .chain(topo.sites.iter().map(|s| s.name.as_str()))
            .enumerate()
            .map(|(i, n)| (n, i as u8 + 1))
            .collect();
        for (name, k) in &attachments {
            let peer = &self.members[*name].ns;
            let _ = write!(
                core_b,
                "link add name l{k} type veth peer name {wan} netns {peer}\n\
                 addr add 198.18.{k}.1/24 dev l{k}\nlink set l{k} up\n",
                wan = if self.members[*name].role == Role::Host {
                    "eth0"
                } else {
                    "wan"
                },
            );
        }
        for (j, s) in topo.sites.iter().enumerate() {
            if s.nat == Nat::None {
                let k = topo.hosts.len() + j + 1;
                let _ = writeln!(core_b, "route add 198.19.{k}.0/24 via 198.18.{k}.2");
            }
        }
        self.ip_batch(&core, &core_b)?;
        sys::sysctl(&core, "net.ipv4.ip_forward", "1")?;
        // The core is a router, not a host on each link: redirects would teach hosts shortcuts
        // that bypass the emulated uplinks.
        sys::sysctl(&core, "net.ipv4.conf.all.send_redirects", "0")?;

        // 3. Public hosts.
        for (k, h) in topo.hosts.iter().enumerate() {
            let k = k + 1;
            let ns = self.members[&h.name].ns.clone();
            self.ip_batch(
                &ns,
                &format!(
                    "link set lo up\naddr add 198.18.{k}.2/24 dev eth0\nlink set eth0 up\n\
                     route add default via 198.18.{k}.1\n"
                ),
            )?;
        }

        // 4. Sites: a router with `wan` and one point-to-point veth `p<i>` per node. Node i has
        // 198.19.K.(10+i)/24; the router answers ARP for the whole LAN on each `p<i>`
        // (proxy_arp) and routes each node's /32, so nodes of a site still reach each other.
        // No bridge: with br_netfilter loaded on the host, bridged frames would also cross
        // netfilter, and the lab must not depend on the host's modules.
        for (j, s) in topo.sites.iter().enumerate() {
            let k = topo.hosts.len() + j + 1;
            let router = self.members[&s.name].ns.clone();
            let mut rb = format!(
                "link set lo up\naddr add 198.18.{k}.2/24 dev wan\nlink set wan up\n\
                 route add default via 198.18.{k}.1\n"
            );
            for (i, n) in s.nodes.iter().enumerate() {
                let _ = write!(
                    rb,
                    "link add name p{i} type veth peer name eth0 netns {peer}\n\
                     addr add 198.19.{k}.1/32 dev p{i}\nlink set p{i} up\n\
                     route add 198.19.{k}.{a}/32 dev p{i}\n",
                    peer = self.members[n].ns,
                    a = 10 + i
                );
            }
            self.ip_batch(&router, &rb)?;
            sys::sysctl(&router, "net.ipv4.ip_forward", "1")?;
            sys::sysctl(&router, "net.ipv4.conf.all.proxy_arp", "1")?;
            // Replies between two nodes of a site leave by another p<i> than they came in:
            // that is routing, not a shortcut to advertise.
            sys::sysctl(&router, "net.ipv4.conf.all.send_redirects", "0")?;
            for (i, n) in s.nodes.iter().enumerate() {
                let ns = self.members[n].ns.clone();
                self.ip_batch(
                    &ns,
                    &format!(
                        "link set lo up\naddr add 198.19.{k}.{a}/24 dev eth0\nlink set eth0 up\n\
                         route add default via 198.19.{k}.1\n",
                        a = 10 + i
                    ),
                )?;
            }
            if let Some(rules) = router_ruleset(s.nat, s.firewall) {
                sys::run(
                    "ip",
                    &["netns", "exec", &router, "nft", "-f", "-"],
                    Some(&rules),
                )?;
                // How long a UDP mapping lives is conntrack's per-namespace UDP timeouts; set
                // here (after the ruleset has loaded conntrack) so that no host setting leaks in.
                sys::sysctl(
                    &router,
                    "net.netfilter.nf_conntrack_udp_timeout",
                    UDP_UNREPLIED_SECS,
                )?;
                sys::sysctl(
                    &router,
                    "net.netfilter.nf_conntrack_udp_timeout_stream",
                    UDP_REPLIED_SECS,
                )?;
            }
        }

        // 5. Impaired uplinks go through the userspace emulator in the core: traffic arriving
        // from link K waits in queue 2K, traffic leaving on it in queue 2K+1. PREROUTING and
        // POSTROUTING are different hooks, so a packet between two impaired uplinks is held by
        // both (an accept verdict resumes at the next hook, not at the next rule).
        if !impaired.is_empty() {
            let mut lines = Vec::new();
            let mut rules = String::from("*mangle\n");
            for (k, imp) in &impaired {
                let (up, down) = (2 * *k as u16, 2 * *k as u16 + 1);
                lines.push((up, *imp));
                lines.push((down, *imp));
                let _ = write!(
                    rules,
                    "-A PREROUTING -i l{k} -j NFQUEUE --queue-num {up}\n\
                     -A POSTROUTING -o l{k} -j NFQUEUE --queue-num {down}\n"
                );
            }
            rules.push_str("COMMIT\n");
            self.shaper = Some(Shaper::start(&core, lines)?);
            sys::run(
                "ip",
                &["netns", "exec", &core, "iptables-restore", "--noflush"],
                Some(&rules),
            )?;
        }
        tracing::info!(id = %self.id, namespaces = self.members.len(), "lab is up");
        Ok(())
    }

    /// The lab's unique id (part of every namespace name).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Where process output and exec records go.
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    fn member(&self, name: &str) -> Result<&Member, LabError> {
        self.members.get(name).ok_or_else(|| LabError::UnknownNode {
            name: name.to_owned(),
            known: self.members.keys().cloned().collect::<Vec<_>>().join(", "),
        })
    }

    /// The network namespace name of a node, host, site router or `inet` (the core).
    pub fn ns(&self, name: &str) -> Result<&str, LabError> {
        self.member(name).map(|m| m.ns.as_str())
    }

    /// A node's or host's address; for a site, its router's public (WAN) address.
    pub fn addr(&self, name: &str) -> Result<Ipv4Addr, LabError> {
        self.member(name).map(|m| m.addr)
    }

    /// How many packets from the internet a site's router has dropped that were addressed to
    /// the router itself (unsolicited input on its WAN address). Errors for a site without rules
    /// (`nat = "none"`, `firewall = "open"`), whose router accepts everything.
    pub fn wan_input_drops(&self, site: &str) -> Result<u64, LabError> {
        let m = self.member(site)?;
        if m.role != Role::Router {
            return Err(LabError::Lab(format!("{site} is not a site")));
        }
        let chain = self
            .exec(site, &["nft", "list", "chain", "inet", "netlab", "input"])?
            .ok()?;
        chain
            .lines()
            .find_map(|l| l.trim().strip_prefix("iifname \"wan\" counter packets "))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .ok_or_else(|| {
                LabError::Lab(format!(
                    "no WAN drop counter in {site}'s input chain: {chain}"
                ))
            })
    }

    /// Drops UDP between `site` (its router) and the public address `peer`,
    /// both ways, until [`Lab::unblock_udp`]: a direct path between two
    /// sites breaks while their TCP (and relays elsewhere) still work.
    pub fn block_udp(&self, site: &str, peer: Ipv4Addr) -> Result<(), LabError> {
        let m = self.member(site)?;
        if m.role != Role::Router {
            return Err(LabError::Lab(format!("{site} is not a site")));
        }
        let rules = format!(
            "table inet netlab_block {{\n  chain forward {{\n    type filter hook forward priority -10;\n    \
             ip daddr {peer} meta l4proto udp drop\n    ip saddr {peer} meta l4proto udp drop\n  }}\n}}\n"
        );
        let ns = self.ns(site)?.to_owned();
        sys::run(
            "ip",
            &["netns", "exec", &ns, "nft", "-f", "-"],
            Some(&rules),
        )
        .map(|_| ())
    }

    /// Lifts every [`Lab::block_udp`] of `site`.
    pub fn unblock_udp(&self, site: &str) -> Result<(), LabError> {
        self.exec(site, &["nft", "delete", "table", "inet", "netlab_block"])?
            .ok()
            .map(|_| ())
    }

    /// Names of the site nodes and public hosts, in order.
    pub fn endpoints(&self) -> Vec<&str> {
        self.members
            .iter()
            .filter(|(_, m)| matches!(m.role, Role::Host | Role::Node))
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// Runs `f` on a thread inside `name`'s namespace: sockets it opens live there.
    pub fn in_ns<T: Send>(&self, name: &str, f: impl FnOnce() -> T + Send) -> Result<T, LabError> {
        sys::in_netns(&self.member(name)?.ns, f)
    }

    /// Starts a long-running program in `name`'s namespace; its stdout and stderr go to
    /// `<log_dir>/<name>.<label>.log`. The process is killed when the [`Proc`] or the lab drops.
    pub fn spawn(&self, name: &str, label: &str, argv: &[&str]) -> Result<Proc, LabError> {
        let ns = self.member(name)?.ns.clone();
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| LabError::Lab("spawn: empty command".into()))?;
        let log = self.log_dir.join(format!("{name}.{label}.log"));
        let file = File::create(&log).map_err(|source| LabError::Io {
            what: format!("creating {}", log.display()),
            source,
        })?;
        let err = file.try_clone().map_err(|source| LabError::Io {
            what: format!("opening {}", log.display()),
            source,
        })?;
        let child = Command::new("ip")
            .args(["netns", "exec", &ns, program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .map_err(|source| LabError::Io {
                what: format!("starting {program} in {name}"),
                source,
            })?;
        tracing::debug!(node = name, label, pid = child.id(), "spawned");
        Ok(Proc {
            child,
            log,
            what: format!("{program} in {name}"),
        })
    }

    /// Runs a command in `name`'s namespace to completion (at most 60 s) and collects its output.
    pub fn exec(&self, name: &str, argv: &[&str]) -> Result<Output, LabError> {
        self.exec_timeout(name, argv, Duration::from_secs(60))
    }

    pub fn exec_timeout(
        &self,
        name: &str,
        argv: &[&str],
        timeout: Duration,
    ) -> Result<Output, LabError> {
        let ns = self.member(name)?.ns.clone();
        let describe = format!("{} (in {name})", argv.join(" "));
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns])
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| LabError::Io {
                what: format!("starting {describe}"),
                source,
            })?;
        let mut out_pipe = child.stdout.take();
        let mut err_pipe = child.stderr.take();
        let out_t = std::thread::spawn(move || read_all(out_pipe.as_mut()));
        let err_t = std::thread::spawn(move || read_all(err_pipe.as_mut()));
        let deadline = Instant::now() + timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(self.timeout_error(&describe, timeout));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(source) => {
                    return Err(LabError::Io {
                        what: format!("waiting for {describe}"),
                        source,
                    })
                }
            }
        };
        let out = Output {
            status,
            stdout: out_t.join().unwrap_or_default(),
            stderr: err_t.join().unwrap_or_default(),
            what: describe,
        };
        self.record(&out);
        Ok(out)
    }

    fn record(&self, out: &Output) {
        let path = self.log_dir.join("exec.log");
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(
                f,
                "$ {}\n{}{}[{}]\n",
                out.what, out.stdout, out.stderr, out.status
            );
        }
    }

    fn timeout_error(&self, what: &str, timeout: Duration) -> LabError {
        LabError::Timeout {
            what: what.to_owned(),
            secs: timeout.as_secs_f64(),
            logs: self.log_dir.display().to_string(),
        }
    }

    /// Polls `cond` until it holds or `timeout` passes.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut() -> bool,
    ) -> Result<(), LabError> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(10);
        loop {
            if cond() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.timeout_error(what, timeout));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    /// Removes the lab now (dropping does the same, ignoring errors).
    pub fn down(mut self) -> Result<(), LabError> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), LabError> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        let children =
            std::mem::take(&mut *self.children.lock().unwrap_or_else(|p| p.into_inner()));
        for mut c in children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let namespaces = lock_live().remove(&self.id).unwrap_or_default();
        let result = registry::remove(&self.id, &namespaces);
        // After the namespaces: their packets no longer wait for the emulator's verdicts.
        self.shaper = None;
        if std::thread::panicking() || self.keep_logs {
            if std::thread::panicking() {
                // Test output is where a failing test's reader looks first.
                eprintln!(
                    "netlab lab {}: logs kept in {}",
                    self.id,
                    self.log_dir.display()
                );
            }
        } else {
            let _ = std::fs::remove_dir_all(&self.log_dir);
        }
        result
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::error!(error = %e, "lab teardown");
        }
    }
}

fn lock_live() -> std::sync::MutexGuard<'static, BTreeMap<String, Vec<String>>> {
    LIVE.lock().unwrap_or_else(|p| p.into_inner())
}

fn read_all(pipe: Option<&mut impl Read>) -> String {
    let mut s = Vec::new();
    if let Some(p) = pipe {
        let _ = p.read_to_end(&mut s);
    }
    String::from_utf8_lossy(&s).into_owned()
}

/// The nftables ruleset of a site router, or None when it forwards everything untouched.
fn router_ruleset(nat: Nat, fw: Firewall) -> Option<String> {
    if nat == Nat::None && fw == Firewall::Open {
        return None;
    }
    // Input: a datagram from the internet to the router's own address and a port must not be
    // accepted: its conntrack entry would hold that public port for that remote, so a node's
    // later flow to the same remote would be moved to another port (a broken hole punch).
    // Real routers drop unsolicited input on the WAN; the counter tells tests it happened.
    let mut r = String::from(
        "table inet netlab {\n  chain input {\n    type filter hook input priority filter; policy accept;\n    \
         ct state established,related accept\n    iifname \"wan\" counter drop\n  }\n  \
         chain forward {\n    type filter hook forward priority filter; policy accept;\n    \
         ct state established,related accept\n    iifname \"wan\" drop\n",
    );
    match fw {
        Firewall::Open => {}
        Firewall::UdpBlocked => {
            let _ = write!(
                r,
                "    oifname \"wan\" ip daddr {RESOLVER_ADDR} udp dport 53 accept\n    \
                 oifname \"wan\" meta l4proto udp drop\n"
            );
        }
        Firewall::HttpsOnly => {
            r.push_str("    oifname \"wan\" tcp dport 443 accept\n    oifname \"wan\" drop\n");
        }
    }
    r.push_str("  }\n");
    match nat {
        Nat::None => {}
        // Linux keeps the source port when it is free, so one internal socket maps to one
        // public port whatever the destination.
        Nat::EndpointIndependent => r.push_str(
            "  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n    \
             oifname \"wan\" masquerade\n  }\n",
        ),
        // A random public port for every new (source, destination) pair.
        Nat::Symmetric => r.push_str(
            "  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n    \
             oifname \"wan\" masquerade fully-random\n  }\n",
        ),
    }
    r.push_str("}\n");
    Some(r)
}

/// A program started with [`Lab::spawn`].
pub struct Proc {
    child: Child,
    log: PathBuf,
    what: String,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The file its stdout and stderr go to.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// What it has printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its exit status if it has ended.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for it to end by itself, at most `timeout`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus, LabError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                return Err(LabError::Timeout {
                    what: format!("{} to exit", self.what),
                    secs: timeout.as_secs_f64(),
                    logs: self.log.display().to_string(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Asks it to stop (SIGTERM), then kills it if it has not ended within `grace`.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.try_wait() {
            return Some(s);
        }
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        self.wait_timeout(grace).ok().or_else(|| {
            let _ = self.child.kill();
            self.child.wait().ok()
        })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a command run with [`Lab::exec`] did.
#[derive(Debug, Clone)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    what: String,
}

impl Output {
    /// Its stdout, or an error with its stderr when it failed.
    pub fn ok(self) -> Result<String, LabError> {
        if self.status.success() {
            Ok(self.stdout)
        } else {
            Err(LabError::Command {
                command: self.what,
                status: self.status.to_string(),
                stderr: self.stderr,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_public_sites_have_no_rules_and_others_block_inbound() {
        assert_eq!(router_ruleset(Nat::None, Firewall::Open), None);
        for (nat, fw) in [
            (Nat::EndpointIndependent, Firewall::Open),
            (Nat::Symmetric, Firewall::UdpBlocked),
            (Nat::None, Firewall::HttpsOnly),
        ] {
            let r = router_ruleset(nat, fw).unwrap();
            assert!(r.contains("iifname \"wan\" drop"), "{r}");
            assert!(r.contains("iifname \"wan\" counter drop"), "{r}");
            assert_eq!(r.contains("masquerade"), nat != Nat::None);
            assert_eq!(r.contains("fully-random"), nat == Nat::Symmetric);
        }
    }
}
