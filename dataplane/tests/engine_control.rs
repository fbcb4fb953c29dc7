//! An engine driven by its `run` loop on one thread and changed from another
//! through its `EngineHandle` (run as root, in a throwaway namespace).

// Helpers outside #[test] functions count as non-test code for clippy.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use meshd_dataplane::engine::{ControlError, Engine, EngineConfig, EngineError};
use meshd_dataplane::keys::{PrivateKey, PublicKey};
use meshd_dataplane::peers::{PeerConfig, PeerError};
use support::*;

fn peer(n: u8, allowed: &str) -> PeerConfig {
    PeerConfig {
        public_key: PublicKey::from_bytes([n; 32]),
        preshared_key: None,
        allowed_ips: vec![allowed.parse().unwrap()],
        endpoint: Some("192.0.2.1:51820".parse().unwrap()),
        persistent_keepalive: Some(25),
    }
}

fn routes(ns: &NetNs) -> String {
    let out = Command::new("ip")
        .args(["-n", &ns.name, "route", "show", "dev", "wg0"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn peers_change_and_status_is_read_while_the_engine_runs() {
    let ns = NetNs::new();
    let key = PrivateKey::generate();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let (handle_tx, handle_rx) = mpsc::channel();
        let (ns, key, stop) = (&ns, &key, &stop);
        let engine = s.spawn(move || {
            ns.enter();
            let mut engine = Engine::new(EngineConfig {
                private_key: key.clone(),
                tun_name: "wg0".into(),
                mtu: 1420,
                offload: true,
                addresses: vec!["10.88.0.1/24".parse().unwrap()],
                routes: Vec::new(),
                listen_port: 0,
                fwmark: 0,
                route_allowed_ips: true,
                answer_poll: meshd_dataplane::engine::DEFAULT_ANSWER_POLL,
            })
            .unwrap();
            handle_tx.send(engine.handle()).unwrap();
            engine.run(stop).unwrap();
            // Commands queued now wait for turns that never come; dropping the
            // engine answers them.
        });
        let handle = handle_rx.recv_timeout(Duration::from_secs(10)).unwrap();

        let status = handle.status().unwrap();
        assert_eq!(status.tun_name, "wg0");
        assert_eq!(status.public_key, key.public_key());
        assert_ne!(status.listen_port, 0);
        assert!(status.peers.is_empty());

        handle
            .set_peers(vec![peer(1, "10.88.0.2/32"), peer(2, "10.88.1.0/24")])
            .unwrap();
        let status = handle.status().unwrap();
        let keys: Vec<_> = status.peers.iter().map(|p| p.public_key).collect();
        assert_eq!(
            keys,
            vec![
                PublicKey::from_bytes([1; 32]),
                PublicKey::from_bytes([2; 32])
            ]
        );
        assert_eq!(status.peers[0].persistent_keepalive, Some(25));
        assert!(routes(ns).contains("10.88.0.2 "), "{}", routes(ns));
        assert!(routes(ns).contains("10.88.1.0/24"), "{}", routes(ns));

        // A refused set changes nothing.
        let err = handle
            .set_peers(vec![peer(3, "10.88.0.2/32"), peer(4, "10.88.0.2/32")])
            .unwrap_err();
        assert!(
            matches!(
                err,
                ControlError::Engine(EngineError::Peers(PeerError::AllowedIpConflict { .. }))
            ),
            "{err}"
        );
        assert_eq!(handle.status().unwrap().peers.len(), 2);

        handle.set_peers(vec![peer(2, "10.88.1.0/24")]).unwrap();
        assert_eq!(handle.status().unwrap().peers.len(), 1);
        assert!(!routes(ns).contains("10.88.0.2 "), "{}", routes(ns));

        stop.store(true, Ordering::Relaxed);
        engine.join().unwrap();
        assert!(matches!(handle.status(), Err(ControlError::Stopped)));
        assert!(matches!(
            handle.set_peers(vec![]),
            Err(ControlError::Stopped)
        ));
    });
}
