use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use lru::LruCache;
use peerix_nix::nar::NarLayout;
use peerix_nix::{NarInfo, Sha256Hash, StorePath, StorePathHash};
use sha2::{Digest, Sha256};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use tracing::{debug, info, warn};

use crate::error::IoContext;
use crate::index::{hash_key, ChunkRec};
use crate::pack::{PackLoc, Packs, HEADER};
use crate::pending::Pending;
use crate::{ChunkId, ChunkRef, ChunkerParams, Error, Manifest, Result, VerifiedChunk};

mod local;
pub use local::Detached;

/// How a [`ChunkStore`] is opened.
#[derive(Clone, Debug, Default)]
pub struct Options {
    pub chunker: ChunkerParams,
    /// Root of the local Nix store (`/`, or a chroot store's root), whose paths' NARs are read
    /// in place instead of being copied into packs.
    pub store_root: Option<PathBuf>,
}

/// What an operation has done so far, for progress output.
#[derive(Clone, Copy, Debug, Default)]
pub struct Progress {
    pub bytes: u64,
    pub chunks: u64,
    pub new_chunks: u64,
    pub new_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub manifests: u64,
    pub partial_manifests: u64,
    /// Sum of the NAR sizes of all manifests.
    pub logical_bytes: u64,
    pub chunks: u64,
    /// Sum of the sizes of distinct chunks.
    pub unique_bytes: u64,
    /// Raw bytes of chunks held in packs, and what they take there (after zstd).
    pub packed_bytes: u64,
    pub packed_stored_bytes: u64,
    /// Raw bytes of chunks read in place from the local Nix store.
    pub local_bytes: u64,
    pub pack_files: u64,
    pub pack_file_bytes: u64,
    pub index_bytes: u64,
    pub pins: u64,
}

impl Stats {
    /// Logical bytes per unique byte.
    pub fn dedup_ratio(&self) -> f64 {
        if self.unique_bytes == 0 {
            1.0
        } else {
            self.logical_bytes as f64 / self.unique_bytes as f64
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct GcStats {
    pub chunks_deleted: u64,
    pub bytes_deleted: u64,
    pub pack_copies_released: u64,
    pub packs_removed: u64,
    pub packs_compacted: u64,
    pub bytes_reclaimed: u64,
}

#[derive(Clone, Debug, Default)]
pub struct FsckReport {
    pub manifests: u64,
    pub chunks: u64,
    pub packs: u64,
    /// Bytes in packs that no index record points at (crash leftovers, GC's to reclaim).
    pub garbage_bytes: u64,
    /// Copies that no longer verify while another copy of the same chunk does.
    pub stale_copies: u64,
    pub problems: Vec<String>,
}

impl FsckReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The chunk store. Cheap to clone; every method is blocking, so async callers use
/// [`ChunkStore::blocking`] (or `spawn_blocking`) to keep disk I/O off the runtime.
#[derive(Clone)]
pub struct ChunkStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: sled::Db,
    chunks: sled::Tree,
    manifests: sled::Tree,
    partial: sled::Tree,
    local: sled::Tree,
    paths: sled::Tree,
    pins: sled::Tree,
    pin_info: sled::Tree,
    seeds: sled::Tree,
    packs: Packs,
    /// Chunks put, readable, not yet durable nor indexed.
    pending: Pending,
    params: ChunkerParams,
    store_root: Option<PathBuf>,
    /// Held shared by everything that reads or adds chunks, exclusively by GC, so GC never
    /// deletes a chunk that an ingest has just found and is about to reference.
    gc: RwLock<()>,
    layouts: Mutex<LruCache<Sha256Hash, Arc<(PathBuf, NarLayout)>>>,
}

impl Drop for Inner {
    /// The last handle is gone: index what was put since the last drain.
    fn drop(&mut self) {
        if let Err(e) = self.pending.drain(&self.packs, &self.chunks) {
            warn!(error = %e, "chunks put just before closing the store were not indexed");
        }
    }
}

type TxError = ConflictableTransactionError<Error>;

fn tx_err(e: TransactionError<Error>) -> Error {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => Error::Index(e),
    }
}

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
struct HashingReader<R> {
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
struct LayoutReader<'a> {
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
    pub fn open(dir: &Path, opts: Options) -> Result<Self> {
        std::fs::create_dir_all(dir).at(dir)?;
        let db = open_index(&dir.join("index"))?;
        let params = match db.get("chunker")? {
            Some(v) if v.len() == 12 => {
                let p = |i: usize| u32::from_le_bytes(v[i..i + 4].try_into().expect("4"));
                let stored = ChunkerParams {
                    min: p(0),
                    avg: p(4),
                    max: p(8),
                };
                if stored != opts.chunker {
                    // Chunks already stored were cut with these sizes; cutting new NARs the
                    // same way keeps them deduplicating against the old ones.
                    info!(?stored, requested = ?opts.chunker, "keeping the store's chunk sizes");
                }
                stored
            }
            _ => {
                let p = opts.chunker;
                let mut v = Vec::with_capacity(12);
                for x in [p.min, p.avg, p.max] {
                    v.extend_from_slice(&x.to_le_bytes());
                }
                db.insert("chunker", v)?;
                p
            }
        };
        let inner = Inner {
            chunks: db.open_tree("chunks")?,
            manifests: db.open_tree("manifests")?,
            partial: db.open_tree("partial")?,
            local: db.open_tree("local")?,
            paths: db.open_tree("paths")?,
            pins: db.open_tree("pins")?,
            pin_info: db.open_tree("pin_info")?,
            seeds: db.open_tree("seeds")?,
            db,
            packs: Packs::open(&dir.join("packs"))?,
            pending: Pending::default(),
            params,
            store_root: opts.store_root,
            gc: RwLock::new(()),
            layouts: Mutex::new(LruCache::new(NonZeroUsize::new(256).expect("non-zero"))),
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    pub fn chunker(&self) -> ChunkerParams {
        self.inner.params
    }

    /// Fault injection for tests: `hook` sees every [`crate::durable::Event`] and may fail it.
    #[cfg(test)]
    pub(crate) fn set_fault_hook(&self, hook: crate::durable::Hook) {
        *self.inner.packs.durability.faults.hook.lock().unwrap() = Some(hook);
    }

    /// The index itself, its `chunks` tree and its `manifests` tree, for tests.
    #[cfg(test)]
    pub(crate) fn index_trees(&self) -> (sled::Db, sled::Tree, sled::Tree) {
        let i = &self.inner;
        (i.db.clone(), i.chunks.clone(), i.manifests.clone())
    }

    /// Run blocking store work on tokio's blocking pool.
    pub async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&ChunkStore) -> Result<T> + Send + 'static,
    {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&me))
            .await
            .map_err(|e| Error::Join(e.to_string()))?
    }

    /// Make everything committed or put so far durable.
    pub fn flush(&self) -> Result<()> {
        let _gc = self.inner.gc.read().expect("gc lock");
        self.drain_pending()?;
        self.inner.packs.sync()?;
        self.inner.db.flush()?;
        Ok(())
    }

    /// The index's record of a chunk, with the location of a put not indexed yet.
    fn chunk_rec(&self, id: &ChunkId) -> Result<Option<ChunkRec>> {
        let rec = self.inner.chunks.get(id.0)?;
        let rec = rec.map(|v| ChunkRec::decode(&v)).transpose()?;
        Ok(match (rec, self.inner.pending.get(id)) {
            (rec, None) => rec,
            (Some(mut r), Some((_, loc))) => {
                r.pack = r.pack.or(Some(loc));
                Some(r)
            }
            (None, Some((len, loc))) => Some(ChunkRec {
                len,
                refs: 0,
                pack: Some(loc),
                local: None,
            }),
        })
    }

    /// Make the puts gathered so far durable and index them (see [`crate::pending`]). The
    /// caller holds the GC lock.
    fn drain_pending(&self) -> Result<()> {
        self.inner
            .pending
            .drain(&self.inner.packs, &self.inner.chunks)
    }

    /// True when the store can produce this chunk's bytes.
    pub fn has_chunk(&self, id: &ChunkId) -> Result<bool> {
        Ok(self.chunk_rec(id)?.is_some_and(|r| r.has_location()))
    }

    pub fn manifest(&self, nar_hash: &Sha256Hash) -> Result<Option<Manifest>> {
        self.inner
            .manifests
            .get(nar_hash.0)?
            .map(|v| Manifest::decode(*nar_hash, &v))
            .transpose()
    }

    pub fn has_manifest(&self, nar_hash: &Sha256Hash) -> Result<bool> {
        Ok(self.inner.manifests.contains_key(nar_hash.0)?)
    }

    /// True while a download of this NAR is in progress.
    pub fn has_partial(&self, nar_hash: &Sha256Hash) -> Result<bool> {
        Ok(self.inner.partial.contains_key(nar_hash.0)?)
    }

    pub fn partial_manifest(&self, nar_hash: &Sha256Hash) -> Result<Option<Manifest>> {
        self.inner
            .partial
            .get(nar_hash.0)?
            .map(|v| Manifest::decode(*nar_hash, &v))
            .transpose()
    }

    /// NarHash and base name of a store path the store holds a NAR for.
    pub fn path_nar(&self, hash: &StorePathHash) -> Result<Option<(Sha256Hash, String)>> {
        let Some(v) = self.inner.paths.get(hash.0)? else {
            return Ok(None);
        };
        if v.len() < 32 {
            return Err(Error::BadRecord { what: "path" });
        }
        let name =
            String::from_utf8(v[32..].to_vec()).map_err(|_| Error::BadRecord { what: "path" })?;
        Ok(Some((hash_key(&v[..32])?, name)))
    }

    /// The local store path a NAR is read from in place, if any.
    pub fn local_source(&self, nar_hash: &Sha256Hash) -> Result<Option<StorePath>> {
        let Some(v) = self.inner.local.get(nar_hash.0)? else {
            return Ok(None);
        };
        std::str::from_utf8(&v)
            .ok()
            .and_then(|s| StorePath::from_base_name(s).ok())
            .map(Some)
            .ok_or(Error::BadRecord { what: "local" })
    }

    /// Distinct chunks of `m` the store cannot produce, in NAR order.
    pub fn missing(&self, m: &Manifest) -> Result<Vec<ChunkRef>> {
        let mut seen = HashSet::new();
        let mut out = vec![];
        for c in &m.chunks {
            if seen.insert(c.id) && !self.has_chunk(&c.id)? {
                out.push(*c);
            }
        }
        Ok(out)
    }

    /// Cut `reader` into chunks and hash the whole stream (on a second thread); `f` sees each
    /// chunk with its id and NAR offset. Returns the manifest, checked against `expected`.
    fn chunk_stream(
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
            let c = c.map_err(|e| Error::Chunking(e.to_string()))?;
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
            if !new_locs.contains_key(&id) && !self.has_chunk(&id)? {
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
        let root = self.inner.store_root.as_ref().ok_or(Error::NoLocalStore)?;
        let real = real_path(root, path);
        let layout = NarLayout::of_path(&real).map_err(|source| Error::Nar {
            path: path.to_string(),
            source,
        })?;
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
    /// and the path mappings, in one transaction. Every chunk must have a location in the index
    /// by then (puts not indexed yet are indexed first), so no manifest ever points at a chunk
    /// that is not there. The caller holds the GC lock.
    fn commit(
        &self,
        m: &Manifest,
        new_locs: &HashMap<ChunkId, ChunkRec>,
        local: Option<&StorePath>,
        path: Option<&StorePath>,
    ) -> Result<()> {
        self.drain_pending()?;
        let i = &self.inner;
        let mut unique: Vec<ChunkRef> = Vec::with_capacity(m.chunks.len());
        let mut seen = HashSet::new();
        for c in &m.chunks {
            if seen.insert(c.id) {
                unique.push(*c);
            }
        }
        let encoded = m.encode();
        (&i.chunks, &i.manifests, &i.partial, &i.local, &i.paths)
            .transaction(|(chunks, manifests, partial, local_t, paths)| {
                let exists = manifests.get(m.nar_hash.0)?.is_some();
                for c in &unique {
                    let cur = match chunks.get(c.id.0)? {
                        Some(v) => Some(ChunkRec::decode(&v).map_err(TxError::Abort)?),
                        None => None,
                    };
                    let mut rec = cur.unwrap_or(ChunkRec {
                        len: c.len,
                        refs: 0,
                        pack: None,
                        local: None,
                    });
                    if let Some(n) = new_locs.get(&c.id) {
                        rec.pack = rec.pack.or(n.pack);
                        rec.local = rec.local.or(n.local);
                    }
                    if !exists {
                        rec.refs = rec.refs.saturating_add(1);
                    }
                    if !rec.has_location() || rec.len != c.len {
                        return Err(TxError::Abort(Error::MissingChunk(c.id)));
                    }
                    chunks.insert(&c.id.0, rec.encode())?;
                }
                manifests.insert(&m.nar_hash.0, encoded.as_slice())?;
                partial.remove(&m.nar_hash.0)?;
                if let Some(l) = local {
                    local_t.insert(&m.nar_hash.0, l.base_name().as_bytes())?;
                }
                if let Some(p) = path {
                    let mut v = m.nar_hash.0.to_vec();
                    v.extend_from_slice(p.base_name().as_bytes());
                    paths.insert(&p.hash().0, v)?;
                }
                Ok(())
            })
            .map_err(tx_err)
    }

    /// Start a download: the manifest (from a peer, checked later against the NarHash) keeps
    /// the chunks put for it from GC until it is finished or aborted.
    pub fn begin_download(&self, m: &Manifest) -> Result<()> {
        m.validate()?;
        if self.inner.manifests.contains_key(m.nar_hash.0)? {
            return Ok(());
        }
        self.inner.partial.insert(m.nar_hash.0, m.encode())?;
        // Durable at once, so that a crash mid-download cannot orphan the chunks already put.
        self.inner.db.flush()?;
        Ok(())
    }

    /// Store one chunk, verified against its id. Readable (and servable) as soon as this
    /// returns; durable and indexed with the puts around it (see [`crate::pending`]), at the
    /// latest when the download finishes or the store is flushed. Returns false if the store
    /// already had it.
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

    fn put(&self, id: &ChunkId, data: &[u8], compress: bool) -> Result<bool> {
        let _gc = self.inner.gc.read().expect("gc lock");
        if self.has_chunk(id)? {
            return Ok(false);
        }
        let loc = self.inner.packs.append(id, data, compress)?;
        if self.inner.pending.add(*id, data.len() as u32, loc) {
            self.drain_pending()?;
        }
        Ok(true)
    }

    /// Finish a download whose NAR has been checked against its NarHash: every chunk must be
    /// there; the manifest becomes complete and durable.
    pub fn finish_download(&self, nar_hash: &Sha256Hash, path: Option<&StorePath>) -> Result<()> {
        let _gc = self.inner.gc.read().expect("gc lock");
        let m = match self.partial_manifest(nar_hash)? {
            Some(m) => m,
            None if self.manifest(nar_hash)?.is_some() => return Ok(()),
            None => return Err(Error::MissingNar(*nar_hash)),
        };
        if let Some(c) = self.missing(&m)?.first() {
            return Err(Error::MissingChunk(c.id));
        }
        self.commit(&m, &HashMap::new(), None, path)?;
        self.inner.db.flush()?;
        Ok(())
    }

    pub fn abort_download(&self, nar_hash: &Sha256Hash) -> Result<()> {
        self.inner.partial.remove(nar_hash.0)?;
        Ok(())
    }

    /// Read one chunk, verified against its id. A copy that fails verification is reported,
    /// never returned, and dropped from the index so the chunk counts as missing.
    pub fn read_chunk(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let _gc = self.inner.gc.read().expect("gc lock");
        let rec = self.chunk_rec(id)?.ok_or(Error::MissingChunk(*id))?;
        let mut why = vec![];
        if let Some(loc) = rec.pack {
            match self
                .inner
                .packs
                .read(id, &loc, rec.len)
                .and_then(|d| verify(id, d))
            {
                Ok(d) => return Ok(d),
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
                Ok(d) => return Ok(d),
                Err(e) => {
                    warn!(chunk = %id, error = %e, "chunk no longer readable from the local store");
                    why.push(e.to_string());
                    self.inner.layouts.lock().expect("layout cache").pop(&nar);
                    self.drop_location(id, |r| {
                        if r.local == Some((nar, off)) {
                            r.local = None
                        }
                    })?;
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

    fn drop_location(&self, id: &ChunkId, f: impl Fn(&mut ChunkRec)) -> Result<()> {
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

    fn layout(&self, nar: &Sha256Hash) -> Result<Arc<(PathBuf, NarLayout)>> {
        if let Some(l) = self.inner.layouts.lock().expect("layout cache").get(nar) {
            return Ok(l.clone());
        }
        let root = self.inner.store_root.as_ref().ok_or(Error::NoLocalStore)?;
        let path = self.local_source(nar)?.ok_or(Error::MissingNar(*nar))?;
        let real = real_path(root, &path);
        let layout = NarLayout::of_path(&real).map_err(|source| Error::Nar {
            path: path.to_string(),
            source,
        })?;
        let l = Arc::new((real, layout));
        self.inner
            .layouts
            .lock()
            .expect("layout cache")
            .put(*nar, l.clone());
        Ok(l)
    }

    fn read_local(&self, nar: &Sha256Hash, off: u64, len: u32) -> Result<Vec<u8>> {
        let l = self.layout(nar)?;
        let mut buf = Vec::with_capacity(len as usize);
        l.1.read_range(&l.0, off, u64::from(len), &mut buf)
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
        Ok(NarReader::new(self.clone(), m))
    }

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
    fn pin_chunks(&self, hash: &StorePathHash) -> Result<(Manifest, String, u64)> {
        // A chunk put but not indexed yet has its pack copy only in memory.
        {
            let _gc = self.inner.gc.read().expect("gc lock");
            self.drain_pending()?;
        }
        let (nar, name) = self
            .path_nar(hash)?
            .ok_or_else(|| Error::NotInLocalStore(hash.to_string()))?;
        let m = self.manifest(&nar)?.ok_or(Error::MissingNar(nar))?;
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
        Ok((m, name, copied))
    }

    /// Append chunks to packs, sync them once, then record where they are.
    fn copy_to_packs(&self, batch: &mut Vec<(ChunkId, Vec<u8>)>) -> Result<()> {
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

    /// Record a seed (replacing one with the same label).
    pub fn put_seed(&self, seed: &Seed) -> Result<()> {
        self.inner
            .seeds
            .insert(seed.label.as_bytes(), seed.encode())?;
        self.inner.db.flush()?;
        Ok(())
    }

    pub fn seed(&self, label: &str) -> Result<Option<Seed>> {
        self.inner
            .seeds
            .get(label.as_bytes())?
            .map(|v| Seed::decode(label, &v))
            .transpose()
    }

    pub fn seeds(&self) -> Result<Vec<Seed>> {
        self.inner
            .seeds
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                let label =
                    std::str::from_utf8(&k).map_err(|_| Error::BadRecord { what: "seed" })?;
                Seed::decode(label, &v)
            })
            .collect()
    }

    pub fn remove_seed(&self, label: &str) -> Result<bool> {
        let had = self.inner.seeds.remove(label.as_bytes())?.is_some();
        self.inner.db.flush()?;
        Ok(had)
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

    /// Forget a NAR (its chunks lose a reference; GC reclaims what nothing else uses).
    pub fn remove_manifest(&self, nar_hash: &Sha256Hash) -> Result<bool> {
        let Some(m) = self.manifest(nar_hash)? else {
            return Ok(false);
        };
        let unique: HashSet<ChunkId> = m.chunks.iter().map(|c| c.id).collect();
        let mut stale_paths = vec![];
        for kv in self.inner.paths.iter() {
            let (k, v) = kv?;
            if v.starts_with(&nar_hash.0) {
                stale_paths.push(k);
            }
        }
        let i = &self.inner;
        (&i.chunks, &i.manifests, &i.local, &i.paths, &i.pins)
            .transaction(|(chunks, manifests, local, paths, pins)| {
                for k in &stale_paths {
                    if pins.get(k)?.is_some() {
                        return Err(TxError::Abort(Error::BadManifest(
                            "a pinned path uses this NAR; unpin it first".into(),
                        )));
                    }
                }
                if manifests.remove(&nar_hash.0)?.is_none() {
                    return Ok(());
                }
                for id in &unique {
                    if let Some(v) = chunks.get(id.0)? {
                        let mut r = ChunkRec::decode(&v).map_err(TxError::Abort)?;
                        r.refs = r.refs.saturating_sub(1);
                        chunks.insert(&id.0, r.encode())?;
                    }
                }
                local.remove(&nar_hash.0)?;
                for k in &stale_paths {
                    paths.remove(k)?;
                }
                Ok(())
            })
            .map_err(tx_err)?;
        self.inner
            .layouts
            .lock()
            .expect("layout cache")
            .pop(nar_hash);
        self.inner.db.flush()?;
        Ok(true)
    }

    fn manifests_of(&self, tree: &sled::Tree) -> Result<Vec<Manifest>> {
        tree.iter()
            .map(|kv| {
                let (k, v) = kv?;
                Manifest::decode(hash_key(&k)?, &v)
            })
            .collect()
    }

    fn pinned_chunks(&self) -> Result<HashSet<ChunkId>> {
        let mut set = HashSet::new();
        for k in self.inner.pins.iter().keys() {
            let k = k?;
            let h = StorePathHash(
                k.as_ref()
                    .try_into()
                    .map_err(|_| Error::BadRecord { what: "pin" })?,
            );
            if let Some((nar, _)) = self.path_nar(&h)? {
                if let Some(m) = self.manifest(&nar)? {
                    set.extend(m.chunks.iter().map(|c| c.id));
                }
            }
        }
        Ok(set)
    }

    /// Delete chunks no manifest uses, release pack copies of chunks readable from the local
    /// store (unless pinned), delete empty packs and compact mostly-dead ones. Safe to kill at
    /// any point: the index only ever points at data that is on disk.
    pub fn gc(&self, progress: &mut dyn FnMut(&str)) -> Result<GcStats> {
        let _gc = self.inner.gc.write().expect("gc lock");
        let i = &self.inner;
        let mut st = GcStats::default();
        // Pack bytes of puts not indexed yet would look like garbage.
        self.drain_pending()?;
        i.packs.seal()?;
        let in_flight: HashSet<ChunkId> = self
            .manifests_of(&i.partial)?
            .iter()
            .flat_map(|m| m.chunks.iter().map(|c| c.id))
            .collect();
        let pinned = self.pinned_chunks()?;

        let mut batch = sled::Batch::default();
        let mut live: HashMap<u32, u64> = HashMap::new();
        for kv in i.chunks.iter() {
            let (k, v) = kv?;
            let mut r = ChunkRec::decode(&v)?;
            let id = ChunkId(
                k.as_ref()
                    .try_into()
                    .map_err(|_| Error::BadRecord { what: "chunk key" })?,
            );
            if r.refs == 0 && !in_flight.contains(&id) {
                batch.remove(k);
                st.chunks_deleted += 1;
                st.bytes_deleted += u64::from(r.len);
                continue;
            }
            if r.pack.is_some() && r.local.is_some() && !pinned.contains(&id) {
                r.pack = None;
                batch.insert(k, r.encode());
                st.pack_copies_released += 1;
                continue;
            }
            if let Some(p) = r.pack {
                *live.entry(p.pack).or_default() += HEADER as u64 + u64::from(p.stored_len);
            }
        }
        i.chunks.apply_batch(batch)?;
        i.db.flush()?;
        progress(&format!(
            "deleted {} unused chunks, released {} pack copies",
            st.chunks_deleted, st.pack_copies_released
        ));

        for pack in i.packs.list()? {
            let size = i.packs.file_len(pack)?;
            let used = live.get(&pack).copied().unwrap_or(0);
            if used == 0 {
                i.packs.remove(pack)?;
                st.packs_removed += 1;
                st.bytes_reclaimed += size;
                progress(&format!("removed pack {pack}"));
            } else if used < size / 2 {
                self.compact(pack)?;
                st.packs_compacted += 1;
                st.bytes_reclaimed += size - used;
                progress(&format!("compacted pack {pack}"));
            }
        }
        Ok(st)
    }

    /// Copy a pack's live chunks to the active pack, repoint the index, delete the old pack.
    fn compact(&self, pack: u32) -> Result<()> {
        let i = &self.inner;
        let mut moved: Vec<(ChunkId, PackLoc, PackLoc)> = vec![];
        for kv in i.chunks.iter() {
            let (k, v) = kv?;
            let r = ChunkRec::decode(&v)?;
            let Some(old) = r.pack.filter(|p| p.pack == pack) else {
                continue;
            };
            let id = ChunkId(
                k.as_ref()
                    .try_into()
                    .map_err(|_| Error::BadRecord { what: "chunk key" })?,
            );
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
        i.packs.remove(pack)?;
        debug!(pack, chunks = moved.len(), "pack compacted");
        Ok(())
    }

    /// Check the index against itself and the data. With `verify_data`, every chunk is read
    /// and hashed.
    pub fn fsck(&self, verify_data: bool) -> Result<FsckReport> {
        let _gc = self.inner.gc.read().expect("gc lock");
        self.drain_pending()?;
        let i = &self.inner;
        let mut rep = FsckReport::default();
        let mut counted: HashMap<ChunkId, u32> = HashMap::new();
        let mut decoded = vec![];
        for kv in i.manifests.iter() {
            let (k, v) = kv?;
            rep.manifests += 1;
            match hash_key(&k).and_then(|h| Manifest::decode(h, &v)) {
                Ok(m) => decoded.push(m),
                Err(e) => rep.problems.push(format!("manifest record: {e}")),
            }
        }
        for m in &decoded {
            let mut seen = HashSet::new();
            for c in &m.chunks {
                if seen.insert(c.id) {
                    *counted.entry(c.id).or_default() += 1;
                }
            }
        }
        let packs: HashSet<u32> = i.packs.list()?.into_iter().collect();
        rep.packs = packs.len() as u64;
        let mut pack_sizes: HashMap<u32, u64> = HashMap::new();
        for p in &packs {
            pack_sizes.insert(*p, i.packs.file_len(*p)?);
        }
        let mut referenced: HashMap<u32, u64> = HashMap::new();
        let mut present = HashSet::new();
        for kv in i.chunks.iter() {
            let (k, v) = kv?;
            rep.chunks += 1;
            let Ok(id) = k.as_ref().try_into().map(ChunkId) else {
                rep.problems.push("chunk record with a bad key".into());
                continue;
            };
            let r = match ChunkRec::decode(&v) {
                Ok(r) => r,
                Err(e) => {
                    rep.problems.push(format!("chunk {id}: {e}"));
                    continue;
                }
            };
            let want = counted.get(&id).copied().unwrap_or(0);
            if r.refs != want {
                rep.problems.push(format!(
                    "chunk {id}: refcount {} but {want} manifests use it",
                    r.refs
                ));
            }
            if r.has_location() {
                present.insert(id);
            }
            if let Some(p) = r.pack {
                let end = p.offset + HEADER as u64 + u64::from(p.stored_len);
                match pack_sizes.get(&p.pack) {
                    None => rep
                        .problems
                        .push(format!("chunk {id}: pack {} does not exist", p.pack)),
                    Some(&size) if end > size => rep.problems.push(format!(
                        "chunk {id}: pack {} is {size} bytes, record ends at {end}",
                        p.pack
                    )),
                    Some(_) => {
                        *referenced.entry(p.pack).or_default() += end - p.offset;
                    }
                }
            }
            if let Some((nar, _)) = r.local {
                if !i.local.contains_key(nar.0)? {
                    rep.problems
                        .push(format!("chunk {id}: local NAR {nar} is not known"));
                }
            }
            if verify_data {
                let mut errors = vec![];
                let mut good = false;
                if let Some(loc) = r.pack {
                    match i.packs.read(&id, &loc, r.len).and_then(|d| verify(&id, d)) {
                        Ok(_) => good = true,
                        Err(e) => errors.push(e),
                    }
                }
                if let Some((nar, off)) = r.local {
                    match self
                        .read_local(&nar, off, r.len)
                        .and_then(|d| verify(&id, d))
                    {
                        Ok(_) => good = true,
                        Err(e) => errors.push(e),
                    }
                }
                if good {
                    // A stale second copy (a store path that has since left the local
                    // store) is harmless: reads fall back and drop it.
                    rep.stale_copies += errors.len() as u64;
                } else {
                    for e in errors {
                        rep.problems.push(format!("chunk {id}: {e}"));
                    }
                }
            }
        }
        for m in &decoded {
            if let Some(c) = m.chunks.iter().find(|c| !present.contains(&c.id)) {
                rep.problems.push(format!(
                    "manifest {} needs chunk {} which is not stored",
                    m.nar_hash, c.id
                ));
            }
        }
        for (p, size) in &pack_sizes {
            rep.garbage_bytes += size.saturating_sub(referenced.get(p).copied().unwrap_or(0));
        }
        for kv in i.paths.iter() {
            let (_, v) = kv?;
            if v.len() < 32 || !i.manifests.contains_key(&v[..32])? {
                rep.problems
                    .push("a store path maps to a NAR that is not stored".into());
            }
        }
        Ok(rep)
    }

    pub fn stats(&self) -> Result<Stats> {
        let i = &self.inner;
        let mut s = Stats {
            manifests: i.manifests.len() as u64,
            partial_manifests: i.partial.len() as u64,
            pins: i.pins.len() as u64,
            index_bytes: i.db.size_on_disk()?,
            ..Stats::default()
        };
        for v in i.manifests.iter().values() {
            let v = v?;
            if v.len() >= 9 {
                s.logical_bytes += u64::from_le_bytes(v[1..9].try_into().expect("8"));
            }
        }
        for v in i.chunks.iter().values() {
            let r = ChunkRec::decode(&v?)?;
            s.chunks += 1;
            s.unique_bytes += u64::from(r.len);
            if let Some(p) = r.pack {
                s.packed_bytes += u64::from(r.len);
                s.packed_stored_bytes += u64::from(p.stored_len);
            } else if r.local.is_some() {
                s.local_bytes += u64::from(r.len);
            }
        }
        for p in i.packs.list()? {
            s.pack_files += 1;
            s.pack_file_bytes += i.packs.file_len(p)?;
        }
        Ok(s)
    }
}

fn parse_info(v: &[u8]) -> Result<NarInfo> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or(Error::BadRecord {
            what: "pinned narinfo",
        })
}

/// What [`ChunkStore::pin_path`] did.
#[derive(Clone, Debug)]
pub struct Pinned {
    pub manifest: Manifest,
    /// Chunk bytes copied into packs; the rest of the NAR was already there.
    pub copied_bytes: u64,
}

/// A closure pinned under a label (what the operator named: a store path, or a link to one
/// such as `/run/current-system`): its root and every path pinned for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seed {
    pub label: String,
    /// Base name of the store path the label resolved to.
    pub root: String,
    pub members: Vec<StorePathHash>,
    /// Those of `members` the operator chose to share although they are neither public nor
    /// signed by a trusted key (`peerix seed --share-private-paths`). Empty in seeds recorded
    /// before this was kept.
    pub private: Vec<StorePathHash>,
}

/// Set in a seed record's root length when the private members follow the members (a root
/// name is never this long).
const SEED_WITH_PRIVATE: u16 = 0x8000;

impl Seed {
    /// `[u16 root length | SEED_WITH_PRIVATE][root][u32 members][members][private]`, hashes of
    /// 20 bytes. Older records have no flag, no count and no private members.
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(
            6 + self.root.len() + 20 * (self.members.len() + self.private.len()),
        );
        let n = u16::try_from(self.root.len())
            .unwrap_or(u16::MAX)
            .min(SEED_WITH_PRIVATE - 1);
        v.extend_from_slice(&(n | SEED_WITH_PRIVATE).to_le_bytes());
        v.extend_from_slice(&self.root.as_bytes()[..usize::from(n)]);
        let m = u32::try_from(self.members.len()).expect("fewer than 2^32 members");
        v.extend_from_slice(&m.to_le_bytes());
        for h in self.members.iter().chain(&self.private) {
            v.extend_from_slice(&h.0);
        }
        v
    }

    fn decode(label: &str, v: &[u8]) -> Result<Self> {
        let bad = || Error::BadRecord { what: "seed" };
        let head = u16::from_le_bytes(v.get(..2).ok_or_else(bad)?.try_into().expect("2"));
        let n = usize::from(head & !SEED_WITH_PRIVATE);
        let root = std::str::from_utf8(v.get(2..2 + n).ok_or_else(bad)?).map_err(|_| bad())?;
        let (count, rest) = if head & SEED_WITH_PRIVATE != 0 {
            let c = v.get(2 + n..6 + n).ok_or_else(bad)?;
            let c = u32::from_le_bytes(c.try_into().expect("4")) as usize;
            (Some(c), &v[6 + n..])
        } else {
            (None, &v[2 + n..])
        };
        let hashes = rest.chunks_exact(20);
        if !hashes.remainder().is_empty() {
            return Err(bad());
        }
        let mut hashes: Vec<StorePathHash> = hashes
            .map(|c| StorePathHash(c.try_into().expect("20")))
            .collect();
        let private = match count {
            Some(c) if c > hashes.len() => return Err(bad()),
            Some(c) => hashes.split_off(c),
            None => vec![],
        };
        Ok(Self {
            label: label.to_owned(),
            root: root.to_owned(),
            members: hashes,
            private,
        })
    }
}

/// sled holds an exclusive lock on its files. A handle dropped a moment ago may still hold it
/// from sled's flusher thread, so a few short retries; a store that stays locked is in use by
/// another process.
fn open_index(path: &Path) -> Result<sled::Db> {
    let mut delay = std::time::Duration::from_millis(5);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        match sled::Config::new()
            .path(path)
            .mode(sled::Mode::LowSpace)
            .open()
        {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(delay);
                delay = (delay * 2).min(std::time::Duration::from_millis(200));
            }
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                return Err(Error::Locked(path.to_owned()));
            }
            other => return Ok(other?),
        }
    }
}

fn check_expected(m: &Manifest, expected: Option<(Sha256Hash, u64)>) -> Result<()> {
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

fn verify(id: &ChunkId, data: Vec<u8>) -> Result<Vec<u8>> {
    let got = ChunkId::of(&data);
    if got != *id {
        return Err(Error::ChunkMismatch { expected: *id, got });
    }
    Ok(data)
}

fn real_path(root: &Path, path: &StorePath) -> PathBuf {
    root.join(peerix_nix::STORE_DIR.trim_start_matches('/'))
        .join(path.base_name())
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
    fn new(store: ChunkStore, manifest: Manifest) -> Self {
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
        let data = bytes::Bytes::from(self.store.read_chunk(&c.id)?);
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

#[cfg(test)]
mod seed_record_tests {
    use super::*;

    #[test]
    fn seed_records_round_trip_and_old_ones_have_no_private_members() {
        let h = |b| StorePathHash([b; 20]);
        let s = Seed {
            label: "l".into(),
            root: "abc-root".into(),
            members: vec![h(1), h(2)],
            private: vec![h(2)],
        };
        assert_eq!(Seed::decode("l", &s.encode()).unwrap(), s);
        // As recorded before private members were kept: [u16 root length][root][members].
        let mut old = 8u16.to_le_bytes().to_vec();
        old.extend_from_slice(b"abc-root");
        old.extend_from_slice(&[1; 20]);
        old.extend_from_slice(&[2; 20]);
        let d = Seed::decode("l", &old).unwrap();
        assert_eq!(d.members, vec![h(1), h(2)]);
        assert!(d.private.is_empty());
        assert!(Seed::decode("l", &old[..old.len() - 1]).is_err());
        let mut cut = s.encode();
        cut.truncate(cut.len() - 40);
        assert!(Seed::decode("l", &cut).is_err(), "more members than hashes");
    }
}
