//! netlab: an emulated internet on one machine, made of network namespaces.
//!
//! A [`Topology`] (TOML or Rust builder) becomes a [`Lab`]: an internet core namespace that
//! routes 198.18.0.0/15, public hosts attached to it, and sites whose router namespace does
//! NAT and firewalling for the node namespaces behind it. Uplink latency, jitter and loss are
//! emulated in userspace ([`shaper`]). Every lab has a unique id in all its namespace names,
//! tears itself down on drop, panic and Ctrl-C, and [`registry::clean`] removes what a crashed
//! lab left behind. See docs/netlab.md for the address plan and the rules.
pub mod bench;
pub mod bench_dataplane;
pub mod bench_traversal;
mod lab;
pub mod mesh;
mod nfqueue;
pub mod peers;
pub mod registry;
pub mod shaper;
mod sys;
pub mod tools;
pub mod topology;

pub use lab::{Lab, LabOptions, Output, Proc, RESOLVER_ADDR};
pub use sys::check_privileges;
pub use topology::{Firewall, Host, Impairment, Nat, Site, Topology, TopologyError};

/// What went wrong while building, using or removing a lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error(
        "netlab needs root: creating network namespaces requires {missing}, which this process \
         does not have; run it as root (for example with sudo)"
    )]
    NotRoot { missing: String },
    #[error("`{tool}` is not installed; install it with: apt-get install --no-install-recommends {package}")]
    MissingTool { tool: String, package: String },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error("no node, host or site named {name:?} in this lab; it has: {known}")]
    UnknownNode { name: String, known: String },
    #[error("timed out after {secs:.1}s waiting for {what}; logs are in {logs}")]
    Timeout {
        what: String,
        secs: f64,
        logs: String,
    },
    #[error("WAN emulator: {0}")]
    Shaper(String),
    #[error("{0}")]
    Lab(String),
}
