//! How a download asks for its chunks to travel: compressed while the link is slower than
//! compression, raw when the CPU would be the bottleneck, and as deltas against older versions
//! of the path that this node holds.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use peerix_chunkstore::{ChunkStore, Manifest};
use peerix_nix::StorePath;
use tracing::{debug, warn};

use crate::client::DeltaBases;
use crate::compress;
use crate::protocol::{DeltaAsk, Want, MAX_DELTA_NARS};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Compress while a peer's link delivers fewer bytes per second than `compress_below`.
    Auto,
    Always,
    Never,
}

#[derive(Clone, Debug)]
pub struct WireConfig {
    pub compression: Compression,
    /// Wire bytes per second below which `Auto` asks for compression. Default: half what zstd
    /// compresses per second on one core here (the peer spends that core; the link must be
    /// the narrower pipe for it to pay).
    pub compress_below: f64,
    /// Offer older versions of the path as delta bases.
    pub deltas: bool,
}

impl Default for WireConfig {
    fn default() -> Self {
        Self {
            compression: Compression::Auto,
            compress_below: compression_speed() / 2.0,
            deltas: true,
        }
    }
}

impl WireConfig {
    /// What to ask a peer for, given the wire rate measured from it so far (none yet:
    /// compressed, as most links a peer cache saves on are slower than compression).
    pub(super) fn want(&self, wire_rate: Option<f64>, delta: Option<&DeltaAsk>) -> Want {
        let compress = match self.compression {
            Compression::Always => true,
            Compression::Never => false,
            Compression::Auto => wire_rate.is_none_or(|r| r < self.compress_below),
        };
        Want {
            // Chunks the peer stores compressed cost nothing to send as they are and little
            // to decompress.
            zstd: self.compression != Compression::Never,
            compress,
            delta: delta.filter(|_| compress).cloned(),
        }
    }
}

/// Bytes per second zstd compresses on one core here, measured once on this program's own
/// machine code (real binary data, as most of a NAR is).
pub fn compression_speed() -> f64 {
    static SPEED: OnceLock<f64> = OnceLock::new();
    *SPEED.get_or_init(|| {
        // The first 4 MiB only (a binary with debug info is hundreds of MiB), a chunk's worth
        // at a time as chunks are compressed: no more than two pieces of memory for it.
        const PIECE: usize = 256 << 10;
        let mut input = vec![0u8; PIECE];
        let mut output = vec![0u8; zstd::zstd_safe::compress_bound(PIECE)];
        let mut file = std::fs::File::open("/proc/self/exe").ok();
        let (mut bytes, mut took) = (0usize, std::time::Duration::ZERO);
        let mut z = zstd::bulk::Compressor::new(compress::LEVEL).ok();
        while bytes < 4 << 20 {
            let n = match file.as_mut().map(|f| std::io::Read::read(f, &mut input)) {
                Some(Ok(n)) if n > 0 => n,
                _ if bytes >= 1 << 20 => break,
                // Too little to measure: a fixed pattern in its place.
                _ => {
                    file = None;
                    input.fill(7);
                    PIECE
                }
            };
            let t = Instant::now();
            if let Some(z) = z.as_mut() {
                let _ = z.compress_to_buffer(&input[..n], &mut output);
            }
            took += t.elapsed();
            bytes += n;
        }
        let speed = bytes as f64 / took.as_secs_f64().max(1e-6);
        debug!(mib_per_s = speed / 1048576.0, "zstd speed measured");
        speed
    })
}

/// The older versions of `path` this node holds whole, as a delta offer: their NarHashes and
/// every chunk id in them.
pub(super) async fn delta_bases(
    store: &ChunkStore,
    manifest: &Arc<Manifest>,
    path: &StorePath,
) -> Option<Arc<DeltaBases>> {
    let (path, nar) = (path.clone(), manifest.nar_hash);
    let r = store
        .blocking(move |cs| {
            let mut nars = cs.other_versions(&path, MAX_DELTA_NARS)?;
            nars.retain(|n| *n != nar);
            let mut chunks = HashSet::new();
            for n in &nars {
                if let Some(m) = cs.readable_manifest(n)? {
                    chunks.extend(m.chunks.iter().map(|c| c.id));
                }
            }
            Ok((nars, chunks))
        })
        .await;
    match r {
        Ok((nars, chunks)) if !nars.is_empty() => {
            debug!(nar = %manifest.nar_hash, bases = nars.len(), "offering older versions as delta bases");
            Some(Arc::new(DeltaBases {
                store: store.clone(),
                chunks,
                ask: DeltaAsk {
                    nar: manifest.nar_hash,
                    bases: nars,
                },
            }))
        }
        Ok(_) => None,
        Err(e) => {
            warn!(error = %e, "cannot look for older versions to offer as delta bases");
            None
        }
    }
}
