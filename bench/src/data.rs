//! The benchmark's data: a generated NAR (two versions that differ in a few places),
//! streamed so that its size costs no memory, and what the seeders make of it.

use std::collections::HashMap;

use anyhow::{Context, Result};
use peerix_chunkstore::ChunkStore;
use peerix_nix::{NarInfo, Sha256Hash, StorePath, StorePathHash};

/// A benchmark NAR, generated as it is read so that memory does not grow with its size:
/// deterministic, incompressible bytes (xorshift64); version 2 has 16 bytes changed at each of
/// four places.
pub struct NarGen {
    x: u64,
    pos: u64,
    len: u64,
    version: u8,
    /// The current 8-byte word and how much of it was handed out.
    word: [u8; 8],
    used: usize,
}

impl NarGen {
    pub fn new(version: u8, len: u64) -> Self {
        Self {
            x: 0x5eed | 1,
            pos: 0,
            len,
            version,
            word: [0; 8],
            used: 8,
        }
    }
}

impl std::io::Read for NarGen {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min((self.len - self.pos) as usize);
        let mut i = 0;
        while i < n {
            if self.used == 8 {
                self.x ^= self.x << 13;
                self.x ^= self.x >> 7;
                self.x ^= self.x << 17;
                self.word = self.x.to_le_bytes();
                self.used = 0;
            }
            let k = (8 - self.used).min(n - i);
            buf[i..i + k].copy_from_slice(&self.word[self.used..self.used + k]);
            self.used += k;
            i += k;
        }
        if self.version == 2 {
            for j in 1..=4u64 {
                let start = self.len * j / 5;
                let (lo, hi) = (start.max(self.pos), (start + 16).min(self.pos + n as u64));
                for at in lo..hi {
                    buf[(at - self.pos) as usize] ^= 0x5a;
                }
            }
        }
        self.pos += n as u64;
        Ok(n)
    }
}

pub fn store_path(name: &str) -> Result<StorePath> {
    let h = peerix_nix::base32::encode(&Sha256Hash::digest(name.as_bytes()).0[..20]);
    Ok(StorePath::from_base_name(&format!("{h}-{name}"))?)
}

/// Chunk both versions of the NAR into `store`.
/// Chunk both versions of the benchmark NAR into `store`, streamed from the generator; their
/// narinfos, keyed for a catalog.
pub async fn ingest_both(store: &ChunkStore, size: u64) -> Result<HashMap<StorePathHash, NarInfo>> {
    let mut out = HashMap::new();
    for (version, name) in [(1u8, "bench-nar-1"), (2, "bench-nar-2")] {
        let p = store_path(name)?;
        let path = p.clone();
        let m = store
            .blocking(move |cs| {
                cs.ingest_nar(NarGen::new(version, size), Some(&path), None, &mut |_| {})
            })
            .await?;
        out.insert(
            p.hash(),
            NarInfo::uncompressed(p.clone(), m.nar_hash, m.nar_size),
        );
    }
    Ok(out)
}

/// Version 1 written to a file, for the plain HTTP server.
pub fn write_nar_file(path: &std::path::Path, size: u64) -> Result<()> {
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    std::io::copy(&mut NarGen::new(1, size), &mut f)?;
    std::io::Write::flush(&mut f)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::NarGen;
    use std::io::Read;

    fn all(mut g: NarGen, step: usize) -> Vec<u8> {
        let mut out = vec![];
        let mut buf = vec![0; step];
        loop {
            let n = g.read(&mut buf).unwrap();
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    #[test]
    fn the_generator_is_the_same_whatever_the_read_sizes_and_v2_differs_in_64_bytes() {
        let len = 100_003;
        let v1 = all(NarGen::new(1, len), 4096);
        assert_eq!(v1.len() as u64, len);
        assert_eq!(all(NarGen::new(1, len), 3), v1);
        let v2 = all(NarGen::new(2, len), 7);
        assert_eq!(v2.len(), v1.len());
        assert_eq!(v1.iter().zip(&v2).filter(|(a, b)| a != b).count(), 64);
        assert_eq!(all(NarGen::new(2, len), 65536), v2);
    }
}
