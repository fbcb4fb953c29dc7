//! The routing table of the data plane: which peer owns an address.
//!
//! A path-compressed binary trie per address family. Lookups walk at most one
//! node per distinct prefix length on the path (≤ 33 for IPv4, ≤ 129 for
//! IPv6), whatever the number of entries. IPv4 and IPv6 never mix: an
//! IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is looked up as IPv6, as
//! WireGuard does.

use std::net::IpAddr;

use ipnet::IpNet;

/// A set of prefixes, each with a value, answering longest-prefix matches.
#[derive(Debug, Clone)]
pub struct AllowedIps<T> {
    v4: Option<Box<Node<T>>>,
    v6: Option<Box<Node<T>>>,
}

/// Both families are stored as `u128` keys aligned to the most significant
/// bit, so an IPv4 address occupies the top 32 bits and the same bit
/// arithmetic serves both.
#[derive(Debug, Clone)]
struct Node<T> {
    key: u128,
    len: u8,
    /// Set on nodes that hold an inserted prefix; `None` on the branch nodes
    /// that path compression creates where two prefixes diverge.
    entry: Option<(IpNet, T)>,
    children: [Option<Box<Node<T>>>; 2],
}

fn mask(key: u128, len: u8) -> u128 {
    match len {
        0 => 0,
        _ => key & (u128::MAX << (128 - u32::from(len))),
    }
}

/// The bit after the first `len` bits; `len` is below 128 wherever this is
/// called, because a node of full length has no children to choose from.
fn bit(key: u128, len: u8) -> usize {
    ((key >> (127 - u32::from(len))) & 1) as usize
}

fn addr_key(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(u32::from(a)) << 96,
        IpAddr::V6(a) => u128::from(a),
    }
}

impl<T> Default for AllowedIps<T> {
    fn default() -> Self {
        AllowedIps { v4: None, v6: None }
    }
}

impl<T> AllowedIps<T> {
    pub fn new() -> Self {
        Self::default()
    }

    fn root(&mut self, net: &IpNet) -> &mut Option<Box<Node<T>>> {
        match net {
            IpNet::V4(_) => &mut self.v4,
            IpNet::V6(_) => &mut self.v6,
        }
    }

    /// Inserts `net` (host bits are cleared: `10.0.0.1/8` is `10.0.0.0/8`),
    /// returning the value it replaces.
    pub fn insert(&mut self, net: IpNet, value: T) -> Option<T> {
        let net = net.trunc();
        let key = addr_key(net.network());
        let slot = self.root(&net);
        let (node, old) = insert(slot.take(), key, net.prefix_len(), (net, value));
        *slot = Some(node);
        old
    }

    /// Removes exactly `net` (after clearing host bits), returning its value.
    pub fn remove(&mut self, net: IpNet) -> Option<T> {
        let net = net.trunc();
        let key = addr_key(net.network());
        remove(self.root(&net), key, net.prefix_len())
    }

    /// Removes every entry whose value satisfies `pred` (all the prefixes of
    /// a removed peer), returning how many were removed.
    pub fn remove_value(&mut self, mut pred: impl FnMut(&T) -> bool) -> usize {
        retain(&mut self.v4, &mut pred) + retain(&mut self.v6, &mut pred)
    }

    /// The value of the longest prefix containing `addr`.
    pub fn longest_match(&self, addr: IpAddr) -> Option<&T> {
        let (root, max_len) = match addr {
            IpAddr::V4(_) => (&self.v4, 32),
            IpAddr::V6(_) => (&self.v6, 128),
        };
        let key = addr_key(addr);
        let mut best = None;
        let mut next = root.as_deref();
        while let Some(node) = next {
            if mask(key, node.len) != node.key {
                break;
            }
            if let Some((_, value)) = &node.entry {
                best = Some(value);
            }
            if node.len == max_len {
                break;
            }
            next = node.children[bit(key, node.len)].as_deref();
        }
        best
    }

    /// All entries: IPv4 first, then IPv6, each in address order with a
    /// prefix before the prefixes it contains.
    pub fn iter(&self) -> Iter<'_, T> {
        Iter {
            stack: [self.v6.as_deref(), self.v4.as_deref()]
                .into_iter()
                .flatten()
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_none() && self.v6.is_none()
    }
}

fn leaf<T>(key: u128, len: u8, entry: (IpNet, T)) -> Box<Node<T>> {
    Box::new(Node {
        key,
        len,
        entry: Some(entry),
        children: [None, None],
    })
}

/// Inserts into the subtree `slot` and returns its new root with the value
/// replaced, if any. Taking the subtree by value lets a split move the old
/// node under a new one without placeholder nodes.
fn insert<T>(
    slot: Option<Box<Node<T>>>,
    key: u128,
    len: u8,
    entry: (IpNet, T),
) -> (Box<Node<T>>, Option<T>) {
    let Some(mut node) = slot else {
        return (leaf(key, len, entry), None);
    };
    let common = ((node.key ^ key).leading_zeros() as u8)
        .min(node.len)
        .min(len);
    if common == node.len {
        if len == node.len {
            let old = node.entry.replace(entry).map(|(_, value)| value);
            return (node, old);
        }
        let side = bit(key, node.len);
        let (child, old) = insert(node.children[side].take(), key, len, entry);
        node.children[side] = Some(child);
        return (node, old);
    }
    // The new prefix and `node` diverge (or the new prefix is shorter) at bit
    // `common`: the new parent sits there.
    let node_side = bit(node.key, common);
    let mut parent = if common == len {
        leaf(key, len, entry)
    } else {
        let mut branch = Box::new(Node {
            key: mask(key, common),
            len: common,
            entry: None,
            children: [None, None],
        });
        branch.children[1 - node_side] = Some(leaf(key, len, entry));
        branch
    };
    parent.children[node_side] = Some(node);
    (parent, None)
}

fn remove<T>(slot: &mut Option<Box<Node<T>>>, key: u128, len: u8) -> Option<T> {
    let node = slot.as_mut()?;
    if node.len > len || mask(key, node.len) != node.key {
        return None;
    }
    let removed = if node.len == len {
        node.entry.take().map(|(_, value)| value)
    } else {
        remove(&mut node.children[bit(key, node.len)], key, len)
    };
    if removed.is_some() {
        compact(slot);
    }
    removed
}

fn retain<T>(slot: &mut Option<Box<Node<T>>>, pred: &mut impl FnMut(&T) -> bool) -> usize {
    let Some(node) = slot.as_mut() else {
        return 0;
    };
    let [left, right] = &mut node.children;
    let mut removed = retain(left, pred) + retain(right, pred);
    if node.entry.as_ref().is_some_and(|(_, value)| pred(value)) {
        node.entry = None;
        removed += 1;
    }
    compact(slot);
    removed
}

/// Restores the trie's shape after an entry below `slot` was removed: a node
/// without an entry must have two children, otherwise it is replaced by its
/// only child or disappears.
fn compact<T>(slot: &mut Option<Box<Node<T>>>) {
    let Some(node) = slot.as_mut() else {
        return;
    };
    if node.entry.is_some() {
        return;
    }
    match &mut node.children {
        [Some(_), Some(_)] => {}
        [only @ Some(_), None] | [None, only @ Some(_)] => *slot = only.take(),
        [None, None] => *slot = None,
    }
}

/// The iterator of [`AllowedIps::iter`].
pub struct Iter<'a, T> {
    stack: Vec<&'a Node<T>>,
}

impl<'a, T> Iterator for Iter<'a, T> {
    type Item = (IpNet, &'a T);

    fn next(&mut self) -> Option<Self::Item> {
        while let Some(node) = self.stack.pop() {
            self.stack
                .extend(node.children.iter().rev().filter_map(|c| c.as_deref()));
            if let Some((net, value)) = &node.entry {
                return Some((*net, value));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn addr(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Builds a table from `inserts` and checks each `(address, expected
    /// value)` lookup.
    fn check(inserts: &[(&str, u32)], lookups: &[(&str, Option<u32>)]) {
        let mut table = AllowedIps::new();
        for &(n, v) in inserts {
            table.insert(net(n), v);
        }
        for &(a, want) in lookups {
            assert_eq!(
                table.longest_match(addr(a)).copied(),
                want,
                "lookup {a} in {inserts:?}"
            );
        }
    }

    #[test]
    fn empty_table_matches_nothing() {
        check(&[], &[("10.0.0.1", None), ("::1", None)]);
        assert!(AllowedIps::<u32>::new().is_empty());
    }

    #[test]
    fn host_routes_and_default_routes() {
        check(
            &[
                ("10.0.0.1/32", 1),
                ("0.0.0.0/0", 2),
                ("fd00::1/128", 3),
                ("::/0", 4),
            ],
            &[
                ("10.0.0.1", Some(1)),
                ("10.0.0.2", Some(2)),
                ("255.255.255.255", Some(2)),
                ("0.0.0.0", Some(2)),
                ("fd00::1", Some(3)),
                ("fd00::2", Some(4)),
                ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Some(4)),
            ],
        );
    }

    #[test]
    fn longest_prefix_wins_over_overlaps() {
        check(
            &[
                ("10.0.0.0/8", 1),
                ("10.1.0.0/16", 2),
                ("10.1.2.0/24", 3),
                ("10.1.2.128/25", 4),
                ("10.1.3.0/24", 5),
                ("192.168.0.0/16", 6),
            ],
            &[
                ("10.9.9.9", Some(1)),
                ("10.1.9.9", Some(2)),
                ("10.1.2.1", Some(3)),
                ("10.1.2.127", Some(3)),
                ("10.1.2.128", Some(4)),
                ("10.1.2.255", Some(4)),
                ("10.1.3.7", Some(5)),
                ("10.1.4.0", Some(2)),
                ("11.0.0.0", None),
                ("9.255.255.255", None),
                ("192.168.255.1", Some(6)),
                ("192.169.0.1", None),
            ],
        );
    }

    #[test]
    fn insertion_order_does_not_matter() {
        // Longer prefixes first: the shorter ones must split existing nodes.
        check(
            &[
                ("10.1.2.128/25", 4),
                ("10.1.2.0/24", 3),
                ("10.1.0.0/16", 2),
                ("10.0.0.0/8", 1),
            ],
            &[
                ("10.9.9.9", Some(1)),
                ("10.1.9.9", Some(2)),
                ("10.1.2.1", Some(3)),
                ("10.1.2.200", Some(4)),
            ],
        );
    }

    #[test]
    fn families_do_not_mix() {
        check(
            &[("0.0.0.0/0", 1)],
            &[
                ("::ffff:10.0.0.1", None),
                ("::", None),
                ("10.0.0.1", Some(1)),
            ],
        );
        check(
            &[("::/0", 2), ("::ffff:0.0.0.0/96", 3)],
            &[
                ("10.0.0.1", None),
                ("::ffff:10.0.0.1", Some(3)),
                ("::1", Some(2)),
            ],
        );
    }

    #[test]
    fn ipv6_prefixes() {
        check(
            &[
                ("fd7a:115c:a1e0::/48", 1),
                ("fd7a:115c:a1e0:ab12::/64", 2),
                ("fd7a:115c:a1e0:ab12::1/128", 3),
                ("2001:db8::/32", 4),
            ],
            &[
                ("fd7a:115c:a1e0::9", Some(1)),
                ("fd7a:115c:a1e0:ab12::9", Some(2)),
                ("fd7a:115c:a1e0:ab12::1", Some(3)),
                ("fd7a:115c:a1e1::", None),
                ("2001:db8:ffff::1", Some(4)),
                ("2001:db9::", None),
            ],
        );
    }

    #[test]
    fn insert_normalises_host_bits_and_replaces() {
        let mut table = AllowedIps::new();
        assert_eq!(table.insert(net("10.1.2.3/8"), 1), None);
        assert_eq!(table.insert(net("10.0.0.0/8"), 2), Some(1));
        assert_eq!(
            table.iter().collect::<Vec<_>>(),
            vec![(net("10.0.0.0/8"), &2)]
        );
        assert_eq!(table.remove(net("10.200.0.0/8")), Some(2));
        assert!(table.is_empty());
    }

    #[test]
    fn remove_is_exact_and_keeps_the_rest() {
        let mut table = AllowedIps::new();
        for (n, v) in [("10.0.0.0/8", 1), ("10.1.0.0/16", 2), ("10.1.2.0/24", 3)] {
            table.insert(net(n), v);
        }
        assert_eq!(table.remove(net("10.1.0.0/17")), None);
        assert_eq!(table.remove(net("10.0.0.0/7")), None);
        assert_eq!(table.remove(net("::/0")), None);
        assert_eq!(table.remove(net("10.1.0.0/16")), Some(2));
        assert_eq!(table.remove(net("10.1.0.0/16")), None);
        assert_eq!(table.longest_match(addr("10.1.9.9")), Some(&1));
        assert_eq!(table.longest_match(addr("10.1.2.9")), Some(&3));
    }

    #[test]
    fn remove_value_removes_a_peer_everywhere() {
        let mut table = AllowedIps::new();
        for (n, v) in [
            ("10.0.0.0/8", 'a'),
            ("10.1.0.0/16", 'b'),
            ("10.1.2.0/24", 'a'),
            ("fd00::/8", 'a'),
            ("fd00:1::/32", 'b'),
        ] {
            table.insert(net(n), v);
        }
        assert_eq!(table.remove_value(|&v| v == 'a'), 3);
        assert_eq!(
            table.iter().collect::<Vec<_>>(),
            vec![(net("10.1.0.0/16"), &'b'), (net("fd00:1::/32"), &'b')]
        );
        assert_eq!(table.longest_match(addr("10.1.2.3")), Some(&'b'));
        assert_eq!(table.longest_match(addr("10.2.0.0")), None);
        assert_eq!(table.remove_value(|_| true), 2);
        assert!(table.is_empty());
    }

    #[test]
    fn iter_order() {
        let mut table = AllowedIps::new();
        for (i, n) in [
            "fd00::/8",
            "10.1.0.0/16",
            "0.0.0.0/0",
            "10.0.0.0/8",
            "192.168.1.1/32",
            "10.128.0.0/9",
        ]
        .into_iter()
        .enumerate()
        {
            table.insert(net(n), i);
        }
        let nets: Vec<String> = table.iter().map(|(n, _)| n.to_string()).collect();
        assert_eq!(
            nets,
            [
                "0.0.0.0/0",
                "10.0.0.0/8",
                "10.1.0.0/16",
                "10.128.0.0/9",
                "192.168.1.1/32",
                "fd00::/8"
            ]
        );
    }

    /// The obviously correct implementation the trie is checked against.
    #[derive(Default)]
    struct Naive(BTreeMap<IpNet, u8>);

    impl Naive {
        fn longest_match(&self, addr: IpAddr) -> Option<&u8> {
            self.0
                .iter()
                .filter(|(n, _)| n.contains(&addr))
                .max_by_key(|(n, _)| n.prefix_len())
                .map(|(_, v)| v)
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(IpNet, u8),
        Remove(IpNet),
        RemoveValue(u8),
    }

    /// Addresses drawn so that prefixes often overlap: only a few high bits
    /// vary freely, the rest are mostly zero.
    fn any_addr() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            (any::<u32>(), 0u32..=32).prop_map(|(a, keep)| {
                let a = if keep == 0 {
                    0
                } else {
                    a & (u32::MAX << (32 - keep))
                };
                IpAddr::from(a.to_be_bytes())
            }),
            (any::<u128>(), 0u32..=128).prop_map(|(a, keep)| {
                let a = if keep == 0 {
                    0
                } else {
                    a & (u128::MAX << (128 - keep))
                };
                IpAddr::from(a.to_be_bytes())
            }),
        ]
    }

    fn any_net() -> impl Strategy<Value = IpNet> {
        (any_addr(), any::<u8>()).prop_map(|(a, len)| {
            let max = if a.is_ipv4() { 33 } else { 129 };
            IpNet::new(a, len % max).unwrap()
        })
    }

    fn any_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (any_net(), 0u8..8).prop_map(|(n, v)| Op::Insert(n, v)),
            2 => any_net().prop_map(Op::Remove),
            1 => (0u8..8).prop_map(Op::RemoveValue),
        ]
    }

    proptest! {
        #[test]
        fn matches_naive_implementation(
            ops in prop::collection::vec(any_op(), 0..60),
            probes in prop::collection::vec(any_addr(), 0..40),
        ) {
            let mut trie = AllowedIps::new();
            let mut naive = Naive::default();
            let mut queries = probes;
            for op in ops {
                match op {
                    Op::Insert(n, v) => {
                        queries.extend([n.network(), n.broadcast()]);
                        prop_assert_eq!(trie.insert(n, v), naive.0.insert(n.trunc(), v));
                    }
                    Op::Remove(n) => {
                        prop_assert_eq!(trie.remove(n), naive.0.remove(&n.trunc()));
                    }
                    Op::RemoveValue(v) => {
                        let before = naive.0.len();
                        naive.0.retain(|_, x| *x != v);
                        prop_assert_eq!(trie.remove_value(|&x| x == v), before - naive.0.len());
                    }
                }
            }
            for q in queries {
                prop_assert_eq!(trie.longest_match(q), naive.longest_match(q), "{}", q);
            }
            let mut entries: Vec<(IpNet, u8)> = trie.iter().map(|(n, v)| (n, *v)).collect();
            // iter() yields IPv4 before IPv6 and addresses in order, which is
            // the BTreeMap order too except for prefix-before-contained ties.
            entries.sort();
            prop_assert_eq!(entries, naive.0.into_iter().collect::<Vec<_>>());
            prop_assert_eq!(trie.is_empty(), trie.iter().next().is_none());
        }
    }
}
