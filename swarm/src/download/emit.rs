//! Handing the NAR to the caller in NAR order, as its chunks arrive or from the store, with
//! the NarHash checked before the last chunk goes out.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use peerix_chunkstore::{ChunkId, ChunkStore, Manifest};
use peerix_nix::{Sha256Hash, StorePath};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch, Notify};

use super::DownloadError;

/// Downloaded chunks not yet handed to the caller. Their bytes are kept in memory up to
/// [`ARRIVALS_IN_MEMORY`]; past that (peers faster than the caller reads) only the fact that
/// they arrived is, and the emitter reads them back from the store, where every chunk is put
/// as it arrives. Memory then stays flat whatever the window and the NAR's size.
#[derive(Default)]
pub(super) struct Arrivals {
    chunks: Mutex<ArrivedChunks>,
    arrived: Notify,
}

#[derive(Default)]
struct ArrivedChunks {
    /// `None`: arrived and stored, bytes not kept.
    map: HashMap<ChunkId, Option<Bytes>>,
    bytes: usize,
}

/// Chunk bytes a download keeps in memory for the emitter.
pub const ARRIVALS_IN_MEMORY: usize = 8 << 20;

impl Arrivals {
    pub(super) fn insert(&self, id: ChunkId, data: Bytes) {
        let mut a = self.chunks.lock().expect("arrivals");
        let kept = if a.bytes + data.len() <= ARRIVALS_IN_MEMORY {
            a.bytes += data.len();
            Some(data)
        } else {
            None
        };
        a.map.insert(id, kept);
        drop(a);
        self.arrived.notify_one();
    }

    /// `Some(Some(bytes))`, `Some(None)` (read it from the store), or `None` (not arrived).
    fn take(&self, id: &ChunkId) -> Option<Option<Bytes>> {
        let mut a = self.chunks.lock().expect("arrivals");
        let got = a.map.remove(id)?;
        if let Some(d) = &got {
            a.bytes -= d.len();
        }
        Some(got)
    }
}

/// Hand the NAR to `out` in order; returns the bytes that came from the local store.
pub(super) async fn emit(
    store: ChunkStore,
    manifest: Arc<Manifest>,
    mut need: HashSet<ChunkId>,
    buf: Arc<Arrivals>,
    out: mpsc::Sender<Bytes>,
    progress: watch::Sender<u64>,
    path: Option<StorePath>,
) -> Result<u64, DownloadError> {
    let mut sha = Sha256::new();
    let mut local = 0u64;
    let mut offset = 0u64;
    let n = manifest.chunks.len();
    let mut last = None;
    for (i, c) in manifest.chunks.iter().enumerate() {
        let data = if need.remove(&c.id) {
            let kept = loop {
                // notify_one keeps a permit when nobody waits, so no arrival is missed.
                if let Some(d) = buf.take(&c.id) {
                    break d;
                }
                buf.arrived.notified().await;
            };
            match kept {
                Some(d) => d,
                None => {
                    let id = c.id;
                    Bytes::from(store.blocking(move |cs| cs.read_chunk(&id)).await?)
                }
            }
        } else {
            // Held before, or downloaded and stored at an earlier place in this NAR.
            local += u64::from(c.len);
            let id = c.id;
            Bytes::from(store.blocking(move |cs| cs.read_chunk(&id)).await?)
        };
        // Whatever its source, a chunk is handed on only at the manifest's length: a manifest
        // that gives a held chunk another length would otherwise fill the NAR's size before its
        // end, with bytes the NarHash never vouched for.
        if data.len() != c.len as usize {
            return Err(DownloadError::ChunkLength {
                chunk: c.id,
                claimed: c.len,
                actual: data.len(),
            });
        }
        sha.update(&data);
        offset += data.len() as u64;
        if i + 1 == n {
            last = Some(data);
        } else {
            out.send(data)
                .await
                .map_err(|_| DownloadError::OutputClosed)?;
        }
        let _ = progress.send(offset);
    }
    let got = Sha256Hash(sha.finalize().into());
    if got != manifest.nar_hash {
        return Err(DownloadError::NarHashMismatch {
            expected: manifest.nar_hash,
            got,
        });
    }
    let h = manifest.nar_hash;
    store
        .blocking(move |cs| cs.finish_download(&h, path.as_ref()))
        .await?;
    if let Some(d) = last {
        out.send(d).await.map_err(|_| DownloadError::OutputClosed)?;
    }
    Ok(local)
}
