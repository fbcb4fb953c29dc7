//! netlab behaviour, proven in real namespaces (needs root; fails without it).
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use meshd_netlab::tools::{self, TcpAcceptor, UdpReflector};
use meshd_netlab::{registry, Firewall, Lab, Nat, Site, Topology, RESOLVER_ADDR};

const SHORT: Duration = Duration::from_millis(700);
const ANSWER: Duration = Duration::from_secs(3);

fn nat_lab() -> Lab {
    Lab::up(
        &Topology::new()
            .host("refl1")
            .host("refl2")
            .site(Site::new("home", ["eim1"]).nat(Nat::EndpointIndependent))
            .site(Site::new("carrier", ["sym1"]).nat(Nat::Symmetric))
            .site(Site::new("dc", ["pub1"])),
    )
    .expect("lab up")
}

fn mapped(lab: &Lab, node: &str, port: u16, servers: &[&UdpReflector]) -> Vec<SocketAddr> {
    let sock = tools::udp_socket(lab, node, port).unwrap();
    servers
        .iter()
        .map(|r| {
            let text = tools::udp_ask(&sock, r.addr(), ANSWER)
                .unwrap_or_else(|| panic!("{node}: no answer from {}", r.addr()));
            text.parse().unwrap()
        })
        .collect()
}

#[test]
fn endpoint_independent_nat_keeps_one_mapping_and_symmetric_does_not() {
    let lab = nat_lab();
    let r1 = UdpReflector::start(&lab, "refl1", 3478).unwrap();
    let r2 = UdpReflector::start(&lab, "refl2", 3478).unwrap();
    // Another port of the same host is another destination.
    let r1b = UdpReflector::start(&lab, "refl1", 3479).unwrap();
    let servers = [&r1, &r2, &r1b, &r1];

    let eim = mapped(&lab, "eim1", 40000, &servers);
    let home = SocketAddr::from((lab.addr("home").unwrap(), 40000));
    assert_eq!(
        eim,
        vec![home; 4],
        "behind endpoint-independent NAT every destination sees one mapping, the router's \
         address and the socket's port"
    );

    let sym = mapped(&lab, "sym1", 40000, &servers);
    assert!(sym.iter().all(|m| m.ip() == lab.addr("carrier").unwrap()));
    assert!(
        sym[0].port() != sym[1].port()
            && sym[0].port() != sym[2].port()
            && sym[1].port() != sym[2].port(),
        "behind symmetric NAT each destination address and port gets its own port: {sym:?}"
    );
    assert_eq!(sym[3], sym[0], "a destination seen again keeps its mapping");

    let public = mapped(&lab, "pub1", 40000, &[&r1, &r2]);
    let itself = SocketAddr::from((lab.addr("pub1").unwrap(), 40000));
    assert_eq!(public, vec![itself; 2], "no NAT: seen as itself");
}

#[test]
fn unsolicited_inbound_udp_to_a_natted_node_is_dropped() {
    let lab = nat_lab();
    let r1 = UdpReflector::start(&lab, "refl1", 3478).unwrap();
    let stranger = tools::udp_socket(&lab, "refl2", 5555).unwrap();
    let same_host_other_port = tools::udp_socket(&lab, "refl1", 5556).unwrap();
    for name in ["eim1", "sym1"] {
        let node = tools::udp_socket(&lab, name, 40001).unwrap();
        let seen: SocketAddr = tools::udp_ask(&node, r1.addr(), ANSWER)
            .unwrap()
            .parse()
            .unwrap();

        // The mapping exists, but only the reflector's own address and port may use it.
        stranger.send_to(b"knock", seen).unwrap();
        same_host_other_port.send_to(b"knock", seen).unwrap();
        // The node's private address is not routed on the internet at all.
        let _ = stranger.send_to(b"knock", (lab.addr(name).unwrap(), 40001));
        assert!(
            !tools::udp_receives(&node, SHORT),
            "unsolicited datagram reached {name} behind NAT"
        );
        // Positive control: the reflector itself still gets through.
        assert!(tools::udp_ask(&node, r1.addr(), ANSWER).is_some());
    }

    // Positive control: a public node is reachable.
    let public = tools::udp_socket(&lab, "pub1", 40002).unwrap();
    stranger
        .send_to(b"hello", (lab.addr("pub1").unwrap(), 40002))
        .unwrap();
    assert!(
        tools::udp_receives(&public, ANSWER),
        "a node with a public address must be reachable"
    );
}

/// The public address a reflector saw `sock` send from.
fn seen_by(sock: &UdpSocket, reflector: &UdpReflector) -> SocketAddr {
    let text = tools::udp_ask(sock, reflector.addr(), ANSWER)
        .unwrap_or_else(|| panic!("no answer from the reflector at {}", reflector.addr()));
    text.parse()
        .unwrap_or_else(|_| panic!("the reflector's answer {text:?} is not an address"))
}

/// The UDP entries of a router's connection tracking table, one per line.
fn conntrack(lab: &Lab, site: &str) -> String {
    lab.exec(site, &["conntrack", "-L", "-p", "udp"])
        .unwrap()
        .ok()
        .unwrap_or_else(|e| panic!("{e} (scripts/install-deps installs conntrack)"))
}

#[test]
fn unsolicited_datagrams_to_a_router_do_not_move_mappings() {
    let lab = Lab::up(
        &Topology::new()
            .host("refl1")
            .host("refl2")
            .site(Site::new("home", ["eim1"]).nat(Nat::EndpointIndependent)),
    )
    .unwrap();
    let wan = lab.addr("home").unwrap();
    let r1 = UdpReflector::start(&lab, "refl1", 3478).unwrap();
    let node = tools::udp_socket(&lab, "eim1", 40000).unwrap();
    let mapped = seen_by(&node, &r1);
    assert_eq!(mapped, SocketAddr::from((wan, 40000)));

    // Another public host knocks on the router's WAN address: on the mapped port, on the port
    // the node's next socket will use, and on one no node uses; from the port its reflector
    // will answer on and from another. Each knock is a remote the node may later send to.
    let knocks: Vec<UdpSocket> = [3478, 5555]
        .into_iter()
        .map(|p| tools::udp_socket(&lab, "refl2", p).unwrap())
        .collect();
    for k in &knocks {
        for port in [40000, 40001, 9] {
            k.send_to(b"knock", (wan, port)).unwrap();
        }
    }
    lab.wait_until("the router to drop the 6 knocks", ANSWER, || {
        lab.wan_input_drops("home").unwrap() >= 6
    })
    .unwrap();
    let table = conntrack(&lab, "home");
    let stranger = lab.addr("refl2").unwrap();
    assert!(
        !table.contains(&format!("src={stranger} ")),
        "the knocks left connection-tracking entries that hold public ports:\n{table}"
    );
    drop(knocks);

    // The node's flows to the knocker keep the node's mapping. The knocks'
    // port may be held a moment longer by a child another test is forking
    // (its copy of our descriptors lives until it execs).
    let mut r2 = None;
    lab.wait_until("refl2's port 3478 to be free", ANSWER, || {
        r2 = UdpReflector::start(&lab, "refl2", 3478).ok();
        r2.is_some()
    })
    .unwrap();
    let r2 = r2.unwrap();
    assert_eq!(
        seen_by(&node, &r2),
        mapped,
        "a knock on the mapped port moved the mapping"
    );
    assert_eq!(seen_by(&node, &r1), mapped);
    let next = tools::udp_socket(&lab, "eim1", 40001).unwrap();
    assert_eq!(
        seen_by(&next, &r2),
        SocketAddr::from((wan, 40001)),
        "a knock on a free port moved the next socket's mapping"
    );
}

/// How often each side of a hole punch sends a probe, and how long it may take once both send.
const PROBE_EVERY: Duration = Duration::from_millis(10);
const PUNCH_WITHIN: Duration = Duration::from_secs(2);

/// One side of a hole punch: its socket and the other side's public mapping.
type Punch<'a> = (&'a UdpSocket, SocketAddr);

/// Each side sends a probe to the other's public mapping every PROBE_EVERY until both have
/// received one from the other's mapping, `second` starting `head_start` after `first`'s first
/// probe. Returns whether `first` and `second` heard the other within PUNCH_WITHIN.
fn punch(first: Punch<'_>, second: Punch<'_>, head_start: Duration) -> [bool; 2] {
    let heard = [AtomicBool::new(false), AtomicBool::new(false)];
    let both = || heard.iter().all(|h| h.load(Ordering::Relaxed));
    let (started, go) = mpsc::channel();
    let mut go = Some(go);
    std::thread::scope(|s| {
        for (me, (sock, peer)) in [first, second].into_iter().enumerate() {
            let (heard, both, started) = (&heard, &both, started.clone());
            let go = if me == 1 { go.take() } else { None };
            s.spawn(move || {
                if let Some(go) = go {
                    let _ = go.recv();
                    std::thread::sleep(head_start); // the one deliberate delay
                }
                sock.set_read_timeout(Some(PROBE_EVERY)).unwrap();
                let deadline = Instant::now() + PUNCH_WITHIN;
                let mut buf = [0u8; 64];
                while !both() && Instant::now() < deadline {
                    sock.send_to(b"punch", peer).unwrap();
                    let _ = started.send(());
                    if let Ok((_, from)) = sock.recv_from(&mut buf) {
                        if from == peer {
                            heard[me].store(true, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
    heard.map(AtomicBool::into_inner)
}

#[test]
fn endpoint_independent_sites_punch_through_whoever_starts_first() {
    let lab = Lab::up(
        &Topology::new()
            .host("refl")
            .site(Site::new("west", ["w1"]).nat(Nat::EndpointIndependent))
            .site(Site::new("east", ["e1"]).nat(Nat::EndpointIndependent)),
    )
    .unwrap();
    let r = UdpReflector::start(&lab, "refl", 3478).unwrap();
    const TRIALS: usize = 20;
    let mut report = Vec::new();
    // 100 ms head start for either side, then random head starts of 0–100 ms for a random side.
    for order in ["west first", "east first", "random"] {
        let mut punched = 0;
        for _ in 0..TRIALS {
            // Fresh sockets (new ports, new mappings): trials share no NAT state.
            let w = tools::udp_socket(&lab, "w1", 0).unwrap();
            let e = tools::udp_socket(&lab, "e1", 0).unwrap();
            let (wm, em) = (seen_by(&w, &r), seen_by(&e, &r));
            let (west_first, head_start) = match order {
                "west first" => (true, Duration::from_millis(100)),
                "east first" => (false, Duration::from_millis(100)),
                _ => (
                    rand::random_bool(0.5),
                    Duration::from_millis(rand::random_range(0..=100)),
                ),
            };
            let heard = if west_first {
                punch((&w, em), (&e, wm), head_start)
            } else {
                punch((&e, wm), (&w, em), head_start)
            };
            punched += usize::from(heard == [true, true]);
        }
        report.push(format!("{order}: {punched} of {TRIALS}"));
    }
    let all = format!("{TRIALS} of {TRIALS}");
    assert!(
        report.iter().all(|r| r.ends_with(&all)),
        "hole punches that got datagrams both ways: {}",
        report.join(", ")
    );
}

#[test]
fn nat_mappings_live_30_s_unreplied_and_120_s_replied() {
    let lab = Lab::up(
        &Topology::new()
            .host("refl")
            .site(Site::new("home", ["n1"]).nat(Nat::EndpointIndependent)),
    )
    .unwrap();
    let r = UdpReflector::start(&lab, "refl", 3478).unwrap();
    let sock = tools::udp_socket(&lab, "n1", 40000).unwrap();
    // Seconds left of the router's entry for the node's flow to `dport`, and its flags.
    let entry = |dport: u16| {
        let table = conntrack(&lab, "home");
        let line = table
            .lines()
            .find(|l| l.contains("sport=40000 ") && l.contains(&format!("dport={dport} ")))
            .unwrap_or_else(|| panic!("no entry for the flow to port {dport}:\n{table}"))
            .to_owned();
        let secs: u64 = line.split_whitespace().nth(2).unwrap().parse().unwrap();
        (secs, line)
    };

    // Nobody answers on port 9: the mapping has seen no reply.
    sock.send_to(b"hello?", (lab.addr("refl").unwrap(), 9))
        .unwrap();
    lab.wait_until("the router to map the flow", ANSWER, || {
        conntrack(&lab, "home").contains("dport=9 ")
    })
    .unwrap();
    let (secs, line) = entry(9);
    assert!(
        line.contains("[UNREPLIED]") && (20..=30).contains(&secs),
        "{line}"
    );

    // Traffic both ways: 30 s at first, 120 s once a packet crosses it more than 2 s after
    // its first (conntrack's UDP stream rule).
    let first = Instant::now();
    seen_by(&sock, &r);
    let (secs, line) = entry(3478);
    assert!(
        !line.contains("[UNREPLIED]") && (20..=30).contains(&secs),
        "{line}"
    );
    lab.wait_until(
        "the replied mapping to be kept 120 s",
        Duration::from_secs(10),
        || {
            seen_by(&sock, &r);
            entry(3478).0 > 30
        },
    )
    .unwrap();
    let (secs, line) = entry(3478);
    assert!((110..=120).contains(&secs), "{line}");
    assert!(first.elapsed() >= Duration::from_secs(2), "{line}");
}

#[test]
fn firewalls_block_what_they_say_and_pass_the_rest() {
    let lab = Lab::up(
        &Topology::new()
            .host("srv")
            .site(
                Site::new("corp", ["udpb"])
                    .nat(Nat::EndpointIndependent)
                    .firewall(Firewall::UdpBlocked),
            )
            .site(Site::new("strict", ["https"]).firewall(Firewall::HttpsOnly))
            .site(Site::new("open", ["free"]).nat(Nat::EndpointIndependent)),
    )
    .unwrap();
    let srv = lab.addr("srv").unwrap();
    let _tls = TcpAcceptor::start(&lab, "srv", 443).unwrap();
    let _web = TcpAcceptor::start(&lab, "srv", 80).unwrap();
    let udp = UdpReflector::start(&lab, "srv", 3478).unwrap();
    let dns_elsewhere = UdpReflector::start(&lab, "srv", 53).unwrap();
    let resolver =
        UdpReflector::start_at(&lab, "inet", SocketAddr::from((RESOLVER_ADDR, 53))).unwrap();

    let tcp = |node: &str, port: u16| {
        tools::tcp_connects(&lab, node, SocketAddr::from((srv, port)), SHORT).unwrap()
    };
    let udp_ok = |node: &str, to: SocketAddr| {
        let s = tools::udp_socket(&lab, node, 0).unwrap();
        tools::udp_ask(&s, to, SHORT).is_some()
    };

    // udp-blocked: all TCP passes, UDP only to the lab resolver's port 53.
    assert!(tcp("udpb", 443) && tcp("udpb", 80));
    assert!(!udp_ok("udpb", udp.addr()), "UDP left a udp-blocked site");
    assert!(
        !udp_ok("udpb", dns_elsewhere.addr()),
        "UDP/53 to a non-resolver left a udp-blocked site"
    );
    assert!(
        udp_ok("udpb", resolver.addr()),
        "DNS to the lab resolver must pass"
    );

    // https-only: TCP 443 and nothing else, not even ICMP or DNS.
    assert!(tcp("https", 443));
    assert!(!tcp("https", 80), "TCP 80 left an https-only site");
    assert!(!udp_ok("https", udp.addr()) && !udp_ok("https", resolver.addr()));
    let ping = lab
        .exec("https", &["ping", "-c", "1", "-W", "1", &srv.to_string()])
        .unwrap();
    assert!(!ping.status.success(), "ICMP left an https-only site");

    // Control: an open site passes all of it.
    assert!(tcp("free", 80) && udp_ok("free", udp.addr()));
}

#[test]
fn processes_run_inside_nodes_with_logs_and_exec_collects_output() {
    let lab = Lab::up(
        &Topology::new()
            .host("a")
            .site(Site::new("s", ["n1"]).nat(Nat::EndpointIndependent)),
    )
    .unwrap();
    let out = lab
        .exec("n1", &["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
        .unwrap()
        .ok()
        .unwrap();
    assert!(out.contains(&lab.addr("n1").unwrap().to_string()), "{out}");

    let mut p = lab
        .spawn(
            "a",
            "talker",
            &[
                "sh",
                "-c",
                "echo started; ip -o -4 addr show dev eth0; sleep 30",
            ],
        )
        .unwrap();
    lab.wait_until("the talker to print", Duration::from_secs(5), || {
        p.log().contains("198.18.")
    })
    .unwrap();
    assert!(p.log_path().starts_with(lab.log_dir()));
    assert!(p.try_wait().is_none());
    p.stop(Duration::from_secs(2));
    assert!(p.try_wait().is_some());

    let err = lab.exec("nope", &["true"]).unwrap_err().to_string();
    assert!(err.contains("no node") && err.contains("n1"), "{err}");
    let err = lab
        .wait_until(
            "something that never happens",
            Duration::from_millis(50),
            || false,
        )
        .unwrap_err();
    assert!(
        err.to_string()
            .contains(&lab.log_dir().display().to_string()),
        "timeouts say where the logs are"
    );
}

#[test]
fn teardown_removes_everything_on_drop_and_on_panic() {
    let lab = Lab::up(
        &Topology::new()
            .host("a")
            .site(Site::new("s", ["n1"]).latency_ms(5)),
    )
    .unwrap();
    let id = lab.id().to_owned();
    let _sleeper = lab.spawn("n1", "sleeper", &["sleep", "600"]).unwrap();
    assert_eq!(registry::namespaces()[&id].len(), 4, "inet, a, s, n1");
    drop(lab);
    assert!(
        !registry::namespaces().contains_key(&id),
        "namespaces left after drop"
    );
    assert!(!std::path::Path::new(registry::STATE_DIR).join(&id).exists());

    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::thread::spawn(move || {
        let lab = Lab::up(&Topology::new().host("a")).unwrap();
        tx.send(lab.id().to_owned()).unwrap();
        panic!("a failing test");
    })
    .join();
    assert!(result.is_err());
    let id = rx.recv().unwrap();
    assert!(
        !registry::namespaces().contains_key(&id),
        "namespaces left after a panic"
    );
}

#[test]
fn parallel_labs_do_not_collide() {
    let topo = Topology::new()
        .host("coord")
        .site(Site::new("edge", ["edge1"]).nat(Nat::EndpointIndependent));
    let labs: Vec<Lab> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| Lab::up(&topo).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut ids: Vec<&str> = labs.iter().map(Lab::id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 4);
    // Same names and addresses in every lab, and each lab's traffic stays in it.
    for lab in &labs {
        let r = UdpReflector::start(lab, "coord", 3478).unwrap();
        let s = tools::udp_socket(lab, "edge1", 0).unwrap();
        assert!(tools::udp_ask(&s, r.addr(), ANSWER).is_some());
    }
}

#[test]
fn nodes_of_one_site_reach_each_other_on_their_private_addresses() {
    let lab = Lab::up(
        &Topology::new()
            .host("h")
            .site(Site::new("home", ["a1", "a2", "a3"]).nat(Nat::EndpointIndependent)),
    )
    .unwrap();
    let r = UdpReflector::start(&lab, "a2", 7000).unwrap();
    let s = tools::udp_socket(&lab, "a1", 7001).unwrap();
    let seen: SocketAddr = tools::udp_ask(&s, r.addr(), ANSWER)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        seen,
        SocketAddr::from((lab.addr("a1").unwrap(), 7001)),
        "no NAT inside a site"
    );
    let ping = lab
        .exec(
            "a3",
            &[
                "ping",
                "-c",
                "1",
                "-W",
                "2",
                &lab.addr("a1").unwrap().to_string(),
            ],
        )
        .unwrap();
    assert!(ping.status.success(), "{}", ping.stdout);
}
