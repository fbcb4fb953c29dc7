//! meshd as a drop-in userspace WireGuard: `wg` and `wg-quick` drive it
//! through WireGuard's UAPI exactly as they drive wireguard-go.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod interop_support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use interop_support::{
    handshake_age, keypair, link_exists, show, socket, Dir, RemoveSockets, MESHD,
};
use meshd_netlab::{Lab, Proc, Topology};

/// Runs `argv` in `node` and returns its stdout; fails the test if it fails.
fn run(lab: &Lab, node: &str, argv: &[&str]) -> String {
    let out = lab.exec(node, argv).unwrap();
    assert!(out.status.success(), "{argv:?}: {out:?}");
    out.stdout
}

/// Starts an empty interface `name` in `node` with `argv` (wireguard-go or
/// `meshd wg create`, in the foreground) and waits for its UAPI socket.
fn start(lab: &Lab, node: &str, name: &str, argv: &[&str]) -> Proc {
    let mut argv = argv.to_vec();
    argv.push(name);
    let proc = lab.spawn(node, name, &argv).unwrap();
    lab.wait_until(
        &format!("{} to open its socket", argv[0]),
        Duration::from_secs(20),
        || socket(name).exists(),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", proc.log()));
    proc
}

/// `wg` output of one interface, normalised for comparison between two
/// implementations: the interface's name replaced, blocks sorted (`wg`
/// sorts peers by handshake time, and none has had one), and the lines
/// about handshakes and transfer left out.
fn normalised(text: &str, name: &str) -> String {
    let text = text.replace(name, "IFACE");
    let mut blocks: Vec<String> = text
        .split("\n\n")
        .map(|b| {
            b.lines()
                .filter(|l| !l.contains("latest handshake") && !l.contains("transfer:"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .filter(|b| !b.trim().is_empty())
        .collect();
    let head = blocks.remove(0);
    blocks.sort();
    std::iter::once(head)
        .chain(blocks)
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// `wg show NAME dump` without the handshake and transfer columns, sorted.
fn dump(lab: &Lab, node: &str, name: &str) -> String {
    let text = run(lab, node, &["wg", "show", name, "dump"]);
    let mut lines: Vec<String> = text
        .lines()
        .map(|l| {
            let cols: Vec<&str> = l.split('\t').collect();
            if cols.len() == 8 {
                // peer: key, psk, endpoint, allowed ips, handshake, rx, tx, keepalive
                [cols[0], cols[1], cols[2], cols[3], cols[7]].join("\t")
            } else {
                l.to_owned()
            }
        })
        .collect();
    lines[1..].sort();
    lines.join("\n")
}

/// What `wg` prints about the interface in every form that holds
/// configuration.
fn views(lab: &Lab, node: &str, name: &str) -> [String; 3] {
    [
        normalised(&run(lab, node, &["wg", "show", name]), name),
        normalised(&run(lab, node, &["wg", "showconf", name]), name),
        dump(lab, node, name),
    ]
}

#[test]
fn wg_reads_and_changes_meshd_as_it_does_wireguard_go() {
    let lab = Lab::up(&Topology::new().host("go").host("md")).unwrap();
    let dir = Dir::new();
    let (go_if, md_if) = (format!("ug{}g", lab.id()), format!("ug{}m", lab.id()));
    let _cleanup = RemoveSockets(vec![go_if.clone(), md_if.clone()]);
    let _go = start(&lab, "go", &go_if, &["wireguard-go", "-f"]);
    let _md = start(&lab, "md", &md_if, &[MESHD, "wg", "create", "-f"]);
    let (private, _) = keypair();
    let keys: Vec<String> = (0..4).map(|_| keypair().1).collect();
    let (_, psk) = keypair();
    let conf = dir.file(
        "setconf.conf",
        &format!(
            "[Interface]\nPrivateKey = {private}\nListenPort = 51820\nFwMark = 0x1234\n\n\
             [Peer]\nPublicKey = {k0}\nPresharedKey = {psk}\nEndpoint = 198.51.100.7:51820\n\
             AllowedIPs = 10.0.1.0/24, fd00:1::/64, 10.0.9.9/32\nPersistentKeepalive = 25\n\n\
             [Peer]\nPublicKey = {k1}\nEndpoint = [2001:db8::2]:4500\nAllowedIPs = 10.0.2.5/32\n\n\
             [Peer]\nPublicKey = {k2}\n",
            k0 = keys[0],
            k1 = keys[1],
            k2 = keys[2],
        ),
    );
    let both = |argv: &[&str]| {
        for (node, name) in [("go", &go_if), ("md", &md_if)] {
            let argv: Vec<&str> = argv
                .iter()
                .map(|a| if *a == "IFACE" { name.as_str() } else { a })
                .collect();
            run(&lab, node, &argv);
        }
    };
    let compare = |step: &str| {
        let go = views(&lab, "go", &go_if);
        let md = views(&lab, "md", &md_if);
        for (g, m) in go.iter().zip(&md) {
            assert_eq!(g, m, "after {step}: wireguard-go, then meshd");
        }
        go
    };
    // Before any configuration: no key, any port.
    let empty = run(&lab, "md", &["wg", "show", &md_if]);
    assert!(!empty.contains("public key"), "{empty}");

    both(&["wg", "setconf", "IFACE", &conf]);
    let views = compare("wg setconf");
    assert!(
        views[1].contains(&format!("PrivateKey = {private}")),
        "{}",
        views[1]
    );
    assert!(views[0].contains("fwmark: 0x1234"), "{}", views[0]);

    both(&[
        "wg",
        "set",
        "IFACE",
        "listen-port",
        "51821",
        "fwmark",
        "off",
        "peer",
        &keys[2],
        "allowed-ips",
        "10.0.3.0/24,10.0.9.9/32",
        "endpoint",
        "198.51.100.9:1",
        "persistent-keepalive",
        "5",
    ]);
    compare("wg set (port, mark, an allowed IP moved to another peer)");
    both(&[
        "wg",
        "set",
        "IFACE",
        "peer",
        &keys[0],
        "remove",
        "peer",
        &keys[3],
        "allowed-ips",
        "",
    ]);
    compare("wg set (a peer removed, one added)");
    both(&["wg", "syncconf", "IFACE", &conf]);
    compare("wg syncconf");
    both(&["wg", "set", "IFACE", "private-key", "/dev/null"]);
    compare("wg set private-key (none)");
}

/// Two meshd interfaces with a session; while pings flow between them,
/// `wg set` adds, changes and removes other peers of one end many times:
/// not a ping is lost and the session is never renegotiated.
#[test]
fn wg_set_changes_peers_while_another_peers_traffic_flows() {
    let lab = Lab::up(&Topology::new().host("a").host("b")).unwrap();
    let dir = Dir::new();
    let names = [format!("us{}a", lab.id()), format!("us{}b", lab.id())];
    let _cleanup = RemoveSockets(names.to_vec());
    let keys = [keypair(), keypair()];
    let mut procs = Vec::new();
    for (i, host) in ["a", "b"].iter().enumerate() {
        let other = 1 - i;
        let conf = dir.file(
            &format!("{host}.conf"),
            &format!(
                "[Interface]\nPrivateKey = {}\nAddress = 100.64.0.{}/24\nListenPort = 51820\n\n\
                 [Peer]\nPublicKey = {}\nAllowedIPs = 100.64.0.{}/32\nEndpoint = {}:51820\n",
                keys[i].0,
                i + 1,
                keys[other].1,
                other + 1,
                lab.addr(["a", "b"][other]).unwrap()
            ),
        );
        let argv = [
            MESHD,
            "wg",
            "up",
            &conf,
            "--interface",
            &names[i],
            "--foreground",
        ];
        procs.push(lab.spawn(host, "meshd", &argv).unwrap());
    }
    let ping_once = || {
        lab.exec("a", &["ping", "-n", "-c", "1", "-W", "1", "100.64.0.2"])
            .unwrap()
            .status
            .success()
    };
    lab.wait_until(
        "a ping through the tunnel",
        Duration::from_secs(20),
        ping_once,
    )
    .unwrap();
    let age = || handshake_age(&show(&lab, "a", &names[0]).peer(&keys[1].1)).unwrap();
    lab.wait_until("the handshake to age", Duration::from_secs(10), || {
        age() >= 2
    })
    .unwrap();
    let before = age();
    let started = std::time::Instant::now();
    let mut pings = lab
        .spawn(
            "a",
            "ping",
            &["ping", "-n", "-c", "300", "-i", "0.01", "100.64.0.2"],
        )
        .unwrap();
    let others: Vec<String> = (0..3).map(|_| keypair().1).collect();
    for round in 0..10 {
        let k = &others[round % others.len()];
        let net = format!("10.{round}.0.0/16");
        run(
            &lab,
            "a",
            &[
                "wg",
                "set",
                &names[0],
                "peer",
                k,
                "allowed-ips",
                &net,
                "endpoint",
                "198.51.100.1:9",
            ],
        );
        run(
            &lab,
            "a",
            &[
                "wg",
                "set",
                &names[0],
                "peer",
                &keys[1].1,
                "persistent-keepalive",
                "25",
            ],
        );
        run(&lab, "a", &["wg", "set", &names[0], "peer", k, "remove"]);
        run(
            &lab,
            "a",
            &[
                "wg",
                "set",
                &names[0],
                "peer",
                &keys[1].1,
                "persistent-keepalive",
                "off",
            ],
        );
    }
    let status = pings.wait_timeout(Duration::from_secs(60)).unwrap();
    assert!(status.success(), "{}", pings.log());
    assert!(
        pings.log().contains("300 received, 0% packet loss"),
        "{}",
        pings.log()
    );
    let after = age();
    assert!(
        after + 1 >= before + started.elapsed().as_secs(),
        "the session was renegotiated: {before} s old before, {after} s after"
    );
    let peers = show(&lab, "a", &names[0]).peers();
    assert_eq!(peers.len(), 1, "{peers:?}");
    for mut p in procs {
        assert!(
            p.stop(Duration::from_secs(5)).unwrap().success(),
            "{}",
            p.log()
        );
    }
}

/// `wg-quick up` with meshd as its userspace implementation, a full
/// tunnel (AllowedIPs = 0.0.0.0/0, so wg-quick marks the tunnel's own
/// datagrams and routes by policy), traffic through it, then `wg-quick
/// down`: no interface, route, rule, socket or process is left.
#[test]
fn wg_quick_brings_meshd_up_and_down_without_a_trace() {
    let lab = Lab::up(&Topology::new().host("a").host("b")).unwrap();
    let dir = Dir::new();
    let (a_if, b_if) = (format!("uq{}a", lab.id()), format!("uq{}b", lab.id()));
    let _cleanup = RemoveSockets(vec![a_if.clone(), b_if.clone()]);
    let link = dir.0.join("meshd-wg");
    std::os::unix::fs::symlink(MESHD, &link).unwrap();
    let (ka, kb) = (keypair(), keypair());
    let b_conf = dir.file(
        "b.conf",
        &format!(
            "[Interface]\nPrivateKey = {}\nAddress = 100.64.0.2/24\nListenPort = 51820\n\n\
             [Peer]\nPublicKey = {}\nAllowedIPs = 100.64.0.1/32\n",
            kb.0, ka.1
        ),
    );
    let mut b = lab
        .spawn(
            "b",
            "meshd",
            &[
                MESHD,
                "wg",
                "up",
                &b_conf,
                "--interface",
                &b_if,
                "--foreground",
            ],
        )
        .unwrap();
    let a_conf = dir.file(
        &format!("{a_if}.conf"),
        &format!(
            "[Interface]\nPrivateKey = {}\nAddress = 100.64.0.1/24\n\n\
             [Peer]\nPublicKey = {}\nAllowedIPs = 0.0.0.0/0\nEndpoint = {}:51820\n",
            ka.0,
            kb.1,
            lab.addr("b").unwrap()
        ),
    );
    // Routes of the lab's own link (its carrier and IPv6 link-local
    // routes come up while the test runs) are not wg-quick's.
    let footprint = || {
        let routes: Vec<String> = run(&lab, "a", &["ip", "route", "show", "table", "all"])
            .lines()
            .filter(|l| !l.contains("dev eth0") && !l.contains("dev lo"))
            .map(str::to_owned)
            .collect();
        [
            run(&lab, "a", &["ip", "-o", "link", "show", "type", "tun"]),
            routes.join("\n"),
            run(&lab, "a", &["ip", "rule"]),
            run(&lab, "a", &["ip", "-6", "rule"]),
            run(&lab, "a", &["nft", "list", "ruleset"]),
        ]
    };
    let before = footprint();
    let impl_var = format!("WG_QUICK_USERSPACE_IMPLEMENTATION={}", link.display());
    let up = lab
        .exec("a", &["env", &impl_var, "wg-quick", "up", &a_conf])
        .unwrap();
    assert!(up.status.success(), "{up:?}");
    assert!(socket(&a_if).exists());
    let mark = run(&lab, "a", &["wg", "show", &a_if, "fwmark"]);
    assert_ne!(mark.trim(), "off", "wg-quick set no fwmark");
    // Through the tunnel: its peer's tunnel address, and, since everything
    // goes into the tunnel, its underlay address too.
    for to in ["100.64.0.2".to_owned(), lab.addr("b").unwrap().to_string()] {
        lab.wait_until(&format!("a ping to {to}"), Duration::from_secs(20), || {
            lab.exec("a", &["ping", "-n", "-c", "1", "-W", "1", &to])
                .unwrap()
                .status
                .success()
        })
        .unwrap();
    }
    let s = show(&lab, "a", &a_if);
    assert!(s.peer(&kb.1).contains("latest handshake"), "{}", s.0);

    let down = lab
        .exec("a", &["env", &impl_var, "wg-quick", "down", &a_conf])
        .unwrap();
    assert!(down.status.success(), "{down:?}");
    lab.wait_until(
        "the daemon to remove its socket",
        Duration::from_secs(10),
        || !socket(&a_if).exists(),
    )
    .unwrap();
    assert!(!link_exists(&lab, "a", &a_if));
    assert_eq!(footprint(), before, "wg-quick down left something behind");
    let left = run(&lab, "a", &["ps", "-eo", "args"]);
    assert!(
        !left.contains(&a_if),
        "a process of {a_if} is still running:\n{left}"
    );
    assert!(
        b.stop(Duration::from_secs(5)).unwrap().success(),
        "{}",
        b.log()
    );
}

/// Sends `request` on a new connection to `name`'s socket (and closes
/// the connection's sending side if `close`) and returns the daemon's
/// answer: what it writes up to an empty line, or until it closes or 2 s
/// pass.
fn raw_then(name: &str, request: &[u8], close: bool) -> String {
    let mut s = UnixStream::connect(socket(name)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let _ = s.write_all(request);
    if close {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if out.ends_with(b"\n\n") {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn raw(name: &str, request: &[u8]) -> String {
    raw_then(name, request, false)
}

#[test]
fn malformed_uapi_requests_are_answered_and_change_nothing() {
    let lab = Lab::up(&Topology::new().host("a").host("b")).unwrap();
    let dir = Dir::new();
    let names = [format!("um{}a", lab.id()), format!("um{}b", lab.id())];
    let _cleanup = RemoveSockets(names.to_vec());
    let keys = [keypair(), keypair()];
    let mut procs = Vec::new();
    for (i, host) in ["a", "b"].iter().enumerate() {
        let other = 1 - i;
        let conf = dir.file(
            &format!("{host}.conf"),
            &format!(
                "[Interface]\nPrivateKey = {}\nAddress = 100.64.0.{}/24\nListenPort = 51820\n\n\
                 [Peer]\nPublicKey = {}\nAllowedIPs = 100.64.0.{}/32\nEndpoint = {}:51820\n",
                keys[i].0,
                i + 1,
                keys[other].1,
                other + 1,
                lab.addr(["a", "b"][other]).unwrap()
            ),
        );
        let argv = [
            MESHD,
            "wg",
            "up",
            &conf,
            "--interface",
            &names[i],
            "--foreground",
        ];
        procs.push(lab.spawn(host, "meshd", &argv).unwrap());
    }
    let ping_once = || {
        lab.exec("a", &["ping", "-n", "-c", "1", "-W", "1", "100.64.0.2"])
            .unwrap()
            .status
            .success()
    };
    lab.wait_until(
        "a ping through the tunnel",
        Duration::from_secs(20),
        ping_once,
    )
    .unwrap();
    let name = &names[0];
    let config = || run(&lab, "a", &["wg", "showconf", name]);
    let before = config();
    let hex = "ab".repeat(32);
    let mut long = b"set=1\n".to_vec();
    long.extend(std::iter::repeat_n(b'x', 5 << 20));
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"hello\n\n".to_vec(), "errno=-71"),
        (b"get=1\nx=1\n\n".to_vec(), "errno=-22"),
        (b"get=2\n\n".to_vec(), "errno=-71"),
        (b"set=1\nlisten_port=99999\n\n".to_vec(), "errno=-22"),
        (
            b"set=1\nlisten_port=1\npublic_key=zz\n\n".to_vec(),
            "errno=-22",
        ),
        (
            format!("set=1\nreplace_peers=true\npublic_key={hex}\nallowed_ip=300.0.0.0/8\n\n")
                .into_bytes(),
            "errno=-22",
        ),
        (
            format!("set=1\npublic_key={hex}\nendpoint=[::1\n\n").into_bytes(),
            "errno=-22",
        ),
        (b"set=1\nno equals sign\n\n".to_vec(), "errno=-71"),
        (b"set=1\n\xff\xfe\n\n".to_vec(), "errno=-71"),
        (b"\n".to_vec(), "errno=-71"),
        (long, "errno=-90"),
    ];
    for (request, want) in &cases {
        let answer = raw(name, request);
        assert_eq!(
            answer,
            format!("{want}\n\n"),
            "{:?}",
            String::from_utf8_lossy(&request[..request.len().min(80)])
        );
    }
    // A request cut off by the client's close is still one request.
    assert_eq!(raw_then(name, b"get=1\nbad", true), "errno=-71\n\n");
    // Nothing changed, and the daemon and the tunnel go on.
    assert_eq!(config(), before);
    assert!(ping_once());
    assert!(raw(name, b"get=1\n\n").ends_with("errno=0\n\n"));
    for mut p in procs {
        assert!(
            p.stop(Duration::from_secs(5)).unwrap().success(),
            "{}",
            p.log()
        );
    }
}
