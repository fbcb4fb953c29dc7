//! Property test: for random small policies and inventories, the compiled
//! views and filters agree with a reference evaluator that reads the policy
//! rule by rule for one flow at a time.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use proptest::prelude::*;

use crate::{
    Compiled, FilterRule, Node, Policy, Proto, Selector, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP,
};

const SELECTORS: &[&str] = &[
    "*",
    "n0",
    "n1",
    "n2",
    "n3",
    "tag:t0",
    "tag:t1",
    "group:g0",
    "slice:s0",
    "slice:s1",
    "h0",
    "100.64.0.0/31",
    "fd00::2/127",
];
const PORTS: &[&str] = &["*", "22", "80-90", "22,443"];
/// Every range in `PORTS` holds one of these, so trying them finds any flow.
const PROBES: &[u16] = &[0, 22, 80, 85, 91, 443, 1000];
const PROTOS: [Proto; 3] = [Proto::Tcp, Proto::Udp, Proto::Icmp];

fn node(id: u8, slice: u8, tags: u8) -> Node {
    Node {
        id: u64::from(id),
        name: format!("n{id}"),
        tags: (0..2)
            .filter(|t| tags & (1 << t) != 0)
            .map(|t| format!("tag:t{t}"))
            .collect(),
        slice: format!("s{slice}"),
        ipv4: Ipv4Addr::new(100, 64, 0, id),
        ipv6: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::from(id)),
    }
}

fn rule_text() -> impl Strategy<Value = String> {
    let sel = || prop::sample::select(SELECTORS);
    (
        prop::collection::vec(sel(), 1..3),
        prop::collection::vec((sel(), prop::sample::select(PORTS)), 1..3),
        0..4usize,
        any::<bool>(),
    )
        .prop_map(|(src, dst, proto, bridge)| {
            let proto_name = ["", "tcp", "udp", "icmp"][proto];
            let dst: Vec<String> = dst
                .into_iter()
                .map(|(s, p)| format!("\"{s}:{}\"", if proto == 3 { "*" } else { p }))
                .collect();
            let src: Vec<String> = src.into_iter().map(|s| format!("\"{s}\"")).collect();
            let proto = if proto == 0 { String::new() } else { format!(", \"proto\": \"{proto_name}\"") };
            format!(
                "{{\"action\": \"accept\", \"src\": [{}], \"dst\": [{}]{proto}, \"bridge\": {bridge}}}",
                src.join(", "),
                dst.join(", ")
            )
        })
}

/// Straight from the policy text's meaning, sharing nothing with the compiler.
fn ref_matches(policy: &Policy, sel: &Selector, n: &Node) -> bool {
    match sel {
        Selector::All => true,
        Selector::Node(name) => &n.name == name,
        Selector::Tag(t) => n.tags.iter().any(|x| x == t),
        Selector::Group(g) => policy.groups[g].contains(&n.name),
        Selector::Slice(s) => &n.slice == s,
        Selector::Function(f) => policy.functions[f]
            .iter()
            .any(|s| ref_matches(policy, s, n)),
        Selector::Host { net, .. } | Selector::Prefix(net) => {
            net.contains(&IpAddr::V4(n.ipv4)) || net.contains(&IpAddr::V6(n.ipv6))
        }
    }
}

fn allowed(policy: &Policy, src: &Node, dst: &Node, port: u16, proto: Proto) -> bool {
    src.id != dst.id
        && policy.acls.iter().any(|r| {
            (r.bridge || src.slice == dst.slice)
                && r.proto.is_none_or(|p| p == proto)
                && r.src.iter().any(|s| ref_matches(policy, s, src))
                && r.dst.iter().any(|d| {
                    ref_matches(policy, &d.selector, dst)
                        && (proto == Proto::Icmp
                            || d.ports.iter().any(|&(lo, hi)| lo <= port && port <= hi))
                })
        })
}

fn filter_accepts(filter: &[FilterRule], src: &Node, port: u16, proto: Proto) -> bool {
    let num = match proto {
        Proto::Tcp => IPPROTO_TCP,
        Proto::Udp => IPPROTO_UDP,
        Proto::Icmp => IPPROTO_ICMP,
    };
    filter.iter().any(|r| {
        r.source == IpNet::from(IpAddr::V4(src.ipv4))
            && (r.protocol == 0 || r.protocol == num)
            && (proto == Proto::Icmp || (r.ports.0 <= port && port <= r.ports.1))
    })
}

proptest! {
    #[test]
    fn compiled_agrees_with_reference(
        shape in prop::collection::vec((0..2u8, 0..4u8), 1..6),
        group in prop::collection::vec(0..4u8, 0..3),
        rules in prop::collection::vec(rule_text(), 0..4),
    ) {
        let nodes: Vec<Node> = shape.iter().enumerate()
            .map(|(i, &(slice, tags))| node(i as u8 + 1, slice, tags))
            .collect();
        let group: Vec<String> = group.iter().map(|i| format!("\"n{i}\"")).collect();
        let text = format!(
            "{{\"slices\": [\"s0\", \"s1\"], \"tags\": {{\"tag:t0\": [], \"tag:t1\": []}},
              \"groups\": {{\"group:g0\": [{}]}}, \"hosts\": {{\"h0\": \"100.64.0.3\"}},
              \"acls\": [{}]}}",
            group.join(", "),
            rules.join(",\n"),
        );
        let policy = Policy::parse(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        let compiled = Compiled::new(policy.clone(), &nodes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        for dst in &nodes {
            let filter = compiled.filter(dst.id);
            let mut view = BTreeSet::new();
            for src in &nodes {
                for &port in PROBES {
                    for proto in PROTOS {
                        let want = allowed(&policy, src, dst, port, proto);
                        prop_assert_eq!(filter_accepts(&filter, src, port, proto), want,
                            "{} -> {} {}/{}\n{}", src.name, dst.name, proto.name(), port, text);
                        prop_assert_eq!(compiled.explain(src.id, dst.id, port, proto).is_allowed(), want);
                        if want || allowed(&policy, dst, src, port, proto) {
                            view.insert(src.id);
                        }
                    }
                }
            }
            prop_assert_eq!(compiled.view(dst.id), view, "view of {}\n{}", dst.name, text);
        }
    }
}

proptest! {
    /// Changing one node through `upsert_node` gives what compiling from
    /// scratch gives, and every node whose view or filter changed is among
    /// those it reports.
    #[test]
    fn upsert_matches_recompilation(
        shape in prop::collection::vec((0..2u8, 0..4u8), 1..6),
        change in (0..6usize, 0..2u8, 0..4u8),
        rules in prop::collection::vec(rule_text(), 0..4),
    ) {
        let nodes: Vec<Node> = shape.iter().enumerate()
            .map(|(i, &(slice, tags))| node(i as u8 + 1, slice, tags))
            .collect();
        let text = format!(
            "{{\"slices\": [\"s0\", \"s1\"], \"tags\": {{\"tag:t0\": [], \"tag:t1\": []}},
              \"groups\": {{\"group:g0\": [\"n1\"]}}, \"hosts\": {{\"h0\": \"100.64.0.3\"}},
              \"acls\": [{}]}}",
            rules.join(",\n"),
        );
        let policy = Policy::parse(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        let compile = |nodes: &[Node]| Compiled::new(policy.clone(), nodes).map_err(|e| TestCaseError::fail(e.to_string()));
        let mut incremental = compile(&nodes)?;
        let before = incremental.clone();
        let (which, slice, tags) = change;
        let mut changed = nodes.clone();
        let id = (which % nodes.len()) as u8 + 1;
        changed[usize::from(id) - 1] = node(id, slice, tags);
        let affected = incremental.upsert_node(node(id, slice, tags));
        let fresh = compile(&changed)?;
        for n in &changed {
            prop_assert_eq!(incremental.view(n.id), fresh.view(n.id));
            prop_assert_eq!(incremental.filter(n.id), fresh.filter(n.id));
            if before.view(n.id) != fresh.view(n.id) || before.filter(n.id) != fresh.filter(n.id) {
                prop_assert!(affected.contains(&n.id), "{} changed but is not reported\n{}", n.name, text);
            }
        }
    }
}
