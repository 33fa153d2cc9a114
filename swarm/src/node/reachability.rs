//! Reachability across NATs: AutoNAT's verdict on whether peers can dial this node, the relay
//! reservations an unreachable node holds so that peers can still reach it, the bounded relay
//! service a reachable node offers others, and hole punching (DCUtR), which turns a relayed
//! connection into a direct one. Apart from the event loop because it is one story: how two
//! machines behind NAT come to talk directly.
//!
//! The parts libp2p gives and how they fit:
//! - AutoNAT asks connected peers to dial this node back at the addresses they observed; the
//!   verdict is [`Reachability`], and a dial-back that works confirms an external address.
//! - The relay server only serves once an external address is confirmed, so only a reachable
//!   node relays. Its limits ([`RelayLimits`]) bound circuits, bytes and time per circuit.
//! - An unreachable node reserves a slot on up to [`MAX_RELAYS`] relays it knows (peers that
//!   offered the hop protocol over a connection this node dialled). The reservation confirms
//!   the relayed address as external, which is what the DHT announces from then on.
//! - A peer that dials such a node through the relay gets a relayed connection; DCUtR then
//!   punches a hole (TCP and QUIC at once) and the streams prefer the direct connection.

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroU32;
use std::time::Duration;

use libp2p::core::transport::ListenerId;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::ConnectionId;
use libp2p::{autonat, dcutr, identify, relay, Multiaddr, PeerId};
use tokio::time::Instant;

use super::event_loop::EventLoop;

/// Relays an unreachable node holds a reservation on at once.
const MAX_RELAYS: usize = 2;

/// Relays remembered as candidates (the first ones found are kept).
const MAX_RELAY_CANDIDATES: usize = 8;

/// How soon a lost or refused reservation is tried again.
const RESERVE_RETRY: Duration = Duration::from_secs(10);

/// What the relay service grants other peers. Relaying is a courtesy to nodes behind NAT until
/// they punch a hole, not a bulk path: each circuit ends after `max_circuit_bytes` or
/// `max_circuit_duration`, whichever comes first, and a peer opens at most
/// `circuits_per_peer_per_hour` of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayLimits {
    pub max_reservations: usize,
    pub max_circuits: usize,
    pub max_circuits_per_peer: usize,
    pub max_circuit_duration: Duration,
    pub max_circuit_bytes: u64,
    pub circuits_per_peer_per_hour: NonZeroU32,
}

impl Default for RelayLimits {
    fn default() -> Self {
        RelayLimits {
            max_reservations: 128,
            max_circuits: 16,
            max_circuits_per_peer: 4,
            max_circuit_duration: Duration::from_secs(120),
            max_circuit_bytes: 8 << 20,
            circuits_per_peer_per_hour: NonZeroU32::new(60).expect("60 > 0"),
        }
    }
}

impl RelayLimits {
    pub(super) fn config(&self) -> relay::Config {
        relay::Config {
            max_reservations: self.max_reservations,
            max_circuits: self.max_circuits,
            max_circuits_per_peer: self.max_circuits_per_peer,
            max_circuit_duration: self.max_circuit_duration,
            max_circuit_bytes: self.max_circuit_bytes,
            // The defaults' per-IP limits as well, but circuits per peer as configured.
            circuit_src_rate_limiters: Vec::new(),
            ..relay::Config::default()
        }
        .circuit_src_per_peer(self.circuits_per_peer_per_hour, Duration::from_secs(3600))
        .circuit_src_per_ip(
            NonZeroU32::new(60).expect("60 > 0"),
            Duration::from_secs(60),
        )
    }
}

/// Whether peers outside can dial this node, as AutoNAT last judged.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Reachability {
    /// Not probed yet (no peer to ask, or too early).
    #[default]
    Unknown,
    /// A peer dialled back to this address.
    Public(Multiaddr),
    /// Peers could not dial back: behind NAT or a firewall.
    Private,
}

impl fmt::Display for Reachability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reachability::Unknown => write!(f, "unknown (not probed yet)"),
            Reachability::Public(a) => write!(f, "public at {a}"),
            Reachability::Private => {
                write!(f, "private (behind NAT: peers reach it through a relay)")
            }
        }
    }
}

/// What the relay service did, since the start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayServiceStats {
    /// Peers holding a reservation on this node now.
    pub reservations: u64,
    pub circuits_active: u64,
    pub circuits_total: u64,
    pub circuits_denied: u64,
}

/// Hole punching attempts, since the start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HolePunchStats {
    pub succeeded: u64,
    pub failed: u64,
}

/// The event loop's NAT state.
#[derive(Debug, Default)]
pub(super) struct Nat {
    pub(super) status: Reachability,
    /// Peers that offered relay service over a connection we dialled, with that address.
    candidates: Vec<(PeerId, Multiaddr)>,
    /// Reservations asked for or held: relay → (listener, accepted).
    reservations: HashMap<PeerId, (ListenerId, bool)>,
    retry_at: Option<Instant>,
    pub(super) service: RelayServiceStats,
    pub(super) hole_punches: HolePunchStats,
}

impl Nat {
    /// Relays whose reservation was accepted.
    pub(super) fn relays(&self) -> Vec<PeerId> {
        let mut v: Vec<_> = self
            .reservations
            .iter()
            .filter(|(_, (_, ok))| *ok)
            .map(|(p, _)| *p)
            .collect();
        v.sort();
        v
    }
}

pub(super) fn is_relayed(a: &Multiaddr) -> bool {
    a.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

/// A direct address on this machine's network: private (RFC 1918, IPv6 unique local),
/// link-local or loopback, and not through a relay.
pub(super) fn is_lan(a: &Multiaddr) -> bool {
    !is_relayed(a)
        && a.iter().any(|p| match p {
            Protocol::Ip4(ip) => ip.is_private() || ip.is_link_local() || ip.is_loopback(),
            Protocol::Ip6(ip) => {
                ip.is_loopback() || ip.is_unique_local() || ip.is_unicast_link_local()
            }
            _ => false,
        })
}

impl EventLoop {
    /// After a connection of `peer` came or went: is it still on the LAN?
    pub(super) fn update_lan_peer(&mut self, peer: PeerId) {
        let lan = self.conns.values().any(|(p, a, _)| *p == peer && is_lan(a));
        let mut set = self.lan_peers.lock().unwrap_or_else(|e| e.into_inner());
        if lan {
            set.insert(peer);
        } else {
            set.remove(&peer);
        }
    }

    pub(super) fn on_autonat(&mut self, event: autonat::Event) {
        let autonat::Event::StatusChanged { new, .. } = event else {
            return;
        };
        let status = match new {
            autonat::NatStatus::Public(a) => Reachability::Public(a),
            autonat::NatStatus::Private => Reachability::Private,
            autonat::NatStatus::Unknown => Reachability::Unknown,
        };
        tracing::info!(
            relays_known = self.nat.candidates.len(),
            "reachability: {status}"
        );
        self.nat.status = status;
        match self.nat.status {
            Reachability::Private => self.reserve_relays(),
            Reachability::Public(_) => {
                // Dialable directly: a relayed address would only make peers take the detour.
                for (relay, (listener, _)) in self.nat.reservations.drain() {
                    tracing::info!(%relay, "reachable directly; giving up the relay reservation");
                    self.swarm.remove_listener(listener);
                }
            }
            Reachability::Unknown => {}
        }
    }

    /// A peer identified on `connection`: remember it as a relay if it offers the service and
    /// we dialled it directly (so its address is one we can reach).
    pub(super) fn note_relay(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        info: &identify::Info,
    ) {
        if !info.protocols.contains(&relay::HOP_PROTOCOL_NAME) {
            // A relay that stopped serving (it lost its external address) is no candidate.
            self.nat.candidates.retain(|(p, _)| *p != peer);
            return;
        }
        let Some((_, addr, inbound)) = self.conns.get(&connection) else {
            return;
        };
        if *inbound || is_relayed(addr) {
            return;
        }
        if self.nat.candidates.iter().any(|(p, _)| *p == peer)
            || self.nat.candidates.len() >= MAX_RELAY_CANDIDATES
        {
            return;
        }
        let mut addr = addr.clone();
        if !matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
            addr.push(Protocol::P2p(peer));
        }
        tracing::debug!(%peer, %addr, "a relay is known");
        self.nat.candidates.push((peer, addr));
        if self.nat.status == Reachability::Private {
            self.reserve_relays();
        }
    }

    /// Reserves slots on known relays until [`MAX_RELAYS`] are asked for or held.
    pub(super) fn reserve_relays(&mut self) {
        if self.nat.status != Reachability::Private {
            return;
        }
        let wanted: Vec<_> = self
            .nat
            .candidates
            .iter()
            .filter(|(p, _)| !self.nat.reservations.contains_key(p))
            .take(MAX_RELAYS.saturating_sub(self.nat.reservations.len()))
            .cloned()
            .collect();
        for (relay, addr) in wanted {
            let circuit = addr.with(Protocol::P2pCircuit);
            match self.swarm.listen_on(circuit.clone()) {
                Ok(listener) => {
                    tracing::debug!(%relay, addr = %circuit, "asking a relay for a reservation");
                    self.nat.reservations.insert(relay, (listener, false));
                }
                Err(e) => {
                    tracing::warn!(%relay, error = %e, "cannot ask a relay for a reservation");
                }
            }
        }
        if self.nat.reservations.is_empty() && !self.nat.candidates.is_empty() {
            self.nat.retry_at = Some(Instant::now() + RESERVE_RETRY);
        }
    }

    /// On the tick: ask again after a reservation was lost or refused.
    pub(super) fn retry_reservations(&mut self, now: Instant) {
        if self.nat.retry_at.is_some_and(|t| now >= t) {
            self.nat.retry_at = None;
            self.reserve_relays();
        }
    }

    /// A listener closed; if it was a relay reservation, it is gone (the relay went away,
    /// refused, or the reservation expired unrenewed).
    pub(super) fn on_listener_closed(&mut self, listener: ListenerId, reason: &str) {
        let Some(relay) = self
            .nat
            .reservations
            .iter()
            .find(|(_, (l, _))| *l == listener)
            .map(|(p, _)| *p)
        else {
            return;
        };
        self.nat.reservations.remove(&relay);
        tracing::info!(%relay, %reason, "relay reservation ended");
        // Try the others first next time.
        if let Some(i) = self.nat.candidates.iter().position(|(p, _)| *p == relay) {
            let c = self.nat.candidates.remove(i);
            self.nat.candidates.push(c);
        }
        self.nat.retry_at = Some(Instant::now() + RESERVE_RETRY);
    }

    pub(super) fn on_relay_client(&mut self, event: relay::client::Event) {
        match event {
            relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                renewal,
                limit,
            } => {
                if let Some((_, ok)) = self.nat.reservations.get_mut(&relay_peer_id) {
                    *ok = true;
                }
                if !renewal {
                    tracing::info!(
                        relay = %relay_peer_id,
                        ?limit,
                        "reachable through relay {relay_peer_id}"
                    );
                }
            }
            relay::client::Event::OutboundCircuitEstablished {
                relay_peer_id,
                limit,
            } => {
                tracing::debug!(relay = %relay_peer_id, ?limit, "relayed connection out");
            }
            relay::client::Event::InboundCircuitEstablished { src_peer_id, limit } => {
                tracing::debug!(peer = %src_peer_id, ?limit, "relayed connection in");
            }
        }
    }

    #[allow(deprecated)] // The failure variants are still the only word on why a circuit failed.
    pub(super) fn on_relay_server(&mut self, event: relay::Event) {
        let s = &mut self.nat.service;
        match event {
            relay::Event::ReservationReqAccepted {
                src_peer_id,
                renewed,
            } => {
                if !renewed {
                    s.reservations += 1;
                    tracing::info!(peer = %src_peer_id, "relay: reservation accepted");
                }
            }
            relay::Event::ReservationClosed { .. } | relay::Event::ReservationTimedOut { .. } => {
                s.reservations = s.reservations.saturating_sub(1);
            }
            relay::Event::CircuitReqAccepted {
                src_peer_id,
                dst_peer_id,
            } => {
                s.circuits_active += 1;
                s.circuits_total += 1;
                tracing::info!(from = %src_peer_id, to = %dst_peer_id, "relay: circuit opened");
            }
            relay::Event::CircuitReqDenied {
                src_peer_id,
                dst_peer_id,
                status,
            } => {
                s.circuits_denied += 1;
                tracing::info!(from = %src_peer_id, to = %dst_peer_id, ?status, "relay: circuit refused");
            }
            relay::Event::CircuitClosed {
                src_peer_id,
                dst_peer_id,
                error,
            } => {
                s.circuits_active = s.circuits_active.saturating_sub(1);
                tracing::info!(from = %src_peer_id, to = %dst_peer_id, error = ?error, "relay: circuit closed");
            }
            relay::Event::StatusChanged { status } => {
                tracing::info!(?status, "relay service");
            }
            other => tracing::debug!(event = ?other, "relay"),
        }
    }

    pub(super) fn on_dcutr(&mut self, event: dcutr::Event) {
        let peer = event.remote_peer_id;
        match event.result {
            Ok(connection) => {
                self.nat.hole_punches.succeeded += 1;
                let addr = self
                    .conns
                    .get(&connection)
                    .map(|(_, a, _)| a.to_string())
                    .unwrap_or_default();
                tracing::info!(%peer, %addr, "hole punched: direct connection to {peer}");
            }
            Err(e) => {
                self.nat.hole_punches.failed += 1;
                tracing::warn!(
                    %peer,
                    error = %e,
                    "hole punching to {peer} failed: its traffic stays on the relay, within the relay's limits per circuit"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lan_addresses_are_private_direct_ones() {
        let lan = |s: &str| is_lan(&s.parse().unwrap());
        assert!(lan("/ip4/192.168.1.2/tcp/12305"));
        assert!(lan("/ip4/10.0.0.9/udp/12305/quic-v1"));
        assert!(lan("/ip4/127.0.0.1/tcp/1"));
        assert!(lan("/ip6/fd00::1/tcp/1"));
        assert!(lan("/ip6/fe80::1/tcp/1"));
        assert!(!lan("/ip4/203.0.113.5/tcp/12305"));
        assert!(!lan("/ip6/2001:db8::1/tcp/1"));
        assert!(
            !lan("/ip4/100.64.0.1/tcp/1"),
            "carrier-grade NAT is not the LAN"
        );
        let relayed = format!(
            "/ip4/192.168.1.1/tcp/1/p2p/{}/p2p-circuit",
            PeerId::random()
        );
        assert!(
            !lan(&relayed),
            "a relay on the LAN does not make its circuits local"
        );
    }
}
