//! Following the local Nix store: NARs that became valid there (downloaded, then imported by
//! Nix) are read in place from then on, so GC can release their pack copies; NARs whose path
//! left it stop being claimed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use peerix_nix::{Sha256Hash, StorePath};

use tracing::debug;

use super::ChunkStore;
use crate::index::hash_key;
use crate::{ChunkId, Error, Manifest, Result};

/// What [`ChunkStore::detach_local`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Detached {
    /// Chunks that lost their in-place location.
    pub chunks: u64,
    /// The NAR could no longer be produced whole, so its manifest was dropped.
    pub manifest_dropped: bool,
}

impl ChunkStore {
    /// The NAR `nar_hash` of `path`, valid in the local store with that NarHash and NarSize
    /// (as the store's database says), is read in place from now on: every chunk of its
    /// manifest without an in-place location gets one in this path's files. Reads still check
    /// each chunk's BLAKE3, so files that differ from the database are caught, never served.
    /// Returns the chunks that got a location; nothing when the store holds no manifest of it.
    pub fn attach_local(
        &self,
        path: &StorePath,
        nar_hash: &Sha256Hash,
        nar_size: u64,
    ) -> Result<u64> {
        let Some(m) = self.manifest(nar_hash)? else {
            return Ok(0);
        };
        let (real, layout) = self.layout_of(path)?;
        if layout.nar_size() != nar_size || m.nar_size != nar_size {
            return Err(Error::NarSizeMismatch {
                expected: nar_size,
                got: layout.nar_size(),
            });
        }
        let _gc = self.inner.gc.read().expect("gc lock");
        let i = &self.inner;
        let attached = self.attach_batched(&m, path)?;
        i.layouts
            .lock()
            .expect("layout cache")
            .put(*nar_hash, Arc::new((real, layout)));
        i.db.flush()?;
        debug!(%path, chunks = attached, "NAR read in place from now on");
        Ok(attached)
    }

    /// The local path of `nar_hash` left the Nix store (see
    /// [`detach_locals`](Self::detach_locals)).
    pub fn detach_local(&self, nar_hash: &Sha256Hash) -> Result<Detached> {
        Ok(self
            .detach_locals(std::slice::from_ref(nar_hash))?
            .pop()
            .unwrap_or_default())
    }

    /// The local paths of `nars` left the Nix store. Their chunks stop being read from them:
    /// a chunk that another NAR read in place also holds (the next version of the same
    /// package, say) is read from that one from now on, in the same transaction, so that NAR
    /// never lacks a chunk, not even between here and the next scan or across a crash; other
    /// chunks lose their in-place location. Unless every chunk of a NAR has a pack copy (which
    /// is the case for pinned NARs only, since GC releases the others), its manifest goes too,
    /// so it is neither served nor claimed; a request for it then goes to peers.
    pub fn detach_locals(&self, nars: &[Sha256Hash]) -> Result<Vec<Detached>> {
        let mut out = vec![Detached::default(); nars.len()];
        let leaving: HashSet<Sha256Hash> = nars.iter().copied().collect();
        {
            let _gc = self.inner.gc.read().expect("gc lock");
            let i = &self.inner;
            let manifests = nars
                .iter()
                .map(|n| self.manifest(n))
                .collect::<Result<Vec<_>>>()?;
            let mut orphans = HashSet::new();
            for m in manifests.iter().flatten() {
                for c in &m.chunks {
                    if self
                        .chunk_rec(&c.id)?
                        .is_some_and(|r| r.local.is_some_and(|(h, _)| leaving.contains(&h)))
                    {
                        orphans.insert(c.id);
                    }
                }
            }
            let homes = self.local_homes(&orphans, &leaving)?;
            // In batches: a crash between two leaves chunks pointing into a collected path,
            // which reads and fsck recognise as such.
            for ((nar, m), d) in nars.iter().zip(&manifests).zip(&mut out) {
                d.chunks = self.detach_batched(nar, m.as_ref(), &homes)?;
                i.layouts.lock().expect("layout cache").pop(nar);
            }
        }
        // Kept only when every chunk has a pack copy (pinned NARs): a chunk still read in
        // place from another path would go when Nix collects that one too.
        for (nar, d) in nars.iter().zip(&mut out) {
            if let Some(m) = self.manifest(nar)? {
                let mut packed = true;
                for c in &m.chunks {
                    if self.chunk_rec(&c.id)?.is_none_or(|r| r.pack.is_none()) {
                        packed = false;
                        break;
                    }
                }
                if !packed {
                    d.manifest_dropped = self.remove_manifest(nar)?;
                }
            }
        }
        self.inner.db.flush()?;
        Ok(out)
    }

    /// For each of `ids`, a NAR read in place (none of `leaving`, its path still there) that
    /// holds it, and the chunk's offset in that NAR. One pass over the local NARs' manifests.
    pub(super) fn local_homes(
        &self,
        ids: &HashSet<ChunkId>,
        leaving: &HashSet<Sha256Hash>,
    ) -> Result<HashMap<ChunkId, (Sha256Hash, u64)>> {
        let mut homes = HashMap::new();
        if ids.is_empty() {
            return Ok(homes);
        }
        for k in self.inner.local.iter().keys() {
            let nar = hash_key(&k?)?;
            if leaving.contains(&nar) {
                continue;
            }
            let Some(m) = self.manifest(&nar)? else {
                continue;
            };
            let found: Vec<(ChunkId, u64)> = m
                .offsets()
                .filter(|(_, c)| ids.contains(&c.id) && !homes.contains_key(&c.id))
                .map(|(off, c)| (c.id, off))
                .collect();
            if found.is_empty() || self.local_path_gone(&nar)? {
                continue;
            }
            for (id, off) in found {
                homes.entry(id).or_insert((nar, off));
            }
            if homes.len() == ids.len() {
                break;
            }
        }
        Ok(homes)
    }

    /// The manifest of a NAR the store can produce now. A NAR read in place whose store path
    /// Nix has collected since the last scan is detached at once (see
    /// [`detach_local`](Self::detach_local)), so a request for it goes to peers instead of
    /// failing half-way.
    pub fn readable_manifest(&self, nar_hash: &Sha256Hash) -> Result<Option<Manifest>> {
        if self.local_path_gone(nar_hash)? {
            self.detach_local(nar_hash)?;
        }
        self.manifest(nar_hash)
    }

    /// Every NAR read in place, with the store path it is read from.
    pub fn local_sources(&self) -> Result<Vec<(Sha256Hash, StorePath)>> {
        let mut out = vec![];
        for kv in self.inner.local.iter() {
            let (k, v) = kv?;
            let h = super::hash_key(&k)?;
            let p = std::str::from_utf8(&v)
                .ok()
                .and_then(|s| StorePath::from_base_name(s).ok())
                .ok_or(Error::BadRecord { what: "local" })?;
            out.push((h, p));
        }
        Ok(out)
    }
}
