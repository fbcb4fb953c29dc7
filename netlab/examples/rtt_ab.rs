//! Interleaved added-RTT (and optionally single-stream TCP) comparison of tunnel
//! implementations over one veth pair: A B A B … so machine load drifts hit every
//! variant alike.
//!
//! `rtt_ab ROUNDS PINGS INTERVAL_MS IPERF_SECS VARIANT...` where a variant is `btN`
//! (boringtun-cli --threads N), `btd` (boringtun-cli default), `NAME=PATH` (a meshd binary)
//! or `LEFT/RIGHT`, a mixed pair of those ends (`meshd`: the last NAME=PATH binary), the
//! left end the pinging one.
#![allow(clippy::print_stdout)] // a command-line benchmark: its report is its output

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use meshd_netlab::peers::{self, Impl, TunnelOptions, TunnelPair, RIGHT_ADDR};
use meshd_netlab::tools::{self, ping_addr, Iperf3Test};
use meshd_netlab::Lab;

const CURRENT: &str = "/tmp/meshd-rtt-ab-current";

/// The median, NaN for no finite value (a round without iperf3).
fn median(v: &[f64]) -> f64 {
    tools::median(v).unwrap_or(f64::NAN)
}

/// The nearest-rank quantile, for the tails the median does not show.
fn quantile(v: &[f64], q: f64) -> f64 {
    let mut v: Vec<f64> = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i]
}

/// `bt1`, `bt2`, … (boringtun-cli `--threads N`), `btd` (its default), or `meshd`
/// (the binary of the last `NAME=PATH` variant).
fn end_impl(spec: &str) -> Result<Impl, Box<dyn std::error::Error>> {
    match spec {
        "btd" => Ok(Impl::BoringtunCli { threads: None }),
        "meshd" if Path::new(CURRENT).exists() => Ok(Impl::Meshd),
        "meshd" => Err("`meshd` in a mixed pair needs a NAME=PATH variant before it".into()),
        _ => match spec.strip_prefix("bt").map(str::parse::<u32>) {
            Some(Ok(n)) if n > 0 => Ok(Impl::BoringtunCli { threads: Some(n) }),
            _ => Err(format!("unknown variant end `{spec}`: btN, btd or meshd").into()),
        },
    }
}

/// A variant's name in the report: the names earlier reports used.
fn end_name(spec: &str) -> String {
    match spec {
        "btd" => "boringtun-default".to_owned(),
        "meshd" => "meshd".to_owned(),
        _ => format!("boringtun-{}", spec.trim_start_matches("bt")),
    }
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .unwrap_or("?")
        .to_owned()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 5 {
        return Err(
            "usage: rtt_ab ROUNDS PINGS INTERVAL_MS IPERF_SECS VARIANT... \
                    (VARIANT: btN | btd | NAME=PATH-TO-MESHD | LEFT/RIGHT of btN, btd, meshd)"
                .into(),
        );
    }
    let rounds: usize = args[0].parse()?;
    let pings: u32 = args[1].parse()?;
    let interval = Duration::from_millis(args[2].parse()?);
    let iperf_secs: u32 = args[3].parse()?;
    let variants: Vec<String> = args[4..].to_vec();
    peers::use_meshd_binary(CURRENT);
    // Made by a NAME=PATH variant; a mixed pair's `meshd` end uses the last one.
    let _ = std::fs::remove_file(CURRENT);
    let lab = Lab::veth_pair()?;
    let underlay = lab.addr("right")?;
    // name -> (added median, added p10, tcp Gbit/s, added p90) per round
    let mut results: BTreeMap<String, Vec<(f64, f64, f64, f64)>> = BTreeMap::new();
    for round in 0..rounds {
        for v in &variants {
            let (name, left, right) = if let Some((name, path)) = v.split_once('=') {
                let _ = std::fs::remove_file(CURRENT);
                std::os::unix::fs::symlink(Path::new(path), CURRENT)?;
                (name.to_owned(), Impl::Meshd, Impl::Meshd)
            } else if let Some((l, r)) = v.split_once('/') {
                // A mixed pair: the pinging (left) end runs one implementation, the
                // answering end another, to tell on which side a difference lies.
                (v.clone(), end_impl(l)?, end_impl(r)?)
            } else {
                let imp = end_impl(v)?;
                (end_name(v), imp, imp)
            };
            let pair = TunnelPair::up_mixed(
                &lab,
                ("left", left),
                ("right", right),
                &TunnelOptions::default(),
            )?;
            if let Some(secs) = std::env::var("HOLD_SECS").ok().and_then(|v| v.parse().ok()) {
                println!(
                    "holding {name}: {} {} pids {:?}",
                    lab.ns("left")?,
                    lab.ns("right")?,
                    pair.pids()
                );
                std::thread::sleep(Duration::from_secs(secs));
            }
            let l0 = load();
            let underlay_pings = std::env::var("UNDERLAY_PINGS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(pings);
            let base = ping_addr(&lab, "left", underlay, underlay_pings, interval)?;
            let tun = ping_addr(&lab, "left", RIGHT_ADDR, pings, interval)?;
            let gbit = if iperf_secs > 0 {
                pair.iperf3(Iperf3Test {
                    secs: iperf_secs,
                    streams: 1,
                    reverse: false,
                })?
                .bits_per_second
                    / 1e9
            } else {
                f64::NAN
            };
            drop(pair);
            let med = median(&tun) - median(&base);
            let p10 = quantile(&tun, 0.1) - quantile(&base, 0.1);
            println!(
                "round {round} {name:>18}: added median {:+.3} ms p10 {:+.3} ms (tunnel {:.3}/{:.3}, underlay {:.3}/{:.3}, n={}) tcp {:.2} Gbit/s load {l0}",
                med,
                p10,
                median(&tun),
                quantile(&tun, 0.1),
                median(&base),
                quantile(&base, 0.1),
                tun.len(),
                gbit
            );
            results.entry(name).or_default().push((
                med,
                p10,
                gbit,
                quantile(&tun, 0.9) - quantile(&base, 0.9),
            ));
        }
    }
    println!(
        "\nsummary over {rounds} rounds (median of per-round figures; load now {}):",
        load()
    );
    for (name, r) in &results {
        let col = |f: fn(&(f64, f64, f64, f64)) -> f64| r.iter().map(f).collect::<Vec<_>>();
        println!(
            "{name:>18}: added median {:+.3} ms, p10 {:+.3} ms, p90 {:+.3} ms, tcp {:.2} Gbit/s (min {:.2} max {:.2})",
            median(&col(|x| x.0)),
            median(&col(|x| x.1)),
            median(&col(|x| x.3)),
            median(&col(|x| x.2)),
            quantile(&col(|x| x.2), 0.0),
            quantile(&col(|x| x.2), 1.0),
        );
    }
    Ok(())
}
