//! The node agent behind `meshd up`: the control connection to the
//! coordinator, the node's state directory and its daemon, over the data
//! plane of `meshd-dataplane`.

pub mod control;
pub mod node_runtime;
pub mod paths;
