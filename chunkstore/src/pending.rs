//! Chunks put but not yet in the index: group commit for downloads.
//!
//! A put appends the chunk to a pack and records it here, where reads find it at once (it is
//! servable as soon as the put returns). Once [`crate::PUT_SYNC_BYTES`] have gathered (on the
//! store's drain thread, see `store/drain.rs`), or when a download finishes, the store is
//! flushed or GC runs, they are made durable with one fdatasync, then indexed, and the index is
//! flushed ([`Pending::drain`]). So a download pays two syncs per group, not one per chunk, and
//! does not wait for them; a crash forgets at most the last [`crate::PUT_UNSYNCED_MAX`] bytes
//! of puts (fetched again as missing chunks), and never leaves the index pointing at bytes that
//! are not on disk.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::index::ChunkRec;
use crate::pack::{PackLoc, Packs};
use crate::{ChunkId, Error, Result};

#[derive(Default)]
struct State {
    chunks: HashMap<ChunkId, (u32, PackLoc)>,
    bytes: u64,
}

/// Puts that found the disk behind ([`crate::PUT_UNSYNCED_MAX`] bytes not durable) and waited
/// for it, since the store was opened. While one waits, the download it belongs to stalls:
/// nothing else it receives is stored, and its peers' streams fill up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PutWaits {
    pub puts: u64,
    /// Time during which at least one put was waiting (puts that wait side by side count once).
    pub stalled: Duration,
}

impl PutWaits {
    /// What happened since `earlier`, a reading of the same store.
    pub fn since(self, earlier: PutWaits) -> PutWaits {
        PutWaits {
            puts: self.puts.saturating_sub(earlier.puts),
            stalled: self.stalled.saturating_sub(earlier.stalled),
        }
    }
}

#[derive(Default)]
struct Waits {
    done: PutWaits,
    /// Puts waiting now, and since when one has been.
    waiting: usize,
    since: Option<Instant>,
}

/// A put's wait for the disk, counted in [`PutWaits`] until dropped.
pub(crate) struct Waiting<'a>(&'a Mutex<Waits>);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut w = self.0.lock().expect("put waits lock");
        w.waiting -= 1;
        if w.waiting == 0 {
            if let Some(since) = w.since.take() {
                w.done.stalled += since.elapsed();
            }
        }
    }
}

#[derive(Default)]
pub(crate) struct Pending {
    state: Mutex<State>,
    /// One drain at a time: a chunk leaves `state` only once it is indexed.
    drain: Mutex<()>,
    waits: Mutex<Waits>,
}

impl Pending {
    /// Length and location of a chunk put but not indexed yet.
    pub(crate) fn get(&self, id: &ChunkId) -> Option<(u32, PackLoc)> {
        self.state
            .lock()
            .expect("pending lock")
            .chunks
            .get(id)
            .copied()
    }

    /// Record a put; returns the bytes put and not indexed yet, this one included.
    pub(crate) fn add(&self, id: ChunkId, len: u32, loc: PackLoc) -> u64 {
        let mut st = self.state.lock().expect("pending lock");
        if let std::collections::hash_map::Entry::Vacant(e) = st.chunks.entry(id) {
            e.insert((len, loc));
            st.bytes += u64::from(len);
        }
        st.bytes
    }

    /// Bytes put and not indexed yet.
    pub(crate) fn bytes(&self) -> u64 {
        self.state.lock().expect("pending lock").bytes
    }

    /// A put begins to wait for the disk; its wait ends when the guard is dropped.
    pub(crate) fn waiting(&self) -> Waiting<'_> {
        let mut w = self.waits.lock().expect("put waits lock");
        w.done.puts += 1;
        w.waiting += 1;
        w.since.get_or_insert_with(Instant::now);
        Waiting(&self.waits)
    }

    /// The waits so far, the one under way included.
    pub(crate) fn waits(&self) -> PutWaits {
        let w = self.waits.lock().expect("put waits lock");
        let mut done = w.done;
        if let Some(since) = w.since {
            done.stalled += since.elapsed();
        }
        done
    }

    /// Forget a copy that failed verification.
    pub(crate) fn forget(&self, id: &ChunkId, loc: &PackLoc) {
        let mut st = self.state.lock().expect("pending lock");
        if let Some((len, l)) = st.chunks.get(id).copied() {
            if l == *loc {
                st.chunks.remove(id);
                st.bytes -= u64::from(len);
            }
        }
    }

    /// Make every pending chunk durable, then index it. Callers hold the GC lock (shared or
    /// exclusive), so GC never sees pack bytes that are about to be indexed as garbage.
    pub(crate) fn drain(&self, packs: &Packs, chunks: &sled::Tree) -> Result<()> {
        let _one = self.drain.lock().expect("drain lock");
        let batch: Vec<(ChunkId, u32, PackLoc)> = {
            let st = self.state.lock().expect("pending lock");
            st.chunks.iter().map(|(id, (l, p))| (*id, *l, *p)).collect()
        };
        if batch.is_empty() {
            return Ok(());
        }
        packs.make_durable(batch.iter().map(|(_, _, loc)| loc))?;
        let mut bad = false;
        for (id, len, loc) in &batch {
            chunks.update_and_fetch(id.0, |old| {
                let mut rec = match old.map(ChunkRec::decode) {
                    Some(Ok(r)) => r,
                    Some(Err(_)) => {
                        bad = true;
                        return old.map(|o| o.to_vec());
                    }
                    None => ChunkRec {
                        len: *len,
                        refs: 0,
                        pack: None,
                        local: None,
                    },
                };
                rec.pack = rec.pack.or(Some(*loc));
                Some(rec.encode())
            })?;
        }
        chunks.flush()?;
        let mut st = self.state.lock().expect("pending lock");
        for (id, len, loc) in batch {
            if st.chunks.get(&id) == Some(&(len, loc)) {
                st.chunks.remove(&id);
                st.bytes -= u64::from(len);
            }
        }
        if bad {
            return Err(Error::BadRecord { what: "chunk" });
        }
        Ok(())
    }
}
