//! The `peerix` daemon's parts: what a node shares with peers, what it accepts from them, and
//! the substituter that Nix talks to.

pub mod bench;
pub mod bench_netns;
pub mod config;
pub mod serve;
pub mod share;
pub mod trust;
