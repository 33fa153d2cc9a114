//! The chunks a download fetches, each by a dense index: what the scheduler and the emitter
//! keep per chunk is a flag or an index into one table, not a 32-byte id in a hash set of
//! their own. A NAR of 8 GiB has ~27,000 chunks; with an id per set and map the download's
//! bookkeeping grew by ~600 bytes for each, ~16 MiB, against a daemon whose whole memory is
//! meant to stay under 64 MiB.

use std::collections::HashMap;

use peerix_chunkstore::{ChunkRef, Manifest};

/// A chunk's index in [`Wanted`].
pub(super) type Want = u32;

pub(super) struct Wanted {
    /// Each distinct chunk not held here, once, in the NAR order of its first occurrence.
    chunks: Vec<ChunkRef>,
    /// The NAR offset of each one's first occurrence.
    offsets: Vec<u64>,
    /// For each of the manifest's positions, the index of its chunk, or [`NOT_WANTED`].
    at: Vec<Want>,
}

/// A position whose chunk is held here. No index reaches it: a manifest has at most
/// [`Manifest::MAX_CHUNKS`] chunks.
const NOT_WANTED: Want = Want::MAX;

impl Wanted {
    /// `missing`: the manifest's chunks not held here, each once, in the order of their first
    /// occurrence ([`peerix_chunkstore::ChunkStore::missing`]). The manifest is validated, so
    /// its positions fit a [`Want`].
    pub(super) fn new(manifest: &Manifest, missing: Vec<ChunkRef>) -> Self {
        let index: HashMap<_, Want> = missing
            .iter()
            .enumerate()
            .map(|(k, c)| (c.id, k as Want))
            .collect();
        let mut offsets = vec![u64::MAX; missing.len()];
        let at = manifest
            .offsets()
            .map(|(o, c)| {
                let Some(&k) = index.get(&c.id) else {
                    return NOT_WANTED;
                };
                let first = &mut offsets[k as usize];
                *first = (*first).min(o);
                k
            })
            .collect();
        Self {
            chunks: missing,
            offsets,
            at,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.chunks.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    pub(super) fn chunk(&self, k: Want) -> ChunkRef {
        self.chunks[k as usize]
    }

    /// The NAR offset where chunk `k` first occurs.
    pub(super) fn offset(&self, k: Want) -> u64 {
        self.offsets[k as usize]
    }

    /// The wanted chunk at the manifest's position `i`, if it is one.
    pub(super) fn at(&self, i: usize) -> Option<Want> {
        self.at.get(i).copied().filter(|&k| k != NOT_WANTED)
    }

    /// Every wanted chunk, in order.
    pub(super) fn all(&self) -> impl Iterator<Item = Want> {
        0..self.chunks.len() as Want
    }

    /// The chunks `ks` stand for.
    pub(super) fn refs(&self, ks: &[Want]) -> Vec<ChunkRef> {
        ks.iter().map(|&k| self.chunk(k)).collect()
    }
}

/// One flag per wanted chunk, with a count of those set.
pub(super) struct Flags {
    set: Vec<bool>,
    count: usize,
}

impl Flags {
    pub(super) fn new(len: usize, value: bool) -> Self {
        Self {
            set: vec![value; len],
            count: if value { len } else { 0 },
        }
    }

    pub(super) fn get(&self, k: Want) -> bool {
        self.set[k as usize]
    }

    /// Set flag `k`; whether it was clear.
    pub(super) fn insert(&mut self, k: Want) -> bool {
        let was = std::mem::replace(&mut self.set[k as usize], true);
        self.count += usize::from(!was);
        !was
    }

    /// Clear flag `k`; whether it was set.
    pub(super) fn remove(&mut self, k: Want) -> bool {
        let was = std::mem::replace(&mut self.set[k as usize], false);
        self.count -= usize::from(was);
        was
    }

    pub(super) fn count(&self) -> usize {
        self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peerix_chunkstore::ChunkId;
    use peerix_nix::Sha256Hash;

    fn chunk(b: u8, len: u32) -> ChunkRef {
        ChunkRef {
            id: ChunkId([b; 32]),
            len,
        }
    }

    #[test]
    fn a_chunk_met_twice_is_one_want_at_its_first_offset() {
        let (a, b, c) = (chunk(1, 10), chunk(2, 20), chunk(3, 30));
        let m = Manifest {
            nar_hash: Sha256Hash([0; 32]),
            nar_size: 90,
            chunks: vec![a, b, a, c, b],
        };
        // `a` is held here; `b` and `c` are not.
        let w = Wanted::new(&m, vec![b, c]);
        assert_eq!(w.len(), 2);
        assert_eq!(
            (0..6).map(|i| w.at(i)).collect::<Vec<_>>(),
            [None, Some(0), None, Some(1), Some(0), None]
        );
        assert_eq!((w.offset(0), w.offset(1)), (10, 40));
        assert_eq!(w.refs(&[1, 0]), [c, b]);
    }

    #[test]
    fn flags_count_what_is_set() {
        let mut f = Flags::new(3, false);
        assert!(f.insert(2));
        assert!(!f.insert(2));
        assert_eq!(f.count(), 1);
        let mut g = Flags::new(3, true);
        assert!(g.remove(0));
        assert!(!g.remove(0));
        assert_eq!((g.count(), g.get(0), g.get(1)), (2, false, true));
    }
}
