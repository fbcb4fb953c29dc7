//! Data-driven tests: every case is a policy text and the expected result,
//! through one `check` helper.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::{Compiled, Node, Policy, Proto};

/// The inventory every case is compiled against: slice `a` holds alice
/// (tag:edge), bob (tag:db) and carol; slice `b` holds dave (tag:db) and
/// erin (tag:edge).
fn inventory() -> Vec<Node> {
    let node = |id: u8, name: &str, slice: &str, tags: &[&str]| Node {
        id: u64::from(id),
        name: name.to_owned(),
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        slice: slice.to_owned(),
        ipv4: Ipv4Addr::new(100, 64, 0, id),
        ipv6: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::from(id)),
    };
    vec![
        node(1, "alice", "a", &["tag:edge"]),
        node(2, "bob", "a", &["tag:db"]),
        node(3, "carol", "a", &[]),
        node(4, "dave", "b", &["tag:db"]),
        node(5, "erin", "b", &["tag:edge"]),
    ]
}

/// Parses and compiles `policy` against [`inventory`] and compares the
/// outcome with `expect`: the error exactly as shown to the user, or per
/// node its view and the IPv4 part of its filter (sources by name).
fn check(policy: &str, expect: &str) {
    let got = match Policy::parse(policy) {
        Err(e) => e.to_string(),
        Ok(p) => match Compiled::new(p, &inventory()) {
            Err(e) => e.to_string(),
            Ok(c) => render(&c),
        },
    };
    let got = got.trim_end();
    let expect = expect.trim();
    if std::env::var_os("ACL_BLESS").is_some() && got != expect {
        eprintln!("BLESS {expect:?} => {got:?}");
        return;
    }
    assert_eq!(got, expect, "policy:\n{policy}");
}

fn render(c: &Compiled) -> String {
    let nodes = inventory();
    let name = |id: u64| {
        nodes
            .iter()
            .find(|n| n.id == id)
            .map_or("?", |n| n.name.as_str())
    };
    let mut out = String::new();
    for n in &nodes {
        let view: Vec<_> = c.view(n.id).into_iter().map(name).collect();
        let filter: Vec<_> = c
            .filter(n.id)
            .into_iter()
            .filter_map(|r| {
                let src = nodes
                    .iter()
                    .find(|m| ipnet::IpNet::from(std::net::IpAddr::V4(m.ipv4)) == r.source)?;
                let (lo, hi) = r.ports;
                let ports = if r.ports == crate::ALL_PORTS {
                    "*".to_owned()
                } else if lo == hi {
                    lo.to_string()
                } else {
                    format!("{lo}-{hi}")
                };
                Some(format!("{} {}/{ports}", src.name, r.protocol))
            })
            .collect();
        if !view.is_empty() || !filter.is_empty() {
            let line = format!(
                "{}: sees {}; accepts {}",
                n.name,
                view.join(" "),
                filter.join(", ")
            );
            out += line.trim_end();
            out.push('\n');
        }
    }
    if out.is_empty() {
        out = "nothing allowed".to_owned();
    }
    out
}

const DEFS: &str = r#"
  "slices": ["a", "b"],
  "groups": {"group:op": ["alice", "bob"]},
  "tags": {"tag:edge": ["group:op"], "tag:db": ["alice"]},
  "hosts": {"backup": "10.1.0.0/16"},
  "functions": {"fn:resize": ["tag:edge"]},
"#;

fn with_defs(rest: &str) -> String {
    format!("{{{DEFS}{rest}}}")
}

#[test]
fn hujson_comments_and_trailing_commas() {
    check(
        "// a policy\n{ /* slices */ \"slices\": [\"a\",], \"acls\": [\n {\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:*\"],},\n],\n}\n",
        "
alice: sees bob carol; accepts bob 0/*, carol 0/*
bob: sees alice carol; accepts alice 0/*, carol 0/*
carol: sees alice bob; accepts alice 0/*, bob 0/*
dave: sees erin; accepts erin 0/*
erin: sees dave; accepts dave 0/*",
    );
}

#[test]
fn syntax_errors() {
    check("", "line 1, column 1: unexpected end of input");
    check(
        "{\n  \"slices\": [\"a\" \"b\"]}",
        "line 2, column 18: expected ',' or ']'",
    );
    check("{ /* open", "line 1, column 3: unterminated comment");
    check("{\"a\": \"x}", "line 1, column 7: unterminated string");
    check("{} x", "line 1, column 4: unexpected text after the policy");
    check(
        "[".repeat(100).as_str(),
        "line 1, column 33: nested more than 32 levels deep",
    );
    let huge = format!("{{\"slices\": [\"{}\"]}}", "a".repeat(crate::MAX_INPUT));
    check(
        &huge,
        &format!(
            "line 1, column 1: policy is {} bytes, more than the limit of {}",
            huge.len(),
            crate::MAX_INPUT
        ),
    );
}

#[test]
fn unknown_names_with_suggestions() {
    let acls = |src: &str, dst: &str| {
        with_defs(&format!(
            "\"acls\": [\n  {{\"action\": \"accept\", \"src\": [{src}], \"dst\": [{dst}]}},\n]"
        ))
    };
    check(
        &acls("\"group:ops\"", "\"*:*\""),
        "line 8, column 32: unknown group 'group:ops' in acls[0].src; did you mean 'group:op'?",
    );
    check(
        &acls("\"tag:edg\"", "\"*:*\""),
        "line 8, column 32: unknown tag 'tag:edg' in acls[0].src; did you mean 'tag:edge'?",
    );
    check(
        &acls("\"*\"", "\"slice:c:*\""),
        "line 8, column 46: unknown slice 'c' in acls[0].dst",
    );
    check(
        &acls("\"*\"", "\"fn:resise:80\""),
        "line 8, column 46: unknown function 'fn:resise' in acls[0].dst; did you mean 'fn:resize'?",
    );
    check(
        &acls("\"*\"", "\"tag:zzzzzz:80\""),
        "line 8, column 46: unknown tag 'tag:zzzzzz' in acls[0].dst",
    );
    check(&acls("\"usr:x\"", "\"*:*\""), "line 8, column 32: unknown selector kind 'usr:' in acls[0].src; expected tag:, group:, slice: or fn:");
    check(
        &with_defs("\"acl\": []"),
        "line 7, column 1: unknown field 'acl' in the policy; did you mean 'acls'?",
    );
    check(
        "{\"acls\": [{\"action\": \"accept\", \"src\": [], \"dts\": []}]}",
        "line 1, column 43: unknown field 'dts' in acls[0]; did you mean 'dst'?",
    );
    check(
        "{\"tags\": {\"tag:x\": [\"group:nope\"]}}",
        "line 1, column 21: unknown group 'group:nope' in tags[\"tag:x\"]",
    );
}

#[test]
fn bad_ports_protocols_prefixes() {
    let rule = |body: &str| {
        format!("{{\"acls\": [{{\"action\": \"accept\", \"src\": [\"*\"], {body}}}]}}")
    };
    check(
        &rule("\"dst\": [\"*:80-22\"]"),
        "line 1, column 54: bad port range '80-22' in acls[0].dst: 80 is greater than 22",
    );
    check(
        &rule("\"dst\": [\"*:http\"]"),
        "line 1, column 54: bad port 'http' in acls[0].dst",
    );
    check(
        &rule("\"dst\": [\"*:70000\"]"),
        "line 1, column 54: bad port '70000' in acls[0].dst",
    );
    check(
        &rule("\"dst\": [\"web\"]"),
        "line 1, column 54: destination 'web' in acls[0].dst needs ports, as 'web:*' or 'web:80'",
    );
    check(
        &rule("\"dst\": [\"*:*\"], \"proto\": \"tpc\""),
        "line 1, column 71: unknown protocol 'tpc' in acls[0].proto; did you mean 'tcp'?",
    );
    check(
        &rule("\"dst\": [\"*:22\"], \"proto\": \"icmp\""),
        "line 1, column 54: icmp has no ports: write '*' in acls[0].dst",
    );
    check(
        &rule("\"dst\": [\"10.0.0.0/33:22\"]"),
        "line 1, column 54: bad prefix '10.0.0.0/33' in acls[0].dst",
    );
    check(
        &rule("\"dst\": [\"fd00::/64:22,80-90\"]"),
        "
alice: sees bob carol; accepts bob 0/22, bob 0/80-90, carol 0/22, carol 0/80-90
bob: sees alice carol; accepts alice 0/22, alice 0/80-90, carol 0/22, carol 0/80-90
carol: sees alice bob; accepts alice 0/22, alice 0/80-90, bob 0/22, bob 0/80-90
dave: sees erin; accepts erin 0/22, erin 0/80-90
erin: sees dave; accepts dave 0/22, dave 0/80-90",
    );
    check(
        "{\"acls\": [{\"action\": \"deny\", \"src\": [], \"dst\": []}]}",
        "line 1, column 22: acls[0].action must be \"accept\" (rules only allow)",
    );
    check(
        "{\"acls\": [{\"action\": \"accept\", \"dst\": []}]}",
        "line 1, column 11: acls[0] has no 'src'",
    );
}

#[test]
fn compile_views_and_filters() {
    // Inside a slice, a rule is one-way for filters but makes both ends
    // visible to each other; the same tags in slice b are untouched.
    check(
        r#"{"slices": ["a", "b"], "tags": {"tag:edge": [], "tag:db": []},
            "acls": [{"action": "accept", "src": ["tag:edge"], "dst": ["tag:db:5432"], "proto": "tcp"}]}"#,
        "
alice: sees bob; accepts
bob: sees alice; accepts alice 6/5432
dave: sees erin; accepts erin 6/5432
erin: sees dave; accepts",
    );
    // `*` stays inside each slice.
    check(
        r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:22,80-90"]}]}"#,
        "
alice: sees bob carol; accepts bob 0/22, bob 0/80-90, carol 0/22, carol 0/80-90
bob: sees alice carol; accepts alice 0/22, alice 0/80-90, carol 0/22, carol 0/80-90
carol: sees alice bob; accepts alice 0/22, alice 0/80-90, bob 0/22, bob 0/80-90
dave: sees erin; accepts erin 0/22, erin 0/80-90
erin: sees dave; accepts dave 0/22, dave 0/80-90",
    );
    // A bridge crosses slices, only for the nodes it names.
    check(
        r#"{"slices": ["a", "b"], "acls": [{"action": "accept", "src": ["slice:a"], "dst": ["dave:*"], "proto": "icmp", "bridge": true}]}"#,
        "
alice: sees dave; accepts
bob: sees dave; accepts
carol: sees dave; accepts
dave: sees alice bob carol; accepts alice 1/*, bob 1/*, carol 1/*",
    );
    // Without the bridge the same rule allows nothing.
    check(
        r#"{"slices": ["a", "b"], "acls": [{"action": "accept", "src": ["slice:a"], "dst": ["dave:*"]}]}"#,
        "nothing allowed",
    );
    // Groups, hosts, prefixes and functions select by name and address.
    check(
        r#"{"groups": {"group:op": ["carol"]}, "hosts": {"db": "100.64.0.2"},
            "functions": {"fn:resize": ["100.64.0.0/24"]},
            "acls": [{"action": "accept", "src": ["group:op"], "dst": ["db:443"], "proto": "tcp"},
                     {"action": "accept", "src": ["erin"], "dst": ["fn:resize:8080"], "proto": "udp"}]}"#,
        "
bob: sees carol; accepts carol 6/443
carol: sees bob; accepts
dave: sees erin; accepts erin 17/8080
erin: sees dave; accepts",
    );
}

#[test]
fn policy_tests_gate_the_policy() {
    let policy = |tests: &str| {
        format!(
            r#"{{"slices": ["a", "b"], "tags": {{"tag:edge": [], "tag:db": []}},
  "acls": [{{"action": "accept", "src": ["tag:edge"], "dst": ["tag:db:5432"], "proto": "tcp"}}],
  "tests": [
    {tests}
  ]}}"#
        )
    };
    check(
        &policy(
            r#"{"src": "tag:edge", "accept": ["tag:db:5432"], "deny": ["tag:db:22"]}, {"src": "slice:a", "deny": ["slice:b:5432"]}"#,
        ),
        "
alice: sees bob; accepts
bob: sees alice; accepts alice 6/5432
dave: sees erin; accepts erin 6/5432
erin: sees dave; accepts",
    );
    // "can reach" holds inside a slice: dave, in slice b, is not asked for.
    check(
        &policy(r#"{"src": "alice", "accept": ["tag:db:5432"]}"#),
        "
alice: sees bob; accepts
bob: sees alice; accepts alice 6/5432
dave: sees erin; accepts erin 6/5432
erin: sees dave; accepts",
    );
    check(
        &policy(r#"{"src": "alice", "accept": ["tag:db:5432"], "bridge": true}"#),
        "line 4, column 5: tests[0] failed: 'alice' cannot reach 'dave' on tcp/5432: different slices and no bridge: acls[0] (line 2) match but none has \"bridge\": true",
    );
    check(
        &policy(r#"{"src": "alice", "deny": ["bob:5432"]}"#),
        "line 4, column 5: tests[0] failed: 'alice' can reach 'bob' on tcp/5432: allowed by acls[0] (line 2)",
    );
    check(
        &policy(r#"{"src": "alice", "accept": ["bob:22"]}"#),
        "line 4, column 5: tests[0] failed: 'alice' cannot reach 'bob' on tcp/22: acls[0] (line 2) match both nodes but not this port and protocol",
    );
    check(
        &policy(r#"{"src": "alice", "proto": "udp", "deny": ["carol:1"]}, {"src": "carol", "accept": ["bob:5432"]}"#),
        "line 4, column 60: tests[1] failed: 'carol' cannot reach 'bob' on tcp/5432: no rule matches the source",
    );
    check(
        &policy(r#"{"src": "bob", "deny": ["alice:5432"]}, {"src": "alice", "accept": ["carol:5432"]}"#),
        "line 4, column 45: tests[1] failed: 'alice' cannot reach 'carol' on tcp/5432: rules match the source but none the destination",
    );
}

#[test]
fn explain_says_which_rule() {
    let p = Policy::parse(
        r#"{"acls": [
  {"action": "accept", "src": ["alice"], "dst": ["bob:80"], "proto": "tcp"},
  {"action": "accept", "src": ["alice"], "dst": ["bob:443"]},
]}"#,
    );
    let c = match p.map(|p| Compiled::new(p, &inventory())) {
        Ok(Ok(c)) => c,
        other => panic!("{other:?}"),
    };
    let e = |s, d, port, proto| c.explain(s, d, port, proto).to_string();
    assert_eq!(e(1, 2, 80, Proto::Tcp), "allowed by acls[0] (line 2)");
    assert_eq!(e(1, 2, 443, Proto::Udp), "allowed by acls[1] (line 3)");
    assert_eq!(
        e(1, 2, 80, Proto::Udp),
        "acls[0] (line 2), acls[1] (line 3) match both nodes but not this port and protocol"
    );
    assert_eq!(e(2, 1, 80, Proto::Tcp), "no rule matches the source");
    assert_eq!(e(1, 9, 80, Proto::Tcp), "no node 9");
    assert_eq!(c.node_by_name("bob").map(|n| n.id), Some(2));
    assert_eq!(c.node_by_name("zed"), None);
}

#[test]
fn upsert_recomputes_one_node() {
    let p = Policy::parse(
        r#"{"tags": {"tag:db": []}, "acls": [{"action": "accept", "src": ["alice"], "dst": ["tag:db:5432"]}]}"#,
    );
    let mut c = match p.map(|p| Compiled::new(p, &inventory())) {
        Ok(Ok(c)) => c,
        other => panic!("{other:?}"),
    };
    assert_eq!(c.view(1).into_iter().collect::<Vec<_>>(), [2]);
    let mut carol = inventory()[2].clone();
    carol.tags.push("tag:db".to_owned());
    // carol now sees alice: both must be told; bob and the others are not.
    assert_eq!(c.upsert_node(carol).into_iter().collect::<Vec<_>>(), [1, 3]);
    assert_eq!(c.view(1).into_iter().collect::<Vec<_>>(), [2, 3]);
    assert_eq!(c.remove_node(2).into_iter().collect::<Vec<_>>(), [1]);
    assert_eq!(c.view(1).into_iter().collect::<Vec<_>>(), [3]);
    assert!(c.filter(2).is_empty());
}

/// The example in docs/policy.md and the fuzz seed are valid policies.
#[test]
fn documented_examples_compile() {
    let doc = include_str!("../../docs/policy.md");
    let example = doc
        .split("```jsonc\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .unwrap_or_default();
    let seed = include_str!("../fuzz/seeds/parse/example.hujson");
    for text in [example, seed] {
        let policy = match Policy::parse(text) {
            Ok(p) => p,
            Err(e) => panic!("{e}\n{text}"),
        };
        if let Err(e) = Compiled::new(policy, &[]) {
            panic!("{e}");
        }
    }
    // The example's bridge: slice lab reaches db1 in slice shop on 5432 only.
    let policy = Policy::parse(example).unwrap_or_default();
    let node = |id: u8, name: &str, slice: &str| Node {
        id: u64::from(id),
        name: name.to_owned(),
        tags: Vec::new(),
        slice: slice.to_owned(),
        ipv4: Ipv4Addr::new(100, 64, 0, id),
        ipv6: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::from(id)),
    };
    let nodes = [node(7, "db1", "shop"), node(8, "lab1", "lab")];
    let c = match Compiled::new(policy, &nodes) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(
        c.explain(8, 7, 5432, Proto::Udp).to_string(),
        "allowed by acls[3] (line 16)"
    );
    assert_eq!(
        c.explain(7, 8, 5432, Proto::Tcp).to_string(),
        "no rule matches the source"
    );
    assert_eq!(c.view(7).into_iter().collect::<Vec<_>>(), [8]);
}

/// Positions are found in one pass: a policy of many rules on one line
/// reads quickly, and its rules' positions are right.
#[test]
fn many_rules_read_in_linear_time() {
    let rule = r#"{"action": "accept", "src": ["a"], "dst": ["b:1"]},"#;
    let text = format!("{{\"acls\": [{}\n{rule}]}}", rule.repeat(15_000));
    let start = std::time::Instant::now();
    let policy = match Policy::parse(&text) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    };
    assert!(
        start.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    let last = policy.acls.last().map(|r| r.pos);
    assert_eq!(last, Some(crate::Pos { line: 2, column: 1 }));
    assert_eq!(
        policy.acls.get(1).map(|r| r.pos),
        Some(crate::Pos {
            line: 1,
            column: 11 + rule.len()
        })
    );
}

#[test]
fn definition_errors() {
    check(
        r#"{"slices": ["a", "a"]}"#,
        "line 1, column 18: slice 'a' is listed twice",
    );
    check(r#"{"slices": ["a b"]}"#, "line 1, column 13: bad slice name 'a b': only letters, digits, '-', '_' and '.' are allowed");
    check(
        r#"{"groups": {"ops": []}}"#,
        "line 1, column 13: 'ops' must start with 'group:'",
    );
    check(
        r#"{"groups": {"group:op": ["alice", 3]}}"#,
        "line 1, column 35: groups[\"group:op\"] must be an array of strings",
    );
    check(
        r#"{"hosts": {"db": "10.0.0.300"}}"#,
        "line 1, column 18: bad prefix '10.0.0.300' in hosts[\"db\"]",
    );
    check(
        r#"{"functions": {"fn:a": ["*"], "fn:b": ["fn:a"]}}"#,
        "line 1, column 40: functions[\"fn:b\"] names a function; give the nodes that serve it",
    );
    check(
        r#"{"acls": {}}"#,
        "line 1, column 10: acls must be an array",
    );
    check(
        r#"{"acls": [{"action": "accept", "action": "accept"}]}"#,
        "line 1, column 32: duplicate field 'action' in acls[0]",
    );
    check(
        r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"], "bridge": "yes"}]}"#,
        "line 1, column 72: acls[0].bridge must be true or false",
    );
    check(
        r#"{"tests": [{"src": "*", "accept": ["*:22-23"]}]}"#,
        "line 1, column 36: bad port '22-23' in tests[0].accept: a test names one port",
    );
}

#[test]
fn tag_owners() {
    let p = match Policy::parse(
        r#"{"groups": {"group:op": ["bob"]}, "tags": {"tag:db": ["alice", "group:op"], "tag:x": []}}"#,
    ) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    };
    assert!(p.may_assign("tag:db", "alice"));
    assert!(p.may_assign("tag:db", "bob"));
    assert!(!p.may_assign("tag:db", "carol"));
    assert!(!p.may_assign("tag:x", "alice"));
    assert!(!p.may_assign("tag:nope", "alice"));
}
