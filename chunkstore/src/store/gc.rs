//! Garbage collection: chunks no manifest uses, pack copies of what the local store holds,
//! empty and mostly-dead packs.

use std::collections::{HashMap, HashSet};
use std::ops::Bound;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use peerix_nix::Sha256Hash;
use tracing::{debug, warn};

use super::read::verify;
use super::{tx_err, ChunkStore, TxError};
use crate::index::{chunk_key, hash_key, ChunkRec};
use crate::pack::{PackLoc, HEADER};
use crate::{ChunkId, Manifest, Result};

#[derive(Clone, Debug, Default)]
pub struct GcStats {
    pub chunks_deleted: u64,
    pub bytes_deleted: u64,
    pub pack_copies_released: u64,
    pub packs_removed: u64,
    pub packs_compacted: u64,
    pub bytes_reclaimed: u64,
    /// NARs evicted to fit the budget ([`ChunkStore::gc_within`]).
    pub nars_evicted: u64,
    /// The longest time GC held the store exclusively (readers and writers waited).
    pub longest_pause: Duration,
}

/// Chunk records swept per exclusive hold of the GC lock.
pub const SWEEP_BATCH: usize = 1024;

/// Times the exclusive holds of the GC lock.
#[derive(Default)]
pub(super) struct Pause {
    longest: Duration,
}

impl Pause {
    pub(super) fn exclusive<T>(
        &mut self,
        store: &ChunkStore,
        f: impl FnOnce(&ChunkStore) -> Result<T>,
    ) -> Result<T> {
        let _w = store.inner.gc.write().expect("gc lock");
        let t = Instant::now();
        let r = f(store);
        self.longest = self.longest.max(t.elapsed());
        r
    }
}

impl ChunkStore {
    /// Forget a NAR (its chunks lose a reference; GC reclaims what nothing else uses).
    pub fn remove_manifest(&self, nar_hash: &Sha256Hash) -> Result<bool> {
        let Some(m) = self.manifest(nar_hash)? else {
            return Ok(false);
        };
        let mut stale_paths = vec![];
        for kv in self.inner.paths.iter() {
            let (k, v) = kv?;
            if v.starts_with(&nar_hash.0) {
                stale_paths.push(k);
            }
        }
        if !self.remove_batched(&m, &stale_paths)? {
            return Ok(false);
        }
        self.inner
            .layouts
            .lock()
            .expect("layout cache")
            .pop(nar_hash);
        self.inner.db.flush()?;
        Ok(true)
    }

    pub(super) fn manifests_of(&self, tree: &sled::Tree) -> Result<Vec<Manifest>> {
        tree.iter()
            .map(|kv| {
                let (k, v) = kv?;
                Manifest::decode(hash_key(&k)?, &v)
            })
            .collect()
    }

    /// Chunks whose pack copy must stay even where the local store has them too: those of
    /// pinned NARs, of downloads, and of NARs the local store does not hold (a path Nix
    /// collects takes its files with it, and a NAR held only in packs must not lose a chunk
    /// it shares with that path).
    pub(super) fn pack_needed(&self) -> Result<HashSet<ChunkId>> {
        let mut nars = self.pinned_nars()?;
        for k in self.inner.manifests.iter().keys() {
            let k = k?;
            if !self.inner.local.contains_key(&k)? {
                nars.insert(hash_key(&k)?);
            }
        }
        let mut set = HashSet::new();
        for nar in nars {
            if let Some(m) = self.manifest(&nar)? {
                set.extend(m.chunks.iter().map(|c| c.id));
            }
        }
        for m in self.manifests_of(&self.inner.partial)? {
            set.extend(m.chunks.iter().map(|c| c.id));
        }
        Ok(set)
    }

    /// Delete chunks no manifest uses, release pack copies of chunks readable from the local
    /// store (unless pinned), delete empty packs and compact mostly-dead ones. Safe to kill at
    /// any point: the index only ever points at data that is on disk.
    ///
    /// Online and incremental: the chunk records are swept in batches of [`SWEEP_BATCH`], each
    /// under the exclusive GC lock for only as long as that batch takes, so reads, puts and
    /// ingests (which hold the lock shared) wait at most one batch; packs are compacted under
    /// the shared lock and only their deletion is exclusive. [`GcStats::longest_pause`] is the
    /// longest time the exclusive lock was held.
    pub fn gc(&self, progress: &mut dyn FnMut(&str)) -> Result<GcStats> {
        self.gc_within(None, progress)
    }

    /// [`gc`](Self::gc), after evicting least recently used NARs (see
    /// [`evict_to`](Self::evict_to)) until the packs' live bytes fit in `budget`. With a budget,
    /// packs with dead bytes are compacted as well, the most dead first, until the files fit.
    pub fn gc_within(
        &self,
        budget: Option<u64>,
        progress: &mut dyn FnMut(&str),
    ) -> Result<GcStats> {
        // One GC at a time: the pack list and the live bytes below must not change under it
        // except by appends to packs created after the seal.
        let _one = self.inner.gc_run.lock().expect("gc run lock");
        let i = &self.inner;
        let mut st = GcStats::default();
        if let Some(b) = budget {
            let ev = self.evict_to(b)?;
            st.nars_evicted = ev.nars;
            if ev.nars > 0 {
                progress(&format!("evicted {} NARs to fit the budget", ev.nars));
            }
        }
        let mut pause = Pause::default();
        // Pack bytes of puts not indexed yet would look like garbage; packs are sealed so that
        // every pack listed here only ever loses records while this GC runs.
        let sealed: Vec<u32> = pause.exclusive(self, |_| {
            self.drain_pending()?;
            i.packs.seal()?;
            i.packs.list()
        })?;

        let mut live: HashMap<u32, u64> = HashMap::new();
        let mut roots: Option<(u64, HashSet<ChunkId>, HashSet<ChunkId>)> = None;
        let mut after: Option<sled::IVec> = None;
        loop {
            let done = pause.exclusive(self, |_| {
                // Downloads begun and paths pinned since the last batch protect their chunks.
                let gen = i.roots_gen.load(Ordering::SeqCst);
                if roots.as_ref().is_none_or(|r| r.0 != gen) {
                    let in_flight = self
                        .manifests_of(&i.partial)?
                        .iter()
                        .flat_map(|m| m.chunks.iter().map(|c| c.id))
                        .collect();
                    roots = Some((gen, in_flight, self.pack_needed()?));
                }
                let (_, in_flight, needed) = roots.as_ref().expect("just set");
                let range = match &after {
                    Some(k) => i
                        .chunks
                        .range::<&[u8], _>((Bound::Excluded(k.as_ref()), Bound::Unbounded)),
                    None => i.chunks.iter(),
                };
                let mut batch = sled::Batch::default();
                let mut n = 0;
                for kv in range {
                    let (k, v) = kv?;
                    n += 1;
                    let mut r = ChunkRec::decode(&v)?;
                    let id = chunk_key(&k)?;
                    if r.refs == 0 && !in_flight.contains(&id) {
                        batch.remove(k.clone());
                        st.chunks_deleted += 1;
                        st.bytes_deleted += u64::from(r.len);
                    } else if r.pack.is_some() && r.local.is_some() && !needed.contains(&id) {
                        r.pack = None;
                        batch.insert(k.clone(), r.encode());
                        st.pack_copies_released += 1;
                    } else if let Some(p) = r.pack {
                        *live.entry(p.pack).or_default() += HEADER as u64 + u64::from(p.stored_len);
                    }
                    after = Some(k);
                    if n == SWEEP_BATCH {
                        break;
                    }
                }
                i.chunks.apply_batch(batch)?;
                Ok(n < SWEEP_BATCH)
            })?;
            if done {
                break;
            }
        }
        i.db.flush()?;
        progress(&format!(
            "deleted {} unused chunks, released {} pack copies",
            st.chunks_deleted, st.pack_copies_released
        ));

        let mut packs: Vec<(u32, u64, u64)> = sealed
            .into_iter()
            .map(|p| Ok((p, i.packs.file_len(p)?, live.get(&p).copied().unwrap_or(0))))
            .collect::<Result<_>>()?;
        // With a budget the files must shrink to it, however thinly the dead bytes are spread:
        // beyond the mostly-dead packs, those with the most dead bytes are compacted until what
        // is left fits (a pack rewritten for a few dead bytes only when the budget needs them).
        // When the live bytes alone are over it (pinned and local NARs are never evicted), no
        // rewriting makes the files fit: only packs dead by a tenth are compacted then, so
        // that every GC does not rewrite every pack a chunk died in.
        let total: u64 = packs.iter().map(|&(_, size, _)| size).sum();
        let used_total: u64 = packs.iter().map(|&(_, _, used)| used).sum();
        let (mut over, pressed) = match budget {
            Some(b) if used_total <= b => (total.saturating_sub(b), false),
            // The live bytes alone are over it.
            Some(_) => (0, true),
            None => (0, false),
        };
        packs.sort_by_key(|&(_, size, used)| std::cmp::Reverse(size.saturating_sub(used)));
        for (pack, size, used) in packs {
            let dead = size.saturating_sub(used);
            let thin = over > 0 || (pressed && dead >= size / 10);
            if used == 0 {
                pause.exclusive(self, |_| i.packs.remove(pack))?;
                st.packs_removed += 1;
                st.bytes_reclaimed += size;
                progress(&format!("removed pack {pack}"));
            } else if used < size / 2 || (thin && dead > 0) {
                self.compact(pack, &mut pause)?;
                st.packs_compacted += 1;
                st.bytes_reclaimed += dead;
                progress(&format!("compacted pack {pack}"));
            } else {
                continue;
            }
            over = over.saturating_sub(dead);
        }
        st.longest_pause = pause.longest;
        Ok(st)
    }

    /// Copy a pack's live chunks to the active pack, repoint the index, delete the old pack.
    /// The caller is the one GC running, so no other record can move into a sealed pack.
    pub(super) fn compact(&self, pack: u32, pause: &mut Pause) -> Result<()> {
        let i = &self.inner;
        // Reads and puts go on while live chunks are copied; a record only changes here if it
        // still points at the old copy.
        let shared = i.gc.read().expect("gc lock");
        let mut moved: Vec<(ChunkId, PackLoc, PackLoc)> = vec![];
        for kv in i.chunks.iter() {
            let (k, v) = kv?;
            let r = ChunkRec::decode(&v)?;
            let Some(old) = r.pack.filter(|p| p.pack == pack) else {
                continue;
            };
            let id = chunk_key(&k)?;
            match i.packs.read(&id, &old, r.len).and_then(|d| verify(&id, d)) {
                Ok(data) => {
                    let new = i.packs.append(&id, &data, true)?;
                    moved.push((id, old, new));
                }
                Err(e) => {
                    warn!(chunk = %id, error = %e, "corrupt chunk dropped during compaction");
                    self.drop_location(&id, |r| r.pack = None)?;
                }
            }
        }
        i.packs.make_durable(moved.iter().map(|(_, _, new)| new))?;
        i.chunks
            .transaction(|t| {
                for (id, old, new) in &moved {
                    if let Some(v) = t.get(id.0)? {
                        let mut r = ChunkRec::decode(&v).map_err(TxError::Abort)?;
                        if r.pack == Some(*old) {
                            r.pack = Some(*new);
                            t.insert(&id.0, r.encode())?;
                        }
                    }
                }
                Ok(())
            })
            .map_err(tx_err)?;
        i.db.flush()?;
        drop(shared);
        // A read that found the old location holds the lock shared until it has read it.
        pause.exclusive(self, |_| i.packs.remove(pack))?;
        debug!(pack, chunks = moved.len(), "pack compacted");
        Ok(())
    }
}
