//! The server's side of deltas: which chunks of an older version a requested chunk is sent
//! against. A plan is made once per pair of NARs (single flight: the many requests of one
//! download wait for the same plan) and kept for the next requests.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use lru::LruCache;
use peerix_chunkstore::{package_name, ChunkStore, DeltaPlan};
use peerix_nix::Sha256Hash;
use tokio::sync::OnceCell;
use tracing::debug;

use crate::catalog::Catalog;
use crate::protocol::DeltaAsk;

/// Pairs of NARs whose plans are kept.
const PLANS: usize = 16;

type Cell = Arc<OnceCell<Option<Arc<DeltaPlan>>>>;

pub(crate) struct DeltaPlans {
    cache: Mutex<LruCache<(Sha256Hash, Sha256Hash), Cell>>,
}

impl Default for DeltaPlans {
    fn default() -> Self {
        Self {
            cache: Mutex::new(LruCache::new(NonZeroUsize::new(PLANS).expect("non-zero"))),
        }
    }
}

impl DeltaPlans {
    /// A plan for the chunks of `ask.nar` against the first of the offered older NARs that we
    /// share too and that is another version of the same package (a delta against anything
    /// private would tell the requester something about it).
    pub(crate) async fn plan(
        &self,
        store: &ChunkStore,
        catalog: &dyn Catalog,
        ask: &DeltaAsk,
    ) -> Option<Arc<DeltaPlan>> {
        if !catalog.shares_nar(&ask.nar) {
            return None;
        }
        for old in ask.bases.iter().filter(|o| catalog.shares_nar(o)) {
            let key = (ask.nar, *old);
            let cell = self
                .cache
                .lock()
                .expect("delta plans")
                .get_or_insert(key, Cell::default)
                .clone();
            let plan = cell
                .get_or_init(|| async {
                    let r = store
                        .blocking(move |cs| {
                            let (Some(new_path), Some(old_path)) =
                                (cs.local_source(&key.0)?, cs.local_source(&key.1)?)
                            else {
                                return Ok(None);
                            };
                            if package_name(new_path.name()) != package_name(old_path.name()) {
                                return Ok(None);
                            }
                            cs.delta_plan(&key.0, &key.1)
                        })
                        .await;
                    r.map_err(|e| debug!(error = %e, "no delta plan"))
                        .ok()
                        .flatten()
                        .map(Arc::new)
                })
                .await;
            if let Some(p) = plan {
                return Some(p.clone());
            }
        }
        None
    }
}
