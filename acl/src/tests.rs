//! Data-driven tests: every case is a policy text and the expected result,
//! through one `check` helper.

use crate::Policy;

/// Parses `policy` and compares the outcome with `expect`: `ok` for a
/// policy that parses, or the error exactly as shown to the user.
fn check(policy: &str, expect: &str) {
    let got = match Policy::parse(policy) {
        Ok(_) => "ok".to_owned(),
        Err(e) => e.to_string(),
    };
    if std::env::var_os("ACL_BLESS").is_some() && got != expect {
        eprintln!("BLESS {expect:?} => {got:?}");
        return;
    }
    assert_eq!(got, expect, "policy:\n{policy}");
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
        "ok",
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
    check(&rule("\"dst\": [\"fd00::/64:22,80-90\"]"), "ok");
    check(
        "{\"acls\": [{\"action\": \"deny\", \"src\": [], \"dst\": []}]}",
        "line 1, column 22: acls[0].action must be \"accept\" (rules only allow)",
    );
    check(
        "{\"acls\": [{\"action\": \"accept\", \"dst\": []}]}",
        "line 1, column 11: acls[0] has no 'src'",
    );
}
