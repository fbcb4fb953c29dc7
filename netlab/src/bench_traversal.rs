//! `meshd lab bench traversal`: issue 16's figures for meshd and the seed prototype (Headscale,
//! derper and `tailscaled`, [`SeedPrototype`]) side by side, on one lab: the federation of
//! `examples/federation.toml` plus two pairs of sites of its own. Not a pass/fail test.
//!
//! - **Paths**: every ordered pair of the federation's nodes, the path each system settles on
//!   (meshd: `meshd status --json`; Tailscale: `tailscale status --json` after a
//!   `tailscale ping`, which is lazy until traffic flows).
//! - **Timing**: two nodes behind endpoint-independent NATs with 20 ms on each uplink
//!   (`left`/`l1`, `right`/`r1`). Each trial stops both daemons, flushes both routers'
//!   conntrack (so no mapping of the last trial helps), starts them and waits until each sees
//!   the other; then pings every 10 ms and polls the sender's status until it reports a direct
//!   path (time from the first ping). Then, with the direct path up and pings flowing,
//!   [`Lab::block_udp`] cuts UDP between the two routers: the outage is the longest gap in the
//!   ping replies.
//! - **Throughput**: single-stream iperf3 between `ta1` and `tb1` (endpoint-independent NATs,
//!   no emulated latency, so the emulator is not the limit), direct and relayed, with the relay
//!   process's CPU seconds per GB received (/proc/PID/stat).
//!
//! meshd is the binary given in [`Options::meshd`]: measure a release build.
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::bench_dataplane::{load_average, parse_process_ticks};
use crate::mesh::{expected_path, Mesh, MeshSpec, RelaySpec};
use crate::peers::tailscale::{PathKind, SeedOptions, SeedPrototype};
use crate::tools::{median, Iperf3Server, Iperf3Test};
use crate::{sys, Lab, LabError, Nat, Proc, Site, Topology};

const FEDERATION: &str = include_str!("../../examples/federation.toml");
const COORD: &str = "coord";
const RELAY: &str = "relay";
/// The timing pair: sites and nodes.
const LEFT: (&str, &str) = ("left", "l1");
const RIGHT: (&str, &str) = ("right", "r1");
/// The throughput pair.
const TP_A: (&str, &str) = ("tpa", "ta1");
const TP_B: (&str, &str) = ("tpb", "tb1");
/// The timing pair's uplinks each add this to a round trip.
const UPLINK_MS: u32 = 20;
/// Pings during the timing trials: one every 10 ms.
const PING_INTERVAL: Duration = Duration::from_millis(10);
/// How long a step (a node coming up, a path appearing) may take before the trial counts as failed.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Which parts to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Paths,
    Timing,
    Throughput,
}

impl Phase {
    pub const NAMES: [(&'static str, Phase); 3] = [
        ("paths", Phase::Paths),
        ("timing", Phase::Timing),
        ("throughput", Phase::Throughput),
    ];

    pub fn from_name(name: &str) -> Result<Phase, LabError> {
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, p)| *p)
            .ok_or_else(|| {
                LabError::Lab(format!(
                    "no phase {name:?}; known: paths, timing, throughput"
                ))
            })
    }
}

/// What to measure and how often.
#[derive(Debug, Clone)]
pub struct Options {
    /// The meshd binary to run in the lab.
    pub meshd: PathBuf,
    /// Trials of the timing phase (fresh start of both nodes each).
    pub trials: usize,
    /// iperf3 runs per throughput row (medians are reported).
    pub runs: usize,
    pub secs: u32,
    pub phases: Vec<Phase>,
}

/// The two systems compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    Meshd,
    Tailscale,
}

impl System {
    fn label(self) -> &'static str {
        match self {
            System::Meshd => "meshd",
            System::Tailscale => "Tailscale (seed)",
        }
    }
}

/// One ordered pair of the federation.
#[derive(Debug, Clone)]
pub struct PathRow {
    pub from: String,
    pub to: String,
    /// What the NATs and firewalls allow ([`expected_path`]).
    pub expected: &'static str,
    pub meshd: String,
    pub tailscale: String,
}

/// One system's timing trials.
#[derive(Debug, Clone, Default)]
pub struct Timing {
    /// Seconds from the first ping to a direct path; None when no direct path came in time.
    pub to_direct: Vec<Option<f64>>,
    /// Seconds from starting the two daemons (after they were stopped) to a direct path: the
    /// join and the peer map included.
    pub start_to_direct: Vec<Option<f64>>,
    /// Seconds without ping replies after the direct path was cut; None when they never resumed.
    pub outage: Vec<Option<f64>>,
    /// Seconds from the cut until the status stopped reporting the direct path.
    pub reported: Vec<Option<f64>>,
}

/// One throughput row.
#[derive(Debug, Clone)]
pub struct Throughput {
    pub label: String,
    pub system: System,
    pub relayed: bool,
    /// Median received bits per second.
    pub bps: f64,
    /// Median CPU seconds of the relay process per GB received; None for a direct path.
    pub relay_cpu_s_per_gb: Option<f64>,
    pub samples: Vec<f64>,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub trials: usize,
    pub runs: usize,
    pub secs: u32,
    pub paths: Vec<PathRow>,
    pub timing: Vec<(System, Timing)>,
    pub throughput: Vec<Throughput>,
    pub load_before: f64,
    pub load_after: f64,
}

fn topology() -> Result<Topology, LabError> {
    let eim = |(site, node): (&str, &str)| Site::new(site, [node]).nat(Nat::EndpointIndependent);
    Ok(Topology::from_toml(FEDERATION)?
        .site(eim(LEFT).latency_ms(UPLINK_MS))
        .site(eim(RIGHT).latency_ms(UPLINK_MS))
        .site(eim(TP_A))
        .site(eim(TP_B)))
}

fn federation_nodes() -> Result<Vec<(String, Site)>, LabError> {
    Ok(Topology::from_toml(FEDERATION)?
        .sites
        .iter()
        .flat_map(|s| s.nodes.iter().map(move |n| (n.clone(), s.clone())))
        .collect())
}

pub fn run(opts: &Options) -> Result<Report, LabError> {
    sys::require_tool("iperf3", "iperf3")?;
    sys::require_tool("ping", "iputils-ping")?;
    sys::require_tool("conntrack", "conntrack")?;
    crate::peers::install_peers(&["tailscale", "headscale"])?;
    let mut report = Report {
        trials: opts.trials.max(1),
        runs: opts.runs.max(1),
        secs: opts.secs.max(1),
        load_before: load_average()?,
        ..Default::default()
    };
    let lab = Lab::up(&topology()?)?;
    if opts.phases.contains(&Phase::Paths) {
        report.paths = paths(&lab, opts)?;
    }
    if opts.phases.contains(&Phase::Timing) {
        report
            .timing
            .push((System::Meshd, timing_meshd(&lab, opts, report.trials)?));
        report
            .timing
            .push((System::Tailscale, timing_tailscale(&lab, report.trials)?));
    }
    if opts.phases.contains(&Phase::Throughput) {
        report.throughput = throughput(&lab, opts, report.runs, report.secs)?;
    }
    drop(lab);
    report.load_after = load_average()?;
    Ok(report)
}

fn mesh_spec(opts: &Options, nodes: &[&str], up_args: &[&str]) -> MeshSpec {
    MeshSpec {
        meshd: opts.meshd.clone(),
        coordinator: COORD.into(),
        relays: vec![RelaySpec {
            host: RELAY.into(),
            region: RELAY.into(),
        }],
        nodes: nodes.iter().map(|n| (*n).to_owned()).collect(),
        log: "warn".into(),
        up_args: up_args.iter().map(|a| (*a).to_owned()).collect(),
    }
}

fn tailscale_path(kind: &PathKind) -> String {
    match kind {
        PathKind::Direct(_) => "direct".into(),
        PathKind::Derp(_) => "DERP".into(),
        PathKind::PeerRelay(_) => "peer relay".into(),
        PathKind::None => "none".into(),
    }
}

/// Phase 1: the path of every ordered pair of the federation, meshd then Tailscale.
fn paths(lab: &Lab, opts: &Options) -> Result<Vec<PathRow>, LabError> {
    let nodes = federation_nodes()?;
    let names: Vec<&str> = nodes.iter().map(|(n, _)| n.as_str()).collect();
    let mut rows = Vec::new();
    {
        let mesh = Mesh::up(lab, mesh_spec(opts, &names, &[]))?;
        for (a, sa) in &nodes {
            for (b, sb) in &nodes {
                if a == b {
                    continue;
                }
                let expected = expected_path(sa, sb);
                let kind = expected.trim_end_matches("-tls");
                // The path it settles on, given the time the demo gives it; a pair that stays
                // on another path is reported as it is.
                let _ = lab.wait_until(&format!("{a} → {b}"), Duration::from_secs(15), || {
                    mesh.path(a, b).is_ok_and(|p| p.kind == kind)
                });
                let answered = mesh.ping(a, b, 3)?.len();
                let p = mesh.path(a, b)?;
                let mut cell = p.kind.clone();
                if answered == 0 {
                    cell.push_str(" (no ping answered)");
                }
                rows.push(PathRow {
                    from: a.clone(),
                    to: b.clone(),
                    expected,
                    meshd: cell,
                    tailscale: String::new(),
                });
            }
        }
    }
    let seed = SeedPrototype::up(lab, COORD, RELAY, &names)?;
    for row in &mut rows {
        let target = seed.addr(&row.to)?.to_string();
        // Stops at the first direct pong; five pings a second apart otherwise.
        let out = seed.tailscale(
            &row.from,
            &["ping", "--c", "5", "--timeout", "2s", &target],
            Duration::from_secs(30),
        )?;
        let mut cell = tailscale_path(&seed.path(&row.from, &row.to)?);
        if !out.status.success() && !out.stdout.contains("pong") {
            cell.push_str(" (no ping answered)");
        }
        row.tailscale = cell;
    }
    Ok(rows)
}

/// Flushes the conntrack tables of the timing pair's routers: no mapping of the last trial
/// opens the way for the next.
fn flush_conntrack(lab: &Lab) -> Result<(), LabError> {
    for site in [LEFT.0, RIGHT.0] {
        lab.exec(site, &["conntrack", "-F"])?;
    }
    Ok(())
}

/// Polls `cond` as fast as it answers until it holds; the time it took, or None after `timeout`.
fn time_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> Option<f64> {
    let start = Instant::now();
    loop {
        if cond() {
            return Some(start.elapsed().as_secs_f64());
        }
        if start.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `ping` every [`PING_INTERVAL`] in the background.
struct Pinger {
    proc: Proc,
}

impl Pinger {
    fn start(lab: &Lab, from: &str, to: Ipv4Addr, label: &str) -> Result<Pinger, LabError> {
        let (interval, target) = (
            format!("{:.3}", PING_INTERVAL.as_secs_f64()),
            to.to_string(),
        );
        let proc = lab.spawn(
            from,
            label,
            &["ping", "-n", "-i", &interval, "-W", "1", &target],
        )?;
        Ok(Pinger { proc })
    }

    /// Stops it (SIGINT, so it prints its summary) and returns the longest time without a
    /// reply, from the sequence numbers answered: None if replies had stopped at the end.
    fn stop_longest_gap(mut self) -> Option<f64> {
        if let Some(pid) = rustix::process::Pid::from_raw(self.proc.pid() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
        }
        let _ = self.proc.wait_timeout(Duration::from_secs(5));
        longest_gap(&self.proc.log(), PING_INTERVAL.as_secs_f64())
    }
}

/// The longest gap in a `ping` log's answered sequence numbers, in seconds: a gap of g numbers
/// between two replies is g × `interval` without one. None if the last quarter second of pings
/// went unanswered (the path never came back) or nothing was answered.
fn longest_gap(log: &str, interval: f64) -> Option<f64> {
    let seqs: Vec<u64> = log
        .lines()
        .filter_map(|l| l.split("icmp_seq=").nth(1))
        .filter_map(|s| s.split_whitespace().next()?.parse().ok())
        .collect();
    let sent: u64 = log
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())?;
    let last = *seqs.iter().max()?;
    // Replies in flight when it was stopped are not lost: allow a quarter second of them.
    if sent.saturating_sub(last) as f64 * interval > 0.25 {
        return None;
    }
    let mut sorted = seqs;
    sorted.sort_unstable();
    let gap = sorted.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(1);
    Some(gap as f64 * interval)
}

/// One system's view of the timing pair, as the trials need it.
trait Pair {
    /// Stops both daemons and flushes both routers' conntrack tables.
    fn stop(&mut self, lab: &Lab) -> Result<(), LabError>;
    fn start(&mut self) -> Result<(), LabError>;
    fn ready(&self) -> bool;
    fn is_direct(&self) -> bool;
    fn target(&self) -> Result<Ipv4Addr, LabError>;
}

struct MeshdPair<'l>(Mesh<'l>);

impl Pair for MeshdPair<'_> {
    fn stop(&mut self, lab: &Lab) -> Result<(), LabError> {
        self.0.stop_node(LEFT.1);
        self.0.stop_node(RIGHT.1);
        flush_conntrack(lab)
    }
    fn start(&mut self) -> Result<(), LabError> {
        self.0.start_node(LEFT.1)?;
        self.0.start_node(RIGHT.1)
    }
    fn ready(&self) -> bool {
        let up = |a, b| self.0.path(a, b).is_ok_and(|p| p.kind != "none");
        up(LEFT.1, RIGHT.1) && up(RIGHT.1, LEFT.1)
    }
    fn is_direct(&self) -> bool {
        self.0
            .path(LEFT.1, RIGHT.1)
            .is_ok_and(|p| p.kind == "direct")
    }
    fn target(&self) -> Result<Ipv4Addr, LabError> {
        self.0.mesh_ip(RIGHT.1)
    }
}

struct SeedPair<'l>(SeedPrototype<'l>);

impl Pair for SeedPair<'_> {
    fn stop(&mut self, lab: &Lab) -> Result<(), LabError> {
        self.0.stop(LEFT.1);
        self.0.stop(RIGHT.1);
        flush_conntrack(lab)
    }
    fn start(&mut self) -> Result<(), LabError> {
        self.0.start(LEFT.1)?;
        self.0.start(RIGHT.1)
    }
    fn ready(&self) -> bool {
        let online = |a: &str, b: &str| {
            self.0.status(a).is_ok_and(|s| {
                s.peer
                    .as_ref()
                    .is_some_and(|m| m.values().any(|p| p.host_name == b && p.online))
            })
        };
        online(LEFT.1, RIGHT.1) && online(RIGHT.1, LEFT.1)
    }
    fn is_direct(&self) -> bool {
        self.0
            .path(LEFT.1, RIGHT.1)
            .is_ok_and(|p| matches!(p, PathKind::Direct(_)))
    }
    fn target(&self) -> Result<Ipv4Addr, LabError> {
        self.0.addr(RIGHT.1)
    }
}

fn timing_meshd(lab: &Lab, opts: &Options, trials: usize) -> Result<Timing, LabError> {
    let mesh = Mesh::up(lab, mesh_spec(opts, &[LEFT.1, RIGHT.1], &[]))?;
    trials_of(lab, &mut MeshdPair(mesh), System::Meshd, trials)
}

fn timing_tailscale(lab: &Lab, trials: usize) -> Result<Timing, LabError> {
    let seed = SeedPrototype::up(lab, COORD, RELAY, &[LEFT.1, RIGHT.1])?;
    trials_of(lab, &mut SeedPair(seed), System::Tailscale, trials)
}

fn trials_of(
    lab: &Lab,
    pair: &mut dyn Pair,
    system: System,
    trials: usize,
) -> Result<Timing, LabError> {
    let right = lab.addr(RIGHT.0)?;
    let mut t = Timing::default();
    for trial in 0..trials {
        pair.stop(lab)?;
        let started = Instant::now();
        pair.start()?;
        lab.wait_until(
            &format!("{} and {} to see each other", LEFT.1, RIGHT.1),
            STEP_TIMEOUT,
            || pair.ready(),
        )?;
        let target = pair.target()?;
        let pinger = Pinger::start(lab, LEFT.1, target, "ping-direct")?;
        let to_direct = time_until(STEP_TIMEOUT, || pair.is_direct());
        drop(pinger);
        t.to_direct.push(to_direct);
        t.start_to_direct
            .push(to_direct.map(|_| started.elapsed().as_secs_f64()));
        if to_direct.is_none() {
            tracing::warn!(system = system.label(), trial, "no direct path");
            continue;
        }
        // Cut the direct path while pings flow on it.
        let pinger = Pinger::start(lab, LEFT.1, target, "ping-cut")?;
        std::thread::sleep(Duration::from_secs(1));
        lab.block_udp(LEFT.0, right)?;
        let reported = time_until(Duration::from_secs(15), || !pair.is_direct());
        std::thread::sleep(Duration::from_secs(2));
        let outage = pinger.stop_longest_gap();
        lab.unblock_udp(LEFT.0)?;
        tracing::info!(
            system = system.label(),
            trial,
            to_direct,
            start_to_direct = t.start_to_direct.last().copied().flatten(),
            outage,
            reported,
            "trial"
        );
        t.outage.push(outage);
        t.reported.push(reported);
    }
    Ok(t)
}

/// CPU ticks of one process.
fn ticks(pid: u32) -> Result<u64, LabError> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).map_err(|source| LabError::Io {
        what: format!("reading {path} (did the relay exit?)"),
        source,
    })?;
    parse_process_ticks(&text).ok_or_else(|| LabError::Lab(format!("could not parse {path}")))
}

/// `runs` iperf3 runs from `ta1` to `target` (in `tb1`), with the relay's CPU if `relay_pid`.
fn iperf_rows(
    lab: &Lab,
    target: Ipv4Addr,
    relay_pid: Option<u32>,
    runs: usize,
    secs: u32,
) -> Result<(Vec<f64>, Vec<f64>), LabError> {
    let hz = rustix::param::clock_ticks_per_second() as f64;
    let server = Iperf3Server::start(lab, TP_B.1)?;
    let (mut bps, mut cpu) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let before = relay_pid.map(ticks).transpose()?;
        let r = server.run(
            TP_A.1,
            target,
            Iperf3Test {
                secs,
                streams: 1,
                reverse: false,
            },
        )?;
        let after = relay_pid.map(ticks).transpose()?;
        bps.push(r.bits_per_second);
        if let (Some(b), Some(a)) = (before, after) {
            cpu.push(a.saturating_sub(b) as f64 / hz / (r.bytes as f64 / 1e9));
        }
    }
    Ok((bps, cpu))
}

/// Phase 3: one pair, direct and relayed, meshd then Tailscale.
fn throughput(
    lab: &Lab,
    opts: &Options,
    runs: usize,
    secs: u32,
) -> Result<Vec<Throughput>, LabError> {
    let pair = [TP_A.1, TP_B.1];
    let mut rows = Vec::new();
    let mut push = |label: &str, system, (bps, cpu): (Vec<f64>, Vec<f64>)| {
        let relayed = !cpu.is_empty();
        tracing::info!(row = label, gbit_s = ?bps.iter().map(|b| b / 1e9).collect::<Vec<_>>(), "throughput");
        rows.push(Throughput {
            label: label.to_owned(),
            system,
            relayed,
            bps: median(&bps).unwrap_or(f64::NAN),
            relay_cpu_s_per_gb: median(&cpu),
            samples: bps,
        });
    };
    for (label, args, want) in [
        ("meshd, direct", &[][..], "direct"),
        (
            "meshd relay, TLS/TCP (--no-direct)",
            &["--no-direct", "--relay-transport", "tls"][..],
            "relay",
        ),
        (
            "meshd relay, QUIC (--no-direct)",
            &["--no-direct", "--relay-transport", "quic"][..],
            "relay",
        ),
    ] {
        let mesh = Mesh::up(lab, mesh_spec(opts, &pair, args))?;
        mesh.wait_path(TP_A.1, TP_B.1, want, STEP_TIMEOUT)?;
        mesh.wait_path(TP_B.1, TP_A.1, want, STEP_TIMEOUT)?;
        let relay = (want == "relay")
            .then(|| mesh.relay_pid(RELAY))
            .transpose()?;
        push(
            label,
            System::Meshd,
            iperf_rows(lab, mesh.mesh_ip(TP_B.1)?, relay, runs, secs)?,
        );
    }
    for (label, env) in [
        ("Tailscale, direct", None),
        (
            "derper (TS_DEBUG_ALWAYS_USE_DERP=1)",
            Some("TS_DEBUG_ALWAYS_USE_DERP=1"),
        ),
    ] {
        let seed_opts = SeedOptions {
            env: env.iter().map(|e| (*e).to_owned()).collect(),
            ..Default::default()
        };
        let seed = SeedPrototype::up_with(lab, COORD, RELAY, &pair, &seed_opts)?;
        let target = seed.addr(TP_B.1)?;
        let target_s = target.to_string();
        // Traffic first: Tailscale sets a path up only once packets flow.
        let want_direct = env.is_none();
        lab.wait_until("the Tailscale pair's path", STEP_TIMEOUT, || {
            let _ = seed.tailscale(
                TP_A.1,
                &["ping", "--c", "2", "--timeout", "1s", &target_s],
                Duration::from_secs(10),
            );
            seed.path(TP_A.1, TP_B.1).is_ok_and(|p| match p {
                PathKind::Direct(_) => want_direct,
                PathKind::Derp(_) => !want_direct,
                _ => false,
            })
        })?;
        let derper = (!want_direct).then(|| seed.derper_pid());
        push(
            label,
            System::Tailscale,
            iperf_rows(lab, target, derper, runs, secs)?,
        );
    }
    Ok(rows)
}

/// The `q` quantile (nearest rank) of the values that are there.
fn quantile(values: &[Option<f64>], q: f64) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().flatten().copied().collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v.get(rank - 1).copied()
}

fn secs_cell(v: Option<f64>) -> String {
    v.map_or("–".into(), |s| format!("{s:.2} s"))
}

impl Report {
    /// Markdown tables.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "load average {:.2} before, {:.2} after\n",
            self.load_before, self.load_after
        );
        if !self.paths.is_empty() {
            let _ = writeln!(
                t,
                "Paths on examples/federation.toml (row: from → to)\n\n\
                 | from → to | the NATs allow | meshd | Tailscale (seed) |\n|---|---|---|---|"
            );
            for r in &self.paths {
                let _ = writeln!(
                    t,
                    "| {} → {} | {} | {} | {} |",
                    r.from, r.to, r.expected, r.meshd, r.tailscale
                );
            }
            let same = self
                .paths
                .iter()
                .filter(|r| {
                    let norm = |s: &str| {
                        if s == "DERP" {
                            "relay".to_owned()
                        } else {
                            s.to_owned()
                        }
                    };
                    norm(&r.meshd) == norm(&r.tailscale)
                })
                .count();
            let _ = writeln!(
                t,
                "\nsame kind of path (relay = DERP) on {same} of {} pairs\n",
                self.paths.len()
            );
        }
        if !self.timing.is_empty() {
            let _ = writeln!(
                t,
                "Timing: two endpoint-independent NATs, {UPLINK_MS} ms on each uplink, {} trials \
                 (fresh start of both daemons, conntrack flushed)\n\n\
                 | system | direct reached | first ping → direct p50 / p90 | × target 1 s (p50) | \
                 daemons started → direct p50 / p90 | \
                 direct cut: reply gap p50 / p90 | × target 3 s (p50) | status left direct p50 |\n\
                 |---|---|---|---|---|---|---|---|",
                self.trials
            );
            for (system, tm) in &self.timing {
                let reached = tm.to_direct.iter().flatten().count();
                let recovered = tm.outage.iter().flatten().count();
                let (d50, d90) = (quantile(&tm.to_direct, 0.5), quantile(&tm.to_direct, 0.9));
                let (o50, o90) = (quantile(&tm.outage, 0.5), quantile(&tm.outage, 0.9));
                let _ = writeln!(
                    t,
                    "| {} | {reached}/{} | {} / {} | {} | {} / {} | {} / {} ({recovered}/{} recovered) | {} | {} |",
                    system.label(),
                    tm.to_direct.len(),
                    secs_cell(d50),
                    secs_cell(d90),
                    d50.map_or("–".into(), |d| format!("{d:.2}")),
                    secs_cell(quantile(&tm.start_to_direct, 0.5)),
                    secs_cell(quantile(&tm.start_to_direct, 0.9)),
                    secs_cell(o50),
                    secs_cell(o90),
                    tm.outage.len(),
                    o50.map_or("–".into(), |o| format!("{:.2}", o / 3.0)),
                    secs_cell(quantile(&tm.reported, 0.5)),
                );
            }
            if let [(_, m), (_, s)] = &self.timing[..] {
                let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                    (Some(a), Some(b)) if b > 0.0 => format!("{:.3}", a / b),
                    _ => "–".into(),
                };
                let _ =
                    writeln!(
                    t,
                    "\nmeshd ÷ Tailscale: first ping → direct p50 {}, p90 {}; daemons started → \
                     direct p50 {}, p90 {}; reply gap p50 {}, p90 {}\n",
                    ratio(quantile(&m.to_direct, 0.5), quantile(&s.to_direct, 0.5)),
                    ratio(quantile(&m.to_direct, 0.9), quantile(&s.to_direct, 0.9)),
                    ratio(quantile(&m.start_to_direct, 0.5), quantile(&s.start_to_direct, 0.5)),
                    ratio(quantile(&m.start_to_direct, 0.9), quantile(&s.start_to_direct, 0.9)),
                    ratio(quantile(&m.outage, 0.5), quantile(&s.outage, 0.5)),
                    ratio(quantile(&m.outage, 0.9), quantile(&s.outage, 0.9)),
                );
            }
        }
        if !self.throughput.is_empty() {
            let direct = self
                .throughput
                .iter()
                .find(|r| r.system == System::Meshd && !r.relayed)
                .map(|r| r.bps);
            let derper = self
                .throughput
                .iter()
                .find(|r| r.system == System::Tailscale && r.relayed)
                .map(|r| r.bps);
            let _ = writeln!(
                t,
                "Throughput: one pair (endpoint-independent NATs, no emulated latency), \
                 single-stream iperf3, median of {} runs of {} s\n\n\
                 | path | Gbit/s | × meshd direct | × derper | relay CPU s per GB |\n\
                 |---|---:|---:|---:|---:|",
                self.runs, self.secs
            );
            for r in &self.throughput {
                let ratio =
                    |b: Option<f64>| b.map_or("–".into(), |b| format!("{:.2}", r.bps / b));
                let _ = writeln!(
                    t,
                    "| {} | {:.2} | {} | {} | {} |",
                    r.label,
                    r.bps / 1e9,
                    ratio(direct),
                    ratio(derper),
                    r.relay_cpu_s_per_gb
                        .map_or("–".into(), |c| format!("{c:.2}")),
                );
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_take_the_nearest_rank_of_what_is_there() {
        let v: Vec<Option<f64>> = (1..=20).map(|i| Some(f64::from(i))).collect();
        assert_eq!(quantile(&v, 0.5), Some(10.0));
        assert_eq!(quantile(&v, 0.9), Some(18.0));
        assert_eq!(quantile(&[None, Some(2.0)], 0.9), Some(2.0));
        assert_eq!(quantile(&[None], 0.5), None);
    }

    #[test]
    fn the_longest_ping_gap_is_found_and_a_dead_end_is_none() {
        let log = "64 bytes from 100.64.0.2: icmp_seq=1 ttl=64 time=40 ms\n\
                   64 bytes from 100.64.0.2: icmp_seq=2 ttl=64 time=40 ms\n\
                   64 bytes from 100.64.0.2: icmp_seq=152 ttl=64 time=45 ms\n\
                   64 bytes from 100.64.0.2: icmp_seq=153 ttl=64 time=45 ms\n\
                   --- 100.64.0.2 ping statistics ---\n\
                   160 packets transmitted, 4 received, 97.5% packet loss, time 1600ms\n";
        let gap = longest_gap(log, 0.01).unwrap();
        assert!((gap - 1.5).abs() < 1e-9, "{gap}");
        let dead = log.replace("160 packets", "400 packets");
        assert_eq!(longest_gap(&dead, 0.01), None);
    }

    #[test]
    fn the_topology_is_the_federation_and_its_own_sites() {
        let t = topology().unwrap();
        t.validate().unwrap();
        assert!(t.hosts.iter().any(|h| h.name == RELAY));
        assert!(t
            .sites
            .iter()
            .any(|s| s.name == LEFT.0 && s.link.latency_ms == UPLINK_MS));
        assert_eq!(federation_nodes().unwrap().len(), 5);
    }
}
