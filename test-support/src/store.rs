//! A chunk store for tests: small chunks, so a few MiB make many of them.

use std::io::Read;
use std::path::Path;

use peerix_chunkstore::{ChunkStore, ChunkerParams, Options, Progress};
use peerix_nix::Sha256Hash;

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
