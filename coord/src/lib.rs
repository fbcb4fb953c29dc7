//! The coordinator: registration with join tokens, addressing, peer maps and
//! their deltas, expiry, and durable state.
//!
//! [`Coordinator`] is the sans-IO core (no sockets, no clock); [`Store`] is
//! where its records live.

pub mod admin;
pub mod coordinator;
pub mod net;
pub mod service;
pub mod state;
pub mod store;
pub mod visibility;

pub use coordinator::{unix_ms, Action, Config, CoordError, Coordinator, SessionId, TokenSpec};
pub use state::{Change, MeshSettings, MeshState, NodeRecord, Snapshot, TokenRecord, MESH_IPV4};
pub use store::{Lookup, MemStore, PgStore, SqliteStore, Store, StoreError};
