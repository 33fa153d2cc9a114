//! The multi-peer downloader: one NAR from many peers at once, BitTorrent-style.
//!
//! The missing chunks are cut into runs of consecutive chunks (about `run_bytes` each) that
//! some peer holds in full; runs go to peers in NAR order, each peer keeping as many requests
//! in flight as its measured rate warrants. Chunks are verified and stored as they arrive, and
//! handed to the caller in NAR order while the rest still downloads; the last chunk is held
//! back until the whole NAR has matched its NarHash, so a caller that saw the stream end
//! cleanly has the exact NAR.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use libp2p::PeerId;
use peerix_chunkstore::{ChunkId, ChunkRef, ChunkStore, Manifest};
use peerix_nix::{Sha256Hash, StorePath};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::client::{Client, ClientError};
use crate::protocol::{MAX_CHUNKS_PER_REQUEST, MAX_CHUNK_BYTES_PER_REQUEST, MAX_HAVE_CHUNKS};

#[derive(Clone, Debug)]
pub struct DownloadConfig {
    /// Bytes per request (a run of consecutive chunks; at least one chunk).
    pub run_bytes: u64,
    /// Requests a peer starts with before its rate is known.
    pub initial_in_flight: usize,
    /// Most requests in flight to one peer.
    pub max_in_flight: usize,
    /// Each peer is given about this much work in flight, at its measured rate.
    pub target_queue: Duration,
    /// Runs are only requested this far ahead of what has been handed to the caller, which
    /// bounds the chunk bytes held in memory.
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
    /// The store path the NAR belongs to, recorded when the download is finished.
    pub path: Option<StorePath>,
}

impl Default for DownloadConfig {
    fn default() -> Self {
        Self {
            run_bytes: 2 * 1024 * 1024,
            initial_in_flight: 2,
            max_in_flight: 16,
            target_queue: Duration::from_secs(1),
            window_bytes: 64 * 1024 * 1024,
            max_failures: 4,
            min_timeout: Duration::from_secs(4),
            timeout_per_mib: Duration::from_secs(4),
            busy_backoff: Duration::from_millis(250),
            failure_backoff: Duration::from_millis(500),
            path: None,
        }
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
    /// Peers that sent chunks not matching their ids: the node should ban them.
    pub bad_peers: Vec<PeerId>,
    pub elapsed: Duration,
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
/// is handed out only once the whole NAR matched its NarHash.
pub async fn download(
    client: Client,
    store: ChunkStore,
    manifest: Manifest,
    peers: Vec<PeerId>,
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
    let (mut report, result) = run(client, store.clone(), manifest, peers, cfg, out).await;
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
    peers: Vec<PeerId>,
    cfg: DownloadConfig,
    out: mpsc::Sender<Bytes>,
) -> (DownloadReport, Result<(), DownloadError>) {
    let missing = {
        let m = manifest.clone();
        match store.blocking(move |cs| cs.missing(&m)).await {
            Ok(m) => m,
            Err(e) => return (DownloadReport::default(), Err(e.into())),
        }
    };
    let need: HashSet<ChunkId> = missing.iter().map(|c| c.id).collect();
    let buf = Arc::new(Arrivals::default());
    let (progress_tx, progress_rx) = watch::channel(0u64);

    let emitter = emit(
        store.clone(),
        manifest.clone(),
        need,
        buf.clone(),
        out,
        progress_tx,
        cfg.path.clone(),
    );
    let mut sched = Scheduler::new(client, store, &manifest, missing, peers, cfg, buf);
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
        Ok(local) => {
            report.bytes_local = local;
            (report, Ok(()))
        }
        Err(e) => (report, Err(e)),
    }
}

/// Downloaded chunks not yet handed to the caller. Their bytes are kept in memory up to
/// [`ARRIVALS_IN_MEMORY`]; past that (peers faster than the caller reads) only the fact that
/// they arrived is, and the emitter reads them back from the store, where every chunk is put
/// as it arrives. Memory then stays flat whatever the window and the NAR's size.
#[derive(Default)]
struct Arrivals {
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
    fn insert(&self, id: ChunkId, data: Bytes) {
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
async fn emit(
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

type ReqId = u64;

struct Run {
    /// Chunks not yet received.
    chunks: Vec<ChunkRef>,
    /// NAR offset of the first chunk, for the window.
    offset: u64,
    /// Peers (indices) that hold every chunk of the run.
    holders: Vec<usize>,
    requests: Vec<ReqId>,
    done: bool,
}

struct Peer {
    id: PeerId,
    in_flight: usize,
    target: f64,
    /// Bytes per second, smoothed.
    rate: Option<f64>,
    failures: u32,
    /// When the last counted failure happened.
    failed_at: Option<Instant>,
    /// Dropped for repeated failures or banned for bad chunks: given no more work.
    gone: bool,
    busy_until: Option<Instant>,
}

struct Req {
    peer: usize,
    run: usize,
    started: Instant,
    in_flight_at_start: usize,
    bytes: u64,
    abort: AbortHandle,
}

enum Event {
    Chunk {
        req: ReqId,
        peer: usize,
        id: ChunkId,
        data: Bytes,
    },
    Done {
        req: ReqId,
        result: Result<(), TaskError>,
    },
}

#[derive(Debug, Error)]
enum TaskError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("store: {0}")]
    Store(#[from] peerix_chunkstore::Error),
    #[error("timed out")]
    Timeout,
    /// The peer no longer had some chunks of the run.
    #[error("missing chunks")]
    Missing,
}

struct Scheduler {
    client: Client,
    store: ChunkStore,
    cfg: DownloadConfig,
    peers: Vec<Peer>,
    runs: Vec<Run>,
    /// Runs waiting for a peer, by index (= NAR order).
    pending: BTreeSet<usize>,
    /// Chunks to download, and those received.
    wanted: usize,
    received: HashSet<ChunkId>,
    reqs: HashMap<ReqId, Req>,
    next_req: ReqId,
    tasks: JoinSet<()>,
    events_tx: mpsc::UnboundedSender<Event>,
    events: mpsc::UnboundedReceiver<Event>,
    buf: Arc<Arrivals>,
    report: DownloadReport,
    /// Chunks in NAR order, for building runs once `have` answers are in.
    missing: Vec<ChunkRef>,
    offsets: HashMap<ChunkId, u64>,
    /// When a request holding up the window becomes late enough to race.
    recheck: Option<Instant>,
}

impl Scheduler {
    fn new(
        client: Client,
        store: ChunkStore,
        manifest: &Manifest,
        missing: Vec<ChunkRef>,
        peers: Vec<PeerId>,
        mut cfg: DownloadConfig,
        buf: Arc<Arrivals>,
    ) -> Self {
        cfg.run_bytes = cfg.run_bytes.clamp(1, MAX_CHUNK_BYTES_PER_REQUEST as u64);
        cfg.max_in_flight = cfg.max_in_flight.max(1);
        let mut offsets = HashMap::new();
        for (o, c) in manifest.offsets() {
            offsets.entry(c.id).or_insert(o);
        }
        let mut seen = HashSet::new();
        let peers = peers
            .into_iter()
            .filter(|p| seen.insert(*p))
            .map(|id| Peer {
                id,
                in_flight: 0,
                target: cfg.initial_in_flight.clamp(1, cfg.max_in_flight) as f64,
                rate: None,
                failures: 0,
                failed_at: None,
                gone: false,
                busy_until: None,
            })
            .collect();
        let (events_tx, events) = mpsc::unbounded_channel();
        Self {
            client,
            store,
            cfg,
            peers,
            runs: vec![],
            pending: BTreeSet::new(),
            wanted: missing.len(),
            received: HashSet::new(),
            reqs: HashMap::new(),
            next_req: 0,
            tasks: JoinSet::new(),
            events_tx,
            events,
            buf,
            report: DownloadReport::default(),
            missing,
            offsets,
            recheck: None,
        }
    }

    async fn run(&mut self, mut progress: watch::Receiver<u64>) -> Result<(), DownloadError> {
        if self.wanted == 0 {
            return Ok(());
        }
        self.plan().await?;
        let mut emitter_alive = true;
        while self.received.len() < self.wanted {
            self.dispatch(*progress.borrow())?;
            let wake = self
                .peers
                .iter()
                .filter(|p| !p.gone)
                .filter_map(|p| p.busy_until)
                .chain(self.recheck)
                .min();
            tokio::select! {
                ev = self.events.recv() => {
                    // We hold a sender, so the channel never closes.
                    if let Some(ev) = ev {
                        self.on_event(ev)?;
                    }
                }
                r = progress.changed(), if emitter_alive => emitter_alive = r.is_ok(),
                _ = sleep_until(wake), if wake.is_some() => {
                    let now = Instant::now();
                    for p in &mut self.peers {
                        if p.busy_until.is_some_and(|t| t <= now) {
                            p.busy_until = None;
                        }
                    }
                }
            }
            while let Some(r) = self.tasks.try_join_next() {
                if let Err(e) = r {
                    if e.is_panic() {
                        warn!(error = %e, "download request task panicked");
                    }
                }
            }
        }
        // Endgame losers still running: they are of no use now.
        self.tasks.abort_all();
        Ok(())
    }

    /// Ask every peer which of the missing chunks it holds and cut them into runs.
    async fn plan(&mut self) -> Result<(), DownloadError> {
        let ids: Vec<ChunkId> = self.missing.iter().map(|c| c.id).collect();
        let asks = self.peers.iter().map(|p| {
            let client = self.client.clone();
            let peer = p.id;
            let ids = &ids;
            async move {
                let mut held = Vec::with_capacity(ids.len());
                for batch in ids.chunks(MAX_HAVE_CHUNKS) {
                    let r = client.have(peer, batch, &[]).await?;
                    held.extend(r.chunks);
                }
                Ok::<_, ClientError>(held)
            }
        });
        let answers = futures::future::join_all(asks).await;
        let mut holds: Vec<Option<Vec<bool>>> = vec![];
        for (p, a) in self.peers.iter_mut().zip(answers) {
            match a {
                Ok(h) => holds.push(Some(h)),
                Err(e) => {
                    debug!(peer = %p.id, error = %e, "have failed; not using peer");
                    if e.is_misbehaviour() {
                        self.report.bad_peers.push(p.id);
                    }
                    p.gone = true;
                    holds.push(None);
                }
            }
        }
        let holders_of = |i: usize| -> Vec<usize> {
            holds
                .iter()
                .enumerate()
                .filter(|(_, h)| h.as_ref().is_some_and(|h| h[i]))
                .map(|(p, _)| p)
                .collect()
        };
        let mut cur: Vec<ChunkRef> = vec![];
        let mut cur_holders: Vec<usize> = vec![];
        let mut cur_bytes = 0u64;
        let missing = std::mem::take(&mut self.missing);
        for (i, c) in missing.iter().enumerate() {
            let h = holders_of(i);
            if h.is_empty() {
                return Err(DownloadError::Unavailable {
                    chunk: c.id,
                    missing: missing.len(),
                });
            }
            let common: Vec<usize> = cur_holders
                .iter()
                .copied()
                .filter(|p| h.contains(p))
                .collect();
            if !cur.is_empty()
                && (common.is_empty()
                    || cur_bytes + u64::from(c.len) > self.cfg.run_bytes
                    || cur.len() >= MAX_CHUNKS_PER_REQUEST)
            {
                let chunks = std::mem::take(&mut cur);
                self.push_run(chunks, std::mem::take(&mut cur_holders));
                cur_bytes = 0;
            }
            cur_holders = if cur.is_empty() { h } else { common };
            cur.push(*c);
            cur_bytes += u64::from(c.len);
        }
        if !cur.is_empty() {
            self.push_run(cur, cur_holders);
        }
        debug!(
            runs = self.runs.len(),
            chunks = self.wanted,
            "download planned"
        );
        Ok(())
    }

    fn push_run(&mut self, chunks: Vec<ChunkRef>, holders: Vec<usize>) {
        let offset = self.offsets.get(&chunks[0].id).copied().unwrap_or(0);
        self.pending.insert(self.runs.len());
        self.runs.push(Run {
            chunks,
            offset,
            holders,
            requests: vec![],
            done: false,
        });
    }

    fn usable(&self, p: usize) -> bool {
        let p = &self.peers[p];
        !p.gone && p.busy_until.is_none()
    }

    fn has_room(&self, p: usize) -> bool {
        let peer = &self.peers[p];
        self.usable(p) && (peer.in_flight as f64) < peer.target.floor().max(1.0)
    }

    /// The peer with the most spare room among `holders`, not already serving `run`.
    fn pick(&self, run: usize) -> Option<usize> {
        let r = &self.runs[run];
        r.holders
            .iter()
            .copied()
            .filter(|&p| self.has_room(p))
            .filter(|&p| !r.requests.iter().any(|q| self.reqs[q].peer == p))
            .min_by(|&a, &b| {
                let load = |p: usize| self.peers[p].in_flight as f64 / self.peers[p].target;
                load(a).total_cmp(&load(b))
            })
    }

    fn dispatch(&mut self, emitted: u64) -> Result<(), DownloadError> {
        let limit = emitted.saturating_add(self.cfg.window_bytes);
        // Pending runs in NAR order, within the window (the first run always, else nothing
        // could ever start).
        let candidates: Vec<usize> = self.pending.iter().copied().collect();
        for run in candidates {
            if self.runs[run].offset >= limit && !self.reqs.is_empty() {
                break;
            }
            if let Some(p) = self.pick(run) {
                self.start(run, p);
            } else if !self.runs[run].holders.iter().any(|&p| !self.peers[p].gone) {
                return Err(DownloadError::Unavailable {
                    chunk: self.runs[run].chunks[0].id,
                    missing: self.wanted - self.received.len(),
                });
            }
        }
        // Endgame: once every run is assigned, idle peers race the requests still in flight,
        // oldest first; whichever answers first wins and the other is dropped. While runs
        // wait beyond the window, only the run the output is waiting on is raced: racing the
        // rest would only duplicate work that is on its way anyway.
        let pending_startable = self
            .pending
            .iter()
            .any(|&r| self.runs[r].offset < limit && self.pick(r).is_some());
        if pending_startable {
            return Ok(());
        }
        let endgame = self.pending.is_empty();
        let now = Instant::now();
        self.recheck = None;
        let mut racing: Vec<usize> = vec![];
        for r in self.reqs.values() {
            let run = &self.runs[r.run];
            if run.requests.len() != 1 || run.done {
                continue;
            }
            if !endgame {
                if run.offset > emitted {
                    continue;
                }
                // Held up by the window: race the run the output waits on only once it is
                // late, or a fast peer would race nearly every run.
                let late = r.started + self.overdue(r);
                if late > now {
                    self.recheck = Some(self.recheck.map_or(late, |t: Instant| t.min(late)));
                    continue;
                }
            }
            racing.push(r.run);
        }
        racing.sort_unstable();
        racing.dedup();
        for run in racing {
            // Only idle peers race: one still busy with its own runs gains nothing by it.
            if let Some(p) = self.pick(run).filter(|&p| self.peers[p].in_flight == 0) {
                debug!(run, peer = %self.peers[p].id, endgame, "racing a request");
                self.start(run, p);
            }
        }
        Ok(())
    }

    /// When a request is late: twice what the peer's rate predicts, at least `target_queue`.
    fn overdue(&self, r: &Req) -> Duration {
        let bytes: u64 = self.runs[r.run]
            .chunks
            .iter()
            .map(|c| u64::from(c.len))
            .sum();
        let expected = self.peers[r.peer].rate.map_or(Duration::ZERO, |rate| {
            Duration::from_secs_f64((2.0 * bytes as f64 / rate.max(1.0)).min(3600.0))
        });
        expected.max(self.cfg.target_queue)
    }

    fn start(&mut self, run: usize, p: usize) {
        let id = self.next_req;
        self.next_req += 1;
        self.pending.remove(&run);
        let r = &mut self.runs[run];
        r.requests.push(id);
        let refs: Vec<ChunkRef> = r
            .chunks
            .iter()
            .copied()
            .filter(|c| !self.received.contains(&c.id))
            .collect();
        let bytes: u64 = refs.iter().map(|c| u64::from(c.len)).sum();
        let timeout = self.cfg.min_timeout.max(
            self.cfg
                .timeout_per_mib
                .mul_f64(bytes as f64 / (1024.0 * 1024.0)),
        );
        let peer = &mut self.peers[p];
        peer.in_flight += 1;
        let peer_id = peer.id;
        let fetch = self.client.fetch_chunks(peer_id, refs);
        let store = self.store.clone();
        let tx = self.events_tx.clone();
        let abort = self.tasks.spawn(async move {
            let work = async {
                tokio::pin!(fetch);
                let mut missing = false;
                while let Some(item) = fetch.next().await {
                    match item {
                        Ok(chunk) => {
                            let c = chunk.clone();
                            // Stored before it is reported, so it can be served to others at
                            // once and read back for a later occurrence in the NAR.
                            store.blocking(move |cs| cs.put_verified(&c)).await?;
                            let (cid, data) = chunk.into_parts();
                            let _ = tx.send(Event::Chunk {
                                req: id,
                                peer: p,
                                id: cid,
                                data,
                            });
                        }
                        Err(ClientError::Missing { .. }) => missing = true,
                        Err(e) => return Err(TaskError::Client(e)),
                    }
                }
                if missing {
                    Err(TaskError::Missing)
                } else {
                    Ok(())
                }
            };
            let result = match tokio::time::timeout(timeout, work).await {
                Ok(r) => r,
                Err(_) => Err(TaskError::Timeout),
            };
            let _ = tx.send(Event::Done { req: id, result });
        });
        self.reqs.insert(
            id,
            Req {
                peer: p,
                run,
                started: Instant::now(),
                in_flight_at_start: self.peers[p].in_flight,
                bytes: 0,
                abort,
            },
        );
    }

    fn on_event(&mut self, ev: Event) -> Result<(), DownloadError> {
        match ev {
            Event::Chunk {
                req,
                peer,
                id,
                data,
            } => {
                let len = data.len() as u64;
                if let Some(r) = self.reqs.get_mut(&req) {
                    r.bytes += len;
                }
                // Chunks from a request already dropped as an endgame loser count too.
                *self
                    .report
                    .bytes_per_peer
                    .entry(self.peers[peer].id)
                    .or_default() += len;
                if self.received.insert(id) {
                    self.buf.insert(id, data);
                } else {
                    self.report.duplicate_bytes += len;
                }
            }
            Event::Done { req, result } => {
                let Some(r) = self.reqs.remove(&req) else {
                    return Ok(());
                };
                self.peers[r.peer].in_flight -= 1;
                let run = r.run;
                self.runs[run].requests.retain(|q| *q != req);
                match result {
                    Ok(()) => self.on_success(&r),
                    Err(TaskError::Store(e)) => return Err(e.into()),
                    Err(TaskError::Client(ClientError::WrongLength {
                        id,
                        claimed,
                        actual,
                    })) => {
                        // The peer sent the right bytes; the manifest gave them a wrong length.
                        return Err(DownloadError::ChunkLength {
                            chunk: id,
                            claimed,
                            actual,
                        });
                    }
                    Err(e) => self.on_failure(&r, e),
                }
                let received = &self.received;
                self.runs[run].chunks.retain(|c| !received.contains(&c.id));
                if self.runs[run].chunks.is_empty() {
                    self.runs[run].done = true;
                    self.pending.remove(&run);
                    for q in std::mem::take(&mut self.runs[run].requests) {
                        if let Some(loser) = self.reqs.remove(&q) {
                            loser.abort.abort();
                            self.peers[loser.peer].in_flight -= 1;
                        }
                    }
                } else if self.runs[run].requests.is_empty() {
                    self.pending.insert(run);
                }
            }
        }
        Ok(())
    }

    fn on_success(&mut self, r: &Req) {
        let elapsed = r.started.elapsed().as_secs_f64().max(1e-3);
        // Requests in flight together share the peer's bandwidth: this one's rate times
        // their number estimates the peer's.
        let sample = r.bytes as f64 * r.in_flight_at_start as f64 / elapsed;
        let peer = &mut self.peers[r.peer];
        let rate = match peer.rate {
            Some(old) => 0.5 * old + 0.5 * sample,
            None => sample,
        };
        peer.rate = Some(rate);
        let want = rate * self.cfg.target_queue.as_secs_f64() / self.cfg.run_bytes as f64;
        peer.target = want.clamp(1.0, self.cfg.max_in_flight as f64);
        peer.failures = 0;
    }

    fn on_failure(&mut self, r: &Req, e: TaskError) {
        let p = r.peer;
        let peer_id = self.peers[p].id;
        match &e {
            TaskError::Client(ClientError::Busy { .. }) => {
                let peer = &mut self.peers[p];
                peer.busy_until = Some(Instant::now() + self.cfg.busy_backoff);
                peer.target = (peer.target - 1.0).max(1.0);
            }
            TaskError::Client(c) if c.is_misbehaviour() => {
                warn!(peer = %peer_id, error = %e, "peer sent bad data; banned for this download");
                if !self.report.bad_peers.contains(&peer_id) {
                    self.report.bad_peers.push(peer_id);
                }
                self.peers[p].gone = true;
                let own: Vec<ReqId> = self
                    .reqs
                    .iter()
                    .filter(|(_, q)| q.peer == p)
                    .map(|(id, _)| *id)
                    .collect();
                for q in own {
                    let q = self.reqs.remove(&q).expect("listed");
                    q.abort.abort();
                    self.peers[p].in_flight -= 1;
                    let run = &mut self.runs[q.run];
                    run.requests.retain(|x| self.reqs.contains_key(x));
                    if run.requests.is_empty() && !run.done {
                        self.pending.insert(q.run);
                    }
                }
            }
            TaskError::Missing => {
                debug!(peer = %peer_id, "peer no longer has some chunks");
                self.runs[r.run].holders.retain(|&h| h != p);
            }
            _ => {
                let peer = &mut self.peers[p];
                // Requests already in flight when the peer last failed fail with it (a
                // connection that closes takes all of them): one incident, counted once.
                if peer.failed_at.is_some_and(|t| r.started <= t) {
                    debug!(peer = %peer_id, error = %e, "request failed with the others");
                    return;
                }
                peer.failures += 1;
                let now = Instant::now();
                peer.failed_at = Some(now);
                info!(peer = %peer_id, error = %e, failures = peer.failures, "request failed");
                if peer.failures >= self.cfg.max_failures {
                    info!(peer = %peer_id, "dropping peer from this download");
                    peer.gone = true;
                } else {
                    // The next request dials again if the connection is gone; a fresh
                    // connection starts with the initial number of requests.
                    let backoff = self.cfg.failure_backoff * 2u32.pow(peer.failures - 1);
                    peer.busy_until = Some(now + backoff);
                    peer.target = self.cfg.initial_in_flight as f64;
                }
            }
        }
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
