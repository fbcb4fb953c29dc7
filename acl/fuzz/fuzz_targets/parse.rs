//! The policy parser on arbitrary text: it must return a policy or an
//! error, never panic; a policy that parses is compiled against a small
//! inventory and explained, which must not panic either.
#![no_main]

use std::net::{Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use meshd_acl::{Compiled, Node, Policy, Proto};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(policy) = Policy::parse(text) else {
        return;
    };
    let nodes: Vec<Node> = (1..=3u8)
        .map(|i| Node {
            id: u64::from(i),
            name: format!("n{i}"),
            tags: vec!["tag:a".to_owned()],
            slice: if i == 3 { "b" } else { "a" }.to_owned(),
            ipv4: Ipv4Addr::new(100, 64, 0, i),
            ipv6: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::from(i)),
        })
        .collect();
    if let Ok(c) = Compiled::new(policy, &nodes) {
        for n in &nodes {
            let _ = c.view(n.id);
            let _ = c.filter(n.id);
            let _ = c.explain(n.id, 1, 22, Proto::Tcp).to_string();
        }
    }
});
