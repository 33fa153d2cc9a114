//! `/nar/<narhash>.nar`: a NAR streamed to Nix from the chunk store, or fetched from the peers
//! while it streams, never completing a response on bytes that were not verified.

use std::io::Read;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Extension, Path as UrlPath, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use peerix_nix::Sha256Hash;
use peerix_swarm::{fetch_nar, DownloadConfig, FetchError, FetchOutcome, FetchRequest};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{App, Presented};
use crate::http::Origin;

/// Chunks of NAR buffered between the store or the download and the HTTP body.
const BODY_QUEUE: usize = 8;
const READ_BUF: usize = 256 * 1024;

/// `<52 nix-base32 chars>.nar`, in Nix's canonical encoding.
fn parse_nar_name(file: &str) -> Option<Sha256Hash> {
    let h = file.strip_suffix(".nar")?;
    if h.len() != 52 {
        return None;
    }
    let hash = Sha256Hash::parse_digest(h).ok()?;
    (hash.to_base32() == h).then_some(hash)
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

pub(super) async fn nar(
    State(app): State<Arc<App>>,
    Extension(origin): Extension<Origin>,
    method: axum::http::Method,
    UrlPath(file): UrlPath<String>,
) -> Response {
    let Some(nar_hash) = parse_nar_name(&file) else {
        return (StatusCode::BAD_REQUEST, "not a NAR name\n").into_response();
    };
    debug!(nar = %nar_hash, local = origin.local, "NAR requested");
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
        .blocking(move |cs| cs.readable_manifest(&nar_hash))
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
/// 404 or 502 that Nix falls back from. After that, a failure cuts the body short; the bytes
/// that complete `Content-Length` are only sent once the download has checked the whole NAR
/// against its NarHash, so a complete response always means a verified NAR. Every peer that
/// lied is banned, whatever the outcome.
async fn fetch_from_peers(
    app: Arc<App>,
    p: Arc<Presented>,
    guard: tokio::sync::OwnedMutexGuard<()>,
) -> Response {
    let size = p.info.nar_size;
    let started = match start_fetch(&app, &p).await {
        Ok(s) => s,
        Err(status) => {
            return (status, "the NAR could not be fetched from peers\n").into_response();
        }
    };
    let (body_tx, body_rx) = mpsc::channel::<Chunk>(BODY_QUEUE);
    tokio::spawn(async move {
        let _guard = guard;
        forward(&app, &p, started, &body_tx, 0).await;
    });
    nar_response(size, body_from(body_rx))
}

/// A fetch from the peers under way, with the first bytes it produced.
struct Started {
    fetch: tokio::task::JoinHandle<FetchOutcome>,
    nar_rx: mpsc::Receiver<Bytes>,
    first: Bytes,
}

/// Start fetching the NAR `p` describes; wait for its first bytes. A fetch that ends before
/// them is settled here, and the status Nix should get is returned.
async fn start_fetch(app: &Arc<App>, p: &Arc<Presented>) -> Result<Started, StatusCode> {
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
        nar_hash: p.info.nar_hash,
        nar_size: p.info.nar_size,
        holders,
        others,
        manifest: app.prefetch.take(&p.info.nar_hash),
        config: DownloadConfig {
            path: Some(p.info.store_path.clone()),
            wire: app.wire.clone(),
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
    match nar_rx.recv().await {
        Some(first) => Ok(Started {
            fetch,
            nar_rx,
            first,
        }),
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
            let why = match &outcome {
                Ok(FetchOutcome { result: Err(e), .. }) => e.to_string(),
                Ok(_) => "no bytes arrived".to_owned(),
                Err(_) => "the fetch task died".to_owned(),
            };
            settle(app, p, outcome, 0, Some(&why)).await;
            Err(status)
        }
    }
}

/// Hand a fetch's NAR to the body from byte `skip` on (what came before was sent already),
/// holding back the bytes that complete it until its output closed with them, which the
/// download does only once the whole NAR is verified (more bytes than NarSize, or an output
/// that closed short, end the body with an error). Settles the fetch.
async fn forward(
    app: &Arc<App>,
    p: &Presented,
    started: Started,
    body_tx: &mpsc::Sender<Chunk>,
    skip: u64,
) {
    let Started {
        fetch,
        mut nar_rx,
        first,
    } = started;
    let nar_hash = p.info.nar_hash;
    let size = p.info.nar_size;
    // `at`: NAR bytes the fetch produced so far; `sent`: NAR bytes the body has (from `skip`).
    let (mut at, mut sent) = (0u64, skip);
    let mut last: Option<Bytes> = None;
    let mut receiver_gone = false;
    let mut overflow = false;
    let mut next = Some(first);
    loop {
        let mut b = match next.take() {
            Some(b) => b,
            None => match nar_rx.recv().await {
                Some(b) => b,
                None => break,
            },
        };
        let len = b.len() as u64;
        at += len;
        if at <= skip {
            continue;
        }
        if at - len < skip {
            b = b.slice((skip - (at - len)) as usize..);
        }
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
    // The download hands out the bytes that complete the NAR only once the whole NAR matched
    // its NarHash, and closes its output with them (`peerix_swarm::download`): they go to Nix
    // now, while the fetch commits the NAR to the store.
    let verified = !overflow && last.as_ref().is_some_and(|l| sent + l.len() as u64 == size);
    if let Some(l) = last.filter(|_| verified) {
        app.metrics.nar_bytes_served.inc_by(l.len() as u64);
        let _ = body_tx.send(Ok(l)).await;
        info!(nar = %nar_hash, bytes = size, "NAR downloaded and served");
    }
    let outcome = fetch.await;
    let why = match &outcome {
        _ if overflow => "the peers sent more than NarSize".to_owned(),
        Ok(FetchOutcome { result: Err(e), .. }) => e.to_string(),
        Ok(_) if !verified => format!("{sent} bytes of {size}"),
        Ok(_) => String::new(),
        Err(_) => "the fetch task died".into(),
    };
    if verified && !why.is_empty() {
        // Nix has the NAR; only the store's copy is missing, and a later fetch makes it.
        warn!(nar = %nar_hash, error = %why, "NAR served, but not kept in the chunk store");
    }
    settle(app, p, outcome, sent, (!verified).then_some(why.as_str())).await;
    app.housekeeping.after_download().await;
    if !verified {
        app.metrics.nar_downloads_failed.inc();
        warn!(nar = %nar_hash, error = %why, "NAR download failed; cutting the response");
        let _ = body_tx
            .send(Err(std::io::Error::other(format!(
                "download failed: {why}"
            ))))
            .await;
    }
}

/// After a fetch, whatever its outcome: ban the peers that lied, count what came from whom.
/// `failure`: why the NAR did not reach Nix whole, if it did not.
async fn settle(
    app: &App,
    p: &Presented,
    outcome: std::result::Result<FetchOutcome, tokio::task::JoinError>,
    sent: u64,
    failure: Option<&str>,
) {
    let nar_hash = p.info.nar_hash;
    let size = p.info.nar_size;
    let path = p.info.store_path.to_string();
    let Ok(outcome) = outcome else {
        app.dash.stats.downloaded(
            &path,
            &[],
            size,
            Some(failure.unwrap_or("the fetch task died")),
        );
        return;
    };
    let report = &outcome.report;
    for bad in &report.bad_peers {
        let why = "lied about a NAR (bad chunks, or a manifest that does not make it)";
        app.node.ban(*bad, why).await;
        app.metrics.peers_banned.inc();
        app.dash.stats.banned(&bad.to_string(), why);
        eprintln!("peerix: banned peer {bad}: {why} ({nar_hash})");
    }
    for (peer, n) in &report.bytes_per_peer {
        app.metrics.bytes_from_peer.inc_by(peer, *n);
    }
    if outcome.result.is_ok() {
        app.metrics.dedup_saved_bytes.inc_by(report.bytes_local);
    }
    app.metrics
        .chunk_bytes_received
        .inc_by(report.bytes_per_peer.values().sum());
    app.metrics.chunk_wire_bytes.inc_by(report.wire_bytes);
    app.metrics
        .compression_saved_bytes
        .inc_by(report.saved_by_compression);
    app.metrics.delta_saved_bytes.inc_by(report.saved_by_delta);
    let per_peer: Vec<(String, u64)> = report
        .bytes_per_peer
        .iter()
        .map(|(p, n)| (p.to_string(), *n))
        .collect();
    app.dash.stats.downloaded(&path, &per_peer, size, failure);
    debug!(nar = %nar_hash, sent, size, ok = outcome.result.is_ok(), "fetch settled");
}

/// Stream a NAR the chunk store holds, read (and verified) on a blocking thread. When a read
/// fails half-way (a file of a path read in place changed or went away under us), the rest
/// comes from the peers, if one has the NAR, instead of Nix being cut off.
fn serve_stored(app: &Arc<App>, nar_hash: Sha256Hash, size: u64) -> Response {
    let (tx, rx) = mpsc::channel::<Chunk>(BODY_QUEUE);
    let app = app.clone();
    tokio::spawn(async move {
        let reading = {
            let (app, tx) = (app.clone(), tx.clone());
            tokio::task::spawn_blocking(move || read_stored(&app, nar_hash, &tx))
        };
        let (sent, e) = match reading.await {
            Ok(Ok(())) => return,
            Ok(Err(failed)) => failed,
            Err(_) => (0, std::io::Error::other("the reading task died")),
        };
        warn!(nar = %nar_hash, error = %e, sent, "stored NAR unreadable; fetching the rest from peers");
        let rest = match app.stored_path(nar_hash).await {
            Some(hash) => app.find_remote(hash).await,
            None => None,
        };
        let Some(p) = rest.filter(|p| p.info.nar_hash == nar_hash && p.info.nar_size == size)
        else {
            warn!(nar = %nar_hash, "no peer has it; cutting the response");
            let _ = tx.send(Err(e)).await;
            return;
        };
        match start_fetch(&app, &p).await {
            Ok(started) => forward(&app, &p, started, &tx, sent).await,
            Err(_) => {
                let _ = tx.send(Err(e)).await;
            }
        }
    });
    nar_response(size, body_from(rx))
}

/// Read a stored NAR into the body; on a failed read, the bytes sent so far and the error.
fn read_stored(
    app: &App,
    nar_hash: Sha256Hash,
    tx: &mpsc::Sender<Chunk>,
) -> Result<(), (u64, std::io::Error)> {
    let mut r = app
        .store
        .nar_reader(&nar_hash)
        .map_err(|e| (0, std::io::Error::other(e.to_string())))?;
    let mut buf = vec![0u8; READ_BUF];
    let mut sent = 0u64;
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                app.metrics.nar_bytes_served.inc_by(n as u64);
                if tx
                    .blocking_send(Ok(Bytes::copy_from_slice(&buf[..n])))
                    .is_err()
                {
                    return Ok(());
                }
                sent += n as u64;
            }
            Err(e) => return Err((sent, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nar_names() {
        let h = "0kdc467rvrm9924cmghf8yyixdb9jbj6f77g9xp0w2srhmz4ri69";
        assert!(parse_nar_name(&format!("{h}.nar")).is_some());
        assert!(parse_nar_name(h).is_none());
        assert!(parse_nar_name("..%2F..%2Fetc%2Fpasswd.nar").is_none());
        assert!(parse_nar_name(&format!("{h}.nar.xz")).is_none());
    }
}
