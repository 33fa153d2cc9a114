//! fsck: the index checked against itself and the data.

use std::collections::{HashMap, HashSet};

use super::read::verify;
use super::ChunkStore;
use crate::index::{hash_key, ChunkRec};
use crate::pack::HEADER;
use crate::{ChunkId, Manifest, Result};

#[derive(Clone, Debug, Default)]
pub struct FsckReport {
    pub manifests: u64,
    pub chunks: u64,
    pub packs: u64,
    /// Bytes in packs that no index record points at (crash leftovers, GC's to reclaim).
    pub garbage_bytes: u64,
    /// Copies that no longer verify while another copy of the same chunk does.
    pub stale_copies: u64,
    /// Chunks read in place from store paths that Nix has collected since the last scan (the
    /// daemon's next scan drops them, and the NARs they make).
    pub left_store: u64,
    pub problems: Vec<String>,
}

impl FsckReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

impl ChunkStore {
    /// Check the index against itself and the data. With `verify_data`, every chunk is read
    /// and hashed.
    pub fn fsck(&self, verify_data: bool) -> Result<FsckReport> {
        let _gc = self.inner.gc.read().expect("gc lock");
        // A batched commit or removal counts its references over several transactions.
        let _journal = self.inner.journal.lock().expect("journal lock");
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
                let mut left = false;
                if let Some((nar, off)) = r.local {
                    if self.local_path_gone(&nar)? {
                        // Nix collected the path since the last scan, which drops what
                        // pointed into it: the local store changed, nothing here is corrupt.
                        left = true;
                    } else {
                        match self
                            .read_local(&nar, off, r.len)
                            .and_then(|d| verify(&id, d))
                        {
                            Ok(_) => good = true,
                            Err(e) => errors.push(e),
                        }
                    }
                }
                if left && !good && errors.is_empty() {
                    rep.left_store += 1;
                } else if good {
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
}
