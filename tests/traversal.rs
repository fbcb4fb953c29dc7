#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
//! NAT traversal and the relays end to end, with the real `meshd` binary in
//! netlab: a coordinator and two relays on public hosts, nodes behind every
//! kind of NAT and firewall. Every pair must reach the other by the path its
//! NATs allow (the path type is asserted, not only reachability), and paths
//! must survive relays dying, a direct path breaking and the coordinator
//! going away.

use std::time::{Duration, Instant};

use meshd_netlab::mesh::{expected_path, hard_pairing, stop_pinging, Mesh, MeshSpec, RelaySpec};
use meshd_netlab::{Firewall, Host, Lab, Nat, Site, Topology};

const MESHD: &str = env!("CARGO_BIN_EXE_meshd");

fn spec(topo: &Topology) -> MeshSpec {
    MeshSpec {
        meshd: MESHD.into(),
        coordinator: "coord".into(),
        relays: ["relay1", "relay2"]
            .iter()
            .map(|h| RelaySpec {
                host: (*h).into(),
                region: (*h).into(),
            })
            .collect(),
        nodes: topo.sites.iter().flat_map(|s| s.nodes.clone()).collect(),
        log: "info".into(),
        up_args: Vec::new(),
    }
}

/// `meshd netcheck --json` on `node`.
fn netcheck(mesh: &Mesh<'_>, node: &str) -> serde_json::Value {
    let state = mesh.dir().join(node).display().to_string();
    let out = mesh
        .lab()
        .exec(node, &[MESHD, "netcheck", "--json", "--state", &state])
        .unwrap()
        .ok()
        .unwrap();
    serde_json::from_str(&out).unwrap()
}

#[test]
fn every_pair_takes_the_path_its_nats_allow() {
    let topo = Topology::new()
        .host("coord")
        .host("relay1")
        .host(Host::new("relay2").latency_ms(40))
        .site(Site::new("cloud", ["open1"]))
        .site(Site::new("home1", ["eim1"]).nat(Nat::EndpointIndependent))
        .site(Site::new("home2", ["eim2"]).nat(Nat::EndpointIndependent))
        .site(Site::new("cgn1", ["sym1"]).nat(Nat::Symmetric))
        .site(Site::new("cgn2", ["sym2"]).nat(Nat::Symmetric))
        .site(
            Site::new("corp", ["tcp1"])
                .nat(Nat::EndpointIndependent)
                .firewall(Firewall::UdpBlocked),
        );
    let lab = Lab::up(&topo).unwrap();
    let mesh = Mesh::up(&lab, spec(&topo)).unwrap();
    let nodes: Vec<(&str, &Site)> = topo
        .sites
        .iter()
        .flat_map(|s| s.nodes.iter().map(move |n| (n.as_str(), s)))
        .collect();
    let mut report = String::new();
    for &(a, sa) in &nodes {
        for &(b, sb) in &nodes {
            if a == b {
                continue;
            }
            let want = expected_path(sa, sb);
            let kind = want.trim_end_matches("-tls");
            // The birthday technique usually finds a direct path where
            // only the relay is sure.
            let ok = |k: &str| k == kind || (k == "direct" && hard_pairing(sa, sb));
            lab.wait_until(
                &format!("{a} → {b}: {want}"),
                Duration::from_secs(30),
                || mesh.path(a, b).is_ok_and(|p| ok(&p.kind)),
            )
            .unwrap_or_else(|e| panic!("{e}: {:?}", mesh.path(a, b)));
            let rtts = mesh.ping(a, b, 3).unwrap();
            assert_eq!(rtts.len(), 3, "{a} → {b} lost pings over {want}");
            let path = mesh.path(a, b).unwrap();
            report.push_str(&format!("{a} → {b}: {} {}\n", path.kind, path.via));
        }
    }
    eprintln!("{report}");
    // The node behind the UDP-blocking firewall is relayed over TLS/TCP,
    // and knows UDP is blocked; the others use QUIC.
    let n = netcheck(&mesh, "tcp1");
    assert_eq!(n["udp"], false, "{n}");
    assert_eq!(n["home_relay_transport"], "TLS/TCP", "{n}");
    let n = netcheck(&mesh, "sym1");
    assert_eq!(n["udp"], true, "{n}");
    assert_eq!(n["mapping_varies_by_destination"], true, "{n}");
    assert_eq!(n["home_relay_transport"], "QUIC", "{n}");
    // relay2 is 40 ms further away: everyone homes on relay1.
    assert_eq!(n["home_relay"], "relay1", "{n}");
    let n = netcheck(&mesh, "eim1");
    assert_eq!(n["mapping_varies_by_destination"], false, "{n}");
    assert!(
        n["public_address"]
            .as_str()
            .unwrap()
            .starts_with(&lab.addr("home1").unwrap().to_string()),
        "{n}"
    );
}

/// Waits until `from` → `to` answers a ping; how long that took. Each try
/// waits 300 ms for its answer, so a ping lost before the path came back
/// does not add ping's own 10 s wait to the figure.
fn time_until_reachable(mesh: &Mesh<'_>, from: &str, to: &str, timeout: Duration) -> Duration {
    let start = Instant::now();
    let target = mesh.mesh_ip(to).unwrap().to_string();
    mesh.lab()
        .wait_until(&format!("{from} to reach {to}"), timeout, || {
            mesh.lab()
                .exec(from, &["ping", "-n", "-c", "1", "-W", "0.3", &target])
                .is_ok_and(|o| o.status.success())
        })
        .unwrap();
    start.elapsed()
}

#[test]
fn paths_survive_relays_dying_a_broken_direct_path_and_the_coordinator_leaving() {
    let topo = Topology::new()
        .host("coord")
        .host("relay1")
        .host(Host::new("relay2").latency_ms(40))
        .site(Site::new("left", ["l1"]).nat(Nat::EndpointIndependent))
        .site(Site::new("right", ["r1"]).nat(Nat::EndpointIndependent))
        .site(Site::new("cgn1", ["c1"]).nat(Nat::Symmetric))
        .site(Site::new("cgn2", ["c2"]).nat(Nat::Symmetric));
    let lab = Lab::up(&topo).unwrap();
    let mut mesh = Mesh::up(&lab, spec(&topo)).unwrap();
    let secs = Duration::from_secs;
    mesh.wait_path("l1", "r1", "direct", secs(20)).unwrap();
    mesh.wait_path("r1", "l1", "direct", secs(20)).unwrap();
    mesh.wait_path("c1", "c2", "relay", secs(20)).unwrap();

    // A direct path breaks: traffic falls back to the relay within 3 s, and
    // returns to the direct path once it works again.
    let right = lab.addr("right").unwrap();
    let p = mesh.start_pinging("l1", "r1", "ping-break").unwrap();
    time_until_reachable(&mesh, "l1", "r1", secs(5));
    lab.block_udp("left", right).unwrap();
    let fell_back = mesh.wait_path("l1", "r1", "relay", secs(10)).unwrap();
    assert!(fell_back < secs(4), "fell back after {fell_back:?}");
    std::thread::sleep(secs(2)); // traffic flows over the relay meanwhile
    let (sent, received) = stop_pinging(p);
    let lost = sent - received;
    // At 10 pings a second: the gap in traffic, in tenths of a second.
    assert!(
        lost <= 30,
        "{lost} of {sent} pings lost when the direct path broke"
    );
    eprintln!("direct path broken: relayed after {fell_back:?}, {lost} of {sent} pings lost");
    lab.unblock_udp("left").unwrap();
    let back = mesh.wait_path("l1", "r1", "direct", secs(40)).unwrap();
    eprintln!("direct again {back:?} after the block was lifted");

    // The coordinator goes away: existing paths keep working, and a relayed
    // pair can still upgrade to direct (their disco runs through the relay).
    mesh.kill_coordinator();
    lab.block_udp("left", right).unwrap();
    mesh.wait_path("l1", "r1", "relay", secs(10)).unwrap();
    assert_eq!(mesh.ping("l1", "r1", 3).unwrap().len(), 3);
    assert_eq!(mesh.ping("c1", "c2", 3).unwrap().len(), 3);
    // A relayed node restarted meanwhile comes back from its cached peer and
    // relay maps: relayed again without the coordinator.
    mesh.restart_node("c1").unwrap();
    let back = time_until_reachable(&mesh, "c1", "c2", secs(15));
    eprintln!("c1 restarted without the coordinator: relayed to c2 again after {back:?}");
    assert_eq!(mesh.path("c1", "c2").unwrap().kind, "relay");
    lab.unblock_udp("left").unwrap();
    mesh.wait_path("l1", "r1", "direct", secs(40)).unwrap();

    // The home relay dies while c1 and c2 are relayed: they move to the
    // other region within seconds.
    let p = mesh
        .start_pinging("c1", "c2", "ping-relay-failover")
        .unwrap();
    time_until_reachable(&mesh, "c1", "c2", secs(5));
    mesh.kill_relay("relay1");
    let start = Instant::now();
    lab.wait_until("c1 and c2 to home on relay2", secs(15), || {
        ["c1", "c2"]
            .iter()
            .all(|n| mesh.status(n).is_ok_and(|s| s["home_relay"] == "relay2"))
    })
    .unwrap();
    time_until_reachable(&mesh, "c1", "c2", secs(15));
    let moved = start.elapsed();
    let (sent, received) = stop_pinging(p);
    eprintln!(
        "relay1 killed: c1 → c2 through relay2 after {moved:?}, {} of {sent} pings lost",
        sent - received
    );
    assert!(
        moved < secs(10),
        "relayed pair took {moved:?} to move to relay2"
    );
    assert_eq!(mesh.path("c1", "c2").unwrap().via, "relay2");

    // The last relay dies while l1 and r1 talk directly: nothing is lost.
    let p = mesh.start_pinging("l1", "r1", "ping-direct").unwrap();
    time_until_reachable(&mesh, "l1", "r1", secs(5));
    std::thread::sleep(Duration::from_millis(500));
    mesh.kill_relay("relay2");
    std::thread::sleep(secs(3));
    let (sent, received) = stop_pinging(p);
    assert!(sent >= 30, "{sent}");
    assert!(
        sent - received <= 1,
        "{} of {sent} lost on a direct path when the relay died",
        sent - received
    );
    assert_eq!(mesh.path("l1", "r1").unwrap().kind, "direct");
}

#[test]
fn a_node_that_leaves_the_mesh_is_cut_from_its_relay() {
    let topo = Topology::new()
        .host("coord")
        .host("relay1")
        .site(Site::new("cgn1", ["c1"]).nat(Nat::Symmetric))
        .site(Site::new("cgn2", ["c2"]).nat(Nat::Symmetric));
    let lab = Lab::up(&topo).unwrap();
    // One relay: which of two a node homes on is the latency race's business.
    let mut one_relay = spec(&topo);
    one_relay.relays.truncate(1);
    let mesh = Mesh::up(&lab, one_relay).unwrap();
    mesh.wait_path("c1", "c2", "relay", Duration::from_secs(20))
        .unwrap();
    assert_eq!(mesh.ping("c1", "c2", 3).unwrap().len(), 3);
    let clients = |m: &Mesh<'_>| {
        let c = m.relay_counters("relay1").unwrap();
        c["clients_quic"].as_u64().unwrap() + c["clients_tls"].as_u64().unwrap()
    };
    lab.wait_until("both nodes on relay1", Duration::from_secs(10), || {
        clients(&mesh) == 2
    })
    .unwrap();
    // Expired by the operator (with its token revoked, so that it cannot
    // register again): the relay hears it from the coordinator and cuts the
    // node's connection within seconds; nothing reaches it any more.
    let tokens: serde_json::Value =
        serde_json::from_str(&mesh.admin(&["tokens", "list", "--json"]).unwrap()).unwrap();
    for t in tokens["tokens"].as_array().unwrap() {
        mesh.admin(&["tokens", "revoke", t["id"].as_str().unwrap()])
            .unwrap();
    }
    let id = mesh.status("c2").unwrap()["node_id"]
        .as_u64()
        .unwrap()
        .to_string();
    let start = Instant::now();
    mesh.admin(&["nodes", "expire", &id]).unwrap();
    lab.wait_until("relay1 to cut c2", Duration::from_secs(10), || {
        mesh.relay_counters("relay1")
            .is_ok_and(|c| c["cut_removed"].as_u64() >= Some(1))
    })
    .unwrap();
    let cut = start.elapsed();
    eprintln!("expired node cut from the relay after {cut:?}");
    assert!(cut < Duration::from_secs(5), "{cut:?}");
    // Its reconnections are refused: it never counts as a client again.
    lab.wait_until("relay1 to refuse c2", Duration::from_secs(15), || {
        mesh.relay_counters("relay1")
            .is_ok_and(|c| c["refused"].as_u64() >= Some(1))
    })
    .unwrap();
    assert_eq!(clients(&mesh), 1);
    assert!(mesh.ping("c1", "c2", 2).unwrap().is_empty());
}
