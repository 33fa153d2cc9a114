//! Downloads: a manifest from a peer held as partial while its chunks are put one by one,
//! then committed once the NAR has been checked.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use peerix_nix::{Sha256Hash, StorePath};
use tracing::debug;

use super::ChunkStore;
use crate::index::hash_key;
use crate::{ChunkId, Error, Manifest, Result, VerifiedChunk};

impl ChunkStore {
    /// Start (or resume) a download: the manifest (from a peer, checked later against the
    /// NarHash) keeps the chunks put for it from GC until it is finished, aborted, or
    /// reclaimed ([`reclaim_partials`](Self::reclaim_partials)) after it was suspended. Chunks
    /// a suspended download of the same NAR put are still there, so a retry fetches only the
    /// rest.
    pub fn begin_download(&self, m: &Manifest) -> Result<()> {
        m.validate()?;
        // Shared with GC's sweep batches: a batch either sees this download or ran before it
        // put anything.
        let _gc = self.inner.gc.read().expect("gc lock");
        if self.inner.manifests.contains_key(m.nar_hash.0)? {
            return Ok(());
        }
        self.inner.roots_gen.fetch_add(1, Ordering::SeqCst);
        self.inner.partial.insert(m.nar_hash.0, m.encode())?;
        self.inner
            .partial_at
            .insert(m.nar_hash.0, &now_secs().to_le_bytes())?;
        *self
            .inner
            .active
            .lock()
            .expect("active downloads")
            .entry(m.nar_hash)
            .or_default() += 1;
        // Durable at once, so that a crash mid-download cannot orphan the chunks already put.
        self.inner.db.flush()?;
        Ok(())
    }

    /// A download stopped before the end (its peers failed, or Nix went away): what it
    /// stored is kept for a retry, until [`reclaim_partials`](Self::reclaim_partials) finds it
    /// idle.
    pub fn suspend_download(&self, nar_hash: &Sha256Hash) -> Result<()> {
        self.end_active(nar_hash);
        if self.inner.partial.contains_key(nar_hash.0)? {
            self.inner
                .partial_at
                .insert(nar_hash.0, &now_secs().to_le_bytes())?;
        }
        Ok(())
    }

    /// Drop downloads that no one is running and that have been idle for `idle` or longer
    /// (all of them with a zero `idle`, as on start: none of them runs any more). Their chunks
    /// are GC's to reclaim. Returns how many were dropped.
    pub fn reclaim_partials(&self, idle: Duration) -> Result<u64> {
        let now = now_secs();
        let mut n = 0;
        for k in self.inner.partial.iter().keys() {
            let k = k?;
            let nar = hash_key(&k)?;
            if self
                .inner
                .active
                .lock()
                .expect("active downloads")
                .contains_key(&nar)
            {
                continue;
            }
            let at = self
                .inner
                .partial_at
                .get(&k)?
                .and_then(|v| v.as_ref().try_into().ok().map(u64::from_le_bytes))
                .unwrap_or(0);
            if now.saturating_sub(at) >= idle.as_secs() {
                self.inner.partial.remove(&k)?;
                self.inner.partial_at.remove(&k)?;
                debug!(nar = %nar, "interrupted download reclaimed");
                n += 1;
            }
        }
        Ok(n)
    }

    fn end_active(&self, nar_hash: &Sha256Hash) {
        let mut a = self.inner.active.lock().expect("active downloads");
        if let Some(n) = a.get_mut(nar_hash) {
            *n -= 1;
            if *n == 0 {
                a.remove(nar_hash);
            }
        }
    }

    /// Store one chunk, verified against its id. Readable (and servable) as soon as this
    /// returns; durable and indexed with the puts around it, in the background (see
    /// [`crate::pending`] and `drain.rs`), at the latest when the download finishes or the
    /// store is flushed. Returns false if the store already had it.
    pub fn put_chunk(&self, id: &ChunkId, data: &[u8]) -> Result<bool> {
        if data.len() > crate::MAX_CHUNK {
            return Err(Error::ChunkTooLarge(data.len()));
        }
        let got = ChunkId::of(data);
        if got != *id {
            return Err(Error::ChunkMismatch { expected: *id, got });
        }
        self.put(id, data, true)
    }

    /// Store a chunk a download received (its id already checked, which the type proves), as
    /// it came: not compressed. A downloaded NAR is normally imported into the Nix store right
    /// away, after which GC releases its pack copy, so compressing it would mostly cost time on
    /// the download's critical path; compaction compresses what stays. Readable (and servable)
    /// as soon as this returns. Returns false if the store already had it.
    pub fn put_verified(&self, chunk: &VerifiedChunk) -> Result<bool> {
        self.put(&chunk.id, &chunk.data, false)
    }

    pub(super) fn put(&self, id: &ChunkId, data: &[u8], compress: bool) -> Result<bool> {
        let _gc = self.inner.gc.read().expect("gc lock");
        if self.has_chunk(id)? {
            return Ok(false);
        }
        let loc = self.inner.packs.append(id, data, compress)?;
        let unsynced = self.inner.pending.add(*id, data.len() as u32, loc);
        if unsynced > crate::PUT_UNSYNCED_MAX {
            // The disk is behind: wait for it, so that what a crash can forget stays bounded.
            let _waiting = self.inner.pending.waiting();
            self.drain_pending()?;
        } else if unsynced >= crate::PUT_SYNC_BYTES {
            self.inner.drainer.kick();
        }
        Ok(true)
    }

    /// The puts that waited for the disk since the store was opened (see [`crate::PutWaits`]).
    pub fn put_waits(&self) -> crate::PutWaits {
        self.inner.pending.waits()
    }

    /// Finish a download whose NAR has been checked against its NarHash: every chunk must be
    /// there; the manifest becomes complete and durable.
    pub fn finish_download(&self, nar_hash: &Sha256Hash, path: Option<&StorePath>) -> Result<()> {
        // Chunks this NAR shares with a path of the local store, read in place so far, get a
        // pack copy: the NAR is held in packs, and Nix may collect that path at any time. The
        // partial record keeps them from GC meanwhile. (Once Nix imports this NAR, the scan
        // reads it in place too and GC releases the copies.)
        if let Some(m) = self.partial_manifest(nar_hash)? {
            if self.missing(&m)?.is_empty() {
                self.ensure_packed(&m)?;
            }
        }
        let _gc = self.inner.gc.read().expect("gc lock");
        let m = match self.partial_manifest(nar_hash)? {
            Some(m) => m,
            None if self.manifest(nar_hash)?.is_some() => {
                // Chunks fetched to finish a stored NAR whose read failed half-way are
                // durable and indexed now, as a download's are.
                self.drain_pending()?;
                self.end_active(nar_hash);
                return Ok(());
            }
            None => return Err(Error::MissingNar(*nar_hash)),
        };
        if let Some(c) = self.missing(&m)?.first() {
            return Err(Error::MissingChunk(c.id));
        }
        self.commit(&m, &HashMap::new(), None, path)?;
        self.end_active(nar_hash);
        self.inner.partial_at.remove(nar_hash.0)?;
        self.mark_used(nar_hash)?;
        self.inner.db.flush()?;
        Ok(())
    }

    /// A download that must not be resumed (its manifest lied): drop its record.
    pub fn abort_download(&self, nar_hash: &Sha256Hash) -> Result<()> {
        self.end_active(nar_hash);
        self.inner.partial.remove(nar_hash.0)?;
        self.inner.partial_at.remove(nar_hash.0)?;
        Ok(())
    }
}

pub(super) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
