//! The lab's description: public hosts and sites, read from TOML or built in Rust.
//!
//! ```toml
//! [[host]]
//! name = "coord"
//!
//! [[site]]
//! name = "edge"
//! nat = "endpoint-independent"
//! firewall = "open"
//! latency_ms = 20
//! nodes = ["edge1"]
//! ```
use std::collections::BTreeSet;
use std::path::Path;

use serde::Deserialize;

/// How a site's router translates addresses on its uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Nat {
    /// No translation: the site's nodes have public addresses.
    #[default]
    None,
    /// One public port per internal socket, whatever the destination (most home and cloud NATs).
    EndpointIndependent,
    /// A new public port for every destination (carrier-grade and some enterprise NATs).
    Symmetric,
}

/// What a site's router lets out to the internet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Firewall {
    /// Everything leaves.
    #[default]
    Open,
    /// Every outbound UDP datagram is dropped, except DNS to the lab resolver.
    UdpBlocked,
    /// Only TCP to port 443 leaves.
    HttpsOnly,
}

/// Impairment of one uplink (between a site router or a public host and the internet core).
///
/// `latency_ms` is what the uplink adds to a round trip: half of it delays each direction.
/// `jitter_ms` spreads each direction's delay uniformly over ±`jitter_ms`/2 (packets are never
/// reordered). `loss_pct` is the chance that a packet is dropped each time it crosses the uplink.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Impairment {
    pub latency_ms: u32,
    pub jitter_ms: u32,
    pub loss_pct: f64,
}

impl Impairment {
    /// True when the uplink needs the userspace emulator at all.
    pub fn is_active(&self) -> bool {
        self.latency_ms > 0 || self.jitter_ms > 0 || self.loss_pct > 0.0
    }
}

/// A host with a public address, directly on the internet core (for coordinators, relays).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(from = "RawHost")]
pub struct Host {
    pub name: String,
    pub link: Impairment,
}

impl Host {
    pub fn new(name: &str) -> Self {
        Host {
            name: name.to_owned(),
            link: Impairment::default(),
        }
    }
    pub fn latency_ms(mut self, ms: u32) -> Self {
        self.link.latency_ms = ms;
        self
    }
}

/// A site: a router namespace with one or more node namespaces behind it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(from = "RawSite")]
pub struct Site {
    pub name: String,
    pub nat: Nat,
    pub firewall: Firewall,
    pub link: Impairment,
    pub nodes: Vec<String>,
}

// The file format keeps the impairment fields inline; serde's `flatten` cannot be combined
// with `deny_unknown_fields`, so the file is read into these and converted.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    name: String,
    #[serde(default)]
    latency_ms: u32,
    #[serde(default)]
    jitter_ms: u32,
    #[serde(default)]
    loss_pct: f64,
}

impl From<RawHost> for Host {
    fn from(r: RawHost) -> Self {
        let link = Impairment {
            latency_ms: r.latency_ms,
            jitter_ms: r.jitter_ms,
            loss_pct: r.loss_pct,
        };
        Host { name: r.name, link }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSite {
    name: String,
    #[serde(default)]
    nat: Nat,
    #[serde(default)]
    firewall: Firewall,
    #[serde(default)]
    latency_ms: u32,
    #[serde(default)]
    jitter_ms: u32,
    #[serde(default)]
    loss_pct: f64,
    nodes: Vec<String>,
}

impl From<RawSite> for Site {
    fn from(r: RawSite) -> Self {
        let link = Impairment {
            latency_ms: r.latency_ms,
            jitter_ms: r.jitter_ms,
            loss_pct: r.loss_pct,
        };
        Site {
            name: r.name,
            nat: r.nat,
            firewall: r.firewall,
            link,
            nodes: r.nodes,
        }
    }
}

impl Site {
    pub fn new<S: AsRef<str>>(name: &str, nodes: impl IntoIterator<Item = S>) -> Self {
        Site {
            name: name.to_owned(),
            nat: Nat::None,
            firewall: Firewall::Open,
            link: Impairment::default(),
            nodes: nodes.into_iter().map(|n| n.as_ref().to_owned()).collect(),
        }
    }
    pub fn nat(mut self, nat: Nat) -> Self {
        self.nat = nat;
        self
    }
    pub fn firewall(mut self, firewall: Firewall) -> Self {
        self.firewall = firewall;
        self
    }
    pub fn latency_ms(mut self, ms: u32) -> Self {
        self.link.latency_ms = ms;
        self
    }
    pub fn jitter_ms(mut self, ms: u32) -> Self {
        self.link.jitter_ms = ms;
        self
    }
    pub fn loss_pct(mut self, pct: f64) -> Self {
        self.link.loss_pct = pct;
        self
    }
}

/// A whole lab: the internet core is implicit.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    #[serde(default, rename = "host")]
    pub hosts: Vec<Host>,
    #[serde(default, rename = "site")]
    pub sites: Vec<Site>,
}

/// Why a topology was refused.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot read topology file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("topology file {path} is not valid: {message}")]
    Parse { path: String, message: String },
    #[error("invalid topology: {0}")]
    Invalid(String),
}

/// Names the lab reserves for its own namespaces.
const RESERVED: &[&str] = &["inet"];
/// Attachments to the core are numbered into the third octet of 198.18.K.0/24.
pub const MAX_ATTACHMENTS: usize = 250;
/// Nodes of a site get 198.19.K.10 and up.
pub const MAX_NODES_PER_SITE: usize = 240;
const MAX_LATENCY_MS: u32 = 10_000;

impl Topology {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn host(mut self, host: impl Into<HostArg>) -> Self {
        self.hosts.push(host.into().0);
        self
    }
    pub fn site(mut self, site: Site) -> Self {
        self.sites.push(site);
        self
    }

    /// Reads and validates a TOML topology file.
    pub fn from_file(path: &Path) -> Result<Self, TopologyError> {
        let text = std::fs::read_to_string(path).map_err(|source| TopologyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text).map_err(|e| match e {
            TopologyError::Parse { message, .. } => TopologyError::Parse {
                path: path.display().to_string(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Self, TopologyError> {
        let topo: Topology = toml::from_str(text).map_err(|e| TopologyError::Parse {
            path: "<text>".into(),
            message: e.to_string(),
        })?;
        topo.validate()?;
        Ok(topo)
    }

    /// Checks names, sizes and ranges; every lab is built from a validated topology.
    pub fn validate(&self) -> Result<(), TopologyError> {
        let invalid = |m: String| Err(TopologyError::Invalid(m));
        if self.hosts.len() + self.sites.len() == 0 {
            return invalid("a lab needs at least one [[host]] or [[site]]".into());
        }
        if self.hosts.len() + self.sites.len() > MAX_ATTACHMENTS {
            return invalid(format!(
                "at most {MAX_ATTACHMENTS} hosts and sites in one lab"
            ));
        }
        let mut seen = BTreeSet::new();
        let mut name_ok = |name: &str, what: &str| -> Result<(), TopologyError> {
            check_name(name)
                .map_err(|why| TopologyError::Invalid(format!("{what} {name:?}: {why}")))?;
            if !seen.insert(name.to_owned()) {
                return Err(TopologyError::Invalid(format!(
                    "name {name:?} is used twice; hosts, sites and nodes share one namespace"
                )));
            }
            Ok(())
        };
        for h in &self.hosts {
            name_ok(&h.name, "host")?;
            check_link(&h.link, &h.name)?;
        }
        for s in &self.sites {
            name_ok(&s.name, "site")?;
            check_link(&s.link, &s.name)?;
            if s.nodes.is_empty() {
                return invalid(format!("site {:?} has no nodes", s.name));
            }
            if s.nodes.len() > MAX_NODES_PER_SITE {
                return invalid(format!(
                    "site {:?}: at most {MAX_NODES_PER_SITE} nodes",
                    s.name
                ));
            }
            for n in &s.nodes {
                name_ok(n, "node")?;
            }
        }
        Ok(())
    }
}

/// Lets `Topology::host` take either a bare name or a configured [`Host`].
pub struct HostArg(Host);
impl From<&str> for HostArg {
    fn from(name: &str) -> Self {
        HostArg(Host::new(name))
    }
}
impl From<Host> for HostArg {
    fn from(h: Host) -> Self {
        HostArg(h)
    }
}

fn check_name(name: &str) -> Result<(), &'static str> {
    let b = name.as_bytes();
    if b.is_empty() || b.len() > 20 {
        return Err("names are 1 to 20 characters");
    }
    if !b[0].is_ascii_lowercase() {
        return Err("names start with a lowercase letter");
    }
    if !b
        .iter()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
    {
        return Err("names use only a-z, 0-9 and '-'");
    }
    if RESERVED.contains(&name) {
        return Err("this name is reserved for the internet core");
    }
    Ok(())
}

fn check_link(l: &Impairment, name: &str) -> Result<(), TopologyError> {
    if l.latency_ms > MAX_LATENCY_MS {
        return Err(TopologyError::Invalid(format!(
            "{name:?}: latency_ms {} is above the limit of {MAX_LATENCY_MS}",
            l.latency_ms
        )));
    }
    if l.jitter_ms > l.latency_ms {
        return Err(TopologyError::Invalid(format!(
            "{name:?}: jitter_ms ({}) cannot exceed latency_ms ({})",
            l.jitter_ms, l.latency_ms
        )));
    }
    if !(0.0..=100.0).contains(&l.loss_pct) || l.loss_pct.is_nan() {
        return Err(TopologyError::Invalid(format!(
            "{name:?}: loss_pct must be between 0 and 100, got {}",
            l.loss_pct
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(toml: &str, expect: Result<(), &str>) {
        match (Topology::from_toml(toml), expect) {
            (Ok(_), Ok(())) => {}
            (Err(e), Err(want)) => {
                let got = e.to_string();
                assert!(
                    got.contains(want),
                    "error {got:?} does not mention {want:?}"
                );
            }
            (got, want) => panic!("for {toml:?}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn parses_the_federation_example() {
        let text = include_str!("../../examples/federation.toml");
        let t = Topology::from_toml(text).unwrap();
        assert_eq!(t.hosts.len(), 2);
        let edge = t
            .sites
            .iter()
            .find(|s| s.nat == Nat::EndpointIndependent)
            .unwrap();
        assert_eq!(edge.link.latency_ms, 20);
        assert!(t.sites.iter().any(|s| s.nat == Nat::Symmetric));
        let blocked = t
            .sites
            .iter()
            .find(|s| s.firewall == Firewall::UdpBlocked)
            .unwrap();
        assert_eq!(blocked.link.latency_ms, 60);
    }

    #[test]
    fn accepts_and_refuses() {
        check("[[host]]\nname = \"a\"\n", Ok(()));
        check("[[site]]\nname = \"s\"\nnodes = [\"n\"]\nnat = \"symmetric\"\nfirewall = \"https-only\"\n", Ok(()));
        check("", Err("at least one"));
        check(
            "[[host]]\nname = \"a\"\nlatency = 3\n",
            Err("unknown field"),
        );
        check(
            "[[site]]\nname = \"s\"\nnodes = [\"n\"]\nnat = \"full-cone\"\n",
            Err("unknown variant"),
        );
        check("[[site]]\nname = \"s\"\nnodes = []\n", Err("has no nodes"));
        check(
            "[[site]]\nname = \"s\"\nnodes = [\"s\"]\n",
            Err("used twice"),
        );
        check("[[host]]\nname = \"inet\"\n", Err("reserved"));
        check("[[host]]\nname = \"Big\"\n", Err("lowercase"));
        check("[[host]]\nname = \"a_b\"\n", Err("only a-z"));
        check(
            "[[host]]\nname = \"abcdefghijklmnopqrstu\"\n",
            Err("1 to 20"),
        );
        check(
            "[[host]]\nname = \"a\"\nlatency_ms = 5\njitter_ms = 6\n",
            Err("cannot exceed"),
        );
        check(
            "[[host]]\nname = \"a\"\nloss_pct = 101.0\n",
            Err("between 0 and 100"),
        );
        check(
            "[[host]]\nname = \"a\"\nlatency_ms = 99999\n",
            Err("above the limit"),
        );
        check(
            "[[host]]\nname = \"a\"\nlatency_ms = -1\n",
            Err("invalid value"),
        );
        check("[[host]\n", Err("line 1"));
    }

    #[test]
    fn builder_matches_toml() {
        let built = Topology::new().host("coord").site(
            Site::new("edge", ["e1"])
                .nat(Nat::EndpointIndependent)
                .latency_ms(20),
        );
        let parsed = Topology::from_toml(
            "[[host]]\nname = \"coord\"\n[[site]]\nname = \"edge\"\nnat = \"endpoint-independent\"\nlatency_ms = 20\nnodes = [\"e1\"]\n",
        )
        .unwrap();
        assert_eq!(built, parsed);
    }
}
