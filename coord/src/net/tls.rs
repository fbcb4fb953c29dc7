//! The coordinator's identity (`meshd_control::identity`): where it keeps it.

pub use meshd_control::identity::{write_private, Identity, IdentityError, IdentityFiles};

pub const FILES: IdentityFiles = IdentityFiles {
    cert: "coord-cert.der",
    key: "coord-key.der",
    static_key: "coord-x25519.key",
    server_name: meshd_proto::SERVER_NAME,
    alpn: meshd_proto::ALPN,
    role: "coordinator",
};
