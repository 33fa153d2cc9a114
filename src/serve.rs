//! `peerix serve`: the substituter Nix talks to over HTTP, backed by the chunk store and the
//! swarm.
//!
//! A narinfo request is answered from what an earlier lookup presented, or by asking the
//! peers (under `--timeout`) and handing Nix what [`Trust::present`] makes of the first trusted
//! answer; nothing found is a quick 404, never a 5xx. A NAR request streams from the chunk
//! store when the whole NAR is held, or else is downloaded from the peers while it streams
//! (`nar`); a download that fails cuts the HTTP body short, so Nix never imports a wrong NAR.
//! This file is the daemon's wiring and the narinfo side; `metrics` holds its counters.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::extract::{Extension, Path as UrlPath, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use lru::LruCache;
use peerix_chunkstore::{ChunkStore, Options};
use peerix_nix::upstream::{UpstreamCache, UpstreamConfig};
use peerix_nix::{LocalStore, NarInfo, SecretKey, Sha256Hash, StorePathHash};
use peerix_swarm::{
    Client, Lookup, Node, NodeConfig, NodeEvent, PeerId, PeerSource, ServeLimits, Server,
    ServerHandle, WireConfig,
};
use prometheus_client::registry::Registry;
use tracing::{debug, info, warn};

use crate::admin::Daemon;
use crate::config::ServeConfig;
use crate::dashboard::stats::{Activity, Kind};
use crate::dashboard::{Dashboard, Settings};
use crate::http::{HttpLimits, Origin};
use crate::seed::Seeder;
use crate::share::{ShareConfig, Sharing};
use crate::trust::Trust;

mod housekeeping;
mod metrics;
mod nar;
mod prefetch;
mod recompress;

use housekeeping::Housekeeping;
use metrics::Metrics;

/// Presented narinfos remembered for the NAR request that follows.
const REMEMBERED: usize = 16_384;

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
    /// Manifests asked for as narinfos are found, for the NAR requests that follow.
    prefetch: prefetch::Prefetch,
    /// One download per NAR at a time; a second request waits and then reads the store.
    nar_locks: Mutex<HashMap<Sha256Hash, Arc<tokio::sync::Mutex<()>>>>,
    housekeeping: Housekeeping,
    metrics: Metrics,
    registry: Registry,
    dash: Arc<Dashboard>,
    /// How chunks are asked to travel from peers.
    wire: WireConfig,
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
    open_chunk_store_cut(state_dir, store_root, Options::default().chunker)
}

/// As [`open_chunk_store`], cutting chunks with `chunker` if the store is new.
fn open_chunk_store_cut(
    state_dir: &std::path::Path,
    store_root: &std::path::Path,
    chunker: peerix_chunkstore::ChunkerParams,
) -> Result<ChunkStore> {
    let dir = state_dir.join("chunks");
    ChunkStore::open(
        &dir,
        Options {
            store_root: Some(store_root.to_owned()),
            chunker,
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
    let store = open_chunk_store_cut(&cfg.state_dir, &cfg.store, cfg.chunker)?;
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
            upstream_concurrency: cfg.upstream_concurrency,
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
    nc.bootstrap = cfg.bootstrap.clone();
    nc.mdns = cfg.mdns;
    nc.relay_service = cfg.relay_service.clone();
    if let Some(k) = &cfg.swarm_key {
        nc.swarm_key = Some(peerix_swarm::node::read_swarm_key(k)?);
    }
    let node = Arc::new(Node::start(nc).await.context("starting the p2p node")?);
    let mut events = node.events();

    let limits = ServeLimits {
        max_upload_rate: cfg.max_upload_rate,
        cap_lan: cfg.cap_lan_uploads,
        ..ServeLimits::default()
    };
    let server = Server::new(store.clone(), sharing.clone(), limits).with_lan_peers({
        let node = node.clone();
        move |p| node.is_lan_peer(p)
    });
    let server_handle = server.handle();
    let control = node.stream_control();
    tokio::spawn(server.run(control).context("serving the peer protocol")?);

    let client = Client::new(node.stream_control());
    let has_own_key = own_key.is_some();
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
    let dash = Arc::new(Dashboard::new(
        &cfg.state_dir,
        node.clone(),
        server_handle.clone(),
        sharing.clone(),
        store.clone(),
        metrics.nar_bytes_served.clone(),
        Settings {
            http: addr,
            upstream: cfg.upstream_cache.clone(),
            own_key: has_own_key,
            trusted_keys: cfg.trusted_keys.len(),
            share_all: cfg.share_all,
            scan_interval: cfg.scan_interval,
            budget: cfg.max_store_size,
            mdns: cfg.mdns,
            explicit_peers: cfg.peers.clone(),
        },
    ));
    tokio::spawn(dash.clone().run());
    let cap = NonZeroUsize::new(REMEMBERED).expect("non-zero");
    let housekeeping = Housekeeping::start(store.clone(), cfg.max_store_size)
        .context("reclaiming interrupted downloads")?;
    // Recompressed frames may take an eighth of the disk budget (1 GiB without one).
    let recompressor = recompress::Recompressor::spawn(
        store.clone(),
        cfg.max_store_size.map_or(1 << 30, |b| b / 8),
        server_handle.subscribe(),
    );
    let app = Arc::new(App {
        priority: cfg.priority,
        timeout: cfg.timeout,
        store,
        housekeeping,
        node: node.clone(),
        prefetch: prefetch::Prefetch::new(client.clone(), cfg.timeout, metrics.prefetch.clone()),
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
        dash: dash.clone(),
        wire: WireConfig {
            compression: cfg.wire_compression,
            deltas: cfg.deltas,
            ..WireConfig::default()
        },
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
        traffic: {
            let app = app.clone();
            Box::new(move || app.traffic())
        },
        after_seed: {
            let r = recompressor.clone();
            Box::new(move || r.wake())
        },
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
                    app.dash.stats.peer_seen(&p.to_string(), true);
                }
            }
            loop {
                match events.recv().await {
                    Ok(NodeEvent::PeerConnected(p)) => {
                        if seen.insert(p) {
                            eprintln!("peerix: peer connected {p}");
                            app.dash.stats.peer_seen(&p.to_string(), true);
                        }
                    }
                    Ok(NodeEvent::PeerDisconnected(p)) => {
                        seen.remove(&p);
                        eprintln!("peerix: peer disconnected {p}");
                        app.dash.stats.peer_seen(&p.to_string(), false);
                    }
                    Ok(NodeEvent::Announced(h)) => app.lookup.forget_miss(&h),
                    Ok(NodeEvent::ExplicitPeerUnreachable { spec, error }) => {
                        eprintln!("peerix: cannot reach peer {spec}: {error}");
                    }
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
        let housekeeping = app.housekeeping.clone();
        let dash = dash.clone();
        tokio::spawn(sharing.run(interval, move |s| {
            let shared = s.shared_hashes();
            let n = shared.len();
            node.set_provided(shared);
            eprintln!("peerix: scan done: {n} shared");
            dash.stats
                .log(Activity::new(Kind::Scan, true).detail(format!("{n} paths shared")));
            housekeeping.collect();
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
    // The dashboard's counters outlive the process.
    let _ = tokio::task::spawn_blocking(move || dash.save()).await;
    Ok(())
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
    let dashboard = crate::dashboard::router(app.dash.clone());
    Router::new()
        .route("/nix-cache-info", get(cache_info))
        .route("/health", get(|| async { "ok" }))
        .route("/metrics", get(metrics::metrics))
        .route("/nar/:file", get(nar::nar))
        .route("/:file", get(narinfo))
        .fallback(|| async { StatusCode::NOT_FOUND })
        .with_state(app)
        .merge(dashboard)
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

/// `<32 nix-base32 chars>.narinfo`, and nothing else.
fn parse_narinfo_name(file: &str) -> Option<StorePathHash> {
    let h = file.strip_suffix(".narinfo")?;
    if h.len() != 32 {
        return None;
    }
    h.parse().ok()
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
    if origin.local {
        let path = found.as_ref().map(|i| i.store_path.to_string());
        app.dash.stats.check(&hash.to_string(), path.as_deref());
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
                .blocking(move |cs| cs.readable_manifest(&nh).map(|m| m.is_some()))
                .await
                .unwrap_or(false)
            {
                return Some(p.info.clone());
            }
        }
        if let Some(own) = self.find_shared(hash).await {
            return Some(own);
        }
        self.find_remote(hash).await.map(|p| p.info.clone())
    }

    /// Ask the peers for a path (trusted answers only, within the lookup deadline); what is
    /// found is remembered for the NAR request that follows.
    async fn find_remote(&self, hash: StorePathHash) -> Option<Arc<Presented>> {
        let until = tokio::time::Instant::now() + self.timeout;
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
        self.by_path.lock().expect("by_path").put(hash, p.clone());
        self.prefetch.start(p.peer, info.nar_hash, info.nar_size);
        Some(p)
    }

    /// The store path of a NAR the chunk store holds, if it knows it.
    async fn stored_path(&self, nar_hash: Sha256Hash) -> Option<StorePathHash> {
        if let Some(p) = self.by_nar.lock().expect("by_nar").get(&nar_hash) {
            return Some(p.info.store_path.hash());
        }
        self.store
            .blocking(move |cs| cs.local_source(&nar_hash))
            .await
            .ok()
            .flatten()
            .map(|p| p.hash())
    }

    /// A path this node shares and holds: described by its own store database (or the
    /// narinfo kept when it was pinned, for a seeded path that left the store), signed with
    /// its key, served from the chunk store.
    async fn find_shared(&self, hash: StorePathHash) -> Option<NarInfo> {
        let own = peerix_swarm::Catalog::lookup(self.sharing.as_ref(), &hash)?;
        let nh = own.nar_hash;
        self.store
            .blocking(move |cs| cs.readable_manifest(&nh).map(|m| m.is_some()))
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
    }
}
