//! Fetching one NAR from the peers: find a manifest that matches what the narinfo promised,
//! download the chunks from every peer that has them, and name every peer that lied on the
//! way. The daemon's NAR endpoint and `peerix bench` both fetch through here.

use bytes::Bytes;
use libp2p::PeerId;
use peerix_chunkstore::{ChunkStore, Manifest};
use peerix_nix::Sha256Hash;
use thiserror::Error;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::client::Client;
use crate::download::{download, DownloadConfig, DownloadError, DownloadReport, Peers};

/// Peers beyond the holders asked for a manifest.
const MANIFEST_FROM_OTHERS: usize = 8;

/// What to fetch and from whom.
#[derive(Clone, Debug)]
pub struct FetchRequest {
    pub nar_hash: Sha256Hash,
    pub nar_size: u64,
    /// Peers that said they hold the NAR, best first: the manifest is asked of them in turn.
    pub holders: Vec<PeerId>,
    /// Further peers that may hold some of its chunks (those we are connected to).
    pub others: Vec<PeerId>,
    /// A manifest one of the holders gave before the fetch began (asked for when its narinfo
    /// was found): used in place of asking that holder again, and checked as its answer would
    /// be. Over a long path this saves the fetch a round trip.
    pub manifest: Option<(PeerId, Manifest)>,
    pub config: DownloadConfig,
}

#[derive(Debug, Error)]
pub enum FetchError {
    #[error("no peer has a manifest of {0} any more")]
    NoManifest(Sha256Hash),
    #[error(transparent)]
    Download(#[from] DownloadError),
}

/// How a fetch ended. `report.bad_peers` names every peer that lied, whatever the outcome:
/// senders of chunks that do not match their ids, and suppliers of manifests that do not add
/// up or do not make the NAR they name.
#[derive(Debug)]
pub struct FetchOutcome {
    pub report: DownloadReport,
    /// The peer whose manifest was used.
    pub manifest_from: Option<PeerId>,
    pub result: Result<(), FetchError>,
}

/// A peer that lied, and what it did.
fn liar(report: &mut DownloadReport, peer: PeerId, why: &str) {
    warn!(%peer, why, "peer lied about a NAR");
    if !report.bad_peers.contains(&peer) {
        report.bad_peers.push(peer);
    }
}

/// Fetch the NAR, streaming it to `out` in order; see [`download`] for what reaches `out`.
pub async fn fetch_nar(
    client: Client,
    store: ChunkStore,
    mut req: FetchRequest,
    out: mpsc::Sender<Bytes>,
) -> FetchOutcome {
    let mut report = DownloadReport::default();
    let mut early = req.manifest.take();
    let mut found: Option<(PeerId, Manifest)> = None;
    // Holders asked for the manifest that had none to give: they may hold some chunks still,
    // but not the whole NAR.
    let mut wanting: Vec<PeerId> = vec![];
    // The holders first; then a few other peers, which may hold the NAR without having been
    // asked about its path (or when every holder lied).
    let candidates = req
        .holders
        .iter()
        .chain(req.others.iter().take(MANIFEST_FROM_OTHERS));
    for &peer in candidates {
        let answer = match early.take_if(|(from, _)| *from == peer) {
            Some((_, m)) => Ok(Some(m)),
            None => client.manifest(peer, req.nar_hash).await,
        };
        match answer {
            Ok(Some(m)) if m.nar_size != req.nar_size => {
                liar(&mut report, peer, "a manifest with another NarSize");
            }
            Ok(Some(m)) => match m.validate() {
                Ok(()) => {
                    found = Some((peer, m));
                    break;
                }
                Err(e) => liar(&mut report, peer, &e.to_string()),
            },
            Ok(None) => debug!(%peer, nar = %req.nar_hash, "peer has no manifest"),
            Err(e) if e.is_misbehaviour() => liar(&mut report, peer, &e.to_string()),
            Err(e) => debug!(%peer, error = %e, "manifest request failed"),
        }
        wanting.push(peer);
    }
    let Some((from, manifest)) = found else {
        return FetchOutcome {
            report,
            manifest_from: None,
            result: Err(FetchError::NoManifest(req.nar_hash)),
        };
    };
    // The supplier of the manifest and the holders not found wanting hold the whole NAR, as
    // far as we know: they get runs at once. The rest are asked which chunks they hold.
    let mut peers = Peers::default();
    for p in std::iter::once(&from)
        .chain(&req.holders)
        .chain(&req.others)
    {
        let known = peers.whole.contains(p) || peers.some.contains(p);
        if known || report.bad_peers.contains(p) {
            continue;
        }
        if *p == from || (req.holders.contains(p) && !wanting.contains(p)) {
            peers.whole.push(*p);
        } else {
            peers.some.push(*p);
        }
    }
    let outcome = download(client, store, manifest, peers, req.config, out).await;
    for p in outcome.report.bad_peers.iter().copied() {
        if !report.bad_peers.contains(&p) {
            report.bad_peers.push(p);
        }
    }
    let bad_peers = std::mem::take(&mut report.bad_peers);
    report = outcome.report;
    report.bad_peers = bad_peers;
    if let Err(e) = &outcome.result {
        if e.is_manifest_lie() {
            liar(&mut report, from, &e.to_string());
        }
    }
    FetchOutcome {
        report,
        manifest_from: Some(from),
        result: outcome.result.map_err(FetchError::from),
    }
}
