//! The libp2p node: one swarm on its own tokio task, driven through a command channel.
//!
//! Discovery comes from three places: mDNS on the LAN, explicit peers from the configuration
//! (for VPNs without broadcast) and a private Kademlia DHT in which every node announces the
//! store paths it can serve, keyed by the 20-byte store-path hash.
//!
//! A peer counts as connected once identify has run on a connection to it and it turned out to
//! be a peerix node: a connection the remote refuses (allow-list, ban, wrong swarm key) or a
//! stray libp2p node found by mDNS never shows up as [`NodeEvent::PeerConnected`].

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use libp2p::kad;
use libp2p::multiaddr::Protocol;
use libp2p::pnet::PreSharedKey;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use peerix_nix::StorePathHash;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;

mod announce;
mod behaviour;
mod dht;
mod event_loop;
mod explicit;
mod identity;
mod peers;
mod transport;

use announce::Pacer;
use behaviour::build_swarm;
use event_loop::EventLoop;
use explicit::{hold_stream, Explicit, KEEPALIVE_PROTOCOL};
use transport::is_quic;

pub use behaviour::MAX_PROVIDED_KEYS;
pub use identity::{load_or_create_identity, read_swarm_key};
pub use peers::{Overview, PeerDetails};

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
            mdns: true,
            swarm_key: None,
            allowed_peers: None,
            kad_server: true,
            provide_interval: Duration::from_secs(15 * 60),
            provide_min_rate: 10,
            provide_in_flight: 8,
            idle_timeout: IDLE_CONNECTION_TIMEOUT,
        }
    }
}

enum Command {
    Dial {
        opts: DialOpts,
        peer: Option<PeerId>,
        target: String,
        reply: oneshot::Sender<Result<(), NodeError>>,
    },
    ConnectedPeers(oneshot::Sender<Vec<PeerId>>),
    Overview(oneshot::Sender<Overview>),
    Providers {
        key: kad::RecordKey,
        found: mpsc::UnboundedSender<PeerId>,
    },
    SetProvided(Vec<StorePathHash>),
    Ban {
        peer: PeerId,
        why: String,
        reply: oneshot::Sender<()>,
    },
    Shutdown(oneshot::Sender<()>),
}

/// A running peerix node. Dropping it stops the node too; [`Node::shutdown`] also waits for it.
pub struct Node {
    peer_id: PeerId,
    control: libp2p_stream::Control,
    listen_addrs: Arc<Mutex<Vec<Multiaddr>>>,
    /// Peers banned so far, so callers can leave them out before asking anything.
    banned: Mutex<HashSet<PeerId>>,
    commands: mpsc::UnboundedSender<Command>,
    events: broadcast::Sender<NodeEvent>,
    task: tokio::task::JoinHandle<()>,
}

impl Node {
    /// Starts the node; returns once every listener has an address (or failed, if not all did).
    pub async fn start(cfg: NodeConfig) -> Result<Node, NodeError> {
        let keypair = load_or_create_identity(&cfg.state_dir)?;
        let peer_id = keypair.public().to_peer_id();

        let mut listen = cfg.listen.clone();
        if cfg.swarm_key.is_some() {
            let before = listen.len();
            listen.retain(|a| !is_quic(a));
            if listen.len() != before {
                tracing::warn!(
                    "a swarm key is set: QUIC is turned off, since pnet can only protect TCP"
                );
            }
        }
        if listen.is_empty() {
            return Err(NodeError::NoListenAddrs);
        }

        let mut swarm = build_swarm(keypair, &cfg)?;
        let control = swarm.behaviour().stream.new_control();
        let keepalive_acceptor = match control.clone().accept(KEEPALIVE_PROTOCOL) {
            Ok(mut incoming) => tokio::spawn(async move {
                while let Some((peer, stream)) = incoming.next().await {
                    tracing::trace!(%peer, "holding a connection open for the peer");
                    tokio::spawn(hold_stream(stream));
                }
            }),
            Err(e) => return Err(NodeError::Transport(e.to_string())),
        };

        let mut pending = HashSet::new();
        let mut errors = Vec::new();
        for addr in &listen {
            match swarm.listen_on(addr.clone()) {
                Ok(id) => {
                    pending.insert(id);
                }
                Err(e) => errors.push(format!("{addr}: {e}")),
            }
        }
        let mut addrs = Vec::new();
        while !pending.is_empty() {
            match swarm.select_next_some().await {
                SwarmEvent::NewListenAddr {
                    listener_id,
                    address,
                } => {
                    pending.remove(&listener_id);
                    addrs.push(address);
                }
                SwarmEvent::ListenerClosed {
                    listener_id,
                    reason,
                    addresses,
                } => {
                    pending.remove(&listener_id);
                    errors.push(format!("{addresses:?}: closed: {reason:?}"));
                }
                SwarmEvent::ListenerError { listener_id, error } => {
                    pending.remove(&listener_id);
                    errors.push(format!("listener: {error}"));
                }
                _ => {}
            }
        }
        if addrs.is_empty() {
            return Err(NodeError::Listen(errors.join("; ")));
        }
        for e in &errors {
            tracing::warn!(error = %e, "a listen address failed");
        }
        tracing::info!(peer = %peer_id, addrs = ?addrs, "node listening");

        let listen_addrs = Arc::new(Mutex::new(addrs));
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(1024);

        let explicit = cfg.peers.iter().map(|s| Explicit::parse(s)).collect();
        let pacer = Pacer::new(
            cfg.provide_interval,
            cfg.provide_min_rate,
            cfg.provide_in_flight,
            Instant::now(),
        );
        let event_loop = EventLoop {
            swarm,
            local: peer_id,
            commands: command_rx,
            events: events.clone(),
            listen_addrs: listen_addrs.clone(),
            confirmed: HashSet::new(),
            connected_since: HashMap::new(),
            conns: HashMap::new(),
            rtts: HashMap::new(),
            pending_dials: HashMap::new(),
            peer_waiters: HashMap::new(),
            provider_queries: HashMap::new(),
            mdns_pending: HashSet::new(),
            explicit,
            resolved_tx: None,
            pacer,
            announcing: HashMap::new(),
            last_bootstrap: None,
            control: control.clone(),
            keepalive_acceptor,
        };
        let task = tokio::spawn(event_loop.run());
        Ok(Node {
            peer_id,
            control,
            listen_addrs,
            banned: Mutex::new(HashSet::new()),
            commands,
            events,
            task,
        })
    }

    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Opens and accepts the peer protocol's streams.
    pub fn stream_control(&self) -> libp2p_stream::Control {
        self.control.clone()
    }

    /// The addresses actually listened on, each ending in `/p2p/<our id>`.
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        let addrs = self
            .listen_addrs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        addrs
            .into_iter()
            .map(|a| a.with(Protocol::P2p(self.peer_id)))
            .collect()
    }

    /// Peers with an identified connection.
    pub async fn connected_peers(&self) -> Vec<PeerId> {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::ConnectedPeers(tx)).is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Connected peers with their addresses and round trips, and this node's external addresses.
    pub async fn overview(&self) -> Overview {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Overview(tx)).is_err() {
            return Overview::default();
        }
        rx.await.unwrap_or_default()
    }

    pub fn events(&self) -> broadcast::Receiver<NodeEvent> {
        self.events.subscribe()
    }

    /// Dials an address and waits until the remote is identified as a peerix node.
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), NodeError> {
        let peer = match addr.iter().last() {
            Some(Protocol::P2p(id)) => Some(id),
            _ => None,
        };
        let opts = match peer {
            Some(id) => DialOpts::peer_id(id)
                .addresses(vec![addr.clone()])
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build(),
            None => DialOpts::unknown_peer_id().address(addr.clone()).build(),
        };
        self.dial_opts(opts, peer, addr.to_string()).await
    }

    /// Connects to a peer by id, with the addresses the DHT knows for it.
    pub async fn connect(&self, peer: PeerId) -> Result<(), NodeError> {
        let opts = DialOpts::peer_id(peer)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        self.dial_opts(opts, Some(peer), peer.to_string()).await
    }

    async fn dial_opts(
        &self,
        opts: DialOpts,
        peer: Option<PeerId>,
        target: String,
    ) -> Result<(), NodeError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Dial {
                opts,
                peer,
                target,
                reply,
            })
            .map_err(|_| NodeError::Shutdown)?;
        rx.await.map_err(|_| NodeError::Shutdown)?
    }

    /// Peers that announce `key` in the DHT, collected until the lookup ends or `timeout`
    /// passes. Providers we are not connected to are dialled while the lookup still holds
    /// their addresses, so opening a stream to them afterwards finds a connection or a dial.
    pub async fn providers(&self, key: &StorePathHash, timeout: Duration) -> Vec<PeerId> {
        let deadline = Instant::now() + timeout;
        let (found, mut rx) = mpsc::unbounded_channel();
        let key = kad::RecordKey::new(key.as_bytes());
        if self
            .commands
            .send(Command::Providers { key, found })
            .is_err()
        {
            return Vec::new();
        }
        let mut out = Vec::new();
        while let Ok(Some(peer)) = tokio::time::timeout_at(deadline, rx.recv()).await {
            out.push(peer);
        }
        out
    }

    /// Replaces the set of store paths this node announces. New keys are announced first;
    /// dropped keys stop being announced (other nodes forget them when their records expire).
    pub fn set_provided(&self, keys: Vec<StorePathHash>) {
        let _ = self.commands.send(Command::SetProvided(keys));
    }

    /// Whether [`Node::ban`] was called for this peer.
    pub fn is_banned(&self, peer: &PeerId) -> bool {
        self.banned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(peer)
    }

    /// Disconnects a misbehaving peer and refuses it from now on.
    pub async fn ban(&self, peer: PeerId, why: &str) {
        self.banned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(peer);
        let (reply, rx) = oneshot::channel();
        if self
            .commands
            .send(Command::Ban {
                peer,
                why: why.to_owned(),
                reply,
            })
            .is_ok()
        {
            let _ = rx.await;
        }
    }

    pub async fn shutdown(self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Shutdown(tx)).is_ok() {
            let _ = rx.await;
        }
        let _ = self.task.await;
    }
}
