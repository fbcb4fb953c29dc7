//! Split DNS: mesh names answered locally, the rest forwarded upstream.
