//! peerix's libp2p side: a node that finds peers (mDNS on the LAN, explicit peers, a Kademlia
//! DHT), the peer protocol (lookup, manifest, have, chunks), serving from the chunk store, and
//! the multi-peer downloader.

mod admission;
pub mod catalog;
pub mod client;
pub mod compress;
mod delta;
pub mod download;
pub mod fetch;
pub mod lookup;
pub mod node;
mod peer_tables;
pub mod protocol;
pub mod server;

pub use admission::StreamStats;
pub use catalog::Catalog;
pub use client::{Client, ClientConfig, ClientError};
pub use download::{
    download, Compression, DownloadConfig, DownloadError, DownloadOutcome, DownloadReport, Peers,
    WireConfig,
};
pub use fetch::{fetch_nar, FetchError, FetchOutcome, FetchRequest};
pub use libp2p::{Multiaddr, PeerId};
pub use lookup::{Found, Lookup, PeerSource, TrustCheck};
pub use node::{
    HolePunchStats, Node, NodeConfig, NodeError, NodeEvent, Overview, PeerDetails, Reachability,
    RelayLimits, RelayServiceStats,
};
pub use server::{ServeLimits, Server, ServerError, ServerEvent, ServerHandle, TrackedPeers};

/// The peer protocol, versioned: a peer that speaks another version is simply not offered it.
pub const PROTOCOL: libp2p::StreamProtocol = libp2p::StreamProtocol::new("/peerix/chunks/2");
