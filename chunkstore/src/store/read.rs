//! Reads: one chunk (verified, from a pack or in place from the local Nix store), or a whole
//! NAR (every chunk and the NarHash verified).

use std::collections::HashSet;
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

use peerix_nix::nar::NarLayout;
use peerix_nix::Sha256Hash;
use tracing::warn;

use super::ingest::ShaPipe;
use super::ChunkStore;
use crate::index::ChunkRec;
use crate::{ChunkId, Error, Manifest, Result};

/// A chunk's bytes, verified, and the zstd frame they are stored as when they are.
#[derive(Debug, Clone)]
pub struct StoredChunk {
    pub raw: Vec<u8>,
    pub zstd: Option<Vec<u8>>,
    /// Stored in a pack uncompressed: zstd did not pay when it was stored, so compressing it
    /// again is wasted work.
    pub incompressible: bool,
}

impl ChunkStore {
    /// Read one chunk, verified against its id. A copy that fails verification is reported,
    /// never returned, and dropped from the index so the chunk counts as missing.
    pub fn read_chunk(&self, id: &ChunkId) -> Result<Vec<u8>> {
        self.read_chunk_stored(id).map(|c| c.raw)
    }

    /// As [`ChunkStore::read_chunk`], with the zstd frame the chunk is stored as, if it is
    /// stored compressed: what a server can send without compressing it again.
    pub fn read_chunk_stored(&self, id: &ChunkId) -> Result<StoredChunk> {
        let _gc = self.inner.gc.read().expect("gc lock");
        let rec = self.chunk_rec(id)?.ok_or(Error::MissingChunk(*id))?;
        let mut why = vec![];
        if let Some(loc) = rec.pack {
            match self
                .inner
                .packs
                .read_record(id, &loc, rec.len)
                .and_then(|r| Ok((verify(id, r.raw)?, r.zstd, r.incompressible)))
            {
                Ok((raw, zstd, incompressible)) => {
                    return Ok(StoredChunk {
                        raw,
                        zstd,
                        incompressible,
                    })
                }
                Err(e) => {
                    warn!(chunk = %id, error = %e, "corrupt chunk copy in pack dropped");
                    why.push(e.to_string());
                    self.inner.pending.forget(id, &loc);
                    self.drop_location(id, |r| {
                        if r.pack == Some(loc) {
                            r.pack = None
                        }
                    })?;
                }
            }
        }
        if let Some((nar, off)) = rec.local {
            match self
                .read_local(&nar, off, rec.len)
                .and_then(|d| verify(id, d))
            {
                Ok(raw) => {
                    return Ok(StoredChunk {
                        raw,
                        zstd: None,
                        incompressible: false,
                    })
                }
                Err(e) => {
                    warn!(chunk = %id, error = %e, "chunk no longer readable from the local store");
                    why.push(e.to_string());
                    self.inner.layouts.lock().expect("layout cache").pop(&nar);
                    // Another local path that holds the chunk (the next version of the
                    // same package, say) takes over at once, so a NAR that shares it goes on
                    // being read in place.
                    let home = self
                        .local_homes(&HashSet::from([*id]), &HashSet::from([nar]))?
                        .get(id)
                        .copied();
                    if let Some((h, o)) = home {
                        self.drop_location(id, |r| {
                            if r.local == Some((nar, off)) {
                                r.local = Some((h, o))
                            }
                        })?;
                        if let Ok(raw) = self.read_local(&h, o, rec.len).and_then(|d| verify(id, d))
                        {
                            return Ok(StoredChunk {
                                raw,
                                zstd: None,
                                incompressible: false,
                            });
                        }
                    } else if !self.local_path_gone(&nar)? {
                        // The files changed in place: they keep no claim on the chunk, which
                        // has no location until a download puts a copy. A path Nix collected
                        // is the scan's to detach (which drops what needed the chunk); until
                        // then reads and downloads see it as gone.
                        self.drop_location(id, |r| {
                            if r.local == Some((nar, off)) {
                                r.local = None
                            }
                        })?;
                    }
                }
            }
        }
        if why.is_empty() {
            Err(Error::MissingChunk(*id))
        } else {
            Err(Error::CorruptChunk {
                id: *id,
                why: why.join("; "),
            })
        }
    }

    pub(super) fn drop_location(&self, id: &ChunkId, f: impl Fn(&mut ChunkRec)) -> Result<()> {
        self.inner.chunks.update_and_fetch(id.0, |old| {
            let old = old?;
            match ChunkRec::decode(old) {
                Ok(mut r) => {
                    f(&mut r);
                    Some(r.encode())
                }
                Err(_) => Some(old.to_vec()),
            }
        })?;
        Ok(())
    }

    pub(super) fn layout(&self, nar: &Sha256Hash) -> Result<Arc<(PathBuf, NarLayout)>> {
        if let Some(l) = self.inner.layouts.lock().expect("layout cache").get(nar) {
            return Ok(l.clone());
        }
        let path = self.local_source(nar)?.ok_or(Error::MissingNar(*nar))?;
        let (real, layout) = self.layout_of(&path)?;
        let l = Arc::new((real, layout));
        self.inner
            .layouts
            .lock()
            .expect("layout cache")
            .put(*nar, l.clone());
        Ok(l)
    }

    pub(super) fn read_local(&self, nar: &Sha256Hash, off: u64, len: u32) -> Result<Vec<u8>> {
        let l = self.layout(nar)?;
        let mut buf = crate::buffers::with_capacity(len as usize);
        l.1.read_range_to_vec(&l.0, off, u64::from(len), &mut buf)
            .map_err(|source| Error::Nar {
                path: l.0.display().to_string(),
                source,
            })?;
        Ok(buf)
    }

    /// A reader of a whole stored NAR. Every chunk is verified; the NarHash is checked before
    /// the last chunk is handed out, so a reader that reaches EOF has read exactly the NAR.
    pub fn nar_reader(&self, nar_hash: &Sha256Hash) -> Result<NarReader> {
        let m = self
            .manifest(nar_hash)?
            .ok_or(Error::MissingNar(*nar_hash))?;
        self.mark_used(nar_hash)?;
        Ok(NarReader::new(self.clone(), m))
    }
}

pub(super) fn verify(id: &ChunkId, data: Vec<u8>) -> Result<Vec<u8>> {
    let got = ChunkId::of(&data);
    if got != *id {
        return Err(Error::ChunkMismatch { expected: *id, got });
    }
    Ok(data)
}

/// See [`ChunkStore::nar_reader`].
pub struct NarReader {
    store: ChunkStore,
    manifest: Manifest,
    next: usize,
    buf: bytes::Bytes,
    sha: Option<ShaPipe>,
}

impl NarReader {
    pub(super) fn new(store: ChunkStore, manifest: Manifest) -> Self {
        Self {
            store,
            manifest,
            next: 0,
            buf: bytes::Bytes::new(),
            sha: None,
        }
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn load(&mut self) -> Result<()> {
        let c = self.manifest.chunks[self.next];
        let data = crate::buffers::into_bytes(self.store.read_chunk(&c.id)?);
        self.sha
            .get_or_insert_with(ShaPipe::new)
            .update(data.clone());
        self.next += 1;
        if self.next == self.manifest.chunks.len() {
            let got = self
                .sha
                .take()
                .expect("hashing since the first chunk")
                .finish();
            if got != self.manifest.nar_hash {
                return Err(Error::NarHashMismatch {
                    expected: self.manifest.nar_hash,
                    got,
                });
            }
        }
        self.buf = data;
        Ok(())
    }
}

impl Read for NarReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.buf.is_empty() {
            if self.next == self.manifest.chunks.len() {
                return Ok(0);
            }
            self.load().map_err(std::io::Error::other)?;
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf.split_to(n));
        Ok(n)
    }
}
