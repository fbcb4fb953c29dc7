//! Coordinator scale benchmark (issue 5, "Scale"): a join storm of N
//! simulated agents and endpoint-change fan-out, measured in one process
//! with no sockets (`mem`), or over real QUIC on loopback (`quic`).
//!
//! ```text
//! cargo run --release -p meshd-coord --example scale            # table: N=1,000 and 10,000 in memory, SQLite 1,000, QUIC 1,000
//! cargo run --release -p meshd-coord --example scale -- run mem 10000 mem 0
//! cargo run --release -p meshd-coord --example scale -- run quic 1000 100   # N, handshakes at once
//! cargo run --release -p meshd-coord --example scale -- run quic-inproc 1000 100
//! cargo run --release -p meshd-coord --example scale -- run tls 1000 100    # TLS/TCP instead of QUIC
//! ```
//!
//! The table mode runs each configuration in a child process of its own, so
//! that resident memory is not shared between runs.
//!
//! In memory, every agent joins with a real `meshd_proto::client::Client`
//! through the wire encoding (encode, then decode, of every frame). Keeping
//! a full peer map in every one of 10,000 clients would take 10,000² peers
//! (tens of GB), so after its map arrived an agent keeps only a decoder
//! ("thin" agent: it decodes every frame and checks each endpoint change),
//! except `sample` agents that keep their `Client` and apply every delta.
//! With `sample` = 0 the process holds the coordinator and counters only, so
//! the RSS growth is the coordinator's (plus allocator slack).
#![allow(clippy::print_stdout, reason = "a benchmark binary reports on stdout")]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use meshd_coord::{
    Action, Config, Coordinator, MemStore, SessionId, SqliteStore, Store, TokenSpec,
};
use meshd_proto::client::{Client, ClientEvent, Join};
use meshd_proto::{decode, encode, EndpointReport, Message, NodeId, TokenSecret};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use x25519_dalek::StaticSecret;

const CHANGES: usize = 20;

/// The system allocator, counting the bytes and blocks that are live, so the
/// QUIC server can tell memory in use from what the allocator keeps (RSS
/// minus live heap: freed blocks not returned, per-thread arenas).
struct Counting;

static LIVE_BYTES: AtomicU64 = AtomicU64::new(0);
static LIVE_BLOCKS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged, so `System`'s guarantees are `Counting`'s; the counters are
// only bookkeeping (relaxed atomics, no allocation of their own).
#[allow(unsafe_code, reason = "a counting wrapper around the system allocator")]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
            LIVE_BLOCKS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
            LIVE_BLOCKS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE_BYTES.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        LIVE_BLOCKS.fetch_sub(1, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            LIVE_BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
            LIVE_BYTES.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// What a process holds: resident memory, and heap blocks live in it.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
struct MemStats {
    rss_kib: u64,
    heap_kib: u64,
    heap_blocks: u64,
}

fn my_mem() -> MemStats {
    MemStats {
        rss_kib: my_rss_kib(),
        heap_kib: LIVE_BYTES.load(Ordering::Relaxed) / 1024,
        heap_blocks: LIVE_BLOCKS.load(Ordering::Relaxed),
    }
}

/// Gives the free memory at the top of glibc's heaps and in whole free pages
/// back to the kernel (`malloc_trim(0)`): what RSS then drops by was freed
/// memory the allocator kept, not memory in use.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn malloc_trim() {
    // SAFETY: malloc_trim takes a size and touches only the allocator's own
    // free lists, under the allocator's lock; it is safe to call at any time
    // from any thread (glibc malloc_trim(3), MT-Safe).
    #[allow(unsafe_code, reason = "a measurement in a benchmark")]
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn malloc_trim() {}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Results {
    mode: String,
    store: String,
    n: usize,
    sample: usize,
    storm_s: f64,
    storm_cpu_s: f64,
    fanout_p50_ms: f64,
    fanout_p99_ms: f64,
    change_cpu_ms: f64,
    bytes_unaffected_min: u64,
    bytes_unaffected_max: u64,
    bytes_total_per_change: u64,
    rss_before_kib: u64,
    rss_after_kib: u64,
    coord_cpu_s: f64,
    /// QUIC: CPU of the agents' process in the storm.
    #[serde(default)]
    clients_cpu_s: f64,
    /// QUIC: CPU of the whole server process per change.
    #[serde(default)]
    server_change_cpu_ms: f64,
    /// QUIC: datagrams the kernel dropped on the server's socket in the storm.
    #[serde(default)]
    server_udp_drops: u64,
    /// QUIC server: before the storm, right after it, after the changes and
    /// a quiet second and a half, and then after `malloc_trim(0)`.
    #[serde(default)]
    server_mem: [MemStats; 4],
}

impl Results {
    fn rss_per_node_kib(&self) -> f64 {
        (self.rss_after_kib.saturating_sub(self.rss_before_kib)) as f64 / self.n as f64
    }
}

/// VmRSS of this process, KiB.
fn my_rss_kib() -> u64 {
    rss_kib("/proc/self/status")
}

/// VmRSS from a /proc/PID/status file, KiB.
fn rss_kib(status: &str) -> u64 {
    let s = std::fs::read_to_string(status).expect("read /proc/PID/status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// CPU time of one thread (ns precision), from its schedstat.
fn thread_cpu(path: &str) -> Duration {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let ns = s
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Duration::from_nanos(ns)
}

/// utime + stime of a whole process (all threads), from /proc/PID/stat.
fn process_cpu(stat: &str) -> Duration {
    let s = std::fs::read_to_string(stat).expect("read /proc/PID/stat");
    // The fields after the parenthesised command name start at field 3
    // (state); utime and stime are fields 14 and 15, in clock ticks (1/100 s
    // on Linux).
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Duration::from_millis((tick(11) + tick(12)) * 10)
}

fn my_cpu() -> Duration {
    thread_cpu("/proc/thread-self/schedstat")
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

fn secret_of(i: usize) -> StaticSecret {
    let mut b = [0x11u8; 32];
    // Bytes 8..16: X25519 clamping rewrites bits of bytes 0 and 31.
    b[8..16].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    StaticSecret::from(b)
}

fn endpoint_for(change: usize) -> Vec<SocketAddr> {
    vec![
        SocketAddr::from(([192, 0, 2, (change % 250) as u8 + 1], 51820 + change as u16)),
        SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1], 51820 + change as u16)),
    ]
}

// ---------------------------------------------------------------- in memory

struct Agent {
    /// The full client: while joining, and for sample agents throughout.
    client: Option<Client>,
    node: Option<NodeId>,
    bytes: u64,
    /// Endpoint changes this agent decoded (thin) or applied (full).
    changes_seen: u64,
}

struct Mem {
    coord: Coordinator,
    now: SystemTime,
    agents: Vec<Agent>,
    sample: usize,
    /// The change under way: whose and to what, to check what agents get.
    expect: Option<(NodeId, Vec<SocketAddr>)>,
    dirty: Vec<usize>,
}

impl Mem {
    fn index(&self, s: SessionId) -> usize {
        usize::try_from(s.0 - 1).expect("session ids count from 1")
    }

    /// Moves frames both ways, through the wire encoding, until nothing moves.
    fn drive(&mut self) {
        loop {
            let mut moved = false;
            while let Some(a) = self.coord.poll_action() {
                moved = true;
                let (session, message) = match a {
                    Action::Send { session, message } => (session, message),
                    Action::Close { session } => panic!("coordinator closed {session:?}"),
                };
                let i = self.index(session);
                let bytes = encode(&message).expect("encode");
                let msg = decode(&bytes).expect("decode").expect("a whole frame");
                let agent = &mut self.agents[i];
                agent.bytes += bytes.len() as u64;
                if let (Message::EndpointChanged(c), Some((node, eps))) = (&msg, &self.expect) {
                    assert!(c.node_id == *node && c.endpoints == *eps, "wrong change");
                    agent.changes_seen += 1;
                }
                if let Some(client) = agent.client.as_mut() {
                    client
                        .handle_message(msg)
                        .expect("client accepts the frame");
                    let mut joined = false;
                    while let Some(e) = client.poll_event() {
                        if let ClientEvent::Joined(info) = &e {
                            agent.node = Some(info.node_id);
                        }
                        joined |= e == ClientEvent::PeersChanged;
                    }
                    if joined && i >= self.sample {
                        // Thin from now on: see the module comment.
                        agent.client = None;
                    }
                    self.dirty.push(i);
                }
            }
            for i in std::mem::take(&mut self.dirty) {
                let Some(client) = self.agents[i].client.as_mut() else {
                    continue;
                };
                while let Some(m) = client.poll_transmit() {
                    moved = true;
                    let bytes = encode(&m).expect("encode");
                    let m = decode(&bytes).expect("decode").expect("whole frame");
                    let session = SessionId(i as u64 + 1);
                    self.coord.handle_message(session, m, self.now);
                }
            }
            if !moved {
                break;
            }
        }
    }

    fn join(&mut self, i: usize, token: &TokenSecret) {
        let binding = (i as u64).to_le_bytes();
        let s = self.coord.open_session(&binding, self.now);
        assert_eq!(self.index(s), i, "sessions are numbered in join order");
        let join = Join::Register {
            token_secret: token.clone(),
            name: format!("n{i}"),
        };
        self.agents.push(Agent {
            client: Some(Client::new(secret_of(i), join, &binding)),
            node: None,
            bytes: 0,
            changes_seen: 0,
        });
        self.drive();
        assert!(self.agents[i].node.is_some(), "agent {i} did not join");
    }
}

fn run_mem(n: usize, store_kind: &str, sample: usize) -> Results {
    let dir = tempfile::tempdir().expect("temp dir");
    let store: Box<dyn Store> = match store_kind {
        "mem" => Box::new(MemStore::default()),
        "sqlite" => Box::new(SqliteStore::open(&dir.path().join("state.db")).expect("sqlite")),
        other => panic!("unknown store {other}"),
    };
    let now = SystemTime::now();
    let mut coord = Coordinator::new(
        Config::default(),
        StaticSecret::from([0xc0; 32]),
        store,
        Box::new(StdRng::seed_from_u64(1)),
        now,
    )
    .expect("coordinator");
    let spec = TokenSpec {
        reusable: true,
        ..TokenSpec::default()
    };
    let (_, token) = coord.create_token(spec, now).expect("token");
    let mut m = Mem {
        coord,
        now,
        agents: Vec::with_capacity(n),
        sample,
        expect: None,
        dirty: Vec::new(),
    };
    let rss_before = my_rss_kib();
    let (t, cpu) = (Instant::now(), my_cpu());
    for i in 0..n {
        m.join(i, &token);
    }
    let storm = t.elapsed();
    let storm_cpu = my_cpu() - cpu;
    let rss_after = my_rss_kib();
    for a in &mut m.agents {
        a.bytes = 0;
    }

    let mut times = Vec::new();
    let mut cpu_total = Duration::ZERO;
    let (mut bmin, mut bmax, mut btotal) = (u64::MAX, 0, 0);
    for c in 0..CHANGES {
        let who = (c * 7919) % n;
        let eps = endpoint_for(c);
        let node = m.agents[who].node.expect("joined");
        m.expect = Some((node, eps.clone()));
        let seen_before: Vec<u64> = m.agents.iter().map(|a| a.changes_seen).collect();
        let (t, cpu) = (Instant::now(), my_cpu());
        let report = Message::EndpointReport(EndpointReport { endpoints: eps });
        let report = decode(&encode(&report).expect("encode"))
            .expect("decode")
            .expect("whole frame");
        m.coord
            .handle_message(SessionId(who as u64 + 1), report, m.now);
        m.drive();
        times.push(t.elapsed());
        cpu_total += my_cpu() - cpu;
        for (i, a) in m.agents.iter_mut().enumerate() {
            let expected = u64::from(i != who);
            assert_eq!(a.changes_seen - seen_before[i], expected, "agent {i}");
            if i != who {
                bmin = bmin.min(a.bytes);
                bmax = bmax.max(a.bytes);
            }
            btotal += a.bytes;
            a.bytes = 0;
            if let Some(client) = &a.client {
                if i != who {
                    let eps = &m.expect.as_ref().expect("set").1;
                    assert_eq!(&client.peers()[&node].endpoints, eps, "applied");
                }
            }
        }
    }
    times.sort();
    Results {
        mode: "mem".into(),
        store: store_kind.into(),
        n,
        sample,
        storm_s: storm.as_secs_f64(),
        storm_cpu_s: storm_cpu.as_secs_f64(),
        fanout_p50_ms: percentile(&times, 0.5),
        fanout_p99_ms: percentile(&times, 0.99),
        change_cpu_ms: cpu_total.as_secs_f64() * 1e3 / CHANGES as f64,
        bytes_unaffected_min: bmin,
        bytes_unaffected_max: bmax,
        bytes_total_per_change: btotal / CHANGES as u64,
        rss_before_kib: rss_before,
        rss_after_kib: rss_after,
        coord_cpu_s: storm_cpu.as_secs_f64(),
        ..Results::default()
    }
}

// ---------------------------------------------------------------- driver

fn child(args: &[&str]) -> Results {
    let exe = std::env::current_exe().expect("own path");
    let out = std::process::Command::new(exe)
        .arg("run")
        .args(args)
        .output()
        .expect("spawn benchmark child");
    assert!(
        out.status.success(),
        "child {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .expect("child printed a RESULT line");
    serde_json::from_str(line).expect("child RESULT")
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["run", "mem", n, store, sample] => {
            let r = run_mem(
                n.parse().expect("N"),
                store,
                sample.parse().expect("sample"),
            );
            println!("RESULT {}", serde_json::to_string(&r).expect("json"));
        }
        ["serve", "quic"] => quic::serve(),
        ["run", mode @ ("quic" | "quic-inproc" | "tls"), n, concurrency] => {
            let r = quic::run(
                n.parse().expect("N"),
                concurrency.parse().expect("concurrency"),
                *mode == "quic-inproc",
                if *mode == "tls" {
                    meshd_coord::net::Transport::Tcp
                } else {
                    meshd_coord::net::Transport::Quic
                },
            );
            print_server_mem(&r);
            println!("RESULT {}", serde_json::to_string(&r).expect("json"));
        }
        rest => {
            let big: usize = rest.first().and_then(|s| s.parse().ok()).unwrap_or(10_000);
            table(
                big,
                rest.contains(&"--no-quic"),
                rest.contains(&"--no-sqlite"),
            );
        }
    }
}

fn table(big: usize, no_quic: bool, no_sqlite: bool) {
    let load_start = loadavg();
    let mut runs = vec![
        child(&["mem", "1000", "mem", "0"]),
        child(&["mem", &big.to_string(), "mem", "0"]),
        child(&["mem", &big.to_string(), "mem", "20"]),
    ];
    if !no_sqlite {
        runs.push(child(&["mem", "1000", "sqlite", "0"]));
    }
    let quic = (!no_quic).then(|| child(&["quic", "1000", "100"]));
    println!(
        "load average (1/5/15 min) at start: {load_start}; at end: {}",
        loadavg()
    );
    println!();
    let head: Vec<String> = runs
        .iter()
        .map(|r| {
            let extra = if r.sample > 0 {
                format!(", {} full clients", r.sample)
            } else {
                String::new()
            };
            format!("{} N={} {}{}", r.mode, r.n, r.store, extra)
        })
        .collect();
    println!(
        "| metric | {} | target | worst / target |",
        head.join(" | ")
    );
    println!("|---|{}---|---|", "---|".repeat(runs.len()));
    let row = |name: &str, f: &dyn Fn(&Results) -> String, target: &str, ratio: String| {
        let cells: Vec<String> = runs.iter().map(f).collect();
        println!("| {name} | {} | {target} | {ratio} |", cells.join(" | "));
    };
    let at_target: Vec<&Results> = runs.iter().filter(|r| r.n >= 10_000).collect();
    let worst = |f: &dyn Fn(&Results) -> f64| at_target.iter().map(|r| f(r)).fold(0.0, f64::max);
    row(
        "join storm (all N registered, peer map received)",
        &|r| format!("{:.2} s", r.storm_s),
        "-",
        "-".into(),
    );
    row(
        "join storm CPU",
        &|r| format!("{:.2} s", r.storm_cpu_s),
        "-",
        "-".into(),
    );
    row(
        "change → applied by all others, p50",
        &|r| format!("{:.1} ms", r.fanout_p50_ms),
        "-",
        "-".into(),
    );
    row(
        "change → applied by all others, p99",
        &|r| format!("{:.1} ms", r.fanout_p99_ms),
        "≤ 2,000 ms",
        format!("{:.3}", worst(&|r| r.fanout_p99_ms) / 2000.0),
    );
    row(
        "CPU per change",
        &|r| format!("{:.1} ms", r.change_cpu_ms),
        "-",
        "-".into(),
    );
    row(
        "bytes per change to each unaffected node (min–max)",
        &|r| format!("{}–{} B", r.bytes_unaffected_min, r.bytes_unaffected_max),
        "independent of N",
        "-".into(),
    );
    row(
        "bytes per change, total",
        &|r| format!("{} B", r.bytes_total_per_change),
        "-",
        "-".into(),
    );
    row(
        "RSS growth over the storm per node",
        &|r| format!("{:.2} KiB", r.rss_per_node_kib()),
        "≤ 20 KiB",
        format!(
            "{:.3}",
            at_target
                .iter()
                .filter(|r| r.sample == 0)
                .map(|r| r.rss_per_node_kib())
                .fold(0.0, f64::max)
                / 20.0
        ),
    );
    if let Some(q) = quic {
        quic_table(&q);
    }
}

/// The QUIC server's memory per node at each point, growth since before the
/// storm.
fn print_server_mem(r: &Results) {
    let [before, ..] = r.server_mem;
    let per_node = |kib: u64, base: u64| kib.saturating_sub(base) as f64 / r.n as f64;
    for (name, m) in ["after the storm", "quiesced", "after malloc_trim"]
        .iter()
        .zip(&r.server_mem[1..])
    {
        println!(
            "server {name}: RSS {} KiB ({:.1} KiB/node), live heap {} KiB ({:.1} KiB/node, {:.0} blocks/node)",
            m.rss_kib,
            per_node(m.rss_kib, before.rss_kib),
            m.heap_kib,
            per_node(m.heap_kib, before.heap_kib),
            m.heap_blocks.saturating_sub(before.heap_blocks) as f64 / r.n as f64,
        );
    }
}

fn quic_table(r: &Results) {
    println!();
    println!("QUIC on loopback, N={}, {}:", r.n, r.store);
    println!("| metric | value |");
    println!("|---|---|");
    for (name, value) in [
        ("join storm (all N settled)", format!("{:.2} s", r.storm_s)),
        (
            "datagrams dropped on the server socket in the storm",
            r.server_udp_drops.to_string(),
        ),
        (
            "server process CPU in the storm",
            format!("{:.2} s", r.storm_cpu_s),
        ),
        (
            "coordinator core thread CPU in the storm",
            format!("{:.3} s", r.coord_cpu_s),
        ),
        (
            "agents' process CPU in the storm",
            format!("{:.2} s", r.clients_cpu_s),
        ),
        (
            "change → applied by all others, p50 / p99",
            format!("{:.1} / {:.1} ms", r.fanout_p50_ms, r.fanout_p99_ms),
        ),
        (
            "CPU per change, core thread / server process",
            format!("{:.2} / {:.1} ms", r.change_cpu_ms, r.server_change_cpu_ms),
        ),
        (
            "bytes per change per unaffected node",
            format!("{}–{} B", r.bytes_unaffected_min, r.bytes_unaffected_max),
        ),
        (
            "server RSS before / after the storm",
            format!(
                "{} / {} KiB ({:.1} KiB per node)",
                r.rss_before_kib,
                r.rss_after_kib,
                r.rss_per_node_kib()
            ),
        ),
        (
            "server RSS / live heap growth per node, quiesced",
            format!(
                "{:.1} / {:.1} KiB",
                r.server_mem[2]
                    .rss_kib
                    .saturating_sub(r.server_mem[0].rss_kib) as f64
                    / r.n as f64,
                r.server_mem[2]
                    .heap_kib
                    .saturating_sub(r.server_mem[0].heap_kib) as f64
                    / r.n as f64
            ),
        ),
    ] {
        println!("| {name} | {value} |");
    }
}

// ---------------------------------------------------------------- QUIC

mod quic {
    //! N agents, each with its own QUIC connection (its own UDP socket) to a
    //! `coord::net::Server` on 127.0.0.1, over SQLite in a temp dir as `meshd
    //! coord` runs it. The server runs in a child process of its own (`serve
    //! quic`, a multi-thread tokio runtime as `meshd coord` has), so that its
    //! CPU time and resident memory are its own; the agents share one 2-thread
    //! tokio runtime here. The coordinator core's thread ("meshd-coord") is
    //! measured apart from the server's I/O threads. `quic-inproc` runs the
    //! server in this process instead, on the agents' two tokio threads, where
    //! its endpoint competes with 2N client tasks for them: the harsher case
    //! (and the only one the figures before 2026-11-23 used).

    use std::io::{BufRead, BufReader, Lines, Write};
    use std::process::{ChildStdin, ChildStdout, Command, Stdio};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant, SystemTime};

    use meshd_coord::net::tls::{Identity, FILES};
    use meshd_coord::net::{ClientConn, Server, Transport};
    use meshd_coord::{Config, Coordinator, SqliteStore, TokenSpec};
    use meshd_proto::client::{Client, ClientEvent, Join};
    use meshd_proto::token::JoinToken;
    use meshd_proto::{encode, EndpointReport, Message};
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use tokio::sync::{mpsc, Barrier, Semaphore};

    use super::{endpoint_for, percentile, secret_of, thread_cpu, MemStats, Results, CHANGES};

    enum Note {
        /// Everything the agent's join caused has arrived: its own map and
        /// policy, and a PeerAdded for every node that joined after it.
        Settled,
        /// The agent applied change number `.0`, having received `.1` bytes
        /// since the previous one (or since it settled).
        Applied(usize, u64, Instant),
    }

    /// Starts a coordinator over SQLite in `dir` on 127.0.0.1 and makes a
    /// reusable token for it.
    async fn start_server(dir: &std::path::Path) -> (Server, JoinToken) {
        let identity = Identity::load_or_create(dir, &FILES).expect("identity");
        let static_key = identity.static_key.clone();
        let db = dir.join("state.db");
        let listen = "127.0.0.1:0".parse().expect("addr");
        let server = Server::start(&identity, listen, move |_waker| {
            Coordinator::new(
                Config::default(),
                static_key,
                Box::new(SqliteStore::open(&db)?),
                Box::new(StdRng::from_os_rng()),
                SystemTime::now(),
            )
        })
        .await
        .expect("server");
        let spec = TokenSpec {
            reusable: true,
            ..TokenSpec::default()
        };
        let (_, secret) = server
            .call(move |c, now| c.create_token(spec, now))
            .await
            .expect("call")
            .expect("token");
        let token = JoinToken {
            secret,
            cert_pin: identity.pin(),
            addresses: vec![server.quic_addr.to_string()],
        };
        (server, token)
    }

    /// The server half: starts a coordinator, prints `TOKEN <join token>`,
    /// answers `MEM` and `TRIM` lines on its standard input with a `MEM
    /// <json>` line (after `malloc_trim(0)` for `TRIM`), exits at once on
    /// `EXIT` (freeing nothing, so that a heap profiler sees what was live,
    /// e.g. `SCALE_SERVER_WRAP="heaptrack -o /tmp/coord"`), and stops when
    /// its standard input closes.
    pub fn serve() {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("meshd-coord-io")
            .build()
            .expect("tokio runtime")
            .block_on(async {
                let dir = tempfile::tempdir().expect("temp dir");
                let (server, token) = start_server(dir.path()).await;
                println!("TOKEN {}", token.encode().expect("token text"));
                std::io::stdout().flush().expect("stdout");
                tokio::task::spawn_blocking(|| {
                    for line in std::io::stdin().lock().lines().map_while(Result::ok) {
                        match line.trim() {
                            "MEM" => {}
                            "TRIM" => super::malloc_trim(),
                            "EXIT" => std::process::exit(0),
                            _ => continue,
                        }
                        let mem = serde_json::to_string(&super::my_mem()).expect("json");
                        println!("MEM {mem}");
                        std::io::stdout().flush().expect("stdout");
                    }
                })
                .await
                .expect("stdin reader");
                server.shutdown().await;
            });
    }

    /// Where the server runs, and what of it can be measured.
    struct Measured {
        /// `/proc/PID` of the process the server runs in.
        proc: String,
        port: u16,
        /// The server child's standard input and output (`serve quic`); none
        /// in process, where the heap is shared with the agents.
        ctl: Option<Mutex<(ChildStdin, Lines<BufReader<ChildStdout>>)>>,
    }

    impl Measured {
        /// The server's memory; `trim` first returns freed memory to the
        /// kernel. Blocks its thread briefly (the agents are idle then).
        fn mem(&self, trim: bool) -> MemStats {
            let Some(ctl) = &self.ctl else {
                return MemStats {
                    rss_kib: self.rss_kib(),
                    ..MemStats::default()
                };
            };
            let mut ctl = ctl.lock().expect("not poisoned");
            let (stdin, lines) = &mut *ctl;
            writeln!(stdin, "{}", if trim { "TRIM" } else { "MEM" }).expect("server stdin");
            stdin.flush().expect("server stdin");
            let line = lines
                .find_map(|l| l.ok()?.strip_prefix("MEM ").map(str::to_owned))
                .expect("the server answers MEM");
            serde_json::from_str(&line).expect("MEM json")
        }

        /// CPU time of all the threads of the server's process.
        fn cpu(&self) -> Duration {
            super::process_cpu(&format!("{}/stat", self.proc))
        }

        /// CPU time of the coordinator core's thread.
        fn core_cpu(&self) -> Duration {
            let Ok(dir) = std::fs::read_dir(format!("{}/task", self.proc)) else {
                return Duration::ZERO;
            };
            dir.flatten()
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.trim() == "meshd-coord")
                })
                .map(|t| thread_cpu(&t.path().join("schedstat").to_string_lossy()))
                .sum()
        }

        fn rss_kib(&self) -> u64 {
            super::rss_kib(&format!("{}/status", self.proc))
        }

        /// Datagrams the kernel dropped on the server's UDP socket
        /// (/proc/net/udp, the socket bound to 127.0.0.1:port).
        fn udp_drops(&self) -> u64 {
            let local = format!("0100007F:{:04X}", self.port);
            let table = std::fs::read_to_string("/proc/net/udp").unwrap_or_default();
            table
                .lines()
                .find(|l| l.split_whitespace().nth(1) == Some(local.as_str()))
                .and_then(|l| l.split_whitespace().last())
                .and_then(|d| d.parse().ok())
                .unwrap_or(0)
        }
    }

    /// `concurrency`: how many QUIC handshakes may be under way at once.
    /// `in_process`: the server shares this process and its runtime with the
    /// agents (it then competes with them for the two tokio threads).
    /// `transport`: how agents connect (the server always listens on both).
    pub fn run(n: usize, concurrency: usize, in_process: bool, transport: Transport) -> Results {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        if in_process {
            return runtime.block_on(async {
                let dir = tempfile::tempdir().expect("temp dir");
                let (server, token) = start_server(dir.path()).await;
                let at = Measured {
                    proc: "/proc/self".into(),
                    port: server.quic_addr.port(),
                    ctl: None,
                };
                let r = run_agents(&at, token, n, concurrency, transport).await;
                server.shutdown().await;
                Results {
                    mode: "quic-inproc".into(),
                    ..r
                }
            });
        }
        let exe = std::env::current_exe().expect("own path");
        // A profiler to run the server under, e.g. "heaptrack -o /tmp/coord".
        let wrap = std::env::var("SCALE_SERVER_WRAP").unwrap_or_default();
        let mut command: Vec<String> = wrap.split_whitespace().map(str::to_owned).collect();
        command.push(exe.to_string_lossy().into_owned());
        let mut child = Command::new(&command[0])
            .args(&command[1..])
            .args(["serve", "quic"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the server");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|l| l.strip_prefix("TOKEN ").map(str::to_owned))
            .expect("the server printed its token");
        let token = JoinToken::parse(&line).expect("token");
        let port = token.addresses[0]
            .parse::<std::net::SocketAddr>()
            .expect("address")
            .port();
        // Under a wrapper the server is the wrapper's child.
        let pid = if wrap.is_empty() {
            child.id()
        } else {
            server_pid_under(child.id())
        };
        let at = Measured {
            proc: format!("/proc/{pid}"),
            port,
            ctl: Some(Mutex::new((stdin, lines))),
        };
        let r = runtime.block_on(run_agents(&at, token, n, concurrency, transport));
        if !wrap.is_empty() {
            // Exit without freeing: the profiler then reports what was live.
            let mut ctl = at.ctl.as_ref().expect("set").lock().expect("not poisoned");
            let _ = writeln!(ctl.0, "EXIT");
            let _ = ctl.0.flush();
        }
        drop(at);
        let status = child.wait().expect("wait for the server");
        // A wrapper may die of SIGPIPE writing its report to the closed pipe.
        assert!(
            status.success() || !wrap.is_empty(),
            "server exited with {status}"
        );
        r
    }

    /// The process under `wrapper` that runs `scale serve quic`.
    fn server_pid_under(wrapper: u32) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            for dir in std::fs::read_dir("/proc").expect("/proc").flatten() {
                let Ok(pid) = dir.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                let cmdline = std::fs::read(dir.path().join("cmdline")).unwrap_or_default();
                let stat = std::fs::read_to_string(dir.path().join("stat")).unwrap_or_default();
                let ppid = stat
                    .rsplit_once(')')
                    .and_then(|(_, r)| r.split_whitespace().nth(1))
                    .and_then(|p| p.parse::<u32>().ok());
                let is_server = cmdline.split(|b| *b == 0).any(|a| a == b"serve");
                if is_server && (pid == wrapper || ppid == Some(wrapper)) {
                    return pid;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no server process under {wrapper}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[allow(clippy::too_many_arguments, reason = "one agent's whole setup")]
    async fn agent(
        transport: Transport,
        i: usize,
        n: usize,
        token: Arc<JoinToken>,
        start: Arc<Barrier>,
        connecting: Arc<Semaphore>,
        notes: mpsc::UnboundedSender<Note>,
        mut reports: mpsc::UnboundedReceiver<usize>,
    ) {
        start.wait().await;
        let permit = connecting.acquire().await.expect("semaphore open");
        let mut conn = ClientConn::connect(&token, transport)
            .await
            .expect("connect");
        drop(permit);
        let join = Join::Register {
            token_secret: token.secret.clone(),
            name: format!("q{i}"),
        };
        let mut client = Client::new(secret_of(i), join, conn.binding());
        // The coordinator sends a node's policy after its peer map: the last
        // node to join has every peer before its policy has arrived.
        let mut policy = false;
        let mut settled = false;
        let mut bytes = 0u64;
        loop {
            while let Some(m) = client.poll_transmit() {
                conn.send(&m).await.expect("send");
            }
            while let Some(e) = client.poll_event() {
                policy |= e == ClientEvent::PolicyChanged;
            }
            if !settled && policy && client.peers().len() == n - 1 {
                settled = true;
                bytes = 0;
                let _ = notes.send(Note::Settled);
            }
            tokio::select! {
                msg = conn.recv() => {
                    // The session ends when the benchmark shuts the server down.
                    let Ok(Some(msg)) = msg else { return };
                    bytes += encode(&msg).expect("encode").len() as u64;
                    let change = match &msg {
                        Message::EndpointChanged(c) => Some(c.endpoints[0].port() as usize - 51820),
                        _ => None,
                    };
                    client.handle_message(msg).expect("client accepts the frame");
                    if let Some(c) = change {
                        let _ = notes.send(Note::Applied(c, bytes, Instant::now()));
                        bytes = 0;
                    }
                }
                c = reports.recv() => {
                    let Some(c) = c else { return };
                    let m = Message::EndpointReport(EndpointReport { endpoints: endpoint_for(c) });
                    if conn.send(&m).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    async fn run_agents(
        server: &Measured,
        token: JoinToken,
        n: usize,
        concurrency: usize,
        transport: Transport,
    ) -> Results {
        let token = Arc::new(token);
        let mem_before = server.mem(false);
        let rss_before = mem_before.rss_kib;
        let start = Arc::new(Barrier::new(n + 1));
        let connecting = Arc::new(Semaphore::new(concurrency));
        let (notes_tx, mut notes) = mpsc::unbounded_channel();
        let mut reporters = Vec::new();
        for i in 0..n {
            let (tx, rx) = mpsc::unbounded_channel();
            reporters.push(tx);
            tokio::spawn(agent(
                transport,
                i,
                n,
                token.clone(),
                start.clone(),
                connecting.clone(),
                notes_tx.clone(),
                rx,
            ));
        }
        let (core0, server0, clients0) = (server.core_cpu(), server.cpu(), clients_cpu());
        let drops0 = server.udp_drops();
        let t = Instant::now();
        start.wait().await;
        let mut settled = 0;
        while settled < n {
            match tokio::time::timeout(Duration::from_secs(120), notes.recv()).await {
                Ok(Some(Note::Settled)) => settled += 1,
                Ok(Some(Note::Applied(..))) => {}
                _ => panic!(
                    "join storm stalled at {settled} of {n}; {} datagrams dropped on the server socket",
                    server.udp_drops() - drops0
                ),
            }
        }
        let storm = t.elapsed();
        let (core1, server1, clients1) = (server.core_cpu(), server.cpu(), clients_cpu());
        let storm_drops = server.udp_drops() - drops0;
        let mem_after = server.mem(false);
        let rss_after = mem_after.rss_kib;

        let mut times = Vec::new();
        let (mut bmin, mut bmax, mut btotal) = (u64::MAX, 0, 0);
        for c in 0..CHANGES {
            let who = (c * 7919) % n;
            let t = Instant::now();
            reporters[who].send(c).expect("agent alive");
            let mut last = t;
            for _ in 0..n - 1 {
                match tokio::time::timeout(Duration::from_secs(60), notes.recv()).await {
                    Ok(Some(Note::Applied(cc, bytes, at))) => {
                        assert_eq!(cc, c, "changes arrive in order");
                        last = last.max(at);
                        bmin = bmin.min(bytes);
                        bmax = bmax.max(bytes);
                        btotal += bytes;
                    }
                    _ => panic!("change {c} did not reach everyone"),
                }
            }
            times.push(last - t);
        }
        let (core2, server2) = (server.core_cpu(), server.cpu());
        // Acknowledgements of the last deltas are in, retransmission state freed.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let mem_quiet = server.mem(false);
        let mem_trimmed = server.mem(true);
        times.sort();
        Results {
            mode: match transport {
                Transport::Quic => "quic".into(),
                Transport::Tcp => "tls".into(),
            },
            store: format!("sqlite, {concurrency} handshakes at once"),
            n,
            sample: n,
            storm_s: storm.as_secs_f64(),
            storm_cpu_s: (server1 - server0).as_secs_f64(),
            fanout_p50_ms: percentile(&times, 0.5),
            fanout_p99_ms: percentile(&times, 0.99),
            change_cpu_ms: (core2 - core1).as_secs_f64() * 1e3 / CHANGES as f64,
            bytes_unaffected_min: bmin,
            bytes_unaffected_max: bmax,
            bytes_total_per_change: btotal / CHANGES as u64,
            rss_before_kib: rss_before,
            rss_after_kib: rss_after,
            coord_cpu_s: (core1 - core0).as_secs_f64(),
            clients_cpu_s: (clients1 - clients0).as_secs_f64(),
            server_change_cpu_ms: (server2 - server1).as_secs_f64() * 1e3 / CHANGES as f64,
            server_udp_drops: storm_drops,
            server_mem: [mem_before, mem_after, mem_quiet, mem_trimmed],
        }
    }

    /// CPU time of this process: the agents.
    fn clients_cpu() -> Duration {
        super::process_cpu("/proc/self/stat")
    }
}
