//! The policy language and its compiler into peer visibility and packet filters.
