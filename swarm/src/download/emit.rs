//! Handing the NAR to the caller in NAR order, as its chunks arrive or from the store, with
//! the NarHash checked before the last chunk goes out.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use peerix_chunkstore::{buffers, ChunkStore, Manifest};
use peerix_nix::{Sha256Hash, StorePath};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

use super::wanted::{Flags, Want, Wanted};
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
    map: HashMap<Want, Option<Bytes>>,
    bytes: usize,
}

/// Chunk bytes a download keeps in memory for the emitter.
pub const ARRIVALS_IN_MEMORY: usize = 8 << 20;

impl Arrivals {
    pub(super) fn insert(&self, k: Want, data: Bytes) {
        let mut a = self.chunks.lock().expect("arrivals");
        let kept = if a.bytes + data.len() <= ARRIVALS_IN_MEMORY {
            a.bytes += data.len();
            Some(data)
        } else {
            None
        };
        a.map.insert(k, kept);
        drop(a);
        self.arrived.notify_one();
    }

    /// Whether the chunk arrived: `Some(true)` with its bytes kept, `Some(false)` stored only,
    /// `None` not yet.
    fn arrived(&self, k: Want) -> Option<bool> {
        let a = self.chunks.lock().expect("arrivals");
        a.map.get(&k).map(Option::is_some)
    }

    /// `Some(Some(bytes))`, `Some(None)` (read it from the store), or `None` (not arrived).
    fn take(&self, k: Want) -> Option<Option<Bytes>> {
        let mut a = self.chunks.lock().expect("arrivals");
        let got = a.map.remove(&k)?;
        if let Some(d) = &got {
            a.bytes -= d.len();
        }
        Some(got)
    }
}

/// Chunks read from the store ahead of the output, while the emitter hashes and hands on the
/// ones before them: a read and its BLAKE3 check take about as long as the SHA-256 of the
/// chunk, and done one after the other they made the output wait, most of all at the end of a
/// download from many peers, when what arrived past [`ARRIVALS_IN_MEMORY`] is read back at once.
const READ_AHEAD: usize = 4;

type Read = tokio::task::JoinHandle<peerix_chunkstore::Result<Vec<u8>>>;

/// Which chunks after the one being emitted can be read from the store already, and the reads
/// started for them.
#[derive(Default)]
struct ReadAhead {
    /// Manifest positions whose reads are started, in order.
    reads: VecDeque<(usize, Read)>,
    /// The next position to look at.
    next: usize,
}

impl ReadAhead {
    /// Start reads for the chunks after position `at` that can be read now, up to
    /// [`READ_AHEAD`]; stop at the first that has not arrived yet. `need` is the emitter's:
    /// what is not in it is in the store (held before the download, or an earlier occurrence
    /// of it has been emitted).
    fn top_up(&mut self, at: usize, src: &Sources, need: &Flags, buf: &Arrivals) {
        self.next = self.next.max(at + 1);
        while self.reads.len() < READ_AHEAD {
            let Some(c) = src.manifest.chunks.get(self.next) else {
                return;
            };
            match src.wanted.at(self.next).filter(|&k| need.get(k)) {
                None => self.start(c.id, &src.store),
                // A chunk that occurs twice is met first where it is needed first (the
                // look-ahead goes in order), so a later occurrence never takes the arrival an
                // earlier one waits for: once an earlier one took it, this one finds nothing
                // and waits.
                Some(k) => {
                    match buf.arrived(k) {
                        None => return,
                        // Its bytes are at hand already.
                        Some(true) => {}
                        Some(false) => {
                            buf.take(k);
                            self.start(c.id, &src.store);
                        }
                    }
                }
            }
            self.next += 1;
        }
    }

    fn start(&mut self, id: peerix_chunkstore::ChunkId, store: &ChunkStore) {
        let store = store.clone();
        let read = tokio::task::spawn_blocking(move || store.read_chunk(&id));
        self.reads.push_back((self.next, read));
    }

    /// The read started for position `at`, if any.
    fn take(&mut self, at: usize) -> Option<Read> {
        if self.reads.front().is_some_and(|(i, _)| *i == at) {
            self.reads.pop_front().map(|(_, r)| r)
        } else {
            None
        }
    }
}

impl Drop for ReadAhead {
    /// Reads of an emitter that stopped early are of no use.
    fn drop(&mut self) {
        for (_, r) in &self.reads {
            r.abort();
        }
    }
}

/// Where the emitter's chunks come from: the download (those `wanted`) or the store.
pub(super) struct Sources {
    pub(super) store: ChunkStore,
    pub(super) manifest: Arc<Manifest>,
    pub(super) wanted: Arc<Wanted>,
}

/// What the emitter did.
pub(super) struct Emitted {
    /// Bytes of the NAR that came from the local store.
    pub(super) local: u64,
    /// When the whole NAR, verified, had gone to the output (the commit to the store follows).
    pub(super) complete: Instant,
}

/// Hand the NAR to `out` in order, then commit the download to the store.
pub(super) async fn emit(
    src: Sources,
    buf: Arc<Arrivals>,
    out: mpsc::Sender<Bytes>,
    progress: watch::Sender<u64>,
    path: Option<StorePath>,
) -> Result<Emitted, DownloadError> {
    let mut sha = Sha256::new();
    let mut local = 0u64;
    let mut offset = 0u64;
    let Sources {
        store,
        manifest,
        wanted,
    } = &src;
    // Wanted chunks whose first occurrence is still to be handed on.
    let mut need = Flags::new(wanted.len(), true);
    let n = manifest.chunks.len();
    let mut last = None;
    let mut ahead = ReadAhead::default();
    for (i, c) in manifest.chunks.iter().enumerate() {
        ahead.top_up(i, &src, &need, &buf);
        // The download's arrival is this occurrence's, the first.
        let arriving = wanted.at(i).filter(|&k| need.remove(k));
        let data = if let Some(read) = ahead.take(i) {
            if arriving.is_none() {
                local += u64::from(c.len);
            }
            buffers::into_bytes(read.await.map_err(peerix_chunkstore::Error::Join)??)
        } else if let Some(k) = arriving {
            let kept = loop {
                // notify_one keeps a permit when nobody waits, so no arrival is missed.
                if let Some(d) = buf.take(k) {
                    break d;
                }
                buf.arrived.notified().await;
            };
            match kept {
                Some(d) => d,
                None => {
                    let id = c.id;
                    buffers::into_bytes(store.blocking(move |cs| cs.read_chunk(&id)).await?)
                }
            }
        } else {
            // Held before, or downloaded and stored at an earlier place in this NAR.
            local += u64::from(c.len);
            let id = c.id;
            buffers::into_bytes(store.blocking(move |cs| cs.read_chunk(&id)).await?)
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
    // Verified: the last chunk goes out and the output closes, so the caller has the whole NAR
    // while it is committed. The commit waits for the puts not yet durable and, on a warm
    // download, copies the chunks held in place into packs: milliseconds to tens of them that
    // Nix, importing the NAR meanwhile, need not wait for.
    let handed = match last {
        Some(d) => out.send(d).await.is_ok(),
        None => true,
    };
    drop(out);
    let complete = Instant::now();
    let h = manifest.nar_hash;
    store
        .blocking(move |cs| cs.finish_download(&h, path.as_ref()))
        .await?;
    tracing::debug!(nar = %h, took = ?complete.elapsed(), "download committed");
    if !handed {
        return Err(DownloadError::OutputClosed);
    }
    Ok(Emitted { local, complete })
}
