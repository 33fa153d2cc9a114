//! peerix's chunk store: NARs as FastCDC chunks addressed by BLAKE3, deduplicated across all
//! NARs, indexed in sled.
//!
//! A NAR of a path valid in the local Nix store is indexed in place (chunks point into the NAR
//! as the store path produces it, through its [`peerix_nix::nar::NarLayout`]); only NARs that
//! are not in the local store keep their chunk bytes in pack files. Every read is verified
//! against the chunk's BLAKE3 id, and a whole-NAR read against the NarHash.

pub mod buffers;
mod chunk;
pub mod codec;
#[cfg(test)]
mod crash_points;
mod durable;
mod error;
mod index;
mod manifest;
mod pack;
mod pending;
mod store;

pub use chunk::{ChunkId, ChunkerParams, VerifiedChunk};
pub use error::{Error, Result};
pub use manifest::{ChunkRef, Manifest};
pub use pending::PutWaits;
pub use store::{
    package_name, ChunkStore, DeltaPlan, Detached, Evicted, FsckReport, GcStats, NarReader,
    Options, Pinned, Progress, Recompressed, Stats, StoredChunk, DELTA_BASE_BYTES,
    DELTA_BASE_CHUNKS, RECOMPRESS_LEVEL, SWEEP_BATCH,
};

/// Puts ([`ChunkStore::put_verified`], [`ChunkStore::put_chunk`]) are made durable and indexed
/// in groups of this many bytes, in the background.
pub const PUT_SYNC_BYTES: u64 = 8 << 20;

/// A put waits for the disk once this many bytes of puts are not durable yet: a crash forgets
/// at most this much of the last puts. Three groups: one being synced, one gathering, and room
/// for a disk that is briefly slower than the network.
pub const PUT_UNSYNCED_MAX: u64 = 3 * PUT_SYNC_BYTES;

/// No chunk is larger than this, whatever a peer or a file on disk says.
pub const MAX_CHUNK: usize = 4 * 1024 * 1024;
