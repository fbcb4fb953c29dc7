//! The policy language and its compiler into peer visibility and packet
//! filters (docs/policy.md). Pure: no I/O, no clock.

mod compile;
mod error;
mod hujson;
mod policy;

pub use compile::{
    matches, Compiled, Explanation, FilterRule, Node, NodeId, TestFailure, IPPROTO_ICMP,
    IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP,
};
pub use error::{ParseError, Pos};
pub use hujson::{MAX_DEPTH, MAX_INPUT};
pub use policy::{Dest, Policy, Ports, Proto, Rule, Selector, Test, ALL_PORTS};

#[cfg(test)]
mod prop_tests;
#[cfg(test)]
mod tests;
