//! `peerix serve`: the substituter Nix talks to over HTTP, backed by the chunk store and the
//! swarm.
//!
//! A narinfo request is answered from what an earlier lookup presented, or by asking the
//! peers (under `--timeout`) and handing Nix what [`Trust::present`] makes of the first trusted
//! answer; nothing found is a quick 404, never a 5xx. A NAR request streams from the chunk
//! store when the whole NAR is held, or else is downloaded from the peers while it streams;
//! a download that fails cuts the HTTP body short, so Nix never imports a wrong NAR.

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::{Extension, Path as UrlPath, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use lru::LruCache;
use peerix_chunkstore::{ChunkStore, Options};
use peerix_nix::upstream::{UpstreamCache, UpstreamConfig};
use peerix_nix::{LocalStore, NarInfo, SecretKey, Sha256Hash, StorePathHash};
use peerix_swarm::{
    fetch_nar, Client, DownloadConfig, FetchError, FetchOutcome, FetchRequest, Lookup, Node,
    NodeConfig, NodeEvent, PeerId, PeerSource, ServeLimits, Server, ServerHandle,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::admin::Daemon;
use crate::config::ServeConfig;
use crate::http::{HttpLimits, Origin};
use crate::seed::Seeder;
use crate::share::{ShareConfig, Sharing};
use crate::trust::Trust;

/// Presented narinfos remembered for the NAR request that follows.
const REMEMBERED: usize = 16_384;
/// Chunks of NAR buffered between the store or the download and the HTTP body.
const BODY_QUEUE: usize = 8;
const READ_BUF: usize = 256 * 1024;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabel {
    peer: String,
}

#[derive(Default)]
struct Metrics {
    narinfo_requests: Counter,
    narinfo_hits: Counter,
    narinfo_misses: Counter,
    nar_bytes_served: Counter,
    nar_downloads_failed: Counter,
    peers_banned: Counter,
    bytes_from_peer: Family<PeerLabel, Counter>,
    bytes_to_peer: Family<PeerLabel, Gauge>,
    dedup_saved_bytes: Counter,
    narinfo_latency: Option<Histogram>,
}

impl Metrics {
    fn registry(&mut self) -> Registry {
        let mut r = Registry::default();
        let h = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        self.narinfo_latency = Some(h.clone());
        r.register(
            "peerix_narinfo_requests",
            "narinfo requests from Nix",
            self.narinfo_requests.clone(),
        );
        r.register(
            "peerix_narinfo_hits",
            "narinfo requests answered 200",
            self.narinfo_hits.clone(),
        );
        r.register(
            "peerix_narinfo_misses",
            "narinfo requests answered 404",
            self.narinfo_misses.clone(),
        );
        r.register(
            "peerix_nar_bytes_served",
            "NAR bytes sent to Nix",
            self.nar_bytes_served.clone(),
        );
        r.register(
            "peerix_nar_downloads_failed",
            "NAR downloads from peers that failed (the HTTP body was cut)",
            self.nar_downloads_failed.clone(),
        );
        r.register(
            "peerix_peers_banned",
            "peers banned for lying about a NAR (bad chunks or a manifest that does not make it)",
            self.peers_banned.clone(),
        );
        r.register(
            "peerix_peer_received_bytes",
            "verified chunk bytes received from each peer",
            self.bytes_from_peer.clone(),
        );
        r.register(
            "peerix_peer_served_bytes",
            "chunk bytes served to each peer",
            self.bytes_to_peer.clone(),
        );
        r.register(
            "peerix_dedup_saved_bytes",
            "NAR bytes not downloaded because the chunks were already held",
            self.dedup_saved_bytes.clone(),
        );
        r.register(
            "peerix_narinfo_latency_seconds",
            "time to answer a narinfo request",
            h,
        );
        r
    }
}

/// What was handed to Nix for a store path, and who had it.
struct Presented {
    info: NarInfo,
    peer: PeerId,
    holders: Vec<PeerId>,
}

struct App {
    priority: u32,
    timeout: Duration,
    store: ChunkStore,
    node: Arc<Node>,
    client: Client,
    lookup: Lookup,
    trust: Arc<Trust>,
    sharing: Arc<Sharing>,
    server: ServerHandle,
    by_path: Mutex<LruCache<StorePathHash, Arc<Presented>>>,
    by_nar: Mutex<LruCache<Sha256Hash, Arc<Presented>>>,
    /// One download per NAR at a time; a second request waits and then reads the store.
    nar_locks: Mutex<HashMap<Sha256Hash, Arc<tokio::sync::Mutex<()>>>>,
    metrics: Metrics,
    registry: Registry,
}

fn read_key(path: &std::path::Path) -> Result<SecretKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading secret key {}", path.display()))?;
    text.trim()
        .parse()
        .with_context(|| format!("secret key {}", path.display()))
}

/// The stores and the sharing rules, opened from the settings: what the daemon and `peerix seed`
/// (when no daemon runs) work with.
pub struct Parts {
    pub local: Arc<LocalStore>,
    pub store: ChunkStore,
    pub upstream: Option<Arc<UpstreamCache>>,
    pub own_key: Option<SecretKey>,
    pub sharing: Arc<Sharing>,
}

/// The chunk store of a state directory, reading the local store at `store_root` in place.
pub fn open_chunk_store(
    state_dir: &std::path::Path,
    store_root: &std::path::Path,
) -> Result<ChunkStore> {
    let dir = state_dir.join("chunks");
    ChunkStore::open(
        &dir,
        Options {
            store_root: Some(store_root.to_owned()),
            ..Options::default()
        },
    )
    .with_context(|| format!("opening the chunk store in {}", dir.display()))
}

pub fn open_parts(cfg: &ServeConfig) -> Result<Parts> {
    let own_key = cfg.private_key.as_deref().map(read_key).transpose()?;
    let local = Arc::new(
        LocalStore::open(&cfg.store)
            .with_context(|| format!("opening the Nix store at {}", cfg.store.display()))?,
    );
    let store = open_chunk_store(&cfg.state_dir, &cfg.store)?;
    let upstream = match &cfg.upstream_cache {
        Some(url) => Some(Arc::new(
            UpstreamCache::new(url, UpstreamConfig::default())
                .with_context(|| format!("upstream cache {url}"))?,
        )),
        None => None,
    };
    let sharing = Arc::new(Sharing::new(
        ShareConfig {
            share_all: cfg.share_all,
            deny: cfg.deny.clone(),
            trusted_keys: cfg.trusted_keys.clone(),
            ..ShareConfig::default()
        },
        local.clone(),
        store.clone(),
        upstream.clone(),
        own_key.clone(),
    ));
    Ok(Parts {
        local,
        store,
        upstream,
        own_key,
        sharing,
    })
}

/// Run the daemon until it is killed or the HTTP server fails.
pub async fn run(cfg: ServeConfig) -> Result<()> {
    // Before anything says the daemon is up: a SIGTERM that comes before the HTTP server first
    // polls its shutdown future must still stop it cleanly, not kill it.
    use tokio::signal::unix::{signal, SignalKind};
    let signals = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    );
    let Parts {
        local,
        store,
        upstream,
        own_key,
        sharing,
    } = open_parts(&cfg)?;

    let mut nc = NodeConfig::new(cfg.state_dir.join("p2p"));
    nc.listen = cfg.p2p_listen.clone();
    nc.peers = cfg.peers.clone();
    nc.mdns = cfg.mdns;
    if let Some(k) = &cfg.swarm_key {
        nc.swarm_key = Some(peerix_swarm::node::read_swarm_key(k)?);
    }
    let node = Arc::new(Node::start(nc).await.context("starting the p2p node")?);
    let mut events = node.events();

    let server = Server::new(store.clone(), sharing.clone(), ServeLimits::default());
    let server_handle = server.handle();
    let control = node.stream_control();
    tokio::spawn(server.run(control).context("serving the peer protocol")?);

    let client = Client::new(node.stream_control());
    let trust = Arc::new(Trust::new(cfg.trusted_keys.clone(), upstream, own_key));
    let lookup = Lookup::new(
        node.clone() as Arc<dyn PeerSource>,
        client.clone(),
        trust.clone(),
        Duration::from_secs(5),
    );

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("listening on {}", cfg.listen))?;
    let addr: SocketAddr = listener.local_addr()?;

    let mut metrics = Metrics::default();
    let registry = metrics.registry();
    let cap = NonZeroUsize::new(REMEMBERED).expect("non-zero");
    let app = Arc::new(App {
        priority: cfg.priority,
        timeout: cfg.timeout,
        store,
        node: node.clone(),
        client,
        lookup,
        trust,
        sharing: sharing.clone(),
        server: server_handle,
        by_path: Mutex::new(LruCache::new(cap)),
        by_nar: Mutex::new(LruCache::new(cap)),
        nar_locks: Mutex::new(HashMap::new()),
        metrics,
        registry,
    });

    let daemon = Arc::new(Daemon {
        seeder: Seeder {
            store: app.store.clone(),
            local,
            sharing: sharing.clone(),
        },
        node: node.clone(),
        http: addr,
        busy: tokio::sync::Mutex::new(()),
    });
    tokio::spawn(crate::admin::listen(&cfg.state_dir, daemon)?);

    let p2p: Vec<String> = node.listen_addrs().iter().map(|a| a.to_string()).collect();
    eprintln!(
        "peerix: serving Nix on http://{addr}, peer id {}, p2p on {}",
        node.peer_id(),
        p2p.join(" ")
    );

    // Peer connections, as lines the operator (and the tests) can follow.
    {
        let app = app.clone();
        tokio::spawn(async move {
            let mut seen = std::collections::HashSet::new();
            for p in app.node.connected_peers().await {
                if seen.insert(p) {
                    eprintln!("peerix: peer connected {p}");
                }
            }
            loop {
                match events.recv().await {
                    Ok(NodeEvent::PeerConnected(p)) => {
                        if seen.insert(p) {
                            eprintln!("peerix: peer connected {p}");
                        }
                    }
                    Ok(NodeEvent::PeerDisconnected(p)) => {
                        seen.remove(&p);
                        eprintln!("peerix: peer disconnected {p}");
                    }
                    Ok(NodeEvent::Announced(h)) => app.lookup.forget_miss(&h),
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => break,
                }
            }
        });
    }

    // Scans of the local store; each one replaces what the node announces, then GC gives
    // back what the scan freed (pack copies of NARs Nix now holds, NARs that left the store).
    {
        let node = node.clone();
        let interval = cfg.scan_interval;
        let store = app.store.clone();
        let collecting = Arc::new(std::sync::atomic::AtomicBool::new(false));
        tokio::spawn(sharing.run(interval, move |s| {
            let shared = s.shared_hashes();
            let n = shared.len();
            node.set_provided(shared);
            eprintln!("peerix: scan done: {n} shared");
            if !collecting.swap(true, std::sync::atomic::Ordering::SeqCst) {
                tokio::spawn(collect_garbage(store.clone(), collecting.clone()));
            }
        }));
    }

    let router = router(app);
    crate::http::serve(
        listener,
        router,
        HttpLimits::default(),
        shutdown_signal(signals),
    )
    .await;
    Ok(())
}

/// One GC run of the chunk store, reported on stderr when it freed something.
async fn collect_garbage(store: ChunkStore, running: Arc<std::sync::atomic::AtomicBool>) {
    let started = Instant::now();
    match store.blocking(|cs| cs.gc(&mut |_| {})).await {
        Ok(st) if st.chunks_deleted + st.pack_copies_released + st.packs_removed > 0 => {
            eprintln!(
                "peerix: gc: {} unused chunks deleted, {} pack copies released, {} bytes of \
                 packs reclaimed in {:.2?}",
                st.chunks_deleted,
                st.pack_copies_released,
                st.bytes_reclaimed,
                started.elapsed()
            );
        }
        Ok(_) => debug!("gc: nothing to do"),
        Err(e) => warn!(error = %e, "gc of the chunk store failed"),
    }
    running.store(false, std::sync::atomic::Ordering::SeqCst);
}

/// Ctrl-C, or SIGTERM from systemd: stop taking requests and let those in flight finish. The
/// handlers are made by the caller at start-up, so a signal can never find them missing.
async fn shutdown_signal(
    (int, term): (
        std::io::Result<tokio::signal::unix::Signal>,
        std::io::Result<tokio::signal::unix::Signal>,
    ),
) {
    async fn recv(s: std::io::Result<tokio::signal::unix::Signal>, name: &str) {
        match s {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for {name}");
                std::future::pending::<()>().await;
            }
        }
    }
    tokio::select! {
        _ = recv(int, "SIGINT") => {}
        _ = recv(term, "SIGTERM") => {}
    }
    info!("shutting down");
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/nix-cache-info", get(cache_info))
        .route("/health", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/nar/:file", get(nar))
        .route("/:file", get(narinfo))
        .fallback(|| async { StatusCode::NOT_FOUND })
        .with_state(app)
}

async fn cache_info(State(app): State<Arc<App>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/x-nix-cache-info")],
        format!(
            "StoreDir: {}\nWantMassQuery: 1\nPriority: {}\n",
            peerix_nix::STORE_DIR,
            app.priority
        ),
    )
        .into_response()
}

async fn metrics(State(app): State<Arc<App>>, Extension(origin): Extension<Origin>) -> Response {
    if !origin.local {
        return StatusCode::NOT_FOUND.into_response();
    }
    for (peer, n) in app.server.bytes_served() {
        app.metrics
            .bytes_to_peer
            .get_or_create(&PeerLabel {
                peer: peer.to_string(),
            })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &app.registry).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

/// `<32 nix-base32 chars>.narinfo`, and nothing else.
fn parse_narinfo_name(file: &str) -> Option<StorePathHash> {
    let h = file.strip_suffix(".narinfo")?;
    if h.len() != 32 {
        return None;
    }
    h.parse().ok()
}

/// `<52 nix-base32 chars>.nar`, in Nix's canonical encoding.
fn parse_nar_name(file: &str) -> Option<Sha256Hash> {
    let h = file.strip_suffix(".nar")?;
    if h.len() != 52 {
        return None;
    }
    let hash = Sha256Hash::parse_digest(h).ok()?;
    (hash.to_base32() == h).then_some(hash)
}

async fn narinfo(
    State(app): State<Arc<App>>,
    Extension(origin): Extension<Origin>,
    UrlPath(file): UrlPath<String>,
) -> Response {
    let Some(hash) = parse_narinfo_name(&file) else {
        return (StatusCode::BAD_REQUEST, "not a narinfo name\n").into_response();
    };
    app.metrics.narinfo_requests.inc();
    let started = Instant::now();
    let found = if origin.local {
        app.find(hash).await
    } else {
        // Another machine gets what this node shares with its peers, and nothing it would
        // have to fetch on that machine's behalf.
        app.find_shared(hash).await
    };
    if let Some(h) = &app.metrics.narinfo_latency {
        h.observe(started.elapsed().as_secs_f64());
    }
    match found {
        Some(info) => {
            app.metrics.narinfo_hits.inc();
            (
                [(header::CONTENT_TYPE, "text/x-nix-narinfo")],
                info.render(),
            )
                .into_response()
        }
        None => {
            app.metrics.narinfo_misses.inc();
            (StatusCode::NOT_FOUND, "not found\n").into_response()
        }
    }
}

impl App {
    async fn find(&self, hash: StorePathHash) -> Option<NarInfo> {
        let known = self.by_path.lock().expect("by_path").get(&hash).cloned();
        if let Some(p) = known {
            let nh = p.info.nar_hash;
            if self
                .store
                .blocking(move |cs| cs.has_manifest(&nh))
                .await
                .unwrap_or(false)
            {
                return Some(p.info.clone());
            }
        }
        let until = tokio::time::Instant::now() + self.timeout;
        if let Some(own) = self.find_shared(hash).await {
            return Some(own);
        }
        let found = self.lookup.find(hash, self.timeout).await?;
        let info = tokio::time::timeout_at(until, self.trust.present(&found.info))
            .await
            .ok()
            .flatten()?;
        debug!(%hash, peer = %found.peer, holders = found.holders.len(), "narinfo found");
        let p = Arc::new(Presented {
            info: info.clone(),
            peer: found.peer,
            holders: found.holders,
        });
        self.by_nar
            .lock()
            .expect("by_nar")
            .put(info.nar_hash, p.clone());
        self.by_path.lock().expect("by_path").put(hash, p);
        Some(info)
    }

    /// A path this node shares and holds: described by its own store database (or the
    /// narinfo kept when it was pinned, for a seeded path that left the store), signed with
    /// its key, served from the chunk store.
    async fn find_shared(&self, hash: StorePathHash) -> Option<NarInfo> {
        let own = peerix_swarm::Catalog::lookup(self.sharing.as_ref(), &hash)?;
        let nh = own.nar_hash;
        self.store
            .blocking(move |cs| cs.has_manifest(&nh))
            .await
            .unwrap_or(false)
            .then_some(own)
    }

    fn nar_lock(&self, h: Sha256Hash) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.nar_locks.lock().expect("nar_locks");
        m.retain(|_, l| Arc::strong_count(l) > 1);
        m.entry(h).or_default().clone()
    }
}

fn nar_response(size: u64, body: Body) -> Response {
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-nix-nar"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    r
}

type Chunk = std::result::Result<Bytes, std::io::Error>;

fn body_from(rx: mpsc::Receiver<Chunk>) -> Body {
    Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|c| (c, rx))
    }))
}

async fn nar(
    State(app): State<Arc<App>>,
    Extension(origin): Extension<Origin>,
    method: axum::http::Method,
    UrlPath(file): UrlPath<String>,
) -> Response {
    let Some(nar_hash) = parse_nar_name(&file) else {
        return (StatusCode::BAD_REQUEST, "not a NAR name\n").into_response();
    };
    if !origin.local && !peerix_swarm::Catalog::shares_nar(app.sharing.as_ref(), &nar_hash) {
        // The chunk store holds private NARs too: another machine gets only shared ones.
        return (StatusCode::NOT_FOUND, "not found\n").into_response();
    }
    if method == axum::http::Method::HEAD {
        // Answer from what is known; a HEAD must not start a download.
        let held = app
            .store
            .blocking(move |cs| cs.manifest(&nar_hash))
            .await
            .ok()
            .flatten()
            .map(|m| m.nar_size);
        let presented = || {
            app.by_nar
                .lock()
                .expect("by_nar")
                .get(&nar_hash)
                .map(|p| p.info.nar_size)
        };
        return match held.or_else(presented) {
            Some(size) => nar_response(size, Body::empty()),
            None => (StatusCode::NOT_FOUND, "not found\n").into_response(),
        };
    }
    let lock = app.nar_lock(nar_hash);
    let guard = lock.lock_owned().await;
    let held = app
        .store
        .blocking(move |cs| cs.manifest(&nar_hash))
        .await
        .ok()
        .flatten();
    if let Some(m) = held {
        drop(guard);
        return serve_stored(&app, nar_hash, m.nar_size);
    }
    if !origin.local {
        return (StatusCode::NOT_FOUND, "not found\n").into_response();
    }
    let presented = app.by_nar.lock().expect("by_nar").get(&nar_hash).cloned();
    let Some(p) = presented else {
        return (StatusCode::NOT_FOUND, "not found\n").into_response();
    };
    fetch_from_peers(app, p, guard).await
}

/// Fetch a NAR from the peers while it streams to Nix.
///
/// The response head waits for the first bytes, so a fetch that fails before them is a clean
/// 404 or 502 that Nix falls back from. After that, a failure cuts the body short; the byte
/// that would complete `Content-Length` is only sent once the fetch reported the whole NAR
/// verified, so a complete response always means a verified NAR. Every peer that lied is
/// banned, whatever the outcome.
async fn fetch_from_peers(
    app: Arc<App>,
    p: Arc<Presented>,
    guard: tokio::sync::OwnedMutexGuard<()>,
) -> Response {
    let nar_hash = p.info.nar_hash;
    let size = p.info.nar_size;
    // Banned peers are never asked again, even when a remembered narinfo names them.
    let mut holders = vec![p.peer];
    holders.extend(p.holders.iter().copied().filter(|h| *h != p.peer));
    holders.retain(|h| !app.node.is_banned(h));
    let others = app
        .node
        .connected_peers()
        .await
        .into_iter()
        .filter(|c| !holders.contains(c) && !app.node.is_banned(c))
        .collect();
    let req = FetchRequest {
        nar_hash,
        nar_size: size,
        holders,
        others,
        config: DownloadConfig {
            path: Some(p.info.store_path.clone()),
            ..DownloadConfig::default()
        },
    };
    let (nar_tx, mut nar_rx) = mpsc::channel::<Bytes>(BODY_QUEUE);
    let mut fetch = tokio::spawn(fetch_nar(
        app.client.clone(),
        app.store.clone(),
        req,
        nar_tx,
    ));
    let first = match nar_rx.recv().await {
        Some(b) => b,
        None => {
            // The fetch ended before its first byte.
            let outcome = (&mut fetch).await;
            let status = match &outcome {
                Ok(FetchOutcome {
                    result: Err(FetchError::NoManifest(_)),
                    ..
                }) => StatusCode::NOT_FOUND,
                _ => StatusCode::BAD_GATEWAY,
            };
            settle(&app, nar_hash, outcome, 0, size).await;
            return (status, "the NAR could not be fetched from peers\n").into_response();
        }
    };
    let (body_tx, body_rx) = mpsc::channel::<Chunk>(BODY_QUEUE);
    tokio::spawn(async move {
        let _guard = guard;
        let mut sent = 0u64;
        let mut last: Option<Bytes> = None;
        let mut receiver_gone = false;
        let mut overflow = false;
        let mut next = Some(first);
        loop {
            let b = match next.take() {
                Some(b) => b,
                None => match nar_rx.recv().await {
                    Some(b) => b,
                    None => break,
                },
            };
            let len = b.len() as u64;
            if last.is_some() || sent + len > size {
                // More than NarSize: never forwarded. Dropping the receiver stops the fetch.
                overflow = true;
                break;
            }
            if sent + len == size {
                // The bytes that complete the body wait for the fetch's verdict.
                last = Some(b);
                continue;
            }
            sent += len;
            app.metrics.nar_bytes_served.inc_by(len);
            if !receiver_gone && body_tx.send(Ok(b)).await.is_err() {
                // Nix went away; keep draining so the download still completes into the store.
                receiver_gone = true;
            }
        }
        drop(nar_rx);
        let outcome = fetch.await;
        let verified = !overflow
            && matches!(&outcome, Ok(FetchOutcome { result: Ok(()), .. }))
            && last.as_ref().is_some_and(|l| sent + l.len() as u64 == size);
        let why = match &outcome {
            _ if overflow => "the peers sent more than NarSize".to_owned(),
            Ok(FetchOutcome { result: Err(e), .. }) => e.to_string(),
            Ok(_) if !verified => format!("{sent} bytes of {size}"),
            Ok(_) => String::new(),
            Err(_) => "the fetch task died".into(),
        };
        settle(&app, nar_hash, outcome, sent, size).await;
        match last {
            Some(l) if verified => {
                app.metrics.nar_bytes_served.inc_by(l.len() as u64);
                let _ = body_tx.send(Ok(l)).await;
                info!(nar = %nar_hash, bytes = size, "NAR downloaded and served");
            }
            _ => {
                app.metrics.nar_downloads_failed.inc();
                warn!(nar = %nar_hash, error = %why, "NAR download failed; cutting the response");
                let _ = body_tx
                    .send(Err(std::io::Error::other(format!(
                        "download failed: {why}"
                    ))))
                    .await;
            }
        }
    });
    nar_response(size, body_from(body_rx))
}

/// After a fetch, whatever its outcome: ban the peers that lied, count what came from whom.
async fn settle(
    app: &App,
    nar_hash: Sha256Hash,
    outcome: std::result::Result<FetchOutcome, tokio::task::JoinError>,
    sent: u64,
    size: u64,
) {
    let Ok(outcome) = outcome else {
        return;
    };
    let report = &outcome.report;
    for bad in &report.bad_peers {
        let why = "lied about a NAR (bad chunks, or a manifest that does not make it)";
        app.node.ban(*bad, why).await;
        app.metrics.peers_banned.inc();
        eprintln!("peerix: banned peer {bad}: {why} ({nar_hash})");
    }
    for (peer, n) in &report.bytes_per_peer {
        app.metrics
            .bytes_from_peer
            .get_or_create(&PeerLabel {
                peer: peer.to_string(),
            })
            .inc_by(*n);
    }
    if outcome.result.is_ok() {
        app.metrics.dedup_saved_bytes.inc_by(report.bytes_local);
    }
    debug!(nar = %nar_hash, sent, size, ok = outcome.result.is_ok(), "fetch settled");
}

/// Stream a NAR the chunk store holds, read (and verified) on a blocking thread.
fn serve_stored(app: &Arc<App>, nar_hash: Sha256Hash, size: u64) -> Response {
    let (tx, rx) = mpsc::channel::<Chunk>(BODY_QUEUE);
    let store = app.store.clone();
    let app2 = app.clone();
    tokio::task::spawn_blocking(move || {
        let mut r = match store.nar_reader(&nar_hash) {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
                return;
            }
        };
        let mut buf = vec![0u8; READ_BUF];
        loop {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    app2.metrics.nar_bytes_served.inc_by(n as u64);
                    if tx
                        .blocking_send(Ok(Bytes::copy_from_slice(&buf[..n])))
                        .is_err()
                    {
                        break;
                    }
                }
                Err(e) => {
                    warn!(nar = %nar_hash, error = %e, "stored NAR unreadable; cutting the response");
                    let _ = tx.blocking_send(Err(e));
                    break;
                }
            }
        }
    });
    nar_response(size, body_from(rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(parse_narinfo_name("0000.narinfo").is_none());
        assert!(parse_narinfo_name("xyz.narinfo").is_none());
        assert!(parse_narinfo_name("../../../../../../../etc/passwd.narinfo").is_none());
        assert!(parse_narinfo_name("inrbbn8pggcp38qhr25j9nvp5f2micmp.narinfo").is_some());
        assert!(parse_narinfo_name("inrbbn8pggcp38qhr25j9nvp5f2micmp").is_none());
        assert!(parse_narinfo_name("eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee.narinfo").is_none());
        let h = "0kdc467rvrm9924cmghf8yyixdb9jbj6f77g9xp0w2srhmz4ri69";
        assert!(parse_nar_name(&format!("{h}.nar")).is_some());
        assert!(parse_nar_name(h).is_none());
        assert!(parse_nar_name("..%2F..%2Fetc%2Fpasswd.nar").is_none());
        assert!(parse_nar_name(&format!("{h}.nar.xz")).is_none());
    }
}
