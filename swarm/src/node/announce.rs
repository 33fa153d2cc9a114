//! Announcing the store paths this node serves in the DHT: the [`Pacer`] that decides which
//! key goes out next and how fast (the event loop's step that starts the Kademlia
//! announcements it allows is in `dht.rs`). Kademlia's own republication is turned off (see the behaviour), so
//! this is the only place announcements come from.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use peerix_nix::StorePathHash;
use tokio::time::Instant;

/// Announces provided keys at a bounded pace.
///
/// Keys new to the set are announced first; the whole set is walked again once per
/// `interval`, at `max(min_rate, len / interval)` keys per second and with at most
/// `max_in_flight` announcement queries at once, so the DHT traffic a node causes per
/// minute is bounded whatever the size of its store.
#[derive(Debug)]
pub(super) struct Pacer {
    pub(super) set: HashSet<StorePathHash>,
    fresh: VecDeque<StorePathHash>,
    cycle: VecDeque<StorePathHash>,
    cycle_started: Instant,
    interval: Duration,
    min_rate: f64,
    max_in_flight: usize,
    in_flight: usize,
    tokens: f64,
    refilled: Instant,
    /// Keys queued by [`Pacer::announce_all_again`], until that round has gone out.
    again: Option<usize>,
}

impl Pacer {
    pub(super) fn new(
        interval: Duration,
        min_rate: u32,
        max_in_flight: usize,
        now: Instant,
    ) -> Pacer {
        Pacer {
            set: HashSet::new(),
            fresh: VecDeque::new(),
            cycle: VecDeque::new(),
            cycle_started: now,
            interval: interval.max(Duration::from_secs(1)),
            min_rate: f64::from(min_rate.max(1)),
            max_in_flight: max_in_flight.max(1),
            in_flight: 0,
            tokens: 0.0,
            refilled: now,
            again: None,
        }
    }

    /// Replaces the set; returns the keys added and removed.
    pub(super) fn replace(
        &mut self,
        keys: Vec<StorePathHash>,
    ) -> (Vec<StorePathHash>, Vec<StorePathHash>) {
        let new: HashSet<StorePathHash> = keys.into_iter().collect();
        let removed: Vec<_> = self.set.difference(&new).copied().collect();
        let added: Vec<_> = new.difference(&self.set).copied().collect();
        self.fresh.extend(added.iter().copied());
        self.set = new;
        if !removed.is_empty() {
            let set = &self.set;
            self.fresh.retain(|k| set.contains(k));
        }
        (added, removed)
    }

    /// Keys per second.
    pub(super) fn rate(&self) -> f64 {
        (self.set.len() as f64 / self.interval.as_secs_f64()).max(self.min_rate)
    }

    /// The next key to announce now, if the pace and the in-flight bound allow one.
    pub(super) fn next(&mut self, now: Instant) -> Option<StorePathHash> {
        let rate = self.rate();
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        // At most one second's worth of burst, so an idle spell does not bank a flood.
        self.tokens = (self.tokens + elapsed * rate).min(rate.max(1.0));
        if self.in_flight >= self.max_in_flight || self.tokens < 1.0 {
            return None;
        }
        let key = loop {
            if let Some(k) = self.fresh.pop_front() {
                break k;
            }
            if self.cycle.is_empty() {
                if now < self.cycle_started + self.interval || self.set.is_empty() {
                    return None;
                }
                self.cycle_started = now;
                self.cycle = self.set.iter().copied().collect();
            }
            match self.cycle.pop_front() {
                Some(k) if self.set.contains(&k) => break k,
                _ => continue,
            }
        };
        self.tokens -= 1.0;
        self.in_flight += 1;
        Some(key)
    }

    /// Every key goes out again soon (at the usual pace), e.g. once the node has an address
    /// peers can reach that its earlier records lacked.
    pub(super) fn announce_all_again(&mut self, now: Instant) {
        self.fresh = self.set.iter().copied().collect();
        self.cycle.clear();
        self.cycle_started = now;
        self.again = (!self.set.is_empty()).then_some(self.set.len());
    }

    /// Once, when the round `announce_all_again` started has gone out (every key sent and
    /// answered): how many keys it announced.
    pub(super) fn again_finished(&mut self) -> Option<usize> {
        if self.fresh.is_empty() && self.in_flight == 0 {
            self.again.take()
        } else {
            None
        }
    }

    pub(super) fn done(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> StorePathHash {
        let mut b = [0u8; 20];
        b[..4].copy_from_slice(&i.to_be_bytes());
        StorePathHash(b)
    }

    #[test]
    fn pacer_rate_covers_the_set_once_per_interval_with_a_floor() {
        let now = Instant::now();
        let mut p = Pacer::new(Duration::from_secs(900), 10, 8, now);
        p.replace((0..100_000).map(key).collect());
        assert!((p.rate() - 100_000.0 / 900.0).abs() < 1e-9);
        p.replace((0..5).map(key).collect());
        assert_eq!(p.rate(), 10.0);
    }

    #[test]
    fn pacer_bounds_in_flight_and_burst() {
        let start = Instant::now();
        let mut p = Pacer::new(Duration::from_secs(900), 10, 3, start);
        p.replace((0..1000).map(key).collect());
        // Nothing banked at the start.
        assert!(p.next(start).is_none());
        // Ten seconds idle bank one second's worth at most, and in-flight caps it further.
        let t = start + Duration::from_secs(10);
        let mut n = 0;
        while p.next(t).is_some() {
            n += 1;
        }
        assert_eq!(n, 3);
        p.done();
        assert!(p.next(t).is_some());
        assert!(p.next(t).is_none());
    }

    #[test]
    fn pacer_announces_fresh_keys_first_then_cycles_after_the_interval() {
        let start = Instant::now();
        let mut p = Pacer::new(Duration::from_secs(10), 1000, 1000, start);
        p.replace(vec![key(1), key(2)]);
        let t = start + Duration::from_secs(1);
        let mut got = Vec::new();
        while let Some(k) = p.next(t) {
            got.push(k);
        }
        got.sort_by_key(|k| k.0);
        assert_eq!(got, vec![key(1), key(2)]);
        // Before the interval is over nothing is repeated.
        assert!(p.next(start + Duration::from_secs(5)).is_none());
        // A key added later jumps ahead of the next cycle.
        p.replace(vec![key(1), key(2), key(3)]);
        assert_eq!(p.next(start + Duration::from_secs(6)), Some(key(3)));
        // After the interval the whole set comes round again.
        let t = start + Duration::from_secs(11);
        let mut again = Vec::new();
        while let Some(k) = p.next(t) {
            again.push(k);
        }
        assert_eq!(again.len(), 3);
    }

    #[test]
    fn pacer_drops_removed_keys() {
        let start = Instant::now();
        let mut p = Pacer::new(Duration::from_secs(10), 1000, 1000, start);
        p.replace(vec![key(1), key(2)]);
        let (added, removed) = p.replace(vec![key(2)]);
        assert!(added.is_empty());
        assert_eq!(removed, vec![key(1)]);
        let t = start + Duration::from_secs(1);
        assert_eq!(p.next(t), Some(key(2)));
        assert!(p.next(t).is_none());
    }

    #[test]
    fn announcing_all_again_sends_every_key_at_once_and_says_when_done() {
        let start = Instant::now();
        let mut p = Pacer::new(Duration::from_secs(900), 1000, 2, start);
        p.replace(vec![key(1), key(2), key(3)]);
        let t = start + Duration::from_secs(1);
        while p.next(t).is_some() {
            p.done();
        }
        assert_eq!(p.again_finished(), None, "no round asked for");
        // Long before the interval is over, the whole set goes out again.
        p.announce_all_again(t);
        let t = t + Duration::from_secs(1);
        let (a, b) = (p.next(t).unwrap(), p.next(t).unwrap());
        assert_eq!(p.next(t), None, "in flight is bounded");
        p.done();
        assert_eq!(p.again_finished(), None, "one key still to go");
        let c = p.next(t).unwrap();
        let mut got = vec![a, b, c];
        got.sort_by_key(|k| k.0);
        assert_eq!(got, vec![key(1), key(2), key(3)]);
        p.done();
        assert_eq!(p.again_finished(), None, "one still in flight");
        p.done();
        assert_eq!(p.again_finished(), Some(3));
        assert_eq!(p.again_finished(), None, "said once");
    }
}
