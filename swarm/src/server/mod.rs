//! Answering peers: lookups from the [`Catalog`], manifests, `have` and chunks from the chunk
//! store.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{AsyncWriteExt, StreamExt};
use libp2p::{PeerId, Stream};
use peerix_chunkstore::{ChunkId, ChunkStore};
use peerix_nix::Sha256Hash;
use thiserror::Error;
use tokio::sync::{broadcast, watch, Notify};
use tracing::{debug, info, warn};

use crate::admission::{Admission, Refused, StreamStats};
use crate::delta::DeltaPlans;
use crate::peer_tables::PeerTables;
pub use crate::peer_tables::TrackedPeers;
use crate::protocol::{
    self, manifest_fits, write_reply, HaveReply, NarState, Refusal, Reply, Request,
};
use crate::PROTOCOL;

mod chunks;
mod upload;

use crate::catalog::Catalog;

/// The chunks of the shared NARs (complete, or being downloaded), for the catalog generation
/// it was built from.
struct ChunkIndex {
    generation: u64,
    chunks: Arc<HashSet<ChunkId>>,
}

fn build_chunk_index(
    cs: &ChunkStore,
    catalog: &dyn Catalog,
) -> peerix_chunkstore::Result<HashSet<ChunkId>> {
    let mut chunks = HashSet::new();
    for h in catalog.shared_nars() {
        let m = match cs.manifest(&h)? {
            Some(m) => Some(m),
            None => cs.partial_manifest(&h)?,
        };
        if let Some(m) = m {
            chunks.extend(m.chunks.iter().map(|c| c.id));
        }
    }
    Ok(chunks)
}

/// Bounds on what serving may cost us.
#[derive(Clone, Debug)]
pub struct ServeLimits {
    /// Chunks requests served at once, over all peers.
    pub max_chunk_requests: usize,
    /// Streams being answered at once. When all are taken, a peer holding fewer takes the
    /// oldest stream of the peer holding the most; otherwise a new stream is reset unanswered.
    pub max_streams: usize,
    /// Streams one peer may hold at once; more are reset unanswered.
    pub max_streams_per_peer: usize,
    /// How long a peer may take to send its request. A stream left idle that long counts as
    /// an offence: honest clients send their request with the stream.
    pub request_timeout: Duration,
    /// How long a chunks request may wait for an upload slot before it is answered Busy;
    /// shorter than the requester's shortest timeout (4 s), so it hears Busy rather than
    /// timing out and counting us as failed. Also how long a peer's run may take no chunk
    /// before it gives up its turn to the peer's next (`answer_chunks`).
    pub queue_timeout: Duration,
    /// How long writing one chunk may take before the stream is dropped.
    pub write_timeout: Duration,
    /// Malformed requests a peer may send before it is refused.
    pub max_offences: u32,
    /// How long an offender is refused.
    pub ban_duration: Duration,
    /// Peers whose offences, refusal or served bytes are remembered, each (least recently
    /// seen forgotten first; bytes served to forgotten peers are added up as "others").
    pub max_tracked_peers: usize,
    /// Chunk ids a peer may ask about in `have` requests per second, and in one burst; more
    /// is answered Busy.
    pub have_rate: u32,
    pub have_burst: u32,
    /// Chunk bytes per second sent to all peers together; none: no cap (see `upload.rs`).
    pub max_upload_rate: Option<std::num::NonZeroU32>,
    /// Whether the cap holds for peers on the LAN too (see [`Server::with_lan_peers`]); by
    /// default they are not paced: the cap protects a home's uplink, not its own network.
    pub cap_lan: bool,
}

impl Default for ServeLimits {
    fn default() -> Self {
        Self {
            max_chunk_requests: 16,
            max_streams: 256,
            // Above the 16 chunk requests a downloader keeps in flight, plus `have`s and lookups.
            max_streams_per_peer: 64,
            request_timeout: Duration::from_secs(3),
            queue_timeout: Duration::from_secs(2),
            write_timeout: Duration::from_secs(30),
            max_offences: 3,
            ban_duration: Duration::from_secs(600),
            max_tracked_peers: 4096,
            have_rate: 4 * protocol::MAX_HAVE_CHUNKS as u32,
            have_burst: 8 * protocol::MAX_HAVE_CHUNKS as u32,
            max_upload_rate: None,
            cap_lan: false,
        }
    }
}

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("another server already accepts {PROTOCOL} streams on this node")]
    AlreadyRegistered,
}

/// Something the node may act upon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerEvent {
    /// A peer sent a malformed or oversized message.
    Offence { peer: PeerId, error: String },
    /// A peer reached the offence limit and is refused for a while; the node may ban it.
    Offender { peer: PeerId },
    /// A peer was given the manifest of a shared NAR: it is about to fetch that NAR's chunks.
    ManifestServed { peer: PeerId, nar_hash: Sha256Hash },
}

#[derive(Default)]
struct Slots {
    peers: HashMap<PeerId, PeerSlots>,
    busy: usize,
}

/// One peer's chunks requests: those holding a slot and those waiting for one.
#[derive(Default)]
struct PeerSlots {
    serving: usize,
    waiting: usize,
    /// Taken in turn by the peer's requests for several chunks (`answer_chunks`).
    turn: Arc<tokio::sync::Mutex<()>>,
}

impl PeerSlots {
    fn asking(&self) -> bool {
        self.serving + self.waiting > 0
    }
}

/// Says whether a peer is on the LAN.
type IsLan = dyn Fn(&PeerId) -> bool + Send + Sync;

struct Shared {
    /// Offences, refusals, bytes served, `have` budgets: bounded per-peer tables.
    tables: PeerTables,
    admission: Arc<Admission>,
    slots: Mutex<Slots>,
    slot_freed: Notify,
    events: broadcast::Sender<ServerEvent>,
    limits: ServeLimits,
    upload: Option<upload::UploadCap>,
    /// Which peers are on the LAN, for the upload cap to spare.
    lan: Option<Box<IsLan>>,
    /// Built on demand, one build at a time.
    chunk_index: tokio::sync::Mutex<Option<ChunkIndex>>,
}

/// Serves [`PROTOCOL`] streams.
pub struct Server {
    store: ChunkStore,
    catalog: Arc<dyn Catalog>,
    shared: Arc<Shared>,
    deltas: DeltaPlans,
}

/// A view of a running server's state, for the node and metrics.
#[derive(Clone)]
pub struct ServerHandle {
    shared: Arc<Shared>,
}

impl ServerHandle {
    /// Peers currently refused for malformed requests or idle streams.
    pub fn offenders(&self) -> Vec<PeerId> {
        self.shared.tables.offenders()
    }

    /// Malformed requests and idle streams counted against a peer (reset when its refusal
    /// ends).
    pub fn offences(&self, peer: &PeerId) -> u32 {
        self.shared.tables.offences(peer)
    }

    /// Chunk bytes served, per peer, as they went on the wire (compressed or raw), for the
    /// peers still tracked (see [`ServeLimits::max_tracked_peers`]).
    pub fn bytes_served(&self) -> HashMap<PeerId, u64> {
        self.shared.tables.bytes_served()
    }

    /// Chunk bytes that went out under the upload cap (LAN peers it spared are not counted).
    pub fn capped_bytes(&self) -> u64 {
        self.shared
            .upload
            .as_ref()
            .map_or(0, |c| c.paced.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Chunk bytes served to peers no longer tracked one by one.
    pub fn bytes_served_to_others(&self) -> u64 {
        self.shared.tables.bytes_served_to_others()
    }

    /// The stream slots: open, peak, refused, handed on.
    pub fn streams(&self) -> watch::Receiver<StreamStats> {
        self.shared.admission.stats()
    }

    /// How many peers each per-peer table holds.
    pub fn tracked_peers(&self) -> TrackedPeers {
        self.shared.tables.sizes()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<ServerEvent> {
        self.shared.events.subscribe()
    }
}

impl Shared {
    /// Takes `n` from the peer's `have` budget; false when it has not that much left.
    fn take_have_budget(&self, peer: PeerId, n: usize) -> bool {
        let (rate, burst) = (
            f64::from(self.limits.have_rate),
            f64::from(self.limits.have_burst),
        );
        self.tables.take_have_budget(peer, n, rate, burst)
    }

    fn refused(&self, peer: &PeerId) -> bool {
        self.tables.refused(peer)
    }

    fn offence(&self, peer: PeerId, e: &dyn std::fmt::Display) {
        // At debug: minted identities would otherwise write a line each; refusals are logged.
        debug!(%peer, error = %e, "offence from peer");
        let _ = self.events.send(ServerEvent::Offence {
            peer,
            error: e.to_string(),
        });
        if let Some(offences) = self.tables.offence(peer) {
            info!(%peer, offences, "refusing peer");
            let _ = self.events.send(ServerEvent::Offender { peer });
        }
    }

    fn add_served(&self, peer: PeerId, n: usize) {
        self.tables.add_served(peer, n);
    }

    /// Upload slots are shared fairly: a peer may hold at most `total / active peers` of them
    /// (at least one), where active peers are those being served or waiting. A single
    /// downloader gets every slot; when others arrive, its share shrinks as its requests end,
    /// so one fast peer with deep pipelining cannot starve the rest. Waiters recheck whenever
    /// a slot frees. None when no slot came within the queue timeout.
    async fn acquire(self: &Arc<Self>, peer: PeerId) -> Option<SlotGuard> {
        let deadline = tokio::time::Instant::now() + self.limits.queue_timeout;
        let total =
            upload::slots(self.limits.max_upload_rate, self.limits.max_chunk_requests).max(1);
        let mut waiting = false;
        loop {
            let notified = self.slot_freed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut slots = self.slots.lock().expect("slots");
                let active = slots
                    .peers
                    .iter()
                    .filter(|(p, e)| e.asking() || **p == peer)
                    .count()
                    .max(1);
                let share = (total / active).max(1);
                let busy = slots.busy;
                let e = slots.peers.entry(peer).or_default();
                if waiting {
                    e.waiting -= 1;
                }
                if e.serving < share && busy < total {
                    e.serving += 1;
                    let turn = e.turn.clone();
                    slots.busy += 1;
                    return Some(SlotGuard {
                        shared: self.clone(),
                        peer,
                        turn,
                    });
                }
                if tokio::time::Instant::now() >= deadline {
                    if !e.asking() {
                        slots.peers.remove(&peer);
                    }
                    return None;
                }
                e.waiting += 1;
                waiting = true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                // Loop once more to undo the waiting count and give up.
                continue;
            }
        }
    }
}

struct SlotGuard {
    shared: Arc<Shared>,
    peer: PeerId,
    /// The peer's turn: the same for all its requests holding a slot at once, since its
    /// entry in `Slots` lives as long as any of them.
    turn: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let mut slots = self.shared.slots.lock().expect("slots");
        slots.busy -= 1;
        if let Some(e) = slots.peers.get_mut(&self.peer) {
            e.serving -= 1;
            if !e.asking() {
                slots.peers.remove(&self.peer);
            }
        }
        drop(slots);
        self.shared.slot_freed.notify_waiters();
    }
}

impl Server {
    pub fn new(store: ChunkStore, catalog: Arc<dyn Catalog>, limits: ServeLimits) -> Self {
        let (events, _) = broadcast::channel(64);
        Self {
            store,
            catalog,
            shared: Arc::new(Shared {
                tables: PeerTables::new(
                    limits.max_tracked_peers,
                    limits.max_offences,
                    limits.ban_duration,
                ),
                admission: Admission::new(limits.max_streams, limits.max_streams_per_peer),
                slots: Mutex::default(),
                slot_freed: Notify::new(),
                events,
                upload: limits.max_upload_rate.map(upload::UploadCap::new),
                lan: None,
                limits,
                chunk_index: tokio::sync::Mutex::new(None),
            }),
            deltas: DeltaPlans::default(),
        }
    }

    /// Tells the server which peers are on the LAN (the node knows: `Node::is_lan_peer`);
    /// the upload cap spares them unless [`ServeLimits::cap_lan`]. Before any `handle`.
    pub fn with_lan_peers(
        mut self,
        is_lan: impl Fn(&PeerId) -> bool + Send + Sync + 'static,
    ) -> Self {
        Arc::get_mut(&mut self.shared)
            .expect("with_lan_peers is called before the server is shared")
            .lan = Some(Box::new(is_lan));
        self
    }

    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            shared: self.shared.clone(),
        }
    }

    /// Accept and answer streams until the node's swarm goes away.
    /// Registers the protocol at once — a peer's stream that arrives from then on is answered,
    /// not refused as unsupported — and returns the future that serves until the node stops.
    pub fn run(
        self,
        mut control: libp2p_stream::Control,
    ) -> Result<impl std::future::Future<Output = ()> + Send + 'static, ServerError> {
        let incoming = control
            .accept(PROTOCOL)
            .map_err(|_| ServerError::AlreadyRegistered)?;
        Ok(self.serve(incoming))
    }

    async fn serve(self, mut incoming: libp2p_stream::IncomingStreams) {
        let me = Arc::new(self);
        // libp2p-stream drops inbound streams that arrive while the previous one has not been
        // taken, so this loop does nothing but hand each stream to its own task.
        while let Some((peer, stream)) = incoming.next().await {
            if me.shared.refused(&peer) {
                debug!(%peer, "refusing stream from offender");
                drop(stream);
                continue;
            }
            let mut ticket = match me.shared.admission.admit(peer) {
                Ok(t) => t,
                Err(why) => {
                    match why {
                        Refused::PeerShare => {
                            debug!(%peer, "peer holds its share of streams; resetting one")
                        }
                        Refused::Full => debug!(%peer, "every stream slot taken; resetting one"),
                    }
                    continue;
                }
            };
            let me = me.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = me.serve_stream(peer, stream) => {}
                    () = ticket.preempted() => debug!(%peer, "stream closed: its slot went to another peer"),
                }
                drop(ticket);
            });
        }
    }

    async fn serve_stream(&self, peer: PeerId, mut stream: Stream) {
        let limits = &self.shared.limits;
        let req =
            match tokio::time::timeout(limits.request_timeout, protocol::read_request(&mut stream))
                .await
            {
                Err(_) => {
                    // Idle streams are how a peer would sit on every slot: counted.
                    self.shared.offence(
                        peer,
                        &format_args!("no request within {:?}", limits.request_timeout),
                    );
                    return;
                }
                Ok(Err(e)) if e.is_offence() => {
                    // Dropping the stream resets it.
                    self.shared.offence(peer, &e);
                    return;
                }
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "stream failed before its request");
                    return;
                }
                Ok(Ok(r)) => r,
            };
        if let Err(e) = self.answer(peer, req, &mut stream).await {
            debug!(%peer, error = %e, "answering failed");
            return;
        }
        let _ = tokio::time::timeout(limits.write_timeout, stream.close()).await;
    }

    /// The chunks of what the catalog shares now, rebuilt when its generation moved on.
    async fn shareable_chunks(&self) -> Result<Arc<HashSet<ChunkId>>, AnswerError> {
        let generation = self.catalog.generation();
        let mut index = self.shared.chunk_index.lock().await;
        if let Some(i) = index.as_ref().filter(|i| i.generation == generation) {
            return Ok(i.chunks.clone());
        }
        let catalog = self.catalog.clone();
        let chunks = Arc::new(
            self.store
                .blocking(move |cs| build_chunk_index(cs, &*catalog))
                .await
                .map_err(|e| AnswerError::Store(e.to_string()))?,
        );
        debug!(
            generation,
            chunks = chunks.len(),
            "index of shareable chunks rebuilt"
        );
        *index = Some(ChunkIndex {
            generation,
            chunks: chunks.clone(),
        });
        Ok(chunks)
    }

    async fn answer(&self, peer: PeerId, req: Request, s: &mut Stream) -> Result<(), AnswerError> {
        let wt = self.shared.limits.write_timeout;
        match req {
            Request::Lookup(hashes) => {
                let catalog = self.catalog.clone();
                let found = tokio::task::spawn_blocking(move || {
                    hashes
                        .iter()
                        .filter_map(|h| catalog.lookup(h))
                        .collect::<Vec<_>>()
                })
                .await
                .map_err(|e| AnswerError::Store(e.to_string()))?;
                timed(wt, write_reply(s, &Reply::Lookup(found))).await?;
            }
            Request::Manifest(h) => {
                let catalog = self.catalog.clone();
                let m = self
                    .store
                    .blocking(move |cs| {
                        if catalog.shares_nar(&h) {
                            cs.manifest(&h)
                        } else {
                            Ok(None)
                        }
                    })
                    .await
                    .map_err(|e| AnswerError::Store(e.to_string()))?;
                let m = m.filter(|m| {
                    let fits = manifest_fits(m);
                    if !fits {
                        warn!(nar = %h, "manifest too large to serve");
                    }
                    fits
                });
                let served = m.is_some();
                timed(wt, write_reply(s, &Reply::Manifest(m))).await?;
                if served {
                    let _ = self
                        .shared
                        .events
                        .send(ServerEvent::ManifestServed { peer, nar_hash: h });
                }
            }
            Request::Have { .. } | Request::Chunks(_) if !self.catalog.ready() => {
                debug!(%peer, "not ready (the first scan is under way); answering busy");
                timed(wt, write_reply(s, &Reply::Refused(Refusal::Busy))).await?;
                return Ok(());
            }
            Request::Have { chunks, nars } => {
                if !self
                    .shared
                    .take_have_budget(peer, chunks.len() + nars.len())
                {
                    debug!(%peer, "have requests too fast; answering busy");
                    timed(wt, write_reply(s, &Reply::Refused(Refusal::Busy))).await?;
                    return Ok(());
                }
                let catalog = self.catalog.clone();
                let shareable = self.shareable_chunks().await?;
                let reply = self
                    .store
                    .blocking(move |cs| have(cs, &*catalog, &shareable, &chunks, &nars))
                    .await
                    .map_err(|e| AnswerError::Store(e.to_string()))?;
                timed(wt, write_reply(s, &Reply::Have(reply))).await?;
            }
            Request::Chunks(r) => {
                if !self.answer_chunks(peer, r, s).await? {
                    return Ok(());
                }
            }
        }
        timed(wt, s.flush()).await?;
        Ok(())
    }
}

fn have(
    cs: &ChunkStore,
    catalog: &dyn Catalog,
    shareable: &HashSet<ChunkId>,
    chunks: &[ChunkId],
    nars: &[Sha256Hash],
) -> peerix_chunkstore::Result<HaveReply> {
    let mut r = HaveReply::default();
    for c in chunks {
        r.chunks.push(shareable.contains(c) && cs.has_chunk(c)?);
    }
    for n in nars {
        r.nars.push(if !catalog.shares_nar(n) {
            NarState::None
        } else if cs.has_manifest(n)? {
            NarState::Complete
        } else if cs.has_partial(n)? {
            NarState::Partial
        } else {
            NarState::None
        });
    }
    Ok(r)
}

#[derive(Debug, Error)]
enum AnswerError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out writing")]
    Timeout,
    #[error("store: {0}")]
    Store(String),
}

async fn timed<T>(
    d: Duration,
    f: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, AnswerError> {
    Ok(tokio::time::timeout(d, f)
        .await
        .map_err(|_| AnswerError::Timeout)??)
}
