//! Compilation: a policy and the node inventory become, for each node, the
//! nodes it may know and its inbound packet filter.
//!
//! [`Compiled`] keeps, per rule, the set of nodes each selector matches.
//! That membership is all a node's view and filter are derived from, so a
//! node that joins, leaves or changes tags only updates its own entries
//! ([`Compiled::upsert_node`]); nothing else is recomputed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use crate::error::Pos;
use crate::policy::{Policy, Ports, Proto, Rule, Selector};

pub type NodeId = u64;

/// What the compiler needs to know of a node; the coordinator adapts its
/// records to this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub id: NodeId,
    pub name: String,
    pub tags: Vec<String>,
    /// Every node is in exactly one slice (the coordinator names the
    /// default one).
    pub slice: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

/// One accept entry of a node's inbound filter: packets from `source` with
/// this IP protocol (0: any) to a destination port in `ports` (ignored for
/// ICMP). The same shape as `meshd_proto::FilterRule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct FilterRule {
    pub source: IpNet,
    pub protocol: u8,
    pub ports: Ports,
}

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// A policy whose tests fail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{pos}: tests[{index}] failed: {message}")]
pub struct TestFailure {
    pub pos: Pos,
    pub index: usize,
    pub message: String,
}

/// Whether `selector` names `node`.
pub fn matches(policy: &Policy, selector: &Selector, node: &Node) -> bool {
    match selector {
        Selector::All => true,
        Selector::Node(name) => node.name == *name,
        Selector::Tag(tag) => node.tags.contains(tag),
        Selector::Group(g) => policy.groups.get(g).is_some_and(|m| m.contains(&node.name)),
        Selector::Slice(s) => node.slice == *s,
        // The reader refuses functions given by functions, so this ends.
        Selector::Function(f) => policy
            .functions
            .get(f)
            .is_some_and(|sels| sels.iter().any(|s| matches(policy, s, node))),
        Selector::Host { net, .. } | Selector::Prefix(net) => {
            net.contains(&IpAddr::V4(node.ipv4)) || net.contains(&IpAddr::V6(node.ipv6))
        }
    }
}

#[derive(Debug, Clone, Default)]
struct RuleMembers {
    src: BTreeSet<NodeId>,
    /// One set per `dst` entry.
    dst: Vec<BTreeSet<NodeId>>,
}

/// A policy compiled against an inventory.
#[derive(Debug, Clone)]
pub struct Compiled {
    policy: Policy,
    nodes: BTreeMap<NodeId, Node>,
    members: Vec<RuleMembers>,
}

impl Compiled {
    /// Compiles `policy` for `nodes` and runs the policy's tests; a policy
    /// whose tests fail is refused with the first failure.
    pub fn new(policy: Policy, nodes: &[Node]) -> Result<Compiled, TestFailure> {
        let members = vec![RuleMembers::default(); policy.acls.len()];
        let mut c = Compiled {
            policy,
            nodes: BTreeMap::new(),
            members,
        };
        for (m, rule) in c.members.iter_mut().zip(&c.policy.acls) {
            m.dst = vec![BTreeSet::new(); rule.dst.len()];
        }
        for node in nodes {
            // Everything is new here; the affected sets are for later changes.
            let _ = c.upsert_node(node.clone());
        }
        c.run_tests()?;
        Ok(c)
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Adds a node or replaces it (new tags, slice or addresses), updating
    /// only its own memberships. Returns the nodes whose view or filter may
    /// have changed: the node itself and those it could see before or can
    /// see now (another node's filter only lists sources in its view).
    pub fn upsert_node(&mut self, node: Node) -> BTreeSet<NodeId> {
        let id = node.id;
        let mut affected = self.view(id);
        for (m, rule) in self.members.iter_mut().zip(&self.policy.acls) {
            set(
                &mut m.src,
                id,
                rule.src.iter().any(|s| matches(&self.policy, s, &node)),
            );
            for (set_i, d) in m.dst.iter_mut().zip(&rule.dst) {
                set(set_i, id, matches(&self.policy, &d.selector, &node));
            }
        }
        self.nodes.insert(id, node);
        affected.extend(self.view(id));
        affected.insert(id);
        affected
    }

    /// Removes a node; returns the nodes that could see it.
    pub fn remove_node(&mut self, id: NodeId) -> BTreeSet<NodeId> {
        let affected = self.view(id);
        for m in &mut self.members {
            m.src.remove(&id);
            for d in &mut m.dst {
                d.remove(&id);
            }
        }
        self.nodes.remove(&id);
        affected
    }

    pub fn node(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(&id)
    }

    /// The node called `name`, as `explain SRC DST` names them. Linear: it
    /// serves one question from an operator, not the packet path.
    pub fn node_by_name(&self, name: &str) -> Option<&Node> {
        self.nodes.values().find(|n| n.name == name)
    }

    /// Whether rule `r` may connect `a` and `b` across their slices.
    fn slices_ok(&self, rule: &Rule, a: NodeId, b: NodeId) -> bool {
        if rule.bridge {
            return true;
        }
        match (self.nodes.get(&a), self.nodes.get(&b)) {
            (Some(a), Some(b)) => a.slice == b.slice,
            _ => false,
        }
    }

    /// The nodes `id` may know: those it may send to and those that may
    /// send to it, never itself.
    pub fn view(&self, id: NodeId) -> BTreeSet<NodeId> {
        let mut out = BTreeSet::new();
        for (m, rule) in self.members.iter().zip(&self.policy.acls) {
            let is_src = m.src.contains(&id);
            for d in &m.dst {
                if is_src {
                    out.extend(d.iter().filter(|&&p| self.slices_ok(rule, id, p)));
                }
                if d.contains(&id) {
                    out.extend(m.src.iter().filter(|&&p| self.slices_ok(rule, p, id)));
                }
            }
        }
        out.remove(&id);
        out
    }

    /// The inbound filter of `id`, sorted and without duplicates.
    pub fn filter(&self, id: NodeId) -> Vec<FilterRule> {
        let mut out = BTreeSet::new();
        for (m, rule) in self.members.iter().zip(&self.policy.acls) {
            for (d, dest) in m.dst.iter().zip(&rule.dst) {
                if !d.contains(&id) {
                    continue;
                }
                for &s in &m.src {
                    let Some(src) = self.nodes.get(&s) else {
                        continue;
                    };
                    if s == id || !self.slices_ok(rule, s, id) {
                        continue;
                    }
                    for &ports in &dest.ports {
                        let (v4, v6) = match rule.proto {
                            None => (0, 0),
                            Some(Proto::Tcp) => (IPPROTO_TCP, IPPROTO_TCP),
                            Some(Proto::Udp) => (IPPROTO_UDP, IPPROTO_UDP),
                            Some(Proto::Icmp) => (IPPROTO_ICMP, IPPROTO_ICMPV6),
                        };
                        out.insert(FilterRule {
                            source: IpNet::from(IpAddr::V4(src.ipv4)),
                            protocol: v4,
                            ports,
                        });
                        out.insert(FilterRule {
                            source: IpNet::from(IpAddr::V6(src.ipv6)),
                            protocol: v6,
                            ports,
                        });
                    }
                }
            }
        }
        out.into_iter().collect()
    }

    /// Which rule allows `src` to reach `dst` on `port`/`proto`, or why none does.
    pub fn explain(&self, src: NodeId, dst: NodeId, port: u16, proto: Proto) -> Explanation {
        if !self.nodes.contains_key(&src) {
            return Explanation::UnknownNode(src);
        }
        if !self.nodes.contains_key(&dst) {
            return Explanation::UnknownNode(dst);
        }
        if src == dst {
            return Explanation::SameNode;
        }
        let rules = self.policy.acls.iter().zip(&self.members).enumerate();
        let by_src: Vec<_> = rules.filter(|(_, (_, m))| m.src.contains(&src)).collect();
        if by_src.is_empty() {
            return Explanation::NoRuleMatchesSource;
        }
        let by_dst: Vec<_> = by_src
            .into_iter()
            .filter(|(_, (_, m))| m.dst.iter().any(|d| d.contains(&dst)))
            .collect();
        if by_dst.is_empty() {
            return Explanation::NoRuleMatchesDestination;
        }
        let names = |rs: &[(usize, (&Rule, &RuleMembers))]| {
            rs.iter().map(|(i, (r, _))| (*i, r.pos)).collect()
        };
        let bridged: Vec<_> = by_dst
            .iter()
            .copied()
            .filter(|(_, (r, _))| self.slices_ok(r, src, dst))
            .collect();
        if bridged.is_empty() {
            return Explanation::DifferentSlices {
                rules: names(&by_dst),
            };
        }
        for &(i, (rule, m)) in &bridged {
            if rule.proto.is_some_and(|p| p != proto) {
                continue;
            }
            for (d, dest) in m.dst.iter().zip(&rule.dst) {
                let port_ok = proto == Proto::Icmp
                    || dest.ports.iter().any(|&(lo, hi)| (lo..=hi).contains(&port));
                if d.contains(&dst) && port_ok {
                    return Explanation::Allowed {
                        rule: i,
                        pos: rule.pos,
                    };
                }
            }
        }
        Explanation::PortOrProtocol {
            rules: names(&bridged),
        }
    }

    fn run_tests(&self) -> Result<(), TestFailure> {
        let name = |id: NodeId| self.nodes.get(&id).map_or("?", |n| n.name.as_str());
        for (index, test) in self.policy.tests.iter().enumerate() {
            let srcs: Vec<_> = self
                .nodes
                .values()
                .filter(|n| matches(&self.policy, &test.src, n))
                .collect();
            for (want, list) in [(true, &test.accept), (false, &test.deny)] {
                for (sel, port) in list {
                    for dst in self
                        .nodes
                        .values()
                        .filter(|n| matches(&self.policy, sel, n))
                    {
                        for src in &srcs {
                            // "X can reach Y" is meant inside a slice: tag:edge
                            // reaching tag:db says nothing of other tenants'
                            // nodes, which must stay apart; a test of a bridge
                            // says so. Denials hold for every pair.
                            let across = src.slice != dst.slice;
                            if src.id == dst.id || (want && across && !test.bridge) {
                                continue;
                            }
                            let e = self.explain(src.id, dst.id, *port, test.proto);
                            if e.is_allowed() != want {
                                let verb = if want { "cannot" } else { "can" };
                                return Err(TestFailure {
                                    pos: test.pos,
                                    index,
                                    message: format!(
                                        "'{}' {verb} reach '{}' on {}/{port}: {e}",
                                        name(src.id),
                                        name(dst.id),
                                        test.proto.name()
                                    ),
                                });
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

fn set(s: &mut BTreeSet<NodeId>, id: NodeId, member: bool) {
    if member {
        s.insert(id);
    } else {
        s.remove(&id);
    }
}

/// The answer of [`Compiled::explain`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Explanation {
    /// Allowed by `acls[rule]`, written at `pos`.
    Allowed {
        rule: usize,
        pos: Pos,
    },
    UnknownNode(NodeId),
    SameNode,
    NoRuleMatchesSource,
    /// Rules match the source, none of them the destination.
    NoRuleMatchesDestination,
    /// These rules match both, but the nodes are in different slices and
    /// none of them bridges slices.
    DifferentSlices {
        rules: Vec<(usize, Pos)>,
    },
    /// These rules match both nodes, but not this port and protocol.
    PortOrProtocol {
        rules: Vec<(usize, Pos)>,
    },
}

impl Explanation {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Explanation::Allowed { .. })
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |rules: &[(usize, Pos)]| {
            rules
                .iter()
                .map(|(i, p)| format!("acls[{i}] (line {})", p.line))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self {
            Explanation::Allowed { rule, pos } => {
                write!(f, "allowed by acls[{rule}] (line {})", pos.line)
            }
            Explanation::UnknownNode(id) => write!(f, "no node {id}"),
            Explanation::SameNode => write!(f, "a node always reaches itself"),
            Explanation::NoRuleMatchesSource => write!(f, "no rule matches the source"),
            Explanation::NoRuleMatchesDestination => {
                write!(f, "rules match the source but none the destination")
            }
            Explanation::DifferentSlices { rules } => write!(
                f,
                "different slices and no bridge: {} match but none has \"bridge\": true",
                list(rules)
            ),
            Explanation::PortOrProtocol { rules } => {
                write!(
                    f,
                    "{} match both nodes but not this port and protocol",
                    list(rules)
                )
            }
        }
    }
}
