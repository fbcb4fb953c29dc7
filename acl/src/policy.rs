//! The typed policy and its reader (docs/policy.md). Every name a rule
//! uses is checked against the definitions here, so compilation cannot
//! meet an undefined tag, group, slice, host or function.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use crate::error::{did_you_mean, ParseError, Pos};
use crate::hujson::{self, Spanned, Value};

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Selector {
    /// `*`: every node.
    All,
    /// A bare name: the node of that name, if the inventory has one.
    Node(String),
    /// `tag:x`, with the prefix.
    Tag(String),
    /// `group:x`, with the prefix.
    Group(String),
    /// `slice:x`, without the prefix.
    Slice(String),
    /// `fn:x`, with the prefix: the nodes that serve the function.
    Function(String),
    /// A name from `hosts`, resolved.
    Host { name: String, net: IpNet },
    /// An address or prefix written in the rule.
    Prefix(IpNet),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
}

impl Proto {
    pub const NAMES: [&'static str; 3] = ["tcp", "udp", "icmp"];

    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
        }
    }
}

/// An inclusive port range.
pub type Ports = (u16, u16);

pub const ALL_PORTS: Ports = (0, u16::MAX);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dest {
    pub selector: Selector,
    pub ports: Vec<Ports>,
}

/// One `accept` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub src: Vec<Selector>,
    pub dst: Vec<Dest>,
    /// `None`: every protocol.
    pub proto: Option<Proto>,
    /// Whether the rule may connect nodes of different slices.
    pub bridge: bool,
    pub pos: Pos,
}

/// One entry of `tests`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Test {
    pub src: Selector,
    pub proto: Proto,
    pub accept: Vec<(Selector, u16)>,
    pub deny: Vec<(Selector, u16)>,
    /// Whether `accept` also asks for pairs in different slices.
    pub bridge: bool,
    pub pos: Pos,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub slices: BTreeSet<String>,
    /// `group:x` → node names.
    pub groups: BTreeMap<String, Vec<String>>,
    /// `tag:x` → who may assign it: node names and `group:x`.
    pub tags: BTreeMap<String, Vec<String>>,
    pub hosts: BTreeMap<String, IpNet>,
    /// `fn:x` → the nodes that serve it.
    pub functions: BTreeMap<String, Vec<Selector>>,
    pub acls: Vec<Rule>,
    pub tests: Vec<Test>,
}

impl Policy {
    pub fn parse(src: &str) -> Result<Policy, ParseError> {
        let root = hujson::parse(src)?;
        Reader {
            src,
            p: Policy::default(),
            last_pos: Cell::new((0, Pos { line: 1, column: 1 })),
        }
        .policy(&root)
    }

    /// Whether the node called `node` may assign `tag`: it is an owner, or
    /// in a group that is.
    pub fn may_assign(&self, tag: &str, node: &str) -> bool {
        self.tags.get(tag).is_some_and(|owners| {
            owners.iter().any(|o| {
                o == node
                    || self
                        .groups
                        .get(o)
                        .is_some_and(|m| m.iter().any(|n| n == node))
            })
        })
    }
}

const TOP: [&str; 7] = [
    "slices",
    "groups",
    "tags",
    "hosts",
    "functions",
    "acls",
    "tests",
];
const RULE: [&str; 5] = ["action", "src", "dst", "proto", "bridge"];
const TEST: [&str; 5] = ["src", "proto", "accept", "deny", "bridge"];

type Fields = [(Spanned<String>, Spanned)];

struct Reader<'a> {
    src: &'a str,
    p: Policy,
    /// The last position computed, and its offset (see `pos`).
    last_pos: Cell<(usize, Pos)>,
}

impl Reader<'_> {
    fn err(&self, at: usize, msg: String) -> ParseError {
        ParseError::new(self.pos(at), msg)
    }

    /// The position of byte offset `at`. Rules and tests ask in increasing
    /// order, so each walks on from the last answer: reading a policy stays
    /// linear in its size however many rules it has.
    fn pos(&self, at: usize) -> Pos {
        let (from, base) = self.last_pos.get();
        let pos = match self.src.get(from..at) {
            Some(between) if from <= at => {
                let newlines = between.matches('\n').count();
                let column = match between.rfind('\n') {
                    Some(i) => between.get(i + 1..).map_or(0, |s| s.chars().count()) + 1,
                    None => base.column + between.chars().count(),
                };
                Pos {
                    line: base.line + newlines,
                    column,
                }
            }
            _ => hujson::position(self.src, at),
        };
        self.last_pos.set((at, pos));
        pos
    }

    fn object<'v>(
        &self,
        v: &'v Spanned,
        path: &str,
        known: &[&str],
    ) -> Result<&'v Fields, ParseError> {
        let Value::Object(fields) = &v.value else {
            return Err(self.err(v.at, format!("{path} must be an object")));
        };
        let mut seen = BTreeSet::new();
        for (k, _) in fields {
            if !known.is_empty() && !known.contains(&k.value.as_str()) {
                return Err(self.err(
                    k.at,
                    format!(
                        "unknown field '{}' in {path}{}",
                        k.value,
                        did_you_mean(&k.value, known.iter().copied())
                    ),
                ));
            }
            if !seen.insert(k.value.as_str()) {
                return Err(self.err(k.at, format!("duplicate field '{}' in {path}", k.value)));
            }
        }
        Ok(fields)
    }

    fn array<'v>(&self, v: &'v Spanned, path: &str) -> Result<&'v [Spanned], ParseError> {
        match &v.value {
            Value::Array(items) => Ok(items),
            _ => Err(self.err(v.at, format!("{path} must be an array"))),
        }
    }

    fn string<'v>(&self, v: &'v Spanned, path: &str) -> Result<&'v str, ParseError> {
        match &v.value {
            Value::Str(s) => Ok(s),
            _ => Err(self.err(v.at, format!("{path} must be a string"))),
        }
    }

    fn strings<'v>(&self, v: &'v Spanned, path: &str) -> Result<Vec<(usize, &'v str)>, ParseError> {
        self.array(v, path)?
            .iter()
            .map(|item| match &item.value {
                Value::Str(s) => Ok((item.at, s.as_str())),
                _ => Err(self.err(item.at, format!("{path} must be an array of strings"))),
            })
            .collect()
    }

    fn policy(mut self, root: &Spanned) -> Result<Policy, ParseError> {
        let fields = self.object(root, "the policy", &TOP)?;
        let get = |name: &str| fields.iter().find(|(k, _)| k.value == name).map(|(_, v)| v);
        // Definitions first, whatever their order in the file, so rules can
        // be checked against all of them.
        if let Some(v) = get("slices") {
            for (at, s) in self.strings(v, "slices")? {
                check_name(s).map_err(|m| self.err(at, format!("bad slice name '{s}': {m}")))?;
                if !self.p.slices.insert(s.to_owned()) {
                    return Err(self.err(at, format!("slice '{s}' is listed twice")));
                }
            }
        }
        if let Some(v) = get("groups") {
            for (k, members) in self.object(v, "groups", &[])? {
                self.prefixed(k, "group:")?;
                let path = format!("groups[\"{}\"]", k.value);
                let mut names = Vec::new();
                for (at, m) in self.strings(members, &path)? {
                    check_name(m)
                        .map_err(|e| self.err(at, format!("bad node name '{m}' in {path}: {e}")))?;
                    names.push(m.to_owned());
                }
                self.p.groups.insert(k.value.clone(), names);
            }
        }
        if let Some(v) = get("tags") {
            for (k, owners) in self.object(v, "tags", &[])? {
                self.prefixed(k, "tag:")?;
                let path = format!("tags[\"{}\"]", k.value);
                let mut names = Vec::new();
                for (at, o) in self.strings(owners, &path)? {
                    if o.starts_with("group:") {
                        self.defined(at, o, self.p.groups.keys(), "group", &path)?;
                    } else {
                        check_name(o)
                            .map_err(|e| self.err(at, format!("bad owner '{o}' in {path}: {e}")))?;
                    }
                    names.push(o.to_owned());
                }
                self.p.tags.insert(k.value.clone(), names);
            }
        }
        if let Some(v) = get("hosts") {
            for (k, addr) in self.object(v, "hosts", &[])? {
                check_name(&k.value)
                    .map_err(|e| self.err(k.at, format!("bad host name '{}': {e}", k.value)))?;
                let path = format!("hosts[\"{}\"]", k.value);
                let s = self.string(addr, &path)?;
                let net = parse_prefix(s)
                    .ok_or_else(|| self.err(addr.at, format!("bad prefix '{s}' in {path}")))?;
                self.p.hosts.insert(k.value.clone(), net);
            }
        }
        if let Some(v) = get("functions") {
            // Names first, so a function's nodes may be given by another function.
            let fns = self.object(v, "functions", &[])?;
            for (k, _) in fns {
                self.prefixed(k, "fn:")?;
                self.p.functions.insert(k.value.clone(), Vec::new());
            }
            for (k, nodes) in fns {
                let path = format!("functions[\"{}\"]", k.value);
                let sels = self
                    .strings(nodes, &path)?
                    .into_iter()
                    .map(|(at, s)| match self.selector(at, s, &path)? {
                        // Functions given by functions could loop.
                        Selector::Function(_) => Err(self.err(
                            at,
                            format!("{path} names a function; give the nodes that serve it"),
                        )),
                        sel => Ok(sel),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                self.p.functions.insert(k.value.clone(), sels);
            }
        }
        if let Some(v) = get("acls") {
            for (i, rule) in self.array(v, "acls")?.iter().enumerate() {
                let r = self.rule(rule, &format!("acls[{i}]"))?;
                self.p.acls.push(r);
            }
        }
        if let Some(v) = get("tests") {
            for (i, test) in self.array(v, "tests")?.iter().enumerate() {
                let t = self.test(test, &format!("tests[{i}]"))?;
                self.p.tests.push(t);
            }
        }
        Ok(self.p)
    }

    fn prefixed(&self, k: &Spanned<String>, prefix: &str) -> Result<(), ParseError> {
        let name = k
            .value
            .strip_prefix(prefix)
            .ok_or_else(|| self.err(k.at, format!("'{}' must start with '{prefix}'", k.value)))?;
        check_name(name).map_err(|e| self.err(k.at, format!("bad name '{}': {e}", k.value)))
    }

    fn defined<'k>(
        &self,
        at: usize,
        name: &str,
        names: impl Iterator<Item = &'k String> + Clone,
        kind: &str,
        path: &str,
    ) -> Result<(), ParseError> {
        if names.clone().any(|n| n == name) {
            return Ok(());
        }
        Err(self.err(
            at,
            format!(
                "unknown {kind} '{name}' in {path}{}",
                did_you_mean(name, names.map(String::as_str))
            ),
        ))
    }

    fn selector(&self, at: usize, s: &str, path: &str) -> Result<Selector, ParseError> {
        if s == "*" {
            return Ok(Selector::All);
        }
        if s.starts_with("tag:") {
            self.defined(at, s, self.p.tags.keys(), "tag", path)?;
            return Ok(Selector::Tag(s.to_owned()));
        }
        if s.starts_with("group:") {
            self.defined(at, s, self.p.groups.keys(), "group", path)?;
            return Ok(Selector::Group(s.to_owned()));
        }
        if s.starts_with("fn:") {
            self.defined(at, s, self.p.functions.keys(), "function", path)?;
            return Ok(Selector::Function(s.to_owned()));
        }
        if let Some(name) = s.strip_prefix("slice:") {
            if !self.p.slices.contains(name) {
                let dym = did_you_mean(name, self.p.slices.iter().map(String::as_str));
                return Err(self.err(at, format!("unknown slice '{name}' in {path}{dym}")));
            }
            return Ok(Selector::Slice(name.to_owned()));
        }
        if let Some(&net) = self.p.hosts.get(s) {
            return Ok(Selector::Host {
                name: s.to_owned(),
                net,
            });
        }
        if s.contains('/') || s.parse::<IpAddr>().is_ok() {
            return parse_prefix(s)
                .map(Selector::Prefix)
                .ok_or_else(|| self.err(at, format!("bad prefix '{s}' in {path}")));
        }
        if let Some((kind, _)) = s.split_once(':') {
            return Err(self.err(
                at,
                format!("unknown selector kind '{kind}:' in {path}; expected tag:, group:, slice: or fn:"),
            ));
        }
        check_name(s).map_err(|e| self.err(at, format!("bad selector '{s}' in {path}: {e}")))?;
        Ok(Selector::Node(s.to_owned()))
    }

    /// `selector:ports`; the ports follow the last colon, so IPv6 prefixes
    /// must be written with their length (`fd00::1/128:22`).
    fn dest<'s>(
        &self,
        at: usize,
        s: &'s str,
        path: &str,
    ) -> Result<(Selector, &'s str), ParseError> {
        let Some((sel, ports)) = s.rsplit_once(':').filter(|(sel, _)| !sel.is_empty()) else {
            return Err(self.err(
                at,
                format!("destination '{s}' in {path} needs ports, as '{s}:*' or '{s}:80'"),
            ));
        };
        let sel = self.selector(at, sel, path)?;
        Ok((sel, ports))
    }

    fn ports(&self, at: usize, s: &str, path: &str) -> Result<Vec<Ports>, ParseError> {
        if s == "*" {
            return Ok(vec![ALL_PORTS]);
        }
        s.split(',')
            .map(|part| {
                let bad = || self.err(at, format!("bad port '{part}' in {path}"));
                let (lo, hi) = match part.split_once('-') {
                    Some((lo, hi)) => (
                        lo.parse::<u16>().map_err(|_| bad())?,
                        hi.parse::<u16>().map_err(|_| bad())?,
                    ),
                    None => {
                        let p = part.parse::<u16>().map_err(|_| bad())?;
                        (p, p)
                    }
                };
                if lo > hi {
                    return Err(self.err(
                        at,
                        format!("bad port range '{part}' in {path}: {lo} is greater than {hi}"),
                    ));
                }
                Ok((lo, hi))
            })
            .collect()
    }

    fn proto(&self, v: &Spanned, path: &str) -> Result<Proto, ParseError> {
        let s = self.string(v, path)?;
        match s {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            "icmp" => Ok(Proto::Icmp),
            _ => Err(self.err(
                v.at,
                format!(
                    "unknown protocol '{s}' in {path}{}",
                    did_you_mean(s, Proto::NAMES)
                ),
            )),
        }
    }

    fn rule(&self, v: &Spanned, path: &str) -> Result<Rule, ParseError> {
        let fields = self.object(v, path, &RULE)?;
        let get = |name: &str| fields.iter().find(|(k, _)| k.value == name).map(|(_, v)| v);
        let need =
            |name: &str| get(name).ok_or_else(|| self.err(v.at, format!("{path} has no '{name}'")));
        let action = need("action")?;
        if self.string(action, &format!("{path}.action"))? != "accept" {
            return Err(self.err(
                action.at,
                format!("{path}.action must be \"accept\" (rules only allow)"),
            ));
        }
        let proto = get("proto")
            .map(|p| self.proto(p, &format!("{path}.proto")))
            .transpose()?;
        let bridge = match get("bridge") {
            None => false,
            Some(Spanned {
                value: Value::Bool(b),
                ..
            }) => *b,
            Some(b) => return Err(self.err(b.at, format!("{path}.bridge must be true or false"))),
        };
        let spath = format!("{path}.src");
        let src = self
            .strings(need("src")?, &spath)?
            .into_iter()
            .map(|(at, s)| self.selector(at, s, &spath))
            .collect::<Result<Vec<_>, _>>()?;
        let dpath = format!("{path}.dst");
        let mut dst = Vec::new();
        for (at, s) in self.strings(need("dst")?, &dpath)? {
            let (selector, ports) = self.dest(at, s, &dpath)?;
            let ports = self.ports(at, ports, &dpath)?;
            if proto == Some(Proto::Icmp) && ports != [ALL_PORTS] {
                return Err(self.err(at, format!("icmp has no ports: write '*' in {dpath}")));
            }
            dst.push(Dest { selector, ports });
        }
        Ok(Rule {
            src,
            dst,
            proto,
            bridge,
            pos: self.pos(v.at),
        })
    }

    fn test(&self, v: &Spanned, path: &str) -> Result<Test, ParseError> {
        let fields = self.object(v, path, &TEST)?;
        let get = |name: &str| fields.iter().find(|(k, _)| k.value == name).map(|(_, v)| v);
        let src_v = get("src").ok_or_else(|| self.err(v.at, format!("{path} has no 'src'")))?;
        let spath = format!("{path}.src");
        let src = self.selector(src_v.at, self.string(src_v, &spath)?, &spath)?;
        let proto = get("proto")
            .map(|p| self.proto(p, &format!("{path}.proto")))
            .transpose()?;
        let proto = proto.unwrap_or(Proto::Tcp);
        let mut lists = [Vec::new(), Vec::new()];
        for (list, name) in lists.iter_mut().zip(["accept", "deny"]) {
            let Some(items) = get(name) else { continue };
            let lpath = format!("{path}.{name}");
            for (at, s) in self.strings(items, &lpath)? {
                let (sel, port) = self.dest(at, s, &lpath)?;
                let port = if proto == Proto::Icmp && port == "*" {
                    0
                } else {
                    port.parse::<u16>().map_err(|_| {
                        self.err(
                            at,
                            format!("bad port '{port}' in {lpath}: a test names one port"),
                        )
                    })?
                };
                list.push((sel, port));
            }
        }
        let bridge = match get("bridge") {
            None => false,
            Some(Spanned {
                value: Value::Bool(b),
                ..
            }) => *b,
            Some(b) => return Err(self.err(b.at, format!("{path}.bridge must be true or false"))),
        };
        let [accept, deny] = lists;
        Ok(Test {
            src,
            proto,
            accept,
            deny,
            bridge,
            pos: self.pos(v.at),
        })
    }
}

/// Names of nodes, slices, groups, tags, hosts and functions: letters,
/// digits, '-', '_' and '.', as DNS labels and node names allow.
fn check_name(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("empty");
    }
    if s.len() > 63 {
        return Err("longer than 63 characters");
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err("only letters, digits, '-', '_' and '.' are allowed");
    }
    Ok(())
}

/// An address (a host prefix) or a prefix, with host bits cleared.
fn parse_prefix(s: &str) -> Option<IpNet> {
    if let Ok(addr) = s.parse::<IpAddr>() {
        return Some(IpNet::from(addr));
    }
    s.parse::<IpNet>().ok().map(|n| n.trunc())
}
