use std::fmt;
use std::str::FromStr;

/// A chunk's id: BLAKE3 of its uncompressed bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }
}

/// A chunk's bytes, checked against its id: only [`VerifiedChunk::new`] makes one, so whoever
/// holds one need not hash the bytes again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedChunk {
    pub(crate) id: ChunkId,
    pub(crate) data: bytes::Bytes,
}

impl VerifiedChunk {
    /// The chunk, if `data` hashes to `id` and is no larger than a chunk may be; else None.
    pub fn new(id: ChunkId, data: bytes::Bytes) -> Option<Self> {
        (data.len() <= crate::MAX_CHUNK && ChunkId::of(&data) == id).then_some(Self { id, data })
    }

    pub fn id(&self) -> &ChunkId {
        &self.id
    }

    pub fn data(&self) -> &bytes::Bytes {
        &self.data
    }

    pub fn into_parts(self) -> (ChunkId, bytes::Bytes) {
        (self.id, self.data)
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({self})")
    }
}

impl FromStr for ChunkId {
    type Err = blake3::HexError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        blake3::Hash::from_hex(s).map(|h| Self(*h.as_bytes()))
    }
}

/// FastCDC (2020) size bounds in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkerParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl ChunkerParams {
    /// Chosen by the sweep in `benches/chunk_sizes.rs` (figures in README.md): dedup is nearly
    /// the same as at 16/64/256 KiB while the index, the per-chunk overhead and the number of
    /// requests between peers are a quarter.
    pub const DEFAULT: Self = Self {
        min: 64 * 1024,
        avg: 256 * 1024,
        max: 1024 * 1024,
    };

    pub fn new(min: u32, avg: u32, max: u32) -> Result<Self, String> {
        use fastcdc::v2020::{
            AVERAGE_MAX, AVERAGE_MIN, MAXIMUM_MAX, MAXIMUM_MIN, MINIMUM_MAX, MINIMUM_MIN,
        };
        let ok = (MINIMUM_MIN..=MINIMUM_MAX).contains(&(min as usize))
            && (AVERAGE_MIN..=AVERAGE_MAX).contains(&(avg as usize))
            && (MAXIMUM_MIN..=MAXIMUM_MAX).contains(&(max as usize))
            && min <= avg
            && avg <= max
            && max as usize <= crate::MAX_CHUNK;
        if !ok {
            return Err(format!(
                "chunk sizes {min}/{avg}/{max} are outside FastCDC's bounds or out of order"
            ));
        }
        Ok(Self { min, avg, max })
    }
}

impl Default for ChunkerParams {
    fn default() -> Self {
        Self::DEFAULT
    }
}
