use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};

use lru::LruCache;
use peerix_nix::nar::NarLayout;
use peerix_nix::{Sha256Hash, StorePath, StorePathHash};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use tracing::{info, warn};

use crate::error::IoContext;
use crate::index::{hash_key, ChunkRec};
use crate::pack::Packs;
use crate::pending::Pending;
use crate::{ChunkId, ChunkRef, ChunkerParams, Error, Manifest, Result};

mod download;
mod drain;
mod evict;
mod fsck;
mod gc;
mod ingest;
mod journal;
mod local;
mod pins;
mod read;
mod recompress;
mod roots;
mod similar;
mod stats;

pub use evict::Evicted;
pub use fsck::FsckReport;
pub use gc::{GcStats, SWEEP_BATCH};
pub use local::Detached;
pub use pins::Pinned;
pub use read::{NarReader, StoredChunk};
pub use recompress::{Recompressed, RECOMPRESS_LEVEL};
pub use similar::{package_name, DeltaPlan, DELTA_BASE_BYTES, DELTA_BASE_CHUNKS};
pub use stats::Stats;

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
    /// The application's named roots (see `roots.rs`); `seeds` on disk, where they began.
    roots: sled::Tree,
    /// When each downloaded NAR was last used, for eviction (unix seconds).
    used: sled::Tree,
    /// When each partial download was begun or last suspended (unix seconds).
    partial_at: sled::Tree,
    /// Chunks recompressed for the wire: id → a zstd frame (see `recompress.rs`).
    wire: sled::Tree,
    /// Changes made in batches, in progress (see `journal.rs`): key → the NAR's manifest.
    intents: sled::Tree,
    /// How many distinct chunks of each intent's NAR are done.
    intent_done: sled::Tree,
    /// One batched change at a time, and none while fsck counts references.
    journal: Mutex<()>,
    /// Downloads running in this process, per NAR: never reclaimed.
    active: Mutex<HashMap<Sha256Hash, usize>>,
    /// Bumped whenever a download begins: GC's sweep batches recompute what it protects.
    roots_gen: AtomicU64,
    /// The last use time given out by [`ChunkStore::mark_used`].
    use_clock: AtomicU64,
    /// One GC at a time.
    gc_run: Mutex<()>,
    packs: Packs,
    /// Chunks put, readable, not yet durable nor indexed.
    pending: Pending,
    /// Makes groups of puts durable in the background (see `drain.rs`).
    drainer: drain::Drainer,
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
        let (drainer, kicks) = drain::Drainer::new();
        let inner = Inner {
            chunks: db.open_tree("chunks")?,
            manifests: db.open_tree("manifests")?,
            partial: db.open_tree("partial")?,
            local: db.open_tree("local")?,
            paths: db.open_tree("paths")?,
            pins: db.open_tree("pins")?,
            pin_info: db.open_tree("pin_info")?,
            roots: db.open_tree("seeds")?,
            used: db.open_tree("used")?,
            partial_at: db.open_tree("partial_at")?,
            wire: db.open_tree("wire")?,
            intents: db.open_tree("intents")?,
            intent_done: db.open_tree("intent_done")?,
            journal: Mutex::new(()),
            active: Mutex::new(HashMap::new()),
            roots_gen: AtomicU64::new(0),
            use_clock: AtomicU64::new(0),
            gc_run: Mutex::new(()),
            db,
            packs: Packs::open(&dir.join("packs"))?,
            pending: Pending::default(),
            drainer,
            params,
            store_root: opts.store_root,
            gc: RwLock::new(()),
            layouts: Mutex::new(LruCache::new(NonZeroUsize::new(256).expect("non-zero"))),
        };
        let store = Self {
            inner: Arc::new(inner),
        };
        drain::start(&store.inner, kicks, dir)?;
        store.recover_intents()?;
        Ok(store)
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
            .map_err(Error::Join)?
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
        // The pending puts first: a drain indexes a chunk before it leaves them, so a chunk put
        // is in one or the other at any time. (Read the other way round, a drain that ran
        // between the two reads hid it: not yet in the index, no longer pending.)
        let pending = self.inner.pending.get(id);
        let _ = self
            .inner
            .packs
            .durability
            .faults
            .at(crate::durable::Event::Lookup);
        let rec = self.inner.chunks.get(id.0)?;
        let rec = rec.map(|v| ChunkRec::decode(&v)).transpose()?;
        Ok(match (rec, pending) {
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
    ///
    /// A chunk read in place from a store path that Nix has collected since the last scan does
    /// not count: a download fetches it from peers (and keeps it in a pack) instead of failing
    /// on it mid-way.
    pub fn has_chunk(&self, id: &ChunkId) -> Result<bool> {
        Ok(match self.chunk_rec(id)? {
            Some(r) if r.pack.is_some() => true,
            Some(ChunkRec {
                local: Some((nar, _)),
                ..
            }) => !self.local_path_gone(&nar)?,
            _ => false,
        })
    }

    /// Where a local store path's files are, and the layout of its NAR over them.
    pub(super) fn layout_of(&self, path: &StorePath) -> Result<(PathBuf, NarLayout)> {
        let root = self.inner.store_root.as_ref().ok_or(Error::NoLocalStore)?;
        let real = real_path(root, path);
        let layout = NarLayout::of_path(&real).map_err(|source| Error::Nar {
            path: path.to_string(),
            source,
        })?;
        Ok((real, layout))
    }

    /// True when the local store path a NAR was read from in place no longer exists.
    pub(super) fn local_path_gone(&self, nar: &Sha256Hash) -> Result<bool> {
        let (Some(root), Some(path)) = (&self.inner.store_root, self.local_source(nar)?) else {
            return Ok(false);
        };
        Ok(std::fs::symlink_metadata(real_path(root, &path)).is_err())
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
}

/// sled's page cache. Its default (1 GiB) lets a long-lived daemon's memory grow with every
/// index page it ever touched; the index of a large store (chunk records of ~50 bytes,
/// manifests of ~36 bytes per chunk) has its hot part in a few MiB, and the OS page cache
/// holds the rest.
const INDEX_CACHE: u64 = 16 << 20;

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
            .cache_capacity(INDEX_CACHE)
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

fn real_path(root: &Path, path: &StorePath) -> PathBuf {
    root.join(peerix_nix::STORE_DIR.trim_start_matches('/'))
        .join(path.base_name())
}
