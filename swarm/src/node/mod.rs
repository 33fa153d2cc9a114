//! The libp2p node: one swarm on its own tokio task, driven through a command channel.
//!
//! Discovery comes from three places: mDNS on the LAN, explicit peers from the configuration
//! (for VPNs without broadcast) and a private Kademlia DHT in which every node announces the
//! store paths it can serve, keyed by the 20-byte store-path hash.
//!
//! A peer counts as connected once identify has run on a connection to it and it turned out to
//! be a peerix node: a connection the remote refuses (allow-list, ban, wrong swarm key) or a
//! stray libp2p node found by mDNS never shows up as [`NodeEvent::PeerConnected`].
//!
//! The node is split by concern:
//! - this file: the public configuration, events, errors and protocol names;
//! - `handle`: the [`Node`] handle, which starts the node and talks to its event loop;
//! - `identity`: the node key and the swarm key on disk;
//! - `transport`: TCP (with pnet) and QUIC, noise and yamux;
//! - `behaviour`: the libp2p behaviours and the swarm built around them;
//! - `event_loop`: the task that owns the swarm and all mutable node state;
//! - `provider_store`: Kademlia's record store, bounded per provider and in all;
//! - `reachability`: AutoNAT, relay reservations, the relay service and hole punching;
//!   `relay_service`: libp2p's relay server, kept from serving through a relayed address;
//! - `dht`, `explicit`, `announce`, `peers`: the parts of the event loop for Kademlia queries,
//!   explicit peers, paced announcements and the operator's peer overview.

use std::collections::HashSet;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use libp2p::pnet::PreSharedKey;
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use peerix_nix::StorePathHash;

mod announce;
mod bans;
mod behaviour;
mod command;
mod dht;
mod event_loop;
mod explicit;
mod explicit_peer;
mod handle;
mod identity;
mod keepalive;
mod peers;
mod provider_store;
mod reachability;
mod relay_service;
mod security;
mod tcp_too;
mod transport;

pub use behaviour::MAX_PROVIDED_KEYS;
pub use handle::Node;
pub use transport::is_quic;

/// The peer a multiaddr names with its last component, `/p2p/<id>`, if it does.
pub fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    match addr.iter().last() {
        Some(libp2p::multiaddr::Protocol::P2p(peer)) => Some(peer),
        _ => None,
    }
}

/// The TCP socket address `addr` dials (`/ip4/…/tcp/…` or `/ip6/…/tcp/…`, a `/p2p/…` after it
/// allowed), if it is one.
pub fn tcp_socket_of(addr: &Multiaddr) -> Option<std::net::SocketAddr> {
    use libp2p::multiaddr::Protocol;
    let mut parts = addr.iter();
    let ip: std::net::IpAddr = match parts.next()? {
        Protocol::Ip4(ip) => ip.into(),
        Protocol::Ip6(ip) => ip.into(),
        _ => return None,
    };
    match parts.next()? {
        Protocol::Tcp(port) => Some((ip, port).into()),
        _ => None,
    }
}
pub use identity::{load_or_create_identity, read_swarm_key};
pub use peers::{Overview, PeerDetails};
pub use provider_store::{ProviderLimits, ProviderStats};
pub use reachability::{HolePunchStats, Reachability, RelayLimits, RelayServiceStats};

/// peerix's own DHT: a private protocol name keeps peerix nodes out of the IPFS DHT and
/// keeps IPFS nodes out of ours.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/peerix/kad/1.0.0");

/// Sent in identify; a peer announcing anything else is not a peerix node.
pub const IDENTIFY_PROTOCOL_VERSION: &str = "/peerix/1.0.0";

/// The default port, for TCP and QUIC alike.
pub const DEFAULT_PORT: u16 = 12305;

/// Long enough that the peer protocol's connections survive the pauses between requests.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("state directory {path}: {source}")]
    StateDir { path: PathBuf, source: io::Error },
    #[error("identity key {path}: {source}")]
    IdentityIo { path: PathBuf, source: io::Error },
    #[error("identity key {path} is not a valid ed25519 key: {reason}")]
    IdentityDecode { path: PathBuf, reason: String },
    #[error("swarm key {path}: {source}")]
    SwarmKeyIo { path: PathBuf, source: io::Error },
    #[error("swarm key {path} is malformed: {reason}")]
    SwarmKeyFormat { path: PathBuf, reason: String },
    #[error("building the libp2p transport: {0}")]
    Transport(String),
    #[error("starting mDNS: {0}")]
    Mdns(io::Error),
    #[error("could not listen on any address: {0}")]
    Listen(String),
    #[error("no listen addresses configured (a private swarm cannot use QUIC)")]
    NoListenAddrs,
    #[error("dialing {target}: {reason}")]
    Dial { target: String, reason: String },
    #[error("bootstrap address {0} does not end in /p2p/<peer id>")]
    BootstrapWithoutPeerId(Multiaddr),
    #[error("the node has shut down")]
    Shutdown,
}

/// How a peer was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Discovery {
    Mdns,
    Kad,
    Explicit,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    /// The first connection to a peerix peer is up and identified.
    PeerConnected(PeerId),
    /// The last connection to a peer that was reported connected has gone.
    PeerDisconnected(PeerId),
    Discovered {
        peer: PeerId,
        via: Discovery,
    },
    /// An announcement of this store path reached the DHT (at least one peer took it).
    Announced(StorePathHash),
    /// A connection to an explicit peer is held open by a keep-alive: the one its dial made,
    /// or a direct TCP connection beside a QUIC one.
    ConnectionHeld(PeerId),
    /// Every address of an explicit peer failed; it is dialled again after a backoff.
    ExplicitPeerUnreachable {
        spec: String,
        error: String,
    },
}

#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Holds `identity.key`, so the peer id survives restarts.
    pub state_dir: PathBuf,
    pub listen: Vec<Multiaddr>,
    /// A multiaddr (with or without `/p2p/<id>`) or `host:port`.
    pub peers: Vec<String>,
    /// Entry points into the DHT, each a multiaddr ending in `/p2p/<id>`: put in the DHT's
    /// routing table and dialled at start. Unlike `peers`, they are not held connected: the
    /// DHT dials them again when a query needs them, and knows other nodes through them.
    pub bootstrap: Vec<Multiaddr>,
    pub mdns: bool,
    /// A private swarm: TCP through pnet, and no QUIC (pnet cannot protect it).
    pub swarm_key: Option<PreSharedKey>,
    /// When set, connections to any other peer are closed.
    pub allowed_peers: Option<HashSet<PeerId>>,
    /// Answer DHT queries from the start. Without it, Kademlia stays a client until an external
    /// address is confirmed, which on a LAN never happens.
    pub kad_server: bool,
    /// Every provided key is announced again once per interval; records live twice as long.
    pub provide_interval: Duration,
    /// Announcements per second never drop below this, however small the set.
    pub provide_min_rate: u32,
    /// Announcement queries in flight at once.
    pub provide_in_flight: usize,
    /// How long a connection without open streams stays up.
    pub idle_timeout: Duration,
    /// What the DHT's provider store holds at most, ours and others'.
    pub dht_limits: ProviderLimits,
    /// Connections established with one peer at once (both directions, TCP and QUIC).
    pub max_connections_per_peer: u32,
    /// Inbound connections established at once, from all peers.
    pub max_incoming_connections: u32,
    /// Inbound connections still in their handshake at once.
    pub max_pending_incoming: u32,
    /// Peers on the ban list at once (the oldest ban is lifted first), and how long a ban lasts.
    pub max_bans: usize,
    pub ban_duration: Duration,
    /// Peers found by mDNS being dialled at once.
    pub max_mdns_pending: usize,
    /// Relay service for peers behind NAT, with its limits; `None` turns it off. It only
    /// serves once AutoNAT has confirmed that this node is reachable.
    pub relay_service: Option<RelayLimits>,
}

impl NodeConfig {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        NodeConfig {
            state_dir: state_dir.into(),
            listen: vec![
                format!("/ip4/0.0.0.0/tcp/{DEFAULT_PORT}")
                    .parse()
                    .expect("static multiaddr"),
                format!("/ip4/0.0.0.0/udp/{DEFAULT_PORT}/quic-v1")
                    .parse()
                    .expect("static multiaddr"),
            ],
            peers: Vec::new(),
            bootstrap: Vec::new(),
            mdns: true,
            swarm_key: None,
            allowed_peers: None,
            kad_server: true,
            provide_interval: Duration::from_secs(15 * 60),
            provide_min_rate: 10,
            provide_in_flight: 8,
            idle_timeout: IDLE_CONNECTION_TIMEOUT,
            dht_limits: ProviderLimits::default(),
            // Two each way, so that simultaneous dials over TCP and QUIC all succeed.
            max_connections_per_peer: 4,
            max_incoming_connections: 256,
            max_pending_incoming: 64,
            max_bans: 4096,
            ban_duration: Duration::from_secs(24 * 3600),
            max_mdns_pending: 64,
            relay_service: Some(RelayLimits::default()),
        }
    }
}
