//! The self-hosted relay and STUN responder (docs/relay-protocol.md), and
//! the client that nodes use to reach each other through it.
//!
//! Nodes behind hard NATs, or on networks that drop UDP, send their
//! WireGuard datagrams to a relay, which forwards them to the node holding
//! the destination key: over TLS on TCP or over QUIC datagrams, between
//! clients of one relay or, through mesh links, of several. The relay never
//! reads the datagrams (WireGuard encrypted them) and sets each one's
//! source to the key its sender proved it holds.
//!
//! - [`RelayServer`]: the relay ([`RelayConfig`]); admits the keys in its
//!   [`Members`].
//! - [`client::RelayClient`]: a node's connection to a relay.

pub mod client;
mod conn;
mod identity;
mod members;
mod outbox;
mod server;
#[cfg(test)]
mod tests;

use std::fmt;

pub use conn::ClientError;
pub use identity::IdentityError;
pub use members::{Members, Role};
pub use server::{Counters, Drops, Limits, MeshPeer, RelayConfig, RelayError, RelayServer};

/// How a client is connected to the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Transport {
    /// QUIC: packets as QUIC datagrams, the rest on a stream.
    Quic,
    /// TLS on TCP: everything on the one stream.
    Tls,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Quic => "QUIC",
            Transport::Tls => "TLS/TCP",
        })
    }
}
