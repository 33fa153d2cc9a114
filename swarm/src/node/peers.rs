//! The operator's view of connected peers: [`PeerDetails`] and [`Overview`], and how the
//! event loop fills them from its connection bookkeeping (which connection to show, round
//! trips, how long a peer has been connected).

use std::time::Duration;

use libp2p::{Multiaddr, PeerId};
use tokio::time::Instant;

use super::event_loop::EventLoop;
use super::reachability::{is_relayed, HolePunchStats, Reachability, RelayServiceStats};
use super::transport::is_quic;

/// One connected peer as the node sees it, for an operator's view.
#[derive(Debug, Clone)]
pub struct PeerDetails {
    pub peer: PeerId,
    /// The remote address of the connection new streams take (direct TCP, then direct QUIC,
    /// then relayed).
    pub addr: Option<Multiaddr>,
    /// Through a relay (`/p2p-circuit`) rather than a direct connection.
    pub relayed: bool,
    /// It dialled us.
    pub inbound: bool,
    /// Its connections a keep-alive holds open (an explicit peer's: the one its dial made, and
    /// a direct TCP one beside it).
    pub held: usize,
    /// The last ping's round trip, once one came back.
    pub rtt: Option<Duration>,
    pub connected_for: Duration,
}

/// Connected peers and the addresses others confirmed for this node.
#[derive(Debug, Clone, Default)]
pub struct Overview {
    pub peers: Vec<PeerDetails>,
    /// External addresses confirmed (reachable from outside); empty on a LAN or behind NAT.
    pub external_addrs: Vec<Multiaddr>,
    /// Connections open, to any peer (identified as a peerix node or not), by remote peer.
    pub connections: std::collections::HashMap<PeerId, usize>,
    /// Inbound connections refused since the start (connection caps, bans, the allow-list).
    pub connections_denied: u64,
    /// Whether peers can dial this node, as AutoNAT last judged.
    pub reachability: Reachability,
    /// Relays holding a reservation for this node (it is reachable through them).
    pub relays: Vec<PeerId>,
    /// What this node's relay service did for others.
    pub relay_service: RelayServiceStats,
    pub hole_punches: HolePunchStats,
}

impl EventLoop {
    pub(super) fn overview(&self) -> Overview {
        let now = Instant::now();
        let peers = self
            .confirmed
            .iter()
            .map(|p| {
                // The connection new streams take (vendor/libp2p-stream, `Path`): direct before
                // relayed, TCP before QUIC.
                let mut conns: Vec<_> = self.conns.values().filter(|(q, _, _)| q == p).collect();
                conns.sort_by_key(|(_, a, _)| (is_relayed(a), is_quic(a)));
                let first = conns.first();
                PeerDetails {
                    peer: *p,
                    addr: first.map(|(_, a, _)| a.clone()),
                    relayed: first.is_some_and(|(_, a, _)| is_relayed(a)),
                    inbound: first.is_some_and(|(_, _, i)| *i),
                    held: self
                        .held
                        .iter()
                        .filter(|c| self.conns.get(c).is_some_and(|(q, _, _)| q == p))
                        .count(),
                    rtt: self.rtts.get(p).copied(),
                    connected_for: self
                        .connected_since
                        .get(p)
                        .map_or(Duration::ZERO, |s| now.duration_since(*s)),
                }
            })
            .collect();
        let mut connections = std::collections::HashMap::new();
        for (p, _, _) in self.conns.values() {
            *connections.entry(*p).or_insert(0) += 1;
        }
        Overview {
            peers,
            external_addrs: self.swarm.external_addresses().cloned().collect(),
            connections,
            connections_denied: self.connections_denied,
            reachability: self.nat.status.clone(),
            relays: self.nat.relays(),
            relay_service: self.nat.service,
            hole_punches: self.nat.hole_punches,
        }
    }
}
