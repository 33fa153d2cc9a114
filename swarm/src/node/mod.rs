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
use libp2p::kad::store::RecordStore;
use libp2p::kad::{self, QueryId};
use libp2p::multiaddr::Protocol;
use libp2p::pnet::PreSharedKey;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, DialError, SwarmEvent};
use libp2p::{identify, mdns, ping, Multiaddr, PeerId, StreamProtocol, Swarm};
use peerix_nix::StorePathHash;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;

mod announce;
mod behaviour;
mod dht;
mod explicit;
mod identity;
mod peers;
mod transport;

use announce::Pacer;
use behaviour::{build_swarm, Behaviour, BehaviourEvent};
use dht::ProviderQuery;
use explicit::{
    hold_stream, Explicit, ExplicitState, KEEPALIVE_PROTOCOL, REDIAL_INITIAL, REDIAL_RESET_AFTER,
};
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

/// How often the event loop wakes up on its own to pace announcements and redial.
const TICK: Duration = Duration::from_millis(100);

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

struct EventLoop {
    swarm: Swarm<Behaviour>,
    local: PeerId,
    commands: mpsc::UnboundedReceiver<Command>,
    events: broadcast::Sender<NodeEvent>,
    listen_addrs: Arc<Mutex<Vec<Multiaddr>>>,
    /// Peers with an identified connection, i.e. reported as connected.
    confirmed: HashSet<PeerId>,
    connected_since: HashMap<PeerId, Instant>,
    /// Open connections: whose, the remote address, inbound. Bounded by the connections held.
    conns: HashMap<ConnectionId, (PeerId, Multiaddr, bool)>,
    /// Last ping round trip of each connected peer.
    rtts: HashMap<PeerId, Duration>,
    pending_dials: HashMap<ConnectionId, (String, oneshot::Sender<Result<(), NodeError>>)>,
    /// Callers waiting for a peer that another dial or connection is already bringing up.
    peer_waiters: HashMap<PeerId, Vec<oneshot::Sender<Result<(), NodeError>>>>,
    provider_queries: HashMap<QueryId, ProviderQuery>,
    /// Found by mDNS, not yet identified.
    mdns_pending: HashSet<PeerId>,
    explicit: Vec<Explicit>,
    resolved_tx: Option<mpsc::UnboundedSender<(usize, Vec<Multiaddr>)>>,
    pacer: Pacer,
    /// Announcement queries in flight.
    announcing: HashMap<QueryId, StorePathHash>,
    last_bootstrap: Option<Instant>,
    control: libp2p_stream::Control,
    keepalive_acceptor: tokio::task::JoinHandle<()>,
}

impl EventLoop {
    async fn run(mut self) {
        let (resolved_tx, mut resolved_rx) = mpsc::unbounded_channel();
        self.resolved_tx = Some(resolved_tx);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                cmd = self.commands.recv() => match cmd {
                    Some(Command::Shutdown(reply)) => {
                        let _ = reply.send(());
                        break;
                    }
                    Some(cmd) => self.on_command(cmd),
                    // Every `Node` handle is gone.
                    None => break,
                },
                Some((index, addrs)) = resolved_rx.recv() => self.on_resolved(index, addrs),
                _ = tick.tick() => self.on_tick(),
            }
        }
        // The acceptor would otherwise live as long as any `Control` clone.
        self.keepalive_acceptor.abort();
        tracing::debug!(peer = %self.local, "node stopped");
    }

    fn emit(&self, event: NodeEvent) {
        // Nobody listening is fine.
        let _ = self.events.send(event);
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        self.redial_explicit(now);
        self.pump_announcements(now);
        self.provider_queries.retain(|id, q| {
            if q.found.is_closed() {
                if let Some(mut query) = self.swarm.behaviour_mut().kad.query_mut(id) {
                    query.finish();
                }
                false
            } else {
                true
            }
        });
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Dial {
                opts,
                peer,
                target,
                reply,
            } => {
                if let Some(p) = peer {
                    if self.confirmed.contains(&p) {
                        let _ = reply.send(Ok(()));
                        return;
                    }
                }
                let conn = opts.connection_id();
                match self.swarm.dial(opts) {
                    Ok(()) => {
                        self.pending_dials.insert(conn, (target, reply));
                    }
                    Err(DialError::DialPeerConditionFalse(_)) => {
                        // Already dialling or connected but not yet identified: wait for that.
                        if let Some(p) = peer {
                            self.peer_waiters.entry(p).or_default().push(reply);
                        }
                    }
                    Err(e) => {
                        let _ = reply.send(Err(NodeError::Dial {
                            target,
                            reason: e.to_string(),
                        }));
                    }
                }
            }
            Command::ConnectedPeers(reply) => {
                let _ = reply.send(self.confirmed.iter().copied().collect());
            }
            Command::Overview(reply) => {
                let _ = reply.send(self.overview());
            }
            Command::Providers { key, found } => {
                let id = self.swarm.behaviour_mut().kad.get_providers(key);
                self.provider_queries.insert(
                    id,
                    ProviderQuery {
                        found,
                        seen: HashSet::new(),
                    },
                );
            }
            Command::SetProvided(keys) => {
                let (added, removed) = self.pacer.replace(keys);
                let kad = &mut self.swarm.behaviour_mut().kad;
                for key in &removed {
                    kad.stop_providing(&kad::RecordKey::new(key.as_bytes()));
                }
                // Recorded locally at once, so a peer that asks us directly gets an answer
                // before the announcement reaches the DHT.
                for key in &added {
                    let record = kad::ProviderRecord::new(
                        kad::RecordKey::new(key.as_bytes()),
                        self.local,
                        Vec::new(),
                    );
                    if let Err(e) = kad.store_mut().add_provider(record) {
                        tracing::warn!(key = %key, error = ?e, "cannot record a provided store path");
                    }
                }
                tracing::debug!(
                    added = added.len(),
                    removed = removed.len(),
                    total = self.pacer.set.len(),
                    rate = self.pacer.rate(),
                    "provided set replaced"
                );
                self.pump_announcements(Instant::now());
            }
            Command::Ban { peer, why, reply } => {
                tracing::warn!(%peer, reason = %why, "banning peer");
                let b = self.swarm.behaviour_mut();
                b.blocked.block_peer(peer);
                b.kad.remove_peer(&peer);
                let _ = reply.send(());
            }
            // `run` stops the loop before it gets here.
            Command::Shutdown(reply) => {
                let _ = reply.send(());
            }
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                connection_id,
                peer_id,
                info,
            })) => self.on_identified(connection_id, peer_id, info),
            SwarmEvent::Behaviour(BehaviourEvent::Kad(event)) => self.on_kad(event),
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(list))) => {
                let mut by_peer: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
                for (peer, addr) in list {
                    if peer != self.local {
                        by_peer.entry(peer).or_default().push(addr);
                    }
                }
                for (peer, addrs) in by_peer {
                    if self.confirmed.contains(&peer) {
                        self.emit(NodeEvent::Discovered {
                            peer,
                            via: Discovery::Mdns,
                        });
                        continue;
                    }
                    tracing::debug!(%peer, ?addrs, "mDNS found a peer");
                    self.mdns_pending.insert(peer);
                    // Its addresses reach Kademlia through identify, once it has shown it is a
                    // peerix node: mDNS also finds any other libp2p software on the LAN.
                    let opts = DialOpts::peer_id(peer)
                        .addresses(addrs)
                        .condition(PeerCondition::DisconnectedAndNotDialing)
                        .build();
                    if let Err(e) = self.swarm.dial(opts) {
                        tracing::debug!(%peer, error = %e, "not dialling an mDNS peer");
                    }
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                connection_id,
                ..
            } => {
                tracing::debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), "connection established");
                self.conns.insert(
                    connection_id,
                    (
                        peer_id,
                        endpoint.get_remote_address().clone(),
                        endpoint.is_listener(),
                    ),
                );
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            })) if self.swarm.is_connected(&peer) => {
                self.rtts.insert(peer, rtt);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                cause,
                ..
            } => {
                tracing::debug!(peer = %peer_id, ?cause, "connection closed");
                self.conns.remove(&connection_id);
                if num_established == 0 {
                    self.rtts.remove(&peer_id);
                }
                if let Some((target, reply)) = self.pending_dials.remove(&connection_id) {
                    let _ = reply.send(Err(NodeError::Dial {
                        target,
                        reason: format!(
                            "the connection was closed before identification ({cause:?})"
                        ),
                    }));
                }
                self.explicit_conn_failed(
                    connection_id,
                    "the connection was closed before identification",
                );
                if num_established == 0 {
                    self.fail_waiters(&peer_id, "the connection was closed");
                    if self.confirmed.remove(&peer_id) {
                        self.emit(NodeEvent::PeerDisconnected(peer_id));
                    }
                    let since = self.connected_since.remove(&peer_id);
                    let now = Instant::now();
                    for e in &mut self.explicit {
                        if e.peer == Some(peer_id) && matches!(e.state, ExplicitState::Connected) {
                            if since.is_some_and(|s| now.duration_since(s) > REDIAL_RESET_AFTER) {
                                e.backoff = REDIAL_INITIAL;
                            }
                            e.schedule_retry(now);
                        }
                    }
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                tracing::debug!(peer = ?peer_id, %error, "dial failed");
                if let Some((target, reply)) = self.pending_dials.remove(&connection_id) {
                    let _ = reply.send(Err(NodeError::Dial {
                        target,
                        reason: error.to_string(),
                    }));
                }
                self.explicit_conn_failed(connection_id, &error.to_string());
                if let Some(p) = peer_id {
                    if !self.swarm.is_connected(&p) {
                        self.fail_waiters(&p, &error.to_string());
                    }
                }
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                tracing::debug!(from = %send_back_addr, %error, "incoming connection failed");
            }
            SwarmEvent::NewListenAddr { address, .. } => {
                let mut addrs = self.listen_addrs.lock().unwrap_or_else(|e| e.into_inner());
                if !addrs.contains(&address) {
                    addrs.push(address);
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|a| a != &address);
            }
            _ => {}
        }
    }

    fn fail_waiters(&mut self, peer: &PeerId, reason: &str) {
        for w in self.peer_waiters.remove(peer).unwrap_or_default() {
            let _ = w.send(Err(NodeError::Dial {
                target: peer.to_string(),
                reason: reason.to_owned(),
            }));
        }
    }

    fn on_identified(&mut self, connection_id: ConnectionId, peer: PeerId, info: identify::Info) {
        if info.protocol_version != IDENTIFY_PROTOCOL_VERSION {
            tracing::debug!(%peer, version = %info.protocol_version, "not a peerix node; disconnecting");
            if let Some((target, reply)) = self.pending_dials.remove(&connection_id) {
                let _ = reply.send(Err(NodeError::Dial {
                    target,
                    reason: format!("not a peerix node ({})", info.protocol_version),
                }));
            }
            self.mdns_pending.remove(&peer);
            let _ = self.swarm.disconnect_peer_id(peer);
            return;
        }
        if info.protocols.contains(&KAD_PROTOCOL) {
            let kad = &mut self.swarm.behaviour_mut().kad;
            for addr in info.listen_addrs {
                kad.add_address(&peer, addr);
            }
            self.maybe_bootstrap();
        }
        if let Some((_, reply)) = self.pending_dials.remove(&connection_id) {
            let _ = reply.send(Ok(()));
        }
        for w in self.peer_waiters.remove(&peer).unwrap_or_default() {
            let _ = w.send(Ok(()));
        }
        let now = Instant::now();
        let mut keep = Vec::new();
        for e in &mut self.explicit {
            let ours = match &e.state {
                ExplicitState::Dialing(conns) => conns.contains(&connection_id),
                ExplicitState::Idle { .. } => e.peer == Some(peer),
                _ => false,
            };
            if ours {
                keep.push(peer);
                e.peer = Some(peer);
                e.state = ExplicitState::Connected;
                let _ = self.events.send(NodeEvent::Discovered {
                    peer,
                    via: Discovery::Explicit,
                });
            }
        }
        for p in keep {
            self.hold_open(p);
        }
        if self.confirmed.insert(peer) {
            self.connected_since.insert(peer, now);
            tracing::info!(%peer, agent = %info.agent_version, "peer connected");
            self.emit(NodeEvent::PeerConnected(peer));
        }
        if self.mdns_pending.remove(&peer) {
            self.emit(NodeEvent::Discovered {
                peer,
                via: Discovery::Mdns,
            });
        }
        // New peers mean keys waiting for someone to announce to.
        self.pump_announcements(now);
    }
}
