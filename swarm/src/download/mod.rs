//! The multi-peer downloader: one NAR from many peers at once, BitTorrent-style.
//!
//! The missing chunks are cut into runs of consecutive chunks (about `run_bytes` each) that
//! some peer holds in full; runs go to peers in NAR order, each peer keeping as many requests
//! in flight as its measured rate warrants. Chunks are verified and stored as they arrive, and
//! handed to the caller in NAR order while the rest still downloads; the last chunk is held
//! back until the whole NAR has matched its NarHash, so a caller that saw the stream end
//! cleanly has the exact NAR. The output closes with that chunk; the download is committed to
//! the store after it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use libp2p::PeerId;
use peerix_chunkstore::{ChunkId, ChunkStore, Manifest};
use peerix_nix::{Sha256Hash, StorePath};
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::client::Client;

mod emit;
mod scheduler;
mod wanted;
mod wire;

pub use emit::ARRIVALS_IN_MEMORY;
use emit::{emit, Arrivals, Sources};
use scheduler::Scheduler;
use wire::delta_bases;
pub use wire::{Compression, WireConfig};

#[derive(Clone, Debug)]
pub struct DownloadConfig {
    /// Bytes per request (a run of consecutive chunks; at least one chunk).
    pub run_bytes: u64,
    /// Requests a peer starts with before its rate is known.
    pub initial_in_flight: usize,
    /// Fewest requests in flight to a peer with room: with two, the next run is already on its
    /// way while one round trip passes, whatever the peer's rate.
    pub min_in_flight: usize,
    /// Most requests in flight to one peer.
    pub max_in_flight: usize,
    /// Each peer is given about this much work in flight, at its measured rate. Short, because
    /// a peer answers its requests side by side: the deeper its queue, the longer the run the
    /// output waits on takes, and the more work is left unevenly spread at the end.
    pub target_queue: Duration,
    /// Runs are only requested this far ahead of what has been handed to the caller, which
    /// keeps the download in NAR order: this, or room for `min_in_flight` runs of every peer
    /// when that is more, so that many peers are not held back while the run the output waits
    /// on is late. No wider, because each request in flight holds a stream's buffers (arrivals
    /// past [`ARRIVALS_IN_MEMORY`] are read back from the store, so the chunks themselves do
    /// not add up in memory).
    pub window_bytes: u64,
    /// Failed requests (errors, timeouts) after which a peer is dropped for this download.
    pub max_failures: u32,
    /// Request timeout: the larger of these two.
    pub min_timeout: Duration,
    pub timeout_per_mib: Duration,
    /// How long to leave a peer that answered Busy alone.
    pub busy_backoff: Duration,
    /// How long to leave a peer alone after its first failure (doubled for each next one), so
    /// a connection that closed can be dialled again, or a restarting peer come back, before
    /// the peer is given up.
    pub failure_backoff: Duration,
    /// The store path the NAR belongs to, recorded when the download is finished (and whose
    /// older versions, held here, are offered as delta bases).
    pub path: Option<StorePath>,
    /// How chunks are asked to travel.
    pub wire: WireConfig,
}

impl Default for DownloadConfig {
    fn default() -> Self {
        Self {
            run_bytes: 2 * 1024 * 1024,
            initial_in_flight: 2,
            min_in_flight: 2,
            max_in_flight: 8,
            target_queue: Duration::from_millis(250),
            window_bytes: 16 * 1024 * 1024,
            max_failures: 4,
            min_timeout: Duration::from_secs(4),
            timeout_per_mib: Duration::from_secs(4),
            busy_backoff: Duration::from_millis(250),
            failure_backoff: Duration::from_millis(500),
            path: None,
            wire: WireConfig::default(),
        }
    }
}

/// Whom a download asks for chunks.
#[derive(Clone, Debug, Default)]
pub struct Peers {
    /// Peers that said they hold the whole NAR (they answered a lookup for its path, or gave
    /// its manifest): given runs at once, without first asking which chunks they hold. One
    /// that turns out to lack some is asked for them no more.
    pub whole: Vec<PeerId>,
    /// Peers that may hold some of its chunks: asked which, and given runs as their answers
    /// come in. The download waits for the answers only when no peer of `whole` is left.
    pub some: Vec<PeerId>,
}

/// Peers of which nothing is known: each is asked which chunks it holds.
impl From<Vec<PeerId>> for Peers {
    fn from(some: Vec<PeerId>) -> Self {
        Self {
            whole: vec![],
            some,
        }
    }
}

impl FromIterator<PeerId> for Peers {
    fn from_iter<I: IntoIterator<Item = PeerId>>(iter: I) -> Self {
        Vec::from_iter(iter).into()
    }
}

#[derive(Clone, Debug, Default)]
pub struct DownloadReport {
    /// Verified chunk bytes received from each peer, endgame duplicates included.
    pub bytes_per_peer: HashMap<PeerId, u64>,
    /// Bytes of the NAR that came from the local store.
    pub bytes_local: u64,
    /// Bytes received twice (the endgame's cost).
    pub duplicate_bytes: u64,
    /// Chunk bytes as they came over the wire (compressed or not), endgame duplicates included.
    pub wire_bytes: u64,
    /// Chunk bytes compression and deltas saved on the wire.
    pub saved_by_compression: u64,
    pub saved_by_delta: u64,
    /// Peers that sent chunks not matching their ids: the node should ban them.
    pub bad_peers: Vec<PeerId>,
    pub elapsed: Duration,
    /// When the whole NAR, verified, had gone to the output, from the download's start: what
    /// the caller waited for. The commit to the store takes the rest of `elapsed`.
    pub complete: Duration,
    /// When each peer's last chunk arrived, from the download's start: its link stood idle
    /// from then to the end (the endgame's cost; the bench's `tail`).
    pub last_chunk: HashMap<PeerId, Duration>,
}

#[derive(Debug, Error)]
pub enum DownloadError {
    #[error("bad manifest: {0}")]
    BadManifest(#[source] peerix_chunkstore::Error),
    #[error("chunk store: {0}")]
    Store(#[from] peerix_chunkstore::Error),
    #[error("no usable peer has chunk {chunk} ({missing} chunks still missing)")]
    Unavailable { chunk: ChunkId, missing: usize },
    /// A chunk (from a peer, or one already held) is not as long as the manifest says: the
    /// manifest lied. Nothing of that chunk was handed out.
    #[error("chunk {chunk} is {actual} bytes long, the manifest says {claimed}")]
    ChunkLength {
        chunk: ChunkId,
        claimed: u32,
        actual: usize,
    },
    /// The chunks were all right but the NAR they make is not the one the manifest named:
    /// whoever supplied the manifest lied. Nothing of the NAR's last chunk was handed out.
    #[error("the downloaded NAR hashes to {got}, its manifest says {expected}")]
    NarHashMismatch {
        expected: Sha256Hash,
        got: Sha256Hash,
    },
    #[error("the receiver of the NAR went away")]
    OutputClosed,
}

impl DownloadError {
    /// The manifest did not describe the NAR it named: whoever supplied it lied.
    pub fn is_manifest_lie(&self) -> bool {
        matches!(
            self,
            Self::BadManifest(_) | Self::ChunkLength { .. } | Self::NarHashMismatch { .. }
        )
    }
}

/// How a download ended. The report is kept on failure too: peers that sent bad chunks are
/// named in it whatever the outcome, so the caller can ban them.
#[derive(Debug)]
pub struct DownloadOutcome {
    pub report: DownloadReport,
    pub result: Result<(), DownloadError>,
}

impl DownloadOutcome {
    pub fn into_result(self) -> Result<DownloadReport, DownloadError> {
        self.result.map(|()| self.report)
    }
}

/// Download the NAR `manifest` describes from `peers`, streaming it to `out` in order.
///
/// Every chunk handed to `out` has exactly the length the manifest gives it, and the last one
/// is handed out only once the whole NAR matched its NarHash; `out` is dropped right after it,
/// and this returns once the NAR is committed to the store.
pub async fn download(
    client: Client,
    store: ChunkStore,
    manifest: Manifest,
    peers: Peers,
    cfg: DownloadConfig,
    out: mpsc::Sender<Bytes>,
) -> DownloadOutcome {
    if let Err(e) = manifest.validate() {
        return DownloadOutcome {
            report: DownloadReport::default(),
            result: Err(DownloadError::BadManifest(e)),
        };
    }
    let started = Instant::now();
    let nar_hash = manifest.nar_hash;
    let manifest = Arc::new(manifest);
    {
        let m = manifest.clone();
        if let Err(e) = store.blocking(move |cs| cs.begin_download(&m)).await {
            return DownloadOutcome {
                report: DownloadReport::default(),
                result: Err(e.into()),
            };
        }
    }
    let (mut report, result) = run(client, store.clone(), manifest, peers, cfg, out, started).await;
    report.elapsed = started.elapsed();
    match &result {
        Ok(()) => {
            info!(nar = %nar_hash, elapsed = ?report.elapsed, local = report.bytes_local,
                dup = report.duplicate_bytes, "download finished");
        }
        Err(e) => {
            warn!(nar = %nar_hash, error = %e, bad_peers = report.bad_peers.len(), "download failed");
            // A manifest that lied is dropped; otherwise what arrived is kept, so a retry
            // (Nix retries a failed substitution) fetches only the rest.
            let lied = e.is_manifest_lie();
            let r = store
                .blocking(move |cs| {
                    if lied {
                        cs.abort_download(&nar_hash)
                    } else {
                        cs.suspend_download(&nar_hash)
                    }
                })
                .await;
            if let Err(ae) = r {
                warn!(nar = %nar_hash, error = %ae, "cannot update the download record");
            }
        }
    }
    DownloadOutcome { report, result }
}

async fn run(
    client: Client,
    store: ChunkStore,
    manifest: Arc<Manifest>,
    peers: Peers,
    cfg: DownloadConfig,
    out: mpsc::Sender<Bytes>,
    started: Instant,
) -> (DownloadReport, Result<(), DownloadError>) {
    let missing = {
        let m = manifest.clone();
        match store.blocking(move |cs| cs.missing(&m)).await {
            Ok(m) => m,
            Err(e) => return (DownloadReport::default(), Err(e.into())),
        }
    };
    let bases = match (&cfg.path, cfg.wire.deltas) {
        (Some(path), true) if !missing.is_empty() => delta_bases(&store, &manifest, path).await,
        _ => None,
    };
    let wanted = Arc::new(wanted::Wanted::new(&manifest, missing));
    let buf = Arc::new(Arrivals::default());
    let (progress_tx, progress_rx) = watch::channel(0u64);

    let emitter = emit(
        Sources {
            store: store.clone(),
            manifest,
            wanted: wanted.clone(),
        },
        buf.clone(),
        out,
        progress_tx,
        cfg.path.clone(),
    );
    let mut sched = Scheduler::new(client, store, wanted, peers, cfg, buf, started);
    sched.bases = bases;
    let result = {
        let scheduling = sched.run(progress_rx);
        tokio::pin!(emitter, scheduling);
        let mut scheduled = false;
        loop {
            tokio::select! {
                r = &mut scheduling, if !scheduled => {
                    if let Err(e) = r {
                        break Err(e);
                    }
                    scheduled = true;
                }
                r = &mut emitter => break r,
            }
        }
    };
    sched.tasks.abort_all();
    let mut report = std::mem::take(&mut sched.report);
    match result {
        Ok(e) => {
            report.bytes_local = e.local;
            report.complete = e.complete - started;
            (report, Ok(()))
        }
        Err(e) => (report, Err(e)),
    }
}
