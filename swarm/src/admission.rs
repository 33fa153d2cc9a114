//! Which inbound peer-protocol streams the server takes on: each peer its share of the stream
//! slots.
//!
//! A peer may hold at most `per_peer` streams. When every slot is taken, a stream from a peer
//! holding fewer than the busiest peer (by more than one) takes the place of that peer's oldest
//! stream, which is closed: many idle or slow streams from a few peers cannot keep a newcomer
//! out. Otherwise the new stream is refused (and counted). The state is bounded by the slots:
//! a peer is only tracked while it holds a stream.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use libp2p::PeerId;
use tokio::sync::{oneshot, watch};

/// Open streams now, the most ever open at once, streams refused and streams closed to make
/// room for another peer's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamStats {
    pub open: usize,
    pub peak: usize,
    pub refused: u64,
    pub preempted: u64,
}

#[derive(Default)]
struct PeerStreams {
    /// Oldest first: the stream's id and the way to close it.
    streams: VecDeque<(u64, oneshot::Sender<()>)>,
}

struct Inner {
    peers: HashMap<PeerId, PeerStreams>,
    open: usize,
    next_id: u64,
}

pub(crate) struct Admission {
    max: usize,
    per_peer: usize,
    inner: Mutex<Inner>,
    stats: watch::Sender<StreamStats>,
}

/// Why a stream was not taken on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The peer holds its share already.
    PeerShare,
    /// Every slot is taken by peers holding no more than this one.
    Full,
}

/// A stream slot, given back when dropped. [`Ticket::preempted`] resolves when the slot was
/// handed to another peer; the stream must then be dropped.
pub(crate) struct Ticket {
    admission: Arc<Admission>,
    peer: PeerId,
    id: u64,
    preempted: oneshot::Receiver<()>,
}

impl Admission {
    pub(crate) fn new(max: usize, per_peer: usize) -> Arc<Self> {
        Arc::new(Self {
            max: max.max(1),
            per_peer: per_peer.max(1),
            inner: Mutex::new(Inner {
                peers: HashMap::new(),
                open: 0,
                next_id: 0,
            }),
            stats: watch::Sender::new(StreamStats::default()),
        })
    }

    pub(crate) fn stats(&self) -> watch::Receiver<StreamStats> {
        self.stats.subscribe()
    }

    pub(crate) fn admit(self: &Arc<Self>, peer: PeerId) -> Result<Ticket, Refused> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mine = inner.peers.get(&peer).map_or(0, |p| p.streams.len());
        if mine >= self.per_peer {
            drop(inner);
            self.stats.send_modify(|s| s.refused += 1);
            return Err(Refused::PeerShare);
        }
        let mut preempted = false;
        if inner.open >= self.max {
            // The busiest peer gives up its oldest stream, if it holds more than one beyond us.
            let victim = inner
                .peers
                .iter()
                .filter(|(p, s)| **p != peer && s.streams.len() > mine + 1)
                .max_by_key(|(_, s)| s.streams.len())
                .map(|(p, _)| *p);
            let Some(victim) = victim else {
                drop(inner);
                self.stats.send_modify(|s| s.refused += 1);
                return Err(Refused::Full);
            };
            let v = inner.peers.get_mut(&victim).expect("victim tracked");
            if let Some((_, close)) = v.streams.pop_front() {
                let _ = close.send(());
            }
            if v.streams.is_empty() {
                inner.peers.remove(&victim);
            }
            tracing::debug!(%victim, %peer, "stream slot handed from the busiest peer to another");
            preempted = true;
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let (tx, rx) = oneshot::channel();
        inner
            .peers
            .entry(peer)
            .or_default()
            .streams
            .push_back((id, tx));
        if !preempted {
            inner.open += 1;
        }
        let open = inner.open;
        self.stats.send_modify(|s| {
            s.preempted += u64::from(preempted);
            s.open = open;
            s.peak = s.peak.max(open);
        });
        drop(inner);
        Ok(Ticket {
            admission: self.clone(),
            peer,
            id,
            preempted: rx,
        })
    }
}

impl Ticket {
    /// Resolves once this slot went to another peer.
    pub(crate) async fn preempted(&mut self) {
        if (&mut self.preempted).await.is_err() {
            // The sender is only dropped with the admission's state: never preempted.
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut inner = self
            .admission
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // A preempted slot is no longer listed: it was handed on, and counted so.
        let Some(p) = inner.peers.get_mut(&self.peer) else {
            return;
        };
        let Some(i) = p.streams.iter().position(|(id, _)| *id == self.id) else {
            return;
        };
        p.streams.remove(i);
        if p.streams.is_empty() {
            inner.peers.remove(&self.peer);
        }
        inner.open -= 1;
        let open = inner.open;
        self.admission.stats.send_modify(|s| s.open = open);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_peer_gets_its_share_and_the_busiest_gives_way() {
        let a = Admission::new(4, 3);
        let hog = PeerId::random();
        let mut held: Vec<Ticket> = (0..3).map(|_| a.admit(hog).unwrap()).collect();
        assert_eq!(a.admit(hog).err(), Some(Refused::PeerShare));
        let other = PeerId::random();
        held.push(a.admit(other).unwrap());
        // Full: a newcomer takes the hog's oldest slot, never the one-stream peer's.
        let new = PeerId::random();
        let t = a.admit(new).unwrap();
        assert!(held[0].preempted.try_recv().is_ok());
        assert!(held[1].preempted.try_recv().is_err());
        assert_eq!(a.stats().borrow().open, 4);
        // Now 2, 1, 1: nobody holds more than one beyond a one-stream peer.
        assert_eq!(a.admit(other).err(), Some(Refused::Full));
        drop(held);
        drop(t);
        let s = *a.stats().borrow();
        assert_eq!((s.open, s.peak, s.preempted, s.refused), (0, 4, 1, 2));
        assert!(a.inner.lock().unwrap().peers.is_empty());
    }
}
