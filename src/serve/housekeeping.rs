//! The chunk store's upkeep inside the daemon: interrupted downloads reclaimed, GC after each
//! scan of the local store, and the disk budget kept after downloads. One run at a time; a
//! request for a run while one goes on is folded into it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use peerix_chunkstore::ChunkStore;
use tracing::{debug, warn};

/// A download suspended this long (its chunks kept for Nix's retry) is given up and its
/// chunks become GC's to reclaim.
pub const STALLED_AFTER: Duration = Duration::from_secs(10 * 60);

#[derive(Clone)]
pub struct Housekeeping {
    store: ChunkStore,
    budget: Option<u64>,
    running: Arc<AtomicBool>,
}

impl Housekeeping {
    /// On start no download runs, so every partial one left by an earlier process is
    /// reclaimed at once.
    pub fn start(store: ChunkStore, budget: Option<u64>) -> peerix_chunkstore::Result<Self> {
        let n = store.reclaim_partials(Duration::ZERO)?;
        if n > 0 {
            eprintln!("peerix: {n} interrupted downloads reclaimed");
        }
        Ok(Self {
            store,
            budget,
            running: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Start a run in the background unless one is going on.
    pub fn collect(&self) {
        if self.running.swap(true, Ordering::SeqCst) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            me.run().await;
            me.running.store(false, Ordering::SeqCst);
        });
    }

    /// After a download: a run if the packs have grown past the budget.
    pub async fn after_download(&self) {
        let Some(budget) = self.budget else { return };
        match self.store.blocking(|cs| cs.pack_file_bytes()).await {
            Ok(n) if n > budget => self.collect(),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot measure the packs"),
        }
    }

    async fn run(&self) {
        let started = Instant::now();
        let budget = self.budget;
        let r = self
            .store
            .blocking(move |cs| {
                let stalled = cs.reclaim_partials(STALLED_AFTER)?;
                Ok((stalled, cs.gc_within(budget, &mut |_| {})?))
            })
            .await;
        match r {
            Ok((stalled, st))
                if stalled + st.chunks_deleted + st.pack_copies_released + st.packs_removed > 0 =>
            {
                eprintln!(
                    "peerix: gc: {} stalled downloads dropped, {} NARs evicted, {} unused chunks \
                     deleted, {} pack copies released, {} bytes of packs reclaimed in {:.2?} \
                     (longest pause {:.2?})",
                    stalled,
                    st.nars_evicted,
                    st.chunks_deleted,
                    st.pack_copies_released,
                    st.bytes_reclaimed,
                    started.elapsed(),
                    st.longest_pause,
                );
            }
            Ok(_) => debug!("gc: nothing to do"),
            Err(e) => warn!(error = %e, "gc of the chunk store failed"),
        }
    }
}
