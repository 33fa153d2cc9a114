//! The task that owns the swarm: [`EventLoop`] holds all of the node's mutable state (who is
//! connected, pending dials and the callers waiting on them, provider lookups, explicit peers,
//! the announcement pacer) and drives the swarm, the command channel from the [`Node`]
//! handles and a periodic tick from one `select!` loop. Connection and identify events are
//! handled here; Kademlia results, explicit peers, announcements, the peer overview and the
//! TCP connection added to a QUIC one have files of their own that add to the same
//! `impl EventLoop`.
//!
//! [`Node`]: super::Node

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use libp2p::kad::store::RecordStore;
use libp2p::kad::{self, QueryId};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, DialError, SwarmEvent};
use libp2p::{identify, mdns, ping, Multiaddr, PeerId, Swarm};
use peerix_nix::StorePathHash;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;

use super::announce::Pacer;
use super::bans::BanList;
use super::behaviour::{Behaviour, BehaviourEvent};
use super::command::Command;
use super::explicit_peer::{Explicit, ExplicitState, REDIAL_INITIAL, REDIAL_RESET_AFTER};
use super::reachability::Nat;
use super::{Discovery, NodeError, NodeEvent, IDENTIFY_PROTOCOL_VERSION, KAD_PROTOCOL};

/// How often the event loop wakes up on its own to pace announcements and redial.
const TICK: Duration = Duration::from_millis(100);

/// A provider lookup in flight: where its finds go, and who was found already.
pub(super) struct ProviderQuery {
    pub(super) found: mpsc::UnboundedSender<PeerId>,
    pub(super) seen: HashSet<PeerId>,
}

pub(super) struct EventLoop {
    pub(super) swarm: Swarm<Behaviour>,
    pub(super) local: PeerId,
    pub(super) commands: mpsc::UnboundedReceiver<Command>,
    pub(super) events: broadcast::Sender<NodeEvent>,
    pub(super) listen_addrs: Arc<Mutex<Vec<Multiaddr>>>,
    /// Peers with an identified connection, i.e. reported as connected.
    pub(super) confirmed: HashSet<PeerId>,
    pub(super) connected_since: HashMap<PeerId, Instant>,
    /// Open connections: whose, the remote address, inbound. Bounded by the connections held.
    pub(super) conns: HashMap<ConnectionId, (PeerId, Multiaddr, bool)>,
    /// Connections a keep-alive stream holds open: an explicit peer's, the one its dial made
    /// and a direct TCP one beside it (`tcp_too.rs`). A subset of `conns`.
    pub(super) held: HashSet<ConnectionId>,
    /// Last ping round trip of each connected peer.
    pub(super) rtts: HashMap<PeerId, Duration>,
    pub(super) pending_dials:
        HashMap<ConnectionId, (String, oneshot::Sender<Result<(), NodeError>>)>,
    /// Callers waiting for a peer that another dial or connection is already bringing up.
    pub(super) peer_waiters: HashMap<PeerId, Vec<oneshot::Sender<Result<(), NodeError>>>>,
    pub(super) provider_queries: HashMap<QueryId, ProviderQuery>,
    /// Found by mDNS, being dialled, not yet identified; at most `mdns_pending_max`.
    pub(super) mdns_pending: HashSet<PeerId>,
    pub(super) mdns_pending_max: usize,
    /// Shared with the [`Node`] handles; bans that end are lifted on the tick.
    ///
    /// [`Node`]: super::Node
    pub(super) banned: Arc<Mutex<BanList>>,
    /// Shared with the handles: peers with a direct connection from a private address.
    pub(super) lan_peers: Arc<Mutex<HashSet<PeerId>>>,
    /// Inbound connections refused (connection caps, bans, the allow-list).
    pub(super) connections_denied: u64,
    pub(super) explicit: Vec<Explicit>,
    pub(super) resolved_tx: Option<mpsc::UnboundedSender<(usize, Vec<Multiaddr>)>>,
    pub(super) pacer: Pacer,
    /// Announcement queries in flight.
    pub(super) announcing: HashMap<QueryId, StorePathHash>,
    pub(super) last_bootstrap: Option<Instant>,
    pub(super) control: libp2p_stream::Control,
    /// Reachability, relays and hole punching (see `reachability`).
    pub(super) nat: Nat,
    pub(super) keepalive_acceptor: tokio::task::JoinHandle<()>,
}

impl EventLoop {
    pub(super) async fn run(mut self) {
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

    pub(super) fn emit(&self, event: NodeEvent) {
        // Nobody listening is fine.
        let _ = self.events.send(event);
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        self.redial_explicit(now);
        self.retry_reservations(now);
        self.pump_announcements(now);
        // Cheap when nothing expired: a look at the earliest expiry.
        let wall = std::time::Instant::now();
        self.swarm.behaviour_mut().kad.store_mut().expire(wall);
        let lifted = self
            .banned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .expire(wall);
        for p in lifted {
            tracing::info!(peer = %p, "ban ended");
            self.swarm.behaviour_mut().blocked.unblock_peer(p);
        }
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
            Command::DhtStats(reply) => {
                let store = self.swarm.behaviour_mut().kad.store_mut();
                store.expire(std::time::Instant::now());
                let _ = reply.send(store.stats());
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
            Command::Ban {
                peer,
                why,
                lifted,
                reply,
            } => {
                tracing::warn!(%peer, reason = %why, "banning peer");
                let b = self.swarm.behaviour_mut();
                if let Some(old) = lifted {
                    tracing::debug!(peer = %old, "ban lifted to make room for another");
                    b.blocked.unblock_peer(old);
                }
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
            SwarmEvent::Behaviour(BehaviourEvent::Autonat(event)) => self.on_autonat(event),
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(event)) => {
                self.on_relay_client(event)
            }
            SwarmEvent::Behaviour(BehaviourEvent::Relay(event)) => self.on_relay_server(event),
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(event)) => self.on_dcutr(event),
            SwarmEvent::ExternalAddrConfirmed { address } => {
                tracing::info!(%address, "external address confirmed");
                // Records in the DHT carry the addresses we had when they went out, and a node
                // behind NAT is reachable at its relayed address only: announce again. (A
                // direct address needs no such thing: the DHT's routing tables hold it.)
                if super::reachability::is_relayed(&address) {
                    self.pacer.announce_all_again(Instant::now());
                    self.pump_announcements(Instant::now());
                }
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                let reason = match &reason {
                    Ok(()) => "closed".to_owned(),
                    Err(e) => e.to_string(),
                };
                self.on_listener_closed(listener_id, &reason);
            }
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
                    if !self.mdns_pending.contains(&peer)
                        && self.mdns_pending.len() >= self.mdns_pending_max
                    {
                        // Anyone on the LAN can answer with made-up peers; the next query
                        // brings this one again once dials in progress have ended.
                        tracing::debug!(%peer, "too many mDNS peers being dialled; not this one now");
                        continue;
                    }
                    tracing::debug!(%peer, ?addrs, "mDNS found a peer");
                    self.mdns_pending.insert(peer);
                    // Its addresses reach Kademlia through identify, once it has shown it is a
                    // peerix node: mDNS also finds any other libp2p software on the LAN.
                    let opts = DialOpts::peer_id(peer)
                        .addresses(addrs)
                        .condition(PeerCondition::DisconnectedAndNotDialing)
                        .allocate_new_port()
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
                self.update_lan_peer(peer_id);
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
                // Said at info level with its cause: a connection that goes away under a
                // transfer must say why (an I/O error, a keep-alive timeout, closed by us).
                match &cause {
                    Some(e) => {
                        tracing::info!(peer = %peer_id, left = num_established, error = %e, "connection closed")
                    }
                    None => {
                        tracing::debug!(peer = %peer_id, left = num_established, "connection closed")
                    }
                }
                self.conns.remove(&connection_id);
                self.held.remove(&connection_id);
                self.update_lan_peer(peer_id);
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
                    self.mdns_pending.remove(&peer_id);
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
                        // A dial that failed is no longer pending.
                        self.mdns_pending.remove(&p);
                    }
                }
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                if matches!(error, libp2p::swarm::ListenError::Denied { .. }) {
                    self.connections_denied += 1;
                }
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
        self.note_relay(connection_id, peer, &info);
        self.dial_tcp_too(connection_id, peer, &info.listen_addrs);
        self.hold_tcp_too(connection_id, peer);
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
            self.hold_open(connection_id, p);
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
