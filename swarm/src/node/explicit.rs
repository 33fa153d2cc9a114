//! Explicit peers, the ones named in the configuration (for VPNs without broadcast):
//! resolving `host:port` entries, dialling them, redialling with backoff whenever they go away,
//! and holding their connections open with an idle keep-alive stream. Nothing else finds these
//! peers, so the node keeps them connected on its own.

use std::collections::HashSet;
use std::time::Duration;

use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId};
use tokio::time::Instant;

use super::event_loop::EventLoop;
use super::explicit_peer::{ExplicitState, ExplicitTarget};
use super::keepalive::{hold_stream, KEEPALIVE_PROTOCOL};
use super::NodeEvent;

impl EventLoop {
    /// Holds `connection_id` to `peer` open with a keep-alive stream. The stream goes over the
    /// best connection the peer has (vendor/libp2p-stream, `Path`), which the caller sees to
    /// be this one: the connection an explicit peer's dial made, or a direct TCP one beside it
    /// (`tcp_too.rs`).
    pub(super) fn hold_open(&mut self, connection_id: ConnectionId, peer: PeerId) {
        self.held.insert(connection_id);
        self.emit(NodeEvent::ConnectionHeld(peer));
        let mut control = self.control.clone();
        tokio::spawn(async move {
            match control.open_stream(peer, KEEPALIVE_PROTOCOL).await {
                Ok(stream) => hold_stream(stream).await,
                Err(e) => tracing::debug!(%peer, error = %e, "cannot hold the connection open"),
            }
        });
    }

    pub(super) fn explicit_conn_failed(&mut self, conn: ConnectionId, error: &str) {
        let now = Instant::now();
        for e in &mut self.explicit {
            if let ExplicitState::Dialing(conns) = &mut e.state {
                if conns.remove(&conn) && conns.is_empty() {
                    tracing::debug!(peer = %e.spec, retry_in = ?e.backoff, "explicit peer unreachable");
                    e.schedule_retry(now);
                    // The operator asked for this peer by name: say why it is not there.
                    let _ = self.events.send(NodeEvent::ExplicitPeerUnreachable {
                        spec: e.spec.clone(),
                        error: error.to_owned(),
                    });
                }
            }
        }
    }

    pub(super) fn redial_explicit(&mut self, now: Instant) {
        for index in 0..self.explicit.len() {
            let e = &mut self.explicit[index];
            let ExplicitState::Idle { next } = e.state else {
                continue;
            };
            if next > now {
                continue;
            }
            if let Some(p) = e.peer {
                // Connected already, by its own dial or another of ours.
                if self.confirmed.contains(&p) {
                    e.state = ExplicitState::Connected;
                    continue;
                }
            }
            match e.target.clone() {
                None => {
                    // Unusable entry: never retried.
                    e.state = ExplicitState::Idle {
                        next: now + Duration::from_secs(365 * 24 * 3600),
                    };
                }
                Some(ExplicitTarget::Addr(addr)) => self.dial_explicit(index, vec![addr]),
                Some(ExplicitTarget::HostPort(hp)) => {
                    e.state = ExplicitState::Resolving;
                    let Some(tx) = self.resolved_tx.clone() else {
                        continue;
                    };
                    tokio::spawn(async move {
                        let addrs = match tokio::net::lookup_host(hp.as_str()).await {
                            Ok(it) => it
                                .map(|sa| {
                                    let ip = match sa.ip() {
                                        std::net::IpAddr::V4(v4) => Protocol::Ip4(v4),
                                        std::net::IpAddr::V6(v6) => Protocol::Ip6(v6),
                                    };
                                    Multiaddr::empty().with(ip).with(Protocol::Tcp(sa.port()))
                                })
                                .collect(),
                            Err(e) => {
                                tracing::debug!(peer = %hp, error = %e, "cannot resolve explicit peer");
                                Vec::new()
                            }
                        };
                        let _ = tx.send((index, addrs));
                    });
                }
            }
        }
    }

    pub(super) fn on_resolved(&mut self, index: usize, addrs: Vec<Multiaddr>) {
        let Some(e) = self.explicit.get_mut(index) else {
            return;
        };
        if !matches!(e.state, ExplicitState::Resolving) {
            return;
        }
        if addrs.is_empty() {
            e.schedule_retry(Instant::now());
            return;
        }
        self.dial_explicit(index, addrs);
    }

    fn dial_explicit(&mut self, index: usize, addrs: Vec<Multiaddr>) {
        let peer = self.explicit[index].peer;
        let mut conns = HashSet::new();
        for addr in addrs {
            let opts = match peer {
                Some(p) => DialOpts::peer_id(p)
                    .addresses(vec![addr.clone()])
                    .condition(PeerCondition::Always)
                    .allocate_new_port()
                    .build(),
                None => DialOpts::unknown_peer_id()
                    .address(addr.clone())
                    .allocate_new_port()
                    .build(),
            };
            let conn = opts.connection_id();
            match self.swarm.dial(opts) {
                Ok(()) => {
                    conns.insert(conn);
                }
                Err(err) => {
                    tracing::debug!(%addr, error = %err, "cannot dial explicit peer");
                }
            }
        }
        let e = &mut self.explicit[index];
        if conns.is_empty() {
            e.schedule_retry(Instant::now());
        } else {
            tracing::debug!(peer = %e.spec, "dialling explicit peer");
            e.state = ExplicitState::Dialing(conns);
        }
    }
}
