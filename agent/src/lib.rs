//! The node agent behind `meshd up`: the control connection to the
//! coordinator, the node's state directory and its daemon, over the data
//! plane of `meshd-dataplane`; NAT traversal (`discovery`, `paths`,
//! `traversal`); and a relay's membership in its mesh (`relay_member`).

pub mod control;
pub mod discovery;
pub mod node_runtime;
pub mod paths;
pub mod relay_link;
pub mod relay_member;
pub mod traversal;
