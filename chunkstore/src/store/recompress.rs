//! Compress once, serve many: a node that serves a NAR again and again (a seed, a popular
//! path) recompresses its chunks once at a high zstd level, in the background, and sends those
//! frames to every peer that accepts zstd, instead of compressing on the fly at a fast level
//! (or sending raw) each time. The frames are a cache beside the chunks: bounded in total
//! size, verified (decompressed and hashed) whenever they are read, dropped when their chunk
//! is gone, and never needed to produce a NAR.

use std::time::{Duration, Instant};

use peerix_nix::Sha256Hash;
use tracing::warn;

use super::ChunkStore;
use crate::{ChunkId, Result};

/// The level the cache holds: slow to make (a few MB/s), as fast to decompress as any.
pub const RECOMPRESS_LEVEL: i32 = 19;
/// Key of the running total of frame bytes in the `wire` tree.
const TOTAL: &[u8] = b"";

/// What one pass over a NAR did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recompressed {
    pub chunks: u64,
    /// Raw bytes of the chunks recompressed, and what their frames take.
    pub raw_bytes: u64,
    pub frame_bytes: u64,
    /// Chunks marked without a try: their pack found them incompressible, or a sample did.
    pub skipped: u64,
    /// The pass stopped at the cache's size budget.
    pub full: bool,
}

impl ChunkStore {
    /// Total bytes of recompressed frames held.
    pub fn recompressed_bytes(&self) -> Result<u64> {
        Ok(self
            .inner
            .wire
            .get(TOTAL)?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_le_bytes))
            .unwrap_or(0))
    }

    fn add_total(&self, delta: i64) -> Result<()> {
        self.inner.wire.update_and_fetch(TOTAL, |old| {
            let n = old
                .and_then(|v| v.try_into().ok().map(u64::from_le_bytes))
                .unwrap_or(0);
            Some(n.saturating_add_signed(delta).to_le_bytes().to_vec())
        })?;
        Ok(())
    }

    /// The recompressed frame of a chunk, if the cache holds a good one: it decompresses to
    /// the chunk's bytes (a bad or orphaned frame is dropped, never returned).
    pub fn recompressed(&self, id: &ChunkId, raw: &[u8]) -> Result<Option<Vec<u8>>> {
        let Some(frame) = self.inner.wire.get(id.0)? else {
            return Ok(None);
        };
        // An empty value marks a chunk tried and found not worth it.
        if frame.is_empty() {
            return Ok(None);
        }
        match crate::codec::decompress(&frame, raw.len()) {
            Ok(d) if d == raw => Ok(Some(frame.to_vec())),
            _ => {
                warn!(chunk = %id, "recompressed frame does not match its chunk; dropped");
                self.forget_recompressed(id)?;
                Ok(None)
            }
        }
    }

    fn forget_recompressed(&self, id: &ChunkId) -> Result<()> {
        if let Some(old) = self.inner.wire.remove(id.0)? {
            self.add_total(-(old.len() as i64))?;
        }
        Ok(())
    }

    /// Recompress the chunks of `nar` the cache does not hold yet, at `level`, while the
    /// cache holds less than `budget` bytes. `duty` (0 < duty ≤ 1) is the share of one core
    /// the pass may use: after each chunk it rests in proportion to the work it did.
    pub fn recompress_nar(
        &self,
        nar: &Sha256Hash,
        level: i32,
        budget: u64,
        duty: f64,
    ) -> Result<Recompressed> {
        let mut r = Recompressed::default();
        let Some(m) = self.readable_manifest(nar)? else {
            return Ok(r);
        };
        let rest = (1.0 / duty.clamp(0.01, 1.0)) - 1.0;
        for c in &m.chunks {
            if self.inner.wire.contains_key(c.id.0)? {
                continue;
            }
            if self.recompressed_bytes()? >= budget {
                r.full = true;
                break;
            }
            let t = Instant::now();
            let stored = self.read_chunk_stored(&c.id)?;
            // A chunk a fast level cannot shrink (its pack says so, or a sample of it) is
            // marked without a try at this level, which is slowest on such bytes.
            // An empty frame is the mark of a chunk not worth it, so it is not tried again.
            let frame = if stored.incompressible || !crate::codec::worth_compressing(&stored.raw) {
                r.skipped += 1;
                vec![]
            } else {
                let Ok(frame) = crate::codec::compress(&stored.raw, level) else {
                    continue;
                };
                // Worth keeping only when it beats what is already stored (the pack's fast
                // zstd).
                let stored_len = stored.zstd.as_ref().map_or(stored.raw.len(), Vec::len);
                if frame.len() < stored_len - stored_len / 16 {
                    r.chunks += 1;
                    r.raw_bytes += stored.raw.len() as u64;
                    r.frame_bytes += frame.len() as u64;
                    frame
                } else {
                    vec![]
                }
            };
            let len = frame.len() as i64;
            if self.inner.wire.insert(c.id.0, frame)?.is_none() {
                self.add_total(len)?;
            }
            std::thread::sleep(t.elapsed().mul_f64(rest).min(Duration::from_secs(10)));
        }
        Ok(r)
    }

    /// Drop the frames of chunks the store no longer holds. Returns how many.
    pub fn prune_recompressed(&self) -> Result<u64> {
        let mut gone = vec![];
        for kv in self.inner.wire.iter() {
            let (k, _) = kv?;
            if k.len() == 32 && !self.inner.chunks.contains_key(&k)? {
                gone.push(ChunkId(k.as_ref().try_into().expect("32")));
            }
        }
        for id in &gone {
            self.forget_recompressed(id)?;
        }
        Ok(gone.len() as u64)
    }
}
