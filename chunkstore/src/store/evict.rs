//! The disk budget: NARs held only in packs (neither in the local Nix store nor pinned) are
//! evicted least recently used first until the packs' live bytes fit.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use peerix_nix::{Sha256Hash, StorePathHash};
use tracing::info;

use super::ChunkStore;
use crate::index::{chunk_key, hash_key, ChunkRec};
use crate::pack::HEADER;
use crate::{Error, Result};

fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What [`ChunkStore::evict_to`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Evicted {
    pub nars: u64,
    /// Pack bytes (records and headers) that GC can now reclaim.
    pub bytes: u64,
}

impl ChunkStore {
    /// Record that a NAR was just used (read for Nix, served to a peer, downloaded), for the
    /// least-recently-used order of eviction.
    pub fn mark_used(&self, nar_hash: &Sha256Hash) -> Result<()> {
        // Milliseconds, strictly increasing within a process, so uses in quick succession
        // still have an order.
        let now = now_millis();
        let t = self
            .inner
            .use_clock
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
                Some(now.max(last + 1))
            })
            .map_or(now, |last| now.max(last + 1));
        self.inner.used.insert(nar_hash.0, &t.to_le_bytes())?;
        Ok(())
    }

    /// Bytes the packs keep for chunk records (headers included) once GC has swept: what the
    /// budget bounds. Records the sweep drops (no NAR or download uses them) or releases (the
    /// pack copy of a chunk the local store holds, which nothing needs in packs) do not count:
    /// a NAR Nix has just imported must not make the budget evict another for room its
    /// release makes anyway.
    pub fn packed_live_bytes(&self) -> Result<u64> {
        let needed = self.pack_needed()?;
        let mut n = 0;
        for kv in self.inner.chunks.iter() {
            let (k, v) = kv?;
            let r = ChunkRec::decode(&v)?;
            let Some(p) = r.pack else {
                continue;
            };
            let id = chunk_key(&k)?;
            // What the sweep keeps (`gc_within`): chunks of NARs and downloads, but for pack
            // copies of local chunks that no pinned or packs-only NAR or download needs.
            if needed.contains(&id) || (r.refs > 0 && r.local.is_none()) {
                n += HEADER as u64 + u64::from(p.stored_len);
            }
        }
        Ok(n)
    }

    /// Forget NARs that only packs hold, least recently used first, until the packs' live
    /// bytes are at most `budget`. Pinned NARs, NARs the local Nix store holds and downloads in
    /// progress are never evicted. [`gc`](Self::gc) then reclaims the bytes.
    pub fn evict_to(&self, budget: u64) -> Result<Evicted> {
        let mut live = self.packed_live_bytes()?;
        let mut out = Evicted::default();
        if live <= budget {
            return Ok(out);
        }
        let pinned = self.pinned_nars()?;
        let mut candidates = vec![];
        for k in self.inner.manifests.iter().keys() {
            let k = k?;
            let nar = hash_key(&k)?;
            if pinned.contains(&nar) || self.inner.local.contains_key(&k)? {
                continue;
            }
            let used = self
                .inner
                .used
                .get(&k)?
                .and_then(|v| v.as_ref().try_into().ok().map(u64::from_le_bytes))
                .unwrap_or(0);
            candidates.push((used, nar));
        }
        candidates.sort();
        for (_, nar) in candidates {
            if live <= budget {
                break;
            }
            let freed = self.sole_pack_bytes(&nar)?;
            if self.remove_manifest(&nar)? {
                self.inner.used.remove(nar.0)?;
                live = live.saturating_sub(freed);
                out.nars += 1;
                out.bytes += freed;
                info!(nar = %nar, bytes = freed, "evicted to fit the store budget");
            }
        }
        Ok(out)
    }

    /// Pack bytes that only this NAR's manifest keeps alive.
    fn sole_pack_bytes(&self, nar: &Sha256Hash) -> Result<u64> {
        let Some(m) = self.manifest(nar)? else {
            return Ok(0);
        };
        let mut seen = HashSet::new();
        let mut n = 0;
        for c in &m.chunks {
            if !seen.insert(c.id) {
                continue;
            }
            if let Some(v) = self.inner.chunks.get(c.id.0)? {
                let r = ChunkRec::decode(&v)?;
                if let (1, Some(p), None) = (r.refs, r.pack, r.local) {
                    n += HEADER as u64 + u64::from(p.stored_len);
                }
            }
        }
        Ok(n)
    }

    /// NarHashes of pinned paths.
    pub fn pinned_nars(&self) -> Result<HashSet<Sha256Hash>> {
        let mut set = HashSet::new();
        for k in self.inner.pins.iter().keys() {
            let k = k?;
            let h = StorePathHash(
                k.as_ref()
                    .try_into()
                    .map_err(|_| Error::BadRecord { what: "pin" })?,
            );
            if let Some((nar, _)) = self.path_nar(&h)? {
                set.insert(nar);
            }
        }
        Ok(set)
    }
}
