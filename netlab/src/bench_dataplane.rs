//! `meshd lab bench dataplane`: TCP through each userspace tunnel on this machine, against a
//! plain veth pair (the ceiling), as issue 4 asks: throughput for 1 and 4 streams in both
//! directions (median of `runs`), CPU per Gbit, added ping RTT and UDP receive-buffer drops.
//! Not a pass/fail test. The peers include the current wireguard-go and Tailscale (issue 15),
//! built from the Go module proxy by `scripts/install-peers`, which the benchmark runs first.
//!
//! The underlay is one [`Lab::veth_pair`]: a single hop with nothing else on the path, so the
//! only difference between the "veth" row and a tunnel's row is the tunnel. A routed lab would
//! add the core namespace's forwarding, which competes for the same two cores as the daemons.
//! Every peer runs in the same lab, one after the other.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::Duration;

use crate::peers::{Impl, TunnelOptions, TunnelPair, RIGHT_ADDR};
use crate::tools::median;
use crate::tools::{self, Iperf3Server, Iperf3Test};
use crate::{sys, Lab, LabError};

const LEFT: &str = "left";
const RIGHT: &str = "right";

/// Back-to-back pings per round, as a multiple of the paced ones: they take ≈ 0.1 ms each.
const B2B_PING_FACTOR: u32 = 10;

/// What carries the traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// No tunnel: TCP straight over the underlay, the ceiling.
    Veth,
    /// A tunnel of this implementation at both ends.
    Tunnel(Impl),
}

impl Peer {
    /// The names `meshd lab bench dataplane --peers` takes, with what each means.
    pub const NAMES: [(&'static str, Peer); 8] = [
        ("veth", Peer::Veth),
        ("wireguard-go", Peer::Tunnel(Impl::WireguardGo)),
        (
            "wireguard-go-current",
            Peer::Tunnel(Impl::WireguardGoCurrent),
        ),
        ("tailscale", Peer::Tunnel(Impl::Tailscale)),
        (
            "boringtun-1",
            Peer::Tunnel(Impl::BoringtunCli { threads: Some(1) }),
        ),
        (
            "boringtun",
            Peer::Tunnel(Impl::BoringtunCli { threads: None }),
        ),
        ("nebula", Peer::Tunnel(Impl::Nebula)),
        ("meshd", Peer::Tunnel(Impl::Meshd)),
    ];

    /// The peer a name of [`Peer::NAMES`] stands for.
    pub fn from_name(name: &str) -> Result<Peer, LabError> {
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, p)| *p)
            .ok_or_else(|| {
                let known: Vec<&str> = Self::NAMES.iter().map(|(n, _)| *n).collect();
                LabError::Lab(format!("no peer {name:?}; known: {}", known.join(", ")))
            })
    }

    pub fn label(self) -> String {
        match self {
            Peer::Veth => "veth (no tunnel)".into(),
            Peer::Tunnel(imp) => imp.to_string(),
        }
    }
}

/// The peers issue 4 compares, in table order. meshd is whichever binary
/// [`peers::locate_meshd`] finds: measure a release build.
pub fn default_peers() -> Vec<Peer> {
    vec![
        Peer::Veth,
        Peer::Tunnel(Impl::WireguardGo),
        Peer::Tunnel(Impl::WireguardGoCurrent),
        Peer::Tunnel(Impl::Tailscale),
        Peer::Tunnel(Impl::BoringtunCli { threads: Some(1) }),
        Peer::Tunnel(Impl::BoringtunCli { threads: None }),
        Peer::Tunnel(Impl::Nebula),
        Peer::Tunnel(Impl::Meshd),
    ]
}

/// One traffic pattern: how many TCP streams, and which way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Case {
    pub streams: u32,
    /// The right node sends (iperf3 -R); otherwise the left node does.
    pub reverse: bool,
}

impl Case {
    fn label(self) -> String {
        let dir = if self.reverse {
            "right → left"
        } else {
            "left → right"
        };
        format!("{} × TCP, {dir}", self.streams)
    }
}

/// Single- and four-stream TCP, both ways.
pub const CASES: [Case; 4] = [
    Case {
        streams: 1,
        reverse: false,
    },
    Case {
        streams: 1,
        reverse: true,
    },
    Case {
        streams: 4,
        reverse: false,
    },
    Case {
        streams: 4,
        reverse: true,
    },
];

/// What to measure and how long.
#[derive(Debug, Clone)]
pub struct Options {
    /// iperf3 runs per peer and case; the table shows medians.
    pub runs: usize,
    /// Length of each iperf3 run.
    pub secs: u32,
    /// Pings for each RTT median (underlay and each tunnel), one every `ping_interval`.
    pub pings: u32,
    pub ping_interval: Duration,
    pub peers: Vec<Peer>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            runs: 5,
            secs: 5,
            pings: 100,
            ping_interval: Duration::from_millis(20),
            peers: default_peers(),
        }
    }
}

/// The medians of one peer in one case.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseResult {
    /// Received bits per second (iperf3's receiver side).
    pub bps: f64,
    /// CPU seconds of the whole machine (all CPUs, /proc/stat, not idle nor iowait) per Gbit
    /// received: includes iperf3, the kernel's network stack and anything else running.
    pub cpu_all_s_per_gbit: f64,
    /// CPU seconds of the two tunnel daemons (/proc/PID/stat utime + stime, all threads) per
    /// Gbit received; None without a tunnel.
    pub cpu_daemons_s_per_gbit: Option<f64>,
    /// UDP datagrams dropped because a socket's receive buffer was full (/proc/net/snmp
    /// `Udp: RcvbufErrors`, both namespaces added) during one run.
    pub udp_rcvbuf_drops: f64,
}

/// Everything measured for one peer.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerResult {
    pub peer: Peer,
    /// What the program reports as its version; None for veth.
    pub version: Option<String>,
    /// Ping RTT from left to right through this peer, in ms: the median over the RTT rounds of
    /// each round's median.
    pub rtt_ms: f64,
    /// What the tunnel adds to the underlay's RTT, in ms: the median over the RTT rounds of
    /// (this round's tunnel median − the underlay median measured just before it).
    pub added_rtt_ms: f64,
    /// The same with pings back to back (each sent as soon as the last reply arrived), so the
    /// daemons never sleep long: the work per packet, apart from the cost of waking up.
    pub added_rtt_b2b_ms: f64,
    pub cases: BTreeMap<Case, CaseResult>,
}

/// The benchmark's results, ready for [`Report::table`].
#[derive(Debug, Clone)]
pub struct Report {
    pub runs: usize,
    pub secs: u32,
    pub pings: u32,
    pub ping_interval: Duration,
    /// Ping RTT over the bare underlay, in ms (median over rounds of each round's median).
    pub underlay_rtt_ms: f64,
    pub peers: Vec<PeerResult>,
    /// /proc/loadavg's 1-minute figure before and after, and the number of CPUs.
    pub load_before: f64,
    pub load_after: f64,
    pub cpus: usize,
    pub kernel: String,
}

/// Runs the benchmark. Builds the peers that come from the Go module proxy first
/// (`scripts/install-peers`, which skips what is built); fails at once, naming what to
/// install, if another peer's program is missing.
pub fn run(opts: &Options) -> Result<Report, LabError> {
    let runs = opts.runs.max(1);
    let secs = opts.secs.max(1);
    sys::require_tool("iperf3", "iperf3")?;
    sys::require_tool("ping", "iputils-ping")?;
    let mut to_build: Vec<&str> = Vec::new();
    for peer in &opts.peers {
        if let Peer::Tunnel(imp) = peer {
            for p in imp.install_peers_args() {
                if !to_build.contains(p) {
                    to_build.push(p);
                }
            }
        }
    }
    crate::peers::install_peers(&to_build)?;
    let mut versions = Vec::new();
    for peer in &opts.peers {
        versions.push(match peer {
            Peer::Veth => None,
            Peer::Tunnel(imp) => {
                imp.check_installed()?;
                Some(imp.version()?)
            }
        });
    }
    let load_before = load_average()?;
    let lab = Lab::veth_pair()?;
    let underlay = lab.addr(RIGHT)?;
    let mut results = Vec::new();
    for (peer, version) in opts.peers.iter().zip(versions) {
        tracing::info!(peer = %peer.label(), "measuring");
        let pair = match peer {
            Peer::Veth => None,
            Peer::Tunnel(imp) => Some(TunnelPair::up(
                &lab,
                LEFT,
                RIGHT,
                *imp,
                &TunnelOptions::default(),
            )?),
        };
        let (target, pids) = match &pair {
            None => (underlay, Vec::new()),
            Some(p) => (RIGHT_ADDR, p.pids().to_vec()),
        };
        let server = Iperf3Server::start(&lab, RIGHT)?;
        let mut samples: BTreeMap<Case, Vec<Sample>> = BTreeMap::new();
        // Run-major order: slow drifts of the machine's load spread over all cases alike.
        for run in 0..runs {
            for case in CASES {
                let s = measure(&lab, &server, target, &pids, case, secs)?;
                tracing::info!(
                    peer = %peer.label(),
                    case = %case.label(),
                    run,
                    gbit_s = s.bps / 1e9,
                    "run"
                );
                samples.entry(case).or_default().push(s);
            }
        }
        drop(server);
        drop(pair);
        let cases = samples
            .into_iter()
            .map(|(case, s)| (case, summarize(&s, !pids.is_empty())))
            .collect();
        results.push(PeerResult {
            peer: *peer,
            version,
            rtt_ms: f64::NAN,
            added_rtt_ms: f64::NAN,
            added_rtt_b2b_ms: f64::NAN,
            cases,
        });
    }
    let underlay_rtt_ms = measure_rtts(&lab, underlay, opts, &mut results)?;
    drop(lab);
    Ok(Report {
        runs,
        secs,
        pings: opts.pings,
        ping_interval: opts.ping_interval,
        underlay_rtt_ms,
        peers: results,
        load_before,
        load_after: load_average()?,
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel: read_proc("/proc/sys/kernel/osrelease")?.trim().to_owned(),
    })
}

/// The RTT phase: `runs` rounds, each pinging the underlay and then every tunnel in turn (a
/// tunnel is brought up for its pings only, so no idle daemon shares the machine), so slow
/// drifts of the machine's load hit every peer alike. Fills in each tunnel's RTT figures and
/// returns the underlay's.
fn measure_rtts(
    lab: &Lab,
    underlay: std::net::Ipv4Addr,
    opts: &Options,
    results: &mut [PeerResult],
) -> Result<f64, LabError> {
    let mut underlay_medians = Vec::new();
    let mut rounds: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> =
        vec![(Vec::new(), Vec::new(), Vec::new()); results.len()];
    let b2b_pings = opts.pings.saturating_mul(B2B_PING_FACTOR);
    for round in 0..opts.runs.max(1) {
        for (result, (tunnel, added, added_b2b)) in results.iter().zip(rounds.iter_mut()) {
            let Peer::Tunnel(imp) = result.peer else {
                continue;
            };
            let pair = TunnelPair::up(lab, LEFT, RIGHT, imp, &TunnelOptions::default())?;
            let base = tools::median_rtt(lab, LEFT, underlay, opts.pings, opts.ping_interval)?;
            let through = tools::median_rtt(lab, LEFT, RIGHT_ADDR, opts.pings, opts.ping_interval)?;
            let base_b2b = tools::median_rtt(lab, LEFT, underlay, b2b_pings, Duration::ZERO)?;
            let through_b2b = tools::median_rtt(lab, LEFT, RIGHT_ADDR, b2b_pings, Duration::ZERO)?;
            drop(pair);
            tracing::info!(
                peer = %result.peer.label(),
                round,
                underlay_ms = base,
                tunnel_ms = through,
                "RTT round"
            );
            underlay_medians.push(base);
            tunnel.push(through);
            added.push(through - base);
            added_b2b.push(through_b2b - base_b2b);
        }
    }
    for (result, (tunnel, added, added_b2b)) in results.iter_mut().zip(&rounds) {
        if let (Some(t), Some(a)) = (tools::median(tunnel), tools::median(added)) {
            result.rtt_ms = t;
            result.added_rtt_ms = a;
        }
        result.added_rtt_b2b_ms = tools::median(added_b2b).unwrap_or(f64::NAN);
    }
    Ok(tools::median(&underlay_medians).unwrap_or(f64::NAN))
}

/// One iperf3 run and what the machine spent on it.
#[derive(Debug, Clone, Copy)]
struct Sample {
    bps: f64,
    gbit: f64,
    cpu_all_s: f64,
    cpu_daemons_s: f64,
    udp_rcvbuf_drops: u64,
}

#[derive(Debug, Clone, Copy)]
struct Counters {
    busy_ticks: u64,
    daemon_ticks: u64,
    udp_rcvbuf_errors: u64,
}

fn counters(lab: &Lab, pids: &[u32]) -> Result<Counters, LabError> {
    let stat = read_proc("/proc/stat")?;
    let busy_ticks = parse_busy_ticks(&stat).ok_or_else(|| unreadable("/proc/stat", &stat))?;
    let mut daemon_ticks = 0;
    for pid in pids {
        let path = format!("/proc/{pid}/stat");
        let text = read_proc(&path).map_err(|_| {
            LabError::Lab(format!(
                "tunnel daemon {pid} is gone: it exited during the run; logs are in {}",
                lab.log_dir().display()
            ))
        })?;
        daemon_ticks += parse_process_ticks(&text).ok_or_else(|| unreadable(&path, &text))?;
    }
    let mut udp_rcvbuf_errors = 0;
    for node in [LEFT, RIGHT] {
        // /proc/net follows the reader's network namespace, so it is read from inside.
        let snmp = lab.exec(node, &["cat", "/proc/net/snmp"])?.ok()?;
        udp_rcvbuf_errors += parse_snmp(&snmp, "Udp", "RcvbufErrors")
            .ok_or_else(|| unreadable("/proc/net/snmp", &snmp))?;
    }
    Ok(Counters {
        busy_ticks,
        daemon_ticks,
        udp_rcvbuf_errors,
    })
}

fn measure(
    lab: &Lab,
    server: &Iperf3Server<'_>,
    target: Ipv4Addr,
    pids: &[u32],
    case: Case,
    secs: u32,
) -> Result<Sample, LabError> {
    let hz = rustix::param::clock_ticks_per_second() as f64;
    let before = counters(lab, pids)?;
    let r = server.run(
        LEFT,
        target,
        Iperf3Test {
            secs,
            streams: case.streams,
            reverse: case.reverse,
        },
    )?;
    let after = counters(lab, pids)?;
    Ok(Sample {
        bps: r.bits_per_second,
        gbit: r.bytes as f64 * 8.0 / 1e9,
        cpu_all_s: after.busy_ticks.saturating_sub(before.busy_ticks) as f64 / hz,
        cpu_daemons_s: after.daemon_ticks.saturating_sub(before.daemon_ticks) as f64 / hz,
        udp_rcvbuf_drops: after
            .udp_rcvbuf_errors
            .saturating_sub(before.udp_rcvbuf_errors),
    })
}

fn summarize(samples: &[Sample], has_daemons: bool) -> CaseResult {
    let m = |f: &dyn Fn(&Sample) -> f64| {
        median(&samples.iter().map(f).collect::<Vec<_>>()).unwrap_or(f64::NAN)
    };
    CaseResult {
        bps: m(&|s| s.bps),
        cpu_all_s_per_gbit: m(&|s| s.cpu_all_s / s.gbit),
        cpu_daemons_s_per_gbit: has_daemons.then(|| m(&|s| s.cpu_daemons_s / s.gbit)),
        udp_rcvbuf_drops: m(&|s| s.udp_rcvbuf_drops as f64),
    }
}

fn read_proc(path: &str) -> Result<String, LabError> {
    std::fs::read_to_string(path).map_err(|source| LabError::Io {
        what: format!("reading {path}"),
        source,
    })
}

fn unreadable(what: &str, text: &str) -> LabError {
    let start = text.len().saturating_sub(300);
    LabError::Lab(format!(
        "could not parse {what}: {:?}",
        text.get(start..).unwrap_or(text)
    ))
}

pub(crate) fn load_average() -> Result<f64, LabError> {
    let text = read_proc("/proc/loadavg")?;
    text.split_whitespace()
        .next()
        .and_then(|l| l.parse().ok())
        .ok_or_else(|| unreadable("/proc/loadavg", &text))
}

/// Busy time of all CPUs from /proc/stat's `cpu` line: user, nice, system, irq, softirq and
/// steal (guest time is already inside user; idle and iowait are not work).
fn parse_busy_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let field = |i: usize| v.get(i).copied();
    Some(field(0)? + field(1)? + field(2)? + field(5)? + field(6)? + field(7).unwrap_or(0))
}

/// utime + stime of a process (all its threads) from /proc/PID/stat.
pub(crate) fn parse_process_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may contain spaces and parentheses: fields are counted from
    // the last ')'. utime and stime are fields 14 and 15, the 12th and 13th after it.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let mut f = rest.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

/// One counter of /proc/net/snmp, where each protocol has a line of names and a line of values.
fn parse_snmp(text: &str, proto: &str, name: &str) -> Option<u64> {
    let prefix = format!("{proto}:");
    let mut lines = text
        .lines()
        .filter(|l| l.split_whitespace().next() == Some(prefix.as_str()));
    let names = lines.next()?;
    let values = lines.next()?;
    let at = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(at)?.parse().ok()
}

impl Report {
    /// Markdown: a header, the main table, the RTT table and, per case, a matrix of throughput
    /// ratios between every two peers.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "Data plane over a plain veth pair (two namespaces, one hop); {} CPUs, Linux {}; \
             load average {:.2} before, {:.2} after.\n\
             Throughput: median of {} iperf3 runs of {} s (receiver side). CPU: CPU seconds per \
             Gbit received, of the whole machine (/proc/stat: everything, iperf3 and kernel \
             included) and of the two tunnel daemons alone (/proc/PID/stat). Drops: UDP \
             RcvbufErrors in both namespaces per run (median).\n",
            self.cpus, self.kernel, self.load_before, self.load_after, self.runs, self.secs,
        );
        let _ = writeln!(
            t,
            "| peer | traffic | Gbit/s | × veth | × best other tunnel | CPU s/Gbit, machine | \
             CPU s/Gbit, daemons | UDP rcvbuf drops/run |\n|---|---|---:|---:|---:|---:|---:|---:|"
        );
        for case in CASES {
            for p in &self.peers {
                let Some(r) = p.cases.get(&case) else {
                    continue;
                };
                let veth = self.bps(Peer::Veth, case);
                let best = self.best_other_tunnel(p.peer, case);
                let _ = writeln!(
                    t,
                    "| {} | {} | {:.2} | {} | {} | {:.2} | {} | {:.0} |",
                    p.peer.label(),
                    case.label(),
                    r.bps / 1e9,
                    veth.map_or("–".into(), |v| format!("{:.3}", r.bps / v)),
                    best.map_or("–".into(), |(name, b)| format!(
                        "{:.2} ({name})",
                        r.bps / b
                    )),
                    r.cpu_all_s_per_gbit,
                    r.cpu_daemons_s_per_gbit
                        .map_or("–".into(), |c| format!("{c:.2}")),
                    r.udp_rcvbuf_drops,
                );
            }
        }
        let _ = writeln!(
            t,
            "\n| peer | version | ping RTT, median (ms) | added RTT (ms) | added RTT, back to back (ms) |\n\
             |---|---|---:|---:|---:|\n\
             | underlay (veth) | | {:.3} | | |",
            self.underlay_rtt_ms
        );
        for p in &self.peers {
            if p.peer == Peer::Veth {
                continue;
            }
            let _ = writeln!(
                t,
                "| {} | {} | {:.3} | {:+.3} | {:+.3} |",
                p.peer.label(),
                p.version.as_deref().unwrap_or(""),
                p.rtt_ms,
                p.added_rtt_ms,
                p.added_rtt_b2b_ms
            );
        }
        let _ = writeln!(
            t,
            "\n{} rounds; in each, every tunnel in turn is brought up and the underlay, then the \
             tunnel, get {} pings at {} ms intervals. Added RTT = median over rounds of \
             (tunnel median − underlay median of the same round). Back to back: the same with \
             {} pings each sent as soon as the last reply arrived (nothing sleeps long, so this \
             is the work per packet without the cost of waking up).",
            self.runs,
            self.pings,
            self.ping_interval.as_millis(),
            self.pings.saturating_mul(B2B_PING_FACTOR)
        );
        for case in CASES {
            let _ = write!(
                t,
                "\nThroughput ratios, {}: row ÷ column\n\n| |",
                case.label()
            );
            for p in &self.peers {
                let _ = write!(t, " {} |", p.peer.label());
            }
            let _ = write!(t, "\n|---|");
            for _ in &self.peers {
                let _ = write!(t, "---:|");
            }
            t.push('\n');
            for row in &self.peers {
                let _ = write!(t, "| {} |", row.peer.label());
                for col in &self.peers {
                    match (self.bps(row.peer, case), self.bps(col.peer, case)) {
                        (Some(a), Some(b)) => {
                            let _ = write!(t, " {:.2} |", a / b);
                        }
                        _ => t.push_str(" – |"),
                    }
                }
                t.push('\n');
            }
        }
        t
    }

    fn bps(&self, peer: Peer, case: Case) -> Option<f64> {
        self.peers
            .iter()
            .find(|p| p.peer == peer)
            .and_then(|p| p.cases.get(&case))
            .map(|r| r.bps)
    }

    /// The fastest tunnel other than `peer` in this case, by label and throughput.
    fn best_other_tunnel(&self, peer: Peer, case: Case) -> Option<(String, f64)> {
        self.peers
            .iter()
            .filter(|p| p.peer != peer && matches!(p.peer, Peer::Tunnel(_)))
            .filter_map(|p| Some((p.peer.label(), p.cases.get(&case)?.bps)))
            .max_by(|a, b| a.1.total_cmp(&b.1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_counters() {
        let stat = "cpu  100 5 50 1000 20 3 7 2 0 0\ncpu0 50 2 25 500 10 1 3 1 0 0\nintr 1\n";
        assert_eq!(parse_busy_ticks(stat), Some(100 + 5 + 50 + 3 + 7 + 2));
        assert_eq!(parse_busy_ticks("cpu0 1 2 3\n"), None);
        assert_eq!(parse_busy_ticks("cpu  1 x 3 4 5 6 7 8\n"), None);

        let pid = "4242 (wireguard go) S 1 4242 4242 0 -1 4194560 300 0 0 0 1234 567 0 0 20 0 9 0 \
                   100 1000 200 18446744073709551615";
        assert_eq!(parse_process_ticks(pid), Some(1234 + 567));
        assert_eq!(parse_process_ticks("4242 (x) S 1 2"), None);

        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
                    Udp: 10 0 7 12 5 0\n\
                    UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
                    UdpLite: 0 0 0 0 99 0\n";
        assert_eq!(parse_snmp(snmp, "Udp", "RcvbufErrors"), Some(5));
        assert_eq!(parse_snmp(snmp, "UdpLite", "RcvbufErrors"), Some(99));
        assert_eq!(parse_snmp(snmp, "Udp", "Nothing"), None);
        assert_eq!(
            parse_snmp("Udp: RcvbufErrors\n", "Udp", "RcvbufErrors"),
            None
        );
    }

    #[test]
    fn peers_are_named_once_each_and_the_defaults_all_have_names() {
        for (name, peer) in Peer::NAMES {
            assert_eq!(Peer::from_name(name).unwrap(), peer);
        }
        for peer in default_peers() {
            assert!(Peer::NAMES.iter().any(|(_, p)| *p == peer), "{peer:?}");
        }
        let err = Peer::from_name("tailscaled").unwrap_err().to_string();
        assert!(err.contains("wireguard-go-current"), "{err}");
    }

    fn result(peer: Peer, gbit: [f64; 4]) -> PeerResult {
        PeerResult {
            peer,
            version: None,
            rtt_ms: 0.5,
            added_rtt_ms: 0.45,
            added_rtt_b2b_ms: 0.04,
            cases: CASES
                .iter()
                .zip(gbit)
                .map(|(c, g)| {
                    (
                        *c,
                        CaseResult {
                            bps: g * 1e9,
                            cpu_all_s_per_gbit: 1.0,
                            cpu_daemons_s_per_gbit: None,
                            udp_rcvbuf_drops: 0.0,
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn table_has_ratios_against_veth_the_best_other_tunnel_and_each_peer() {
        let wg = Peer::Tunnel(Impl::WireguardGo);
        let neb = Peer::Tunnel(Impl::Nebula);
        let report = Report {
            runs: 5,
            secs: 5,
            pings: 50,
            ping_interval: Duration::from_millis(20),
            underlay_rtt_ms: 0.05,
            peers: vec![
                result(Peer::Veth, [10.0, 10.0, 20.0, 20.0]),
                result(wg, [0.5, 0.5, 1.0, 1.0]),
                result(neb, [1.0, 0.25, 2.0, 2.0]),
            ],
            load_before: 0.1,
            load_after: 0.2,
            cpus: 2,
            kernel: "6.1".into(),
        };
        let t = report.table();
        // wireguard-go, one stream left → right: 0.5 of 10 Gbit/s, half of nebula's 1.0.
        assert!(
            t.contains("| wireguard-go | 1 × TCP, left → right | 0.50 | 0.050 | 0.50 (nebula) |"),
            "{t}"
        );
        // Reverse: wireguard-go beats nebula twice over.
        assert!(
            t.contains("| nebula | 1 × TCP, right → left | 0.25 | 0.025 | 0.50 (wireguard-go) |"),
            "{t}"
        );
        assert!(
            t.contains(
                "| veth (no tunnel) | 1 × TCP, left → right | 10.00 | 1.000 | 10.00 (nebula) |"
            ),
            "{t}"
        );
        // Matrix row for veth in the first case: 10 / 10, 10 / 0.5, 10 / 1.
        assert!(
            t.contains("| veth (no tunnel) | 1.00 | 20.00 | 10.00 |"),
            "{t}"
        );
        assert!(t.contains("| nebula |  | 0.500 | +0.450 | +0.040 |"), "{t}");
    }
}
