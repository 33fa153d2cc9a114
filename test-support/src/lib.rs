//! What peerix's tests share, in one place: deterministic data ([`rng`]), made-up store paths
//! and trees ([`fixtures`]), real Nix in a private chroot store ([`nix`]), raw HTTP
//! ([`http`]), a hashing sink ([`io`]), network namespaces ([`netns`], and a small internet with NAT routers: [`internet`]), a chunk store with small chunks ([`store`]) and
//! libp2p test nodes ([`swarm`]).
//!
//! Only ever a dev-dependency, and only of integration tests, benches and examples: it
//! depends on peerix-nix, peerix-chunkstore and peerix-swarm, so a unit test inside one of
//! those crates would see a second copy of that crate's types.

pub mod fixtures;
pub mod http;
pub mod internet;
pub mod io;
pub mod netns;
pub mod nix;
pub mod rng;
pub mod store;
pub mod swarm;
