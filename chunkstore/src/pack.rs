//! Pack files: append-only files of chunk records, for chunks whose bytes are not in the local
//! Nix store (downloads, seeded paths). A record is a 48-byte header and the stored bytes:
//! magic, flags (zstd), stored length, raw length, chunk id. The header lets fsck and GC check
//! that the index and the data agree without trusting either.
//!
//! Appended bytes are readable at once; [`Packs::make_durable`] is what must come between an
//! append and the index record that points at it (see [`crate::durable`]).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use crate::durable::{Durability, Event, Mark};
use crate::error::IoContext;
use crate::{ChunkId, Error, Result};

const MAGIC: [u8; 4] = *b"PXC1";
pub const HEADER: usize = 48;
const FLAG_ZSTD: u8 = 1;
/// Stored raw because zstd was tried and did not pay (a server need not try again).
const FLAG_INCOMPRESSIBLE: u8 = 2;
/// A new pack is started past this size, so compaction rewrites bounded files.
const MAX_PACK: u64 = 1 << 30;

/// Where a chunk's bytes are in the packs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackLoc {
    pub pack: u32,
    pub offset: u64,
    pub stored_len: u32,
    pub zstd: bool,
}

struct Active {
    id: u32,
    /// Shared with a group commit's fdatasync, which runs without the lock.
    file: Arc<File>,
    len: u64,
}

pub struct Packs {
    dir: PathBuf,
    active: Mutex<Option<Active>>,
    readers: RwLock<HashMap<u32, Arc<File>>>,
    next_id: Mutex<u32>,
    pub(crate) durability: Durability,
}

pub fn pack_name(id: u32) -> String {
    format!("{id:08}.pack")
}

fn parse_name(name: &str) -> Option<u32> {
    name.strip_suffix(".pack")?.parse().ok()
}

impl Packs {
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            std::fs::create_dir_all(dir).at(dir)?;
            // The packs' directory itself must survive a crash for their names to.
            let parent = dir.parent().unwrap_or(dir);
            File::open(parent).and_then(|d| d.sync_all()).at(parent)?;
        }
        // Never append to an existing pack: its tail may be torn by a crash.
        let next = Self::list_in(dir)?.into_iter().max().map_or(0, |m| m + 1);
        Ok(Self {
            dir: dir.to_owned(),
            active: Mutex::new(None),
            readers: RwLock::new(HashMap::new()),
            next_id: Mutex::new(next),
            durability: Durability::default(),
        })
    }

    fn list_in(dir: &Path) -> Result<Vec<u32>> {
        let mut ids = vec![];
        for e in std::fs::read_dir(dir).at(dir)? {
            let e = e.at(dir)?;
            if let Some(id) = e.file_name().to_str().and_then(parse_name) {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    /// Ids of the pack files on disk.
    pub fn list(&self) -> Result<Vec<u32>> {
        Self::list_in(&self.dir)
    }

    pub fn path(&self, id: u32) -> PathBuf {
        self.dir.join(pack_name(id))
    }

    pub fn file_len(&self, id: u32) -> Result<u64> {
        let p = self.path(id);
        Ok(std::fs::metadata(&p).at(&p)?.len())
    }

    fn new_active(&self) -> Result<Active> {
        let mut next = self.next_id.lock().expect("pack id lock");
        let id = *next;
        *next += 1;
        let p = self.path(id);
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&p)
            .at(&p)?;
        self.durability.sync_new_pack(&self.dir, id)?;
        Ok(Active {
            id,
            file: Arc::new(file),
            len: 0,
        })
    }

    /// Sync a pack that takes no more appends: everything in it is durable.
    fn retire(&self, a: Active) -> Result<()> {
        self.durability
            .sync_file(&a.file, (a.id, a.len), &self.path(a.id))
    }

    /// Append a chunk, compressed with zstd level 1 (the fastest that still pays on binaries)
    /// when `compress` is set and that saves at least an eighth. The bytes are readable as soon
    /// as this returns; [`Packs::make_durable`] makes them durable.
    pub fn append(&self, id: &ChunkId, raw: &[u8], compress: bool) -> Result<PackLoc> {
        let compressed = compress
            .then(|| crate::codec::compress(raw, 1).ok())
            .flatten();
        let (data, zstd) = match &compressed {
            Some(c) if crate::codec::pays(c.len(), raw.len()) => (c.as_slice(), true),
            _ => (raw, false),
        };
        let mut head = [0u8; HEADER];
        head[..4].copy_from_slice(&MAGIC);
        head[4] = match (zstd, compress) {
            (true, _) => FLAG_ZSTD,
            (false, true) => FLAG_INCOMPRESSIBLE,
            (false, false) => 0,
        };
        head[8..12].copy_from_slice(&(data.len() as u32).to_le_bytes());
        head[12..16].copy_from_slice(&(raw.len() as u32).to_le_bytes());
        head[16..48].copy_from_slice(&id.0);

        let mut guard = self.active.lock().expect("active pack lock");
        if guard.as_ref().is_none_or(|a| a.len >= MAX_PACK) {
            if let Some(old) = guard.take() {
                self.retire(old)?;
            }
            *guard = Some(self.new_active()?);
        }
        let a = guard.as_mut().expect("active pack");
        let offset = a.len;
        // Header and bytes in one call, without first copying them into one buffer.
        if let Err(e) = write_all_vectored(&a.file, &head, data) {
            // A short write leaves a torn record; start a fresh pack rather than append after
            // it, once what came before it is synced.
            let id = a.id;
            if let Some(old) = guard.take() {
                self.retire(old)?;
            }
            return Err(e).at(self.path(id));
        }
        a.len += (HEADER + data.len()) as u64;
        Ok(PackLoc {
            pack: a.id,
            offset,
            stored_len: data.len() as u32,
            zstd,
        })
    }

    /// Return once the records at `locs` are on stable storage; only then may the index point
    /// at them. Concurrent callers share fdatasyncs.
    pub fn make_durable<'a>(&self, locs: impl IntoIterator<Item = &'a PackLoc>) -> Result<()> {
        let end = locs
            .into_iter()
            .map(|l| (l.pack, l.offset + HEADER as u64 + u64::from(l.stored_len)))
            .max();
        let Some(end) = end else {
            return Ok(());
        };
        self.sync_to(end)?;
        self.durability.faults.at(Event::Durable { upto: end })
    }

    fn sync_to(&self, end: Mark) -> Result<()> {
        self.durability.sync_to(end, &self.dir, || {
            let guard = self.active.lock().expect("active pack lock");
            guard
                .as_ref()
                .map(|a| (a.file.clone(), (a.id, a.len), self.path(a.id)))
        })
    }

    /// Make everything appended so far durable.
    pub fn sync(&self) -> Result<()> {
        let end = {
            let guard = self.active.lock().expect("active pack lock");
            guard.as_ref().filter(|a| a.len > 0).map(|a| (a.id, a.len))
        };
        end.map_or(Ok(()), |end| self.sync_to(end))
    }

    /// Close the active pack so that a new one is started (compaction writes its own pack).
    pub fn seal(&self) -> Result<()> {
        let mut guard = self.active.lock().expect("active pack lock");
        match guard.take() {
            Some(a) => self.retire(a),
            None => Ok(()),
        }
    }

    fn reader(&self, pack: u32) -> Result<Arc<File>> {
        if let Some(f) = self.readers.read().expect("readers lock").get(&pack) {
            return Ok(f.clone());
        }
        let p = self.path(pack);
        let f = Arc::new(File::open(&p).at(&p)?);
        self.readers
            .write()
            .expect("readers lock")
            .insert(pack, f.clone());
        Ok(f)
    }

    /// Read and check a record; returns the raw (decompressed) bytes, unverified against the id
    /// beyond the header (the caller checks BLAKE3).
    pub fn read(&self, id: &ChunkId, loc: &PackLoc, raw_len: u32) -> Result<Vec<u8>> {
        self.read_record(id, loc, raw_len).map(|r| r.raw)
    }

    /// As [`Packs::read`], and the zstd frame the record holds when it is stored compressed,
    /// so that it can be sent on as it is.
    pub fn read_record(&self, id: &ChunkId, loc: &PackLoc, raw_len: u32) -> Result<Record> {
        let corrupt = |why: String| Error::CorruptChunk { id: *id, why };
        let f = self.reader(loc.pack)?;
        let read_at = |buf: &mut [u8], at: u64| {
            f.read_exact_at(buf, at)
                .map_err(|e| corrupt(format!("pack {} offset {}: {e}", loc.pack, loc.offset)))
        };
        // Two reads rather than one: the bytes land where they are returned from, instead of
        // being moved down over the header afterwards.
        let mut head = [0u8; HEADER];
        read_at(&mut head, loc.offset)?;
        let h = Header::parse(&head).ok_or_else(|| corrupt("bad pack header".into()))?;
        if h.id != *id || h.stored_len != loc.stored_len || h.raw_len != raw_len {
            return Err(corrupt("pack header does not match the index".into()));
        }
        let mut data = crate::buffers::for_overwrite(loc.stored_len as usize);
        read_at(&mut data, loc.offset + HEADER as u64)?;
        if h.zstd {
            let out = crate::codec::decompress(&data, raw_len as usize)
                .map_err(|e| corrupt(format!("zstd: {e}")))?;
            if out.len() != raw_len as usize {
                return Err(corrupt("decompressed length differs".into()));
            }
            Ok(Record {
                raw: out,
                zstd: Some(data),
                incompressible: false,
            })
        } else {
            Ok(Record {
                raw: data,
                zstd: None,
                incompressible: h.incompressible,
            })
        }
    }

    /// Forget cached handles and delete a pack file.
    pub fn remove(&self, pack: u32) -> Result<()> {
        self.readers.write().expect("readers lock").remove(&pack);
        let p = self.path(pack);
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).at(&p),
            _ => Ok(()),
        }
    }
}

/// `write_all` of two buffers through `write_vectored`.
fn write_all_vectored(mut f: &File, head: &[u8], data: &[u8]) -> std::io::Result<()> {
    use std::io::{ErrorKind, IoSlice};
    let (mut head, mut data) = (head, data);
    while !head.is_empty() || !data.is_empty() {
        let n = match f.write_vectored(&[IoSlice::new(head), IoSlice::new(data)]) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let h = n.min(head.len());
        head = &head[h..];
        data = &data[n - h..];
    }
    Ok(())
}

/// A record read back: the raw bytes (not yet checked against the id), the zstd frame it is
/// stored as, if compressed, and whether zstd was tried and did not pay.
pub struct Record {
    pub raw: Vec<u8>,
    pub zstd: Option<Vec<u8>>,
    pub incompressible: bool,
}

struct Header {
    zstd: bool,
    incompressible: bool,
    stored_len: u32,
    raw_len: u32,
    id: ChunkId,
}

impl Header {
    fn parse(b: &[u8]) -> Option<Self> {
        if b.len() < HEADER || b[..4] != MAGIC || b[4] & !(FLAG_ZSTD | FLAG_INCOMPRESSIBLE) != 0 {
            return None;
        }
        let stored_len = u32::from_le_bytes(b[8..12].try_into().ok()?);
        let raw_len = u32::from_le_bytes(b[12..16].try_into().ok()?);
        if raw_len as usize > crate::MAX_CHUNK || stored_len as usize > crate::MAX_CHUNK + 4096 {
            return None;
        }
        Some(Self {
            zstd: b[4] & FLAG_ZSTD != 0,
            incompressible: b[4] & FLAG_INCOMPRESSIBLE != 0,
            stored_len,
            raw_len,
            id: ChunkId(b[16..48].try_into().ok()?),
        })
    }
}
