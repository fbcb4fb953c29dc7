//! From the coordinator's view of the mesh to the data plane's: a peer map
//! becomes [`PeerConfig`]s, a node's record its TUN addresses and routes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use meshd_proto::{NodeId, NodeInfo, Peer};

use meshd_dataplane::keys::PublicKey;
use meshd_dataplane::peers::PeerConfig;

/// The TUN's addresses (the node's own, as /32 and /128) and the routes
/// into it (the mesh's whole ranges), so one route covers every peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunPlan {
    pub addresses: Vec<IpNet>,
    pub routes: Vec<IpNet>,
}

pub fn tun_plan(info: &NodeInfo) -> TunPlan {
    TunPlan {
        addresses: vec![
            IpNet::V4(Ipv4Net::from(info.ipv4)),
            IpNet::V6(Ipv6Net::from(info.ipv6)),
        ],
        routes: vec![
            IpNet::V4(info.mesh_ipv4.trunc()),
            IpNet::V6(info.mesh_ipv6.trunc()),
        ],
    }
}

/// The data-plane peers for a peer map: each peer's mesh IPv4 /32 and IPv6
/// /128 route to its key. No endpoint: NAT traversal chooses each peer's path
/// (`crate::traversal`). `own_key` and anything that would make the set
/// invalid (a key or an address twice, which a correct coordinator never
/// sends) are left out, with a warning, rather than refusing the whole map.
pub fn peer_configs(peers: &BTreeMap<NodeId, Peer>, own_key: &PublicKey) -> Vec<PeerConfig> {
    let mut keys = BTreeSet::new();
    let mut addrs: BTreeSet<IpAddr> = BTreeSet::new();
    let mut out = Vec::with_capacity(peers.len());
    for p in peers.values() {
        let key = PublicKey::from_bytes(p.node_key.0);
        let (v4, v6) = (IpAddr::V4(p.ipv4), IpAddr::V6(p.ipv6));
        if key == *own_key || keys.contains(&key) || addrs.contains(&v4) || addrs.contains(&v6) {
            tracing::warn!(peer = %p.node_id, name = %p.name, "peer left out: its key or address is already taken");
            continue;
        }
        keys.insert(key);
        addrs.insert(v4);
        addrs.insert(v6);
        out.push(PeerConfig {
            public_key: key,
            preshared_key: None,
            allowed_ips: vec![
                IpNet::V4(Ipv4Net::from(p.ipv4)),
                IpNet::V6(Ipv6Net::from(p.ipv6)),
            ],
            endpoint: None,
            persistent_keepalive: None,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshd_proto::NodeKey;

    fn peer(id: u64, key: u8, v4: &str, endpoints: &[&str]) -> Peer {
        Peer {
            node_id: NodeId(id),
            node_key: NodeKey([key; 32]),
            name: format!("n{id}"),
            ipv4: v4.parse().unwrap(),
            ipv6: format!("fd00::{id}").parse().unwrap(),
            endpoints: endpoints.iter().map(|e| e.parse().unwrap()).collect(),
            tags: Vec::new(),
        }
    }

    #[test]
    fn peers_route_their_mesh_addresses_to_their_keys() {
        let map: BTreeMap<NodeId, Peer> = [
            peer(2, 2, "100.64.0.2", &["[2001:db8::2]:1", "192.0.2.2:41641"]),
            peer(3, 3, "100.64.0.3", &[]),
        ]
        .into_iter()
        .map(|p| (p.node_id, p))
        .collect();
        let own = PublicKey::from_bytes([1; 32]);
        let configs = peer_configs(&map, &own);
        assert_eq!(configs.len(), 2);
        assert_eq!(configs[0].public_key, PublicKey::from_bytes([2; 32]));
        assert_eq!(
            configs[0].allowed_ips,
            vec![
                "100.64.0.2/32".parse::<IpNet>().unwrap(),
                "fd00::2/128".parse().unwrap()
            ]
        );
        assert!(configs.iter().all(|c| c.endpoint.is_none()));
        meshd_dataplane::peers::validate(&configs).unwrap();
    }

    #[test]
    fn own_key_and_duplicates_are_left_out() {
        let map: BTreeMap<NodeId, Peer> = [
            peer(1, 1, "100.64.0.1", &[]),
            peer(2, 2, "100.64.0.2", &[]),
            peer(3, 2, "100.64.0.3", &[]),
            peer(4, 4, "100.64.0.2", &[]),
        ]
        .into_iter()
        .map(|p| (p.node_id, p))
        .collect();
        let configs = peer_configs(&map, &PublicKey::from_bytes([1; 32]));
        assert_eq!(configs.len(), 1);
        assert_eq!(configs[0].public_key, PublicKey::from_bytes([2; 32]));
    }

    #[test]
    fn the_tun_gets_host_addresses_and_the_mesh_ranges() {
        let info = NodeInfo {
            node_id: NodeId(1),
            name: "a".into(),
            ipv4: "100.64.0.7".parse().unwrap(),
            ipv6: "fd12:3456:789a::7".parse().unwrap(),
            mesh_ipv4: "100.64.0.0/10".parse().unwrap(),
            mesh_ipv6: "fd12:3456:789a::/48".parse().unwrap(),
            expires_at: None,
            tags: Vec::new(),
        };
        let plan = tun_plan(&info);
        let s: Vec<String> = plan.addresses.iter().map(ToString::to_string).collect();
        assert_eq!(s, ["100.64.0.7/32", "fd12:3456:789a::7/128"]);
        let r: Vec<String> = plan.routes.iter().map(ToString::to_string).collect();
        assert_eq!(r, ["100.64.0.0/10", "fd12:3456:789a::/48"]);
    }
}
