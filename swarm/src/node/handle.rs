//! The public [`Node`] handle: starting a node (identity, swarm, listeners, then the event
//! loop on its own task) and the methods that talk to the running loop through [`Command`]s.
//! The handle holds no swarm state of its own beyond the listen addresses and the ban list
//! callers consult without a round trip.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use libp2p::kad;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId};
use peerix_nix::StorePathHash;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;

use super::announce::Pacer;
use super::bans::BanList;
use super::behaviour::build_swarm;
use super::command::Command;
use super::event_loop::EventLoop;
use super::explicit_peer::Explicit;
use super::identity::load_or_create_identity;
use super::keepalive::{hold_inbound_keepalives, KEEPALIVE_PROTOCOL};
use super::transport::is_quic;
use super::{NodeConfig, NodeError, NodeEvent, Overview, ProviderStats};

/// A running peerix node. Dropping it stops the node too; [`Node::shutdown`] also waits for it.
pub struct Node {
    peer_id: PeerId,
    control: libp2p_stream::Control,
    listen_addrs: Arc<Mutex<Vec<Multiaddr>>>,
    /// Peers banned now, so callers can leave them out before asking anything; shared with
    /// the event loop, which lifts bans as they end.
    banned: Arc<Mutex<BanList>>,
    /// Peers with a direct connection from a private address (see [`Node::is_lan_peer`]);
    /// kept by the event loop.
    lan_peers: Arc<Mutex<HashSet<PeerId>>>,
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

        let bootstrap = cfg
            .bootstrap
            .iter()
            .map(|a| match super::peer_of(a) {
                Some(peer) => Ok((peer, a.clone())),
                None => Err(NodeError::BootstrapWithoutPeerId(a.clone())),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut swarm = build_swarm(keypair, &cfg)?;
        let control = swarm.behaviour().stream.new_control();
        let keepalive_acceptor = match control.clone().accept(KEEPALIVE_PROTOCOL) {
            Ok(incoming) => tokio::spawn(hold_inbound_keepalives(incoming)),
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
        for (peer, addr) in bootstrap {
            // In the routing table, the DHT's queries reach it; the dial brings it in now, and
            // the first connection starts a bootstrap of the routing table through it.
            let mut bare = addr.clone();
            bare.pop();
            swarm.behaviour_mut().kad.add_address(&peer, bare);
            // From the listen port (the default): behind a NAT, the address a bootstrap node
            // observes is then one that maps back to our listener (see the transport).
            if let Err(e) = swarm.dial(addr.clone()) {
                tracing::warn!(%addr, error = %e, "dialling a bootstrap node failed");
            }
        }

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
        let banned = Arc::new(Mutex::new(BanList::new(cfg.max_bans, cfg.ban_duration)));
        let lan_peers = Arc::new(Mutex::new(HashSet::new()));
        let event_loop = EventLoop {
            banned: banned.clone(),
            lan_peers: lan_peers.clone(),
            mdns_pending_max: cfg.max_mdns_pending,
            connections_denied: 0,
            swarm,
            local: peer_id,
            commands: command_rx,
            events: events.clone(),
            listen_addrs: listen_addrs.clone(),
            confirmed: HashSet::new(),
            connected_since: HashMap::new(),
            conns: HashMap::new(),
            held: HashSet::new(),
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
            nat: Default::default(),
            keepalive_acceptor,
        };
        let task = tokio::spawn(event_loop.run());
        Ok(Node {
            peer_id,
            control,
            listen_addrs,
            banned,
            lan_peers,
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
                .allocate_new_port()
                .build(),
            None => DialOpts::unknown_peer_id()
                .address(addr.clone())
                .allocate_new_port()
                .build(),
        };
        self.dial_opts(opts, peer, addr.to_string()).await
    }

    /// Connects to a peer by id, with the addresses the DHT knows for it.
    pub async fn connect(&self, peer: PeerId) -> Result<(), NodeError> {
        let opts = DialOpts::peer_id(peer)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .allocate_new_port()
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
        self.find_providers(key, timeout).collect().await
    }

    /// `providers`, each as soon as the DHT finds it.
    pub fn find_providers(
        &self,
        key: &StorePathHash,
        timeout: Duration,
    ) -> impl futures::Stream<Item = PeerId> + Send + 'static {
        let deadline = Instant::now() + timeout;
        let (found, rx) = mpsc::unbounded_channel();
        let key = kad::RecordKey::new(key.as_bytes());
        // A node that has shut down finds nobody: the channel closes at once.
        let _ = self.commands.send(Command::Providers { key, found });
        futures::stream::unfold(rx, move |mut rx| async move {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(peer)) => Some((peer, rx)),
                _ => None,
            }
        })
    }

    /// Replaces the set of store paths this node announces. New keys are announced first;
    /// dropped keys stop being announced (other nodes forget them when their records expire).
    pub fn set_provided(&self, keys: Vec<StorePathHash>) {
        let _ = self.commands.send(Command::SetProvided(keys));
    }

    /// What the DHT's provider store holds (expired records dropped first) and has refused.
    pub async fn dht_stats(&self) -> ProviderStats {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::DhtStats(tx)).is_err() {
            return ProviderStats::default();
        }
        rx.await.unwrap_or_default()
    }

    /// Whether `peer` is on this machine's network: it holds a direct connection from a
    /// private, link-local or loopback address (not through a relay). The upload cap spares
    /// such peers unless told otherwise.
    pub fn is_lan_peer(&self, peer: &PeerId) -> bool {
        self.lan_peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(peer)
    }

    /// Whether this peer is banned now (see [`Node::ban`]).
    pub fn is_banned(&self, peer: &PeerId) -> bool {
        self.banned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_banned(peer, std::time::Instant::now())
    }

    /// Peers on the ban list now (bounded by [`NodeConfig::max_bans`]).
    pub fn banned_count(&self) -> usize {
        self.banned.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Disconnects a misbehaving peer and refuses it for [`NodeConfig::ban_duration`].
    pub async fn ban(&self, peer: PeerId, why: &str) {
        let lifted = self
            .banned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ban(peer, std::time::Instant::now());
        let (reply, rx) = oneshot::channel();
        if self
            .commands
            .send(Command::Ban {
                peer,
                why: why.to_owned(),
                lifted,
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
