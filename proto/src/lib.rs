//! Wire formats shared by agent, coordinator and relay.
//!
//! The control protocol (docs/control-protocol.md): length-prefixed frames
//! carrying one message each, with bodies in a small tag-length-value
//! encoding. Everything here is sans-IO: it turns bytes into messages and
//! back, and never touches a socket or a clock.

pub mod auth;
pub mod client;
mod codec;
pub mod frame;
pub mod message;
pub mod token;

pub use codec::{DecodeError, EncodeError, IGNORABLE_TAG};
pub use frame::{decode, encode, encode_frame, FrameDecoder};
pub use message::*;

/// The control protocol version this build speaks; carried in every frame.
pub const VERSION: u8 = 1;

/// Largest frame, counted after its 4-byte length: 1 MiB.
pub const MAX_FRAME_LEN: usize = 1 << 20;
