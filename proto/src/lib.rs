//! Wire formats shared by agent, coordinator and relay.
//!
//! The control protocol (docs/control-protocol.md): length-prefixed frames
//! carrying one message each, with bodies in a small tag-length-value
//! encoding. The relay protocol and STUN Binding (docs/relay-protocol.md):
//! [`relay`], [`stun`]. NAT traversal's discovery packets
//! (docs/disco-protocol.md): [`disco`]. Everything here is sans-IO: it turns bytes into messages and
//! back, and never touches a socket or a clock.

pub mod auth;
pub mod client;
mod codec;
pub mod disco;
pub mod frame;
pub mod message;
pub mod relay;
pub mod stun;
pub mod token;

pub use codec::{DecodeError, EncodeError, IGNORABLE_TAG};
pub use frame::{decode, encode, encode_frame, FrameDecoder};
pub use message::*;

/// The control protocol version this build speaks; carried in every frame.
pub const VERSION: u8 = 1;

/// Largest frame, counted after its 4-byte length: 1 MiB.
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// ALPN protocol id of control protocol version 1, on QUIC and on TLS/TCP.
pub const ALPN: &[u8] = b"meshd/1";
/// TLS exporter label of the channel binding (docs/control-protocol.md).
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-meshd-control";
/// The name in the coordinator's self-signed certificate; nodes do not check
/// it (they check the certificate's pin).
pub const SERVER_NAME: &str = "meshd-coordinator";
