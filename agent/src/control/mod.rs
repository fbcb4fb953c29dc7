//! The node's side of the control plane, apart from the wire protocol
//! (`meshd_proto::client`) and the transport (`meshd_control`):
//!
//! - [`supervisor`]: the sans-IO decisions of the control connection —
//!   backoff, address failover, register or log in, key rotation, endpoint
//!   reports — tested on a fake clock;
//! - [`netmap`]: the coordinator's peer map as data-plane peers;
//! - [`state_dir`]: what the node keeps on disk;
//! - [`ipc`]: the daemon's local control-socket protocol.
//!
//! [`crate::node_runtime`] drives them.

pub mod ipc;
pub mod netmap;
pub mod state_dir;
pub mod supervisor;
