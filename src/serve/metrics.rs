//! The daemon's Prometheus metrics, and `/metrics` (for this machine only).

use std::sync::Arc;

use axum::extract::{Extension, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
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

#[derive(Default)]
pub(super) struct Metrics {
    pub(super) narinfo_requests: Counter,
    pub(super) narinfo_hits: Counter,
    pub(super) narinfo_misses: Counter,
    pub(super) nar_bytes_served: Counter,
    pub(super) nar_downloads_failed: Counter,
    pub(super) peers_banned: Counter,
    pub(super) bytes_from_peer: Family<PeerLabel, Counter>,
    pub(super) bytes_to_peer: Family<PeerLabel, Gauge>,
    pub(super) dedup_saved_bytes: Counter,
    pub(super) chunk_bytes_received: Counter,
    pub(super) chunk_wire_bytes: Counter,
    pub(super) compression_saved_bytes: Counter,
    pub(super) delta_saved_bytes: Counter,
    pub(super) narinfo_latency: Option<Histogram>,
}

impl Metrics {
    pub(super) fn registry(&mut self) -> Registry {
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
            "verified chunk bytes received from each peer (uncompressed)",
            self.bytes_from_peer.clone(),
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
