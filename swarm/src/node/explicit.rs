//! Explicit peers, the ones named in the configuration (for VPNs without broadcast): parsing
//! their specs, resolving `host:port` entries, dialling them, redialling with backoff whenever
//! they go away, and holding their connections open with an idle keep-alive stream. Nothing
//! else finds these peers, so the node keeps them connected on its own.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use tokio::time::Instant;

use super::event_loop::EventLoop;
use super::NodeEvent;

/// An idle stream on this protocol holds a connection to an explicit peer open: they are
/// there because nothing else finds them, and letting the connection idle out would only have
/// us redial a minute later, over and over. Both ends hold the stream, since either end
/// closes a connection it considers idle.
pub(super) const KEEPALIVE_PROTOCOL: StreamProtocol = StreamProtocol::new("/peerix/keepalive/1");

pub(super) const REDIAL_INITIAL: Duration = Duration::from_secs(1);
const REDIAL_MAX: Duration = Duration::from_secs(60);
/// A connection that lived this long was healthy: its loss starts the backoff afresh.
pub(super) const REDIAL_RESET_AFTER: Duration = Duration::from_secs(120);

/// Keep-alive streams held for one peer at once (one per connection is what peerix opens; a
/// redial may open the next before the old one is gone). More are reset: each held stream is
/// a task and buffers, and a peer could otherwise open them without end.
const KEEPALIVES_PER_PEER: usize = 4;

/// Holds the keep-alive streams peers open to us, a few per peer, until the node stops.
pub(super) async fn hold_inbound_keepalives(mut incoming: libp2p_stream::IncomingStreams) {
    use futures::StreamExt;
    let held: Arc<Mutex<HashMap<PeerId, usize>>> = Arc::default();
    while let Some((peer, stream)) = incoming.next().await {
        {
            let mut held = held.lock().unwrap_or_else(|e| e.into_inner());
            let n = held.entry(peer).or_default();
            if *n >= KEEPALIVES_PER_PEER {
                tracing::debug!(%peer, "too many keep-alive streams from the peer; resetting one");
                continue;
            }
            *n += 1;
        }
        tracing::trace!(%peer, "holding a connection open for the peer");
        let held = held.clone();
        tokio::spawn(async move {
            hold_stream(stream).await;
            let mut held = held.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = held.get_mut(&peer) {
                *n -= 1;
                if *n == 0 {
                    held.remove(&peer);
                }
            }
        });
    }
}

/// Keeps a keep-alive stream open until the other end or the connection goes away.
pub(super) async fn hold_stream(mut stream: libp2p::Stream) {
    use futures::AsyncReadExt;
    let mut buf = [0u8; 64];
    // Nothing is ever sent; any bytes are ignored.
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

/// What an explicit peer entry names.
#[derive(Debug, Clone)]
enum ExplicitTarget {
    Addr(Multiaddr),
    HostPort(String),
}

#[derive(Debug)]
pub(super) enum ExplicitState {
    Idle { next: Instant },
    Resolving,
    Dialing(HashSet<ConnectionId>),
    Connected,
}

/// An explicit peer, kept connected: redialled with backoff whenever it goes away.
#[derive(Debug)]
pub(super) struct Explicit {
    spec: String,
    target: Option<ExplicitTarget>,
    pub(super) peer: Option<PeerId>,
    pub(super) state: ExplicitState,
    pub(super) backoff: Duration,
}

impl Explicit {
    pub(super) fn parse(spec: &str) -> Explicit {
        let spec_trim = spec.trim();
        let target = if spec_trim.starts_with('/') {
            match spec_trim.parse::<Multiaddr>() {
                Ok(a) => Some(ExplicitTarget::Addr(a)),
                Err(e) => {
                    tracing::warn!(peer = spec, error = %e, "ignoring an explicit peer that is not a valid multiaddr");
                    None
                }
            }
        } else if spec_trim
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
        {
            Some(ExplicitTarget::HostPort(spec_trim.to_owned()))
        } else {
            tracing::warn!(
                peer = spec,
                "ignoring an explicit peer that is neither a multiaddr nor host:port"
            );
            None
        };
        let peer = match &target {
            Some(ExplicitTarget::Addr(a)) => match a.iter().last() {
                Some(Protocol::P2p(id)) => Some(id),
                _ => None,
            },
            _ => None,
        };
        Explicit {
            spec: spec_trim.to_owned(),
            target,
            peer,
            state: ExplicitState::Idle {
                next: Instant::now(),
            },
            backoff: REDIAL_INITIAL,
        }
    }

    pub(super) fn schedule_retry(&mut self, now: Instant) {
        self.state = ExplicitState::Idle {
            next: now + self.backoff,
        };
        self.backoff = (self.backoff * 2).min(REDIAL_MAX);
    }
}

impl EventLoop {
    pub(super) fn hold_open(&mut self, peer: PeerId) {
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
                    .build(),
                None => DialOpts::unknown_peer_id().address(addr.clone()).build(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_peer_specs() {
        let e = Explicit::parse("/ip4/10.0.0.1/tcp/12305");
        assert!(matches!(e.target, Some(ExplicitTarget::Addr(_))));
        assert!(e.peer.is_none());
        let id = PeerId::random();
        let e = Explicit::parse(&format!("/ip4/10.0.0.1/tcp/12305/p2p/{id}"));
        assert_eq!(e.peer, Some(id));
        let e = Explicit::parse("example.org:12305");
        assert!(matches!(e.target, Some(ExplicitTarget::HostPort(_))));
        let e = Explicit::parse("[::1]:12305");
        assert!(matches!(e.target, Some(ExplicitTarget::HostPort(_))));
        assert!(Explicit::parse("nonsense").target.is_none());
        assert!(Explicit::parse("/not/a/multiaddr").target.is_none());
    }
}
