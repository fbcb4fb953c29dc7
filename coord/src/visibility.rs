//! Who sees whom. The peer map a node receives, and the fan-out of every
//! change, are decided here and nowhere else; the ACL issue narrows
//! [`can_see`] (slices, tags, policy) without touching the coordinator.

use ipnet::IpNet;
use meshd_proto::FilterRule;

use crate::state::{MeshState, NodeRecord, MESH_IPV4};

/// Whether `viewer` is told about `peer`. Today: every other node that has
/// not expired. Relays are never peers (nodes learn them from the relay map);
/// a relay sees every node, since it admits only the members it knows.
pub fn can_see(viewer: &NodeRecord, peer: &NodeRecord, now: u64) -> bool {
    viewer.id != peer.id && !peer.is_expired(now) && peer.relay.is_none()
}

/// The peers `viewer` receives, in node-id order.
pub fn visible_peers<'a>(
    viewer: &'a NodeRecord,
    state: &'a MeshState,
    now: u64,
) -> impl Iterator<Item = &'a NodeRecord> + 'a {
    state
        .nodes
        .values()
        .filter(move |peer| can_see(viewer, peer, now))
}

/// The inbound packet filter for `node`. Today: anything from inside the mesh.
pub fn filter_for(_node: &NodeRecord, state: &MeshState) -> Vec<FilterRule> {
    let mut rules = vec![FilterRule {
        source: IpNet::V4(MESH_IPV4),
        protocol: 0,
        ports: (0, u16::MAX),
    }];
    if let Some(s) = &state.settings {
        rules.push(FilterRule {
            source: IpNet::V6(s.ipv6_prefix),
            protocol: 0,
            ports: (0, u16::MAX),
        });
    }
    rules
}
