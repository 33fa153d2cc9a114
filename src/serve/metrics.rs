//! The daemon's Prometheus metrics, and `/metrics` (for this machine only).

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use axum::extract::{Extension, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use peerix_swarm::PeerId;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::App;
use crate::http::Origin;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct PeerLabel {
    pub(super) peer: String,
}

/// Peers with a label of their own in each per-peer metric; the rest are added up under
/// `peer="others"`. Peer ids cost nothing to mint, and every label set is kept for good.
pub(super) const LABELLED_PEERS: usize = 256;

const OTHERS: &str = "others";

/// A per-peer byte counter with at most [`LABELLED_PEERS`] label sets (plus `others`): the
/// least recently counted peer's bytes move to `others` when a new one needs room.
pub(super) struct PeerBytes {
    family: Family<PeerLabel, Counter>,
    labelled: Mutex<lru::LruCache<PeerId, ()>>,
}

impl Default for PeerBytes {
    fn default() -> Self {
        Self {
            family: Family::default(),
            labelled: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(LABELLED_PEERS).expect("non-zero"),
            )),
        }
    }
}

fn label(peer: &str) -> PeerLabel {
    PeerLabel {
        peer: peer.to_owned(),
    }
}

impl PeerBytes {
    pub(super) fn inc_by(&self, peer: &PeerId, n: u64) {
        let mut labelled = self.labelled.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((old, ())) = labelled.push(*peer, ()) {
            if old != *peer {
                let l = label(&old.to_string());
                let moved = self.family.get(&l).map_or(0, |c| c.get());
                self.family.remove(&l);
                self.family.get_or_create(&label(OTHERS)).inc_by(moved);
            }
        }
        self.family
            .get_or_create(&label(&peer.to_string()))
            .inc_by(n);
    }
}

/// `kind="direct"` or `"relayed"` (peers); `kind="succeeded"` or `"failed"` (hole punches).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct KindLabel {
    pub(super) kind: &'static str,
}

/// Reachability, relays and hole punching, read from the node when `/metrics` is asked.
#[derive(Default)]
pub(super) struct NatMetrics {
    reachable: Gauge,
    relays: Gauge,
    peers: Family<KindLabel, Gauge>,
    relay_circuits_active: Gauge,
    relay_circuits: Gauge,
    hole_punches: Family<KindLabel, Gauge>,
}

impl NatMetrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "peerix_reachable",
            "1: a peer dialled this node back (AutoNAT); 0: behind NAT; -1: not probed yet",
            self.reachable.clone(),
        );
        r.register(
            "peerix_relay_reservations_held",
            "relays this node is reachable through",
            self.relays.clone(),
        );
        r.register(
            "peerix_peers_connected",
            "connected peers by their best connection (kind=direct or relayed)",
            self.peers.clone(),
        );
        r.register(
            "peerix_relay_circuits_active",
            "circuits this node relays for others now",
            self.relay_circuits_active.clone(),
        );
        r.register(
            "peerix_relay_circuits_opened",
            "circuits this node has relayed for others since the start",
            self.relay_circuits.clone(),
        );
        r.register(
            "peerix_hole_punches",
            "hole punching attempts since the start (kind=succeeded or failed)",
            self.hole_punches.clone(),
        );
    }

    pub(super) fn set(&self, o: &peerix_swarm::Overview) {
        let g = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.reachable.set(match o.reachability {
            peerix_swarm::Reachability::Public(_) => 1,
            peerix_swarm::Reachability::Private => 0,
            peerix_swarm::Reachability::Unknown => -1,
        });
        self.relays.set(g(o.relays.len() as u64));
        let relayed = o.peers.iter().filter(|p| p.relayed).count() as u64;
        let direct = o.peers.len() as u64 - relayed;
        for (kind, n) in [("direct", direct), ("relayed", relayed)] {
            self.peers.get_or_create(&KindLabel { kind }).set(g(n));
        }
        self.relay_circuits_active
            .set(g(o.relay_service.circuits_active));
        self.relay_circuits.set(g(o.relay_service.circuits_total));
        for (kind, n) in [
            ("succeeded", o.hole_punches.succeeded),
            ("failed", o.hole_punches.failed),
        ] {
            self.hole_punches
                .get_or_create(&KindLabel { kind })
                .set(g(n));
        }
    }
}

#[derive(Default)]
pub(super) struct Metrics {
    pub(super) nat: NatMetrics,
    pub(super) narinfo_requests: Counter,
    pub(super) narinfo_hits: Counter,
    pub(super) narinfo_misses: Counter,
    pub(super) nar_bytes_served: Counter,
    pub(super) nar_downloads_failed: Counter,
    pub(super) peers_banned: Counter,
    pub(super) bytes_from_peer: PeerBytes,
    pub(super) bytes_to_peer: Family<PeerLabel, Gauge>,
    pub(super) dedup_saved_bytes: Counter,
    pub(super) chunk_bytes_received: Counter,
    pub(super) chunk_wire_bytes: Counter,
    pub(super) compression_saved_bytes: Counter,
    pub(super) delta_saved_bytes: Counter,
    pub(super) narinfo_latency: Option<Histogram>,
    pub(super) prefetch: super::prefetch::PrefetchMetrics,
    /// Read from the chunk store when scraped (see [`peerix_chunkstore::PutWaits`]).
    put_disk_waits: Gauge,
    put_disk_stall_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl Metrics {
    pub(super) fn registry(&mut self) -> Registry {
        let mut r = Registry::default();
        self.nat.register(&mut r);
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
            "peerix_manifests_prefetched",
            "NAR manifests asked of a peer as its narinfo was found, before Nix asked for the NAR",
            self.prefetch.fetched.clone(),
        );
        r.register(
            "peerix_manifest_prefetches_used",
            "NAR fetches from peers that began with a manifest asked for ahead",
            self.prefetch.used.clone(),
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
            "verified chunk bytes received from each peer (uncompressed)",
            self.bytes_from_peer.family.clone(),
        );
        r.register(
            "peerix_peer_served_bytes",
            "chunk bytes served to each peer, as they went on the wire",
            self.bytes_to_peer.clone(),
        );
        r.register(
            "peerix_dedup_saved_bytes",
            "NAR bytes not downloaded because the chunks were already held",
            self.dedup_saved_bytes.clone(),
        );
        r.register(
            "peerix_chunk_bytes_received",
            "chunk bytes received from peers, as the NAR holds them",
            self.chunk_bytes_received.clone(),
        );
        r.register(
            "peerix_chunk_wire_bytes",
            "chunk bytes received from peers as they came over the wire (compressed or raw)",
            self.chunk_wire_bytes.clone(),
        );
        r.register(
            "peerix_compression_saved_bytes",
            "chunk bytes from peers that zstd kept off the wire",
            self.compression_saved_bytes.clone(),
        );
        r.register(
            "peerix_delta_saved_bytes",
            "chunk bytes from peers that deltas against older versions kept off the wire",
            self.delta_saved_bytes.clone(),
        );
        r.register(
            "peerix_narinfo_latency_seconds",
            "time to answer a narinfo request",
            h,
        );
        r.register(
            "peerix_put_disk_waits",
            "chunks a download received that had to wait for this machine's disk (it had fallen \
             behind the network)",
            self.put_disk_waits.clone(),
        );
        r.register(
            "peerix_put_disk_stall_seconds",
            "time downloads stood still waiting for this machine's disk",
            self.put_disk_stall_seconds.clone(),
        );
        r
    }
}

pub(super) async fn metrics(
    State(app): State<Arc<App>>,
    Extension(origin): Extension<Origin>,
) -> Response {
    if !origin.local {
        return StatusCode::NOT_FOUND.into_response();
    }
    // The server tracks many peers (`ServeLimits::max_tracked_peers`); the most served get a
    // label each, the rest are added up.
    let mut served: Vec<(PeerId, u64)> = app.server.bytes_served().into_iter().collect();
    served.sort_unstable_by_key(|(_, n)| std::cmp::Reverse(*n));
    let others: u64 = served
        .iter()
        .skip(LABELLED_PEERS)
        .map(|(_, n)| *n)
        .sum::<u64>()
        .saturating_add(app.server.bytes_served_to_others());
    let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    app.metrics.bytes_to_peer.clear();
    for (peer, n) in served.into_iter().take(LABELLED_PEERS) {
        app.metrics
            .bytes_to_peer
            .get_or_create(&label(&peer.to_string()))
            .set(gauge(n));
    }
    if others > 0 {
        app.metrics
            .bytes_to_peer
            .get_or_create(&label(OTHERS))
            .set(gauge(others));
    }
    app.metrics.nat.set(&app.node.overview().await);
    let waits = app.store.put_waits();
    app.metrics.put_disk_waits.set(gauge(waits.puts));
    app.metrics
        .put_disk_stall_seconds
        .set(waits.stalled.as_secs_f64());
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

impl App {
    /// The chunk traffic figures `peerix status` shows (the recompressed bytes are the
    /// store's, filled in by the caller).
    pub(super) fn traffic(&self) -> crate::admin::TrafficStatus {
        let m = &self.metrics;
        crate::admin::TrafficStatus {
            chunk_bytes_received: m.chunk_bytes_received.get(),
            wire_bytes_received: m.chunk_wire_bytes.get(),
            saved_by_dedup: m.dedup_saved_bytes.get(),
            saved_by_compression: m.compression_saved_bytes.get(),
            saved_by_delta: m.delta_saved_bytes.get(),
            wire_bytes_served: self.server.bytes_served().values().sum(),
            recompressed_bytes: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Peer ids cost nothing to mint: the label sets stay bounded and no byte is lost.
    #[test]
    fn per_peer_labels_are_bounded_and_the_rest_added_up() {
        let b = PeerBytes::default();
        let honest = PeerId::random();
        for _ in 0..(LABELLED_PEERS + 100) {
            b.inc_by(&PeerId::random(), 10);
            b.inc_by(&honest, 1);
        }
        let mut r = Registry::default();
        r.register("bytes", "bytes", b.family.clone());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
        let labels = text.lines().filter(|l| l.contains("peer=")).count();
        assert_eq!(
            labels,
            LABELLED_PEERS + 1,
            "one label per tracked peer, plus others"
        );
        let get = |l: &str| b.family.get(&label(l)).map_or(0, |c| c.get());
        assert_eq!(get(OTHERS), 101 * 10);
        assert_eq!(get(&honest.to_string()), LABELLED_PEERS as u64 + 100);
    }
}
