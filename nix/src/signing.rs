//! signing
