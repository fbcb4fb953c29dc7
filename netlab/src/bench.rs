//! `meshd lab bench netlab`: how faithful and how fast the emulated internet is, measured the
//! same way as the timing tests but with as many runs as asked, as a table for
//! docs/benchmarks.md. Not a pass/fail test.
use std::fmt::Write as _;
use std::time::Duration;

use crate::tools::{self, median};
use crate::{Host, Lab, LabError, Site, Topology};

/// Measured figures; every throughput is the median of `runs` iperf3 runs of `secs` seconds.
#[derive(Debug, Clone)]
pub struct Report {
    pub runs: usize,
    /// (configured RTT ms, measured median RTT ms) per impaired path.
    pub rtt: Vec<(u32, f64)>,
    /// (configured loss %, measured delivered %).
    pub loss: (f64, f64),
    pub pair_bps: f64,
    pub link_bps: f64,
    pub path_bps: f64,
    pub emulated_bps: f64,
}

pub fn run(runs: usize, secs: u32) -> Result<Report, LabError> {
    let runs = runs.max(1);
    let lab = Lab::up(
        &Topology::new()
            .host("srv")
            .host(Host::new("far").latency_ms(5))
            .site(Site::new("dc", ["n0"]))
            .site(Site::new("one", ["n1"]).latency_ms(1))
            .site(Site::new("edge", ["n20"]).latency_ms(20))
            .site(Site::new("moon", ["n200"]).latency_ms(200))
            .site(Site::new("lossy", ["nl"]).loss_pct(5.0)),
    )?;
    let mut rtt = Vec::new();
    for (node, to, want) in [
        ("n1", "srv", 1),
        ("n20", "srv", 20),
        ("n200", "srv", 200),
        ("n20", "far", 25),
    ] {
        let samples =
            tools::ping_rtts(&lab, node, to, 20 * runs as u32, Duration::from_millis(50))?;
        rtt.push((want, median(&samples).unwrap_or(f64::NAN)));
    }
    // Loss: pings that come back cross the lossy uplink twice.
    let pings = 200 * runs as u32;
    let back = tools::ping_rtts(&lab, "nl", "srv", pings, Duration::from_millis(5))?.len();
    let delivered_one_way = (back as f64 / f64::from(pings)).sqrt() * 100.0;

    let pair = Lab::veth_pair()?;
    let (mut p, mut l, mut r, mut e) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        p.push(tools::iperf3_tcp(&pair, "right", "left", secs, 1)?);
        l.push(tools::iperf3_tcp(&lab, "inet", "srv", secs, 1)?);
        r.push(tools::iperf3_tcp(&lab, "srv", "n0", secs, 1)?);
        e.push(tools::iperf3_tcp(&lab, "srv", "n20", secs, 1)?);
    }
    let m = |v: &[f64]| median(v).unwrap_or(f64::NAN);
    Ok(Report {
        runs,
        rtt,
        loss: (5.0, delivered_one_way),
        pair_bps: m(&p),
        link_bps: m(&l),
        path_bps: m(&r),
        emulated_bps: m(&e),
    })
}

impl Report {
    /// A markdown table.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "| measurement | configured | measured | ratio |\n|---|---|---|---|"
        );
        for (want, got) in &self.rtt {
            let _ = writeln!(
                t,
                "| ping RTT, median | {want} ms | {got:.2} ms | {:.3} |",
                got / f64::from(*want)
            );
        }
        let _ = writeln!(
            t,
            "| delivered one way through a lossy uplink | {:.1} % | {:.1} % | |",
            100.0 - self.loss.0,
            self.loss.1
        );
        let g = |bps: f64| format!("{:.2} Gbit/s", bps / 1e9);
        let _ = writeln!(
            t,
            "| TCP, plain veth pair (the ceiling) | | {} | 1.00 |",
            g(self.pair_bps)
        );
        for (what, bps) in [
            ("TCP, one lab link (host → core)", self.link_bps),
            ("TCP, node → router → core → host", self.path_bps),
            ("TCP through a 20 ms emulated uplink", self.emulated_bps),
        ] {
            let _ = writeln!(t, "| {what} | | {} | {:.2} |", g(bps), bps / self.pair_bps);
        }
        let _ = writeln!(t, "\nmedians of {} runs", self.runs);
        t
    }
}
