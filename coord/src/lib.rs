//! The coordinator: registration, addressing, peer maps, durable state.
