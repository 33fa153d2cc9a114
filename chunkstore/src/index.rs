//! Records of the sled index.
//!
//! Trees: `chunks` (id → [`ChunkRec`]), `manifests` (NarHash → manifest), `partial` (NarHash →
//! manifest of a download in progress, which keeps its chunks from GC), `local` (NarHash → the
//! base name of a local store path whose NAR it is), `paths` (store-path hash → NarHash and
//! base name), `pins` (store-path hash → base name), `pin_info` (store-path hash → the narinfo of
//! a path pinned with its description), `seeds` (the application's named roots, see `store/roots.rs`).

use peerix_nix::Sha256Hash;

use crate::pack::PackLoc;
use crate::{ChunkId, Error, Result};

/// Where a chunk's bytes can be read from, and how many manifests use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkRec {
    pub len: u32,
    /// Number of complete manifests that contain this chunk (each counts once).
    pub refs: u32,
    pub pack: Option<PackLoc>,
    /// The NAR (by NarHash) of a local store path, and the chunk's offset in it.
    pub local: Option<(Sha256Hash, u64)>,
}

const HAS_PACK: u8 = 1;
const HAS_LOCAL: u8 = 2;
const PACK_ZSTD: u8 = 4;

impl ChunkRec {
    pub fn has_location(&self) -> bool {
        self.pack.is_some() || self.local.is_some()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(9 + 17 + 40);
        let mut flags = 0;
        if let Some(p) = &self.pack {
            flags |= HAS_PACK | if p.zstd { PACK_ZSTD } else { 0 };
        }
        if self.local.is_some() {
            flags |= HAS_LOCAL;
        }
        v.push(flags);
        v.extend_from_slice(&self.len.to_le_bytes());
        v.extend_from_slice(&self.refs.to_le_bytes());
        if let Some(p) = &self.pack {
            v.extend_from_slice(&p.pack.to_le_bytes());
            v.extend_from_slice(&p.offset.to_le_bytes());
            v.extend_from_slice(&p.stored_len.to_le_bytes());
        }
        if let Some((h, off)) = &self.local {
            v.extend_from_slice(&h.0);
            v.extend_from_slice(&off.to_le_bytes());
        }
        v
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        let bad = || Error::BadRecord { what: "chunk" };
        let mut r = Reader(b);
        let flags = r.u8().ok_or_else(bad)?;
        let len = r.u32().ok_or_else(bad)?;
        let refs = r.u32().ok_or_else(bad)?;
        let pack = if flags & HAS_PACK != 0 {
            Some(PackLoc {
                pack: r.u32().ok_or_else(bad)?,
                offset: r.u64().ok_or_else(bad)?,
                stored_len: r.u32().ok_or_else(bad)?,
                zstd: flags & PACK_ZSTD != 0,
            })
        } else {
            None
        };
        let local = if flags & HAS_LOCAL != 0 {
            let h = Sha256Hash(r.take(32).ok_or_else(bad)?.try_into().map_err(|_| bad())?);
            Some((h, r.u64().ok_or_else(bad)?))
        } else {
            None
        };
        if !r.0.is_empty() {
            return Err(bad());
        }
        Ok(Self {
            len,
            refs,
            pack,
            local,
        })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4")))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8")))
    }
}

pub fn hash_key(b: &[u8]) -> Result<Sha256Hash> {
    b.try_into().map(Sha256Hash).map_err(|_| Error::BadRecord {
        what: "NarHash key",
    })
}

/// The chunk id a record of the chunks tree is keyed by.
pub fn chunk_key(b: &[u8]) -> Result<ChunkId> {
    b.try_into()
        .map(ChunkId)
        .map_err(|_| Error::BadRecord { what: "chunk key" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for rec in [
            ChunkRec {
                len: 5,
                refs: 2,
                pack: None,
                local: None,
            },
            ChunkRec {
                len: 5,
                refs: 0,
                pack: Some(PackLoc {
                    pack: 3,
                    offset: 99,
                    stored_len: 4,
                    zstd: true,
                }),
                local: Some((Sha256Hash::digest(b"n"), 1 << 40)),
            },
        ] {
            assert_eq!(ChunkRec::decode(&rec.encode()).unwrap(), rec);
        }
        assert!(ChunkRec::decode(&[1, 2]).is_err());
    }
}
