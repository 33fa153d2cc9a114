//! Everything peerix needs to speak Nix: store paths, nix-base32, hashes, narinfo files,
//! signing keys and signatures, NAR writing and reading, the local Nix store (read-only), and
//! the upstream binary-cache client.
//!
//! Everything here that parses input assumes the input is hostile: sizes are bounded and
//! failures are typed errors, never panics.

pub mod base32;
pub mod hash;
pub mod nar;
pub mod narinfo;
pub mod signing;
pub mod store;
pub mod store_path;
pub mod upstream;

pub use hash::Sha256Hash;
pub use narinfo::NarInfo;
pub use signing::{PublicKey, SecretKey, Signature};
pub use store::{LocalStore, PathInfo};
pub use store_path::{StorePath, StorePathHash, STORE_DIR};
