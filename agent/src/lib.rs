//! The node agent behind `meshd up`: data plane, NAT traversal, invoker.

pub mod allowed_ips;
pub mod control;
pub mod engine;
pub mod keys;
pub mod node_runtime;
pub mod peers;
pub mod standalone;
pub mod tun;
pub mod udp;
pub mod wgconf;
