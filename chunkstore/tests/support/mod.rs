//! What the chunk store's tests share: deterministic package-like data, NARs of trees, a store
//! opened with small chunks.
#![allow(dead_code)]

use std::io::Read;
use std::path::Path;

use peerix_chunkstore::{ChunkStore, ChunkerParams, Options, Progress};
use peerix_nix::Sha256Hash;

/// Deterministic bytes: text-like runs and binary runs, like a package's files.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            let x = self.next();
            if x.is_multiple_of(3) {
                // Compressible text.
                let words: [&[u8]; 6] =
                    [b"nix ", b"store ", b"peer ", b"chunk\n", b"lib", b"/bin "];
                v.extend_from_slice(words[(x >> 8) as usize % 6]);
            } else {
                v.extend_from_slice(&x.to_le_bytes());
            }
        }
        v.truncate(n);
        v
    }
}

pub fn make_tree(dir: &Path, seed: u64, total: usize) {
    let mut r = Rng(seed | 1);
    std::fs::create_dir_all(dir.join("lib/sub")).unwrap();
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::create_dir_all(dir.join("empty")).unwrap();
    std::fs::write(dir.join("empty-file"), b"").unwrap();
    std::os::unix::fs::symlink("lib/sub", dir.join("link")).unwrap();
    let mut left = total;
    let mut i = 0;
    while left > 0 {
        let n = (r.next() as usize % (total / 4 + 1)).clamp(1, left);
        let sub = if i % 2 == 0 { "lib" } else { "lib/sub" };
        std::fs::write(dir.join(sub).join(format!("f{i}")), r.bytes(n)).unwrap();
        left -= n;
        i += 1;
    }
}

pub fn nar_of(dir: &Path) -> Vec<u8> {
    let mut v = vec![];
    peerix_nix::nar::dump_path(dir, &mut v).unwrap();
    v
}

pub fn small() -> ChunkerParams {
    ChunkerParams::new(16 * 1024, 64 * 1024, 256 * 1024).unwrap()
}

pub fn open(dir: &Path, root: Option<&Path>) -> ChunkStore {
    ChunkStore::open(
        dir,
        Options {
            chunker: small(),
            store_root: root.map(Path::to_owned),
        },
    )
    .unwrap()
}

pub fn none(_: &Progress) {}

pub fn read_all(cs: &ChunkStore, h: &Sha256Hash) -> Result<Vec<u8>, std::io::Error> {
    let mut v = vec![];
    cs.nar_reader(h).unwrap().read_to_end(&mut v)?;
    Ok(v)
}

pub fn sha(b: &[u8]) -> Sha256Hash {
    Sha256Hash::digest(b)
}
