//! Helpers for tests of whole nodes (`Node`): addresses, waiting for events, DHT keys.

use std::time::Duration;

use libp2p::multiaddr::Protocol;
use peerix_nix::StorePathHash;
use peerix_swarm::node::{Node, NodeEvent};
use peerix_swarm::{Multiaddr, PeerId};
use tokio::sync::broadcast::error::RecvError;

use crate::rng::SplitMix;

/// A bound on every wait, so a broken test fails instead of hanging.
pub const WAIT: Duration = Duration::from_secs(60);

pub fn tcp_addr(node: &Node) -> Multiaddr {
    node.listen_addrs()
        .into_iter()
        .find(|a| a.iter().any(|p| matches!(p, Protocol::Tcp(_))))
        .expect("a TCP listen address")
}

/// Waits until `node` reports `peer` connected; race-free because it subscribes before
/// looking at the current state.
pub async fn wait_connected(node: &Node, peer: PeerId) {
    let mut events = node.events();
    if node.connected_peers().await.contains(&peer) {
        return;
    }
    wait_event(&mut events, |e| *e == NodeEvent::PeerConnected(peer))
        .await
        .unwrap_or_else(|| panic!("{} never connected to {peer}", node.peer_id()));
}

pub async fn wait_event(
    events: &mut tokio::sync::broadcast::Receiver<NodeEvent>,
    mut want: impl FnMut(&NodeEvent) -> bool,
) -> Option<NodeEvent> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(e)) if want(&e) => return Some(e),
            Ok(Ok(_)) | Ok(Err(RecvError::Lagged(_))) => continue,
            Ok(Err(RecvError::Closed)) | Err(_) => return None,
        }
    }
}

/// Keys that look random enough for the DHT (splitmix64).
pub fn keys(n: usize, seed: u64) -> Vec<StorePathHash> {
    let mut r = SplitMix(seed);
    let mut next = move || r.next();
    (0..n)
        .map(|_| {
            let mut b = [0u8; 20];
            b[..8].copy_from_slice(&next().to_le_bytes());
            b[8..16].copy_from_slice(&next().to_le_bytes());
            b[16..].copy_from_slice(&next().to_le_bytes()[..4]);
            StorePathHash(b)
        })
        .collect()
}

/// Repeats a provider lookup until `want` shows up (announcements travel asynchronously).
pub async fn find_provider(node: &Node, key: &StorePathHash, want: PeerId) -> bool {
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if node
            .providers(key, Duration::from_secs(5))
            .await
            .contains(&want)
        {
            return true;
        }
    }
    false
}
