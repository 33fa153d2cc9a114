//! Compress once, serve many: in the background, at a quarter of one core, the chunks of
//! what this node pins (seeds) and of what peers fetch from it again and again are
//! recompressed at a high zstd level, so that every later transfer of them is small (the way a
//! binary cache compresses a NAR once with xz). The chunk store keeps the frames
//! (`recompress.rs` there); the server sends them to peers that accept zstd.

use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lru::LruCache;
use peerix_chunkstore::{ChunkStore, RECOMPRESS_LEVEL};
use peerix_nix::Sha256Hash;
use peerix_swarm::ServerEvent;
use tokio::sync::{broadcast, Notify};
use tracing::{debug, warn};

/// A NAR whose manifest peers asked for this many times is worth recompressing.
const HOT_AFTER: u32 = 2;
/// NARs whose fetch counts are remembered.
const REMEMBERED: usize = 4096;
/// The share of one core recompression may use.
const DUTY: f64 = 0.25;
/// A round also runs this often without a reason, for pins made by another process.
const ROUND_EVERY: Duration = Duration::from_secs(10 * 60);

pub struct Recompressor {
    store: ChunkStore,
    /// Bytes of recompressed frames the store may hold.
    budget: u64,
    wake: Notify,
    fetched: Mutex<LruCache<Sha256Hash, u32>>,
    hot: Mutex<HashSet<Sha256Hash>>,
    /// NARs already done in this process.
    done: Mutex<HashSet<Sha256Hash>>,
}

impl Recompressor {
    /// Start the background task; it follows the server's events and runs a round when a
    /// NAR turns hot, when asked (`wake`), and every ten minutes.
    pub fn spawn(
        store: ChunkStore,
        budget: u64,
        events: broadcast::Receiver<ServerEvent>,
    ) -> Arc<Self> {
        let me = Arc::new(Self {
            store,
            budget,
            wake: Notify::new(),
            fetched: Mutex::new(LruCache::new(
                NonZeroUsize::new(REMEMBERED).expect("non-zero"),
            )),
            hot: Mutex::default(),
            done: Mutex::default(),
        });
        tokio::spawn(me.clone().follow(events));
        tokio::spawn(me.clone().rounds());
        me
    }

    /// Look at the pins again (after a seed).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    async fn follow(self: Arc<Self>, mut events: broadcast::Receiver<ServerEvent>) {
        loop {
            match events.recv().await {
                Ok(ServerEvent::ManifestServed { nar_hash, .. }) => {
                    let n = {
                        let mut f = self.fetched.lock().expect("fetched");
                        let n = f.get_or_insert_mut(nar_hash, || 0);
                        *n += 1;
                        *n
                    };
                    if n == HOT_AFTER {
                        self.hot.lock().expect("hot").insert(nar_hash);
                        self.wake.notify_one();
                    }
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    async fn rounds(self: Arc<Self>) {
        loop {
            let _ = tokio::time::timeout(ROUND_EVERY, self.wake.notified()).await;
            if let Err(e) = self.round().await {
                warn!(error = %e, "recompressing for the wire failed");
            }
        }
    }

    async fn round(&self) -> peerix_chunkstore::Result<()> {
        let pinned = self.store.blocking(|cs| cs.pinned_nars()).await?;
        let mut todo: Vec<Sha256Hash> = pinned.into_iter().collect();
        todo.extend(self.hot.lock().expect("hot").iter().copied());
        todo.sort_unstable();
        todo.dedup();
        todo.retain(|n| !self.done.lock().expect("done").contains(n));
        let pruned = self.store.blocking(|cs| cs.prune_recompressed()).await?;
        if pruned > 0 {
            debug!(pruned, "frames of chunks no longer held dropped");
        }
        for nar in todo {
            let budget = self.budget;
            let r = self
                .store
                .blocking(move |cs| cs.recompress_nar(&nar, RECOMPRESS_LEVEL, budget, DUTY))
                .await?;
            if r.chunks > 0 {
                eprintln!(
                    "peerix: recompressed {} chunks of {nar} for the wire: {} → {} bytes",
                    r.chunks, r.raw_bytes, r.frame_bytes
                );
            }
            if r.full {
                debug!("the recompressed frames fill their budget");
                return Ok(());
            }
            self.done.lock().expect("done").insert(nar);
            self.hot.lock().expect("hot").remove(&nar);
        }
        Ok(())
    }
}
