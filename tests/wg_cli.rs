//! `meshd wg up/show/down/syncconf` as a person uses them: errors that name
//! the line, the background daemon and its control socket, stale sockets,
//! SIGTERM, and peer changes that leave other peers' sessions alone.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod interop_support;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use interop_support::{
    field, handshake_age, keypair, link_exists, show, socket, transfer, Dir, DownOnDrop,
    RemoveSockets, MESHD, SOCKET_DIR,
};
use meshd_netlab::{Lab, Topology};

#[test]
fn bad_configurations_fail_with_the_file_and_line() {
    let dir = Dir::new();
    let (private, _) = keypair();
    let (_, peer) = keypair();
    let bad = dir.file(
        "wg7.conf",
        &format!(
            "[Interface]\nPrivateKey = {private}\nAdress = 10.0.0.1/24\n\n[Peer]\nPublicKey = {peer}\n"
        ),
    );
    for extra in [&[][..], &["--foreground"][..]] {
        let out = Command::new(MESHD)
            .args(["wg", "up", &bad])
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?}");
        assert!(
            err.contains(&format!("{bad}: line 3: unknown key \"Adress\"")),
            "{err}"
        );
        assert!(!err.contains(&private), "{err}");
    }
    let good = dir.file(
        "this-name-is-far-too-long.conf",
        &format!("[Interface]\nPrivateKey = {private}\n"),
    );
    let cases: [(&[&str], &str); 3] = [
        (&["wg", "up", &good], "is not a valid interface name"),
        (
            &["wg", "up", &bad.replace("wg7", "missing")],
            "cannot read it",
        ),
        (
            &["wg", "up", &good, "--interface", "bad/name"],
            "is not a valid interface name",
        ),
    ];
    for (args, want) in cases {
        let out = Command::new(MESHD).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn up_in_the_background_then_show_and_down() {
    let lab = Lab::veth_pair().unwrap();
    let name = format!("mc{}b", lab.id());
    let _guard = DownOnDrop {
        lab: &lab,
        node: "left",
        name: name.clone(),
    };
    let dir = Dir::new();
    let (private, public) = keypair();
    let (_, peer) = keypair();
    let conf = dir.file(
        &format!("{name}.conf"),
        &format!(
            "[Interface]\nPrivateKey = {private}\nAddress = 100.64.0.1/24\nListenPort = 51820\nDNS = 198.18.0.53\n\n\
             [Peer]\nPublicKey = {peer}\nAllowedIPs = 100.64.0.2/32\nEndpoint = 198.18.0.2:51820\nPersistentKeepalive = 25\n"
        ),
    );

    let out = lab.exec("left", &[MESHD, "wg", "up", &conf]).unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stderr
            .contains(&format!("{conf}: line 5: warning: DNS is ignored")),
        "{out:?}"
    );
    let addrs = lab
        .exec("left", &["ip", "-o", "addr", "show", "dev", &name])
        .unwrap()
        .ok()
        .unwrap();
    assert!(addrs.contains("100.64.0.1/24"), "{addrs}");
    let routes = lab
        .exec("left", &["ip", "route", "show", "dev", &name])
        .unwrap()
        .ok()
        .unwrap();
    assert!(routes.contains("100.64.0.2 "), "{routes}");
    let mode = std::fs::metadata(socket(&name))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let s = show(&lab, "left", &name);
    assert_eq!(s.interface_field("public key"), Some(public));
    assert_eq!(
        s.interface_field("listening port").as_deref(),
        Some("51820")
    );
    assert!(!s.0.contains(&private), "{}", s.0);
    let p = s.peer(&peer);
    assert_eq!(field(&p, "endpoint").as_deref(), Some("198.18.0.2:51820"));
    assert_eq!(field(&p, "allowed ips").as_deref(), Some("100.64.0.2/32"));
    assert_eq!(
        field(&p, "persistent keepalive").as_deref(),
        Some("every 25 seconds")
    );
    let all = lab.exec("left", &[MESHD, "wg", "show"]).unwrap();
    assert!(
        all.stdout.contains(&format!("interface: {name}\n")),
        "{all:?}"
    );

    // One interface, one daemon.
    let again = lab.exec("left", &[MESHD, "wg", "up", &conf]).unwrap();
    assert!(!again.status.success());
    assert!(again.stderr.contains("is already up"), "{again:?}");
    assert!(link_exists(&lab, "left", &name));

    let down = lab.exec("left", &[MESHD, "wg", "down", &name]).unwrap();
    assert!(down.status.success(), "{down:?}");
    assert!(!link_exists(&lab, "left", &name));
    assert!(!socket(&name).exists());
    let gone = lab.exec("left", &[MESHD, "wg", "show", &name]).unwrap();
    assert!(!gone.status.success());
    assert!(gone.stderr.contains("no meshd interface"), "{gone:?}");
}

#[test]
fn a_daemon_that_cannot_start_reports_why() {
    let lab = Lab::veth_pair().unwrap();
    let name = format!("mc{}f", lab.id());
    let _guard = DownOnDrop {
        lab: &lab,
        node: "left",
        name: name.clone(),
    };
    let dir = Dir::new();
    let (private, _) = keypair();
    let conf = dir.file(
        &format!("{name}.conf"),
        &format!(
            "[Interface]\nPrivateKey = {private}\nAddress = 100.64.0.1/24\nListenPort = 51820\n"
        ),
    );
    let _taken = lab
        .in_ns("left", || {
            std::net::UdpSocket::bind("0.0.0.0:51820").unwrap()
        })
        .unwrap();
    let out = lab.exec("left", &[MESHD, "wg", "up", &conf]).unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(
        out.stderr.contains("51820") && out.stderr.contains("in use"),
        "{out:?}"
    );
    assert!(!link_exists(&lab, "left", &name));
    assert!(!socket(&name).exists());
}

#[test]
fn a_stale_socket_is_replaced_and_sigterm_removes_everything() {
    let lab = Lab::veth_pair().unwrap();
    let name = format!("mc{}s", lab.id());
    let _cleanup = RemoveSockets(vec![name.clone()]);
    let dir = Dir::new();
    let (private, _) = keypair();
    let conf = dir.file(
        "any-name.conf",
        &format!("[Interface]\nPrivateKey = {private}\nAddress = 100.64.0.1/24\n"),
    );
    // What a killed daemon leaves: a socket file nobody listens on.
    std::fs::create_dir_all(SOCKET_DIR).unwrap();
    drop(std::os::unix::net::UnixListener::bind(socket(&name)).unwrap());
    assert!(socket(&name).exists());

    let mut proc = lab
        .spawn(
            "left",
            "meshd",
            &[
                MESHD,
                "wg",
                "up",
                &conf,
                "--interface",
                &name,
                "--foreground",
            ],
        )
        .unwrap();
    lab.wait_until(
        "meshd to answer on its socket",
        Duration::from_secs(10),
        || {
            assert!(proc.try_wait().is_none(), "meshd exited: {}", proc.log());
            lab.exec("left", &[MESHD, "wg", "show", &name])
                .unwrap()
                .status
                .success()
        },
    )
    .unwrap();
    assert!(link_exists(&lab, "left", &name));

    let status = proc.stop(Duration::from_secs(5)).unwrap();
    assert!(status.success(), "{status}: {}", proc.log());
    assert!(!link_exists(&lab, "left", &name));
    assert!(!socket(&name).exists());
}

/// Three meshd hosts; A has peers B and C. While pings flow from A to B,
/// syncconf removes C and adds D: B's session (its handshake and byte
/// counts) continues and no ping is lost; C's route goes, D's comes. A
/// second syncconf brings C back.
#[test]
fn syncconf_changes_peers_without_disturbing_other_sessions() {
    let lab = Lab::up(&Topology::new().host("a").host("b").host("c")).unwrap();
    let dir = Dir::new();
    let hosts = ["a", "b", "c"];
    let keys: Vec<(String, String)> = (0..4).map(|_| keypair()).collect();
    let names: Vec<String> = hosts.iter().map(|h| format!("ms{}{h}", lab.id())).collect();
    let _cleanup = RemoveSockets(names.clone());
    let inner = |i: usize| format!("100.64.0.{}", i + 1);
    let peer = |i: usize, endpoint: bool| {
        let mut p = format!(
            "\n[Peer]\nPublicKey = {}\nAllowedIPs = {}/32\n",
            keys[i].1,
            inner(i)
        );
        if endpoint {
            p += &format!("Endpoint = {}:51820\n", lab.addr(hosts[i]).unwrap());
        }
        p
    };
    let interface = |i: usize| {
        format!(
            "[Interface]\nPrivateKey = {}\nAddress = {}/24\nListenPort = 51820\nMTU = 1420\n",
            keys[i].0,
            inner(i)
        )
    };
    let a_conf = dir.file("a.conf", &(interface(0) + &peer(1, true) + &peer(2, true)));
    let a_next = dir.file(
        "a-next.conf",
        &(interface(0) + &peer(1, true) + &peer(3, false)),
    );
    let mut procs = Vec::new();
    for (i, host) in hosts.iter().enumerate() {
        let conf = if i == 0 {
            a_conf.clone()
        } else {
            dir.file(&format!("{host}.conf"), &(interface(i) + &peer(0, true)))
        };
        procs.push(
            lab.spawn(
                host,
                "meshd",
                &[
                    MESHD,
                    "wg",
                    "up",
                    &conf,
                    "--interface",
                    &names[i],
                    "--foreground",
                ],
            )
            .unwrap(),
        );
    }
    let ping_once = |to: &str| {
        lab.exec("a", &["ping", "-n", "-c", "1", "-W", "1", to])
            .unwrap()
            .status
            .success()
    };
    for i in [1, 2] {
        lab.wait_until(
            &format!("a ping from a to {}", inner(i)),
            Duration::from_secs(20),
            || ping_once(&inner(i)),
        )
        .unwrap();
    }
    let b_session = || {
        let s = show(&lab, "a", &names[0]);
        let p = s.peer(&keys[1].1);
        (handshake_age(&p).unwrap(), transfer(&p), s)
    };
    // Old enough that a new handshake would show as younger.
    lab.wait_until("B's handshake to age", Duration::from_secs(10), || {
        b_session().0 >= 2
    })
    .unwrap();
    let (age_before, (rx_before, tx_before), _) = b_session();
    let since = Instant::now();

    let mut pings = lab
        .spawn(
            "a",
            "ping-b",
            &["ping", "-n", "-c", "100", "-i", "0.02", &inner(1)],
        )
        .unwrap();
    let out = lab
        .exec("a", &[MESHD, "wg", "syncconf", &names[0], &a_next])
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let status = pings.wait_timeout(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "{}", pings.log());
    assert!(
        pings.log().contains("100 received, 0% packet loss"),
        "{}",
        pings.log()
    );

    let (age_after, (rx_after, tx_after), s) = b_session();
    assert!(
        age_after + 1 >= age_before + since.elapsed().as_secs(),
        "B's session was renegotiated: handshake {age_before} s old before, {age_after} s after:\n{}",
        s.0
    );
    assert!(rx_after > rx_before && tx_after > tx_before, "{}", s.0);
    let peers = s.peers();
    assert!(peers.contains_key(&keys[3].1), "{}", s.0);
    assert!(!peers.contains_key(&keys[2].1), "{}", s.0);
    let routes = lab
        .exec("a", &["ip", "route", "show", "dev", &names[0]])
        .unwrap()
        .ok()
        .unwrap();
    assert!(routes.contains("100.64.0.4 "), "{routes}");
    assert!(!routes.contains("100.64.0.3 "), "{routes}");
    assert!(!ping_once(&inner(2)), "C still answers through the tunnel");

    let back = lab
        .exec("a", &[MESHD, "wg", "syncconf", &names[0], &a_conf])
        .unwrap();
    assert!(back.status.success(), "{back:?}");
    lab.wait_until("C to answer again", Duration::from_secs(20), || {
        ping_once(&inner(2))
    })
    .unwrap();

    // As `wg syncconf`, a new ListenPort moves the interface.
    let other_port = dir.file(
        "port.conf",
        &(interface(0).replace("ListenPort = 51820", "ListenPort = 51821") + &peer(1, true)),
    );
    let out = lab
        .exec("a", &[MESHD, "wg", "syncconf", &names[0], &other_port])
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let s = show(&lab, "a", &names[0]);
    assert_eq!(
        s.interface_field("listening port").as_deref(),
        Some("51821"),
        "{}",
        s.0
    );
    let broken = dir.file("broken.conf", &(interface(0) + "\n[Peer]\nPublicKey = x\n"));
    let out = lab
        .exec("a", &[MESHD, "wg", "syncconf", &names[0], &broken])
        .unwrap();
    assert!(!out.status.success());
    assert!(
        out.stderr.contains(&format!("{broken}: line 8: ")),
        "{out:?}"
    );
    let missing = lab
        .exec("a", &[MESHD, "wg", "syncconf", "nosuchwg", &a_conf])
        .unwrap();
    assert!(missing.stderr.contains("no meshd interface"), "{missing:?}");
    for mut p in procs {
        let status = p.stop(Duration::from_secs(5)).unwrap();
        assert!(status.success(), "{}", p.log());
    }
}
