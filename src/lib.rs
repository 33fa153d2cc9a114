//! The `peerix` daemon's parts: what a node shares with peers, what it accepts from them, and
//! the substituter that Nix talks to.

pub mod admin;
pub mod cli;
pub mod config;
pub mod dashboard;
pub mod http;
pub mod seed;
pub mod serve;
pub mod share;
pub mod trust;
