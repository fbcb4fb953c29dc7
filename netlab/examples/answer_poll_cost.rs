//! What the engine's answer polling costs and gives for paced request/response
//! traffic: a meshd pair on a lab veth pair, `RATE` pings a second through the
//! tunnel for `SECS` seconds per run, for each `--answer-poll` value in turn
//! (interleaved, `ROUNDS` times), reporting both daemons' CPU seconds per
//! minute (user + system, from /proc) and the pings' median round trip.
//!
//! `answer_poll_cost ROUNDS SECS RATE POLL...`, e.g.
//! `answer_poll_cost 3 30 1000 0 150us`; the meshd binary is `MESHD`, else the
//! `meshd` beside this example's directory (`target/release/meshd`).
#![allow(clippy::print_stdout)] // a command-line benchmark: its report is its output

use std::collections::BTreeMap;

use meshd_netlab::peers::{Impl, TunnelOptions, TunnelPair, RIGHT_ADDR};
use meshd_netlab::tools;
use meshd_netlab::Lab;

/// User + system CPU time of process `pid` in seconds.
fn cpu_secs(pid: u32) -> Result<f64, Box<dyn std::error::Error>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // After the command name in parentheses: field 14 and 15 of the whole line.
    let rest = stat.rsplit_once(')').ok_or("no ) in stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // USER_HZ is 100 on Linux for every architecture meshd runs on.
    Ok(ticks as f64 / 100.0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        return Err("usage: answer_poll_cost ROUNDS SECS RATE POLL... (POLL: 0, 150us, …)".into());
    }
    let rounds: usize = args[0].parse()?;
    let secs: u32 = args[1].parse()?;
    let rate: u32 = args[2].parse()?;
    let polls = &args[3..];
    let meshd = match std::env::var_os("MESHD") {
        Some(path) => std::path::PathBuf::from(path),
        None => std::env::current_exe()?
            .parent()
            .and_then(|examples| examples.parent())
            .ok_or("no directory above this example")?
            .join("meshd"),
    };
    meshd_netlab::peers::use_meshd_binary(meshd);
    let lab = Lab::veth_pair()?;
    let interval = std::time::Duration::from_secs(1) / rate;
    // poll -> (CPU s per minute, median RTT ms) per round
    let mut results: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for round in 0..rounds {
        for poll in polls {
            let opts = TunnelOptions {
                meshd_args: vec!["--answer-poll".into(), poll.clone()],
                ..TunnelOptions::default()
            };
            let pair = TunnelPair::up(&lab, "left", "right", Impl::Meshd, &opts)?;
            let pids = pair.pids();
            let before: f64 = pids.iter().map(|&p| cpu_secs(p)).sum::<Result<f64, _>>()?;
            let rtts = tools::ping_addr(&lab, "left", RIGHT_ADDR, secs * rate, interval)?;
            let after: f64 = pids.iter().map(|&p| cpu_secs(p)).sum::<Result<f64, _>>()?;
            let median = tools::median(&rtts).unwrap_or(f64::NAN);
            let per_minute = (after - before) * 60.0 / f64::from(secs);
            println!(
                "round {round} poll {poll:>6}: {per_minute:.2} CPU s/min for both daemons, \
                 median RTT {median:.3} ms ({} replies)",
                rtts.len()
            );
            results
                .entry(poll.clone())
                .or_default()
                .push((per_minute, median));
        }
    }
    println!("\nmedians over {rounds} rounds of {secs} s at {rate} requests/s:");
    for (poll, r) in &results {
        let cpu: Vec<f64> = r.iter().map(|x| x.0).collect();
        let rtt: Vec<f64> = r.iter().map(|x| x.1).collect();
        println!(
            "poll {poll:>6}: {:.2} CPU s/min, median RTT {:.3} ms",
            tools::median(&cpu).unwrap_or(f64::NAN),
            tools::median(&rtt).unwrap_or(f64::NAN)
        );
    }
    Ok(())
}
