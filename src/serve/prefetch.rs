//! Manifests asked for when a narinfo is found, before Nix asks for the NAR.
//!
//! Nix asks for every narinfo of a closure first and for each NAR later, once the path's
//! references are in. A NAR fetch from peers begins by asking a holder for the NAR's manifest:
//! a round trip before the first chunk is asked for, which over a long path is most of a small
//! path's fetch. The holder that answered the narinfo is asked for the manifest at once
//! instead, and the fetch uses its answer (checked as any manifest is: its NarSize here, its
//! chunks and NarHash as the download goes), so that round trip has passed by the time Nix
//! asks. A NAR asked for before its manifest came in is fetched as before.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lru::LruCache;
use peerix_chunkstore::Manifest;
use peerix_nix::Sha256Hash;
use peerix_swarm::{Client, PeerId};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::Semaphore;
use tracing::debug;

/// NARs up to this size get their manifest asked for with their narinfo: the round trip it
/// saves weighs most on small paths, and their manifests are small (a few chunks for most
/// paths; at most 1,024 of the chunker's 64 KiB minimum at this size).
const MAX_NAR: u64 = 64 << 20;
/// Chunks of all the manifests kept together (36 bytes each: about 2.4 MB); the least
/// recently kept go first. A manifest with more than a quarter of them is not kept at all.
const KEPT_CHUNKS: usize = 65_536;
/// Manifests kept, whatever their size (a closure's narinfos come in hundreds at a time).
const KEPT: usize = 4096;
/// Manifest requests in flight at once (far below a peer's 64 stream slots for one node, which
/// the downloads' chunk requests share), and waiting to be sent: more are not asked for.
const AT_ONCE: usize = 8;
const WAITING: usize = 1024;

/// What the manifests asked for ahead came to (`/metrics`).
#[derive(Clone, Default)]
pub(super) struct PrefetchMetrics {
    /// Manifests that came in.
    pub(super) fetched: Counter,
    /// NAR fetches that began with one.
    pub(super) used: Counter,
}

pub(super) struct Prefetch {
    client: Client,
    timeout: Duration,
    kept: Arc<Mutex<Kept>>,
    slots: Arc<Semaphore>,
    waiting: Arc<Semaphore>,
    metrics: PrefetchMetrics,
}

/// The manifests that came in, and their chunks counted.
struct Kept {
    manifests: LruCache<Sha256Hash, (PeerId, Manifest)>,
    chunks: usize,
}

impl Kept {
    fn put(&mut self, nar_hash: Sha256Hash, peer: PeerId, m: Manifest) {
        self.chunks += m.chunks.len();
        if let Some((_, (_, old))) = self.manifests.push(nar_hash, (peer, m)) {
            self.chunks -= old.chunks.len();
        }
        while self.chunks > KEPT_CHUNKS {
            let Some((_, (_, old))) = self.manifests.pop_lru() else {
                break;
            };
            self.chunks -= old.chunks.len();
        }
    }

    fn pop(&mut self, nar_hash: &Sha256Hash) -> Option<(PeerId, Manifest)> {
        let got = self.manifests.pop(nar_hash);
        if let Some((_, m)) = &got {
            self.chunks -= m.chunks.len();
        }
        got
    }
}

impl Prefetch {
    /// `timeout` bounds each request (the daemon's lookup deadline).
    pub(super) fn new(client: Client, timeout: Duration, metrics: PrefetchMetrics) -> Self {
        Self {
            client,
            timeout,
            kept: Arc::new(Mutex::new(Kept {
                manifests: LruCache::new(NonZeroUsize::new(KEPT).expect("non-zero")),
                chunks: 0,
            })),
            slots: Arc::new(Semaphore::new(AT_ONCE)),
            waiting: Arc::new(Semaphore::new(WAITING)),
            metrics,
        }
    }

    /// Ask `peer`, which described the NAR, for its manifest, in the background. Nothing is
    /// asked for a large NAR, one already kept, or when the requests waiting are at their
    /// bound: the fetch then asks as it always did.
    pub(super) fn start(&self, peer: PeerId, nar_hash: Sha256Hash, nar_size: u64) {
        if nar_size > MAX_NAR || self.lock().manifests.contains(&nar_hash) {
            return;
        }
        let Ok(waiting) = self.waiting.clone().try_acquire_owned() else {
            return;
        };
        let (client, timeout, kept, slots, fetched) = (
            self.client.clone(),
            self.timeout,
            self.kept.clone(),
            self.slots.clone(),
            self.metrics.fetched.clone(),
        );
        tokio::spawn(async move {
            let _waiting = waiting;
            let Ok(_slot) = slots.acquire_owned().await else {
                return;
            };
            match tokio::time::timeout(timeout, client.manifest(peer, nar_hash)).await {
                // Only a manifest of the size the narinfo gave is worth keeping; the fetch
                // checks it again, and names a peer whose manifest does not add up.
                Ok(Ok(Some(m))) if m.nar_size == nar_size && m.chunks.len() <= KEPT_CHUNKS / 4 => {
                    fetched.inc();
                    debug!(%peer, nar = %nar_hash, "manifest in ahead of the NAR request");
                    kept.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .put(nar_hash, peer, m);
                }
                Ok(Ok(_)) => debug!(%peer, nar = %nar_hash, "no manifest ahead"),
                Ok(Err(e)) => debug!(%peer, error = %e, "manifest ahead failed"),
                Err(_) => debug!(%peer, nar = %nar_hash, "manifest ahead timed out"),
            }
        });
    }

    /// The manifest kept for `nar_hash`, if it came in: given up, as a fetch takes it.
    pub(super) fn take(&self, nar_hash: &Sha256Hash) -> Option<(PeerId, Manifest)> {
        let m = self.lock().pop(nar_hash);
        if m.is_some() {
            self.metrics.used.inc();
        }
        m
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use peerix_chunkstore::{ChunkId, ChunkRef};

    use super::*;

    fn manifest(seed: u8, chunks: usize) -> (Sha256Hash, Manifest) {
        let nar_hash = Sha256Hash([seed; 32]);
        let m = Manifest {
            nar_hash,
            nar_size: chunks as u64,
            chunks: (0..chunks)
                .map(|i| ChunkRef {
                    id: ChunkId::of(&i.to_le_bytes()),
                    len: 1,
                })
                .collect(),
        };
        (nar_hash, m)
    }

    /// The manifests kept stay within their chunk budget, the least recently kept going first,
    /// and the count follows what is taken and replaced.
    #[test]
    fn kept_manifests_stay_within_their_chunks() {
        let mut kept = Kept {
            manifests: LruCache::new(NonZeroUsize::new(KEPT).unwrap()),
            chunks: 0,
        };
        let peer = PeerId::random();
        let quarter = KEPT_CHUNKS / 4;
        for seed in 0..5 {
            let (h, m) = manifest(seed, quarter);
            kept.put(h, peer, m);
        }
        assert_eq!(kept.chunks, KEPT_CHUNKS);
        assert!(kept.pop(&Sha256Hash([0; 32])).is_none(), "the oldest went");
        let (_, m) = kept.pop(&Sha256Hash([1; 32])).expect("the next is kept");
        assert_eq!(m.chunks.len(), quarter);
        assert_eq!(kept.chunks, KEPT_CHUNKS - quarter);
        // The same NAR again replaces its entry, counted once.
        let (h, m) = manifest(2, 10);
        kept.put(h, peer, m);
        assert_eq!(kept.chunks, 2 * quarter + 10);
    }
}
