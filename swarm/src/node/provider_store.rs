//! Kademlia's record store, bounded against peers that would fill it.
//!
//! peerix uses the DHT for one thing: provider records keyed by the 20-byte hash of a store
//! path. This store keeps only those. Plain (value) records are refused outright. Our own
//! records (the keys this node announces) have a budget of their own, so no amount of foreign
//! records can make our announcements fail. Foreign records must have a well-formed key, carry
//! a few short addresses at most, count against a quota of their provider and a total, and
//! expire on time (Kademlia's `MemoryStore` drops an expired foreign record only when a lookup
//! of that very key touches it).
//!
//! Inbound records reach the store through the event loop (`StoreInserts::FilterBoth`), so
//! refusals are counted and logged here at debug level rather than by Kademlia at info level.

use std::borrow::Cow;
use std::collections::{hash_map, BTreeSet, HashMap};
use std::iter;
use std::time::{Duration, Instant};

use libp2p::kad::store::{Error, RecordStore, Result};
use libp2p::kad::{ProviderRecord, Record, RecordKey};
use libp2p::{Multiaddr, PeerId};

/// The length of a store-path hash, the only key peerix announces.
pub const KEY_LEN: usize = 20;

type KeyBytes = [u8; KEY_LEN];

/// Bounds on what the provider store holds. When the foreign records reach their total, a
/// new record takes the place of one of the provider holding most (if it holds more than one
/// beyond the newcomer's provider): however many records some providers push, the others keep
/// an equal share.
#[derive(Debug, Clone)]
pub struct ProviderLimits {
    /// Keys this node itself provides.
    pub max_own_keys: usize,
    /// Records of other providers, in all.
    pub max_foreign_records: usize,
    /// Records of any one other provider.
    pub max_records_per_peer: usize,
    /// Other providers with records at once; records of more are refused until some expire.
    pub max_providers: usize,
    /// Providers kept per key besides ourselves (Kademlia's replication factor).
    pub max_providers_per_key: usize,
    /// Addresses kept per foreign record, and the longest kept (bytes).
    pub max_addresses: usize,
    pub max_address_len: usize,
    /// The longest a foreign record is kept, whatever its sender asked for.
    pub max_ttl: Duration,
}

impl Default for ProviderLimits {
    fn default() -> Self {
        Self {
            max_own_keys: super::MAX_PROVIDED_KEYS,
            // About 300 bytes each (measured): some 150 MiB at most. What this node holds of a
            // LAN of a few dozen nodes with 20,000 paths each.
            max_foreign_records: 500_000,
            // What a large store (100,000 paths) announces.
            max_records_per_peer: 100_000,
            // About 1 KiB each with their addresses and index: 10 MiB at most.
            max_providers: 10_000,
            max_providers_per_key: 20,
            max_addresses: 4,
            // A relayed address (`/ip4/…/udp/…/quic-v1/p2p/RELAY/p2p-circuit/p2p/PEER`), how a
            // node behind NAT is reached, holds two peer ids: about 95 bytes.
            max_address_len: 128,
            max_ttl: Duration::from_secs(48 * 3600),
        }
    }
}

/// What the provider store holds, and what it refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProviderStats {
    pub own_keys: usize,
    pub foreign_records: usize,
    /// Distinct other providers with at least one record.
    pub foreign_providers: usize,
    /// Records refused since the start (malformed key, quota, total, plain records).
    pub refused: u64,
}

/// A provider of foreign records, by a small index: records name it by index, not by its
/// 80-byte peer id, and its addresses are kept once, not once per record.
type Slot = u32;

struct Provider {
    peer: PeerId,
    /// The latest addresses it announced with.
    addresses: Vec<Multiaddr>,
    /// Its records by expiry.
    records: BTreeSet<(Instant, KeyBytes)>,
}

pub struct ProviderStore {
    local: PeerId,
    limits: ProviderLimits,
    own: HashMap<KeyBytes, ProviderRecord>,
    /// Foreign records: their providers and expiries, per key.
    foreign: HashMap<KeyBytes, Vec<(Slot, Instant)>>,
    providers: Vec<Option<Provider>>,
    free_slots: Vec<Slot>,
    slot_of: HashMap<PeerId, Slot>,
    /// Providers by how many records they hold, to find the one holding most.
    by_count: BTreeSet<(usize, Slot)>,
    /// Every foreign record by expiry, so expired ones go without a lookup touching them.
    expiry: BTreeSet<(Instant, KeyBytes, Slot)>,
    foreign_records: usize,
    refused: u64,
}

fn key_bytes(k: &RecordKey) -> Option<KeyBytes> {
    KeyBytes::try_from(k.as_ref()).ok()
}

impl ProviderStore {
    pub fn new(local: PeerId, limits: ProviderLimits) -> Self {
        Self {
            local,
            limits,
            own: HashMap::new(),
            foreign: HashMap::new(),
            providers: Vec::new(),
            free_slots: Vec::new(),
            slot_of: HashMap::new(),
            by_count: BTreeSet::new(),
            expiry: BTreeSet::new(),
            foreign_records: 0,
            refused: 0,
        }
    }

    pub fn stats(&self) -> ProviderStats {
        ProviderStats {
            own_keys: self.own.len(),
            foreign_records: self.foreign_records,
            foreign_providers: self.slot_of.len(),
            refused: self.refused,
        }
    }

    /// Drops every foreign record that expired by `now`.
    pub fn expire(&mut self, now: Instant) {
        while let Some(&(t, key, slot)) = self.expiry.first() {
            if t > now {
                break;
            }
            self.remove_foreign(&key, slot);
        }
    }

    fn refuse(&mut self, why: &'static str, record: &ProviderRecord, e: Error) -> Result<()> {
        self.refused += 1;
        tracing::debug!(peer = %record.provider, key_len = record.key.as_ref().len(), why, "provider record refused");
        Err(e)
    }

    fn add_own(&mut self, key: KeyBytes, record: ProviderRecord) -> Result<()> {
        if !self.own.contains_key(&key) && self.own.len() >= self.limits.max_own_keys {
            return Err(Error::MaxProvidedKeys);
        }
        self.own.insert(key, record);
        Ok(())
    }

    fn provider(&self, slot: Slot) -> &Provider {
        self.providers[slot as usize]
            .as_ref()
            .expect("a slot in use names a provider")
    }

    fn provider_mut(&mut self, slot: Slot) -> &mut Provider {
        self.providers[slot as usize]
            .as_mut()
            .expect("a slot in use names a provider")
    }

    fn add_foreign(&mut self, key: KeyBytes, record: ProviderRecord) -> Result<()> {
        let now = Instant::now();
        self.expire(now);
        let ttl_end = now + self.limits.max_ttl;
        let expires = record.expires.map_or(ttl_end, |t| t.min(ttl_end));
        if expires <= now {
            return Ok(());
        }
        let peer = record.provider;
        let slot = self.slot_of.get(&peer).copied();
        let count = slot.map_or(0, |s| self.provider(s).records.len());
        let list = self.foreign.get(&key);
        let existing = slot.and_then(|s| Some((s, list?.iter().position(|(p, _)| *p == s)?)));
        if let Some((slot, i)) = existing {
            // A refresh: no new record, nothing more counted.
            let list = self.foreign.get_mut(&key).expect("present");
            let old = std::mem::replace(&mut list[i].1, expires);
            self.expiry.remove(&(old, key, slot));
            self.expiry.insert((expires, key, slot));
            let max_len = self.limits.max_address_len;
            let max_addrs = self.limits.max_addresses;
            let p = self.provider_mut(slot);
            p.records.remove(&(old, key));
            p.records.insert((expires, key));
            set_addresses(p, &record.addresses, max_addrs, max_len);
            return Ok(());
        }
        if list.is_some_and(|l| l.len() >= self.limits.max_providers_per_key) {
            // As Kademlia's MemoryStore: the first providers of a key keep their places.
            return self.refuse("key has enough providers", &record, Error::MaxRecords);
        }
        if count >= self.limits.max_records_per_peer {
            return self.refuse("provider over its quota", &record, Error::MaxRecords);
        }
        if slot.is_none() && self.slot_of.len() >= self.limits.max_providers {
            return self.refuse("too many providers", &record, Error::MaxRecords);
        }
        if self.foreign_records >= self.limits.max_foreign_records {
            // Full: the provider holding most gives up its record closest to expiry, if it
            // holds more than one beyond this one. Every provider keeps at least its share.
            let victim = self
                .by_count
                .last()
                .filter(|(n, s)| Some(*s) != slot && *n > count + 1)
                .map(|(_, s)| *s);
            let Some(victim) = victim else {
                return self.refuse("store full", &record, Error::MaxRecords);
            };
            let (_, vkey) = *self
                .provider(victim)
                .records
                .first()
                .expect("a counted provider holds records");
            self.remove_foreign(&vkey, victim);
        }
        // The slot may have been freed above only if it was the victim's, and it is not.
        let slot = match self.slot_of.get(&peer) {
            Some(s) => *s,
            None => {
                let p = Provider {
                    peer,
                    addresses: Vec::new(),
                    records: BTreeSet::new(),
                };
                let s = match self.free_slots.pop() {
                    Some(s) => {
                        self.providers[s as usize] = Some(p);
                        s
                    }
                    None => {
                        self.providers.push(Some(p));
                        Slot::try_from(self.providers.len() - 1).expect("slots fit in u32")
                    }
                };
                self.slot_of.insert(peer, s);
                s
            }
        };
        match self.foreign.entry(key) {
            hash_map::Entry::Occupied(mut e) => e.get_mut().push((slot, expires)),
            hash_map::Entry::Vacant(e) => {
                // Most keys have one provider: no room for more until there are more.
                e.insert(vec![(slot, expires)]);
            }
        }
        let max_len = self.limits.max_address_len;
        let max_addrs = self.limits.max_addresses;
        let p = self.provider_mut(slot);
        p.records.insert((expires, key));
        set_addresses(p, &record.addresses, max_addrs, max_len);
        let n = p.records.len();
        self.by_count.remove(&(n - 1, slot));
        self.by_count.insert((n, slot));
        self.expiry.insert((expires, key, slot));
        self.foreign_records += 1;
        Ok(())
    }

    fn remove_foreign(&mut self, key: &KeyBytes, slot: Slot) {
        let hash_map::Entry::Occupied(mut list) = self.foreign.entry(*key) else {
            return;
        };
        let Some(i) = list.get().iter().position(|(s, _)| *s == slot) else {
            return;
        };
        let (_, expires) = list.get_mut().swap_remove(i);
        if list.get().is_empty() {
            list.remove();
        }
        self.expiry.remove(&(expires, *key, slot));
        self.foreign_records -= 1;
        let p = self.provider_mut(slot);
        p.records.remove(&(expires, *key));
        let (n, peer) = (p.records.len(), p.peer);
        self.by_count.remove(&(n + 1, slot));
        if n > 0 {
            self.by_count.insert((n, slot));
        } else {
            self.providers[slot as usize] = None;
            self.slot_of.remove(&peer);
            self.free_slots.push(slot);
        }
    }
}

/// Keeps at most `max` of the addresses, none longer than `max_len` bytes.
fn set_addresses(p: &mut Provider, addrs: &[Multiaddr], max: usize, max_len: usize) {
    let kept: Vec<Multiaddr> = addrs
        .iter()
        .filter(|a| a.len() <= max_len)
        .take(max)
        .cloned()
        .collect();
    if !kept.is_empty() || p.addresses.is_empty() {
        p.addresses = kept;
    }
}

impl RecordStore for ProviderStore {
    type RecordsIter<'a> = iter::Empty<Cow<'a, Record>>;
    type ProvidedIter<'a> = iter::Map<
        hash_map::Values<'a, KeyBytes, ProviderRecord>,
        fn(&'a ProviderRecord) -> Cow<'a, ProviderRecord>,
    >;

    fn get(&self, _: &RecordKey) -> Option<Cow<'_, Record>> {
        None
    }

    /// peerix keeps no plain records: they would be memory for anyone to fill.
    fn put(&mut self, _: Record) -> Result<()> {
        self.refused += 1;
        Err(Error::MaxRecords)
    }

    fn remove(&mut self, _: &RecordKey) {}

    fn records(&self) -> Self::RecordsIter<'_> {
        iter::empty()
    }

    fn add_provider(&mut self, record: ProviderRecord) -> Result<()> {
        let Some(key) = key_bytes(&record.key) else {
            return self.refuse("not a store-path hash", &record, Error::ValueTooLarge);
        };
        if record.provider == self.local {
            self.add_own(key, record)
        } else {
            self.add_foreign(key, record)
        }
    }

    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord> {
        let Some(k) = key_bytes(key) else {
            return Vec::new();
        };
        let mut out: Vec<ProviderRecord> = self.own.get(&k).cloned().into_iter().collect();
        if let Some(list) = self.foreign.get(&k) {
            out.extend(list.iter().map(|(slot, expires)| {
                let p = self.provider(*slot);
                ProviderRecord {
                    key: key.clone(),
                    provider: p.peer,
                    expires: Some(*expires),
                    addresses: p.addresses.clone(),
                }
            }));
        }
        out
    }

    fn provided(&self) -> Self::ProvidedIter<'_> {
        self.own.values().map(Cow::Borrowed)
    }

    fn remove_provider(&mut self, key: &RecordKey, peer: &PeerId) {
        let Some(k) = key_bytes(key) else {
            return;
        };
        if *peer == self.local {
            self.own.remove(&k);
        } else if let Some(slot) = self.slot_of.get(peer).copied() {
            self.remove_foreign(&k, slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ProviderLimits {
        ProviderLimits {
            max_own_keys: 3,
            max_foreign_records: 5,
            max_records_per_peer: 2,
            max_providers_per_key: 2,
            ..ProviderLimits::default()
        }
    }

    fn rec(key: u8, provider: PeerId, ttl: Duration) -> ProviderRecord {
        ProviderRecord {
            key: RecordKey::new(&[key; KEY_LEN]),
            provider,
            expires: Some(Instant::now() + ttl),
            addresses: Vec::new(),
        }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn quotas_bound_foreign_records_and_leave_our_own_alone() {
        let me = PeerId::random();
        let mut s = ProviderStore::new(me, limits());
        let rogue = PeerId::random();
        assert!(s.add_provider(rec(1, rogue, HOUR)).is_ok());
        assert!(s.add_provider(rec(2, rogue, HOUR)).is_ok());
        assert!(
            s.add_provider(rec(3, rogue, HOUR)).is_err(),
            "per-peer quota"
        );
        // A refresh is not a new record.
        assert!(s.add_provider(rec(1, rogue, HOUR)).is_ok());
        let others: Vec<PeerId> = (0..4).map(|_| PeerId::random()).collect();
        for (i, p) in others.iter().enumerate() {
            s.add_provider(rec(10 + i as u8, *p, HOUR)).unwrap();
        }
        // Full at the fourth: the rogue, holding two, gave up the one closest to expiry (the
        // refresh moved key 1's on).
        assert_eq!(s.stats().foreign_records, 5);
        assert_eq!(s.providers(&RecordKey::new(&[2; KEY_LEN])).len(), 0);
        // Now every provider holds one: a second record of one of them is refused.
        assert!(
            s.add_provider(rec(20, others[0], HOUR)).is_err(),
            "total cap"
        );
        assert_eq!(s.stats().foreign_records, 5);
        // Our own keys have their own budget, full store or not.
        for k in 1..=3 {
            s.add_provider(rec(k, me, HOUR)).unwrap();
        }
        assert!(matches!(
            s.add_provider(rec(4, me, HOUR)),
            Err(Error::MaxProvidedKeys)
        ));
        assert_eq!(s.provided().count(), 3);
        assert_eq!(s.providers(&RecordKey::new(&[1; KEY_LEN])).len(), 2);
        s.remove_provider(&RecordKey::new(&[1; KEY_LEN]), &rogue);
        assert_eq!(s.stats().foreign_records, 4);
        assert_eq!(s.stats().foreign_providers, 4);
        assert!(s.add_provider(rec(3, rogue, HOUR)).is_ok(), "room again");
    }

    #[test]
    fn malformed_keys_plain_records_and_long_addresses_are_refused() {
        let mut s = ProviderStore::new(PeerId::random(), limits());
        let p = PeerId::random();
        let mut r = rec(1, p, HOUR);
        r.key = RecordKey::new(&vec![7u8; 16 * 1024]);
        assert!(s.add_provider(r).is_err());
        assert!(s.put(Record::new(vec![1u8; 20], vec![0; 10])).is_err());
        let mut r = rec(1, p, HOUR);
        let long: Multiaddr = format!("/dns4/{}/tcp/1", "a".repeat(200)).parse().unwrap();
        let short: Multiaddr = "/ip4/10.0.0.1/tcp/1".parse().unwrap();
        let relayed: Multiaddr = format!(
            "/ip4/203.0.113.7/udp/12305/quic-v1/p2p/{}/p2p-circuit/p2p/{p}",
            PeerId::random()
        )
        .parse()
        .unwrap();
        r.addresses = vec![
            long,
            relayed.clone(),
            short.clone(),
            short.clone(),
            short.clone(),
            short.clone(),
        ];
        s.add_provider(r).unwrap();
        let got = s.providers(&RecordKey::new(&[1; KEY_LEN]));
        assert_eq!(got[0].addresses.len(), 4);
        assert_eq!(got[0].addresses[0], relayed, "a relayed address is kept");
        assert!(got[0].addresses[1..].iter().all(|a| *a == short));
        assert_eq!(s.stats().refused, 2);
    }

    #[test]
    fn providers_beyond_their_cap_wait_for_others_to_expire() {
        let mut s = ProviderStore::new(
            PeerId::random(),
            ProviderLimits {
                max_providers: 2,
                ..limits()
            },
        );
        let p: Vec<PeerId> = (0..3).map(|_| PeerId::random()).collect();
        s.add_provider(rec(1, p[0], Duration::from_millis(1)))
            .unwrap();
        s.add_provider(rec(2, p[1], HOUR)).unwrap();
        assert!(s.add_provider(rec(3, p[2], HOUR)).is_err());
        s.expire(Instant::now() + Duration::from_secs(1));
        s.add_provider(rec(3, p[2], HOUR)).unwrap();
        assert_eq!(s.stats().foreign_providers, 2);
    }

    #[test]
    fn expired_records_go_without_a_lookup() {
        let mut s = ProviderStore::new(PeerId::random(), limits());
        let p = PeerId::random();
        s.add_provider(rec(1, p, Duration::from_millis(1))).unwrap();
        s.add_provider(rec(2, p, HOUR)).unwrap();
        s.expire(Instant::now() + Duration::from_secs(1));
        assert_eq!(s.stats().foreign_records, 1);
        assert_eq!(s.stats().foreign_providers, 1);
        s.expire(Instant::now() + 2 * HOUR);
        assert_eq!(
            s.stats(),
            ProviderStats {
                refused: 0,
                ..Default::default()
            }
        );
    }
}
/// The memory a full store takes, by hand (it fills 1,000,000 records):
/// `PEERIX_PROVIDERS=10000 cargo nextest run -p peerix-swarm --lib --run-ignored only
/// --no-capture -E 'test(memory_per_record)'` (one run per figure: a second store in the same
/// process reuses the first one's pages).
#[cfg(test)]
mod measure {
    use super::*;

    fn rss_kib() -> u64 {
        let s = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = s.lines().find(|l| l.starts_with("VmRSS")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// What a full store costs: 200,000 records here (`PEERIX_PROVIDER_RECORDS` for more,
    /// `PEERIX_PROVIDERS` providers, default 10), each at most a kilobyte of RSS.
    #[test]
    fn memory_per_record() {
        let var = |k: &str, d: usize| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(d)
        };
        let nprov = var("PEERIX_PROVIDERS", 10);
        let nrec = var("PEERIX_PROVIDER_RECORDS", 200_000);
        let limits = ProviderLimits {
            max_foreign_records: nrec,
            max_records_per_peer: nrec,
            max_providers: nprov,
            ..ProviderLimits::default()
        };
        let mut s = ProviderStore::new(PeerId::random(), limits.clone());
        let peers: Vec<PeerId> = (0..nprov).map(|_| PeerId::random()).collect();
        let addrs: Vec<Multiaddr> = [
            "/ip4/10.0.0.1/tcp/12305",
            "/ip4/10.0.0.1/udp/12305/quic-v1",
            "/ip6/fd00::1/tcp/12305",
            "/ip6/fd00::1/udp/12305/quic-v1",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        let before = rss_kib();
        let mut n: u64 = 0;
        while s.stats().foreign_records < limits.max_foreign_records {
            n += 1;
            let mut k = [0u8; KEY_LEN];
            k[..8].copy_from_slice(&n.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
            // Fresh addresses each time, as decoded from the wire.
            let rec = ProviderRecord {
                key: RecordKey::new(&k),
                provider: peers[n as usize % nprov],
                expires: Some(Instant::now() + Duration::from_secs(1800)),
                addresses: addrs
                    .iter()
                    .map(|a| Multiaddr::try_from(a.to_vec()).unwrap())
                    .collect(),
            };
            let _ = s.add_provider(rec);
        }
        let grown = rss_kib() - before;
        let records = s.stats().foreign_records as u64;
        eprintln!(
            "{records} foreign records from {nprov} providers: RSS +{} MiB ({} bytes a record)",
            grown / 1024,
            grown * 1024 / records
        );
        assert!(
            grown * 1024 / records < 1024,
            "{} bytes a record",
            grown * 1024 / records
        );
    }
}
