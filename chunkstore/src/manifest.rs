use peerix_nix::Sha256Hash;

use crate::{ChunkId, Error, Result};

/// One chunk of a NAR: its id and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkRef {
    pub id: ChunkId,
    pub len: u32,
}

/// A NAR as its ordered chunks. Keyed by the NAR's sha256 (its NarHash).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub nar_hash: Sha256Hash,
    pub nar_size: u64,
    pub chunks: Vec<ChunkRef>,
}

const VERSION: u8 = 1;
const ENTRY: usize = 36;

impl Manifest {
    /// More chunks than any NAR up to 1 TiB at the smallest allowed average size would have
    /// is not a manifest but an attack on memory.
    pub const MAX_CHUNKS: usize = 16 * 1024 * 1024;

    /// Check the invariants a manifest from anywhere (a peer, the disk) must hold.
    pub fn validate(&self) -> Result<()> {
        if self.chunks.len() > Self::MAX_CHUNKS {
            return Err(Error::BadManifest(format!(
                "{} chunks is more than {}",
                self.chunks.len(),
                Self::MAX_CHUNKS
            )));
        }
        let mut sum = 0u64;
        // A chunk id names its bytes, so it has one length wherever it appears; a manifest that
        // gives one id two lengths would make the NAR it describes longer or shorter than the
        // chunks that are really sent (and the NarSize check alone cannot see that).
        let mut lens: std::collections::HashMap<ChunkId, u32> =
            std::collections::HashMap::with_capacity(self.chunks.len());
        for c in &self.chunks {
            if c.len == 0 || c.len as usize > crate::MAX_CHUNK {
                return Err(Error::BadManifest(format!(
                    "chunk {} has length {}",
                    c.id, c.len
                )));
            }
            if let Some(other) = lens.insert(c.id, c.len).filter(|l| *l != c.len) {
                return Err(Error::BadManifest(format!(
                    "chunk {} is listed with lengths {other} and {}",
                    c.id, c.len
                )));
            }
            sum += u64::from(c.len);
        }
        if sum != self.nar_size {
            return Err(Error::BadManifest(format!(
                "chunk lengths add up to {sum}, NarSize is {}",
                self.nar_size
            )));
        }
        Ok(())
    }

    /// Byte offset of each chunk in the NAR.
    pub fn offsets(&self) -> impl Iterator<Item = (u64, &ChunkRef)> {
        self.chunks.iter().scan(0u64, |off, c| {
            let o = *off;
            *off += u64::from(c.len);
            Some((o, c))
        })
    }

    /// Length of [`encode`](Self::encode)'s output.
    pub fn encoded_len(&self) -> usize {
        13 + ENTRY * self.chunks.len()
    }

    /// Binary form: version, NAR size, chunk count, then (id, len) per chunk; the NarHash is
    /// the key it is stored under.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.encoded_len());
        v.push(VERSION);
        v.extend_from_slice(&self.nar_size.to_le_bytes());
        v.extend_from_slice(&(self.chunks.len() as u32).to_le_bytes());
        for c in &self.chunks {
            v.extend_from_slice(&c.id.0);
            v.extend_from_slice(&c.len.to_le_bytes());
        }
        v
    }

    pub fn decode(nar_hash: Sha256Hash, b: &[u8]) -> Result<Self> {
        let bad = |why: &str| Error::BadManifest(why.to_owned());
        if b.len() < 13 || b[0] != VERSION {
            return Err(bad("bad header"));
        }
        let nar_size = u64::from_le_bytes(b[1..9].try_into().expect("8 bytes"));
        let n = u32::from_le_bytes(b[9..13].try_into().expect("4 bytes")) as usize;
        let body = &b[13..];
        if n > Self::MAX_CHUNKS || body.len() != n * ENTRY {
            return Err(bad("chunk count does not match the length"));
        }
        let chunks = body
            .chunks_exact(ENTRY)
            .map(|e| ChunkRef {
                id: ChunkId(e[..32].try_into().expect("32 bytes")),
                len: u32::from_le_bytes(e[32..].try_into().expect("4 bytes")),
            })
            .collect();
        let m = Self {
            nar_hash,
            nar_size,
            chunks,
        };
        m.validate()?;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip() {
        let m = Manifest {
            nar_hash: Sha256Hash::digest(b"x"),
            nar_size: 7,
            chunks: vec![
                ChunkRef {
                    id: ChunkId::of(b"a"),
                    len: 3,
                },
                ChunkRef {
                    id: ChunkId::of(b"b"),
                    len: 4,
                },
            ],
        };
        assert_eq!(Manifest::decode(m.nar_hash, &m.encode()).unwrap(), m);
        let offs: Vec<u64> = m.offsets().map(|(o, _)| o).collect();
        assert_eq!(offs, [0, 3]);
    }

    #[test]
    fn one_id_with_two_lengths_is_refused() {
        let e = ChunkId::of(b"e");
        let m = Manifest {
            nar_hash: Sha256Hash::digest(b"x"),
            nar_size: 3,
            chunks: vec![ChunkRef { id: e, len: 1 }, ChunkRef { id: e, len: 2 }],
        };
        let err = m.validate().unwrap_err().to_string();
        assert!(err.contains("lengths 1 and 2"), "{err}");
        // The same id twice with one length is an ordinary repeated chunk.
        let ok = Manifest {
            nar_hash: Sha256Hash::digest(b"x"),
            nar_size: 2,
            chunks: vec![ChunkRef { id: e, len: 1 }, ChunkRef { id: e, len: 1 }],
        };
        ok.validate().unwrap();
        assert!(Manifest::decode(m.nar_hash, &m.encode()).is_err());
    }

    proptest! {
        #[test]
        fn decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Manifest::decode(Sha256Hash::digest(b""), &b);
        }
    }
}
