//! meshd's userspace WireGuard data plane: keys, wg-quick files, allowed IPs,
//! peers, TUN and UDP I/O, the sans-IO [`engine::node::Node`] and the
//! single-threaded [`engine::Engine`] that drives it, and `meshd wg`
//! ([`standalone`]). No async runtime and nothing of the control plane: the
//! node agent (`meshd-agent`) builds on it.

pub mod allowed_ips;
pub mod control_socket;
pub mod engine;
pub mod keys;
pub mod peers;
pub mod standalone;
pub mod tun;
pub mod udp;
pub mod wgconf;
