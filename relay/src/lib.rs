//! The self-hosted relay (DERP-like, TCP/443) and STUN responder.
