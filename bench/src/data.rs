//! The benchmark's data: a generated NAR (two versions that differ in a few places),
//! streamed so that its size costs no memory, and what the seeders make of it: a path of
//! their Nix store read in place, or their chunk store's packs.

use std::collections::HashMap;

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use peerix_chunkstore::{ChunkStore, Options};
use peerix_nix::{NarInfo, Sha256Hash, StorePath, StorePathHash};
use serde::{Deserialize, Serialize};

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

/// Where the seeders hold the benchmark NAR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeedFrom {
    /// A path of the seeder's Nix store, its NAR read from the files in place: how a daemon
    /// serves what Nix holds, most of what it ever serves.
    #[default]
    Store,
    /// The chunk store's packs: how a daemon serves what it downloaded and Nix has not
    /// imported, or what it pinned after Nix collected it.
    Packs,
}

/// File sizes of the benchmark's store path, in turn: a package's spread, from a few KiB of
/// scripts and headers to libraries of several MiB, so that chunks span many small files as
/// well as parts of large ones.
const FILE_SIZES: [u64; 8] = [
    1 << 10,
    6 << 10,
    30 << 10,
    200 << 10,
    2 << 20,
    12 << 10,
    90 << 10,
    6 << 20,
];
/// Files per directory of the benchmark's store path.
const FILES_PER_DIR: usize = 32;

/// What a seeder holds: both versions of the benchmark NAR in `store`, their narinfos keyed
/// for a catalog, and version 1 as a NAR file for the plain HTTP server.
pub struct Seeded {
    pub store: ChunkStore,
    pub catalog: HashMap<StorePathHash, NarInfo>,
    pub nar_file: PathBuf,
}

/// Make a seeder's data in `dir`, `size` bytes of content per version, held as `from` says.
pub async fn seed(dir: &Path, size: u64, from: SeedFrom) -> Result<Seeded> {
    let root = dir.join("nix-root");
    let opts = Options {
        store_root: (from == SeedFrom::Store).then(|| root.clone()),
        ..Options::default()
    };
    let store = ChunkStore::open(&dir.join("chunks"), opts)?;
    let nar_file = dir.join("nar-1");
    let mut catalog = HashMap::new();
    for (version, name) in [(1u8, "bench-nar-1"), (2, "bench-nar-2")] {
        let p = store_path(name)?;
        let path = p.clone();
        let m = match from {
            SeedFrom::Packs => {
                if version == 1 {
                    write_nar_file(&nar_file, NarGen::new(1, size))?;
                }
                store
                    .blocking(move |cs| {
                        cs.ingest_nar(NarGen::new(version, size), Some(&path), None, &mut |_| {})
                    })
                    .await?
            }
            SeedFrom::Store => {
                let tree = root
                    .join(peerix_nix::STORE_DIR.trim_start_matches('/'))
                    .join(p.base_name());
                write_tree(&tree, NarGen::new(version, size))?;
                if version == 1 {
                    let mut f = std::io::BufWriter::new(
                        File::create(&nar_file)
                            .with_context(|| format!("creating {}", nar_file.display()))?,
                    );
                    peerix_nix::nar::dump_path(&tree, &mut f)?;
                    f.flush()?;
                }
                store
                    .blocking(move |cs| cs.ingest_local(&path, None, &mut |_| {}))
                    .await?
            }
        };
        catalog.insert(p.hash(), NarInfo::uncompressed(p, m.nar_hash, m.nar_size));
    }
    flush_filesystem(dir)?;
    Ok(Seeded {
        store,
        catalog,
        nar_file,
    })
}

/// Write what seeding left in the page cache to the disk now. Left to the kernel, it is
/// written back some 30 s later (`vm.dirty_expire_centisecs`), in the middle of a measured
/// download: the seeders' files, 2 GiB with eight seeders of 256 MiB, went out in one or two
/// seconds, the leecher's fdatasyncs queued behind them, and its puts waited for its disk
/// (three N = 8 runs of nine at 0.81–0.83 of the ideal). A seeder's store on a real machine is
/// not being written back while it serves.
fn flush_filesystem(dir: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let d = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    // SAFETY: syncfs only reads the descriptor, which `d` keeps open across the call.
    if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("syncing the file system of {}", dir.display()));
    }
    Ok(())
}

/// `content` laid out as the files of a store path at `tree`, [`FILE_SIZES`] in turn (the last
/// file cut short), every fifth executable.
fn write_tree(tree: &Path, mut content: NarGen) -> Result<()> {
    let mut i = 0;
    while content.pos < content.len {
        let dir = tree.join(format!("d{:02}", i / FILES_PER_DIR));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let file = dir.join(format!("f{i:04}"));
        let mut f = File::create(&file).with_context(|| format!("creating {}", file.display()))?;
        let n = std::io::copy(
            &mut (&mut content).take(FILE_SIZES[i % FILE_SIZES.len()]),
            &mut f,
        )?;
        if i % 5 == 0 {
            f.set_permissions(std::fs::Permissions::from_mode(0o555))?;
        }
        if n == 0 {
            bail!("the generator ended early");
        }
        i += 1;
    }
    Ok(())
}

/// A NAR as a file, for the plain HTTP server.
fn write_nar_file(path: &Path, mut nar: impl Read) -> Result<()> {
    let mut f = std::io::BufWriter::new(
        File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    std::io::copy(&mut nar, &mut f)?;
    f.flush()?;
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
