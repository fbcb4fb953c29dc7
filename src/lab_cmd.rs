//! `meshd lab …`: bring labs up and down, run commands in them, show the demo.
#![allow(clippy::print_stdout)] // a CLI talks to its user on stdout

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use meshd_netlab::mesh::{expected_path, hard_pairing, Mesh, MeshSpec, PeerPath, RelaySpec};
use meshd_netlab::{registry, tools, Lab, LabOptions, Site, Topology};

#[derive(Subcommand)]
pub enum LabCmd {
    /// Build the lab described by FILE and keep it until Ctrl-C or `meshd lab down`.
    Up { file: PathBuf },
    /// Remove a running lab (the only one, or the one named by ID).
    Down { id: Option<String> },
    /// Remove every lab whose owning process is gone (running labs are left alone).
    Clean,
    /// List the labs on this machine.
    List,
    /// Run a command inside a node, host or site router of a running lab.
    Exec {
        /// Lab id (needed only when several labs run).
        #[arg(long)]
        lab: Option<String>,
        node: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Build the lab, run a mesh on it (coordinator, relay, every node joined with one
    /// token), show and check the path and RTT between every pair, tear it down.
    Demo { file: PathBuf },
    /// Benchmarks (not tests): print tables with ratios against the peers they name.
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Fidelity and speed of the emulated internet: RTT and loss against the configuration,
    /// TCP throughput of lab links and paths against a plain veth pair.
    Netlab {
        /// Runs per figure (medians are reported).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Seconds per iperf3 run.
        #[arg(long, default_value_t = 3)]
        secs: u32,
    },
    /// The data plane against its peers over one veth pair: plain veth (the ceiling),
    /// Debian's and the current wireguard-go, Tailscale (tailscaled joined to Headscale),
    /// boringtun-cli (1 thread and default), nebula and this meshd binary. Builds the current
    /// wireguard-go, Tailscale and Headscale first with scripts/install-peers if they are not.
    /// Build meshd with --release first: the meshd measured is the one running.
    Dataplane {
        /// iperf3 runs per peer and case, and RTT rounds (medians are reported).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Seconds per iperf3 run.
        #[arg(long, default_value_t = 5)]
        secs: u32,
        /// Pings for each RTT median (underlay and tunnel, in each of `runs` rounds).
        #[arg(long, default_value_t = 100)]
        pings: u32,
        /// Only these peers, comma-separated, in this order: veth, wireguard-go,
        /// wireguard-go-current, tailscale, boringtun-1, boringtun, nebula, meshd.
        #[arg(long, value_delimiter = ',')]
        peers: Vec<String>,
    },
    /// NAT traversal and relaying, meshd against the seed prototype (Headscale, derper,
    /// tailscaled) on one lab: the path of every pair of examples/federation.toml, time from
    /// the first packet to a direct path and the outage when it is cut (two endpoint-
    /// independent NATs, 20 ms uplinks), and one pair's throughput direct and relayed with the
    /// relay's CPU per GB. Builds Tailscale and Headscale first if they are not. Build meshd
    /// with --release first: the meshd measured is the one running.
    Traversal {
        /// Trials of the timing phase (fresh start of both nodes in each).
        #[arg(long, default_value_t = 20)]
        trials: usize,
        /// iperf3 runs per throughput row (medians are reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Seconds per iperf3 run.
        #[arg(long, default_value_t = 5)]
        secs: u32,
        /// Only these phases, comma-separated: paths, timing, throughput.
        #[arg(long, value_delimiter = ',')]
        phases: Vec<String>,
    },
}

pub fn run(cmd: LabCmd) -> Result<()> {
    match cmd {
        LabCmd::Up { file } => up(&file),
        LabCmd::Down { id } => down(id),
        LabCmd::Clean => {
            let removed = registry::clean()?;
            println!(
                "removed {} lab(s) left behind{}",
                removed.len(),
                fmt_ids(&removed)
            );
            Ok(())
        }
        LabCmd::List => {
            for l in registry::list() {
                let state = if l.alive {
                    "running"
                } else {
                    "left behind (meshd lab clean removes it)"
                };
                println!(
                    "{}  {} namespaces  owner pid {}  {state}",
                    l.id,
                    l.namespaces.len(),
                    l.owner_pid.map_or("?".into(), |p| p.to_string())
                );
            }
            Ok(())
        }
        LabCmd::Exec { lab, node, command } => exec(lab, &node, &command),
        LabCmd::Demo { file } => demo(&file),
        LabCmd::Bench(BenchCmd::Dataplane {
            runs,
            secs,
            pings,
            peers,
        }) => {
            let mut opts = meshd_netlab::bench_dataplane::Options {
                runs,
                secs,
                pings,
                ..Default::default()
            };
            if !peers.is_empty() {
                opts.peers = peers
                    .iter()
                    .map(|p| meshd_netlab::bench_dataplane::Peer::from_name(p))
                    .collect::<Result<_, _>>()?;
            }
            let report = meshd_netlab::bench_dataplane::run(&opts)?;
            println!("{}", report.table());
            Ok(())
        }
        LabCmd::Bench(BenchCmd::Traversal {
            trials,
            runs,
            secs,
            phases,
        }) => {
            use meshd_netlab::bench_traversal::{self as bt, Phase};
            let phases = if phases.is_empty() {
                Phase::NAMES.iter().map(|(_, p)| *p).collect()
            } else {
                phases
                    .iter()
                    .map(|p| Phase::from_name(p))
                    .collect::<Result<_, _>>()?
            };
            let opts = bt::Options {
                meshd: std::env::current_exe().context("finding the meshd binary")?,
                trials,
                runs,
                secs,
                phases,
            };
            let report = bt::run(&opts)?;
            println!("{}", report.table());
            Ok(())
        }
        LabCmd::Bench(BenchCmd::Netlab { runs, secs }) => {
            let report = meshd_netlab::bench::run(runs, secs)?;
            println!("{}", report.table());
            Ok(())
        }
    }
}

fn fmt_ids(ids: &[String]) -> String {
    if ids.is_empty() {
        String::new()
    } else {
        format!(": {}", ids.join(" "))
    }
}

fn load(file: &Path) -> Result<Topology> {
    Ok(Topology::from_file(file)?)
}

fn up(file: &Path) -> Result<()> {
    let topo = load(file)?;
    let lab = Lab::up_with(
        &topo,
        LabOptions {
            keep_logs: true,
            ..Default::default()
        },
    )?;
    println!("lab {} is up ({})", lab.id(), file.display());
    print_members(&lab);
    println!("\nlogs: {}", lab.log_dir().display());
    println!(
        "explore: meshd lab exec {} -- ping -c 3 {}",
        first(&lab),
        tools_target(&lab)
    );
    println!("stop:    Ctrl-C here, or meshd lab down {}", lab.id());
    // The lab's signal handler removes it on SIGINT/SIGTERM/SIGHUP and exits.
    loop {
        std::thread::park();
    }
}

fn first(lab: &Lab) -> String {
    lab.endpoints()
        .first()
        .map(|s| s.to_string())
        .unwrap_or_default()
}

fn tools_target(lab: &Lab) -> String {
    lab.endpoints()
        .last()
        .and_then(|n| lab.addr(n).ok())
        .map(|a| a.to_string())
        .unwrap_or_default()
}

fn print_members(lab: &Lab) {
    for name in lab.endpoints() {
        let addr = lab.addr(name).map(|a| a.to_string()).unwrap_or_default();
        println!(
            "  {name:<12} {addr:<16} netns {}",
            lab.ns(name).unwrap_or("?")
        );
    }
}

fn pick(id: Option<String>) -> Result<registry::LabInfo> {
    let labs = registry::list();
    match id {
        Some(id) => labs
            .into_iter()
            .find(|l| l.id == id)
            .ok_or_else(|| anyhow!("no lab {id}; `meshd lab list` shows the labs")),
        None => {
            let mut running: Vec<_> = labs.into_iter().filter(|l| l.alive).collect();
            match running.len() {
                0 => bail!("no lab is running; start one with `meshd lab up FILE`"),
                1 => Ok(running.remove(0)),
                _ => bail!(
                    "several labs run ({}); name one with its id",
                    running
                        .iter()
                        .map(|l| l.id.as_str())
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
            }
        }
    }
}

fn down(id: Option<String>) -> Result<()> {
    let lab = pick(id)?;
    if lab.alive {
        if let Some(pid) = lab.owner_pid.and_then(rustix_pid) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        for _ in 0..100 {
            if !registry::list()
                .iter()
                .any(|l| l.id == lab.id && !l.namespaces.is_empty())
            {
                println!("lab {} removed", lab.id);
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("lab {} did not go away within 10 s of SIGTERM to its owner; `meshd lab clean` after killing it", lab.id);
    }
    registry::remove(&lab.id, &lab.namespaces)?;
    println!("lab {} removed", lab.id);
    Ok(())
}

fn rustix_pid(p: u32) -> Option<rustix::process::Pid> {
    rustix::process::Pid::from_raw(i32::try_from(p).ok()?)
}

fn exec(lab: Option<String>, node: &str, command: &[String]) -> Result<()> {
    let lab = pick(lab)?;
    let ns = registry::ns_name(&lab.id, node);
    if !lab.namespaces.contains(&ns) {
        let names: Vec<&str> = lab
            .namespaces
            .iter()
            .filter_map(|n| registry::parse_ns_name(n).map(|(_, n)| n))
            .collect();
        bail!(
            "lab {} has no node {node:?}; it has: {}",
            lab.id,
            names.join(", ")
        );
    }
    let status = std::process::Command::new("ip")
        .args(["netns", "exec", &ns])
        .args(command)
        .status()
        .context("running ip netns exec")?;
    std::process::exit(status.code().unwrap_or(1));
}

/// `meshd lab demo`: the federation with a whole mesh on it. Every pair of
/// nodes must reach each other by the path its NATs and firewalls allow.
fn demo(file: &Path) -> Result<()> {
    let topo = load(file)?;
    let coordinator = topo
        .hosts
        .iter()
        .find(|h| h.name.starts_with("coord"))
        .map(|h| h.name.clone())
        .ok_or_else(|| anyhow!("the demo needs a [[host]] named coord… for the coordinator"))?;
    let relays: Vec<RelaySpec> = topo
        .hosts
        .iter()
        .filter(|h| h.name.starts_with("relay"))
        .map(|h| RelaySpec {
            host: h.name.clone(),
            region: h.name.clone(),
        })
        .collect();
    if relays.is_empty() {
        bail!("the demo needs a [[host]] named relay… for the relay");
    }
    let nodes: Vec<(String, &Site)> = topo
        .sites
        .iter()
        .flat_map(|s| s.nodes.iter().map(move |n| (n.clone(), s)))
        .collect();
    let started = Instant::now();
    let lab = Lab::up(&topo)?;
    println!(
        "lab {} is up ({}): {} public hosts, {} sites",
        lab.id(),
        file.display(),
        topo.hosts.len(),
        topo.sites.len()
    );
    let spec = MeshSpec {
        meshd: std::env::current_exe().context("finding the meshd binary")?,
        coordinator: coordinator.clone(),
        relays: relays.clone(),
        nodes: nodes.iter().map(|(n, _)| n.clone()).collect(),
        log: "warn".into(),
        up_args: Vec::new(),
    };
    let mesh = Mesh::up(&lab, spec)?;
    println!(
        "mesh up in {:.1} s: coordinator on {coordinator}, relay{} on {}, {} nodes joined with one token",
        started.elapsed().as_secs_f64(),
        if relays.len() > 1 { "s" } else { "" },
        relays.iter().map(|r| r.host.as_str()).collect::<Vec<_>>().join(", "),
        nodes.len()
    );
    println!(
        "\n{:<8} {:<8} {:<22} {:<12}",
        "node", "site", "nat", "firewall"
    );
    for (n, site) in &nodes {
        println!(
            "{n:<8} {:<8} {:<22} {:<12}",
            site.name,
            format!("{:?}", site.nat),
            format!("{:?}", site.firewall)
        );
    }
    // Each pair: wait for the path its sites allow, then measure it.
    let mut wrong = Vec::new();
    let mut cells = std::collections::BTreeMap::new();
    for (a, sa) in &nodes {
        for (b, sb) in &nodes {
            if a == b {
                continue;
            }
            let want = expected_path(sa, sb);
            let kind = want.trim_end_matches("-tls");
            // The birthday technique usually finds a direct path where
            // only the relay is sure: that is fine too.
            let ok = |p: &PeerPath| p.kind == kind || (p.kind == "direct" && hard_pairing(sa, sb));
            let _ = lab.wait_until(
                &format!("{a} → {b} {want}"),
                Duration::from_secs(15),
                || mesh.path(a, b).is_ok_and(|p| ok(&p)),
            );
            let rtts = mesh.ping(a, b, 5)?;
            let path = mesh.path(a, b)?;
            let rtt = tools::median(&rtts);
            let cell = match rtt {
                Some(ms) => format!("{} {ms:.0} ms", short_kind(&path.kind)),
                None => "unreachable".to_owned(),
            };
            if rtt.is_none() || !ok(&path) {
                wrong.push(format!(
                    "{a} → {b}: {} ({}), expected {want}",
                    cell,
                    if path.via.is_empty() { "-" } else { &path.via }
                ));
            }
            cells.insert((a.clone(), b.clone()), cell);
        }
    }
    println!("\npaths and RTTs (row → column; d = direct, r = relayed):");
    print!("{:<8}", "");
    for (b, _) in &nodes {
        print!(" {b:>11}");
    }
    println!();
    for (a, _) in &nodes {
        print!("{a:<8}");
        for (b, _) in &nodes {
            let cell = cells
                .get(&(a.clone(), b.clone()))
                .map_or("-", String::as_str);
            print!(" {cell:>11}");
        }
        println!();
    }
    drop(mesh);
    lab.down()?;
    println!(
        "\nlab removed after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if !wrong.is_empty() {
        bail!(
            "{} pair(s) did not behave as expected:\n  {}",
            wrong.len(),
            wrong.join("\n  ")
        );
    }
    println!("every pair reached each other by the expected path");
    Ok(())
}

fn short_kind(kind: &str) -> &str {
    match kind {
        "direct" => "d",
        "relay" => "r",
        other => other,
    }
}
