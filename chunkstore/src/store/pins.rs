//! Pins: a store path's NAR kept in packs (and its narinfo kept) so it stays servable after
//! the path leaves the local Nix store.

use std::collections::HashSet;

use peerix_nix::{NarInfo, StorePathHash};
use sled::transaction::Transactional;

use super::{tx_err, ChunkStore, TxError};
use crate::{ChunkId, Error, Manifest, Result};

impl ChunkStore {
    /// Pin a store path's NAR: its chunk bytes are kept in packs (copied from the local store
    /// if needed) so it stays servable after the path leaves the local store.
    pub fn pin(&self, hash: &StorePathHash) -> Result<Manifest> {
        let (m, name, _) = self.pin_chunks(hash)?;
        self.inner.pins.insert(hash.0, name.as_bytes())?;
        self.inner.db.flush()?;
        Ok(m)
    }

    /// [`pin`](Self::pin), and keep the path's narinfo so the path can still be described to
    /// peers once it has left the local store. Returns the bytes copied into packs (the rest
    /// were held there already).
    pub fn pin_path(&self, info: &NarInfo) -> Result<Pinned> {
        let hash = info.store_path.hash();
        let (manifest, _, copied) = self.pin_chunks(&hash)?;
        if manifest.nar_hash != info.nar_hash {
            return Err(Error::NarHashMismatch {
                expected: info.nar_hash,
                got: manifest.nar_hash,
            });
        }
        let name = info.store_path.base_name().as_bytes();
        let text = info.render();
        (&self.inner.pins, &self.inner.pin_info)
            .transaction(|(pins, infos)| {
                pins.insert(&hash.0, name)?;
                infos.insert(&hash.0, text.as_bytes())?;
                Ok::<_, TxError>(())
            })
            .map_err(tx_err)?;
        self.inner.db.flush()?;
        Ok(Pinned {
            manifest,
            copied_bytes: copied,
        })
    }

    /// Copy the chunks of a path's NAR into packs where they are not there yet.
    pub(super) fn pin_chunks(&self, hash: &StorePathHash) -> Result<(Manifest, String, u64)> {
        // A chunk put but not indexed yet has its pack copy only in memory.
        {
            let _gc = self.inner.gc.read().expect("gc lock");
            self.drain_pending()?;
        }
        let (nar, name) = self
            .path_nar(hash)?
            .ok_or_else(|| Error::NotInLocalStore(hash.to_string()))?;
        let m = self.manifest(&nar)?.ok_or(Error::MissingNar(nar))?;
        let copied = self.ensure_packed(&m)?;
        Ok((m, name, copied))
    }

    /// Copy the chunks of `m` that have no pack copy into packs (from the local store, where
    /// they are read in place); returns the bytes copied. The caller holds no GC lock.
    pub(super) fn ensure_packed(&self, m: &Manifest) -> Result<u64> {
        let mut seen = HashSet::new();
        let mut copied = 0;
        let (mut batch, mut batch_bytes) = (vec![], 0);
        for c in &m.chunks {
            if !seen.insert(c.id) {
                continue;
            }
            let rec = self.chunk_rec(&c.id)?.ok_or(Error::MissingChunk(c.id))?;
            if rec.pack.is_none() {
                let data = self.read_chunk(&c.id)?;
                copied += data.len() as u64;
                batch_bytes += data.len();
                batch.push((c.id, data));
                if batch_bytes >= 64 << 20 {
                    self.copy_to_packs(&mut batch)?;
                    batch_bytes = 0;
                }
            }
        }
        self.copy_to_packs(&mut batch)?;
        Ok(copied)
    }

    /// Append chunks to packs, sync them once, then record where they are.
    pub(super) fn copy_to_packs(&self, batch: &mut Vec<(ChunkId, Vec<u8>)>) -> Result<()> {
        let _gc = self.inner.gc.read().expect("gc lock");
        let mut locs = Vec::with_capacity(batch.len());
        for (id, data) in batch.drain(..) {
            locs.push((id, self.inner.packs.append(&id, &data, true)?));
        }
        self.inner.packs.make_durable(locs.iter().map(|(_, l)| l))?;
        for (id, loc) in locs {
            self.drop_location(&id, |r| r.pack = r.pack.or(Some(loc)))?;
        }
        Ok(())
    }

    pub fn unpin(&self, hash: &StorePathHash) -> Result<bool> {
        let had = self.inner.pins.remove(hash.0)?.is_some();
        self.inner.pin_info.remove(hash.0)?;
        self.inner.db.flush()?;
        Ok(had)
    }

    /// The narinfo kept for a path pinned with [`pin_path`](Self::pin_path).
    pub fn pinned_info(&self, hash: &StorePathHash) -> Result<Option<NarInfo>> {
        self.inner
            .pin_info
            .get(hash.0)?
            .map(|v| parse_info(&v))
            .transpose()
    }

    /// Every narinfo kept for a pinned path.
    pub fn pinned_infos(&self) -> Result<Vec<NarInfo>> {
        self.inner
            .pin_info
            .iter()
            .values()
            .map(|v| parse_info(&v?))
            .collect()
    }

    /// Base names of pinned store paths.
    pub fn pins(&self) -> Result<Vec<String>> {
        self.inner
            .pins
            .iter()
            .values()
            .map(|v| {
                let v = v?;
                String::from_utf8(v.to_vec()).map_err(|_| Error::BadRecord { what: "pin" })
            })
            .collect()
    }
}

/// What [`ChunkStore::pin_path`] did.
#[derive(Clone, Debug)]
pub struct Pinned {
    pub manifest: Manifest,
    /// Chunk bytes copied into packs; the rest of the NAR was already there.
    pub copied_bytes: u64,
}

pub(super) fn parse_info(v: &[u8]) -> Result<NarInfo> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or(Error::BadRecord {
            what: "pinned narinfo",
        })
}
