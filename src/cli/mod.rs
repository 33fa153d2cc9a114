//! The command-line verbs, one module each; `main.rs` parses the command line and calls them.
//! `peerix serve` is the daemon ([`crate::serve`], its flags in [`crate::config`]) and
//! `peerix bench` the benchmark ([`crate::bench`]).

mod common;
pub mod keygen;
pub mod nar;
pub mod narinfo;
mod progress;
pub mod seed;
pub mod status;
pub mod store;
pub mod unseed;
