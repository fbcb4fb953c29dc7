//! The node agent behind `meshd up`: the control connection to the
//! coordinator, the node's state directory and its daemon, over the data
//! plane of `meshd-dataplane`.

pub mod control;
pub mod discovery;
pub mod node_runtime;
pub mod relay_member;
