//! An explicit peer as configured (a multiaddr, or `host:port` to resolve) and the state of
//! keeping it connected: dialling, connected, or idle until its next redial, with backoff.

use std::collections::HashSet;
use std::time::Duration;

use libp2p::multiaddr::Protocol;
use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId};
use tokio::time::Instant;

pub(super) const REDIAL_INITIAL: Duration = Duration::from_secs(1);
const REDIAL_MAX: Duration = Duration::from_secs(60);
/// A connection that lived this long was healthy: its loss starts the backoff afresh.
pub(super) const REDIAL_RESET_AFTER: Duration = Duration::from_secs(120);

/// What an explicit peer entry names.
#[derive(Debug, Clone)]
pub(super) enum ExplicitTarget {
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
    pub(super) spec: String,
    pub(super) target: Option<ExplicitTarget>,
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
