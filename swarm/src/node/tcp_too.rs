//! A peer this node reached over QUIC alone is dialled over TCP as well, at the address it was
//! reached at and the TCP port it listens on. New streams take a peer's TCP connection when it
//! has one (`Path` in vendor/libp2p-stream): TLS and yamux over TCP cost about half the CPU per
//! byte that QUIC does here, on both ends, and keep a capped link fuller (README, Benchmarks).
//! A daemon listens on both by default and learns both addresses of a peer (mDNS, the DHT), and
//! a dial to both at once ends with whichever connects first, QUIC more often than not. The
//! QUIC connection stays, and takes no new streams while the TCP one lives. An explicit peer's
//! connection is held open (`explicit.rs`); its TCP connection is then held open too, or it
//! would idle out between downloads and the next would go over the QUIC one held.

use std::collections::BTreeSet;

use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId};

use super::event_loop::EventLoop;
use super::explicit_peer::ExplicitState;
use super::reachability::is_relayed;
use super::transport::is_quic;

impl EventLoop {
    /// Once `peer` is identified on `connection_id`: dial it over TCP too when this node dialled
    /// that connection over QUIC and holds no direct TCP connection to it. The dialling side
    /// alone, so that two nodes do not both add one.
    pub(super) fn dial_tcp_too(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        listen_addrs: &[Multiaddr],
    ) {
        let Some((_, remote, inbound)) = self.conns.get(&connection_id) else {
            return;
        };
        if *inbound || is_relayed(remote) || !is_quic(remote) {
            return;
        }
        let has_tcp = self
            .conns
            .values()
            .any(|(p, a, _)| *p == peer && direct_tcp(a));
        if has_tcp {
            return;
        }
        let Some(ip) = remote
            .iter()
            .find(|p| matches!(p, Protocol::Ip4(_) | Protocol::Ip6(_)))
        else {
            return;
        };
        let ports: BTreeSet<u16> = listen_addrs.iter().filter_map(tcp_port).collect();
        let addrs: Vec<Multiaddr> = ports
            .into_iter()
            .map(|port| {
                Multiaddr::empty()
                    .with(ip.clone())
                    .with(Protocol::Tcp(port))
            })
            .collect();
        if addrs.is_empty() {
            return;
        }
        tracing::debug!(%peer, ?addrs, "reached over QUIC: dialling over TCP too");
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(PeerCondition::NotDialing)
            .allocate_new_port()
            .build();
        if let Err(e) = self.swarm.dial(opts) {
            tracing::debug!(%peer, error = %e, "cannot dial over TCP too");
        }
    }

    /// Once `peer` is identified on `connection_id` (at its start, and again now and then):
    /// hold it open, once, if it is a direct TCP connection to an explicit peer already
    /// connected (and so held open) over another one, and none of its TCP connections is held
    /// yet. Before the explicit peers' own bookkeeping, which holds the connection their dial
    /// made.
    pub(super) fn hold_tcp_too(&mut self, connection_id: ConnectionId, peer: PeerId) {
        let Some((_, remote, _)) = self.conns.get(&connection_id) else {
            return;
        };
        if !direct_tcp(remote) || self.held.contains(&connection_id) {
            return;
        }
        let explicit = self
            .explicit
            .iter()
            .any(|e| e.peer == Some(peer) && matches!(e.state, ExplicitState::Connected));
        // One TCP connection held is enough; others (a dial-back, the DHT's) may idle out.
        let tcp_held = self.held.iter().any(|c| {
            self.conns
                .get(c)
                .is_some_and(|(p, a, _)| *p == peer && direct_tcp(a))
        });
        if explicit && !tcp_held {
            self.hold_open(connection_id, peer);
        }
    }
}

/// A direct TCP address: what new streams take first.
fn direct_tcp(a: &Multiaddr) -> bool {
    tcp_port(a).is_some()
}

/// The port of a direct TCP address (not a relayed or WebSocket one).
fn tcp_port(a: &Multiaddr) -> Option<u16> {
    let mut port = None;
    for p in a.iter() {
        match p {
            Protocol::Tcp(n) => port = Some(n),
            Protocol::P2pCircuit | Protocol::Ws(_) | Protocol::Wss(_) => return None,
            _ => {}
        }
    }
    port
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_direct_tcp_listen_addresses_give_a_port() {
        let port = |s: &str| tcp_port(&s.parse().unwrap());
        assert_eq!(port("/ip4/10.0.0.1/tcp/12305"), Some(12305));
        assert_eq!(
            port("/ip6/::1/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"),
            Some(4001)
        );
        assert_eq!(port("/ip4/10.0.0.1/udp/12305/quic-v1"), None);
        assert_eq!(port("/ip4/10.0.0.1/tcp/443/ws"), None);
        assert_eq!(
            port("/ip4/203.0.113.7/tcp/12305/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit"),
            None
        );
    }
}
