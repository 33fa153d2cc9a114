//! Which run of chunks goes to which peer, when: requests in flight matched to each peer's
//! measured rate, endgame races, busy and failing peers left alone for a while.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use libp2p::PeerId;
use peerix_chunkstore::ChunkStore;
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::client::{Client, ClientError, DeltaBases};
use crate::compress::Sent;
use crate::protocol::MAX_CHUNK_BYTES_PER_REQUEST;

use super::wanted::{Flags, Want, Wanted};
use super::{Arrivals, DownloadConfig, DownloadError, DownloadReport, Peers};

mod plan;
mod request;

use plan::Holdings;

type ReqId = u64;

struct Run {
    /// Chunks not yet received.
    chunks: Vec<Want>,
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
    /// Chunk bytes per second, smoothed.
    rate: Option<f64>,
    /// Bytes on the wire per second, smoothed: what decides whether to ask for compression.
    wire_rate: Option<f64>,
    failures: u32,
    /// When the last counted failure happened.
    failed_at: Option<Instant>,
    /// Dropped for repeated failures or banned for bad chunks: given no more work.
    gone: bool,
    busy_until: Option<Instant>,
    holds: Holdings,
    /// Has sent a chunk in this download.
    answered: bool,
    /// The least time from a request to its first chunk: about a round trip and a chunk's
    /// sending. A peer whose work in flight ends within it may race in the endgame.
    latency: Option<Duration>,
}

struct Req {
    peer: usize,
    run: usize,
    started: Instant,
    in_flight_at_start: usize,
    bytes: u64,
    wire: u64,
    /// Asks for the run's chunks from its end (a race).
    reversed: bool,
    abort: AbortHandle,
}

enum Event {
    Chunk {
        req: ReqId,
        peer: usize,
        k: Want,
        data: Bytes,
        wire: u32,
        sent: Sent,
    },
    Done {
        req: ReqId,
        result: Result<(), TaskError>,
    },
    /// A peer's answer to which chunks it holds.
    Have {
        peer: usize,
        result: Result<Vec<bool>, ClientError>,
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

pub(super) struct Scheduler {
    client: Client,
    store: ChunkStore,
    cfg: DownloadConfig,
    peers: Vec<Peer>,
    runs: Vec<Run>,
    /// Runs waiting for a peer, in NAR order (offset, index).
    pending: BTreeSet<(u64, usize)>,
    /// Chunks to download, and those received.
    wanted: Arc<Wanted>,
    received: Flags,
    reqs: HashMap<ReqId, Req>,
    next_req: ReqId,
    pub(super) tasks: JoinSet<()>,
    events_tx: mpsc::UnboundedSender<Event>,
    events: mpsc::UnboundedReceiver<Event>,
    buf: Arc<Arrivals>,
    pub(super) report: DownloadReport,
    /// Answers to `have` still to come.
    asking: usize,
    /// A run may have been left with no usable holder since the last look.
    orphans_possible: bool,
    /// When a request holding up the window becomes late enough to race.
    recheck: Option<Instant>,
    /// The chunks offered as delta bases, if any.
    pub(super) bases: Option<Arc<DeltaBases>>,
    /// The download's start, for the report's `last_chunk`.
    started: Instant,
}

impl Scheduler {
    pub(super) fn new(
        client: Client,
        store: ChunkStore,
        wanted: Arc<Wanted>,
        peers: Peers,
        mut cfg: DownloadConfig,
        buf: Arc<Arrivals>,
        started: Instant,
    ) -> Self {
        cfg.run_bytes = cfg.run_bytes.clamp(1, MAX_CHUNK_BYTES_PER_REQUEST as u64);
        cfg.max_in_flight = cfg.max_in_flight.max(1);
        cfg.min_in_flight = cfg.min_in_flight.clamp(1, cfg.max_in_flight);
        let mut seen = std::collections::HashSet::new();
        let whole = peers.whole.into_iter().map(|p| (p, true));
        let some = peers.some.into_iter().map(|p| (p, false));
        let peers = whole
            .chain(some)
            .filter(|(p, _)| seen.insert(*p))
            .map(|(id, whole)| Peer {
                id,
                in_flight: 0,
                target: cfg.initial_in_flight.clamp(1, cfg.max_in_flight) as f64,
                rate: None,
                wire_rate: None,
                failures: 0,
                failed_at: None,
                gone: false,
                busy_until: None,
                answered: false,
                latency: None,
                holds: Holdings {
                    whole,
                    ..Holdings::default()
                },
            })
            .collect();
        let (events_tx, events) = mpsc::unbounded_channel();
        Self {
            bases: None,
            client,
            store,
            cfg,
            peers,
            runs: vec![],
            pending: BTreeSet::new(),
            received: Flags::new(wanted.len(), false),
            wanted,
            reqs: HashMap::new(),
            next_req: 0,
            tasks: JoinSet::new(),
            events_tx,
            events,
            buf,
            report: DownloadReport::default(),
            asking: 0,
            orphans_possible: false,
            recheck: None,
            started,
        }
    }

    pub(super) async fn run(
        &mut self,
        mut progress: watch::Receiver<u64>,
    ) -> Result<(), DownloadError> {
        if self.wanted.is_empty() {
            return Ok(());
        }
        self.plan().await?;
        let mut emitter_alive = true;
        while self.received.count() < self.wanted.len() {
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

    /// Put `run` among those waiting for a peer.
    fn queue(&mut self, run: usize) {
        self.pending.insert((self.runs[run].offset, run));
    }

    fn unqueue(&mut self, run: usize) {
        self.pending.remove(&(self.runs[run].offset, run));
    }

    fn usable(&self, p: usize) -> bool {
        let p = &self.peers[p];
        !p.gone && p.busy_until.is_none()
    }

    fn has_room(&self, p: usize) -> bool {
        let peer = &self.peers[p];
        // One request until the peer's first chunk is in: a peer answers its requests in
        // turn, and requests sent together might reach it in either order, so that the run
        // the output needs first could wait for the next one.
        if !peer.answered && peer.in_flight > 0 {
            return false;
        }
        let room = peer.target.floor().max(self.cfg.min_in_flight as f64);
        self.usable(p) && (peer.in_flight as f64) < room
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
        self.recut_orphans()?;
        let limit = emitted.saturating_add(self.window());
        // Pending runs in NAR order, within the window (past it too while nothing is in
        // flight, else nothing could ever start). Only the window's are collected while
        // requests are in flight: this runs at every chunk that arrives, and a NAR of 8 GiB
        // starts with 4,000 runs pending.
        let idle = self.reqs.is_empty();
        let candidates: Vec<usize> = self
            .pending
            .iter()
            .take_while(|&&(offset, _)| idle || offset < limit)
            .map(|&(_, r)| r)
            .collect();
        for run in candidates {
            if self.runs[run].offset >= limit && !self.reqs.is_empty() {
                break;
            }
            if let Some(p) = self.pick(run) {
                self.start(run, p);
            }
        }
        // Endgame: once every run is assigned, idle peers race the requests still in flight,
        // oldest first, each from the run's end (`start`), until the two meet. While runs
        // wait beyond the window, only the run the output is waiting on is raced: racing the
        // rest would only duplicate work that is on its way anyway.
        let pending_startable = self
            .pending
            .iter()
            .take_while(|&&(offset, _)| offset < limit)
            .any(|&(_, r)| self.pick(r).is_some());
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
        if endgame {
            // The run that would end last first. Racing the oldest instead raced runs about to
            // end (a peer answers its runs in turn), whose race met at once and left the idle
            // peer idle again, while a run its peer had not begun yet waited for it.
            let mut keyed: Vec<(f64, usize)> =
                racing.iter().map(|&run| (self.ends_in(run), run)).collect();
            keyed.sort_by(|a, b| b.0.total_cmp(&a.0));
            racing = keyed.into_iter().map(|(_, run)| run).collect();
        }
        for run in racing {
            // Only peers about to be idle race: one still busy with its own runs gains nothing
            // by it. About to: its race's first chunk takes a round trip, which a peer that
            // waited to be idle would leave its link idle for.
            if let Some(p) = self.pick(run).filter(|&p| self.frees_soon(p)) {
                debug!(run, peer = %self.peers[p].id, endgame, "racing a request");
                self.start(run, p);
            }
        }
        Ok(())
    }

    /// Seconds until `run`'s request would end at its peer's rate; never, as far as we know,
    /// for a peer that has sent nothing yet, which is raced first. A run its peer has not
    /// begun counts whole (the wait for the run before it is left out).
    fn ends_in(&self, run: usize) -> f64 {
        let to_come = self.to_come(run);
        let rate = self.runs[run]
            .requests
            .first()
            .and_then(|q| self.reqs.get(q))
            .and_then(|q| self.peers[q.peer].rate);
        rate.map_or(f64::INFINITY, |rate| to_come as f64 / rate.max(1.0))
    }

    /// True when peer `p` has nothing in flight, or only what it sends within its latency.
    fn frees_soon(&self, p: usize) -> bool {
        let peer = &self.peers[p];
        if peer.in_flight == 0 {
            return true;
        }
        let (Some(rate), Some(latency)) = (peer.rate, peer.latency) else {
            return false;
        };
        let to_come: u64 = self
            .reqs
            .values()
            .filter(|r| r.peer == p)
            .map(|r| self.to_come(r.run))
            .sum();
        to_come as f64 / rate.max(1.0) <= latency.as_secs_f64()
    }

    /// Bytes of `run` not received yet.
    fn to_come(&self, run: usize) -> u64 {
        self.runs[run]
            .chunks
            .iter()
            .filter(|&&k| !self.received.get(k))
            .map(|&k| u64::from(self.wanted.chunk(k).len))
            .sum()
    }

    /// How far ahead of the output runs may be requested (`DownloadConfig::window_bytes`).
    fn window(&self) -> u64 {
        let peers = self.peers.iter().filter(|p| !p.gone).count() as u64;
        let room = peers * self.cfg.min_in_flight as u64 * self.cfg.run_bytes;
        room.max(self.cfg.window_bytes)
    }

    /// When a request is late: twice what the peer's rate predicts, at least `target_queue`.
    fn overdue(&self, r: &Req) -> Duration {
        let bytes: u64 = self.runs[r.run]
            .chunks
            .iter()
            .map(|&k| u64::from(self.wanted.chunk(k).len))
            .sum();
        let expected = self.peers[r.peer].rate.map_or(Duration::ZERO, |rate| {
            Duration::from_secs_f64((2.0 * bytes as f64 / rate.max(1.0)).min(3600.0))
        });
        expected.max(self.cfg.target_queue)
    }

    fn on_event(&mut self, ev: Event) -> Result<(), DownloadError> {
        match ev {
            Event::Chunk {
                req,
                peer,
                k,
                data,
                wire,
                sent,
            } => {
                let len = data.len() as u64;
                let wire = u64::from(wire);
                if let Some(r) = self.reqs.get_mut(&req) {
                    if r.bytes == 0 {
                        let waited = r.started.elapsed();
                        let l = &mut self.peers[peer].latency;
                        *l = Some(l.map_or(waited, |l| l.min(waited)));
                    }
                    r.bytes += len;
                    r.wire += wire;
                }
                self.report.wire_bytes += wire;
                let saved = len.saturating_sub(wire);
                match sent {
                    Sent::Raw => {}
                    Sent::Zstd => self.report.saved_by_compression += saved,
                    Sent::Delta => self.report.saved_by_delta += saved,
                }
                self.peers[peer].answered = true;
                let at = self.started.elapsed();
                self.report.last_chunk.insert(self.peers[peer].id, at);
                // Chunks from a request already dropped as an endgame loser count too.
                *self
                    .report
                    .bytes_per_peer
                    .entry(self.peers[peer].id)
                    .or_default() += len;
                if self.received.insert(k) {
                    self.buf.insert(k, data);
                } else {
                    self.report.duplicate_bytes += len;
                }
                // A raced run ends where its two requests meet: neither would end on its own
                // before it had sent the other's chunks again.
                if let Some(run) = self.reqs.get(&req).map(|r| r.run) {
                    let r = &self.runs[run];
                    if r.requests.len() > 1 && r.chunks.iter().all(|&k| self.received.get(k)) {
                        self.finish_run(run);
                    }
                }
            }
            Event::Have { peer, result } => self.on_have(peer, result),
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
                self.runs[run].chunks.retain(|&k| !received.get(k));
                if self.runs[run].chunks.is_empty() {
                    self.finish_run(run);
                } else if self.runs[run].requests.is_empty() {
                    self.queue(run);
                }
            }
        }
        Ok(())
    }

    fn on_success(&mut self, r: &Req) {
        let elapsed = r.started.elapsed().as_secs_f64().max(1e-3);
        // Requests in flight together share the peer's bandwidth: this one's rate times
        // their number estimates the peer's.
        let scale = r.in_flight_at_start as f64 / elapsed;
        let peer = &mut self.peers[r.peer];
        let smooth = |old: Option<f64>, sample: f64| old.map_or(sample, |o| 0.5 * o + 0.5 * sample);
        let rate = smooth(peer.rate, r.bytes as f64 * scale);
        peer.rate = Some(rate);
        peer.wire_rate = Some(smooth(peer.wire_rate, r.wire as f64 * scale));
        let want = rate * self.cfg.target_queue.as_secs_f64() / self.cfg.run_bytes as f64;
        peer.target = want.clamp(1.0, self.cfg.max_in_flight as f64);
        peer.failures = 0;
    }

    fn on_failure(&mut self, r: &Req, e: TaskError) {
        let p = r.peer;
        let peer_id = self.peers[p].id;
        match &e {
            // Our copy of an older release went away (Nix collected it) while the peer sent
            // deltas against it: no fault of the peer's. Offer no more bases; the run is asked
            // for again as plain chunks.
            TaskError::Client(ClientError::Base(_)) => {
                warn!(error = %e, "delta bases no longer readable here; asking for plain chunks");
                self.bases = None;
            }
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
                self.orphans_possible = true;
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
                        self.queue(q.run);
                    }
                }
            }
            TaskError::Missing => {
                debug!(peer = %peer_id, "peer does not have some chunks");
                self.lacks(p, r.run);
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
                    self.orphans_possible = true;
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
