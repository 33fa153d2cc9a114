//! The server's tables keyed by peer id: offence scores, refusals, chunk bytes served and
//! `have` budgets. Peer ids cost nothing to mint, so each table keeps a bounded number of
//! peers, the least recently seen forgotten first.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use lru::LruCache;

/// The sizes of the server's per-peer tables.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrackedPeers {
    pub scores: usize,
    pub refused: usize,
    pub served: usize,
    pub have_budget: usize,
}

/// Peers whose `have` budget is tracked at once. Bounded: a peer pushed out comes back with
/// a full bucket, which costs it a fresh identity.
const HAVE_BUDGET_PEERS: usize = 4096;

/// Chunk bytes served, per peer, for the most recently served peers; the rest added up.
struct Served {
    peers: LruCache<PeerId, u64>,
    others: u64,
}

pub(crate) struct PeerTables {
    /// Offences of peers, counted until they end a refusal.
    scores: Mutex<LruCache<PeerId, u32>>,
    /// Peers refused, and until when. Apart from the scores, so that peers minted to commit
    /// one offence each cannot push a refused peer out.
    refused: Mutex<LruCache<PeerId, Instant>>,
    served: Mutex<Served>,
    /// Per peer: `have` budget left (chunk ids) and when it was last topped up.
    have_budget: Mutex<LruCache<PeerId, (f64, Instant)>>,
    max_offences: u32,
    ban_duration: Duration,
}

impl PeerTables {
    pub(crate) fn new(max_peers: usize, max_offences: u32, ban_duration: Duration) -> Self {
        let n = NonZeroUsize::new(max_peers.max(1)).expect("non-zero");
        Self {
            scores: Mutex::new(LruCache::new(n)),
            refused: Mutex::new(LruCache::new(n)),
            served: Mutex::new(Served {
                peers: LruCache::new(n),
                others: 0,
            }),
            have_budget: Mutex::new(LruCache::new(
                NonZeroUsize::new(HAVE_BUDGET_PEERS).expect("non-zero"),
            )),
            max_offences,
            ban_duration,
        }
    }

    /// Whether the peer is refused now; a refusal that ended is forgotten with its score.
    pub(crate) fn refused(&self, peer: &PeerId) -> bool {
        let mut refused = self.refused.lock().expect("refused");
        match refused.peek(peer) {
            Some(t) if *t > Instant::now() => true,
            Some(_) => {
                // Served its time: a clean slate.
                refused.pop(peer);
                drop(refused);
                self.scores.lock().expect("scores").pop(peer);
                false
            }
            None => false,
        }
    }

    /// Counts an offence; `Some(offences)` when it made the peer refused.
    pub(crate) fn offence(&self, peer: PeerId) -> Option<u32> {
        let mut scores = self.scores.lock().expect("scores");
        let n = scores.get_or_insert_mut(peer, || 0);
        *n += 1;
        let n = *n;
        drop(scores);
        if n < self.max_offences {
            return None;
        }
        let mut refused = self.refused.lock().expect("refused");
        if refused.peek(&peer).is_some() {
            return None;
        }
        refused.push(peer, Instant::now() + self.ban_duration);
        Some(n)
    }

    pub(crate) fn offenders(&self) -> Vec<PeerId> {
        let now = Instant::now();
        let refused = self.refused.lock().expect("refused");
        refused
            .iter()
            .filter(|(_, t)| **t > now)
            .map(|(p, _)| *p)
            .collect()
    }

    pub(crate) fn offences(&self, peer: &PeerId) -> u32 {
        let scores = self.scores.lock().expect("scores");
        scores.peek(peer).copied().unwrap_or(0)
    }

    pub(crate) fn add_served(&self, peer: PeerId, n: usize) {
        let mut served = self.served.lock().expect("served");
        if let Some(c) = served.peers.get_mut(&peer) {
            *c += n as u64;
            return;
        }
        if let Some((_, old)) = served.peers.push(peer, n as u64) {
            served.others += old;
        }
    }

    pub(crate) fn bytes_served(&self) -> HashMap<PeerId, u64> {
        let served = self.served.lock().expect("served");
        served.peers.iter().map(|(p, n)| (*p, *n)).collect()
    }

    pub(crate) fn bytes_served_to_others(&self) -> u64 {
        self.served.lock().expect("served").others
    }

    /// Takes `n` from the peer's `have` budget (a token bucket of `rate` a second, `burst`
    /// at most); false when it has not that much left.
    pub(crate) fn take_have_budget(&self, peer: PeerId, n: usize, rate: f64, burst: f64) -> bool {
        let now = Instant::now();
        let mut budgets = self.have_budget.lock().expect("have budget");
        let (left, at) = budgets.get_or_insert_mut(peer, || (burst, now));
        *left = (*left + now.duration_since(*at).as_secs_f64() * rate).min(burst);
        *at = now;
        if *left < n as f64 {
            return false;
        }
        *left -= n as f64;
        true
    }

    pub(crate) fn sizes(&self) -> TrackedPeers {
        TrackedPeers {
            scores: self.scores.lock().expect("scores").len(),
            refused: self.refused.lock().expect("refused").len(),
            served: self.served.lock().expect("served").peers.len(),
            have_budget: self.have_budget.lock().expect("have budget").len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_keep_their_bound_and_refusals_outlast_minted_offenders() {
        let t = PeerTables::new(4, 2, Duration::from_secs(60));
        let offender = PeerId::random();
        assert_eq!(t.offence(offender), None);
        assert_eq!(t.offence(offender), Some(2));
        // Peers minted to offend once each fill the scores, not the refusals.
        for _ in 0..100 {
            let p = PeerId::random();
            t.offence(p);
            t.add_served(p, 10);
        }
        assert!(t.refused(&offender));
        let s = t.sizes();
        assert!(s.scores <= 4 && s.refused == 1 && s.served == 4, "{s:?}");
        assert_eq!(
            t.bytes_served().values().sum::<u64>() + t.bytes_served_to_others(),
            1000
        );
    }
}
