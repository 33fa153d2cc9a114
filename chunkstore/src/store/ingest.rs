//! Ingest: cutting a NAR (from a stream, or a local store path read in place) into chunks
//! and committing its manifest.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use peerix_nix::nar::NarLayout;
use peerix_nix::{Sha256Hash, StorePath};
use tracing::debug;

use super::journal::distinct;
use super::{ChunkStore, Progress};
use crate::index::ChunkRec;
use crate::{ChunkId, ChunkRef, ChunkerParams, Error, Manifest, Result};
use sha2::{Digest, Sha256};

/// SHA-256 computed on a second thread: ingest and reassembly must hash every byte anyway,
/// and on its own thread that costs no wall time next to chunking and BLAKE3.
pub(crate) struct ShaPipe {
    tx: Option<std::sync::mpsc::SyncSender<bytes::Bytes>>,
    worker: Option<std::thread::JoinHandle<Sha256>>,
    /// Used when no thread could be started.
    inline: Option<Sha256>,
}

impl ShaPipe {
    pub(crate) fn new() -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<bytes::Bytes>(16);
        let worker = std::thread::Builder::new()
            .name("peerix-sha256".into())
            .spawn(move || {
                let mut h = Sha256::new();
                for b in rx {
                    h.update(&b);
                }
                h
            });
        match worker {
            Ok(w) => Self {
                tx: Some(tx),
                worker: Some(w),
                inline: None,
            },
            Err(e) => {
                debug!(error = %e, "hashing inline");
                Self {
                    tx: None,
                    worker: None,
                    inline: Some(Sha256::new()),
                }
            }
        }
    }

    pub(crate) fn update(&mut self, b: bytes::Bytes) {
        if let Some(h) = &mut self.inline {
            h.update(&b);
        } else if let Some(tx) = &self.tx {
            // The worker only stops when the sender is dropped, so this cannot fail.
            let _ = tx.send(b);
        }
    }

    pub(crate) fn finish(mut self) -> Sha256Hash {
        drop(self.tx.take());
        let h = match (self.inline.take(), self.worker.take()) {
            (Some(h), _) => h,
            (None, Some(w)) => w.join().expect("the sha256 thread does not panic"),
            (None, None) => unreachable!("a ShaPipe hashes inline or on a thread"),
        };
        Sha256Hash(h.finalize().into())
    }
}

/// Feeds everything read through it to a [`ShaPipe`] and counts it.
pub(super) struct HashingReader<R> {
    inner: R,
    sha: ShaPipe,
    n: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.sha.update(bytes::Bytes::copy_from_slice(&buf[..n]));
        }
        self.n += n as u64;
        Ok(n)
    }
}

/// The NAR of a tree read sequentially through its layout.
pub(super) struct LayoutReader<'a> {
    layout: &'a NarLayout,
    root: &'a Path,
    pos: u64,
}

impl Read for LayoutReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (self.layout.nar_size() - self.pos).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        let mut out = &mut buf[..n];
        self.layout
            .read_range(self.root, self.pos, n as u64, &mut out)
            .map_err(std::io::Error::other)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl ChunkStore {
    /// Cut `reader` into chunks and hash the whole stream (on a second thread); `f` sees each
    /// chunk with its id and NAR offset. Returns the manifest, checked against `expected`.
    pub(super) fn chunk_stream(
        &self,
        reader: impl Read,
        expected: Option<(Sha256Hash, u64)>,
        mut f: impl FnMut(ChunkId, u64, &[u8]) -> Result<()>,
    ) -> Result<Manifest> {
        let mut hr = HashingReader {
            inner: reader,
            sha: ShaPipe::new(),
            n: 0,
        };
        let mut chunks = vec![];
        let ChunkerParams { min, avg, max } = self.inner.params;
        let cdc = fastcdc::v2020::StreamCDC::new(&mut hr, min as usize, avg as usize, max as usize);
        for c in cdc {
            let c = c.map_err(Error::Chunking)?;
            let id = ChunkId::of(&c.data);
            chunks.push(ChunkRef {
                id,
                len: c.length as u32,
            });
            f(id, c.offset, &c.data)?;
        }
        let m = Manifest {
            nar_size: hr.n,
            nar_hash: hr.sha.finish(),
            chunks,
        };
        check_expected(&m, expected)?;
        m.validate()?;
        Ok(m)
    }

    /// Chunk a NAR stream into the store (new chunks go to packs) and commit its manifest.
    /// `expected` (NarHash, NarSize) is checked before anything becomes visible.
    pub fn ingest_nar(
        &self,
        reader: impl Read,
        path: Option<&StorePath>,
        expected: Option<(Sha256Hash, u64)>,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<Manifest> {
        let _gc = self.inner.gc.read().expect("gc lock");
        let mut new_locs: HashMap<ChunkId, ChunkRec> = HashMap::new();
        let mut p = Progress::default();
        let m = self.chunk_stream(reader, expected, |id, _, data| {
            let len = data.len() as u32;
            p.chunks += 1;
            p.bytes += u64::from(len);
            // A chunk held only in place in the local store gets a pack copy too: this NAR
            // lives in packs, and Nix may collect that path at any time.
            if !new_locs.contains_key(&id) && self.chunk_rec(&id)?.is_none_or(|r| r.pack.is_none())
            {
                let loc = self.inner.packs.append(&id, data, true)?;
                let rec = ChunkRec {
                    len,
                    refs: 0,
                    pack: Some(loc),
                    local: None,
                };
                new_locs.insert(id, rec);
                p.new_chunks += 1;
                p.new_bytes += u64::from(len);
            }
            progress(&p);
            Ok(())
        })?;
        let locs = new_locs.values().filter_map(|r| r.pack.as_ref());
        self.inner.packs.make_durable(locs)?;
        self.commit(&m, &new_locs, None, path)?;
        self.inner.db.flush()?;
        Ok(m)
    }

    /// Index a path of the local Nix store in place: its chunks are read from the store's
    /// files when needed, nothing is copied. `expected` is the store database's NarHash and
    /// NarSize, checked against the files.
    pub fn ingest_local(
        &self,
        path: &StorePath,
        expected: Option<(Sha256Hash, u64)>,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<Manifest> {
        let (real, layout) = self.layout_of(path)?;
        if let Some((_, size)) = expected {
            if layout.nar_size() != size {
                return Err(Error::NarSizeMismatch {
                    expected: size,
                    got: layout.nar_size(),
                });
            }
        }
        let _gc = self.inner.gc.read().expect("gc lock");
        let reader = LayoutReader {
            layout: &layout,
            root: &real,
            pos: 0,
        };
        let mut offsets = HashMap::new();
        let mut p = Progress::default();
        let m = self.chunk_stream(reader, expected, |id, offset, data| {
            offsets.entry(id).or_insert(offset);
            p.chunks += 1;
            p.bytes += data.len() as u64;
            progress(&p);
            Ok(())
        })?;
        let new_locs = m
            .chunks
            .iter()
            .map(|c| {
                let rec = ChunkRec {
                    len: c.len,
                    refs: 0,
                    pack: None,
                    local: Some((m.nar_hash, offsets[&c.id])),
                };
                (c.id, rec)
            })
            .collect();
        self.commit(&m, &new_locs, Some(path), Some(path))?;
        self.inner
            .layouts
            .lock()
            .expect("layout cache")
            .put(m.nar_hash, Arc::new((real, layout)));
        Ok(m)
    }

    /// Make `m` visible: chunk records (with any new locations) and refcounts, the manifest,
    /// and the path mappings. Every chunk must have a location in the index by then (puts not
    /// indexed yet are indexed first), so no manifest ever points at a chunk that is not there.
    /// The records change in bounded batches, the manifest last, under an intent that a crash
    /// in between leaves for [`open`](Self::open) to roll back (see `journal.rs`). The caller
    /// holds the GC lock.
    pub(super) fn commit(
        &self,
        m: &Manifest,
        new_locs: &HashMap<ChunkId, ChunkRec>,
        local: Option<&StorePath>,
        path: Option<&StorePath>,
    ) -> Result<()> {
        self.drain_pending()?;
        if local.is_none() {
            // GC's sweep batches recompute which chunks NARs held in packs need.
            self.inner.roots_gen.fetch_add(1, Ordering::SeqCst);
        }
        self.commit_batched(m, &distinct(m), new_locs, local, path)
    }
}

pub(super) fn check_expected(m: &Manifest, expected: Option<(Sha256Hash, u64)>) -> Result<()> {
    if let Some((hash, size)) = expected {
        if m.nar_size != size {
            return Err(Error::NarSizeMismatch {
                expected: size,
                got: m.nar_size,
            });
        }
        if m.nar_hash != hash {
            return Err(Error::NarHashMismatch {
                expected: hash,
                got: m.nar_hash,
            });
        }
    }
    Ok(())
}
