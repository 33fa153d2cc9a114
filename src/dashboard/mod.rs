//! `/dashboard`: what the daemon is doing, for the person at this machine. The page (HTML, CSS
//! and JS embedded in the binary: it works with no internet) polls `/dashboard/api`, a JSON view
//! of the node, its peers, what it shares and why, the chunk store, the busiest paths, live
//! throughput and the recent activity. Every route is GET-only and answered to loopback
//! clients only; anyone else gets a 404, as for `/metrics`.
//!
//! The counters behind it live in [`stats`] and are saved in the state directory every minute
//! and at shutdown, so they survive restarts.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Extension, State};
use axum::http::{header, HeaderMap, HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use peerix_chunkstore::ChunkStore;
use peerix_swarm::{Node, Reachability, ServerEvent, ServerHandle};
use prometheus_client::metrics::counter::Counter;
use serde_json::{json, Value};
use tracing::{debug, warn};

use crate::http::Origin;
use crate::seed::SeedStatus;
use crate::share::{Reason, Sharing};

mod assets;
pub mod stats;

use stats::{Activity, Kind, Last, PathStat, Stats};

/// Where the counters are kept, in the state directory.
pub const STATS_FILE: &str = "dashboard.json";
/// How often the counters are saved while the daemon runs.
const SAVE_EVERY: Duration = Duration::from_secs(60);
/// The chunk store's figures are read at most this often (a read walks its index).
const STORE_VIEW_TTL: Duration = Duration::from_secs(10);
/// Rows of each list the page gets.
const TOP: usize = 10;
const PEER_ROWS: usize = 50;
const ACTIVITY_ROWS: usize = 60;

/// How the daemon was started, as far as the page shows it.
#[derive(Clone, Debug)]
pub struct Settings {
    pub http: SocketAddr,
    pub upstream: Option<String>,
    pub own_key: bool,
    pub trusted_keys: usize,
    pub share_all: bool,
    pub scan_interval: Option<Duration>,
    /// `--max-store-size`: what the packs may hold.
    pub budget: Option<u64>,
    pub mdns: bool,
    pub explicit_peers: Vec<String>,
}

pub struct Dashboard {
    pub stats: Stats,
    node: Arc<Node>,
    server: ServerHandle,
    sharing: Arc<Sharing>,
    store: ChunkStore,
    /// The daemon's running total of NAR bytes sent to Nix.
    to_nix: Counter,
    settings: Settings,
    started: Instant,
    store_view: tokio::sync::Mutex<Option<(Instant, Value)>>,
    /// Throughput samples taken so far: `/dashboard/api?after=N` waits for the next one.
    samples: tokio::sync::watch::Sender<u64>,
}

impl Dashboard {
    /// The counters are read from the state directory; a file that cannot be read is reported
    /// and set aside, and the dashboard starts from zero.
    pub fn new(
        state_dir: &Path,
        node: Arc<Node>,
        server: ServerHandle,
        sharing: Arc<Sharing>,
        store: ChunkStore,
        to_nix: Counter,
        settings: Settings,
    ) -> Self {
        let file = state_dir.join(STATS_FILE);
        let stats = Stats::load(&file).unwrap_or_else(|e| {
            warn!(error = %e, "dashboard counters unreadable; starting from zero");
            let _ = std::fs::rename(&file, file.with_extension("json.bad"));
            Stats::fresh(&file)
        });
        Self {
            stats,
            node,
            server,
            sharing,
            store,
            to_nix,
            settings,
            started: Instant::now(),
            store_view: tokio::sync::Mutex::new(None),
            samples: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Save the counters now, saying so when that fails.
    pub fn save(&self) {
        match self.stats.save() {
            Ok(true) => debug!("dashboard counters saved"),
            Ok(false) => {}
            Err(e) => warn!(error = %e, "cannot save the dashboard counters"),
        }
    }

    /// Throughput samples, peers' served bytes and periodic saves; and what the peer-protocol
    /// server reports (a peer fetching a NAR from this node). Runs until the daemon stops.
    pub async fn run(self: Arc<Self>) {
        let mut events = self.server.subscribe();
        let mut tick = tokio::time::interval(stats::SAMPLE_EVERY);
        let mut last = Last::default();
        let mut saved_at = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let to_peers: Vec<(String, u64)> = self
                        .server
                        .bytes_served()
                        .into_iter()
                        .map(|(p, n)| (p.to_string(), n))
                        .collect();
                    self.stats.sample(self.to_nix.get(), &to_peers, &mut last);
                    self.samples.send_modify(|n| *n += 1);
                    if saved_at.elapsed() >= SAVE_EVERY {
                        saved_at = Instant::now();
                        let d = self.clone();
                        let _ = tokio::task::spawn_blocking(move || d.save()).await;
                    }
                }
                e = events.recv() => match e {
                    Ok(ServerEvent::ManifestServed { peer, nar_hash }) => {
                        let (path, size) = self
                            .sharing
                            .path_of_nar(&nar_hash)
                            .unwrap_or_else(|| (format!("sha256:{}", nar_hash.to_base32()), 0));
                        self.stats.served(&path, &peer.to_string(), size);
                    }
                    Ok(ServerEvent::Offender { peer }) => {
                        self.stats.log(
                            Activity::new(Kind::Ban, false)
                                .peer(peer)
                                .detail("refused for malformed requests"),
                        );
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        debug!(missed = n, "dashboard missed server events");
                    }
                    Err(_) => return,
                }
            }
        }
    }

    /// The chunk store's figures and the seeds, read at most every [`STORE_VIEW_TTL`].
    async fn store_view(&self) -> Value {
        let mut cached = self.store_view.lock().await;
        if let Some((at, v)) = cached.as_ref() {
            if at.elapsed() < STORE_VIEW_TTL {
                return v.clone();
            }
        }
        let read = self
            .store
            .blocking(|cs| Ok((cs.stats(), crate::seed::seed_statuses(cs))))
            .await;
        let v = match read {
            Ok((Ok(s), Ok(seeds))) => store_json(&s, &seeds, self.settings.budget),
            Ok((Ok(s), Err(e))) => {
                warn!(error = %format!("{e:#}"), "cannot list the seeds for the dashboard");
                store_json(&s, &[], self.settings.budget)
            }
            Ok((Err(e), _)) | Err(e) => json!({ "error": e.to_string() }),
        };
        *cached = Some((Instant::now(), v.clone()));
        v
    }

    /// Everything the page shows, as JSON.
    pub async fn snapshot(&self) -> Value {
        let overview = self.node.overview().await;
        let (saved, samples) = self.stats.snapshot();
        let store = self.store_view().await;
        let counts = self.sharing.counts();
        let n = |r| counts.get(&r).copied().unwrap_or(0);

        // Connected peers first, then the others by when they were last seen.
        let mut peers: Vec<Value> = Vec::new();
        let mut listed = std::collections::HashSet::new();
        for p in &overview.peers {
            let id = p.peer.to_string();
            let st = saved.peers.get(&id).cloned().unwrap_or_default();
            listed.insert(id.clone());
            peers.push(json!({
                "id": id,
                "connected": true,
                "addr": p.addr.as_ref().map(|a| a.to_string()),
                "relayed": p.relayed,
                "inbound": p.inbound,
                "rtt_ms": p.rtt.map(|d| d.as_secs_f64() * 1000.0),
                "connected_secs": p.connected_for.as_secs(),
                "bytes_from": st.bytes_from,
                "bytes_to": st.bytes_to,
                "downloads": st.downloads,
                "serves": st.serves,
                "last_seen": st.last_seen,
                "banned": self.node.is_banned(&p.peer),
                "ban_reason": st.banned,
            }));
        }
        let mut others: Vec<_> = saved
            .peers
            .iter()
            .filter(|(id, _)| !listed.contains(*id))
            .collect();
        others.sort_by_key(|(_, s)| std::cmp::Reverse(s.last_seen));
        for (id, st) in others
            .into_iter()
            .take(PEER_ROWS.saturating_sub(peers.len()))
        {
            let banned = id.parse().map(|p| self.node.is_banned(&p)).unwrap_or(false);
            peers.push(json!({
                "id": id,
                "connected": false,
                "bytes_from": st.bytes_from,
                "bytes_to": st.bytes_to,
                "downloads": st.downloads,
                "serves": st.serves,
                "last_seen": st.last_seen,
                "banned": banned,
                "ban_reason": st.banned,
            }));
        }

        let inbound = overview.peers.iter().any(|p| p.inbound);
        let relays = overview
            .relays
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>();
        let reachability = match &overview.reachability {
            Reachability::Public(a) => format!("reachable at {a}"),
            Reachability::Private if relays.is_empty() => {
                "behind NAT, no relay reservation yet".to_owned()
            }
            Reachability::Private => {
                format!("behind NAT, reachable through relay {}", relays.join(", "))
            }
            Reachability::Unknown if inbound => "not probed yet; peers have dialled in".to_owned(),
            Reachability::Unknown if !overview.peers.is_empty() => {
                "not probed yet; no peer has dialled in".to_owned()
            }
            Reachability::Unknown => "no peers connected".to_owned(),
        };
        let s = &self.settings;
        json!({
            "now": stats::now_ms(),
            "samples_taken": *self.samples.borrow(),
            "node": {
                "peer_id": self.node.peer_id().to_string(),
                "version": env!("CARGO_PKG_VERSION"),
                "uptime_secs": self.started.elapsed().as_secs(),
                "http": s.http.to_string(),
                "listen": self.node.listen_addrs().iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                "external": overview.external_addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                "reachability": reachability,
                "mdns": s.mdns,
                "explicit_peers": s.explicit_peers,
            },
            "peers": peers,
            "sharing": {
                "total": counts.values().sum::<usize>(),
                "upstream": n(Reason::Upstream),
                "own_signature": n(Reason::OwnSignature),
                "pinned": n(Reason::Pinned),
                "share_all": n(Reason::OptIn),
                "upstream_cache": s.upstream,
                "own_key": s.own_key,
                "trusted_keys": s.trusted_keys,
                "share_all_on": s.share_all,
                "scan_interval_secs": s.scan_interval.map(|d| d.as_secs()),
            },
            "store": store,
            "totals": saved.totals,
            "top_requested": top(saved.requested.into_values()),
            "top_served": top(saved.served.into_values()),
            "throughput": {
                "interval_secs": stats::SAMPLE_EVERY.as_secs(),
                "samples": samples,
            },
            "activity": saved.activity.iter().rev().take(ACTIVITY_ROWS).collect::<Vec<_>>(),
        })
    }
}

fn top(rows: impl Iterator<Item = PathStat>) -> Vec<PathStat> {
    let mut v: Vec<PathStat> = rows.collect();
    // The name last: paths asked for in the same millisecond keep one order, whatever order
    // the table (a HashMap) gives them in.
    v.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then(b.last.cmp(&a.last))
            .then_with(|| a.name.cmp(&b.name))
    });
    v.truncate(TOP);
    v
}

fn store_json(s: &peerix_chunkstore::Stats, seeds: &[SeedStatus], budget: Option<u64>) -> Value {
    json!({
        "nars": s.manifests,
        "logical_bytes": s.logical_bytes,
        "unique_bytes": s.unique_bytes,
        "dedup_saved_bytes": s.logical_bytes.saturating_sub(s.unique_bytes),
        "dedup_ratio": s.dedup_ratio(),
        "in_place_bytes": s.local_bytes,
        "packed_bytes": s.packed_bytes,
        "packed_stored_bytes": s.packed_stored_bytes,
        "compression_saved_bytes": s.packed_bytes.saturating_sub(s.packed_stored_bytes),
        "pack_file_bytes": s.pack_file_bytes,
        "index_bytes": s.index_bytes,
        "stored_bytes": s.pack_file_bytes + s.index_bytes,
        "pins": s.pins,
        // Past it, least recently used NARs held only in packs are evicted.
        "budget_bytes": budget,
        "seeds": seeds,
    })
}

/// The page, its assets and its JSON, for loopback clients.
pub fn router(d: Arc<Dashboard>) -> Router {
    Router::new()
        .route("/dashboard", get(page))
        .route("/dashboard/", get(page))
        .route("/dashboard/app.js", get(script))
        .route("/dashboard/style.css", get(style))
        .route("/dashboard/api", get(api))
        .with_state(d)
}

const NOT_HERE: (StatusCode, &str) = (StatusCode::NOT_FOUND, "not found\n");

/// A request from this machine, naming this machine: a page elsewhere that rebinds its own
/// name to 127.0.0.1 (DNS rebinding) reaches the loopback listener, but with its own name in
/// `Host`.
fn for_us(origin: Origin, headers: &HeaderMap) -> bool {
    if !origin.local {
        return false;
    }
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return true; // HTTP/1.0 without Host: no browser sends that.
    };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn asset(ok: bool, kind: &'static str, body: &'static str) -> Response {
    if !ok {
        return NOT_HERE.into_response();
    }
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            // Everything comes from this origin; nothing inline, nothing from elsewhere.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
            ),
            (HeaderName::from_static("referrer-policy"), "no-referrer"),
        ],
        body,
    )
        .into_response()
}

async fn page(Extension(origin): Extension<Origin>, headers: HeaderMap) -> Response {
    asset(
        for_us(origin, &headers),
        "text/html; charset=utf-8",
        assets::INDEX_HTML,
    )
}

async fn script(Extension(origin): Extension<Origin>, headers: HeaderMap) -> Response {
    asset(
        for_us(origin, &headers),
        "text/javascript; charset=utf-8",
        assets::APP_JS,
    )
}

async fn style(Extension(origin): Extension<Origin>, headers: HeaderMap) -> Response {
    asset(
        for_us(origin, &headers),
        "text/css; charset=utf-8",
        assets::STYLE_CSS,
    )
}

#[derive(serde::Deserialize)]
struct ApiQuery {
    /// Answer once more than this many samples have been taken (at most [`LONG_POLL`] later):
    /// a client follows the sampling instead of guessing when to ask.
    after: Option<u64>,
}

/// How long `/dashboard/api?after=N` may wait for the next sample.
const LONG_POLL: Duration = Duration::from_secs(15);

async fn api(
    State(d): State<Arc<Dashboard>>,
    Extension(origin): Extension<Origin>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<ApiQuery>,
) -> Response {
    if !for_us(origin, &headers) {
        return NOT_HERE.into_response();
    }
    if let Some(after) = q.after {
        let mut rx = d.samples.subscribe();
        let _ = tokio::time::timeout(LONG_POLL, rx.wait_for(|n| *n > after)).await;
    }
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        d.snapshot().await.to_string(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Paths asked for in the same millisecond come out in one order, whatever order the
    /// table gives them in (the restart in `tests/dashboard.rs` compares the lists).
    #[test]
    fn ties_in_the_top_lists_have_one_order() {
        let row = |name: &str| PathStat {
            name: name.into(),
            count: 1,
            last: 7,
            ..PathStat::default()
        };
        let names = |v: Vec<PathStat>| v.into_iter().map(|p| p.name).collect::<Vec<_>>();
        let a = top([row("leaf"), row("mid")].into_iter());
        let b = top([row("mid"), row("leaf")].into_iter());
        assert_eq!(names(a), names(b));
    }

    #[test]
    fn only_this_machine_by_its_own_names() {
        let local = Origin { local: true };
        let with = |h: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::HOST, h.parse().unwrap());
            m
        };
        for ok in [
            "127.0.0.1:12304",
            "localhost:80",
            "[::1]:12304",
            "127.0.0.1",
            "LOCALHOST",
        ] {
            assert!(for_us(local, &with(ok)), "{ok}");
        }
        for bad in [
            "evil.example:12304",
            "10.0.0.1:12304",
            "[fe80::1]:1",
            "localhost.evil:1",
        ] {
            assert!(!for_us(local, &with(bad)), "{bad}");
        }
        assert!(!for_us(Origin { local: false }, &with("127.0.0.1:12304")));
    }
}
