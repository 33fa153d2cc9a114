//! The node's ban list, bounded: a ban lasts a while, not forever, and the list holds at most
//! so many peers (the oldest ban lifted first). Peer ids cost nothing to mint, so a list kept
//! forever would grow with every identity a liar throws away.

use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use lru::LruCache;

pub(super) struct BanList {
    until: LruCache<PeerId, Instant>,
    duration: Duration,
}

impl BanList {
    pub(super) fn new(max: usize, duration: Duration) -> Self {
        Self {
            until: LruCache::new(NonZeroUsize::new(max.max(1)).expect("non-zero")),
            duration,
        }
    }

    /// Bans `peer` from `now` for the ban duration; returns a peer whose ban was lifted to
    /// make room, if any.
    pub(super) fn ban(&mut self, peer: PeerId, now: Instant) -> Option<PeerId> {
        match self.until.push(peer, now + self.duration) {
            Some((old, _)) if old != peer => Some(old),
            _ => None,
        }
    }

    pub(super) fn is_banned(&self, peer: &PeerId, now: Instant) -> bool {
        self.until.peek(peer).is_some_and(|t| *t > now)
    }

    /// Lifts the bans that ended by `now`; returns whose.
    pub(super) fn expire(&mut self, now: Instant) -> Vec<PeerId> {
        let mut lifted = Vec::new();
        // Every ban lasts as long, so the least recently banned ends first.
        while let Some((p, t)) = self.until.peek_lru() {
            if *t > now {
                break;
            }
            lifted.push(*p);
            self.until.pop_lru();
        }
        lifted
    }

    pub(super) fn len(&self) -> usize {
        self.until.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bans_are_bounded_in_number_and_time() {
        let now = Instant::now();
        let mut b = BanList::new(2, Duration::from_secs(60));
        let p: Vec<PeerId> = (0..3).map(|_| PeerId::random()).collect();
        assert_eq!(b.ban(p[0], now), None);
        assert_eq!(b.ban(p[1], now + Duration::from_secs(1)), None);
        assert_eq!(b.ban(p[0], now + Duration::from_secs(2)), None, "a refresh");
        assert_eq!(b.ban(p[2], now + Duration::from_secs(3)), Some(p[1]));
        assert_eq!(b.len(), 2);
        assert!(b.is_banned(&p[0], now + Duration::from_secs(61)));
        assert_eq!(b.expire(now + Duration::from_secs(62)), vec![p[0]]);
        assert!(!b.is_banned(&p[0], now + Duration::from_secs(62)));
        assert!(b.is_banned(&p[2], now + Duration::from_secs(62)));
    }
}
