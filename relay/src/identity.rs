//! The relay's identity (`meshd_control::identity`): where it keeps it in its
//! state directory.

pub use meshd_control::identity::{Identity, IdentityError, IdentityFiles};

pub const FILES: IdentityFiles = IdentityFiles {
    cert: "relay-cert.der",
    key: "relay-key.der",
    static_key: "relay-x25519.key",
    server_name: meshd_proto::relay::SERVER_NAME,
    alpn: meshd_proto::relay::ALPN,
    role: "relay",
};
