//! The `peerix` daemon's parts: what a node shares with peers, what it accepts from them, and
//! the substituter that Nix talks to.

pub mod admin;
pub mod bench;
pub mod cli;
pub mod config;
pub mod dashboard;
pub mod http;
pub mod seed;
pub mod serve;
pub mod share;
pub mod trust;

/// Whether this process runs as root (effective uid 0): network namespaces, `tc` and Nix's
/// chroot-store sandbox need it.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}
