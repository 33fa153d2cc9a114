//! What the store holds, in numbers.

use super::ChunkStore;
use crate::index::ChunkRec;
use crate::Result;

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

impl ChunkStore {
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

    /// Bytes of the pack files on disk (cheap: one stat per pack).
    pub fn pack_file_bytes(&self) -> Result<u64> {
        let p = &self.inner.packs;
        p.list()?.into_iter().map(|id| p.file_len(id)).sum()
    }
}
