#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
//! Hard-NAT traversal end to end, with the real `meshd` binary in netlab:
//! a node behind an endpoint-independent NAT (Linux masquerade) and one
//! behind a symmetric NAT (masquerade fully-random: a new random public
//! port per destination), both filtering per address and port. Only the
//! birthday technique gets them direct (docs/disco-protocol.md). Each trial
//! is a fresh lab, so the ports are drawn anew; the test asserts what holds
//! every time — the relay carries traffic whatever happens, and a birthday
//! hit ends direct both ways and carries pings — and prints how many trials
//! ended direct.

use std::time::{Duration, Instant};

use meshd_netlab::mesh::{stop_pinging, Mesh, MeshSpec, RelaySpec};
use meshd_netlab::{Lab, Nat, Site, Topology};

const MESHD: &str = env!("CARGO_BIN_EXE_meshd");
const TRIALS: usize = 5;

/// An endpoint-independent NAT and a symmetric one, a coordinator and a relay.
fn topology() -> Topology {
    Topology::new()
        .host("coord")
        .host("relay1")
        .site(Site::new("home", ["easy"]).nat(Nat::EndpointIndependent))
        .site(Site::new("cgn", ["hard"]).nat(Nat::Symmetric))
}

fn spec(up_args: &[&str]) -> MeshSpec {
    MeshSpec {
        meshd: MESHD.into(),
        coordinator: "coord".into(),
        relays: vec![RelaySpec {
            host: "relay1".into(),
            region: "relay1".into(),
        }],
        nodes: vec!["easy".into(), "hard".into()],
        log: "info".into(),
        up_args: up_args.iter().map(|a| (*a).to_owned()).collect(),
    }
}

#[test]
fn an_endpoint_independent_nat_reaches_a_symmetric_one_by_the_birthday_technique() {
    let secs = Duration::from_secs;
    let mut report: Vec<bool> = Vec::new();
    for trial in 0..TRIALS {
        let lab = Lab::up(&topology()).unwrap();
        let mesh = Mesh::up(&lab, spec(&[])).unwrap();
        let start = Instant::now();
        // The relay carries traffic at once, attempt or not.
        lab.wait_until("easy to reach hard", secs(15), || {
            mesh.ping("easy", "hard", 1).is_ok_and(|r| r.len() == 1)
        })
        .unwrap();
        // Traffic flows through the attempt: the relay carries it until a
        // direct path is proven, and nothing is switched before that.
        let p = mesh.start_pinging("easy", "hard", "ping").unwrap();
        // An attempt starts 2 s after the peers meet and ends within 8 s.
        let direct = mesh.wait_path("hard", "easy", "direct", secs(20)).is_ok();
        std::thread::sleep(secs(1));
        let (sent, received) = stop_pinging(p);
        let lost = sent - received;
        assert!(
            lost <= 5,
            "trial {trial}: {lost} of {sent} pings lost during the attempt"
        );
        let log = std::fs::read_to_string(lab.log_dir().join("hard.up.log")).unwrap_or_default();
        let hit = log.contains("birthday hit");
        let sockets = log.contains("birthday: sockets open");
        assert!(
            sockets,
            "trial {trial}: the hard side never opened its sockets:\n{log}"
        );
        if direct {
            assert!(hit, "trial {trial}: direct without a birthday hit");
            mesh.wait_path("easy", "hard", "direct", secs(5)).unwrap();
            let rtts = mesh.ping("easy", "hard", 3).unwrap();
            assert_eq!(
                rtts.len(),
                3,
                "trial {trial}: pings lost on the direct path"
            );
            let rtts = mesh.ping("hard", "easy", 3).unwrap();
            if !report.contains(&true) {
                // The first time: the path holds, heartbeats and WireGuard
                // leaving from the winning socket's port.
                let p = mesh.start_pinging("hard", "easy", "ping").unwrap();
                std::thread::sleep(secs(10));
                let (sent, received) = stop_pinging(p);
                assert!(sent - received <= 1, "{received} of {sent} pings over 10 s");
                assert_eq!(mesh.path("hard", "easy").unwrap().kind, "direct");
                assert_eq!(mesh.path("easy", "hard").unwrap().kind, "direct");
            }
            assert_eq!(
                rtts.len(),
                3,
                "trial {trial}: pings lost on the direct path"
            );
        } else {
            assert_eq!(
                mesh.path("hard", "easy").unwrap().kind,
                "relay",
                "trial {trial}"
            );
        }
        // Whatever happened, traffic flows (over the relay if need be).
        assert_eq!(
            mesh.ping("easy", "hard", 3).unwrap().len(),
            3,
            "trial {trial}"
        );
        let path = mesh.path("hard", "easy").unwrap();
        let probes = std::fs::read_to_string(lab.log_dir().join("easy.up.log"))
            .unwrap_or_default()
            .lines()
            .find(|l| l.contains("birthday: probing ended"))
            .and_then(|l| {
                l.split("probes=")
                    .nth(1)?
                    .split(' ')
                    .next()
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        eprintln!(
            "trial {trial}: {} {} after {:?}, {probes} probes (hit: {hit}), \
             {lost} of {sent} pings lost meanwhile",
            path.kind,
            path.via,
            start.elapsed()
        );
        report.push(direct);
    }
    let direct = report.iter().filter(|d| **d).count();
    eprintln!("endpoint-independent ↔ symmetric: direct in {direct} of {TRIALS} trials");
}

/// With a budget far too small to hit (one extra socket, four probes), the
/// attempt runs, misses, closes its socket and the pair stays on the relay
/// without losing traffic.
#[test]
fn a_birthday_attempt_that_misses_leaves_the_pair_on_the_relay() {
    let secs = Duration::from_secs;
    let lab = Lab::up(&topology()).unwrap();
    let tiny = ["--birthday-sockets", "1", "--birthday-probes", "4"];
    let mesh = Mesh::up(&lab, spec(&tiny)).unwrap();
    mesh.wait_path("hard", "easy", "relay", secs(15)).unwrap();
    let p = mesh.start_pinging("easy", "hard", "ping").unwrap();
    lab.wait_until("the hard side to try and give up", secs(30), || {
        std::fs::read_to_string(lab.log_dir().join("hard.up.log")).is_ok_and(|l| {
            l.contains("birthday: sockets open") && l.contains("birthday: attempt over")
        })
    })
    .unwrap();
    std::thread::sleep(secs(1));
    let (sent, received) = stop_pinging(p);
    assert!(sent >= 20, "{sent}");
    assert!(
        sent - received <= 2,
        "{} of {sent} pings lost",
        sent - received
    );
    assert_eq!(mesh.path("hard", "easy").unwrap().kind, "relay");
    assert_eq!(mesh.path("easy", "hard").unwrap().kind, "relay");
}
